//! Mutual TLS over loopback with the configs ferryd and the CLI use.

mod common;

use common::{anonymous_client_config, handshake, handshake_on, Cluster, GREETING};
use ferry_pki::{PeerIdentity, Role};

#[tokio::test]
async fn cluster_client_completes_handshake_and_server_sees_its_identity() {
    let cluster = Cluster::new("prod");

    let (server, client) = handshake(
        cluster.server_config(),
        cluster.client_config(&cluster.admin),
        "127.0.0.1",
    )
    .await;

    assert_eq!(server.unwrap(), PeerIdentity::client("alice", Role::Admin));
    let (server_identity, greeting) = client.unwrap();
    assert_eq!(server_identity, PeerIdentity::host("host1"));
    assert_eq!(
        greeting.as_deref(),
        Some(std::str::from_utf8(GREETING).unwrap())
    );
}

#[tokio::test]
async fn host_calling_host_is_seen_as_a_host() {
    let cluster = Cluster::new("prod");
    let host2 = cluster.ca.issue_host("host2", &[]).unwrap();

    let (server, _) = handshake(
        cluster.server_config(),
        cluster.client_config(&host2),
        "host1",
    )
    .await;

    assert_eq!(server.unwrap(), PeerIdentity::host("host2"));
}

#[tokio::test]
async fn client_with_certificate_from_another_ca_is_refused() {
    let cluster = Cluster::new("prod");
    let other = Cluster::new("staging");
    let client = ferry_pki::client_config(
        cluster.ca.cert_pem(),
        &other.admin.cert_pem,
        &other.admin.key_pem,
    )
    .unwrap();

    let (server, client) = handshake(cluster.server_config(), client, "127.0.0.1").await;

    assert_eq!(server.unwrap_err(), "InvalidCertificate(UnknownIssuer)");
    assert!(
        client.map(|(_, g)| g).unwrap_or(None).is_none(),
        "client got data"
    );
}

#[tokio::test]
async fn client_with_certificate_from_an_impostor_ca_of_the_same_name_is_refused() {
    let cluster = Cluster::new("prod");
    // Same cluster name, so the same CA subject, and the same user: only the
    // keys differ. Trust must follow the key, not the name.
    let impostor = Cluster::new("prod");
    let client = ferry_pki::client_config(
        cluster.ca.cert_pem(),
        &impostor.admin.cert_pem,
        &impostor.admin.key_pem,
    )
    .unwrap();

    let (server, client) = handshake(cluster.server_config(), client, "127.0.0.1").await;

    assert_eq!(server.unwrap_err(), "InvalidCertificate(BadSignature)");
    assert!(
        client.map(|(_, g)| g).unwrap_or(None).is_none(),
        "client got data"
    );
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let cluster = Cluster::new("prod");

    let (server, client) = handshake(
        cluster.server_config(),
        anonymous_client_config(cluster.ca.cert_pem()),
        "127.0.0.1",
    )
    .await;

    assert_eq!(server.unwrap_err(), "NoCertificatesPresented");
    assert!(
        client.map(|(_, g)| g).unwrap_or(None).is_none(),
        "client got data"
    );
}

#[tokio::test]
async fn client_refuses_server_certificate_from_another_ca() {
    let cluster = Cluster::new("prod");
    let other = Cluster::new("staging");
    let impostor = Cluster::new("prod");

    for rogue in [other, impostor] {
        let (_, client) = handshake(
            rogue.server_config(),
            cluster.client_config(&cluster.admin),
            "127.0.0.1",
        )
        .await;

        let err = client.unwrap_err();
        assert!(
            err == "InvalidCertificate(UnknownIssuer)" || err == "InvalidCertificate(BadSignature)",
            "{err}"
        );
    }
}

#[tokio::test]
async fn client_refuses_server_certificate_for_another_host_name() {
    let cluster = Cluster::new("prod");

    let (_, client) = handshake(
        cluster.server_config(),
        cluster.client_config(&cluster.admin),
        "host2",
    )
    .await;

    let err = client.unwrap_err();
    assert!(
        err.starts_with("InvalidCertificate(NotValidForName"),
        "{err}"
    );
}

#[tokio::test]
async fn client_refuses_a_user_certificate_posing_as_server() {
    let cluster = Cluster::new("prod");
    let bob = cluster.ca.issue_client("bob", Role::Operator).unwrap();
    let server =
        ferry_pki::server_config(cluster.ca.cert_pem(), &bob.cert_pem, &bob.key_pem).unwrap();

    let (_, client) = handshake(server, cluster.client_config(&cluster.admin), "127.0.0.1").await;

    let err = client.unwrap_err();
    assert!(
        err.starts_with("InvalidCertificate(InvalidPurpose"),
        "{err}"
    );
}

#[tokio::test]
async fn server_is_reachable_by_host_name_localhost_and_extra_san() {
    let cluster = Cluster::new("prod");
    let host = cluster
        .ca
        .issue_host(
            "host1",
            &["host1.dc1.example".to_owned(), "198.18.0.1".to_owned()],
        )
        .unwrap();
    let server =
        ferry_pki::server_config(cluster.ca.cert_pem(), &host.cert_pem, &host.key_pem).unwrap();

    for name in ["host1", "localhost", "host1.dc1.example", "198.18.0.1"] {
        let (server_outcome, client) =
            handshake(server.clone(), cluster.client_config(&cluster.admin), name).await;
        assert!(server_outcome.is_ok(), "{name}: {server_outcome:?}");
        assert!(client.is_ok(), "{name}: {client:?}");
    }
}

#[tokio::test]
async fn server_is_reachable_over_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipping: this machine has no IPv6 loopback");
        return;
    }
    let cluster = Cluster::new("prod");

    let (server, client) = handshake_on(
        "[::1]:0",
        cluster.server_config(),
        cluster.client_config(&cluster.admin),
        "[::1]",
    )
    .await;

    assert!(server.is_ok(), "{server:?}");
    assert!(client.is_ok(), "{client:?}");
}

#[tokio::test]
async fn server_offers_http1_when_client_offers_h2_and_http1() {
    let cluster = Cluster::new("prod");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(cluster.server_config());
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
    });
    let mut config = (*cluster.client_config(&cluster.admin)).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ferry_pki::server_name("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();

    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(server.await.unwrap().as_deref(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn rotation_bundle_trusts_both_cas() {
    let old = Cluster::new("prod");
    let new = Cluster::new("prod");
    let bundle = format!("{}{}", old.ca.cert_pem(), new.ca.cert_pem());
    let server = ferry_pki::server_config(&bundle, &new.host.cert_pem, &new.host.key_pem).unwrap();

    for admin in [&old.admin, &new.admin] {
        let client = ferry_pki::client_config(&bundle, &admin.cert_pem, &admin.key_pem).unwrap();
        let (server_outcome, _) = handshake(server.clone(), client, "127.0.0.1").await;
        assert!(server_outcome.is_ok(), "{server_outcome:?}");
    }
}

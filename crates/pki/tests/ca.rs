//! The cluster CA: creating, storing, loading, issuing, and what the issued
//! certificates say.

mod common;

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{handshake, Cluster};
use ferry_pki::{
    ClusterCa, IssuedCert, PeerIdentity, PeerKind, PkiError, Role, CA_CERT_FILE, CA_KEY_FILE,
};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn der(pem: &str) -> Vec<u8> {
    use ferry_pki::rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn save_then_load_round_trips_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::create("prod").unwrap();

    ca.save(dir.path()).unwrap();
    let loaded = ClusterCa::load(dir.path()).unwrap();

    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    assert_eq!(loaded.cluster_name(), "prod");
    assert_eq!(loaded.not_after(), ca.not_after());
}

#[tokio::test]
async fn certificates_issued_by_a_loaded_ca_verify_against_the_original_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let original = ClusterCa::create("prod").unwrap();
    original.save(dir.path()).unwrap();
    let ca_pem = fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
    let loaded = ClusterCa::load(dir.path()).unwrap();
    let host = loaded.issue_host("host1", &[]).unwrap();
    let user = loaded.issue_client("alice", Role::Viewer).unwrap();
    let server = ferry_pki::server_config(&ca_pem, &host.cert_pem, &host.key_pem).unwrap();
    let client = ferry_pki::client_config(&ca_pem, &user.cert_pem, &user.key_pem).unwrap();

    let (server_outcome, client_outcome) = handshake(server, client, "host1").await;

    assert_eq!(
        server_outcome.unwrap(),
        PeerIdentity::client("alice", Role::Viewer)
    );
    assert_eq!(client_outcome.unwrap().0, PeerIdentity::host("host1"));
}

#[test]
fn saved_key_files_are_0600_and_certificates_0644() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("pki");
    let cluster = Cluster::new("prod");

    cluster.ca.save(&ca_dir).unwrap();
    cluster.host.save(&ca_dir, "host1").unwrap();

    assert_eq!(mode(&ca_dir), 0o700, "created directory");
    assert_eq!(mode(&ca_dir.join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&ca_dir.join(CA_CERT_FILE)), 0o644);
    assert_eq!(mode(&ca_dir.join("host1-key.pem")), 0o600);
    assert_eq!(mode(&ca_dir.join("host1.pem")), 0o644);
}

#[test]
fn issued_cert_save_then_load_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new("prod");

    cluster.admin.save(dir.path(), "alice").unwrap();
    let loaded = IssuedCert::load(dir.path(), "alice").unwrap();

    assert_eq!(loaded.cert_pem, cluster.admin.cert_pem);
    assert_eq!(loaded.key_pem, cluster.admin.key_pem);
}

#[test]
fn issued_cert_save_refuses_a_stem_with_a_path_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new("prod");

    let err = cluster.admin.save(dir.path(), "../alice").unwrap_err();

    assert!(matches!(err, PkiError::InvalidName { .. }), "{err}");
}

#[test]
fn save_refuses_to_overwrite_an_existing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let first = ClusterCa::create("prod").unwrap();
    first.save(dir.path()).unwrap();
    let second = ClusterCa::create("prod").unwrap();

    let err = second.save(dir.path()).unwrap_err();

    assert!(matches!(err, PkiError::AlreadyExists { .. }), "{err}");
    assert_eq!(
        ClusterCa::load(dir.path()).unwrap().cert_pem(),
        first.cert_pem()
    );
}

#[test]
fn save_refuses_when_only_the_key_exists() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(CA_KEY_FILE), "old key").unwrap();
    let ca = ClusterCa::create("prod").unwrap();

    let err = ca.save(dir.path()).unwrap_err();

    assert!(matches!(err, PkiError::AlreadyExists { .. }), "{err}");
    assert!(
        !dir.path().join(CA_CERT_FILE).exists(),
        "wrote the certificate anyway"
    );
}

#[test]
fn forced_save_replaces_the_ca_with_a_0600_key() {
    let dir = tempfile::tempdir().unwrap();
    ClusterCa::create("prod").unwrap().save(dir.path()).unwrap();
    fs::set_permissions(
        dir.path().join(CA_KEY_FILE),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let second = ClusterCa::create("prod").unwrap();

    second.save_overwriting(dir.path()).unwrap();

    assert_eq!(
        ClusterCa::load(dir.path()).unwrap().cert_pem(),
        second.cert_pem()
    );
    assert_eq!(mode(&dir.path().join(CA_KEY_FILE)), 0o600);
}

#[test]
fn load_refuses_a_key_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    ClusterCa::create("prod").unwrap().save(dir.path()).unwrap();
    fs::set_permissions(
        dir.path().join(CA_KEY_FILE),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();

    let err = ClusterCa::load(dir.path()).unwrap_err();

    assert!(
        matches!(err, PkiError::InsecureKeyPermissions { mode: 0o640, .. }),
        "{err}"
    );
}

#[test]
fn load_refuses_a_key_that_is_not_the_cas() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    ClusterCa::create("prod").unwrap().save(dir.path()).unwrap();
    ClusterCa::create("prod")
        .unwrap()
        .save(other.path())
        .unwrap();
    fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();

    let err = ClusterCa::load(dir.path()).unwrap_err();

    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
}

#[test]
fn load_refuses_a_leaf_certificate_as_ca() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new("prod");
    cluster.ca.save(dir.path()).unwrap();
    fs::write(dir.path().join(CA_CERT_FILE), &cluster.host.cert_pem).unwrap();

    let err = ClusterCa::load(dir.path()).unwrap_err();

    assert!(matches!(err, PkiError::NotACa { .. }), "{err}");
}

#[test]
fn load_of_a_missing_ca_names_the_file() {
    let dir = tempfile::tempdir().unwrap();

    let err = ClusterCa::load(dir.path()).unwrap_err();

    assert!(err.to_string().contains(CA_CERT_FILE), "{err}");
}

#[test]
fn host_certificate_parses_as_a_host_identity() {
    let cluster = Cluster::new("prod");

    let identity = PeerIdentity::from_der(&der(&cluster.host.cert_pem)).unwrap();

    assert_eq!(
        identity,
        PeerIdentity {
            name: "host1".to_owned(),
            kind: PeerKind::Host,
            role: None
        }
    );
}

#[test]
fn client_certificates_parse_with_their_role() {
    let ca = ClusterCa::create("prod").unwrap();
    for role in Role::ALL {
        let cert = ca.issue_client("ops@example.org", role).unwrap();

        let identity = PeerIdentity::from_der(&der(&cert.cert_pem)).unwrap();

        assert_eq!(identity.name, "ops@example.org");
        assert_eq!(identity.kind, PeerKind::Client);
        assert_eq!(identity.role, Some(role));
    }
}

#[test]
fn ca_certificate_is_not_a_peer_identity() {
    let ca = ClusterCa::create("prod").unwrap();

    let err = PeerIdentity::from_pem(ca.cert_pem()).unwrap_err();

    assert!(matches!(err, PkiError::Identity { .. }), "{err}");
}

#[test]
fn foreign_certificate_is_not_a_peer_identity() {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["example.org".to_owned()]).unwrap();
    let foreign = params.self_signed(&key).unwrap();

    let err = PeerIdentity::from_der(foreign.der()).unwrap_err();

    assert!(matches!(err, PkiError::Identity { .. }), "{err}");
}

#[test]
fn garbage_is_not_a_certificate() {
    let err = PeerIdentity::from_der(b"\x30\x03\x02\x01\x01").unwrap_err();

    assert!(matches!(err, PkiError::Certificate { .. }), "{err}");
}

#[test]
fn missing_peer_certificate_is_an_error() {
    let err = PeerIdentity::from_peer_certificates(None).unwrap_err();

    assert!(matches!(err, PkiError::NoPeerCertificate), "{err}");
}

#[test]
fn subject_is_encoded_o_ou_cn_as_tls_authz_identity_says() {
    let cluster = Cluster::new("prod");
    let der = der(&cluster.host.cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();

    // x509-parser, like GnuTLS's gnutls_x509_crt_get_dn, prints in encoding order.
    assert_eq!(cert.subject().to_string(), "O=Ferry, OU=host, CN=host1");
    assert_eq!(
        PeerIdentity::host("host1").tls_authz_identity(),
        "O=Ferry,OU=host,CN=host1"
    );
}

#[test]
fn host_certificate_carries_name_loopback_and_extra_sans_once_each() {
    let ca = ClusterCa::create("prod").unwrap();
    let cert = ca
        .issue_host(
            "host1",
            &[
                "198.18.0.1".to_owned(),
                "HOST1".to_owned(),
                "0:0::1".to_owned(),
                "host1.dc1.example".to_owned(),
            ],
        )
        .unwrap();
    let der = der(&cert.cert_pem);
    let (_, x509) = X509Certificate::from_der(&der).unwrap();

    let sans: Vec<String> = x509
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => dns.to_string(),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap()).to_string(),
                _ => IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap()).to_string(),
            },
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect();

    assert_eq!(
        sans,
        [
            "host1",
            "localhost",
            "127.0.0.1",
            "::1",
            "198.18.0.1",
            "host1.dc1.example"
        ]
    );
}

#[test]
fn issue_host_refuses_bad_names_and_sans() {
    let ca = ClusterCa::create("prod").unwrap();

    for bad in ["", "host_1", "h,OU=admin", "10.0.0.1"] {
        let err = ca.issue_host(bad, &[]).unwrap_err();
        assert!(
            matches!(err, PkiError::InvalidName { .. }),
            "{bad:?}: {err}"
        );
    }
    let err = ca
        .issue_host("host1", &["*.example".to_owned()])
        .unwrap_err();
    assert!(matches!(err, PkiError::InvalidSan { .. }), "{err}");
}

#[test]
fn issue_client_refuses_names_that_would_need_escaping() {
    let ca = ClusterCa::create("prod").unwrap();

    let err = ca.issue_client("alice,OU=admin", Role::Viewer).unwrap_err();

    assert!(matches!(err, PkiError::InvalidName { .. }), "{err}");
}

#[test]
fn create_refuses_a_bad_cluster_name() {
    let err = ClusterCa::create("prod cluster").unwrap_err();

    assert!(matches!(err, PkiError::InvalidName { .. }), "{err}");
}

#[test]
fn validity_is_backdated_and_leaves_end_before_the_ca() {
    let cluster = Cluster::new("prod");
    let now = OffsetDateTime::now_utc();
    let ca_der = der(cluster.ca.cert_pem());
    let host_der = der(&cluster.host.cert_pem);
    let user_der = der(&cluster.admin.cert_pem);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    let (_, host) = X509Certificate::from_der(&host_der).unwrap();
    let (_, user) = X509Certificate::from_der(&user_der).unwrap();

    let ca_years = (ca.validity().not_after.to_datetime() - now).whole_days() / 365;
    assert_eq!(ca_years, 10);
    for leaf in [&host, &user] {
        let not_before = leaf.validity().not_before.to_datetime();
        assert!(not_before <= now - Duration::minutes(59), "{not_before}");
        assert!(leaf.validity().not_after.to_datetime() <= ca.validity().not_after.to_datetime());
    }
    let host_days = (host.validity().not_after.to_datetime() - now).whole_days();
    let user_days = (user.validity().not_after.to_datetime() - now).whole_days();
    assert!((729..=730).contains(&host_days), "{host_days}");
    assert!((364..=365).contains(&user_days), "{user_days}");
}

#[test]
fn certificates_are_ecdsa_p256_with_distinct_random_serials() {
    let cluster = Cluster::new("prod");
    let second = cluster.ca.issue_host("host1", &[]).unwrap();
    let ders = [
        der(cluster.ca.cert_pem()),
        der(&cluster.host.cert_pem),
        der(&second.cert_pem),
        der(&cluster.admin.cert_pem),
    ];
    let mut serials = Vec::new();
    for der in &ders {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        // ecdsa-with-SHA256
        assert_eq!(
            cert.signature_algorithm.algorithm.to_id_string(),
            "1.2.840.10045.4.3.2"
        );
        // id-ecPublicKey on prime256v1
        let spki = &cert.public_key().algorithm;
        assert_eq!(spki.algorithm.to_id_string(), "1.2.840.10045.2.1");
        assert_eq!(
            spki.parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap()
                .to_id_string(),
            "1.2.840.10045.3.1.7"
        );
        assert_eq!(cert.raw_serial().len(), 16);
        serials.push(cert.raw_serial().to_vec());
    }
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), ders.len());
}

#[test]
fn debug_output_never_shows_private_keys() {
    let cluster = Cluster::new("prod");

    let shown = format!("{:?} {:?}", cluster.ca, cluster.host);

    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(shown.contains("<redacted>"));
}

//! Real TLS over loopback: one server accepting one connection, one client.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;
use std::time::Duration;

use ferry_pki::rustls::pki_types::pem::PemObject as _;
use ferry_pki::rustls::{self, ClientConfig, ServerConfig};
use ferry_pki::{ClusterCa, IssuedCert, PeerIdentity, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Bound on every network wait, so a broken test fails instead of hanging.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const GREETING: &[u8] = b"hello from the server\n";

/// A cluster as a test needs it: its CA, one host and one admin.
pub struct Cluster {
    pub ca: ClusterCa,
    pub host: IssuedCert,
    pub admin: IssuedCert,
}

impl Cluster {
    pub fn new(name: &str) -> Cluster {
        let ca = ClusterCa::create(name).unwrap();
        let host = ca.issue_host("host1", &[]).unwrap();
        let admin = ca.issue_client("alice", Role::Admin).unwrap();
        Cluster { ca, host, admin }
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        ferry_pki::server_config(self.ca.cert_pem(), &self.host.cert_pem, &self.host.key_pem)
            .unwrap()
    }

    pub fn client_config(&self, cert: &IssuedCert) -> Arc<ClientConfig> {
        ferry_pki::client_config(self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap()
    }
}

/// What the server saw of one connection attempt.
pub type ServerOutcome = Result<PeerIdentity, String>;

/// What the client saw: the server's identity and its greeting, or why not.
pub type ClientOutcome = Result<(PeerIdentity, Option<String>), String>;

/// Runs one TLS connection over 127.0.0.1 (or `[::1]` when `addr` says so):
/// the server completes the handshake, reads the client's identity and
/// sends a greeting; the client connects to `connect_as` and reads it.
pub async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    connect_as: &str,
) -> (ServerOutcome, ClientOutcome) {
    handshake_on("127.0.0.1:0", server, client, connect_as).await
}

pub async fn handshake_on(
    bind: &str,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    connect_as: &str,
) -> (ServerOutcome, ClientOutcome) {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(describe)?;
        let identity = PeerIdentity::from_peer_certificates(tls.get_ref().1.peer_certificates())
            .map_err(|e| e.to_string())?;
        tls.write_all(GREETING).await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(identity)
    });

    let server_name = ferry_pki::server_name(connect_as).unwrap();
    let client_outcome = tokio::time::timeout(TIMEOUT, async move {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(client)
            .connect(server_name, tcp)
            .await
            .map_err(describe)?;
        let identity = PeerIdentity::from_peer_certificates(tls.get_ref().1.peer_certificates())
            .map_err(|e| e.to_string())?;
        // In TLS 1.3 the client finishes its side of the handshake before the
        // server has judged the client's certificate; a refusal shows up as
        // an alert on the first read.
        let mut received = Vec::new();
        let greeting = match tls.read_to_end(&mut received).await {
            Ok(_) if !received.is_empty() => Some(String::from_utf8_lossy(&received).into_owned()),
            _ => None,
        };
        Ok::<_, String>((identity, greeting))
    })
    .await
    .expect("client timed out");

    let server_outcome = tokio::time::timeout(TIMEOUT, server_task)
        .await
        .expect("server timed out")
        .expect("server task panicked");
    (server_outcome, client_outcome)
}

/// The rustls error inside an I/O error, in `Debug` form so that tests can
/// match on the variant (`InvalidCertificate(UnknownIssuer)`), else the text.
pub fn describe(e: std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => format!("{tls:?}"),
        None => e.to_string(),
    }
}

/// A client config that trusts `ca_pem` but presents no certificate.
pub fn anonymous_client_config(ca_pem: &str) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = ClientConfig::builder_with_provider(ferry_pki::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

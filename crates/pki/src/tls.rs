//! rustls configurations for mutual TLS inside the cluster.
//!
//! Both sides trust exactly one thing: the cluster CA. Servers demand a
//! client certificate and refuse the handshake without one (there is no
//! unauthenticated listener anywhere in Ferry); clients ignore the system's
//! root store, so a certificate from a public CA can never pass for a host.
//!
//! Every config is built with the `ring` provider passed explicitly rather
//! than a process-wide default: the workspace builds rustls without
//! `aws-lc-rs`, and a library that installed or relied on a process default
//! would break (or be broken by) any other crate in the same binary that
//! chose differently.
//!
//! Only TLS 1.3 is offered. Every peer is Ferry's own code, curl or a
//! current browser, all of which speak it; and in TLS 1.3 the client
//! certificate travels encrypted, so a passive observer of the network does
//! not learn which user or host is calling.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::error::{PkiError, Result};
use crate::pem::{parse_certs_pem, parse_key_pem};

/// ALPN id of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider every config of this crate uses: rustls's `ring`
/// provider, never the process default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config for ferryd's HTTPS API: presents `cert_pem`/`key_pem`
/// and requires every client to present a certificate signed by the CA(s)
/// in `ca_pem`. Advertises ALPN `http/1.1` only (see
/// [`server_config_with_alpn`]).
///
/// `ca_pem` may hold more than one CA certificate, which is how a cluster
/// trusts an old and a new CA while it rotates.
pub fn server_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>> {
    server_config_with_alpn(ca_pem, cert_pem, key_pem, &[ALPN_HTTP1])
}

/// [`server_config`] with a chosen ALPN list, e.g. `&[ALPN_H2, ALPN_HTTP1]`
/// for a server that speaks HTTP/2, or `&[]` for a non-HTTP protocol.
///
/// The default is HTTP/1.1 alone because ALPN is a promise: advertising `h2`
/// from a server built with hyper's HTTP/1 support only would make curl and
/// browsers pick HTTP/2 and then fail. A client that offers no ALPN at all is
/// accepted either way.
pub fn server_config_with_alpn(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>> {
    let provider = crypto_provider();
    let roots = Arc::new(root_store(ca_pem)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(PkiError::ClientVerifier)?;
    let certs = parse_certs_pem(cert_pem, "the server certificate")?;
    let key = parse_key_pem(key_pem, "the server private key")?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| PkiError::Tls {
            what: "select TLS 1.3",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|source| PkiError::Tls {
            what: "use the server certificate and key",
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client config that trusts only the CA(s) in `ca_pem` and presents
/// `cert_pem`/`key_pem`. Server names are verified as usual: connect with a
/// [`server_name`] that the server's certificate lists (its host name,
/// `localhost`, or one of its IP addresses).
pub fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<ClientConfig>> {
    let roots = root_store(ca_pem)?;
    let certs = parse_certs_pem(cert_pem, "the client certificate")?;
    let key = parse_key_pem(key_pem, "the client private key")?;
    let config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| PkiError::Tls {
            what: "select TLS 1.3",
            source,
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|source| PkiError::Tls {
            what: "use the client certificate and key",
            source,
        })?;
    Ok(Arc::new(config))
}

/// The name to verify the server's certificate against: an IP address
/// (`127.0.0.1`, `::1`, also `[::1]`) becomes an IP name, matched against the
/// certificate's IP SANs; anything else must be a DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(bare.to_owned()).map_err(|_| PkiError::InvalidServerName {
        name: host.to_owned(),
    })
}

/// Checks that `cert` verifies against the CA(s) in `ca_pem` as a TLS
/// client certificate would, now. Used before handing credentials to a
/// program (QEMU) whose own complaint would be less clear.
pub(crate) fn verify_issued_by(ca_pem: &str, cert: &CertificateDer<'_>, what: &str) -> Result<()> {
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(ca_pem)?),
        crypto_provider(),
    )
    .build()
    .map_err(PkiError::ClientVerifier)?;
    verifier
        .verify_client_cert(cert, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|source| PkiError::NotIssuedByCa {
            what: what.to_owned(),
            source,
        })
}

fn root_store(ca_pem: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in parse_certs_pem(ca_pem, "the cluster CA certificate")? {
        roots.add(ca).map_err(|source| PkiError::Tls {
            what: "trust the cluster CA certificate",
            source,
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_accepts_ips_and_dns_names() {
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("host2").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("not a name").is_err());
    }

    #[test]
    fn configs_refuse_garbage_pem() {
        let err = server_config("nope", "nope", "nope").unwrap_err();
        assert!(matches!(err, PkiError::PemMissing { .. }), "{err}");
    }
}

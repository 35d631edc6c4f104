//! Ferry's cluster PKI: one certificate authority per cluster, the
//! certificates it issues to hosts and users, and the TLS configurations that
//! make every connection in the cluster mutually authenticated.
//!
//! # The model
//!
//! `ferry pki init` calls [`ClusterCa::create`] and [`ClusterCa::save`].
//! Each host gets a certificate from [`ClusterCa::issue_host`]; each person or
//! script gets one from [`ClusterCa::issue_client`] with a [`Role`].
//!
//! - ferryd's HTTPS API uses [`server_config`]: the handshake fails for any
//!   client without a certificate from the cluster CA, and the server learns
//!   who called from [`PeerIdentity::from_peer_certificates`].
//! - The CLI, the controller and agents calling each other use
//!   [`client_config`], which trusts the cluster CA and nothing else.
//! - QEMU's migration and NBD streams use [`write_qemu_tls_dir`], and the
//!   destination names the expected source host with
//!   [`PeerIdentity::tls_authz_identity`] in `tls-authz`.
//!
//! The identity encoding (who a certificate names, and how) is documented in
//! [`identity`]; the algorithm and validity choices in [`ca`].
//!
//! # Files
//!
//! | file | mode | written by |
//! |------|------|------------|
//! | `ca.pem`, `ca-key.pem` | 0644, 0600 | [`ClusterCa::save`] |
//! | `<stem>.pem`, `<stem>-key.pem` | 0644, 0600 | [`IssuedCert::save`] |
//! | `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`, `dh-params.pem` | keys 0600 | [`write_qemu_tls_dir`] |
//!
//! Directories this crate creates are 0700. Loading refuses a key file that
//! group or others can access.

pub mod ca;
mod error;
mod fsutil;
pub mod identity;
mod pem;
mod qemu;
mod tls;

pub use ca::{ClusterCa, IssuedCert, CA_CERT_FILE, CA_KEY_FILE};
pub use error::{PkiError, Result};
pub use fsutil::{CERT_FILE_MODE, DIR_MODE, KEY_FILE_MODE};
pub use identity::{PeerIdentity, PeerKind, Role};
pub use pem::MAX_PEM_BYTES;
pub use qemu::{
    write_qemu_tls_dir, QEMU_CA_CERT, QEMU_CLIENT_CERT, QEMU_CLIENT_KEY, QEMU_DH_PARAMS,
    QEMU_SERVER_CERT, QEMU_SERVER_KEY,
};
pub use tls::{
    client_config, crypto_provider, server_config, server_config_with_alpn, server_name, ALPN_H2,
    ALPN_HTTP1,
};

/// Re-exported so that callers name the same rustls this crate built its
/// configs with.
pub use rustls;

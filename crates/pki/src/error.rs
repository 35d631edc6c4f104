//! The one error type of this crate.
//!
//! Each variant names what was being handled (a file path, or which PEM input)
//! in its message and keeps the underlying cause in `#[source]`, never both, so
//! that printing the whole chain at the edge reads as one sentence per layer.

use std::path::PathBuf;

/// Everything that can go wrong while making, storing, loading or using
/// cluster certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A host, user, cluster or file-stem name that this crate refuses to put
    /// into a certificate or a path.
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        /// What kind of name it was ("host name", "user name", ...).
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A subject alternative name that is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {san:?}: {reason}")]
    InvalidSan {
        /// The rejected name.
        san: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// An unknown role name.
    #[error("unknown role {0:?} (expected admin, operator or viewer)")]
    UnknownRole(String),

    /// rcgen failed to generate a key or sign a certificate.
    #[error("cannot {what}")]
    Generate {
        /// What was being generated, e.g. "sign the certificate of host h1".
        what: String,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },

    /// A private key that rcgen cannot load.
    #[error("cannot load the private key in {what}")]
    Key {
        /// Which key (a file path or input name).
        what: String,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },

    /// The operating system's random number generator failed.
    #[error("cannot draw a random certificate serial number")]
    Random,

    /// A file or directory operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// The operation ("read", "write", "create directory", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },

    /// Saving would replace an existing file that must not be replaced
    /// silently (the cluster CA).
    #[error("{} already exists; refusing to replace the cluster CA, which would orphan every certificate it signed", path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },

    /// A private key file that other users can read or write.
    #[error("{} has mode {mode:04o}; a private key must not be accessible to group or others (chmod 600 it)", path.display())]
    InsecureKeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },

    /// A PEM input (in memory or on disk) larger than any certificate or key
    /// this crate makes; refused before decoding.
    #[error("{what} is larger than {limit} bytes")]
    TooLarge {
        /// Which input.
        what: String,
        /// The cap.
        limit: usize,
    },

    /// A PEM input that could not be decoded.
    #[error("cannot decode PEM of {what}")]
    Pem {
        /// Which input ("CA certificate", "private key", a file path, ...).
        what: String,
        /// The decoder's reason.
        #[source]
        source: rustls::pki_types::pem::Error,
    },

    /// A PEM input that holds no item of the expected kind.
    #[error("{what} contains no {expected}")]
    PemMissing {
        /// Which input.
        what: String,
        /// What was looked for ("CERTIFICATE block", "private key").
        expected: &'static str,
    },

    /// A PEM input that holds more certificates than expected.
    #[error("{what} contains {count} certificates; expected exactly one")]
    PemTooMany {
        /// Which input.
        what: String,
        /// How many certificates it held.
        count: usize,
    },

    /// A certificate whose DER encoding does not parse.
    #[error("cannot parse the certificate in {what}")]
    Certificate {
        /// Which certificate.
        what: String,
        /// The parser's reason.
        #[source]
        source: x509_parser::error::X509Error,
    },

    /// A certificate loaded as the cluster CA that is not one.
    #[error("{what} is not a Ferry cluster CA certificate: {reason}")]
    NotACa {
        /// Which certificate.
        what: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A private key that does not belong to the certificate next to it.
    #[error("the private key in {key} does not match the certificate in {cert}")]
    KeyMismatch {
        /// The certificate.
        cert: String,
        /// The key.
        key: String,
    },

    /// A peer certificate that does not carry a Ferry identity.
    #[error("the peer certificate does not carry a Ferry identity: {reason}")]
    Identity {
        /// What is missing or malformed.
        reason: String,
    },

    /// The TLS peer presented no certificate at all.
    #[error("the TLS peer presented no certificate")]
    NoPeerCertificate,

    /// A name to connect to that is neither a DNS name nor an IP address.
    #[error("{name:?} is not a valid server name (expected a DNS name or an IP address)")]
    InvalidServerName {
        /// The rejected name.
        name: String,
    },

    /// A certificate handed to [`write_qemu_tls_dir`](crate::write_qemu_tls_dir)
    /// that is not a host certificate.
    #[error(
        "QEMU's migration credentials need a host certificate, but this one is for {identity}"
    )]
    NotAHostCertificate {
        /// What the certificate is for instead.
        identity: crate::PeerIdentity,
    },

    /// A certificate that does not verify against the cluster CA.
    #[error("{what} does not verify against the cluster CA")]
    NotIssuedByCa {
        /// Which certificate.
        what: String,
        /// rustls's verdict.
        #[source]
        source: rustls::Error,
    },

    /// rustls refused a certificate, key or configuration.
    #[error("cannot build the TLS configuration: {what}")]
    Tls {
        /// What was being set up.
        what: &'static str,
        /// rustls's reason.
        #[source]
        source: rustls::Error,
    },

    /// rustls refused to build the client-certificate verifier.
    #[error("cannot build the client certificate verifier from the cluster CA")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
}

/// Result with [`PkiError`].
pub type Result<T, E = PkiError> = std::result::Result<T, E>;

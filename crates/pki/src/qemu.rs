//! Credentials for QEMU's own TLS (migration stream and NBD), laid out the
//! way `-object tls-creds-x509,dir=...` reads them.
//!
//! One directory serves both roles a host plays in a migration: as
//! destination, QEMU loads it with `endpoint=server` (reading `ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, `dh-params.pem`); as source, with
//! `endpoint=client` (reading `ca-cert.pem`, `client-cert.pem`,
//! `client-key.pem`). Both certificates are the host's one certificate,
//! which carries both extended key usages.
//!
//! QEMU (GnuTLS) checks these files when the object is created: times, basic
//! constraints, that a critical key usage allows `keyEncipherment` for a leaf
//! (see [`crate::ca`]), and that the leaf verifies against the CA.
//!
//! On the destination, set `verify-peer=on` (the default for servers) and a
//! `tls-authz` whose identity is the *source* host's
//! [`PeerIdentity::tls_authz_identity`], so that only the expected host can
//! feed it a migration stream; the source names the destination in
//! `tls-hostname` (else QEMU uses the URI's host, and an IP works too), which
//! GnuTLS checks against the destination's SANs.
//!
//! Measured with QEMU 10.0.2: when the destination's authz check refuses
//! the source, the *source* can still report `completed` (TLS 1.3 lets the
//! client finish its handshake before the server judges its certificate, and
//! a small stream fits in socket buffers), while the destination stays in
//! `setup` and logs "TLS x509 authz check for ... is denied". Success must be
//! read from the destination, never from the source alone.

use std::path::Path;

use crate::ca::IssuedCert;
use crate::error::{PkiError, Result};
use crate::fsutil;
use crate::identity::{PeerIdentity, PeerKind};
use crate::pem::parse_single_cert_pem;
use crate::tls::verify_issued_by;

/// The CA QEMU trusts.
pub const QEMU_CA_CERT: &str = "ca-cert.pem";
/// The certificate QEMU presents as a server (migration destination).
pub const QEMU_SERVER_CERT: &str = "server-cert.pem";
/// The key for [`QEMU_SERVER_CERT`] (mode 0600).
pub const QEMU_SERVER_KEY: &str = "server-key.pem";
/// The certificate QEMU presents as a client (migration source).
pub const QEMU_CLIENT_CERT: &str = "client-cert.pem";
/// The key for [`QEMU_CLIENT_CERT`] (mode 0600).
pub const QEMU_CLIENT_KEY: &str = "client-key.pem";
/// Diffie-Hellman parameters for the server endpoint.
pub const QEMU_DH_PARAMS: &str = "dh-params.pem";

/// The RFC 7919 `ffdhe2048` group in PKCS#3 form.
///
/// Without a `dh-params.pem`, QEMU *generates* 2048-bit DH parameters each
/// time a server-endpoint `tls-creds-x509` object is created: measured here
/// at about 1.6 s of CPU per QEMU start (and random in length), on the
/// critical path of preparing a migration destination. With this file QEMU
/// starts in well under 0.1 s. A fixed, published group is also the safer
/// choice (RFC 7919); the handshake uses ECDHE anyway whenever both ends
/// offer it, which QEMU-to-QEMU they do.
const FFDHE2048_PEM: &str = "\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// Writes a QEMU `tls-creds-x509` directory for `host` (a certificate from
/// [`ClusterCa::issue_host`](crate::ClusterCa::issue_host)) trusting the CA
/// in `ca_pem`: the host's certificate and key serve as both server and
/// client credentials. Creates `dir` (mode 0700) if needed and replaces the
/// files atomically, so a QEMU started at any moment reads a consistent set;
/// keys are written with mode 0600.
///
/// Refuses a certificate that is not a host certificate (QEMU itself would
/// accept a user's certificate for the client endpoint, because the
/// extended key usage rcgen writes is not critical) or that does not verify
/// against `ca_pem` (QEMU would refuse it, but only when the VM's QEMU is
/// already being started, and with a vaguer message).
pub fn write_qemu_tls_dir(dir: &Path, ca_pem: &str, host: &IssuedCert) -> Result<()> {
    let cert = parse_single_cert_pem(&host.cert_pem, "the host certificate")?;
    let identity = PeerIdentity::from_der(&cert)?;
    if identity.kind != PeerKind::Host {
        return Err(PkiError::NotAHostCertificate { identity });
    }
    verify_issued_by(ca_pem, &cert, &format!("the certificate of {identity}"))?;

    fsutil::ensure_dir(dir)?;
    let files: [(&str, &str, u32); 6] = [
        (QEMU_CA_CERT, ca_pem, fsutil::CERT_FILE_MODE),
        (QEMU_SERVER_KEY, &host.key_pem, fsutil::KEY_FILE_MODE),
        (QEMU_SERVER_CERT, &host.cert_pem, fsutil::CERT_FILE_MODE),
        (QEMU_CLIENT_KEY, &host.key_pem, fsutil::KEY_FILE_MODE),
        (QEMU_CLIENT_CERT, &host.cert_pem, fsutil::CERT_FILE_MODE),
        (QEMU_DH_PARAMS, FFDHE2048_PEM, fsutil::CERT_FILE_MODE),
    ];
    for (name, contents, mode) in files {
        fsutil::write_atomic(&dir.join(name), contents.as_bytes(), mode)?;
    }
    Ok(())
}

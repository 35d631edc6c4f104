//! The cluster certificate authority: one self-signed CA per cluster that
//! signs every host's and every user's certificate.
//!
//! # Choices
//!
//! - **ECDSA P-256 with SHA-256** for every key. Three TLS stacks must accept
//!   these certificates: rustls (ferryd's API), browsers and curl (the
//!   dashboard, scripts), and GnuTLS inside QEMU (migration and NBD streams).
//!   P-256 is the one algorithm all of them have supported for a decade;
//!   Ed25519 certificates are still refused by some browsers and older
//!   GnuTLS builds, and RSA keys are slow to generate and large.
//! - **No intermediates** (`pathLenConstraint = 0`): the CA signs only leaf
//!   certificates, so a leaked leaf key can never mint other identities.
//! - **Validity**: 10 years for the CA, 2 years for hosts, 1 year for users,
//!   never past the CA's own expiry. Everything is backdated by an hour so a
//!   host whose clock lags the issuer's still accepts a fresh certificate
//!   (GnuTLS in QEMU refuses "not yet active" certificates outright).
//! - **Random 126-bit serial numbers**: rcgen's default derives the serial
//!   from the public key, which would repeat if a key were ever reused.
//! - **Leaf key usage** is `digitalSignature` plus `keyEncipherment`. The
//!   second is meaningless for an ECDSA key, but rcgen marks key usage
//!   critical and QEMU's credential check rejects a leaf whose critical key
//!   usage lacks `keyEncipherment` ("usage does not permit key
//!   encipherment"), so it is there for QEMU.
//!
//! # Debt
//!
//! There is no revocation: a lost host or user key stays valid until it
//! expires or the CA is replaced. rustls's client verifier and QEMU's
//! `ca-crl.pem` both take CRLs, and rcgen can sign them; wiring that up
//! (plus a serial registry) is the next step. Certificates are not renewed
//! automatically either.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::error::{PkiError, Result};
use crate::fsutil;
use crate::identity::{
    check_dns_name, nom_to_x509, validate_cluster_name, validate_host_name, validate_plain_name,
    validate_user_name, PeerIdentity, Role, Subject, CA_UNIT, HOST_UNIT, ORGANIZATION,
};
use crate::pem::parse_single_cert_pem;

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// How long the CA certificate is valid.
pub const CA_VALIDITY: Duration = Duration::days(3652);
/// How long a host certificate is valid (capped at the CA's expiry).
pub const HOST_CERT_VALIDITY: Duration = Duration::days(730);
/// How long a user certificate is valid (capped at the CA's expiry).
pub const CLIENT_CERT_VALIDITY: Duration = Duration::days(365);
/// How far `notBefore` is set before the moment of issue, to tolerate clock
/// skew between the issuer and the hosts.
pub const BACKDATE: Duration = Duration::hours(1);

/// DNS names and addresses every host certificate carries besides its own
/// name: a host's own tools (the CLI on the host, QEMU's NBD client in a
/// same-host storage migration) reach its agent over loopback.
const LOOPBACK_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The cluster's certificate authority, key included.
pub struct ClusterCa {
    cluster_name: String,
    /// The CA certificate exactly as created or loaded; this is what is
    /// distributed and trusted.
    cert_pem: String,
    not_after: OffsetDateTime,
    key: KeyPair,
    /// rcgen 0.13 signs only with an `rcgen::Certificate` as issuer, and can
    /// rebuild one from a loaded CA only by re-signing its parameters. The
    /// re-signed copy has the same subject, key and key identifier (which is
    /// all that issuing uses), but its bytes differ from `cert_pem`, so it is
    /// used for signing and never written out or trusted.
    issuer: rcgen::Certificate,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cluster_name", &self.cluster_name)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Makes a new self-signed CA for `cluster_name`, with subject
    /// `O=Ferry, OU=cluster-ca, CN=<cluster_name>`.
    pub fn create(cluster_name: &str) -> Result<ClusterCa> {
        validate_cluster_name(cluster_name)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| {
            PkiError::Generate {
                what: "generate the CA key".to_owned(),
                source,
            }
        })?;

        let mut params = CertificateParams::default();
        params.distinguished_name = subject(CA_UNIT, cluster_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial()?);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;

        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                what: format!("self-sign the CA certificate of cluster {cluster_name}"),
                source,
            })?;
        // Go through the same checks as a loaded CA, so that both paths
        // yield an identical `ClusterCa`.
        Self::from_pem_parts(
            &cert.pem(),
            &key.serialize_pem(),
            "the new CA certificate",
            "the new CA key",
        )
    }

    /// Loads the CA from `dir/ca.pem` and `dir/ca-key.pem`, refusing a key
    /// file that group or others can access.
    pub fn load(dir: &Path) -> Result<ClusterCa> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = fsutil::read_pem_file(&cert_path)?;
        fsutil::check_key_permissions(&key_path)?;
        let key_pem = fsutil::read_pem_file(&key_path)?;
        Self::from_pem_parts(
            &cert_pem,
            &key_pem,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    /// Writes `dir/ca.pem` (0644) and `dir/ca-key.pem` (0600), creating
    /// `dir` with mode 0700 if needed. Fails with
    /// [`PkiError::AlreadyExists`], writing nothing, if either file exists:
    /// replacing a CA orphans every certificate it signed, so that takes
    /// [`save_overwriting`](Self::save_overwriting).
    pub fn save(&self, dir: &Path) -> Result<()> {
        for name in [CA_CERT_FILE, CA_KEY_FILE] {
            let path = dir.join(name);
            if fsutil::exists(&path)? {
                return Err(PkiError::AlreadyExists { path });
            }
        }
        self.save_overwriting(dir)
    }

    /// Like [`save`](Self::save) but replaces an existing CA (`ferry pki
    /// init --force`). Each file is replaced atomically; the key keeps mode
    /// 0600 even if the old file was wider.
    pub fn save_overwriting(&self, dir: &Path) -> Result<()> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        fsutil::ensure_dir(dir)?;
        fsutil::write_atomic(
            &key_path,
            self.key.serialize_pem().as_bytes(),
            fsutil::KEY_FILE_MODE,
        )?;
        fsutil::write_atomic(&cert_path, self.cert_pem.as_bytes(), fsutil::CERT_FILE_MODE)
    }

    /// Builds a CA from its certificate and key, checking that the
    /// certificate is a Ferry CA and that the key is its key.
    pub fn from_pem_parts(
        cert_pem: &str,
        key_pem: &str,
        cert_what: &str,
        key_what: &str,
    ) -> Result<ClusterCa> {
        let der = parse_single_cert_pem(cert_pem, cert_what)?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Certificate {
                what: cert_what.to_owned(),
                source: nom_to_x509(e),
            })?;
        let not_a_ca = |reason| PkiError::NotACa {
            what: cert_what.to_owned(),
            reason,
        };
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => return Err(not_a_ca("its basic constraints do not mark a CA")),
        }
        let Subject { org, unit, name } =
            Subject::of(&x509).map_err(|_| not_a_ca("its subject is not O=Ferry, OU, CN"))?;
        if org != ORGANIZATION || unit != CA_UNIT {
            return Err(not_a_ca("its subject is not O=Ferry, OU=cluster-ca"));
        }
        let not_after = x509.validity().not_after.to_datetime();

        let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::Key {
            what: key_what.to_owned(),
            source,
        })?;
        if key.public_key_der() != x509.public_key().raw {
            return Err(PkiError::KeyMismatch {
                cert: cert_what.to_owned(),
                key: key_what.to_owned(),
            });
        }

        let issuer = CertificateParams::from_ca_cert_der(&der)
            .and_then(|params| params.self_signed(&key))
            .map_err(|source| PkiError::Generate {
                what: format!("prepare {cert_what} for signing"),
                source,
            })?;

        Ok(ClusterCa {
            cluster_name: name,
            cert_pem: cert_pem.to_owned(),
            not_after,
            key,
            issuer,
        })
    }

    /// The cluster's name (the CA's `CN`).
    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// The CA certificate in PEM: the one trust anchor of the cluster.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Issues the certificate of host `host_name`: subject
    /// `O=Ferry, OU=host, CN=<host_name>`, both TLS server and TLS client
    /// extended key usage, and subject alternative names for `host_name`,
    /// `localhost`, `127.0.0.1`, `::1` and each of `sans` (IP addresses
    /// become IP SANs, anything else must be a DNS name).
    ///
    /// A host needs both key usages because it is both ends: its agent is a
    /// TLS server (to the controller and CLI, and as a migration
    /// destination's QEMU), and it is a TLS client (the controller calling
    /// agents, and a migration source's QEMU connecting to the destination).
    /// One certificate per host keeps "which host is this" a single fact.
    pub fn issue_host(&self, host_name: &str, sans: &[String]) -> Result<IssuedCert> {
        validate_host_name(host_name)?;
        let mut names: Vec<SanType> = Vec::new();
        let wanted = std::iter::once(host_name)
            .chain(LOOPBACK_SANS)
            .chain(sans.iter().map(String::as_str));
        for san in wanted {
            let san = parse_san(san)?;
            if !names.iter().any(|n| same_san(n, &san)) {
                names.push(san);
            }
        }
        self.issue(
            &format!("host {host_name}"),
            subject(HOST_UNIT, host_name),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            names,
            HOST_CERT_VALIDITY,
        )
    }

    /// Issues the certificate of user `user_name` with `role`: subject
    /// `O=Ferry, OU=<role>, CN=<user_name>`, TLS client extended key usage
    /// only, no subject alternative names.
    pub fn issue_client(&self, user_name: &str, role: Role) -> Result<IssuedCert> {
        validate_user_name(user_name)?;
        self.issue(
            &format!("user {user_name}"),
            subject(role.as_str(), user_name),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            Vec::new(),
            CLIENT_CERT_VALIDITY,
        )
    }

    fn issue(
        &self,
        whom: &str,
        dn: DistinguishedName,
        ekus: Vec<ExtendedKeyUsagePurpose>,
        sans: Vec<SanType>,
        validity: Duration,
    ) -> Result<IssuedCert> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| {
            PkiError::Generate {
                what: format!("generate the key of {whom}"),
                source,
            }
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = ekus;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = (now + validity).min(self.not_after);

        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|source| PkiError::Generate {
                what: format!("sign the certificate of {whom}"),
                source,
            })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A certificate the cluster CA issued, with its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate (one `CERTIFICATE` block, no chain: the CA is
    /// distributed separately and is the only trust anchor).
    pub cert_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl IssuedCert {
    /// The file name of the certificate for `stem`: `<stem>.pem`.
    pub fn cert_file_name(stem: &str) -> String {
        format!("{stem}.pem")
    }

    /// The file name of the key for `stem`: `<stem>-key.pem`.
    pub fn key_file_name(stem: &str) -> String {
        format!("{stem}-key.pem")
    }

    /// Writes `dir/<stem>.pem` (0644) and `dir/<stem>-key.pem` (0600),
    /// creating `dir` with mode 0700 if needed. Existing files are replaced
    /// atomically: re-issuing a certificate is routine.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<()> {
        validate_plain_name("file stem", stem)?;
        fsutil::ensure_dir(dir)?;
        fsutil::write_atomic(
            &dir.join(Self::key_file_name(stem)),
            self.key_pem.as_bytes(),
            fsutil::KEY_FILE_MODE,
        )?;
        fsutil::write_atomic(
            &dir.join(Self::cert_file_name(stem)),
            self.cert_pem.as_bytes(),
            fsutil::CERT_FILE_MODE,
        )
    }

    /// Reads what [`save`](Self::save) wrote, refusing a key file that group
    /// or others can access.
    pub fn load(dir: &Path, stem: &str) -> Result<IssuedCert> {
        validate_plain_name("file stem", stem)?;
        let cert_pem = fsutil::read_pem_file(&dir.join(Self::cert_file_name(stem)))?;
        let key_path = dir.join(Self::key_file_name(stem));
        fsutil::check_key_permissions(&key_path)?;
        let key_pem = fsutil::read_pem_file(&key_path)?;
        Ok(IssuedCert { cert_pem, key_pem })
    }

    /// The identity this certificate asserts.
    pub fn identity(&self) -> Result<PeerIdentity> {
        PeerIdentity::from_pem(&self.cert_pem)
    }
}

/// `O=Ferry, OU=<unit>, CN=<name>`, in that encoding order (see
/// [`crate::identity`] for why the order matters to QEMU).
fn subject(unit: &str, name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::OrganizationalUnitName, unit);
    dn.push(DnType::CommonName, name);
    dn
}

fn parse_san(san: &str) -> Result<SanType> {
    if let Ok(ip) = san.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = |reason| PkiError::InvalidSan {
        san: san.to_owned(),
        reason,
    };
    check_dns_name(san).map_err(bad)?;
    let ia5 = Ia5String::try_from(san).map_err(|_| bad("not an ASCII string"))?;
    Ok(SanType::DnsName(ia5))
}

/// DNS names compare case-insensitively; addresses by value (so `::1` and
/// `0:0::1` are one SAN).
fn same_san(a: &SanType, b: &SanType) -> bool {
    match (a, b) {
        (SanType::DnsName(a), SanType::DnsName(b)) => a.as_str().eq_ignore_ascii_case(b.as_str()),
        (SanType::IpAddress(a), SanType::IpAddress(b)) => a == b,
        _ => false,
    }
}

/// A positive, 126-bit random serial number whose first byte is never zero
/// (so its DER encoding is always 16 bytes).
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

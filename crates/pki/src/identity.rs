//! Who is at the other end of a TLS connection, read from its certificate.
//!
//! # Identity encoding
//!
//! Every leaf certificate the cluster CA issues has a subject of exactly three
//! attributes, encoded in this order:
//!
//! | attribute | hosts  | clients (people, scripts)          |
//! |-----------|--------|------------------------------------|
//! | `O`       | `Ferry`| `Ferry`                            |
//! | `OU`      | `host` | the role: `admin`, `operator`, `viewer` |
//! | `CN`      | host name | user name                       |
//!
//! The kind and the role live in `OU` rather than in a private extension so
//! that the whole identity is visible to tools that only show the subject:
//! `openssl x509 -subject`, GnuTLS, and QEMU's `tls-authz`, which matches the
//! client certificate's Distinguished Name as a string.
//!
//! That string is what GnuTLS's `gnutls_x509_crt_get_dn` returns, which is
//! **not** RFC 4514 order: it lists attributes in encoding order, so a host
//! reads `O=Ferry,OU=host,CN=host2` (observed with QEMU 10.0.2, whose
//! refusal reads "TLS x509 authz check for O=Ferry,OU=host,CN=host1 is
//! denied"; the `qemu` integration test pins it).
//! [`PeerIdentity::tls_authz_identity`] produces it.
//!
//! Names are restricted (see [`validate_host_name`] and [`validate_user_name`])
//! to characters that need no escaping in DN text, so that the string a
//! migration hands to `tls-authz` is unambiguous.
//!
//! The encoding is cross-checked against the extended key usages: a host
//! certificate must allow both TLS server and TLS client use, and a client
//! certificate must allow client use and must *not* allow server use (so a
//! person's certificate can never stand in for a host's agent).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    Oid, OID_X509_COMMON_NAME, OID_X509_ORGANIZATIONAL_UNIT, OID_X509_ORGANIZATION_NAME,
};

use crate::error::{PkiError, Result};
use crate::pem::parse_single_cert_pem;

/// The organization (`O`) of every certificate the cluster CA issues,
/// including the CA's own.
pub const ORGANIZATION: &str = "Ferry";

/// The organizational unit (`OU`) that marks a host certificate.
pub const HOST_UNIT: &str = "host";

/// The organizational unit (`OU`) of the CA certificate itself.
pub const CA_UNIT: &str = "cluster-ca";

/// Longest name accepted for a host, user or cluster: the X.520 upper bound
/// for a Common Name.
pub const MAX_NAME_LEN: usize = 64;

/// What a user may do through the API. Carried in the `OU` of a client
/// certificate; hosts carry no role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including issuing certificates and changing policy.
    Admin,
    /// Day-to-day operations: migrate, drain, start and stop VMs.
    Operator,
    /// Read-only access.
    Viewer,
}

impl Role {
    /// Every role, most powerful first.
    pub const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::Viewer];

    /// The role's name as it appears in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| PkiError::UnknownRole(s.to_owned()))
    }
}

/// Whether a peer is a cluster host (a `ferryd`) or a client (a person or
/// script using the CLI or API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerKind {
    /// A `ferryd` host: agent server and migration client at once.
    Host,
    /// A user of the API, with a [`Role`].
    Client,
}

/// The identity a cluster-issued certificate asserts.
///
/// Parsing does **not** verify the certificate: feed it only certificates
/// that rustls has already verified against the cluster CA (the peer
/// certificates of a completed handshake with a config from
/// [`server_config`](crate::server_config) or
/// [`client_config`](crate::client_config)).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PeerIdentity {
    /// The host name or user name (the certificate's `CN`).
    pub name: String,
    /// Host or client.
    pub kind: PeerKind,
    /// The client's role; always `None` for hosts and `Some` for clients.
    pub role: Option<Role>,
}

impl PeerIdentity {
    /// The identity of host `name`, e.g. to build the `tls-authz` identity a
    /// migration destination expects of its source.
    pub fn host(name: &str) -> Self {
        PeerIdentity {
            name: name.to_owned(),
            kind: PeerKind::Host,
            role: None,
        }
    }

    /// The identity of user `name` with `role`.
    pub fn client(name: &str, role: Role) -> Self {
        PeerIdentity {
            name: name.to_owned(),
            kind: PeerKind::Client,
            role: Some(role),
        }
    }

    /// The subject's `OU` for this identity.
    pub fn unit(&self) -> &'static str {
        match (self.kind, self.role) {
            (PeerKind::Host, _) => HOST_UNIT,
            (PeerKind::Client, Some(role)) => role.as_str(),
            // Not constructible through this crate's parsers; render
            // something that can never match a real certificate.
            (PeerKind::Client, None) => "client-without-role",
        }
    }

    /// The subject as QEMU sees it: `O=Ferry,OU=<host|role>,CN=<name>`.
    ///
    /// This is the string GnuTLS's `gnutls_x509_crt_get_dn` produces for the
    /// certificate (encoding order, not RFC 4514's reversed order), and so
    /// the `identity` to give QEMU's `authz-simple` object used as
    /// `tls-authz`: on a migration (or NBD) destination, the identity of the
    /// *source* host, which is the TLS client. Names are validated to need
    /// no escaping, so none is done here.
    pub fn tls_authz_identity(&self) -> String {
        format!("O={},OU={},CN={}", ORGANIZATION, self.unit(), self.name)
    }

    /// Reads the identity from a DER certificate (see the type's note on
    /// verification).
    pub fn from_der(cert_der: &[u8]) -> Result<Self> {
        let (rest, cert) =
            x509_parser::parse_x509_certificate(cert_der).map_err(|e| PkiError::Certificate {
                what: "the peer certificate".to_owned(),
                source: nom_to_x509(e),
            })?;
        if !rest.is_empty() {
            return Err(identity_err("trailing bytes after the certificate"));
        }
        Self::from_parsed(&cert)
    }

    /// Reads the identity from a PEM certificate (exactly one).
    pub fn from_pem(cert_pem: &str) -> Result<Self> {
        let der = parse_single_cert_pem(cert_pem, "the certificate")?;
        Self::from_der(&der)
    }

    /// Reads the identity of the peer of a finished handshake, given what
    /// rustls returns from `peer_certificates()`. The first certificate is
    /// the peer's own; the rest (if any) is chain, which Ferry never sends.
    pub fn from_peer_certificates(certs: Option<&[CertificateDer<'_>]>) -> Result<Self> {
        match certs.and_then(|c| c.first()) {
            Some(leaf) => Self::from_der(leaf),
            None => Err(PkiError::NoPeerCertificate),
        }
    }

    fn from_parsed(cert: &X509Certificate<'_>) -> Result<Self> {
        if let Ok(Some(bc)) = cert.basic_constraints() {
            if bc.value.ca {
                return Err(identity_err("it is a CA certificate"));
            }
        }

        let Subject { org, unit, name } = Subject::of(cert).map_err(identity_err)?;
        if org != ORGANIZATION {
            return Err(identity_err(format!(
                "organization is {org:?}, not {ORGANIZATION:?}"
            )));
        }

        let (server_auth, client_auth) = match cert.extended_key_usage() {
            Ok(Some(eku)) => (eku.value.server_auth, eku.value.client_auth),
            Ok(None) => (false, false),
            Err(_) => return Err(identity_err("its extended key usage does not parse")),
        };

        let identity = if unit == HOST_UNIT {
            validate_host_name(&name).map_err(|e| identity_err(e.to_string()))?;
            if !(server_auth && client_auth) {
                return Err(identity_err(
                    "a host certificate must allow both TLS server and TLS client use",
                ));
            }
            PeerIdentity::host(&name)
        } else {
            let role: Role = unit.parse().map_err(|_| {
                identity_err(format!(
                    "organizational unit {unit:?} is neither {HOST_UNIT:?} nor a role"
                ))
            })?;
            validate_user_name(&name).map_err(|e| identity_err(e.to_string()))?;
            if !client_auth || server_auth {
                return Err(identity_err(
                    "a client certificate must allow TLS client use and not TLS server use",
                ));
            }
            PeerIdentity::client(&name, role)
        };
        Ok(identity)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.role) {
            (PeerKind::Host, _) => write!(f, "host {}", self.name),
            (PeerKind::Client, Some(role)) => write!(f, "user {} ({role})", self.name),
            (PeerKind::Client, None) => write!(f, "user {}", self.name),
        }
    }
}

/// The three subject attributes of every certificate this crate makes.
pub(crate) struct Subject {
    pub(crate) org: String,
    pub(crate) unit: String,
    pub(crate) name: String,
}

impl Subject {
    /// Reads `O`, `OU` and `CN`, requiring exactly one of each and nothing
    /// else, so that a certificate never means two things.
    pub(crate) fn of(cert: &X509Certificate<'_>) -> Result<Self, String> {
        let mut attrs = Vec::new();
        for rdn in cert.subject().iter() {
            attrs.extend(rdn.iter());
        }
        let only = |oid: &Oid<'_>, label: &str| -> Result<String, String> {
            let mut found = attrs.iter().filter(|a| a.attr_type() == oid);
            let first = found
                .next()
                .ok_or_else(|| format!("the subject has no {label}"))?;
            if found.next().is_some() {
                return Err(format!("the subject has more than one {label}"));
            }
            first
                .as_str()
                .map(str::to_owned)
                .map_err(|_| format!("the subject's {label} is not a string"))
        };
        let org = only(&OID_X509_ORGANIZATION_NAME, "organization (O)")?;
        let unit = only(&OID_X509_ORGANIZATIONAL_UNIT, "organizational unit (OU)")?;
        let name = only(&OID_X509_COMMON_NAME, "common name (CN)")?;
        if attrs.len() != 3 {
            return Err("the subject has attributes other than O, OU and CN".to_owned());
        }
        Ok(Subject { org, unit, name })
    }
}

fn identity_err(reason: impl Into<String>) -> PkiError {
    PkiError::Identity {
        reason: reason.into(),
    }
}

/// Unwraps the parser's error into the X.509 error it carries.
pub(crate) fn nom_to_x509(
    e: x509_parser::nom::Err<x509_parser::error::X509Error>,
) -> x509_parser::error::X509Error {
    match e {
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
        x509_parser::nom::Err::Incomplete(_) => x509_parser::error::X509Error::InvalidCertificate,
    }
}

/// Checks a host name: a DNS name (dot-separated labels of ASCII letters,
/// digits and inner hyphens, each at most 63 long), at most
/// [`MAX_NAME_LEN`] long, and not an IP address.
///
/// Host names become both the certificate's `CN` and a DNS subject
/// alternative name, so they must be valid DNS names; IP addresses are
/// refused because a host's identity must survive renumbering (IPs go in the
/// extra SANs instead).
pub fn validate_host_name(name: &str) -> Result<()> {
    let bad = |reason| PkiError::InvalidName {
        what: "host name",
        name: name.to_owned(),
        reason,
    };
    check_len(name).map_err(bad)?;
    if name.parse::<IpAddr>().is_ok() {
        return Err(bad("an IP address is not a host name"));
    }
    check_dns_name(name).map_err(bad)
}

/// Checks a user name: ASCII letters, digits, `.`, `_`, `-` and `@`, starting
/// with a letter or digit, at most [`MAX_NAME_LEN`] long.
///
/// These characters need no escaping in RFC 4514 text, so a user's
/// Distinguished Name prints one way only.
pub fn validate_user_name(name: &str) -> Result<()> {
    validate_plain_name("user name", name)
}

/// Checks a cluster name, with the same rules as [`validate_user_name`].
pub fn validate_cluster_name(name: &str) -> Result<()> {
    validate_plain_name("cluster name", name)
}

pub(crate) fn validate_plain_name(what: &'static str, name: &str) -> Result<()> {
    let bad = |reason| PkiError::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    };
    check_len(name).map_err(bad)?;
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(bad("must start with an ASCII letter or digit"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
    {
        return Err(bad(
            "may contain only ASCII letters, digits, '.', '_', '-' and '@'",
        ));
    }
    Ok(())
}

fn check_len(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 64 characters");
    }
    Ok(())
}

/// Checks DNS-name syntax (RFC 1123 host names; no wildcards, no trailing dot).
pub(crate) fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.len() > 253 {
        return Err("a DNS name is at most 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty DNS label (leading, trailing or doubled '.')");
        }
        if label.len() > 63 {
            return Err("a DNS label is at most 63 characters");
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err("may contain only ASCII letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a DNS label must not start or end with '-'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_round_trips_through_its_name() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert!("root".parse::<Role>().is_err());
        assert!("Admin".parse::<Role>().is_err());
    }

    #[test]
    fn role_serializes_as_its_certificate_name() {
        assert_eq!(
            serde_json::to_string(&Role::Operator).unwrap(),
            "\"operator\""
        );
    }

    #[test]
    fn tls_authz_identity_lists_attributes_in_encoding_order() {
        assert_eq!(
            PeerIdentity::host("host2").tls_authz_identity(),
            "O=Ferry,OU=host,CN=host2"
        );
        assert_eq!(
            PeerIdentity::client("alice", Role::Viewer).tls_authz_identity(),
            "O=Ferry,OU=viewer,CN=alice"
        );
    }

    #[test]
    fn host_names_must_be_dns_names() {
        for ok in ["host2", "kvm-01.dc1.example", "a", "H1"] {
            validate_host_name(ok).unwrap();
        }
        for bad in [
            "",
            "-h",
            "h-",
            "a..b",
            "h_1",
            "h,O=Evil",
            "10.0.0.1",
            "::1",
            "h.",
            &"x".repeat(65),
        ] {
            assert!(validate_host_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn user_names_need_no_dn_escaping() {
        for ok in ["alice", "bob.smith", "ci_bot-2", "ops@example.org"] {
            validate_user_name(ok).unwrap();
        }
        for bad in ["", ".alice", "a,b", "a+b", "a=b", "a b", "a\"b", "é", "#x"] {
            assert!(validate_user_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}

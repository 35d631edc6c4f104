//! QEMU's TLS and authorization objects, as used by a migration: the
//! `tls-creds-x509` object that both the migration stream and the NBD mirror
//! use, and the `authz-simple` object that says which peer may connect.
//!
//! # Who holds what
//!
//! * The **destination** is the TLS *server* for both the migration stream
//!   and NBD. It gets `tls-creds-x509` with `endpoint: server` and an
//!   `authz-simple` whose identity is the **source** host's distinguished
//!   name (as GnuTLS prints it, e.g. `O=Ferry,OU=host,CN=host1`). Without
//!   that authz object any holder of a cluster certificate could feed the
//!   destination a migration stream or write its disks.
//! * The **source** is the TLS *client*: `tls-creds-x509` with
//!   `endpoint: client`; it checks the destination by name (`tls-hostname`
//!   of the migration parameters and of the NBD client node).
//!
//! `verify-peer` is always on: these helpers cannot create credentials that
//! skip peer verification.
//!
//! QEMU reads and checks the certificate files when the object is created,
//! so a bad directory fails here, at `object-add`, not later in the
//! handshake.
//!
//! # Idempotency
//!
//! Every step of a migration may be repeated (a controller retrying after a
//! crash). QEMU refuses an `object-add` whose id exists ("attempt to add
//! duplicate property"), so after a refusal these helpers look the object up
//! with `qom-list`/`qom-get`: an object of the same type with the same
//! properties counts as done ([`Applied::AlreadyDone`]); one that differs is
//! [`TlsError::Conflict`], because silently reusing credentials from another
//! directory, or an authz naming another host, would be a security bug.
//! `object-del` of an object that does not exist is also "already done".

use std::fmt;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::qmp::{Qmp, QmpError};

/// Whether an idempotent step changed anything. Shared by the migration
/// modules ([`crate::nbd`], [`crate::blockjob`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Applied {
    /// This call made the change.
    Done,
    /// The state was already as asked (a repeated step); nothing changed.
    AlreadyDone,
}

/// Which side of the TLS handshake a credentials object is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsEndpoint {
    /// Accepts connections: the migration destination (stream and NBD).
    Server,
    /// Makes connections: the migration source.
    Client,
}

impl TlsEndpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsEndpoint::Server => "server",
            TlsEndpoint::Client => "client",
        }
    }
}

impl fmt::Display for TlsEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `tls-creds-x509` object. `dir` must hold `ca-cert.pem` and, for a
/// server, `server-cert.pem`/`server-key.pem` (and ideally `dh-params.pem`,
/// which spares QEMU generating parameters); for a client,
/// `client-cert.pem`/`client-key.pem` (`ferry_pki::write_qemu_tls_dir`
/// writes all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCredsX509 {
    /// QOM id, referred to by `tls-creds` of the migration parameters, of
    /// `nbd-server-start` and of NBD client nodes.
    pub id: String,
    /// Absolute folder with the PEM files; QEMU (daemonized, working folder
    /// `/`) opens it itself.
    pub dir: PathBuf,
    pub endpoint: TlsEndpoint,
}

/// An `authz-simple` object: admits exactly one peer, by its certificate's
/// distinguished name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzSimple {
    /// QOM id, referred to by `tls-authz`.
    pub id: String,
    /// The distinguished name to admit, in GnuTLS's order
    /// (`O=Ferry,OU=host,CN=host1`).
    pub identity: String,
}

/// Errors from the TLS object helpers.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid QOM object id {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error("TLS credentials folder {dir:?} must be an absolute UTF-8 path")]
    InvalidDir { dir: PathBuf },
    #[error("authz identity for {id:?} is empty: it would match no certificate")]
    EmptyIdentity { id: String },
    #[error("QMP `{command}` for object {id:?} failed")]
    Qmp {
        command: &'static str,
        id: String,
        #[source]
        source: QmpError,
    },
    #[error(
        "object {id:?} already exists with {property} = {existing}, not {wanted}; \
         refusing to reuse it"
    )]
    Conflict {
        id: String,
        property: &'static str,
        existing: String,
        wanted: String,
    },
}

/// Checks a QOM id the way QEMU does (`id_wellformed`): a letter first, then
/// letters, digits, `-`, `.`, `_`. Checked here so that a bad id is a clear
/// error that changes nothing, and can never be mistaken for an existing
/// object.
pub(crate) fn check_qom_id(id: &str) -> Result<(), &'static str> {
    let mut chars = id.chars();
    match chars.next() {
        None => return Err("empty"),
        Some(c) if !c.is_ascii_alphabetic() => return Err("must start with a letter"),
        Some(_) => {}
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
        return Err("only letters, digits, '-', '.' and '_' are allowed");
    }
    Ok(())
}

fn valid_id(id: &str) -> Result<(), TlsError> {
    check_qom_id(id).map_err(|reason| TlsError::InvalidId {
        id: id.to_owned(),
        reason,
    })
}

fn qmp_err(command: &'static str, id: &str) -> impl FnOnce(QmpError) -> TlsError {
    let id = id.to_owned();
    move |source| TlsError::Qmp {
        command,
        id,
        source,
    }
}

/// Adds a `tls-creds-x509` object with `verify-peer: true`.
///
/// Returns [`Applied::AlreadyDone`] if an object with this id already exists
/// with the same type, folder, endpoint and `verify-peer: true`; a differing
/// one is [`TlsError::Conflict`]. Note that an existing object read its
/// files when it was created: if the files were replaced since (a renewed
/// certificate), delete and re-add it.
pub async fn add_tls_creds_x509(qmp: &Qmp, creds: &TlsCredsX509) -> Result<Applied, TlsError> {
    valid_id(&creds.id)?;
    let dir = creds
        .dir
        .to_str()
        .filter(|_| creds.dir.is_absolute())
        .ok_or_else(|| TlsError::InvalidDir {
            dir: creds.dir.clone(),
        })?;
    let added = qmp
        .execute(
            "object-add",
            json!({
                "qom-type": "tls-creds-x509",
                "id": creds.id,
                "dir": dir,
                "endpoint": creds.endpoint.as_str(),
                "verify-peer": true,
            }),
        )
        .await;
    let Err(refused) = added else {
        return Ok(Applied::Done);
    };
    let wanted = [
        ("dir", json!(dir)),
        ("endpoint", json!(creds.endpoint.as_str())),
        ("verify-peer", json!(true)),
    ];
    match_existing(qmp, &creds.id, "tls-creds-x509", &wanted, refused).await
}

/// Adds an `authz-simple` object admitting `identity`. Same idempotency as
/// [`add_tls_creds_x509`]: an existing object with the same identity is
/// [`Applied::AlreadyDone`], one naming another peer is a conflict.
pub async fn add_authz_simple(qmp: &Qmp, authz: &AuthzSimple) -> Result<Applied, TlsError> {
    valid_id(&authz.id)?;
    if authz.identity.is_empty() {
        return Err(TlsError::EmptyIdentity {
            id: authz.id.clone(),
        });
    }
    let added = qmp
        .execute(
            "object-add",
            json!({
                "qom-type": "authz-simple",
                "id": authz.id,
                "identity": authz.identity,
            }),
        )
        .await;
    let Err(refused) = added else {
        return Ok(Applied::Done);
    };
    let wanted = [("identity", json!(authz.identity))];
    match_existing(qmp, &authz.id, "authz-simple", &wanted, refused).await
}

/// After `object-add` was refused: if an object with `id` exists, compare it
/// with what was asked; if none exists, the refusal stands.
async fn match_existing(
    qmp: &Qmp,
    id: &str,
    qom_type: &str,
    wanted: &[(&'static str, Value)],
    refused: QmpError,
) -> Result<Applied, TlsError> {
    let Some(existing_type) = object_type(qmp, id).await? else {
        return Err(TlsError::Qmp {
            command: "object-add",
            id: id.to_owned(),
            source: refused,
        });
    };
    if existing_type != qom_type {
        return Err(TlsError::Conflict {
            id: id.to_owned(),
            property: "type",
            existing: existing_type,
            wanted: qom_type.to_owned(),
        });
    }
    for (property, want) in wanted {
        let have = qmp
            .execute(
                "qom-get",
                json!({"path": format!("/objects/{id}"), "property": property}),
            )
            .await
            .map_err(qmp_err("qom-get", id))?;
        if &have != want {
            return Err(TlsError::Conflict {
                id: id.to_owned(),
                property,
                existing: have.to_string(),
                wanted: want.to_string(),
            });
        }
    }
    Ok(Applied::AlreadyDone)
}

/// The QOM type of the user-created object `id`, if it exists.
///
/// `qom-list /objects` reports children as `child<TYPE>`.
pub async fn object_type(qmp: &Qmp, id: &str) -> Result<Option<String>, TlsError> {
    #[derive(serde::Deserialize)]
    struct Property {
        name: String,
        #[serde(rename = "type")]
        kind: String,
    }
    let props: Vec<Property> = qmp
        .execute_as("qom-list", json!({"path": "/objects"}))
        .await
        .map_err(qmp_err("qom-list", id))?;
    Ok(props.into_iter().find(|p| p.name == id).map(|p| {
        p.kind
            .strip_prefix("child<")
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or(&p.kind)
            .to_owned()
    }))
}

/// Deletes object `id` (undo of the adds above). An object that does not
/// exist is [`Applied::AlreadyDone`].
///
/// QEMU lets a `tls-creds` object be deleted while an NBD server or the
/// migration parameters still name it (they hold their own reference), so
/// undo order is not enforced by QEMU; still, undo in reverse order (stop
/// the NBD server and clear the migration's TLS parameters first) so that
/// nothing names a deleted object.
pub async fn del_object(qmp: &Qmp, id: &str) -> Result<Applied, TlsError> {
    valid_id(id)?;
    match qmp.execute("object-del", json!({"id": id})).await {
        Ok(_) => Ok(Applied::Done),
        Err(refused) => match object_type(qmp, id).await? {
            None => Ok(Applied::AlreadyDone),
            Some(_) => Err(TlsError::Qmp {
                command: "object-del",
                id: id.to_owned(),
                source: refused,
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qom_ids_follow_qemus_rules() {
        assert!(check_qom_id("ferry-tls0").is_ok());
        assert!(check_qom_id("a.b_c-1").is_ok());
        assert!(check_qom_id("").is_err());
        assert!(check_qom_id("0abc").is_err());
        assert!(check_qom_id("-x").is_err());
        assert!(check_qom_id("a b").is_err());
        assert!(check_qom_id("a/b").is_err());
        assert!(check_qom_id("a,b").is_err());
    }

    #[test]
    fn endpoints_render_as_qemu_spells_them() {
        assert_eq!(TlsEndpoint::Server.as_str(), "server");
        assert_eq!(TlsEndpoint::Client.to_string(), "client");
    }
}

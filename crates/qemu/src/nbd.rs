//! The destination's NBD server: how the source's mirror jobs reach the
//! destination's disks during a live migration with local storage.
//!
//! The destination QEMU (started with `-incoming defer`, paused) runs one
//! NBD server on the migration address and exports each disk's *format*
//! node, writable, under the disk's id. The source then mirrors each disk
//! into its export (see [`crate::blockjob`]). The export writes through the
//! very node the guest's device will use after the switchover, so when the
//! mirror completes the destination's disk is the guest's disk: no copy or
//! pivot is needed on the destination.
//!
//! Facts (QEMU 10.0.2):
//!
//! * Disks of a QEMU started with `-incoming` are *inactive* (QEMU must not
//!   touch an image the source still owns). `block-export-add` without
//!   `allow-inactive` activates the node, which is what a non-shared-storage
//!   migration wants: the destination owns its own, new disk file.
//! * `nbd-server-start` takes a *legacy* socket address
//!   (`{"type": "inet", "data": {"host", "port"}}`), unlike `blockdev-add`
//!   and `migrate` which take the flat form. QEMU has no query for the
//!   running server, and does not report the port it bound, so the caller
//!   picks the port ([`free_loopback_port`] for tests).
//! * With `tls-creds` the server *requires* TLS; with `tls-authz` it admits
//!   only the named client certificate. A refused client sees its
//!   `blockdev-add` fail ("Failed to read option reply: Cannot read from TLS
//!   channel"), so a wrong peer is caught before any mirroring starts.
//! * `nbd-server-stop` also removes every export and drops connected
//!   clients; `block-export-del` in `safe` mode refuses while a client is
//!   connected. Undo order on the source side is therefore: complete or
//!   force-cancel the mirror, `blockdev-del` the NBD client node, then stop
//!   the server here.
//! * The export's deletion completes asynchronously, announced by the
//!   `BLOCK_EXPORT_DELETED` event.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use ferry_core::names;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::qmp::{Qmp, QmpError};
use crate::tls::{check_qom_id, Applied};

/// A TCP address as QMP wants it: a host name or IP literal and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InetAddress {
    /// Host name or IP address literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl InetAddress {
    pub fn new(host: impl Into<String>, port: u16) -> InetAddress {
        InetAddress {
            host: host.into(),
            port,
        }
    }

    /// `127.0.0.1:port`.
    pub fn loopback(port: u16) -> InetAddress {
        InetAddress::new(Ipv4Addr::LOCALHOST.to_string(), port)
    }

    /// The flat `SocketAddress` form (`blockdev-add`, `migrate` channels).
    /// QMP wants the port as a string (it may be a service name).
    pub(crate) fn to_flat_json(&self) -> Value {
        json!({"type": "inet", "host": self.host, "port": self.port.to_string()})
    }

    /// The legacy `SocketAddressLegacy` form (`nbd-server-start`).
    pub(crate) fn to_legacy_json(&self) -> Value {
        json!({"type": "inet", "data": {"host": self.host, "port": self.port.to_string()}})
    }
}

impl fmt::Display for InetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How to start the NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdServerConfig {
    /// Where to listen. For a migration, the destination's migration
    /// address (the network the source reaches it on).
    pub addr: InetAddress,
    /// Id of a `tls-creds-x509` object with `endpoint: server`
    /// ([`crate::tls::add_tls_creds_x509`]). `None` serves plaintext, which
    /// Ferry's agent never does between hosts; it exists for local tools.
    pub tls_creds: Option<String>,
    /// Id of an `authz-simple` object naming the one client (the source
    /// host) allowed in. Requires `tls_creds`.
    pub tls_authz: Option<String>,
    /// At most this many clients at once (one per mirrored disk suffices).
    /// `None` keeps QEMU's default.
    pub max_connections: Option<u32>,
}

/// One NBD export of a block node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdExport {
    /// The block export id (QMP's namespace of exports).
    pub id: String,
    /// The node exported: a disk's format node.
    pub node_name: String,
    /// The name NBD clients ask for (the disk id).
    pub name: String,
    /// Whether clients may write (a mirror target must be writable).
    pub writable: bool,
}

impl NbdExport {
    /// The writable export of disk `disk_id` for a mirror: export id
    /// [`export_id`], node [`names::disk_format_node`], NBD name = disk id.
    pub fn for_disk(disk_id: &str) -> NbdExport {
        NbdExport {
            id: export_id(disk_id),
            node_name: names::disk_format_node(disk_id),
            name: disk_id.to_owned(),
            writable: true,
        }
    }
}

/// The block export id used for disk `disk_id`: `exp-<disk id>`.
pub fn export_id(disk_id: &str) -> String {
    format!("exp-{disk_id}")
}

/// `block-export-del` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDelMode {
    /// Refuse while a client is connected.
    Safe,
    /// Drop connected clients (in-flight requests fail on their side).
    Hard,
}

/// One row of `query-block-exports`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    pub id: String,
    /// `nbd`, `vhost-user-blk`, `fuse`, `vduse-blk`.
    #[serde(rename = "type")]
    pub kind: String,
    pub node_name: String,
    /// Deletion was requested and is in progress.
    pub shutting_down: bool,
}

/// Errors from the NBD server helpers.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD setting {what} = {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("QMP `{command}` failed ({context})")]
    Qmp {
        command: &'static str,
        context: String,
        #[source]
        source: QmpError,
    },
    #[error(
        "block export {id:?} already exists for node {existing_node:?}, not {wanted_node:?}; \
         refusing to reuse it"
    )]
    ExportConflict {
        id: String,
        existing_node: String,
        wanted_node: String,
    },
    #[error("could not find a free loopback TCP port")]
    NoFreePort(#[source] io::Error),
}

/// True if QEMU refused the command with a `GenericError` whose description
/// contains `needle`. Only used where QEMU offers no query to check the
/// state instead; each needle is QEMU 10.0.2's wording, pinned by a test.
pub(crate) fn qemu_says(err: &QmpError, needle: &str) -> bool {
    matches!(err, QmpError::Command { class, desc, .. } if class == "GenericError" && desc.contains(needle))
}

fn qmp_err(command: &'static str, context: String) -> impl FnOnce(QmpError) -> NbdError {
    move |source| NbdError::Qmp {
        command,
        context,
        source,
    }
}

fn check_id(what: &'static str, id: &str) -> Result<(), NbdError> {
    check_qom_id(id).map_err(|reason| NbdError::Invalid {
        what,
        value: id.to_owned(),
        reason,
    })
}

/// Starts the NBD server.
///
/// If one is already running, returns [`Applied::AlreadyDone`] *without*
/// checking its address or TLS settings: QEMU 10.0 has no query for them.
/// That is safe only because the agent is the one party that starts NBD
/// servers on its QEMUs, always the same way for a given migration; a
/// caller that cannot promise that should `nbd_server_stop` first.
pub async fn nbd_server_start(qmp: &Qmp, config: &NbdServerConfig) -> Result<Applied, NbdError> {
    if config.addr.host.is_empty() {
        return Err(NbdError::Invalid {
            what: "addr.host",
            value: String::new(),
            reason: "empty host",
        });
    }
    let mut args = json!({"addr": config.addr.to_legacy_json()});
    if let Some(creds) = &config.tls_creds {
        check_id("tls-creds", creds)?;
        args["tls-creds"] = json!(creds);
    }
    if let Some(authz) = &config.tls_authz {
        check_id("tls-authz", authz)?;
        if config.tls_creds.is_none() {
            return Err(NbdError::Invalid {
                what: "tls-authz",
                value: authz.clone(),
                reason: "an authz check needs TLS: set tls-creds too",
            });
        }
        args["tls-authz"] = json!(authz);
    }
    if let Some(max) = config.max_connections {
        args["max-connections"] = json!(max);
    }
    match qmp.execute("nbd-server-start", args).await {
        Ok(_) => Ok(Applied::Done),
        Err(e) if qemu_says(&e, "already running") => Ok(Applied::AlreadyDone),
        Err(e) => Err(qmp_err(
            "nbd-server-start",
            format!("listening on {}", config.addr),
        )(e)),
    }
}

/// Stops the NBD server, removing all its exports and dropping its clients.
/// A server that is not running is [`Applied::AlreadyDone`].
pub async fn nbd_server_stop(qmp: &Qmp) -> Result<Applied, NbdError> {
    match qmp.execute("nbd-server-stop", Value::Null).await {
        Ok(_) => Ok(Applied::Done),
        Err(e) if qemu_says(&e, "not running") => Ok(Applied::AlreadyDone),
        Err(e) => Err(qmp_err("nbd-server-stop", "stopping the NBD server".into())(e)),
    }
}

/// Exports a node over the running NBD server (`block-export-add`, type
/// `nbd`).
///
/// An export with this id on the same node is [`Applied::AlreadyDone`]
/// (QEMU does not report `writable` back, so that is not compared); one on
/// another node is [`NbdError::ExportConflict`].
pub async fn block_export_add(qmp: &Qmp, export: &NbdExport) -> Result<Applied, NbdError> {
    check_id("export id", &export.id)?;
    if export.name.is_empty() {
        return Err(NbdError::Invalid {
            what: "export name",
            value: String::new(),
            reason: "empty",
        });
    }
    let added = qmp
        .execute(
            "block-export-add",
            json!({
                "type": "nbd",
                "id": export.id,
                "node-name": export.node_name,
                "name": export.name,
                "writable": export.writable,
            }),
        )
        .await;
    let Err(refused) = added else {
        return Ok(Applied::Done);
    };
    let existing = query_block_exports(qmp).await?;
    match existing.into_iter().find(|e| e.id == export.id) {
        Some(e) if e.node_name == export.node_name && !e.shutting_down => Ok(Applied::AlreadyDone),
        Some(e) => Err(NbdError::ExportConflict {
            id: export.id.clone(),
            existing_node: e.node_name,
            wanted_node: export.node_name.clone(),
        }),
        None => Err(qmp_err(
            "block-export-add",
            format!("exporting node {} as {:?}", export.node_name, export.name),
        )(refused)),
    }
}

/// Removes an export. An export that does not exist is
/// [`Applied::AlreadyDone`]. Deletion finishes asynchronously
/// (`BLOCK_EXPORT_DELETED`).
pub async fn block_export_del(
    qmp: &Qmp,
    id: &str,
    mode: ExportDelMode,
) -> Result<Applied, NbdError> {
    check_id("export id", id)?;
    let mode = match mode {
        ExportDelMode::Safe => "safe",
        ExportDelMode::Hard => "hard",
    };
    match qmp
        .execute("block-export-del", json!({"id": id, "mode": mode}))
        .await
    {
        Ok(_) => Ok(Applied::Done),
        Err(refused) => {
            if query_block_exports(qmp).await?.iter().any(|e| e.id == id) {
                Err(qmp_err("block-export-del", format!("export {id:?}"))(
                    refused,
                ))
            } else {
                Ok(Applied::AlreadyDone)
            }
        }
    }
}

/// The current block exports.
pub async fn query_block_exports(qmp: &Qmp) -> Result<Vec<BlockExportInfo>, NbdError> {
    qmp.execute_as("query-block-exports", Value::Null)
        .await
        .map_err(qmp_err("query-block-exports", "listing exports".into()))
}

/// A TCP port on 127.0.0.1 that was free a moment ago: bound with port 0
/// and released. Another process can take it before QEMU binds it, so this
/// is for tests on one machine; a production agent allocates ports from a
/// configured range it owns. (The migration stream does not need this:
/// `migrate-incoming` accepts port 0 and reports the port it bound.)
pub fn free_loopback_port() -> Result<u16, NbdError> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(NbdError::NoFreePort)?;
    let port = listener.local_addr().map_err(NbdError::NoFreePort)?.port();
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_render_in_both_qmp_forms() {
        let a = InetAddress::loopback(10809);
        assert_eq!(
            a.to_flat_json(),
            json!({"type": "inet", "host": "127.0.0.1", "port": "10809"})
        );
        assert_eq!(
            a.to_legacy_json(),
            json!({"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}})
        );
        assert_eq!(a.to_string(), "127.0.0.1:10809");
        assert_eq!(InetAddress::new("::1", 5).to_string(), "[::1]:5");
    }

    #[test]
    fn disk_exports_use_the_format_node_and_the_disk_id() {
        let e = NbdExport::for_disk("vd0");
        assert_eq!(e.id, "exp-vd0");
        assert_eq!(e.node_name, "fmt-vd0");
        assert_eq!(e.name, "vd0");
        assert!(e.writable);
        let longest = "a".repeat(names::MAX_ID_LEN);
        assert!(check_qom_id(&export_id(&longest)).is_ok());
    }

    #[test]
    fn free_port_is_nonzero() {
        assert_ne!(free_loopback_port().unwrap(), 0);
    }

    #[test]
    fn export_rows_parse() {
        let rows: Vec<BlockExportInfo> = serde_json::from_value(json!([
            {"node-name": "fmt-vd0", "shutting-down": false, "type": "nbd", "id": "exp-vd0"}
        ]))
        .unwrap();
        assert_eq!(rows[0].node_name, "fmt-vd0");
        assert_eq!(rows[0].kind, "nbd");
    }
}

//! The controller role: the cluster's hosts, the VMs' owners, and the
//! migrations it orchestrates. One per cluster (`[controller]` in ferryd's
//! configuration; `ferry local up` enables it on host1).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_api::{Client, ClientError, JoinRequest, VmInfo};
use tokio::sync::{watch, Mutex};
use uuid::Uuid;

use crate::store::{HostRecord, Store, StoreError};

/// Defaults the controller applies to migrations that do not say otherwise.
#[derive(Debug, Clone)]
pub struct MigrationDefaults {
    /// Never QEMU's own 128 MiB/s: on a fast link it is what keeps a busy
    /// guest from ever converging.
    pub bandwidth_bytes_per_sec: u64,
    pub max_downtime_ms: u64,
    /// A migration that has not switched over by then is cancelled.
    pub deadline_secs: u64,
}

impl Default for MigrationDefaults {
    fn default() -> Self {
        MigrationDefaults {
            bandwidth_bytes_per_sec: 1 << 30,
            max_downtime_ms: 300,
            deadline_secs: 600,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("unknown host {name:?}")]
    UnknownHost { name: String },
    #[error("host {name:?} is unreachable")]
    Unreachable {
        name: String,
        #[source]
        source: ClientError,
    },
    #[error("no VM named {name:?} on any host")]
    VmNotFound { name: String },
    /// The VM may be on a host that did not answer: not a 404, since the
    /// name may well exist.
    #[error("no VM named {name:?} on the reachable hosts; unreachable: {unreachable}")]
    VmNotFoundSomeUnreachable { name: String, unreachable: String },
    #[error("host {name:?} did not answer within {after:?}")]
    NoAnswer {
        name: String,
        after: std::time::Duration,
    },
    #[error("a VM named {name:?} already exists on host {host}")]
    VmNameTaken { name: String, host: String },
    #[error("no reachable host has {memory_mib} MiB of memory available")]
    NoCapacity { memory_mib: u64 },
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    #[error("only host {name:?} itself may join as {name:?} (the caller is {caller})")]
    JoinForbidden { name: String, caller: String },
    #[error("no migration {id}")]
    MigrationNotFound { id: String },
    #[error("migration refused: {reason}")]
    Refused { reason: String },
    #[error("migration {id} has passed its point of no return (the destination runs the guest); it cannot be cancelled")]
    PastCommit { id: Uuid },
    #[error("host {host}: {message}")]
    Agent {
        host: String,
        status: u16,
        message: String,
    },
    #[error("{reason}")]
    Conflict { reason: String },
    #[error("no backup {id:?} on any reachable host")]
    BackupNotFound { id: String },
    #[error("the controller's store failed")]
    Store(#[source] StoreError),
    #[error("cannot set up TLS for calls to the agents")]
    Tls(#[source] ClientError),
}

impl ControllerError {
    pub fn status(&self) -> u16 {
        match self {
            ControllerError::UnknownHost { .. }
            | ControllerError::VmNotFound { .. }
            | ControllerError::BackupNotFound { .. }
            | ControllerError::MigrationNotFound { .. } => 404,
            ControllerError::Agent { status, .. } => *status,
            ControllerError::JoinForbidden { .. } => 403,
            ControllerError::Refused { .. }
            | ControllerError::PastCommit { .. }
            | ControllerError::VmNameTaken { .. }
            | ControllerError::Conflict { .. }
            | ControllerError::NoCapacity { .. } => 409,
            ControllerError::InvalidRequest { .. } => 400,
            ControllerError::Unreachable { .. }
            | ControllerError::NoAnswer { .. }
            | ControllerError::VmNotFoundSomeUnreachable { .. } => 502,
            ControllerError::Store(StoreError::NotFound { .. }) => 404,
            ControllerError::Store(StoreError::Conflict { .. }) => 409,
            _ => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self.status() {
            400 => "invalid_request",
            404 => "not_found",
            403 => "forbidden",
            409 => "conflict",
            502 => "unreachable",
            507 => "no_space",
            _ => "internal",
        }
    }
}

impl From<StoreError> for ControllerError {
    fn from(error: StoreError) -> Self {
        ControllerError::Store(error)
    }
}

pub struct Controller {
    pub(crate) store: Arc<dyn Store>,
    tls: Arc<rustls::ClientConfig>,
    pub(crate) defaults: MigrationDefaults,
    /// Cancel signals of the migrations this controller runs.
    pub(crate) running: Mutex<HashMap<Uuid, watch::Sender<bool>>>,
    /// Goodput (bytes/s) the last migration between two hosts achieved:
    /// the best estimate of that link for the next prediction. Kept in
    /// memory only; a restarted controller predicts from the limit again.
    pub(crate) link_goodput: Mutex<HashMap<(String, String), u64>>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Controller {
    /// `tls` is the controller host's own client configuration (host
    /// certificates carry the client usage): agents see the controller as
    /// that host.
    pub fn new(
        store: Arc<dyn Store>,
        tls: Arc<rustls::ClientConfig>,
        defaults: MigrationDefaults,
    ) -> Arc<Controller> {
        Arc::new(Controller {
            store,
            tls,
            defaults,
            running: Mutex::new(HashMap::new()),
            link_goodput: Mutex::new(HashMap::new()),
        })
    }

    /// A host joins (or re-joins with a new address). Only a host
    /// certificate with that very name may do it.
    pub async fn join(
        &self,
        caller: &ferry_pki::PeerIdentity,
        request: JoinRequest,
    ) -> Result<(), ControllerError> {
        if caller.kind != ferry_pki::PeerKind::Host || caller.name != request.name {
            return Err(ControllerError::JoinForbidden {
                name: request.name,
                caller: caller.name.clone(),
            });
        }
        let now = unix_now();
        self.store
            .put_host(&HostRecord {
                name: request.name.clone(),
                url: request.url,
                joined_at: now,
                last_seen: now,
                facts: serde_json::Value::Null,
            })
            .await?;
        tracing::info!(host = %request.name, "host joined");
        Ok(())
    }

    pub async fn hosts(&self) -> Result<Vec<HostRecord>, ControllerError> {
        Ok(self.store.list_hosts().await?)
    }

    /// A client for a host's agent.
    pub(crate) async fn agent(&self, name: &str) -> Result<Client, ControllerError> {
        let host = match self.store.get_host(name).await {
            Ok(host) => host,
            Err(StoreError::NotFound { .. }) => {
                return Err(ControllerError::UnknownHost {
                    name: name.to_string(),
                })
            }
            Err(error) => return Err(error.into()),
        };
        Client::new(&host.url, self.tls.clone()).map_err(ControllerError::Tls)
    }

    /// Finds the host that runs a VM by asking every host: the agents, not
    /// the store, know what runs (G3).
    pub(crate) async fn locate_vm(&self, name: &str) -> Result<(String, VmInfo), ControllerError> {
        for host in self.store.list_hosts().await? {
            let agent = Client::new(&host.url, self.tls.clone()).map_err(ControllerError::Tls)?;
            match agent.get_vm(name).await {
                Ok(info) => return Ok((host.name, info)),
                Err(error) if error.is_not_found() => {}
                Err(error) => {
                    tracing::warn!(host = %host.name, error = %ferry_api::error_chain(&error), "host unreachable while locating a VM")
                }
            }
        }
        Err(ControllerError::VmNotFound {
            name: name.to_string(),
        })
    }
}

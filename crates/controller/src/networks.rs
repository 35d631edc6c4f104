//! Cluster networks: defined once in the controller's store, mapped by each
//! host to a local bridge (see `ferry_core::network`).
//!
//! | method | path | the controller… |
//! |---|---|---|
//! | GET | `/v1/cluster/networks` | `[NetworkInfo]`, by name |
//! | POST | `/v1/cluster/networks` | `CreateNetworkRequest`: checks it, refuses a taken name (409) |
//! | GET | `/v1/cluster/networks/{name}` | `NetworkInfo`: the VMs on it, and per host whether it can serve it |
//! | DELETE | `/v1/cluster/networks/{name}` | refused (409) while a VM uses it or a host cannot be asked |
//!
//! And the checks the VM create and the migration pre-flight share: a NIC
//! names a defined network, every MAC is unique across the cluster, a host
//! provides every network a VM uses.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use ferry_api::{CreateNetworkRequest, HostInfo, NetworkInfo, NetworkOnHost, VmInfo};
use ferry_core::network::NetworkDef;
use ferry_core::spec::VmSpec;

use crate::controller::{unix_now, Controller, ControllerError};
use crate::routes::ApiError;
use crate::store::{NetworkRecord, StoreError};
use crate::vms::{ask_all, cause_chain};

type Result<T> = std::result::Result<T, ApiError>;

pub(crate) fn router() -> Router<Arc<Controller>> {
    Router::new()
        .route("/v1/cluster/networks", get(list).post(create))
        .route("/v1/cluster/networks/{name}", get(show).delete(delete))
}

async fn create(
    State(controller): State<Arc<Controller>>,
    body: std::result::Result<Json<CreateNetworkRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<NetworkInfo>)> {
    let Json(request) = body.map_err(|rejection| ControllerError::InvalidRequest {
        reason: format!("invalid request body: {}", rejection.body_text()),
    })?;
    let def = NetworkDef {
        name: request.name,
        bridge: request.bridge,
        vlan: request.vlan,
    };
    let problems = def.problems();
    if !problems.is_empty() {
        return Err(ControllerError::InvalidRequest {
            reason: format!("network {:?}: {}", def.name, problems.join("; ")),
        }
        .into());
    }
    let record = NetworkRecord {
        name: def.name.clone(),
        bridge: def.bridge.clone(),
        vlan: def.vlan,
        created_at: unix_now(),
    };
    controller.store.put_network_if_absent(&record).await?;
    tracing::info!(network = %record.name, bridge = %record.bridge, vlan = ?record.vlan, "network created");
    Ok((
        StatusCode::CREATED,
        Json(describe(&controller, record).await?),
    ))
}

async fn list(State(controller): State<Arc<Controller>>) -> Result<Json<Vec<NetworkInfo>>> {
    let records = controller.store.list_networks().await?;
    let cluster = Cluster::ask(&controller).await?;
    Ok(Json(
        records
            .into_iter()
            .map(|record| cluster.describe(record))
            .collect(),
    ))
}

async fn show(
    State(controller): State<Arc<Controller>>,
    Path(name): Path<String>,
) -> Result<Json<NetworkInfo>> {
    let record = controller.store.get_network(&name).await?;
    Ok(Json(describe(&controller, record).await?))
}

async fn delete(
    State(controller): State<Arc<Controller>>,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    let record = controller.store.get_network(&name).await?;
    let cluster = Cluster::ask(&controller).await?;
    let info = cluster.describe(record);
    if !info.vms.is_empty() {
        return Err(ControllerError::Refused {
            reason: format!(
                "network {name} is in use by VM(s) {}: move or delete them first",
                info.vms.join(", ")
            ),
        }
        .into());
    }
    if !cluster.unreachable.is_empty() {
        // A host that did not answer may run a VM on the network.
        return Err(ControllerError::Refused {
            reason: format!(
                "cannot tell whether network {name} is in use: {}",
                cluster.unreachable.join("; ")
            ),
        }
        .into());
    }
    match controller.store.delete_network(&name).await {
        Ok(()) | Err(StoreError::NotFound { .. }) => {}
        Err(error) => return Err(error.into()),
    }
    tracing::info!(network = %name, "network deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn describe(
    controller: &Controller,
    record: NetworkRecord,
) -> std::result::Result<NetworkInfo, ControllerError> {
    Ok(Cluster::ask(controller).await?.describe(record))
}

/// What every host said: its VMs and its network policy.
struct Cluster {
    hosts: Vec<(String, HostInfo, Vec<VmInfo>)>,
    unreachable: Vec<String>,
}

impl Cluster {
    async fn ask(controller: &Controller) -> std::result::Result<Cluster, ControllerError> {
        let records = controller.hosts().await?;
        let answers = ask_all(controller, &records, |agent| async move {
            Ok((agent.host().await?, agent.list_vms().await?))
        })
        .await?;
        let mut cluster = Cluster {
            hosts: Vec::new(),
            unreachable: Vec::new(),
        };
        for (host, answer) in answers {
            match answer {
                Ok((info, vms)) => cluster.hosts.push((host, info, vms)),
                Err(error) => cluster
                    .unreachable
                    .push(format!("{host}: {}", cause_chain(&error))),
            }
        }
        Ok(cluster)
    }

    fn describe(&self, record: NetworkRecord) -> NetworkInfo {
        let def = record.definition();
        let mut vms: Vec<String> = self
            .hosts
            .iter()
            .flat_map(|(_, _, vms)| vms)
            .filter(|vm| uses(&vm.spec, &def.name))
            .map(|vm| vm.name.clone())
            .collect();
        vms.sort();
        vms.dedup();
        let mut hosts: Vec<NetworkOnHost> = self
            .hosts
            .iter()
            .map(|(host, info, _)| {
                let verdict = info.networks.provides(&def);
                NetworkOnHost {
                    host: host.clone(),
                    available: verdict.is_ok(),
                    problem: verdict.err(),
                }
            })
            .collect();
        hosts.extend(self.unreachable.iter().map(|why| NetworkOnHost {
            host: why.split(':').next().unwrap_or_default().to_string(),
            available: false,
            problem: Some(format!("did not answer: {why}")),
        }));
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        NetworkInfo {
            name: record.name,
            bridge: record.bridge,
            vlan: record.vlan,
            created_at: record.created_at,
            vms,
            hosts,
        }
    }
}

fn uses(spec: &VmSpec, network: &str) -> bool {
    spec.nics
        .iter()
        .any(|nic| nic.backend.network() == Some(network))
}

/// The definitions of the networks the spec's NICs name, each once; a NIC
/// naming an unknown network is an invalid request that names the NIC.
pub(crate) async fn resolve(
    controller: &Controller,
    spec: &VmSpec,
) -> std::result::Result<Vec<NetworkDef>, ControllerError> {
    let mut defs: Vec<NetworkDef> = Vec::new();
    for (i, nic) in spec.nics.iter().enumerate() {
        let Some(name) = nic.backend.network() else {
            continue;
        };
        if defs.iter().any(|def| def.name == name) {
            continue;
        }
        match controller.store.get_network(name).await {
            Ok(record) => defs.push(record.definition()),
            Err(StoreError::NotFound { .. }) => {
                return Err(ControllerError::InvalidRequest {
                    reason: format!(
                        "nics[{i}].network: no network named {name:?} (see `ferry network list`; \
                         create it with `ferry network create {name} --bridge BRIDGE`)"
                    ),
                })
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(defs)
}

/// Refuses a spec whose MAC another VM (not the same VM, by uuid) has.
pub(crate) fn check_macs_unique<'a>(
    spec: &VmSpec,
    others: impl Iterator<Item = &'a VmInfo>,
) -> std::result::Result<(), ControllerError> {
    for other in others.filter(|other| other.uuid != spec.uuid) {
        for (i, nic) in spec.nics.iter().enumerate() {
            if let Some(theirs) = other.spec.nics.iter().find(|o| o.mac == nic.mac) {
                return Err(ControllerError::InvalidRequest {
                    reason: format!(
                        "nics[{i}].mac: {} is already the MAC of NIC {:?} of VM {:?} on host {} \
                         (MACs are unique across the cluster; leave `mac` out to get a fresh one)",
                        nic.mac, theirs.id, other.name, other.host
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Whether the host can serve every one of `networks`, or why not (a
/// sentence that follows the host's name).
pub(crate) fn host_provides(
    info: &HostInfo,
    networks: &[NetworkDef],
) -> std::result::Result<(), String> {
    for network in networks {
        info.networks.provides(network)?;
    }
    Ok(())
}

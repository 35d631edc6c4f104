//! The JSON shapes on the wire. Every field name here is a contract with
//! users' scripts (`-o json` prints these shapes), so add fields freely but
//! never rename one.

use ferry_core::network::{HostNetworkPolicy, NetworkDef};
use ferry_core::spec::VmSpec;
use serde::{Deserialize, Serialize};

/// Life-cycle state of a VM as its agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined on this host, no QEMU process.
    Stopped,
    /// QEMU is being launched.
    Starting,
    /// Guest CPUs are running.
    Running,
    /// QEMU runs with the guest CPUs paused.
    Paused,
    /// A stop was requested and QEMU has not exited yet.
    Stopping,
    /// QEMU exited without being asked to (killed, crashed, or vanished while
    /// the agent was down). Never shown as running.
    Crashed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
        }
    }

    /// Whether a QEMU process exists for the VM in this state.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `ferry vm show -o json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub uuid: uuid::Uuid,
    pub host: String,
    pub state: VmState,
    /// Pid of the QEMU process, when one exists.
    pub pid: Option<u32>,
    /// Accelerator QEMU runs with (`kvm` or `tcg`), when running.
    pub accel: Option<String>,
    /// Why that accelerator was chosen.
    pub accel_reason: Option<String>,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Why the VM is in its state, when that is not obvious (a crash, a
    /// failed start).
    pub state_reason: Option<String>,
    /// Unix time (seconds) the current QEMU process started.
    pub started_at: Option<u64>,
    /// Each disk's file and sizes on this host.
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    /// What the user should know about this VM's configuration, e.g. that a
    /// user-mode NIC does not keep connections across a migration.
    #[serde(default)]
    pub warnings: Vec<String>,
    pub spec: VmSpec,
}

/// A disk of a VM as its host sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskInfo {
    pub id: String,
    pub path: String,
    /// The size the guest sees.
    pub virtual_size_bytes: u64,
    /// Bytes the file takes on its datastore.
    pub allocated_bytes: u64,
}

/// Body of `POST /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateVmRequest {
    pub spec: VmSpec,
    #[serde(default)]
    pub start: bool,
    /// The definitions of the cluster networks the spec's NICs name; the
    /// controller fills them in (an agent has no list of networks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkDef>,
    /// Disks whose files arrived from another host as partial files (an
    /// offline migration), by disk id: each is checked against its digest
    /// and renamed into place, and becomes the VM's (deleted with it).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub arriving_disks: std::collections::BTreeMap<String, crate::storage::FileDigest>,
}

/// Body of `POST /v1/cluster/vms`: a [`CreateVmRequest`] plus where to put
/// the VM. On the wire it is the create body with one more optional field,
/// `host`.
///
/// A wrapper rather than a `host` field on `CreateVmRequest` itself: that
/// type is built with struct literals across the workspace, and the agent
/// has no use for the field (it would have to refuse or ignore it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaceVmRequest {
    #[serde(flatten)]
    pub vm: CreateVmRequest,
    /// The host to create the VM on; absent, the controller picks the
    /// joined host with the most available memory that fits the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// One entry of `GET /v1/cluster/hosts`: what the controller recorded when
/// the host joined, and the host's live facts when it answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterHost {
    pub name: String,
    /// Base URL of the host's agent API, as the host gave it when joining.
    pub url: String,
    /// Unix seconds of the host's first join.
    pub joined_at: u64,
    /// Unix seconds the controller last heard from the host.
    pub last_seen: u64,
    /// What the host reported about itself when joining (may be null).
    #[serde(default)]
    pub facts: serde_json::Value,
    /// The host's live `HostInfo`, absent when it did not answer.
    #[serde(default)]
    pub info: Option<HostInfo>,
    /// Why the host did not answer (the whole chain), when it did not.
    #[serde(default)]
    pub error: Option<String>,
}

/// Response header of `GET /v1/cluster/vms`, once per host that did not
/// answer: `NAME: ERROR CHAIN`. A header rather than a field so that the
/// body stays a plain `[VmInfo]`, the same shape as an agent's `GET /v1/vms`.
pub const UNREACHABLE_HOST_HEADER: &str = "ferry-unreachable-host";

/// Body of `POST /v1/vms/{name}/stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StopVmRequest {
    /// Skip the ACPI power-button request and end QEMU at once.
    #[serde(default)]
    pub force: bool,
    /// How long the guest gets to power off after the ACPI request before it
    /// is forced; the agent's default when absent.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// Body of `DELETE /v1/vms/{name}` options (query string).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeleteVmQuery {
    /// Keep the disk files that live in datastores.
    #[serde(default)]
    pub keep_disks: bool,
    /// Also delete the datastore disk files Ferry did not create (an
    /// offline migration removes the source's copies this way, once the
    /// destination's are verified).
    #[serde(default)]
    pub all_disks: bool,
}

/// Query of `GET /v1/vms/{name}/console`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConsoleQuery {
    /// How many lines of the log's tail to return (default 50).
    #[serde(default)]
    pub lines: Option<usize>,
    /// Keep the response open and stream what the guest prints next.
    #[serde(default)]
    pub follow: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatastoreInfo {
    pub name: String,
    pub path: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// What `ferry host show -o json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    /// The agent's API address as the host advertises it.
    pub address: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub qemu_version: String,
    pub accel: String,
    pub accel_reason: String,
    pub machine_types: Vec<String>,
    pub cpu_models: Vec<String>,
    pub datastores: Vec<DatastoreInfo>,
    pub vm_count: usize,
    pub ferry_version: String,
    /// Which cluster networks the host serves and the bridges it has.
    #[serde(default)]
    pub networks: HostNetworkPolicy,
}

/// Body of `POST /v1/cluster/networks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateNetworkRequest {
    pub name: String,
    pub bridge: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
}

/// What `ferry network show -o json` prints (and each entry of `list`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub name: String,
    pub bridge: String,
    pub vlan: Option<u16>,
    /// Unix seconds.
    pub created_at: u64,
    /// The VMs with a NIC on the network, on the hosts that answered.
    #[serde(default)]
    pub vms: Vec<String>,
    /// Per joined host: whether it can give a NIC a port on the network.
    #[serde(default)]
    pub hosts: Vec<NetworkOnHost>,
}

/// One host's answer about one network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkOnHost {
    pub host: String,
    pub available: bool,
    /// Why not, when not (or why the host could not be asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code (`not_found`, `invalid_request`,
    /// `conflict`, `internal`, …).
    pub code: String,
    /// The whole error chain, for a person.
    pub message: String,
}

//! Storage on the wire: moving a VM's disks between datastores of its host
//! (`ferry storage move`), backups (`ferry backup …`), and the steps the
//! controller asks of agents for them and for offline migration.
//!
//! A storage move and an offline migration are recorded and reported like a
//! live migration (`MigrationReport`, `kind` says which), so `ferry migration
//! show|list|cancel` work for all three. Field names are a contract: add
//! freely, rename nothing.

use ferry_core::spec::{DiskFormat, VmSpec};
use serde::{Deserialize, Serialize};

/// Body of `POST /v1/storage-moves` (controller).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageMoveRequest {
    pub vm: String,
    /// The disks to move; empty only with `all_disks`.
    #[serde(default)]
    pub disks: Vec<String>,
    #[serde(default)]
    pub all_disks: bool,
    /// A datastore of the VM's host.
    pub to_datastore: String,
    /// The format of the moved disks; each keeps its own when absent.
    #[serde(default)]
    pub format: Option<DiskFormat>,
    /// Cap on the copy (bytes per second); unlimited when absent.
    #[serde(default)]
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Take a backup of the VM first and name it in the report.
    #[serde(default)]
    pub backup: bool,
}

/// One disk to move (controller → agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMovePlan {
    pub disk_id: String,
    pub to_datastore: String,
    pub format: DiskFormat,
}

/// Body of `POST /v1/vms/{name}/storage/move` (agent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskMoveRequest {
    pub move_id: uuid::Uuid,
    pub disks: Vec<DiskMovePlan>,
    #[serde(default)]
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Only run the checks (room, same file, target exists…) and answer
    /// phase `checked`; nothing changes.
    #[serde(default)]
    pub check_only: bool,
}

/// Where one disk was and where it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMoveOutcome {
    pub disk_id: String,
    /// The datastore the disk was on (`None` for a disk given by path).
    pub from_datastore: Option<String>,
    pub from_path: String,
    pub from_format: DiskFormat,
    pub to_datastore: String,
    pub to_path: String,
    pub to_format: DiskFormat,
    pub virtual_size_bytes: u64,
    /// Source and target held the same content at the switchover.
    pub verified: bool,
}

/// `GET /v1/vms/{name}/storage/move` (agent): the last storage move of the
/// VM, running or ended.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DiskMoveStatus {
    pub move_id: uuid::Uuid,
    /// `copying`, `switching`, `completed`, `failed`, `cancelled`.
    pub phase: String,
    /// The guest ran during the move (a live move; else the disks were
    /// copied while the VM was stopped).
    pub live: bool,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub disks: Vec<DiskMoveOutcome>,
    /// How long the guest was paused at the switchover (verification and
    /// pivot), for a live move.
    pub paused_ms: Option<u64>,
    /// How long comparing source and target took.
    pub verify_ms: Option<u64>,
    pub verified: bool,
    pub error: Option<String>,
}

impl DiskMoveStatus {
    pub fn is_active(&self) -> bool {
        matches!(self.phase.as_str(), "copying" | "switching")
    }
}

/// How a copy was checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// `verified` or `failed`.
    pub status: String,
    /// What was compared, e.g. `qemu-img compare at the switchover, guest
    /// paused` or `sha256 of the file on both hosts`.
    pub method: String,
    pub duration_ms: u64,
    pub detail: String,
}

// ---- backups ----------------------------------------------------------------

/// Body of `POST /v1/backups` (controller) and `POST /v1/vms/{name}/backups`
/// (agent; `vm` is then ignored).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct BackupRequest {
    #[serde(default)]
    pub vm: String,
    /// A datastore of the VM's host; the datastore of the VM's first disk
    /// when absent.
    #[serde(default)]
    pub datastore: Option<String>,
    /// Why it is taken (shown by `ferry backup list`); `manual` when absent.
    #[serde(default)]
    pub reason: Option<String>,
}

/// One disk of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupDisk {
    pub disk_id: String,
    /// File name inside the backup's folder.
    pub file: String,
    /// Always qcow2: sparse and compact whatever the disk's format.
    pub format: DiskFormat,
    /// The format the disk had (a restore gives it back).
    pub source_format: DiskFormat,
    pub virtual_size_bytes: u64,
    pub allocated_bytes: u64,
}

/// A backup: `ferry backup list|create -o json`. Every disk of the VM as of
/// one instant (crash-consistent: like a power cut at that instant), and the
/// VM's spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupInfo {
    pub id: String,
    pub vm: String,
    pub vm_uuid: uuid::Uuid,
    pub host: String,
    pub datastore: String,
    /// Unix milliseconds of the point in time the backup holds.
    pub created_at_ms: u64,
    /// `running` (copied without stopping the guest) or `stopped`.
    pub vm_state: String,
    pub disks: Vec<BackupDisk>,
    /// Bytes the backup takes on its datastore.
    pub size_bytes: u64,
    /// Why it was taken (`manual`, `before storage move`, `before migration
    /// …`).
    pub reason: String,
    pub spec: VmSpec,
    /// The cluster networks the spec's NICs name, as defined when the
    /// backup was taken (a restore needs their bridges).
    #[serde(default)]
    pub networks: Vec<ferry_core::network::NetworkDef>,
}

/// Body of `POST /v1/backups/{id}/restore`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RestoreRequest {
    /// Restore as a new VM of this name (new uuid, new MACs, new disk
    /// files); the backup's VM name when absent.
    #[serde(default)]
    pub as_name: Option<String>,
    /// The host to restore on; the backup's host when absent (controller).
    #[serde(default)]
    pub host: Option<String>,
    /// Replace an existing VM of that name (it is stopped and deleted with
    /// its disks first).
    #[serde(default)]
    pub force: bool,
}

/// Where an agent places a restored VM's disks: next to the backup or, for
/// a restore on another host, the folder the files were copied into.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct AgentRestoreRequest {
    #[serde(default)]
    pub as_name: Option<String>,
    #[serde(default)]
    pub force: bool,
}

// ---- files between hosts (offline migration, restore elsewhere) ------------

/// SHA-256 and length of a file's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Lowercase hex.
    pub sha256: String,
    pub bytes: u64,
}

impl std::fmt::Display for FileDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, sha256 {}", self.bytes, self.sha256)
    }
}

/// Body of `POST /v1/offline/{id}` (destination agent): make room for the
/// files of a stopped VM arriving from another host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OfflineIncoming {
    pub migration_id: uuid::Uuid,
    pub spec: VmSpec,
    #[serde(default)]
    pub networks: Vec<ferry_core::network::NetworkDef>,
}

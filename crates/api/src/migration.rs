//! Migration on the wire: what users ask the controller for and what it
//! reports (`ferry migrate`, `ferry migration …`), and the steps the
//! controller asks of the source and destination agents.
//!
//! Field names of `MigrationReport` are a contract (`ferry migration show ID
//! -o json`): add freely, rename nothing.

use ferry_core::spec::VmSpec;
use serde::{Deserialize, Serialize};

/// How a migration treats the VM's disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StorageMode {
    /// `shared` when every disk is on a datastore both hosts see, else `copy`.
    #[default]
    Auto,
    /// Disks stay where they are; only memory and device state move.
    Shared,
    /// Every local disk is mirrored over NBD to the destination while RAM moves.
    Copy,
}

/// Whether the migration may switch to post-copy. Post-copy always
/// converges, but while it runs the guest's memory is split between the two
/// hosts: if either dies, the guest is lost. Off unless asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PostcopyPolicy {
    #[default]
    Never,
    /// Switch to post-copy when pre-copy stalls.
    Auto,
    /// Switch to post-copy after the first pass.
    Always,
}

/// Body of `POST /v1/migrations` (controller).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateRequest {
    pub vm: String,
    pub to: String,
    #[serde(default)]
    pub storage: StorageMode,
    /// Longest acceptable pause of the guest at the switchover.
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Cap on the migration stream (bytes per second); the controller's
    /// default when absent — never QEMU's 128 MiB/s default.
    #[serde(default)]
    pub bandwidth_bytes_per_sec: Option<u64>,
    #[serde(default)]
    pub postcopy: PostcopyPolicy,
    /// The migration is cancelled (source kept) if it has not switched over
    /// by then.
    #[serde(default)]
    pub deadline_secs: Option<u64>,
    /// Run the pre-flight checks and the prediction only.
    #[serde(default)]
    pub dry_run: bool,
    /// Move a stopped VM: its disks are copied and checked by checksum
    /// before the source copy is deleted.
    #[serde(default)]
    pub offline: bool,
    /// Take a backup of the VM first. `None` is the default: on for an
    /// offline migration and for copied storage (disks leaving their host),
    /// off for shared storage.
    #[serde(default)]
    pub backup: Option<bool>,
}

/// One pre-flight check and its outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreflightCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What the controller expects a migration to cost.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Prediction {
    pub ram_bytes: u64,
    pub disk_bytes: u64,
    pub dirty_rate_bytes_per_sec: u64,
    /// The bandwidth the migration stream will be allowed.
    pub link_bytes_per_sec: u64,
    pub total_ms: u64,
    pub downtime_ms: u64,
    /// Whether pre-copy is expected to converge at this dirty rate.
    pub converges: bool,
    /// How the numbers were obtained.
    pub basis: String,
}

/// Answer to a dry run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DryRunReport {
    pub vm: String,
    pub source: String,
    pub destination: String,
    pub storage: StorageMode,
    pub ok: bool,
    pub checks: Vec<PreflightCheck>,
    pub prediction: Option<Prediction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationStatus {
    pub fn is_active(self) -> bool {
        matches!(self, MigrationStatus::Pending | MigrationStatus::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::Pending => "pending",
            MigrationStatus::Running => "running",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long one phase took.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseTiming {
    pub phase: String,
    /// Milliseconds from the start of the migration.
    pub started_ms: u64,
    pub duration_ms: u64,
}

/// Something the controller changed mid-flight to make the migration
/// converge (or to stop it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Escalation {
    pub at_ms: u64,
    pub action: String,
    pub reason: String,
}

/// The capabilities and limits a migration runs with.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Strategy {
    pub storage: StorageMode,
    pub capabilities: Vec<String>,
    pub max_bandwidth_bytes_per_sec: u64,
    pub downtime_limit_ms: u64,
    pub max_downtime_ms: u64,
    pub postcopy: PostcopyPolicy,
    pub deadline_secs: u64,
    pub tls: bool,
}

/// A live view of a running migration.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Progress {
    pub phase: String,
    pub ram_total_bytes: u64,
    pub ram_remaining_bytes: u64,
    pub ram_transferred_bytes: u64,
    pub dirty_rate_bytes_per_sec: u64,
    pub throughput_bytes_per_sec: u64,
    pub disk_total_bytes: u64,
    pub disk_done_bytes: u64,
    pub passes: u64,
    /// Milliseconds until completion as predicted now, when known.
    pub predicted_remaining_ms: Option<u64>,
}

/// `ferry migration show ID -o json`, and what `ferry migrate --wait` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationReport {
    pub id: uuid::Uuid,
    pub vm: String,
    pub source: String,
    pub destination: String,
    pub status: MigrationStatus,
    /// The phase it is in (or ended in).
    pub phase: String,
    pub strategy: Strategy,
    pub escalations: Vec<Escalation>,
    pub phases: Vec<PhaseTiming>,
    pub total_ms: u64,
    /// QEMU's own downtime figure.
    pub downtime_ms: Option<u64>,
    /// From the source's STOP to the destination's RESUME, by QEMU's event
    /// timestamps as the controller received them.
    pub paused_ms: Option<u64>,
    pub transferred_bytes: u64,
    pub ram_bytes: u64,
    pub disk_bytes: u64,
    pub passes: u64,
    /// The whole error chain when it failed.
    pub error: Option<String>,
    pub accel: Option<String>,
    pub prediction: Option<Prediction>,
    pub progress: Option<Progress>,
    /// Unix milliseconds.
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// The network-observed downtime: the longest gap a client exchanging a
    /// small message with the guest every few milliseconds saw during the
    /// migration (`ferry migrate --net-probe`), rounded up.
    #[serde(default)]
    pub network_downtime_ms: Option<u64>,
    /// That client's whole account: messages sent, echoed, lost, corrupted,
    /// and whether the connection broke.
    #[serde(default)]
    pub network_probe: Option<ferry_netprobe::EchoReport>,
    /// `live`, `storage` (disks moved between datastores of one host) or
    /// `offline` (a stopped VM moved to another host). Named `type` on the
    /// wire: `kind` already tags `MigrateAnswer`, which carries a report.
    #[serde(default, rename = "type")]
    pub kind: MigrationKind,
    /// Source and target content compared at the switchover (storage moves,
    /// offline migrations): `Some(true)` when they matched.
    #[serde(default)]
    pub verified: Option<bool>,
    #[serde(default)]
    pub verification: Option<crate::storage::Verification>,
    /// The backup taken before the move (`--backup`, or by default).
    #[serde(default)]
    pub backup_id: Option<String>,
    /// Each disk's old and new place (storage moves, offline migrations).
    #[serde(default)]
    pub disk_moves: Vec<crate::storage::DiskMoveOutcome>,
}

impl MigrationReport {
    /// A report of a migration that is just starting: running, in phase
    /// `preflight`, with nothing measured yet.
    pub fn new(
        id: uuid::Uuid,
        kind: MigrationKind,
        vm: &str,
        route: (&str, &str),
        strategy: Strategy,
        created_at_ms: u64,
    ) -> MigrationReport {
        MigrationReport {
            id,
            vm: vm.to_string(),
            source: route.0.to_string(),
            destination: route.1.to_string(),
            status: MigrationStatus::Running,
            phase: "preflight".to_string(),
            strategy,
            escalations: Vec::new(),
            phases: Vec::new(),
            total_ms: 0,
            downtime_ms: None,
            paused_ms: None,
            transferred_bytes: 0,
            ram_bytes: 0,
            disk_bytes: 0,
            passes: 0,
            error: None,
            accel: None,
            prediction: None,
            progress: None,
            created_at_ms,
            finished_at_ms: None,
            network_downtime_ms: None,
            network_probe: None,
            kind,
            verified: None,
            verification: None,
            backup_id: None,
            disk_moves: Vec::new(),
        }
    }
}

/// What a migration moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MigrationKind {
    /// A running VM to another host (RAM, device state, disks if local).
    #[default]
    Live,
    /// A VM's disks to another datastore of its host.
    Storage,
    /// A stopped VM's definition and disks to another host.
    Offline,
}

impl MigrationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationKind::Live => "live",
            MigrationKind::Storage => "storage",
            MigrationKind::Offline => "offline",
        }
    }
}

/// Body of `POST /v1/migrations/{id}/observations`: what a client saw of a
/// migration from outside, added to its report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationObservation {
    pub network_probe: ferry_netprobe::EchoReport,
}

// ---- controller → agent steps ----------------------------------------------

/// Body of `POST /v1/incoming` (destination agent): get ready to receive a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingRequest {
    pub migration_id: uuid::Uuid,
    pub spec: VmSpec,
    /// Copy: create each datastore disk empty with this virtual size and
    /// export it over NBD for the source's mirror.
    pub copy_disks: Vec<DiskCopy>,
    /// The source host's name: only its certificate may connect (tls-authz).
    pub source_host: String,
    pub capabilities: Vec<String>,
    /// The cluster networks the spec's NICs name: the destination attaches
    /// its taps to their bridges before the stream starts.
    #[serde(default)]
    pub networks: Vec<ferry_core::network::NetworkDef>,
}

/// Body of `POST /v1/vms/{name}/outgoing/resume` (source agent): post-copy
/// was paused by a broken link; reconnect to the destination's new
/// listener (from `POST /v1/incoming/{id}/recover`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutgoingResume {
    pub migration_uri: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskCopy {
    pub disk_id: String,
    pub virtual_size_bytes: u64,
}

/// Where the source sends the migration stream and the disk mirrors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingReady {
    /// QEMU migration URI (`tcp:HOST:PORT`).
    pub migration_uri: String,
    pub nbd: Option<NbdEndpoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NbdEndpoint {
    pub host: String,
    pub port: u16,
}

/// `GET /v1/incoming/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingStatus {
    pub migration_id: uuid::Uuid,
    pub vm: String,
    /// QEMU's run state (`inmigrate`, `paused`, `running`, …).
    pub run_state: String,
    /// QEMU's incoming migration status (`active`, `completed`, `failed`).
    pub migration_status: String,
    /// Whether the destination's guest has executed (a RESUME was seen):
    /// from then on the source must never be resumed.
    pub guest_ran: bool,
    /// QMP timestamp (unix µs) of the RESUME that started the guest here.
    pub resumed_at_us: Option<i64>,
    pub error: Option<String>,
}

/// Body of `POST /v1/vms/{name}/outgoing` (source agent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutgoingRequest {
    pub migration_id: uuid::Uuid,
    /// The destination's host name, checked against its certificate.
    pub destination_host: String,
    pub incoming: IncomingReady,
    /// Disks to mirror (copy mode); empty for shared storage.
    pub mirror_disks: Vec<String>,
    pub capabilities: Vec<String>,
    pub max_bandwidth_bytes_per_sec: u64,
    pub downtime_limit_ms: u64,
}

/// What the source reports while a migration runs.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct OutgoingStatus {
    pub migration_id: uuid::Uuid,
    /// `mirroring`, `memory`, `pre_switchover`, `switching`, `completed`,
    /// `failed`, `cancelled`.
    pub phase: String,
    /// QEMU's `query-migrate` status.
    pub migration_status: String,
    pub ram_total_bytes: u64,
    pub ram_remaining_bytes: u64,
    pub ram_transferred_bytes: u64,
    pub transferred_bytes: u64,
    pub dirty_rate_bytes_per_sec: u64,
    pub throughput_bytes_per_sec: u64,
    pub passes: u64,
    pub disk_total_bytes: u64,
    pub disk_done_bytes: u64,
    pub mirrors_ready: bool,
    pub total_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    pub cpu_throttle_percent: Option<u64>,
    /// QMP timestamp (unix µs) of the STOP that paused the source for the
    /// switchover.
    pub stopped_at_us: Option<i64>,
    pub error: Option<String>,
    /// After the switchover of copied disks: each source disk matched the
    /// destination's copy (compared with the guest paused).
    #[serde(default)]
    pub verified: Option<bool>,
    #[serde(default)]
    pub verification: Option<crate::storage::Verification>,
}

/// Body of `POST /v1/vms/{name}/outgoing/adjust`: change limits mid-flight.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct OutgoingAdjust {
    pub downtime_limit_ms: Option<u64>,
    pub max_bandwidth_bytes_per_sec: Option<u64>,
    #[serde(default)]
    pub start_postcopy: bool,
}

/// Answer of `POST /v1/vms/{name}/dirty-rate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirtyRate {
    pub bytes_per_sec: u64,
    pub sample_ms: u64,
}

/// Answer of `POST /v1/migrations`: the report of a dry run, or the new
/// migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MigrateAnswer {
    DryRun(DryRunReport),
    Started(Box<MigrationReport>),
}

/// Body of `POST /v1/cluster/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub name: String,
    pub url: String,
}

/// Body of `POST /v1/vms/{name}/outgoing/retire`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RetireRequest {
    /// The disks whose files to delete on the source (those that were
    /// copied); a shared disk is never among them.
    #[serde(default)]
    pub remove_disks: Vec<String>,
}

/// Body of `POST /v1/vms/{name}/dirty-rate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirtyRateRequest {
    pub seconds: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(kind: MigrationKind) -> MigrationReport {
        let mut report = MigrationReport::new(
            uuid::Uuid::new_v4(),
            kind,
            "demo",
            ("host1", "host1"),
            Strategy::default(),
            0,
        );
        report.verified = Some(true);
        report.backup_id = Some("demo-1".into());
        report
    }

    #[test]
    fn a_started_answer_carries_the_report_and_its_type() {
        // `kind` tags the answer; the report's own kind is `type`, so the
        // two never collide (they did once: every start failed to decode).
        let answer = MigrateAnswer::Started(Box::new(report(MigrationKind::Storage)));
        let json = serde_json::to_value(&answer).unwrap();
        assert_eq!(json["kind"], "started");
        assert_eq!(json["type"], "storage");
        let back: MigrateAnswer = serde_json::from_value(json).unwrap();
        let MigrateAnswer::Started(back) = back else {
            panic!("a started answer came back as something else")
        };
        assert_eq!(back.kind, MigrationKind::Storage);
        assert_eq!(back.backup_id.as_deref(), Some("demo-1"));
    }

    #[test]
    fn a_report_from_before_kinds_existed_is_a_live_one() {
        let mut json = serde_json::to_value(report(MigrationKind::Offline)).unwrap();
        let object = json.as_object_mut().unwrap();
        for key in [
            "type",
            "verified",
            "verification",
            "backup_id",
            "disk_moves",
        ] {
            object.remove(key);
        }
        let back: MigrationReport = serde_json::from_value(json).unwrap();
        assert_eq!(back.kind, MigrationKind::Live);
        assert!(back.disk_moves.is_empty());
    }
}

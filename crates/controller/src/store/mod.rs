//! The controller's persistent store: hosts, VMs and who owns each, and
//! migrations with their saga progress.
//!
//! # Why a trait, and what it promises
//!
//! DESIGN.md wants embedded SQLite for a single controller and etcd for a
//! replicated one, behind one trait. So the trait speaks only in keyed records
//! and generation numbers, never in SQL: every operation is "read a key",
//! "list a prefix", or "write keys if a condition on other keys holds", which
//! is exactly what an etcd transaction (`Txn` with `Compare` on a value or on
//! `create_revision == 0`) can do. A sketch of the etcd layout the trait was
//! designed against:
//!
//! | record | key | value |
//! |---|---|---|
//! | host | `/ferry/hosts/{name}` | JSON `HostRecord` + format |
//! | VM | `/ferry/vms/{name}` | JSON `VmRecord` + format |
//! | migration | `/ferry/migrations/{id}` | JSON `MigrationRecord` + format |
//! | active migration of a VM | `/ferry/active/{vm}` | migration id (created with `create_revision == 0`, deleted when the migration ends) |
//! | network | `/ferry/networks/{name}` | JSON `NetworkRecord` + format (created with `create_revision == 0`) |
//!
//! # Invariants the store enforces (not its callers)
//!
//! - **Generations are assigned by the store.** A VM and a migration start at
//!   generation 1 and each conditional write adds one. The `generation` field
//!   of a record passed *in* is ignored, so a caller cannot forge one; the
//!   generation a caller read is passed explicitly as `expected_generation`.
//! - **A VM's owner changes only by compare-and-swap** ([`Store::set_vm_owner`]).
//!   This is the commit point of a migration (DESIGN.md step 6): the new owner
//!   is recorded before the destination resumes, and a controller working from
//!   a stale read gets [`StoreError::Conflict`] instead of moving the VM.
//! - **At most one active (pending or running) migration per VM**, checked
//!   atomically with the insert: of two concurrent migrate requests for one VM
//!   exactly one is admitted.
//! - **A migration never moves backwards**: updates are compare-and-swap on its
//!   generation (a stale saga executor cannot overwrite newer progress), its
//!   status only moves pending → running → terminal, and what it migrates
//!   (`vm`, `source`, `destination`, `created_at`) cannot change.
//! - **Every persisted record carries a format version**, and a record written
//!   by a newer ferryd is neither read nor overwritten: it is refused with
//!   [`StoreError::UnsupportedFormat`].
//! - **Every JSON value is capped at [`MAX_JSON_BYTES`]**, both when written
//!   (so the store never holds what it would refuse to read) and when read
//!   (the file is outside bytes: it may have been edited or damaged).
//!
//! Not kept here, by choice: the VM spec and host facts are opaque JSON (their
//! types live in `ferry-core` and change faster than the store's format), and
//! terminal migrations are never deleted yet (history grows without bound:
//! retention is future work).

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use uuid::Uuid;

mod error;
pub mod sqlite;
#[cfg(test)]
mod tests;

pub use error::{ConflictReason, RecordKind, StoreError};
pub use sqlite::SqliteStore;

pub type StoreResult<T> = Result<T, StoreError>;

/// The future every [`Store`] method returns.
///
/// Boxed rather than `async fn` in the trait because the controller picks its
/// backend from configuration at run time and holds it as `Arc<dyn Store>`:
/// `async fn` in traits is not dyn-compatible, and cannot promise `Send`
/// futures (needed to `tokio::spawn` a saga) without extra machinery. One
/// allocation per store call is nothing next to an fsync or a network round
/// trip to etcd.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'a>>;

/// Largest JSON value (VM spec, host facts, migration options, steps or
/// report), in bytes of its serialized form, that the store writes or reads.
/// A spec or a report is a few KiB; 1 MiB leaves room for long step lists
/// while bounding what a damaged file can make the controller allocate.
pub const MAX_JSON_BYTES: usize = 1 << 20;

/// A host of the cluster, as the controller knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Unique name of the host (its certificate's identity); the key.
    pub name: String,
    /// Base URL of the host's agent API.
    pub url: String,
    /// Unix seconds of the host's first join. Kept from the first write:
    /// [`Store::put_host`] ignores it on later upserts.
    pub joined_at: u64,
    /// Unix seconds the controller last heard from the host.
    pub last_seen: u64,
    /// What the host reported about itself (CPU model, memory, datastores…).
    pub facts: serde_json::Value,
}

/// A VM of the cluster and the host that owns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Unique name of the VM; the key.
    pub name: String,
    pub uuid: Uuid,
    /// The owner: the one host allowed to run the VM's guest CPUs (G1).
    pub host: String,
    /// Counts owner changes; assigned by the store (see the module docs).
    pub generation: u64,
    /// The VM spec, opaque to the store.
    pub spec: serde_json::Value,
    /// Last observed state as reported by the owner (`running`, `stopped`…).
    pub state: String,
}

/// Filter for [`Store::list_vms`]; the default lists every VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmFilter {
    /// Only the VMs this host owns.
    pub host: Option<String>,
}

/// Where a migration is in its life. Only the two active statuses hold the
/// VM: a VM has at most one migration in `Pending` or `Running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationStatus {
    pub const ALL: [MigrationStatus; 5] = [
        MigrationStatus::Pending,
        MigrationStatus::Running,
        MigrationStatus::Completed,
        MigrationStatus::Failed,
        MigrationStatus::Cancelled,
    ];

    /// Whether the migration still holds its VM.
    pub fn is_active(self) -> bool {
        matches!(self, MigrationStatus::Pending | MigrationStatus::Running)
    }

    /// The stable spelling, the same as serde's.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::Pending => "pending",
            MigrationStatus::Running => "running",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<MigrationStatus> {
        MigrationStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether a migration in `self` may be updated to `next`. Status only
    /// moves forward (pending → running → a terminal status, or pending
    /// straight to a terminal one); staying put is allowed so that a saga
    /// can record steps and phases, even after the end (clean-up after
    /// commit). A terminal status never changes into another one: a
    /// completed migration cannot later be "failed" by a stale executor.
    pub fn may_become(self, next: MigrationStatus) -> bool {
        fn rank(s: MigrationStatus) -> u8 {
            match s {
                MigrationStatus::Pending => 0,
                MigrationStatus::Running => 1,
                MigrationStatus::Completed
                | MigrationStatus::Failed
                | MigrationStatus::Cancelled => 2,
            }
        }
        self == next || rank(next) > rank(self)
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One migration of one VM from `source` to `destination` (equal for a
/// storage migration on one host), with the saga's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// The key.
    pub id: Uuid,
    /// Name of the migrated VM. Immutable, like `source`, `destination` and
    /// `created_at`.
    pub vm: String,
    pub source: String,
    pub destination: String,
    pub status: MigrationStatus,
    /// The saga's current phase (`preflight`, `prepare`, `mirror`…); free
    /// text so that the saga can add phases without a store format change.
    pub phase: String,
    /// What the user asked for (bandwidth, downtime limit, post-copy…).
    pub options: serde_json::Value,
    /// The saga's log of steps and undos, in order.
    pub steps: Vec<StepRecord>,
    /// Measurements and outcome (duration, downtime, bytes…).
    pub report: serde_json::Value,
    /// Why the migration failed, for humans.
    pub error: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds of the last update, set by the caller.
    pub updated_at: u64,
    /// Counts writes; assigned by the store (see the module docs).
    pub generation: u64,
}

/// One step of a migration saga, as persisted so that a restarted controller
/// knows what was done and what must be undone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub state: StepState,
    /// Unix seconds.
    pub started_at: u64,
    /// Unix seconds; `None` while the step (or its undo) runs.
    pub finished_at: Option<u64>,
    pub detail: serde_json::Value,
}

/// The life of one saga step: `Started` → `Done` or `Failed`; a done step
/// being unwound goes `Undoing` → `Undone` (or `Failed` when its undo fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Started,
    Done,
    Undoing,
    Undone,
    Failed,
}

/// A cluster network (`ferry network create`): a name every host maps to
/// a local Linux bridge. Written once and deleted, never updated: changing
/// the bridge of a network in use would strand the NICs on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The key.
    pub name: String,
    pub bridge: String,
    pub vlan: Option<u16>,
    /// Unix seconds.
    pub created_at: u64,
}

impl NetworkRecord {
    /// The definition agents are given.
    pub fn definition(&self) -> ferry_core::network::NetworkDef {
        ferry_core::network::NetworkDef {
            name: self.name.clone(),
            bridge: self.bridge.clone(),
            vlan: self.vlan,
        }
    }
}

/// Filter for [`Store::list_migrations`]; the default lists every migration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationFilter {
    /// Only the migrations of this VM.
    pub vm: Option<String>,
    /// Only pending and running migrations.
    pub active_only: bool,
}

/// The controller's persistent state. See the module docs for the invariants
/// every implementation keeps; `store::tests::conformance` checks them, and
/// each backend runs it against the real thing.
///
/// Every method is a single atomic operation: it happens entirely or not at
/// all, and a refused one (`NotFound`, `Conflict`, `Invalid`, `TooLarge`)
/// changes nothing. Dropping a returned future does not cancel an operation
/// already handed to the backend: it may still commit, as a request already
/// sent to etcd would. Callers that must know re-read.
///
/// Missing records are [`StoreError::NotFound`] (also from `get_*`), so that
/// the API maps "no such thing" to 404 in one place.
pub trait Store: Send + Sync {
    /// Inserts the host, or updates `url`, `last_seen` and `facts` of the host
    /// of that name, keeping its first `joined_at`. Last writer wins: hosts
    /// report about themselves, and the newest report is the truth.
    fn put_host<'a>(&'a self, host: &'a HostRecord) -> StoreFuture<'a, ()>;

    fn get_host<'a>(&'a self, name: &'a str) -> StoreFuture<'a, HostRecord>;

    /// Every host, by name.
    fn list_hosts(&self) -> StoreFuture<'_, Vec<HostRecord>>;

    /// Forgets a host. Refused with `Conflict` (`HostInUse`) while the host
    /// owns a VM or takes part in an active migration: those records would
    /// point at nothing.
    fn delete_host<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()>;

    /// Records a new VM on its owner `vm.host` (which must be a known host),
    /// at generation 1, which it returns. Refused with `Conflict`
    /// (`AlreadyExists`) when the name is taken.
    fn put_vm_if_absent<'a>(&'a self, vm: &'a VmRecord) -> StoreFuture<'a, u64>;

    fn get_vm<'a>(&'a self, name: &'a str) -> StoreFuture<'a, VmRecord>;

    /// The VMs that match, by name.
    fn list_vms<'a>(&'a self, filter: &'a VmFilter) -> StoreFuture<'a, Vec<VmRecord>>;

    /// Makes `new_host` (a known host) the owner of the VM if its generation
    /// is still `expected_generation`, and returns the new generation. A
    /// stale generation is refused with `Conflict` (`StaleGeneration`) and
    /// changes nothing: the caller lost a race and must re-read and decide
    /// again, never retry blindly.
    fn set_vm_owner<'a>(
        &'a self,
        name: &'a str,
        expected_generation: u64,
        new_host: &'a str,
    ) -> StoreFuture<'a, u64>;

    /// Records the VM's observed state, if its owner generation is still
    /// `expected_generation`. Does not bump the generation (which counts owner
    /// changes: state reports during a migration must not make its commit
    /// fail), but is guarded by it, so that a late report from the previous
    /// owner cannot overwrite what the new owner reported.
    fn update_vm_state<'a>(
        &'a self,
        name: &'a str,
        expected_generation: u64,
        state: &'a str,
    ) -> StoreFuture<'a, ()>;

    /// Forgets a VM. Refused with `Conflict` (`ActiveMigration`) while a
    /// migration of it is active. Its finished migrations stay, as history.
    fn delete_vm<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()>;

    /// Records a new migration of a known VM, at generation 1, which it
    /// returns. An active one is refused with `Conflict` (`ActiveMigration`,
    /// naming the one in the way) if the VM already has an active migration:
    /// the check and the insert are one atomic step. A taken id is
    /// `Conflict` (`AlreadyExists`).
    fn create_migration<'a>(&'a self, migration: &'a MigrationRecord) -> StoreFuture<'a, u64>;

    fn get_migration(&self, id: Uuid) -> StoreFuture<'_, MigrationRecord>;

    /// The migrations that match, oldest first.
    fn list_migrations<'a>(
        &'a self,
        filter: &'a MigrationFilter,
    ) -> StoreFuture<'a, Vec<MigrationRecord>>;

    /// Replaces the migration's progress (status, phase, options, steps,
    /// report, error, updated_at) if its generation is still
    /// `expected_generation`, and returns the new generation. A stale
    /// generation is `Conflict` (`StaleGeneration`); a status moving backwards
    /// (see [`MigrationStatus::may_become`]) or a change to `vm`, `source`,
    /// `destination` or `created_at` is `Invalid`. Moving to a terminal status
    /// frees the VM for its next migration.
    fn update_migration<'a>(
        &'a self,
        migration: &'a MigrationRecord,
        expected_generation: u64,
    ) -> StoreFuture<'a, u64>;

    /// Records a new network. Refused with `Conflict` (`AlreadyExists`) when
    /// the name is taken.
    fn put_network_if_absent<'a>(&'a self, network: &'a NetworkRecord) -> StoreFuture<'a, ()>;

    fn get_network<'a>(&'a self, name: &'a str) -> StoreFuture<'a, NetworkRecord>;

    /// Every network, by name.
    fn list_networks(&self) -> StoreFuture<'_, Vec<NetworkRecord>>;

    /// Forgets a network. Whether a VM still uses it is the caller's check:
    /// VM specs live on the agents, not here.
    fn delete_network<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()>;
}

//! The store's one error type.
//!
//! Callers act on the first three kinds: `NotFound` (404), `Conflict` (409:
//! somebody else got there first; re-read and decide again) and `Invalid`
//! (the request breaks an invariant; retrying will not help). The rest say
//! the store itself cannot be trusted or reached.

use uuid::Uuid;

/// Which kind of record an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Host,
    Vm,
    Migration,
    Network,
}

impl std::fmt::Display for RecordKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecordKind::Host => "host",
            RecordKind::Vm => "VM",
            RecordKind::Migration => "migration",
            RecordKind::Network => "network",
        })
    }
}

/// Why a write lost: each names what the caller needs to decide what next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConflictReason {
    /// The key is taken.
    AlreadyExists,
    /// The record changed since the caller read it.
    StaleGeneration { expected: u64, actual: u64 },
    /// The VM has this active migration.
    ActiveMigration { id: Uuid },
    /// Records still point at the host.
    HostInUse { vms: u64, active_migrations: u64 },
}

impl std::fmt::Display for ConflictReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConflictReason::AlreadyExists => f.write_str("already exists"),
            ConflictReason::StaleGeneration { expected, actual } => write!(
                f,
                "is at generation {actual}, not the expected {expected}: \
                 it changed since it was read"
            ),
            ConflictReason::ActiveMigration { id } => {
                write!(f, "migration {id} of it is still active")
            }
            ConflictReason::HostInUse {
                vms,
                active_migrations,
            } => write!(
                f,
                "still owns {vms} VM(s) and takes part in {active_migrations} \
                 active migration(s)"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {key:?} not found")]
    NotFound { kind: RecordKind, key: String },

    #[error("{kind} {key:?} {reason}")]
    Conflict {
        kind: RecordKind,
        key: String,
        reason: ConflictReason,
    },

    #[error("{kind} {key:?}: {detail}")]
    Invalid {
        kind: RecordKind,
        key: String,
        detail: String,
    },

    #[error("{kind} {key:?}: {field} is {size} bytes, more than the store's cap of {limit}")]
    TooLarge {
        kind: RecordKind,
        key: String,
        field: &'static str,
        size: usize,
        limit: usize,
    },

    #[error(
        "{kind} {key:?} is stored in format {found}, and this ferryd reads formats up to \
         {supported}: it was written by a newer ferryd, which must be the one to read it"
    )]
    UnsupportedFormat {
        kind: RecordKind,
        key: String,
        found: i64,
        supported: u32,
    },

    #[error("{kind} {key:?} is corrupt: {detail}")]
    Corrupt {
        kind: RecordKind,
        key: String,
        detail: String,
    },

    #[error("{kind} {key:?}: stored {field} is not valid")]
    Decode {
        kind: RecordKind,
        key: String,
        field: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("{kind} {key:?}: {field} cannot be encoded")]
    Encode {
        kind: RecordKind,
        key: String,
        field: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error(
        "the store {path} has schema version {found}, and this ferryd knows versions up to \
         {supported}: it was written by a newer ferryd"
    )]
    UnsupportedSchema {
        path: String,
        found: i64,
        supported: u32,
    },

    #[error("{path} is not a Ferry store: {detail}; refusing to touch it")]
    NotAStore { path: String, detail: String },

    #[error("cannot open the store {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },

    #[error("SQLite failed while {op}")]
    Sqlite {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },

    #[error("the store is shutting down")]
    Shutdown,
}

impl StoreError {
    /// Whether the operation lost a race or hit a taken key: the caller's
    /// view is stale and it should re-read before deciding again.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

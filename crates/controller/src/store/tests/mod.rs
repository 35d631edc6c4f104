//! Tests of the store.
//!
//! `conformance` holds the behaviour every backend must show, written against
//! `dyn Store` only; `conformance_tests!` turns it into one `#[tokio::test]`
//! per behaviour for a backend, given a way to make a fresh store. The SQLite
//! backend runs it on a real file in a temporary folder (`sqlite`); the etcd
//! backend is meant to run the same suite against a real etcd.

#[macro_use]
mod conformance;
mod sqlite;

use super::{HostRecord, MigrationRecord, MigrationStatus, StepRecord, StepState, VmRecord};
use serde_json::json;
use uuid::Uuid;

/// A fixed clock: tests compare records, so times must be stable.
pub(super) const T0: u64 = 1_700_000_000;

pub(super) fn host(name: &str) -> HostRecord {
    HostRecord {
        name: name.to_string(),
        url: format!("https://{name}.test:7100"),
        joined_at: T0,
        last_seen: T0,
        facts: json!({ "cpus": 2, "memory_mib": 24576 }),
    }
}

pub(super) fn vm(name: &str, host: &str) -> VmRecord {
    VmRecord {
        name: name.to_string(),
        uuid: Uuid::new_v4(),
        host: host.to_string(),
        generation: 0,
        spec: json!({ "name": name, "memory": "512M", "cpus": 1 }),
        state: "running".to_string(),
    }
}

pub(super) fn migration(vm: &str, source: &str, destination: &str) -> MigrationRecord {
    MigrationRecord {
        id: Uuid::new_v4(),
        vm: vm.to_string(),
        source: source.to_string(),
        destination: destination.to_string(),
        status: MigrationStatus::Pending,
        phase: "preflight".to_string(),
        options: json!({ "max_bandwidth_mib": 1024 }),
        steps: Vec::new(),
        report: json!({}),
        error: None,
        created_at: T0,
        updated_at: T0,
        generation: 0,
    }
}

pub(super) fn step(name: &str, state: StepState) -> StepRecord {
    StepRecord {
        name: name.to_string(),
        state,
        started_at: T0 + 1,
        finished_at: Some(T0 + 2),
        detail: json!({ "node": "disk0" }),
    }
}

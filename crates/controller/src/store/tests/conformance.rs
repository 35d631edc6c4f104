//! What every [`Store`] backend must do, against `dyn Store` only.

use super::super::{
    ConflictReason, MigrationFilter, MigrationStatus, NetworkRecord, RecordKind, StepState, Store,
    StoreError, VmFilter, MAX_JSON_BYTES,
};
use super::{host, migration, step, vm, T0};
use serde_json::json;
use std::any::Any;
use std::sync::Arc;
use uuid::Uuid;

/// A fresh, empty store and whatever must live as long as it (a temporary
/// folder, an etcd process).
pub(crate) struct Harness {
    pub store: Arc<dyn Store>,
    pub _guard: Box<dyn Any + Send + Sync>,
}

/// One `#[tokio::test]` per behaviour below, each on a fresh store made by
/// `$make().await`. Multi-threaded runtime so that the concurrency tests race
/// for real.
macro_rules! conformance_tests {
    ($make:path) => {
        conformance_tests!(@each $make;
            hosts_are_created_read_listed_and_deleted,
            put_host_updates_a_host_but_keeps_its_first_join_time,
            a_host_in_use_cannot_be_deleted,
            vms_are_created_read_listed_updated_and_deleted,
            the_store_assigns_generations_not_the_caller,
            put_vm_if_absent_refuses_a_taken_name_and_keeps_the_first,
            a_vm_on_an_unknown_host_is_refused,
            set_vm_owner_moves_the_vm_and_bumps_its_generation,
            set_vm_owner_with_a_stale_generation_is_refused_and_changes_nothing,
            set_vm_owner_to_an_unknown_host_is_refused_and_changes_nothing,
            concurrent_owner_changes_from_one_generation_admit_exactly_one,
            a_state_report_from_before_an_owner_change_is_refused,
            a_vm_with_an_active_migration_cannot_be_deleted,
            migrations_are_created_read_updated_and_listed,
            list_migrations_filters_by_vm_and_activity_oldest_first,
            update_migration_with_a_stale_generation_is_refused_and_changes_nothing,
            a_second_active_migration_of_a_vm_is_refused,
            concurrent_migrate_requests_for_one_vm_admit_exactly_one,
            a_finished_migration_frees_the_vm_for_the_next,
            a_migration_never_moves_backwards,
            what_a_migration_moves_cannot_change,
            a_migration_of_an_unknown_vm_is_refused,
            a_migration_with_a_taken_id_is_refused,
            missing_records_are_not_found,
            json_over_the_cap_is_refused_and_changes_nothing,
            json_just_under_the_cap_round_trips,
            networks_are_created_read_listed_and_deleted,
            a_taken_network_name_is_refused_and_keeps_the_first,
        );
    };
    (@each $make:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let harness = $make().await;
                $crate::store::tests::conformance::$name(::std::sync::Arc::clone(&harness.store))
                    .await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------
// Helpers

/// Two hosts `a` and `b`, and VM `web` owned by `a` at generation 1.
async fn two_hosts_and_web(store: &dyn Store) {
    store.put_host(&host("a")).await.unwrap();
    store.put_host(&host("b")).await.unwrap();
    assert_eq!(store.put_vm_if_absent(&vm("web", "a")).await.unwrap(), 1);
}

fn assert_conflict(result: Result<impl std::fmt::Debug, StoreError>, want: ConflictReason) {
    match result {
        Err(StoreError::Conflict { reason, .. }) => assert_eq!(reason, want),
        other => panic!("expected a conflict ({want}), got {other:?}"),
    }
}

fn assert_not_found(result: Result<impl std::fmt::Debug, StoreError>, want: RecordKind) {
    match result {
        Err(StoreError::NotFound { kind, .. }) => assert_eq!(kind, want),
        other => panic!("expected {want} not found, got {other:?}"),
    }
}

fn assert_invalid(result: Result<impl std::fmt::Debug, StoreError>, mentions: &str) {
    match result {
        Err(e @ StoreError::Invalid { .. }) => {
            assert!(
                e.to_string().contains(mentions),
                "{e} should mention {mentions:?}"
            )
        }
        other => panic!("expected an invalid update ({mentions}), got {other:?}"),
    }
}

fn assert_too_large(result: Result<impl std::fmt::Debug, StoreError>, want_field: &str) {
    match result {
        Err(StoreError::TooLarge { field, limit, .. }) => {
            assert_eq!(field, want_field);
            assert_eq!(limit, MAX_JSON_BYTES);
        }
        other => panic!("expected {want_field} too large, got {other:?}"),
    }
}

fn too_big() -> serde_json::Value {
    json!("x".repeat(MAX_JSON_BYTES))
}

// ---------------------------------------------------------------------------
// Hosts

pub(crate) async fn hosts_are_created_read_listed_and_deleted(store: Arc<dyn Store>) {
    store.put_host(&host("b")).await.unwrap();
    store.put_host(&host("a")).await.unwrap();

    assert_eq!(store.get_host("a").await.unwrap(), host("a"));
    let names: Vec<_> = store
        .list_hosts()
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.name)
        .collect();
    assert_eq!(names, ["a", "b"]);

    store.delete_host("a").await.unwrap();
    assert_not_found(store.get_host("a").await, RecordKind::Host);
    assert_eq!(store.list_hosts().await.unwrap(), [host("b")]);
}

pub(crate) async fn put_host_updates_a_host_but_keeps_its_first_join_time(store: Arc<dyn Store>) {
    store.put_host(&host("a")).await.unwrap();
    let mut again = host("a");
    again.url = "https://a.test:7200".to_string();
    again.joined_at = T0 + 100;
    again.last_seen = T0 + 100;
    again.facts = json!({ "cpus": 4 });

    store.put_host(&again).await.unwrap();

    let stored = store.get_host("a").await.unwrap();
    assert_eq!(stored.joined_at, T0, "the first join time stays");
    assert_eq!(stored.url, again.url);
    assert_eq!(stored.last_seen, T0 + 100);
    assert_eq!(stored.facts, again.facts);
}

pub(crate) async fn a_host_in_use_cannot_be_deleted(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    store.put_host(&host("c")).await.unwrap();
    store
        .create_migration(&migration("web", "a", "c"))
        .await
        .unwrap();

    assert_conflict(
        store.delete_host("a").await,
        ConflictReason::HostInUse {
            vms: 1,
            active_migrations: 1,
        },
    );
    assert_conflict(
        store.delete_host("c").await,
        ConflictReason::HostInUse {
            vms: 0,
            active_migrations: 1,
        },
    );
    assert_eq!(store.list_hosts().await.unwrap().len(), 3);
    store.delete_host("b").await.unwrap();
}

// ---------------------------------------------------------------------------
// VMs

pub(crate) async fn vms_are_created_read_listed_updated_and_deleted(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    let db = vm("db", "b");
    assert_eq!(store.put_vm_if_absent(&db).await.unwrap(), 1);

    let stored = store.get_vm("db").await.unwrap();
    assert_eq!(stored.generation, 1);
    assert_eq!(
        stored,
        crate::store::VmRecord {
            generation: 1,
            ..db.clone()
        }
    );
    let all: Vec<_> = store
        .list_vms(&VmFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(all, ["db", "web"]);
    let on_a: Vec<_> = store
        .list_vms(&VmFilter {
            host: Some("a".into()),
        })
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(on_a, ["web"]);

    store.update_vm_state("db", 1, "stopped").await.unwrap();
    let stored = store.get_vm("db").await.unwrap();
    assert_eq!(stored.state, "stopped");
    assert_eq!(
        stored.generation, 1,
        "a state report is not an owner change"
    );

    store.delete_vm("db").await.unwrap();
    assert_not_found(store.get_vm("db").await, RecordKind::Vm);
    assert_not_found(store.delete_vm("db").await, RecordKind::Vm);
    assert_eq!(store.list_vms(&VmFilter::default()).await.unwrap().len(), 1);
}

pub(crate) async fn the_store_assigns_generations_not_the_caller(store: Arc<dyn Store>) {
    store.put_host(&host("a")).await.unwrap();
    let mut forged = vm("web", "a");
    forged.generation = 42;
    let mut m = migration("web", "a", "a");
    m.generation = 42;

    assert_eq!(store.put_vm_if_absent(&forged).await.unwrap(), 1);
    assert_eq!(store.create_migration(&m).await.unwrap(), 1);
    assert_eq!(store.update_migration(&m, 1).await.unwrap(), 2);

    assert_eq!(store.get_vm("web").await.unwrap().generation, 1);
    assert_eq!(store.get_migration(m.id).await.unwrap().generation, 2);
}

pub(crate) async fn put_vm_if_absent_refuses_a_taken_name_and_keeps_the_first(
    store: Arc<dyn Store>,
) {
    two_hosts_and_web(&*store).await;
    let first = store.get_vm("web").await.unwrap();

    assert_conflict(
        store.put_vm_if_absent(&vm("web", "b")).await,
        ConflictReason::AlreadyExists,
    );

    assert_eq!(store.get_vm("web").await.unwrap(), first);
}

pub(crate) async fn a_vm_on_an_unknown_host_is_refused(store: Arc<dyn Store>) {
    assert_not_found(
        store.put_vm_if_absent(&vm("web", "nowhere")).await,
        RecordKind::Host,
    );
    assert_not_found(store.get_vm("web").await, RecordKind::Vm);
}

pub(crate) async fn set_vm_owner_moves_the_vm_and_bumps_its_generation(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;

    let generation = store.set_vm_owner("web", 1, "b").await.unwrap();

    assert_eq!(generation, 2);
    let stored = store.get_vm("web").await.unwrap();
    assert_eq!((stored.host.as_str(), stored.generation), ("b", 2));
    let on_b = store
        .list_vms(&VmFilter {
            host: Some("b".into()),
        })
        .await
        .unwrap();
    assert_eq!(on_b.len(), 1);
    assert_eq!(store.set_vm_owner("web", 2, "a").await.unwrap(), 3);
}

pub(crate) async fn set_vm_owner_with_a_stale_generation_is_refused_and_changes_nothing(
    store: Arc<dyn Store>,
) {
    two_hosts_and_web(&*store).await;
    store.put_host(&host("c")).await.unwrap();
    store.set_vm_owner("web", 1, "b").await.unwrap();
    let before = store.get_vm("web").await.unwrap();

    // A controller that read generation 1 before the move above.
    let stale = store.set_vm_owner("web", 1, "c").await;

    assert_conflict(
        stale,
        ConflictReason::StaleGeneration {
            expected: 1,
            actual: 2,
        },
    );
    assert_eq!(store.get_vm("web").await.unwrap(), before);
}

pub(crate) async fn set_vm_owner_to_an_unknown_host_is_refused_and_changes_nothing(
    store: Arc<dyn Store>,
) {
    two_hosts_and_web(&*store).await;
    let before = store.get_vm("web").await.unwrap();

    assert_not_found(
        store.set_vm_owner("web", 1, "nowhere").await,
        RecordKind::Host,
    );

    assert_eq!(store.get_vm("web").await.unwrap(), before);
}

pub(crate) async fn concurrent_owner_changes_from_one_generation_admit_exactly_one(
    store: Arc<dyn Store>,
) {
    two_hosts_and_web(&*store).await;
    store.put_host(&host("c")).await.unwrap();

    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = Arc::clone(&store);
            let to = if i % 2 == 0 { "b" } else { "c" };
            tokio::spawn(async move { (to, store.set_vm_owner("web", 1, to).await) })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (to, Ok(generation)) => winners.push((to, generation)),
            (_, Err(e)) => assert!(e.is_conflict(), "{e}"),
        }
    }

    assert_eq!(winners.len(), 1, "{winners:?}");
    let stored = store.get_vm("web").await.unwrap();
    assert_eq!((stored.host.as_str(), stored.generation), winners[0]);
}

pub(crate) async fn a_state_report_from_before_an_owner_change_is_refused(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    store.set_vm_owner("web", 1, "b").await.unwrap();
    store.update_vm_state("web", 2, "running").await.unwrap();

    // The old owner reports, late, what it saw at generation 1.
    let late = store.update_vm_state("web", 1, "paused").await;

    assert_conflict(
        late,
        ConflictReason::StaleGeneration {
            expected: 1,
            actual: 2,
        },
    );
    assert_eq!(store.get_vm("web").await.unwrap().state, "running");
}

pub(crate) async fn a_vm_with_an_active_migration_cannot_be_deleted(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    let mut m = migration("web", "a", "b");
    store.create_migration(&m).await.unwrap();

    assert_conflict(
        store.delete_vm("web").await,
        ConflictReason::ActiveMigration { id: m.id },
    );
    assert!(store.get_vm("web").await.is_ok());

    m.status = MigrationStatus::Failed;
    store.update_migration(&m, 1).await.unwrap();
    store.delete_vm("web").await.unwrap();
    // The finished migration stays, as history.
    assert_eq!(store.get_migration(m.id).await.unwrap().vm, "web");
}

// ---------------------------------------------------------------------------
// Migrations

pub(crate) async fn migrations_are_created_read_updated_and_listed(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    let m = migration("web", "a", "b");

    assert_eq!(store.create_migration(&m).await.unwrap(), 1);
    let stored = store.get_migration(m.id).await.unwrap();
    assert_eq!(
        stored,
        crate::store::MigrationRecord {
            generation: 1,
            ..m.clone()
        }
    );

    let mut running = stored.clone();
    running.status = MigrationStatus::Running;
    running.phase = "memory".to_string();
    running.steps = vec![
        step("prepare", StepState::Done),
        step("mirror", StepState::Started),
    ];
    running.steps[1].finished_at = None;
    running.report = json!({ "transferred_bytes": 1 << 20 });
    running.options = json!({ "max_bandwidth_mib": 2048 });
    running.updated_at = T0 + 5;
    assert_eq!(store.update_migration(&running, 1).await.unwrap(), 2);
    assert_eq!(
        store.get_migration(m.id).await.unwrap(),
        crate::store::MigrationRecord {
            generation: 2,
            ..running.clone()
        }
    );

    let mut failed = running.clone();
    failed.status = MigrationStatus::Failed;
    failed.error = Some("destination unreachable".to_string());
    failed.steps.push(step("prepare", StepState::Undone));
    assert_eq!(store.update_migration(&failed, 2).await.unwrap(), 3);
    let listed = store
        .list_migrations(&MigrationFilter::default())
        .await
        .unwrap();
    assert_eq!(
        listed,
        [crate::store::MigrationRecord {
            generation: 3,
            ..failed
        }]
    );
}

pub(crate) async fn list_migrations_filters_by_vm_and_activity_oldest_first(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    store.put_vm_if_absent(&vm("db", "b")).await.unwrap();
    let mut web_done = migration("web", "a", "b");
    web_done.status = MigrationStatus::Completed;
    let mut web_now = migration("web", "a", "b");
    web_now.created_at = T0 + 10;
    let mut db_now = migration("db", "b", "a");
    db_now.status = MigrationStatus::Running;
    db_now.created_at = T0 + 5;
    for m in [&web_now, &web_done, &db_now] {
        store.create_migration(m).await.unwrap();
    }

    let ids = |filter: MigrationFilter| {
        let store = Arc::clone(&store);
        async move {
            store
                .list_migrations(&filter)
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.id)
                .collect::<Vec<_>>()
        }
    };

    assert_eq!(
        ids(MigrationFilter::default()).await,
        [web_done.id, db_now.id, web_now.id]
    );
    assert_eq!(
        ids(MigrationFilter {
            vm: Some("web".into()),
            active_only: false
        })
        .await,
        [web_done.id, web_now.id]
    );
    assert_eq!(
        ids(MigrationFilter {
            vm: None,
            active_only: true
        })
        .await,
        [db_now.id, web_now.id]
    );
    assert_eq!(
        ids(MigrationFilter {
            vm: Some("web".into()),
            active_only: true
        })
        .await,
        [web_now.id]
    );
    assert!(ids(MigrationFilter {
        vm: Some("nothing".into()),
        active_only: false
    })
    .await
    .is_empty());
}

pub(crate) async fn update_migration_with_a_stale_generation_is_refused_and_changes_nothing(
    store: Arc<dyn Store>,
) {
    two_hosts_and_web(&*store).await;
    let m = migration("web", "a", "b");
    store.create_migration(&m).await.unwrap();
    let mut newer = m.clone();
    newer.status = MigrationStatus::Running;
    newer.phase = "mirror".to_string();
    store.update_migration(&newer, 1).await.unwrap();
    let before = store.get_migration(m.id).await.unwrap();

    // A stale executor, still at generation 1, tries to record its view.
    let mut stale = m.clone();
    stale.phase = "prepare".to_string();
    let result = store.update_migration(&stale, 1).await;

    assert_conflict(
        result,
        ConflictReason::StaleGeneration {
            expected: 1,
            actual: 2,
        },
    );
    assert_eq!(store.get_migration(m.id).await.unwrap(), before);
}

pub(crate) async fn a_second_active_migration_of_a_vm_is_refused(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    let first = migration("web", "a", "b");
    store.create_migration(&first).await.unwrap();

    let second = store.create_migration(&migration("web", "a", "b")).await;

    match second {
        Err(StoreError::Conflict { kind, key, reason }) => {
            assert_eq!((kind, key.as_str()), (RecordKind::Vm, "web"));
            assert_eq!(reason, ConflictReason::ActiveMigration { id: first.id });
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let all = store
        .list_migrations(&MigrationFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
}

pub(crate) async fn concurrent_migrate_requests_for_one_vm_admit_exactly_one(
    store: Arc<dyn Store>,
) {
    two_hosts_and_web(&*store).await;

    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let store = Arc::clone(&store);
            let m = migration("web", "a", "b");
            tokio::spawn(async move { (m.id, store.create_migration(&m).await) })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (id, Ok(_)) => admitted.push(id),
            (_, Err(StoreError::Conflict { reason, .. })) => refused.push(reason),
            (_, Err(e)) => panic!("unexpected error: {e}"),
        }
    }

    assert_eq!(admitted.len(), 1, "{admitted:?}");
    assert_eq!(refused.len(), 31);
    for reason in refused {
        assert_eq!(reason, ConflictReason::ActiveMigration { id: admitted[0] });
    }
    let active = store
        .list_migrations(&MigrationFilter {
            vm: Some("web".into()),
            active_only: true,
        })
        .await
        .unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].id, admitted[0]);
}

pub(crate) async fn a_finished_migration_frees_the_vm_for_the_next(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    for end in [
        MigrationStatus::Completed,
        MigrationStatus::Failed,
        MigrationStatus::Cancelled,
    ] {
        let mut m = migration("web", "a", "b");
        store.create_migration(&m).await.unwrap();
        assert!(store
            .create_migration(&migration("web", "a", "b"))
            .await
            .unwrap_err()
            .is_conflict());

        m.status = end;
        store.update_migration(&m, 1).await.unwrap();

        let next = migration("web", "a", "b");
        assert_eq!(
            store.create_migration(&next).await.unwrap(),
            1,
            "after {end}"
        );
        let mut next_done = next.clone();
        next_done.status = MigrationStatus::Cancelled;
        store.update_migration(&next_done, 1).await.unwrap();
    }
}

pub(crate) async fn a_migration_never_moves_backwards(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    let mut m = migration("web", "a", "b");
    store.create_migration(&m).await.unwrap();
    m.status = MigrationStatus::Running;
    store.update_migration(&m, 1).await.unwrap();

    let mut back = m.clone();
    back.status = MigrationStatus::Pending;
    assert_invalid(store.update_migration(&back, 2).await, "running to pending");

    m.status = MigrationStatus::Completed;
    store.update_migration(&m, 2).await.unwrap();
    for later in [MigrationStatus::Running, MigrationStatus::Failed] {
        let mut again = m.clone();
        again.status = later;
        assert_invalid(store.update_migration(&again, 3).await, "completed to");
    }
    let stored = store.get_migration(m.id).await.unwrap();
    assert_eq!(
        (stored.status, stored.generation),
        (MigrationStatus::Completed, 3)
    );

    // A finished migration still records clean-up steps.
    m.steps.push(step("remove-source-disks", StepState::Done));
    assert_eq!(store.update_migration(&m, 3).await.unwrap(), 4);
}

pub(crate) async fn what_a_migration_moves_cannot_change(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    store.put_vm_if_absent(&vm("db", "a")).await.unwrap();
    let m = migration("web", "a", "b");
    store.create_migration(&m).await.unwrap();

    let mut other_vm = m.clone();
    other_vm.vm = "db".to_string();
    assert_invalid(
        store.update_migration(&other_vm, 1).await,
        "vm cannot change",
    );
    let mut other_source = m.clone();
    other_source.source = "b".to_string();
    assert_invalid(
        store.update_migration(&other_source, 1).await,
        "source cannot change",
    );
    let mut other_destination = m.clone();
    other_destination.destination = "a".to_string();
    assert_invalid(
        store.update_migration(&other_destination, 1).await,
        "destination cannot change",
    );
    let mut other_time = m.clone();
    other_time.created_at = T0 - 1;
    assert_invalid(
        store.update_migration(&other_time, 1).await,
        "created_at cannot change",
    );

    assert_eq!(store.get_migration(m.id).await.unwrap().generation, 1);
}

pub(crate) async fn a_migration_of_an_unknown_vm_is_refused(store: Arc<dyn Store>) {
    store.put_host(&host("a")).await.unwrap();
    let m = migration("ghost", "a", "a");

    assert_not_found(store.create_migration(&m).await, RecordKind::Vm);
    assert_not_found(store.get_migration(m.id).await, RecordKind::Migration);
}

pub(crate) async fn a_migration_with_a_taken_id_is_refused(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    let mut m = migration("web", "a", "b");
    m.status = MigrationStatus::Completed;
    store.create_migration(&m).await.unwrap();

    let mut again = m.clone();
    again.phase = "other".to_string();
    assert_conflict(
        store.create_migration(&again).await,
        ConflictReason::AlreadyExists,
    );
    assert_eq!(store.get_migration(m.id).await.unwrap().phase, "preflight");
}

pub(crate) async fn missing_records_are_not_found(store: Arc<dyn Store>) {
    store.put_host(&host("a")).await.unwrap();

    assert_not_found(store.get_host("b").await, RecordKind::Host);
    assert_not_found(store.delete_host("b").await, RecordKind::Host);
    assert_not_found(store.get_vm("web").await, RecordKind::Vm);
    assert_not_found(store.set_vm_owner("web", 1, "a").await, RecordKind::Vm);
    assert_not_found(store.update_vm_state("web", 1, "x").await, RecordKind::Vm);
    assert_not_found(store.delete_vm("web").await, RecordKind::Vm);
    assert_not_found(
        store.get_migration(Uuid::new_v4()).await,
        RecordKind::Migration,
    );
    assert_not_found(
        store.update_migration(&migration("web", "a", "a"), 1).await,
        RecordKind::Migration,
    );
}

pub(crate) async fn json_over_the_cap_is_refused_and_changes_nothing(store: Arc<dyn Store>) {
    two_hosts_and_web(&*store).await;
    let mut big_host = host("c");
    big_host.facts = too_big();
    let mut big_vm = vm("db", "a");
    big_vm.spec = too_big();
    let m = migration("web", "a", "b");
    store.create_migration(&m).await.unwrap();
    let mut big_report = m.clone();
    big_report.report = too_big();
    let mut many_steps = m.clone();
    let mut long_step = step("mirror", StepState::Done);
    long_step.detail = json!("y".repeat(MAX_JSON_BYTES / 2));
    many_steps.steps = vec![long_step.clone(), long_step];
    let mut big_options = migration("web", "a", "b");
    big_options.options = too_big();

    assert_too_large(store.put_host(&big_host).await, "facts");
    assert_too_large(store.put_vm_if_absent(&big_vm).await, "spec");
    assert_too_large(store.update_migration(&big_report, 1).await, "report");
    assert_too_large(store.update_migration(&many_steps, 1).await, "steps");
    assert_too_large(store.create_migration(&big_options).await, "options");

    assert_not_found(store.get_host("c").await, RecordKind::Host);
    assert_not_found(store.get_vm("db").await, RecordKind::Vm);
    assert_eq!(
        store.get_migration(m.id).await.unwrap(),
        crate::store::MigrationRecord { generation: 1, ..m }
    );
    assert_not_found(
        store.get_migration(big_options.id).await,
        RecordKind::Migration,
    );
}

pub(crate) async fn json_just_under_the_cap_round_trips(store: Arc<dyn Store>) {
    store.put_host(&host("a")).await.unwrap();
    let mut large = vm("web", "a");
    // Serialized with its two quotes: exactly the cap.
    large.spec = json!("z".repeat(MAX_JSON_BYTES - 2));

    store.put_vm_if_absent(&large).await.unwrap();

    assert_eq!(store.get_vm("web").await.unwrap().spec, large.spec);
}

// ---------------------------------------------------------------------------
// Networks

fn network(name: &str, bridge: &str, vlan: Option<u16>) -> NetworkRecord {
    NetworkRecord {
        name: name.to_string(),
        bridge: bridge.to_string(),
        vlan,
        created_at: T0,
    }
}

pub(crate) async fn networks_are_created_read_listed_and_deleted(store: Arc<dyn Store>) {
    store
        .put_network_if_absent(&network("lan", "br0", None))
        .await
        .unwrap();
    store
        .put_network_if_absent(&network("dmz", "br1", Some(42)))
        .await
        .unwrap();
    assert_eq!(
        store.get_network("dmz").await.unwrap(),
        network("dmz", "br1", Some(42))
    );
    let names: Vec<_> = store
        .list_networks()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["dmz", "lan"]);
    store.delete_network("dmz").await.unwrap();
    assert_not_found(store.get_network("dmz").await, RecordKind::Network);
    assert_not_found(store.delete_network("dmz").await, RecordKind::Network);
    assert_eq!(
        store.list_networks().await.unwrap(),
        [network("lan", "br0", None)]
    );
}

pub(crate) async fn a_taken_network_name_is_refused_and_keeps_the_first(store: Arc<dyn Store>) {
    store
        .put_network_if_absent(&network("lan", "br0", None))
        .await
        .unwrap();
    let second = store
        .put_network_if_absent(&network("lan", "br9", Some(7)))
        .await;
    assert!(
        matches!(
            second,
            Err(StoreError::Conflict {
                kind: RecordKind::Network,
                reason: ConflictReason::AlreadyExists,
                ..
            })
        ),
        "{second:?}"
    );
    assert_eq!(
        store.get_network("lan").await.unwrap(),
        network("lan", "br0", None)
    );
}

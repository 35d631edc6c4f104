//! The SQLite backend: the conformance suite on a real file, and what only a
//! file can show (reopening, damage, versions, a second handle).

use super::conformance::Harness;
use super::{host, migration, vm};
use crate::store::sqlite::{APPLICATION_ID, ROW_FORMAT, SCHEMA_VERSION};
use crate::store::{
    MigrationFilter, MigrationStatus, RecordKind, SqliteStore, StepState, Store, StoreError,
    VmFilter, MAX_JSON_BYTES,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

async fn file_store() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("ferry.db")).unwrap();
    Harness {
        store: Arc::new(store),
        _guard: Box::new(dir),
    }
}

mod conformance_on_a_file {
    conformance_tests!(super::file_store);
}

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.db");
    (dir, path)
}

/// A raw connection for damaging or inspecting a file behind the store's back.
fn raw(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

/// Host `a` and `b`, VM `web` on `a`.
async fn populated(path: &Path) -> SqliteStore {
    let store = SqliteStore::open(path).unwrap();
    store.put_host(&host("a")).await.unwrap();
    store.put_host(&host("b")).await.unwrap();
    store.put_vm_if_absent(&vm("web", "a")).await.unwrap();
    store
}

#[tokio::test]
async fn data_survives_reopening_the_file() {
    let (_dir, path) = temp_db();
    let store = populated(&path).await;
    store.set_vm_owner("web", 1, "b").await.unwrap();
    let mut m = migration("web", "b", "a");
    m.steps.push(super::step("prepare", StepState::Done));
    store.create_migration(&m).await.unwrap();
    let hosts = store.list_hosts().await.unwrap();
    let vms = store.list_vms(&VmFilter::default()).await.unwrap();
    let migrations = store
        .list_migrations(&MigrationFilter::default())
        .await
        .unwrap();
    drop(store);

    let reopened = SqliteStore::open(&path).unwrap();

    assert_eq!(reopened.list_hosts().await.unwrap(), hosts);
    assert_eq!(reopened.list_vms(&VmFilter::default()).await.unwrap(), vms);
    assert_eq!(
        reopened
            .list_migrations(&MigrationFilter::default())
            .await
            .unwrap(),
        migrations
    );
    // The active migration still holds the VM after the restart.
    assert!(reopened
        .create_migration(&migration("web", "b", "a"))
        .await
        .unwrap_err()
        .is_conflict());
    assert_eq!(reopened.set_vm_owner("web", 2, "a").await.unwrap(), 3);
}

#[tokio::test]
async fn the_file_is_durable_and_marked_as_ferrys() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).unwrap();

    let conn = store.raw();
    let get = |pragma: &str| -> String {
        conn.query_row(&format!("PRAGMA {pragma}"), [], |row| {
            row.get::<_, rusqlite::types::Value>(0)
        })
        .map(|v| format!("{v:?}"))
        .unwrap()
    };
    assert_eq!(get("journal_mode"), "Text(\"wal\")");
    assert_eq!(get("synchronous"), "Integer(2)", "2 is FULL");
    assert_eq!(get("application_id"), format!("Integer({APPLICATION_ID})"));
    let version: u32 = conn
        .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

#[tokio::test]
async fn a_row_of_a_newer_format_is_refused_with_a_clear_error() {
    let (_dir, path) = temp_db();
    let store = populated(&path).await;
    let m = migration("web", "a", "b");
    store.create_migration(&m).await.unwrap();
    let newer = i64::from(ROW_FORMAT) + 1;
    store
        .raw()
        .execute_batch(&format!(
            "UPDATE vms SET format = {newer}; UPDATE migrations SET format = {newer};"
        ))
        .unwrap();

    let err = store.get_vm("web").await.unwrap_err();
    assert!(
        matches!(err, StoreError::UnsupportedFormat { kind: RecordKind::Vm, found, supported, .. }
            if found == newer && supported == ROW_FORMAT),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("format {newer}")) && message.contains("newer ferryd"),
        "{message}"
    );
    assert!(matches!(
        store.list_vms(&VmFilter::default()).await,
        Err(StoreError::UnsupportedFormat { .. })
    ));
    assert!(matches!(
        store.get_migration(m.id).await,
        Err(StoreError::UnsupportedFormat {
            kind: RecordKind::Migration,
            ..
        })
    ));

    // Nor is it overwritten: an older ferryd would lose what the newer wrote.
    assert!(matches!(
        store.set_vm_owner("web", 1, "b").await,
        Err(StoreError::UnsupportedFormat { .. })
    ));
    assert!(matches!(
        store.update_migration(&m, 1).await,
        Err(StoreError::UnsupportedFormat { .. })
    ));
    let (owner, generation): (String, i64) = store
        .raw()
        .query_row("SELECT host, generation FROM vms", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .unwrap();
    assert_eq!((owner.as_str(), generation), ("a", 1));
}

#[tokio::test]
async fn oversized_json_in_the_file_is_refused_on_read() {
    let (_dir, path) = temp_db();
    let store = populated(&path).await;
    let huge = format!("\"{}\"", "x".repeat(MAX_JSON_BYTES));
    store
        .raw()
        .execute("UPDATE vms SET spec = ?1", [&huge])
        .unwrap();

    let err = store.get_vm("web").await.unwrap_err();

    match &err {
        StoreError::Corrupt { kind, key, detail } => {
            assert_eq!((*kind, key.as_str()), (RecordKind::Vm, "web"));
            assert!(
                detail.contains("spec") && detail.contains("cap"),
                "{detail}"
            );
        }
        other => panic!("expected a corrupt record, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_json_in_the_file_is_refused_with_the_field_named() {
    let (_dir, path) = temp_db();
    let store = populated(&path).await;
    store
        .raw()
        .execute(
            "UPDATE hosts SET facts = '{\"cpus\": ' WHERE name = 'a'",
            [],
        )
        .unwrap();

    let err = store.get_host("a").await.unwrap_err();

    assert!(
        matches!(&err, StoreError::Decode { kind: RecordKind::Host, key, field: "facts", .. } if key == "a"),
        "{err:?}"
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause rides along"
    );
}

#[tokio::test]
async fn an_unknown_status_in_the_file_is_refused() {
    let (_dir, path) = temp_db();
    let store = populated(&path).await;
    let m = migration("web", "a", "b");
    store.create_migration(&m).await.unwrap();
    store
        .raw()
        .execute("UPDATE migrations SET status = 'paused'", [])
        .unwrap();

    let err = store.get_migration(m.id).await.unwrap_err();

    assert!(
        matches!(&err, StoreError::Corrupt { detail, .. } if detail.contains("paused")),
        "{err:?}"
    );
}

#[test]
fn a_schema_from_a_newer_ferryd_is_refused() {
    let (_dir, path) = temp_db();
    drop(SqliteStore::open(&path).unwrap());
    raw(&path)
        .execute("UPDATE schema_version SET version = version + 1", [])
        .unwrap();

    let err = SqliteStore::open(&path).unwrap_err();

    assert!(
        matches!(err, StoreError::UnsupportedSchema { found, supported, .. }
            if found == i64::from(SCHEMA_VERSION) + 1 && supported == SCHEMA_VERSION),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer ferryd"), "{err}");
}

#[test]
fn another_programs_database_is_refused_untouched() {
    let (_dir, path) = temp_db();
    raw(&path)
        .execute_batch("CREATE TABLE accounts (id INTEGER PRIMARY KEY);")
        .unwrap();

    let err = SqliteStore::open(&path).unwrap_err();

    assert!(matches!(err, StoreError::NotAStore { .. }), "{err:?}");
    let conn = raw(&path);
    let objects: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
        .unwrap();
    assert_eq!(objects, 1, "no table was added");
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "delete", "the journal mode was left alone");
}

#[test]
fn a_database_with_another_application_id_is_refused() {
    let (_dir, path) = temp_db();
    raw(&path)
        .execute_batch("PRAGMA application_id = 1234;")
        .unwrap();

    let err = SqliteStore::open(&path).unwrap_err();

    assert!(
        matches!(&err, StoreError::NotAStore { detail, .. } if detail.contains("0x4d2")),
        "{err:?}"
    );
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_untouched() {
    let (_dir, path) = temp_db();
    let garbage = b"not a database, just some bytes\n".repeat(200);
    std::fs::write(&path, &garbage).unwrap();

    let err = SqliteStore::open(&path).unwrap_err();

    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}

#[tokio::test]
async fn the_file_itself_refuses_a_second_active_migration() {
    let (_dir, path) = temp_db();
    let store = populated(&path).await;
    let conn = store.raw();
    let insert = |id: &str, status: &str| {
        conn.execute(
            "INSERT INTO migrations (id, format, vm, source, destination, status, phase,
                 options, steps, report, error, created_at, updated_at, generation)
             VALUES (?1, 1, 'web', 'a', 'b', ?2, 'x', '{}', '[]', '{}', NULL, 0, 0, 1)",
            [id, status],
        )
    };

    insert("00000000-0000-0000-0000-000000000001", "completed").unwrap();
    insert("00000000-0000-0000-0000-000000000002", "pending").unwrap();
    let second = insert("00000000-0000-0000-0000-000000000003", "running");

    assert_eq!(
        second.unwrap_err().sqlite_error_code(),
        Some(rusqlite::ErrorCode::ConstraintViolation)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_handles_on_one_file_admit_exactly_one_migration_of_a_vm() {
    // Two connections, as a second ferryd started by mistake would have: the
    // race is decided by SQLite's locking, not by the store's mutex. Many
    // rounds, because one round may not interleave two transactions at all:
    // a check-then-insert without `BEGIN IMMEDIATE` and without the unique
    // index passed a single round three times out of three, and fails here.
    let (_dir, path) = temp_db();
    let first: Arc<dyn Store> = Arc::new(populated(&path).await);
    let second: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());

    for round in 0..ROUNDS {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = Arc::clone(if i % 2 == 0 { &first } else { &second });
                let m = migration("web", "a", "b");
                tokio::spawn(async move { (m.clone(), store.create_migration(&m).await) })
            })
            .collect();
        let mut admitted = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (m, Ok(_)) => admitted.push(m),
                (_, Err(e)) => assert!(e.is_conflict(), "round {round}: {e}"),
            }
        }

        assert_eq!(admitted.len(), 1, "round {round}");
        let active = second
            .list_migrations(&MigrationFilter {
                vm: Some("web".into()),
                active_only: true,
            })
            .await
            .unwrap();
        assert_eq!(active.len(), 1, "round {round}");
        let mut done = admitted.remove(0);
        assert_eq!(active[0].id, done.id);
        done.status = MigrationStatus::Cancelled;
        first.update_migration(&done, 1).await.unwrap();
    }
}

const ROUNDS: usize = 40;

#[tokio::test]
async fn an_in_memory_store_works_for_unit_tests() {
    let store = SqliteStore::open_in_memory().unwrap();

    store.put_host(&host("a")).await.unwrap();

    assert_eq!(store.get_host("a").await.unwrap(), host("a"));
}

//! The SQLite backend: the default store of a single controller, one file,
//! zero setup.
//!
//! # How it runs under tokio
//!
//! rusqlite is synchronous, and a commit with `synchronous=FULL` waits for an
//! fsync (milliseconds, more on a busy disk), so every operation runs on
//! tokio's blocking pool (`spawn_blocking`) against one connection behind a
//! mutex. One connection, not a pool, because SQLite admits one writer at a
//! time anyway and a controller's reads are small: the mutex serialises what
//! SQLite would serialise, and no operation inside this process ever meets
//! `SQLITE_BUSY`. Debt: reads wait behind writes; a few read-only connections
//! (WAL lets them read while one writes) are the cure if listing ever shows up
//! in a profile.
//!
//! # Durability and atomicity
//!
//! - WAL journal with `synchronous=FULL`: a committed transaction, above all
//!   an owner change, survives power loss (with `NORMAL`, WAL may lose the last
//!   commits — a migration whose destination already resumed would be
//!   forgotten).
//! - Every write is one `BEGIN IMMEDIATE` transaction: it takes the write lock
//!   before reading, so its checks (generation, active migration, existence)
//!   and its write see the same state even if another process opened the
//!   same file (it then waits up to [`BUSY_TIMEOUT`]).
//! - The one-active-migration-per-VM rule is also a unique partial index, so
//!   the file itself refuses a second active migration, whatever writes it.
//!
//! # Versions
//!
//! The file carries Ferry's SQLite application id (a file of another program
//! is refused untouched), a schema version (table layout; upgraded in place by
//! [`SCHEMA`] steps, refused if newer than this binary), and each row a
//! format version ([`ROW_FORMAT`]: what its columns and JSON mean; a newer row
//! is neither read nor overwritten).

use super::{
    ConflictReason, HostRecord, MigrationFilter, MigrationRecord, MigrationStatus, NetworkRecord,
    RecordKind, StepRecord, Store, StoreError, StoreFuture, StoreResult, VmFilter, VmRecord,
    MAX_JSON_BYTES,
};
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use uuid::Uuid;

/// Format of a row: bumped when a column or a JSON value the store itself
/// owns (the step list) changes meaning. A reader refuses newer rows rather
/// than misreading them; an older row is upgraded when read, once there is
/// an older format.
pub const ROW_FORMAT: u32 = 1;

/// Schema steps: `SCHEMA[i]` moves a file from schema version `i` to `i + 1`,
/// all pending steps in one transaction. Append only: a released step never
/// changes, or files that already ran it would differ from new ones.
pub const SCHEMA: &[&str] = &[SCHEMA_V1, SCHEMA_V2];

/// The schema version this binary writes and the newest it reads.
pub const SCHEMA_VERSION: u32 = SCHEMA.len() as u32;

/// `PRAGMA application_id` of a Ferry store ("Frry"): lets `open` tell its own
/// file from another program's database and refuse the latter untouched.
pub const APPLICATION_ID: i32 = 0x4672_7279;

/// How long a write waits for another process holding the file's write lock
/// (a second ferryd started by mistake, an operator's `sqlite3` shell) before
/// failing instead of hanging the controller.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// STRICT tables so that a value of the wrong type is refused by SQLite
/// itself. No foreign keys: the store checks references inside its
/// transactions, which gives errors that name the missing record (and is what
/// an etcd backend must do anyway).
const SCHEMA_V1: &str = "
CREATE TABLE hosts (
    name TEXT PRIMARY KEY NOT NULL,
    format INTEGER NOT NULL,
    url TEXT NOT NULL,
    joined_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    facts TEXT NOT NULL
) STRICT;

CREATE TABLE vms (
    name TEXT PRIMARY KEY NOT NULL,
    format INTEGER NOT NULL,
    uuid TEXT NOT NULL,
    host TEXT NOT NULL,
    generation INTEGER NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL
) STRICT;
CREATE INDEX vms_by_host ON vms (host);

CREATE TABLE migrations (
    id TEXT PRIMARY KEY NOT NULL,
    format INTEGER NOT NULL,
    vm TEXT NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL,
    phase TEXT NOT NULL,
    options TEXT NOT NULL,
    steps TEXT NOT NULL,
    report TEXT NOT NULL,
    error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    generation INTEGER NOT NULL
) STRICT;
CREATE INDEX migrations_by_vm ON migrations (vm, created_at);
-- At most one active migration per VM, kept by the file itself.
CREATE UNIQUE INDEX migrations_one_active_per_vm ON migrations (vm)
    WHERE status IN ('pending', 'running');
";

/// Cluster networks (issue 7).
const SCHEMA_V2: &str = "
CREATE TABLE networks (
    name TEXT PRIMARY KEY NOT NULL,
    format INTEGER NOT NULL,
    bridge TEXT NOT NULL,
    vlan INTEGER,
    created_at INTEGER NOT NULL
) STRICT;
";

/// The statuses that hold a VM, as SQL; must match
/// `MigrationStatus::is_active` and the partial index above.
const ACTIVE_SQL: &str = "status IN ('pending', 'running')";

/// A [`Store`] in one SQLite file. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens the store at `path`, creating the file and its schema if there is
    /// none, upgrading an older schema. Refuses a file of another program
    /// ([`StoreError::NotAStore`]) or of a newer ferryd
    /// ([`StoreError::UnsupportedSchema`]) without changing it.
    ///
    /// Blocking (it may create and fsync the file): call it at start-up, or
    /// from `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>) -> StoreResult<SqliteStore> {
        let path = path.as_ref();
        let label = path.display().to_string();
        let open_err = |source| StoreError::Open {
            path: label.clone(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // Before anything writes: a foreign file must be left as it was.
        check_owner(&conn, &label)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Still correct (rollback journal + FULL is durable), only slower
            // and readers block writers; say so rather than fail.
            tracing::warn!(store = %label, mode, "SQLite refused WAL mode; using its journal");
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        migrate_schema(&mut conn, &label)?;
        tracing::debug!(store = %label, schema = SCHEMA_VERSION, "store open");
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// A store that lives in memory and dies with the value: for unit tests of
    /// code built on the store, never for a controller (nothing survives).
    pub fn open_in_memory() -> StoreResult<SqliteStore> {
        let label = ":memory:";
        let mut conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: label.to_string(),
            source,
        })?;
        migrate_schema(&mut conn, label)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection, on tokio's blocking pool. Panics if called
    /// outside a tokio runtime (as `spawn_blocking` does).
    fn run<T, F>(&self, f: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let task = tokio::task::spawn_blocking(move || {
            // A panic while the lock was held unwound through a
            // `Transaction`, whose drop rolled it back: the connection is
            // consistent, so poisoning carries no information here.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        });
        Box::pin(async move {
            match task.await {
                Ok(result) => result,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Only a runtime shutting down cancels a blocking task.
                Err(_) => Err(StoreError::Shutdown),
            }
        })
    }

    /// The raw connection, for tests that inspect or damage the file.
    #[cfg(test)]
    pub(super) fn raw(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store for SqliteStore {
    fn put_network_if_absent<'a>(&'a self, network: &'a NetworkRecord) -> StoreFuture<'a, ()> {
        let network = network.clone();
        self.run(move |conn| put_network_if_absent(conn, &network))
    }

    fn get_network<'a>(&'a self, name: &'a str) -> StoreFuture<'a, NetworkRecord> {
        let name = name.to_string();
        self.run(move |conn| get_network(conn, &name))
    }

    fn list_networks(&self) -> StoreFuture<'_, Vec<NetworkRecord>> {
        self.run(list_networks)
    }

    fn delete_network<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        let name = name.to_string();
        self.run(move |conn| delete_network(conn, &name))
    }

    fn put_host<'a>(&'a self, host: &'a HostRecord) -> StoreFuture<'a, ()> {
        let host = host.clone();
        self.run(move |conn| put_host(conn, &host))
    }

    fn get_host<'a>(&'a self, name: &'a str) -> StoreFuture<'a, HostRecord> {
        let name = name.to_owned();
        self.run(move |conn| get_host(conn, &name))
    }

    fn list_hosts(&self) -> StoreFuture<'_, Vec<HostRecord>> {
        self.run(list_hosts)
    }

    fn delete_host<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        let name = name.to_owned();
        self.run(move |conn| delete_host(conn, &name))
    }

    fn put_vm_if_absent<'a>(&'a self, vm: &'a VmRecord) -> StoreFuture<'a, u64> {
        let vm = vm.clone();
        self.run(move |conn| put_vm_if_absent(conn, &vm))
    }

    fn get_vm<'a>(&'a self, name: &'a str) -> StoreFuture<'a, VmRecord> {
        let name = name.to_owned();
        self.run(move |conn| get_vm(conn, &name))
    }

    fn list_vms<'a>(&'a self, filter: &'a VmFilter) -> StoreFuture<'a, Vec<VmRecord>> {
        let filter = filter.clone();
        self.run(move |conn| list_vms(conn, &filter))
    }

    fn set_vm_owner<'a>(
        &'a self,
        name: &'a str,
        expected_generation: u64,
        new_host: &'a str,
    ) -> StoreFuture<'a, u64> {
        let (name, new_host) = (name.to_owned(), new_host.to_owned());
        self.run(move |conn| set_vm_owner(conn, &name, expected_generation, &new_host))
    }

    fn update_vm_state<'a>(
        &'a self,
        name: &'a str,
        expected_generation: u64,
        state: &'a str,
    ) -> StoreFuture<'a, ()> {
        let (name, state) = (name.to_owned(), state.to_owned());
        self.run(move |conn| update_vm_state(conn, &name, expected_generation, &state))
    }

    fn delete_vm<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        let name = name.to_owned();
        self.run(move |conn| delete_vm(conn, &name))
    }

    fn create_migration<'a>(&'a self, migration: &'a MigrationRecord) -> StoreFuture<'a, u64> {
        let migration = migration.clone();
        self.run(move |conn| create_migration(conn, &migration))
    }

    fn get_migration(&self, id: Uuid) -> StoreFuture<'_, MigrationRecord> {
        self.run(move |conn| get_migration(conn, id))
    }

    fn list_migrations<'a>(
        &'a self,
        filter: &'a MigrationFilter,
    ) -> StoreFuture<'a, Vec<MigrationRecord>> {
        let filter = filter.clone();
        self.run(move |conn| list_migrations(conn, &filter))
    }

    fn update_migration<'a>(
        &'a self,
        migration: &'a MigrationRecord,
        expected_generation: u64,
    ) -> StoreFuture<'a, u64> {
        let migration = migration.clone();
        self.run(move |conn| update_migration(conn, &migration, expected_generation))
    }
}

// ---------------------------------------------------------------------------
// Opening

/// Refuses a file that holds another program's database.
fn check_owner(conn: &Connection, label: &str) -> StoreResult<()> {
    let open_err = |source| StoreError::Open {
        path: label.to_string(),
        source,
    };
    let app_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(open_err)?;
    if app_id == APPLICATION_ID {
        return Ok(());
    }
    if app_id != 0 {
        return Err(StoreError::NotAStore {
            path: label.to_string(),
            detail: format!(
                "its SQLite application id is {app_id:#x}, not Ferry's {APPLICATION_ID:#x}"
            ),
        });
    }
    let objects: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
        .map_err(open_err)?;
    if objects > 0 {
        return Err(StoreError::NotAStore {
            path: label.to_string(),
            detail: format!("it already holds {objects} tables or indexes of another program"),
        });
    }
    Ok(())
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction: a crash
/// mid-upgrade leaves the old schema, never half of the new one.
fn migrate_schema(conn: &mut Connection, label: &str) -> StoreResult<()> {
    let open_err = |source| StoreError::Open {
        path: label.to_string(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_err)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             id INTEGER PRIMARY KEY CHECK (id = 0),
             version INTEGER NOT NULL
         ) STRICT;",
    )
    .map_err(open_err)?;
    let found: i64 = tx
        .query_row(
            "SELECT version FROM schema_version WHERE id = 0",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(open_err)?
        .unwrap_or(0);
    let found_steps = usize::try_from(found).map_err(|_| StoreError::NotAStore {
        path: label.to_string(),
        detail: format!("its schema version is {found}"),
    })?;
    if found_steps > SCHEMA.len() {
        return Err(StoreError::UnsupportedSchema {
            path: label.to_string(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found_steps == SCHEMA.len() {
        return Ok(());
    }
    for (from, step) in SCHEMA.iter().enumerate().skip(found_steps) {
        tx.execute_batch(step).map_err(open_err)?;
        tracing::info!(store = %label, from, to = from + 1, "store schema upgraded");
    }
    tx.execute(
        "INSERT INTO schema_version (id, version) VALUES (0, ?1)
         ON CONFLICT (id) DO UPDATE SET version = excluded.version",
        [SCHEMA_VERSION],
    )
    .map_err(open_err)?;
    tx.pragma_update(None, "application_id", APPLICATION_ID)
        .map_err(open_err)?;
    tx.commit().map_err(open_err)
}

// ---------------------------------------------------------------------------
// Networks

const NETWORK_COLUMNS: &str = "name, format, bridge, vlan, created_at";

fn put_network_if_absent(conn: &mut Connection, network: &NetworkRecord) -> StoreResult<()> {
    let key = Key::new(RecordKind::Network, &network.name);
    let created_at = key.int_in("created_at", network.created_at)?;
    let tx = immediate(conn)?;
    if exists(&tx, "SELECT 1 FROM networks WHERE name = ?1", &network.name)? {
        return Err(key.conflict(ConflictReason::AlreadyExists));
    }
    tx.execute(
        "INSERT INTO networks (name, format, bridge, vlan, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            network.name,
            ROW_FORMAT,
            network.bridge,
            network.vlan,
            created_at
        ],
    )
    .map_err(sql("inserting a network"))?;
    commit(tx)
}

fn get_network(conn: &mut Connection, name: &str) -> StoreResult<NetworkRecord> {
    let sql_text = format!("SELECT {NETWORK_COLUMNS} FROM networks WHERE name = ?1");
    query_all(conn, &sql_text, [name], network_from_row)?
        .pop()
        .ok_or_else(|| not_found(RecordKind::Network, name))
}

fn list_networks(conn: &mut Connection) -> StoreResult<Vec<NetworkRecord>> {
    let sql_text = format!("SELECT {NETWORK_COLUMNS} FROM networks ORDER BY name");
    query_all(conn, &sql_text, [], network_from_row)
}

fn delete_network(conn: &mut Connection, name: &str) -> StoreResult<()> {
    let key = Key::new(RecordKind::Network, name);
    let tx = immediate(conn)?;
    let format: i64 = tx
        .query_row(
            "SELECT format FROM networks WHERE name = ?1",
            [name],
            |row| row.get(0),
        )
        .optional()
        .map_err(sql("reading a network"))?
        .ok_or_else(|| not_found(RecordKind::Network, name))?;
    key.check_format(format)?;
    tx.execute("DELETE FROM networks WHERE name = ?1", [name])
        .map_err(sql("deleting a network"))?;
    commit(tx)
}

fn network_from_row(row: &Row<'_>) -> StoreResult<NetworkRecord> {
    let r = RowReader::new(row, RecordKind::Network)?;
    let vlan: Option<i64> = row.get(3).map_err(|e| r.corrupt(format!("vlan: {e}")))?;
    let vlan = vlan
        .map(|v| u16::try_from(v).map_err(|_| r.corrupt(format!("vlan {v} is out of range"))))
        .transpose()?;
    Ok(NetworkRecord {
        bridge: r.text(2)?,
        vlan,
        created_at: r.uint(4, "created_at")?,
        name: r.key,
    })
}

// ---------------------------------------------------------------------------
// Hosts

const HOST_COLUMNS: &str = "name, format, url, joined_at, last_seen, facts";

fn put_host(conn: &mut Connection, host: &HostRecord) -> StoreResult<()> {
    let key = Key::new(RecordKind::Host, &host.name);
    let facts = key.json_in("facts", &host.facts)?;
    let joined_at = key.int_in("joined_at", host.joined_at)?;
    let last_seen = key.int_in("last_seen", host.last_seen)?;
    let tx = immediate(conn)?;
    let format: Option<i64> = tx
        .query_row(
            "SELECT format FROM hosts WHERE name = ?1",
            [&host.name],
            |row| row.get(0),
        )
        .optional()
        .map_err(sql("reading a host"))?;
    if let Some(format) = format {
        key.check_format(format)?;
    }
    tx.execute(
        "INSERT INTO hosts (name, format, url, joined_at, last_seen, facts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (name) DO UPDATE SET
             format = excluded.format, url = excluded.url,
             last_seen = excluded.last_seen, facts = excluded.facts",
        params![host.name, ROW_FORMAT, host.url, joined_at, last_seen, facts],
    )
    .map_err(sql("writing a host"))?;
    commit(tx)
}

fn get_host(conn: &mut Connection, name: &str) -> StoreResult<HostRecord> {
    let sql_text = format!("SELECT {HOST_COLUMNS} FROM hosts WHERE name = ?1");
    query_all(conn, &sql_text, [name], host_from_row)?
        .pop()
        .ok_or_else(|| not_found(RecordKind::Host, name))
}

fn list_hosts(conn: &mut Connection) -> StoreResult<Vec<HostRecord>> {
    let sql_text = format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name");
    query_all(conn, &sql_text, [], host_from_row)
}

fn delete_host(conn: &mut Connection, name: &str) -> StoreResult<()> {
    let key = Key::new(RecordKind::Host, name);
    let tx = immediate(conn)?;
    let format: i64 = tx
        .query_row("SELECT format FROM hosts WHERE name = ?1", [name], |row| {
            row.get(0)
        })
        .optional()
        .map_err(sql("reading a host"))?
        .ok_or_else(|| not_found(RecordKind::Host, name))?;
    key.check_format(format)?;
    let vms: i64 = tx
        .query_row("SELECT count(*) FROM vms WHERE host = ?1", [name], |row| {
            row.get(0)
        })
        .map_err(sql("counting a host's VMs"))?;
    let active_migrations: i64 = tx
        .query_row(
            &format!(
                "SELECT count(*) FROM migrations
                 WHERE (source = ?1 OR destination = ?1) AND {ACTIVE_SQL}"
            ),
            [name],
            |row| row.get(0),
        )
        .map_err(sql("counting a host's migrations"))?;
    if vms > 0 || active_migrations > 0 {
        return Err(key.conflict(ConflictReason::HostInUse {
            vms: vms.unsigned_abs(),
            active_migrations: active_migrations.unsigned_abs(),
        }));
    }
    tx.execute("DELETE FROM hosts WHERE name = ?1", [name])
        .map_err(sql("deleting a host"))?;
    commit(tx)
}

fn host_from_row(row: &Row<'_>) -> StoreResult<HostRecord> {
    let r = RowReader::new(row, RecordKind::Host)?;
    Ok(HostRecord {
        url: r.text(2)?,
        joined_at: r.uint(3, "joined_at")?,
        last_seen: r.uint(4, "last_seen")?,
        facts: r.json(5, "facts")?,
        name: r.key,
    })
}

// ---------------------------------------------------------------------------
// VMs

const VM_COLUMNS: &str = "name, format, uuid, host, generation, spec, state";

fn put_vm_if_absent(conn: &mut Connection, vm: &VmRecord) -> StoreResult<u64> {
    let key = Key::new(RecordKind::Vm, &vm.name);
    let spec = key.json_in("spec", &vm.spec)?;
    let tx = immediate(conn)?;
    if !exists(&tx, "SELECT 1 FROM hosts WHERE name = ?1", &vm.host)? {
        return Err(not_found(RecordKind::Host, &vm.host));
    }
    if exists(&tx, "SELECT 1 FROM vms WHERE name = ?1", &vm.name)? {
        return Err(key.conflict(ConflictReason::AlreadyExists));
    }
    let generation: u64 = 1;
    tx.execute(
        "INSERT INTO vms (name, format, uuid, host, generation, spec, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            vm.name,
            ROW_FORMAT,
            vm.uuid.to_string(),
            vm.host,
            key.int_in("generation", generation)?,
            spec,
            vm.state
        ],
    )
    .map_err(sql("inserting a VM"))?;
    commit(tx)?;
    Ok(generation)
}

fn get_vm(conn: &mut Connection, name: &str) -> StoreResult<VmRecord> {
    let sql_text = format!("SELECT {VM_COLUMNS} FROM vms WHERE name = ?1");
    query_all(conn, &sql_text, [name], vm_from_row)?
        .pop()
        .ok_or_else(|| not_found(RecordKind::Vm, name))
}

fn list_vms(conn: &mut Connection, filter: &VmFilter) -> StoreResult<Vec<VmRecord>> {
    let sql_text =
        format!("SELECT {VM_COLUMNS} FROM vms WHERE (?1 IS NULL OR host = ?1) ORDER BY name");
    query_all(conn, &sql_text, [&filter.host], vm_from_row)
}

fn set_vm_owner(
    conn: &mut Connection,
    name: &str,
    expected_generation: u64,
    new_host: &str,
) -> StoreResult<u64> {
    let key = Key::new(RecordKind::Vm, name);
    let tx = immediate(conn)?;
    let (old_host, generation) = vm_guard(&tx, &key, expected_generation)?;
    if !exists(&tx, "SELECT 1 FROM hosts WHERE name = ?1", new_host)? {
        return Err(not_found(RecordKind::Host, new_host));
    }
    let next = key.next_generation(generation)?;
    tx.execute(
        "UPDATE vms SET host = ?1, generation = ?2, format = ?3 WHERE name = ?4",
        params![new_host, key.int_in("generation", next)?, ROW_FORMAT, name],
    )
    .map_err(sql("changing a VM's owner"))?;
    commit(tx)?;
    tracing::info!(vm = name, from = %old_host, to = new_host, generation = next, "VM owner changed");
    Ok(next)
}

fn update_vm_state(
    conn: &mut Connection,
    name: &str,
    expected_generation: u64,
    state: &str,
) -> StoreResult<()> {
    let key = Key::new(RecordKind::Vm, name);
    let tx = immediate(conn)?;
    vm_guard(&tx, &key, expected_generation)?;
    tx.execute(
        "UPDATE vms SET state = ?1 WHERE name = ?2",
        params![state, name],
    )
    .map_err(sql("updating a VM's state"))?;
    commit(tx)
}

fn delete_vm(conn: &mut Connection, name: &str) -> StoreResult<()> {
    let key = Key::new(RecordKind::Vm, name);
    let tx = immediate(conn)?;
    let format: i64 = tx
        .query_row("SELECT format FROM vms WHERE name = ?1", [name], |row| {
            row.get(0)
        })
        .optional()
        .map_err(sql("reading a VM"))?
        .ok_or_else(|| not_found(RecordKind::Vm, name))?;
    key.check_format(format)?;
    if let Some(id) = active_migration(&tx, name)? {
        return Err(key.conflict(ConflictReason::ActiveMigration { id }));
    }
    tx.execute("DELETE FROM vms WHERE name = ?1", [name])
        .map_err(sql("deleting a VM"))?;
    commit(tx)
}

/// Checks, inside a write transaction, that the VM exists in a format this
/// binary may overwrite and is still at `expected` generation; returns its
/// owner and generation.
fn vm_guard(tx: &Transaction<'_>, key: &Key<'_>, expected: u64) -> StoreResult<(String, u64)> {
    let (format, host, generation): (i64, String, i64) = tx
        .query_row(
            "SELECT format, host, generation FROM vms WHERE name = ?1",
            [key.key],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .optional()
        .map_err(sql("reading a VM"))?
        .ok_or_else(|| not_found(key.kind, key.key))?;
    key.check_format(format)?;
    let actual = key.uint_out("generation", generation)?;
    if actual != expected {
        return Err(key.conflict(ConflictReason::StaleGeneration { expected, actual }));
    }
    Ok((host, actual))
}

fn vm_from_row(row: &Row<'_>) -> StoreResult<VmRecord> {
    let r = RowReader::new(row, RecordKind::Vm)?;
    Ok(VmRecord {
        uuid: r.uuid(2, "uuid")?,
        host: r.text(3)?,
        generation: r.uint(4, "generation")?,
        spec: r.json(5, "spec")?,
        state: r.text(6)?,
        name: r.key,
    })
}

// ---------------------------------------------------------------------------
// Migrations

const MIGRATION_COLUMNS: &str = "id, format, vm, source, destination, status, phase, options, \
                                 steps, report, error, created_at, updated_at, generation";

/// The JSON and integer columns of a migration, encoded (and size-checked)
/// before the transaction starts, so that a refused value holds no lock.
struct MigrationColumns {
    options: String,
    steps: String,
    report: String,
    created_at: i64,
    updated_at: i64,
}

impl MigrationColumns {
    fn encode(key: &Key<'_>, m: &MigrationRecord) -> StoreResult<MigrationColumns> {
        Ok(MigrationColumns {
            options: key.json_in("options", &m.options)?,
            steps: key.json_in("steps", &m.steps)?,
            report: key.json_in("report", &m.report)?,
            created_at: key.int_in("created_at", m.created_at)?,
            updated_at: key.int_in("updated_at", m.updated_at)?,
        })
    }
}

fn create_migration(conn: &mut Connection, m: &MigrationRecord) -> StoreResult<u64> {
    let id = m.id.to_string();
    let key = Key::new(RecordKind::Migration, &id);
    let cols = MigrationColumns::encode(&key, m)?;
    let tx = immediate(conn)?;
    if !exists(&tx, "SELECT 1 FROM vms WHERE name = ?1", &m.vm)? {
        return Err(not_found(RecordKind::Vm, &m.vm));
    }
    if exists(&tx, "SELECT 1 FROM migrations WHERE id = ?1", &id)? {
        return Err(key.conflict(ConflictReason::AlreadyExists));
    }
    let vm_key = Key::new(RecordKind::Vm, &m.vm);
    if m.status.is_active() {
        if let Some(active) = active_migration(&tx, &m.vm)? {
            return Err(vm_key.conflict(ConflictReason::ActiveMigration { id: active }));
        }
    }
    let generation: u64 = 1;
    let inserted = tx.execute(
        &format!(
            "INSERT INTO migrations ({MIGRATION_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
        ),
        params![
            id,
            ROW_FORMAT,
            m.vm,
            m.source,
            m.destination,
            m.status.as_str(),
            m.phase,
            cols.options,
            cols.steps,
            cols.report,
            m.error,
            cols.created_at,
            cols.updated_at,
            key.int_in("generation", generation)?
        ],
    );
    match inserted {
        Ok(_) => {}
        // Unreachable while the checks above hold the write lock; kept so
        // that the index, should it ever be the one to refuse, still yields
        // a conflict rather than an opaque SQLite error.
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) => {
            return Err(match active_migration(&tx, &m.vm)? {
                Some(active) => vm_key.conflict(ConflictReason::ActiveMigration { id: active }),
                None => key.conflict(ConflictReason::AlreadyExists),
            });
        }
        Err(e) => return Err(sql("inserting a migration")(e)),
    }
    commit(tx)?;
    tracing::debug!(migration = %m.id, vm = %m.vm, status = %m.status, "migration recorded");
    Ok(generation)
}

fn get_migration(conn: &mut Connection, id: Uuid) -> StoreResult<MigrationRecord> {
    let id = id.to_string();
    let sql_text = format!("SELECT {MIGRATION_COLUMNS} FROM migrations WHERE id = ?1");
    query_all(conn, &sql_text, [&id], migration_from_row)?
        .pop()
        .ok_or_else(|| not_found(RecordKind::Migration, &id))
}

fn list_migrations(
    conn: &mut Connection,
    filter: &MigrationFilter,
) -> StoreResult<Vec<MigrationRecord>> {
    let sql_text = format!(
        "SELECT {MIGRATION_COLUMNS} FROM migrations
         WHERE (?1 IS NULL OR vm = ?1) AND (?2 = 0 OR {ACTIVE_SQL})
         ORDER BY created_at, rowid"
    );
    query_all(
        conn,
        &sql_text,
        params![filter.vm, filter.active_only],
        migration_from_row,
    )
}

fn update_migration(
    conn: &mut Connection,
    m: &MigrationRecord,
    expected_generation: u64,
) -> StoreResult<u64> {
    let id = m.id.to_string();
    let key = Key::new(RecordKind::Migration, &id);
    let cols = MigrationColumns::encode(&key, m)?;
    let tx = immediate(conn)?;
    let sql_text = format!("SELECT {MIGRATION_COLUMNS} FROM migrations WHERE id = ?1");
    let stored = query_all(&tx, &sql_text, [&id], migration_from_row)?
        .pop()
        .ok_or_else(|| not_found(RecordKind::Migration, &id))?;
    if stored.generation != expected_generation {
        return Err(key.conflict(ConflictReason::StaleGeneration {
            expected: expected_generation,
            actual: stored.generation,
        }));
    }
    for (field, old, new) in [
        ("vm", &stored.vm, &m.vm),
        ("source", &stored.source, &m.source),
        ("destination", &stored.destination, &m.destination),
    ] {
        if old != new {
            return Err(key.invalid(format!(
                "{field} cannot change (from {old:?} to {new:?}): start a new migration"
            )));
        }
    }
    if stored.created_at != m.created_at {
        return Err(key.invalid(format!(
            "created_at cannot change (from {} to {})",
            stored.created_at, m.created_at
        )));
    }
    if !stored.status.may_become(m.status) {
        return Err(key.invalid(format!(
            "status cannot go from {} to {}: a migration only moves forward",
            stored.status, m.status
        )));
    }
    let next = key.next_generation(stored.generation)?;
    tx.execute(
        "UPDATE migrations SET format = ?1, status = ?2, phase = ?3, options = ?4, steps = ?5,
             report = ?6, error = ?7, updated_at = ?8, generation = ?9
         WHERE id = ?10",
        params![
            ROW_FORMAT,
            m.status.as_str(),
            m.phase,
            cols.options,
            cols.steps,
            cols.report,
            m.error,
            cols.updated_at,
            key.int_in("generation", next)?,
            id
        ],
    )
    .map_err(sql("updating a migration"))?;
    commit(tx)?;
    if stored.status != m.status {
        tracing::debug!(migration = %m.id, vm = %m.vm, from = %stored.status, to = %m.status,
            "migration status changed");
    }
    Ok(next)
}

/// The VM's active migration, if any (at most one: the partial index).
fn active_migration(tx: &Transaction<'_>, vm: &str) -> StoreResult<Option<Uuid>> {
    let id: Option<String> = tx
        .query_row(
            &format!("SELECT id FROM migrations WHERE vm = ?1 AND {ACTIVE_SQL}"),
            [vm],
            |row| row.get(0),
        )
        .optional()
        .map_err(sql("looking for an active migration"))?;
    id.map(|id| {
        Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt {
            kind: RecordKind::Migration,
            key: id.clone(),
            detail: format!("its id is not a UUID: {e}"),
        })
    })
    .transpose()
}

fn migration_from_row(row: &Row<'_>) -> StoreResult<MigrationRecord> {
    let r = RowReader::new(row, RecordKind::Migration)?;
    let status_text = r.text(5)?;
    let status = MigrationStatus::parse(&status_text)
        .ok_or_else(|| r.corrupt(format!("unknown status {status_text:?}")))?;
    let steps: Vec<StepRecord> = r.json(8, "steps")?;
    Ok(MigrationRecord {
        id: r.uuid(0, "id")?,
        vm: r.text(2)?,
        source: r.text(3)?,
        destination: r.text(4)?,
        status,
        phase: r.text(6)?,
        options: r.json(7, "options")?,
        steps,
        report: r.json(9, "report")?,
        error: r.opt_text(10)?,
        created_at: r.uint(11, "created_at")?,
        updated_at: r.uint(12, "updated_at")?,
        generation: r.uint(13, "generation")?,
    })
}

// ---------------------------------------------------------------------------
// Helpers

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { op, source }
}

fn not_found(kind: RecordKind, key: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        key: key.to_string(),
    }
}

/// `BEGIN IMMEDIATE`: the write lock is taken before the first read, so a
/// check and the write it guards cannot be split by another writer.
fn immediate(conn: &mut Connection) -> StoreResult<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql("starting a transaction"))
}

fn commit(tx: Transaction<'_>) -> StoreResult<()> {
    tx.commit().map_err(sql("committing"))
}

fn exists(conn: &Connection, query: &str, key: &str) -> StoreResult<bool> {
    conn.query_row(query, [key], |_| Ok(()))
        .optional()
        .map(|found| found.is_some())
        .map_err(sql("looking up a key"))
}

/// Runs a query and decodes every row; one undecodable row fails the whole
/// read, with its key in the error (a list that silently skipped rows would
/// hide VMs from the scheduler and HA).
fn query_all<T, P: rusqlite::Params>(
    conn: &Connection,
    query: &str,
    params: P,
    decode: fn(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn
        .prepare_cached(query)
        .map_err(sql("preparing a query"))?;
    let mut rows = stmt.query(params).map_err(sql("querying"))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql("reading rows"))? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// A record's identity, for the errors about it and the conversions of its
/// values into columns.
struct Key<'a> {
    kind: RecordKind,
    key: &'a str,
}

impl<'a> Key<'a> {
    fn new(kind: RecordKind, key: &'a str) -> Self {
        Key { kind, key }
    }

    fn conflict(&self, reason: ConflictReason) -> StoreError {
        StoreError::Conflict {
            kind: self.kind,
            key: self.key.to_string(),
            reason,
        }
    }

    fn invalid(&self, detail: String) -> StoreError {
        StoreError::Invalid {
            kind: self.kind,
            key: self.key.to_string(),
            detail,
        }
    }

    fn corrupt(&self, detail: String) -> StoreError {
        StoreError::Corrupt {
            kind: self.kind,
            key: self.key.to_string(),
            detail,
        }
    }

    /// Only rows of this binary's format are read or overwritten.
    fn check_format(&self, found: i64) -> StoreResult<()> {
        if found == i64::from(ROW_FORMAT) {
            Ok(())
        } else if found > i64::from(ROW_FORMAT) {
            Err(StoreError::UnsupportedFormat {
                kind: self.kind,
                key: self.key.to_string(),
                found,
                supported: ROW_FORMAT,
            })
        } else {
            Err(self.corrupt(format!(
                "row format {found} was never written by any ferryd"
            )))
        }
    }

    /// SQLite integers are signed: refuse what would not come back as written.
    fn int_in(&self, field: &str, value: u64) -> StoreResult<i64> {
        i64::try_from(value).map_err(|_| {
            self.invalid(format!(
                "{field} {value} is larger than the store holds ({})",
                i64::MAX
            ))
        })
    }

    fn uint_out(&self, field: &str, value: i64) -> StoreResult<u64> {
        u64::try_from(value).map_err(|_| self.corrupt(format!("{field} is negative ({value})")))
    }

    fn next_generation(&self, generation: u64) -> StoreResult<u64> {
        generation
            .checked_add(1)
            .filter(|next| i64::try_from(*next).is_ok())
            .ok_or_else(|| self.invalid("generation numbers are exhausted".to_string()))
    }

    /// Encodes a JSON value, refusing one over [`MAX_JSON_BYTES`] so that the
    /// store never holds a value it would refuse to read back.
    fn json_in<T: Serialize + ?Sized>(
        &self,
        field: &'static str,
        value: &T,
    ) -> StoreResult<String> {
        let text = serde_json::to_string(value).map_err(|source| StoreError::Encode {
            kind: self.kind,
            key: self.key.to_string(),
            field,
            source,
        })?;
        if text.len() > MAX_JSON_BYTES {
            return Err(StoreError::TooLarge {
                kind: self.kind,
                key: self.key.to_string(),
                field,
                size: text.len(),
                limit: MAX_JSON_BYTES,
            });
        }
        Ok(text)
    }
}

/// Decodes one row: reads the key (column 0) and checks the format (column 1)
/// before anything else, so that every later error names the record.
struct RowReader<'r, 's> {
    row: &'r Row<'s>,
    kind: RecordKind,
    key: String,
}

impl<'r, 's> RowReader<'r, 's> {
    fn new(row: &'r Row<'s>, kind: RecordKind) -> StoreResult<Self> {
        let key: String = row.get(0).map_err(sql("decoding a row"))?;
        let format: i64 = row.get(1).map_err(sql("decoding a row"))?;
        Key::new(kind, &key).check_format(format)?;
        Ok(RowReader { row, kind, key })
    }

    fn corrupt(&self, detail: String) -> StoreError {
        Key::new(self.kind, &self.key).corrupt(detail)
    }

    fn text(&self, idx: usize) -> StoreResult<String> {
        self.row.get(idx).map_err(sql("decoding a row"))
    }

    fn opt_text(&self, idx: usize) -> StoreResult<Option<String>> {
        self.row.get(idx).map_err(sql("decoding a row"))
    }

    fn uint(&self, idx: usize, field: &str) -> StoreResult<u64> {
        let value: i64 = self.row.get(idx).map_err(sql("decoding a row"))?;
        Key::new(self.kind, &self.key).uint_out(field, value)
    }

    fn uuid(&self, idx: usize, field: &str) -> StoreResult<Uuid> {
        let text = self.text(idx)?;
        Uuid::parse_str(&text)
            .map_err(|e| self.corrupt(format!("{field} {text:?} is not a UUID: {e}")))
    }

    /// Parses a JSON column after checking its size: the file is outside
    /// bytes (edited, damaged, or written by something else), and the cap
    /// bounds what it can make the controller allocate.
    fn json<T: DeserializeOwned>(&self, idx: usize, field: &'static str) -> StoreResult<T> {
        let value = self.row.get_ref(idx).map_err(sql("decoding a row"))?;
        let ValueRef::Text(bytes) = value else {
            return Err(self.corrupt(format!(
                "{field} is stored as {}, not text",
                value.data_type()
            )));
        };
        if bytes.len() > MAX_JSON_BYTES {
            return Err(self.corrupt(format!(
                "{field} is {} bytes, more than the store's cap of {MAX_JSON_BYTES}",
                bytes.len()
            )));
        }
        serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
            kind: self.kind,
            key: self.key.clone(),
            field,
            source,
        })
    }
}

//! What the agent persists about each VM, so that a restarted agent knows its
//! VMs and can reattach to their running QEMU processes.
//!
//! One JSON file per VM, replaced atomically (write a temporary file, fsync,
//! rename, fsync the folder): a crash mid-write leaves the old record, never a
//! torn one.
//!
//! # Migrations survive an agent restart
//!
//! Nothing about a migration in flight lives only in the agent's memory: a
//! restarted agent rebuilds every answer from the record and from QEMU.
//!
//! * `incoming` — this host is the destination of a migration that has not
//!   committed. It holds where the receiving QEMU listens (`ready`, once
//!   prepared) and `finishing`, set *before* `incoming_finish` resumes the
//!   guest: from then on the VM is this host's (the controller committed),
//!   nothing may abort it, and a restarted agent completes the finish. An
//!   incoming VM whose QEMU is gone when the agent starts, and that was not
//!   finishing, is an aborted migration: its record, disks and runtime files
//!   are removed.
//! * `arrived` — the migration that brought the VM here, once finished, so
//!   that repeated `incoming_status`/`incoming_finish` calls (from a
//!   controller that lost an answer) get the same answer after a restart.
//! * `outgoing` — this host is the source of a migration: its id, the
//!   destination, the mirrored disks (their NBD nodes and jobs are named
//!   from the disk ids) and the migration URI, and whether `migrate` was
//!   sent (before that, `query-migrate` may still describe an earlier
//!   migration, e.g. the one that brought the VM here). Cleared by
//!   `outgoing_cancel`; the record goes at `outgoing_retire`.
//! * `retiring` — set (with the disks to delete) before `outgoing_retire`
//!   ends the QEMU: its exit is expected, and a restarted agent completes
//!   the retire.
//!
//! Every field added after format 1 is `#[serde(default)]`: older records
//! load unchanged, and the format version stays 1.

use ferry_core::spec::VmSpec;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version of the record format; bumped on incompatible changes.
pub const RECORD_FORMAT_VERSION: u32 = 1;

/// Largest record the agent will read back (a record is a few KiB; anything
/// larger is not ours).
const MAX_RECORD_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub format_version: u32,
    pub spec: VmSpec,
    /// The QEMU process while one exists.
    pub process: Option<ProcessRecord>,
    /// Whether the user wants the VM running; a QEMU that is gone while this
    /// is set was not stopped by us: it crashed.
    pub should_run: bool,
    /// Set when the VM crashed, with why.
    pub crashed: Option<String>,
    /// Datastore disk files this agent created for the VM (removed on delete).
    #[serde(default)]
    pub created_files: Vec<PathBuf>,
    /// Set while this host is the destination of a migration that has not
    /// committed: the VM is not this host's to run yet.
    #[serde(default)]
    pub incoming: Option<IncomingRecord>,
    /// The cluster networks the spec's NICs name, as the controller defined
    /// them when the VM came to this host: the agent needs the bridge at
    /// every start, and must not depend on the controller for it.
    #[serde(default)]
    pub networks: Vec<ferry_core::network::NetworkDef>,
    /// Set while this host is the source of a migration that was neither
    /// cancelled nor retired.
    #[serde(default)]
    pub outgoing: Option<OutgoingRecord>,
    /// The migration that brought the VM to this host, once finished.
    #[serde(default)]
    pub arrived: Option<ArrivedRecord>,
    /// Set by `outgoing_retire` before the QEMU quits: the VM has left this
    /// host (after the commit), and these copied disks are to be deleted.
    #[serde(default)]
    pub retiring: Option<Vec<String>>,
    /// Set while disks of the VM move to other files of this host (before
    /// their target files are created), so that a restarted agent finishes
    /// or undoes the move instead of forgetting the files.
    #[serde(default)]
    pub storage_move: Option<StorageMoveRecord>,
    /// Set while the (stopped) VM's files are being copied to another host
    /// by this offline migration: it must not start meanwhile.
    #[serde(default)]
    pub departing: Option<uuid::Uuid>,
}

/// A storage move in progress (see `vm/storage.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageMoveRecord {
    pub move_id: uuid::Uuid,
    /// The guest ran (mirror and pivot in QEMU) rather than stopped (files
    /// converted by qemu-img).
    pub live: bool,
    pub disks: Vec<DiskMoveRecord>,
    /// Every disk switched to its target and the spec says so: only the old
    /// files are left to delete.
    #[serde(default)]
    pub switched: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskMoveRecord {
    pub disk_id: String,
    pub from_datastore: Option<String>,
    pub from_path: PathBuf,
    pub from_format: ferry_core::spec::DiskFormat,
    pub to_datastore: String,
    /// The file name inside the target datastore.
    pub to_file: String,
    pub to_path: PathBuf,
    pub to_format: ferry_core::spec::DiskFormat,
    pub virtual_size_bytes: u64,
    /// QEMU's names: the disk's root node when the move began, and the
    /// target's nodes (live moves only).
    #[serde(default)]
    pub source_node: String,
    #[serde(default)]
    pub target_node: String,
    #[serde(default)]
    pub target_file_node: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingRecord {
    pub migration_id: uuid::Uuid,
    pub source_host: String,
    /// Where the receiving QEMU listens, once it is ready.
    #[serde(default)]
    pub ready: Option<ferry_api::IncomingReady>,
    /// Set before `incoming_finish` resumes the guest: the migration has
    /// committed and the VM belongs to this host.
    #[serde(default)]
    pub finishing: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutgoingRecord {
    pub migration_id: uuid::Uuid,
    pub destination_host: String,
    /// The disks mirrored to the destination (NBD client node
    /// `nbd-<id>`, job `mirror-<id>`); empty with shared storage.
    #[serde(default)]
    pub mirror_disks: Vec<String>,
    /// Where `migrate` sends the stream (`tcp:HOST:PORT`), once every
    /// mirror is ready.
    pub migration_uri: String,
    /// Set just before `migrate` is sent.
    #[serde(default)]
    pub migrate_started: bool,
    /// The destination's NBD server (copied disks): the switchover compares
    /// each source disk with its export there.
    #[serde(default)]
    pub nbd: Option<ferry_api::NbdEndpoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArrivedRecord {
    pub migration_id: uuid::Uuid,
    /// QMP timestamp (unix µs) of the RESUME that started the guest here,
    /// when it was seen.
    #[serde(default)]
    pub resumed_at_us: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// Start time of the process in clock ticks since boot
    /// (`/proc/PID/stat` field 22): with the pid, the identity of the process,
    /// safe against pid reuse.
    pub start_time: u64,
    pub accel: String,
    pub accel_reason: String,
    /// Unix time the process was launched.
    pub started_at: u64,
}

/// Where the agent keeps one VM's files.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(state_dir: &Path, name: &str) -> Self {
        VmPaths {
            dir: state_dir.join("vms").join(name),
        }
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("vm.json")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn serial_socket(&self) -> PathBuf {
        self.dir.join("serial.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
}

impl VmRecord {
    pub fn new(spec: VmSpec) -> Self {
        VmRecord {
            format_version: RECORD_FORMAT_VERSION,
            spec,
            process: None,
            should_run: false,
            crashed: None,
            created_files: Vec::new(),
            incoming: None,
            networks: Vec::new(),
            outgoing: None,
            arrived: None,
            retiring: None,
            storage_move: None,
            departing: None,
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomically(path, &json)
    }

    pub fn load(path: &Path) -> std::io::Result<VmRecord> {
        let size = std::fs::metadata(path)?.len();
        if size > MAX_RECORD_BYTES {
            return Err(std::io::Error::other(format!(
                "{} is {size} bytes, larger than any VM record ({MAX_RECORD_BYTES})",
                path.display()
            )));
        }
        let bytes = std::fs::read(path)?;
        let record: VmRecord = serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if record.format_version != RECORD_FORMAT_VERSION {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} has record format {}, this agent reads {RECORD_FORMAT_VERSION}",
                    path.display(),
                    record.format_version
                ),
            ));
        }
        Ok(record)
    }
}

/// Replaces `path` with `bytes` so that readers see the old or the new
/// content, never a mix, even across a crash.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("path has no parent folder"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("record")
    ));
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomically_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "no temporary file is left: {leftovers:?}"
        );
    }

    fn spec(dir: &Path) -> VmSpec {
        VmSpec::from_toml_str(
            "name = \"old\"\nmemory = \"64MiB\"\n[[disks]]\nid = \"vd0\"\n\
             path = \"/nonexistent/vd0.raw\"\nformat = \"raw\"\n",
            dir,
        )
        .unwrap()
    }

    #[test]
    fn a_record_from_before_the_migration_fields_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        let id = uuid::Uuid::new_v4();
        let old = serde_json::json!({
            "format_version": 1,
            "spec": spec(dir.path()),
            "process": null,
            "should_run": false,
            "crashed": null,
            "incoming": {"migration_id": id, "source_host": "host1"},
        });
        std::fs::write(&path, serde_json::to_vec(&old).unwrap()).unwrap();
        let record = VmRecord::load(&path).expect("an old record loads");
        let incoming = record.incoming.expect("incoming kept");
        assert_eq!(incoming.migration_id, id);
        assert!(incoming.ready.is_none() && !incoming.finishing);
        assert!(record.outgoing.is_none());
        assert!(record.arrived.is_none() && record.retiring.is_none());
    }

    #[test]
    fn migration_facts_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        let mut record = VmRecord::new(spec(dir.path()));
        record.outgoing = Some(OutgoingRecord {
            migration_id: uuid::Uuid::new_v4(),
            destination_host: "host2".to_string(),
            mirror_disks: vec!["vd0".to_string()],
            migration_uri: "tcp:127.0.0.1:4444".to_string(),
            migrate_started: true,
            nbd: Some(ferry_api::NbdEndpoint {
                host: "127.0.0.1".to_string(),
                port: 10809,
            }),
        });
        record.arrived = Some(ArrivedRecord {
            migration_id: uuid::Uuid::new_v4(),
            resumed_at_us: Some(42),
        });
        record.retiring = Some(vec!["vd0".to_string()]);
        record.save(&path).unwrap();
        let back = VmRecord::load(&path).unwrap();
        let outgoing = back.outgoing.expect("outgoing");
        assert!(outgoing.migrate_started);
        assert_eq!(outgoing.mirror_disks, ["vd0"]);
        assert_eq!(outgoing.migration_uri, "tcp:127.0.0.1:4444");
        assert_eq!(back.arrived.unwrap().resumed_at_us, Some(42));
        assert_eq!(back.retiring.unwrap(), ["vd0"]);
    }
}

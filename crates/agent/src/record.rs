//! What the agent persists about each VM, so that a restarted agent knows its
//! VMs and can reattach to their running QEMU processes.
//!
//! One JSON file per VM, replaced atomically (write a temporary file, fsync,
//! rename, fsync the folder): a crash mid-write leaves the old record, never a
//! torn one.

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingRecord {
    pub migration_id: uuid::Uuid,
    pub source_host: String,
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
}

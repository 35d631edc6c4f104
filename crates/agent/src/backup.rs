//! Backups on this host: where they live and how they are found, deleted
//! and restored. (Taking one is the VM task's job: `vm/backup.rs`.)
//!
//! A backup is a folder `<datastore>/.ferry-backups/<id>/` holding one qcow2
//! file per disk and `backup.json` (a [`ferry_api::BackupInfo`]). The
//! manifest is written last, atomically: a folder without one is a backup
//! that never completed, and is removed when the agent starts (no backup can
//! be running then: the tasks that wrote them are gone).

use std::path::{Path, PathBuf};

use ferry_api::BackupInfo;
use tracing::{info, warn};

use crate::error::AgentError;
use crate::host::HostContext;

/// The folder of a datastore that holds its backups.
pub const BACKUPS_FOLDER: &str = ".ferry-backups";
const MANIFEST: &str = "backup.json";
/// Largest manifest read (a spec and a few disks: a few KiB).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// A new backup's id: the VM's name and the time, readable in listings and
/// unique per VM per millisecond (`demo-20261128-061542-123`).
pub fn new_id(vm: &str, unix_ms: u64) -> String {
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let format = time::macros::format_description!("[year][month][day]-[hour][minute][second]");
    let stamp = time.format(&format).unwrap_or_default();
    format!("{vm}-{stamp}-{:03}", unix_ms % 1000)
}

/// An id is one plain path component: it names a folder.
pub fn check_id(id: &str) -> Result<(), AgentError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::Storage {
            problem: format!("{id:?} is not a backup id"),
        })
    }
}

pub fn folder(datastore_path: &Path, id: &str) -> PathBuf {
    datastore_path.join(BACKUPS_FOLDER).join(id)
}

/// Writes the manifest last and atomically: from then on the backup exists.
pub fn write_manifest(folder: &Path, info: &BackupInfo) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?;
    crate::record::write_atomically(&folder.join(MANIFEST), &json)
}

fn read_manifest(folder: &Path) -> Option<BackupInfo> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(folder.join(MANIFEST))
        .ok()?
        .take(MAX_MANIFEST_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// Every complete backup on this host, oldest first.
pub fn list(host: &HostContext) -> Vec<BackupInfo> {
    let mut found = Vec::new();
    for path in host.config.datastores.values() {
        let Ok(entries) = std::fs::read_dir(path.join(BACKUPS_FOLDER)) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Some(info) = read_manifest(&entry.path()) {
                found.push(info);
            }
        }
    }
    found.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
    found
}

/// A backup of this host and its folder.
pub fn find(host: &HostContext, id: &str) -> Result<(BackupInfo, PathBuf), AgentError> {
    check_id(id)?;
    for path in host.config.datastores.values() {
        let folder = folder(path, id);
        if let Some(info) = read_manifest(&folder) {
            return Ok((info, folder));
        }
    }
    Err(AgentError::BackupNotFound {
        id: id.to_string(),
        host: host.config.host_name.clone(),
    })
}

/// Deletes a backup: the manifest first (from then on it is not listed),
/// then the folder.
pub fn delete(host: &HostContext, id: &str) -> Result<(), AgentError> {
    let (_, folder) = find(host, id)?;
    let io = |action: &'static str| {
        move |source| AgentError::DiskIo {
            disk: format!("backup {id}"),
            action,
            source,
        }
    };
    std::fs::remove_file(folder.join(MANIFEST)).map_err(io("removing the manifest"))?;
    std::fs::remove_dir_all(&folder).map_err(io("removing the backup's files"))?;
    info!(backup = %id, "backup deleted");
    Ok(())
}

/// Removes backups that never completed (no manifest); called at agent
/// start, when none can be in progress.
pub fn remove_incomplete(host: &HostContext) {
    for path in host.config.datastores.values() {
        let Ok(entries) = std::fs::read_dir(path.join(BACKUPS_FOLDER)) else {
            continue;
        };
        for entry in entries.flatten() {
            let folder = entry.path();
            if folder.is_dir() && !folder.join(MANIFEST).exists() {
                warn!(folder = %folder.display(), "removing a backup that never completed");
                if let Err(error) = std::fs::remove_dir_all(&folder) {
                    warn!(folder = %folder.display(), %error, "cannot remove an incomplete backup");
                }
            }
        }
    }
}

/// The spec a restore creates: the backup's, renamed (new uuid and MACs,
/// so that it can run next to the original) when `as_name` is given, each
/// disk made from its backup file (`image`) in its original format, on
/// the datastore it was on (or the backup's, for a disk given by path).
pub fn restore_spec(
    info: &BackupInfo,
    folder: &Path,
    as_name: Option<&str>,
) -> ferry_core::spec::VmSpec {
    use ferry_core::spec::DiskSource;
    let mut spec = info.spec.clone();
    if let Some(name) = as_name {
        spec.name = name.to_string();
        spec.uuid = uuid::Uuid::new_v4();
        for nic in &mut spec.nics {
            nic.mac = ferry_core::spec::generate_mac();
        }
    }
    for disk in &mut spec.disks {
        let Some(saved) = info.disks.iter().find(|d| d.disk_id == disk.id) else {
            continue;
        };
        let extension = crate::disks::format_name(saved.source_format);
        let renamed = format!("{}-{}.{extension}", spec.name, disk.id);
        let (datastore, file) = match &disk.source {
            DiskSource::Datastore { datastore, file } if as_name.is_none() => {
                (datastore.clone(), file.clone())
            }
            DiskSource::Datastore { datastore, .. } => (datastore.clone(), renamed),
            DiskSource::Path { .. } => (info.datastore.clone(), renamed),
        };
        disk.source = DiskSource::Datastore { datastore, file };
        disk.format = saved.source_format;
        disk.image = Some(folder.join(&saved.file));
        disk.create_size_bytes = None;
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_readable_and_safe() {
        let id = new_id("demo", 1_795_846_542_123);
        assert!(id.starts_with("demo-2026"), "{id}");
        assert!(id.ends_with("-123"), "{id}");
        check_id(&id).unwrap();
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }
}

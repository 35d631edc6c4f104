//! Taking a backup of one VM: every disk as of one instant.
//!
//! * **Running (or paused) VM**: one QMP `transaction` of `blockdev-backup`
//!   (`sync: full`) jobs, one per disk, into fresh qcow2 files. QEMU starts
//!   them atomically, so every disk is copied as of the same instant — the
//!   backup is crash-consistent across disks, like a power cut at that
//!   instant. The guest keeps running: a write to a block not yet copied
//!   first copies the old content (copy-before-write).
//! * **Stopped VM**: `qemu-img convert` of each file (the VM cannot start
//!   until it is done: `start` refuses).
//!
//! The copy runs on a task of its own, so the VM's task keeps answering;
//! `backup_running` refuses a start, a delete, a migration or a storage
//! move meanwhile.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_api::{BackupDisk, BackupInfo};
use ferry_core::spec::{DiskFormat, DiskSource};
use ferry_qemu::qmp::Qmp;
use ferry_qemu::storage::{self, BackupJob, ImageNode};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::VmTask;
use crate::disks;
use crate::error::AgentError;

/// Longest a backup's copy may take.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// Room a backup needs beyond the disks' allocated bytes.
const SPACE_MARGIN_BYTES: u64 = 8 << 20;

/// What the agent asks of the VM's task.
pub(crate) struct BackupStart {
    pub id: String,
    pub datastore: Option<String>,
    pub reason: String,
}

/// A backup in progress; `done` is set by its task at the end.
pub(crate) struct BackupRunning {
    done: Arc<AtomicBool>,
}

/// One disk to back up.
struct Planned {
    disk_id: String,
    source: PathBuf,
    source_format: DiskFormat,
    virtual_size_bytes: u64,
    target: PathBuf,
    file: String,
}

type Done = oneshot::Receiver<Result<BackupInfo, AgentError>>;

impl VmTask {
    /// Checks and starts a backup; the receiver gets its outcome.
    pub(super) async fn backup_start(&mut self, start: BackupStart) -> Result<Done, AgentError> {
        crate::backup::check_id(&start.id)?;
        let live = self.disk_work_may_start("a backup")?;
        let datastore = self.backup_datastore(start.datastore.as_deref())?;
        let datastore_path = self.host.config.datastores[&datastore].clone();
        let folder = crate::backup::folder(&datastore_path, &start.id);
        if folder.exists() {
            return Err(self.storage_problem(format!("backup {} already exists", start.id)));
        }
        let planned = self.plan_backup(&folder)?;
        let needed: u64 = planned
            .iter()
            .map(|p| {
                disks::allocated_bytes(&p.source).unwrap_or(p.virtual_size_bytes)
                    + SPACE_MARGIN_BYTES
            })
            .sum();
        self.ensure_room(
            &datastore,
            &datastore_path,
            needed,
            "the allocated size of the VM's disks, plus 8 MiB each",
        )?;
        std::fs::create_dir_all(&folder).map_err(|source| AgentError::DiskIo {
            disk: format!("backup {}", start.id),
            action: "creating the backup's folder",
            source,
        })?;
        let info = BackupInfo {
            id: start.id.clone(),
            vm: self.name().to_string(),
            vm_uuid: self.record.spec.uuid,
            host: self.host.config.host_name.clone(),
            datastore,
            created_at_ms: unix_ms(),
            vm_state: if live { "running" } else { "stopped" }.into(),
            disks: Vec::new(),
            size_bytes: 0,
            reason: start.reason,
            spec: self.record.spec.clone(),
            networks: self.record.networks.clone(),
        };
        let done_flag = Arc::new(AtomicBool::new(false));
        let (tx, rx) = oneshot::channel();
        let qemu_img = self.host.qemu_img.clone();
        let flag = done_flag.clone();
        let name = self.name().to_string();
        let qmp = if live {
            Some(
                self.attached
                    .as_ref()
                    .map(|a| a.qmp.clone())
                    .ok_or_else(|| self.storage_problem("its QEMU is not attached"))?,
            )
        } else {
            None
        };
        tokio::spawn(async move {
            let result = match qmp {
                Some(qmp) => live_backup(&qmp, &qemu_img, &planned, info.clone()).await,
                None => offline_backup(&qemu_img, &planned, info.clone()).await,
            };
            let result = result.and_then(|info| {
                crate::backup::write_manifest(&folder, &info)
                    .map(|()| info)
                    .map_err(|e| format!("writing the manifest: {e}"))
            });
            let answer = match result {
                Ok(info) => {
                    info!(vm = %name, backup = %info.id, bytes = info.size_bytes, "backup complete");
                    Ok(info)
                }
                Err(problem) => {
                    warn!(vm = %name, backup = %start.id, %problem, "backup failed; removing its files");
                    let _ = std::fs::remove_dir_all(&folder);
                    Err(AgentError::Storage {
                        problem: format!("backup {} of VM {name:?} failed: {problem}", start.id),
                    })
                }
            };
            flag.store(true, Ordering::SeqCst);
            let _ = tx.send(answer);
        });
        self.backup_running = Some(BackupRunning { done: done_flag });
        Ok(rx)
    }

    /// Whether a backup's copy is still running (one that ended is
    /// forgotten first, so that a request right after it is not refused).
    pub(super) fn backup_in_progress(&mut self) -> bool {
        self.backup_reap();
        self.backup_running.is_some()
    }

    /// Forgets a backup whose task ended (on every liveness tick).
    pub(super) fn backup_reap(&mut self) {
        if self
            .backup_running
            .as_ref()
            .is_some_and(|b| b.done.load(Ordering::SeqCst))
        {
            self.backup_running = None;
        }
    }

    fn storage_problem(&self, problem: impl Into<String>) -> AgentError {
        AgentError::Storage {
            problem: format!("VM {:?}: {}", self.name(), problem.into()),
        }
    }

    /// The datastore asked for, else the first disk's, else the first one.
    fn backup_datastore(&self, asked: Option<&str>) -> Result<String, AgentError> {
        let known = |name: &str| self.host.config.datastores.contains_key(name);
        if let Some(name) = asked {
            if !known(name) {
                return Err(AgentError::UnknownDatastore {
                    name: name.to_string(),
                    host: self.host.config.host_name.clone(),
                    known: self.host.datastore_names(),
                });
            }
            return Ok(name.to_string());
        }
        let from_disk = self.record.spec.disks.iter().find_map(|d| match &d.source {
            DiskSource::Datastore { datastore, .. } if known(datastore) => Some(datastore.clone()),
            _ => None,
        });
        from_disk
            .or_else(|| self.host.config.datastores.keys().next().cloned())
            .ok_or_else(|| self.storage_problem("this host has no datastore to keep a backup in"))
    }

    fn plan_backup(&self, folder: &std::path::Path) -> Result<Vec<Planned>, AgentError> {
        let mut planned = Vec::new();
        for disk in &self.record.spec.disks {
            let source = disks::disk_path(&self.host, disk)?;
            let virtual_size_bytes =
                disks::virtual_size(&source, disk.format).map_err(|source| AgentError::DiskIo {
                    disk: disk.id.clone(),
                    action: "reading the disk's size",
                    source,
                })?;
            let file = format!("{}.qcow2", disk.id);
            planned.push(Planned {
                disk_id: disk.id.clone(),
                source,
                source_format: disk.format,
                virtual_size_bytes,
                target: folder.join(&file),
                file,
            });
        }
        if planned.is_empty() {
            return Err(self.storage_problem("it has no disk to back up"));
        }
        Ok(planned)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The target nodes of disk `disk_id`'s backup.
fn backup_node(disk: &Planned) -> ImageNode {
    ImageNode {
        node_name: format!("bkp-{}", disk.disk_id),
        file_node_name: format!("bkf-{}", disk.disk_id),
        path: disk.target.clone(),
        format: "qcow2".into(),
    }
}

fn finish_info(mut info: BackupInfo, planned: &[Planned]) -> BackupInfo {
    info.disks = planned
        .iter()
        .map(|p| BackupDisk {
            disk_id: p.disk_id.clone(),
            file: p.file.clone(),
            format: DiskFormat::Qcow2,
            source_format: p.source_format,
            virtual_size_bytes: p.virtual_size_bytes,
            allocated_bytes: disks::allocated_bytes(&p.target).unwrap_or(0),
        })
        .collect();
    info.size_bytes = info.disks.iter().map(|d| d.allocated_bytes).sum();
    info
}

async fn live_backup(
    qmp: &Qmp,
    qemu_img_path: &std::path::Path,
    planned: &[Planned],
    mut info: BackupInfo,
) -> Result<BackupInfo, String> {
    let mut jobs = Vec::new();
    let mut added = Vec::new();
    let outcome = async {
        for disk in planned {
            let size = disk.virtual_size_bytes.to_string();
            disks::run_qemu_img(
                qemu_img_path,
                &[
                    "create".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    disk.target.as_os_str(),
                    size.as_ref(),
                ],
            )
            .await?;
            let node = backup_node(disk);
            storage::blockdev_add_image(qmp, &node).await.map_err(|e| {
                format!(
                    "disk {}: opening the backup file: {}",
                    disk.disk_id,
                    ferry_api::error_chain(&e)
                )
            })?;
            added.push(node.clone());
            let device = storage::disk_backing(qmp, &disk.disk_id)
                .await
                .map_err(|e| format!("disk {}: {}", disk.disk_id, ferry_api::error_chain(&e)))?
                .node_name;
            jobs.push(BackupJob {
                job_id: format!("backup-{}", disk.disk_id),
                device,
                target: node.node_name,
                speed: None,
            });
        }
        // The instant the backup holds: the transaction starts every job
        // at once.
        info.created_at_ms = unix_ms();
        storage::backup(qmp, &jobs, BACKUP_TIMEOUT)
            .await
            .map_err(|e| format!("copying the disks: {}", ferry_api::error_chain(&e)))
    }
    .await;
    for node in &added {
        if let Err(error) = storage::blockdev_del_image(qmp, node).await {
            warn!(node = %node.node_name, error = %ferry_api::error_chain(&error), "cannot close a backup file");
        }
    }
    outcome?;
    Ok(finish_info(info, planned))
}

async fn offline_backup(
    qemu_img_path: &std::path::Path,
    planned: &[Planned],
    info: BackupInfo,
) -> Result<BackupInfo, String> {
    for disk in planned {
        disks::run_qemu_img(
            qemu_img_path,
            &[
                "convert".as_ref(),
                "-f".as_ref(),
                disks::format_name(disk.source_format).as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                disk.source.as_os_str(),
                disk.target.as_os_str(),
            ],
        )
        .await
        .map_err(|e| format!("disk {}: {e}", disk.disk_id))?;
    }
    Ok(finish_info(info, planned))
}

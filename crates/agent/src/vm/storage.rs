//! Moving a VM's disks to other files of this host: another datastore,
//! another format, or both (`ferry storage move`).
//!
//! # A live move (the guest runs)
//!
//! ```text
//!  record ─▶ qemu-img create ─▶ blockdev-add ─▶ blockdev-mirror ─▶ READY
//!  (targets)  (each target)      (target nodes)  (write-blocking)    │
//!                                                                    ▼
//!  delete old files ◀─ record: switched ◀─ cont ◀─ pivot ◀─ compare ◀─ stop
//!  record cleared                                (verified)  (qemu-img)
//! ```
//!
//! * The mirror is **write-blocking**: once READY every guest write reaches
//!   both files before the guest sees it complete, so the target stays in
//!   sync however fast the guest writes.
//! * **Verification at the switchover**: the guest is paused (`stop` drains
//!   and flushes every block node, the targets included), then `qemu-img
//!   compare` reads both files — guest-visible content, whatever their
//!   formats. Only if every disk matches does `block-job-complete` switch the
//!   device to its target (the pivot); then the guest resumes. A mismatch
//!   cancels the mirrors and resumes the guest on its old files, which it
//!   never left. The pause therefore lasts as long as the comparison; the
//!   report says how long (`paused_ms`, `verify_ms`).
//! * **Old files go last**: after the pivot the old nodes are deleted (QEMU
//!   closes and unlocks the old files), the spec is updated and persisted
//!   with `switched`, and only then are the old files removed.
//!
//! # A move of a stopped VM
//!
//! `qemu-img convert` into the target, `qemu-img compare`, then the same
//! ending. The VM cannot start meanwhile (`start` refuses).
//!
//! # After an agent restart
//!
//! [`VmTask::storage_move_settle`] decides per disk from what QEMU uses now:
//! a disk whose device already reads its target keeps it (the pivot
//! happened); any other disk is rolled back (job cancelled, target nodes
//! and file removed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_api::{DiskMoveOutcome, DiskMovePlan, DiskMoveRequest, DiskMoveStatus, VmState};
use ferry_core::spec::{DiskFormat, DiskSource};
use ferry_qemu::blockjob::{self, CopyMode, MirrorJob};
use ferry_qemu::storage::{self, ImageNode};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::VmTask;
use crate::disks;
use crate::error::AgentError;
use crate::record::{DiskMoveRecord, StorageMoveRecord};

/// Longest wait for the pivot of every mirror (the guest is paused, and
/// the mirrors are in sync: it takes milliseconds).
const PIVOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a cancelled mirror to end.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);
/// Room a target needs beyond the source's allocated bytes: qcow2 metadata
/// and rounding.
const SPACE_MARGIN_BYTES: u64 = 8 << 20;

/// The job that mirrors disk `disk_id` to its new file.
pub(crate) fn move_job_id(disk_id: &str) -> String {
    format!("move-{disk_id}")
}

/// A stopped VM's conversion running on its own task.
pub(crate) struct OfflineCopy {
    done: oneshot::Receiver<Result<u64, String>>,
}

/// What the task knows of storage moves beyond the record.
#[derive(Default)]
pub(crate) struct StorageRuntime {
    /// The last move's status (running or ended), for
    /// `GET /v1/vms/{name}/storage/move`.
    pub last: Option<DiskMoveStatus>,
    pub offline: Option<OfflineCopy>,
    pub started: Option<Instant>,
}

/// The file name a disk gets in its new format: the old name with the
/// extension of the new format (`demo.qcow2` → `demo.raw`).
fn target_file_name(from: &Path, format: DiskFormat) -> String {
    let name = from
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".to_string());
    let stem = ["raw", "qcow2", "img"]
        .iter()
        .find_map(|ext| name.strip_suffix(&format!(".{ext}")))
        .unwrap_or(&name)
        .to_string();
    format!("{stem}.{}", disks::format_name(format))
}

/// Tests only (feature `failpoints`, armed by ferryd's `FAILPOINTS`
/// environment: `storage.corrupt_copy=return`): spoils the copy just before
/// the comparison, so that the rollback of a copy that differs from its
/// source can be tested end to end with a real comparison. Compiles to
/// nothing otherwise.
fn corrupt_copy_failpoint(target: &Path) {
    #[cfg(feature = "failpoints")]
    if fail::eval("storage.corrupt_copy", |_| ()).is_some() {
        use std::os::unix::fs::FileExt;
        warn!(target = %target.display(), "failpoint: spoiling the copy before the comparison");
        if let Ok(file) = std::fs::OpenOptions::new().write(true).open(target) {
            let _ = file.write_all_at(b"failpoint: not what the guest wrote", 0);
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = target;
}

/// The QEMU nodes of a disk's target file.
fn target_node(disk: &DiskMoveRecord) -> ImageNode {
    ImageNode {
        node_name: disk.target_node.clone(),
        file_node_name: disk.target_file_node.clone(),
        path: disk.to_path.clone(),
        format: disks::format_name(disk.to_format).to_string(),
    }
}

fn outcome(disk: &DiskMoveRecord, verified: bool) -> DiskMoveOutcome {
    DiskMoveOutcome {
        disk_id: disk.disk_id.clone(),
        from_datastore: disk.from_datastore.clone(),
        from_path: disk.from_path.display().to_string(),
        from_format: disk.from_format,
        to_datastore: disk.to_datastore.clone(),
        to_path: disk.to_path.display().to_string(),
        to_format: disk.to_format,
        virtual_size_bytes: disk.virtual_size_bytes,
        verified,
    }
}

/// `qemu-img compare` of two images by guest-visible content, reading files
/// a QEMU may hold open (`-U`: the guest is paused, nothing writes them).
/// `Ok(None)` when identical, `Ok(Some(why))` when not.
async fn compare(
    qemu_img: &Path,
    a: (&Path, DiskFormat),
    b: (&Path, DiskFormat),
) -> Result<Option<String>, String> {
    let output = tokio::process::Command::new(qemu_img)
        .arg("compare")
        .arg("-U")
        .args(["-f", disks::format_name(a.1), "-F", disks::format_name(b.1)])
        .arg(a.0)
        .arg(b.0)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", qemu_img.display()))?;
    let text = format!(
        "{} {}",
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    match output.status.code() {
        Some(0) => Ok(None),
        Some(1) => Ok(Some(text.trim().to_string())),
        _ => Err(format!(
            "qemu-img compare failed ({}): {}",
            output.status,
            text.trim()
        )),
    }
}

async fn qemu_img_create(
    qemu_img: &Path,
    path: &Path,
    format: DiskFormat,
    size: u64,
) -> Result<(), String> {
    let size = size.to_string();
    disks::run_qemu_img(
        qemu_img,
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            disks::format_name(format).as_ref(),
            path.as_os_str(),
            size.as_ref(),
        ],
    )
    .await
}

/// Converts and verifies each disk of a stopped VM; the bytes copied.
async fn offline_copy(qemu_img: PathBuf, disks: Vec<DiskMoveRecord>) -> Result<u64, String> {
    let mut copied = 0;
    for disk in &disks {
        let output = tokio::process::Command::new(&qemu_img)
            .args([
                "convert",
                "-f",
                disks::format_name(disk.from_format),
                "-O",
                disks::format_name(disk.to_format),
            ])
            .arg(&disk.from_path)
            .arg(&disk.to_path)
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", qemu_img.display()))?;
        if !output.status.success() {
            return Err(format!(
                "disk {}: qemu-img convert failed: {}",
                disk.disk_id,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        if let Some(why) = compare(
            &qemu_img,
            (&disk.from_path, disk.from_format),
            (&disk.to_path, disk.to_format),
        )
        .await?
        {
            return Err(format!(
                "disk {}: verification failed, the copy differs from the source: {why}",
                disk.disk_id
            ));
        }
        copied += disk.virtual_size_bytes;
    }
    Ok(copied)
}

impl VmTask {
    fn storage_error(&self, problem: impl Into<String>) -> AgentError {
        AgentError::Storage {
            problem: format!("VM {:?}: {}", self.name(), problem.into()),
        }
    }

    /// Checks a move (changing nothing) and describes each disk's journey.
    fn plan_storage_move(&self, plans: &[DiskMovePlan]) -> Result<Vec<DiskMoveRecord>, AgentError> {
        if plans.is_empty() {
            return Err(self.storage_error("no disk to move"));
        }
        let mut moves: Vec<DiskMoveRecord> = Vec::new();
        for plan in plans {
            if moves.iter().any(|m| m.disk_id == plan.disk_id) {
                return Err(self.storage_error(format!("disk {:?} is named twice", plan.disk_id)));
            }
            let disk = self
                .record
                .spec
                .disks
                .iter()
                .find(|d| d.id == plan.disk_id)
                .ok_or_else(|| AgentError::Disk {
                    disk: plan.disk_id.clone(),
                    problem: format!(
                        "is not a disk of VM {:?} (its disks: {})",
                        self.name(),
                        self.record
                            .spec
                            .disks
                            .iter()
                            .map(|d| d.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })?;
            let folder = self
                .host
                .config
                .datastores
                .get(&plan.to_datastore)
                .ok_or_else(|| AgentError::UnknownDatastore {
                    name: plan.to_datastore.clone(),
                    host: self.host.config.host_name.clone(),
                    known: self.host.datastore_names(),
                })?;
            let from_path = disks::disk_path(&self.host, disk)?;
            let to_file = target_file_name(&from_path, plan.format);
            let to_path = folder.join(&to_file);
            let same_file = to_path == from_path
                || std::fs::canonicalize(folder)
                    .ok()
                    .zip(
                        from_path
                            .parent()
                            .and_then(|p| std::fs::canonicalize(p).ok()),
                    )
                    .is_some_and(|(a, b)| {
                        a == b && from_path.file_name() == Some(to_file.as_ref())
                    });
            if same_file {
                return Err(AgentError::Disk {
                    disk: disk.id.clone(),
                    problem: format!(
                        "is already {} in datastore {:?}: a move onto the same file is refused",
                        from_path.display(),
                        plan.to_datastore
                    ),
                });
            }
            if to_path.exists() {
                return Err(AgentError::Disk {
                    disk: disk.id.clone(),
                    problem: format!(
                        "the target {} already exists; refusing to overwrite it",
                        to_path.display()
                    ),
                });
            }
            let virtual_size_bytes =
                disks::virtual_size(&from_path, disk.format).map_err(|source| {
                    AgentError::DiskIo {
                        disk: disk.id.clone(),
                        action: "reading the disk's size",
                        source,
                    }
                })?;
            moves.push(DiskMoveRecord {
                disk_id: disk.id.clone(),
                from_datastore: match &disk.source {
                    DiskSource::Datastore { datastore, .. } => Some(datastore.clone()),
                    DiskSource::Path { .. } => None,
                },
                from_path,
                from_format: disk.format,
                to_datastore: plan.to_datastore.clone(),
                to_file,
                to_path,
                to_format: plan.format,
                virtual_size_bytes,
                source_node: String::new(),
                target_node: String::new(),
                target_file_node: String::new(),
            });
        }
        self.check_space(&moves)?;
        Ok(moves)
    }

    /// Each target datastore has room for what lands on it: the sources'
    /// allocated bytes (the targets are thin, like the sources: a mirror and
    /// `qemu-img convert` skip zeroes) plus a margin.
    fn check_space(&self, moves: &[DiskMoveRecord]) -> Result<(), AgentError> {
        let mut datastores: Vec<&str> = moves.iter().map(|m| m.to_datastore.as_str()).collect();
        datastores.sort();
        datastores.dedup();
        for datastore in datastores {
            let folder = &self.host.config.datastores[datastore];
            let mut needed = 0;
            for m in moves.iter().filter(|m| m.to_datastore == datastore) {
                let allocated =
                    disks::allocated_bytes(&m.from_path).map_err(|source| AgentError::DiskIo {
                        disk: m.disk_id.clone(),
                        action: "reading the disk's allocated size",
                        source,
                    })?;
                needed +=
                    allocated.min(m.virtual_size_bytes + SPACE_MARGIN_BYTES) + SPACE_MARGIN_BYTES;
            }
            self.ensure_room(
                datastore,
                folder,
                needed,
                "the allocated size of the disks moved there, plus 8 MiB each",
            )?;
        }
        Ok(())
    }

    /// Whether work on the VM's disks (a storage move, a backup) may start
    /// now — one at a time, never during a migration — and whether the
    /// guest runs (then QEMU does the work, else qemu-img).
    pub(super) fn disk_work_may_start(&mut self, action: &'static str) -> Result<bool, AgentError> {
        if self.record.storage_move.is_some() {
            return Err(self.storage_error("a storage move is in progress"));
        }
        if self.backup_in_progress() {
            return Err(self.storage_error("a backup is in progress"));
        }
        if self.record.outgoing.is_some()
            || self.record.incoming.is_some()
            || self.record.departing.is_some()
        {
            return Err(self.storage_error("it is migrating"));
        }
        match self.state {
            VmState::Running | VmState::Paused => Ok(true),
            VmState::Stopped | VmState::Crashed => Ok(false),
            _ => Err(self.wrong_state(action, "running, paused or stopped")),
        }
    }

    /// Refuses work that needs `needed` bytes on a datastore with less free.
    pub(super) fn ensure_room(
        &self,
        datastore: &str,
        folder: &Path,
        needed: u64,
        why: &str,
    ) -> Result<(), AgentError> {
        let free = disks::free_bytes(folder).map_err(|source| AgentError::DiskIo {
            disk: datastore.to_string(),
            action: "reading the datastore's free space",
            source,
        })?;
        if free < needed {
            return Err(AgentError::NoSpace {
                datastore: datastore.to_string(),
                host: self.host.config.host_name.clone(),
                free: ferry_core::units::format_size_human(free),
                needed: ferry_core::units::format_size_human(needed),
                why: why.to_string(),
            });
        }
        Ok(())
    }

    fn move_status(&self, record: &StorageMoveRecord, phase: &str) -> DiskMoveStatus {
        DiskMoveStatus {
            move_id: record.move_id,
            phase: phase.to_string(),
            live: record.live,
            total_bytes: record.disks.iter().map(|d| d.virtual_size_bytes).sum(),
            done_bytes: 0,
            disks: record.disks.iter().map(|d| outcome(d, false)).collect(),
            paused_ms: None,
            verify_ms: None,
            verified: false,
            error: None,
        }
    }

    /// Starts a move; it goes on by itself (`storage_move_advance`).
    pub(super) async fn storage_move_start(
        &mut self,
        request: DiskMoveRequest,
    ) -> Result<DiskMoveStatus, AgentError> {
        let live = self.disk_work_may_start("a storage move")?;
        let mut disks = self.plan_storage_move(&request.disks)?;
        if request.check_only {
            let record = StorageMoveRecord {
                move_id: request.move_id,
                live,
                disks,
                switched: false,
            };
            return Ok(self.move_status(&record, "checked"));
        }
        if live {
            let qmp = self.qmp_for("storage move")?;
            for disk in &mut disks {
                let backing = storage::disk_backing(&qmp, &disk.disk_id)
                    .await
                    .map_err(|e| {
                        self.storage_error(format!(
                            "disk {}: {}",
                            disk.disk_id,
                            crate::error::chain(&e)
                        ))
                    })?;
                if backing.file != disk.from_path {
                    return Err(self.storage_error(format!(
                        "disk {}: QEMU uses {} but the VM's spec says {}",
                        disk.disk_id,
                        backing.file.display(),
                        disk.from_path.display()
                    )));
                }
                let (target_node, target_file_node) =
                    storage::move_node_names(&disk.disk_id, &backing.node_name);
                disk.source_node = backing.node_name;
                disk.target_node = target_node;
                disk.target_file_node = target_file_node;
            }
        }
        let record = StorageMoveRecord {
            move_id: request.move_id,
            live,
            disks,
            switched: false,
        };
        // Recorded before any file exists: a crash from here on is settled
        // from the record.
        self.record.storage_move = Some(record.clone());
        self.persist()?;
        self.storage.started = Some(Instant::now());
        let begun = if live {
            self.begin_mirrors(&record, request.bandwidth_bytes_per_sec)
                .await
        } else {
            self.begin_offline_copy(&record).await
        };
        if let Err(error) = begun {
            self.roll_back_move(&record).await;
            return Err(error);
        }
        let status = self.move_status(&record, "copying");
        info!(vm = self.name(), move_id = %record.move_id, live, disks = record.disks.len(), "storage move started");
        self.storage.last = Some(status.clone());
        Ok(status)
    }

    fn qmp_for(&self, what: &str) -> Result<ferry_qemu::qmp::Qmp, AgentError> {
        self.attached
            .as_ref()
            .map(|a| a.qmp.clone())
            .ok_or_else(|| {
                self.storage_error(format!("its QEMU is not attached; cannot do a {what}"))
            })
    }

    async fn begin_mirrors(
        &mut self,
        record: &StorageMoveRecord,
        bandwidth: Option<u64>,
    ) -> Result<(), AgentError> {
        let qmp = self.qmp_for("storage move")?;
        for disk in &record.disks {
            qemu_img_create(
                &self.host.qemu_img,
                &disk.to_path,
                disk.to_format,
                disk.virtual_size_bytes,
            )
            .await
            .map_err(|e| self.storage_error(format!("disk {}: {e}", disk.disk_id)))?;
            storage::blockdev_add_image(&qmp, &target_node(disk))
                .await
                .map_err(|e| {
                    self.storage_error(format!(
                        "disk {}: opening the target in QEMU: {}",
                        disk.disk_id,
                        crate::error::chain(&e)
                    ))
                })?;
            let job = MirrorJob {
                job_id: move_job_id(&disk.disk_id),
                device: disk.source_node.clone(),
                target: disk.target_node.clone(),
                copy_mode: CopyMode::WriteBlocking,
                speed: bandwidth,
            };
            blockjob::blockdev_mirror(&qmp, &job).await.map_err(|e| {
                self.storage_error(format!(
                    "disk {}: starting the mirror: {}",
                    disk.disk_id,
                    crate::error::chain(&e)
                ))
            })?;
        }
        Ok(())
    }

    async fn begin_offline_copy(&mut self, record: &StorageMoveRecord) -> Result<(), AgentError> {
        let (done_tx, done) = oneshot::channel();
        let qemu_img = self.host.qemu_img.clone();
        let disks = record.disks.clone();
        tokio::spawn(async move {
            let _ = done_tx.send(offline_copy(qemu_img, disks).await);
        });
        self.storage.offline = Some(OfflineCopy { done });
        Ok(())
    }

    /// Undoes a move that has not switched: mirrors cancelled, target nodes
    /// and files removed, record cleared. Each part tolerates having been
    /// done already.
    async fn roll_back_move(&mut self, record: &StorageMoveRecord) {
        self.storage.offline = None;
        if let Some(attached) = &self.attached {
            let qmp = attached.qmp.clone();
            for disk in &record.disks {
                if let Err(error) =
                    blockjob::force_cancel(&qmp, &move_job_id(&disk.disk_id), CANCEL_TIMEOUT).await
                {
                    warn!(vm = self.name(), disk = %disk.disk_id, error = %crate::error::chain(&error), "cannot cancel the move's mirror");
                }
                if !disk.target_node.is_empty() {
                    if let Err(error) = storage::blockdev_del_image(&qmp, &target_node(disk)).await
                    {
                        warn!(vm = self.name(), disk = %disk.disk_id, error = %crate::error::chain(&error), "cannot close the move's target");
                    }
                }
            }
        }
        for disk in &record.disks {
            match std::fs::remove_file(&disk.to_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    warn!(vm = self.name(), path = %disk.to_path.display(), %error, "cannot remove the move's target file")
                }
            }
        }
        self.record.storage_move = None;
        self.persist_or_warn();
    }

    /// Progress of the current move, or the last one's outcome.
    pub(super) async fn storage_move_status(&mut self) -> Result<DiskMoveStatus, AgentError> {
        let Some(record) = self.record.storage_move.clone() else {
            return self.storage.last.clone().ok_or_else(|| {
                self.storage_error("no storage move was started since the agent started")
            });
        };
        let mut status = self
            .storage
            .last
            .clone()
            .filter(|s| s.move_id == record.move_id)
            .unwrap_or_else(|| self.move_status(&record, "copying"));
        if record.live {
            if let Some(attached) = &self.attached {
                let jobs: Vec<String> = record
                    .disks
                    .iter()
                    .map(|d| move_job_id(&d.disk_id))
                    .collect();
                if let Ok((done, total)) = storage::jobs_progress(&attached.qmp, &jobs).await {
                    status.done_bytes = done;
                    status.total_bytes = total.max(status.total_bytes);
                }
            }
        } else {
            status.done_bytes = record
                .disks
                .iter()
                .map(|d| {
                    disks::allocated_bytes(&d.to_path)
                        .unwrap_or(0)
                        .min(d.virtual_size_bytes)
                })
                .sum();
        }
        Ok(status)
    }

    /// Cancels a move that has not switched yet.
    pub(super) async fn storage_move_cancel(&mut self) -> Result<DiskMoveStatus, AgentError> {
        let Some(record) = self.record.storage_move.clone() else {
            return self
                .storage
                .last
                .clone()
                .ok_or_else(|| self.storage_error("no storage move in progress"));
        };
        if record.switched {
            return Err(self.storage_error(
                "the move has switched to the new files; it can no longer be cancelled",
            ));
        }
        self.roll_back_move(&record).await;
        let mut status = self.move_status(&record, "cancelled");
        status.error = Some("cancelled".into());
        info!(vm = self.name(), move_id = %record.move_id, "storage move cancelled");
        self.storage.last = Some(status.clone());
        Ok(status)
    }

    fn fail_move(&mut self, record: &StorageMoveRecord, error: String) {
        warn!(vm = self.name(), move_id = %record.move_id, %error, "storage move failed");
        let mut status = self.move_status(record, "failed");
        status.error = Some(error);
        self.storage.last = Some(status);
    }

    /// Moves the current move on: called on block job events and on every
    /// liveness tick.
    pub(super) async fn storage_move_advance(&mut self) {
        let Some(record) = self.record.storage_move.clone() else {
            return;
        };
        if record.switched {
            self.finish_move(&record, None, None).await;
            return;
        }
        if !record.live {
            self.advance_offline(&record).await;
            return;
        }
        let Some(attached) = &self.attached else {
            // QEMU is gone (crashed): the guest's disks are the old ones.
            self.roll_back_move(&record).await;
            self.fail_move(
                &record,
                "QEMU ended during the storage move; the VM keeps its old disks".into(),
            );
            return;
        };
        let qmp = attached.qmp.clone();
        let jobs = match blockjob::query_block_jobs(&qmp).await {
            Ok(jobs) => jobs,
            Err(error) => {
                warn!(vm = self.name(), error = %crate::error::chain(&error), "query-block-jobs failed");
                return;
            }
        };
        let mut all_ready = true;
        for disk in &record.disks {
            let id = move_job_id(&disk.disk_id);
            match jobs.iter().find(|j| j.device == id) {
                Some(job) if job.io_status != "ok" || job.error.is_some() => {
                    let error = format!(
                        "disk {}: the copy to {} hit an I/O error ({}{}); the VM keeps its old disks",
                        disk.disk_id,
                        disk.to_path.display(),
                        job.io_status,
                        job.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                    );
                    self.roll_back_move(&record).await;
                    self.fail_move(&record, error);
                    return;
                }
                Some(job) if job.ready => {}
                Some(_) => all_ready = false,
                None => {
                    let error = format!(
                        "disk {}: the copy to {} ended before it was complete (see the agent's log); the VM keeps its old disks",
                        disk.disk_id,
                        disk.to_path.display()
                    );
                    self.roll_back_move(&record).await;
                    self.fail_move(&record, error);
                    return;
                }
            }
        }
        if all_ready {
            self.switch_over(&record).await;
        }
    }

    async fn advance_offline(&mut self, record: &StorageMoveRecord) {
        let Some(copy) = &mut self.storage.offline else {
            // The agent restarted during the conversion: start over is the
            // user's call; undo.
            self.roll_back_move(record).await;
            self.fail_move(
                record,
                "the agent restarted during the copy; the VM keeps its old disks".into(),
            );
            return;
        };
        let result = match copy.done.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => return,
            Err(oneshot::error::TryRecvError::Closed) => {
                Err("the copy task ended without an answer".to_string())
            }
            Ok(result) => result,
        };
        self.storage.offline = None;
        match result {
            Ok(_) => {
                let verify_ms = None;
                self.switch_files(record).await;
                if let Some(record) = self.record.storage_move.clone() {
                    self.finish_move(&record, None, verify_ms).await;
                }
            }
            Err(error) => {
                self.roll_back_move(record).await;
                self.fail_move(record, format!("{error}; the VM keeps its old disks"));
            }
        }
    }

    /// The switchover of a live move: pause, end the mirrors without
    /// pivoting (each target is then an exact copy), close the targets (so
    /// their files are flushed) and compare them with the sources, and only
    /// if every disk matches reopen them and pivot through a mirror of new
    /// writes (nothing to copy: the guest is paused); then resume. A full
    /// mirror's target cannot be read while the job runs, hence the two
    /// mirrors.
    async fn switch_over(&mut self, record: &StorageMoveRecord) {
        let Some(attached) = &self.attached else {
            return;
        };
        let qmp = attached.qmp.clone();
        if let Some(last) = &mut self.storage.last {
            last.phase = "switching".into();
        }
        let was_running = self.state == VmState::Running;
        let paused_at = Instant::now();
        if was_running {
            if let Err(error) = qmp.execute("stop", serde_json::Value::Null).await {
                // Not paused, not verified: try again at the next tick.
                warn!(vm = self.name(), error = %crate::error::chain(&error), "cannot pause the guest for the switchover");
                return;
            }
        }
        let name = self.name().to_string();
        let resume = |qmp: ferry_qemu::qmp::Qmp| async move {
            if was_running {
                if let Err(error) = qmp.execute("cont", serde_json::Value::Null).await {
                    warn!(vm = %name, error = %crate::error::chain(&error), "cannot resume the guest after the switchover");
                }
            }
        };
        let jobs: Vec<String> = record
            .disks
            .iter()
            .map(|d| move_job_id(&d.disk_id))
            .collect();
        let verify_started = Instant::now();
        let verified = self.verify_targets(&qmp, record, &jobs).await;
        let verify_ms = verify_started.elapsed().as_millis() as u64;
        if let Err(error) = verified {
            self.roll_back_move(record).await;
            resume(qmp).await;
            self.fail_move(
                record,
                format!("{error}; the move was rolled back and the VM keeps its old disks"),
            );
            if let Some(last) = &mut self.storage.last {
                last.verify_ms = Some(verify_ms);
                last.paused_ms = was_running.then(|| paused_at.elapsed().as_millis() as u64);
            }
            return;
        }
        if let Err(error) = self.pivot_to_targets(&qmp, record, &jobs).await {
            // Settle per disk from what QEMU uses now: a disk that pivoted
            // keeps its new file, the others roll back.
            warn!(vm = self.name(), %error, "pivot failed; settling each disk");
            self.storage_move_settle().await;
            resume(qmp).await;
            self.fail_move(
                record,
                format!("switching to the new files failed: {error}"),
            );
            return;
        }
        resume(qmp).await;
        let paused_ms = paused_at.elapsed().as_millis() as u64;
        info!(vm = self.name(), move_id = %record.move_id, paused_ms, verify_ms, "storage move switched over");
        self.switch_files(record).await;
        if let Some(record) = self.record.storage_move.clone() {
            self.finish_move(&record, was_running.then_some(paused_ms), Some(verify_ms))
                .await;
        }
    }

    /// With the guest paused: ends the full mirrors without pivoting,
    /// closes the targets and compares each with its source.
    async fn verify_targets(
        &self,
        qmp: &ferry_qemu::qmp::Qmp,
        record: &StorageMoveRecord,
        jobs: &[String],
    ) -> Result<(), String> {
        blockjob::complete_mirrors(qmp, jobs, PIVOT_TIMEOUT)
            .await
            .map_err(|e| format!("ending the copies: {}", crate::error::chain(&e)))?;
        for disk in &record.disks {
            storage::blockdev_del_image(qmp, &target_node(disk))
                .await
                .map_err(|e| {
                    format!(
                        "disk {}: closing the copy: {}",
                        disk.disk_id,
                        crate::error::chain(&e)
                    )
                })?;
        }
        for disk in &record.disks {
            corrupt_copy_failpoint(&disk.to_path);
            match compare(
                &self.host.qemu_img,
                (&disk.from_path, disk.from_format),
                (&disk.to_path, disk.to_format),
            )
            .await
            {
                Ok(None) => {}
                Ok(Some(why)) => {
                    return Err(format!(
                        "disk {}: verification failed, {} differs from {}: {why}",
                        disk.disk_id,
                        disk.to_path.display(),
                        disk.from_path.display()
                    ))
                }
                Err(error) => {
                    return Err(format!(
                        "disk {}: cannot verify the copy: {error}",
                        disk.disk_id
                    ))
                }
            }
        }
        Ok(())
    }

    /// With the guest paused and every target verified: reopens the
    /// targets and switches each device onto its target.
    async fn pivot_to_targets(
        &self,
        qmp: &ferry_qemu::qmp::Qmp,
        record: &StorageMoveRecord,
        jobs: &[String],
    ) -> Result<(), String> {
        for disk in &record.disks {
            storage::blockdev_add_image(qmp, &target_node(disk))
                .await
                .map_err(|e| {
                    format!(
                        "disk {}: reopening the copy: {}",
                        disk.disk_id,
                        crate::error::chain(&e)
                    )
                })?;
            storage::mirror_new_writes(
                qmp,
                &move_job_id(&disk.disk_id),
                &disk.source_node,
                &disk.target_node,
            )
            .await
            .map_err(|e| format!("disk {}: {}", disk.disk_id, crate::error::chain(&e)))?;
        }
        blockjob::wait_ready(qmp, jobs, PIVOT_TIMEOUT)
            .await
            .map_err(|e| crate::error::chain(&e))?;
        storage::pivot_mirrors(qmp, jobs, PIVOT_TIMEOUT)
            .await
            .map_err(|e| crate::error::chain(&e))
    }

    /// After the pivot (or a verified offline copy): the old nodes are
    /// closed, the spec names the new files, and the record says so —
    /// persisted before any old file is deleted.
    async fn switch_files(&mut self, record: &StorageMoveRecord) {
        if let Some(attached) = &self.attached {
            let qmp = attached.qmp.clone();
            for disk in record.disks.iter().filter(|d| !d.source_node.is_empty()) {
                let mut nodes = vec![disk.source_node.clone()];
                nodes.extend(storage::file_node_for_root(
                    &disk.disk_id,
                    &disk.source_node,
                ));
                for node in nodes {
                    if let Err(error) = blockjob::blockdev_del(&qmp, &node).await {
                        warn!(vm = self.name(), %node, error = %crate::error::chain(&error), "cannot close the old disk node");
                    }
                }
            }
        }
        self.apply_move_to_spec(&record.disks);
        if let Some(current) = &mut self.record.storage_move {
            current.switched = true;
        }
        self.persist_or_warn();
    }

    /// The spec and the created-files list name each disk's new file.
    fn apply_move_to_spec(&mut self, moved: &[DiskMoveRecord]) {
        for m in moved {
            if let Some(disk) = self
                .record
                .spec
                .disks
                .iter_mut()
                .find(|d| d.id == m.disk_id)
            {
                disk.source = DiskSource::Datastore {
                    datastore: m.to_datastore.clone(),
                    file: m.to_file.clone(),
                };
                disk.format = m.to_format;
            }
            self.record.created_files.retain(|f| f != &m.from_path);
            if !self.record.created_files.contains(&m.to_path) {
                self.record.created_files.push(m.to_path.clone());
            }
        }
    }

    /// The last step: old files deleted, record cleared, status completed.
    async fn finish_move(
        &mut self,
        record: &StorageMoveRecord,
        paused_ms: Option<u64>,
        verify_ms: Option<u64>,
    ) {
        for disk in &record.disks {
            match std::fs::remove_file(&disk.from_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    warn!(vm = self.name(), path = %disk.from_path.display(), %error, "cannot remove the old disk file")
                }
            }
        }
        self.record.storage_move = None;
        self.persist_or_warn();
        let mut status = self.move_status(record, "completed");
        status.disks = record.disks.iter().map(|d| outcome(d, true)).collect();
        status.done_bytes = status.total_bytes;
        status.verified = true;
        status.paused_ms = paused_ms;
        status.verify_ms = verify_ms;
        info!(vm = self.name(), move_id = %record.move_id, "storage move completed");
        self.storage.last = Some(status);
    }

    /// After an agent restart (or a failed pivot): settles a move from what
    /// QEMU uses now. A disk whose device reads its target keeps it; every
    /// other disk goes back to its old file.
    pub(super) async fn storage_move_settle(&mut self) {
        let Some(record) = self.record.storage_move.clone() else {
            return;
        };
        if record.switched {
            self.finish_move(&record, None, None).await;
            return;
        }
        if !record.live || self.attached.is_none() {
            // A stopped VM's copy (its task is gone) or a QEMU that ended:
            // the spec still names the old files, which are whole.
            info!(vm = self.name(), move_id = %record.move_id, "undoing a storage move the agent restart interrupted");
            self.roll_back_move(&record).await;
            self.fail_move(
                &record,
                "interrupted by an agent restart; the VM keeps its old disks".into(),
            );
            return;
        }
        let qmp = self
            .attached
            .as_ref()
            .map(|a| a.qmp.clone())
            .expect("checked above");
        let mut pivoted = Vec::new();
        let mut rolled_back = Vec::new();
        for disk in &record.disks {
            match storage::disk_backing(&qmp, &disk.disk_id).await {
                Ok(backing) if backing.file == disk.to_path => pivoted.push(disk.clone()),
                Ok(_) => rolled_back.push(disk.clone()),
                Err(error) => {
                    warn!(vm = self.name(), disk = %disk.disk_id, error = %crate::error::chain(&error), "cannot tell which file the disk uses; will retry");
                    return;
                }
            }
        }
        if !rolled_back.is_empty() {
            let partial = StorageMoveRecord {
                disks: rolled_back.clone(),
                ..record.clone()
            };
            self.roll_back_move(&partial).await;
        }
        if pivoted.is_empty() {
            self.fail_move(
                &record,
                "interrupted before the switchover; the VM keeps its old disks".into(),
            );
            return;
        }
        let done = StorageMoveRecord {
            disks: pivoted,
            ..record.clone()
        };
        self.record.storage_move = Some(done.clone());
        self.switch_files(&done).await;
        self.finish_move(&done, None, None).await;
        if !rolled_back.is_empty() {
            self.fail_move(
                &record,
                format!(
                    "only some disks switched: {} moved, {} kept their old files",
                    done.disks
                        .iter()
                        .map(|d| d.disk_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    rolled_back
                        .iter()
                        .map(|d| d.disk_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_take_the_new_format_extension() {
        assert_eq!(
            target_file_name(Path::new("/d/demo.qcow2"), DiskFormat::Raw),
            "demo.raw"
        );
        assert_eq!(
            target_file_name(Path::new("/d/demo.raw"), DiskFormat::Qcow2),
            "demo.qcow2"
        );
        assert_eq!(
            target_file_name(Path::new("/d/demo.img"), DiskFormat::Raw),
            "demo.raw"
        );
        assert_eq!(
            target_file_name(Path::new("/d/demo"), DiskFormat::Raw),
            "demo.raw"
        );
        assert_eq!(
            target_file_name(Path::new("/d/a.b.qcow2"), DiskFormat::Qcow2),
            "a.b.qcow2"
        );
    }
}

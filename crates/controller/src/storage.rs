//! Storage work the controller coordinates: storage moves (disks to another
//! datastore of the VM's host) and offline migrations (a stopped VM to
//! another host). Both are recorded in the store as migrations (`kind`), so
//! `ferry migration show|list|cancel` and the recovery at start cover them.
//!
//! * A **storage move** is the agent's work from start to end (mirror,
//!   verification, pivot, clean-up: `ferry-agent`'s `vm/storage.rs`): the
//!   controller takes the backup first when asked, starts the move, watches
//!   it and writes the report. A restarted controller only has to watch
//!   again.
//! * An **offline migration** is driven from here:
//!
//! ```text
//!  backup ─▶ mark the source departing ─▶ per disk: digest on the source,
//!  (default)   (it cannot start)            stream source ─▶ destination (partial file),
//!                                           digest of what arrived == source's
//!     ─▶ define on the destination (the partials are checked again and renamed:
//!        the commit) ─▶ owner := destination ─▶ delete the VM and its files on the source
//! ```
//!
//! Before the define, any failure discards the partial files and clears the
//! mark: the VM stays where it was, whole. After it, the source is only
//! cleaned up (retried by recovery).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::{
    BackupRequest, Client, CreateVmRequest, DiskMoveOutcome, DiskMovePlan, DiskMoveRequest,
    DiskMoveStatus, DryRunReport, FileDigest, MigrateAnswer, MigrateRequest, MigrationKind,
    MigrationReport, MigrationStatus, PhaseTiming, Prediction, PreflightCheck, Progress,
    StorageMode, StorageMoveRequest, Strategy, Verification, VmInfo, VmState,
};
use ferry_core::spec::{DiskSource, VmSpec};
use futures::StreamExt;
use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;

use crate::controller::{unix_now, unix_now_ms, Controller, ControllerError};
use crate::migrate::{end_report, persist_migration};
use crate::store::{self, MigrationRecord, StoreError, VmRecord};

/// How often a storage move's progress is asked for.
const POLL: Duration = Duration::from_millis(250);
/// How often an offline copy's report is written while bytes flow.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// How a check went, in the dry-run report's terms.
fn check(name: &str, ok: bool, detail: impl Into<String>) -> PreflightCheck {
    PreflightCheck {
        name: name.to_string(),
        ok,
        detail: detail.into(),
    }
}

fn new_report(
    id: Uuid,
    kind: MigrationKind,
    vm: &str,
    source: &str,
    destination: &str,
    strategy: Strategy,
) -> MigrationReport {
    MigrationReport::new(id, kind, vm, (source, destination), strategy, unix_now_ms())
}

/// A storage move or offline migration being run (or watched) by this
/// controller: its record and report, persisted at each change.
pub(crate) struct StorageJob {
    controller: Arc<Controller>,
    record: MigrationRecord,
    report: MigrationReport,
    started: Instant,
    phase_started: Instant,
    cancel: watch::Receiver<bool>,
}

impl StorageJob {
    async fn enter(&mut self, phase: &str) {
        let now_ms = self.started.elapsed().as_millis() as u64;
        if let Some(last) = self.report.phases.last_mut() {
            last.duration_ms = self.phase_started.elapsed().as_millis() as u64;
        }
        self.report.phases.push(PhaseTiming {
            phase: phase.to_string(),
            started_ms: now_ms,
            duration_ms: 0,
        });
        self.phase_started = Instant::now();
        self.report.phase = phase.to_string();
        self.record.phase = phase.to_string();
        self.persist().await;
    }

    async fn persist(&mut self) {
        persist_migration(
            self.controller.store.as_ref(),
            &mut self.record,
            &mut self.report,
            self.started,
        )
        .await;
    }

    async fn finish(&mut self, status: MigrationStatus, error: Option<String>) {
        end_report(&mut self.report, self.phase_started, status, error);
        self.report.progress = None;
        self.persist().await;
        self.controller.running.lock().await.remove(&self.record.id);
        info!(migration = %self.record.id, kind = self.report.kind.as_str(), vm = %self.report.vm, %status, "storage job ended");
    }

    fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }
}

impl Controller {
    /// Records a new storage job and registers its cancel signal. Atomic
    /// with the "one active migration per VM" rule.
    async fn begin_job(
        self: &Arc<Self>,
        report: MigrationReport,
        options: serde_json::Value,
        vm: &VmInfo,
        host: &str,
    ) -> Result<StorageJob, ControllerError> {
        self.remember_vm(vm, host).await?;
        let now = unix_now();
        let record = MigrationRecord {
            id: report.id,
            vm: report.vm.clone(),
            source: report.source.clone(),
            destination: report.destination.clone(),
            status: store::MigrationStatus::Running,
            phase: "preflight".to_string(),
            options,
            steps: Vec::new(),
            report: serde_json::to_value(&report).unwrap_or_default(),
            error: None,
            created_at: now,
            updated_at: now,
            generation: 0,
        };
        let generation = match self.store.create_migration(&record).await {
            Ok(generation) => generation,
            Err(StoreError::Conflict { .. }) => {
                return Err(ControllerError::Refused {
                    reason: format!("VM {:?} is already migrating", report.vm),
                })
            }
            Err(error) => return Err(error.into()),
        };
        let (cancel_tx, cancel) = watch::channel(false);
        self.running.lock().await.insert(report.id, cancel_tx);
        Ok(StorageJob {
            controller: self.clone(),
            record: MigrationRecord {
                generation,
                ..record
            },
            report,
            started: Instant::now(),
            phase_started: Instant::now(),
            cancel,
        })
    }

    /// The store learns VMs from the agents; make sure it has this one on
    /// the host that runs it (if the store disagrees, what runs wins).
    pub(crate) async fn remember_vm(&self, vm: &VmInfo, host: &str) -> Result<(), ControllerError> {
        let record = VmRecord {
            name: vm.name.clone(),
            uuid: vm.uuid,
            host: host.to_string(),
            generation: 0,
            spec: serde_json::to_value(&vm.spec).unwrap_or_default(),
            state: vm.state.to_string(),
        };
        match self.store.put_vm_if_absent(&record).await {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) => {
                let known = self.store.get_vm(&vm.name).await?;
                if known.host != host {
                    warn!(vm = %vm.name, store = %known.host, runs_on = %host, "store disagreed with the agents; correcting");
                    self.store
                        .set_vm_owner(&vm.name, known.generation, host)
                        .await?;
                }
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    // ---- storage moves ----

    /// Checks and starts a storage move; it runs on (`ferry migration
    /// show ID` follows it).
    pub async fn storage_move(
        self: &Arc<Self>,
        request: StorageMoveRequest,
    ) -> Result<MigrationReport, ControllerError> {
        let invalid = |reason: String| ControllerError::InvalidRequest { reason };
        let (host, vm) = self.locate_vm(&request.vm).await?;
        let ids: Vec<String> = match (request.all_disks, request.disks.is_empty()) {
            (true, false) => {
                return Err(invalid(
                    "name disks (--disk) or ask for all of them (--all-disks), not both".into(),
                ))
            }
            (false, true) => {
                return Err(invalid(
                    "name the disks to move (--disk ID) or ask for --all-disks".into(),
                ))
            }
            (true, true) => vm.spec.disks.iter().map(|d| d.id.clone()).collect(),
            (false, false) => request.disks.clone(),
        };
        let mut plans = Vec::new();
        for id in &ids {
            let disk = vm.spec.disks.iter().find(|d| &d.id == id).ok_or_else(|| {
                invalid(format!(
                    "VM {:?} has no disk {id:?} (its disks: {})",
                    vm.name,
                    disk_ids(&vm.spec)
                ))
            })?;
            plans.push(DiskMovePlan {
                disk_id: id.clone(),
                to_datastore: request.to_datastore.clone(),
                format: request.format.unwrap_or(disk.format),
            });
        }
        let agent = self.agent(&host).await?;
        let info = agent
            .host()
            .await
            .map_err(|source| ControllerError::Unreachable {
                name: host.clone(),
                source,
            })?;
        if !info
            .datastores
            .iter()
            .any(|d| d.name == request.to_datastore)
        {
            return Err(invalid(format!(
                "host {host} has no datastore {:?} (its datastores: {})",
                request.to_datastore,
                info.datastores
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let strategy = Strategy {
            storage: StorageMode::Copy,
            max_bandwidth_bytes_per_sec: request.bandwidth_bytes_per_sec.unwrap_or(0),
            ..Strategy::default()
        };
        let mut report = new_report(
            Uuid::new_v4(),
            MigrationKind::Storage,
            &vm.name,
            &host,
            &host,
            strategy,
        );
        report.accel = vm.accel.clone();
        report.disk_bytes = vm
            .disks
            .iter()
            .filter(|d| ids.contains(&d.id))
            .map(|d| d.virtual_size_bytes)
            .sum();
        // The agent's checks (room, same file, target exists) first, so that
        // a move that cannot work is refused with nothing recorded.
        let check = DiskMoveRequest {
            move_id: report.id,
            disks: plans.clone(),
            bandwidth_bytes_per_sec: request.bandwidth_bytes_per_sec,
            check_only: true,
        };
        agent
            .agent_storage_move(&vm.name, &check)
            .await
            .map_err(|e| agent_error(&host, e))?;
        let options = serde_json::to_value(&request).unwrap_or_default();
        let mut job = self.begin_job(report.clone(), options, &vm, &host).await?;
        info!(migration = %report.id, vm = %vm.name, %host, to = %request.to_datastore, disks = ?ids, "storage move started");
        if request.backup {
            tokio::spawn(job.run_storage_move(request, plans, agent));
            return Ok(report);
        }
        // Without a backup first the agent's checks (room, same file,
        // target exists) answer this very request.
        job.enter("copying").await;
        if let Err(error) = job.start_agent_move(&request, plans, &agent).await {
            let message = chain(&error);
            job.finish(MigrationStatus::Failed, Some(message)).await;
            return Err(agent_error(&host, error));
        }
        tokio::spawn(async move { job.watch_storage_move(&agent).await });
        Ok(report)
    }

    // ---- offline migration ----

    /// `ferry migrate --offline`: checks (all of them, for the dry run),
    /// then starts the copy.
    pub(crate) async fn migrate_offline(
        self: &Arc<Self>,
        request: MigrateRequest,
    ) -> Result<MigrateAnswer, ControllerError> {
        let (source, vm) = self.locate_vm(&request.vm).await?;
        if request.to == source {
            return Err(ControllerError::InvalidRequest {
                reason: format!("VM {:?} is already on host {source}", vm.name),
            });
        }
        let destination = self.agent(&request.to).await?;
        let (checks, networks) = self.offline_checks(&vm, &request.to, &destination).await;
        let ok = checks.iter().all(|c| c.ok);
        let disk_bytes: u64 = vm.disks.iter().map(|d| d.allocated_bytes).sum();
        let dry_run = DryRunReport {
            vm: vm.name.clone(),
            source: source.clone(),
            destination: request.to.clone(),
            storage: StorageMode::Copy,
            ok,
            checks: checks.clone(),
            prediction: Some(Prediction {
                ram_bytes: 0,
                disk_bytes,
                basis:
                    "offline: the disk files' allocated bytes are copied over the agents' HTTPS \
                        API and checked by SHA-256 on both hosts; the VM is stopped throughout"
                        .into(),
                converges: true,
                ..Prediction::default()
            }),
        };
        if request.dry_run {
            return Ok(MigrateAnswer::DryRun(dry_run));
        }
        if !ok {
            let failed: Vec<String> = checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.name, c.detail))
                .collect();
            return Err(ControllerError::Refused {
                reason: failed.join("; "),
            });
        }
        let strategy = Strategy {
            storage: StorageMode::Copy,
            ..Strategy::default()
        };
        let mut report = new_report(
            Uuid::new_v4(),
            MigrationKind::Offline,
            &vm.name,
            &source,
            &request.to,
            strategy,
        );
        report.disk_bytes = vm.disks.iter().map(|d| d.virtual_size_bytes).sum();
        let options = serde_json::to_value(&request).unwrap_or_default();
        let job = self
            .begin_job(report.clone(), options, &vm, &source)
            .await?;
        let src = self.agent(&source).await?;
        let backup = request.backup.unwrap_or(true);
        info!(migration = %report.id, vm = %vm.name, from = %source, to = %request.to, backup, "offline migration started");
        tokio::spawn(job.run_offline(vm, src, destination, networks, backup));
        Ok(MigrateAnswer::Started(Box::new(report)))
    }

    /// Every check of an offline migration, and the VM's networks.
    async fn offline_checks(
        &self,
        vm: &VmInfo,
        to: &str,
        destination: &Client,
    ) -> (Vec<PreflightCheck>, Vec<ferry_core::network::NetworkDef>) {
        let mut checks = Vec::new();
        let stopped = matches!(vm.state, VmState::Stopped | VmState::Crashed);
        checks.push(check(
            "vm_stopped",
            stopped,
            if stopped {
                format!("VM is {}", vm.state)
            } else {
                format!(
                    "VM is {}: an offline migration moves a stopped VM (stop it, or migrate it live without --offline)",
                    vm.state
                )
            },
        ));
        let info = match destination.host().await {
            Ok(info) => info,
            Err(error) => {
                checks.push(check(
                    "destination_reachable",
                    false,
                    format!(
                        "host {to} does not answer: {}",
                        ferry_api::error_chain(&error)
                    ),
                ));
                return (checks, Vec::new());
            }
        };
        checks.push(check(
            "destination_reachable",
            true,
            format!("host {to} answers"),
        ));
        let mut room_ok = true;
        let mut details = Vec::new();
        for disk in &vm.spec.disks {
            let allocated = vm
                .disks
                .iter()
                .find(|d| d.id == disk.id)
                .map(|d| d.allocated_bytes)
                .unwrap_or(0);
            match &disk.source {
                DiskSource::Datastore { datastore, .. } => {
                    match info.datastores.iter().find(|d| &d.name == datastore) {
                        Some(d) if d.free_bytes >= allocated + (8 << 20) => details.push(format!(
                            "disk {} → datastore {datastore} ({} free, {} needed)",
                            disk.id,
                            ferry_core::units::format_size_human(d.free_bytes),
                            ferry_core::units::format_size_human(allocated)
                        )),
                        Some(d) => {
                            room_ok = false;
                            details.push(format!(
                                "disk {}: datastore {datastore} on {to} has {} free, {} needed",
                                disk.id,
                                ferry_core::units::format_size_human(d.free_bytes),
                                ferry_core::units::format_size_human(allocated)
                            ));
                        }
                        None => {
                            room_ok = false;
                            details.push(format!(
                                "disk {}: host {to} has no datastore {datastore:?}",
                                disk.id
                            ));
                        }
                    }
                }
                DiskSource::Path { path } => {
                    room_ok = false;
                    details.push(format!(
                        "disk {} is a file outside the datastores ({}); an offline migration copies datastore disks",
                        disk.id,
                        path.display()
                    ));
                }
            }
        }
        checks.push(check("destination_storage", room_ok, details.join("; ")));
        let machine_ok = info.machine_types.contains(&vm.spec.machine_type);
        checks.push(check(
            "machine_type",
            machine_ok,
            format!(
                "{} {} machine type {}",
                to,
                if machine_ok {
                    "offers"
                } else {
                    "does not offer"
                },
                vm.spec.machine_type
            ),
        ));
        let cpu_ok = info.cpu_models.contains(&vm.spec.cpu_model);
        checks.push(check(
            "cpu_model",
            cpu_ok,
            format!(
                "{} {} CPU model {}",
                to,
                if cpu_ok { "offers" } else { "does not offer" },
                vm.spec.cpu_model
            ),
        ));
        let networks = match crate::networks::resolve(self, &vm.spec).await {
            Ok(networks) => networks,
            Err(error) => {
                checks.push(check(
                    "destination_networks",
                    false,
                    ferry_api::error_chain(&error),
                ));
                return (checks, Vec::new());
            }
        };
        match crate::networks::host_provides(&info, &networks) {
            Ok(()) => checks.push(check(
                "destination_networks",
                true,
                format!("{to} provides the VM's networks"),
            )),
            Err(why) => checks.push(check("destination_networks", false, format!("{to} {why}"))),
        }
        (checks, networks)
    }
}

fn disk_ids(spec: &VmSpec) -> String {
    spec.disks
        .iter()
        .map(|d| d.id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An agent's refusal, passed on with its status; no answer at all is
/// `Unreachable`.
pub(crate) fn agent_error(host: &str, error: ferry_api::ClientError) -> ControllerError {
    match error {
        ferry_api::ClientError::Api {
            status, message, ..
        } => ControllerError::Agent {
            host: host.to_string(),
            status,
            message,
        },
        source => ControllerError::Unreachable {
            name: host.to_string(),
            source,
        },
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    ferry_api::error_chain(error)
}

impl StorageJob {
    async fn take_backup(&mut self, agent: &Client, reason: String) -> Result<(), String> {
        self.enter("backup").await;
        let request = BackupRequest {
            vm: self.report.vm.clone(),
            datastore: None,
            reason: Some(reason),
        };
        let backup = agent
            .agent_backup(&self.report.vm, &request)
            .await
            .map_err(|e| format!("the backup before the move failed: {}", chain(&e)))?;
        info!(migration = %self.record.id, backup = %backup.id, "backup taken before the move");
        self.report.backup_id = Some(backup.id);
        self.persist().await;
        Ok(())
    }

    async fn run_storage_move(
        mut self,
        request: StorageMoveRequest,
        plans: Vec<DiskMovePlan>,
        agent: Client,
    ) {
        if request.backup {
            let reason = format!("before storage move {}", self.record.id);
            if let Err(error) = self.take_backup(&agent, reason).await {
                self.finish(MigrationStatus::Failed, Some(error)).await;
                return;
            }
            if self.cancelled() {
                self.finish(MigrationStatus::Cancelled, Some("cancelled".into()))
                    .await;
                return;
            }
        }
        self.enter("copying").await;
        if let Err(error) = self.start_agent_move(&request, plans, &agent).await {
            self.finish(MigrationStatus::Failed, Some(chain(&error)))
                .await;
            return;
        }
        self.watch_storage_move(&agent).await;
    }

    async fn start_agent_move(
        &self,
        request: &StorageMoveRequest,
        plans: Vec<DiskMovePlan>,
        agent: &Client,
    ) -> Result<DiskMoveStatus, ferry_api::ClientError> {
        let move_request = DiskMoveRequest {
            move_id: self.record.id,
            disks: plans,
            bandwidth_bytes_per_sec: request.bandwidth_bytes_per_sec,
            check_only: false,
        };
        agent
            .agent_storage_move(&self.report.vm, &move_request)
            .await
    }

    /// Follows the agent's move to its end (also after a controller
    /// restart: `recover_storage_move`).
    pub(crate) async fn watch_storage_move(&mut self, agent: &Client) {
        let mut cancel_sent = false;
        let mut last_persist = Instant::now();
        loop {
            if self.cancelled() && !cancel_sent {
                cancel_sent = true;
                if let Err(error) = agent.agent_storage_move_cancel(&self.report.vm).await {
                    warn!(migration = %self.record.id, error = %chain(&error), "the agent refused to cancel the storage move");
                }
            }
            let status = match agent.agent_storage_move_status(&self.report.vm).await {
                Ok(status) if status.move_id == self.record.id => status,
                Ok(other) => {
                    let error = format!(
                        "the agent reports another storage move ({}); this one's outcome is unknown",
                        other.move_id
                    );
                    self.finish(MigrationStatus::Failed, Some(error)).await;
                    return;
                }
                Err(error) => {
                    warn!(migration = %self.record.id, error = %chain(&error), "cannot ask the agent about the storage move; asking again");
                    tokio::time::sleep(POLL * 4).await;
                    continue;
                }
            };
            if status.phase != self.report.phase {
                self.enter(&status.phase.clone()).await;
            }
            self.report.progress = Some(Progress {
                phase: status.phase.clone(),
                disk_total_bytes: status.total_bytes,
                disk_done_bytes: status.done_bytes,
                ..Progress::default()
            });
            if !status.is_active() {
                self.end_storage_move(status).await;
                return;
            }
            if last_persist.elapsed() >= Duration::from_secs(1) {
                self.persist().await;
                last_persist = Instant::now();
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn end_storage_move(&mut self, status: DiskMoveStatus) {
        self.report.transferred_bytes = status.done_bytes;
        self.report.paused_ms = status.paused_ms;
        let method = if status.live {
            "qemu-img compare of each disk with its copy at the switchover, the guest paused, \
             before the guest was switched to the copy"
        } else {
            "qemu-img compare of each disk with its copy, the VM stopped"
        };
        match status.phase.as_str() {
            "completed" => {
                self.report.disk_moves = status.disks.clone();
                self.report.verified = Some(status.verified);
                self.report.verification = Some(Verification {
                    status: "verified".into(),
                    method: method.into(),
                    duration_ms: status.verify_ms.unwrap_or(0),
                    detail: status
                        .disks
                        .iter()
                        .map(|d| {
                            format!("disk {}: {} matches {}", d.disk_id, d.to_path, d.from_path)
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                });
                self.finish(MigrationStatus::Completed, None).await;
            }
            "cancelled" => {
                self.finish(
                    MigrationStatus::Cancelled,
                    Some("cancelled; the VM keeps its old disks".into()),
                )
                .await
            }
            _ => {
                let error = status
                    .error
                    .clone()
                    .unwrap_or_else(|| "the storage move failed".into());
                if error.contains("verification failed") {
                    self.report.verified = Some(false);
                    self.report.verification = Some(Verification {
                        status: "failed".into(),
                        method: method.into(),
                        duration_ms: status.verify_ms.unwrap_or(0),
                        detail: error.clone(),
                    });
                }
                self.finish(MigrationStatus::Failed, Some(error)).await;
            }
        }
    }

    async fn run_offline(
        mut self,
        vm: VmInfo,
        src: Client,
        dst: Client,
        networks: Vec<ferry_core::network::NetworkDef>,
        backup: bool,
    ) {
        if backup {
            let reason = format!(
                "before offline migration {} to {}",
                self.record.id, self.report.destination
            );
            if let Err(error) = self.take_backup(&src, reason).await {
                self.finish(MigrationStatus::Failed, Some(error)).await;
                return;
            }
        }
        self.enter("prepare").await;
        if let Err(error) = src
            .agent_set_departing(&vm.name, Some(self.record.id))
            .await
        {
            self.finish(
                MigrationStatus::Failed,
                Some(format!(
                    "the source refused to hand the VM over: {}",
                    chain(&error)
                )),
            )
            .await;
            return;
        }
        let copied = self.copy_disks(&vm, &src, &dst).await;
        let digests = match copied {
            Ok(digests) => digests,
            Err((status, error)) => {
                self.abandon_offline(&vm, &src, &dst).await;
                self.finish(
                    status,
                    Some(format!("{error}; the VM stays on {}", self.report.source)),
                )
                .await;
                return;
            }
        };
        // The commit: the destination checks each partial against its
        // digest once more, renames it into place and defines the VM.
        self.enter("define").await;
        let create = CreateVmRequest {
            spec: vm.spec.clone(),
            start: false,
            networks,
            arriving_disks: digests.iter().cloned().collect(),
        };
        if let Err(error) = dst.create_vm(&create).await {
            self.abandon_offline(&vm, &src, &dst).await;
            self.finish(
                MigrationStatus::Failed,
                Some(format!(
                    "defining the VM on {} failed: {}; the VM stays on {}",
                    self.report.destination,
                    chain(&error),
                    self.report.source
                )),
            )
            .await;
            return;
        }
        if let Err(error) = self
            .controller
            .move_owner(&vm.name, &self.report.destination)
            .await
        {
            warn!(migration = %self.record.id, %error, "cannot record the VM's new owner");
        }
        self.enter("retire_source").await;
        self.controller
            .retire_offline_source(&self.report.source, &vm.name)
            .await;
        self.report.disk_moves = offline_outcomes(&vm, &digests);
        self.report.verified = Some(true);
        self.report.verification = Some(Verification {
            status: "verified".into(),
            method: "sha256 of each disk file, read from disk on the source before the copy and \
                     on the destination after it"
                .into(),
            duration_ms: 0,
            detail: digests
                .iter()
                .map(|(disk, digest)| format!("disk {disk}: {digest}"))
                .collect::<Vec<_>>()
                .join("; "),
        });
        self.finish(MigrationStatus::Completed, None).await;
    }

    /// Streams each disk file from the source to the destination and checks
    /// what arrived against the source's digest. The error says whether it
    /// was a cancel.
    async fn copy_disks(
        &mut self,
        vm: &VmInfo,
        src: &Client,
        dst: &Client,
    ) -> Result<Vec<(String, FileDigest)>, (MigrationStatus, String)> {
        self.enter("copy").await;
        let total: u64 = vm.disks.iter().map(|d| d.allocated_bytes.max(1)).sum();
        let mut done_before = 0;
        let mut digests = Vec::new();
        for disk in &vm.spec.disks {
            if self.cancelled() {
                return Err((MigrationStatus::Cancelled, "cancelled".into()));
            }
            let DiskSource::Datastore { datastore, file } = &disk.source else {
                return Err((
                    MigrationStatus::Failed,
                    format!("disk {} is not in a datastore", disk.id),
                ));
            };
            let failed = |what: &str, error: &dyn std::error::Error| {
                (
                    MigrationStatus::Failed,
                    format!("disk {}: {what}: {}", disk.id, chain(error)),
                )
            };
            let expected = src
                .agent_disk_digest(&vm.name, &disk.id)
                .await
                .map_err(|e| failed("reading it on the source", &e))?;
            let response = src
                .disk_content(&vm.name, &disk.id)
                .await
                .map_err(|e| failed("reading it on the source", &e))?;
            let length = response.content_length().unwrap_or(expected.bytes);
            let moved = Arc::new(AtomicU64::new(0));
            let counter = moved.clone();
            let stream = response.bytes_stream().inspect(move |chunk| {
                if let Ok(bytes) = chunk {
                    counter.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
            });
            let send = dst.agent_send_arriving(
                datastore,
                file,
                length,
                reqwest::Body::wrap_stream(stream),
            );
            tokio::pin!(send);
            let mut ticker = tokio::time::interval(PROGRESS_EVERY);
            let arrived = loop {
                tokio::select! {
                    arrived = &mut send => break arrived,
                    _ = ticker.tick() => {
                        let now = moved.load(Ordering::Relaxed);
                        self.report.transferred_bytes = done_before + now;
                        self.report.progress = Some(Progress {
                            phase: "copy".into(),
                            disk_total_bytes: total.max(done_before + now),
                            disk_done_bytes: done_before + now,
                            ..Progress::default()
                        });
                        self.persist().await;
                    }
                    _ = self.cancel.changed() => {
                        if *self.cancel.borrow() {
                            return Err((MigrationStatus::Cancelled, "cancelled".into()));
                        }
                    }
                }
            };
            let arrived = arrived.map_err(|e| failed("copying it to the destination", &e))?;
            if arrived != expected {
                return Err((
                    MigrationStatus::Failed,
                    format!(
                        "disk {}: verification failed, the copy on {} ({arrived}) differs from the source ({expected})",
                        disk.id, self.report.destination
                    ),
                ));
            }
            done_before += arrived.bytes;
            self.report.transferred_bytes = done_before;
            digests.push((disk.id.clone(), arrived));
        }
        Ok(digests)
    }

    /// Undo before the define: partial files discarded, the mark cleared.
    async fn abandon_offline(&mut self, vm: &VmInfo, src: &Client, dst: &Client) {
        for disk in &vm.spec.disks {
            if let DiskSource::Datastore { datastore, file } = &disk.source {
                if let Err(error) = dst.agent_discard_arriving(datastore, file).await {
                    warn!(migration = %self.record.id, disk = %disk.id, error = %chain(&error), "cannot discard a partial copy (the agent removes it when it restarts)");
                }
            }
        }
        if let Err(error) = src.agent_set_departing(&vm.name, None).await {
            warn!(migration = %self.record.id, error = %chain(&error), "cannot clear the source's departing mark");
        }
    }
}

fn offline_outcomes(vm: &VmInfo, digests: &[(String, FileDigest)]) -> Vec<DiskMoveOutcome> {
    vm.spec
        .disks
        .iter()
        .filter_map(|disk| {
            let DiskSource::Datastore { datastore, .. } = &disk.source else {
                return None;
            };
            let path = vm
                .disks
                .iter()
                .find(|d| d.id == disk.id)
                .map(|d| d.path.clone())
                .unwrap_or_default();
            Some(DiskMoveOutcome {
                disk_id: disk.id.clone(),
                from_datastore: Some(datastore.clone()),
                from_path: path.clone(),
                from_format: disk.format,
                to_datastore: datastore.clone(),
                to_path: path,
                to_format: disk.format,
                virtual_size_bytes: vm
                    .disks
                    .iter()
                    .find(|d| d.id == disk.id)
                    .map(|d| d.virtual_size_bytes)
                    .unwrap_or(0),
                verified: digests.iter().any(|(id, _)| id == &disk.id),
            })
        })
        .collect()
}

impl Controller {
    /// The store's owner of VM `name` becomes `host`.
    pub(crate) async fn move_owner(&self, name: &str, host: &str) -> Result<(), ControllerError> {
        let known = self.store.get_vm(name).await?;
        if known.host != host {
            self.store
                .set_vm_owner(name, known.generation, host)
                .await?;
        }
        Ok(())
    }

    /// After an offline migration's commit: the source's VM and all its
    /// datastore files go. Retried until the source answers.
    pub(crate) async fn retire_offline_source(&self, source: &str, vm: &str) {
        let query = ferry_api::DeleteVmQuery {
            keep_disks: false,
            all_disks: true,
        };
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let result = match self.agent(source).await {
                Ok(agent) => agent.delete_vm(vm, &query).await.map_err(|e| chain(&e)),
                Err(error) => Err(chain(&error)),
            };
            match result {
                Ok(()) => return,
                Err(error) if error.contains("no VM named") => return,
                Err(error) => {
                    if attempt == 1 || attempt.is_multiple_of(30) {
                        warn!(vm, source, attempt, %error, "cannot delete the source's copy yet; retrying");
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }

    /// A storage job a previous run of the controller left running: watch
    /// (storage move) or settle (offline migration) it.
    pub(crate) async fn recover_storage_job(self: Arc<Self>, record: MigrationRecord) {
        let report = crate::migrate::report_of(&record);
        let (cancel_tx, cancel) = watch::channel(false);
        self.running.lock().await.insert(record.id, cancel_tx);
        let mut job = StorageJob {
            controller: self.clone(),
            report,
            record,
            started: Instant::now(),
            phase_started: Instant::now(),
            cancel,
        };
        match job.report.kind {
            MigrationKind::Storage => {
                let agent = loop {
                    match self.agent(&job.report.source).await {
                        Ok(agent) => break agent,
                        Err(error) => {
                            warn!(migration = %job.record.id, %error, "cannot reach the host of a storage move; retrying");
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    }
                };
                job.watch_storage_move(&agent).await;
            }
            MigrationKind::Offline => self.settle_offline(job).await,
            MigrationKind::Live => {}
        }
    }

    /// An offline migration found in flight: committed (the destination
    /// has the VM) → finish the clean-up; else → undo on both hosts.
    async fn settle_offline(&self, mut job: StorageJob) {
        let vm = job.report.vm.clone();
        loop {
            let (src, dst) = match (
                self.agent(&job.report.source).await,
                self.agent(&job.report.destination).await,
            ) {
                (Ok(src), Ok(dst)) => (src, dst),
                _ => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            match dst.get_vm(&vm).await {
                Ok(_) => {
                    let _ = self.move_owner(&vm, &job.report.destination).await;
                    self.retire_offline_source(&job.report.source, &vm).await;
                    job.report.verified = Some(true);
                    job.finish(
                        MigrationStatus::Completed,
                        Some("completed by recovery after a controller restart".into()),
                    )
                    .await;
                    return;
                }
                Err(error) if error.is_not_found() => {
                    match src.get_vm(&vm).await {
                        Ok(info) => job.abandon_offline(&info, &src, &dst).await,
                        Err(error) if error.is_not_found() => {}
                        Err(_) => {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            continue;
                        }
                    }
                    job.finish(
                        MigrationStatus::Failed,
                        Some(format!(
                            "the controller restarted before the VM was defined on {}; rolled back, the VM stays on {}",
                            job.report.destination, job.report.source
                        )),
                    )
                    .await;
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
            }
        }
    }
}

//! The live-migration saga: a fixed list of steps run by one task, each
//! persisted before and after it runs, each with an undo — until the commit,
//! the point of no return, which has none.
//!
//! ```text
//!  preflight ─▶ prepare_destination ─▶ start_outgoing ─▶ converge ─▶ switchover
//!  (no side      undo: abort the        undo: cancel,      (watch,     (mirrors complete,
//!   effects)     waiting QEMU, delete   tear down mirrors, escalate,  migrate-continue,
//!                its disks              resume the source  deadline)  destination confirms)
//!                                                                          │
//!        ─▶ commit ─────────────▶ finish_destination ─▶ retire_source
//!           CAS of the owner        nbd-server-stop,       quit the source QEMU,
//!           (point of no return)    `cont` (retried)       remove copied disks
//! ```
//!
//! "The source is authoritative until commit": every failure before the
//! commit resumes the source and cleans the destination; after it, the source
//! is never resumed — the steps after commit are retried, not undone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::{
    Client, DiskCopy, DryRunReport, Escalation, IncomingRequest, MigrateAnswer, MigrateRequest,
    MigrationReport, MigrationStatus, OutgoingAdjust, OutgoingRequest, OutgoingStatus, PhaseTiming,
    PostcopyPolicy, Prediction, PreflightCheck, Progress, StorageMode, Strategy, VmInfo,
};
use ferry_core::spec::{DiskSource, VmSpec};
use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;

use crate::controller::{unix_now, unix_now_ms, Controller, ControllerError};
use crate::failpoints::{self, Injected};
use crate::store::{self, MigrationRecord, StepRecord, StepState, StoreError};

/// How often the saga polls the source while memory converges.
const POLL: Duration = Duration::from_millis(100);
/// How long the switchover may take once the guest is paused.
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Margin of destination memory kept free beyond the guest's RAM (QEMU's
/// own overhead).
const QEMU_OVERHEAD_BYTES: u64 = 128 << 20;
/// How long pre-copy (RAM or disk mirror) may move nothing before the
/// migration is failed as cut off from its destination.
const COPY_STALL_LIMIT: Duration = Duration::from_secs(15);
/// Dirty-rate sample length before a migration.
const DIRTY_SAMPLE_SECS: u64 = 1;

/// Everything decided before anything is touched.
#[derive(Debug, Clone)]
struct Plan {
    id: Uuid,
    vm: String,
    spec: VmSpec,
    source: String,
    destination: String,
    strategy: Strategy,
    copy_disks: Vec<DiskCopy>,
    /// The cluster networks the VM's NICs are on, for the destination.
    networks: Vec<ferry_core::network::NetworkDef>,
    accel: Option<String>,
    prediction: Option<Prediction>,
    /// Take a backup on the source before anything else.
    backup: bool,
}

/// Why a saga stopped before the commit.
enum Abort {
    Cancelled(String),
    Failed(String),
    /// Past post-copy's point of no return, the guest could not be made
    /// whole: nothing can be unwound (neither QEMU may be touched), only
    /// reported.
    Lost(String),
}

impl Controller {
    /// Checks, predicts and (unless a dry run) starts a migration. A
    /// migration that cannot work is refused here, before anything is
    /// touched.
    pub async fn migrate(
        self: &Arc<Self>,
        request: MigrateRequest,
    ) -> Result<MigrateAnswer, ControllerError> {
        if request.offline {
            return self.migrate_offline(request).await;
        }
        let (source, vm) = self.locate_vm(&request.vm).await?;
        let (dry_run, plan) = self.preflight(&request, &source, &vm).await?;
        if request.dry_run {
            return Ok(MigrateAnswer::DryRun(dry_run));
        }
        let Some(plan) = plan else {
            let failed: Vec<String> = dry_run
                .checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.name, c.detail))
                .collect();
            return Err(ControllerError::Refused {
                reason: failed.join("; "),
            });
        };
        self.ensure_vm_record(&plan, &vm).await?;
        let report = initial_report(&plan);
        let now = unix_now();
        let record = MigrationRecord {
            id: plan.id,
            vm: plan.vm.clone(),
            source: plan.source.clone(),
            destination: plan.destination.clone(),
            status: store::MigrationStatus::Running,
            phase: "preflight".to_string(),
            options: serde_json::to_value(&request).unwrap_or_default(),
            steps: Vec::new(),
            report: serde_json::to_value(&report).unwrap_or_default(),
            error: None,
            created_at: now,
            updated_at: now,
            generation: 0,
        };
        // Atomic in the store: of two concurrent requests for one VM,
        // exactly one gets here.
        let generation = match self.store.create_migration(&record).await {
            Ok(generation) => generation,
            Err(StoreError::Conflict { .. }) => {
                return Err(ControllerError::Refused {
                    reason: format!("VM {:?} is already migrating", plan.vm),
                })
            }
            Err(error) => return Err(error.into()),
        };
        let (cancel_tx, cancel_rx) = watch::channel(false);
        self.running.lock().await.insert(plan.id, cancel_tx);
        let saga = Saga {
            controller: self.clone(),
            record: MigrationRecord {
                generation,
                ..record
            },
            report: report.clone(),
            plan,
            started: Instant::now(),
            cancel: cancel_rx,
            phase_started: Instant::now(),
            postcopy_requested: false,
        };
        tokio::spawn(saga.run());
        Ok(MigrateAnswer::Started(Box::new(report)))
    }

    pub async fn migration(&self, id: &str) -> Result<MigrationReport, ControllerError> {
        let uuid = Uuid::parse_str(id)
            .map_err(|_| ControllerError::MigrationNotFound { id: id.to_string() })?;
        match self.store.get_migration(uuid).await {
            Ok(record) => Ok(report_of(&record)),
            Err(StoreError::NotFound { .. }) => {
                Err(ControllerError::MigrationNotFound { id: id.to_string() })
            }
            Err(error) => Err(error.into()),
        }
    }

    pub async fn migrations(&self) -> Result<Vec<MigrationReport>, ControllerError> {
        let records = self
            .store
            .list_migrations(&store::MigrationFilter::default())
            .await?;
        Ok(records.iter().map(report_of).collect())
    }

    /// Asks a running migration to stop; it unwinds (the source keeps
    /// running) unless it already committed.
    pub async fn cancel(&self, id: &str) -> Result<MigrationReport, ControllerError> {
        let report = self.migration(id).await?;
        if !report.status.is_active() {
            return Ok(report);
        }
        if matches!(
            report.phase.as_str(),
            "commit" | "finish_destination" | "retire_source"
        ) {
            return Err(ControllerError::PastCommit { id: report.id });
        }
        if let Some(cancel) = self.running.lock().await.get(&report.id) {
            let _ = cancel.send(true);
        }
        // Wait (bounded) for the saga to unwind, so that the answer says how
        // it ended.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let report = self.migration(id).await?;
            if !report.status.is_active() || Instant::now() > deadline {
                return Ok(report);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Records the VM and its owner in the store (the controller learns VMs
    /// from the agents); if the store disagrees with where the VM runs, what
    /// runs wins.
    async fn ensure_vm_record(&self, plan: &Plan, vm: &VmInfo) -> Result<(), ControllerError> {
        self.remember_vm(vm, &plan.source).await
    }

    /// The pre-flight checks. Returns the report, and a plan when every
    /// check passed.
    async fn preflight(
        &self,
        request: &MigrateRequest,
        source: &str,
        vm: &VmInfo,
    ) -> Result<(DryRunReport, Option<Plan>), ControllerError> {
        let mut checks = Vec::new();
        let mut check = |name: &str, ok: bool, detail: String| {
            checks.push(PreflightCheck {
                name: name.to_string(),
                ok,
                detail,
            })
        };
        let spec = &vm.spec;
        check(
            "vm_running",
            vm.state == ferry_api::VmState::Running,
            if vm.state == ferry_api::VmState::Running {
                format!("{} runs on {source}", vm.name)
            } else {
                format!(
                    "{} is {}: live migration needs a running VM (a stopped VM moves by offline migration, `ferry migrate --offline`)",
                    vm.name, vm.state
                )
            },
        );
        check(
            "destination_differs",
            request.to != source,
            format!("source {source}, destination {}", request.to),
        );
        let source_agent = self.agent(source).await?;
        let source_host = source_agent
            .host()
            .await
            .map_err(|e| ControllerError::Unreachable {
                name: source.to_string(),
                source: e,
            })?;
        let destination_agent = self.agent(&request.to).await?;
        let destination = match destination_agent.host().await {
            Ok(info) => {
                check(
                    "destination_reachable",
                    true,
                    format!("{} answers", request.to),
                );
                Some(info)
            }
            Err(error) => {
                check(
                    "destination_reachable",
                    false,
                    ferry_api::error_chain(&error),
                );
                None
            }
        };
        let mut storage = request.storage;
        let mut copy_disks = Vec::new();
        if let Some(dest) = &destination {
            let needed = vm.memory_bytes + QEMU_OVERHEAD_BYTES;
            check(
                "destination_memory",
                dest.memory_available_bytes >= needed,
                format!(
                    "{} MiB available, {} MiB needed",
                    dest.memory_available_bytes >> 20,
                    needed >> 20
                ),
            );
            check(
                "destination_cpus",
                dest.cpus >= vm.vcpus,
                format!("{} CPUs for {} vCPUs", dest.cpus, vm.vcpus),
            );
            let (ok, detail) = offers(
                &request.to,
                "machine type",
                &dest.machine_types,
                &spec.machine_type,
            );
            check("machine_type", ok, detail);
            let (ok, detail) = offers(&request.to, "CPU model", &dest.cpu_models, &spec.cpu_model);
            check("cpu_model", ok, detail);
            let versions_ok = version_at_least(&dest.qemu_version, &source_host.qemu_version);
            check(
                "qemu_version",
                versions_ok,
                format!(
                    "source QEMU {}, destination QEMU {}{}",
                    source_host.qemu_version,
                    dest.qemu_version,
                    if versions_ok {
                        ""
                    } else {
                        " (older than the source)"
                    }
                ),
            );
            match plan_storage(spec, &vm.disks, &source_host, dest, request.storage) {
                Ok((mode, copies, detail)) => {
                    storage = mode;
                    copy_disks = copies;
                    check("storage", true, detail);
                }
                Err(problem) => check("storage", false, problem),
            }
        }
        let networks = match crate::networks::resolve(self, spec).await {
            Ok(networks) => networks,
            Err(error) => {
                check("networks", false, ferry_api::error_chain(&error));
                Vec::new()
            }
        };
        if let Some(dest) = &destination {
            match crate::networks::host_provides(dest, &networks) {
                Ok(()) => check(
                    "destination_networks",
                    true,
                    if networks.is_empty() {
                        "the VM is on no cluster network".to_string()
                    } else {
                        format!(
                            "{} provides {}",
                            request.to,
                            networks
                                .iter()
                                .map(|n| format!("{} (bridge {})", n.name, n.bridge))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                ),
                Err(why) => check(
                    "destination_networks",
                    false,
                    format!("{} {why}", request.to),
                ),
            }
        }
        if !spec.nics.is_empty() {
            let (ok, detail) = self.macs_unique(spec).await;
            check("mac_unique", ok, detail);
        }
        if let Ok(active) = self
            .store
            .list_migrations(&store::MigrationFilter {
                vm: Some(vm.name.clone()),
                active_only: true,
            })
            .await
        {
            check(
                "no_other_migration",
                active.is_empty(),
                match active.first() {
                    // Worded like the store's refusal (the same fact,
                    // found a moment earlier).
                    Some(other) => format!(
                        "VM {:?} is already migrating (migration {} is in progress)",
                        vm.name, other.id
                    ),
                    None => "no other migration of this VM".to_string(),
                },
            );
        }
        let ok = checks.iter().all(|c| c.ok);
        let strategy = self.strategy(request, storage);
        let prediction = if ok {
            Some(
                self.predict(&source_agent, vm, &strategy, &copy_disks, &request.to)
                    .await,
            )
        } else {
            None
        };
        let report = DryRunReport {
            vm: vm.name.clone(),
            source: source.to_string(),
            destination: request.to.clone(),
            storage,
            ok,
            checks,
            prediction: prediction.clone(),
        };
        let plan = ok.then(|| Plan {
            id: Uuid::new_v4(),
            vm: vm.name.clone(),
            spec: spec.clone(),
            source: source.to_string(),
            destination: request.to.clone(),
            strategy,
            copy_disks,
            networks,
            accel: vm.accel.clone(),
            prediction,
            // On by default when the disks leave their host.
            backup: request.backup.unwrap_or(storage == StorageMode::Copy),
        });
        Ok((report, plan))
    }

    /// Whether no other VM of the cluster has one of the spec's MACs, as
    /// far as the hosts that answer can tell.
    async fn macs_unique(&self, spec: &VmSpec) -> (bool, String) {
        let records = match self.hosts().await {
            Ok(records) => records,
            Err(error) => return (false, ferry_api::error_chain(&error)),
        };
        let answers =
            match crate::vms::ask_all(
                self,
                &records,
                |agent| async move { agent.list_vms().await },
            )
            .await
            {
                Ok(answers) => answers,
                Err(error) => return (false, ferry_api::error_chain(&error)),
            };
        let mut unasked = Vec::new();
        let mut vms = Vec::new();
        for (host, answer) in answers {
            match answer {
                Ok(listed) => vms.extend(listed),
                Err(_) => unasked.push(host),
            }
        }
        match crate::networks::check_macs_unique(spec, vms.iter()) {
            Err(error) => (false, ferry_api::error_chain(&error)),
            Ok(()) if unasked.is_empty() => (
                true,
                "no other VM of the cluster has the VM's MACs".to_string(),
            ),
            Ok(()) => (
                true,
                format!(
                    "no other VM on the hosts that answered has the VM's MACs (not asked: {})",
                    unasked.join(", ")
                ),
            ),
        }
    }

    fn strategy(&self, request: &MigrateRequest, storage: StorageMode) -> Strategy {
        let mut capabilities = vec![
            "events".to_string(),
            "pause-before-switchover".to_string(),
            // Only throttles the guest when pre-copy is not converging.
            "auto-converge".to_string(),
        ];
        if request.postcopy != PostcopyPolicy::Never {
            capabilities.push("postcopy-ram".to_string());
        }
        let max_downtime_ms = request
            .max_downtime_ms
            .unwrap_or(self.defaults.max_downtime_ms);
        Strategy {
            storage,
            capabilities,
            max_bandwidth_bytes_per_sec: request
                .bandwidth_bytes_per_sec
                .unwrap_or(self.defaults.bandwidth_bytes_per_sec),
            // Start at a third of what the user accepts; escalation raises
            // it to the full limit when pre-copy stalls.
            downtime_limit_ms: (max_downtime_ms / 3).max(1),
            max_downtime_ms,
            postcopy: request.postcopy,
            deadline_secs: request.deadline_secs.unwrap_or(self.defaults.deadline_secs),
            tls: true,
        }
    }

    /// Pre-copy model: every pass sends what the guest dirtied during the
    /// previous one, so at rate `d` over a link of `b` the passes shrink by
    /// `d/b`; the sum converges to `ram / (b - d)` when `d < b`. Downtime is
    /// the last pass, which QEMU starts once it fits the downtime limit.
    async fn predict(
        &self,
        source: &Client,
        vm: &VmInfo,
        strategy: &Strategy,
        copies: &[DiskCopy],
        destination: &str,
    ) -> Prediction {
        let (dirty, basis) = match source.dirty_rate(&vm.name, DIRTY_SAMPLE_SECS).await {
            Ok(rate) => (
                rate.bytes_per_sec,
                format!(
                    "dirty rate sampled for {} ms (calc-dirty-rate)",
                    rate.sample_ms
                ),
            ),
            Err(error) => (
                0,
                format!(
                    "dirty rate unknown ({}); assumed idle",
                    ferry_api::error_chain(&error)
                ),
            ),
        };
        let limit = strategy.max_bandwidth_bytes_per_sec.max(1);
        let observed = self
            .link_goodput
            .lock()
            .await
            .get(&(vm.host.clone(), destination.to_string()))
            .copied();
        let link = observed.map_or(limit, |o| o.min(limit)).max(1);
        let disk_bytes: u64 = copies.iter().map(|c| c.virtual_size_bytes).sum();
        let ram = vm.memory_bytes;
        let converges = dirty < link * 9 / 10;
        let total_ms = if converges {
            (ram + disk_bytes) as f64 / (link - dirty) as f64 * 1000.0
        } else {
            f64::INFINITY
        };
        Prediction {
            ram_bytes: ram,
            disk_bytes,
            dirty_rate_bytes_per_sec: dirty,
            link_bytes_per_sec: link,
            total_ms: if total_ms.is_finite() {
                total_ms as u64
            } else {
                strategy.deadline_secs * 1000
            },
            downtime_ms: if converges {
                strategy.downtime_limit_ms
            } else {
                strategy.max_downtime_ms
            },
            converges,
            basis: match observed {
                Some(o) => format!(
                    "{basis}; link {} MiB/s as the last migration on it achieved (limit {} MiB/s)",
                    o >> 20,
                    limit >> 20
                ),
                None => format!(
                    "{basis}; link taken as the bandwidth limit {} MiB/s (no migration measured it yet)",
                    limit >> 20
                ),
            },
        }
    }
}

/// Decides shared or copy, and what to copy. A disk is shared when it sits on
/// a datastore of the same name and folder on both hosts.
fn plan_storage(
    spec: &VmSpec,
    sizes: &[ferry_api::DiskInfo],
    source: &ferry_api::HostInfo,
    destination: &ferry_api::HostInfo,
    wanted: StorageMode,
) -> Result<(StorageMode, Vec<DiskCopy>, String), String> {
    let mut local = Vec::new();
    for disk in &spec.disks {
        let shared = match &disk.source {
            DiskSource::Datastore { datastore, .. } => {
                let on = |host: &ferry_api::HostInfo| {
                    host.datastores
                        .iter()
                        .find(|d| &d.name == datastore)
                        .map(|d| d.path.clone())
                };
                match (on(source), on(destination)) {
                    (Some(a), Some(b)) => a == b,
                    (_, None) => {
                        if wanted != StorageMode::Shared {
                            return Err(format!(
                                "disk {}: the destination has no datastore {datastore:?}",
                                disk.id
                            ));
                        }
                        false
                    }
                    _ => false,
                }
            }
            // A host path is taken to be the same file on both hosts.
            DiskSource::Path { .. } => true,
        };
        if !shared {
            local.push(disk);
        }
    }
    let mode = match wanted {
        StorageMode::Auto if local.is_empty() => StorageMode::Shared,
        StorageMode::Auto => StorageMode::Copy,
        other => other,
    };
    if mode == StorageMode::Shared {
        if let Some(disk) = local.first() {
            return Err(format!(
                "disk {} is on a datastore the destination does not share; use --storage copy",
                disk.id
            ));
        }
        return Ok((
            mode,
            Vec::new(),
            "every disk is on shared storage".to_string(),
        ));
    }
    let mut copies = Vec::new();
    for disk in local {
        let size = sizes
            .iter()
            .find(|d| d.id == disk.id)
            .map(|d| d.virtual_size_bytes)
            .ok_or_else(|| format!("disk {}: its size is unknown", disk.id))?;
        if let DiskSource::Datastore { datastore, .. } = &disk.source {
            let free = destination
                .datastores
                .iter()
                .find(|d| &d.name == datastore)
                .map(|d| d.free_bytes)
                .unwrap_or(0);
            if free < size {
                return Err(format!(
                    "disk {}: datastore {datastore:?} on {} has {} MiB free, {} MiB needed",
                    disk.id,
                    destination.name,
                    free >> 20,
                    size >> 20
                ));
            }
        }
        copies.push(DiskCopy {
            disk_id: disk.id.clone(),
            virtual_size_bytes: size,
        });
    }
    let detail = format!(
        "copy {} (mirrored over NBD with TLS)",
        copies
            .iter()
            .map(|c| format!("{} ({} MiB)", c.disk_id, c.virtual_size_bytes >> 20))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((StorageMode::Copy, copies, detail))
}

/// Runs a step after the commit until it succeeds or `attempts` run out,
/// backing off: past the point of no return a step is retried, never undone.
async fn retry_after_commit<T, F, Fut>(
    migration: Uuid,
    what: &str,
    attempts: u64,
    mut step: F,
) -> Result<T, ferry_api::ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ferry_api::ClientError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match step().await {
            Ok(value) => return Ok(value),
            Err(error) if attempt < attempts => {
                warn!(%migration, attempt, error = %ferry_api::error_chain(&error), "{what} failed; retrying");
                tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// How long post-copy may stay paused (a broken link) before the
/// migration is reported as stuck. The QEMUs are left as they are: the
/// guest's memory is split between them, and only a reconnection saves it.
const POSTCOPY_PAUSED_LIMIT: Duration = Duration::from_secs(600);

/// How long post-copy may send nothing before it is paused (and then
/// resumed on a fresh connection).
const POSTCOPY_STALL_LIMIT: Duration = Duration::from_secs(3);

/// Drives a post-copy migration to its end: polls the source, and whenever
/// a broken link paused post-copy, asks the destination to listen again
/// and the source to reconnect, as often as it takes. `seen` gets every
/// status. Errors only when the guest cannot be saved (a QEMU failed) or
/// the link stayed down past [`POSTCOPY_PAUSED_LIMIT`].
pub(crate) async fn drive_postcopy(
    vm: &str,
    id: Uuid,
    src: &Client,
    dst: &Client,
    mut seen: impl FnMut(&OutgoingStatus),
) -> Result<(), String> {
    let mut paused_since: Option<Instant> = None;
    // Progress watch: a link that silently drops everything leaves QEMU's
    // TCP waiting for minutes; no byte for STALL_LIMIT means pause now and
    // reconnect when the link is back.
    let mut last_progress = (0u64, Instant::now());
    loop {
        let status = match src.outgoing_status(vm).await {
            Ok(status) => status,
            Err(error) => {
                // The source's agent may be restarting; QEMU goes on.
                warn!(migration = %id, error = %ferry_api::error_chain(&error), "post-copy: the source does not answer");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        seen(&status);
        match status.phase.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(format!(
                    "QEMU on the source reports post-copy {}: {}",
                    status.phase,
                    status.error.unwrap_or_default()
                ))
            }
            "postcopy_paused" => {
                let since = *paused_since.get_or_insert_with(Instant::now);
                if since.elapsed() > POSTCOPY_PAUSED_LIMIT {
                    return Err(format!(
                        "post-copy has been paused for {} s: the link between the hosts does not \
                         come back",
                        since.elapsed().as_secs()
                    ));
                }
                match dst.incoming_recover(id).await {
                    Ok(ready) => match src.outgoing_resume(vm, &ready.migration_uri).await {
                        Ok(_) => {
                            info!(migration = %id, "post-copy reconnected after a broken link");
                            paused_since = None;
                        }
                        Err(error) => {
                            warn!(migration = %id, error = %ferry_api::error_chain(&error), "post-copy: reconnecting failed; retrying")
                        }
                    },
                    Err(error) => {
                        warn!(migration = %id, error = %ferry_api::error_chain(&error), "post-copy: the destination cannot listen again yet; retrying")
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            "postcopy" => {
                if status.transferred_bytes != last_progress.0 {
                    last_progress = (status.transferred_bytes, Instant::now());
                } else if last_progress.1.elapsed() > POSTCOPY_STALL_LIMIT {
                    warn!(migration = %id, "post-copy made no progress for {POSTCOPY_STALL_LIMIT:?}; pausing it");
                    if let Err(error) = src.outgoing_pause(vm).await {
                        warn!(migration = %id, error = %ferry_api::error_chain(&error), "pausing post-copy failed");
                    }
                    last_progress = (status.transferred_bytes, Instant::now());
                }
                tokio::time::sleep(POLL).await
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// Makes `destination` the VM's owner: the commit. Idempotent: a VM that
/// already belongs to `destination` is committed (a retried or recovered
/// commit must not fail on its own earlier success).
pub(crate) async fn commit(
    controller: &Controller,
    vm: &str,
    destination: &str,
) -> Result<(), String> {
    let known = controller
        .store
        .get_vm(vm)
        .await
        .map_err(|e| format!("reading the VM's owner failed: {e}"))?;
    if known.host == destination {
        return Ok(());
    }
    controller
        .store
        .set_vm_owner(vm, known.generation, destination)
        .await
        .map(|_| ())
        .map_err(|e| format!("recording the new owner failed: {e}"))
}

/// Whether the destination's receiving QEMU is gone (or failed) before the
/// guest ever ran there.
pub(crate) fn destination_lost(status: &ferry_api::IncomingStatus) -> bool {
    !status.guest_ran
        && status.resumed_at_us.is_none()
        && (status.migration_status == "failed" || status.run_state == "gone")
}

/// How an agent failed to give a status, for messages: an agent that
/// answered with an error (its QEMU is gone, say) did not stop answering.
fn answer_failure(error: &ferry_api::ClientError) -> &'static str {
    match error {
        ferry_api::ClientError::Api { .. } => "could not report the migration",
        _ => "stopped answering",
    }
}

/// An injected failure shaped like an agent's answer, for the retried
/// steps after the commit.
fn injected_client_error(point: &str) -> ferry_api::ClientError {
    ferry_api::ClientError::Api {
        status: 500,
        code: "internal".to_string(),
        message: format!("failpoint {point}: injected failure"),
    }
}

/// Whether a host's list offers `wanted`, and the check's detail line.
fn offers(host: &str, what: &str, offered: &[String], wanted: &str) -> (bool, String) {
    if offered.iter().any(|o| o == wanted) {
        (true, format!("{wanted} available"))
    } else {
        (false, format!("{host} does not offer {what} {wanted}"))
    }
}

/// `10.0.2` ≥ `10.0.0`, comparing numerically.
fn version_at_least(have: &str, need: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> {
        v.split(['.', ' ', '-'])
            .map_while(|p| p.parse().ok())
            .collect()
    };
    parse(have) >= parse(need)
}

fn initial_report(plan: &Plan) -> MigrationReport {
    MigrationReport {
        ram_bytes: plan.spec.memory_bytes,
        disk_bytes: plan.copy_disks.iter().map(|c| c.virtual_size_bytes).sum(),
        accel: plan.accel.clone(),
        prediction: plan.prediction.clone(),
        ..MigrationReport::new(
            plan.id,
            ferry_api::MigrationKind::Live,
            &plan.vm,
            (&plan.source, &plan.destination),
            plan.strategy.clone(),
            unix_now_ms(),
        )
    }
}

impl Controller {
    /// Adds a client's observation to a migration's report. The saga may be
    /// writing the record at the same time (its clean-up after the end), so
    /// a lost compare-and-swap re-reads and tries again.
    pub async fn observe(
        &self,
        id: &str,
        observation: ferry_api::MigrationObservation,
    ) -> Result<MigrationReport, ControllerError> {
        let uuid = Uuid::parse_str(id)
            .map_err(|_| ControllerError::MigrationNotFound { id: id.to_string() })?;
        let mut attempts = 0;
        loop {
            let mut record = self.store.get_migration(uuid).await?;
            let mut report = report_of(&record);
            let gap = observation.network_probe.max_gap_ms;
            report.network_downtime_ms = Some(gap.max(0.0).ceil() as u64);
            report.network_probe = Some(observation.network_probe.clone());
            record.report = serde_json::to_value(&report).unwrap_or_default();
            match self
                .store
                .update_migration(&record, record.generation)
                .await
            {
                Ok(_) => return Ok(report),
                Err(store::StoreError::Conflict { .. }) if attempts < 10 => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

pub(crate) fn report_of(record: &MigrationRecord) -> MigrationReport {
    serde_json::from_value(record.report.clone()).unwrap_or_else(|_| MigrationReport {
        status: api_status(record.status),
        phase: record.phase.clone(),
        error: record.error.clone(),
        ..MigrationReport::new(
            record.id,
            ferry_api::MigrationKind::Live,
            &record.vm,
            (&record.source, &record.destination),
            Strategy::default(),
            record.created_at * 1000,
        )
    })
}

fn api_status(status: store::MigrationStatus) -> MigrationStatus {
    match status {
        store::MigrationStatus::Pending => MigrationStatus::Pending,
        store::MigrationStatus::Running => MigrationStatus::Running,
        store::MigrationStatus::Completed => MigrationStatus::Completed,
        store::MigrationStatus::Failed => MigrationStatus::Failed,
        store::MigrationStatus::Cancelled => MigrationStatus::Cancelled,
    }
}

pub(crate) fn store_status(status: MigrationStatus) -> store::MigrationStatus {
    match status {
        MigrationStatus::Pending => store::MigrationStatus::Pending,
        MigrationStatus::Running => store::MigrationStatus::Running,
        MigrationStatus::Completed => store::MigrationStatus::Completed,
        MigrationStatus::Failed => store::MigrationStatus::Failed,
        MigrationStatus::Cancelled => store::MigrationStatus::Cancelled,
    }
}

/// One running migration.
struct Saga {
    controller: Arc<Controller>,
    plan: Plan,
    record: MigrationRecord,
    report: MigrationReport,
    started: Instant,
    phase_started: Instant,
    cancel: watch::Receiver<bool>,
    /// Set once the source was asked to switch to post-copy: the
    /// switchover then moves the guest's execution before its last pages,
    /// and the end of the saga differs (see `postcopy_tail`).
    postcopy_requested: bool,
}

impl Saga {
    async fn run(mut self) {
        let id = self.plan.id;
        info!(migration = %id, vm = %self.plan.vm, from = %self.plan.source, to = %self.plan.destination, storage = ?self.plan.strategy.storage, "migration started");
        let outcome = self.forward().await;
        match outcome {
            Ok(()) => {
                self.finish(MigrationStatus::Completed, None).await;
                self.remember_goodput().await;
                info!(migration = %id, total_ms = self.report.total_ms, downtime_ms = ?self.report.downtime_ms, "migration completed");
            }
            Err(Abort::Lost(message)) => {
                tracing::error!(migration = %id, error = %message, "post-copy failed: the guest's memory is split between the hosts");
                self.finish(MigrationStatus::Failed, Some(message)).await;
            }
            Err(abort) => {
                let (status, message) = match abort {
                    Abort::Cancelled(why) => (MigrationStatus::Cancelled, why),
                    Abort::Failed(why) => (MigrationStatus::Failed, why),
                    Abort::Lost(why) => (MigrationStatus::Failed, why),
                };
                warn!(migration = %id, %status, error = %message, "migration did not complete; unwinding");
                self.unwind().await;
                self.finish(status, Some(message)).await;
            }
        }
        self.controller.running.lock().await.remove(&id);
    }

    /// The steps up to and including the point of no return, then the
    /// steps after it (which are retried, never undone).
    async fn forward(&mut self) -> Result<(), Abort> {
        let src = self.agent(&self.plan.source.clone()).await?;
        let dst = self.agent(&self.plan.destination.clone()).await?;

        // backup — nothing to undo: the backup stays (it is the way back).
        if self.plan.backup {
            self.enter("backup").await;
            self.check_cancel()?;
            let request = ferry_api::BackupRequest {
                vm: self.plan.vm.clone(),
                datastore: None,
                reason: Some(format!(
                    "before migration {} to {}",
                    self.plan.id, self.plan.destination
                )),
            };
            let backup = src
                .agent_backup(&self.plan.vm, &request)
                .await
                .map_err(|e| {
                    Abort::Failed(format!(
                        "the backup before the migration failed: {}",
                        ferry_api::error_chain(&e)
                    ))
                })?;
            info!(migration = %self.plan.id, backup = %backup.id, "backup taken before the migration");
            self.report.backup_id = Some(backup.id);
            self.persist().await;
        }

        // prepare_destination — undo: incoming_abort.
        self.enter("prepare_destination").await;
        // The copied disks are recorded first: a recovery after a crash
        // needs them to retire the source (they are deleted there only
        // after the commit).
        self.step(
            "prepare_destination",
            StepState::Started,
            serde_json::json!({ "copy_disks": self.plan.copy_disks }),
        )
        .await;
        self.injected_before("prepare_destination")?;
        self.check_cancel()?;
        let incoming = IncomingRequest {
            migration_id: self.plan.id,
            spec: self.plan.spec.clone(),
            copy_disks: self.plan.copy_disks.clone(),
            source_host: self.plan.source.clone(),
            capabilities: self.plan.strategy.capabilities.clone(),
            networks: self.plan.networks.clone(),
        };
        let ready = dst.incoming_prepare(&incoming).await;
        let ready = match ready {
            Ok(ready) => ready,
            Err(error) => {
                // Its undo is safe to run even if the prepare half-happened:
                // the agent's abort removes whatever exists.
                self.step(
                    "prepare_destination",
                    StepState::Failed,
                    serde_json::Value::Null,
                )
                .await;
                return Err(Abort::Failed(format!(
                    "preparing the destination {} failed: {}",
                    self.plan.destination,
                    ferry_api::error_chain(&error)
                )));
            }
        };
        self.step(
            "prepare_destination",
            StepState::Done,
            serde_json::json!({ "copy_disks": self.plan.copy_disks, "ready": ready }),
        )
        .await;
        if self.injected_after("prepare_destination")? {
            let again = dst.incoming_prepare(&incoming).await.map_err(|error| {
                Abort::Failed(format!(
                    "preparing the destination a second time failed: {}",
                    ferry_api::error_chain(&error)
                ))
            })?;
            if again.migration_uri != ready.migration_uri {
                return Err(Abort::Failed(format!(
                    "preparing the destination twice gave two answers: {} then {}",
                    ready.migration_uri, again.migration_uri
                )));
            }
        }

        // start_outgoing — undo: outgoing_cancel (resumes the source).
        self.enter(if self.plan.copy_disks.is_empty() {
            "memory"
        } else {
            "mirror"
        })
        .await;
        self.step(
            "start_outgoing",
            StepState::Started,
            serde_json::Value::Null,
        )
        .await;
        self.injected_before("start_outgoing")?;
        self.check_cancel()?;
        let request = OutgoingRequest {
            migration_id: self.plan.id,
            destination_host: self.plan.destination.clone(),
            incoming: ready,
            mirror_disks: self
                .plan
                .copy_disks
                .iter()
                .map(|c| c.disk_id.clone())
                .collect(),
            capabilities: self.plan.strategy.capabilities.clone(),
            max_bandwidth_bytes_per_sec: self.plan.strategy.max_bandwidth_bytes_per_sec,
            downtime_limit_ms: self.plan.strategy.downtime_limit_ms,
        };
        if let Err(error) = src.outgoing_start(&self.plan.vm, &request).await {
            self.step("start_outgoing", StepState::Failed, serde_json::Value::Null)
                .await;
            return Err(Abort::Failed(format!(
                "starting the migration on {} failed: {}",
                self.plan.source,
                ferry_api::error_chain(&error)
            )));
        }
        self.step("start_outgoing", StepState::Done, serde_json::Value::Null)
            .await;
        if self.injected_after("start_outgoing")? {
            src.outgoing_start(&self.plan.vm, &request)
                .await
                .map_err(|error| {
                    Abort::Failed(format!(
                        "starting the migration a second time failed: {}",
                        ferry_api::error_chain(&error)
                    ))
                })?;
        }

        self.converge(&src).await?;
        self.injected_after("converge")?;
        self.check_cancel()?;
        if self.postcopy_requested {
            return self.postcopy_tail(&src, &dst).await;
        }

        // switchover — the source is paused at pre-switchover; complete the
        // mirrors and let QEMU send the last pass.
        self.enter("switchover").await;
        self.step("switchover", StepState::Started, serde_json::Value::Null)
            .await;
        self.injected_before("switchover")?;
        if let Err(error) = src.outgoing_switchover(&self.plan.vm).await {
            // A failed verification of the copied disks is in the source's
            // status: the report says so.
            if let Ok(status) = src.outgoing_status(&self.plan.vm).await {
                self.absorb_verification(&status);
            }
            return Err(Abort::Failed(format!(
                "switchover on {} failed: {}",
                self.plan.source,
                ferry_api::error_chain(&error)
            )));
        }
        let final_status = self.await_source_completed(&src).await?;
        self.confirm_destination(&dst).await?;
        self.step("switchover", StepState::Done, serde_json::Value::Null)
            .await;
        self.absorb(&final_status);
        if self.injected_after("switchover")? {
            // Asked again once QEMU completed: the answer must still be
            // `completed`, nothing restarted.
            let again = src
                .outgoing_switchover(&self.plan.vm)
                .await
                .map_err(|error| {
                    Abort::Failed(format!(
                        "the switchover asked a second time failed: {}",
                        ferry_api::error_chain(&error)
                    ))
                })?;
            if again.phase != "completed" {
                return Err(Abort::Failed(format!(
                    "the switchover asked a second time answered phase {}",
                    again.phase
                )));
            }
        }

        // commit — THE POINT OF NO RETURN. The owner changes by
        // compare-and-swap before the destination may run: a controller
        // that lost the race (or a stale one) cannot commit, and from here
        // on the source is never resumed.
        self.enter("commit").await;
        self.step("commit", StepState::Started, serde_json::Value::Null)
            .await;
        self.injected_before("commit")?;
        // The last moment a cancel can be honoured: the source is paused
        // (pre-switchover or completed), the destination never ran.
        self.check_cancel()?;
        // The destination's QEMU may have died since it confirmed: never
        // commit to a copy that is gone.
        self.confirm_destination(&dst).await?;
        commit(&self.controller, &self.plan.vm, &self.plan.destination)
            .await
            .map_err(Abort::Failed)?;
        self.step("commit", StepState::Done, serde_json::Value::Null)
            .await;
        // From here on an injected failure cannot unwind anything: it is
        // a failed attempt, and the retries below take over.
        if self.injected_after_commit("commit") == Some(Injected::Twice) {
            if let Err(error) =
                commit(&self.controller, &self.plan.vm, &self.plan.destination).await
            {
                self.report.error = Some(format!("committing a second time failed: {error}"));
            }
        }

        // finish_destination — retried: there is no way back.
        self.enter("finish_destination").await;
        let id = self.plan.id;
        let mut inject_failure =
            self.injected_after_commit("finish_destination.before") == Some(Injected::Fail);
        let finished = match retry_after_commit(id, "finishing the destination", 20, || {
            let failed_once = std::mem::take(&mut inject_failure);
            let call = dst.incoming_finish(id);
            let status = dst.incoming_status(id);
            async move {
                if failed_once {
                    return Err(injected_client_error("finish_destination.before"));
                }
                match call.await {
                    Ok(finished) => Ok(finished),
                    // A receiving QEMU that died before the guest ran there
                    // is no copy to finish: stop retrying (see below).
                    Err(error) => match status.await {
                        Ok(status) if destination_lost(&status) => Ok(status),
                        _ => Err(error),
                    },
                }
            }
        })
        .await
        {
            Ok(status) if destination_lost(&status) => {
                // The commit pointed at a copy that no longer exists and
                // never ran: the paused source is the only copy. Point the
                // owner back at it and unwind, which resumes it there.
                warn!(migration = %id, "the destination's QEMU died before the guest ran there; reverting the commit");
                commit(&self.controller, &self.plan.vm, &self.plan.source)
                    .await
                    .map_err(Abort::Failed)?;
                self.step("commit", StepState::Undone, serde_json::Value::Null)
                    .await;
                return Err(Abort::Failed(format!(
                    "the destination's QEMU on {} died after the switchover, before the guest ran \
                     there ({}): the commit was reverted and the VM resumes on {}",
                    self.plan.destination,
                    status.error.unwrap_or_default(),
                    self.plan.source
                )));
            }
            Ok(status) => Some(status),
            Err(error) => {
                // Committed but not resumed: a person must look. The source
                // stays paused (never resumed after commit).
                self.report.error = Some(format!(
                    "committed, but the destination could not be resumed yet (the controller \
                     keeps trying): {}",
                    ferry_api::error_chain(&error)
                ));
                None
            }
        };
        // A finish that did not happen stays pending: the janitor
        // (recovery.rs) keeps at it until the destination answers.
        self.step(
            "finish_destination",
            if finished.is_some() {
                StepState::Done
            } else {
                StepState::Failed
            },
            if finished.is_some() {
                serde_json::Value::Null
            } else {
                serde_json::json!({ "pending": true })
            },
        )
        .await;
        if self.injected_after_commit("finish_destination") == Some(Injected::Twice) {
            if let Err(error) = dst.incoming_finish(id).await {
                self.report.error = Some(format!(
                    "finishing the destination a second time failed: {}",
                    ferry_api::error_chain(&error)
                ));
            }
        }
        if let Some(status) = &finished {
            if let (Some(resumed), Some(stopped)) =
                (status.resumed_at_us, final_status.stopped_at_us)
            {
                if resumed >= stopped {
                    self.report.paused_ms = Some(((resumed - stopped) / 1000) as u64);
                } else {
                    // G1: the guest must never run in two places. A RESUME
                    // before the STOP means it did; say so loudly.
                    tracing::error!(migration = %self.plan.id, stopped, resumed, "destination resumed before the source stopped");
                    self.report.error = Some(format!(
                        "single-owner check failed: the destination resumed at {resumed} µs, before the source stopped at {stopped} µs"
                    ));
                }
            }
        }

        if finished.is_none() {
            // Not resumed yet: the paused source must stay as it is (it is
            // the only copy should the destination turn out to be lost).
            // The janitor finishes the destination, then retires it.
            self.step(
                "retire_source",
                StepState::Failed,
                serde_json::json!({ "pending": true, "after": "finish_destination" }),
            )
            .await;
            return Ok(());
        }

        // retire_source — the source QEMU ends; copied disks are removed only
        // now, after the commit.
        self.enter("retire_source").await;
        let remove_disks: Vec<String> = self
            .plan
            .copy_disks
            .iter()
            .map(|c| c.disk_id.clone())
            .collect();
        let inject_failure =
            self.injected_after_commit("retire_source.before") == Some(Injected::Fail);
        self.retire_source(&src, &remove_disks, inject_failure)
            .await;
        let vm = self.plan.vm.clone();
        if self.injected_after_commit("retire_source") == Some(Injected::Twice) {
            if let Err(error) = src.outgoing_retire(&vm, &remove_disks).await {
                self.report.error = Some(format!(
                    "retiring the source a second time failed: {}",
                    ferry_api::error_chain(&error)
                ));
            }
        }
        Ok(())
    }

    /// The end of a migration that switched to post-copy. QEMU, paused at
    /// pre-switchover, sends the device state with `migrate-continue` and
    /// from then on the source can never run the guest again (QEMU refuses
    /// both `migrate_cancel` and `cont`), even though pages still flow: so
    /// `migrate-continue` is the point of no return here, the commit
    /// follows it at once, and the destination resumes right after (until
    /// then the guest runs nowhere). A link that breaks during post-copy
    /// pauses both QEMUs instead of failing; `drive_postcopy` reconnects
    /// them (`migrate-recover` on the destination, a resuming `migrate` on
    /// the source) until the last page has arrived. Only then is the source
    /// retired: it holds pages the guest has not fetched yet.
    async fn postcopy_tail(&mut self, src: &Client, dst: &Client) -> Result<(), Abort> {
        self.enter("switchover").await;
        self.step(
            "switchover",
            StepState::Started,
            serde_json::json!({ "postcopy": true }),
        )
        .await;
        self.injected_before("switchover")?;
        if let Err(error) = src.outgoing_switchover(&self.plan.vm).await {
            // Before `migrate-continue` took effect the source is still
            // whole: an ordinary failure, unwound.
            let status = src.outgoing_status(&self.plan.vm).await;
            if !matches!(&status, Ok(s) if s.phase.starts_with("postcopy")) {
                return Err(Abort::Failed(format!(
                    "switching over to post-copy on {} failed: {}",
                    self.plan.source,
                    ferry_api::error_chain(&error)
                )));
            }
        }
        // Wait for post-copy (or its end) on the source.
        let started = Instant::now();
        loop {
            match src.outgoing_status(&self.plan.vm).await {
                Ok(status)
                    if status.phase.starts_with("postcopy") || status.phase == "completed" =>
                {
                    self.absorb(&status);
                    break;
                }
                Ok(status) if matches!(status.phase.as_str(), "failed" | "cancelled") => {
                    return Err(Abort::Failed(format!(
                        "the switch to post-copy failed on {}: {}",
                        self.plan.source,
                        status.error.unwrap_or_default()
                    )))
                }
                _ if started.elapsed() > SWITCHOVER_TIMEOUT => {
                    return Err(Abort::Failed("post-copy did not start in time".to_string()))
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        self.step("switchover", StepState::Done, serde_json::Value::Null)
            .await;

        // commit — the guest can only ever run on the destination now.
        self.enter("commit").await;
        self.step("commit", StepState::Started, serde_json::Value::Null)
            .await;
        let committed = commit(&self.controller, &self.plan.vm, &self.plan.destination).await;
        if let Err(error) = committed {
            // Retried by the recovery: post-copy rolls forward.
            self.report.error = Some(format!("post-copy: {error}"));
        }
        self.step("commit", StepState::Done, serde_json::Value::Null)
            .await;

        self.enter("finish_destination").await;
        let id = self.plan.id;
        match retry_after_commit(id, "resuming the destination in post-copy", 20, || {
            dst.incoming_finish(id)
        })
        .await
        {
            Ok(_) => {
                self.step(
                    "finish_destination",
                    StepState::Done,
                    serde_json::Value::Null,
                )
                .await;
            }
            Err(error) => {
                self.report.error = Some(format!(
                    "post-copy: the destination could not be resumed yet (the controller keeps \
                     trying): {}",
                    ferry_api::error_chain(&error)
                ));
                self.step(
                    "finish_destination",
                    StepState::Failed,
                    serde_json::json!({ "pending": true }),
                )
                .await;
            }
        }

        self.enter("postcopy").await;
        self.step("postcopy", StepState::Started, serde_json::Value::Null)
            .await;
        let vm = self.plan.vm.clone();
        let outcome = drive_postcopy(&vm, id, src, dst, |status| self.absorb(status)).await;
        match outcome {
            Ok(()) => {
                self.step("postcopy", StepState::Done, serde_json::Value::Null)
                    .await
            }
            Err(error) => {
                // The guest's memory is split between the two hosts and
                // cannot be made whole: say so, and leave the source
                // alone (a person may still rescue pages from it).
                self.step(
                    "postcopy",
                    StepState::Failed,
                    serde_json::json!({ "error": error }),
                )
                .await;
                return Err(Abort::Lost(format!(
                    "post-copy did not complete, the guest is lost: {error}"
                )));
            }
        }

        self.enter("retire_source").await;
        let remove_disks: Vec<String> = self
            .plan
            .copy_disks
            .iter()
            .map(|c| c.disk_id.clone())
            .collect();
        self.retire_source(src, &remove_disks, false).await;
        Ok(())
    }

    /// retire_source, retried; a retire that keeps failing stays pending
    /// for the janitor. `inject_failure` fails the first attempt (the
    /// `retire_source.before` failpoint).
    async fn retire_source(&mut self, src: &Client, remove_disks: &[String], inject_failure: bool) {
        let (id, vm) = (self.plan.id, self.plan.vm.clone());
        let mut inject_failure = inject_failure;
        if let Err(error) = retry_after_commit(id, "retiring the source", 10, || {
            let failed_once = std::mem::take(&mut inject_failure);
            let call = src.outgoing_retire(&vm, remove_disks);
            async move {
                if failed_once {
                    return Err(injected_client_error("retire_source.before"));
                }
                call.await
            }
        })
        .await
        {
            self.report.error = Some(format!(
                "migrated, but the source could not be cleaned up yet (the controller keeps \
                 trying): {}",
                ferry_api::error_chain(&error)
            ));
            self.step(
                "retire_source",
                StepState::Failed,
                serde_json::json!({ "pending": true, "remove_disks": remove_disks }),
            )
            .await;
        } else {
            self.step("retire_source", StepState::Done, serde_json::Value::Null)
                .await;
        }
    }

    /// What this migration achieved on its link: RAM bytes sent over the
    /// time spent copying memory. (Not the disk mirror: its byte count
    /// includes zero blocks that cost the link almost nothing, which would
    /// make the link look faster than it is.)
    async fn remember_goodput(&self) {
        let busy_ms: u64 = self
            .report
            .phases
            .iter()
            .filter(|p| matches!(p.phase.as_str(), "memory" | "switchover"))
            .map(|p| p.duration_ms)
            .sum();
        let ram_sent = self
            .report
            .progress
            .as_ref()
            .map_or(0, |p| p.ram_transferred_bytes);
        if busy_ms == 0 || ram_sent == 0 {
            return;
        }
        self.controller.link_goodput.lock().await.insert(
            (self.plan.source.clone(), self.plan.destination.clone()),
            ram_sent * 1000 / busy_ms,
        );
    }

    /// Watches the source until QEMU pauses at pre-switchover, escalating
    /// when pre-copy stalls and giving up at the deadline.
    async fn converge(&mut self, src: &Client) -> Result<OutgoingStatus, Abort> {
        let deadline = self.started + Duration::from_secs(self.plan.strategy.deadline_secs);
        let mut last_persist = Instant::now();
        let mut raised_downtime = false;
        let mut postcopy_started = false;
        let mut memory_entered = self.plan.copy_disks.is_empty();
        // Progress watch: over a link that silently drops everything QEMU
        // reports `active` for as long as TCP retransmits (minutes); no byte
        // moved for COPY_STALL_LIMIT means the link is gone.
        let mut last_progress = (u64::MAX, Instant::now());
        loop {
            if *self.cancel.borrow() {
                return Err(Abort::Cancelled("cancelled on request".to_string()));
            }
            if Instant::now() >= deadline {
                return Err(Abort::Cancelled(format!(
                    "deadline of {} s reached before the switchover",
                    self.plan.strategy.deadline_secs
                )));
            }
            let status = match src.outgoing_status(&self.plan.vm).await {
                Ok(status) => status,
                Err(error) => {
                    return Err(Abort::Failed(format!(
                        "the source {} {}: {}",
                        self.plan.source,
                        answer_failure(&error),
                        ferry_api::error_chain(&error)
                    )))
                }
            };
            self.absorb(&status);
            let moved = status.transferred_bytes + status.disk_done_bytes;
            if moved != last_progress.0 {
                last_progress = (moved, Instant::now());
            } else if matches!(status.phase.as_str(), "memory" | "mirroring")
                && last_progress.1.elapsed() > COPY_STALL_LIMIT
            {
                return Err(Abort::Failed(format!(
                    "no byte reached {} for {} s: the link between the hosts seems to be down",
                    self.plan.destination,
                    COPY_STALL_LIMIT.as_secs()
                )));
            }
            match status.phase.as_str() {
                "pre_switchover" => return Ok(status),
                "failed" | "cancelled" => {
                    return Err(Abort::Failed(format!(
                        "QEMU on {} reported the migration {}: {}",
                        self.plan.source,
                        status.phase,
                        status.error.clone().unwrap_or_default()
                    )))
                }
                "memory" if !memory_entered => {
                    memory_entered = true;
                    self.enter("memory").await;
                }
                _ => {}
            }
            if status.phase == "memory" {
                // Escalation 1: allow the whole downtime the user accepts.
                if !raised_downtime
                    && status.passes >= 4
                    && self.plan.strategy.downtime_limit_ms < self.plan.strategy.max_downtime_ms
                {
                    raised_downtime = true;
                    self.escalate(
                        src,
                        OutgoingAdjust {
                            downtime_limit_ms: Some(self.plan.strategy.max_downtime_ms),
                            ..Default::default()
                        },
                        format!("downtime-limit {} ms", self.plan.strategy.max_downtime_ms),
                        format!("pre-copy pass {} has not converged", status.passes),
                    )
                    .await;
                }
                // Escalation 2: post-copy, where allowed.
                let postcopy_due = match self.plan.strategy.postcopy {
                    PostcopyPolicy::Never => false,
                    PostcopyPolicy::Always => status.passes >= 2,
                    PostcopyPolicy::Auto => status.passes >= 8,
                };
                if postcopy_due && !postcopy_started {
                    postcopy_started = true;
                    self.postcopy_requested = true;
                    self.escalate(
                        src,
                        OutgoingAdjust {
                            start_postcopy: true,
                            ..Default::default()
                        },
                        "post-copy".to_string(),
                        format!(
                            "pre-copy pass {} (policy {:?})",
                            status.passes, self.plan.strategy.postcopy
                        ),
                    )
                    .await;
                }
            }
            if last_persist.elapsed() >= Duration::from_secs(1) {
                last_persist = Instant::now();
                self.persist().await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn escalate(
        &mut self,
        src: &Client,
        adjust: OutgoingAdjust,
        action: String,
        reason: String,
    ) {
        info!(migration = %self.plan.id, %action, %reason, "escalating");
        let outcome = src.outgoing_adjust(&self.plan.vm, &adjust).await;
        self.report.escalations.push(Escalation {
            at_ms: self.started.elapsed().as_millis() as u64,
            action: match &outcome {
                Ok(_) => action,
                Err(error) => format!("{action} (failed: {})", ferry_api::error_chain(error)),
            },
            reason,
        });
        self.persist().await;
    }

    async fn await_source_completed(&mut self, src: &Client) -> Result<OutgoingStatus, Abort> {
        let started = Instant::now();
        loop {
            let status = src.outgoing_status(&self.plan.vm).await.map_err(|error| {
                Abort::Failed(format!(
                    "the source {} {} during the switchover: {}",
                    self.plan.source,
                    answer_failure(&error),
                    ferry_api::error_chain(&error)
                ))
            })?;
            match status.phase.as_str() {
                "completed" => return Ok(status),
                "failed" | "cancelled" => {
                    return Err(Abort::Failed(format!(
                        "the switchover failed on {}: {}",
                        self.plan.source,
                        status.error.unwrap_or_default()
                    )))
                }
                _ => {}
            }
            if started.elapsed() > SWITCHOVER_TIMEOUT {
                return Err(Abort::Failed(format!(
                    "the switchover did not complete within {SWITCHOVER_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// With TLS 1.3 the source can see `completed` while the destination
    /// refused or lost the stream: success is the destination's word.
    async fn confirm_destination(&mut self, dst: &Client) -> Result<(), Abort> {
        let started = Instant::now();
        loop {
            match dst.incoming_status(self.plan.id).await {
                Ok(status) if status.migration_status == "completed" => return Ok(()),
                Ok(status) if status.migration_status == "failed" => {
                    return Err(Abort::Failed(format!(
                        "the destination {} failed to load the VM: {}",
                        self.plan.destination,
                        status.error.unwrap_or_default()
                    )))
                }
                Ok(_) => {}
                Err(error) => {
                    return Err(Abort::Failed(format!(
                        "the destination {} {}: {}",
                        self.plan.destination,
                        answer_failure(&error),
                        ferry_api::error_chain(&error)
                    )))
                }
            }
            if started.elapsed() > SWITCHOVER_TIMEOUT {
                return Err(Abort::Failed(
                    "the destination did not confirm the migration in time".to_string(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Undo, newest step first, before the commit: the source resumes and
    /// the destination holds nothing.
    async fn unwind(&mut self) {
        self.enter("unwind").await;
        let done = |name: &str, steps: &[StepRecord]| {
            steps.iter().any(|s| {
                s.name == name
                    && matches!(
                        s.state,
                        StepState::Done | StepState::Started | StepState::Failed
                    )
            })
        };
        if done("start_outgoing", &self.record.steps) {
            if let Ok(src) = self.controller.agent(&self.plan.source).await {
                let vm = self.plan.vm.clone();
                self.undo("start_outgoing", async {
                    src.outgoing_cancel(&vm).await.map(|_| ())
                })
                .await;
            }
        }
        if done("prepare_destination", &self.record.steps) {
            if let Ok(dst) = self.controller.agent(&self.plan.destination).await {
                let id = self.plan.id;
                self.undo("prepare_destination", dst.incoming_abort(id))
                    .await;
            }
        }
    }

    /// Runs one step's undo, persisting `undoing` before and `undone` (or
    /// `failed`, with the error) after.
    async fn undo(
        &mut self,
        name: &str,
        undo: impl std::future::Future<Output = Result<(), ferry_api::ClientError>>,
    ) {
        self.step(name, StepState::Undoing, serde_json::Value::Null)
            .await;
        match undo.await {
            Ok(()) => {
                self.step(name, StepState::Undone, serde_json::Value::Null)
                    .await
            }
            Err(error) => {
                warn!(migration = %self.plan.id, step = name, error = %ferry_api::error_chain(&error), "undo failed");
                self.step(
                    name,
                    StepState::Failed,
                    // Pending: the janitor (recovery.rs) retries it until
                    // the host answers.
                    serde_json::json!({
                        "undo_error": ferry_api::error_chain(&error),
                        "pending": true,
                    }),
                )
                .await;
            }
        }
    }

    /// A cancel asked for since the last look, as an abort (before the
    /// commit only: past it, nothing is undone).
    fn check_cancel(&self) -> Result<(), Abort> {
        if *self.cancel.borrow() {
            return Err(Abort::Cancelled("cancelled on request".to_string()));
        }
        Ok(())
    }

    /// Failpoint `STEP.before` (the step's start is persisted, its action
    /// has not run): an injected failure fails the step.
    fn injected_before(&self, step: &str) -> Result<(), Abort> {
        match failpoints::check(&format!("{step}.before")) {
            Some(Injected::Fail) => Err(Abort::Failed(format!(
                "failpoint {step}.before: injected failure"
            ))),
            _ => Ok(()),
        }
    }

    /// Failpoint `STEP.after` (the step is done and persisted): an injected
    /// failure fails the migration there; `true` asks to run the step again.
    fn injected_after(&self, step: &str) -> Result<bool, Abort> {
        match failpoints::check(&format!("{step}.after")) {
            Some(Injected::Fail) => Err(Abort::Failed(format!(
                "failpoint {step}.after: injected failure"
            ))),
            Some(Injected::Twice) => Ok(true),
            None => Ok(false),
        }
    }

    /// A failpoint past the commit, where nothing may unwind: reported to
    /// the caller, which turns a failure into a failed attempt.
    fn injected_after_commit(&self, point: &str) -> Option<Injected> {
        let name = if point.contains('.') {
            point.to_string()
        } else {
            format!("{point}.after")
        };
        failpoints::check(&name)
    }

    async fn agent(&self, host: &str) -> Result<Client, Abort> {
        self.controller
            .agent(host)
            .await
            .map_err(|e| Abort::Failed(ferry_api::error_chain(&e)))
    }

    /// Folds the source's figures into the report.
    /// The source's comparison of the copied disks, once it has one.
    fn absorb_verification(&mut self, status: &OutgoingStatus) {
        if status.verification.is_some() {
            self.report.verified = status.verified;
            self.report.verification = status.verification.clone();
        }
    }

    fn absorb(&mut self, status: &OutgoingStatus) {
        self.absorb_verification(status);
        self.report.transferred_bytes = status.transferred_bytes.max(self.report.transferred_bytes);
        self.report.passes = status.passes.max(self.report.passes);
        if status.downtime_ms.is_some() {
            self.report.downtime_ms = status.downtime_ms;
        }
        let predicted_remaining_ms = (status.throughput_bytes_per_sec > 0).then(|| {
            (status.ram_remaining_bytes
                + status
                    .disk_total_bytes
                    .saturating_sub(status.disk_done_bytes))
                * 1000
                / status.throughput_bytes_per_sec
        });
        self.report.progress = Some(Progress {
            phase: status.phase.clone(),
            ram_total_bytes: status.ram_total_bytes,
            ram_remaining_bytes: status.ram_remaining_bytes,
            ram_transferred_bytes: status.ram_transferred_bytes,
            dirty_rate_bytes_per_sec: status.dirty_rate_bytes_per_sec,
            throughput_bytes_per_sec: status.throughput_bytes_per_sec,
            disk_total_bytes: status.disk_total_bytes,
            disk_done_bytes: status.disk_done_bytes,
            passes: status.passes,
            predicted_remaining_ms,
        });
    }

    /// Closes the current phase's timing and opens `phase`.
    async fn enter(&mut self, phase: &str) {
        let now = Instant::now();
        if let Some(last) = self.report.phases.last_mut() {
            last.duration_ms = now.duration_since(self.phase_started).as_millis() as u64;
        } else {
            // The pre-flight ran before the saga; its timing starts at zero.
            self.report.phases.push(PhaseTiming {
                phase: "preflight".to_string(),
                started_ms: 0,
                duration_ms: 0,
            });
        }
        self.phase_started = now;
        self.report.phases.push(PhaseTiming {
            phase: phase.to_string(),
            started_ms: self.started.elapsed().as_millis() as u64,
            duration_ms: 0,
        });
        self.report.phase = phase.to_string();
        self.record.phase = phase.to_string();
        self.persist().await;
    }

    /// Records a step's state change in the store before going on.
    async fn step(&mut self, name: &str, state: StepState, detail: serde_json::Value) {
        let now = unix_now();
        match self.record.steps.iter_mut().rev().find(|s| s.name == name) {
            Some(step) if state != StepState::Started => {
                step.state = state;
                if matches!(
                    state,
                    StepState::Done | StepState::Undone | StepState::Failed
                ) {
                    step.finished_at = Some(now);
                }
                if !detail.is_null() {
                    step.detail = detail;
                }
            }
            _ => self.record.steps.push(StepRecord {
                name: name.to_string(),
                state,
                started_at: now,
                finished_at: None,
                detail,
            }),
        }
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
        self.persist().await;
    }
}

/// Writes a migration's report into its record, and the record into the
/// store (compare-and-swap on its generation). Shared by the live saga and
/// the storage jobs (`storage.rs`).
pub(crate) async fn persist_migration(
    store: &dyn store::Store,
    record: &mut MigrationRecord,
    report: &mut MigrationReport,
    started: Instant,
) {
    report.total_ms = started.elapsed().as_millis() as u64;
    record.report = serde_json::to_value(&*report).unwrap_or_default();
    record.status = store_status(report.status);
    record.error = report.error.clone();
    record.updated_at = unix_now();
    match store.update_migration(record, record.generation).await {
        Ok(generation) => record.generation = generation,
        Err(error) => warn!(migration = %record.id, %error, "cannot persist the migration"),
    }
}

/// Ends a migration's report: the last phase's timing closed, the status,
/// the error (if any) and the end time set.
pub(crate) fn end_report(
    report: &mut MigrationReport,
    phase_started: Instant,
    status: MigrationStatus,
    error: Option<String>,
) {
    if let Some(last) = report.phases.last_mut() {
        last.duration_ms = phase_started.elapsed().as_millis() as u64;
    }
    report.status = status;
    if error.is_some() {
        report.error = error;
    }
    report.finished_at_ms = Some(unix_now_ms());
}

#[cfg(test)]
mod tests {
    use super::version_at_least;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("10.0.2", "10.0.0"));
        assert!(version_at_least("10.1.0", "10.0.2"));
        assert!(!version_at_least("9.2.0", "10.0.0"));
        assert!(version_at_least("10.0.2", "10.0.2"));
    }
}

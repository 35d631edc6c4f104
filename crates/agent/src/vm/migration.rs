//! The VM task's half of a live migration: the steps the controller's saga
//! asks of the source (`outgoing_*`) and of the destination (`incoming_*`),
//! in QMP, following DESIGN.md's flow. Each step is safe to repeat; each has
//! its undo here (`outgoing_cancel`, `incoming_abort`).
//!
//! The destination's QEMU starts with `-S -incoming defer`: when the stream
//! ends it stays paused, so the guest cannot run there before the controller
//! commits and calls `incoming_finish` — the source stays authoritative until
//! then.
//!
//! Both halves survive an agent restart (SIGKILL of ferryd, then a new one):
//! what a step needs is in the VM record (`record.rs`: `incoming`,
//! `outgoing`, `arrived`, `retiring`) or asked of QEMU (`query-migrate`,
//! `query-status`, `query-block-jobs`); nothing lives only in memory but
//! figures for the report (the STOP timestamp) and errors already answered.
//! The source sends `migrate` from the VM task itself once the last mirror
//! is READY (`outgoing_advance`, on block job events and every liveness
//! tick), so a restarted agent carries on where the old one stopped.
//!
//! QEMUs that die mid-migration: a source QEMU makes the VM `crashed` (with
//! why), `outgoing_status` answers phase `failed` with that reason, and
//! `outgoing_cancel` only forgets the migration. A receiving QEMU makes
//! `incoming_status` answer `failed` with why (never a crash: the VM was
//! not this host's to run), and `incoming_abort` removes its disks and
//! record.

use std::time::Duration;

use ferry_api::{
    DirtyRate, IncomingReady, IncomingRequest, IncomingStatus, NbdEndpoint, OutgoingAdjust,
    OutgoingRequest, OutgoingStatus, VmState,
};
use ferry_qemu::blockjob::{self, MirrorJob, NbdClientNode};
use ferry_qemu::migration::{self, MigrationAddress, MigrationCapability, MigrationStatus};
use ferry_qemu::nbd::{self, InetAddress, NbdExport, NbdServerConfig};
use ferry_qemu::process::QemuProcess;
use ferry_qemu::qmp::Qmp;
use ferry_qemu::tls::{self, AuthzSimple, TlsCredsX509, TlsEndpoint};
use tracing::{info, warn};

use super::{Attached, VmTask};
use crate::error::AgentError;
use crate::record::{ArrivedRecord, IncomingRecord, OutgoingRecord};

/// QOM ids of the objects a migration adds to QEMU. The two ends use
/// different ids: a VM that arrived here (server credentials) may later
/// leave (client credentials) from the same QEMU.
const TLS_SERVER_ID: &str = "ferry-tls-server";
const TLS_CLIENT_ID: &str = "ferry-tls-client";
const AUTHZ_ID: &str = "ferry-authz";
/// How long completing the ready mirrors may take at the switchover.
const MIRROR_COMPLETE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the VM task knows of its outgoing migration beyond the record
/// (`VmRecord::outgoing`, the persisted facts). A restarted agent starts
/// from the default and asks QEMU for the rest.
#[derive(Debug, Default)]
pub(crate) struct OutgoingRuntime {
    /// QMP timestamp (µs) of the last STOP: the switchover pause.
    pub stopped_at_us: Option<i64>,
    /// Why the migration cannot go on (a mirror that ended, a refused
    /// `migrate`); QEMU's own `error-desc` is added to it.
    pub error: Option<String>,
    /// A cancel has begun.
    pub cancelled: bool,
    /// How comparing the copied disks at the switchover went.
    pub verification: Option<ferry_api::Verification>,
    /// This agent process has seen QEMU take the recorded `migrate` (it
    /// sent it, or found a migration under way after a restart).
    pub migrate_confirmed: bool,
}

/// Longest a switchover's comparison of the copied disks may take.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(600);

/// A value inside QEMU's `key=value,…` options: commas are doubled.
fn image_opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn tls_id(endpoint: TlsEndpoint) -> &'static str {
    match endpoint {
        TlsEndpoint::Server => TLS_SERVER_ID,
        TlsEndpoint::Client => TLS_CLIENT_ID,
    }
}

fn capability(name: &str) -> Option<MigrationCapability> {
    Some(match name {
        "events" => MigrationCapability::Events,
        "pause-before-switchover" => MigrationCapability::PauseBeforeSwitchover,
        "auto-converge" => MigrationCapability::AutoConverge,
        "xbzrle" => MigrationCapability::Xbzrle,
        "multifd" => MigrationCapability::Multifd,
        "postcopy-ram" => MigrationCapability::PostcopyRam,
        "return-path" => MigrationCapability::ReturnPath,
        _ => return None,
    })
}

fn capabilities(names: &[String]) -> Result<Vec<(MigrationCapability, bool)>, AgentError> {
    names
        .iter()
        .map(|name| {
            capability(name)
                .map(|c| (c, true))
                .ok_or_else(|| AgentError::Migration {
                    problem: format!("unknown migration capability {name:?}"),
                })
        })
        .collect()
}

fn qemu_failed(what: &str, error: &dyn std::error::Error) -> AgentError {
    AgentError::Migration {
        problem: format!("{what}: {}", crate::error::chain(error)),
    }
}

impl VmTask {
    pub(super) fn attached(&self) -> Result<&Attached, AgentError> {
        self.attached
            .as_ref()
            .ok_or_else(|| self.wrong_state("migrate", "running"))
    }

    /// Writes the QEMU TLS folder from this host's certificate and adds the
    /// x509 credentials object (idempotent).
    async fn add_tls(&self, qmp: &Qmp, endpoint: TlsEndpoint) -> Result<(), AgentError> {
        let pki = self
            .host
            .config
            .pki
            .as_ref()
            .ok_or_else(|| AgentError::Migration {
                problem: "this host has no certificate configured for migration TLS".to_string(),
            })?;
        let dir = self.paths.dir.join(match endpoint {
            TlsEndpoint::Server => "tls-server",
            TlsEndpoint::Client => "tls-client",
        });
        let issued = ferry_pki::IssuedCert {
            cert_pem: pki.cert_pem.clone(),
            key_pem: pki.key_pem.clone(),
        };
        ferry_pki::write_qemu_tls_dir(&dir, &pki.ca_pem, &issued)
            .map_err(|e| qemu_failed("writing the QEMU TLS folder", &e))?;
        tls::add_tls_creds_x509(
            qmp,
            &TlsCredsX509 {
                id: tls_id(endpoint).to_string(),
                dir,
                endpoint,
            },
        )
        .await
        .map_err(|e| qemu_failed("adding TLS credentials", &e))?;
        Ok(())
    }

    /// Post-copy paused by a broken link (`postcopy-paused`): listen for the
    /// source again, on a fresh port. Also after the finish: in post-copy
    /// the guest runs here while pages still arrive.
    pub(super) async fn incoming_recover(
        &mut self,
        id: uuid::Uuid,
    ) -> Result<IncomingReady, AgentError> {
        let ours = self
            .record
            .incoming
            .as_ref()
            .is_some_and(|i| i.migration_id == id)
            || self
                .record
                .arrived
                .as_ref()
                .is_some_and(|a| a.migration_id == id);
        if !ours {
            return Err(self.no_incoming(id));
        }
        let qmp = self.attached()?.qmp.clone();
        let host = self.host.config.migration_address.clone();
        let listening =
            migration::migrate_recover(&qmp, &MigrationAddress::Tcp(InetAddress::new(host, 0)))
                .await
                .map_err(|e| qemu_failed("migrate-recover", &e))?;
        let ready = IncomingReady {
            migration_uri: format!("tcp:{}:{}", listening.host, listening.port),
            nbd: None,
        };
        info!(vm = self.name(), migration = %id, uri = %ready.migration_uri, "post-copy: listening again for the source");
        Ok(ready)
    }

    /// Post-copy paused by a broken link: reconnect to the destination's
    /// new listener and wait (briefly) to see post-copy running again.
    pub(super) async fn outgoing_resume(
        &mut self,
        uri: &str,
    ) -> Result<OutgoingStatus, AgentError> {
        if self.record.outgoing.is_none() {
            return Err(AgentError::Migration {
                problem: format!("VM {:?} has no outgoing migration", self.name()),
            });
        }
        let address = parse_uri(uri)?;
        let qmp = self.attached()?.qmp.clone();
        let mut events = qmp.subscribe();
        migration::migrate_resume(&qmp, &address)
            .await
            .map_err(|e| qemu_failed("migrate (resume)", &e))?;
        migration::wait_for_resume(&qmp, &mut events, Duration::from_secs(20))
            .await
            .map_err(|e| qemu_failed("resuming post-copy", &e))?;
        info!(vm = self.name(), %uri, "post-copy resumed after a broken link");
        self.outgoing_status().await
    }

    /// Post-copy that makes no progress (a link that drops everything
    /// without a reset leaves TCP waiting for minutes): `migrate-pause`
    /// breaks the channel now, so that post-copy can be resumed on a new one
    /// once the link is back.
    pub(super) async fn outgoing_pause(&mut self) -> Result<OutgoingStatus, AgentError> {
        let qmp = self.attached()?.qmp.clone();
        let info = migration::query_migrate(&qmp)
            .await
            .map_err(|e| qemu_failed("query-migrate", &e))?;
        if info.status == MigrationStatus::PostcopyActive {
            migration::migrate_pause(&qmp)
                .await
                .map_err(|e| qemu_failed("migrate-pause", &e))?;
            info!(
                vm = self.name(),
                "post-copy paused: its link made no progress"
            );
        }
        self.outgoing_status().await
    }

    /// Removes the copies of this host's key that `add_tls` wrote for QEMU.
    /// QEMU read them when the credentials object was made, so once a
    /// migration has ended they are only a second copy of a secret lying
    /// in the VM's folder (G2 counts them as debris).
    fn forget_tls_files(&self) {
        for endpoint in ["tls-server", "tls-client"] {
            let dir = self.paths.dir.join(endpoint);
            if let Err(error) = std::fs::remove_dir_all(&dir) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    warn!(vm = self.name(), dir = %dir.display(), %error, "cannot remove the TLS folder");
                }
            }
        }
    }

    // ---- source --------------------------------------------------------

    /// Starts the migration: TLS, capabilities and limits, NBD client nodes
    /// and write-blocking mirrors; once every mirror is READY the task
    /// sends `migrate` (`outgoing_advance`). The migration is persisted
    /// before QEMU is touched, so that `outgoing_cancel` undoes all of it
    /// even after an agent restart; a failure here undoes what it made.
    pub(super) async fn outgoing_start(
        &mut self,
        request: OutgoingRequest,
    ) -> Result<OutgoingStatus, AgentError> {
        if let Some(outgoing) = &self.record.outgoing {
            if outgoing.migration_id == request.migration_id {
                return self.outgoing_status().await;
            }
            return Err(AgentError::Migration {
                problem: format!("migration {} is already running", outgoing.migration_id),
            });
        }
        if self.state != VmState::Running {
            return Err(self.wrong_state("migrate", "running"));
        }
        if self.record.storage_move.is_some() || self.backup_in_progress() {
            return Err(AgentError::Migration {
                problem: format!(
                    "VM {:?} has a storage move or a backup in progress; migrate it afterwards",
                    self.name()
                ),
            });
        }
        let qmp = self.attached()?.qmp.clone();
        // Check everything that can be checked before anything changes.
        let caps = capabilities(&request.capabilities)?;
        parse_uri(&request.incoming.migration_uri)?;
        for disk in &request.mirror_disks {
            if !self.record.spec.disks.iter().any(|d| &d.id == disk) {
                return Err(AgentError::Migration {
                    problem: format!("VM {:?} has no disk {disk:?} to mirror", self.name()),
                });
            }
        }
        let nbd = match (&request.incoming.nbd, request.mirror_disks.is_empty()) {
            (_, true) => None,
            (Some(nbd), false) => Some(nbd.clone()),
            (None, false) => {
                return Err(AgentError::Migration {
                    problem: "disks to mirror but the destination offers no NBD server".to_string(),
                })
            }
        };
        self.record.outgoing = Some(OutgoingRecord {
            migration_id: request.migration_id,
            destination_host: request.destination_host.clone(),
            mirror_disks: request.mirror_disks.clone(),
            migration_uri: request.incoming.migration_uri.clone(),
            migrate_started: false,
            nbd: request.incoming.nbd.clone(),
        });
        self.outgoing = OutgoingRuntime::default();
        if let Err(error) = self.persist() {
            self.record.outgoing = None;
            return Err(error);
        }
        if let Err(error) = self
            .outgoing_setup(&qmp, &request, &caps, nbd.as_ref())
            .await
        {
            if let Err(undo) = self.outgoing_cancel().await {
                warn!(vm = self.name(), error = %crate::error::chain(&undo), "undoing a failed outgoing start failed");
            }
            return Err(error);
        }
        info!(vm = self.name(), migration = %request.migration_id, to = %request.destination_host, disks = ?request.mirror_disks, "outgoing migration started");
        self.outgoing_advance().await;
        self.outgoing_status().await
    }

    /// The QEMU side of `outgoing_start`.
    async fn outgoing_setup(
        &self,
        qmp: &Qmp,
        request: &OutgoingRequest,
        caps: &[(MigrationCapability, bool)],
        nbd: Option<&NbdEndpoint>,
    ) -> Result<(), AgentError> {
        self.add_tls(qmp, TlsEndpoint::Client).await?;
        migration::set_capabilities(qmp, caps)
            .await
            .map_err(|e| qemu_failed("setting migration capabilities", &e))?;
        let mut params = migration::MigrationParameters::new(request.max_bandwidth_bytes_per_sec);
        params.downtime_limit = Some(Duration::from_millis(request.downtime_limit_ms.max(1)));
        params.tls_creds = Some(TLS_CLIENT_ID.to_string());
        params.tls_hostname = Some(request.destination_host.clone());
        migration::set_parameters(qmp, &params)
            .await
            .map_err(|e| qemu_failed("setting migration parameters", &e))?;
        let Some(nbd) = nbd else {
            return Ok(());
        };
        for disk in &request.mirror_disks {
            let node = NbdClientNode::for_disk(
                disk,
                InetAddress::new(nbd.host.clone(), nbd.port),
                Some(TLS_CLIENT_ID),
                Some(&request.destination_host),
            );
            blockjob::blockdev_add_nbd(qmp, &node).await.map_err(|e| {
                qemu_failed(&format!("connecting disk {disk} to the destination"), &e)
            })?;
            // The disk's root node is the command line's unless a storage
            // move replaced it: ask QEMU.
            let mut job = MirrorJob::for_disk(disk);
            job.device = ferry_qemu::storage::disk_backing(qmp, disk)
                .await
                .map_err(|e| qemu_failed(&format!("finding the node of disk {disk}"), &e))?
                .node_name;
            blockjob::blockdev_mirror(qmp, &job)
                .await
                .map_err(|e| qemu_failed(&format!("starting the mirror of disk {disk}"), &e))?;
        }
        Ok(())
    }

    /// Moves the outgoing migration on: RAM moves only once every disk is
    /// in sync (the write-blocking mirror then keeps them in sync until the
    /// switchover), so `migrate` goes out when the last mirror is READY.
    /// Runs on block job events and on every liveness tick (which also
    /// covers a restarted agent and a missed event); does nothing when
    /// there is nothing to do.
    pub(super) async fn outgoing_advance(&mut self) {
        let Some(outgoing) = &self.record.outgoing else {
            return;
        };
        if self.outgoing.cancelled || self.outgoing.error.is_some() {
            return;
        }
        if outgoing.migrate_started {
            if !self.outgoing.migrate_confirmed {
                self.send_lost_migrate().await;
            }
            return;
        }
        let Some(attached) = &self.attached else {
            return;
        };
        let qmp = attached.qmp.clone();
        if !outgoing.mirror_disks.is_empty() {
            let jobs = match blockjob::query_block_jobs(&qmp).await {
                Ok(jobs) => jobs,
                Err(error) => {
                    warn!(vm = self.name(), error = %crate::error::chain(&error), "query-block-jobs failed");
                    return;
                }
            };
            for disk in &outgoing.mirror_disks {
                let id = blockjob::mirror_job_id(disk);
                match jobs.iter().find(|j| j.device == id) {
                    Some(job) if job.ready => {}
                    Some(_) => return,
                    None => {
                        let error = format!("the mirror of disk {disk} ended before it was ready");
                        warn!(vm = self.name(), %error, "outgoing migration failed");
                        self.outgoing.error = Some(error);
                        return;
                    }
                }
            }
        }
        let address = match parse_uri(&outgoing.migration_uri) {
            Ok(address) => address,
            Err(error) => {
                self.outgoing.error = Some(crate::error::chain(&error));
                return;
            }
        };
        // Recorded first: from here on `query-migrate` speaks of this
        // migration, also to a restarted agent.
        if let Some(outgoing) = &mut self.record.outgoing {
            outgoing.migrate_started = true;
        }
        if let Err(error) = self.persist() {
            if let Some(outgoing) = &mut self.record.outgoing {
                outgoing.migrate_started = false;
            }
            self.outgoing.error = Some(format!(
                "migrate was not started: {}",
                crate::error::chain(&error)
            ));
            return;
        }
        match migration::migrate(&qmp, &address).await {
            Ok(()) => {
                self.outgoing.migrate_confirmed = true;
                info!(vm = self.name(), to = %address, "every disk in sync; RAM migration started")
            }
            Err(error) => {
                self.outgoing.error =
                    Some(format!("migrate failed: {}", crate::error::chain(&error)))
            }
        }
    }

    /// The record says `migrate` went out, but an agent killed between
    /// persisting that and sending it leaves QEMU with no migration at all
    /// (`query-migrate` answers nothing: status `none`, which no started
    /// migration ever returns to): send it now. Any other status means QEMU
    /// took it. Checked once per agent process, on the first tick.
    async fn send_lost_migrate(&mut self) {
        let (Some(outgoing), Some(attached)) = (&self.record.outgoing, &self.attached) else {
            return;
        };
        let qmp = attached.qmp.clone();
        let info = match migration::query_migrate(&qmp).await {
            Ok(info) => info,
            Err(error) => {
                warn!(vm = self.name(), error = %crate::error::chain(&error), "query-migrate failed");
                return;
            }
        };
        if info.status != MigrationStatus::None {
            self.outgoing.migrate_confirmed = true;
            return;
        }
        let address = match parse_uri(&outgoing.migration_uri) {
            Ok(address) => address,
            Err(error) => {
                self.outgoing.error = Some(crate::error::chain(&error));
                return;
            }
        };
        warn!(vm = self.name(), to = %address, "migrate was recorded but never reached QEMU (the agent stopped in between); sending it now");
        match migration::migrate(&qmp, &address).await {
            Ok(()) => self.outgoing.migrate_confirmed = true,
            Err(error) => {
                self.outgoing.error =
                    Some(format!("migrate failed: {}", crate::error::chain(&error)))
            }
        }
    }

    /// A block job ended: if it is one of the outgoing mirrors before
    /// `migrate` (they end only at the switchover, or by an undo), the
    /// migration cannot go on.
    pub(super) fn on_mirror_ended(&mut self, event: &ferry_qemu::qmp::QmpEvent) {
        let Some(outgoing) = &self.record.outgoing else {
            return;
        };
        if outgoing.migrate_started || self.outgoing.cancelled || self.outgoing.error.is_some() {
            return;
        }
        let job = event
            .data
            .get("device")
            .and_then(|d| d.as_str())
            .unwrap_or("");
        let Some(disk) = outgoing
            .mirror_disks
            .iter()
            .find(|d| blockjob::mirror_job_id(d) == job)
        else {
            return;
        };
        let why = match event.data.get("error").and_then(|e| e.as_str()) {
            Some(error) => format!("{}: {error}", event.name),
            None => event.name.clone(),
        };
        let error = format!("the mirror of disk {disk} ended before it was ready ({why})");
        warn!(vm = self.name(), %error, "outgoing migration failed");
        self.outgoing.error = Some(error);
    }

    fn no_outgoing(&self) -> AgentError {
        AgentError::Migration {
            problem: format!("VM {:?} has no outgoing migration", self.name()),
        }
    }

    /// The migration's progress, from QEMU (`query-migrate`, block jobs)
    /// and the record: it answers the same after an agent restart.
    pub(super) async fn outgoing_status(&mut self) -> Result<OutgoingStatus, AgentError> {
        let outgoing = self
            .record
            .outgoing
            .clone()
            .ok_or_else(|| self.no_outgoing())?;
        let Some(attached) = &self.attached else {
            // The source QEMU died mid-migration: the VM crashed (its
            // record says why), and this migration failed with it.
            let why = self
                .record
                .crashed
                .clone()
                .unwrap_or_else(|| "QEMU is not running".to_string());
            return Ok(OutgoingStatus {
                migration_id: outgoing.migration_id,
                phase: "failed".to_string(),
                migration_status: "failed".to_string(),
                error: Some(format!("the source QEMU is gone: {why}")),
                ..Default::default()
            });
        };
        let qmp = attached.qmp.clone();
        let info = migration::query_migrate(&qmp)
            .await
            .map_err(|e| qemu_failed("query-migrate", &e))?;
        let jobs = if outgoing.mirror_disks.is_empty() {
            Vec::new()
        } else {
            blockjob::query_block_jobs(&qmp).await.unwrap_or_default()
        };
        let ram = info.ram.clone().unwrap_or_default();
        let phase = if self.outgoing.error.is_some() {
            "failed"
        } else if self.outgoing.cancelled {
            "cancelled"
        } else if !outgoing.migrate_started {
            "mirroring"
        } else {
            match info.status {
                MigrationStatus::PreSwitchover => "pre_switchover",
                MigrationStatus::Device => "switching",
                MigrationStatus::Completed => "completed",
                MigrationStatus::Failed => "failed",
                MigrationStatus::Cancelled | MigrationStatus::Cancelling => "cancelled",
                MigrationStatus::PostcopyActive => "postcopy",
                MigrationStatus::PostcopyPaused => "postcopy_paused",
                MigrationStatus::PostcopyRecoverSetup | MigrationStatus::PostcopyRecover => {
                    "postcopy_recover"
                }
                _ => "memory",
            }
        };
        let mirrors_ready = outgoing.migrate_started
            || outgoing.mirror_disks.iter().all(|disk| {
                let id = blockjob::mirror_job_id(disk);
                jobs.iter().any(|j| j.device == id && j.ready)
            });
        let mut transferred = ram.transferred;
        let (mut disk_total, mut disk_done) = (0, 0);
        for job in &jobs {
            disk_total += job.len;
            disk_done += job.offset;
        }
        transferred += disk_done;
        // Before `migrate`, QEMU's status may describe an earlier migration.
        let (migration_status, qemu_error) = if outgoing.migrate_started {
            (info.status.as_str().to_string(), info.error_desc.clone())
        } else {
            ("none".to_string(), None)
        };
        Ok(OutgoingStatus {
            migration_id: outgoing.migration_id,
            phase: phase.to_string(),
            migration_status,
            ram_total_bytes: ram.total,
            ram_remaining_bytes: ram.remaining,
            ram_transferred_bytes: ram.transferred,
            transferred_bytes: transferred,
            dirty_rate_bytes_per_sec: ram.dirty_pages_rate * ram.page_size.max(4096),
            throughput_bytes_per_sec: (ram.mbps * 1_000_000.0 / 8.0) as u64,
            passes: ram.dirty_sync_count,
            disk_total_bytes: disk_total,
            disk_done_bytes: disk_done,
            mirrors_ready,
            total_ms: info.total_time,
            downtime_ms: info.downtime,
            expected_downtime_ms: info.expected_downtime,
            cpu_throttle_percent: info.cpu_throttle_percentage,
            stopped_at_us: self.outgoing.stopped_at_us,
            error: self.outgoing.error.clone().or(qemu_error),
            verified: self
                .outgoing
                .verification
                .as_ref()
                .map(|v| v.status == "verified"),
            verification: self.outgoing.verification.clone(),
        })
    }

    /// At `pre-switchover` (the guest is paused): complete every mirror
    /// without force — a ready mirror that is cancelled gracefully leaves
    /// the target identical to the source — then let QEMU send the rest.
    pub(super) async fn outgoing_switchover(&mut self) -> Result<OutgoingStatus, AgentError> {
        let outgoing = self
            .record
            .outgoing
            .clone()
            .ok_or_else(|| self.no_outgoing())?;
        if !outgoing.migrate_started {
            return Err(AgentError::Migration {
                problem: "switchover needs the migration at pre-switchover, it has not started"
                    .to_string(),
            });
        }
        let qmp = self.attached()?.qmp.clone();
        let info = migration::query_migrate(&qmp)
            .await
            .map_err(|e| qemu_failed("query-migrate", &e))?;
        if info.status == MigrationStatus::PreSwitchover {
            let jobs: Vec<String> = outgoing
                .mirror_disks
                .iter()
                .map(|d| blockjob::mirror_job_id(d))
                .collect();
            if !jobs.is_empty() {
                blockjob::complete_mirrors(&qmp, &jobs, MIRROR_COMPLETE_TIMEOUT)
                    .await
                    .map_err(|e| qemu_failed("completing the mirrors", &e))?;
                let verification = match &self.outgoing.verification {
                    Some(done) => done.clone(),
                    None => {
                        let done = self.verify_copies(&outgoing).await;
                        self.outgoing.verification = Some(done.clone());
                        done
                    }
                };
                if verification.status != "verified" {
                    // Before `migrate-continue`: the saga unwinds and the
                    // source resumes on its own disks.
                    return Err(AgentError::Migration {
                        problem: format!(
                            "verification of the copied disks failed: {}",
                            verification.detail
                        ),
                    });
                }
            }
            migration::migrate_continue(&qmp)
                .await
                .map_err(|e| qemu_failed("migrate-continue", &e))?;
        } else if !matches!(
            info.status,
            MigrationStatus::Device | MigrationStatus::Completed
        ) {
            return Err(AgentError::Migration {
                problem: format!(
                    "switchover needs the migration at pre-switchover, it is {}",
                    info.status.as_str()
                ),
            });
        }
        self.outgoing_status().await
    }

    /// With the guest paused at `pre-switchover` and every mirror
    /// completed: compares each source disk with the destination's copy,
    /// read through its NBD export (guest-visible content, whatever the
    /// formats) over the migration's TLS credentials. `qemu-img compare`
    /// skips what both sides report as holes, so a sparse disk costs what
    /// it holds.
    async fn verify_copies(&self, outgoing: &OutgoingRecord) -> ferry_api::Verification {
        let started = std::time::Instant::now();
        let method = "qemu-img compare of each source disk with the destination's copy (its NBD \
                      export, over TLS) at the switchover, the guest paused"
            .to_string();
        let result = async {
            let nbd = outgoing
                .nbd
                .as_ref()
                .ok_or("the destination's NBD server is not recorded")?;
            let tls_dir = self.paths.dir.join("tls-client");
            let mut matched = Vec::new();
            for disk_id in &outgoing.mirror_disks {
                let disk = self
                    .record
                    .spec
                    .disks
                    .iter()
                    .find(|d| &d.id == disk_id)
                    .ok_or_else(|| format!("disk {disk_id} is not in the spec"))?;
                let path = crate::disks::disk_path(&self.host, disk).map_err(|e| crate::error::chain(&e))?;
                let source = format!(
                    "driver={},file.driver=file,file.filename={}",
                    crate::disks::format_name(disk.format),
                    image_opt(&path.display().to_string())
                );
                let copy = format!(
                    "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={},\
                     file.server.port={},file.export={},file.tls-creds=ferry-verify,file.tls-hostname={}",
                    image_opt(&nbd.host),
                    nbd.port,
                    image_opt(disk_id),
                    image_opt(&outgoing.destination_host)
                );
                let output = tokio::time::timeout(
                    VERIFY_TIMEOUT,
                    tokio::process::Command::new(&self.host.qemu_img)
                        .arg("compare")
                        .arg("-U")
                        .arg("--object")
                        .arg(format!(
                            "tls-creds-x509,id=ferry-verify,endpoint=client,dir={}",
                            image_opt(&tls_dir.display().to_string())
                        ))
                        .arg("--image-opts")
                        .arg(&source)
                        .arg(&copy)
                        .kill_on_drop(true)
                        .output(),
                )
                .await
                .map_err(|_| format!("disk {disk_id}: comparing took longer than {VERIFY_TIMEOUT:?}"))?
                .map_err(|e| format!("cannot run qemu-img: {e}"))?;
                let said = format!(
                    "{} {}",
                    String::from_utf8_lossy(&output.stdout).trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                match output.status.code() {
                    Some(0) => matched.push(format!("disk {disk_id}: identical")),
                    Some(1) => return Err(format!("disk {disk_id}: the copy differs: {}", said.trim())),
                    _ => return Err(format!("disk {disk_id}: qemu-img compare failed ({}): {}", output.status, said.trim())),
                }
            }
            Ok::<_, String>(matched.join("; "))
        }
        .await;
        let duration_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(detail) => {
                info!(
                    vm = self.name(),
                    duration_ms, "copied disks verified at the switchover"
                );
                ferry_api::Verification {
                    status: "verified".into(),
                    method,
                    duration_ms,
                    detail,
                }
            }
            Err(detail) => {
                warn!(vm = self.name(), %detail, "verification of the copied disks failed");
                ferry_api::Verification {
                    status: "failed".into(),
                    method,
                    duration_ms,
                    detail,
                }
            }
        }
    }

    pub(super) async fn outgoing_adjust(
        &mut self,
        adjust: OutgoingAdjust,
    ) -> Result<OutgoingStatus, AgentError> {
        if self.record.outgoing.is_none() {
            return Err(self.no_outgoing());
        }
        let qmp = self.attached()?.qmp.clone();
        if let Some(ms) = adjust.downtime_limit_ms {
            migration::set_downtime_limit(&qmp, Duration::from_millis(ms.max(1)))
                .await
                .map_err(|e| qemu_failed("raising the downtime limit", &e))?;
        }
        if let Some(bytes) = adjust.max_bandwidth_bytes_per_sec {
            migration::set_max_bandwidth(&qmp, bytes)
                .await
                .map_err(|e| qemu_failed("changing the bandwidth", &e))?;
        }
        if adjust.start_postcopy {
            migration::migrate_start_postcopy(&qmp)
                .await
                .map_err(|e| qemu_failed("starting post-copy", &e))?;
        }
        self.outgoing_status().await
    }

    /// Undo of `outgoing_start`, before the commit: cancel the migration,
    /// force-cancel the mirrors, drop the NBD nodes, and resume the guest if
    /// the migration paused it (also from `postmigrate`, after a migration
    /// that completed but was never committed). Works from the record, so
    /// also after an agent restart; harmless when the source QEMU is gone.
    /// Safe to repeat.
    pub(super) async fn outgoing_cancel(&mut self) -> Result<(), AgentError> {
        let Some(outgoing) = self.record.outgoing.clone() else {
            return Ok(());
        };
        self.outgoing.cancelled = true;
        let alive = self
            .attached
            .as_ref()
            .is_some_and(|attached| attached.process.is_alive());
        if !alive {
            if let Some(attached) = &self.attached {
                let pid = attached.process.pid;
                self.on_process_gone(format!("QEMU (pid {pid}) exited without being asked to"));
            }
            // Nothing of the migration is left in a QEMU that is gone.
            self.forget_outgoing()?;
            info!(vm = self.name(), migration = %outgoing.migration_id, "outgoing migration cancelled; its source QEMU had ended");
            return Ok(());
        }
        let qmp = self.attached()?.qmp.clone();
        if outgoing.migrate_started {
            let info = migration::query_migrate(&qmp)
                .await
                .map_err(|e| qemu_failed("query-migrate", &e))?;
            if !info.status.is_terminal() && info.status != MigrationStatus::None {
                if let Err(error) = migration::migrate_cancel(&qmp).await {
                    warn!(vm = self.name(), error = %crate::error::chain(&error), "migrate_cancel failed");
                }
                if let Err(error) = migration::wait_for_status(
                    &qmp,
                    &[
                        MigrationStatus::Cancelled,
                        MigrationStatus::Failed,
                        MigrationStatus::Completed,
                    ],
                    Duration::from_secs(10),
                )
                .await
                {
                    warn!(vm = self.name(), error = %crate::error::chain(&error), "the migration did not end after migrate_cancel");
                }
            }
        }
        // The mirrors' targets are thrown away: break their connections
        // first, or a cancel over a dead link waits on TCP (see yank_nbd).
        let nbd_nodes: Vec<String> = outgoing
            .mirror_disks
            .iter()
            .map(|disk| blockjob::nbd_node_name(disk))
            .collect();
        if let Err(error) = blockjob::yank_nbd(&qmp, &nbd_nodes).await {
            warn!(vm = self.name(), error = %crate::error::chain(&error), "yanking the NBD connections failed");
        }
        for disk in &outgoing.mirror_disks {
            if let Err(error) = blockjob::force_cancel(
                &qmp,
                &blockjob::mirror_job_id(disk),
                Duration::from_secs(10),
            )
            .await
            {
                warn!(vm = self.name(), disk, error = %crate::error::chain(&error), "force-cancelling the mirror failed");
            }
            if let Err(error) = blockjob::blockdev_del(&qmp, &blockjob::nbd_node_name(disk)).await {
                warn!(vm = self.name(), disk, error = %crate::error::chain(&error), "removing the NBD node failed");
            }
        }
        let _ = tls::del_object(&qmp, TLS_CLIENT_ID).await;
        let status = qmp
            .query_status()
            .await
            .map_err(|e| qemu_failed("query-status", &e))?;
        if !status.running {
            qmp.cont().await.map_err(|e| {
                qemu_failed(
                    &format!("resuming the source (run state {})", status.status),
                    &e,
                )
            })?;
        }
        self.forget_outgoing()?;
        self.forget_tls_files();
        self.refresh_state().await;
        info!(
            vm = self.name(),
            migration = %outgoing.migration_id,
            "outgoing migration cancelled; the source runs"
        );
        Ok(())
    }

    fn forget_outgoing(&mut self) -> Result<(), AgentError> {
        let outgoing = self.record.outgoing.take();
        if let Err(error) = self.persist() {
            self.record.outgoing = outgoing;
            return Err(error);
        }
        self.outgoing = OutgoingRuntime::default();
        Ok(())
    }

    /// After the commit: this host no longer owns the VM. Its QEMU ends and
    /// its record goes; with copied storage, so do its disk files. The
    /// retire is recorded first: the QEMU's exit is then expected, and a
    /// restarted agent completes it. Never fails (what cannot be removed is
    /// logged).
    pub(super) async fn outgoing_retire(&mut self, remove_disks: &[String]) {
        self.record.should_run = false;
        self.record.retiring = Some(remove_disks.to_vec());
        self.persist_or_warn();
        if let Some(attached) = self.attached.take() {
            quit(&attached, Duration::from_secs(10)).await;
        } else {
            self.kill_recorded_process().await;
        }
        self.state = VmState::Stopped;
        for disk in &self.record.spec.disks {
            let copied = remove_disks.contains(&disk.id)
                && matches!(disk.source, ferry_core::spec::DiskSource::Datastore { .. });
            if copied {
                if let Ok(path) = crate::disks::disk_path(&self.host, disk) {
                    remove_file_or_warn(self.name(), &path);
                }
            }
        }
        if let Err(error) = std::fs::remove_dir_all(&self.paths.dir) {
            if error.kind() != std::io::ErrorKind::NotFound {
                warn!(vm = self.name(), %error, "removing the VM folder failed");
            }
        }
        info!(vm = self.name(), removed = ?remove_disks, "VM retired after migrating away");
    }

    /// Ends the QEMU the record names when no QMP connection to it exists
    /// (its monitor did not answer): SIGKILL, by pid and start time.
    async fn kill_recorded_process(&mut self) {
        let Some(recorded) = self.record.process.take() else {
            return;
        };
        if let Ok(process) = QemuProcess::reattach(recorded.pid, recorded.start_time) {
            let _ = process.kill(nix::sys::signal::Signal::SIGKILL);
            if process.wait_exit(Duration::from_secs(5)).await.is_err() {
                warn!(
                    vm = self.name(),
                    pid = recorded.pid,
                    "QEMU did not exit after SIGKILL"
                );
            }
        }
    }

    pub(super) async fn dirty_rate(&mut self, seconds: u64) -> Result<DirtyRate, AgentError> {
        let qmp = self.attached()?.qmp.clone();
        let rate = migration::calc_dirty_rate(&qmp, Duration::from_secs(seconds.clamp(1, 60)))
            .await
            .map_err(|e| qemu_failed("calc-dirty-rate", &e))?;
        Ok(DirtyRate {
            bytes_per_sec: rate.mib_per_sec << 20,
            sample_ms: rate.sampled_for.as_millis() as u64,
        })
    }

    // ---- destination ---------------------------------------------------

    /// Starts the receiving QEMU (paused, `-incoming defer`), exports the
    /// copy-mode disks over NBD with TLS, and listens for the stream. Only
    /// the source host's certificate may connect (tls-authz). Repeating the
    /// call answers the same (also after an agent restart: where it listens
    /// is recorded); a prepare an agent restart interrupted starts over.
    pub(super) async fn incoming_prepare(
        &mut self,
        request: IncomingRequest,
    ) -> Result<IncomingReady, AgentError> {
        if let Some(incoming) = &self.record.incoming {
            if incoming.migration_id != request.migration_id {
                return Err(AgentError::Migration {
                    problem: format!(
                        "VM {:?} is receiving migration {}, not {}",
                        self.name(),
                        incoming.migration_id,
                        request.migration_id
                    ),
                });
            }
            if let Some(ready) = &incoming.ready {
                if self.attached.is_none() {
                    return Err(AgentError::Migration {
                        problem: format!(
                            "the receiving QEMU of migration {} is gone: {}",
                            request.migration_id,
                            self.incoming_failure_reason()
                        ),
                    });
                }
                return Ok(ready.clone());
            }
            // Half prepared: this QEMU has received nothing (nobody knew
            // where it listens). Start over with a fresh one.
            if let Some(attached) = self.attached.take() {
                info!(
                    vm = self.name(),
                    "restarting an incoming QEMU whose preparation was interrupted"
                );
                quit(&attached, Duration::from_secs(5)).await;
            }
            self.kill_recorded_process().await;
            self.state = VmState::Stopped;
        } else if self.state.has_process() || self.record.arrived.is_some() {
            return Err(self.wrong_state("receive a migration", "a new incoming VM"));
        }
        self.incoming_failure = None;
        self.guest_ran = false;
        self.resumed_at_us = None;
        self.record.incoming = Some(IncomingRecord {
            migration_id: request.migration_id,
            source_host: request.source_host.clone(),
            ready: None,
            finishing: false,
        });
        self.persist()?;
        self.launch(Some("defer"), true).await?;
        let qmp = self.attached()?.qmp.clone();
        self.add_tls(&qmp, TlsEndpoint::Server).await?;
        let authz = ferry_pki::PeerIdentity::host(&request.source_host).tls_authz_identity();
        tls::add_authz_simple(
            &qmp,
            &AuthzSimple {
                id: AUTHZ_ID.to_string(),
                identity: authz,
            },
        )
        .await
        .map_err(|e| qemu_failed("adding the TLS authorization", &e))?;
        let host = self.host.config.migration_address.clone();
        let nbd = if request.copy_disks.is_empty() {
            None
        } else {
            let port =
                nbd::free_loopback_port().map_err(|e| qemu_failed("finding a port for NBD", &e))?;
            nbd::nbd_server_start(
                &qmp,
                &NbdServerConfig {
                    addr: InetAddress::new(host.clone(), port),
                    tls_creds: Some(TLS_SERVER_ID.to_string()),
                    tls_authz: Some(AUTHZ_ID.to_string()),
                    max_connections: None,
                },
            )
            .await
            .map_err(|e| qemu_failed("starting the NBD server", &e))?;
            for disk in &request.copy_disks {
                nbd::block_export_add(&qmp, &NbdExport::for_disk(&disk.disk_id))
                    .await
                    .map_err(|e| qemu_failed(&format!("exporting disk {}", disk.disk_id), &e))?;
            }
            Some(NbdEndpoint {
                host: host.clone(),
                port,
            })
        };
        migration::set_capabilities(&qmp, &capabilities(&request.capabilities)?)
            .await
            .map_err(|e| qemu_failed("setting migration capabilities", &e))?;
        let mut params = migration::MigrationParameters::new(1 << 30);
        params.tls_creds = Some(TLS_SERVER_ID.to_string());
        params.tls_authz = Some(AUTHZ_ID.to_string());
        params.announce = Some(migration::Announce::FERRY);
        migration::set_parameters(&qmp, &params)
            .await
            .map_err(|e| qemu_failed("setting migration parameters", &e))?;
        let listening = migration::migrate_incoming(
            &qmp,
            &MigrationAddress::Tcp(InetAddress::new(host, 0)),
            false,
        )
        .await
        .map_err(|e| qemu_failed("migrate-incoming", &e))?;
        let ready = IncomingReady {
            migration_uri: format!("tcp:{}:{}", listening.host, listening.port),
            nbd,
        };
        if let Some(incoming) = &mut self.record.incoming {
            incoming.ready = Some(ready.clone());
        }
        self.persist()?;
        info!(vm = self.name(), migration = %request.migration_id, from = %request.source_host, uri = %ready.migration_uri, "ready to receive");
        Ok(ready)
    }

    fn incoming_failure_reason(&self) -> String {
        self.incoming_failure
            .clone()
            .unwrap_or_else(|| "the receiving QEMU is not running".to_string())
    }

    fn no_incoming(&self, id: uuid::Uuid) -> AgentError {
        AgentError::Migration {
            problem: format!(
                "no incoming migration {id} on host {} (VM {:?} is not receiving it)",
                self.host.config.host_name,
                self.name()
            ),
        }
    }

    /// The answer about a migration that brought the VM here and finished.
    fn arrived_status(&self, id: uuid::Uuid) -> Option<IncomingStatus> {
        let arrived = self.record.arrived.as_ref()?;
        (arrived.migration_id == id).then(|| IncomingStatus {
            migration_id: id,
            vm: self.name().to_string(),
            run_state: self.state.to_string(),
            migration_status: "completed".to_string(),
            guest_ran: true,
            resumed_at_us: arrived.resumed_at_us,
            error: None,
        })
    }

    /// Where migration `id` stands here, from QEMU (`query-status`,
    /// `query-migrate`) and the record: it answers the same after an agent
    /// restart. A receiving QEMU that died answers `failed` with why.
    pub(super) async fn incoming_status(
        &mut self,
        id: uuid::Uuid,
    ) -> Result<IncomingStatus, AgentError> {
        let incoming = match &self.record.incoming {
            Some(incoming) if incoming.migration_id == id => incoming.clone(),
            _ => return self.arrived_status(id).ok_or_else(|| self.no_incoming(id)),
        };
        let (run_state, migration_status, error) = match &self.attached {
            Some(attached) => {
                let status = attached
                    .qmp
                    .query_status()
                    .await
                    .map_err(|e| qemu_failed("query-status", &e))?;
                let info = migration::query_migrate(&attached.qmp)
                    .await
                    .map_err(|e| qemu_failed("query-migrate", &e))?;
                if status.running {
                    self.guest_ran = true;
                }
                (
                    status.status.as_str().to_string(),
                    info.status.as_str().to_string(),
                    info.error_desc,
                )
            }
            None => (
                "gone".to_string(),
                "failed".to_string(),
                Some(format!(
                    "the receiving QEMU is gone: {}",
                    self.incoming_failure_reason()
                )),
            ),
        };
        Ok(IncomingStatus {
            migration_id: incoming.migration_id,
            vm: self.name().to_string(),
            run_state,
            migration_status,
            guest_ran: self.guest_ran || incoming.finishing,
            resumed_at_us: self.resumed_at_us,
            error,
        })
    }

    /// After the commit: stop serving NBD and run the guest here. From now
    /// on this host owns the VM: that is recorded (`finishing`) before the
    /// guest resumes, so an agent restart completes the finish and nothing
    /// aborts it. Refused unless the QEMU received the whole migration.
    /// Safe to repeat.
    pub(super) async fn incoming_finish(
        &mut self,
        id: uuid::Uuid,
    ) -> Result<IncomingStatus, AgentError> {
        let incoming = match &self.record.incoming {
            Some(incoming) if incoming.migration_id == id => incoming.clone(),
            // Already finished (a repeated call after a lost answer).
            _ => return self.arrived_status(id).ok_or_else(|| self.no_incoming(id)),
        };
        let Some(attached) = &self.attached else {
            return Err(AgentError::Migration {
                problem: format!(
                    "cannot finish migration {id}: the receiving QEMU is gone: {}",
                    self.incoming_failure_reason()
                ),
            });
        };
        let qmp = attached.qmp.clone();
        if !incoming.finishing {
            let info = migration::query_migrate(&qmp)
                .await
                .map_err(|e| qemu_failed("query-migrate", &e))?;
            // Post-copy: the guest must run here before the last page has
            // arrived (the source cannot run it any more); it is resumed
            // while pages still come in.
            if info.status != MigrationStatus::Completed && !info.status.is_postcopy() {
                return Err(AgentError::Migration {
                    problem: format!(
                        "cannot finish migration {id}: the incoming migration is {}{}",
                        info.status.as_str(),
                        info.error_desc
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ),
                });
            }
            if let Some(incoming) = &mut self.record.incoming {
                incoming.finishing = true;
            }
            self.record.should_run = true;
            if let Err(error) = self.persist() {
                if let Some(incoming) = &mut self.record.incoming {
                    incoming.finishing = false;
                }
                self.record.should_run = false;
                return Err(error);
            }
        }
        nbd::nbd_server_stop(&qmp)
            .await
            .map_err(|e| qemu_failed("nbd-server-stop", &e))?;
        let status = qmp
            .query_status()
            .await
            .map_err(|e| qemu_failed("query-status", &e))?;
        if !status.running {
            // QEMU sends the RESUME event before `cont`'s reply: subscribe
            // first so that its timestamp (the end of the guest's pause) is
            // caught here, where the report needs it.
            let mut events = qmp.subscribe();
            qmp.cont()
                .await
                .map_err(|e| qemu_failed("resuming the guest", &e))?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
                if event.name == "RESUME" {
                    self.resumed_at_us = event.timestamp.as_micros();
                    break;
                }
            }
        }
        self.guest_ran = true;
        self.record.incoming = None;
        self.record.arrived = Some(ArrivedRecord {
            migration_id: id,
            resumed_at_us: self.resumed_at_us,
        });
        self.record.should_run = true;
        self.persist()?;
        self.forget_tls_files();
        self.refresh_state().await;
        info!(vm = self.name(), migration = %id, "migration finished; the guest runs here");
        self.arrived_status(id).ok_or_else(|| self.no_incoming(id))
    }

    /// Undo of `incoming_prepare`, before the commit: end the waiting QEMU
    /// and delete the disks made for it and the record. Refused once the
    /// guest has run here (or the finish began): then this is the only live
    /// copy. Answers whether the VM is gone; `false` (nothing done) when
    /// this VM has nothing of migration `id`.
    pub(super) async fn incoming_abort(&mut self, id: uuid::Uuid) -> Result<bool, AgentError> {
        let refuse = |this: &Self| {
            AgentError::Migration {
            problem: format!(
                "VM {:?} has run on host {}; migration {id} is no longer an incoming migration to abort",
                this.name(),
                this.host.config.host_name
            ),
        }
        };
        let incoming = match &self.record.incoming {
            Some(incoming) if incoming.migration_id == id => incoming.clone(),
            _ if self
                .record
                .arrived
                .as_ref()
                .is_some_and(|a| a.migration_id == id) =>
            {
                return Err(refuse(self));
            }
            _ => return Ok(false),
        };
        if incoming.finishing || self.guest_ran {
            return Err(refuse(self));
        }
        if let Some(attached) = &self.attached {
            // QEMU's own word, in case an event was missed.
            if let Ok(status) = attached.qmp.query_status().await {
                if status.running {
                    self.guest_ran = true;
                    return Err(refuse(self));
                }
            }
        }
        self.discard_incoming().await;
        info!(
            vm = self.name(),
            migration = %id,
            "incoming migration aborted; nothing left here"
        );
        Ok(true)
    }

    /// Removes everything an incoming migration made here: its QEMU (which
    /// never ran the guest), then the disks made for it, its runtime files
    /// and its record.
    pub(super) async fn discard_incoming(&mut self) {
        self.record.should_run = false;
        if let Some(attached) = self.attached.take() {
            quit(&attached, Duration::from_secs(5)).await;
        }
        self.kill_recorded_process().await;
        self.state = VmState::Stopped;
        // Disks are deleted only after the QEMU using them is gone.
        for file in &self.record.created_files {
            remove_file_or_warn(self.name(), file);
        }
        if let Err(error) = std::fs::remove_dir_all(&self.paths.dir) {
            if error.kind() != std::io::ErrorKind::NotFound {
                warn!(vm = self.name(), %error, "removing the VM folder failed");
            }
        }
    }
}

/// Removes a file that should go; one already gone is fine.
fn remove_file_or_warn(vm: &str, path: &std::path::Path) {
    if let Err(error) = std::fs::remove_file(path) {
        if error.kind() != std::io::ErrorKind::NotFound {
            warn!(vm, path = %path.display(), %error, "removing a file failed");
        }
    }
}

/// Ends a QEMU this host no longer needs: `quit`, then SIGKILL if it has
/// not exited within `grace`.
async fn quit(attached: &Attached, grace: Duration) {
    let _ = attached.qmp.quit().await;
    if attached.process.wait_exit(grace).await.is_err() {
        let _ = attached.process.kill(nix::sys::signal::Signal::SIGKILL);
        let _ = attached.process.wait_exit(Duration::from_secs(5)).await;
    }
}

/// `tcp:HOST:PORT` → an address (the only transport Ferry uses).
fn parse_uri(uri: &str) -> Result<MigrationAddress, AgentError> {
    let bad = || AgentError::Migration {
        problem: format!("migration URI {uri:?} is not tcp:HOST:PORT"),
    };
    let rest = uri.strip_prefix("tcp:").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(MigrationAddress::Tcp(InetAddress::new(
        host.trim_matches(['[', ']']),
        port,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parses() {
        assert_eq!(
            parse_uri("tcp:127.0.0.1:4444").unwrap(),
            MigrationAddress::Tcp(InetAddress::new("127.0.0.1", 4444))
        );
        assert!(parse_uri("unix:/x").is_err());
        assert!(parse_uri("tcp:host").is_err());
    }

    #[test]
    fn capabilities_map_and_refuse_unknown() {
        assert!(capabilities(&["events".into(), "postcopy-ram".into()]).is_ok());
        assert!(capabilities(&["teleport".into()]).is_err());
    }
}

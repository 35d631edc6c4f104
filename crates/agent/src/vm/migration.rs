//! The VM task's half of a live migration: the steps the controller's saga
//! asks of the source (`outgoing_*`) and of the destination (`incoming_*`),
//! in QMP, following DESIGN.md's flow. Each step is safe to repeat; each has
//! its undo here (`outgoing_cancel`, `incoming_abort`).
//!
//! The destination's QEMU starts with `-S -incoming defer`: when the stream
//! ends it stays paused, so the guest cannot run there before the controller
//! commits and calls `incoming_finish` — the source stays authoritative until
//! then.

use std::sync::Arc;
use std::time::Duration;

use ferry_api::{
    DirtyRate, IncomingReady, IncomingRequest, IncomingStatus, NbdEndpoint, OutgoingAdjust,
    OutgoingRequest, OutgoingStatus, VmState,
};
use ferry_qemu::blockjob::{self, MirrorJob, NbdClientNode};
use ferry_qemu::migration::{self, MigrationAddress, MigrationCapability, MigrationStatus};
use ferry_qemu::nbd::{self, InetAddress, NbdExport, NbdServerConfig};
use ferry_qemu::qmp::Qmp;
use ferry_qemu::tls::{self, AuthzSimple, TlsCredsX509, TlsEndpoint};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{Attached, VmTask};
use crate::error::AgentError;
use crate::record::IncomingRecord;

/// QOM ids of the objects a migration adds to QEMU. The two ends use
/// different ids: a VM that arrived here (server credentials) may later
/// leave (client credentials) from the same QEMU.
const TLS_SERVER_ID: &str = "ferry-tls-server";
const TLS_CLIENT_ID: &str = "ferry-tls-client";
const AUTHZ_ID: &str = "ferry-authz";
/// How long a mirror may take to reach READY (it copies the whole disk).
const MIRROR_READY_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long completing the ready mirrors may take at the switchover.
const MIRROR_COMPLETE_TIMEOUT: Duration = Duration::from_secs(60);

/// A migration leaving this host.
pub(crate) struct Outgoing {
    pub migration_id: uuid::Uuid,
    pub mirror_disks: Vec<String>,
    /// What the background task (mirrors to READY, then `migrate`) reports.
    pub shared: Arc<Mutex<OutgoingShared>>,
    pub task: tokio::task::JoinHandle<()>,
    /// QMP timestamp (µs) of the last STOP: the switchover pause.
    pub stopped_at_us: Option<i64>,
    pub cancelled: bool,
}

#[derive(Default)]
pub(crate) struct OutgoingShared {
    pub mirrors_ready: bool,
    pub migrate_started: bool,
    pub error: Option<String>,
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

    // ---- source --------------------------------------------------------

    /// Starts the migration: TLS, capabilities and limits, NBD client nodes
    /// and write-blocking mirrors; a background task waits for every
    /// mirror's READY and then starts `migrate`.
    pub(super) async fn outgoing_start(
        &mut self,
        request: OutgoingRequest,
    ) -> Result<OutgoingStatus, AgentError> {
        if let Some(outgoing) = &self.outgoing {
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
        let qmp = self.attached()?.qmp.clone();
        self.add_tls(&qmp, TlsEndpoint::Client).await?;
        migration::set_capabilities(&qmp, &capabilities(&request.capabilities)?)
            .await
            .map_err(|e| qemu_failed("setting migration capabilities", &e))?;
        let mut params = migration::MigrationParameters::new(request.max_bandwidth_bytes_per_sec);
        params.downtime_limit = Some(Duration::from_millis(request.downtime_limit_ms.max(1)));
        params.tls_creds = Some(TLS_CLIENT_ID.to_string());
        params.tls_hostname = Some(request.destination_host.clone());
        migration::set_parameters(&qmp, &params)
            .await
            .map_err(|e| qemu_failed("setting migration parameters", &e))?;

        let mut jobs = Vec::new();
        if !request.mirror_disks.is_empty() {
            let nbd = request
                .incoming
                .nbd
                .as_ref()
                .ok_or_else(|| AgentError::Migration {
                    problem: "disks to mirror but the destination offers no NBD server".to_string(),
                })?;
            for disk in &request.mirror_disks {
                let node = NbdClientNode::for_disk(
                    disk,
                    InetAddress::new(nbd.host.clone(), nbd.port),
                    Some(TLS_CLIENT_ID),
                    Some(&request.destination_host),
                );
                blockjob::blockdev_add_nbd(&qmp, &node).await.map_err(|e| {
                    qemu_failed(&format!("connecting disk {disk} to the destination"), &e)
                })?;
                let job = MirrorJob::for_disk(disk);
                blockjob::blockdev_mirror(&qmp, &job)
                    .await
                    .map_err(|e| qemu_failed(&format!("starting the mirror of disk {disk}"), &e))?;
                jobs.push(job.job_id);
            }
        }
        let address = parse_uri(&request.incoming.migration_uri)?;
        let shared = Arc::new(Mutex::new(OutgoingShared {
            mirrors_ready: jobs.is_empty(),
            ..Default::default()
        }));
        let task_shared = shared.clone();
        let task = tokio::spawn(async move {
            // RAM moves only once every disk is in sync: the mirror then
            // keeps them in sync (write-blocking) until the switchover.
            if !jobs.is_empty() {
                if let Err(error) = blockjob::wait_ready(&qmp, &jobs, MIRROR_READY_TIMEOUT).await {
                    task_shared.lock().await.error = Some(format!(
                        "mirror never became ready: {}",
                        crate::error::chain(&error)
                    ));
                    return;
                }
                task_shared.lock().await.mirrors_ready = true;
            }
            match migration::migrate(&qmp, &address).await {
                Ok(()) => task_shared.lock().await.migrate_started = true,
                Err(error) => {
                    task_shared.lock().await.error =
                        Some(format!("migrate failed: {}", crate::error::chain(&error)))
                }
            }
        });
        info!(vm = self.name(), migration = %request.migration_id, to = %request.destination_host, disks = ?request.mirror_disks, "outgoing migration started");
        self.outgoing = Some(Outgoing {
            migration_id: request.migration_id,
            mirror_disks: request.mirror_disks,
            shared,
            task,
            stopped_at_us: None,
            cancelled: false,
        });
        self.outgoing_status().await
    }

    pub(super) async fn outgoing_status(&mut self) -> Result<OutgoingStatus, AgentError> {
        let outgoing = self
            .outgoing
            .as_ref()
            .ok_or_else(|| AgentError::Migration {
                problem: format!("VM {:?} has no outgoing migration", self.name()),
            })?;
        let qmp = self.attached()?.qmp.clone();
        let shared = outgoing.shared.lock().await;
        let info = migration::query_migrate(&qmp)
            .await
            .map_err(|e| qemu_failed("query-migrate", &e))?;
        let jobs = if outgoing.mirror_disks.is_empty() {
            Vec::new()
        } else {
            blockjob::query_block_jobs(&qmp).await.unwrap_or_default()
        };
        let ram = info.ram.clone().unwrap_or_default();
        let phase = if shared.error.is_some() {
            "failed"
        } else if outgoing.cancelled {
            "cancelled"
        } else if !shared.migrate_started {
            "mirroring"
        } else {
            match info.status {
                MigrationStatus::PreSwitchover => "pre_switchover",
                MigrationStatus::Device => "switching",
                MigrationStatus::Completed => "completed",
                MigrationStatus::Failed => "failed",
                MigrationStatus::Cancelled | MigrationStatus::Cancelling => "cancelled",
                MigrationStatus::PostcopyActive => "postcopy",
                _ => "memory",
            }
        };
        let mut transferred = ram.transferred;
        let (mut disk_total, mut disk_done) = (0, 0);
        for job in &jobs {
            disk_total += job.len;
            disk_done += job.offset;
        }
        transferred += disk_done;
        Ok(OutgoingStatus {
            migration_id: outgoing.migration_id,
            phase: phase.to_string(),
            migration_status: info.status.as_str().to_string(),
            ram_total_bytes: ram.total,
            ram_remaining_bytes: ram.remaining,
            ram_transferred_bytes: ram.transferred,
            transferred_bytes: transferred,
            dirty_rate_bytes_per_sec: ram.dirty_pages_rate * ram.page_size.max(4096),
            throughput_bytes_per_sec: (ram.mbps * 1_000_000.0 / 8.0) as u64,
            passes: ram.dirty_sync_count,
            disk_total_bytes: disk_total,
            disk_done_bytes: disk_done,
            mirrors_ready: shared.mirrors_ready,
            total_ms: info.total_time,
            downtime_ms: info.downtime,
            expected_downtime_ms: info.expected_downtime,
            cpu_throttle_percent: info.cpu_throttle_percentage,
            stopped_at_us: outgoing.stopped_at_us,
            error: shared.error.clone().or(info.error_desc.clone()),
        })
    }

    /// At `pre-switchover` (the guest is paused): complete every mirror
    /// without force — a ready mirror that is cancelled gracefully leaves
    /// the target identical to the source — then let QEMU send the rest.
    pub(super) async fn outgoing_switchover(&mut self) -> Result<OutgoingStatus, AgentError> {
        let outgoing = self
            .outgoing
            .as_ref()
            .ok_or_else(|| AgentError::Migration {
                problem: format!("VM {:?} has no outgoing migration", self.name()),
            })?;
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

    pub(super) async fn outgoing_adjust(
        &mut self,
        adjust: OutgoingAdjust,
    ) -> Result<OutgoingStatus, AgentError> {
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
    /// the migration paused it. Safe to repeat.
    pub(super) async fn outgoing_cancel(&mut self) -> Result<(), AgentError> {
        let Some(outgoing) = self.outgoing.as_mut() else {
            return Ok(());
        };
        outgoing.cancelled = true;
        outgoing.task.abort();
        let mirror_disks = outgoing.mirror_disks.clone();
        let Some(attached) = self.attached.as_ref() else {
            self.outgoing = None;
            return Ok(());
        };
        let qmp = attached.qmp.clone();
        let info = migration::query_migrate(&qmp).await.unwrap_or_default();
        if !info.status.is_terminal() && info.status != MigrationStatus::None {
            if let Err(error) = migration::migrate_cancel(&qmp).await {
                warn!(vm = self.name(), error = %crate::error::chain(&error), "migrate_cancel failed");
            }
            let _ = migration::wait_for_status(
                &qmp,
                &[
                    MigrationStatus::Cancelled,
                    MigrationStatus::Failed,
                    MigrationStatus::Completed,
                ],
                Duration::from_secs(10),
            )
            .await;
        }
        for disk in &mirror_disks {
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
            qmp.cont()
                .await
                .map_err(|e| qemu_failed("resuming the source", &e))?;
        }
        self.outgoing = None;
        self.refresh_state().await;
        info!(
            vm = self.name(),
            "outgoing migration cancelled; the source runs"
        );
        Ok(())
    }

    /// After the commit: this host no longer owns the VM. Its QEMU ends and
    /// its record goes; with copied storage, so do its disk files.
    pub(super) async fn outgoing_retire(
        &mut self,
        remove_disks: &[String],
    ) -> Result<(), AgentError> {
        self.record.should_run = false;
        self.persist_or_warn();
        if let Some(attached) = self.attached.take() {
            quit(&attached, Duration::from_secs(10)).await;
        }
        self.state = VmState::Stopped;
        for disk in &self.record.spec.disks {
            let copied = remove_disks.contains(&disk.id)
                && matches!(disk.source, ferry_core::spec::DiskSource::Datastore { .. });
            if copied {
                if let Ok(path) = crate::disks::disk_path(&self.host, disk) {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        if let Err(error) = std::fs::remove_dir_all(&self.paths.dir) {
            if error.kind() != std::io::ErrorKind::NotFound {
                warn!(vm = self.name(), %error, "removing the VM folder failed");
            }
        }
        info!(vm = self.name(), removed = ?remove_disks, "VM retired after migrating away");
        Ok(())
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
    /// the source host's certificate may connect (tls-authz).
    pub(super) async fn incoming_prepare(
        &mut self,
        request: IncomingRequest,
    ) -> Result<IncomingReady, AgentError> {
        if let Some(ready) = &self.incoming_ready {
            return Ok(ready.clone());
        }
        self.record.incoming = Some(IncomingRecord {
            migration_id: request.migration_id,
            source_host: request.source_host.clone(),
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
        info!(vm = self.name(), migration = %request.migration_id, from = %request.source_host, uri = %ready.migration_uri, "ready to receive");
        self.incoming_ready = Some(ready.clone());
        Ok(ready)
    }

    pub(super) async fn incoming_status(&mut self) -> Result<IncomingStatus, AgentError> {
        if self.record.incoming.is_none() {
            if let Some(finished) = &self.finished_status {
                return Ok(IncomingStatus {
                    run_state: self.state.to_string(),
                    ..finished.clone()
                });
            }
        }
        let incoming = self
            .record
            .incoming
            .clone()
            .ok_or_else(|| AgentError::Migration {
                problem: format!("VM {:?} is not receiving a migration", self.name()),
            })?;
        let (run_state, migration_status, error) = match &self.attached {
            Some(attached) => {
                let status = attached.qmp.query_status().await.ok();
                let info = migration::query_migrate(&attached.qmp)
                    .await
                    .unwrap_or_default();
                (
                    status
                        .map(|s| s.status.as_str().to_string())
                        .unwrap_or_default(),
                    info.status.as_str().to_string(),
                    info.error_desc,
                )
            }
            None => (
                "gone".to_string(),
                "failed".to_string(),
                Some("the receiving QEMU is gone".to_string()),
            ),
        };
        Ok(IncomingStatus {
            migration_id: incoming.migration_id,
            vm: self.name().to_string(),
            run_state,
            migration_status,
            guest_ran: self.resumed_at_us.is_some(),
            resumed_at_us: self.resumed_at_us,
            error,
        })
    }

    /// After the commit: stop serving NBD and run the guest here. From now
    /// on this host owns the VM. Safe to repeat.
    pub(super) async fn incoming_finish(&mut self) -> Result<IncomingStatus, AgentError> {
        if self.record.incoming.is_none() {
            // Already finished (a repeated call after a lost answer).
            return self.incoming_status().await;
        }
        let qmp = self.attached()?.qmp.clone();
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
        self.finished_status = Some(self.incoming_status().await?);
        self.record.incoming = None;
        self.record.should_run = true;
        self.incoming_ready = None;
        self.persist()?;
        self.refresh_state().await;
        info!(vm = self.name(), "migration finished; the guest runs here");
        self.incoming_status().await
    }

    /// Undo of `incoming_prepare`, before the commit: end the waiting QEMU
    /// and delete the disks made for it. Refused once the guest has run
    /// here: then this is the only live copy.
    pub(super) async fn incoming_abort(&mut self) -> Result<(), AgentError> {
        if self.resumed_at_us.is_some() || self.record.incoming.is_none() && self.attached.is_some()
        {
            return Err(AgentError::Migration {
                problem: format!(
                    "VM {:?} has run on this host; it is no longer an incoming migration to abort",
                    self.name()
                ),
            });
        }
        self.record.should_run = false;
        if let Some(attached) = self.attached.take() {
            quit(&attached, Duration::from_secs(5)).await;
        }
        // Disks are deleted only after the QEMU using them is gone.
        for file in &self.record.created_files {
            let _ = std::fs::remove_file(file);
        }
        let _ = std::fs::remove_dir_all(&self.paths.dir);
        self.state = VmState::Stopped;
        info!(
            vm = self.name(),
            "incoming migration aborted; nothing left here"
        );
        Ok(())
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

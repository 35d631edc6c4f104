//! One task owns each VM (Omicron's sled-agent model): requests arrive on a
//! channel with a reply sender, QMP events arrive on another, and the task is
//! the only code that touches the VM's QEMU process and record. That makes
//! every transition a plain sequential function, with no locks.
//!
//! ```text
//!            start                    QMP STOP / pause
//!  Stopped ─────────▶ Starting ─▶ Running ◀──────────▶ Paused
//!     ▲                               │   QMP RESUME / resume
//!     │ QEMU exits (asked)            │ stop: ACPI power button, then
//!     └────────────── Stopping ◀──────┘ `quit` after the timeout
//!
//!  any state with a process ── QEMU exits unasked ──▶ Crashed
//! ```
//!
//! A QEMU process is never the agent's child (it is launched with
//! `-daemonize`), so an agent restart reattaches to it exactly like a fresh
//! start attaches: by pid + start time from the record, then QMP.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_api::{VmInfo, VmState};
use ferry_qemu::process::QemuProcess;
use ferry_qemu::qmp::{Qmp, QmpEvent};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{info, warn};

use crate::error::AgentError;
use crate::host::HostContext;
use crate::network::{NetworkConfig, NetworkError};
use crate::record::{ProcessRecord, VmPaths, VmRecord};
use ferry_core::network::NetworkDef;
use ferry_core::spec::{NicBackend, VmSpec};

mod backup;
mod migration;
mod storage;

pub(crate) use backup::BackupStart;

type Reply<T> = oneshot::Sender<Result<T, AgentError>>;

/// How often the task checks that its QEMU still exists, as a backstop to
/// the QMP connection closing.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);
/// How long QEMU gets to create its QMP socket after launch.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) enum Request {
    Info(oneshot::Sender<VmInfo>),
    Start(Reply<VmInfo>),
    Stop {
        force: bool,
        timeout: Duration,
        reply: Reply<VmInfo>,
    },
    Pause(Reply<VmInfo>),
    Resume(Reply<VmInfo>),
    /// Removes the VM's files; the task ends after answering.
    Delete {
        keep_disks: bool,
        /// Also the datastore files the agent did not create.
        all_disks: bool,
        reply: Reply<()>,
    },
    OutgoingStart(
        Box<ferry_api::OutgoingRequest>,
        Reply<ferry_api::OutgoingStatus>,
    ),
    OutgoingStatus(Reply<ferry_api::OutgoingStatus>),
    OutgoingSwitchover(Reply<ferry_api::OutgoingStatus>),
    OutgoingAdjust(ferry_api::OutgoingAdjust, Reply<ferry_api::OutgoingStatus>),
    OutgoingCancel(Reply<VmInfo>),
    /// After the commit; the task ends after answering.
    OutgoingRetire {
        remove_disks: Vec<String>,
        reply: Reply<()>,
    },
    DirtyRate(u64, Reply<ferry_api::DirtyRate>),
    IncomingPrepare(
        Box<ferry_api::IncomingRequest>,
        Reply<ferry_api::IncomingReady>,
    ),
    IncomingStatus(uuid::Uuid, Reply<ferry_api::IncomingStatus>),
    IncomingFinish(uuid::Uuid, Reply<ferry_api::IncomingStatus>),
    /// Post-copy paused: listen for the source again.
    IncomingRecover(uuid::Uuid, Reply<ferry_api::IncomingReady>),
    /// Post-copy paused: reconnect to the destination's new listener.
    OutgoingResume(String, Reply<ferry_api::OutgoingStatus>),
    /// Post-copy stalled (a link that silently drops everything): pause it,
    /// so that it can be resumed once the link is back.
    OutgoingPause(Reply<ferry_api::OutgoingStatus>),
    /// Before the commit. Answers whether the VM is gone (then the task
    /// ends); `false` when this VM has nothing of that migration to undo.
    IncomingAbort(uuid::Uuid, Reply<bool>),
    StorageMove(
        Box<ferry_api::DiskMoveRequest>,
        Reply<ferry_api::DiskMoveStatus>,
    ),
    SetDeparting(Option<uuid::Uuid>, Reply<VmInfo>),
    StorageMoveStatus(Reply<ferry_api::DiskMoveStatus>),
    StorageMoveCancel(Reply<ferry_api::DiskMoveStatus>),
    /// Starts a backup; the answer arrives when it is complete.
    Backup(
        Box<backup::BackupStart>,
        Reply<oneshot::Receiver<Result<ferry_api::BackupInfo, AgentError>>>,
    ),
}

/// The agent's way to talk to one VM task.
#[derive(Clone)]
pub(crate) struct VmHandle {
    name: String,
    tx: mpsc::Sender<Request>,
}

impl VmHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, AgentError> {
        let (reply, answer) = oneshot::channel();
        let gone = || AgentError::ActorGone {
            name: self.name.clone(),
        };
        self.tx.send(make(reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    }

    pub async fn info(&self) -> Result<VmInfo, AgentError> {
        self.call(Request::Info).await
    }
    pub async fn start(&self) -> Result<VmInfo, AgentError> {
        self.call(Request::Start).await?
    }
    pub async fn stop(&self, force: bool, timeout: Duration) -> Result<VmInfo, AgentError> {
        self.call(|reply| Request::Stop {
            force,
            timeout,
            reply,
        })
        .await?
    }
    pub async fn pause(&self) -> Result<VmInfo, AgentError> {
        self.call(Request::Pause).await?
    }
    pub async fn resume(&self) -> Result<VmInfo, AgentError> {
        self.call(Request::Resume).await?
    }
    pub async fn delete(&self, keep_disks: bool, all_disks: bool) -> Result<(), AgentError> {
        self.call(|reply| Request::Delete {
            keep_disks,
            all_disks,
            reply,
        })
        .await?
    }
    pub async fn outgoing_start(
        &self,
        request: ferry_api::OutgoingRequest,
    ) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.call(|reply| Request::OutgoingStart(Box::new(request), reply))
            .await?
    }
    pub async fn outgoing_status(&self) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.call(Request::OutgoingStatus).await?
    }
    pub async fn outgoing_switchover(&self) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.call(Request::OutgoingSwitchover).await?
    }
    pub async fn outgoing_adjust(
        &self,
        adjust: ferry_api::OutgoingAdjust,
    ) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.call(|reply| Request::OutgoingAdjust(adjust, reply))
            .await?
    }
    pub async fn outgoing_cancel(&self) -> Result<VmInfo, AgentError> {
        self.call(Request::OutgoingCancel).await?
    }
    pub async fn outgoing_retire(&self, remove_disks: Vec<String>) -> Result<(), AgentError> {
        self.call(|reply| Request::OutgoingRetire {
            remove_disks,
            reply,
        })
        .await?
    }
    pub async fn dirty_rate(&self, seconds: u64) -> Result<ferry_api::DirtyRate, AgentError> {
        self.call(|reply| Request::DirtyRate(seconds, reply))
            .await?
    }
    pub async fn incoming_prepare(
        &self,
        request: ferry_api::IncomingRequest,
    ) -> Result<ferry_api::IncomingReady, AgentError> {
        self.call(|reply| Request::IncomingPrepare(Box::new(request), reply))
            .await?
    }
    pub async fn incoming_status(
        &self,
        id: uuid::Uuid,
    ) -> Result<ferry_api::IncomingStatus, AgentError> {
        self.call(|reply| Request::IncomingStatus(id, reply))
            .await?
    }
    pub async fn incoming_finish(
        &self,
        id: uuid::Uuid,
    ) -> Result<ferry_api::IncomingStatus, AgentError> {
        self.call(|reply| Request::IncomingFinish(id, reply))
            .await?
    }
    pub async fn incoming_recover(
        &self,
        id: uuid::Uuid,
    ) -> Result<ferry_api::IncomingReady, AgentError> {
        self.call(|reply| Request::IncomingRecover(id, reply))
            .await?
    }
    pub async fn outgoing_resume(
        &self,
        migration_uri: String,
    ) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.call(|reply| Request::OutgoingResume(migration_uri, reply))
            .await?
    }
    pub async fn outgoing_pause(&self) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.call(Request::OutgoingPause).await?
    }
    /// Whether the VM is gone after the abort.
    pub async fn incoming_abort(&self, id: uuid::Uuid) -> Result<bool, AgentError> {
        self.call(|reply| Request::IncomingAbort(id, reply)).await?
    }
    pub async fn storage_move(
        &self,
        request: ferry_api::DiskMoveRequest,
    ) -> Result<ferry_api::DiskMoveStatus, AgentError> {
        self.call(|reply| Request::StorageMove(Box::new(request), reply))
            .await?
    }
    pub async fn set_departing(&self, migration: Option<uuid::Uuid>) -> Result<VmInfo, AgentError> {
        self.call(|reply| Request::SetDeparting(migration, reply))
            .await?
    }
    pub async fn storage_move_status(&self) -> Result<ferry_api::DiskMoveStatus, AgentError> {
        self.call(Request::StorageMoveStatus).await?
    }
    pub async fn storage_move_cancel(&self) -> Result<ferry_api::DiskMoveStatus, AgentError> {
        self.call(Request::StorageMoveCancel).await?
    }
    /// Takes a backup; the VM's task is free while the copy runs.
    pub(crate) async fn backup(
        &self,
        start: backup::BackupStart,
    ) -> Result<ferry_api::BackupInfo, AgentError> {
        let done = self
            .call(|reply| Request::Backup(Box::new(start), reply))
            .await??;
        done.await.map_err(|_| AgentError::ActorGone {
            name: self.name.clone(),
        })?
    }
}

/// A stop in progress: replies wait for QEMU to exit.
struct Stopping {
    /// When to stop asking nicely and `quit` (then SIGKILL).
    deadline: tokio::time::Instant,
    escalated: bool,
    replies: Vec<Reply<VmInfo>>,
}

struct Attached {
    process: QemuProcess,
    qmp: Qmp,
    events: broadcast::Receiver<QmpEvent>,
}

pub(crate) struct VmTask {
    host: Arc<HostContext>,
    paths: VmPaths,
    record: VmRecord,
    state: VmState,
    attached: Option<Attached>,
    stopping: Option<Stopping>,
    /// QEMU reported SHUTDOWN (the guest powered off): its exit is expected.
    shutdown_seen: bool,
    /// What is known of the outgoing migration (`record.outgoing`) beyond
    /// the record: facts a restarted agent does without.
    outgoing: migration::OutgoingRuntime,
    /// QMP timestamp (µs) of the RESUME that first ran an incoming guest
    /// here.
    resumed_at_us: Option<i64>,
    /// The guest of an incoming migration has run here: from then on it
    /// must never be aborted.
    guest_ran: bool,
    /// Why the receiving QEMU of an incoming migration ended.
    incoming_failure: Option<String>,
    /// Storage moves beyond the record (`record.storage_move`).
    storage: storage::StorageRuntime,
    /// A backup's copy is running (its own task holds the QMP handle).
    backup_running: Option<backup::BackupRunning>,
}

/// What opening a VM's record at agent start found.
pub(crate) enum Opened {
    /// A VM of this host, with the migrations it answers for.
    Vm {
        handle: VmHandle,
        migrations: Vec<uuid::Uuid>,
    },
    /// An incoming migration whose QEMU vanished while the agent was down:
    /// aborted, nothing of it is left.
    Aborted {
        migration_id: uuid::Uuid,
        reason: String,
    },
    /// A retire the agent restart interrupted, now completed.
    Retired,
}

/// Spawns the task that owns a VM, first reattaching to its QEMU if the
/// record says one runs.
pub(crate) async fn spawn(host: Arc<HostContext>, record: VmRecord) -> VmHandle {
    let mut task = VmTask::new(host, record);
    task.reattach().await;
    task.into_handle()
}

/// Opens a VM's record when the agent starts: reattaches to its QEMU, then
/// settles what an agent restart may have interrupted — a retire is
/// completed, a finish is completed, and an incoming migration whose QEMU
/// is gone is aborted (never reported as a crash: the VM was not this
/// host's to run).
pub(crate) async fn open(host: Arc<HostContext>, record: VmRecord) -> Opened {
    let mut task = VmTask::new(host, record);
    task.reattach().await;
    if let Some(disks) = task.record.retiring.clone() {
        info!(
            vm = task.name(),
            "completing a retire the agent restart interrupted"
        );
        task.outgoing_retire(&disks).await;
        return Opened::Retired;
    }
    if let Some(incoming) = task.record.incoming.clone() {
        if incoming.finishing {
            // Committed: the guest must run here. Complete the finish.
            if let Err(error) = task.incoming_finish(incoming.migration_id).await {
                warn!(vm = task.name(), error = %crate::error::chain(&error), "cannot complete the finish of an incoming migration");
            }
        } else if task.attached.is_none() {
            let reason = format!(
                "the receiving QEMU ended while the agent was down ({}); the incoming migration was aborted on host {}",
                task.incoming_failure
                    .clone()
                    .or(task.record.crashed.clone())
                    .unwrap_or_else(|| "it never started".to_string()),
                task.host.config.host_name
            );
            warn!(vm = task.name(), migration = %incoming.migration_id, %reason, "aborting an incoming migration");
            task.discard_incoming().await;
            return Opened::Aborted {
                migration_id: incoming.migration_id,
                reason,
            };
        }
    }
    if task.record.storage_move.is_some() {
        task.storage_move_settle().await;
    }
    let migrations = task
        .record
        .incoming
        .iter()
        .map(|i| i.migration_id)
        .chain(task.record.arrived.iter().map(|a| a.migration_id))
        .collect();
    Opened::Vm {
        handle: task.into_handle(),
        migrations,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl VmTask {
    fn new(host: Arc<HostContext>, record: VmRecord) -> VmTask {
        let paths = VmPaths::new(&host.config.state_dir, &record.spec.name);
        VmTask {
            host,
            paths,
            record,
            state: VmState::Stopped,
            attached: None,
            stopping: None,
            shutdown_seen: false,
            outgoing: migration::OutgoingRuntime::default(),
            resumed_at_us: None,
            guest_ran: false,
            incoming_failure: None,
            storage: storage::StorageRuntime::default(),
            backup_running: None,
        }
    }

    fn into_handle(self) -> VmHandle {
        let name = self.record.spec.name.clone();
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(self.run(rx));
        VmHandle { name, tx }
    }

    fn name(&self) -> &str {
        &self.record.spec.name
    }

    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.stopping.as_ref().map(|s| s.deadline);
            tokio::select! {
                // Biased toward what QEMU says: a request must never act on a
                // state that an already-delivered event has changed.
                biased;
                event = next_event(&mut self.attached) => match event {
                    Some(event) => self.on_event(event).await,
                    None => self.on_qmp_closed().await,
                },
                _ = sleep_until(deadline) => self.escalate_stop().await,
                _ = liveness.tick() => {
                    self.check_liveness().await;
                    self.outgoing_advance().await;
                    self.storage_move_advance().await;
                    self.backup_reap();
                }
                request = requests.recv() => match request {
                    None => break,
                    Some(Request::Delete { keep_disks, all_disks, reply }) => {
                        let result = self.delete(keep_disks, all_disks);
                        let done = result.is_ok();
                        let _ = reply.send(result);
                        if done {
                            break;
                        }
                    }
                    Some(Request::OutgoingRetire { remove_disks, reply }) => {
                        self.outgoing_retire(&remove_disks).await;
                        let _ = reply.send(Ok(()));
                        break;
                    }
                    Some(Request::IncomingAbort(id, reply)) => {
                        let result = self.incoming_abort(id).await;
                        let done = matches!(result, Ok(true));
                        let _ = reply.send(result);
                        if done {
                            break;
                        }
                    }
                    Some(request) => self.handle(request).await,
                },
            }
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Info(reply) => {
                let _ = reply.send(self.info());
            }
            Request::Start(reply) => {
                let result = self.start().await.map(|()| self.info());
                let _ = reply.send(result);
            }
            Request::Stop {
                force,
                timeout,
                reply,
            } => self.stop(force, timeout, reply).await,
            Request::Pause(reply) => {
                let result = self.pause_or_resume(true).await.map(|()| self.info());
                let _ = reply.send(result);
            }
            Request::Resume(reply) => {
                let result = self.pause_or_resume(false).await.map(|()| self.info());
                let _ = reply.send(result);
            }
            Request::OutgoingStart(request, reply) => {
                let _ = reply.send(self.outgoing_start(*request).await);
            }
            Request::OutgoingStatus(reply) => {
                let _ = reply.send(self.outgoing_status().await);
            }
            Request::OutgoingSwitchover(reply) => {
                let _ = reply.send(self.outgoing_switchover().await);
            }
            Request::OutgoingAdjust(adjust, reply) => {
                let _ = reply.send(self.outgoing_adjust(adjust).await);
            }
            Request::OutgoingCancel(reply) => {
                let result = self.outgoing_cancel().await.map(|()| self.info());
                let _ = reply.send(result);
            }
            Request::DirtyRate(seconds, reply) => {
                let _ = reply.send(self.dirty_rate(seconds).await);
            }
            Request::IncomingPrepare(request, reply) => {
                let _ = reply.send(self.incoming_prepare(*request).await);
            }
            Request::IncomingStatus(id, reply) => {
                let _ = reply.send(self.incoming_status(id).await);
            }
            Request::IncomingFinish(id, reply) => {
                let _ = reply.send(self.incoming_finish(id).await);
            }
            Request::IncomingRecover(id, reply) => {
                let _ = reply.send(self.incoming_recover(id).await);
            }
            Request::OutgoingResume(uri, reply) => {
                let _ = reply.send(self.outgoing_resume(&uri).await);
            }
            Request::OutgoingPause(reply) => {
                let _ = reply.send(self.outgoing_pause().await);
            }
            Request::Delete { reply, .. } | Request::OutgoingRetire { reply, .. } => {
                // Handled in `run`; never dispatched here.
                let _ = reply.send(Err(self.wrong_state("this request", "handled elsewhere")));
            }
            Request::IncomingAbort(_, reply) => {
                let _ = reply.send(Err(self.wrong_state("this request", "handled elsewhere")));
            }
            Request::StorageMove(request, reply) => {
                let _ = reply.send(self.storage_move_start(*request).await);
            }
            Request::SetDeparting(migration, reply) => {
                let _ = reply.send(self.set_departing(migration).map(|()| self.info()));
            }
            Request::StorageMoveStatus(reply) => {
                let _ = reply.send(self.storage_move_status().await);
            }
            Request::StorageMoveCancel(reply) => {
                let _ = reply.send(self.storage_move_cancel().await);
            }
            Request::Backup(start, reply) => {
                let _ = reply.send(self.backup_start(*start).await);
            }
        }
    }

    fn info(&self) -> VmInfo {
        let spec = &self.record.spec;
        let process = self.record.process.as_ref();
        VmInfo {
            name: spec.name.clone(),
            uuid: spec.uuid,
            host: self.host.config.host_name.clone(),
            state: self.state,
            pid: self.attached.as_ref().map(|a| a.process.pid),
            accel: process.map(|p| p.accel.clone()),
            accel_reason: process.map(|p| p.accel_reason.clone()),
            vcpus: spec.vcpus,
            memory_bytes: spec.memory_bytes,
            state_reason: self.record.crashed.clone(),
            started_at: process.map(|p| p.started_at),
            disks: crate::disks::describe(&self.host, spec),
            warnings: warnings(spec),
            spec: spec.clone(),
        }
    }

    /// The tap each bridged NIC gets and the network it joins, in NIC order.
    /// A NIC on a plain host bridge (`bridge = "br0"`) is treated as a
    /// network of that bridge that this host must already have.
    fn nic_networks(&self) -> Result<Vec<NicPort>, AgentError> {
        let mut ports = Vec::new();
        for (i, nic) in self.record.spec.nics.iter().enumerate() {
            let (network, may_create) = match &nic.backend {
                NicBackend::Network { network } => {
                    let def = self
                        .record
                        .networks
                        .iter()
                        .find(|def| &def.name == network)
                        .cloned()
                        .ok_or_else(|| AgentError::UnknownNetwork {
                            nic: format!("nics[{i}] ({})", nic.id),
                            network: network.clone(),
                        })?;
                    (def, true)
                }
                NicBackend::Bridge { bridge } => (
                    NetworkDef {
                        name: bridge.clone(),
                        bridge: bridge.clone(),
                        vlan: None,
                    },
                    false,
                ),
                NicBackend::User | NicBackend::None | NicBackend::Tap { .. } => continue,
            };
            ports.push(NicPort {
                nic: format!("nics[{i}] ({})", nic.id),
                tap: ferry_qemu::cmdline::bridge_tap_name(&self.paths.qmp_socket(), &nic.id),
                network,
                may_create,
            });
        }
        Ok(ports)
    }

    fn network_error(&self, port: &NicPort, source: NetworkError) -> AgentError {
        AgentError::Network {
            nic: port.nic.clone(),
            network: port.network.name.clone(),
            host: self.host.config.host_name.clone(),
            source: Box::new(source),
        }
    }

    /// Creates missing bridges (where allowed) before QEMU starts.
    async fn prepare_bridges(&self, ports: &[NicPort]) -> Result<(), AgentError> {
        for port in ports {
            let config = if port.may_create {
                self.host.config.networks.clone()
            } else {
                NetworkConfig::default()
            };
            crate::network::ensure_bridge(&config, &port.network)
                .await
                .map_err(|source| self.network_error(port, source))?;
        }
        Ok(())
    }

    /// Puts QEMU's taps on their bridges, once QEMU has created them.
    async fn attach_taps(&self, ports: &[NicPort]) -> Result<(), AgentError> {
        for port in ports {
            crate::network::attach_tap(&port.tap, &port.network)
                .await
                .map_err(|source| self.network_error(port, source))?;
            info!(vm = self.name(), tap = %port.tap, bridge = %port.network.bridge, "tap attached");
        }
        Ok(())
    }

    fn persist(&self) -> Result<(), AgentError> {
        let path = self.paths.record();
        self.record
            .save(&path)
            .map_err(|source| AgentError::Persist {
                name: self.name().to_string(),
                path: path.display().to_string(),
                source,
            })
    }

    /// Persists, and logs instead of failing where the caller cannot undo
    /// anything (an event already happened).
    fn persist_or_warn(&self) {
        if let Err(error) = self.persist() {
            warn!(vm = self.name(), error = %crate::error::chain(&error), "cannot persist VM record");
        }
    }

    fn wrong_state(&self, action: &'static str, needed: &'static str) -> AgentError {
        AgentError::WrongState {
            name: self.name().to_string(),
            state: self.state,
            action,
            needed,
        }
    }

    /// At task start: find the QEMU the record names, if any, and take it
    /// over without disturbing it.
    async fn reattach(&mut self) {
        self.state = if self.record.crashed.is_some() {
            VmState::Crashed
        } else {
            VmState::Stopped
        };
        let Some(process) = self.record.process.clone() else {
            return;
        };
        // `reattach` refuses a pid whose start time differs: a reused pid is
        // someone else's process, and ours is gone.
        let identity = QemuProcess::reattach(process.pid, process.start_time);
        let alive = identity.as_ref().map(|p| p.is_alive()).unwrap_or(false);
        if !alive {
            self.on_process_gone(format!(
                "QEMU (pid {}) exited while the agent was not watching",
                process.pid
            ));
            return;
        }
        let process_handle = identity.expect("checked alive above");
        match Qmp::connect_with_retry(&self.paths.qmp_socket(), QMP_CONNECT_TIMEOUT).await {
            Ok(qmp) => {
                let events = qmp.subscribe();
                self.attached = Some(Attached {
                    process: process_handle,
                    qmp,
                    events,
                });
                self.refresh_state().await;
                if self.record.incoming.is_some() && self.state == VmState::Running {
                    // Only `incoming_finish` resumes an incoming guest.
                    self.guest_ran = true;
                }
                info!(vm = self.name(), pid = process.pid, state = %self.state, "reattached to running QEMU");
            }
            Err(error) if self.record.incoming.as_ref().is_some_and(|i| !i.finishing) => {
                // A receiving QEMU that cannot be driven cannot receive:
                // `open` aborts that migration (and ends the QEMU).
                warn!(vm = self.name(), pid = process.pid, error = %crate::error::chain(&error), "the receiving QEMU runs but QMP is unreachable");
                self.incoming_failure = Some(format!(
                    "QEMU (pid {}) runs but its QMP socket does not answer: {}",
                    process.pid,
                    crate::error::chain(&error)
                ));
            }
            Err(error) => {
                // QEMU runs but its monitor does not answer: report it, do not
                // kill a guest we cannot see.
                warn!(vm = self.name(), pid = process.pid, error = %crate::error::chain(&error), "QEMU runs but QMP is unreachable");
                self.state = VmState::Crashed;
                self.record.crashed = Some(format!(
                    "QEMU (pid {}) runs but its QMP socket does not answer: {}",
                    process.pid,
                    crate::error::chain(&error)
                ));
            }
        }
    }

    /// Asks QEMU whether the guest runs and sets `state` from the answer.
    async fn refresh_state(&mut self) {
        let Some(attached) = &self.attached else {
            return;
        };
        match attached.qmp.query_status().await {
            Ok(status) => {
                if self.state != VmState::Stopping {
                    self.state = if status.running {
                        VmState::Running
                    } else {
                        VmState::Paused
                    };
                }
            }
            Err(error) => {
                warn!(vm = self.name(), error = %crate::error::chain(&error), "query-status failed")
            }
        }
    }

    async fn start(&mut self) -> Result<(), AgentError> {
        if self.state.has_process() {
            return Err(self.wrong_state("start", "stopped or crashed"));
        }
        if self.record.incoming.is_some() {
            return Err(self.wrong_state("start", "not an incoming migration"));
        }
        if let Some(outgoing) = &self.record.outgoing {
            // Its state may have reached the destination: starting it here
            // could run the guest twice. The migration's undo forgets it.
            return Err(AgentError::Migration {
                problem: format!(
                    "VM {:?} is the source of migration {} to {}; cancel that migration first",
                    self.name(),
                    outgoing.migration_id,
                    outgoing.destination_host
                ),
            });
        }
        if let Some(migration) = self.record.departing {
            return Err(AgentError::Migration {
                problem: format!(
                    "VM {:?} is moving to another host (offline migration {migration}); cancel that migration first",
                    self.name()
                ),
            });
        }
        if let Some(moving) = &self.record.storage_move {
            // Its disks are being copied by qemu-img: a guest writing the
            // old files now would make the copy stale.
            return Err(AgentError::Storage {
                problem: format!(
                    "VM {:?} is moving its disks (storage move {}); start it when the move ends or cancel it",
                    self.name(),
                    moving.move_id
                ),
            });
        }
        if self.backup_in_progress() {
            return Err(AgentError::Storage {
                problem: format!(
                    "VM {:?} is being backed up; start it when the backup ends",
                    self.name()
                ),
            });
        }
        self.launch(None, false).await
    }

    /// Launches QEMU for this VM and attaches to it. `incoming` makes it wait
    /// for a migration stream (`-incoming`), `paused` starts it with `-S`.
    async fn launch(&mut self, incoming: Option<&str>, paused: bool) -> Result<(), AgentError> {
        let name = self.name().to_string();
        crate::disks::check_present(&self.host, &self.record.spec)?;
        let ports = self.nic_networks()?;
        self.prepare_bridges(&ports).await?;
        // The guest must not run before its taps are on their bridges (its
        // first packets would go nowhere): start it paused, attach, resume.
        let pause_for_taps = !ports.is_empty() && !paused && incoming.is_none();
        std::fs::create_dir_all(&self.paths.dir).map_err(|source| AgentError::Persist {
            name: name.clone(),
            path: self.paths.dir.display().to_string(),
            source,
        })?;
        for stale in [
            self.paths.qmp_socket(),
            self.paths.serial_socket(),
            self.paths.pidfile(),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        let context = ferry_qemu::cmdline::LaunchContext {
            qmp_socket: self.paths.qmp_socket(),
            serial_socket: self.paths.serial_socket(),
            serial_log: self.paths.console_log(),
            pidfile: self.paths.pidfile(),
            accel: self.host.accel.accel.to_string(),
            datastores: self.host.config.datastores.clone(),
            incoming: incoming.map(str::to_string),
            start_paused: paused || pause_for_taps,
            daemonize: true,
        };
        let args = ferry_qemu::cmdline::build(&self.record.spec, &context).map_err(|source| {
            AgentError::CommandLine {
                name: name.clone(),
                source,
            }
        })?;
        self.state = VmState::Starting;
        let process =
            ferry_qemu::process::launch(&self.host.qemu_binary, &args, &self.paths.pidfile())
                .await
                .map_err(|source| AgentError::Launch {
                    name: name.clone(),
                    source,
                });
        let process = match process {
            Ok(process) => process,
            Err(error) => {
                self.state = VmState::Stopped;
                return Err(error);
            }
        };
        // Persist the process before anything else can fail, so that a crash
        // of the agent from here on still finds (and reattaches to) it.
        self.record.process = Some(ProcessRecord {
            pid: process.pid,
            start_time: process.start_time,
            accel: self.host.accel.accel.to_string(),
            accel_reason: self.host.accel.reason.clone(),
            started_at: unix_now(),
        });
        // An incoming VM is not yet this host's to run: if its QEMU dies
        // before the commit, that is an aborted migration, not a crash.
        self.record.should_run = incoming.is_none();
        self.record.crashed = None;
        self.shutdown_seen = false;
        if let Err(error) = self.persist() {
            let _ = process.kill(nix::sys::signal::Signal::SIGKILL);
            self.record.process = None;
            self.state = VmState::Stopped;
            return Err(error);
        }
        match Qmp::connect_with_retry(&self.paths.qmp_socket(), QMP_CONNECT_TIMEOUT).await {
            Ok(qmp) => {
                let events = qmp.subscribe();
                self.attached = Some(Attached {
                    process,
                    qmp,
                    events,
                });
                self.state = VmState::Running;
                if let Err(error) = self.connect_ports(&ports, pause_for_taps).await {
                    self.abandon_launch();
                    return Err(error);
                }
                self.refresh_state().await;
                info!(vm = %name, pid = self.record.process.as_ref().map(|p| p.pid), accel = %self.host.accel.accel, "VM started");
                Ok(())
            }
            Err(source) => {
                // Undo: a QEMU we cannot drive must not keep running.
                let _ = process.kill(nix::sys::signal::Signal::SIGKILL);
                self.record.process = None;
                self.record.should_run = false;
                self.state = VmState::Stopped;
                self.persist_or_warn();
                Err(AgentError::Qmp {
                    name,
                    command: "connect",
                    source,
                })
            }
        }
    }

    /// Attaches the taps, then lets a guest that was held for them run.
    async fn connect_ports(
        &mut self,
        ports: &[NicPort],
        resume_after: bool,
    ) -> Result<(), AgentError> {
        self.attach_taps(ports).await?;
        if resume_after {
            let attached = self.attached()?;
            attached
                .qmp
                .cont()
                .await
                .map_err(|source| AgentError::Qmp {
                    name: self.name().to_string(),
                    command: "cont",
                    source,
                })?;
        }
        Ok(())
    }

    /// Undo of a launch that failed after QEMU started: the QEMU goes (and
    /// its taps with it), the record says stopped.
    fn abandon_launch(&mut self) {
        if let Some(attached) = self.attached.take() {
            let _ = attached.process.kill(nix::sys::signal::Signal::SIGKILL);
        }
        self.record.process = None;
        self.record.should_run = false;
        self.state = VmState::Stopped;
        for stale in [
            self.paths.qmp_socket(),
            self.paths.serial_socket(),
            self.paths.pidfile(),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        self.persist_or_warn();
    }

    async fn stop(&mut self, force: bool, timeout: Duration, reply: Reply<VmInfo>) {
        if self.record.outgoing.is_some() || self.record.incoming.is_some() {
            let _ = reply.send(Err(
                self.wrong_state("stop", "not migrating (cancel the migration first)")
            ));
            return;
        }
        if !self.state.has_process() {
            let _ = reply.send(Err(self.wrong_state("stop", "running or paused")));
            return;
        }
        // From here on QEMU's exit is expected, even if the agent restarts.
        self.record.should_run = false;
        self.persist_or_warn();
        if let Some(stopping) = &mut self.stopping {
            stopping.replies.push(reply);
            if force && !stopping.escalated {
                stopping.deadline = tokio::time::Instant::now();
            }
            return;
        }
        self.state = VmState::Stopping;
        let deadline = if force {
            tokio::time::Instant::now()
        } else {
            if let Some(attached) = &self.attached {
                if let Err(error) = attached.qmp.system_powerdown().await {
                    warn!(vm = self.name(), error = %crate::error::chain(&error), "system_powerdown failed; forcing");
                }
            }
            tokio::time::Instant::now() + timeout
        };
        self.stopping = Some(Stopping {
            deadline,
            escalated: false,
            replies: vec![reply],
        });
    }

    /// The guest did not power off in time (or a forced stop): ask QEMU to
    /// quit, and if even that does not end it soon, SIGKILL.
    async fn escalate_stop(&mut self) {
        let Some(stopping) = &mut self.stopping else {
            return;
        };
        if stopping.escalated {
            if let Some(attached) = &self.attached {
                warn!(vm = %self.record.spec.name, "QEMU did not quit; sending SIGKILL");
                let _ = attached.process.kill(nix::sys::signal::Signal::SIGKILL);
            }
            // The next deadline is far away: liveness/QMP close will finish.
            stopping.deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
            return;
        }
        stopping.escalated = true;
        stopping.deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        if let Some(attached) = &self.attached {
            if let Err(error) = attached.qmp.quit().await {
                info!(vm = %self.record.spec.name, error = %crate::error::chain(&error), "quit failed");
            }
        }
    }

    async fn pause_or_resume(&mut self, pause: bool) -> Result<(), AgentError> {
        let (action, needed, command) = if pause {
            ("pause", "running", "stop")
        } else {
            ("resume", "paused", "cont")
        };
        if self.record.outgoing.is_some() || self.record.incoming.is_some() {
            return Err(self.wrong_state(action, "not migrating"));
        }
        let allowed = if pause {
            self.state == VmState::Running
        } else {
            self.state == VmState::Paused
        };
        if !allowed {
            return Err(self.wrong_state(action, needed));
        }
        let attached = self
            .attached
            .as_ref()
            .expect("running or paused VMs are attached");
        let result = if pause {
            attached.qmp.stop().await
        } else {
            attached.qmp.cont().await
        };
        result.map_err(|source| AgentError::Qmp {
            name: self.name().to_string(),
            command,
            source,
        })?;
        self.refresh_state().await;
        Ok(())
    }

    async fn on_event(&mut self, event: QmpEvent) {
        match event.name.as_str() {
            "STOP" if self.record.outgoing.is_some() => {
                self.outgoing.stopped_at_us = event.timestamp.as_micros();
                self.state = VmState::Paused;
            }
            "RESUME" if self.record.incoming.is_some() => {
                // The guest ran here before the commit finished: remember
                // it, so that this copy is never aborted.
                if self.resumed_at_us.is_none() {
                    self.resumed_at_us = event.timestamp.as_micros();
                }
                self.guest_ran = true;
                self.state = VmState::Running;
            }
            "BLOCK_JOB_READY" => {
                self.outgoing_advance().await;
                self.storage_move_advance().await;
            }
            "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => self.on_mirror_ended(&event),
            "STOP" if self.state == VmState::Running => self.state = VmState::Paused,
            "RESUME" if self.state == VmState::Paused => self.state = VmState::Running,
            "SHUTDOWN" => {
                self.shutdown_seen = true;
                self.record.should_run = false;
                self.persist_or_warn();
            }
            _ => {}
        }
    }

    async fn on_qmp_closed(&mut self) {
        let Some(attached) = &self.attached else {
            return;
        };
        // The monitor closes when QEMU exits; give the process a moment to
        // be gone before deciding.
        let _ = attached.process.wait_exit(Duration::from_secs(5)).await;
        if attached.process.is_alive() {
            warn!(
                vm = self.name(),
                "QMP connection closed but QEMU still runs; reconnecting"
            );
            match Qmp::connect_with_retry(&self.paths.qmp_socket(), QMP_CONNECT_TIMEOUT).await {
                Ok(qmp) => {
                    let events = qmp.subscribe();
                    if let Some(attached) = &mut self.attached {
                        attached.qmp = qmp;
                        attached.events = events;
                    }
                    self.refresh_state().await;
                    return;
                }
                Err(error) => {
                    warn!(vm = self.name(), error = %crate::error::chain(&error), "cannot reconnect to QMP; killing QEMU");
                    let _ = attached.process.kill(nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        let pid = self.attached.as_ref().map(|a| a.process.pid).unwrap_or(0);
        self.on_process_gone(format!("QEMU (pid {pid}) exited without being asked to"));
    }

    async fn check_liveness(&mut self) {
        let gone = match &self.attached {
            Some(attached) => !attached.process.is_alive(),
            None => false,
        };
        if gone {
            let pid = self.attached.as_ref().map(|a| a.process.pid).unwrap_or(0);
            self.on_process_gone(format!("QEMU (pid {pid}) exited without being asked to"));
        }
    }

    /// QEMU is gone: decide stopped or crashed, forget the process, clean its
    /// runtime files, answer whoever waits for a stop.
    fn on_process_gone(&mut self, crash_reason: String) {
        if let Some(incoming) = self.record.incoming.take() {
            if incoming.finishing {
                // Committed: the VM is this host's, and its QEMU ending is a
                // crash like any other.
                self.record.arrived = Some(crate::record::ArrivedRecord {
                    migration_id: incoming.migration_id,
                    resumed_at_us: self.resumed_at_us,
                });
                self.record.should_run = true;
            } else {
                // Not this host's to run: the migration failed, the VM did
                // not crash. `incoming_abort` cleans up.
                warn!(vm = self.name(), migration = %incoming.migration_id, reason = %crash_reason, "the receiving QEMU ended; the incoming migration failed");
                self.incoming_failure = Some(crash_reason.clone());
                self.record.incoming = Some(incoming);
            }
        }
        let expected = self.stopping.is_some()
            || self.shutdown_seen
            || !self.record.should_run
            || self.record.retiring.is_some();
        self.attached = None;
        self.record.process = None;
        self.record.should_run = false;
        if expected {
            self.state = VmState::Stopped;
            self.record.crashed = None;
            info!(vm = self.name(), "QEMU exited; VM stopped");
        } else {
            warn!(vm = self.name(), reason = %crash_reason, "VM crashed");
            self.state = VmState::Crashed;
            self.record.crashed = Some(crash_reason);
        }
        for stale in [
            self.paths.qmp_socket(),
            self.paths.serial_socket(),
            self.paths.pidfile(),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        self.persist_or_warn();
        if let Some(stopping) = self.stopping.take() {
            let info = self.info();
            for reply in stopping.replies {
                let _ = reply.send(Ok(info.clone()));
            }
        }
    }

    /// Marks the stopped VM as leaving for another host, or clears it.
    fn set_departing(&mut self, migration: Option<uuid::Uuid>) -> Result<(), AgentError> {
        if migration.is_some() {
            if self.state.has_process() {
                return Err(self.wrong_state("an offline migration", "stopped"));
            }
            if self.record.storage_move.is_some() || self.backup_in_progress() {
                return Err(AgentError::Migration {
                    problem: format!(
                        "VM {:?} has a storage move or a backup in progress",
                        self.name()
                    ),
                });
            }
            if let Some(other) = self.record.departing.filter(|d| Some(*d) != migration) {
                return Err(AgentError::Migration {
                    problem: format!(
                        "VM {:?} is already leaving (migration {other})",
                        self.name()
                    ),
                });
            }
        }
        self.record.departing = migration;
        self.persist()
    }

    fn delete(&mut self, keep_disks: bool, all_disks: bool) -> Result<(), AgentError> {
        if self.state.has_process() {
            return Err(self.wrong_state("delete", "stopped (stop it first)"));
        }
        // (An incoming VM without a QEMU is a failed migration: deleting
        // it is its abort. One that is finishing belongs here.)
        let finishing = self.record.incoming.as_ref().is_some_and(|i| i.finishing);
        if self.record.storage_move.is_some() || self.backup_in_progress() {
            return Err(self.wrong_state("delete", "without a storage move or backup in progress"));
        }
        if self.record.outgoing.is_some() || finishing {
            return Err(self.wrong_state("delete", "not migrating (cancel the migration first)"));
        }
        if !keep_disks {
            let mut files = self.record.created_files.clone();
            if all_disks {
                for disk in &self.record.spec.disks {
                    if matches!(disk.source, ferry_core::spec::DiskSource::Datastore { .. }) {
                        files.push(crate::disks::disk_path(&self.host, disk)?);
                    }
                }
            }
            for file in &files {
                if let Err(source) = std::fs::remove_file(file) {
                    if source.kind() != std::io::ErrorKind::NotFound {
                        return Err(AgentError::DiskIo {
                            disk: file.display().to_string(),
                            action: "removing the disk file",
                            source,
                        });
                    }
                }
            }
        }
        std::fs::remove_dir_all(&self.paths.dir).map_err(|source| AgentError::Persist {
            name: self.name().to_string(),
            path: self.paths.dir.display().to_string(),
            source,
        })?;
        info!(vm = self.name(), keep_disks, "VM deleted");
        Ok(())
    }
}

/// One NIC that needs a port on a bridge.
struct NicPort {
    /// `nics[i] (id)`, for messages.
    nic: String,
    tap: String,
    network: NetworkDef,
    /// Whether the bridge may be created (cluster networks, if the host
    /// allows) or must exist (a plain `bridge = "…"` NIC).
    may_create: bool,
}

/// What `vm show` should tell the user about the spec.
fn warnings(spec: &VmSpec) -> Vec<String> {
    spec.nics
        .iter()
        .enumerate()
        .filter(|(_, nic)| matches!(nic.backend, NicBackend::User))
        .map(|(i, nic)| {
            format!(
                "nics[{i}] ({}) uses user-mode networking: its connections do not survive a \
                 migration (attach it to a cluster network to keep them)",
                nic.id
            )
        })
        .collect()
}

/// The next QMP event, or `None` once the connection has closed. Pending
/// forever when no QEMU is attached.
async fn next_event(attached: &mut Option<Attached>) -> Option<QmpEvent> {
    let Some(attached) = attached else {
        return std::future::pending().await;
    };
    loop {
        match attached.events.recv().await {
            Ok(event) => return Some(event),
            // Missing a few events is harmless: state is re-read from QEMU
            // by the caller whenever it matters.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

//! The source's side of disk migration: an NBD client node per disk that
//! points at the destination's export ([`crate::nbd`]), and a mirror job
//! that copies the disk into it while the guest keeps running.
//!
//! # The mirror's life in a migration
//!
//! ```text
//!  blockdev-add (nbd) ─▶ blockdev-mirror ─▶ running ─▶ READY ─┬─▶ block-job-cancel      ─▶ COMPLETED
//!                                             (bulk copy)     │   (no force, at pre-switchover;
//!                                                             │    source and target identical)
//!                                                             └─▶ block-job-cancel force ─▶ CANCELLED
//!                                                                 (undo: target abandoned)
//!  then blockdev-del (nbd)
//! ```
//!
//! * **`sync: full`** copies the whole disk; the destination's disk starts
//!   empty.
//! * **`copy-mode: write-blocking`**: once the job is READY every guest
//!   write is applied to the source *and* the target before the guest sees
//!   it complete. With the default `background` mode, writes are only
//!   marked dirty and copied later, so a guest writing faster than the link
//!   can keep the mirror from ever converging and the final catch-up (inside
//!   the migration's downtime) is unbounded. Write-blocking trades some
//!   guest write latency for a mirror that stays in sync, which is what
//!   makes a bounded switchover possible.
//! * **READY before `migrate`**: QEMU 10.0 does *not* check it — measured:
//!   `migrate` reaches `pre-switchover` with a mirror still in its bulk copy
//!   (16 of 128 MiB done), and a no-force cancel then *abandons* that mirror
//!   (`BLOCK_JOB_CANCELLED`, target incomplete). So the caller must wait for
//!   every [`wait_ready`] before `migrate`, and [`complete_mirrors`] refuses
//!   a job that is not ready.
//! * **No force at switchover**: at `pre-switchover` the source's vCPUs are
//!   stopped, so no new writes arrive. `block-job-cancel` *without* force on
//!   a READY mirror drains what is in flight and ends the job with
//!   `BLOCK_JOB_COMPLETED` (QEMU's "complete without pivoting": the source
//!   keeps using its own disk, the target is an exact copy). With `force`
//!   the job ends at once with `BLOCK_JOB_CANCELLED` and the copy is not
//!   guaranteed complete: that is the *undo*, never the switchover.
//! * `auto-dismiss` stays on, so a finished job disappears from
//!   `query-block-jobs`; its outcome is only in the event, which is why the
//!   waits here subscribe before acting.
//!
//! Names: the NBD node is `nbd-<disk id>` and the job `mirror-<disk id>`;
//! with disk ids of at most [`names::MAX_ID_LEN`] (24) both stay within
//! QEMU's 31-character limit on node names.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use ferry_core::names;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::nbd::InetAddress;
use crate::qmp::{Qmp, QmpError, QmpEvent};
use crate::tls::{check_qom_id, Applied};

/// Longest node name QEMU accepts.
pub const MAX_NODE_NAME_LEN: usize = 31;

/// How often a wait re-checks `query-block-jobs` besides watching events
/// (a safety net: events can be missed by a lagging subscriber).
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The NBD client node for disk `disk_id` on the source: `nbd-<disk id>`.
pub fn nbd_node_name(disk_id: &str) -> String {
    format!("nbd-{disk_id}")
}

/// The mirror job for disk `disk_id`: `mirror-<disk id>`.
pub fn mirror_job_id(disk_id: &str) -> String {
    format!("mirror-{disk_id}")
}

/// An NBD client block node (`blockdev-add`, driver `nbd`): the mirror's
/// target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdClientNode {
    pub node_name: String,
    /// The destination's NBD server.
    pub server: InetAddress,
    /// The export name to attach (the disk id).
    pub export: String,
    /// Id of a `tls-creds-x509` object with `endpoint: client`.
    pub tls_creds: Option<String>,
    /// The name the destination's certificate must carry (checked against
    /// its SANs). Without it QEMU checks `server.host`.
    pub tls_hostname: Option<String>,
}

impl NbdClientNode {
    /// The target node for disk `disk_id`, exported by the destination as
    /// [`crate::nbd::NbdExport::for_disk`] does.
    pub fn for_disk(
        disk_id: &str,
        server: InetAddress,
        tls_creds: Option<&str>,
        tls_hostname: Option<&str>,
    ) -> NbdClientNode {
        NbdClientNode {
            node_name: nbd_node_name(disk_id),
            server,
            export: disk_id.to_owned(),
            tls_creds: tls_creds.map(str::to_owned),
            tls_hostname: tls_hostname.map(str::to_owned),
        }
    }
}

/// `copy-mode` of a mirror. See the module docs for why a migration uses
/// [`CopyMode::WriteBlocking`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    Background,
    WriteBlocking,
}

impl CopyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
        }
    }
}

/// A `blockdev-mirror` job with `sync: full`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorJob {
    pub job_id: String,
    /// Source node: the disk's format node.
    pub device: String,
    /// Target node: the NBD client node.
    pub target: String,
    pub copy_mode: CopyMode,
    /// Bytes per second for the bulk copy; `None` is unlimited. (Limits the
    /// background copy only; write-blocking guest writes are never delayed
    /// by it.)
    pub speed: Option<u64>,
}

impl MirrorJob {
    /// The migration mirror of disk `disk_id`: its format node into
    /// [`nbd_node_name`], write-blocking, unlimited speed.
    pub fn for_disk(disk_id: &str) -> MirrorJob {
        MirrorJob {
            job_id: mirror_job_id(disk_id),
            device: names::disk_format_node(disk_id),
            target: nbd_node_name(disk_id),
            copy_mode: CopyMode::WriteBlocking,
            speed: None,
        }
    }
}

/// Status of a job (`JobStatus`). Unknown values are kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(from = "String")]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
    Other(String),
}

impl From<String> for JobStatus {
    fn from(s: String) -> Self {
        match s.as_str() {
            "undefined" => JobStatus::Undefined,
            "created" => JobStatus::Created,
            "running" => JobStatus::Running,
            "paused" => JobStatus::Paused,
            "ready" => JobStatus::Ready,
            "standby" => JobStatus::Standby,
            "waiting" => JobStatus::Waiting,
            "pending" => JobStatus::Pending,
            "aborting" => JobStatus::Aborting,
            "concluded" => JobStatus::Concluded,
            "null" => JobStatus::Null,
            _ => JobStatus::Other(s),
        }
    }
}

/// One row of `query-block-jobs`: progress is `offset` of `len` bytes (both
/// grow while the guest writes; `len - offset` is what is left to copy).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// `mirror`, `commit`, `stream`, `backup`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The job id (QEMU calls it `device` for historical reasons).
    pub device: String,
    pub len: u64,
    pub offset: u64,
    pub busy: bool,
    pub paused: bool,
    /// Rate limit in bytes per second, 0 for none.
    pub speed: u64,
    /// `ok`, `failed`, `nospace`.
    pub io_status: String,
    /// The mirror has converged: source and target are in sync (and, in
    /// write-blocking mode, stay so).
    pub ready: bool,
    pub status: JobStatus,
    #[serde(default)]
    pub error: Option<String>,
    /// Mirror only: guest writes are being copied synchronously.
    #[serde(default)]
    pub actively_synced: Option<bool>,
}

/// How a job ended, from its final event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// `BLOCK_JOB_COMPLETED` without error: for a mirror cancelled after
    /// READY, the target is a complete copy.
    Completed,
    /// `BLOCK_JOB_COMPLETED` with an error message.
    Failed(String),
    /// `BLOCK_JOB_CANCELLED`: the target is not a complete copy.
    Cancelled,
}

impl fmt::Display for JobEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobEnd::Completed => f.write_str("completed"),
            JobEnd::Failed(e) => write!(f, "failed: {e}"),
            JobEnd::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// Errors from the block job helpers.
#[derive(Debug, thiserror::Error)]
pub enum BlockJobError {
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("QMP `{command}` failed ({context})")]
    Qmp {
        command: &'static str,
        context: String,
        #[source]
        source: QmpError,
    },
    #[error("block node {node:?} already exists with driver {existing:?}; refusing to reuse it")]
    NodeConflict { node: String, existing: String },
    #[error(
        "block job {job:?} already exists as a {kind} job on {device_hint}; refusing to reuse it"
    )]
    JobConflict {
        job: String,
        kind: String,
        device_hint: String,
    },
    #[error("block job {job:?} does not exist")]
    NoSuchJob { job: String },
    #[error(
        "mirror {job:?} is not ready ({offset} of {len} bytes copied, status {status:?}); \
         cancelling it now would leave the target incomplete"
    )]
    NotReady {
        job: String,
        offset: u64,
        len: u64,
        status: JobStatus,
    },
    #[error("block job {job:?} ended ({end}) while waiting for it to {waiting_for}")]
    Ended {
        job: String,
        end: JobEnd,
        waiting_for: &'static str,
    },
    #[error("block job {job:?} hit an I/O error ({operation}, action {action})")]
    IoError {
        job: String,
        operation: String,
        action: String,
    },
    #[error("timed out after {after:?} waiting for block job(s) {jobs:?} to {waiting_for}; last seen: {progress}")]
    Timeout {
        jobs: Vec<String>,
        waiting_for: &'static str,
        after: Duration,
        progress: String,
    },
    #[error(
        "block job {job:?} disappeared and its final event was missed; its outcome is unknown"
    )]
    OutcomeUnknown { job: String },
    #[error("the QMP event stream of {endpoint} ended")]
    EventsClosed { endpoint: String },
}

pub(crate) fn qmp_err(
    command: &'static str,
    context: impl Into<String>,
) -> impl FnOnce(QmpError) -> BlockJobError {
    let context = context.into();
    move |source| BlockJobError::Qmp {
        command,
        context,
        source,
    }
}

pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), BlockJobError> {
    let bad = |reason: String| BlockJobError::Invalid {
        what,
        value: name.to_owned(),
        reason,
    };
    check_qom_id(name).map_err(|r| bad(r.to_owned()))?;
    if name.len() > MAX_NODE_NAME_LEN {
        return Err(bad(format!(
            "{} characters; QEMU allows at most {MAX_NODE_NAME_LEN}",
            name.len()
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct NodeRow {
    #[serde(default)]
    node_name: String,
    #[serde(default)]
    drv: String,
}

/// The driver of node `node_name`, if the node exists.
pub async fn node_driver(qmp: &Qmp, node_name: &str) -> Result<Option<String>, BlockJobError> {
    let rows: Vec<NodeRow> = qmp
        .execute_as("query-named-block-nodes", json!({"flat": true}))
        .await
        .map_err(qmp_err("query-named-block-nodes", "listing block nodes"))?;
    Ok(rows
        .into_iter()
        .find(|r| r.node_name == node_name)
        .map(|r| r.drv))
}

/// Adds the NBD client node. This connects to the destination at once
/// (and does the TLS handshake), so a destination that refuses this host
/// fails here, before any copy starts.
///
/// A node of this name that already exists with driver `nbd` is
/// [`Applied::AlreadyDone`] (its server and export are not compared: the
/// names are derived from the disk id, and one source QEMU mirrors a disk to
/// one destination at a time); with another driver it is a conflict.
///
/// No `reconnect-delay` is set: if the link drops, the node's I/O fails at
/// once, the mirror fails, and the migration is undone, rather than the
/// guest's writes (write-blocking) hanging while a reconnect is attempted.
pub async fn blockdev_add_nbd(qmp: &Qmp, node: &NbdClientNode) -> Result<Applied, BlockJobError> {
    check_name("node name", &node.node_name)?;
    let mut args = json!({
        "driver": "nbd",
        "node-name": node.node_name,
        "server": node.server.to_flat_json(),
        "export": node.export,
    });
    if let Some(creds) = &node.tls_creds {
        check_name("tls-creds id", creds)?;
        args["tls-creds"] = json!(creds);
    }
    if let Some(host) = &node.tls_hostname {
        args["tls-hostname"] = json!(host);
    }
    let Err(refused) = qmp.execute("blockdev-add", args).await else {
        return Ok(Applied::Done);
    };
    match node_driver(qmp, &node.node_name).await? {
        Some(drv) if drv == "nbd" => Ok(Applied::AlreadyDone),
        Some(existing) => Err(BlockJobError::NodeConflict {
            node: node.node_name.clone(),
            existing,
        }),
        None => Err(qmp_err(
            "blockdev-add",
            format!(
                "NBD node {} for export {:?} at {}",
                node.node_name, node.export, node.server
            ),
        )(refused)),
    }
}

/// Deletes a block node that nothing uses any more (the NBD node after its
/// mirror ended). A node that does not exist is [`Applied::AlreadyDone`].
/// Breaks the connection of each NBD client node at once (QMP `yank`), so
/// that requests stuck on it fail instead of waiting for TCP to give up.
///
/// Why: over a link that silently drops everything, a mirror's in-flight
/// writes to its NBD target never complete, and cancelling the job waits
/// for them inside QEMU's main loop (holding its big lock: the guest and
/// the monitor stall with it) for as long as TCP retransmits — minutes.
/// Yanking first makes the cancel immediate. Only for a mirror that is
/// being thrown away: the target is left incomplete. Nodes without a
/// connection (or already gone) are not an error.
pub async fn yank_nbd(qmp: &Qmp, node_names: &[String]) -> Result<(), BlockJobError> {
    for node_name in node_names {
        check_name("node name", node_name)?;
        let instances = json!({"instances": [{"type": "block-node", "node-name": node_name}]});
        if let Err(refused) = qmp.execute("yank", instances).await {
            if node_driver(qmp, node_name).await?.is_some() {
                tracing::debug!(node = %node_name, error = %refused, "yank refused");
            }
        }
    }
    Ok(())
}

pub async fn blockdev_del(qmp: &Qmp, node_name: &str) -> Result<Applied, BlockJobError> {
    check_name("node name", node_name)?;
    match qmp
        .execute("blockdev-del", json!({"node-name": node_name}))
        .await
    {
        Ok(_) => Ok(Applied::Done),
        Err(refused) => match node_driver(qmp, node_name).await? {
            None => Ok(Applied::AlreadyDone),
            Some(_) => Err(qmp_err("blockdev-del", format!("node {node_name}"))(
                refused,
            )),
        },
    }
}

/// Starts a full mirror (`blockdev-mirror`, `sync: full`).
///
/// A job with this id that already exists as a mirror is
/// [`Applied::AlreadyDone`]; any other job of that id is a conflict.
pub async fn blockdev_mirror(qmp: &Qmp, job: &MirrorJob) -> Result<Applied, BlockJobError> {
    check_name("job id", &job.job_id)?;
    let mut args = json!({
        "job-id": job.job_id,
        "device": job.device,
        "target": job.target,
        "sync": "full",
        "copy-mode": job.copy_mode.as_str(),
    });
    if let Some(speed) = job.speed {
        args["speed"] = json!(speed);
    }
    let Err(refused) = qmp.execute("blockdev-mirror", args).await else {
        return Ok(Applied::Done);
    };
    match find_job(qmp, &job.job_id).await? {
        Some(existing) if existing.kind == "mirror" => Ok(Applied::AlreadyDone),
        Some(existing) => Err(BlockJobError::JobConflict {
            job: job.job_id.clone(),
            kind: existing.kind,
            device_hint: existing.device,
        }),
        None => Err(qmp_err(
            "blockdev-mirror",
            format!("mirroring {} into {}", job.device, job.target),
        )(refused)),
    }
}

/// All block jobs.
pub async fn query_block_jobs(qmp: &Qmp) -> Result<Vec<BlockJobInfo>, BlockJobError> {
    qmp.execute_as("query-block-jobs", Value::Null)
        .await
        .map_err(qmp_err("query-block-jobs", "listing block jobs"))
}

pub(crate) async fn find_job(
    qmp: &Qmp,
    job_id: &str,
) -> Result<Option<BlockJobInfo>, BlockJobError> {
    Ok(query_block_jobs(qmp)
        .await?
        .into_iter()
        .find(|j| j.device == job_id))
}

/// Changes a job's rate limit (bytes per second, 0 for none).
pub async fn set_speed(qmp: &Qmp, job_id: &str, speed: u64) -> Result<(), BlockJobError> {
    qmp.execute(
        "block-job-set-speed",
        json!({"device": job_id, "speed": speed}),
    )
    .await
    .map_err(qmp_err("block-job-set-speed", format!("job {job_id}")))?;
    Ok(())
}

/// What a job-related event says about one of `jobs`.
enum JobEvent {
    Ready(String),
    Ended(String, JobEnd),
    IoError {
        job: String,
        operation: String,
        action: String,
    },
}

fn classify(event: &QmpEvent) -> Option<JobEvent> {
    let device = event.data.get("device")?.as_str()?.to_owned();
    let text = |k: &str| {
        event
            .data
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    match event.name.as_str() {
        "BLOCK_JOB_READY" => Some(JobEvent::Ready(device)),
        "BLOCK_JOB_COMPLETED" => {
            let end = match event.data.get("error").and_then(Value::as_str) {
                Some(e) => JobEnd::Failed(e.to_owned()),
                None => JobEnd::Completed,
            };
            Some(JobEvent::Ended(device, end))
        }
        "BLOCK_JOB_CANCELLED" => Some(JobEvent::Ended(device, JobEnd::Cancelled)),
        "BLOCK_JOB_ERROR" => Some(JobEvent::IoError {
            job: device,
            operation: text("operation"),
            action: text("action"),
        }),
        _ => None,
    }
}

fn progress(jobs: &[BlockJobInfo], wanted: &BTreeSet<String>) -> String {
    let shown: Vec<String> = jobs
        .iter()
        .filter(|j| wanted.contains(&j.device))
        .map(|j| {
            format!(
                "{} {:?} {}/{} ready={}",
                j.device, j.status, j.offset, j.len, j.ready
            )
        })
        .collect();
    if shown.is_empty() {
        "no such jobs".to_owned()
    } else {
        shown.join(", ")
    }
}

/// Waits until every job in `job_ids` is READY (`BLOCK_JOB_READY`, or
/// `ready: true` in `query-block-jobs`, which also covers jobs that became
/// ready before this was called). Fails at once if one of them ends, stops
/// on an I/O error, or does not exist.
pub async fn wait_ready(
    qmp: &Qmp,
    job_ids: &[String],
    timeout: Duration,
) -> Result<(), BlockJobError> {
    let mut events = qmp.subscribe();
    let deadline = Instant::now() + timeout;
    let mut pending: BTreeSet<String> = job_ids.iter().cloned().collect();
    loop {
        // Resynchronise from the source of truth (after subscribing, so
        // nothing falls between the query and the events).
        let jobs = query_block_jobs(qmp).await?;
        for id in pending.clone() {
            match jobs.iter().find(|j| j.device == id) {
                Some(j) if j.ready => {
                    pending.remove(&id);
                }
                Some(_) => {}
                None => return Err(BlockJobError::NoSuchJob { job: id }),
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        let poll_until = (Instant::now() + POLL_INTERVAL).min(deadline);
        loop {
            let event = match tokio::time::timeout_at(poll_until, events.recv()).await {
                Err(_) => break,
                Ok(Err(RecvError::Lagged(_))) => break,
                Ok(Err(RecvError::Closed)) => {
                    return Err(BlockJobError::EventsClosed {
                        endpoint: qmp.endpoint().to_owned(),
                    })
                }
                Ok(Ok(event)) => event,
            };
            match classify(&event) {
                Some(JobEvent::Ready(job)) => {
                    pending.remove(&job);
                    if pending.is_empty() {
                        return Ok(());
                    }
                }
                Some(JobEvent::Ended(job, end)) if pending.contains(&job) => {
                    return Err(BlockJobError::Ended {
                        job,
                        end,
                        waiting_for: "become ready",
                    })
                }
                Some(JobEvent::IoError {
                    job,
                    operation,
                    action,
                }) if pending.contains(&job) && action != "ignore" => {
                    return Err(BlockJobError::IoError {
                        job,
                        operation,
                        action,
                    })
                }
                _ => {}
            }
        }
        if Instant::now() >= deadline {
            return Err(BlockJobError::Timeout {
                jobs: pending.into_iter().collect(),
                waiting_for: "become ready",
                after: timeout,
                progress: progress(&jobs, &job_ids.iter().cloned().collect()),
            });
        }
    }
}

/// The switchover step: ends each READY mirror in `job_ids` with
/// `block-job-cancel` **without** force and waits for every
/// `BLOCK_JOB_COMPLETED`, after which each target is an exact copy of its
/// source and the source keeps its own disk.
///
/// Call it only while the guest cannot write (the source paused at
/// `pre-switchover`): a mirror completed while the guest runs would leave
/// the target behind at the next write. Every job is checked first and
/// nothing is cancelled unless all are READY ([`BlockJobError::NotReady`]):
/// a no-force cancel of a job still in its bulk copy abandons it. A job that
/// ends any other way (cancelled, failed) is an error: the target is not a
/// copy, and the migration must not continue.
pub async fn complete_mirrors(
    qmp: &Qmp,
    job_ids: &[String],
    timeout: Duration,
) -> Result<(), BlockJobError> {
    let mut events = qmp.subscribe();
    let jobs = query_block_jobs(qmp).await?;
    for id in job_ids {
        ready_job(&jobs, id)?;
    }
    for id in job_ids {
        qmp.execute("block-job-cancel", json!({"device": id, "force": false}))
            .await
            .map_err(qmp_err(
                "block-job-cancel",
                format!("completing mirror {id}"),
            ))?;
    }
    let mut pending: BTreeSet<String> = job_ids.iter().cloned().collect();
    let ends = wait_ends(qmp, &mut events, &mut pending, timeout, "complete").await?;
    for (job, end) in ends {
        if end != JobEnd::Completed {
            return Err(BlockJobError::Ended {
                job,
                end,
                waiting_for: "complete",
            });
        }
    }
    Ok(())
}

/// Job `id` of `jobs`, which must be READY: ending a mirror still in its
/// bulk copy, with or without pivot, abandons its target.
pub(crate) fn ready_job<'a>(
    jobs: &'a [BlockJobInfo],
    id: &str,
) -> Result<&'a BlockJobInfo, BlockJobError> {
    let job = jobs
        .iter()
        .find(|j| j.device == id)
        .ok_or_else(|| BlockJobError::NoSuchJob { job: id.to_owned() })?;
    if !job.ready {
        return Err(BlockJobError::NotReady {
            job: id.to_owned(),
            offset: job.offset,
            len: job.len,
            status: job.status.clone(),
        });
    }
    Ok(job)
}

/// Undo: cancels a job at once (`force: true`) and waits for it to end.
/// Returns how it ended, or `None` when no such job exists (already
/// finished or never started), so that a repeated undo is harmless.
///
/// For a mirror, the target is then incomplete and must be discarded.
pub async fn force_cancel(
    qmp: &Qmp,
    job_id: &str,
    timeout: Duration,
) -> Result<Option<JobEnd>, BlockJobError> {
    let mut events = qmp.subscribe();
    if find_job(qmp, job_id).await?.is_none() {
        return Ok(None);
    }
    if let Err(refused) = qmp
        .execute("block-job-cancel", json!({"device": job_id, "force": true}))
        .await
    {
        // It may have finished between the query and the cancel.
        if find_job(qmp, job_id).await?.is_none() {
            return Ok(None);
        }
        return Err(qmp_err(
            "block-job-cancel",
            format!("force-cancelling {job_id}"),
        )(refused));
    }
    let mut pending = BTreeSet::from([job_id.to_owned()]);
    let mut ends = wait_ends(qmp, &mut events, &mut pending, timeout, "end").await?;
    Ok(ends.pop().map(|(_, end)| end))
}

/// Waits for the final event of every job in `pending`. A job that is gone
/// from `query-block-jobs` without its event having been seen (the
/// subscriber lagged) is [`BlockJobError::OutcomeUnknown`].
pub(crate) async fn wait_ends(
    qmp: &Qmp,
    events: &mut tokio::sync::broadcast::Receiver<QmpEvent>,
    pending: &mut BTreeSet<String>,
    timeout: Duration,
    waiting_for: &'static str,
) -> Result<Vec<(String, JobEnd)>, BlockJobError> {
    let deadline = Instant::now() + timeout;
    let mut ends = Vec::new();
    let mut lagged = false;
    while !pending.is_empty() {
        let poll_until = (Instant::now() + POLL_INTERVAL).min(deadline);
        match tokio::time::timeout_at(poll_until, events.recv()).await {
            Ok(Ok(event)) => {
                if let Some(JobEvent::Ended(job, end)) = classify(&event) {
                    if pending.remove(&job) {
                        ends.push((job, end));
                    }
                }
                continue;
            }
            Ok(Err(RecvError::Lagged(_))) => lagged = true,
            Ok(Err(RecvError::Closed)) => {
                return Err(BlockJobError::EventsClosed {
                    endpoint: qmp.endpoint().to_owned(),
                })
            }
            Err(_) => {}
        }
        let jobs = query_block_jobs(qmp).await?;
        if lagged {
            if let Some(gone) = pending
                .iter()
                .find(|id| !jobs.iter().any(|j| &j.device == *id))
            {
                return Err(BlockJobError::OutcomeUnknown { job: gone.clone() });
            }
        }
        if Instant::now() >= deadline {
            return Err(BlockJobError::Timeout {
                jobs: pending.iter().cloned().collect(),
                waiting_for,
                after: timeout,
                progress: progress(&jobs, pending),
            });
        }
    }
    Ok(ends)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::QmpTimestamp;

    fn event(name: &str, data: Value) -> QmpEvent {
        QmpEvent {
            name: name.to_owned(),
            data,
            timestamp: QmpTimestamp {
                seconds: 1,
                microseconds: 0,
            },
        }
    }

    #[test]
    fn derived_names_fit_qemus_limit() {
        let longest = "a".repeat(names::MAX_ID_LEN);
        assert!(check_name("node name", &nbd_node_name(&longest)).is_ok());
        assert!(check_name("job id", &mirror_job_id(&longest)).is_ok());
        assert!(check_name("node name", &"a".repeat(32)).is_err());
        let job = MirrorJob::for_disk("vd0");
        assert_eq!(
            (
                job.job_id.as_str(),
                job.device.as_str(),
                job.target.as_str()
            ),
            ("mirror-vd0", "fmt-vd0", "nbd-vd0")
        );
        assert_eq!(job.copy_mode, CopyMode::WriteBlocking);
    }

    #[test]
    fn real_job_rows_parse() {
        // Captured from QEMU 10.0.2 during a migration mirror.
        let rows: Vec<BlockJobInfo> = serde_json::from_value(json!([{
            "auto-finalize": true, "io-status": "ok", "device": "mirror-vd0",
            "auto-dismiss": true, "busy": false, "len": 134254592, "offset": 134254592,
            "status": "ready", "paused": false, "speed": 0, "ready": true,
            "type": "mirror", "actively-synced": true
        }]))
        .unwrap();
        assert_eq!(rows[0].status, JobStatus::Ready);
        assert!(rows[0].ready);
        assert_eq!(rows[0].actively_synced, Some(true));
        assert_eq!(rows[0].error, None);
        let odd: JobStatus = serde_json::from_value(json!("hibernating")).unwrap();
        assert_eq!(odd, JobStatus::Other("hibernating".into()));
    }

    #[test]
    fn job_events_are_classified() {
        let data =
            json!({"device": "mirror-vd0", "len": 1, "offset": 1, "speed": 0, "type": "mirror"});
        assert!(matches!(
            classify(&event("BLOCK_JOB_READY", data.clone())),
            Some(JobEvent::Ready(j)) if j == "mirror-vd0"
        ));
        assert!(matches!(
            classify(&event("BLOCK_JOB_COMPLETED", data.clone())),
            Some(JobEvent::Ended(_, JobEnd::Completed))
        ));
        let mut failed = data.clone();
        failed["error"] = json!("Input/output error");
        assert!(matches!(
            classify(&event("BLOCK_JOB_COMPLETED", failed)),
            Some(JobEvent::Ended(_, JobEnd::Failed(e))) if e.contains("Input")
        ));
        assert!(matches!(
            classify(&event("BLOCK_JOB_CANCELLED", data)),
            Some(JobEvent::Ended(_, JobEnd::Cancelled))
        ));
        assert!(classify(&event(
            "JOB_STATUS_CHANGE",
            json!({"id": "x", "status": "ready"})
        ))
        .is_none());
    }
}

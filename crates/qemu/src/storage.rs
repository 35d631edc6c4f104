//! Storage work inside one running QEMU: moving a disk to another image on
//! the same host while the guest runs (optionally changing its format), and
//! point-in-time backups of several disks.
//!
//! # A live move
//!
//! ```text
//!  blockdev_add_image(target) ─▶ blockdev-mirror ─▶ READY ─▶ pivot_mirrors ─▶ blockdev-del old format node,
//!  (fmta-/fila- or fmtb-/filb-)   (write-blocking)           (block-job-complete:   then old file node
//!                                                              the device now reads  (QEMU closes the old image)
//!                                                              the target)
//! ```
//!
//! The mirror is the same job as a migration's ([`crate::blockjob`]), only
//! it ends with `block-job-complete` (pivot: the guest's device switches to
//! the target) instead of a no-force cancel (keep the source). Measured on
//! QEMU 10.0:
//!
//! * The mirror flushes its target before it reports READY and again, with
//!   the source drained, before it pivots: right after
//!   `BLOCK_JOB_COMPLETED` a qcow2 target is consistent on disk
//!   (`qemu-img compare -U` sees every write, including clusters the guest
//!   allocated after READY) without a `stop` or a `blockdev-del`.
//! * While the mirror runs, the target cannot be read from outside, not
//!   even with `qemu-img -U`: the job does not share "consistent read" on
//!   it (the copy is incomplete until it ends).
//! * After the pivot the old nodes are still open and still hold the old
//!   file's descriptor (though no longer its write lock); only
//!   `blockdev-del` of both closes it.
//!
//! Node names must differ from the ones in use, so a move alternates
//! between two sets ([`move_node_names`]): a disk that starts as
//! `fmt-<id>`/`file-<id>` (the command line's names) moves to
//! `fmta-<id>`/`fila-<id>`, the next move to `fmtb-<id>`/`filb-<id>`, then
//! back to `a`. Callers that later address the disk's root node (a
//! migration's mirror, a backup) must take it from [`disk_backing`] rather
//! than assume `fmt-<id>`.
//!
//! # A backup
//!
//! [`backup`] starts one `blockdev-backup` per disk in a single QMP
//! `transaction`, so every disk is copied as of the same instant (the jobs
//! copy each old block aside before the guest overwrites it), and waits for
//! all of them. Measured on QEMU 10.0: a backup job does **not** flush its
//! target when it ends; until the target node is deleted
//! ([`blockdev_del_image`], which closes and so flushes it) a qcow2 target
//! on disk is missing the metadata of what was copied (`qemu-img compare`
//! then reads it as zeroes). Delete the target nodes before using the
//! files.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use ferry_core::names;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::blockjob::{
    self, check_name, find_job, qmp_err, wait_ends, BlockJobError, JobEnd, MAX_NODE_NAME_LEN,
};
use crate::qmp::Qmp;
use crate::tls::Applied;

/// A local image opened in a running QEMU: a `file` protocol node under a
/// format node (`raw` or `qcow2`).
///
/// The file node is opened like the command line opens a disk's file
/// (`locking: on`, `discard: unmap`, writable) with the host page cache
/// (`cache.direct: false`, `aio: threads`) and guest flushes honoured
/// (`no-flush: false`). The page cache works on every file system (tmpfs
/// has no `O_DIRECT`), and since flushes still reach the disk the guest
/// loses nothing it flushed. The guest-visible write cache belongs to the
/// device, not the node, so a pivot does not change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageNode {
    /// The format node: what a device or a job uses.
    pub node_name: String,
    /// The `file` node under it.
    pub file_node_name: String,
    /// The image; absolute.
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
}

/// The formats an [`ImageNode`] may have.
const FORMATS: [&str; 2] = ["raw", "qcow2"];

/// The `a` set of a move's node names.
const SET_A: (&str, &str) = ("fmta-", "fila-");
/// The `b` set.
const SET_B: (&str, &str) = ("fmtb-", "filb-");

/// The (format, file) node names for moving disk `disk_id`, whose root
/// node is now `current_root`: the `a` set (`fmta-<id>`, `fila-<id>`)
/// unless the disk is on it already, then the `b` set (`fmtb-<id>`,
/// `filb-<id>`). Why: the target's nodes must exist next to the current
/// ones until the pivot, so they can never take their names; two sets are
/// enough because the old ones are deleted after each move. Neither set is
/// ever the command line's `fmt-<id>`/`file-<id>`.
///
/// With disk ids of at most [`names::MAX_ID_LEN`] (24) characters every
/// name fits QEMU's 31.
pub fn move_node_names(disk_id: &str, current_root: &str) -> (String, String) {
    let (fmt, file) = if current_root == format!("{}{disk_id}", SET_A.0) {
        SET_B
    } else {
        SET_A
    };
    (format!("{fmt}{disk_id}"), format!("{file}{disk_id}"))
}

/// The file node that Ferry puts under format node `root` of disk
/// `disk_id`: `file-<id>` under the command line's `fmt-<id>`, and the
/// matching name of a move's set under `fmta-<id>`/`fmtb-<id>`. `None` for
/// a root Ferry did not name. What a move deletes after its pivot.
pub fn file_node_for_root(disk_id: &str, root: &str) -> Option<String> {
    if root == names::disk_format_node(disk_id) {
        return Some(names::disk_file_node(disk_id));
    }
    [SET_A, SET_B]
        .into_iter()
        .find(|(fmt, _)| root == format!("{fmt}{disk_id}"))
        .map(|(_, file)| format!("{file}{disk_id}"))
}

/// One row of `query-named-block-nodes` (flat).
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct NamedNode {
    #[serde(default)]
    node_name: String,
    #[serde(default)]
    drv: String,
    /// The node's file name: the image path for `file` and for a format
    /// node directly over one.
    #[serde(default)]
    file: String,
}

async fn named_node(qmp: &Qmp, node_name: &str) -> Result<Option<NamedNode>, BlockJobError> {
    let rows: Vec<NamedNode> = qmp
        .execute_as("query-named-block-nodes", json!({"flat": true}))
        .await
        .map_err(qmp_err("query-named-block-nodes", "listing block nodes"))?;
    Ok(rows.into_iter().find(|r| r.node_name == node_name))
}

/// Adds one node; if QEMU refuses because the node exists with `driver`
/// on `path` it is [`Applied::AlreadyDone`], with anything else a conflict.
async fn add_node(
    qmp: &Qmp,
    args: Value,
    node_name: &str,
    driver: &str,
    path: &str,
) -> Result<Applied, BlockJobError> {
    let Err(refused) = qmp.execute("blockdev-add", args).await else {
        return Ok(Applied::Done);
    };
    match named_node(qmp, node_name).await? {
        Some(n) if n.drv == driver && n.file == path => Ok(Applied::AlreadyDone),
        Some(n) => Err(BlockJobError::NodeConflict {
            node: node_name.to_owned(),
            existing: format!("{} on {}", n.drv, n.file),
        }),
        None => Err(qmp_err(
            "blockdev-add",
            format!("{driver} node {node_name} for {path}"),
        )(refused)),
    }
}

/// Opens `node.path` as a `file` node and a format node over it.
///
/// Idempotent: a node that already exists with the same name, driver and
/// image is kept ([`Applied::AlreadyDone`] when both were); the same name
/// with another driver or image is [`BlockJobError::NodeConflict`]. If the
/// format node cannot be added (not a qcow2 file, a name conflict) the
/// file node is deleted again, so a failed add leaves no node behind (it
/// would otherwise keep the image open and locked).
pub async fn blockdev_add_image(qmp: &Qmp, node: &ImageNode) -> Result<Applied, BlockJobError> {
    check_name("node name", &node.node_name)?;
    check_name("node name", &node.file_node_name)?;
    if node.node_name == node.file_node_name {
        return Err(BlockJobError::Invalid {
            what: "node name",
            value: node.node_name.clone(),
            reason: "the format and file nodes need different names".into(),
        });
    }
    if !FORMATS.contains(&node.format.as_str()) {
        return Err(BlockJobError::Invalid {
            what: "image format",
            value: node.format.clone(),
            reason: format!("expected one of {FORMATS:?}"),
        });
    }
    let path = node
        .path
        .to_str()
        .filter(|_| node.path.is_absolute())
        .ok_or_else(|| BlockJobError::Invalid {
            what: "image path",
            value: node.path.display().to_string(),
            reason: "must be an absolute UTF-8 path".into(),
        })?;
    let cache = json!({"direct": false, "no-flush": false});
    let file_args = json!({
        "driver": "file",
        "node-name": node.file_node_name,
        "filename": path,
        "aio": "threads",
        "cache": cache,
        "read-only": false,
        "locking": "on",
        "discard": "unmap",
    });
    let file = add_node(qmp, file_args, &node.file_node_name, "file", path).await?;
    let format_args = json!({
        "driver": node.format,
        "node-name": node.node_name,
        "file": node.file_node_name,
        "cache": cache,
        "read-only": false,
        "discard": "unmap",
    });
    let format = match add_node(qmp, format_args, &node.node_name, &node.format, path).await {
        Ok(applied) => applied,
        Err(e) => {
            // Also when the file node was left by an earlier, interrupted
            // call: nothing else uses these names. If something stacked on
            // it after all, QEMU refuses and the node stays.
            if let Err(undo) = blockjob::blockdev_del(qmp, &node.file_node_name).await {
                tracing::warn!(node = %node.file_node_name, error = %undo,
                    "could not delete the file node after its format node failed");
            }
            return Err(e);
        }
    };
    Ok(if file == Applied::Done || format == Applied::Done {
        Applied::Done
    } else {
        Applied::AlreadyDone
    })
}

/// Closes an image opened by [`blockdev_add_image`]: the format node, then
/// the file node. A node that does not exist is fine (a repeated or partial
/// cleanup); a node still in use (by a device or a job) is an error.
pub async fn blockdev_del_image(qmp: &Qmp, node: &ImageNode) -> Result<(), BlockJobError> {
    blockjob::blockdev_del(qmp, &node.node_name).await?;
    blockjob::blockdev_del(qmp, &node.file_node_name).await?;
    Ok(())
}

/// What a guest disk currently reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBacking {
    /// The root (format) node under the device.
    pub node_name: String,
    /// The image file.
    pub file: PathBuf,
    /// The root node's driver (`raw`, `qcow2`, ...).
    pub format: String,
}

#[derive(Deserialize)]
struct BlockRow {
    #[serde(default)]
    qdev: Option<String>,
    #[serde(default)]
    inserted: Option<Inserted>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Inserted {
    #[serde(default)]
    node_name: Option<String>,
    file: String,
    drv: String,
}

/// Whether a `query-block` row's `qdev` is device `device_id`. QEMU 10.0
/// gives the device's id when the block backend hangs off the device
/// itself (`scsi-hd`, `ide-hd`: `disk-vd0`), and the QOM path of the inner
/// device when it hangs off a child (`virtio-blk-pci`:
/// `/machine/peripheral/disk-vd0/virtio-backend`); the backend itself is
/// anonymous (`device: ""`) with `-blockdev`.
fn qdev_is(qdev: &str, device_id: &str) -> bool {
    if qdev == device_id {
        return true;
    }
    let Some(rest) = qdev
        .strip_prefix("/machine/peripheral/")
        .and_then(|r| r.strip_prefix(device_id))
    else {
        return false;
    };
    rest.is_empty() || rest.starts_with('/')
}

/// The node and image behind the guest's disk `disk_id` (device
/// [`names::disk_device_id`]), from `query-block`. During a mirror this is
/// still the source (QEMU hides the mirror's filter node); after a pivot it
/// is the target. Why it is asked, not derived: after a move the root node
/// is no longer the command line's `fmt-<id>`.
pub async fn disk_backing(qmp: &Qmp, disk_id: &str) -> Result<DiskBacking, BlockJobError> {
    let device_id = names::disk_device_id(disk_id);
    let rows: Vec<BlockRow> = qmp
        .execute_as("query-block", Value::Null)
        .await
        .map_err(qmp_err("query-block", format!("finding disk {disk_id}")))?;
    let invalid = |reason: &str| BlockJobError::Invalid {
        what: "disk",
        value: disk_id.to_owned(),
        reason: reason.to_owned(),
    };
    let row = rows
        .into_iter()
        .find(|r| r.qdev.as_deref().is_some_and(|q| qdev_is(q, &device_id)))
        .ok_or_else(|| invalid(&format!("QEMU has no block device {device_id}")))?;
    let inserted = row
        .inserted
        .ok_or_else(|| invalid("the device has no medium (no block node)"))?;
    Ok(DiskBacking {
        node_name: inserted
            .node_name
            .ok_or_else(|| invalid("QEMU did not name the device's root node"))?,
        file: PathBuf::from(inserted.file),
        format: inserted.drv,
    })
}

/// The pivot of a live move: `block-job-complete` on each mirror in
/// `job_ids`, after which each guest device reads and writes the mirror's
/// target, and waits for every `BLOCK_JOB_COMPLETED`.
///
/// Every job is checked first and nothing is completed unless all exist
/// and are READY ([`BlockJobError::NotReady`]): QEMU refuses to complete a
/// mirror still in its bulk copy, and refusing them all up front keeps the
/// disks of one VM from ending up half on the old and half on the new
/// storage because of the first one that was not ready. A job that ends
/// any other way than completed is an error (the device stays on its old
/// image).
///
/// QEMU drains the source and flushes the target before it switches, so
/// the switch itself is safe while the guest runs. A repeated call after
/// success finds no jobs ([`BlockJobError::NoSuchJob`]); [`disk_backing`]
/// tells whether the pivot happened.
pub async fn pivot_mirrors(
    qmp: &Qmp,
    job_ids: &[String],
    timeout: Duration,
) -> Result<(), BlockJobError> {
    let mut events = qmp.subscribe();
    let jobs = blockjob::query_block_jobs(qmp).await?;
    for id in job_ids {
        let job = jobs
            .iter()
            .find(|j| &j.device == id)
            .ok_or_else(|| BlockJobError::NoSuchJob { job: id.clone() })?;
        if job.kind != "mirror" {
            return Err(BlockJobError::Invalid {
                what: "job",
                value: id.clone(),
                reason: format!("a {} job, not a mirror: it cannot pivot", job.kind),
            });
        }
        blockjob::ready_job(&jobs, id)?;
    }
    for id in job_ids {
        qmp.execute("block-job-complete", json!({"device": id}))
            .await
            .map_err(qmp_err(
                "block-job-complete",
                format!("pivoting mirror {id}"),
            ))?;
    }
    let mut pending: BTreeSet<String> = job_ids.iter().cloned().collect();
    let ends = wait_ends(qmp, &mut events, &mut pending, timeout, "pivot").await?;
    first_failure(ends, "pivot")
}

/// Starts a mirror that copies only the writes made from now on
/// (`blockdev-mirror`, `sync: none`), so that [`pivot_mirrors`] can switch
/// the device onto a target that already holds the same content.
///
/// Why: a full mirror's target cannot be read from outside while the job
/// runs, so a storage move that wants to *verify* the copy before the
/// guest uses it ends the full mirror without pivoting (the target is then
/// an exact copy, and readable), compares, and only then pivots through
/// this second mirror — with the guest paused, it has nothing to copy and
/// is READY at once. A job of that id that is already a mirror is
/// [`Applied::AlreadyDone`].
pub async fn mirror_new_writes(
    qmp: &Qmp,
    job_id: &str,
    device: &str,
    target: &str,
) -> Result<Applied, BlockJobError> {
    check_name("job id", job_id)?;
    let args = json!({
        "job-id": job_id,
        "device": device,
        "target": target,
        "sync": "none",
        "copy-mode": "write-blocking",
    });
    let Err(refused) = qmp.execute("blockdev-mirror", args).await else {
        return Ok(Applied::Done);
    };
    match find_job(qmp, job_id).await? {
        Some(existing) if existing.kind == "mirror" => Ok(Applied::AlreadyDone),
        _ => Err(qmp_err(
            "blockdev-mirror",
            format!("mirroring new writes of {device} into {target}"),
        )(refused)),
    }
}

/// `Ok` when every job completed; otherwise the most telling failure: a
/// job that failed on its own rather than one cancelled because of it.
fn first_failure(
    ends: Vec<(String, JobEnd)>,
    waiting_for: &'static str,
) -> Result<(), BlockJobError> {
    let failed = ends
        .iter()
        .find(|(_, end)| matches!(end, JobEnd::Failed(_)))
        .or_else(|| ends.iter().find(|(_, end)| *end != JobEnd::Completed));
    match failed {
        None => Ok(()),
        Some((job, end)) => Err(BlockJobError::Ended {
            job: job.clone(),
            end: end.clone(),
            waiting_for,
        }),
    }
}

/// A `blockdev-backup` job with `sync: full`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupJob {
    pub job_id: String,
    /// Source node: the disk's root node ([`disk_backing`]).
    pub device: String,
    /// Target node: the format node of an image of the same virtual size
    /// ([`blockdev_add_image`]).
    pub target: String,
    /// Bytes per second; `None` is unlimited.
    pub speed: Option<u64>,
}

/// Copies several disks as of one instant: a QMP `transaction` of one
/// `blockdev-backup` (`sync: full`) per job, then waits until every job
/// has ended; each must end completed.
///
/// The transaction starts all jobs atomically (all or none), and from then
/// on each job copies a block aside before the guest overwrites it, so the
/// targets hold the disks as they were at that instant while the guest
/// keeps running. `completion-mode: grouped` makes the jobs succeed or
/// fail together: if one fails, QEMU cancels the others, so a failed
/// backup never leaves a mix of complete and incomplete copies that could
/// be mistaken for a consistent set.
///
/// A repeated call while the same backup jobs still run waits for them. On
/// a timeout the jobs keep running: cancel them with
/// [`blockjob::force_cancel`] if the backup is abandoned. Afterwards delete
/// the target nodes ([`blockdev_del_image`]) before using the images: QEMU
/// does not flush a backup's target when the job ends (see the module
/// docs).
pub async fn backup(qmp: &Qmp, jobs: &[BackupJob], timeout: Duration) -> Result<(), BlockJobError> {
    let mut ids = BTreeSet::new();
    for job in jobs {
        check_name("job id", &job.job_id)?;
        check_name("node name", &job.device)?;
        check_name("node name", &job.target)?;
        if !ids.insert(job.job_id.clone()) {
            return Err(BlockJobError::Invalid {
                what: "job id",
                value: job.job_id.clone(),
                reason: "given twice in one backup".into(),
            });
        }
    }
    if jobs.is_empty() {
        return Ok(());
    }
    let actions: Vec<Value> = jobs
        .iter()
        .map(|job| {
            let mut data = json!({
                "job-id": job.job_id,
                "device": job.device,
                "target": job.target,
                "sync": "full",
            });
            if let Some(speed) = job.speed {
                data["speed"] = json!(speed);
            }
            json!({"type": "blockdev-backup", "data": data})
        })
        .collect();
    let mut events = qmp.subscribe();
    let started = qmp
        .execute(
            "transaction",
            json!({"actions": actions, "properties": {"completion-mode": "grouped"}}),
        )
        .await;
    if let Err(refused) = started {
        // A repeat finds its jobs running (the transaction is refused
        // because their targets are busy): wait for them.
        let mut running = 0;
        for job in jobs {
            match find_job(qmp, &job.job_id).await? {
                Some(j) if j.kind == "backup" => running += 1,
                Some(j) => {
                    return Err(BlockJobError::JobConflict {
                        job: job.job_id.clone(),
                        kind: j.kind,
                        device_hint: j.device,
                    })
                }
                None => {}
            }
        }
        if running != jobs.len() {
            let devices: Vec<&str> = jobs.iter().map(|j| j.device.as_str()).collect();
            return Err(qmp_err(
                "transaction",
                format!("backing up {}", devices.join(", ")),
            )(refused));
        }
    }
    let ends = wait_ends(qmp, &mut events, &mut ids, timeout, "complete").await?;
    first_failure(ends, "complete")
}

/// Progress of `job_ids`: the sums of `offset` and `len` from
/// `query-block-jobs`. A job that is not there counts as 0 of 0 (not
/// started yet, or already ended and dismissed), so the figures suit a
/// progress bar, not a completion check.
pub async fn jobs_progress(qmp: &Qmp, job_ids: &[String]) -> Result<(u64, u64), BlockJobError> {
    let jobs = blockjob::query_block_jobs(qmp).await?;
    Ok(jobs
        .iter()
        .filter(|j| job_ids.contains(&j.device))
        .fold((0, 0), |(done, total), j| (done + j.offset, total + j.len)))
}

// The longest name a move makes must fit QEMU's limit.
const _: () = assert!(SET_A.0.len() + names::MAX_ID_LEN <= MAX_NODE_NAME_LEN);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn move_names_alternate_and_never_reuse_the_current_ones() {
        assert_eq!(
            move_node_names("vd0", "fmt-vd0"),
            ("fmta-vd0".to_owned(), "fila-vd0".to_owned())
        );
        assert_eq!(
            move_node_names("vd0", "fmta-vd0"),
            ("fmtb-vd0".to_owned(), "filb-vd0".to_owned())
        );
        assert_eq!(
            move_node_names("vd0", "fmtb-vd0"),
            ("fmta-vd0".to_owned(), "fila-vd0".to_owned())
        );
        // A root Ferry did not name (e.g. QEMU's `#block123`) gets set a.
        assert_eq!(move_node_names("vd0", "#block123").0, "fmta-vd0");
        // Another disk's `a` name is not this disk's.
        assert_eq!(move_node_names("vd0", "fmta-vd01").0, "fmta-vd0");
        for id in ["vd0", "x", &"a".repeat(names::MAX_ID_LEN)] {
            for current in [
                names::disk_format_node(id),
                format!("fmta-{id}"),
                format!("fmtb-{id}"),
            ] {
                let (fmt, file) = move_node_names(id, &current);
                assert_ne!(fmt, current);
                assert_ne!(fmt, file);
                for name in [&fmt, &file] {
                    assert_ne!(name, &names::disk_format_node(id));
                    assert_ne!(name, &names::disk_file_node(id));
                    assert!(check_name("node name", name).is_ok(), "{name}");
                }
                assert_eq!(file_node_for_root(id, &fmt), Some(file));
            }
        }
    }

    #[test]
    fn file_nodes_pair_with_their_roots() {
        assert_eq!(
            file_node_for_root("vd0", "fmt-vd0").as_deref(),
            Some("file-vd0")
        );
        assert_eq!(
            file_node_for_root("vd0", "fmta-vd0").as_deref(),
            Some("fila-vd0")
        );
        assert_eq!(
            file_node_for_root("vd0", "fmtb-vd0").as_deref(),
            Some("filb-vd0")
        );
        assert_eq!(file_node_for_root("vd0", "fmtc-vd0"), None);
        assert_eq!(file_node_for_root("vd0", "fmt-vd1"), None);
    }

    #[test]
    fn qdev_matches_the_forms_qemu_10_reports() {
        // Captured from QEMU 10.0.2 (-blockdev + -device drive=fmt-vdN).
        assert!(qdev_is(
            "/machine/peripheral/disk-vd0/virtio-backend",
            "disk-vd0"
        ));
        assert!(qdev_is("disk-vd1", "disk-vd1"));
        assert!(qdev_is("/machine/peripheral/disk-vd2", "disk-vd2"));
        assert!(!qdev_is(
            "/machine/peripheral/disk-vd01/virtio-backend",
            "disk-vd0"
        ));
        assert!(!qdev_is("disk-vd01", "disk-vd0"));
        assert!(!qdev_is("/machine/unattached/disk-vd0", "disk-vd0"));
    }

    #[test]
    fn query_block_rows_parse() {
        // Trimmed from QEMU 10.0.2.
        let rows: Vec<BlockRow> = serde_json::from_value(json!([
            {"device": "", "qdev": "/machine/peripheral/disk-vd0/virtio-backend",
             "locked": false, "removable": false, "type": "unknown", "io-status": "ok",
             "inserted": {"node-name": "fmta-vd0", "file": "/d/b.qcow2", "drv": "qcow2",
                          "ro": false, "encrypted": false, "detect_zeroes": "off",
                          "image": {"virtual-size": 67108864, "filename": "/d/b.qcow2", "format": "qcow2"}}},
            {"device": "", "qdev": "disk-vd1", "locked": false, "removable": true, "type": "unknown"}
        ]))
        .unwrap();
        let ins = rows[0].inserted.as_ref().unwrap();
        assert_eq!(ins.node_name.as_deref(), Some("fmta-vd0"));
        assert_eq!(
            (ins.file.as_str(), ins.drv.as_str()),
            ("/d/b.qcow2", "qcow2")
        );
        assert!(rows[1].inserted.is_none());
    }

    #[test]
    fn the_worst_end_is_reported() {
        assert!(first_failure(vec![("a".into(), JobEnd::Completed)], "complete").is_ok());
        let err = first_failure(
            vec![
                ("a".into(), JobEnd::Cancelled),
                ("b".into(), JobEnd::Failed("No space left on device".into())),
                ("c".into(), JobEnd::Completed),
            ],
            "complete",
        )
        .unwrap_err();
        assert!(
            matches!(&err, BlockJobError::Ended { job, end: JobEnd::Failed(_), .. } if job == "b"),
            "{err}"
        );
        let err = first_failure(vec![("a".into(), JobEnd::Cancelled)], "pivot").unwrap_err();
        assert!(matches!(
            err,
            BlockJobError::Ended {
                end: JobEnd::Cancelled,
                ..
            }
        ));
    }
}

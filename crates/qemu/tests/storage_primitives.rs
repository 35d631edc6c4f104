//! The storage primitives against a real QEMU 10.0: a live move of a
//! running VM's disk to another image and format and back, a
//! point-in-time backup of two disks, and the refusals and repeats of the
//! node helpers.
//!
//! The VMs here run firmware only (SeaBIOS finds no bootable disk and
//! waits), so they start in a fraction of a second and never write to
//! their disks themselves. "Guest writes" are made through the disk's
//! device with HMP `qemu-io -d <device>`, which goes the way a guest write
//! goes (device → block backend → the mirror's or backup's filter → image),
//! so writes during a mirror or a backup exercise exactly what a guest's
//! would.

mod migration_support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use ferry_core::spec::VmSpec;
use ferry_qemu::blockjob::{self, BlockJobError, CopyMode, MirrorJob};
use ferry_qemu::storage::{self, BackupJob, DiskBacking, ImageNode};
use ferry_qemu::tls::Applied;
use migration_support::{blank_disk, BareQemu, Scratch, Vm};

const MIB: u64 = 1024 * 1024;
/// Virtual size of every test disk. The first half holds a pattern, the
/// second half is a hole (zeroes), so copies see both data and zeroes.
const DISK_SIZE: u64 = 32 * MIB;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A raw disk of [`DISK_SIZE`] whose first half is 4 KiB blocks each
/// filled with `salt` and the block's index, so that every block differs
/// from every other, on this disk and on other salts'.
fn pattern_disk(path: &Path, salt: u32) {
    let file = std::fs::File::create(path).expect("creating a pattern disk");
    let mut data = Vec::with_capacity((DISK_SIZE / 2) as usize);
    for block in 0..(DISK_SIZE / 2 / 4096) as u32 {
        let word = [salt.to_le_bytes(), block.to_le_bytes()].concat();
        for _ in 0..4096 / word.len() {
            data.extend_from_slice(&word);
        }
    }
    file.write_all_at(&data, 0).expect("writing a pattern disk");
    file.set_len(DISK_SIZE).expect("sizing a pattern disk");
}

/// A VM with raw disks `(id, path)` on virtio, booting from the first
/// (which fails: no boot sector) and so running firmware only.
fn spec(disks: &[(&str, &Path)]) -> VmSpec {
    let mut toml = String::from("name = \"storage\"\nmemory = \"64MiB\"\n");
    for (id, path) in disks {
        toml.push_str(&format!(
            "[[disks]]\nid = \"{id}\"\npath = \"{}\"\nformat = \"raw\"\n",
            path.display()
        ));
    }
    VmSpec::from_toml_str(&toml, Path::new("/")).unwrap_or_else(|e| panic!("test spec: {e}"))
}

fn qemu_img(args: &[&str]) -> Output {
    std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running qemu-img (install qemu-utils 10.0): {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 test path")
}

/// `qemu-img compare -U`: `Ok` when the guest-visible contents are equal.
/// `-U` reads images a running QEMU holds.
fn compare(fmt_a: &str, a: &Path, fmt_b: &str, b: &Path) -> Result<(), String> {
    let out = qemu_img(&[
        "compare",
        "-U",
        "-f",
        fmt_a,
        "-F",
        fmt_b,
        path_str(a),
        path_str(b),
    ]);
    if out.status.success() {
        Ok(())
    } else {
        Err(text(&out))
    }
}

fn create_qcow2(path: &Path, size: u64) {
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path_str(path),
        &size.to_string(),
    ]);
    assert!(out.status.success(), "qemu-img create: {}", text(&out));
}

/// Whether a process holds `path`'s write lock: `qemu-img resize` to the
/// same size needs it (and changes nothing). `qemu-img info` is no probe:
/// it only needs "consistent read", which a disk in use still shares.
/// `size` is the image's virtual size.
fn write_locked(format: &str, path: &Path, size: u64) -> bool {
    let out = qemu_img(&[
        "resize",
        "-q",
        "-f",
        format,
        path_str(path),
        &size.to_string(),
    ]);
    if out.status.success() {
        return false;
    }
    let msg = text(&out);
    assert!(msg.contains("\"write\" lock"), "qemu-img resize: {msg}");
    true
}

/// Whether process `pid` has `path` open.
fn has_open(pid: u32, path: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("listing QEMU's open files")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|target| target == path)
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, offset))
        .expect("reading a disk image");
    buf
}

/// A write by the guest's disk `disk_id`: `len` bytes of `byte` at
/// `offset`, through the device (HMP `qemu-io -d`; a virtio-blk-pci's
/// block backend hangs off its inner `virtio-backend` device).
async fn guest_write(vm: &Vm, disk_id: &str, byte: u8, offset: u64, len: u64) {
    let command = format!(
        "qemu-io -d /machine/peripheral/disk-{disk_id}/virtio-backend \
         \"write -P {byte:#x} {offset} {len}\""
    );
    let reply = vm
        .qmp
        .execute(
            "human-monitor-command",
            serde_json::json!({"command-line": command}),
        )
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    // HMP reports errors as text; qemu-io's `write` prints nothing unless
    // it fails (its statistics need -v).
    assert_eq!(reply, serde_json::json!(""), "{command}");
}

/// The progress of `jobs` once it counts at least `len` bytes in all:
/// QEMU reports a new job's `len` as 0 until the job has run a little.
async fn sized_progress(q: &ferry_qemu::qmp::Qmp, jobs: &[String], len: u64) -> (u64, u64) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (done, total) = storage::jobs_progress(q, jobs).await.unwrap();
        if total >= len {
            return (done, total);
        }
        assert!(
            Instant::now() < deadline,
            "jobs {jobs:?} never sized: {done} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One live move of disk `disk_id` into `target_path` (`format`), as the
/// agent does it; `pause` stops the guest around the pivot. Returns the
/// disk's backing before the move and the target's nodes.
async fn live_move(
    vm: &Vm,
    disk_id: &str,
    target_path: &Path,
    format: &str,
    speed: Option<u64>,
    pause: bool,
) -> (DiskBacking, ImageNode) {
    let q = &vm.qmp;
    let old = storage::disk_backing(q, disk_id).await.unwrap();
    let (node_name, file_node_name) = storage::move_node_names(disk_id, &old.node_name);
    let target = ImageNode {
        node_name,
        file_node_name,
        path: target_path.to_owned(),
        format: format.to_owned(),
    };
    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(
            storage::blockdev_add_image(q, &target).await.unwrap(),
            expected
        );
    }
    let job = MirrorJob {
        job_id: format!("move-{disk_id}"),
        device: old.node_name.clone(),
        target: target.node_name.clone(),
        copy_mode: CopyMode::WriteBlocking,
        speed,
    };
    assert_eq!(
        blockjob::blockdev_mirror(q, &job).await.unwrap(),
        Applied::Done
    );
    let jobs = [job.job_id.clone()];
    if speed.is_some() {
        // Still in its bulk copy: a pivot now is refused and changes
        // nothing; guest writes now land on both sides.
        let err = storage::pivot_mirrors(q, &jobs, TIMEOUT).await.unwrap_err();
        assert!(matches!(err, BlockJobError::NotReady { .. }), "{err}");
        let (done, total) = sized_progress(q, &jobs, DISK_SIZE).await;
        assert!(done < total, "{done} of {total}");
        guest_write(vm, disk_id, 0xa1, 20 * MIB, MIB).await;
        blockjob::set_speed(q, &job.job_id, 0).await.unwrap();
    }
    blockjob::wait_ready(q, &jobs, TIMEOUT).await.unwrap();
    // While it is READY (write-blocking): on both sides before it returns.
    guest_write(vm, disk_id, 0xb2, 24 * MIB, MIB).await;
    // During the mirror the device still reads the old image.
    assert_eq!(storage::disk_backing(q, disk_id).await.unwrap(), old);

    if pause {
        q.stop().await.unwrap();
    }
    storage::pivot_mirrors(q, &jobs, TIMEOUT).await.unwrap();
    let old_nodes = ImageNode {
        node_name: old.node_name.clone(),
        file_node_name: storage::file_node_for_root(disk_id, &old.node_name)
            .expect("a root node Ferry named"),
        path: old.file.clone(),
        format: old.format.clone(),
    };
    // Still open (not locked) until its nodes go.
    assert!(has_open(vm.process.pid, &old.file));
    for _ in 0..2 {
        storage::blockdev_del_image(q, &old_nodes).await.unwrap();
    }
    if pause {
        q.cont().await.unwrap();
    }
    assert!(blockjob::query_block_jobs(q).await.unwrap().is_empty());
    (old, target)
}

#[tokio::test]
async fn a_running_disk_moves_to_qcow2_and_back_and_the_old_image_is_released() {
    let started = Instant::now();
    let scratch = Scratch::new("storage-move");
    let dir = scratch.path();
    let raw = dir.join("vd0.raw");
    pattern_disk(&raw, 1);
    let vm = Vm::launch(
        "storage",
        &spec(&[("vd0", &raw)]),
        &dir.join("vm"),
        None,
        false,
    )
    .await;
    let q = &vm.qmp;
    let pid = vm.process.pid;

    let start = storage::disk_backing(q, "vd0").await.unwrap();
    assert_eq!(
        start,
        DiskBacking {
            node_name: "fmt-vd0".into(),
            file: raw.clone(),
            format: "raw".into(),
        }
    );
    assert!(
        write_locked("raw", &raw, DISK_SIZE),
        "the probe must see QEMU's lock"
    );

    // raw → qcow2, throttled so that writes land during the bulk copy,
    // pivoted with the guest paused.
    let qcow2 = dir.join("vd0.qcow2");
    create_qcow2(&qcow2, DISK_SIZE);
    let (old, target) = live_move(&vm, "vd0", &qcow2, "qcow2", Some(MIB), true).await;
    assert_eq!(old, start);
    assert_eq!(
        storage::disk_backing(q, "vd0").await.unwrap(),
        DiskBacking {
            node_name: "fmta-vd0".into(),
            file: qcow2.clone(),
            format: "qcow2".into(),
        }
    );
    assert_eq!(target.file_node_name, "fila-vd0");
    assert!(!has_open(pid, &raw), "QEMU still has the old image open");
    assert!(
        !write_locked("raw", &raw, DISK_SIZE),
        "the old image is still locked"
    );
    compare("raw", &raw, "qcow2", &qcow2).unwrap();
    // Both guest writes reached the old image too: the copy is not just
    // the pattern.
    assert!(read_at(&raw, 20 * MIB, 4096).iter().all(|b| *b == 0xa1));
    assert!(read_at(&raw, 24 * MIB, 4096).iter().all(|b| *b == 0xb2));

    // From now on the guest writes to the new image only.
    guest_write(&vm, "vd0", 0xc3, 28 * MIB, MIB).await;
    assert!(compare("raw", &raw, "qcow2", &qcow2).is_err());

    // qcow2 → raw, on the other set of names, pivoted while the guest runs.
    let back = dir.join("vd0-back.raw");
    blank_disk(&back, DISK_SIZE);
    let (old, target) = live_move(&vm, "vd0", &back, "raw", None, false).await;
    assert_eq!(old.node_name, "fmta-vd0");
    assert_eq!(
        (target.node_name.as_str(), target.file_node_name.as_str()),
        ("fmtb-vd0", "filb-vd0")
    );
    assert_eq!(
        storage::disk_backing(q, "vd0").await.unwrap(),
        DiskBacking {
            node_name: "fmtb-vd0".into(),
            file: back.clone(),
            format: "raw".into(),
        }
    );
    assert!(!has_open(pid, &qcow2));
    assert!(!write_locked("qcow2", &qcow2, DISK_SIZE));
    compare("qcow2", &qcow2, "raw", &back).unwrap();
    assert!(read_at(&back, 28 * MIB, 4096).iter().all(|b| *b == 0xc3));
    // No node of the earlier images is left (G2).
    for node in ["fmt-vd0", "file-vd0", "fmta-vd0", "fila-vd0"] {
        assert_eq!(
            blockjob::node_driver(q, node).await.unwrap(),
            None,
            "{node}"
        );
    }
    assert!(write_locked("raw", &back, DISK_SIZE));
    vm.quit().await;
    eprintln!("move test took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_backup_copies_two_running_disks_as_of_one_instant() {
    let started = Instant::now();
    let scratch = Scratch::new("storage-backup");
    let dir = scratch.path();
    let ids = ["vd0", "vd1"];
    let disks: Vec<PathBuf> = ids.iter().map(|id| dir.join(format!("{id}.raw"))).collect();
    // The expected contents: the same patterns, in files QEMU never opens.
    let originals: Vec<PathBuf> = ids
        .iter()
        .map(|id| dir.join(format!("{id}-orig.raw")))
        .collect();
    for (salt, (disk, original)) in disks.iter().zip(&originals).enumerate() {
        pattern_disk(disk, salt as u32 + 1);
        pattern_disk(original, salt as u32 + 1);
    }
    let vm_disks: Vec<(&str, &Path)> = ids
        .iter()
        .copied()
        .zip(disks.iter().map(PathBuf::as_path))
        .collect();
    let vm = Vm::launch("backup", &spec(&vm_disks), &dir.join("vm"), None, false).await;
    let q = &vm.qmp;

    let mut targets = Vec::new();
    let mut jobs = Vec::new();
    for id in ids {
        let path = dir.join(format!("{id}-backup.qcow2"));
        create_qcow2(&path, DISK_SIZE);
        let target = ImageNode {
            node_name: format!("bk-{id}"),
            file_node_name: format!("bkf-{id}"),
            path,
            format: "qcow2".into(),
        };
        assert_eq!(
            storage::blockdev_add_image(q, &target).await.unwrap(),
            Applied::Done
        );
        jobs.push(BackupJob {
            job_id: format!("backup-{id}"),
            device: storage::disk_backing(q, id).await.unwrap().node_name,
            target: target.node_name.clone(),
            // Slow, so that the guest writes below come while it runs.
            speed: Some(MIB),
        });
        targets.push(target);
    }
    let job_ids: Vec<String> = jobs.iter().map(|j| j.job_id.clone()).collect();

    // The guest overwrites both disks while the backup runs, then the
    // throttle comes off.
    let guest = async {
        let (done, total) = sized_progress(q, &job_ids, 2 * DISK_SIZE).await;
        assert!(done < total, "the backup finished before the guest wrote");
        for id in ids {
            guest_write(&vm, id, 0xee, 0, MIB).await;
            guest_write(&vm, id, 0xee, 12 * MIB, MIB).await;
        }
        for id in &job_ids {
            blockjob::set_speed(q, id, 0).await.unwrap();
        }
    };
    let (result, ()) = tokio::join!(storage::backup(q, &jobs, TIMEOUT), guest);
    result.unwrap();
    assert_eq!(storage::jobs_progress(q, &job_ids).await.unwrap(), (0, 0));

    // Closing the targets flushes them (QEMU does not when a backup ends).
    for target in &targets {
        storage::blockdev_del_image(q, target).await.unwrap();
    }
    for ((disk, original), target) in disks.iter().zip(&originals).zip(&targets) {
        compare("raw", original, "qcow2", &target.path)
            .unwrap_or_else(|e| panic!("{} is not the disk as it was: {e}", target.path.display()));
        assert!(
            compare("raw", disk, "qcow2", &target.path).is_err(),
            "the guest's writes should be on {} but not in its backup",
            disk.display()
        );
    }
    vm.quit().await;
    eprintln!("backup test took {:?}", started.elapsed());
}

#[tokio::test]
async fn node_conflicts_and_bad_input_are_refused_and_leave_nothing_behind() {
    let scratch = Scratch::new("storage-nodes");
    let dir = scratch.path();
    let qemu = BareQemu::launch().await;
    let q = &qemu.qmp;
    let raw = dir.join("a.raw");
    let other_raw = dir.join("b.raw");
    let qcow2 = dir.join("c.qcow2");
    blank_disk(&raw, MIB);
    blank_disk(&other_raw, MIB);
    create_qcow2(&qcow2, MIB);
    let node = |name: &str, file: &str, path: &Path, format: &str| ImageNode {
        node_name: name.into(),
        file_node_name: file.into(),
        path: path.to_owned(),
        format: format.into(),
    };
    let gone = |names: &'static [&'static str]| async move {
        for name in names {
            assert_eq!(
                blockjob::node_driver(q, name).await.unwrap(),
                None,
                "{name}"
            );
        }
    };

    let img0 = node("img0", "img0f", &raw, "raw");
    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(
            storage::blockdev_add_image(q, &img0).await.unwrap(),
            expected
        );
    }

    // The format node's name is taken by a node of another driver: refused,
    // and the new file node is deleted again.
    let err = storage::blockdev_add_image(q, &node("img0", "img1f", &qcow2, "qcow2"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BlockJobError::NodeConflict { node, existing } if node == "img0" && existing.starts_with("raw")),
        "{err}"
    );
    gone(&["img1f"]).await;
    // The file node's name is taken by a format node.
    let err = storage::blockdev_add_image(q, &node("img2", "img0", &other_raw, "raw"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BlockJobError::NodeConflict { node, .. } if node == "img0"),
        "{err}"
    );
    gone(&["img2"]).await;
    // Same names and drivers, another image: not the same nodes.
    let err = storage::blockdev_add_image(q, &node("img0", "img0f", &other_raw, "raw"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BlockJobError::NodeConflict { node, .. } if node == "img0f"),
        "{err}"
    );
    // A raw file opened as qcow2: QEMU's error, and no file node left.
    let err = storage::blockdev_add_image(q, &node("img3", "img3f", &other_raw, "qcow2"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            BlockJobError::Qmp {
                command: "blockdev-add",
                ..
            }
        ),
        "{err}"
    );
    gone(&["img3", "img3f"]).await;
    // A missing file.
    let err = storage::blockdev_add_image(q, &node("img4", "img4f", &dir.join("none.raw"), "raw"))
        .await
        .unwrap_err();
    assert!(matches!(&err, BlockJobError::Qmp { .. }), "{err}");
    gone(&["img4", "img4f"]).await;
    // Refused before QEMU is asked.
    for bad in [
        node("img5", "img5f", &raw, "vmdk"),
        node("img5", "img5f", Path::new("relative.raw"), "raw"),
        node("img5", "img5", &raw, "raw"),
        node(&"n".repeat(32), "img5f", &raw, "raw"),
    ] {
        let err = storage::blockdev_add_image(q, &bad).await.unwrap_err();
        assert!(matches!(err, BlockJobError::Invalid { .. }), "{err}");
    }
    gone(&["img5", "img5f"]).await;

    // Deleting: twice is harmless, and so are nodes that never existed.
    for _ in 0..2 {
        storage::blockdev_del_image(q, &img0).await.unwrap();
    }
    storage::blockdev_del_image(q, &node("never", "neverf", &raw, "raw"))
        .await
        .unwrap();
    gone(&["img0", "img0f"]).await;
    assert!(!write_locked("raw", &raw, MIB));

    // No such disk (a QEMU without devices).
    let err = storage::disk_backing(q, "vd0").await.unwrap_err();
    assert!(
        matches!(err, BlockJobError::Invalid { what: "disk", .. }),
        "{err}"
    );

    // A backup transaction is all or nothing: the second target has the
    // wrong size, so the first job is not started either.
    for (name, len) in [
        ("src0", MIB),
        ("src1", MIB),
        ("dst0", MIB),
        ("dst1", 2 * MIB),
    ] {
        qemu.null_node(name, len).await;
    }
    let backup = |i: usize| BackupJob {
        job_id: format!("bk{i}"),
        device: format!("src{i}"),
        target: format!("dst{i}"),
        speed: None,
    };
    let err = storage::backup(q, &[backup(0), backup(1)], TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            BlockJobError::Qmp {
                command: "transaction",
                ..
            }
        ),
        "{err}"
    );
    assert!(blockjob::query_block_jobs(q).await.unwrap().is_empty());
    let err = storage::backup(q, &[backup(0), backup(0)], TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, BlockJobError::Invalid { .. }), "{err}");
    storage::backup(q, &[backup(0)], TIMEOUT).await.unwrap();

    // Pivots: a missing job, and a job that is not ready (nothing is
    // completed, not even the ready one).
    let missing = ["mirror-none".to_owned()];
    assert!(matches!(
        storage::pivot_mirrors(q, &missing, TIMEOUT).await,
        Err(BlockJobError::NoSuchJob { .. })
    ));
    for (name, len) in [
        ("big", 1024 * MIB),
        ("bigt", 1024 * MIB),
        ("small", MIB),
        ("smallt", MIB),
    ] {
        qemu.null_node(name, len).await;
    }
    let mirror = |id: &str, from: &str, to: &str, speed| MirrorJob {
        job_id: id.into(),
        device: from.into(),
        target: to.into(),
        copy_mode: CopyMode::WriteBlocking,
        speed,
    };
    let slow = mirror("slow", "big", "bigt", Some(MIB));
    let fast = mirror("fast", "small", "smallt", None);
    blockjob::blockdev_mirror(q, &slow).await.unwrap();
    blockjob::blockdev_mirror(q, &fast).await.unwrap();
    blockjob::wait_ready(q, &["fast".to_owned()], TIMEOUT)
        .await
        .unwrap();
    let both = ["fast".to_owned(), "slow".to_owned()];
    let err = storage::pivot_mirrors(q, &both, TIMEOUT).await.unwrap_err();
    assert!(
        matches!(&err, BlockJobError::NotReady { job, .. } if job == "slow"),
        "{err}"
    );
    assert_eq!(blockjob::query_block_jobs(q).await.unwrap().len(), 2);
    let (done, total) = storage::jobs_progress(q, &both).await.unwrap();
    assert!(total >= 1025 * MIB && done < total, "{done} of {total}");
    blockjob::force_cancel(q, "slow", TIMEOUT).await.unwrap();
    storage::pivot_mirrors(q, &["fast".to_owned()], TIMEOUT)
        .await
        .unwrap();
    assert!(blockjob::query_block_jobs(q).await.unwrap().is_empty());
}

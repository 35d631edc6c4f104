//! End-to-end: storage migration and backups ("Storage migration and
//! backups"), through the real `ferry` CLI, with the test guest's disk
//! oracle writing (and flushing) records the whole time.
//!
//! One cluster of two hosts and one booted guest (`demo`, on host1's
//! `local` datastore, raw) run the scenarios in order:
//!
//! 1. Live moves on host1: raw → qcow2 (`local` → `local2`, with `--backup`:
//!    the report names a complete backup), then qcow2 → raw (`local2` →
//!    `local`). Each report says completed and verified; the
//!    guest never stops (same QEMU pid, `running`, flushed records go on
//!    after each move, a G1 watch sees that one QEMU only); the old file is
//!    gone and the new one exists in the right format (qcow2 magic or an
//!    MBR); the qcow2 copy, read after a flush, holds every flushed record;
//!    G2 (nothing but the VM's own files) and G3 hold.
//! 2. A move to a datastore without room (an 8 MiB tmpfs mounted over
//!    host1's empty `local2`) is refused at once with an error naming the
//!    free and needed bytes; the VM keeps its disk and runs on (same pid,
//!    new flushes), nothing is written to the small datastore, and nothing
//!    is left in progress (the controller may keep the refusal as a failed
//!    storage move in `ferry migration list`, naming the missing room).
//! 3. A backup taken while the guest writes: its qcow2 holds every record
//!    flushed before `ferry backup create` started, and not much more (one
//!    instant); restored `--as demo-restored` (new uuid, raw like the
//!    original, `demo-restored-vd0.raw`) its disk verifies too before it
//!    starts (once it boots, its own new boot overwrites the ring from
//!    record 1, so afterwards the disk is checked against its own records),
//!    and it boots and writes; a restore under the original name (the VM exists) and
//!    under `demo-restored` without `--force` are refused and change
//!    nothing; `--force` replaces the stopped copy with the backup's bytes
//!    again; `ferry backup delete` removes the backup's folder.
//! 4. The guest is stopped: every record it flushed since boot (across both
//!    moves, the refusal and the backup) is on the final raw disk. An
//!    offline migration to host2 (`--offline`, a backup by default) leaves
//!    a byte-identical disk (SHA-256) on host2, removes the source's file,
//!    lists the VM on host2 stopped, and the VM boots there.
//!
//! At the end the VM is deleted: G2 finds nothing left (complete backups
//! under `.ferry-backups/` are kept on purpose and not counted), G3 holds.
//! Needs root (the tmpfs), `qemu-img` (qemu-utils), `sha256sum`
//! (coreutils), `mount`/`umount` (util-linux) and the built test guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::{guest_spec, heartbeats, Cluster};
use ferry_test_support::invariants::{check_g1, Allow, G1Watch};
use ferry_test_support::{console, disk_oracle};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(90);
/// The G1 watch's sampling interval (coarser than the default 20 ms: the
/// guest runs under TCG on 2 cores, and the watch only needs to see that
/// no second QEMU of the VM ever appears).
const G1_INTERVAL: Duration = Duration::from_millis(100);
/// The test guest's disk: 128 MiB.
const DISK_BYTES: u64 = 128 << 20;
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

// ---- tools and files -------------------------------------------------------

/// Fails the test with what to install unless `program` runs.
fn require_tool(program: &str, package: &str) {
    let found = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() || !o.stdout.is_empty() || !o.stderr.is_empty());
    assert!(
        found,
        "this test needs `{program}`: install {package} (e.g. `apt-get install {package}`)"
    );
}

/// Runs a command, failing the test with its output unless it succeeds.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program}`: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let out = run("sha256sum", &[path.to_str().expect("UTF-8 path")]);
    out.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sha256sum printed nothing for {}", path.display()))
        .to_string()
}

fn magic(path: &Path) -> [u8; 4] {
    use std::io::Read;
    let mut buf = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .unwrap_or_else(|e| panic!("cannot read the first bytes of {}: {e}", path.display()));
    buf
}

fn assert_qcow2(path: &Path, what: &str) {
    assert!(path.is_file(), "{what}: {} does not exist", path.display());
    let m = magic(path);
    assert_eq!(
        &m,
        QCOW2_MAGIC,
        "{what}: {} should be qcow2 (magic QFI\\xfb) but starts with {m:02x?}",
        path.display()
    );
}

/// A raw copy of the test disk: not qcow2, and its first sector is the MBR.
fn assert_raw(path: &Path, what: &str) {
    use std::os::unix::fs::FileExt;
    assert!(path.is_file(), "{what}: {} does not exist", path.display());
    let m = magic(path);
    assert_ne!(
        &m,
        QCOW2_MAGIC,
        "{what}: {} should be raw but is qcow2",
        path.display()
    );
    let mut signature = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut signature, 510))
        .unwrap_or_else(|e| panic!("{what}: reading {}: {e}", path.display()));
    assert_eq!(
        signature,
        [0x55, 0xaa],
        "{what}: {} should be the raw test disk (an MBR at sector 0)",
        path.display()
    );
    let len = std::fs::metadata(path).unwrap().len();
    assert_eq!(
        len,
        DISK_BYTES,
        "{what}: the raw file {} should be the disk's virtual size",
        path.display()
    );
}

/// `qemu-img convert -U -f qcow2 -O raw` into `dir`; the raw copy's path.
fn qcow2_to_raw(qcow2: &Path, dir: &Path, name: &str) -> PathBuf {
    let raw = dir.join(name);
    let _ = std::fs::remove_file(&raw);
    run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-f",
            "qcow2",
            "-O",
            "raw",
            qcow2.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    raw
}

/// Every entry of a folder (hidden ones too).
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// A tmpfs mounted over a folder, unmounted (lazily) when dropped, also
/// when the test fails.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        let where_ = path.to_str().expect("UTF-8 path");
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                where_,
            ],
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let out = Command::new("umount")
            .args(["-l", self.path.to_str().unwrap_or_default()])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "unmounting the tmpfs on {}: {}",
                self.path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("unmounting the tmpfs on {}: {e}", self.path.display()),
        }
    }
}

// ---- the guest -------------------------------------------------------------

fn last_flushed(cluster: &Cluster, host: &str, vm: &str) -> u64 {
    console::last_disk_flushed(cluster.console_log(host, vm).as_bytes()).unwrap_or(0)
}

fn last_heartbeat(cluster: &Cluster, host: &str, vm: &str) -> u64 {
    heartbeats(&cluster.console_log(host, vm))
        .last()
        .copied()
        .unwrap_or(0)
}

/// Waits until the guest flushed records past `seq` and beat past `beat`:
/// it runs and its disk takes writes.
fn wait_progress(cluster: &Cluster, host: &str, vm: &str, seq: u64, beat: u64, when: &str) {
    cluster.wait_for(
        &format!("{vm} on {host} to flush records past {seq} and beat past {beat} {when}"),
        Duration::from_secs(60),
        || {
            (last_flushed(cluster, host, vm) > seq + 10 && last_heartbeat(cluster, host, vm) > beat)
                .then_some(())
        },
    );
}

fn assert_oracles_quiet(cluster: &Cluster, host: &str, vm: &str) {
    let log = cluster.console_log(host, vm);
    let failures = console::oracle_failures(log.as_bytes());
    assert!(
        failures.is_empty(),
        "{vm}'s probe saw corruption on {host}: {failures:?}"
    );
    let errors = console::probe_errors(log.as_bytes());
    assert!(
        errors.is_empty(),
        "{vm}'s probe reported errors on {host} (e.g. a failed disk write): {errors:?}"
    );
}

/// The VM runs on `host` in the QEMU `pid` it had.
fn assert_same_qemu(cluster: &Cluster, vm: &str, host: &str, pid: u64, when: &str) {
    let info = cluster.vm(vm);
    assert_eq!(
        info["state"], "running",
        "{vm} should still be running {when}: {info}"
    );
    assert_eq!(
        info["host"], host,
        "{vm} should still be on {host} {when}: {info}"
    );
    assert_eq!(
        info["pid"].as_u64(),
        Some(pid),
        "{vm}'s QEMU should be the same process (pid {pid}) {when}: {info}"
    );
}

/// The VM's one disk as `ferry vm show` reports it: (path, spec datastore,
/// spec file, spec format).
fn disk_of(cluster: &Cluster, vm: &str) -> (PathBuf, String, String, String) {
    let info = cluster.vm(vm);
    disk_of_info(&info)
}

fn disk_of_info(info: &Value) -> (PathBuf, String, String, String) {
    let path = info["disks"][0]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("no disk path in {info}"));
    let spec = &info["spec"]["disks"][0];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        PathBuf::from(path),
        text(&spec["source"]["datastore"]),
        text(&spec["source"]["file"]),
        text(&spec["format"]),
    )
}

/// `ferry storage move … --wait -o json`: (exit success, report or null,
/// stderr).
fn storage_move(cluster: &Cluster, args: &[&str]) -> (bool, Value, String) {
    let mut all = vec!["storage", "move"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--wait", "-o", "json"]);
    let run = cluster.ferry(&all);
    let report = serde_json::from_str(&run.stdout).unwrap_or(Value::Null);
    (run.success, report, run.stderr)
}

/// Migrations (live, storage, offline) the controller lists.
fn migration_count(cluster: &Cluster) -> usize {
    cluster
        .ferry_ok(&["migration", "list", "-o", "json"])
        .json()
        .as_array()
        .map_or(0, Vec::len)
}

fn check_g3(cluster: &Cluster, when: &str) {
    if let Err(violation) = cluster.check_g3() {
        panic!("G3 (the controller agrees with what runs) fails {when}: {violation}");
    }
}

fn check_g2(baseline: &ferry_test_support::invariants::Baseline, allow: &Allow, when: &str) {
    let left = baseline.diff_now_allowing(allow);
    assert!(
        left.is_empty(),
        "G2 (no leftovers) fails {when}: {}",
        left.iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

// ---- scenarios -------------------------------------------------------------

/// The format of a disk file, from its name.
fn m_from_format(path: &Path) -> Option<&'static str> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => Some("qcow2"),
        Some("raw") => Some("raw"),
        _ => None,
    }
}

/// Scenario 1: one live move, checked like the issue says; the report.
#[allow(clippy::too_many_arguments)]
fn live_move(
    cluster: &Cluster,
    pid: u64,
    uuid: &str,
    to: &str,
    format: &str,
    from_path: &Path,
    to_path: &Path,
    backup: bool,
) -> Value {
    let seq = last_flushed(cluster, "host1", "demo");
    let beat = last_heartbeat(cluster, "host1", "demo");
    let watch = G1Watch::start(uuid, G1_INTERVAL);
    let started = Instant::now();
    let mut args = vec!["demo", "--disk", "vd0", "--to", to, "--format", format];
    if backup {
        args.push("--backup");
    }
    let (success, report, stderr) = storage_move(cluster, &args);
    let took = started.elapsed();
    assert!(
        success && report["status"] == "completed",
        "the live move of demo to {to} as {format} did not complete (exit success {success}):\n\
         report: {report:#}\nstderr: {stderr}\n{}",
        cluster.logs()
    );
    eprintln!(
        "move to {to} ({format}) took {:.1} s, guest paused {:?} ms, verification {}",
        took.as_secs_f64(),
        report["paused_ms"],
        report["verification"]
    );
    // The guest goes on writing after the move, in the same QEMU.
    wait_progress(
        cluster,
        "host1",
        "demo",
        seq,
        beat,
        &format!("after the move to {to}"),
    );
    let g1 = watch
        .stop()
        .unwrap_or_else(|v| panic!("G1 fails across the move to {to}: {v}"));
    assert!(
        g1.max_running <= 1 && g1.processes.iter().all(|p| u64::from(p.pid) == pid),
        "across the move to {to} the VM should only ever run in its QEMU (pid {pid}): {g1}"
    );
    assert!(
        g1.timeline
            .last()
            .is_some_and(|t| t.running == vec![pid as u32]),
        "after the move to {to} the VM's QEMU (pid {pid}) should be running: {g1}"
    );
    assert_same_qemu(
        cluster,
        "demo",
        "host1",
        pid,
        &format!("after the move to {to}"),
    );

    // The report.
    assert_eq!(
        report["type"], "storage",
        "a storage move's report: {report:#}"
    );
    assert_eq!(report["source"], "host1", "{report:#}");
    assert_eq!(
        report["verified"], true,
        "a live move must be verified: {report:#}"
    );
    assert_eq!(
        report["verification"]["status"], "verified",
        "the verification's status: {report:#}"
    );
    assert!(
        report["verification"]["method"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "the verification names its method: {report:#}"
    );
    assert!(
        report["verification"]["duration_ms"].as_u64().is_some(),
        "the verification's duration: {report:#}"
    );
    assert!(
        report["paused_ms"].as_u64().is_some(),
        "a live move reports how long the guest was paused: {report:#}"
    );
    assert!(
        report["error"].is_null(),
        "a completed move has no error: {report:#}"
    );
    if backup {
        let id = report["backup_id"]
            .as_str()
            .unwrap_or_else(|| panic!("a move with --backup names its backup: {report:#}"));
        let shown = cluster
            .ferry_ok(&["backup", "show", id, "-o", "json"])
            .json();
        assert_eq!(
            (
                shown["vm"].as_str(),
                shown["disks"][0]["source_format"].as_str()
            ),
            (Some("demo"), m_from_format(from_path)),
            "the backup taken before the move to {to}: {shown:#}"
        );
        let folder = PathBuf::from(from_path.parent().unwrap())
            .join(".ferry-backups")
            .join(id);
        assert!(
            folder.join("backup.json").is_file(),
            "the backup taken before the move to {to} should be complete in {}",
            folder.display()
        );
    } else {
        assert!(
            report["backup_id"].is_null(),
            "a move without --backup takes none: {report:#}"
        );
    }
    let moves = report["disk_moves"]
        .as_array()
        .unwrap_or_else(|| panic!("no disk_moves in the report: {report:#}"));
    assert_eq!(moves.len(), 1, "one disk moved: {report:#}");
    let m = &moves[0];
    let expect = |key: &str, value: Value| {
        assert_eq!(
            m[key], value,
            "disk_moves[0].{key} of the move to {to}: {report:#}"
        );
    };
    expect("disk_id", "vd0".into());
    expect("from_path", from_path.to_str().unwrap().into());
    expect("to_datastore", to.into());
    expect("to_path", to_path.to_str().unwrap().into());
    expect("to_format", format.into());
    expect("virtual_size_bytes", DISK_BYTES.into());
    expect("verified", true.into());

    // The files: the old one gone, the new one in its format.
    assert!(
        !from_path.exists(),
        "the move to {to} should delete the old file {}",
        from_path.display()
    );
    match format {
        "qcow2" => assert_qcow2(to_path, &format!("after the move to {to}")),
        _ => assert_raw(to_path, &format!("after the move to {to}")),
    }
    // The VM's definition points to the new file.
    let (path, datastore, file, spec_format) = disk_of(cluster, "demo");
    assert_eq!(
        (path.as_path(), datastore.as_str(), spec_format.as_str()),
        (to_path, to, format),
        "`ferry vm show demo` should name the new file, datastore and format after the move to {to}"
    );
    assert_eq!(
        Some(file.as_str()),
        to_path.file_name().and_then(|n| n.to_str()),
        "the spec's file after the move to {to}"
    );
    assert_oracles_quiet(cluster, "host1", "demo");
    report
}

fn scenario_live_moves(
    cluster: &Cluster,
    baseline: &ferry_test_support::invariants::Baseline,
    scratch: &Path,
) {
    let started = Instant::now();
    let uuid = cluster.vm_uuid("demo");
    let pid = cluster.vm("demo")["pid"].as_u64().expect("demo's pid");
    let local = cluster.datastore("host1", "local");
    let local2 = cluster.datastore("host1", "local2");
    let raw = local.join("demo.raw");
    let qcow2 = local2.join("demo.qcow2");
    assert_raw(&raw, "before the moves");

    let report = live_move(cluster, pid, &uuid, "local2", "qcow2", &raw, &qcow2, true);
    let m = &report["disk_moves"][0];
    assert_eq!(
        (m["from_datastore"].as_str(), m["from_format"].as_str()),
        (Some("local"), Some("raw")),
        "where the disk was: {report:#}"
    );
    // The qcow2 copy, read after a flush, holds every record flushed so far.
    let seq = last_flushed(cluster, "host1", "demo");
    let copy = qcow2_to_raw(&qcow2, scratch, "demo-qcow2.raw");
    let summary = disk_oracle::verify_test_disk(&copy, seq).unwrap_or_else(|e| {
        panic!(
            "the disk oracle fails on the qcow2 disk after the move to local2 \
             (records up to {seq}): {e}"
        )
    });
    assert_eq!(
        summary.verified.as_ref().map(|r| *r.start()),
        Some(1),
        "every record since boot should be checked on the qcow2 disk: {summary:?}"
    );
    std::fs::remove_file(&copy).ok();
    check_g2(
        baseline,
        &Allow::new().vm(&uuid),
        "after the move to local2 (only the VM's own files may exist)",
    );
    check_g3(cluster, "after the move to local2");

    let report = live_move(cluster, pid, &uuid, "local", "raw", &qcow2, &raw, false);
    let m = &report["disk_moves"][0];
    assert_eq!(
        (m["from_datastore"].as_str(), m["from_format"].as_str()),
        (Some("local2"), Some("qcow2")),
        "where the disk was: {report:#}"
    );
    assert!(
        entries(&local2).is_empty(),
        "local2 should be empty once the disk moved back: {:?}",
        entries(&local2)
    );
    check_g2(
        baseline,
        &Allow::new().vm(&uuid),
        "after the move back to local (only the VM's own files may exist)",
    );
    check_g3(cluster, "after the move back to local");
    // One boot throughout: the heartbeat never restarted.
    ferry_test_support::heartbeat::HeartbeatReport::from_log(
        cluster.console_log("host1", "demo").as_bytes(),
    )
    .check_no_reset()
    .unwrap_or_else(|e| panic!("demo's heartbeat restarted across the moves: {e}"));
    eprintln!(
        "scenario 1 (live moves) took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn scenario_no_room(cluster: &Cluster, baseline: &ferry_test_support::invariants::Baseline) {
    let started = Instant::now();
    let uuid = cluster.vm_uuid("demo");
    let pid = cluster.vm("demo")["pid"].as_u64().expect("demo's pid");
    let local2 = cluster.datastore("host1", "local2");
    let raw = cluster.datastore("host1", "local").join("demo.raw");
    assert!(
        entries(&local2).is_empty(),
        "host1's local2 should be empty before the tmpfs goes over it: {:?}",
        entries(&local2)
    );
    let tmpfs = Tmpfs::mount(&local2, "8m");
    let mounts =
        std::fs::read_to_string(format!("/proc/{}/mountinfo", cluster.ferryd_pid("host1")))
            .expect("host1's ferryd's mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(&format!(" {} ", local2.display())) && l.contains("tmpfs")),
        "host1's ferryd should see the 8 MiB tmpfs over {}:\n{mounts}",
        local2.display()
    );
    let migrations = migration_count(cluster);
    let seq = last_flushed(cluster, "host1", "demo");
    let beat = last_heartbeat(cluster, "host1", "demo");

    let began = Instant::now();
    let (success, report, stderr) = storage_move(
        cluster,
        &[
            "demo", "--disk", "vd0", "--to", "local2", "--format", "qcow2",
        ],
    );
    let took = began.elapsed();
    assert!(
        !success,
        "a move to an 8 MiB datastore must fail:\nreport: {report:#}\nstderr: {stderr}"
    );
    assert!(
        report.is_null(),
        "a move without room must be refused before it starts (no report), got: {report:#}"
    );
    assert!(
        stderr.contains("free") && stderr.contains("needed"),
        "the refusal should say how much is free and how much is needed: {stderr}"
    );
    assert!(
        took < Duration::from_secs(15),
        "the refusal should come at once, it took {took:?}"
    );
    eprintln!("refused in {took:?}: {}", stderr.trim());

    // Nothing changed: same disk, same QEMU, the guest writes on.
    wait_progress(
        cluster,
        "host1",
        "demo",
        seq,
        beat,
        "after the refused move",
    );
    assert_same_qemu(cluster, "demo", "host1", pid, "after the refused move");
    let (path, datastore, _, format) = disk_of(cluster, "demo");
    assert_eq!(
        (path.as_path(), datastore.as_str(), format.as_str()),
        (raw.as_path(), "local", "raw"),
        "after the refused move demo should keep its disk"
    );
    assert_raw(&raw, "after the refused move");
    assert!(
        entries(&local2).is_empty(),
        "nothing should be written to the small datastore: {:?}",
        entries(&local2)
    );
    // A refused move is refused before anything is recorded: the history
    // is what it was.
    let listed = cluster
        .ferry_ok(&["migration", "list", "-o", "json"])
        .json();
    let all = listed.as_array().expect("a list of migrations");
    assert_eq!(
        all.len(),
        migrations,
        "a refused move records nothing: {listed:#}"
    );
    assert_oracles_quiet(cluster, "host1", "demo");
    check_g1(&uuid).unwrap_or_else(|v| panic!("G1 fails after the refused move: {v}"));
    check_g2(baseline, &Allow::new().vm(&uuid), "after the refused move");
    check_g3(cluster, "after the refused move");
    drop(tmpfs);
    eprintln!(
        "scenario 2 (no room) took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn scenario_backup(
    cluster: &Cluster,
    baseline: &ferry_test_support::invariants::Baseline,
    scratch: &Path,
) {
    let started = Instant::now();
    let uuid = cluster.vm_uuid("demo");
    let pid = cluster.vm("demo")["pid"].as_u64().expect("demo's pid");
    let local = cluster.datastore("host1", "local");

    // Every record flushed before the command starts must be in the backup.
    let before = last_flushed(cluster, "host1", "demo");
    let backup = cluster
        .ferry_ok(&["backup", "create", "demo", "-o", "json"])
        .json();
    let after = last_flushed(cluster, "host1", "demo");
    eprintln!("backup taken between records {before} and {after}: {backup:#}");
    let id = backup["id"]
        .as_str()
        .unwrap_or_else(|| panic!("the backup has no id: {backup:#}"))
        .to_string();
    assert_eq!(backup["vm"], "demo", "{backup:#}");
    assert_eq!(backup["vm_uuid"], uuid.as_str(), "{backup:#}");
    assert_eq!(backup["host"], "host1", "{backup:#}");
    assert_eq!(
        backup["datastore"], "local",
        "by default the backup goes to the first disk's datastore: {backup:#}"
    );
    assert_eq!(
        backup["vm_state"], "running",
        "the backup was taken of a running VM: {backup:#}"
    );
    let disks = backup["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("no disks in the backup: {backup:#}"));
    assert_eq!(disks.len(), 1, "{backup:#}");
    assert_eq!(disks[0]["disk_id"], "vd0", "{backup:#}");
    assert_eq!(disks[0]["format"], "qcow2", "{backup:#}");
    assert_eq!(disks[0]["source_format"], "raw", "{backup:#}");
    assert_eq!(disks[0]["virtual_size_bytes"], DISK_BYTES, "{backup:#}");
    let folder = local.join(".ferry-backups").join(&id);
    let file = folder.join(disks[0]["file"].as_str().expect("the backup disk's file"));
    assert_qcow2(&file, "the backup's disk");
    assert!(
        folder.join("backup.json").is_file(),
        "the backup's manifest {} should exist",
        folder.join("backup.json").display()
    );
    // The guest kept running through it.
    assert_same_qemu(cluster, "demo", "host1", pid, "after the backup");
    wait_progress(
        cluster,
        "host1",
        "demo",
        after,
        last_heartbeat(cluster, "host1", "demo"),
        "after the backup",
    );
    let listed = cluster
        .ferry_ok(&["backup", "list", "demo", "-o", "json"])
        .json();
    assert!(
        listed
            .as_array()
            .is_some_and(|a| a.iter().any(|b| b["id"] == id.as_str())),
        "`ferry backup list demo` should list {id}: {listed:#}"
    );
    let shown = cluster
        .ferry_ok(&["backup", "show", &id, "-o", "json"])
        .json();
    assert_eq!(
        shown["id"],
        id.as_str(),
        "`ferry backup show {id}`: {shown:#}"
    );

    // The backup is one point in time, after every record flushed before it
    // was asked for, and not much later than it ended.
    let copy = qcow2_to_raw(&file, scratch, "backup.raw");
    let summary = disk_oracle::verify_test_disk(&copy, before).unwrap_or_else(|e| {
        panic!(
            "the disk oracle fails on the backup (records flushed before it, up to {before}): {e}"
        )
    });
    eprintln!("backup: {summary:?}");
    assert!(
        summary.last_on_disk <= after + 50,
        "the backup should hold the disk of one instant during `ferry backup create`, but it \
         holds records up to {} while only {after} were flushed when the command returned",
        summary.last_on_disk
    );
    let boot_id = summary.boot_id;
    std::fs::remove_file(&copy).ok();

    // Restored as a copy next to the original.
    let restored = cluster
        .ferry_ok(&[
            "backup",
            "restore",
            &id,
            "--as",
            "demo-restored",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(restored["name"], "demo-restored", "{restored:#}");
    assert_eq!(restored["host"], "host1", "{restored:#}");
    assert_eq!(
        restored["state"], "stopped",
        "a restore defines the VM stopped: {restored:#}"
    );
    assert_ne!(
        restored["uuid"],
        uuid.as_str(),
        "a restore --as gets a new uuid: {restored:#}"
    );
    let (restored_disk, _, restored_file, restored_format) = disk_of_info(&restored);
    assert_eq!(
        restored_file, "demo-restored-vd0.raw",
        "a restore --as names its disk files NAME-<disk>.<ext>: {restored:#}"
    );
    assert_eq!(
        restored_format, "raw",
        "a restored disk gets its original format: {restored:#}"
    );
    assert_raw(&restored_disk, "the restored disk");
    disk_oracle::verify_test_disk(&restored_disk, before).unwrap_or_else(|e| {
        panic!("the disk oracle fails on the restored disk (records up to {before}): {e}")
    });
    let restored_uuid = restored["uuid"].as_str().unwrap().to_string();

    // It boots and writes.
    cluster.ferry_ok(&["vm", "start", "demo-restored"]);
    cluster.wait_heartbeat("host1", "demo-restored");
    cluster.wait_for("demo-restored to flush disk records", BOOT, || {
        (last_flushed(cluster, "host1", "demo-restored") >= 10).then_some(())
    });
    assert_oracles_quiet(cluster, "host1", "demo-restored");
    check_g3(cluster, "with demo-restored running");
    let stopped = cluster
        .ferry_ok(&["vm", "stop", "demo-restored", "-o", "json"])
        .json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let own = last_flushed(cluster, "host1", "demo-restored");
    disk_oracle::verify_test_disk(&restored_disk, own).unwrap_or_else(|e| {
        panic!("the disk oracle fails on demo-restored's disk after it ran (its records up to {own}): {e}")
    });

    // Restoring over an existing VM without --force changes nothing.
    let vms_before = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
    let stderr = cluster.ferry_err(&["backup", "restore", &id]);
    assert!(
        stderr.contains("demo") && (stderr.contains("exist") || stderr.contains("force")),
        "restoring under the name of an existing VM should be refused with a clear error: {stderr}"
    );
    assert_same_qemu(cluster, "demo", "host1", pid, "after the refused restore");
    assert_eq!(
        cluster.vm_uuid("demo"),
        uuid,
        "the refused restore should leave demo alone"
    );
    let stderr = cluster.ferry_err(&["backup", "restore", &id, "--as", "demo-restored"]);
    assert!(
        stderr.contains("demo-restored"),
        "restoring over the stopped demo-restored without --force should be refused: {stderr}"
    );
    let vms_after = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
    let summary = |vms: &Value| -> Vec<(String, String, String)> {
        let mut v: Vec<_> = vms
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| {
                (
                    vm["name"].as_str().unwrap_or_default().to_string(),
                    vm["uuid"].as_str().unwrap_or_default().to_string(),
                    vm["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        summary(&vms_before),
        summary(&vms_after),
        "refused restores should change no VM"
    );
    disk_oracle::verify_test_disk(&restored_disk, own)
        .unwrap_or_else(|e| panic!("a refused restore should not touch demo-restored's disk: {e}"));

    // With --force the stopped copy is replaced by the backup again.
    let replaced = cluster
        .ferry_ok(&[
            "backup",
            "restore",
            &id,
            "--as",
            "demo-restored",
            "--force",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(replaced["name"], "demo-restored", "{replaced:#}");
    assert_eq!(replaced["state"], "stopped", "{replaced:#}");
    let (replaced_disk, ..) = disk_of_info(&replaced);
    let again = disk_oracle::verify_test_disk(&replaced_disk, before).unwrap_or_else(|e| {
        panic!(
            "after restore --force the disk should hold the backup's records (up to {before}) \
             again, not what demo-restored wrote since: {e}"
        )
    });
    assert_eq!(
        again.boot_id, boot_id,
        "after restore --force the disk should be the backup's (demo's boot), not demo-restored's"
    );
    eprintln!(
        "restored uuid {restored_uuid}, replaced by {}",
        replaced["uuid"]
    );
    let listed = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
    let count = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|vm| vm["name"] == "demo-restored")
        .count();
    assert_eq!(count, 1, "one demo-restored after --force: {listed:#}");

    // The copy goes; its disk with it.
    cluster.ferry_ok(&["vm", "delete", "demo-restored"]);
    assert!(
        !replaced_disk.exists(),
        "deleting demo-restored should delete its disk {}",
        replaced_disk.display()
    );

    // On another host: restored on the backup's host, then moved there by
    // an offline migration; nothing of it stays on host1.
    let far = cluster
        .ferry_ok(&[
            "backup", "restore", &id, "--as", "demo-far", "--host", "host2", "-o", "json",
        ])
        .json();
    assert_eq!(far["name"], "demo-far", "{far:#}");
    assert_eq!(
        far["host"], "host2",
        "restore --host host2 defines it there: {far:#}"
    );
    assert_eq!(far["state"], "stopped", "{far:#}");
    let (far_disk, ..) = disk_of_info(&far);
    assert!(
        far_disk.starts_with(cluster.host_dir("host2")),
        "its disk is on host2: {}",
        far_disk.display()
    );
    disk_oracle::verify_test_disk(&far_disk, before).unwrap_or_else(|e| {
        panic!("the disk restored on host2 should hold the backup's records up to {before}: {e}")
    });
    let on_host1 = cluster.datastore("host1", "local").join("demo-far-vd0.raw");
    assert!(
        !on_host1.exists()
            && !cluster
                .host_dir("host1")
                .join("state/vms/demo-far")
                .exists(),
        "nothing of demo-far stays on host1 ({})",
        on_host1.display()
    );
    cluster.ferry_ok(&["vm", "delete", "demo-far"]);

    // Deleting the backup removes its folder.
    cluster.ferry_ok(&["backup", "delete", &id]);
    assert!(
        !folder.exists(),
        "`ferry backup delete {id}` should remove {}",
        folder.display()
    );
    let listed = cluster.ferry_ok(&["backup", "list", "-o", "json"]).json();
    assert!(
        listed
            .as_array()
            .is_some_and(|a| a.iter().all(|b| b["id"] != id.as_str())),
        "a deleted backup should not be listed: {listed:#}"
    );
    assert_same_qemu(
        cluster,
        "demo",
        "host1",
        pid,
        "at the end of the backup scenario",
    );
    assert_oracles_quiet(cluster, "host1", "demo");
    check_g2(
        baseline,
        &Allow::new().vm(&uuid),
        "after the backup scenario",
    );
    check_g3(cluster, "after the backup scenario");
    eprintln!(
        "scenario 3 (backup and restore) took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn scenario_offline(cluster: &Cluster) {
    let started = Instant::now();
    let source = cluster.datastore("host1", "local").join("demo.raw");
    let destination = cluster.datastore("host2", "local").join("demo.raw");
    let digest = sha256(&source);
    let allocated = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
    };
    let source_allocated = allocated(&source);
    let uuid = cluster.vm_uuid("demo");

    let dry = cluster
        .ferry(&[
            "migrate",
            "demo",
            "--to",
            "host2",
            "--offline",
            "--dry-run",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(
        dry["ok"], true,
        "the offline migration's dry run should pass: {dry:#}"
    );
    assert!(
        !destination.exists(),
        "a dry run should copy nothing to host2"
    );

    let report = cluster.migrate_ok("demo", "host2", &["--offline"]);
    eprintln!(
        "offline migration took {:.1} s: {report:#}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(report["type"], "offline", "{report:#}");
    assert_eq!(report["verified"], true, "{report:#}");
    assert_eq!(report["source"], "host1", "{report:#}");
    assert_eq!(report["destination"], "host2", "{report:#}");
    let backup_id = report["backup_id"]
        .as_str()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| panic!("an offline migration takes a backup by default: {report:#}"))
        .to_string();
    let listed = cluster.ferry_ok(&["backup", "list", "-o", "json"]).json();
    assert!(
        listed
            .as_array()
            .is_some_and(|a| a.iter().any(|b| b["id"] == backup_id.as_str())),
        "the offline migration's backup {backup_id} should be listed: {listed:#}"
    );

    assert!(
        destination.is_file(),
        "the disk should be on host2 at {}",
        destination.display()
    );
    assert_eq!(
        sha256(&destination),
        digest,
        "the disk on host2 should be byte-identical to the source's"
    );
    eprintln!(
        "allocated bytes: {source_allocated} on host1 before, {} on host2 after",
        allocated(&destination)
    );
    assert!(
        !source.exists(),
        "the source's disk file {} should be deleted",
        source.display()
    );
    let vm = cluster.vm("demo");
    assert_eq!(vm["host"], "host2", "demo should be on host2: {vm}");
    assert_eq!(
        vm["state"], "stopped",
        "demo should be stopped on host2: {vm}"
    );
    assert_eq!(
        vm["uuid"],
        uuid.as_str(),
        "an offline migration keeps the VM's uuid: {vm}"
    );
    let (path, datastore, _, format) = disk_of_info(&vm);
    assert_eq!(
        (path.as_path(), datastore.as_str(), format.as_str()),
        (destination.as_path(), "local", "raw"),
        "demo's disk on host2"
    );
    let listed = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "exactly one VM after the offline migration: {listed:#}"
    );
    assert!(
        !cluster.host_dir("host1").join("state/vms/demo").exists(),
        "host1 should hold no VM folder of demo any more"
    );
    check_g3(cluster, "after the offline migration");

    cluster.ferry_ok(&["vm", "start", "demo"]);
    cluster.wait_heartbeat("host2", "demo");
    cluster.wait_for("demo to flush records on host2", BOOT, || {
        (last_flushed(cluster, "host2", "demo") >= 5).then_some(())
    });
    assert_oracles_quiet(cluster, "host2", "demo");
    check_g1(&uuid).unwrap_or_else(|v| panic!("G1 fails with demo started on host2: {v}"));
    check_g3(cluster, "with demo running on host2");
    eprintln!(
        "scenario 4 (offline migration) took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn storage_moves_backups_and_offline_migration_keep_every_record() {
    let test_started = Instant::now();
    require_tool("qemu-img", "qemu-utils");
    require_tool("sha256sum", "coreutils");
    require_tool("mount", "mount (util-linux)");
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a tmpfs over a datastore: run it as root"
    );
    let scratch = tempfile::Builder::new()
        .prefix("ferry-storage-")
        .tempdir()
        .expect("a scratch folder");
    let cluster = Cluster::up(2);
    let baseline = cluster.g2_baseline();

    let spec = cluster.write_spec("demo.toml", &guest_spec("demo", "local"));
    cluster.ferry_ok(&[
        "vm",
        "create",
        "-f",
        spec.to_str().unwrap(),
        "--host",
        "host1",
        "--start",
    ]);
    cluster.wait_for("demo to flush disk records", BOOT, || {
        (last_flushed(&cluster, "host1", "demo") >= 20).then_some(())
    });
    let uuid = cluster.vm_uuid("demo");
    check_g1(&uuid).unwrap_or_else(|v| panic!("G1 fails with demo started: {v}"));
    check_g3(&cluster, "with demo started");
    eprintln!(
        "cluster up and demo writing after {:.1} s",
        test_started.elapsed().as_secs_f64()
    );

    scenario_live_moves(&cluster, &baseline, scratch.path());
    scenario_no_room(&cluster, &baseline);
    scenario_backup(&cluster, &baseline, scratch.path());

    // Every record demo flushed since it booted (across both moves, the
    // refused one and the backup) is on its final disk.
    let stopped = cluster
        .ferry_ok(&["vm", "stop", "demo", "-o", "json"])
        .json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let last = last_flushed(&cluster, "host1", "demo");
    let disk = cluster.datastore("host1", "local").join("demo.raw");
    let summary = disk_oracle::verify_test_disk(&disk, last).unwrap_or_else(|e| {
        panic!("the disk oracle fails on demo's final disk (records up to {last}): {e}")
    });
    assert_eq!(
        summary.verified.as_ref().map(|r| *r.start()),
        Some(1),
        "every record since boot should be checked on the final disk: {summary:?}"
    );
    eprintln!("demo's final disk holds records 1..={last}: {summary:?}");

    scenario_offline(&cluster);

    // Gone, the VM leaves nothing but complete backups.
    cluster.ferry_ok(&["vm", "stop", "demo", "--force"]);
    cluster.ferry_ok(&["vm", "delete", "demo"]);
    check_g2(&baseline, &Allow::new(), "once demo is deleted");
    check_g3(&cluster, "once demo is deleted");
    cluster.down_purge();
    eprintln!(
        "storage test took {:.1} s",
        test_started.elapsed().as_secs_f64()
    );
}

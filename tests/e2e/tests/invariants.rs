//! End-to-end: the invariant checkers (`ferry_test_support::invariants`) can fail, and a
//! normal live migration passes them.
//!
//! - G1 fails when a second QEMU carrying the VM's uuid runs (started by hand, in
//!   another namespace than the VM's host), both in a point check and in a watch; G2
//!   reports that QEMU, a stray partial disk in a datastore and a stray tap in a host's
//!   namespace; G3 reports the QEMU that runs where the controller does not place it.
//! - A live migration with copied storage, watched by G1 every 20 ms, never shows two
//!   running QEMUs; G3 holds before and after; G2 finds nothing once the VM is deleted.
//!
//! Needs root (a namespace cluster, taps) and the built test guest. Real QEMU only.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::{guest_spec, heartbeats, Cluster};
use ferry_test_support::invariants::{
    check_g1, Allow, Disagreement, FileKind, G1Watch, Leftover, Violation, DEFAULT_INTERVAL,
    VCPU_STARTUP_GRACE,
};
use ferry_test_support::netns::Rig;

const BOOT: Duration = Duration::from_secs(90);

fn create_running(cluster: &Cluster, name: &str, host: &str) {
    let spec = cluster.write_spec(&format!("{name}.toml"), &guest_spec(name, "local"));
    cluster.ferry_ok(&[
        "vm",
        "create",
        "-f",
        spec.to_str().unwrap(),
        "--host",
        host,
        "--start",
    ]);
    cluster.wait_heartbeat(host, name);
}

fn last_heartbeat(cluster: &Cluster, host: &str, vm: &str) -> u64 {
    heartbeats(&cluster.console_log(host, vm))
        .last()
        .copied()
        .unwrap_or(0)
}

fn delete(cluster: &Cluster, vm: &str) {
    cluster.ferry_ok(&["vm", "stop", vm, "--force"]);
    cluster.ferry_ok(&["vm", "delete", vm]);
}

/// A QEMU started by hand with a VM's uuid, outside Ferry: its own (empty) machine,
/// running, its QMP monitor free. Killed when dropped.
struct Impostor {
    child: Child,
}

impl Impostor {
    fn start(dir: &Path, uuid: &str) -> Impostor {
        std::fs::create_dir_all(dir).expect("impostor folder");
        let qmp = dir.join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-name",
                "guest=impostor,debug-threads=on",
                "-uuid",
                uuid,
                "-nodefaults",
                "-display",
                "none",
                "-accel",
                "tcg",
                "-m",
                "64M",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a second QEMU");
        let mut impostor = Impostor { child };
        let started = Instant::now();
        while !qmp.exists() {
            if let Ok(Some(status)) = impostor.child.try_wait() {
                panic!("the second QEMU exited at once ({status})");
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the second QEMU made no QMP socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The checkers leave a QEMU in its start-up grace alone (its monitor does not
        // serve yet, its vCPU threads are still setting up).
        std::thread::sleep(
            (VCPU_STARTUP_GRACE + Duration::from_millis(300)).saturating_sub(started.elapsed()),
        );
        impostor
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A persistent tap made by hand in a namespace; deleted when dropped.
struct StrayTap {
    netns: String,
    name: String,
}

impl StrayTap {
    fn create(netns: &str, name: &str) -> StrayTap {
        let status = Command::new("ip")
            .args(["-n", netns, "tuntap", "add", "dev", name, "mode", "tap"])
            .status()
            .expect("ip runs");
        assert!(status.success(), "ip tuntap add {name} in {netns}");
        StrayTap {
            netns: netns.to_string(),
            name: name.to_string(),
        }
    }
}

impl Drop for StrayTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.netns, "link", "del", "dev", &self.name])
            .status();
    }
}

#[test]
fn the_checkers_fail_on_a_second_qemu_a_stray_disk_and_a_stray_tap() {
    let started = Instant::now();
    let cluster = Cluster::up_netns(1);
    let rig = Rig::open(cluster.dir()).unwrap_or_else(|e| panic!("{e}"));
    let host_netns = rig.host("host1").unwrap().netns.clone();
    let baseline = cluster.g2_baseline();
    create_running(&cluster, "twin", "host1");
    let uuid = cluster.vm_uuid("twin");
    let vm_pid = cluster.vm("twin")["pid"].as_u64().expect("pid") as u32;
    let keep_vm = Allow::new().vm(&uuid);

    // One VM, one QEMU: every checker passes.
    let one = check_g1(&uuid).unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(one.running_pids(), vec![vm_pid], "{one}");
    assert_eq!(one.qemus[0].process.netns.name, host_netns, "{one}");
    cluster.check_g3().unwrap_or_else(|v| panic!("{v}"));
    baseline.assert_clean_allowing(&keep_vm);

    // (a) A second QEMU with the VM's uuid, running in the root namespace.
    let impostor = Impostor::start(&cluster.dir().join("impostor"), &uuid);
    let violation = check_g1(&uuid).expect_err("G1 must see two running QEMUs");
    eprintln!("{violation}");
    match &violation {
        Violation::TwoRunning { sample, .. } => {
            let mut running = sample.running_pids();
            running.sort();
            let mut expected = vec![vm_pid, impostor.pid()];
            expected.sort();
            assert_eq!(running, expected, "{violation}");
        }
        other => panic!("expected TwoRunning, got {other}"),
    }
    let watch = G1Watch::start(&uuid, DEFAULT_INTERVAL);
    std::thread::sleep(Duration::from_millis(300));
    let watched = watch.stop().expect_err("the G1 watch must fail too");
    assert!(matches!(watched, Violation::TwoRunning { .. }), "{watched}");

    let left = baseline.diff_now_allowing(&keep_vm);
    assert!(
        left.iter()
            .any(|l| matches!(l, Leftover::Process { pid, .. } if *pid == impostor.pid())),
        "G2 must report the second QEMU: {left:#?}"
    );
    match cluster.check_g3() {
        Err(Violation::Disagreements(found)) => {
            eprintln!("G3: {found:#?}");
            assert!(
                found.iter().any(|d| matches!(
                    d,
                    Disagreement::QemuOnWrongHost { pid, .. } if *pid == impostor.pid()
                )),
                "G3 must report the QEMU the controller does not place: {found:#?}"
            );
        }
        other => panic!("G3 must fail with the second QEMU running: {other:?}"),
    }
    drop(impostor);
    let after = check_g1(&uuid).unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(after.running_pids(), vec![vm_pid], "{after}");

    // (b) A partial disk left in a datastore and a tap left in the host's namespace.
    let stray = cluster.datastore("host1", "local").join("twin.raw.partial");
    std::fs::write(&stray, vec![0u8; 4096]).expect("stray file");
    let tap = StrayTap::create(&host_netns, "fystray0");
    let left = baseline.diff_now_allowing(&keep_vm);
    for leftover in &left {
        eprintln!("G2 leftover: {leftover}");
    }
    assert!(
        left.iter().any(|l| matches!(
            l,
            Leftover::File { path, kind: FileKind::PartialFile, bytes: 4096 } if *path == stray
        )),
        "G2 must report {}: {left:#?}",
        stray.display()
    );
    assert!(
        left.iter().any(|l| matches!(
            l,
            Leftover::Link { netns, name, kind, .. }
                if *netns == host_netns && name == "fystray0" && kind == "tap"
        )),
        "G2 must report the tap in {host_netns}: {left:#?}"
    );
    std::fs::remove_file(&stray).expect("remove the stray file");
    drop(tap);
    baseline.assert_clean_allowing(&keep_vm);

    // Deleted, the VM leaves nothing, and the controller agrees.
    delete(&cluster, "twin");
    baseline.assert_clean();
    cluster.check_g3().unwrap_or_else(|v| panic!("{v}"));
    cluster.down_purge();
    eprintln!(
        "failure proofs took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_live_migration_keeps_g1_g2_and_g3() {
    let started = Instant::now();
    let cluster = Cluster::up(2);
    let baseline = cluster.g2_baseline();
    create_running(&cluster, "hopper", "host1");
    let uuid = cluster.vm_uuid("hopper");
    let source_pid = cluster.vm("hopper")["pid"].as_u64().expect("pid") as u32;
    cluster.check_g3().unwrap_or_else(|v| panic!("{v}"));

    let watch = G1Watch::start(&uuid, DEFAULT_INTERVAL);
    let report = cluster.migrate_ok("hopper", "host2", &["--storage", "copy"]);
    // Keep watching while the guest runs on at the destination.
    let seen = last_heartbeat(&cluster, "host2", "hopper");
    cluster.wait_for("heartbeats on host2", BOOT, || {
        (last_heartbeat(&cluster, "host2", "hopper") > seen + 20).then_some(())
    });
    let g1 = watch.stop().unwrap_or_else(|v| panic!("{v}"));
    eprintln!("{g1}");
    eprintln!(
        "controller: paused_ms {:?}, downtime_ms {:?}; watch: longest pause {:?}",
        report["paused_ms"],
        report["downtime_ms"],
        g1.longest_pause()
    );

    let vm = cluster.vm("hopper");
    assert_eq!(vm["host"], "host2", "{vm}");
    let destination_pid = vm["pid"].as_u64().expect("pid") as u32;
    assert!(g1.samples >= 20, "{g1}");
    assert_eq!(g1.max_running, 1, "{g1}");
    let pids: Vec<u32> = g1.processes.iter().map(|p| p.pid).collect();
    assert!(
        pids.contains(&source_pid) && pids.contains(&destination_pid),
        "the watch saw both QEMUs: {g1}"
    );
    let first = g1.timeline.first().expect("a timeline");
    let last = g1.timeline.last().expect("a timeline");
    assert_eq!(last.running, vec![destination_pid], "{g1}");
    assert!(
        g1.timeline.iter().any(|t| t.running == vec![source_pid]),
        "the source ran first: {g1} (first {first:?})"
    );

    let now = check_g1(&uuid).unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(now.running_pids(), vec![destination_pid], "{now}");
    let g3 = cluster.check_g3().unwrap_or_else(|v| panic!("{v}"));
    assert_eq!((g3.vms, g3.migrations, g3.qemus.len()), (1, 1, 1), "{g3:?}");

    // What the migration left next to the running VM (reported, not judged: the
    // VM's folder still exists).
    for leftover in baseline.diff_now_allowing(&Allow::new().vm(&uuid)) {
        eprintln!("with the VM on host2, G2 sees: {leftover}");
    }

    delete(&cluster, "hopper");
    baseline.assert_clean();
    cluster.check_g3().unwrap_or_else(|v| panic!("{v}"));
    cluster.down_purge();
    eprintln!(
        "migration test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

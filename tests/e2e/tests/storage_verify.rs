//! End-to-end: a storage move whose copy does not match its source is rolled
//! back — the guest keeps running on its old disk, the copy is removed —
//! and a cancelled move leaves nothing either.
//!
//! The mismatch is injected by the agent's `storage.corrupt_copy` failpoint
//! (armed through ferryd's FAILPOINTS): it overwrites the start of the copy
//! right before the comparison at the switchover, with the guest paused. The
//! comparison itself is the real one. (Writing into the copy from outside
//! while the mirror runs does not work: the mirror zeroes the whole target
//! as it goes.)

use std::path::Path;
use std::time::Duration;

use ferry_e2e::{guest_spec, Cluster};
use ferry_test_support::{console, disk_oracle};

const BOOT: Duration = Duration::from_secs(90);
fn last_flushed(cluster: &Cluster, vm: &str) -> u64 {
    console::last_disk_flushed(cluster.console_log("host1", vm).as_bytes()).unwrap_or(0)
}

fn move_report(cluster: &Cluster, id: &str) -> serde_json::Value {
    cluster.wait_for("the storage move to end", Duration::from_secs(120), || {
        let report = cluster
            .ferry_ok(&["migration", "show", id, "-o", "json"])
            .json();
        (!matches!(report["status"].as_str(), Some("running" | "pending"))).then_some(report)
    })
}

fn assert_still_on(cluster: &Cluster, vm: &str, pid: u64, disk: &Path) {
    let info = cluster.vm(vm);
    assert_eq!(info["state"], "running", "the VM kept running: {info:#}");
    assert_eq!(info["pid"].as_u64(), Some(pid), "same QEMU: {info:#}");
    assert_eq!(
        info["disks"][0]["path"].as_str(),
        Some(disk.to_str().unwrap()),
        "the VM still uses its old disk: {info:#}"
    );
}

#[test]
fn a_copy_that_differs_is_rolled_back_and_a_cancel_leaves_nothing() {
    let cluster = Cluster::up(1);
    let spec = cluster.write_spec("sv.toml", &guest_spec("sv", "local"));
    cluster.ferry_ok(&[
        "vm",
        "create",
        "-f",
        spec.to_str().unwrap(),
        "--host",
        "host1",
        "--start",
    ]);
    cluster.wait_for("disk records", BOOT, || {
        (last_flushed(&cluster, "sv") >= 20).then_some(())
    });
    let pid = cluster.vm("sv")["pid"].as_u64().expect("pid");
    let source = cluster.datastore("host1", "local").join("sv.raw");
    let target = cluster.datastore("host1", "local2").join("sv.raw");

    // 1. A spoilt copy: refused at the switchover, rolled back. (The
    //    guest keeps running across the agent's restart.)
    cluster.restart_ferryd_env("host1", &[("FAILPOINTS", "storage.corrupt_copy=return")]);
    let started = cluster
        .ferry_ok(&[
            "storage", "move", "sv", "--disk", "vd0", "--to", "local2", "-o", "json",
        ])
        .json();
    let id = started["id"].as_str().expect("move id").to_string();
    assert_eq!(started["type"], "storage", "{started:#}");
    let report = move_report(&cluster, &id);
    assert_eq!(
        report["status"], "failed",
        "a differing copy fails the move: {report:#}"
    );
    assert_eq!(report["verified"], false, "{report:#}");
    assert_eq!(report["verification"]["status"], "failed", "{report:#}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("verification failed") && error.contains("keeps its old disks"),
        "the error says what happened: {error}"
    );
    assert!(
        !target.exists(),
        "the bad copy is removed: {}",
        target.display()
    );
    assert!(source.exists(), "the source is kept");
    assert_still_on(&cluster, "sv", pid, &source);
    let before = last_flushed(&cluster, "sv");
    cluster.wait_for(
        "new disk records after the rollback",
        Duration::from_secs(30),
        || (last_flushed(&cluster, "sv") > before + 2).then_some(()),
    );

    cluster.restart_ferryd_env("host1", &[]);

    // 2. A cancel before the switchover: nothing left, nothing changed.
    let started = cluster
        .ferry_ok(&[
            "storage",
            "move",
            "sv",
            "--disk",
            "vd0",
            "--to",
            "local2",
            "--format",
            "qcow2",
            "--bandwidth",
            "1MiB/s",
            "-o",
            "json",
        ])
        .json();
    let id = started["id"].as_str().expect("move id").to_string();
    let qcow2_target = cluster.datastore("host1", "local2").join("sv.qcow2");
    cluster.wait_for("the target file", Duration::from_secs(10), || {
        qcow2_target.exists().then_some(())
    });
    let cancelled = cluster
        .ferry_ok(&["migration", "cancel", &id, "-o", "json"])
        .json();
    assert_eq!(cancelled["status"], "cancelled", "{cancelled:#}");
    assert!(!qcow2_target.exists(), "a cancelled move leaves no copy");
    assert_still_on(&cluster, "sv", pid, &source);

    // 3. The disk is whole: every flushed record is on it.
    cluster.ferry_ok(&["vm", "stop", "sv", "--force"]);
    let flushed = last_flushed(&cluster, "sv");
    let summary = disk_oracle::verify_test_disk(&source, flushed)
        .unwrap_or_else(|e| panic!("disk oracle after the rolled-back moves: {e}"));
    assert!(
        summary
            .verified
            .as_ref()
            .is_some_and(|r| *r.end() >= flushed),
        "every flushed record up to {flushed} verified: {summary:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(cluster.datastore("host1", "local2"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        leftovers.is_empty(),
        "nothing left in local2: {leftovers:?}"
    );
}

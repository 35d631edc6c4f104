//! End-to-end: the agent's half of a migration survives a SIGKILL of ferryd
//! and a new ferryd on the same state folder, with real QEMU and the test
//! guest.
//!
//! - The destination's ferryd (host2) is killed while a copy-storage
//!   migration host1 → host2 moves memory, then started again.
//! - The source's ferryd (host1, which is also the controller) is killed
//!   the same way, then started again: its controller settles the migration
//!   it left in flight.
//! - After a completed migration, the destination's ferryd is killed and
//!   started again: the VM runs on, in the same QEMU, and stays known.
//!
//! Whatever the outcome of an interrupted migration (completed, or failed
//! and rolled back), the VM runs exactly once, on host2 if it completed and
//! on host1 otherwise, its heartbeat goes on, and the other host holds
//! nothing of it: no VM record, no disk, no QEMU.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_e2e::{guest_spec, heartbeats, Cluster};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(90);
/// How long an interrupted migration may take to settle (the controller
/// may wait for a restarted host and retry).
const SETTLE: Duration = Duration::from_secs(240);

fn create_running(cluster: &Cluster, name: &str) {
    let spec = cluster.write_spec(&format!("{name}.toml"), &guest_spec(name, "local"));
    cluster.ferry_ok(&[
        "vm",
        "create",
        "-f",
        spec.to_str().unwrap(),
        "--host",
        "host1",
        "--start",
    ]);
    cluster.wait_heartbeat("host1", name);
}

fn last_heartbeat(cluster: &Cluster, host: &str, vm: &str) -> u64 {
    heartbeats(&cluster.console_log(host, vm))
        .last()
        .copied()
        .unwrap_or(0)
}

/// Starts a slow copy-storage migration to host2 and returns its id.
fn start_slow_migration(cluster: &Cluster, vm: &str) -> String {
    let started = cluster
        .ferry_ok(&[
            "migrate",
            vm,
            "--to",
            "host2",
            "--storage",
            "copy",
            // The agents' restarts are under test, not the backup taken
            // first by default (storage.rs tests that).
            "--no-backup",
            "--bandwidth",
            "8MiB/s",
            "-o",
            "json",
        ])
        .json();
    started["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no migration id in {started}"))
        .to_string()
}

/// `ferry migration show ID -o json`, or `None` while the controller does
/// not answer.
fn migration(cluster: &Cluster, id: &str) -> Option<Value> {
    let run = cluster.ferry(&["migration", "show", id, "-o", "json"]);
    run.success.then(|| run.json())
}

/// Waits until the migration is in one of `phases` (of `mirror`, the disk
/// copy, and `memory`, the RAM copy), failing if it ended first.
fn wait_phase(cluster: &Cluster, id: &str, phases: &[&str]) -> Value {
    cluster.wait_for(
        &format!("the migration to reach {phases:?}"),
        Duration::from_secs(60),
        || {
            let report = migration(cluster, id)?;
            assert_eq!(
                report["status"], "running",
                "the migration ended before it could be interrupted: {report:#}"
            );
            phases
                .contains(&report["phase"].as_str().unwrap_or(""))
                .then_some(report)
        },
    )
}

/// SIGKILL of a host's ferryd; returns once the process is gone.
fn sigkill_ferryd(cluster: &Cluster, host: &str) {
    let pid = cluster.ferryd_pid(host);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL ferryd");
    cluster.wait_for(
        &format!("{host}'s ferryd to die"),
        Duration::from_secs(20),
        || (!alive(pid as u32)).then_some(()),
    );
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Waits until the migration is no longer active and returns its report.
fn wait_settled(cluster: &Cluster, id: &str) -> Value {
    let started = Instant::now();
    let mut last = None;
    loop {
        if let Some(report) = migration(cluster, id) {
            if !matches!(report["status"].as_str(), Some("running" | "pending")) {
                return report;
            }
            last = Some(report);
        }
        if started.elapsed() > SETTLE {
            panic!(
                "the migration was still active after {SETTLE:?} (the controller never settled \
                 it): {last:#?}\n{}",
                cluster.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The command lines of the QEMUs on this machine that carry `uuid`.
fn qemus_of(uuid: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("qemu-system") && cmdline.contains(uuid) && alive(pid) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// The VM runs exactly once, on `host`, with its heartbeat going on, and
/// `other` holds nothing of it.
fn assert_runs_only_on(cluster: &Cluster, vm: &str, uuid: &str, host: &str, other: &str) {
    let listed = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
    let entries: Vec<&Value> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter(|v| v["name"] == vm)
        .collect();
    assert_eq!(entries.len(), 1, "{vm} is listed once: {listed:#}");
    assert_eq!(entries[0]["host"], host, "{listed:#}");
    assert_eq!(entries[0]["state"], "running", "{listed:#}");

    let host_dir = cluster.host_dir(host);
    let qemus = qemus_of(uuid);
    assert_eq!(
        qemus.len(),
        1,
        "exactly one QEMU carries {vm}'s uuid: {qemus:#?}"
    );
    assert!(
        qemus[0].1.contains(&*host_dir.to_string_lossy()),
        "{vm}'s QEMU is {host}'s: {qemus:#?}"
    );
    assert_eq!(
        entries[0]["pid"].as_u64(),
        Some(u64::from(qemus[0].0)),
        "{listed:#}"
    );

    let seq = last_heartbeat(cluster, host, vm);
    cluster.wait_for(&format!("heartbeats of {vm} on {host}"), BOOT, || {
        (last_heartbeat(cluster, host, vm) > seq + 5).then_some(())
    });

    assert_nothing_on(cluster, vm, uuid, other);
}

fn assert_nothing_on(cluster: &Cluster, vm: &str, uuid: &str, host: &str) {
    let record = cluster.host_dir(host).join("state/vms").join(vm);
    assert!(
        !record.exists(),
        "no VM record of {vm} is left on {host}: {}",
        record.display()
    );
    let datastore = cluster.datastore(host, "local");
    let files: Vec<_> = std::fs::read_dir(&datastore)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(files.is_empty(), "no disk is left on {host}: {files:?}");
    let host_dir = cluster.host_dir(host);
    let strays: Vec<_> = qemus_of(uuid)
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(&*host_dir.to_string_lossy()))
        .collect();
    assert!(
        strays.is_empty(),
        "no QEMU of {vm} is left on {host}: {strays:#?}"
    );
    let shown = cluster
        .ferry_ok(&["host", "show", host, "-o", "json"])
        .json();
    assert_eq!(shown["vm_count"], 0, "{host} has no VM: {shown:#}");
}

fn uuid_of(cluster: &Cluster, vm: &str) -> String {
    let info = cluster.vm(vm);
    info["uuid"]
        .as_str()
        .unwrap_or_else(|| panic!("no uuid in {info}"))
        .to_string()
}

/// Where the VM must run after `report`: host2 if the migration
/// completed, host1 if it failed or was cancelled (rolled back).
fn owner_after(report: &Value) -> (&'static str, &'static str) {
    match report["status"].as_str() {
        Some("completed") => ("host2", "host1"),
        Some("failed" | "cancelled") => ("host1", "host2"),
        other => panic!("unexpected migration status {other:?}: {report:#}"),
    }
}

#[test]
fn the_destination_ferryd_killed_mid_migration_leaves_one_vm_and_nothing_behind() {
    let cluster = Cluster::up(2);
    create_running(&cluster, "arrow");
    let uuid = uuid_of(&cluster, "arrow");
    let id = start_slow_migration(&cluster, "arrow");
    // RAM streams into the receiving QEMU while no agent watches it.
    let seen = wait_phase(&cluster, &id, &["memory"]);
    eprintln!("killing host2's ferryd in phase {}", seen["phase"]);

    sigkill_ferryd(&cluster, "host2");
    cluster.restart_ferryd_with("host2", "");

    let report = wait_settled(&cluster, &id);
    eprintln!(
        "the migration ended {} ({})",
        report["status"], report["error"]
    );
    let (owner, other) = owner_after(&report);
    assert_runs_only_on(&cluster, "arrow", &uuid, owner, other);
}

#[test]
fn the_source_ferryd_killed_mid_migration_leaves_one_vm_and_nothing_behind() {
    let cluster = Cluster::up(2);
    create_running(&cluster, "bolt");
    let uuid = uuid_of(&cluster, "bolt");
    let id = start_slow_migration(&cluster, "bolt");
    let seen = wait_phase(&cluster, &id, &["mirror", "memory"]);
    eprintln!("killing host1's ferryd in phase {}", seen["phase"]);

    // host1 is the source and the controller: the saga dies with it.
    sigkill_ferryd(&cluster, "host1");
    cluster.restart_ferryd_with("host1", "");

    let report = wait_settled(&cluster, &id);
    eprintln!(
        "the migration ended {} ({})",
        report["status"], report["error"]
    );
    let (owner, other) = owner_after(&report);
    assert_runs_only_on(&cluster, "bolt", &uuid, owner, other);
}

#[test]
fn the_destination_ferryd_killed_after_a_migration_finds_the_vm_running() {
    let cluster = Cluster::up(2);
    create_running(&cluster, "dart");
    let uuid = uuid_of(&cluster, "dart");
    // No backup first: the source's datastore is checked empty below.
    cluster.migrate_ok("dart", "host2", &["--storage", "copy", "--no-backup"]);
    let before = cluster.vm("dart");
    assert_eq!(before["host"], "host2", "{before}");
    let pid = before["pid"].as_u64().expect("pid");

    sigkill_ferryd(&cluster, "host2");
    cluster.restart_ferryd_with("host2", "");

    let after = cluster.vm("dart");
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["pid"].as_u64(), Some(pid), "same QEMU: {after}");
    assert!(after["state_reason"].is_null(), "{after}");
    let record: Value = serde_json::from_slice(
        &std::fs::read(cluster.host_dir("host2").join("state/vms/dart/vm.json"))
            .expect("host2's record of dart"),
    )
    .expect("a JSON record");
    assert!(record["incoming"].is_null(), "finished: {record:#}");
    assert_eq!(record["should_run"], true, "{record:#}");
    assert_runs_only_on(&cluster, "dart", &uuid, "host2", "host1");
    // The VM is host2's in every way: it stops and starts there.
    let stopped = cluster
        .ferry_ok(&["vm", "stop", "dart", "-o", "json"])
        .json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(Path::new(&cluster.datastore("host2", "local").join("dart.raw")).exists());
}

//! End-to-end: live migration through the controller, with real QEMU and
//! the test guest, proven by the oracles — heartbeat, memory, disk — and by
//! the STOP/RESUME order.

use std::time::Duration;

use ferry_e2e::{guest_spec, guest_spec_with, heartbeats, Cluster};
use ferry_test_support::guest::ProbeConfig;
use ferry_test_support::{console, disk_oracle, memory_oracle};

const BOOT: Duration = Duration::from_secs(90);

fn create_running(cluster: &Cluster, spec_toml: &str, host: &str, name: &str) {
    let spec = cluster.write_spec(&format!("{name}.toml"), spec_toml);
    cluster.ferry_ok(&[
        "vm",
        "create",
        "-f",
        spec.to_str().unwrap(),
        "--host",
        host,
        "--start",
    ]);
    cluster.wait_for("disk records and a memory pass", BOOT, || {
        let log = cluster.console_log(host, name);
        (console::last_disk_flushed(log.as_bytes()).unwrap_or(0) >= 20
            && console::last_mem_pass(log.as_bytes()).is_some())
        .then_some(())
    });
}

/// A guest on host1 that dirties its working set as fast as it can: more
/// than a slow link carries.
fn create_busy(cluster: &Cluster, name: &str) {
    let busy = ProbeConfig {
        mem_mib: 48,
        mem_rate: 0,
        ..ProbeConfig::default()
    };
    create_running(
        cluster,
        &guest_spec_with(name, "local", &busy),
        "host1",
        name,
    );
}

fn last_heartbeat(cluster: &Cluster, host: &str, vm: &str) -> u64 {
    heartbeats(&cluster.console_log(host, vm))
        .last()
        .copied()
        .unwrap_or(0)
}

/// The guest never ran in two places: the source's STOP came before the
/// destination's RESUME (the controller measures `paused_ms` between them).
fn assert_single_owner(report: &serde_json::Value) {
    let paused = report["paused_ms"].as_u64();
    assert!(
        paused.is_some(),
        "the report has the STOP→RESUME interval: {report:#}"
    );
    assert!(report["downtime_ms"].as_u64().is_some(), "{report:#}");
}

/// Memory (paused, from the running QEMU) and console oracles of a VM.
fn assert_memory_clean(cluster: &Cluster, host: &str, vm: &str) {
    let info = cluster.vm(vm);
    assert_eq!(info["host"], host, "{info}");
    assert_eq!(info["state"], "running", "{info}");
    let pid = info["pid"].as_u64().expect("pid") as u32;
    let probe = ProbeConfig::default();
    cluster.ferry_ok(&["vm", "pause", vm]);
    let dump = memory_oracle::read_guest_memory(pid, probe.mem_base(), probe.mem_len() as usize)
        .expect("read guest memory");
    memory_oracle::verify_dump(&dump, probe.mem_pages())
        .unwrap_or_else(|e| panic!("memory oracle on {host}: {e}"));
    cluster.ferry_ok(&["vm", "resume", vm]);
    let log = cluster.console_log(host, vm);
    let failures = console::oracle_failures(log.as_bytes());
    assert!(
        failures.is_empty(),
        "the probe saw corruption: {failures:?}"
    );
}

/// Stops the VM and verifies every flushed disk record in its disk file.
fn assert_disk_clean(cluster: &Cluster, host: &str, vm: &str, disk: &std::path::Path) {
    let stopped = cluster.ferry_ok(&["vm", "stop", vm, "-o", "json"]).json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let last = console::last_disk_flushed(cluster.console_log(host, vm).as_bytes())
        .expect("flushed records on the destination");
    disk_oracle::verify_test_disk(disk, last)
        .unwrap_or_else(|e| panic!("disk oracle on {host} ({}): {e}", disk.display()));
}

#[test]
fn copied_storage_migration_moves_the_disk_and_keeps_every_oracle_clean() {
    let cluster = Cluster::up(2);
    create_running(&cluster, &guest_spec("mover", "local"), "host1", "mover");
    let before = last_heartbeat(&cluster, "host1", "mover");

    let report = cluster.migrate_ok("mover", "host2", &["--storage", "copy"]);

    assert_eq!(report["source"], "host1");
    assert_eq!(report["destination"], "host2");
    assert_eq!(report["strategy"]["storage"], "copy");
    assert_eq!(report["strategy"]["tls"], true);
    assert_eq!(report["accel"], "tcg");
    assert!(report["disk_bytes"].as_u64() > Some(0), "{report:#}");
    assert!(
        report["transferred_bytes"].as_u64() > report["disk_bytes"].as_u64(),
        "{report:#}"
    );
    assert_single_owner(&report);
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    for phase in [
        "backup",
        "prepare_destination",
        "mirror",
        "memory",
        "switchover",
        "commit",
    ] {
        assert!(phases.contains(&phase), "phase {phase} in {phases:?}");
    }
    // Disks leaving their host: a backup first, by default, named in the
    // report and kept on the source; the copy compared at the switchover.
    let backup = report["backup_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a copied migration takes a backup first: {report:#}"));
    let listed = cluster
        .ferry_ok(&["backup", "show", backup, "-o", "json"])
        .json();
    assert_eq!(listed["host"], "host1", "{listed:#}");
    assert_eq!(listed["vm"], "mover", "{listed:#}");
    assert_eq!(report["verified"], true, "{report:#}");
    assert_eq!(report["verification"]["status"], "verified", "{report:#}");

    // The heartbeat continues on the destination without a reset.
    cluster.wait_for("heartbeats on host2", BOOT, || {
        (last_heartbeat(&cluster, "host2", "mover") > before + 50).then_some(())
    });
    let after = heartbeats(&cluster.console_log("host2", "mover"));
    assert!(
        after[0] > before,
        "the sequence continued ({} after {before})",
        after[0]
    );
    ferry_test_support::heartbeat::HeartbeatReport::analyze(&after)
        .check_no_reset()
        .unwrap_or_else(|e| panic!("{e}"));

    assert_memory_clean(&cluster, "host2", "mover");
    assert!(
        !cluster
            .datastore("host1", "local")
            .join("mover.raw")
            .exists(),
        "the source's copy is removed after the commit"
    );
    let disk = cluster.datastore("host2", "local").join("mover.raw");
    assert_disk_clean(&cluster, "host2", "mover", &disk);
    let listed = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "exactly one VM: {listed}"
    );
}

#[test]
fn shared_storage_migration_moves_only_memory() {
    let cluster = Cluster::up(2);
    create_running(&cluster, &guest_spec("sharer", "shared"), "host1", "sharer");
    let disk = cluster.dir().join("shared").join("sharer.raw");
    assert!(disk.exists());

    let report = cluster.migrate_ok("sharer", "host2", &[]);

    assert_eq!(
        report["strategy"]["storage"], "shared",
        "auto picks shared: {report:#}"
    );
    assert_eq!(report["disk_bytes"], 0, "{report:#}");
    assert!(
        report["backup_id"].is_null(),
        "no backup by default when the disks stay where they are: {report:#}"
    );
    assert_single_owner(&report);
    assert!(disk.exists(), "a shared disk stays where it is");
    cluster.wait_for("heartbeats on host2", BOOT, || {
        (last_heartbeat(&cluster, "host2", "sharer") > 0).then_some(())
    });
    assert_memory_clean(&cluster, "host2", "sharer");
    assert_disk_clean(&cluster, "host2", "sharer", &disk);
}

#[test]
fn three_round_trips_with_the_workload_running_keep_the_oracles_clean() {
    let cluster = Cluster::up(2);
    create_running(
        &cluster,
        &guest_spec("tripper", "local"),
        "host1",
        "tripper",
    );
    let mut last = last_heartbeat(&cluster, "host1", "tripper");
    for (to, from) in [("host2", "host1"), ("host1", "host2"), ("host2", "host1")] {
        let report = cluster.migrate_ok("tripper", to, &[]);
        assert_eq!(report["source"], from);
        assert_single_owner(&report);
        cluster.wait_for(&format!("heartbeats on {to}"), BOOT, || {
            (last_heartbeat(&cluster, to, "tripper") > last).then_some(())
        });
        let seen = heartbeats(&cluster.console_log(to, "tripper"));
        let first_here = *seen.iter().find(|s| **s > 0).expect("heartbeats");
        assert!(
            first_here > last,
            "no reset on {to}: {first_here} after {last}"
        );
        last = *seen.last().unwrap();
    }
    assert_memory_clean(&cluster, "host2", "tripper");
    let disk = cluster.datastore("host2", "local").join("tripper.raw");
    assert_disk_clean(&cluster, "host2", "tripper", &disk);
}

#[test]
fn a_dirty_rate_above_the_link_ends_at_the_deadline_with_the_source_running() {
    let cluster = Cluster::up(2);
    create_busy(&cluster, "busy");

    let (success, report) = cluster.migrate(
        "busy",
        "host2",
        &[
            "--bandwidth",
            "4MiB/s",
            "--postcopy",
            "never",
            "--deadline",
            "6s",
        ],
    );

    assert!(!success, "a migration that did not complete exits non-zero");
    assert_eq!(report["status"], "cancelled", "{report:#}");
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("deadline")),
        "{report:#}"
    );
    let vm = cluster.vm("busy");
    assert_eq!(vm["host"], "host1", "{vm}");
    assert_eq!(vm["state"], "running", "the source runs on: {vm}");
    let seq = last_heartbeat(&cluster, "host1", "busy");
    cluster.wait_for("heartbeats after the cancel", BOOT, || {
        (last_heartbeat(&cluster, "host1", "busy") > seq).then_some(())
    });
    let on_host2 = cluster
        .ferry_ok(&["host", "show", "host2", "-o", "json"])
        .json();
    assert_eq!(
        on_host2["vm_count"], 0,
        "the destination holds nothing: {on_host2}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(cluster.datastore("host2", "local"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "no disk left on host2: {leftovers:?}");
    assert!(
        !cluster.host_dir("host2").join("state/vms/busy").exists(),
        "no VM folder left on host2"
    );
}

#[test]
fn impossible_migrations_are_refused_before_anything_moves() {
    let cluster = Cluster::up(2);
    create_running(&cluster, &guest_spec("stay", "local"), "host1", "stay");

    let refusals: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["migrate", "nosuch", "--to", "host2"],
            "no VM named \"nosuch\"",
        ),
        (
            vec!["migrate", "stay", "--to", "host9"],
            "unknown host \"host9\"",
        ),
        (
            vec!["migrate", "stay", "--to", "host1"],
            "destination_differs",
        ),
    ];
    for (args, expected) in &refusals {
        let stderr = cluster.ferry_err(args);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }

    // A destination without enough memory, then one without the CPU model.
    cluster.restart_ferryd_with("host2", "reserve_memory = \"1TiB\"");
    let stderr = cluster.ferry_err(&["migrate", "stay", "--to", "host2"]);
    assert!(stderr.contains("destination_memory"), "{stderr}");
    let dry = cluster
        .ferry(&[
            "migrate",
            "stay",
            "--to",
            "host2",
            "--dry-run",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(dry["ok"], false, "{dry}");

    cluster.restart_ferryd_with("host2", "cpu_models = [\"max\"]");
    let config = std::fs::read_to_string(cluster.host_dir("host2").join("ferryd.toml")).unwrap();
    std::fs::write(
        cluster.host_dir("host2").join("ferryd.toml"),
        config.replace("reserve_memory = \"1TiB\"\n", ""),
    )
    .unwrap();
    cluster.restart_ferryd_with("host2", "");
    let stderr = cluster.ferry_err(&["migrate", "stay", "--to", "host2"]);
    assert!(stderr.contains("cpu_model"), "{stderr}");
    assert!(
        !stderr.contains("destination_memory"),
        "only the CPU model fails now: {stderr}"
    );

    // A stopped VM points to offline migration.
    cluster.ferry_ok(&["vm", "stop", "stay", "--force"]);
    let stderr = cluster.ferry_err(&["migrate", "stay", "--to", "host2"]);
    assert!(stderr.contains("offline"), "{stderr}");

    // Nothing moved and nothing was started.
    let vm = cluster.vm("stay");
    assert_eq!(vm["host"], "host1", "{vm}");
    let on_host2 = cluster
        .ferry_ok(&["host", "show", "host2", "-o", "json"])
        .json();
    assert_eq!(on_host2["vm_count"], 0, "{on_host2}");
    let migrations = cluster
        .ferry_ok(&["migration", "list", "-o", "json"])
        .json();
    assert_eq!(
        migrations.as_array().map(|a| a.len()),
        Some(0),
        "no migration was recorded: {migrations}"
    );
}

#[test]
fn cancelling_during_the_ram_copy_keeps_the_source_running_and_cleans_the_destination() {
    let cluster = Cluster::up(2);
    create_busy(&cluster, "cancelme");
    let started = cluster
        .ferry_ok(&[
            "migrate",
            "cancelme",
            "--to",
            "host2",
            "--bandwidth",
            "4MiB/s",
            "-o",
            "json",
        ])
        .json();
    let id = started["id"].as_str().expect("migration id").to_string();
    cluster.wait_for("the RAM copy to run", Duration::from_secs(60), || {
        let report = cluster
            .ferry_ok(&["migration", "show", &id, "-o", "json"])
            .json();
        (report["phase"] == "memory").then_some(())
    });

    let report = cluster
        .ferry_ok(&["migration", "cancel", &id, "-o", "json"])
        .json();

    assert_eq!(report["status"], "cancelled", "{report:#}");
    let vm = cluster.vm("cancelme");
    assert_eq!(vm["host"], "host1", "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");
    let on_host2 = cluster
        .ferry_ok(&["host", "show", "host2", "-o", "json"])
        .json();
    assert_eq!(on_host2["vm_count"], 0, "{on_host2}");
    assert!(
        std::fs::read_dir(cluster.datastore("host2", "local"))
            .unwrap()
            .next()
            .is_none(),
        "no disk left on host2"
    );
    // The VM can migrate again afterwards: the cancelled one no longer holds it.
    let dry = cluster
        .ferry(&[
            "migrate",
            "cancelme",
            "--to",
            "host2",
            "--dry-run",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(dry["ok"], true, "{dry}");
}

//! End-to-end: the migration saga under injected faults, at every persisted
//! boundary (issue 4; Omicron's saga test helpers are the model).
//!
//! Three hosts: host1 runs only the controller, the VM ping-pongs between
//! host2 and host3 with its disk copied each time. For every boundary
//! `STEP.before` / `STEP.after` of the saga (see
//! `ferry_controller::failpoints`), host1's ferryd is restarted with that
//! failpoint armed (ferryd is built with the `failpoints` feature by the
//! workspace build) and one migration runs:
//!
//! - `fail`: the step fails there. Before the commit the saga unwinds and
//!   the VM keeps running on its source; after it, the step is retried and
//!   the migration completes.
//! - `crash`: ferryd kills itself with SIGKILL there; restarted, its
//!   recovery settles the migration (rolled back before the commit, rolled
//!   forward after it).
//! - `twice`: the step's action runs a second time; the migration completes.
//!
//! After every run: the migration is terminal with the expected status, the
//! VM runs exactly once (G1, by its QEMUs' vCPU activity) on the expected
//! host, its heartbeat goes on from where it was (the guest was never
//! restarted), the controller agrees with what runs (G3), and the other
//! host holds nothing of it (no VM record, no disk, no QEMU).
//!
//! One test function: the booted guest is shared by every run.

use std::time::Duration;

use ferry_e2e::{guest_spec, heartbeats, Cluster};
use ferry_test_support::invariants::check_g1;
use serde_json::Value;

/// Every persisted boundary, in saga order, and whether it lies past the
/// commit (the point of no return).
const BOUNDARIES: &[(&str, bool)] = &[
    ("prepare_destination.before", false),
    ("prepare_destination.after", false),
    ("start_outgoing.before", false),
    ("start_outgoing.after", false),
    ("converge.after", false),
    ("switchover.before", false),
    ("switchover.after", false),
    ("commit.before", false),
    ("commit.after", true),
    ("finish_destination.before", true),
    ("finish_destination.after", true),
    ("retire_source.before", true),
    ("retire_source.after", true),
];

const VM: &str = "saga";

fn host_of(cluster: &Cluster) -> String {
    cluster.vm(VM)["host"].as_str().expect("host").to_string()
}

fn last_heartbeat(cluster: &Cluster, host: &str) -> u64 {
    heartbeats(&cluster.console_log(host, VM))
        .last()
        .copied()
        .unwrap_or(0)
}

/// Waits until the migration is no longer pending or running.
fn wait_terminal(cluster: &Cluster, id: &str) -> Value {
    cluster.wait_for(
        &format!("migration {id} to end"),
        Duration::from_secs(240),
        || {
            let report = cluster
                .ferry(&["migration", "show", id, "-o", "json"])
                .stdout;
            let report: Value = serde_json::from_str(&report).ok()?;
            (!matches!(report["status"].as_str(), Some("pending" | "running"))).then_some(report)
        },
    )
}

/// Nothing of the VM on `host`: no record, no disk, no QEMU folder.
fn assert_nothing_on(cluster: &Cluster, host: &str, context: &str) {
    let record = cluster.host_dir(host).join("state/vms").join(VM);
    let disk = cluster.datastore(host, "local").join(format!("{VM}.raw"));
    cluster.wait_for(
        &format!("{host} to hold nothing of {VM} ({context})"),
        Duration::from_secs(30),
        || (!record.exists() && !disk.exists()).then_some(()),
    );
}

#[test]
fn the_saga_ends_safely_when_each_boundary_fails_crashes_or_repeats() {
    let cluster = Cluster::up(3);
    let spec = cluster.write_spec("saga.toml", &guest_spec(VM, "local"));
    cluster.ferry_ok(&[
        "vm",
        "create",
        "-f",
        spec.to_str().expect("UTF-8"),
        "--host",
        "host2",
        "--start",
    ]);
    cluster.wait_heartbeat("host2", VM);
    let uuid = cluster.vm_uuid(VM);

    let mut tally: Vec<String> = Vec::new();
    let mut injected = 0;
    for mode in ["fail", "crash", "twice"] {
        for &(point, past_commit) in BOUNDARIES {
            // Only steps with an action can run twice (converge only
            // watches).
            if mode == "twice" && (!point.ends_with(".after") || point == "converge.after") {
                continue;
            }
            injected += 1;
            let context = format!("{point}={mode}");
            let from = host_of(&cluster);
            let to = if from == "host2" { "host3" } else { "host2" };
            let heartbeat_before = last_heartbeat(&cluster, &from);
            cluster.restart_ferryd_env(
                "host1",
                &[("FAILPOINTS", &format!("{point}=return({mode})"))],
            );
            // No backup first (on by default for copied storage): the
            // saga's own steps are under test, and 30-odd backups would
            // only cost time and room.
            let started = cluster.ferry(&["migrate", VM, "--to", to, "--no-backup", "-o", "json"]);
            assert!(
                started.success,
                "{context}: the migration was not started: {}\n{}",
                started.stderr,
                cluster.logs()
            );
            let id = started.json()["id"]
                .as_str()
                .expect("a migration id")
                .to_string();
            if mode == "crash" {
                cluster.wait_for(
                    &format!("ferryd to crash at {point}"),
                    Duration::from_secs(180),
                    || cluster.ferryd_exited("host1").then_some(()),
                );
                // Started again, disarmed: its recovery takes over.
                cluster.restart_ferryd_env("host1", &[]);
            }
            let report = wait_terminal(&cluster, &id);
            let error = report["error"].as_str().unwrap_or_default().to_string();
            match mode {
                // The injected failure is what ended it, not something else.
                "fail" if !past_commit => assert!(
                    error.contains(&format!("failpoint {point}")),
                    "{context}: {report:#}"
                ),
                "crash" => assert!(
                    error.contains("the controller restarted"),
                    "{context}: the recovery settled it: {report:#}"
                ),
                _ => {}
            }

            let completes = past_commit || mode == "twice";
            let expected_status = if completes { "completed" } else { "failed" };
            assert_eq!(
                report["status"],
                expected_status,
                "{context}: {report:#}\n{}",
                cluster.logs()
            );
            let expected_host = if completes { to } else { from.as_str() };
            let other = if completes { from.as_str() } else { to };
            assert_eq!(host_of(&cluster), expected_host, "{context}: {report:#}");
            assert_eq!(cluster.vm(VM)["state"], "running", "{context}");

            // G1: one QEMU runs the guest.
            let g1 = check_g1(&uuid).unwrap_or_else(|v| panic!("{context}: G1: {v}"));
            assert_eq!(
                g1.running(),
                1,
                "{context}: G1 wants exactly one running QEMU: {g1:?}"
            );
            // The guest was never restarted: its heartbeat goes on.
            cluster.wait_for(
                &format!("{VM}'s heartbeat past {heartbeat_before} on {expected_host} ({context})"),
                Duration::from_secs(30),
                || (last_heartbeat(&cluster, expected_host) > heartbeat_before).then_some(()),
            );
            let log = cluster.console_log(expected_host, VM);
            assert!(
                !log.contains("probe-error"),
                "{context}: the guest's oracles complained:\n{log}"
            );
            // G3: the controller agrees with what runs.
            cluster
                .check_g3()
                .unwrap_or_else(|v| panic!("{context}: G3: {v}\n{}", cluster.logs()));
            // G2 on the other host: nothing of the VM is left there.
            assert_nothing_on(&cluster, other, &context);

            tally.push(format!(
                "{context}: {expected_status} on {expected_host} ({} ms){}",
                report["total_ms"],
                report["error"]
                    .as_str()
                    .map(|e| format!(" — {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    eprintln!(
        "{injected} faults injected, {} passed:\n  {}",
        tally.len(),
        tally.join("\n  ")
    );
    cluster.restart_ferryd_env("host1", &[]);
    cluster.ferry_ok(&["vm", "stop", VM, "--force"]);
    cluster.ferry_ok(&["vm", "delete", VM]);
    cluster.down_purge();
}

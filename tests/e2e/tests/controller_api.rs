//! End-to-end: VM and host commands go through the controller. The proof
//! that they really do is a client configuration that names only the
//! controller (no `[[hosts]]`): with it the CLI cannot reach an agent
//! itself, so whatever works, works through the controller.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_e2e::{guest_spec, heartbeats, Cluster};

const BOOT: Duration = Duration::from_secs(90);

/// The cluster's `ferry.toml` without its `[[hosts]]` tables.
fn controller_only_config(cluster: &Cluster) -> PathBuf {
    let full = std::fs::read_to_string(cluster.client_config()).expect("ferry.toml");
    let head = full.split("[[hosts]]").next().unwrap_or_default();
    assert!(head.contains("controller = "), "no controller in {full}");
    assert_ne!(head.trim(), full.trim(), "the cluster's config lists hosts");
    let path = cluster.dir().join("controller-only.toml");
    std::fs::write(&path, head).expect("write controller-only.toml");
    path
}

/// `ferry --config CONFIG ARGS`, which must succeed.
fn via(cluster: &Cluster, config: &std::path::Path, args: &[&str]) -> ferry_e2e::Run {
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    cluster.ferry_ok(&all)
}

fn names_and_hosts(listed: &serde_json::Value) -> Vec<(String, String)> {
    listed
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {listed}"))
        .iter()
        .map(|vm| {
            (
                vm["name"].as_str().unwrap().to_string(),
                vm["host"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn last_heartbeat(cluster: &Cluster, host: &str, vm: &str) -> u64 {
    heartbeats(&cluster.console_log(host, vm))
        .last()
        .copied()
        .unwrap_or(0)
}

#[test]
fn vms_are_placed_driven_and_watched_through_the_controller() {
    let cluster = Cluster::up(2);
    let only = controller_only_config(&cluster);
    let placed = cluster.write_spec("placed.toml", &guest_spec("placed", "local"));
    let pinned = cluster.write_spec("pinned.toml", &guest_spec("pinned", "local"));

    // Placement: by the controller without --host, on host2 with it.
    let created = via(
        &cluster,
        &only,
        &[
            "vm",
            "create",
            "-f",
            placed.to_str().unwrap(),
            "--start",
            "-o",
            "json",
        ],
    )
    .json();
    let placed_on = created["host"].as_str().unwrap().to_string();
    assert!(
        placed_on == "host1" || placed_on == "host2",
        "placed on a host of the cluster: {created}"
    );
    let shown = via(&cluster, &only, &["vm", "show", "placed", "-o", "json"]).json();
    for field in ["name", "uuid", "host", "state", "pid", "accel"] {
        assert!(
            shown.get(field).is_some(),
            "`vm show` lacks {field}: {shown}"
        );
    }
    assert_eq!(shown["host"], placed_on.as_str(), "{shown}");
    assert_eq!(shown["state"], "running", "{shown}");
    via(
        &cluster,
        &only,
        &[
            "vm",
            "create",
            "-f",
            pinned.to_str().unwrap(),
            "--host",
            "host2",
            "--start",
        ],
    );
    assert_eq!(cluster.vm("pinned")["host"], "host2");

    // A name taken on one host is refused on any other, and nothing is made.
    let stderr = cluster.ferry_err(&[
        "--config",
        only.to_str().unwrap(),
        "vm",
        "create",
        "-f",
        pinned.to_str().unwrap(),
        "--host",
        "host1",
    ]);
    assert!(
        stderr.contains("already exists on host host2"),
        "the taken name is refused: {stderr}"
    );
    assert!(
        !cluster
            .datastore("host1", "local")
            .join("pinned.raw")
            .exists(),
        "a refused create leaves no disk"
    );

    // The list merges both hosts, the same with or without the host list.
    let listed = via(&cluster, &only, &["vm", "list", "-o", "json"]).json();
    assert_eq!(
        names_and_hosts(&listed),
        [
            ("pinned".to_string(), "host2".to_string()),
            ("placed".to_string(), placed_on.clone())
        ],
        "{listed}"
    );
    let direct = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
    assert_eq!(names_and_hosts(&direct), names_and_hosts(&listed));

    // The console tail through the proxy.
    cluster.wait_for("a heartbeat in `vm console pinned`", BOOT, || {
        let run = via(&cluster, &only, &["vm", "console", "pinned"]);
        run.stdout.contains("heartbeat seq=").then_some(())
    });

    // A followed console streams through the proxy: it shows heartbeats
    // newer than the log held when it started, and ends when the VM stops.
    let seen_before = last_heartbeat(&cluster, "host2", "pinned");
    let mut follow = Command::new(ferry_e2e::bin_dir().join("ferry"))
        .args(["--config", only.to_str().unwrap()])
        .args(["vm", "console", "pinned", "--follow", "-n", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferry vm console --follow");
    let stdout = follow.stdout.take().expect("piped stdout");
    let (lines_tx, lines_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let streamed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                // `heartbeats` reads complete lines only.
                if heartbeats(&format!("{line}\n"))
                    .iter()
                    .any(|seq| *seq > seen_before)
                {
                    break line;
                }
            }
            Err(_) => {
                let _ = follow.kill();
                let _ = follow.wait();
                panic!(
                    "no new heartbeat streamed through the controller after #{seen_before}\n{}",
                    cluster.logs()
                );
            }
        }
    };
    assert!(streamed.contains("heartbeat seq="), "{streamed}");
    let stopped = via(
        &cluster,
        &only,
        &["vm", "stop", "pinned", "--force", "-o", "json"],
    )
    .json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let ended = cluster.wait_for(
        "the followed console to end with the VM",
        Duration::from_secs(30),
        || follow.try_wait().expect("wait for the follower"),
    );
    assert!(ended.success(), "the follower ended cleanly: {ended}");
    reader.join().expect("reader thread");

    // Stop and delete through the controller.
    via(&cluster, &only, &["vm", "stop", "placed", "--force"]);
    via(&cluster, &only, &["vm", "delete", "pinned"]);
    via(&cluster, &only, &["vm", "delete", "placed"]);
    assert!(
        !cluster
            .datastore("host2", "local")
            .join("pinned.raw")
            .exists(),
        "the disk went with the VM"
    );
    let listed = via(&cluster, &only, &["vm", "list", "-o", "json"]).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let stderr = cluster.ferry_err(&["--config", only.to_str().unwrap(), "vm", "show", "pinned"]);
    assert!(stderr.contains("no VM named \"pinned\""), "{stderr}");
}

#[test]
fn hosts_are_listed_and_shown_through_the_controller() {
    let cluster = Cluster::up(2);
    let only = controller_only_config(&cluster);

    let hosts = via(&cluster, &only, &["host", "list", "-o", "json"]).json();
    let names: Vec<&str> = hosts
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {hosts}"))
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["host1", "host2"], "{hosts}");
    for host in hosts.as_array().unwrap() {
        assert!(
            host["memory_available_bytes"].as_u64().is_some() && host.get("error").is_none(),
            "each host answered with its facts: {host}"
        );
    }
    let table = via(&cluster, &only, &["host", "list"]).stdout;
    assert!(table.starts_with("NAME"), "{table}");
    assert_eq!(table.matches(" up ").count(), 2, "{table}");

    let host2 = via(&cluster, &only, &["host", "show", "host2", "-o", "json"]).json();
    assert_eq!(host2["name"], "host2", "{host2}");
    let stderr = cluster.ferry_err(&["--config", only.to_str().unwrap(), "host", "show", "host9"]);
    assert!(stderr.contains("unknown host \"host9\""), "{stderr}");
}

#[test]
fn a_host_that_does_not_answer_is_reported_and_not_fatal() {
    let cluster = Cluster::up(2);
    let only = controller_only_config(&cluster);
    let spec = cluster.write_spec("idle.toml", &guest_spec("idle", "local"));
    via(
        &cluster,
        &only,
        &[
            "vm",
            "create",
            "-f",
            spec.to_str().unwrap(),
            "--host",
            "host1",
        ],
    );

    let pid = nix::unistd::Pid::from_raw(cluster.ferryd_pid("host2"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("stop host2's ferryd");
    cluster.wait_for("host2's ferryd to exit", Duration::from_secs(20), || {
        nix::sys::signal::kill(pid, None).is_err().then_some(())
    });

    let run = via(&cluster, &only, &["vm", "list", "-o", "json"]);
    assert_eq!(
        names_and_hosts(&run.json()),
        [("idle".to_string(), "host1".to_string())]
    );
    assert!(
        run.stderr.contains("warning: host host2: "),
        "the silent host is reported: {}",
        run.stderr
    );
    let hosts = via(&cluster, &only, &["host", "list", "-o", "json"]).json();
    let host2 = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "host2")
        .unwrap_or_else(|| panic!("host2 is listed: {hosts}"));
    assert!(host2["error"].as_str().is_some(), "{host2}");
    // The VM on the answering host is still driven.
    assert_eq!(cluster.vm("idle")["state"], "stopped");
    // A name cannot be checked on a silent host: creating is refused, and
    // an unknown VM might be there, which the error says.
    let other = cluster.write_spec("other.toml", &guest_spec("other", "local"));
    let stderr = cluster.ferry_err(&[
        "--config",
        only.to_str().unwrap(),
        "vm",
        "create",
        "-f",
        other.to_str().unwrap(),
    ]);
    assert!(stderr.contains("host \"host2\" is unreachable"), "{stderr}");
    let stderr = cluster.ferry_err(&["--config", only.to_str().unwrap(), "vm", "show", "nosuch"]);
    assert!(
        stderr.contains("no VM named \"nosuch\" on the reachable hosts"),
        "{stderr}"
    );
}

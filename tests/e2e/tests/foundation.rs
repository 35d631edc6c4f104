//! End-to-end: the foundation — a local cluster runs the test guest under
//! real QEMU, driven only through the `ferry` CLI, and the oracles can fail.

use std::time::Duration;

use ferry_e2e::{guest_spec, heartbeats, Cluster};
use ferry_test_support::{console, disk_oracle, guest::ProbeConfig, memory_oracle};

const BOOT: Duration = Duration::from_secs(90);

fn pid_of(cluster: &Cluster, vm: &str) -> u32 {
    cluster.vm(vm)["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("{vm} has no pid: {}", cluster.vm(vm))) as u32
}

fn last_heartbeat(cluster: &Cluster, host: &str, vm: &str) -> u64 {
    heartbeats(&cluster.console_log(host, vm))
        .last()
        .copied()
        .unwrap_or(0)
}

#[test]
fn demo_vm_runs_and_its_heartbeat_shows_in_the_console() {
    let cluster = Cluster::up(1);
    let spec = ferry_e2e::workspace_file("examples/demo-vm.toml");
    cluster.ferry_ok(&["vm", "create", "-f", spec.to_str().unwrap(), "--start"]);

    cluster.wait_for("heartbeats in `ferry vm console demo`", BOOT, || {
        let run = cluster.ferry_ok(&["vm", "console", "demo"]);
        run.stdout.contains("heartbeat seq=").then_some(())
    });
    let vm = cluster.vm("demo");
    assert_eq!(vm["name"], "demo");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["host"], "host1");
    assert_eq!(vm["accel"], "tcg", "this machine has no vmx/svm: {vm}");
    assert!(vm["uuid"].as_str().is_some_and(|u| u.len() == 36));
    let pid = pid_of(&cluster, "demo");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the reported pid runs");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("qemu-system-x86_64"),
        "pid {pid} is not QEMU"
    );
    let listed = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
    assert_eq!(listed.as_array().map(|a| a.len()), Some(1), "{listed}");
}

#[test]
fn ferryd_killed_and_restarted_reattaches_without_disturbing_the_guest() {
    let cluster = Cluster::up(1);
    let spec = cluster.write_spec("vm.toml", &guest_spec("steady", "local"));
    cluster.ferry_ok(&["vm", "create", "-f", spec.to_str().unwrap(), "--start"]);
    cluster.wait_heartbeat("host1", "steady");
    let pid_before = pid_of(&cluster, "steady");

    let ferryd = cluster.ferryd_pid("host1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ferryd),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill ferryd");
    let seq_while_down = last_heartbeat(&cluster, "host1", "steady");
    // The guest keeps running while no agent watches it.
    cluster.wait_for("heartbeats while ferryd is down", BOOT, || {
        (last_heartbeat(&cluster, "host1", "steady") > seq_while_down + 20).then_some(())
    });
    cluster.ferry_ok(&["local", "up", "--hosts", "1"]);

    let vm = cluster.vm("steady");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(pid_of(&cluster, "steady"), pid_before, "same QEMU process");
    let seq_after = last_heartbeat(&cluster, "host1", "steady");
    cluster.wait_for("heartbeats after the restart", BOOT, || {
        (last_heartbeat(&cluster, "host1", "steady") > seq_after + 20).then_some(())
    });
    let report = ferry_test_support::heartbeat::HeartbeatReport::from_log(
        cluster.console_log("host1", "steady").as_bytes(),
    );
    report
        .check_no_reset()
        .unwrap_or_else(|e| panic!("the heartbeat reset: {e}"));
}

#[test]
fn qemu_killed_under_the_agent_is_reported_crashed() {
    let cluster = Cluster::up(1);
    let spec = cluster.write_spec("vm.toml", &guest_spec("fragile", "local"));
    cluster.ferry_ok(&["vm", "create", "-f", spec.to_str().unwrap(), "--start"]);
    let pid = pid_of(&cluster, "fragile");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");

    let vm = cluster.wait_for(
        "the VM to be reported crashed",
        Duration::from_secs(15),
        || {
            let vm = cluster.vm("fragile");
            (vm["state"] != "running").then_some(vm)
        },
    );
    assert_eq!(vm["state"], "crashed", "{vm}");
    assert!(vm["pid"].is_null(), "a crashed VM has no pid: {vm}");
    assert!(
        vm["state_reason"]
            .as_str()
            .is_some_and(|r| r.contains(&pid.to_string())),
        "the reason names the process: {vm}"
    );
    // A crashed VM can be started again.
    let restarted = cluster
        .ferry_ok(&["vm", "start", "fragile", "-o", "json"])
        .json();
    assert_eq!(restarted["state"], "running", "{restarted}");
}

#[test]
fn memory_oracle_catches_a_page_rewritten_in_guest_memory() {
    let cluster = Cluster::up(1);
    let spec = cluster.write_spec("vm.toml", &guest_spec("memcheck", "local"));
    cluster.ferry_ok(&["vm", "create", "-f", spec.to_str().unwrap(), "--start"]);
    cluster.wait_for("the probe's first memory pass", BOOT, || {
        console::last_mem_pass(cluster.console_log("host1", "memcheck").as_bytes()).map(|_| ())
    });
    let pid = pid_of(&cluster, "memcheck");
    let probe = ProbeConfig::default();

    // Paused, the pattern verifies.
    cluster.ferry_ok(&["vm", "pause", "memcheck"]);
    let dump = memory_oracle::read_guest_memory(pid, probe.mem_base(), probe.mem_len() as usize)
        .expect("read guest memory");
    memory_oracle::verify_dump(&dump, probe.mem_pages()).expect("the untouched pattern verifies");

    // Rewrite one page's counter the way a lost page would look.
    let page = 200usize;
    let gpa = probe.mem_base() + (page * memory_oracle::PAGE_SIZE) as u64;
    let counter = dump[page * memory_oracle::PAGE_SIZE];
    memory_oracle::inject_guest_memory(pid, gpa, &[counter.wrapping_add(0x40)]).expect("inject");
    let dump = memory_oracle::read_guest_memory(pid, probe.mem_base(), probe.mem_len() as usize)
        .expect("read guest memory");
    let error = memory_oracle::verify_dump(&dump, probe.mem_pages())
        .expect_err("the host-side checker must reject the corrupted page");
    assert!(error.to_string().contains("200"), "names the page: {error}");

    // And the guest's own check sees it when it reaches the page.
    cluster.ferry_ok(&["vm", "resume", "memcheck"]);
    cluster.wait_for("the probe to report oracle-fail", BOOT, || {
        let failures =
            console::oracle_failures(cluster.console_log("host1", "memcheck").as_bytes());
        failures
            .iter()
            .any(|line| line.contains("page=200"))
            .then_some(())
    });
}

#[test]
fn disk_oracle_catches_an_altered_record() {
    let cluster = Cluster::up(1);
    let spec = cluster.write_spec("vm.toml", &guest_spec("diskcheck", "local"));
    cluster.ferry_ok(&["vm", "create", "-f", spec.to_str().unwrap(), "--start"]);
    cluster.wait_for("100 flushed disk records", BOOT, || {
        console::last_disk_flushed(cluster.console_log("host1", "diskcheck").as_bytes())
            .filter(|seq| *seq >= 100)
    });
    let stopped = cluster
        .ferry_ok(&["vm", "stop", "diskcheck", "-o", "json"])
        .json();
    assert_eq!(
        stopped["state"], "stopped",
        "ACPI power-off stops it: {stopped}"
    );
    let last = console::last_disk_flushed(cluster.console_log("host1", "diskcheck").as_bytes())
        .expect("flushed records");
    let disk = cluster.datastore("host1", "local").join("diskcheck.raw");

    let summary =
        disk_oracle::verify_test_disk(&disk, last).expect("every flushed record is intact");
    let verified = summary.verified.clone().expect("records were verified");
    assert!(verified.end() - verified.start() >= 99, "{summary:?}");

    let region = disk_oracle::oracle_region(&disk).expect("oracle partition");
    disk_oracle::corrupt_record(&disk, region, last / 2).expect("corrupt a record");
    let error =
        disk_oracle::verify_test_disk(&disk, last).expect_err("the altered record is caught");
    assert!(
        error.to_string().contains(&(last / 2).to_string()),
        "names the record: {error}"
    );
}

#[test]
fn firmware_boot_pause_resume_stop_and_delete() {
    let cluster = Cluster::up(1);
    let guest = ferry_test_support::guest::TestGuest::locate().unwrap();
    let spec = cluster.write_spec(
        "fw.toml",
        &format!(
            r#"name = "fw"
memory = "512MiB"
[boot]
firmware = "bios"
disk = "vd0"
[[disks]]
id = "vd0"
datastore = "local2"
file = "fw.raw"
image = "{}"
"#,
            guest.disk.display()
        ),
    );
    cluster.ferry_ok(&["vm", "create", "-f", spec.to_str().unwrap(), "--start"]);
    cluster.wait_heartbeat("host1", "fw");

    let paused = cluster
        .ferry_ok(&["vm", "pause", "fw", "-o", "json"])
        .json();
    assert_eq!(paused["state"], "paused", "{paused}");
    let seq = last_heartbeat(&cluster, "host1", "fw");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        last_heartbeat(&cluster, "host1", "fw"),
        seq,
        "a paused guest is silent"
    );
    let resumed = cluster
        .ferry_ok(&["vm", "resume", "fw", "-o", "json"])
        .json();
    assert_eq!(resumed["state"], "running", "{resumed}");
    cluster.wait_for("heartbeats after resume", BOOT, || {
        (last_heartbeat(&cluster, "host1", "fw") > seq).then_some(())
    });

    let stderr = cluster.ferry_err(&["vm", "delete", "fw"]);
    assert!(stderr.contains("stop it first"), "{stderr}");
    let stopped = cluster.ferry_ok(&["vm", "stop", "fw", "-o", "json"]).json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(stopped["state_reason"].is_null(), "{stopped}");
    let disk = cluster.datastore("host1", "local2").join("fw.raw");
    assert!(disk.exists());
    cluster.ferry_ok(&["vm", "delete", "fw"]);
    assert!(
        !disk.exists(),
        "the disk Ferry created is removed with the VM"
    );
    let stderr = cluster.ferry_err(&["vm", "show", "fw"]);
    assert!(stderr.contains("no VM named \"fw\""), "{stderr}");
}

#[test]
fn bad_specs_get_a_clear_error_and_create_nothing() {
    let cluster = Cluster::up(1);
    let good = guest_spec("taken", "local");
    let spec = cluster.write_spec("taken.toml", &good);
    cluster.ferry_ok(&["vm", "create", "-f", spec.to_str().unwrap()]);

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown key",
            good.replace("name = \"taken\"", "name = \"bad1\"\ncolour = \"blue\""),
            "colour",
        ),
        (
            "zero memory",
            good.replace("name = \"taken\"", "name = \"bad2\"")
                .replace("\"512MiB\"", "\"0MiB\""),
            "memory",
        ),
        (
            "negative memory",
            good.replace("name = \"taken\"", "name = \"bad3\"")
                .replace("\"512MiB\"", "-512"),
            "memory",
        ),
        (
            "missing kernel file",
            good.replace("name = \"taken\"", "name = \"bad4\"")
                .replace("vmlinuz", "no-such-vmlinuz"),
            "boot.kernel",
        ),
        (
            "duplicate disk id",
            format!(
                "{}\n[[disks]]\nid = \"vd0\"\ndatastore = \"local\"\nfile = \"other.raw\"\nsize = \"1GiB\"\n",
                good.replace("name = \"taken\"", "name = \"bad5\"")
            ),
            "duplicate",
        ),
        ("a taken name", good.clone(), "already exists"),
    ];
    let datastore = cluster.datastore("host1", "local");
    let files_before = std::fs::read_dir(&datastore).unwrap().count();
    for (what, text, expected) in cases {
        let path = cluster.write_spec("bad.toml", &text);
        let stderr = cluster.ferry_err(&["vm", "create", "-f", path.to_str().unwrap()]);
        assert!(
            stderr.contains(expected),
            "{what}: the error should mention {expected:?}: {stderr}"
        );
    }
    let listed = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["taken"], "no bad spec created a VM");
    assert_eq!(
        std::fs::read_dir(&datastore).unwrap().count(),
        files_before,
        "no bad spec left a file in the datastore"
    );
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let cluster = Cluster::up(1);
    let rogue = cluster.dir().join("rogue");
    let ca = ferry_pki::ClusterCa::create("rogue").unwrap();
    ca.save(&rogue).unwrap();
    ca.issue_client("mallory", ferry_pki::Role::Admin)
        .unwrap()
        .save(&rogue, "mallory")
        .unwrap();
    let trusted = std::fs::read_to_string(cluster.client_config()).unwrap();
    // Same hosts and the cluster's CA to check the server, but a client
    // certificate the cluster never signed.
    let config = trusted
        .replace(
            &format!("{}/pki/admin.pem", cluster.dir().display()),
            &format!("{}/mallory.pem", rogue.display()),
        )
        .replace(
            &format!("{}/pki/admin-key.pem", cluster.dir().display()),
            &format!("{}/mallory-key.pem", rogue.display()),
        );
    assert_ne!(config, trusted, "the rogue configuration differs");
    let path = cluster.dir().join("rogue.toml");
    std::fs::write(&path, config).unwrap();

    let stderr = cluster.ferry_err(&["--config", path.to_str().unwrap(), "host", "show", "host1"]);
    assert!(
        stderr.contains("request to https://127.0.0.1"),
        "the connection is refused during TLS: {stderr}"
    );
    // The cluster's own client still gets in.
    cluster.ferry_ok(&["host", "show", "host1"]);
}

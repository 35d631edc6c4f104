//! End-to-end: network connectivity survives live migration (issue 7).
//!
//! One namespace cluster of two hosts (`ferry local up --netns`, root): each
//! host namespace has its own bridge `ferrylan0`, uplinked to one guest LAN
//! segment, and a client namespace sits on that segment. Two test guests run
//! on the cluster network `demo-lan` with echo services: `demo-net` exactly
//! as `examples/demo-net-vm.toml` describes it (disk on `local`: copied
//! storage) and `shared-net` (disk on `shared`). While a client in the
//! client namespace keeps one TCP connection to each guest and exchanges a
//! line every 5 ms, the guests make three round trips between the hosts;
//! every migration also carries `--net-probe`, whose longest gap lands in
//! the report. Along the way: a host that lacks the network is refused
//! before anything moves, a cancelled migration leaves no tap, and bad
//! network input is refused with nothing changed.
//!
//! One test function on purpose: booting a guest under TCG costs seconds,
//! and every check here needs the same booted guests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_e2e::Cluster;
use ferry_netprobe::{EchoConfig, EchoProbe, EchoReport};
use ferry_test_support::netns::Rig;
use serde_json::Value;

const HOST_LAN_BRIDGE: &str = "ferrylan0";
const UPLINK: &str = "lanup0";
const DEMO_MAC: &str = "52:54:00:fe:00:10";
const SHARED_MAC: &str = "52:54:00:fe:00:11";

fn echo_address(ip: &str) -> SocketAddr {
    format!("{ip}:7000").parse().expect("an address")
}

/// A `shared-net` guest: the demo guest's command line with its own
/// address, its disk on the `shared` datastore.
fn shared_net_spec(cluster: &Cluster) -> PathBuf {
    let base = ferry_e2e::guest_spec("shared-net", "shared");
    let cmdline = ferry_test_support::guest::ProbeConfig::default().kernel_cmdline();
    let spec = base.replace(
        &format!("cmdline = \"{cmdline}\""),
        &format!("cmdline = \"{cmdline} ferry.ip=198.18.0.11/15 ferry.echo_port=7000\""),
    );
    assert!(spec.contains("ferry.ip=198.18.0.11/15"), "{spec}");
    cluster.write_spec(
        "shared-net.toml",
        &format!(
            "{spec}\n[[nics]]\nid = \"net0\"\nmac = \"{SHARED_MAC}\"\nnetwork = \"demo-lan\"\n"
        ),
    )
}

fn wait_net_ready(cluster: &Cluster, host: &str, vm: &str) {
    cluster.wait_for(
        &format!("{vm}'s echo service"),
        Duration::from_secs(120),
        || {
            let log = cluster.console_log(host, vm);
            assert!(
                !log.contains("probe-error"),
                "{vm} reported a probe error:\n{log}"
            );
            log.contains("probe-net ip=").then_some(())
        },
    );
}

/// A long-lived client in the client namespace.
fn client(rig: &Rig, ip: &str) -> EchoProbe {
    let mut config = EchoConfig::new(echo_address(ip));
    config.netns = Some(PathBuf::from("/run/netns").join(rig.client_netns()));
    config.connect_timeout = Duration::from_secs(20);
    EchoProbe::start(config).unwrap_or_else(|e| panic!("cannot connect to {ip}:7000: {e}"))
}

fn assert_clean(what: &str, report: &EchoReport) {
    assert!(
        report.is_clean(),
        "{what}: the client lost, garbled or broke something: {report:#?}"
    );
}

/// `ferry migrate` run in the client namespace with `--net-probe`; the
/// report, asserted completed with a clean probe.
fn migrate_probed(cluster: &Cluster, rig: &Rig, vm: &str, ip: &str, to: &str) -> Value {
    let probe = format!("{ip}:7000");
    let run = cluster.ferry_in_netns(
        &rig.client_netns(),
        &[
            "migrate",
            vm,
            "--to",
            to,
            "--wait",
            "--net-probe",
            &probe,
            "-o",
            "json",
        ],
    );
    let report: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "migrate {vm} → {to} printed no report ({e}):\n{}\n{}\n{}",
            run.stdout,
            run.stderr,
            cluster.logs()
        )
    });
    assert!(
        run.success && report["status"] == "completed",
        "migration of {vm} to {to} did not complete: {report:#}\n{}",
        cluster.logs()
    );
    let seen: EchoReport = serde_json::from_value(report["network_probe"].clone())
        .unwrap_or_else(|e| panic!("no network_probe in the report ({e}): {report:#}"));
    assert_clean(&format!("--net-probe of {vm} → {to}"), &seen);
    let gap = report["network_downtime_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no network_downtime_ms in the report: {report:#}"));
    assert_eq!(gap, seen.max_gap_ms.ceil() as u64, "{report:#}");
    eprintln!(
        "{vm} → {to} ({}): network downtime {gap} ms, QEMU downtime {} ms, paused {} ms, {} echoes",
        report["strategy"]["storage"],
        report["downtime_ms"],
        report["paused_ms"],
        seen.messages_echoed
    );
    report
}

/// The taps on `ferrylan0` of `host`: one per VM of ours running there.
fn lan_taps(rig: &Rig, host: &str) -> Vec<String> {
    let ports = rig
        .bridge_ports(host, HOST_LAN_BRIDGE)
        .expect("bridge ports");
    assert!(
        ports.iter().any(|p| p == UPLINK),
        "{host}'s {HOST_LAN_BRIDGE} lost its uplink: {ports:?}"
    );
    ports.into_iter().filter(|p| p != UPLINK).collect()
}

/// G2 for networking: on each host exactly the taps of the VMs it runs,
/// each on the LAN bridge; no other tap anywhere.
fn assert_taps(rig: &Rig, expected: &[(&str, usize)]) {
    for (host, count) in expected {
        let on_bridge = lan_taps(rig, host);
        let all = rig.taps(host).expect("taps");
        assert_eq!(
            on_bridge.len(),
            *count,
            "{host} should have {count} tap(s) on {HOST_LAN_BRIDGE}: {on_bridge:?}"
        );
        assert_eq!(
            all.len(),
            *count,
            "{host} has taps that are not on {HOST_LAN_BRIDGE}: {all:?}"
        );
    }
}

/// The guest's MAC is now learned on `host`'s uplink of the LAN segment:
/// the announcement after the switchover reached the bridge.
fn assert_lan_port(cluster: &Cluster, rig: &Rig, mac: &str, host: &str) {
    let uplink = rig.lan_uplink(host).expect("uplink");
    cluster.wait_for(
        &format!("{mac} to be learned on {uplink}"),
        Duration::from_secs(10),
        || (rig.lan_port_of(mac).expect("fdb").as_deref() == Some(uplink.as_str())).then_some(()),
    );
}

fn host_of(cluster: &Cluster, vm: &str) -> String {
    cluster.vm(vm)["host"].as_str().expect("host").to_string()
}

#[test]
fn tcp_connections_survive_live_migration_and_networks_leave_nothing_behind() {
    let cluster = Cluster::up_netns(2);
    let rig = Rig::open(cluster.dir()).unwrap_or_else(|e| panic!("{e}"));

    // `local up` as root defined demo-lan on ferrylan0.
    let networks = cluster.ferry_ok(&["network", "list", "-o", "json"]).json();
    let demo = networks
        .as_array()
        .and_then(|all| all.iter().find(|n| n["name"] == "demo-lan"))
        .unwrap_or_else(|| panic!("no demo-lan network: {networks:#}"));
    assert_eq!(demo["bridge"], HOST_LAN_BRIDGE);
    assert!(
        demo["hosts"]
            .as_array()
            .is_some_and(|h| h.len() == 2 && h.iter().all(|h| h["available"] == true)),
        "both hosts serve demo-lan: {demo:#}"
    );

    // -- bad input: clear errors, nothing changed ---------------------------
    bad_network_input_changes_nothing(&cluster);

    // -- two guests on demo-lan --------------------------------------------
    let example = ferry_e2e::workspace_file("examples/demo-net-vm.toml");
    let example = example.to_str().expect("a UTF-8 path");
    cluster.ferry_ok(&["vm", "create", "-f", example, "--host", "host1", "--start"]);
    let shared = shared_net_spec(&cluster);
    cluster.ferry_ok(&[
        "vm",
        "create",
        "-f",
        shared.to_str().expect("UTF-8"),
        "--host",
        "host1",
        "--start",
    ]);
    wait_net_ready(&cluster, "host1", "demo-net");
    wait_net_ready(&cluster, "host1", "shared-net");
    assert_taps(&rig, &[("host1", 2), ("host2", 0)]);
    let shown = cluster.vm("demo-net");
    assert_eq!(shown["spec"]["nics"][0]["mac"], DEMO_MAC);
    assert!(
        shown["warnings"].as_array().is_some_and(|w| w.is_empty()),
        "a network NIC carries no warning: {shown:#}"
    );

    let demo_client = client(&rig, "198.18.0.10");
    let shared_client = client(&rig, "198.18.0.11");

    // -- a host that lacks the network is refused before anything moves ----
    lacking_network_is_refused(&cluster, &rig);
    assert_eq!(host_of(&cluster, "demo-net"), "host1");

    // -- a cancelled migration leaves no tap on the destination -------------
    cancel_leaves_no_tap(&cluster, &rig);

    // -- three round trips, copied and shared storage -----------------------
    let trips = [
        ("demo-net", "198.18.0.10", DEMO_MAC, "host2", "copy"),
        ("shared-net", "198.18.0.11", SHARED_MAC, "host2", "shared"),
        ("demo-net", "198.18.0.10", DEMO_MAC, "host1", "copy"),
        ("shared-net", "198.18.0.11", SHARED_MAC, "host1", "shared"),
        ("demo-net", "198.18.0.10", DEMO_MAC, "host2", "copy"),
        ("demo-net", "198.18.0.10", DEMO_MAC, "host1", "copy"),
    ];
    let mut gaps = Vec::new();
    for (vm, ip, mac, to, storage) in trips {
        let report = migrate_probed(&cluster, &rig, vm, ip, to);
        assert_eq!(report["strategy"]["storage"], storage, "{report:#}");
        gaps.push(report["network_downtime_ms"].as_u64().unwrap_or(0));
        assert_eq!(host_of(&cluster, vm), to);
        let shown = cluster.vm(vm);
        assert_eq!(
            shown["spec"]["nics"][0]["mac"], mac,
            "the guest keeps its MAC"
        );
        assert_lan_port(&cluster, &rig, mac, to);
        let running_on = |host: &str| {
            ["demo-net", "shared-net"]
                .iter()
                .filter(|name| host_of(&cluster, name) == host)
                .count()
        };
        let expected = [
            ("host1", running_on("host1")),
            ("host2", running_on("host2")),
        ];
        assert_taps(&rig, &expected);
        // The long-lived connections are still whole.
        for (name, probe) in [("demo-net", &demo_client), ("shared-net", &shared_client)] {
            let now = probe.snapshot();
            assert!(
                now.connection_error.is_none() && now.messages_corrupted == 0,
                "{name}'s client connection suffered after {vm} → {to}: {now:#?}"
            );
        }
    }
    let demo_seen = demo_client.stop();
    let shared_seen = shared_client.stop();
    assert_clean("the long-lived demo-net connection", &demo_seen);
    assert_clean("the long-lived shared-net connection", &shared_seen);
    eprintln!(
        "network downtime per migration (ms): {gaps:?}; long-lived connections: demo-net \
         {:.0} ms longest gap over {} echoes, shared-net {:.0} ms over {}",
        demo_seen.max_gap_ms,
        demo_seen.messages_echoed,
        shared_seen.max_gap_ms,
        shared_seen.messages_echoed
    );

    // The network cannot go while VMs use it.
    let in_use = cluster.ferry_err(&["network", "delete", "demo-lan"]);
    assert!(
        in_use.contains("in use by VM(s) demo-net, shared-net"),
        "{in_use}"
    );

    // -- stop and delete: no tap is left, the bridges keep only uplinks -----
    for vm in ["demo-net", "shared-net"] {
        cluster.ferry_ok(&["vm", "stop", vm, "--force"]);
    }
    assert_taps(&rig, &[("host1", 0), ("host2", 0)]);
    for vm in ["demo-net", "shared-net"] {
        cluster.ferry_ok(&["vm", "delete", vm]);
    }
    cluster.ferry_ok(&["network", "delete", "demo-lan"]);
    let left = cluster.ferry_ok(&["network", "list", "-o", "json"]).json();
    assert_eq!(left, serde_json::json!([]));
    cluster.down_purge();
}

/// A NIC on an unknown network, a duplicate MAC, a bridge that cannot be
/// made, a bad network definition: each refused with the reason, nothing
/// defined.
fn bad_network_input_changes_nothing(cluster: &Cluster) {
    let base = ferry_e2e::guest_spec("badnet", "local");
    let with_nic = |nic: &str| cluster.write_spec("badnet.toml", &format!("{base}\n{nic}"));

    let unknown = with_nic("[[nics]]\nid = \"net0\"\nnetwork = \"no-such-lan\"\n");
    let error = cluster.ferry_err(&["vm", "create", "-f", unknown.to_str().unwrap()]);
    assert!(
        error.contains("nics[0].network") && error.contains("no-such-lan"),
        "{error}"
    );

    let refused = cluster.ferry_err(&[
        "network",
        "create",
        "bad-bridge",
        "--bridge",
        "a-bridge-name-too-long",
    ]);
    assert!(refused.contains("bridge:"), "{refused}");
    let refused = cluster.ferry_err(&[
        "network", "create", "vlan-lan", "--bridge", "br9", "--vlan", "4095",
    ]);
    assert!(refused.contains("vlan:"), "{refused}");
    let taken = cluster.ferry_err(&["network", "create", "demo-lan", "--bridge", "br9"]);
    assert!(taken.contains("already exists"), "{taken}");

    // `lo` exists on every host and is not a bridge: the agent refuses
    // before defining anything.
    cluster.ferry_ok(&["network", "create", "loop-lan", "--bridge", "lo"]);
    let on_lo = with_nic("[[nics]]\nid = \"net0\"\nnetwork = \"loop-lan\"\n");
    let error = cluster.ferry_err(&["vm", "create", "-f", on_lo.to_str().unwrap(), "--start"]);
    assert!(error.contains("not a bridge"), "{error}");
    cluster.ferry_ok(&["network", "delete", "loop-lan"]);

    // A missing bridge is made by the agent of the host that runs the VM
    // (local clusters allow it), and the VM's tap goes on it.
    agent_creates_a_missing_bridge(cluster, &base);

    // A user-mode NIC is accepted, with the warning `vm show` gives.
    let user = with_nic(&format!("[[nics]]\nid = \"net0\"\nmac = \"{DEMO_MAC}\"\n"));
    cluster.ferry_ok(&[
        "vm",
        "create",
        "-f",
        user.to_str().unwrap(),
        "--host",
        "host2",
    ]);
    let shown = cluster.vm("badnet");
    let warnings = shown["warnings"].to_string();
    assert!(
        warnings.contains("user-mode networking") && warnings.contains("do not survive"),
        "{shown:#}"
    );
    let text = cluster.ferry_ok(&["vm", "show", "badnet"]).stdout;
    assert!(text.contains("warning"), "{text}");

    // Its MAC is now taken: a second VM with it is refused.
    let second_base = ferry_e2e::guest_spec("badnet2", "local");
    let duplicate = cluster.write_spec(
        "badnet2.toml",
        &format!("{second_base}\n[[nics]]\nid = \"net0\"\nmac = \"{DEMO_MAC}\"\nnetwork = \"demo-lan\"\n"),
    );
    let error = cluster.ferry_err(&["vm", "create", "-f", duplicate.to_str().unwrap()]);
    assert!(
        error.contains("nics[0].mac") && error.contains("badnet"),
        "{error}"
    );
    cluster.ferry_ok(&["vm", "delete", "badnet"]);

    let vms = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
    assert_eq!(vms, serde_json::json!([]), "nothing was defined");
    let networks = cluster.ferry_ok(&["network", "list", "-o", "json"]).json();
    assert_eq!(
        networks.as_array().map(Vec::len),
        Some(1),
        "only demo-lan: {networks:#}"
    );
}

/// `made-lan` on a bridge no host has: host2's agent creates it when the
/// VM starts and the tap joins it; stopping the VM takes the tap away.
/// Then a VLAN network: an untagged access port of the VLAN where the
/// kernel filters VLANs, else a clear error and nothing defined.
fn agent_creates_a_missing_bridge(cluster: &Cluster, base: &str) {
    let rig = Rig::open(cluster.dir()).unwrap_or_else(|e| panic!("{e}"));
    cluster.ferry_ok(&["network", "create", "made-lan", "--bridge", "ferrymade0"]);
    let spec = cluster.write_spec(
        "badnet.toml",
        &format!("{base}\n[[nics]]\nid = \"net0\"\nnetwork = \"made-lan\"\n"),
    );
    cluster.ferry_ok(&[
        "vm",
        "create",
        "-f",
        spec.to_str().unwrap(),
        "--host",
        "host2",
        "--start",
    ]);
    let ports = rig
        .bridge_ports("host2", "ferrymade0")
        .expect("ports of ferrymade0");
    assert_eq!(
        ports.len(),
        1,
        "the VM's tap is on the bridge the agent made: {ports:?}"
    );
    cluster.ferry_ok(&["vm", "stop", "badnet", "--force"]);
    assert_eq!(
        rig.taps("host2").expect("taps"),
        Vec::<String>::new(),
        "the tap went with the VM's QEMU"
    );
    cluster.ferry_ok(&["vm", "delete", "badnet"]);
    cluster.ferry_ok(&["network", "delete", "made-lan"]);

    cluster.ferry_ok(&[
        "network",
        "create",
        "vlan-lan",
        "--bridge",
        "ferryvlan0",
        "--vlan",
        "42",
    ]);
    let spec = cluster.write_spec(
        "badnet.toml",
        &format!("{base}\n[[nics]]\nid = \"net0\"\nnetwork = \"vlan-lan\"\n"),
    );
    let host2 = rig.host("host2").expect("host2").netns.clone();
    let run = cluster.ferry(&[
        "vm",
        "create",
        "-f",
        spec.to_str().unwrap(),
        "--host",
        "host2",
        "--start",
    ]);
    if kernel_filters_vlans() {
        assert!(run.success, "{}", run.stderr);
        let ports = rig.bridge_ports("host2", "ferryvlan0").expect("ports");
        assert_eq!(ports.len(), 1, "{ports:?}");
        let vlans = std::process::Command::new("bridge")
            .args(["-n", &host2, "vlan", "show", "dev", &ports[0]])
            .output()
            .expect("bridge runs");
        let vlans = String::from_utf8_lossy(&vlans.stdout).into_owned();
        assert!(
            vlans.contains("42 PVID Egress Untagged") && !vlans.contains(" 1 PVID"),
            "the tap is an untagged access port of VLAN 42 only:\n{vlans}"
        );
        cluster.ferry_ok(&["vm", "stop", "badnet", "--force"]);
        cluster.ferry_ok(&["vm", "delete", "badnet"]);
    } else {
        assert!(
            !run.success && run.stderr.contains("CONFIG_BRIDGE_VLAN_FILTERING"),
            "a kernel without bridge VLAN filtering gives a clear error: {}",
            run.stderr
        );
        let vms = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
        assert_eq!(
            vms,
            serde_json::json!([]),
            "the VM that could not start is not left defined"
        );
    }
    cluster.ferry_ok(&["network", "delete", "vlan-lan"]);
}

/// Whether this kernel's bridges can filter VLANs (tried in a namespace of
/// our own).
fn kernel_filters_vlans() -> bool {
    let ns = format!("fyvlan{}", std::process::id());
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(ip(&["netns", "add", &ns]), "cannot make namespace {ns}");
    let filters = ip(&[
        "-n",
        &ns,
        "link",
        "add",
        "fyprobe0",
        "type",
        "bridge",
        "vlan_filtering",
        "1",
    ]);
    ip(&["netns", "del", &ns]);
    filters
}

/// host2 restarted serving no network: the migration of demo-net there is
/// refused by the pre-flight, with no VM, disk or tap on host2; then host2
/// is put back.
fn lacking_network_is_refused(cluster: &Cluster, rig: &Rig) {
    cluster.restart_ferryd_editing("host2", |text| {
        text.replace("create_bridges = true", "create_bridges = true\nserve = []")
    });
    let dry = cluster.ferry(&[
        "migrate",
        "demo-net",
        "--to",
        "host2",
        "--dry-run",
        "-o",
        "json",
    ]);
    let report: Value = serde_json::from_str(&dry.stdout).expect("a dry-run report");
    let check = report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "destination_networks"))
        .unwrap_or_else(|| panic!("no destination_networks check: {report:#}"));
    assert_eq!(check["ok"], false, "{report:#}");
    assert!(
        check["detail"]
            .as_str()
            .is_some_and(|d| d.contains("does not serve network demo-lan")),
        "{check:#}"
    );
    let error = cluster.ferry_err(&["migrate", "demo-net", "--to", "host2"]);
    assert!(error.contains("demo-lan"), "{error}");
    assert_eq!(rig.taps("host2").expect("taps"), Vec::<String>::new());
    let on_host2: Vec<Value> = cluster
        .ferry_ok(&["vm", "list", "-o", "json"])
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|vm| vm["host"] == "host2")
        .collect();
    assert!(
        on_host2.is_empty(),
        "nothing arrived on host2: {on_host2:#?}"
    );
    let incoming = cluster.datastore("host2", "local").join("demo-net.raw");
    assert!(!incoming.exists(), "no disk was made on host2");
    cluster.restart_ferryd_editing("host2", |text| text.replace("\nserve = []", ""));
}

/// A migration cancelled once the destination's tap is on its bridge:
/// afterwards neither host has a tap more than before, and demo-net runs on
/// host1.
fn cancel_leaves_no_tap(cluster: &Cluster, rig: &Rig) {
    // Slow enough that the cancel lands while RAM is still copying.
    let run = cluster.ferry_ok(&[
        "migrate",
        "demo-net",
        "--to",
        "host2",
        "--bandwidth",
        "4MiB/s",
        "-o",
        "json",
    ]);
    let id = run.json()["id"].as_str().expect("an id").to_string();
    cluster.wait_for(
        "the destination's tap on its bridge",
        Duration::from_secs(60),
        || (lan_taps(rig, "host2").len() == 1).then_some(()),
    );
    cluster.ferry_ok(&["migration", "cancel", &id]);
    cluster.wait_for("the cancel to finish", Duration::from_secs(60), || {
        let report = cluster
            .ferry_ok(&["migration", "show", &id, "-o", "json"])
            .json();
        (report["status"] == "cancelled").then_some(())
    });
    assert_eq!(host_of(cluster, "demo-net"), "host1");
    assert_eq!(cluster.vm("demo-net")["state"], "running");
    cluster.wait_for("host2's tap to go", Duration::from_secs(20), || {
        rig.taps("host2").expect("taps").is_empty().then_some(())
    });
    assert_taps(rig, &[("host1", 2), ("host2", 0)]);
}

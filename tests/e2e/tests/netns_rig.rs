//! End-to-end: the multi-host rig. `ferry local up --netns` puts each host in
//! a network namespace of its own on a bridge; the demo VM (its disk on the
//! host's `local` datastore, so memory and an NBD disk mirror both move)
//! live-migrates host1 → host2 across host1's veth; the rig can shape and cut
//! that link; `ferry local down --purge` leaves no namespace, veth, bridge or
//! subnet claim behind.
//!
//! Needs root (network namespaces). Not root is a failure with a message,
//! never a silent skip.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_e2e::Cluster;

use ferry_test_support::netns::{Rig, Shape};

const BOOT: Duration = Duration::from_secs(90);

fn last_heartbeat(cluster: &Cluster, host: &str, vm: &str) -> u64 {
    ferry_e2e::heartbeats(&cluster.console_log(host, vm))
        .last()
        .copied()
        .unwrap_or(0)
}

fn in_198_18_slash_15(addr: Ipv4Addr) -> bool {
    let [a, b, _, _] = addr.octets();
    a == 198 && (b == 18 || b == 19)
}

/// Bytes the bridge received from a host (its uplink), read in the root
/// namespace.
fn bytes_from(host_veth_bridge: &str) -> u64 {
    let path = format!("/sys/class/net/{host_veth_bridge}/statistics/rx_bytes");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
        .trim()
        .parse()
        .expect("a byte count")
}

fn ip_lines(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether any namespace, link or claim that `rig` names still exists.
fn leftovers(rig: &Rig, claim: &Path) -> Vec<String> {
    let namespaces = ip_lines(&["netns", "list"]);
    let links = ip_lines(&["-o", "link", "show"]);
    let mut left = Vec::new();
    for host in rig.hosts() {
        if namespaces.split_whitespace().any(|w| w == host.netns) {
            left.push(format!("namespace {}", host.netns));
        }
        if links.contains(&format!(" {}@", host.veth_bridge)) {
            left.push(format!("veth {}", host.veth_bridge));
        }
    }
    if links.contains(&format!(" {}:", rig.network().bridge)) {
        left.push(format!("bridge {}", rig.network().bridge));
    }
    if claim.exists() {
        left.push(format!("subnet claim {}", claim.display()));
    }
    left
}

#[test]
fn netns_cluster_migrates_across_the_veth_link_and_down_leaves_nothing() {
    let cluster = Cluster::up_netns(2);
    let rig = Rig::open(cluster.dir()).unwrap_or_else(|e| panic!("{e}"));
    let claim = PathBuf::from("/run/ferry/local-netns").join(rig.network().index.to_string());

    // Addressing: every host in 198.18.0.0/15, distinct, and the CLI (root
    // namespace) reaches each ferryd there.
    let h1 = rig.host("host1").unwrap().clone();
    let h2 = rig.host("host2").unwrap().clone();
    for host in [&h1, &h2] {
        assert!(in_198_18_slash_15(host.address), "{host:?}");
    }
    assert!(in_198_18_slash_15(rig.network().address));
    assert_ne!(h1.address, h2.address);
    let status = cluster.ferry_ok(&["local", "status", "-o", "json"]).json();
    let urls: Vec<&str> = status["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h["url"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(urls, [h1.url(), h2.url()], "{status}");
    assert!(
        status["hosts"][1]["up"].as_bool().unwrap_or(false),
        "{status}"
    );
    let config = std::fs::read_to_string(cluster.dir().join("hosts/host2/ferryd.toml")).unwrap();
    assert!(
        config.contains(&format!("migration_address = \"{}\"", h2.address)),
        "{config}"
    );

    // Re-running `up` (without the flag) keeps the mode and changes nothing.
    cluster.ferry_ok(&["local", "up", "--hosts", "2"]);
    assert_eq!(Rig::open(cluster.dir()).unwrap().hosts(), rig.hosts());

    // The demo VM boots on host1 ...
    let spec = ferry_e2e::workspace_file("examples/demo-vm.toml");
    cluster.ferry_ok(&[
        "vm",
        "create",
        "-f",
        spec.to_str().unwrap(),
        "--host",
        "host1",
        "--start",
    ]);
    cluster.wait_for("a heartbeat from demo on host1", BOOT, || {
        (last_heartbeat(&cluster, "host1", "demo") > 0).then_some(())
    });

    // ... and moves to host2 live, through host1's veth.
    let before = bytes_from(&h1.veth_bridge);
    let report = cluster
        .ferry_ok(&[
            "migrate",
            "demo",
            "--to",
            "host2",
            "--deadline",
            "120s",
            "--wait",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(report["status"], "completed", "{report}");
    let crossed = bytes_from(&h1.veth_bridge) - before;
    // The guest's working set alone is 32 MiB of non-zero pages. (QEMU's
    // transferred_bytes is no lower bound: it counts zero blocks of the disk
    // mirror that NBD sends as write-zeroes requests.)
    assert!(
        crossed > 32 << 20,
        "the migration must cross host1's veth, but {} received only {crossed} bytes \
         from host1 (report: {report})",
        h1.veth_bridge
    );
    let vm = cluster
        .ferry_ok(&["vm", "show", "demo", "-o", "json"])
        .json();
    assert_eq!(vm["host"], "host2", "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");
    let moved_at = last_heartbeat(&cluster, "host2", "demo");
    cluster.wait_for("heartbeats on host2 after the migration", BOOT, || {
        (last_heartbeat(&cluster, "host2", "demo") > moved_at + 20).then_some(())
    });
    let both = cluster.console_log("host1", "demo") + &cluster.console_log("host2", "demo");
    ferry_test_support::heartbeat::HeartbeatReport::from_log(both.as_bytes())
        .check_no_reset()
        .unwrap_or_else(|e| panic!("{e}"));

    // Link control: a shape shows as tbf on both ends and goes away; a cut
    // host is unreachable until restored.
    rig.shape("host2", &Shape::mbit(100)).unwrap();
    let qdiscs = rig.qdiscs("host2").unwrap();
    assert_eq!(qdiscs.matches("tbf").count(), 2, "{qdiscs}");
    rig.unshape("host2").unwrap();
    assert!(!rig.qdiscs("host2").unwrap().contains("tbf"));
    rig.cut("host2").unwrap();
    assert!(!rig.is_up("host2").unwrap());
    let cut =
        std::net::TcpStream::connect_timeout(&(h2.address, h2.port).into(), Duration::from_secs(2));
    assert!(cut.is_err(), "host2 answered through a cut link");
    rig.restore("host2").unwrap();
    assert!(rig.is_up("host2").unwrap());
    cluster.wait_for("host2 reachable again", Duration::from_secs(20), || {
        std::net::TcpStream::connect_timeout(&(h2.address, h2.port).into(), Duration::from_secs(1))
            .ok()
    });

    // Down: nothing of the rig is left.
    cluster.down_purge();
    let left = leftovers(&rig, &claim);
    assert!(
        left.is_empty(),
        "left behind by `ferry local down --purge`: {left:?}"
    );
    assert!(!rig.dir().exists(), "the cluster folder is still there");
}

#[test]
fn down_without_purge_removes_the_network_and_up_brings_it_back() {
    let cluster = Cluster::up_netns(1);
    let rig = Rig::open(cluster.dir()).unwrap_or_else(|e| panic!("{e}"));
    let claim = PathBuf::from("/run/ferry/local-netns").join(rig.network().index.to_string());

    cluster.ferry_ok(&["local", "down"]);
    let left = leftovers(&rig, &claim);
    assert_eq!(
        left,
        [format!("subnet claim {}", claim.display())],
        "only the subnet claim outlives `down` (the stopped cluster keeps its subnet)"
    );

    cluster.ferry_ok(&["local", "up", "--hosts", "1"]);
    let again = Rig::open(cluster.dir()).unwrap();
    assert_eq!(again.hosts(), rig.hosts(), "same subnet and names after up");
    let status = cluster.ferry_ok(&["local", "status", "-o", "json"]).json();
    assert_eq!(status["hosts"][0]["up"], true, "{status}");

    cluster.down_purge();
    assert!(leftovers(&rig, &claim).is_empty());
}

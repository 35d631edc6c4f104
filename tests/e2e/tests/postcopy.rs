//! End-to-end: post-copy survives a cut link (issue 4, item 5).
//!
//! Post-copy is off by default because it is weaker: once the guest runs
//! on the destination, its memory is split between the hosts. A link that
//! breaks then must not lose the guest: Ferry notices that post-copy makes
//! no progress, pauses it (`migrate-pause`), and once the link is back
//! reconnects the two QEMUs (`migrate-recover` on the destination, a
//! resuming `migrate` on the source) until the last page has arrived.
//!
//! A namespace cluster of two hosts, host1's link shaped to 40 Mbit/s so
//! that a guest dirtying its working set as fast as it can does not
//! converge in pre-copy and post-copy lasts a few seconds; `--postcopy
//! always`. During post-copy the link is cut for a few seconds, then
//! restored. The migration completes, the guest runs exactly once, on the
//! destination, its memory oracle finds every page intact, its heartbeat
//! never restarted, and nothing of it is left on host1.
//!
//! Needs root (network namespaces) and the built test guest.

use std::time::{Duration, Instant};

use ferry_e2e::{guest_spec_with, heartbeats, Cluster};
use ferry_test_support::console;
use ferry_test_support::guest::ProbeConfig;
use ferry_test_support::invariants::check_g1;
use ferry_test_support::memory_oracle;
use ferry_test_support::netns::{Rig, Shape};
use serde_json::Value;

const VM: &str = "pc";

fn busy() -> ProbeConfig {
    ProbeConfig {
        mem_mib: 48,
        mem_rate: 0,
        ..ProbeConfig::default()
    }
}

fn report(cluster: &Cluster, id: &str) -> Value {
    cluster
        .ferry_ok(&["migration", "show", id, "-o", "json"])
        .json()
}

#[test]
fn a_link_cut_during_postcopy_is_recovered_and_the_guest_survives() {
    let cluster = Cluster::up_netns(2);
    let rig = Rig::open(cluster.dir()).unwrap_or_else(|e| panic!("{e}"));
    let spec = cluster.write_spec("pc.toml", &guest_spec_with(VM, "shared", &busy()));
    cluster.ferry_ok(&[
        "vm",
        "create",
        "-f",
        spec.to_str().expect("UTF-8"),
        "--host",
        "host1",
        "--start",
    ]);
    cluster.wait_for("a memory pass", Duration::from_secs(120), || {
        console::last_mem_pass(cluster.console_log("host1", VM).as_bytes()).map(|_| ())
    });
    let uuid = cluster.vm_uuid(VM);
    let heartbeat_before = heartbeats(&cluster.console_log("host1", VM))
        .last()
        .copied()
        .unwrap_or(0);

    rig.shape("host1", &Shape::mbit(40))
        .unwrap_or_else(|e| panic!("{e}"));
    let started = cluster.ferry_ok(&[
        "migrate",
        VM,
        "--to",
        "host2",
        "--postcopy",
        "always",
        "-o",
        "json",
    ]);
    let id = started.json()["id"].as_str().expect("id").to_string();

    // Wait for post-copy: the guest now runs on host2, pages still come.
    cluster.wait_for("post-copy to run", Duration::from_secs(180), || {
        let r = report(&cluster, &id);
        assert!(
            matches!(r["status"].as_str(), Some("running")),
            "the migration ended before post-copy: {r:#}\n{}",
            cluster.logs()
        );
        (r["phase"] == "postcopy").then_some(())
    });
    let cut_at = Instant::now();
    rig.cut("host1").unwrap_or_else(|e| panic!("{e}"));
    // The controller is on host1: unreachable from here while cut.
    std::thread::sleep(Duration::from_secs(6));
    rig.restore("host1").unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "link cut for {:.1} s during post-copy",
        cut_at.elapsed().as_secs_f64()
    );
    let done = cluster.wait_for("the migration to end", Duration::from_secs(300), || {
        let r = report(&cluster, &id);
        (!matches!(r["status"].as_str(), Some("pending" | "running"))).then_some(r)
    });
    assert_eq!(done["status"], "completed", "{done:#}\n{}", cluster.logs());
    assert!(
        done["escalations"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["action"] == "post-copy")),
        "post-copy was used: {done:#}"
    );
    let log = cluster.logs();
    assert!(
        log.contains("post-copy reconnected after a broken link"),
        "the cut was noticed and recovered: {done:#}\n{log}"
    );
    rig.unshape("host1").unwrap_or_else(|e| panic!("{e}"));

    // The guest runs once, on host2, whole.
    let info = cluster.vm(VM);
    assert_eq!(info["host"], "host2", "{info}");
    assert_eq!(info["state"], "running", "{info}");
    let g1 = check_g1(&uuid).unwrap_or_else(|v| panic!("G1: {v}"));
    assert_eq!(g1.running(), 1, "{g1:?}");
    cluster.wait_for("the heartbeat on host2", Duration::from_secs(30), || {
        (heartbeats(&cluster.console_log("host2", VM))
            .last()
            .copied()
            .unwrap_or(0)
            > heartbeat_before)
            .then_some(())
    });
    let pid = info["pid"].as_u64().expect("pid") as u32;
    let probe = busy();
    cluster.ferry_ok(&["vm", "pause", VM]);
    let dump = memory_oracle::read_guest_memory(pid, probe.mem_base(), probe.mem_len() as usize)
        .expect("read guest memory");
    memory_oracle::verify_dump(&dump, probe.mem_pages())
        .unwrap_or_else(|e| panic!("memory oracle after post-copy recovery: {e}"));
    cluster.ferry_ok(&["vm", "resume", VM]);
    let failures = console::oracle_failures(cluster.console_log("host2", VM).as_bytes());
    assert!(
        failures.is_empty(),
        "the probe saw corruption: {failures:?}"
    );
    cluster
        .check_g3()
        .unwrap_or_else(|v| panic!("G3: {v}\n{}", cluster.logs()));
    assert!(
        !cluster
            .host_dir("host1")
            .join("state/vms")
            .join(VM)
            .exists(),
        "nothing of the VM is left on host1"
    );
    cluster.ferry_ok(&["vm", "stop", VM, "--force"]);
    cluster.ferry_ok(&["vm", "delete", VM]);
    cluster.down_purge();
}

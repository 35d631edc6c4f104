//! What is migrated and what both migrators share: the scenarios, the
//! guest, the clock, the rig, and the measurement around one migration.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ferry_core::network::NetworkDef;
use ferry_core::spec::VmSpec;
use ferry_test_support::guest::{ProbeConfig, TestGuest};
use ferry_test_support::netns::Rig;

use crate::report::RunResult;
use crate::serial::{Arrival, Clock, ProbeLine, SerialTap};
use crate::stats;

/// Guest RAM (MiB).
pub const RAM_MIB: u64 = 512;
/// Heartbeat period (ms).
pub const HB_MS: u64 = 10;
/// How long the guest runs after `probe-ready` before it is migrated, so
/// that its dirtying is steady; also the window of the baseline gap.
pub const SETTLE: Duration = Duration::from_secs(3);
/// How long after the end of a migration heartbeats are still collected.
pub const AFTER: Duration = Duration::from_millis(1500);
/// Boot bound (TCG, two guests' worth of CPU on two cores).
pub const BOOT: Duration = Duration::from_secs(120);
/// How long the guest may take, after `probe-ready`, to print `probe-net`
/// (the probe waits up to 10 s for `eth0`).
pub const NET_READY: Duration = Duration::from_secs(30);

/// The cluster network `ferry local up --netns` defines: bridge
/// [`LAN_BRIDGE`] in every host namespace, uplinked to the guest LAN
/// segment the client namespace is on.
pub const NETWORK: &str = "demo-lan";
pub const LAN_BRIDGE: &str = "ferrylan0";
/// The guest's address on the LAN (`ferry.ip`). One VM runs at a time, so
/// every run uses the same one.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const GUEST_PREFIX: u8 = 15;
/// The guest's echo service (`ferry.echo_port`).
pub const ECHO_PORT: u16 = 7000;

/// `demo-lan` as the agent needs it to create a VM with a NIC on it.
pub fn network_def() -> NetworkDef {
    NetworkDef {
        name: NETWORK.to_string(),
        bridge: LAN_BRIDGE.to_string(),
        vlan: None,
    }
}

/// The guest's echo service, as the client namespace reaches it.
pub fn echo_address() -> SocketAddr {
    SocketAddr::from((GUEST_IP, ECHO_PORT))
}

/// A NIC on [`NETWORK`] for Ferry's guest.
#[derive(Debug, Clone)]
pub struct GuestNic {
    /// Fresh for every run, so that no bridge or neighbour table still
    /// points at the previous run's guest (which ended on host2).
    pub mac: String,
}

impl GuestNic {
    pub fn fresh() -> GuestNic {
        GuestNic {
            mac: ferry_core::spec::generate_mac(),
        }
    }

    /// What the test guest needs on its command line to configure `eth0`
    /// and start the echo service.
    pub fn cmdline(&self) -> String {
        format!("ferry.ip={GUEST_IP}/{GUEST_PREFIX} ferry.echo_port={ECHO_PORT}")
    }
}

/// One guest workload.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub description: String,
    /// `ferry.mem_rate` (MiB/s; the probe's minimum is 1, 0 would mean "as
    /// fast as possible").
    pub mem_rate: u64,
}

impl Scenario {
    /// The three scenarios for a link of `goodput` bytes/s.
    pub fn for_link(goodput: f64) -> Vec<Scenario> {
        let link_mib = stats::mib(goodput);
        let half = ((link_mib / 2.0).round() as u64).max(2);
        let above = (link_mib * 1.5).round() as u64;
        vec![
            Scenario {
                name: "idle",
                description: "working set written once, then dirtied at the probe's minimum rate"
                    .to_string(),
                mem_rate: 1,
            },
            Scenario {
                name: "half",
                description: format!(
                    "dirty rate about half the link's goodput ({link_mib:.1} MiB/s)"
                ),
                mem_rate: half,
            },
            Scenario {
                name: "above",
                description: format!("dirty rate 1.5 × the link's goodput ({link_mib:.1} MiB/s)"),
                mem_rate: above,
            },
        ]
    }

    pub fn probe(&self, working_set_mib: u64) -> ProbeConfig {
        ProbeConfig {
            ram_mib: RAM_MIB,
            // The working set plus 64 MiB above it for the firmware's tables.
            reserved_mib: working_set_mib + 64,
            mem_mib: working_set_mib,
            mem_rate: self.mem_rate,
            hb_ms: HB_MS,
            disk: None,
            disk_optional: false,
            disk_rate: 0,
            quiet: true,
        }
    }

    /// The VM both migrators run: no disk (the comparison is about memory),
    /// direct kernel boot, serial console. With `nic` (Ferry's runs): one
    /// virtio NIC on [`NETWORK`] and the echo service on the guest's
    /// command line; without (the plain QEMU baseline): no NIC.
    pub fn spec(
        &self,
        guest: &TestGuest,
        vm: &str,
        working_set_mib: u64,
        nic: Option<&GuestNic>,
    ) -> anyhow::Result<VmSpec> {
        let mut cmdline = self.probe(working_set_mib).kernel_cmdline();
        if let Some(nic) = nic {
            cmdline.push(' ');
            cmdline.push_str(&nic.cmdline());
        }
        let mut text = format!(
            r#"name = "{vm}"
vcpus = 1
memory = "{RAM_MIB}MiB"

[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "{cmdline}"
"#,
            kernel = guest.kernel.display(),
            initrd = guest.initrd.display(),
        );
        if let Some(nic) = nic {
            text.push_str(&format!(
                r#"
[[nics]]
id = "net0"
model = "virtio"
mac = "{mac}"
network = "{NETWORK}"
"#,
                mac = nic.mac
            ));
        }
        VmSpec::from_toml_str(&text, &guest.dir).context("the benchmark's VM spec is invalid")
    }
}

/// What every run needs.
pub struct Bench {
    pub clock: Clock,
    pub rig: Rig,
    pub guest: TestGuest,
    /// Folder for the plain QEMU runs' sockets and logs.
    pub work: PathBuf,
    pub qemu: PathBuf,
    pub accel: String,
    pub working_set_mib: u64,
    pub bound: Duration,
    /// Mean measured goodput (bytes/s), for the floor.
    pub goodput: f64,
}

impl Bench {
    /// Bytes host1 has sent towards the bridge so far.
    pub fn wire_bytes(&self) -> anyhow::Result<u64> {
        let veth = &self.rig.host("host1")?.veth_bridge;
        let path = format!("/sys/class/net/{veth}/statistics/rx_bytes");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        text.trim()
            .parse()
            .with_context(|| format!("{path} holds no number"))
    }

    /// Waits for `probe-ready` and then [`SETTLE`] of heartbeats.
    pub async fn wait_steady(&self, tap: &SerialTap, what: &str) -> anyhow::Result<()> {
        let ready = tap
            .wait_until(BOOT, |a| a.iter().any(|x| x.line == ProbeLine::Ready))
            .await;
        anyhow::ensure!(
            ready,
            "{what}: no `probe-ready` on the console within {BOOT:?}"
        );
        tokio::time::sleep(SETTLE).await;
        let beating = tap
            .wait_until(Duration::from_secs(10), |a| {
                a.iter().any(|x| matches!(x.line, ProbeLine::Heartbeat(_)))
            })
            .await;
        anyhow::ensure!(beating, "{what}: no heartbeat on the console");
        Ok(())
    }

    /// Waits for `probe-net` (the echo service listens); an error if the
    /// guest printed `probe-error net:` or nothing within [`BOOT`] +
    /// [`NET_READY`].
    pub async fn wait_net(&self, tap: &SerialTap, what: &str) -> anyhow::Result<()> {
        let settled = tap
            .wait_until(BOOT + NET_READY, |a| {
                a.iter()
                    .any(|x| matches!(x.line, ProbeLine::NetReady | ProbeLine::NetError))
            })
            .await;
        let arrivals = tap.arrivals();
        anyhow::ensure!(
            !arrivals.iter().any(|x| x.line == ProbeLine::NetError),
            "{what}: the guest could not set up its network (`probe-error net:` on the console)"
        );
        anyhow::ensure!(
            settled,
            "{what}: no `probe-net` on the console within {:?}",
            BOOT + NET_READY
        );
        Ok(())
    }
}

/// The guest-side figures of one migration, from both consoles.
pub struct Observed {
    pub downtime_ms: Option<f64>,
    pub baseline_ms: Option<f64>,
    pub oracle_failures: u64,
    pub notes: Vec<String>,
}

/// Analyses the consoles of a migration that ran from `start_ms` to
/// `end_ms`.
pub fn observe(source: &SerialTap, dest: &SerialTap, start_ms: f64, end_ms: f64) -> Observed {
    let src = source.arrivals();
    let dst = dest.arrivals();
    let merged = stats::merge_heartbeats(&[&src, &dst]);
    let window_end = end_ms + AFTER.as_secs_f64() * 1000.0;
    let gap = stats::longest_gap(&merged, start_ms, window_end);
    let baseline = stats::longest_gap(&merged, start_ms - SETTLE.as_secs_f64() * 1000.0, start_ms);
    let mut notes = Vec::new();
    let oracle_failures = count_failures(&src) + count_failures(&dst);
    if oracle_failures > 0 {
        notes.push(format!(
            "{oracle_failures} memory-oracle failure(s) on the console"
        ));
    }
    // The destination's console must have been attached before it resumed,
    // or its first heartbeats were lost and the gap is only an upper bound.
    let dest_ran = dst
        .iter()
        .any(|a| matches!(a.line, ProbeLine::Heartbeat(_)));
    if let (true, Some(g)) = (dest_ran, gap) {
        let pause_start = g.ended_at_ms - g.ms;
        match dest.connected_at_ms() {
            Some(connected) if connected <= pause_start => {}
            Some(connected) => notes.push(format!(
                "destination console attached {:.0} ms into the pause: the downtime is an upper bound",
                connected - pause_start
            )),
            None => notes.push("destination console never attached".to_string()),
        }
    }
    Observed {
        downtime_ms: gap.map(|g| g.ms),
        baseline_ms: baseline.map(|g| g.ms),
        oracle_failures,
        notes,
    }
}

fn count_failures(arrivals: &[Arrival]) -> u64 {
    arrivals
        .iter()
        .filter(|a| a.line == ProbeLine::OracleFail)
        .count() as u64
}

/// A result with the measurement fields filled from `observed`.
pub fn result(
    scenario: &Scenario,
    migrator: &str,
    observed: Observed,
    nonzero_ram_bytes: u64,
    goodput: f64,
) -> RunResult {
    RunResult {
        scenario: scenario.name.to_string(),
        migrator: migrator.to_string(),
        dirty_rate_target_mib_s: scenario.mem_rate,
        dirty_rate_measured_mib_s: None,
        converged: false,
        outcome: String::new(),
        total_s: 0.0,
        stream_s: None,
        guest_downtime_ms: observed.downtime_ms,
        baseline_gap_ms: observed.baseline_ms,
        qemu_downtime_ms: None,
        stream_bytes: 0,
        wire_bytes: 0,
        passes: 0,
        nonzero_ram_bytes,
        floor_s: stats::floor_secs(nonzero_ram_bytes, goodput),
        oracle_failures: observed.oracle_failures,
        network_downtime_ms: None,
        network_probe_clean: None,
        network_baseline_gap_ms: None,
        network_probe: None,
        strategy: String::new(),
        notes: observed.notes,
    }
}

//! Ferry's side: the same guest defined on host1 of the namespace cluster
//! and moved to host2 through the controller's API with the default
//! strategy (only the deadline is set, to the benchmark's bound). The guest
//! has a NIC on the cluster network `demo-lan`, and a TCP echo probe in the
//! cluster's client namespace measures what a client of the guest sees of
//! the migration (the network-observed downtime).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_api::{
    Client, CreateVmRequest, DeleteVmQuery, MigrateAnswer, MigrateRequest, MigrationObservation,
    MigrationReport, PostcopyPolicy, StopVmRequest, StorageMode,
};
use ferry_netprobe::{EchoConfig, EchoProbe, EchoReport};

use crate::report::RunResult;
use crate::scenario::{self, Bench, GuestNic, Scenario, AFTER, GUEST_IP, RAM_MIB};
use crate::serial::SerialTap;
use crate::stats;

/// Clients for the cluster: host1 (which also runs the controller) and
/// host2.
pub struct Api {
    pub host1: Client,
    pub host2: Client,
    /// The cluster folder (for the VMs' serial sockets).
    pub dir: PathBuf,
}

impl Api {
    fn serial_socket(&self, host: &str, vm: &str) -> PathBuf {
        self.dir
            .join("hosts")
            .join(host)
            .join("state/vms")
            .join(vm)
            .join("serial.sock")
    }

    /// Stops and deletes the VM wherever it is (a failed run must not leave
    /// a guest eating the CPU of the next one).
    pub async fn remove(&self, vm: &str) {
        for client in [&self.host2, &self.host1] {
            if client.get_vm(vm).await.is_err() {
                continue;
            }
            let stop = StopVmRequest {
                force: true,
                timeout_secs: None,
            };
            let _ = client.stop_vm(vm, &stop).await;
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                match client.get_vm(vm).await {
                    Ok(info) if info.state.has_process() => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    _ => break,
                }
            }
            let _ = client
                .delete_vm(
                    vm,
                    &DeleteVmQuery {
                        keep_disks: false,
                        all_disks: false,
                    },
                )
                .await;
        }
    }
}

/// Migrates the scenario's guest host1 → host2 with Ferry.
pub async fn run(bench: &Bench, api: &Api, scenario: &Scenario) -> anyhow::Result<RunResult> {
    let vm = format!("ferry-{}", scenario.name);
    let nic = GuestNic::fresh();
    let spec = scenario.spec(&bench.guest, &vm, bench.working_set_mib, Some(&nic))?;
    api.remove(&vm).await;
    let src_tap = SerialTap::spawn(
        api.serial_socket("host1", &vm),
        bench.clock,
        Duration::from_secs(60),
    );
    let created = api
        .host1
        .create_vm(&CreateVmRequest {
            spec,
            start: true,
            // The agent is asked directly, so it needs the definition the
            // controller would otherwise fill in.
            networks: vec![scenario::network_def()],
            arriving_disks: Default::default(),
        })
        .await
        .context("cannot create the VM on host1")?;
    let outcome = migrate(bench, api, scenario, &vm, created.pid, &src_tap).await;
    api.remove(&vm).await;
    outcome
}

async fn migrate(
    bench: &Bench,
    api: &Api,
    scenario: &Scenario,
    vm: &str,
    pid: Option<u32>,
    src_tap: &SerialTap,
) -> anyhow::Result<RunResult> {
    // The probe connects once the guest's echo service listens, and runs
    // through the settle, so that its baseline sees the same load.
    let mut net_notes = Vec::new();
    let probe = match bench.wait_net(src_tap, &format!("{vm} on host1")).await {
        Ok(()) => start_probe(bench).await,
        Err(e) => Err(e),
    };
    let (probe, probe_connected_ms) = match probe {
        Ok(probe) => (Some(probe), bench.clock.ms()),
        Err(e) => {
            eprintln!("  network probe not run: {e:#}");
            net_notes.push(format!("network probe not run: {e:#}"));
            (None, 0.0)
        }
    };
    bench
        .wait_steady(src_tap, &format!("{vm} on host1"))
        .await?;
    let pid = match pid {
        Some(pid) => pid,
        None => api
            .host1
            .get_vm(vm)
            .await?
            .pid
            .context("Ferry reports no QEMU pid for the VM")?,
    };
    let nonzero = stats::guest_nonzero_ram(pid, RAM_MIB << 20)
        .context("cannot read the source's guest RAM")?;
    // The destination's console appears when host2's agent starts its QEMU.
    let dst_tap = SerialTap::spawn(
        api.serial_socket("host2", vm),
        bench.clock,
        bench.bound + Duration::from_secs(30),
    );

    let net_baseline_ms = probe.as_ref().map(|p| p.snapshot().max_gap_ms);
    let wire_before = bench.wire_bytes()?;
    let start_ms = bench.clock.ms();
    let request = MigrateRequest {
        vm: vm.to_string(),
        to: "host2".to_string(),
        storage: StorageMode::Auto,
        max_downtime_ms: None,
        bandwidth_bytes_per_sec: None,
        postcopy: PostcopyPolicy::Never,
        deadline_secs: Some(bench.bound.as_secs()),
        dry_run: false,
        offline: false,
        // The benchmark measures the migration itself, not a backup first.
        backup: Some(false),
    };
    let id = match api
        .host1
        .migrate(&request)
        .await
        .context("POST /v1/migrations")?
    {
        MigrateAnswer::Started(report) => report.id.to_string(),
        MigrateAnswer::DryRun(_) => bail!("the controller answered a dry run"),
    };
    let hard_stop = Instant::now() + bench.bound + Duration::from_secs(60);
    // Auto-converge's throttle, as the source agent sees it (the report
    // does not keep it).
    let mut max_throttle: Option<u64> = None;
    let report: MigrationReport = loop {
        let report = api.host1.get_migration(&id).await?;
        if !report.status.is_active() {
            break report;
        }
        if let Ok(status) = api.host1.outgoing_status(vm).await {
            max_throttle = max_throttle.max(status.cpu_throttle_percent);
        }
        if Instant::now() > hard_stop {
            let _ = api.host1.cancel_migration(&id).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let end_ms = bench.clock.ms();
    let wire = bench.wire_bytes()?.saturating_sub(wire_before);
    tokio::time::sleep(AFTER).await;
    let seen = match probe {
        // stop() drains for up to 2 s: off the async threads.
        Some(probe) => Some(
            tokio::task::spawn_blocking(move || probe.stop())
                .await
                .context("the network probe's thread failed")?,
        ),
        None => None,
    };

    let observed = scenario::observe(src_tap, &dst_tap, start_ms, end_ms);
    let mut result = scenario::result(scenario, "ferry", observed, nonzero, bench.goodput);
    result.dirty_rate_measured_mib_s = report
        .prediction
        .as_ref()
        .map(|p| stats::mib(p.dirty_rate_bytes_per_sec as f64));
    result.converged = report.status == ferry_api::MigrationStatus::Completed;
    result.outcome = match &report.error {
        None => report.status.to_string(),
        Some(error) => format!("{}: {error}", report.status),
    };
    result.total_s = (end_ms - start_ms) / 1000.0;
    result.notes.extend(net_notes);
    if let Some(seen) = seen {
        let timing = NetTiming {
            probe_connected_ms,
            start_ms,
            end_ms,
            baseline_ms: net_baseline_ms,
        };
        record_network(api, &id, seen, timing, &mut result).await;
    }
    let stream_ms: u64 = report
        .phases
        .iter()
        .filter(|p| p.phase == "memory" || p.phase == "switchover")
        .map(|p| p.duration_ms)
        .sum();
    result.stream_s = (stream_ms > 0).then_some(stream_ms as f64 / 1000.0);
    result.qemu_downtime_ms = report.downtime_ms;
    result.stream_bytes = report.transferred_bytes;
    result.wire_bytes = wire;
    result.passes = report.passes;
    if let Some(paused) = report.paused_ms {
        result.notes.push(format!(
            "paused {paused} ms (source STOP to destination RESUME)"
        ));
    }
    for escalation in &report.escalations {
        result.notes.push(format!(
            "at {:.1} s: {} ({})",
            escalation.at_ms as f64 / 1000.0,
            escalation.action,
            escalation.reason
        ));
    }
    match max_throttle {
        Some(percent) if percent > 0 => result.notes.push(format!(
            "auto-converge throttled the guest up to {percent} %"
        )),
        _ => result
            .notes
            .push("auto-converge never throttled the guest".to_string()),
    }
    if let Some(progress) = &report.progress {
        if !result.converged {
            result.notes.push(format!(
                "at the end: {} MiB remaining, dirty rate {} MiB/s, throughput {} MiB/s",
                progress.ram_remaining_bytes >> 20,
                progress.dirty_rate_bytes_per_sec >> 20,
                progress.throughput_bytes_per_sec >> 20
            ));
        }
    }
    result.strategy = format!(
        "capabilities {}; downtime-limit {} ms (up to {} ms); max-bandwidth {} MiB/s; \
         post-copy {:?}; TLS {}",
        report.strategy.capabilities.join(", "),
        report.strategy.downtime_limit_ms,
        report.strategy.max_downtime_ms,
        report.strategy.max_bandwidth_bytes_per_sec >> 20,
        report.strategy.postcopy,
        if report.strategy.tls { "on" } else { "off" }
    );
    if let Some(accel) = &report.accel {
        if *accel != bench.accel {
            result.notes.push(format!(
                "Ferry ran the guest with {accel}, the QEMU baseline with {}",
                bench.accel
            ));
        }
    }
    Ok(result)
}

/// Connects the echo probe from the cluster's client namespace to the
/// guest's echo service (blocking until connected, so on the blocking
/// pool).
async fn start_probe(bench: &Bench) -> anyhow::Result<EchoProbe> {
    let netns = bench.rig.client_netns();
    // The previous run's guest had the same address and another MAC, and
    // ended on host2: forget its neighbour entry rather than wait for it to
    // go stale.
    let _ = Command::new("ip")
        .args(["-n", &netns, "neigh", "flush", "to", &GUEST_IP.to_string()])
        .output();
    let mut config = EchoConfig::new(scenario::echo_address());
    config.netns = Some(PathBuf::from("/run/netns").join(&netns));
    config.connect_timeout = Duration::from_secs(20);
    let address = config.address;
    tokio::task::spawn_blocking(move || EchoProbe::start(config))
        .await
        .context("the network probe's thread failed")?
        .with_context(|| format!("cannot connect the network probe to {address} from {netns}"))
}

/// When the probe and the migration ran, on the benchmark's clock (ms).
struct NetTiming {
    probe_connected_ms: f64,
    start_ms: f64,
    end_ms: f64,
    /// The probe's longest gap before the migration request.
    baseline_ms: Option<f64>,
}

/// Hands the probe's report to the controller (which stores it in the
/// migration report as `network_downtime_ms`) and records it in `result`.
async fn record_network(
    api: &Api,
    id: &str,
    seen: EchoReport,
    timing: NetTiming,
    result: &mut RunResult,
) {
    let observation = MigrationObservation {
        network_probe: seen.clone(),
    };
    result.network_downtime_ms = match api.host1.observe_migration(id, &observation).await {
        Ok(stored) if stored.network_downtime_ms.is_some() => stored.network_downtime_ms,
        outcome => {
            let why = match outcome {
                Ok(_) => "it kept no network_downtime_ms".to_string(),
                Err(e) => format!("{:#}", anyhow::Error::new(e)),
            };
            result.notes.push(format!(
                "the controller did not store the network probe ({why}); the probe's own figure \
                 is shown"
            ));
            Some(seen.max_gap_ms.max(0.0).ceil() as u64)
        }
    };
    result.network_probe_clean = Some(seen.is_clean());
    result.network_baseline_gap_ms = timing.baseline_ms;
    if !seen.is_clean() {
        result
            .notes
            .push(format!("network probe not clean: {seen}"));
    }
    // Where the longest gap fell, relative to the migration request.
    let gap_at_ms = timing.probe_connected_ms + seen.max_gap_started_ms;
    if gap_at_ms < timing.start_ms {
        result.notes.push(format!(
            "the network probe's longest gap ({:.0} ms) came {:.1} s before the migration \
             request: the migration's own gap was shorter",
            seen.max_gap_ms,
            (timing.start_ms - gap_at_ms) / 1000.0
        ));
    } else {
        result.notes.push(format!(
            "longest echo gap {:.0} ms, from {:.1} s into the migration ({:.1} s long), \
             {} echoes",
            seen.max_gap_ms,
            (gap_at_ms - timing.start_ms) / 1000.0,
            (timing.end_ms - timing.start_ms) / 1000.0,
            seen.messages_echoed
        ));
    }
    result.network_probe = Some(seen);
}

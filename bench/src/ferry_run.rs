//! Ferry's side: the same guest defined on host1 of the namespace cluster
//! and moved to host2 through the controller's API with the default
//! strategy (only the deadline is set, to the benchmark's bound).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_api::{
    Client, CreateVmRequest, DeleteVmQuery, MigrateAnswer, MigrateRequest, MigrationReport,
    PostcopyPolicy, StopVmRequest, StorageMode,
};

use crate::report::RunResult;
use crate::scenario::{self, Bench, Scenario, AFTER, RAM_MIB};
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
                .delete_vm(vm, &DeleteVmQuery { keep_disks: false })
                .await;
        }
    }
}

/// Migrates the scenario's guest host1 → host2 with Ferry.
pub async fn run(bench: &Bench, api: &Api, scenario: &Scenario) -> anyhow::Result<RunResult> {
    let vm = format!("ferry-{}", scenario.name);
    let spec = scenario.spec(&bench.guest, &vm, bench.working_set_mib)?;
    api.remove(&vm).await;
    let src_tap = SerialTap::spawn(
        api.serial_socket("host1", &vm),
        bench.clock,
        Duration::from_secs(60),
    );
    let created = api
        .host1
        .create_vm(&CreateVmRequest { spec, start: true })
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

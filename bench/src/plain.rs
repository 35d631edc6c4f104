//! The baseline: two plain QEMUs, one in host1's namespace and one in
//! host2's, migrating with QEMU's defaults — what `virsh migrate --live`
//! gets: pre-copy only, `downtime-limit` 300 ms, no auto-converge,
//! `max-bandwidth` 128 MiB/s, no TLS. The command lines come from Ferry's
//! own builder (`ferry_qemu::cmdline`) for the same spec, so both migrators
//! move an identical machine; nothing else of Ferry is involved.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_qemu::cmdline::LaunchContext;
use ferry_qemu::migration::{self, MigrationAddress, MigrationStatus};
use ferry_qemu::nbd::InetAddress;
use ferry_qemu::process::QemuProcess;
use ferry_qemu::qmp::Qmp;
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::report::RunResult;
use crate::scenario::{self, Bench, Scenario, AFTER, RAM_MIB};
use crate::serial::SerialTap;
use crate::stats;

/// A QEMU this module started; killed on drop whatever happened.
struct Qemu {
    process: QemuProcess,
    qmp: Qmp,
    serial: PathBuf,
}

impl Qemu {
    async fn launch(
        bench: &Bench,
        spec: &ferry_core::spec::VmSpec,
        dir: &Path,
        host: &str,
        incoming: Option<&str>,
    ) -> anyhow::Result<Qemu> {
        std::fs::create_dir_all(dir)?;
        let context = LaunchContext {
            qmp_socket: dir.join("qmp.sock"),
            serial_socket: dir.join("serial.sock"),
            serial_log: dir.join("console.log"),
            pidfile: dir.join("qemu.pid"),
            accel: bench.accel.clone(),
            datastores: Default::default(),
            incoming: incoming.map(str::to_string),
            start_paused: false,
            daemonize: true,
        };
        let args = ferry_qemu::cmdline::build(spec, &context)?;
        let netns = bench.rig.host(host)?.netns.clone();
        let mut full: Vec<String> = vec!["netns".into(), "exec".into(), netns];
        full.push(bench.qemu.display().to_string());
        full.extend(args);
        let process = ferry_qemu::process::launch(Path::new("ip"), &full, &context.pidfile)
            .await
            .with_context(|| format!("cannot start QEMU in {host}'s namespace"))?;
        let qmp = match Qmp::connect_with_retry(&context.qmp_socket, Duration::from_secs(10)).await
        {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = process.kill(Signal::SIGKILL);
                return Err(e).context("cannot connect to QMP");
            }
        };
        Ok(Qemu {
            process,
            qmp,
            serial: context.serial_socket,
        })
    }

    async fn quit(&self) {
        let _ = self.qmp.execute("quit", Value::Null).await;
        if self
            .process
            .wait_exit(Duration::from_secs(5))
            .await
            .is_err()
        {
            let _ = self.process.kill(Signal::SIGKILL);
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.process.kill(Signal::SIGKILL);
    }
}

/// Migrates the scenario's guest host1 → host2 with QEMU's defaults.
pub async fn run(bench: &Bench, scenario: &Scenario) -> anyhow::Result<RunResult> {
    let vm = format!("qemu-{}", scenario.name);
    let spec = scenario.spec(&bench.guest, &vm, bench.working_set_mib, None)?;
    let dir = bench.work.join(&vm);
    let src = Qemu::launch(bench, &spec, &dir.join("src"), "host1", None).await?;
    let src_tap = SerialTap::spawn(src.serial.clone(), bench.clock, Duration::from_secs(10));
    bench
        .wait_steady(&src_tap, &format!("{vm} on host1"))
        .await?;

    // What the defaults are, as this QEMU states them.
    let params = migration::query_parameters(&src.qmp).await?;
    let dirty = migration::calc_dirty_rate(&src.qmp, Duration::from_secs(1))
        .await
        .ok()
        .map(|d| d.mib_per_sec as f64);
    let nonzero = stats::guest_nonzero_ram(src.process.pid, RAM_MIB << 20)
        .context("cannot read the source's guest RAM")?;

    // From here on the user of `virsh migrate` waits.
    let launched_ms = bench.clock.ms();
    let dst = Qemu::launch(bench, &spec, &dir.join("dst"), "host2", Some("defer")).await?;
    let dst_tap = SerialTap::spawn(dst.serial.clone(), bench.clock, Duration::from_secs(10));
    let listen = migration::migrate_incoming(
        &dst.qmp,
        &MigrationAddress::Tcp(InetAddress::new(bench.rig.address("host2")?.to_string(), 0)),
        true,
    )
    .await
    .context("migrate-incoming")?;
    // Let the tap attach before anything can resume.
    tap_attached(&dst_tap).await;

    let wire_before = bench.wire_bytes()?;
    let start_ms = bench.clock.ms();
    let started = Instant::now();
    migration::migrate(&src.qmp, &MigrationAddress::Tcp(listen))
        .await
        .context("migrate")?;
    let mut cancelled = false;
    // A cancelled migration's `query-migrate` has no statistics left: the
    // last reply before the cancel holds them.
    let mut last_active = None;
    let info = loop {
        let info = migration::query_migrate(&src.qmp).await?;
        match info.status {
            MigrationStatus::Completed => break info,
            MigrationStatus::Failed => bail!(
                "plain QEMU migration failed: {}",
                info.error_desc.unwrap_or_default()
            ),
            MigrationStatus::Cancelled => break last_active.unwrap_or(info),
            MigrationStatus::Cancelling => {}
            _ if started.elapsed() > bench.bound && !cancelled => {
                last_active = Some(info);
                migration::migrate_cancel(&src.qmp).await?;
                cancelled = true;
            }
            _ => {
                if !cancelled {
                    last_active = Some(info);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let completed = info.status == MigrationStatus::Completed;
    let end_ms = bench.clock.ms();
    let wire = bench.wire_bytes()?.saturating_sub(wire_before);
    tokio::time::sleep(AFTER).await;

    let observed = scenario::observe(&src_tap, &dst_tap, start_ms, end_ms);
    let mut result = scenario::result(scenario, "qemu-defaults", observed, nonzero, bench.goodput);
    let ram = info.ram.clone().unwrap_or_default();
    result.dirty_rate_measured_mib_s = dirty;
    result.converged = completed;
    result.outcome = if result.converged {
        "completed".to_string()
    } else {
        format!("cancelled after {} s", bench.bound.as_secs())
    };
    result.total_s = (end_ms - launched_ms) / 1000.0;
    result.stream_s = Some(
        info.total_time
            .map(|ms| ms as f64 / 1000.0)
            .unwrap_or((end_ms - start_ms) / 1000.0),
    );
    result.qemu_downtime_ms = info.downtime;
    result.stream_bytes = ram.transferred;
    result.wire_bytes = wire;
    result.passes = ram.dirty_sync_count;
    result.strategy = format!(
        "downtime-limit {} ms, max-bandwidth {} MiB/s, no capabilities, no TLS",
        params.downtime_limit,
        params.max_bandwidth >> 20
    );
    if !result.converged {
        result.notes.push(format!(
            "at the cancel: {} MiB still dirty, dirtied at {} MiB/s, sent at {:.0} Mbit/s; QEMU \
             expected a {} ms pause against its {} ms limit",
            ram.remaining >> 20,
            (ram.dirty_pages_rate * ram.page_size.max(4096)) >> 20,
            ram.mbps,
            info.expected_downtime.unwrap_or(0),
            params.downtime_limit
        ));
    }
    drop(src_tap);
    drop(dst_tap);
    src.quit().await;
    dst.quit().await;
    Ok(result)
}

/// Gives a tap a moment to connect (its socket exists once QEMU has
/// daemonized).
async fn tap_attached(tap: &SerialTap) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while tap.connected_at_ms().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

//! `ferry migration …`: list, show, watch and cancel the controller's
//! migrations; and the pieces `ferry migrate --wait` shares with them (the
//! progress display and the report).
//!
//! Everything shown comes from the controller's `MigrationReport`: the CLI
//! polls it and renders it, and never infers state of its own, so what
//! `watch` shows and what `show -o json` prints cannot disagree. The
//! renderers return strings so that their exact output is tested.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Subcommand;
use ferry_api::{ClientError, MigrationReport, MigrationStatus, PostcopyPolicy, StorageMode};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Connection;
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum MigrationCommand {
    /// List the controller's migrations, oldest first.
    List,
    /// Show one migration's report.
    Show { id: String },
    /// Follow a migration with a progress bar until it ends, then print its
    /// report; exits non-zero unless it completed. Ctrl-C stops watching, not
    /// the migration.
    Watch { id: String },
    /// Cancel a migration that has not switched over yet: the VM keeps
    /// running on its source. Prints the resulting report.
    Cancel { id: String },
}

/// How often the live display asks the controller.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often the display writes a plain line when stderr is not a terminal.
const PLAIN_INTERVAL: Duration = Duration::from_secs(5);
/// How long the controller may stay unreachable before watching gives up
/// (the migration itself goes on without us).
const UNREACHABLE_GIVE_UP: Duration = Duration::from_secs(30);

pub async fn run(
    command: MigrationCommand,
    conn: &Connection,
    format: Format,
) -> anyhow::Result<()> {
    let controller = conn.controller()?;
    match command {
        MigrationCommand::List => {
            let mut reports = controller
                .list_migrations()
                .await
                .context("cannot list migrations")?;
            reports.sort_by_key(|r| r.created_at_ms);
            if format == Format::Json {
                output::json(&reports)
            } else {
                print!("{}", render_list(&reports, unix_now_ms()));
                Ok(())
            }
        }
        MigrationCommand::Show { id } => {
            let report = controller
                .get_migration(&id)
                .await
                .with_context(|| format!("cannot show migration {id}"))?;
            print_report(&report, format)
        }
        MigrationCommand::Watch { id } => {
            let report = controller
                .get_migration(&id)
                .await
                .with_context(|| format!("cannot watch migration {id}"))?;
            wait_and_report(controller, report, format, None).await
        }
        MigrationCommand::Cancel { id } => {
            let report = controller
                .cancel_migration(&id)
                .await
                .with_context(|| format!("cannot cancel migration {id}"))?;
            print_report(&report, format)
        }
    }
}

/// Follows a migration until it ends, prints its final report, and fails
/// unless it completed (so that `ferry migrate --wait` and `ferry migration
/// watch` can gate a script).
pub async fn wait_and_report(
    controller: &ferry_api::Client,
    report: MigrationReport,
    format: Format,
    probe: Option<ferry_netprobe::EchoProbe>,
) -> anyhow::Result<()> {
    let mut report = follow(controller, report).await?;
    if let Some(probe) = probe {
        // stop() drains for up to 2 s: off the async thread.
        let seen = tokio::task::spawn_blocking(move || probe.stop())
            .await
            .context("the network probe's thread failed")?;
        let id = report.id.to_string();
        report = controller
            .observe_migration(
                &id,
                &ferry_api::MigrationObservation {
                    network_probe: seen,
                },
            )
            .await
            .with_context(|| format!("cannot add the network probe to migration {id}"))?;
    }
    print_report(&report, format)?;
    match report.status {
        MigrationStatus::Completed => Ok(()),
        status => bail!(
            "migration {} of {} {status}{}",
            report.id,
            report.vm,
            report
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
    }
}

/// Connects the `--net-probe` client (blocking until connected, so on the
/// blocking pool).
pub async fn start_net_probe(
    address: std::net::SocketAddr,
) -> anyhow::Result<ferry_netprobe::EchoProbe> {
    let config = ferry_netprobe::EchoConfig::new(address);
    tokio::task::spawn_blocking(move || ferry_netprobe::EchoProbe::start(config))
        .await
        .context("the network probe's thread failed")?
        .with_context(|| format!("cannot start the network probe against {address}"))
}

/// Polls the controller until the migration is no longer active, showing
/// its progress on stderr meanwhile. Transport errors are retried for a
/// while (a controller restart should not end a `--wait`); an answer that
/// is an error (the migration is gone, say) ends the watch at once.
async fn follow(
    controller: &ferry_api::Client,
    mut report: MigrationReport,
) -> anyhow::Result<MigrationReport> {
    if !report.status.is_active() {
        return Ok(report);
    }
    let id = report.id.to_string();
    let mut display = LiveDisplay::new(&report);
    display.update(&report);
    let mut unreachable_since: Option<Instant> = None;
    while report.status.is_active() {
        tokio::time::sleep(POLL_INTERVAL).await;
        match controller.get_migration(&id).await {
            Ok(next) => {
                report = next;
                unreachable_since = None;
                display.update(&report);
            }
            Err(error @ ClientError::Transport { .. }) => {
                // Said once per outage; the display keeps it until the
                // controller answers again.
                let since = match unreachable_since {
                    Some(since) => since,
                    None => {
                        display.note(&format!(
                            "controller unreachable, retrying for up to {}s: {}",
                            UNREACHABLE_GIVE_UP.as_secs(),
                            ferry_api::error_chain(&error)
                        ));
                        *unreachable_since.insert(Instant::now())
                    }
                };
                if since.elapsed() > UNREACHABLE_GIVE_UP {
                    display.abandon();
                    return Err(error).with_context(|| {
                        format!(
                            "lost the controller while watching migration {id} (it may still \
                             be running: `ferry migration show {id}`)"
                        )
                    });
                }
            }
            Err(error) => {
                display.abandon();
                return Err(error).with_context(|| format!("cannot follow migration {id}"));
            }
        }
    }
    display.finish();
    Ok(report)
}

/// The live view on stderr: an indicatif bar on a terminal, else a plain
/// line every few seconds (logs of a CI job stay readable).
enum LiveDisplay {
    Bar { bar: ProgressBar, route: String },
    Plain { last: Option<Instant> },
}

impl LiveDisplay {
    fn new(report: &MigrationReport) -> LiveDisplay {
        if !std::io::stderr().is_terminal() {
            return LiveDisplay::Plain { last: None };
        }
        let bar = ProgressBar::new(1);
        // The template is a constant: a failure here is a bug caught by the
        // tests, not something to handle at run time.
        let style = ProgressStyle::with_template(BAR_TEMPLATE)
            .expect("valid progress template")
            .progress_chars("=> ");
        bar.set_style(style);
        let route = format!("{} {} → {}", report.vm, report.source, report.destination);
        bar.set_prefix(route.clone());
        bar.set_message(report.phase.clone());
        bar.enable_steady_tick(Duration::from_millis(100));
        LiveDisplay::Bar { bar, route }
    }

    fn update(&mut self, report: &MigrationReport) {
        let elapsed = elapsed_ms(report, unix_now_ms());
        match self {
            LiveDisplay::Bar { bar, route } => {
                let (done, total) = report.progress.as_ref().map_or((0, 1), moved);
                bar.set_length(total.max(1));
                bar.set_position(done.min(total));
                let mut timing = duration_ms(elapsed);
                if let Some(ms) = report
                    .progress
                    .as_ref()
                    .and_then(|p| p.predicted_remaining_ms)
                {
                    let _ = write!(timing, ", ~{} left", duration_ms(ms));
                }
                bar.set_prefix(format!("{route}  {timing}"));
                bar.set_message(progress_details(report));
            }
            LiveDisplay::Plain { last } => {
                if last.is_none_or(|at| at.elapsed() >= PLAIN_INTERVAL) {
                    *last = Some(Instant::now());
                    eprintln!(
                        "migration {} {}: {}  {}",
                        report.id,
                        report.vm,
                        duration_ms(elapsed),
                        progress_line(report)
                    );
                }
            }
        }
    }

    fn note(&self, text: &str) {
        match self {
            LiveDisplay::Bar { bar, .. } => bar.set_message(text.to_string()),
            LiveDisplay::Plain { .. } => eprintln!("{text}"),
        }
    }

    /// Clears the bar: the report printed next says how it ended.
    fn finish(self) {
        if let LiveDisplay::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }

    /// Leaves the bar where it stopped, for the error printed next.
    fn abandon(self) {
        if let LiveDisplay::Bar { bar, .. } = self {
            bar.abandon();
        }
    }
}

/// Two lines, each fitted to the terminal (a wrapped line would break the
/// redraw): the route, the time and the bar; then the details.
const BAR_TEMPLATE: &str =
    "{spinner:.cyan} {prefix:.bold} [{wide_bar:.cyan/blue}] {percent:>3}%\n  {wide_msg}";

/// Bytes in place of the bytes to move: memory already sent (total minus
/// what remains dirty) plus the disk mirrors' progress. Memory can be sent
/// many times over, so "transferred" would overshoot; "remaining" goes back
/// up when the guest dirties pages faster than they leave, which is the
/// truth a user should see.
fn moved(progress: &ferry_api::Progress) -> (u64, u64) {
    let ram_done = progress
        .ram_total_bytes
        .saturating_sub(progress.ram_remaining_bytes);
    let done = ram_done.saturating_add(progress.disk_done_bytes);
    let total = progress
        .ram_total_bytes
        .saturating_add(progress.disk_total_bytes);
    (done, total)
}

/// One line of live progress: phase, memory, rates, disks, passes, and the
/// predicted time left.
pub fn progress_line(report: &MigrationReport) -> String {
    let details = progress_details(report);
    match report
        .progress
        .as_ref()
        .and_then(|p| p.predicted_remaining_ms)
    {
        Some(ms) => format!("{details} · done in ~{}", duration_ms(ms)),
        None => details,
    }
}

/// The progress line without the prediction, which the bar shows on its
/// first line (where it is not cut off by a narrow terminal).
fn progress_details(report: &MigrationReport) -> String {
    let Some(p) = &report.progress else {
        return report.phase.clone();
    };
    let phase = if p.phase.is_empty() {
        &report.phase
    } else {
        &p.phase
    };
    let mut parts = vec![phase.clone()];
    if p.ram_total_bytes > 0 {
        parts.push(format!(
            "RAM {} left of {}",
            output::bytes(p.ram_remaining_bytes),
            output::bytes(p.ram_total_bytes)
        ));
    } else if p.ram_transferred_bytes > 0 {
        parts.push(format!(
            "RAM {} sent",
            output::bytes(p.ram_transferred_bytes)
        ));
    }
    if p.disk_total_bytes > 0 {
        parts.push(format!(
            "disks {} / {}",
            output::bytes(p.disk_done_bytes),
            output::bytes(p.disk_total_bytes)
        ));
    }
    if report.kind == ferry_api::MigrationKind::Live {
        parts.push(format!("dirty {}", rate(p.dirty_rate_bytes_per_sec)));
        parts.push(format!("wire {}", rate(p.throughput_bytes_per_sec)));
        parts.push(format!(
            "{} pass{}",
            p.passes,
            if p.passes == 1 { "" } else { "es" }
        ));
    }
    parts.join(" · ")
}

fn print_report(report: &MigrationReport, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        output::json(report)
    } else {
        print!("{}", render_report(report));
        Ok(())
    }
}

/// The migration list for people.
pub fn render_list(reports: &[MigrationReport], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            let total = if r.status.is_active() {
                format!("{}…", duration_ms(elapsed_ms(r, now_ms)))
            } else {
                duration_ms(r.total_ms)
            };
            vec![
                r.id.to_string(),
                r.vm.clone(),
                r.source.clone(),
                r.destination.clone(),
                r.status.to_string(),
                r.phase.clone(),
                total,
                r.downtime_ms.map_or_else(|| "-".to_string(), duration_ms),
            ]
        })
        .collect();
    crate::output::render_table(
        &[
            "ID",
            "VM",
            "SOURCE",
            "DESTINATION",
            "STATUS",
            "PHASE",
            "TOTAL",
            "DOWNTIME",
        ],
        &rows,
    )
}

/// Width of the key column of `render_report`.
const KEY_WIDTH: usize = 14;

/// `key   value` at the report's top level.
fn field(out: &mut String, key: &str, value: &str) {
    if value.is_empty() {
        // A heading: no padding left dangling at the end of the line.
        let _ = writeln!(out, "{key}");
    } else {
        let _ = writeln!(out, "{key:<KEY_WIDTH$} {value}");
    }
}

/// `  key value`, indented under a heading, values aligned with the top
/// level's.
fn subfield(out: &mut String, key: &str, value: &str) {
    let _ = writeln!(out, "  {key:<w$} {value}", w = KEY_WIDTH - 2);
}

/// The whole report of one migration for people.
pub fn render_report(r: &MigrationReport) -> String {
    let mut out = String::new();
    field(&mut out, "migration", &r.id.to_string());
    field(&mut out, "kind", r.kind.as_str());
    field(&mut out, "vm", &r.vm);
    field(
        &mut out,
        "route",
        &format!("{} → {}", r.source, r.destination),
    );
    field(&mut out, "status", r.status.as_str());
    field(&mut out, "phase", &r.phase);
    field(&mut out, "accel", r.accel.as_deref().unwrap_or("-"));
    field(&mut out, "started", &timestamp(r.created_at_ms));
    if let Some(at) = r.finished_at_ms {
        field(&mut out, "finished", &timestamp(at));
    }

    let s = &r.strategy;
    field(&mut out, "strategy", "");
    subfield(&mut out, "storage", storage_name(s.storage));
    let live = r.kind == ferry_api::MigrationKind::Live;
    let capabilities = if s.capabilities.is_empty() {
        "-".to_string()
    } else {
        s.capabilities.join(", ")
    };
    if live {
        subfield(&mut out, "capabilities", &capabilities);
    }
    let bandwidth = if s.max_bandwidth_bytes_per_sec == 0 {
        "unlimited".to_string()
    } else {
        rate(s.max_bandwidth_bytes_per_sec)
    };
    subfield(&mut out, "bandwidth", &bandwidth);
    // The controller starts below the user's limit and raises it only when
    // pre-copy stalls; both numbers matter to someone reading a slow run.
    let downtime = if s.max_downtime_ms > s.downtime_limit_ms {
        format!(
            "{} (may rise to {})",
            duration_ms(s.downtime_limit_ms),
            duration_ms(s.max_downtime_ms)
        )
    } else {
        duration_ms(s.downtime_limit_ms)
    };
    if live {
        subfield(&mut out, "downtime", &downtime);
        subfield(&mut out, "post-copy", postcopy_name(s.postcopy));
        let deadline = if s.deadline_secs == 0 {
            "none".to_string()
        } else {
            humantime::format_duration(Duration::from_secs(s.deadline_secs)).to_string()
        };
        subfield(&mut out, "deadline", &deadline);
        subfield(&mut out, "tls", if s.tls { "yes" } else { "no" });
    }

    if r.phases.is_empty() {
        field(&mut out, "phases", "-");
    } else {
        field(&mut out, "phases", "");
        for p in &r.phases {
            subfield(&mut out, &p.phase, &duration_ms(p.duration_ms));
        }
    }

    let with_prediction = |actual: String, predicted: Option<u64>| match predicted {
        Some(p) => format!("{actual} (predicted {})", duration_ms(p)),
        None => actual,
    };
    // While it runs, total_ms is not final; the progress line says more.
    let total = if r.status.is_active() {
        "-".to_string()
    } else {
        duration_ms(r.total_ms)
    };
    let predicted = r.prediction.as_ref();
    field(
        &mut out,
        "total",
        &with_prediction(total, predicted.map(|p| p.total_ms)),
    );
    if live {
        let downtime = r.downtime_ms.map_or_else(
            || "-".to_string(),
            |ms| format!("{} (QEMU)", duration_ms(ms)),
        );
        field(
            &mut out,
            "downtime",
            &with_prediction(downtime, predicted.map(|p| p.downtime_ms)),
        );
    }
    let paused = match (r.paused_ms, r.kind) {
        (None, ferry_api::MigrationKind::Offline) => "- (the VM was stopped)".to_string(),
        (None, _) => "-".to_string(),
        (Some(ms), ferry_api::MigrationKind::Live) => {
            format!("{} (source STOP → destination RESUME)", duration_ms(ms))
        }
        (Some(ms), _) => format!(
            "{} (guest paused at the switchover: verification and pivot)",
            duration_ms(ms)
        ),
    };
    field(&mut out, "paused", &paused);
    if let Some(probe) = &r.network_probe {
        let network = format!(
            "{} longest gap seen by a client ({} sent, {} echoed, {} lost, {} corrupted{})",
            duration_ms(r.network_downtime_ms.unwrap_or(0)),
            probe.messages_sent,
            probe.messages_echoed,
            probe.messages_lost,
            probe.messages_corrupted,
            probe
                .connection_error
                .as_deref()
                .map(|e| format!("; connection broke: {e}"))
                .unwrap_or_default()
        );
        field(&mut out, "network", &network);
    }
    let transferred = format!(
        "{} (RAM {}, disks {})",
        output::bytes(r.transferred_bytes),
        output::bytes(r.ram_bytes),
        output::bytes(r.disk_bytes)
    );
    field(&mut out, "transferred", &transferred);
    if live {
        field(&mut out, "passes", &r.passes.to_string());
    }
    if r.status.is_active() {
        field(&mut out, "progress", &progress_line(r));
    }
    if r.escalations.is_empty() {
        if live {
            field(&mut out, "escalations", "none");
        }
    } else {
        field(&mut out, "escalations", "");
        for e in &r.escalations {
            let at = format!("+{}", duration_ms(e.at_ms));
            subfield(&mut out, &at, &format!("{}: {}", e.action, e.reason));
        }
    }
    if let Some(backup) = &r.backup_id {
        field(&mut out, "backup", backup);
    }
    if !r.disk_moves.is_empty() {
        field(&mut out, "disks", "");
        for d in &r.disk_moves {
            let moved = format!(
                "{} ({}) → {} ({}){}",
                d.from_path,
                d.from_format.as_str(),
                d.to_path,
                d.to_format.as_str(),
                if d.verified { ", verified" } else { "" }
            );
            subfield(&mut out, &d.disk_id, &moved);
        }
    }
    if let Some(v) = &r.verification {
        field(
            &mut out,
            "verification",
            &format!(
                "{} in {}: {}",
                v.status,
                duration_ms(v.duration_ms),
                v.method
            ),
        );
    }
    if let Some(error) = &r.error {
        field(&mut out, "error", error);
    }
    out
}

/// A duration for people: `850 ms`, `14.2 s`, `2m 05s`, `1h 02m`.
pub fn duration_ms(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 59_950 {
        let tenths = (ms + 50) / 100;
        format!("{}.{} s", tenths / 10, tenths % 10)
    } else if ms < 3_600_000 {
        let secs = (ms + 500) / 1_000;
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        let mins = (ms + 30_000) / 60_000;
        format!("{}h {:02}m", mins / 60, mins % 60)
    }
}

/// `524288000` → `500 MiB/s`.
pub fn rate(bytes_per_sec: u64) -> String {
    format!("{}/s", output::bytes(bytes_per_sec))
}

pub fn storage_name(mode: StorageMode) -> &'static str {
    match mode {
        StorageMode::Auto => "auto",
        StorageMode::Shared => "shared",
        StorageMode::Copy => "copy",
    }
}

fn postcopy_name(policy: PostcopyPolicy) -> &'static str {
    match policy {
        PostcopyPolicy::Never => "never",
        PostcopyPolicy::Auto => "auto",
        PostcopyPolicy::Always => "always",
    }
}

/// How long a migration has run: the controller's figure once it has one,
/// else the time since it was created by this machine's clock (which may
/// differ from the controller's; saturating keeps skew from going negative).
fn elapsed_ms(report: &MigrationReport, now_ms: u64) -> u64 {
    report
        .total_ms
        .max(now_ms.saturating_sub(report.created_at_ms))
}

pub(crate) fn timestamp(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use ferry_api::{Escalation, PhaseTiming, Prediction, Progress, Strategy};
    use ferry_core::units::{GIB, MIB};

    /// 2023-11-14T22:13:20Z
    const T0: u64 = 1_700_000_000_000;

    fn report(status: MigrationStatus) -> MigrationReport {
        MigrationReport {
            id: "6f1c2d3e-0000-4000-8000-000000000001".parse().unwrap(),
            vm: "demo".into(),
            source: "host1".into(),
            destination: "host2".into(),
            status,
            phase: "done".into(),
            strategy: Strategy {
                storage: StorageMode::Copy,
                capabilities: vec!["events".into(), "auto-converge".into()],
                max_bandwidth_bytes_per_sec: GIB,
                downtime_limit_ms: 100,
                max_downtime_ms: 300,
                postcopy: PostcopyPolicy::Never,
                deadline_secs: 600,
                tls: true,
            },
            escalations: vec![Escalation {
                at_ms: 9_000,
                action: "raise downtime limit to 300 ms".into(),
                reason: "pre-copy stalled".into(),
            }],
            phases: vec![
                PhaseTiming {
                    phase: "preflight".into(),
                    started_ms: 0,
                    duration_ms: 250,
                },
                PhaseTiming {
                    phase: "memory".into(),
                    started_ms: 250,
                    duration_ms: 12_000,
                },
            ],
            total_ms: 12_345,
            downtime_ms: Some(45),
            paused_ms: Some(120),
            transferred_bytes: 3 * GIB,
            ram_bytes: 2 * GIB,
            disk_bytes: 0,
            passes: 3,
            error: None,
            accel: Some("kvm".into()),
            prediction: Some(Prediction {
                total_ms: 11_000,
                downtime_ms: 60,
                ..Prediction::default()
            }),
            progress: None,
            created_at_ms: T0,
            finished_at_ms: Some(T0 + 12_345),
            network_downtime_ms: None,
            network_probe: None,
            kind: Default::default(),
            verified: None,
            verification: None,
            backup_id: None,
            disk_moves: Vec::new(),
        }
    }

    #[test]
    fn completed_report_renders_every_field() {
        let expected = "\
migration      6f1c2d3e-0000-4000-8000-000000000001
kind           live
vm             demo
route          host1 → host2
status         completed
phase          done
accel          kvm
started        2023-11-14T22:13:20Z
finished       2023-11-14T22:13:32Z
strategy
  storage      copy
  capabilities events, auto-converge
  bandwidth    1 GiB/s
  downtime     100 ms (may rise to 300 ms)
  post-copy    never
  deadline     10m
  tls          yes
phases
  preflight    250 ms
  memory       12.0 s
total          12.3 s (predicted 11.0 s)
downtime       45 ms (QEMU) (predicted 60 ms)
paused         120 ms (source STOP → destination RESUME)
transferred    3 GiB (RAM 2 GiB, disks 0 B)
passes         3
escalations
  +9.0 s       raise downtime limit to 300 ms: pre-copy stalled
";
        assert_eq!(render_report(&report(MigrationStatus::Completed)), expected);
    }

    #[test]
    fn a_storage_move_report_shows_the_disks_and_the_verification() {
        let mut r = report(MigrationStatus::Completed);
        r.kind = ferry_api::MigrationKind::Storage;
        r.destination = "host1".into();
        r.paused_ms = Some(35);
        r.backup_id = Some("demo-20261128-063143-890".into());
        r.verified = Some(true);
        r.verification = Some(ferry_api::Verification {
            status: "verified".into(),
            method: "qemu-img compare".into(),
            duration_ms: 27,
            detail: String::new(),
        });
        r.disk_moves = vec![ferry_api::DiskMoveOutcome {
            disk_id: "vd0".into(),
            from_datastore: Some("local".into()),
            from_path: "/ds/local/demo.raw".into(),
            from_format: ferry_core::spec::DiskFormat::Raw,
            to_datastore: "local2".into(),
            to_path: "/ds/local2/demo.qcow2".into(),
            to_format: ferry_core::spec::DiskFormat::Qcow2,
            virtual_size_bytes: 128 << 20,
            verified: true,
        }];
        let text = render_report(&r);
        for line in [
            "kind           storage",
            "paused         35 ms (guest paused at the switchover: verification and pivot)",
            "backup         demo-20261128-063143-890",
            "  vd0          /ds/local/demo.raw (raw) → /ds/local2/demo.qcow2 (qcow2), verified",
            "verification   verified in 27 ms: qemu-img compare",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // What only a live migration has is left out.
        for absent in ["post-copy", "deadline", "passes", "(QEMU)"] {
            assert!(!text.contains(absent), "{absent:?} in:\n{text}");
        }
    }

    #[test]
    fn failed_report_shows_the_error_and_no_downtime() {
        let mut r = report(MigrationStatus::Failed);
        r.downtime_ms = None;
        r.paused_ms = None;
        r.escalations.clear();
        r.error = Some("destination died: connection reset".into());
        let text = render_report(&r);
        assert!(text.contains("\nstatus         failed\n"), "{text}");
        assert!(
            text.contains("\ndowntime       - (predicted 60 ms)\n"),
            "{text}"
        );
        assert!(text.contains("\npaused         -\n"), "{text}");
        assert!(text.contains("\nescalations    none\n"), "{text}");
        assert!(
            text.ends_with("error          destination died: connection reset\n"),
            "{text}"
        );
    }

    #[test]
    fn running_report_shows_live_progress() {
        let mut r = report(MigrationStatus::Running);
        r.phase = "memory".into();
        r.progress = Some(Progress {
            phase: "memory".into(),
            ram_total_bytes: 2 * GIB,
            ram_remaining_bytes: 512 * MIB,
            dirty_rate_bytes_per_sec: 40 * MIB,
            throughput_bytes_per_sec: 900 * MIB,
            passes: 2,
            ..Progress::default()
        });
        let text = render_report(&r);
        assert!(
            text.contains("\ntotal          - (predicted 11.0 s)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nprogress       memory · RAM 512 MiB left of 2 GiB · dirty 40 MiB/s · \
                 wire 900 MiB/s · 2 passes\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn progress_line_shows_disks_and_prediction_when_known() {
        let mut r = report(MigrationStatus::Running);
        r.progress = Some(Progress {
            phase: "mirror".into(),
            ram_total_bytes: 4 * GIB,
            ram_remaining_bytes: 4 * GIB,
            disk_total_bytes: 10 * GIB,
            disk_done_bytes: 3 * GIB,
            throughput_bytes_per_sec: GIB,
            passes: 1,
            predicted_remaining_ms: Some(75_000),
            ..Progress::default()
        });
        assert_eq!(
            progress_line(&r),
            "mirror · RAM 4 GiB left of 4 GiB · disks 3 GiB / 10 GiB · dirty 0 B/s · \
             wire 1 GiB/s · 1 pass · done in ~1m 15s"
        );
        assert_eq!(
            moved(r.progress.as_ref().unwrap()),
            (3 * GIB, 14 * GIB),
            "the bar counts RAM in place plus disk mirrored"
        );
    }

    #[test]
    fn progress_line_without_progress_is_the_phase() {
        let mut r = report(MigrationStatus::Pending);
        r.phase = "preflight".into();
        assert_eq!(progress_line(&r), "preflight");
    }

    #[test]
    fn list_renders_a_table_with_running_time_for_active_migrations() {
        let done = report(MigrationStatus::Completed);
        let mut running = report(MigrationStatus::Running);
        running.id = "6f1c2d3e-0000-4000-8000-000000000002".parse().unwrap();
        running.vm = "web-1".into();
        running.phase = "memory".into();
        running.total_ms = 0;
        running.downtime_ms = None;
        let text = render_list(&[done, running], T0 + 65_000);
        let expected = "\
ID                                    VM     SOURCE  DESTINATION  STATUS     PHASE   TOTAL    DOWNTIME
6f1c2d3e-0000-4000-8000-000000000001  demo   host1   host2        completed  done    12.3 s   45 ms
6f1c2d3e-0000-4000-8000-000000000002  web-1  host1   host2        running    memory  1m 05s…  -
";
        assert_eq!(text, expected);
    }

    #[test]
    fn empty_list_is_just_the_header() {
        assert_eq!(
            render_list(&[], T0),
            "ID  VM  SOURCE  DESTINATION  STATUS  PHASE  TOTAL  DOWNTIME\n"
        );
    }

    #[test]
    fn durations_are_human() {
        assert_eq!(duration_ms(0), "0 ms");
        assert_eq!(duration_ms(999), "999 ms");
        assert_eq!(duration_ms(1_000), "1.0 s");
        assert_eq!(duration_ms(14_249), "14.2 s");
        assert_eq!(duration_ms(59_949), "59.9 s");
        assert_eq!(duration_ms(59_950), "1m 00s");
        assert_eq!(duration_ms(125_000), "2m 05s");
        assert_eq!(duration_ms(3_720_000), "1h 02m");
    }

    #[test]
    fn progress_template_is_valid() {
        assert!(ProgressStyle::with_template(BAR_TEMPLATE).is_ok());
    }

    #[test]
    fn migration_subcommands_parse() {
        let parse = |args: &[&str]| match crate::Cli::try_parse_from(args).map(|c| c.command) {
            Ok(crate::Command::Migration(command)) => Ok(command),
            Ok(other) => panic!("parsed as another command: {other:?}"),
            Err(error) => Err(error),
        };
        assert!(matches!(
            parse(&["ferry", "migration", "list"]),
            Ok(MigrationCommand::List)
        ));
        assert!(matches!(
            parse(&["ferry", "migration", "show", "abc"]),
            Ok(MigrationCommand::Show { id }) if id == "abc"
        ));
        assert!(matches!(
            parse(&["ferry", "migration", "watch", "abc", "-o", "json"]),
            Ok(MigrationCommand::Watch { id }) if id == "abc"
        ));
        assert!(matches!(
            parse(&["ferry", "migration", "cancel", "abc"]),
            Ok(MigrationCommand::Cancel { id }) if id == "abc"
        ));
        assert!(parse(&["ferry", "migration", "show"]).is_err());
    }
}

//! `ferry migrate VM --to HOST`: ask the controller to move a VM live.
//!
//! The CLI decides nothing about the migration itself: it turns flags into a
//! `MigrateRequest`, and the controller runs the pre-flight checks, picks the
//! strategy and drives both agents. What this module owns is the surface —
//! the flag names and value syntaxes, which users' scripts depend on — and
//! the rendering of the dry-run report. Waiting and the final report are
//! shared with `ferry migration watch` (see `super::migration`).

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use ferry_api::{DryRunReport, MigrateAnswer, MigrateRequest, PostcopyPolicy, StorageMode};
use ferry_core::units::{parse_size, UnitsError};

use super::migration::{self, duration_ms, rate};
use crate::config::Connection;
use crate::output::{self, Format};

/// The flags of `ferry migrate`. Their names and value syntaxes are a
/// contract with users' scripts: add freely, rename nothing.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The VM to move.
    pub vm: String,
    /// The host to move it to.
    #[arg(long, value_name = "HOST")]
    pub to: String,
    /// How the VM's disks travel.
    #[arg(long, value_enum, default_value_t = StorageArg::Auto)]
    pub storage: StorageArg,
    /// Longest acceptable pause of the guest at the switchover, in
    /// milliseconds (default: the controller's).
    #[arg(
        long = "max-downtime",
        value_name = "MS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_downtime_ms: Option<u64>,
    /// Cap on the migration stream, e.g. 500MiB/s, 1GiB/s, 10Gbit/s
    /// (default: the controller's).
    ///
    /// Bytes: B, KiB, MiB, GiB, TiB (K, M, G, T mean the same) or kB, MB, GB,
    /// TB (powers of 1000). Bits: bit, kbit, Mbit, Gbit, Tbit (powers of 1000;
    /// Mbps and Gbps are accepted too). The "/s" is optional.
    #[arg(long, value_name = "RATE", value_parser = bandwidth_arg)]
    pub bandwidth: Option<u64>,
    /// Whether the migration may switch to post-copy. Post-copy is weaker:
    /// if either host (or its QEMU) dies during post-copy, the guest is
    /// lost; that is why it is off by default.
    ///
    /// Post-copy always converges, however busy the guest: it runs the guest
    /// on the destination and fetches each page from the source when the
    /// guest first touches it. But from that switch until the last page has
    /// arrived, neither host holds a whole copy of the guest's memory: if
    /// either host or either QEMU dies during post-copy the guest is lost,
    /// with nothing to resume. A broken link is survived: Ferry pauses
    /// post-copy when it stops moving and reconnects the hosts when the link
    /// is back (the guest waits meanwhile). Pre-copy keeps the source whole
    /// until the end, so any failure leaves the VM running where it was.
    /// That is why post-copy is off by default; prefer a higher
    /// --max-downtime or --bandwidth first.
    #[arg(long, value_enum, default_value_t = PostcopyArg::Never)]
    pub postcopy: PostcopyArg,
    /// Cancel the migration (the VM stays on its source) if it has not
    /// switched over by then, e.g. 90s, 10m (default: the controller's).
    #[arg(long, value_name = "DURATION", value_parser = deadline_arg)]
    pub deadline: Option<u64>,
    /// Only run the pre-flight checks and predict the cost; exits non-zero if
    /// a check fails.
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,
    /// Show the progress until the migration ends, print its report, and
    /// exit non-zero unless it completed. Ctrl-C stops watching; the
    /// migration goes on (`ferry migration cancel ID` stops it).
    #[arg(long)]
    pub wait: bool,
    /// While waiting, keep one TCP connection to an echo service in the
    /// guest (e.g. the demo guest's 198.18.0.10:7000) and exchange a short
    /// line over it every 5 ms; the longest gap between two echoes, the
    /// network-observed downtime, goes into the report
    /// (`network_downtime_ms`, with the whole account in `network_probe`).
    /// Run the command where the guest is reachable (on its network).
    #[arg(long, value_name = "ADDR:PORT", requires = "wait")]
    pub net_probe: Option<std::net::SocketAddr>,
    /// Move a stopped VM: its disks are copied to the destination, checked
    /// by SHA-256 on both hosts before the source's copy is deleted, and the
    /// VM is defined there (stopped). A backup is taken first by default.
    #[arg(long, conflicts_with_all = ["net_probe", "postcopy"])]
    pub offline: bool,
    /// Take a backup of the VM before moving it (`ferry backup list` shows
    /// it; the report names it). On by default for --offline and when the
    /// disks are copied to the destination (storage leaving its host); off
    /// for shared storage.
    #[arg(long, overrides_with = "no_backup")]
    pub backup: bool,
    /// Skip the backup that --offline and copied storage take by default.
    #[arg(long, overrides_with = "backup")]
    pub no_backup: bool,
}

/// `--storage`: the API's `StorageMode` with help text for `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StorageArg {
    /// `shared` when every disk is on a datastore both hosts see, else `copy`.
    Auto,
    /// Disks stay where they are; only memory and device state move.
    Shared,
    /// Every local disk is mirrored to the destination while memory moves.
    Copy,
}

impl From<StorageArg> for StorageMode {
    fn from(arg: StorageArg) -> Self {
        match arg {
            StorageArg::Auto => StorageMode::Auto,
            StorageArg::Shared => StorageMode::Shared,
            StorageArg::Copy => StorageMode::Copy,
        }
    }
}

/// `--postcopy`: the API's `PostcopyPolicy` with help text for `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PostcopyArg {
    /// Pre-copy only: the source keeps a whole copy of the guest until the
    /// switchover, so any failure leaves the VM running where it was.
    Never,
    /// Switch to post-copy only when pre-copy stalls (the guest is lost if a
    /// host or the link dies after the switch).
    Auto,
    /// Switch to post-copy after the first pass (the guest is lost if a host
    /// or the link dies after the switch).
    Always,
}

impl From<PostcopyArg> for PostcopyPolicy {
    fn from(arg: PostcopyArg) -> Self {
        match arg {
            PostcopyArg::Never => PostcopyPolicy::Never,
            PostcopyArg::Auto => PostcopyPolicy::Auto,
            PostcopyArg::Always => PostcopyPolicy::Always,
        }
    }
}

impl MigrateArgs {
    /// The request these flags ask the controller for.
    pub fn request(&self) -> MigrateRequest {
        MigrateRequest {
            vm: self.vm.clone(),
            to: self.to.clone(),
            storage: self.storage.into(),
            max_downtime_ms: self.max_downtime_ms,
            bandwidth_bytes_per_sec: self.bandwidth,
            postcopy: self.postcopy.into(),
            deadline_secs: self.deadline,
            dry_run: self.dry_run,
            offline: self.offline,
            backup: match (self.backup, self.no_backup) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
        }
    }
}

pub async fn run(args: MigrateArgs, conn: &Connection, format: Format) -> anyhow::Result<()> {
    let controller = conn.controller()?;
    let request = args.request();
    // Connected before the migration starts, so the whole of it is seen.
    let probe = match args.net_probe {
        Some(address) => Some(migration::start_net_probe(address).await?),
        None => None,
    };
    let answer = controller
        .migrate(&request)
        .await
        .with_context(|| format!("cannot migrate {} to {}", request.vm, request.to))?;
    match answer {
        MigrateAnswer::DryRun(report) => {
            if format == Format::Json {
                output::json(&report)?;
            } else {
                print!("{}", render_dry_run(&report));
            }
            let failed: Vec<&str> = report
                .checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| c.name.as_str())
                .collect();
            if !failed.is_empty() {
                bail!(
                    "{} cannot move to {}: pre-flight checks failed: {}",
                    report.vm,
                    report.destination,
                    failed.join(", ")
                );
            }
            if !report.ok {
                bail!(
                    "the controller would refuse to move {} to {}",
                    report.vm,
                    report.destination
                );
            }
            Ok(())
        }
        MigrateAnswer::Started(report) => {
            if args.wait {
                return migration::wait_and_report(controller, *report, format, probe).await;
            }
            if format == Format::Json {
                output::json(&report)
            } else {
                println!(
                    "migration {} started: {} {} → {}",
                    report.id, report.vm, report.source, report.destination
                );
                Ok(())
            }
        }
    }
}

/// The dry-run report for people: the checks as a table, then the
/// prediction.
pub fn render_dry_run(report: &DryRunReport) -> String {
    let mut out = format!(
        "dry run: {} {} → {} (storage {})\n\n",
        report.vm,
        report.source,
        report.destination,
        migration::storage_name(report.storage)
    );
    let rows: Vec<Vec<String>> = report
        .checks
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                if c.ok { "yes" } else { "no" }.to_string(),
                c.detail.clone(),
            ]
        })
        .collect();
    out.push_str(&crate::output::render_table(
        &["CHECK", "OK", "DETAIL"],
        &rows,
    ));
    out.push('\n');
    match &report.prediction {
        Some(p) => {
            let _ = writeln!(out, "prediction ({})", p.basis);
            let _ = writeln!(out, "  total       {}", duration_ms(p.total_ms));
            let _ = writeln!(out, "  downtime    {}", duration_ms(p.downtime_ms));
            let _ = writeln!(out, "  dirty rate  {}", rate(p.dirty_rate_bytes_per_sec));
            let _ = writeln!(out, "  link        {}", rate(p.link_bytes_per_sec));
            let _ = writeln!(
                out,
                "  to move     {} RAM, {} disk",
                output::bytes(p.ram_bytes),
                output::bytes(p.disk_bytes)
            );
            let _ = writeln!(
                out,
                "  converges   {}",
                if p.converges {
                    "yes"
                } else {
                    "no: the guest dirties memory faster than the link carries it"
                }
            );
        }
        None => out.push_str("prediction  none (the checks failed before it could be made)\n"),
    }
    let failed = report.checks.iter().filter(|c| !c.ok).count();
    out.push('\n');
    if failed == 0 && report.ok {
        out.push_str("ready to migrate\n");
    } else if failed == 0 {
        out.push_str("not ready\n");
    } else {
        let _ = writeln!(
            out,
            "not ready: {failed} check{} failed",
            if failed == 1 { "" } else { "s" }
        );
    }
    out
}

/// Why a `--bandwidth` value was refused. Each message quotes the input so
/// that it stands alone in clap's "invalid value" line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BandwidthError {
    #[error("empty rate: write a number and a unit, e.g. \"500MiB/s\" or \"10Gbit/s\"")]
    Empty,
    #[error("{input:?} is negative")]
    Negative { input: String },
    #[error("{input:?} is not a number followed by a unit, e.g. \"500MiB/s\" or \"10Gbit/s\"")]
    NotANumber { input: String },
    #[error(
        "{input:?} has no unit: write one, e.g. \"{number}MiB/s\" for bytes or \
         \"{number}Mbit/s\" for bits per second"
    )]
    MissingUnit { input: String, number: String },
    #[error(
        "{input:?} has unknown unit {unit:?}: use B, KiB, MiB, GiB, TiB (powers of 1024; K, M, \
         G, T mean the same) or kB, MB, GB, TB (powers of 1000) for bytes, or bit, kbit, Mbit, \
         Gbit, Tbit (powers of 1000) for bits, optionally followed by \"/s\""
    )]
    UnknownUnit { input: String, unit: String },
    #[error("{input:?} is not a whole number of bytes (or bits) per second")]
    Fractional { input: String },
    #[error("{input:?} is too large")]
    TooLarge { input: String },
    #[error("{input:?} is less than one byte per second: the migration would never finish")]
    TooSmall { input: String },
}

/// Parses a rate such as `500MiB/s`, `1GiB/s`, `100MiB` or `10Gbit/s` into
/// bytes per second.
///
/// Byte units follow `ferry_core::units` exactly (so `--bandwidth 100MiB`
/// means what a size of `100MiB` means everywhere else). Bit units are what
/// network people write, always powers of 1000: `10Gbit/s` is 1.25 GB/s. A
/// bit rate that is not a whole number of bytes rounds down. Lower-case `b`
/// (`Mb`, `mb`) is refused rather than guessed: half the world reads it as
/// bits, the other half as bytes.
pub fn parse_bandwidth(input: &str) -> Result<u64, BandwidthError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(BandwidthError::Empty);
    }
    let shown = || echo(s);
    let body = s.strip_suffix("/s").map(str::trim_end).unwrap_or(s);
    let number_len = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, unit) = body.split_at(number_len);
    let unit = unit.trim_start();
    // A bit unit becomes the matching power-of-1000 byte unit, so that the
    // one size parser does the (exact) arithmetic; the result is bits.
    let bit_unit = match unit {
        "bit" | "bps" => Some("B"),
        "kbit" | "Kbit" | "kbps" | "Kbps" => Some("kB"),
        "Mbit" | "Mbps" => Some("MB"),
        "Gbit" | "Gbps" => Some("GB"),
        "Tbit" | "Tbps" => Some("TB"),
        _ => None,
    };
    let parsed = match bit_unit {
        Some(bytes_unit) if !number.is_empty() => {
            parse_size(&format!("{number}{bytes_unit}")).map(|bits| bits / 8)
        }
        _ => parse_size(body),
    };
    let bytes = parsed.map_err(|error| match error {
        UnitsError::Empty | UnitsError::NotANumber { .. } => {
            BandwidthError::NotANumber { input: shown() }
        }
        UnitsError::Negative { .. } => BandwidthError::Negative { input: shown() },
        UnitsError::MissingUnit { .. } => BandwidthError::MissingUnit {
            input: shown(),
            number: echo(number),
        },
        UnitsError::UnknownUnit { .. } => BandwidthError::UnknownUnit {
            input: shown(),
            unit: echo(unit),
        },
        UnitsError::Fractional { .. } => BandwidthError::Fractional { input: shown() },
        UnitsError::TooLarge { .. } => BandwidthError::TooLarge { input: shown() },
    })?;
    if bytes == 0 {
        return Err(BandwidthError::TooSmall { input: shown() });
    }
    Ok(bytes)
}

/// Why a `--deadline` value was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeadlineError {
    #[error("{input:?} is not a duration such as \"90s\" or \"10m\"")]
    Invalid {
        input: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("{input:?} is shorter than a second")]
    TooShort { input: String },
}

/// Parses a deadline such as `90s`, `10m` or `1h 30m` into whole seconds,
/// rounding up: a deadline promises at least that long.
pub fn parse_deadline(input: &str) -> Result<u64, DeadlineError> {
    let s = input.trim();
    let duration = humantime::parse_duration(s).map_err(|source| DeadlineError::Invalid {
        input: echo(s),
        source,
    })?;
    // Under a second is a slip (`500ms` for `500s`?), not a deadline any
    // migration could meet.
    if duration < Duration::from_secs(1) {
        return Err(DeadlineError::TooShort { input: echo(s) });
    }
    Ok(duration.as_secs() + u64::from(duration.subsec_nanos() > 0))
}

/// clap shows only an error's own message, so the value parsers hand it the
/// whole chain.
pub(crate) fn bandwidth_arg(input: &str) -> Result<u64, String> {
    parse_bandwidth(input).map_err(|e| ferry_api::error_chain(&e))
}

fn deadline_arg(input: &str) -> Result<u64, String> {
    parse_deadline(input).map_err(|e| ferry_api::error_chain(&e))
}

/// Shortens user input for an error message, on a character boundary.
fn echo(s: &str) -> String {
    const MAX: usize = 40;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use ferry_api::{Prediction, PreflightCheck};
    use ferry_core::units::{GIB, MIB};

    fn parse(args: &[&str]) -> Result<(MigrateArgs, Format), clap::Error> {
        let cli = crate::Cli::try_parse_from(args)?;
        match cli.command {
            crate::Command::Migrate(args) => Ok((
                args,
                crate::output_format(&cli.output, None).expect("a valid -o"),
            )),
            other => panic!("parsed as another command: {other:?}"),
        }
    }

    #[test]
    fn bandwidth_in_bytes_takes_an_optional_per_second() {
        assert_eq!(parse_bandwidth("500MiB/s"), Ok(500 * MIB));
        assert_eq!(parse_bandwidth("1GiB/s"), Ok(GIB));
        assert_eq!(parse_bandwidth("100MiB"), Ok(100 * MIB));
        assert_eq!(parse_bandwidth(" 1.5 GiB /s "), Ok(3 * GIB / 2));
        assert_eq!(parse_bandwidth("100MB/s"), Ok(100_000_000));
        assert_eq!(parse_bandwidth("64K/s"), Ok(64 * 1024));
    }

    #[test]
    fn bandwidth_in_bits_is_powers_of_1000_divided_by_8() {
        assert_eq!(parse_bandwidth("10Gbit/s"), Ok(1_250_000_000));
        assert_eq!(parse_bandwidth("800Mbit/s"), Ok(100_000_000));
        assert_eq!(parse_bandwidth("800Mbit"), Ok(100_000_000));
        assert_eq!(parse_bandwidth("2.5Gbps"), Ok(312_500_000));
        assert_eq!(parse_bandwidth("100kbit/s"), Ok(12_500));
        // Not a whole number of bytes: rounds down.
        assert_eq!(parse_bandwidth("12bit/s"), Ok(1));
    }

    #[test]
    fn bandwidth_refuses_ambiguous_and_malformed_input_with_a_clear_message() {
        let err = parse_bandwidth("100Mb/s").unwrap_err();
        assert!(matches!(err, BandwidthError::UnknownUnit { ref unit, .. } if unit == "Mb"));
        let message = err.to_string();
        assert!(message.contains("\"100Mb/s\""), "{message}");
        assert!(
            message.contains("Mbit") && message.contains("MiB"),
            "{message}"
        );

        assert!(matches!(
            parse_bandwidth("500"),
            Err(BandwidthError::MissingUnit { .. })
        ));
        assert!(parse_bandwidth("500/s")
            .unwrap_err()
            .to_string()
            .contains("\"500MiB/s\""));
        assert!(matches!(
            parse_bandwidth("fast"),
            Err(BandwidthError::NotANumber { .. })
        ));
        assert!(matches!(
            parse_bandwidth("Gbit/s"),
            Err(BandwidthError::NotANumber { .. })
        ));
        assert!(matches!(
            parse_bandwidth("-5MiB/s"),
            Err(BandwidthError::Negative { .. })
        ));
        assert_eq!(parse_bandwidth("  "), Err(BandwidthError::Empty));
        assert!(matches!(
            parse_bandwidth("0MiB/s"),
            Err(BandwidthError::TooSmall { .. })
        ));
        assert!(matches!(
            parse_bandwidth("4bit/s"),
            Err(BandwidthError::TooSmall { .. })
        ));
        assert!(matches!(
            parse_bandwidth("99999999999TiB/s"),
            Err(BandwidthError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_bandwidth("0.1KiB/s"),
            Err(BandwidthError::Fractional { .. })
        ));
    }

    #[test]
    fn deadline_is_humantime_rounded_up_to_seconds() {
        assert_eq!(parse_deadline("90s").unwrap(), 90);
        assert_eq!(parse_deadline("10m").unwrap(), 600);
        assert_eq!(parse_deadline("1h 30m").unwrap(), 5400);
        assert_eq!(parse_deadline("1s 500ms").unwrap(), 2);
        assert!(matches!(
            parse_deadline("500ms"),
            Err(DeadlineError::TooShort { .. })
        ));
        let chain = ferry_api::error_chain(&parse_deadline("soon").unwrap_err());
        assert!(chain.starts_with("\"soon\" is not a duration"), "{chain}");
    }

    #[test]
    fn migrate_with_every_flag_builds_the_request() {
        let (args, format) = parse(&[
            "ferry",
            "migrate",
            "demo",
            "--to",
            "host2",
            "--storage",
            "copy",
            "--max-downtime",
            "300",
            "--bandwidth",
            "1GiB/s",
            "--postcopy",
            "auto",
            "--deadline",
            "10m",
            "--wait",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(format, Format::Json);
        assert!(args.wait);
        let request = args.request();
        assert_eq!(request.vm, "demo");
        assert_eq!(request.to, "host2");
        assert_eq!(request.storage, StorageMode::Copy);
        assert_eq!(request.max_downtime_ms, Some(300));
        assert_eq!(request.bandwidth_bytes_per_sec, Some(GIB));
        assert_eq!(request.postcopy, PostcopyPolicy::Auto);
        assert_eq!(request.deadline_secs, Some(600));
        assert!(!request.dry_run);
    }

    #[test]
    fn migrate_defaults_leave_limits_to_the_controller_and_postcopy_off() {
        let (args, format) = parse(&["ferry", "migrate", "demo", "--to", "host2"]).unwrap();
        assert_eq!(format, Format::Table);
        assert!(!args.wait);
        let request = args.request();
        assert_eq!(request.storage, StorageMode::Auto);
        assert_eq!(request.postcopy, PostcopyPolicy::Never);
        assert_eq!(request.max_downtime_ms, None);
        assert_eq!(request.bandwidth_bytes_per_sec, None);
        assert_eq!(request.deadline_secs, None);
        assert!(!request.dry_run);
    }

    #[test]
    fn migrate_dry_run_sets_the_flag() {
        let (args, _) = parse(&["ferry", "migrate", "demo", "--to", "h2", "--dry-run"]).unwrap();
        assert!(args.request().dry_run);
    }

    #[test]
    fn migrate_refuses_bad_values_and_missing_destination() {
        for bad in [
            vec!["ferry", "migrate", "demo"],
            vec!["ferry", "migrate", "demo", "--to", "h2", "--storage", "nfs"],
            vec![
                "ferry",
                "migrate",
                "demo",
                "--to",
                "h2",
                "--postcopy",
                "yes",
            ],
            vec![
                "ferry",
                "migrate",
                "demo",
                "--to",
                "h2",
                "--max-downtime",
                "0.5s",
            ],
            vec![
                "ferry",
                "migrate",
                "demo",
                "--to",
                "h2",
                "--max-downtime",
                "0",
            ],
            vec![
                "ferry",
                "migrate",
                "demo",
                "--to",
                "h2",
                "--bandwidth",
                "100Mb/s",
            ],
            vec![
                "ferry",
                "migrate",
                "demo",
                "--to",
                "h2",
                "--deadline",
                "soon",
            ],
            vec![
                "ferry",
                "migrate",
                "demo",
                "--to",
                "h2",
                "--dry-run",
                "--wait",
            ],
        ] {
            assert!(parse(&bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn bad_bandwidth_error_names_the_flag_and_the_units() {
        let err = parse(&["ferry", "migrate", "d", "--to", "h", "--bandwidth", "9Mb"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--bandwidth"), "{text}");
        assert!(text.contains("unknown unit \"Mb\""), "{text}");
    }

    #[test]
    fn postcopy_help_warns_that_the_guest_is_lost_if_a_host_or_link_dies() {
        let mut cli = crate::Cli::command();
        cli.build();
        let migrate = cli.find_subcommand("migrate").unwrap();
        let postcopy = migrate
            .get_arguments()
            .find(|a| a.get_id() == "postcopy")
            .unwrap();
        // Both `-h` (short help) and `--help` (long help) carry the warning.
        for help in [postcopy.get_help(), postcopy.get_long_help()]
            .into_iter()
            .flatten()
        {
            let help = help.to_string();
            assert!(help.contains("guest is lost"), "{help}");
            assert!(help.contains("off by default"), "{help}");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        crate::Cli::command().debug_assert();
    }

    fn dry_run(checks: &[(&str, bool, &str)], prediction: Option<Prediction>) -> DryRunReport {
        DryRunReport {
            vm: "demo".into(),
            source: "host1".into(),
            destination: "host2".into(),
            storage: StorageMode::Copy,
            ok: checks.iter().all(|c| c.1),
            checks: checks
                .iter()
                .map(|(name, ok, detail)| PreflightCheck {
                    name: name.to_string(),
                    ok: *ok,
                    detail: detail.to_string(),
                })
                .collect(),
            prediction,
        }
    }

    #[test]
    fn dry_run_renders_checks_as_a_table_and_the_prediction() {
        let report = dry_run(
            &[
                ("destination_reachable", true, "host2 answered in 3 ms"),
                ("memory", true, "8 GiB free, 2 GiB needed"),
            ],
            Some(Prediction {
                ram_bytes: 2 * GIB,
                disk_bytes: 10 * GIB,
                dirty_rate_bytes_per_sec: 50 * MIB,
                link_bytes_per_sec: GIB,
                total_ms: 14_200,
                downtime_ms: 120,
                converges: true,
                basis: "dirty rate sampled for 1 s".into(),
            }),
        );
        let text = render_dry_run(&report);
        let expected = "\
dry run: demo host1 → host2 (storage copy)

CHECK                  OK   DETAIL
destination_reachable  yes  host2 answered in 3 ms
memory                 yes  8 GiB free, 2 GiB needed

prediction (dirty rate sampled for 1 s)
  total       14.2 s
  downtime    120 ms
  dirty rate  50 MiB/s
  link        1 GiB/s
  to move     2 GiB RAM, 10 GiB disk
  converges   yes

ready to migrate
";
        assert_eq!(text, expected);
    }

    #[test]
    fn dry_run_with_failed_checks_says_how_many() {
        let report = dry_run(
            &[
                ("cpu_model", false, "host2 lacks Icelake-Server"),
                ("disk_space", false, "needs 10 GiB, 2 GiB free"),
            ],
            None,
        );
        let text = render_dry_run(&report);
        assert!(
            text.contains("cpu_model   no  host2 lacks Icelake-Server"),
            "{text}"
        );
        assert!(text.contains("prediction  none"), "{text}");
        assert!(text.ends_with("not ready: 2 checks failed\n"), "{text}");
    }
}

//! `ferry-bench`: live migration by Ferry against plain QEMU with its
//! defaults, over the same shaped link, in one run.
//!
//! ```text
//!  ferry local up --netns (2 hosts) ─▶ tbf on host1's link ─▶ goodput (TCP)
//!    for each scenario (idle, half the link, above the link):
//!      Ferry: define + start on host1 (NIC on demo-lan), TCP echo probe from
//!             the client namespace, migrate → host2 through the controller
//!      QEMU:  start in host1's namespace, -incoming in host2's, migrate (defaults)
//!  goodput again ─▶ results/*.md, results/*.json ─▶ ferry local down --purge
//! ```
//!
//! `ferry-bench storage-move` instead times `ferry storage move` of a
//! running VM's disk against `qemu-img convert` of the same file between
//! the same datastores (`storage_move`). `ferry-bench import-ova` times
//! `ferry import` of an OVA against `tar x` + `qemu-img convert` of the
//! same file (`import_ova`).
//!
//! Root is needed (namespaces, `tc`; dropping the page cache). See
//! `bench/README.md`.

mod ferry_run;
mod goodput;
mod import_ova;
mod import_report;
mod machine;
mod plain;
mod report;
mod scenario;
mod serial;
mod stats;
mod storage_move;
mod storage_report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use ferry_test_support::guest::TestGuest;
use ferry_test_support::netns::{Rig, Shape};

use crate::report::{BenchReport, Conditions, RunResult, ScenarioInfo, FORMAT_VERSION};
use crate::scenario::{Bench, Scenario, HB_MS, RAM_MIB};
use crate::serial::Clock;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-bench",
    about = "Live migration: Ferry vs. plain QEMU defaults over a shaped namespace link (root)"
)]
struct Args {
    /// tbf rate of host1's link, Mbit/s (both directions).
    #[arg(long, default_value_t = 200)]
    link_mbit: u64,
    /// The probe's working set, MiB (fits below the 512 MiB guest's top
    /// 64 MiB).
    #[arg(long, default_value_t = 128)]
    working_set_mib: u64,
    /// Seconds a migration may take before it is cancelled ("did not
    /// converge").
    #[arg(long, default_value_t = 90)]
    bound_secs: u64,
    /// Only these scenarios (idle, half, above); all by default.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Where the Markdown and JSON results go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
    /// Do not (re)build ferry and ferryd first (they must exist next to
    /// this binary).
    #[arg(long)]
    no_build: bool,
    #[command(subcommand)]
    mode: Option<Mode>,
}

/// Other benchmarks, and the helpers the live-migration benchmark runs
/// inside a namespace itself.
#[derive(Debug, Subcommand)]
enum Mode {
    /// Disk move throughput: `ferry storage move` of a running VM's disk to
    /// another datastore of its host, next to `qemu-img convert` of the same
    /// file between the same datastores (root: drops the page cache).
    StorageMove(storage_move::StorageMoveArgs),
    /// OVA import throughput: `ferry import` of an OVA made by `ferry
    /// export`, next to `tar x` + `qemu-img convert` of the same file (root:
    /// drops the page cache).
    ImportOva(import_ova::ImportOvaArgs),
    /// Receive one TCP transfer (goodput measurement).
    #[command(hide = true)]
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send one TCP transfer and print it as JSON.
    #[command(hide = true)]
    Source {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")
    };
    let outcome = match args.mode {
        Some(Mode::Sink { listen }) => {
            goodput::sink(listen, Duration::from_secs(60)).context("goodput sink")
        }
        Some(Mode::Source { to, bytes }) => goodput::source(to, bytes, Duration::from_secs(60))
            .context("goodput source")
            .and_then(|t| {
                println!("{}", serde_json::to_string(&t)?);
                Ok(())
            }),
        Some(Mode::StorageMove(storage)) => {
            runtime().and_then(|rt| rt.block_on(storage_move::run(storage)))
        }
        Some(Mode::ImportOva(import)) => {
            runtime().and_then(|rt| rt.block_on(import_ova::run(import)))
        }
        None => runtime().and_then(|rt| rt.block_on(bench(args))),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry-bench: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// ferry and ferryd next to this binary (cargo puts every binary of a
/// profile in one folder).
fn binaries(no_build: bool) -> anyhow::Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the benchmark binary has no folder")?;
    // Under `cargo run` build them too, in this profile, so that the
    // benchmark never measures stale binaries.
    if let (false, Some(cargo)) = (no_build, std::env::var_os("CARGO")) {
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "ferry-cli", "-p", "ferryd"]);
        // `cargo run` gives us the variables of a running package; build
        // scripts that watch one (ring watches CARGO_MANIFEST_DIR) would see
        // a change and rebuild half the tree on every run.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "OUT_DIR",
                ]
                .contains(&name.as_ref())
            {
                build.env_remove(name.as_ref());
            }
        }
        if dir.ends_with("release") {
            build.arg("--release");
        }
        eprintln!("building ferry and ferryd ({})", dir.display());
        let status = build.status().context("cannot run cargo")?;
        if !status.success() {
            bail!("building ferry and ferryd failed ({status})");
        }
    }
    let (ferry, ferryd) = (dir.join("ferry"), dir.join("ferryd"));
    for path in [&ferry, &ferryd] {
        if !path.exists() {
            bail!(
                "{} is missing: build it with `cargo build --release -p ferry-cli -p ferryd`",
                path.display()
            );
        }
    }
    Ok((ferry, ferryd))
}

/// The namespace cluster, purged when dropped.
struct Cluster {
    dir: PathBuf,
    ferry: PathBuf,
    ferryd: PathBuf,
    down: bool,
}

impl Cluster {
    fn up(ferry: PathBuf, ferryd: PathBuf, dir: PathBuf) -> anyhow::Result<Cluster> {
        Cluster::up_with(ferry, ferryd, dir, &["up", "--netns", "--hosts", "2"])
    }

    /// `ferry local ARGS --dir DIR` (ARGS starting with `up`).
    fn up_with(
        ferry: PathBuf,
        ferryd: PathBuf,
        dir: PathBuf,
        args: &[&str],
    ) -> anyhow::Result<Cluster> {
        let cluster = Cluster {
            dir,
            ferry,
            ferryd,
            down: false,
        };
        cluster.local(args)?;
        Ok(cluster)
    }

    fn local(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new(&self.ferry)
            .arg("local")
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .env("FERRYD", &self.ferryd)
            .output()
            .context("cannot run ferry")?;
        if !out.status.success() {
            bail!(
                "`ferry local {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn down(&mut self) -> anyhow::Result<()> {
        self.down = true;
        self.local(&["down", "--purge"])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.down {
            if let Err(e) = self.local(&["down", "--purge"]) {
                eprintln!("ferry-bench: {e:#}");
            }
        }
    }
}

fn client(dir: &Path, url: &str) -> anyhow::Result<ferry_api::Client> {
    let read = |name: &str| {
        let path = dir.join("pki").join(name);
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let tls = ferry_pki::client_config(
        &read("ca.pem")?,
        &read("admin.pem")?,
        &read("admin-key.pem")?,
    )?;
    Ok(ferry_api::Client::new(url, tls)?)
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn host_cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

async fn bench(args: Args) -> anyhow::Result<()> {
    // Preconditions first: nothing is created unless all hold.
    ferry_test_support::netns::require(&["ip", "tc"])?;
    let guest = TestGuest::locate()?;
    let qemu = ferry_qemu::process::find_qemu_binary()?;
    let version = ferry_qemu::process::check_version(&qemu).await?;
    ferry_qemu::process::ensure_supported(&qemu, version)?;
    let choice = ferry_qemu::accel::choose(ferry_qemu::accel::AccelSetting::Auto);
    let wanted: Vec<String> = if args.scenarios.is_empty() {
        vec!["idle".into(), "half".into(), "above".into()]
    } else {
        args.scenarios.clone()
    };
    for name in &wanted {
        if !["idle", "half", "above"].contains(&name.as_str()) {
            bail!("unknown scenario {name:?}: idle, half or above");
        }
    }
    if args.working_set_mib == 0 || args.working_set_mib > RAM_MIB - 128 {
        bail!("--working-set-mib must be between 1 and {}", RAM_MIB - 128);
    }
    let (ferry, ferryd) = binaries(args.no_build)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let work = tempfile::Builder::new().prefix("ferry-bench-").tempdir()?;
    let clock = Clock::start();
    eprintln!(
        "bringing up a 2-host namespace cluster in {}",
        work.path().display()
    );
    let mut cluster = Cluster::up(ferry, ferryd, work.path().join("cluster"))?;
    let rig = Rig::open(&cluster.dir)?;
    let shape = Shape::mbit(args.link_mbit);
    rig.shape("host1", &shape)?;
    let tbf = format!(
        "qdisc tbf rate {}mbit burst {}b latency {}ms",
        args.link_mbit,
        shape.burst_bytes,
        shape.latency.as_millis()
    );
    eprintln!("host1's link shaped: {tbf}");

    let measure = |label: &str| -> anyhow::Result<f64> {
        let transfer = goodput::measure(&rig, "host1", "host2", 64 << 20)?;
        let rate = transfer.bytes_per_sec();
        eprintln!(
            "goodput {label}: {:.1} MiB/s ({:.0} Mbit/s) over {:.1} s",
            stats::mib(rate),
            rate * 8.0 / 1e6,
            transfer.secs
        );
        Ok(rate)
    };
    let mut goodputs = vec![measure("before")?];
    let scenarios: Vec<Scenario> = Scenario::for_link(goodputs[0])
        .into_iter()
        .filter(|s| wanted.iter().any(|w| w == s.name))
        .collect();

    let host1 = rig.host("host1")?;
    let host2 = rig.host("host2")?;
    let api = ferry_run::Api {
        host1: client(&cluster.dir, &host1.url())?,
        host2: client(&cluster.dir, &host2.url())?,
        dir: cluster.dir.clone(),
    };
    let mut bench = Bench {
        clock,
        rig: rig.clone(),
        guest,
        work: work.path().join("qemu"),
        qemu,
        accel: choice.accel.as_str().to_string(),
        working_set_mib: args.working_set_mib,
        bound: Duration::from_secs(args.bound_secs),
        goodput: goodputs[0],
    };

    let mut runs: Vec<RunResult> = Vec::new();
    for scenario in &scenarios {
        eprintln!(
            "scenario {} (ferry.mem_rate={} MiB/s): Ferry",
            scenario.name, scenario.mem_rate
        );
        match ferry_run::run(&bench, &api, scenario).await {
            Ok(run) => {
                eprintln!("  {}", summary(&run));
                runs.push(run);
            }
            Err(e) => eprintln!("  Ferry run failed: {e:#}"),
        }
        eprintln!("scenario {}: plain QEMU", scenario.name);
        match plain::run(&bench, scenario).await {
            Ok(run) => {
                eprintln!("  {}", summary(&run));
                runs.push(run);
            }
            Err(e) => eprintln!("  plain QEMU run failed: {e:#}"),
        }
    }
    goodputs.push(measure("after")?);
    let conditions = Conditions {
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?,
        qemu_version: first_line(&qemu_path(&bench), &["--version"]),
        accel: bench.accel.clone(),
        accel_reason: choice.reason.clone(),
        host_cpu: host_cpu(),
        host_cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: first_line("uname", &["-r"]),
        link_rate_mbit: args.link_mbit,
        tbf,
        goodput_bytes_per_sec: goodputs.clone(),
        guest_ram_mib: RAM_MIB,
        guest_vcpus: 1,
        working_set_mib: args.working_set_mib,
        heartbeat_ms: HB_MS,
        bound_secs: args.bound_secs,
        ferry_strategy: format!(
            "the controller's default strategy (`ferry migrate VM --to host2`; only the \
             deadline set, to the bound): {}; escalations as noted per run",
            strategy_of(&runs, "ferry")
        ),
        qemu_strategy: format!(
            "plain QEMU with nothing set (what `virsh migrate --live` gets): pre-copy only, {}; \
             the same command line as Ferry's for the same spec",
            strategy_of(&runs, "qemu-defaults")
        ),
        network_probe: format!(
            "Ferry's runs: the guest has one virtio NIC (a fresh MAC per run) on the cluster \
             network `{network}` (bridge `{bridge}` in each host namespace, uplinked to the \
             guest LAN segment; the LAN is not shaped and carries no migration traffic) and \
             runs its TCP echo service on {echo} (`ferry.ip={ip}/{prefix}`). \
             `ferry_netprobe::EchoProbe` in the client namespace `{client}` keeps one TCP \
             connection to it, sends a numbered line every {interval} ms (at most {window} \
             unanswered) and checks every echo; it connects once the guest prints `probe-net`, \
             runs through the settle and the migration, and stops 1.5 s after the migration's \
             end (then drains for up to {drain} s). Its longest gap between two echoes is \
             posted to the controller (`POST /v1/migrations/ID/observations`) and shown as \
             reported (`network_downtime_ms`). Resolution: the {interval} ms interval. The \
             plain QEMU baseline is not measured: its guest has no NIC — giving it one would \
             mean creating taps and bridge ports in both hosts' namespaces for it, which is \
             the part of the job Ferry does and plain QEMU does not, so no client can reach \
             that guest.",
            network = scenario::NETWORK,
            bridge = scenario::LAN_BRIDGE,
            echo = scenario::echo_address(),
            ip = scenario::GUEST_IP,
            prefix = scenario::GUEST_PREFIX,
            client = rig.client_netns(),
            interval = ferry_netprobe::DEFAULT_INTERVAL.as_millis(),
            window = ferry_netprobe::MAX_IN_FLIGHT,
            drain = ferry_netprobe::DRAIN_TIMEOUT.as_secs(),
        ),
    };
    // The floor uses the mean goodput of the run.
    bench.goodput = conditions.goodput();
    for run in &mut runs {
        run.floor_s = stats::floor_secs(run.nonzero_ram_bytes, bench.goodput);
    }
    let report = BenchReport {
        format_version: FORMAT_VERSION,
        conditions,
        scenarios: scenarios
            .iter()
            .map(|s| ScenarioInfo {
                name: s.name.to_string(),
                description: s.description.clone(),
                mem_rate_mib_s: s.mem_rate,
            })
            .collect(),
        runs,
    };
    rig.unshape("host1")?;
    cluster.down()?;

    let stem = format!(
        "{}-tbf{}mbit",
        &report.conditions.date[..10],
        args.link_mbit
    );
    let md = args.out.join(format!("{stem}.md"));
    let json = args.out.join(format!("{stem}.json"));
    std::fs::write(&md, report.markdown())?;
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", report.markdown());
    eprintln!("results: {} and {}", md.display(), json.display());
    if report.runs.len() != scenarios.len() * 2 {
        bail!("some runs failed (see above); the results hold the others");
    }
    Ok(())
}

/// The strategy the first run of `migrator` reported.
fn strategy_of(runs: &[RunResult], migrator: &str) -> String {
    runs.iter()
        .find(|r| r.migrator == migrator)
        .map_or_else(|| "(no run)".to_string(), |r| r.strategy.clone())
}

fn qemu_path(bench: &Bench) -> String {
    bench.qemu.display().to_string()
}

fn summary(run: &RunResult) -> String {
    format!(
        "{}: total {:.1} s, guest downtime {} ms, network downtime {} ms{}, {} MiB sent, {} passes \
         (floor {:.1} s)",
        run.outcome,
        run.total_s,
        run.guest_downtime_ms
            .map_or("?".to_string(), |d| format!("{d:.0}")),
        run.network_downtime_ms
            .map_or("–".to_string(), |d| d.to_string()),
        match run.network_probe_clean {
            Some(false) => " (probe not clean)",
            _ => "",
        },
        run.stream_bytes >> 20,
        run.passes,
        run.floor_s
    )
}

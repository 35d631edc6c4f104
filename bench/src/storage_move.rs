//! `ferry-bench storage-move`: Ferry's move of a running VM's disk to
//! another datastore of its host, against `qemu-img convert` of the same
//! file between the same two datastore folders, in one run.
//!
//! ```text
//!  ferry local up --hosts 1 ─▶ data.raw (random bytes, then a hole) in `local`
//!  ─▶ VM (test guest, boot disk + data disk, writing records to the data disk)
//!  for each repetition, for each target format (even repetitions: Ferry first):
//!    drop caches ─▶ qemu-img convert -U local/data.raw → local2/baseline.F, fsync
//!    drop caches ─▶ ferry storage move VM --disk data --to local2 --format F --wait
//!    drop caches ─▶ ferry storage move VM --disk data --to local --format raw --wait
//!                   (the return, not compared)
//!  ─▶ results/storage-move-DATE.{md,json} ─▶ ferry local down --purge
//! ```
//!
//! Root is needed to drop the page cache. See `bench/README.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_api::{MigrationReport, MigrationStatus};
use ferry_test_support::guest::{ProbeConfig, TestGuest};

use crate::machine::{
    allocated_bytes, drop_caches, host_memory_mib, load1, loadavg, write_data_disk,
};
use crate::serial::{Arrival, Clock, ProbeLine, SerialTap};
use crate::storage_report::{
    CopyRun, DatastoreInfo, FormatSummary, GuestConditions, Phase, StorageConditions,
    StorageReport, BENCHMARK, STORAGE_FORMAT_VERSION,
};
use crate::{stats, Cluster};

/// The VM's name, and its disks' ids.
const VM: &str = "bench-storage";
const DATA_DISK: &str = "data";
const BOOT_DISK: &str = "boot";
/// Datastores of every `ferry local` host: the disk starts in the first.
const FROM: &str = "local";
const TO: &str = "local2";
/// Guest size (the test guest's standard layout).
const RAM_MIB: u64 = 512;
const HB_MS: u64 = 10;
/// Boot bound (TCG).
const BOOT: Duration = Duration::from_secs(120);
/// How long the guest runs idle, after `probe-ready`, before the first
/// copy; its write rate and heartbeat gaps are measured over it.
const IDLE: Duration = Duration::from_secs(5);
/// A breather between two copies (the previous one's old file is gone, the
/// mirror threads have ended).
const BETWEEN: Duration = Duration::from_secs(1);
/// Longest a single copy may take before the benchmark gives up on it.
const COPY_BOUND: Duration = Duration::from_secs(600);

/// `ferry-bench storage-move`.
#[derive(Debug, clap::Args)]
pub struct StorageMoveArgs {
    /// Virtual size of the moved data disk, MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Share of the disk written with random (incompressible) bytes from
    /// offset 0, percent; the rest stays a hole.
    #[arg(long, default_value_t = 75)]
    pub fill_percent: u64,
    /// Repetitions of each target format.
    #[arg(long, default_value_t = 3)]
    pub reps: u32,
    /// Target formats (raw, qcow2); the source is raw.
    #[arg(long, value_delimiter = ',', default_value = "raw,qcow2")]
    pub formats: Vec<String>,
    /// Disk records (4 KiB, each flushed) the guest writes per second to
    /// the moved disk; 0: the guest does not write.
    #[arg(long, default_value_t = 50)]
    pub disk_rate: u64,
    /// Folder the cluster, and so both datastores, is created in (default:
    /// the system's temporary folder).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Where the Markdown and JSON results go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    pub out: PathBuf,
    /// Do not (re)build ferry and ferryd first (they must exist next to
    /// this binary).
    #[arg(long)]
    pub no_build: bool,
}

impl StorageMoveArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.size_mib < 64 {
            bail!("--size-mib must be at least 64");
        }
        if self.fill_percent > 100 {
            bail!("--fill-percent must be between 0 and 100");
        }
        if self.reps == 0 {
            bail!("--reps must be at least 1");
        }
        if self.formats.is_empty() {
            bail!("--formats needs at least one of raw, qcow2");
        }
        for f in &self.formats {
            if !["raw", "qcow2"].contains(&f.as_str()) {
                bail!("unknown format {f:?}: raw or qcow2");
            }
        }
        Ok(())
    }

    fn filled_bytes(&self) -> u64 {
        (self.size_mib * self.fill_percent / 100) << 20
    }
}

/// The `ferry` client of the cluster.
struct FerryCli {
    bin: PathBuf,
    config: PathBuf,
}

/// One finished command.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
    secs: f64,
}

impl FerryCli {
    async fn run(&self, args: &[&str]) -> anyhow::Result<Ran> {
        let started = Instant::now();
        let out = tokio::process::Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(COPY_BOUND, out)
            .await
            .with_context(|| format!("`ferry {}` still runs after {COPY_BOUND:?}", args.join(" ")))?
            .context("cannot run ferry")?;
        Ok(Ran {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            secs: started.elapsed().as_secs_f64(),
        })
    }

    async fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let ran = self.run(args).await?;
        if !ran.ok {
            bail!("`ferry {}` failed: {}", args.join(" "), ran.stderr);
        }
        Ok(ran.stdout)
    }
}

/// What a run needs.
struct StorageBench {
    cli: FerryCli,
    qemu_img: PathBuf,
    clock: Clock,
    /// The host's datastore folders.
    from_dir: PathBuf,
    to_dir: PathBuf,
    /// host1's ferryd log (the agent's timeline of each move).
    agent_log: PathBuf,
    /// The work folder (its QEMU is the benchmark's).
    work: PathBuf,
    virtual_bytes: u64,
}

pub async fn run(args: StorageMoveArgs) -> anyhow::Result<()> {
    // Preconditions first: nothing is created unless all hold.
    args.check()?;
    let guest = TestGuest::locate()?;
    let qemu = ferry_qemu::process::find_qemu_binary()?;
    let version = ferry_qemu::process::check_version(&qemu).await?;
    ferry_qemu::process::ensure_supported(&qemu, version)?;
    // The agent runs the qemu-img next to its QEMU; so does the baseline.
    let qemu_img = qemu
        .parent()
        .map(|dir| dir.join("qemu-img"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("qemu-img"));
    let choice = ferry_qemu::accel::choose(ferry_qemu::accel::AccelSetting::Auto);
    let (ferry, ferryd) = crate::binaries(args.no_build)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "warning: not root: the page cache cannot be dropped before the copies (recorded \
             per copy)"
        );
    }

    let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new()
        .prefix("ferry-bench-storage-")
        .tempdir_in(&base)?;
    let loadavg_before = loadavg();
    let others_before = other_qemu_processes(work.path());
    let dir = work.path().join("cluster");
    eprintln!("bringing up a 1-host local cluster in {}", dir.display());
    let mut cluster =
        Cluster::up_with(ferry.clone(), ferryd, dir.clone(), &["up", "--hosts", "1"])?;
    let datastores = dir.join("hosts/host1/datastores");
    let bench = StorageBench {
        cli: FerryCli {
            bin: ferry,
            config: dir.join("ferry.toml"),
        },
        qemu_img: qemu_img.clone(),
        clock: Clock::start(),
        from_dir: datastores.join(FROM),
        to_dir: datastores.join(TO),
        agent_log: dir.join("hosts/host1/ferryd.log"),
        work: work.path().to_path_buf(),
        virtual_bytes: args.size_mib << 20,
    };

    let filled = args.filled_bytes();
    let data = bench.from_dir.join("data.raw");
    eprintln!(
        "writing {} ({} MiB, {} MiB random, then a hole)",
        data.display(),
        args.size_mib,
        filled >> 20
    );
    let write = Instant::now();
    write_data_disk(&data, bench.virtual_bytes, filled)
        .with_context(|| format!("cannot write {}", data.display()))?;
    eprintln!("  written in {:.1} s", write.elapsed().as_secs_f64());
    let allocated_at_start = allocated_bytes(&data);
    let datastore_info = vec![
        datastore(FROM, &bench.from_dir),
        datastore(TO, &bench.to_dir),
    ];

    let tap = SerialTap::spawn(
        dir.join("hosts/host1/state/vms")
            .join(VM)
            .join("serial.sock"),
        bench.clock,
        BOOT,
    );
    let mut runs = Vec::new();
    let mut notes = Vec::new();
    let measured = bench
        .measure(&args, &guest, &work, &tap, &mut runs, &mut notes)
        .await;
    let (guest_conditions, accel) = match measured {
        Ok(found) => found,
        Err(error) => {
            eprintln!("ferry-bench: {error:#}");
            notes.push(format!("the run stopped early: {error:#}"));
            (guest_conditions(&args, None, None), None)
        }
    };
    bench.remove_vm().await;
    let others_after = other_qemu_processes(work.path());
    cluster.down()?;
    if others_after != others_before {
        notes.push(format!(
            "other QEMU processes on the machine: {others_before} before the run, \
             {others_after} after"
        ));
    }

    let (accel, accel_reason) =
        accel.unwrap_or_else(|| (choice.accel.as_str().to_string(), choice.reason.clone()));
    let conditions = StorageConditions {
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?,
        command: command_line(),
        qemu_version: crate::first_line(&qemu.display().to_string(), &["--version"]),
        qemu_img_version: crate::first_line(&qemu_img.display().to_string(), &["--version"]),
        accel,
        accel_reason,
        host_cpu: crate::host_cpu(),
        host_cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        host_memory_mib: host_memory_mib(),
        kernel: crate::first_line("uname", &["-r"]),
        loadavg: vec![loadavg_before, loadavg()],
        other_qemu_processes: others_before.max(others_after),
        datastores: datastore_info,
        disk_virtual_bytes: bench.virtual_bytes,
        disk_filled_bytes: filled,
        disk_allocated_bytes: allocated_at_start,
        source_format: "raw".to_string(),
        target_formats: args.formats.clone(),
        repetitions: args.reps,
        guest: guest_conditions,
        page_cache: "`sync; echo 3 > /proc/sys/vm/drop_caches` right before every timed copy \
                     (both tools; returns too), as root. The datastores' block device is itself \
                     a virtual disk of this machine: caching by the host underneath is outside \
                     the benchmark's reach."
            .to_string(),
        ferry: format!(
            "`ferry storage move {VM} --disk {DATA_DISK} --to {TO} --format F --wait -o json` \
             (no --backup, no --bandwidth). Through the controller, the host's agent creates the \
             target with `qemu-img create`, opens it in the running QEMU (cache writeback: page \
             cache, aio threads) and mirrors the disk into it with `blockdev-mirror` (sync full, \
             copy-mode write-blocking, no speed cap) from the disk's node (the spec's default \
             cache=none: O_DIRECT, aio native); once the mirror is ready it pauses the guest, \
             completes the mirror, closes the target (flushed), compares both files with \
             `qemu-img compare` (the verification), reopens the target, pivots the disk onto it, \
             resumes the guest and deletes the old file. The VM runs on the host throughout."
        ),
        qemu_img: format!(
            "`{} convert -U -f raw -O F {FROM}/data.raw {TO}/baseline.F`: the VM's current disk \
             file, read while the VM runs (-U: without taking its lock; the guest's few records \
             written meanwhile do not change the work), with qemu-img's defaults (source cache \
             writeback, output cache unsafe, 8 coroutines, in-order writes); then `fsync` of the \
             target, timed apart. The target is deleted after each copy.",
            qemu_img.display()
        ),
    };
    let summary: Vec<FormatSummary> = args
        .formats
        .iter()
        .filter_map(|f| FormatSummary::of(&runs, f))
        .collect();
    let report = StorageReport {
        format_version: STORAGE_FORMAT_VERSION,
        benchmark: BENCHMARK.to_string(),
        conditions,
        summary,
        runs,
        notes,
    };
    let stem = format!("storage-move-{}", &report.conditions.date[..10]);
    let md = args.out.join(format!("{stem}.md"));
    let json = args.out.join(format!("{stem}.json"));
    std::fs::write(&md, report.markdown())?;
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", report.markdown());
    eprintln!("results: {} and {}", md.display(), json.display());
    drop(work);
    let expected = args.formats.len() * args.reps as usize;
    let measured_runs = report
        .runs
        .iter()
        .filter(|r| r.purpose == "measured")
        .count();
    if measured_runs != expected * 2 {
        bail!("some copies failed (see above); the results hold the others");
    }
    Ok(())
}

impl StorageBench {
    /// Creates and boots the VM, then runs every copy; `runs` and `notes`
    /// keep what was measured even when a step fails. Returns the guest's
    /// conditions and the accelerator the VM ran with.
    async fn measure(
        &self,
        args: &StorageMoveArgs,
        guest: &TestGuest,
        work: &tempfile::TempDir,
        tap: &SerialTap,
        runs: &mut Vec<CopyRun>,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<(GuestConditions, Option<(String, String)>)> {
        let spec = work.path().join("vm.toml");
        std::fs::write(&spec, spec_toml(guest, args.disk_rate))?;
        eprintln!("creating and starting {VM} on host1");
        self.cli
            .ok(&[
                "vm",
                "create",
                "-f",
                &spec.display().to_string(),
                "--host",
                "host1",
                "--start",
            ])
            .await?;
        let ready = tap
            .wait_until(BOOT, |a| a.iter().any(|x| x.line == ProbeLine::Ready))
            .await;
        anyhow::ensure!(ready, "no `probe-ready` on {VM}'s console within {BOOT:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle_from = self.clock.ms();
        tokio::time::sleep(IDLE).await;
        let idle = window(&tap.arrivals(), idle_from, self.clock.ms());
        let conditions = guest_conditions(args, idle.records_per_sec, idle.heartbeat_gap_ms);
        eprintln!(
            "guest idle: {} records/s flushed, longest heartbeat gap {} ms",
            idle.records_per_sec
                .map_or("–".to_string(), |r| format!("{r:.1}")),
            idle.heartbeat_gap_ms
                .map_or("–".to_string(), |g| format!("{g:.0}"))
        );
        let shown: serde_json::Value =
            serde_json::from_str(&self.cli.ok(&["vm", "show", VM, "-o", "json"]).await?)
                .context("`ferry vm show -o json` printed no JSON")?;
        let accel = shown["accel"].as_str().map(|a| {
            (
                a.to_string(),
                shown["accel_reason"].as_str().unwrap_or("").to_string(),
            )
        });

        for rep in 1..=args.reps {
            for format in &args.formats {
                // Odd repetitions start with qemu-img, even ones with Ferry:
                // whatever the previous copy leaves behind (the old file's
                // discards, writeback) falls on both alike.
                let qemu_img_first = rep % 2 == 1;
                eprintln!(
                    "repetition {rep}, raw → {format} ({} first)",
                    if qemu_img_first { "qemu-img" } else { "ferry" }
                );
                if qemu_img_first {
                    self.baseline_round(rep, format, tap, runs, notes).await;
                    self.ferry_round(rep, format, tap, runs, notes).await?;
                } else {
                    self.ferry_round(rep, format, tap, runs, notes).await?;
                    self.baseline_round(rep, format, tap, runs, notes).await;
                }
            }
        }
        Ok((conditions, accel))
    }

    /// One timed `qemu-img convert`; a failure is noted and the run goes on.
    async fn baseline_round(
        &self,
        rep: u32,
        format: &str,
        tap: &SerialTap,
        runs: &mut Vec<CopyRun>,
        notes: &mut Vec<String>,
    ) {
        match self.baseline(rep, format, tap).await {
            Ok(run) => {
                eprintln!("  qemu-img: {}", summary(&run));
                runs.push(run);
            }
            Err(e) => {
                eprintln!("  qemu-img failed: {e:#}");
                notes.push(format!("rep {rep}, qemu-img → {format}: {e:#}"));
            }
        }
        tokio::time::sleep(BETWEEN).await;
    }

    /// One timed Ferry move to `TO` in `format`, then the return to `FROM`
    /// as raw. A failed move is noted (the VM keeps its disk where it was);
    /// a failed return ends the run (the next copy has nothing to read).
    async fn ferry_round(
        &self,
        rep: u32,
        format: &str,
        tap: &SerialTap,
        runs: &mut Vec<CopyRun>,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let moved = self
            .ferry_move(rep, "measured", (FROM, TO), "raw", format, tap)
            .await;
        tokio::time::sleep(BETWEEN).await;
        match moved {
            Ok(run) => {
                eprintln!("  ferry:    {}", summary(&run));
                runs.push(run);
            }
            Err(e) => {
                eprintln!("  ferry failed: {e:#}");
                notes.push(format!("rep {rep}, ferry → {format}: {e:#}"));
                return Ok(());
            }
        }
        let back = self
            .ferry_move(rep, "return", (TO, FROM), format, "raw", tap)
            .await
            .context("moving the disk back")?;
        eprintln!("  return:   {}", summary(&back));
        runs.push(back);
        tokio::time::sleep(BETWEEN).await;
        Ok(())
    }

    /// `qemu-img convert` of the VM's current file into the other
    /// datastore, then `fsync` of the copy; the copy is deleted.
    async fn baseline(&self, rep: u32, format: &str, tap: &SerialTap) -> anyhow::Result<CopyRun> {
        let source = self.from_dir.join("data.raw");
        let target = self.to_dir.join(format!("baseline.{format}"));
        let _ = std::fs::remove_file(&target);
        let source_allocated = allocated_bytes(&source);
        let (load1, others) = (load1(), other_qemu_processes(&self.work));
        let caches_dropped = drop_caches();
        let from_ms = self.clock.ms();
        let started = Instant::now();
        let out = tokio::process::Command::new(&self.qemu_img)
            .args(["convert", "-U", "-f", "raw", "-O", format])
            .arg(&source)
            .arg(&target)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(COPY_BOUND, out)
            .await
            .context("qemu-img convert still runs")?
            .context("cannot run qemu-img")?;
        let wall_s = started.elapsed().as_secs_f64();
        if !out.status.success() {
            let _ = std::fs::remove_file(&target);
            bail!(
                "qemu-img convert failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let synced = Instant::now();
        let path = target.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&path)?.sync_all())
            .await
            .context("the fsync thread failed")?
            .with_context(|| format!("cannot fsync {}", target.display()))?;
        let sync_s = synced.elapsed().as_secs_f64();
        let to_ms = self.clock.ms();
        let target_allocated = allocated_bytes(&target);
        std::fs::remove_file(&target)
            .with_context(|| format!("cannot remove {}", target.display()))?;
        let seen = window(&tap.arrivals(), from_ms, to_ms);
        Ok(CopyRun {
            repetition: rep,
            tool: "qemu-img".to_string(),
            purpose: "measured".to_string(),
            from_datastore: FROM.to_string(),
            to_datastore: TO.to_string(),
            from_format: "raw".to_string(),
            to_format: format.to_string(),
            virtual_bytes: self.virtual_bytes,
            source_allocated_bytes: source_allocated,
            target_allocated_bytes: target_allocated,
            caches_dropped,
            load1,
            other_qemu_processes: others,
            wall_s,
            sync_s: Some(sync_s),
            total_ms: None,
            paused_ms: None,
            verify_ms: None,
            verified: None,
            phases: vec![],
            migration_id: None,
            agent_mirror_ms: None,
            agent_after_switch_ms: None,
            outside_agent_ms: None,
            guest_heartbeat_gap_ms: seen.heartbeat_gap_ms,
            guest_write_gap_ms: seen.write_gap_ms,
            guest_records_per_sec: seen.records_per_sec,
            notes: vec![],
        })
    }

    /// `ferry storage move` of the data disk from `route.0` to `route.1`
    /// in format `to_format`, timed.
    async fn ferry_move(
        &self,
        rep: u32,
        purpose: &str,
        route: (&str, &str),
        from_format: &str,
        to_format: &str,
        tap: &SerialTap,
    ) -> anyhow::Result<CopyRun> {
        let (from_dir, to_dir) = if route.0 == FROM {
            (&self.from_dir, &self.to_dir)
        } else {
            (&self.to_dir, &self.from_dir)
        };
        let source = from_dir.join(format!("data.{from_format}"));
        let source_allocated = allocated_bytes(&source);
        let (load1, others) = (load1(), other_qemu_processes(&self.work));
        let caches_dropped = drop_caches();
        let from_ms = self.clock.ms();
        let ran = self
            .cli
            .run(&[
                "storage", "move", VM, "--disk", DATA_DISK, "--to", route.1, "--format", to_format,
                "--wait", "-o", "json",
            ])
            .await?;
        let to_ms = self.clock.ms();
        let report: Option<MigrationReport> = serde_json::from_str(&ran.stdout).ok();
        let report = match report {
            Some(report) if ran.ok && report.status == MigrationStatus::Completed => report,
            Some(report) => bail!(
                "storage move {} ended {}: {}",
                report.id,
                report.status,
                report.error.as_deref().unwrap_or(&ran.stderr)
            ),
            None => bail!("`ferry storage move` failed: {}", ran.stderr),
        };
        let target = report
            .disk_moves
            .iter()
            .find(|m| m.disk_id == DATA_DISK)
            .map(|m| PathBuf::from(&m.to_path))
            .unwrap_or_else(|| to_dir.join(format!("data.{to_format}")));
        let seen = window(&tap.arrivals(), from_ms, to_ms);
        let mut notes = Vec::new();
        if let Some(v) = &report.verification {
            if v.status != "verified" {
                notes.push(format!("verification {}: {}", v.status, v.detail));
            }
        }
        if report.paused_ms.is_none() {
            notes.push("the report has no paused_ms".to_string());
        }
        let id = report.id.to_string();
        let log = std::fs::read_to_string(&self.agent_log).unwrap_or_default();
        let timeline = AgentTimeline::from_log(&log, &id);
        if timeline.is_none() {
            notes.push(format!(
                "the agent's log has no complete timeline of move {id}"
            ));
        }
        let (mirror, after, outside) = match (timeline, report.paused_ms) {
            (Some(t), Some(paused)) => {
                let inside = t.completed_ms - t.started_ms;
                (
                    Some((t.switched_ms - t.started_ms).saturating_sub(paused)),
                    Some(t.completed_ms - t.switched_ms),
                    Some(((ran.secs * 1000.0) as u64).saturating_sub(inside)),
                )
            }
            _ => (None, None, None),
        };
        Ok(CopyRun {
            repetition: rep,
            tool: "ferry".to_string(),
            purpose: purpose.to_string(),
            from_datastore: route.0.to_string(),
            to_datastore: route.1.to_string(),
            from_format: from_format.to_string(),
            to_format: to_format.to_string(),
            virtual_bytes: report
                .disk_moves
                .iter()
                .find(|m| m.disk_id == DATA_DISK)
                .map_or(self.virtual_bytes, |m| m.virtual_size_bytes),
            source_allocated_bytes: source_allocated,
            target_allocated_bytes: allocated_bytes(&target),
            caches_dropped,
            load1,
            other_qemu_processes: others,
            wall_s: ran.secs,
            sync_s: None,
            total_ms: Some(report.total_ms),
            paused_ms: report.paused_ms,
            verify_ms: report.verification.as_ref().map(|v| v.duration_ms),
            verified: report.verified,
            phases: report
                .phases
                .iter()
                .map(|p| Phase {
                    phase: p.phase.clone(),
                    duration_ms: p.duration_ms,
                })
                .collect(),
            migration_id: Some(id),
            agent_mirror_ms: mirror,
            agent_after_switch_ms: after,
            outside_agent_ms: outside,
            guest_heartbeat_gap_ms: seen.heartbeat_gap_ms,
            guest_write_gap_ms: seen.write_gap_ms,
            guest_records_per_sec: seen.records_per_sec,
            notes,
        })
    }

    /// Stops and deletes the VM (best effort: the cluster's teardown stops
    /// it too).
    async fn remove_vm(&self) {
        let _ = self.cli.run(&["vm", "stop", VM, "--force"]).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match self.cli.run(&["vm", "show", VM, "-o", "json"]).await {
                Ok(ran) if ran.ok => {
                    let state = serde_json::from_str::<serde_json::Value>(&ran.stdout)
                        .ok()
                        .and_then(|v| v["state"].as_str().map(str::to_string));
                    if matches!(state.as_deref(), Some("stopped" | "crashed")) {
                        break;
                    }
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = self.cli.run(&["vm", "delete", VM]).await;
    }
}

/// When the agent logged the steps of one move (ms since the Unix epoch):
/// "storage move started" (the mirror runs), "… switched over" (the guest
/// resumed on the copy), "… completed" (the old file deleted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AgentTimeline {
    started_ms: u64,
    switched_ms: u64,
    completed_ms: u64,
}

impl AgentTimeline {
    /// From ferryd's log (tracing's default format: an RFC 3339 timestamp,
    /// the level, the target, the message, the fields).
    fn from_log(log: &str, move_id: &str) -> Option<AgentTimeline> {
        let at = |message: &str| {
            log.lines()
                .filter(|l| l.contains(message) && l.contains(move_id))
                .find_map(|l| {
                    let stamp = l.split_whitespace().next()?;
                    let t = time::OffsetDateTime::parse(
                        stamp,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .ok()?;
                    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
                })
        };
        let t = AgentTimeline {
            started_ms: at("storage move started")?,
            switched_ms: at("storage move switched over")?,
            completed_ms: at("storage move completed")?,
        };
        (t.started_ms <= t.switched_ms && t.switched_ms <= t.completed_ms).then_some(t)
    }
}

/// The guest's side of the conditions.
fn guest_conditions(
    args: &StorageMoveArgs,
    records_per_sec: Option<f64>,
    heartbeat_gap_ms: Option<f64>,
) -> GuestConditions {
    GuestConditions {
        ram_mib: RAM_MIB,
        vcpus: 1,
        description: format!(
            "the test guest (Debian cloud kernel, busybox, ferry-probe), direct kernel boot; \
             disks `{BOOT_DISK}` (virtio, /dev/vda: a copy of target/test-guest/disk.raw, 128 MiB \
             raw, in `{FROM}`, not moved) and `{DATA_DISK}` (virtio, /dev/vdb: the moved disk); \
             both cache=none; no NIC; memory probe: 16 MiB working set dirtied at 1 MiB/s"
        ),
        heartbeat_ms: HB_MS,
        disk_records_per_sec_set: args.disk_rate,
        disk_records_device: if args.disk_rate > 0 {
            "/dev/vdb".to_string()
        } else {
            "none".to_string()
        },
        disk_records_per_sec_idle: records_per_sec,
        idle_heartbeat_gap_ms: heartbeat_gap_ms,
        idle_window_s: IDLE.as_secs_f64(),
    }
}

/// The VM: the test guest booted from its kernel, its boot disk (a copy
/// of `disk.raw`) and the data disk the benchmark wrote.
fn spec_toml(guest: &TestGuest, disk_rate: u64) -> String {
    let probe = ProbeConfig {
        ram_mib: RAM_MIB,
        reserved_mib: 64,
        mem_mib: 16,
        mem_rate: 1,
        hb_ms: HB_MS,
        // The probe's rate 0 means "flat out": --disk-rate 0 turns it off.
        disk: (disk_rate > 0).then(|| "/dev/vdb".to_string()),
        disk_optional: false,
        disk_rate,
        quiet: true,
    };
    format!(
        r#"name = "{VM}"
vcpus = 1
memory = "{RAM_MIB}MiB"

[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "{cmdline}"

[[disks]]
id = "{BOOT_DISK}"
datastore = "{FROM}"
file = "boot.raw"
format = "raw"
image = "{image}"

[[disks]]
id = "{DATA_DISK}"
datastore = "{FROM}"
file = "data.raw"
format = "raw"
"#,
        kernel = guest.kernel.display(),
        initrd = guest.initrd.display(),
        cmdline = probe.kernel_cmdline(),
        image = guest.disk.display(),
    )
}

/// What the guest did over a window of the benchmark's clock.
#[derive(Debug, Default, PartialEq)]
struct Window {
    heartbeat_gap_ms: Option<f64>,
    write_gap_ms: Option<f64>,
    records_per_sec: Option<f64>,
}

fn window(arrivals: &[Arrival], from_ms: f64, to_ms: f64) -> Window {
    let beats = stats::merge_heartbeats(&[arrivals]);
    let mut first: BTreeMap<u64, f64> = BTreeMap::new();
    for a in arrivals {
        if let ProbeLine::DiskFlushed(seq) = a.line {
            first
                .entry(seq)
                .and_modify(|at| *at = at.min(a.at_ms))
                .or_insert(a.at_ms);
        }
    }
    let flushed: Vec<(u64, f64)> = first.into_iter().collect();
    let secs = (to_ms - from_ms) / 1000.0;
    let records = flushed
        .iter()
        .filter(|(_, at)| *at >= from_ms && *at <= to_ms)
        .count();
    Window {
        heartbeat_gap_ms: stats::longest_gap(&beats, from_ms, to_ms).map(|g| g.ms),
        write_gap_ms: stats::longest_gap(&flushed, from_ms, to_ms).map(|g| g.ms),
        records_per_sec: (secs > 0.0 && !flushed.is_empty()).then(|| records as f64 / secs),
    }
}

/// The datastore folder and the filesystem it is on.
fn datastore(name: &str, path: &Path) -> DatastoreInfo {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mount = mount_of(&mounts, &path);
    DatastoreInfo {
        name: name.to_string(),
        path: path.display().to_string(),
        statfs_type: crate::first_line("stat", &["-f", "-c", "%T", &path.display().to_string()]),
        mount_type: mount.as_ref().map_or("unknown".into(), |m| m.2.clone()),
        mount_device: mount.as_ref().map_or("unknown".into(), |m| m.0.clone()),
        mount_point: mount.as_ref().map_or("unknown".into(), |m| m.1.clone()),
        mount_options: mount.as_ref().map_or("unknown".into(), |m| m.3.clone()),
    }
}

/// The mount (device, mount point, type, options) holding `path`: the last
/// of the longest mount points containing it in `/proc/self/mounts`.
fn mount_of(mounts: &str, path: &Path) -> Option<(String, String, String, String)> {
    let mut best: Option<(String, String, String, String)> = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 4 {
            continue;
        }
        let point = unescape_mount(fields[1]);
        if !path.starts_with(&point) {
            continue;
        }
        if best.as_ref().is_none_or(|b| point.len() >= b.1.len()) {
            best = Some((
                fields[0].to_string(),
                point,
                fields[2].to_string(),
                fields[3].to_string(),
            ));
        }
    }
    best
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = octal.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// QEMU system emulators running on the machine but not the benchmark's
/// (whose command lines name `ours`, the work folder); `comm` is cut to 15
/// characters: `qemu-system-x86`.
fn other_qemu_processes(ours: &Path) -> usize {
    let ours = ours.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with("qemu-system"))
        })
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&cmdline).contains(&ours)
        })
        .count()
}

/// How the benchmark was started, for the results.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo run --release -p ferry-bench -- {}", args.join(" "))
}

fn summary(run: &CopyRun) -> String {
    let rate = run.virtual_bytes as f64 / run.wall_s / 1048576.0;
    match run.tool.as_str() {
        "qemu-img" => format!(
            "{:.2} s ({rate:.0} MiB/s virtual), fsync {:.2} s, target {} MiB allocated",
            run.wall_s,
            run.sync_s.unwrap_or(0.0),
            run.target_allocated_bytes >> 20
        ),
        _ => format!(
            "{:.2} s ({rate:.0} MiB/s virtual; report total {} ms), paused {} ms, verification {} ms, \
             heartbeat gap {} ms, target {} MiB allocated",
            run.wall_s,
            run.total_ms.map_or("?".into(), |v| v.to_string()),
            run.paused_ms.map_or("?".into(), |v| v.to_string()),
            run.verify_ms.map_or("?".into(), |v| v.to_string()),
            run.guest_heartbeat_gap_ms
                .map_or("?".into(), |v| format!("{v:.0}")),
            run.target_allocated_bytes >> 20
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at_ms: f64, line: ProbeLine) -> Arrival {
        Arrival { at_ms, line }
    }

    #[test]
    fn the_window_counts_flushed_records_and_gaps() {
        let arrivals = [
            at(0.0, ProbeLine::Heartbeat(1)),
            at(10.0, ProbeLine::Heartbeat(2)),
            at(15.0, ProbeLine::DiskFlushed(1)),
            at(20.0, ProbeLine::Heartbeat(3)),
            at(35.0, ProbeLine::DiskFlushed(2)),
            // The pause: 300 ms without anything.
            at(320.0, ProbeLine::Heartbeat(4)),
            at(325.0, ProbeLine::DiskFlushed(3)),
            at(330.0, ProbeLine::Heartbeat(5)),
            at(1000.0, ProbeLine::DiskFlushed(4)),
        ];
        let w = window(&arrivals, 0.0, 500.0);
        assert_eq!(w.heartbeat_gap_ms, Some(300.0));
        assert_eq!(w.write_gap_ms, Some(675.0));
        assert!((w.records_per_sec.unwrap() - 6.0).abs() < 1e-9);
        let quiet = window(&arrivals[..2], 0.0, 10.0);
        assert_eq!(quiet.records_per_sec, None);
        assert_eq!(quiet.write_gap_ms, None);
    }

    #[test]
    fn the_mount_of_a_folder_is_the_longest_prefix() {
        let mounts = "/dev/vda / ext4 rw,relatime 0 0\n\
                      tmpfs /tmp tmpfs rw,nosuid 0 0\n\
                      /dev/vdb /tmp/with\\040space xfs rw 0 0\n\
                      tmpfs /tmpfoo tmpfs rw 0 0\n";
        let m = mount_of(mounts, Path::new("/tmp/x/local")).unwrap();
        assert_eq!((m.1.as_str(), m.2.as_str()), ("/tmp", "tmpfs"));
        let m = mount_of(mounts, Path::new("/tmp/with space/a")).unwrap();
        assert_eq!((m.0.as_str(), m.2.as_str()), ("/dev/vdb", "xfs"));
        let m = mount_of(mounts, Path::new("/tmpfoobar")).unwrap();
        assert_eq!(m.1, "/");
        let m = mount_of(mounts, Path::new("/work/main")).unwrap();
        assert_eq!((m.0.as_str(), m.3.as_str()), ("/dev/vda", "rw,relatime"));
    }

    #[test]
    fn the_data_disk_is_random_then_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        write_data_disk(&path, 8 << 20, 3 << 20).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 8 << 20);
        assert!(data[3 << 20..].iter().all(|&b| b == 0));
        // Random: every 4 KiB page differs from the next, and no byte
        // value dominates.
        let pages: Vec<&[u8]> = data[..3 << 20].chunks(4096).collect();
        assert!(pages.windows(2).all(|w| w[0] != w[1]));
        let zeros = data[..3 << 20].iter().filter(|&&b| b == 0).count();
        assert!(zeros < (3 << 20) / 128, "{zeros} zero bytes");
    }

    #[test]
    fn the_spec_puts_both_disks_in_local_and_the_probe_on_the_data_disk() {
        let guest = TestGuest {
            dir: "/g".into(),
            kernel: "/g/vmlinuz".into(),
            initrd: "/g/initramfs.img".into(),
            disk: "/g/disk.raw".into(),
        };
        let text = spec_toml(&guest, 50);
        assert!(
            text.contains("ferry.disk=/dev/vdb ferry.disk_rate=50"),
            "{text}"
        );
        let spec = ferry_core::spec::VmSpec::from_toml_str(&text, Path::new("/g")).unwrap();
        assert_eq!(spec.disks.len(), 2);
        assert_eq!(spec.disks[1].id, DATA_DISK);
        assert!(spec_toml(&guest, 0).contains("ferry.disk=none"));
    }

    #[test]
    fn the_agent_timeline_comes_from_its_log() {
        let log = "2026-11-28T06:51:40.100000Z  INFO ferry_agent::vm::storage: storage move started vm=\"bench-storage\" move_id=aaa live=true disks=1\n\
                   2026-11-28T06:51:40.200000Z  INFO ferry_agent::vm::storage: storage move started vm=\"bench-storage\" move_id=bbb live=true disks=1\n\
                   2026-11-28T06:51:41.350000Z  INFO ferry_agent::vm::storage: storage move switched over vm=\"bench-storage\" move_id=bbb paused_ms=100 verify_ms=90\n\
                   2026-11-28T06:51:41.360000Z  INFO ferry_agent::vm::storage: storage move completed vm=\"bench-storage\" move_id=bbb\n";
        let t = AgentTimeline::from_log(log, "bbb").unwrap();
        assert_eq!(t.switched_ms - t.started_ms, 1150);
        assert_eq!(t.completed_ms - t.switched_ms, 10);
        assert_eq!(AgentTimeline::from_log(log, "aaa"), None);
    }

    #[test]
    fn arguments_are_checked() {
        let args = |size_mib, fill_percent, formats: &[&str]| StorageMoveArgs {
            size_mib,
            fill_percent,
            reps: 1,
            formats: formats.iter().map(|f| f.to_string()).collect(),
            disk_rate: 50,
            work_dir: None,
            out: PathBuf::new(),
            no_build: true,
        };
        assert!(args(1024, 75, &["raw", "qcow2"]).check().is_ok());
        assert_eq!(args(1024, 75, &["raw"]).filled_bytes(), 768 << 20);
        assert!(args(16, 75, &["raw"]).check().is_err());
        assert!(args(1024, 101, &["raw"]).check().is_err());
        assert!(args(1024, 75, &["vmdk"]).check().is_err());
        assert!(args(1024, 75, &[]).check().is_err());
    }
}

//! `ferry-bench import-ova`: Ferry's import of an OVA against a plain
//! `tar x` + `qemu-img convert` of the same file, in one run.
//!
//! ```text
//!  ferry local up --hosts 1 ─▶ data.raw (random bytes, then a hole) in `local`
//!  ─▶ VM bench-import (stopped, never started) ─▶ ferry export --format ova
//!  for each repetition (odd: baseline first, even: Ferry first):
//!    drop caches ─▶ tar xf X.ova -C fresh ─▶ qemu-img convert -f vmdk -O qcow2 ─▶ fsync
//!    drop caches ─▶ ferry import X.ova --host host1 --name imp-N --new-macs -o json
//!                   (then, untimed, ferry vm delete imp-N)
//!  ─▶ results/import-ova-DATE.{md,json} ─▶ ferry local down --purge
//! ```
//!
//! Root is needed to drop the page cache. See `bench/README.md`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::import_report::{
    FerryBuild, FilesystemInfo, ImportConditions, ImportReport, ImportRun, ImportSummary,
    OvaMember, BENCHMARK, IMPORT_FORMAT_VERSION,
};
use crate::machine::{
    allocated_bytes, drop_caches, host_memory_mib, load1, loadavg, write_data_disk,
};
use crate::Cluster;

/// The source VM, its only disk, and the datastore it is in.
const VM: &str = "bench-import";
const DISK: &str = "data";
const DATASTORE: &str = "local";
/// Longest a single command (export, import, baseline step) may take.
const BOUND: Duration = Duration::from_secs(900);
/// A breather between two timed runs.
const BETWEEN: Duration = Duration::from_secs(1);

/// `ferry-bench import-ova`.
#[derive(Debug, clap::Args)]
pub struct ImportOvaArgs {
    /// Virtual size of the VM's disk, MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Share of the disk written with random (incompressible) bytes from
    /// offset 0, percent; the rest stays a hole.
    #[arg(long, default_value_t = 75)]
    pub fill_percent: u64,
    /// Repetitions (each: one baseline, one Ferry import).
    #[arg(long, default_value_t = 3)]
    pub reps: u32,
    /// Which build of ferry and ferryd to measure: `auto` takes
    /// target/release if both binaries are there and newer than
    /// target/debug's, else target/debug.
    #[arg(long, value_enum, default_value = "auto")]
    pub profile: ProfileArg,
    /// Folder the cluster, the OVA and both tools' scratch space go in
    /// (default: the system's temporary folder).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Where the Markdown and JSON results go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    pub out: PathBuf,
    /// Under `cargo run`, do not (re)build ferry and ferryd in the
    /// benchmark's profile first.
    #[arg(long)]
    pub no_build: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileArg {
    Auto,
    Release,
    Debug,
}

impl ImportOvaArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.size_mib < 16 {
            bail!("--size-mib must be at least 16");
        }
        if self.fill_percent > 100 {
            bail!("--fill-percent must be between 0 and 100");
        }
        if self.reps == 0 {
            bail!("--reps must be at least 1");
        }
        Ok(())
    }

    fn filled_bytes(&self) -> u64 {
        (self.size_mib * self.fill_percent / 100) << 20
    }
}

/// What `ferry import -o json` prints (the fields used here).
#[derive(Debug, Deserialize)]
struct ImportOut {
    vm: String,
    disks: Vec<ImportedDisk>,
}

#[derive(Debug, Deserialize)]
struct ImportedDisk {
    image: ImageOut,
    target_file: String,
    target_format: String,
    verified: Option<bool>,
    convert_ms: Option<u64>,
    verify_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ImageOut {
    virtual_size: u64,
}

/// One finished command.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
    secs: f64,
}

/// Runs `program args` with `env`, bounded by [`BOUND`], timed.
async fn run_timed(program: &Path, args: &[&str], env: &[(&str, &Path)]) -> anyhow::Result<Ran> {
    let started = Instant::now();
    let mut command = tokio::process::Command::new(program);
    command.args(args).kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let out = tokio::time::timeout(BOUND, command.output())
        .await
        .with_context(|| {
            format!(
                "`{} {}` still runs after {BOUND:?}",
                program.display(),
                args.join(" ")
            )
        })?
        .with_context(|| format!("cannot run {}", program.display()))?;
    Ok(Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        secs: started.elapsed().as_secs_f64(),
    })
}

/// What a run needs.
struct ImportBench {
    ferry: PathBuf,
    config: PathBuf,
    qemu_img: PathBuf,
    /// host1's datastore `local`.
    datastore: PathBuf,
    /// The OVA, and its disk member.
    ova: PathBuf,
    vmdk_member: String,
    /// Scratch folders: the baseline's, and Ferry's `TMPDIR`.
    scratch: PathBuf,
    ferry_tmp: PathBuf,
    /// The whole work folder (processes naming it are the benchmark's).
    work: PathBuf,
    virtual_bytes: u64,
}

impl ImportBench {
    /// `ferry --config CONFIG ARGS`, with `TMPDIR` in the work folder.
    async fn ferry(&self, args: &[&str]) -> anyhow::Result<Ran> {
        let mut all = vec!["--config", self.config.to_str().context("config path")?];
        all.extend_from_slice(args);
        run_timed(&self.ferry, &all, &[("TMPDIR", &self.ferry_tmp)]).await
    }

    async fn ferry_ok(&self, args: &[&str]) -> anyhow::Result<Ran> {
        let ran = self.ferry(args).await?;
        if !ran.ok {
            bail!("`ferry {}` failed: {}", args.join(" "), ran.stderr);
        }
        Ok(ran)
    }

    /// Drop caches, then `tar xf` into a fresh folder, `qemu-img convert`
    /// of the disk member to qcow2, `fsync` of the qcow2; the folder is
    /// removed afterwards.
    async fn baseline(&self, rep: u32, first: bool) -> anyhow::Result<ImportRun> {
        let dir = self.scratch.join(format!("baseline-{rep}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let output = dir.join("out.qcow2");
        let ova = self.ova.to_str().context("OVA path")?;
        let dir_s = dir.to_str().context("scratch path")?;
        let member = dir.join(&self.vmdk_member);
        let load1 = load1();
        let others = other_processes(&self.work);
        let caches_dropped = drop_caches();
        let started = Instant::now();
        let untar = run_timed(Path::new("tar"), &["xf", ova, "-C", dir_s], &[]).await?;
        if !untar.ok {
            bail!("tar xf failed: {}", untar.stderr);
        }
        let convert = run_timed(
            &self.qemu_img,
            &[
                "convert",
                "-f",
                "vmdk",
                "-O",
                "qcow2",
                member.to_str().context("member path")?,
                output.to_str().context("output path")?,
            ],
            &[],
        )
        .await?;
        if !convert.ok {
            bail!("qemu-img convert failed: {}", convert.stderr);
        }
        let synced = Instant::now();
        let path = output.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&path)?.sync_all())
            .await
            .context("the fsync thread failed")?
            .with_context(|| format!("cannot fsync {}", output.display()))?;
        let sync_s = synced.elapsed().as_secs_f64();
        let wall_s = started.elapsed().as_secs_f64();
        let target_allocated_bytes = allocated_bytes(&output);
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {dir_s}"))?;
        Ok(ImportRun {
            repetition: rep,
            tool: "baseline".to_string(),
            first,
            caches_dropped,
            load1,
            other_processes: others,
            virtual_bytes: self.virtual_bytes,
            target_allocated_bytes,
            wall_s,
            extract_s: Some(untar.secs),
            convert_s: Some(convert.secs),
            sync_s: Some(sync_s),
            convert_ms: None,
            verify_ms: None,
            rest_ms: None,
            verified: None,
            vm: None,
            target_file: None,
            notes: vec![],
        })
    }

    /// Drop caches, then the whole `ferry import`, timed; then (untimed)
    /// `ferry vm delete` of the imported VM.
    async fn ferry_import(&self, rep: u32, first: bool) -> anyhow::Result<ImportRun> {
        let name = format!("imp-{rep}");
        let ova = self.ova.to_str().context("OVA path")?;
        let load1 = load1();
        let others = other_processes(&self.work);
        let caches_dropped = drop_caches();
        let ran = self
            .ferry(&[
                "import",
                ova,
                "--host",
                "host1",
                "--name",
                &name,
                "--new-macs",
                "-o",
                "json",
            ])
            .await?;
        if !ran.ok {
            // A VM may have been defined before the failure.
            let _ = self.ferry(&["vm", "delete", &name]).await;
            bail!(
                "`ferry import` failed after {:.1} s: {}",
                ran.secs,
                ran.stderr
            );
        }
        let mut notes = Vec::new();
        let report: ImportOut = match serde_json::from_str(&ran.stdout) {
            Ok(report) => report,
            Err(e) => {
                let _ = self.ferry(&["vm", "delete", &name]).await;
                bail!(
                    "`ferry import -o json` printed no report ({e}): {}",
                    ran.stdout
                );
            }
        };
        if report.vm != name {
            notes.push(format!("the report names the VM {:?}", report.vm));
        }
        let disk = report
            .disks
            .first()
            .context("the import report lists no disk")?;
        if report.disks.len() != 1 {
            notes.push(format!("{} disks imported", report.disks.len()));
        }
        if disk.target_format != "qcow2" {
            notes.push(format!("target format {}", disk.target_format));
        }
        if disk.verified != Some(true) {
            notes.push(format!("verified: {:?}", disk.verified));
        }
        if disk.image.virtual_size != self.virtual_bytes {
            notes.push(format!(
                "virtual size {} (the source's is {})",
                disk.image.virtual_size, self.virtual_bytes
            ));
        }
        let target = self.datastore.join(&disk.target_file);
        let target_allocated_bytes = allocated_bytes(&target);
        if !target.exists() {
            notes.push(format!("{} is not in the datastore", disk.target_file));
        }
        let wall_ms = (ran.secs * 1000.0) as u64;
        let rest_ms = match (disk.convert_ms, disk.verify_ms) {
            (Some(c), Some(v)) => Some(wall_ms.saturating_sub(c + v)),
            _ => None,
        };
        match self.ferry(&["vm", "delete", &name]).await {
            Ok(deleted) if deleted.ok => {}
            Ok(deleted) => notes.push(format!("`ferry vm delete` failed: {}", deleted.stderr)),
            Err(e) => notes.push(format!("`ferry vm delete` failed: {e:#}")),
        }
        if target.exists() {
            notes.push(format!(
                "{} was still in the datastore after `ferry vm delete`: removed by the benchmark",
                disk.target_file
            ));
            let _ = std::fs::remove_file(&target);
        }
        Ok(ImportRun {
            repetition: rep,
            tool: "ferry".to_string(),
            first,
            caches_dropped,
            load1,
            other_processes: others,
            virtual_bytes: disk.image.virtual_size,
            target_allocated_bytes,
            wall_s: ran.secs,
            extract_s: None,
            convert_s: None,
            sync_s: None,
            convert_ms: disk.convert_ms,
            verify_ms: disk.verify_ms,
            rest_ms,
            verified: disk.verified,
            vm: Some(name),
            target_file: Some(disk.target_file.clone()),
            notes,
        })
    }

    /// Every repetition; a failed run is noted and the others go on.
    async fn measure(&self, reps: u32, runs: &mut Vec<ImportRun>, notes: &mut Vec<String>) {
        for rep in 1..=reps {
            // Odd repetitions start with the baseline, even ones with Ferry:
            // what one run leaves behind (writeback, the deleted files'
            // discards) falls on both alike.
            let baseline_first = rep % 2 == 1;
            eprintln!(
                "repetition {rep} ({} first)",
                if baseline_first { "baseline" } else { "ferry" }
            );
            for baseline in [baseline_first, !baseline_first] {
                let first = baseline == baseline_first;
                let outcome = if baseline {
                    self.baseline(rep, first).await
                } else {
                    self.ferry_import(rep, first).await
                };
                let tool = if baseline { "baseline" } else { "ferry" };
                match outcome {
                    Ok(run) => {
                        eprintln!("  {tool:8} {}", summary(&run));
                        runs.push(run);
                    }
                    Err(e) => {
                        eprintln!("  {tool} failed: {e:#}");
                        notes.push(format!("rep {rep}, {tool}: {e:#}"));
                    }
                }
                tokio::time::sleep(BETWEEN).await;
            }
        }
    }
}

pub async fn run(args: ImportOvaArgs) -> anyhow::Result<()> {
    // Preconditions first: nothing is created unless all hold.
    args.check()?;
    if !nix::unistd::geteuid().is_root() || !drop_caches() {
        bail!(
            "this benchmark drops the page cache before every timed run \
             (`echo 3 > /proc/sys/vm/drop_caches`): run it as root"
        );
    }
    let qemu_img = on_path("qemu-img").context(
        "qemu-img is not on PATH (install qemu-utils): both Ferry and the baseline run it",
    )?;
    on_path("tar").context("tar is not on PATH")?;
    if !args.no_build && std::env::var_os("CARGO").is_some() {
        crate::binaries(false)?;
    }
    let build = pick_binaries(args.profile)?;
    let (ferry, ferryd) = (PathBuf::from(&build.ferry), PathBuf::from(&build.ferryd));
    let help = run_timed(&ferry, &["import", "--help"], &[]).await?;
    if !help.ok {
        bail!(
            "{} has no `import` subcommand (a stale build?): {}",
            ferry.display(),
            help.stderr
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new()
        .prefix("ferry-bench-import-")
        .tempdir_in(&base)?;
    let loadavg_before = loadavg();
    let others_before = other_processes(work.path());
    let dir = work.path().join("cluster");
    eprintln!(
        "bringing up a 1-host local cluster in {} ({} build)",
        dir.display(),
        build.profile
    );
    let mut cluster =
        Cluster::up_with(ferry.clone(), ferryd, dir.clone(), &["up", "--hosts", "1"])?;
    let mut bench = ImportBench {
        ferry,
        config: dir.join("ferry.toml"),
        qemu_img: qemu_img.clone(),
        datastore: dir.join("hosts/host1/datastores").join(DATASTORE),
        ova: work.path().join("ova").join(format!("{VM}.ova")),
        vmdk_member: String::new(),
        scratch: work.path().join("scratch"),
        ferry_tmp: work.path().join("tmp"),
        work: work.path().to_path_buf(),
        virtual_bytes: args.size_mib << 20,
    };
    let mut runs = Vec::new();
    let mut notes = Vec::new();
    let prepared = prepare(&args, &mut bench).await;
    if prepared.is_ok() {
        bench.measure(args.reps, &mut runs, &mut notes).await;
    }
    let _ = bench.ferry(&["vm", "delete", VM]).await;
    let down = cluster.down();
    let prepared = prepared?;
    down?;
    let others_after = other_processes(work.path());
    let rebuilt = pick_binaries(ProfileArg::Auto)
        .ok()
        .filter(|now| now.profile != build.profile || now.built != build.built);
    if let Some(now) = rebuilt {
        notes.push(format!(
            "the binaries changed during the run (someone rebuilt them): at the end `--profile \
             auto` would take {} ({})",
            now.profile, now.built
        ));
    }

    let conditions = ImportConditions {
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?,
        command: command_line(),
        accel: "irrelevant: no guest runs (the source VM is defined and never started, the \
                imported VMs are only defined); nothing here uses KVM or TCG"
            .to_string(),
        qemu_img: qemu_img.display().to_string(),
        qemu_img_version: crate::first_line(&qemu_img.display().to_string(), &["--version"]),
        tar_version: crate::first_line("tar", &["--version"]),
        host_cpu: crate::host_cpu(),
        host_cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        host_memory_mib: host_memory_mib(),
        kernel: crate::first_line("uname", &["-r"]),
        loadavg: vec![loadavg_before, loadavg()],
        other_processes: runs
            .iter()
            .map(|r| r.other_processes)
            .chain([others_before, others_after])
            .max()
            .unwrap_or(0),
        work_dir: filesystem(work.path()),
        disk_virtual_bytes: bench.virtual_bytes,
        disk_filled_bytes: args.filled_bytes(),
        disk_allocated_bytes: prepared.disk_allocated_bytes,
        ova_bytes: prepared.ova_bytes,
        ova_members: prepared.members.clone(),
        export_s: prepared.export_s,
        export_command: format!("ferry export {VM} --format ova -o {VM}.ova"),
        target_format: "qcow2".to_string(),
        repetitions: args.reps,
        ferry_build: build,
        page_cache: "`sync; echo 3 > /proc/sys/vm/drop_caches` right before every timed run \
                     (both tools), as root. The work folder's block device is itself a virtual \
                     disk of this machine: caching by the host underneath is outside the \
                     benchmark's reach."
            .to_string(),
        ferry: format!(
            "`ferry import {VM}.ova --host host1 --name imp-N --new-macs -o json` (target format \
             qcow2, the default; datastore `{DATASTORE}`), with `TMPDIR` in the work folder. The \
             CLI checks the manifest's SHA-256 digests (reading every member), inspects the \
             VMDK in the archive, inspects it again, converts it in place with `qemu-img \
             convert -p --image-opts driver=vmdk,file.driver=raw,file.offset=…,file.size=… -O \
             qcow2` (the member is never extracted; under CPU-time and address-space limits), \
             compares it with `qemu-img compare` (the verification), streams the qcow2 through the controller into host1's datastore \
             (SHA-256 on both sides), and defines the VM (not started). The imported VM is \
             deleted (`ferry vm delete imp-N`, untimed) before the next run."
        ),
        baseline: format!(
            "`tar xf {VM}.ova -C FRESH` (every member, GNU tar's defaults), then `{} convert -f \
             vmdk -O qcow2 FRESH/{} FRESH/out.qcow2` (qemu-img's defaults: output cache \
             unsafe, it flushes nothing), then `fsync` of out.qcow2 — all three timed, the \
             extracted files are not fsynced; FRESH is removed afterwards, untimed. No digest \
             check, no verification, nothing sent or defined.",
            qemu_img.display(),
            prepared.vmdk_member
        ),
    };
    if others_before + others_after > 0 || runs.iter().any(|r| r.other_processes > 0) {
        notes.push(format!(
            "other Ferry or QEMU processes (ferry, ferryd, qemu-img, qemu-system-*; not the \
             benchmark's) ran on the machine: {others_before} before the run, {others_after} \
             after, and as many as listed per run right before it; they compete for the 2 \
             cores and the disk"
        ));
    }
    let report = ImportReport {
        format_version: IMPORT_FORMAT_VERSION,
        benchmark: BENCHMARK.to_string(),
        summary: ImportSummary::of(&runs, prepared.ova_bytes),
        conditions,
        runs,
        notes,
    };
    let stem = format!("import-ova-{}", &report.conditions.date[..10]);
    let md = args.out.join(format!("{stem}.md"));
    let json = args.out.join(format!("{stem}.json"));
    std::fs::write(&md, report.markdown())?;
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", report.markdown());
    eprintln!("results: {} and {}", md.display(), json.display());
    drop(work);
    if report.runs.len() != args.reps as usize * 2 {
        bail!("some runs failed (see above); the results hold the others");
    }
    Ok(())
}

/// What the preparation made.
struct Prepared {
    disk_allocated_bytes: u64,
    ova_bytes: u64,
    members: Vec<OvaMember>,
    vmdk_member: String,
    export_s: f64,
}

/// Writes the disk, defines the stopped VM, exports it as an OVA and finds
/// its disk member.
async fn prepare(args: &ImportOvaArgs, bench: &mut ImportBench) -> anyhow::Result<Prepared> {
    for dir in [&bench.scratch, &bench.ferry_tmp] {
        std::fs::create_dir_all(dir)?;
    }
    let ova_dir = bench.ova.parent().context("the OVA has no folder")?;
    std::fs::create_dir_all(ova_dir)?;
    let data = bench.datastore.join("data.raw");
    let filled = args.filled_bytes();
    eprintln!(
        "writing {} ({} MiB, {} MiB random, then a hole)",
        data.display(),
        args.size_mib,
        filled >> 20
    );
    write_data_disk(&data, bench.virtual_bytes, filled)
        .with_context(|| format!("cannot write {}", data.display()))?;
    let disk_allocated_bytes = allocated_bytes(&data);
    let spec = ova_dir.join("vm.toml");
    std::fs::write(&spec, spec_toml())?;
    eprintln!("defining {VM} on host1 (stopped)");
    bench
        .ferry_ok(&[
            "vm",
            "create",
            "-f",
            spec.to_str().context("spec path")?,
            "--host",
            "host1",
        ])
        .await?;
    eprintln!("exporting {VM} as {}", bench.ova.display());
    let ova = bench.ova.to_str().context("OVA path")?.to_string();
    let export = bench
        .ferry_ok(&["export", VM, "--format", "ova", "-o", &ova])
        .await?;
    eprintln!("  exported in {:.1} s", export.secs);
    let ova_bytes = std::fs::metadata(&bench.ova)
        .with_context(|| format!("`ferry export` wrote no {ova}"))?
        .len();
    let listing = run_timed(Path::new("tar"), &["tvf", &ova], &[]).await?;
    if !listing.ok {
        bail!("tar tvf {ova} failed: {}", listing.stderr);
    }
    let members = parse_tar_listing(&listing.stdout);
    let vmdks: Vec<&OvaMember> = members
        .iter()
        .filter(|m| m.name.ends_with(".vmdk"))
        .collect();
    let [vmdk] = vmdks.as_slice() else {
        bail!(
            "the OVA should hold one .vmdk, it holds: {}",
            members
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let vmdk_member = vmdk.name.clone();
    bench.vmdk_member = vmdk_member.clone();
    Ok(Prepared {
        disk_allocated_bytes,
        ova_bytes,
        members,
        vmdk_member,
        export_s: export.secs,
    })
}

/// The source VM: firmware boot from its only disk (never started).
fn spec_toml() -> String {
    format!(
        r#"name = "{VM}"
vcpus = 1
memory = "256MiB"

[boot]
firmware = "bios"
disk = "{DISK}"

[[disks]]
id = "{DISK}"
datastore = "{DATASTORE}"
file = "data.raw"
format = "raw"
"#
    )
}

/// `tar tvf` lines (GNU: mode owner size date time name) as members.
fn parse_tar_listing(text: &str) -> Vec<OvaMember> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 6 {
                return None;
            }
            Some(OvaMember {
                bytes: fields[2].parse().ok()?,
                name: fields[5..].join(" "),
            })
        })
        .collect()
}

/// The build of ferry and ferryd to measure.
fn pick_binaries(profile: ProfileArg) -> anyhow::Result<FerryBuild> {
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("the benchmark binary is not in a cargo target folder")?;
    let pair = |p: &str| (target.join(p).join("ferry"), target.join(p).join("ferryd"));
    let mtime = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let both = |p: &str| -> Option<SystemTime> {
        let (ferry, ferryd) = pair(p);
        Some(mtime(&ferry)?.min(mtime(&ferryd)?))
    };
    let (release, debug) = (both("release"), both("debug"));
    let (chosen, reason) = match profile {
        ProfileArg::Release => ("release", "asked for (--profile release)".to_string()),
        ProfileArg::Debug => ("debug", "asked for (--profile debug)".to_string()),
        ProfileArg::Auto => match (release, debug) {
            (Some(r), Some(d)) if r >= d => (
                "release",
                "--profile auto: target/release's binaries are newer than target/debug's"
                    .to_string(),
            ),
            (Some(_), None) => (
                "release",
                "--profile auto: target/debug has no pair of binaries".to_string(),
            ),
            (_, Some(_)) => (
                "debug",
                if release.is_some() {
                    "--profile auto: target/release's binaries are older than target/debug's"
                } else {
                    "--profile auto: target/release has no pair of binaries"
                }
                .to_string(),
            ),
            (None, None) => bail!(
                "no ferry and ferryd in {} (release or debug): build them with `cargo build \
                 --release -p ferry-cli -p ferryd`",
                target.display()
            ),
        },
    };
    let (ferry, ferryd) = pair(chosen);
    for path in [&ferry, &ferryd] {
        if !path.exists() {
            bail!(
                "{} is missing: build it with `cargo build{} -p ferry-cli -p ferryd`",
                path.display(),
                if chosen == "release" {
                    " --release"
                } else {
                    ""
                }
            );
        }
    }
    let stamp = |path: &Path| {
        mtime(path)
            .map(time::OffsetDateTime::from)
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| "unknown".to_string())
    };
    Ok(FerryBuild {
        profile: chosen.to_string(),
        built: format!("ferry {}, ferryd {}", stamp(&ferry), stamp(&ferryd)),
        ferry: ferry.display().to_string(),
        ferryd: ferryd.display().to_string(),
        reason,
    })
}

/// `program` as found on PATH.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// The folder and the filesystem it is on (`stat -f`, `findmnt -T`).
fn filesystem(path: &Path) -> FilesystemInfo {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let shown = path.display().to_string();
    let field = |name: &str| crate::first_line("findmnt", &["-n", "-T", &shown, "-o", name]);
    FilesystemInfo {
        statfs_type: crate::first_line("stat", &["-f", "-c", "%T", &shown]),
        mount_type: field("FSTYPE"),
        mount_device: field("SOURCE"),
        mount_point: field("TARGET"),
        mount_options: field("OPTIONS"),
        path: shown,
    }
}

/// Processes of Ferry or QEMU on the machine that are not the
/// benchmark's (whose command lines name `ours`, the work folder): other
/// users' clusters, imports and guests. `comm` is cut to 15 characters
/// (`qemu-system-x86`).
fn other_processes(ours: &Path) -> usize {
    let ours = ours.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| {
                let c = c.trim_end();
                ["ferry", "ferryd", "qemu-img"].contains(&c) || c.starts_with("qemu-system")
            })
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
    format!("ferry-bench {}", args.join(" "))
}

fn summary(run: &ImportRun) -> String {
    let rate = run.virtual_bytes as f64 / run.wall_s / 1048576.0;
    let ms = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    let s = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.2}"));
    match run.tool.as_str() {
        "baseline" => format!(
            "{:.2} s ({rate:.0} MiB/s virtual): tar {} s, convert {} s, fsync {} s",
            run.wall_s,
            s(run.extract_s),
            s(run.convert_s),
            s(run.sync_s)
        ),
        _ => format!(
            "{:.2} s ({rate:.0} MiB/s virtual): convert {} ms, verify {} ms, rest {} ms{}",
            run.wall_s,
            ms(run.convert_ms),
            ms(run.verify_ms),
            ms(run.rest_ms),
            if run.notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", run.notes.join("; "))
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_listings_give_names_and_sizes() {
        let text = "-rw-r--r-- root/root      1234 2026-11-28 09:00 bench-import.ovf\n\
                    -rw-r--r-- root/root       160 2026-11-28 09:00 bench-import.mf\n\
                    -rw-r--r-- 0/0       805700096 2026-11-28 09:00 bench-import-data.vmdk\n\
                    garbage\n";
        let members = parse_tar_listing(text);
        assert_eq!(members.len(), 3);
        assert_eq!(members[2].name, "bench-import-data.vmdk");
        assert_eq!(members[2].bytes, 805_700_096);
    }

    #[test]
    fn the_spec_boots_firmware_from_the_data_disk() {
        let spec = ferry_core::spec::VmSpec::from_toml_str(&spec_toml(), Path::new("/")).unwrap();
        assert_eq!(spec.disks.len(), 1);
        assert_eq!(spec.disks[0].id, DISK);
        assert!(spec.nics.is_empty());
    }

    #[test]
    fn arguments_are_checked() {
        let args = |size_mib, fill_percent, reps| ImportOvaArgs {
            size_mib,
            fill_percent,
            reps,
            profile: ProfileArg::Auto,
            work_dir: None,
            out: PathBuf::new(),
            no_build: true,
        };
        assert!(args(1024, 75, 3).check().is_ok());
        assert_eq!(args(1024, 75, 3).filled_bytes(), 768 << 20);
        assert!(args(8, 75, 3).check().is_err());
        assert!(args(1024, 101, 3).check().is_err());
        assert!(args(1024, 75, 0).check().is_err());
    }
}

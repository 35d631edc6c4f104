//! What one `ferry-bench import-ova` run found, and its Markdown and JSON
//! forms (`bench/results/import-ova-DATE.{md,json}`).

use serde::{Deserialize, Serialize};

use crate::storage_report::{mib, mib_s, opt, spread_cell, Spread};

/// Version of the import-ova JSON form (its own series).
pub const IMPORT_FORMAT_VERSION: u32 = 1;

/// The `benchmark` field: tells this file from the other results.
pub const BENCHMARK: &str = "import-ova";

/// Everything a reader needs to reproduce or discount the numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportConditions {
    /// UTC, RFC 3339.
    pub date: String,
    /// The command line the benchmark ran with.
    pub command: String,
    /// No guest runs: the source VM is defined and never started, the
    /// imported ones are defined only.
    pub accel: String,
    pub qemu_img: String,
    pub qemu_img_version: String,
    pub tar_version: String,
    pub host_cpu: String,
    pub host_cores: usize,
    pub host_memory_mib: u64,
    pub kernel: String,
    /// `/proc/loadavg` before and after the run, and the most Ferry or QEMU
    /// processes (ferry, ferryd, qemu-img, qemu-system-*) that were not the
    /// benchmark's seen before, after or between the runs: what else
    /// competed for the CPUs and the disk.
    pub loadavg: Vec<String>,
    pub other_processes: usize,
    /// The work folder: cluster, datastore, OVA, both tools' scratch space.
    pub work_dir: FilesystemInfo,
    /// The source VM's only disk: virtual size, the random (incompressible)
    /// bytes written from offset 0, the rest a hole, and its allocated size.
    pub disk_virtual_bytes: u64,
    pub disk_filled_bytes: u64,
    pub disk_allocated_bytes: u64,
    /// The OVA `ferry export` wrote, its disk member, and how long the
    /// export took (information, not compared).
    pub ova_bytes: u64,
    pub ova_members: Vec<OvaMember>,
    pub export_s: f64,
    pub export_command: String,
    pub target_format: String,
    pub repetitions: u32,
    /// Which `ferry`/`ferryd` ran: release or debug, paths, and why.
    pub ferry_build: FerryBuild,
    /// How the page cache was treated before each timed run.
    pub page_cache: String,
    /// What Ferry runs.
    pub ferry: String,
    /// What the baseline runs.
    pub baseline: String,
}

/// A folder and the filesystem under it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FilesystemInfo {
    pub path: String,
    /// `stat -f -c %T` (ext4 reports `ext2/ext3`).
    pub statfs_type: String,
    /// `findmnt -T PATH`: type, device, mount point, options.
    pub mount_type: String,
    pub mount_device: String,
    pub mount_point: String,
    pub mount_options: String,
}

/// One member of the OVA (`tar tv`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OvaMember {
    pub name: String,
    pub bytes: u64,
}

/// The binaries measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FerryBuild {
    /// `release` or `debug`.
    pub profile: String,
    pub ferry: String,
    pub ferryd: String,
    /// Their modification times (UTC), and why this profile was chosen.
    pub built: String,
    pub reason: String,
}

/// One timed import.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportRun {
    /// 1-based.
    pub repetition: u32,
    /// `ferry` (`ferry import`) or `baseline` (`tar xf` + `qemu-img
    /// convert` + fsync).
    pub tool: String,
    /// Whether it ran first or second in its repetition.
    pub first: bool,
    /// `sync; echo 3 > /proc/sys/vm/drop_caches` succeeded right before.
    pub caches_dropped: bool,
    /// The 1-minute load average right before, and the Ferry or QEMU
    /// processes on the machine that were not the benchmark's.
    pub load1: Option<f64>,
    #[serde(default)]
    pub other_processes: usize,
    /// Virtual size of the imported disk.
    pub virtual_bytes: u64,
    /// Allocated bytes of the qcow2 made (the baseline's output; the file
    /// Ferry put in the datastore).
    pub target_allocated_bytes: u64,
    /// Wall time, start to end: the whole `ferry import` command; the
    /// baseline's three steps.
    pub wall_s: f64,
    /// Baseline only: `tar xf`, `qemu-img convert`, `fsync` of the output.
    pub extract_s: Option<f64>,
    pub convert_s: Option<f64>,
    pub sync_s: Option<f64>,
    /// Ferry only, from its report: `disks[].convert_ms`, `verify_ms`,
    /// `verified`, and the rest of the wall time (manifest digests,
    /// inspection, extraction, sending the disk through the controller,
    /// defining the VM, process start).
    pub convert_ms: Option<u64>,
    pub verify_ms: Option<u64>,
    pub rest_ms: Option<u64>,
    pub verified: Option<bool>,
    /// Ferry only: the VM and the datastore file it made.
    pub vm: Option<String>,
    pub target_file: Option<String>,
    #[serde(default)]
    pub notes: Vec<String>,
}

/// The medians of the repetitions, and the ratio.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportSummary {
    pub repetitions: usize,
    pub virtual_bytes: u64,
    pub ova_bytes: u64,
    pub ferry_wall_s: Spread,
    pub ferry_convert_ms: Option<Spread>,
    pub ferry_verify_ms: Option<Spread>,
    pub ferry_rest_ms: Option<Spread>,
    pub baseline_wall_s: Spread,
    pub baseline_extract_s: Option<Spread>,
    pub baseline_convert_s: Option<Spread>,
    pub baseline_sync_s: Option<Spread>,
    /// Virtual bytes per second, from the medians.
    pub ferry_virtual_bytes_per_sec: f64,
    pub baseline_virtual_bytes_per_sec: f64,
    /// Ferry's throughput ÷ the baseline's (= median baseline time ÷
    /// median Ferry time): 1 is as fast, below 1 Ferry is slower.
    pub ratio: f64,
    /// The same with Ferry's verification (which the baseline does not do)
    /// taken out: median baseline ÷ (median Ferry − median verification).
    pub ratio_without_verify: Option<f64>,
}

impl ImportSummary {
    /// `None` without at least one run of each tool.
    pub fn of(runs: &[ImportRun], ova_bytes: u64) -> Option<ImportSummary> {
        let pick =
            |tool: &str| -> Vec<&ImportRun> { runs.iter().filter(|r| r.tool == tool).collect() };
        let ferry = pick("ferry");
        let baseline = pick("baseline");
        if ferry.is_empty() || baseline.is_empty() {
            return None;
        }
        let spread = |runs: &[&ImportRun], f: &dyn Fn(&ImportRun) -> Option<f64>| {
            Spread::of(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
        };
        let ferry_wall = spread(&ferry, &|r| Some(r.wall_s))?;
        let baseline_wall = spread(&baseline, &|r| Some(r.wall_s))?;
        let ferry_verify = spread(&ferry, &|r| r.verify_ms.map(|v| v as f64));
        let virtual_bytes = ferry[0].virtual_bytes;
        let rate = |secs: f64| {
            if secs > 0.0 {
                virtual_bytes as f64 / secs
            } else {
                0.0
            }
        };
        let without_verify = ferry_verify
            .map(|v| ferry_wall.median - v.median / 1000.0)
            .filter(|s| *s > 0.0);
        Some(ImportSummary {
            repetitions: ferry.len().min(baseline.len()),
            virtual_bytes,
            ova_bytes,
            ferry_wall_s: ferry_wall,
            ferry_convert_ms: spread(&ferry, &|r| r.convert_ms.map(|v| v as f64)),
            ferry_verify_ms: ferry_verify,
            ferry_rest_ms: spread(&ferry, &|r| r.rest_ms.map(|v| v as f64)),
            baseline_wall_s: baseline_wall,
            baseline_extract_s: spread(&baseline, &|r| r.extract_s),
            baseline_convert_s: spread(&baseline, &|r| r.convert_s),
            baseline_sync_s: spread(&baseline, &|r| r.sync_s),
            ferry_virtual_bytes_per_sec: rate(ferry_wall.median),
            baseline_virtual_bytes_per_sec: rate(baseline_wall.median),
            ratio: baseline_wall.median / ferry_wall.median,
            ratio_without_verify: without_verify.map(|s| baseline_wall.median / s),
        })
    }
}

/// The whole output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportReport {
    pub format_version: u32,
    pub benchmark: String,
    pub conditions: ImportConditions,
    pub summary: Option<ImportSummary>,
    /// Every timed run, in the order they ran.
    pub runs: Vec<ImportRun>,
    pub notes: Vec<String>,
}

impl ImportReport {
    /// The results as a Markdown page: conditions, the summary, every run,
    /// notes.
    pub fn markdown(&self) -> String {
        let c = &self.conditions;
        let w = &c.work_dir;
        let mut md = String::new();
        md.push_str("# OVA import: `ferry import` vs. `tar x` + `qemu-img convert`\n\n");
        md.push_str(&format!(
            "Run {} with `{}` (see `bench/README.md`).\n\n",
            c.date, c.command
        ));
        md.push_str("## Conditions\n\n");
        let members: Vec<String> = c
            .ova_members
            .iter()
            .map(|m| format!("`{}` {} bytes", m.name, m.bytes))
            .collect();
        for (k, v) in [
            ("Accelerator", c.accel.clone()),
            (
                "Tools",
                format!("{} ({}); {}", c.qemu_img_version, c.qemu_img, c.tar_version),
            ),
            (
                "Host",
                format!(
                    "{} ({} cores, {} MiB RAM), Linux {}; load average before / after: {}; \
                     most Ferry or QEMU processes of others on the machine at once (ferry, \
                     ferryd, qemu-img, qemu-system-*; none the benchmark's): {}",
                    c.host_cpu,
                    c.host_cores,
                    c.host_memory_mib,
                    c.kernel,
                    c.loadavg.join(" / "),
                    c.other_processes
                ),
            ),
            (
                "Work folder",
                format!(
                    "{} — {} (`stat -f`: {}) on {} mounted at {} ({}); the cluster (and so the \
                     datastore `local`), the OVA, the baseline's folders and Ferry's private \
                     work folder (`TMPDIR`) are all in it",
                    w.path,
                    w.mount_type,
                    w.statfs_type,
                    w.mount_device,
                    w.mount_point,
                    w.mount_options
                ),
            ),
            (
                "Source disk",
                format!(
                    "{} MiB virtual, raw; {} MiB written with random (incompressible) bytes from \
                     offset 0, the rest a hole; {} MiB allocated",
                    mib(c.disk_virtual_bytes),
                    mib(c.disk_filled_bytes),
                    mib(c.disk_allocated_bytes)
                ),
            ),
            (
                "OVA",
                format!(
                    "{} bytes ({} MiB): {}; written by `{}` in {:.1} s (not compared)",
                    c.ova_bytes,
                    mib(c.ova_bytes),
                    members.join(", "),
                    c.export_command,
                    c.export_s
                ),
            ),
            (
                "Target",
                format!(
                    "{}, {} repetition(s), the order alternating (odd: baseline first)",
                    c.target_format, c.repetitions
                ),
            ),
            (
                "Ferry build",
                format!(
                    "**{}** — `{}`, `{}` ({}); {}",
                    c.ferry_build.profile,
                    c.ferry_build.ferry,
                    c.ferry_build.ferryd,
                    c.ferry_build.built,
                    c.ferry_build.reason
                ),
            ),
            ("Page cache", c.page_cache.clone()),
            ("Ferry", c.ferry.clone()),
            ("Baseline", c.baseline.clone()),
        ] {
            md.push_str(&format!("- **{k}**: {v}\n"));
        }

        md.push_str("\n## Summary (medians; min–max in brackets)\n\n");
        match &self.summary {
            None => md.push_str("No summary: not every tool completed a run (see the notes).\n"),
            Some(s) => {
                md.push_str(
                    "| Reps | Ferry s | Baseline s | Ferry MiB/s | Baseline MiB/s | **Ratio** \
                     Ferry ÷ baseline | Ratio without Ferry's verification |\n\
                     |---|---|---|---|---|---|---|\n",
                );
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | **{:.2}** | {} |\n",
                    s.repetitions,
                    spread_cell(&s.ferry_wall_s, 2),
                    spread_cell(&s.baseline_wall_s, 2),
                    mib_s(s.ferry_virtual_bytes_per_sec),
                    mib_s(s.baseline_virtual_bytes_per_sec),
                    s.ratio,
                    opt(s.ratio_without_verify, |r| format!("{r:.2}")),
                ));
                md.push_str(
                    "\n| Breakdown | Extract | Convert | Verify | fsync | Rest |\n\
                     |---|---|---|---|---|---|\n",
                );
                let ms = |s: &Option<Spread>| opt(s.as_ref(), |p| spread_cell(p, 0));
                let s_ms = |s: &Option<Spread>| {
                    opt(s.as_ref(), |p| {
                        spread_cell(
                            &Spread {
                                median: p.median * 1000.0,
                                min: p.min * 1000.0,
                                max: p.max * 1000.0,
                            },
                            0,
                        )
                    })
                };
                md.push_str(&format!(
                    "| Ferry ms | (in rest) | {} | {} | – | {} |\n",
                    ms(&s.ferry_convert_ms),
                    ms(&s.ferry_verify_ms),
                    ms(&s.ferry_rest_ms),
                ));
                md.push_str(&format!(
                    "| Baseline ms | {} | {} | – | {} | – |\n",
                    s_ms(&s.baseline_extract_s),
                    s_ms(&s.baseline_convert_s),
                    s_ms(&s.baseline_sync_s),
                ));
                md.push_str(&format!(
                    "\n**Ferry s** — wall time of the whole `ferry import` command, start to \
                     exit. **Baseline s** — `tar xf` of the OVA into a fresh folder + `qemu-img \
                     convert -f vmdk -O qcow2` of its disk member + `fsync` of the qcow2. \
                     **MiB/s** — the disk's virtual size ({} MiB) ÷ the median wall time (the OVA \
                     itself is {} MiB). **Ratio** — Ferry's throughput ÷ the baseline's = median \
                     baseline time ÷ median Ferry time (1 = as fast; below 1 Ferry is slower). \
                     **Ratio without Ferry's verification** — the same with Ferry's median \
                     verification time taken off its median (the baseline verifies nothing). \
                     **Convert** / **Verify** — Ferry's report (`disks[].convert_ms`, \
                     `verify_ms`: `qemu-img convert` and `qemu-img compare` of the VMDK read in the archive \
                     and the qcow2); **Rest** — Ferry's wall time less both: process start, the \
                     manifest's SHA-256 digests (a full read of the archive's members), \
                     inspecting the VMDK, sending the qcow2 \
                     through the controller to the host's datastore (SHA-256 on both ends), \
                     defining the VM and removing the work folder.\n",
                    mib(s.virtual_bytes),
                    mib(s.ova_bytes)
                ));
            }
        }

        md.push_str(
            "\n## Every run\n\n\
             | Rep | Tool | Order | Wall s | Extract s | Convert | Verify ms | fsync s | Rest ms | \
             qcow2 alloc MiB | Verified | Caches dropped | Load / others |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.runs {
            let convert = match (r.convert_ms, r.convert_s) {
                (Some(ms), _) => format!("{ms} ms"),
                (None, Some(s)) => format!("{s:.2} s"),
                _ => "–".to_string(),
            };
            md.push_str(&format!(
                "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |\n",
                r.repetition,
                r.tool,
                if r.first { "first" } else { "second" },
                r.wall_s,
                opt(r.extract_s, |s| format!("{s:.2}")),
                convert,
                opt(r.verify_ms, |v| v.to_string()),
                opt(r.sync_s, |s| format!("{s:.2}")),
                opt(r.rest_ms, |v| v.to_string()),
                mib(r.target_allocated_bytes),
                opt(r.verified, |v| if v { "yes" } else { "**no**" }.to_string()),
                if r.caches_dropped { "yes" } else { "**no**" },
                opt(r.load1, |l| format!("{l:.2}")),
                r.other_processes,
            ));
        }
        md.push_str(
            "\n**Order** — which tool ran first in its repetition. **Convert** — Ferry's \
             `convert_ms`, or the baseline's `qemu-img convert` wall time. **Load / others** — \
             the 1-minute load average and the Ferry or QEMU processes of others on the machine \
             right before the run.\n",
        );
        let run_notes: Vec<&ImportRun> = self.runs.iter().filter(|r| !r.notes.is_empty()).collect();
        if !self.notes.is_empty() || !run_notes.is_empty() {
            md.push_str("\n## Notes\n\n");
            for note in &self.notes {
                md.push_str(&format!("- {note}\n"));
            }
            for r in run_notes {
                md.push_str(&format!(
                    "- rep {} / {}: {}\n",
                    r.repetition,
                    r.tool,
                    r.notes.join("; ")
                ));
            }
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tool: &str, wall: f64, verify_ms: Option<u64>) -> ImportRun {
        ImportRun {
            repetition: 1,
            tool: tool.into(),
            first: true,
            caches_dropped: true,
            load1: Some(1.0),
            other_processes: 0,
            virtual_bytes: 1 << 30,
            target_allocated_bytes: 768 << 20,
            wall_s: wall,
            extract_s: (tool == "baseline").then_some(1.0),
            convert_s: (tool == "baseline").then_some(wall - 1.5),
            sync_s: (tool == "baseline").then_some(0.5),
            convert_ms: (tool == "ferry").then_some(3000),
            verify_ms,
            rest_ms: (tool == "ferry").then_some(2000),
            verified: (tool == "ferry").then_some(true),
            vm: None,
            target_file: None,
            notes: vec![],
        }
    }

    #[test]
    fn the_ratio_is_the_baseline_median_over_ferrys() {
        let runs = [
            run("baseline", 4.0, None),
            run("ferry", 8.0, Some(2000)),
            run("ferry", 10.0, Some(2000)),
            run("baseline", 5.0, None),
            run("baseline", 6.0, None),
            run("ferry", 12.0, Some(4000)),
        ];
        let s = ImportSummary::of(&runs, 800 << 20).unwrap();
        assert_eq!(s.repetitions, 3);
        assert_eq!(s.ferry_wall_s.median, 10.0);
        assert_eq!(s.baseline_wall_s.median, 5.0);
        assert!((s.ratio - 0.5).abs() < 1e-9);
        assert!((s.ratio_without_verify.unwrap() - 5.0 / 8.0).abs() < 1e-9);
        assert!((s.ferry_virtual_bytes_per_sec - (1u64 << 30) as f64 / 10.0).abs() < 1e-6);
        assert!(ImportSummary::of(&runs[..1], 0).is_none());
    }
}

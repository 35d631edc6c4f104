//! What one `ferry-bench storage-move` run found, and its Markdown and JSON
//! forms (`bench/results/storage-move-DATE.{md,json}`).

use serde::{Deserialize, Serialize};

/// Version of the storage-move JSON form (its own series, next to the live
/// migration results' `format_version`).
pub const STORAGE_FORMAT_VERSION: u32 = 1;

/// The `benchmark` field: tells this file from a live-migration result.
pub const BENCHMARK: &str = "storage-move";

/// Everything a reader needs to reproduce or discount the numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageConditions {
    /// UTC, RFC 3339.
    pub date: String,
    /// The command line the benchmark ran with.
    pub command: String,
    pub qemu_version: String,
    pub qemu_img_version: String,
    pub accel: String,
    pub accel_reason: String,
    pub host_cpu: String,
    pub host_cores: usize,
    pub host_memory_mib: u64,
    pub kernel: String,
    /// `/proc/loadavg` before and after the run, and the other QEMU
    /// processes on the machine (not the benchmark's): what else competed
    /// for the CPUs and the disk.
    pub loadavg: Vec<String>,
    pub other_qemu_processes: usize,
    /// The two datastores of the host, source first.
    pub datastores: Vec<DatastoreInfo>,
    /// The moved disk: virtual size, how much of it was written with
    /// random (incompressible) bytes before the VM was created, and its
    /// allocated size then.
    pub disk_virtual_bytes: u64,
    pub disk_filled_bytes: u64,
    pub disk_allocated_bytes: u64,
    pub source_format: String,
    pub target_formats: Vec<String>,
    pub repetitions: u32,
    pub guest: GuestConditions,
    /// How the page cache was treated before each timed copy.
    pub page_cache: String,
    /// What Ferry runs and how it copies.
    pub ferry: String,
    /// What the baseline runs.
    pub qemu_img: String,
}

/// A datastore folder and the filesystem under it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatastoreInfo {
    pub name: String,
    pub path: String,
    /// `stat -f -c %T` (ext4 reports `ext2/ext3`: one magic number for
    /// all three).
    pub statfs_type: String,
    /// The mount's type, device and options (`/proc/self/mounts`, longest
    /// mount point containing the folder).
    pub mount_type: String,
    pub mount_device: String,
    pub mount_point: String,
    pub mount_options: String,
}

/// The VM that runs while its disk moves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestConditions {
    pub ram_mib: u64,
    pub vcpus: u32,
    pub description: String,
    pub heartbeat_ms: u64,
    /// `ferry.disk_rate`: 4 KiB records the probe writes (O_DIRECT) and
    /// flushes (`fdatasync`) per second; 0 when the guest does not write.
    pub disk_records_per_sec_set: u64,
    /// The device the probe writes to, inside the guest.
    pub disk_records_device: String,
    /// Records flushed per second, measured from the console over the idle
    /// window before the first copy (under TCG the probe may not reach the
    /// rate it is asked for).
    pub disk_records_per_sec_idle: Option<f64>,
    /// The longest gap between heartbeats in that idle window: the noise of
    /// the pause measurement on this machine.
    pub idle_heartbeat_gap_ms: Option<f64>,
    pub idle_window_s: f64,
}

/// One phase of Ferry's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    pub phase: String,
    pub duration_ms: u64,
}

/// One timed copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyRun {
    /// 1-based.
    pub repetition: u32,
    /// `ferry` (`ferry storage move`) or `qemu-img` (`qemu-img convert`).
    pub tool: String,
    /// `measured`, or `return` for Ferry's move that puts the disk back on
    /// the source datastore (as raw) for the next repetition; a return is
    /// not compared with anything.
    pub purpose: String,
    pub from_datastore: String,
    pub to_datastore: String,
    pub from_format: String,
    pub to_format: String,
    pub virtual_bytes: u64,
    pub source_allocated_bytes: u64,
    pub target_allocated_bytes: u64,
    /// `sync; echo 3 > /proc/sys/vm/drop_caches` succeeded right before.
    pub caches_dropped: bool,
    /// Right before the copy: the 1-minute load average and the QEMU
    /// processes on the machine that are not the benchmark's (other users'
    /// guests compete for the CPUs and the disk).
    #[serde(default)]
    pub load1: Option<f64>,
    #[serde(default)]
    pub other_qemu_processes: usize,
    /// Wall time of the command: `ferry storage move … --wait` from its
    /// start to its exit; `qemu-img convert` from its start to its exit.
    pub wall_s: f64,
    /// qemu-img only: `fsync` of the target right after the convert (whose
    /// output cache mode is `unsafe`: it flushes nothing itself).
    pub sync_s: Option<f64>,
    /// Ferry only: the report's `total_ms` (the controller's, from the
    /// request to the end).
    pub total_ms: Option<u64>,
    /// Ferry only: the guest's pause at the switchover (`paused_ms`).
    pub paused_ms: Option<u64>,
    /// Ferry only: `verification.duration_ms` (qemu-img compare of source
    /// and copy, inside the pause).
    pub verify_ms: Option<u64>,
    pub verified: Option<bool>,
    #[serde(default)]
    pub phases: Vec<Phase>,
    pub migration_id: Option<String>,
    /// Ferry only, from the agent's log (`ferryd.log`): from "storage move
    /// started" (the mirror running) to the pause at the switchover — the
    /// mirror's copy until it was ready.
    #[serde(default)]
    pub agent_mirror_ms: Option<u64>,
    /// Ferry only, from the agent's log: from the guest's resume to
    /// "storage move completed" (old nodes closed, spec saved, old file
    /// deleted).
    #[serde(default)]
    pub agent_after_switch_ms: Option<u64>,
    /// Ferry only: the wall time outside the agent's move (mirror, pause and
    /// after): CLI start, controller pre-flight, the target's creation and
    /// opening, and the controller's and CLI's polling.
    #[serde(default)]
    pub outside_agent_ms: Option<u64>,
    /// The longest gap between heartbeat arrivals while the command ran
    /// (the guest-observed pause for Ferry; I/O contention for qemu-img).
    pub guest_heartbeat_gap_ms: Option<f64>,
    /// The longest gap between two flushed disk records while it ran.
    pub guest_write_gap_ms: Option<f64>,
    /// Disk records the guest flushed per second while it ran.
    pub guest_records_per_sec: Option<f64>,
    #[serde(default)]
    pub notes: Vec<String>,
}

impl CopyRun {
    /// Convert and flush: the copy on stable storage, as Ferry's is before
    /// it switches (qemu-img only).
    pub fn wall_with_sync_s(&self) -> f64 {
        self.wall_s + self.sync_s.unwrap_or(0.0)
    }
}

/// Median, minimum and maximum of the repetitions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// One target format: Ferry's move against qemu-img's convert, medians of
/// the repetitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FormatSummary {
    pub to_format: String,
    pub repetitions: usize,
    pub virtual_bytes: u64,
    /// Median allocated size of the source files the copies read.
    pub allocated_bytes: u64,
    pub ferry_wall_s: Spread,
    pub ferry_total_ms: Option<Spread>,
    pub ferry_paused_ms: Option<Spread>,
    pub ferry_verify_ms: Option<Spread>,
    #[serde(default)]
    pub ferry_mirror_ms: Option<Spread>,
    #[serde(default)]
    pub ferry_outside_agent_ms: Option<Spread>,
    pub ferry_heartbeat_gap_ms: Option<Spread>,
    pub qemu_img_wall_s: Spread,
    pub qemu_img_with_sync_s: Spread,
    /// Bytes per second, from the medians: virtual size and allocated
    /// bytes over wall time.
    pub ferry_virtual_bytes_per_sec: f64,
    pub ferry_allocated_bytes_per_sec: f64,
    pub qemu_img_virtual_bytes_per_sec: f64,
    pub qemu_img_allocated_bytes_per_sec: f64,
    pub qemu_img_with_sync_virtual_bytes_per_sec: f64,
    /// Ferry's throughput ÷ qemu-img convert's (= median convert time ÷
    /// median Ferry time): 1 is as fast, 0.5 half as fast.
    pub ratio: f64,
    /// The same against convert + fsync of the target.
    pub ratio_with_sync: f64,
}

impl FormatSummary {
    /// The summary of `to_format` from the measured runs; `None` without at
    /// least one run of each tool.
    pub fn of(runs: &[CopyRun], to_format: &str) -> Option<FormatSummary> {
        let pick = |tool: &str| -> Vec<&CopyRun> {
            runs.iter()
                .filter(|r| r.tool == tool && r.purpose == "measured" && r.to_format == to_format)
                .collect()
        };
        let ferry = pick("ferry");
        let qemu = pick("qemu-img");
        if ferry.is_empty() || qemu.is_empty() {
            return None;
        }
        let spread = |runs: &[&CopyRun], f: &dyn Fn(&CopyRun) -> Option<f64>| {
            Spread::of(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
        };
        let ferry_wall = spread(&ferry, &|r| Some(r.wall_s))?;
        let qemu_wall = spread(&qemu, &|r| Some(r.wall_s))?;
        let qemu_sync = spread(&qemu, &|r| Some(r.wall_with_sync_s()))?;
        let virtual_bytes = ferry[0].virtual_bytes;
        let allocated = spread(
            &ferry.iter().chain(qemu.iter()).copied().collect::<Vec<_>>(),
            &|r| Some(r.source_allocated_bytes as f64),
        )
        .map_or(0, |s| s.median as u64);
        let rate = |bytes: u64, secs: f64| {
            if secs > 0.0 {
                bytes as f64 / secs
            } else {
                0.0
            }
        };
        Some(FormatSummary {
            to_format: to_format.to_string(),
            repetitions: ferry.len().min(qemu.len()),
            virtual_bytes,
            allocated_bytes: allocated,
            ferry_wall_s: ferry_wall,
            ferry_total_ms: spread(&ferry, &|r| r.total_ms.map(|v| v as f64)),
            ferry_paused_ms: spread(&ferry, &|r| r.paused_ms.map(|v| v as f64)),
            ferry_verify_ms: spread(&ferry, &|r| r.verify_ms.map(|v| v as f64)),
            ferry_mirror_ms: spread(&ferry, &|r| r.agent_mirror_ms.map(|v| v as f64)),
            ferry_outside_agent_ms: spread(&ferry, &|r| r.outside_agent_ms.map(|v| v as f64)),
            ferry_heartbeat_gap_ms: spread(&ferry, &|r| r.guest_heartbeat_gap_ms),
            qemu_img_wall_s: qemu_wall,
            qemu_img_with_sync_s: qemu_sync,
            ferry_virtual_bytes_per_sec: rate(virtual_bytes, ferry_wall.median),
            ferry_allocated_bytes_per_sec: rate(allocated, ferry_wall.median),
            qemu_img_virtual_bytes_per_sec: rate(virtual_bytes, qemu_wall.median),
            qemu_img_allocated_bytes_per_sec: rate(allocated, qemu_wall.median),
            qemu_img_with_sync_virtual_bytes_per_sec: rate(virtual_bytes, qemu_sync.median),
            ratio: qemu_wall.median / ferry_wall.median,
            ratio_with_sync: qemu_sync.median / ferry_wall.median,
        })
    }
}

/// The whole output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageReport {
    pub format_version: u32,
    pub benchmark: String,
    pub conditions: StorageConditions,
    pub summary: Vec<FormatSummary>,
    /// Every copy, in the order they ran.
    pub runs: Vec<CopyRun>,
    pub notes: Vec<String>,
}

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / 1048576.0)
}

pub(crate) fn mib_s(bytes_per_sec: f64) -> String {
    format!("{:.0}", bytes_per_sec / 1048576.0)
}

pub(crate) fn opt<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map(show).unwrap_or_else(|| "–".to_string())
}

/// `median (min–max)`.
pub(crate) fn spread_cell(s: &Spread, digits: usize) -> String {
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
}

impl StorageReport {
    /// The results as a Markdown page: conditions, the summary, every run,
    /// notes.
    pub fn markdown(&self) -> String {
        let c = &self.conditions;
        let g = &c.guest;
        let mut md = String::new();
        md.push_str("# Storage move: Ferry vs. `qemu-img convert`\n\n");
        md.push_str(&format!(
            "Run {} with `{}` (see `bench/README.md`).\n\n",
            c.date, c.command
        ));
        md.push_str("## Conditions\n\n");
        let datastores: Vec<String> = c
            .datastores
            .iter()
            .map(|d| {
                format!(
                    "`{}` = {} — {} (`stat -f`: {}) on {} mounted at {} ({})",
                    d.name,
                    d.path,
                    d.mount_type,
                    d.statfs_type,
                    d.mount_device,
                    d.mount_point,
                    d.mount_options
                )
            })
            .collect();
        for (k, v) in [
            (
                "QEMU",
                format!("{}; {}", c.qemu_version, c.qemu_img_version),
            ),
            ("Accelerator", format!("{} — {}", c.accel, c.accel_reason)),
            (
                "Host",
                format!(
                    "{} ({} cores, {} MiB RAM), Linux {}; load average before / after: {}; \
                     other QEMU processes on the machine: {}",
                    c.host_cpu,
                    c.host_cores,
                    c.host_memory_mib,
                    c.kernel,
                    c.loadavg.join(" / "),
                    c.other_qemu_processes
                ),
            ),
            ("Datastores", datastores.join("; ")),
            (
                "Disk",
                format!(
                    "{} MiB virtual, {}; {} MiB written with random (incompressible) bytes \
                     from offset 0 before the VM was created, the rest a hole; {} MiB allocated",
                    mib(c.disk_virtual_bytes),
                    c.source_format,
                    mib(c.disk_filled_bytes),
                    mib(c.disk_allocated_bytes)
                ),
            ),
            (
                "Formats",
                format!(
                    "{} → {}, {} repetition(s) each",
                    c.source_format,
                    c.target_formats.join(", "),
                    c.repetitions
                ),
            ),
            (
                "Guest",
                format!(
                    "{} MiB RAM, {} vCPU: {}; heartbeat every {} ms",
                    g.ram_mib, g.vcpus, g.description, g.heartbeat_ms
                ),
            ),
            (
                "Guest write activity",
                if g.disk_records_per_sec_set == 0 {
                    "none (the probe's disk oracle is off)".to_string()
                } else {
                    format!(
                        "the probe writes 4 KiB records to {} (the moved disk), each O_DIRECT \
                         and followed by fdatasync, asked for {} records/s; measured {} \
                         records/s over {:.0} s idle before the first copy (longest heartbeat \
                         gap then: {} ms)",
                        g.disk_records_device,
                        g.disk_records_per_sec_set,
                        opt(g.disk_records_per_sec_idle, |r| format!("{r:.1}")),
                        g.idle_window_s,
                        opt(g.idle_heartbeat_gap_ms, |d| format!("{d:.0}"))
                    )
                },
            ),
            ("Page cache", c.page_cache.clone()),
            ("Ferry", c.ferry.clone()),
            ("qemu-img", c.qemu_img.clone()),
        ] {
            md.push_str(&format!("- **{k}**: {v}\n"));
        }

        md.push_str(
            "\n## Summary (medians; min–max in brackets)\n\n\
             | Target format | Reps | Ferry s | qemu-img convert s | convert + fsync s | \
             Ferry MiB/s (virtual / allocated) | qemu-img MiB/s (virtual / allocated) | \
             **Ratio** Ferry ÷ qemu-img | Ratio vs convert + fsync | Mirror ms | Guest paused ms | \
             Verification ms | Outside the agent ms | Heartbeat gap ms |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for s in &self.summary {
            md.push_str(&format!(
                "| raw → {} | {} | {} | {} | {} | {} / {} | {} / {} | **{:.2}** | {:.2} | {} | {} | {} | {} | {} |\n",
                s.to_format,
                s.repetitions,
                spread_cell(&s.ferry_wall_s, 2),
                spread_cell(&s.qemu_img_wall_s, 2),
                spread_cell(&s.qemu_img_with_sync_s, 2),
                mib_s(s.ferry_virtual_bytes_per_sec),
                mib_s(s.ferry_allocated_bytes_per_sec),
                mib_s(s.qemu_img_virtual_bytes_per_sec),
                mib_s(s.qemu_img_allocated_bytes_per_sec),
                s.ratio,
                s.ratio_with_sync,
                opt(s.ferry_mirror_ms.as_ref(), |p| spread_cell(p, 0)),
                opt(s.ferry_paused_ms.as_ref(), |p| spread_cell(p, 0)),
                opt(s.ferry_verify_ms.as_ref(), |p| spread_cell(p, 0)),
                opt(s.ferry_outside_agent_ms.as_ref(), |p| spread_cell(p, 0)),
                opt(s.ferry_heartbeat_gap_ms.as_ref(), |p| spread_cell(p, 0)),
            ));
        }
        md.push_str(
            "\n**Ferry s** — wall time of `ferry storage move VM --disk data --to local2 \
             --format F --wait -o json`, start to exit: pre-flight, mirror, the pause with \
             verification and pivot, the old file's removal, and the CLI's 200 ms polling. \
             **qemu-img convert s** — wall time of `qemu-img convert` alone (its output cache \
             mode is `unsafe`: the copy may still be in the page cache when it exits). \
             **convert + fsync** — plus `fsync` of the target: the copy on stable storage, as \
             Ferry's is before it switches. **MiB/s** — virtual size (or the source's \
             allocated bytes) ÷ median wall time. **Ratio** — Ferry's throughput ÷ \
             qemu-img's: median convert time ÷ median Ferry time (1 = as fast). **Mirror** — \
             from the agent's log: the mirror's copy, from its start to the pause (when it was \
             ready; QEMU flushes the target before it reports ready, so this compares with \
             convert + fsync). **Guest paused** — Ferry's `paused_ms`; **Verification** — \
             `verification.duration_ms` (inside the pause). **Outside the agent** — Ferry's \
             wall time less the agent's move (mirror, pause, deleting the old file): CLI start, \
             pre-flight, creating and opening the target, the controller's 250 ms and the CLI's \
             200 ms polling. **Heartbeat gap** — the longest gap between heartbeat \
             arrivals on the host while Ferry's command ran: the pause as the guest shows it.\n",
        );

        md.push_str(
            "\n## Every copy\n\n\
             | Rep | Tool | Purpose | From → to | Source alloc MiB | Target alloc MiB | \
             Wall s | fsync s | Total ms | Mirror ms | Paused ms | Verify ms | After switch ms | \
             Outside the agent ms | Heartbeat gap ms | Write gap ms | Records/s | Caches dropped | \
             Load / other QEMUs |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.runs {
            md.push_str(&format!(
                "| {} | {} | {} | {} {} → {} {} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |\n",
                r.repetition,
                r.tool,
                r.purpose,
                r.from_datastore,
                r.from_format,
                r.to_datastore,
                r.to_format,
                mib(r.source_allocated_bytes),
                mib(r.target_allocated_bytes),
                r.wall_s,
                opt(r.sync_s, |s| format!("{s:.2}")),
                opt(r.total_ms, |v| v.to_string()),
                opt(r.agent_mirror_ms, |v| v.to_string()),
                opt(r.paused_ms, |v| v.to_string()),
                opt(r.verify_ms, |v| v.to_string()),
                opt(r.agent_after_switch_ms, |v| v.to_string()),
                opt(r.outside_agent_ms, |v| v.to_string()),
                opt(r.guest_heartbeat_gap_ms, |d| format!("{d:.0}")),
                opt(r.guest_write_gap_ms, |d| format!("{d:.0}")),
                opt(r.guest_records_per_sec, |d| format!("{d:.1}")),
                if r.caches_dropped { "yes" } else { "**no**" },
                opt(r.load1, |l| format!("{l:.2}")),
                r.other_qemu_processes,
            ));
        }
        md.push_str(
            "\n**Write gap** — the longest gap between two of the guest's flushed disk records \
             while the command ran; **Records/s** — the guest's flushed records per second \
             meanwhile. **Load / other QEMUs** — the 1-minute load average and the QEMU \
             processes of other users on the machine right before the copy. Returns move the disk back to `local` as raw for the next repetition \
             and are not compared.\n",
        );
        let run_notes: Vec<&CopyRun> = self.runs.iter().filter(|r| !r.notes.is_empty()).collect();
        if !self.notes.is_empty() || !run_notes.is_empty() {
            md.push_str("\n## Notes\n\n");
            for note in &self.notes {
                md.push_str(&format!("- {note}\n"));
            }
            for r in run_notes {
                md.push_str(&format!(
                    "- rep {} / {} {} → {}: {}\n",
                    r.repetition,
                    r.tool,
                    r.purpose,
                    r.to_format,
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

    fn run(tool: &str, purpose: &str, to: &str, wall: f64) -> CopyRun {
        CopyRun {
            repetition: 1,
            tool: tool.into(),
            purpose: purpose.into(),
            from_datastore: "local".into(),
            to_datastore: "local2".into(),
            from_format: "raw".into(),
            to_format: to.into(),
            virtual_bytes: 1 << 30,
            source_allocated_bytes: 768 << 20,
            target_allocated_bytes: 768 << 20,
            caches_dropped: true,
            load1: Some(1.0),
            other_qemu_processes: 0,
            wall_s: wall,
            sync_s: (tool == "qemu-img").then_some(0.5),
            total_ms: (tool == "ferry").then_some((wall * 1000.0) as u64),
            paused_ms: (tool == "ferry").then_some(300),
            verify_ms: (tool == "ferry").then_some(250),
            verified: (tool == "ferry").then_some(true),
            phases: vec![],
            migration_id: None,
            agent_mirror_ms: (tool == "ferry").then_some(1000),
            agent_after_switch_ms: (tool == "ferry").then_some(10),
            outside_agent_ms: (tool == "ferry").then_some(400),
            guest_heartbeat_gap_ms: Some(320.0),
            guest_write_gap_ms: Some(330.0),
            guest_records_per_sec: Some(40.0),
            notes: vec![],
        }
    }

    #[test]
    fn spread_is_median_min_max() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[4.0, 1.0]).unwrap().median, 2.5);
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN]), None);
    }

    #[test]
    fn the_ratio_is_ferry_throughput_over_qemu_img_and_ignores_returns() {
        let runs = vec![
            run("qemu-img", "measured", "qcow2", 1.0),
            run("ferry", "measured", "qcow2", 4.0),
            run("ferry", "return", "raw", 0.1),
            run("qemu-img", "measured", "qcow2", 3.0),
            run("ferry", "measured", "qcow2", 4.0),
            run("ferry", "measured", "raw", 1.0),
        ];
        let s = FormatSummary::of(&runs, "qcow2").unwrap();
        assert_eq!(s.repetitions, 2);
        assert!((s.ratio - 0.5).abs() < 1e-9, "{}", s.ratio);
        assert!((s.ratio_with_sync - 2.5 / 4.0).abs() < 1e-9);
        assert!((s.ferry_virtual_bytes_per_sec - (1u64 << 30) as f64 / 4.0).abs() < 1e-6);
        assert!((s.qemu_img_allocated_bytes_per_sec - (768u64 << 20) as f64 / 2.0).abs() < 1e-6);
        // No qemu-img run for raw: no summary.
        assert!(FormatSummary::of(&runs, "raw").is_none());
    }

    #[test]
    fn the_markdown_has_one_row_per_format_and_per_run() {
        let runs = vec![
            run("qemu-img", "measured", "raw", 1.0),
            run("ferry", "measured", "raw", 2.0),
            run("ferry", "return", "raw", 2.0),
        ];
        let report = StorageReport {
            format_version: STORAGE_FORMAT_VERSION,
            benchmark: BENCHMARK.into(),
            conditions: StorageConditions {
                date: "2026-01-01T00:00:00Z".into(),
                command: "ferry-bench storage-move".into(),
                qemu_version: "10.0.2".into(),
                qemu_img_version: "qemu-img 10.0.2".into(),
                accel: "tcg".into(),
                accel_reason: "no vmx".into(),
                host_cpu: "cpu".into(),
                host_cores: 2,
                host_memory_mib: 1024,
                kernel: "6.1".into(),
                loadavg: vec!["0.5".into(), "1.0".into()],
                other_qemu_processes: 0,
                datastores: vec![],
                disk_virtual_bytes: 1 << 30,
                disk_filled_bytes: 768 << 20,
                disk_allocated_bytes: 768 << 20,
                source_format: "raw".into(),
                target_formats: vec!["raw".into()],
                repetitions: 1,
                guest: GuestConditions {
                    ram_mib: 512,
                    vcpus: 1,
                    description: "test guest".into(),
                    heartbeat_ms: 10,
                    disk_records_per_sec_set: 50,
                    disk_records_device: "/dev/vdb".into(),
                    disk_records_per_sec_idle: Some(40.0),
                    idle_heartbeat_gap_ms: Some(15.0),
                    idle_window_s: 5.0,
                },
                page_cache: "dropped".into(),
                ferry: "mirror".into(),
                qemu_img: "convert".into(),
            },
            summary: vec![FormatSummary::of(&runs, "raw").unwrap()],
            runs,
            notes: vec!["a note".into()],
        };
        let md = report.markdown();
        let summary_rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| raw → ")).collect();
        assert_eq!(summary_rows.len(), 1);
        assert!(
            summary_rows[0].contains("| **0.50** |"),
            "{}",
            summary_rows[0]
        );
        let header = md
            .lines()
            .find(|l| l.starts_with("| Target format"))
            .unwrap();
        assert_eq!(
            summary_rows[0].matches('|').count(),
            header.matches('|').count()
        );
        let run_rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| 1 |")).collect();
        assert_eq!(run_rows.len(), 3);
        let run_header = md.lines().find(|l| l.starts_with("| Rep ")).unwrap();
        for row in run_rows {
            assert_eq!(row.matches('|').count(), run_header.matches('|').count());
        }
        assert!(md.contains("- a note"));
        // The JSON form round-trips.
        let json = serde_json::to_string(&report).unwrap();
        let back: StorageReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.runs.len(), 3);
        assert_eq!(back.benchmark, BENCHMARK);
    }
}

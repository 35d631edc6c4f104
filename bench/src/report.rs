//! What one benchmark run found, and its Markdown and JSON forms.

use ferry_netprobe::EchoReport;
use serde::{Deserialize, Serialize};

/// Version of the JSON form: 2 added the network probe (`network_*` fields
/// of a run, `network_probe` of the conditions).
pub const FORMAT_VERSION: u32 = 2;

/// Everything a reader needs to reproduce or discount the numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Conditions {
    /// UTC, RFC 3339.
    pub date: String,
    pub qemu_version: String,
    pub accel: String,
    pub accel_reason: String,
    pub host_cpu: String,
    pub host_cores: usize,
    pub kernel: String,
    /// The tbf rate on host1's link (both directions).
    pub link_rate_mbit: u64,
    pub tbf: String,
    /// Measured TCP goodput host1 → host2 over that link, before and after
    /// the migrations.
    pub goodput_bytes_per_sec: Vec<f64>,
    pub guest_ram_mib: u64,
    pub guest_vcpus: u32,
    pub working_set_mib: u64,
    pub heartbeat_ms: u64,
    /// How long a migration may take before it is cancelled and recorded as
    /// "did not converge".
    pub bound_secs: u64,
    pub ferry_strategy: String,
    pub qemu_strategy: String,
    /// How the network-observed downtime was measured, and why the QEMU
    /// baseline has none.
    #[serde(default)]
    pub network_probe: String,
}

impl Conditions {
    pub fn goodput(&self) -> f64 {
        let n = self.goodput_bytes_per_sec.len().max(1) as f64;
        self.goodput_bytes_per_sec.iter().sum::<f64>() / n
    }
}

/// One migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// `idle`, `half`, `above`.
    pub scenario: String,
    /// `ferry` or `qemu-defaults`.
    pub migrator: String,
    /// `ferry.mem_rate` the guest was booted with (MiB/s).
    pub dirty_rate_target_mib_s: u64,
    /// Measured before the migration (QEMU `calc-dirty-rate`, 1 s, page
    /// sampling; for Ferry: the controller's own pre-flight sample).
    pub dirty_rate_measured_mib_s: Option<f64>,
    pub converged: bool,
    /// `completed`, or how it ended.
    pub outcome: String,
    /// Wall time the user waits: Ferry from the API request to the final
    /// status; QEMU from starting the destination QEMU to `completed` (what
    /// `virsh migrate` would include).
    pub total_s: f64,
    /// The stream alone: QEMU's `total-time`; Ferry's memory + switchover
    /// phases.
    pub stream_s: Option<f64>,
    /// Longest gap between heartbeat arrivals at the host during the
    /// migration (source and destination consoles merged).
    pub guest_downtime_ms: Option<f64>,
    /// Longest gap in the 3 s before the migration: the noise floor of the
    /// measurement on this machine.
    pub baseline_gap_ms: Option<f64>,
    /// QEMU's own downtime figure.
    pub qemu_downtime_ms: Option<u64>,
    /// Bytes of the migration stream as QEMU counts them.
    pub stream_bytes: u64,
    /// Bytes that crossed host1's veth towards the bridge while it ran
    /// (TCP/IP and TLS overhead included).
    pub wire_bytes: u64,
    pub passes: u64,
    pub nonzero_ram_bytes: u64,
    pub floor_s: f64,
    /// Oracle failures the guest reported on its console during the run.
    pub oracle_failures: u64,
    /// Network-observed downtime: the longest gap between two echoes the
    /// client namespace's TCP echo probe received, as the controller stored
    /// it in the migration report (`network_downtime_ms`, whole ms rounded
    /// up). Ferry's runs only: `None` for the QEMU baseline, whose guest
    /// has no network, or when the probe could not run (see the notes).
    #[serde(default)]
    pub network_downtime_ms: Option<u64>,
    /// The probe lost no message, got none back altered and kept its one
    /// connection (`EchoReport::is_clean`).
    #[serde(default)]
    pub network_probe_clean: Option<bool>,
    /// The same probe's longest gap from its connection to the migration
    /// request (at least the 3 s settle): the measurement's noise.
    #[serde(default)]
    pub network_baseline_gap_ms: Option<f64>,
    /// What the probe saw, in full.
    #[serde(default)]
    pub network_probe: Option<EchoReport>,
    /// The capabilities and limits the migration ran with, as the
    /// migrator reported them.
    pub strategy: String,
    /// Escalations, throttling, anything unusual.
    pub notes: Vec<String>,
}

/// The whole output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub format_version: u32,
    pub conditions: Conditions,
    pub scenarios: Vec<ScenarioInfo>,
    pub runs: Vec<RunResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioInfo {
    pub name: String,
    pub description: String,
    pub mem_rate_mib_s: u64,
}

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1u64 << 20) as f64)
}

fn secs(s: f64) -> String {
    format!("{s:.1}")
}

fn opt<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map(show).unwrap_or_else(|| "–".to_string())
}

/// The baseline gaps: guest / network.
fn baseline_cell(r: &RunResult) -> String {
    format!(
        "{} / {}",
        opt(r.baseline_gap_ms, |d| format!("{d:.0}")),
        opt(r.network_baseline_gap_ms, |d| format!("{d:.0}"))
    )
}

/// The network downtime cell: the gap, flagged when the probe was not
/// clean; "not measured" for runs without a probe by design.
fn network_cell(r: &RunResult) -> String {
    match (r.network_downtime_ms, r.network_probe_clean) {
        (Some(ms), Some(false)) => format!("{ms} **not clean**"),
        (Some(ms), _) => ms.to_string(),
        (None, _) if r.migrator == "qemu-defaults" => "not measured".to_string(),
        (None, _) => "–".to_string(),
    }
}

impl BenchReport {
    /// The results as a Markdown page: conditions, one table, notes.
    pub fn markdown(&self) -> String {
        let c = &self.conditions;
        let goodput: Vec<String> = c
            .goodput_bytes_per_sec
            .iter()
            .map(|g| format!("{:.1} MiB/s ({:.0} Mbit/s)", g / 1048576.0, g * 8.0 / 1e6))
            .collect();
        let mut md = String::new();
        md.push_str("# Live migration: Ferry vs. plain QEMU defaults\n\n");
        md.push_str(&format!(
            "Run {date} with `cargo run --release -p ferry-bench` (see `bench/README.md`).\n\n",
            date = c.date
        ));
        md.push_str("## Conditions\n\n");
        for (k, v) in [
            ("QEMU", c.qemu_version.clone()),
            ("Accelerator", format!("{} — {}", c.accel, c.accel_reason)),
            (
                "Host",
                format!(
                    "{} ({} cores), Linux {}",
                    c.host_cpu, c.host_cores, c.kernel
                ),
            ),
            (
                "Link",
                format!(
                    "veth pair host1 ↔ bridge, `tc {}` on both directions of host1's link; \
                     host2 unshaped",
                    c.tbf
                ),
            ),
            (
                "Measured goodput",
                format!(
                    "{} (one TCP stream host1 → host2, before / after the migrations)",
                    goodput.join(" / ")
                ),
            ),
            (
                "Guest",
                format!(
                    "{} MiB RAM, {} vCPU, test guest (Debian cloud kernel, busybox, ferry-probe), \
                     no disk; heartbeat every {} ms. Ferry's runs: one virtio NIC on the cluster \
                     network and the guest's TCP echo service; QEMU baseline: no NIC",
                    c.guest_ram_mib, c.guest_vcpus, c.heartbeat_ms
                ),
            ),
            (
                "Working set",
                format!(
                    "{} MiB, written in full at boot, then dirtied at the scenario's rate",
                    c.working_set_mib
                ),
            ),
            (
                "Bound",
                format!(
                    "{} s per migration; then cancelled and recorded as not converged",
                    c.bound_secs
                ),
            ),
            ("Ferry", c.ferry_strategy.clone()),
            ("QEMU defaults", c.qemu_strategy.clone()),
            ("Network probe", c.network_probe.clone()),
        ] {
            md.push_str(&format!("- **{k}**: {v}\n"));
        }
        md.push_str("\nScenarios:\n\n");
        for s in &self.scenarios {
            md.push_str(&format!(
                "- `{}` — {} (`ferry.mem_rate={}`)\n",
                s.name, s.description, s.mem_rate_mib_s
            ));
        }
        md.push_str(
            "\n## Results\n\n\
             | Scenario | Dirty rate MiB/s (set / measured) | Migrator | Converged | Total s | \
             Stream s | Guest downtime ms | Network downtime ms | QEMU downtime ms | \
             Baseline gap ms (guest / network) | Stream MiB | Wire MiB | Passes | \
             Non-zero RAM MiB | Floor s |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.runs {
            md.push_str(&format!(
                "| {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.scenario,
                r.dirty_rate_target_mib_s,
                opt(r.dirty_rate_measured_mib_s, |d| format!("{d:.0}")),
                r.migrator,
                if r.converged {
                    "yes".to_string()
                } else {
                    format!("**no** ({})", r.outcome)
                },
                secs(r.total_s),
                opt(r.stream_s, secs),
                opt(r.guest_downtime_ms, |d| format!("{d:.0}")),
                network_cell(r),
                opt(r.qemu_downtime_ms, |d| d.to_string()),
                baseline_cell(r),
                mib(r.stream_bytes),
                mib(r.wire_bytes),
                r.passes,
                mib(r.nonzero_ram_bytes),
                secs(r.floor_s),
            ));
        }
        md.push_str(
            "\nColumns: **Total** — wall time the user waits (Ferry: API request to final \
             status, pre-flight dirty-rate sample, destination start and source retirement \
             included; QEMU: destination start to `completed`, as `virsh migrate` would). \
             **Stream** — the migration stream alone (QEMU `total-time`; Ferry's memory + \
             switchover phases). **Guest downtime** — the longest gap between heartbeat lines \
             as they arrived at the host on the source's and the destination's serial sockets \
             (the guest's clock stops while paused, so only host-side arrival times show the \
             pause); for a migration that did not converge it is the guest's longest stall \
             while it ran (throttling included). **Network downtime** — what a TCP client of \
             the guest saw: the longest gap between two echoes received by the network probe \
             (one connection from the cluster's client namespace to the guest's echo service, \
             one line every 5 ms, so a 5 ms resolution; see the conditions) over the probe's \
             whole life — from its connection, before the 3 s settle, until 1.5 s after the \
             migration's end — as stored in Ferry's migration report \
             (`network_downtime_ms`); \"not clean\" when the probe lost or got back altered \
             lines or its connection broke (details in the notes). Not measured for the QEMU \
             baseline: its guest has no NIC (see the conditions). **Baseline gap** — the same \
             measures before the migration (guest: the 3 s before it; network: from the \
             probe's connection to the request): the measurements' noise on this machine. \
             **Wire** — bytes \
             host1's veth carried while the migration ran (TCP/IP and, for Ferry, TLS \
             included). **Floor** — non-zero guest RAM (4 KiB pages read from the QEMU's \
             memfd just before migrating) ÷ mean measured goodput: no migration of that guest \
             over that link can be faster.\n",
        );
        let notes: Vec<&RunResult> = self.runs.iter().filter(|r| !r.notes.is_empty()).collect();
        if !notes.is_empty() {
            md.push_str("\n## Notes per run\n\n");
            for r in notes {
                md.push_str(&format!(
                    "- {} / {}: {}\n",
                    r.scenario,
                    r.migrator,
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

    fn conditions() -> Conditions {
        Conditions {
            date: "2025-01-01T00:00:00Z".into(),
            qemu_version: "10.0.2".into(),
            accel: "tcg".into(),
            accel_reason: "no vmx".into(),
            host_cpu: "cpu".into(),
            host_cores: 2,
            kernel: "6.1".into(),
            link_rate_mbit: 200,
            tbf: "tbf rate 200mbit".into(),
            goodput_bytes_per_sec: vec![20.0 * 1048576.0, 22.0 * 1048576.0],
            guest_ram_mib: 512,
            guest_vcpus: 1,
            working_set_mib: 128,
            heartbeat_ms: 10,
            bound_secs: 90,
            ferry_strategy: "default".into(),
            qemu_strategy: "defaults".into(),
            network_probe: "echo every 5 ms".into(),
        }
    }

    #[test]
    fn goodput_is_the_mean_of_the_measurements() {
        assert!((conditions().goodput() - 21.0 * 1048576.0).abs() < 1e-6);
    }

    #[test]
    fn the_table_has_one_row_per_run_and_marks_non_convergence() {
        let run = RunResult {
            scenario: "above".into(),
            migrator: "qemu-defaults".into(),
            dirty_rate_target_mib_s: 34,
            dirty_rate_measured_mib_s: Some(30.0),
            converged: false,
            outcome: "cancelled after 90 s".into(),
            total_s: 90.2,
            stream_s: Some(90.0),
            guest_downtime_ms: Some(25.0),
            baseline_gap_ms: Some(20.0),
            qemu_downtime_ms: None,
            stream_bytes: 3 << 30,
            wire_bytes: 3 << 30,
            passes: 40,
            nonzero_ram_bytes: 170 << 20,
            floor_s: 7.7,
            oracle_failures: 0,
            network_downtime_ms: None,
            network_probe_clean: None,
            network_baseline_gap_ms: None,
            network_probe: None,
            strategy: "defaults".into(),
            notes: vec!["note".into()],
        };
        let report = BenchReport {
            format_version: FORMAT_VERSION,
            conditions: conditions(),
            scenarios: vec![],
            runs: vec![
                run.clone(),
                RunResult {
                    converged: true,
                    ..run
                },
            ],
        };
        let md = report.markdown();
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| above")).collect();
        assert_eq!(rows.len(), 2, "{md}");
        assert!(
            rows[0].contains("**no** (cancelled after 90 s)"),
            "{}",
            rows[0]
        );
        assert!(rows[1].contains("| yes |"), "{}", rows[1]);
        assert!(rows[0].contains("| 3072 |"), "{}", rows[0]);
        let header_cells = md
            .lines()
            .find(|l| l.starts_with("| Scenario"))
            .unwrap()
            .matches('|')
            .count();
        assert_eq!(rows[0].matches('|').count(), header_cells);
        assert!(rows[0].contains("| not measured |"), "{}", rows[0]);
        assert!(rows[0].contains("| 20 / – |"), "{}", rows[0]);
    }

    #[test]
    fn the_network_cell_flags_an_unclean_probe() {
        let mut run: RunResult = serde_json::from_value(serde_json::json!({
            "scenario": "half", "migrator": "ferry", "dirty_rate_target_mib_s": 11,
            "dirty_rate_measured_mib_s": null, "converged": true, "outcome": "completed",
            "total_s": 12.0, "stream_s": 10.0, "guest_downtime_ms": 80.0,
            "baseline_gap_ms": 20.0, "qemu_downtime_ms": 30, "stream_bytes": 0,
            "wire_bytes": 0, "passes": 3, "nonzero_ram_bytes": 0, "floor_s": 7.0,
            "oracle_failures": 0, "strategy": "", "notes": []
        }))
        .expect("a format-1 run still parses");
        assert_eq!(run.network_downtime_ms, None);
        assert_eq!(network_cell(&run), "–");
        run.network_downtime_ms = Some(41);
        run.network_probe_clean = Some(true);
        assert_eq!(network_cell(&run), "41");
        run.network_probe_clean = Some(false);
        assert_eq!(network_cell(&run), "41 **not clean**");
    }
}

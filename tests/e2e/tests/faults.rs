//! End-to-end: fault scenarios of a live migration (issue 4, item 4). Each one
//! injects one fault into a running migration and then checks the end state:
//!
//! - the migration ends (cancelled or failed; completed only where the
//!   switchover committed) and the VM runs exactly once, on its source unless
//!   the switchover committed;
//! - the guest's oracles are clean: its heartbeat goes on from where it was
//!   (the guest was never restarted) and its console shows no `probe-error`
//!   nor `oracle-fail` since the fault;
//! - G1: exactly one running QEMU carries the VM's uuid at the end, and a G1
//!   watch (every 20 ms) across the scenario never saw two running, nor a
//!   destination QEMU running a guest that never committed there;
//! - G3: the controller agrees with what runs (`cluster.check_g3()`);
//! - the other host holds nothing of the VM: no VM folder under
//!   `state/vms`, no disk in its datastores, no QEMU.
//!
//! One namespace cluster of three hosts (`ferry local up --netns --hosts 3`):
//! host1 runs only the controller, so restarting its ferryd to arm or disarm
//! the saga's failpoints (`FAILPOINTS`, `fail` syntax; `NAME=sleep(MS)` makes
//! the saga pause at a boundary) never touches a VM. The VM lives on host2
//! and host3. The namespaces give the test a link it can shape (`tc tbf` on
//! the destination's downlink makes the NBD disk mirror last seconds: Ferry
//! does not throttle the mirror itself, `--bandwidth` caps only the RAM
//! stream) and cut. host3's `local` datastore is a 200 MiB tmpfs mounted
//! before anything is created there (and before host3's ferryd is restarted,
//! so that its mount namespace sees it), so that a test can fill it up.
//!
//! The scenarios share one booted guest and run in order; a scenario that
//! fails is recorded (with its panic message), the cluster is reset as far as
//! possible, and the next one runs. At the end the test prints every
//! scenario's line and "N faults injected, M passed", and fails unless all
//! passed. Needs root (namespaces, tmpfs) and the built test guest.
//! `FERRY_FAULTS=1a,4` runs only the scenarios with those numbers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::{guest_spec, heartbeats, Cluster};
use ferry_test_support::console;
use ferry_test_support::invariants::{
    check_g1, qemu_processes, G1Report, G1Watch, QemuProcess, DEFAULT_INTERVAL,
};
use ferry_test_support::netns::{Direction, Rig, Shape};
use serde_json::Value;

/// How long a migration may take to end once its fault is in (or its cancel
/// asked for).
const END: Duration = Duration::from_secs(90);
/// How long the other host may take to be rid of the VM after the end.
const CLEAN: Duration = Duration::from_secs(30);
/// The destination's downlink while a test needs the mirror to last: the
/// test disk's 16 MiB of data then take about 8 s.
const SLOW_MIRROR_MBIT: u64 = 16;
/// The RAM stream's cap while a test needs the RAM copy to last.
const SLOW_RAM: &str = "4MiB/s";
/// How long the saga pauses at an armed boundary.
const PAUSE: &str = "sleep(4000)";
/// The source QEMU's migration thread (QEMU ≥ 9, `-name …,debug-threads=on`):
/// it exists from `migrate` until the migration ended (completed, failed or
/// cancelled) and QEMU cleaned up.
const MIGRATION_THREAD: &str = "mig/src/main";
/// How long a cut link may keep a migration going before the test calls it
/// a hang: the controller's longest own timeout (the switchover's, 60 s) plus
/// room for the unwind.
const CUT_BOUND: Duration = Duration::from_secs(75);
/// How long a QEMU's vCPUs must keep running for its guest to count as
/// having run (five of G1's sampling windows).
const SUSTAINED: Duration = Duration::from_millis(100);
/// How long the cut-off destination may take to be cleaned once its link is
/// back.
const CUT_CLEAN: Duration = Duration::from_secs(60);

fn other(host: &str) -> &'static str {
    if host == "host2" {
        "host3"
    } else {
        "host2"
    }
}

fn active(report: &Value) -> bool {
    matches!(report["status"].as_str(), Some("pending" | "running"))
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// The threads of a process, by name (`/proc/PID/task/*/comm`).
fn threads(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

fn sigkill(process: &QemuProcess) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(process.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("SIGKILL {}: {e}", process.describe()));
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A tmpfs mounted over a folder, unmounted (lazily: a QEMU may still hold a
/// file there) when dropped, also when the test fails.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        let where_ = path.to_str().expect("UTF-8 path");
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                where_,
            ],
        )
        .unwrap_or_else(|e| panic!("mounting a tmpfs on {where_}: {e}"));
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Bytes an unprivileged write could still take.
    fn available(&self) -> u64 {
        let stat = nix::sys::statvfs::statvfs(&self.path).expect("statvfs of the tmpfs");
        stat.blocks_available() as u64 * stat.fragment_size() as u64
    }

    fn filler(&self) -> PathBuf {
        self.path.join("filler")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.filler());
        if let Err(e) = run("umount", &["-l", self.path.to_str().unwrap_or_default()]) {
            eprintln!("unmounting the tmpfs: {e}");
        }
    }
}

/// Where the VM was when a fault went in.
struct Before {
    host: String,
    heartbeat: u64,
    /// The length of its console log then: what follows is checked.
    log_len: usize,
}

/// The shared cluster, VM and failpoint state.
struct Fx<'a> {
    c: &'a Cluster,
    rig: Rig,
    tmpfs: &'a Tmpfs,
    vm: String,
    uuid: String,
    /// What host1's ferryd was started with in FAILPOINTS ("" = nothing).
    armed: String,
    /// VMs created so far (a reset may have to replace a lost one).
    created: u32,
}

impl Fx<'_> {
    fn create_vm(&mut self, host: &str) {
        self.created += 1;
        self.vm = if self.created == 1 {
            "faulty".to_string()
        } else {
            format!("faulty{}", self.created)
        };
        let spec = self
            .c
            .write_spec(&format!("{}.toml", self.vm), &guest_spec(&self.vm, "local"));
        self.c.ferry_ok(&[
            "vm",
            "create",
            "-f",
            spec.to_str().expect("UTF-8"),
            "--host",
            host,
            "--start",
        ]);
        self.c.wait_heartbeat(host, &self.vm);
        self.uuid = self.c.vm_uuid(&self.vm);
    }

    fn host(&self) -> String {
        let info = self.c.vm(&self.vm);
        info["host"]
            .as_str()
            .unwrap_or_else(|| panic!("no host in {info}"))
            .to_string()
    }

    /// Restarts host1's ferryd (the controller) with `points` in FAILPOINTS,
    /// unless it already runs with them.
    fn arm(&mut self, points: &str) {
        if self.armed == points {
            return;
        }
        if points.is_empty() {
            self.c.restart_ferryd_env("host1", &[]);
        } else {
            self.c
                .restart_ferryd_env("host1", &[("FAILPOINTS", points)]);
        }
        self.armed = points.to_string();
    }

    fn console(&self, host: &str) -> Vec<u8> {
        std::fs::read(
            self.c
                .host_dir(host)
                .join("state/vms")
                .join(&self.vm)
                .join("console.log"),
        )
        .unwrap_or_default()
    }

    fn last_heartbeat(&self, host: &str) -> u64 {
        heartbeats(&String::from_utf8_lossy(&self.console(host)))
            .last()
            .copied()
            .unwrap_or(0)
    }

    fn before(&self) -> Before {
        let host = self.host();
        Before {
            heartbeat: self.last_heartbeat(&host),
            log_len: self.console(&host).len(),
            host,
        }
    }

    /// `ferry migrate VM --to TO -o json EXTRA…` (not waiting): the id.
    /// Without the backup a copied migration takes by default: these
    /// scenarios are about the migration's own faults (the backup is tested
    /// in storage.rs), and one of them leaves the datastore without room.
    fn start(&self, to: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "migrate",
            self.vm.as_str(),
            "--to",
            to,
            "--no-backup",
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        let report = self.c.ferry_ok(&args).json();
        report["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no migration id in {report}"))
            .to_string()
    }

    /// Starts a copied-storage migration whose mirror lasts a few seconds
    /// (the destination's downlink shaped: `--bandwidth` does not slow a
    /// mirror) and waits until it runs: the id, and how far it got.
    fn start_slow_mirror(&self, to: &str) -> (String, String) {
        self.rig
            .shape_direction(to, Direction::ToHost, &Shape::mbit(SLOW_MIRROR_MBIT))
            .expect("shape the destination's downlink");
        let id = self.start(to, &["--storage", "copy", "--bandwidth", SLOW_RAM]);
        let r = self.wait_state(&id, "the mirror to run", END, mirroring);
        let (done, total) = progress(&r);
        (id, format!("{} of {} MiB", done >> 20, total >> 20))
    }

    /// Starts a migration slowed to `SLOW_RAM` and waits for its RAM copy.
    fn start_in_memory(&self, to: &str) -> String {
        let id = self.start(to, &["--bandwidth", SLOW_RAM]);
        self.wait_state(&id, "the RAM copy", END, |r| r["phase"] == "memory");
        id
    }

    fn show(&self, id: &str) -> Value {
        self.c
            .ferry_ok(&["migration", "show", id, "-o", "json"])
            .json()
    }

    /// Polls the migration until `pred` holds; fails if it ended first.
    fn wait_state(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let report = self.show(id);
            if !active(&report) {
                panic!(
                    "migration {id} ended ({}) before {what}: {report:#}\n{}",
                    report["status"],
                    self.c.logs()
                );
            }
            if pred(&report) {
                return report;
            }
            if started.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}: {report:#}\n{}",
                    self.c.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the migration to end: its report and how long it took.
    fn wait_end(&self, id: &str, timeout: Duration) -> (Value, Duration) {
        let started = Instant::now();
        loop {
            let report = self.show(id);
            if !active(&report) {
                return (report, started.elapsed());
            }
            if started.elapsed() > timeout {
                panic!(
                    "migration {id} still {} in phase {} {timeout:?} after the fault: {report:#}\n{}",
                    report["status"],
                    report["phase"],
                    self.c.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ferry migration cancel ID`: its answer and how long it took.
    fn cancel(&self, id: &str) -> (Value, Duration) {
        let started = Instant::now();
        let report = self
            .c
            .ferry_ok(&["migration", "cancel", id, "-o", "json"])
            .json();
        (report, started.elapsed())
    }

    /// Waits, from QEMU's side only, until the source QEMU on `from` sits at
    /// pre-switchover: its migration thread is there and its guest is paused
    /// (two observations in a row). No controller call: while the saga
    /// pauses at a failpoint (a blocking sleep in one of ferryd's runtime
    /// threads) the controller may answer late.
    fn wait_pre_switchover(&self, from: &str) {
        let source = self.wait_qemu_on(from);
        let started = Instant::now();
        let mut seen = 0;
        while seen < 2 {
            assert!(
                Path::new(&format!("/proc/{}", source.pid)).exists(),
                "the source QEMU {} ended before pre-switchover\n{}",
                source.describe(),
                self.c.logs()
            );
            assert!(
                started.elapsed() < END,
                "the source never paused at pre-switchover within {END:?}\n{}",
                self.c.logs()
            );
            let migrating = threads(source.pid).iter().any(|t| t == MIGRATION_THREAD);
            seen = if migrating && self.paused_on(from) {
                seen + 1
            } else {
                0
            };
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the switchover completed on the source on `from` (the
    /// saga is in phase `switchover` and QEMU's migration thread has ended),
    /// then one more second: the destination confirms within milliseconds,
    /// and then the saga sits at `switchover.after`.
    fn wait_switched_over(&self, id: &str, from: &str) {
        let source = self.wait_qemu_on(from);
        self.wait_state(id, "the switchover", END, |r| r["phase"] == "switchover");
        self.c.wait_for(
            "the source's migration thread to end",
            Duration::from_secs(30),
            || (!threads(source.pid).iter().any(|t| t == MIGRATION_THREAD)).then_some(()),
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    /// The VM's QEMU whose command line names `host`'s folder.
    fn qemu_on(&self, host: &str) -> Option<QemuProcess> {
        let dir = self.c.host_dir(host);
        qemu_processes()
            .expect("list QEMU processes")
            .into_iter()
            .find(|p| p.uuid.as_deref() == Some(self.uuid.as_str()) && p.mentions(&dir))
    }

    fn wait_qemu_on(&self, host: &str) -> QemuProcess {
        self.c.wait_for(
            &format!("the QEMU of {} on {host}", self.vm),
            Duration::from_secs(30),
            || self.qemu_on(host),
        )
    }

    /// Whether the VM's QEMU on `host` has its guest paused (vCPU time, G1's
    /// evidence).
    fn paused_on(&self, host: &str) -> bool {
        let Some(qemu) = self.qemu_on(host) else {
            return false;
        };
        let Ok(g1) = check_g1(&self.uuid) else {
            return false;
        };
        g1.qemus
            .iter()
            .any(|q| q.process.pid == qemu.pid && !q.running())
    }

    /// What `host` still holds of the VM.
    fn leftovers_on(&self, host: &str) -> Vec<String> {
        let dir = self.c.host_dir(host);
        let mut left = Vec::new();
        let folder = dir.join("state/vms").join(&self.vm);
        if folder.exists() {
            left.push(format!("VM folder {}", folder.display()));
        }
        if let Ok(stores) = std::fs::read_dir(dir.join("datastores")) {
            for store in stores.flatten() {
                let disk = store.path().join(format!("{}.raw", self.vm));
                if disk.exists() {
                    left.push(format!("disk {}", disk.display()));
                }
            }
        }
        for qemu in qemu_processes().expect("list QEMU processes") {
            if qemu.uuid.as_deref() == Some(self.uuid.as_str()) && qemu.mentions(&dir) {
                left.push(format!("QEMU {}", qemu.describe()));
            }
        }
        left
    }

    /// Waits until `host` holds nothing of the VM: how long that took, or
    /// what is left.
    fn wait_clean(&self, host: &str, timeout: Duration) -> Result<Duration, Vec<String>> {
        let started = Instant::now();
        loop {
            let left = self.leftovers_on(host);
            if left.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                return Err(left);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The end state every scenario wants: nothing on `away`, the VM running
    /// on `on` only (G1), its heartbeat going on from `before` without a
    /// reset, no probe error since, and G3.
    fn settled(&self, on: &str, away: &str, before: &Before, cleanup: Duration) {
        if let Err(left) = self.wait_clean(away, cleanup) {
            panic!(
                "{away} still holds parts of {} {cleanup:?} after the end: {left:?}\n{}",
                self.vm,
                self.c.logs()
            );
        }
        let info = self.c.vm(&self.vm);
        assert_eq!(info["host"], on, "the VM is on {on}: {info}");
        assert_eq!(info["state"], "running", "the VM runs: {info}");
        let g1 = check_g1(&self.uuid).unwrap_or_else(|v| panic!("G1: {v}"));
        assert_eq!(
            (g1.qemus.len(), g1.running()),
            (1, 1),
            "G1: exactly one QEMU of the VM, running: {g1:#?}"
        );
        assert!(
            g1.qemus[0].process.mentions(&self.c.host_dir(on)),
            "G1: the running QEMU is {on}'s: {g1:#?}"
        );
        // The heartbeat goes on from where it was, on the host that runs it
        // (a new console log there if the VM moved).
        let from = if on == before.host { before.log_len } else { 0 };
        let tail = self.c.wait_for(
            &format!("{}'s heartbeat past {} on {on}", self.vm, before.heartbeat),
            Duration::from_secs(30),
            || {
                let log = self.console(on);
                let tail =
                    String::from_utf8_lossy(log.get(from..).unwrap_or_default()).into_owned();
                (heartbeats(&tail).len() >= 3).then_some(tail)
            },
        );
        let seen = heartbeats(&tail);
        assert!(
            seen.iter().all(|&s| s > before.heartbeat),
            "the heartbeat went on from {} without a reset (the guest was not restarted), \
             but after the fault it printed {:?}…",
            before.heartbeat,
            &seen[..seen.len().min(10)]
        );
        let errors = console::probe_errors(tail.as_bytes());
        let failures = console::oracle_failures(tail.as_bytes());
        assert!(
            errors.is_empty() && failures.is_empty(),
            "the guest's oracles complained since the fault: {errors:?} {failures:?}"
        );
        self.c
            .check_g3()
            .unwrap_or_else(|v| panic!("G3: {v}\n{}", self.c.logs()));
    }

    /// Back to a known state after a failed scenario, as far as possible:
    /// links up and unshaped, no filler, no failpoint, no active migration,
    /// the VM running (started again, or replaced by a new one).
    fn reset(&mut self) {
        eprintln!("  … resetting the cluster after a failed scenario");
        for host in ["host2", "host3"] {
            let _ = self.rig.restore(host);
            let _ = self.rig.unshape(host);
        }
        let _ = std::fs::remove_file(self.tmpfs.filler());
        let attempt = |what: &str, f: &mut dyn FnMut()| {
            if catch_unwind(AssertUnwindSafe(f)).is_err() {
                eprintln!("  … reset: {what} failed");
            }
        };
        attempt("ending active migrations", &mut || {
            let list = self.c.ferry_ok(&["migration", "list", "-o", "json"]).json();
            for m in list.as_array().into_iter().flatten().filter(|m| active(m)) {
                let id = m["id"].as_str().unwrap_or_default();
                let _ = self.c.ferry(&["migration", "cancel", id, "-o", "json"]);
                self.c.wait_for(&format!("migration {id} to end"), END, || {
                    let r = self.c.ferry(&["migration", "show", id, "-o", "json"]);
                    let r: Value = serde_json::from_str(&r.stdout).ok()?;
                    (!active(&r)).then_some(())
                });
            }
        });
        let mut armed = std::mem::take(&mut self.armed);
        attempt("disarming the failpoints", &mut || {
            if !armed.is_empty() {
                self.c.restart_ferryd_env("host1", &[]);
            }
            armed.clear();
        });
        // A VM that runs once stays; one that does not is started again;
        // one that cannot be started is replaced.
        let running = || {
            let info = self.c.ferry(&["vm", "show", &self.vm, "-o", "json"]);
            let info: Value = serde_json::from_str(&info.stdout).unwrap_or_default();
            info["state"] == "running"
                && check_g1(&self.uuid).is_ok_and(|g| g.qemus.len() == 1 && g.running() == 1)
        };
        if running() {
            return;
        }
        let started = self
            .c
            .ferry(&["vm", "start", &self.vm, "-o", "json"])
            .success;
        if started {
            let host = self.host();
            let len = self.console(&host).len();
            let booted = catch_unwind(AssertUnwindSafe(|| {
                self.c.wait_for(
                    "the restarted VM's heartbeat",
                    Duration::from_secs(90),
                    || {
                        let log = self.console(&host);
                        heartbeats(&String::from_utf8_lossy(log.get(len..).unwrap_or_default()))
                            .first()
                            .map(|_| ())
                    },
                )
            }));
            if booted.is_ok() && running() {
                eprintln!("  … reset: {} started again on {host}", self.vm);
                return;
            }
        }
        let old = self.vm.clone();
        let _ = self.c.ferry(&["vm", "stop", &old, "--force"]);
        let _ = self.c.ferry(&["vm", "delete", &old]);
        attempt("replacing the VM", &mut || self.create_vm("host2"));
        eprintln!("  … reset: {old} replaced by {} on host2", self.vm);
    }
}

/// Fails unless the watch saw no G1 violation and no QEMU of the VM on
/// `host` ever ran its guest (the destination of a migration that never
/// committed: "the source is authoritative until commit"). Running means
/// vCPU activity over at least [`SUSTAINED`]: a receiving QEMU's paused vCPU
/// thread does a little work when the final device state loads (TLB
/// flushes) or when the incoming migration fails, and under load that can
/// cross G1's per-window threshold in one 20 ms window.
fn never_ran_on(watch: G1Watch, host_dir: &Path) -> G1Report {
    let report = watch
        .stop()
        .unwrap_or_else(|v| panic!("G1 during the scenario: {v}"));
    let there: Vec<u32> = report
        .processes
        .iter()
        .filter(|p| p.mentions(host_dir))
        .map(|p| p.pid)
        .collect();
    for pid in there {
        let mut since = None;
        for (i, t) in report.timeline.iter().enumerate() {
            let runs = t.running.contains(&pid);
            match (runs, since) {
                (true, None) => since = Some(t.at),
                (false, Some(_)) => since = None,
                _ => {}
            }
            let until = report
                .timeline
                .get(i + 1)
                .map_or(report.duration, |next| next.at);
            if let Some(from) = since {
                assert!(
                    until.saturating_sub(from) < SUSTAINED,
                    "a QEMU on {} (pid {pid}) ran the guest of a migration that never \
                     committed, from {from:?} to {until:?} of the watch:\n{report}",
                    host_dir.display()
                );
            }
        }
    }
    report
}

fn progress(report: &Value) -> (u64, u64) {
    let p = &report["progress"];
    (
        p["disk_done_bytes"].as_u64().unwrap_or(0),
        p["disk_total_bytes"].as_u64().unwrap_or(0),
    )
}

/// The mirror runs and has not caught up.
fn mirroring(report: &Value) -> bool {
    let (done, total) = progress(report);
    report["phase"] == "mirror" && total > 0 && done < total
}

// ---- the scenarios ------------------------------------------------------------------

/// Which state a cancel targets.
enum CancelAt {
    Setup,
    Mirror,
    Memory,
    PreSwitchover,
    Completed,
}

fn cancel_in(fx: &mut Fx<'_>, at: CancelAt) -> String {
    let points = match at {
        CancelAt::Setup => format!("prepare_destination.after={PAUSE}"),
        CancelAt::PreSwitchover => format!("converge.after={PAUSE}"),
        CancelAt::Completed => format!("switchover.after={PAUSE}"),
        CancelAt::Mirror | CancelAt::Memory => String::new(),
    };
    fx.arm(&points);
    let b = fx.before();
    let (from, to) = (b.host.clone(), other(&b.host));
    let watch = G1Watch::start(&fx.uuid, DEFAULT_INTERVAL);
    let state = match at {
        CancelAt::Setup => {
            let id = fx.start(to, &[]);
            // The destination's QEMU exists: prepare_destination runs, and
            // the saga then pauses 4 s before start_outgoing.
            fx.wait_qemu_on(to);
            (id, "setup (paused after prepare_destination)".to_string())
        }
        CancelAt::Mirror => {
            let (id, mirrored) = fx.start_slow_mirror(to);
            (id, format!("mirror not ready ({mirrored})"))
        }
        CancelAt::Memory => (
            fx.start_in_memory(to),
            "RAM copy (mirror ready)".to_string(),
        ),
        CancelAt::PreSwitchover => {
            let id = fx.start(to, &[]);
            fx.wait_pre_switchover(&from);
            (id, "pre-switchover (source paused)".to_string())
        }
        CancelAt::Completed => {
            let id = fx.start(to, &[]);
            fx.wait_switched_over(&id, &from);
            (id, "completed, not committed".to_string())
        }
    };
    let (id, state) = state;
    let (report, took) = fx.cancel(&id);
    let _ = fx.rig.unshape(to);
    assert_eq!(
        report["status"],
        "cancelled",
        "`ferry migration cancel` during {state}: {report:#}\n{}",
        fx.c.logs()
    );
    if matches!(at, CancelAt::Setup) {
        // Honoured before the source was asked to send anything.
        let log =
            std::fs::read_to_string(fx.c.host_dir(&from).join("ferryd.log")).unwrap_or_default();
        assert!(
            !log.lines()
                .any(|l| l.contains("outgoing migration started") && l.contains(id.as_str())),
            "the cancel came during the set-up, yet {from} started sending: {report:#}"
        );
    }
    if matches!(at, CancelAt::Completed) {
        // The cancel came after QEMU completed the switchover (its downtime
        // figure is reported only then), before the commit.
        assert!(
            report["downtime_ms"].as_u64().is_some(),
            "the source had completed the switchover when the cancel came: {report:#}"
        );
    }
    fx.settled(&from, to, &b, CLEAN);
    never_ran_on(watch, &fx.c.host_dir(to));
    format!(
        "cancelled in {} (`migration cancel` answered in {}); VM running on {from}, {to} clean",
        state,
        secs(took)
    )
}

/// Which moment the destination QEMU is killed at.
enum KillAt {
    Mirror,
    Memory,
    Completed,
}

fn kill_destination(fx: &mut Fx<'_>, at: KillAt) -> String {
    fx.arm(&match at {
        KillAt::Completed => format!("switchover.after={PAUSE}"),
        _ => String::new(),
    });
    let b = fx.before();
    let (from, to) = (b.host.clone(), other(&b.host));
    let watch = G1Watch::start(&fx.uuid, DEFAULT_INTERVAL);
    let (id, state) = match at {
        KillAt::Mirror => {
            let (id, mirrored) = fx.start_slow_mirror(to);
            (id, format!("during the mirror ({mirrored})"))
        }
        KillAt::Memory => (fx.start_in_memory(to), "during the RAM copy".to_string()),
        KillAt::Completed => {
            let id = fx.start(to, &[]);
            fx.wait_switched_over(&id, &from);
            (
                id,
                "after the switchover completed, before the commit".to_string(),
            )
        }
    };
    let victim = fx.wait_qemu_on(to);
    sigkill(&victim);
    let (report, took) = fx.wait_end(&id, END);
    let _ = fx.rig.unshape(to);
    if matches!(at, KillAt::Completed) {
        assert!(
            report["downtime_ms"].as_u64().is_some(),
            "the kill was meant to land after the switchover completed: {report:#}"
        );
    }
    assert_eq!(
        report["status"],
        "failed",
        "SIGKILL of the destination QEMU {state}: the migration fails and the source \
         keeps the VM: {report:#}\n{}",
        fx.c.logs()
    );
    fx.settled(&from, to, &b, CLEAN);
    never_ran_on(watch, &fx.c.host_dir(to));
    format!(
        "{state}: failed {} after the kill ({}); VM running on {from}, {to} clean",
        secs(took),
        report["error"].as_str().unwrap_or("no error text")
    )
}

fn destination_full(fx: &mut Fx<'_>) -> String {
    fx.arm("");
    if fx.host() != "host2" {
        // Set-up, not the fault: the VM must migrate onto host3's datastore.
        fx.c.migrate_ok(&fx.vm, "host2", &["--no-backup"]);
    }
    let b = fx.before();
    let (from, to) = ("host2", "host3");
    let free_before = fx.tmpfs.available();
    let watch = G1Watch::start(&fx.uuid, DEFAULT_INTERVAL);
    fx.rig
        .shape_direction(to, Direction::ToHost, &Shape::mbit(SLOW_MIRROR_MBIT))
        .expect("shape the destination's downlink");
    let id = fx.start(to, &[]);
    let r = fx.wait_state(&id, "the mirror to run", END, mirroring);
    let (done, total) = progress(&r);
    // Fill what is left of the datastore.
    let avail = fx.tmpfs.available();
    let filler = fx.tmpfs.filler();
    run(
        "fallocate",
        &["-l", &avail.to_string(), filler.to_str().expect("UTF-8")],
    )
    .or_else(|_| {
        run(
            "fallocate",
            &[
                "-l",
                &avail.saturating_sub(1 << 20).to_string(),
                filler.to_str().expect("UTF-8"),
            ],
        )
    })
    .unwrap_or_else(|e| panic!("filling host3's datastore: {e}"));
    let left = fx.tmpfs.available();
    let (report, took) = fx.wait_end(&id, END);
    let _ = fx.rig.unshape(to);
    let _ = std::fs::remove_file(&filler);
    assert_eq!(
        report["status"],
        "failed",
        "a destination datastore that fills up during the mirror fails the migration: \
         {report:#}\n{}",
        fx.c.logs()
    );
    fx.settled(from, to, &b, CLEAN);
    never_ran_on(watch, &fx.c.host_dir(to));
    assert_eq!(
        fx.tmpfs.available(),
        free_before,
        "host3's datastore has all its space back"
    );
    format!(
        "filled host3's datastore ({} MiB free → {} KiB) at {} of {} MiB mirrored: failed {} \
         later ({}); VM running on {from} with its disk intact, host3 clean",
        avail >> 20,
        left >> 10,
        done >> 20,
        total >> 20,
        secs(took),
        report["error"].as_str().unwrap_or("no error text")
    )
}

fn concurrent_requests(fx: &mut Fx<'_>) -> String {
    fx.arm("");
    let b = fx.before();
    let (from, to) = (b.host.clone(), other(&b.host));
    let vm = fx.vm.clone();
    let go = std::sync::Barrier::new(2);
    let runs = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (c, go, vm) = (fx.c, &go, vm.as_str());
                s.spawn(move || {
                    go.wait();
                    c.ferry(&[
                        "migrate",
                        vm,
                        "--to",
                        to,
                        "--no-backup",
                        "--wait",
                        "-o",
                        "json",
                    ])
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a migrate thread"))
            .collect::<Vec<_>>()
    });
    let admitted: Vec<_> = runs.iter().filter(|r| r.success).collect();
    let refused: Vec<_> = runs.iter().filter(|r| !r.success).collect();
    assert_eq!(
        (admitted.len(), refused.len()),
        (1, 1),
        "exactly one of two concurrent requests is admitted: {runs:#?}\n{}",
        fx.c.logs()
    );
    let report = admitted[0].json();
    assert_eq!(report["status"], "completed", "{report:#}");
    let refusal = refused[0].stderr.trim();
    assert!(
        refusal.contains("already migrating"),
        "the other request is refused because the VM is already migrating: {refusal}"
    );
    let migrations = fx.c.ferry_ok(&["migration", "list", "-o", "json"]).json();
    let mine = migrations
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["id"] == report["id"])
        .count();
    assert_eq!(mine, 1, "{migrations:#}");
    fx.settled(to, &from, &b, CLEAN);
    format!(
        "one admitted and completed ({from} → {to} in {} ms), the other refused: {}",
        report["total_ms"],
        refusal.lines().last().unwrap_or(refusal)
    )
}

fn link_cut(fx: &mut Fx<'_>) -> String {
    fx.arm("");
    let b = fx.before();
    let (from, to) = (b.host.clone(), other(&b.host));
    let watch = G1Watch::start(&fx.uuid, DEFAULT_INTERVAL);
    let id = fx.start(to, &["--bandwidth", SLOW_RAM]);
    fx.wait_state(&id, "the RAM copy", END, |r| r["phase"] == "memory");
    fx.rig.cut(to).expect("cut the destination's link");
    let cut_at = Instant::now();
    let beat_at_cut = fx.last_heartbeat(&from);
    let mut problems: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    // The migration must end by itself within a bounded time; meanwhile
    // the source guest must go on (its heartbeat, 10 s after the cut).
    let mut beat_later = None;
    let mut ended = None;
    let mut restored_at = None;
    while cut_at.elapsed() < CUT_BOUND {
        if beat_later.is_none() && cut_at.elapsed() >= Duration::from_secs(10) {
            beat_later = Some(fx.last_heartbeat(&from));
        }
        let report = fx.show(&id);
        if !active(&report) {
            ended = Some(report);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let beat_later = beat_later.unwrap_or_else(|| {
        std::thread::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed()));
        fx.last_heartbeat(&from)
    });
    if beat_later > beat_at_cut {
        notes.push(format!(
            "the source's heartbeat went on during the cut ({beat_at_cut} → {beat_later} in 10 s)"
        ));
    } else {
        problems.push(format!(
            "the source guest froze when the link was cut: its heartbeat stayed at \
             {beat_at_cut} for 10 s"
        ));
    }
    // No QEMU but the source's may run the guest.
    match check_g1(&fx.uuid) {
        Ok(g1) => {
            if g1
                .qemus
                .iter()
                .any(|q| q.running() && !q.process.mentions(&fx.c.host_dir(&from)))
            {
                problems.push(format!(
                    "with the link down, a QEMU off {from} runs: {g1:#?}"
                ));
            }
        }
        Err(v) => problems.push(format!("G1 with the link down: {v}")),
    }

    let report = match ended {
        Some(report) => {
            notes.push(format!(
                "{} {} after the cut ({})",
                report["status"].as_str().unwrap_or("?"),
                secs(cut_at.elapsed()),
                report["error"].as_str().unwrap_or("no error text")
            ));
            if report["status"] != "failed" {
                problems.push(format!(
                    "the migration ended {} instead of failed: {report:#}",
                    report["status"]
                ));
            }
            fx.rig.restore(to).expect("restore the destination's link");
            restored_at = Some(Instant::now());
            report
        }
        None => {
            let stuck = fx.show(&id);
            problems.push(format!(
                "the migration did not end within {CUT_BOUND:?} of the cut: still {} in phase \
                 {}, progress {}",
                stuck["status"], stuck["phase"], stuck["progress"]
            ));
            // End it by hand: `migration cancel` with the link still cut,
            // watched for 15 s, then the link comes back.
            let c = fx.c;
            let rig = &fx.rig;
            std::thread::scope(|s| {
                let asked = Instant::now();
                let cancel = s.spawn(|| c.ferry(&["migration", "cancel", &id, "-o", "json"]));
                // The source guest must go on meanwhile: its heartbeat, every second.
                let mut beat = fx.last_heartbeat(&from);
                let (mut still, mut longest, mut frozen_at) = (0, 0, beat);
                for _ in 0..15 {
                    std::thread::sleep(Duration::from_secs(1));
                    let now = fx.last_heartbeat(&from);
                    if now == beat {
                        still += 1;
                        if still > longest {
                            (longest, frozen_at) = (still, now);
                        }
                    } else {
                        still = 0;
                    }
                    beat = now;
                }
                if longest >= 3 {
                    problems.push(format!(
                        "the source guest froze while the cancel unwound with the link cut: its \
                         heartbeat stayed at {frozen_at} for {longest} s (of the 15 s watched)"
                    ));
                }
                let during = fx.show(&id);
                notes.push(format!(
                    "hung; 15 s after `migration cancel` (link still cut) it was {} in phase {} \
                     (cancel {})",
                    during["status"],
                    during["phase"],
                    if cancel.is_finished() {
                        "answered"
                    } else {
                        "not answered yet"
                    }
                ));
                rig.restore(to).expect("restore the destination's link");
                let restored = Instant::now();
                restored_at = Some(restored);
                let answer = cancel.join().expect("the cancel thread");
                notes.push(format!(
                    "the cancel answered {} after it was asked ({} after the restore): {}",
                    secs(asked.elapsed()),
                    secs(restored.elapsed()),
                    serde_json::from_str::<Value>(&answer.stdout)
                        .map(|r| r["status"].to_string())
                        .unwrap_or_else(|_| answer.stderr.trim().to_string())
                ));
            });
            let (report, took) = fx.wait_end(&id, END);
            notes.push(format!(
                "it ended {} ({}) {} after that",
                report["status"],
                report["error"].as_str().unwrap_or("no error text"),
                secs(took)
            ));
            report
        }
    };

    // Once the link is back, the destination is cleaned.
    let restored = restored_at.expect("the link was restored");
    match fx.wait_clean(to, CUT_CLEAN) {
        Ok(_) => notes.push(format!(
            "{to} clean {} after the restore",
            secs(restored.elapsed())
        )),
        Err(left) => problems.push(format!(
            "{CUT_CLEAN:?} after the link came back, {to} still holds {left:?} (the \
             migration's report: {report:#})"
        )),
    }
    let end_state = catch_unwind(AssertUnwindSafe(|| {
        fx.settled(&from, to, &b, CLEAN);
        never_ran_on(watch, &fx.c.host_dir(to));
    }));
    if let Err(panic) = end_state {
        let message = panic_message(&panic);
        let head: Vec<&str> = message.lines().take(3).collect();
        problems.push(format!("end state: {}", head.join(" / ")));
    } else {
        notes.push(format!(
            "then VM running on {from} with its heartbeat intact"
        ));
    }
    if !problems.is_empty() {
        panic!(
            "link cut during the RAM copy: {}\n  - {}\n{}",
            notes.join("; "),
            problems.join("\n  - "),
            fx.c.logs()
        );
    }
    format!("link of {to} cut during the RAM copy: {}", notes.join("; "))
}

fn kill_source(fx: &mut Fx<'_>) -> String {
    fx.arm("");
    let b = fx.before();
    let (from, to) = (b.host.clone(), other(&b.host));
    let watch = G1Watch::start(&fx.uuid, DEFAULT_INTERVAL);
    let id = fx.start(to, &["--bandwidth", SLOW_RAM]);
    fx.wait_state(&id, "the RAM copy", END, |r| r["phase"] == "memory");
    let victim = fx.wait_qemu_on(&from);
    sigkill(&victim);
    let (report, took) = fx.wait_end(&id, END);
    assert_eq!(
        report["status"],
        "failed",
        "SIGKILL of the source QEMU fails the migration: {report:#}\n{}",
        fx.c.logs()
    );
    if let Err(left) = fx.wait_clean(to, CLEAN) {
        panic!(
            "the destination {to} still holds parts of {}: {left:?}\n{}",
            fx.vm,
            fx.c.logs()
        );
    }
    let info = fx.c.vm(&fx.vm);
    assert_eq!(info["host"], from.as_str(), "{info}");
    assert_eq!(
        info["state"],
        "crashed",
        "the VM is reported crashed: {info}\nkilled: {}\n{}",
        victim.describe(),
        fx.c.logs()
    );
    let reason = info["state_reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!reason.is_empty(), "a crash says why: {info}");
    let g1 = check_g1(&fx.uuid).unwrap_or_else(|v| panic!("G1: {v}"));
    assert!(
        g1.qemus.is_empty(),
        "no QEMU of the VM anywhere (the destination never started from a partial \
         state): {g1:#?}"
    );
    never_ran_on(watch, &fx.c.host_dir(to));
    fx.c.check_g3()
        .unwrap_or_else(|v| panic!("G3 after the crash: {v}\n{}", fx.c.logs()));

    // `ferry vm start` brings it back (a new boot: the heartbeat starts over).
    let len = fx.console(&from).len();
    fx.c.ferry_ok(&["vm", "start", &fx.vm]);
    fx.c.wait_for(
        "the restarted VM's heartbeat",
        Duration::from_secs(90),
        || {
            let log = fx.console(&from);
            heartbeats(&String::from_utf8_lossy(log.get(len..).unwrap_or_default()))
                .first()
                .map(|_| ())
        },
    );
    let info = fx.c.vm(&fx.vm);
    assert_eq!(
        (info["host"].as_str(), info["state"].as_str()),
        (Some(from.as_str()), Some("running")),
        "{info}"
    );
    let g1 = check_g1(&fx.uuid).unwrap_or_else(|v| panic!("G1: {v}"));
    assert_eq!((g1.qemus.len(), g1.running()), (1, 1), "{g1:#?}");
    fx.c.check_g3()
        .unwrap_or_else(|v| panic!("G3 after the restart: {v}\n{}", fx.c.logs()));
    format!(
        "failed {} after the kill ({}); VM crashed on {from} ({reason}), {to} clean; \
         `vm start` brought it back",
        secs(took),
        report["error"].as_str().unwrap_or("no error text")
    )
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".to_string())
}

// ---- the test -----------------------------------------------------------------------

struct Tally {
    lines: Vec<String>,
    failures: Vec<String>,
}

fn scenario(
    fx: &mut Fx<'_>,
    tally: &mut Tally,
    name: &str,
    body: impl FnOnce(&mut Fx<'_>) -> String,
) {
    let key = name.split(' ').next().unwrap_or_default();
    if let Ok(only) = std::env::var("FERRY_FAULTS") {
        if !only.split(',').any(|k| k.trim() == key) {
            return;
        }
    }
    eprintln!("=== {name}");
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| body(fx)));
    let took = started.elapsed();
    let line = match result {
        Ok(outcome) => format!("PASS {name} [{}]: {outcome}", secs(took)),
        Err(panic) => {
            let message = panic_message(&panic);
            let first = message.lines().next().unwrap_or_default().to_string();
            tally.failures.push(format!(
                "{name}: {}",
                message.chars().take(4000).collect::<String>()
            ));
            fx.reset();
            format!("FAIL {name} [{}]: {first}", secs(took))
        }
    };
    eprintln!("{line}");
    tally.lines.push(line);
}

#[test]
fn migrations_under_faults_end_with_the_vm_running_exactly_once() {
    let test_started = Instant::now();
    let cluster = Cluster::up_netns(3);
    let rig = Rig::open(cluster.dir()).unwrap_or_else(|e| panic!("{e}"));
    // host3's `local` datastore: a small tmpfs, before anything is made
    // there; host3's ferryd restarted so that its mount namespace (`ip netns
    // exec` makes one) has it.
    let datastore = cluster.datastore("host3", "local");
    let tmpfs = Tmpfs::mount(&datastore, "200m");
    cluster.restart_ferryd_env("host3", &[]);
    let mounts =
        std::fs::read_to_string(format!("/proc/{}/mountinfo", cluster.ferryd_pid("host3")))
            .expect("host3's ferryd's mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(&format!(" {} ", datastore.display())) && l.contains("tmpfs")),
        "host3's ferryd sees the tmpfs datastore:\n{mounts}"
    );

    let mut fx = Fx {
        c: &cluster,
        rig,
        tmpfs: &tmpfs,
        vm: String::new(),
        uuid: String::new(),
        armed: String::new(),
        created: 0,
    };
    fx.create_vm("host2");
    eprintln!(
        "cluster up, {} booted on host2 in {}",
        fx.vm,
        secs(test_started.elapsed())
    );

    let mut tally = Tally {
        lines: Vec::new(),
        failures: Vec::new(),
    };
    // Every scenario, in the order they run (each leaves the VM running
    // for the next one).
    type Body = fn(&mut Fx<'_>) -> String;
    let scenarios: &[(&str, Body)] = &[
        ("1a cancel during setup", |fx| {
            cancel_in(fx, CancelAt::Setup)
        }),
        ("1b cancel while the mirror is not ready", |fx| {
            cancel_in(fx, CancelAt::Mirror)
        }),
        ("1c cancel during the RAM copy", |fx| {
            cancel_in(fx, CancelAt::Memory)
        }),
        ("1d cancel at pre-switchover", |fx| {
            cancel_in(fx, CancelAt::PreSwitchover)
        }),
        ("1e cancel after completion, before commit", |fx| {
            cancel_in(fx, CancelAt::Completed)
        }),
        ("2a SIGKILL destination QEMU during the mirror", |fx| {
            kill_destination(fx, KillAt::Mirror)
        }),
        ("2b SIGKILL destination QEMU during the RAM copy", |fx| {
            kill_destination(fx, KillAt::Memory)
        }),
        (
            "2c SIGKILL destination QEMU after completion, before resume",
            |fx| kill_destination(fx, KillAt::Completed),
        ),
        (
            "5 destination datastore full during the mirror",
            destination_full,
        ),
        ("6 two concurrent migrate requests", concurrent_requests),
        ("4 link cut during the RAM copy", link_cut),
        ("3 SIGKILL source QEMU during the RAM copy", kill_source),
    ];
    for (name, body) in scenarios {
        scenario(&mut fx, &mut tally, name, body);
    }

    let injected = tally.lines.len();
    let passed = injected - tally.failures.len();
    eprintln!(
        "\n{injected} faults injected, {passed} passed (in {}):\n  {}",
        secs(test_started.elapsed()),
        tally.lines.join("\n  ")
    );
    assert!(
        tally.failures.is_empty(),
        "{} of {injected} fault scenarios failed:\n\n{}",
        tally.failures.len(),
        tally.failures.join("\n\n")
    );
    fx.arm("");
    cluster.ferry_ok(&["vm", "stop", &fx.vm, "--force"]);
    cluster.ferry_ok(&["vm", "delete", &fx.vm]);
    drop(fx);
    drop(tmpfs);
    cluster.down_purge();
}

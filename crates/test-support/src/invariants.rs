//! Checkers for Ferry's three system invariants (DESIGN.md, "Invariants"), usable by
//! every end-to-end test. Each one looks at the machine itself — `/proc`, QEMU's own
//! monitor, `ip`, the file system — never at Ferry's code or its bookkeeping alone:
//! an oracle must not depend on the code it judges.
//!
//! # G1 — the guest never runs in two places
//!
//! [`check_g1`] (one observation) and [`G1Watch`] (a background thread sampling every
//! ~20 ms across a migration) find every QEMU system emulator on this machine whose
//! command line carries the VM's `-uuid` — in every network namespace, since `/proc`
//! is shared by all of them — and decide for each whether its guest CPUs run.
//!
//! Evidence, best first:
//!
//! 1. **QMP `query-status`**, when the QEMU's monitor has no client. QEMU's socket
//!    chardev serves exactly one client at a time: measured with QEMU 10.0.2, a second
//!    client's `connect()` succeeds (the kernel queues it in the listen backlog) but QEMU
//!    never accepts it, so no greeting ever comes, until the first client leaves. Ferry's
//!    agent keeps one QMP connection open to each of its QEMUs (`-chardev socket,…,
//!    server=on,wait=off -mon …,mode=control`, `crates/qemu/src/cmdline.rs`), so for
//!    Ferry's QEMUs this source is normally closed. Whether a monitor is taken is read
//!    from `/proc/PID/net/unix` (an accepted or queued connection carries the socket's
//!    path) *before* connecting, so a checker never queues behind the agent, and never
//!    holds a monitor for more than the few milliseconds of two commands; nor during a
//!    QEMU's first [`VCPU_STARTUP_GRACE`], when it does not serve its monitor yet (a
//!    probe then would wait, and the agent's first connection would queue behind it).
//!    A QEMU started by hand, or one whose agent is down, answers here; its status is
//!    authoritative and instantaneous.
//! 2. **vCPU thread time.** Ferry starts QEMU with `-name …,debug-threads=on`, so each
//!    vCPU is a thread named `CPU n/TCG` (or `/KVM`). The time those threads spent on a
//!    CPU (`/proc/PID/task/TID/schedstat`, nanoseconds) grows only while guest CPUs
//!    execute: measured with the test guest under TCG, a running guest's vCPU used
//!    1.4–3.6 ms of every 20 ms, a `stop`ped one and one waiting with `-S -incoming
//!    defer` 0 µs (one 8 µs wake-up in 600 ms). A QEMU counts as running in a window when
//!    its vCPUs used at least [`VCPU_BUSY_THRESHOLD`]. Paused vCPU threads do run a little
//!    for QEMU's own housekeeping, and that is kept below the line: a freshly started
//!    QEMU's vCPU thread spends ~0.9 ms setting up within its first 50 ms, so a thread
//!    younger than [`VCPU_STARTUP_GRACE`] is not counted; a destination loading the final
//!    device state runs TLB flushes on its paused vCPU thread, ~130 µs spread over a few
//!    milliseconds, under the threshold. This is closer to G1's wording ("guest CPUs
//!    run") than the run state is, and it needs no cooperation from QEMU.
//!    Guarding against the obvious alternatives: `/proc/PID/stat`'s state (R/S) cannot
//!    tell a paused guest from an idle one — both vCPU threads sleep on the same
//!    condition variable —, and `-S`/`-incoming` on the command line say how a QEMU
//!    started, not what it does now.
//! 3. Otherwise the observation is [`RunEvidence::Unknown`] (counted, never as running).
//!    The e2e harness can add the run states the agents report through the API; they are
//!    the agents' own belief, so they serve G3, not G1.
//!
//! Because vCPU evidence covers a window, a switchover in which the source stops and the
//! destination starts inside one sampling window shows two "running" QEMUs in that
//! window. So a window with two running QEMUs is a violation at once only when every
//! running one answered QMP (instantaneous); otherwise it must be *confirmed* by another
//! such window among the next [`CONFIRM_SAMPLES`]. An unconfirmed one is counted as a
//! handover in [`G1Report::handovers`]. What that means: a real overlap that lasts less
//! than about two sampling windows can go unnoticed. QEMU's migration protocol makes such
//! a short overlap impossible by construction (the destination cannot have the final
//! device state before the source stopped); what G1 guards against is a sustained one — a
//! source resumed after the commit, a second QEMU started for the same VM — and those
//! are caught. The STOP→RESUME gap of a local migration measured 170–260 ms, many
//! windows wide.
//!
//! Limits: processes of other PID namespaces are invisible; a QEMU is judged by its
//! vCPU time only from its second sample and once its vCPU threads are older than
//! [`VCPU_STARTUP_GRACE`] (until then it is Unknown or not running, unless its monitor
//! answers); a QEMU without `debug-threads=on` and with a busy monitor is Unknown; an
//! idle guest that uses less than the threshold in a window counts as not running (a
//! lenient error, never a false alarm); pids are cached between samples and a non-QEMU
//! pid is re-examined only during its first [`RECHECK_NEW_PIDS`] (a process that
//! `exec`s QEMU later than that after its fork would be missed).
//!
//! # G2 — nothing left behind
//!
//! [`Baseline::capture`] records, for a [`Scope`] (normally [`Scope::local_cluster`]),
//! what exists before an operation; [`Baseline::diff_now`] lists what exists now and did
//! not then, as [`Leftover`]s that say what, where and in which namespace:
//!
//! - **QEMU processes** (any `qemu-*` binary: emulators, `qemu-img`, `qemu-nbd`) whose
//!   command line mentions one of the scope's roots (the cluster's folder) or that run
//!   in one of its namespaces. Other clusters' QEMUs — parallel tests — are not in scope.
//! - **Listening TCP ports**: in the scope's namespaces, every listener (read from
//!   `/proc/PID/net/tcp{,6}` of a process inside, or `ip netns exec NS cat …` when the
//!   namespace has none); in the test's own namespace, only listeners whose socket an
//!   in-scope process holds (socket inodes mapped to pids through `/proc/PID/fd`).
//! - **Network interfaces** (`ip -j -d link`): every new one inside the scope's
//!   namespaces; in the root namespace only the scope's bridges, their ports, names with
//!   the scope's prefixes, and taps an in-scope process holds open (`iff:` in
//!   `/proc/PID/fdinfo`). A persistent tap left in the root namespace by nobody is
//!   in scope only through a prefix the caller gives (Ferry's `fy…` taps of parallel
//!   clusters share one).
//! - **Addresses** (`ip -j addr`) on those interfaces.
//! - **Files** in the scope's datastores (any new file: a temporary or partial disk, a
//!   disk nobody deleted; a backup folder without its manifest — complete backups under
//!   `.ferry-backups/` are kept on purpose and not counted) and agent state folders (a VM folder, migration TLS credentials
//!   `tls-server/`/`tls-client/`, `*.tmp` partial records, `*.lock` files), plus every VM
//!   record that still says an incoming migration is in progress, new or not.
//! - **Held locks** (`lock:` lines of `/proc/PID/fdinfo`, of every process on the
//!   machine) on files in those folders — QEMU's image locks (OFD), pidfile locks.
//!
//! [`Allow`] names what may remain (a VM that still exists: its recorded QEMU and what
//! that process holds, its folder's ordinary files, the disks its record says it created;
//! or explicit paths and pids). A part that cannot be observed (a failing `ip`) is itself
//! reported, as [`Leftover::Unobservable`]: a checker that cannot look must not pass.
//!
//! Limits: block jobs, NBD exports and block nodes live inside a QEMU and are only
//! visible over its monitor, which the agent holds; they die with their QEMU, so they are
//! covered whenever the QEMU is gone, not while an allowed QEMU runs. UDP and unix
//! sockets, iptables rules, `tc` qdiscs and cgroups are not looked at. The controller's
//! SQLite store (`controller.db*`) changes during normal work and is ignored.
//!
//! # G3 — the controller agrees with reality
//!
//! [`check_g3`] compares a [`ControllerView`] (what `ferry vm list -o json` and `ferry
//! migration list -o json` print through the controller; the e2e harness fetches it)
//! with the cluster's QEMU processes, each mapped to its host by the host folder its
//! command line names (and checked against the host's namespace). It reports: a
//! migration still pending or running; a VM listed on two hosts; a VM in a state with a
//! process but no QEMU on its host; a QEMU of a VM on another host than its owner, or two
//! on the owner; a pid other than the one reported; a QEMU whose VM is stopped or that
//! no VM of the controller claims; a VM the controller calls paused whose vCPUs run, or
//! running when QMP says otherwise; and a VM whose last migration completed (or was
//! cancelled) but that sits on another host than that outcome implies.
//!
//! Limits: the view is what the agents report through the controller (the controller
//! asks them; its store decides only which of two hosts a request goes to), so a lie
//! both agreed on would pass; a VM the controller calls running but whose idle vCPUs
//! used less than the threshold is not reported (idle is not paused).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long [`check_g1`] and [`check_g3`] watch vCPU time before judging.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(100);
/// The sampling interval suggested for [`G1Watch`] during a migration.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(20);
/// vCPU time in one window from which a QEMU counts as running. Measured under TCG: a
/// running test guest's vCPU ≥ 1.4 ms per 20 ms (less when starved); a paused one 0–8
/// µs; a destination loading the final device state (TLB flushes run on the paused
/// vCPU thread) ~130 µs spread over a few ms.
pub const VCPU_BUSY_THRESHOLD: Duration = Duration::from_micros(250);
/// vCPU time of a thread younger than this is start-up work, not guest code.
pub const VCPU_STARTUP_GRACE: Duration = Duration::from_secs(1);
/// How many following windows may confirm a window that saw two running QEMUs.
pub const CONFIRM_SAMPLES: usize = 5;
/// How long after its start a process that is not QEMU keeps being re-examined (it may
/// still `exec` QEMU after its fork).
pub const RECHECK_NEW_PIDS: Duration = Duration::from_secs(2);
/// The longest a QMP probe may take (a free monitor answers in about a millisecond).
const QMP_TIMEOUT: Duration = Duration::from_millis(100);
/// Largest QMP message read (query-status answers are tiny).
const MAX_QMP_LINE: u64 = 1 << 20;
/// Largest VM record read back (the agent's own cap).
const MAX_RECORD_BYTES: u64 = 1 << 20;
/// The ordinary files of an agent's VM folder (`crates/agent/src/record.rs`).
const VM_FILES: &[&str] = &[
    "vm.json",
    "qmp.sock",
    "serial.sock",
    "console.log",
    "qemu.pid",
    "qemu.log",
];

// ---- violations -------------------------------------------------------------------

/// One of the three invariants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invariant {
    G1,
    G2,
    G3,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invariant::G1 => "G1 (a guest runs in one place at most)",
            Invariant::G2 => "G2 (nothing left behind)",
            Invariant::G3 => "G3 (the controller agrees with reality)",
        })
    }
}

/// An invariant that does not hold, with the evidence.
#[derive(Debug, Clone)]
pub enum Violation {
    /// G1: more than one QEMU of the VM ran its guest at once.
    TwoRunning {
        uuid: String,
        /// The first window that saw it.
        sample: Box<G1Snapshot>,
        /// A later window that saw it again (absent when `sample` was decisive on its
        /// own: every running QEMU answered `query-status`).
        confirmed_by: Option<Box<G1Snapshot>>,
        /// When `sample` was taken, from the start of the check.
        after: Duration,
        /// Samples taken until the violation was established.
        samples: usize,
    },
    /// G2: what remains.
    Leftovers(Vec<Leftover>),
    /// G3: where the controller and the machine disagree.
    Disagreements(Vec<Disagreement>),
    /// The check could not look.
    Unobservable {
        invariant: Invariant,
        what: String,
        error: String,
    },
}

impl Violation {
    /// The invariant this is about.
    pub fn invariant(&self) -> Invariant {
        match self {
            Violation::TwoRunning { .. } => Invariant::G1,
            Violation::Leftovers(_) => Invariant::G2,
            Violation::Disagreements(_) => Invariant::G3,
            Violation::Unobservable { invariant, .. } => *invariant,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::TwoRunning {
                uuid,
                sample,
                confirmed_by,
                after,
                samples,
            } => {
                writeln!(
                    f,
                    "{} violated: VM {uuid} ran in {} places at once ({} after the check \
                     started, sample {samples}):",
                    Invariant::G1,
                    sample.running(),
                    fmt_duration(*after)
                )?;
                write!(f, "{sample}")?;
                if let Some(again) = confirmed_by {
                    writeln!(f, "confirmed by a later window:")?;
                    write!(f, "{again}")?;
                }
                Ok(())
            }
            Violation::Leftovers(leftovers) => {
                writeln!(
                    f,
                    "{} violated: {} leftover(s):",
                    Invariant::G2,
                    leftovers.len()
                )?;
                for leftover in leftovers {
                    writeln!(f, "  - {leftover}")?;
                }
                Ok(())
            }
            Violation::Disagreements(disagreements) => {
                writeln!(
                    f,
                    "{} violated: {} disagreement(s):",
                    Invariant::G3,
                    disagreements.len()
                )?;
                for disagreement in disagreements {
                    writeln!(f, "  - {disagreement}")?;
                }
                Ok(())
            }
            Violation::Unobservable {
                invariant,
                what,
                error,
            } => write!(
                f,
                "{invariant} cannot be checked: cannot observe {what}: {error}"
            ),
        }
    }
}

impl std::error::Error for Violation {}

/// Why a baseline or a scope could not be taken.
#[derive(Debug, Clone)]
pub struct ObserveError {
    pub what: String,
    pub error: String,
}

impl fmt::Display for ObserveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot observe {}: {}", self.what, self.error)
    }
}

impl std::error::Error for ObserveError {}

fn fmt_duration(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

// ---- /proc --------------------------------------------------------------------------

fn proc_pids() -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        if let Some(pid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The arguments of a process; `None` when it is gone, a kernel thread or a zombie.
fn read_cmdline(pid: u32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if bytes.is_empty() {
        return None;
    }
    let body = bytes.strip_suffix(&[0]).unwrap_or(&bytes);
    Some(
        body.split(|b| *b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect(),
    )
}

struct Stat {
    state: char,
    /// Clock ticks since boot (field 22): with the pid, the process's identity.
    start_time: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: skip to the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn read_comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// The inode of a namespace link such as `/proc/PID/ns/net` (`net:[4026531840]`).
fn ns_inode(link: &Path) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    let text = target.to_str()?;
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// A network namespace: its inode, and a name for messages — `root` (PID 1's), its
/// `ip netns` name, or `net:[INODE]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Netns {
    pub inode: u64,
    pub name: String,
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Namespace inodes → names.
#[derive(Debug, Clone, Default)]
struct NetnsTable {
    root: Option<u64>,
    names: HashMap<u64, String>,
}

impl NetnsTable {
    fn load() -> NetnsTable {
        let mut names = HashMap::new();
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                // stat, not lstat: the file is a bind mount of the namespace, whose
                // inode is the namespace's.
                if let (Ok(meta), Some(name)) =
                    (std::fs::metadata(entry.path()), entry.file_name().to_str())
                {
                    names.insert(meta.ino(), name.to_string());
                }
            }
        }
        NetnsTable {
            // PID 1's namespace; ours when PID 1's cannot be read (a sandbox's init).
            root: ns_inode(Path::new("/proc/1/ns/net"))
                .or_else(|| ns_inode(Path::new("/proc/self/ns/net"))),
            names,
        }
    }

    fn netns(&self, inode: u64) -> Netns {
        let name = if Some(inode) == self.root {
            "root".to_string()
        } else if let Some(name) = self.names.get(&inode) {
            name.clone()
        } else {
            format!("net:[{inode}]")
        };
        Netns { inode, name }
    }

    fn of_pid(&mut self, pid: u32) -> Option<Netns> {
        let inode = ns_inode(&PathBuf::from(format!("/proc/{pid}/ns/net")))?;
        if Some(inode) != self.root && !self.names.contains_key(&inode) {
            // A namespace made since the table was read.
            *self = NetnsTable::load();
        }
        Some(self.netns(inode))
    }

    fn inode_of(&self, name: &str) -> Option<u64> {
        self.names
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(inode, _)| *inode)
    }
}

// ---- QEMU processes -----------------------------------------------------------------

/// A QEMU process (any `qemu-*` binary) as its command line describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuProcess {
    pub pid: u32,
    /// Clock ticks since boot: with the pid, the process's identity.
    pub start_time: u64,
    /// E.g. `qemu-system-x86_64`, `qemu-img`.
    pub binary: String,
    pub args: Vec<String>,
    /// `-uuid`, lower case.
    pub uuid: Option<String>,
    /// `-name` (its `guest=` part).
    pub name: Option<String>,
    /// The unix socket of its QMP monitor (`-qmp unix:…`, or the `-chardev socket` of a
    /// `-mon …,mode=control`).
    pub qmp_socket: Option<PathBuf>,
    pub netns: Netns,
}

impl QemuProcess {
    fn parse(pid: u32, start_time: u64, binary: String, args: Vec<String>, netns: Netns) -> Self {
        QemuProcess {
            pid,
            start_time,
            uuid: option_values(&args, "-uuid")
                .last()
                .map(|u| u.to_ascii_lowercase()),
            name: find_name(&args),
            qmp_socket: find_qmp_socket(&args),
            binary,
            args,
            netns,
        }
    }

    /// A system emulator (`qemu-system-*`), i.e. something that runs a guest.
    pub fn is_system_emulator(&self) -> bool {
        self.binary.starts_with("qemu-system-")
    }

    /// Whether an argument names `path` or something below it.
    pub fn mentions(&self, path: &Path) -> bool {
        let text = path.to_string_lossy();
        mentions(&self.args, text.trim_end_matches('/'))
    }

    /// The command line, joined with spaces.
    pub fn command_line(&self) -> String {
        self.args.join(" ")
    }

    /// `pid 123 (qemu-system-x86_64, guest demo, netns ferry0-host1)`.
    pub fn describe(&self) -> String {
        let mut text = format!("pid {} ({}", self.pid, self.binary);
        if let Some(name) = &self.name {
            text.push_str(&format!(", guest {name}"));
        }
        text.push_str(&format!(", netns {})", self.netns));
        text
    }
}

/// Whether an argument names `path` (no trailing slash) or something below it — as
/// is, or escaped the QemuOpts way (`,` → `,,`, as in `-chardev …,path=`).
fn mentions(args: &[String], path: &str) -> bool {
    if path.is_empty() {
        return false;
    }
    let escaped = path.replace(',', ",,");
    let below = [format!("{path}/"), format!("{escaped}/")];
    args.iter()
        .any(|arg| arg == path || below.iter().any(|b| arg.contains(b.as_str())))
}

fn binary_of(pid: u32, args: &[String]) -> Option<String> {
    let from_argv = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())?;
    if from_argv.starts_with("qemu-") {
        return Some(from_argv);
    }
    // argv[0] may be anything; the executable says what runs.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let name = exe.file_name()?.to_string_lossy();
    let name = name.trim_end_matches(" (deleted)");
    name.starts_with("qemu-").then(|| name.to_string())
}

/// Values of `-opt` (or `--opt`) in an argument list.
fn option_values<'a>(args: &'a [String], option: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    args.windows(2)
        .filter(move |w| w[0] == option || w[0].strip_prefix('-') == Some(option))
        .map(|w| w[1].as_str())
}

/// QemuOpts: `,` separates, `,,` is a literal comma.
fn split_opts(value: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("one part").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("one part").push(c);
        }
    }
    parts
}

fn opt<'a>(parts: &'a [String], key: &str) -> Option<&'a str> {
    parts
        .iter()
        .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
}

fn find_name(args: &[String]) -> Option<String> {
    let value = option_values(args, "-name").last()?;
    let parts = split_opts(value);
    opt(&parts, "guest")
        .map(str::to_string)
        .or_else(|| parts.first().filter(|p| !p.contains('=')).cloned())
}

fn find_qmp_socket(args: &[String]) -> Option<PathBuf> {
    for option in ["-qmp", "-qmp-pretty"] {
        for value in option_values(args, option) {
            let parts = split_opts(value);
            if let Some(path) = parts[0].strip_prefix("unix:") {
                let path = path.strip_prefix("path=").unwrap_or(path);
                return Some(PathBuf::from(path));
            }
        }
    }
    let control: Vec<String> = option_values(args, "-mon")
        .map(split_opts)
        .filter(|parts| opt(parts, "mode") == Some("control"))
        .filter_map(|parts| opt(&parts, "chardev").map(str::to_string))
        .collect();
    option_values(args, "-chardev")
        .map(split_opts)
        .filter(|parts| parts[0] == "socket")
        .find(|parts| opt(parts, "id").is_some_and(|id| control.iter().any(|c| c == id)))
        .and_then(|parts| opt(&parts, "path").map(PathBuf::from))
}

fn inspect(pid: u32, netns: &mut NetnsTable) -> Option<QemuProcess> {
    let args = read_cmdline(pid)?;
    let binary = binary_of(pid, &args)?;
    let stat = read_stat(pid)?;
    if stat.state == 'Z' {
        return None;
    }
    let ns = netns.of_pid(pid)?;
    Some(QemuProcess::parse(pid, stat.start_time, binary, args, ns))
}

/// Every QEMU system emulator on this machine, in every network namespace.
pub fn qemu_processes() -> io::Result<Vec<QemuProcess>> {
    let mut netns = NetnsTable::load();
    Ok(proc_pids()?
        .into_iter()
        .filter_map(|pid| inspect(pid, &mut netns))
        .filter(QemuProcess::is_system_emulator)
        .collect())
}

// ---- run-state evidence -----------------------------------------------------------

fn is_vcpu_thread(comm: &str) -> bool {
    comm.starts_with("CPU ") && comm.contains('/')
}

/// One vCPU thread: its id, when it started (clock ticks since boot) and the time it
/// spent on a CPU.
struct VcpuThread {
    tid: u32,
    start_ticks: u64,
    time: Duration,
}

/// The kernel's fixed user-space clock tick (`USER_HZ`, the unit of `/proc/*/stat`
/// times): 100 on every Linux architecture Ferry runs on.
const USER_HZ: u64 = 100;

/// Now, in clock ticks since boot (`/proc/uptime`).
fn uptime_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((seconds * USER_HZ as f64) as u64)
}

/// How long ago a process started (to a clock tick).
fn process_age(pid: u32) -> Option<Duration> {
    let start = read_stat(pid)?.start_time;
    let now = uptime_ticks()?;
    Some(Duration::from_millis(
        now.saturating_sub(start) * 1000 / USER_HZ,
    ))
}

/// The vCPU threads of a process.
fn vcpu_threads(pid: u32) -> Result<Vec<VcpuThread>, String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("cannot list its threads: {e}"))?;
    let mut threads = Vec::new();
    for task in tasks.flatten() {
        let dir = task.path();
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if !is_vcpu_thread(comm.trim()) {
            continue;
        }
        let (Ok(schedstat), Ok(stat)) = (
            std::fs::read_to_string(dir.join("schedstat")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            // The thread ended meanwhile.
            continue;
        };
        let ns: u64 = schedstat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unexpected schedstat {schedstat:?}"))?;
        let start_ticks = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(19))
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| format!("unexpected stat {stat:?}"))?;
        threads.push(VcpuThread {
            tid,
            start_ticks,
            time: Duration::from_nanos(ns),
        });
    }
    if threads.is_empty() {
        return Err(
            "no vCPU thread (no thread named `CPU n/ACCEL`: QEMU runs without \
                    `-name …,debug-threads=on`)"
                .to_string(),
        );
    }
    Ok(threads)
}

/// Whether anyone holds (or waits for) the QMP monitor: QEMU serves one client at a
/// time, and connections it accepted or has queued carry the listening socket's path
/// in the namespace's `/proc/net/unix`.
fn monitor_taken(pid: u32, socket: &Path) -> Result<bool, String> {
    let path = format!("/proc/{pid}/net/unix");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let wanted = socket.to_string_lossy();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path
        if fields.len() < 8 || fields[7..].join(" ") != wanted {
            continue;
        }
        let flags = u32::from_str_radix(fields[3], 16).unwrap_or(0);
        const SO_ACCEPTCON: u32 = 0x0001_0000;
        if flags & SO_ACCEPTCON == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `query-status` over a free QMP monitor: `(status, running)`.
fn qmp_query_status(socket: &Path, timeout: Duration) -> Result<(String, bool), String> {
    use nix::errno::Errno;
    use nix::sys::socket::UnixAddr;
    use nix::sys::socket::{connect, socket as new_socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;

    let deadline = Instant::now() + timeout;
    // Non-blocking connect: a full backlog (someone else waits) is EAGAIN, not a hang.
    let fd = new_socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let addr = UnixAddr::new(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    connect(fd.as_raw_fd(), &addr).map_err(|e| match e {
        Errno::EAGAIN => "the monitor's backlog is full (another client waits)".to_string(),
        e => format!("connect {}: {e}", socket.display()),
    })?;
    let stream = UnixStream::from(fd);
    stream
        .set_nonblocking(false)
        .map_err(|e| format!("socket mode: {e}"))?;
    let mut writer = stream.try_clone().map_err(|e| format!("socket: {e}"))?;
    let mut reader = BufReader::new(stream);

    let greeting = qmp_read(&mut reader, deadline)?;
    if greeting.get("QMP").is_none() {
        return Err(format!("no QMP greeting: {greeting}"));
    }
    qmp_execute(&mut reader, &mut writer, "qmp_capabilities", deadline)?;
    let status = qmp_execute(&mut reader, &mut writer, "query-status", deadline)?;
    let text = status["status"]
        .as_str()
        .ok_or_else(|| format!("query-status answered {status}"))?
        .to_string();
    let running = status["running"].as_bool().unwrap_or(text == "running");
    Ok((text, running))
}

fn qmp_read(reader: &mut BufReader<UnixStream>, deadline: Instant) -> Result<Value, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".to_string());
    }
    reader
        .get_ref()
        .set_read_timeout(Some(left))
        .map_err(|e| format!("socket timeout: {e}"))?;
    let mut line = Vec::new();
    match reader
        .by_ref()
        .take(MAX_QMP_LINE)
        .read_until(b'\n', &mut line)
    {
        Ok(0) => Err("the monitor closed the connection".to_string()),
        Ok(_) => serde_json::from_slice(&line)
            .map_err(|e| format!("not JSON ({e}): {}", String::from_utf8_lossy(&line))),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err("no answer in time (another client holds the monitor?)".to_string())
        }
        Err(e) => Err(format!("read: {e}")),
    }
}

fn qmp_execute(
    reader: &mut BufReader<UnixStream>,
    writer: &mut UnixStream,
    command: &str,
    deadline: Instant,
) -> Result<Value, String> {
    writer
        .write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
        .map_err(|e| format!("sending {command}: {e}"))?;
    loop {
        let message = qmp_read(reader, deadline)?;
        if message.get("event").is_some() {
            continue;
        }
        if let Some(ret) = message.get("return") {
            return Ok(ret.clone());
        }
        return Err(format!("{command} failed: {message}"));
    }
}

/// What says whether a QEMU's guest runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvidence {
    /// QMP `query-status`, asked over a monitor that had no other client:
    /// authoritative and instantaneous.
    Qmp { status: String, running: bool },
    /// CPU time of the vCPU threads during `window`.
    Vcpu {
        busy: Duration,
        window: Duration,
        threads: usize,
        /// Threads younger than [`VCPU_STARTUP_GRACE`], whose time is not counted.
        settling: usize,
    },
    /// Neither was available (counted as not running).
    Unknown { reason: String },
}

impl RunEvidence {
    /// Whether this evidence says the guest ran.
    pub fn running(&self) -> bool {
        match self {
            RunEvidence::Qmp { running, .. } => *running,
            RunEvidence::Vcpu { busy, .. } => *busy >= VCPU_BUSY_THRESHOLD,
            RunEvidence::Unknown { .. } => false,
        }
    }

    /// Whether it describes one instant (QMP) rather than a window.
    pub fn is_instant(&self) -> bool {
        matches!(self, RunEvidence::Qmp { .. })
    }
}

impl fmt::Display for RunEvidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunEvidence::Qmp { status, .. } => write!(f, "QMP query-status says {status:?}"),
            RunEvidence::Vcpu {
                busy,
                window,
                threads,
                settling,
            } => {
                write!(
                    f,
                    "its {threads} vCPU thread(s) used {} of the last {}",
                    fmt_duration(*busy),
                    fmt_duration(*window)
                )?;
                if *settling > 0 {
                    write!(f, " ({settling} still starting, not counted)")?;
                }
                Ok(())
            }
            RunEvidence::Unknown { reason } => write!(f, "unknown: {reason}"),
        }
    }
}

/// One QEMU and what was observed of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuObservation {
    pub process: QemuProcess,
    pub evidence: RunEvidence,
}

impl QemuObservation {
    pub fn running(&self) -> bool {
        self.evidence.running()
    }
}

impl fmt::Display for QemuObservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.process.describe(),
            if self.running() {
                "RUNNING"
            } else {
                "not running"
            },
            self.evidence
        )?;
        if let Some(socket) = &self.process.qmp_socket {
            write!(f, " [QMP {}]", socket.display())?;
        }
        Ok(())
    }
}

type Selector = Box<dyn Fn(&QemuProcess) -> bool + Send>;

struct Known {
    /// Re-examine until then (a fresh fork may still exec QEMU); `None`: settled.
    recheck_until: Option<Instant>,
    process: Option<QemuProcess>,
}

/// Observes the QEMUs a selector picks, sample after sample.
struct Sampler {
    select: Selector,
    known: HashMap<u32, Known>,
    /// The previous reading of each vCPU thread, per process.
    vcpu: HashMap<(u32, u64), HashMap<u32, Duration>>,
    /// Monitors that did not answer, not to be asked again until then.
    qmp_backoff: HashMap<(u32, u64), Instant>,
    last: Option<Instant>,
    netns: NetnsTable,
}

/// One observation of every selected QEMU.
struct Sample {
    /// Since the previous sample (zero for the first).
    window: Duration,
    observations: Vec<QemuObservation>,
}

impl Sampler {
    fn new(select: Selector) -> Sampler {
        Sampler {
            select,
            known: HashMap::new(),
            vcpu: HashMap::new(),
            qmp_backoff: HashMap::new(),
            last: None,
            netns: NetnsTable::load(),
        }
    }

    fn scan(&mut self) -> io::Result<Vec<QemuProcess>> {
        let now = Instant::now();
        let pids = proc_pids()?;
        let live: HashSet<u32> = pids.iter().copied().collect();
        self.known.retain(|pid, _| live.contains(pid));
        let mut found = Vec::new();
        for pid in pids {
            let examine = match self.known.get(&pid) {
                None => true,
                Some(known) => {
                    known.process.is_none() && known.recheck_until.is_some_and(|t| now < t)
                }
            };
            if examine {
                let process = inspect(pid, &mut self.netns).filter(|p| (self.select)(p));
                let recheck_until = match self.known.get(&pid) {
                    Some(known) => known.recheck_until,
                    // Young enough to be between its fork and its exec?
                    None => process_age(pid)
                        .filter(|age| *age < RECHECK_NEW_PIDS)
                        .map(|age| now + (RECHECK_NEW_PIDS - age)),
                };
                self.known.insert(
                    pid,
                    Known {
                        recheck_until,
                        process,
                    },
                );
            }
            let Some(process) = self.known.get(&pid).and_then(|k| k.process.clone()) else {
                continue;
            };
            // Still the same process, and not a zombie?
            match read_stat(pid) {
                Some(stat) if stat.start_time == process.start_time && stat.state != 'Z' => {
                    found.push(process)
                }
                Some(stat) if stat.start_time != process.start_time => {
                    self.known.remove(&pid);
                    if let Some(p) = inspect(pid, &mut self.netns).filter(|p| (self.select)(p)) {
                        found.push(p.clone());
                        self.known.insert(
                            pid,
                            Known {
                                recheck_until: None,
                                process: Some(p),
                            },
                        );
                    }
                }
                _ => {}
            }
        }
        Ok(found)
    }

    fn sample(&mut self) -> Result<Sample, String> {
        let processes = self.scan().map_err(|e| format!("cannot list /proc: {e}"))?;
        let now = Instant::now();
        let now_ticks = uptime_ticks();
        let window = self.last.map(|t| now.duration_since(t));
        let mut observations = Vec::new();
        let mut seen = HashSet::new();
        for process in processes {
            let key = (process.pid, process.start_time);
            seen.insert(key);
            let vcpu = match vcpu_threads(process.pid) {
                Ok(threads) => {
                    let previous = self.vcpu.get(&key);
                    let reading = busy_since(previous, &threads, now_ticks);
                    self.vcpu
                        .insert(key, threads.iter().map(|t| (t.tid, t.time)).collect());
                    Ok(reading)
                }
                Err(e) => Err(e),
            };
            let mut notes = Vec::new();
            let qmp = probe_monitor(&process, now_ticks, &mut self.qmp_backoff, &mut notes);
            let evidence = evidence(qmp, notes, vcpu, window);
            observations.push(QemuObservation { process, evidence });
        }
        self.vcpu.retain(|key, _| seen.contains(key));
        self.qmp_backoff.retain(|key, _| seen.contains(key));
        self.last = Some(now);
        Ok(Sample {
            window: window.unwrap_or_default(),
            observations,
        })
    }
}

/// What the vCPU threads did since the previous reading.
struct VcpuReading {
    /// Time on a CPU of the threads past their start-up grace.
    busy: Duration,
    threads: usize,
    /// Threads in their start-up grace (their time not counted).
    settling: usize,
    /// Whether there was a previous reading of this process.
    compared: bool,
}

/// Sums the vCPU time since `previous` of every thread older than
/// [`VCPU_STARTUP_GRACE`]. A young thread's time is start-up work, not guest code
/// (measured: ~0.9 ms within 50 ms of a paused `-incoming` QEMU's start); a thread
/// without a previous reading only sets its baseline.
fn busy_since(
    previous: Option<&HashMap<u32, Duration>>,
    threads: &[VcpuThread],
    now_ticks: Option<u64>,
) -> VcpuReading {
    let grace = VCPU_STARTUP_GRACE.as_millis() as u64 * USER_HZ / 1000;
    let mut reading = VcpuReading {
        busy: Duration::ZERO,
        threads: threads.len(),
        settling: 0,
        compared: previous.is_some(),
    };
    for thread in threads {
        // Without a clock, every thread counts as settled.
        let young = now_ticks.is_some_and(|now| now.saturating_sub(thread.start_ticks) < grace);
        if young {
            reading.settling += 1;
            continue;
        }
        if let Some(before) = previous.and_then(|p| p.get(&thread.tid)) {
            reading.busy += thread.time.saturating_sub(*before);
        }
    }
    reading
}

/// Asks a QEMU's monitor for its run state, unless that would get in anyone's way:
/// not while another client holds (or waits for) it, not during the QEMU's first
/// [`VCPU_STARTUP_GRACE`] (a QEMU in its initialisation does not serve its monitor yet:
/// the probe would queue, and so would the agent's first connection behind it), and not
/// again within a second of a probe that got no answer. `None`: not asked.
fn probe_monitor(
    process: &QemuProcess,
    now_ticks: Option<u64>,
    backoff: &mut HashMap<(u32, u64), Instant>,
    notes: &mut Vec<String>,
) -> Option<(String, bool)> {
    let Some(socket) = &process.qmp_socket else {
        notes.push("no QMP unix socket on its command line".to_string());
        return None;
    };
    let grace = VCPU_STARTUP_GRACE.as_millis() as u64 * USER_HZ / 1000;
    if now_ticks.is_none_or(|now| now.saturating_sub(process.start_time) < grace) {
        notes.push("QMP: not asked while QEMU starts".to_string());
        return None;
    }
    let key = (process.pid, process.start_time);
    if backoff
        .get(&key)
        .is_some_and(|until| Instant::now() < *until)
    {
        notes.push("QMP: did not answer a moment ago".to_string());
        return None;
    }
    match monitor_taken(process.pid, socket) {
        Ok(false) => match qmp_query_status(socket, QMP_TIMEOUT) {
            Ok(answer) => return Some(answer),
            Err(e) => {
                backoff.insert(key, Instant::now() + Duration::from_secs(1));
                notes.push(format!("QMP: {e}"));
            }
        },
        // The agent's connection: QEMU serves one client at a time.
        Ok(true) => {}
        Err(e) => notes.push(format!("QMP: {e}")),
    }
    None
}

fn evidence(
    qmp: Option<(String, bool)>,
    mut notes: Vec<String>,
    vcpu: Result<VcpuReading, String>,
    window: Option<Duration>,
) -> RunEvidence {
    if let Some((status, running)) = qmp {
        return RunEvidence::Qmp { status, running };
    }
    match (vcpu, window) {
        (Ok(reading), Some(window)) if reading.compared => RunEvidence::Vcpu {
            busy: reading.busy,
            window,
            threads: reading.threads,
            settling: reading.settling,
        },
        (Ok(_), window) => {
            notes.push(if window.is_none() {
                "first sample: no earlier reading of its vCPU time".to_string()
            } else {
                "appeared since the last sample: no earlier reading of its vCPU time".to_string()
            });
            RunEvidence::Unknown {
                reason: notes.join("; "),
            }
        }
        (Err(e), _) => {
            notes.push(e);
            RunEvidence::Unknown {
                reason: notes.join("; "),
            }
        }
    }
}

// ---- G1 -----------------------------------------------------------------------------

/// Every QEMU of one VM, observed over one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct G1Snapshot {
    pub uuid: String,
    /// How long the vCPU evidence covers.
    pub window: Duration,
    pub qemus: Vec<QemuObservation>,
}

impl G1Snapshot {
    /// How many of the VM's QEMUs ran its guest.
    pub fn running(&self) -> usize {
        self.qemus.iter().filter(|q| q.running()).count()
    }

    pub fn running_pids(&self) -> Vec<u32> {
        self.qemus
            .iter()
            .filter(|q| q.running())
            .map(|q| q.process.pid)
            .collect()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.qemus.iter().map(|q| q.process.pid).collect()
    }

    /// Every running QEMU answered QMP: no window could blur a handover.
    fn decisive(&self) -> bool {
        self.qemus
            .iter()
            .filter(|q| q.running())
            .all(|q| q.evidence.is_instant())
    }
}

impl fmt::Display for G1Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.qemus.is_empty() {
            return writeln!(f, "  (no QEMU of VM {} on this machine)", self.uuid);
        }
        for qemu in &self.qemus {
            writeln!(f, "  - {qemu}")?;
        }
        Ok(())
    }
}

fn uuid_selector(uuid: &str) -> Selector {
    let uuid = uuid.to_ascii_lowercase();
    Box::new(move |p: &QemuProcess| {
        p.is_system_emulator() && p.uuid.as_deref() == Some(uuid.as_str())
    })
}

enum Verdict {
    Fine,
    Pending,
    Violated(Violation),
}

/// Applies the confirmation rule to a stream of snapshots.
struct Judge {
    uuid: String,
    /// A window that saw two running, waiting for confirmation: (snapshot, when,
    /// windows left).
    pending: Option<(G1Snapshot, Duration, usize)>,
    handovers: usize,
}

impl Judge {
    fn new(uuid: &str) -> Judge {
        Judge {
            uuid: uuid.to_string(),
            pending: None,
            handovers: 0,
        }
    }

    fn feed(&mut self, snapshot: G1Snapshot, at: Duration, samples: usize) -> Verdict {
        if snapshot.running() >= 2 {
            if let Some((first, first_at, _)) = self.pending.take() {
                return Verdict::Violated(Violation::TwoRunning {
                    uuid: self.uuid.clone(),
                    sample: Box::new(first),
                    confirmed_by: Some(Box::new(snapshot)),
                    after: first_at,
                    samples,
                });
            }
            if snapshot.decisive() {
                return Verdict::Violated(Violation::TwoRunning {
                    uuid: self.uuid.clone(),
                    sample: Box::new(snapshot),
                    confirmed_by: None,
                    after: at,
                    samples,
                });
            }
            self.pending = Some((snapshot, at, CONFIRM_SAMPLES));
            return Verdict::Pending;
        }
        if let Some((_, _, left)) = &mut self.pending {
            *left -= 1;
            if *left == 0 {
                self.pending = None;
                self.handovers += 1;
                return Verdict::Fine;
            }
            return Verdict::Pending;
        }
        Verdict::Fine
    }
}

fn g1_unobservable(uuid: &str, error: String) -> Violation {
    Violation::Unobservable {
        invariant: Invariant::G1,
        what: format!("the QEMU processes of VM {uuid}"),
        error,
    }
}

/// G1 now: every QEMU on this machine carrying `-uuid UUID`, observed over
/// [`DEFAULT_WINDOW`] (longer if two running ones need confirming). Fails when two ran.
pub fn check_g1(uuid: &str) -> Result<G1Snapshot, Violation> {
    check_g1_with(uuid, DEFAULT_WINDOW)
}

/// [`check_g1`] with a window of the caller's choosing.
pub fn check_g1_with(uuid: &str, window: Duration) -> Result<G1Snapshot, Violation> {
    let started = Instant::now();
    let mut sampler = Sampler::new(uuid_selector(uuid));
    let mut judge = Judge::new(uuid);
    let mut samples = 0;
    loop {
        let sample = sampler.sample().map_err(|e| g1_unobservable(uuid, e))?;
        samples += 1;
        let snapshot = G1Snapshot {
            uuid: uuid.to_string(),
            window: sample.window,
            qemus: sample.observations,
        };
        // The first sample primes the vCPU readings; it can only be decisive through QMP.
        let verdict = judge.feed(snapshot.clone(), started.elapsed(), samples);
        match verdict {
            Verdict::Violated(violation) => return Err(violation),
            Verdict::Fine if samples > 1 => return Ok(snapshot),
            Verdict::Fine | Verdict::Pending => std::thread::sleep(window),
        }
    }
}

/// A change in which of the VM's QEMUs exist and run, during a [`G1Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct G1Transition {
    /// From the start of the watch.
    pub at: Duration,
    pub present: Vec<u32>,
    pub running: Vec<u32>,
}

/// What a [`G1Watch`] saw.
#[derive(Debug, Clone)]
pub struct G1Report {
    pub uuid: String,
    /// Samples taken.
    pub samples: usize,
    pub duration: Duration,
    /// The longest time between two samples (the coarsest window).
    pub longest_window: Duration,
    /// The most QEMUs seen running in one window (after confirmation, at most one
    /// when the watch passed; a handover window is not counted).
    pub max_running: usize,
    /// Windows that saw two running QEMUs and were not confirmed: handovers inside one
    /// window.
    pub handovers: usize,
    /// Observations without evidence (the first sample's excepted).
    pub unknown: usize,
    /// Every change of the present and running sets.
    pub timeline: Vec<G1Transition>,
    /// Every QEMU of the VM that was seen.
    pub processes: Vec<QemuProcess>,
}

impl G1Report {
    fn new(uuid: &str) -> G1Report {
        G1Report {
            uuid: uuid.to_string(),
            samples: 0,
            duration: Duration::ZERO,
            longest_window: Duration::ZERO,
            max_running: 0,
            handovers: 0,
            unknown: 0,
            timeline: Vec::new(),
            processes: Vec::new(),
        }
    }

    fn record(&mut self, snapshot: &G1Snapshot, at: Duration, first: bool) {
        self.samples += 1;
        self.longest_window = self.longest_window.max(snapshot.window);
        for qemu in &snapshot.qemus {
            if !self
                .processes
                .iter()
                .any(|p| p.pid == qemu.process.pid && p.start_time == qemu.process.start_time)
            {
                self.processes.push(qemu.process.clone());
            }
            if !first && matches!(qemu.evidence, RunEvidence::Unknown { .. }) {
                self.unknown += 1;
            }
        }
        let present = snapshot.pids();
        let running = snapshot.running_pids();
        if !first {
            // A window with two running is judged (and counted) by the confirmation rule.
            if running.len() < 2 {
                self.max_running = self.max_running.max(running.len());
            }
        }
        let changed = self
            .timeline
            .last()
            .is_none_or(|t| t.present != present || t.running != running);
        if changed {
            self.timeline.push(G1Transition {
                at,
                present,
                running,
            });
        }
    }

    /// The longest stretch during which a QEMU of the VM existed but none ran — across
    /// a migration, about the switchover pause (to a sampling window).
    pub fn longest_pause(&self) -> Option<Duration> {
        let end = self.duration;
        self.timeline
            .iter()
            .enumerate()
            .filter(|(_, t)| t.running.is_empty() && !t.present.is_empty())
            .map(|(i, t)| {
                let until = self.timeline.get(i + 1).map_or(end, |next| next.at);
                until.saturating_sub(t.at)
            })
            .max()
    }
}

impl fmt::Display for G1Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "G1 watch of VM {}: {} samples in {} (longest window {}), at most {} running, \
             {} handover window(s), {} unknown observation(s)",
            self.uuid,
            self.samples,
            fmt_duration(self.duration),
            fmt_duration(self.longest_window),
            self.max_running,
            self.handovers,
            self.unknown
        )?;
        for t in &self.timeline {
            writeln!(
                f,
                "  {:>9}: present {:?}, running {:?}",
                fmt_duration(t.at),
                t.present,
                t.running
            )?;
        }
        Ok(())
    }
}

/// G1 across an operation: a background thread samples the VM's QEMUs every
/// `interval` until [`G1Watch::stop`].
pub struct G1Watch {
    uuid: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<G1Report, Violation>>>,
}

impl G1Watch {
    /// Starts watching the VM with this uuid.
    pub fn start(uuid: &str, interval: Duration) -> G1Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let id = uuid.to_string();
        let thread = std::thread::Builder::new()
            .name("g1-watch".to_string())
            .spawn(move || watch(&id, interval, &flag))
            .expect("spawn the G1 watcher thread");
        G1Watch {
            uuid: uuid.to_string(),
            stop,
            thread: Some(thread),
        }
    }

    /// Takes a last sample (and any confirmation a pending window needs), then reports.
    pub fn stop(mut self) -> Result<G1Report, Violation> {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().expect("the watcher runs until stopped");
        thread
            .join()
            .unwrap_or_else(|_| Err(g1_unobservable(&self.uuid, "the watcher panicked".into())))
    }
}

impl Drop for G1Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch(uuid: &str, interval: Duration, stop: &AtomicBool) -> Result<G1Report, Violation> {
    let started = Instant::now();
    let mut sampler = Sampler::new(uuid_selector(uuid));
    let mut judge = Judge::new(uuid);
    let mut report = G1Report::new(uuid);
    let mut violation = None;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let tick = Instant::now();
        let sample = sampler.sample().map_err(|e| g1_unobservable(uuid, e))?;
        let at = started.elapsed();
        let snapshot = G1Snapshot {
            uuid: uuid.to_string(),
            window: sample.window,
            qemus: sample.observations,
        };
        report.record(&snapshot, at, report.samples == 0);
        if violation.is_none() {
            if let Verdict::Violated(v) = judge.feed(snapshot, at, report.samples) {
                violation = Some(v);
            }
        }
        if stopping && (judge.pending.is_none() || violation.is_some()) {
            break;
        }
        std::thread::sleep(interval.saturating_sub(tick.elapsed()));
    }
    report.duration = started.elapsed();
    report.handovers = judge.handovers;
    match violation {
        Some(violation) => Err(violation),
        None => Ok(report),
    }
}

// ---- G2: scope ----------------------------------------------------------------------

/// One host of a cluster: its folder (QEMUs of the host name paths below it) and its
/// network namespace, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeHost {
    pub name: String,
    pub dir: PathBuf,
    pub netns: Option<String>,
}

/// What belongs to the system under test: where G2 looks, and which processes and
/// interfaces G2 and G3 consider theirs.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// For messages.
    pub label: String,
    /// A process belongs to the scope when an argument names one of these folders
    /// (or a path below it).
    pub roots: Vec<PathBuf>,
    /// Network namespaces (`ip netns` names) wholly the scope's.
    pub netns: Vec<String>,
    /// Root-namespace bridges of the scope (they, their ports and addresses).
    pub bridges: Vec<String>,
    /// Root-namespace interfaces whose names start with one of these.
    pub link_prefixes: Vec<String>,
    /// Datastore folders: every new file in them is a leftover.
    pub datastores: Vec<PathBuf>,
    /// Agent state folders (`state_dir`).
    pub state_dirs: Vec<PathBuf>,
    /// File names (prefixes) ignored in those folders, and their locks.
    pub ignore_file_prefixes: Vec<String>,
    /// The hosts, for G3.
    pub hosts: Vec<ScopeHost>,
}

impl Scope {
    pub fn new(label: impl Into<String>) -> Scope {
        Scope {
            label: label.into(),
            ..Scope::default()
        }
    }

    pub fn root(mut self, dir: impl Into<PathBuf>) -> Scope {
        self.roots.push(dir.into());
        self
    }

    pub fn netns(mut self, name: impl Into<String>) -> Scope {
        self.netns.push(name.into());
        self
    }

    pub fn bridge(mut self, name: impl Into<String>) -> Scope {
        self.bridges.push(name.into());
        self
    }

    pub fn link_prefix(mut self, prefix: impl Into<String>) -> Scope {
        self.link_prefixes.push(prefix.into());
        self
    }

    pub fn datastore(mut self, dir: impl Into<PathBuf>) -> Scope {
        self.datastores.push(dir.into());
        self
    }

    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Scope {
        self.state_dirs.push(dir.into());
        self
    }

    /// The scope of a `ferry local` cluster: its folder; every host's state folder and
    /// datastores (from its `ferryd.toml`, and whatever folder is under
    /// `hosts/H/datastores/`); the `shared` datastore; in namespace mode, the hosts'
    /// and the client's namespaces, the management bridge and the guest LAN's bridge.
    /// Not the root namespace's `ferrylan0`, which loopback clusters share.
    pub fn local_cluster(dir: &Path) -> Result<Scope, ObserveError> {
        let fail = |what: &str, error: String| ObserveError {
            what: what.to_string(),
            error,
        };
        let dir = std::fs::canonicalize(dir).map_err(|e| {
            fail(
                &format!("the cluster folder {}", dir.display()),
                e.to_string(),
            )
        })?;
        let manifest_path = dir.join("local.toml");
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| fail(&manifest_path.display().to_string(), e.to_string()))?;
        let manifest: toml::Value = toml::from_str(&text)
            .map_err(|e| fail(&manifest_path.display().to_string(), e.to_string()))?;
        let mut scope = Scope::new(format!("local cluster {}", dir.display())).root(&dir);
        if manifest.get("netns").is_some() {
            let rig = crate::netns::Rig::open(&dir)
                .map_err(|e| fail(&manifest_path.display().to_string(), e.to_string()))?;
            // The management bridge, the guest LAN's segment bridge, the client
            // namespace on both (the hosts' namespaces come with the hosts below).
            scope.bridges.push(rig.network().bridge.clone());
            scope.bridges.push(rig.lan_bridge());
            scope.netns.push(rig.client_netns());
        }
        scope.datastores.push(dir.join("shared"));
        let hosts = manifest
            .get("hosts")
            .and_then(|h| h.as_array())
            .cloned()
            .unwrap_or_default();
        for host in hosts {
            let Some(name) = host.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            let host_dir = dir.join("hosts").join(name);
            let netns = host
                .get("netns")
                .and_then(|n| n.get("netns"))
                .and_then(|n| n.as_str())
                .map(str::to_string);
            let config: Option<toml::Value> = std::fs::read_to_string(host_dir.join("ferryd.toml"))
                .ok()
                .and_then(|t| toml::from_str(&t).ok());
            let resolve = |p: &str| {
                let p = Path::new(p);
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    host_dir.join(p)
                }
            };
            let state = config
                .as_ref()
                .and_then(|c| c.get("state_dir"))
                .and_then(|s| s.as_str())
                .map(resolve)
                .unwrap_or_else(|| host_dir.join("state"));
            scope.state_dirs.push(state);
            if let Some(table) = config
                .as_ref()
                .and_then(|c| c.get("datastores"))
                .and_then(|d| d.as_table())
            {
                for path in table.values().filter_map(|v| v.as_str()) {
                    scope.datastores.push(resolve(path));
                }
            }
            if let Ok(entries) = std::fs::read_dir(host_dir.join("datastores")) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        scope.datastores.push(entry.path());
                    }
                }
            }
            if let Some(ns) = &netns {
                scope.netns.push(ns.clone());
            }
            scope.hosts.push(ScopeHost {
                name: name.to_string(),
                dir: host_dir,
                netns,
            });
        }
        scope.datastores.sort();
        scope.datastores.dedup();
        // The controller's SQLite store and its -wal/-shm/-journal files change (and
        // are locked) during normal work.
        scope.ignore_file_prefixes.push("controller.db".to_string());
        Ok(scope)
    }

    fn ignored(&self, path: &Path) -> bool {
        path.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| self.ignore_file_prefixes.iter().any(|p| n.starts_with(p)))
    }

    fn watched_dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.datastores.iter().chain(&self.state_dirs)
    }

    fn owns_process(&self, args_mention: impl Fn(&Path) -> bool, netns: &str) -> bool {
        self.roots.iter().any(|r| args_mention(r)) || self.netns.iter().any(|n| n == netns)
    }

    fn host_of(&self, process: &QemuProcess) -> Option<&ScopeHost> {
        self.hosts.iter().find(|h| process.mentions(&h.dir))
    }

    fn owns_qemu(&self, process: &QemuProcess) -> bool {
        self.owns_process(|p| process.mentions(p), &process.netns.name)
    }
}

// ---- G2: what may remain ------------------------------------------------------------

/// What may remain after an operation.
#[derive(Debug, Clone, Default)]
pub struct Allow {
    /// Files and folders (and everything below them).
    pub paths: Vec<PathBuf>,
    /// VMs (uuids) that still exist: the QEMU their agent's record names and what it
    /// holds (ports, taps, locks), the ordinary files of their VM folder, and the disk
    /// files their record says the agent created. Not: migration credentials, partial
    /// records, a record of an unfinished incoming migration, or any other QEMU with
    /// the same uuid.
    pub vms: Vec<String>,
    /// Processes (and what they hold).
    pub pids: Vec<u32>,
}

impl Allow {
    pub fn new() -> Allow {
        Allow::default()
    }

    pub fn path(mut self, path: impl Into<PathBuf>) -> Allow {
        self.paths.push(path.into());
        self
    }

    pub fn vm(mut self, uuid: &str) -> Allow {
        self.vms.push(uuid.to_ascii_lowercase());
        self
    }

    pub fn pid(mut self, pid: u32) -> Allow {
        self.pids.push(pid);
        self
    }
}

// ---- G2: leftovers ------------------------------------------------------------------

/// What kind of file was left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A file (or folder) in a datastore nobody removed: a disk, a copy.
    DatastoreFile,
    /// A temporary or partial file (`*.tmp`, `*.part`, `*.partial`, dot-files in a
    /// datastore): an interrupted write or conversion.
    PartialFile,
    /// A VM's migration TLS credentials folder (`tls-server/`, `tls-client/`), keys
    /// included.
    MigrationCredentials,
    /// A VM record that still says an incoming migration is in progress.
    IncomingRecord,
    /// An agent's VM folder (`state/vms/NAME`).
    VmFolder,
    /// A `*.lock`/`*.lck` file.
    LockFile,
    /// Anything else new in a state folder.
    StateFile,
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::DatastoreFile => "datastore file",
            FileKind::PartialFile => "temporary/partial file",
            FileKind::MigrationCredentials => "migration TLS credentials",
            FileKind::IncomingRecord => "record of an unfinished incoming migration",
            FileKind::VmFolder => "VM folder",
            FileKind::LockFile => "lock file",
            FileKind::StateFile => "state file",
        })
    }
}

/// A process that holds something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start_time: u64,
    /// Its command name.
    pub command: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)
    }
}

/// Something an operation left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    Process {
        pid: u32,
        netns: String,
        binary: String,
        uuid: Option<String>,
        command: String,
    },
    ListeningPort {
        netns: String,
        address: SocketAddr,
        owner: Option<Owner>,
    },
    Link {
        netns: String,
        name: String,
        /// `tap`, `tun`, `veth`, `bridge`, … (`ip -d link`'s kind).
        kind: String,
        master: Option<String>,
    },
    Address {
        netns: String,
        interface: String,
        address: String,
    },
    File {
        path: PathBuf,
        kind: FileKind,
        bytes: u64,
    },
    Lock {
        path: PathBuf,
        owner: Owner,
        /// E.g. `OFDLCK READ 100-101`.
        lock: String,
    },
    /// Part of the state could not be read: nothing can be said about it.
    Unobservable { what: String, error: String },
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leftover::Process {
                pid,
                netns,
                binary,
                uuid,
                command,
            } => {
                write!(f, "{binary} process {pid} still runs (netns {netns}")?;
                if let Some(uuid) = uuid {
                    write!(f, ", VM {uuid}")?;
                }
                let mut command = command.clone();
                if command.len() > 400 {
                    let mut cut = 400;
                    while !command.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    command.truncate(cut);
                    command.push('…');
                }
                write!(f, "): {command}")
            }
            Leftover::ListeningPort {
                netns,
                address,
                owner,
            } => {
                write!(f, "TCP port {address} listens in netns {netns}")?;
                match owner {
                    Some(owner) => write!(f, ", held by {owner}"),
                    None => write!(f, " (holder not found)"),
                }
            }
            Leftover::Link {
                netns,
                name,
                kind,
                master,
            } => {
                write!(f, "{kind} interface {name} exists in netns {netns}")?;
                if let Some(master) = master {
                    write!(f, " (a port of {master})")?;
                }
                Ok(())
            }
            Leftover::Address {
                netns,
                interface,
                address,
            } => write!(f, "address {address} on {interface} in netns {netns}"),
            Leftover::File { path, kind, bytes } => {
                write!(f, "{kind} {} ({bytes} bytes)", path.display())
            }
            Leftover::Lock { path, owner, lock } => {
                write!(f, "{lock} lock on {} held by {owner}", path.display())
            }
            Leftover::Unobservable { what, error } => write!(f, "cannot observe {what}: {error}"),
        }
    }
}

// ---- G2: observation ----------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkInfo {
    kind: String,
    master: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileRoot {
    Datastore,
    State,
}

#[derive(Debug, Clone)]
struct FileInfo {
    dir: bool,
    bytes: u64,
    root: FileRoot,
    /// The state folder it is in (for classification).
    base: PathBuf,
}

#[derive(Debug, Clone)]
struct VmRecordInfo {
    dir: PathBuf,
    uuid: String,
    incoming: bool,
    process: Option<(u32, u64)>,
    created_files: Vec<PathBuf>,
}

/// (path, holder pid, holder start time, description)
type LockKey = (PathBuf, u32, u64, String);

#[derive(Debug, Clone, Default)]
struct Observed {
    processes: BTreeMap<(u32, u64), QemuProcess>,
    listeners: BTreeMap<(String, SocketAddr), Option<Owner>>,
    links: BTreeMap<(String, String), LinkInfo>,
    addresses: BTreeSet<(String, String, String)>,
    files: BTreeMap<PathBuf, FileInfo>,
    locks: BTreeMap<LockKey, String>,
    records: Vec<VmRecordInfo>,
    /// Whose tap is which (root namespace), for allowances.
    tap_owners: HashMap<String, Owner>,
    problems: Vec<(String, String)>,
}

struct ProcInfo {
    pid: u32,
    start_time: u64,
}

fn owner_of(pid: u32, start_time: u64) -> Owner {
    Owner {
        pid,
        start_time,
        command: read_comm(pid),
    }
}

fn observe(scope: &Scope) -> Observed {
    let mut observed = Observed::default();
    let mut netns = NetnsTable::load();
    let pids = match proc_pids() {
        Ok(pids) => pids,
        Err(e) => {
            observed
                .problems
                .push(("processes (/proc)".into(), e.to_string()));
            return observed;
        }
    };

    // Every process: which are the scope's, and one member of each namespace.
    let mut in_scope: Vec<ProcInfo> = Vec::new();
    let mut member_of: HashMap<u64, u32> = HashMap::new();
    let mut all: Vec<(u32, u64)> = Vec::new();
    for pid in &pids {
        let pid = *pid;
        let Some(stat) = read_stat(pid) else { continue };
        if stat.state == 'Z' {
            continue;
        }
        all.push((pid, stat.start_time));
        let Some(ns) = netns.of_pid(pid) else {
            continue;
        };
        member_of.entry(ns.inode).or_insert(pid);
        let Some(args) = read_cmdline(pid) else {
            continue;
        };
        let names = |path: &Path| {
            let text = path.to_string_lossy();
            mentions(&args, text.trim_end_matches('/'))
        };
        if scope.owns_process(names, &ns.name) {
            if let Some(binary) = binary_of(pid, &args) {
                let process = QemuProcess::parse(pid, stat.start_time, binary, args, ns);
                observed.processes.insert((pid, stat.start_time), process);
            }
            in_scope.push(ProcInfo {
                pid,
                start_time: stat.start_time,
            });
        }
    }

    // Sockets and taps the scope's processes hold.
    let mut socket_owner: HashMap<u64, Owner> = HashMap::new();
    for process in &in_scope {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", process.pid)) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse().ok())
            {
                socket_owner.insert(inode, owner_of(process.pid, process.start_time));
            } else if target == "/dev/net/tun" {
                let info = std::fs::read_to_string(format!(
                    "/proc/{}/fdinfo/{}",
                    process.pid,
                    fd.file_name().to_string_lossy()
                ))
                .unwrap_or_default();
                for line in info.lines() {
                    if let Some(name) = line.strip_prefix("iff:") {
                        observed.tap_owners.insert(
                            name.trim().to_string(),
                            owner_of(process.pid, process.start_time),
                        );
                    }
                }
            }
        }
    }

    // Listening TCP sockets.
    let own_ns = ns_inode(Path::new("/proc/self/ns/net"))
        .map(|inode| netns.netns(inode))
        .unwrap_or(Netns {
            inode: 0,
            name: "own".into(),
        });
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        match std::fs::read_to_string(format!("/proc/self/net/{file}")) {
            Ok(text) => {
                for (address, inode) in parse_tcp_listeners(&text, v6) {
                    if let Some(owner) = socket_owner.get(&inode) {
                        observed
                            .listeners
                            .insert((own_ns.name.clone(), address), Some(owner.clone()));
                    }
                }
            }
            Err(e) => observed
                .problems
                .push((format!("/proc/self/net/{file}"), e.to_string())),
        }
    }
    for name in &scope.netns {
        let Some(inode) = netns.inode_of(name) else {
            // No such namespace (any more): nothing can be left in it.
            continue;
        };
        for (file, v6) in [("tcp", false), ("tcp6", true)] {
            let text = match member_of.get(&inode) {
                Some(pid) => std::fs::read_to_string(format!("/proc/{pid}/net/{file}"))
                    .map_err(|e| e.to_string()),
                None => run(
                    "ip",
                    &["netns", "exec", name, "cat", &format!("/proc/net/{file}")],
                ),
            };
            match text {
                Ok(text) => {
                    for (address, inode) in parse_tcp_listeners(&text, v6) {
                        observed
                            .listeners
                            .insert((name.clone(), address), socket_owner.get(&inode).cloned());
                    }
                }
                Err(e) => observed
                    .problems
                    .push((format!("TCP listeners in netns {name}"), e)),
            }
        }
    }

    // Interfaces and addresses: ours (`ip` without `-n`), then the scope's.
    let mut namespaces: Vec<(Option<&str>, String)> = vec![(None, own_ns.name.clone())];
    for name in &scope.netns {
        if netns.inode_of(name).is_some() {
            namespaces.push((Some(name.as_str()), name.clone()));
        }
    }
    for (ns, label) in namespaces {
        let links = match ip_json(ns, &["-d", "link", "show"]) {
            Ok(links) => links,
            Err(e) => {
                observed
                    .problems
                    .push((format!("interfaces in netns {label}"), e));
                continue;
            }
        };
        let mut kept = HashSet::new();
        for link in links.as_array().into_iter().flatten() {
            let Some(name) = link["ifname"].as_str() else {
                continue;
            };
            let info = &link["linkinfo"];
            let mut kind = info["info_kind"]
                .as_str()
                .unwrap_or_else(|| link["link_type"].as_str().unwrap_or("?"))
                .to_string();
            if kind == "tun" {
                if let Some(t) = info["info_data"]["type"].as_str() {
                    kind = t.to_string();
                }
            }
            let master = link["master"].as_str().map(str::to_string);
            let ours = ns.is_some()
                || scope.bridges.iter().any(|b| b == name)
                || master
                    .as_ref()
                    .is_some_and(|m| scope.bridges.iter().any(|b| b == m))
                || scope
                    .link_prefixes
                    .iter()
                    .any(|p| name.starts_with(p.as_str()))
                || observed.tap_owners.contains_key(name);
            if ours {
                kept.insert(name.to_string());
                observed
                    .links
                    .insert((label.clone(), name.to_string()), LinkInfo { kind, master });
            }
        }
        match ip_json(ns, &["addr", "show"]) {
            Ok(addrs) => {
                for link in addrs.as_array().into_iter().flatten() {
                    let Some(name) = link["ifname"].as_str() else {
                        continue;
                    };
                    if !kept.contains(name) {
                        continue;
                    }
                    for addr in link["addr_info"].as_array().into_iter().flatten() {
                        if let (Some(local), Some(len)) =
                            (addr["local"].as_str(), addr["prefixlen"].as_u64())
                        {
                            observed.addresses.insert((
                                label.clone(),
                                name.to_string(),
                                format!("{local}/{len}"),
                            ));
                        }
                    }
                }
            }
            Err(e) => observed
                .problems
                .push((format!("addresses in netns {label}"), e)),
        }
    }

    // Files.
    for dir in &scope.datastores {
        walk(dir, dir, FileRoot::Datastore, scope, &mut observed);
    }
    for dir in &scope.state_dirs {
        walk(dir, dir, FileRoot::State, scope, &mut observed);
        read_records(dir, &mut observed);
    }

    // Locks on those files, whoever holds them.
    let watched: Vec<&PathBuf> = scope.watched_dirs().collect();
    for (pid, start_time) in all {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if !watched.iter().any(|d| target.starts_with(d)) || scope.ignored(&target) {
                continue;
            }
            let Ok(info) = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            )) else {
                continue;
            };
            for line in info.lines() {
                if let Some(lock) = line.strip_prefix("lock:") {
                    observed.locks.insert(
                        (target.clone(), pid, start_time, describe_lock(lock)),
                        read_comm(pid),
                    );
                }
            }
        }
    }
    observed
}

/// `1: OFDLCK ADVISORY  READ -1 fe:00:10051621 100 101` → `OFDLCK READ 100-101`.
fn describe_lock(line: &str) -> String {
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields.as_slice() {
        [_, class, _, mode, _, _, start, end, ..] => format!("{class} {mode} {start}-{end}"),
        _ => line.trim().to_string(),
    }
}

/// `(address, socket inode)` of every LISTEN socket in a `/proc/net/tcp{,6}` text.
fn parse_tcp_listeners(text: &str, v6: bool) -> Vec<(SocketAddr, u64)> {
    const LISTEN: &str = "0A";
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 10 || fields[3] != LISTEN {
            continue;
        }
        let Some((addr, port)) = fields[1].split_once(':') else {
            continue;
        };
        let (Ok(port), Ok(inode)) = (u16::from_str_radix(port, 16), fields[9].parse::<u64>())
        else {
            continue;
        };
        // Each 32-bit word is printed as the kernel's native integer.
        let words: Option<Vec<[u8; 4]>> = (0..addr.len() / 8)
            .map(|i| {
                u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16)
                    .ok()
                    .map(u32::to_ne_bytes)
            })
            .collect();
        let Some(words) = words else { continue };
        let ip = if v6 && words.len() == 4 {
            let bytes: Vec<u8> = words.concat();
            let array: [u8; 16] = bytes.try_into().expect("16 bytes");
            IpAddr::V6(Ipv6Addr::from(array))
        } else if !v6 && words.len() == 1 {
            IpAddr::V4(Ipv4Addr::from(words[0]))
        } else {
            continue;
        };
        out.push((SocketAddr::new(ip, port), inode));
    }
    out
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip [-n NS] -j ARGS`, parsed.
fn ip_json(netns: Option<&str>, args: &[&str]) -> Result<Value, String> {
    let mut all: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        all.extend(["-n", ns]);
    }
    all.push("-j");
    all.extend(args);
    let text = run("ip", &all)?;
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).map_err(|e| format!("`ip {}` printed no JSON: {e}", all.join(" ")))
}

/// The folder of a datastore where Ferry keeps backups.
const BACKUPS_FOLDER: &str = ".ferry-backups";

/// Records `path` (and what is under it) as a file of the scope.
fn walk_one(path: &Path, base: &Path, root: FileRoot, scope: &Scope, observed: &mut Observed) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    observed.files.insert(
        path.to_path_buf(),
        FileInfo {
            dir: meta.is_dir(),
            bytes: meta.len(),
            root,
            base: base.to_path_buf(),
        },
    );
    if meta.is_dir() {
        walk(path, base, root, scope, observed);
    }
}

fn walk(dir: &Path, base: &Path, root: FileRoot, scope: &Scope, observed: &mut Observed) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            observed
                .problems
                .push((format!("folder {}", dir.display()), e.to_string()));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if scope.ignored(&path) {
            continue;
        }
        // Not following links: a link is a file of its own here.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() && path.file_name().is_some_and(|n| n == BACKUPS_FOLDER) {
            // Backups are kept on purpose (the way back, and taken by
            // default before some moves): a complete one (its manifest
            // written last) is not debris; one without a manifest is.
            if let Ok(backups) = std::fs::read_dir(&path) {
                for backup in backups.flatten() {
                    if !backup.path().join("backup.json").is_file() {
                        walk_one(&backup.path(), base, root, scope, observed);
                    }
                }
            }
            continue;
        }
        observed.files.insert(
            path.clone(),
            FileInfo {
                dir: meta.is_dir(),
                bytes: meta.len(),
                root,
                base: base.to_path_buf(),
            },
        );
        if meta.is_dir() {
            walk(&path, base, root, scope, observed);
        }
    }
}

fn read_records(state_dir: &Path, observed: &mut Observed) {
    let Ok(vms) = std::fs::read_dir(state_dir.join("vms")) else {
        return;
    };
    for vm in vms.flatten() {
        let path = vm.path().join("vm.json");
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.len() > MAX_RECORD_BYTES {
            continue;
        }
        let Ok(record) = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()))
        else {
            continue;
        };
        let Some(uuid) = record["spec"]["uuid"].as_str() else {
            continue;
        };
        let process = match (
            record["process"]["pid"].as_u64(),
            record["process"]["start_time"].as_u64(),
        ) {
            (Some(pid), Some(start)) => Some((pid as u32, start)),
            _ => None,
        };
        observed.records.push(VmRecordInfo {
            dir: vm.path(),
            uuid: uuid.to_ascii_lowercase(),
            incoming: !record["incoming"].is_null(),
            process,
            created_files: record["created_files"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(PathBuf::from))
                .collect(),
        });
    }
}

fn classify(path: &Path, info: &FileInfo) -> FileKind {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = name.ends_with(".tmp")
        || name.ends_with(".part")
        || name.ends_with(".partial")
        || name.ends_with('~');
    let lock = name.ends_with(".lock") || name.ends_with(".lck");
    match info.root {
        FileRoot::Datastore if partial || name.starts_with('.') => FileKind::PartialFile,
        FileRoot::Datastore if lock => FileKind::LockFile,
        FileRoot::Datastore => FileKind::DatastoreFile,
        FileRoot::State => {
            let rel: Vec<String> = path
                .strip_prefix(&info.base)
                .map(|r| {
                    r.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            if partial {
                FileKind::PartialFile
            } else if rel.len() >= 3
                && rel[0] == "vms"
                && (rel[2] == "tls-server" || rel[2] == "tls-client")
            {
                FileKind::MigrationCredentials
            } else if lock {
                FileKind::LockFile
            } else if rel.len() == 2 && rel[0] == "vms" && info.dir {
                FileKind::VmFolder
            } else {
                FileKind::StateFile
            }
        }
    }
}

fn diff(before: &Observed, now: &Observed, allow: &Allow) -> Vec<Leftover> {
    let mut leftovers = Vec::new();
    for (what, error) in &now.problems {
        leftovers.push(Leftover::Unobservable {
            what: what.clone(),
            error: error.clone(),
        });
    }

    // What the allowed VMs may keep: the QEMU their record names, their folder's
    // ordinary files, the disks they created.
    let allowed_records: Vec<&VmRecordInfo> = now
        .records
        .iter()
        .filter(|r| allow.vms.contains(&r.uuid))
        .collect();
    let allowed_process = |pid: u32, start_time: u64| {
        allow.pids.contains(&pid)
            || allowed_records
                .iter()
                .any(|r| r.process == Some((pid, start_time)))
    };
    let allowed_owner = |owner: &Option<Owner>| {
        owner
            .as_ref()
            .is_some_and(|o| allowed_process(o.pid, o.start_time))
    };
    let allowed_path = |path: &Path| {
        allow.paths.iter().any(|p| path.starts_with(p))
            || allowed_records.iter().any(|r| {
                r.created_files.iter().any(|f| f == path)
                    || path == r.dir
                    || (path.parent() == Some(r.dir.as_path())
                        && path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| VM_FILES.contains(&n)))
            })
    };

    for (key, process) in &now.processes {
        if before.processes.contains_key(key) || allowed_process(key.0, key.1) {
            continue;
        }
        leftovers.push(Leftover::Process {
            pid: process.pid,
            netns: process.netns.name.clone(),
            binary: process.binary.clone(),
            uuid: process.uuid.clone(),
            command: process.command_line(),
        });
    }

    for ((netns, address), owner) in &now.listeners {
        if before.listeners.contains_key(&(netns.clone(), *address)) || allowed_owner(owner) {
            continue;
        }
        leftovers.push(Leftover::ListeningPort {
            netns: netns.clone(),
            address: *address,
            owner: owner.clone(),
        });
    }

    let allowed_link = |name: &str| {
        now.tap_owners
            .get(name)
            .is_some_and(|o| allowed_process(o.pid, o.start_time))
    };
    for ((netns, name), info) in &now.links {
        if before.links.contains_key(&(netns.clone(), name.clone())) || allowed_link(name) {
            continue;
        }
        leftovers.push(Leftover::Link {
            netns: netns.clone(),
            name: name.clone(),
            kind: info.kind.clone(),
            master: info.master.clone(),
        });
    }
    for (netns, interface, address) in &now.addresses {
        if before
            .addresses
            .contains(&(netns.clone(), interface.clone(), address.clone()))
            || allowed_link(interface)
        {
            continue;
        }
        leftovers.push(Leftover::Address {
            netns: netns.clone(),
            interface: interface.clone(),
            address: address.clone(),
        });
    }

    // New files; a reported folder stands for everything in it.
    let mut reported: Vec<PathBuf> = Vec::new();
    for (path, info) in &now.files {
        if before.files.contains_key(path)
            || reported.iter().any(|r| path.starts_with(r))
            || allowed_path(path)
        {
            continue;
        }
        let kind = classify(path, info);
        if info.dir {
            reported.push(path.clone());
        }
        leftovers.push(Leftover::File {
            path: path.clone(),
            kind,
            bytes: if info.dir { 0 } else { info.bytes },
        });
    }
    // A record of an unfinished incoming migration, new or not.
    for record in &now.records {
        let path = record.dir.join("vm.json");
        if record.incoming && !allow.paths.iter().any(|p| path.starts_with(p)) {
            leftovers.push(Leftover::File {
                bytes: now.files.get(&path).map_or(0, |f| f.bytes),
                path,
                kind: FileKind::IncomingRecord,
            });
        }
    }

    for (key, command) in &now.locks {
        let (path, pid, start_time, lock) = key;
        if before.locks.contains_key(key)
            || allowed_process(*pid, *start_time)
            || allowed_path(path)
        {
            continue;
        }
        leftovers.push(Leftover::Lock {
            path: path.clone(),
            owner: Owner {
                pid: *pid,
                start_time: *start_time,
                command: command.clone(),
            },
            lock: lock.clone(),
        });
    }
    leftovers
}

// ---- G2: baseline -------------------------------------------------------------------

/// What existed in a scope before an operation.
#[derive(Debug, Clone)]
pub struct Baseline {
    scope: Scope,
    observed: Observed,
}

impl Baseline {
    /// Records the scope's processes, listeners, interfaces, addresses, files and locks.
    /// Fails when part of it cannot be read (a baseline with holes would excuse leaks).
    pub fn capture(scope: &Scope) -> Result<Baseline, ObserveError> {
        let observed = observe(scope);
        if let Some((what, error)) = observed.problems.first() {
            return Err(ObserveError {
                what: what.clone(),
                error: error.clone(),
            });
        }
        Ok(Baseline {
            scope: scope.clone(),
            observed,
        })
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// Everything in scope now that was not there at the baseline.
    pub fn diff_now(&self) -> Vec<Leftover> {
        self.diff_now_allowing(&Allow::default())
    }

    /// [`Baseline::diff_now`], except what `allow` lets remain.
    pub fn diff_now_allowing(&self, allow: &Allow) -> Vec<Leftover> {
        let now = observe(&self.scope);
        diff(&self.observed, &now, allow)
    }

    /// `Ok` when nothing but `allow` remains.
    pub fn check_clean(&self, allow: &Allow) -> Result<(), Violation> {
        let leftovers = self.diff_now_allowing(allow);
        if leftovers.is_empty() {
            Ok(())
        } else {
            Err(Violation::Leftovers(leftovers))
        }
    }

    /// Polls [`Baseline::check_clean`] until it passes or `timeout` ends (for what is
    /// released asynchronously, e.g. after killing a process by hand); the last
    /// violation otherwise.
    pub fn wait_clean(&self, allow: &Allow, timeout: Duration) -> Result<(), Violation> {
        let started = Instant::now();
        loop {
            match self.check_clean(allow) {
                Ok(()) => return Ok(()),
                Err(violation) if started.elapsed() >= timeout => return Err(violation),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Panics with every leftover unless nothing remains.
    pub fn assert_clean(&self) {
        self.assert_clean_allowing(&Allow::default());
    }

    /// Panics with every leftover unless nothing but `allow` remains.
    pub fn assert_clean_allowing(&self, allow: &Allow) {
        if let Err(violation) = self.check_clean(allow) {
            panic!("{} ({})", violation, self.scope.label);
        }
    }
}

// ---- G3 -----------------------------------------------------------------------------

/// A VM as the controller reports it (`VmInfo`, `ferry vm list -o json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerVm {
    pub name: String,
    pub uuid: String,
    pub host: String,
    /// `stopped`, `starting`, `running`, `paused`, `stopping`, `crashed`.
    pub state: String,
    pub pid: Option<u32>,
    /// Unix seconds its QEMU was launched.
    pub started_at: Option<u64>,
}

impl ControllerVm {
    /// Whether a QEMU process exists in this state (`VmState::has_process`).
    pub fn has_process(&self) -> bool {
        matches!(
            self.state.as_str(),
            "starting" | "running" | "paused" | "stopping"
        )
    }
}

/// A migration as the controller reports it (`MigrationReport`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerMigration {
    pub id: String,
    pub vm: String,
    pub source: String,
    pub destination: String,
    /// `pending`, `running`, `completed`, `failed`, `cancelled`.
    pub status: String,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
}

/// What the controller says about the cluster.
#[derive(Debug, Clone, Default)]
pub struct ControllerView {
    pub vms: Vec<ControllerVm>,
    pub migrations: Vec<ControllerMigration>,
}

impl ControllerView {
    /// From the JSON arrays of `ferry vm list -o json` and `ferry migration list -o
    /// json` (the API's `VmInfo` and `MigrationReport`, whose field names are a
    /// contract).
    pub fn from_json(vms: &Value, migrations: &Value) -> Result<ControllerView, String> {
        let text = |v: &Value, field: &str| {
            v[field]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("no string {field:?} in {v}"))
        };
        let mut view = ControllerView::default();
        for vm in vms.as_array().ok_or("the VM list is not an array")? {
            view.vms.push(ControllerVm {
                name: text(vm, "name")?,
                uuid: text(vm, "uuid")?.to_ascii_lowercase(),
                host: text(vm, "host")?,
                state: text(vm, "state")?,
                pid: vm["pid"].as_u64().map(|p| p as u32),
                started_at: vm["started_at"].as_u64(),
            });
        }
        for m in migrations
            .as_array()
            .ok_or("the migration list is not an array")?
        {
            view.migrations.push(ControllerMigration {
                id: text(m, "id")?,
                vm: text(m, "vm")?,
                source: text(m, "source")?,
                destination: text(m, "destination")?,
                status: text(m, "status")?,
                created_at_ms: m["created_at_ms"].as_u64().unwrap_or(0),
                finished_at_ms: m["finished_at_ms"].as_u64(),
            });
        }
        Ok(view)
    }
}

/// Where the controller and the machine disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disagreement {
    /// A migration still pending or running once the test is done.
    MigrationNotFinished {
        id: String,
        vm: String,
        status: String,
    },
    /// One VM name listed on several hosts.
    DefinedOnSeveralHosts { vm: String, hosts: Vec<String> },
    /// The VM is in a state with a process, but its host runs no QEMU of it.
    NoQemu {
        vm: String,
        host: String,
        state: String,
    },
    /// A QEMU of the VM runs on a host other than its owner.
    QemuOnWrongHost {
        vm: String,
        owner: String,
        pid: u32,
        host: String,
    },
    /// More than one QEMU of the VM on its owner.
    SeveralQemus {
        vm: String,
        host: String,
        pids: Vec<u32>,
    },
    /// The controller reports another pid than the QEMU that runs.
    PidMismatch {
        vm: String,
        reported: u32,
        actual: u32,
    },
    /// A QEMU runs for a VM the controller lists as stopped or crashed.
    QemuOfStoppedVm {
        vm: String,
        state: String,
        pid: u32,
        host: Option<String>,
    },
    /// A QEMU in the cluster that no VM of the controller accounts for.
    UnplacedQemu {
        pid: u32,
        uuid: Option<String>,
        host: Option<String>,
        netns: String,
    },
    /// A QEMU whose files are on one host runs in another host's namespace.
    WrongNamespace {
        pid: u32,
        host: String,
        expected: String,
        actual: String,
    },
    /// The reported state contradicts what the QEMU does.
    StateMismatch {
        vm: String,
        reported: String,
        evidence: String,
    },
    /// The VM is not where its last migration's outcome put it.
    OutcomeMismatch {
        migration: String,
        vm: String,
        status: String,
        expected_host: String,
        host: String,
    },
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disagreement::MigrationNotFinished { id, vm, status } => {
                write!(f, "migration {id} of {vm} is still {status}")
            }
            Disagreement::DefinedOnSeveralHosts { vm, hosts } => {
                write!(f, "VM {vm} is listed on several hosts: {}", hosts.join(", "))
            }
            Disagreement::NoQemu { vm, host, state } => write!(
                f,
                "VM {vm} is {state} on {host} according to the controller, but no QEMU of it runs there"
            ),
            Disagreement::QemuOnWrongHost {
                vm,
                owner,
                pid,
                host,
            } => write!(
                f,
                "a QEMU of VM {vm} (pid {pid}) runs on {host}, but the controller places it on {owner}"
            ),
            Disagreement::SeveralQemus { vm, host, pids } => {
                write!(f, "VM {vm} has {} QEMUs on {host}: pids {pids:?}", pids.len())
            }
            Disagreement::PidMismatch {
                vm,
                reported,
                actual,
            } => write!(
                f,
                "VM {vm}: the controller reports pid {reported}, its QEMU is pid {actual}"
            ),
            Disagreement::QemuOfStoppedVm {
                vm,
                state,
                pid,
                host,
            } => write!(
                f,
                "VM {vm} is {state} according to the controller, but QEMU pid {pid} runs it (host {})",
                host.as_deref().unwrap_or("?")
            ),
            Disagreement::UnplacedQemu {
                pid,
                uuid,
                host,
                netns,
            } => write!(
                f,
                "QEMU pid {pid} (VM uuid {}, host {}, netns {netns}) belongs to no VM the controller knows there",
                uuid.as_deref().unwrap_or("none"),
                host.as_deref().unwrap_or("?")
            ),
            Disagreement::WrongNamespace {
                pid,
                host,
                expected,
                actual,
            } => write!(
                f,
                "QEMU pid {pid} of host {host} runs in netns {actual}, not the host's {expected}"
            ),
            Disagreement::StateMismatch {
                vm,
                reported,
                evidence,
            } => write!(f, "VM {vm} is {reported} according to the controller, but {evidence}"),
            Disagreement::OutcomeMismatch {
                migration,
                vm,
                status,
                expected_host,
                host,
            } => write!(
                f,
                "migration {migration} of {vm} ended {status}, so the VM belongs on {expected_host}, but the controller places it on {host}"
            ),
        }
    }
}

/// What [`check_g3`] compared.
#[derive(Debug, Clone)]
pub struct G3Report {
    pub vms: usize,
    pub migrations: usize,
    /// The cluster's QEMUs, with their host and run evidence.
    pub qemus: Vec<(Option<String>, QemuObservation)>,
}

/// G3 with a [`DEFAULT_WINDOW`] of vCPU observation.
pub fn check_g3(view: &ControllerView, scope: &Scope) -> Result<G3Report, Violation> {
    check_g3_with(view, scope, DEFAULT_WINDOW)
}

/// Compares the controller's view with the QEMUs of the scope (see the module docs).
pub fn check_g3_with(
    view: &ControllerView,
    scope: &Scope,
    window: Duration,
) -> Result<G3Report, Violation> {
    let unobservable = |error: String| Violation::Unobservable {
        invariant: Invariant::G3,
        what: format!("the QEMU processes of {}", scope.label),
        error,
    };
    let selector_scope = scope.clone();
    let mut sampler = Sampler::new(Box::new(move |p: &QemuProcess| {
        p.is_system_emulator() && selector_scope.owns_qemu(p)
    }));
    sampler.sample().map_err(unobservable)?;
    std::thread::sleep(window);
    let observations = sampler.sample().map_err(unobservable)?.observations;
    let qemus: Vec<(Option<String>, QemuObservation)> = observations
        .into_iter()
        .map(|o| (scope.host_of(&o.process).map(|h| h.name.clone()), o))
        .collect();

    let mut found = Vec::new();
    for m in &view.migrations {
        if m.status == "pending" || m.status == "running" {
            found.push(Disagreement::MigrationNotFinished {
                id: m.id.clone(),
                vm: m.vm.clone(),
                status: m.status.clone(),
            });
        }
    }
    let mut hosts_of: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for vm in &view.vms {
        hosts_of.entry(&vm.name).or_default().push(vm.host.clone());
    }
    for (vm, hosts) in hosts_of {
        if hosts.len() > 1 {
            found.push(Disagreement::DefinedOnSeveralHosts {
                vm: vm.to_string(),
                hosts,
            });
        }
    }
    for (host, qemu) in &qemus {
        let Some(host) = host else { continue };
        let Some(expected) = scope
            .hosts
            .iter()
            .find(|h| &h.name == host)
            .and_then(|h| h.netns.clone())
        else {
            continue;
        };
        if qemu.process.netns.name != expected {
            found.push(Disagreement::WrongNamespace {
                pid: qemu.process.pid,
                host: host.clone(),
                expected,
                actual: qemu.process.netns.name.clone(),
            });
        }
    }

    for vm in &view.vms {
        let mine: Vec<&(Option<String>, QemuObservation)> = qemus
            .iter()
            .filter(|(_, q)| q.process.uuid.as_deref() == Some(vm.uuid.as_str()))
            .collect();
        if !vm.has_process() {
            for (host, q) in &mine {
                // A VM listed twice (an incoming definition left on another host) is
                // reported as such; its QEMU is judged against the listing that runs.
                if view
                    .vms
                    .iter()
                    .any(|other| other.uuid == vm.uuid && other.has_process())
                {
                    continue;
                }
                found.push(Disagreement::QemuOfStoppedVm {
                    vm: vm.name.clone(),
                    state: vm.state.clone(),
                    pid: q.process.pid,
                    host: host.clone(),
                });
            }
            continue;
        }
        let on_owner: Vec<&QemuObservation> = mine
            .iter()
            .filter(|(h, _)| h.as_deref() == Some(vm.host.as_str()))
            .map(|(_, q)| q)
            .collect();
        if on_owner.is_empty() {
            found.push(Disagreement::NoQemu {
                vm: vm.name.clone(),
                host: vm.host.clone(),
                state: vm.state.clone(),
            });
        }
        for (host, q) in &mine {
            if host.as_deref() != Some(vm.host.as_str()) {
                found.push(Disagreement::QemuOnWrongHost {
                    vm: vm.name.clone(),
                    owner: vm.host.clone(),
                    pid: q.process.pid,
                    host: host.clone().unwrap_or_else(|| "?".into()),
                });
            }
        }
        if on_owner.len() > 1 {
            found.push(Disagreement::SeveralQemus {
                vm: vm.name.clone(),
                host: vm.host.clone(),
                pids: on_owner.iter().map(|q| q.process.pid).collect(),
            });
        }
        if let ([q], Some(reported)) = (on_owner.as_slice(), vm.pid) {
            if q.process.pid != reported {
                found.push(Disagreement::PidMismatch {
                    vm: vm.name.clone(),
                    reported,
                    actual: q.process.pid,
                });
            }
            let contradiction = match (vm.state.as_str(), &q.evidence) {
                ("running", RunEvidence::Qmp { running: false, .. }) => true,
                ("paused", evidence) => evidence.running(),
                _ => false,
            };
            if contradiction {
                found.push(Disagreement::StateMismatch {
                    vm: vm.name.clone(),
                    reported: vm.state.clone(),
                    evidence: format!("{}", q.evidence),
                });
            }
        }
    }

    for (host, q) in &qemus {
        let claimed = q
            .process
            .uuid
            .as_deref()
            .is_some_and(|uuid| view.vms.iter().any(|vm| vm.uuid == uuid));
        if !claimed {
            found.push(Disagreement::UnplacedQemu {
                pid: q.process.pid,
                uuid: q.process.uuid.clone(),
                host: host.clone(),
                netns: q.process.netns.name.clone(),
            });
        }
    }

    for vm in &view.vms {
        let Some(last) = view
            .migrations
            .iter()
            .filter(|m| m.vm == vm.name)
            .max_by_key(|m| m.created_at_ms)
        else {
            continue;
        };
        // Only when this VM's QEMU predates the migration's end: a VM of the same
        // name created since is another VM.
        let same_vm = match (vm.started_at, last.finished_at_ms) {
            (Some(started), Some(finished)) => started * 1000 <= finished + 1000,
            _ => false,
        };
        let expected = match last.status.as_str() {
            "completed" => &last.destination,
            "cancelled" => &last.source,
            _ => continue,
        };
        if same_vm && &vm.host != expected && vm.has_process() {
            found.push(Disagreement::OutcomeMismatch {
                migration: last.id.clone(),
                vm: vm.name.clone(),
                status: last.status.clone(),
                expected_host: expected.clone(),
                host: vm.host.clone(),
            });
        }
    }

    if found.is_empty() {
        Ok(G3Report {
            vms: view.vms.len(),
            migrations: view.migrations.len(),
            qemus,
        })
    } else {
        Err(Violation::Disagreements(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn ferrys_command_line_yields_uuid_name_and_qmp_socket() {
        let a = args(
            "/usr/bin/qemu-system-x86_64 -name guest=pv,debug-threads=on \
             -uuid 7D1211FA-7f48-403a-9c81-337e0e6d3946 -nodefaults \
             -chardev socket,id=qmp,path=/tmp/a,,b/qmp.sock,server=on,wait=off \
             -mon chardev=qmp,mode=control \
             -chardev socket,id=serial0,path=/tmp/serial.sock,server=on,wait=off",
        );
        let p = QemuProcess::parse(
            1,
            2,
            "qemu-system-x86_64".into(),
            a,
            Netns {
                inode: 1,
                name: "root".into(),
            },
        );
        assert_eq!(
            p.uuid.as_deref(),
            Some("7d1211fa-7f48-403a-9c81-337e0e6d3946")
        );
        assert_eq!(p.name.as_deref(), Some("pv"));
        assert_eq!(p.qmp_socket, Some(PathBuf::from("/tmp/a,b/qmp.sock")));
        assert!(p.mentions(Path::new("/tmp/a,b")));
        assert!(!p.mentions(Path::new("/tmp/a")));
    }

    #[test]
    fn a_qmp_option_names_its_socket() {
        for (line, want) in [
            (
                "qemu-system-x86_64 -qmp unix:/run/q.sock,server=on,wait=off",
                "/run/q.sock",
            ),
            (
                "qemu-system-x86_64 --qmp unix:path=/run/p.sock",
                "/run/p.sock",
            ),
        ] {
            assert_eq!(
                find_qmp_socket(&args(line)),
                Some(PathBuf::from(want)),
                "{line}"
            );
        }
        // A human monitor is not QMP.
        let hmp = args("q -chardev socket,id=m,path=/x -mon chardev=m,mode=readline");
        assert_eq!(find_qmp_socket(&hmp), None);
    }

    #[test]
    fn tcp_listeners_parse_in_both_families() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                  0: 030012C6:1BBD 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 228079 1 0\n   \
                  1: 030012C6:9900 020012C6:1BBD 01 00000000:00000000 02:0000021A 00000000     0        0 228951 2 0\n";
        let got = parse_tcp_listeners(v4, false);
        assert_eq!(got, vec![("198.18.0.3:7101".parse().unwrap(), 228079)]);
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                  0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0\n";
        let got = parse_tcp_listeners(v6, true);
        assert_eq!(got, vec![("[::1]:22".parse().unwrap(), 1234)]);
    }

    #[test]
    fn locks_are_described_without_ids_and_inodes() {
        assert_eq!(
            describe_lock("\t1: OFDLCK ADVISORY  READ -1 fe:00:10051621 100 101"),
            "OFDLCK READ 100-101"
        );
    }

    #[test]
    fn state_files_are_classified() {
        let base = PathBuf::from("/c/hosts/host2/state");
        let info = |dir| FileInfo {
            dir,
            bytes: 0,
            root: FileRoot::State,
            base: base.clone(),
        };
        let kind = |rel: &str, dir| classify(&base.join(rel), &info(dir));
        assert_eq!(
            kind("vms/pv/tls-server", true),
            FileKind::MigrationCredentials
        );
        assert_eq!(
            kind("vms/pv/tls-client/client-key.pem", false),
            FileKind::MigrationCredentials
        );
        assert_eq!(kind("vms/pv/.vm.json.tmp", false), FileKind::PartialFile);
        assert_eq!(kind("vms/pv", true), FileKind::VmFolder);
        assert_eq!(kind("agent.lock", false), FileKind::LockFile);
        assert_eq!(kind("vms/pv/console.log", false), FileKind::StateFile);
    }

    #[test]
    fn young_and_new_vcpu_threads_are_not_counted() {
        let thread = |tid, start_ticks, ms| VcpuThread {
            tid,
            start_ticks,
            time: Duration::from_millis(ms),
        };
        let previous: HashMap<u32, Duration> = [
            (1, Duration::from_millis(10)),
            (2, Duration::from_millis(1)),
        ]
        .into();
        // Now is tick 1000: thread 1 started at 100 (settled), thread 2 at 950 (half a
        // second ago: starting), thread 3 is new.
        let threads = [thread(1, 100, 13), thread(2, 950, 5), thread(3, 100, 7)];
        let reading = busy_since(Some(&previous), &threads, Some(1000));
        assert_eq!(reading.busy, Duration::from_millis(3));
        assert_eq!((reading.threads, reading.settling), (3, 1));
        assert!(reading.compared);
        let first = busy_since(None, &threads, Some(1000));
        assert_eq!(first.busy, Duration::ZERO);
        assert!(!first.compared);
    }

    fn obs(pid: u32, running: bool, instant: bool) -> QemuObservation {
        QemuObservation {
            process: QemuProcess::parse(
                pid,
                pid as u64,
                "qemu-system-x86_64".into(),
                vec!["qemu-system-x86_64".into()],
                Netns {
                    inode: 1,
                    name: "root".into(),
                },
            ),
            evidence: if instant {
                RunEvidence::Qmp {
                    status: if running { "running" } else { "paused" }.into(),
                    running,
                }
            } else {
                RunEvidence::Vcpu {
                    busy: if running {
                        Duration::from_millis(2)
                    } else {
                        Duration::ZERO
                    },
                    window: Duration::from_millis(20),
                    threads: 1,
                    settling: 0,
                }
            },
        }
    }

    fn snap(qemus: Vec<QemuObservation>) -> G1Snapshot {
        G1Snapshot {
            uuid: "u".into(),
            window: Duration::from_millis(20),
            qemus,
        }
    }

    #[test]
    fn a_handover_inside_one_window_is_not_a_violation() {
        let mut judge = Judge::new("u");
        let at = Duration::ZERO;
        assert!(matches!(
            judge.feed(snap(vec![obs(1, true, false)]), at, 1),
            Verdict::Fine
        ));
        assert!(matches!(
            judge.feed(snap(vec![obs(1, true, false), obs(2, true, false)]), at, 2),
            Verdict::Pending
        ));
        for i in 0..CONFIRM_SAMPLES {
            let verdict = judge.feed(
                snap(vec![obs(1, false, false), obs(2, true, false)]),
                at,
                3 + i,
            );
            assert!(!matches!(verdict, Verdict::Violated(_)));
        }
        assert_eq!(judge.handovers, 1);
        assert!(judge.pending.is_none());
    }

    #[test]
    fn two_running_in_two_windows_or_by_qmp_is_a_violation() {
        let mut judge = Judge::new("u");
        let at = Duration::ZERO;
        let both = || snap(vec![obs(1, true, false), obs(2, true, false)]);
        assert!(matches!(judge.feed(both(), at, 1), Verdict::Pending));
        assert!(matches!(judge.feed(both(), at, 2), Verdict::Violated(_)));

        let mut judge = Judge::new("u");
        let by_qmp = snap(vec![obs(1, true, true), obs(2, true, true)]);
        assert!(matches!(judge.feed(by_qmp, at, 1), Verdict::Violated(_)));
    }
}

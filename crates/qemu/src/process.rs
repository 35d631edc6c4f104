//! Launching QEMU and keeping hold of it across agent restarts.
//!
//! Ferry always starts QEMU with `-daemonize -pidfile PATH`: the QEMU process
//! is re-parented away from the agent, so restarting or upgrading `ferryd`
//! never takes a running guest down with it. The price is that QEMU is never
//! the agent's child: there is no `waitpid`, no exit status, and a bare pid is
//! not an identity (the kernel reuses pids). So:
//!
//! * a [`QemuProcess`] is a pid **plus the process start time** (field 22 of
//!   `/proc/<pid>/stat`, clock ticks since boot). Every operation re-checks the
//!   start time, so a recycled pid is seen as "our QEMU is gone", never as "our
//!   QEMU is still there";
//! * reattaching after an agent restart ([`QemuProcess::from_pidfile`]) also
//!   checks that `/proc/<pid>/cmdline` carries the VM's uuid, so a pidfile left
//!   over from another VM cannot hand us the wrong process;
//! * signals and exit waits go through a **pidfd** (`pidfd_open(2)`): once the
//!   pidfd is open and the start time checked, the fd names exactly that
//!   process, so `kill` cannot hit a successor that inherited the pid, and
//!   `wait_exit` is woken by the kernel (the pidfd turns readable when the
//!   process exits, child or not) instead of polling. Where the kernel lacks
//!   pidfds (before 5.3) we fall back to polling `/proc` and say so in the log.
//!
//! A process that has exited but not been reaped (a zombie, state `Z`) counts
//! as exited: its parent may be an init that reaps late, and a zombie runs no
//! guest.
//!
//! The binary itself is checked here too ([`find_qemu_binary`],
//! [`check_version`]): Ferry refuses QEMU older than 10.0, because QEMU 7.2
//! under TCG corrupts the memory of guests that migrate while they write.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;
use tokio::io::Interest;

/// The oldest QEMU Ferry accepts. See [`ProcessError::QemuTooOld`] for why.
pub const MIN_QEMU_VERSION: QemuVersion = QemuVersion {
    major: 10,
    minor: 0,
    micro: 0,
};

/// Name of the QEMU binary looked up in `PATH`.
pub const QEMU_BINARY_NAME: &str = "qemu-system-x86_64";

/// Environment variable that overrides the `PATH` lookup of the QEMU binary.
pub const QEMU_BINARY_ENV: &str = "FERRY_QEMU";

/// How long [`launch`] waits for the daemonizing parent by default. QEMU
/// daemonizes only after its whole initialisation (opening disks, binding
/// sockets), which takes well under a second here; the margin covers a loaded
/// 2-core host, and the bound exists because a command line that waits for a
/// client (`server=on,wait=on`) would otherwise hang the agent forever.
pub const DEFAULT_LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Most stderr kept from a failing launch: QEMU's explanation is a line or
/// two, and the bytes are not ours to trust in size.
const MAX_STDERR_BYTES: usize = 64 * 1024;

/// How often the no-pidfd fallback polls `/proc`.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

const INSTALL_HINT: &str = "install QEMU 10.0 from Debian bookworm-backports: add \
    `Suites: bookworm-backports` under /etc/apt/sources.list.d/, then \
    `apt-get install -t bookworm-backports --no-install-recommends qemu-system-x86 qemu-utils`";

/// Errors from launching, finding, identifying and signalling QEMU.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("could not run {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "refusing to launch {binary} without `-daemonize` and `-pidfile {pidfile}`: \
         Ferry's QEMU processes must outlive the agent and be found again by pidfile"
    )]
    NotDaemonizing { binary: PathBuf, pidfile: PathBuf },
    #[error("QEMU ({binary}) failed to start ({status}): {stderr}")]
    LaunchFailed {
        binary: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("QEMU ({binary}) did not finish daemonizing within {after:?}; it was killed")]
    LaunchTimeout { binary: PathBuf, after: Duration },
    #[error("waiting for the daemonizing QEMU parent ({binary})")]
    LaunchWait {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not read pidfile {path}")]
    PidfileRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pidfile {path} does not hold a pid: {contents:?}")]
    PidfileContents { path: PathBuf, contents: String },
    #[error("process {pid} is not running")]
    NotRunning { pid: u32 },
    #[error("could not read /proc/{pid}/{file}")]
    Proc {
        pid: u32,
        file: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("/proc/{pid}/stat is not in the expected format: {contents:?}")]
    StatFormat { pid: u32, contents: String },
    #[error("process {pid}'s command line does not mention VM {uuid}; refusing to adopt it")]
    NotOurVm { pid: u32, uuid: String },
    #[error("refusing to reattach by an empty VM uuid (it would match any process)")]
    EmptyUuid,
    #[error("could not send {signal} to process {pid}")]
    Signal {
        pid: u32,
        signal: Signal,
        #[source]
        source: io::Error,
    },
    #[error("could not watch process {pid} for exit")]
    Watch {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("process {pid} was still running after {after:?}")]
    WaitTimeout { pid: u32, after: Duration },
    #[error(
        "{name} was not found in PATH; set {env} to its path, or {hint}",
        name = QEMU_BINARY_NAME, env = QEMU_BINARY_ENV, hint = INSTALL_HINT
    )]
    BinaryNotFound,
    #[error("{env}={path} is not an executable file", env = QEMU_BINARY_ENV)]
    BinaryNotExecutable { path: PathBuf },
    #[error("`{binary} --version` failed ({status}): {stderr}")]
    VersionCommand {
        binary: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("`{binary} --version` printed no version Ferry understands: {output:?}")]
    VersionFormat { binary: PathBuf, output: String },
    #[error(
        "{binary} is QEMU {found}; Ferry needs QEMU {min} or newer, because QEMU 7.2 \
         under TCG corrupts guests that migrate while dirtying memory (the destination \
         crashes on stale memory); {hint}",
        min = MIN_QEMU_VERSION, hint = INSTALL_HINT
    )]
    QemuTooOld { binary: PathBuf, found: QemuVersion },
}

/// A QEMU release number. Ordered, so `found < MIN_QEMU_VERSION` works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl QemuVersion {
    /// Parses the output of `qemu-system-x86_64 --version`, whose first line
    /// reads `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2...)`. Only
    /// the number after `version` counts; the distribution's package string
    /// in parentheses is ignored because it holds other version-like numbers.
    pub fn parse_version_output(output: &str) -> Option<QemuVersion> {
        let line = output.lines().find(|l| l.contains("version"))?;
        let after = line.split("version").nth(1)?.trim_start();
        let token = after.split(|c: char| c.is_whitespace()).next()?;
        Self::parse_dotted(token)
    }

    /// Parses `10.0.2` or `10.0` (micro defaults to 0). Trailing text after
    /// the numbers (`10.1.0-rc1`) is ignored.
    pub fn parse_dotted(text: &str) -> Option<QemuVersion> {
        let mut parts = text.split('.');
        let number = |s: Option<&str>| -> Option<u32> {
            let s = s?;
            let digits: &str = &s[..s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len())];
            digits.parse().ok()
        };
        let major = number(parts.next())?;
        let minor = number(parts.next())?;
        let micro = match parts.next() {
            Some(p) => number(Some(p)).unwrap_or(0),
            None => 0,
        };
        Some(QemuVersion {
            major,
            minor,
            micro,
        })
    }
}

/// A running QEMU, identified by pid and start time so that the identity
/// survives pid reuse. Serialisable: the agent persists it and reattaches
/// after a restart with [`QemuProcess::reattach`] or
/// [`QemuProcess::from_pidfile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QemuProcess {
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// The parts of `/proc/<pid>/stat` Ferry needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub(crate) state: char,
    pub(crate) start_time: u64,
}

impl ProcStat {
    /// Exited but not reaped (`Z`), or being torn down (`X`, `x`).
    fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses
/// and may itself contain spaces and parentheses (QEMU names its threads, and
/// a guest name can end up in `comm`), so fields are counted from the
/// **last** `)`.
pub(crate) fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After the `)` the first field is field 3 (state); start time is field 22.
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

/// Parses a pidfile written by QEMU (`"1234\n"`).
pub(crate) fn parse_pidfile(contents: &str) -> Option<u32> {
    let pid: u32 = contents.trim().parse().ok()?;
    // pid 0 would mean "our process group" to kill(2); never valid here.
    (pid > 0 && i32::try_from(pid).is_ok()).then_some(pid)
}

fn read_proc_stat(pid: u32) -> Result<Option<ProcStat>, ProcessError> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => parse_proc_stat(&text)
            .map(Some)
            .ok_or(ProcessError::StatFormat {
                pid,
                contents: text.chars().take(512).collect(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            Ok(None)
        }
        Err(source) => Err(ProcessError::Proc {
            pid,
            file: "stat",
            source,
        }),
    }
}

fn pid_t(pid: u32) -> libc::pid_t {
    // Every constructor checks the range; saturate rather than wrap just in
    // case, so a bad value can never become a negative (group) pid.
    libc::pid_t::try_from(pid).unwrap_or(libc::pid_t::MAX)
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and a flags word and returns a new
    // file descriptor or -1; no memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid_t(pid), 0 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd_open returned a bad fd"))?;
    // SAFETY: the kernel just created this descriptor for us; nothing else
    // owns it, so OwnedFd may close it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_send_signal(fd: &OwnedFd, signal: Signal) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a valid pidfd we own, a signal
    // number, a null siginfo (the kernel fills in a default) and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What opening a verified handle on a process found.
enum Handle {
    /// The process is ours and alive; the pidfd names exactly it.
    Pidfd(OwnedFd),
    /// The kernel has no pidfds; only `/proc` checks are possible.
    NoPidfd,
    /// Our process has exited (or its pid now belongs to someone else).
    Gone,
}

impl QemuProcess {
    /// Identifies the live process `pid` by reading its start time now.
    pub fn from_pid(pid: u32) -> Result<QemuProcess, ProcessError> {
        if pid == 0 || i32::try_from(pid).is_err() {
            return Err(ProcessError::NotRunning { pid });
        }
        match read_proc_stat(pid)? {
            Some(stat) if !stat.is_dead() => Ok(QemuProcess {
                pid,
                start_time: stat.start_time,
            }),
            _ => Err(ProcessError::NotRunning { pid }),
        }
    }

    /// Re-adopts a persisted identity: succeeds only if `pid` is alive and
    /// still the process that started at `start_time`.
    pub fn reattach(pid: u32, start_time: u64) -> Result<QemuProcess, ProcessError> {
        let found = QemuProcess::from_pid(pid)?;
        if found.start_time != start_time {
            return Err(ProcessError::NotRunning { pid });
        }
        Ok(found)
    }

    /// Reattaches to the QEMU that wrote `pidfile`, after checking that its
    /// command line mentions `expected_uuid` (Ferry passes `-uuid` and names
    /// its files by uuid), so a stale pidfile whose pid was reused by an
    /// unrelated process — or by another VM's QEMU — is refused.
    pub fn from_pidfile(pidfile: &Path, expected_uuid: &str) -> Result<QemuProcess, ProcessError> {
        if expected_uuid.is_empty() {
            return Err(ProcessError::EmptyUuid);
        }
        let pid = read_pidfile(pidfile)?;
        let process = QemuProcess::from_pid(pid)?;
        if !process.cmdline_contains(expected_uuid.as_bytes())? {
            return Err(ProcessError::NotOurVm {
                pid,
                uuid: expected_uuid.to_owned(),
            });
        }
        // The cmdline was read after the start time; if the pid changed hands
        // in between, the start time no longer matches and we refuse.
        QemuProcess::reattach(pid, process.start_time)
    }

    fn cmdline_contains(&self, needle: &[u8]) -> Result<bool, ProcessError> {
        let bytes = match std::fs::read(format!("/proc/{}/cmdline", self.pid)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ProcessError::NotRunning { pid: self.pid })
            }
            Err(source) => {
                return Err(ProcessError::Proc {
                    pid: self.pid,
                    file: "cmdline",
                    source,
                })
            }
        };
        Ok(!needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle))
    }

    /// Whether this process (this pid *and* this start time) is still
    /// running. A zombie is not running.
    pub fn is_alive(&self) -> bool {
        matches!(
            read_proc_stat(self.pid),
            Ok(Some(stat)) if stat.start_time == self.start_time && !stat.is_dead()
        )
    }

    /// Opens a pidfd and checks, *after* opening it, that the pid still
    /// belongs to this process. From then on the fd cannot refer to a
    /// successor even if the pid is recycled.
    fn open_handle(&self) -> Result<Handle, ProcessError> {
        let fd = match pidfd_open(self.pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(Handle::Gone),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                tracing::warn!(
                    pid = self.pid,
                    "kernel lacks pidfd_open; falling back to polling /proc"
                );
                None
            }
            Err(source) => {
                return Err(ProcessError::Watch {
                    pid: self.pid,
                    source,
                })
            }
        };
        if !self.is_alive() {
            return Ok(Handle::Gone);
        }
        Ok(match fd {
            Some(fd) => Handle::Pidfd(fd),
            None => Handle::NoPidfd,
        })
    }

    /// Sends `signal`. Returns `Ok(false)` when the process had already
    /// exited (nothing was signalled), so cleanup code can call it
    /// idempotently; a recycled pid is never signalled.
    pub fn kill(&self, signal: Signal) -> Result<bool, ProcessError> {
        let err = |source| ProcessError::Signal {
            pid: self.pid,
            signal,
            source,
        };
        match self.open_handle()? {
            Handle::Gone => Ok(false),
            Handle::Pidfd(fd) => match pidfd_send_signal(&fd, signal) {
                Ok(()) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
                Err(e) => Err(err(e)),
            },
            Handle::NoPidfd => {
                match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_t(self.pid)), signal) {
                    Ok(()) => Ok(true),
                    Err(nix::errno::Errno::ESRCH) => Ok(false),
                    Err(e) => Err(err(io::Error::from(e))),
                }
            }
        }
    }

    /// Waits until the process exits, at most `timeout`. Returns at once if
    /// it already has. The wait is a pidfd readiness wait (no polling, no
    /// `waitpid`: the process is not our child).
    pub async fn wait_exit(&self, timeout: Duration) -> Result<(), ProcessError> {
        let timed_out = || ProcessError::WaitTimeout {
            pid: self.pid,
            after: timeout,
        };
        match self.open_handle()? {
            Handle::Gone => Ok(()),
            Handle::Pidfd(fd) => {
                let watch_err = |source| ProcessError::Watch {
                    pid: self.pid,
                    source,
                };
                // SAFETY: the OwnedFd is moved into the AsyncFd, so it stays
                // open under the same number until the AsyncFd is dropped.
                let afd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                    .map_err(|e| watch_err(e.into()))?;
                match tokio::time::timeout(timeout, afd.readable()).await {
                    Ok(Ok(_ready)) => Ok(()),
                    Ok(Err(e)) => Err(watch_err(e)),
                    Err(_) => Err(timed_out()),
                }
            }
            Handle::NoPidfd => {
                let deadline = tokio::time::Instant::now() + timeout;
                while self.is_alive() {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(timed_out());
                    }
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                Ok(())
            }
        }
    }
}

/// Launches QEMU with a `-daemonize -pidfile PATH` command line and returns
/// the daemon's identity, with [`DEFAULT_LAUNCH_TIMEOUT`].
///
/// QEMU's daemonizing parent exits only once the daemon has finished
/// initialising, with status 0 on success and 1 after printing the reason to
/// stderr: so a bad command line, a missing disk or a busy port comes back
/// here as [`ProcessError::LaunchFailed`] carrying QEMU's own words.
pub async fn launch<S: AsRef<OsStr>>(
    binary: &Path,
    args: &[S],
    pidfile: &Path,
) -> Result<QemuProcess, ProcessError> {
    launch_with_timeout(binary, args, pidfile, DEFAULT_LAUNCH_TIMEOUT).await
}

/// [`launch`] with an explicit bound on daemonization. On timeout the parent
/// is killed, and so is the daemon if its pidfile already names it (no leaked
/// QEMU, invariant G2).
pub async fn launch_with_timeout<S: AsRef<OsStr>>(
    binary: &Path,
    args: &[S],
    pidfile: &Path,
    timeout: Duration,
) -> Result<QemuProcess, ProcessError> {
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    // Without -daemonize the "parent" is QEMU itself and we would wait for
    // the guest to end; without the pidfile we could never find it again.
    let daemonizes = args.iter().any(|a| *a == "-daemonize");
    let has_pidfile = args
        .windows(2)
        .any(|w| w[0] == "-pidfile" && Path::new(w[1]) == pidfile);
    if !daemonizes || !has_pidfile {
        return Err(ProcessError::NotDaemonizing {
            binary: binary.to_owned(),
            pidfile: pidfile.to_owned(),
        });
    }

    let mut child = tokio::process::Command::new(binary)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // If this future is dropped mid-launch, do not leave the parent.
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;

    // Read stderr concurrently so a chatty QEMU cannot block on a full pipe.
    // The daemon itself points stderr at /dev/null before releasing the
    // parent, except with `-D` logging, so after a *successful* exit we do not
    // wait for EOF.
    let stderr = child.stderr.take();
    let reader = tokio::spawn(async move {
        let mut kept = Vec::new();
        if let Some(mut stderr) = stderr {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                let room = MAX_STDERR_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
        kept
    });

    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(source)) => {
            reader.abort();
            return Err(ProcessError::LaunchWait {
                binary: binary.to_owned(),
                source,
            });
        }
        Err(_) => {
            reader.abort();
            let _ = child.start_kill();
            let _ = child.wait().await;
            kill_half_launched(pidfile);
            return Err(ProcessError::LaunchTimeout {
                binary: binary.to_owned(),
                after: timeout,
            });
        }
    };

    if !status.success() {
        let stderr = match tokio::time::timeout(Duration::from_secs(2), reader).await {
            Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).trim().to_owned(),
            _ => String::from("(stderr not captured)"),
        };
        // A failed start can still leave a daemon behind in odd cases (it
        // wrote the pidfile, then the parent died); make sure it is gone.
        kill_half_launched(pidfile);
        return Err(ProcessError::LaunchFailed {
            binary: binary.to_owned(),
            status: status.to_string(),
            stderr,
        });
    }
    reader.abort();

    let pid = read_pidfile(pidfile)?;
    let process = QemuProcess::from_pid(pid)?;
    tracing::debug!(pid, start_time = process.start_time, binary = %binary.display(), "QEMU daemonized");
    Ok(process)
}

/// Best-effort cleanup after a launch that did not complete: if the pidfile
/// names a live process whose command line carries this pidfile path (so it
/// is the daemon we started, not a pid that was recycled), SIGKILL it.
fn kill_half_launched(pidfile: &Path) {
    let Ok(contents) = std::fs::read_to_string(pidfile) else {
        return;
    };
    let Some(pid) = parse_pidfile(&contents) else {
        return;
    };
    let Ok(process) = QemuProcess::from_pid(pid) else {
        return;
    };
    if matches!(
        process.cmdline_contains(pidfile.as_os_str().as_encoded_bytes()),
        Ok(true)
    ) {
        tracing::warn!(pid, pidfile = %pidfile.display(), "killing half-launched QEMU");
        let _ = process.kill(Signal::SIGKILL);
    }
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds the QEMU binary: `$FERRY_QEMU` if set (and then it must be an
/// executable file: a typo should fail loudly, not fall back to another
/// QEMU), else `qemu-system-x86_64` in `PATH`.
/// The pid a QEMU pidfile names.
fn read_pidfile(pidfile: &Path) -> Result<u32, ProcessError> {
    let contents =
        std::fs::read_to_string(pidfile).map_err(|source| ProcessError::PidfileRead {
            path: pidfile.to_owned(),
            source,
        })?;
    parse_pidfile(&contents).ok_or_else(|| ProcessError::PidfileContents {
        path: pidfile.to_owned(),
        contents: contents.chars().take(64).collect(),
    })
}

pub fn find_qemu_binary() -> Result<PathBuf, ProcessError> {
    if let Some(path) = std::env::var_os(QEMU_BINARY_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if is_executable_file(&path) {
            Ok(path)
        } else {
            Err(ProcessError::BinaryNotExecutable { path })
        };
    }
    let path_var = std::env::var_os("PATH").ok_or(ProcessError::BinaryNotFound)?;
    std::env::split_paths(&path_var)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(QEMU_BINARY_NAME))
        .find(|candidate| is_executable_file(candidate))
        .ok_or(ProcessError::BinaryNotFound)
}

/// Runs `binary --version`, parses the release and refuses anything older
/// than [`MIN_QEMU_VERSION`] with the reason and the fix.
pub async fn check_version(binary: &Path) -> Result<QemuVersion, ProcessError> {
    let spawn_err = |source| ProcessError::Spawn {
        binary: binary.to_owned(),
        source,
    };
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(binary)
            .arg("--version")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| spawn_err(io::Error::new(io::ErrorKind::TimedOut, "--version hung")))?
    .map_err(spawn_err)?;
    if !output.status.success() {
        return Err(ProcessError::VersionCommand {
            binary: binary.to_owned(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let version =
        QemuVersion::parse_version_output(&text).ok_or_else(|| ProcessError::VersionFormat {
            binary: binary.to_owned(),
            output: text.chars().take(256).collect(),
        })?;
    ensure_supported(binary, version)?;
    Ok(version)
}

/// The version gate on its own, for versions learnt another way (the QMP
/// greeting).
pub fn ensure_supported(binary: &Path, version: QemuVersion) -> Result<(), ProcessError> {
    if version < MIN_QEMU_VERSION {
        return Err(ProcessError::QemuTooOld {
            binary: binary.to_owned(),
            found: version,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_output_of_debian_backports_parses() {
        let out = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n\
                   Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(
            QemuVersion::parse_version_output(out),
            Some(QemuVersion {
                major: 10,
                minor: 0,
                micro: 2
            })
        );
    }

    #[test]
    fn version_output_of_bookworm_72_parses_and_is_refused() {
        let out = "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u12)\n";
        let v = QemuVersion::parse_version_output(out).unwrap();
        assert_eq!(v.to_string(), "7.2.15");
        let err = ensure_supported(Path::new("/usr/bin/qemu-system-x86_64"), v).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("7.2.15") && msg.contains("bookworm-backports"),
            "{msg}"
        );
    }

    #[test]
    fn version_without_micro_and_with_rc_suffix_parses() {
        assert_eq!(
            QemuVersion::parse_dotted("10.1"),
            Some(QemuVersion {
                major: 10,
                minor: 1,
                micro: 0
            })
        );
        assert_eq!(
            QemuVersion::parse_version_output("QEMU emulator version 10.0.90-rc0\n")
                .map(|v| v.micro),
            Some(90)
        );
    }

    #[test]
    fn garbage_version_output_is_none() {
        assert_eq!(QemuVersion::parse_version_output(""), None);
        assert_eq!(QemuVersion::parse_version_output("version x.y"), None);
        assert_eq!(QemuVersion::parse_version_output("no numbers here"), None);
    }

    #[test]
    fn version_10_is_accepted() {
        let v = QemuVersion::parse_dotted("10.0.0").unwrap();
        assert!(ensure_supported(Path::new("q"), v).is_ok());
    }

    #[test]
    fn proc_stat_with_parens_and_spaces_in_comm_parses() {
        let stat = "8549 (qemu (vm) x) S 1 8548 8548 0 -1 4194624 6199 0 0 0 10 4 0 0 20 0 \
                    3 0 123456 1203961856 9000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0";
        assert_eq!(
            parse_proc_stat(stat),
            Some(ProcStat {
                state: 'S',
                start_time: 123456
            })
        );
    }

    #[test]
    fn proc_stat_of_zombie_is_dead() {
        let stat = "42 (qemu-system-x86) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0";
        let parsed = parse_proc_stat(stat).unwrap();
        assert_eq!(parsed.start_time, 777);
        assert!(parsed.is_dead());
    }

    #[test]
    fn truncated_proc_stat_is_rejected() {
        assert_eq!(parse_proc_stat("42 (x) S 1 2 3"), None);
        assert_eq!(parse_proc_stat("no parens"), None);
        assert_eq!(parse_proc_stat(""), None);
    }

    #[test]
    fn own_stat_parses_and_identity_is_alive() {
        let me = QemuProcess::from_pid(std::process::id()).unwrap();
        assert!(me.is_alive());
        let other = QemuProcess {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !other.is_alive(),
            "a different start time is a different process"
        );
        assert!(QemuProcess::reattach(me.pid, me.start_time + 1).is_err());
    }

    #[test]
    fn pidfile_contents_parse() {
        assert_eq!(parse_pidfile("8549\n"), Some(8549));
        assert_eq!(parse_pidfile(" 12 "), Some(12));
        assert_eq!(parse_pidfile("0\n"), None);
        assert_eq!(parse_pidfile("-1"), None);
        assert_eq!(parse_pidfile("4294967295"), None);
        assert_eq!(parse_pidfile("12abc"), None);
        assert_eq!(parse_pidfile(""), None);
    }

    #[test]
    fn from_pidfile_refuses_empty_uuid_and_foreign_process() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("p.pid");
        std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
        assert!(matches!(
            QemuProcess::from_pidfile(&pidfile, ""),
            Err(ProcessError::EmptyUuid)
        ));
        assert!(matches!(
            QemuProcess::from_pidfile(&pidfile, "6f1e0a3c-0000-4000-8000-000000000000"),
            Err(ProcessError::NotOurVm { .. })
        ));
    }

    #[test]
    fn launch_refuses_a_command_line_that_does_not_daemonize() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(launch(
                Path::new("/bin/true"),
                &["-S"],
                Path::new("/tmp/x.pid"),
            ))
            .unwrap_err();
        assert!(matches!(err, ProcessError::NotDaemonizing { .. }), "{err}");
    }
}

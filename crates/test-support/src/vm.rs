//! A minimal QEMU harness for tests that need a real guest without Ferry's agent: start
//! the test guest, talk QMP, read its console, and always kill QEMU on drop.
//!
//! It launches QEMU the way Ferry does where it matters to the oracles: RAM in a
//! `memory-backend-memfd` with id `ram0` (so `memory_oracle::inject_guest_memory` finds
//! it), the serial console on a socket chardev with `logfile=` (the log fills whether or
//! not a client is attached: checked by hand with QEMU 10.0.2), virtio-blk for the disk. It is not Ferry's QEMU layer
//! (`ferry-qemu`) and deliberately shares no code with it: the oracles must not depend on
//! the code they judge.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::TestGuest;

/// The QEMU binary the harness runs.
pub const QEMU: &str = "qemu-system-x86_64";
/// Environment variable choosing the accelerator (`tcg` by default; `kvm` only on hosts
/// with real VT-x/AMD-V: a PVM `/dev/kvm` hangs standard guests).
pub const ACCEL_ENV: &str = "FERRY_TEST_ACCEL";

const INSTALL_HINT: &str =
    "install QEMU 10.0 from Debian bookworm-backports: add a sources file with \
     'Suites: bookworm-backports', then apt-get install -t bookworm-backports \
     --no-install-recommends qemu-system-x86 qemu-utils";

/// Why a VM could not be run or driven.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{QEMU} not found or not runnable; {INSTALL_HINT}")]
    QemuMissing(#[source] io::Error),
    #[error("{QEMU} is version {found}, Ferry's tests need 10.0 or newer; {INSTALL_HINT}")]
    QemuTooOld { found: String },
    #[error("cannot parse the version from `{QEMU} --version`: {output:?}")]
    QemuVersion { output: String },
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("VM {vm}: timed out after {timeout:?} waiting for {what}\n{diagnostics}")]
    Timeout {
        vm: String,
        what: String,
        timeout: Duration,
        diagnostics: String,
    },
    #[error("VM {vm}: QEMU exited ({status}) while waiting for {what}\n{diagnostics}")]
    Exited {
        vm: String,
        what: String,
        status: ExitStatus,
        diagnostics: String,
    },
    #[error("QMP {command}: {class}: {desc}")]
    Qmp {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: unexpected message {0}")]
    QmpProtocol(String),
}

fn io_op(op: impl Into<String>) -> impl FnOnce(io::Error) -> VmError {
    let op = op.into();
    move |source| VmError::Io { op, source }
}

/// Checks that QEMU is installed and at least 10.0 (7.2 corrupts memory of a guest that
/// dirties pages during pre-copy under TCG). Returns the version string.
pub fn require_qemu() -> Result<String, VmError> {
    let out = Command::new(QEMU)
        .arg("--version")
        .output()
        .map_err(VmError::QemuMissing)?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let version = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .ok_or_else(|| VmError::QemuVersion {
            output: text.clone(),
        })?
        .to_string();
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| VmError::QemuVersion {
            output: text.clone(),
        })?;
    if major < 10 {
        return Err(VmError::QemuTooOld { found: version });
    }
    Ok(version)
}

/// A synchronous QMP client (one command at a time; events are queued while waiting for
/// a reply).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects to a QMP socket, retrying until it appears (QEMU creates it shortly
    /// after starting), and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, VmError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io_op(format!("connecting to QMP at {}", path.display()))(e)),
            }
        };
        let writer = stream
            .try_clone()
            .map_err(io_op("cloning the QMP socket"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
        };
        qmp.set_timeout(Some(Duration::from_secs(30)))?;
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(VmError::QmpProtocol(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn set_timeout(&mut self, t: Option<Duration>) -> Result<(), VmError> {
        self.reader
            .get_ref()
            .set_read_timeout(t)
            .map_err(io_op("setting the QMP read timeout"))
    }

    fn read_message(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(io_op("reading from QMP"))?;
        if n == 0 {
            return Err(VmError::Io {
                op: "reading from QMP".into(),
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        serde_json::from_str(&line).map_err(|_| VmError::QmpProtocol(line))
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, VmError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(io_op(format!("sending QMP {command}")))?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                self.events.push_back(reply);
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(VmError::Qmp {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("?").to_string(),
                    desc: err["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(VmError::QmpProtocol(reply.to_string()));
        }
    }

    /// Waits for an event by name (queued ones first) and returns it.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, VmError> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i).expect("index is valid"));
        }
        let deadline = Instant::now() + timeout;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(VmError::Io {
                    op: format!("waiting {timeout:?} for QMP event {name}"),
                    source: io::ErrorKind::TimedOut.into(),
                });
            }
            self.set_timeout(Some(left))?;
            match self.read_message() {
                Ok(msg) if msg["event"] == name => break Ok(msg),
                Ok(msg) => self.events.push_back(msg),
                Err(e) => break Err(e),
            }
        };
        self.set_timeout(Some(Duration::from_secs(30)))?;
        result
    }
}

/// How to boot the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// `-kernel`/`-initrd`/`-append` with this command line (fast, flexible).
    Kernel { cmdline: String },
    /// From `disk` through SeaBIOS and syslinux, with the command line baked into
    /// `disk.raw` (`target/test-guest/cmdline`).
    Firmware,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Name used in diagnostics.
    pub name: String,
    /// Guest RAM in MiB.
    pub ram_mib: u64,
    /// Boot method.
    pub boot: Boot,
    /// Raw disk image attached as virtio-blk (the test's own copy; the guest writes).
    pub disk: Option<PathBuf>,
    /// `-incoming` argument (e.g. `defer`) to start as a migration destination.
    pub incoming: Option<String>,
}

/// A running QEMU with the test guest. Killed (and reaped) on drop.
pub struct TestVm {
    name: String,
    child: Child,
    dir: tempfile::TempDir,
    console_log: PathBuf,
    stderr_log: PathBuf,
    qmp: Qmp,
}

impl TestVm {
    /// Starts QEMU and connects QMP. The guest runs immediately unless `incoming` is set.
    pub fn launch(guest: &TestGuest, opts: &VmOptions) -> Result<TestVm, VmError> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-vm-")
            .tempdir()
            .map_err(io_op("creating the VM's temporary directory"))?;
        let console_log = dir.path().join("console.log");
        let stderr_log = dir.path().join("qemu.stderr");
        let qmp_sock = dir.path().join("qmp.sock");
        let accel = std::env::var(ACCEL_ENV).unwrap_or_else(|_| "tcg".into());

        let mut cmd = Command::new(QEMU);
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-accel", &accel])
            .args(["-machine", "pc-q35-10.0,memory-backend=ram0"])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=ram0,size={}M", opts.ram_mib),
            ])
            .args(["-m", &format!("{}M", opts.ram_mib)])
            .args(["-cpu", "qemu64", "-smp", "1"])
            .args([
                "-chardev",
                &format!(
                    "socket,id=ser0,path={},server=on,wait=off,logfile={}",
                    dir.path().join("console.sock").display(),
                    console_log.display()
                ),
            ])
            .args(["-serial", "chardev:ser0"])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp_sock.display()),
            ]);
        if let Boot::Kernel { cmdline } = &opts.boot {
            cmd.arg("-kernel")
                .arg(&guest.kernel)
                .arg("-initrd")
                .arg(&guest.initrd)
                .args(["-append", cmdline]);
        }
        if let Some(disk) = &opts.disk {
            cmd.args([
                "-drive",
                &format!("file={},if=none,id=d0,format=raw", disk.display()),
            ])
            .args(["-device", "virtio-blk-pci,drive=d0,id=vd0"]);
        }
        if let Some(incoming) = &opts.incoming {
            cmd.args(["-incoming", incoming]);
        }
        let stderr = File::create(&stderr_log).map_err(io_op("creating qemu.stderr"))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(VmError::QemuMissing)?;
        let qmp = match Qmp::connect(&qmp_sock, Duration::from_secs(10)) {
            Ok(q) => q,
            Err(e) => {
                let exited = child.try_wait().ok().flatten();
                let _ = child.kill();
                let _ = child.wait();
                let diagnostics = diagnostics(&opts.name, &console_log, &stderr_log);
                return Err(match exited {
                    Some(status) => VmError::Exited {
                        vm: opts.name.clone(),
                        what: "QMP".into(),
                        status,
                        diagnostics,
                    },
                    None => e,
                });
            }
        };
        Ok(TestVm {
            name: opts.name.clone(),
            child,
            dir,
            console_log,
            stderr_log,
            qmp,
        })
    }

    /// QEMU's process id (for `/proc/<pid>/mem` injection).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The VM's name as given at launch.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The QMP client.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// The VM's temporary directory (sockets, logs, dumps).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the console log file.
    pub fn console_log_path(&self) -> &Path {
        &self.console_log
    }

    /// The console log so far (raw bytes).
    pub fn console(&self) -> Vec<u8> {
        std::fs::read(&self.console_log).unwrap_or_default()
    }

    /// The last lines of the console and of QEMU's stderr, for failure messages.
    pub fn diagnostics(&self) -> String {
        diagnostics(&self.name, &self.console_log, &self.stderr_log)
    }

    /// Polls the console until `done` accepts the log; returns the log. Fails early if
    /// QEMU exits.
    pub fn wait_console(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<u8>, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.console();
            if done(&log) {
                return Ok(log);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(VmError::Exited {
                    vm: self.name.clone(),
                    what: what.into(),
                    status,
                    diagnostics: self.diagnostics(),
                });
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    vm: self.name.clone(),
                    what: what.into(),
                    timeout,
                    diagnostics: self.diagnostics(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Dumps guest-physical memory with QMP `pmemsave` (pause the guest first for a
    /// consistent image) and returns it.
    pub fn pmemsave(&mut self, gpa: u64, len: u64) -> Result<Vec<u8>, VmError> {
        let path = self.dir.path().join("pmem.bin");
        self.qmp.execute(
            "pmemsave",
            json!({ "val": gpa, "size": len, "filename": path.to_str().expect("temp paths are UTF-8") }),
        )?;
        let bytes = std::fs::read(&path).map_err(io_op(format!("reading {}", path.display())))?;
        let _ = std::fs::remove_file(&path);
        Ok(bytes)
    }

    /// Live-migrates this VM to `dest` (started with `incoming: Some("defer")`) over
    /// loopback, and returns the source's final `query-migrate` reply. The bandwidth cap
    /// is raised first: QEMU's default of 128 MiB/s never converges against a fast
    /// dirtying guest. Shared storage: both VMs must use the same disk file.
    pub fn migrate_to(&mut self, dest: &mut TestVm, timeout: Duration) -> Result<Value, VmError> {
        dest.qmp
            .execute("migrate-incoming", json!({ "uri": "tcp:127.0.0.1:0" }))?;
        // Port 0 lets the destination pick a free port; it reports it back.
        let incoming = dest.qmp.execute("query-migrate", json!({}))?;
        let port = incoming["socket-address"][0]["port"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                incoming["socket-address"][0]["port"]
                    .as_u64()
                    .map(|p| p.to_string())
            })
            .ok_or_else(|| VmError::QmpProtocol(format!("no listening port in {incoming}")))?;
        self.qmp.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 4u64 << 30 }),
        )?;
        self.qmp
            .execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))?;
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.qmp.execute("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => return Ok(info),
                Some("failed" | "cancelled") => {
                    return Err(VmError::Qmp {
                        command: "migrate".into(),
                        class: info["status"].as_str().unwrap_or("?").into(),
                        desc: format!(
                            "{} (destination: {})",
                            info["error-desc"].as_str().unwrap_or("no description"),
                            dest.diagnostics()
                        ),
                    })
                }
                _ if Instant::now() > deadline => {
                    let _ = self.qmp.execute("migrate_cancel", json!({}));
                    return Err(VmError::Timeout {
                        vm: self.name.clone(),
                        what: format!("migration to complete (last status {info})"),
                        timeout,
                        diagnostics: self.diagnostics(),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Waits for QEMU to exit on its own (e.g. after a guest power-off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(io_op("waiting for QEMU"))? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    vm: self.name.clone(),
                    what: "QEMU to exit".into(),
                    timeout,
                    diagnostics: self.diagnostics(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn diagnostics(name: &str, console_log: &Path, stderr_log: &Path) -> String {
    let tail = |path: &Path, n: usize| {
        let text =
            String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).replace('\r', "");
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    };
    format!(
        "--- {name} console (last 40 lines) ---\n{}\n--- {name} qemu stderr ---\n{}",
        tail(console_log, 40),
        tail(stderr_log, 20)
    )
}

impl Drop for TestVm {
    fn drop(&mut self) {
        // SIGKILL: a test VM has nothing worth shutting down cleanly, and a hung QEMU
        // must not outlive the test (G2 applies to tests too).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_connect_to_nothing_times_out_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("none.sock");
        let err = Qmp::connect(&sock, Duration::from_millis(50))
            .err()
            .expect("no socket");
        assert!(err.to_string().contains("none.sock"), "{err}");
    }

    #[test]
    fn qemu_errors_name_the_fix() {
        let err = VmError::QemuTooOld {
            found: "7.2.0".into(),
        };
        assert!(err.to_string().contains("bookworm-backports"));
    }
}

//! Harness for Ferry's end-to-end tests: a local cluster in a temporary
//! folder, driven through the real `ferry` and `ferryd` binaries exactly as a
//! user would, torn down (every QEMU and ferryd ended) when the test ends,
//! whether it passed or not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
pub mod invariants;

/// The folder cargo put the binaries in (`target/debug`), found from the test
/// binary's own path (`target/debug/deps/…`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps folder");
    deps.parent().expect("profile folder").to_path_buf()
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, \
         which scripts/test.sh does)",
        path.display()
    );
    path
}

/// What one `ferry` invocation did.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Parses stdout as JSON, failing the test with the output if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "ferry did not print JSON ({e}):\nstdout: {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// A local cluster in a temporary folder.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// Extra environment for every `ferry` run.
    env: Vec<(String, String)>,
    /// ferryd processes this harness started itself (not through `local
    /// up`): reaped when the cluster goes down.
    children: std::sync::Mutex<Vec<std::process::Child>>,
    /// Set once the test took the cluster down itself.
    down: std::sync::atomic::AtomicBool,
}

impl Cluster {
    /// `ferry local up --hosts N` in a new temporary folder.
    pub fn up(hosts: usize) -> Cluster {
        Cluster::up_with(hosts, &[])
    }

    /// `ferry local up --netns --hosts N`: every host in a network namespace
    /// of its own (needs root).
    pub fn up_netns(hosts: usize) -> Cluster {
        assert!(
            nix::unistd::geteuid().is_root(),
            "a namespace cluster needs root (network namespaces, veths, a bridge); \
             run the suite as root"
        );
        Cluster::up_with(hosts, &["--netns"])
    }

    fn up_with(hosts: usize, flags: &[&str]) -> Cluster {
        ferry_test_support::guest::TestGuest::locate().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("ferry-e2e-")
            .tempdir()
            .expect("temporary folder");
        let cluster = Cluster {
            dir,
            env: Vec::new(),
            children: std::sync::Mutex::new(Vec::new()),
            down: std::sync::atomic::AtomicBool::new(false),
        };
        let hosts = hosts.to_string();
        let mut args = vec!["local", "up", "--hosts", &hosts];
        args.extend_from_slice(flags);
        cluster.ferry_ok(&args);
        cluster
    }

    /// `ferry local down --purge`, asserting it succeeds; the cluster is
    /// then gone (the drop does nothing more).
    pub fn down_purge(&self) {
        self.ferry_ok(&["local", "down", "--purge"]);
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn client_config(&self) -> PathBuf {
        self.dir().join("ferry.toml")
    }

    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.dir().join("hosts").join(host)
    }

    pub fn datastore(&self, host: &str, name: &str) -> PathBuf {
        self.host_dir(host).join("datastores").join(name)
    }

    /// Runs `ferry ARGS` inside network namespace `netns` (`ip netns
    /// exec`), e.g. a client namespace on the guest LAN.
    pub fn ferry_in_netns(&self, netns: &str, args: &[&str]) -> Run {
        let output = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(binary("ferry"))
            .args(args)
            .env("FERRY_LOCAL_DIR", self.dir())
            .env("FERRY_CONFIG", self.client_config())
            .env("FERRYD", binary("ferryd"))
            .output()
            .expect("ip netns exec runs");
        Run {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs `ferry ARGS` against this cluster.
    pub fn ferry(&self, args: &[&str]) -> Run {
        let output = Command::new(binary("ferry"))
            .args(args)
            .env("FERRY_LOCAL_DIR", self.dir())
            .env("FERRY_CONFIG", self.client_config())
            .env("FERRYD", binary("ferryd"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("ferry runs");
        Run {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs `ferry ARGS` with extra environment variables (e.g. `TMPDIR`).
    pub fn ferry_with_env(&self, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Run {
        let output = Command::new(binary("ferry"))
            .args(args)
            .env("FERRY_LOCAL_DIR", self.dir())
            .env("FERRY_CONFIG", self.client_config())
            .env("FERRYD", binary("ferryd"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
            .output()
            .expect("ferry runs");
        Run {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs `ferry ARGS` and fails the test (with both outputs and the
    /// cluster's logs) unless it succeeds.
    pub fn ferry_ok(&self, args: &[&str]) -> Run {
        let run = self.ferry(args);
        if !run.success {
            panic!(
                "`ferry {}` failed:\nstdout: {}\nstderr: {}\n{}",
                args.join(" "),
                run.stdout,
                run.stderr,
                self.logs()
            );
        }
        run
    }

    /// Runs `ferry ARGS`, expects failure, and returns stderr.
    pub fn ferry_err(&self, args: &[&str]) -> String {
        let run = self.ferry(args);
        assert!(
            !run.success,
            "`ferry {}` should have failed but printed:\n{}",
            args.join(" "),
            run.stdout
        );
        run.stderr
    }

    /// `ferry vm show NAME -o json`.
    pub fn vm(&self, name: &str) -> Value {
        self.ferry_ok(&["vm", "show", name, "-o", "json"]).json()
    }

    /// Waits until `check` returns `Some`, failing with `what` and the logs
    /// after `timeout`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let started = Instant::now();
        loop {
            if let Some(value) = check() {
                return value;
            }
            if started.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The console log of a VM (the file QEMU appends to).
    pub fn console_log(&self, host: &str, vm: &str) -> String {
        std::fs::read_to_string(
            self.host_dir(host)
                .join("state/vms")
                .join(vm)
                .join("console.log"),
        )
        .unwrap_or_default()
    }

    /// Waits for the first heartbeat of a VM and returns its console log.
    pub fn wait_heartbeat(&self, host: &str, vm: &str) -> String {
        self.wait_for(
            &format!("a heartbeat from {vm}"),
            Duration::from_secs(90),
            || {
                let log = self.console_log(host, vm);
                log.contains("heartbeat seq=").then_some(log)
            },
        )
    }

    /// Every ferryd log and the tail of every console, for failure messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        let Ok(hosts) = std::fs::read_dir(self.dir().join("hosts")) else {
            return text;
        };
        for host in hosts.flatten() {
            let log = std::fs::read_to_string(host.path().join("ferryd.log")).unwrap_or_default();
            text.push_str(&format!(
                "---- {} ferryd.log ----\n{}\n",
                host.file_name().to_string_lossy(),
                tail(&log, 40)
            ));
            if let Ok(vms) = std::fs::read_dir(host.path().join("state/vms")) {
                for vm in vms.flatten() {
                    let console =
                        std::fs::read_to_string(vm.path().join("console.log")).unwrap_or_default();
                    text.push_str(&format!(
                        "---- {} console of {} ----\n{}\n",
                        host.file_name().to_string_lossy(),
                        vm.file_name().to_string_lossy(),
                        tail(&console, 15)
                    ));
                }
            }
        }
        text
    }

    /// The pid of a host's ferryd.
    pub fn ferryd_pid(&self, host: &str) -> i32 {
        std::fs::read_to_string(self.host_dir(host).join("ferryd.pid"))
            .expect("ferryd.pid")
            .trim()
            .parse()
            .expect("pid")
    }

    /// Writes a VM spec for the test guest into the cluster folder and
    /// returns its path. `extra` is appended verbatim (disks, NICs, …).
    pub fn write_spec(&self, file: &str, toml: &str) -> PathBuf {
        let path = self.dir().join(file);
        std::fs::write(&path, toml).expect("write spec");
        path
    }
}

impl Cluster {
    /// `ferry migrate VM --to HOST --wait -o json` plus `extra` flags; the
    /// report, whatever its status (the caller asserts).
    pub fn migrate(&self, vm: &str, to: &str, extra: &[&str]) -> (bool, Value) {
        let mut args = vec!["migrate", vm, "--to", to, "--wait", "-o", "json"];
        args.extend_from_slice(extra);
        let run = self.ferry(&args);
        let report: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
            panic!(
                "`ferry {}` printed no report ({e}):\nstdout: {}\nstderr: {}\n{}",
                args.join(" "),
                run.stdout,
                run.stderr,
                self.logs()
            )
        });
        (run.success, report)
    }

    /// Like `migrate`, failing the test unless the migration completed.
    pub fn migrate_ok(&self, vm: &str, to: &str, extra: &[&str]) -> Value {
        let (success, report) = self.migrate(vm, to, extra);
        assert!(
            success && report["status"] == "completed",
            "migration of {vm} to {to} did not complete: {report:#}\n{}",
            self.logs()
        );
        report
    }

    /// Restarts one host's ferryd with `lines` added at the top of its
    /// configuration (e.g. `reserve_memory = "1TiB"`), without `local up`
    /// (which rewrites the configuration).
    pub fn restart_ferryd_with(&self, host: &str, lines: &str) {
        self.restart_ferryd_editing(host, |text| format!("{lines}\n{text}"));
    }

    /// Restarts one host's ferryd with its configuration rewritten by
    /// `edit` (the text in, the new text out).
    pub fn restart_ferryd_editing(&self, host: &str, edit: impl FnOnce(&str) -> String) {
        self.restart_ferryd_full(host, edit, &[]);
    }

    /// Restarts one host's ferryd (stopped or already dead) with `env`
    /// added to its environment, e.g. `FAILPOINTS`.
    pub fn restart_ferryd_env(&self, host: &str, env: &[(&str, &str)]) {
        self.restart_ferryd_full(host, |text| text.to_string(), env);
    }

    /// Whether host's ferryd (as its pidfile names it) has exited.
    pub fn ferryd_exited(&self, host: &str) -> bool {
        // A ferryd this harness started is its child: reap it (a zombie
        // still answers kill(pid, 0)).
        for child in self.children.lock().unwrap().iter_mut() {
            let _ = child.try_wait();
        }
        let pid = nix::unistd::Pid::from_raw(self.ferryd_pid(host));
        nix::sys::signal::kill(pid, None).is_err()
    }

    fn restart_ferryd_full(
        &self,
        host: &str,
        edit: impl FnOnce(&str) -> String,
        env: &[(&str, &str)],
    ) {
        let dir = self.host_dir(host);
        let config = dir.join("ferryd.toml");
        let text = std::fs::read_to_string(&config).expect("ferryd.toml");
        std::fs::write(&config, edit(&text)).expect("write ferryd.toml");
        if !self.ferryd_exited(host) {
            let pid = nix::unistd::Pid::from_raw(self.ferryd_pid(host));
            // It may end on its own meanwhile: ESRCH is fine.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        self.wait_for("ferryd to exit", Duration::from_secs(20), || {
            self.ferryd_exited(host).then_some(())
        });
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join("ferryd.log"))
            .expect("ferryd.log");
        // A namespace cluster's ferryd runs in its host's namespace.
        let netns = ferry_test_support::netns::Rig::open(self.dir())
            .ok()
            .and_then(|rig| rig.host(host).ok().map(|h| h.netns.clone()));
        let mut command = match &netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns]).arg(binary("ferryd"));
                command
            }
            None => Command::new(binary("ferryd")),
        };
        let child = command
            .arg("--config")
            .arg(&config)
            .envs(env.iter().copied())
            .current_dir(&dir)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start ferryd");
        std::fs::write(dir.join("ferryd.pid"), format!("{}\n", child.id())).expect("pidfile");
        self.children.lock().unwrap().push(child);
        self.wait_for(
            &format!("{host}'s ferryd to answer"),
            Duration::from_secs(30),
            || self.ferry(&["host", "show", host]).success.then_some(()),
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.down.load(std::sync::atomic::Ordering::SeqCst) {
            // --purge: a namespace cluster also gives back its subnet.
            let run = self.ferry(&["local", "down", "--purge"]);
            if !run.success {
                eprintln!("ferry local down failed: {}", run.stderr);
            }
        }
        for mut child in self.children.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The test guest's spec as TOML: direct kernel boot, the memory and disk
/// oracles on, one disk copied from the guest's bootable disk.
pub fn guest_spec(name: &str, datastore: &str) -> String {
    guest_spec_with(
        name,
        datastore,
        &ferry_test_support::guest::ProbeConfig::default(),
    )
}

/// `guest_spec` with a probe configuration of the test's choosing.
pub fn guest_spec_with(
    name: &str,
    datastore: &str,
    probe: &ferry_test_support::guest::ProbeConfig,
) -> String {
    let guest = ferry_test_support::guest::TestGuest::locate().unwrap_or_else(|e| panic!("{e}"));
    format!(
        r#"name = "{name}"
vcpus = 1
memory = "512MiB"

[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "{cmdline}"

[[disks]]
id = "vd0"
datastore = "{datastore}"
file = "{name}.raw"
format = "raw"
image = "{disk}"
"#,
        kernel = guest.kernel.display(),
        initrd = guest.initrd.display(),
        disk = guest.disk.display(),
        cmdline = probe.kernel_cmdline(),
    )
}

/// Heartbeat numbers in a console log.
pub fn heartbeats(log: &str) -> Vec<u64> {
    ferry_test_support::heartbeat::parse(log)
}

/// A file of the workspace (e.g. `examples/demo-vm.toml`).
pub fn workspace_file(relative: &str) -> PathBuf {
    ferry_test_support::guest::workspace_root()
        .unwrap_or_else(|e| panic!("{e}"))
        .join(relative)
}

//! Shared helpers for the migration tests: the test guest as a [`VmSpec`],
//! QEMUs launched the way the agent launches them (`cmdline::build` +
//! `process::launch`), a throwaway cluster CA, and logs on failure.
//!
//! Every QEMU is owned by a [`Vm`] whose `Drop` SIGKILLs it: daemonized
//! QEMUs are not our children and would otherwise outlive a failed test.
//! When a test panics, each `Vm` prints the tail of its serial console and
//! its QMP events, so a failure shows both sides.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_core::spec::{DiskSource, VmSpec};
use ferry_pki::{write_qemu_tls_dir, ClusterCa};
use ferry_qemu::accel::{self, AccelSetting};
use ferry_qemu::cmdline::{self, LaunchContext};
use ferry_qemu::process::{self, QemuProcess};
use ferry_qemu::qmp::{Qmp, QmpEvent};
use ferry_test_support::guest::{ProbeConfig, TestGuest};
use nix::sys::signal::Signal;
use tokio::time::Instant;

/// The QEMU under test, or a panic that says how to install it. Never a
/// silent skip: a missing QEMU must fail CI loudly.
pub fn qemu_binary() -> PathBuf {
    process::find_qemu_binary().unwrap_or_else(|e| {
        panic!("the migration tests need QEMU 10.0 (qemu-system-x86 from bookworm-backports): {e}")
    })
}

/// The built test guest, or a panic that says how to build it.
pub fn guest_image() -> TestGuest {
    TestGuest::locate().unwrap_or_else(|e| panic!("the migration tests need the test guest: {e}"))
}

/// A scratch folder for one test, kept (and named in the panic output) if
/// the test fails, removed otherwise.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferry-{test}-"))
            .tempdir()
            .expect("creating a scratch folder");
        Scratch { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("scratch folder").path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "scratch folder kept for inspection: {}",
                    dir.keep().display()
                );
            }
        }
    }
}

/// A cluster CA with host certificates, written as QEMU TLS folders.
pub struct TestPki {
    pub ca: ClusterCa,
    /// host name → its QEMU TLS folder.
    pub dirs: BTreeMap<String, PathBuf>,
}

impl TestPki {
    pub fn new(root: &Path, hosts: &[&str]) -> TestPki {
        let ca = ClusterCa::create("migration-test").expect("creating a cluster CA");
        let mut dirs = BTreeMap::new();
        for host in hosts {
            let cert = ca
                .issue_host(host, &[])
                .expect("issuing a host certificate");
            let dir = root.join(format!("tls-{host}"));
            write_qemu_tls_dir(&dir, ca.cert_pem(), &cert).expect("writing a QEMU TLS folder");
            dirs.insert((*host).to_owned(), dir);
        }
        TestPki { ca, dirs }
    }

    pub fn dir(&self, host: &str) -> &Path {
        &self.dirs[host]
    }
}

/// The test guest as a Ferry VM spec: kernel boot with the probe's command
/// line, one virtio disk `vd0` at `disk`, no NIC, serial console on.
pub fn guest_spec(image: &TestGuest, disk: &Path, probe: &ProbeConfig) -> VmSpec {
    let toml = format!(
        r#"
            name = "migrant"
            memory = "{ram}MiB"
            [boot]
            kernel = "{kernel}"
            initrd = "{initrd}"
            cmdline = "{cmdline}"
            [[disks]]
            id = "vd0"
            path = "{disk}"
            format = "raw"
        "#,
        ram = probe.ram_mib,
        kernel = image.kernel.display(),
        initrd = image.initrd.display(),
        cmdline = probe.kernel_cmdline(),
        disk = disk.display(),
    );
    VmSpec::from_toml_str(&toml, Path::new("/")).unwrap_or_else(|e| panic!("test spec: {e}"))
}

/// `spec` with its disk `disk_id` moved to `path` (the destination's copy).
pub fn with_disk_path(spec: &VmSpec, disk_id: &str, path: &Path) -> VmSpec {
    let mut spec = spec.clone();
    let disk = spec
        .disks
        .iter_mut()
        .find(|d| d.id == disk_id)
        .expect("disk in spec");
    disk.source = DiskSource::Path {
        path: path.to_owned(),
    };
    spec
}

/// A sparse raw file of `len` bytes.
pub fn blank_disk(path: &Path, len: u64) {
    let file = std::fs::File::create(path).expect("creating a blank disk");
    file.set_len(len).expect("sizing a blank disk");
}

/// One QEMU with the test guest, owned by the test.
pub struct Vm {
    pub name: String,
    pub ctx: LaunchContext,
    pub process: QemuProcess,
    pub qmp: Qmp,
    events: Arc<Mutex<Vec<QmpEvent>>>,
    recorder: tokio::task::JoinHandle<()>,
}

impl Vm {
    /// Builds the command line from `spec` with `cmdline::build`, launches
    /// it daemonized with `process::launch`, connects QMP and starts
    /// recording every event.
    pub async fn launch(
        name: &str,
        spec: &VmSpec,
        dir: &Path,
        incoming: Option<&str>,
        start_paused: bool,
    ) -> Vm {
        std::fs::create_dir_all(dir).expect("creating the VM's folder");
        let choice = accel::choose(AccelSetting::Auto);
        let ctx = LaunchContext {
            qmp_socket: dir.join("qmp.sock"),
            serial_socket: dir.join("serial.sock"),
            serial_log: dir.join("console.log"),
            pidfile: dir.join("qemu.pid"),
            accel: choice.accel.as_str().to_owned(),
            datastores: BTreeMap::new(),
            incoming: incoming.map(str::to_owned),
            start_paused,
            daemonize: true,
        };
        let args = cmdline::build(spec, &ctx).expect("building the command line");
        let process = process::launch(&qemu_binary(), &args, &ctx.pidfile)
            .await
            .unwrap_or_else(|e| panic!("launching the {name} QEMU: {e}\nargs: {args:?}"));
        let qmp = match Qmp::connect_with_retry(&ctx.qmp_socket, Duration::from_secs(20)).await {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = process.kill(Signal::SIGKILL);
                panic!("connecting to the {name} QEMU's QMP: {e}");
            }
        };
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut rx = qmp.subscribe();
        let sink = events.clone();
        let recorder = tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => sink.lock().unwrap().push(e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
        });
        eprintln!(
            "{name}: QEMU pid {} ({}; {})",
            process.pid, choice.accel, choice.reason
        );
        Vm {
            name: name.to_owned(),
            ctx,
            process,
            qmp,
            events,
            recorder,
        }
    }

    /// Every event recorded so far, in order.
    pub fn events(&self) -> Vec<QmpEvent> {
        self.events.lock().unwrap().clone()
    }

    /// The recorded events called `name`.
    pub fn events_named(&self, name: &str) -> Vec<QmpEvent> {
        self.events()
            .into_iter()
            .filter(|e| e.name == name)
            .collect()
    }

    /// The serial console so far (raw bytes).
    pub fn console(&self) -> Vec<u8> {
        std::fs::read(&self.ctx.serial_log).unwrap_or_default()
    }

    /// Polls the console until `done` accepts it; panics with diagnostics
    /// on timeout or if QEMU dies.
    pub async fn wait_console(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[u8]) -> bool,
    ) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.console();
            if done(&log) {
                return log;
            }
            assert!(
                self.process.is_alive(),
                "{}: QEMU died while waiting for {what}\n{}",
                self.name,
                self.diagnostics()
            );
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {timeout:?}\n{}",
                self.name,
                self.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The tail of the console and the event names, for failure messages.
    pub fn diagnostics(&self) -> String {
        let log = String::from_utf8_lossy(&self.console()).replace('\r', "");
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(25)..].join("\n");
        let events: Vec<String> = self
            .events()
            .iter()
            .map(|e| {
                if e.data.is_null() {
                    e.name.clone()
                } else {
                    format!("{} {}", e.name, e.data)
                }
            })
            .collect();
        format!(
            "--- {} console (last 25 lines) ---\n{tail}\n--- {} QMP events ---\n{}",
            self.name,
            self.name,
            events.join("\n")
        )
    }

    /// Asks QEMU to quit and waits for the process to end.
    pub async fn quit(&self) {
        self.qmp.quit().await.expect("quit");
        self.process
            .wait_exit(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{} QEMU did not exit: {e}", self.name));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        self.recorder.abort();
        if self.process.kill(Signal::SIGKILL).unwrap_or(false) {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while self.process.is_alive() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// `qemu-img compare -U -f raw -F raw a b`: `Ok` when the guest-visible
/// contents are identical. `-U` (force share) reads images that running
/// QEMUs hold locked.
pub fn qemu_img_compare(a: &Path, b: &Path) -> Result<(), String> {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap_or_else(|e| panic!("running qemu-img (install qemu-utils 10.0): {e}"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Whole MiB, for reports.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A QEMU with no guest (`-machine none`, paused): enough for block nodes,
/// jobs, exports, objects and migration settings, and it starts in a
/// fraction of a second.
pub struct BareQemu {
    pub dir: tempfile::TempDir,
    pub process: QemuProcess,
    pub qmp: Qmp,
}

impl BareQemu {
    pub async fn launch() -> BareQemu {
        BareQemu::launch_with(None).await
    }

    /// [`BareQemu::launch`], as a migration destination when `incoming` is
    /// given (e.g. `defer`).
    pub async fn launch_with(incoming: Option<&str>) -> BareQemu {
        let dir = tempfile::Builder::new()
            .prefix("ferry-mig-bare-")
            .tempdir()
            .expect("creating a scratch folder");
        let socket = dir.path().join("qmp.sock");
        let pidfile = dir.path().join("qemu.pid");
        let args: Vec<String> = vec![
            "-machine".into(),
            "none".into(),
            "-accel".into(),
            "tcg".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-S".into(),
            "-chardev".into(),
            format!("socket,id=qmp,path={},server=on,wait=off", socket.display()),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
            "-daemonize".into(),
            "-pidfile".into(),
            pidfile.display().to_string(),
        ];
        let mut args = args;
        if let Some(incoming) = incoming {
            args.extend(["-incoming".to_owned(), incoming.to_owned()]);
        }
        let process = process::launch(&qemu_binary(), &args, &pidfile)
            .await
            .unwrap_or_else(|e| panic!("launching a bare QEMU: {e}"));
        let qmp = match Qmp::connect_with_retry(&socket, Duration::from_secs(20)).await {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = process.kill(Signal::SIGKILL);
                panic!("connecting to a bare QEMU: {e}");
            }
        };
        BareQemu { dir, process, qmp }
    }

    /// Adds a `null-co` node of `len` bytes (reads return zeroes).
    pub async fn null_node(&self, name: &str, len: u64) {
        self.qmp
            .execute(
                "blockdev-add",
                serde_json::json!({"driver": "null-co", "node-name": name, "size": len, "read-zeroes": true}),
            )
            .await
            .unwrap_or_else(|e| panic!("adding null-co node {name}: {e}"));
    }
}

impl Drop for BareQemu {
    fn drop(&mut self) {
        if self.process.kill(Signal::SIGKILL).unwrap_or(false) {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while self.process.is_alive() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

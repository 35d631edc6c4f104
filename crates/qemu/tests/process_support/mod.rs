//! Shared helpers for the integration tests that start a real QEMU.
//!
//! Every QEMU is owned by a [`QemuGuard`] whose `Drop` SIGKILLs it, so a
//! failing assertion never leaks a daemonized QEMU (they are not our
//! children and would otherwise outlive the test run).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_qemu::process::{self, QemuProcess};
use nix::sys::signal::Signal;

/// The QEMU under test, or a panic that says how to install it. Never a
/// silent skip: a missing QEMU must fail CI loudly.
pub fn qemu_binary() -> PathBuf {
    process::find_qemu_binary().unwrap_or_else(|e| {
        panic!(
            "these tests need QEMU: install qemu-system-x86 (10.0) from bookworm-backports ({e})"
        )
    })
}

pub struct QemuGuard {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub pidfile: PathBuf,
    pub uuid: String,
    pub process: Option<QemuProcess>,
}

impl QemuGuard {
    pub fn new() -> QemuGuard {
        let dir = tempfile::Builder::new()
            .prefix("ferry-qemu-test")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("qmp.sock");
        let pidfile = dir.path().join("qemu.pid");
        // A fresh uuid per test, so reattach checks are meaningful.
        let uuid = uuid::Uuid::new_v4().to_string();
        QemuGuard {
            dir,
            socket,
            pidfile,
            uuid,
            process: None,
        }
    }

    /// The minimal Ferry-shaped command line: no guest, paused, QMP on a
    /// unix socket, daemonized with a pidfile.
    pub fn args(&self) -> Vec<String> {
        self.args_with_machine(&["-machine", "none"])
    }

    /// [`QemuGuard::args`] with other machine options (e.g. a real machine
    /// type and some RAM for `pmemsave`).
    pub fn args_with_machine(&self, machine: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = machine.iter().map(|s| s.to_string()).collect();
        args.extend([
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-S".into(),
            "-accel".into(),
            "tcg".into(),
            "-uuid".into(),
            self.uuid.clone(),
            "-chardev".into(),
            format!(
                "socket,id=qmp,path={},server=on,wait=off",
                self.socket.display()
            ),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
            "-daemonize".into(),
            "-pidfile".into(),
            self.pidfile.display().to_string(),
        ]);
        args
    }

    pub async fn launch(&mut self) -> QemuProcess {
        let args = self.args();
        self.launch_args(args).await
    }

    pub async fn launch_args(&mut self, args: Vec<String>) -> QemuProcess {
        let p = process::launch(&qemu_binary(), &args, &self.pidfile)
            .await
            .expect("launching QEMU");
        self.process = Some(p);
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let process = self
            .process
            .or_else(|| QemuProcess::from_pidfile(&self.pidfile, &self.uuid).ok());
        if let Some(p) = process {
            if p.kill(Signal::SIGKILL).unwrap_or(false) {
                // Give the kernel a moment so the next test starts clean.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while p.is_alive() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// Waits for the next event called `name`, skipping others.
pub async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<ferry_qemu::qmp::QmpEvent>,
    name: &str,
) -> ferry_qemu::qmp::QmpEvent {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = rx.recv().await.expect("event stream ended");
            if e.name == name {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} event within 10 s"))
}

pub fn assert_exists(path: &Path) {
    assert!(path.exists(), "{} should exist", path.display());
}

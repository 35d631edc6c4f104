//! Launching and supervising a real daemonized QEMU.

mod process_support;

use std::time::Duration;

use ferry_qemu::process::{self, ProcessError, QemuProcess, MIN_QEMU_VERSION};
use nix::sys::signal::Signal;
use process_support::{qemu_binary, QemuGuard};

#[tokio::test]
async fn installed_qemu_is_found_and_new_enough() {
    let binary = qemu_binary();

    let version = process::check_version(&binary).await.unwrap();

    assert!(version >= MIN_QEMU_VERSION, "{version}");
}

#[tokio::test]
async fn launch_records_an_identity_matching_the_pidfile() {
    let mut qemu = QemuGuard::new();

    let p = qemu.launch().await;

    assert!(p.is_alive());
    let pid: u32 = std::fs::read_to_string(&qemu.pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(p.pid, pid);
    assert_ne!(p.pid, std::process::id());
}

#[tokio::test]
async fn a_bad_command_line_comes_back_with_qemus_own_explanation() {
    let qemu = QemuGuard::new();
    let mut args = qemu.args();
    args.insert(0, "-no-such-option".into());

    let err = process::launch(&qemu_binary(), &args, &qemu.pidfile)
        .await
        .unwrap_err();

    match &err {
        ProcessError::LaunchFailed { stderr, .. } => {
            assert!(stderr.contains("no-such-option"), "{stderr}")
        }
        other => panic!("expected LaunchFailed, got {other}"),
    }
}

#[tokio::test]
async fn reattach_by_pidfile_checks_the_vm_uuid() {
    let mut qemu = QemuGuard::new();
    let launched = qemu.launch().await;

    let found = QemuProcess::from_pidfile(&qemu.pidfile, &qemu.uuid).unwrap();
    let wrong = QemuProcess::from_pidfile(&qemu.pidfile, "0badc0de-0000-4000-8000-000000000000");

    assert_eq!(found, launched);
    assert!(
        matches!(wrong, Err(ProcessError::NotOurVm { .. })),
        "{wrong:?}"
    );
    assert_eq!(
        QemuProcess::reattach(launched.pid, launched.start_time).unwrap(),
        launched
    );
}

#[tokio::test]
async fn sigterm_then_wait_exit_sees_the_exit() {
    let mut qemu = QemuGuard::new();
    let p = qemu.launch().await;

    assert!(p.kill(Signal::SIGTERM).unwrap());
    p.wait_exit(Duration::from_secs(10)).await.unwrap();

    assert!(!p.is_alive());
    assert!(QemuProcess::reattach(p.pid, p.start_time).is_err());
}

#[tokio::test]
async fn wait_exit_times_out_while_qemu_runs() {
    let mut qemu = QemuGuard::new();
    let p = qemu.launch().await;

    let err = p.wait_exit(Duration::from_millis(200)).await.unwrap_err();

    assert!(matches!(err, ProcessError::WaitTimeout { .. }), "{err}");
    assert!(p.is_alive());
}

#[tokio::test]
async fn a_recycled_identity_is_never_signalled() {
    let mut qemu = QemuGuard::new();
    let p = qemu.launch().await;
    // Same pid, different start time: what a reused pid looks like.
    let impostor = QemuProcess {
        start_time: p.start_time.wrapping_add(1),
        ..p
    };

    assert!(!impostor.kill(Signal::SIGKILL).unwrap());

    assert!(
        p.is_alive(),
        "the real process must not have been signalled"
    );
    impostor.wait_exit(Duration::from_millis(10)).await.unwrap();
}

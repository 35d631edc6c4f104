//! The QMP client against a real QEMU 10.0 (`-machine none -S`, TCG).

mod process_support;

use std::time::Duration;

use ferry_qemu::qmp::{CloseReason, Qmp, QmpError, RunState};
use nix::sys::signal::Signal;
use process_support::{next_event, QemuGuard};
use serde_json::{json, Value};

#[tokio::test]
async fn fresh_paused_qemu_reports_prelaunch_and_its_version() {
    let mut qemu = QemuGuard::new();
    qemu.launch().await;
    let qmp = Qmp::connect(&qemu.socket).await.unwrap();

    let status = qmp.query_status().await.unwrap();

    assert_eq!(status.status, RunState::Prelaunch);
    assert!(!status.running);
    assert!(qmp.version().major >= 10, "{:?}", qmp.version());
    assert_eq!(qmp.query_version().await.unwrap(), qmp.version());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_executes_from_many_tasks_all_get_their_own_reply() {
    let mut qemu = QemuGuard::new();
    qemu.launch().await;
    let qmp = Qmp::connect(&qemu.socket).await.unwrap();

    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let qmp = qmp.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let v = qmp.execute("query-version", Value::Null).await.unwrap();
                    assert!(v["qemu"]["major"].as_u64().unwrap() >= 10);
                } else {
                    let v = qmp.execute("query-status", Value::Null).await.unwrap();
                    assert_eq!(v["status"], "prelaunch");
                }
            })
        })
        .collect();

    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn cont_and_stop_emit_resume_and_stop_events_with_timestamps() {
    let mut qemu = QemuGuard::new();
    qemu.launch().await;
    let qmp = Qmp::connect(&qemu.socket).await.unwrap();
    let mut events = qmp.subscribe();
    let before = std::time::SystemTime::now() - Duration::from_secs(5);

    qmp.cont().await.unwrap();
    let resume = next_event(&mut events, "RESUME").await;
    assert!(qmp.query_status().await.unwrap().running);
    qmp.stop().await.unwrap();
    let stop = next_event(&mut events, "STOP").await;

    let status = qmp.query_status().await.unwrap();
    assert_eq!(status.status, RunState::Paused);
    assert!(resume.timestamp <= stop.timestamp);
    let resumed_at = resume.timestamp.to_system_time().expect("a real timestamp");
    assert!(resumed_at >= before, "{resume:?}");
}

#[tokio::test]
async fn a_rejected_command_carries_qemus_class_and_description() {
    let mut qemu = QemuGuard::new();
    qemu.launch().await;
    let qmp = Qmp::connect(&qemu.socket).await.unwrap();

    let err = qmp.execute("no-such-command", json!({})).await.unwrap_err();

    match err {
        QmpError::Command { class, desc, .. } => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a command error, got {other}"),
    }
    // The connection survives a rejected command.
    assert_eq!(
        qmp.query_status().await.unwrap().status,
        RunState::Prelaunch
    );
}

#[tokio::test]
async fn quit_closes_the_connection_and_the_process_exits() {
    let mut qemu = QemuGuard::new();
    let process = qemu.launch().await;
    let qmp = Qmp::connect(&qemu.socket).await.unwrap();
    let mut events = qmp.subscribe();

    qmp.quit().await.unwrap();

    let shutdown = next_event(&mut events, "SHUTDOWN").await;
    assert_eq!(shutdown.data["reason"], "host-qmp-quit");
    let reason = tokio::time::timeout(Duration::from_secs(10), qmp.closed())
        .await
        .expect("connection should close after quit");
    assert_eq!(reason, CloseReason::Eof);
    process.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(!process.is_alive());
    assert!(matches!(
        qmp.query_status().await,
        Err(QmpError::Closed { .. })
    ));
}

#[tokio::test]
async fn sigkill_is_seen_by_is_alive_and_by_the_connection() {
    let mut qemu = QemuGuard::new();
    let process = qemu.launch().await;
    let qmp = Qmp::connect(&qemu.socket).await.unwrap();

    assert!(process.kill(Signal::SIGKILL).unwrap());

    let reason = tokio::time::timeout(Duration::from_secs(10), qmp.closed())
        .await
        .expect("connection should close when QEMU dies");
    assert!(
        matches!(reason, CloseReason::Eof | CloseReason::Io(_)),
        "{reason}"
    );
    process.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(!process.is_alive());
    assert!(
        !process.kill(Signal::SIGKILL).unwrap(),
        "already dead: nothing signalled"
    );
}

#[tokio::test]
async fn connect_with_retry_waits_for_a_socket_that_appears_later() {
    let mut qemu = QemuGuard::new();
    let socket = qemu.socket.clone();
    let connecting =
        tokio::spawn(
            async move { Qmp::connect_with_retry(&socket, Duration::from_secs(20)).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;

    qemu.launch().await;

    let qmp = connecting.await.unwrap().unwrap();
    assert_eq!(
        qmp.query_status().await.unwrap().status,
        RunState::Prelaunch
    );
}

#[tokio::test]
async fn a_second_client_is_not_greeted_while_the_first_is_connected() {
    let mut qemu = QemuGuard::new();
    qemu.launch().await;
    let first = Qmp::connect(&qemu.socket).await.unwrap();

    let second = Qmp::connect_timeout(&qemu.socket, Duration::from_millis(500)).await;

    assert!(
        matches!(&second, Err(QmpError::Timeout { .. })),
        "{second:?}"
    );
    drop(first);
    // Once the first client leaves, QEMU accepts the next one.
    let third = Qmp::connect_with_retry(&qemu.socket, Duration::from_secs(10))
        .await
        .unwrap();
    third.query_status().await.unwrap();
}

#[tokio::test]
async fn pmemsave_writes_guest_memory_to_a_file() {
    let mut qemu = QemuGuard::new();
    let args = qemu.args_with_machine(&["-machine", "pc-q35-10.0", "-m", "16M"]);
    qemu.launch_args(args).await;
    let qmp = Qmp::connect(&qemu.socket).await.unwrap();
    let dump = qemu.path("mem.bin");

    qmp.pmemsave(0, 8192, &dump).await.unwrap();

    assert_eq!(std::fs::metadata(&dump).unwrap().len(), 8192);
}

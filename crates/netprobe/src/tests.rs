//! Tests against a local echo server on 127.0.0.1 whose behaviour per line is scripted.

use super::*;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;

/// What the scripted server does with line `n` (1-based).
enum Step {
    Echo,
    /// Stops reading and answering for a while, then echoes the line.
    Pause(Duration),
    /// Echoes the line with one byte changed.
    Corrupt,
    /// Closes its side of the connection without answering (FIN only: it reads on, so
    /// no unread data turns the close into a reset).
    Close,
    /// Aborts the connection without answering (RST).
    Reset,
}

fn server(script: impl Fn(u64) -> Step + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut n = 0;
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            n += 1;
            match script(n) {
                Step::Echo => {}
                Step::Pause(d) => std::thread::sleep(d),
                Step::Corrupt => line[0] ^= 0x20,
                Step::Close => {
                    let _ = writer.shutdown(std::net::Shutdown::Write);
                    let _ = std::io::copy(&mut reader, &mut std::io::sink());
                    return;
                }
                Step::Reset => {
                    let linger = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    // SAFETY: setsockopt with a valid linger struct on an open socket.
                    let rc = unsafe {
                        libc::setsockopt(
                            writer.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            (&linger as *const libc::linger).cast(),
                            std::mem::size_of::<libc::linger>() as libc::socklen_t,
                        )
                    };
                    assert_eq!(rc, 0);
                    return;
                }
            }
            if writer.write_all(&line).is_err() {
                return;
            }
        }
    });
    addr
}

fn probe(addr: SocketAddr) -> EchoProbe {
    EchoProbe::start(EchoConfig::new(addr)).unwrap()
}

/// Waits up to 5 s for the probe to see its connection end.
fn wait_for_error(p: &EchoProbe) -> EchoReport {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = p.snapshot();
        if r.connection_error.is_some() || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn clean_run_echoes_everything() {
    let p = probe(server(|_| Step::Echo));
    assert_eq!(p.address().ip().to_string(), "127.0.0.1");
    std::thread::sleep(Duration::from_millis(300));
    let live = p.snapshot();
    assert!(live.messages_sent > 0, "{live}");
    let r = p.stop();
    assert!(r.is_clean(), "{r}");
    assert!(r.messages_sent >= 10, "5 ms interval over 300 ms: {r}");
    assert_eq!(r.messages_echoed, r.messages_sent, "{r}");
    assert!(r.messages_sent >= live.messages_sent);
    assert!(r.duration_ms >= 300.0, "{r}");
    assert!(r.max_gap_ms < 250.0, "no pause, no big gap: {r}");
    assert!(
        r.max_gap_started_ms + r.max_gap_ms <= r.duration_ms + 1.0,
        "{r}"
    );
}

#[test]
fn a_pause_shows_as_the_longest_gap() {
    let p = probe(server(|n| {
        if n == 20 {
            Step::Pause(Duration::from_millis(300))
        } else {
            Step::Echo
        }
    }));
    std::thread::sleep(Duration::from_millis(800));
    let r = p.stop();
    assert!(r.max_gap_ms >= 250.0, "{r}");
    assert!(r.max_gap_started_ms > 0.0, "the gap is mid-run: {r}");
    assert!(
        r.max_gap_started_ms + r.max_gap_ms <= r.duration_ms + 1.0,
        "{r}"
    );
    assert!(r.is_clean(), "a pause loses nothing: {r}");
}

#[test]
fn a_silent_peer_does_not_make_the_sender_burst() {
    // The server answers nothing for 500 ms: at a 5 ms interval that would be 100
    // messages, but the window caps what is outstanding.
    let p = probe(server(|n| {
        if n == 1 {
            Step::Pause(Duration::from_millis(500))
        } else {
            Step::Echo
        }
    }));
    std::thread::sleep(Duration::from_millis(400));
    let during = p.snapshot();
    assert!(during.messages_sent <= MAX_IN_FLIGHT as u64, "{during}");
    assert_eq!(during.messages_echoed, 0, "{during}");
    assert!(during.max_gap_ms >= 350.0, "the open gap is live: {during}");
    assert_eq!(during.max_gap_started_ms, 0.0, "{during}");
    std::thread::sleep(Duration::from_millis(400));
    let r = p.stop();
    assert!(r.is_clean(), "{r}");
    assert!(r.max_gap_ms >= 450.0, "{r}");
    // After the pause the schedule resumes; it does not try to make up for the slots it
    // skipped (800 ms at 5 ms is at most 160 slots).
    assert!(r.messages_sent <= 170, "{r}");
}

#[test]
fn a_corrupted_echo_is_counted() {
    let p = probe(server(|n| if n == 10 { Step::Corrupt } else { Step::Echo }));
    std::thread::sleep(Duration::from_millis(300));
    let r = p.stop();
    assert_eq!(r.messages_corrupted, 1, "{r}");
    assert_eq!(r.messages_echoed + 1, r.messages_sent, "{r}");
    assert_eq!(r.messages_lost, 0, "{r}");
    assert_eq!(r.connection_error, None);
    assert!(!r.is_clean());
}

#[test]
fn a_closed_connection_is_reported_with_the_lost_messages() {
    let p = probe(server(|n| if n == 10 { Step::Close } else { Step::Echo }));
    let during = wait_for_error(&p);
    let err = during.connection_error.clone().expect("EOF noticed");
    assert!(err.contains("EOF") && err.contains("127.0.0.1"), "{err}");
    assert!(
        during.messages_lost >= 1,
        "message 10 was never answered: {during}"
    );
    let r = p.stop();
    assert_eq!(r.connection_error.as_deref(), Some(err.as_str()));
    assert_eq!(r.messages_echoed, 9, "{r}");
    assert_eq!(r.messages_echoed + r.messages_lost, r.messages_sent, "{r}");
    assert!(!r.is_clean());
}

#[test]
fn a_reset_is_reported_with_its_cause() {
    let p = probe(server(|n| if n == 5 { Step::Reset } else { Step::Echo }));
    let r = wait_for_error(&p);
    let err = r.connection_error.expect("reset noticed");
    assert!(err.starts_with("reading from 127.0.0.1:"), "{err}");
    assert!(
        err.contains("reset"),
        "the io::Error is in the chain: {err}"
    );
    // The gap of a dead connection keeps growing until the probe is stopped.
    std::thread::sleep(Duration::from_millis(200));
    let r = p.stop();
    assert!(r.max_gap_ms >= 150.0, "{r}");
}

#[test]
fn a_missing_namespace_fails_naming_the_path() {
    let path = PathBuf::from("/run/netns/ferry-netprobe-test-does-not-exist");
    let err = EchoProbe::start(EchoConfig {
        netns: Some(path.clone()),
        ..EchoConfig::new("198.18.0.10:7000".parse().unwrap())
    })
    .unwrap_err();
    assert!(matches!(err, ProbeError::NetnsOpen { .. }), "{err:?}");
    let chain = error_chain(&err);
    assert!(chain.contains(&*path.to_string_lossy()), "{chain}");
    assert!(chain.contains("No such file"), "{chain}");
}

#[test]
fn a_file_that_is_not_a_namespace_is_refused() {
    let err = EchoProbe::start(EchoConfig {
        netns: Some("/dev/null".into()),
        ..EchoConfig::new("198.18.0.10:7000".parse().unwrap())
    })
    .unwrap_err();
    // EINVAL as root, EPERM otherwise: either way setns refuses it.
    assert!(matches!(err, ProbeError::NetnsEnter { .. }), "{err:?}");
    assert!(err.to_string().contains("/dev/null"), "{err}");
}

#[test]
fn a_refused_connection_fails_start() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = EchoProbe::start(EchoConfig::new(addr)).unwrap_err();
    assert!(matches!(err, ProbeError::Connect { .. }), "{err:?}");
    let chain = error_chain(&err);
    assert!(
        chain.contains(&addr.to_string()) && chain.contains("refused"),
        "{chain}"
    );
}

#[test]
fn zero_interval_is_refused() {
    let err = EchoProbe::start(EchoConfig {
        interval: Duration::ZERO,
        ..EchoConfig::new("127.0.0.1:1".parse().unwrap())
    })
    .unwrap_err();
    assert!(matches!(err, ProbeError::InvalidConfig(_)), "{err:?}");
}

#[test]
fn dropping_a_probe_stops_its_thread_quickly() {
    let p = probe(server(|n| {
        if n == 1 {
            Step::Pause(Duration::from_secs(10))
        } else {
            Step::Echo
        }
    }));
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    drop(p);
    assert!(t.elapsed() < Duration::from_millis(500), "no drain on drop");
}

#[test]
fn stop_gives_up_draining_after_the_timeout() {
    let p = probe(server(|n| {
        if n == 1 {
            Step::Pause(Duration::from_secs(10))
        } else {
            Step::Echo
        }
    }));
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let r = p.stop();
    let waited = t.elapsed();
    assert!(waited >= DRAIN_TIMEOUT && waited < DRAIN_TIMEOUT + Duration::from_secs(1));
    assert_eq!(r.messages_lost, r.messages_sent, "{r}");
    assert_eq!(r.connection_error, None);
    assert!(!r.is_clean());
}

#[test]
fn report_serialises_with_the_documented_fields() {
    let r = EchoReport {
        address: "198.18.0.10:7000".into(),
        messages_sent: 3,
        messages_echoed: 2,
        messages_lost: 1,
        messages_corrupted: 0,
        max_gap_ms: 12.5,
        max_gap_started_ms: 100.0,
        duration_ms: 1000.0,
        connection_error: Some("reading from x: reset".into()),
    };
    let v = serde_json::to_value(&r).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "address",
            "connection_error",
            "duration_ms",
            "max_gap_ms",
            "max_gap_started_ms",
            "messages_corrupted",
            "messages_echoed",
            "messages_lost",
            "messages_sent",
        ]
    );
    let back: EchoReport = serde_json::from_value(v).unwrap();
    assert_eq!(back, r);
    assert!(!r.is_clean());
    let clean = EchoReport {
        messages_lost: 0,
        connection_error: None,
        ..r.clone()
    };
    assert!(clean.is_clean());
    assert!(!EchoReport {
        messages_echoed: 0,
        ..clean
    }
    .is_clean());
}

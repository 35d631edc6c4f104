//! Reading the test guest's serial console as it arrives, with host-side
//! timestamps.
//!
//! The probe's heartbeat is paced by the guest's clock, and that clock stops
//! while the guest is paused: numbered lines alone cannot show a pause. The
//! time each line *arrives* on the host can. A [`SerialTap`] connects to a
//! QEMU serial chardev socket (`server=on,wait=off`: QEMU drops output while
//! no one is connected, and keeps writing its `logfile=` regardless) and
//! stamps every complete line with the moment the read that completed it
//! returned.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// Milliseconds since the benchmark started: one clock for every tap.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Clock {
        Clock(Instant::now())
    }

    pub fn ms(&self) -> f64 {
        self.0.elapsed().as_secs_f64() * 1000.0
    }
}

/// The probe lines the benchmark cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeLine {
    Heartbeat(u64),
    /// `probe-ready …`: set-up done, the working set is written.
    Ready,
    /// `mem-oracle pass=K fails=F`.
    MemPass {
        pass: u64,
        fails: u64,
    },
    /// `oracle-fail …`: the working set was found corrupted.
    OracleFail,
    /// `probe-net ip=… echo_port=…`: `eth0` is configured and the echo
    /// service listens.
    NetReady,
    /// `probe-error net: …`: the guest could not set up its network.
    NetError,
    /// `disk-flushed seq=N`: the disk oracle's record N is written and
    /// flushed (`fdatasync`) — the guest's disk writes.
    DiskFlushed(u64),
}

/// Parses one console line; anything else (kernel messages, garbled lines)
/// is `None`. Only exact forms count: a kernel message cut into a heartbeat
/// must not yield a wrong number.
pub fn parse_line(line: &str) -> Option<ProbeLine> {
    let line = line.trim_end_matches(['\r', '\n']);
    if let Some(n) = line.strip_prefix("heartbeat seq=") {
        return n.parse().ok().map(ProbeLine::Heartbeat);
    }
    if let Some(n) = line.strip_prefix("disk-flushed seq=") {
        return n.parse().ok().map(ProbeLine::DiskFlushed);
    }
    if line.starts_with("probe-ready ") {
        return Some(ProbeLine::Ready);
    }
    if let Some(rest) = line.strip_prefix("mem-oracle pass=") {
        let (pass, fails) = rest.split_once(" fails=")?;
        return Some(ProbeLine::MemPass {
            pass: pass.parse().ok()?,
            fails: fails.parse().ok()?,
        });
    }
    if line.starts_with("oracle-fail ") {
        return Some(ProbeLine::OracleFail);
    }
    if line.starts_with("probe-net ") {
        return Some(ProbeLine::NetReady);
    }
    if line.starts_with("probe-error net: ") {
        return Some(ProbeLine::NetError);
    }
    None
}

/// Splits a byte stream into lines across reads.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Most a line may grow without a newline before it is dropped (a
    /// console is outside input; it gets a cap).
    const MAX_LINE: usize = 64 << 10;

    /// Feeds one read; returns the lines it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &byte in chunk {
            if byte == b'\n' {
                lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                self.partial.clear();
            } else if self.partial.len() < Self::MAX_LINE {
                self.partial.push(byte);
            }
        }
        lines
    }
}

/// One recognised line and when it arrived.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    pub at_ms: f64,
    pub line: ProbeLine,
}

#[derive(Debug, Default)]
struct TapState {
    arrivals: Vec<Arrival>,
    connected_at_ms: Option<f64>,
    closed: bool,
}

/// A reader attached to one QEMU's serial socket.
pub struct SerialTap {
    state: Arc<Mutex<TapState>>,
    task: tokio::task::JoinHandle<()>,
}

impl SerialTap {
    /// Connects to `socket`, retrying every 2 ms for up to `wait` (a
    /// destination's socket appears only when its QEMU starts), and records
    /// lines until QEMU closes the socket or the tap is dropped.
    pub fn spawn(socket: PathBuf, clock: Clock, wait: Duration) -> SerialTap {
        let state = Arc::new(Mutex::new(TapState::default()));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + wait;
            let mut stream = loop {
                match UnixStream::connect(&socket).await {
                    Ok(stream) => break stream,
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(_) => {
                        shared.lock().expect("tap state").closed = true;
                        return;
                    }
                }
            };
            shared.lock().expect("tap state").connected_at_ms = Some(clock.ms());
            let mut splitter = LineSplitter::default();
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let at_ms = clock.ms();
                let lines = splitter.push(&buf[..n]);
                let mut state = shared.lock().expect("tap state");
                state.arrivals.extend(
                    lines
                        .iter()
                        .filter_map(|l| parse_line(l))
                        .map(|line| Arrival { at_ms, line }),
                );
            }
            shared.lock().expect("tap state").closed = true;
        });
        SerialTap { state, task }
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state.lock().expect("tap state").arrivals.clone()
    }

    pub fn connected_at_ms(&self) -> Option<f64> {
        self.state.lock().expect("tap state").connected_at_ms
    }

    /// Waits until `done` accepts the arrivals so far, or `timeout`.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&[Arrival]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let state = self.state.lock().expect("tap state");
                if done(&state.arrivals) {
                    return true;
                }
                if state.closed {
                    return false;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SerialTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_probe_lines_are_recognised() {
        assert_eq!(
            parse_line("heartbeat seq=42\r"),
            Some(ProbeLine::Heartbeat(42))
        );
        assert_eq!(parse_line("heartbeat seq=4[  1.0] kernel"), None);
        assert_eq!(
            parse_line("mem-oracle pass=3 fails=0"),
            Some(ProbeLine::MemPass { pass: 3, fails: 0 })
        );
        assert_eq!(
            parse_line("probe-ready version=1 hb_ms=10"),
            Some(ProbeLine::Ready)
        );
        assert_eq!(
            parse_line("oracle-fail mem page=1 offset=0 expected=0x1 got=0x2"),
            Some(ProbeLine::OracleFail)
        );
        assert_eq!(
            parse_line("probe-net ip=198.18.0.10/15 echo_port=7000\r"),
            Some(ProbeLine::NetReady)
        );
        assert_eq!(
            parse_line("probe-error net: no eth0 after 10 s"),
            Some(ProbeLine::NetError)
        );
        assert_eq!(
            parse_line("disk-flushed seq=733\r"),
            Some(ProbeLine::DiskFlushed(733))
        );
        assert_eq!(parse_line("disk-flushed seq=7[  3.1] kernel"), None);
        assert_eq!(parse_line("probe-error mem: no range"), None);
        assert_eq!(parse_line("[    0.000000] Linux version"), None);
    }

    #[test]
    fn lines_cut_across_reads_are_rejoined() {
        let mut splitter = LineSplitter::default();
        assert!(splitter.push(b"heartbeat se").is_empty());
        assert_eq!(
            splitter.push(b"q=7\r\nheartbeat seq=8\r\nhea"),
            ["heartbeat seq=7\r", "heartbeat seq=8\r"]
        );
        assert_eq!(splitter.push(b"rtbeat seq=9\n"), ["heartbeat seq=9"]);
    }
}

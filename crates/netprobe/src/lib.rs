//! Network-observed downtime: what a TCP client of a migrating guest sees.
//!
//! A live migration pauses the guest for the final switchover, and the guest's network
//! has to come back on the destination (the NIC's state moves with the guest, the switch
//! has to learn the new port from QEMU's announcements). The guest-side oracles
//! (heartbeat, memory, disk) say whether the guest survived; they cannot say whether a
//! client talking to it noticed. [`EchoProbe`] is that client: it holds one TCP
//! connection to the test guest's echo service (`ferry.ip` / `ferry.echo_port`, see
//! `guest/README.md`), sends a short numbered line every few milliseconds and checks
//! every echo. The **network-observed downtime** is the longest gap between two
//! consecutive echoes received ([`EchoReport::max_gap_ms`]): while the guest is paused,
//! or its packets go to the wrong host, nothing comes back; TCP retransmits the queued
//! lines once the path works again and the echoes resume. Its resolution is the send
//! interval. A migration that keeps the network is one where the connection survives, no
//! line is lost or altered, and the gap stays small ([`EchoReport::is_clean`] checks the
//! first three).
//!
//! Why a plain thread and not tokio: the CLI, the test harness and the benchmark all use
//! this, some from synchronous code, and it has to work without a runtime; and the probe
//! often has to run inside a test's network namespace, which `setns(2)` switches for the
//! calling *thread* only. A dedicated thread enters the namespace, connects and then does
//! all the I/O on a non-blocking socket with `ppoll`, so the caller's threads stay where
//! they are and a silent peer never stalls the sending schedule.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Default time between two messages.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(5);
/// Default limit for establishing the connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many messages are unanswered at once; while the window is full the
/// probe skips its sending slots (skipped slots are not counted as sent). A paused guest
/// therefore does not come back to a burst, and the gap is measured all the same.
pub const MAX_IN_FLIGHT: usize = 64;
/// How long [`EchoProbe::stop`] waits for outstanding echoes before counting them lost.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer that sends this much without a newline is not an echo service.
const MAX_LINE: usize = 64 * 1024;
/// The probe thread looks at the stop flag at least this often.
const STOP_POLL: Duration = Duration::from_millis(20);

/// What to probe and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoConfig {
    /// The echo service, e.g. `198.18.0.10:7000`.
    pub address: SocketAddr,
    /// Time between two messages ([`DEFAULT_INTERVAL`]); the resolution of the gap.
    pub interval: Duration,
    /// A network-namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`) the probe's
    /// thread enters before connecting; `None` stays in the caller's namespace.
    pub netns: Option<PathBuf>,
    /// Limit for establishing the connection ([`DEFAULT_CONNECT_TIMEOUT`]).
    pub connect_timeout: Duration,
}

impl EchoConfig {
    /// The defaults for `address`: 5 ms interval, 5 s connect timeout, no namespace.
    pub fn new(address: SocketAddr) -> EchoConfig {
        EchoConfig {
            address,
            interval: DEFAULT_INTERVAL,
            netns: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Why [`EchoProbe::start`] failed. Errors after the connection is established are not
/// errors of `start`: they end up in [`EchoReport::connection_error`].
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("invalid echo probe configuration: {0}")]
    InvalidConfig(&'static str),
    #[error("opening network namespace {}", path.display())]
    NetnsOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {} (setns CLONE_NEWNET)", path.display())]
    NetnsEnter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("connecting to echo service {address} (timeout {timeout:?})")]
    Connect {
        address: SocketAddr,
        timeout: Duration,
        #[source]
        source: io::Error,
    },
    #[error("setting up the connection to {address}")]
    Socket {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("starting the echo probe thread")]
    Spawn(#[source] io::Error),
    #[error("the echo probe thread ended before connecting (panicked?)")]
    ThreadDied,
}

/// What ended a connection early, recorded as [`EchoReport::connection_error`].
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("reading from {address}")]
    Read {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("writing to {address}")]
    Write {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{address} closed the connection (EOF) with {outstanding} message(s) unanswered")]
    Eof {
        address: SocketAddr,
        outstanding: usize,
    },
    #[error("{address} sent {MAX_LINE} bytes without a newline; not an echo service?")]
    LineTooLong { address: SocketAddr },
    #[error("waiting for the socket to {address}")]
    Poll {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// An error and all its sources, joined with `": "`.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// What the client saw. Times are milliseconds; offsets count from the moment the
/// connection was established.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EchoReport {
    /// The echo service's address.
    pub address: String,
    /// Messages written to the connection.
    pub messages_sent: u64,
    /// Echoes that came back equal to the message they answer, in order.
    pub messages_echoed: u64,
    /// Messages never answered: those outstanding when the connection ended, or still
    /// outstanding after [`EchoProbe::stop`]'s drain. 0 while the connection is alive.
    pub messages_lost: u64,
    /// Echoed lines that differ from the message they answer in order (altered, out of
    /// order, duplicated) plus lines nobody asked for.
    pub messages_corrupted: u64,
    /// The network-observed downtime: the longest time between two consecutive echoes
    /// (the first gap starts at the connection; an unanswered gap still open runs until
    /// now, or until sending stopped).
    pub max_gap_ms: f64,
    /// When that gap started (the echo before it, or the connection).
    pub max_gap_started_ms: f64,
    /// How long the probe ran: from the connection until it was stopped (or now).
    pub duration_ms: f64,
    /// The error that ended the connection, with its whole chain (reset, EOF, timeout).
    pub connection_error: Option<String>,
}

impl EchoReport {
    /// No loss, no corruption, no connection error, and at least one echo.
    pub fn is_clean(&self) -> bool {
        self.messages_lost == 0
            && self.messages_corrupted == 0
            && self.connection_error.is_none()
            && self.messages_echoed > 0
    }
}

impl fmt::Display for EchoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: sent={} echoed={} lost={} corrupted={} max_gap={:.1}ms at {:.1}ms duration={:.1}ms",
            self.address,
            self.messages_sent,
            self.messages_echoed,
            self.messages_lost,
            self.messages_corrupted,
            self.max_gap_ms,
            self.max_gap_started_ms,
            self.duration_ms
        )?;
        if let Some(e) = &self.connection_error {
            write!(f, " error={e}")?;
        }
        Ok(())
    }
}

/// Counters shared between the probe thread and its owner. Offsets are from
/// [`Shared::start`].
#[derive(Debug, Default)]
struct Stats {
    sent: u64,
    echoed: u64,
    corrupted: u64,
    lost: u64,
    max_gap: Duration,
    max_gap_start: Duration,
    last_echo: Duration,
    /// When the owner asked to stop; sending stops then.
    stop_requested: Option<Duration>,
    connection_error: Option<String>,
}

#[derive(Debug)]
struct Shared {
    address: SocketAddr,
    /// When the connection was established.
    start: Instant,
    stats: Mutex<Stats>,
    stop: AtomicBool,
    /// Skip the drain (set by `Drop`).
    abort: AtomicBool,
}

impl Shared {
    fn stats(&self) -> MutexGuard<'_, Stats> {
        // A panic elsewhere cannot leave the counters inconsistent enough to matter.
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self) -> EchoReport {
        let now = self.start.elapsed();
        let s = self.stats();
        let end = s.stop_requested.unwrap_or(now);
        let open_gap = end.saturating_sub(s.last_echo);
        let (max_gap, max_gap_start) = if open_gap > s.max_gap {
            (open_gap, s.last_echo)
        } else {
            (s.max_gap, s.max_gap_start)
        };
        EchoReport {
            address: self.address.to_string(),
            messages_sent: s.sent,
            messages_echoed: s.echoed,
            messages_lost: s.lost,
            messages_corrupted: s.corrupted,
            max_gap_ms: ms(max_gap),
            max_gap_started_ms: ms(max_gap_start),
            duration_ms: ms(end),
            connection_error: s.connection_error.clone(),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A running echo probe; see the module documentation. Dropping it stops the probe
/// without the drain.
#[derive(Debug)]
pub struct EchoProbe {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl EchoProbe {
    /// Spawns the probe thread, which enters `config.netns` (if any) and connects; returns
    /// once the connection is established (or with the reason it was not), and the first
    /// message is on its way.
    pub fn start(config: EchoConfig) -> Result<EchoProbe, ProbeError> {
        if config.interval.is_zero() {
            return Err(ProbeError::InvalidConfig("interval must be positive"));
        }
        if config.connect_timeout.is_zero() {
            return Err(ProbeError::InvalidConfig(
                "connect_timeout must be positive",
            ));
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("ferry-netprobe".into())
            .spawn(move || match connect(&config) {
                Ok(stream) => {
                    let shared = Arc::new(Shared {
                        address: config.address,
                        start: Instant::now(),
                        stats: Mutex::new(Stats::default()),
                        stop: AtomicBool::new(false),
                        abort: AtomicBool::new(false),
                    });
                    if tx.send(Ok(Arc::clone(&shared))).is_ok() {
                        run(stream, &shared, config.interval);
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(ProbeError::Spawn)?;
        match rx.recv() {
            Ok(Ok(shared)) => Ok(EchoProbe {
                shared,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(mpsc::RecvError) => {
                let _ = thread.join();
                Err(ProbeError::ThreadDied)
            }
        }
    }

    /// The echo service this probe talks to.
    pub fn address(&self) -> SocketAddr {
        self.shared.address
    }

    /// The numbers so far. An unanswered gap still open counts up to now.
    pub fn snapshot(&self) -> EchoReport {
        self.shared.report()
    }

    /// Stops sending, waits up to [`DRAIN_TIMEOUT`] for the outstanding echoes (those
    /// still missing then are lost), closes the connection and reports.
    pub fn stop(mut self) -> EchoReport {
        self.finish(false);
        self.shared.report()
    }

    fn finish(&mut self, abort: bool) {
        {
            let mut s = self.shared.stats();
            if s.stop_requested.is_none() {
                s.stop_requested = Some(self.shared.start.elapsed());
            }
        }
        self.shared.abort.store(abort, Ordering::SeqCst);
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EchoProbe {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.finish(true);
        }
    }
}

/// Enters the namespace (this thread only) and connects.
fn connect(config: &EchoConfig) -> Result<TcpStream, ProbeError> {
    if let Some(path) = &config.netns {
        let ns = File::open(path).map_err(|source| ProbeError::NetnsOpen {
            path: path.clone(),
            source,
        })?;
        // SAFETY: a plain syscall on a file descriptor we own; it changes the network
        // namespace of the calling thread only (this one), which never runs anything but
        // the probe.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(ProbeError::NetnsEnter {
                path: path.clone(),
                source: io::Error::last_os_error(),
            });
        }
    }
    let stream =
        TcpStream::connect_timeout(&config.address, config.connect_timeout).map_err(|source| {
            ProbeError::Connect {
                address: config.address,
                timeout: config.connect_timeout,
                source,
            }
        })?;
    let socket_err = |source| ProbeError::Socket {
        address: config.address,
        source,
    };
    stream.set_nodelay(true).map_err(socket_err)?;
    stream.set_nonblocking(true).map_err(socket_err)?;
    Ok(stream)
}

/// The probe thread's loop after the connection is up: send on schedule, read echoes,
/// until stopped (then drain) or the connection fails.
fn run(mut stream: TcpStream, shared: &Shared, interval: Duration) {
    let address = shared.address;
    let start = shared.start;
    let mut seq: u64 = 0;
    // Sequence numbers sent and not answered yet, oldest first.
    let mut in_flight: VecDeque<u64> = VecDeque::with_capacity(MAX_IN_FLIGHT);
    let mut out: Vec<u8> = Vec::with_capacity(64);
    let mut inbuf: Vec<u8> = Vec::with_capacity(4096);
    let mut next_send = start;
    let mut drain_deadline: Option<Instant> = None;

    let result: Result<(), ConnectionError> = loop {
        let now = Instant::now();
        if drain_deadline.is_none() && shared.stop.load(Ordering::SeqCst) {
            if shared.abort.load(Ordering::SeqCst) {
                break Ok(());
            }
            drain_deadline = Some(now + DRAIN_TIMEOUT);
        }
        if let Some(deadline) = drain_deadline {
            if (in_flight.is_empty() && out.is_empty()) || now >= deadline {
                break Ok(());
            }
        } else if now >= next_send {
            if in_flight.len() < MAX_IN_FLIGHT {
                seq += 1;
                out.extend_from_slice(message(seq).as_bytes());
                in_flight.push_back(seq);
                shared.stats().sent += 1;
            }
            next_send += interval;
            if next_send <= now {
                // Behind schedule (this thread was descheduled): resume the pace
                // rather than catching up in a burst.
                next_send = now + interval;
            }
        }

        if !out.is_empty() {
            match stream.write(&out) {
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e) if would_block(&e) => {}
                Err(source) => break Err(ConnectionError::Write { address, source }),
            }
        }

        // Wait for an echo, room to write, the next slot, or a look at the stop flag.
        let now = Instant::now();
        let mut wake = now + STOP_POLL;
        if let Some(deadline) = drain_deadline {
            wake = wake.min(deadline);
        } else {
            wake = wake.min(next_send);
        }
        let events = libc::POLLIN | if out.is_empty() { 0 } else { libc::POLLOUT };
        let revents = match poll(&stream, events, wake.saturating_duration_since(now)) {
            Ok(r) => r,
            Err(source) => break Err(ConnectionError::Poll { address, source }),
        };
        if revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) == 0 {
            continue;
        }
        match read_echoes(&mut stream, &mut inbuf, &mut in_flight, shared) {
            Ok(true) => {}
            Ok(false) => {
                break Err(ConnectionError::Eof {
                    address,
                    outstanding: in_flight.len(),
                })
            }
            Err(e) => break Err(e),
        }
    };

    let mut s = shared.stats();
    s.lost = in_flight.len() as u64;
    if let Err(e) = result {
        s.connection_error = Some(error_chain(&e));
    }
}

/// The line for message `seq`.
fn message(seq: u64) -> String {
    format!("ferry-echo {seq}\n")
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Reads what is available and accounts for every complete line. `Ok(false)` on EOF.
fn read_echoes(
    stream: &mut TcpStream,
    inbuf: &mut Vec<u8>,
    in_flight: &mut VecDeque<u64>,
    shared: &Shared,
) -> Result<bool, ConnectionError> {
    let address = shared.address;
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(ConnectionError::Read { address, source }),
        };
        let arrived = shared.start.elapsed();
        inbuf.extend_from_slice(&chunk[..n]);
        let mut consumed = 0;
        while let Some(pos) = inbuf[consumed..].iter().position(|&b| b == b'\n') {
            let line = &inbuf[consumed..consumed + pos + 1];
            consumed += pos + 1;
            let intact = in_flight
                .pop_front()
                .is_some_and(|seq| line == message(seq).as_bytes());
            let mut s = shared.stats();
            if intact {
                s.echoed += 1;
            } else {
                s.corrupted += 1;
            }
            let gap = arrived.saturating_sub(s.last_echo);
            if gap > s.max_gap {
                s.max_gap = gap;
                s.max_gap_start = s.last_echo;
            }
            s.last_echo = arrived;
        }
        inbuf.drain(..consumed);
        if inbuf.len() > MAX_LINE {
            return Err(ConnectionError::LineTooLong { address });
        }
    }
}

/// `ppoll` on one socket; returns its `revents` (0 on timeout).
fn poll(stream: &TcpStream, events: libc::c_short, timeout: Duration) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(if rc == 0 { 0 } else { pfd.revents })
}

#[cfg(test)]
mod tests;

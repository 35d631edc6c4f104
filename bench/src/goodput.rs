//! Link goodput: one TCP transfer between two hosts' namespaces, over the
//! same shaped link the migrations use. The benchmark runs itself twice
//! under `ip netns exec` — a `sink` in the receiver's namespace, a `source`
//! in the sender's — so no other tool is needed.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_test_support::netns::Rig;
use serde::{Deserialize, Serialize};

/// One measured transfer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Transfer {
    pub bytes: u64,
    /// From connect to the sink's acknowledgement of the last byte.
    pub secs: f64,
}

impl Transfer {
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.secs
    }
}

/// `ferry-bench sink`: accepts one connection, reads it to the end, answers
/// with the byte count (8 bytes, little-endian) and returns.
pub fn sink(listen: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total: u64 = 0;
    loop {
        match stream.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    stream.write_all(&total.to_le_bytes())?;
    Ok(())
}

/// `ferry-bench source`: connects (retrying while the sink starts), sends
/// `bytes`, waits for the sink's count.
pub fn source(to: SocketAddr, bytes: u64, timeout: Duration) -> std::io::Result<Transfer> {
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e),
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    let started = Instant::now();
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 8];
    stream.read_exact(&mut ack)?;
    let secs = started.elapsed().as_secs_f64();
    let received = u64::from_le_bytes(ack);
    if received != bytes {
        return Err(std::io::Error::other(format!(
            "the sink received {received} of {bytes} bytes"
        )));
    }
    Ok(Transfer { bytes, secs })
}

/// Sends `bytes` from host `from` to host `to` of the rig and returns the
/// transfer.
pub fn measure(rig: &Rig, from: &str, to: &str, bytes: u64) -> anyhow::Result<Transfer> {
    const PORT: u16 = 5201;
    let exe = std::env::current_exe().context("cannot find the benchmark's own binary")?;
    let addr = SocketAddr::from((rig.address(to)?, PORT));
    let mut sink = rig
        .command_in(to, &exe)?
        .args(["sink", "--listen", &addr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the goodput sink")?;
    let output = rig
        .command_in(from, &exe)?
        .args([
            "source",
            "--to",
            &addr.to_string(),
            "--bytes",
            &bytes.to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .context("cannot run the goodput source")?;
    let sink_status = sink.wait().context("waiting for the goodput sink")?;
    if !output.status.success() || !sink_status.success() {
        let mut sink_err = String::new();
        if let Some(mut err) = sink.stderr.take() {
            let _ = err.read_to_string(&mut sink_err);
        }
        bail!(
            "goodput transfer {from} → {to} failed: source: {} {}; sink: {sink_status} {sink_err}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "the goodput source printed no result: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

//! The guest's network: an IPv4 address on the first ethernet NIC and a TCP echo service,
//! so that the host can measure what a client of a migrating guest sees (lost
//! connections, lost bytes, how long the guest did not answer).
//!
//! The address is configured here with the classic `ifconfig` ioctls rather than by
//! `/init` with busybox `ip`: the probe already validated the value, waits for the NIC and
//! reports a failure on one `probe-error net:` line, and nothing has to be parsed twice.
//! Setting the netmask after the address makes the kernel install the on-link prefix
//! route, which is all a guest on a host-side bridge needs (no gateway, no DNS).
//!
//! The echo service sends every byte a client sends straight back, so every line comes
//! back unchanged. One thread per connection, each on a small stack; the listener and
//! the connections never touch the heartbeat or the oracles.

use std::ffi::{c_int, c_short, c_ulong};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Ipv4Net;

/// The NIC `ferry.ip` is configured on: the first ethernet device. The guest's initramfs
/// has no udev, so the kernel's own name is final.
pub const NIC: &str = "eth0";

/// At most this many echo connections at once; further ones are closed on accept (a
/// test guest has little memory and a leaking client must not exhaust it).
pub const MAX_ECHO_CONNECTIONS: usize = 256;

mod sys {
    use std::ffi::{c_int, c_ulong};

    extern "C" {
        pub fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
    }

    pub const SIOCGIFFLAGS: c_ulong = 0x8913;
    pub const SIOCSIFFLAGS: c_ulong = 0x8914;
    pub const SIOCSIFADDR: c_ulong = 0x8916;
    pub const SIOCSIFNETMASK: c_ulong = 0x891c;
    pub const IFF_UP: i16 = 0x1;
    pub const AF_INET: u16 = 2;
}

/// `struct ifreq`: the interface name and a 24-byte union, of which these requests use
/// either a `struct sockaddr_in` (16 bytes) or the `short` flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(ifname: &str) -> io::Result<IfReq> {
        let bytes = ifname.as_bytes();
        if bytes.is_empty() || bytes.len() > 15 || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {ifname:?}"),
            ));
        }
        let mut name = [0u8; 16];
        name[..bytes.len()].copy_from_slice(bytes);
        Ok(IfReq {
            name,
            data: [0; 24],
        })
    }

    /// Fills the union with a `struct sockaddr_in` for `addr` (port 0).
    fn set_sockaddr_in(&mut self, addr: Ipv4Addr) {
        self.data = [0; 24];
        self.data[0..2].copy_from_slice(&sys::AF_INET.to_ne_bytes());
        // sin_port (2..4) stays 0; sin_addr is in network byte order.
        self.data[4..8].copy_from_slice(&addr.octets());
    }

    fn flags(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_flags(&mut self, flags: i16) {
        self.data[0..2].copy_from_slice(&flags.to_ne_bytes());
    }
}

fn ioctl(sock: &UdpSocket, request: c_ulong, req: &mut IfReq, what: &str) -> io::Result<()> {
    // SAFETY: every request used here reads or writes a `struct ifreq`, which `IfReq`
    // matches in size (40 bytes) and layout; the pointer is valid for the call.
    let rc = unsafe { sys::ioctl(sock.as_raw_fd() as c_int, request, req as *mut IfReq) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn link_up(sock: &UdpSocket, ifname: &str) -> io::Result<()> {
    let mut req = IfReq::new(ifname)?;
    ioctl(
        sock,
        sys::SIOCGIFFLAGS,
        &mut req,
        &format!("SIOCGIFFLAGS {ifname}"),
    )?;
    let flags: c_short = req.flags() | sys::IFF_UP;
    req.set_flags(flags);
    ioctl(
        sock,
        sys::SIOCSIFFLAGS,
        &mut req,
        &format!("SIOCSIFFLAGS {ifname} up"),
    )
}

/// Brings `lo` up, waits up to `wait` for [`NIC`] to appear (virtio_net registers it
/// asynchronously after `insmod`), gives it `net` and brings it up.
pub fn configure(net: Ipv4Net, wait: Duration) -> Result<(), String> {
    // Any AF_INET socket will do as the ioctls' handle; binding to the wildcard needs no
    // interface.
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .map_err(|e| format!("creating an AF_INET socket for the interface ioctls: {e}"))?;
    link_up(&sock, "lo").map_err(|e| e.to_string())?;

    let sysfs = Path::new("/sys/class/net").join(NIC);
    let deadline = Instant::now() + wait;
    while !sysfs.exists() {
        if Instant::now() > deadline {
            let present: Vec<String> = std::fs::read_dir("/sys/class/net")
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            return Err(format!(
                "{NIC} did not appear within {} s (interfaces: {}); does the VM have a \
                 virtio-net device?",
                wait.as_secs(),
                present.join(",")
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut req = IfReq::new(NIC).map_err(|e| e.to_string())?;
    req.set_sockaddr_in(net.addr);
    ioctl(
        &sock,
        sys::SIOCSIFADDR,
        &mut req,
        &format!("SIOCSIFADDR {NIC} {}", net.addr),
    )
    .map_err(|e| e.to_string())?;
    req.set_sockaddr_in(net.netmask());
    ioctl(
        &sock,
        sys::SIOCSIFNETMASK,
        &mut req,
        &format!("SIOCSIFNETMASK {NIC} {}", net.netmask()),
    )
    .map_err(|e| e.to_string())?;
    link_up(&sock, NIC).map_err(|e| e.to_string())
}

/// A bound echo listener; [`EchoService::run`] serves it forever.
pub struct EchoService {
    listener: TcpListener,
    active: Arc<AtomicUsize>,
}

impl EchoService {
    /// Binds the listener (`0.0.0.0:port` in the guest; tests use loopback).
    pub fn bind(addr: SocketAddr) -> io::Result<EchoService> {
        Ok(EchoService {
            listener: TcpListener::bind(addr)?,
            active: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections forever, one thread each. Accept errors (a client that reset
    /// before accept, out of file descriptors) are retried after a short pause.
    pub fn run(self) -> ! {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_ECHO_CONNECTIONS {
                self.active.fetch_sub(1, Ordering::SeqCst);
                continue; // dropping the stream closes it
            }
            let active = Arc::clone(&self.active);
            let spawned = std::thread::Builder::new()
                .name("echo".into())
                .stack_size(64 * 1024)
                .spawn(move || {
                    let _ = echo(stream);
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                self.active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Sends back every byte read until the client closes (then closes too) or an error.
/// With TCP_NODELAY each line goes out as soon as it is read: a client measuring round
/// trips must not see Nagle's delay.
fn echo(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    fn start_service() -> SocketAddr {
        let service = EchoService::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = service.local_addr().unwrap();
        std::thread::spawn(move || service.run());
        addr
    }

    #[test]
    fn lines_come_back_unchanged_to_concurrent_clients() {
        let addr = start_service();
        let clients: Vec<_> = (0..8)
            .map(|c| {
                std::thread::spawn(move || {
                    let mut stream = TcpStream::connect(addr).unwrap();
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    for i in 0..50 {
                        let line = format!("client {c} line {i} \u{e9}\t \r\n");
                        stream.write_all(line.as_bytes()).unwrap();
                        let mut got = String::new();
                        reader.read_line(&mut got).unwrap();
                        assert_eq!(got, line);
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
    }

    #[test]
    fn a_burst_comes_back_whole_and_eof_closes() {
        let addr = start_service();
        let mut stream = TcpStream::connect(addr).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let sent: String = (0..1000).map(|i| format!("{i}\n")).collect();
        stream.write_all(sent.as_bytes()).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, sent);
    }

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        let mut req = IfReq::new("eth0").unwrap();
        req.set_sockaddr_in(Ipv4Addr::new(198, 18, 0, 10));
        assert_eq!(&req.data[..8], &[2, 0, 0, 0, 198, 18, 0, 10]);
        assert!(IfReq::new("a-name-that-is-too-long").is_err());
    }
}

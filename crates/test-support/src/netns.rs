//! Link control for namespace clusters (`ferry local up --netns`): which
//! address each host has, and the host's link to the cluster's bridge —
//! shaped with `tc tbf`, cut, restored.
//!
//! Each host of such a cluster runs in its own network namespace and reaches
//! the others through one veth pair whose other end is a port of the
//! cluster's bridge (the layout is in `crates/cli/src/commands/netns.rs`).
//! Everything here acts on that pair, read from the cluster's `local.toml`:
//!
//! - traffic *from* the host leaves through the namespace end (`veth_host`):
//!   a qdisc there shapes the host's uplink — a migration stream it sends;
//! - traffic *to* the host leaves the bridge through the root end
//!   (`veth_bridge`): a qdisc there shapes the host's downlink;
//! - a cut takes the root end down: the namespace end loses its carrier, and
//!   nothing passes either way until it is restored.
//!
//! `netem` is not available on Ferry's machines, so a link has a rate (tbf)
//! but no added delay or loss. Every function needs root and iproute2's `ip`
//! and `tc`, and says so when either is missing.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

/// Why a rig operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    #[error("link control of a namespace cluster needs root (it runs `ip` and `tc` on the cluster's interfaces); run the test as root")]
    NotRoot,
    #[error(
        "`{tool}` was not found: install Debian's iproute2 package (apt-get install iproute2)"
    )]
    ToolMissing {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("the cluster in {dir} is not a namespace cluster (no [netns] in local.toml): bring it up with `ferry local up --netns`")]
    NotNetns { dir: PathBuf },
    #[error("the cluster in {dir} has no host {name:?} (hosts: {known})")]
    UnknownHost {
        dir: PathBuf,
        name: String,
        known: String,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

/// The cluster's network, `[netns]` of `local.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Network {
    /// The cluster number (its /24 within 198.18.0.0/15).
    pub index: u16,
    /// E.g. `198.18.5.0/24`.
    pub subnet: String,
    /// The bridge (root namespace).
    pub bridge: String,
    /// The root namespace's address on the bridge (where the CLI and test
    /// code running outside the namespaces appear from).
    pub address: Ipv4Addr,
}

/// One host of a namespace cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RigHost {
    /// `host1`, `host2`, …
    pub name: String,
    /// Its ferryd's HTTPS port (on `address`).
    pub port: u16,
    /// Its address: ferryd listens there, migration streams and NBD arrive there.
    pub address: Ipv4Addr,
    /// Its network namespace (`ip netns` name).
    pub netns: String,
    /// The veth end inside the namespace.
    pub veth_host: String,
    /// The veth end on the bridge (root namespace).
    pub veth_bridge: String,
}

impl RigHost {
    /// `https://ADDRESS:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.address, self.port)
    }
}

#[derive(Deserialize)]
struct Manifest {
    netns: Option<Network>,
    #[serde(default)]
    hosts: Vec<ManifestHost>,
}

#[derive(Deserialize)]
struct ManifestHost {
    name: String,
    port: u16,
    netns: Option<HostLink>,
}

#[derive(Deserialize)]
struct HostLink {
    address: Ipv4Addr,
    netns: String,
    veth_host: String,
    veth_bridge: String,
}

/// A token-bucket shape for one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Rate in bits per second.
    pub rate_bits_per_sec: u64,
    /// Bucket size in bytes (how much may leave at line rate at once).
    pub burst_bytes: u64,
    /// Longest time a packet may wait in the queue before it is dropped
    /// (sets the queue's length).
    pub latency: Duration,
}

impl Shape {
    /// `rate_bits_per_sec` with a burst of 10 ms at that rate (at least
    /// 64 KiB: a GSO packet is up to 64 KiB, and a burst smaller than the
    /// kernel's timer tick allows starves the bucket) and a 25 ms queue.
    pub fn rate(rate_bits_per_sec: u64) -> Shape {
        Shape {
            rate_bits_per_sec,
            burst_bytes: (rate_bits_per_sec / 8 / 100).max(64 << 10),
            latency: Duration::from_millis(25),
        }
    }

    /// Megabits per second (10^6 bits).
    pub fn mbit(mbit: u64) -> Shape {
        Shape::rate(mbit * 1_000_000)
    }

    /// The rate in bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        self.rate_bits_per_sec / 8
    }

    /// The `tc qdisc replace` arguments after `dev X root`.
    fn tbf_args(&self) -> Vec<String> {
        vec![
            "tbf".into(),
            "rate".into(),
            format!("{}bit", self.rate_bits_per_sec),
            "burst".into(),
            format!("{}b", self.burst_bytes),
            "latency".into(),
            format!("{}ms", self.latency.as_millis().max(1)),
        ]
    }
}

/// Which way of a host's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// What the host sends (its uplink): the namespace end's egress.
    FromHost,
    /// What the host receives (its downlink): the bridge end's egress.
    ToHost,
    /// Both.
    Both,
}

/// A namespace cluster's hosts and links, read from its `local.toml`.
#[derive(Debug, Clone)]
pub struct Rig {
    dir: PathBuf,
    network: Network,
    hosts: Vec<RigHost>,
}

impl Rig {
    /// Reads `DIR/local.toml`; fails unless it describes a namespace cluster.
    pub fn open(cluster_dir: &Path) -> Result<Rig, RigError> {
        let path = cluster_dir.join("local.toml");
        let text = std::fs::read_to_string(&path).map_err(|source| RigError::Read {
            path: path.clone(),
            source,
        })?;
        Rig::parse(cluster_dir, &text).map_err(|e| match e {
            ParseFailure::Toml(source) => RigError::Parse { path, source },
            ParseFailure::NotNetns => RigError::NotNetns {
                dir: cluster_dir.to_path_buf(),
            },
        })
    }

    fn parse(dir: &Path, text: &str) -> Result<Rig, ParseFailure> {
        let manifest: Manifest = toml::from_str(text).map_err(ParseFailure::Toml)?;
        let network = manifest.netns.ok_or(ParseFailure::NotNetns)?;
        let hosts = manifest
            .hosts
            .into_iter()
            .map(|h| {
                let link = h.netns.ok_or(ParseFailure::NotNetns)?;
                Ok(RigHost {
                    name: h.name,
                    port: h.port,
                    address: link.address,
                    netns: link.netns,
                    veth_host: link.veth_host,
                    veth_bridge: link.veth_bridge,
                })
            })
            .collect::<Result<Vec<_>, ParseFailure>>()?;
        Ok(Rig {
            dir: dir.to_path_buf(),
            network,
            hosts,
        })
    }

    /// The client namespace on the guest LAN and the management network
    /// (`ferry local up --netns` makes it; see the CLI's `netns.rs`).
    pub fn client_netns(&self) -> String {
        format!("ferry{}-client", self.network.index)
    }

    /// The guest LAN's segment bridge in the root namespace.
    pub fn lan_bridge(&self) -> String {
        format!("ferry{}lan", self.network.index)
    }

    /// The root-namespace end of host `name`'s uplink to the guest LAN.
    pub fn lan_uplink(&self, name: &str) -> Result<String, RigError> {
        let host = self.host(name)?;
        let number = host.veth_bridge.rsplit('b').next().unwrap_or_default();
        Ok(format!("ferry{}u{number}", self.network.index))
    }

    /// The interfaces attached to the bridge `bridge` inside host `name`'s
    /// namespace (its uplink and the taps of the VMs running there).
    pub fn bridge_ports(&self, name: &str, bridge: &str) -> Result<Vec<String>, RigError> {
        let host = self.host(name)?;
        let out = run(
            "ip",
            &["-n", &host.netns, "-o", "link", "show", "master", bridge],
        )?;
        Ok(out
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_string())
            .collect())
    }

    /// Every tap device in host `name`'s namespace.
    pub fn taps(&self, name: &str) -> Result<Vec<String>, RigError> {
        let host = self.host(name)?;
        let out = run(
            "ip",
            &["-n", &host.netns, "-o", "link", "show", "type", "tun"],
        )?;
        Ok(out
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(str::to_string)
            .collect())
    }

    /// The port of the guest LAN's segment bridge that `mac` was last seen
    /// on (root namespace), if the bridge knows it.
    pub fn lan_port_of(&self, mac: &str) -> Result<Option<String>, RigError> {
        let out = run("bridge", &["fdb", "show", "br", &self.lan_bridge()])?;
        Ok(out
            .lines()
            .filter(|line| line.starts_with(&format!("{mac} ")))
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words
                    .find(|w| *w == "dev")
                    .and(words.next())
                    .map(str::to_string)
            })
            .find(|dev| dev != &self.lan_bridge()))
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bridge, the subnet and the root namespace's address.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// Every host, in `local.toml`'s order (host1 first).
    pub fn hosts(&self) -> &[RigHost] {
        &self.hosts
    }

    /// One host by name.
    pub fn host(&self, name: &str) -> Result<&RigHost, RigError> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| RigError::UnknownHost {
                dir: self.dir.clone(),
                name: name.to_string(),
                known: self
                    .hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// A host's address.
    pub fn address(&self, name: &str) -> Result<Ipv4Addr, RigError> {
        Ok(self.host(name)?.address)
    }

    /// Shapes both directions of a host's link to `shape`.
    pub fn shape(&self, name: &str, shape: &Shape) -> Result<(), RigError> {
        self.shape_direction(name, Direction::Both, shape)
    }

    /// Shapes one direction (or both) of a host's link. Replaces any shape
    /// that was there.
    pub fn shape_direction(
        &self,
        name: &str,
        direction: Direction,
        shape: &Shape,
    ) -> Result<(), RigError> {
        require(&["ip", "tc"])?;
        let host = self.host(name)?;
        for (netns, dev) in ends(host, direction) {
            let mut args = netns_args(netns);
            args.extend(["qdisc", "replace", "dev", dev, "root"].map(String::from));
            args.extend(shape.tbf_args());
            run("tc", &args)?;
        }
        Ok(())
    }

    /// Removes the shape from both directions of a host's link (a link that
    /// had none is fine).
    pub fn unshape(&self, name: &str) -> Result<(), RigError> {
        require(&["ip", "tc"])?;
        let host = self.host(name)?;
        for (netns, dev) in ends(host, Direction::Both) {
            if !self.qdisc_of(netns, dev)?.contains("tbf") {
                continue;
            }
            let mut args = netns_args(netns);
            args.extend(["qdisc", "del", "dev", dev, "root"].map(String::from));
            run("tc", &args)?;
        }
        Ok(())
    }

    /// `tc qdisc show` of both ends of a host's link, for diagnostics and
    /// for tests that check a shape is in place.
    pub fn qdiscs(&self, name: &str) -> Result<String, RigError> {
        require(&["ip", "tc"])?;
        let host = self.host(name)?;
        let mut text = String::new();
        for (netns, dev) in ends(host, Direction::Both) {
            text.push_str(&format!("{dev}: {}", self.qdisc_of(netns, dev)?));
        }
        Ok(text)
    }

    fn qdisc_of(&self, netns: Option<&str>, dev: &str) -> Result<String, RigError> {
        let mut args = netns_args(netns);
        args.extend(["qdisc", "show", "dev", dev, "root"].map(String::from));
        run("tc", &args)
    }

    /// Cuts a host's link: nothing passes either way until [`Rig::restore`].
    pub fn cut(&self, name: &str) -> Result<(), RigError> {
        require(&["ip"])?;
        let host = self.host(name)?;
        run("ip", &["link", "set", "dev", &host.veth_bridge, "down"])?;
        Ok(())
    }

    /// Restores a cut link.
    pub fn restore(&self, name: &str) -> Result<(), RigError> {
        require(&["ip"])?;
        let host = self.host(name)?;
        run("ip", &["link", "set", "dev", &host.veth_bridge, "up"])?;
        Ok(())
    }

    /// Whether a host's link is up (not cut).
    pub fn is_up(&self, name: &str) -> Result<bool, RigError> {
        require(&["ip"])?;
        let host = self.host(name)?;
        let text = run("ip", &["-o", "link", "show", "dev", &host.veth_bridge])?;
        Ok(link_flags_up(&text))
    }

    /// A command that runs `program` inside a host's namespace (`ip netns
    /// exec NS program`; the pid is the program's).
    pub fn command_in(
        &self,
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command, RigError> {
        require(&["ip"])?;
        let host = self.host(name)?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &host.netns]).arg(program);
        Ok(command)
    }
}

enum ParseFailure {
    Toml(toml::de::Error),
    NotNetns,
}

/// The (namespace, device) pairs carrying `direction` of a host's link.
fn ends(host: &RigHost, direction: Direction) -> Vec<(Option<&str>, &str)> {
    let from = (Some(host.netns.as_str()), host.veth_host.as_str());
    let to = (None, host.veth_bridge.as_str());
    match direction {
        Direction::FromHost => vec![from],
        Direction::ToHost => vec![to],
        Direction::Both => vec![from, to],
    }
}

fn netns_args(netns: Option<&str>) -> Vec<String> {
    match netns {
        Some(ns) => vec!["-n".into(), ns.into()],
        None => Vec::new(),
    }
}

/// Whether `ip -o link show` reports the administrative UP flag.
fn link_flags_up(text: &str) -> bool {
    text.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .is_some_and(|(flags, _)| flags.split(',').any(|f| f == "UP"))
}

/// The effective uid, from `/proc/self/status` (no libc needed).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Fails unless we are root and every tool runs.
pub fn require(tools: &[&'static str]) -> Result<(), RigError> {
    if effective_uid() != Some(0) {
        return Err(RigError::NotRoot);
    }
    for &tool in tools {
        Command::new(tool)
            .arg("-V")
            .output()
            .map_err(|source| RigError::ToolMissing { tool, source })?;
    }
    Ok(())
}

fn run<S: AsRef<str>>(program: &str, args: &[S]) -> Result<String, RigError> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(&args)
        .output()
        .map_err(|source| RigError::Command {
            command: command.clone(),
            status: "not started".into(),
            stderr: source.to_string(),
        })?;
    if !out.status.success() {
        return Err(RigError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
[netns]
index = 5
subnet = "198.18.5.0/24"
bridge = "ferry5br"
address = "198.18.5.1"

[[hosts]]
name = "host1"
port = 7101

[hosts.netns]
address = "198.18.5.2"
netns = "ferry5-host1"
veth_host = "ferry5h1"
veth_bridge = "ferry5b1"
"#;

    #[test]
    fn a_namespace_manifest_gives_hosts_and_addresses() {
        let rig = Rig::parse(Path::new("/c"), MANIFEST).ok().expect("parses");
        assert_eq!(rig.network().bridge, "ferry5br");
        let host = rig.host("host1").unwrap();
        assert_eq!(host.address, Ipv4Addr::new(198, 18, 5, 2));
        assert_eq!(host.url(), "https://198.18.5.2:7101");
        let err = rig.host("host9").unwrap_err();
        assert!(err.to_string().contains("hosts: host1"), "{err}");
    }

    #[test]
    fn a_loopback_manifest_is_not_a_rig() {
        let text = "[[hosts]]\nname = \"host1\"\nport = 7101\n";
        assert!(matches!(
            Rig::parse(Path::new("/c"), text),
            Err(ParseFailure::NotNetns)
        ));
    }

    #[test]
    fn shapes_have_a_burst_the_kernel_can_use() {
        let slow = Shape::mbit(1);
        assert_eq!(slow.burst_bytes, 64 << 10);
        let fast = Shape::mbit(200);
        assert_eq!(fast.burst_bytes, 250_000);
        assert_eq!(fast.bytes_per_sec(), 25_000_000);
        assert_eq!(
            fast.tbf_args().join(" "),
            "tbf rate 200000000bit burst 250000b latency 25ms"
        );
    }

    #[test]
    fn link_flags_are_read() {
        assert!(link_flags_up(
            "10: ferry0b1@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500"
        ));
        assert!(!link_flags_up(
            "10: ferry0b1@if2: <BROADCAST,MULTICAST> mtu 1500"
        ));
    }
}

//! Namespace mode of `ferry local` (`ferry local up --netns`): every host's
//! ferryd runs in a network namespace of its own, with its own address, so
//! that migration streams and NBD exports cross a real (virtual) link that
//! tests can shape with `tc` and cut.
//!
//! ```text
//!  root namespace: ferry CLI, 198.18.K.1 on bridge ferryKbr
//!                       │
//!        ┌──────────────┼──────────────┐   bridge ferryKbr
//!    ferryKb1       ferryKb2       ferryKbN  (veth, bridge side)
//!        │              │              │
//!    ferryKh1       ferryKh2       ferryKhN  (veth, host side)
//!   ns ferryK-host1  ns ferryK-host2 …        198.18.K.2, .3, … .N+1
//! ```
//!
//! Addressing: cluster number K (0 ..= 511) owns the /24 number K inside the
//! testing range 198.18.0.0/15 (RFC 2544): 198.18.K.0/24 for K < 256, then
//! 198.19.(K-256).0/24. Nothing is ever addressed outside that /24: the bridge
//! has no uplink, forwarding is not enabled, and IPv6 is switched off on every
//! interface made here so that not even link-local chatter leaves a host.
//!
//! Parallel clusters: K is chosen under `local up`'s machine-wide lock and
//! recorded twice — in the cluster's `local.toml` and as a claim file
//! `/run/ferry/local-netns/K` naming the cluster's folder — so that a cluster
//! that is down (but not purged) keeps its subnet. A claim whose folder no
//! longer records K (deleted temporary folders of tests) is stale and is taken
//! over. A /24 that any route of the root namespace overlaps is never chosen,
//! whoever made that route.
//!
//! The guest LAN (issue 7): VMs on the cluster network `demo-lan` live on a
//! second L2 segment, the root namespace's bridge `ferryKlan` (no address).
//! Each host namespace has its own bridge `ferrylan0` (the bridge `demo-lan`
//! maps to) with an uplink veth (`lanup0` inside, `ferryKuN` outside) on that
//! segment, so a guest keeps its MAC and IP whichever host runs it. A client
//! namespace `ferryK-client` sits on both segments: `lan0` with
//! [`CLIENT_LAN_ADDRESS`] on the guest LAN, `mgmt0` with 198.18.K.250 on the
//! management one (so a CLI run there reaches the controller). Guests use
//! 198.18.0.0/24, so cluster number 0 is never chosen: the client's routes to
//! the management /24 and to the guests must not overlap.
//!
//! ```text
//!  root ns:  bridge ferryKlan ── ferryKu1 … ferryKuN ── ferryKcl
//!                                  │                        │
//!  ns ferryK-hostN:     lanup0 ── bridge ferrylan0 ── taps  │
//!  ns ferryK-client:                                lan0 ───┘  mgmt0 ── ferryKcm (on ferryKbr)
//! ```
//!
//! Every name here is derived from K and the host's number; the names stored
//! in `local.toml` are checked against the derivation before anything is
//! deleted, so a hand-edited manifest cannot make `down` delete an interface
//! Ferry did not create.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// How many /24s 198.18.0.0/15 holds.
pub const MAX_NETWORKS: u16 = 512;
/// Hosts take .2 ..= .(N+1); `local up` allows at most 64 of them.
const MAX_HOST_NUMBER: usize = 64;
/// Where subnet claims live (one file per claimed /24).
const CLAIMS_DIR: &str = "/run/ferry/local-netns";
/// Linux's longest interface name.
const IFNAMSIZ_MAX: usize = 15;
/// The bridge inside each host namespace that the `demo-lan` network maps
/// to (the same name `ferry local up` gives `demo-lan` everywhere).
pub const HOST_LAN_BRIDGE: &str = "ferrylan0";
/// Inside a host namespace: the veth end on [`HOST_LAN_BRIDGE`].
const HOST_LAN_UPLINK: &str = "lanup0";
/// The client namespace's address on the guest LAN (guests use
/// 198.18.0.0/24; the demo guest is 198.18.0.10).
pub const CLIENT_LAN_ADDRESS: &str = "198.18.0.20/15";
/// Host number of the client's management address (198.18.K.250).
const CLIENT_MGMT_HOST: u8 = 250;

/// The cluster's network, the `[netns]` table of `local.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The cluster number K (0 ..= 511).
    pub index: u16,
    /// The /24 (informational; derived from `index`).
    pub subnet: String,
    /// The Linux bridge every host's veth is a port of (root namespace).
    pub bridge: String,
    /// The root namespace's address on the bridge: the CLI reaches every
    /// ferryd from here.
    pub address: Ipv4Addr,
}

/// One host's place on the network, the `[hosts.netns]` table of
/// `local.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostLink {
    /// The host's address; ferryd listens on it, and it is the host's
    /// `migration_address`.
    pub address: Ipv4Addr,
    /// The network namespace (`ip netns` name) ferryd and its QEMUs run in.
    pub netns: String,
    /// The veth end inside the namespace (carries `address`).
    pub veth_host: String,
    /// The veth end in the root namespace, a port of the bridge.
    pub veth_bridge: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "`ferry local … --netns` needs root (it creates network namespaces, veth pairs and a \
         bridge); run it as root or with sudo"
    )]
    NotRoot,
    #[error("`ip` was not found: install Debian's iproute2 package (apt-get install iproute2)")]
    IpMissing(#[source] std::io::Error),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "every /24 of 198.18.0.0/15 is claimed by another local cluster or overlaps a route \
         (claims are in {CLAIMS_DIR}); purge clusters you no longer need with \
         `ferry local down --purge`"
    )]
    Exhausted,
    #[error(
        "subnet {subnet} of this cluster is now claimed by the cluster in {other}; \
         `ferry local down --purge` this one and bring it up again"
    )]
    ClaimedByOther { subnet: String, other: String },
    #[error(
        "subnet {subnet} of this cluster overlaps a route of this machine ({route}); \
         remove what made that route, or `ferry local down --purge` and up again"
    )]
    Overlaps { subnet: String, route: String },
    #[error("cannot record the subnet claim {path}")]
    Claim {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("local.toml's [netns] table does not match cluster number {index}: {problem}")]
    Inconsistent { index: u16, problem: String },
    #[error("host name {0:?} is not hostN with 1 <= N <= {MAX_HOST_NUMBER}")]
    HostName(String),
    #[error("left behind after tear-down: {0}")]
    Leftover(String),
}

/// Fails unless we are root and `ip` runs: checked before anything changes.
pub fn require_tools() -> Result<(), NetnsError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(NetnsError::NotRoot);
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(NetnsError::Command {
            command: "ip -V".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
        Err(source) => Err(NetnsError::IpMissing(source)),
    }
}

impl Network {
    /// The network of cluster number `index` (< [`MAX_NETWORKS`]).
    pub fn new(index: u16) -> Network {
        assert!(index < MAX_NETWORKS, "cluster number {index} out of range");
        let [a, b, c, _] = base(index).octets();
        Network {
            index,
            subnet: format!("{a}.{b}.{c}.0/24"),
            bridge: format!("ferry{index}br"),
            address: Ipv4Addr::new(a, b, c, 1),
        }
    }

    /// Where host `name` (`hostN`) sits on this network.
    pub fn host_link(&self, name: &str) -> Result<HostLink, NetnsError> {
        let number = host_number(name)?;
        let [a, b, c, _] = base(self.index).octets();
        Ok(HostLink {
            address: Ipv4Addr::new(a, b, c, number as u8 + 1),
            netns: format!("ferry{}-{name}", self.index),
            veth_host: format!("ferry{}h{number}", self.index),
            veth_bridge: format!("ferry{}b{number}", self.index),
        })
    }

    /// Checks a loaded `[netns]` table (and the hosts' tables) against the
    /// names and addresses its number derives: only those are ever created or
    /// deleted.
    pub fn check<'a>(
        &self,
        hosts: impl IntoIterator<Item = (&'a str, Option<&'a HostLink>)>,
    ) -> Result<(), NetnsError> {
        let inconsistent = |problem: String| NetnsError::Inconsistent {
            index: self.index,
            problem,
        };
        if self.index >= MAX_NETWORKS {
            return Err(inconsistent(format!("index must be below {MAX_NETWORKS}")));
        }
        let derived = Network::new(self.index);
        if *self != derived {
            return Err(inconsistent(format!(
                "expected subnet {}, bridge {}, address {}",
                derived.subnet, derived.bridge, derived.address
            )));
        }
        for (name, link) in hosts {
            let expected = self.host_link(name)?;
            match link {
                Some(link) if *link == expected => {}
                Some(_) => {
                    return Err(inconsistent(format!(
                        "host {name} must be address {}, netns {}, veths {}/{}",
                        expected.address, expected.netns, expected.veth_host, expected.veth_bridge
                    )))
                }
                None => return Err(inconsistent(format!("host {name} has no [hosts.netns]"))),
            }
        }
        Ok(())
    }

    fn prefix(&self) -> String {
        format!("{}/24", self.address)
    }

    /// The guest LAN's segment bridge (root namespace).
    pub fn lan_bridge(&self) -> String {
        format!("ferry{}lan", self.index)
    }

    /// The client namespace.
    pub fn client_netns(&self) -> String {
        format!("ferry{}-client", self.index)
    }

    /// Root-namespace ends of the client's veths: guest LAN, management.
    fn client_veths(&self) -> (String, String) {
        (
            format!("ferry{}cl", self.index),
            format!("ferry{}cm", self.index),
        )
    }

    /// The root-namespace end of a host's uplink to the guest LAN.
    fn uplink(&self, host: &HostLink) -> String {
        // veth_bridge is ferryKbN (checked against the derivation).
        let number = host
            .veth_bridge
            .rsplit('b')
            .next()
            .unwrap_or_default()
            .to_string();
        format!("ferry{}u{number}", self.index)
    }
}

/// 198.18.K.0 for K < 256, then 198.19.(K-256).0.
fn base(index: u16) -> Ipv4Addr {
    Ipv4Addr::new(198, 18 + (index / 256) as u8, (index % 256) as u8, 0)
}

fn host_number(name: &str) -> Result<usize, NetnsError> {
    name.strip_prefix("host")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=MAX_HOST_NUMBER).contains(n) && name == format!("host{n}"))
        .ok_or_else(|| NetnsError::HostName(name.to_string()))
}

// ---- claims -----------------------------------------------------------------

fn claim_path(index: u16) -> PathBuf {
    Path::new(CLAIMS_DIR).join(index.to_string())
}

/// The folder that claims `index`, if the claim is live: its `local.toml`
/// still records that number.
fn live_claim(index: u16) -> Option<PathBuf> {
    let owner = PathBuf::from(std::fs::read_to_string(claim_path(index)).ok()?.trim());
    let manifest = std::fs::read_to_string(owner.join("local.toml")).ok()?;
    let value: toml::Value = toml::from_str(&manifest).ok()?;
    let recorded = value.get("netns")?.get("index")?.as_integer()?;
    (recorded == i64::from(index)).then_some(owner)
}

fn write_claim(index: u16, dir: &Path) -> Result<(), NetnsError> {
    let path = claim_path(index);
    let write = || {
        std::fs::create_dir_all(CLAIMS_DIR)?;
        std::fs::write(&path, format!("{}\n", dir.display()))
    };
    write().map_err(|source| NetnsError::Claim { path, source })
}

/// Removes the claim of `index` if it names `dir` (`down --purge`).
pub fn release_claim(index: u16, dir: &Path) {
    let path = claim_path(index);
    if std::fs::read_to_string(&path).is_ok_and(|owner| Path::new(owner.trim()) == dir) {
        // The folder stays: removing it here could race with an `up` that
        // is writing its claim under the lock `down` does not take.
        let _ = std::fs::remove_file(path);
    }
}

/// Picks (a new cluster) or re-confirms (an existing one) the cluster's
/// network and records the claim. Call it under `local up`'s lock.
pub fn claim(dir: &Path, existing: Option<&Network>) -> Result<Network, NetnsError> {
    let routes = root_routes()?;
    if let Some(network) = existing {
        match live_claim(network.index) {
            Some(owner) if owner == dir => return Ok(network.clone()),
            Some(owner) => {
                return Err(NetnsError::ClaimedByOther {
                    subnet: network.subnet.clone(),
                    other: owner.display().to_string(),
                })
            }
            None => {
                // Our routes (the bridge still up) are no conflict.
                if let Some(route) = overlapping(&routes, network, Some(&network.bridge)) {
                    return Err(NetnsError::Overlaps {
                        subnet: network.subnet.clone(),
                        route,
                    });
                }
                write_claim(network.index, dir)?;
                return Ok(network.clone());
            }
        }
    }
    // Not 0: 198.18.0.0/24 is the guest LAN's (see the module docs).
    for index in 1..MAX_NETWORKS {
        let network = Network::new(index);
        if live_claim(index).is_some()
            || overlapping(&routes, &network, None).is_some()
            || link_exists(&network.bridge)
        {
            continue;
        }
        write_claim(index, dir)?;
        return Ok(network);
    }
    Err(NetnsError::Exhausted)
}

fn root_routes() -> Result<Vec<String>, NetnsError> {
    let text = ip(&["-4", "route", "show", "table", "all"])?;
    Ok(text.lines().map(str::to_string).collect())
}

/// The first route line naming an address or prefix inside `network`'s /24
/// (or a prefix containing it), ignoring routes on `own_bridge`. `default`
/// is a word, not a prefix, and is skipped: it is the machine's uplink.
fn overlapping(routes: &[String], network: &Network, own_bridge: Option<&str>) -> Option<String> {
    let ours = u32::from(network.address) & 0xffff_ff00;
    routes
        .iter()
        .filter(|line| {
            own_bridge.is_none_or(|bridge| {
                !line
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[0] == "dev" && w[1] == bridge)
            })
        })
        .find(|line| {
            line.split_whitespace().any(|word| {
                let (addr, len) = word.split_once('/').unwrap_or((word, "32"));
                let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
                    return false;
                };
                if len > 32 {
                    return false;
                }
                let common = len.min(24);
                let mask = if common == 0 {
                    0
                } else {
                    u32::MAX << (32 - common)
                };
                (u32::from(addr) & mask) == (ours & mask)
            })
        })
        .cloned()
}

// ---- set-up and tear-down ---------------------------------------------------

/// Creates whatever of the bridge, the namespaces and the veth pairs is
/// missing, and (re)applies addresses and link states. Idempotent.
pub fn ensure(network: &Network, dir: &Path, hosts: &[&HostLink]) -> Result<(), NetnsError> {
    let bridge = network.bridge.as_str();
    debug_assert!(bridge.len() <= IFNAMSIZ_MAX);
    if !link_exists(bridge) {
        ip(&["link", "add", "name", bridge, "type", "bridge"])?;
    }
    disable_ipv6_here(bridge);
    let mut alias = format!("ferry local {}", dir.display());
    alias.truncate(200);
    ip(&["link", "set", "dev", bridge, "alias", &alias])?;
    ip(&["addr", "replace", &network.prefix(), "dev", bridge])?;
    ip(&["link", "set", "dev", bridge, "up"])?;
    for host in hosts {
        ensure_host(network, host)?;
    }
    ensure_guest_lan(network, hosts)?;
    Ok(())
}

/// The guest LAN: the segment bridge, each host's `ferrylan0` with its
/// uplink, and the client namespace. Idempotent.
fn ensure_guest_lan(network: &Network, hosts: &[&HostLink]) -> Result<(), NetnsError> {
    let lan = network.lan_bridge();
    if !link_exists(&lan) {
        ip(&["link", "add", "name", &lan, "type", "bridge"])?;
    }
    disable_ipv6_here(&lan);
    ip(&["link", "set", "dev", &lan, "up"])?;
    for host in hosts {
        let ns = host.netns.as_str();
        if !ip_quiet(&["-n", ns, "link", "show", "dev", HOST_LAN_BRIDGE]) {
            ip(&[
                "-n",
                ns,
                "link",
                "add",
                "name",
                HOST_LAN_BRIDGE,
                "type",
                "bridge",
            ])?;
        }
        ip(&["-n", ns, "link", "set", "dev", HOST_LAN_BRIDGE, "up"])?;
        let outside = network.uplink(host);
        veth_pair(&outside, ns, HOST_LAN_UPLINK)?;
        ip(&["link", "set", "dev", &outside, "master", &lan])?;
        ip(&["link", "set", "dev", &outside, "up"])?;
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            "dev",
            HOST_LAN_UPLINK,
            "master",
            HOST_LAN_BRIDGE,
        ])?;
        ip(&["-n", ns, "link", "set", "dev", HOST_LAN_UPLINK, "up"])?;
    }
    let client = network.client_netns();
    if !netns_exists(&client) {
        ip(&["netns", "add", &client])?;
    }
    disable_ipv6_in(&client)?;
    ip(&["-n", &client, "link", "set", "dev", "lo", "up"])?;
    let (lan_veth, mgmt_veth) = network.client_veths();
    veth_pair(&lan_veth, &client, "lan0")?;
    ip(&["link", "set", "dev", &lan_veth, "master", &lan])?;
    ip(&["link", "set", "dev", &lan_veth, "up"])?;
    ip(&[
        "-n",
        &client,
        "addr",
        "replace",
        CLIENT_LAN_ADDRESS,
        "dev",
        "lan0",
    ])?;
    ip(&["-n", &client, "link", "set", "dev", "lan0", "up"])?;
    veth_pair(&mgmt_veth, &client, "mgmt0")?;
    ip(&["link", "set", "dev", &mgmt_veth, "master", &network.bridge])?;
    ip(&["link", "set", "dev", &mgmt_veth, "up"])?;
    let [a, b, c, _] = network.address.octets();
    let mgmt = format!("{}/24", Ipv4Addr::new(a, b, c, CLIENT_MGMT_HOST));
    ip(&["-n", &client, "addr", "replace", &mgmt, "dev", "mgmt0"])?;
    ip(&["-n", &client, "link", "set", "dev", "mgmt0", "up"])?;
    Ok(())
}

/// A veth pair with `outside` in the root namespace and `inside` in `ns`;
/// a half pair left by an interrupted run is replaced.
fn veth_pair(outside: &str, ns: &str, inside: &str) -> Result<(), NetnsError> {
    let has_inside = ip_quiet(&["-n", ns, "link", "show", "dev", inside]);
    let has_outside = link_exists(outside);
    if has_inside && has_outside {
        disable_ipv6_here(outside);
        return Ok(());
    }
    if has_outside {
        ip(&["link", "del", "dev", outside])?;
    }
    if has_inside {
        ip(&["-n", ns, "link", "del", "dev", inside])?;
    }
    ip(&[
        "link", "add", "name", outside, "type", "veth", "peer", "name", inside, "netns", ns,
    ])?;
    disable_ipv6_here(outside);
    Ok(())
}

/// IPv6 off for every interface of a namespace, before any arrives.
fn disable_ipv6_in(ns: &str) -> Result<(), NetnsError> {
    ip(&[
        "netns",
        "exec",
        ns,
        "sh",
        "-c",
        "if [ -d /proc/sys/net/ipv6 ]; then \
         echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; \
         echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; fi",
    ])?;
    Ok(())
}

fn ensure_host(network: &Network, host: &HostLink) -> Result<(), NetnsError> {
    let ns = host.netns.as_str();
    if !netns_exists(ns) {
        ip(&["netns", "add", ns])?;
    }
    // Before the veth end arrives, so that it never gets an IPv6 address.
    disable_ipv6_in(ns)?;
    ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
    veth_pair(&host.veth_bridge, ns, &host.veth_host)?;
    ip(&[
        "link",
        "set",
        "dev",
        &host.veth_bridge,
        "master",
        &network.bridge,
    ])?;
    ip(&["link", "set", "dev", &host.veth_bridge, "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "replace",
        &format!("{}/24", host.address),
        "dev",
        &host.veth_host,
    ])?;
    ip(&["-n", ns, "link", "set", "dev", &host.veth_host, "up"])?;
    Ok(())
}

/// IPv6 off on an interface of the root namespace (no link-local address,
/// no router solicitations). Absent IPv6 support is fine.
fn disable_ipv6_here(interface: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6");
    if Path::new(&path).exists() {
        let _ = std::fs::write(path, "1\n");
    }
}

/// The processes that still run in namespace `ns`.
pub fn pids_in(ns: &str) -> Vec<u32> {
    if !netns_exists(ns) {
        return Vec::new();
    }
    ip(&["netns", "pids", ns])
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Deletes the veth pairs, the namespaces and the bridge, then checks that
/// none of them is left. Idempotent. End the namespaces' processes first
/// (see [`pids`]): a namespace with a process in it outlives `ip netns del`.
pub fn teardown(network: &Network, hosts: &[&HostLink]) -> Result<(), NetnsError> {
    let mut errors = Vec::new();
    let (client_lan, client_mgmt) = network.client_veths();
    let client = network.client_netns();
    let mut root_links: Vec<String> = vec![client_lan, client_mgmt];
    root_links.extend(hosts.iter().map(|host| network.uplink(host)));
    for link in &root_links {
        if link_exists(link) {
            if let Err(e) = ip(&["link", "del", "dev", link]) {
                errors.push(e.to_string());
            }
        }
    }
    if netns_exists(&client) {
        if let Err(e) = ip(&["netns", "del", &client]) {
            errors.push(e.to_string());
        }
    }
    for host in hosts {
        // Deleting one end deletes the pair, at once (deleting the namespace
        // would too, but asynchronously).
        if link_exists(&host.veth_bridge) {
            if let Err(e) = ip(&["link", "del", "dev", &host.veth_bridge]) {
                errors.push(e.to_string());
            }
        }
        if netns_exists(&host.netns) {
            if let Err(e) = ip(&["netns", "del", &host.netns]) {
                errors.push(e.to_string());
            }
        }
    }
    for bridge in [network.bridge.clone(), network.lan_bridge()] {
        if link_exists(&bridge) {
            if let Err(e) = ip(&["link", "del", "dev", &bridge]) {
                errors.push(e.to_string());
            }
        }
    }
    let mut left: Vec<String> = Vec::new();
    for link in &root_links {
        if link_exists(link) {
            left.push(format!("veth {link}"));
        }
    }
    if netns_exists(&client) {
        left.push(format!("namespace {client}"));
    }
    if link_exists(&network.lan_bridge()) {
        left.push(format!("bridge {}", network.lan_bridge()));
    }
    for host in hosts {
        if netns_exists(&host.netns) {
            left.push(format!("namespace {}", host.netns));
        }
        if link_exists(&host.veth_bridge) {
            left.push(format!("veth {}", host.veth_bridge));
        }
    }
    if link_exists(&network.bridge) {
        left.push(format!("bridge {}", network.bridge));
    }
    if left.is_empty() {
        Ok(())
    } else {
        left.extend(errors);
        Err(NetnsError::Leftover(left.join("; ")))
    }
}

/// A command that runs `program` inside the host's namespace (`ip netns
/// exec` execs it: the pid stays the program's).
pub fn command_in(host: &HostLink, program: &Path) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &host.netns]).arg(program);
    command
}

// ---- `ip` -------------------------------------------------------------------

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    ip_quiet(&["link", "show", "dev", name])
}

fn ip_quiet(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Root mode: deletes the root namespace's `ferrylan0` (which an agent made
/// for `demo-lan`) once no port is left on it; a bridge still in use (by
/// another local cluster's VM) stays.
pub fn remove_idle_lan_bridge() {
    let ports = ip(&["-j", "link", "show", "master", HOST_LAN_BRIDGE]).unwrap_or_default();
    let idle = serde_json::from_str::<Vec<serde_json::Value>>(&ports)
        .map(|links| links.is_empty())
        .unwrap_or(false);
    if link_exists(HOST_LAN_BRIDGE) && idle {
        let _ = ip(&["link", "del", "dev", HOST_LAN_BRIDGE, "type", "bridge"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_tile_198_18_slash_15() {
        assert_eq!(Network::new(0).subnet, "198.18.0.0/24");
        assert_eq!(Network::new(255).address, Ipv4Addr::new(198, 18, 255, 1));
        assert_eq!(Network::new(256).subnet, "198.19.0.0/24");
        assert_eq!(Network::new(511).subnet, "198.19.255.0/24");
    }

    #[test]
    fn names_fit_linux_interface_names() {
        let network = Network::new(MAX_NETWORKS - 1);
        assert!(network.bridge.len() <= IFNAMSIZ_MAX, "{}", network.bridge);
        let link = network.host_link("host64").unwrap();
        assert!(link.veth_host.len() <= IFNAMSIZ_MAX, "{}", link.veth_host);
        assert!(
            link.veth_bridge.len() <= IFNAMSIZ_MAX,
            "{}",
            link.veth_bridge
        );
        assert_eq!(link.address, Ipv4Addr::new(198, 19, 255, 65));
    }

    #[test]
    fn host_names_other_than_host_n_are_refused() {
        let network = Network::new(3);
        for bad in ["host0", "host65", "host01", "hostx", "h1"] {
            assert!(network.host_link(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_hand_edited_interface_name_is_refused() {
        let network = Network::new(7);
        let mut link = network.host_link("host1").unwrap();
        network.check([("host1", Some(&link))]).unwrap();
        link.veth_bridge = "eth0".into();
        let err = network.check([("host1", Some(&link))]).unwrap_err();
        assert!(err.to_string().contains("host host1"), "{err}");
    }

    #[test]
    fn overlapping_routes_are_found_and_default_is_not_one() {
        let network = Network::new(5);
        let routes: Vec<String> = [
            "default via 192.0.2.1 dev eth0",
            "192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(overlapping(&routes, &network, None), None);
        let mut with = routes.clone();
        with.push("198.18.0.0/16 dev other".into());
        assert!(overlapping(&with, &network, None).is_some());
        let mut own = routes;
        own.push("198.18.5.0/24 dev ferry5br proto kernel scope link src 198.18.5.1".into());
        assert!(overlapping(&own, &network, None).is_some());
        assert_eq!(overlapping(&own, &network, Some("ferry5br")), None);
        assert_eq!(overlapping(&own, &Network::new(6), None), None);
    }
}

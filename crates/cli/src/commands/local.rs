//! `ferry local …`: a complete cluster on this machine, for trying Ferry and
//! for tests — a CA and certificates, one ferryd per host on loopback ports,
//! datastores `local` and `local2` per host, one `shared` datastore every host
//! sees, and a client configuration at `DIR/ferry.toml`.
//!
//! ```text
//! DIR/ferry.toml              client configuration (admin certificate)
//! DIR/local.toml              the hosts and their ports
//! DIR/pki/                    cluster CA, admin and host certificates
//! DIR/shared/                 the `shared` datastore
//! DIR/hosts/hostN/ferryd.toml host configuration
//! DIR/hosts/hostN/state/      agent state (VM records, consoles)
//! DIR/hosts/hostN/datastores/{local,local2}/
//! DIR/hosts/hostN/ferryd.log, ferryd.pid
//! ```
//!
//! `up` is idempotent: run again, it starts whatever is down and leaves what
//! runs alone.
//!
//! With `--netns` (root only) each host's ferryd runs in its own network
//! namespace with its own address from 198.18.0.0/15, joined to the others by
//! veth pairs on one bridge (see [`netns`]); migration streams and NBD
//! exports then cross those links. The mode and the addressing are recorded
//! in `local.toml`, so `up` repairs a namespace cluster as such (with or
//! without the flag) and `down` removes the namespaces, veths and bridge.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use crate::config::{ClientConfig, HostEntry};
use crate::output::{self, Format};

// A sibling file rather than an entry in `commands/mod.rs`: namespace mode
// is part of `ferry local` and nothing else uses it.
#[path = "netns.rs"]
mod netns;

/// First port tried for host1's API; host N tries from `BASE_PORT + N - 1`.
const BASE_PORT: u16 = 7101;
/// How long `up` waits for a started ferryd to answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Bring up (or repair) a local cluster.
    Up {
        /// How many hosts (host1 … hostN).
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// The cluster's folder (default: $FERRY_LOCAL_DIR or
        /// ~/.local/state/ferry/local).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Run each host's ferryd in its own network namespace, with its own
        /// address from 198.18.0.0/15 on a bridge (root only). Remembered:
        /// a later `up` of the same folder keeps the mode.
        #[arg(long)]
        netns: bool,
    },
    /// Show the local cluster's hosts and whether they run.
    Status {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Stop every VM and every ferryd of the local cluster.
    Down {
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also delete the cluster's folder (VMs, disks, certificates).
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    /// Namespace mode's network (`[netns]`); absent for a loopback cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns: Option<netns::Network>,
    #[serde(default)]
    hosts: Vec<ManifestHost>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestHost {
    name: String,
    port: u16,
    /// Namespace mode: the host's address, namespace and veth pair
    /// (`[hosts.netns]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns: Option<netns::HostLink>,
}

impl ManifestHost {
    /// The address ferryd listens on: its own in namespace mode, else
    /// loopback.
    fn ip(&self) -> String {
        match &self.netns {
            Some(link) => link.address.to_string(),
            None => "127.0.0.1".to_string(),
        }
    }

    fn url(&self) -> String {
        format!("https://{}:{}", self.ip(), self.port)
    }
}

impl Manifest {
    /// The namespace network and every host's link, checked against each
    /// other; `None` for a loopback cluster.
    fn network(&self) -> anyhow::Result<Option<(&netns::Network, Vec<&netns::HostLink>)>> {
        let Some(network) = &self.netns else {
            return Ok(None);
        };
        network.check(
            self.hosts
                .iter()
                .map(|h| (h.name.as_str(), h.netns.as_ref())),
        )?;
        let links = self.hosts.iter().filter_map(|h| h.netns.as_ref()).collect();
        Ok(Some((network, links)))
    }
}

/// The default folder of the local cluster.
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_LOCAL_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".local/state/ferry/local")
}

pub async fn run(command: LocalCommand, format: Format) -> anyhow::Result<()> {
    match command {
        LocalCommand::Up { hosts, dir, netns } => {
            let dir = dir.unwrap_or_else(default_dir);
            up(&dir, hosts, netns).await?;
            status(&dir, format).await
        }
        LocalCommand::Status { dir } => status(&dir.unwrap_or_else(default_dir), format).await,
        LocalCommand::Down { dir, purge } => down(&dir.unwrap_or_else(default_dir), purge).await,
    }
}

struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
    fn manifest(&self) -> PathBuf {
        self.dir.join("local.toml")
    }
    fn client_config(&self) -> PathBuf {
        self.dir.join("ferry.toml")
    }
    fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }
    fn host(&self, name: &str) -> PathBuf {
        self.dir.join("hosts").join(name)
    }
    fn pidfile(&self, name: &str) -> PathBuf {
        self.host(name).join("ferryd.pid")
    }
}

async fn up(dir: &Path, wanted_hosts: usize, want_netns: bool) -> anyhow::Result<()> {
    if wanted_hosts == 0 || wanted_hosts > 64 {
        bail!("--hosts must be between 1 and 64, not {wanted_hosts}");
    }
    if want_netns {
        // Before anything is created: a refused `up` changes nothing.
        netns::require_tools()?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    let layout = Layout { dir };
    // Choosing a free port and binding it are two steps; two `local up` runs
    // at once (parallel tests) could pick the same port between them. One
    // machine-wide lock, held until every started ferryd listens, closes
    // that window.
    let _ports = lock_port_choice()?;
    let mut manifest = load_manifest(&layout)?;
    if want_netns && manifest.netns.is_none() && !manifest.hosts.is_empty() {
        bail!(
            "the cluster in {} runs on loopback; it cannot become a namespace cluster in place \
             (`ferry local down --purge --dir {}` first, then `ferry local up --netns`)",
            layout.dir.display(),
            layout.dir.display()
        );
    }
    if !want_netns && manifest.netns.is_some() {
        netns::require_tools()?;
        eprintln!(
            "{} is a namespace cluster (local.toml has [netns]); keeping that mode",
            layout.dir.display()
        );
    }
    if want_netns || manifest.netns.is_some() {
        manifest.network()?;
        manifest.netns = Some(netns::claim(&layout.dir, manifest.netns.as_ref())?);
    }
    let ca = ensure_ca(&layout)?;
    for index in 1..=wanted_hosts {
        let name = format!("host{index}");
        if manifest.hosts.iter().any(|h| h.name == name) {
            continue;
        }
        let host = match &manifest.netns {
            // Each host has an address of its own: the same port for all.
            Some(network) => ManifestHost {
                port: BASE_PORT,
                netns: Some(network.host_link(&name)?),
                name,
            },
            None => {
                let taken: Vec<u16> = manifest.hosts.iter().map(|h| h.port).collect();
                let port = free_port(BASE_PORT + index as u16 - 1, &taken, &layout.dir)?;
                ManifestHost {
                    name,
                    port,
                    netns: None,
                }
            }
        };
        manifest.hosts.push(host);
    }
    // Every loopback host's port is this cluster's, also those chosen by
    // an earlier `up`.
    for host in manifest.hosts.iter().filter(|h| h.netns.is_none()) {
        claim_port(host.port, &layout.dir)?;
    }
    std::fs::write(layout.manifest(), toml::to_string(&manifest)?)?;
    if let Some((network, links)) = manifest.network()? {
        netns::ensure(network, &layout.dir, &links)?;
    }
    std::fs::create_dir_all(layout.shared())?;

    let controller = manifest.hosts[0].clone();
    for host in &manifest.hosts {
        write_host_files(&layout, &ca, host, &controller)?;
    }
    let client = ClientConfig {
        ca: layout.pki().join("ca.pem"),
        cert: layout.pki().join("admin.pem"),
        key: layout.pki().join("admin-key.pem"),
        controller: manifest.hosts.first().map(ManifestHost::url),
        hosts: manifest
            .hosts
            .iter()
            .map(|h| HostEntry {
                name: h.name.clone(),
                url: h.url(),
            })
            .collect(),
    };
    std::fs::write(layout.client_config(), toml::to_string(&client)?)?;
    let tls = client.tls()?;

    let ferryd = ferryd_binary()?;
    let mut started = Vec::new();
    for host in &manifest.hosts {
        if running_ferryd(&layout, &host.name).is_some() {
            continue;
        }
        let child = start_ferryd(&layout, &ferryd, host)?;
        started.push((host.clone(), child));
    }
    for (host, child) in &mut started {
        let api = ferry_api::Client::new(&host.url(), tls.clone())?;
        wait_healthy(&layout, &api, &host.name, child).await?;
    }
    wait_joined(&client, &tls, &manifest).await?;
    if nix::unistd::geteuid().is_root() {
        ensure_demo_network(&client, &tls).await?;
    }
    eprintln!(
        "local cluster in {} ({} hosts); client configuration: {}",
        layout.dir.display(),
        manifest.hosts.len(),
        layout.client_config().display()
    );
    Ok(())
}

fn lock_port_choice() -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = std::env::temp_dir().join("ferry-local-up.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow::anyhow!("cannot lock {}: {errno}", path.display()))
}

fn ensure_ca(layout: &Layout) -> anyhow::Result<ferry_pki::ClusterCa> {
    let pki = layout.pki();
    if pki.join("ca.pem").exists() {
        return ferry_pki::ClusterCa::load(&pki)
            .with_context(|| format!("cannot load the local cluster's CA from {}", pki.display()));
    }
    let ca = ferry_pki::ClusterCa::create("ferry-local").context("cannot create a CA")?;
    ca.save(&pki)
        .with_context(|| format!("cannot save the CA in {}", pki.display()))?;
    let admin = ca
        .issue_client("admin", ferry_pki::Role::Admin)
        .context("cannot issue the admin certificate")?;
    admin.save(&pki, "admin")?;
    Ok(ca)
}

fn load_manifest(layout: &Layout) -> anyhow::Result<Manifest> {
    let path = layout.manifest();
    if !path.exists() {
        return Ok(Manifest::default());
    }
    let text = std::fs::read_to_string(&path)?;
    toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))
}

/// Where loopback clusters record the ports they chose (one file per port,
/// naming the cluster's folder).
///
/// Why: "nothing listens on it now" is not enough. A ferryd that is down
/// for a moment (restarted by a test, or crashed and about to be started
/// again) leaves its port free, and another cluster's `local up` would take
/// it; the first cluster's ferryd could then never listen again.
fn port_claims_dir() -> PathBuf {
    std::env::temp_dir().join("ferry-local-ports")
}

/// Whether another cluster that still exists recorded `port` as its own.
fn port_claimed_by_other(port: u16, dir: &Path) -> bool {
    let Ok(owner) = std::fs::read_to_string(port_claims_dir().join(port.to_string())) else {
        return false;
    };
    let owner = Path::new(owner.trim());
    owner != dir && owner.join("local.toml").exists()
}

fn claim_port(port: u16, dir: &Path) -> anyhow::Result<()> {
    let claims = port_claims_dir();
    std::fs::create_dir_all(&claims)
        .with_context(|| format!("cannot create {}", claims.display()))?;
    std::fs::write(claims.join(port.to_string()), dir.display().to_string())
        .with_context(|| format!("cannot record the claim of port {port}"))
}

/// Forgets the ports `dir` claimed (`down --purge`).
fn release_ports(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(port_claims_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if std::fs::read_to_string(entry.path()).is_ok_and(|owner| Path::new(owner.trim()) == dir) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The first port from `start` that is not taken by another local host,
/// not claimed by another local cluster, and that nothing listens on now;
/// claimed for `dir`. Call it under `local up`'s lock.
fn free_port(start: u16, taken: &[u16], dir: &Path) -> anyhow::Result<u16> {
    for port in start..start.saturating_add(200) {
        if taken.contains(&port) || port_claimed_by_other(port, dir) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            claim_port(port, dir)?;
            return Ok(port);
        }
    }
    bail!("no free port from {start} on 127.0.0.1")
}

fn write_host_files(
    layout: &Layout,
    ca: &ferry_pki::ClusterCa,
    host: &ManifestHost,
    controller: &ManifestHost,
) -> anyhow::Result<()> {
    let dir = layout.host(&host.name);
    for sub in ["state", "datastores/local", "datastores/local2"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let cert = layout.pki().join(format!("{}.pem", host.name));
    if !cert.exists() {
        let mut sans = vec![
            host.name.clone(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ];
        if let Some(link) = &host.netns {
            // Clients reach a namespace host by its address.
            sans.push(link.address.to_string());
        }
        ca.issue_host(&host.name, &sans)
            .with_context(|| format!("cannot issue a certificate for {}", host.name))?
            .save(&layout.pki(), &host.name)?;
    }
    let config = format!(
        r#"# Written by `ferry local up`; rewritten on every run.
name = "{name}"
listen = "{ip}:{port}"
state_dir = "state"
accel = "auto"
stop_timeout_secs = 30
controller = "{controller_url}"
{migration_address}
[tls]
ca = "{pki}/ca.pem"
cert = "{pki}/{name}.pem"
key = "{pki}/{name}-key.pem"

[datastores]
local = "datastores/local"
local2 = "datastores/local2"
shared = "{shared}"

[networks]
# Agents create a missing bridge of a cluster network (root only).
create_bridges = {create_bridges}
{controller_role}"#,
        name = host.name,
        ip = host.ip(),
        port = host.port,
        pki = layout.pki().display(),
        shared = layout.shared().display(),
        controller_url = controller.url(),
        // Said explicitly in namespace mode (it equals the default, the
        // listen address): the migration stream and NBD must use the veth.
        migration_address = match &host.netns {
            Some(link) => format!("migration_address = \"{}\"\n", link.address),
            None => String::new(),
        },
        create_bridges = nix::unistd::geteuid().is_root(),
        controller_role = if host.name == controller.name {
            "\n[controller_role]\nenabled = true\n"
        } else {
            ""
        },
    );
    std::fs::write(dir.join("ferryd.toml"), config)?;
    Ok(())
}

/// The network `examples/demo-net-vm.toml` uses.
pub const DEMO_NETWORK: &str = "demo-lan";

/// Defines `demo-lan` on bridge `ferrylan0` unless it exists: root only,
/// since only root's agents can make taps and bridges.
async fn ensure_demo_network(
    client: &ClientConfig,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> anyhow::Result<()> {
    let url = client
        .controller
        .as_deref()
        .context("the local cluster has no controller")?;
    let controller = ferry_api::Client::controller(url, tls.clone())?;
    let existing = controller.list_networks().await?;
    if existing.iter().any(|n| n.name == DEMO_NETWORK) {
        return Ok(());
    }
    controller
        .create_network(&ferry_api::CreateNetworkRequest {
            name: DEMO_NETWORK.to_string(),
            bridge: netns::HOST_LAN_BRIDGE.to_string(),
            vlan: None,
        })
        .await
        .with_context(|| format!("cannot define the network {DEMO_NETWORK}"))?;
    Ok(())
}

/// ferryd sits next to the `ferry` binary (cargo builds both into one
/// folder; packages install both into one folder); `FERRYD` overrides.
fn ferryd_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FERRYD") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot find the ferry binary's folder")?;
    let sibling = exe.with_file_name("ferryd");
    if sibling.exists() {
        return Ok(sibling);
    }
    bail!(
        "ferryd not found next to {} (build it with `cargo build --bins`, or set FERRYD)",
        exe.display()
    )
}

/// The pid of the host's ferryd when it runs.
fn running_ferryd(layout: &Layout, name: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(layout.pidfile(name))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let config = layout.host(name).join("ferryd.toml");
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("ferryd") && cmdline.contains(&*config.to_string_lossy())).then_some(pid)
}

fn start_ferryd(
    layout: &Layout,
    ferryd: &Path,
    host: &ManifestHost,
) -> anyhow::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let name = host.name.as_str();
    let dir = layout.host(name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ferryd.log"))?;
    // In namespace mode `ip netns exec` execs ferryd in the host's
    // namespace: the pid recorded below is ferryd's, and the QEMUs it
    // starts inherit the namespace.
    let mut command = match &host.netns {
        Some(link) => netns::command_in(link, ferryd),
        None => std::process::Command::new(ferryd),
    };
    let child = command
        .arg("--config")
        .arg(dir.join("ferryd.toml"))
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C in the terminal that ran `ferry
        // local up` must not take the cluster down.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", ferryd.display()))?;
    std::fs::write(layout.pidfile(name), format!("{}\n", child.id()))?;
    Ok(child)
}

async fn wait_healthy(
    layout: &Layout,
    api: &ferry_api::Client,
    name: &str,
    child: &mut std::process::Child,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        match api.host().await {
            Ok(_) => return Ok(()),
            Err(error) => {
                // The child handle, not /proc: right after the fork the
                // child's command line is still ours.
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "ferryd of {name} exited ({status}); the end of {}:\n{}",
                        layout.host(name).join("ferryd.log").display(),
                        log_tail(&layout.host(name).join("ferryd.log"))
                    );
                }
                if started.elapsed() > START_TIMEOUT {
                    return Err(error).context(format!(
                        "ferryd of {name} did not answer within {START_TIMEOUT:?}"
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the controller knows every host (each joins as it starts).
async fn wait_joined(
    client: &ClientConfig,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    manifest: &Manifest,
) -> anyhow::Result<()> {
    let Some(url) = &client.controller else {
        return Ok(());
    };
    let api = ferry_api::Client::new(url, tls.clone())?;
    let started = Instant::now();
    loop {
        let joined = api.cluster_hosts().await.unwrap_or_default();
        let missing: Vec<&str> = manifest
            .hosts
            .iter()
            .map(|h| h.name.as_str())
            .filter(|name| !joined.iter().any(|j| j == name))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "the controller did not hear from {} within {START_TIMEOUT:?}",
                missing.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

async fn status(dir: &Path, format: Format) -> anyhow::Result<()> {
    let layout = Layout {
        dir: dir.to_path_buf(),
    };
    if !layout.manifest().exists() {
        bail!(
            "no local cluster in {} (run `ferry local up`)",
            dir.display()
        );
    }
    let manifest = load_manifest(&layout)?;
    let client = ClientConfig::load(&layout.client_config())?;
    let tls = client.tls()?;
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for host in &manifest.hosts {
        let pid = running_ferryd(&layout, &host.name);
        let url = host.url();
        let vms = match pid {
            Some(_) => ferry_api::Client::new(&url, tls.clone())?
                .list_vms()
                .await
                .ok()
                .map(|v| v.len()),
            None => None,
        };
        rows.push(vec![
            host.name.clone(),
            url.clone(),
            pid.map(|p| format!("up (pid {p})"))
                .unwrap_or_else(|| "down".into()),
            vms.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
        ]);
        json.push(serde_json::json!({
            "name": host.name, "url": url, "up": pid.is_some(), "pid": pid, "vms": vms,
            "address": host.ip(),
            "netns": host.netns.as_ref().map(|l| &l.netns),
        }));
    }
    if format == Format::Json {
        output::json(&serde_json::json!({
            "dir": layout.dir, "config": layout.client_config(), "hosts": json,
            "netns": manifest.netns,
        }))
    } else {
        output::table(&["HOST", "URL", "FERRYD", "VMS"], &rows);
        Ok(())
    }
}

async fn down(dir: &Path, purge: bool) -> anyhow::Result<()> {
    let layout = Layout {
        // Canonical, as `up` recorded it (in the namespace subnet's claim).
        dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
    };
    if !layout.manifest().exists() {
        if purge && dir.exists() {
            bail!(
                "{} holds no local cluster (no local.toml); not deleting it",
                dir.display()
            );
        }
        eprintln!("no local cluster in {}", dir.display());
        return Ok(());
    }
    let manifest = load_manifest(&layout)?;
    let network = manifest.network()?;
    if network.is_some() {
        netns::require_tools()?;
    }
    let tls = ClientConfig::load(&layout.client_config())
        .and_then(|c| c.tls())
        .ok();
    for host in &manifest.hosts {
        if let (Some(pid), Some(tls)) = (running_ferryd(&layout, &host.name), &tls) {
            // Stop the VMs through their agent first, so that it records them
            // as stopped rather than crashed.
            let api = ferry_api::Client::new(&host.url(), tls.clone())?;
            if let Ok(vms) = api.list_vms().await {
                for vm in vms.iter().filter(|vm| vm.state.has_process()) {
                    let request = ferry_api::StopVmRequest {
                        force: true,
                        timeout_secs: None,
                    };
                    if let Err(error) = api.stop_vm(&vm.name, &request).await {
                        eprintln!(
                            "warning: cannot stop VM {}: {}",
                            vm.name,
                            ferry_api::error_chain(&error)
                        );
                    }
                }
            }
            terminate(pid, Duration::from_secs(10));
        }
        // Whatever QEMU is left (its agent was down or did not answer) is
        // ended through its pidfile: `down` leaves no process behind.
        kill_leftover_qemus(&layout.host(&host.name).join("state/vms"));
        let _ = std::fs::remove_file(layout.pidfile(&host.name));
    }
    if let Some((network, links)) = &network {
        // Whatever still runs in a namespace (a tool a test started there,
        // a QEMU launched by hand) is part of this cluster: a namespace with
        // a process in it would outlive its deletion.
        let namespaces = links
            .iter()
            .map(|link| link.netns.clone())
            .chain([network.client_netns()]);
        for ns in namespaces {
            for pid in netns::pids_in(&ns) {
                eprintln!("ending process {pid} left in namespace {ns}");
                terminate(pid, Duration::from_secs(5));
            }
        }
        netns::teardown(network, links)?;
    } else if nix::unistd::geteuid().is_root() {
        netns::remove_idle_lan_bridge();
    }
    if purge {
        std::fs::remove_dir_all(&layout.dir)
            .with_context(|| format!("cannot delete {}", layout.dir.display()))?;
        release_ports(&layout.dir);
        if let Some((network, _)) = &network {
            netns::release_claim(network.index, &layout.dir);
        }
        eprintln!("local cluster stopped and {} deleted", layout.dir.display());
    } else {
        eprintln!("local cluster in {} stopped", layout.dir.display());
    }
    Ok(())
}

fn terminate(pid: u32, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let started = Instant::now();
    while started.elapsed() < grace {
        if nix::sys::signal::kill(pid, None).is_err() {
            return;
        }
        // Reap it if it happens to be our child (it is when `up` and `down`
        // ran in one process, as in tests).
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

fn kill_leftover_qemus(vms_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(vms_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let vm_dir = entry.path();
        let Ok(text) = std::fs::read_to_string(vm_dir.join("qemu.pid")) else {
            continue;
        };
        let Ok(pid) = text.trim().parse::<u32>() else {
            continue;
        };
        // Only a QEMU whose command line names this VM's folder: a reused pid
        // belongs to someone else.
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&*vm_dir.to_string_lossy()) {
            terminate(pid, Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_from_before_namespace_mode_still_loads() {
        let old = "[[hosts]]\nname = \"host1\"\nport = 7101\n";
        let manifest: Manifest = toml::from_str(old).unwrap();
        assert!(manifest.netns.is_none());
        assert_eq!(manifest.hosts[0].url(), "https://127.0.0.1:7101");
        assert!(manifest.network().unwrap().is_none());
        // And a loopback manifest is written as before: no new keys.
        assert_eq!(toml::to_string(&manifest).unwrap(), old);
    }

    #[test]
    fn a_namespace_manifest_round_trips_and_is_checked() {
        let network = netns::Network::new(9);
        let manifest = Manifest {
            hosts: vec![ManifestHost {
                name: "host1".into(),
                port: BASE_PORT,
                netns: Some(network.host_link("host1").unwrap()),
            }],
            netns: Some(network),
        };
        let text = toml::to_string(&manifest).unwrap();
        assert!(text.contains("[hosts.netns]"), "{text}");
        let back: Manifest = toml::from_str(&text).unwrap();
        assert_eq!(back.hosts[0].url(), "https://198.18.9.2:7101");
        let (network, links) = back.network().unwrap().unwrap();
        assert_eq!(network.bridge, "ferry9br");
        assert_eq!(links.len(), 1);

        let tampered = text.replace("ferry9b1", "eth0");
        let bad: Manifest = toml::from_str(&tampered).unwrap();
        assert!(bad.network().is_err());
    }
}

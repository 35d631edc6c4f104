//! `ferry vm …`: define, run and watch VMs.
//!
//! When the configuration names a controller, every command goes through it
//! (`/v1/cluster/vms…`): it places new VMs, finds each VM's host and passes
//! the request on, so the client needs no host list. Without a controller
//! the CLI does the same itself, host by host. Either way the output is the
//! same: both paths print the agents' `VmInfo`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use ferry_api::{CreateVmRequest, DeleteVmQuery, StopVmRequest, VmInfo};
use futures::StreamExt;

use crate::config::Connection;
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM from a spec file (TOML), optionally starting it.
    Create {
        /// The VM spec file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Host to place it on (default: the host with the most free memory).
        #[arg(long)]
        host: Option<String>,
        /// Start it once defined.
        #[arg(long)]
        start: bool,
    },
    /// List VMs on every host.
    List,
    /// Show one VM.
    Show { name: String },
    /// Start a stopped (or crashed) VM.
    Start { name: String },
    /// Stop a VM: ACPI power button, then forced after a timeout.
    Stop {
        name: String,
        /// End QEMU at once, without asking the guest.
        #[arg(long)]
        force: bool,
        /// Seconds the guest gets to power off before it is forced.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Pause the guest's CPUs.
    Pause { name: String },
    /// Resume a paused guest.
    Resume { name: String },
    /// Delete a stopped VM and the datastore disks Ferry created for it.
    Delete {
        name: String,
        /// Keep its disk files.
        #[arg(long)]
        keep_disks: bool,
    },
    /// Print the tail of the VM's serial console.
    Console {
        name: String,
        /// How many lines of the tail.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
        /// Keep printing what the guest writes until it stops (Ctrl-C ends).
        #[arg(long)]
        follow: bool,
    },
}

pub async fn run(command: VmCommand, conn: &Connection, format: Format) -> anyhow::Result<()> {
    match command {
        VmCommand::Create { file, host, start } => create(conn, &file, host, start, format).await,
        VmCommand::List => list(conn, format).await,
        VmCommand::Show { name } => {
            let info = match cluster(conn) {
                Some(controller) => controller.get_vm(&name).await?,
                None => find(conn, &name).await?.1,
            };
            print_vm(&info, format)
        }
        VmCommand::Start { name } => {
            let client = owner(conn, &name).await?;
            print_vm(&client.start_vm(&name).await?, format)
        }
        VmCommand::Stop {
            name,
            force,
            timeout,
        } => {
            let client = owner(conn, &name).await?;
            let request = StopVmRequest {
                force,
                timeout_secs: timeout,
            };
            print_vm(&client.stop_vm(&name, &request).await?, format)
        }
        VmCommand::Pause { name } => {
            let client = owner(conn, &name).await?;
            print_vm(&client.pause_vm(&name).await?, format)
        }
        VmCommand::Resume { name } => {
            let client = owner(conn, &name).await?;
            print_vm(&client.resume_vm(&name).await?, format)
        }
        VmCommand::Delete { name, keep_disks } => {
            let client = owner(conn, &name).await?;
            client
                .delete_vm(
                    &name,
                    &DeleteVmQuery {
                        keep_disks,
                        all_disks: false,
                    },
                )
                .await?;
            if format == Format::Json {
                output::json(&serde_json::json!({ "deleted": name }))
            } else {
                println!("deleted VM {name}");
                Ok(())
            }
        }
        VmCommand::Console {
            name,
            lines,
            follow,
        } => {
            let client = owner(conn, &name).await?;
            if follow {
                let response = client.console_follow(&name, lines).await?;
                let mut stream = response.bytes_stream();
                let mut stdout = std::io::stdout();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.context("console stream broke")?;
                    stdout.write_all(&chunk)?;
                    stdout.flush()?;
                }
                Ok(())
            } else {
                print!("{}", client.console(&name, lines).await?);
                Ok(())
            }
        }
    }
}

/// The controller's client for cluster-wide VM paths, when the
/// configuration names a controller.
fn cluster(conn: &Connection) -> Option<ferry_api::Client> {
    conn.controller
        .as_ref()
        .map(ferry_api::Client::with_cluster_paths)
}

/// Where requests about VM `name` go: the controller (which finds the VM's
/// host itself), or else the host that has the VM.
async fn owner(conn: &Connection, name: &str) -> anyhow::Result<ferry_api::Client> {
    match cluster(conn) {
        Some(controller) => Ok(controller),
        None => Ok(find(conn, name).await?.0.clone()),
    }
}

/// The host client and current info of a VM, searching every host.
pub async fn find<'a>(
    conn: &'a Connection,
    name: &str,
) -> anyhow::Result<(&'a ferry_api::Client, VmInfo)> {
    let mut unreachable = Vec::new();
    for (entry, client) in &conn.hosts {
        match client.get_vm(name).await {
            Ok(info) => return Ok((client, info)),
            Err(error) if error.is_not_found() => {}
            Err(error) => unreachable.push(format!("{}: {}", entry.name, chain(&error))),
        }
    }
    if unreachable.is_empty() {
        bail!("no VM named {name:?} on any host");
    }
    bail!(
        "no VM named {name:?} on the reachable hosts; unreachable: {}",
        unreachable.join("; ")
    )
}

async fn create(
    conn: &Connection,
    file: &std::path::Path,
    host: Option<String>,
    start: bool,
    format: Format,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the spec file {}", file.display()))?;
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let base = std::fs::canonicalize(base)
        .with_context(|| format!("cannot resolve the folder of {}", file.display()))?;
    let spec = ferry_core::spec::VmSpec::from_toml_str(&text, &base)
        .with_context(|| format!("invalid VM spec {}", file.display()))?;
    if let Some(controller) = cluster(conn) {
        // The controller checks the name and places the VM.
        let info = controller
            .place_vm(
                &CreateVmRequest {
                    spec,
                    start,
                    networks: Vec::new(),
                    arriving_disks: Default::default(),
                },
                host.as_deref(),
            )
            .await?;
        return print_vm(&info, format);
    }
    // Names are unique across the cluster, not only per host.
    for (entry, client) in &conn.hosts {
        match client.get_vm(&spec.name).await {
            Ok(_) => bail!(
                "a VM named {:?} already exists on host {}",
                spec.name,
                entry.name
            ),
            Err(error) if error.is_not_found() => {}
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot check VM names on host {}", entry.name))
            }
        }
    }
    let client = match &host {
        Some(name) => conn.host(name)?,
        None => place(conn, spec.memory_bytes).await?,
    };
    let info = client
        .create_vm(&CreateVmRequest {
            spec,
            start,
            networks: Vec::new(),
            arriving_disks: Default::default(),
        })
        .await?;
    print_vm(&info, format)
}

/// The host with the most available memory that fits the VM.
async fn place(conn: &Connection, memory: u64) -> anyhow::Result<&ferry_api::Client> {
    let mut best: Option<(u64, &ferry_api::Client)> = None;
    for (_, client) in &conn.hosts {
        let Ok(info) = client.host().await else {
            continue;
        };
        if info.memory_available_bytes < memory {
            continue;
        }
        if best.is_none_or(|(free, _)| info.memory_available_bytes > free) {
            best = Some((info.memory_available_bytes, client));
        }
    }
    best.map(|(_, client)| client).with_context(|| {
        format!(
            "no reachable host has {} of memory available",
            output::bytes(memory)
        )
    })
}

async fn list(conn: &Connection, format: Format) -> anyhow::Result<()> {
    let mut all = Vec::new();
    let mut problems = Vec::new();
    if let Some(controller) = cluster(conn) {
        let listing = controller.list_vms_report().await?;
        all = listing.vms;
        problems = listing
            .unreachable
            .into_iter()
            .map(|(host, why)| format!("host {host}: {why}"))
            .collect();
    } else {
        for (entry, client) in &conn.hosts {
            match client.list_vms().await {
                Ok(vms) => all.extend(vms),
                Err(error) => problems.push(format!("host {}: {}", entry.name, chain(&error))),
            }
        }
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    if format == Format::Json {
        output::json(&all)?;
    } else {
        let rows: Vec<Vec<String>> = all
            .iter()
            .map(|vm| {
                vec![
                    vm.name.clone(),
                    vm.host.clone(),
                    vm.state.to_string(),
                    vm.vcpus.to_string(),
                    output::bytes(vm.memory_bytes),
                    vm.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    vm.accel.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        output::table(
            &["NAME", "HOST", "STATE", "VCPUS", "MEMORY", "PID", "ACCEL"],
            &rows,
        );
    }
    for problem in &problems {
        eprintln!("warning: {problem}");
    }
    Ok(())
}

fn print_vm(info: &VmInfo, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        return output::json(info);
    }
    let dash = || "-".to_string();
    let rows = [
        ("name", info.name.clone()),
        ("uuid", info.uuid.to_string()),
        ("host", info.host.clone()),
        ("state", info.state.to_string()),
        ("reason", info.state_reason.clone().unwrap_or_else(dash)),
        ("pid", info.pid.map(|p| p.to_string()).unwrap_or_else(dash)),
        (
            "accel",
            match (&info.accel, &info.accel_reason) {
                (Some(a), Some(r)) => format!("{a} ({r})"),
                (Some(a), None) => a.clone(),
                _ => dash(),
            },
        ),
        ("vcpus", info.vcpus.to_string()),
        ("memory", output::bytes(info.memory_bytes)),
        ("machine", info.spec.machine_type.clone()),
        ("cpu", info.spec.cpu_model.clone()),
        (
            "disks",
            info.spec
                .disks
                .iter()
                .map(|d| d.id.clone())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        (
            "nics",
            info.spec
                .nics
                .iter()
                .map(|n| format!("{} ({}, {})", n.id, n.mac, nic_attachment(&n.backend)))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    ];
    for (key, value) in rows {
        println!("{key:<8} {value}");
    }
    for warning in &info.warnings {
        println!("warning  {warning}");
    }
    Ok(())
}

fn nic_attachment(backend: &ferry_core::spec::NicBackend) -> String {
    use ferry_core::spec::NicBackend;
    match backend {
        NicBackend::User => "user-mode".to_string(),
        NicBackend::None => "not connected".to_string(),
        NicBackend::Bridge { bridge } => format!("bridge {bridge}"),
        NicBackend::Tap { tap } => format!("tap {tap}"),
        NicBackend::Network { network } => format!("network {network}"),
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    ferry_api::error_chain(error)
}

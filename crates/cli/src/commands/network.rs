//! `ferry network …`: the cluster's networks (through the controller). A
//! network is a name each host maps to a local Linux bridge; a VM's NIC
//! joins it with `network = "NAME"` in its spec, and keeps its connections
//! when the VM migrates between hosts on that network.

use clap::Subcommand;
use ferry_api::{CreateNetworkRequest, NetworkInfo};

use crate::config::Connection;
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Define a network for the whole cluster.
    Create {
        name: String,
        /// The Linux bridge every host attaches the network's taps to
        /// (created on a host that lacks it, if the host's configuration
        /// allows: `[networks] create_bridges = true`).
        #[arg(long)]
        bridge: String,
        /// 802.1Q VLAN id (1-4094): each NIC becomes an untagged port of
        /// this VLAN on a VLAN-filtering bridge.
        #[arg(long)]
        vlan: Option<u16>,
    },
    /// List the networks.
    List,
    /// Show a network: its bridge, the VMs on it, and which hosts serve it.
    Show { name: String },
    /// Forget a network (refused while a VM uses it).
    Delete { name: String },
}

pub async fn run(command: NetworkCommand, conn: &Connection, format: Format) -> anyhow::Result<()> {
    let controller = conn.controller()?;
    match command {
        NetworkCommand::Create { name, bridge, vlan } => {
            let info = controller
                .create_network(&CreateNetworkRequest { name, bridge, vlan })
                .await?;
            if format == Format::Json {
                return output::json(&info);
            }
            println!(
                "network {} created on bridge {}{}",
                info.name,
                info.bridge,
                vlan_text(info.vlan)
            );
            Ok(())
        }
        NetworkCommand::List => {
            let networks = controller.list_networks().await?;
            if format == Format::Json {
                return output::json(&networks);
            }
            let rows: Vec<Vec<String>> = networks
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.bridge.clone(),
                        n.vlan.map_or("-".to_string(), |v| v.to_string()),
                        n.vms.len().to_string(),
                        hosts_text(n),
                    ]
                })
                .collect();
            output::table(&["NAME", "BRIDGE", "VLAN", "VMS", "HOSTS"], &rows);
            Ok(())
        }
        NetworkCommand::Show { name } => {
            let info = controller.get_network(&name).await?;
            if format == Format::Json {
                return output::json(&info);
            }
            println!("name    {}", info.name);
            println!("bridge  {}{}", info.bridge, vlan_text(info.vlan));
            println!(
                "vms     {}",
                if info.vms.is_empty() {
                    "-".to_string()
                } else {
                    info.vms.join(", ")
                }
            );
            for host in &info.hosts {
                match &host.problem {
                    None => println!("host    {}: available", host.host),
                    Some(why) => println!("host    {}: unavailable: {why}", host.host),
                }
            }
            Ok(())
        }
        NetworkCommand::Delete { name } => {
            controller.delete_network(&name).await?;
            if format == Format::Json {
                return output::json(&serde_json::json!({ "deleted": name }));
            }
            println!("network {name} deleted");
            Ok(())
        }
    }
}

fn vlan_text(vlan: Option<u16>) -> String {
    vlan.map_or(String::new(), |v| format!(" (VLAN {v})"))
}

/// `host1, host2` for the hosts that serve it, `-` for none.
fn hosts_text(info: &NetworkInfo) -> String {
    let serving: Vec<&str> = info
        .hosts
        .iter()
        .filter(|h| h.available)
        .map(|h| h.host.as_str())
        .collect();
    if serving.is_empty() {
        "-".to_string()
    } else {
        serving.join(", ")
    }
}

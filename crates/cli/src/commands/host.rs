//! `ferry host …`: the hosts of the cluster and their facts.

use clap::Subcommand;

use crate::config::Connection;
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// List hosts with their capacity.
    List,
    /// Show one host's facts.
    Show { name: String },
}

pub async fn run(command: HostCommand, conn: &Connection, format: Format) -> anyhow::Result<()> {
    match command {
        HostCommand::List => {
            let mut infos = Vec::new();
            let mut rows = Vec::new();
            for (entry, client) in &conn.hosts {
                match client.host().await {
                    Ok(info) => {
                        rows.push(vec![
                            info.name.clone(),
                            "up".to_string(),
                            info.cpus.to_string(),
                            format!(
                                "{} / {}",
                                output::bytes(info.memory_available_bytes),
                                output::bytes(info.memory_bytes)
                            ),
                            info.vm_count.to_string(),
                            info.accel.clone(),
                            info.qemu_version.clone(),
                        ]);
                        infos.push(serde_json::to_value(&info)?);
                    }
                    Err(error) => {
                        rows.push(vec![
                            entry.name.clone(),
                            "unreachable".to_string(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                        ]);
                        infos.push(serde_json::json!({
                            "name": entry.name,
                            "address": entry.url,
                            "error": ferry_api::error_chain(&error),
                        }));
                    }
                }
            }
            if format == Format::Json {
                output::json(&infos)
            } else {
                output::table(
                    &[
                        "NAME",
                        "STATUS",
                        "CPUS",
                        "MEMORY FREE / TOTAL",
                        "VMS",
                        "ACCEL",
                        "QEMU",
                    ],
                    &rows,
                );
                Ok(())
            }
        }
        HostCommand::Show { name } => {
            let info = conn.host(&name)?.host().await?;
            if format == Format::Json {
                return output::json(&info);
            }
            println!("name       {}", info.name);
            println!("address    {}", info.address);
            println!("cpus       {}", info.cpus);
            println!(
                "memory     {} available of {}",
                output::bytes(info.memory_available_bytes),
                output::bytes(info.memory_bytes)
            );
            println!("qemu       {}", info.qemu_version);
            println!("accel      {} ({})", info.accel, info.accel_reason);
            println!("vms        {}", info.vm_count);
            println!(
                "machines   {} types (e.g. {})",
                info.machine_types.len(),
                info.machine_types
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!("cpu models {}", info.cpu_models.len());
            for store in &info.datastores {
                println!(
                    "datastore  {:<8} {} ({} free of {})",
                    store.name,
                    store.path,
                    output::bytes(store.free_bytes),
                    output::bytes(store.total_bytes)
                );
            }
            Ok(())
        }
    }
}

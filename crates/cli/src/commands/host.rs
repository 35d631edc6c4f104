//! `ferry host …`: the hosts of the cluster and their facts: the hosts that
//! joined the controller when the configuration names one, else the hosts
//! the configuration lists. The output is the same either way.

use clap::Subcommand;
use ferry_api::HostInfo;

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
            for (name, address, answer) in survey(conn).await? {
                match answer {
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
                            name.clone(),
                            "unreachable".to_string(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                        ]);
                        infos.push(serde_json::json!({
                            "name": name,
                            "address": address,
                            "error": error,
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
            let info = match &conn.controller {
                Some(controller) => controller.cluster_host(&name).await?,
                None => conn.host(&name)?.host().await?,
            };
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

/// Every host as `(name, address, facts or why not)`: from the controller
/// (the hosts that joined it, asked by it) when there is one, else from
/// each host the configuration lists.
async fn survey(
    conn: &Connection,
) -> anyhow::Result<Vec<(String, String, Result<HostInfo, String>)>> {
    if let Some(controller) = &conn.controller {
        return Ok(controller
            .cluster_host_list()
            .await?
            .into_iter()
            .map(|host| {
                let answer = match (host.info, host.error) {
                    (Some(info), _) => Ok(info),
                    (None, error) => Err(error.unwrap_or_else(|| "no answer".to_string())),
                };
                (host.name, host.url, answer)
            })
            .collect());
    }
    let mut hosts = Vec::new();
    for (entry, client) in &conn.hosts {
        let answer = client
            .host()
            .await
            .map_err(|error| ferry_api::error_chain(&error));
        hosts.push((entry.name.clone(), entry.url.clone(), answer));
    }
    Ok(hosts)
}

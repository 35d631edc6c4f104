//! A host's side of cluster networks: the Linux bridge a network maps to,
//! and the tap device each NIC on it gets.
//!
//! Life of a tap: QEMU creates it (`-netdev tap,ifname=…`, named by
//! `ferry_qemu::cmdline::bridge_tap_name`) when it starts, this module
//! attaches it to the network's bridge and brings it up before the guest
//! runs (or, on a migration destination, before the stream starts), and the
//! kernel deletes it when QEMU exits, because QEMU creates it non-persistent.
//! So no path (stop, crash, delete, a migration leaving or aborted, even an
//! agent that is down) can leave a tap or a bridge port behind.
//!
//! The bridge is created when missing if the host allows it
//! (`[networks] create_bridges`), and never deleted by the agent: other
//! hosts' VMs, or the operator's own ports, may be on it.
//!
//! Why the `ip` and `bridge` commands rather than a netlink crate: they are
//! on every host that runs QEMU with taps (iproute2), their JSON output is a
//! stable interface, their error messages are the ones operators know, and
//! the handful of calls here run once per VM start, never in a hot path.
//! The netlink crates' APIs have changed with most releases, which would cost
//! more than the process spawns do.

use std::process::Output;

use ferry_core::network::{HostNetworkPolicy, NetworkDef};
use serde::Deserialize;
use tokio::process::Command;

/// Why a network could not be given to a NIC.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("bridge {bridge} of network {network} does not exist on this host, and [networks] create_bridges is off")]
    BridgeMissing { network: String, bridge: String },
    #[error(
        "{bridge} (network {network}) exists on this host but is a {kind} interface, not a bridge"
    )]
    NotABridge {
        network: String,
        bridge: String,
        kind: String,
    },
    #[error("bridge {bridge} of VLAN network {network} does not filter VLANs (set vlan_filtering 1 on it)")]
    NoVlanFiltering { network: String, bridge: String },
    #[error("network {network} is a VLAN, and this host's kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)")]
    NoVlanSupport { network: String },
    #[error(
        "this host does not serve network {network} (see [networks] serve in its configuration)"
    )]
    NotServed { network: String },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}` (is iproute2 installed?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the output of `{command}`")]
    Output {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

/// What `ip -j -d link show` says about one interface (the parts used).
#[derive(Debug, Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
    #[serde(default)]
    master: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LinkInfo {
    #[serde(default)]
    info_kind: Option<String>,
    #[serde(default)]
    info_data: Option<serde_json::Value>,
}

async fn run(program: &str, args: &[&str]) -> Result<Output, NetworkError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| NetworkError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(NetworkError::Command {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output)
}

/// The interface of this name, or `None` when there is none.
async fn link(name: &str) -> Result<Option<Link>, NetworkError> {
    let args = ["-j", "-d", "link", "show", "dev", name];
    match run("ip", &args).await {
        Ok(output) => {
            let mut links: Vec<Link> =
                serde_json::from_slice(&output.stdout).map_err(|source| NetworkError::Output {
                    command: format!("ip {}", args.join(" ")),
                    source,
                })?;
            Ok(links.pop())
        }
        // "Device "x" does not exist." is the one expected failure.
        Err(NetworkError::Command { stderr, .. }) if stderr.contains("does not exist") => Ok(None),
        Err(error) => Err(error),
    }
}

/// The bridges of this host (for `HostInfo`); empty if `ip` cannot say.
pub async fn bridges() -> Vec<String> {
    let Ok(output) = run("ip", &["-j", "link", "show", "type", "bridge"]).await else {
        return Vec::new();
    };
    let links: Vec<Link> = serde_json::from_slice(&output.stdout).unwrap_or_default();
    let mut names: Vec<String> = links.into_iter().map(|l| l.ifname).collect();
    names.sort();
    names
}

/// The host's policy as `HostInfo` reports it.
pub async fn policy(config: &NetworkConfig) -> HostNetworkPolicy {
    HostNetworkPolicy {
        serve: config.serve.clone(),
        create_bridges: config.create_bridges,
        bridges: bridges().await,
    }
}

/// The `[networks]` part of the host's configuration.
#[derive(Debug, Clone, Default)]
pub struct NetworkConfig {
    /// The cluster networks this host serves; `None` serves all.
    pub serve: Option<Vec<String>>,
    /// Create a network's bridge when it is missing.
    pub create_bridges: bool,
}

/// Checks, without changing anything, that this host can give a NIC a port
/// on `network`: it serves it, and its bridge is a bridge (with VLAN
/// filtering for a VLAN network) or may be created.
pub async fn check(config: &NetworkConfig, network: &NetworkDef) -> Result<(), NetworkError> {
    if let Some(serve) = &config.serve {
        if !serve.contains(&network.name) {
            return Err(NetworkError::NotServed {
                network: network.name.clone(),
            });
        }
    }
    match link(&network.bridge).await? {
        Some(existing) => check_is_bridge(network, &existing),
        None if config.create_bridges => Ok(()),
        None => Err(NetworkError::BridgeMissing {
            network: network.name.clone(),
            bridge: network.bridge.clone(),
        }),
    }
}

fn check_is_bridge(network: &NetworkDef, link: &Link) -> Result<(), NetworkError> {
    let info = link.linkinfo.as_ref();
    let kind = info.and_then(|i| i.info_kind.clone());
    if kind.as_deref() != Some("bridge") {
        return Err(NetworkError::NotABridge {
            network: network.name.clone(),
            bridge: network.bridge.clone(),
            kind: kind.unwrap_or_else(|| "plain".to_owned()),
        });
    }
    if network.vlan.is_some() {
        let filtering = info
            .and_then(|i| i.info_data.as_ref())
            .and_then(|data| data.get("vlan_filtering"))
            .and_then(serde_json::Value::as_u64)
            == Some(1);
        if !filtering {
            return Err(NetworkError::NoVlanFiltering {
                network: network.name.clone(),
                bridge: network.bridge.clone(),
            });
        }
    }
    Ok(())
}

/// Makes sure the network's bridge exists and is up, creating it if the
/// host allows. Safe to race with another agent creating the same bridge.
pub async fn ensure_bridge(
    config: &NetworkConfig,
    network: &NetworkDef,
) -> Result<(), NetworkError> {
    check(config, network).await?;
    if link(&network.bridge).await?.is_none() {
        // `vlan_filtering` only when needed: a kernel built without bridge
        // VLAN filtering refuses the attribute altogether, even as 0.
        let mut args = vec!["link", "add", "name", &network.bridge, "type", "bridge"];
        if network.vlan.is_some() {
            args.extend(["vlan_filtering", "1"]);
        }
        let created = run("ip", &args).await;
        if let Err(NetworkError::Command { stderr, .. }) = &created {
            if network.vlan.is_some() && stderr.contains("not supported") {
                return Err(NetworkError::NoVlanSupport {
                    network: network.name.clone(),
                });
            }
        }
        if let Err(error) = created {
            // Another agent on this host may have created it meanwhile.
            match link(&network.bridge).await? {
                Some(existing) => check_is_bridge(network, &existing)?,
                None => return Err(error),
            }
        }
        tracing::info!(bridge = %network.bridge, network = %network.name, "bridge created");
    }
    run("ip", &["link", "set", "dev", &network.bridge, "up"]).await?;
    Ok(())
}

/// Attaches QEMU's tap to the network's bridge and brings it up; on a VLAN
/// network the tap becomes an untagged access port of that VLAN only.
pub async fn attach_tap(tap: &str, network: &NetworkDef) -> Result<(), NetworkError> {
    run(
        "ip",
        &["link", "set", "dev", tap, "master", &network.bridge],
    )
    .await?;
    if let Some(vlan) = network.vlan {
        let vid = vlan.to_string();
        run(
            "bridge",
            &["vlan", "add", "dev", tap, "vid", &vid, "pvid", "untagged"],
        )
        .await?;
        if vlan != 1 {
            run("bridge", &["vlan", "del", "dev", tap, "vid", "1"]).await?;
        }
    }
    run("ip", &["link", "set", "dev", tap, "up"]).await?;
    Ok(())
}

/// The bridge a tap is attached to, if it exists (for tests and checks).
pub async fn tap_master(tap: &str) -> Result<Option<String>, NetworkError> {
    Ok(link(tap).await?.and_then(|l| l.master))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lan(bridge: &str, vlan: Option<u16>) -> NetworkDef {
        NetworkDef {
            name: "lan".into(),
            bridge: bridge.into(),
            vlan,
        }
    }

    fn parse(json: &str) -> Link {
        let mut links: Vec<Link> = serde_json::from_str(json).unwrap();
        links.pop().unwrap()
    }

    #[test]
    fn only_a_bridge_is_a_bridge() {
        let bridge = parse(
            r#"[{"ifname":"br0","linkinfo":{"info_kind":"bridge","info_data":{"vlan_filtering":0}}}]"#,
        );
        assert!(check_is_bridge(&lan("br0", None), &bridge).is_ok());
        let error = check_is_bridge(&lan("br0", Some(5)), &bridge).unwrap_err();
        assert!(
            matches!(error, NetworkError::NoVlanFiltering { .. }),
            "{error}"
        );

        let filtering = parse(
            r#"[{"ifname":"br0","linkinfo":{"info_kind":"bridge","info_data":{"vlan_filtering":1}}}]"#,
        );
        assert!(check_is_bridge(&lan("br0", Some(5)), &filtering).is_ok());

        let loopback = parse(r#"[{"ifname":"lo"}]"#);
        let error = check_is_bridge(&lan("lo", None), &loopback).unwrap_err();
        assert_eq!(
            error.to_string(),
            "lo (network lan) exists on this host but is a plain interface, not a bridge"
        );
        let veth = parse(r#"[{"ifname":"v0","linkinfo":{"info_kind":"veth"}}]"#);
        assert!(check_is_bridge(&lan("v0", None), &veth)
            .unwrap_err()
            .to_string()
            .contains("veth interface"));
    }

    #[tokio::test]
    async fn a_network_the_host_does_not_serve_is_refused_before_looking() {
        let config = NetworkConfig {
            serve: Some(vec!["other".into()]),
            create_bridges: true,
        };
        let error = check(&config, &lan("br0", None)).await.unwrap_err();
        assert!(matches!(error, NetworkError::NotServed { .. }), "{error}");
    }
}

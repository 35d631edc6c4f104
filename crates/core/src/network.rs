//! Cluster networks: a name every host maps to a local Linux bridge.
//!
//! A network is defined once, for the cluster (`ferry network create NAME
//! --bridge BR [--vlan N]`), and a VM's NIC names it (`network = "NAME"`).
//! Whichever host runs the VM gives the NIC a tap device on that bridge, so
//! the guest's MAC and IP stay on one L2 segment wherever it runs: the one
//! thing that lets a TCP connection survive a live migration.
//!
//! What a host offers is its own decision ([`HostNetworkPolicy`]): which
//! networks it serves and whether it may create a missing bridge. The
//! controller judges a host against a network with [`HostNetworkPolicy::provides`]
//! before it places or migrates a VM there, so a host that lacks a network
//! is refused before anything moves.

use serde::{Deserialize, Serialize};

use crate::names::{is_valid_interface_name, MAX_IFNAME_LEN};

/// Longest network name (it is part of messages and file names, not of any
/// interface name, so it is not bound by Linux's 15).
pub const MAX_NETWORK_NAME_LEN: usize = 63;

/// Highest usable 802.1Q VLAN id (0 and 4095 are reserved).
pub const MAX_VLAN_ID: u16 = 4094;

/// A cluster network as stored by the controller and handed to agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDef {
    pub name: String,
    /// The Linux bridge each host attaches the network's taps to.
    pub bridge: String,
    /// 802.1Q VLAN id: each tap becomes an untagged access port of this
    /// VLAN on a VLAN-filtering bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
}

impl NetworkDef {
    /// Every problem of the definition, `field: why`; empty when valid.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(problem) = name_problem(&self.name) {
            problems.push(format!("name: {problem}"));
        }
        if !is_valid_interface_name(&self.bridge) {
            problems.push(format!(
                "bridge: {:?} is not an interface name (letters, digits, '.', '_', '-'; at most \
                 {MAX_IFNAME_LEN})",
                self.bridge
            ));
        }
        if let Some(vlan) = self.vlan {
            if !(1..=MAX_VLAN_ID).contains(&vlan) {
                problems.push(format!(
                    "vlan: {vlan} is not a usable VLAN id (1 to {MAX_VLAN_ID})"
                ));
            }
        }
        problems
    }
}

/// Why `name` cannot name a network, or `None` when it can. The rules of VM
/// names: letters, digits, `.`, `_`, `-`, starting with a letter or digit.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if name.len() > MAX_NETWORK_NAME_LEN {
        return Some(format!(
            "must be at most {MAX_NETWORK_NAME_LEN} characters (got {})",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "may contain only letters, digits, '.', '_' and '-' (found {bad:?})"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Some("must start with a letter or digit".to_owned());
    }
    None
}

/// What one host does with cluster networks: its `[networks]` configuration
/// plus the bridges that exist on it now. Part of the host's `HostInfo`, so
/// the controller can judge placement and migration without asking again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNetworkPolicy {
    /// The cluster networks the host serves; `None` serves them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<Vec<String>>,
    /// Whether the agent creates a network's bridge when it is missing.
    #[serde(default)]
    pub create_bridges: bool,
    /// The Linux bridges that exist on the host.
    #[serde(default)]
    pub bridges: Vec<String>,
}

impl HostNetworkPolicy {
    /// Whether the host can give a NIC a port on `network`, and if not,
    /// why (for a message that starts with the host's name).
    pub fn provides(&self, network: &NetworkDef) -> Result<(), String> {
        if let Some(serve) = &self.serve {
            if !serve.iter().any(|name| name == &network.name) {
                return Err(format!(
                    "does not serve network {} (its [networks] serve list: {})",
                    network.name,
                    if serve.is_empty() {
                        "empty".to_owned()
                    } else {
                        serve.join(", ")
                    }
                ));
            }
        }
        if !self.create_bridges && !self.bridges.contains(&network.bridge) {
            return Err(format!(
                "has no bridge {} for network {}, and may not create one \
                 ([networks] create_bridges = false)",
                network.bridge, network.name
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lan(bridge: &str) -> NetworkDef {
        NetworkDef {
            name: "demo-lan".into(),
            bridge: bridge.into(),
            vlan: None,
        }
    }

    #[test]
    fn definitions_are_checked_field_by_field() {
        assert!(lan("ferrylan0").problems().is_empty());
        let bad = NetworkDef {
            name: "-x".into(),
            bridge: "a-bridge-name-too-long".into(),
            vlan: Some(4095),
        };
        let problems = bad.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("name:"));
        assert!(problems[1].starts_with("bridge:"));
        assert!(problems[2].starts_with("vlan:"));
        assert!(name_problem("").is_some());
        assert!(name_problem("a b").is_some());
        assert!(name_problem("lan.1_b-2").is_none());
    }

    #[test]
    fn a_host_provides_a_network_it_serves_and_can_bridge() {
        let existing = HostNetworkPolicy {
            serve: None,
            create_bridges: false,
            bridges: vec!["ferrylan0".into()],
        };
        assert_eq!(existing.provides(&lan("ferrylan0")), Ok(()));
        let missing = existing.provides(&lan("br9")).unwrap_err();
        assert!(missing.contains("no bridge br9"), "{missing}");

        let creates = HostNetworkPolicy {
            create_bridges: true,
            ..HostNetworkPolicy::default()
        };
        assert_eq!(creates.provides(&lan("br9")), Ok(()));

        let serves_none = HostNetworkPolicy {
            serve: Some(vec![]),
            create_bridges: true,
            bridges: vec!["ferrylan0".into()],
        };
        let refused = serves_none.provides(&lan("ferrylan0")).unwrap_err();
        assert!(
            refused.contains("does not serve network demo-lan"),
            "{refused}"
        );
    }
}

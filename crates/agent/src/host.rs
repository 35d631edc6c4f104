//! What every VM task of an agent shares: the host's name, folders,
//! datastores, QEMU binary and accelerator choice.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ferry_qemu::accel::AccelChoice;

/// Configuration of the agent role, as ferryd's config file gives it.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub host_name: String,
    /// The address this host's API is reached at, as advertised in HostInfo.
    pub address: String,
    pub state_dir: PathBuf,
    pub datastores: BTreeMap<String, PathBuf>,
    pub accel: ferry_qemu::accel::AccelSetting,
    /// qemu-system-x86_64; found on PATH (or `FERRY_QEMU`) when absent.
    pub qemu_binary: Option<PathBuf>,
    /// How long a guest gets to power off after the ACPI request.
    pub stop_timeout: Duration,
    /// The address incoming migration streams and NBD exports listen on.
    pub migration_address: String,
    /// This host's certificate, for QEMU's migration and NBD TLS.
    pub pki: Option<AgentPki>,
    /// Memory kept for the host itself: not offered to VMs.
    pub reserve_memory_bytes: u64,
    /// When set, the only CPU models this host offers (e.g. a pool's common
    /// baseline), even if its QEMU knows more.
    pub cpu_models: Option<Vec<String>>,
    /// Which cluster networks this host serves, and whether it may create
    /// their bridges.
    pub networks: crate::network::NetworkConfig,
}

/// PEM texts of the cluster CA and this host's certificate and key.
#[derive(Clone)]
pub struct AgentPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for AgentPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentPki { .. }")
    }
}

#[derive(Debug)]
pub struct HostContext {
    pub config: AgentConfig,
    pub qemu_binary: PathBuf,
    pub qemu_img: PathBuf,
    pub accel: AccelChoice,
}

impl HostContext {
    pub fn datastore_names(&self) -> String {
        self.config
            .datastores
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }
}

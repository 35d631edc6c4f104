//! ferryd's configuration file (TOML). Unknown keys are rejected: a typo in a
//! host's configuration must not silently fall back to a default.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The host's name in the cluster (`host1`); must match its certificate.
    pub name: String,
    /// Socket address the HTTPS API listens on.
    pub listen: std::net::SocketAddr,
    /// URL other parties use to reach this host; defaults to `https://LISTEN`.
    pub advertise: Option<String>,
    /// Where the agent keeps VM records and runtime files (`--state-dir`
    /// overrides).
    pub state_dir: Option<PathBuf>,
    /// `auto` (default), `kvm` or `tcg`.
    #[serde(default = "default_accel")]
    pub accel: String,
    /// Path of qemu-system-x86_64 (default: PATH, or `FERRY_QEMU`).
    pub qemu: Option<PathBuf>,
    /// Seconds a guest gets to power off after the ACPI request.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: u64,
    pub tls: TlsConfig,
    /// Memory kept for the host itself and not offered to VMs (e.g.
    /// "2GiB").
    pub reserve_memory: Option<String>,
    /// The only CPU models this host offers, when set (e.g. a pool's common
    /// baseline).
    pub cpu_models: Option<Vec<String>>,
    /// Address incoming migration streams and NBD exports listen on
    /// (default: the API's listen address).
    pub migration_address: Option<String>,
    /// URL of the cluster's controller, which this host joins at start.
    pub controller: Option<String>,
    /// The controller role, when this host runs it.
    #[serde(default, rename = "controller_role")]
    pub controller_role: Option<ControllerRoleConfig>,
    /// Named datastores: folder per name.
    #[serde(default)]
    pub datastores: BTreeMap<String, PathBuf>,
    /// What this host does with the cluster's networks.
    #[serde(default)]
    pub networks: NetworksConfig,
}

/// `[networks]`: which cluster networks this host serves, and whether its
/// agent may create their bridges.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworksConfig {
    /// Create a network's bridge when it is missing (default: no; a host
    /// whose bridges the operator manages refuses a network it lacks).
    #[serde(default)]
    pub create_bridges: bool,
    /// The cluster networks this host serves; absent serves them all.
    pub serve: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This host's certificate and key, signed by the cluster CA.
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerRoleConfig {
    #[serde(default)]
    pub enabled: bool,
    /// The SQLite store (relative paths resolve against the state folder).
    #[serde(default = "default_store")]
    pub store: PathBuf,
    /// Migration stream cap when a request gives none (bytes per second).
    pub default_bandwidth_bytes_per_sec: Option<u64>,
    pub default_max_downtime_ms: Option<u64>,
    pub default_deadline_secs: Option<u64>,
}

fn default_store() -> PathBuf {
    PathBuf::from("controller.db")
}

fn default_accel() -> String {
    "auto".to_string()
}

fn default_stop_timeout() -> u64 {
    30
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid configuration file {path}: {problem}")]
    Invalid { path: String, problem: String },
}

impl Config {
    /// Reads the file; relative paths in it resolve against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: shown.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut config.tls.ca);
        resolve(&mut config.tls.cert);
        resolve(&mut config.tls.key);
        if let Some(dir) = &mut config.state_dir {
            resolve(dir);
        }
        for dir in config.datastores.values_mut() {
            resolve(dir);
        }
        if config.name.is_empty()
            || !config
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(ConfigError::Invalid {
                path: shown,
                problem: format!(
                    "name {:?} must be non-empty letters, digits, '-' or '.'",
                    config.name
                ),
            });
        }
        if config
            .accel
            .parse::<ferry_qemu::accel::AccelSetting>()
            .is_err()
        {
            return Err(ConfigError::Invalid {
                path: shown,
                problem: format!("accel {:?} must be auto, kvm or tcg", config.accel),
            });
        }
        Ok(config)
    }

    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.listen))
    }
}

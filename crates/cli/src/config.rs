//! The client configuration (`ferry.toml`): which hosts to talk to and the
//! certificate to talk with. Found from `--config`, then `FERRY_CONFIG`, then
//! the default local cluster's folder (so that `ferry local up` followed by
//! `ferry vm list` just works).

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Cluster CA certificate (PEM); the only root the client trusts.
    pub ca: PathBuf,
    /// The client's certificate and key, signed by the cluster CA.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The controller's URL (migrations and other cluster-wide operations).
    #[serde(default)]
    pub controller: Option<String>,
    #[serde(default)]
    pub hosts: Vec<HostEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    pub name: String,
    pub url: String,
}

/// A loaded configuration with a client per host.
pub struct Connection {
    /// A client for the controller, when the configuration names one.
    pub controller: Option<ferry_api::Client>,
    pub hosts: Vec<(HostEntry, ferry_api::Client)>,
}

impl ClientConfig {
    pub fn load(path: &Path) -> anyhow::Result<ClientConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the client configuration {}", path.display()))?;
        let mut config: ClientConfig = toml::from_str(&text)
            .with_context(|| format!("invalid client configuration {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut config.ca, &mut config.cert, &mut config.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    pub fn tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
        };
        ferry_pki::client_config(&read(&self.ca)?, &read(&self.cert)?, &read(&self.key)?)
            .context("cannot set up TLS with the client certificate")
    }
}

/// Where the configuration comes from when neither `--config` nor
/// `FERRY_CONFIG` names one.
pub fn default_path() -> PathBuf {
    crate::commands::local::default_dir().join("ferry.toml")
}

pub fn connect(explicit: Option<&Path>) -> anyhow::Result<Connection> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => {
            let path = default_path();
            if !path.exists() {
                bail!(
                    "no client configuration: give --config FILE or set FERRY_CONFIG \
                     (or run `ferry local up`, which writes {})",
                    path.display()
                );
            }
            path
        }
    };
    let config = ClientConfig::load(&path)?;
    let tls = config.tls()?;
    let mut hosts = Vec::new();
    for entry in &config.hosts {
        let client = ferry_api::Client::new(&entry.url, tls.clone())
            .with_context(|| format!("cannot make a client for host {}", entry.name))?;
        hosts.push((entry.clone(), client));
    }
    // With a controller, the hosts are optional: every VM and host command
    // goes through the controller, which knows the hosts.
    if hosts.is_empty() && config.controller.is_none() {
        bail!(
            "the client configuration {} lists no hosts and names no controller",
            path.display()
        );
    }
    let controller = match &config.controller {
        Some(url) => Some(
            ferry_api::Client::new(url, tls.clone())
                .with_context(|| format!("cannot make a client for the controller {url}"))?,
        ),
        None => None,
    };
    Ok(Connection { controller, hosts })
}

impl Connection {
    /// The controller's client, or an error saying the configuration lacks
    /// one.
    pub fn controller(&self) -> anyhow::Result<&ferry_api::Client> {
        self.controller.as_ref().context(
            "the client configuration names no controller (`controller = \"https://…\"`); \
             `ferry local up` writes one",
        )
    }

    pub fn host(&self, name: &str) -> anyhow::Result<&ferry_api::Client> {
        self.hosts
            .iter()
            .find(|(entry, _)| entry.name == name)
            .map(|(_, client)| client)
            .with_context(|| {
                format!(
                    "unknown host {name:?} (known: {})",
                    self.hosts
                        .iter()
                        .map(|(e, _)| e.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

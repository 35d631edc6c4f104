//! What this host can offer a VM: CPUs, memory, the QEMU release, the
//! accelerator and the machine types and CPU models QEMU supports.
//!
//! The controller's pre-flight check compares these across hosts (a
//! migration needs the same machine type and CPU model on both ends), so the
//! lists come from QEMU itself over QMP (`query-machines`,
//! `query-cpu-definitions`) rather than from scraping `-machine help`, whose
//! layout is for humans and changes between releases. Asking costs a short
//! QEMU start (`-machine none -S`, ~0.1–1 s), so the answer is cached per
//! binary path and version for the life of the process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::AsyncReadExt;

use crate::accel::{self, Accel, AccelSetting};
use crate::process::{self, ProcessError, QemuVersion};
use crate::qmp::{Qmp, QmpError};

/// Bound on the whole probe (start, two queries, quit).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors from gathering host facts.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("could not read {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no usable {field} line")]
    Meminfo {
        path: &'static str,
        field: &'static str,
    },
    #[error("checking the QEMU binary {binary}")]
    Binary {
        binary: PathBuf,
        #[source]
        source: ProcessError,
    },
    #[error("could not start {binary} to probe its machine types and CPU models")]
    ProbeSpawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("probing {binary} over QMP failed (QEMU said: {stderr:?})")]
    Probe {
        binary: PathBuf,
        stderr: String,
        #[source]
        source: Box<QmpError>,
    },
    #[error("probing {binary} did not finish within {after:?}")]
    ProbeTimeout { binary: PathBuf, after: Duration },
}

/// Facts about this host, as reported to the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// CPUs this process may run on (affinity and cgroup limits applied).
    pub cpus: u32,
    /// `MemTotal` from `/proc/meminfo`.
    pub memory_bytes: u64,
    /// `MemAvailable` from `/proc/meminfo`: what new guests can still get
    /// without swapping, per the kernel's estimate.
    pub memory_available_bytes: u64,
    pub qemu_binary: PathBuf,
    pub qemu_version: QemuVersion,
    pub accel: Accel,
    /// Why that accelerator: shown to operators (TCG is much slower).
    pub accel_reason: String,
    /// Canonical machine type names (`pc-q35-10.0`, …), sorted.
    pub machine_types: Vec<String>,
    /// CPU model names (`qemu64`, …), sorted.
    pub cpu_models: Vec<String>,
}

/// What one QEMU binary supports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuCapabilities {
    pub version: QemuVersion,
    pub machine_types: Vec<String>,
    /// Unversioned aliases and what they resolve to (`q35` →
    /// `pc-q35-10.0`); kept because specs from elsewhere use aliases.
    pub machine_aliases: Vec<(String, String)>,
    pub cpu_models: Vec<String>,
}

/// Memory figures from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// Parses `/proc/meminfo` text (`MemTotal:  24590244 kB`).
pub fn parse_meminfo(text: &str) -> Result<MemInfo, HostError> {
    let field = |name: &'static str| -> Result<u64, HostError> {
        text.lines()
            .find_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix(':')?;
                let mut parts = rest.split_ascii_whitespace();
                let value: u64 = parts.next()?.parse().ok()?;
                let scale = match parts.next() {
                    Some("kB") => 1024,
                    None => 1,
                    Some(_) => return None,
                };
                value.checked_mul(scale)
            })
            .ok_or(HostError::Meminfo {
                path: "/proc/meminfo",
                field: name,
            })
    };
    Ok(MemInfo {
        total_bytes: field("MemTotal")?,
        available_bytes: field("MemAvailable")?,
    })
}

/// Reads this host's `/proc/meminfo`.
pub fn meminfo() -> Result<MemInfo, HostError> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|source| HostError::Read {
        path: "/proc/meminfo",
        source,
    })?;
    parse_meminfo(&text)
}

/// CPUs available to this process: honours `sched_setaffinity` masks and
/// cgroup CPU quotas, which `/proc/cpuinfo` counts would not.
pub fn available_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

type CapabilityCache = Mutex<HashMap<(PathBuf, QemuVersion), Arc<QemuCapabilities>>>;

fn cache() -> &'static CapabilityCache {
    static CACHE: OnceLock<CapabilityCache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Machine types and CPU models of `binary`, cached by path and version
/// (checked with `--version` on each call, which also enforces the minimum
/// version, so an upgraded binary is probed again).
pub async fn qemu_capabilities(binary: &Path) -> Result<Arc<QemuCapabilities>, HostError> {
    let version = process::check_version(binary)
        .await
        .map_err(|source| HostError::Binary {
            binary: binary.to_owned(),
            source,
        })?;
    let key = (binary.to_owned(), version);
    if let Some(hit) = cache().lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(hit.clone());
    }
    // Two concurrent first calls may both probe; the result is the same and
    // the cost is a second short QEMU run, cheaper than holding a lock
    // across an await.
    let caps = Arc::new(probe(binary, version).await?);
    // Keep the first answer if a concurrent probe beat us, so every caller
    // shares one value.
    let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
    Ok(cache.entry(key).or_insert(caps).clone())
}

/// Starts `binary -machine none -S -qmp stdio` as a direct child (killed if
/// this future is dropped) and asks it over QMP.
async fn probe(binary: &Path, version: QemuVersion) -> Result<QemuCapabilities, HostError> {
    let mut child = tokio::process::Command::new(binary)
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-S",
            "-accel",
            "tcg",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| HostError::ProbeSpawn {
            binary: binary.to_owned(),
            source,
        })?;
    let (Some(stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(HostError::ProbeSpawn {
            binary: binary.to_owned(),
            source: std::io::Error::other("child pipes missing"),
        });
    };
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).trim().to_owned()
    });

    let queried = tokio::time::timeout(PROBE_TIMEOUT, async {
        let qmp = Qmp::handshake(
            stdout,
            stdin,
            format!("{} (probe)", binary.display()),
            PROBE_TIMEOUT,
        )
        .await?;
        let machines = qmp.execute("query-machines", Value::Null).await?;
        let cpus = qmp.execute("query-cpu-definitions", Value::Null).await?;
        qmp.quit().await?;
        Ok::<_, QmpError>((machines, cpus))
    })
    .await;

    let result = match queried {
        Ok(Ok((machines, cpus))) => {
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            let (machine_types, machine_aliases) = machines_from_reply(&machines);
            Ok(QemuCapabilities {
                version,
                machine_types,
                machine_aliases,
                cpu_models: cpu_models_from_reply(&cpus),
            })
        }
        Ok(Err(source)) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let stderr = tokio::time::timeout(Duration::from_secs(2), stderr_task)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(HostError::Probe {
                binary: binary.to_owned(),
                stderr,
                source: Box::new(source),
            });
        }
        Err(_) => Err(HostError::ProbeTimeout {
            binary: binary.to_owned(),
            after: PROBE_TIMEOUT,
        }),
    };
    // Dropping `child` kills it if it is somehow still there.
    let _ = child.start_kill();
    let _ = child.wait().await;
    result
}

/// Canonical names and `(alias, name)` pairs from a `query-machines` reply.
/// Entries without a string `name` are skipped (a newer QEMU's odd entry
/// should not hide the rest).
pub(crate) fn machines_from_reply(reply: &Value) -> (Vec<String>, Vec<(String, String)>) {
    let mut names = Vec::new();
    let mut aliases = Vec::new();
    for machine in reply.as_array().into_iter().flatten() {
        let Some(name) = machine.get("name").and_then(Value::as_str) else {
            continue;
        };
        names.push(name.to_owned());
        if let Some(alias) = machine.get("alias").and_then(Value::as_str) {
            aliases.push((alias.to_owned(), name.to_owned()));
        }
    }
    names.sort();
    names.dedup();
    aliases.sort();
    (names, aliases)
}

/// CPU model names from a `query-cpu-definitions` reply.
pub(crate) fn cpu_models_from_reply(reply: &Value) -> Vec<String> {
    let mut names: Vec<String> = reply
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|cpu| cpu.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Gathers everything about this host for `binary` and the configured
/// accelerator setting.
pub async fn gather(binary: &Path, setting: AccelSetting) -> Result<HostFacts, HostError> {
    let caps = qemu_capabilities(binary).await?;
    let mem = meminfo()?;
    let choice = accel::choose(setting);
    Ok(HostFacts {
        cpus: available_cpus(),
        memory_bytes: mem.total_bytes,
        memory_available_bytes: mem.available_bytes,
        qemu_binary: binary.to_owned(),
        qemu_version: caps.version,
        accel: choice.accel,
        accel_reason: choice.reason,
        machine_types: caps.machine_types.clone(),
        cpu_models: caps.cpu_models.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn meminfo_parses_kib_fields() {
        let text = "MemTotal:       24590244 kB\nMemFree:        20000000 kB\n\
                    MemAvailable:   22000000 kB\nBuffers:          1000 kB\n";
        assert_eq!(
            parse_meminfo(text).unwrap(),
            MemInfo {
                total_bytes: 24_590_244 * 1024,
                available_bytes: 22_000_000 * 1024
            }
        );
    }

    #[test]
    fn meminfo_without_mem_available_is_an_error_naming_the_field() {
        let err = parse_meminfo("MemTotal: 100 kB\n").unwrap_err();
        assert!(err.to_string().contains("MemAvailable"), "{err}");
        assert!(parse_meminfo("MemTotal: lots kB\nMemAvailable: 1 kB\n").is_err());
        assert!(parse_meminfo("").is_err());
    }

    #[test]
    fn meminfo_does_not_confuse_prefixed_fields() {
        // `MemTotalX` must not be read as `MemTotal`.
        let text = "MemTotalX: 5 kB\nMemTotal: 7 kB\nMemAvailable: 3 kB\n";
        assert_eq!(parse_meminfo(text).unwrap().total_bytes, 7 * 1024);
    }

    #[test]
    fn this_host_meminfo_and_cpus_are_sane() {
        let mem = meminfo().unwrap();
        assert!(mem.total_bytes > 0 && mem.available_bytes <= mem.total_bytes);
        assert!(available_cpus() >= 1);
    }

    #[test]
    fn machine_and_cpu_replies_are_sorted_names() {
        let machines = json!([
            {"name": "pc-q35-10.0", "alias": "q35", "cpu-max": 4096},
            {"name": "none"},
            {"alias": "nameless"},
            {"name": "pc-i440fx-10.0", "alias": "pc", "is-default": true}
        ]);
        let (names, aliases) = machines_from_reply(&machines);
        assert_eq!(names, ["none", "pc-i440fx-10.0", "pc-q35-10.0"]);
        assert_eq!(
            aliases,
            [
                ("pc".to_owned(), "pc-i440fx-10.0".to_owned()),
                ("q35".to_owned(), "pc-q35-10.0".to_owned())
            ]
        );
        let cpus = json!([{"name": "qemu64"}, {"name": "max"}, {"typename": "x"}]);
        assert_eq!(cpu_models_from_reply(&cpus), ["max", "qemu64"]);
        assert!(cpu_models_from_reply(&json!({"not": "a list"})).is_empty());
    }
}

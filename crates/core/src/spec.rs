//! The VM spec: what a user writes (TOML) to describe a VM.
//!
//! `VmSpec` is the *validated, resolved* form used everywhere else: sizes are in
//! bytes, the uuid and MACs are filled in, and relative paths are resolved
//! against the spec file's folder. `VmSpec::from_toml_str` is the only way in
//! from outside bytes; it rejects unknown keys and names the field of every
//! problem.
//!
//! A spec is also what the agent persists and what migration compares on both
//! ends (machine type, CPU model, device ids), so it is serialisable as JSON
//! with `serde` and carries a format version.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Current version of the persisted (JSON) form of [`VmSpec`].
pub const SPEC_FORMAT_VERSION: u32 = 1;

/// Default machine type: a pinned, versioned type, because a migration needs
/// the same machine type on both ends and an unversioned alias (`q35`) can
/// resolve differently on two QEMU versions.
pub const DEFAULT_MACHINE_TYPE: &str = "pc-q35-10.0";

/// Default CPU model: a named, migratable model. Never `host` unless asked,
/// because `host` ties the guest to the source CPU's exact features.
pub const DEFAULT_CPU_MODEL: &str = "qemu64";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub uuid: uuid::Uuid,
    pub vcpus: u32,
    /// Guest RAM in bytes (a multiple of 1 MiB).
    pub memory_bytes: u64,
    pub machine_type: String,
    pub cpu_model: String,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
    /// Whether a serial console (ttyS0) is attached; the agent logs it.
    pub serial_console: bool,
    pub boot: BootSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// User-chosen id, unique within the VM; device ids and block node names
    /// derive from it (see `ferry_core::names`).
    pub id: String,
    pub source: DiskSource,
    pub format: DiskFormat,
    pub bus: DiskBus,
    pub cache: CacheMode,
    pub read_only: bool,
    /// When the disk file does not exist yet at create time: copy this image
    /// (an absolute path on the host) into it. Mutually exclusive with
    /// `create_size_bytes`.
    pub image: Option<PathBuf>,
    /// When the disk file does not exist yet at create time: create a blank
    /// disk of this virtual size in bytes.
    pub create_size_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiskSource {
    /// A file inside a named datastore of the host that runs the VM.
    Datastore { datastore: String, file: String },
    /// An absolute path on the host (resolved from the spec's folder when the
    /// user wrote a relative one).
    Path { path: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskBus {
    Virtio,
    Scsi,
    Sata,
    Ide,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT, host page cache bypassed: the safe default for migration.
    None,
    Writeback,
    Writethrough,
    Directsync,
    Unsafe,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub id: String,
    pub model: NicModel,
    /// Lower-case `aa:bb:cc:dd:ee:ff`; generated (locally administered,
    /// QEMU's 52:54:00 prefix) when absent.
    pub mac: String,
    pub backend: NicBackend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NicModel {
    Virtio,
    E1000,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NicBackend {
    /// QEMU user-mode networking (slirp): unprivileged, single host, does not
    /// keep connections across a migration.
    User,
    /// No backend: the device exists but is not connected.
    None,
    /// A tap device attached to a Linux bridge (needs root).
    Bridge { bridge: String },
    /// An existing tap device (needs root).
    Tap { tap: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BootSpec {
    /// Direct kernel boot: QEMU loads the kernel and initrd itself.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// Firmware (SeaBIOS) boot from the disk with this id.
    Firmware { disk: String },
}

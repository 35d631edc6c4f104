//! The VM spec: what a user writes (TOML) to describe a VM.
//!
//! `VmSpec` is the *validated, resolved* form used everywhere else: sizes are in
//! bytes, the uuid and MACs are filled in, and relative paths are resolved
//! against the spec file's folder. Outside bytes come in through
//! [`VmSpec::from_toml_str`] (a user's file: unknown keys rejected, defaults
//! filled) or as JSON checked with [`VmSpec::validate`] (same rules, nothing
//! filled in); both name the field of every problem (`disks[1].id: duplicate
//! id "vd0" (also used by disks[0])`) and report all problems at once.
//!
//! The TOML format, by example, is `examples/demo-vm.toml`; the conversion
//! rules (defaults, format inference, boot defaults) are in `toml_file.rs`,
//! the rules both paths share in `check.rs`.
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

/// A VM: what it is made of and how it boots (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique name: letters, digits, `.`, `_`, `-`, starting with a letter or
    /// digit, at most [`MAX_NAME_LEN`].
    pub name: String,
    /// Stable identity, generated (v4) when the spec file has none; QEMU gets
    /// it as `-uuid`, and Ferry finds its QEMU processes again by it.
    pub uuid: uuid::Uuid,
    /// 1 ..= [`MAX_VCPUS`].
    pub vcpus: u32,
    /// Guest RAM in bytes (a multiple of 1 MiB).
    pub memory_bytes: u64,
    /// A versioned QEMU machine type (`pc-q35-10.0`, `pc-i440fx-9.2`).
    pub machine_type: String,
    /// A CPU model, optionally with feature flags (`qemu64,+ssse3`).
    pub cpu_model: String,
    /// Disks in guest order (the order fixes bus addresses).
    pub disks: Vec<DiskSpec>,
    /// NICs in guest order (the order fixes PCI slots).
    pub nics: Vec<NicSpec>,
    /// Whether a serial console (ttyS0) is attached; the agent logs it.
    pub serial_console: bool,
    /// Direct kernel boot or firmware boot.
    pub boot: BootSpec,
}

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// User-chosen id, unique within the VM; device ids and block node names
    /// derive from it (see `ferry_core::names`).
    pub id: String,
    /// Where the disk's file is.
    pub source: DiskSource,
    /// Image format of the file (never probed: see `toml_file.rs`).
    pub format: DiskFormat,
    /// How the guest sees the disk.
    pub bus: DiskBus,
    /// Host caching; `none` by default.
    pub cache: CacheMode,
    /// The guest may not write (only on `virtio` and `scsi` buses, because
    /// QEMU's ATA disk cannot be read-only).
    pub read_only: bool,
    /// When the disk file does not exist yet at create time: copy this image
    /// (an absolute path on the host) into it. Mutually exclusive with
    /// `create_size_bytes`.
    pub image: Option<PathBuf>,
    /// When the disk file does not exist yet at create time: create a blank
    /// disk of this virtual size in bytes.
    pub create_size_bytes: Option<u64>,
}

/// Where a disk's file is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiskSource {
    /// A file inside a named datastore of the host that runs the VM.
    Datastore { datastore: String, file: String },
    /// An absolute path on the host (resolved from the spec's folder when the
    /// user wrote a relative one).
    Path { path: PathBuf },
}

/// Image format of a disk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// How the guest sees a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskBus {
    /// virtio-blk: fastest; needs virtio drivers in the guest.
    Virtio,
    /// A disk on a virtio-scsi controller.
    Scsi,
    /// An AHCI (SATA) disk: for guests without virtio drivers.
    Sata,
    /// A legacy IDE disk: i440fx machines only (q35 has no IDE controller).
    Ide,
}

/// Host caching of a disk, as QEMU's `-drive cache=` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT, host page cache bypassed: the safe default for migration.
    None,
    /// Host page cache, guest sees a write cache and must flush.
    Writeback,
    /// Host page cache, every write synchronous.
    Writethrough,
    /// O_DIRECT and every write synchronous.
    Directsync,
    /// Guest flushes ignored: fast, and loses data on a host crash.
    Unsafe,
}

/// One network interface of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// User-chosen id, unique among the VM's disks and NICs.
    pub id: String,
    /// The emulated device.
    pub model: NicModel,
    /// Lower-case `aa:bb:cc:dd:ee:ff`; generated (locally administered,
    /// QEMU's 52:54:00 prefix) when absent.
    pub mac: String,
    /// What the NIC is connected to on the host.
    pub backend: NicBackend,
}

/// The emulated network device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NicModel {
    /// virtio-net-pci.
    Virtio,
    /// Intel 82540EM (`e1000`), for guests without virtio drivers.
    E1000,
}

/// What a NIC is connected to on the host.
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
    /// A cluster network (`ferry network create`): the agent of whichever
    /// host runs the VM creates a tap and attaches it to the bridge that
    /// host maps the network to. The one backend that keeps connections
    /// across a live migration between hosts.
    Network { network: String },
}

impl NicBackend {
    /// The cluster network this NIC attaches to, if any.
    pub fn network(&self) -> Option<&str> {
        match self {
            NicBackend::Network { network } => Some(network),
            _ => None,
        }
    }
}

/// How a VM boots.
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

mod check;
mod host_files;
mod toml_file;

pub use host_files::check_host_files;

use crate::units::{MIB, TIB};
use std::fmt;
use std::path::Path;

/// Longest VM name. 63 so that it fits a DNS label and QEMU's `-name`.
pub const MAX_NAME_LEN: usize = 63;

/// Most vCPUs a VM may have: 255 is where x86 needs x2APIC and an IOMMU.
pub const MAX_VCPUS: u32 = 255;

/// Largest guest RAM Ferry accepts. A sanity cap against typos (`512TiB`)
/// and overflow, not a statement about hardware.
pub const MAX_MEMORY_BYTES: u64 = 4 * TIB;

/// Guest RAM must be a whole number of this many bytes (QEMU's `-m` and the
/// memory backend agree exactly only on whole MiB).
pub const MEMORY_GRANULE_BYTES: u64 = MIB;

/// Most disks per VM. Each virtio disk takes a PCI slot of the root bus,
/// which has about 29 free; 16 disks plus 8 NICs plus controllers fit.
pub const MAX_DISKS: usize = 16;

/// Most NICs per VM (see [`MAX_DISKS`] for the PCI slot budget).
pub const MAX_NICS: usize = 8;

/// Largest blank disk Ferry creates (`size`): a cap against typos.
pub const MAX_DISK_BYTES: u64 = 64 * TIB;

/// Blank disks are created in whole sectors.
pub const DISK_SIZE_GRANULE_BYTES: u64 = 512;

/// Largest spec file accepted: every decoder of outside bytes has a cap.
pub const MAX_SPEC_FILE_BYTES: usize = 1024 * 1024;

/// Longest kernel command line (Linux's x86 limit is 2048 by default and up
/// to 4096 when rebuilt; QEMU rejects what the kernel header says won't fit).
pub const MAX_KERNEL_CMDLINE_LEN: usize = 4096;

/// Longest path accepted anywhere in a spec (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// The first three octets of generated MACs: QEMU's own locally
/// administered, unicast prefix, so generated MACs are recognisably QEMU's.
pub const GENERATED_MAC_PREFIX: [u8; 3] = [0x52, 0x54, 0x00];

/// One thing wrong with a spec: the field path (`disks[1].id`) and what is
/// wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path to the field, with list indexes (`nics[0].mac`); empty
    /// when the problem concerns the document as a whole.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Why a spec was rejected.
///
/// Validation collects every problem it finds rather than stopping at the
/// first, so that one edit fixes a spec; only TOML syntax and type errors stop
/// early, because nothing after them can be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("VM spec is {size} bytes, more than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// The document is not TOML, or a value has the wrong type, or a key is
    /// unknown. `line`/`column` are 1-based.
    #[error("{}", describe_toml_error(.field, *.line, *.column, .message))]
    Toml {
        field: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// The values are well-typed but break the rules.
    #[error("{}", describe_problems(.0))]
    Invalid(Vec<Problem>),
    /// Files the spec names on this host are missing or unusable.
    #[error("{}", describe_problems(.0))]
    HostFiles(Vec<Problem>),
}

impl SpecError {
    /// The individual problems (one for a TOML error, none for `TooLarge`).
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            SpecError::TooLarge { .. } => Vec::new(),
            SpecError::Toml { field, message, .. } => vec![Problem {
                field: field.clone(),
                message: message.clone(),
            }],
            SpecError::Invalid(problems) | SpecError::HostFiles(problems) => problems.clone(),
        }
    }
}

fn describe_toml_error(
    field: &str,
    line: Option<usize>,
    column: Option<usize>,
    message: &str,
) -> String {
    let mut out = String::new();
    if !field.is_empty() {
        out.push_str(field);
        out.push_str(": ");
    }
    out.push_str(message);
    if let (Some(line), Some(column)) = (line, column) {
        out.push_str(&format!(" (line {line}, column {column})"));
    }
    out
}

/// One problem on one line; several as an indented list. No "invalid spec"
/// prefix: callers add the context (which file, which request) in front.
fn describe_problems(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let mut out = format!("{} problems:", many.len());
            for problem in many {
                out.push_str("\n  ");
                out.push_str(&problem.to_string());
            }
            out
        }
    }
}

/// The machine families Ferry can build a command line for. The family
/// decides which disk buses exist (q35 has AHCI built in; i440fx has IDE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineFamily {
    /// `pc-q35-*`: PCIe, built-in AHCI with six ports, no IDE.
    Q35,
    /// `pc-i440fx-*`: PCI, built-in IDE with two buses of two units.
    I440fx,
}

impl MachineFamily {
    /// The family of a *versioned* machine type, or `None` for anything else
    /// (including the unversioned aliases `q35` and `pc`, which Ferry refuses
    /// because they resolve differently on different QEMU versions).
    pub fn of(machine_type: &str) -> Option<MachineFamily> {
        let versioned = |prefix: &str| {
            machine_type
                .strip_prefix(prefix)
                .is_some_and(|version| !version.is_empty())
        };
        if versioned("pc-q35-") {
            Some(MachineFamily::Q35)
        } else if versioned("pc-i440fx-") {
            Some(MachineFamily::I440fx)
        } else {
            None
        }
    }
}

impl VmSpec {
    /// Parses a user-written TOML spec, fills defaults (uuid, MACs, machine
    /// type, CPU model), resolves relative paths against `base_dir` (the
    /// folder of the spec file; it should be absolute) and validates the
    /// result with the same rules as [`VmSpec::validate`].
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<VmSpec, SpecError> {
        toml_file::parse(text, base_dir)
    }

    /// Checks every rule on an already-resolved spec, e.g. one received as
    /// JSON over the API (hostile input). Paths must be absolute and MACs in
    /// canonical form. Does not touch the file system: see
    /// [`check_host_files`].
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut problems = check::Problems::default();
        check::check_spec(self, &mut problems);
        problems.into_result()
    }

    /// The machine family of [`VmSpec::machine_type`], `None` when the type
    /// is not one Ferry supports (validation rejects those).
    pub fn machine_family(&self) -> Option<MachineFamily> {
        MachineFamily::of(&self.machine_type)
    }
}

/// A fresh random MAC with QEMU's `52:54:00` prefix, in canonical form.
pub fn generate_mac() -> String {
    // A v4 uuid is 122 random bits from the OS; borrowing three bytes of one
    // avoids a separate random-number dependency.
    let random = uuid::Uuid::new_v4();
    let bytes = random.as_bytes();
    let [a, b, c] = GENERATED_MAC_PREFIX;
    format!(
        "{a:02x}:{b:02x}:{c:02x}:{:02x}:{:02x}:{:02x}",
        bytes[0], bytes[1], bytes[2]
    )
}

impl DiskFormat {
    /// The QEMU block driver name, also the spelling in spec files.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl DiskBus {
    /// The spelling in spec files.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Scsi => "scsi",
            DiskBus::Sata => "sata",
            DiskBus::Ide => "ide",
        }
    }
}

impl CacheMode {
    /// The spelling in spec files (the same as QEMU's `-drive cache=`).
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Directsync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }
}

impl NicModel {
    /// The spelling in spec files.
    pub fn as_str(self) -> &'static str {
        match self {
            NicModel::Virtio => "virtio",
            NicModel::E1000 => "e1000",
        }
    }
}

macro_rules! display_as_str {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(DiskFormat, DiskBus, CacheMode, NicModel);

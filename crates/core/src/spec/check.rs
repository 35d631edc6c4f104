//! The rules a resolved [`VmSpec`] must follow, shared by the TOML path and
//! by [`VmSpec::validate`] for specs that arrive as JSON.
//!
//! Every rule that keeps a value from reaching QEMU's command line in a form
//! that could change its meaning (commas in `-machine`, a relative path, a NUL)
//! lives here, so that `ferry_qemu::cmdline` may trust a validated spec.

use super::{
    BootSpec, DiskBus, DiskSource, DiskSpec, MachineFamily, NicBackend, NicSpec, Problem,
    SpecError, VmSpec, DISK_SIZE_GRANULE_BYTES, MAX_DISKS, MAX_DISK_BYTES, MAX_KERNEL_CMDLINE_LEN,
    MAX_MEMORY_BYTES, MAX_NAME_LEN, MAX_NICS, MAX_PATH_LEN, MAX_VCPUS, MEMORY_GRANULE_BYTES,
};
use crate::names::{is_valid_interface_name, MAX_ID_LEN, MAX_IFNAME_LEN};
use crate::units::format_size;
use std::collections::BTreeMap;
use std::path::Path;

/// Longest datastore name.
const MAX_DATASTORE_LEN: usize = 63;
/// Longest file name inside a datastore (Linux's `NAME_MAX`).
const MAX_FILE_NAME_LEN: usize = 255;
/// Longest CPU model string (model plus feature flags).
const MAX_CPU_MODEL_LEN: usize = 255;
/// Longest machine type name.
const MAX_MACHINE_TYPE_LEN: usize = 63;
/// Ports of the AHCI controller (q35's built-in one or the one added on i440fx).
const AHCI_PORTS: usize = 6;
/// Drives on the i440fx's IDE controller: two buses, two units each.
const IDE_DRIVES: usize = 4;

/// The problems found so far, in document order.
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<Problem>);

impl Problems {
    pub(super) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    pub(super) fn into_result(self) -> Result<(), SpecError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(SpecError::Invalid(self.0))
        }
    }

    pub(super) fn into_host_files_result(self) -> Result<(), SpecError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(SpecError::HostFiles(self.0))
        }
    }
}

pub(super) fn check_spec(spec: &VmSpec, p: &mut Problems) {
    check_name(&spec.name, p);
    if spec.uuid.is_nil() {
        p.push("uuid", "must not be the nil UUID");
    }
    check_vcpus(i64::from(spec.vcpus), p);
    check_memory(spec.memory_bytes, p);
    let family = check_machine(&spec.machine_type, p);
    check_cpu(&spec.cpu_model, p);

    if spec.disks.len() > MAX_DISKS {
        p.push(
            "disks",
            format!("at most {MAX_DISKS} disks (got {})", spec.disks.len()),
        );
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        check_disk(i, disk, family, p);
    }
    check_bus_capacity(&spec.disks, family, p);

    if spec.nics.len() > MAX_NICS {
        p.push(
            "nics",
            format!("at most {MAX_NICS} NICs (got {})", spec.nics.len()),
        );
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        check_nic(i, nic, p);
    }
    check_unique_ids(spec, p);
    check_unique_macs(&spec.nics, p);
    check_boot(&spec.boot, &spec.disks, p);
}

/// Quotes a user value for a message; `{:?}` escapes control characters, so
/// a hostile value cannot forge extra lines of output.
fn quoted(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        Some((end, _)) => format!("{:?}…", &value[..end]),
        None => format!("{value:?}"),
    }
}

fn check_name(name: &str, p: &mut Problems) {
    const FIELD: &str = "name";
    if name.is_empty() {
        p.push(FIELD, "must not be empty");
    } else if name.len() > MAX_NAME_LEN {
        p.push(
            FIELD,
            format!(
                "must be at most {MAX_NAME_LEN} characters (got {})",
                name.len()
            ),
        );
    } else if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        p.push(
            FIELD,
            format!("may contain only letters, digits, '.', '_' and '-' (found {bad:?})"),
        );
    } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        // The name becomes part of file names and QEMU's process name: a
        // leading '.' or '-' would hide the file or look like an option.
        p.push(FIELD, "must start with a letter or digit");
    }
}

/// Takes `i64` so that the TOML path can report negative numbers with the
/// same message.
pub(super) fn check_vcpus(vcpus: i64, p: &mut Problems) {
    if !(1..=i64::from(MAX_VCPUS)).contains(&vcpus) {
        p.push(
            "vcpus",
            format!("must be between 1 and {MAX_VCPUS} (got {vcpus})"),
        );
    }
}

fn check_memory(bytes: u64, p: &mut Problems) {
    const FIELD: &str = "memory";
    if bytes == 0 {
        p.push(FIELD, "must be greater than zero");
    } else if !bytes.is_multiple_of(MEMORY_GRANULE_BYTES) {
        p.push(
            FIELD,
            format!("must be a whole number of MiB (got {bytes} bytes)"),
        );
    } else if bytes > MAX_MEMORY_BYTES {
        p.push(
            FIELD,
            format!(
                "must be at most {} (got {})",
                format_size(MAX_MEMORY_BYTES),
                format_size(bytes)
            ),
        );
    }
}

fn check_machine(machine: &str, p: &mut Problems) -> Option<MachineFamily> {
    const FIELD: &str = "machine";
    let family = MachineFamily::of(machine);
    let well_formed = !machine.is_empty()
        && machine.len() <= MAX_MACHINE_TYPE_LEN
        && machine
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !well_formed {
        p.push(
            FIELD,
            format!(
                "{} is not a machine type name (letters, digits, '.', '_', '-'; at most \
                 {MAX_MACHINE_TYPE_LEN})",
                quoted(machine)
            ),
        );
    } else if matches!(machine, "q35" | "pc") {
        p.push(
            FIELD,
            format!(
                "{} is an alias whose meaning changes between QEMU versions, which breaks \
                 migration; write a versioned type such as \"{}\"",
                quoted(machine),
                super::DEFAULT_MACHINE_TYPE
            ),
        );
    } else if family.is_none() {
        p.push(
            FIELD,
            format!(
                "unsupported machine type {}: Ferry runs pc-q35-* and pc-i440fx-* machines",
                quoted(machine)
            ),
        );
    }
    family
}

fn check_cpu(cpu: &str, p: &mut Problems) {
    const FIELD: &str = "cpu";
    // Feature flags (`qemu64,+ssse3,-svm,level=13`) are allowed: they only
    // set CPU properties. Anything else could not be a CPU model.
    let well_formed = cpu.len() <= MAX_CPU_MODEL_LEN
        && cpu.starts_with(|c: char| c.is_ascii_alphanumeric())
        && cpu.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b',' | b'=')
        });
    if !well_formed {
        p.push(
            FIELD,
            format!(
                "{} is not a CPU model (a name such as \"qemu64\", optionally followed by \
                 ,+feature / ,-feature / ,property=value)",
                quoted(cpu)
            ),
        );
    }
}

fn check_id(field: &str, id: &str, p: &mut Problems) {
    if id.is_empty() {
        p.push(field, "must not be empty");
    } else if id.len() > MAX_ID_LEN {
        // Device ids and block node names derive from it, and QEMU caps node
        // names at 31 characters.
        p.push(
            field,
            format!("must be at most {MAX_ID_LEN} characters (got {})", id.len()),
        );
    } else if !id.starts_with(|c: char| c.is_ascii_lowercase()) {
        p.push(
            field,
            format!("{} must start with a lower-case letter", quoted(id)),
        );
    } else if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_')))
    {
        p.push(
            field,
            format!("may contain only lower-case letters, digits, '-' and '_' (found {bad:?})"),
        );
    }
}

fn check_datastore_name(field: &str, name: &str, p: &mut Problems) {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_DATASTORE_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'));
    if !well_formed {
        p.push(
            field,
            format!(
                "{} is not a datastore name (lower-case letters, digits, '-', '_'; starting \
                 with a letter or digit; at most {MAX_DATASTORE_LEN})",
                quoted(name)
            ),
        );
    }
}

/// A file inside a datastore: one plain path component, so that it can never
/// name anything outside the datastore's folder.
fn check_file_name(field: &str, name: &str, p: &mut Problems) {
    if name.is_empty() {
        p.push(field, "must not be empty");
    } else if name.contains('/') {
        p.push(
            field,
            format!(
                "{} must be a plain file name inside the datastore, without '/'",
                quoted(name)
            ),
        );
    } else if name.starts_with('.') {
        // Covers "." and "..", and keeps dot-names free for Ferry's own
        // temporary files in datastores.
        p.push(field, format!("{} must not start with '.'", quoted(name)));
    } else if name.len() > MAX_FILE_NAME_LEN {
        p.push(field, format!("must be at most {MAX_FILE_NAME_LEN} bytes"));
    } else if name.chars().any(char::is_control) {
        p.push(
            field,
            format!("{} must not contain control characters", quoted(name)),
        );
    }
}

/// A host path that goes to QEMU: absolute (there is no "current folder" an
/// agent could resolve it against), UTF-8 (QEMU's JSON arguments carry only
/// UTF-8) and free of NUL (which cannot pass through `execve`).
pub(super) fn check_host_path(field: &str, path: &Path, p: &mut Problems) {
    let Some(text) = path.to_str() else {
        p.push(field, format!("{path:?} is not valid UTF-8"));
        return;
    };
    if text.is_empty() {
        p.push(field, "must not be empty");
    } else if text.contains('\0') {
        p.push(field, "must not contain NUL");
    } else if text.len() > MAX_PATH_LEN {
        p.push(field, format!("must be at most {MAX_PATH_LEN} bytes"));
    } else if !path.is_absolute() {
        p.push(field, format!("{} must be an absolute path", quoted(text)));
    }
}

fn check_disk(i: usize, disk: &DiskSpec, family: Option<MachineFamily>, p: &mut Problems) {
    let at = |field: &str| format!("disks[{i}].{field}");
    check_id(&at("id"), &disk.id, p);

    let is_datastore = match &disk.source {
        DiskSource::Datastore { datastore, file } => {
            check_datastore_name(&at("datastore"), datastore, p);
            check_file_name(&at("file"), file, p);
            true
        }
        DiskSource::Path { path } => {
            check_host_path(&at("path"), path, p);
            false
        }
    };

    if let Some(image) = &disk.image {
        if is_datastore {
            check_host_path(&at("image"), image, p);
        } else {
            p.push(
                at("image"),
                "only for datastore disks: a `path` disk is used as it is",
            );
        }
    }
    if let Some(size) = disk.create_size_bytes {
        if !is_datastore {
            p.push(
                at("size"),
                "only for datastore disks: a `path` disk is used as it is",
            );
        } else if disk.image.is_some() {
            p.push(
                at("size"),
                "cannot be combined with `image`: a disk made from an image has the image's size",
            );
        } else if size == 0 {
            p.push(at("size"), "must be greater than zero");
        } else if !size.is_multiple_of(DISK_SIZE_GRANULE_BYTES) {
            p.push(
                at("size"),
                format!("must be a multiple of {DISK_SIZE_GRANULE_BYTES} bytes (got {size} bytes)"),
            );
        } else if size > MAX_DISK_BYTES {
            p.push(
                at("size"),
                format!(
                    "must be at most {} (got {})",
                    format_size(MAX_DISK_BYTES),
                    format_size(size)
                ),
            );
        }
    }

    let emulated_ata = matches!(disk.bus, DiskBus::Sata | DiskBus::Ide);
    if emulated_ata && disk.read_only {
        // QEMU's ide-hd refuses read-only block nodes ("Block node is
        // read-only"); it has no read-only hard disk.
        p.push(
            at("read_only"),
            format!(
                "a {:?} disk cannot be read-only in QEMU; use bus \"virtio\" or \"scsi\"",
                disk.bus.as_str()
            ),
        );
    }
    if disk.bus == DiskBus::Ide && family == Some(MachineFamily::Q35) {
        p.push(
            at("bus"),
            "q35 machines have no IDE controller: use bus \"sata\" (AHCI, which any \
             IDE-era guest with an AHCI driver handles), or a pc-i440fx-* machine",
        );
    }
}

fn check_bus_capacity(disks: &[DiskSpec], family: Option<MachineFamily>, p: &mut Problems) {
    let mut report = |bus: DiskBus, limit: usize, what: &str| {
        if let Some((i, _)) = disks
            .iter()
            .enumerate()
            .filter(|(_, d)| d.bus == bus)
            .nth(limit)
        {
            p.push(
                format!("disks[{i}].bus"),
                format!("at most {limit} {:?} disks fit {what}", bus.as_str()),
            );
        }
    };
    report(DiskBus::Sata, AHCI_PORTS, "the AHCI controller");
    if family == Some(MachineFamily::I440fx) {
        report(DiskBus::Ide, IDE_DRIVES, "the IDE controller");
    }
}

fn check_nic(i: usize, nic: &NicSpec, p: &mut Problems) {
    let at = |field: &str| format!("nics[{i}].{field}");
    check_id(&at("id"), &nic.id, p);
    check_mac(&at("mac"), &nic.mac, p);
    match &nic.backend {
        NicBackend::User | NicBackend::None => {}
        NicBackend::Bridge { bridge } => check_ifname(&at("bridge"), bridge, p),
        NicBackend::Tap { tap } => check_ifname(&at("tap"), tap, p),
        NicBackend::Network { network } => {
            if let Some(problem) = crate::network::name_problem(network) {
                p.push(at("network"), problem);
            }
        }
    }
}

fn check_ifname(field: &str, name: &str, p: &mut Problems) {
    if !is_valid_interface_name(name) {
        p.push(
            field,
            format!(
                "{} is not an interface name (letters, digits, '.', '_', '-'; at most \
                 {MAX_IFNAME_LEN})",
                quoted(name)
            ),
        );
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case, `:` or `-` between octets).
pub(super) fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut octets = [0u8; 6];
    let separator = if text.contains('-') { '-' } else { ':' };
    let mut parts = text.split(separator);
    for octet in &mut octets {
        let part = parts.next()?;
        // from_str_radix alone would accept "+f".
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *octet = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(octets)
}

/// Canonical form of a MAC: lower-case, `:`-separated.
pub(super) fn format_mac(octets: [u8; 6]) -> String {
    octets
        .iter()
        .map(|o| format!("{o:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn check_mac(field: &str, mac: &str, p: &mut Problems) {
    let Some(octets) = parse_mac(mac).filter(|o| format_mac(*o) == mac) else {
        p.push(
            field,
            format!(
                "{} is not a MAC address in canonical form (six lower-case hex pairs separated \
                 by ':')",
                quoted(mac)
            ),
        );
        return;
    };
    if octets[0] & 1 != 0 {
        p.push(
            field,
            format!("{mac} is a multicast address; a NIC needs a unicast one"),
        );
    } else if octets == [0; 6] {
        p.push(field, "must not be 00:00:00:00:00:00");
    }
}

fn check_unique_ids(spec: &VmSpec, p: &mut Problems) {
    // Disks and NICs share one namespace so that a user can name any device
    // by id alone (the QEMU-side names differ by prefix anyway).
    let mut seen: BTreeMap<&str, String> = BTreeMap::new();
    let ids = spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("disks[{i}]"), d.id.as_str()))
        .chain(
            spec.nics
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("nics[{i}]"), n.id.as_str())),
        );
    for (at, id) in ids {
        if id.is_empty() {
            continue;
        }
        if let Some(first) = seen.get(id) {
            p.push(
                format!("{at}.id"),
                format!("duplicate id {} (also used by {first})", quoted(id)),
            );
        } else {
            seen.insert(id, at);
        }
    }
}

fn check_unique_macs(nics: &[NicSpec], p: &mut Problems) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, nic) in nics.iter().enumerate() {
        if let Some(first) = seen.get(nic.mac.as_str()) {
            p.push(
                format!("nics[{i}].mac"),
                format!(
                    "duplicate MAC {} (also used by nics[{first}])",
                    quoted(&nic.mac)
                ),
            );
        } else {
            seen.insert(&nic.mac, i);
        }
    }
}

fn check_boot(boot: &BootSpec, disks: &[DiskSpec], p: &mut Problems) {
    match boot {
        BootSpec::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            check_host_path("boot.kernel", kernel, p);
            if let Some(initrd) = initrd {
                check_host_path("boot.initrd", initrd, p);
            }
            if cmdline.len() > MAX_KERNEL_CMDLINE_LEN {
                p.push(
                    "boot.cmdline",
                    format!(
                        "must be at most {MAX_KERNEL_CMDLINE_LEN} bytes (got {})",
                        cmdline.len()
                    ),
                );
            } else if cmdline.chars().any(char::is_control) {
                p.push(
                    "boot.cmdline",
                    "must not contain control characters (newlines, tabs, NUL)",
                );
            }
        }
        BootSpec::Firmware { disk } => {
            if !disks.iter().any(|d| &d.id == disk) {
                let known: Vec<&str> = disks.iter().map(|d| d.id.as_str()).collect();
                let known = if known.is_empty() {
                    "the spec has no disks".to_owned()
                } else {
                    format!("disks: {}", known.join(", "))
                };
                p.push(
                    "boot.disk",
                    format!("no disk with id {} ({known})", quoted(disk)),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{CacheMode, DiskFormat, NicModel};
    use std::path::PathBuf;

    fn disk(id: &str) -> DiskSpec {
        DiskSpec {
            id: id.to_owned(),
            source: DiskSource::Datastore {
                datastore: "local".to_owned(),
                file: format!("{id}.raw"),
            },
            format: DiskFormat::Raw,
            bus: DiskBus::Virtio,
            cache: CacheMode::None,
            read_only: false,
            image: None,
            create_size_bytes: None,
        }
    }

    fn nic(id: &str, mac: &str) -> NicSpec {
        NicSpec {
            id: id.to_owned(),
            model: NicModel::Virtio,
            mac: mac.to_owned(),
            backend: NicBackend::User,
        }
    }

    fn valid() -> VmSpec {
        VmSpec {
            name: "demo".to_owned(),
            uuid: uuid::Uuid::from_u128(0x1234),
            vcpus: 1,
            memory_bytes: 512 * crate::units::MIB,
            machine_type: super::super::DEFAULT_MACHINE_TYPE.to_owned(),
            cpu_model: super::super::DEFAULT_CPU_MODEL.to_owned(),
            disks: vec![disk("vd0")],
            nics: vec![nic("net0", "52:54:00:12:34:56")],
            serial_console: true,
            boot: BootSpec::Kernel {
                kernel: PathBuf::from("/boot/vmlinuz"),
                initrd: None,
                cmdline: "console=ttyS0".to_owned(),
            },
        }
    }

    /// The problems of `spec`, as "field: message" lines.
    fn problems(spec: &VmSpec) -> Vec<String> {
        match spec.validate() {
            Ok(()) => Vec::new(),
            Err(e) => e.problems().iter().map(ToString::to_string).collect(),
        }
    }

    fn assert_one_problem(spec: &VmSpec, field: &str, needle: &str) {
        let found = problems(spec);
        assert_eq!(found.len(), 1, "expected one problem, got {found:#?}");
        assert!(
            found[0].starts_with(&format!("{field}: ")) && found[0].contains(needle),
            "expected {field}: …{needle}…, got {found:#?}"
        );
    }

    #[test]
    fn valid_spec_passes() {
        assert_eq!(problems(&valid()), Vec::<String>::new());
    }

    #[test]
    fn json_spec_with_relative_kernel_is_rejected() {
        let mut spec = valid();
        spec.boot = BootSpec::Kernel {
            kernel: PathBuf::from("vmlinuz"),
            initrd: None,
            cmdline: String::new(),
        };
        assert_one_problem(&spec, "boot.kernel", "must be an absolute path");
    }

    #[test]
    fn names_with_option_like_or_odd_characters_are_rejected() {
        for (name, needle) in [
            ("", "must not be empty"),
            ("-rf", "must start with a letter or digit"),
            ("..", "must start with a letter or digit"),
            ("a b", "may contain only"),
            ("a,b", "may contain only"),
        ] {
            let mut spec = valid();
            spec.name = name.to_owned();
            assert_one_problem(&spec, "name", needle);
        }
        let mut spec = valid();
        spec.name = "x".repeat(64);
        assert_one_problem(&spec, "name", "at most 63");
        spec.name = "Web-01.example_2".to_owned();
        assert_eq!(problems(&spec), Vec::<String>::new());
    }

    #[test]
    fn vcpus_out_of_range_are_rejected() {
        for vcpus in [0, 256] {
            let mut spec = valid();
            spec.vcpus = vcpus;
            assert_one_problem(&spec, "vcpus", "between 1 and 255");
        }
    }

    #[test]
    fn memory_must_be_positive_whole_mib_and_bounded() {
        let mut spec = valid();
        spec.memory_bytes = 0;
        assert_one_problem(&spec, "memory", "must be greater than zero");
        spec.memory_bytes = 1_000_000;
        assert_one_problem(&spec, "memory", "whole number of MiB");
        spec.memory_bytes = 8 * crate::units::TIB;
        assert_one_problem(&spec, "memory", "at most 4TiB");
    }

    #[test]
    fn nil_uuid_is_rejected() {
        let mut spec = valid();
        spec.uuid = uuid::Uuid::nil();
        assert_one_problem(&spec, "uuid", "nil");
    }

    #[test]
    fn machine_aliases_and_unknown_families_are_rejected() {
        for (machine, needle) in [
            ("q35", "alias"),
            ("pc", "alias"),
            ("microvm", "unsupported machine type"),
            ("pc-q35-10.0,accel=kvm", "not a machine type name"),
        ] {
            let mut spec = valid();
            spec.machine_type = machine.to_owned();
            assert_one_problem(&spec, "machine", needle);
        }
    }

    #[test]
    fn cpu_model_may_carry_feature_flags_but_nothing_else() {
        let mut spec = valid();
        spec.cpu_model = "qemu64,+ssse3,-svm,level=13".to_owned();
        assert_eq!(problems(&spec), Vec::<String>::new());
        spec.cpu_model = "qemu64 -S".to_owned();
        assert_one_problem(&spec, "cpu", "not a CPU model");
        spec.cpu_model = ",qemu64".to_owned();
        assert_one_problem(&spec, "cpu", "not a CPU model");
    }

    #[test]
    fn ids_follow_the_id_rules() {
        for (id, needle) in [
            ("", "must not be empty"),
            ("0vd", "must start with a lower-case letter"),
            ("Vd0", "must start with a lower-case letter"),
            ("vd.0", "may contain only"),
            ("abcdefghijklmnopqrstuvwxy", "at most 24"),
        ] {
            let mut spec = valid();
            spec.disks[0].id = id.to_owned();
            assert_one_problem(&spec, "disks[0].id", needle);
        }
    }

    #[test]
    fn duplicate_disk_id_names_both_places() {
        let mut spec = valid();
        spec.disks.push(disk("vd0"));
        spec.disks[1].source = DiskSource::Datastore {
            datastore: "local".to_owned(),
            file: "other.raw".to_owned(),
        };
        assert_one_problem(
            &spec,
            "disks[1].id",
            "duplicate id \"vd0\" (also used by disks[0])",
        );
    }

    #[test]
    fn ids_are_unique_across_disks_and_nics() {
        let mut spec = valid();
        spec.nics[0].id = "vd0".to_owned();
        assert_one_problem(&spec, "nics[0].id", "also used by disks[0]");
    }

    #[test]
    fn datastore_file_must_stay_inside_the_datastore() {
        for (file, needle) in [
            ("../etc/passwd", "without '/'"),
            ("a/b.raw", "without '/'"),
            ("..", "must not start with '.'"),
            (".hidden", "must not start with '.'"),
            ("", "must not be empty"),
            ("a\nb", "control characters"),
        ] {
            let mut spec = valid();
            spec.disks[0].source = DiskSource::Datastore {
                datastore: "local".to_owned(),
                file: file.to_owned(),
            };
            assert_one_problem(&spec, "disks[0].file", needle);
        }
    }

    #[test]
    fn datastore_names_are_restricted() {
        let mut spec = valid();
        spec.disks[0].source = DiskSource::Datastore {
            datastore: "Local Store".to_owned(),
            file: "x.raw".to_owned(),
        };
        assert_one_problem(&spec, "disks[0].datastore", "not a datastore name");
    }

    #[test]
    fn image_and_size_are_exclusive_and_only_for_datastore_disks() {
        let mut spec = valid();
        spec.disks[0].image = Some(PathBuf::from("/images/base.raw"));
        spec.disks[0].create_size_bytes = Some(crate::units::GIB);
        assert_one_problem(&spec, "disks[0].size", "cannot be combined with `image`");

        let mut spec = valid();
        spec.disks[0].source = DiskSource::Path {
            path: PathBuf::from("/vm/a.raw"),
        };
        spec.disks[0].image = Some(PathBuf::from("/images/base.raw"));
        assert_one_problem(&spec, "disks[0].image", "only for datastore disks");
    }

    #[test]
    fn blank_disk_size_must_be_positive_whole_sectors() {
        let mut spec = valid();
        spec.disks[0].create_size_bytes = Some(0);
        assert_one_problem(&spec, "disks[0].size", "must be greater than zero");
        spec.disks[0].create_size_bytes = Some(1000);
        assert_one_problem(&spec, "disks[0].size", "multiple of 512");
    }

    #[test]
    fn ide_is_rejected_on_q35_and_accepted_on_i440fx() {
        let mut spec = valid();
        spec.disks[0].bus = DiskBus::Ide;
        assert_one_problem(&spec, "disks[0].bus", "no IDE controller");
        spec.machine_type = "pc-i440fx-10.0".to_owned();
        assert_eq!(problems(&spec), Vec::<String>::new());
    }

    #[test]
    fn read_only_ata_disks_are_rejected() {
        let mut spec = valid();
        spec.disks[0].bus = DiskBus::Sata;
        spec.disks[0].read_only = true;
        assert_one_problem(&spec, "disks[0].read_only", "cannot be read-only");
    }

    #[test]
    fn too_many_sata_disks_are_rejected_at_the_first_extra_one() {
        let mut spec = valid();
        spec.disks = (0..7)
            .map(|i| DiskSpec {
                bus: DiskBus::Sata,
                ..disk(&format!("sd{i}"))
            })
            .collect();
        assert_one_problem(&spec, "disks[6].bus", "at most 6 \"sata\" disks");
    }

    #[test]
    fn too_many_disks_are_rejected() {
        let mut spec = valid();
        spec.disks = (0..17).map(|i| disk(&format!("vd{i}"))).collect();
        assert_one_problem(&spec, "disks", "at most 16");
    }

    #[test]
    fn macs_must_be_canonical_unicast_and_unique() {
        for (mac, needle) in [
            ("52:54:00:12:34:5", "canonical form"),
            ("52:54:00:AB:CD:EF", "canonical form"),
            ("52-54-00-12-34-56", "canonical form"),
            ("01:00:5e:00:00:01", "multicast"),
            ("00:00:00:00:00:00", "must not be"),
        ] {
            let mut spec = valid();
            spec.nics[0].mac = mac.to_owned();
            assert_one_problem(&spec, "nics[0].mac", needle);
        }
        let mut spec = valid();
        spec.nics.push(nic("net1", "52:54:00:12:34:56"));
        assert_one_problem(&spec, "nics[1].mac", "duplicate MAC");
    }

    #[test]
    fn bridge_and_tap_names_must_be_interface_names() {
        let mut spec = valid();
        spec.nics[0].backend = NicBackend::Bridge {
            bridge: "a-very-long-bridge-name".to_owned(),
        };
        assert_one_problem(&spec, "nics[0].bridge", "not an interface name");
        spec.nics[0].backend = NicBackend::Tap {
            tap: "tap 0".to_owned(),
        };
        assert_one_problem(&spec, "nics[0].tap", "not an interface name");
    }

    #[test]
    fn firmware_boot_disk_must_exist() {
        let mut spec = valid();
        spec.boot = BootSpec::Firmware {
            disk: "vd9".to_owned(),
        };
        assert_one_problem(&spec, "boot.disk", "no disk with id \"vd9\" (disks: vd0)");
    }

    #[test]
    fn kernel_cmdline_rejects_control_characters() {
        let mut spec = valid();
        spec.boot = BootSpec::Kernel {
            kernel: PathBuf::from("/boot/vmlinuz"),
            initrd: Some(PathBuf::from("/boot/initrd")),
            cmdline: "console=ttyS0\n-S".to_owned(),
        };
        assert_one_problem(&spec, "boot.cmdline", "control characters");
    }

    #[test]
    fn all_problems_are_reported_together() {
        let mut spec = valid();
        spec.name = String::new();
        spec.vcpus = 0;
        spec.memory_bytes = 0;
        let found = problems(&spec);
        assert_eq!(found.len(), 3, "{found:#?}");
        let message = spec.validate().unwrap_err().to_string();
        assert!(
            message.starts_with("3 problems:\n  name: must not be empty"),
            "{message}"
        );
    }

    #[test]
    fn mac_parser_accepts_both_separators_and_cases() {
        assert_eq!(
            parse_mac("52-54-00-AB-cd-0F"),
            Some([0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f])
        );
        assert_eq!(parse_mac("52:54:00:ab:cd"), None);
        assert_eq!(parse_mac("52:54:00:ab:cd:ef:01"), None);
        assert_eq!(parse_mac("52:54:00:ab:cd:+f"), None);
    }
}

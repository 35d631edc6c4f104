//! The user-facing TOML form of a spec and its conversion to [`VmSpec`].
//!
//! The file structs here are private: they mirror what people write (sizes as
//! strings, optional fields, relative paths), while `VmSpec` is what the rest
//! of Ferry uses. Conversion happens in two passes: first everything that
//! turns text into values (sizes, uuid, MACs, paths, which of several ways a
//! disk or NIC is described), collecting every problem; then, only if that
//! worked, the shared rules of [`VmSpec::validate`]. A spec with both kinds
//! of mistake therefore shows the first kind first.
//!
//! See `examples/demo-vm.toml` at the repository root for a commented example.

use super::check::{check_vcpus, format_mac, parse_mac, Problems};
use super::{
    generate_mac, BootSpec, CacheMode, DiskBus, DiskFormat, DiskSource, DiskSpec, NicBackend,
    NicModel, NicSpec, SpecError, VmSpec, DEFAULT_CPU_MODEL, DEFAULT_MACHINE_TYPE,
    MAX_SPEC_FILE_BYTES,
};
use crate::units::{parse_size, UnitsError};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    name: String,
    uuid: Option<String>,
    /// Default 1. Signed so that `-1` gets Ferry's message, not serde's.
    vcpus: Option<i64>,
    memory: SizeValue,
    machine: Option<String>,
    cpu: Option<String>,
    /// Default true.
    serial_console: Option<bool>,
    /// Default: firmware boot from the first disk.
    boot: Option<BootFile>,
    #[serde(default)]
    disks: Vec<DiskFile>,
    #[serde(default)]
    nics: Vec<NicFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BootFile {
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    firmware: Option<Firmware>,
    disk: Option<String>,
}

/// Only SeaBIOS today; UEFI (OVMF) would add a variant and NVRAM handling.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Firmware {
    Bios,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskFile {
    id: String,
    datastore: Option<String>,
    file: Option<String>,
    path: Option<String>,
    format: Option<DiskFormat>,
    bus: Option<DiskBus>,
    cache: Option<CacheMode>,
    read_only: Option<bool>,
    image: Option<String>,
    size: Option<SizeValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NicFile {
    id: String,
    model: Option<NicModel>,
    mac: Option<String>,
    backend: Option<BackendKind>,
    bridge: Option<String>,
    tap: Option<String>,
    network: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum BackendKind {
    User,
    None,
    Bridge,
    Tap,
    Network,
}

/// A size as written: a string with a unit, or (by mistake) a bare integer,
/// which is accepted by the parser only to be rejected with a helpful
/// message instead of serde's type error.
enum SizeValue {
    Integer(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = SizeValue;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size with a unit, such as \"512MiB\"")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeValue, E> {
                Ok(SizeValue::Integer(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeValue, E> {
                Ok(SizeValue::Integer(i64::try_from(v).unwrap_or(i64::MAX)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeValue, E> {
                Ok(SizeValue::Text(v.to_owned()))
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

pub(super) fn parse(text: &str, base_dir: &Path) -> Result<VmSpec, SpecError> {
    if text.len() > MAX_SPEC_FILE_BYTES {
        return Err(SpecError::TooLarge {
            size: text.len(),
            limit: MAX_SPEC_FILE_BYTES,
        });
    }
    let file = deserialize(text)?;
    let mut problems = Problems::default();
    let spec = convert(file, base_dir, &mut problems);
    problems.into_result()?;
    spec.validate()?;
    Ok(spec)
}

fn deserialize(text: &str) -> Result<SpecFile, SpecError> {
    let deserializer =
        toml::Deserializer::parse(text).map_err(|e| toml_error(text, String::new(), &e))?;
    // serde_path_to_error tracks where in the document the failing value
    // sits, so an unknown key inside the second disk reads `disks[1]`.
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        toml_error(text, path, e.inner())
    })
}

fn toml_error(text: &str, field: String, error: &toml::de::Error) -> SpecError {
    let (line, column) = match error.span() {
        Some(span) => {
            let (line, column) = line_and_column(text, span.start);
            (Some(line), Some(column))
        }
        None => (None, None),
    };
    SpecError::Toml {
        field,
        line,
        column,
        message: error.message().trim_end().to_owned(),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn convert(file: SpecFile, base_dir: &Path, p: &mut Problems) -> VmSpec {
    let uuid = match &file.uuid {
        None => uuid::Uuid::new_v4(),
        Some(text) => uuid::Uuid::parse_str(text).unwrap_or_else(|_| {
            p.push("uuid", format!("{text:?} is not a UUID"));
            uuid::Uuid::nil()
        }),
    };

    let vcpus = file.vcpus.unwrap_or(1);
    let vcpus = u32::try_from(vcpus).unwrap_or_else(|_| {
        check_vcpus(vcpus, p);
        0
    });

    let memory_bytes = size_value("memory", file.memory, p);

    let disks: Vec<DiskSpec> = file
        .disks
        .into_iter()
        .enumerate()
        .map(|(i, disk)| convert_disk(i, disk, base_dir, p))
        .collect();

    let mut nics: Vec<NicSpec> = file
        .nics
        .into_iter()
        .enumerate()
        .map(|(i, nic)| convert_nic(i, nic, p))
        .collect();
    fill_macs(&mut nics);

    let boot = convert_boot(file.boot.unwrap_or_default(), &disks, base_dir, p);

    VmSpec {
        name: file.name,
        uuid,
        vcpus,
        memory_bytes,
        machine_type: file
            .machine
            .unwrap_or_else(|| DEFAULT_MACHINE_TYPE.to_owned()),
        cpu_model: file.cpu.unwrap_or_else(|| DEFAULT_CPU_MODEL.to_owned()),
        disks,
        nics,
        serial_console: file.serial_console.unwrap_or(true),
        boot,
    }
}

/// Bytes of a size field; `0` (which validation rejects) when unusable.
fn size_value(field: &str, value: SizeValue, p: &mut Problems) -> u64 {
    match value {
        SizeValue::Integer(n) if n <= 0 => {
            p.push(field, format!("must be greater than zero (got {n})"));
            0
        }
        SizeValue::Integer(n) => {
            p.push(
                field,
                format!("needs a unit: write \"{n}MiB\", or \"{n}B\" for bytes"),
            );
            0
        }
        SizeValue::Text(text) => match parse_size(&text) {
            Ok(bytes) => bytes,
            Err(UnitsError::Negative { .. }) => {
                p.push(field, format!("must be greater than zero (got {text:?})"));
                0
            }
            Err(e) => {
                p.push(field, e.to_string());
                0
            }
        },
    }
}

/// Resolves a path as written against the spec file's folder.
fn resolve(field: &str, value: &str, base_dir: &Path, p: &mut Problems) -> PathBuf {
    if value.is_empty() {
        p.push(field, "must not be empty");
        return PathBuf::new();
    }
    let path = base_dir.join(value);
    if !path.is_absolute() {
        p.push(
            field,
            format!(
                "{value:?} is relative, and the spec's folder {base_dir:?} is not absolute to \
                 resolve it against"
            ),
        );
    }
    path
}

fn convert_disk(i: usize, disk: DiskFile, base_dir: &Path, p: &mut Problems) -> DiskSpec {
    let at = |field: &str| format!("disks[{i}].{field}");

    let source = match (disk.path, disk.datastore, disk.file) {
        (Some(path), datastore, file) => {
            if datastore.is_some() || file.is_some() {
                p.push(
                    at("path"),
                    "cannot be combined with `datastore`/`file`: a disk is either a file in a \
                     datastore or a host path",
                );
            }
            DiskSource::Path {
                path: resolve(&at("path"), &path, base_dir, p),
            }
        }
        (None, Some(datastore), Some(file)) => DiskSource::Datastore { datastore, file },
        (None, Some(datastore), None) => {
            p.push(
                at("file"),
                format!("missing: the disk's file name inside datastore {datastore:?}"),
            );
            DiskSource::Datastore {
                datastore,
                file: String::new(),
            }
        }
        (None, None, Some(file)) => {
            p.push(
                at("datastore"),
                format!("missing: the datastore that holds file {file:?}"),
            );
            DiskSource::Datastore {
                datastore: String::new(),
                file,
            }
        }
        (None, None, None) => {
            p.push(
                format!("disks[{i}]"),
                "needs either `datastore` and `file`, or `path`",
            );
            DiskSource::Path {
                path: PathBuf::new(),
            }
        }
    };

    let format = disk.format.unwrap_or_else(|| {
        let name = match &source {
            DiskSource::Datastore { file, .. } => file.clone(),
            DiskSource::Path { path } => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        infer_format(&name).unwrap_or_else(|| {
            p.push(
                at("format"),
                format!(
                    "missing, and not implied by the file name {name:?} (only .raw and .qcow2 \
                     are): set format = \"raw\" or \"qcow2\""
                ),
            );
            DiskFormat::Raw
        })
    });

    DiskSpec {
        source,
        format,
        bus: disk.bus.unwrap_or(DiskBus::Virtio),
        cache: disk.cache.unwrap_or(CacheMode::None),
        read_only: disk.read_only.unwrap_or(false),
        image: disk
            .image
            .map(|image| resolve(&at("image"), &image, base_dir, p)),
        create_size_bytes: disk.size.map(|size| size_value(&at("size"), size, p)),
        id: disk.id,
    }
}

/// The format a file name implies. Only unambiguous extensions count: `.img`
/// is raw in some places and qcow2 in others (cloud images), and Ferry never
/// probes the content, because a guest can write any header into a raw disk.
fn infer_format(file_name: &str) -> Option<DiskFormat> {
    let (_, extension) = file_name.rsplit_once('.')?;
    if extension.eq_ignore_ascii_case("raw") {
        Some(DiskFormat::Raw)
    } else if extension.eq_ignore_ascii_case("qcow2") {
        Some(DiskFormat::Qcow2)
    } else {
        None
    }
}

fn convert_nic(i: usize, nic: NicFile, p: &mut Problems) -> NicSpec {
    let at = |field: &str| format!("nics[{i}].{field}");

    let kind = nic
        .backend
        .unwrap_or(match (&nic.network, &nic.bridge, &nic.tap) {
            (Some(_), _, _) => BackendKind::Network,
            (None, Some(_), _) => BackendKind::Bridge,
            (None, None, Some(_)) => BackendKind::Tap,
            (None, None, None) => BackendKind::User,
        });
    if kind != BackendKind::Network && nic.network.is_some() {
        p.push(
            at("network"),
            "only for a NIC on a cluster network (remove `backend`, or this key)",
        );
    }
    if kind != BackendKind::Bridge && nic.bridge.is_some() {
        p.push(
            at("bridge"),
            "only for a NIC attached to a bridge (remove `backend`, or this key)",
        );
    }
    if kind != BackendKind::Tap && nic.tap.is_some() {
        p.push(
            at("tap"),
            "only for a NIC on an existing tap device (remove `backend`, or this key)",
        );
    }
    let backend = match kind {
        BackendKind::User => NicBackend::User,
        BackendKind::None => NicBackend::None,
        BackendKind::Bridge => NicBackend::Bridge {
            bridge: nic.bridge.unwrap_or_else(|| {
                p.push(at("bridge"), "missing: the Linux bridge to attach to");
                String::new()
            }),
        },
        BackendKind::Tap => NicBackend::Tap {
            tap: nic.tap.unwrap_or_else(|| {
                p.push(at("tap"), "missing: the tap device to use");
                String::new()
            }),
        },
        BackendKind::Network => NicBackend::Network {
            network: nic.network.unwrap_or_else(|| {
                p.push(
                    at("network"),
                    "missing: the cluster network to attach to (see `ferry network list`)",
                );
                String::new()
            }),
        },
    };

    // An empty MAC here means "generate one" (see fill_macs).
    let mac = match nic.mac {
        None => String::new(),
        Some(text) => match parse_mac(&text) {
            Some(octets) => format_mac(octets),
            None => {
                p.push(
                    at("mac"),
                    format!(
                        "{text:?} is not a MAC address (six hex pairs separated by ':', e.g. \
                         \"52:54:00:12:34:56\")"
                    ),
                );
                "00:00:00:00:00:00".to_owned()
            }
        },
    };

    NicSpec {
        id: nic.id,
        model: nic.model.unwrap_or(NicModel::Virtio),
        mac,
        backend,
    }
}

/// Gives every NIC without a MAC a random one that no other NIC of the VM
/// has. (Uniqueness across VMs is probabilistic, as with libvirt: 24 random
/// bits; the controller can check its fleet.)
fn fill_macs(nics: &mut [NicSpec]) {
    for i in 0..nics.len() {
        if !nics[i].mac.is_empty() {
            continue;
        }
        let mac = loop {
            let candidate = generate_mac();
            if nics.iter().all(|n| n.mac != candidate) {
                break candidate;
            }
        };
        nics[i].mac = mac;
    }
}

fn convert_boot(boot: BootFile, disks: &[DiskSpec], base_dir: &Path, p: &mut Problems) -> BootSpec {
    if let Some(kernel) = boot.kernel {
        if boot.firmware.is_some() {
            p.push(
                "boot.firmware",
                "cannot be combined with boot.kernel: choose direct kernel boot or firmware boot",
            );
        }
        if boot.disk.is_some() {
            p.push(
                "boot.disk",
                "cannot be combined with boot.kernel: direct kernel boot does not boot from a disk",
            );
        }
        return BootSpec::Kernel {
            kernel: resolve("boot.kernel", &kernel, base_dir, p),
            initrd: boot
                .initrd
                .map(|initrd| resolve("boot.initrd", &initrd, base_dir, p)),
            cmdline: boot.cmdline.unwrap_or_default(),
        };
    }

    if boot.initrd.is_some() {
        p.push("boot.initrd", "needs boot.kernel");
    }
    if boot.cmdline.is_some() {
        p.push("boot.cmdline", "needs boot.kernel");
    }
    // Firmware boot is the default, like a physical PC. `firmware` can only
    // be "bios" today, so its value needs no further look.
    let _: Option<Firmware> = boot.firmware;
    let disk = boot.disk.or_else(|| disks.first().map(|d| d.id.clone()));
    BootSpec::Firmware {
        disk: disk.unwrap_or_else(|| {
            p.push(
                "boot",
                "nothing to boot: set boot.kernel for direct kernel boot, or add a disk",
            );
            String::new()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{GIB, MIB};

    const BASE: &str = "/srv/specs";

    fn parse_ok(text: &str) -> VmSpec {
        match VmSpec::from_toml_str(text, Path::new(BASE)) {
            Ok(spec) => spec,
            Err(e) => panic!("expected a valid spec, got: {e}"),
        }
    }

    fn parse_err(text: &str) -> SpecError {
        match VmSpec::from_toml_str(text, Path::new(BASE)) {
            Ok(spec) => panic!("expected an error, got {spec:#?}"),
            Err(e) => e,
        }
    }

    /// Asserts that the error has exactly one problem, at `field`, whose
    /// message contains `needle`.
    fn assert_one_problem(err: &SpecError, field: &str, needle: &str) {
        let problems = err.problems();
        assert_eq!(problems.len(), 1, "expected one problem, got: {err}");
        assert_eq!(problems[0].field, field, "wrong field in: {err}");
        assert!(
            problems[0].message.contains(needle),
            "expected {needle:?} in: {err}"
        );
    }

    const MINIMAL: &str = r#"
        name = "tiny"
        memory = "256MiB"
        [boot]
        kernel = "vmlinuz"
    "#;

    #[test]
    fn minimal_spec_gets_defaults() {
        let spec = parse_ok(MINIMAL);
        assert_eq!(spec.name, "tiny");
        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.memory_bytes, 256 * MIB);
        assert_eq!(spec.machine_type, DEFAULT_MACHINE_TYPE);
        assert_eq!(spec.cpu_model, DEFAULT_CPU_MODEL);
        assert!(spec.serial_console);
        assert!(spec.disks.is_empty() && spec.nics.is_empty());
        assert_eq!(spec.uuid.get_version_num(), 4);
        assert_eq!(
            spec.boot,
            BootSpec::Kernel {
                kernel: PathBuf::from("/srv/specs/vmlinuz"),
                initrd: None,
                cmdline: String::new(),
            }
        );
    }

    #[test]
    fn each_parse_without_uuid_generates_a_new_one() {
        assert_ne!(parse_ok(MINIMAL).uuid, parse_ok(MINIMAL).uuid);
    }

    #[test]
    fn given_uuid_is_kept() {
        let text = format!("uuid = \"6f1c9e1e-7f0b-4d0c-9a59-1b1de0b0c001\"\n{MINIMAL}");
        assert_eq!(
            parse_ok(&text).uuid.to_string(),
            "6f1c9e1e-7f0b-4d0c-9a59-1b1de0b0c001"
        );
    }

    #[test]
    fn full_spec_converts_every_field() {
        let spec = parse_ok(
            r#"
            name = "web-1"
            uuid = "6f1c9e1e-7f0b-4d0c-9a59-1b1de0b0c001"
            vcpus = 4
            memory = "2GiB"
            machine = "pc-i440fx-10.0"
            cpu = "Skylake-Client-v4"
            serial_console = false

            [boot]
            firmware = "bios"
            disk = "data"

            [[disks]]
            id = "root"
            datastore = "local"
            file = "web-1.qcow2"
            image = "/images/debian.qcow2"

            [[disks]]
            id = "data"
            path = "../disks/data.img"
            format = "raw"
            bus = "ide"
            cache = "writeback"

            [[disks]]
            id = "scratch"
            datastore = "fast"
            file = "scratch.raw"
            size = "10GiB"
            bus = "scsi"
            read_only = true

            [[nics]]
            id = "net0"
            mac = "52:54:00:AB:CD:EF"
            bridge = "br0"

            [[nics]]
            id = "net1"
            model = "e1000"
            tap = "tap7"

            [[nics]]
            id = "net2"
            backend = "none"
            "#,
        );
        assert_eq!(spec.vcpus, 4);
        assert_eq!(spec.memory_bytes, 2 * GIB);
        assert_eq!(spec.machine_type, "pc-i440fx-10.0");
        assert_eq!(spec.cpu_model, "Skylake-Client-v4");
        assert!(!spec.serial_console);
        assert_eq!(
            spec.boot,
            BootSpec::Firmware {
                disk: "data".to_owned()
            }
        );

        let root = &spec.disks[0];
        assert_eq!(
            root.source,
            DiskSource::Datastore {
                datastore: "local".to_owned(),
                file: "web-1.qcow2".to_owned()
            }
        );
        assert_eq!(root.format, DiskFormat::Qcow2, "inferred from .qcow2");
        assert_eq!(root.bus, DiskBus::Virtio);
        assert_eq!(root.cache, CacheMode::None);
        assert_eq!(root.image, Some(PathBuf::from("/images/debian.qcow2")));

        let data = &spec.disks[1];
        assert_eq!(
            data.source,
            DiskSource::Path {
                path: PathBuf::from("/srv/specs/../disks/data.img")
            }
        );
        assert_eq!(data.bus, DiskBus::Ide);
        assert_eq!(data.cache, CacheMode::Writeback);

        let scratch = &spec.disks[2];
        assert_eq!(scratch.create_size_bytes, Some(10 * GIB));
        assert!(scratch.read_only);
        assert_eq!(scratch.bus, DiskBus::Scsi);

        assert_eq!(spec.nics[0].mac, "52:54:00:ab:cd:ef", "normalised");
        assert_eq!(
            spec.nics[0].backend,
            NicBackend::Bridge {
                bridge: "br0".to_owned()
            }
        );
        assert_eq!(spec.nics[1].model, NicModel::E1000);
        assert_eq!(
            spec.nics[1].backend,
            NicBackend::Tap {
                tap: "tap7".to_owned()
            }
        );
        assert_eq!(spec.nics[2].backend, NicBackend::None);
        assert!(spec.nics[2].mac.starts_with("52:54:00:"));
    }

    #[test]
    fn missing_macs_are_generated_unique_with_qemu_prefix() {
        let mut text = MINIMAL.to_owned();
        for i in 0..8 {
            text.push_str(&format!("[[nics]]\nid = \"n{i}\"\n"));
        }
        let spec = parse_ok(&text);
        let mut macs: Vec<&str> = spec.nics.iter().map(|n| n.mac.as_str()).collect();
        assert!(macs.iter().all(|m| m.starts_with("52:54:00:")));
        macs.sort_unstable();
        macs.dedup();
        assert_eq!(macs.len(), 8);
        assert!(spec.nics.iter().all(|n| n.backend == NicBackend::User));
    }

    #[test]
    fn no_boot_section_boots_firmware_from_first_disk() {
        let spec = parse_ok(
            r#"
            name = "fw"
            memory = "1GiB"
            [[disks]]
            id = "vd0"
            path = "/vm/fw.raw"
            "#,
        );
        assert_eq!(
            spec.boot,
            BootSpec::Firmware {
                disk: "vd0".to_owned()
            }
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_its_location() {
        let err = parse_err(&format!(
            "{MINIMAL}\n[[disks]]\nid = \"vd0\"\ncolour = \"red\"\n"
        ));
        let SpecError::Toml {
            field,
            line,
            message,
            ..
        } = &err
        else {
            panic!("expected a TOML error, got {err:?}");
        };
        assert!(message.contains("unknown field `colour`"), "{err}");
        assert!(field.starts_with("disks[0]"), "{err}");
        assert_eq!(*line, Some(9), "{err}");
        assert!(err.to_string().contains("(line 9, column 1)"), "{err}");
    }

    #[test]
    fn unknown_top_level_key_is_rejected() {
        let err = parse_err(&format!("colour = \"red\"\n{MINIMAL}"));
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
        assert!(err.to_string().contains("line 1, column 1"), "{err}");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = parse_err("name = \"x\"\nmemory = \n");
        assert!(
            matches!(err, SpecError::Toml { line: Some(2), .. }),
            "{err:?}"
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = parse_err(&MINIMAL.replace("name = \"tiny\"", "name = \"tiny\"\nvcpus = \"2\""));
        let SpecError::Toml { field, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(field, "vcpus", "{err}");
    }

    #[test]
    fn zero_memory_is_rejected() {
        for memory in ["\"0MiB\"", "0"] {
            let err = parse_err(&MINIMAL.replace("\"256MiB\"", memory));
            assert_one_problem(&err, "memory", "must be greater than zero");
        }
    }

    #[test]
    fn negative_memory_is_rejected() {
        for memory in ["\"-512MiB\"", "-512"] {
            let err = parse_err(&MINIMAL.replace("\"256MiB\"", memory));
            assert_one_problem(&err, "memory", "must be greater than zero");
        }
    }

    #[test]
    fn memory_without_unit_is_rejected_with_a_hint() {
        let err = parse_err(&MINIMAL.replace("\"256MiB\"", "256"));
        assert_one_problem(&err, "memory", "needs a unit: write \"256MiB\"");
        let err = parse_err(&MINIMAL.replace("\"256MiB\"", "\"256\""));
        assert_one_problem(&err, "memory", "has no unit");
    }

    #[test]
    fn memory_not_whole_mib_is_rejected() {
        let err = parse_err(&MINIMAL.replace("\"256MiB\"", "\"1000KiB\""));
        assert_one_problem(&err, "memory", "whole number of MiB");
    }

    #[test]
    fn negative_vcpus_are_rejected() {
        let err = parse_err(&format!("vcpus = -2\n{MINIMAL}"));
        assert_one_problem(&err, "vcpus", "between 1 and 255 (got -2)");
        let err = parse_err(&format!("vcpus = 0\n{MINIMAL}"));
        assert_one_problem(&err, "vcpus", "between 1 and 255 (got 0)");
    }

    #[test]
    fn duplicate_disk_id_is_rejected() {
        let err = parse_err(&format!(
            "{MINIMAL}
            [[disks]]
            id = \"vd0\"
            datastore = \"local\"
            file = \"a.raw\"
            [[disks]]
            id = \"vd0\"
            datastore = \"local\"
            file = \"b.raw\"
            "
        ));
        assert_one_problem(
            &err,
            "disks[1].id",
            "duplicate id \"vd0\" (also used by disks[0])",
        );
        assert_eq!(
            err.to_string(),
            "disks[1].id: duplicate id \"vd0\" (also used by disks[0])"
        );
    }

    #[test]
    fn disk_must_have_exactly_one_source() {
        let err = parse_err(&format!(
            "{MINIMAL}\n[[disks]]\nid = \"vd0\"\nformat = \"raw\"\n"
        ));
        assert_one_problem(
            &err,
            "disks[0]",
            "needs either `datastore` and `file`, or `path`",
        );
        let err = parse_err(&format!(
            "{MINIMAL}\n[[disks]]\nid = \"vd0\"\npath = \"/a.raw\"\ndatastore = \"local\"\n"
        ));
        assert_one_problem(&err, "disks[0].path", "cannot be combined");
        let err = parse_err(&format!(
            "{MINIMAL}\n[[disks]]\nid = \"vd0\"\nfile = \"a.raw\"\n"
        ));
        assert_one_problem(&err, "disks[0].datastore", "missing");
    }

    #[test]
    fn ambiguous_disk_format_must_be_spelled_out() {
        let err = parse_err(&format!(
            "{MINIMAL}\n[[disks]]\nid = \"vd0\"\ndatastore = \"local\"\nfile = \"cloud.img\"\n"
        ));
        assert_one_problem(&err, "disks[0].format", "set format = \"raw\" or \"qcow2\"");
    }

    #[test]
    fn datastore_file_with_dotdot_is_rejected() {
        let err = parse_err(&format!(
            "{MINIMAL}\n[[disks]]\nid = \"vd0\"\ndatastore = \"local\"\nfile = \"../x.raw\"\n"
        ));
        assert_one_problem(&err, "disks[0].file", "without '/'");
    }

    #[test]
    fn image_and_size_together_are_rejected() {
        let err = parse_err(&format!(
            "{MINIMAL}\n[[disks]]\nid = \"vd0\"\ndatastore = \"local\"\nfile = \"a.raw\"\n\
             image = \"/i.raw\"\nsize = \"1GiB\"\n"
        ));
        assert_one_problem(&err, "disks[0].size", "cannot be combined with `image`");
    }

    #[test]
    fn disk_size_must_be_positive() {
        let err = parse_err(&format!(
            "{MINIMAL}\n[[disks]]\nid = \"vd0\"\ndatastore = \"local\"\nfile = \"a.raw\"\n\
             size = \"-1GiB\"\n"
        ));
        assert_one_problem(&err, "disks[0].size", "must be greater than zero");
    }

    #[test]
    fn unknown_bus_names_the_choices() {
        let err = parse_err(&format!(
            "{MINIMAL}\n[[disks]]\nid = \"vd0\"\npath = \"/a.raw\"\nbus = \"nvme\"\n"
        ));
        let message = err.to_string();
        assert!(message.contains("disks[0].bus"), "{message}");
        assert!(message.contains("unknown variant `nvme`"), "{message}");
    }

    #[test]
    fn bad_mac_is_rejected() {
        let err = parse_err(&format!(
            "{MINIMAL}\n[[nics]]\nid = \"n0\"\nmac = \"52:54:00:zz:00:01\"\n"
        ));
        assert_one_problem(&err, "nics[0].mac", "is not a MAC address");
        let err = parse_err(&format!(
            "{MINIMAL}\n[[nics]]\nid = \"n0\"\nmac = \"53:54:00:00:00:01\"\n"
        ));
        assert_one_problem(&err, "nics[0].mac", "multicast");
    }

    #[test]
    fn nic_backend_keys_must_agree() {
        let err = parse_err(&format!(
            "{MINIMAL}\n[[nics]]\nid = \"n0\"\nbackend = \"user\"\nbridge = \"br0\"\n"
        ));
        assert_one_problem(
            &err,
            "nics[0].bridge",
            "only for a NIC attached to a bridge",
        );
        let err = parse_err(&format!(
            "{MINIMAL}\n[[nics]]\nid = \"n0\"\nbackend = \"tap\"\n"
        ));
        assert_one_problem(&err, "nics[0].tap", "missing");
        let spec = parse_ok(&format!(
            "{MINIMAL}\n[[nics]]\nid = \"n0\"\nbackend = \"bridge\"\nbridge = \"br0\"\n"
        ));
        assert_eq!(
            spec.nics[0].backend,
            NicBackend::Bridge {
                bridge: "br0".to_owned()
            }
        );
    }

    #[test]
    fn firmware_boot_disk_must_exist() {
        let err = parse_err(
            r#"
            name = "fw"
            memory = "1GiB"
            [boot]
            disk = "vd1"
            [[disks]]
            id = "vd0"
            path = "/vm/fw.raw"
            "#,
        );
        assert_one_problem(&err, "boot.disk", "no disk with id \"vd1\"");
    }

    #[test]
    fn nothing_to_boot_is_rejected() {
        let err = parse_err("name = \"x\"\nmemory = \"1GiB\"\n");
        assert_one_problem(&err, "boot", "nothing to boot");
    }

    #[test]
    fn kernel_and_firmware_together_are_rejected() {
        let err = parse_err(&format!("{MINIMAL}firmware = \"bios\"\n"));
        assert_one_problem(&err, "boot.firmware", "cannot be combined with boot.kernel");
    }

    #[test]
    fn initrd_without_kernel_is_rejected() {
        let err = parse_err(
            "name = \"x\"\nmemory = \"1GiB\"\n[boot]\ninitrd = \"i\"\n[[disks]]\nid = \"vd0\"\npath = \"/a.raw\"\n",
        );
        assert_one_problem(&err, "boot.initrd", "needs boot.kernel");
    }

    #[test]
    fn relative_paths_need_an_absolute_base() {
        let err = VmSpec::from_toml_str(MINIMAL, Path::new("specs")).unwrap_err();
        assert_one_problem(&err, "boot.kernel", "is not absolute");
    }

    #[test]
    fn several_conversion_problems_are_reported_together() {
        let err =
            parse_err("name = \"x\"\nmemory = \"lots\"\nuuid = \"nope\"\n[boot]\nkernel = \"k\"\n");
        let fields: Vec<String> = err.problems().into_iter().map(|p| p.field).collect();
        assert_eq!(fields, ["uuid", "memory"], "{err}");
    }

    #[test]
    fn oversized_document_is_rejected_before_parsing() {
        let text = format!("{MINIMAL}#{}", "x".repeat(MAX_SPEC_FILE_BYTES));
        assert!(matches!(parse_err(&text), SpecError::TooLarge { .. }));
    }

    #[test]
    fn resolved_spec_round_trips_through_json_and_still_validates() {
        let spec = parse_ok(&format!(
            "{MINIMAL}\n[[disks]]\nid = \"vd0\"\ndatastore = \"local\"\nfile = \"a.raw\"\n[[nics]]\nid = \"n0\"\n"
        ));
        let json = serde_json::to_string(&spec).unwrap();
        let back: VmSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        back.validate().unwrap();
    }

    #[test]
    fn example_demo_net_spec_parses_with_its_network_nic() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let text = std::fs::read_to_string(examples.join("demo-net-vm.toml")).unwrap();
        let spec = VmSpec::from_toml_str(&text, &examples).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.name, "demo-net");
        assert_eq!(spec.nics.len(), 1);
        assert_eq!(spec.nics[0].mac, "52:54:00:fe:00:10");
        assert_eq!(spec.nics[0].backend.network(), Some("demo-lan"));
        let BootSpec::Kernel { cmdline, .. } = &spec.boot else {
            panic!("demo-net boots a kernel directly");
        };
        assert!(cmdline.contains("ferry.ip=198.18.0.10/15"), "{cmdline}");
        assert!(cmdline.contains("ferry.echo_port=7000"), "{cmdline}");
    }

    #[test]
    fn a_network_nic_names_its_network_and_nothing_else() {
        let ok = parse_ok(
            r#"
            name = "n"
            vcpus = 1
            memory = "256MiB"
            [boot]
            firmware = "bios"
            disk = "d"
            [[disks]]
            id = "d"
            path = "/x.raw"
            [[nics]]
            id = "net0"
            network = "lan-1"
            "#,
        );
        assert_eq!(ok.nics[0].backend.network(), Some("lan-1"));
        let problems = parse_err(
            r#"
            name = "n"
            vcpus = 1
            memory = "256MiB"
            [boot]
            firmware = "bios"
            disk = "d"
            [[disks]]
            id = "d"
            path = "/x.raw"
            [[nics]]
            id = "net1"
            backend = "network"
            [[nics]]
            id = "net2"
            backend = "user"
            network = "lan"
            "#,
        );
        let listed = problems.problems();
        let fields: Vec<&str> = listed.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["nics[0].network", "nics[1].network"], "{problems}");
        let bad_name = parse_err(
            r#"
            name = "n"
            vcpus = 1
            memory = "256MiB"
            [boot]
            firmware = "bios"
            disk = "d"
            [[disks]]
            id = "d"
            path = "/x.raw"
            [[nics]]
            id = "net0"
            network = "bad name"
            "#,
        );
        assert_one_problem(&bad_name, "nics[0].network", "may contain only");
    }

    #[test]
    fn example_demo_spec_parses() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let text = std::fs::read_to_string(examples.join("demo-vm.toml")).unwrap();
        let spec = VmSpec::from_toml_str(&text, &examples).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.name, "demo");
        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.memory_bytes, 512 * MIB);
        let BootSpec::Kernel {
            kernel,
            initrd,
            cmdline,
        } = &spec.boot
        else {
            panic!("demo boots a kernel directly");
        };
        assert!(kernel.ends_with("target/test-guest/vmlinuz"));
        assert!(initrd
            .as_ref()
            .is_some_and(|i| i.ends_with("target/test-guest/initramfs.img")));
        assert!(cmdline.starts_with("console=ttyS0"));
        assert_eq!(spec.disks.len(), 1);
        let disk = &spec.disks[0];
        assert_eq!(disk.id, "vd0");
        assert_eq!(
            disk.source,
            DiskSource::Datastore {
                datastore: "local".to_owned(),
                file: "demo.raw".to_owned()
            }
        );
        assert_eq!(disk.format, DiskFormat::Raw);
        assert!(disk
            .image
            .as_ref()
            .is_some_and(|i| i.ends_with("target/test-guest/disk.raw")));
        assert_eq!(spec.nics.len(), 1);
        assert_eq!(spec.nics[0].backend, NicBackend::User);
    }

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_and_column("ab\ncé=x", 6), (2, 3));
        assert_eq!(line_and_column("", 0), (1, 1));
    }
}

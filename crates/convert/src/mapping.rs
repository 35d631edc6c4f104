//! A foreign VM becomes a Ferry spec.
//!
//! Every source device and setting yields one [`Mapping`] line, kept,
//! changed (with why) or left out, so the import report names them all.
//! The choices, nearest-supported first and boot-safety second:
//!
//! * disks: virtio → virtio; VMware's paravirtual SCSI (pvscsi,
//!   `VirtualSCSI`) → `virtio` (paravirtual to paravirtual: a guest that
//!   had VMware's driver needs virtio's, as for the NIC, and Linux has it;
//!   it is also what Ferry exports virtio disks as, so a round trip keeps
//!   them); other SCSI controllers (LSI Logic, BusLogic, LSI SAS,
//!   virtio-scsi, Hyper-V synthetic) → `scsi` (virtio-scsi); SATA/AHCI →
//!   `sata`; IDE → `sata` (Ferry's q35 machine has no IDE controller; every
//!   OS has an AHCI driver); NVMe → `virtio`; unknown → `sata`;
//! * NICs: virtio → virtio; VMware's vmxnet3 → `virtio` (paravirtual to
//!   paravirtual, and Ferry's export of virtio); everything else (e1000,
//!   e1000e, PCnet, Hyper-V synthetic or legacy) → `e1000`, which every
//!   guest OS drives without extra drivers;
//! * firmware: BIOS → SeaBIOS; UEFI → SeaBIOS with a warning (Ferry does
//!   not boot UEFI guests yet);
//! * CD/DVD drives, floppies, sound, USB and the like → left out.

use crate::detect::ImageInfo;
use crate::foreign::{BusKind, Firmware, ForeignDisk, ForeignNic, ForeignVm, Origin};
use crate::report::{Mapping, MappingAction};
use crate::{ConvertError, Result};
use ferry_core::spec::{
    BootSpec, CacheMode, DiskBus, DiskFormat, DiskSource, DiskSpec, NicBackend, NicModel, NicSpec,
    VmSpec, DEFAULT_CPU_MODEL, DEFAULT_MACHINE_TYPE, MAX_DISKS, MAX_NAME_LEN, MAX_NICS,
};
use ferry_core::units::{format_size_human, MIB};

/// What the user asked for on the command line.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// `--name`: overrides the source's name.
    pub name: Option<String>,
    /// `--vcpus` / `--memory`: override the source's (and are required when
    /// the source has none, as for a bare image).
    pub vcpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    /// `--datastore`: where the disks go.
    pub datastore: String,
    /// `--format`: the format of the disks Ferry writes.
    pub target_format: DiskFormat,
    /// `--network`: the cluster network every NIC joins; user-mode
    /// networking otherwise.
    pub network: Option<String>,
    /// `--new-macs`: give every NIC a new MAC (for a copy of a VM that
    /// still runs somewhere).
    pub new_macs: bool,
}

/// A source disk with its file resolved and its bytes inspected.
#[derive(Debug, Clone)]
pub struct InspectedDisk {
    pub disk: ForeignDisk,
    /// How the report names the file (`x.ova:disk1.vmdk`, `/path/disk.vmdk`).
    pub shown_as: String,
    pub image: ImageInfo,
}

/// The mapping's result.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub spec: VmSpec,
    pub mappings: Vec<Mapping>,
    pub warnings: Vec<String>,
}

/// Maps `vm` (whose disks, in order, are `disks`) to a Ferry spec.
/// `fallback_name` is used when neither `--name` nor the source names it.
pub fn map(
    vm: &ForeignVm,
    origin: Origin,
    disks: &[InspectedDisk],
    options: &ImportOptions,
    fallback_name: &str,
) -> Result<Mapped> {
    let mut mappings = Vec::new();
    let mut warnings = Vec::new();

    let name = vm_name(vm, options, fallback_name, &mut mappings)?;

    let vcpus = match (options.vcpus, vm.vcpus) {
        (Some(flag), source) => {
            mappings.push(line(
                "cpu",
                source.map(vcpu_words).unwrap_or("none given".into()),
                format!("{} (--vcpus)", vcpu_words(flag)),
                if source == Some(flag) {
                    MappingAction::Kept
                } else {
                    MappingAction::Changed
                },
                None,
            ));
            flag
        }
        (None, Some(source)) => {
            mappings.push(line(
                "cpu",
                vcpu_words(source),
                format!("{}, model {DEFAULT_CPU_MODEL}", vcpu_words(source)),
                MappingAction::Kept,
                None,
            ));
            source
        }
        (None, None) => {
            return Err(ConvertError::invalid(format!(
                "the {} gives no vCPU count: pass --vcpus N",
                origin_words(origin)
            )))
        }
    };
    let memory_bytes = match (options.memory_bytes, vm.memory_bytes) {
        (Some(flag), source) => {
            mappings.push(line(
                "memory",
                source.map(format_size_human).unwrap_or("none given".into()),
                format!("{} (--memory)", format_size_human(flag)),
                if source == Some(flag) {
                    MappingAction::Kept
                } else {
                    MappingAction::Changed
                },
                None,
            ));
            flag
        }
        (None, Some(source)) => {
            let rounded = source.div_ceil(MIB) * MIB;
            mappings.push(line(
                "memory",
                format_size_human(source),
                format_size_human(rounded),
                if rounded == source {
                    MappingAction::Kept
                } else {
                    MappingAction::Changed
                },
                (rounded != source).then(|| "rounded up to a whole MiB".to_string()),
            ));
            rounded
        }
        (None, None) => {
            return Err(ConvertError::invalid(format!(
                "the {} gives no memory size: pass --memory SIZE (e.g. 2GiB)",
                origin_words(origin)
            )))
        }
    };
    if options.memory_bytes.is_some_and(|m| m % MIB != 0) {
        return Err(ConvertError::invalid(
            "--memory must be a whole number of MiB",
        ));
    }

    match vm.firmware {
        Firmware::Bios => mappings.push(line(
            "firmware",
            "BIOS",
            "BIOS (SeaBIOS)",
            MappingAction::Kept,
            None,
        )),
        Firmware::Uefi => {
            mappings.push(line(
                "firmware",
                "UEFI",
                "BIOS (SeaBIOS)",
                MappingAction::Changed,
                Some("Ferry does not boot UEFI guests yet".into()),
            ));
            warnings.push(
                "the source boots with UEFI; Ferry boots with SeaBIOS, so the guest boots only if its disk also carries a BIOS boot loader".into(),
            );
        }
    }
    if let Some(platform) = &vm.platform {
        mappings.push(line(
            "machine",
            platform.clone(),
            format!("{DEFAULT_MACHINE_TYPE} (q35)"),
            MappingAction::Changed,
            Some("Ferry pins a versioned QEMU machine type".into()),
        ));
    }

    if disks.is_empty() {
        return Err(ConvertError::invalid(format!(
            "the {} has no hard disk to import",
            origin_words(origin)
        )));
    }
    if disks.len() > MAX_DISKS {
        return Err(ConvertError::invalid(format!(
            "the VM has {} disks; Ferry takes at most {MAX_DISKS}",
            disks.len()
        )));
    }
    let mut spec_disks = Vec::new();
    for (index, inspected) in disks.iter().enumerate() {
        let id = format!("disk{index}");
        let (bus, note) = disk_bus(&inspected.disk);
        let mut read_only = inspected.disk.read_only;
        let mut notes: Vec<String> = note.into_iter().collect();
        if read_only && !matches!(bus, DiskBus::Virtio | DiskBus::Scsi) {
            read_only = false;
            notes.push("read-only dropped: a SATA disk cannot be read-only".into());
            warnings.push(format!(
                "disk {id} was read-only in the source and is writable now"
            ));
        }
        if let Some(claim) = inspected.disk.capacity_claim {
            if claim != inspected.image.virtual_size {
                notes.push(format!(
                    "the descriptor claims {}, the image holds {}; the image's size is used",
                    format_size_human(claim),
                    format_size_human(inspected.image.virtual_size)
                ));
            }
        }
        let file = format!("{name}-{id}.{}", options.target_format.as_str());
        let action = if notes.is_empty() && bus_matches(inspected.disk.bus, bus) {
            MappingAction::Kept
        } else {
            MappingAction::Changed
        };
        mappings.push(line(
            "disk",
            format!(
                "{} on {} ({}, {} {})",
                inspected.disk.label,
                if inspected.disk.controller.is_empty() {
                    "an unnamed controller"
                } else {
                    &inspected.disk.controller
                },
                inspected.shown_as,
                inspected.image.format.name(),
                format_size_human(inspected.image.virtual_size)
            ),
            format!(
                "{id}: {} ({}), {}/{file} {}",
                bus.as_str(),
                bus_words(bus),
                options.datastore,
                options.target_format.as_str()
            ),
            action,
            (!notes.is_empty()).then(|| notes.join("; ")),
        ));
        spec_disks.push(DiskSpec {
            id,
            source: DiskSource::Datastore {
                datastore: options.datastore.clone(),
                file,
            },
            format: options.target_format,
            bus,
            cache: CacheMode::None,
            read_only,
            image: None,
            create_size_bytes: None,
        });
    }
    let boot_index = boot_disk(disks);
    let boot_id = spec_disks[boot_index].id.clone();
    mappings.push(line(
        "boot",
        match disks[boot_index].disk.boot_order {
            Some(order) => format!("boot order {order}: {}", disks[boot_index].disk.label),
            None => format!("no boot order: first disk {}", disks[boot_index].disk.label),
        },
        format!("firmware boot from {boot_id}"),
        MappingAction::Kept,
        None,
    ));

    let mut nics = Vec::new();
    for (index, nic) in vm.nics.iter().enumerate() {
        if index >= MAX_NICS {
            mappings.push(line(
                "nic",
                nic_words(nic),
                String::new(),
                MappingAction::LeftOut,
                Some(format!("Ferry takes at most {MAX_NICS} NICs")),
            ));
            warnings.push(format!("NIC {} left out: more than {MAX_NICS}", nic.label));
            continue;
        }
        let id = format!("net{index}");
        let (model, model_note) = nic_model(&nic.model);
        let mut notes: Vec<String> = model_note.into_iter().collect();
        let mac = match (options.new_macs, nic.mac.as_deref().map(parse_mac)) {
            (true, _) => {
                notes.push("new MAC (--new-macs)".into());
                ferry_core::spec::generate_mac()
            }
            (false, Some(Some(mac))) => mac,
            (false, Some(None)) => {
                notes.push(format!(
                    "MAC {:?} is not a unicast MAC; a new one was made",
                    nic.mac.as_deref().unwrap_or("")
                ));
                ferry_core::spec::generate_mac()
            }
            (false, None) => {
                notes.push("the source fixes no MAC; a new one was made".into());
                ferry_core::spec::generate_mac()
            }
        };
        let backend = match &options.network {
            Some(network) => NicBackend::Network {
                network: network.clone(),
            },
            None => NicBackend::User,
        };
        let backend_words = match &options.network {
            Some(network) => format!("cluster network {network}"),
            None => {
                notes.push(
                    "user-mode networking: pass --network NAME to join a cluster network".into(),
                );
                "user-mode networking".into()
            }
        };
        mappings.push(line(
            "nic",
            nic_words(nic),
            format!("{id}: {}, {mac}, {backend_words}", model.as_str()),
            if notes.is_empty() {
                MappingAction::Kept
            } else {
                MappingAction::Changed
            },
            (!notes.is_empty()).then(|| notes.join("; ")),
        ));
        nics.push(NicSpec {
            id,
            model,
            mac,
            backend,
        });
    }

    let mut serial_taken = false;
    for device in &vm.other_devices {
        if device.kind == "serial" && !serial_taken {
            // Every Ferry VM has one serial port, logged by its host's agent.
            serial_taken = true;
            mappings.push(line(
                "serial",
                device.label.clone(),
                "ttyS0, logged by the host (ferry vm console)",
                MappingAction::Changed,
                Some("the source's port backing (file, pipe, network) is not carried over".into()),
            ));
            continue;
        }
        mappings.push(line(
            &device.kind,
            device.label.clone(),
            String::new(),
            MappingAction::LeftOut,
            Some(format!("Ferry VMs have no {}", device.kind)),
        ));
    }
    if let Some(os) = &vm.guest_os {
        mappings.push(line(
            "guest OS",
            os.clone(),
            "not recorded",
            MappingAction::LeftOut,
            Some("informational in the source".into()),
        ));
    }
    if let Some(uuid) = &vm.uuid {
        mappings.push(line(
            "uuid",
            uuid.clone(),
            "a new uuid",
            MappingAction::Changed,
            Some("so the import never collides with the source VM".into()),
        ));
    }

    let spec = VmSpec {
        name,
        uuid: uuid::Uuid::new_v4(),
        vcpus,
        memory_bytes,
        machine_type: DEFAULT_MACHINE_TYPE.into(),
        cpu_model: DEFAULT_CPU_MODEL.into(),
        disks: spec_disks,
        nics,
        serial_console: true,
        boot: BootSpec::Firmware { disk: boot_id },
    };
    spec.validate().map_err(|error| {
        ConvertError::invalid(format!("the imported VM would not be valid: {error}"))
    })?;
    Ok(Mapped {
        spec,
        mappings,
        warnings,
    })
}

fn vcpu_words(n: u32) -> String {
    if n == 1 {
        "1 vCPU".into()
    } else {
        format!("{n} vCPUs")
    }
}

fn line(
    device: &str,
    source: impl Into<String>,
    target: impl Into<String>,
    action: MappingAction,
    note: Option<String>,
) -> Mapping {
    Mapping {
        device: device.into(),
        source: source.into(),
        target: target.into(),
        action,
        note,
    }
}

fn origin_words(origin: Origin) -> &'static str {
    match origin {
        Origin::Ovf => "OVF descriptor",
        Origin::Vmx => ".vmx file",
        Origin::Libvirt => "libvirt domain XML",
        Origin::Vbox => ".vbox file",
        Origin::HyperV => "Hyper-V configuration",
        Origin::BareImage => "bare disk image",
    }
}

/// The VM's name: `--name`, else the source's made valid, else the file's.
fn vm_name(
    vm: &ForeignVm,
    options: &ImportOptions,
    fallback: &str,
    mappings: &mut Vec<Mapping>,
) -> Result<String> {
    if let Some(name) = &options.name {
        mappings.push(line(
            "name",
            vm.name.clone().unwrap_or_default(),
            format!("{name} (--name)"),
            MappingAction::Kept,
            None,
        ));
        return Ok(name.clone());
    }
    let source = vm.name.clone().unwrap_or_else(|| fallback.to_string());
    let cleaned = clean_name(&source);
    if cleaned.is_empty() {
        return Err(ConvertError::invalid(format!(
            "cannot make a VM name from {source:?}: pass --name NAME"
        )));
    }
    let action = if cleaned == source {
        MappingAction::Kept
    } else {
        MappingAction::Changed
    };
    mappings.push(line(
        "name",
        source.clone(),
        cleaned.clone(),
        action,
        (action == MappingAction::Changed)
            .then(|| "Ferry names use letters, digits, '.', '_' and '-'".into()),
    ));
    Ok(cleaned)
}

/// Letters, digits, `.`, `_`, `-`; other characters become `-`; starts with
/// a letter or digit; at most [`MAX_NAME_LEN`].
fn clean_name(source: &str) -> String {
    let mapped: String = source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let mut name: String = trimmed.chars().take(MAX_NAME_LEN).collect();
    while name.ends_with('-') {
        name.pop();
    }
    name
}

fn disk_bus(disk: &ForeignDisk) -> (DiskBus, Option<String>) {
    match disk.bus {
        BusKind::Virtio => (DiskBus::Virtio, None),
        BusKind::Sata => (DiskBus::Sata, None),
        BusKind::Scsi if is_vmware_paravirtual(&disk.controller) => (
            DiskBus::Virtio,
            Some("VMware's paravirtual SCSI becomes virtio-blk (the guest sees /dev/vdX; Windows needs virtio-win drivers)".into()),
        ),
        BusKind::Scsi => (
            DiskBus::Scsi,
            (!disk.controller.to_ascii_lowercase().contains("virtio"))
                .then(|| "SCSI controllers become virtio-scsi; the guest needs its driver (Linux has it; Windows needs virtio-win)".into()),
        ),
        BusKind::Ide => (DiskBus::Sata, Some("IDE becomes SATA (AHCI): Ferry's q35 machine has no IDE controller".into())),
        BusKind::Nvme => (DiskBus::Virtio, Some("NVMe becomes virtio-blk".into())),
        BusKind::Unknown => (DiskBus::Sata, Some("unknown controller; SATA (AHCI) is the one every OS drives".into())),
    }
}

/// VMware's paravirtual SCSI controller, as a `.vmx` (`pvscsi`) or an OVF
/// (`VirtualSCSI`) names it.
fn is_vmware_paravirtual(controller: &str) -> bool {
    let lower = controller.to_ascii_lowercase();
    lower == "pvscsi" || lower == "virtualscsi"
}

fn bus_matches(source: BusKind, target: DiskBus) -> bool {
    matches!(
        (source, target),
        (BusKind::Virtio, DiskBus::Virtio)
            | (BusKind::Sata, DiskBus::Sata)
            | (BusKind::Scsi, DiskBus::Scsi)
    )
}

fn bus_words(bus: DiskBus) -> &'static str {
    match bus {
        DiskBus::Virtio => "virtio-blk",
        DiskBus::Scsi => "virtio-scsi",
        DiskBus::Sata => "AHCI",
        DiskBus::Ide => "IDE",
    }
}

fn nic_model(source: &str) -> (NicModel, Option<String>) {
    let lower = source.to_ascii_lowercase();
    if lower.contains("virtio") {
        (NicModel::Virtio, None)
    } else if lower == "e1000" || lower == "82540em" {
        (NicModel::E1000, None)
    } else if lower.starts_with("vmxnet") {
        (
            NicModel::Virtio,
            Some(format!(
                "VMware's paravirtual {source} becomes virtio-net (Windows needs virtio-win drivers)"
            )),
        )
    } else {
        (
            NicModel::E1000,
            Some(format!(
                "{source} becomes e1000, which every guest drives; switch to virtio once the guest has virtio-net"
            )),
        )
    }
}

fn nic_words(nic: &ForeignNic) -> String {
    let mut words = format!("{} {}", nic.label, nic.model);
    if let Some(mac) = &nic.mac {
        words.push_str(&format!(" {mac}"));
    }
    if let Some(network) = &nic.network {
        words.push_str(&format!(" on {network:?}"));
    }
    words
}

/// The disk that boots: the lowest boot order, else the first.
fn boot_disk(disks: &[InspectedDisk]) -> usize {
    disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.disk.boot_order.map(|o| (o, i)))
        .min()
        .map(|(_, i)| i)
        .unwrap_or(0)
}

/// A unicast MAC in Ferry's form (`aa:bb:cc:dd:ee:ff`), from `:`/`-`
/// separated or bare hex; `None` for anything else.
pub fn parse_mac(text: &str) -> Option<String> {
    let hex: String = text
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | '.'))
        .collect();
    if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let octets: Vec<u8> = (0..6)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect::<Option<_>>()?;
    if octets[0] & 1 == 1 || octets.iter().all(|&o| o == 0) {
        return None;
    }
    Some(
        octets
            .iter()
            .map(|o| format!("{o:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::ImageFormat;
    use crate::foreign::ForeignDevice;

    fn image(size: u64) -> ImageInfo {
        ImageInfo {
            format: ImageFormat::Vmdk,
            variant: "streamOptimized".into(),
            virtual_size: size,
            file_size: 1 << 20,
            extents: Vec::new(),
        }
    }

    fn disk(label: &str, controller: &str, bus: BusKind, boot: Option<u32>) -> InspectedDisk {
        InspectedDisk {
            disk: ForeignDisk {
                label: label.into(),
                file: format!("{label}.vmdk"),
                controller: controller.into(),
                bus,
                boot_order: boot,
                read_only: false,
                format_claim: Some("vmdk".into()),
                capacity_claim: Some(1 << 30),
            },
            shown_as: format!("{label}.vmdk"),
            image: image(1 << 30),
        }
    }

    fn options() -> ImportOptions {
        ImportOptions {
            name: None,
            vcpus: None,
            memory_bytes: None,
            datastore: "local".into(),
            target_format: DiskFormat::Qcow2,
            network: None,
            new_macs: false,
        }
    }

    fn vmware_vm() -> ForeignVm {
        ForeignVm {
            name: Some("web server (prod)".into()),
            vcpus: Some(2),
            memory_bytes: Some(3 * (1 << 30) + 1),
            firmware: Firmware::Uefi,
            nics: vec![
                ForeignNic {
                    label: "ethernet0".into(),
                    model: "vmxnet3".into(),
                    mac: Some("00:50:56:AB:CD:EF".into()),
                    network: Some("VM Network".into()),
                },
                ForeignNic {
                    label: "ethernet1".into(),
                    model: "e1000e".into(),
                    mac: Some("01:00:5e:00:00:01".into()),
                    network: None,
                },
            ],
            other_devices: vec![ForeignDevice {
                kind: "cdrom".into(),
                label: "ide1:0".into(),
            }],
            ..ForeignVm::default()
        }
    }

    #[test]
    fn every_device_is_mapped_and_named() {
        let disks = [
            disk("scsi0:0", "pvscsi", BusKind::Scsi, Some(2)),
            disk("scsi1:0", "lsilogic", BusKind::Scsi, None),
            disk("ide0:0", "ide", BusKind::Ide, Some(1)),
        ];
        let mapped = map(&vmware_vm(), Origin::Vmx, &disks, &options(), "x").unwrap();
        let spec = &mapped.spec;
        assert_eq!(spec.name, "web-server--prod");
        assert_eq!(spec.vcpus, 2);
        assert_eq!(
            spec.memory_bytes,
            3 * (1 << 30) + MIB,
            "rounded up to a MiB"
        );
        let buses: Vec<DiskBus> = spec.disks.iter().map(|d| d.bus).collect();
        assert_eq!(buses, [DiskBus::Virtio, DiskBus::Scsi, DiskBus::Sata]);
        assert_eq!(
            spec.boot,
            BootSpec::Firmware {
                disk: "disk2".into()
            },
            "boot order 1 wins"
        );
        assert_eq!(spec.nics[0].model, NicModel::Virtio);
        assert_eq!(spec.nics[0].mac, "00:50:56:ab:cd:ef", "a valid MAC is kept");
        assert_eq!(spec.nics[1].model, NicModel::E1000);
        assert_ne!(
            spec.nics[1].mac, "01:00:5e:00:00:01",
            "a multicast MAC is replaced"
        );
        assert!(spec.nics.iter().all(|n| n.backend == NicBackend::User));
        let devices: Vec<&str> = mapped.mappings.iter().map(|m| m.device.as_str()).collect();
        for device in [
            "name", "cpu", "memory", "firmware", "disk", "boot", "nic", "cdrom",
        ] {
            assert!(devices.contains(&device), "{device} not in {devices:?}");
        }
        let cdrom = mapped
            .mappings
            .iter()
            .find(|m| m.device == "cdrom")
            .unwrap();
        assert_eq!(cdrom.action, MappingAction::LeftOut);
        let firmware = mapped
            .mappings
            .iter()
            .find(|m| m.device == "firmware")
            .unwrap();
        assert_eq!(firmware.action, MappingAction::Changed);
        assert!(mapped.warnings.iter().any(|w| w.contains("UEFI")));
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn flags_override_and_are_required_when_the_source_is_silent() {
        let bare = ForeignVm::default();
        let disks = [disk("disk.vhdx", "", BusKind::Virtio, Some(1))];
        let error = map(&bare, Origin::BareImage, &disks, &options(), "disk").unwrap_err();
        assert!(error.to_string().contains("--vcpus"), "{error}");
        let mut with_flags = options();
        with_flags.vcpus = Some(4);
        with_flags.memory_bytes = Some(2 << 30);
        with_flags.network = Some("lan".into());
        with_flags.new_macs = true;
        let mut vm = vmware_vm();
        let mapped = map(&vm, Origin::Vmx, &disks, &with_flags, "disk").unwrap();
        assert_eq!(mapped.spec.vcpus, 4);
        assert_eq!(mapped.spec.memory_bytes, 2 << 30);
        assert_ne!(mapped.spec.nics[0].mac, "00:50:56:ab:cd:ef");
        assert_eq!(
            mapped.spec.nics[0].backend,
            NicBackend::Network {
                network: "lan".into()
            }
        );
        vm.nics.clear();
        let mapped = map(&vm, Origin::Vmx, &[], &with_flags, "disk");
        assert!(mapped.unwrap_err().to_string().contains("no hard disk"));
    }

    #[test]
    fn read_only_sata_disks_become_writable_with_a_warning() {
        let mut d = disk("sata0:0", "ahci", BusKind::Sata, None);
        d.disk.read_only = true;
        let mut vm = vmware_vm();
        vm.firmware = Firmware::Bios;
        let mapped = map(&vm, Origin::Vmx, &[d], &options(), "x").unwrap();
        assert!(!mapped.spec.disks[0].read_only);
        assert!(mapped.warnings.iter().any(|w| w.contains("read-only")));
    }

    #[test]
    fn macs_parse_in_every_spelling() {
        assert_eq!(
            parse_mac("080027A1B2C3").as_deref(),
            Some("08:00:27:a1:b2:c3")
        );
        assert_eq!(
            parse_mac("00-15-5D-01-02-03").as_deref(),
            Some("00:15:5d:01:02:03")
        );
        assert_eq!(parse_mac("00:00:00:00:00:00"), None);
        assert_eq!(parse_mac("ff:ff:ff:ff:ff:ff"), None);
        assert_eq!(parse_mac("nonsense"), None);
    }
}

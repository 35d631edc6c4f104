//! Reader of OVF envelopes (DMTF DSP0243 1.x and 2.x) as VMware (ovftool,
//! vSphere) and VirtualBox write them.
//!
//! What is read:
//!
//! * `References/File` (id → `href`, as written: an OVA member name) and
//!   `DiskSection/Disk` (id → file, capacity in bytes, format claim from the
//!   format URI);
//! * exactly one `VirtualSystem` (a `VirtualSystemCollection`, i.e. several
//!   VMs, is refused with a clear message): name (`Name`, else `ovf:id`),
//!   guest OS words, the `VirtualSystemType` as the platform;
//! * the first `VirtualHardwareSection`: `Item`s (1.x) and, in 2.x, also
//!   `StorageItem` / `EthernetPortItem` (`sasd:` / `epasd:` properties are
//!   read by local name, like the `rasd:` ones). Items that belong to a
//!   deployment configuration other than the default one, and `ovf:bound`
//!   min/max items, are skipped;
//! * firmware (VMware `vmw:Config key="firmware"`, VirtualBox's embedded
//!   `vbox:Machine` `Firmware type="EFI"`) and boot order (VMware
//!   `vmw:BootOrderSection`s or `bios.bootOrder`, OVF 2 `BootDeviceSection`,
//!   VirtualBox `Boot/Order`), best effort: without any, every disk's
//!   `boot_order` is `None`.
//!
//! Device-type boot orders (`hdd,cdrom`, VirtualBox `HardDisk`) name no
//! particular disk: the first disk gets the position of the hard-disk entry.
//!
//! Nothing here opens a file; references stay text.

use crate::foreign::{BusKind, Firmware, ForeignDevice, ForeignDisk, ForeignNic, ForeignVm};
use crate::xml::{self, attr, child, child_text, children};
use crate::{ConvertError, Result};
use roxmltree::Node;
use std::collections::HashMap;

/// Most guest RAM believed (16 TiB): more is a typo or an attack.
pub const MAX_MEMORY_BYTES: u64 = 16 << 40;

/// Most vCPUs believed.
pub const MAX_VCPUS: u64 = 1024;

const ENVELOPE_NAMESPACES: [&str; 2] = [
    "http://schemas.dmtf.org/ovf/envelope/1",
    "http://schemas.dmtf.org/ovf/envelope/2",
];

/// A `References/File`.
struct FileRef<'a> {
    href: &'a str,
}

/// A `DiskSection/Disk`.
struct DiskDesc<'a> {
    file_ref: Option<&'a str>,
    capacity: Option<u64>,
    format: Option<String>,
}

/// One hardware item, its properties read by local name.
struct HwItem<'a, 'input> {
    node: Node<'a, 'input>,
    instance_id: String,
    resource_type: u32,
}

impl<'a, 'input> HwItem<'a, 'input> {
    fn get(&self, name: &str) -> Option<&'a str> {
        child_text(self.node, name).filter(|s| !s.is_empty())
    }

    fn label(&self, fallback: impl FnOnce() -> String) -> String {
        self.get("ElementName")
            .or_else(|| self.get("Caption"))
            .map(str::to_string)
            .unwrap_or_else(fallback)
    }
}

/// Reads the descriptor text (`what` names it in messages).
pub fn parse(text: &str, what: &str) -> Result<ForeignVm> {
    let doc = xml::parse(text, what)?;
    let envelope = doc.root_element();
    if envelope.tag_name().name() != "Envelope" {
        return Err(ConvertError::invalid(format!(
            "{what} is not an OVF descriptor: the root element is <{}>, not <Envelope>",
            envelope.tag_name().name()
        )));
    }
    match envelope.tag_name().namespace() {
        Some(ns) if ENVELOPE_NAMESPACES.contains(&ns.trim_end_matches('/')) => {}
        other => {
            return Err(ConvertError::invalid(format!(
                "{what}: envelope namespace {:?} is not OVF 1.x ({}) or 2.x ({})",
                other.unwrap_or("(none)"),
                ENVELOPE_NAMESPACES[0],
                ENVELOPE_NAMESPACES[1]
            )))
        }
    }

    let files = read_references(envelope, what)?;
    let disks = read_disk_section(envelope, what)?;

    if child(envelope, "VirtualSystemCollection").is_some() {
        return Err(ConvertError::invalid(format!(
            "{what}: not supported: several VMs (the envelope holds a VirtualSystemCollection); \
             import one VM at a time"
        )));
    }
    let mut systems = children(envelope, "VirtualSystem");
    let system = systems.next().ok_or_else(|| {
        ConvertError::invalid(format!("{what}: the envelope has no VirtualSystem"))
    })?;
    if systems.next().is_some() {
        return Err(ConvertError::invalid(format!(
            "{what}: not supported: several VMs (the envelope holds more than one VirtualSystem)"
        )));
    }

    let mut vm = ForeignVm {
        name: child_text(system, "Name")
            .filter(|s| !s.is_empty())
            .or_else(|| attr(system, "id").filter(|s| !s.is_empty()))
            .map(str::to_string),
        ..ForeignVm::default()
    };
    vm.guest_os = child(system, "OperatingSystemSection").and_then(guest_os);

    let hardware = child(system, "VirtualHardwareSection").ok_or_else(|| {
        ConvertError::invalid(format!(
            "{what}: the VirtualSystem has no VirtualHardwareSection"
        ))
    })?;
    vm.platform = child(hardware, "System")
        .and_then(|s| child_text(s, "VirtualSystemType"))
        .filter(|s| !s.is_empty())
        .map(str::to_string);

    let configuration = default_configuration(envelope);
    let items = read_items(hardware, configuration, what)?;
    read_hardware(&items, &files, &disks, &mut vm, what)?;

    // VirtualBox's own copy of the VM (`vbox:Machine`), if it wrote one.
    let vbox_machine = system.descendants().find(|n| {
        n.is_element()
            && n.tag_name().name() == "Machine"
            && n.tag_name()
                .namespace()
                .is_none_or(|ns| ns.contains("virtualbox"))
    });
    vm.firmware = firmware(system, vbox_machine);
    if let Some(machine) = vbox_machine {
        vm.uuid = attr(machine, "uuid").map(str::to_string);
        vbox_macs(machine, &mut vm.nics);
    }
    apply_boot_order(system, vbox_machine, &items, &mut vm);
    Ok(vm)
}

fn read_references<'a>(
    envelope: Node<'a, '_>,
    what: &str,
) -> Result<HashMap<&'a str, FileRef<'a>>> {
    let mut files = HashMap::new();
    let Some(references) = child(envelope, "References") else {
        return Ok(files);
    };
    for file in children(references, "File") {
        let id = attr(file, "id")
            .ok_or_else(|| ConvertError::invalid(format!("{what}: a File has no ovf:id")))?;
        let href = attr(file, "href")
            .filter(|h| !h.is_empty())
            .ok_or_else(|| ConvertError::invalid(format!("{what}: File {id:?} has no ovf:href")))?;
        if let Some(size) = attr(file, "size") {
            parse_number(size, what, &format!("File {id:?} ovf:size"))?;
        }
        if let Some(compression) = attr(file, "compression").filter(|c| !c.is_empty()) {
            if compression != "identity" {
                return Err(ConvertError::invalid(format!(
                    "{what}: not supported: File {id:?} is compressed (ovf:compression={compression:?})"
                )));
            }
        }
        if attr(file, "chunkSize").is_some() {
            return Err(ConvertError::invalid(format!(
                "{what}: not supported: File {id:?} is split into chunks (ovf:chunkSize)"
            )));
        }
        if files.insert(id, FileRef { href }).is_some() {
            return Err(ConvertError::invalid(format!(
                "{what}: File id {id:?} is declared twice"
            )));
        }
    }
    Ok(files)
}

fn read_disk_section<'a>(
    envelope: Node<'a, '_>,
    what: &str,
) -> Result<HashMap<&'a str, DiskDesc<'a>>> {
    let mut disks = HashMap::new();
    for section in children(envelope, "DiskSection") {
        for disk in children(section, "Disk") {
            let id = attr(disk, "diskId").ok_or_else(|| {
                ConvertError::invalid(format!("{what}: a Disk has no ovf:diskId"))
            })?;
            let capacity = match attr(disk, "capacity") {
                None => None,
                Some(capacity) => {
                    let field = format!("Disk {id:?} ovf:capacity");
                    let quantity = parse_number(capacity, what, &field)?;
                    let unit = match attr(disk, "capacityAllocationUnits") {
                        Some(units) => unit_bytes(units).ok_or_else(|| {
                            ConvertError::invalid(format!(
                                "{what}: Disk {id:?}: unknown capacityAllocationUnits {units:?}"
                            ))
                        })?,
                        None => 1,
                    };
                    Some(quantity.checked_mul(unit).ok_or_else(|| {
                        ConvertError::invalid(format!("{what}: {field} overflows 64 bits"))
                    })?)
                }
            };
            let desc = DiskDesc {
                file_ref: attr(disk, "fileRef").filter(|f| !f.is_empty()),
                capacity,
                format: attr(disk, "format").and_then(format_claim),
            };
            if disks.insert(id, desc).is_some() {
                return Err(ConvertError::invalid(format!(
                    "{what}: Disk id {id:?} is declared twice"
                )));
            }
        }
    }
    Ok(disks)
}

/// The image format a `Disk ovf:format` URI claims.
fn format_claim(uri: &str) -> Option<String> {
    let uri = uri.to_ascii_lowercase();
    let claim = if uri.contains("vmdk") {
        "vmdk"
    } else if uri.contains("qcow") {
        "qcow2"
    } else if uri.contains("vhdx") {
        "vhdx"
    } else if uri.contains("vhd") || uri.contains("virtualharddisk") {
        "vhd"
    } else if uri.contains("vdi") {
        "vdi"
    } else if uri.contains("raw") {
        "raw"
    } else {
        return None;
    };
    Some(claim.to_string())
}

fn guest_os(section: Node) -> Option<String> {
    attr(section, "osType")
        .or_else(|| child_text(section, "OSType"))
        .or_else(|| child_text(section, "Description"))
        .or_else(|| attr(section, "id"))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The deployment configuration items are chosen for: the one marked
/// `ovf:default="true"`, else the first (DSP0243 §9.8).
fn default_configuration<'a>(envelope: Node<'a, '_>) -> Option<&'a str> {
    let section = child(envelope, "DeploymentOptionSection")?;
    let configurations: Vec<_> = children(section, "Configuration").collect();
    configurations
        .iter()
        .find(|c| attr(**c, "default") == Some("true"))
        .or(configurations.first())
        .and_then(|c| attr(*c, "id"))
}

fn read_items<'a, 'input>(
    hardware: Node<'a, 'input>,
    configuration: Option<&str>,
    what: &str,
) -> Result<Vec<HwItem<'a, 'input>>> {
    let mut items = Vec::new();
    for node in hardware.children().filter(|n| {
        n.is_element()
            && matches!(
                n.tag_name().name(),
                "Item" | "StorageItem" | "EthernetPortItem"
            )
    }) {
        if let Some(configs) = attr(node, "configuration") {
            let wanted = configuration.unwrap_or("");
            if !configs.split_whitespace().any(|c| c == wanted) {
                continue;
            }
        }
        if matches!(attr(node, "bound"), Some("min" | "max")) {
            continue;
        }
        let instance_id = child_text(node, "InstanceID")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ConvertError::invalid(format!(
                    "{what}: a hardware item (line {}) has no InstanceID",
                    line_of(node)
                ))
            })?
            .to_string();
        let resource_type = child_text(node, "ResourceType").ok_or_else(|| {
            ConvertError::invalid(format!(
                "{what}: hardware item {instance_id} has no ResourceType"
            ))
        })?;
        let resource_type = resource_type.parse::<u32>().map_err(|_| {
            ConvertError::invalid(format!(
                "{what}: hardware item {instance_id}: ResourceType {resource_type:?} is not a number"
            ))
        })?;
        if items.iter().any(|i: &HwItem| i.instance_id == instance_id) {
            return Err(ConvertError::invalid(format!(
                "{what}: hardware InstanceID {instance_id} is used twice"
            )));
        }
        items.push(HwItem {
            node,
            instance_id,
            resource_type,
        });
    }
    Ok(items)
}

fn line_of(node: Node) -> u32 {
    node.document().text_pos_at(node.range().start).row
}

/// CIM ResourceType values (DSP1041 / CIM_ResourceAllocationSettingData).
mod rt {
    pub const OTHER: u32 = 1;
    pub const PROCESSOR: u32 = 3;
    pub const MEMORY: u32 = 4;
    pub const IDE: u32 = 5;
    pub const SCSI: u32 = 6;
    pub const ETHERNET: u32 = 10;
    pub const OTHER_NETWORK: u32 = 11;
    pub const FLOPPY: u32 = 14;
    pub const CD: u32 = 15;
    pub const DVD: u32 = 16;
    pub const DISK: u32 = 17;
    pub const OTHER_STORAGE: u32 = 20;
    pub const SERIAL: u32 = 21;
    pub const PARALLEL: u32 = 22;
    pub const USB: u32 = 23;
    pub const GRAPHICS: u32 = 24;
    pub const SOUND: u32 = 35;
}

/// The bus and the controller's own word, for a storage controller item.
fn controller_of(item: &HwItem) -> Option<(BusKind, String)> {
    let subtype = item.get("ResourceSubType");
    let word = |default: &str| subtype.unwrap_or(default).to_string();
    match item.resource_type {
        rt::IDE => Some((BusKind::Ide, word("IDE"))),
        rt::SCSI => Some((BusKind::Scsi, word("SCSI"))),
        rt::OTHER_STORAGE => {
            let lower = subtype.unwrap_or("").to_ascii_lowercase();
            let bus = if lower.contains("ahci") || lower.contains("sata") {
                BusKind::Sata
            } else if lower.contains("nvme") {
                BusKind::Nvme
            } else if lower.contains("virtio") {
                BusKind::Virtio
            } else if lower.contains("scsi") || lower.contains("sas") {
                BusKind::Scsi
            } else if lower.contains("ide") {
                BusKind::Ide
            } else {
                BusKind::Unknown
            };
            Some((bus, word("storage")))
        }
        _ => None,
    }
}

fn device_kind(item: &HwItem) -> &'static str {
    match item.resource_type {
        rt::FLOPPY => "floppy",
        rt::CD | rt::DVD => "cdrom",
        rt::SERIAL => "serial",
        rt::PARALLEL => "parallel",
        rt::USB => "usb",
        rt::GRAPHICS => "video",
        rt::SOUND => "sound",
        rt::OTHER_NETWORK => "network",
        rt::OTHER => {
            // VMware files its sound card and VMCI device under "Other".
            let subtype = item
                .get("ResourceSubType")
                .unwrap_or("")
                .to_ascii_lowercase();
            if subtype.contains("sound") {
                "sound"
            } else if subtype.contains("vmci") {
                "vmci"
            } else if subtype.contains("usb") {
                "usb"
            } else {
                "other"
            }
        }
        _ => "other",
    }
}

fn read_hardware(
    items: &[HwItem],
    files: &HashMap<&str, FileRef>,
    disks: &HashMap<&str, DiskDesc>,
    vm: &mut ForeignVm,
    what: &str,
) -> Result<()> {
    let controllers: HashMap<&str, (BusKind, String)> = items
        .iter()
        .filter_map(|i| controller_of(i).map(|c| (i.instance_id.as_str(), c)))
        .collect();
    let mut used_disks: Vec<String> = Vec::new();

    for item in items {
        let id = &item.instance_id;
        match item.resource_type {
            rt::PROCESSOR => {
                if vm.vcpus.is_some() {
                    return Err(ConvertError::invalid(format!(
                        "{what}: more than one processor item (item {id})"
                    )));
                }
                let quantity = quantity(item, what)?;
                if quantity == 0 || quantity > MAX_VCPUS {
                    return Err(ConvertError::invalid(format!(
                        "{what}: item {id}: {quantity} vCPUs is outside 1..={MAX_VCPUS}"
                    )));
                }
                vm.vcpus = Some(quantity as u32);
            }
            rt::MEMORY => {
                if vm.memory_bytes.is_some() {
                    return Err(ConvertError::invalid(format!(
                        "{what}: more than one memory item (item {id})"
                    )));
                }
                let quantity = quantity(item, what)?;
                // VirtualBox and VMware always write the units; MB is what
                // both mean when a hand-written file leaves them out.
                let units = item.get("AllocationUnits").unwrap_or("byte * 2^20");
                let unit = unit_bytes(units).ok_or_else(|| {
                    ConvertError::invalid(format!(
                        "{what}: memory item {id}: unknown AllocationUnits {units:?}"
                    ))
                })?;
                let bytes = quantity
                    .checked_mul(unit)
                    .filter(|b| (1..=MAX_MEMORY_BYTES).contains(b))
                    .ok_or_else(|| {
                        ConvertError::invalid(format!(
                            "{what}: memory item {id}: {quantity} × {units:?} is not between 1 byte and 16 TiB"
                        ))
                    })?;
                vm.memory_bytes = Some(bytes);
            }
            rt::DISK => {
                let disk = read_disk(item, files, disks, &controllers, &mut used_disks, what)?;
                vm.disks.push(disk);
            }
            rt::ETHERNET => {
                let number = vm.nics.len() + 1;
                vm.nics.push(ForeignNic {
                    label: item.label(|| format!("ethernet{}", number - 1)),
                    model: item.get("ResourceSubType").unwrap_or("unknown").to_string(),
                    mac: item.get("Address").map(str::to_string),
                    network: item.get("Connection").map(str::to_string),
                });
            }
            rt::IDE | rt::SCSI | rt::OTHER_STORAGE => {}
            _ => vm.other_devices.push(ForeignDevice {
                kind: device_kind(item).to_string(),
                label: item.label(|| format!("item {id}")),
            }),
        }
    }
    Ok(())
}

fn read_disk(
    item: &HwItem,
    files: &HashMap<&str, FileRef>,
    disks: &HashMap<&str, DiskDesc>,
    controllers: &HashMap<&str, (BusKind, String)>,
    used: &mut Vec<String>,
    what: &str,
) -> Result<ForeignDisk> {
    let id = &item.instance_id;
    let host = item.get("HostResource").ok_or_else(|| {
        ConvertError::invalid(format!(
            "{what}: disk drive item {id} has no HostResource (empty drives are not supported)"
        ))
    })?;
    let reference = host.strip_prefix("ovf:").unwrap_or(host);
    let missing_file = |file_id: &str| {
        ConvertError::invalid(format!(
            "{what}: disk drive item {id} refers to File {file_id:?}, which References does not declare"
        ))
    };
    let (key, file, format, capacity) = if let Some(disk_id) = reference.strip_prefix("/disk/") {
        let desc = disks.get(disk_id).ok_or_else(|| {
            ConvertError::invalid(format!(
                "{what}: disk drive item {id} refers to Disk {disk_id:?}, which DiskSection does not declare"
            ))
        })?;
        let file_id = desc.file_ref.ok_or_else(|| {
            ConvertError::invalid(format!(
                "{what}: not supported: Disk {disk_id:?} has no file (a blank disk to be created)"
            ))
        })?;
        let file = files.get(file_id).ok_or_else(|| missing_file(file_id))?;
        (
            format!("disk {disk_id}"),
            file.href,
            desc.format.clone(),
            desc.capacity,
        )
    } else if let Some(file_id) = reference.strip_prefix("/file/") {
        let file = files.get(file_id).ok_or_else(|| missing_file(file_id))?;
        (format!("file {file_id}"), file.href, None, None)
    } else {
        return Err(ConvertError::invalid(format!(
            "{what}: disk drive item {id}: HostResource {host:?} is neither ovf:/disk/<id> nor ovf:/file/<id>"
        )));
    };
    if used.contains(&key) {
        return Err(ConvertError::invalid(format!(
            "{what}: {key} is attached by more than one disk drive item"
        )));
    }
    used.push(key.clone());

    let (bus, controller) = match item.get("Parent") {
        None => (BusKind::Unknown, String::new()),
        Some(parent) => controllers.get(parent).cloned().ok_or_else(|| {
            ConvertError::invalid(format!(
                "{what}: disk drive item {id}: Parent {parent} is not a storage controller item"
            ))
        })?,
    };
    Ok(ForeignDisk {
        label: item.label(|| key.clone()),
        file: file.to_string(),
        controller,
        bus,
        boot_order: None,
        read_only: false,
        format_claim: format,
        capacity_claim: capacity,
    })
}

fn quantity(item: &HwItem, what: &str) -> Result<u64> {
    let text = item.get("VirtualQuantity").ok_or_else(|| {
        ConvertError::invalid(format!(
            "{what}: item {} has no VirtualQuantity",
            item.instance_id
        ))
    })?;
    parse_number(
        text,
        what,
        &format!("item {} VirtualQuantity", item.instance_id),
    )
}

fn parse_number(text: &str, what: &str, field: &str) -> Result<u64> {
    let trimmed = text.trim();
    if trimmed.is_empty() || !trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConvertError::invalid(format!(
            "{what}: {field} {text:?} is not a whole number"
        )));
    }
    trimmed
        .parse()
        .map_err(|_| ConvertError::invalid(format!("{what}: {field} {text:?} is too large")))
}

/// Bytes per unit for an allocation-units string: programmatic units
/// (`byte`, `byte * 2^20`, `byte * 10^9`) and the words writers use
/// (`MegaBytes`, `MB`, `GigaBytes`…; all binary, as VirtualBox and VMware
/// mean them).
pub fn unit_bytes(units: &str) -> Option<u64> {
    let normal: String = units
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let word = match normal.as_str() {
        "byte" | "bytes" | "b" => Some(1),
        "kilobyte" | "kilobytes" | "kb" | "kib" => Some(1 << 10),
        "megabyte" | "megabytes" | "mb" | "mib" => Some(1 << 20),
        "gigabyte" | "gigabytes" | "gb" | "gib" => Some(1 << 30),
        "terabyte" | "terabytes" | "tb" | "tib" => Some(1 << 40),
        _ => None,
    };
    if word.is_some() {
        return word;
    }
    let factor = normal
        .strip_prefix("bytes*")
        .or_else(|| normal.strip_prefix("byte*"))?;
    if let Some(exponent) = factor.strip_prefix("2^") {
        let exponent: u32 = exponent.parse().ok()?;
        (exponent <= 62).then(|| 1u64 << exponent)
    } else if let Some(exponent) = factor.strip_prefix("10^") {
        let exponent: u32 = exponent.parse().ok()?;
        10u64.checked_pow(exponent)
    } else {
        factor.parse::<u64>().ok().filter(|f| *f > 0)
    }
}

fn firmware(system: Node, vbox_machine: Option<Node>) -> Firmware {
    let vmware_efi = system.descendants().any(|n| {
        n.is_element()
            && matches!(n.tag_name().name(), "Config" | "ExtraConfig")
            && attr(n, "key") == Some("firmware")
            && attr(n, "value").is_some_and(|v| v.trim().eq_ignore_ascii_case("efi"))
    });
    let vbox_efi = vbox_machine
        .and_then(|m| child(m, "Hardware"))
        .and_then(|h| child(h, "Firmware"))
        .and_then(|f| attr(f, "type"))
        .is_some_and(|t| t.to_ascii_uppercase().starts_with("EFI"));
    if vmware_efi || vbox_efi {
        Firmware::Uefi
    } else {
        Firmware::Bios
    }
}

/// VirtualBox writes MACs only in its own `vbox:Machine` copy of the VM:
/// enabled adapters in slot order are matched to the OVF's NICs in order,
/// when the counts agree (otherwise the pairing would be a guess).
fn vbox_macs(machine: Node, nics: &mut [ForeignNic]) {
    let Some(network) = child(machine, "Hardware").and_then(|h| child(h, "Network")) else {
        return;
    };
    let mut adapters: Vec<(u32, &str)> = children(network, "Adapter")
        .filter(|a| attr(*a, "enabled") == Some("true"))
        .filter_map(|a| {
            let slot = attr(a, "slot")
                .and_then(|s| s.parse().ok())
                .unwrap_or(u32::MAX);
            attr(a, "MACAddress").map(|mac| (slot, mac))
        })
        .collect();
    adapters.sort_by_key(|(slot, _)| *slot);
    if adapters.len() != nics.len() {
        return;
    }
    for (nic, (_, mac)) in nics.iter_mut().zip(adapters) {
        if nic.mac.is_none() && !mac.is_empty() {
            nic.mac = Some(mac.to_string());
        }
    }
}

/// One entry of a boot order.
enum BootEntry {
    /// A hardware item, by InstanceID.
    Item(String),
    /// "The hard disk" (a device-type order).
    HardDisk,
    /// Anything else (CD, network, floppy…): holds a position only.
    Other,
}

fn boot_word(word: &str) -> BootEntry {
    match word.trim().to_ascii_lowercase().as_str() {
        "hdd" | "disk" | "harddisk" | "hard-disk" | "hd" => BootEntry::HardDisk,
        _ => BootEntry::Other,
    }
}

/// The boot order the envelope gives, if any (see the module docs).
fn boot_entries(system: Node, vbox_machine: Option<Node>) -> Option<Vec<BootEntry>> {
    // VMware (vSphere 6.5+): one vmw:BootOrderSection per device, in order.
    let sections: Vec<BootEntry> = system
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "BootOrderSection")
        .map(|n| match attr(n, "instanceId") {
            Some(id) => BootEntry::Item(id.trim().to_string()),
            None => attr(n, "type").map_or(BootEntry::Other, boot_word),
        })
        .collect();
    if !sections.is_empty() {
        return Some(sections);
    }
    // OVF 2: BootDeviceSection / CIM_BootConfigSetting / CIM_BootSourceSetting,
    // which name the device by an InstanceID-like string.
    if let Some(section) = system
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == "BootDeviceSection")
    {
        let entries: Vec<BootEntry> = section
            .descendants()
            .filter(|n| n.is_element() && n.tag_name().name().ends_with("BootSourceSetting"))
            .map(|n| {
                match child_text(n, "InstanceID").or_else(|| child_text(n, "StructuredBootString"))
                {
                    Some(id) if !id.is_empty() => BootEntry::Item(id.to_string()),
                    _ => BootEntry::Other,
                }
            })
            .collect();
        if !entries.is_empty() {
            return Some(entries);
        }
    }
    // VMware's `bios.bootOrder` ("cdrom,hdd,ethernet").
    if let Some(order) = system.descendants().find_map(|n| {
        (n.is_element()
            && matches!(n.tag_name().name(), "Config" | "ExtraConfig")
            && attr(n, "key") == Some("bios.bootOrder"))
        .then(|| attr(n, "value"))
        .flatten()
    }) {
        let entries: Vec<BootEntry> = order
            .split(',')
            .filter(|w| !w.trim().is_empty())
            .map(boot_word)
            .collect();
        if !entries.is_empty() {
            return Some(entries);
        }
    }
    // VirtualBox: <Boot><Order position="1" device="HardDisk"/>…
    let boot = vbox_machine
        .and_then(|m| child(m, "Hardware"))
        .and_then(|h| child(h, "Boot"))?;
    let mut orders: Vec<(u32, &str)> = children(boot, "Order")
        .filter_map(|o| {
            let position = attr(o, "position")?.trim().parse().ok()?;
            Some((position, attr(o, "device")?))
        })
        .filter(|(_, device)| !device.eq_ignore_ascii_case("none"))
        .collect();
    orders.sort_by_key(|(position, _)| *position);
    let entries: Vec<BootEntry> = orders.into_iter().map(|(_, d)| boot_word(d)).collect();
    (!entries.is_empty()).then_some(entries)
}

fn apply_boot_order(
    system: Node,
    vbox_machine: Option<Node>,
    items: &[HwItem],
    vm: &mut ForeignVm,
) {
    let Some(entries) = boot_entries(system, vbox_machine) else {
        return;
    };
    // Disk drive items in the order their ForeignDisks were pushed.
    let disk_ids: Vec<&str> = items
        .iter()
        .filter(|i| i.resource_type == rt::DISK)
        .map(|i| i.instance_id.as_str())
        .collect();
    for (index, entry) in entries.iter().enumerate() {
        let position = index as u32 + 1;
        let target = match entry {
            BootEntry::Item(id) => disk_ids.iter().position(|d| d == id),
            BootEntry::HardDisk => Some(0),
            BootEntry::Other => None,
        };
        if let Some(disk) = target.and_then(|t| vm.disks.get_mut(t)) {
            if disk.boot_order.is_none() {
                disk.boot_order = Some(position);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMWARE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!--Generated by VMware ovftool 4.4.3 (build-18663434), UTC time: 2024-03-01T10:00:00.000Z-->
<Envelope vmw:buildId="build-18663434" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="web01-disk1.vmdk" ovf:id="file1" ovf:size="1073741824"/>
    <File ovf:href="web01-disk2.vmdk" ovf:id="file2" ovf:size="68608"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="20" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="2147483648"/>
    <Disk ovf:capacity="512" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="web01">
    <Info>A virtual machine</Info>
    <Name>web01</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="ubuntu64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Ubuntu Linux (64-bit)</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>web01</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>4 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>4</rasd:VirtualQuantity>
        <vmw:CoresPerSocket ovf:required="false">2</vmw:CoresPerSocket>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>8192MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>8192</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI Controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>SATA Controller 0</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>1</rasd:Address>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>IDE 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>VirtualVideoCard</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceType>24</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>VirtualVMCIDevice</rasd:ElementName>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.vmci</rasd:ResourceSubType>
        <rasd:ResourceType>1</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>CD/DVD drive 1</rasd:ElementName>
        <rasd:InstanceID>8</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceSubType>vmware.cdrom.atapi</rasd:ResourceSubType>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>9</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="backing.writeThrough" vmw:value="false"/>
      </Item>
      <Item>
        <rasd:AddressOnParent>1</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 2</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource>
        <rasd:InstanceID>10</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on &quot;VM Network&quot;</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>11</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="slotInfo.pciSlotNumber" vmw:value="192"/>
      </Item>
      <Item ovf:required="false">
        <rasd:Address>00:50:56:aa:bb:02</rasd:Address>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:Connection>backup</rasd:Connection>
        <rasd:ElementName>Network adapter 2</rasd:ElementName>
        <rasd:InstanceID>12</rasd:InstanceID>
        <rasd:ResourceSubType>E1000e</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:ElementName>USB controller</rasd:ElementName>
        <rasd:InstanceID>13</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.usb.ehci</rasd:ResourceSubType>
        <rasd:ResourceType>23</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:ElementName>Sound card</rasd:ElementName>
        <rasd:InstanceID>14</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.soundcard.hdaudio</rasd:ResourceSubType>
        <rasd:ResourceType>1</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="cpuHotAddEnabled" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
      <vmw:Config ovf:required="false" vmw:key="tools.syncTimeWithHost" vmw:value="false"/>
      <vmw:BootOrderSection vmw:instanceId="10" vmw:type="disk">
        <Info>Virtual hardware device boot order</Info>
      </vmw:BootOrderSection>
      <vmw:BootOrderSection vmw:instanceId="9" vmw:type="disk">
        <Info>Virtual hardware device boot order</Info>
      </vmw:BootOrderSection>
    </VirtualHardwareSection>
    <AnnotationSection ovf:required="false">
      <Info>A human-readable annotation</Info>
      <Annotation>Web server &amp; cache</Annotation>
    </AnnotationSection>
  </VirtualSystem>
</Envelope>
"#;

    const VBOX: &str = r#"<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="debian12-disk001.vmdk"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="21474836480" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" vbox:uuid="0e4b5c3a-1111-2222-3333-444455556666"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="debian12">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
      <vbox:OSType ovf:required="false">Debian_64</vbox:OSType>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>debian12</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>2 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>2048 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>2048 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>ideController0</rasd:Caption>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>ideController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>sataController0</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>3</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:Caption>sound</rasd:Caption>
        <rasd:Description>Sound Card</rasd:Description>
        <rasd:ElementName>sound</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>ensoniq1371</rasd:ResourceSubType>
        <rasd:ResourceType>35</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:Parent>5</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>cdrom1</rasd:Caption>
        <rasd:Description>CD-ROM Drive</rasd:Description>
        <rasd:ElementName>cdrom1</rasd:ElementName>
        <rasd:InstanceID>8</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName>
        <rasd:InstanceID>9</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" version="1.19-linux" uuid="{7c1e3f00-aaaa-bbbb-cccc-0123456789ab}" name="debian12" OSType="Debian_64" snapshotFolder="Snapshots">
      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
      <Hardware>
        <CPU count="2"/>
        <Memory RAMSize="2048"/>
        <Firmware type="EFI"/>
        <Boot>
          <Order position="1" device="DVD"/>
          <Order position="2" device="HardDisk"/>
          <Order position="3" device="None"/>
          <Order position="4" device="None"/>
        </Boot>
        <Network>
          <Adapter slot="0" enabled="true" MACAddress="080027A1B2C3" type="82540EM">
            <NAT localhostReachable="true"/>
          </Adapter>
          <Adapter slot="1" enabled="false" MACAddress="0800279D8E7F" type="82540EM"/>
        </Network>
      </Hardware>
    </vbox:Machine>
  </VirtualSystem>
</Envelope>
"#;

    const OVF2: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/2" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:sasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData.xsd" xmlns:epasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData.xsd" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:bootc="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_BootConfigSetting" xmlns:bootsrc="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_BootSourceSetting">
  <References>
    <File ovf:id="f-root" ovf:href="root.qcow2" ovf:size="123456"/>
    <File ovf:id="f-data" ovf:href="data.qcow2"/>
  </References>
  <DiskSection>
    <Info>Disks</Info>
    <Disk ovf:diskId="root" ovf:fileRef="f-root" ovf:capacity="10737418240" ovf:format="http://www.gnome.org/~markmc/qcow-image-format.html"/>
    <Disk ovf:diskId="data" ovf:fileRef="f-data" ovf:capacity="2" ovf:capacityAllocationUnits="GigaBytes"/>
  </DiskSection>
  <DeploymentOptionSection>
    <Info>Sizes</Info>
    <Configuration ovf:id="small"><Label>Small</Label><Description>1 CPU</Description></Configuration>
    <Configuration ovf:id="large" ovf:default="true"><Label>Large</Label><Description>8 CPUs</Description></Configuration>
  </DeploymentOptionSection>
  <VirtualSystem ovf:id="appliance">
    <Info>An appliance</Info>
    <Name>Appliance 2</Name>
    <OperatingSystemSection ovf:id="36" ovf:osType="rhel9_64Guest">
      <Info>OS</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Hardware</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType>
      </System>
      <Item ovf:configuration="small">
        <rasd:ElementName>1 vCPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item ovf:configuration="large">
        <rasd:ElementName>8 vCPU</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>8</rasd:VirtualQuantity>
      </Item>
      <Item ovf:bound="max">
        <rasd:AllocationUnits>GigaBytes</rasd:AllocationUnits>
        <rasd:ElementName>max memory</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>64</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>GigaBytes</rasd:AllocationUnits>
        <rasd:ElementName>16 GB memory</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>16</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:ElementName>NVMe Controller 0</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.nvme.controller</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:ElementName>virtio</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>virtio-blk</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <StorageItem>
        <sasd:AddressOnParent>0</sasd:AddressOnParent>
        <sasd:ElementName>root disk</sasd:ElementName>
        <sasd:HostResource>ovf:/disk/root</sasd:HostResource>
        <sasd:InstanceID>7</sasd:InstanceID>
        <sasd:Parent>5</sasd:Parent>
        <sasd:ResourceType>17</sasd:ResourceType>
      </StorageItem>
      <StorageItem>
        <sasd:ElementName>data disk</sasd:ElementName>
        <sasd:HostResource>ovf:/disk/data</sasd:HostResource>
        <sasd:InstanceID>8</sasd:InstanceID>
        <sasd:Parent>6</sasd:Parent>
        <sasd:ResourceType>17</sasd:ResourceType>
      </StorageItem>
      <EthernetPortItem>
        <epasd:Address>52:54:00:12:34:56</epasd:Address>
        <epasd:Connection>prod</epasd:Connection>
        <epasd:ElementName>eth0</epasd:ElementName>
        <epasd:InstanceID>9</epasd:InstanceID>
        <epasd:ResourceSubType>virtio</epasd:ResourceSubType>
        <epasd:ResourceType>10</epasd:ResourceType>
      </EthernetPortItem>
    </VirtualHardwareSection>
    <BootDeviceSection>
      <Info>Boot order</Info>
      <bootc:CIM_BootConfigSetting>
        <bootc:ElementName>default</bootc:ElementName>
        <bootc:InstanceID>boot0</bootc:InstanceID>
        <bootsrc:CIM_BootSourceSetting>
          <bootsrc:InstanceID>8</bootsrc:InstanceID>
        </bootsrc:CIM_BootSourceSetting>
        <bootsrc:CIM_BootSourceSetting>
          <bootsrc:InstanceID>7</bootsrc:InstanceID>
        </bootsrc:CIM_BootSourceSetting>
      </bootc:CIM_BootConfigSetting>
    </BootDeviceSection>
  </VirtualSystem>
</Envelope>
"#;

    #[test]
    fn reads_a_vmware_envelope() {
        let vm = parse(VMWARE, "web01.ovf").unwrap();
        assert_eq!(vm.name.as_deref(), Some("web01"));
        assert_eq!(vm.platform.as_deref(), Some("vmx-19"));
        assert_eq!(vm.guest_os.as_deref(), Some("ubuntu64Guest"));
        assert_eq!(vm.vcpus, Some(4));
        assert_eq!(vm.memory_bytes, Some(8192 << 20));
        assert_eq!(vm.firmware, Firmware::Uefi);
        assert_eq!(
            vm.disks,
            vec![
                ForeignDisk {
                    label: "Hard Disk 1".into(),
                    file: "web01-disk1.vmdk".into(),
                    controller: "lsilogic".into(),
                    bus: BusKind::Scsi,
                    boot_order: Some(2),
                    read_only: false,
                    format_claim: Some("vmdk".into()),
                    capacity_claim: Some(20 << 30),
                },
                ForeignDisk {
                    label: "Hard Disk 2".into(),
                    file: "web01-disk2.vmdk".into(),
                    controller: "vmware.sata.ahci".into(),
                    bus: BusKind::Sata,
                    boot_order: Some(1),
                    read_only: false,
                    format_claim: Some("vmdk".into()),
                    capacity_claim: Some(512 << 20),
                },
            ]
        );
        assert_eq!(
            vm.nics,
            vec![
                ForeignNic {
                    label: "Network adapter 1".into(),
                    model: "VmxNet3".into(),
                    mac: None,
                    network: Some("VM Network".into()),
                },
                ForeignNic {
                    label: "Network adapter 2".into(),
                    model: "E1000e".into(),
                    mac: Some("00:50:56:aa:bb:02".into()),
                    network: Some("backup".into()),
                },
            ]
        );
        let kinds: Vec<(&str, &str)> = vm
            .other_devices
            .iter()
            .map(|d| (d.kind.as_str(), d.label.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("video", "VirtualVideoCard"),
                ("vmci", "VirtualVMCIDevice"),
                ("cdrom", "CD/DVD drive 1"),
                ("usb", "USB controller"),
                ("sound", "Sound card"),
            ]
        );
    }

    #[test]
    fn reads_a_virtualbox_envelope() {
        let vm = parse(VBOX, "debian12.ovf").unwrap();
        assert_eq!(vm.name.as_deref(), Some("debian12"));
        assert_eq!(
            vm.uuid.as_deref(),
            Some("{7c1e3f00-aaaa-bbbb-cccc-0123456789ab}")
        );
        assert_eq!(vm.platform.as_deref(), Some("virtualbox-2.2"));
        assert_eq!(vm.guest_os.as_deref(), Some("Debian_64"));
        assert_eq!(vm.vcpus, Some(2));
        assert_eq!(vm.memory_bytes, Some(2048 << 20));
        assert_eq!(vm.firmware, Firmware::Uefi);
        assert_eq!(vm.disks.len(), 1);
        let disk = &vm.disks[0];
        assert_eq!(disk.file, "debian12-disk001.vmdk");
        assert_eq!(disk.controller, "AHCI");
        assert_eq!(disk.bus, BusKind::Sata);
        assert_eq!(disk.capacity_claim, Some(20 << 30));
        assert_eq!(disk.format_claim.as_deref(), Some("vmdk"));
        // DVD first, then the hard disk.
        assert_eq!(disk.boot_order, Some(2));
        assert_eq!(
            vm.nics,
            vec![ForeignNic {
                label: "Ethernet adapter on 'NAT'".into(),
                model: "E1000".into(),
                mac: Some("080027A1B2C3".into()),
                network: Some("NAT".into()),
            }]
        );
        let kinds: Vec<&str> = vm.other_devices.iter().map(|d| d.kind.as_str()).collect();
        assert_eq!(kinds, vec!["sound", "cdrom"]);
    }

    #[test]
    fn reads_an_ovf2_envelope_with_deployment_options() {
        let vm = parse(OVF2, "appliance.ovf").unwrap();
        assert_eq!(vm.name.as_deref(), Some("Appliance 2"));
        assert_eq!(vm.guest_os.as_deref(), Some("rhel9_64Guest"));
        assert_eq!(vm.vcpus, Some(8), "the default configuration is large");
        assert_eq!(vm.memory_bytes, Some(16 << 30), "the max bound is skipped");
        assert_eq!(vm.firmware, Firmware::Bios);
        let disks: Vec<_> = vm
            .disks
            .iter()
            .map(|d| {
                (
                    d.file.as_str(),
                    d.bus,
                    d.controller.as_str(),
                    d.capacity_claim,
                    d.format_claim.as_deref(),
                    d.boot_order,
                )
            })
            .collect();
        assert_eq!(
            disks,
            vec![
                (
                    "root.qcow2",
                    BusKind::Nvme,
                    "vmware.nvme.controller",
                    Some(10 << 30),
                    Some("qcow2"),
                    Some(2)
                ),
                (
                    "data.qcow2",
                    BusKind::Virtio,
                    "virtio-blk",
                    Some(2 << 30),
                    None,
                    Some(1)
                ),
            ]
        );
        assert_eq!(vm.nics.len(), 1);
        assert_eq!(vm.nics[0].mac.as_deref(), Some("52:54:00:12:34:56"));
        assert_eq!(vm.nics[0].network.as_deref(), Some("prod"));
        assert_eq!(vm.nics[0].model, "virtio");
    }

    #[test]
    fn no_boot_order_means_none() {
        let text = VMWARE.replace("vmw:BootOrderSection", "vmw:SomethingElse");
        let vm = parse(&text, "x.ovf").unwrap();
        assert!(vm.disks.iter().all(|d| d.boot_order.is_none()));
        // bios.bootOrder: a device-type order.
        let text = text.replace(
            r#"vmw:key="cpuHotAddEnabled" vmw:value="false""#,
            r#"vmw:key="bios.bootOrder" vmw:value="cdrom,hdd""#,
        );
        let vm = parse(&text, "x.ovf").unwrap();
        assert_eq!(vm.disks[0].boot_order, Some(2));
        assert_eq!(vm.disks[1].boot_order, None);
    }

    fn error(text: &str) -> String {
        parse(text, "t.ovf").unwrap_err().to_string()
    }

    #[test]
    fn structural_errors_are_clear() {
        let collection = VMWARE
            .replace("<VirtualSystem ovf:id", "<VirtualSystemCollection ovf:id")
            .replace("</VirtualSystem>", "</VirtualSystemCollection>");
        assert!(error(&collection).contains("not supported: several VMs"));

        let start = VMWARE.find("<VirtualSystem ").unwrap();
        let end = VMWARE.find("</VirtualSystem>").unwrap() + "</VirtualSystem>".len();
        let mut none = VMWARE.to_string();
        none.replace_range(start..end, "");
        assert!(
            error(&none).contains("no VirtualSystem"),
            "{}",
            error(&none)
        );

        let two = VMWARE.replace(
            "</Envelope>",
            "<VirtualSystem ovf:id=\"b\"><Info/></VirtualSystem></Envelope>",
        );
        assert!(error(&two).contains("several VMs"));

        let missing_file = VMWARE.replace(r#"ovf:fileRef="file2""#, r#"ovf:fileRef="file9""#);
        let message = error(&missing_file);
        assert!(message.contains(r#"File "file9""#), "{message}");

        let missing_disk = VMWARE.replace("ovf:/disk/vmdisk2", "ovf:/disk/vmdisk7");
        let message = error(&missing_disk);
        assert!(message.contains(r#"Disk "vmdisk7""#), "{message}");

        let bad_parent = VMWARE.replace(
            "<rasd:Parent>4</rasd:Parent>\n        <rasd:ResourceType>17",
            "<rasd:Parent>11</rasd:Parent>\n        <rasd:ResourceType>17",
        );
        assert!(error(&bad_parent).contains("not a storage controller"));

        let not_ovf = VMWARE.replace(
            "http://schemas.dmtf.org/ovf/envelope/1\" xmlns:cim",
            "urn:other\" xmlns:cim",
        );
        assert!(error(&not_ovf).contains("namespace"));

        let dtd = format!(
            "<!DOCTYPE x [<!ENTITY a \"b\">]>{}",
            &VMWARE[VMWARE.find("<Envelope").unwrap()..]
        );
        assert!(matches!(
            parse(&dtd, "t.ovf"),
            Err(ConvertError::Refused(_))
        ));
    }

    #[test]
    fn bad_quantities_are_refused() {
        let cases = [
            (
                VMWARE.replace(
                    "<rasd:VirtualQuantity>4</rasd:VirtualQuantity>",
                    "<rasd:VirtualQuantity>four</rasd:VirtualQuantity>",
                ),
                "not a whole number",
            ),
            (
                VMWARE.replace(
                    "<rasd:VirtualQuantity>4</rasd:VirtualQuantity>",
                    "<rasd:VirtualQuantity>4096</rasd:VirtualQuantity>",
                ),
                "vCPUs",
            ),
            (
                VMWARE.replace(
                    "<rasd:VirtualQuantity>4</rasd:VirtualQuantity>",
                    "<rasd:VirtualQuantity>0</rasd:VirtualQuantity>",
                ),
                "vCPUs",
            ),
            (
                VMWARE.replace(
                    "<rasd:VirtualQuantity>8192</rasd:VirtualQuantity>",
                    "<rasd:VirtualQuantity>17825792</rasd:VirtualQuantity>",
                ),
                "16 TiB",
            ),
            (
                VMWARE.replace(
                    "<rasd:VirtualQuantity>8192</rasd:VirtualQuantity>",
                    "<rasd:VirtualQuantity>18446744073709551615</rasd:VirtualQuantity>",
                ),
                "16 TiB",
            ),
            (
                VMWARE.replace(
                    "<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>",
                    "<rasd:AllocationUnits>furlongs</rasd:AllocationUnits>",
                ),
                "unknown AllocationUnits",
            ),
            (
                VMWARE.replace(r#"ovf:capacity="20""#, r#"ovf:capacity="${disk.size}""#),
                "not a whole number",
            ),
            (
                VMWARE.replace(
                    r#"ovf:capacity="20""#,
                    r#"ovf:capacity="99999999999999999""#,
                ),
                "overflows",
            ),
            (
                VMWARE.replace(r#"ovf:size="68608""#, r#"ovf:size="-1""#),
                "not a whole number",
            ),
        ];
        for (text, expected) in cases {
            let message = error(&text);
            assert!(message.contains(expected), "{expected}: {message}");
        }
        // 16 TiB exactly is accepted.
        let max = VMWARE.replace(
            "<rasd:VirtualQuantity>8192</rasd:VirtualQuantity>",
            "<rasd:VirtualQuantity>16777216</rasd:VirtualQuantity>",
        );
        assert_eq!(parse(&max, "t.ovf").unwrap().memory_bytes, Some(16 << 40));
    }

    #[test]
    fn allocation_units() {
        for (units, bytes) in [
            ("byte", 1),
            ("byte * 2^20", 1 << 20),
            ("byte*2^30", 1 << 30),
            ("MegaBytes", 1 << 20),
            ("MB", 1 << 20),
            ("GigaBytes", 1 << 30),
            ("byte * 10^3", 1000),
            ("byte * 1024", 1024),
        ] {
            assert_eq!(unit_bytes(units), Some(bytes), "{units}");
        }
        for bad in ["", "hertz * 10^6", "byte * 2^64", "byte * 10^30", "parsecs"] {
            assert_eq!(unit_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn compressed_files_are_not_supported() {
        let text = VMWARE.replace(
            r#"ovf:id="file2""#,
            r#"ovf:id="file2" ovf:compression="gzip""#,
        );
        assert!(error(&text).contains("compressed"));
    }
}

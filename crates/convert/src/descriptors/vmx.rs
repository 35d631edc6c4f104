//! Reader of VMware `.vmx` files (Workstation, Fusion, ESXi).
//!
//! A `.vmx` is a list of `key = "value"` lines; `#` starts a comment line.
//! Keys are case-insensitive (VMware writes `displayName`, users write
//! `displayname`); the last of repeated keys wins, as in VMware. Values are
//! quoted and use VMware's `|XX` escapes (`|22` is `"`, `|7C` is `|`).
//! Unquoted values are accepted; any other line is refused with its number.
//!
//! What is read:
//!
//! * `displayName` → name, `uuid.bios` → uuid (as written), `numvcpus`
//!   (default 1), `memsize` (MiB), `firmware` (`efi` → UEFI),
//!   `virtualHW.version` → platform `vmx-N`, `guestOS`;
//! * disks on `scsiN` (`scsiN.virtualDev` is the controller word:
//!   `lsilogic`, `buslogic`, `lsisas1068`, `pvscsi`), `sataN` (`ahci`),
//!   `ideN` (`ide`) and `nvmeN` (`nvme`): `scsi0:1.present`, `.fileName`,
//!   `.deviceType`, labelled `scsi0:1`, in the order of their `.present`
//!   lines. A device or controller whose `present` is FALSE is skipped, as
//!   VMware does. The disk `.mode` (`persistent`,
//!   `independent-nonpersistent`, …) changes nothing in the import: every
//!   mode's base file is the disk as it is at power-off;
//! * CD-ROMs (`cdrom-image`, `atapi-cdrom`, `cdrom-raw`, or a `.iso` file
//!   with no device type) and other devices on a disk slot become
//!   `other_devices`;
//! * `bios.bootOrder` / `bios.hddOrder`: when the boot order lists `hdd` (or
//!   is absent), the disks named by `hddOrder` get boot orders 1, 2, …;
//! * NICs `ethernetN`: `virtualDev` (when absent VMware picks by guest:
//!   `e1000` for 64-bit guests, `vlance` otherwise, and so does this reader),
//!   the MAC from `address` when `addressType = "static"`, else
//!   `generatedAddress` (falling back to the other one), and the network
//!   from `networkName`, else `connectionType` (`nat`, `hostonly`,
//!   `bridged`, or `vnet` for `custom`);
//! * sound, USB (`usb`, `ehci`, `usb_xhci`), floppies, serial and parallel
//!   ports → `other_devices`.

use std::collections::HashMap;

use crate::foreign::{BusKind, Firmware, ForeignDevice, ForeignDisk, ForeignNic, ForeignVm};
use crate::{ConvertError, Result};

/// Largest `.vmx` accepted (real ones are a few KiB).
pub const MAX_VMX_BYTES: usize = 1024 * 1024;

/// Most memory a descriptor may claim: a sanity cap against garbage, shared
/// by the descriptor readers.
pub(crate) const MAX_MEMORY_BYTES: u64 = 16 << 40;

/// Most vCPUs a descriptor may claim (shared by the descriptor readers).
pub(crate) const MAX_VCPUS: u32 = 1024;

/// Most devices of one kind (disk slots, NICs) a descriptor may have.
const MAX_INDEX: u32 = 1024;

/// `value` (MiB, from `key` of `what`) in bytes, refusing zero and more than
/// [`MAX_MEMORY_BYTES`].
pub(crate) fn memory_from_mib(value: &str, key: &str, what: &str) -> Result<u64> {
    let mib: u64 = value.trim().parse().map_err(|_| {
        ConvertError::invalid(format!(
            "{what}: {key} = {value:?} is not a whole number of MiB"
        ))
    })?;
    check_memory(mib.checked_mul(1 << 20), key, value, what)
}

/// Checks a memory size in bytes (`None` when it overflowed).
pub(crate) fn check_memory(bytes: Option<u64>, key: &str, value: &str, what: &str) -> Result<u64> {
    match bytes {
        Some(0) => Err(ConvertError::invalid(format!(
            "{what}: {key} = {value:?} gives the VM no memory"
        ))),
        Some(bytes) if bytes <= MAX_MEMORY_BYTES => Ok(bytes),
        _ => Err(ConvertError::invalid(format!(
            "{what}: {key} = {value:?} is more than the 16 TiB of memory accepted"
        ))),
    }
}

/// A vCPU count from `key` of `what`, 1 ..= [`MAX_VCPUS`].
pub(crate) fn vcpus_from(value: &str, key: &str, what: &str) -> Result<u32> {
    let digits = value.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConvertError::invalid(format!(
            "{what}: {key} = {value:?} is not a whole number"
        )));
    }
    match digits.parse::<u32>() {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(ConvertError::invalid(format!(
            "{what}: {key} = {value:?} is not a vCPU count from 1 to {MAX_VCPUS}"
        ))),
    }
}

/// `aa:bb:cc:dd:ee:ff` from twelve hex digits (`080027AABBCC`, as VirtualBox
/// and Hyper-V write MACs), lower case.
pub(crate) fn mac_from_hex12(value: &str, key: &str, what: &str) -> Result<String> {
    let value = value.trim();
    if value.len() != 12 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ConvertError::invalid(format!(
            "{what}: {key} = {value:?} is not a MAC address (12 hex digits)"
        )));
    }
    let lower = value.to_ascii_lowercase();
    let octets: Vec<&str> = (0..6).map(|i| &lower[2 * i..2 * i + 2]).collect();
    Ok(octets.join(":"))
}

/// Whether `value` is a MAC written as six `:`- or `-`-separated hex octets.
pub(crate) fn is_colon_mac(value: &str) -> bool {
    let octets: Vec<&str> = value.split([':', '-']).collect();
    octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The parsed lines: lower-cased key → (line number, value).
struct Vmx<'w> {
    entries: HashMap<String, (usize, String)>,
    what: &'w str,
}

impl Vmx<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .get(&key.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    /// A boolean key; `None` when absent.
    fn flag(&self, key: &str) -> Result<Option<bool>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match value.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" | "on" => Ok(Some(true)),
            "false" | "no" | "0" | "off" => Ok(Some(false)),
            _ => Err(ConvertError::invalid(format!(
                "{}: {key} = {value:?} is neither TRUE nor FALSE",
                self.what
            ))),
        }
    }

    fn present(&self, prefix: &str) -> Result<bool> {
        Ok(self.flag(&format!("{prefix}.present"))? == Some(true))
    }

    /// Keys `<prefix>.present` (already lower case) matching `select`, in
    /// file order.
    fn present_keys<T>(&self, select: impl Fn(&str) -> Option<T>) -> Vec<(usize, T)> {
        let mut found: Vec<(usize, T)> = self
            .entries
            .iter()
            .filter_map(|(key, (line, _))| {
                let prefix = key.strip_suffix(".present")?;
                select(prefix).map(|t| (*line, t))
            })
            .collect();
        found.sort_by_key(|(line, _)| *line);
        found
    }
}

/// Decodes VMware's `|XX` escapes.
fn unescape(raw: &str, line: usize, what: &str) -> Result<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'|'
            && i + 2 < bytes.len()
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit()
        {
            let hex = &raw[i + 1..i + 3];
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| {
        ConvertError::invalid(format!(
            "{what} line {line}: the value's |XX escapes are not UTF-8"
        ))
    })
}

fn read_lines<'w>(text: &str, what: &'w str) -> Result<Vmx<'w>> {
    if text.len() > MAX_VMX_BYTES {
        return Err(ConvertError::refused(format!(
            "{what} is {} bytes, more than the {MAX_VMX_BYTES} accepted for a .vmx",
            text.len()
        )));
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut entries = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let not_key_value = || {
            ConvertError::invalid(format!(
                "{what} line {number} is not a `key = \"value\"` line: {:?}",
                line.chars().take(80).collect::<String>()
            ))
        };
        let (key, value) = line.split_once('=').ok_or_else(not_key_value)?;
        let key = key.trim();
        // VMware's keys are words joined by `.`, `:`, `_` or `-`; anything
        // without blanks, quotes or control characters is accepted.
        let key_ok = !key.is_empty()
            && !key
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '"');
        if !key_ok {
            return Err(not_key_value());
        }
        let value = value.trim();
        let raw = if let Some(inner) = value.strip_prefix('"') {
            inner.strip_suffix('"').ok_or_else(|| {
                ConvertError::invalid(format!(
                    "{what} line {number}: the value of {key} has no closing quote"
                ))
            })?
        } else if value.contains('"') {
            return Err(not_key_value());
        } else {
            value
        };
        let value = unescape(raw, number, what)?;
        entries.insert(key.to_ascii_lowercase(), (number, value));
    }
    if entries.is_empty() {
        return Err(ConvertError::invalid(format!(
            "{what} has no settings: it is not a VMware .vmx"
        )));
    }
    Ok(Vmx { entries, what })
}

/// `ctrl<N>:<M>` with `ctrl` one of the disk controller kinds.
fn disk_slot(prefix: &str) -> Option<(&'static str, u32, u32)> {
    for kind in ["scsi", "sata", "ide", "nvme"] {
        if let Some(rest) = prefix.strip_prefix(kind) {
            let (controller, unit) = rest.split_once(':')?;
            let controller = small_index(controller)?;
            let unit = small_index(unit)?;
            return Some((kind, controller, unit));
        }
    }
    None
}

/// A decimal index below [`MAX_INDEX`].
fn small_index(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.len() > 4 {
        return None;
    }
    text.parse().ok().filter(|n| *n < MAX_INDEX)
}

/// Reads the descriptor text (`what` names it in messages).
pub fn parse(text: &str, what: &str) -> Result<ForeignVm> {
    let vmx = read_lines(text, what)?;
    let mut vm = ForeignVm {
        name: vmx.get("displayName").map(str::to_string),
        uuid: vmx.get("uuid.bios").map(str::to_string),
        guest_os: vmx.get("guestOS").map(str::to_string),
        ..ForeignVm::default()
    };
    vm.vcpus = Some(match vmx.get("numvcpus") {
        Some(value) => vcpus_from(value, "numvcpus", what)?,
        None => 1,
    });
    if let Some(value) = vmx.get("memsize") {
        vm.memory_bytes = Some(memory_from_mib(value, "memsize", what)?);
    }
    vm.firmware = match vmx.get("firmware").map(|f| f.trim().to_ascii_lowercase()) {
        None => Firmware::Bios,
        Some(f) if f == "bios" || f.is_empty() => Firmware::Bios,
        Some(f) if f == "efi" => Firmware::Uefi,
        Some(f) => {
            return Err(ConvertError::invalid(format!(
                "{what}: firmware = {f:?} is neither \"bios\" nor \"efi\""
            )))
        }
    };
    if let Some(version) = vmx.get("virtualHW.version") {
        let version = version.trim();
        if version.is_empty() || version.len() > 4 || !version.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ConvertError::invalid(format!(
                "{what}: virtualHW.version = {version:?} is not a hardware version number"
            )));
        }
        vm.platform = Some(format!("vmx-{version}"));
    }

    read_disks(&vmx, &mut vm)?;
    read_boot_order(&vmx, &mut vm)?;
    read_nics(&vmx, &mut vm)?;
    read_other_devices(&vmx, &mut vm)?;
    Ok(vm)
}

fn read_disks(vmx: &Vmx, vm: &mut ForeignVm) -> Result<()> {
    let what = vmx.what;
    for (_, (kind, controller, unit)) in vmx.present_keys(disk_slot) {
        let label = format!("{kind}{controller}:{unit}");
        if !vmx.present(&label)? {
            continue;
        }
        let controller_name = format!("{kind}{controller}");
        // A slot on a controller switched off is not seen by the guest.
        if vmx.flag(&format!("{controller_name}.present"))? == Some(false) {
            continue;
        }
        let device_type = vmx
            .get(&format!("{label}.deviceType"))
            .map(|t| t.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let file = vmx
            .get(&format!("{label}.fileName"))
            .map(str::trim)
            .unwrap_or("");
        let is_cdrom = matches!(
            device_type.as_str(),
            "cdrom-image" | "atapi-cdrom" | "cdrom-raw"
        ) || (device_type.is_empty() && file.to_ascii_lowercase().ends_with(".iso"));
        if is_cdrom {
            vm.other_devices.push(ForeignDevice {
                kind: "cdrom".into(),
                label,
            });
            continue;
        }
        let is_disk = matches!(
            device_type.as_str(),
            "" | "disk" | "scsi-harddisk" | "ata-harddisk" | "sata-harddisk" | "plaindisk"
        );
        if !is_disk {
            // scsi-passthru, rawDisk and the like: a host device, not a file.
            vm.other_devices.push(ForeignDevice {
                kind: device_type,
                label,
            });
            continue;
        }
        if file.is_empty() {
            return Err(ConvertError::invalid(format!(
                "{what}: disk {label} is present but has no {label}.fileName"
            )));
        }
        let (bus, controller_word) = match kind {
            "scsi" => (
                BusKind::Scsi,
                vmx.get(&format!("{controller_name}.virtualDev"))
                    .map(|d| d.trim().to_string())
                    .filter(|d| !d.is_empty())
                    // No virtualDev: VMware chose by guest OS; the file does
                    // not say which.
                    .unwrap_or_else(|| "scsi".into()),
            ),
            "sata" => (BusKind::Sata, "ahci".into()),
            "ide" => (BusKind::Ide, "ide".into()),
            _ => (BusKind::Nvme, "nvme".into()),
        };
        let format_claim = file
            .rsplit(['/', '\\'])
            .next()
            .and_then(|name| name.rsplit_once('.'))
            .map(|(_, ext)| ext.to_ascii_lowercase())
            .filter(|ext| ext == "vmdk");
        vm.disks.push(ForeignDisk {
            label,
            file: file.to_string(),
            controller: controller_word,
            bus,
            boot_order: None,
            read_only: false,
            format_claim,
            capacity_claim: None,
        });
    }
    Ok(())
}

fn read_boot_order(vmx: &Vmx, vm: &mut ForeignVm) -> Result<()> {
    if let Some(order) = vmx.get("bios.bootOrder") {
        let boots_disk = order
            .split(',')
            .any(|d| d.trim().eq_ignore_ascii_case("hdd"));
        if !boots_disk {
            return Ok(());
        }
    }
    let Some(hdd_order) = vmx.get("bios.hddOrder") else {
        return Ok(());
    };
    let mut position = 0;
    for slot in hdd_order
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if let Some(disk) = vm
            .disks
            .iter_mut()
            .find(|d| d.label.eq_ignore_ascii_case(slot) && d.boot_order.is_none())
        {
            position += 1;
            disk.boot_order = Some(position);
        }
    }
    Ok(())
}

fn read_nics(vmx: &Vmx, vm: &mut ForeignVm) -> Result<()> {
    let what = vmx.what;
    let nic_index = |prefix: &str| prefix.strip_prefix("ethernet").and_then(small_index);
    let sixty_four_bit = vm
        .guest_os
        .as_deref()
        .is_some_and(|g| g.to_ascii_lowercase().contains("64"));
    for (_, index) in vmx.present_keys(nic_index) {
        let label = format!("ethernet{index}");
        if !vmx.present(&label)? {
            continue;
        }
        let key = |k: &str| format!("{label}.{k}");
        let model = vmx
            .get(&key("virtualDev"))
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| if sixty_four_bit { "e1000" } else { "vlance" }.into());
        let address_type = vmx
            .get(&key("addressType"))
            .map(|t| t.trim().to_ascii_lowercase());
        let static_mac = vmx.get(&key("address")).map(|m| (key("address"), m));
        let generated_mac = vmx
            .get(&key("generatedAddress"))
            .map(|m| (key("generatedAddress"), m));
        let mac = if address_type.as_deref() == Some("static") {
            static_mac.or(generated_mac)
        } else {
            generated_mac.or(static_mac)
        };
        let mac = match mac {
            Some((_, m)) if m.trim().is_empty() => None,
            Some((k, m)) => {
                let m = m.trim();
                if !is_colon_mac(m) {
                    return Err(ConvertError::invalid(format!(
                        "{what}: {k} = {m:?} is not a MAC address"
                    )));
                }
                Some(m.to_string())
            }
            None => None,
        };
        let network = vmx
            .get(&key("networkName"))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .or_else(|| {
                let connection = vmx.get(&key("connectionType"))?.trim().to_string();
                if connection.eq_ignore_ascii_case("custom") {
                    vmx.get(&key("vnet")).map(|v| v.trim().to_string())
                } else {
                    Some(connection).filter(|c| !c.is_empty())
                }
            });
        vm.nics.push(ForeignNic {
            label,
            model,
            mac,
            network,
        });
    }
    Ok(())
}

fn read_other_devices(vmx: &Vmx, vm: &mut ForeignVm) -> Result<()> {
    let kind_of = |prefix: &str| -> Option<&'static str> {
        match prefix {
            "sound" => Some("sound"),
            "usb" | "ehci" | "usb_xhci" => Some("usb"),
            _ => [
                ("floppy", "floppy"),
                ("serial", "serial"),
                ("parallel", "parallel"),
            ]
            .into_iter()
            .find(|(p, _)| prefix.strip_prefix(p).and_then(small_index).is_some())
            .map(|(_, kind)| kind),
        }
    };
    for (_, (prefix, kind)) in vmx.present_keys(|p| kind_of(p).map(|k| (p.to_string(), k))) {
        if vmx.present(&prefix)? {
            vm.other_devices.push(ForeignDevice {
                kind: kind.into(),
                label: prefix,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Workstation 17 / ESXi 7 style file.
    const WORKSTATION: &str = r#".encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
pciBridge0.present = "TRUE"
pciBridge4.present = "TRUE"
pciBridge4.virtualDev = "pcieRootPort"
pciBridge4.functions = "8"
vmci0.present = "TRUE"
hpet0.present = "TRUE"
nvram = "web01.nvram"
virtualHW.productCompatibility = "hosted"
powerType.powerOff = "soft"
displayName = "web |22prod|22 01"
guestOS = "ubuntu-64"
firmware = "efi"
NumVCPUs = "4"
memsize = "8192"
# the system disk
scsi0.virtualDev = "lsilogic"
scsi0.present = "TRUE"
scsi0:0.fileName = "web01.vmdk"
scsi0:0.present = "TRUE"
scsi0:1.fileName = "web01_1.vmdk"
scsi0:1.mode = "independent-nonpersistent"
scsi0:1.present = "TRUE"
scsi0:2.fileName = "gone.vmdk"
scsi0:2.present = "FALSE"
sata0.present = "TRUE"
sata0:1.deviceType = "cdrom-image"
sata0:1.fileName = "/isos/ubuntu-22.04.iso"
sata0:1.present = "TRUE"
nvme0.present = "TRUE"
nvme0:0.fileName = "/vmfs/volumes/ds1/web01/data.vmdk"
nvme0:0.present = "TRUE"
bios.bootOrder = "hdd,cdrom"
bios.hddOrder = "scsi0:0"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:0c:29:3a:4b:5c"
ethernet0.generatedAddressOffset = "0"
ethernet1.present = "TRUE"
ethernet1.connectionType = "nat"
ethernet1.addressType = "static"
ethernet1.address = "00:50:56:01:02:03"
ethernet2.present = "FALSE"
sound.present = "TRUE"
sound.virtualDev = "hdaudio"
usb.present = "TRUE"
ehci.present = "TRUE"
floppy0.present = "FALSE"
serial0.present = "TRUE"
serial0.fileType = "file"
serial0.fileName = "serial.log"
uuid.bios = "56 4d 9b 1c 2f 3e 4a 5b-6c 7d 8e 9f a0 b1 c2 d3"
"#;

    #[test]
    fn workstation_vmx_is_read() {
        let vm = parse(WORKSTATION, "web01.vmx").unwrap();
        assert_eq!(vm.name.as_deref(), Some("web \"prod\" 01"));
        assert_eq!(
            vm.uuid.as_deref(),
            Some("56 4d 9b 1c 2f 3e 4a 5b-6c 7d 8e 9f a0 b1 c2 d3")
        );
        assert_eq!(vm.vcpus, Some(4));
        assert_eq!(vm.memory_bytes, Some(8192 << 20));
        assert_eq!(vm.firmware, Firmware::Uefi);
        assert_eq!(vm.platform.as_deref(), Some("vmx-19"));
        assert_eq!(vm.guest_os.as_deref(), Some("ubuntu-64"));

        let labels: Vec<&str> = vm.disks.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(labels, ["scsi0:0", "scsi0:1", "nvme0:0"]);
        let system = &vm.disks[0];
        assert_eq!(system.file, "web01.vmdk");
        assert_eq!(system.controller, "lsilogic");
        assert_eq!(system.bus, BusKind::Scsi);
        assert_eq!(system.boot_order, Some(1));
        assert_eq!(system.format_claim.as_deref(), Some("vmdk"));
        assert_eq!(vm.disks[1].boot_order, None);
        assert_eq!(vm.disks[2].bus, BusKind::Nvme);
        assert_eq!(vm.disks[2].file, "/vmfs/volumes/ds1/web01/data.vmdk");

        assert_eq!(vm.nics.len(), 2);
        assert_eq!(vm.nics[0].model, "vmxnet3");
        assert_eq!(vm.nics[0].mac.as_deref(), Some("00:0c:29:3a:4b:5c"));
        assert_eq!(vm.nics[0].network.as_deref(), Some("VM Network"));
        // No virtualDev on a 64-bit guest: VMware's e1000.
        assert_eq!(vm.nics[1].model, "e1000");
        assert_eq!(vm.nics[1].mac.as_deref(), Some("00:50:56:01:02:03"));
        assert_eq!(vm.nics[1].network.as_deref(), Some("nat"));

        let others: Vec<(&str, &str)> = vm
            .other_devices
            .iter()
            .map(|d| (d.kind.as_str(), d.label.as_str()))
            .collect();
        assert_eq!(
            others,
            [
                ("cdrom", "sata0:1"),
                ("sound", "sound"),
                ("usb", "usb"),
                ("usb", "ehci"),
                ("serial", "serial0")
            ]
        );
    }

    #[test]
    fn esxi_ide_and_sata_disks_with_defaults() {
        let text = r#"config.version = "8"
virtualHW.version = "13"
displayName = "legacy"
guestOS = "winxppro"
memsize = "512"
ide0:0.present = "TRUE"
ide0:0.fileName = "legacy.vmdk"
ide1:0.present = "TRUE"
ide1:0.deviceType = "atapi-cdrom"
ide1:0.fileName = "auto detect"
sata0.present = "TRUE"
sata0:0.present = "TRUE"
sata0:0.fileName = "data.vmdk"
sata0:0.deviceType = "disk"
scsi1.present = "FALSE"
scsi1:0.present = "TRUE"
scsi1:0.fileName = "detached.vmdk"
ethernet0.present = "TRUE"
ethernet0.networkName = "LAN"
"#;
        let vm = parse(text, "legacy.vmx").unwrap();
        assert_eq!(vm.vcpus, Some(1));
        assert_eq!(vm.firmware, Firmware::Bios);
        assert_eq!(vm.disks.len(), 2);
        assert_eq!(vm.disks[0].bus, BusKind::Ide);
        assert_eq!(vm.disks[0].controller, "ide");
        assert_eq!(vm.disks[1].bus, BusKind::Sata);
        assert_eq!(vm.disks[1].controller, "ahci");
        assert!(vm.disks.iter().all(|d| d.boot_order.is_none()));
        assert_eq!(vm.other_devices[0].kind, "cdrom");
        assert_eq!(vm.nics[0].model, "vlance");
        assert_eq!(vm.nics[0].mac, None);
    }

    #[test]
    fn keys_are_case_insensitive_and_last_wins() {
        let vm = parse("MEMSIZE = \"1024\"\nmemsize = \"2048\"\n", "t.vmx").unwrap();
        assert_eq!(vm.memory_bytes, Some(2048 << 20));
    }

    #[test]
    fn escapes_are_decoded() {
        let vm = parse("displayName = \"a|7Cb |22c|22 |zz\"\n", "t.vmx").unwrap();
        assert_eq!(vm.name.as_deref(), Some("a|b \"c\" |zz"));
    }

    #[test]
    fn malformed_lines_are_refused_with_their_number() {
        let error = parse("memsize = \"1024\"\n\nthis is not a setting\n", "bad.vmx")
            .unwrap_err()
            .to_string();
        assert!(error.contains("bad.vmx line 3"), "{error}");
        let error = parse("displayName = \"open\n", "bad.vmx")
            .unwrap_err()
            .to_string();
        assert!(error.contains("closing quote"), "{error}");
    }

    #[test]
    fn absurd_values_are_refused_naming_the_key() {
        let error = parse("memsize = \"99999999999\"\n", "t.vmx")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("memsize") && error.contains("16 TiB"),
            "{error}"
        );
        let error = parse("numvcpus = \"4096\"\n", "t.vmx")
            .unwrap_err()
            .to_string();
        assert!(error.contains("numvcpus"), "{error}");
        let error = parse("numvcpus = \"four\"\n", "t.vmx")
            .unwrap_err()
            .to_string();
        assert!(error.contains("numvcpus"), "{error}");
        let error = parse("firmware = \"coreboot\"\n", "t.vmx")
            .unwrap_err()
            .to_string();
        assert!(error.contains("firmware"), "{error}");
        let error = parse(
            "ethernet0.present = \"TRUE\"\nethernet0.address = \"nope\"\naddressType = \"static\"\n",
            "t.vmx",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("ethernet0.address"), "{error}");
    }

    #[test]
    fn missing_essentials_are_refused() {
        let error = parse("scsi0:0.present = \"TRUE\"\n", "t.vmx")
            .unwrap_err()
            .to_string();
        assert!(error.contains("scsi0:0.fileName"), "{error}");
        let error = parse("# only a comment\n", "t.vmx")
            .unwrap_err()
            .to_string();
        assert!(error.contains("no settings"), "{error}");
    }

    #[test]
    fn oversized_files_are_refused() {
        let big = "a = \"b\"\n".repeat(MAX_VMX_BYTES / 8 + 1);
        assert!(matches!(
            parse(&big, "big.vmx"),
            Err(ConvertError::Refused(_))
        ));
    }

    #[test]
    fn mac_helpers() {
        assert_eq!(
            mac_from_hex12("080027AABBCC", "k", "w").unwrap(),
            "08:00:27:aa:bb:cc"
        );
        assert!(mac_from_hex12("08002", "k", "w").is_err());
        assert!(is_colon_mac("00:50:56:AA:bb:01"));
        assert!(!is_colon_mac("00:50:56:AA:bb"));
    }
}

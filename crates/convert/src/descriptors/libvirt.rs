//! Reader of libvirt domain XML (`virsh dumpxml`, `/etc/libvirt/qemu/*.xml`).
//!
//! What is read, from the root `<domain>`:
//!
//! * `<name>` (required, as libvirt requires it), `<uuid>`, `<memory>` (or
//!   `<currentMemory>` when `<memory>` is missing) with its `unit`
//!   (KiB when absent, as in libvirt), `<vcpu>` (default 1);
//! * `<os>`: `<type>` must be `hvm`; its `machine` is the platform.
//!   `<os firmware='efi'>`, or a `<loader>` of type `pflash` or whose path
//!   names OVMF/edk2/AAVMF, means UEFI. `<boot dev='hd'/>` (when no device
//!   has a `<boot order>`) gives the first disk boot order 1;
//! * `<disk device='disk'>`: only `type='file'` disks are imported; block,
//!   network, volume, dir and other types are refused, and so is a
//!   non-empty `<backingStore>` (a backing chain). `<driver type>` is the
//!   format claim, `<source file>` the file, `<target dev bus>` the label and
//!   bus (from the `dev` prefix when `bus` is absent); a SCSI disk's
//!   controller word is the `model` of its `<controller type='scsi'>`
//!   (`virtio-scsi`, `lsilogic`, …, or `scsi` when unnamed). `<readonly/>`
//!   and `<boot order>` are kept. CD-ROMs, floppies and LUNs become
//!   `other_devices`;
//! * `<interface>`: `<model type>` (libvirt's QEMU default `rtl8139` when
//!   absent), `<mac address>`, and the network from `<source network>`,
//!   `bridge`, `dev` (macvtap) or `name`; `user` interfaces have none.
//!   `hostdev` interfaces (PCI pass-through) are other devices;
//! * `hostdev`, `tpm`, `sound`, `video`, `redirdev`, `smartcard` and
//!   `filesystem` become `other_devices`. Consoles, serial ports, graphics,
//!   input devices, controllers, channels, RNGs and balloons are normal
//!   plumbing of a KVM guest and are not listed.

use roxmltree::Node;

use super::vmx::{check_memory, is_colon_mac, vcpus_from};
use crate::foreign::{BusKind, Firmware, ForeignDevice, ForeignDisk, ForeignNic, ForeignVm};
use crate::xml::{self, attr, child, child_text, children};
use crate::{ConvertError, Result};

/// Bytes per unit, libvirt's spellings (case-sensitive, as libvirt's).
fn unit_bytes(unit: &str) -> Option<u64> {
    const K: u64 = 1024;
    Some(match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => K,
        "MB" => 1000 * 1000,
        "M" | "MiB" => K * K,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => K * K * K,
        "TB" => 1000 * 1000 * 1000 * 1000,
        "T" | "TiB" => K * K * K * K,
        "PB" => 1000 * 1000 * 1000 * 1000 * 1000,
        "P" | "PiB" => K * K * K * K * K,
        _ => return None,
    })
}

/// The size in a `<memory unit='…'>N</memory>` element.
fn memory_of(node: Node, what: &str) -> Result<u64> {
    let element = node.tag_name().name();
    let value = node.text().map(str::trim).unwrap_or("");
    let unit = attr(node, "unit").unwrap_or("KiB");
    let multiplier = unit_bytes(unit).ok_or_else(|| {
        ConvertError::invalid(format!(
            "{what}: <{element} unit='{unit}'> is not a unit libvirt knows"
        ))
    })?;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConvertError::invalid(format!(
            "{what}: <{element}> {value:?} is not a whole number"
        )));
    }
    let amount: Option<u64> = value.parse().ok();
    let shown = format!("{value} {unit}");
    check_memory(
        amount.and_then(|a| a.checked_mul(multiplier)),
        &format!("<{element}>"),
        &shown,
        what,
    )
}

/// Reads the descriptor text (`what` names it in messages).
pub fn parse(text: &str, what: &str) -> Result<ForeignVm> {
    let document = xml::parse(text, what)?;
    let domain = document.root_element();
    if domain.tag_name().name() != "domain" {
        return Err(ConvertError::invalid(format!(
            "{what}: the root element is <{}>, not a libvirt <domain>",
            domain.tag_name().name()
        )));
    }
    let name = child_text(domain, "name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ConvertError::invalid(format!("{what}: the <domain> has no <name>")))?;
    let mut vm = ForeignVm {
        name: Some(name.to_string()),
        uuid: child_text(domain, "uuid")
            .filter(|u| !u.is_empty())
            .map(str::to_string),
        ..ForeignVm::default()
    };
    let memory = child(domain, "memory")
        .or_else(|| child(domain, "currentMemory"))
        .ok_or_else(|| ConvertError::invalid(format!("{what}: the <domain> has no <memory>")))?;
    vm.memory_bytes = Some(memory_of(memory, what)?);
    vm.vcpus = Some(match child_text(domain, "vcpu") {
        Some(count) => vcpus_from(count, "<vcpu>", what)?,
        None => 1,
    });

    let os = child(domain, "os")
        .ok_or_else(|| ConvertError::invalid(format!("{what}: the <domain> has no <os>")))?;
    let os_type = child(os, "type");
    let kind = os_type.and_then(|t| t.text()).map(str::trim).unwrap_or("");
    if kind != "hvm" {
        return Err(ConvertError::invalid(format!(
            "{what}: <os><type>{kind}</type> is not a hardware VM (only 'hvm' domains are imported)"
        )));
    }
    vm.platform = os_type.and_then(|t| attr(t, "machine")).map(str::to_string);
    let loader_is_uefi = child(os, "loader").is_some_and(|loader| {
        let path = loader.text().unwrap_or("").to_ascii_lowercase();
        attr(loader, "type") == Some("pflash")
            || ["ovmf", "edk2", "aavmf"].iter().any(|n| path.contains(n))
    });
    if attr(os, "firmware") == Some("efi") || loader_is_uefi {
        vm.firmware = Firmware::Uefi;
    }

    let devices = child(domain, "devices");
    if let Some(devices) = devices {
        read_disks(devices, &mut vm, what)?;
        read_interfaces(devices, &mut vm, what)?;
        read_other_devices(devices, &mut vm);
    }
    let any_order = vm.disks.iter().any(|d| d.boot_order.is_some());
    let boots_disk = children(os, "boot").any(|b| attr(b, "dev") == Some("hd"));
    if !any_order && boots_disk {
        if let Some(first) = vm.disks.first_mut() {
            first.boot_order = Some(1);
        }
    }
    Ok(vm)
}

/// `<boot order='N'/>` of a device.
fn boot_order(device: Node, label: &str, what: &str) -> Result<Option<u32>> {
    let Some(boot) = child(device, "boot") else {
        return Ok(None);
    };
    let order = attr(boot, "order").unwrap_or("");
    match order.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => Err(ConvertError::invalid(format!(
            "{what}: {label}: <boot order='{order}'> is not a position from 1"
        ))),
    }
}

fn read_disks(devices: Node, vm: &mut ForeignVm, what: &str) -> Result<()> {
    for (index, disk) in children(devices, "disk").enumerate() {
        let target = child(disk, "target");
        let dev = target.and_then(|t| attr(t, "dev")).unwrap_or("");
        let label = if dev.is_empty() {
            format!("disk {index}")
        } else {
            dev.to_string()
        };
        let device = attr(disk, "device").unwrap_or("disk");
        if device != "disk" {
            // cdrom, floppy, lun (a host SCSI device passed through).
            vm.other_devices.push(ForeignDevice {
                kind: device.to_string(),
                label,
            });
            continue;
        }
        let kind = attr(disk, "type").unwrap_or("file");
        let unsupported = match kind {
            "file" => None,
            "block" => Some("a block device"),
            "network" => Some("a network disk"),
            "volume" => Some("a storage pool volume"),
            "dir" => Some("a host directory"),
            "nvme" => Some("a host NVMe device"),
            "vhostuser" => Some("a vhost-user disk"),
            _ => Some("of an unknown type"),
        };
        if let Some(description) = unsupported {
            return Err(ConvertError::refused(format!(
                "{what}: disk {label} is {description} (type='{kind}'); only file disks are imported"
            )));
        }
        if dev.is_empty() {
            return Err(ConvertError::invalid(format!(
                "{what}: disk {index} has no <target dev>"
            )));
        }
        if let Some(backing) = child(disk, "backingStore") {
            if backing.has_children() || backing.attributes().len() > 0 {
                return Err(ConvertError::refused(format!(
                    "{what}: disk {label} has a backing chain (<backingStore>); \
                     flatten it first (qemu-img convert or virsh blockpull)"
                )));
            }
        }
        let file = child(disk, "source")
            .and_then(|s| attr(s, "file"))
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .ok_or_else(|| {
                ConvertError::invalid(format!("{what}: disk {label} has no <source file>"))
            })?;
        let bus_word = target.and_then(|t| attr(t, "bus")).unwrap_or_else(|| {
            // libvirt's own inference from the device name.
            match dev.get(..2) {
                Some("vd") => "virtio",
                Some("sd") => "scsi",
                Some("hd") => "ide",
                Some("fd") => "fdc",
                _ => "",
            }
        });
        let (bus, controller) = match bus_word {
            "virtio" => (BusKind::Virtio, "virtio".to_string()),
            "sata" => (BusKind::Sata, "sata".to_string()),
            "ide" => (BusKind::Ide, "ide".to_string()),
            "nvme" => (BusKind::Nvme, "nvme".to_string()),
            "scsi" => (BusKind::Scsi, scsi_model(devices, disk)),
            "" => (BusKind::Unknown, "unknown".to_string()),
            other => (BusKind::Unknown, other.to_string()),
        };
        let format_claim = child(disk, "driver")
            .and_then(|d| attr(d, "type"))
            .map(|t| t.to_ascii_lowercase());
        vm.disks.push(ForeignDisk {
            boot_order: boot_order(disk, &label, what)?,
            label,
            file: file.to_string(),
            controller,
            bus,
            read_only: child(disk, "readonly").is_some(),
            format_claim,
            capacity_claim: None,
        });
    }
    Ok(())
}

/// The model of the SCSI controller `disk` sits on (its `<address
/// controller='N'>`, 0 when absent).
fn scsi_model(devices: Node, disk: Node) -> String {
    let index = child(disk, "address")
        .and_then(|a| attr(a, "controller"))
        .unwrap_or("0");
    children(devices, "controller")
        .filter(|c| attr(*c, "type") == Some("scsi"))
        .find(|c| attr(*c, "index").unwrap_or("0") == index)
        .and_then(|c| attr(c, "model"))
        .unwrap_or("scsi")
        .to_string()
}

fn read_interfaces(devices: Node, vm: &mut ForeignVm, what: &str) -> Result<()> {
    for (index, interface) in children(devices, "interface").enumerate() {
        let label = child(interface, "alias")
            .and_then(|a| attr(a, "name"))
            .map(str::to_string)
            .unwrap_or_else(|| format!("net{index}"));
        let kind = attr(interface, "type").unwrap_or("");
        if kind == "hostdev" {
            vm.other_devices.push(ForeignDevice {
                kind: "hostdev".into(),
                label,
            });
            continue;
        }
        let model = child(interface, "model")
            .and_then(|m| attr(m, "type"))
            .unwrap_or("rtl8139")
            .to_string();
        let mac = match child(interface, "mac").and_then(|m| attr(m, "address")) {
            Some(mac) if is_colon_mac(mac.trim()) => Some(mac.trim().to_string()),
            Some(mac) => {
                return Err(ConvertError::invalid(format!(
                    "{what}: interface {label}: <mac address='{mac}'> is not a MAC address"
                )))
            }
            None => None,
        };
        let network = child(interface, "source").and_then(|source| {
            ["network", "bridge", "dev", "name"]
                .iter()
                .find_map(|key| attr(source, key))
                .map(str::to_string)
        });
        vm.nics.push(ForeignNic {
            label,
            model,
            mac,
            network: if kind == "user" { None } else { network },
        });
    }
    Ok(())
}

fn read_other_devices(devices: Node, vm: &mut ForeignVm) {
    const LISTED: [&str; 7] = [
        "hostdev",
        "tpm",
        "sound",
        "video",
        "redirdev",
        "smartcard",
        "filesystem",
    ];
    for device in devices.children().filter(|n| n.is_element()) {
        let kind = device.tag_name().name();
        if !LISTED.contains(&kind) {
            continue;
        }
        let detail = match kind {
            "video" => child(device, "model").and_then(|m| attr(m, "type")),
            "filesystem" => child(device, "target").and_then(|t| attr(t, "dir")),
            "redirdev" | "hostdev" | "smartcard" => {
                attr(device, "type").or_else(|| attr(device, "mode"))
            }
            _ => attr(device, "model"),
        };
        vm.other_devices.push(ForeignDevice {
            kind: kind.to_string(),
            label: match detail {
                Some(detail) => format!("{kind} {detail}"),
                None => kind.to_string(),
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `virt-install --name web01 --memory 4096 --vcpus 2 --boot uefi
    /// --disk …qcow2 --cdrom … --network network=default` leaves in
    /// `virsh dumpxml`, trimmed.
    const VIRT_INSTALL: &str = r#"<domain type='kvm' id='3'>
  <name>web01</name>
  <uuid>6f3e2c1a-8b4d-4e5f-9a0b-1c2d3e4f5a6b</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://ubuntu.com/ubuntu/22.04"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>
    <firmware>
      <feature enabled='no' name='enrolled-keys'/>
      <feature enabled='no' name='secure-boot'/>
    </firmware>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram>
  </os>
  <features><acpi/><apic/><vmport state='off'/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/web01-data.img'/>
      <target dev='sda' bus='scsi'/>
      <readonly/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/isos/ubuntu-22.04.iso'/>
      <target dev='sdb' bus='sata'/>
      <readonly/>
    </disk>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'/>
    <controller type='pci' index='0' model='pcie-root'/>
    <interface type='network'>
      <mac address='52:54:00:a1:b2:c3'/>
      <source network='default' portid='1' bridge='virbr0'/>
      <target dev='vnet2'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:a1:b2:c4'/>
      <source bridge='br0'/>
      <model type='e1000e'/>
    </interface>
    <interface type='user'>
      <mac address='52:54:00:a1:b2:c5'/>
    </interface>
    <serial type='pty'><target type='isa-serial' port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <input type='tablet' bus='usb'/>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <graphics type='spice' autoport='yes'/>
    <sound model='ich9'/>
    <video><model type='virtio' heads='1' primary='yes'/></video>
    <redirdev bus='usb' type='spicevmc'/>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>
"#;

    #[test]
    fn virt_install_domain_is_read() {
        let vm = parse(VIRT_INSTALL, "web01.xml").unwrap();
        assert_eq!(vm.name.as_deref(), Some("web01"));
        assert_eq!(
            vm.uuid.as_deref(),
            Some("6f3e2c1a-8b4d-4e5f-9a0b-1c2d3e4f5a6b")
        );
        assert_eq!(vm.memory_bytes, Some(4 << 30));
        assert_eq!(vm.vcpus, Some(2));
        assert_eq!(vm.platform.as_deref(), Some("pc-q35-8.2"));
        assert_eq!(vm.firmware, Firmware::Uefi);

        assert_eq!(vm.disks.len(), 2);
        let root = &vm.disks[0];
        assert_eq!(root.label, "vda");
        assert_eq!(root.file, "/var/lib/libvirt/images/web01.qcow2");
        assert_eq!(root.bus, BusKind::Virtio);
        assert_eq!(root.controller, "virtio");
        assert_eq!(root.format_claim.as_deref(), Some("qcow2"));
        assert_eq!(root.boot_order, Some(1));
        assert!(!root.read_only);
        let data = &vm.disks[1];
        assert_eq!(data.bus, BusKind::Scsi);
        assert_eq!(data.controller, "virtio-scsi");
        assert_eq!(data.format_claim.as_deref(), Some("raw"));
        assert!(data.read_only);
        assert_eq!(data.boot_order, None);

        let nics: Vec<(&str, &str, Option<&str>, Option<&str>)> = vm
            .nics
            .iter()
            .map(|n| {
                (
                    n.label.as_str(),
                    n.model.as_str(),
                    n.mac.as_deref(),
                    n.network.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            nics,
            [
                ("net0", "virtio", Some("52:54:00:a1:b2:c3"), Some("default")),
                ("net1", "e1000e", Some("52:54:00:a1:b2:c4"), Some("br0")),
                ("net2", "rtl8139", Some("52:54:00:a1:b2:c5"), None),
            ]
        );

        let others: Vec<&str> = vm.other_devices.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(
            others,
            [
                "sdb",
                "tpm tpm-crb",
                "sound ich9",
                "video virtio",
                "redirdev spicevmc"
            ]
        );
        assert_eq!(vm.other_devices[0].kind, "cdrom");
    }

    #[test]
    fn units_and_os_boot_dev() {
        let text = r#"<domain type='qemu'>
  <name>old</name>
  <memory unit='GiB'>2</memory>
  <os><type machine='pc-i440fx-2.11'>hvm</type><boot dev='cdrom'/><boot dev='hd'/></os>
  <devices>
    <disk device='disk' type='file'>
      <source file='old.img'/><target dev='hda'/>
    </disk>
    <disk type='file'><source file='scsi.img'/><target dev='sdc'/></disk>
  </devices>
</domain>"#;
        let vm = parse(text, "old.xml").unwrap();
        assert_eq!(vm.memory_bytes, Some(2 << 30));
        assert_eq!(vm.vcpus, Some(1));
        assert_eq!(vm.firmware, Firmware::Bios);
        assert_eq!(vm.disks[0].bus, BusKind::Ide);
        assert_eq!(vm.disks[0].boot_order, Some(1));
        assert_eq!(vm.disks[0].format_claim, None);
        assert_eq!(vm.disks[1].bus, BusKind::Scsi);
        assert_eq!(vm.disks[1].controller, "scsi");
        for (unit, bytes) in [
            ("b", 1u64 << 30),
            ("KB", 1000),
            ("MB", 1_000_000),
            ("M", 1 << 20),
            ("TB", 1_000_000_000_000),
        ] {
            let doc = format!(
                "<domain><name>x</name><memory unit='{unit}'>{}</memory><os><type>hvm</type></os></domain>",
                if unit == "b" { 1u64 << 30 } else { 1 }
            );
            assert_eq!(
                parse(&doc, "u.xml").unwrap().memory_bytes,
                Some(bytes),
                "{unit}"
            );
        }
        let loader = "<domain><name>x</name><memory>1024</memory><os><type>hvm</type>\
            <loader readonly='yes'>/usr/share/edk2/x64/OVMF_CODE.fd</loader></os></domain>";
        assert_eq!(parse(loader, "l.xml").unwrap().firmware, Firmware::Uefi);
    }

    fn refusal(text: &str) -> String {
        parse(text, "bad.xml").unwrap_err().to_string()
    }

    fn with_disk(disk: &str) -> String {
        format!(
            "<domain><name>x</name><memory>1048576</memory><os><type>hvm</type></os>\
             <devices>{disk}</devices></domain>"
        )
    }

    #[test]
    fn non_file_disks_and_backing_chains_are_refused() {
        let error = refusal(&with_disk(
            "<disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdb'/></disk>",
        ));
        assert!(
            error.contains("disk vdb is a block device") && error.contains("only file disks"),
            "{error}"
        );
        let error = refusal(&with_disk(
            "<disk type='network' device='disk'><source protocol='rbd' name='p/i'/><target dev='vdc'/></disk>",
        ));
        assert!(error.contains("disk vdc is a network disk"), "{error}");
        let error = refusal(&with_disk(
            "<disk type='file' device='disk'><source file='/a.qcow2'/>\
             <backingStore type='file'><format type='qcow2'/><source file='/base.qcow2'/></backingStore>\
             <target dev='vda'/></disk>",
        ));
        assert!(error.contains("backing chain"), "{error}");
        let error = refusal(&with_disk(
            "<disk type='file' device='disk'><target dev='vda'/></disk>",
        ));
        assert!(error.contains("disk vda has no <source file>"), "{error}");
    }

    #[test]
    fn missing_and_absurd_values_are_refused() {
        assert!(refusal("<domain><memory>1</memory></domain>").contains("<name>"));
        assert!(refusal("<domain><name>x</name></domain>").contains("<memory>"));
        assert!(refusal("<network><name>x</name></network>").contains("<domain>"));
        let error = refusal(
            "<domain><name>x</name><memory unit='TiB'>17</memory><os><type>hvm</type></os></domain>",
        );
        assert!(
            error.contains("<memory>") && error.contains("16 TiB"),
            "{error}"
        );
        let error = refusal(
            "<domain><name>x</name><memory unit='EiB'>1</memory><os><type>hvm</type></os></domain>",
        );
        assert!(error.contains("unit='EiB'"), "{error}");
        let error = refusal(
            "<domain><name>x</name><memory>1024</memory><vcpu>2048</vcpu><os><type>hvm</type></os></domain>",
        );
        assert!(error.contains("<vcpu>"), "{error}");
        let error = refusal(
            "<domain type='lxc'><name>x</name><memory>1024</memory><os><type>exe</type></os></domain>",
        );
        assert!(error.contains("hvm"), "{error}");
        let error = refusal(&with_disk(
            "<interface type='network'><mac address='zz'/><source network='d'/></interface>",
        ));
        assert!(error.contains("mac address"), "{error}");
    }

    #[test]
    fn dtd_is_refused() {
        let text = "<!DOCTYPE domain [<!ENTITY n 'x'>]><domain><name>&n;</name></domain>";
        assert!(matches!(
            parse(text, "d.xml"),
            Err(ConvertError::Refused(_))
        ));
    }
}

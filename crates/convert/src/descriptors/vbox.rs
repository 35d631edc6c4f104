//! Reader of VirtualBox `.vbox` machine files (root `<VirtualBox>`,
//! namespace `http://www.virtualbox.org/`; namespaces are ignored).
//!
//! Layouts of VirtualBox 5, 6 and 7 are read: `<StorageControllers>` sits
//! under `<Machine>` (5/6) or `<Hardware>` (7), and the x86 settings of 7.1
//! under `<Hardware><Platform>`; elements are looked for in each place.
//!
//! What is read:
//!
//! * `Machine@name`, `@uuid` (braces stripped), `@OSType`; the root's
//!   settings `version` gives the platform `virtualbox-<version>`;
//! * `CPU@count` (default 1), `Memory@RAMSize` (MiB), `Firmware@type`
//!   (`EFI`, `EFI32`, `EFI64`, `EFIDUAL` → UEFI);
//! * `Boot/Order` (the lowest `position` with `device="HardDisk"`): that
//!   position becomes the boot order of the first hard disk attached;
//! * `MediaRegistry/HardDisks/HardDisk`: `uuid`, `location` (the file, as
//!   written: relative to the `.vbox` folder or absolute), `format`
//!   (lower-cased as the format claim), `type="Readonly"` → read-only. A
//!   `HardDisk` with child `HardDisk`s has differencing images (snapshots)
//!   and is refused;
//! * `StorageController` (`name`, `type` as the controller word: `AHCI` →
//!   SATA; `PIIX3`, `PIIX4`, `ICH6` → IDE; `LsiLogic`, `BusLogic`,
//!   `LsiLogicSas`, `VirtioSCSI` → SCSI; `NVMe` → NVMe) and its
//!   `AttachedDevice`s: `HardDisk` → a disk labelled
//!   `<controller name> port P device D`, `DVD`/`Floppy` → other devices;
//! * `Network/Adapter` with `enabled="true"`: `type` (`Am79C973` when
//!   absent, VirtualBox's default), `MACAddress` (`080027AABBCC` →
//!   `08:00:27:aa:bb:cc`) and the attachment: `NAT` → `NAT`, and the `name`
//!   of `BridgedInterface`, `InternalNetwork`, `HostOnlyInterface`,
//!   `HostOnlyNetwork`, `NATNetwork`, or `GenericInterface@driver`
//!   (`DisabledModes`, the settings of modes not in use, is not read);
//! * an enabled `AudioAdapter` (sound), USB controllers (`USB/Controllers`,
//!   or the older `USBController enabled="true"`) and enabled serial ports
//!   (`UART/Port`) → other devices.

use roxmltree::Node;

use super::vmx::{mac_from_hex12, memory_from_mib, vcpus_from};
use crate::foreign::{BusKind, Firmware, ForeignDevice, ForeignDisk, ForeignNic, ForeignVm};
use crate::xml::{self, attr, child, children};
use crate::{ConvertError, Result};

fn strip_braces(uuid: &str) -> &str {
    let uuid = uuid.trim();
    uuid.strip_prefix('{')
        .and_then(|u| u.strip_suffix('}'))
        .unwrap_or(uuid)
}

fn is_true(value: Option<&str>) -> bool {
    matches!(value, Some("true" | "1" | "yes"))
}

/// The first element named `name` among `nodes`' children (first match in
/// the first node that has one).
fn first_child<'a, 'i>(nodes: &[Node<'a, 'i>], name: &str) -> Option<Node<'a, 'i>> {
    nodes.iter().find_map(|n| child(*n, name))
}

/// A registered hard disk image.
struct Medium<'a> {
    uuid: &'a str,
    location: &'a str,
    format: Option<&'a str>,
    read_only: bool,
}

/// Reads the descriptor text (`what` names it in messages).
pub fn parse(text: &str, what: &str) -> Result<ForeignVm> {
    let document = xml::parse(text, what)?;
    let root = document.root_element();
    if root.tag_name().name() != "VirtualBox" {
        return Err(ConvertError::invalid(format!(
            "{what}: the root element is <{}>, not <VirtualBox>",
            root.tag_name().name()
        )));
    }
    let machine = child(root, "Machine").ok_or_else(|| {
        ConvertError::invalid(format!(
            "{what}: <VirtualBox> has no <Machine> (a global VirtualBox.xml, not a .vbox?)"
        ))
    })?;
    let hardware = child(machine, "Hardware")
        .ok_or_else(|| ConvertError::invalid(format!("{what}: <Machine> has no <Hardware>")))?;
    // VirtualBox 7.1 moved x86 settings (firmware, chipset…) under
    // <Platform>; look there as well as directly under <Hardware>.
    let mut places = vec![hardware];
    if let Some(platform) = child(hardware, "Platform") {
        places.push(platform);
        places.extend(child(platform, "x86"));
    }

    let mut vm = ForeignVm {
        name: attr(machine, "name").map(str::to_string),
        uuid: attr(machine, "uuid").map(|u| strip_braces(u).to_string()),
        guest_os: attr(machine, "OSType").map(str::to_string),
        platform: attr(root, "version").map(|v| format!("virtualbox-{v}")),
        ..ForeignVm::default()
    };
    vm.vcpus = Some(
        match first_child(&places, "CPU").and_then(|c| attr(c, "count")) {
            Some(count) => vcpus_from(count, "CPU@count", what)?,
            None => 1,
        },
    );
    if let Some(ram) = child(hardware, "Memory").and_then(|m| attr(m, "RAMSize")) {
        vm.memory_bytes = Some(memory_from_mib(ram, "Memory@RAMSize", what)?);
    }
    let firmware = first_child(&places, "Firmware").and_then(|f| attr(f, "type"));
    if firmware.is_some_and(|f| f.to_ascii_uppercase().starts_with("EFI")) {
        vm.firmware = Firmware::Uefi;
    }

    let media = read_media(machine, what)?;
    let controllers =
        child(machine, "StorageControllers").or_else(|| first_child(&places, "StorageControllers"));
    if let Some(controllers) = controllers {
        read_storage(controllers, &media, &mut vm, what)?;
    }
    let hdd_position = child(hardware, "Boot")
        .into_iter()
        .flat_map(|boot| children(boot, "Order"))
        .filter(|o| attr(*o, "device") == Some("HardDisk"))
        .filter_map(|o| attr(o, "position")?.trim().parse::<u32>().ok())
        .filter(|p| *p >= 1)
        .min();
    if let (Some(position), Some(first)) = (hdd_position, vm.disks.first_mut()) {
        first.boot_order = Some(position);
    }
    if let Some(network) = first_child(&places, "Network") {
        read_adapters(network, &mut vm, what)?;
    }
    read_other_devices(&places, &mut vm);
    Ok(vm)
}

fn read_media<'a>(machine: Node<'a, '_>, what: &str) -> Result<Vec<Medium<'a>>> {
    let mut media = Vec::new();
    let Some(hard_disks) = child(machine, "MediaRegistry").and_then(|r| child(r, "HardDisks"))
    else {
        return Ok(media);
    };
    for disk in children(hard_disks, "HardDisk") {
        let location = attr(disk, "location").unwrap_or("");
        if child(disk, "HardDisk").is_some() {
            return Err(ConvertError::refused(format!(
                "{what}: hard disk {location} has snapshots (differencing disks); \
                 delete or merge them in VirtualBox first"
            )));
        }
        let uuid = attr(disk, "uuid").map(strip_braces).unwrap_or("");
        if uuid.is_empty() || location.trim().is_empty() {
            return Err(ConvertError::invalid(format!(
                "{what}: a MediaRegistry <HardDisk> lacks its uuid or location"
            )));
        }
        media.push(Medium {
            uuid,
            location: location.trim(),
            format: attr(disk, "format"),
            read_only: attr(disk, "type").is_some_and(|t| t.eq_ignore_ascii_case("Readonly")),
        });
    }
    Ok(media)
}

fn read_storage(controllers: Node, media: &[Medium], vm: &mut ForeignVm, what: &str) -> Result<()> {
    for controller in children(controllers, "StorageController") {
        let name = attr(controller, "name").unwrap_or("");
        let kind = attr(controller, "type").unwrap_or("");
        let bus = match kind.to_ascii_lowercase().as_str() {
            "ahci" => BusKind::Sata,
            "piix3" | "piix4" | "ich6" => BusKind::Ide,
            "lsilogic" | "buslogic" | "lsilogicsas" | "virtioscsi" => BusKind::Scsi,
            "nvme" => BusKind::Nvme,
            _ => BusKind::Unknown,
        };
        for device in children(controller, "AttachedDevice") {
            let port = attr(device, "port").unwrap_or("0");
            let unit = attr(device, "device").unwrap_or("0");
            let label = format!("{name} port {port} device {unit}");
            match attr(device, "type").unwrap_or("") {
                "HardDisk" => {}
                "DVD" => {
                    vm.other_devices.push(ForeignDevice {
                        kind: "cdrom".into(),
                        label,
                    });
                    continue;
                }
                other => {
                    vm.other_devices.push(ForeignDevice {
                        kind: other.to_ascii_lowercase(),
                        label,
                    });
                    continue;
                }
            }
            let image = child(device, "Image")
                .and_then(|i| attr(i, "uuid"))
                .map(strip_braces)
                .ok_or_else(|| {
                    ConvertError::invalid(format!("{what}: hard disk at {label} has no <Image>"))
                })?;
            let medium = media
                .iter()
                .find(|m| m.uuid.eq_ignore_ascii_case(image))
                .ok_or_else(|| {
                    ConvertError::invalid(format!(
                        "{what}: hard disk at {label} uses medium {{{image}}}, which is not in \
                         the file's MediaRegistry (media registered only in VirtualBox.xml \
                         are not read)"
                    ))
                })?;
            vm.disks.push(ForeignDisk {
                label,
                file: medium.location.to_string(),
                controller: kind.to_string(),
                bus,
                boot_order: None,
                read_only: medium.read_only,
                format_claim: medium.format.map(|f| f.to_ascii_lowercase()),
                capacity_claim: None,
            });
        }
    }
    Ok(())
}

fn read_adapters(network: Node, vm: &mut ForeignVm, what: &str) -> Result<()> {
    for adapter in children(network, "Adapter") {
        if !is_true(attr(adapter, "enabled")) {
            continue;
        }
        let slot = attr(adapter, "slot").unwrap_or("0");
        let label = match slot.parse::<u32>() {
            Ok(n) if n < 1024 => format!("network adapter {}", n + 1),
            _ => format!("network adapter slot {slot}"),
        };
        let mac = match attr(adapter, "MACAddress") {
            Some(mac) if !mac.trim().is_empty() => {
                Some(mac_from_hex12(mac, &format!("{label} MACAddress"), what)?)
            }
            _ => None,
        };
        let network = adapter
            .children()
            .filter(|n| n.is_element())
            .find_map(|mode| match mode.tag_name().name() {
                "NAT" => Some("NAT".to_string()),
                "BridgedInterface" | "InternalNetwork" | "HostOnlyInterface"
                | "HostOnlyNetwork" | "NATNetwork" | "CloudNetwork" => {
                    attr(mode, "name").map(str::to_string)
                }
                "GenericInterface" => attr(mode, "driver").map(str::to_string),
                _ => None,
            });
        vm.nics.push(ForeignNic {
            label,
            model: attr(adapter, "type").unwrap_or("Am79C973").to_string(),
            mac,
            network,
        });
    }
    Ok(())
}

fn read_other_devices(places: &[Node], vm: &mut ForeignVm) {
    let hardware = places[0];
    if let Some(audio) = first_child(places, "AudioAdapter") {
        if is_true(attr(audio, "enabled")) {
            let model = attr(audio, "controller").unwrap_or("AC97");
            vm.other_devices.push(ForeignDevice {
                kind: "sound".into(),
                label: format!("audio {model}"),
            });
        }
    }
    if let Some(usb) = child(hardware, "USB") {
        for controller in child(usb, "Controllers")
            .into_iter()
            .flat_map(|c| children(c, "Controller"))
        {
            let name = attr(controller, "name").or_else(|| attr(controller, "type"));
            vm.other_devices.push(ForeignDevice {
                kind: "usb".into(),
                label: format!("USB controller {}", name.unwrap_or("")),
            });
        }
    }
    if let Some(old_usb) = child(hardware, "USBController") {
        if is_true(attr(old_usb, "enabled")) {
            vm.other_devices.push(ForeignDevice {
                kind: "usb".into(),
                label: "USB controller".into(),
            });
        }
    }
    if let Some(uart) = first_child(places, "UART") {
        for port in children(uart, "Port").filter(|p| is_true(attr(*p, "enabled"))) {
            vm.other_devices.push(ForeignDevice {
                kind: "serial".into(),
                label: format!("serial port {}", attr(port, "slot").unwrap_or("0")),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VirtualBox 7.0 machine (settings 1.19): storage under <Hardware>.
    const VBOX7: &str = r#"<?xml version="1.0"?>
<!--
** DO NOT EDIT THIS FILE.
** If you make changes to this file while any VirtualBox related application
** is running, your changes will be overwritten later, without taking effect.
-->
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Machine uuid="{3c8e4b2a-5d6f-4a1b-9c0d-7e8f9a0b1c2d}" name="ubuntu-dev" OSType="Ubuntu_64" snapshotFolder="Snapshots" lastStateChange="2024-03-01T10:00:00Z">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{aa11bb22-cc33-4d44-8e55-ff6677889900}" location="ubuntu-dev.vdi" format="VDI" type="Normal"/>
        <HardDisk uuid="{bb11bb22-cc33-4d44-8e55-ff6677889901}" location="/data/vms/shared.vmdk" format="VMDK" type="Readonly"/>
      </HardDisks>
      <DVDImages>
        <Image uuid="{cc11bb22-cc33-4d44-8e55-ff6677889902}" location="/isos/ubuntu-22.04.iso"/>
      </DVDImages>
    </MediaRegistry>
    <ExtraData>
      <ExtraDataItem name="GUI/LastGuestSizeHint" value="1280,800"/>
    </ExtraData>
    <Hardware>
      <CPU count="2">
        <PAE enabled="false"/>
        <LongMode enabled="true"/>
        <HardwareVirtExLargePages enabled="true"/>
      </CPU>
      <Memory RAMSize="4096"/>
      <Firmware type="EFI"/>
      <HID Pointing="USBTablet"/>
      <Boot>
        <Order position="1" device="DVD"/>
        <Order position="2" device="HardDisk"/>
        <Order position="3" device="None"/>
        <Order position="4" device="None"/>
      </Boot>
      <Display controller="VMSVGA" VRAMSize="16"/>
      <USB>
        <Controllers>
          <Controller name="OHCI" type="OHCI"/>
          <Controller name="EHCI" type="EHCI"/>
        </Controllers>
      </USB>
      <Network>
        <Adapter slot="0" enabled="true" MACAddress="080027AABBCC" type="82540EM">
          <NAT localhost-reachable="true"/>
        </Adapter>
        <Adapter slot="1" enabled="true" MACAddress="0800271A2B3C" type="virtio">
          <DisabledModes>
            <InternalNetwork name="intnet"/>
          </DisabledModes>
          <BridgedInterface name="enp3s0"/>
        </Adapter>
        <Adapter slot="2" MACAddress="080027000003" type="82540EM"/>
      </Network>
      <AudioAdapter codec="STAC9700" driver="Pulse" enabled="true" enabledIn="false"/>
      <Clipboard/>
      <StorageControllers>
        <StorageController name="SATA" type="AHCI" PortCount="2" useHostIOCache="false" Bootable="true" IDE0MasterEmulationPort="0">
          <AttachedDevice type="HardDisk" hotpluggable="false" port="0" device="0">
            <Image uuid="{aa11bb22-cc33-4d44-8e55-ff6677889900}"/>
          </AttachedDevice>
          <AttachedDevice passthrough="false" type="DVD" hotpluggable="false" port="1" device="0">
            <Image uuid="{cc11bb22-cc33-4d44-8e55-ff6677889902}"/>
          </AttachedDevice>
        </StorageController>
        <StorageController name="SCSI" type="LsiLogic" PortCount="16" useHostIOCache="true" Bootable="true">
          <AttachedDevice type="HardDisk" hotpluggable="false" port="3" device="0">
            <Image uuid="{BB11BB22-CC33-4D44-8E55-FF6677889901}"/>
          </AttachedDevice>
        </StorageController>
      </StorageControllers>
    </Hardware>
  </Machine>
</VirtualBox>
"#;

    #[test]
    fn virtualbox_7_machine_is_read() {
        let vm = parse(VBOX7, "ubuntu-dev.vbox").unwrap();
        assert_eq!(vm.name.as_deref(), Some("ubuntu-dev"));
        assert_eq!(
            vm.uuid.as_deref(),
            Some("3c8e4b2a-5d6f-4a1b-9c0d-7e8f9a0b1c2d")
        );
        assert_eq!(vm.guest_os.as_deref(), Some("Ubuntu_64"));
        assert_eq!(vm.platform.as_deref(), Some("virtualbox-1.19-linux"));
        assert_eq!(vm.vcpus, Some(2));
        assert_eq!(vm.memory_bytes, Some(4096 << 20));
        assert_eq!(vm.firmware, Firmware::Uefi);

        assert_eq!(vm.disks.len(), 2);
        let system = &vm.disks[0];
        assert_eq!(system.label, "SATA port 0 device 0");
        assert_eq!(system.file, "ubuntu-dev.vdi");
        assert_eq!(system.controller, "AHCI");
        assert_eq!(system.bus, BusKind::Sata);
        assert_eq!(system.format_claim.as_deref(), Some("vdi"));
        assert_eq!(system.boot_order, Some(2));
        let shared = &vm.disks[1];
        assert_eq!(shared.bus, BusKind::Scsi);
        assert_eq!(shared.controller, "LsiLogic");
        assert_eq!(shared.file, "/data/vms/shared.vmdk");
        assert!(shared.read_only);
        assert_eq!(shared.boot_order, None);

        assert_eq!(vm.nics.len(), 2);
        assert_eq!(vm.nics[0].label, "network adapter 1");
        assert_eq!(vm.nics[0].model, "82540EM");
        assert_eq!(vm.nics[0].mac.as_deref(), Some("08:00:27:aa:bb:cc"));
        assert_eq!(vm.nics[0].network.as_deref(), Some("NAT"));
        assert_eq!(vm.nics[1].model, "virtio");
        assert_eq!(vm.nics[1].network.as_deref(), Some("enp3s0"));

        let others: Vec<(&str, &str)> = vm
            .other_devices
            .iter()
            .map(|d| (d.kind.as_str(), d.label.as_str()))
            .collect();
        assert_eq!(
            others,
            [
                ("cdrom", "SATA port 1 device 0"),
                ("sound", "audio AC97"),
                ("usb", "USB controller OHCI"),
                ("usb", "USB controller EHCI"),
            ]
        );
    }

    /// VirtualBox 5/6: storage controllers under <Machine>, the old USB
    /// element, IDE, BIOS.
    #[test]
    fn virtualbox_5_layout_is_read() {
        let text = r#"<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-windows">
  <Machine uuid="{11111111-2222-3333-4444-555555555555}" name="xp" OSType="WindowsXP">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{99999999-2222-3333-4444-555555555555}" location="C:\VMs\xp\xp.vhd" format="VHD" type="Normal"/>
      </HardDisks>
    </MediaRegistry>
    <Hardware version="2">
      <CPU count="1"/>
      <Memory RAMSize="512"/>
      <Boot>
        <Order position="1" device="HardDisk"/>
      </Boot>
      <USBController enabled="true" enabledEhci="false"/>
      <Network>
        <Adapter slot="0" enabled="true" MACAddress="080027010203" cable="true">
          <HostOnlyInterface name="vboxnet0"/>
        </Adapter>
      </Network>
      <UART>
        <Port slot="0" enabled="true" IOBase="0x3f8" IRQ="4" hostMode="Disconnected"/>
        <Port slot="1" enabled="false" IOBase="0x2f8" IRQ="3" hostMode="Disconnected"/>
      </UART>
      <AudioAdapter controller="HDA" driver="DirectSound" enabled="false"/>
    </Hardware>
    <StorageControllers>
      <StorageController name="IDE Controller" type="PIIX4" PortCount="2">
        <AttachedDevice type="HardDisk" port="0" device="0">
          <Image uuid="{99999999-2222-3333-4444-555555555555}"/>
        </AttachedDevice>
      </StorageController>
      <StorageController name="Floppy" type="I82078" PortCount="1">
        <AttachedDevice type="Floppy" port="0" device="0"/>
      </StorageController>
    </StorageControllers>
  </Machine>
</VirtualBox>"#;
        let vm = parse(text, "xp.vbox").unwrap();
        assert_eq!(vm.firmware, Firmware::Bios);
        assert_eq!(vm.disks.len(), 1);
        assert_eq!(vm.disks[0].label, "IDE Controller port 0 device 0");
        assert_eq!(vm.disks[0].file, "C:\\VMs\\xp\\xp.vhd");
        assert_eq!(vm.disks[0].bus, BusKind::Ide);
        assert_eq!(vm.disks[0].controller, "PIIX4");
        assert_eq!(vm.disks[0].format_claim.as_deref(), Some("vhd"));
        assert_eq!(vm.disks[0].boot_order, Some(1));
        assert_eq!(vm.nics[0].model, "Am79C973");
        assert_eq!(vm.nics[0].network.as_deref(), Some("vboxnet0"));
        let kinds: Vec<&str> = vm.other_devices.iter().map(|d| d.kind.as_str()).collect();
        assert_eq!(kinds, ["floppy", "usb", "serial"]);
    }

    fn minimal(hardware: &str, registry: &str) -> String {
        format!(
            r#"<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Machine uuid="{{3c8e4b2a-5d6f-4a1b-9c0d-7e8f9a0b1c2d}}" name="m" OSType="Linux_64">
    <MediaRegistry><HardDisks>{registry}</HardDisks></MediaRegistry>
    <Hardware>{hardware}</Hardware>
  </Machine>
</VirtualBox>"#
        )
    }

    #[test]
    fn snapshots_are_refused() {
        let registry = r#"<HardDisk uuid="{aa11bb22-cc33-4d44-8e55-ff6677889900}" location="m.vdi" format="VDI">
          <HardDisk uuid="{dd11bb22-cc33-4d44-8e55-ff6677889900}" location="Snapshots/{dd11bb22-cc33-4d44-8e55-ff6677889900}.vdi" format="VDI"/>
        </HardDisk>"#;
        let error = parse(&minimal("<Memory RAMSize=\"1024\"/>", registry), "m.vbox")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("has snapshots (differencing disks)")
                && error.contains("delete or merge them in VirtualBox first"),
            "{error}"
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_attribute() {
        let error = parse(&minimal("<Memory RAMSize=\"20000000\"/>", ""), "m.vbox")
            .unwrap_err()
            .to_string();
        assert!(error.contains("Memory@RAMSize"), "{error}");
        let error = parse(&minimal("<CPU count=\"2000\"/>", ""), "m.vbox")
            .unwrap_err()
            .to_string();
        assert!(error.contains("CPU@count"), "{error}");
        let error = parse(
            &minimal(
                r#"<Network><Adapter slot="0" enabled="true" MACAddress="0800"/></Network>"#,
                "",
            ),
            "m.vbox",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("MACAddress"), "{error}");
        let storage = r#"<StorageControllers><StorageController name="SATA" type="AHCI">
            <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{00000000-0000-0000-0000-000000000001}"/></AttachedDevice>
            </StorageController></StorageControllers>"#;
        let error = parse(&minimal(storage, ""), "m.vbox")
            .unwrap_err()
            .to_string();
        assert!(error.contains("MediaRegistry"), "{error}");
        let error = parse("<VirtualBox><Global/></VirtualBox>", "VirtualBox.xml")
            .unwrap_err()
            .to_string();
        assert!(error.contains("<Machine>"), "{error}");
    }
}

//! Reader of Hyper-V virtual machine configurations in the XML format of
//! Windows Server 2008 R2 – 2012 R2 (`Virtual Machines\<GUID>.xml`, root
//! `<configuration>`, values written as `<name type="string">web</name>`).
//! The binary `.vmcx` of Hyper-V 2016 and later is not read: export such a
//! VM or convert its disks.
//!
//! Best effort, because Microsoft never documented the format. What is read:
//!
//! * `properties/name` → name, `properties/global_id` (or
//!   `settings/global_id`) → uuid;
//! * `settings/processors/count` (default 1), `settings/memory/bank/size`
//!   (MiB, the startup memory; required);
//! * the generation: an element named `subtype` (2012 R2 writes
//!   `properties/subtype`, `1` for generation 2), or any value reading
//!   `Microsoft:Hyper-V:SubType:2` → UEFI; otherwise BIOS. The platform is
//!   `hyper-v-gen1` / `hyper-v-gen2`;
//! * drives under the emulated IDE controller element
//!   `_83f8638b-8dca-4152-9eda-2ca8b33039b4_` (IDE, controller word `ide`)
//!   and the synthetic SCSI element `_d422512d-2bf2-4752-809d-7b82b5fcb1b4_`
//!   (SCSI, `synthetic scsi`), as `controllerN/driveM` with `pathname` and
//!   `type`: `VHD` is a disk (file = the pathname as written; format claim
//!   from the extension, `.avhd(x)` checkpoints refused), `ISO` a CD-ROM,
//!   `NONE` an empty slot, a pass-through physical disk is refused. Labels
//!   read `ide controller0 drive1`. Boot order is not read;
//! * NICs: any element holding a MAC (`MacAddress`, `mac_address`, or
//!   `address` beside `friendly_name`/`is_synthetic`). The model is
//!   `legacy` when `is_synthetic` says false or the manifest names the
//!   device an emulated/legacy adapter, else `synthetic`; the MAC (12 hex
//!   digits, `000000000000` meaning "not assigned yet") is written
//!   `00:15:5d:…`; the network is `AltSwitchName`, else `SwitchName`; the
//!   label is `FriendlyName`.

use roxmltree::Node;

use super::vmx::{is_colon_mac, mac_from_hex12, memory_from_mib, vcpus_from};
use crate::foreign::{BusKind, Firmware, ForeignDevice, ForeignDisk, ForeignNic, ForeignVm};
use crate::xml::{self, child, child_text};
use crate::{ConvertError, Result};

/// The element holding the emulated IDE controllers' drives.
const IDE_ELEMENT: &str = "_83f8638b-8dca-4152-9eda-2ca8b33039b4_";
/// The element holding the synthetic SCSI controllers' drives.
const SCSI_ELEMENT: &str = "_d422512d-2bf2-4752-809d-7b82b5fcb1b4_";

/// The last component of a Windows (or POSIX) path as written in a Hyper-V
/// configuration: `C:\VMs\web\disk.vhdx` → `disk.vhdx`.
pub fn file_name_of(pathname: &str) -> &str {
    pathname.rsplit(['\\', '/']).next().unwrap_or(pathname)
}

/// An element name lower-cased and without `_`, so that `MacAddress` and
/// `mac_address` compare equal.
fn normalized(node: Node) -> String {
    node.tag_name()
        .name()
        .chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The trimmed text of the first child whose normalized name is `name`.
fn child_value<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.children()
        .filter(|n| n.is_element())
        .find(|n| normalized(*n) == name)
        .map(|n| n.text().unwrap_or("").trim())
}

/// Reads the descriptor text (`what` names it in messages).
pub fn parse(text: &str, what: &str) -> Result<ForeignVm> {
    let document = xml::parse(text, what)?;
    let root = document.root_element();
    if root.tag_name().name() != "configuration" {
        return Err(ConvertError::invalid(format!(
            "{what}: the root element is <{}>, not a Hyper-V <configuration>",
            root.tag_name().name()
        )));
    }
    let properties = child(root, "properties");
    let settings = child(root, "settings").ok_or_else(|| {
        ConvertError::invalid(format!(
            "{what}: <configuration> has no <settings>: not a Hyper-V VM configuration"
        ))
    })?;
    let mut vm = ForeignVm {
        name: properties
            .and_then(|p| child_text(p, "name"))
            .filter(|n| !n.is_empty())
            .map(str::to_string),
        uuid: properties
            .and_then(|p| child_text(p, "global_id"))
            .or_else(|| child_text(settings, "global_id"))
            .filter(|u| !u.is_empty())
            .map(|u| u.trim_matches(['{', '}']).to_string()),
        ..ForeignVm::default()
    };
    vm.vcpus = Some(
        match child(settings, "processors").and_then(|p| child_text(p, "count")) {
            Some(count) => vcpus_from(count, "settings/processors/count", what)?,
            None => 1,
        },
    );
    let size = child(settings, "memory")
        .and_then(|m| child(m, "bank"))
        .and_then(|b| child_text(b, "size"))
        .ok_or_else(|| ConvertError::invalid(format!("{what}: no settings/memory/bank/size")))?;
    vm.memory_bytes = Some(memory_from_mib(size, "settings/memory/bank/size", what)?);

    let generation2 = root.descendants().filter(|n| n.is_element()).any(|n| {
        let text = n.text().unwrap_or("").trim();
        (normalized(n) == "subtype" && text == "1")
            || text.eq_ignore_ascii_case("Microsoft:Hyper-V:SubType:2")
    });
    vm.firmware = if generation2 {
        Firmware::Uefi
    } else {
        Firmware::Bios
    };
    vm.platform = Some(
        if generation2 {
            "hyper-v-gen2"
        } else {
            "hyper-v-gen1"
        }
        .into(),
    );

    for element in root.children().filter(|n| n.is_element()) {
        let name = element.tag_name().name();
        if name.eq_ignore_ascii_case(IDE_ELEMENT) {
            read_drives(element, "ide", BusKind::Ide, &mut vm, what)?;
        } else if name.eq_ignore_ascii_case(SCSI_ELEMENT) {
            read_drives(element, "synthetic scsi", BusKind::Scsi, &mut vm, what)?;
        }
    }
    read_nics(root, &mut vm, what)?;
    Ok(vm)
}

/// Numbered children `<prefix>N`, in order of N.
fn numbered<'a, 'i>(node: Node<'a, 'i>, prefix: &str) -> Vec<(u32, Node<'a, 'i>)> {
    let mut found: Vec<(u32, Node)> = node
        .children()
        .filter(|n| n.is_element())
        .filter_map(|n| {
            let digits = n.tag_name().name().strip_prefix(prefix)?;
            if digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some((digits.parse().ok()?, n))
        })
        .collect();
    found.sort_by_key(|(n, _)| *n);
    found
}

fn read_drives(
    element: Node,
    controller_word: &str,
    bus: BusKind,
    vm: &mut ForeignVm,
    what: &str,
) -> Result<()> {
    let short = if bus == BusKind::Ide { "ide" } else { "scsi" };
    for (c, controller) in numbered(element, "controller") {
        for (d, drive) in numbered(controller, "drive") {
            let label = format!("{short} controller{c} drive{d}");
            let pathname = child_text(drive, "pathname").unwrap_or("");
            let kind = child_text(drive, "type").unwrap_or("").to_ascii_uppercase();
            match kind.as_str() {
                "VHD" => {}
                "" | "NONE" => continue,
                "ISO" => {
                    vm.other_devices.push(ForeignDevice {
                        kind: "cdrom".into(),
                        label,
                    });
                    continue;
                }
                "PASSTHRU" | "PASSTHROUGH" | "PHYSICAL" => {
                    return Err(ConvertError::refused(format!(
                        "{what}: {label} is a pass-through physical disk; only VHD/VHDX files are imported"
                    )))
                }
                other => {
                    vm.other_devices.push(ForeignDevice {
                        kind: other.to_ascii_lowercase(),
                        label,
                    });
                    continue;
                }
            }
            if pathname.is_empty() {
                return Err(ConvertError::invalid(format!(
                    "{what}: {label} is a VHD drive without a pathname"
                )));
            }
            let extension = file_name_of(pathname)
                .rsplit_once('.')
                .map(|(_, ext)| ext.to_ascii_lowercase());
            if matches!(extension.as_deref(), Some("avhd" | "avhdx")) {
                return Err(ConvertError::refused(format!(
                    "{what}: {label} is a checkpoint (differencing disk) {pathname}; \
                     delete or merge the VM's checkpoints in Hyper-V first"
                )));
            }
            vm.disks.push(ForeignDisk {
                label,
                file: pathname.to_string(),
                controller: controller_word.to_string(),
                bus,
                boot_order: None,
                read_only: false,
                format_claim: extension.filter(|e| e == "vhd" || e == "vhdx"),
                capacity_claim: None,
            });
        }
    }
    Ok(())
}

/// The manifest's device name for an instance GUID (`_<guid>_` element).
fn manifest_name<'a>(root: Node<'a, '_>, element_name: &str) -> Option<&'a str> {
    let guid = element_name.trim_matches('_');
    let manifest = child(root, "manifest")?;
    manifest
        .children()
        .filter(|n| n.is_element())
        .find(|vdev| {
            child_text(*vdev, "instance")
                .is_some_and(|i| i.trim_matches(['{', '}']).eq_ignore_ascii_case(guid))
        })
        .and_then(|vdev| child_text(vdev, "name"))
}

fn read_nics(root: Node, vm: &mut ForeignVm, what: &str) -> Result<()> {
    for node in root.descendants().filter(|n| n.is_element()) {
        let names: Vec<String> = node
            .children()
            .filter(|n| n.is_element())
            .map(normalized)
            .collect();
        let has = |n: &str| names.iter().any(|x| x == n);
        let mac_key = if has("macaddress") {
            "macaddress"
        } else if has("address") && (has("friendlyname") || has("issynthetic")) {
            "address"
        } else {
            continue;
        };
        let element = node.tag_name().name();
        let label = child_value(node, "friendlyname")
            .filter(|n| !n.is_empty())
            .unwrap_or(element)
            .to_string();
        let raw_mac = child_value(node, mac_key).unwrap_or("");
        let mac =
            if raw_mac.is_empty() || raw_mac.bytes().all(|b| b == b'0' || b == b':' || b == b'-') {
                None
            } else if is_colon_mac(raw_mac) {
                Some(raw_mac.replace('-', ":").to_ascii_lowercase())
            } else {
                Some(mac_from_hex12(
                    raw_mac,
                    &format!("{label} {mac_key}"),
                    what,
                )?)
            };
        let synthetic = match child_value(node, "issynthetic").map(str::to_ascii_lowercase) {
            Some(flag) => flag != "false" && flag != "0",
            None => !manifest_name(root, element).is_some_and(|name| {
                let name = name.to_ascii_lowercase();
                name.contains("emulated") || name.contains("legacy")
            }),
        };
        let network = ["altswitchname", "switchname"].iter().find_map(|key| {
            node.descendants()
                .filter(|n| n.is_element() && normalized(*n) == *key)
                .filter_map(|n| n.text().map(str::trim))
                .find(|t| !t.is_empty())
                .map(str::to_string)
        });
        vm.nics.push(ForeignNic {
            label,
            model: if synthetic { "synthetic" } else { "legacy" }.into(),
            mac,
            network,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Windows Server 2012 R2 generation 1 VM, trimmed.
    const HYPERV_2012: &str = r#"<?xml version="1.0" encoding="UTF-16" standalone="yes"?>
<configuration>
  <_0a1d2e3f-4b5c-4d6e-8f70-9a8b7c6d5e4f_>
    <ChannelInstanceGuid type="string">{1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9}</ChannelInstanceGuid>
    <Connection>
      <AltPortName type="string">Dynamic Ethernet Switch Port</AltPortName>
      <AltSwitchName type="string">External LAN</AltSwitchName>
      <PortName type="string">5E3F1B2C-0D4A-4E8B-9C7D-6A5B4C3D2E1F</PortName>
      <SwitchName type="string">8A7B6C5D-4E3F-4A1B-9C0D-1E2F3A4B5C6D</SwitchName>
    </Connection>
    <FriendlyName type="string">Network Adapter</FriendlyName>
    <IsConnected type="bool">True</IsConnected>
    <MacAddress type="string">00155D0A0B0C</MacAddress>
    <MacAddressIsStatic type="bool">False</MacAddressIsStatic>
  </_0a1d2e3f-4b5c-4d6e-8f70-9a8b7c6d5e4f_>
  <_5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e_>
    <ChannelInstanceGuid type="string">{00000000-0000-0000-0000-000000000000}</ChannelInstanceGuid>
    <Connection>
      <AltSwitchName type="string">Internal</AltSwitchName>
    </Connection>
    <FriendlyName type="string">Legacy Network Adapter</FriendlyName>
    <MacAddress type="string">000000000000</MacAddress>
  </_5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e_>
  <_83F8638B-8DCA-4152-9EDA-2CA8B33039B4_>
    <controller0>
      <drive0>
        <iops_limit type="integer">0</iops_limit>
        <pathname type="string">D:\Hyper-V\Virtual Hard Disks\web01.vhdx</pathname>
        <type type="string">VHD</type>
      </drive0>
      <drive1>
        <pathname type="string">D:\ISO\en_windows_server_2012_r2.iso</pathname>
        <type type="string">ISO</type>
      </drive1>
    </controller0>
    <controller1>
      <drive0>
        <pathname type="string"></pathname>
        <type type="string">NONE</type>
      </drive0>
    </controller1>
  </_83F8638B-8DCA-4152-9EDA-2CA8B33039B4_>
  <_d422512d-2bf2-4752-809d-7b82b5fcb1b4_>
    <controller0>
      <channel_instance_guid type="string">{9c8b7a6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d}</channel_instance_guid>
      <drive0>
        <pathname type="string">D:\Hyper-V\Virtual Hard Disks\web01-data.vhd</pathname>
        <type type="string">VHD</type>
      </drive0>
    </controller0>
  </_d422512d-2bf2-4752-809d-7b82b5fcb1b4_>
  <global_settings>
    <devices>
      <allow_reduced_fc_redundancy type="bool">False</allow_reduced_fc_redundancy>
    </devices>
  </global_settings>
  <manifest>
    <vdev00>
      <device type="string">{f8e2a3b1-...}</device>
      <instance type="string">0a1d2e3f-4b5c-4d6e-8f70-9a8b7c6d5e4f</instance>
      <name type="string">Microsoft Synthetic Ethernet Port</name>
    </vdev00>
    <vdev01>
      <device type="string">{2c4d...}</device>
      <instance type="string">5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e</instance>
      <name type="string">Microsoft Emulated Ethernet Port</name>
    </vdev01>
  </manifest>
  <properties>
    <creation_time type="bytes">AKfS3k5u0AE=</creation_time>
    <global_id type="string">7E1D2C3B-4A59-4687-9A5B-0C1D2E3F4A5B</global_id>
    <highly_available type="bool">False</highly_available>
    <name type="string">web01</name>
    <notes type="string"></notes>
    <subtype type="integer">0</subtype>
    <type_id type="string">Virtual Machines</type_id>
    <version type="integer">1280</version>
  </properties>
  <settings>
    <bios>
      <num_lock type="bool">False</num_lock>
    </bios>
    <memory>
      <bank>
        <dynamic_memory_enabled type="bool">True</dynamic_memory_enabled>
        <limit type="integer">1048576</limit>
        <reservation type="integer">512</reservation>
        <size type="integer">2048</size>
        <target_memory_buffer type="integer">20</target_memory_buffer>
      </bank>
    </memory>
    <processors>
      <count type="integer">2</count>
      <limit type="integer">100000</limit>
    </processors>
  </settings>
</configuration>
"#;

    #[test]
    fn hyperv_2012_generation_1_is_read() {
        let vm = parse(HYPERV_2012, "7E1D2C3B.xml").unwrap();
        assert_eq!(vm.name.as_deref(), Some("web01"));
        assert_eq!(
            vm.uuid.as_deref(),
            Some("7E1D2C3B-4A59-4687-9A5B-0C1D2E3F4A5B")
        );
        assert_eq!(vm.vcpus, Some(2));
        assert_eq!(vm.memory_bytes, Some(2048 << 20));
        assert_eq!(vm.firmware, Firmware::Bios);
        assert_eq!(vm.platform.as_deref(), Some("hyper-v-gen1"));

        assert_eq!(vm.disks.len(), 2);
        assert_eq!(vm.disks[0].label, "ide controller0 drive0");
        assert_eq!(
            vm.disks[0].file,
            "D:\\Hyper-V\\Virtual Hard Disks\\web01.vhdx"
        );
        assert_eq!(vm.disks[0].bus, BusKind::Ide);
        assert_eq!(vm.disks[0].controller, "ide");
        assert_eq!(vm.disks[0].format_claim.as_deref(), Some("vhdx"));
        assert_eq!(vm.disks[1].label, "scsi controller0 drive0");
        assert_eq!(vm.disks[1].bus, BusKind::Scsi);
        assert_eq!(vm.disks[1].controller, "synthetic scsi");
        assert_eq!(vm.disks[1].format_claim.as_deref(), Some("vhd"));
        assert_eq!(file_name_of(&vm.disks[1].file), "web01-data.vhd");

        assert_eq!(vm.other_devices.len(), 1);
        assert_eq!(vm.other_devices[0].kind, "cdrom");
        assert_eq!(vm.other_devices[0].label, "ide controller0 drive1");

        assert_eq!(vm.nics.len(), 2);
        assert_eq!(vm.nics[0].label, "Network Adapter");
        assert_eq!(vm.nics[0].model, "synthetic");
        assert_eq!(vm.nics[0].mac.as_deref(), Some("00:15:5d:0a:0b:0c"));
        assert_eq!(vm.nics[0].network.as_deref(), Some("External LAN"));
        assert_eq!(vm.nics[1].model, "legacy");
        assert_eq!(vm.nics[1].mac, None);
        assert_eq!(vm.nics[1].network.as_deref(), Some("Internal"));
    }

    fn config(extra: &str, memory: &str) -> String {
        format!(
            r#"<configuration>
  <properties><name type="string">g2</name><subtype type="integer">1</subtype></properties>
  <settings><memory><bank><size type="integer">{memory}</size></bank></memory>
    <processors><count type="integer">4</count></processors></settings>
  {extra}
</configuration>"#
        )
    }

    #[test]
    fn generation_2_and_snake_case_nics() {
        let nic = r#"<_11111111-2222-3333-4444-555555555555_>
            <friendly_name type="string">LAN</friendly_name>
            <is_synthetic type="bool">False</is_synthetic>
            <address type="string">00-15-5D-01-02-03</address>
            <switch_name type="string">vSwitch</switch_name>
          </_11111111-2222-3333-4444-555555555555_>"#;
        let vm = parse(&config(nic, "1024"), "g2.xml").unwrap();
        assert_eq!(vm.firmware, Firmware::Uefi);
        assert_eq!(vm.platform.as_deref(), Some("hyper-v-gen2"));
        assert_eq!(vm.vcpus, Some(4));
        assert_eq!(vm.nics[0].model, "legacy");
        assert_eq!(vm.nics[0].mac.as_deref(), Some("00:15:5d:01:02:03"));
        assert_eq!(vm.nics[0].network.as_deref(), Some("vSwitch"));

        let wmi = "<configuration><global_settings><subtype>Microsoft:Hyper-V:SubType:2</subtype>\
            </global_settings><settings><memory><bank><size>512</size></bank></memory></settings>\
            </configuration>";
        assert_eq!(parse(wmi, "w.xml").unwrap().firmware, Firmware::Uefi);
    }

    #[test]
    fn refusals() {
        let checkpoint = r#"<_d422512d-2bf2-4752-809d-7b82b5fcb1b4_><controller0><drive0>
            <pathname type="string">C:\VMs\web_6A1B2C3D-0000-4000-8000-000000000000.avhdx</pathname>
            <type type="string">VHD</type></drive0></controller0></_d422512d-2bf2-4752-809d-7b82b5fcb1b4_>"#;
        let error = parse(&config(checkpoint, "1024"), "c.xml")
            .unwrap_err()
            .to_string();
        assert!(error.contains("checkpoint"), "{error}");

        let error = parse(&config("", "99999999999"), "c.xml")
            .unwrap_err()
            .to_string();
        assert!(error.contains("settings/memory/bank/size"), "{error}");

        let error = parse(
            "<configuration><settings><processors><count>2</count></processors></settings></configuration>",
            "c.xml",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("settings/memory/bank/size"), "{error}");

        let bad_mac = r#"<_1_><FriendlyName>n</FriendlyName><MacAddress>00155D</MacAddress></_1_>"#;
        let error = parse(&config(bad_mac, "1024"), "c.xml")
            .unwrap_err()
            .to_string();
        assert!(error.contains("MAC"), "{error}");

        let error = parse("<VirtualBox/>", "c.xml").unwrap_err().to_string();
        assert!(error.contains("<configuration>"), "{error}");
    }

    #[test]
    fn file_name_of_takes_the_last_component() {
        assert_eq!(file_name_of("C:\\VMs\\web\\disk.vhdx"), "disk.vhdx");
        assert_eq!(file_name_of("/srv/vms/disk.vhd"), "disk.vhd");
        assert_eq!(file_name_of("\\\\server\\share/mixed\\d.vhdx"), "d.vhdx");
        assert_eq!(file_name_of("plain.vhdx"), "plain.vhdx");
    }
}

//! Writer of OVF 1.0 envelopes, in the shape VMware's ovftool/vSphere and
//! VirtualBox both import: `References`, `DiskSection`, `NetworkSection` and
//! one `VirtualSystem` whose `VirtualHardwareSection` lists CPU, memory,
//! one storage controller per bus kind used (more when one fills up), the
//! disks and the NICs. CIM properties are written in schema (alphabetical)
//! order, which ovftool's validation insists on.
//!
//! Device mapping (Ferry → VMware words):
//!
//! * `virtio` disks → a `VirtualSCSI` (paravirtual SCSI) controller,
//!   ResourceType 6: VMware has no virtio, and PVSCSI is its nearest
//!   paravirtual disk path (Ferry's import maps it back to virtio);
//! * `scsi` disks → an `lsilogic` controller, ResourceType 6 (imported back
//!   as `scsi`);
//! * `sata` → an AHCI controller (ResourceType 20, `vmware.sata.ahci`);
//! * `ide` → an IDE controller (ResourceType 5), two disks each;
//! * NIC `virtio` → `VmxNet3`, `e1000` → `E1000`, with the spec's MAC and
//!   connected to the NIC's cluster network name, or `VM Network` for any
//!   other backend;
//! * firmware is written as BIOS (Ferry boots SeaBIOS); no boot order is
//!   written (there is no form both importers read), so the boot disk
//!   should be the first disk.
//!
//! Disk formats: `vmdk` files get VMware's streamOptimized URI (the only
//! format both importers take); `qcow2` gets the URI oVirt uses, anything
//! else a `urn:ferry:format:<name>` the importers will name in their error.

use super::ExportDisk;
use ferry_core::spec::{DiskBus, NicModel, VmSpec};
use std::fmt::Write;

/// The network a NIC whose backend is not a cluster network is put on
/// (vSphere's default port group name).
pub const DEFAULT_NETWORK: &str = "VM Network";

const VMDK_STREAM_OPTIMIZED: &str =
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";
const QCOW2_URI: &str = "http://www.gnome.org/~markmc/qcow-image-format.html";

/// `text` escaped for XML character data and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Line breaks and tabs in attribute values would be normalised
            // to spaces by a reader; keep them as written.
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            // Other control characters are not allowed in XML 1.0 at all.
            c if (c as u32) < 0x20 => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// The kind of controller a disk bus is exported on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    /// VMware's paravirtual SCSI, for virtio disks.
    ParavirtualScsi,
    Scsi,
    Sata,
    Ide,
}

impl Controller {
    fn of(bus: DiskBus) -> Controller {
        match bus {
            DiskBus::Virtio => Controller::ParavirtualScsi,
            DiskBus::Scsi => Controller::Scsi,
            DiskBus::Sata => Controller::Sata,
            DiskBus::Ide => Controller::Ide,
        }
    }

    /// Disks one controller takes.
    fn capacity(self) -> usize {
        match self {
            // Units 0–15, 7 being the controller itself.
            Controller::Scsi | Controller::ParavirtualScsi => 15,
            Controller::Sata => 30,
            Controller::Ide => 2,
        }
    }

    /// The unit number of the `n`th disk on one controller.
    fn unit(self, n: usize) -> usize {
        match self {
            Controller::Scsi | Controller::ParavirtualScsi if n >= 7 => n + 1,
            _ => n,
        }
    }
}

/// An XML element with `rasd:` properties, written in the given order
/// (callers keep it alphabetical).
fn item(out: &mut String, properties: &[(&str, String)]) {
    out.push_str("      <Item>\n");
    for (name, value) in properties {
        let _ = writeln!(out, "        <rasd:{name}>{}</rasd:{name}>", escape(value));
    }
    out.push_str("      </Item>\n");
}

fn network_of(nic: &ferry_core::spec::NicSpec) -> &str {
    nic.backend.network().unwrap_or(DEFAULT_NETWORK)
}

/// The OVF text describing `spec` with `disks` (in guest order; their
/// `file_name`s are the hrefs, plain names next to the `.ovf`).
pub fn write(spec: &VmSpec, disks: &[ExportDisk]) -> String {
    let mut out = String::new();
    out.push_str(r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
"#);

    // References and DiskSection.
    out.push_str("  <References>\n");
    for (index, disk) in disks.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"    <File ovf:href="{}" ovf:id="file{}" ovf:size="{}"/>"#,
            escape(&disk.file_name),
            index + 1,
            disk.file_size_bytes
        );
    }
    out.push_str("  </References>\n");
    out.push_str("  <DiskSection>\n    <Info>Virtual disk information</Info>\n");
    for (index, disk) in disks.iter().enumerate() {
        let format = match disk.format.as_str() {
            "vmdk" => VMDK_STREAM_OPTIMIZED.to_string(),
            "qcow2" => QCOW2_URI.to_string(),
            other => format!("urn:ferry:format:{other}"),
        };
        let _ = writeln!(
            out,
            r#"    <Disk ovf:capacity="{}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk{n}" ovf:fileRef="file{n}" ovf:format="{}"/>"#,
            disk.capacity_bytes,
            escape(&format),
            n = index + 1
        );
    }
    out.push_str("  </DiskSection>\n");

    // NetworkSection: each distinct network once, in NIC order.
    let mut networks: Vec<&str> = Vec::new();
    for nic in &spec.nics {
        let network = network_of(nic);
        if !networks.contains(&network) {
            networks.push(network);
        }
    }
    if !networks.is_empty() {
        out.push_str("  <NetworkSection>\n    <Info>The list of logical networks</Info>\n");
        for network in &networks {
            let network = escape(network);
            let _ = writeln!(
                out,
                "    <Network ovf:name=\"{network}\">\n      <Description>The {network} network</Description>\n    </Network>"
            );
        }
        out.push_str("  </NetworkSection>\n");
    }

    let name = escape(&spec.name);
    let _ = write!(
        out,
        r#"  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="101" vmw:osType="otherLinux64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Other Linux (64-bit)</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>
      </System>
"#
    );

    let mut next_id = 1u32;
    let mut take_id = || {
        let id = next_id;
        next_id += 1;
        id
    };

    let vcpus = spec.vcpus;
    item(
        &mut out,
        &[
            ("AllocationUnits", "hertz * 10^6".into()),
            ("Description", "Number of Virtual CPUs".into()),
            ("ElementName", format!("{vcpus} virtual CPU(s)")),
            ("InstanceID", take_id().to_string()),
            ("ResourceType", "3".into()),
            ("VirtualQuantity", vcpus.to_string()),
        ],
    );
    let memory_mib = spec.memory_bytes.div_ceil(1 << 20);
    item(
        &mut out,
        &[
            ("AllocationUnits", "byte * 2^20".into()),
            ("Description", "Memory Size".into()),
            ("ElementName", format!("{memory_mib}MB of memory")),
            ("InstanceID", take_id().to_string()),
            ("ResourceType", "4".into()),
            ("VirtualQuantity", memory_mib.to_string()),
        ],
    );

    // Place every disk: (controller kind, controller number, unit).
    let mut per_kind: Vec<(Controller, usize)> = Vec::new();
    let placements: Vec<(Controller, usize, usize)> = disks
        .iter()
        .map(|disk| {
            let kind = Controller::of(disk.bus);
            let n = match per_kind.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, count)) => {
                    *count += 1;
                    *count - 1
                }
                None => {
                    per_kind.push((kind, 1));
                    0
                }
            };
            (kind, n / kind.capacity(), kind.unit(n % kind.capacity()))
        })
        .collect();

    // Controllers, kinds in order of first use.
    let mut controller_ids: Vec<((Controller, usize), u32)> = Vec::new();
    // Both kinds of SCSI controller share VMware's SCSI bus numbers.
    let mut scsi_buses = 0usize;
    for (kind, count) in &per_kind {
        for number in 0..count.div_ceil(kind.capacity()) {
            let id = take_id();
            controller_ids.push(((*kind, number), id));
            let properties: Vec<(&str, String)> = match kind {
                Controller::Scsi | Controller::ParavirtualScsi => {
                    let bus = scsi_buses;
                    scsi_buses += 1;
                    let subtype = if *kind == Controller::Scsi {
                        "lsilogic"
                    } else {
                        "VirtualSCSI"
                    };
                    vec![
                        ("Address", bus.to_string()),
                        ("Description", "SCSI Controller".into()),
                        ("ElementName", format!("SCSI Controller {bus}")),
                        ("InstanceID", id.to_string()),
                        ("ResourceSubType", subtype.into()),
                        ("ResourceType", "6".into()),
                    ]
                }
                Controller::Sata => vec![
                    ("Address", number.to_string()),
                    ("Description", "SATA Controller".into()),
                    ("ElementName", format!("SATA Controller {number}")),
                    ("InstanceID", id.to_string()),
                    ("ResourceSubType", "vmware.sata.ahci".into()),
                    ("ResourceType", "20".into()),
                ],
                Controller::Ide => vec![
                    ("Address", number.to_string()),
                    ("Description", "IDE Controller".into()),
                    ("ElementName", format!("IDE {number}")),
                    ("InstanceID", id.to_string()),
                    ("ResourceType", "5".into()),
                ],
            };
            item(&mut out, &properties);
        }
    }

    for (index, (kind, number, unit)) in placements.into_iter().enumerate() {
        let parent = controller_ids
            .iter()
            .find(|(key, _)| *key == (kind, number))
            .map(|(_, id)| *id)
            .unwrap_or_default();
        item(
            &mut out,
            &[
                ("AddressOnParent", unit.to_string()),
                ("ElementName", format!("Hard Disk {}", index + 1)),
                ("HostResource", format!("ovf:/disk/vmdisk{}", index + 1)),
                ("InstanceID", take_id().to_string()),
                ("Parent", parent.to_string()),
                ("ResourceType", "17".into()),
            ],
        );
    }

    for (index, nic) in spec.nics.iter().enumerate() {
        let model = match nic.model {
            NicModel::Virtio => "VmxNet3",
            NicModel::E1000 => "E1000",
        };
        let network = network_of(nic);
        item(
            &mut out,
            &[
                ("Address", nic.mac.clone()),
                ("AutomaticAllocation", "true".into()),
                ("Connection", network.to_string()),
                (
                    "Description",
                    format!("{model} ethernet adapter on \"{network}\""),
                ),
                ("ElementName", format!("Network adapter {}", index + 1)),
                ("InstanceID", take_id().to_string()),
                ("ResourceSubType", model.into()),
                ("ResourceType", "10".into()),
            ],
        );
    }

    out.push_str(
        r#"      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="bios"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptors::ovf::parse;
    use crate::foreign::{BusKind, Firmware};
    use ferry_core::spec::{
        BootSpec, CacheMode, DiskFormat, DiskSource, DiskSpec, NicBackend, NicSpec,
    };

    fn disk_spec(id: &str, bus: DiskBus) -> DiskSpec {
        DiskSpec {
            id: id.into(),
            source: DiskSource::Path {
                path: format!("/var/lib/ferry/{id}.qcow2").into(),
            },
            format: DiskFormat::Qcow2,
            bus,
            cache: CacheMode::None,
            read_only: false,
            image: None,
            create_size_bytes: None,
        }
    }

    fn spec(buses: &[DiskBus]) -> VmSpec {
        VmSpec {
            name: "web-01".into(),
            uuid: uuid::Uuid::nil(),
            vcpus: 3,
            memory_bytes: 3 << 30,
            machine_type: "pc-q35-10.0".into(),
            cpu_model: "qemu64".into(),
            disks: buses
                .iter()
                .enumerate()
                .map(|(i, bus)| disk_spec(&format!("vd{i}"), *bus))
                .collect(),
            nics: vec![
                NicSpec {
                    id: "n0".into(),
                    model: NicModel::Virtio,
                    mac: "52:54:00:aa:bb:01".into(),
                    backend: NicBackend::Network {
                        network: "prod & <dev>".into(),
                    },
                },
                NicSpec {
                    id: "n1".into(),
                    model: NicModel::E1000,
                    mac: "52:54:00:aa:bb:02".into(),
                    backend: NicBackend::User,
                },
                NicSpec {
                    id: "n2".into(),
                    model: NicModel::Virtio,
                    mac: "52:54:00:aa:bb:03".into(),
                    backend: NicBackend::Network {
                        network: "prod & <dev>".into(),
                    },
                },
            ],
            serial_console: false,
            boot: BootSpec::Firmware { disk: "vd0".into() },
        }
    }

    fn export_disks(spec: &VmSpec) -> Vec<ExportDisk> {
        spec.disks
            .iter()
            .enumerate()
            .map(|(i, d)| ExportDisk {
                id: d.id.clone(),
                file_name: format!("web-01-{}.vmdk", d.id),
                format: "vmdk".into(),
                capacity_bytes: (i as u64 + 1) * (10 << 30),
                file_size_bytes: 1_000_000 + i as u64,
                bus: d.bus,
                read_only: false,
            })
            .collect()
    }

    #[test]
    fn round_trips_through_the_reader() {
        let buses = [DiskBus::Virtio, DiskBus::Sata, DiskBus::Scsi, DiskBus::Ide];
        let spec = spec(&buses);
        let disks = export_disks(&spec);
        let text = write(&spec, &disks);
        let vm = parse(&text, "web-01.ovf").unwrap();

        assert_eq!(vm.name.as_deref(), Some("web-01"));
        assert_eq!(vm.vcpus, Some(3));
        assert_eq!(vm.memory_bytes, Some(3 << 30));
        assert_eq!(vm.firmware, Firmware::Bios);
        assert_eq!(vm.platform.as_deref(), Some("vmx-14"));
        assert_eq!(vm.guest_os.as_deref(), Some("otherLinux64Guest"));

        assert_eq!(vm.disks.len(), disks.len());
        for (read, written) in vm.disks.iter().zip(&disks) {
            assert_eq!(read.file, written.file_name);
            assert_eq!(read.capacity_claim, Some(written.capacity_bytes));
            assert_eq!(read.format_claim.as_deref(), Some("vmdk"));
        }
        let buses: Vec<(BusKind, &str)> = vm
            .disks
            .iter()
            .map(|d| (d.bus, d.controller.as_str()))
            .collect();
        // virtio has no VMware equivalent: it goes on PVSCSI (which the
        // import maps back to virtio); scsi on LSI Logic.
        assert_eq!(
            buses,
            vec![
                (BusKind::Scsi, "VirtualSCSI"),
                (BusKind::Sata, "vmware.sata.ahci"),
                (BusKind::Scsi, "lsilogic"),
                (BusKind::Ide, "IDE"),
            ]
        );

        let nics: Vec<(&str, Option<&str>, Option<&str>)> = vm
            .nics
            .iter()
            .map(|n| (n.model.as_str(), n.mac.as_deref(), n.network.as_deref()))
            .collect();
        assert_eq!(
            nics,
            vec![
                ("VmxNet3", Some("52:54:00:aa:bb:01"), Some("prod & <dev>")),
                ("E1000", Some("52:54:00:aa:bb:02"), Some("VM Network")),
                ("VmxNet3", Some("52:54:00:aa:bb:03"), Some("prod & <dev>")),
            ]
        );
        assert!(vm.other_devices.is_empty());
    }

    #[test]
    fn writes_one_network_per_name_and_one_controller_per_bus() {
        let spec = spec(&[DiskBus::Virtio, DiskBus::Scsi, DiskBus::Virtio]);
        let text = write(&spec, &export_disks(&spec));
        assert_eq!(text.matches("<Network ovf:name=").count(), 2);
        assert!(text.contains(r#"<Network ovf:name="prod &amp; &lt;dev&gt;">"#));
        // One PVSCSI controller for both virtio disks, one LSI Logic for scsi,
        // on SCSI buses 0 and 1.
        assert_eq!(text.matches("<rasd:ResourceType>6<").count(), 2);
        assert!(text.contains("<rasd:ResourceSubType>lsilogic<"));
        assert!(text.contains("<rasd:ElementName>SCSI Controller 1<"));
        assert_eq!(text.matches("<rasd:ResourceType>17<").count(), 3);
        assert!(text
            .contains(r#"<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="bios"/>"#));
        assert!(text.contains(r#"ovf:capacityAllocationUnits="byte""#));
        assert!(text
            .contains(r#"<File ovf:href="web-01-vd0.vmdk" ovf:id="file1" ovf:size="1000000"/>"#));
        // Units 0 and 1 on the PVSCSI controller, 0 on the LSI Logic one.
        for unit in 0..2 {
            assert!(text.contains(&format!("<rasd:AddressOnParent>{unit}<")));
        }
    }

    #[test]
    fn many_disks_spill_onto_more_controllers() {
        let spec = spec(&[DiskBus::Scsi; 16]);
        let text = write(&spec, &export_disks(&spec));
        assert_eq!(text.matches("<rasd:ResourceType>6<").count(), 2);
        // Unit 7 is the controller's own.
        assert!(!text.contains("<rasd:AddressOnParent>7<"));
        let vm = parse(&text, "x.ovf").unwrap();
        assert_eq!(vm.disks.len(), 16);

        let spec = spec_with_ide();
        let text = write(&spec, &export_disks(&spec));
        assert_eq!(text.matches("<rasd:ResourceType>5<").count(), 2);
        assert_eq!(parse(&text, "x.ovf").unwrap().disks.len(), 3);
    }

    fn spec_with_ide() -> VmSpec {
        spec(&[DiskBus::Ide, DiskBus::Ide, DiskBus::Ide])
    }

    #[test]
    fn escapes_text_and_attributes() {
        assert_eq!(
            escape(r#"a&b<c>"d"'e'"#),
            "a&amp;b&lt;c&gt;&quot;d&quot;&apos;e&apos;"
        );
        assert_eq!(escape("x\ny\u{1}"), "x&#10;y\u{fffd}");
        let mut spec = spec(&[]);
        spec.name = "a\"b<c>&'d".into();
        spec.nics.clear();
        let text = write(&spec, &[]);
        let vm = parse(&text, "x.ovf").unwrap();
        assert_eq!(vm.name.as_deref(), Some("a\"b<c>&'d"));
        assert!(vm.disks.is_empty() && vm.nics.is_empty());
        assert!(!text.contains("NetworkSection"));
    }
}

//! Writer of VMware `.vmx` files (hardware version 14: ESXi 6.7,
//! Workstation 14 and later).
//!
//! Mapping:
//!
//! * SATA disks → `sata0:N`; IDE disks → `ide0:0`, `ide0:1`, `ide1:0`,
//!   `ide1:1` (a fifth and later IDE disk goes to SATA); SCSI and virtio
//!   disks → `scsi0:N` (unit 7 is the controller's own; after unit 15,
//!   `scsi1`) on `pvscsi`, VMware's paravirtual controller and the nearest
//!   to virtio. Every disk is `persistent` except read-only ones, which are
//!   `independent-nonpersistent`: VMware has no read-only disk, and that
//!   mode discards the guest's writes, so the file is never changed;
//! * virtio NICs → `vmxnet3`, e1000 → `e1000`; the MAC is kept as a static
//!   address with `checkMACAddress = "FALSE"`, because VMware refuses static
//!   MACs outside its own 00:50:56 range otherwise (and QEMU's 52:54:00 ones
//!   are). Every NIC is bridged to the port group named by a cluster-network
//!   backend, else `VM Network`; a NIC without backend starts disconnected;
//! * the boot disk (firmware boot) is named in `bios.hddOrder`; direct
//!   kernel boot has no VMware equivalent and is noted in a comment (the
//!   first disk is then the boot disk);
//! * a serial console becomes `serial0` writing to `<name>-serial.log`.
//!
//! Values are quoted with VMware's `|XX` escapes for `"`, `|`, `#` and
//! control characters.

use std::fmt::Write as _;

use super::ExportDisk;
use ferry_core::spec::{BootSpec, DiskBus, NicBackend, NicModel, VmSpec};

/// `value` with VMware's escapes, in quotes.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '|' || c == '#' || c.is_control() && (c as u32) < 0x80 {
            let _ = write!(out, "|{:02X}", c as u32);
        } else {
            out.push(c);
        }
    }
    out.push('"');
    out
}

/// The VMware form of a uuid: `56 4d 9b 1c 2f 3e 4a 5b-6c 7d 8e 9f a0 b1 c2
/// d3`.
fn vmware_uuid(uuid: &uuid::Uuid) -> String {
    let hex: Vec<String> = uuid.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}", hex[..8].join(" "), hex[8..].join(" "))
}

/// Assigns VMware slots (`scsi0:0`, `sata0:1`, …) to disks in order.
#[derive(Default)]
struct Slots {
    /// Disks placed per SCSI flavour: [lsilogic for `scsi`, pvscsi for
    /// `virtio`].
    scsi: [u32; 2],
    sata: u32,
    ide: u32,
    /// VMware SCSI controllers in use: (number, virtualDev); the two
    /// flavours share the numbers `scsi0`…`scsi3`.
    scsi_controllers: Vec<(u32, &'static str)>,
    sata_used: bool,
}

impl Slots {
    fn next(&mut self, bus: DiskBus) -> String {
        match bus {
            DiskBus::Ide if self.ide < 4 => {
                let (controller, unit) = (self.ide / 2, self.ide % 2);
                self.ide += 1;
                format!("ide{controller}:{unit}")
            }
            DiskBus::Ide | DiskBus::Sata => {
                self.sata_used = true;
                let (controller, unit) = (self.sata / 30, self.sata % 30);
                self.sata += 1;
                format!("sata{controller}:{unit}")
            }
            DiskBus::Scsi | DiskBus::Virtio => {
                // virtio disks go on VMware's paravirtual controller (imported
                // back as virtio), scsi disks on an LSI Logic one.
                let (flavour, device) = if bus == DiskBus::Virtio {
                    (1, "pvscsi")
                } else {
                    (0, "lsilogic")
                };
                // 15 disks per controller: units 0-6 and 8-15.
                let (nth, mut unit) = (self.scsi[flavour] / 15, self.scsi[flavour] % 15);
                if unit >= 7 {
                    unit += 1;
                }
                self.scsi[flavour] += 1;
                let mine: Vec<u32> = self
                    .scsi_controllers
                    .iter()
                    .filter(|(_, d)| *d == device)
                    .map(|(n, _)| *n)
                    .collect();
                let controller = match mine.get(nth as usize) {
                    Some(number) => *number,
                    None => {
                        let number = self.scsi_controllers.len() as u32;
                        self.scsi_controllers.push((number, device));
                        number
                    }
                };
                format!("scsi{controller}:{unit}")
            }
        }
    }
}

fn line(out: &mut String, key: &str, value: &str) {
    let _ = writeln!(out, "{key} = {}", quoted(value));
}

/// The vmx text describing `spec` with `disks`.
pub fn write(spec: &VmSpec, disks: &[ExportDisk]) -> String {
    let mut out = String::new();
    line(&mut out, ".encoding", "UTF-8");
    line(&mut out, "config.version", "8");
    line(&mut out, "virtualHW.version", "14");
    line(&mut out, "displayName", &spec.name);
    line(&mut out, "guestOS", "other4xlinux-64");
    line(&mut out, "firmware", "bios");
    line(&mut out, "uuid.bios", &vmware_uuid(&spec.uuid));
    line(&mut out, "numvcpus", &spec.vcpus.to_string());
    line(
        &mut out,
        "memsize",
        &spec.memory_bytes.div_ceil(1 << 20).to_string(),
    );
    // The PCI(e) bridges VMware puts in every VM: pvscsi and vmxnet3 sit
    // behind them.
    line(&mut out, "pciBridge0.present", "TRUE");
    for bridge in 4..8 {
        line(&mut out, &format!("pciBridge{bridge}.present"), "TRUE");
        line(
            &mut out,
            &format!("pciBridge{bridge}.virtualDev"),
            "pcieRootPort",
        );
        line(&mut out, &format!("pciBridge{bridge}.functions"), "8");
    }
    line(&mut out, "vmci0.present", "TRUE");

    let mut slots = Slots::default();
    let mut disk_lines = String::new();
    let mut boot_slot = None;
    let boot_disk = match &spec.boot {
        BootSpec::Firmware { disk } => Some(disk.as_str()),
        BootSpec::Kernel { .. } => None,
    };
    for (index, disk) in disks.iter().enumerate() {
        let slot = slots.next(disk.bus);
        let is_boot = match boot_disk {
            Some(id) => disk.id == id,
            None => index == 0,
        };
        if is_boot && boot_slot.is_none() {
            boot_slot = Some(slot.clone());
        }
        line(&mut disk_lines, &format!("{slot}.present"), "TRUE");
        line(
            &mut disk_lines,
            &format!("{slot}.fileName"),
            &disk.file_name,
        );
        let mode = if disk.read_only {
            "independent-nonpersistent"
        } else {
            "persistent"
        };
        line(&mut disk_lines, &format!("{slot}.mode"), mode);
        let device_type = if slot.starts_with("scsi") {
            "scsi-hardDisk"
        } else {
            "disk"
        };
        line(&mut disk_lines, &format!("{slot}.deviceType"), device_type);
    }
    for (controller, device) in &slots.scsi_controllers {
        line(&mut out, &format!("scsi{controller}.present"), "TRUE");
        line(&mut out, &format!("scsi{controller}.virtualDev"), device);
    }
    if slots.sata_used {
        for controller in 0..slots.sata.div_ceil(30) {
            line(&mut out, &format!("sata{controller}.present"), "TRUE");
        }
    }
    out.push_str(&disk_lines);

    if let BootSpec::Kernel { kernel, .. } = &spec.boot {
        let _ = writeln!(
            out,
            "# Ferry booted this VM with a direct kernel ({}); VMware cannot:",
            kernel.display().to_string().replace(['\n', '\r'], " ")
        );
        out.push_str("# the guest needs a boot loader on its first disk.\n");
    }
    line(&mut out, "bios.bootOrder", "hdd");
    if let Some(slot) = boot_slot {
        line(&mut out, "bios.hddOrder", &slot);
    }

    for (index, nic) in spec.nics.iter().enumerate() {
        let key = |k: &str| format!("ethernet{index}.{k}");
        line(&mut out, &key("present"), "TRUE");
        let model = match nic.model {
            NicModel::Virtio => "vmxnet3",
            NicModel::E1000 => "e1000",
        };
        line(&mut out, &key("virtualDev"), model);
        line(&mut out, &key("addressType"), "static");
        line(&mut out, &key("address"), &nic.mac);
        line(&mut out, &key("checkMACAddress"), "FALSE");
        line(&mut out, &key("connectionType"), "bridged");
        let network = nic.backend.network().unwrap_or("VM Network");
        line(&mut out, &key("networkName"), network);
        let connected = !matches!(nic.backend, NicBackend::None);
        line(
            &mut out,
            &key("startConnected"),
            if connected { "TRUE" } else { "FALSE" },
        );
    }

    if spec.serial_console {
        line(&mut out, "serial0.present", "TRUE");
        line(&mut out, "serial0.fileType", "file");
        line(
            &mut out,
            "serial0.fileName",
            &format!("{}-serial.log", spec.name),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptors::vmx;
    use crate::foreign::BusKind;
    use ferry_core::spec::{CacheMode, DiskFormat, DiskSource, DiskSpec, NicSpec};
    use std::path::PathBuf;

    fn disk_spec(id: &str, bus: DiskBus) -> DiskSpec {
        DiskSpec {
            id: id.into(),
            source: DiskSource::Path {
                path: PathBuf::from(format!("/vms/{id}.qcow2")),
            },
            format: DiskFormat::Qcow2,
            bus,
            cache: CacheMode::None,
            read_only: false,
            image: None,
            create_size_bytes: None,
        }
    }

    fn export_disk(id: &str, bus: DiskBus, read_only: bool) -> ExportDisk {
        ExportDisk {
            id: id.into(),
            file_name: format!("{id}.vmdk"),
            format: "vmdk".into(),
            capacity_bytes: 10 << 30,
            file_size_bytes: 1 << 30,
            bus,
            read_only,
        }
    }

    fn spec() -> VmSpec {
        VmSpec {
            name: "web01".into(),
            uuid: uuid::Uuid::parse_str("6f3e2c1a-8b4d-4e5f-9a0b-1c2d3e4f5a6b").unwrap(),
            vcpus: 4,
            memory_bytes: 6 << 30,
            machine_type: "pc-q35-10.0".into(),
            cpu_model: "qemu64".into(),
            disks: vec![
                disk_spec("root", DiskBus::Virtio),
                disk_spec("data", DiskBus::Sata),
                disk_spec("logs", DiskBus::Scsi),
            ],
            nics: vec![
                NicSpec {
                    id: "lan".into(),
                    model: NicModel::Virtio,
                    mac: "52:54:00:12:34:56".into(),
                    backend: NicBackend::Network {
                        network: "prod \"blue\" | net".into(),
                    },
                },
                NicSpec {
                    id: "mgmt".into(),
                    model: NicModel::E1000,
                    mac: "52:54:00:12:34:57".into(),
                    backend: NicBackend::None,
                },
            ],
            serial_console: true,
            boot: BootSpec::Firmware {
                disk: "logs".into(),
            },
        }
    }

    fn disks() -> Vec<ExportDisk> {
        vec![
            export_disk("root", DiskBus::Virtio, false),
            export_disk("data", DiskBus::Sata, false),
            export_disk("logs", DiskBus::Scsi, true),
        ]
    }

    #[test]
    fn written_vmx_reads_back() {
        let text = write(&spec(), &disks());
        assert!(text.starts_with(".encoding = \"UTF-8\"\n"), "{text}");
        assert!(text.contains("scsi0.virtualDev = \"pvscsi\"\n"), "{text}");
        assert!(
            text.contains("ethernet0.virtualDev = \"vmxnet3\"\n"),
            "{text}"
        );
        assert!(
            text.contains("ethernet1.startConnected = \"FALSE\"\n"),
            "{text}"
        );
        assert!(text.contains("scsi1.virtualDev = \"lsilogic\"\n"), "{text}");
        assert!(text.contains("scsi1:0.mode = \"independent-nonpersistent\"\n"));

        let vm = vmx::parse(&text, "web01.vmx").unwrap();
        assert_eq!(vm.name.as_deref(), Some("web01"));
        assert_eq!(vm.vcpus, Some(4));
        assert_eq!(vm.memory_bytes, Some(6 << 30));
        assert_eq!(vm.platform.as_deref(), Some("vmx-14"));
        let files: Vec<(&str, &str, BusKind)> = vm
            .disks
            .iter()
            .map(|d| (d.label.as_str(), d.file.as_str(), d.bus))
            .collect();
        assert_eq!(
            files,
            [
                ("scsi0:0", "root.vmdk", BusKind::Scsi),
                ("sata0:0", "data.vmdk", BusKind::Sata),
                ("scsi1:0", "logs.vmdk", BusKind::Scsi),
            ]
        );
        assert_eq!(vm.disks[0].controller, "pvscsi");
        assert_eq!(vm.disks[2].boot_order, Some(1));
        assert_eq!(vm.disks[0].boot_order, None);
        let macs: Vec<Option<&str>> = vm.nics.iter().map(|n| n.mac.as_deref()).collect();
        assert_eq!(macs, [Some("52:54:00:12:34:56"), Some("52:54:00:12:34:57")]);
        assert_eq!(vm.nics[0].network.as_deref(), Some("prod \"blue\" | net"));
        assert_eq!(vm.nics[1].network.as_deref(), Some("VM Network"));
        assert_eq!(vm.nics[1].model, "e1000");
        assert_eq!(vm.other_devices.len(), 1);
        assert_eq!(vm.other_devices[0].kind, "serial");
    }

    #[test]
    fn escapes_follow_vmx_rules() {
        assert_eq!(quoted("a\"b|c#d"), "\"a|22b|7Cc|23d\"");
        assert_eq!(quoted("tab\there"), "\"tab|09here\"");
        assert_eq!(quoted("ünïcode"), "\"ünïcode\"");
    }

    #[test]
    fn many_disks_get_distinct_slots() {
        let mut spec = spec();
        spec.boot = BootSpec::Kernel {
            kernel: "/boot/vmlinuz".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        };
        let mut disks: Vec<ExportDisk> = (0..16)
            .map(|i| export_disk(&format!("d{i}"), DiskBus::Scsi, false))
            .collect();
        disks.extend((0..5).map(|i| export_disk(&format!("i{i}"), DiskBus::Ide, false)));
        let text = write(&spec, &disks);
        assert!(text.contains("# Ferry booted this VM with a direct kernel"));
        let vm = vmx::parse(&text, "t.vmx").unwrap();
        let labels: Vec<&str> = vm.disks.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(labels.len(), 21);
        assert!(!labels.contains(&"scsi0:7"));
        assert!(labels.contains(&"scsi0:15") && labels.contains(&"scsi1:0"));
        assert!(labels.contains(&"ide1:1") && labels.contains(&"sata0:0"));
        assert_eq!(vm.disks[0].boot_order, Some(1));
    }
}

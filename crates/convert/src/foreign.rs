//! A VM as another hypervisor described it, before it is mapped to a Ferry
//! spec. Descriptor readers fill this with what the file says, as written
//! (controller and NIC model names stay the source's own words, so the import
//! report can say "lsilogic → scsi"); [`crate::mapping`] decides what each
//! becomes.

use serde::Serialize;

/// Which kind of description a VM came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// An OVF envelope (`.ovf`, or inside an `.ova`).
    Ovf,
    /// A VMware `.vmx`.
    Vmx,
    /// A libvirt domain XML.
    Libvirt,
    /// A VirtualBox `.vbox`.
    Vbox,
    /// A Hyper-V configuration XML (the pre-2016 format).
    HyperV,
    /// A bare disk image: everything but the disk comes from flags.
    #[serde(rename = "image")]
    BareImage,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Ovf => "ovf",
            Origin::Vmx => "vmx",
            Origin::Libvirt => "libvirt",
            Origin::Vbox => "vbox",
            Origin::HyperV => "hyper-v",
            Origin::BareImage => "image",
        }
    }
}

/// Firmware the source VM boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

/// The kind of bus a source disk sits on, from the source's controller
/// name (`lsilogic`, `pvscsi`, `SATA`, `IDE`, `virtio`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    Ide,
    Sata,
    Scsi,
    Virtio,
    Nvme,
    /// The descriptor names none, or one Ferry does not know.
    Unknown,
}

/// A VM as described by another hypervisor.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ForeignVm {
    /// The VM's name in the source, if it has one.
    pub name: Option<String>,
    /// The source's uuid, as written (reported; Ferry gives the VM a new one).
    pub uuid: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub firmware: Firmware,
    /// The source's machine/platform words (`pc-q35-8.2`, `vmx-19`,
    /// `virtualbox-2.2`), for the report only.
    pub platform: Option<String>,
    /// The source's guest OS words (`ubuntu-64`, `otherLinux64Guest`), for
    /// the report only.
    pub guest_os: Option<String>,
    /// Hard disks in the source's order.
    pub disks: Vec<ForeignDisk>,
    /// NICs in the source's order.
    pub nics: Vec<ForeignNic>,
    /// Devices that are neither hard disks nor NICs (CD/DVD drives, floppies,
    /// sound, USB, serial ports, video…): listed so the report can say what
    /// was left out.
    pub other_devices: Vec<ForeignDevice>,
}

/// One hard disk of a source VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ForeignDisk {
    /// How the source names the disk (`scsi0:0`, `Hard Disk 1`, `vda`).
    pub label: String,
    /// The file reference exactly as written in the descriptor (an OVF
    /// `href`, a `.vmx` `fileName`, a libvirt `source file`). Never opened
    /// as is: [`crate::paths`] resolves it under the rules of its origin.
    pub file: String,
    /// The controller as the source names it (`lsilogic`, `SATA`, `ide`,
    /// `virtio`), for the report.
    pub controller: String,
    pub bus: BusKind,
    /// The source's boot order position (1 first), if it gives one.
    pub boot_order: Option<u32>,
    pub read_only: bool,
    /// The format the descriptor claims (`vmdk`, `qcow2`, `raw`, `vdi`,
    /// `vhdx`): checked against the bytes, never trusted.
    pub format_claim: Option<String>,
    /// Capacity the descriptor claims, in bytes (checked against the image).
    pub capacity_claim: Option<u64>,
}

/// One NIC of a source VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ForeignNic {
    /// How the source names it (`ethernet0`, `Network adapter 1`).
    pub label: String,
    /// The device model as written (`vmxnet3`, `e1000e`, `virtio`,
    /// `82540EM`, `Synthetic`).
    pub model: String,
    /// The MAC as written, if fixed in the source.
    pub mac: Option<String>,
    /// The source's network name (`VM Network`, `default`, `NAT`).
    pub network: Option<String>,
}

/// A device Ferry does not carry over.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ForeignDevice {
    /// What it is (`cdrom`, `floppy`, `sound`, `usb`, `serial`, `video`…).
    pub kind: String,
    /// How the source names it.
    pub label: String,
}

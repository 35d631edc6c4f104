//! Writers of foreign VM descriptions from a Ferry spec: an OVF envelope
//! (and the OVA archive around it), a VMware `.vmx`, a libvirt domain XML.
//! They write text only; the CLI converts the disks and places the files.

pub mod libvirt;
pub mod ova;
pub mod ovf;
pub mod package;
pub mod vmx;

use ferry_core::spec::DiskBus;

/// One disk as the exported description refers to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDisk {
    /// The disk's id in the Ferry spec.
    pub id: String,
    /// The file name as the description writes it: a plain name next to the
    /// descriptor for OVF and VMX, an absolute path for libvirt.
    pub file_name: String,
    /// Image format of that file: `vmdk`, `qcow2` or `raw`.
    pub format: String,
    /// Virtual size in bytes.
    pub capacity_bytes: u64,
    /// Size of the file in bytes (OVF's `ovf:size`).
    pub file_size_bytes: u64,
    pub bus: DiskBus,
    pub read_only: bool,
}

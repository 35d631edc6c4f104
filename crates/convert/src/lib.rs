//! Cross-platform conversion: VMs described by other hypervisors (OVF/OVA,
//! VMware `.vmx`, libvirt domain XML, VirtualBox `.vbox`, Hyper-V) become
//! Ferry VM specs, and Ferry VMs are written back in those formats.
//!
//! Everything that arrives from outside is treated as hostile (DESIGN.md):
//!
//! * [`detect`] names an image's format from its bytes, in our own code,
//!   before qemu-img ever sees the file, and refuses backing files, external
//!   data files, extents outside the import folder, ambiguous files and
//!   virtual sizes over the policy's cap;
//! * [`ova`] accepts an archive only when every member is a regular file
//!   with a plain, unique name, and reads members in place (never extracts);
//! * [`xml`] parses without DTDs, so no entity is ever expanded;
//! * [`qemu_img`] runs qemu-img with an explicit input format and under CPU
//!   time and address-space limits.
//!
//! The pieces meet in [`descriptors`] (each foreign description read into a
//! [`foreign::ForeignVm`]), [`mapping`] (a `ForeignVm` and its inspected
//! images become a `VmSpec` plus an [`report::ImportReport`] naming every
//! device mapping) and [`export`] (a `VmSpec` written as OVF, VMX or libvirt
//! XML).

pub mod descriptors;
pub mod detect;
pub mod export;
pub mod foreign;
pub mod import;
pub mod manifest;
pub mod mapping;
pub mod ova;
pub mod paths;
pub mod qemu_img;
pub mod report;
pub mod xml;

/// Why an import or export was refused or failed. The message is the whole
/// reason a user needs; `source` chains keep the cause.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The input is not something Ferry imports, or is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The input is refused by the hostile-input rules (DESIGN.md).
    #[error("refused: {0}")]
    Refused(String),
    /// An I/O error on a named file.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// qemu-img failed.
    #[error("qemu-img {action} failed: {detail}")]
    QemuImg { action: String, detail: String },
}

impl ConvertError {
    pub fn invalid(message: impl Into<String>) -> ConvertError {
        ConvertError::Invalid(message.into())
    }

    pub fn refused(message: impl Into<String>) -> ConvertError {
        ConvertError::Refused(message.into())
    }

    pub fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> ConvertError {
        ConvertError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

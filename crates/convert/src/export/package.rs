//! An export, from disk files already fetched into a work folder to the
//! files the other side opens: the disks converted (streamOptimized VMDK in
//! an OVA, monolithicSparse VMDK beside a `.vmx`, the VM's own format beside
//! a libvirt XML), each compared with its source, and the description.
//!
//! Nothing is overwritten: every final path is checked free first and each
//! file is placed with a no-clobber link; a failure removes what was placed.

use super::ExportDisk;
use crate::qemu_img::{Comparison, ImageFile, QemuImg};
use crate::{ConvertError, Result};
use ferry_core::spec::{DiskFormat, VmSpec};
use std::path::{Path, PathBuf};

/// What `ferry export --format` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Ova,
    LibvirtXml,
    Vmx,
}

impl ExportFormat {
    pub fn parse(word: &str) -> Option<ExportFormat> {
        match word {
            "ova" => Some(ExportFormat::Ova),
            "libvirt-xml" => Some(ExportFormat::LibvirtXml),
            "vmx" => Some(ExportFormat::Vmx),
            _ => None,
        }
    }
}

/// A disk of the VM, fetched into the work folder.
#[derive(Debug, Clone)]
pub struct FetchedDisk {
    pub id: String,
    pub path: PathBuf,
    pub format: DiskFormat,
    pub virtual_size: u64,
}

/// Progress of the export's conversions, for the CLI's bar.
pub trait PackageProgress {
    fn disk(&mut self, id: &str, virtual_size: u64);
    fn converted(&mut self, fraction: f64);
    fn verifying(&mut self);
}

/// The files an export made.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The description (`.ova`, `.vmx`, `.xml`) first, then disk files.
    pub files: Vec<PathBuf>,
}

/// Makes the export at `out` from `disks` (in spec order). `work` is a
/// private folder on the same filesystem as `out` (files move by link).
pub fn package(
    spec: &VmSpec,
    format: ExportFormat,
    out: &Path,
    disks: &[FetchedDisk],
    work: &Path,
    qemu_img: &QemuImg,
    progress: &mut dyn PackageProgress,
) -> Result<Exported> {
    let folder = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let folder =
        std::fs::canonicalize(folder).map_err(|e| ConvertError::io("cannot resolve", folder, e))?;
    let stem = out
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ConvertError::invalid(format!("{}: the output needs a file name", out.display()))
        })?
        .to_string();
    let out = folder.join(out.file_name().expect("checked above"));
    if out.exists() {
        return Err(ConvertError::invalid(format!(
            "{} exists already; not overwriting it",
            out.display()
        )));
    }
    // VMDK for VMware and OVA (with this subformat); libvirt keeps the VM's
    // own files.
    let vmdk_options = match format {
        ExportFormat::Ova => Some("subformat=streamOptimized"),
        ExportFormat::Vmx => Some("subformat=monolithicSparse"),
        ExportFormat::LibvirtXml => None,
    };
    // Final names, all checked free before any work.
    let mut planned = Vec::new();
    for disk in disks {
        let extension = if vmdk_options.is_some() {
            "vmdk"
        } else {
            disk.format.as_str()
        };
        let name = format!("{stem}-{}.{extension}", disk.id);
        if format != ExportFormat::Ova && folder.join(&name).exists() {
            return Err(ConvertError::invalid(format!(
                "{} exists already; not overwriting it",
                folder.join(&name).display()
            )));
        }
        planned.push(name);
    }
    let mut export_disks = Vec::new();
    let mut made = Vec::new();
    for (disk, name) in disks.iter().zip(&planned) {
        let spec_disk =
            spec.disks.iter().find(|d| d.id == disk.id).ok_or_else(|| {
                ConvertError::invalid(format!("disk {} is not in the spec", disk.id))
            })?;
        let file = match vmdk_options {
            Some(options) => {
                let converted = work.join(name);
                progress.disk(&disk.id, disk.virtual_size);
                qemu_img.convert(
                    ImageFile::new(&disk.path, disk.format.as_str()),
                    ImageFile::new(&converted, "vmdk"),
                    Some(options),
                    disk.virtual_size,
                    |f| progress.converted(f),
                )?;
                progress.verifying();
                match qemu_img.compare(
                    ImageFile::new(&disk.path, disk.format.as_str()),
                    ImageFile::new(&converted, "vmdk"),
                    disk.virtual_size,
                )? {
                    Comparison::Identical => {}
                    Comparison::Differ(detail) => {
                        return Err(ConvertError::QemuImg {
                            action: format!("verification of disk {}", disk.id),
                            detail: format!("the VMDK differs from the VM's disk: {detail}"),
                        })
                    }
                }
                let _ = std::fs::remove_file(&disk.path);
                converted
            }
            None => disk.path.clone(),
        };
        let file_size = std::fs::metadata(&file)
            .map_err(|e| ConvertError::io("cannot read", &file, e))?
            .len();
        export_disks.push(ExportDisk {
            id: disk.id.clone(),
            file_name: if format == ExportFormat::LibvirtXml {
                folder.join(name).display().to_string()
            } else {
                name.clone()
            },
            format: if vmdk_options.is_some() {
                "vmdk".into()
            } else {
                disk.format.as_str().into()
            },
            capacity_bytes: disk.virtual_size,
            file_size_bytes: file_size,
            bus: spec_disk.bus,
            read_only: spec_disk.read_only,
        });
        made.push(file);
    }
    match format {
        ExportFormat::Ova => {
            let text = super::ovf::write(spec, &export_disks);
            let members: Vec<(String, PathBuf)> =
                planned.iter().cloned().zip(made.iter().cloned()).collect();
            super::ova::write(&out, &format!("{stem}.ovf"), &text, &members)?;
            Ok(Exported {
                files: vec![out.clone()],
            })
        }
        ExportFormat::Vmx | ExportFormat::LibvirtXml => {
            let text = if format == ExportFormat::Vmx {
                super::vmx::write(spec, &export_disks)
            } else {
                super::libvirt::write(spec, &export_disks)
            };
            place_all(&folder, &out, &text, &planned, &made, work)
        }
    }
}

/// Places the disks, then the description, each without overwriting;
/// removes what it placed when one step fails.
fn place_all(
    folder: &Path,
    out: &Path,
    text: &str,
    names: &[String],
    files: &[PathBuf],
    work: &Path,
) -> Result<Exported> {
    let mut placed: Vec<PathBuf> = Vec::new();
    let undo = |placed: &[PathBuf]| {
        for path in placed {
            let _ = std::fs::remove_file(path);
        }
    };
    for (name, file) in names.iter().zip(files) {
        let target = folder.join(name);
        if let Err(error) = place(file, &target) {
            undo(&placed);
            return Err(error);
        }
        placed.push(target);
    }
    let staged = work.join("description");
    if let Err(error) = std::fs::write(&staged, text)
        .and_then(|_| std::fs::File::open(&staged)?.sync_all())
        .map_err(|e| ConvertError::io("cannot write", &staged, e))
        .and_then(|_| place(&staged, out))
    {
        undo(&placed);
        return Err(error);
    }
    let mut files = vec![out.to_path_buf()];
    files.extend(placed);
    Ok(Exported { files })
}

/// Moves `from` to `to` unless `to` exists (a hard link fails on an
/// existing name, which a rename would silently replace).
fn place(from: &Path, to: &Path) -> Result<()> {
    std::fs::hard_link(from, to).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            ConvertError::invalid(format!(
                "{} exists already; not overwriting it",
                to.display()
            ))
        } else {
            ConvertError::io("cannot place", to, error)
        }
    })?;
    let _ = std::fs::remove_file(from);
    Ok(())
}

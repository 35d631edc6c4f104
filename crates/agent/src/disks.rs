//! Disk files on this host: where a spec's disks live, and creating them when
//! a VM is defined (copied from an image, or blank).

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_core::spec::{DiskFormat, DiskSource, DiskSpec, VmSpec};

use crate::error::AgentError;
use crate::host::HostContext;

/// The host path of a disk.
pub fn disk_path(host: &HostContext, disk: &DiskSpec) -> Result<PathBuf, AgentError> {
    match &disk.source {
        DiskSource::Path { path } => Ok(path.clone()),
        DiskSource::Datastore { datastore, file } => {
            let folder = host.config.datastores.get(datastore).ok_or_else(|| {
                AgentError::UnknownDatastore {
                    name: datastore.clone(),
                    host: host.config.host_name.clone(),
                    known: host.datastore_names(),
                }
            })?;
            Ok(folder.join(file))
        }
    }
}

/// Every disk file of the spec exists (checked before each start, so a
/// missing file is a clear error rather than a QEMU command-line failure).
pub fn check_present(host: &HostContext, spec: &VmSpec) -> Result<(), AgentError> {
    for disk in &spec.disks {
        let path = disk_path(host, disk)?;
        if !path.is_file() {
            return Err(AgentError::Disk {
                disk: disk.id.clone(),
                problem: format!("file {} does not exist", path.display()),
            });
        }
    }
    Ok(())
}

/// Creates the datastore disks of a new VM that do not exist yet. Returns the
/// files it created. On failure, removes what it created: a failed create
/// leaves no debris.
pub fn prepare(host: &HostContext, spec: &VmSpec) -> Result<Vec<PathBuf>, AgentError> {
    let mut created = Vec::new();
    for disk in &spec.disks {
        match prepare_one(host, disk) {
            Ok(Some(path)) => created.push(path),
            Ok(None) => {}
            Err(error) => {
                for path in &created {
                    let _ = std::fs::remove_file(path);
                }
                return Err(error);
            }
        }
    }
    Ok(created)
}

/// The files `prepare_incoming` would create, after checking (changing
/// nothing) that it may: each disk resolves, shared disks are visible here,
/// and no copied disk's file exists yet. The agent records these before it
/// creates them, so that a crash in between leaves nothing unaccounted.
pub fn incoming_files(
    host: &HostContext,
    spec: &VmSpec,
    copies: &[ferry_api::DiskCopy],
) -> Result<Vec<PathBuf>, AgentError> {
    let mut files = Vec::new();
    for copy in copies {
        if !spec.disks.iter().any(|d| d.id == copy.disk_id) {
            return Err(AgentError::Disk {
                disk: copy.disk_id.clone(),
                problem: "is not a disk of the VM".to_string(),
            });
        }
    }
    for disk in &spec.disks {
        let path = disk_path(host, disk)?;
        if copies.iter().any(|c| c.disk_id == disk.id) {
            if path.exists() {
                return Err(AgentError::Disk {
                    disk: disk.id.clone(),
                    problem: format!("{} already exists on this host", path.display()),
                });
            }
            files.push(path);
        } else if !path.is_file() {
            return Err(AgentError::Disk {
                disk: disk.id.clone(),
                problem: format!("shared disk {} is not visible on this host", path.display()),
            });
        }
    }
    Ok(files)
}

/// The destination's disks of an arriving VM: copied disks are created
/// empty with their virtual size (the mirror fills them); shared ones must
/// already be there. Returns the files it created; removes them on failure.
pub fn prepare_incoming(
    host: &HostContext,
    spec: &VmSpec,
    copies: &[ferry_api::DiskCopy],
) -> Result<Vec<PathBuf>, AgentError> {
    let mut created = Vec::new();
    let undo = |created: &[PathBuf]| {
        for path in created {
            let _ = std::fs::remove_file(path);
        }
    };
    for disk in &spec.disks {
        let path = match disk_path(host, disk) {
            Ok(path) => path,
            Err(error) => {
                undo(&created);
                return Err(error);
            }
        };
        let Some(copy) = copies.iter().find(|c| c.disk_id == disk.id) else {
            if !path.is_file() {
                undo(&created);
                return Err(AgentError::Disk {
                    disk: disk.id.clone(),
                    problem: format!("shared disk {} is not visible on this host", path.display()),
                });
            }
            continue;
        };
        if path.exists() {
            undo(&created);
            return Err(AgentError::Disk {
                disk: disk.id.clone(),
                problem: format!("{} already exists on this host", path.display()),
            });
        }
        let output = Command::new(&host.qemu_img)
            .args(["create", "-q", "-f", format_name(disk.format)])
            .arg(&path)
            .arg(copy.virtual_size_bytes.to_string())
            .output();
        match output {
            Ok(output) if output.status.success() => created.push(path),
            Ok(output) => {
                let _ = std::fs::remove_file(&path);
                undo(&created);
                return Err(AgentError::Disk {
                    disk: disk.id.clone(),
                    problem: format!(
                        "qemu-img create failed: {}",
                        String::from_utf8_lossy(&output.stderr).trim()
                    ),
                });
            }
            Err(source) => {
                undo(&created);
                return Err(AgentError::DiskIo {
                    disk: disk.id.clone(),
                    action: "running qemu-img",
                    source,
                });
            }
        }
    }
    Ok(created)
}

fn prepare_one(host: &HostContext, disk: &DiskSpec) -> Result<Option<PathBuf>, AgentError> {
    let path = disk_path(host, disk)?;
    if path.exists() {
        if !path.is_file() {
            return Err(AgentError::Disk {
                disk: disk.id.clone(),
                problem: format!("{} exists but is not a regular file", path.display()),
            });
        }
        return Ok(None);
    }
    if matches!(disk.source, DiskSource::Path { .. }) {
        return Err(AgentError::Disk {
            disk: disk.id.clone(),
            problem: format!("file {} does not exist", path.display()),
        });
    }
    let format = format_name(disk.format);
    let mut command = Command::new(&host.qemu_img);
    if let Some(image) = &disk.image {
        let image_format = detect_image_format(image).map_err(|source| AgentError::DiskIo {
            disk: disk.id.clone(),
            action: "reading the image",
            source,
        })?;
        command
            .args(["convert", "-f", image_format, "-O", format])
            .arg(image)
            .arg(&path);
    } else if let Some(size) = disk.create_size_bytes {
        command
            .args(["create", "-q", "-f", format])
            .arg(&path)
            .arg(size.to_string());
    } else {
        return Err(AgentError::Disk {
            disk: disk.id.clone(),
            problem: format!(
                "file {} does not exist; give `image` to copy or `size` to create it",
                path.display()
            ),
        });
    }
    let output = command.output().map_err(|source| AgentError::DiskIo {
        disk: disk.id.clone(),
        action: "running qemu-img",
        source,
    })?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&path);
        return Err(AgentError::Disk {
            disk: disk.id.clone(),
            problem: format!(
                "qemu-img failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(Some(path))
}

/// Each disk's path and sizes, as far as they can be read (a disk whose
/// file is missing is left out).
pub fn describe(host: &HostContext, spec: &VmSpec) -> Vec<ferry_api::DiskInfo> {
    use std::os::unix::fs::MetadataExt;
    spec.disks
        .iter()
        .filter_map(|disk| {
            let path = disk_path(host, disk).ok()?;
            let meta = std::fs::metadata(&path).ok()?;
            let virtual_size_bytes = match disk.format {
                DiskFormat::Raw => meta.len(),
                DiskFormat::Qcow2 => qcow2_virtual_size(&path).ok()?,
            };
            Some(ferry_api::DiskInfo {
                id: disk.id.clone(),
                path: path.display().to_string(),
                virtual_size_bytes,
                allocated_bytes: meta.blocks() * 512,
            })
        })
        .collect()
}

/// Runs `qemu-img ARGS` (asynchronously: conversions take long) and turns
/// a failure into a message with qemu-img's own words.
pub async fn run_qemu_img(qemu_img: &Path, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let output = tokio::process::Command::new(qemu_img)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", qemu_img.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img {} failed: {}",
            args.first()
                .map(|a| a.to_string_lossy())
                .unwrap_or_default(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The size the guest sees of a disk file in `format`.
pub fn virtual_size(path: &Path, format: DiskFormat) -> std::io::Result<u64> {
    match format {
        DiskFormat::Raw => Ok(std::fs::metadata(path)?.len()),
        DiskFormat::Qcow2 => qcow2_virtual_size(path),
    }
}

/// The bytes a file occupies on its filesystem (holes excluded).
pub fn allocated_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(stat.blocks_available() * stat.fragment_size())
}

/// The virtual size field of a qcow2 header (big-endian u64 at offset 24),
/// read directly: cheap enough for every `vm show`, and no qemu-img run
/// against a file QEMU holds locked.
fn qcow2_virtual_size(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut header = [0u8; 32];
    std::fs::File::open(path)?.read_exact(&mut header)?;
    if &header[..4] != b"QFI\xfb" {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a qcow2 image",
        ));
    }
    Ok(u64::from_be_bytes(
        header[24..32].try_into().expect("8 bytes"),
    ))
}

pub fn format_name(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    }
}

/// Tells qcow2 from raw by the magic bytes, in Ferry's own code, so that
/// qemu-img always gets an explicit format (never probing: a raw image whose
/// first bytes look like a qcow2 header must not be read as one).
pub fn detect_image_format(image: &Path) -> std::io::Result<&'static str> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(image)?;
    let read = file.read(&mut magic)?;
    Ok(if read == 4 && &magic == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn host(dir: &Path) -> HostContext {
        HostContext {
            config: crate::host::AgentConfig {
                host_name: "host2".to_string(),
                address: String::new(),
                state_dir: dir.join("state"),
                datastores: BTreeMap::from([("local".to_string(), dir.join("local"))]),
                accel: ferry_qemu::accel::AccelSetting::Tcg,
                qemu_binary: None,
                stop_timeout: Duration::from_secs(1),
                migration_address: "127.0.0.1".to_string(),
                pki: None,
                reserve_memory_bytes: 0,
                cpu_models: None,
                networks: Default::default(),
            },
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            qemu_img: PathBuf::from("qemu-img"),
            accel: ferry_qemu::accel::choose(ferry_qemu::accel::AccelSetting::Tcg),
        }
    }

    fn spec(dir: &Path) -> VmSpec {
        let text = format!(
            "name = \"vm\"\nmemory = \"64MiB\"\n\
             [[disks]]\nid = \"vd0\"\ndatastore = \"local\"\nfile = \"vm.raw\"\nformat = \"raw\"\n\
             [[disks]]\nid = \"vd1\"\npath = \"{}\"\nformat = \"raw\"\n",
            dir.join("shared.raw").display()
        );
        VmSpec::from_toml_str(&text, dir).unwrap()
    }

    fn copy(id: &str) -> ferry_api::DiskCopy {
        ferry_api::DiskCopy {
            disk_id: id.to_string(),
            virtual_size_bytes: 1 << 20,
        }
    }

    #[test]
    fn incoming_files_are_checked_without_touching_anything() {
        let dir = tempfile::tempdir().unwrap();
        let host = host(dir.path());
        std::fs::create_dir_all(dir.path().join("local")).unwrap();
        let spec = spec(dir.path());

        // The shared disk must be visible here.
        let error = incoming_files(&host, &spec, &[copy("vd0")]).unwrap_err();
        assert!(error.to_string().contains("vd1"), "{error}");
        std::fs::write(dir.path().join("shared.raw"), b"").unwrap();

        let files = incoming_files(&host, &spec, &[copy("vd0")]).unwrap();
        assert_eq!(files, [dir.path().join("local/vm.raw")]);
        assert!(!files[0].exists(), "nothing is created");

        // A copy never lands on an existing file, nor names a foreign disk.
        std::fs::write(&files[0], b"someone's").unwrap();
        assert!(incoming_files(&host, &spec, &[copy("vd0")]).is_err());
        assert!(incoming_files(&host, &spec, &[copy("vd9")]).is_err());
        assert_eq!(std::fs::read(&files[0]).unwrap(), b"someone's");
    }
}

//! Writer of OVA archives: a ustar tar whose members are, in the order
//! DSP0243 §5.3 requires, the `.ovf`, then its manifest (`.mf`, SHA-256),
//! then the disk files.
//!
//! The archive is written to a hidden `.<name>.partial` next to `out`,
//! fsynced, then renamed into place without replacing anything
//! (`renameat2(RENAME_NOREPLACE)`, or a hard link where the file system
//! lacks it); on any failure the partial file is removed. An existing `out`
//! is refused before any work.
//!
//! Each disk is read twice: once for the manifest digest (the manifest comes
//! before the disks), once into the archive, hashed again on the way; if the
//! two digests or the sizes differ the disk changed meanwhile and the export
//! fails rather than ship a manifest that does not match.

use crate::manifest::{self, DigestAlgorithm};
use crate::{ConvertError, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};

/// Longest member name written: what fits a ustar `name` field without the
/// `prefix` split (OVA readers differ in how they handle that).
const MAX_MEMBER_NAME: usize = 100;

fn check_member_name(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name.len() <= MAX_MEMBER_NAME
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.chars().any(|c| c.is_control())
        && !name.contains(")=")
        && name.is_ascii();
    if plain {
        Ok(())
    } else {
        Err(ConvertError::invalid(format!(
            "OVA member name {name:?} is not a plain ASCII file name of at most {MAX_MEMBER_NAME} bytes"
        )))
    }
}

/// Writes `out` as an OVA: the OVF first, then a SHA-256 manifest, then the
/// disk files (name in the archive, file on disk).
pub fn write(
    out: &Path,
    ovf_name: &str,
    ovf_text: &str,
    disks: &[(String, PathBuf)],
) -> Result<()> {
    let stem = ovf_name.strip_suffix(".ovf").ok_or_else(|| {
        ConvertError::invalid(format!("OVF member name {ovf_name:?} does not end in .ovf"))
    })?;
    let mf_name = format!("{stem}.mf");
    let mut names: Vec<&str> = vec![ovf_name, &mf_name];
    for (name, _) in disks {
        if names.contains(&name.as_str()) {
            return Err(ConvertError::invalid(format!(
                "OVA member name {name:?} is used twice"
            )));
        }
        names.push(name);
    }
    for name in &names {
        check_member_name(name)?;
    }

    let file_name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ConvertError::invalid(format!("{} has no file name", out.display())))?;
    let folder = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if out.symlink_metadata().is_ok() {
        return Err(already_exists(out));
    }

    // Digests first: the manifest precedes the disks.
    let mut digests = vec![(
        ovf_name.to_string(),
        manifest::digest_reader(DigestAlgorithm::Sha256, ovf_text.as_bytes())
            .map_err(|e| ConvertError::io("cannot hash", Path::new(ovf_name), e))?,
    )];
    for (name, path) in disks {
        let file = File::open(path).map_err(|e| ConvertError::io("cannot open", path, e))?;
        let digest = manifest::digest_reader(DigestAlgorithm::Sha256, file)
            .map_err(|e| ConvertError::io("cannot read", path, e))?;
        digests.push((name.clone(), digest));
    }
    let manifest_text = manifest::write_sha256(&digests);

    let partial = folder.join(format!(".{file_name}.partial"));
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                ConvertError::io(
                    "cannot create (another export is writing it, or a failed one left it: remove it)",
                    &partial,
                    e,
                )
            } else {
                ConvertError::io("cannot create", &partial, e)
            }
        })?;
    let result = write_archive(
        file,
        &partial,
        ovf_name,
        ovf_text,
        &mf_name,
        &manifest_text,
        disks,
        &digests[1..],
    )
    .and_then(|()| place(&partial, out, &folder));
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn already_exists(out: &Path) -> ConvertError {
    ConvertError::io(
        "will not overwrite",
        out,
        io::Error::new(io::ErrorKind::AlreadyExists, "file exists"),
    )
}

fn header(size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(size);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// Counts and hashes what passes through.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[allow(clippy::too_many_arguments)]
fn write_archive(
    file: File,
    partial: &Path,
    ovf_name: &str,
    ovf_text: &str,
    mf_name: &str,
    manifest_text: &str,
    disks: &[(String, PathBuf)],
    disk_digests: &[(String, String)],
) -> Result<()> {
    let write_error = |e| ConvertError::io("cannot write", partial, e);
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));

    for (name, text) in [(ovf_name, ovf_text), (mf_name, manifest_text)] {
        let mut header = header(text.len() as u64, mtime);
        builder
            .append_data(&mut header, name, text.as_bytes())
            .map_err(write_error)?;
    }

    for ((name, path), (_, digest)) in disks.iter().zip(disk_digests) {
        let source = File::open(path).map_err(|e| ConvertError::io("cannot open", path, e))?;
        let size = source
            .metadata()
            .map_err(|e| ConvertError::io("cannot stat", path, e))?
            .len();
        let mut header = header(size, mtime);
        header.set_path(name).map_err(write_error)?;
        header.set_cksum();
        let mut reader = Hashing {
            inner: source.take(size),
            hasher: Sha256::new(),
            count: 0,
        };
        builder.append(&header, &mut reader).map_err(write_error)?;
        let again = hex::encode(reader.hasher.finalize());
        if reader.count != size || &again != digest {
            return Err(ConvertError::invalid(format!(
                "{} changed while it was being exported (size or SHA-256 differs between the \
                 manifest pass and the archive pass)",
                path.display()
            )));
        }
    }

    let writer = builder.into_inner().map_err(write_error)?;
    let file = writer
        .into_inner()
        .map_err(|e| write_error(e.into_error()))?;
    file.sync_all()
        .map_err(|e| ConvertError::io("cannot sync", partial, e))?;
    Ok(())
}

/// Renames `partial` to `out` unless `out` exists, then syncs the folder.
fn place(partial: &Path, out: &Path, folder: &Path) -> Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, partial, None, out, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => {}
        Err(Errno::EEXIST) => return Err(already_exists(out)),
        // The file system (or kernel) has no RENAME_NOREPLACE: a hard link
        // fails on an existing name just the same.
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            std::fs::hard_link(partial, out).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    already_exists(out)
                } else {
                    ConvertError::io("cannot move into place", out, e)
                }
            })?;
            std::fs::remove_file(partial)
                .map_err(|e| ConvertError::io("cannot remove", partial, e))?;
        }
        Err(errno) => {
            return Err(ConvertError::io(
                "cannot move into place",
                out,
                io::Error::from(errno),
            ))
        }
    }
    File::open(folder)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| ConvertError::io("cannot sync", folder, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn members(path: &Path) -> Vec<(String, u32, u64, Vec<u8>)> {
        let mut archive = tar::Archive::new(File::open(path).unwrap());
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let header = entry.header().clone();
                assert!(header.as_ustar().is_some(), "ustar header");
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                (
                    entry.path().unwrap().to_string_lossy().into_owned(),
                    header.mode().unwrap(),
                    header.mtime().unwrap(),
                    data,
                )
            })
            .collect()
    }

    #[test]
    fn writes_ovf_then_manifest_then_disks() {
        let dir = tempfile::tempdir().unwrap();
        let disk1 = dir.path().join("d1.vmdk");
        let disk2 = dir.path().join("d2.vmdk");
        std::fs::write(&disk1, vec![7u8; 70_000]).unwrap();
        std::fs::write(&disk2, b"").unwrap();
        let out = dir.path().join("vm.ova");
        let ovf = "<Envelope/>\n";
        write(
            &out,
            "vm.ovf",
            ovf,
            &[
                ("vm-disk1.vmdk".into(), disk1.clone()),
                ("vm-disk2.vmdk".into(), disk2.clone()),
            ],
        )
        .unwrap();

        let members = members(&out);
        let names: Vec<&str> = members.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(names, ["vm.ovf", "vm.mf", "vm-disk1.vmdk", "vm-disk2.vmdk"]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for (name, mode, mtime, _) in &members {
            assert_eq!(*mode, 0o644, "{name}");
            assert!(now.abs_diff(*mtime) < 120, "{name}");
        }
        assert_eq!(members[0].3, ovf.as_bytes());
        assert_eq!(members[2].3, vec![7u8; 70_000]);

        let manifest_text = String::from_utf8(members[1].3.clone()).unwrap();
        assert_eq!(
            manifest_text,
            format!(
                "SHA256(vm.ovf)= {}\nSHA256(vm-disk1.vmdk)= {}\nSHA256(vm-disk2.vmdk)= {}\n",
                sha256(ovf.as_bytes()),
                sha256(&[7u8; 70_000]),
                sha256(b"")
            )
        );
        // The manifest verifies against the archive's own members.
        let entries = manifest::parse(&manifest_text, "vm.mf").unwrap();
        manifest::verify(&entries, "vm.mf", |name| {
            let data = members.iter().find(|m| m.0 == name).unwrap().3.clone();
            Ok(Box::new(io::Cursor::new(data)) as Box<dyn Read>)
        })
        .unwrap();

        // Nothing but the OVA (and the inputs) is left in the folder.
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["d1.vmdk", "d2.vmdk", "vm.ova"]);
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vm.ova");
        std::fs::write(&out, b"precious").unwrap();
        let error = write(&out, "vm.ovf", "<Envelope/>", &[]).unwrap_err();
        assert!(error.to_string().contains("will not overwrite"), "{error}");
        assert_eq!(std::fs::read(&out).unwrap(), b"precious");
        // The no-replace rename itself refuses too.
        let partial = dir.path().join(".x.partial");
        std::fs::write(&partial, b"new").unwrap();
        let error = place(&partial, &out, dir.path()).unwrap_err();
        assert!(error.to_string().contains("will not overwrite"), "{error}");
        assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    }

    #[test]
    fn failure_removes_the_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vm.ova");
        let missing = dir.path().join("missing.vmdk");
        let error =
            write(&out, "vm.ovf", "<Envelope/>", &[("d.vmdk".into(), missing)]).unwrap_err();
        assert!(error.to_string().contains("missing.vmdk"), "{error}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        // A file whose size (0 per stat) disagrees with its contents fails in
        // the archive pass, after the partial file was created.
        let proc_file = PathBuf::from("/proc/self/stat");
        if proc_file.exists() {
            let error = write(
                &out,
                "vm.ovf",
                "<Envelope/>",
                &[("d.vmdk".into(), proc_file)],
            )
            .unwrap_err();
            assert!(error.to_string().contains("changed while"), "{error}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
        assert!(!out.exists());
    }

    #[test]
    fn archive_failure_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vm.ova");
        let partial = dir.path().join(".vm.ova.partial");
        let disk = dir.path().join("d.vmdk");
        std::fs::write(&disk, b"disk").unwrap();
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&partial)
            .unwrap();
        // A digest that does not match the disk: as if it changed between
        // the two passes.
        let error = write_archive(
            file,
            &partial,
            "vm.ovf",
            "<Envelope/>",
            "vm.mf",
            "",
            &[("d.vmdk".into(), disk.clone())],
            &[("d.vmdk".into(), sha256(b"other"))],
        )
        .unwrap_err();
        assert!(error.to_string().contains("changed while"), "{error}");
        std::fs::remove_file(&partial).unwrap();

        // Through `write`: a stale partial makes it fail without touching it.
        std::fs::write(&partial, b"someone else's").unwrap();
        let error = write(&out, "vm.ovf", "<Envelope/>", &[("d.vmdk".into(), disk)]).unwrap_err();
        assert!(error.to_string().contains("partial"), "{error}");
        assert_eq!(std::fs::read(&partial).unwrap(), b"someone else's");
        assert!(!out.exists());
    }

    #[test]
    fn bad_member_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vm.ova");
        let disk = dir.path().join("d.vmdk");
        std::fs::write(&disk, b"x").unwrap();
        for (ovf_name, disk_name) in [
            ("vm.txt", "d.vmdk"),
            ("vm.ovf", "../d.vmdk"),
            ("vm.ovf", "a/b.vmdk"),
            ("vm.ovf", "vm.mf"),
            ("vm.ovf", "vm.ovf"),
            ("vm.ovf", "d\n.vmdk"),
            ("vm.ovf", &"x".repeat(101)),
        ] {
            let result = write(
                &out,
                ovf_name,
                "<Envelope/>",
                &[(disk_name.to_string(), disk.clone())],
            );
            assert!(
                matches!(result, Err(ConvertError::Invalid(_))),
                "{disk_name:?}"
            );
        }
        assert!(!out.exists());
    }
}

//! Where a file reference written in a descriptor may point.
//!
//! A reference is text from outside; it is resolved by these rules before
//! anything opens it: no URLs, no device files, nothing but a regular file,
//! and — for references that must stay inside the import folder (OVF
//! members, VMDK extents, `.vmx` and `.vbox` disks) — no absolute paths, no
//! `..`, and no symbolic link that leads out.

use crate::{ConvertError, Result};
use std::path::{Component, Path, PathBuf};

/// How far a reference may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only files under `folder` (relative references with normal components).
    InsideFolder,
    /// Absolute paths too (libvirt writes them), but still only regular files.
    AnyRegularFile,
}

/// Resolves `reference` (as written in `what`) against `folder`.
pub fn resolve(folder: &Path, reference: &str, reach: Reach, what: &str) -> Result<PathBuf> {
    let refuse = |why: &str| {
        Err(ConvertError::refused(format!(
            "{what} refers to {reference:?}: {why}"
        )))
    };
    if reference.is_empty() {
        return refuse("an empty file name");
    }
    if reference.contains("://") || reference.starts_with("file:") {
        return refuse("a URL; only files next to the descriptor are imported");
    }
    if reference.contains('\0') {
        return refuse("a name with a NUL byte");
    }
    let written = Path::new(reference);
    if written.is_absolute() {
        if reach == Reach::InsideFolder {
            return refuse("an absolute path, outside the import folder");
        }
        if reference.starts_with("/dev/")
            || reference.starts_with("/proc/")
            || reference.starts_with("/sys/")
        {
            return refuse("a device or kernel file");
        }
    } else {
        for component in written.components() {
            match component {
                Component::Normal(_) | Component::CurDir => {}
                Component::ParentDir => {
                    if reach == Reach::InsideFolder {
                        return refuse("a path with '..', outside the import folder");
                    }
                }
                Component::RootDir | Component::Prefix(_) => {
                    return refuse("an absolute path, outside the import folder")
                }
            }
        }
    }
    let joined = folder.join(written);
    let resolved = std::fs::canonicalize(&joined).map_err(|error| {
        ConvertError::invalid(format!(
            "{what} refers to {reference:?}, which cannot be opened ({}): {error}",
            joined.display()
        ))
    })?;
    if reach == Reach::InsideFolder {
        let root = std::fs::canonicalize(folder)
            .map_err(|e| ConvertError::io("cannot resolve", folder, e))?;
        if !resolved.starts_with(&root) {
            return refuse(&format!(
                "it leads to {} through a link, outside the import folder",
                resolved.display()
            ));
        }
    }
    let metadata =
        std::fs::metadata(&resolved).map_err(|e| ConvertError::io("cannot read", &resolved, e))?;
    if !metadata.file_type().is_file() {
        return refuse("not a regular file (a device, folder, FIFO or socket)");
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_per_reach() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("disk.vmdk"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link.vmdk")).unwrap();
        let inside = |r: &str| resolve(dir.path(), r, Reach::InsideFolder, "t.vmx");
        assert!(inside("disk.vmdk").is_ok());
        assert!(inside("./disk.vmdk").is_ok());
        for bad in ["/etc/passwd", "../x", "link.vmdk", "http://h/x", "", "sub"] {
            assert!(inside(bad).is_err(), "{bad} accepted");
        }
        let any = |r: &str| resolve(dir.path(), r, Reach::AnyRegularFile, "d.xml");
        assert!(any("/etc/passwd").is_ok());
        assert!(any("/dev/null").is_err());
        assert!(any("/dev/../dev/zero").is_err());
        assert!(any("/tmp").is_err());
    }
}

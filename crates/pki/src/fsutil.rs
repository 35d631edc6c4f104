//! Writing and reading key material on disk.
//!
//! Files are written to a temporary name in the same directory, created with
//! their final permission bits, synced, then renamed into place. So a key is
//! never readable by others even for an instant (not even when it replaces a
//! file that was), and a crash leaves either the old file or the new one,
//! never half of one.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{PkiError, Result};
use crate::pem::MAX_PEM_BYTES;

/// Permission bits of private keys: owner read/write only.
pub const KEY_FILE_MODE: u32 = 0o600;
/// Permission bits of certificates, which are public.
pub const CERT_FILE_MODE: u32 = 0o644;
/// Permission bits of directories this crate creates: they hold keys.
pub const DIR_MODE: u32 = 0o700;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist. An
/// existing directory keeps its permissions: it is the operator's.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_err("create directory", dir))
}

/// Whether anything (even a dangling symlink) exists at `path`.
pub(crate) fn exists(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

/// Atomically replaces `path` with `contents`, with permission bits `mode`
/// regardless of the umask.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(
        ".{file_name}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));

    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        // The umask may have cleared bits of `mode` at creation; set exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("set permissions of", &tmp))?;
        file.write_all(contents).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a PEM file, refusing files larger than [`MAX_PEM_BYTES`].
pub(crate) fn read_pem_file(path: &Path) -> Result<String> {
    let file = fs::File::open(path).map_err(io_err("open", path))?;
    let mut text = String::new();
    file.take(MAX_PEM_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(io_err("read", path))?;
    if text.len() > MAX_PEM_BYTES {
        return Err(PkiError::TooLarge {
            what: path.display().to_string(),
            limit: MAX_PEM_BYTES,
        });
    }
    Ok(text)
}

/// Refuses a private key file that group or others may access, as OpenSSH
/// does: a CA key that others could read has to be treated as leaked.
pub(crate) fn check_key_permissions(path: &Path) -> Result<()> {
    let mode = fs::metadata(path)
        .map_err(io_err("inspect", path))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PkiError::InsecureKeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_sets_exact_mode_even_over_a_wider_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();

        write_atomic(&path, b"new", KEY_FILE_MODE).unwrap();

        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left"
        );
    }

    #[test]
    fn read_pem_file_refuses_huge_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.pem");
        fs::write(&path, vec![b'a'; MAX_PEM_BYTES + 1]).unwrap();

        let err = read_pem_file(&path).unwrap_err();

        assert!(matches!(err, PkiError::TooLarge { .. }), "{err}");
    }
}

//! The one place in `ferry-core` that touches the file system: checking that
//! the host files a spec names (kernel, initrd, `path` disks, images) exist
//! and are regular files, so that a typo is reported with the field that
//! holds it instead of as a QEMU start-up failure.
//!
//! Datastore disks are not checked here: only the agent knows where its
//! datastores are, and a missing datastore file is normal before creation.

use super::check::Problems;
use super::{BootSpec, DiskSource, SpecError, VmSpec};
use std::io;
use std::path::Path;

/// Checks that every host file `spec` names exists and is a regular file
/// (symlinks are followed). Reports all problems at once, each naming its
/// field and path.
pub fn check_host_files(spec: &VmSpec) -> Result<(), SpecError> {
    let mut problems = Problems::default();
    if let BootSpec::Kernel { kernel, initrd, .. } = &spec.boot {
        check_file("boot.kernel", "kernel", kernel, &mut problems);
        if let Some(initrd) = initrd {
            check_file("boot.initrd", "initrd", initrd, &mut problems);
        }
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        if let DiskSource::Path { path } = &disk.source {
            check_file(&format!("disks[{i}].path"), "disk", path, &mut problems);
        }
        if let Some(image) = &disk.image {
            check_file(&format!("disks[{i}].image"), "image", image, &mut problems);
        }
    }
    problems.into_host_files_result()
}

fn check_file(field: &str, what: &str, path: &Path, problems: &mut Problems) {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => problems.push(field, format!("{what} {path:?} is not a regular file")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            problems.push(field, format!("missing {what} file {path:?}"));
        }
        Err(e) => problems.push(field, format!("cannot use {what} file {path:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A scratch folder removed on drop; core has no tempfile dependency and
    /// needs only this.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("ferry-core-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn spec_in(dir: &Path, extra: &str) -> VmSpec {
        let text = format!(
            "name = \"t\"\nmemory = \"64MiB\"\n[boot]\nkernel = \"vmlinuz\"\ninitrd = \"initrd\"\n{extra}"
        );
        VmSpec::from_toml_str(&text, dir).unwrap()
    }

    #[test]
    fn present_files_pass() {
        let scratch = Scratch::new("present");
        for file in ["vmlinuz", "initrd", "disk.raw", "base.raw"] {
            std::fs::write(scratch.0.join(file), b"x").unwrap();
        }
        let spec = spec_in(
            &scratch.0,
            "[[disks]]\nid = \"a\"\npath = \"disk.raw\"\n\
             [[disks]]\nid = \"b\"\ndatastore = \"local\"\nfile = \"b.raw\"\nimage = \"base.raw\"\n",
        );
        check_host_files(&spec).unwrap();
    }

    #[test]
    fn missing_kernel_file_names_field_and_path() {
        let scratch = Scratch::new("missing-kernel");
        std::fs::write(scratch.0.join("initrd"), b"x").unwrap();
        let spec = spec_in(&scratch.0, "");
        let err = check_host_files(&spec).unwrap_err();
        let expected = format!(
            "boot.kernel: missing kernel file {:?}",
            scratch.0.join("vmlinuz")
        );
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn folder_instead_of_file_is_rejected_and_all_problems_listed() {
        let scratch = Scratch::new("folder");
        std::fs::create_dir(scratch.0.join("vmlinuz")).unwrap();
        let spec = spec_in(&scratch.0, "[[disks]]\nid = \"a\"\npath = \"nope.raw\"\n");
        let err = check_host_files(&spec).unwrap_err();
        let fields: Vec<String> = err.problems().into_iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            ["boot.kernel", "boot.initrd", "disks[0].path"],
            "{err}"
        );
        assert!(err.to_string().contains("is not a regular file"), "{err}");
    }

    #[test]
    fn datastore_disks_are_left_to_the_agent() {
        let scratch = Scratch::new("datastore");
        for file in ["vmlinuz", "initrd"] {
            std::fs::write(scratch.0.join(file), b"x").unwrap();
        }
        let spec = spec_in(
            &scratch.0,
            "[[disks]]\nid = \"a\"\ndatastore = \"local\"\nfile = \"not-yet.raw\"\n",
        );
        check_host_files(&spec).unwrap();
    }
}

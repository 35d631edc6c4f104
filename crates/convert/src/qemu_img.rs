//! qemu-img, run on files that came from outside.
//!
//! qemu-img's image drivers are large C parsers; a crafted image could make
//! one loop or allocate without bound. Every run here therefore has
//!
//! * an explicit input format (`-f`): qemu-img never probes, so a "raw"
//!   file with a qcow2 header stays raw (and [`crate::detect`] has already
//!   refused it);
//! * a CPU-time limit (`RLIMIT_CPU`) scaled to the work, and an
//!   address-space limit (`RLIMIT_AS`), set in the child before `exec`.
//!
//! Written against `std::process` rather than a crate: the limits need a
//! `pre_exec` hook, and progress comes from parsing `-p` output.

use crate::{ConvertError, Result};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Address space a qemu-img run may map: generous for its caches and
/// coroutine stacks, far below what a runaway allocation would reach.
pub const ADDRESS_SPACE_LIMIT: u64 = 4 << 30;

/// CPU seconds every run gets, plus [`CPU_SECONDS_PER_GIB`] per GiB of
/// virtual size (a conversion of compressed streamOptimized VMDK costs
/// about 2–4 s/GiB of CPU on this class of machine; the margin is wide).
pub const BASE_CPU_SECONDS: u64 = 60;
pub const CPU_SECONDS_PER_GIB: u64 = 30;

/// A file and the qemu block driver that reads or writes it; optionally
/// only a byte range of the file (a member inside an OVA), read in place.
#[derive(Debug, Clone, Copy)]
pub struct ImageFile<'a> {
    pub path: &'a Path,
    pub format: &'a str,
    /// `(offset, length)` of the image inside `path`.
    pub slice: Option<(u64, u64)>,
}

impl<'a> ImageFile<'a> {
    pub fn new(path: &'a Path, format: &'a str) -> ImageFile<'a> {
        ImageFile {
            path,
            format,
            slice: None,
        }
    }

    /// The image stored at `offset`, `length` bytes long, inside `path`.
    pub fn slice(path: &'a Path, format: &'a str, offset: u64, length: u64) -> ImageFile<'a> {
        ImageFile {
            path,
            format,
            slice: Some((offset, length)),
        }
    }

    /// The image as `--image-opts` options: the format driver over a `raw`
    /// node limited to the slice (qemu's raw driver takes `offset` and
    /// `size`), over the file. Commas in the path are doubled, as qemu's
    /// option syntax wants.
    fn image_opts(&self) -> std::ffi::OsString {
        let path = self.path.as_os_str().to_string_lossy().replace(',', ",,");
        let text = match self.slice {
            Some((offset, length)) => format!(
                "driver={},file.driver=raw,file.offset={offset},file.size={length},file.file.driver=file,file.file.filename={path}",
                self.format
            ),
            None => format!("driver={},file.driver=file,file.filename={path}", self.format),
        };
        text.into()
    }
}

/// How to run qemu-img.
#[derive(Debug, Clone)]
pub struct QemuImg {
    pub binary: PathBuf,
}

impl Default for QemuImg {
    fn default() -> Self {
        QemuImg {
            binary: PathBuf::from("qemu-img"),
        }
    }
}

/// The CPU-time limit for work over `virtual_size` bytes.
pub fn cpu_seconds_for(virtual_size: u64) -> u64 {
    BASE_CPU_SECONDS + virtual_size.div_ceil(1 << 30) * CPU_SECONDS_PER_GIB
}

impl QemuImg {
    fn command(&self, cpu_seconds: u64) -> Command {
        let mut command = Command::new(&self.binary);
        command.env("LC_ALL", "C");
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setrlimit(2), which is async-signal-safe; it touches no
        // memory shared with the parent.
        unsafe {
            command.pre_exec(move || {
                use nix::sys::resource::{setrlimit, Resource};
                setrlimit(Resource::RLIMIT_CPU, cpu_seconds, cpu_seconds)
                    .map_err(std::io::Error::from)?;
                setrlimit(
                    Resource::RLIMIT_AS,
                    ADDRESS_SPACE_LIMIT,
                    ADDRESS_SPACE_LIMIT,
                )
                .map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        command
    }

    /// Converts `input` (in `input_format`, a qemu driver name) to `output`
    /// in `output_format` (`raw`, `qcow2`, `vmdk`…, with `options` for `-o`),
    /// calling `progress` with the fraction done (0.0–1.0) as qemu-img
    /// reports it. `output` must not exist.
    pub fn convert(
        &self,
        from: ImageFile<'_>,
        to: ImageFile<'_>,
        options: Option<&str>,
        virtual_size: u64,
        mut progress: impl FnMut(f64),
    ) -> Result<()> {
        let (input, input_format) = (from.path, from.format);
        let (output, output_format) = (to.path, to.format);
        if output.exists() {
            return Err(ConvertError::invalid(format!(
                "{} exists already; not overwriting it",
                output.display()
            )));
        }
        let mut command = self.command(cpu_seconds_for(virtual_size));
        command.arg("convert").arg("-p");
        // The input's driver is always explicit: `-f`, or `driver=` in its
        // options when it is a slice of an archive.
        let input_arg = if from.slice.is_some() {
            command.arg("--image-opts");
            from.image_opts()
        } else {
            command.arg("-f").arg(input_format);
            input.as_os_str().to_owned()
        };
        command.arg("-O").arg(output_format);
        if let Some(options) = options {
            command.arg("-o").arg(options);
        }
        command
            .arg(input_arg)
            .arg(output)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| self.spawn_error(e))?;
        let mut stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        // stderr is drained on its own thread so a chatty qemu-img never
        // blocks on a full pipe while we read progress.
        let stderr_reader = std::thread::spawn(move || read_capped(stderr));
        let mut pending = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let n = match stdout.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            pending.extend_from_slice(&buffer[..n]);
            while let Some(end) = pending.iter().position(|&b| b == b'\r' || b == b'\n') {
                let piece: Vec<u8> = pending.drain(..=end).collect();
                if let Some(fraction) = parse_progress(&String::from_utf8_lossy(&piece)) {
                    progress(fraction);
                }
            }
        }
        let status = child
            .wait()
            .map_err(|e| ConvertError::io("cannot wait for qemu-img on", input, e))?;
        let stderr = stderr_reader.join().unwrap_or_default();
        if !status.success() {
            let _ = std::fs::remove_file(output);
            return Err(ConvertError::QemuImg {
                action: format!("convert of {}", input.display()),
                detail: describe_failure(status, &stderr),
            });
        }
        progress(1.0);
        Ok(())
    }

    /// Whether `a` (in `a_format`) and `b` (in `b_format`) hold the same
    /// guest-visible bytes, by `qemu-img compare`. Not `-s` (strict): that
    /// also compares which blocks are allocated, and a conversion turns
    /// zeroed blocks into holes on purpose.
    pub fn compare(
        &self,
        first: ImageFile<'_>,
        second: ImageFile<'_>,
        virtual_size: u64,
    ) -> Result<Comparison> {
        let (a, b) = (first.path, second.path);
        let mut command = self.command(cpu_seconds_for(virtual_size) * 2);
        command.arg("compare");
        if first.slice.is_some() || second.slice.is_some() {
            command
                .arg("--image-opts")
                .arg(first.image_opts())
                .arg(second.image_opts());
        } else {
            command
                .arg("-f")
                .arg(first.format)
                .arg("-F")
                .arg(second.format)
                .arg(a)
                .arg(b);
        }
        let output = command
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.spawn_error(e))?;
        match output.status.code() {
            Some(0) => Ok(Comparison::Identical),
            Some(1) => Ok(Comparison::Differ(
                String::from_utf8_lossy(&output.stdout).trim().to_string(),
            )),
            _ => Err(ConvertError::QemuImg {
                action: format!("compare of {} and {}", a.display(), b.display()),
                detail: describe_failure(output.status, &String::from_utf8_lossy(&output.stderr)),
            }),
        }
    }

    fn spawn_error(&self, error: std::io::Error) -> ConvertError {
        ConvertError::QemuImg {
            action: "start".into(),
            detail: format!(
                "cannot run {}: {error} (install qemu-utils)",
                self.binary.display()
            ),
        }
    }
}

/// What `qemu-img compare` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    Identical,
    /// Where they differ, as qemu-img says it.
    Differ(String),
}

/// `    (12.34/100%)` → 0.1234.
fn parse_progress(piece: &str) -> Option<f64> {
    let inner = piece.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    let percent: f64 = inner.trim().parse().ok()?;
    Some((percent / 100.0).clamp(0.0, 1.0))
}

fn read_capped(mut stream: impl Read) -> String {
    let mut bytes = Vec::new();
    let _ = stream.by_ref().take(64 * 1024).read_to_end(&mut bytes);
    // Drain the rest so the child never blocks.
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
    String::from_utf8_lossy(&bytes).trim().to_string()
}

fn describe_failure(status: std::process::ExitStatus, stderr: &str) -> String {
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (_, Some(signal)) if signal == libc::SIGXCPU || signal == libc::SIGKILL => format!(
            "stopped by signal {signal}: it reached its CPU-time limit (the image may be crafted to make qemu-img spin)"
        ),
        (_, Some(signal)) => format!("killed by signal {signal}"),
        (Some(code), _) => format!("exit status {code}"),
        _ => "ended".into(),
    };
    if stderr.is_empty() {
        how
    } else {
        format!("{how}: {stderr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse() {
        assert_eq!(parse_progress("    (12.50/100%)"), Some(0.125));
        assert_eq!(parse_progress("(100.00/100%)\r"), Some(1.0));
        assert_eq!(parse_progress("garbage"), None);
    }

    fn qemu_img_present() {
        assert!(
            Command::new("qemu-img").arg("--version").output().is_ok(),
            "this test needs qemu-img: install qemu-utils"
        );
    }

    #[test]
    fn convert_and_compare_under_limits() {
        qemu_img_present();
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("in.raw");
        let mut bytes = vec![0u8; 4 << 20];
        bytes[1 << 20..(1 << 20) + 5].copy_from_slice(b"ferry");
        std::fs::write(&raw, &bytes).unwrap();
        let vmdk = dir.path().join("out.vmdk");
        let qemu_img = QemuImg::default();
        let mut seen = Vec::new();
        qemu_img
            .convert(
                ImageFile::new(&raw, "raw"),
                ImageFile::new(&vmdk, "vmdk"),
                Some("subformat=streamOptimized"),
                4 << 20,
                |f| seen.push(f),
            )
            .unwrap();
        assert_eq!(seen.last(), Some(&1.0));
        assert_eq!(
            qemu_img
                .compare(
                    ImageFile::new(&raw, "raw"),
                    ImageFile::new(&vmdk, "vmdk"),
                    4 << 20
                )
                .unwrap(),
            Comparison::Identical
        );
        bytes[2 << 20] = 1;
        std::fs::write(&raw, &bytes).unwrap();
        assert!(matches!(
            qemu_img
                .compare(
                    ImageFile::new(&raw, "raw"),
                    ImageFile::new(&vmdk, "vmdk"),
                    4 << 20
                )
                .unwrap(),
            Comparison::Differ(_)
        ));
        // An image inside a bigger file (an OVA member) is read in place.
        let container = dir.path().join("archive");
        let mut archive = vec![0xa5u8; 1536];
        archive.extend(std::fs::read(&vmdk).unwrap());
        archive.extend(vec![0x5au8; 1024]);
        std::fs::write(&container, &archive).unwrap();
        let member = ImageFile::slice(&container, "vmdk", 1536, archive.len() as u64 - 2560);
        let copy = dir.path().join("copy.raw");
        qemu_img
            .convert(member, ImageFile::new(&copy, "raw"), None, 4 << 20, |_| {})
            .unwrap();
        assert_eq!(
            qemu_img
                .compare(member, ImageFile::new(&copy, "raw"), 4 << 20)
                .unwrap(),
            Comparison::Identical
        );
        // Never overwrites.
        let error = qemu_img
            .convert(
                ImageFile::new(&raw, "raw"),
                ImageFile::new(&vmdk, "vmdk"),
                None,
                4 << 20,
                |_| {},
            )
            .unwrap_err();
        assert!(error.to_string().contains("exists already"), "{error}");
    }
}

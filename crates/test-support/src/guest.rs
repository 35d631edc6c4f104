//! Finding the built test guest, and the kernel command line that configures its probe.

use std::path::{Path, PathBuf};

/// Environment variable that overrides where the built guest is looked for (a directory
/// holding `vmlinuz`, `initramfs.img` and `disk.raw`), e.g. for a CI cache.
pub const GUEST_DIR_ENV: &str = "FERRY_TEST_GUEST_DIR";

/// The kernel command line `disk.raw` boots with, and the one to pass with `-append` for
/// the standard layout: equal to `ProbeConfig::default().kernel_cmdline()` (a unit test
/// checks) and to `guest/build.sh`'s `DISK_CMDLINE` (an integration test checks).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet mem=448M ferry.mem_base=448M ferry.mem_mib=32 ferry.mem_rate=8 ferry.hb_ms=10 ferry.disk=/dev/vda2 ferry.disk_optional=1 ferry.disk_rate=50";

/// The files `guest/build.sh` produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestGuest {
    /// Directory holding them (`<workspace>/target/test-guest` by default).
    pub dir: PathBuf,
    /// The kernel, for `-kernel`.
    pub kernel: PathBuf,
    /// The initramfs (busybox, init, probe, modules), for `-initrd`.
    pub initrd: PathBuf,
    /// The BIOS-bootable disk (copy it before use: the guest writes to it).
    pub disk: PathBuf,
}

/// Why the guest could not be found.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot find the Ferry workspace root above {start} (no Cargo.toml with [workspace])")]
    NoWorkspace { start: PathBuf },
    #[error(
        "test guest file {path} is missing: run guest/build.sh (as root, on Debian) to build it"
    )]
    Missing { path: PathBuf },
}

/// The workspace root: the nearest ancestor of this crate with a `Cargo.toml` that
/// declares `[workspace]`.
pub fn workspace_root() -> Result<PathBuf, GuestError> {
    let start = Path::new(env!("CARGO_MANIFEST_DIR"));
    start
        .ancestors()
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|toml| toml.lines().any(|l| l.trim() == "[workspace]"))
        })
        .map(Path::to_path_buf)
        .ok_or_else(|| GuestError::NoWorkspace {
            start: start.to_path_buf(),
        })
}

impl TestGuest {
    /// Locates the built guest: `$FERRY_TEST_GUEST_DIR` if set, else
    /// `<workspace>/target/test-guest`. Every file must exist.
    pub fn locate() -> Result<TestGuest, GuestError> {
        let dir = match std::env::var_os(GUEST_DIR_ENV) {
            Some(d) => PathBuf::from(d),
            None => workspace_root()?.join("target").join("test-guest"),
        };
        let guest = TestGuest {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.img"),
            disk: dir.join("disk.raw"),
            dir,
        };
        for path in [&guest.kernel, &guest.initrd, &guest.disk] {
            if !path.is_file() {
                return Err(GuestError::Missing { path: path.clone() });
            }
        }
        Ok(guest)
    }
}

/// How to run the probe and where its memory working set lives. Turns into the kernel
/// command line (`-append`), and tells the host checkers where to look.
///
/// The working set sits in RAM the kernel does not use: `mem=` stops the kernel at
/// `ram_mib - reserved_mib`, and the probe maps the working set there through
/// `/dev/mem`. The top of RAM holds firmware data (ACPI tables), so the working set must
/// end below it: `mem_mib` must be less than `reserved_mib`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Guest RAM in MiB (QEMU `-m`); at most 2048 so that guest-physical addresses map
    /// 1:1 into the RAM backend (see `memory_oracle::inject_guest_memory`).
    pub ram_mib: u64,
    /// RAM kept from the kernel at the top, in MiB.
    pub reserved_mib: u64,
    /// Working set in MiB (0: memory oracle off).
    pub mem_mib: u64,
    /// Dirtying rate in MiB/s (0: as fast as possible).
    pub mem_rate: u64,
    /// Heartbeat period in ms.
    pub hb_ms: u64,
    /// Disk-oracle device (`None`: off).
    pub disk: Option<String>,
    /// `ferry.disk_optional=1`: without its device the probe beats on with the disk
    /// oracle off (the bootable disk on a SATA or SCSI bus has no `/dev/vda2`).
    pub disk_optional: bool,
    /// Disk records per second (0: as fast as possible).
    pub disk_rate: u64,
    /// Pass `quiet` to the kernel: less boot noise on the console (and a faster boot
    /// under TCG, where every console byte is an emulated port write).
    pub quiet: bool,
}

impl Default for ProbeConfig {
    /// The layout `disk.raw` boots with: a 512 MiB guest, 64 MiB reserved, a 32 MiB
    /// working set dirtied at 8 MiB/s, 10 ms heartbeats, 50 disk records/s on
    /// `/dev/vda2`.
    fn default() -> Self {
        ProbeConfig {
            ram_mib: 512,
            reserved_mib: 64,
            mem_mib: 32,
            mem_rate: 8,
            hb_ms: 10,
            disk: Some("/dev/vda2".into()),
            disk_optional: true,
            disk_rate: 50,
            quiet: true,
        }
    }
}

impl ProbeConfig {
    /// Guest-physical address of the working set.
    pub fn mem_base(&self) -> u64 {
        (self.ram_mib - self.reserved_mib) << 20
    }

    /// Working-set size in bytes.
    pub fn mem_len(&self) -> u64 {
        self.mem_mib << 20
    }

    /// Working-set size in pages (what `memory_oracle::verify_dump` expects).
    pub fn mem_pages(&self) -> usize {
        (self.mem_len() / crate::memory_oracle::PAGE_SIZE as u64) as usize
    }

    /// The kernel command line: console on ttyS0, `mem=`, and the probe's parameters.
    ///
    /// # Panics
    /// If the working set does not fit below the firmware area in the reserved range, or
    /// the guest is larger than 2 GiB: both are test-authoring mistakes.
    pub fn kernel_cmdline(&self) -> String {
        assert!(
            self.mem_mib < self.reserved_mib && self.reserved_mib < self.ram_mib,
            "working set ({} MiB) must fit in the reserved top ({} MiB) of guest RAM ({} MiB), below the firmware area",
            self.mem_mib,
            self.reserved_mib,
            self.ram_mib
        );
        assert!(
            self.ram_mib <= 2048,
            "guest RAM above 2 GiB is not supported by the oracle helpers"
        );
        let base_mib = self.ram_mib - self.reserved_mib;
        let mut s = String::from("console=ttyS0");
        if self.quiet {
            s.push_str(" quiet");
        }
        s.push_str(&format!(
            " mem={base_mib}M ferry.mem_base={base_mib}M ferry.mem_mib={} ferry.mem_rate={} ferry.hb_ms={} ferry.disk={}{} ferry.disk_rate={}",
            self.mem_mib,
            self.mem_rate,
            self.hb_ms,
            self.disk.as_deref().unwrap_or("none"),
            if self.disk_optional { " ferry.disk_optional=1" } else { "" },
            self.disk_rate
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_is_found() {
        let root = workspace_root().unwrap();
        assert!(root.join("crates/test-support").is_dir());
    }

    #[test]
    fn missing_guest_says_to_run_build_sh() {
        let err = GuestError::Missing {
            path: "/nowhere/vmlinuz".into(),
        };
        assert!(err.to_string().contains("guest/build.sh"));
    }

    #[test]
    fn default_cmdline_matches_the_documented_layout() {
        let cfg = ProbeConfig::default();
        assert_eq!(cfg.kernel_cmdline(), DEFAULT_CMDLINE);
        assert_eq!(cfg.mem_base(), 448 << 20);
        assert_eq!(cfg.mem_pages(), 8192);
    }

    #[test]
    fn cmdline_parses_back_in_the_probe() {
        let cfg = ProbeConfig {
            disk: None,
            ..ProbeConfig::default()
        };
        let parsed = ferry_probe::config::Config::from_cmdline(&cfg.kernel_cmdline()).unwrap();
        assert_eq!(parsed.mem_base, Some(cfg.mem_base()));
        assert_eq!(parsed.mem_mib, 32);
        assert_eq!(parsed.disk, None);
    }

    #[test]
    #[should_panic(expected = "must fit in the reserved top")]
    fn oversized_working_set_is_refused() {
        ProbeConfig {
            mem_mib: 64,
            ..ProbeConfig::default()
        }
        .kernel_cmdline();
    }
}

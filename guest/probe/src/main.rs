//! The Ferry test-guest probe: heartbeat, memory oracle, disk oracle and (with `ferry.ip`)
//! a TCP echo service.
//!
//! Runs inside the test guest (started by `guest/init`), prints line-oriented results on
//! the console and never needs the host to talk to it. See `guest/README.md` for the
//! command-line contract and the line formats, and `format.rs` for the layouts.
//!
//! It has no dependencies on purpose (it is linked statically and must build anywhere),
//! so the three libc calls std does not wrap (`mmap`, `sync`, `reboot`) are declared here.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_probe::config::Config;
use ferry_probe::console;
use ferry_probe::format::{disk, mem, BLOCK_SIZE, BLOCK_WORDS};
use ferry_probe::net;

mod sys {
    use std::ffi::{c_int, c_long, c_void};

    extern "C" {
        pub fn mmap(
            addr: *mut c_void,
            len: usize,
            prot: c_int,
            flags: c_int,
            fd: c_int,
            off: c_long,
        ) -> *mut c_void;
        pub fn sync();
        pub fn reboot(howto: c_int) -> c_int;
    }

    pub const PROT_READ: c_int = 1;
    pub const PROT_WRITE: c_int = 2;
    pub const MAP_SHARED: c_int = 1;
    pub const MAP_FAILED: *mut c_void = !0usize as *mut c_void;
    pub const RB_POWER_OFF: c_int = 0x4321_fedc_u32 as c_int;
    pub const O_DIRECT: c_int = 0o40000;
}

/// Prints one console line. The stdout lock keeps the probe's threads from interleaving
/// within a line, and the whole line goes out in one write.
fn emit(args: std::fmt::Arguments<'_>) {
    let mut line = String::with_capacity(80);
    let _ = line.write_fmt(args);
    line.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

macro_rules! emit {
    ($($arg:tt)*) => { emit(format_args!($($arg)*)) };
}

fn fatal(what: &str, msg: impl std::fmt::Display) -> ! {
    emit!("{}{what}: {msg}", console::ERROR);
    std::process::exit(1);
}

fn main() {
    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_else(|e| fatal("config", format_args!("reading /proc/cmdline: {e}")));
    let cfg = Config::from_cmdline(&cmdline).unwrap_or_else(|e| fatal("config", e));
    let boot_id = boot_id();
    let started = Instant::now();

    // First, so that waiting for the NIC overlaps with initialising the working set.
    if let Some(ip) = cfg.ip {
        let port = cfg.echo_port;
        std::thread::spawn(move || network(ip, port));
    }
    let working_set = if cfg.mem_mib > 0 {
        let (ws, location) = WorkingSet::create(&cfg).unwrap_or_else(|e| fatal("mem", e));
        ws.initialise();
        Some((ws, location))
    } else {
        None
    };
    let disk = cfg
        .disk
        .as_deref()
        .and_then(|path| match DiskRing::open(path) {
            Ok(ring) => Some(ring),
            Err(e) if cfg.disk_optional && !Path::new(path).exists() => {
                emit!("probe-warning disk: {e}; the disk oracle is off (ferry.disk_optional=1)");
                None
            }
            Err(e) => fatal("disk", e),
        });
    let power_buttons = power_button_devices();

    emit!(
        "{}version={} hb_ms={} mem_mib={} mem_rate={} mem_base={} disk={} disk_rate={} \
         disk_slots={} power_buttons={} boot_id={boot_id:#018x} init_ms={}",
        console::READY,
        console::VERSION,
        cfg.hb_ms,
        cfg.mem_mib,
        cfg.mem_rate,
        working_set.as_ref().map_or("none", |(_, l)| l.as_str()),
        disk.as_ref().map_or("none", |d| d.path.as_str()),
        cfg.disk_rate,
        disk.as_ref().map_or(0, |d| d.slots),
        power_buttons.len(),
        started.elapsed().as_millis(),
    );
    if power_buttons.is_empty() {
        emit!(
            "{}power: no ACPI power button input device; power-button shutdown will not work",
            console::ERROR
        );
    }

    for dev in power_buttons {
        std::thread::spawn(move || watch_power_button(&dev));
    }
    if let Some((ws, _)) = working_set {
        let rate = cfg.mem_rate;
        std::thread::spawn(move || ws.run(rate));
    }
    if let Some(ring) = disk {
        let rate = cfg.disk_rate;
        std::thread::spawn(move || ring.run(boot_id, rate));
    }
    heartbeat(Duration::from_millis(cfg.hb_ms));
}

/// Configures `eth0` and runs the echo service forever. A failure is reported on the
/// console and ends only this thread: the other oracles keep running.
fn network(ip: ferry_probe::config::Ipv4Net, port: u16) {
    if let Err(e) = net::configure(ip, Duration::from_secs(10)) {
        emit!("{}net: {e}", console::ERROR);
        return;
    }
    let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port));
    let service = match net::EchoService::bind(addr) {
        Ok(s) => s,
        Err(e) => {
            emit!(
                "{}net: binding the echo service to {addr}: {e}",
                console::ERROR
            );
            return;
        }
    };
    emit!("{}ip={ip} echo_port={port}", console::NET);
    service.run()
}

/// A per-boot random id, so disk records of an earlier boot are never mistaken for
/// current ones. Taken from the kernel's boot id rather than `/dev/urandom`: before the
/// entropy pool is initialised, reading `/dev/urandom` makes the kernel run its jitter
/// entropy collector, which takes over a second under TCG. Falls back to the clock.
fn boot_id() -> u64 {
    let from_kernel = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|uuid| {
            let hex: String = uuid
                .chars()
                .filter(char::is_ascii_hexdigit)
                .take(16)
                .collect();
            u64::from_str_radix(&hex, 16).ok()
        });
    from_kernel.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    })
}

/// Prints `heartbeat seq=N` every `period` forever. Deadlines are absolute so the period
/// does not drift, but if the probe falls more than a period behind (the guest was
/// descheduled) it does not burst to catch up: a burst would hide the stall.
fn heartbeat(period: Duration) -> ! {
    let mut seq: u64 = 0;
    let mut next = Instant::now();
    loop {
        seq += 1;
        emit!("{}{seq}", console::HEARTBEAT);
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > period {
            next = now;
        }
    }
}

/// Spreads `per_sec` units of work evenly over time, in batches.
struct Pacer {
    start: Instant,
    per_sec: u64,
    done: u64,
}

impl Pacer {
    fn new(per_sec: u64) -> Pacer {
        Pacer {
            start: Instant::now(),
            per_sec,
            done: 0,
        }
    }

    /// Units due now (at most `cap`); sleeps a little when nothing is due. A rate of 0
    /// means no limit. A backlog of more than a second is dropped rather than worked off
    /// at full speed, so a paused guest does not come back dirtying memory in a burst.
    fn take(&mut self, cap: u64) -> u64 {
        if self.per_sec == 0 {
            return cap;
        }
        loop {
            let target =
                (self.start.elapsed().as_micros() as u64).saturating_mul(self.per_sec) / 1_000_000;
            if target > self.done + self.per_sec {
                self.done = target - self.per_sec;
            }
            let due = target.saturating_sub(self.done);
            if due > 0 {
                let n = due.min(cap);
                self.done += n;
                return n;
            }
            let wait_us = (1_000_000 / self.per_sec).clamp(1_000, 10_000);
            std::thread::sleep(Duration::from_micros(wait_us));
        }
    }
}

/// The memory oracle's working set: `pages` pages of [`BLOCK_SIZE`] bytes at `base`,
/// accessed only with volatile word reads and writes because the host reads and (in
/// tests) writes the same memory behind the compiler's back.
struct WorkingSet {
    base: *mut u64,
    pages: usize,
}

// SAFETY: the working set is owned by exactly one thread at a time (created in main,
// then moved to the oracle thread), and the pointer stays valid for the whole process.
unsafe impl Send for WorkingSet {}

impl WorkingSet {
    /// Maps the working set: guest-physical memory at `mem_base` through `/dev/mem` if a
    /// base is configured, so that the host can dump it with `pmemsave`; otherwise the
    /// probe's own heap (self-checking only). Returns the location as printed in
    /// `probe-ready`.
    fn create(cfg: &Config) -> Result<(WorkingSet, String), String> {
        let len = cfg.mem_mib << 20;
        let pages = (len / BLOCK_SIZE as u64) as usize;
        let Some(base) = cfg.mem_base else {
            let heap: &'static mut [u64] =
                Box::leak(vec![0u64; pages * BLOCK_WORDS].into_boxed_slice());
            return Ok((
                WorkingSet {
                    base: heap.as_mut_ptr(),
                    pages,
                },
                "heap".to_string(),
            ));
        };
        check_range_is_free(base, len)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mem")
            .map_err(|e| format!("opening /dev/mem: {e}"))?;
        // SAFETY: a fresh shared mapping of a range the kernel does not use (checked
        // above against /proc/iomem); nothing else in this process aliases it. The
        // mapping outlives the file descriptor and is never unmapped.
        let ptr = unsafe {
            sys::mmap(
                std::ptr::null_mut(),
                len as usize,
                sys::PROT_READ | sys::PROT_WRITE,
                sys::MAP_SHARED,
                f.as_raw_fd(),
                base as std::ffi::c_long,
            )
        };
        if ptr == sys::MAP_FAILED {
            return Err(format!(
                "mmap of /dev/mem at {base:#x}+{len:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let ws = WorkingSet {
            base: ptr.cast(),
            pages,
        };
        // Writes to an address with no RAM behind it vanish; catch a base beyond the end
        // of guest RAM now rather than as a flood of oracle failures.
        ws.set_word(pages - 1, mem::MAGIC_WORD, mem::MEM_MAGIC);
        let got = ws.word(pages - 1, mem::MAGIC_WORD);
        if got != mem::MEM_MAGIC {
            return Err(format!(
                "no RAM behind {base:#x}+{len:#x} (a written word reads back as {got:#x}); \
                 is the guest's RAM larger than mem_base + mem_mib?"
            ));
        }
        Ok((ws, format!("{base:#x}")))
    }

    fn word(&self, page: usize, word: usize) -> u64 {
        debug_assert!(page < self.pages && word < BLOCK_WORDS);
        // SAFETY: in bounds (above), the mapping is valid and word aligned.
        unsafe { self.base.add(page * BLOCK_WORDS + word).read_volatile() }
    }

    fn set_word(&self, page: usize, word: usize, value: u64) {
        debug_assert!(page < self.pages && word < BLOCK_WORDS);
        // SAFETY: as in `word`.
        unsafe {
            self.base
                .add(page * BLOCK_WORDS + word)
                .write_volatile(value)
        }
    }

    fn counter(&self, page: usize) -> u8 {
        self.word(page, 0) as u8
    }

    /// Writes every page's fixed words and sets every counter to 0.
    fn initialise(&self) {
        for page in 0..self.pages {
            for w in 0..BLOCK_WORDS {
                self.set_word(
                    page,
                    w,
                    mem::expected_word(page as u64, self.pages as u64, w),
                );
            }
        }
    }

    /// Bumps the counters in order forever at `rate_mib` MiB/s (0: flat out), checking
    /// each page before bumping it.
    fn run(self, rate_mib: u64) -> ! {
        let mut pacer = Pacer::new(rate_mib * (1 << 20) / BLOCK_SIZE as u64);
        let mut reporter = FailReporter::new();
        let mut pass: u64 = 0;
        let mut last_pass_line: Option<Instant> = None;
        let mut page = 0usize;
        loop {
            for _ in 0..pacer.take(64) {
                self.check_page(page, &mut reporter);
                let w = self.word(page, 0);
                self.set_word(page, 0, (w & !0xff) | u64::from((w as u8).wrapping_add(1)));
                page += 1;
                if page == self.pages {
                    page = 0;
                    pass += 1;
                    if last_pass_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        emit!("{}{pass} fails={}", console::MEM_PASS, reporter.total);
                        last_pass_line = Some(Instant::now());
                    }
                }
            }
        }
    }

    /// The self-check, before page `page` is bumped: its predecessor was just bumped, so
    /// the page must be exactly one behind it; page 0 must equal the last page (a full
    /// pass just ended). Then the fixed words must be intact.
    fn check_page(&self, page: usize, reporter: &mut FailReporter) {
        let got = self.counter(page);
        let expected = if page == 0 {
            self.counter(self.pages - 1)
        } else {
            self.counter(page - 1).wrapping_sub(1)
        };
        if got != expected {
            reporter.fail(format_args!(
                "{}mem page={page} offset=0 expected={expected:#04x} got={got:#04x}",
                console::ORACLE_FAIL
            ));
        }
        for w in 0..BLOCK_WORDS {
            let mut got = self.word(page, w);
            if w == 0 {
                got &= mem::WORD0_FIXED_MASK;
            }
            let expected = mem::expected_word(page as u64, self.pages as u64, w);
            if got != expected {
                reporter.fail(format_args!(
                    "{}mem page={page} offset={} expected={expected:#018x} got={got:#018x}",
                    console::ORACLE_FAIL,
                    w * 8
                ));
                // One report per page is enough to locate the damage.
                break;
            }
        }
    }
}

/// Rate-limits oracle failure lines: a corrupted page keeps failing on every pass, and
/// flooding the console would drown the heartbeat. The total is still counted.
struct FailReporter {
    total: u64,
    window_start: Instant,
    in_window: u32,
}

impl FailReporter {
    const PER_SECOND: u32 = 20;

    fn new() -> FailReporter {
        FailReporter {
            total: 0,
            window_start: Instant::now(),
            in_window: 0,
        }
    }

    fn fail(&mut self, line: std::fmt::Arguments<'_>) {
        self.total += 1;
        if self.window_start.elapsed() >= Duration::from_secs(1) {
            self.window_start = Instant::now();
            self.in_window = 0;
        }
        if self.in_window < Self::PER_SECOND {
            self.in_window += 1;
            emit(line);
        }
    }
}

/// Refuses a working set that overlaps anything the kernel lists at the top level of
/// `/proc/iomem` (its RAM, firmware-reserved areas such as the ACPI tables at the top of
/// RAM, device windows): scribbling there would corrupt the guest, not test it.
fn check_range_is_free(base: u64, len: u64) -> Result<(), String> {
    let end = base + len;
    let iomem =
        std::fs::read_to_string("/proc/iomem").map_err(|e| format!("reading /proc/iomem: {e}"))?;
    for line in iomem.lines().filter(|l| !l.starts_with(' ')) {
        let Some((range, name)) = line.split_once(" : ") else {
            continue;
        };
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
            continue;
        };
        if s < end && base <= e {
            return Err(format!(
                "working set {base:#x}..{end:#x} overlaps {name:?} at {s:#x}..={e:#x} in \
                 /proc/iomem; boot with mem=<base> and keep base+size below the firmware's \
                 area at the top of RAM"
            ));
        }
    }
    Ok(())
}

/// Held by the disk oracle for each write-and-flush, and taken for good before power-off,
/// so the guest never powers off with a record write in flight (the kernel would log an
/// I/O error for it as virtio-blk shuts down).
static DISK_IO: Mutex<()> = Mutex::new(());

/// The disk oracle: records written in sequence to a ring covering the whole device.
struct DiskRing {
    file: File,
    path: String,
    slots: u64,
}

impl DiskRing {
    /// Opens the device with `O_DIRECT` (each record goes to the device, not the page
    /// cache). Waits a little for the node: virtio-blk's partitions are scanned and their
    /// nodes created asynchronously after `insmod`.
    fn open(path: &str) -> Result<DiskRing, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Path::new(path).exists() {
            if Instant::now() > deadline {
                return Err(format!("{path} did not appear within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(sys::O_DIRECT)
            .open(path)
            .map_err(|e| format!("opening {path} with O_DIRECT: {e}"))?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("finding the size of {path}: {e}"))?;
        let slots = size / BLOCK_SIZE as u64;
        if slots < 2 {
            return Err(format!("{path} is too small ({size} bytes) for a ring"));
        }
        Ok(DiskRing {
            file,
            path: path.to_string(),
            slots,
        })
    }

    /// Writes records 1, 2, ... at `rate` records/s (0: flat out), each followed by
    /// `fdatasync` so that "flushed" means on stable storage, then printed.
    fn run(self, boot_id: u64, rate: u64) -> ! {
        // O_DIRECT needs a block-aligned buffer; std has no aligned Vec, so take an
        // aligned window of a larger one.
        let mut raw = vec![0u8; 2 * BLOCK_SIZE];
        let off = raw.as_ptr().align_offset(BLOCK_SIZE);
        let buf: &mut [u8; BLOCK_SIZE] = (&mut raw[off..off + BLOCK_SIZE])
            .try_into()
            .expect("window is BLOCK_SIZE long");
        let mut pacer = Pacer::new(rate);
        let mut seq: u64 = 1;
        loop {
            pacer.take(1);
            disk::encode_record(buf, boot_id, seq);
            let pos = disk::slot_of(seq, self.slots) * BLOCK_SIZE as u64;
            let result = {
                let _io = DISK_IO.lock().unwrap_or_else(|e| e.into_inner());
                self.file
                    .write_all_at(&buf[..], pos)
                    .and_then(|()| self.file.sync_data())
            };
            match result {
                Ok(()) => {
                    emit!("{}{seq}", console::DISK_FLUSHED);
                    seq += 1;
                }
                Err(e) => {
                    // Retry the same record: the sequence must not skip.
                    emit!(
                        "{}disk: writing seq={seq} to {}: {e}",
                        console::ERROR,
                        self.path
                    );
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

/// The event devices of the ACPI power button(s): Linux exposes the fixed-hardware
/// button and the PNP0C0C one as input devices named "Power Button" (driver `button`,
/// node from `evdev`).
fn power_button_devices() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/class/input") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("event")) else {
            continue;
        };
        let dev_name =
            std::fs::read_to_string(entry.path().join("device/name")).unwrap_or_default();
        if dev_name.trim() == "Power Button" {
            found.push(PathBuf::from("/dev/input").join(name));
        }
    }
    found.sort();
    found
}

/// Powers the guest off when the power button is pressed (QMP `system_powerdown`), so
/// that a clean shutdown can be requested from the host without a guest agent.
fn watch_power_button(dev: &Path) {
    // The node is created by devtmpfs asynchronously after the driver registers.
    let mut file = None;
    for _ in 0..500 {
        if let Ok(f) = File::open(dev) {
            file = Some(f);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let Some(mut file) = file else {
        emit!("{}power: cannot open {}", console::ERROR, dev.display());
        return;
    };
    // struct input_event on x86_64: struct timeval (16 bytes), u16 type, u16 code,
    // s32 value.
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let mut ev = [0u8; 24];
    loop {
        if let Err(e) = file.read_exact(&mut ev) {
            emit!("{}power: reading {}: {e}", console::ERROR, dev.display());
            return;
        }
        let ty = u16::from_le_bytes([ev[16], ev[17]]);
        let code = u16::from_le_bytes([ev[18], ev[19]]);
        let value = i32::from_le_bytes([ev[20], ev[21], ev[22], ev[23]]);
        if ty == EV_KEY && code == KEY_POWER && value == 1 {
            emit!("{}reason=power-button", console::POWEROFF);
            let io = DISK_IO.lock().unwrap_or_else(|e| e.into_inner());
            // Never released: no record may start after this point.
            std::mem::forget(io);
            // SAFETY: plain syscalls without pointers.
            let rc = unsafe {
                sys::sync();
                sys::reboot(sys::RB_POWER_OFF)
            };
            emit!(
                "{}power: reboot(POWER_OFF) returned {rc}: {}",
                console::ERROR,
                std::io::Error::last_os_error()
            );
        }
    }
}

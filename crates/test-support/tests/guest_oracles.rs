//! Boots the real test guest under QEMU (no Ferry involved) and proves the oracles on it:
//! they pass on a healthy guest, across a live migration, and fail on injected damage.
//!
//! Needs QEMU >= 10.0 and the built guest (`guest/build.sh`); without them the tests fail
//! and say what to do. They never skip silently: a skipped oracle test would let every
//! migration test that relies on it pass for the wrong reason.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_test_support::console;
use ferry_test_support::disk_oracle::{self, DiskOracleError};
use ferry_test_support::guest::{ProbeConfig, TestGuest, DEFAULT_CMDLINE};
use ferry_test_support::heartbeat::{self, HeartbeatReport};
use ferry_test_support::memory_oracle::{self, MemoryOracleError, PAGE_SIZE};
use ferry_test_support::vm::{self, Boot, TestVm, VmOptions};
use serde_json::json;

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn prerequisites() -> TestGuest {
    vm::require_qemu().unwrap_or_else(|e| panic!("{e}"));
    TestGuest::locate().unwrap_or_else(|e| panic!("{e}"))
}

fn copy_disk(guest: &TestGuest, dir: &Path) -> std::path::PathBuf {
    let disk = dir.join("disk.raw");
    std::fs::copy(&guest.disk, &disk).expect("copying disk.raw");
    disk
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Pauses the VM, dumps the working set and returns it (the VM stays paused).
fn dump_working_set(vm: &mut TestVm, cfg: &ProbeConfig) -> Vec<u8> {
    ok(vm.qmp().execute("stop", json!({})), "stop");
    ok(vm.pmemsave(cfg.mem_base(), cfg.mem_len()), "pmemsave")
}

#[test]
fn oracles_hold_across_a_live_migration_and_catch_injected_damage() {
    let guest = prerequisites();
    let cfg = ProbeConfig::default();
    let work = tempfile::tempdir().unwrap();
    let disk = copy_disk(&guest, work.path());
    let opts = |name: &str, incoming: Option<&str>| VmOptions {
        name: name.into(),
        ram_mib: cfg.ram_mib,
        boot: Boot::Kernel {
            cmdline: cfg.kernel_cmdline(),
        },
        disk: Some(disk.clone()),
        incoming: incoming.map(str::to_string),
    };

    // Boot: the probe reports the configured layout, then heartbeats.
    let started = Instant::now();
    let mut src = ok(
        TestVm::launch(&guest, &opts("source", None)),
        "launching source",
    );
    ok(
        src.wait_console("the first heartbeat", BOOT_TIMEOUT, |log| {
            heartbeat::last_seq(log).is_some()
        }),
        "booting",
    );
    eprintln!(
        "boot to first heartbeat (kernel boot, TCG): {:?}",
        started.elapsed()
    );
    let log = ok(
        src.wait_console("50 heartbeats", BOOT_TIMEOUT, |log| {
            heartbeat::last_seq(log) >= Some(50)
        }),
        "heartbeats",
    );
    let ready = console::probe_ready(&log).expect("probe-ready precedes heartbeats");
    assert_eq!(ready.mem_base(), Some(cfg.mem_base()), "{ready:?}");
    assert_eq!(ready.mem_mib(), Some(cfg.mem_mib));
    assert!(
        console::probe_errors(&log).is_empty(),
        "{}",
        src.diagnostics()
    );

    // A paused, healthy guest's working set verifies.
    let dump = dump_working_set(&mut src, &cfg);
    let summary = ok(
        memory_oracle::verify_dump(&dump, cfg.mem_pages()),
        "source dump",
    );
    eprintln!("source dump: {summary:?}");
    ok(src.qmp().execute("cont", json!({})), "cont");

    // Live migration over loopback, shared disk file.
    let mut dst = ok(
        TestVm::launch(&guest, &opts("destination", Some("defer"))),
        "launching destination",
    );
    let info = ok(
        src.migrate_to(&mut dst, Duration::from_secs(90)),
        "migrating",
    );
    eprintln!(
        "migration: total {} ms, downtime {} ms",
        info["total-time"], info["downtime"]
    );
    ok(
        dst.wait_console("50 heartbeats on the destination", BOOT_TIMEOUT, |log| {
            console::heartbeats(log).len() >= 50
        }),
        "destination heartbeats",
    );

    // Heartbeats continue from where the source stopped: no reset, nothing lost.
    let mut both = src.console();
    let src_last = heartbeat::last_seq(&both).expect("source heartbeats");
    both.extend_from_slice(&dst.console());
    let report = HeartbeatReport::from_log(&both);
    ok(report.check_continuous(), "heartbeats across the migration");
    assert!(report.last > Some(src_last + 40), "{report}");
    assert_eq!(
        console::probe_ready_all(&both).len(),
        1,
        "the guest must not have rebooted"
    );

    // The destination's memory is intact.
    let dump = dump_working_set(&mut dst, &cfg);
    ok(
        memory_oracle::verify_dump(&dump, cfg.mem_pages()),
        "destination dump after migration",
    );
    let log = dst.console();
    assert!(
        console::oracle_failures(&both).is_empty(),
        "{}",
        dst.diagnostics()
    );

    // The disk holds every record the guest reported flushed (paused: nothing in flight
    // changes the file while it is read).
    let last_flushed = console::last_disk_flushed(&both).expect("disk-flushed lines");
    let disk_summary = ok(
        disk_oracle::verify_test_disk(&disk, last_flushed),
        "disk oracle",
    );
    assert_eq!(disk_summary.verified.map(|r| *r.end()), Some(last_flushed));
    assert_eq!(Some(disk_summary.boot_id), ready.boot_id());

    // Damage on purpose: a pattern word of page 100 and the counter of page 200. The
    // probe must notice both as it passes over them, and the host checker must reject
    // the dump, naming the page.
    let base = cfg.mem_base();
    ok(
        memory_oracle::inject_guest_memory(
            dst.pid(),
            base + 100 * PAGE_SIZE as u64 + 2048,
            &[0xde, 0xad],
        ),
        "injecting a pattern corruption",
    );
    let counter_gpa = base + 200 * PAGE_SIZE as u64;
    let counter = ok(
        memory_oracle::read_guest_memory(dst.pid(), counter_gpa, 1),
        "reading a counter",
    )[0];
    ok(
        memory_oracle::inject_guest_memory(dst.pid(), counter_gpa, &[counter.wrapping_add(0x40)]),
        "injecting a counter corruption",
    );
    ok(dst.qmp().execute("cont", json!({})), "cont");
    let log_len = log.len();
    let log = ok(
        dst.wait_console(
            "the probe to report both corruptions",
            Duration::from_secs(30),
            |log| {
                let fails = console::oracle_failures(&log[log_len.min(log.len())..]);
                fails
                    .iter()
                    .any(|l| l.starts_with("oracle-fail mem page=100 offset=2048 "))
                    && fails
                        .iter()
                        .any(|l| l.starts_with("oracle-fail mem page=200 offset=0 "))
            },
        ),
        "probe self-check",
    );
    eprintln!("probe reported: {:?}", &console::oracle_failures(&log)[..2]);
    let mut dump = dump_working_set(&mut dst, &cfg);
    match memory_oracle::verify_dump(&dump, cfg.mem_pages()) {
        Err(MemoryOracleError::Word {
            page: 100,
            offset: 2048,
            what: "pattern",
            ..
        }) => {}
        other => panic!("expected a pattern failure on page 100, got {other:?}"),
    }
    // Repair the pattern in the dump: the counter damage must still be caught.
    let word = ferry_probe::format::mem::pattern_word(100, 2048 / 8);
    dump[100 * PAGE_SIZE + 2048..100 * PAGE_SIZE + 2056].copy_from_slice(&word.to_le_bytes());
    match memory_oracle::verify_dump(&dump, cfg.mem_pages()) {
        Err(MemoryOracleError::CounterJump { page, .. }) if page == 200 || page == 201 => {}
        other => panic!("expected a counter failure at page 200, got {other:?}"),
    }

    // A damaged disk record is rejected, precisely.
    let damaged = work.path().join("damaged.raw");
    std::fs::copy(&disk, &damaged).unwrap();
    let region = ok(disk_oracle::oracle_region(&damaged), "oracle region");
    let victim = last_flushed - 5;
    ok(
        disk_oracle::corrupt_record(&damaged, region, victim),
        "corrupting a record",
    );
    match disk_oracle::verify_disk(&damaged, region, last_flushed) {
        Err(DiskOracleError::Checksum { seq, .. }) if seq == victim => {}
        other => panic!("expected a checksum failure on record {victim}, got {other:?}"),
    }

    // The ACPI power button powers the guest off cleanly: QEMU reports a guest-initiated
    // shutdown and exits.
    ok(dst.qmp().execute("cont", json!({})), "cont");
    ok(
        dst.qmp().execute("system_powerdown", json!({})),
        "system_powerdown",
    );
    let event = ok(
        dst.qmp().wait_event("SHUTDOWN", Duration::from_secs(30)),
        "SHUTDOWN event",
    );
    assert_eq!(event["data"]["guest"], true, "{event}");
    let status = ok(dst.wait_exit(Duration::from_secs(30)), "QEMU exit");
    assert!(status.success(), "{status}");
    assert!(
        console::complete_lines(&dst.console()).any(|l| l == "probe-poweroff reason=power-button"),
        "{}",
        dst.diagnostics()
    );
}

#[test]
fn disk_raw_boots_through_firmware_with_its_baked_in_configuration() {
    let guest = prerequisites();
    // disk.raw's syslinux.cfg carries the default configuration; ProbeConfig must agree
    // with it, or host checkers would look in the wrong place.
    let baked =
        std::fs::read_to_string(guest.dir.join("cmdline")).expect("target/test-guest/cmdline");
    assert_eq!(
        baked.trim(),
        DEFAULT_CMDLINE,
        "guest/build.sh's DISK_CMDLINE and DEFAULT_CMDLINE disagree"
    );
    let work = tempfile::tempdir().unwrap();
    let opts = VmOptions {
        name: "firmware".into(),
        ram_mib: 512,
        boot: Boot::Firmware,
        disk: Some(copy_disk(&guest, work.path())),
        incoming: None,
    };
    let started = Instant::now();
    let mut vm = ok(TestVm::launch(&guest, &opts), "launching");
    ok(
        vm.wait_console("the first heartbeat", BOOT_TIMEOUT, |log| {
            heartbeat::last_seq(log).is_some()
        }),
        "firmware boot",
    );
    eprintln!(
        "boot to first heartbeat (firmware boot, TCG): {:?}",
        started.elapsed()
    );
    let log = ok(
        vm.wait_console("20 heartbeats", BOOT_TIMEOUT, |log| {
            heartbeat::last_seq(log) >= Some(20)
        }),
        "heartbeats",
    );
    ok(
        HeartbeatReport::from_log(&log).check_continuous(),
        "heartbeats",
    );
    assert!(
        console::probe_errors(&log).is_empty(),
        "{}",
        vm.diagnostics()
    );
}

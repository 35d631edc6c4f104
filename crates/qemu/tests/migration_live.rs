//! A real live migration with local disks, two QEMU 10.0 processes on one
//! machine over loopback, following DESIGN.md ("A live migration with local
//! disks, in QMP"): TLS on the migration stream and on NBD, the disk
//! mirrored write-blocking into the destination's NBD export, the source
//! paused before switchover while the mirror completes, and the result
//! judged by the test guest's oracles.
//!
//! Both QEMUs are launched from one `VmSpec` with `cmdline::build` and
//! `process::launch`, as the agent does; only the disk path differs.

mod migration_support;

use std::time::{Duration, Instant};

use ferry_pki::PeerIdentity;
use ferry_qemu::blockjob::{self, MirrorJob, NbdClientNode};
use ferry_qemu::migration::{
    self, MigrationAddress, MigrationCapability, MigrationParameters, MigrationStatus,
};
use ferry_qemu::nbd::{self, InetAddress, NbdExport, NbdServerConfig};
use ferry_qemu::qmp::RunState;
use ferry_qemu::tls::{self, Applied, AuthzSimple, TlsCredsX509, TlsEndpoint};
use ferry_test_support::console;
use ferry_test_support::disk_oracle;
use ferry_test_support::guest::ProbeConfig;
use ferry_test_support::heartbeat::HeartbeatReport;
use ferry_test_support::memory_oracle;
use migration_support::{
    blank_disk, guest_image, guest_spec, mib, qemu_img_compare, with_disk_path, Scratch, TestPki,
    Vm,
};

const DISK: &str = "vd0";
const TLS_ID: &str = "ferry-mig-tls";
const AUTHZ_ID: &str = "ferry-mig-authz";
/// 1 GiB/s: far above what loopback under TCG reaches, so QEMU's 128 MiB/s
/// default is never what limits the test.
const MAX_BANDWIDTH: u64 = 1 << 30;
const DOWNTIME_LIMIT: Duration = Duration::from_millis(300);
/// Generous bounds: two cores are shared by two TCG guests and the build.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The destination's prepare step: TLS server credentials, an authz object
/// admitting `source_host`, the NBD server and the disk's export, migration
/// capabilities and TLS parameters, then `migrate-incoming` on an ephemeral
/// port. Every step runs twice: the second must be a no-op. Returns the NBD
/// and migration addresses.
async fn prepare_destination(
    dest: &Vm,
    pki: &TestPki,
    source_host: &str,
) -> (InetAddress, InetAddress) {
    let creds = TlsCredsX509 {
        id: TLS_ID.into(),
        dir: pki.dir("host2").to_owned(),
        endpoint: TlsEndpoint::Server,
    };
    let authz = AuthzSimple {
        id: AUTHZ_ID.into(),
        identity: PeerIdentity::host(source_host).tls_authz_identity(),
    };
    let nbd_addr = InetAddress::loopback(nbd::free_loopback_port().unwrap());
    let server = NbdServerConfig {
        addr: nbd_addr.clone(),
        tls_creds: Some(TLS_ID.into()),
        tls_authz: Some(AUTHZ_ID.into()),
        max_connections: None,
    };
    let export = NbdExport::for_disk(DISK);
    for expected in [Applied::Done, Applied::AlreadyDone] {
        let q = &dest.qmp;
        assert_eq!(tls::add_tls_creds_x509(q, &creds).await.unwrap(), expected);
        assert_eq!(tls::add_authz_simple(q, &authz).await.unwrap(), expected);
        assert_eq!(nbd::nbd_server_start(q, &server).await.unwrap(), expected);
        assert_eq!(nbd::block_export_add(q, &export).await.unwrap(), expected);
    }
    migration::set_capabilities(&dest.qmp, &[(MigrationCapability::Events, true)])
        .await
        .unwrap();
    let params = MigrationParameters {
        tls_creds: Some(TLS_ID.into()),
        tls_authz: Some(AUTHZ_ID.into()),
        ..MigrationParameters::new(MAX_BANDWIDTH)
    };
    migration::set_parameters(&dest.qmp, &params).await.unwrap();
    // exit-on-error off: a refused or failed stream must leave the
    // destination QEMU for the agent (and this test) to inspect.
    let migration_addr = migration::migrate_incoming(
        &dest.qmp,
        &MigrationAddress::Tcp(InetAddress::loopback(0)),
        false,
    )
    .await
    .unwrap();
    assert_ne!(migration_addr.port, 0, "QEMU reports the port it bound");
    (nbd_addr, migration_addr)
}

/// Source-side TLS credentials and migration settings (events,
/// pause-before-switchover, explicit bandwidth and downtime, TLS checked
/// against the name "host2").
async fn configure_source(source: &Vm, pki: &TestPki) {
    let creds = TlsCredsX509 {
        id: TLS_ID.into(),
        dir: pki.dir("host1").to_owned(),
        endpoint: TlsEndpoint::Client,
    };
    assert_eq!(
        tls::add_tls_creds_x509(&source.qmp, &creds).await.unwrap(),
        Applied::Done
    );
    migration::set_capabilities(
        &source.qmp,
        &[
            (MigrationCapability::Events, true),
            (MigrationCapability::PauseBeforeSwitchover, true),
        ],
    )
    .await
    .unwrap();
    let params = MigrationParameters {
        downtime_limit: Some(DOWNTIME_LIMIT),
        tls_creds: Some(TLS_ID.into()),
        tls_hostname: Some("host2".into()),
        ..MigrationParameters::new(MAX_BANDWIDTH)
    };
    migration::set_parameters(&source.qmp, &params)
        .await
        .unwrap();
    let set = migration::query_parameters(&source.qmp).await.unwrap();
    assert_eq!(
        set.max_bandwidth, MAX_BANDWIDTH,
        "not QEMU's 128 MiB/s default"
    );
    assert_eq!(set.tls_creds, TLS_ID);
}

struct Guests {
    scratch: Scratch,
    pki: TestPki,
    probe: ProbeConfig,
    source_disk: std::path::PathBuf,
    dest_disk: std::path::PathBuf,
    source: Vm,
    dest: Vm,
}

/// Boots the test guest on a copy of `disk.raw` (the source) and starts an
/// empty destination of the same shape, paused with `-incoming defer`; waits
/// until the probe is writing memory and disk.
async fn boot_pair(test: &str) -> Guests {
    let image = guest_image();
    let scratch = Scratch::new(test);
    let pki = TestPki::new(scratch.path(), &["host1", "host2"]);
    let probe = ProbeConfig::default();
    let source_disk = scratch.path().join("source.raw");
    let dest_disk = scratch.path().join("dest.raw");
    std::fs::copy(&image.disk, &source_disk).expect("copying disk.raw");
    let size = std::fs::metadata(&source_disk).unwrap().len();
    blank_disk(&dest_disk, size);

    let spec = guest_spec(&image, &source_disk, &probe);
    let dest_spec = with_disk_path(&spec, DISK, &dest_disk);
    let source = Vm::launch("source", &spec, &scratch.path().join("source"), None, false).await;
    let dest = Vm::launch(
        "destination",
        &dest_spec,
        &scratch.path().join("destination"),
        Some("defer"),
        true,
    )
    .await;
    source
        .wait_console(
            "the probe's heartbeats and disk records",
            BOOT_TIMEOUT,
            |log| {
                console::probe_ready(log).is_some()
                    && console::heartbeats(log).len() >= 20
                    && console::last_disk_flushed(log).unwrap_or(0) >= 5
            },
        )
        .await;
    assert_eq!(
        dest.qmp.query_status().await.unwrap().status,
        RunState::InMigrate
    );
    Guests {
        scratch,
        pki,
        probe,
        source_disk,
        dest_disk,
        source,
        dest,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_with_tls_and_nbd_mirror_keeps_memory_disk_and_heartbeat() {
    let g = boot_pair("migrate-live").await;
    let (source, dest) = (&g.source, &g.dest);

    // Pre-flight: the guest's dirty rate (the probe dirties 8 MiB/s).
    let dirty = migration::calc_dirty_rate(&source.qmp, Duration::from_secs(1))
        .await
        .unwrap();

    // Prepare (destination).
    let (nbd_addr, migration_addr) = prepare_destination(dest, &g.pki, "host1").await;

    // Mirror (source): each step twice, the second a no-op.
    configure_source(source, &g.pki).await;
    let node = NbdClientNode::for_disk(DISK, nbd_addr, Some(TLS_ID), Some("host2"));
    let job = MirrorJob::for_disk(DISK);
    let mirror_started = Instant::now();
    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(
            blockjob::blockdev_add_nbd(&source.qmp, &node)
                .await
                .unwrap(),
            expected
        );
        assert_eq!(
            blockjob::blockdev_mirror(&source.qmp, &job).await.unwrap(),
            expected
        );
    }
    let jobs = [job.job_id.clone()];
    blockjob::wait_ready(&source.qmp, &jobs, STEP_TIMEOUT)
        .await
        .unwrap();
    let mirror_ready_after = mirror_started.elapsed();
    let mirror = blockjob::query_block_jobs(&source.qmp).await.unwrap();
    assert!(mirror[0].ready, "{mirror:?}");

    // Memory (source).
    let migrate_started = Instant::now();
    migration::migrate(&source.qmp, &MigrationAddress::Tcp(migration_addr))
        .await
        .unwrap();
    let at_pause =
        migration::wait_for_status(&source.qmp, &[MigrationStatus::PreSwitchover], STEP_TIMEOUT)
            .await
            .unwrap();
    let precopy_took = migrate_started.elapsed();

    // Switchover. The destination must be receiving: a destination that
    // refused us stays in `setup` even when the source thinks all is well.
    let dest_view = migration::query_migrate(&dest.qmp).await.unwrap();
    assert_eq!(dest_view.status, MigrationStatus::Active, "{dest_view:?}");
    assert_eq!(
        source.qmp.query_status().await.unwrap().status,
        RunState::FinishMigrate,
        "vCPUs are stopped at pre-switchover"
    );
    let switchover_started = Instant::now();
    blockjob::complete_mirrors(&source.qmp, &jobs, STEP_TIMEOUT)
        .await
        .unwrap();
    let mirror_completed_in = switchover_started.elapsed();
    migration::migrate_continue(&source.qmp).await.unwrap();
    let done = migration::wait_for_status(&source.qmp, &[MigrationStatus::Completed], STEP_TIMEOUT)
        .await
        .unwrap();
    // Success is read on the destination, not the source.
    let dest_done =
        migration::wait_for_status(&dest.qmp, &[MigrationStatus::Completed], STEP_TIMEOUT)
            .await
            .unwrap();
    assert_eq!(dest_done.status, MigrationStatus::Completed);
    let dest_status = dest.qmp.query_status().await.unwrap();
    assert_eq!(dest_status.status, RunState::Paused);
    assert!(!dest_status.running);
    assert_eq!(
        source.qmp.query_status().await.unwrap().status,
        RunState::PostMigrate
    );

    // Clean up the mirror's plumbing on the source (twice: idempotent).
    assert!(blockjob::query_block_jobs(&source.qmp)
        .await
        .unwrap()
        .is_empty());
    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(
            blockjob::blockdev_del(&source.qmp, &node.node_name)
                .await
                .unwrap(),
            expected
        );
    }

    // Both paused at the switchover point: the disks are identical, and the
    // memory oracle verifies on the destination (and equals the source's).
    qemu_img_compare(&g.source_disk, &g.dest_disk)
        .unwrap_or_else(|diff| panic!("disks differ at switchover: {diff}"));
    let dump = |vm: &Vm, name: &str| {
        let path = g.scratch.path().join(name);
        let (qmp, base, len) = (vm.qmp.clone(), g.probe.mem_base(), g.probe.mem_len());
        async move {
            qmp.pmemsave(base, len, &path).await.unwrap();
            std::fs::read(&path).unwrap()
        }
    };
    let dest_mem = dump(dest, "dest-mem.bin").await;
    let summary = memory_oracle::verify_dump(&dest_mem, g.probe.mem_pages())
        .unwrap_or_else(|e| panic!("memory oracle on the destination: {e}"));
    let source_mem = dump(source, "source-mem.bin").await;
    assert!(
        source_mem == dest_mem,
        "the working set differs between source and destination"
    );

    // Commit: stop the NBD server (twice), then run the guest there.
    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(nbd::nbd_server_stop(&dest.qmp).await.unwrap(), expected);
    }
    assert!(nbd::query_block_exports(&dest.qmp)
        .await
        .unwrap()
        .is_empty());
    let last_source_beat = console::heartbeats(&source.console())
        .into_iter()
        .max()
        .unwrap();
    dest.qmp.cont().await.unwrap();

    // STOP on the source precedes RESUME on the destination, and the
    // source never resumed after it stopped (G1).
    let stops = source.events_named("STOP");
    assert_eq!(stops.len(), 1, "one STOP on the source");
    let resumes = dest.events_named("RESUME");
    assert_eq!(resumes.len(), 1, "one RESUME on the destination");
    assert!(
        stops[0].timestamp < resumes[0].timestamp,
        "{stops:?} {resumes:?}"
    );
    assert!(source
        .events()
        .iter()
        .skip_while(|e| e.name != "STOP")
        .all(|e| e.name != "RESUME"));

    // The guest goes on at the destination: heartbeats continue, disk
    // records keep being flushed, then it is stopped and its disk checked.
    let records_needed = 100;
    let log = dest
        .wait_console(
            "heartbeats and disk records after the migration",
            STEP_TIMEOUT,
            |log| {
                console::disk_flushed(log).len() >= records_needed
                    && console::heartbeats(log).len() >= 200
            },
        )
        .await;
    dest.qmp.stop().await.unwrap();
    let dest_log = dest.console();
    assert!(dest_log.len() >= log.len());
    let source_log = source.console();
    let mut both = source_log.clone();
    both.extend_from_slice(&dest_log);
    let beats = HeartbeatReport::from_log(&both);
    beats
        .check_no_reset()
        .unwrap_or_else(|e| panic!("heartbeat across the migration: {e} ({beats})"));
    let first_dest_beat = console::heartbeats(&dest_log)[0];
    assert!(first_dest_beat > last_source_beat);
    assert!(
        console::probe_ready_all(&dest_log).is_empty(),
        "the guest rebooted"
    );
    for log in [&source_log, &dest_log] {
        assert!(console::oracle_failures(log).is_empty());
        assert!(console::probe_errors(log).is_empty());
    }
    let last_flushed = console::last_disk_flushed(&dest_log).unwrap();
    let disk = disk_oracle::verify_test_disk(&g.dest_disk, last_flushed)
        .unwrap_or_else(|e| panic!("disk oracle on the destination: {e}"));
    let boot_id = console::probe_ready(&source_log).unwrap().boot_id();
    assert_eq!(Some(disk.boot_id), boot_id, "records of the same boot");

    // Tear down: the source retires, the destination is the VM now.
    migration::clear_tls(&source.qmp).await.unwrap();
    assert_eq!(
        tls::del_object(&source.qmp, TLS_ID).await.unwrap(),
        Applied::Done
    );
    assert_eq!(
        tls::del_object(&source.qmp, TLS_ID).await.unwrap(),
        Applied::AlreadyDone
    );
    source.quit().await;
    dest.quit().await;

    let ram = done.ram.clone().unwrap_or_default();
    let at_pause_ram = at_pause.ram.clone().unwrap_or_default();
    println!(
        "MIGRATION REPORT (512 MiB guest, probe dirtying {} MiB at {} MiB/s, disk {} MiB):\n\
         \x20 pre-flight dirty rate: {} MiB/s over {:?}\n\
         \x20 mirror: READY after {:.2?} (bulk copy of the disk over NBD+TLS)\n\
         \x20 migrate -> pre-switchover: {:.2?} (QEMU total-time at pause {} ms, {} passes, \
         {:.1} MiB sent, expected downtime {} ms)\n\
         \x20 switchover: mirror completed in {:.2?}\n\
         \x20 QEMU: total-time {} ms, downtime {} ms, setup-time {} ms\n\
         \x20 RAM: transferred {:.1} MiB (precopy {:.1} MiB, during downtime {:.1} MiB), \
         {} passes, {} zero pages, {} full pages, {:.0} Mbit/s\n\
         \x20 memory oracle: {} pages, counter {}, step at {:?}; heartbeats {}\n\
         \x20 disk oracle: records {:?} verified (last on disk {})",
        g.probe.mem_mib,
        g.probe.mem_rate,
        mib(std::fs::metadata(&g.source_disk).unwrap().len()),
        dirty.mib_per_sec,
        dirty.sampled_for,
        mirror_ready_after,
        precopy_took,
        at_pause.total_time.unwrap_or_default(),
        at_pause_ram.dirty_sync_count,
        mib(at_pause_ram.transferred),
        at_pause.expected_downtime.unwrap_or_default(),
        mirror_completed_in,
        done.total_time.unwrap_or_default(),
        done.downtime.unwrap_or_default(),
        done.setup_time.unwrap_or_default(),
        mib(ram.transferred),
        mib(ram.precopy_bytes),
        mib(ram.downtime_bytes),
        ram.dirty_sync_count,
        ram.duplicate,
        ram.normal,
        ram.mbps,
        summary.pages,
        summary.counter,
        summary.step_at,
        beats,
        disk.verified,
        disk.last_on_disk,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_to_a_destination_that_authorizes_another_host_fails_and_the_source_runs_on() {
    let g = boot_pair("migrate-refused").await;
    let (source, dest) = (&g.source, &g.dest);

    // The destination expects host3; the source is host1.
    let (nbd_addr, migration_addr) = prepare_destination(dest, &g.pki, "host3").await;
    configure_source(source, &g.pki).await;

    // NBD: refused during blockdev-add, so no node and no mirror exist.
    let node = NbdClientNode::for_disk(DISK, nbd_addr, Some(TLS_ID), Some("host2"));
    let err = blockjob::blockdev_add_nbd(&source.qmp, &node)
        .await
        .unwrap_err();
    eprintln!(
        "refused NBD client: {err}: {:?}",
        std::error::Error::source(&err)
    );
    assert!(blockjob::node_driver(&source.qmp, &node.node_name)
        .await
        .unwrap()
        .is_none());

    // Migration stream: refused too. Whatever the source reports, the
    // destination must not have accepted anything.
    migration::migrate(&source.qmp, &MigrationAddress::Tcp(migration_addr))
        .await
        .unwrap();
    let outcome = migration::wait_for_status(
        &source.qmp,
        &[
            MigrationStatus::Failed,
            MigrationStatus::PreSwitchover,
            MigrationStatus::Completed,
        ],
        STEP_TIMEOUT,
    )
    .await
    .unwrap();
    eprintln!(
        "refused migration: source status {} ({:?})",
        outcome.status, outcome.error_desc
    );
    let dest_view = migration::query_migrate(&dest.qmp).await.unwrap();
    assert_ne!(dest_view.status, MigrationStatus::Active, "{dest_view:?}");
    assert_ne!(
        dest_view.status,
        MigrationStatus::Completed,
        "{dest_view:?}"
    );
    if outcome.status == MigrationStatus::PreSwitchover {
        // The source cannot tell; the destination can. Undo.
        migration::migrate_cancel(&source.qmp).await.unwrap();
        migration::wait_for_status(&source.qmp, &[MigrationStatus::Cancelled], STEP_TIMEOUT)
            .await
            .unwrap();
    }

    // The source is authoritative and runs on (resumed if it was paused).
    let status = source.qmp.query_status().await.unwrap();
    if !status.running {
        source.qmp.cont().await.unwrap();
    }
    assert!(source.qmp.query_status().await.unwrap().running);
    let beat_now = console::heartbeats(&source.console())
        .into_iter()
        .max()
        .unwrap();
    source
        .wait_console("heartbeats after the refusal", STEP_TIMEOUT, |log| {
            console::heartbeats(log)
                .into_iter()
                .max()
                .is_some_and(|b| b >= beat_now + 50)
        })
        .await;

    // The destination never ran guest code.
    let dest_status = dest.qmp.query_status().await.unwrap();
    assert_eq!(dest_status.status, RunState::InMigrate);
    assert!(!dest_status.running);
    assert!(dest.events_named("RESUME").is_empty());
    assert!(console::heartbeats(&dest.console()).is_empty());

    // Everything tears down, each undo step idempotent.
    assert!(blockjob::query_block_jobs(&source.qmp)
        .await
        .unwrap()
        .is_empty());
    migration::clear_tls(&source.qmp).await.unwrap();
    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(
            tls::del_object(&source.qmp, TLS_ID).await.unwrap(),
            expected
        );
        assert_eq!(nbd::nbd_server_stop(&dest.qmp).await.unwrap(), expected);
    }
    migration::clear_tls(&dest.qmp).await.unwrap();
    for id in [AUTHZ_ID, TLS_ID] {
        assert_eq!(tls::del_object(&dest.qmp, id).await.unwrap(), Applied::Done);
    }
    assert!(migration::query_parameters(&source.qmp)
        .await
        .unwrap()
        .tls_creds
        .is_empty());
    dest.quit().await;
    source.quit().await;
}

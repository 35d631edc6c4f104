//! Post-copy with two real QEMU 10.0 processes over loopback: what the
//! destination's run state is once post-copy starts (with and without
//! `-S`), and recovery of a post-copy migration whose link broke — once by
//! a real cut (a TCP relay between the two QEMUs drops its connections) and
//! once by `migrate-pause`, which is how QEMU's own tests simulate it — with
//! TLS on every channel, including the resumed ones. The guest is judged by
//! the test guest's memory oracle, its heartbeat and its disk records (the
//! two QEMUs share one disk file, as with shared storage).
//!
//! The probe dirties its 32 MiB working set as fast as it can, so pre-copy
//! can never converge (the case post-copy exists for) and the switch to
//! post-copy cannot race a converging pre-copy. Post-copy starts after the
//! first full pass, so only the working set is left to fetch.
//!
//! The two tests run one after the other (a lock), each with two TCG
//! guests: four at once on two cores would only make both slower.

mod migration_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_pki::PeerIdentity;
use ferry_qemu::migration::{
    self, MigrationAddress, MigrationCapability, MigrationError, MigrationParameters,
    MigrationStatus,
};
use ferry_qemu::nbd::InetAddress;
use ferry_qemu::qmp::{Qmp, RunState};
use ferry_qemu::tls::{self, Applied, AuthzSimple, TlsCredsX509, TlsEndpoint};
use ferry_test_support::console;
use ferry_test_support::disk_oracle;
use ferry_test_support::guest::ProbeConfig;
use ferry_test_support::heartbeat::HeartbeatReport;
use ferry_test_support::memory_oracle::{self, DumpSummary};
use migration_support::{guest_image, guest_spec, Scratch, TestPki, Vm};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const TLS_ID: &str = "ferry-mig-tls";
const AUTHZ_ID: &str = "ferry-mig-authz";
/// Pre-copy: the first pass (~150 MiB of non-zero pages) takes about a
/// second; the working set is re-dirtied faster than this drains it.
const MAX_BANDWIDTH: u64 = 128 << 20;
/// The smallest downtime QEMU accepts: pre-copy must not converge.
const DOWNTIME_LIMIT: Duration = Duration::from_millis(1);
/// Post-copy's background stream while the test looks at it: slow enough
/// that post-copy lasts until it is told to finish (0 = unlimited).
const SLOW_POSTCOPY: u64 = 256 << 10;
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// One test with two guests at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A TCP relay standing in for the network between the two hosts:
/// [`Relay::cut`] drops every connection at once, as a failed link or a
/// restarted switch would (both QEMUs see their socket end).
struct Relay {
    addr: InetAddress,
    accept: JoinHandle<()>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    async fn start(target: InetAddress) -> Relay {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = InetAddress::loopback(listener.local_addr().unwrap().port());
        let conns = Arc::new(Mutex::new(Vec::new()));
        let tracked = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        TcpStream::connect((target.host.as_str(), target.port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap().push(conn);
            }
        });
        Relay {
            addr,
            accept,
            conns,
        }
    }

    /// Stops accepting and drops every relayed connection.
    fn cut(&self) {
        self.accept.abort();
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

struct Pair {
    scratch: Scratch,
    probe: ProbeConfig,
    disk: std::path::PathBuf,
    source: Vm,
    dest: Vm,
}

/// The probe: memory oracle on (32 MiB at 448 MiB), dirtied as fast as it
/// can; heartbeats and disk records as usual.
fn probe() -> ProbeConfig {
    ProbeConfig {
        mem_rate: 0,
        ..ProbeConfig::default()
    }
}

/// Boots the test guest as the source on a copy of `disk.raw` and starts
/// the destination on the same file with `-incoming defer` (`-S` if
/// `dest_paused`); waits until the probe is writing memory and disk.
async fn boot_pair(test: &str, dest_paused: bool) -> Pair {
    let image = guest_image();
    let scratch = Scratch::new(test);
    let probe = probe();
    let disk = scratch.path().join("shared.raw");
    std::fs::copy(&image.disk, &disk).expect("copying disk.raw");
    let spec = guest_spec(&image, &disk, &probe);
    let source = Vm::launch("source", &spec, &scratch.path().join("source"), None, false).await;
    let dest = Vm::launch(
        "destination",
        &spec,
        &scratch.path().join("destination"),
        Some("defer"),
        dest_paused,
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
    Pair {
        scratch,
        probe,
        disk,
        source,
        dest,
    }
}

/// `events` and `postcopy-ram` on both ends (QEMU 10.0 opens the return
/// path by itself for post-copy: no `return-path` capability).
async fn enable_postcopy(source: &Vm, dest: &Vm, pause_before_switchover: bool) {
    migration::set_capabilities(
        &dest.qmp,
        &[
            (MigrationCapability::Events, true),
            (MigrationCapability::PostcopyRam, true),
        ],
    )
    .await
    .unwrap();
    migration::set_capabilities(
        &source.qmp,
        &[
            (MigrationCapability::Events, true),
            (MigrationCapability::PostcopyRam, true),
            (
                MigrationCapability::PauseBeforeSwitchover,
                pause_before_switchover,
            ),
        ],
    )
    .await
    .unwrap();
}

/// Waits until pre-copy has finished its first full pass (the second
/// dirty-bitmap sync has happened), then switches to post-copy. Pre-copy
/// must not have converged on its own.
async fn start_postcopy_after_first_pass(source: &Qmp) -> Duration {
    let started = Instant::now();
    loop {
        let info = migration::query_migrate(source).await.unwrap();
        assert!(
            matches!(
                info.status,
                MigrationStatus::Setup | MigrationStatus::Active
            ),
            "pre-copy was expected to be running, not {} ({:?})",
            info.status,
            info.error_desc
        );
        if info.ram.map_or(0, |r| r.dirty_sync_count) >= 2 {
            break;
        }
        assert!(started.elapsed() < STEP_TIMEOUT, "no second pass");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    migration::migrate_start_postcopy(source).await.unwrap();
    started.elapsed()
}

/// Stops `vm`, dumps the probe's working set and verifies it.
async fn verify_memory(pair: &Pair, vm: &Vm) -> DumpSummary {
    if vm.qmp.query_status().await.unwrap().running {
        vm.qmp.stop().await.unwrap();
    }
    let path = pair.scratch.path().join(format!("{}-mem.bin", vm.name));
    vm.qmp
        .pmemsave(pair.probe.mem_base(), pair.probe.mem_len(), &path)
        .await
        .unwrap();
    let dump = std::fs::read(&path).unwrap();
    memory_oracle::verify_dump(&dump, pair.probe.mem_pages())
        .unwrap_or_else(|e| panic!("memory oracle on the {}: {e}", vm.name))
}

/// Waits until `vm`'s console has `more` heartbeats beyond `after`.
async fn wait_heartbeats(vm: &Vm, what: &str, after: usize, more: usize) {
    vm.wait_console(what, STEP_TIMEOUT, |log| {
        console::heartbeats(log).len() >= after + more
    })
    .await;
}

async fn run_state(vm: &Vm) -> (RunState, bool) {
    let s = vm.qmp.query_status().await.unwrap();
    (s.status, s.running)
}

/// Both ends in `postcopy-paused`; returns the source's error description.
async fn wait_both_paused(source: &Vm, dest: &Vm) -> Option<String> {
    let paused = [MigrationStatus::PostcopyPaused];
    let d = migration::wait_for_status(&dest.qmp, &paused, STEP_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("destination did not pause: {e}"));
    let s = migration::wait_for_status(&source.qmp, &paused, STEP_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("source did not pause: {e}"));
    eprintln!(
        "paused: source {:?}, destination {:?}",
        s.error_desc, d.error_desc
    );
    s.error_desc
}

/// `migrate-recover` on the destination (ephemeral port), then the
/// source's resume to `via(port)`; waits until both are in post-copy again.
async fn recover(source: &Vm, dest: &Vm, via: impl FnOnce(InetAddress) -> InetAddress) -> Duration {
    let started = Instant::now();
    let listen =
        migration::migrate_recover(&dest.qmp, &MigrationAddress::Tcp(InetAddress::loopback(0)))
            .await
            .unwrap();
    assert_ne!(listen.port, 0, "QEMU reports the port it bound");
    let mut events = source.qmp.subscribe();
    migration::migrate_resume(&source.qmp, &MigrationAddress::Tcp(via(listen)))
        .await
        .unwrap();
    migration::wait_for_resume(&source.qmp, &mut events, STEP_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("resume: {e}"));
    migration::wait_for_status(
        &dest.qmp,
        &[MigrationStatus::PostcopyActive, MigrationStatus::Completed],
        STEP_TIMEOUT,
    )
    .await
    .unwrap();
    started.elapsed()
}

/// The destination's side of TLS: server credentials and an authz object
/// admitting only host1.
async fn tls_destination(dest: &Vm, pki: &TestPki) {
    let creds = TlsCredsX509 {
        id: TLS_ID.into(),
        dir: pki.dir("host2").to_owned(),
        endpoint: TlsEndpoint::Server,
    };
    let authz = AuthzSimple {
        id: AUTHZ_ID.into(),
        identity: PeerIdentity::host("host1").tls_authz_identity(),
    };
    assert_eq!(
        tls::add_tls_creds_x509(&dest.qmp, &creds).await.unwrap(),
        Applied::Done
    );
    assert_eq!(
        tls::add_authz_simple(&dest.qmp, &authz).await.unwrap(),
        Applied::Done
    );
}

async fn tls_source(source: &Vm, pki: &TestPki) {
    let creds = TlsCredsX509 {
        id: TLS_ID.into(),
        dir: pki.dir("host1").to_owned(),
        endpoint: TlsEndpoint::Client,
    };
    assert_eq!(
        tls::add_tls_creds_x509(&source.qmp, &creds).await.unwrap(),
        Applied::Done
    );
}

/// The saga's shape: destination started with `-S`, source stopped at
/// `pre-switchover`, `migrate-continue` into post-copy, destination `cont`
/// (the commit), then the link is cut (relay dropped) and recovered, a
/// resume to a dead address fails cleanly and is retried, the link is
/// paused by `migrate-pause` and recovered again, and post-copy completes.
/// TLS on every channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_survives_a_link_cut_and_a_pause_with_tls_and_the_guest_is_intact() {
    let _one_at_a_time = SERIAL.lock().await;
    let test_started = Instant::now();
    let g = boot_pair("postcopy-recovery", true).await;
    let (source, dest) = (&g.source, &g.dest);
    let booted_in = test_started.elapsed();
    let pki = TestPki::new(g.scratch.path(), &["host1", "host2"]);

    // Destination: TLS server side, post-copy, listening.
    tls_destination(dest, &pki).await;
    enable_postcopy(source, dest, true).await;
    let dest_params = MigrationParameters {
        tls_creds: Some(TLS_ID.into()),
        tls_authz: Some(AUTHZ_ID.into()),
        ..MigrationParameters::new(MAX_BANDWIDTH)
    };
    migration::set_parameters(&dest.qmp, &dest_params)
        .await
        .unwrap();
    let listen = migration::migrate_incoming(
        &dest.qmp,
        &MigrationAddress::Tcp(InetAddress::loopback(0)),
        false,
    )
    .await
    .unwrap();

    // Source: TLS client side; the stream goes through the relay.
    tls_source(source, &pki).await;
    let source_params = MigrationParameters {
        downtime_limit: Some(DOWNTIME_LIMIT),
        tls_creds: Some(TLS_ID.into()),
        tls_hostname: Some("host2".into()),
        max_postcopy_bandwidth: Some(SLOW_POSTCOPY),
        ..MigrationParameters::new(MAX_BANDWIDTH)
    };
    migration::set_parameters(&source.qmp, &source_params)
        .await
        .unwrap();
    let relay = Relay::start(listen).await;
    migration::migrate(&source.qmp, &MigrationAddress::Tcp(relay.addr.clone()))
        .await
        .unwrap();
    let precopy_took = start_postcopy_after_first_pass(&source.qmp).await;

    // pause-before-switchover holds post-copy too: the source stops (STOP)
    // at pre-switchover, the destination has not received device state.
    migration::wait_for_status(&source.qmp, &[MigrationStatus::PreSwitchover], STEP_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(run_state(source).await, (RunState::FinishMigrate, false));
    assert_eq!(run_state(dest).await, (RunState::InMigrate, false));
    migration::migrate_continue(&source.qmp).await.unwrap();
    let switched = Instant::now();
    migration::wait_for_status(
        &source.qmp,
        &[MigrationStatus::PostcopyActive],
        STEP_TIMEOUT,
    )
    .await
    .unwrap();
    migration::wait_for_status(&dest.qmp, &[MigrationStatus::PostcopyActive], STEP_TIMEOUT)
        .await
        .unwrap();

    // Post-copy with -S: the destination is `paused` and runs nothing; the
    // source can be neither cancelled nor continued any more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(run_state(dest).await, (RunState::Paused, false));
    assert!(dest.events_named("RESUME").is_empty());
    assert!(console::heartbeats(&dest.console()).is_empty());
    assert_eq!(run_state(source).await, (RunState::FinishMigrate, false));
    let refused = migration::migrate_cancel(&source.qmp).await.unwrap_err();
    eprintln!("migrate_cancel in post-copy: {refused:?}");
    assert!(
        source.qmp.cont().await.is_err(),
        "cont refused in post-copy"
    );
    assert_eq!(
        migration::query_migrate(&source.qmp).await.unwrap().status,
        MigrationStatus::PostcopyActive
    );

    // Recovery commands are refused while post-copy is healthy.
    let dest_any = MigrationAddress::Tcp(InetAddress::loopback(0));
    assert!(migration::migrate_recover(&dest.qmp, &dest_any)
        .await
        .is_err());
    assert!(
        migration::migrate_resume(&source.qmp, &MigrationAddress::Tcp(relay.addr.clone()))
            .await
            .is_err()
    );

    // Commit: the destination runs the guest, fetching pages on demand.
    dest.qmp.cont().await.unwrap();
    assert_eq!(run_state(dest).await, (RunState::Running, true));
    let last_source_beat = console::heartbeats(&source.console())
        .into_iter()
        .max()
        .unwrap();
    wait_heartbeats(
        dest,
        "heartbeats on the destination during post-copy",
        0,
        10,
    )
    .await;

    // Cut 1: the link drops. Both sides pause; the guest keeps its state.
    relay.cut();
    let cut_at = Instant::now();
    let why = wait_both_paused(source, dest).await;
    let cut_detected_in = cut_at.elapsed();
    assert!(why.is_some(), "the source says why it paused");
    assert_eq!(run_state(source).await, (RunState::FinishMigrate, false));
    let dest_paused_state = run_state(dest).await;
    let beats_at_pause = console::heartbeats(&dest.console()).len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let beats_while_paused = console::heartbeats(&dest.console()).len() - beats_at_pause;

    // A resume to an address nobody listens on fails back to paused.
    let dead = InetAddress::loopback(ferry_qemu::nbd::free_loopback_port().unwrap());
    let mut events = source.qmp.subscribe();
    migration::migrate_resume(&source.qmp, &MigrationAddress::Tcp(dead))
        .await
        .unwrap();
    let failed = migration::wait_for_resume(&source.qmp, &mut events, STEP_TIMEOUT)
        .await
        .unwrap_err();
    eprintln!("resume to a dead address: {failed}");
    assert!(
        matches!(failed, MigrationError::RecoveryFailed { .. }),
        "{failed}"
    );
    assert_eq!(
        migration::query_migrate(&dest.qmp).await.unwrap().status,
        MigrationStatus::PostcopyPaused
    );

    // TLS and authz apply to the resumed channel as to the first one: with
    // the destination admitting only host3, host1's resume is refused, and
    // both sides stay recoverable.
    let host3 = AuthzSimple {
        id: "ferry-mig-authz-host3".into(),
        identity: PeerIdentity::host("host3").tls_authz_identity(),
    };
    tls::add_authz_simple(&dest.qmp, &host3).await.unwrap();
    let admit = |authz: &str| MigrationParameters {
        tls_creds: Some(TLS_ID.into()),
        tls_authz: Some(authz.into()),
        ..MigrationParameters::new(MAX_BANDWIDTH)
    };
    migration::set_parameters(&dest.qmp, &admit(&host3.id))
        .await
        .unwrap();
    let listen =
        migration::migrate_recover(&dest.qmp, &MigrationAddress::Tcp(InetAddress::loopback(0)))
            .await
            .unwrap();
    let mut events = source.qmp.subscribe();
    migration::migrate_resume(&source.qmp, &MigrationAddress::Tcp(listen))
        .await
        .unwrap();
    let refused = migration::wait_for_resume(&source.qmp, &mut events, STEP_TIMEOUT).await;
    let dest_after_refusal = migration::query_migrate(&dest.qmp).await.unwrap();
    eprintln!(
        "resume refused by the destination's authz: source {refused:?}; destination {} {:?}",
        dest_after_refusal.status, dest_after_refusal.error_desc
    );
    assert!(
        matches!(refused, Err(MigrationError::RecoveryFailed { .. })),
        "{refused:?}"
    );
    migration::set_parameters(&dest.qmp, &admit(AUTHZ_ID))
        .await
        .unwrap();
    migration::wait_for_status(&dest.qmp, &[MigrationStatus::PostcopyPaused], STEP_TIMEOUT)
        .await
        .unwrap();

    // Recover 1, through a new relay (the repaired link), TLS again.
    let listen =
        migration::migrate_recover(&dest.qmp, &MigrationAddress::Tcp(InetAddress::loopback(0)))
            .await
            .unwrap();
    let relay2 = Relay::start(listen).await;
    let mut events = source.qmp.subscribe();
    let recover1_started = Instant::now();
    migration::migrate_resume(&source.qmp, &MigrationAddress::Tcp(relay2.addr.clone()))
        .await
        .unwrap();
    migration::wait_for_resume(&source.qmp, &mut events, STEP_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("resume after the cut: {e}"));
    migration::wait_for_status(&dest.qmp, &[MigrationStatus::PostcopyActive], STEP_TIMEOUT)
        .await
        .unwrap();
    let recover1_took = recover1_started.elapsed();
    let beats = console::heartbeats(&dest.console()).len();
    wait_heartbeats(dest, "heartbeats after the first recovery", beats, 10).await;

    // Cut 2: migrate-pause on the source, recover directly.
    migration::migrate_pause(&source.qmp).await.unwrap();
    let why = wait_both_paused(source, dest).await;
    assert!(
        why.as_deref()
            .unwrap_or_default()
            .contains("paused by the user"),
        "{why:?}"
    );
    let recover2_took = recover(source, dest, |a| a).await;
    drop(relay2);

    // Finish: lift the post-copy cap; success is read on the destination.
    let finish_started = Instant::now();
    migration::set_parameters(
        &source.qmp,
        &MigrationParameters {
            max_postcopy_bandwidth: Some(0),
            ..MigrationParameters::new(MAX_BANDWIDTH)
        },
    )
    .await
    .unwrap();
    let done = migration::wait_for_status(&source.qmp, &[MigrationStatus::Completed], STEP_TIMEOUT)
        .await
        .unwrap();
    let dest_done =
        migration::wait_for_status(&dest.qmp, &[MigrationStatus::Completed], STEP_TIMEOUT)
            .await
            .unwrap();
    let finish_took = finish_started.elapsed();
    let postcopy_took = switched.elapsed();
    assert_eq!(run_state(source).await, (RunState::PostMigrate, false));
    assert_eq!(run_state(dest).await, (RunState::Running, true));

    // The guest goes on: heartbeats and disk records keep coming.
    let beats = console::heartbeats(&dest.console()).len();
    let dest_log = dest
        .wait_console(
            "heartbeats and disk records after completion",
            STEP_TIMEOUT,
            |log| {
                console::heartbeats(log).len() >= beats + 100
                    && console::disk_flushed(log).len() >= 20
            },
        )
        .await;
    let summary = verify_memory(&g, dest).await;
    let dest_log = {
        let now = dest.console();
        assert!(now.len() >= dest_log.len());
        now
    };

    // G1: the source stopped before the destination first ran, and never
    // ran again.
    let stops = source.events_named("STOP");
    let resumes = dest.events_named("RESUME");
    assert_eq!(stops.len(), 1, "one STOP on the source");
    assert_eq!(resumes.len(), 1, "one RESUME on the destination");
    assert!(stops[0].timestamp < resumes[0].timestamp);
    assert!(source
        .events()
        .iter()
        .skip_while(|e| e.name != "STOP")
        .all(|e| e.name != "RESUME"));

    // One boot, one unbroken heartbeat count, no oracle complaints.
    let source_log = source.console();
    let mut both = source_log.clone();
    both.extend_from_slice(&dest_log);
    let beats = HeartbeatReport::from_log(&both);
    beats
        .check_no_reset()
        .unwrap_or_else(|e| panic!("heartbeat across post-copy: {e} ({beats})"));
    assert!(console::heartbeats(&dest_log)[0] > last_source_beat);
    assert!(
        console::probe_ready_all(&dest_log).is_empty(),
        "the guest rebooted"
    );
    for log in [&source_log, &dest_log] {
        assert!(console::oracle_failures(log).is_empty());
        assert!(console::probe_errors(log).is_empty());
    }
    let last_flushed = console::last_disk_flushed(&dest_log).unwrap();
    let disk = disk_oracle::verify_test_disk(&g.disk, last_flushed)
        .unwrap_or_else(|e| panic!("disk oracle: {e}"));

    // The statuses each side went through.
    let statuses = |vm: &Vm| -> Vec<String> {
        vm.events_named("MIGRATION")
            .iter()
            .filter_map(migration::event_status)
            .map(|s| s.to_string())
            .collect()
    };
    let source_statuses = statuses(source);
    let dest_statuses = statuses(dest);
    for want in ["postcopy-active", "postcopy-paused", "postcopy-recover"] {
        assert!(
            source_statuses.iter().any(|s| s == want),
            "{source_statuses:?}"
        );
        assert!(dest_statuses.iter().any(|s| s == want), "{dest_statuses:?}");
    }

    migration::clear_tls(&source.qmp).await.unwrap();
    migration::clear_tls(&dest.qmp).await.unwrap();
    source.quit().await;
    dest.quit().await;

    let ram = done.ram.clone().unwrap_or_default();
    println!(
        "POSTCOPY RECOVERY REPORT (512 MiB guest, probe dirtying {} MiB as fast as it can, TLS):\n\
         \x20 boot {booted_in:.2?}; pre-copy first pass {precopy_took:.2?}\n\
         \x20 cut 1 (relay dropped) detected by both sides in {cut_detected_in:.2?}; \
         destination while paused: {dest_paused_state:?}, {beats_while_paused} heartbeats in 0.5 s\n\
         \x20 recovery 1 (new relay, TLS) {recover1_took:.2?}; recovery 2 (after migrate-pause) {recover2_took:.2?}\n\
         \x20 finish after lifting the post-copy cap {finish_took:.2?}; post-copy in all {postcopy_took:.2?}\n\
         \x20 QEMU source: total-time {} ms, downtime {} ms; RAM {:.1} MiB (post-copy {:.1} MiB, \
         {} page requests)\n\
         \x20 QEMU destination: {:?}\n\
         \x20 source statuses {source_statuses:?}\n\
         \x20 destination statuses {dest_statuses:?}\n\
         \x20 memory oracle: {} pages, counter {}, step at {:?}; {beats}; disk records {:?}\n\
         \x20 wall time {:.2?}",
        g.probe.mem_mib,
        done.total_time.unwrap_or_default(),
        done.downtime.unwrap_or_default(),
        ram.transferred as f64 / 1048576.0,
        ram.postcopy_bytes as f64 / 1048576.0,
        ram.postcopy_requests,
        dest_done.status,
        summary.pages,
        summary.counter,
        summary.step_at,
        disk.verified,
        test_started.elapsed(),
    );
}

/// Without `-S` the destination starts the guest by itself as soon as
/// post-copy begins (`RESUME`, run state `running`), while the source
/// still holds the pages not yet sent: the guest executes on the
/// destination during post-copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dash_s_the_destination_runs_the_guest_as_soon_as_postcopy_starts() {
    let _one_at_a_time = SERIAL.lock().await;
    let test_started = Instant::now();
    let g = boot_pair("postcopy-autostart", false).await;
    let (source, dest) = (&g.source, &g.dest);
    assert_eq!(run_state(dest).await, (RunState::InMigrate, false));

    enable_postcopy(source, dest, false).await;
    let params = MigrationParameters {
        downtime_limit: Some(DOWNTIME_LIMIT),
        max_postcopy_bandwidth: Some(SLOW_POSTCOPY),
        ..MigrationParameters::new(MAX_BANDWIDTH)
    };
    migration::set_parameters(&source.qmp, &params)
        .await
        .unwrap();
    let listen = migration::migrate_incoming(
        &dest.qmp,
        &MigrationAddress::Tcp(InetAddress::loopback(0)),
        false,
    )
    .await
    .unwrap();
    migration::migrate(&source.qmp, &MigrationAddress::Tcp(listen))
        .await
        .unwrap();
    // migrate-pause is for post-copy only.
    assert!(migration::migrate_pause(&source.qmp).await.is_err());
    start_postcopy_after_first_pass(&source.qmp).await;
    migration::wait_for_status(&dest.qmp, &[MigrationStatus::PostcopyActive], STEP_TIMEOUT)
        .await
        .unwrap();

    // Running, with heartbeats, while post-copy is still active.
    wait_heartbeats(
        dest,
        "heartbeats on the destination during post-copy",
        0,
        10,
    )
    .await;
    assert_eq!(run_state(dest).await, (RunState::Running, true));
    assert_eq!(dest.events_named("RESUME").len(), 1);
    assert_eq!(
        migration::query_migrate(&dest.qmp).await.unwrap().status,
        MigrationStatus::PostcopyActive
    );
    assert_eq!(run_state(source).await, (RunState::FinishMigrate, false));

    migration::set_parameters(
        &source.qmp,
        &MigrationParameters {
            max_postcopy_bandwidth: Some(0),
            ..MigrationParameters::new(MAX_BANDWIDTH)
        },
    )
    .await
    .unwrap();
    migration::wait_for_status(&dest.qmp, &[MigrationStatus::Completed], STEP_TIMEOUT)
        .await
        .unwrap();
    let summary = verify_memory(&g, dest).await;
    let log = dest.console();
    assert!(console::oracle_failures(&log).is_empty());
    assert!(
        console::probe_ready_all(&log).is_empty(),
        "the guest rebooted"
    );
    source.quit().await;
    dest.quit().await;
    println!(
        "POSTCOPY AUTOSTART: destination running during post-copy; memory oracle {} pages; \
         wall time {:.2?}",
        summary.pages,
        test_started.elapsed()
    );
}

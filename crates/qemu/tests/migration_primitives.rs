//! The migration primitives against a real QEMU 10.0 without a guest
//! (`-machine none`): idempotency of every add/remove step, refusal of
//! conflicting reuse, and what QEMU does to mirrors that are or are not
//! READY. Fast (well under a second of QEMU each); the full flow is in
//! `migration_live.rs`.

mod migration_support;

use std::time::Duration;

use ferry_pki::PeerIdentity;
use ferry_qemu::blockjob::{self, BlockJobError, JobEnd, MirrorJob};
use ferry_qemu::migration::{
    self, MigrationCapability, MigrationError, MigrationParameters, MigrationStatus,
};
use ferry_qemu::nbd::{self, ExportDelMode, InetAddress, NbdError, NbdExport, NbdServerConfig};
use ferry_qemu::tls::{self, Applied, AuthzSimple, TlsCredsX509, TlsEndpoint, TlsError};
use migration_support::{BareQemu, Scratch, TestPki};

const MIB: u64 = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn tls_objects_repeat_as_no_ops_and_conflicting_reuse_is_refused() {
    let scratch = Scratch::new("tls-objects");
    let pki = TestPki::new(scratch.path(), &["host1", "host2"]);
    let qemu = BareQemu::launch().await;
    let q = &qemu.qmp;
    let creds = TlsCredsX509 {
        id: "tls0".into(),
        dir: pki.dir("host2").to_owned(),
        endpoint: TlsEndpoint::Server,
    };
    let authz = AuthzSimple {
        id: "authz0".into(),
        identity: PeerIdentity::host("host1").tls_authz_identity(),
    };

    assert_eq!(
        tls::add_tls_creds_x509(q, &creds).await.unwrap(),
        Applied::Done
    );
    assert_eq!(
        tls::add_tls_creds_x509(q, &creds).await.unwrap(),
        Applied::AlreadyDone
    );
    assert_eq!(
        tls::add_authz_simple(q, &authz).await.unwrap(),
        Applied::Done
    );
    assert_eq!(
        tls::add_authz_simple(q, &authz).await.unwrap(),
        Applied::AlreadyDone
    );
    assert_eq!(
        tls::object_type(q, "tls0").await.unwrap().as_deref(),
        Some("tls-creds-x509")
    );

    // Same id, different meaning: refused, and the original is untouched.
    let as_client = TlsCredsX509 {
        endpoint: TlsEndpoint::Client,
        ..creds.clone()
    };
    let err = tls::add_tls_creds_x509(q, &as_client).await.unwrap_err();
    assert!(
        matches!(
            err,
            TlsError::Conflict {
                property: "endpoint",
                ..
            }
        ),
        "{err}"
    );
    let other_dir = TlsCredsX509 {
        dir: pki.dir("host1").to_owned(),
        ..creds.clone()
    };
    let err = tls::add_tls_creds_x509(q, &other_dir).await.unwrap_err();
    assert!(
        matches!(
            err,
            TlsError::Conflict {
                property: "dir",
                ..
            }
        ),
        "{err}"
    );
    let other_host = AuthzSimple {
        identity: PeerIdentity::host("host3").tls_authz_identity(),
        ..authz.clone()
    };
    let err = tls::add_authz_simple(q, &other_host).await.unwrap_err();
    assert!(
        matches!(
            err,
            TlsError::Conflict {
                property: "identity",
                ..
            }
        ),
        "{err}"
    );
    let authz_named_like_creds = AuthzSimple {
        id: "tls0".into(),
        ..authz.clone()
    };
    let err = tls::add_authz_simple(q, &authz_named_like_creds)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TlsError::Conflict {
                property: "type",
                ..
            }
        ),
        "{err}"
    );

    // Bad input: a clear error and nothing created.
    let missing = TlsCredsX509 {
        id: "tls1".into(),
        dir: scratch.path().join("no-such-folder"),
        endpoint: TlsEndpoint::Server,
    };
    let err = tls::add_tls_creds_x509(q, &missing).await.unwrap_err();
    assert!(matches!(err, TlsError::Qmp { .. }), "{err}");
    assert_eq!(tls::object_type(q, "tls1").await.unwrap(), None);
    let relative = TlsCredsX509 {
        dir: "relative/dir".into(),
        ..missing.clone()
    };
    assert!(matches!(
        tls::add_tls_creds_x509(q, &relative).await,
        Err(TlsError::InvalidDir { .. })
    ));
    let bad_id = TlsCredsX509 {
        id: "1bad id".into(),
        ..creds.clone()
    };
    assert!(matches!(
        tls::add_tls_creds_x509(q, &bad_id).await,
        Err(TlsError::InvalidId { .. })
    ));

    // Undo, twice.
    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(tls::del_object(q, "authz0").await.unwrap(), expected);
        assert_eq!(tls::del_object(q, "tls0").await.unwrap(), expected);
    }
}

#[tokio::test]
async fn nbd_server_and_exports_repeat_as_no_ops() {
    let qemu = BareQemu::launch().await;
    let q = &qemu.qmp;
    qemu.null_node("fmt-d1", 16 * MIB).await;
    qemu.null_node("fmt-d2", 16 * MIB).await;
    let config = NbdServerConfig {
        addr: InetAddress::loopback(nbd::free_loopback_port().unwrap()),
        tls_creds: None,
        tls_authz: None,
        max_connections: Some(4),
    };

    let authz_without_tls = NbdServerConfig {
        tls_authz: Some("authz0".into()),
        ..config.clone()
    };
    assert!(matches!(
        nbd::nbd_server_start(q, &authz_without_tls).await,
        Err(NbdError::Invalid { .. })
    ));
    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(nbd::nbd_server_start(q, &config).await.unwrap(), expected);
        assert_eq!(
            nbd::block_export_add(q, &NbdExport::for_disk("d1"))
                .await
                .unwrap(),
            expected
        );
    }
    let same_id_other_node = NbdExport {
        node_name: "fmt-d2".into(),
        ..NbdExport::for_disk("d1")
    };
    let err = nbd::block_export_add(q, &same_id_other_node)
        .await
        .unwrap_err();
    assert!(matches!(err, NbdError::ExportConflict { .. }), "{err}");
    let exports = nbd::query_block_exports(q).await.unwrap();
    assert_eq!(exports.len(), 1);
    assert_eq!(exports[0].node_name, "fmt-d1");

    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(
            nbd::block_export_del(q, &nbd::export_id("d1"), ExportDelMode::Safe)
                .await
                .unwrap(),
            expected
        );
    }
    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(nbd::nbd_server_stop(q).await.unwrap(), expected);
    }
}

#[tokio::test]
async fn a_ready_mirror_cancelled_without_force_completes_and_an_unready_one_is_refused() {
    let qemu = BareQemu::launch().await;
    let q = &qemu.qmp;
    // Disk "a": small, converges at once. Disk "b": large and throttled,
    // so it is still in its bulk copy when asked to complete.
    for (node, len) in [
        ("fmt-a", 64 * MIB),
        ("nbd-a", 64 * MIB),
        ("fmt-b", 1024 * MIB),
        ("nbd-b", 1024 * MIB),
        ("fmt-c", 16 * MIB),
        ("nbd-c", 16 * MIB),
    ] {
        qemu.null_node(node, len).await;
    }
    let a = MirrorJob::for_disk("a");
    let b = MirrorJob {
        speed: Some(MIB),
        ..MirrorJob::for_disk("b")
    };
    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(blockjob::blockdev_mirror(q, &a).await.unwrap(), expected);
        assert_eq!(blockjob::blockdev_mirror(q, &b).await.unwrap(), expected);
    }

    blockjob::wait_ready(q, std::slice::from_ref(&a.job_id), TIMEOUT)
        .await
        .unwrap();
    let jobs = blockjob::query_block_jobs(q).await.unwrap();
    let (ja, jb) = (
        jobs.iter().find(|j| j.device == a.job_id).unwrap(),
        jobs.iter().find(|j| j.device == b.job_id).unwrap(),
    );
    assert!(ja.ready && ja.kind == "mirror");
    assert!(!jb.ready && jb.offset < jb.len && jb.speed == MIB);

    // Completing both is refused as a whole: b would be abandoned.
    let both = [a.job_id.clone(), b.job_id.clone()];
    let err = blockjob::complete_mirrors(q, &both, TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BlockJobError::NotReady { job, .. } if job == &b.job_id),
        "{err}"
    );
    assert_eq!(blockjob::query_block_jobs(q).await.unwrap().len(), 2);

    // a alone completes (BLOCK_JOB_COMPLETED, not CANCELLED) and is gone.
    blockjob::complete_mirrors(q, std::slice::from_ref(&a.job_id), TIMEOUT)
        .await
        .unwrap();
    // b is undone with force: CANCELLED; repeating is harmless.
    assert_eq!(
        blockjob::force_cancel(q, &b.job_id, TIMEOUT).await.unwrap(),
        Some(JobEnd::Cancelled)
    );
    assert_eq!(
        blockjob::force_cancel(q, &b.job_id, TIMEOUT).await.unwrap(),
        None
    );
    assert!(blockjob::query_block_jobs(q).await.unwrap().is_empty());

    // Force on a READY mirror also ends it CANCELLED (QEMU 10.0): force is
    // the undo, never the switchover.
    let c = MirrorJob::for_disk("c");
    blockjob::blockdev_mirror(q, &c).await.unwrap();
    blockjob::wait_ready(q, std::slice::from_ref(&c.job_id), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        blockjob::force_cancel(q, &c.job_id, TIMEOUT).await.unwrap(),
        Some(JobEnd::Cancelled)
    );

    // Waiting on a job that does not exist fails at once.
    assert!(matches!(
        blockjob::wait_ready(q, std::slice::from_ref(&a.job_id), TIMEOUT).await,
        Err(BlockJobError::NoSuchJob { .. })
    ));
    // Target nodes are removable once their jobs ended; twice is harmless.
    for expected in [Applied::Done, Applied::AlreadyDone] {
        assert_eq!(blockjob::blockdev_del(q, "nbd-a").await.unwrap(), expected);
    }
}

#[tokio::test]
async fn migration_settings_round_trip_and_bad_values_change_nothing() {
    let qemu = BareQemu::launch().await;
    let q = &qemu.qmp;

    let before = migration::query_parameters(q).await.unwrap();
    assert_eq!(before.max_bandwidth, 128 * MIB, "QEMU's default, the trap");
    assert!(matches!(
        migration::set_parameters(q, &MigrationParameters::new(0)).await,
        Err(MigrationError::Invalid { .. })
    ));
    assert_eq!(migration::query_parameters(q).await.unwrap(), before);

    let params = MigrationParameters {
        downtime_limit: Some(Duration::from_millis(250)),
        tls_creds: Some("tls0".into()),
        tls_hostname: Some("host2".into()),
        cpu_throttle_initial: Some(30),
        cpu_throttle_increment: Some(15),
        multifd_channels: Some(4),
        xbzrle_cache_size: Some(32 * MIB),
        ..MigrationParameters::new(1 << 30)
    };
    migration::set_parameters(q, &params).await.unwrap();
    let now = migration::query_parameters(q).await.unwrap();
    assert_eq!(now.max_bandwidth, 1 << 30);
    assert_eq!(now.downtime_limit, 250);
    assert_eq!(
        (now.tls_creds.as_str(), now.tls_hostname.as_str()),
        ("tls0", "host2")
    );
    assert_eq!(now.cpu_throttle_initial, Some(30));
    assert_eq!(now.multifd_channels, Some(4));
    assert_eq!(now.xbzrle_cache_size, Some(32 * MIB));

    migration::set_max_bandwidth(q, 2 << 30).await.unwrap();
    migration::set_downtime_limit(q, Duration::from_millis(500))
        .await
        .unwrap();
    migration::clear_tls(q).await.unwrap();
    let now = migration::query_parameters(q).await.unwrap();
    assert_eq!((now.max_bandwidth, now.downtime_limit), (2 << 30, 500));
    assert!(now.tls_creds.is_empty() && now.tls_hostname.is_empty() && now.tls_authz.is_empty());

    // pause-before-switchover is accepted without events in 10.0.
    migration::set_capabilities(q, &[(MigrationCapability::PauseBeforeSwitchover, true)])
        .await
        .unwrap();
    migration::set_capabilities(
        q,
        &[
            (MigrationCapability::Events, true),
            (MigrationCapability::AutoConverge, true),
        ],
    )
    .await
    .unwrap();
    let caps = migration::query_capabilities(q).await.unwrap();
    for cap in ["events", "pause-before-switchover", "auto-converge"] {
        assert_eq!(caps.get(cap), Some(&true), "{cap}");
    }
    // QEMU's own refusals come through as QMP errors.
    let err = migration::set_capabilities(
        q,
        &[
            (MigrationCapability::Multifd, true),
            (MigrationCapability::PostcopyRam, true),
        ],
    )
    .await
    .unwrap_err();
    assert!(matches!(err, MigrationError::Qmp { .. }), "{err}");

    // Idle: no status, continue refused, cancel harmless.
    let idle = migration::query_migrate(q).await.unwrap();
    assert_eq!(idle.status, MigrationStatus::None);
    assert!(migration::migrate_continue(q).await.is_err());
    migration::migrate_cancel(q).await.unwrap();
}

/// QEMU 10.0 does not make `migrate` wait for mirrors: the source reaches
/// `pre-switchover` with a mirror still copying. The caller must wait for
/// READY first; `complete_mirrors` refuses, and `migrate_cancel` undoes the
/// migration while a destination started without exit-on-error stays up.
#[tokio::test]
async fn migrate_reaches_pre_switchover_with_an_unready_mirror_which_complete_refuses() {
    let source = BareQemu::launch().await;
    let dest = BareQemu::launch_with(Some("defer")).await;
    let (s, d) = (&source.qmp, &dest.qmp);
    source.null_node("fmt-slow", 1024 * MIB).await;
    source.null_node("nbd-slow", 1024 * MIB).await;
    let job = MirrorJob {
        speed: Some(MIB),
        ..MirrorJob::for_disk("slow")
    };
    blockjob::blockdev_mirror(s, &job).await.unwrap();

    let listen = migration::migrate_incoming(
        d,
        &migration::MigrationAddress::Tcp(InetAddress::loopback(0)),
        false,
    )
    .await
    .unwrap();
    migration::set_capabilities(s, &[(MigrationCapability::PauseBeforeSwitchover, true)])
        .await
        .unwrap();
    migration::set_parameters(s, &MigrationParameters::new(1 << 30))
        .await
        .unwrap();
    migration::migrate(s, &migration::MigrationAddress::Tcp(listen))
        .await
        .unwrap();
    migration::wait_for_status(s, &[MigrationStatus::PreSwitchover], TIMEOUT)
        .await
        .unwrap();

    let jobs = blockjob::query_block_jobs(s).await.unwrap();
    assert!(!jobs[0].ready, "QEMU did not wait for the mirror: {jobs:?}");
    let err = blockjob::complete_mirrors(s, std::slice::from_ref(&job.job_id), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, BlockJobError::NotReady { .. }), "{err}");

    migration::migrate_cancel(s).await.unwrap();
    migration::wait_for_status(s, &[MigrationStatus::Cancelled], TIMEOUT)
        .await
        .unwrap();
    let dest_view = migration::wait_for_status(d, &[MigrationStatus::Failed], TIMEOUT)
        .await
        .unwrap();
    assert!(dest.process.is_alive(), "exit-on-error=false keeps it");
    assert_eq!(dest_view.status, MigrationStatus::Failed);
    assert_eq!(
        blockjob::force_cancel(s, &job.job_id, TIMEOUT)
            .await
            .unwrap(),
        Some(JobEnd::Cancelled)
    );
}

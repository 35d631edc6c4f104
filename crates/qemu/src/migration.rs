//! Live migration of RAM and device state: capabilities, parameters, the
//! `migrate`/`migrate-incoming` pair, the switchover pause, progress and
//! dirty-rate sampling. Thin typed wrappers; when to call them, and what to
//! do when something fails, is the agent's and the controller's business.
//!
//! # The sequence with local disks (QEMU 10.0, verified in `tests/migration_live.rs`)
//!
//! ```text
//!   destination (-incoming defer, -S)            source (running)
//!   ─────────────────────────────────            ────────────────
//!   object-add tls-creds-x509 (server)
//!   object-add authz-simple (source's DN)
//!   nbd-server-start + block-export-add
//!   migrate-set-capabilities [events]
//!   migrate-set-parameters tls-creds, tls-authz
//!   migrate-incoming tcp:ADDR:0  ──(port)──▶     object-add tls-creds-x509 (client)
//!                                                blockdev-add nbd + blockdev-mirror
//!                                                wait BLOCK_JOB_READY (all disks)
//!                                                migrate-set-capabilities [events, pause-before-switchover]
//!                                                migrate-set-parameters max-bandwidth, downtime-limit,
//!                                                                       tls-creds, tls-hostname
//!                        ◀─────── RAM ────────   migrate
//!   MIGRATION active                             MIGRATION pre-switchover (vCPUs stopped: STOP)
//!                                                block-job-cancel (no force) → BLOCK_JOB_COMPLETED
//!                        ◀── device state ────   migrate-continue pre-switchover
//!   MIGRATION completed, status paused           MIGRATION completed, status postmigrate
//!   nbd-server-stop, cont (RESUME)               blockdev-del nbd, quit
//! ```
//!
//! # QEMU 10.0 facts this relies on (measured with 10.0.2)
//!
//! * `migrate` and `migrate-incoming` accept either `uri` (`tcp:HOST:PORT`)
//!   or `channels` (a list with one `main` channel holding a flat socket
//!   address), never both. Ferry uses `channels`, the form QEMU is moving
//!   to. Port 0 on the destination makes QEMU pick a free port, which
//!   `query-migrate` then reports in `socket-address`
//!   ([`migrate_incoming`] returns it).
//! * `migrate-incoming` has `exit-on-error`, default **true**: a destination
//!   whose incoming migration fails *exits*. Ferry passes it explicitly;
//!   `false` keeps the QEMU (still `inmigrate`) so the agent can look at it
//!   before tearing it down.
//! * `pause-before-switchover` does not require `events` (QEMU accepts it
//!   alone), but without `events` nothing announces `pre-switchover`; the
//!   waits here also poll, so they work either way.
//! * At `pre-switchover` the source's vCPUs are already stopped (`STOP` is
//!   emitted, run state `finish-migrate`), so everything done before
//!   `migrate-continue` counts in the guest's downtime and in QEMU's
//!   `downtime` figure: keep the switchover step short.
//! * `migrate_cancel` at `pre-switchover` resumes the source's vCPUs by
//!   itself (run state back to `running`).
//! * QEMU's default `max-bandwidth` is 128 MiB/s (134217728), which a guest
//!   dirtying memory faster than that never beats: [`MigrationParameters`]
//!   cannot be built without an explicit bandwidth.
//! * A refused TLS client: with a 512 MiB guest the source fails quickly
//!   ("Connection reset by peer") and the destination stays in `setup`
//!   (`inmigrate`). With a very small stream the source can however report
//!   `completed` (TLS 1.3 finishes the client's handshake before the server
//!   judges its certificate): **success is read on the destination**
//!   ([`query_migrate`] there says `completed`), never on the source alone.
//!
//! # Post-copy and its recovery (QEMU 10.0.2, verified in `tests/postcopy_recovery.rs`)
//!
//! ```text
//!   destination (-incoming defer, -S)            source (running)
//!   capabilities events, postcopy-ram            capabilities events, postcopy-ram,
//!   tls-creds, tls-authz; migrate-incoming                    pause-before-switchover
//!                                                max-postcopy-bandwidth, …; migrate
//!                                                migrate-start-postcopy
//!   (still active, inmigrate)                    pre-switchover (STOP; cancellable)
//!                                                migrate-continue      ← point of no return
//!   postcopy-active, run state paused            postcopy-active, finish-migrate
//!   cont (RESUME)                   ← the guest runs here from now on
//!        ── link breaks (or migrate-pause on either side) ──
//!   postcopy-paused (guest frozen)               postcopy-paused (error-desc says why)
//!   migrate-recover tcp:ADDR:0 ──(port)──▶       migrate {channels, resume: true}
//!   postcopy-recover → postcopy-active           postcopy-recover-setup → postcopy-recover
//!                                                → postcopy-active
//!   completed (running)                          completed (postmigrate)
//! ```
//!
//! * `postcopy-ram` must be on at both ends; the return path opens by
//!   itself (no `return-path` capability needed).
//! * `pause-before-switchover` applies to post-copy too: after
//!   `migrate-start-postcopy` the source stops at `pre-switchover`, where
//!   `migrate_cancel` still works and resumes the source. After
//!   `migrate-continue` (or `migrate-start-postcopy` without that
//!   capability) QEMU refuses `migrate_cancel` ("Postcopy migration in
//!   progress, cannot cancel.") and `cont` on the source ("Migration is not
//!   finalized yet") in every post-copy state, paused included: the source
//!   can never run the guest again, even if the destination never ran it.
//! * The destination's run state in post-copy: with `-S`, `paused` until
//!   `cont` (nothing runs; background pages keep arriving); without `-S`,
//!   `running` (`RESUME`) as soon as post-copy begins. The source stays in
//!   `finish-migrate` until `completed`, then `postmigrate`.
//! * A broken link (a TCP connection reset or closed) pauses both ends
//!   within ~0.1 s; a link that silently drops packets is only noticed by
//!   TCP's timeouts, so the agent should call [`migrate_pause`] when it
//!   knows the link is gone. In `postcopy-paused` the destination reports
//!   `running` but its vCPUs are blocked on missing pages (no heartbeat).
//! * Recovery: the destination must be in `postcopy-paused` and run
//!   `migrate-recover` ([`migrate_recover`]) *before* the source resumes
//!   ([`migrate_resume`], then [`wait_for_resume`]); a resume to nothing
//!   fails back to `postcopy-paused` ("Connection refused") and can simply
//!   be retried. `migrate-recover` again while paused replaces the
//!   listener. Each side refuses these commands in any other state, and
//!   `migrate-pause` outside post-copy.
//! * TLS: the resumed channel uses each side's current TLS parameters,
//!   authz included (a destination admitting another host refuses the
//!   resume; both ends stay paused and recoverable). Keep the TLS objects
//!   and parameters on both ends until `completed`.
//! * Only the link is recoverable. If either QEMU dies in post-copy the
//!   guest's memory is split between the two and it is lost; what remains
//!   is a cold boot from the disks (consistent up to the switchover, then
//!   the destination's).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::Instant;

use crate::nbd::InetAddress;
use crate::qmp::{Qmp, QmpError, QmpEvent};

/// How often a wait re-reads `query-migrate` besides watching events.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// QEMU's upper bound on `downtime-limit` (2000 s, in ms).
pub const MAX_DOWNTIME_LIMIT: Duration = Duration::from_secs(2000);

/// Longest dirty-rate sample QEMU accepts.
pub const MAX_DIRTY_RATE_SAMPLE: Duration = Duration::from_secs(60);

/// Migration capabilities Ferry uses.
///
/// Which ends need them: `multifd`, `postcopy-ram` and `return-path` must be
/// set identically on **both** ends (the destination must expect extra
/// channels, the postcopy protocol, a return path); `events` is per end (it
/// only controls the `MIGRATION` events of that QEMU); `pause-before-switchover`,
/// `auto-converge` and `xbzrle` are source-side (harmless on the
/// destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MigrationCapability {
    /// Emit `MIGRATION` and `MIGRATION_PASS` events.
    Events,
    /// Stop at `pre-switchover` (vCPUs stopped, disks still owned by the
    /// source) until `migrate-continue`: the moment to complete mirrors.
    PauseBeforeSwitchover,
    /// Throttle the guest's vCPUs when it dirties memory faster than the
    /// link drains it (works under TCG; `dirty-limit` needs a KVM dirty ring).
    AutoConverge,
    /// Send XOR-encoded deltas of re-dirtied pages (CPU for bandwidth).
    Xbzrle,
    /// Several parallel RAM channels.
    Multifd,
    /// Allow switching to post-copy ([`migrate_start_postcopy`]).
    PostcopyRam,
    /// A destination→source channel. Post-copy opens one by itself in
    /// QEMU 10.0 (its page requests travel on it); this asks for it without
    /// post-copy.
    ReturnPath,
}

impl MigrationCapability {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationCapability::Events => "events",
            MigrationCapability::PauseBeforeSwitchover => "pause-before-switchover",
            MigrationCapability::AutoConverge => "auto-converge",
            MigrationCapability::Xbzrle => "xbzrle",
            MigrationCapability::Multifd => "multifd",
            MigrationCapability::PostcopyRam => "postcopy-ram",
            MigrationCapability::ReturnPath => "return-path",
        }
    }
}

impl fmt::Display for MigrationCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Migration parameters to set before `migrate` (or `migrate-incoming`).
///
/// `max_bandwidth` is not optional: QEMU's default of 128 MiB/s silently
/// caps every migration and makes a busy guest never converge. Every other
/// field left `None` is not sent (QEMU keeps its current value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationParameters {
    /// Bytes per second for pre-copy. Must be > 0.
    pub max_bandwidth: u64,
    /// Largest pause QEMU plans for at switchover; it switches over once the
    /// remaining RAM fits in it at the measured rate.
    pub downtime_limit: Option<Duration>,
    /// Id of the `tls-creds-x509` object (server on the destination, client
    /// on the source).
    pub tls_creds: Option<String>,
    /// Source only: the name the destination's certificate must carry.
    pub tls_hostname: Option<String>,
    /// Destination only: the `authz-simple` object naming the source.
    pub tls_authz: Option<String>,
    /// Auto-converge: first throttle, percent (1..=99).
    pub cpu_throttle_initial: Option<u8>,
    /// Auto-converge: added per pass that does not converge, percent (1..=99).
    pub cpu_throttle_increment: Option<u8>,
    /// Auto-converge: ceiling, percent (1..=99).
    pub max_cpu_throttle: Option<u8>,
    /// Multifd: number of channels (1..=255); same on both ends.
    pub multifd_channels: Option<u8>,
    /// Xbzrle: cache size in bytes.
    pub xbzrle_cache_size: Option<u64>,
    /// Post-copy: bytes per second (0 = unlimited).
    pub max_postcopy_bandwidth: Option<u64>,
    /// Destination: how the guest's NICs are announced (RARP, or a guest
    /// GARP through virtio-net's announce feature) once it resumes, so that
    /// switches and bridges learn its MACs' new port.
    pub announce: Option<Announce>,
}

/// QEMU's self-announce schedule after an incoming migration: the first
/// round `initial` after the guest resumes, then every `step` more (growing
/// by `step` per round, capped at `max`), `rounds` in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    pub initial: Duration,
    pub max: Duration,
    pub rounds: u32,
    pub step: Duration,
}

impl Announce {
    /// Ferry's schedule, set explicitly rather than left to QEMU's defaults
    /// (50 ms initial, 5 rounds): the first announcement matters most, since
    /// until a bridge hears from the guest's new port every frame for it
    /// still goes to the old one, which is gone. So it goes out 10 ms after
    /// resume, and the next ones follow closely (60, 160, 310 … ms), in case
    /// the first is lost on a busy link; 8 rounds cover about 1.7 s.
    pub const FERRY: Announce = Announce {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(400),
        rounds: 8,
        step: Duration::from_millis(50),
    };
}

impl MigrationParameters {
    /// Parameters with an explicit bandwidth and nothing else.
    pub fn new(max_bandwidth: u64) -> MigrationParameters {
        MigrationParameters {
            max_bandwidth,
            downtime_limit: None,
            tls_creds: None,
            tls_hostname: None,
            tls_authz: None,
            cpu_throttle_initial: None,
            cpu_throttle_increment: None,
            max_cpu_throttle: None,
            multifd_channels: None,
            xbzrle_cache_size: None,
            max_postcopy_bandwidth: None,
            announce: None,
        }
    }

    /// The `migrate-set-parameters` arguments, after validation.
    fn to_json(&self) -> Result<Value, MigrationError> {
        let mut args = Map::new();
        if self.max_bandwidth == 0 {
            return Err(invalid("max-bandwidth", "0", "must be > 0 bytes/s"));
        }
        args.insert("max-bandwidth".into(), json!(self.max_bandwidth));
        if let Some(limit) = self.downtime_limit {
            args.insert("downtime-limit".into(), json!(downtime_ms(limit)?));
        }
        for (key, value) in [
            ("tls-creds", &self.tls_creds),
            ("tls-hostname", &self.tls_hostname),
            ("tls-authz", &self.tls_authz),
        ] {
            if let Some(v) = value {
                if v.is_empty() {
                    return Err(invalid(
                        key,
                        "",
                        "empty; use clear_tls to turn TLS off explicitly",
                    ));
                }
                args.insert(key.into(), json!(v));
            }
        }
        for (key, value) in [
            ("cpu-throttle-initial", self.cpu_throttle_initial),
            ("cpu-throttle-increment", self.cpu_throttle_increment),
            ("max-cpu-throttle", self.max_cpu_throttle),
        ] {
            if let Some(v) = value {
                if !(1..=99).contains(&v) {
                    return Err(invalid(key, &v.to_string(), "must be 1..=99 percent"));
                }
                args.insert(key.into(), json!(v));
            }
        }
        if let Some(n) = self.multifd_channels {
            if n == 0 {
                return Err(invalid("multifd-channels", "0", "must be 1..=255"));
            }
            args.insert("multifd-channels".into(), json!(n));
        }
        if let Some(size) = self.xbzrle_cache_size {
            args.insert("xbzrle-cache-size".into(), json!(size));
        }
        if let Some(bw) = self.max_postcopy_bandwidth {
            args.insert("max-postcopy-bandwidth".into(), json!(bw));
        }
        if let Some(announce) = self.announce {
            if announce.rounds == 0 || announce.step.is_zero() {
                return Err(invalid(
                    "announce-rounds",
                    &format!("{announce:?}"),
                    "rounds and step must be > 0",
                ));
            }
            let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            args.insert("announce-initial".into(), json!(ms(announce.initial)));
            args.insert("announce-max".into(), json!(ms(announce.max)));
            args.insert("announce-rounds".into(), json!(announce.rounds));
            args.insert("announce-step".into(), json!(ms(announce.step)));
        }
        Ok(Value::Object(args))
    }
}

fn downtime_ms(limit: Duration) -> Result<u64, MigrationError> {
    if limit.is_zero() || limit > MAX_DOWNTIME_LIMIT {
        return Err(invalid(
            "downtime-limit",
            &format!("{limit:?}"),
            "must be > 0 and at most 2000 s",
        ));
    }
    // Whole milliseconds, rounded up so that a sub-millisecond limit does
    // not become 0.
    Ok(u64::try_from(limit.as_micros().div_ceil(1000)).unwrap_or(u64::MAX))
}

/// The parameters `query-migrate-parameters` reports that Ferry looks at.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParametersInfo {
    pub max_bandwidth: u64,
    /// Milliseconds.
    pub downtime_limit: u64,
    /// Empty when TLS is off.
    #[serde(default)]
    pub tls_creds: String,
    #[serde(default)]
    pub tls_hostname: String,
    #[serde(default)]
    pub tls_authz: String,
    #[serde(default)]
    pub cpu_throttle_initial: Option<u64>,
    #[serde(default)]
    pub cpu_throttle_increment: Option<u64>,
    #[serde(default)]
    pub max_cpu_throttle: Option<u64>,
    #[serde(default)]
    pub multifd_channels: Option<u64>,
    #[serde(default)]
    pub xbzrle_cache_size: Option<u64>,
}

/// Where a migration stream goes (source) or is accepted (destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationAddress {
    /// Plain TCP (encrypted when the parameters name `tls-creds`).
    Tcp(InetAddress),
}

impl MigrationAddress {
    /// The `channels` argument: one `main` channel.
    fn to_channels(&self) -> Value {
        match self {
            MigrationAddress::Tcp(addr) => {
                let mut addr_json = addr.to_flat_json();
                addr_json["transport"] = json!("socket");
                json!([{"channel-type": "main", "addr": addr_json}])
            }
        }
    }

    /// The legacy URI form (`tcp:HOST:PORT`, IPv6 in brackets), for
    /// `migrate-recover`, which in QEMU 10.0 takes only `uri`.
    fn to_uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for MigrationAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationAddress::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Migration status (`MigrationStatus`), with unknown values kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(from = "String")]
pub enum MigrationStatus {
    /// No migration has been started (also: `query-migrate` said nothing).
    #[default]
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    /// Source paused before the switchover (`pause-before-switchover`).
    PreSwitchover,
    /// Device state is being sent (after `migrate-continue`).
    Device,
    WaitUnplug,
    Other(String),
}

impl MigrationStatus {
    pub fn as_str(&self) -> &str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecoverSetup => "postcopy-recover-setup",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Colo => "colo",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::WaitUnplug => "wait-unplug",
            MigrationStatus::Other(s) => s,
        }
    }

    /// The migration is over (QEMU will not change this status by itself).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }

    /// In post-copy (`postcopy-active`, `-paused`, `-recover-setup`,
    /// `-recover`): the source has handed its device state over and QEMU
    /// refuses both `migrate_cancel` and `cont` on it, so it can never run
    /// the guest again; only the destination can (or nobody, if a QEMU dies
    /// before `completed`). See the module docs.
    pub fn is_postcopy(&self) -> bool {
        matches!(
            self,
            MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecoverSetup
                | MigrationStatus::PostcopyRecover
        )
    }
}

impl From<String> for MigrationStatus {
    fn from(s: String) -> Self {
        match s.as_str() {
            "none" => MigrationStatus::None,
            "setup" => MigrationStatus::Setup,
            "cancelling" => MigrationStatus::Cancelling,
            "cancelled" => MigrationStatus::Cancelled,
            "active" => MigrationStatus::Active,
            "postcopy-active" => MigrationStatus::PostcopyActive,
            "postcopy-paused" => MigrationStatus::PostcopyPaused,
            "postcopy-recover-setup" => MigrationStatus::PostcopyRecoverSetup,
            "postcopy-recover" => MigrationStatus::PostcopyRecover,
            "completed" => MigrationStatus::Completed,
            "failed" => MigrationStatus::Failed,
            "colo" => MigrationStatus::Colo,
            "pre-switchover" => MigrationStatus::PreSwitchover,
            "device" => MigrationStatus::Device,
            "wait-unplug" => MigrationStatus::WaitUnplug,
            _ => MigrationStatus::Other(s),
        }
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// RAM statistics of `query-migrate` (byte counts unless noted).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct RamStats {
    /// Bytes sent so far (all kinds).
    pub transferred: u64,
    /// Dirty bytes still to send.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Zero pages (sent as a marker only).
    pub duplicate: u64,
    /// Pages sent in full.
    pub normal: u64,
    pub normal_bytes: u64,
    /// Pages dirtied per second, as measured at the last sync.
    pub dirty_pages_rate: u64,
    /// Throughput, megabits per second.
    pub mbps: f64,
    /// Number of dirty-bitmap syncs: the number of pre-copy passes.
    pub dirty_sync_count: u64,
    pub precopy_bytes: u64,
    pub postcopy_bytes: u64,
    /// Bytes sent while the guest was stopped.
    pub downtime_bytes: u64,
    pub multifd_bytes: u64,
    pub page_size: u64,
    pub pages_per_second: u64,
    pub postcopy_requests: u64,
}

/// Xbzrle statistics of `query-migrate`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct XbzrleStats {
    pub cache_size: u64,
    pub bytes: u64,
    pub pages: u64,
    pub cache_miss: u64,
    pub cache_miss_rate: f64,
    pub encoding_rate: f64,
    pub overflow: u64,
}

/// The reply of `query-migrate`. Times are in milliseconds.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    #[serde(default)]
    pub status: MigrationStatus,
    /// Since `migrate` (ongoing) or for the whole migration (completed).
    #[serde(default)]
    pub total_time: Option<u64>,
    /// The guest's actual pause (completed migrations only).
    #[serde(default)]
    pub downtime: Option<u64>,
    /// QEMU's estimate of the pause, while active.
    #[serde(default)]
    pub expected_downtime: Option<u64>,
    #[serde(default)]
    pub setup_time: Option<u64>,
    #[serde(default)]
    pub ram: Option<RamStats>,
    #[serde(default)]
    pub xbzrle_cache: Option<XbzrleStats>,
    #[serde(default)]
    pub error_desc: Option<String>,
    /// Auto-converge's current throttle, percent.
    #[serde(default)]
    pub cpu_throttle_percentage: Option<u64>,
    /// Why `migrate` would be refused now (e.g. a device without migration
    /// support).
    #[serde(default)]
    pub blocked_reasons: Option<Vec<String>>,
    /// Destination only: where it listens for the stream.
    #[serde(default)]
    pub socket_address: Vec<ListenAddress>,
}

/// One listening address a destination reports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ListenAddress {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub host: Option<String>,
    /// A string in QMP (it may be a service name).
    #[serde(default)]
    pub port: Option<String>,
}

impl ListenAddress {
    /// The TCP address, for `inet` entries with a numeric port.
    pub fn inet(&self) -> Option<InetAddress> {
        if self.kind != "inet" {
            return None;
        }
        Some(InetAddress::new(
            self.host.clone()?,
            self.port.as_deref()?.parse().ok()?,
        ))
    }
}

/// A `calc-dirty-rate` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRate {
    /// QEMU's estimate, MiB per second (page sampling: about 512 sampled
    /// pages per GiB, so it is coarse for small rates).
    pub mib_per_sec: u64,
    /// How long was sampled.
    pub sampled_for: Duration,
}

/// Errors from the migration helpers.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("invalid migration setting {what} = {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("QMP `{command}` failed")]
    Qmp {
        command: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("migration ended in {status} while waiting for {wanted}: {}", error_desc.as_deref().unwrap_or("no error description"))]
    Ended {
        status: MigrationStatus,
        wanted: String,
        error_desc: Option<String>,
    },
    #[error("timed out after {after:?} waiting for migration status {wanted}; last status {last}")]
    Timeout {
        wanted: String,
        last: MigrationStatus,
        after: Duration,
    },
    #[error("the QMP event stream of {endpoint} ended")]
    EventsClosed { endpoint: String },
    #[error("{missed} QMP events were missed (slow subscriber); resynchronise with query-migrate")]
    EventsLagged { missed: u64 },
    #[error(
        "destination did not report a TCP listening address after migrate-incoming (got {0:?})"
    )]
    NoListenAddress(Vec<ListenAddress>),
    #[error("post-copy recovery failed, the migration is paused again ({status}): {}; retry with migrate-recover + migrate_resume", error_desc.as_deref().unwrap_or("no error description"))]
    RecoveryFailed {
        /// Where it fell back to (`postcopy-paused`).
        status: MigrationStatus,
        error_desc: Option<String>,
    },
    #[error("dirty-rate measurement did not finish within {after:?} (last status {status:?})")]
    DirtyRateTimeout { after: Duration, status: String },
    #[error("dirty-rate measurement returned no rate ({0})")]
    DirtyRateMissing(String),
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> MigrationError {
    MigrationError::Invalid {
        what,
        value: value.to_owned(),
        reason,
    }
}

fn qmp_err(command: &'static str) -> impl FnOnce(QmpError) -> MigrationError {
    move |source| MigrationError::Qmp { command, source }
}

/// Turns capabilities on or off (`migrate-set-capabilities`). Only allowed
/// while no migration is running.
pub async fn set_capabilities(
    qmp: &Qmp,
    capabilities: &[(MigrationCapability, bool)],
) -> Result<(), MigrationError> {
    let list: Vec<Value> = capabilities
        .iter()
        .map(|(c, on)| json!({"capability": c.as_str(), "state": on}))
        .collect();
    qmp.execute("migrate-set-capabilities", json!({"capabilities": list}))
        .await
        .map_err(qmp_err("migrate-set-capabilities"))?;
    Ok(())
}

/// All capabilities QEMU knows, by name, with their state.
pub async fn query_capabilities(qmp: &Qmp) -> Result<BTreeMap<String, bool>, MigrationError> {
    #[derive(Deserialize)]
    struct Row {
        capability: String,
        state: bool,
    }
    let rows: Vec<Row> = qmp
        .execute_as("query-migrate-capabilities", Value::Null)
        .await
        .map_err(qmp_err("query-migrate-capabilities"))?;
    Ok(rows.into_iter().map(|r| (r.capability, r.state)).collect())
}

/// Sets parameters (`migrate-set-parameters`), validated first so that a
/// bad value changes nothing.
pub async fn set_parameters(qmp: &Qmp, params: &MigrationParameters) -> Result<(), MigrationError> {
    let args = params.to_json()?;
    qmp.execute("migrate-set-parameters", args)
        .await
        .map_err(qmp_err("migrate-set-parameters"))?;
    Ok(())
}

/// Changes the bandwidth cap, also during a migration (takes effect at once).
pub async fn set_max_bandwidth(qmp: &Qmp, bytes_per_sec: u64) -> Result<(), MigrationError> {
    if bytes_per_sec == 0 {
        return Err(invalid("max-bandwidth", "0", "must be > 0 bytes/s"));
    }
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": bytes_per_sec}),
    )
    .await
    .map_err(qmp_err("migrate-set-parameters"))?;
    Ok(())
}

/// Changes the downtime limit, also during a migration.
pub async fn set_downtime_limit(qmp: &Qmp, limit: Duration) -> Result<(), MigrationError> {
    let ms = downtime_ms(limit)?;
    qmp.execute("migrate-set-parameters", json!({"downtime-limit": ms}))
        .await
        .map_err(qmp_err("migrate-set-parameters"))?;
    Ok(())
}

/// Undo of the TLS parameters: sets `tls-creds`, `tls-hostname` and
/// `tls-authz` to empty (QEMU's "off"), so that nothing refers to TLS
/// objects about to be deleted and a later migration does not inherit them.
pub async fn clear_tls(qmp: &Qmp) -> Result<(), MigrationError> {
    qmp.execute(
        "migrate-set-parameters",
        json!({"tls-creds": "", "tls-hostname": "", "tls-authz": ""}),
    )
    .await
    .map_err(qmp_err("migrate-set-parameters"))?;
    Ok(())
}

/// The current parameters.
pub async fn query_parameters(qmp: &Qmp) -> Result<MigrationParametersInfo, MigrationError> {
    qmp.execute_as("query-migrate-parameters", Value::Null)
        .await
        .map_err(qmp_err("query-migrate-parameters"))
}

/// Destination: starts listening for the stream. The QEMU must have been
/// started with `-incoming defer`; set capabilities and parameters (TLS!)
/// *before*, since the listener uses them. Returns the TCP address actually
/// bound (port 0 makes QEMU choose one).
///
/// `exit_on_error`: whether QEMU exits when the incoming migration fails
/// (QEMU's default is to exit). See the module docs.
pub async fn migrate_incoming(
    qmp: &Qmp,
    addr: &MigrationAddress,
    exit_on_error: bool,
) -> Result<InetAddress, MigrationError> {
    qmp.execute(
        "migrate-incoming",
        json!({"channels": addr.to_channels(), "exit-on-error": exit_on_error}),
    )
    .await
    .map_err(qmp_err("migrate-incoming"))?;
    let info = query_migrate(qmp).await?;
    info.socket_address
        .iter()
        .find_map(ListenAddress::inet)
        .ok_or(MigrationError::NoListenAddress(info.socket_address))
}

/// Source: starts migrating to `addr`. Returns once QEMU has started the
/// migration (status `setup`); follow it with [`query_migrate`] and
/// [`wait_for_status`].
pub async fn migrate(qmp: &Qmp, addr: &MigrationAddress) -> Result<(), MigrationError> {
    qmp.execute("migrate", json!({"channels": addr.to_channels()}))
        .await
        .map_err(qmp_err("migrate"))?;
    Ok(())
}

/// Source: leaves `pre-switchover` and finishes the migration (device state,
/// disks handed over). Refused by QEMU in any other state.
pub async fn migrate_continue(qmp: &Qmp) -> Result<(), MigrationError> {
    qmp.execute("migrate-continue", json!({"state": "pre-switchover"}))
        .await
        .map_err(qmp_err("migrate-continue"))?;
    Ok(())
}

/// Source: cancels the migration. Harmless when none is running. The
/// status goes through `cancelling` to `cancelled` (wait for it with
/// [`wait_for_status`]); a source paused at `pre-switchover` is resumed by
/// QEMU itself. Do not use after `completed`: the destination may already
/// be running the guest.
pub async fn migrate_cancel(qmp: &Qmp) -> Result<(), MigrationError> {
    qmp.execute("migrate_cancel", Value::Null)
        .await
        .map_err(qmp_err("migrate_cancel"))?;
    Ok(())
}

/// Source: switches a running migration to post-copy (needs `postcopy-ram`
/// on both ends). From here on the destination holds the device state and
/// fetches missing pages from the source: the death of either QEMU loses the
/// guest, so the caller must have decided that risk is acceptable. A broken
/// *link* only pauses both sides (`postcopy-paused`); see the module docs
/// and [`migrate_recover`]/[`migrate_resume`].
///
/// With `pause-before-switchover` the source first stops at
/// `pre-switchover` (still cancellable, and then it resumes); the point of
/// no return is the `migrate-continue` that follows. Without it, this call
/// is the point of no return. A destination started with `-S` stays
/// `paused` in post-copy until `cont`; one without `-S` starts the guest
/// by itself (`RESUME`) as soon as post-copy begins.
pub async fn migrate_start_postcopy(qmp: &Qmp) -> Result<(), MigrationError> {
    qmp.execute("migrate-start-postcopy", Value::Null)
        .await
        .map_err(qmp_err("migrate-start-postcopy"))?;
    Ok(())
}

/// Source or destination: breaks the migration channel of a post-copy
/// migration on purpose, as a link failure would (both ends reach
/// `postcopy-paused`). QEMU accepts it only in `postcopy-active` or
/// `postcopy-recover` (to abandon a recovery attempt that hangs); anywhere
/// else it is a QMP error. Use it when the link is known to be dead but TCP
/// has not noticed yet (a silent black hole can take minutes to time out),
/// so that recovery can start at once.
pub async fn migrate_pause(qmp: &Qmp) -> Result<(), MigrationError> {
    qmp.execute("migrate-pause", Value::Null)
        .await
        .map_err(qmp_err("migrate-pause"))?;
    Ok(())
}

/// The `migrate-recover` arguments (QEMU 10.0 takes only a URI here).
fn recover_args(addr: &MigrationAddress) -> Value {
    json!({"uri": addr.to_uri()})
}

/// The `migrate` arguments of a post-copy resume.
fn resume_args(addr: &MigrationAddress) -> Value {
    json!({"channels": addr.to_channels(), "resume": true})
}

/// Destination, in `postcopy-paused`: listens on `addr` for the source to
/// resume the migration ([`migrate_resume`]) and returns the TCP address
/// actually bound (port 0 lets QEMU choose; `query-migrate` then reports it
/// in `socket-address`, which QEMU 10.0 replaces with the new listener).
/// The listener uses the destination's current TLS parameters
/// (`tls-creds`, `tls-authz`), so keep them, and their objects, until the
/// migration has `completed`.
///
/// Refused by QEMU unless the destination is in `postcopy-paused`: wait for
/// that first ([`wait_for_status`]). Calling it again while still paused is
/// allowed and replaces the listener (the new address is returned), so a
/// retry after a failed resume may simply repeat it.
///
/// QEMU declares this command `allow-oob` because a destination whose main
/// loop is blocked on a missing page cannot run in-band commands; Ferry's
/// [`Qmp`] does not negotiate `oob`, so in that (rare) case this call
/// blocks until the caller's timeout. Not seen in the tests here.
pub async fn migrate_recover(
    qmp: &Qmp,
    addr: &MigrationAddress,
) -> Result<InetAddress, MigrationError> {
    let before = query_migrate(qmp).await?.socket_address;
    qmp.execute("migrate-recover", recover_args(addr))
        .await
        .map_err(qmp_err("migrate-recover"))?;
    let info = query_migrate(qmp).await?;
    pick_recover_address(addr, &before, info.socket_address)
}

/// The listener `migrate-recover` opened: the one on the asked-for port if
/// one was asked for, else the first TCP address that was not listed
/// before the command (QEMU 10.0 lists only the new one, but an older
/// entry must never be mistaken for it), else the first.
fn pick_recover_address(
    asked: &MigrationAddress,
    before: &[ListenAddress],
    after: Vec<ListenAddress>,
) -> Result<InetAddress, MigrationError> {
    let MigrationAddress::Tcp(asked) = asked;
    let inet: Vec<InetAddress> = after.iter().filter_map(ListenAddress::inet).collect();
    let found = if asked.port != 0 {
        inet.iter().find(|a| a.port == asked.port)
    } else {
        let old: Vec<InetAddress> = before.iter().filter_map(ListenAddress::inet).collect();
        inet.iter()
            .find(|a| !old.contains(a))
            .or_else(|| inet.first())
    };
    found.cloned().ok_or(MigrationError::NoListenAddress(after))
}

/// Source, in `postcopy-paused`: reconnects to a destination that ran
/// [`migrate_recover`] and resumes the post-copy migration (`migrate` with
/// `resume: true`, in the same `channels` form as [`migrate`]). Returns
/// once QEMU accepted the command; the connection is made asynchronously.
/// The source's current TLS parameters (`tls-creds`, `tls-hostname`) apply
/// to the new channel, exactly as for the first one.
///
/// Subscribe to the source's events *before* calling this and pass the
/// receiver to [`wait_for_resume`], which tells a resumed migration from a
/// failed attempt. Refused by QEMU unless the source is `postcopy-paused`.
pub async fn migrate_resume(qmp: &Qmp, addr: &MigrationAddress) -> Result<(), MigrationError> {
    qmp.execute("migrate", resume_args(addr))
        .await
        .map_err(qmp_err("migrate"))?;
    Ok(())
}

/// Source, after [`migrate_resume`]: waits until the migration runs again
/// (`postcopy-active`, or already `completed`) and returns that
/// `query-migrate` reply.
///
/// `events` must have been subscribed before `migrate_resume` was sent, and
/// the source needs the `events` capability: a failed attempt (nothing
/// listening, TLS refused, link still down) goes `postcopy-recover-setup` →
/// `postcopy-paused`, and only those `MIGRATION` events tell it apart from an
/// attempt that has not started yet (both poll as `postcopy-paused`). It ends the
/// wait with [`MigrationError::RecoveryFailed`] (with QEMU's error
/// description); the caller may then run `migrate-recover` and
/// `migrate_resume` again. Missed events end it with
/// [`MigrationError::EventsLagged`] unless a poll already shows success.
pub async fn wait_for_resume(
    qmp: &Qmp,
    events: &mut broadcast::Receiver<QmpEvent>,
    timeout: Duration,
) -> Result<MigrationInfo, MigrationError> {
    const RESUMED: [MigrationStatus; 2] =
        [MigrationStatus::PostcopyActive, MigrationStatus::Completed];
    let deadline = Instant::now() + timeout;
    let mut attempted = false;
    let mut fell_back = false;
    let mut lagged = None;
    loop {
        let info = query_migrate(qmp).await?;
        if RESUMED.contains(&info.status) {
            return Ok(info);
        }
        if info.status.is_terminal() {
            return Err(MigrationError::Ended {
                status: info.status,
                wanted: describe(&RESUMED),
                error_desc: info.error_desc,
            });
        }
        if fell_back && info.status == MigrationStatus::PostcopyPaused {
            return Err(MigrationError::RecoveryFailed {
                status: info.status,
                error_desc: info.error_desc,
            });
        }
        if let Some(missed) = lagged {
            return Err(MigrationError::EventsLagged { missed });
        }
        if Instant::now() >= deadline {
            return Err(MigrationError::Timeout {
                wanted: describe(&RESUMED),
                last: info.status,
                after: timeout,
            });
        }
        let until = (Instant::now() + POLL_INTERVAL).min(deadline);
        loop {
            match tokio::time::timeout_at(until, events.recv()).await {
                Ok(Ok(e)) => match event_status(&e) {
                    Some(
                        MigrationStatus::PostcopyRecoverSetup | MigrationStatus::PostcopyRecover,
                    ) => {
                        attempted = true;
                        break;
                    }
                    // Only a pause *after* this attempt began counts: an
                    // older one may still sit in a receiver subscribed early.
                    Some(MigrationStatus::PostcopyPaused) if attempted => {
                        fell_back = true;
                        break;
                    }
                    Some(_) => break,
                    None => continue,
                },
                Ok(Err(RecvError::Lagged(missed))) => {
                    lagged = Some(missed);
                    break;
                }
                Err(_) => break,
                Ok(Err(RecvError::Closed)) => {
                    return Err(MigrationError::EventsClosed {
                        endpoint: qmp.endpoint().to_owned(),
                    })
                }
            }
        }
    }
}

/// `query-migrate`, typed.
pub async fn query_migrate(qmp: &Qmp) -> Result<MigrationInfo, MigrationError> {
    qmp.execute_as("query-migrate", Value::Null)
        .await
        .map_err(qmp_err("query-migrate"))
}

fn describe(wanted: &[MigrationStatus]) -> String {
    wanted
        .iter()
        .map(MigrationStatus::as_str)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Waits until `query-migrate` reports one of `wanted`, and returns that
/// reply. Call it after the command that starts (or continues) the
/// migration: before `migrate`, the status of a previous attempt is still
/// reported. Watches `MIGRATION` events and also polls, so it works with or
/// without the `events` capability and cannot miss a status that was
/// reached before it was called. A terminal status that is not wanted
/// (`failed`, `cancelled`, or `completed` when not asked for) ends the wait
/// with [`MigrationError::Ended`].
///
/// Only statuses that last are reliably seen (`pre-switchover`, `completed`,
/// `failed`, `cancelled`, `active`, `postcopy-active`); a transient one
/// (`setup`, `device`) may be skipped between two looks.
pub async fn wait_for_status(
    qmp: &Qmp,
    wanted: &[MigrationStatus],
    timeout: Duration,
) -> Result<MigrationInfo, MigrationError> {
    let mut events = qmp.subscribe();
    let deadline = Instant::now() + timeout;
    loop {
        let info = query_migrate(qmp).await?;
        if wanted.contains(&info.status) {
            return Ok(info);
        }
        if info.status.is_terminal() {
            return Err(MigrationError::Ended {
                status: info.status,
                wanted: describe(wanted),
                error_desc: info.error_desc,
            });
        }
        if Instant::now() >= deadline {
            return Err(MigrationError::Timeout {
                wanted: describe(wanted),
                last: info.status,
                after: timeout,
            });
        }
        // Wake early on any MIGRATION event, then re-query: the reply has
        // the error description and statistics the event lacks.
        let until = (Instant::now() + POLL_INTERVAL).min(deadline);
        loop {
            match tokio::time::timeout_at(until, events.recv()).await {
                Ok(Ok(e)) if e.name == "MIGRATION" => break,
                Ok(Ok(_)) => continue,
                Ok(Err(RecvError::Lagged(_))) | Err(_) => break,
                Ok(Err(RecvError::Closed)) => {
                    return Err(MigrationError::EventsClosed {
                        endpoint: qmp.endpoint().to_owned(),
                    })
                }
            }
        }
    }
}

/// The status carried by a `MIGRATION` event, if `event` is one.
pub fn event_status(event: &QmpEvent) -> Option<MigrationStatus> {
    if event.name != "MIGRATION" {
        return None;
    }
    let status = event.data.get("status")?.as_str()?;
    Some(MigrationStatus::from(status.to_owned()))
}

/// Waits on an event subscription (taken *before* the command whose effect
/// is awaited) for a `MIGRATION` event with a status in `wanted`, and
/// returns the event (its timestamp is QEMU's). A terminal status that is
/// not wanted ends the wait with [`MigrationError::Ended`]; missed events
/// (the subscriber lagged) with [`MigrationError::EventsLagged`], since the
/// wanted one may have been among them. Needs the `events` capability;
/// prefer [`wait_for_status`] unless the timestamp matters.
pub async fn wait_for_event(
    events: &mut broadcast::Receiver<QmpEvent>,
    wanted: &[MigrationStatus],
    timeout: Duration,
) -> Result<QmpEvent, MigrationError> {
    let deadline = Instant::now() + timeout;
    let mut last = MigrationStatus::None;
    loop {
        let event = match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => {
                return Err(MigrationError::Timeout {
                    wanted: describe(wanted),
                    last,
                    after: timeout,
                })
            }
            Ok(Err(RecvError::Lagged(missed))) => {
                return Err(MigrationError::EventsLagged { missed })
            }
            Ok(Err(RecvError::Closed)) => {
                return Err(MigrationError::EventsClosed {
                    endpoint: "(event subscription)".to_owned(),
                })
            }
            Ok(Ok(event)) => event,
        };
        let Some(status) = event_status(&event) else {
            continue;
        };
        if wanted.contains(&status) {
            return Ok(event);
        }
        if status.is_terminal() {
            return Err(MigrationError::Ended {
                status,
                wanted: describe(wanted),
                error_desc: None,
            });
        }
        last = status;
    }
}

/// Samples the guest's dirty-page rate for `sample` (`calc-dirty-rate`,
/// page sampling) and returns it. Takes `sample` plus a little; refused by
/// QEMU while another measurement runs. Works under TCG.
pub async fn calc_dirty_rate(qmp: &Qmp, sample: Duration) -> Result<DirtyRate, MigrationError> {
    if sample.is_zero() || sample > MAX_DIRTY_RATE_SAMPLE {
        return Err(invalid(
            "calc-time",
            &format!("{sample:?}"),
            "must be > 0 and at most 60 s",
        ));
    }
    let ms = u64::try_from(sample.as_millis()).unwrap_or(u64::MAX).max(1);
    qmp.execute(
        "calc-dirty-rate",
        json!({"calc-time": ms, "calc-time-unit": "millisecond"}),
    )
    .await
    .map_err(qmp_err("calc-dirty-rate"))?;
    // QEMU resets the status to `unstarted` when a measurement is asked
    // for, so a `measured` seen from here on is this measurement's.
    tokio::time::sleep(sample).await;
    let give_up = Duration::from_secs(10);
    let deadline = Instant::now() + give_up;
    loop {
        let reply = qmp
            .execute("query-dirty-rate", json!({"calc-time-unit": "millisecond"}))
            .await
            .map_err(qmp_err("query-dirty-rate"))?;
        let status = reply
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if status == "measured" {
            let rate = reply.get("dirty-rate").and_then(Value::as_i64);
            return match rate.and_then(|r| u64::try_from(r).ok()) {
                Some(mib_per_sec) => Ok(DirtyRate {
                    mib_per_sec,
                    sampled_for: sample,
                }),
                None => Err(MigrationError::DirtyRateMissing(reply.to_string())),
            };
        }
        if Instant::now() >= deadline {
            return Err(MigrationError::DirtyRateTimeout {
                after: sample + give_up,
                status: status.to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::QmpTimestamp;

    #[test]
    fn parameters_need_a_bandwidth_and_valid_values() {
        let p = MigrationParameters {
            downtime_limit: Some(Duration::from_millis(300)),
            tls_creds: Some("tls0".into()),
            tls_hostname: Some("host2".into()),
            ..MigrationParameters::new(1 << 30)
        };
        assert_eq!(
            p.to_json().unwrap(),
            json!({"max-bandwidth": 1073741824u64, "downtime-limit": 300,
                   "tls-creds": "tls0", "tls-hostname": "host2"})
        );
        assert!(MigrationParameters::new(0).to_json().is_err());
        let announced = MigrationParameters {
            announce: Some(Announce::FERRY),
            ..MigrationParameters::new(1 << 30)
        };
        assert_eq!(
            announced.to_json().unwrap(),
            json!({"max-bandwidth": 1073741824u64, "announce-initial": 10,
                   "announce-max": 400, "announce-rounds": 8, "announce-step": 50})
        );
        let zero_downtime = MigrationParameters {
            downtime_limit: Some(Duration::ZERO),
            ..MigrationParameters::new(1)
        };
        assert!(zero_downtime.to_json().is_err());
        let throttle = MigrationParameters {
            cpu_throttle_initial: Some(100),
            ..MigrationParameters::new(1)
        };
        assert!(throttle.to_json().is_err());
        let empty_tls = MigrationParameters {
            tls_authz: Some(String::new()),
            ..MigrationParameters::new(1)
        };
        assert!(empty_tls.to_json().is_err());
        assert_eq!(downtime_ms(Duration::from_micros(1)).unwrap(), 1);
    }

    #[test]
    fn tcp_address_becomes_one_main_channel() {
        let a = MigrationAddress::Tcp(InetAddress::loopback(4444));
        assert_eq!(
            a.to_channels(),
            json!([{"channel-type": "main", "addr": {
                "transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"}}])
        );
        assert_eq!(a.to_string(), "tcp:127.0.0.1:4444");
    }

    #[test]
    fn real_query_migrate_replies_parse() {
        // Source, completed (QEMU 10.0.2, test guest over loopback).
        let done: MigrationInfo = serde_json::from_value(json!({
            "status": "completed", "setup-time": 3, "downtime": 163, "total-time": 1730,
            "ram": {"total": 537403392, "postcopy-requests": 0, "dirty-sync-count": 3,
                    "multifd-bytes": 0, "pages-per-second": 53456, "downtime-bytes": 19633951,
                    "page-size": 4096, "remaining": 0, "postcopy-bytes": 0,
                    "mbps": 682.0144852345107, "transferred": 147229877,
                    "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 127471378,
                    "duplicate": 97722, "dirty-pages-rate": 0, "normal-bytes": 145940480,
                    "normal": 35630}}))
        .unwrap();
        assert_eq!(done.status, MigrationStatus::Completed);
        assert_eq!(done.downtime, Some(163));
        let ram = done.ram.unwrap();
        assert_eq!(ram.dirty_sync_count, 3);
        assert_eq!(ram.transferred, 147229877);
        // Destination, listening.
        let incoming: MigrationInfo = serde_json::from_value(json!({
            "status": "setup",
            "socket-address": [{"port": "46601", "ipv4": true, "host": "127.0.0.1", "type": "inet"}]}))
        .unwrap();
        assert_eq!(
            incoming.socket_address[0].inet(),
            Some(InetAddress::loopback(46601))
        );
        // Failed, and nothing at all.
        let failed: MigrationInfo = serde_json::from_value(json!({
            "status": "failed", "error-desc": "Unable to write to socket: Connection reset by peer"}))
        .unwrap();
        assert!(failed.status.is_terminal());
        assert!(failed.error_desc.unwrap().contains("reset"));
        let idle: MigrationInfo = serde_json::from_value(json!({})).unwrap();
        assert_eq!(idle.status, MigrationStatus::None);
        let odd: MigrationInfo = serde_json::from_value(json!({"status": "warp"})).unwrap();
        assert_eq!(odd.status, MigrationStatus::Other("warp".into()));
    }

    #[test]
    fn recover_sends_a_uri_and_resume_sends_channels_with_resume() {
        let any_port = MigrationAddress::Tcp(InetAddress::loopback(0));
        assert_eq!(recover_args(&any_port), json!({"uri": "tcp:127.0.0.1:0"}));
        let v6 = MigrationAddress::Tcp(InetAddress::new("::1", 4444));
        assert_eq!(recover_args(&v6), json!({"uri": "tcp:[::1]:4444"}));
        let to = MigrationAddress::Tcp(InetAddress::loopback(40557));
        assert_eq!(
            resume_args(&to),
            json!({"resume": true, "channels": [{"channel-type": "main", "addr": {
                "transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "40557"}}]})
        );
    }

    #[test]
    fn the_recover_listener_is_the_new_or_the_asked_for_address() {
        let listen = |port: u16| ListenAddress {
            kind: "inet".into(),
            host: Some("127.0.0.1".into()),
            port: Some(port.to_string()),
        };
        let any = MigrationAddress::Tcp(InetAddress::loopback(0));
        // QEMU 10.0.2: only the new listener is listed.
        assert_eq!(
            pick_recover_address(&any, &[listen(35553)], vec![listen(39777)]).unwrap(),
            InetAddress::loopback(39777)
        );
        // Were the old one still listed, it is not taken for the new one.
        assert_eq!(
            pick_recover_address(&any, &[listen(1)], vec![listen(1), listen(2)]).unwrap(),
            InetAddress::loopback(2)
        );
        let fixed = MigrationAddress::Tcp(InetAddress::loopback(7));
        assert_eq!(
            pick_recover_address(&fixed, &[], vec![listen(1), listen(7)]).unwrap(),
            InetAddress::loopback(7)
        );
        assert!(matches!(
            pick_recover_address(&fixed, &[], vec![listen(1)]),
            Err(MigrationError::NoListenAddress(_))
        ));
        let unix = ListenAddress {
            kind: "unix".into(),
            host: None,
            port: None,
        };
        assert!(pick_recover_address(&any, &[], vec![unix]).is_err());
    }

    #[test]
    fn postcopy_statuses() {
        for s in [
            "postcopy-active",
            "postcopy-paused",
            "postcopy-recover-setup",
            "postcopy-recover",
        ] {
            let status = MigrationStatus::from(s.to_owned());
            assert!(status.is_postcopy() && !status.is_terminal(), "{s}");
        }
        for s in ["active", "pre-switchover", "device", "completed", "failed"] {
            assert!(!MigrationStatus::from(s.to_owned()).is_postcopy(), "{s}");
        }
    }

    /// A scripted QEMU on the other end of an in-memory QMP connection.
    struct Fake {
        lines: tokio::io::Lines<tokio::io::BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>>,
        out: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    }

    impl Fake {
        async fn connect() -> (Qmp, Fake) {
            use tokio::io::AsyncBufReadExt;
            let (client, server) = tokio::io::duplex(1 << 16);
            let (cr, cw) = tokio::io::split(client);
            let (sr, sw) = tokio::io::split(server);
            let mut fake = Fake {
                lines: tokio::io::BufReader::new(sr).lines(),
                out: sw,
            };
            let (qmp, ()) = tokio::join!(
                Qmp::handshake(cr, cw, "fake", Duration::from_secs(5)),
                async {
                    fake.send(
                        json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
                        "package": ""}, "capabilities": ["oob"]}}),
                    )
                    .await;
                    fake.reply("qmp_capabilities", None, json!({})).await;
                }
            );
            (qmp.unwrap(), fake)
        }

        async fn send(&mut self, msg: Value) {
            use tokio::io::AsyncWriteExt;
            let line = format!("{msg}\r\n");
            self.out.write_all(line.as_bytes()).await.unwrap();
        }

        /// Expects `command` with exactly `arguments` (`None`: no
        /// `arguments` member) and answers `ret`.
        async fn reply(&mut self, command: &str, arguments: Option<Value>, ret: Value) {
            let line = self
                .lines
                .next_line()
                .await
                .unwrap()
                .expect("client hung up");
            let req: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(req["execute"], command, "{req}");
            assert_eq!(req.get("arguments").cloned(), arguments, "{req}");
            self.send(json!({"return": ret, "id": req["id"]})).await;
        }

        async fn event_status(&mut self, status: &str) {
            self.send(json!({"event": "MIGRATION", "data": {"status": status},
                "timestamp": {"seconds": 1, "microseconds": 2}}))
                .await;
        }
    }

    fn paused(desc: &str) -> Value {
        json!({"status": "postcopy-paused", "error-desc": desc})
    }

    #[tokio::test]
    async fn pause_recover_and_resume_send_what_qemu_expects() {
        let (qmp, mut fake) = Fake::connect().await;
        let old = json!([{"port": "35553", "ipv4": true, "host": "127.0.0.1", "type": "inet"}]);
        let new = json!([{"port": "39777", "ipv4": true, "host": "127.0.0.1", "type": "inet"}]);
        let any = MigrationAddress::Tcp(InetAddress::loopback(0));
        let qemu = async {
            fake.reply("migrate-pause", None, json!({})).await;
            fake.reply(
                "query-migrate",
                None,
                json!({"status": "postcopy-paused", "socket-address": old}),
            )
            .await;
            fake.reply(
                "migrate-recover",
                Some(json!({"uri": "tcp:127.0.0.1:0"})),
                json!({}),
            )
            .await;
            fake.reply(
                "query-migrate",
                None,
                json!({"status": "postcopy-paused", "socket-address": new}),
            )
            .await;
            fake.reply(
                "migrate",
                Some(resume_args(&MigrationAddress::Tcp(InetAddress::loopback(
                    39777,
                )))),
                json!({}),
            )
            .await;
        };
        let client = async {
            migrate_pause(&qmp).await.unwrap();
            let bound = migrate_recover(&qmp, &any).await.unwrap();
            assert_eq!(bound, InetAddress::loopback(39777));
            migrate_resume(&qmp, &MigrationAddress::Tcp(bound))
                .await
                .unwrap();
        };
        tokio::join!(qemu, client);
    }

    #[tokio::test]
    async fn resume_wait_tells_a_failed_attempt_from_one_not_started_yet() {
        let (qmp, mut fake) = Fake::connect().await;
        // A stale pause event from before the attempt, then the attempt
        // failing: recover-setup, paused.
        let mut events = qmp.subscribe();
        let qemu = async {
            fake.event_status("postcopy-paused").await;
            fake.reply("query-migrate", None, paused("paused by the user"))
                .await;
            fake.reply("query-migrate", None, paused("paused by the user"))
                .await;
            fake.event_status("postcopy-recover-setup").await;
            fake.reply(
                "query-migrate",
                None,
                json!({"status": "postcopy-recover-setup"}),
            )
            .await;
            fake.event_status("postcopy-paused").await;
            fake.reply("query-migrate", None, paused("Connection refused"))
                .await;
        };
        let client = wait_for_resume(&qmp, &mut events, Duration::from_secs(5));
        let ((), got) = tokio::join!(qemu, client);
        match got {
            Err(MigrationError::RecoveryFailed { status, error_desc }) => {
                assert_eq!(status, MigrationStatus::PostcopyPaused);
                assert_eq!(error_desc.as_deref(), Some("Connection refused"));
            }
            other => panic!("{other:?}"),
        }

        // An attempt that succeeds.
        let qemu = async {
            fake.reply("query-migrate", None, paused("x")).await;
            fake.event_status("postcopy-recover-setup").await;
            fake.event_status("postcopy-recover").await;
            fake.reply("query-migrate", None, json!({"status": "postcopy-recover"}))
                .await;
            fake.event_status("postcopy-active").await;
            fake.reply("query-migrate", None, json!({"status": "postcopy-active"}))
                .await;
        };
        let client = wait_for_resume(&qmp, &mut events, Duration::from_secs(5));
        let ((), got) = tokio::join!(qemu, client);
        assert_eq!(got.unwrap().status, MigrationStatus::PostcopyActive);
    }

    #[tokio::test]
    async fn event_wait_returns_the_wanted_status_and_fails_on_others() {
        let (tx, mut rx) = broadcast::channel(16);
        let ev = |status: &str| QmpEvent {
            name: "MIGRATION".into(),
            data: json!({"status": status}),
            timestamp: QmpTimestamp {
                seconds: 1,
                microseconds: 2,
            },
        };
        tx.send(ev("setup")).unwrap();
        tx.send(ev("active")).unwrap();
        tx.send(ev("pre-switchover")).unwrap();
        let got = wait_for_event(
            &mut rx,
            &[MigrationStatus::PreSwitchover],
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(event_status(&got), Some(MigrationStatus::PreSwitchover));

        tx.send(ev("failed")).unwrap();
        let err = wait_for_event(
            &mut rx,
            &[MigrationStatus::Completed],
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(
            err,
            MigrationError::Ended {
                status: MigrationStatus::Failed,
                ..
            }
        ));

        let err = wait_for_event(
            &mut rx,
            &[MigrationStatus::Completed],
            Duration::from_millis(20),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, MigrationError::Timeout { .. }), "{err}");
    }
}

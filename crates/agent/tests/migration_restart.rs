//! The agent's half of a live migration survives an agent restart and a
//! QEMU dying mid-migration: two agents in this process (host1, host2), each
//! in a tokio runtime of its own, driven step by step the way the
//! controller's saga drives them, with real QEMU 10.0 (a 64 MiB firmware
//! guest with one 16 MiB disk: nothing to boot, which is all a migration
//! needs).
//!
//! "Killing" an agent drops its runtime: every task stops at its next await
//! and no clean-up runs, as with SIGKILL of ferryd; the QEMUs (never the
//! agent's children) keep running. A new agent then opens the same state
//! folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_agent::host::AgentPki;
use ferry_agent::record::VmRecord;
use ferry_agent::{Agent, AgentConfig};
use ferry_api::{
    CreateVmRequest, DiskCopy, IncomingReady, IncomingRequest, OutgoingRequest, OutgoingStatus,
    VmState,
};
use ferry_core::spec::VmSpec;
use nix::sys::signal::Signal;
use uuid::Uuid;

const VM: &str = "mover";
const DISK_BYTES: u64 = 16 << 20;
const STEP: Duration = Duration::from_secs(60);

/// One host: its configuration, and its agent while it runs.
struct Host {
    name: &'static str,
    config: AgentConfig,
    running: Option<(tokio::runtime::Runtime, Arc<Agent>)>,
}

impl Host {
    fn new(root: &Path, name: &'static str, ca: &ferry_pki::ClusterCa) -> Host {
        let dir = root.join(name);
        let cert = ca.issue_host(name, &[]).expect("host certificate");
        let config = AgentConfig {
            host_name: name.to_string(),
            address: "https://127.0.0.1:1".to_string(),
            state_dir: dir.join("state"),
            datastores: BTreeMap::from([("local".to_string(), dir.join("local"))]),
            accel: ferry_qemu::accel::AccelSetting::Auto,
            qemu_binary: None,
            stop_timeout: Duration::from_secs(5),
            migration_address: "127.0.0.1".to_string(),
            pki: Some(AgentPki {
                ca_pem: ca.cert_pem().to_string(),
                cert_pem: cert.cert_pem,
                key_pem: cert.key_pem,
            }),
            reserve_memory_bytes: 0,
            cpu_models: None,
            networks: Default::default(),
        };
        let mut host = Host {
            name,
            config,
            running: None,
        };
        host.start();
        host
    }

    fn start(&mut self) {
        assert!(self.running.is_none(), "{} already runs", self.name);
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let agent = runtime
            .block_on(Agent::open(self.config.clone()))
            .unwrap_or_else(|e| panic!("opening {}'s agent: {e}", self.name));
        self.running = Some((runtime, agent));
    }

    /// As SIGKILL of ferryd: nothing of the agent runs any more, nothing
    /// was cleaned up.
    fn kill(&mut self) {
        if let Some((runtime, agent)) = self.running.take() {
            drop(agent);
            runtime.shutdown_background();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.start();
    }

    fn run<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let (runtime, _) = self.running.as_ref().expect("the agent runs");
        runtime.block_on(work)
    }

    fn agent(&self) -> Arc<Agent> {
        self.running.as_ref().expect("the agent runs").1.clone()
    }

    fn disk(&self) -> PathBuf {
        self.config.datastores["local"].join(format!("{VM}.raw"))
    }

    fn vm_dir(&self) -> PathBuf {
        self.config.state_dir.join("vms").join(VM)
    }

    fn vm(&self) -> Option<ferry_api::VmInfo> {
        let agent = self.agent();
        self.run(async move { agent.get(VM).await.ok() })
    }

    fn pid(&self) -> u32 {
        self.vm()
            .and_then(|vm| vm.pid)
            .unwrap_or_else(|| panic!("no QEMU for {VM} on {}", self.name))
    }

    /// Nothing of the VM is left on this host: no VM, no record folder, no
    /// disk file.
    fn assert_nothing_left(&self) {
        assert!(self.vm().is_none(), "{} still knows {VM}", self.name);
        assert!(
            !self.vm_dir().exists(),
            "{}: {:?} is left",
            self.name,
            self.vm_dir()
        );
        assert!(
            !self.disk().exists(),
            "{}: {:?} is left",
            self.name,
            self.disk()
        );
    }
}

/// Two hosts in a scratch folder. Dropping it ends every QEMU it started,
/// also when a test fails.
struct Pair {
    root: tempfile::TempDir,
    host1: Host,
    host2: Host,
}

impl Pair {
    fn new() -> Pair {
        let root = tempfile::Builder::new()
            .prefix("ferry-agent-restart-")
            .tempdir()
            .expect("scratch folder");
        let ca = ferry_pki::ClusterCa::create("restart-test").expect("CA");
        let host1 = Host::new(root.path(), "host1", &ca);
        let host2 = Host::new(root.path(), "host2", &ca);
        Pair { root, host1, host2 }
    }

    fn spec(&self) -> VmSpec {
        let text = format!(
            r#"
                name = "{VM}"
                memory = "64MiB"
                [boot]
                firmware = "bios"
                disk = "vd0"
                [[disks]]
                id = "vd0"
                datastore = "local"
                file = "{VM}.raw"
                format = "raw"
                size = "16MiB"
            "#
        );
        VmSpec::from_toml_str(&text, self.root.path()).expect("test spec")
    }

    /// The VM, created and running on host1.
    fn create_on_host1(&self) -> VmSpec {
        let spec = self.spec();
        let agent = self.host1.agent();
        let request = CreateVmRequest {
            spec: spec.clone(),
            start: true,
            networks: Vec::new(),
            arriving_disks: Default::default(),
        };
        let vm = self
            .host1
            .run(async move { agent.create(request).await })
            .expect("create on host1");
        assert_eq!(vm.state, VmState::Running, "{vm:?}");
        spec
    }

    fn prepare(&self, id: Uuid, spec: &VmSpec) -> IncomingReady {
        let agent = self.host2.agent();
        let request = IncomingRequest {
            migration_id: id,
            spec: spec.clone(),
            copy_disks: vec![DiskCopy {
                disk_id: "vd0".to_string(),
                virtual_size_bytes: DISK_BYTES,
            }],
            source_host: "host1".to_string(),
            capabilities: capabilities(),
            networks: Vec::new(),
        };
        self.host2
            .run(async move { agent.incoming_prepare(request).await })
            .expect("incoming_prepare on host2")
    }

    fn start_outgoing(&self, id: Uuid, ready: IncomingReady) -> OutgoingStatus {
        let agent = self.host1.agent();
        let request = OutgoingRequest {
            migration_id: id,
            destination_host: "host2".to_string(),
            incoming: ready,
            mirror_disks: vec!["vd0".to_string()],
            capabilities: capabilities(),
            max_bandwidth_bytes_per_sec: 1 << 30,
            downtime_limit_ms: 300,
        };
        self.host1
            .run(async move { agent.outgoing_start(VM, request).await })
            .expect("outgoing_start on host1")
    }

    fn outgoing_status(&self) -> Result<OutgoingStatus, String> {
        let agent = self.host1.agent();
        self.host1
            .run(async move { agent.outgoing_status(VM).await })
            .map_err(|e| ferry_agent::error::chain(&e))
    }

    /// Polls the source until its phase is `phase`.
    fn wait_phase(&self, phase: &str) -> OutgoingStatus {
        let started = Instant::now();
        loop {
            let status = self.outgoing_status();
            if let Ok(status) = &status {
                if status.phase == phase {
                    return status.clone();
                }
                assert!(
                    !matches!(status.phase.as_str(), "failed" | "cancelled"),
                    "waiting for {phase}: {status:?}"
                );
            }
            assert!(
                started.elapsed() < STEP,
                "the source never reached {phase}: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn incoming_status(&self, id: Uuid) -> Result<ferry_api::IncomingStatus, String> {
        let agent = self.host2.agent();
        self.host2
            .run(async move { agent.incoming_status(id).await })
            .map_err(|e| ferry_agent::error::chain(&e))
    }

    fn switchover(&self) {
        let agent = self.host1.agent();
        self.host1
            .run(async move { agent.outgoing_switchover(VM).await })
            .expect("switchover");
        self.wait_phase("completed");
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.host1.kill();
        self.host2.kill();
        kill_qemus_under(self.root.path());
    }
}

fn capabilities() -> Vec<String> {
    vec!["events".to_string(), "pause-before-switchover".to_string()]
}

/// SIGKILLs every QEMU whose command line names a path under `root`.
fn kill_qemus_under(root: &Path) {
    let needle = root.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("qemu-system") && cmdline.contains(&needle) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn sigkill(pid: u32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL)
        .expect("SIGKILL QEMU");
}

fn wait_gone(pid: u32) {
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z") {
            return;
        }
        assert!(started.elapsed() < STEP, "QEMU {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(started.elapsed() < STEP, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_copy_migration_survives_restarts_of_both_agents_at_every_step() {
    let mut pair = Pair::new();
    let spec = pair.create_on_host1();
    let id = Uuid::new_v4();

    // Prepared, then the destination's agent restarts: it still knows the
    // migration and answers a repeated prepare the same.
    let ready = pair.prepare(id, &spec);
    let receiver = pair.host2.pid();
    pair.host2.restart();
    let status = pair
        .incoming_status(id)
        .expect("incoming_status after a restart");
    assert_eq!(status.run_state, "inmigrate", "{status:?}");
    assert!(!status.guest_ran);
    assert_eq!(pair.prepare(id, &spec).migration_uri, ready.migration_uri);
    assert_eq!(pair.host2.pid(), receiver, "the same receiving QEMU");

    // Started, and the source's agent dies at once: whether or not the
    // mirror was ready and `migrate` sent, the new agent carries on.
    // (Measured: the agent dies before the mirror's READY reached it, so
    // it is the new agent that sends `migrate`.)
    pair.start_outgoing(id, ready);
    pair.host1.restart();
    pair.wait_phase("pre_switchover");
    pair.host1.restart();
    let status = pair.wait_phase("pre_switchover");
    assert!(status.mirrors_ready, "{status:?}");
    pair.host2.restart();
    let status = pair.incoming_status(id).expect("incoming_status");
    assert_eq!(status.migration_status, "active", "{status:?}");

    // Switchover, then both agents restart before the commit's finish.
    pair.switchover();
    pair.host1.restart();
    assert_eq!(pair.outgoing_status().unwrap().phase, "completed");
    pair.host2.restart();
    let status = pair.incoming_status(id).unwrap();
    assert_eq!(status.migration_status, "completed", "{status:?}");
    assert!(!status.guest_ran, "{status:?}");

    // Commit: finish on host2, retire on host1.
    let agent2 = pair.host2.agent();
    let finished = pair
        .host2
        .run(async move { agent2.incoming_finish(id).await })
        .expect("incoming_finish after restarts");
    assert!(finished.guest_ran, "{finished:?}");
    assert!(finished.resumed_at_us.is_some(), "{finished:?}");
    let agent1 = pair.host1.agent();
    pair.host1
        .run(async move { agent1.outgoing_retire(VM, vec!["vd0".to_string()]).await })
        .expect("retire");
    pair.host1.assert_nothing_left();

    // After the finish, the destination's record no longer says incoming:
    // a restart leaves the VM running, same QEMU, and the migration's
    // answers unchanged.
    let pid = pair.host2.pid();
    pair.host2.restart();
    let vm = pair.host2.vm().expect("host2 knows the VM after a restart");
    assert_eq!(vm.state, VmState::Running, "{vm:?}");
    assert_eq!(vm.pid, Some(pid), "same QEMU");
    let status = pair
        .incoming_status(id)
        .expect("incoming_status after finish");
    assert_eq!(status.migration_status, "completed");
    assert!(status.guest_ran);
    assert_eq!(status.resumed_at_us, finished.resumed_at_us);
    let agent2 = pair.host2.agent();
    let again = pair
        .host2
        .run(async move { agent2.incoming_finish(id).await })
        .expect("a repeated finish answers the same");
    assert_eq!(again.resumed_at_us, finished.resumed_at_us);
    let agent2 = pair.host2.agent();
    let abort = pair
        .host2
        .run(async move { agent2.incoming_abort(id).await });
    assert!(abort.is_err(), "a guest that ran here is never aborted");
    assert_eq!(pair.host2.vm().unwrap().state, VmState::Running);
    let record =
        VmRecord::load(&pair.host2.vm_dir().join("vm.json")).expect("host2's record loads");
    assert!(record.incoming.is_none() && record.should_run, "{record:?}");
}

/// The agent records `migrate_started` before it sends `migrate`, so that a
/// restarted agent reads QEMU's migration state; killed between the two,
/// it left a record saying "started" and a QEMU with no migration. The
/// restarted agent must see that (`query-migrate` answers nothing) and send
/// `migrate` itself. (Found by CI: the copy migration above hung in
/// `memory` with QEMU's status `none`.)
#[test]
fn a_migrate_recorded_but_never_sent_is_sent_by_the_restarted_agent() {
    let mut pair = Pair::new();
    let spec = pair.create_on_host1();
    let id = Uuid::new_v4();
    let ready = pair.prepare(id, &spec);
    pair.start_outgoing(id, ready);
    pair.host1.kill();
    let path = pair.host1.vm_dir().join("vm.json");
    let mut record = VmRecord::load(&path).expect("host1's record loads");
    let outgoing = record
        .outgoing
        .as_mut()
        .expect("the outgoing migration is recorded");
    assert!(
        !outgoing.migrate_started,
        "the agent sent migrate before it was killed (it is killed right after the start, \
         before its mirror is READY, as measured above): this test needs the earlier moment"
    );
    // The crash window: `migrate` recorded, never sent.
    outgoing.migrate_started = true;
    record.save(&path).expect("host1's record saves");

    pair.host1.start();
    let status = pair.wait_phase("pre_switchover");
    assert!(status.mirrors_ready, "{status:?}");
    assert_eq!(status.migration_status, "pre-switchover", "{status:?}");
}

#[test]
fn after_restarts_a_completed_but_uncommitted_migration_is_undone_from_the_record() {
    let mut pair = Pair::new();
    let spec = pair.create_on_host1();
    let source = pair.host1.pid();
    let id = Uuid::new_v4();
    let ready = pair.prepare(id, &spec);
    pair.start_outgoing(id, ready);
    pair.wait_phase("pre_switchover");
    pair.switchover();
    assert_eq!(pair.host1.vm().unwrap().state, VmState::Paused);

    pair.host1.restart();
    pair.host2.restart();

    // The source leaves `postmigrate` and runs again, in the same QEMU.
    let agent1 = pair.host1.agent();
    let vm = pair
        .host1
        .run(async move { agent1.outgoing_cancel(VM).await })
        .expect("cancel after a restart");
    assert_eq!(vm.state, VmState::Running, "{vm:?}");
    assert_eq!(vm.pid, Some(source));
    let record = VmRecord::load(&pair.host1.vm_dir().join("vm.json")).unwrap();
    assert!(record.outgoing.is_none(), "{record:?}");
    // The destination's copy, which never ran, goes with its disk.
    let receiver = pair.host2.pid();
    let agent2 = pair.host2.agent();
    pair.host2
        .run(async move { agent2.incoming_abort(id).await })
        .expect("abort after a restart");
    wait_gone(receiver);
    pair.host2.assert_nothing_left();

    // Repeats are harmless; the VM can migrate again.
    let agent1 = pair.host1.agent();
    pair.host1
        .run(async move { agent1.outgoing_cancel(VM).await })
        .expect("a repeated cancel");
    let agent2 = pair.host2.agent();
    pair.host2
        .run(async move { agent2.incoming_abort(id).await })
        .expect("a repeated abort");
    assert!(pair.outgoing_status().is_err());
    let again = Uuid::new_v4();
    let ready = pair.prepare(again, &spec);
    pair.start_outgoing(again, ready);
    pair.wait_phase("pre_switchover");
    let agent1 = pair.host1.agent();
    pair.host1
        .run(async move { agent1.outgoing_cancel(VM).await })
        .expect("cancel at pre-switchover");
    assert_eq!(pair.host1.vm().unwrap().state, VmState::Running);
}

#[test]
fn qemus_that_die_mid_migration_fail_it_cleanly_on_both_ends() {
    let mut pair = Pair::new();
    let spec = pair.create_on_host1();

    // The receiving QEMU dies: `failed` with why, and the abort cleans up.
    let id = Uuid::new_v4();
    let ready = pair.prepare(id, &spec);
    pair.start_outgoing(id, ready);
    pair.wait_phase("pre_switchover");
    let receiver = pair.host2.pid();
    sigkill(receiver);
    let status = wait_until("the destination to see its QEMU gone", || {
        pair.incoming_status(id)
            .ok()
            .filter(|s| s.migration_status == "failed")
    });
    assert_eq!(status.run_state, "gone", "{status:?}");
    let why = status.error.clone().unwrap_or_default();
    assert!(why.contains(&receiver.to_string()), "{status:?}");
    let vm = pair
        .host2
        .vm()
        .expect("the failed incoming VM is still known");
    assert_eq!(vm.state, VmState::Stopped, "never crashed: {vm:?}");
    let agent2 = pair.host2.agent();
    pair.host2
        .run(async move { agent2.incoming_abort(id).await })
        .expect("abort after the receiver died");
    pair.host2.assert_nothing_left();
    let agent1 = pair.host1.agent();
    pair.host1
        .run(async move { agent1.outgoing_cancel(VM).await })
        .expect("cancel on the source");
    assert_eq!(pair.host1.vm().unwrap().state, VmState::Running);

    // The receiving QEMU dies while its agent is down: the new agent
    // aborts that migration itself and says so.
    let id = Uuid::new_v4();
    pair.prepare(id, &spec);
    let receiver = pair.host2.pid();
    pair.host2.kill();
    sigkill(receiver);
    wait_gone(receiver);
    pair.host2.start();
    pair.host2.assert_nothing_left();
    let status = pair
        .incoming_status(id)
        .expect("an aborted migration answers");
    assert_eq!(status.migration_status, "failed", "{status:?}");
    assert!(
        status.error.as_deref().unwrap_or("").contains("aborted"),
        "{status:?}"
    );
    let agent2 = pair.host2.agent();
    pair.host2
        .run(async move { agent2.incoming_abort(id).await })
        .expect("abort of an aborted migration");

    // The source QEMU dies: the VM crashed (with why), the migration
    // failed, the cancel is harmless and the destination is cleaned.
    let id = Uuid::new_v4();
    let ready = pair.prepare(id, &spec);
    pair.start_outgoing(id, ready);
    pair.wait_phase("pre_switchover");
    let source = pair.host1.pid();
    sigkill(source);
    let vm = wait_until("the source VM to be reported crashed", || {
        pair.host1.vm().filter(|vm| vm.state == VmState::Crashed)
    });
    assert!(
        vm.state_reason
            .as_deref()
            .is_some_and(|r| r.contains(&source.to_string())),
        "{vm:?}"
    );
    let status = pair.outgoing_status().expect("status of a crashed source");
    assert_eq!(status.phase, "failed", "{status:?}");
    assert!(
        status
            .error
            .as_deref()
            .unwrap_or("")
            .contains(&source.to_string()),
        "{status:?}"
    );
    let agent1 = pair.host1.agent();
    let started = pair.host1.run(async move { agent1.start(VM).await });
    assert!(
        started.is_err(),
        "a crashed source is not restarted while its migration is recorded"
    );
    let agent1 = pair.host1.agent();
    pair.host1
        .run(async move { agent1.outgoing_cancel(VM).await })
        .expect("cancel with the source QEMU gone");
    let agent2 = pair.host2.agent();
    pair.host2
        .run(async move { agent2.incoming_abort(id).await })
        .expect("abort");
    pair.host2.assert_nothing_left();
    pair.host1.restart();
    let vm = pair.host1.vm().expect("host1 still has the VM");
    assert_eq!(vm.state, VmState::Crashed, "{vm:?}");
    let agent1 = pair.host1.agent();
    let vm = pair
        .host1
        .run(async move { agent1.start(VM).await })
        .expect("the crashed VM starts again once the migration is undone");
    assert_eq!(vm.state, VmState::Running);
}

#[test]
fn work_an_agent_restart_interrupted_is_completed_when_it_opens() {
    let mut pair = Pair::new();
    let spec = pair.spec();
    pair.host1.kill();
    pair.host2.kill();

    // host1: a retire recorded but not carried out.
    let mut record = VmRecord::new(spec.clone());
    record.retiring = Some(vec!["vd0".to_string()]);
    std::fs::create_dir_all(pair.host1.disk().parent().unwrap()).unwrap();
    std::fs::write(pair.host1.disk(), b"copied").unwrap();
    record.save(&pair.host1.vm_dir().join("vm.json")).unwrap();
    // host2: an incoming migration recorded, its disk made, no QEMU yet.
    let id = Uuid::new_v4();
    let mut record = VmRecord::new(spec);
    record.incoming = Some(ferry_agent::record::IncomingRecord {
        migration_id: id,
        source_host: "host1".to_string(),
        ready: None,
        finishing: false,
    });
    record.created_files = vec![pair.host2.disk()];
    std::fs::create_dir_all(pair.host2.disk().parent().unwrap()).unwrap();
    std::fs::write(pair.host2.disk(), b"empty").unwrap();
    record.save(&pair.host2.vm_dir().join("vm.json")).unwrap();

    pair.host1.start();
    pair.host2.start();

    pair.host1.assert_nothing_left();
    pair.host2.assert_nothing_left();
    let status = pair
        .incoming_status(id)
        .expect("the aborted migration answers");
    assert_eq!(status.migration_status, "failed", "{status:?}");
}

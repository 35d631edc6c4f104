//! The agent role: the VMs of one host, each owned by its task (`vm.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ferry_api::{CreateVmRequest, DatastoreInfo, HostInfo, VmInfo};
use ferry_qemu::host::HostFacts;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::error::AgentError;
use crate::host::{AgentConfig, HostContext};
use crate::record::{IncomingRecord, VmPaths, VmRecord};
use crate::vm::{self, VmHandle};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create the state folder {path}")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("datastore {name:?}: folder {path} is not usable")]
    Datastore {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU is not usable on this host")]
    Qemu(#[source] ferry_qemu::process::ProcessError),
    #[error("cannot read this host's facts")]
    Facts(#[source] ferry_qemu::host::HostError),
}

pub struct Agent {
    host: Arc<HostContext>,
    facts: HostFacts,
    /// The VM tasks by name. The lock is held across a whole create so that
    /// two creates of one name cannot both pass the uniqueness check.
    vms: Mutex<BTreeMap<String, VmHandle>>,
    /// Incoming migrations by id → the VM they bring (also once finished,
    /// so that repeated questions get the same answer). Rebuilt from the
    /// VM records when the agent starts.
    incoming: Mutex<HashMap<uuid::Uuid, String>>,
    /// Incoming migrations this agent aborted when it started, because
    /// their QEMU had ended while it was down → (the VM, why). Everything
    /// of them is gone; this only answers the controller's questions.
    aborted: Mutex<HashMap<uuid::Uuid, (String, String)>>,
}

impl Agent {
    /// Opens the agent: checks QEMU and the datastores, then reattaches to
    /// every VM in the state folder (running QEMUs keep running untouched).
    pub async fn open(config: AgentConfig) -> Result<Arc<Agent>, OpenError> {
        std::fs::create_dir_all(config.state_dir.join("vms")).map_err(|source| {
            OpenError::StateDir {
                path: config.state_dir.display().to_string(),
                source,
            }
        })?;
        for (name, path) in &config.datastores {
            std::fs::create_dir_all(path).map_err(|source| OpenError::Datastore {
                name: name.clone(),
                path: path.display().to_string(),
                source,
            })?;
        }
        let qemu_binary = match &config.qemu_binary {
            Some(path) => path.clone(),
            None => ferry_qemu::process::find_qemu_binary().map_err(OpenError::Qemu)?,
        };
        ferry_qemu::process::check_version(&qemu_binary)
            .await
            .map_err(OpenError::Qemu)?;
        let qemu_img = qemu_binary
            .parent()
            .map(|dir| dir.join("qemu-img"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| "qemu-img".into());
        let accel = ferry_qemu::accel::choose(config.accel);
        info!(accel = %accel.accel, reason = %accel.reason, "accelerator chosen");
        let facts = ferry_qemu::host::gather(&qemu_binary, config.accel)
            .await
            .map_err(OpenError::Facts)?;
        let host = Arc::new(HostContext {
            config,
            qemu_binary,
            qemu_img,
            accel,
        });
        // Nothing can be in progress while the agent starts: a backup or a
        // file transfer that was, is gone with the agent that ran it.
        crate::backup::remove_incomplete(&host);
        crate::transfer::remove_partials(host.config.datastores.values());
        let mut vms = BTreeMap::new();
        let mut incoming = HashMap::new();
        let mut aborted = HashMap::new();
        for record in load_records(&host) {
            let name = record.spec.name.clone();
            match vm::open(host.clone(), record).await {
                vm::Opened::Vm { handle, migrations } => {
                    for id in migrations {
                        incoming.insert(id, name.clone());
                    }
                    vms.insert(name, handle);
                }
                vm::Opened::Aborted {
                    migration_id,
                    reason,
                } => {
                    aborted.insert(migration_id, (name, reason));
                }
                vm::Opened::Retired => {}
            }
        }
        info!(host = %host.config.host_name, vms = vms.len(), incoming = incoming.len(), "agent open");
        Ok(Arc::new(Agent {
            host,
            facts,
            vms: Mutex::new(vms),
            incoming: Mutex::new(incoming),
            aborted: Mutex::new(aborted),
        }))
    }

    pub fn host_name(&self) -> &str {
        &self.host.config.host_name
    }

    fn not_found(&self, name: &str) -> AgentError {
        AgentError::VmNotFound {
            name: name.to_string(),
            host: self.host_name().to_string(),
        }
    }

    async fn handle(&self, name: &str) -> Result<VmHandle, AgentError> {
        self.vms
            .lock()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| self.not_found(name))
    }

    pub async fn host_info(&self) -> HostInfo {
        let vm_count = self.vms.lock().await.len();
        let datastores = self
            .host
            .config
            .datastores
            .iter()
            .map(|(name, path)| {
                let (total_bytes, free_bytes) = space(path);
                DatastoreInfo {
                    name: name.clone(),
                    path: path.display().to_string(),
                    total_bytes,
                    free_bytes,
                }
            })
            .collect();
        // Memory changes as VMs come and go: read it now, not at start-up.
        let (memory_bytes, memory_available_bytes) = match ferry_qemu::host::meminfo() {
            Ok(info) => (info.total_bytes, info.available_bytes),
            Err(_) => (self.facts.memory_bytes, self.facts.memory_available_bytes),
        };
        HostInfo {
            name: self.host_name().to_string(),
            address: self.host.config.address.clone(),
            cpus: self.facts.cpus,
            memory_bytes,
            memory_available_bytes: memory_available_bytes
                .saturating_sub(self.host.config.reserve_memory_bytes),
            qemu_version: self.facts.qemu_version.to_string(),
            accel: self.host.accel.accel.to_string(),
            accel_reason: self.host.accel.reason.clone(),
            machine_types: self.facts.machine_types.clone(),
            cpu_models: self.offered_cpu_models(),
            datastores,
            vm_count,
            ferry_version: env!("CARGO_PKG_VERSION").to_string(),
            networks: crate::network::policy(&self.host.config.networks).await,
        }
    }

    /// The definitions of the networks the spec's NICs name, taken from
    /// `given` (the controller's), each checked usable on this host. Changes
    /// nothing: a missing bridge is only created when the VM starts.
    async fn resolve_networks(
        &self,
        spec: &ferry_core::spec::VmSpec,
        given: &[ferry_core::network::NetworkDef],
    ) -> Result<Vec<ferry_core::network::NetworkDef>, AgentError> {
        let mut used: Vec<ferry_core::network::NetworkDef> = Vec::new();
        for (i, nic) in spec.nics.iter().enumerate() {
            let Some(name) = nic.backend.network() else {
                continue;
            };
            let where_ = format!("nics[{i}] ({})", nic.id);
            let def = given.iter().find(|def| def.name == name).ok_or_else(|| {
                AgentError::UnknownNetwork {
                    nic: where_.clone(),
                    network: name.to_string(),
                }
            })?;
            crate::network::check(&self.host.config.networks, def)
                .await
                .map_err(|source| AgentError::Network {
                    nic: where_,
                    network: name.to_string(),
                    host: self.host_name().to_string(),
                    source: Box::new(source),
                })?;
            if !used.contains(def) {
                used.push(def.clone());
            }
        }
        Ok(used)
    }

    /// The CPU models VMs may use here: QEMU's, narrowed by the host's
    /// configuration.
    fn offered_cpu_models(&self) -> Vec<String> {
        match &self.host.config.cpu_models {
            Some(allowed) => self
                .facts
                .cpu_models
                .iter()
                .filter(|m| allowed.contains(m))
                .cloned()
                .collect(),
            None => self.facts.cpu_models.clone(),
        }
    }

    fn check_cpu_model(&self, spec: &ferry_core::spec::VmSpec) -> Result<(), AgentError> {
        if self.offered_cpu_models().contains(&spec.cpu_model) {
            return Ok(());
        }
        Err(AgentError::Unsupported {
            what: format!("CPU model {:?}", spec.cpu_model),
            host: self.host_name().to_string(),
        })
    }

    pub async fn list(&self) -> Vec<VmInfo> {
        let handles: Vec<VmHandle> = self.vms.lock().await.values().cloned().collect();
        let mut infos = Vec::with_capacity(handles.len());
        for handle in handles {
            if let Ok(info) = handle.info().await {
                infos.push(info);
            }
        }
        infos
    }

    pub async fn get(&self, name: &str) -> Result<VmInfo, AgentError> {
        self.handle(name).await?.info().await
    }

    /// Defines a VM (creating its datastore disks) and optionally starts it.
    /// A failed create leaves nothing behind.
    pub async fn create(&self, request: CreateVmRequest) -> Result<VmInfo, AgentError> {
        let spec = request.spec;
        spec.validate().map_err(AgentError::InvalidSpec)?;
        ferry_core::spec::check_host_files(&spec).map_err(AgentError::InvalidSpec)?;
        self.check_cpu_model(&spec)?;
        let networks = self.resolve_networks(&spec, &request.networks).await?;
        let mut vms = self.vms.lock().await;
        if vms.contains_key(&spec.name) {
            return Err(AgentError::VmExists {
                name: spec.name.clone(),
                host: self.host_name().to_string(),
            });
        }
        self.check_disks_unused(&vms, &spec).await?;
        let arrived = self.commit_arriving(&spec, &request.arriving_disks).await?;
        let host = self.host.clone();
        let spec_for_disks = spec.clone();
        let prepared =
            tokio::task::spawn_blocking(move || crate::disks::prepare(&host, &spec_for_disks))
                .await
                .expect("disk preparation does not panic");
        let created = match prepared {
            Ok(mut created) => {
                created.extend(arrived);
                created
            }
            Err(error) => {
                for file in &arrived {
                    let _ = std::fs::remove_file(file);
                }
                return Err(error);
            }
        };
        let mut record = VmRecord::new(spec.clone());
        record.created_files = created;
        record.networks = networks;
        let paths = VmPaths::new(&self.host.config.state_dir, &spec.name);
        if let Err(source) = record.save(&paths.record()) {
            for file in &record.created_files {
                let _ = std::fs::remove_file(file);
            }
            let _ = std::fs::remove_dir_all(&paths.dir);
            return Err(AgentError::Persist {
                name: spec.name.clone(),
                path: paths.record().display().to_string(),
                source,
            });
        }
        let handle = vm::spawn(self.host.clone(), record).await;
        vms.insert(spec.name.clone(), handle.clone());
        drop(vms);
        info!(vm = %spec.name, "VM defined");
        if !request.start {
            return handle.info().await;
        }
        match handle.start().await {
            Ok(info) => Ok(info),
            Err(error) => {
                // `create --start` is one request: a VM that cannot start
                // is not left defined (with the disks made for it).
                warn!(vm = %spec.name, error = %crate::error::chain(&error), "the new VM did not start; removing it");
                if let Err(undo) = self.delete(&spec.name, false).await {
                    warn!(vm = %spec.name, error = %crate::error::chain(&undo), "removing the VM that did not start failed");
                }
                Err(error)
            }
        }
    }

    /// No two VMs of this host may use one disk file (QEMU's image locking
    /// would refuse the second start anyway; refusing at create is clearer).
    async fn check_disks_unused(
        &self,
        vms: &BTreeMap<String, VmHandle>,
        spec: &ferry_core::spec::VmSpec,
    ) -> Result<(), AgentError> {
        let mut wanted = Vec::new();
        for disk in &spec.disks {
            wanted.push((disk.id.clone(), crate::disks::disk_path(&self.host, disk)?));
        }
        for handle in vms.values() {
            let other = handle.info().await?;
            for disk in &other.spec.disks {
                let Ok(path) = crate::disks::disk_path(&self.host, disk) else {
                    continue;
                };
                if let Some((id, _)) = wanted.iter().find(|(_, p)| *p == path) {
                    return Err(AgentError::Disk {
                        disk: id.clone(),
                        problem: format!(
                            "{} is already disk {:?} of VM {:?}",
                            path.display(),
                            disk.id,
                            other.name
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    pub async fn start(&self, name: &str) -> Result<VmInfo, AgentError> {
        self.handle(name).await?.start().await
    }

    pub async fn stop(
        &self,
        name: &str,
        force: bool,
        timeout: Option<std::time::Duration>,
    ) -> Result<VmInfo, AgentError> {
        let timeout = timeout.unwrap_or(self.host.config.stop_timeout);
        self.handle(name).await?.stop(force, timeout).await
    }

    pub async fn pause(&self, name: &str) -> Result<VmInfo, AgentError> {
        self.handle(name).await?.pause().await
    }

    pub async fn resume(&self, name: &str) -> Result<VmInfo, AgentError> {
        self.handle(name).await?.resume().await
    }

    pub async fn delete(&self, name: &str, keep_disks: bool) -> Result<(), AgentError> {
        self.delete_with(name, keep_disks, false).await
    }

    /// Deletes a VM; `all_disks` also removes the datastore files the agent
    /// did not create (see `DeleteVmQuery::all_disks`).
    pub async fn delete_with(
        &self,
        name: &str,
        keep_disks: bool,
        all_disks: bool,
    ) -> Result<(), AgentError> {
        let mut vms = self.vms.lock().await;
        let handle = vms.get(name).cloned().ok_or_else(|| self.not_found(name))?;
        handle.delete(keep_disks, all_disks).await?;
        vms.remove(name);
        self.forget_migrations(name).await;
        Ok(())
    }

    /// The VM `name` left this host: the ids of the migrations that brought
    /// it here no longer lead anywhere.
    async fn forget_migrations(&self, name: &str) {
        self.incoming.lock().await.retain(|_, vm| vm != name);
    }

    // ---- migration: source side ----

    pub async fn outgoing_start(
        &self,
        name: &str,
        request: ferry_api::OutgoingRequest,
    ) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.handle(name).await?.outgoing_start(request).await
    }

    pub async fn outgoing_status(
        &self,
        name: &str,
    ) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.handle(name).await?.outgoing_status().await
    }

    pub async fn outgoing_switchover(
        &self,
        name: &str,
    ) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.handle(name).await?.outgoing_switchover().await
    }

    /// Post-copy paused by a broken link: reconnect to the destination's
    /// new listener (`incoming_recover`).
    pub async fn outgoing_resume(
        &self,
        name: &str,
        migration_uri: String,
    ) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.handle(name)
            .await?
            .outgoing_resume(migration_uri)
            .await
    }

    /// Post-copy stalled on a silent link: pause it (to be resumed).
    pub async fn outgoing_pause(
        &self,
        name: &str,
    ) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.handle(name).await?.outgoing_pause().await
    }

    pub async fn outgoing_adjust(
        &self,
        name: &str,
        adjust: ferry_api::OutgoingAdjust,
    ) -> Result<ferry_api::OutgoingStatus, AgentError> {
        self.handle(name).await?.outgoing_adjust(adjust).await
    }

    pub async fn outgoing_cancel(&self, name: &str) -> Result<VmInfo, AgentError> {
        self.handle(name).await?.outgoing_cancel().await
    }

    /// After the commit: the VM leaves this host for good.
    pub async fn outgoing_retire(
        &self,
        name: &str,
        remove_disks: Vec<String>,
    ) -> Result<(), AgentError> {
        let mut vms = self.vms.lock().await;
        let Some(handle) = vms.get(name).cloned() else {
            // Already retired (a repeated call after a lost answer).
            return Ok(());
        };
        handle.outgoing_retire(remove_disks).await?;
        vms.remove(name);
        self.forget_migrations(name).await;
        Ok(())
    }

    pub async fn dirty_rate(
        &self,
        name: &str,
        seconds: u64,
    ) -> Result<ferry_api::DirtyRate, AgentError> {
        self.handle(name).await?.dirty_rate(seconds).await
    }

    // ---- migration: destination side ----

    /// Defines the arriving VM (creating empty disks for those that are
    /// copied) and readies a paused QEMU to receive it. Repeating the call
    /// for the same migration answers the same; a failure leaves nothing.
    pub async fn incoming_prepare(
        &self,
        request: ferry_api::IncomingRequest,
    ) -> Result<ferry_api::IncomingReady, AgentError> {
        let spec = request.spec.clone();
        spec.validate().map_err(AgentError::InvalidSpec)?;
        self.check_cpu_model(&spec)?;
        let networks = self.resolve_networks(&spec, &request.networks).await?;
        let mut vms = self.vms.lock().await;
        let known = self
            .incoming
            .lock()
            .await
            .get(&request.migration_id)
            .cloned();
        if let Some(name) = known {
            let handle = vms
                .get(&name)
                .cloned()
                .ok_or_else(|| self.not_found(&name))?;
            drop(vms);
            return handle.incoming_prepare(request).await;
        }
        if vms.contains_key(&spec.name) {
            return Err(AgentError::VmExists {
                name: spec.name.clone(),
                host: self.host_name().to_string(),
            });
        }
        // The record comes first, naming the disks about to be made and
        // the migration: an agent that dies from here on finds them and
        // aborts the migration when it starts again.
        let mut record = VmRecord::new(spec.clone());
        record.created_files =
            crate::disks::incoming_files(&self.host, &spec, &request.copy_disks)?;
        record.networks = networks;
        record.incoming = Some(IncomingRecord {
            migration_id: request.migration_id,
            source_host: request.source_host.clone(),
            ready: None,
            finishing: false,
        });
        let paths = VmPaths::new(&self.host.config.state_dir, &spec.name);
        if let Err(source) = record.save(&paths.record()) {
            let _ = std::fs::remove_dir_all(&paths.dir);
            return Err(AgentError::Persist {
                name: spec.name.clone(),
                path: paths.record().display().to_string(),
                source,
            });
        }
        let host = self.host.clone();
        let copies = request.copy_disks.clone();
        let spec_for_disks = spec.clone();
        let created = tokio::task::spawn_blocking(move || {
            crate::disks::prepare_incoming(&host, &spec_for_disks, &copies)
        })
        .await
        .unwrap_or_else(|join| {
            Err(AgentError::Disk {
                disk: "(all)".to_string(),
                problem: format!("creating the disks failed: {join}"),
            })
        });
        if let Err(error) = created {
            // `prepare_incoming` removed what it made.
            let _ = std::fs::remove_dir_all(&paths.dir);
            return Err(error);
        }
        self.aborted.lock().await.remove(&request.migration_id);
        let handle = vm::spawn(self.host.clone(), record).await;
        vms.insert(spec.name.clone(), handle.clone());
        self.incoming
            .lock()
            .await
            .insert(request.migration_id, spec.name.clone());
        drop(vms);
        let migration_id = request.migration_id;
        match handle.incoming_prepare(request).await {
            Ok(ready) => Ok(ready),
            Err(error) => {
                // Undo what this call made: the QEMU, the disks, the record.
                if let Err(undo) = self.incoming_abort(migration_id).await {
                    warn!(error = %crate::error::chain(&undo), "cleaning up a failed incoming migration failed");
                }
                Err(error)
            }
        }
    }

    async fn incoming_vm(&self, id: uuid::Uuid) -> Result<(String, VmHandle), AgentError> {
        let name = self.incoming.lock().await.get(&id).cloned();
        let Some(name) = name else {
            let problem = match self.aborted.lock().await.get(&id) {
                Some((_, reason)) => format!("incoming migration {id} failed: {reason}"),
                None => format!("no incoming migration {id} on host {}", self.host_name()),
            };
            return Err(AgentError::Migration { problem });
        };
        let handle = self.handle(&name).await?;
        Ok((name, handle))
    }

    /// Where an incoming migration stands. One this agent aborted when it
    /// started (its QEMU had ended while the agent was down) is `failed`.
    pub async fn incoming_status(
        &self,
        id: uuid::Uuid,
    ) -> Result<ferry_api::IncomingStatus, AgentError> {
        if !self.incoming.lock().await.contains_key(&id) {
            if let Some((vm, reason)) = self.aborted.lock().await.get(&id) {
                return Ok(ferry_api::IncomingStatus {
                    migration_id: id,
                    vm: vm.clone(),
                    run_state: "gone".to_string(),
                    migration_status: "failed".to_string(),
                    guest_ran: false,
                    resumed_at_us: None,
                    error: Some(reason.clone()),
                });
            }
        }
        self.incoming_vm(id).await?.1.incoming_status(id).await
    }

    /// The id stays known after the finish (also across agent restarts),
    /// so that repeated calls (and the controller's report) get the same
    /// answer.
    pub async fn incoming_finish(
        &self,
        id: uuid::Uuid,
    ) -> Result<ferry_api::IncomingStatus, AgentError> {
        let (_, handle) = self.incoming_vm(id).await?;
        handle.incoming_finish(id).await
    }

    /// Post-copy paused by a broken link: listen for the source again. The
    /// VM may already run here (post-copy resumes it before the end).
    pub async fn incoming_recover(
        &self,
        id: uuid::Uuid,
    ) -> Result<ferry_api::IncomingReady, AgentError> {
        let (_, handle) = self.incoming_vm(id).await?;
        handle.incoming_recover(id).await
    }

    /// Undo of `incoming_prepare`. Unknown ids are fine: nothing to undo.
    pub async fn incoming_abort(&self, id: uuid::Uuid) -> Result<(), AgentError> {
        let Some(name) = self.incoming.lock().await.get(&id).cloned() else {
            return Ok(());
        };
        let mut vms = self.vms.lock().await;
        if let Some(handle) = vms.get(&name).cloned() {
            if !handle.incoming_abort(id).await? {
                // The VM has nothing of this migration (a stale id).
                self.incoming.lock().await.remove(&id);
                return Ok(());
            }
            vms.remove(&name);
        }
        self.incoming.lock().await.remove(&id);
        Ok(())
    }

    /// The console log of a VM (it exists once the VM has started once).
    pub async fn console_path(&self, name: &str) -> Result<std::path::PathBuf, AgentError> {
        self.handle(name).await?;
        Ok(VmPaths::new(&self.host.config.state_dir, name).console_log())
    }
}

/// Reads every VM record in the state folder; a record that cannot be read
/// is reported and skipped (never deleted: a person may need it).
fn load_records(host: &HostContext) -> Vec<VmRecord> {
    let dir = host.config.state_dir.join("vms");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut records = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path().join("vm.json");
        if !path.exists() {
            continue;
        }
        match VmRecord::load(&path) {
            Ok(record) => records.push(record),
            Err(error) => warn!(path = %path.display(), %error, "skipping unreadable VM record"),
        }
    }
    records
}

/// Total and free bytes of the filesystem holding `path`.
fn space(path: &std::path::Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(stat) => {
            let unit = stat.fragment_size();
            (stat.blocks() * unit, stat.blocks_available() * unit)
        }
        Err(_) => (0, 0),
    }
}

// ---- storage: moves, backups, files between hosts ----

/// Largest file accepted from another host (a disk image).
const MAX_ARRIVING_FILE_BYTES: u64 = 64 << 40;

impl Agent {
    /// Renames into place each disk that arrived as a partial file (an
    /// offline migration), after checking it against its digest; returns
    /// the files. On any failure every partial of the spec is discarded and
    /// the files renamed so far are removed: nothing is left.
    async fn commit_arriving(
        &self,
        spec: &ferry_core::spec::VmSpec,
        arriving: &BTreeMap<String, ferry_api::FileDigest>,
    ) -> Result<Vec<std::path::PathBuf>, AgentError> {
        let mut committed = Vec::new();
        let mut paths = Vec::new();
        for (disk_id, _) in arriving.iter() {
            let disk = spec
                .disks
                .iter()
                .find(|d| &d.id == disk_id)
                .ok_or_else(|| AgentError::Disk {
                    disk: disk_id.clone(),
                    problem: "arrived but is not a disk of the VM".into(),
                })?;
            paths.push((disk_id.clone(), crate::disks::disk_path(&self.host, disk)?));
        }
        let undo = |committed: &[std::path::PathBuf]| {
            for (_, path) in &paths {
                let _ = crate::transfer::discard_partial(path);
            }
            for path in committed {
                let _ = std::fs::remove_file(path);
            }
        };
        for (disk_id, path) in &paths {
            let digest = &arriving[disk_id];
            if let Err(error) = crate::transfer::commit_partial(path, digest).await {
                undo(&committed);
                return Err(AgentError::Disk {
                    disk: disk_id.clone(),
                    problem: format!(
                        "the copy that arrived cannot be used: {}",
                        crate::error::chain(&error)
                    ),
                });
            }
            committed.push(path.clone());
        }
        Ok(committed)
    }

    pub async fn storage_move(
        &self,
        name: &str,
        request: ferry_api::DiskMoveRequest,
    ) -> Result<ferry_api::DiskMoveStatus, AgentError> {
        self.handle(name).await?.storage_move(request).await
    }

    pub async fn storage_move_status(
        &self,
        name: &str,
    ) -> Result<ferry_api::DiskMoveStatus, AgentError> {
        self.handle(name).await?.storage_move_status().await
    }

    pub async fn storage_move_cancel(
        &self,
        name: &str,
    ) -> Result<ferry_api::DiskMoveStatus, AgentError> {
        self.handle(name).await?.storage_move_cancel().await
    }

    /// Takes a backup of VM `name` and answers when it is complete.
    pub async fn backup_create(
        &self,
        name: &str,
        request: ferry_api::BackupRequest,
    ) -> Result<ferry_api::BackupInfo, AgentError> {
        let handle = self.handle(name).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let start = vm::BackupStart {
            id: crate::backup::new_id(name, now),
            datastore: request.datastore,
            reason: request.reason.unwrap_or_else(|| "manual".to_string()),
        };
        handle.backup(start).await
    }

    pub fn backups(&self) -> Vec<ferry_api::BackupInfo> {
        crate::backup::list(&self.host)
    }

    pub fn backup(&self, id: &str) -> Result<ferry_api::BackupInfo, AgentError> {
        crate::backup::find(&self.host, id).map(|(info, _)| info)
    }

    pub fn backup_delete(&self, id: &str) -> Result<(), AgentError> {
        crate::backup::delete(&self.host, id)
    }

    /// Defines a VM from a backup (stopped). An existing VM of that name is
    /// replaced only with `force` (stopped, then deleted with its disks);
    /// disk files that exist are never overwritten.
    pub async fn backup_restore(
        &self,
        id: &str,
        request: ferry_api::AgentRestoreRequest,
    ) -> Result<VmInfo, AgentError> {
        let (info, folder) = crate::backup::find(&self.host, id)?;
        let spec = crate::backup::restore_spec(&info, &folder, request.as_name.as_deref());
        spec.validate().map_err(AgentError::InvalidSpec)?;
        if self.vms.lock().await.contains_key(&spec.name) {
            if !request.force {
                return Err(AgentError::Storage {
                    problem: format!(
                        "a VM named {:?} exists on host {}; restoring backup {id} would replace it: \
                         add --force to replace it, or --as NAME to restore next to it",
                        spec.name,
                        self.host_name()
                    ),
                });
            }
            info!(vm = %spec.name, backup = %id, "replacing the VM with its backup (--force)");
            let stopped = self.stop(&spec.name, true, None).await;
            if let Err(error) = stopped {
                if !matches!(error, AgentError::WrongState { .. }) {
                    return Err(error);
                }
            }
            self.delete(&spec.name, false).await?;
        }
        for disk in &spec.disks {
            let path = crate::disks::disk_path(&self.host, disk)?;
            if path.exists() {
                return Err(AgentError::Disk {
                    disk: disk.id.clone(),
                    problem: format!(
                        "{} exists and is not replaced by a restore; remove it or restore with --as NAME",
                        path.display()
                    ),
                });
            }
        }
        let created = self
            .create(CreateVmRequest {
                spec,
                start: false,
                networks: info.networks.clone(),
                arriving_disks: BTreeMap::new(),
            })
            .await?;
        info!(vm = %created.name, backup = %id, "VM restored from backup");
        Ok(created)
    }

    /// The bytes of a stopped VM's disk file, for a copy to another host.
    pub async fn disk_file(
        &self,
        name: &str,
        disk_id: &str,
    ) -> Result<std::path::PathBuf, AgentError> {
        let info = self.handle(name).await?.info().await?;
        if info.state.has_process() {
            return Err(AgentError::WrongState {
                name: name.to_string(),
                state: info.state,
                action: "copying its disk files",
                needed: "stopped",
            });
        }
        let disk = info
            .spec
            .disks
            .iter()
            .find(|d| d.id == disk_id)
            .ok_or_else(|| AgentError::Disk {
                disk: disk_id.to_string(),
                problem: format!("is not a disk of VM {name:?}"),
            })?;
        crate::disks::disk_path(&self.host, disk)
    }

    /// Where a file arriving for datastore `datastore` is written.
    pub fn arriving_path(
        &self,
        datastore: &str,
        file: &str,
    ) -> Result<std::path::PathBuf, AgentError> {
        let folder = self.host.config.datastores.get(datastore).ok_or_else(|| {
            AgentError::UnknownDatastore {
                name: datastore.to_string(),
                host: self.host_name().to_string(),
                known: self.host.datastore_names(),
            }
        })?;
        let plain =
            !file.is_empty() && !file.starts_with('.') && !file.contains('/') && file.len() <= 255;
        if !plain {
            return Err(AgentError::Disk {
                disk: file.to_string(),
                problem: "a datastore file name is one plain component".into(),
            });
        }
        Ok(folder.join(file))
    }

    /// Receives a file into its partial (see `transfer`); its digest.
    pub async fn receive_arriving<S, E>(
        &self,
        datastore: &str,
        file: &str,
        stream: S,
        expected_len: Option<u64>,
    ) -> Result<ferry_api::FileDigest, AgentError>
    where
        S: futures::Stream<Item = Result<axum::body::Bytes, E>> + Unpin + Send,
        E: std::error::Error + Send + Sync + 'static,
    {
        let path = self.arriving_path(datastore, file)?;
        crate::transfer::receive_file(stream, &path, expected_len, MAX_ARRIVING_FILE_BYTES)
            .await
            .map_err(|error| AgentError::Disk {
                disk: file.to_string(),
                problem: format!("receiving it failed: {}", crate::error::chain(&error)),
            })
    }

    pub fn discard_arriving(&self, datastore: &str, file: &str) -> Result<(), AgentError> {
        let path = self.arriving_path(datastore, file)?;
        crate::transfer::discard_partial(&path).map_err(|error| AgentError::Disk {
            disk: file.to_string(),
            problem: crate::error::chain(&error),
        })
    }

    /// Marks a stopped VM as leaving for another host (it cannot start
    /// until the mark is cleared), or clears the mark.
    pub async fn set_departing(
        &self,
        name: &str,
        migration: Option<uuid::Uuid>,
    ) -> Result<VmInfo, AgentError> {
        self.handle(name).await?.set_departing(migration).await
    }
}

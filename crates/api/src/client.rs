//! Typed HTTPS client for ferryd's API, used by the CLI (and later by the
//! controller to reach agents). It only ever trusts the cluster CA and always
//! presents a certificate: there is no plain-HTTP path.

use crate::migration::*;
use crate::types::*;
use serde::de::DeserializeOwned;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the HTTPS client")]
    Build(#[source] reqwest::Error),
    #[error("request to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error; `message` is its whole chain.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected response from {url} (HTTP {status})")]
    Decode {
        url: String,
        status: u16,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// The API's error code when the server answered with an error.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.api_code() == Some("not_found")
    }
}

/// Where an agent serves its VMs.
const AGENT_VMS: &str = "/v1/vms";
/// Where the controller serves every host's VMs: the same routes as an
/// agent's, under another prefix because both routers share one server on
/// the controller's host.
const CLUSTER_VMS: &str = "/v1/cluster/vms";

/// A client for one ferryd.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    /// Prefix of the VM paths (`AGENT_VMS` or `CLUSTER_VMS`): the VM methods
    /// are the same for one agent and for the whole cluster, only the
    /// prefix differs.
    vms: &'static str,
    http: reqwest::Client,
}

/// What `Client::list_vms_report` found: the VMs, and the hosts that did
/// not answer (only a controller reports those; an agent answers for
/// itself or not at all).
#[derive(Debug, Clone, Default)]
pub struct VmListing {
    pub vms: Vec<VmInfo>,
    /// `(host, why)`, the reason being the whole error chain.
    pub unreachable: Vec<(String, String)>,
}

/// The answer to a [`Relay`], body unread: a name for it that callers can
/// use without depending on `reqwest` themselves.
pub type RelayResponse = reqwest::Response;

/// A request passed on unchanged to an agent's VM routes; see
/// [`Client::relay_vm`].
#[derive(Debug, Clone)]
pub struct Relay<'a> {
    pub method: reqwest::Method,
    /// The VM, or `None` for the collection (`GET`/`POST` of the prefix).
    pub vm: Option<&'a str>,
    /// A sub-path of the VM (`start`, `console`…), without slashes.
    pub action: Option<&'a str>,
    /// The raw (still percent-encoded) query string.
    pub query: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// Empty for no body.
    pub body: Vec<u8>,
}

impl Client {
    /// `base` is like `https://127.0.0.1:7101`; `tls` comes from
    /// `ferry_pki::client_config`.
    pub fn new(base: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(ClientError::Build)?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            vms: AGENT_VMS,
            http,
        })
    }

    /// A client for the controller whose VM methods (`list_vms`,
    /// `create_vm`, `get_vm`, `start_vm`, …, `console_follow`) address the
    /// whole cluster (`/v1/cluster/vms`): the controller finds each VM's
    /// host and passes the request on.
    pub fn controller(base: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, ClientError> {
        Ok(Client::new(base, tls)?.with_cluster_paths())
    }

    /// The same connection (and connection pool), with the VM methods
    /// addressing the controller's cluster-wide paths; see
    /// [`Client::controller`].
    pub fn with_cluster_paths(&self) -> Client {
        Client {
            vms: CLUSTER_VMS,
            ..self.clone()
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `{prefix}/{name}`, the name encoded.
    fn vm_path(&self, name: &str) -> String {
        format!("{}/{}", self.vms, encode(name))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: String,
    ) -> Result<T, ClientError> {
        let response = self.checked(request, &url).await?;
        let status = response.status().as_u16();
        response
            .json::<T>()
            .await
            .map_err(|source| ClientError::Decode {
                url,
                status,
                source,
            })
    }

    /// Sends a request and turns an error status into `ClientError::Api`.
    async fn checked(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.to_string(),
                source,
            })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => ClientError::Api {
                status,
                code: body.error.code,
                message: body.error.message,
            },
            Err(_) => ClientError::Api {
                status,
                code: "http".to_string(),
                message: format!("HTTP {status} from {url}: {}", text.trim()),
            },
        })
    }

    pub async fn host(&self) -> Result<HostInfo, ClientError> {
        let url = self.url("/v1/host");
        self.send(self.http.get(&url), url).await
    }

    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        Ok(self.list_vms_report().await?.vms)
    }

    /// `list_vms`, plus the hosts the controller could not list (from the
    /// `UNREACHABLE_HOST_HEADER`s of its answer).
    pub async fn list_vms_report(&self) -> Result<VmListing, ClientError> {
        let url = self.url(self.vms);
        let response = self.checked(self.http.get(&url), &url).await?;
        let unreachable = response
            .headers()
            .get_all(UNREACHABLE_HOST_HEADER)
            .iter()
            .map(|value| parse_unreachable(&String::from_utf8_lossy(value.as_bytes())))
            .collect();
        let status = response.status().as_u16();
        let vms = response
            .json::<Vec<VmInfo>>()
            .await
            .map_err(|source| ClientError::Decode {
                url,
                status,
                source,
            })?;
        Ok(VmListing { vms, unreachable })
    }

    /// Creates a VM. Through the controller ([`Client::controller`]) it
    /// lands on the host the controller places it on.
    pub async fn create_vm(&self, request: &CreateVmRequest) -> Result<VmInfo, ClientError> {
        let url = self.url(self.vms);
        self.send(self.http.post(&url).json(request), url).await
    }

    /// Creates a VM through the controller (whatever this client's VM
    /// prefix), on `host` or, without one, where the controller places it.
    pub async fn place_vm(
        &self,
        request: &CreateVmRequest,
        host: Option<&str>,
    ) -> Result<VmInfo, ClientError> {
        let body = PlaceVmRequest {
            vm: request.clone(),
            host: host.map(str::to_string),
        };
        let url = self.url(CLUSTER_VMS);
        self.send(self.http.post(&url).json(&body), url).await
    }

    pub async fn get_vm(&self, name: &str) -> Result<VmInfo, ClientError> {
        let url = self.url(&self.vm_path(name));
        self.send(self.http.get(&url), url).await
    }

    async fn vm_action<B: serde::Serialize>(
        &self,
        name: &str,
        action: &str,
        body: &B,
    ) -> Result<VmInfo, ClientError> {
        let url = self.url(&format!("{}/{action}", self.vm_path(name)));
        self.send(self.http.post(&url).json(body), url).await
    }

    pub async fn start_vm(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.vm_action(name, "start", &serde_json::json!({})).await
    }

    pub async fn stop_vm(
        &self,
        name: &str,
        request: &StopVmRequest,
    ) -> Result<VmInfo, ClientError> {
        self.vm_action(name, "stop", request).await
    }

    pub async fn pause_vm(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.vm_action(name, "pause", &serde_json::json!({})).await
    }

    pub async fn resume_vm(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.vm_action(name, "resume", &serde_json::json!({})).await
    }

    pub async fn delete_vm(&self, name: &str, query: &DeleteVmQuery) -> Result<(), ClientError> {
        let url = self.url(&self.vm_path(name));
        self.checked(self.http.delete(&url).query(query), &url)
            .await
            .map(|_| ())
    }

    /// The tail of the VM's console log.
    pub async fn console(&self, name: &str, lines: usize) -> Result<String, ClientError> {
        let url = self.url(&format!("{}/console", self.vm_path(name)));
        let query = ConsoleQuery {
            lines: Some(lines),
            follow: false,
        };
        let response = self
            .checked(self.http.get(&url).query(&query), &url)
            .await?;
        let status = response.status().as_u16();
        response.text().await.map_err(|source| ClientError::Decode {
            url,
            status,
            source,
        })
    }

    /// The tail of the console log, then everything the guest prints next,
    /// as a byte stream that ends when the VM stops or the agent goes away.
    pub async fn console_follow(
        &self,
        name: &str,
        lines: usize,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(&format!("{}/console", self.vm_path(name)));
        let query = ConsoleQuery {
            lines: Some(lines),
            follow: true,
        };
        self.checked(self.http.get(&url).query(&query), &url).await
    }

    /// Sends a request to this ferryd's VM routes as given and returns the
    /// answer whatever its status, body unread: how the controller passes
    /// a request on to the agent that owns the VM (streaming included, so
    /// `console?follow=true` works through it). Only a failure to get an
    /// answer at all is an error.
    pub async fn relay_vm(&self, relay: Relay<'_>) -> Result<RelayResponse, ClientError> {
        let mut path = match relay.vm {
            Some(vm) => self.vm_path(vm),
            None => self.vms.to_string(),
        };
        if let Some(action) = relay.action {
            path.push('/');
            path.push_str(&encode(action));
        }
        if let Some(query) = relay.query.filter(|q| !q.is_empty()) {
            path.push('?');
            path.push_str(query);
        }
        let url = self.url(&path);
        let mut request = self.http.request(relay.method, &url);
        if let Some(content_type) = relay.content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        if !relay.body.is_empty() {
            request = request.body(relay.body);
        }
        request
            .send()
            .await
            .map_err(|source| ClientError::Transport { url, source })
    }
}

impl Client {
    async fn post_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        self.send(self.http.post(&url).json(body), url).await
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = self.url(path);
        self.send(self.http.get(&url), url).await
    }

    async fn delete_path(&self, path: &str) -> Result<(), ClientError> {
        let url = self.url(path);
        self.checked(self.http.delete(&url), &url).await.map(|_| ())
    }

    // ---- controller ----

    /// A host announces itself to the controller (host certificates only).
    pub async fn join(&self, request: &crate::JoinRequest) -> Result<(), ClientError> {
        let url = self.url("/v1/cluster/join");
        self.checked(self.http.post(&url).json(request), &url)
            .await
            .map(|_| ())
    }

    /// The hosts that joined the controller, each with its live facts or
    /// why it did not answer.
    pub async fn cluster_host_list(&self) -> Result<Vec<ClusterHost>, ClientError> {
        self.get_json("/v1/cluster/hosts").await
    }

    /// One joined host's live facts, asked through the controller.
    pub async fn cluster_host(&self, name: &str) -> Result<HostInfo, ClientError> {
        self.get_json(&format!("/v1/cluster/hosts/{}", encode(name)))
            .await
    }

    /// The names of the hosts that joined the controller.
    pub async fn cluster_hosts(&self) -> Result<Vec<String>, ClientError> {
        let hosts: Vec<serde_json::Value> = self.get_json("/v1/cluster/hosts").await?;
        Ok(hosts
            .iter()
            .filter_map(|h| h["name"].as_str().map(str::to_string))
            .collect())
    }

    // ---- controller: networks ----

    pub async fn create_network(
        &self,
        request: &crate::CreateNetworkRequest,
    ) -> Result<crate::NetworkInfo, ClientError> {
        self.post_json("/v1/cluster/networks", request).await
    }

    pub async fn list_networks(&self) -> Result<Vec<crate::NetworkInfo>, ClientError> {
        self.get_json("/v1/cluster/networks").await
    }

    pub async fn get_network(&self, name: &str) -> Result<crate::NetworkInfo, ClientError> {
        self.get_json(&format!("/v1/cluster/networks/{}", encode(name)))
            .await
    }

    pub async fn delete_network(&self, name: &str) -> Result<(), ClientError> {
        let url = self.url(&format!("/v1/cluster/networks/{}", encode(name)));
        self.checked(self.http.delete(&url), &url).await.map(|_| ())
    }

    /// Starts a migration (or, with `dry_run`, only checks and predicts it).
    pub async fn migrate(&self, request: &MigrateRequest) -> Result<MigrateAnswer, ClientError> {
        self.post_json("/v1/migrations", request).await
    }

    pub async fn list_migrations(&self) -> Result<Vec<MigrationReport>, ClientError> {
        self.get_json("/v1/migrations").await
    }

    pub async fn get_migration(&self, id: &str) -> Result<MigrationReport, ClientError> {
        self.get_json(&format!("/v1/migrations/{}", encode(id)))
            .await
    }

    /// Adds what a client observed (network downtime) to a migration's
    /// report.
    pub async fn observe_migration(
        &self,
        id: &str,
        observation: &crate::MigrationObservation,
    ) -> Result<MigrationReport, ClientError> {
        self.post_json(
            &format!("/v1/migrations/{}/observations", encode(id)),
            observation,
        )
        .await
    }

    pub async fn cancel_migration(&self, id: &str) -> Result<MigrationReport, ClientError> {
        self.post_json(
            &format!("/v1/migrations/{}/cancel", encode(id)),
            &serde_json::json!({}),
        )
        .await
    }

    // ---- agent: destination side ----

    pub async fn incoming_prepare(
        &self,
        request: &IncomingRequest,
    ) -> Result<IncomingReady, ClientError> {
        self.post_json("/v1/incoming", request).await
    }

    pub async fn incoming_status(&self, id: uuid::Uuid) -> Result<IncomingStatus, ClientError> {
        self.get_json(&format!("/v1/incoming/{id}")).await
    }

    /// After commit: stop serving NBD and let the guest run here.
    pub async fn incoming_finish(&self, id: uuid::Uuid) -> Result<IncomingStatus, ClientError> {
        self.post_json(&format!("/v1/incoming/{id}/finish"), &serde_json::json!({}))
            .await
    }

    /// Post-copy paused: the destination listens again; its new address.
    pub async fn incoming_recover(&self, id: uuid::Uuid) -> Result<IncomingReady, ClientError> {
        self.post_json(
            &format!("/v1/incoming/{id}/recover"),
            &serde_json::json!({}),
        )
        .await
    }

    /// Post-copy paused: the source reconnects to `migration_uri`.
    pub async fn outgoing_resume(
        &self,
        vm: &str,
        migration_uri: &str,
    ) -> Result<OutgoingStatus, ClientError> {
        self.post_json(
            &format!("/v1/vms/{}/outgoing/resume", encode(vm)),
            &crate::OutgoingResume {
                migration_uri: migration_uri.to_string(),
            },
        )
        .await
    }

    /// Post-copy stalled: pause it on the source (to be resumed later).
    pub async fn outgoing_pause(&self, vm: &str) -> Result<OutgoingStatus, ClientError> {
        self.post_json(
            &format!("/v1/vms/{}/outgoing/pause", encode(vm)),
            &serde_json::json!({}),
        )
        .await
    }

    /// Before commit: stop the waiting QEMU and delete what was made for it.
    pub async fn incoming_abort(&self, id: uuid::Uuid) -> Result<(), ClientError> {
        self.delete_path(&format!("/v1/incoming/{id}")).await
    }

    // ---- agent: source side ----

    pub async fn outgoing_start(
        &self,
        vm: &str,
        request: &OutgoingRequest,
    ) -> Result<OutgoingStatus, ClientError> {
        self.post_json(&format!("/v1/vms/{}/outgoing", encode(vm)), request)
            .await
    }

    pub async fn outgoing_status(&self, vm: &str) -> Result<OutgoingStatus, ClientError> {
        self.get_json(&format!("/v1/vms/{}/outgoing", encode(vm)))
            .await
    }

    /// At `pre_switchover`: complete the mirrors and let QEMU finish.
    pub async fn outgoing_switchover(&self, vm: &str) -> Result<OutgoingStatus, ClientError> {
        self.post_json(
            &format!("/v1/vms/{}/outgoing/switchover", encode(vm)),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn outgoing_adjust(
        &self,
        vm: &str,
        adjust: &OutgoingAdjust,
    ) -> Result<OutgoingStatus, ClientError> {
        self.post_json(&format!("/v1/vms/{}/outgoing/adjust", encode(vm)), adjust)
            .await
    }

    /// Before commit: cancel, tear down the mirrors, and resume the source.
    pub async fn outgoing_cancel(&self, vm: &str) -> Result<VmInfo, ClientError> {
        self.post_json(
            &format!("/v1/vms/{}/outgoing/cancel", encode(vm)),
            &serde_json::json!({}),
        )
        .await
    }

    /// After commit: end the source QEMU and forget the VM here, deleting
    /// the files of the disks that were copied.
    pub async fn outgoing_retire(
        &self,
        vm: &str,
        remove_disks: &[String],
    ) -> Result<(), ClientError> {
        let url = self.url(&format!("/v1/vms/{}/outgoing/retire", encode(vm)));
        let body = RetireRequest {
            remove_disks: remove_disks.to_vec(),
        };
        self.checked(self.http.post(&url).json(&body), &url)
            .await
            .map(|_| ())
    }

    /// Samples the guest's dirty rate for `seconds`.
    pub async fn dirty_rate(&self, vm: &str, seconds: u64) -> Result<DirtyRate, ClientError> {
        self.post_json(
            &format!("/v1/vms/{}/dirty-rate", encode(vm)),
            &serde_json::json!({ "seconds": seconds }),
        )
        .await
    }
}

/// One `UNREACHABLE_HOST_HEADER` value, `NAME: WHY`, as `(NAME, WHY)`.
fn parse_unreachable(value: &str) -> (String, String) {
    match value.split_once(": ") {
        Some((host, why)) => (host.to_string(), why.to_string()),
        None => (value.to_string(), String::new()),
    }
}

// ---- storage: moves, backups, files between hosts ----

/// Where the controller serves backups of the whole cluster.
const CLUSTER_BACKUPS: &str = "/v1/cluster/backups";

impl Client {
    /// Controller: moves a VM's disks to another datastore of its host.
    pub async fn storage_move(
        &self,
        request: &crate::StorageMoveRequest,
    ) -> Result<MigrationReport, ClientError> {
        self.post_json("/v1/storage-moves", request).await
    }

    /// Agent: starts moving disks of VM `vm`.
    pub async fn agent_storage_move(
        &self,
        vm: &str,
        request: &crate::DiskMoveRequest,
    ) -> Result<crate::DiskMoveStatus, ClientError> {
        self.post_json(&format!("{AGENT_VMS}/{}/storage/move", encode(vm)), request)
            .await
    }

    /// Agent: the current (or last) storage move of VM `vm`.
    pub async fn agent_storage_move_status(
        &self,
        vm: &str,
    ) -> Result<crate::DiskMoveStatus, ClientError> {
        self.get_json(&format!("{AGENT_VMS}/{}/storage/move", encode(vm)))
            .await
    }

    /// Agent: cancels the storage move of VM `vm` (before it switched).
    pub async fn agent_storage_move_cancel(
        &self,
        vm: &str,
    ) -> Result<crate::DiskMoveStatus, ClientError> {
        self.post_json(
            &format!("{AGENT_VMS}/{}/storage/move/cancel", encode(vm)),
            &serde_json::json!({}),
        )
        .await
    }

    /// Agent: takes a backup of VM `vm` (answers when it is complete).
    pub async fn agent_backup(
        &self,
        vm: &str,
        request: &crate::BackupRequest,
    ) -> Result<crate::BackupInfo, ClientError> {
        self.post_json(&format!("{AGENT_VMS}/{}/backups", encode(vm)), request)
            .await
    }

    /// Agent: the backups this host keeps.
    pub async fn agent_backups(&self) -> Result<Vec<crate::BackupInfo>, ClientError> {
        self.get_json("/v1/backups").await
    }

    pub async fn agent_backup_delete(&self, id: &str) -> Result<(), ClientError> {
        self.delete_path(&format!("/v1/backups/{}", encode(id)))
            .await
    }

    pub async fn agent_backup_restore(
        &self,
        id: &str,
        request: &crate::AgentRestoreRequest,
    ) -> Result<VmInfo, ClientError> {
        self.post_json(&format!("/v1/backups/{}/restore", encode(id)), request)
            .await
    }

    /// Agent: marks a stopped VM as leaving for another host (or clears it).
    pub async fn agent_set_departing(
        &self,
        vm: &str,
        migration_id: Option<uuid::Uuid>,
    ) -> Result<VmInfo, ClientError> {
        self.post_json(
            &format!("{AGENT_VMS}/{}/departing", encode(vm)),
            &serde_json::json!({ "migration_id": migration_id }),
        )
        .await
    }

    /// Agent: SHA-256 of a stopped VM's disk file.
    pub async fn agent_disk_digest(
        &self,
        vm: &str,
        disk: &str,
    ) -> Result<crate::FileDigest, ClientError> {
        self.get_json(&format!(
            "{AGENT_VMS}/{}/disks/{}/digest",
            encode(vm),
            encode(disk)
        ))
        .await
    }

    /// The bytes of a stopped VM's disk file, as a stream (the response's
    /// `content-length` is the file's length): from the agent, or through
    /// the controller with [`Client::with_cluster_paths`].
    pub async fn disk_content(
        &self,
        vm: &str,
        disk: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(&format!(
            "{}/disks/{}/content",
            self.vm_path(vm),
            encode(disk)
        ));
        self.checked(self.http.get(&url), &url).await
    }

    /// Agent: sends a file into a datastore of this host as a partial file
    /// (renamed into place by a create with `arriving_disks`); answers the
    /// digest of what arrived.
    pub async fn agent_send_arriving(
        &self,
        datastore: &str,
        file: &str,
        size: u64,
        body: reqwest::Body,
    ) -> Result<crate::FileDigest, ClientError> {
        let path = format!(
            "/v1/datastores/{}/arriving/{}",
            encode(datastore),
            encode(file)
        );
        self.put_file(&path, size, body).await
    }

    /// PUTs `size` bytes of `body` to `path` (an `arriving` route) and
    /// answers the digest of what arrived.
    async fn put_file(
        &self,
        path: &str,
        size: u64,
        body: reqwest::Body,
    ) -> Result<crate::FileDigest, ClientError> {
        let url = self.url(&format!("{path}?size={size}"));
        self.send(
            self.http
                .put(&url)
                .header(reqwest::header::CONTENT_LENGTH, size)
                .body(body),
            url,
        )
        .await
    }

    /// Agent: discards a partial file that will not be used.
    pub async fn agent_discard_arriving(
        &self,
        datastore: &str,
        file: &str,
    ) -> Result<(), ClientError> {
        self.delete_path(&format!(
            "/v1/datastores/{}/arriving/{}",
            encode(datastore),
            encode(file)
        ))
        .await
    }

    /// Controller: sends a file into a datastore of `host` as a partial
    /// file (renamed into place by a create with `arriving_disks`); answers
    /// the digest of what arrived. `ferry import` sends converted disks so.
    pub async fn cluster_send_arriving(
        &self,
        host: &str,
        datastore: &str,
        file: &str,
        size: u64,
        body: reqwest::Body,
    ) -> Result<crate::FileDigest, ClientError> {
        let path = format!(
            "/v1/cluster/hosts/{}/datastores/{}/arriving/{}",
            encode(host),
            encode(datastore),
            encode(file)
        );
        self.put_file(&path, size, body).await
    }

    /// Controller: discards a partial file sent with
    /// [`Client::cluster_send_arriving`] that will not be used.
    pub async fn cluster_discard_arriving(
        &self,
        host: &str,
        datastore: &str,
        file: &str,
    ) -> Result<(), ClientError> {
        self.delete_path(&format!(
            "/v1/cluster/hosts/{}/datastores/{}/arriving/{}",
            encode(host),
            encode(datastore),
            encode(file)
        ))
        .await
    }

    /// Controller: takes a backup of a VM.
    pub async fn backup_create(
        &self,
        request: &crate::BackupRequest,
    ) -> Result<crate::BackupInfo, ClientError> {
        self.post_json(CLUSTER_BACKUPS, request).await
    }

    /// Controller: every backup of the cluster (of one VM when given).
    pub async fn backup_list(
        &self,
        vm: Option<&str>,
    ) -> Result<Vec<crate::BackupInfo>, ClientError> {
        match vm {
            Some(vm) => {
                self.get_json(&format!("{CLUSTER_BACKUPS}?vm={}", encode(vm)))
                    .await
            }
            None => self.get_json(CLUSTER_BACKUPS).await,
        }
    }

    pub async fn backup_show(&self, id: &str) -> Result<crate::BackupInfo, ClientError> {
        self.get_json(&format!("{CLUSTER_BACKUPS}/{}", encode(id)))
            .await
    }

    pub async fn backup_delete(&self, id: &str) -> Result<(), ClientError> {
        self.delete_path(&format!("{CLUSTER_BACKUPS}/{}", encode(id)))
            .await
    }

    pub async fn backup_restore(
        &self,
        id: &str,
        request: &crate::RestoreRequest,
    ) -> Result<VmInfo, ClientError> {
        self.post_json(
            &format!("{CLUSTER_BACKUPS}/{}/restore", encode(id)),
            request,
        )
        .await
    }
}

/// VM names are validated to `[A-Za-z0-9._-]`, but the client must not trust
/// its caller: anything else is percent-encoded so that a name can never add a
/// path segment.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Client::new("https://127.0.0.1:1/", Arc::new(tls)).unwrap()
    }

    #[test]
    fn vm_paths_follow_the_prefix_of_agent_or_controller() {
        let agent = client();
        assert_eq!(agent.vm_path("a b"), "/v1/vms/a%20b");
        let cluster = agent.with_cluster_paths();
        assert_eq!(cluster.vm_path("demo"), "/v1/cluster/vms/demo");
        assert_eq!(cluster.base_url(), "https://127.0.0.1:1");
    }

    #[test]
    fn a_place_request_is_the_create_body_plus_an_optional_host() {
        let spec = ferry_core::spec::VmSpec::from_toml_str(
            "name = \"a\"\nmemory = \"64MiB\"\n[boot]\nkernel = \"/k\"\n",
            std::path::Path::new("/"),
        )
        .unwrap();
        let create = CreateVmRequest {
            spec,
            start: true,
            networks: Vec::new(),
            arriving_disks: Default::default(),
        };
        let unplaced = PlaceVmRequest {
            vm: create.clone(),
            host: None,
        };
        assert_eq!(
            serde_json::to_value(&unplaced).unwrap(),
            serde_json::to_value(&create).unwrap(),
            "without a host the body is exactly the agent's"
        );
        let mut body = serde_json::to_value(&create).unwrap();
        body["host"] = "host2".into();
        let placed: PlaceVmRequest = serde_json::from_value(body).unwrap();
        assert_eq!(placed.host.as_deref(), Some("host2"));
        assert_eq!(placed.vm.spec.name, "a");
        assert!(placed.vm.start);
    }

    #[test]
    fn unreachable_header_splits_at_the_first_separator() {
        assert_eq!(
            parse_unreachable("host2: request to https://x:1/v1/vms failed: refused"),
            (
                "host2".to_string(),
                "request to https://x:1/v1/vms failed: refused".to_string()
            )
        );
    }

    #[test]
    fn encode_keeps_names_and_escapes_separators() {
        assert_eq!(encode("demo-1.a_b"), "demo-1.a_b");
        assert_eq!(encode("../x"), "..%2Fx");
        assert_eq!(encode("a b"), "a%20b");
    }
}

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

/// A client for one ferryd.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
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
            http,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
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
        let url = self.url("/v1/vms");
        self.send(self.http.get(&url), url).await
    }

    pub async fn create_vm(&self, request: &CreateVmRequest) -> Result<VmInfo, ClientError> {
        let url = self.url("/v1/vms");
        self.send(self.http.post(&url).json(request), url).await
    }

    pub async fn get_vm(&self, name: &str) -> Result<VmInfo, ClientError> {
        let url = self.url(&format!("/v1/vms/{}", encode(name)));
        self.send(self.http.get(&url), url).await
    }

    async fn vm_action<B: serde::Serialize>(
        &self,
        name: &str,
        action: &str,
        body: &B,
    ) -> Result<VmInfo, ClientError> {
        let url = self.url(&format!("/v1/vms/{}/{action}", encode(name)));
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
        let url = self.url(&format!("/v1/vms/{}", encode(name)));
        self.checked(self.http.delete(&url).query(query), &url)
            .await
            .map(|_| ())
    }

    /// The tail of the VM's console log.
    pub async fn console(&self, name: &str, lines: usize) -> Result<String, ClientError> {
        let url = self.url(&format!("/v1/vms/{}/console", encode(name)));
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
        let url = self.url(&format!("/v1/vms/{}/console", encode(name)));
        let query = ConsoleQuery {
            lines: Some(lines),
            follow: true,
        };
        self.checked(self.http.get(&url).query(&query), &url).await
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

    /// The names of the hosts that joined the controller.
    pub async fn cluster_hosts(&self) -> Result<Vec<String>, ClientError> {
        let hosts: Vec<serde_json::Value> = self.get_json("/v1/cluster/hosts").await?;
        Ok(hosts
            .iter()
            .filter_map(|h| h["name"].as_str().map(str::to_string))
            .collect())
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

    /// After commit: end the source QEMU and forget the VM here (removing
    /// its datastore disks when they were copied).
    pub async fn outgoing_retire(&self, vm: &str, remove_disks: bool) -> Result<(), ClientError> {
        let url = self.url(&format!("/v1/vms/{}/outgoing/retire", encode(vm)));
        self.checked(
            self.http
                .post(&url)
                .json(&serde_json::json!({ "remove_disks": remove_disks })),
            &url,
        )
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

    #[test]
    fn encode_keeps_names_and_escapes_separators() {
        assert_eq!(encode("demo-1.a_b"), "demo-1.a_b");
        assert_eq!(encode("../x"), "..%2Fx");
        assert_eq!(encode("a b"), "a%20b");
    }
}

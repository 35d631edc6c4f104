//! ferryd's HTTP API: the wire types and a typed client.
//!
//! Routes (all under mutual TLS, JSON bodies):
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | `/v1/host` | → `HostInfo` |
//! | GET | `/v1/vms` | → `[VmInfo]` |
//! | POST | `/v1/vms` | `CreateVmRequest` → `VmInfo` |
//! | GET | `/v1/vms/{name}` | → `VmInfo` |
//! | POST | `/v1/vms/{name}/start` | → `VmInfo` |
//! | POST | `/v1/vms/{name}/stop` | `StopVmRequest` → `VmInfo` |
//! | POST | `/v1/vms/{name}/pause` | → `VmInfo` |
//! | POST | `/v1/vms/{name}/resume` | → `VmInfo` |
//! | DELETE | `/v1/vms/{name}?keep_disks=` | → 204 |
//! | GET | `/v1/vms/{name}/console?lines=&follow=` | → text |
//!
//! Storage on an agent: `GET|POST /v1/vms/{name}/storage/move` and its
//! `cancel`, `POST /v1/vms/{name}/backups`, `GET /v1/backups[/{id}]`,
//! `DELETE /v1/backups/{id}`, `POST /v1/backups/{id}/restore`, and for
//! offline migration `POST /v1/vms/{name}/departing`,
//! `GET /v1/vms/{name}/disks/{disk}/content|digest`,
//! `PUT|DELETE /v1/datastores/{ds}/arriving/{file}`.
//!
//! Migration steps the controller asks of agents: `POST /v1/incoming`,
//! `GET|DELETE /v1/incoming/{id}`, `POST /v1/incoming/{id}/finish`,
//! `GET|POST /v1/vms/{name}/outgoing` and its `switchover`, `adjust`,
//! `cancel`, `retire`; `POST /v1/vms/{name}/dirty-rate`.
//!
//! The controller (host1 of a local cluster) adds `POST /v1/cluster/join`,
//! `GET /v1/cluster/hosts[/{name}]`, `/v1/cluster/vms…` (the VM routes
//! above, placed and forwarded to the owning agent), and
//! `GET|POST /v1/migrations`, `GET /v1/migrations/{id}`,
//! `POST /v1/migrations/{id}/cancel`, `POST /v1/storage-moves`, and
//! `GET|POST /v1/cluster/backups`, `GET|DELETE /v1/cluster/backups/{id}`,
//! `POST /v1/cluster/backups/{id}/restore`, and for `ferry import|export`
//! `PUT|DELETE /v1/cluster/hosts/{host}/datastores/{ds}/arriving/{file}`
//! and `GET /v1/cluster/vms/{name}/disks/{disk}/content` (streamed).
//!
//! Errors answer with an HTTP status and an `ErrorBody`.

pub mod client;
pub mod migration;
pub mod storage;
pub mod types;

pub use client::{Client, ClientError};
pub use migration::*;
pub use storage::*;
pub use types::*;

/// The whole chain of an error, outermost first, joined with ": " — how
/// every Ferry error is shown to a person.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

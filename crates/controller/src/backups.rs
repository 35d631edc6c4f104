//! Backups of the whole cluster (`/v1/cluster/backups…`): each host keeps
//! its own (see `ferry-agent`'s `backup.rs`); the controller asks the VM's
//! host to take one, gathers the lists, and finds which host holds an id.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_api::{AgentRestoreRequest, BackupInfo, BackupRequest, RestoreRequest, VmInfo};
use serde::Deserialize;
use tracing::{info, warn};

use crate::controller::{Controller, ControllerError};
use crate::routes::ApiError;
use crate::storage::agent_error;
use crate::vms::ask_all;

type Result<T> = std::result::Result<T, ApiError>;

pub(crate) fn router() -> Router<Arc<Controller>> {
    Router::new()
        .route("/v1/cluster/backups", get(list).post(create))
        .route("/v1/cluster/backups/{id}", get(show).delete(delete))
        .route("/v1/cluster/backups/{id}/restore", post(restore))
}

async fn create(
    State(controller): State<Arc<Controller>>,
    Json(request): Json<BackupRequest>,
) -> Result<(StatusCode, Json<BackupInfo>)> {
    let (host, _) = controller.locate_vm(&request.vm).await?;
    let agent = controller.agent(&host).await?;
    let backup = agent
        .agent_backup(&request.vm, &request)
        .await
        .map_err(|e| agent_error(&host, e))?;
    info!(vm = %request.vm, %host, backup = %backup.id, "backup taken");
    Ok((StatusCode::CREATED, Json(backup)))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    vm: Option<String>,
}

/// Every reachable host's backups (of one VM when asked), oldest first.
async fn all_backups(
    controller: &Controller,
) -> std::result::Result<Vec<BackupInfo>, ControllerError> {
    let hosts = controller.hosts().await?;
    let answers = ask_all(controller, &hosts, |agent| async move {
        agent.agent_backups().await
    })
    .await?;
    let mut backups = Vec::new();
    for (host, answer) in answers {
        match answer {
            Ok(found) => backups.extend(found),
            Err(error) => {
                warn!(%host, error = %ferry_api::error_chain(&error), "host left out of the backup list")
            }
        }
    }
    backups.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
    Ok(backups)
}

async fn list(
    State(controller): State<Arc<Controller>>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<BackupInfo>>> {
    let mut backups = all_backups(&controller).await?;
    if let Some(vm) = &query.vm {
        backups.retain(|b| &b.vm == vm);
    }
    Ok(Json(backups))
}

async fn find(
    controller: &Controller,
    id: &str,
) -> std::result::Result<BackupInfo, ControllerError> {
    all_backups(controller)
        .await?
        .into_iter()
        .find(|b| b.id == id)
        .ok_or_else(|| ControllerError::BackupNotFound { id: id.to_string() })
}

async fn show(
    State(controller): State<Arc<Controller>>,
    Path(id): Path<String>,
) -> Result<Json<BackupInfo>> {
    Ok(Json(find(&controller, &id).await?))
}

async fn delete(
    State(controller): State<Arc<Controller>>,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let backup = find(&controller, &id).await?;
    let agent = controller.agent(&backup.host).await?;
    agent
        .agent_backup_delete(&id)
        .await
        .map_err(|e| agent_error(&backup.host, e))?;
    info!(backup = %id, host = %backup.host, "backup deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Restores a backup on its host. A VM of the restored name anywhere in
/// the cluster is replaced only with `force`.
async fn restore(
    State(controller): State<Arc<Controller>>,
    Path(id): Path<String>,
    Json(request): Json<RestoreRequest>,
) -> Result<(StatusCode, Json<VmInfo>)> {
    let backup = find(&controller, &id).await?;
    if let Some(host) = request.host.as_deref().filter(|h| *h != backup.host) {
        controller.agent(host).await?;
        return Err(ControllerError::InvalidRequest {
            reason: format!(
                "backup {id} is on host {}; restoring it on {host} means copying it there first, \
                 which this version does not do: restore it on {} and move the VM with \
                 `ferry migrate VM --to {host} --offline`",
                backup.host, backup.host
            ),
        }
        .into());
    }
    let name = request.as_name.clone().unwrap_or_else(|| backup.vm.clone());
    match controller.locate_vm(&name).await {
        Ok((host, _)) if !request.force => {
            return Err(ControllerError::Conflict {
                reason: format!(
                    "a VM named {name:?} exists on host {host}; restoring backup {id} would \
                     replace it: add --force to replace it, or --as NAME to restore next to it"
                ),
            }
            .into());
        }
        Ok((host, _)) if host != backup.host => {
            // Replace it where it is: the restored VM will live on the
            // backup's host.
            let agent = controller.agent(&host).await?;
            let _ = agent
                .stop_vm(
                    &name,
                    &ferry_api::StopVmRequest {
                        force: true,
                        timeout_secs: None,
                    },
                )
                .await;
            agent
                .delete_vm(&name, &ferry_api::DeleteVmQuery::default())
                .await
                .map_err(|e| agent_error(&host, e))?;
        }
        _ => {}
    }
    let agent = controller.agent(&backup.host).await?;
    let restored = agent
        .agent_backup_restore(
            &id,
            &AgentRestoreRequest {
                as_name: request.as_name.clone(),
                force: request.force,
            },
        )
        .await
        .map_err(|e| agent_error(&backup.host, e))?;
    info!(backup = %id, vm = %restored.name, host = %backup.host, "backup restored");
    Ok((StatusCode::CREATED, Json(restored)))
}

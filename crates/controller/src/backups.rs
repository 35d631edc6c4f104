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
    // Elsewhere than the backup's host: restored there first, then moved by
    // an offline migration (its files checked by SHA-256 on both hosts).
    let elsewhere = request.host.clone().filter(|h| *h != backup.host);
    if let Some(host) = &elsewhere {
        controller.agent(host).await?;
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
    let Some(host) = elsewhere else {
        return Ok((StatusCode::CREATED, Json(restored)));
    };
    let moved = move_restored(&controller, &restored.name, &host).await?;
    Ok((StatusCode::CREATED, Json(moved)))
}

/// Moves a VM just restored on the backup's host to `host` (offline
/// migration, no second backup) and waits for the end. If the move fails the
/// VM stays, restored, on the backup's host, and the error says so.
async fn move_restored(
    controller: &Arc<Controller>,
    vm: &str,
    host: &str,
) -> std::result::Result<VmInfo, ControllerError> {
    let request = ferry_api::MigrateRequest {
        vm: vm.to_string(),
        to: host.to_string(),
        storage: ferry_api::StorageMode::Copy,
        max_downtime_ms: None,
        bandwidth_bytes_per_sec: None,
        postcopy: ferry_api::PostcopyPolicy::Never,
        deadline_secs: None,
        dry_run: false,
        offline: true,
        backup: Some(false),
    };
    let kept = |why: String| ControllerError::Conflict {
        reason: format!(
            "the backup was restored as VM {vm:?} on its own host, but moving it to {host} \
             failed ({why}); it is still there: `ferry migrate {vm} --to {host} --offline`"
        ),
    };
    let answer = controller
        .migrate_offline(request)
        .await
        .map_err(|e| kept(ferry_api::error_chain(&e)))?;
    let ferry_api::MigrateAnswer::Started(report) = answer else {
        return Err(kept("the migration did not start".into()));
    };
    loop {
        let now = controller.migration(&report.id.to_string()).await?;
        if !now.status.is_active() {
            if now.status != ferry_api::MigrationStatus::Completed {
                return Err(kept(now.error.unwrap_or_else(|| now.status.to_string())));
            }
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let agent = controller.agent(host).await?;
    agent.get_vm(vm).await.map_err(|e| agent_error(host, e))
}

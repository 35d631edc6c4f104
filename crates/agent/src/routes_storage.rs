//! The agent's storage routes: storage moves, backups, and files copied
//! between hosts (offline migration). Handlers only translate between HTTP
//! and `Agent` calls, like `routes.rs`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::agent::Agent;
use crate::routes::ApiError;

type Result<T> = std::result::Result<T, ApiError>;

pub fn router() -> Router<Arc<Agent>> {
    Router::new()
        .route(
            "/v1/vms/{name}/storage/move",
            get(move_status).post(move_start),
        )
        .route("/v1/vms/{name}/storage/move/cancel", post(move_cancel))
        .route("/v1/vms/{name}/backups", post(backup_create))
        .route("/v1/vms/{name}/departing", post(departing))
        .route("/v1/vms/{name}/disks/{disk}/content", get(disk_content))
        .route("/v1/vms/{name}/disks/{disk}/digest", get(disk_digest))
        .route("/v1/backups", get(backup_list))
        .route("/v1/backups/{id}", get(backup_show).delete(backup_delete))
        .route("/v1/backups/{id}/restore", post(backup_restore))
        .route(
            "/v1/datastores/{datastore}/arriving/{file}",
            put(arriving_receive).delete(arriving_discard),
        )
}

async fn move_start(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(request): Json<ferry_api::DiskMoveRequest>,
) -> Result<Json<ferry_api::DiskMoveStatus>> {
    Ok(Json(agent.storage_move(&name, request).await?))
}

async fn move_status(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<ferry_api::DiskMoveStatus>> {
    Ok(Json(agent.storage_move_status(&name).await?))
}

async fn move_cancel(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<ferry_api::DiskMoveStatus>> {
    Ok(Json(agent.storage_move_cancel(&name).await?))
}

async fn backup_create(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Option<Json<ferry_api::BackupRequest>>,
) -> Result<(StatusCode, Json<ferry_api::BackupInfo>)> {
    let request = body.map(|Json(b)| b).unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(agent.backup_create(&name, request).await?),
    ))
}

#[derive(Debug, Deserialize)]
struct DepartingBody {
    migration_id: Option<uuid::Uuid>,
}

async fn departing(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(body): Json<DepartingBody>,
) -> Result<Json<ferry_api::VmInfo>> {
    Ok(Json(agent.set_departing(&name, body.migration_id).await?))
}

async fn disk_content(
    State(agent): State<Arc<Agent>>,
    Path((name, disk)): Path<(String, String)>,
) -> Result<Response> {
    let path = agent.disk_file(&name, &disk).await?;
    let (length, stream) = crate::transfer::file_stream(&path)
        .await
        .map_err(|error| disk_error(&disk, &error))?;
    Ok(Response::builder()
        .header("content-type", "application/octet-stream")
        .header("content-length", length)
        .body(Body::from_stream(stream))
        .expect("static headers are valid"))
}

async fn disk_digest(
    State(agent): State<Arc<Agent>>,
    Path((name, disk)): Path<(String, String)>,
) -> Result<Json<ferry_api::FileDigest>> {
    let path = agent.disk_file(&name, &disk).await?;
    let digest = crate::transfer::digest_file(&path)
        .await
        .map_err(|error| disk_error(&disk, &error))?;
    Ok(Json(digest))
}

fn disk_error(disk: &str, error: &dyn std::error::Error) -> ApiError {
    crate::error::AgentError::Disk {
        disk: disk.to_string(),
        problem: crate::error::chain(error),
    }
    .into()
}

async fn backup_list(State(agent): State<Arc<Agent>>) -> Json<Vec<ferry_api::BackupInfo>> {
    Json(agent.backups())
}

async fn backup_show(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<ferry_api::BackupInfo>> {
    Ok(Json(agent.backup(&id)?))
}

async fn backup_delete(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    agent.backup_delete(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn backup_restore(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    body: Option<Json<ferry_api::AgentRestoreRequest>>,
) -> Result<(StatusCode, Json<ferry_api::VmInfo>)> {
    let request = body.map(|Json(b)| b).unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(agent.backup_restore(&id, request).await?),
    ))
}

#[derive(Debug, Deserialize)]
struct ArrivingQuery {
    /// The length announced by the sender; the file must have exactly it.
    size: Option<u64>,
}

/// Receives a file into its partial; the body is streamed (never held in
/// memory), so the router's body limit does not apply to it.
async fn arriving_receive(
    State(agent): State<Arc<Agent>>,
    Path((datastore, file)): Path<(String, String)>,
    Query(query): Query<ArrivingQuery>,
    body: Body,
) -> Result<impl IntoResponse> {
    let stream = body.into_data_stream();
    let digest = agent
        .receive_arriving(&datastore, &file, stream, query.size)
        .await?;
    Ok((StatusCode::CREATED, Json(digest)))
}

async fn arriving_discard(
    State(agent): State<Arc<Agent>>,
    Path((datastore, file)): Path<(String, String)>,
) -> Result<StatusCode> {
    agent.discard_arriving(&datastore, &file)?;
    Ok(StatusCode::NO_CONTENT)
}

//! The agent's HTTP routes (see `ferry_api` for the table). Handlers only
//! translate between HTTP and `Agent` calls; errors become responses in one
//! place (`ApiError::into_response`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_api::{
    ConsoleQuery, CreateVmRequest, DeleteVmQuery, ErrorBody, ErrorDetail, StopVmRequest,
};

use crate::agent::Agent;
use crate::error::{chain, AgentError};

/// Largest request body the agent reads: a VM spec is a few KiB.
const MAX_BODY_BYTES: usize = 1 << 20;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(show).delete(delete))
        .route("/v1/vms/{name}/start", post(start))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/pause", post(pause))
        .route("/v1/vms/{name}/resume", post(resume))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/dirty-rate", post(dirty_rate))
        .route(
            "/v1/vms/{name}/outgoing",
            get(outgoing_status).post(outgoing_start),
        )
        .route(
            "/v1/vms/{name}/outgoing/switchover",
            post(outgoing_switchover),
        )
        .route("/v1/vms/{name}/outgoing/adjust", post(outgoing_adjust))
        .route("/v1/vms/{name}/outgoing/resume", post(outgoing_resume))
        .route("/v1/vms/{name}/outgoing/pause", post(outgoing_pause))
        .route("/v1/vms/{name}/outgoing/cancel", post(outgoing_cancel))
        .route("/v1/vms/{name}/outgoing/retire", post(outgoing_retire))
        .route("/v1/incoming", post(incoming_prepare))
        .route(
            "/v1/incoming/{id}",
            get(incoming_status).delete(incoming_abort),
        )
        .route("/v1/incoming/{id}/finish", post(incoming_finish))
        .route("/v1/incoming/{id}/recover", post(incoming_recover))
        .merge(crate::routes_storage::router())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(agent)
}

/// An error on its way out: status, stable code and the whole chain.
pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
}

impl From<AgentError> for ApiError {
    fn from(error: AgentError) -> Self {
        ApiError {
            status: StatusCode::from_u16(error.status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: error.code().to_string(),
            message: chain(&error),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = %self.code, message = %self.message, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

type Result<T> = std::result::Result<T, ApiError>;

async fn host(State(agent): State<Arc<Agent>>) -> Json<ferry_api::HostInfo> {
    Json(agent.host_info().await)
}

async fn list(State(agent): State<Arc<Agent>>) -> Json<Vec<ferry_api::VmInfo>> {
    Json(agent.list().await)
}

async fn create(
    State(agent): State<Arc<Agent>>,
    body: std::result::Result<Json<CreateVmRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ferry_api::VmInfo>> {
    let Json(request) = body.map_err(|rejection| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_request".to_string(),
        message: format!("invalid request body: {}", rejection.body_text()),
    })?;
    Ok(Json(agent.create(request).await?))
}

async fn show(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<ferry_api::VmInfo>> {
    Ok(Json(agent.get(&name).await?))
}

async fn start(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<ferry_api::VmInfo>> {
    Ok(Json(agent.start(&name).await?))
}

async fn stop(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Option<Json<StopVmRequest>>,
) -> Result<Json<ferry_api::VmInfo>> {
    let request = body.map(|Json(b)| b).unwrap_or_default();
    let timeout = request.timeout_secs.map(Duration::from_secs);
    Ok(Json(agent.stop(&name, request.force, timeout).await?))
}

async fn pause(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<ferry_api::VmInfo>> {
    Ok(Json(agent.pause(&name).await?))
}

async fn resume(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<ferry_api::VmInfo>> {
    Ok(Json(agent.resume(&name).await?))
}

async fn delete(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Query(query): Query<DeleteVmQuery>,
) -> Result<StatusCode> {
    agent
        .delete_with(&name, query.keep_disks, query.all_disks)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn console(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Query(query): Query<ConsoleQuery>,
) -> Result<Response> {
    let path = agent.console_path(&name).await?;
    let lines = query.lines.unwrap_or(50);
    let console_error = |source| AgentError::Console {
        name: name.clone(),
        source,
    };
    let (tail, offset) = crate::console::tail(&path, lines).map_err(console_error)?;
    if !query.follow {
        return Ok(([("content-type", "text/plain; charset=utf-8")], tail).into_response());
    }
    let stream = crate::console::follow(agent.clone(), name.clone(), path, tail, offset);
    Ok(Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .expect("static headers are valid"))
}

async fn dirty_rate(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(request): Json<ferry_api::DirtyRateRequest>,
) -> Result<Json<ferry_api::DirtyRate>> {
    Ok(Json(agent.dirty_rate(&name, request.seconds).await?))
}

async fn outgoing_start(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(request): Json<ferry_api::OutgoingRequest>,
) -> Result<Json<ferry_api::OutgoingStatus>> {
    Ok(Json(agent.outgoing_start(&name, request).await?))
}

async fn outgoing_status(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<ferry_api::OutgoingStatus>> {
    Ok(Json(agent.outgoing_status(&name).await?))
}

async fn outgoing_switchover(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<ferry_api::OutgoingStatus>> {
    Ok(Json(agent.outgoing_switchover(&name).await?))
}

async fn outgoing_adjust(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(adjust): Json<ferry_api::OutgoingAdjust>,
) -> Result<Json<ferry_api::OutgoingStatus>> {
    Ok(Json(agent.outgoing_adjust(&name, adjust).await?))
}

async fn outgoing_cancel(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<ferry_api::VmInfo>> {
    Ok(Json(agent.outgoing_cancel(&name).await?))
}

async fn outgoing_retire(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(request): Json<ferry_api::RetireRequest>,
) -> Result<StatusCode> {
    agent.outgoing_retire(&name, request.remove_disks).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn incoming_prepare(
    State(agent): State<Arc<Agent>>,
    Json(request): Json<ferry_api::IncomingRequest>,
) -> Result<Json<ferry_api::IncomingReady>> {
    Ok(Json(agent.incoming_prepare(request).await?))
}

async fn incoming_status(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<uuid::Uuid>,
) -> Result<Json<ferry_api::IncomingStatus>> {
    Ok(Json(agent.incoming_status(id).await?))
}

async fn incoming_finish(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<uuid::Uuid>,
) -> Result<Json<ferry_api::IncomingStatus>> {
    Ok(Json(agent.incoming_finish(id).await?))
}

async fn incoming_recover(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<uuid::Uuid>,
) -> Result<Json<ferry_api::IncomingReady>> {
    Ok(Json(agent.incoming_recover(id).await?))
}

async fn outgoing_resume(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(request): Json<ferry_api::OutgoingResume>,
) -> Result<Json<ferry_api::OutgoingStatus>> {
    Ok(Json(
        agent.outgoing_resume(&name, request.migration_uri).await?,
    ))
}

async fn outgoing_pause(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<ferry_api::OutgoingStatus>> {
    Ok(Json(agent.outgoing_pause(&name).await?))
}

async fn incoming_abort(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<uuid::Uuid>,
) -> Result<StatusCode> {
    agent.incoming_abort(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

//! The controller's HTTP routes, merged into ferryd's router when the role
//! is on. Errors become responses here, in one place.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ferry_api::{ErrorBody, ErrorDetail, JoinRequest, MigrateAnswer, MigrateRequest};

use crate::controller::{Controller, ControllerError};

pub fn router(controller: Arc<Controller>) -> Router {
    Router::new()
        .route("/v1/cluster/join", post(join))
        .route("/v1/migrations", get(list).post(migrate))
        .route("/v1/migrations/{id}", get(show))
        .route("/v1/migrations/{id}/cancel", post(cancel))
        .route("/v1/migrations/{id}/observations", post(observe))
        .route("/v1/storage-moves", post(storage_move))
        .merge(crate::vms::router())
        .merge(crate::backups::router())
        .merge(crate::networks::router())
        .merge(crate::transfers::router())
        .with_state(controller)
}

/// A `ControllerError` on its way out; `vms.rs` answers through it too.
pub(crate) struct ApiError(ControllerError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = ferry_api::error_chain(&self.0);
        if status.is_server_error() {
            tracing::error!(%message, "controller request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.0.code().to_string(),
                message,
            },
        };
        (status, Json(body)).into_response()
    }
}

impl From<ControllerError> for ApiError {
    fn from(error: ControllerError) -> Self {
        ApiError(error)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        ApiError(error.into())
    }
}

type Result<T> = std::result::Result<T, ApiError>;

async fn join(
    State(controller): State<Arc<Controller>>,
    Extension(caller): Extension<Arc<ferry_pki::PeerIdentity>>,
    Json(request): Json<JoinRequest>,
) -> Result<StatusCode> {
    controller.join(&caller, request).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn storage_move(
    State(controller): State<Arc<Controller>>,
    Json(request): Json<ferry_api::StorageMoveRequest>,
) -> Result<(StatusCode, Json<ferry_api::MigrationReport>)> {
    let report = controller.storage_move(request).await?;
    Ok((StatusCode::CREATED, Json(report)))
}

async fn migrate(
    State(controller): State<Arc<Controller>>,
    Json(request): Json<MigrateRequest>,
) -> Result<(StatusCode, Json<MigrateAnswer>)> {
    let answer = controller.migrate(request).await?;
    let status = match answer {
        MigrateAnswer::DryRun(_) => StatusCode::OK,
        MigrateAnswer::Started(_) => StatusCode::CREATED,
    };
    Ok((status, Json(answer)))
}

async fn list(
    State(controller): State<Arc<Controller>>,
) -> Result<Json<Vec<ferry_api::MigrationReport>>> {
    Ok(Json(controller.migrations().await?))
}

async fn show(
    State(controller): State<Arc<Controller>>,
    Path(id): Path<String>,
) -> Result<Json<ferry_api::MigrationReport>> {
    Ok(Json(controller.migration(&id).await?))
}

async fn observe(
    State(controller): State<Arc<Controller>>,
    Path(id): Path<String>,
    Json(observation): Json<ferry_api::MigrationObservation>,
) -> Result<Json<ferry_api::MigrationReport>> {
    Ok(Json(controller.observe(&id, observation).await?))
}

async fn cancel(
    State(controller): State<Arc<Controller>>,
    Path(id): Path<String>,
) -> Result<Json<ferry_api::MigrationReport>> {
    Ok(Json(controller.cancel(&id).await?))
}

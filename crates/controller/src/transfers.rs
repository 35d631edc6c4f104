//! Disk bytes through the controller, for `ferry import` and `ferry export`:
//! a client sends a converted disk into a host's datastore (as a partial
//! file the agent renames at the VM's create) and fetches a stopped VM's
//! disk. The controller only streams; the agent checks and hashes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use ferry_api::FileDigest;
use futures::TryStreamExt;
use serde::Deserialize;

use crate::controller::Controller;
use crate::routes::ApiError;
use crate::storage::agent_error;

type Result<T> = std::result::Result<T, ApiError>;

pub(crate) fn router() -> Router<Arc<Controller>> {
    Router::new()
        .route(
            "/v1/cluster/vms/{name}/disks/{disk}/content",
            get(disk_content),
        )
        .route(
            "/v1/cluster/hosts/{host}/datastores/{datastore}/arriving/{file}",
            put(send_arriving).delete(discard_arriving),
        )
        // Disk images are as large as disks.
        .layer(DefaultBodyLimit::disable())
}

/// The bytes of a stopped VM's disk, from the host that has it.
async fn disk_content(
    State(controller): State<Arc<Controller>>,
    Path((name, disk)): Path<(String, String)>,
) -> Result<Response> {
    let (host, agent) = crate::vms::locate(&controller, &name).await?;
    let response = agent
        .disk_content(&name, &disk)
        .await
        .map_err(|error| agent_error(&host, error))?;
    let mut answer = Response::builder().status(response.status());
    if let Some(length) = response.headers().get(header::CONTENT_LENGTH) {
        answer = answer.header(header::CONTENT_LENGTH, length.clone());
    }
    Ok(answer
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(response.bytes_stream()))
        .expect("a status and a copied header are valid"))
}

#[derive(Deserialize)]
struct SizeQuery {
    size: u64,
}

/// A file into a host's datastore as a partial file; answers the digest of
/// what the agent wrote.
async fn send_arriving(
    State(controller): State<Arc<Controller>>,
    Path((host, datastore, file)): Path<(String, String, String)>,
    Query(query): Query<SizeQuery>,
    body: Body,
) -> Result<Json<FileDigest>> {
    let agent = controller.agent(&host).await?;
    tracing::info!(%host, %datastore, %file, size = query.size, "file sent into a datastore");
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let digest = agent
        .agent_send_arriving(
            &datastore,
            &file,
            query.size,
            reqwest::Body::wrap_stream(stream),
        )
        .await
        .map_err(|error| agent_error(&host, error))?;
    Ok(Json(digest))
}

async fn discard_arriving(
    State(controller): State<Arc<Controller>>,
    Path((host, datastore, file)): Path<(String, String, String)>,
) -> Result<Response> {
    let agent = controller.agent(&host).await?;
    agent
        .agent_discard_arriving(&datastore, &file)
        .await
        .map_err(|error| agent_error(&host, error))?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

//! The management API of moves (see [`moving`](super::moving)):
//!
//! | method | path                            | body                       |
//! |--------|---------------------------------|----------------------------|
//! | POST   | /v1/volumes/{name}/move         | `{to, timeout_secs?}`      |
//! | POST   | /v1/volumes/{name}/takeover     | `{from, expected_tag}` (node to node) |
//!
//! `move` answers with the volume as its new owner serves it (`nbd_uri` is where clients
//! reconnect). Errors: 404 unknown node or volume, 409 target dead / already the owner / the
//! release did not finish in time (the volume stays), 502 the target failed (the volume is
//! taken back), 400 when the node runs without a cluster registry.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::moving;
use crate::api::{ApiError, ApiState};
use crate::api_types::VolumeView;
pub use crate::api_types::{MoveRequest, TakeoverRequest};

/// How long a move waits for the owner's uploads unless told otherwise.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(120);

fn error(e: moving::MoveError) -> ApiError {
    ApiError::new(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        e.message,
    )
}

fn failover(state: &ApiState) -> Result<std::sync::Arc<super::failover::Failover>, ApiError> {
    state.failover.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "volume move needs a cluster: run `vstor serve --registry etcd://HOST:PORT --node NAME`",
        )
    })
}

pub async fn move_volume(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(request): Json<MoveRequest>,
) -> Result<Json<VolumeView>, ApiError> {
    let failover = failover(&state)?;
    // Refuse a bad target before anything is disconnected.
    moving::check_target(&failover, &name, &request.to)
        .await
        .map_err(error)?;
    let clients = state.nbd.connections(&name);
    let timeout = request
        .timeout_secs
        .map_or(RELEASE_TIMEOUT, Duration::from_secs);
    let started = std::time::Instant::now();
    let mut value = moving::move_volume(&failover, &name, &request.to, timeout)
        .await
        .map_err(error)?;
    state.exports.forget(&name, None);
    value.moved_from = Some(failover.node.name.clone());
    value.nbd_clients_disconnected = Some(clients);
    value.move_ms = Some(started.elapsed().as_millis() as u64);
    Ok(Json(value))
}

pub async fn takeover(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(request): Json<TakeoverRequest>,
) -> Result<Json<VolumeView>, ApiError> {
    let failover = failover(&state)?;
    moving::take_over(&failover, &name, &request.from, request.expected_tag)
        .await
        .map_err(error)?;
    let volume = state.manager.get(&name)?;
    Ok(Json(crate::api::view(&state, volume.info())))
}

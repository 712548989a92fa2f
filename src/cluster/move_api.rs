//! The management API of moves (see [`moving`](super::moving)):
//!
//! | method | path                            | body                       |
//! |--------|---------------------------------|----------------------------|
//! | POST   | /v1/volumes/{name}/move         | `{to, timeout_secs?}`      |
//! | POST   | /v1/volumes/{name}/takeover     | `{from, expected_tag}` (node to node) |
//! | POST   | /v1/volumes/{name}/adopt        | (a cluster volume: [`adopt_in_cluster`]) |
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

/// `vstor volume adopt` of a volume the registry knows: the operator's way back for a volume
/// recorded halted (its adoption failed, or its owner and DTL node died together and the DTL
/// node is back), or to take an orphan before the survivors do. The node asked takes it like a
/// failover (`Failover::adopt`: registry transaction, backend claim, DTL replay, retries),
/// and the record is serving again. `None` leaves the request to the normal routing: not a
/// cluster volume (no record, or no cluster), or a live owner elsewhere, which is asked instead
/// (it knows whether it serves the volume).
pub async fn adopt_in_cluster(
    state: &ApiState,
    name: &str,
    forwarded: bool,
) -> Option<Result<Json<VolumeView>, ApiError>> {
    let failover = state.failover.clone()?;
    let record = match failover.registry.volume(name).await {
        Ok(Some(record)) => record,
        Ok(None) => return None,
        Err(e) => return Some(Err(e.into())),
    };
    let owner_alive = match failover.registry.owner(name).await {
        Ok(owner) => owner.is_some(),
        Err(e) => return Some(Err(e.into())),
    };
    if owner_alive && record.owner != failover.node.name {
        if forwarded {
            // Sent here as the owner, but the registry names another live owner now.
            return Some(Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "volume {name}: its owner is node {} now; retry",
                    record.owner
                ),
            )));
        }
        return None;
    }
    Some(adopt_record(state, &failover, record, owner_alive).await)
}

async fn adopt_record(
    state: &ApiState,
    failover: &std::sync::Arc<super::failover::Failover>,
    record: crate::registry::VolumeRecord,
    owner_alive: bool,
) -> Result<Json<VolumeView>, ApiError> {
    let name = record.name.clone();
    // The record names this node, yet nothing here serves or is opening it: an ownership
    // transaction that took effect after it timed out (`Failover::adopt` checks, but the
    // registry may not have answered that either). The operator's adopt serves it (and the
    // failover pass does the same by itself after `UNSERVED_GRACE`).
    let mine_unserved = record.owner == failover.node.name && !failover.log.pending(&name);
    if state.manager.names().contains(&name)
        || (record.state == crate::registry::VolumeState::Serving && owner_alive && !mine_unserved)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "volume {name} is served by node {} (owner tag {}); `vstor volume move` moves it",
                failover.node.name, record.owner_tag
            ),
        ));
    }
    let nodes = failover.registry.nodes().await?;
    let live = super::failover::live_view(&nodes);
    let entry = failover
        .adopt(&record, &nodes, &live, Duration::ZERO, "operator")
        .await
        .map_err(|e| {
            let status = match e {
                super::failover::AdoptError::Taken(_) => StatusCode::CONFLICT,
                super::failover::AdoptError::Registry(_) => StatusCode::SERVICE_UNAVAILABLE,
                super::failover::AdoptError::Halted(_) => StatusCode::BAD_GATEWAY,
            };
            ApiError::new(status, format!("volume {name}: adoption failed: {e}"))
        })?;
    let volume = state.manager.get(&name)?;
    let mut value = crate::api::view(state, volume.info());
    value.dtl_entries_replayed = Some(entry.dtl_entries_replayed);
    Ok(Json(value))
}

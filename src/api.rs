//! The HTTP JSON management API served by `vstor serve` and used by the CLI.
//!
//! | method | path                         | body                                   |
//! |--------|------------------------------|----------------------------------------|
//! | GET    | /v1/health                   |                                        |
//! | GET    | /v1/volumes                  |                                        |
//! | POST   | /v1/volumes                  | `{name, size, sco_size?, write_buffer?, dtl_mode?, dtl?}` |
//! | GET    | /v1/volumes/{name}           |                                        |
//! | POST   | /v1/volumes/{name}/resize    | `{size}`                               |
//! | PATCH  | /v1/volumes/{name}           | `{read_only?, dtl_mode?, dtl?}`        |
//! | POST   | /v1/volumes/{name}/adopt     |                                        |
//! | DELETE | /v1/volumes/{name}           |                                        |
//!
//! `dtl_mode` is `sync`, `async` or `none`; `dtl` a DTL server's `host:port`. Without them a new
//! volume uses the node's default (`vstor serve --dtl`: mode `sync`, or the configured mode).
//!
//! Sizes are bytes. Errors come back as `{"error": "..."}` with 400 (bad request), 404 (no such
//! volume), 409 (exists), 503 (halted) or 500.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use vstor_edge::nbd::NbdServer;
use vstor_edge::vhost::VhostServer;
use vstor_volumedriver::config::USER_SCO_SIZE_RANGE;
use vstor_volumedriver::{DtlMode, VolumeError, VolumeInfo, VolumeManager, VolumeOptions};

#[derive(Clone)]
pub struct ApiState {
    pub manager: Arc<VolumeManager>,
    pub nbd: NbdServer,
    pub nbd_addr: SocketAddr,
    pub vhost: VhostServer,
    pub default_sco_size: u64,
    pub default_write_buffer: u64,
    /// Mode and address of the DTL new volumes use unless told otherwise.
    pub default_dtl: Option<(DtlMode, String)>,
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<VolumeError> for ApiError {
    fn from(err: VolumeError) -> Self {
        let status = match &err {
            VolumeError::NotFound { .. } => StatusCode::NOT_FOUND,
            VolumeError::Exists { .. } => StatusCode::CONFLICT,
            VolumeError::InvalidName { .. } | VolumeError::InvalidConfig { .. } => {
                StatusCode::BAD_REQUEST
            }
            VolumeError::Halted { .. } | VolumeError::Adopted { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            VolumeError::Dtl { .. } => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, err.to_string())
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

fn view(state: &ApiState, info: VolumeInfo) -> Value {
    let connections = state.nbd.connections(&info.name);
    let uri = format!("nbd://{}/{}", state.nbd_addr, info.name);
    let mut value = serde_json::to_value(info).unwrap_or(Value::Null);
    if let Some(object) = value.as_object_mut() {
        object.insert("nbd_uri".into(), json!(uri));
        object.insert("nbd_connections".into(), json!(connections));
        let name = object
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        object.insert("vhost_socket".into(), json!(state.vhost.socket_path(&name)));
        object.insert(
            "vhost_connected".into(),
            json!(state.vhost.connected(&name)),
        );
    }
    value
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    pub size: u64,
    pub sco_size: Option<u64>,
    pub write_buffer: Option<u64>,
    pub dtl_mode: Option<String>,
    pub dtl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    pub size: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    pub read_only: Option<bool>,
    pub dtl_mode: Option<String>,
    pub dtl: Option<String>,
}

fn parse_dtl_mode(mode: &str) -> Result<DtlMode, ApiError> {
    mode.parse().map_err(bad_request)
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn list(State(state): State<ApiState>) -> Json<Value> {
    let volumes: Vec<Value> = state
        .manager
        .list()
        .into_iter()
        .map(|info| view(&state, info))
        .collect();
    let failed: Vec<Value> = state
        .manager
        .failed()
        .into_iter()
        .map(|(name, reason)| json!({ "name": name, "state": "failed", "halted_reason": reason }))
        .collect();
    Json(Value::Array(volumes.into_iter().chain(failed).collect()))
}

async fn create(
    State(state): State<ApiState>,
    Json(request): Json<CreateRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let sco_size = request.sco_size.unwrap_or(state.default_sco_size);
    let (min, max) = USER_SCO_SIZE_RANGE;
    if !(min..=max).contains(&sco_size) {
        return Err(bad_request(format!(
            "invalid setting for volume {}: SCO size must be between 4 MiB and 128 MiB",
            request.name
        )));
    }
    let default_dtl = state.default_dtl.clone();
    let dtl_mode = match (&request.dtl_mode, &request.dtl, &default_dtl) {
        (Some(mode), _, _) => parse_dtl_mode(mode)?,
        (None, Some(_), Some((mode, _))) => *mode,
        (None, Some(_), None) => DtlMode::Sync,
        (None, None, Some((mode, _))) => *mode,
        (None, None, None) => DtlMode::None,
    };
    let options = VolumeOptions {
        size: request.size,
        sco_size,
        write_buffer: request.write_buffer.unwrap_or(state.default_write_buffer),
        dtl_mode,
        dtl_addr: request.dtl.clone().or(default_dtl.map(|(_, addr)| addr)),
    };
    let manager = state.manager.clone();
    let vhost = state.vhost.clone();
    let volume = blocking(move || {
        let volume = manager.create(&request.name, &options)?;
        if let Err(e) = vhost.add_export(&request.name) {
            tracing::error!(volume = %request.name, error = %e, "cannot export the volume over vhost-user");
        }
        Ok(volume)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(view(&state, volume.info()))))
}

async fn info(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let volume = state.manager.get(&name)?;
    Ok(Json(view(&state, volume.info())))
}

async fn resize(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(request): Json<ResizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let volume = state.manager.get(&name)?;
    let target = volume.clone();
    blocking(move || target.resize(request.size)).await?;
    Ok(Json(view(&state, volume.info())))
}

async fn update(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(request): Json<UpdateRequest>,
) -> Result<Json<Value>, ApiError> {
    let volume = state.manager.get(&name)?;
    if let Some(read_only) = request.read_only {
        let target = volume.clone();
        blocking(move || target.set_read_only(read_only)).await?;
    }
    if request.dtl_mode.is_some() || request.dtl.is_some() {
        let current = volume.config();
        let mode = match &request.dtl_mode {
            Some(mode) => parse_dtl_mode(mode)?,
            None if current.dtl_mode == DtlMode::None => DtlMode::Sync,
            None => current.dtl_mode,
        };
        let addr = request
            .dtl
            .or(current.dtl_addr)
            .or(state.default_dtl.clone().map(|(_, addr)| addr));
        let target = volume.clone();
        blocking(move || target.set_dtl(mode, addr)).await?;
    }
    Ok(Json(view(&state, volume.info())))
}

async fn adopt(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let manager = state.manager.clone();
    let vhost = state.vhost.clone();
    let (volume, summary) = blocking(move || {
        let adopted = manager.adopt(&name)?;
        if let Err(e) = vhost.add_export(&name) {
            tracing::error!(volume = %name, error = %e, "cannot export the volume over vhost-user");
        }
        Ok(adopted)
    })
    .await?;
    let mut value = view(&state, volume.info());
    value["dtl_entries_held"] = json!(summary.held);
    value["dtl_entries_replayed"] = json!(summary.applied);
    Ok(Json(value))
}

async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let manager = state.manager.clone();
    let target = name.clone();
    let nbd = state.nbd.clone();
    let vhost = state.vhost.clone();
    blocking(move || {
        manager.get(&target).map(|_| ()).or_else(|e| match e {
            VolumeError::NotFound { .. } => Err(e),
            _ => Ok(()),
        })?;
        vhost.remove_export(&target);
        let result = manager.delete(&target);
        nbd.disconnect_export(&target);
        result
    })
    .await?;
    Ok(Json(json!({ "deleted": name })))
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{name}", get(info).patch(update).delete(delete))
        .route("/v1/volumes/{name}/resize", post(resize))
        .route("/v1/volumes/{name}/adopt", post(adopt))
        .with_state(state)
}

//! The HTTP JSON management API served by `vstor serve` and used by the CLI.
//!
//! | method | path                                      | body                                   |
//! |--------|-------------------------------------------|----------------------------------------|
//! | GET    | /v1/health                                | (`node`; in a cluster `cluster_health`: healthy, registry_down, fenced) |
//! | GET    | /v1/nodes                                 | (the cluster's nodes; see `cluster::api`) |
//! | GET    | /v1/cluster/registry                      | (`reachable`: this node reaches the registry) |
//! | GET    | /v1/volumes                               |                                        |
//! | POST   | /v1/volumes                               | `{name, size, sco_size?, write_buffer?, dtl_mode?, dtl?, node?, allow_subjects?, allow_networks?, encryption_key_file?}` (`node`: cluster only) |
//! | GET    | /v1/volumes/{name}                        |                                        |
//! | POST   | /v1/volumes/{name}/resize                 | `{size}`                               |
//! | PATCH  | /v1/volumes/{name}                        | `{read_only?, dtl_mode?, dtl?, allow_subjects?, allow_networks?}` |
//! | POST   | /v1/volumes/{name}/adopt                  |                                        |
//! | POST   | /v1/volumes/{name}/restart                |  (a halted volume, or one that failed to restart) |
//! | POST   | /v1/volumes/{name}/move                   | `{to, timeout_secs?}` (cluster; see `cluster::move_api`) |
//! | DELETE | /v1/volumes/{name}[?force=true]           |                                        |
//! | POST   | /v1/volumes/{name}/scrub                  | `{rate?}` (bytes per second; body optional) |
//! | POST   | /v1/volumes/{name}/template               |                                        |
//! | GET    | /v1/volumes/{name}/snapshots              |                                        |
//! | POST   | /v1/volumes/{name}/snapshots              | `{name}`                               |
//! | GET    | /v1/volumes/{name}/snapshots/{snap}       |                                        |
//! | DELETE | /v1/volumes/{name}/snapshots/{snap}       |                                        |
//! | POST   | /v1/volumes/{name}/snapshots/{snap}/rollback | `{force?}` (body optional)          |
//! | POST   | /v1/volumes/{name}/snapshots/{snap}/export | (vhost-user socket `VOL@SNAP.sock`)   |
//! | DELETE | /v1/volumes/{name}/snapshots/{snap}/export |                                       |
//! | POST   | /v1/clones                                | `{name, from, write_buffer?, dtl_mode?, dtl?, wait_secs?}` |
//!
//! `dtl_mode` is `sync`, `async` or `none`; `dtl` a DTL server's `host:port`. Without them a new
//! volume (or clone) uses the node's default (`vstor serve --dtl`: mode `sync`, or the configured
//! mode).
//!
//! `allow_subjects` (client-certificate CNs) and `allow_networks` (CIDRs or addresses) are the
//! volume's NBD allow list, stored in its configuration (rule: `vstor_volumedriver::access`,
//! `docs/security.md`). In a PATCH each given list replaces the current one and `[]` empties it;
//! both empty means every client. A malformed entry is a 400 naming it.
//!
//! Snapshots: creating one also flushes the volume, so an acknowledged snapshot survives a crash
//! with everything written before it. A snapshot is readable as the NBD export `VOL@SNAP`
//! (read-only) and, once exported with `.../export`, as a read-only vhost-user-blk socket
//! `<vhost-dir>/VOL@SNAP.sock` (re-created by a restart). Rollback and delete refuse (409) while
//! NBD clients or a vhost-user frontend use the volume, unless `force`, which disconnects them
//! first.
//! A clone's `from` is `VOL@SNAP`, or a template volume's name (its newest snapshot); the clone
//! waits up to `wait_secs` (default 30) for the snapshot to reach the backend (else 503).
//!
//! Scrubbing runs in the request (one per volume at a time, else 409) and answers with its
//! report; while it runs, the volume's `scrub_progress` shows its phase, and afterwards
//! `last_scrub` its outcome. Without `rate` it copies as fast as it can.
//!
//! Sizes are bytes. Errors come back as `{"error": "..."}` with 400 (bad request), 404 (no such
//! volume or snapshot), 409 (exists, has clones, in use, refused, scrub running), 503 (halted,
//! snapshot not on the backend yet), 502 (DTL) or 500.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use vstor_edge::nbd::NbdServer;
use vstor_edge::vhost::VhostServer;
use vstor_volumedriver::access::{parse_networks, parse_subjects, VolumeAccess};
use vstor_volumedriver::config::USER_SCO_SIZE_RANGE;
use vstor_volumedriver::{
    DtlMode, SnapshotInfo, VolumeError, VolumeInfo, VolumeManager, VolumeOptions,
};

pub use crate::api_types::{
    CloneRequest, CreateRequest, ForceQuery, ResizeRequest, RollbackRequest, ScrubRequest,
    SnapshotRequest, UpdateRequest,
};
use crate::api_types::{
    ErrorBody, Health, ScrubAnswer, SnapshotDeleted, SnapshotUnexported, SnapshotView,
    VolumeDeleted, VolumeView,
};
use crate::export::{snapshot_export_name, Exports};
use crate::scrub::{ScrubError, Scrubs};

/// How long a clone waits for its snapshot to reach the backend unless told otherwise.
const CLONE_WAIT: Duration = Duration::from_secs(30);
const CLONE_WAIT_MAX: Duration = Duration::from_secs(600);

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
    pub exports: Arc<Exports>,
    pub scrubs: Arc<Scrubs>,
    /// Snapshots exported over vhost-user (`VOL@SNAP`), kept in `vhost_snapshots_file` so a
    /// restart exports them again.
    pub vhost_snapshots: Arc<Mutex<BTreeSet<String>>>,
    pub vhost_snapshots_file: std::path::PathBuf,
    /// This node's record (in the single-node default too: `vstor node list` shows it).
    pub node: crate::registry::NodeRecord,
    /// The registry: the local file by default, etcd in a cluster.
    pub registry: Arc<dyn crate::registry::Registry>,
    /// The cluster runtime when the node runs on a cluster registry (`--registry etcd://…`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Failover and moves, when the node runs in a cluster (`--registry etcd://…`).
    pub failover: Option<Arc<crate::cluster::failover::Failover>>,
    /// The erasure-coded store, when the backend is `ec`.
    pub tier: Option<Arc<vstor_backend::ec::store::EcStore>>,
    /// The node's metadata servers (`--mds`), if it uses any.
    pub mds: Option<Arc<crate::mds_link::MdsLink>>,
    /// Latency and errors of the node's backend requests (`/metrics`).
    pub backend_timing: Arc<crate::backend_timing::BackendTiming>,
    /// The EC tier's background repair, when the backend is `ec`.
    pub tier_repair: Option<Arc<crate::tier::maintenance::RepairStatus>>,
    /// The sweep of DTL leftovers, on a cluster node.
    pub dtl_sweep: Option<Arc<crate::cluster::dtl_sweep::SweepStatus>>,
    /// Reloads of the node's TLS certificates and API tokens (`credentials`).
    pub credential_reloads: Arc<crate::credentials::ReloadStats>,
}

/// Load the list of snapshots exported over vhost-user (missing file: none).
pub fn load_vhost_snapshots(path: &std::path::Path) -> BTreeSet<String> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

impl ApiState {
    fn vhost_snapshots(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.vhost_snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Persist the vhost-user snapshot exports (replace the file atomically).
    fn save_vhost_snapshots(&self) {
        let list = self.vhost_snapshots().clone();
        let path = &self.vhost_snapshots_file;
        let temp = path.with_extension("tmp");
        let saved = serde_json::to_vec(&list)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&temp, bytes))
            .and_then(|()| std::fs::rename(&temp, path));
        if let Err(e) = saved {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the vhost-user snapshot exports");
        }
    }
}

pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<VolumeError> for ApiError {
    fn from(err: VolumeError) -> Self {
        let status = match &err {
            VolumeError::NotFound { .. } | VolumeError::SnapshotNotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            VolumeError::Exists { .. }
            | VolumeError::SnapshotExists { .. }
            | VolumeError::HasClones { .. }
            | VolumeError::Refused { .. }
            | VolumeError::Moved { .. }
            | VolumeError::Replaced { .. }
            | VolumeError::ReadOnly { .. } => StatusCode::CONFLICT,
            VolumeError::InvalidName { .. }
            | VolumeError::InvalidConfig { .. }
            | VolumeError::EncryptionKey { .. }
            | VolumeError::OutOfRange { .. }
            | VolumeError::Misaligned { .. } => StatusCode::BAD_REQUEST,
            VolumeError::Halted { .. }
            | VolumeError::Adopted { .. }
            | VolumeError::Stopped { .. }
            | VolumeError::Fenced { .. }
            | VolumeError::NotInBackend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            VolumeError::Dtl { .. } => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, err.to_string())
    }
}

pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

pub(crate) fn conflict(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::CONFLICT, message.into())
}

pub(crate) fn internal(message: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, message.to_string())
}

/// Run blocking work that cannot fail with a volume error on the blocking pool.
async fn off_reactor<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(internal)
}

pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

pub(crate) fn view(state: &ApiState, info: VolumeInfo) -> VolumeView {
    let name = info.name.clone();
    let (scrub_progress, last_scrub) = state.scrubs.status(&name);
    let adopting = state
        .failover
        .as_ref()
        .is_some_and(|f| f.log.pending(&name));
    let mut view = VolumeView {
        owner: Some(state.node.name.clone()),
        nbd_uri: Some(format!("nbd://{}/{name}", state.nbd_addr)),
        nbd_connections: Some(state.nbd.connections(&name)),
        vhost_socket: Some(state.vhost.socket_path(&name).display().to_string()),
        vhost_connected: Some(state.vhost.connected(&name)),
        last_failover: state.failover.as_ref().and_then(|f| f.log.get(&name)),
        scrub_progress,
        last_scrub,
        mds: state.mds.as_ref().and_then(|m| m.status(&name)),
        ..VolumeView::from(info)
    };
    if adopting {
        // Open but its failover not yet recorded (`FailoverLog`): not `running` yet.
        view.state = "adopting".to_string();
    }
    view
}

fn snapshot_value(state: &ApiState, volume: &str, info: SnapshotInfo) -> SnapshotView {
    let export = format!("{volume}@{}", info.name);
    let exported = state.vhost_snapshots().contains(&export);
    SnapshotView {
        volume: volume.to_string(),
        nbd_uri: format!("nbd://{}/{export}", state.nbd_addr),
        nbd_connections: state.nbd.connections(&export),
        vhost_socket: exported.then(|| state.vhost.socket_path(&export).display().to_string()),
        vhost_connected: state.vhost.connected(&export),
        name: info.name,
        created: info.created,
        written_bytes: info.written_bytes,
        in_backend: info.in_backend,
        clones: info.clones,
        size: info.size,
        tlog: info.tlog,
    }
}

/// Stop serving snapshots that are gone: disconnect their NBD clients, remove their vhost-user
/// sockets, drop their cached views.
async fn drop_snapshot_exports(state: &ApiState, volume: &str, snapshots: Vec<String>) {
    let mut vhost_exports = Vec::new();
    for snapshot in &snapshots {
        let export = format!("{volume}@{snapshot}");
        state.nbd.disconnect_export(&export);
        if state.vhost_snapshots().remove(&export) {
            vhost_exports.push(export);
        }
        state.save_vhost_snapshots();
        state.exports.forget(volume, Some(snapshot));
    }
    if !vhost_exports.is_empty() {
        let vhost = state.vhost.clone();
        let _ = off_reactor(move || {
            for export in vhost_exports {
                vhost.remove_export(&export);
            }
        })
        .await;
    }
}

fn snapshot_names(snapshots: &[SnapshotInfo]) -> Vec<String> {
    snapshots.iter().map(|s| s.name.clone()).collect()
}

fn parse_dtl_mode(mode: &str) -> Result<DtlMode, ApiError> {
    mode.parse().map_err(bad_request)
}

/// DTL mode and address of a new volume: what the request says, else the node's default.
fn dtl_choice(
    state: &ApiState,
    mode: Option<&str>,
    addr: Option<String>,
) -> Result<(DtlMode, Option<String>), ApiError> {
    let default_dtl = state.default_dtl.clone();
    let dtl_mode = match (mode, &addr, &default_dtl) {
        (Some(mode), _, _) => parse_dtl_mode(mode)?,
        (None, Some(_), Some((mode, _))) => *mode,
        (None, Some(_), None) => DtlMode::Sync,
        (None, None, Some((mode, _))) => *mode,
        (None, None, None) => DtlMode::None,
    };
    Ok((dtl_mode, addr.or(default_dtl.map(|(_, addr)| addr))))
}

async fn health(State(state): State<ApiState>) -> Json<Health> {
    let mut value = Health {
        status: "ok".into(),
        node: state.node.name.clone(),
        ..Health::default()
    };
    if let Some(cluster) = &state.cluster {
        let health = cluster.health().borrow().clone();
        let (name, reason) = match health {
            crate::cluster::Health::Healthy => ("healthy", None),
            crate::cluster::Health::RegistryDown => ("registry_down", None),
            crate::cluster::Health::Fenced { reason } => ("fenced", Some(reason)),
        };
        value.cluster_health = Some(name.into());
        value.fenced_reason = reason;
        value.peers = Some(cluster.peer_names());
    }
    Json(value)
}

async fn list(State(state): State<ApiState>) -> Result<Json<Vec<VolumeView>>, ApiError> {
    let local = local_list(&state);
    match &state.cluster {
        Some(cluster) => crate::cluster::api::list(&state, cluster, local)
            .await
            .map(Json),
        None => Ok(Json(local)),
    }
}

fn local_list(state: &ApiState) -> Vec<VolumeView> {
    let volumes: Vec<VolumeView> = state
        .manager
        .list()
        .into_iter()
        .map(|info| view(state, info))
        .collect();
    let failed: Vec<VolumeView> = state
        .manager
        .failed()
        .into_iter()
        .map(|(name, reason)| failed_view(state, name, reason))
        .collect();
    let moved: Vec<VolumeView> = state
        .manager
        .moved()
        .into_iter()
        .map(|(name, node)| VolumeView {
            name,
            state: "moved".into(),
            moved_to: Some(node),
            ..VolumeView::default()
        })
        .collect();
    volumes.into_iter().chain(failed).chain(moved).collect()
}

/// A volume this node could not open: its name and why.
fn failed_view(state: &ApiState, name: String, reason: String) -> VolumeView {
    VolumeView {
        name,
        state: "failed".into(),
        halted_reason: Some(reason),
        owner: Some(state.node.name.clone()),
        ..VolumeView::default()
    }
}

async fn create(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
    Json(request): Json<CreateRequest>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    if let Some(cluster) = state.cluster.clone() {
        let forwarded = headers.contains_key(crate::cluster::forward::FORWARDED);
        return crate::cluster::api::create(state, &cluster, forwarded, request).await;
    }
    if let Some(node) = &request.node {
        if *node != state.node.name {
            return Err(bad_request(format!(
                "node {node}: this node ({}) is not part of a cluster (start it with --registry)",
                state.node.name
            )));
        }
    }
    let (dtl_mode, dtl_addr) =
        dtl_choice(&state, request.dtl_mode.as_deref(), request.dtl.clone())?;
    let volume = create_local(&state, &request, dtl_mode, dtl_addr, 0).await?;
    Ok((StatusCode::CREATED, Json(view(&state, volume.info()))))
}

/// Create a volume served by this node, its incarnation above `incarnation_floor` (a cluster's,
/// `crate::cluster::incarnation`; 0 on a single node).
pub(crate) async fn create_local(
    state: &ApiState,
    request: &CreateRequest,
    dtl_mode: DtlMode,
    dtl_addr: Option<String>,
    incarnation_floor: u64,
) -> Result<Arc<vstor_volumedriver::Volume>, ApiError> {
    let sco_size = request.sco_size.unwrap_or(state.default_sco_size);
    let (min, max) = USER_SCO_SIZE_RANGE;
    if !(min..=max).contains(&sco_size) {
        return Err(bad_request(format!(
            "invalid setting for volume {}: SCO size must be between 4 MiB and 128 MiB",
            request.name
        )));
    }
    let access = VolumeAccess::parse(
        request.allow_subjects.as_deref().unwrap_or_default(),
        request.allow_networks.as_deref().unwrap_or_default(),
    )
    .map_err(|e| bad_request(format!("volume {}: {e}", request.name)))?;
    let options = VolumeOptions {
        size: request.size,
        sco_size,
        write_buffer: request.write_buffer.unwrap_or(state.default_write_buffer),
        dtl_mode,
        dtl_addr,
        access,
        encryption_key_file: request
            .encryption_key_file
            .as_deref()
            .map(std::path::PathBuf::from),
        incarnation_floor,
    };
    let manager = state.manager.clone();
    let vhost = state.vhost.clone();
    let name = request.name.clone();
    let tier = match (&request.preset, &state.tier) {
        (None, _) => None,
        (Some(preset), Some(tier)) => Some((tier.clone(), preset.clone())),
        (Some(preset), None) => {
            return Err(bad_request(format!(
                "volume {name}: preset {preset} needs the erasure-coded backend (vstor serve --backend ec)"
            )))
        }
    };
    blocking(move || {
        if let Some((tier, preset)) = tier {
            tier.reserve_preset(&name, &preset)
                .map_err(vstor_volumedriver::VolumeError::backend(&name))?;
        }
        let volume = manager.create(&name, &options)?;
        if let Err(e) = vhost.add_export(&name) {
            tracing::error!(volume = %name, error = %e, "cannot export the volume over vhost-user");
        }
        Ok(volume)
    })
    .await
}

async fn info(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<VolumeView>, ApiError> {
    // A volume that could not be opened is shown with why, not answered with an error.
    if let Some(reason) = state.manager.failed().remove(&name) {
        return Ok(Json(failed_view(&state, name, reason)));
    }
    let volume = state.manager.get(&name)?;
    Ok(Json(view(&state, volume.info())))
}

async fn resize(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(request): Json<ResizeRequest>,
) -> Result<Json<VolumeView>, ApiError> {
    let volume = state.manager.get(&name)?;
    let target = volume.clone();
    blocking(move || target.resize(request.size)).await?;
    Ok(Json(view(&state, volume.info())))
}

async fn update(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(request): Json<UpdateRequest>,
) -> Result<Json<VolumeView>, ApiError> {
    let volume = state.manager.get(&name)?;
    if request.allow_subjects.is_some() || request.allow_networks.is_some() {
        let current = volume.access();
        let access = VolumeAccess {
            allow_subjects: match &request.allow_subjects {
                Some(subjects) => parse_subjects(subjects),
                None => Ok(current.allow_subjects),
            }
            .map_err(|e| bad_request(format!("volume {name}: {e}")))?,
            allow_networks: match &request.allow_networks {
                Some(networks) => parse_networks(networks),
                None => Ok(current.allow_networks),
            }
            .map_err(|e| bad_request(format!("volume {name}: {e}")))?,
        };
        let target = volume.clone();
        blocking(move || target.set_access(access)).await?;
    }
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
) -> Result<Json<VolumeView>, ApiError> {
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
    value.dtl_entries_held = Some(summary.held);
    value.dtl_entries_replayed = Some(summary.applied);
    Ok(Json(value))
}

/// Restart a halted volume (or one that failed to open at node start) once what stopped it is
/// gone: see `VolumeManager::restart`. Its NBD clients and vhost-user frontend, still talking to
/// the stopped instance, are cut so that they reconnect to the new one.
async fn restart(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<VolumeView>, ApiError> {
    // Out of the manager's tables while it reopens: not for the failover pass to adopt.
    let _held = state.failover.as_ref().map(|f| f.log.hold(&name));
    let manager = state.manager.clone();
    let target = name.clone();
    let volume = blocking(move || manager.restart(&target)).await?;
    let disconnected = disconnect_nbd(&state, &name, "restart").await?;
    let vhost = state.vhost.clone();
    let export = name.clone();
    off_reactor(move || {
        vhost.remove_export(&export);
        vhost.add_export(&export)
    })
    .await?
    .map_err(|e| {
        internal(format!(
            "volume {name} restarted, but cannot be exported over vhost-user: {e}"
        ))
    })?;
    let mut value = view(&state, volume.info());
    value.nbd_clients_disconnected = Some(disconnected);
    Ok(Json(value))
}

/// Refuse (409) while NBD clients or a vhost-user frontend use volume `name`, unless `force`.
/// Returns whether a vhost-user frontend is connected.
fn refuse_in_use(
    state: &ApiState,
    name: &str,
    force: bool,
    action: &str,
) -> Result<bool, ApiError> {
    let nbd_clients = state.nbd.connections(name);
    let vhost_connected = state.vhost.connected(name);
    if !force && (nbd_clients > 0 || vhost_connected) {
        let mut users = Vec::new();
        if nbd_clients > 0 {
            users.push(format!(
                "{nbd_clients} NBD client{}",
                if nbd_clients == 1 { "" } else { "s" }
            ));
        }
        if vhost_connected {
            users.push("a vhost-user frontend".to_string());
        }
        return Err(conflict(format!(
            "volume {name} is in use ({} connected); disconnect them first, or use --force to disconnect them and {action}",
            users.join(" and ")
        )));
    }
    Ok(vhost_connected)
}

/// Disconnect volume `name`'s NBD clients and wait until their requests are done (none may land
/// after what follows); returns how many there were.
async fn disconnect_nbd(state: &ApiState, name: &str, what: &str) -> Result<usize, ApiError> {
    let clients = state.nbd.connections(name);
    if !state
        .nbd
        .disconnect_export_and_wait(name, Duration::from_secs(30))
        .await
    {
        return Err(conflict(format!(
            "volume {name}: NBD clients did not disconnect within 30 s; {what} not done"
        )));
    }
    Ok(clients)
}

async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(request): Query<ForceQuery>,
) -> Result<Json<VolumeDeleted>, ApiError> {
    // A fenced node may have lost its lease: another node may be adopting the volume from the
    // same backend, so nothing of it is deleted here (not even "only locally").
    if let Some(cluster) = &state.cluster {
        if cluster.is_fenced() {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "node {} is fenced (it cannot renew its registry lease): volume {name} was not deleted; retry once the node is healthy, or delete it through another node",
                    state.node.name
                ),
            ));
        }
    }
    // Between the local delete and the record's, the registry names this node as the owner of
    // a volume it does not serve: the failover pass must not adopt it back meanwhile.
    let _held = state.failover.as_ref().map(|f| f.log.hold(&name));
    // The tag the volume's cluster record must still carry for this node to delete it.
    let tag = state.manager.get(&name).ok().map(|v| v.info().owner_tag);
    // Refuse before anything is torn down: a volume whose snapshots have clones stays served.
    crate::stale_clones::forget(&state, &name, None).await?;
    let snapshots = match state.manager.get(&name) {
        Ok(volume) => {
            let clones = volume.clones();
            if !clones.is_empty() {
                return Err(VolumeError::HasClones {
                    volume: name.clone(),
                    what: "a snapshot".into(),
                    clones,
                }
                .into());
            }
            snapshot_names(&volume.snapshots())
        }
        Err(_) => Vec::new(),
    };
    // Nor is a volume deleted under its clients, unless forced.
    let vhost_connected = refuse_in_use(&state, &name, request.force, "delete")?;
    let disconnected = if request.force {
        disconnect_nbd(&state, &name, "delete").await?
    } else {
        0
    };
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
        if matches!(result, Err(VolumeError::HasClones { .. })) {
            // A clone appeared since the check: keep serving the volume.
            let _ = vhost.add_export(&target);
            return result;
        }
        nbd.disconnect_export(&target);
        result
    })
    .await?;
    drop_snapshot_exports(&state, &name, snapshots).await;
    state.exports.forget(&name, None);
    state.scrubs.forget(&name);
    if let (Some(cluster), Some(tag)) = (&state.cluster, tag) {
        match cluster.registry.delete_volume(&name, tag).await {
            Ok(()) | Err(crate::registry::RegistryError::VolumeNotFound { .. }) => {}
            Err(e) => {
                return Err(internal(format!(
                    "volume {name} was deleted on node {} but its cluster record was not: {e}",
                    state.node.name
                )))
            }
        }
    }
    tracing::info!(volume = %name, force = request.force, "volume deleted");
    Ok(Json(VolumeDeleted {
        deleted: name,
        nbd_clients_disconnected: disconnected,
        vhost_frontend_disconnected: request.force && vhost_connected,
        left_behind: Vec::new(),
    }))
}

async fn scrub(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    request: Option<Json<ScrubRequest>>,
) -> Result<Json<ScrubAnswer>, ApiError> {
    let request = request.map(|Json(r)| r).unwrap_or_default();
    let volume = state.manager.get(&name)?;
    let scrubs = state.scrubs.clone();
    let rate = request.rate.filter(|r| *r > 0);
    let started = std::time::Instant::now();
    let report = off_reactor(move || scrubs.run(&volume, rate, "api", None))
        .await?
        .map_err(|e| match e {
            ScrubError::Busy => conflict(format!(
                "volume {name}: a scrub is already running (see `vstor volume info {name}`)"
            )),
            ScrubError::Volume(e) => e.into(),
        })?;
    let value = ScrubAnswer {
        volume: name,
        seconds: started.elapsed().as_secs_f64(),
        report: report.into(),
    };
    Ok(Json(value))
}

async fn template(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<VolumeView>, ApiError> {
    let volume = state.manager.get(&name)?;
    let target = volume.clone();
    let snapshot = blocking(move || {
        let snapshot = target.set_template()?;
        // The snapshot record reaches the disk with a flush, like a created snapshot's.
        target.flush()?;
        Ok(snapshot)
    })
    .await?;
    let mut value = view(&state, volume.info());
    value.template_snapshot = Some(snapshot_value(&state, &name, snapshot));
    Ok(Json(value))
}

async fn snapshot_list(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<SnapshotView>>, ApiError> {
    let volume = state.manager.get(&name)?;
    Ok(Json(
        volume
            .snapshots()
            .into_iter()
            .map(|info| snapshot_value(&state, &name, info))
            .collect(),
    ))
}

async fn snapshot_create(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(request): Json<SnapshotRequest>,
) -> Result<(StatusCode, Json<SnapshotView>), ApiError> {
    let volume = state.manager.get(&name)?;
    let info = blocking(move || {
        let info = volume.snapshot_create(&request.name)?;
        // Acknowledged means durable: the snapshot record and everything written before it.
        volume.flush()?;
        Ok(info)
    })
    .await?;
    tracing::info!(volume = %name, snapshot = %info.name, "snapshot created");
    Ok((
        StatusCode::CREATED,
        Json(snapshot_value(&state, &name, info)),
    ))
}

async fn snapshot_info(
    State(state): State<ApiState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<Json<SnapshotView>, ApiError> {
    let volume = state.manager.get(&name)?;
    let info = volume.snapshot(&snapshot)?;
    Ok(Json(snapshot_value(&state, &name, info)))
}

async fn snapshot_delete(
    State(state): State<ApiState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<Json<SnapshotDeleted>, ApiError> {
    let volume = state.manager.get(&name)?;
    crate::stale_clones::forget(&state, &name, Some(&snapshot)).await?;
    let target = snapshot.clone();
    blocking(move || volume.snapshot_delete(&target)).await?;
    drop_snapshot_exports(&state, &name, vec![snapshot.clone()]).await;
    tracing::info!(volume = %name, %snapshot, "snapshot deleted");
    Ok(Json(SnapshotDeleted {
        volume: name,
        deleted: snapshot,
    }))
}

async fn rollback(
    State(state): State<ApiState>,
    Path((name, snapshot)): Path<(String, String)>,
    request: Option<Json<RollbackRequest>>,
) -> Result<Json<VolumeView>, ApiError> {
    let request = request.map(|Json(r)| r).unwrap_or_default();
    let volume = state.manager.get(&name)?;
    volume.snapshot(&snapshot)?;
    let vhost_connected = refuse_in_use(&state, &name, request.force, "roll back")?;
    let before = snapshot_names(&volume.snapshots());
    let disconnected = if request.force {
        disconnect_nbd(&state, &name, "rollback").await?
    } else {
        0
    };
    let target = volume.clone();
    let vhost = state.vhost.clone();
    let (force, export, to) = (request.force, name.clone(), snapshot.clone());
    blocking(move || {
        // The frontend is cut by removing the export; it may reconnect once it is back.
        if force {
            vhost.remove_export(&export);
        }
        let result = target.rollback(&to);
        if force {
            if let Err(e) = vhost.add_export(&export) {
                tracing::error!(volume = %export, error = %e, "cannot export the volume over vhost-user again");
            }
        }
        result
    })
    .await?;
    let after = snapshot_names(&volume.snapshots());
    let dropped: Vec<String> = before.into_iter().filter(|s| !after.contains(s)).collect();
    drop_snapshot_exports(&state, &name, dropped.clone()).await;
    tracing::info!(volume = %name, %snapshot, force = request.force, "volume rolled back");
    let mut value = view(&state, volume.info());
    value.rolled_back_to = Some(snapshot);
    value.snapshots_dropped = Some(dropped);
    value.nbd_clients_disconnected = Some(disconnected);
    value.vhost_frontend_disconnected = Some(request.force && vhost_connected);
    Ok(Json(value))
}

async fn snapshot_export(
    State(state): State<ApiState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<Json<SnapshotView>, ApiError> {
    let volume = state.manager.get(&name)?;
    let info = volume.snapshot(&snapshot)?;
    let export = format!("{name}@{snapshot}");
    let vhost = state.vhost.clone();
    let target = export.clone();
    off_reactor(move || vhost.add_export(&target))
        .await?
        .map_err(|e| internal(format!("cannot export {export} over vhost-user: {e}")))?;
    state.vhost_snapshots().insert(export);
    state.save_vhost_snapshots();
    Ok(Json(snapshot_value(&state, &name, info)))
}

async fn snapshot_unexport(
    State(state): State<ApiState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<Json<SnapshotUnexported>, ApiError> {
    let export = format!("{name}@{snapshot}");
    if !state.vhost_snapshots().remove(&export) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("snapshot {snapshot:?} of volume {name} is not exported over vhost-user"),
        ));
    }
    state.save_vhost_snapshots();
    let vhost = state.vhost.clone();
    off_reactor(move || vhost.remove_export(&export)).await?;
    Ok(Json(SnapshotUnexported {
        volume: name,
        snapshot,
        vhost_socket: None,
    }))
}

async fn clone_create(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
    Json(request): Json<CloneRequest>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    if let Some(cluster) = state.cluster.clone() {
        let forwarded = headers.contains_key(crate::cluster::forward::FORWARDED);
        return crate::cluster::api::clone(state, &cluster, forwarded, request).await;
    }
    let (dtl_mode, dtl_addr) =
        dtl_choice(&state, request.dtl_mode.as_deref(), request.dtl.clone())?;
    let (volume, cloned_from) = clone_local(&state, &request, dtl_mode, dtl_addr, 0).await?;
    let mut value = view(&state, volume.info());
    value.cloned_from = Some(cloned_from);
    Ok((StatusCode::CREATED, Json(value)))
}

/// Make a clone on this node (its parent must be served here) and export it; returns it and
/// `PARENT@SNAPSHOT` it was cloned from. Its incarnation is above `incarnation_floor`, as in
/// [`create_local`].
pub(crate) async fn clone_local(
    state: &ApiState,
    request: &CloneRequest,
    dtl_mode: DtlMode,
    dtl_addr: Option<String>,
    incarnation_floor: u64,
) -> Result<(Arc<vstor_volumedriver::Volume>, String), ApiError> {
    let (parent, snapshot) = match snapshot_export_name(&request.from) {
        Some((volume, snapshot)) => (volume.to_string(), snapshot.to_string()),
        None if request.from.contains('@') => {
            return Err(bad_request(format!(
                "clone source {:?} must be VOLUME@SNAPSHOT or a template volume",
                request.from
            )))
        }
        None => {
            let source = state.manager.get(&request.from)?;
            if !source.config().template {
                return Err(bad_request(format!(
                    "volume {} is not a template: give VOLUME@SNAPSHOT to clone one of its snapshots",
                    request.from
                )));
            }
            let newest = source
                .snapshots()
                .pop()
                .ok_or_else(|| conflict(format!("template {} has no snapshot", request.from)))?;
            (request.from.clone(), newest.name)
        }
    };
    // Size and SCO size come from the parent.
    let options = VolumeOptions {
        size: 0,
        sco_size: state.default_sco_size,
        write_buffer: request.write_buffer.unwrap_or(state.default_write_buffer),
        dtl_mode,
        dtl_addr,
        // A clone starts open to every client, like any new volume; set its list with PATCH.
        access: VolumeAccess::default(),
        // A clone inherits its parent's encryption (`VolumeManager::clone_volume`).
        encryption_key_file: None,
        incarnation_floor,
    };
    let wait = request
        .wait_secs
        .map_or(CLONE_WAIT, Duration::from_secs)
        .min(CLONE_WAIT_MAX);
    let manager = state.manager.clone();
    let vhost = state.vhost.clone();
    let name = request.name.clone();
    let (from_volume, from_snapshot) = (parent.clone(), snapshot.clone());
    let volume = blocking(move || {
        let volume = manager.clone_volume(&name, &from_volume, &from_snapshot, &options, wait)?;
        if let Err(e) = vhost.add_export(&name) {
            tracing::error!(volume = %name, error = %e, "cannot export the volume over vhost-user");
        }
        Ok(volume)
    })
    .await?;
    Ok((volume, format!("{parent}@{snapshot}")))
}

/// Every answer that is an error but not JSON — axum's own rejections (malformed JSON: 400,
/// not `application/json`: 415, missing or unknown field: 422, bad path or query: 400, body too
/// large: 413) and empty ones — becomes `{"error": "..."}` with the same status and headers
/// (`Allow` of a 405 stays). One layer for the node's and the edge's routers instead of a
/// custom extractor per handler: no handler can forget it.
pub async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let error = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let mut answer = (status, Json(ErrorBody { error })).into_response();
    for (name, value) in &parts.headers {
        answer.headers_mut().insert(name.clone(), value.clone());
    }
    answer
}

/// 404 for a path no route serves.
pub async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no such API route: {method} {}", uri.path()),
    )
}

/// 405 for a route asked with a method it does not serve.
pub async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(crate::openapi::document())
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/nodes", get(crate::cluster::api::nodes))
        .route(
            "/v1/cluster/registry",
            get(crate::cluster::api::registry_reachable),
        )
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{name}", get(info).patch(update).delete(delete))
        .route("/v1/volumes/{name}/resize", post(resize))
        .route("/v1/volumes/{name}/adopt", post(adopt))
        .route("/v1/volumes/{name}/restart", post(restart))
        .route(
            "/v1/volumes/{name}/move",
            post(crate::cluster::move_api::move_volume),
        )
        .route(
            "/v1/volumes/{name}/takeover",
            post(crate::cluster::move_api::takeover),
        )
        .route("/v1/volumes/{name}/scrub", post(scrub))
        .route("/v1/volumes/{name}/template", post(template))
        .route(
            "/v1/volumes/{name}/snapshots",
            get(snapshot_list).post(snapshot_create),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snap}",
            get(snapshot_info).delete(snapshot_delete),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snap}/rollback",
            post(rollback),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snap}/export",
            post(snapshot_export).delete(snapshot_unexport),
        )
        .route("/v1/volumes/{name}/stats", get(crate::metrics::stats))
        .route("/v1/clones", post(clone_create))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/v1/osds", get(crate::metrics::osds))
        .route("/", get(crate::dashboard::page))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::cluster::api::route_to_owner,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(state)
}

//! The cluster side of the management API: any node manages any volume.
//!
//! - `GET /v1/nodes`: every node of the registry with liveness, volume count and addresses.
//! - `GET /v1/cluster/registry`: whether this node reaches the registry now (asked by peers'
//!   self-fencing monitors; answers within half their probe timeout).
//! - Every `/v1/volumes/{name}…` request for a volume another node owns is forwarded to the
//!   owner's API (marked with [`FORWARDED`], never forwarded twice), or, when the owner is dead,
//!   `GET /v1/volumes/{name}` is answered from the registry and the rest refused (503).
//! - `GET /v1/volumes` lists every volume of the cluster with its owner.
//! - `POST /v1/volumes` places the volume on `node` or the least-loaded live node (forwarding the
//!   create there), and its DTL by the placement rule unless `dtl` names a server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use vstor_volumedriver::DtlMode;

use super::forward::{forward, FORWARDED};
use super::{placement, Cluster};
use crate::api::{
    bad_request, conflict, create_local, internal, view, ApiError, ApiState, CreateRequest,
};
use crate::api_types::{ErrorBody, NodeView, RegistryReachable, VolumeView};
use crate::registry::{NodeRecord, RegistryError, VolumeRecord, VolumeState};

/// Largest request body forwarded to another node.
const MAX_FORWARD_BODY: usize = 1 << 20;

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        let status = match &err {
            RegistryError::VolumeNotFound { .. } | RegistryError::NotAttached { .. } => {
                StatusCode::NOT_FOUND
            }
            RegistryError::VolumeExists { .. }
            | RegistryError::StaleTag { .. }
            | RegistryError::NodeAlive { .. }
            | RegistryError::EdgeAlive { .. }
            | RegistryError::AttachedElsewhere { .. } => StatusCode::CONFLICT,
            RegistryError::Unreachable { .. }
            | RegistryError::LeaseExpired { .. }
            | RegistryError::Tls { .. }
            | RegistryError::Denied { .. } => StatusCode::SERVICE_UNAVAILABLE,
            RegistryError::InvalidSettings { .. } => StatusCode::BAD_REQUEST,
            RegistryError::Corrupt { .. } | RegistryError::Failed { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(status, err.to_string())
    }
}

fn unavailable(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, message.into())
}

pub async fn nodes(State(state): State<ApiState>) -> Result<Json<Vec<NodeView>>, ApiError> {
    let mut nodes = state.registry.nodes().await?;
    if state.cluster.is_none() {
        // The single-node default keeps no volume records: its volumes are the manager's.
        for node in nodes
            .iter_mut()
            .filter(|n| n.record.name == state.node.name)
        {
            node.volumes = state.manager.names().len() + state.manager.failed().len();
        }
    }
    Ok(Json(
        nodes
            .into_iter()
            .map(|n| NodeView {
                name: n.record.name,
                domain: n.record.domain,
                recovery_domain: n.record.recovery_domain,
                api_addr: n.record.api_addr,
                nbd_addr: n.record.nbd_addr,
                dtl_addr: n.record.dtl_addr,
                edge_addr: n.record.edge_addr,
                edge_socket: n.record.edge_socket,
                started_at: n.record.started_at,
                version: n.record.version,
                alive: n.alive,
                volumes: n.volumes,
            })
            .collect(),
    ))
}

pub async fn registry_reachable(State(state): State<ApiState>) -> Json<RegistryReachable> {
    let budget = state
        .cluster
        .as_ref()
        .map_or(Duration::from_millis(250), |c| {
            c.settings.peer_probe_timeout() / 2
        });
    let reachable = matches!(
        tokio::time::timeout(budget, state.registry.ping()).await,
        Ok(Ok(()))
    );
    Json(RegistryReachable {
        node: state.node.name.clone(),
        reachable,
    })
}

/// A volume's view built from its registry record (the owner is elsewhere or dead).
fn record_view(
    record: &VolumeRecord,
    owner: Option<&NodeRecord>,
    dtl: Option<&NodeRecord>,
) -> VolumeView {
    let (state, reason) = match &record.state {
        VolumeState::Serving if owner.is_some() => ("serving", None),
        VolumeState::Serving => ("owner-dead", None),
        VolumeState::Halted { reason, .. } => ("halted", Some(reason.clone())),
    };
    VolumeView {
        name: record.name.clone(),
        owner: Some(record.owner.clone()),
        owner_alive: Some(owner.is_some()),
        owner_tag: Some(record.owner_tag),
        size: Some(record.size),
        state: state.into(),
        halted_reason: reason,
        dtl_mode: Some(record.dtl_mode.as_str().into()),
        dtl_node: record.dtl_node.clone(),
        dtl_addr: dtl
            .map(|n| n.dtl_addr.clone())
            .or_else(|| record.dtl_addr.clone()),
        // A halted volume is served nowhere, whoever the record names.
        nbd_uri: owner
            .filter(|_| record.state == VolumeState::Serving)
            .map(|n| format!("nbd://{}/{}", n.nbd_addr, record.name)),
        ..VolumeView::default()
    }
}

fn by_name(nodes: Vec<NodeRecord>) -> BTreeMap<String, NodeRecord> {
    nodes.into_iter().map(|n| (n.name.clone(), n)).collect()
}

/// Whether `request` is `GET /v1/volumes/{name}` (volume info).
fn is_info(request: &Request, name: &str) -> bool {
    request.method() == axum::http::Method::GET
        && request.uri().path().trim_end_matches('/') == format!("/v1/volumes/{name}")
}

/// The volume name of a `/v1/volumes/{name}…` path.
fn volume_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/volumes/")?;
    let name = rest.split('/').next()?;
    (!name.is_empty()).then_some(name)
}

/// Middleware: send requests for a volume another node owns to that node.
pub async fn route_to_owner(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(cluster) = state.cluster.clone() else {
        return next.run(request).await;
    };
    let path = request.uri().path().to_string();
    let Some(name) = volume_of(&path).map(str::to_string) else {
        return next.run(request).await;
    };
    if request.method() == axum::http::Method::POST
        && path.trim_end_matches('/') == format!("/v1/volumes/{name}/adopt")
    {
        // Adopting a cluster volume goes through the registry, on the node asked (or on its
        // live owner, which the normal routing below forwards it to).
        let forwarded = request.headers().contains_key(FORWARDED);
        if let Some(answer) = super::move_api::adopt_in_cluster(&state, &name, forwarded).await {
            return answer.into_response();
        }
    }
    if state.manager.names().contains(&name) || state.manager.failed().contains_key(&name) {
        return next.run(request).await;
    }
    if request.headers().contains_key(FORWARDED) {
        // Never forwarded twice. A node that is still adopting the volume it was sent says so
        // (503) rather than "does not exist".
        return match cluster.registry.volume(&name).await {
            Ok(Some(record)) if record.owner == state.node.name => {
                owned_here_not_served(&state, &cluster, &record, Asked::of(&request, &name)).await
            }
            _ => next.run(request).await,
        };
    }
    match owner_route(&state, &cluster, &name, request).await {
        Ok(Route::Local(request)) => next.run(request).await,
        Ok(Route::Answered(response)) => response,
        Err(e) => e.into_response(),
    }
}

/// What a request for a volume this node owns but does not serve asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Asked {
    Info,
    Delete,
    Other,
}

impl Asked {
    fn of(request: &Request, name: &str) -> Self {
        if is_info(request, name) {
            Asked::Info
        } else if request.method() == axum::http::Method::DELETE
            && request.uri().path().trim_end_matches('/') == format!("/v1/volumes/{name}")
        {
            Asked::Delete
        } else {
            Asked::Other
        }
    }
}

/// The registry names this node as the owner but the manager does not serve the volume: it is
/// being adopted (failover, move) or restored, or its adoption failed and the record says it
/// is halted, or the record outlived the volume (a write that took effect after this node gave
/// up on it). A halted volume's info is answered from the record, with the reason, so an
/// operator sees why it is down instead of an endless "retry in a moment"; a delete removes
/// what is left of it (`unserved`), unless an adoption is under way.
async fn owned_here_not_served(
    state: &ApiState,
    cluster: &Arc<Cluster>,
    record: &VolumeRecord,
    asked: Asked,
) -> Response {
    if asked == Asked::Delete {
        return super::unserved::delete(state, cluster, record)
            .await
            .into_response();
    }
    let is_info = asked == Asked::Info;
    let VolumeState::Halted { reason, .. } = &record.state else {
        return being_taken_over(state, &record.name, record.owner_tag).into_response();
    };
    if !is_info {
        return unavailable(format!(
            "volume {} is halted on node {}: {reason}",
            record.name, state.node.name
        ))
        .into_response();
    }
    let live = cluster
        .registry
        .live_nodes()
        .await
        .map(by_name)
        .unwrap_or_default();
    let dtl = record.dtl_node.as_ref().and_then(|n| live.get(n));
    Json(record_view(record, Some(&state.node), dtl)).into_response()
}

/// The registry names this node as the owner but the manager does not serve the volume (yet):
/// it is being adopted (failover, move) or restored.
fn being_taken_over(state: &ApiState, name: &str, tag: u64) -> ApiError {
    unavailable(format!(
        "volume {name} is being taken over by node {} (owner tag {tag}); retry in a moment",
        state.node.name
    ))
}

enum Route {
    Local(Request),
    Answered(Response),
}

async fn owner_route(
    state: &ApiState,
    cluster: &Arc<Cluster>,
    name: &str,
    request: Request,
) -> Result<Route, ApiError> {
    let Some(record) = cluster.registry.volume(name).await? else {
        return Ok(Route::Local(request));
    };
    if record.owner == state.node.name {
        return Ok(Route::Answered(
            owned_here_not_served(state, cluster, &record, Asked::of(&request, name)).await,
        ));
    }
    let live = by_name(cluster.registry.live_nodes().await?);
    let owner_alive = cluster.registry.owner(name).await?.is_some();
    let is_info = is_info(&request, name);
    let Some(owner) = live.get(&record.owner).filter(|_| owner_alive) else {
        if is_info {
            let dtl = record.dtl_node.as_ref().and_then(|n| live.get(n));
            return Ok(Route::Answered(
                Json(record_view(&record, None, dtl)).into_response(),
            ));
        }
        // A halted volume of a dead node: no failover pass adopts it (until its DTL node comes
        // back), so a delete is done here, as its owner would (`unserved`); the record's owner
        // tag decides a race with an adoption.
        let halted = matches!(record.state, VolumeState::Halted { .. });
        if halted && !live.contains_key(&record.owner) && Asked::of(&request, name) == Asked::Delete
        {
            return Ok(Route::Answered(
                super::unserved::delete(state, cluster, &record)
                    .await
                    .into_response(),
            ));
        }
        return Err(unavailable(format!(
            "volume {name}: its owner node {} is dead (owner tag {}); it cannot be managed until it is adopted",
            record.owner, record.owner_tag
        )));
    };
    let method = request.method().to_string();
    let path_and_query = request
        .uri()
        .path_and_query()
        .map_or_else(|| request.uri().path().to_string(), ToString::to_string);
    let body = axum::body::to_bytes(request.into_body(), MAX_FORWARD_BODY)
        .await
        .map_err(|e| bad_request(format!("cannot read the request body: {e}")))?;
    let body = (!body.is_empty()).then(|| body.to_vec());
    let answer = match forward(&owner.api_addr, &method, &path_and_query, body).await {
        Ok(answer) => answer,
        // The owner holds its lease but does not answer (partitioned from this node, or
        // stopped): `volume info` still answers, from the registry, and says so.
        Err(e) if is_info => {
            let dtl = record.dtl_node.as_ref().and_then(|n| live.get(n));
            let mut view = record_view(&record, Some(owner), dtl);
            view.owner_unreachable = Some(e);
            return Ok(Route::Answered(Json(view).into_response()));
        }
        Err(e) => {
            return Err(unavailable(format!(
                "volume {name}: owner node {}: {e}",
                owner.name
            )))
        }
    };
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    Ok(Route::Answered((status, Json(answer.body)).into_response()))
}

/// `GET /v1/volumes` in a cluster: this node's volumes in full, the others from the registry.
pub async fn list(
    state: &ApiState,
    cluster: &Arc<Cluster>,
    local: Vec<VolumeView>,
) -> Result<Vec<VolumeView>, ApiError> {
    let records = cluster.registry.volumes().await?;
    let live = by_name(cluster.registry.live_nodes().await?);
    let mut volumes = local;
    let here: Vec<String> = volumes.iter().map(|v| v.name.clone()).collect();
    for record in records.iter().filter(|r| !here.contains(&r.name)) {
        let owner = if record.owner == state.node.name {
            None
        } else {
            live.get(&record.owner)
        };
        let dtl = record.dtl_node.as_ref().and_then(|n| live.get(n));
        volumes.push(record_view(record, owner, dtl));
    }
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(volumes)
}

/// `POST /v1/volumes` in a cluster.
pub async fn create(
    state: ApiState,
    cluster: &Arc<Cluster>,
    forwarded: bool,
    mut request: CreateRequest,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    if let Some(existing) = cluster.registry.volume(&request.name).await? {
        return Err(RegistryError::VolumeExists {
            volume: request.name,
            owner: existing.owner,
        }
        .into());
    }
    let live = cluster.registry.live_nodes().await?;
    let records = cluster.registry.volumes().await?;
    let target = match &request.node {
        Some(node) => live
            .iter()
            .find(|n| n.name == *node)
            .cloned()
            .ok_or_else(|| conflict(format!("node {node} is not a live node of the cluster")))?,
        None => {
            let mut loads: BTreeMap<String, usize> = BTreeMap::new();
            for record in &records {
                *loads.entry(record.owner.clone()).or_default() += 1;
            }
            placement::least_loaded(&live, &loads)
                .cloned()
                .ok_or_else(|| unavailable("no live node in the cluster"))?
        }
    };
    if target.name != state.node.name {
        if forwarded {
            return Err(conflict(format!(
                "create of volume {} was forwarded to node {} but is meant for node {}",
                request.name, state.node.name, target.name
            )));
        }
        request.node = Some(target.name.clone());
        let body = serde_json::to_vec(&request).map_err(internal)?;
        let what = format!("volume {}", request.name);
        return post_to(&target, "/v1/volumes", body, &what).await;
    }
    if cluster.is_fenced() {
        return Err(unavailable(format!(
            "node {} is fenced (it cannot renew its registry lease); create volume {} elsewhere",
            state.node.name, request.name
        )));
    }
    let (dtl_mode, dtl_addr, dtl_node) = choose_dtl(
        cluster,
        &request.name,
        request.dtl.clone(),
        request.dtl_mode.as_deref(),
        &live,
        &records,
    )?;
    let floor = super::incarnation::floor(&cluster.registry).await?;
    let volume = create_local(&state, &request, dtl_mode, dtl_addr.clone(), floor).await?;
    // Before the record: once it exists the volume can be deleted, and a namesake created
    // after that must find this incarnation in the floor.
    super::incarnation::raise(
        &cluster.registry,
        &request.name,
        volume.config().incarnation,
    )
    .await;
    let value = register(
        &state,
        cluster,
        &request.name,
        volume.info(),
        request.size,
        (dtl_mode, dtl_addr, dtl_node),
    )
    .await?;
    tracing::info!(volume = %request.name, "volume created in the cluster");
    Ok((StatusCode::CREATED, Json(value)))
}

/// POST `body` to `path` on `node` (a create or clone meant for it) and pass its answer on.
async fn post_to(
    node: &NodeRecord,
    path: &str,
    body: Vec<u8>,
    what: &str,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    let answer = forward(&node.api_addr, "POST", path, Some(body))
        .await
        .map_err(|e| unavailable(format!("{what}: node {}: {e}", node.name)))?;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if !status.is_success() {
        let error: ErrorBody = serde_json::from_value(answer.body).unwrap_or_default();
        return Err(ApiError(status, error.error));
    }
    let volume: VolumeView = serde_json::from_value(answer.body).map_err(|e| {
        ApiError(
            StatusCode::BAD_GATEWAY,
            format!(
                "{what}: node {} answered an unexpected body: {e}",
                node.name
            ),
        )
    })?;
    Ok((status, Json(volume)))
}

/// DTL of a new volume: an explicit server, else the placement rule, in the requested (or the
/// cluster's default) mode. Returns (mode, server address, DTL node).
fn choose_dtl(
    cluster: &Arc<Cluster>,
    volume: &str,
    dtl: Option<String>,
    dtl_mode: Option<&str>,
    live: &[NodeRecord],
    records: &[VolumeRecord],
) -> Result<(DtlMode, Option<String>, Option<String>), ApiError> {
    let requested_mode = dtl_mode
        .map(str::parse::<DtlMode>)
        .transpose()
        .map_err(bad_request)?;
    Ok(match (dtl, requested_mode) {
        (_, Some(DtlMode::None)) => (DtlMode::None, None, None),
        (Some(addr), mode) => (mode.unwrap_or(DtlMode::Sync), Some(addr), None),
        (None, mode) => {
            let mut dtls: BTreeMap<String, usize> = BTreeMap::new();
            for node in records.iter().filter_map(|r| r.dtl_node.clone()) {
                *dtls.entry(node).or_default() += 1;
            }
            match placement::dtl_node(&cluster.node, live, &dtls) {
                Some(node) => (
                    mode.unwrap_or(cluster.settings.default_dtl_mode),
                    Some(node.dtl_addr.clone()),
                    Some(node.name.clone()),
                ),
                None if mode.is_some() => {
                    return Err(conflict(format!(
                        "volume {volume}: no live node for its DTL in node {}'s recovery domain or domain",
                        cluster.node.name
                    )))
                }
                None => {
                    tracing::warn!(volume = %volume, "no live node can hold the DTL; the volume has none");
                    (DtlMode::None, None, None)
                }
            }
        }
    })
}

/// Record a volume this node just created (or cloned) in the registry, with its owner key under
/// this node's lease. If the registry refuses, the volume is deleted again: a volume the
/// registry does not know would never fail over. Returns the volume's view.
async fn register(
    state: &ApiState,
    cluster: &Arc<Cluster>,
    name: &str,
    info: vstor_volumedriver::VolumeInfo,
    size: u64,
    (dtl_mode, dtl_addr, dtl_node): (DtlMode, Option<String>, Option<String>),
) -> Result<VolumeView, ApiError> {
    let record = VolumeRecord {
        name: name.to_string(),
        owner: state.node.name.clone(),
        owner_tag: info.owner_tag,
        dtl_node: dtl_node.clone(),
        dtl_addr: if dtl_node.is_some() { None } else { dtl_addr },
        dtl_mode,
        state: VolumeState::Serving,
        size,
        created_at: crate::registry::now_secs(),
    };
    if let Err(e) = cluster
        .registry
        .create_volume(&record, cluster.lease())
        .await
    {
        let landed = matches!(e, RegistryError::Unreachable { .. })
            && created_after_no_answer(cluster, &record).await;
        if !landed {
            let manager = state.manager.clone();
            let vhost = state.vhost.clone();
            let name = name.to_string();
            let _ = tokio::task::spawn_blocking(move || {
                vhost.remove_export(&name);
                manager.delete(&name)
            })
            .await;
            return Err(e.into());
        }
        tracing::warn!(volume = %name, error = %e, "the registry gave no answer to the volume's record, but it was written: the volume is kept");
    }
    let mut value = view(state, info);
    value.dtl_node = dtl_node;
    Ok(value)
}

/// Whether a `create_volume` of `record` that got no answer took effect after all
/// ([`failover_plan::create_landed`](super::failover_plan::create_landed)): the volume must
/// then be kept, or the registry would name this node the owner of a volume it deleted. A
/// registry that answers none of the reads counts as not written.
async fn created_after_no_answer(cluster: &Cluster, record: &VolumeRecord) -> bool {
    super::failover::read_back_after_no_answer(cluster.registry.as_ref(), &record.name)
        .await
        .is_some_and(|now| super::failover_plan::create_landed(now.as_ref(), record))
}

/// `POST /v1/clones` in a cluster: the clone is made by the node that owns its parent (it reads
/// the parent's snapshot), forwarded there if that is another node, and recorded in the
/// registry like a created volume, so it fails over like one.
pub async fn clone(
    state: ApiState,
    cluster: &Arc<Cluster>,
    forwarded: bool,
    request: crate::api::CloneRequest,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    if let Some(existing) = cluster.registry.volume(&request.name).await? {
        return Err(RegistryError::VolumeExists {
            volume: request.name,
            owner: existing.owner,
        }
        .into());
    }
    let parent = request
        .from
        .split_once('@')
        .map_or(request.from.as_str(), |(volume, _)| volume)
        .to_string();
    let live = cluster.registry.live_nodes().await?;
    if let Some(record) = cluster.registry.volume(&parent).await? {
        if record.owner != state.node.name {
            if forwarded {
                return Err(conflict(format!(
                    "clone {} was forwarded to node {}, but its parent {parent} is owned by {}",
                    request.name, state.node.name, record.owner
                )));
            }
            let owner = live
                .iter()
                .find(|n| n.name == record.owner)
                .ok_or_else(|| {
                    unavailable(format!(
                        "clone {}: the owner {} of its parent {parent} is dead; retry once the parent is adopted",
                        request.name, record.owner
                    ))
                })?;
            let body = serde_json::to_vec(&request).map_err(internal)?;
            let what = format!("clone {}", request.name);
            return post_to(owner, "/v1/clones", body, &what).await;
        }
    }
    if cluster.is_fenced() {
        return Err(unavailable(format!(
            "node {} is fenced (it cannot renew its registry lease); clone {} later",
            state.node.name, request.name
        )));
    }
    let records = cluster.registry.volumes().await?;
    let dtl = choose_dtl(
        cluster,
        &request.name,
        request.dtl.clone(),
        request.dtl_mode.as_deref(),
        &live,
        &records,
    )?;
    let floor = super::incarnation::floor(&cluster.registry).await?;
    let (volume, cloned_from) =
        crate::api::clone_local(&state, &request, dtl.0, dtl.1.clone(), floor).await?;
    super::incarnation::raise(
        &cluster.registry,
        &request.name,
        volume.config().incarnation,
    )
    .await;
    let info = volume.info();
    let size = info.size;
    let mut value = register(&state, cluster, &request.name, info, size, dtl).await?;
    tracing::info!(volume = %request.name, from = %cloned_from, "clone created in the cluster");
    value.cloned_from = Some(cloned_from);
    Ok((StatusCode::CREATED, Json(value)))
}

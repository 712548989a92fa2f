//! The OpenAPI 3.1 document of the node's management API, served at `GET /v1/openapi.json`.
//!
//! Built with utoipa (the maintained, de-facto standard OpenAPI generator for axum) from the
//! request and response types the server and the CLI share (`src/api_types.rs`): the schemas
//! are derived from the very structs that are serialized, so they cannot drift. The routes are
//! listed here once, as the stubs below (the handlers stay plain axum functions); a test asks
//! the running daemon for every path of the document and checks that each is routed.
#![allow(dead_code)] // the stubs only carry the `#[utoipa::path]` descriptions

use utoipa::OpenApi;

#[allow(unused_imports)]
use crate::api_types::{
    CloneRequest, CreateRequest, ErrorBody, Health, MoveRequest, NodeView, OsdView,
    RegistryReachable, ResizeRequest, RollbackRequest, ScrubAnswer, ScrubRequest, SnapshotDeleted,
    SnapshotRequest, SnapshotUnexported, SnapshotView, TakeoverRequest, UpdateRequest,
    VolumeDeleted, VolumeStats, VolumeView,
};

#[utoipa::path(
    get,
    path = "/v1/volumes/{name}/stats",
    tag = "volumes",
    summary = "Cumulative request counters and latency histograms (`vstor volume stats`, `vstor top`).",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, body = VolumeStats), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_stats() {}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "node",
    summary = "Prometheus metrics (OpenMetrics text): per-volume latency histograms, I/O, write buffer, DTL, uploads, scrub, MDS; process CPU and memory.",
    responses((status = 200, body = String, content_type = "application/openmetrics-text"), (status = "5XX", body = ErrorBody))
)]
fn metrics() {}

#[utoipa::path(
    get,
    path = "/v1/osds",
    tag = "node",
    summary = "The erasure-coded tier's OSDs as this node sees them (empty without `--backend ec`).",
    responses((status = 200, body = Vec<OsdView>), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn osds() {}

#[utoipa::path(
    get,
    path = "/v1/health",
    tag = "node",
    summary = "The node's name and, in a cluster, its health. The one call that never needs the API token.",
    security(()),
    responses((status = 200, body = Health), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn health() {}

#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "node",
    summary = "This document.",
    responses((status = 200, body = Object), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn openapi() {}

#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "node",
    summary = "The cluster's nodes (one in the single-node default).",
    responses((status = 200, body = Vec<NodeView>), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn nodes() {}

#[utoipa::path(
    get,
    path = "/v1/cluster/registry",
    tag = "node",
    summary = "Whether this node reaches the registry now (asked by peers).",
    responses((status = 200, body = RegistryReachable), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn registry() {}

#[utoipa::path(
    get,
    path = "/v1/volumes",
    tag = "volumes",
    summary = "Every volume (in a cluster: of the cluster, with its owner).",
    responses((status = 200, body = Vec<VolumeView>), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_list() {}

#[utoipa::path(
    post,
    path = "/v1/volumes",
    tag = "volumes",
    summary = "Create a thin volume (201), optionally with an NBD allow list (allow_subjects, allow_networks) and encryption at rest (encryption_key_file, a path on the serving node).",
    request_body = CreateRequest,
    responses((status = 201, body = VolumeView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_create() {}

#[utoipa::path(
    get,
    path = "/v1/volumes/{name}",
    tag = "volumes",
    summary = "A volume's state and counters; a failed volume's reason.",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_info() {}

#[utoipa::path(
    patch,
    path = "/v1/volumes/{name}",
    tag = "volumes",
    summary = "Change read-only, the DTL or the NBD allow list (each given list replaces the current one; [] empties it).",
    params(("name" = String, Path, description = "volume name")),
    request_body = UpdateRequest,
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_update() {}

#[utoipa::path(
    delete,
    path = "/v1/volumes/{name}",
    tag = "volumes",
    summary = "Delete a volume and its backend data.",
    params(("name" = String, Path, description = "volume name"), ("force" = Option<bool>, Query, description = "disconnect clients first")),
    responses((status = 200, body = VolumeDeleted), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_delete() {}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/resize",
    tag = "volumes",
    summary = "Grow a volume.",
    params(("name" = String, Path, description = "volume name")),
    request_body = ResizeRequest,
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_resize() {}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/adopt",
    tag = "volumes",
    summary = "Take over a volume whose node died.",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_adopt() {}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/restart",
    tag = "volumes",
    summary = "Restart a halted volume, or one that failed to restart, once its cause is gone.",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_restart() {}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/move",
    tag = "cluster",
    summary = "Move a volume to another node.",
    params(("name" = String, Path, description = "volume name")),
    request_body = MoveRequest,
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_move() {}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/takeover",
    tag = "cluster",
    summary = "Node to node: take over a moved volume.",
    params(("name" = String, Path, description = "volume name")),
    request_body = TakeoverRequest,
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_takeover() {}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/scrub",
    tag = "volumes",
    summary = "Scrub a volume (body optional).",
    params(("name" = String, Path, description = "volume name")),
    request_body(content = ScrubRequest, description = "optional: the body may be left out"),
    responses((status = 200, body = ScrubAnswer), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_scrub() {}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/template",
    tag = "snapshots",
    summary = "Make a volume a read-only template.",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn volume_template() {}

#[utoipa::path(
    get,
    path = "/v1/volumes/{name}/snapshots",
    tag = "snapshots",
    summary = "A volume's snapshots, oldest first.",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, body = Vec<SnapshotView>), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn snapshot_list() {}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/snapshots",
    tag = "snapshots",
    summary = "Snapshot a volume (201).",
    params(("name" = String, Path, description = "volume name")),
    request_body = SnapshotRequest,
    responses((status = 201, body = SnapshotView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn snapshot_create() {}

#[utoipa::path(
    get,
    path = "/v1/volumes/{name}/snapshots/{snap}",
    tag = "snapshots",
    summary = "One snapshot.",
    params(("name" = String, Path, description = "volume name"), ("snap" = String, Path, description = "snapshot name")),
    responses((status = 200, body = SnapshotView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn snapshot_info() {}

#[utoipa::path(
    delete,
    path = "/v1/volumes/{name}/snapshots/{snap}",
    tag = "snapshots",
    summary = "Delete a snapshot.",
    params(("name" = String, Path, description = "volume name"), ("snap" = String, Path, description = "snapshot name")),
    responses((status = 200, body = SnapshotDeleted), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn snapshot_delete() {}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/snapshots/{snap}/rollback",
    tag = "snapshots",
    summary = "Roll a volume back (body optional).",
    params(("name" = String, Path, description = "volume name"), ("snap" = String, Path, description = "snapshot name")),
    request_body(content = RollbackRequest, description = "optional: the body may be left out"),
    responses((status = 200, body = VolumeView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn snapshot_rollback() {}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/snapshots/{snap}/export",
    tag = "snapshots",
    summary = "Serve a snapshot read-only over vhost-user.",
    params(("name" = String, Path, description = "volume name"), ("snap" = String, Path, description = "snapshot name")),
    responses((status = 200, body = SnapshotView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn snapshot_export() {}

#[utoipa::path(
    delete,
    path = "/v1/volumes/{name}/snapshots/{snap}/export",
    tag = "snapshots",
    summary = "Stop serving a snapshot over vhost-user.",
    params(("name" = String, Path, description = "volume name"), ("snap" = String, Path, description = "snapshot name")),
    responses((status = 200, body = SnapshotUnexported), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn snapshot_unexport() {}

#[utoipa::path(
    post,
    path = "/v1/clones",
    tag = "snapshots",
    summary = "Clone a snapshot or a template (201).",
    request_body = CloneRequest,
    responses((status = 201, body = VolumeView), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody))
)]
fn clone_create() {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "vstor management API",
        description = "Volumes, snapshots, clones and the cluster of a vstor node. Every error is `{\"error\": \"...\"}` with its HTTP status. A node started with an API token (`--api-token-file`) answers every call but `GET /v1/health` with 401 and `WWW-Authenticate: Bearer` unless it carries `Authorization: Bearer TOKEN`."
    ),
    modifiers(&BearerToken),
    security(("api_token" = [])),
    paths(
        health,
        openapi,
        nodes,
        registry,
        volume_list,
        volume_create,
        volume_info,
        volume_update,
        volume_delete,
        volume_resize,
        volume_adopt,
        volume_restart,
        volume_move,
        volume_takeover,
        volume_scrub,
        volume_template,
        volume_stats,
        metrics,
        osds,
        snapshot_list,
        snapshot_create,
        snapshot_info,
        snapshot_delete,
        snapshot_rollback,
        snapshot_export,
        snapshot_unexport,
        clone_create
    )
)]
struct ApiDoc;

/// The `api_token` security scheme: HTTP bearer (the content of the node's token file).
struct BearerToken;

impl utoipa::Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The content of the node's --api-token-file; required when the node has one",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document (built on each request: it is small and asked for rarely).
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

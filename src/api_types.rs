//! The management API's request and response types, shared by the server (`src/api.rs`,
//! `src/cluster/*`, `src/edge_host/api.rs`) and the CLI (`src/client.rs`): one definition of
//! every JSON body, so the CLI never reads an answer by string keys and the OpenAPI document
//! (`GET /v1/openapi.json`, built here with utoipa from these same types) cannot drift from
//! what is really exchanged.
//!
//! Answers are read leniently (`#[serde(default)]`: a field a newer or older daemon does not
//! send is absent, not an error); requests are strict (`deny_unknown_fields`: a misspelt field
//! is a 422, not silently ignored).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error the API answers: `{"error": "..."}` with the HTTP status saying which kind:
/// 400 malformed request (bad JSON syntax, bad query, bad value), 404 no such volume, snapshot
/// or route, 405 wrong method, 409 conflict, 413 body too large, 415 not `application/json`,
/// 422 well-formed JSON of the wrong shape (missing or unknown field, wrong type), 500, 502
/// (DTL), 503 (halted, fenced, owner unreachable).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

// ---- requests ----

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    /// Bytes, a multiple of 4 KiB.
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sco_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_buffer: Option<u64>,
    /// `sync`, `async` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_mode: Option<String>,
    /// DTL server `host:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl: Option<String>,
    /// Cluster only: the node that serves the new volume [default: the least-loaded live node].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The EC tier's preset for the volume's namespace (`--backend ec` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// NBD allow list: client-certificate subject CNs (see `docs/security.md`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_subjects: Option<Vec<String>>,
    /// NBD allow list: source networks, CIDR (`10.0.0.0/8`, `fd00::/64`) or a bare address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_networks: Option<Vec<String>>,
    /// Encrypt the volume at rest (AES-256-XTS) with the key in this file: an absolute path
    /// on the node that serves the volume, read there at every open. The key never travels
    /// through the API and is never stored; see `docs/security.md`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_key_file: Option<String>,
}

/// `POST /v1/volumes/{name}/resize`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    pub size: u64,
}

/// `PATCH /v1/volumes/{name}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl: Option<String>,
    /// Replaces the subject list when given (`[]` empties it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_subjects: Option<Vec<String>>,
    /// Replaces the network list when given (`[]` empties it); CIDR or a bare address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_networks: Option<Vec<String>>,
}

/// `POST /v1/volumes/{name}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub name: String,
}

/// Query of `DELETE /v1/volumes/{name}` and `DELETE /v1/attachments/{volume}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceQuery {
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/volumes/{name}/snapshots/{snap}/rollback` (body optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/volumes/{name}/scrub` (body optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScrubRequest {
    /// Bytes copied per second at most; absent or 0: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
}

/// `POST /v1/clones`; also forwarded by a cluster node to the node that owns the parent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    pub name: String,
    /// `VOLUME@SNAPSHOT`, or a template volume (its newest snapshot).
    pub from: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_buffer: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_secs: Option<u64>,
}

/// `POST /v1/volumes/{name}/move`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// `POST /v1/volumes/{name}/takeover` (node to node).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TakeoverRequest {
    pub from: String,
    pub expected_tag: u64,
}

/// `POST /v1/attachments` (edge API).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    pub volume: String,
}

// ---- answers ----

/// `GET /v1/health`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Health {
    pub status: String,
    pub node: String,
    /// Cluster only: `healthy`, `registry_down` or `fenced`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_health: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fenced_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<String>>,
}

/// `GET /v1/cluster/registry`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct RegistryReachable {
    pub node: String,
    pub reachable: bool,
}

/// A running scrub's progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ScrubProgress {
    pub phase: String,
    pub done: u64,
    pub total: u64,
}

/// What a scrub did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ScrubReport {
    pub tlogs_before: usize,
    pub tlogs_after: usize,
    pub scos_rewritten: u64,
    pub scos_deleted: u64,
    pub bytes_copied: u64,
    pub bytes_freed: u64,
    pub orphans_deleted: u64,
}

impl From<vstor_volumedriver::ScrubReport> for ScrubReport {
    fn from(r: vstor_volumedriver::ScrubReport) -> Self {
        Self {
            tlogs_before: r.tlogs_before,
            tlogs_after: r.tlogs_after,
            scos_rewritten: r.scos_rewritten,
            scos_deleted: r.scos_deleted,
            bytes_copied: r.bytes_copied,
            bytes_freed: r.bytes_freed,
            orphans_deleted: r.orphans_deleted,
        }
    }
}

/// The last scrub's outcome (`last_scrub`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ScrubOutcome {
    /// What started it: `api` or `auto`.
    pub trigger: String,
    /// Unix seconds when it ended.
    pub finished: u64,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<ScrubReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The volume's garbage estimate when the scrub ended: what the writes made while it ran.
    pub garbage_after: u64,
    /// A background scrub that ended with `garbage_after` at or above `[scrub]
    /// garbage_threshold`: the scrubber does not keep up with the writes (raise `[scrub] rate`).
    pub behind: bool,
}

/// `POST /v1/volumes/{name}/scrub`: the report of the scrub the request ran.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ScrubAnswer {
    pub volume: String,
    pub seconds: f64,
    #[serde(flatten)]
    pub report: ScrubReport,
}

/// The last adoption (failover or move) of a volume this node made.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(default)]
pub struct FailoverRecord {
    /// The node that died (or, for a move, the node that released the volume).
    pub from: String,
    pub to: String,
    /// Why: `failover` (the owner died), `move` or `move-back` (a `volume move`, or its undoing
    /// after the target failed), `operator` (`volume adopt`), `dtl-back` (a halted volume whose
    /// DTL node came back) or `unserved` (the registry named this node the owner of a volume
    /// nothing here served).
    pub kind: String,
    /// Seconds since the Unix epoch when the volume served again.
    pub at: u64,
    /// From the death being seen here to the volume serving again, milliseconds.
    pub adopt_ms: u64,
    pub owner_tag: u64,
    pub dtl_entries_replayed: u64,
}

/// A volume as `GET /v1/volumes[/{name}]` and every verb that changes one answer it. A volume
/// this node serves has every field of the engine's counters; a failed or moved one (in lists),
/// or one answered from the cluster registry (its owner is elsewhere or dead), only some: the
/// others are absent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct VolumeView {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sco_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tlog_scos: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_buffer: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// NBD allow list (both empty: every client); see `docs/security.md`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_subjects: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_networks: Option<Vec<String>>,
    /// Encryption at rest: `aes-256-xts`, absent for a plaintext volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    /// The encryption key's fingerprint (not secret: it identifies the key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_key_fingerprint: Option<String>,
    /// The key file on the serving node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_key_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_tag: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<u64>,
    /// `running`, `halted`, `stopped`, `fenced`, `adopting` (failover under way); in lists also `failed` or `moved`; from a
    /// cluster record `serving`, `owner-dead` or `halted`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halted_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fenced: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_sco_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_uploaded_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disposable_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_queue: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tlogs_on_backend: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttling: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttled_writes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reads: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flushes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discards: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_reads: Option<u64>,
    /// Backend reads the node's read cache answered instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_hits: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evicted_scos: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploaded_scos: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploaded_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_rate: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploaded_tlogs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_errors: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_upload_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_in_sync: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_backlog_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_degradations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub children: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub garbage_bytes: Option<u64>,
    /// At the last restart or adoption: backend TLogs whose map was loaded from an MDS table,
    /// and TLogs replayed from the backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opened_from_mds_tlogs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opened_replayed_tlogs: Option<u64>,
    /// At the last restart or adoption: microseconds spent loading the map (MDS seed and
    /// replay), before the DTL replay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opened_in_us: Option<u64>,
    /// The volume's metadata servers as the node last checked them (`vstor serve --mds`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mds: Option<MdsStatus>,
    /// The node that serves it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd_uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_connected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrub_progress: Option<ScrubProgress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_scrub: Option<ScrubOutcome>,
    /// Cluster: the node holding its DTL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_node: Option<String>,
    /// From the registry: whether the owner holds its lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_alive: Option<bool>,
    /// From the registry: why the live owner did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_unreachable: Option<String>,
    /// A volume moved away from this node: where to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    /// Template set: the snapshot clones are made from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template_snapshot: Option<SnapshotView>,
    /// Clone create: `PARENT@SNAPSHOT`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloned_from: Option<String>,
    /// Rollback: the snapshot rolled back to and those dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots_dropped: Option<Vec<String>>,
    /// Rollback, move: clients cut.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd_clients_disconnected: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_frontend_disconnected: Option<bool>,
    /// Adopt: DTL entries replayed and held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_entries_replayed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtl_entries_held: Option<u64>,
    /// Move: the node it was moved from and how long it took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub move_ms: Option<u64>,
}

impl From<vstor_volumedriver::VolumeInfo> for VolumeView {
    fn from(info: vstor_volumedriver::VolumeInfo) -> Self {
        Self {
            name: info.name,
            namespace: Some(info.namespace),
            size: Some(info.size),
            cluster_size: Some(info.cluster_size),
            sco_size: Some(info.sco_size),
            tlog_scos: Some(info.tlog_scos),
            write_buffer: Some(info.write_buffer),
            read_only: Some(info.read_only),
            allow_subjects: Some(info.access.allow_subjects.clone()),
            allow_networks: Some(
                info.access
                    .allow_networks
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
            encryption: info.encryption,
            encryption_key_fingerprint: info.encryption_key_fingerprint,
            encryption_key_file: info.encryption_key_file,
            owner_tag: Some(info.owner_tag),
            created: Some(info.created),
            state: info.state,
            halted_reason: info.halted_reason,
            fenced: info.fenced,
            written_bytes: Some(info.written_bytes),
            map_memory_bytes: Some(info.map_memory_bytes),
            local_sco_bytes: Some(info.local_sco_bytes),
            not_uploaded_bytes: Some(info.not_uploaded_bytes),
            disposable_bytes: Some(info.disposable_bytes),
            upload_queue: Some(info.upload_queue),
            tlogs_on_backend: Some(info.tlogs_on_backend),
            throttling: Some(info.throttling),
            throttled_writes: Some(info.throttled_writes),
            throttle_ms: Some(info.throttle_ms),
            reads: Some(info.reads),
            writes: Some(info.writes),
            read_bytes: Some(info.read_bytes),
            write_bytes: Some(info.write_bytes),
            flushes: Some(info.flushes),
            discards: Some(info.discards),
            backend_reads: Some(info.backend_reads),
            cache_hits: Some(info.cache_hits),
            evicted_scos: Some(info.evicted_scos),
            uploaded_scos: Some(info.uploaded_scos),
            uploaded_bytes: Some(info.uploaded_bytes),
            upload_rate: Some(info.upload_rate),
            uploaded_tlogs: Some(info.uploaded_tlogs),
            upload_errors: Some(info.upload_errors),
            last_upload_error: info.last_upload_error,
            dtl_mode: Some(info.dtl_mode),
            dtl_addr: info.dtl_addr,
            dtl_state: Some(info.dtl_state),
            dtl_in_sync: Some(info.dtl_in_sync),
            dtl_backlog_bytes: Some(info.dtl_backlog_bytes),
            dtl_degradations: Some(info.dtl_degradations),
            dtl_last_error: info.dtl_last_error,
            backend_bytes: Some(info.backend_bytes),
            parent: info.parent,
            children: info.children,
            template: Some(info.template),
            snapshots: Some(info.snapshots),
            garbage_bytes: Some(info.garbage_bytes),
            opened_from_mds_tlogs: Some(info.opened_from_mds_tlogs),
            opened_replayed_tlogs: Some(info.opened_replayed_tlogs),
            opened_in_us: Some(info.opened_in_us),
            ..Self::default()
        }
    }
}

/// A snapshot (`GET /v1/volumes/{name}/snapshots[/{snap}]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct SnapshotView {
    pub name: String,
    pub volume: String,
    /// Unix seconds.
    pub created: u64,
    /// Bytes written between the previous snapshot and this one.
    pub written_bytes: u64,
    /// Every TLog of the snapshot is on the backend (it can be cloned and exported).
    pub in_backend: bool,
    pub clones: Vec<String>,
    pub size: u64,
    pub tlog: u64,
    pub nbd_uri: String,
    pub nbd_connections: usize,
    /// Set while the snapshot is exported over vhost-user.
    pub vhost_socket: Option<String>,
    pub vhost_connected: bool,
}

/// `DELETE /v1/volumes/{name}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct VolumeDeleted {
    pub deleted: String,
    pub nbd_clients_disconnected: usize,
    pub vhost_frontend_disconnected: bool,
    /// What of a volume its node did not serve (halted there, or a leftover record) could not
    /// be removed once its cluster record was gone, each with the reason; empty otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_behind: Vec<String>,
}

/// `DELETE /v1/volumes/{name}/snapshots/{snap}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct SnapshotDeleted {
    pub volume: String,
    pub deleted: String,
}

/// `DELETE /v1/volumes/{name}/snapshots/{snap}/export`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct SnapshotUnexported {
    pub volume: String,
    pub snapshot: String,
    pub vhost_socket: Option<String>,
}

/// A node (`GET /v1/nodes`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct NodeView {
    pub name: String,
    pub domain: String,
    pub recovery_domain: Option<String>,
    pub api_addr: String,
    pub nbd_addr: String,
    pub dtl_addr: String,
    pub edge_addr: Option<String>,
    /// Its unix socket for edges on its host (`vstor serve --edge-socket`).
    pub edge_socket: Option<String>,
    pub started_at: u64,
    pub version: String,
    /// Its lease is alive.
    pub alive: bool,
    /// Volumes whose record names it as owner.
    pub volumes: usize,
}

/// The edge's `GET /v1/health`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct EdgeHealth {
    pub edge: String,
    pub nbd_addr: String,
}

/// A volume attached to an edge (`GET /v1/attachments`, `POST /v1/attachments`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Attachment {
    pub volume: String,
    pub owner: Option<String>,
    pub owner_addr: Option<String>,
    pub tag: u64,
    /// `connected`, `reconnecting`, `failed` or `closed`.
    pub state: String,
    pub size: u64,
    pub read_only: bool,
    pub dtl_in_sync: bool,
    pub reconnects: u64,
    pub inflight: usize,
    pub resubmitted: u64,
    pub completed: u64,
    pub failed: u64,
    pub latency_mean_us: Option<u64>,
    pub latency_p50_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
    pub socket: String,
    pub nbd_uri: String,
    pub nbd_clients: usize,
    pub vhost_connected: bool,
    /// The volume's NBD allow list in force on this edge, as its owner last sent it: client
    /// networks (CIDR) and client-certificate subjects. Both empty: every client.
    pub allow_networks: Vec<String>,
    pub allow_subjects: Vec<String>,
}

/// `DELETE /v1/attachments/{volume}` (edge API).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Detached {
    pub volume: String,
    pub edge: String,
    pub nbd_clients_disconnected: usize,
    pub vhost_frontend_disconnected: bool,
}

/// A volume's metadata servers: the master its owner feeds, the slaves following the backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MdsStatus {
    pub master: String,
    /// Master first.
    pub servers: Vec<MdsServerStatus>,
    /// The backend TLogs the servers were compared with at `checked_at` (each one's `behind`
    /// counts out of these). Equal to the volume's `tlogs_on_backend` once the check saw the
    /// latest list.
    #[serde(default)]
    pub backend_tlogs: u64,
    /// Times a slave was promoted for this volume.
    pub promotions: u64,
    /// When the node last checked them (seconds since the epoch).
    pub checked_at: u64,
    /// What is wrong, if anything (e.g. a dead master no slave could replace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One MDS of a volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MdsServerStatus {
    pub addr: String,
    /// `master` or `slave`.
    pub role: String,
    pub reachable: bool,
    /// Backend TLogs its table lacks (absent: unknown, no table, or a history that needs a
    /// full rebuild).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behind: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A volume's cumulative request counters and latency histograms
/// (`GET /v1/volumes/{name}/stats`); two of them give rates and percentiles.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeStats {
    pub name: String,
    /// When it was taken, milliseconds since the epoch.
    pub at_ms: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Upper bounds of the latency buckets, seconds; a last bucket takes the rest.
    pub bounds_seconds: Vec<f64>,
    /// One histogram per operation (`read`, `write`, `flush`, `discard`).
    pub latency: Vec<OpLatency>,
}

/// One operation's latency histogram: per-bucket counts (not cumulative).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OpLatency {
    pub op: String,
    pub buckets: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

/// An OSD of the erasure-coded tier as the node's tier map sees it (`GET /v1/osds`; empty on a
/// node without `--backend ec`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OsdView {
    pub id: u64,
    pub addr: String,
    pub domain: String,
    /// `up`, `down`, `draining` or `out`.
    pub state: String,
    /// Up and taking new fragments (not draining, out or full).
    pub writable: bool,
}

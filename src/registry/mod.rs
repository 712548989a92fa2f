//! The cluster registry: which nodes exist and are alive, which node owns which volume under
//! which owner tag, where each volume's DTL lives, and the cluster's settings.
//!
//! One trait, [`Registry`], two implementations:
//! - [`local::LocalRegistry`]: the embedded single-node default (no `--registry`). One node, its
//!   records in a checksummed file under the data directory; leases never expire while the
//!   process runs (the process *is* the node).
//! - [`etcd::EtcdRegistry`]: `--registry etcd://HOST:PORT[,HOST:PORT…]` (or `etcd+https://…` for
//!   TLS, with `--etcd-ca/--etcd-cert/--etcd-key/--etcd-user`), the multi-node cluster.
//!
//! # Liveness, ownership and fencing
//! A node is alive while its **lease** is: it registers under a lease of `lease_ttl` and renews
//! it about every second. A volume's **owner key** is held under its owner's lease, so when the
//! owner dies (or is partitioned from etcd) the key disappears after the TTL, on its own, and
//! survivors see the volume is orphaned. The persistent [`VolumeRecord`] carries the **owner
//! tag**, the fencing token the backend and the DTL enforce: every change of owner goes through
//! [`Registry::take_ownership`], one compare-and-swap transaction that bumps the tag and moves the
//! owner key under the new owner's lease, so two nodes racing for a volume can never both win.
//! Writes of a record that depend on its owner (`set_dtl`, `set_state`, `delete_volume`,
//! `refresh_owner`) are conditional on the caller's tag: a node that lost a volume cannot change
//! its record any more.
//!
//! # etcd key layout (prefix `/vstor/`, values JSON)
//! | key                       | value            | lease        | written by |
//! |---------------------------|------------------|--------------|------------|
//! | `/vstor/settings`         | [`ClusterSettings`] | none      | operator / first node (defaults when absent) |
//! | `/vstor/nodes/{node}`     | [`NodeRecord`]   | none         | [`Registry::register_node`]: the member list, dead nodes included |
//! | `/vstor/live/{node}`      | [`NodeRecord`]   | node's       | [`Registry::register_node`]: present while the node is alive |
//! | `/vstor/volumes/{volume}` | [`VolumeRecord`] | none         | create, take_ownership, set_dtl, set_state, delete |
//! | `/vstor/owners/{volume}`  | [`OwnerRecord`]  | owner's      | create, take_ownership, refresh_owner; gone when the owner's lease ends |
//! | `/vstor/edges/{edge}`     | [`EdgeRecord`]   | edge's       | [`Registry::register_edge`]: present while the `vstor edge` process lives |
//! | `/vstor/attachments/{volume}` | list of [`Attachment`] | none | [`Registry::attach`] / [`Registry::detach`], compare-and-swap (rule in [`edges`]) |
//! | `/vstor/incarnation`      | number           | none         | volume create and clone: the highest incarnation issued, only raised (`crate::cluster::incarnation`) |
//!
//! Values are JSON, not a binary envelope: etcd already checksums and replicates what it stores,
//! and JSON keeps `etcdctl get --prefix /vstor/` readable during an incident. Unknown fields are
//! ignored and new ones carry serde defaults, so a newer node can add fields without breaking an
//! older one.
//!
//! # I/O never waits on the registry
//! Only management (create, delete, ownership changes, listings) calls the registry. The data
//! path never does: a node whose registry is unreachable keeps serving its volumes unless the
//! self-fencing monitor (`crate::cluster::fencing`) decides it is partitioned. Every registry
//! call is bounded by a timeout, so an unreachable etcd gives an error, never a hang.

#[cfg(test)]
mod contract_tests;
pub mod edges;
pub mod etcd;
pub mod local;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use vstor_volumedriver::DtlMode;

pub use edges::{Attachment, EdgeRecord};

/// An etcd lease id (the local registry hands out its own).
pub type LeaseId = i64;

/// Everything the cluster knows about one node; advertised by the node when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Unique node name (`--node`).
    pub name: String,
    /// Failure domain the node lives in (`--domain`), e.g. a rack or a room.
    pub domain: String,
    /// Domain where this node's volumes keep their DTL (`--recovery-domain`); `None`: the
    /// node's own domain (still never the node itself).
    #[serde(default)]
    pub recovery_domain: Option<String>,
    /// Management API, `host:port` (other nodes forward requests there).
    pub api_addr: String,
    /// NBD server, `host:port`.
    pub nbd_addr: String,
    /// The node's DTL server, `host:port` (other nodes' volumes mirror their writes there).
    pub dtl_addr: String,
    /// The node's edge-protocol listener, `host:port` (`vstor serve --edge-listen`); `None`:
    /// it serves no edges.
    #[serde(default)]
    pub edge_addr: Option<String>,
    /// The node's unix socket for edges on its host (`vstor serve --edge-socket`); `None`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_socket: Option<String>,
    /// The node's host (`/etc/machine-id`, see `host_id`), for an edge to tell whether it
    /// shares it and may use `edge_socket`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// When this registration was made, seconds since the Unix epoch.
    #[serde(default)]
    pub started_at: u64,
    /// vstor version of the node.
    #[serde(default)]
    pub version: String,
}

/// A node as `vstor node list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub record: NodeRecord,
    /// Its lease is alive.
    pub alive: bool,
    /// Volumes whose record names it as owner.
    pub volumes: usize,
}

/// What [`Registry::watch_nodes`] reports.
#[allow(dead_code)] // Consumed by the failover layer (part B of issue 10) and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// The complete set of live nodes. Sent first, and again whenever the watch had to be
    /// re-established (events may have been missed then): the receiver replaces its view.
    Live(Vec<NodeRecord>),
    /// A node registered (joined, or came back with a new lease).
    Up(Box<NodeRecord>),
    /// A node's lease ended: it died, was partitioned from the registry, or stopped cleanly.
    Down(String),
}

/// What [`Registry::watch_volume`] reports: which of a volume's keys was written or deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeChange {
    /// The volume record (owner, tag, DTL, state; created or deleted).
    Record,
    /// The owner key: put by an owner, gone with its lease.
    Owner,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl: Duration,
}

/// Outcome of one [`Registry::keep_alive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Renewed: the lease now lives `ttl` from when the registry answered.
    Renewed { ttl: Duration },
    /// The lease is gone (it expired or was revoked): everything under it is gone too. The node
    /// must register again, with a new lease.
    Expired,
}

/// Whether a volume serves I/O.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum VolumeState {
    #[default]
    Serving,
    /// Not serving (unrecoverable, or stopped by the cluster) until an operator adopts it, or
    /// its DTL node comes back after the halt (the failover sweep then adopts it again).
    Halted {
        reason: String,
        /// When it halted (ms since the epoch; 0 in records written before this field).
        #[serde(default)]
        at_ms: u64,
    },
}

/// A volume's persistent record (not under a lease: it outlives its owner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    /// Node that owns (serves) the volume.
    pub owner: String,
    /// The owner's fencing token: the tag it claimed the volume's backend namespace with. Only
    /// [`Registry::take_ownership`] changes it (always upwards).
    pub owner_tag: u64,
    /// Node whose DTL server holds the volume's DTL; `None`: no DTL, or an explicit
    /// address outside the cluster (`dtl_addr`).
    #[serde(default)]
    pub dtl_node: Option<String>,
    /// An explicit DTL address given at create time (`--dtl-addr`) instead of a placed node.
    #[serde(default)]
    pub dtl_addr: Option<String>,
    #[serde(default)]
    pub dtl_mode: DtlMode,
    #[serde(flatten)]
    pub state: VolumeState,
    /// Size in bytes at creation (informational; the volume's own config is authoritative).
    #[serde(default)]
    pub size: u64,
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub created_at: u64,
}

/// Value of a volume's owner key: present only while the owner's lease lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub node: String,
    pub tag: u64,
    pub lease: LeaseId,
}

/// Cluster-wide settings, one small JSON document (`/vstor/settings`). Absent fields take the
/// defaults below, so an empty or missing document is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterSettings {
    /// Node lease TTL, seconds: a dead node is noticed within this.
    pub lease_ttl_secs: u64,
    /// How often a node renews its lease, milliseconds.
    pub keepalive_interval_ms: u64,
    /// A node that had no successful renewal for `lease_ttl - fence_margin` checks whether it
    /// is partitioned, and if so stops acknowledging writes: the margin is the time it has to
    /// do so before its lease can expire elsewhere. Milliseconds.
    pub fence_margin_ms: u64,
    /// How long a node waits for its peers' answer to "can you reach the registry?", ms.
    pub peer_probe_timeout_ms: u64,
    /// DTL mode of a new cluster volume when the request names none.
    pub default_dtl_mode: DtlMode,
    /// An OSD down for longer than this counts as out: its fragments are rebuilt elsewhere
    /// (Ceph's `mon_osd_down_out_interval`, also 10 minutes by default). Seconds.
    pub osd_out_grace_secs: u64,
    /// A DTL namespace no client has used for this long, whose volume is gone or has its DTL
    /// elsewhere, is removed by its node (`crate::cluster::dtl_sweep`). Seconds.
    pub dtl_leftover_grace_secs: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            lease_ttl_secs: 5,
            keepalive_interval_ms: 1000,
            fence_margin_ms: 2000,
            peer_probe_timeout_ms: 500,
            default_dtl_mode: DtlMode::Sync,
            osd_out_grace_secs: 600,
            dtl_leftover_grace_secs: 600,
        }
    }
}

impl ClusterSettings {
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs)
    }

    pub fn keepalive_interval(&self) -> Duration {
        Duration::from_millis(self.keepalive_interval_ms)
    }

    /// `lease_ttl - fence_margin`, at least one keepalive interval.
    pub fn fence_after(&self) -> Duration {
        self.lease_ttl()
            .saturating_sub(Duration::from_millis(self.fence_margin_ms))
            .max(self.keepalive_interval())
    }

    pub fn osd_out_grace(&self) -> Duration {
        Duration::from_secs(self.osd_out_grace_secs)
    }

    pub fn dtl_leftover_grace(&self) -> Duration {
        Duration::from_secs(self.dtl_leftover_grace_secs)
    }

    pub fn peer_probe_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_probe_timeout_ms)
    }

    /// Refuse settings that cannot work (the margin must leave time to renew).
    pub fn validate(&self) -> Result<()> {
        let problem = if self.lease_ttl_secs < 2 {
            Some("lease_ttl_secs must be at least 2")
        } else if self.keepalive_interval_ms == 0
            || self.keepalive_interval_ms >= self.lease_ttl_secs * 1000 / 2
        {
            Some("keepalive_interval_ms must be positive and under half the lease TTL")
        } else if self.fence_margin_ms >= self.lease_ttl_secs * 1000 {
            Some("fence_margin_ms must be under the lease TTL")
        } else {
            None
        };
        match problem {
            Some(reason) => Err(RegistryError::InvalidSettings {
                reason: reason.to_string(),
            }),
            None => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach the registry {registry}: {reason}")]
    Unreachable { registry: String, reason: String },
    #[error("node {node} is already registered by a live node (API {api_addr})")]
    NodeAlive { node: String, api_addr: String },
    #[error("volume {volume} already exists in the cluster (owner {owner})")]
    VolumeExists { volume: String, owner: String },
    #[error("volume {volume} is not in the cluster registry")]
    VolumeNotFound { volume: String },
    #[error(
        "volume {volume}: owner tag {expected} is stale, the registry has tag {actual} (owner {owner})"
    )]
    StaleTag {
        volume: String,
        expected: u64,
        actual: u64,
        owner: String,
    },
    #[error("lease {lease:x} has expired")]
    LeaseExpired { lease: LeaseId },
    #[error("registry record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("invalid cluster settings: {reason}")]
    InvalidSettings { reason: String },
    #[error("edge {edge} is already running (host {host}, API {api_addr}); give this one another --name")]
    EdgeAlive {
        edge: String,
        host: String,
        api_addr: String,
    },
    #[error("volume {volume} is attached{} on edge {edge}; detach it there first (a volume is attached on several edges only if it is read-only)", if *read_only { " read-only" } else { " writable" })]
    AttachedElsewhere {
        volume: String,
        edge: String,
        read_only: bool,
    },
    #[error("volume {volume} is not attached on edge {edge}")]
    NotAttached { volume: String, edge: String },
    #[error("registry {op} failed: {reason}")]
    Failed { op: String, reason: String },
    /// The TLS handshake with etcd failed: its certificate is not trusted, or it refused ours.
    #[error("TLS with the registry {registry} failed: {reason}")]
    Tls { registry: String, reason: String },
    /// etcd refused the credentials: wrong user or password, none given, or no permission.
    #[error("the registry {registry} refused access: {reason}")]
    Denied { registry: String, reason: String },
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// The cluster registry (see the module docs for the model and the etcd key layout).
///
/// Async because the daemon is tokio and etcd is a network service; behind `async_trait` because
/// the node holds it as `Arc<dyn Registry>` and native `async fn` in traits is not
/// dyn-compatible. Every method is bounded by the implementation's operation timeout.
// `put_settings`, `watch_nodes`, `take_ownership`, `set_dtl` and `set_state` are the failover
// layer's (part B of issue 10); the contract tests exercise them.
#[allow(dead_code)]
#[async_trait::async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Human-readable location, for messages: `etcd://h:p,h:p` or the local file's path.
    fn describe(&self) -> String;

    /// Whether this registry spans several nodes (etcd) or is the single-node default.
    fn is_cluster(&self) -> bool;

    /// One cheap round trip: `Ok` when the registry answers now.
    async fn ping(&self) -> Result<()>;

    // ---- settings ----

    /// The cluster settings; the defaults when none were stored.
    async fn settings(&self) -> Result<ClusterSettings>;

    /// Store the cluster settings (validated first).
    async fn put_settings(&self, settings: &ClusterSettings) -> Result<()>;

    // ---- nodes ----

    /// Grant a lease of `ttl` and register `node` under it (live key), and write its persistent
    /// member record, in one transaction. Fails with [`RegistryError::NodeAlive`] while another
    /// lease holds the name (a live node, or this node's previous run whose lease has not
    /// expired yet).
    async fn register_node(&self, node: &NodeRecord, ttl: Duration) -> Result<Lease>;

    /// Renew `lease` once.
    async fn keep_alive(&self, lease: LeaseId) -> Result<KeepAlive>;

    /// End `lease` now (clean shutdown): the node's live key and owner keys go with it.
    async fn revoke(&self, lease: LeaseId) -> Result<()>;

    /// Every node ever registered (dead ones included), by name, with liveness and volume count.
    async fn nodes(&self) -> Result<Vec<NodeStatus>>;

    /// The nodes whose lease is alive, by name.
    async fn live_nodes(&self) -> Result<Vec<NodeRecord>>;

    /// Joins and leaves as they happen: first a [`NodeEvent::Live`] snapshot, then `Up`/`Down`
    /// events (and a new `Live` snapshot after the watch was re-established). The stream ends
    /// when the receiver is dropped.
    async fn watch_nodes(&self) -> Result<mpsc::Receiver<NodeEvent>>;

    /// Changes to `volume`'s record and owner key from the moment this returns, one
    /// [`VolumeChange`] per key written or deleted, so a client waiting for a new owner (the
    /// edge) learns of the adoption at once instead of polling. Nothing is replayed: read the
    /// keys after this returns. A receiver that falls behind loses notices (its next read sees
    /// the latest state anyway). The stream ends when the receiver is dropped, or when the
    /// registry cannot follow the keys any more (the caller polls then).
    async fn watch_volume(&self, volume: &str) -> Result<mpsc::Receiver<VolumeChange>>;

    // ---- volumes ----

    /// Create a volume's record and its owner key (under `lease`, the owner's) in one
    /// transaction; [`RegistryError::VolumeExists`] if the record exists.
    async fn create_volume(&self, record: &VolumeRecord, lease: LeaseId) -> Result<()>;

    /// Delete a volume's record and owner key, if its tag is still `tag`
    /// ([`RegistryError::StaleTag`] otherwise, [`RegistryError::VolumeNotFound`] if absent).
    async fn delete_volume(&self, volume: &str, tag: u64) -> Result<()>;

    async fn volume(&self, volume: &str) -> Result<Option<VolumeRecord>>;

    /// Every volume record, by name.
    async fn volumes(&self) -> Result<Vec<VolumeRecord>>;

    // ---- ownership ----

    /// Make `new_owner` the owner of `volume`, if its record's tag is still `expected_tag`: in
    /// ONE transaction, write the record with `owner = new_owner`, `owner_tag =
    /// expected_tag + 1` and state `serving` (an operator's adoption of a halted volume serves
    /// it again) and put the owner key under `lease`. Returns the new tag. Two callers
    /// with the same `expected_tag` can never both succeed; the loser gets
    /// [`RegistryError::StaleTag`]. The caller then claims the backend with the new tag.
    async fn take_ownership(
        &self,
        volume: &str,
        expected_tag: u64,
        new_owner: &str,
        lease: LeaseId,
    ) -> Result<u64>;

    /// Put the owner key again under `lease` (after the node had to register with a new lease),
    /// if the record still names `owner` with `tag`; [`RegistryError::StaleTag`] if the volume
    /// moved meanwhile.
    async fn refresh_owner(
        &self,
        volume: &str,
        owner: &str,
        tag: u64,
        lease: LeaseId,
    ) -> Result<()>;

    /// The volume's owner key: `Some` while its owner's lease is alive, `None` when the owner
    /// is dead (or the volume does not exist).
    async fn owner(&self, volume: &str) -> Result<Option<OwnerRecord>>;

    /// Record the volume's DTL node, if its tag is still `tag`.
    async fn set_dtl(&self, volume: &str, tag: u64, dtl_node: Option<String>) -> Result<()>;

    /// Record whether the volume serves or is halted, if its tag is still `tag`.
    async fn set_state(&self, volume: &str, tag: u64, state: VolumeState) -> Result<()>;

    // ---- edges (see [`edges`]) ----

    /// Grant a lease of `ttl` and register the edge under it; [`RegistryError::EdgeAlive`]
    /// while another lease holds the name. Renewed and revoked like a node's lease.
    async fn register_edge(&self, edge: &EdgeRecord, ttl: Duration) -> Result<Lease>;

    /// The edges whose lease is alive, by name.
    async fn live_edges(&self) -> Result<Vec<EdgeRecord>>;

    /// Every volume's attachments (volumes without any are absent), by volume name.
    async fn attachments(&self) -> Result<Vec<(String, Vec<Attachment>)>>;

    /// Attach `volume` on `edge` by [`edges::attach_rule`], as one compare-and-swap; returns
    /// the new list.
    async fn attach(&self, volume: &str, edge: &str, read_only: bool) -> Result<Vec<Attachment>>;

    /// Remove `edge`'s attachment of `volume` ([`RegistryError::NotAttached`] if it has none).
    async fn detach(&self, volume: &str, edge: &str) -> Result<()>;

    // ---- raw records (the erasure-coded tier's map is built on these: `crate::tier::map`) ----

    /// Grant a lease of `ttl` for records written under it (renew with `keep_alive`).
    async fn grant_lease(&self, ttl: Duration) -> Result<Lease>;

    /// The JSON value of record `key` (relative to the registry's root, e.g. `tier/osds/3`)
    /// and its revision, which changes on every write.
    async fn get_record(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>>;

    /// Every record under `prefix`: (key relative to the prefix, value, revision), by key.
    async fn list_records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>, i64)>>;

    /// Compare-and-swap: if `key`'s revision is still `expected` (0: the key is absent), write
    /// `value` (`None` deletes) under `lease` if given. `false` when the key changed meanwhile.
    async fn swap_record(
        &self,
        key: &str,
        expected: i64,
        value: Option<&[u8]>,
        lease: Option<LeaseId>,
    ) -> Result<bool>;
}

/// The registry URI forms, for messages.
pub const ETCD_URI_FORMS: &str = "etcd://HOST:PORT[,HOST:PORT...] or etcd+https://HOST:PORT[,...]";

/// Parse a registry URI into etcd endpoints; `None` when the string is not an etcd URI:
/// - `etcd://HOST:PORT[,HOST:PORT…]` (or `etcd+http://`): plain gRPC, `http://HOST:PORT`;
/// - `etcd+https://HOST:PORT[,HOST:PORT…]`: TLS, `https://HOST:PORT`, etcd's certificate
///   checked against `--etcd-ca` (or the system's CAs), for the host name or IP address given.
pub fn etcd_endpoints(spec: &str) -> Option<Result<Vec<String>>> {
    let (scheme, rest) = if let Some(rest) = spec.strip_prefix("etcd+https://") {
        ("https://", rest)
    } else if let Some(rest) = spec
        .strip_prefix("etcd://")
        .or_else(|| spec.strip_prefix("etcd+http://"))
    {
        ("http://", rest)
    } else {
        return None;
    };
    let hosts: Vec<&str> = rest
        .split(',')
        .map(str::trim)
        .map(|e| e.trim_end_matches('/'))
        .filter(|e| !e.is_empty())
        .collect();
    let bad = hosts.is_empty()
        || hosts
            .iter()
            .any(|e| !e.contains(':') || e.contains('/') || e.contains("://"));
    Some(if bad {
        Err(RegistryError::Failed {
            op: "parse".into(),
            reason: format!("registry {spec:?} is not {ETCD_URI_FORMS}"),
        })
    } else {
        Ok(hosts.iter().map(|h| format!("{scheme}{h}")).collect())
    })
}

/// Whether parsed endpoints use TLS (`etcd+https://`).
pub fn etcd_uses_tls(endpoints: &[String]) -> bool {
    endpoints.iter().any(|e| e.starts_with("https://"))
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let parsed = etcd_endpoints("etcd://127.0.0.1:2379,10.0.0.2:2379")
            .unwrap()
            .unwrap();
        assert_eq!(parsed, ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert!(etcd_endpoints("/some/dir").is_none());
        assert!(etcd_endpoints("etcd://").unwrap().is_err());
        assert!(etcd_endpoints("etcd://hostonly").unwrap().is_err());
        let tls = etcd_endpoints("etcd+https://a.example:2379, 10.0.0.2:2379/")
            .unwrap()
            .unwrap();
        assert_eq!(tls, ["https://a.example:2379", "https://10.0.0.2:2379"]);
        assert!(etcd_uses_tls(&tls) && !etcd_uses_tls(&parsed));
        assert_eq!(
            etcd_endpoints("etcd+http://h:1").unwrap().unwrap(),
            ["http://h:1"]
        );
        assert!(etcd_endpoints("etcd://https://h:1").unwrap().is_err());
        assert!(etcd_endpoints("https://h:1").is_none());
    }

    #[test]
    fn settings_defaults_and_validation() {
        let settings: ClusterSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(settings, ClusterSettings::default());
        assert_eq!(settings.fence_after(), Duration::from_secs(3));
        settings.validate().unwrap();
        let bad = ClusterSettings {
            fence_margin_ms: 6000,
            ..settings
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn volume_record_json_roundtrip() {
        let record = VolumeRecord {
            name: "v".into(),
            owner: "n1".into(),
            owner_tag: 3,
            dtl_node: Some("n2".into()),
            dtl_addr: None,
            dtl_mode: DtlMode::Sync,
            state: VolumeState::Halted {
                reason: "DTL lost".into(),
                at_ms: 1_700_000_000_000,
            },
            size: 1 << 30,
            created_at: 1,
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains(r#""state":"halted""#), "{json}");
        let back: VolumeRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record);
    }
}

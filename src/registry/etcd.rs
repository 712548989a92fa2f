//! The etcd registry (`--registry etcd://HOST:PORT[,HOST:PORT…]`, or `etcd+https://…` for TLS);
//! key layout in the parent module's docs.
//!
//! Security: with `etcd+https://` the link is TLS (rustls on aws-lc-rs, through tonic), etcd's
//! certificate checked against `--etcd-ca` (default: the system's CAs) for the host dialled, and
//! `--etcd-cert/--etcd-key` presented when etcd runs with `--client-cert-auth`. With
//! `--etcd-user` the client authenticates (etcd's `auth enable`) and sends the token etcd gives
//! on every call; etcd-client renews it when etcd says it expired. See [`EtcdAccess`].
//! Renewed files are picked up without a restart ([`reload_all`], called by the process's
//! credentials check): the client is behind a lock and replaced by a new, checked one.
//!
//! Client: the `etcd-client` crate (etcd's v3 gRPC API over tonic). It gives leases with a
//! keepalive stream, multi-key transactions with compares and watches, everything the cluster
//! needs, as typed calls; the alternative, etcd's JSON gateway over plain HTTP, would need
//! hand-written request types, base64 keys, and long-polling for watches. Its build needs
//! `protoc` (package `protobuf-compiler`).
//!
//! Every call runs under [`EtcdRegistry::timeout`]: an unreachable or quorum-less etcd gives
//! [`RegistryError::Unreachable`] in bounded time, which the self-fencing monitor relies on.
//! Conditional updates read the record, check the caller's tag, and write in a transaction that
//! compares the record's `mod_revision`; when another writer changed the record in between (with
//! the same tag, e.g. a DTL change) the update is retried on the new record.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use super::edges::{attach_rule, detach_rule};
use super::{
    Attachment, ClusterSettings, EdgeRecord, KeepAlive, Lease, LeaseId, NodeEvent, NodeRecord,
    NodeStatus, OwnerRecord, Registry, RegistryError, Result, VolumeChange, VolumeRecord,
    VolumeState,
};

const SETTINGS_KEY: &str = "/vstor/settings";
const NODES: &str = "/vstor/nodes/";
const LIVE: &str = "/vstor/live/";
const VOLUMES: &str = "/vstor/volumes/";
const OWNERS: &str = "/vstor/owners/";
const EDGES: &str = "/vstor/edges/";
const ATTACHMENTS: &str = "/vstor/attachments/";
/// Root of the raw records (`Registry::get_record` and friends).
const ROOT: &str = "/vstor/";
/// Default bound on one registry call (`--registry-timeout`, `cluster.etcd.timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Allowed `--registry-timeout` values. Below 100 ms even a healthy etcd's fsync misses it; above a
/// minute an etcd without quorum would hold a volume create or a failover pass that long, and
/// a lease renewal (the node's liveness) cannot wait past its TTL anyway.
pub const TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(60);
/// Conditional updates retried this often when the record changes under them (same tag).
const UPDATE_ATTEMPTS: usize = 8;

type Keeper = (LeaseKeeper, LeaseKeepAliveStream);

/// A registry's etcd client, replaced when renewed credentials are loaded ([`reload_all`]):
/// every call clones the current one out of the lock (no lock across a network call).
type SharedClient = Arc<std::sync::RwLock<Client>>;

/// Open keepalive streams per lease (see [`EtcdRegistry::keep_alive`]).
type Keepers = Arc<std::sync::Mutex<HashMap<LeaseId, Keeper>>>;

fn current(client: &SharedClient) -> Client {
    client
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

pub struct EtcdRegistry {
    client: SharedClient,
    spec: String,
    timeout: Duration,
    /// Open keepalive streams per lease. Taken out of the map for the duration of a renewal (no
    /// lock is held across the network round trip) and put back when it worked.
    keepers: Keepers,
    /// What [`reload_all`] needs to reconnect this registry; listed in [`RENEWABLE`] while
    /// the registry lives.
    _renewal: Option<Arc<Renewal>>,
}

/// How a registry reconnects with renewed credentials.
struct Renewal {
    endpoints: Vec<String>,
    timeout: Duration,
    spec: String,
    client: SharedClient,
    keepers: Keepers,
    /// Where the credentials come from (re-read at each check) and what is in use.
    settings: crate::config::EtcdSettings,
    access: std::sync::Mutex<EtcdAccess>,
}

/// The registries of this process that can reconnect with renewed credentials.
static RENEWABLE: std::sync::Mutex<Vec<std::sync::Weak<Renewal>>> =
    std::sync::Mutex::new(Vec::new());

/// Read every live registry's etcd credentials again (`--etcd-ca/cert/key`, the password file)
/// and reconnect those whose files changed: a new client is connected and checked (one read)
/// before it replaces the old one, whose lease keepalive streams are dropped (the next renewal
/// opens them on the new client; the leases themselves live in etcd and stay) and whose node
/// watch resynchronises on the new client at its next interruption. Calls already running
/// finish on the old client. A failure leaves the old client in place. Blocking: runs the
/// reconnection on the current runtime (call it from `spawn_blocking`). `Ok(true)`: at least
/// one registry reconnected.
pub fn reload_all() -> std::result::Result<bool, String> {
    let live: Vec<Arc<Renewal>> = {
        let mut list = RENEWABLE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        list.retain(|weak| weak.strong_count() > 0);
        list.iter().filter_map(std::sync::Weak::upgrade).collect()
    };
    let mut reloaded = false;
    for renewal in live {
        let tls = super::etcd_uses_tls(&renewal.endpoints);
        let access = renewal
            .settings
            .load(tls)
            .map_err(|e| format!("registry {}: {e:#}", renewal.spec))?;
        let unchanged = *renewal
            .access
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == access;
        if unchanged {
            continue;
        }
        let client = tokio::runtime::Handle::current()
            .block_on(open_client(
                &renewal.endpoints,
                &access,
                renewal.timeout,
                &renewal.spec,
            ))
            .map_err(|e| e.to_string())?;
        *renewal
            .client
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = client;
        renewal
            .keepers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        *renewal
            .access
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = access;
        reloaded = true;
    }
    Ok(reloaded)
}

/// Connect a client to `endpoints` with `access` and check that etcd answers it (one read)
/// within `timeout`.
async fn open_client(
    endpoints: &[String],
    access: &EtcdAccess,
    timeout: Duration,
    spec: &str,
) -> Result<Client> {
    let tls = super::etcd_uses_tls(endpoints);
    if access.has_tls() && !tls {
        return Err(RegistryError::Tls {
            registry: spec.to_string(),
            reason: "--etcd-ca/--etcd-cert/--etcd-key need TLS: write the registry as \
                     etcd+https://HOST:PORT"
                .into(),
        });
    }
    let mut options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(1), timeout);
    if tls {
        let mut config = TlsOptions::new();
        config = match &access.ca_pem {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &access.client_pem {
            config = config.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(config);
    }
    if let Some((user, password)) = &access.user {
        // etcd's tokens expire (`--auth-token-ttl`, 5 minutes by default, since last use):
        // a call refused for an expired token authenticates again and is retried.
        options = options
            .with_user(user.as_str(), password.as_str())
            .with_auto_token_refresh(true);
    }
    let client =
        match tokio::time::timeout(timeout, Client::connect(endpoints, Some(options))).await {
            Err(_) => {
                return Err(RegistryError::Unreachable {
                    registry: spec.to_string(),
                    reason: format!("no answer within {timeout:?}"),
                })
            }
            Ok(Err(e)) => return Err(at_connect(classify(spec, "connect", &e), access, tls)),
            Ok(Ok(client)) => client,
        };
    let mut kv = client.kv_client();
    match tokio::time::timeout(timeout, kv.get(SETTINGS_KEY, None)).await {
        Err(_) => Err(RegistryError::Unreachable {
            registry: spec.to_string(),
            reason: format!("ping: no answer within {timeout:?}"),
        }),
        Ok(Err(e)) => Err(at_connect(classify(spec, "ping", &e), access, tls)),
        Ok(Ok(_)) => Ok(client),
    }
}

/// How vstor authenticates to etcd and checks etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`,
/// `--etcd-user` with `--etcd-password-file` or `VSTOR_ETCD_PASSWORD`): the files' contents, read
/// and checked by the caller. The default is none of it (plain etcd without authentication).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    /// PEM CA certificates etcd's server certificate must chain to; `None`: the system's CAs.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate chain and private key presented to etcd (its `--client-cert-auth`).
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// etcd user and password (etcd's `auth enable`).
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password, nor the key.
        f.debug_struct("EtcdAccess")
            .field("ca", &self.ca_pem.is_some())
            .field("client_cert", &self.client_pem.is_some())
            .field("user", &self.user.as_ref().map(|(user, _)| user))
            .finish()
    }
}

impl EtcdAccess {
    /// Whether it carries TLS material (only valid with `https://` endpoints).
    pub fn has_tls(&self) -> bool {
        self.ca_pem.is_some() || self.client_pem.is_some()
    }
}

/// Where the cluster registry is and how to reach it: its endpoints (from the registry URI) and
/// the access settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTarget {
    /// `http://host:port` or `https://host:port`.
    pub endpoints: Vec<String>,
    pub access: EtcdAccess,
    /// Bound on one registry call ([`DEFAULT_TIMEOUT`] unless `--registry-timeout` says
    /// otherwise): an etcd on a slow or shared disk may need more.
    pub timeout: Duration,
    /// The settings `access` was read from: a registry connected from this target re-reads
    /// them at each credentials check ([`reload_all`]).
    pub settings: crate::config::EtcdSettings,
}

impl EtcdTarget {
    /// [`EtcdRegistry::connect`] with this target's timeout; the registry follows renewed
    /// credential files ([`reload_all`]).
    pub async fn connect(&self) -> Result<EtcdRegistry> {
        let mut registry =
            EtcdRegistry::connect(&self.endpoints, &self.access, self.timeout).await?;
        let renewal = Arc::new(Renewal {
            endpoints: self.endpoints.clone(),
            timeout: self.timeout,
            spec: registry.spec.clone(),
            client: Arc::clone(&registry.client),
            keepers: Arc::clone(&registry.keepers),
            settings: self.settings.clone(),
            access: std::sync::Mutex::new(self.access.clone()),
        });
        RENEWABLE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::downgrade(&renewal));
        registry._renewal = Some(renewal);
        Ok(registry)
    }
}

/// The registry's name in messages: `etcd://h:p,…` or `etcd+https://h:p,…`.
pub fn spec_of(endpoints: &[String]) -> String {
    let scheme = if super::etcd_uses_tls(endpoints) {
        "etcd+https://"
    } else {
        "etcd://"
    };
    let hosts: Vec<&str> = endpoints
        .iter()
        .map(|e| {
            e.trim_start_matches("http://")
                .trim_start_matches("https://")
        })
        .collect();
    format!("{scheme}{}", hosts.join(","))
}

impl EtcdRegistry {
    /// Connect to `endpoints` (`http://host:port`, or `https://host:port` for TLS) with
    /// `access`'s certificates and credentials, and check that etcd answers within `timeout`:
    /// an unreachable registry, an untrusted or refused certificate and wrong credentials are
    /// errors at startup (naming the registry and what failed), not later.
    pub async fn connect(
        endpoints: &[String],
        access: &EtcdAccess,
        timeout: Duration,
    ) -> Result<Self> {
        let spec = spec_of(endpoints);
        let client = open_client(endpoints, access, timeout, &spec).await?;
        Ok(Self {
            client: Arc::new(std::sync::RwLock::new(client)),
            spec,
            timeout,
            keepers: Arc::default(),
            _renewal: None,
        })
    }

    /// The client calls use now (replaced by [`reload_all`]).
    fn client(&self) -> Client {
        current(&self.client)
    }

    /// Run one etcd call under the timeout, mapping failures to registry errors.
    async fn call<T>(
        &self,
        op: &str,
        future: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, future).await {
            Err(_) => Err(RegistryError::Unreachable {
                registry: self.spec.clone(),
                reason: format!("{op}: no answer within {:?}", self.timeout),
            }),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.error(op, &e)),
        }
    }

    fn error(&self, op: &str, e: &etcd_client::Error) -> RegistryError {
        classify(&self.spec, op, e)
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        let mut kv = self.client().kv_client();
        let mut response = self
            .call(
                "list",
                kv.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        Ok(response.take_kvs())
    }

    async fn get_one(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut kv = self.client().kv_client();
        let mut response = self.call("get", kv.get(key, None)).await?;
        Ok(response.take_kvs().into_iter().next())
    }

    async fn txn(&self, op: &str, txn: Txn) -> Result<etcd_client::TxnResponse> {
        let mut kv = self.client().kv_client();
        self.call(op, kv.txn(txn)).await
    }

    async fn volume_entry(&self, volume: &str) -> Result<Option<(VolumeRecord, i64)>> {
        let key = format!("{VOLUMES}{volume}");
        match self.get_one(&key).await? {
            None => Ok(None),
            Some(kv) => Ok(Some((decode(&key, kv.value())?, kv.mod_revision()))),
        }
    }

    /// Read the volume's record, check `tag`, let `change` compute the new record (or none: only
    /// `extra` operations) and write it all if the record did not change meanwhile.
    async fn update_volume(
        &self,
        op: &str,
        volume: &str,
        tag: u64,
        change: impl Fn(&VolumeRecord) -> Result<(Option<VolumeRecord>, Vec<TxnOp>)> + Send + Sync,
    ) -> Result<VolumeRecord> {
        let key = format!("{VOLUMES}{volume}");
        for _ in 0..UPDATE_ATTEMPTS {
            let (record, revision) =
                self.volume_entry(volume)
                    .await?
                    .ok_or_else(|| RegistryError::VolumeNotFound {
                        volume: volume.to_string(),
                    })?;
            check_tag(&record, tag)?;
            let (new, mut ops) = change(&record)?;
            if let Some(new) = &new {
                ops.insert(0, TxnOp::put(key.as_str(), encode(new), None));
            }
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then(ops);
            if self.txn(op, txn).await?.succeeded() {
                return Ok(new.unwrap_or(record));
            }
        }
        Err(RegistryError::Failed {
            op: format!("{op} of volume {volume}"),
            reason: format!("the record kept changing ({UPDATE_ATTEMPTS} attempts)"),
        })
    }

    /// Compare-and-swap `volume`'s attachment list: `change` computes the new list from the
    /// current one (empty: the key is deleted), retried when another edge changed it meanwhile.
    async fn update_attachments(
        &self,
        op: &str,
        volume: &str,
        change: impl Fn(&[Attachment]) -> Result<Vec<Attachment>> + Send + Sync,
    ) -> Result<Vec<Attachment>> {
        let key = format!("{ATTACHMENTS}{volume}");
        for _ in 0..UPDATE_ATTEMPTS {
            let (current, revision): (Vec<Attachment>, i64) = match self.get_one(&key).await? {
                Some(kv) => (decode(&key, kv.value())?, kv.mod_revision()),
                None => (Vec::new(), 0),
            };
            let next = change(&current)?;
            let write = if next.is_empty() {
                TxnOp::delete(key.as_str(), None)
            } else {
                TxnOp::put(key.as_str(), encode(&next), None)
            };
            // A missing key has mod_revision 0, so this also guards the first attach.
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then(vec![write]);
            if self.txn(op, txn).await?.succeeded() {
                return Ok(next);
            }
        }
        Err(RegistryError::Failed {
            op: format!("{op} of volume {volume}"),
            reason: format!("the attachments kept changing ({UPDATE_ATTEMPTS} attempts)"),
        })
    }

    async fn open_keeper(&self, lease: LeaseId) -> Result<Keeper> {
        let mut client = self.client().lease_client();
        self.call("lease keepalive", client.keep_alive(lease)).await
    }
}

/// A failure of the first calls, explained with what this client did not bring: etcd with
/// `--client-cert-auth` closes a TLS connection without a client certificate (the client sees a
/// broken pipe or a reset, seldom the alert); etcd serving TLS closes a plain-text one; etcd with
/// authentication refuses a client without a user (or takes a client certificate's CN as one).
fn at_connect(e: RegistryError, access: &EtcdAccess, tls: bool) -> RegistryError {
    match e {
        RegistryError::Unreachable { registry, reason } => {
            let lower = reason.to_lowercase();
            let closed = [
                "broken pipe",
                "connection reset",
                "connection closed",
                "stream closed",
            ]
            .iter()
            .any(|s| lower.contains(s));
            if closed && tls && access.client_pem.is_none() {
                RegistryError::Tls {
                    registry,
                    reason: format!(
                        "etcd closed the connection without a client certificate: it requires \
                         one (--client-cert-auth), give --etcd-cert and --etcd-key ({reason})"
                    ),
                }
            } else if closed && tls {
                RegistryError::Tls {
                    registry,
                    reason: format!(
                        "etcd closed the connection: does its --trusted-ca-file sign the client \
                         certificate (--etcd-cert)? ({reason})"
                    ),
                }
            } else if closed {
                RegistryError::Unreachable {
                    registry,
                    reason: format!(
                        "{reason} (if etcd serves TLS, write the registry as \
                         etcd+https://HOST:PORT)"
                    ),
                }
            } else {
                RegistryError::Unreachable { registry, reason }
            }
        }
        RegistryError::Denied { registry, reason } if access.user.is_none() => {
            RegistryError::Denied {
                registry,
                reason: format!(
                    "etcd has authentication enabled and no --etcd-user was given: give \
                     --etcd-user and its password (--etcd-password-file or VSTOR_ETCD_PASSWORD), \
                     or a client certificate whose CN is an etcd user with read and write on \
                     /vstor/ ({reason})"
                ),
            }
        }
        other => other,
    }
}

/// The whole story of an etcd-client error: tonic's statuses and transport errors keep the
/// TLS or connection failure in their `source` chain, not in their message.
fn error_chain(e: &etcd_client::Error) -> String {
    use etcd_client::Error as E;
    let mut text = match e {
        E::GRpcStatus(status) => status.message().to_string(),
        other => other.to_string(),
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = match e {
        E::GRpcStatus(status) => std::error::Error::source(status),
        E::TransportError(error) => std::error::Error::source(error),
        E::IoError(error) => std::error::Error::source(error),
        _ => None,
    };
    while let Some(error) = source {
        let message = error.to_string();
        if !text.contains(&message) {
            text = format!("{text}: {message}");
        }
        source = error.source();
    }
    text
}

/// Map an etcd-client failure of `op` on registry `spec` to a registry error: TLS failures
/// (untrusted server certificate, client certificate refused) and refused credentials get their
/// own errors with what to check, a connection that broke or never came is `Unreachable`.
fn classify(spec: &str, op: &str, e: &etcd_client::Error) -> RegistryError {
    use etcd_client::Error as E;
    let detail = error_chain(e);
    let lower = detail.to_lowercase();
    let status = match e {
        E::GRpcStatus(status) => Some(status),
        _ => None,
    };
    let code = status.map(tonic::Status::code);
    if lower.contains("lease not found")
        || matches!(e, E::LeaseKeepAliveError(message) if message.contains("not found"))
    {
        return RegistryError::LeaseExpired { lease: 0 };
    }
    let tls = |reason: String| RegistryError::Tls {
        registry: spec.to_string(),
        reason,
    };
    let denied = |reason: String| RegistryError::Denied {
        registry: spec.to_string(),
        reason,
    };
    if lower.contains("invalid peer certificate") || lower.contains("unknownissuer") {
        return tls(format!(
            "etcd's certificate is not trusted: it does not chain to --etcd-ca (or, without \
             --etcd-ca, to the system's CAs), or does not name the host dialled ({op}: {detail})"
        ));
    }
    if lower.contains("certificaterequired")
        || lower.contains("certificate required")
        || lower.contains("badcertificate")
        || lower.contains("bad certificate")
        || lower.contains("unknownca")
        || lower.contains("unknown ca")
    {
        return tls(format!(
            "etcd refused the client certificate: it requires one signed by its \
             --trusted-ca-file (--etcd-cert, --etcd-key) ({op}: {detail})"
        ));
    }
    if lower.contains("received fatal alert") || lower.contains("tls handshake") {
        return tls(format!("{op}: {detail}"));
    }
    if lower.contains("authentication failed") || lower.contains("invalid user id or password") {
        return denied(format!("wrong etcd user or password (--etcd-user, --etcd-password-file or VSTOR_ETCD_PASSWORD) ({op}: {detail})"));
    }
    if lower.contains("user name is empty") || lower.contains("user name not found") {
        return denied(format!(
            "etcd has authentication enabled: give --etcd-user and its password \
             (--etcd-password-file or VSTOR_ETCD_PASSWORD), or a client certificate whose CN \
             is an etcd user ({op}: {detail})"
        ));
    }
    if code == Some(tonic::Code::PermissionDenied) || lower.contains("permission denied") {
        return denied(format!(
            "the etcd user may not do this: grant it read and write on the prefix /vstor/ \
             ({op}: {detail})"
        ));
    }
    if code == Some(tonic::Code::Unauthenticated) {
        return denied(format!("{op}: {detail}"));
    }
    // A connection that broke under a call comes back as `Unknown` or `Cancelled` (h2 reset)
    // rather than `Unavailable`: all of them mean "etcd did not answer".
    let unreachable = matches!(
        code,
        Some(
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
        )
    ) || matches!(e, E::TransportError(_) | E::IoError(_));
    if unreachable {
        return RegistryError::Unreachable {
            registry: spec.to_string(),
            reason: format!("{op}: {detail}"),
        };
    }
    RegistryError::Failed {
        op: format!("{op} on {spec}"),
        reason: detail,
    }
}

fn check_tag(record: &VolumeRecord, tag: u64) -> Result<()> {
    if record.owner_tag == tag {
        Ok(())
    } else {
        Err(RegistryError::StaleTag {
            volume: record.name.clone(),
            expected: tag,
            actual: record.owner_tag,
            owner: record.owner.clone(),
        })
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain records cannot fail; an empty value would be refused on read.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn decode_kv<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    decode(&String::from_utf8_lossy(kv.key()), kv.value())
}

fn name_after(prefix: &str, key: &[u8]) -> String {
    String::from_utf8_lossy(key)
        .strip_prefix(prefix)
        .unwrap_or_default()
        .to_string()
}

fn txn_gets(response: &etcd_client::TxnResponse) -> Vec<Vec<KeyValue>> {
    response
        .op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(mut get) => Some(get.take_kvs()),
            _ => None,
        })
        .collect()
}

#[async_trait::async_trait]
impl Registry for EtcdRegistry {
    fn describe(&self) -> String {
        self.spec.clone()
    }

    fn is_cluster(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<()> {
        self.get_one(SETTINGS_KEY).await.map(|_| ())
    }

    async fn settings(&self) -> Result<ClusterSettings> {
        match self.get_one(SETTINGS_KEY).await? {
            None => Ok(ClusterSettings::default()),
            Some(kv) => decode(SETTINGS_KEY, kv.value()),
        }
    }

    async fn put_settings(&self, settings: &ClusterSettings) -> Result<()> {
        settings.validate()?;
        let mut kv = self.client().kv_client();
        self.call("put settings", kv.put(SETTINGS_KEY, encode(settings), None))
            .await
            .map(|_| ())
    }

    async fn register_node(&self, node: &NodeRecord, ttl: Duration) -> Result<Lease> {
        let live = format!("{LIVE}{}", node.name);
        // A name still held (a restarted node waiting for its killed run's lease to expire
        // asks every 250 ms) is answered by a read: no lease is granted and revoked, two raft
        // writes and their fsyncs, per attempt. The transaction below still decides.
        if let Some(kv) = self.get_one(&live).await? {
            return Err(RegistryError::NodeAlive {
                node: node.name.clone(),
                api_addr: decode_kv::<NodeRecord>(&kv)
                    .map_or_else(|_| "unknown".into(), |h| h.api_addr),
            });
        }
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut leases = self.client().lease_client();
        let granted = self.call("lease grant", leases.grant(secs, None)).await?;
        let lease = granted.id();
        let member = format!("{NODES}{}", node.name);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                live.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![
                TxnOp::put(
                    live.as_str(),
                    encode(node),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(member.as_str(), encode(node), None),
            ])
            .or_else(vec![TxnOp::get(live.as_str(), None)]);
        let response = self.txn("register node", txn).await;
        let response = match response {
            Ok(response) => response,
            Err(e) => {
                let _ = self.revoke(lease).await;
                return Err(e);
            }
        };
        if response.succeeded() {
            return Ok(Lease {
                id: lease,
                ttl: Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0)),
            });
        }
        let _ = self.revoke(lease).await;
        let holder: Option<NodeRecord> = txn_gets(&response)
            .into_iter()
            .flatten()
            .next()
            .and_then(|kv| decode_kv(&kv).ok());
        Err(RegistryError::NodeAlive {
            node: node.name.clone(),
            api_addr: holder.map_or_else(|| "unknown".into(), |h| h.api_addr),
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<KeepAlive> {
        let taken = self
            .keepers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&lease);
        let opened = match taken {
            Some(keeper) => Ok(keeper),
            None => self.open_keeper(lease).await,
        };
        let (mut keeper, mut stream) = match opened {
            Ok(keeper) => keeper,
            Err(RegistryError::LeaseExpired { .. }) => return Ok(KeepAlive::Expired),
            Err(e) => return Err(e),
        };
        let renewed = match self
            .call("lease keepalive", async {
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await
        {
            Ok(renewed) => renewed,
            Err(RegistryError::LeaseExpired { .. }) => return Ok(KeepAlive::Expired),
            Err(e) => return Err(e),
        };
        match renewed {
            Some(response) if response.ttl() > 0 => {
                self.keepers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(lease, (keeper, stream));
                Ok(KeepAlive::Renewed {
                    ttl: Duration::from_secs(u64::try_from(response.ttl()).unwrap_or(0)),
                })
            }
            Some(_) => Ok(KeepAlive::Expired),
            None => Err(RegistryError::Unreachable {
                registry: self.spec.clone(),
                reason: "lease keepalive stream closed".into(),
            }),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.keepers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&lease);
        let mut leases = self.client().lease_client();
        match self.call("lease revoke", leases.revoke(lease)).await {
            Ok(_) | Err(RegistryError::LeaseExpired { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn nodes(&self) -> Result<Vec<NodeStatus>> {
        // One transaction: members, live keys and volumes from the same revision.
        let prefix = || Some(GetOptions::new().with_prefix());
        let txn = Txn::new().and_then(vec![
            TxnOp::get(NODES, prefix()),
            TxnOp::get(LIVE, prefix()),
            TxnOp::get(VOLUMES, prefix()),
        ]);
        let response = self.txn("list nodes", txn).await?;
        let mut gets = txn_gets(&response).into_iter();
        let (members, live, volumes) = (
            gets.next().unwrap_or_default(),
            gets.next().unwrap_or_default(),
            gets.next().unwrap_or_default(),
        );
        let mut live_records: HashMap<String, NodeRecord> = HashMap::new();
        for kv in &live {
            let record: NodeRecord = decode_kv(kv)?;
            live_records.insert(name_after(LIVE, kv.key()), record);
        }
        let mut counts: HashMap<String, usize> = HashMap::new();
        for kv in &volumes {
            let record: VolumeRecord = decode_kv(kv)?;
            *counts.entry(record.owner).or_default() += 1;
        }
        let mut nodes = Vec::new();
        for kv in &members {
            let member: NodeRecord = decode_kv(kv)?;
            let alive = live_records.remove(&member.name);
            let record = alive.clone().unwrap_or(member);
            nodes.push(NodeStatus {
                volumes: counts.get(&record.name).copied().unwrap_or(0),
                alive: alive.is_some(),
                record,
            });
        }
        nodes.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(nodes)
    }

    async fn live_nodes(&self) -> Result<Vec<NodeRecord>> {
        let mut nodes: Vec<NodeRecord> = self
            .get_prefix(LIVE)
            .await?
            .iter()
            .map(decode_kv)
            .collect::<Result<_>>()?;
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }

    async fn watch_nodes(&self) -> Result<mpsc::Receiver<NodeEvent>> {
        let (tx, rx) = mpsc::channel(64);
        // The first snapshot is read here so an unreachable registry is reported to the caller.
        let (first, revision) = live_snapshot(&self.client(), self.timeout)
            .await
            .map_err(|e| self.error("watch nodes", &e))?;
        let _ = tx.send(NodeEvent::Live(first)).await;
        tokio::spawn(watch_loop(
            Arc::clone(&self.client),
            self.timeout,
            tx,
            revision,
            self.spec.clone(),
        ));
        Ok(rx)
    }

    async fn watch_volume(&self, volume: &str) -> Result<mpsc::Receiver<VolumeChange>> {
        let keys = [
            (format!("{VOLUMES}{volume}"), VolumeChange::Record),
            (format!("{OWNERS}{volume}"), VolumeChange::Owner),
        ];
        let op = format!("watch volume {volume}");
        let start = async {
            let mut stream = self
                .client()
                .watch_client()
                .watch(keys[0].0.as_str(), None)
                .await?;
            stream.watch(keys[1].0.as_str(), None).await?;
            // Events are promised from the return on, so wait until etcd confirmed both
            // watches; it creates a stream's watches in the order they were asked for.
            let mut ids = HashMap::new();
            while ids.len() < keys.len() {
                let response = stream.message().await?.ok_or_else(|| {
                    etcd_client::Error::WatchError("watch stream closed at creation".into())
                })?;
                if response.created() {
                    ids.insert(response.watch_id(), keys[ids.len()].1);
                }
            }
            Ok::<_, etcd_client::Error>((stream, ids))
        };
        let (mut stream, ids) = match tokio::time::timeout(self.timeout, start).await {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => return Err(self.error(&op, &e)),
            Err(_) => {
                return Err(self.error(
                    &op,
                    &etcd_client::Error::WatchError("no answer from etcd".into()),
                ))
            }
        };
        let (tx, rx) = mpsc::channel(16);
        let spec = self.spec.clone();
        let volume = volume.to_string();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    () = tx.closed() => return,
                    m = stream.message() => m,
                };
                let response = match message {
                    Ok(Some(response)) if !response.canceled() => response,
                    _ => break,
                };
                let Some(&change) = ids.get(&response.watch_id()) else {
                    continue;
                };
                for _ in response.events() {
                    // A full receiver loses the notice (see `Registry::watch_volume`).
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(change) {
                        return;
                    }
                }
            }
            // The caller polls from here on (its receiver sees the end of the stream).
            tracing::debug!(registry = %spec, volume, "volume watch ended");
        });
        Ok(rx)
    }

    async fn create_volume(&self, record: &VolumeRecord, lease: LeaseId) -> Result<()> {
        let key = format!("{VOLUMES}{}", record.name);
        let owner_key = format!("{OWNERS}{}", record.name);
        let owner = OwnerRecord {
            node: record.owner.clone(),
            tag: record.owner_tag,
            lease,
        };
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![
                TxnOp::put(key.as_str(), encode(record), None),
                TxnOp::put(
                    owner_key.as_str(),
                    encode(&owner),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            ])
            .or_else(vec![TxnOp::get(key.as_str(), None)]);
        let response = self
            .txn("create volume", txn)
            .await
            .map_err(|e| with_lease(e, lease))?;
        if response.succeeded() {
            return Ok(());
        }
        let existing: Option<VolumeRecord> = txn_gets(&response)
            .into_iter()
            .flatten()
            .next()
            .and_then(|kv| decode_kv(&kv).ok());
        Err(RegistryError::VolumeExists {
            volume: record.name.clone(),
            owner: existing.map_or_else(|| "unknown".into(), |r| r.owner),
        })
    }

    async fn delete_volume(&self, volume: &str, tag: u64) -> Result<()> {
        let owner_key = format!("{OWNERS}{volume}");
        let key = format!("{VOLUMES}{volume}");
        self.update_volume("delete volume", volume, tag, |_| {
            Ok((
                None,
                vec![
                    TxnOp::delete(key.as_str(), None),
                    TxnOp::delete(owner_key.as_str(), None),
                ],
            ))
        })
        .await
        .map(|_| ())
    }

    async fn volume(&self, volume: &str) -> Result<Option<VolumeRecord>> {
        Ok(self.volume_entry(volume).await?.map(|(record, _)| record))
    }

    async fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        let mut volumes: Vec<VolumeRecord> = self
            .get_prefix(VOLUMES)
            .await?
            .iter()
            .map(decode_kv)
            .collect::<Result<_>>()?;
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(volumes)
    }

    async fn take_ownership(
        &self,
        volume: &str,
        expected_tag: u64,
        new_owner: &str,
        lease: LeaseId,
    ) -> Result<u64> {
        let owner_key = format!("{OWNERS}{volume}");
        let record = self
            .update_volume("take ownership", volume, expected_tag, |record| {
                let new = VolumeRecord {
                    owner: new_owner.to_string(),
                    owner_tag: expected_tag + 1,
                    state: VolumeState::Serving,
                    ..record.clone()
                };
                let owner = OwnerRecord {
                    node: new_owner.to_string(),
                    tag: expected_tag + 1,
                    lease,
                };
                let put_owner = TxnOp::put(
                    owner_key.as_str(),
                    encode(&owner),
                    Some(PutOptions::new().with_lease(lease)),
                );
                Ok((Some(new), vec![put_owner]))
            })
            .await
            .map_err(|e| with_lease(e, lease))?;
        Ok(record.owner_tag)
    }

    async fn refresh_owner(
        &self,
        volume: &str,
        owner: &str,
        tag: u64,
        lease: LeaseId,
    ) -> Result<()> {
        let owner_key = format!("{OWNERS}{volume}");
        self.update_volume("refresh owner", volume, tag, |record| {
            if record.owner != owner {
                return Err(RegistryError::StaleTag {
                    volume: volume.to_string(),
                    expected: tag,
                    actual: record.owner_tag,
                    owner: record.owner.clone(),
                });
            }
            let value = OwnerRecord {
                node: owner.to_string(),
                tag,
                lease,
            };
            Ok((
                None,
                vec![TxnOp::put(
                    owner_key.as_str(),
                    encode(&value),
                    Some(PutOptions::new().with_lease(lease)),
                )],
            ))
        })
        .await
        .map(|_| ())
        .map_err(|e| with_lease(e, lease))
    }

    async fn owner(&self, volume: &str) -> Result<Option<OwnerRecord>> {
        let key = format!("{OWNERS}{volume}");
        match self.get_one(&key).await? {
            None => Ok(None),
            Some(kv) => decode(&key, kv.value()).map(Some),
        }
    }

    async fn set_dtl(&self, volume: &str, tag: u64, dtl_node: Option<String>) -> Result<()> {
        self.update_volume("set DTL", volume, tag, |record| {
            Ok((
                Some(VolumeRecord {
                    dtl_node: dtl_node.clone(),
                    ..record.clone()
                }),
                Vec::new(),
            ))
        })
        .await
        .map(|_| ())
    }

    async fn set_state(&self, volume: &str, tag: u64, state: VolumeState) -> Result<()> {
        self.update_volume("set state", volume, tag, |record| {
            Ok((
                Some(VolumeRecord {
                    state: state.clone(),
                    ..record.clone()
                }),
                Vec::new(),
            ))
        })
        .await
        .map(|_| ())
    }

    async fn register_edge(&self, edge: &EdgeRecord, ttl: Duration) -> Result<Lease> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut leases = self.client().lease_client();
        let granted = self.call("lease grant", leases.grant(secs, None)).await?;
        let lease = granted.id();
        let key = format!("{EDGES}{}", edge.name);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.as_str(),
                encode(edge),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(key.as_str(), None)]);
        let response = match self.txn("register edge", txn).await {
            Ok(response) => response,
            Err(e) => {
                let _ = self.revoke(lease).await;
                return Err(e);
            }
        };
        if response.succeeded() {
            return Ok(Lease {
                id: lease,
                ttl: Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0)),
            });
        }
        let _ = self.revoke(lease).await;
        let holder: Option<EdgeRecord> = txn_gets(&response)
            .into_iter()
            .flatten()
            .next()
            .and_then(|kv| decode_kv(&kv).ok());
        Err(RegistryError::EdgeAlive {
            edge: edge.name.clone(),
            host: holder
                .as_ref()
                .map_or_else(|| "unknown".into(), |h| h.host.clone()),
            api_addr: holder.map_or_else(|| "unknown".into(), |h| h.api_addr),
        })
    }

    async fn live_edges(&self) -> Result<Vec<EdgeRecord>> {
        let mut edges: Vec<EdgeRecord> = self
            .get_prefix(EDGES)
            .await?
            .iter()
            .map(decode_kv)
            .collect::<Result<_>>()?;
        edges.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(edges)
    }

    async fn attachments(&self) -> Result<Vec<(String, Vec<Attachment>)>> {
        let mut all = self
            .get_prefix(ATTACHMENTS)
            .await?
            .iter()
            .map(|kv| Ok((name_after(ATTACHMENTS, kv.key()), decode_kv(kv)?)))
            .collect::<Result<Vec<_>>>()?;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    async fn attach(&self, volume: &str, edge: &str, read_only: bool) -> Result<Vec<Attachment>> {
        let live: std::collections::BTreeSet<String> = self
            .live_edges()
            .await?
            .into_iter()
            .map(|e| e.name)
            .collect();
        let now = super::now_secs();
        self.update_attachments("attach", volume, |current| {
            attach_rule(volume, current, &live, edge, read_only, now)
        })
        .await
    }

    async fn detach(&self, volume: &str, edge: &str) -> Result<()> {
        self.update_attachments("detach", volume, |current| {
            detach_rule(volume, current, edge)
        })
        .await
        .map(|_| ())
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut leases = self.client().lease_client();
        let granted = self.call("lease grant", leases.grant(secs, None)).await?;
        Ok(Lease {
            id: granted.id(),
            ttl: Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0)),
        })
    }

    async fn get_record(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>> {
        Ok(self
            .get_one(&format!("{ROOT}{key}"))
            .await?
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    async fn list_records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>, i64)>> {
        let full = format!("{ROOT}{prefix}");
        let mut records: Vec<_> = self
            .get_prefix(&full)
            .await?
            .iter()
            .map(|kv| {
                (
                    name_after(&full, kv.key()),
                    kv.value().to_vec(),
                    kv.mod_revision(),
                )
            })
            .collect();
        records.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(records)
    }

    async fn swap_record(
        &self,
        key: &str,
        expected: i64,
        value: Option<&[u8]>,
        lease: Option<LeaseId>,
    ) -> Result<bool> {
        let full = format!("{ROOT}{key}");
        let write = match value {
            Some(value) => TxnOp::put(
                full.as_str(),
                value.to_vec(),
                lease.map(|l| PutOptions::new().with_lease(l)),
            ),
            None => TxnOp::delete(full.as_str(), None),
        };
        // A missing key has mod_revision 0, so `expected == 0` means "create".
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                full.as_str(),
                CompareOp::Equal,
                expected,
            )])
            .and_then(vec![write]);
        match self.txn("swap record", txn).await {
            Ok(response) => Ok(response.succeeded()),
            Err(e) => Err(match lease {
                Some(l) => with_lease(e, l),
                None => e,
            }),
        }
    }
}

/// A "lease not found" error names the lease the caller passed.
fn with_lease(error: RegistryError, lease: LeaseId) -> RegistryError {
    match error {
        RegistryError::LeaseExpired { .. } => RegistryError::LeaseExpired { lease },
        other => other,
    }
}

/// The live nodes and the revision they were read at.
#[allow(dead_code)] // Through `watch_nodes`, the failover layer's.
async fn live_snapshot(
    client: &Client,
    timeout: Duration,
) -> std::result::Result<(Vec<NodeRecord>, i64), etcd_client::Error> {
    let mut kv = client.kv_client();
    let response =
        tokio::time::timeout(timeout, kv.get(LIVE, Some(GetOptions::new().with_prefix())))
            .await
            .map_err(|_| etcd_client::Error::WatchError("no answer from etcd".into()))??;
    let revision = response
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision);
    let mut nodes: Vec<NodeRecord> = response
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((nodes, revision))
}

/// Follow the live keys from `revision` on; when the watch breaks, read a new snapshot and
/// watch again (retrying once a second) until the receiver is gone.
#[allow(dead_code)] // Through `watch_nodes`, the failover layer's.
async fn watch_loop(
    client: SharedClient,
    timeout: Duration,
    tx: mpsc::Sender<NodeEvent>,
    mut revision: i64,
    spec: String,
) {
    const RETRY: Duration = Duration::from_secs(1);
    loop {
        let mut watcher = current(&client).watch_client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let stream = tokio::select! {
            () = tx.closed() => return,
            s = tokio::time::timeout(timeout, watcher.watch(LIVE, Some(options))) => s,
        };
        if let Ok(Ok(mut stream)) = stream {
            loop {
                let message = tokio::select! {
                    () = tx.closed() => return,
                    m = stream.message() => m,
                };
                let Ok(Some(response)) = message else { break };
                if response.canceled() {
                    break;
                }
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    revision = revision.max(kv.mod_revision());
                    let event = match event.event_type() {
                        EventType::Put => match serde_json::from_slice(kv.value()) {
                            Ok(record) => NodeEvent::Up(Box::new(record)),
                            Err(_) => continue,
                        },
                        EventType::Delete => NodeEvent::Down(name_after(LIVE, kv.key())),
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
        }
        tracing::debug!(registry = %spec, "node watch interrupted; resynchronising");
        // Resynchronise: a fresh snapshot, then watch from its revision.
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
            if let Ok((nodes, at)) = live_snapshot(&current(&client), timeout).await {
                revision = at;
                if tx.send(NodeEvent::Live(nodes)).await.is_err() {
                    return;
                }
                break;
            }
        }
    }
}

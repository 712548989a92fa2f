//! `vstor serve` settings: built-in defaults, overridden by a TOML file (`--config`), overridden
//! by command-line flags. `docs/vstor.example.toml` documents every setting and is checked by a
//! test to parse to exactly these defaults.
//!
//! Every setting is checked here, when the node starts, against the range the engine and the
//! frontends accept: a bad value stops `vstor serve` with one line naming the setting and its
//! allowed range, instead of starting a node whose every `volume create` then fails.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::size::parse_size;
use vstor_edge::nbd::{NbdTls, TlsFiles, TlsMode};
use vstor_edge::vhost::MAX_QUEUES;
use vstor_volumedriver::config::{
    validate_size, validate_volume_name, CLUSTER_SIZE, USER_SCO_SIZE_RANGE,
};
use vstor_volumedriver::DtlMode;

pub const DEFAULT_API: &str = "127.0.0.1:7800";
pub const DEFAULT_NBD: &str = "127.0.0.1:10809";
/// `s3_retry_timeout`'s range: under a second is no ride-through at all, and past an hour a
/// guest is better told.
const S3_RETRY_TIMEOUT_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const S3_RETRY_TIMEOUT_MAX: std::time::Duration = std::time::Duration::from_secs(3600);

/// Settings as written in the TOML file; sizes are strings with K/M/G/T suffixes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub data_dir: PathBuf,
    /// Backend: a directory, or `s3://BUCKET[/PREFIX]`; empty means `<data_dir>/backend`.
    pub backend: Option<PathBuf>,
    /// `api = "HOST:PORT"`, or an `[api]` table with `listen`, `token_file`, `tls_cert`,
    /// `tls_key`, `ca_file`.
    pub api: ApiFileSettings,
    pub nbd: String,
    /// Edge protocol listener (`host:port`) for `vstor edge`; empty means none.
    pub edge_listen: String,
    /// Unix socket for edges on this host (`vstor serve --edge-socket`); empty means none.
    pub edge_socket: Option<PathBuf>,
    /// Directory of vhost-user-blk sockets; empty means `<data_dir>/vhost`.
    pub vhost_dir: Option<PathBuf>,
    /// DTL server (`host:port`) new volumes mirror their writes to; empty means none.
    pub dtl: String,
    pub write_buffer_limit: String,
    /// RAM the node keeps of backend data its volumes read (`--read-cache`), e.g. "256M"; "0"
    /// turns it off; "auto": 256M on S3 and the erasure-coded tier, off on a directory.
    pub read_cache: String,
    pub shutdown_upload_timeout_secs: u64,
    /// How long one S3 request is retried through an outage before the operation fails
    /// (`--s3-retry-timeout`), e.g. "30s".
    pub s3_retry_timeout: String,
    pub default_volume: DefaultVolume,
    pub volume_defaults: VolumeDefaults,
    pub nbd_server: NbdSettings,
    pub vhost: VhostSettings,
    pub scrub: ScrubSettings,
    pub upload: UploadSettings,
    pub cluster: ClusterFileSettings,
    pub mds: MdsFileSettings,
    /// `[peer_tls]`: mutual TLS on the internal links (DTL, OSD, MDS, edge protocol).
    pub peer_tls: PeerTlsSettings,
}

/// `[peer_tls]` (`--peer-tls-cert`, `--peer-tls-key`, `--peer-tls-ca`): the node's certificate
/// and key, and the cluster CA. With them the node connects to its volumes' DTL with mutual TLS
/// and its own DTL server (cluster mode) serves only clients with a certificate of that CA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerTlsSettings {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl PeerTlsSettings {
    /// Override each file given on the command line.
    pub fn merge(&mut self, cert: Option<PathBuf>, key: Option<PathBuf>, ca: Option<PathBuf>) {
        for (field, value) in [
            (&mut self.cert, cert),
            (&mut self.key, key),
            (&mut self.ca, ca),
        ] {
            if value.is_some() {
                *field = value;
            }
        }
    }

    /// Load and check the files: all three or none (`None`: plain TCP); an error names the
    /// setting and the file.
    pub fn load(&self) -> Result<Option<vstor_net::PeerTls>> {
        match (&self.cert, &self.key, &self.ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => {
                let files = vstor_net::PeerTlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                };
                vstor_net::PeerTls::load(&files)
                    .map(Some)
                    .context("settings peer_tls (--peer-tls-cert, --peer-tls-key, --peer-tls-ca)")
            }
            _ => {
                let missing: Vec<&str> = [
                    ("peer_tls.cert (--peer-tls-cert)", self.cert.is_none()),
                    ("peer_tls.key (--peer-tls-key)", self.key.is_none()),
                    ("peer_tls.ca (--peer-tls-ca)", self.ca.is_none()),
                ]
                .into_iter()
                .filter_map(|(name, missing)| missing.then_some(name))
                .collect();
                bail!(
                    "peer TLS needs a certificate, its key and the cluster CA together: {} missing",
                    missing.join(" and ")
                )
            }
        }
    }
}

/// Environment variable with the etcd password (`--etcd-user`), when no `--etcd-password-file`.
pub const ETCD_PASSWORD_ENV: &str = "VSTOR_ETCD_PASSWORD";

/// `[cluster.etcd]` (`--etcd-ca`, `--etcd-cert`, `--etcd-key`, `--etcd-user`,
/// `--etcd-password-file`): how the node reaches an etcd with TLS (`etcd+https://` registry) or
/// authentication. The password is never a flag or a setting: a file, or `VSTOR_ETCD_PASSWORD`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdSettings {
    /// PEM CA etcd's certificate must chain to [default: the system's CAs].
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain, for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// etcd user (etcd's `auth enable`).
    pub user: Option<String>,
    /// File holding the user's password (one line).
    pub password_file: Option<PathBuf>,
    /// Bound on one registry call, e.g. `5s` (`--registry-timeout`) [default: 2s].
    pub timeout: Option<String>,
}

impl EtcdSettings {
    /// Override each setting given on the command line.
    pub fn merge(&mut self, flags: EtcdSettings) {
        for (field, value) in [
            (&mut self.ca, flags.ca),
            (&mut self.cert, flags.cert),
            (&mut self.key, flags.key),
            (&mut self.password_file, flags.password_file),
        ] {
            if value.is_some() {
                *field = value;
            }
        }
        if flags.user.is_some() {
            self.user = flags.user;
        }
        if flags.timeout.is_some() {
            self.timeout = flags.timeout;
        }
    }

    /// `timeout` parsed and checked against [`TIMEOUT_RANGE`](crate::registry::etcd::TIMEOUT_RANGE).
    fn call_timeout(&self) -> Result<std::time::Duration> {
        use crate::registry::etcd::{DEFAULT_TIMEOUT, TIMEOUT_RANGE};
        let Some(text) = &self.timeout else {
            return Ok(DEFAULT_TIMEOUT);
        };
        let timeout = humantime::parse_duration(text.trim()).map_err(|e| {
            anyhow::anyhow!(
                "setting cluster.etcd.timeout (--registry-timeout) = {text:?} is not a duration \
                 like 5s or 1500ms: {e}"
            )
        })?;
        if !TIMEOUT_RANGE.contains(&timeout) {
            bail!(not_allowed(
                "cluster.etcd.timeout (--registry-timeout)",
                text,
                &format!(
                    "from {:?} to {:?}",
                    TIMEOUT_RANGE.start(),
                    TIMEOUT_RANGE.end()
                )
            ));
        }
        Ok(timeout)
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The registry at `spec` (`etcd://…` or `etcd+https://…`) with these settings, files read and
    /// checked; `what` names the registry setting in errors (`--registry`).
    pub fn target(&self, what: &str, spec: &str) -> Result<crate::registry::etcd::EtcdTarget> {
        let endpoints = match crate::registry::etcd_endpoints(spec) {
            Some(parsed) => parsed.map_err(|e| anyhow::anyhow!("{what}: {e}"))?,
            None => bail!(
                "{what} = {spec:?} is not allowed: must be {}",
                crate::registry::ETCD_URI_FORMS
            ),
        };
        let timeout = self.call_timeout()?;
        let access = self.load(crate::registry::etcd_uses_tls(&endpoints))?;
        Ok(crate::registry::etcd::EtcdTarget {
            endpoints,
            access,
            timeout,
            settings: self.clone(),
        })
    }

    /// Read and check the files and the password; `tls`: the registry is `etcd+https://` (the
    /// certificate settings need it). Errors name the setting and the file.
    pub fn load(&self, tls: bool) -> Result<crate::registry::etcd::EtcdAccess> {
        let mut access = crate::registry::etcd::EtcdAccess::default();
        let has_tls = self.ca.is_some() || self.cert.is_some() || self.key.is_some();
        if has_tls && !tls {
            bail!(
                "etcd TLS settings (--etcd-ca, --etcd-cert, --etcd-key) need a TLS registry: \
                 write it etcd+https://HOST:PORT[,...]"
            );
        }
        if let Some(ca) = &self.ca {
            vstor_net::pem_certificates("CA certificate", ca)
                .context("setting cluster.etcd.ca (--etcd-ca)")?;
            access.ca_pem = Some(read_file("cluster.etcd.ca (--etcd-ca)", ca)?);
        }
        match (&self.cert, &self.key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                vstor_net::pem_certificates("certificate", cert)
                    .context("setting cluster.etcd.cert (--etcd-cert)")?;
                vstor_net::pem_private_key(key).context("setting cluster.etcd.key (--etcd-key)")?;
                access.client_pem = Some((
                    read_file("cluster.etcd.cert (--etcd-cert)", cert)?,
                    read_file("cluster.etcd.key (--etcd-key)", key)?,
                ));
            }
            (Some(_), None) => {
                bail!("the etcd client certificate (--etcd-cert) needs its key: give --etcd-key")
            }
            (None, Some(_)) => {
                bail!("the etcd client key (--etcd-key) needs its certificate: give --etcd-cert")
            }
        }
        let user = self
            .user
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty());
        match (user, &self.password_file) {
            (None, Some(_)) => {
                bail!(
                    "an etcd password file (--etcd-password-file) needs the user: give --etcd-user"
                )
            }
            (None, None) => {}
            (Some(user), file) => {
                let password = match file {
                    Some(path) => {
                        let bytes =
                            read_file("cluster.etcd.password_file (--etcd-password-file)", path)?;
                        String::from_utf8(bytes).map_err(|_| {
                            anyhow::anyhow!(
                                "the etcd password file {} (--etcd-password-file) is not UTF-8 text",
                                path.display()
                            )
                        })?
                    }
                    None => std::env::var(ETCD_PASSWORD_ENV).map_err(|_| {
                        anyhow::anyhow!(
                            "etcd user {user:?} (--etcd-user) needs its password: give \
                             --etcd-password-file FILE or set {ETCD_PASSWORD_ENV}"
                        )
                    })?,
                };
                let password = password.trim_end_matches(['\n', '\r']).to_string();
                if password.is_empty() {
                    bail!("the password of etcd user {user:?} (--etcd-user) is empty");
                }
                access.user = Some((user.to_string(), password));
            }
        }
        Ok(access)
    }
}

/// Read a file named by setting `what`, or an error naming both.
fn read_file(what: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("setting {what}: cannot read {}", path.display()))
}

/// `[mds]`: the metadata servers this node's volumes keep their map tables on (empty
/// `servers`: on a cluster registry, the MDSes registered there; on a single node none, and a
/// restart replays the volume's backend history).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MdsFileSettings {
    /// `HOST:PORT` of each `vstor mds`; the first is the master of new volumes, the rest slaves.
    pub servers: Vec<String>,
    /// A slave more TLogs than this behind the backend is never promoted or restarted from.
    pub max_behind: u64,
    /// How often the node checks each volume's MDSes ("2s").
    pub check_every: String,
}

impl Default for MdsFileSettings {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            max_behind: 64,
            check_every: "2s".into(),
        }
    }
}

impl MdsFileSettings {
    /// `None`: no MDS. Without servers, a cluster node places tables on the MDSes registered
    /// in its registry; a single node then has none.
    fn resolve(&self, cluster: bool) -> Result<Option<crate::mds_link::MdsSettings>> {
        if self.servers.is_empty() && !cluster {
            return Ok(None);
        }
        let mut servers: Vec<String> = Vec::new();
        for server in &self.servers {
            let server = server.trim();
            let valid = server.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !valid {
                bail!("setting mds.servers (--mds): {server:?} is not HOST:PORT");
            }
            if servers.iter().any(|s| s == server) {
                bail!("setting mds.servers (--mds): {server} is listed twice");
            }
            servers.push(server.to_string());
        }
        let check_every = humantime::parse_duration(self.check_every.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| {
                format!(
                    "setting mds.check_every: {:?} is not a duration like \"2s\"",
                    self.check_every
                )
            })?;
        Ok(Some(crate::mds_link::MdsSettings {
            servers,
            max_behind: self.max_behind,
            check_every,
        }))
    }
}

/// `[cluster]`: run the node in a cluster on etcd (empty `registry`: the single-node default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterFileSettings {
    /// `etcd://HOST:PORT[,HOST:PORT…]`; empty: the local registry file (single node).
    pub registry: String,
    /// This node's unique name (required with a registry).
    pub node: String,
    /// Failure domain of the node [default: "default"].
    pub domain: String,
    /// Domain where this node's volumes keep their DTL [default: the node's own domain].
    pub recovery_domain: String,
    /// Listen address of the node's DTL server [default: an ephemeral port on the API's host].
    pub dtl_listen: String,
    /// `[cluster.etcd]`: TLS and authentication to the registry.
    pub etcd: EtcdSettings,
}

/// The node's upload scheduler (one for all volumes).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadSettings {
    /// Upload steps in flight at once across all volumes.
    pub concurrency: usize,
    /// Open TLog/SCO age after which they are closed and uploaded ("60s", "500ms"; "0s" = never).
    pub max_open_age: String,
}

impl Default for UploadSettings {
    fn default() -> Self {
        Self {
            concurrency: vstor_volumedriver::manager::DEFAULT_UPLOAD_CONCURRENCY,
            max_open_age: "60s".into(),
        }
    }
}

/// Background scrubbing: reclaim backend space once a volume's garbage passes a threshold.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrubSettings {
    pub auto: bool,
    /// Overwritten or trimmed data (`garbage_bytes`) above which a volume is scrubbed.
    pub garbage_threshold: String,
    /// Bytes per second a background scrub copies at most; "0" means unlimited.
    pub rate: String,
    pub check_interval_secs: u64,
}

impl Default for ScrubSettings {
    fn default() -> Self {
        Self {
            auto: true,
            garbage_threshold: "1G".into(),
            rate: "64M".into(),
            check_interval_secs: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VhostSettings {
    pub num_queues: u16,
    pub queue_size: u16,
    /// Longest a queue worker looks for the guest's next request before it sleeps ("32us";
    /// "0s": never). Adaptive: only queues whose guest comes back that fast poll at all.
    pub poll_max: String,
    /// Octal mode of every vhost-user socket ("0600": only the daemon's user may connect).
    pub socket_mode: String,
    /// User name or numeric uid that owns the sockets; empty: the daemon's user.
    pub socket_owner: String,
    /// Group name or numeric gid of the sockets; empty: the daemon's group.
    pub socket_group: String,
}

impl Default for VhostSettings {
    fn default() -> Self {
        Self {
            num_queues: 4,
            queue_size: 256,
            poll_max: "32us".into(),
            socket_mode: "0600".into(),
            socket_owner: String::new(),
            socket_group: String::new(),
        }
    }
}

impl VhostSettings {
    /// Mode, uid and gid of the sockets, resolved (names through the system's user database).
    fn socket_permissions(&self) -> Result<vstor_edge::vhost::SocketPermissions> {
        let mode_text = self.socket_mode.trim();
        let mode = u32::from_str_radix(mode_text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .with_context(|| {
                not_allowed(
                    "vhost.socket_mode",
                    &self.socket_mode,
                    "an octal mode such as \"0600\" or \"0660\"",
                )
            })?;
        let uid = match self.socket_owner.trim() {
            "" => None,
            name => Some(match name.parse::<u32>() {
                Ok(uid) => uid,
                Err(_) => nix::unistd::User::from_name(name)
                    .with_context(|| {
                        format!("setting vhost.socket_owner = {name:?}: cannot look the user up")
                    })?
                    .with_context(|| {
                        format!("setting vhost.socket_owner = {name:?}: no such user")
                    })?
                    .uid
                    .as_raw(),
            }),
        };
        let gid = match self.socket_group.trim() {
            "" => None,
            name => Some(match name.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => nix::unistd::Group::from_name(name)
                    .with_context(|| {
                        format!("setting vhost.socket_group = {name:?}: cannot look the group up")
                    })?
                    .with_context(|| {
                        format!("setting vhost.socket_group = {name:?}: no such group")
                    })?
                    .gid
                    .as_raw(),
            }),
        };
        Ok(vstor_edge::vhost::SocketPermissions { mode, uid, gid })
    }
}

/// `[api]`: where the management API listens and how it is protected. `api = "HOST:PORT"` (the
/// older spelling) is the same as a table with only `listen`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "ApiFileRepr")]
pub struct ApiFileSettings {
    pub listen: String,
    /// File holding the bearer token every API call but `GET /v1/health` must carry.
    pub token_file: Option<PathBuf>,
    /// PEM certificate chain and key: serve the API over HTTPS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// PEM CA the node trusts when it calls other nodes' HTTPS APIs; none: the system's.
    pub ca_file: Option<PathBuf>,
}

impl Default for ApiFileSettings {
    fn default() -> Self {
        Self {
            listen: DEFAULT_API.into(),
            token_file: None,
            tls_cert: None,
            tls_key: None,
            ca_file: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ApiFileRepr {
    Listen(String),
    Table(ApiTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiTable {
    listen: Option<String>,
    token_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

impl From<ApiFileRepr> for ApiFileSettings {
    fn from(repr: ApiFileRepr) -> Self {
        match repr {
            ApiFileRepr::Listen(listen) => Self {
                listen,
                ..Self::default()
            },
            ApiFileRepr::Table(t) => Self {
                listen: t.listen.unwrap_or_else(|| DEFAULT_API.into()),
                token_file: t.token_file,
                tls_cert: t.tls_cert,
                tls_key: t.tls_key,
                ca_file: t.ca_file,
            },
        }
    }
}

/// The API's protection, resolved and checked.
#[derive(Debug, Clone, Default)]
pub struct ApiSecurity {
    /// The bearer tokens (the file's lines; the first is sent to other nodes).
    pub token: Option<std::sync::Arc<crate::api_auth::ApiTokens>>,
    /// PEM certificate chain and key files, checked at startup.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// PEM CA file for calls to other nodes.
    pub ca_file: Option<PathBuf>,
}

impl ApiFileSettings {
    fn security(&self) -> Result<ApiSecurity> {
        let token = self
            .token_file
            .as_deref()
            .map(|path| {
                crate::api_auth::ApiTokens::load(path, "setting api.token_file (--api-token-file)")
            })
            .transpose()?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => bail!(
                "settings api.tls_cert (--api-tls-cert) and api.tls_key (--api-tls-key) go together: give both or neither"
            ),
        };
        Ok(ApiSecurity {
            token,
            tls,
            ca_file: self.ca_file.clone(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultVolume {
    pub create: bool,
    pub name: String,
    pub size: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeDefaults {
    pub sco_size: String,
    pub write_buffer: String,
    /// DTL mode of new volumes when a DTL is configured: sync or async.
    pub dtl_mode: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdSettings {
    pub max_payload: String,
    pub max_inflight_per_connection: usize,
    /// Time from connect to the transmission phase (options and TLS handshake), e.g. "30s".
    pub handshake_timeout: String,
    /// NBD connections at once, in total and from one client IP address.
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// Bytes of READ/WRITE requests in flight per connection before it stops reading.
    pub max_inflight_bytes_per_connection: String,
    /// `allow` or `require`; empty: `require` when `tls_cert` is set, no TLS otherwise.
    pub tls: String,
    /// PEM certificate chain of the server; empty: no TLS.
    pub tls_cert: String,
    /// PEM private key of `tls_cert`.
    pub tls_key: String,
    /// PEM CA certificates; when set, clients must present a certificate chaining to one.
    pub tls_ca: String,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./vstor-data"),
            backend: None,
            api: ApiFileSettings::default(),
            nbd: DEFAULT_NBD.into(),
            edge_listen: String::new(),
            edge_socket: None,
            vhost_dir: None,
            dtl: String::new(),
            write_buffer_limit: "8G".into(),
            read_cache: "auto".into(),
            shutdown_upload_timeout_secs: 120,
            s3_retry_timeout: "30s".into(),
            default_volume: DefaultVolume::default(),
            volume_defaults: VolumeDefaults::default(),
            nbd_server: NbdSettings::default(),
            vhost: VhostSettings::default(),
            scrub: ScrubSettings::default(),
            upload: UploadSettings::default(),
            cluster: ClusterFileSettings::default(),
            mds: MdsFileSettings::default(),
            peer_tls: PeerTlsSettings::default(),
        }
    }
}

impl Default for DefaultVolume {
    fn default() -> Self {
        Self {
            create: true,
            name: "vol0".into(),
            size: "10G".into(),
        }
    }
}

impl Default for VolumeDefaults {
    fn default() -> Self {
        Self {
            sco_size: "64M".into(),
            write_buffer: "1G".into(),
            dtl_mode: "sync".into(),
        }
    }
}

impl Default for NbdSettings {
    fn default() -> Self {
        Self {
            max_payload: "32M".into(),
            max_inflight_per_connection: 64,
            handshake_timeout: "30s".into(),
            max_connections: 1024,
            max_connections_per_client: 128,
            max_inflight_bytes_per_connection: "256M".into(),
            tls: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_ca: String::new(),
        }
    }
}

impl NbdSettings {
    /// The TLS settings, checked and loaded: a mode without a certificate, a certificate without
    /// a key, unreadable files and bad PEM stop the node here.
    pub fn resolve_tls(&self) -> Result<Option<NbdTls>> {
        let path = |s: &str| Some(s.trim()).filter(|s| !s.is_empty()).map(PathBuf::from);
        let (cert, key, ca) = (
            path(&self.tls_cert),
            path(&self.tls_key),
            path(&self.tls_ca),
        );
        let mode = match self.tls.trim() {
            "" => None,
            mode => Some(mode.parse::<TlsMode>().map_err(|_| {
                anyhow::anyhow!(not_allowed(
                    "nbd_server.tls (--nbd-tls)",
                    mode,
                    "allow or require"
                ))
            })?),
        };
        let (cert, key) = match (cert, key) {
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => bail!(
                "setting nbd_server.tls_cert (--tls-cert) needs nbd_server.tls_key (--tls-key)"
            ),
            (None, Some(_)) => bail!(
                "setting nbd_server.tls_key (--tls-key) needs nbd_server.tls_cert (--tls-cert)"
            ),
            (None, None) => {
                if mode.is_some() {
                    bail!(
                        "setting nbd_server.tls (--nbd-tls) = {:?} needs a server certificate: \
                         set nbd_server.tls_cert and tls_key (--tls-cert, --tls-key)",
                        self.tls.trim()
                    );
                }
                if ca.is_some() {
                    bail!(
                        "setting nbd_server.tls_ca (--tls-ca) needs a server certificate: set \
                         nbd_server.tls_cert and tls_key (--tls-cert, --tls-key)"
                    );
                }
                return Ok(None);
            }
        };
        let files = TlsFiles { cert, key, ca };
        let tls = NbdTls::load(&files, mode.unwrap_or(TlsMode::Require))
            .context("cannot set up NBD TLS (nbd_server.tls_*, --tls-*)")?;
        Ok(Some(tls))
    }
}

/// Where the node keeps its backend objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// A local (or shared) directory.
    Dir(PathBuf),
    /// An S3 bucket and key prefix; endpoint and credentials come from the `AWS_*` environment.
    S3(vstor_backend::S3Location),
    /// The erasure-coded tier over the cluster's OSDs; new namespaces use `preset` unless the
    /// volume names one (`None`: the tier's `default` preset, created when missing).
    Ec { preset: Option<String> },
}

impl BackendSpec {
    /// A value starting with `s3://` selects S3, `ec` or `ec:PRESET` the erasure-coded tier,
    /// anything else is a directory (write `./ec` for a directory called `ec`).
    pub fn parse(value: &std::path::Path) -> Result<Self> {
        match value.to_str() {
            Some(text) if text.starts_with("s3://") => Ok(Self::S3(
                vstor_backend::S3Location::parse(text)
                    .map_err(|e| anyhow::anyhow!("setting backend: {e}"))?,
            )),
            Some("ec") => Ok(Self::Ec { preset: None }),
            Some(text) if text.starts_with("ec:") => {
                let preset = &text[3..];
                vstor_backend::validate_name(preset).map_err(|e| {
                    anyhow::anyhow!("setting backend (--backend) = {text:?}: preset name: {e}")
                })?;
                Ok(Self::Ec {
                    preset: Some(preset.to_string()),
                })
            }
            _ => Ok(Self::Dir(value.to_path_buf())),
        }
    }
}

impl std::fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(dir) => write!(f, "{}", dir.display()),
            Self::S3(location) => write!(f, "{location}"),
            Self::Ec { preset: None } => write!(f, "ec"),
            Self::Ec {
                preset: Some(preset),
            } => write!(f, "ec:{preset}"),
        }
    }
}

/// Resolved, validated settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub backend: BackendSpec,
    pub api: SocketAddr,
    pub nbd: SocketAddr,
    /// `Some`: serve the edge protocol there (`vstor serve --edge-listen`).
    pub edge_listen: Option<SocketAddr>,
    /// `Some`: also serve it on this unix socket, for edges on this host
    /// (`vstor serve --edge-socket`).
    pub edge_socket: Option<PathBuf>,
    /// A partly received edge-protocol frame must be complete within this
    /// (`--edge-frame-timeout`).
    pub edge_frame_timeout: std::time::Duration,
    pub vhost_dir: PathBuf,
    pub vhost_queues: u16,
    pub vhost_queue_size: u16,
    /// `[vhost] poll_max`, parsed.
    pub vhost_poll_max: std::time::Duration,
    /// Mode and owner of the vhost-user sockets (`[vhost] socket_*`).
    pub vhost_socket: vstor_edge::vhost::SocketPermissions,
    /// API token and TLS (`[api]`, `--api-token-file`, `--api-tls-*`).
    pub api_security: ApiSecurity,
    pub write_buffer_limit: u64,
    /// Bytes of the node's read cache (`read_cache`, "auto" resolved); 0: none.
    pub read_cache: u64,
    pub shutdown_upload_timeout_secs: u64,
    /// How long one S3 request is retried (`s3_retry_timeout`).
    pub s3_retry_timeout: std::time::Duration,
    pub default_volume: Option<(String, u64)>,
    pub sco_size: u64,
    pub write_buffer: u64,
    pub nbd_max_payload: u32,
    pub nbd_max_inflight: usize,
    pub nbd_handshake_timeout: std::time::Duration,
    pub nbd_max_connections: usize,
    pub nbd_max_connections_per_client: usize,
    pub nbd_max_inflight_bytes: u64,
    /// `Some`: NBD clients may (or must) use TLS; the files are loaded and checked.
    pub nbd_tls: Option<NbdTls>,
    /// DTL of new volumes: `None` means mode `none`.
    pub dtl: Option<(DtlMode, String)>,
    /// Background scrubbing; `None` when `scrub.auto` is false.
    pub auto_scrub: Option<AutoScrub>,
    pub upload_concurrency: usize,
    /// `None`: open TLogs are not closed by age.
    pub max_open_age: Option<std::time::Duration>,
    /// The node's name and domain, and its cluster registry if it has one.
    pub identity: NodeIdentity,
    /// The volumes' metadata servers, if any.
    pub mds: Option<crate::mds_link::MdsSettings>,
    /// Mutual TLS on the internal links (`[peer_tls]`), loaded and checked.
    pub peer_tls: Option<vstor_net::PeerTls>,
}

/// Resolved `[scrub]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoScrub {
    pub garbage_threshold: u64,
    /// Bytes per second; `None` is unlimited.
    pub rate: Option<u64>,
    pub check_interval: std::time::Duration,
}

/// Flags of `vstor serve` that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub backend: Option<PathBuf>,
    pub api: Option<String>,
    pub api_token_file: Option<PathBuf>,
    pub api_tls_cert: Option<PathBuf>,
    pub api_tls_key: Option<PathBuf>,
    pub api_ca: Option<PathBuf>,
    pub nbd: Option<String>,
    pub edge_listen: Option<String>,
    pub edge_socket: Option<PathBuf>,
    pub edge_frame_timeout: Option<std::time::Duration>,
    pub vhost_dir: Option<PathBuf>,
    pub dtl: Option<String>,
    pub write_buffer_limit: Option<String>,
    pub read_cache: Option<String>,
    pub s3_retry_timeout: Option<String>,
    pub upload_concurrency: Option<usize>,
    pub no_default_volume: bool,
    pub registry: Option<String>,
    pub node: Option<String>,
    pub domain: Option<String>,
    pub recovery_domain: Option<String>,
    pub dtl_listen: Option<String>,
    /// `--mds A,B`: replaces `mds.servers`.
    pub mds: Option<Vec<String>>,
    pub mds_max_behind: Option<u64>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub tls_ca: Option<String>,
    /// `--nbd-tls allow|require`.
    pub nbd_tls: Option<String>,
    pub nbd_max_connections: Option<usize>,
    pub nbd_max_connections_per_client: Option<usize>,
    pub peer_tls_cert: Option<PathBuf>,
    pub peer_tls_key: Option<PathBuf>,
    pub peer_tls_ca: Option<PathBuf>,
    /// `--etcd-*`: override `[cluster.etcd]`.
    pub etcd: EtcdSettings,
}

/// The node's place in a cluster, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The etcd endpoints (`http://host:port` or `https://host:port`) and how to reach them.
    pub registry: crate::registry::etcd::EtcdTarget,
    pub node: String,
    pub domain: String,
    pub recovery_domain: Option<String>,
    /// `None`: an ephemeral port on the API's host.
    pub dtl_listen: Option<SocketAddr>,
}

/// This node's identity: its registry (`cluster`, or none: the local registry file) and, in the
/// single-node default, its name and domain for `vstor node list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    pub domain: String,
    pub cluster: Option<ClusterConfig>,
}

fn parse_addr(what: &str, value: &str) -> Result<SocketAddr> {
    value
        .parse()
        .with_context(|| format!("{what} address {value:?} is not IP:PORT"))
}

/// The one-line error for a setting outside its allowed range.
fn not_allowed(setting: &str, value: impl std::fmt::Debug, allowed: &str) -> String {
    format!("setting {setting} = {value:?} is not allowed: must be {allowed}")
}

/// What `read_cache = "auto"` means on S3 and the erasure-coded tier: 65,536 blocks of 4 KiB.
const DEFAULT_READ_CACHE: u64 = 256 << 20;

fn size_setting(what: &str, value: &str) -> Result<u64> {
    parse_size(value).with_context(|| format!("setting {what}"))
}

impl FileConfig {
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn resolve(mut self, overrides: Overrides) -> Result<ServeConfig> {
        if let Some(dir) = overrides.data_dir {
            self.data_dir = dir;
        }
        if let Some(dir) = overrides.backend {
            self.backend = Some(dir);
        }
        if let Some(api) = overrides.api {
            self.api.listen = api;
        }
        for (field, value) in [
            (&mut self.api.token_file, overrides.api_token_file),
            (&mut self.api.tls_cert, overrides.api_tls_cert),
            (&mut self.api.tls_key, overrides.api_tls_key),
            (&mut self.api.ca_file, overrides.api_ca),
        ] {
            if value.is_some() {
                *field = value;
            }
        }
        if let Some(nbd) = overrides.nbd {
            self.nbd = nbd;
        }
        if let Some(edge) = overrides.edge_listen {
            self.edge_listen = edge;
        }
        if let Some(path) = overrides.edge_socket {
            self.edge_socket = Some(path);
        }
        if let Some(dir) = overrides.vhost_dir {
            self.vhost_dir = Some(dir);
        }
        if let Some(dtl) = overrides.dtl {
            self.dtl = dtl;
        }
        if let Some(limit) = overrides.write_buffer_limit {
            self.write_buffer_limit = limit;
        }
        if let Some(size) = overrides.read_cache {
            self.read_cache = size;
        }
        if let Some(timeout) = overrides.s3_retry_timeout {
            self.s3_retry_timeout = timeout;
        }
        if let Some(concurrency) = overrides.upload_concurrency {
            self.upload.concurrency = concurrency;
        }
        if let Some(servers) = overrides.mds {
            self.mds.servers = servers;
        }
        if let Some(max_behind) = overrides.mds_max_behind {
            self.mds.max_behind = max_behind;
        }
        let n = &mut self.nbd_server;
        for (field, value) in [
            (&mut n.tls_cert, overrides.tls_cert),
            (&mut n.tls_key, overrides.tls_key),
            (&mut n.tls_ca, overrides.tls_ca),
            (&mut n.tls, overrides.nbd_tls),
        ] {
            if let Some(value) = value {
                *field = value;
            }
        }
        if let Some(n) = overrides.nbd_max_connections {
            self.nbd_server.max_connections = n;
        }
        if let Some(n) = overrides.nbd_max_connections_per_client {
            self.nbd_server.max_connections_per_client = n;
        }
        if overrides.no_default_volume {
            self.default_volume.create = false;
        }
        let c = &mut self.cluster;
        for (field, value) in [
            (&mut c.registry, overrides.registry),
            (&mut c.node, overrides.node),
            (&mut c.domain, overrides.domain),
            (&mut c.recovery_domain, overrides.recovery_domain),
            (&mut c.dtl_listen, overrides.dtl_listen),
        ] {
            if let Some(value) = value {
                *field = value;
            }
        }
        self.cluster.etcd.merge(overrides.etcd);
        let identity = self.cluster.resolve()?;
        let max_payload = size_setting("nbd_server.max_payload", &self.nbd_server.max_payload)?;
        if !(4096..=u64::from(u32::MAX)).contains(&max_payload) {
            bail!(not_allowed(
                "nbd_server.max_payload",
                &self.nbd_server.max_payload,
                "from 4K to 4G"
            ));
        }
        if !(1..=MAX_QUEUES).contains(&self.vhost.num_queues) {
            bail!(not_allowed(
                "vhost.num_queues",
                self.vhost.num_queues,
                &format!("from 1 to {MAX_QUEUES}")
            ));
        }
        let queue_size = self.vhost.queue_size;
        if !queue_size.is_power_of_two() || !(4..=1024).contains(&queue_size) {
            bail!(not_allowed(
                "vhost.queue_size",
                queue_size,
                "a power of two from 4 to 1024"
            ));
        }
        let vhost_poll_max = humantime::parse_duration(self.vhost.poll_max.trim())
            .ok()
            .filter(|t| *t <= vstor_edge::vhost::MAX_POLL)
            .ok_or_else(|| {
                anyhow::anyhow!(not_allowed(
                    "vhost.poll_max",
                    &self.vhost.poll_max,
                    "a duration from \"0s\" to \"1ms\", like \"32us\""
                ))
            })?;
        if self.nbd_server.max_inflight_per_connection == 0 {
            bail!(not_allowed(
                "nbd_server.max_inflight_per_connection",
                0,
                "at least 1"
            ));
        }
        let nbd_handshake_timeout =
            humantime::parse_duration(self.nbd_server.handshake_timeout.trim())
                .ok()
                .filter(|t| !t.is_zero())
                .ok_or_else(|| {
                    anyhow::anyhow!(not_allowed(
                        "nbd_server.handshake_timeout",
                        &self.nbd_server.handshake_timeout,
                        "a nonzero duration like \"30s\""
                    ))
                })?;
        let nbd_tls = self.nbd_server.resolve_tls()?;
        self.peer_tls.merge(
            overrides.peer_tls_cert,
            overrides.peer_tls_key,
            overrides.peer_tls_ca,
        );
        let peer_tls = self.peer_tls.load()?;
        for (setting, value) in [
            (
                "nbd_server.max_connections (--nbd-max-connections)",
                self.nbd_server.max_connections,
            ),
            (
                "nbd_server.max_connections_per_client (--nbd-max-connections-per-client)",
                self.nbd_server.max_connections_per_client,
            ),
        ] {
            if value == 0 {
                bail!(not_allowed(setting, 0, "at least 1"));
            }
        }
        let nbd_max_inflight_bytes = size_setting(
            "nbd_server.max_inflight_bytes_per_connection",
            &self.nbd_server.max_inflight_bytes_per_connection,
        )?;
        if nbd_max_inflight_bytes < max_payload {
            bail!(not_allowed(
                "nbd_server.max_inflight_bytes_per_connection",
                &self.nbd_server.max_inflight_bytes_per_connection,
                &format!(
                    "at least nbd_server.max_payload ({})",
                    self.nbd_server.max_payload
                )
            ));
        }
        let dtl_mode: DtlMode = self
            .volume_defaults
            .dtl_mode
            .parse()
            .ok()
            .filter(|mode| *mode != DtlMode::None)
            .ok_or_else(|| {
                anyhow::anyhow!(not_allowed(
                    "volume_defaults.dtl_mode",
                    &self.volume_defaults.dtl_mode,
                    "sync or async (leave `dtl` empty for no DTL)"
                ))
            })?;
        let dtl = match self.dtl.trim() {
            "" => None,
            addr => {
                let port = addr
                    .rsplit_once(':')
                    .map(|(host, port)| (host, port.parse::<u16>()));
                if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p > 0) {
                    bail!("setting dtl (--dtl) = {addr:?} is not allowed: must be HOST:PORT");
                }
                Some((dtl_mode, addr.to_string()))
            }
        };
        let auto_scrub = if self.scrub.auto {
            if self.scrub.check_interval_secs == 0 {
                bail!(not_allowed("scrub.check_interval_secs", 0, "at least 1"));
            }
            let rate = size_setting("scrub.rate", &self.scrub.rate)?;
            Some(AutoScrub {
                garbage_threshold: size_setting(
                    "scrub.garbage_threshold",
                    &self.scrub.garbage_threshold,
                )?,
                rate: (rate > 0).then_some(rate),
                check_interval: std::time::Duration::from_secs(self.scrub.check_interval_secs),
            })
        } else {
            None
        };
        if !(1..=256).contains(&self.upload.concurrency) {
            bail!("upload.concurrency must be between 1 and 256");
        }
        let max_open_age = humantime::parse_duration(self.upload.max_open_age.trim())
            .with_context(|| {
                format!(
                    "setting upload.max_open_age: {:?} is not a duration like \"60s\"",
                    self.upload.max_open_age
                )
            })?;
        let default_volume = if self.default_volume.create {
            let (name, size) = (&self.default_volume.name, &self.default_volume.size);
            validate_volume_name(name).map_err(|e| {
                anyhow::anyhow!("setting default_volume.name = {name:?} is not allowed: {e}")
            })?;
            let bytes = size_setting("default_volume.size", size)?;
            if validate_size(name, bytes).is_err() {
                bail!(not_allowed(
                    "default_volume.size",
                    size,
                    "a multiple of 4K from 4K to 64T"
                ));
            }
            Some((name.clone(), bytes))
        } else {
            None
        };
        let s3_retry_timeout = humantime::parse_duration(self.s3_retry_timeout.trim())
            .ok()
            .filter(|t| (S3_RETRY_TIMEOUT_MIN..=S3_RETRY_TIMEOUT_MAX).contains(t))
            .ok_or_else(|| {
                anyhow::anyhow!(not_allowed(
                    "s3_retry_timeout (--s3-retry-timeout)",
                    &self.s3_retry_timeout,
                    "a duration from 1s to 1h, like \"30s\""
                ))
            })?;
        let write_buffer_limit = size_setting("write_buffer_limit", &self.write_buffer_limit)?;
        if write_buffer_limit < USER_SCO_SIZE_RANGE.0 {
            bail!(not_allowed(
                "write_buffer_limit (--write-buffer-limit)",
                &self.write_buffer_limit,
                "at least 4M (one SCO)"
            ));
        }
        let sco_size = size_setting("volume_defaults.sco_size", &self.volume_defaults.sco_size)?;
        let (min_sco, max_sco) = USER_SCO_SIZE_RANGE;
        if !(min_sco..=max_sco).contains(&sco_size) || !sco_size.is_multiple_of(CLUSTER_SIZE) {
            bail!(not_allowed(
                "volume_defaults.sco_size",
                &self.volume_defaults.sco_size,
                "a multiple of 4K from 4M to 128M"
            ));
        }
        let write_buffer = size_setting(
            "volume_defaults.write_buffer",
            &self.volume_defaults.write_buffer,
        )?;
        if write_buffer < sco_size {
            bail!(not_allowed(
                "volume_defaults.write_buffer",
                &self.volume_defaults.write_buffer,
                &format!(
                    "at least volume_defaults.sco_size ({})",
                    self.volume_defaults.sco_size
                )
            ));
        }
        let backend = BackendSpec::parse(
            &self
                .backend
                .clone()
                .unwrap_or_else(|| self.data_dir.join("backend")),
        )?;
        let read_cache = match self.read_cache.trim() {
            // A directory's reads are the kernel's page cache already.
            "auto" if matches!(backend, BackendSpec::Dir(_)) => 0,
            "auto" => DEFAULT_READ_CACHE,
            size => size_setting("read_cache (--read-cache)", size)?,
        };
        if matches!(backend, BackendSpec::Ec { .. }) && identity.cluster.is_none() {
            bail!(
                "setting backend (--backend) = {backend}: the erasure-coded tier needs the \
                 cluster registry its OSDs register in (--registry etcd://HOST:PORT)"
            );
        }
        Ok(ServeConfig {
            backend,
            api: parse_addr("API", &self.api.listen)?,
            api_security: self.api.security()?,
            vhost_socket: self.vhost.socket_permissions()?,
            nbd: parse_addr("NBD", &self.nbd)?,
            edge_listen: Some(self.edge_listen.trim())
                .filter(|addr| !addr.is_empty())
                .map(|addr| parse_addr("setting edge_listen (--edge-listen)", addr))
                .transpose()?,
            edge_socket: match self.edge_socket.filter(|p| !p.as_os_str().is_empty()) {
                // Edges elsewhere, and every edge after a failover to another host, need TCP;
                // the socket is a shortcut next to it, not instead of it.
                Some(path) if self.edge_listen.trim().is_empty() => anyhow::bail!(
                    "setting edge_socket (--edge-socket {}) needs edge_listen (--edge-listen \
                     HOST:PORT): edges on other hosts reach the node over TCP",
                    path.display()
                ),
                socket => socket,
            },
            edge_frame_timeout: overrides
                .edge_frame_timeout
                .unwrap_or(std::time::Duration::from_secs(30)),
            vhost_dir: self
                .vhost_dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("vhost")),
            vhost_queues: self.vhost.num_queues,
            vhost_queue_size: self.vhost.queue_size,
            vhost_poll_max,
            write_buffer_limit,
            read_cache,
            shutdown_upload_timeout_secs: self.shutdown_upload_timeout_secs,
            s3_retry_timeout,
            default_volume,
            sco_size,
            write_buffer,
            nbd_max_payload: max_payload as u32,
            nbd_max_inflight: self.nbd_server.max_inflight_per_connection,
            nbd_handshake_timeout,
            nbd_max_connections: self.nbd_server.max_connections,
            nbd_max_connections_per_client: self.nbd_server.max_connections_per_client,
            nbd_max_inflight_bytes,
            nbd_tls,
            peer_tls,
            dtl,
            auto_scrub,
            upload_concurrency: self.upload.concurrency,
            max_open_age: (!max_open_age.is_zero()).then_some(max_open_age),
            mds: self.mds.resolve(identity.cluster.is_some())?,
            data_dir: self.data_dir,
            identity,
        })
    }
}

/// An edge name (`vstor edge --name`): the same characters as a node or volume name.
pub fn validate_edge_name(name: &str) -> Result<()> {
    validate_volume_name(name).map_err(|_| {
        anyhow::anyhow!(
            "edge name {name:?} is not allowed: use letters, digits, '-', '_' and '.' (--name)"
        )
    })
}

impl ClusterFileSettings {
    fn resolve(&self) -> Result<NodeIdentity> {
        let text = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        let domain = text(&self.domain).unwrap_or_else(|| "default".into());
        let Some(registry) = text(&self.registry) else {
            if text(&self.recovery_domain).is_some() || text(&self.dtl_listen).is_some() {
                bail!("setting cluster.recovery_domain (--recovery-domain) and cluster.dtl_listen (--dtl-listen) need a cluster registry (--registry etcd://HOST:PORT)");
            }
            if !self.etcd.is_empty() {
                bail!("settings cluster.etcd (--etcd-*, --registry-timeout) need a cluster registry (--registry etcd+https://HOST:PORT or etcd://HOST:PORT)");
            }
            return Ok(NodeIdentity {
                name: text(&self.node).unwrap_or_else(|| "local".into()),
                domain,
                cluster: None,
            });
        };
        let target = self
            .etcd
            .target("setting cluster.registry (--registry)", &registry)?;
        let Some(node) = text(&self.node) else {
            bail!("a cluster node needs a name: give --node NAME (or cluster.node in the config file)");
        };
        validate_volume_name(&node)
            .map_err(|_| anyhow::anyhow!("setting cluster.node (--node) = {node:?} is not allowed: use letters, digits, '-', '_' and '.'"))?;
        let dtl_listen = text(&self.dtl_listen)
            .map(|addr| parse_addr("DTL listen (--dtl-listen)", &addr))
            .transpose()?;
        Ok(NodeIdentity {
            name: node.clone(),
            domain,
            cluster: Some(ClusterConfig {
                registry: target,
                node,
                domain: text(&self.domain).unwrap_or_else(|| "default".into()),
                recovery_domain: text(&self.recovery_domain),
                dtl_listen,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_documents_the_defaults() {
        let text = include_str!("../docs/vstor.example.toml");
        let parsed: FileConfig = toml::from_str(text).expect("example parses");
        assert_eq!(parsed, FileConfig::default());
    }

    #[test]
    fn api_is_an_address_or_a_table() {
        let old: FileConfig = toml::from_str("api = \"0.0.0.0:7900\"").unwrap();
        assert_eq!(old.api.listen, "0.0.0.0:7900");
        assert_eq!(old.api.token_file, None);
        let table: FileConfig =
            toml::from_str("[api]\ntoken_file = \"/t\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\n")
                .unwrap();
        assert_eq!(table.api.listen, DEFAULT_API);
        assert_eq!(table.api.token_file, Some(PathBuf::from("/t")));
        assert_eq!(table.api.tls_key, Some(PathBuf::from("/k")));
        assert!(toml::from_str::<FileConfig>("[api]\ntoken = \"x\"").is_err());
        let vhost: FileConfig =
            toml::from_str("[vhost]\nsocket_mode = \"0660\"\nsocket_group = \"6\"\n").unwrap();
        let resolved = vhost.resolve(Overrides::default()).unwrap();
        assert_eq!(resolved.vhost_socket.mode, 0o660);
        assert_eq!(resolved.vhost_socket.gid, Some(6));
        assert_eq!(resolved.vhost_socket.uid, None);
        assert_eq!(
            resolved.vhost_poll_max,
            std::time::Duration::from_micros(32),
            "default"
        );
        let poll: FileConfig = toml::from_str("[vhost]\npoll_max = \"0s\"\n").unwrap();
        let resolved = poll.resolve(Overrides::default()).unwrap();
        assert_eq!(resolved.vhost_poll_max, std::time::Duration::ZERO);
    }

    #[test]
    fn mds_settings_resolve_and_are_checked() {
        let text = "[mds]\nservers = [\"10.0.0.1:10820\", \"mds-b:10820\"]\nmax_behind = 3\ncheck_every = \"500ms\"\n";
        let file: FileConfig = toml::from_str(text).unwrap();
        let mds = file
            .clone()
            .resolve(Overrides::default())
            .unwrap()
            .mds
            .unwrap();
        assert_eq!(mds.servers, ["10.0.0.1:10820", "mds-b:10820"]);
        assert_eq!(mds.max_behind, 3);
        assert_eq!(mds.check_every, std::time::Duration::from_millis(500));
        // Flags replace the file's servers and limit.
        let flags = file
            .resolve(Overrides {
                mds: Some(vec!["127.0.0.1:1".into()]),
                mds_max_behind: Some(9),
                ..Overrides::default()
            })
            .unwrap()
            .mds
            .unwrap();
        assert_eq!(
            (flags.servers, flags.max_behind),
            (vec!["127.0.0.1:1".to_string()], 9)
        );
        // None on a single node; automatic (no servers) on a cluster.
        assert_eq!(
            FileConfig::default()
                .resolve(Overrides::default())
                .unwrap()
                .mds,
            None
        );
        let cluster = FileConfig::default()
            .resolve(Overrides {
                registry: Some("etcd://127.0.0.1:2379".into()),
                node: Some("n1".into()),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(cluster.mds.unwrap().servers, Vec::<String>::new());
        let bad: FileConfig =
            toml::from_str("[mds]\nservers = [\"a:1\"]\ncheck_every = \"0s\"\n").unwrap();
        let err = format!("{:#}", bad.resolve(Overrides::default()).unwrap_err());
        assert!(err.contains("mds.check_every"), "{err}");
    }

    #[test]
    fn cluster_settings_resolve_and_are_checked() {
        let cluster = |c: ClusterFileSettings| {
            FileConfig {
                cluster: c,
                ..FileConfig::default()
            }
            .resolve(Overrides::default())
        };
        let single = cluster(ClusterFileSettings::default()).unwrap();
        assert_eq!(single.identity.cluster, None);
        assert_eq!(single.identity.name, "local");
        let node = cluster(ClusterFileSettings {
            registry: "etcd://127.0.0.1:2379,127.0.0.2:2379".into(),
            node: "n1".into(),
            domain: "rack1".into(),
            recovery_domain: "rack2".into(),
            dtl_listen: "127.0.0.1:10900".into(),
            ..Default::default()
        })
        .unwrap();
        let c = node.identity.cluster.unwrap();
        assert_eq!(
            c.registry.endpoints,
            ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]
        );
        assert_eq!((c.node.as_str(), c.domain.as_str()), ("n1", "rack1"));
        assert_eq!(c.recovery_domain.as_deref(), Some("rack2"));
        assert_eq!(c.dtl_listen, Some("127.0.0.1:10900".parse().unwrap()));
        let errors = [
            (
                ClusterFileSettings {
                    registry: "etcd://x:1".into(),
                    ..Default::default()
                },
                "--node NAME",
            ),
            (
                ClusterFileSettings {
                    registry: "x:1".into(),
                    node: "n".into(),
                    ..Default::default()
                },
                "etcd://HOST:PORT",
            ),
            (
                ClusterFileSettings {
                    registry: "etcd://x:1".into(),
                    node: "a/b".into(),
                    ..Default::default()
                },
                "cluster.node",
            ),
            (
                ClusterFileSettings {
                    recovery_domain: "r".into(),
                    ..Default::default()
                },
                "need a cluster registry",
            ),
        ];
        for (settings, expected) in errors {
            let err = cluster(settings).unwrap_err();
            assert!(format!("{err:#}").contains(expected), "{err:#}");
        }
    }

    #[test]
    fn unknown_settings_and_bad_values_are_rejected() {
        assert!(toml::from_str::<FileConfig>("dat_dir = \"x\"").is_err());
        let bad = FileConfig {
            api: ApiFileSettings {
                listen: "localhost".into(),
                ..ApiFileSettings::default()
            },
            ..FileConfig::default()
        };
        let err = bad.resolve(Overrides::default()).unwrap_err();
        assert!(
            format!("{err:#}").contains("API address \"localhost\""),
            "{err:#}"
        );
        let bad = FileConfig {
            write_buffer_limit: "lots".into(),
            ..FileConfig::default()
        };
        let err = bad.resolve(Overrides::default()).unwrap_err();
        assert!(format!("{err:#}").contains("write_buffer_limit"), "{err:#}");
        let bad = FileConfig {
            scrub: ScrubSettings {
                rate: "fast".into(),
                ..ScrubSettings::default()
            },
            ..FileConfig::default()
        };
        let err = bad.resolve(Overrides::default()).unwrap_err();
        assert!(format!("{err:#}").contains("scrub.rate"), "{err:#}");
    }

    /// `read_cache = "auto"` is off on a directory and 256M on S3; a size or the flag wins.
    #[test]
    fn the_read_cache_is_sized_by_backend_unless_given() {
        let resolve = |toml: &str, flag: Option<&str>| {
            let file: FileConfig = toml::from_str(toml).unwrap();
            let overrides = Overrides {
                read_cache: flag.map(str::to_string),
                ..Overrides::default()
            };
            file.resolve(overrides).unwrap().read_cache
        };
        assert_eq!(resolve("", None), 0);
        assert_eq!(resolve("backend = \"s3://bucket/p\"", None), 256 << 20);
        assert_eq!(
            resolve("backend = \"s3://bucket/p\"\nread_cache = \"0\"", None),
            0
        );
        assert_eq!(resolve("read_cache = \"64M\"", None), 64 << 20);
        assert_eq!(resolve("read_cache = \"64M\"", Some("1G")), 1 << 30);
    }

    /// Every bad value stops the node with one line naming the setting and its allowed range.
    #[test]
    fn every_bad_value_is_named_with_its_allowed_range() {
        let cases: &[(&str, &str)] = &[
            ("[volume_defaults]\nsco_size = \"3M\"", "setting volume_defaults.sco_size = \"3M\" is not allowed: must be a multiple of 4K from 4M to 128M"),
            ("[volume_defaults]\nsco_size = \"256M\"", "volume_defaults.sco_size = \"256M\""),
            ("[volume_defaults]\nsco_size = \"5000000\"", "volume_defaults.sco_size = \"5000000\""),
            ("[volume_defaults]\nsco_size = \"big\"", "setting volume_defaults.sco_size"),
            ("[volume_defaults]\nwrite_buffer = \"8M\"", "volume_defaults.write_buffer = \"8M\" is not allowed: must be at least volume_defaults.sco_size (64M)"),
            ("[volume_defaults]\ndtl_mode = \"none\"", "volume_defaults.dtl_mode = \"none\" is not allowed: must be sync or async"),
            ("[volume_defaults]\ndtl_mode = \"fast\"", "volume_defaults.dtl_mode = \"fast\""),
            ("write_buffer_limit = \"1M\"", "write_buffer_limit (--write-buffer-limit) = \"1M\" is not allowed: must be at least 4M"),
            ("write_buffer_limit = \"lots\"", "setting write_buffer_limit"),
            ("read_cache = \"lots\"", "setting read_cache (--read-cache)"),
            ("s3_retry_timeout = \"soon\"", "setting s3_retry_timeout (--s3-retry-timeout) = \"soon\" is not allowed: must be a duration from 1s to 1h"),
            ("s3_retry_timeout = \"0s\"", "s3_retry_timeout (--s3-retry-timeout) = \"0s\""),
            ("s3_retry_timeout = \"2h\"", "s3_retry_timeout (--s3-retry-timeout) = \"2h\""),
            ("dtl = \"localhost\"", "setting dtl (--dtl) = \"localhost\" is not allowed: must be HOST:PORT"),
            ("dtl = \"host:99999\"", "setting dtl (--dtl) = \"host:99999\""),
            ("api = \"localhost\"", "API address \"localhost\" is not IP:PORT"),
            ("nbd = \"127.0.0.1\"", "NBD address \"127.0.0.1\" is not IP:PORT"),
            ("[default_volume]\nsize = \"0\"", "default_volume.size = \"0\" is not allowed: must be a multiple of 4K from 4K to 64T"),
            ("[default_volume]\nsize = \"1000\"", "default_volume.size = \"1000\""),
            ("[default_volume]\nsize = \"65T\"", "default_volume.size = \"65T\""),
            ("[default_volume]\nname = \"a/b\"", "setting default_volume.name = \"a/b\" is not allowed"),
            ("[default_volume]\nname = \"\"", "setting default_volume.name = \"\" is not allowed"),
            ("[vhost]\nnum_queues = 0", "vhost.num_queues = 0 is not allowed: must be from 1 to 8"),
            ("[vhost]\nnum_queues = 9", "vhost.num_queues = 9"),
            ("[vhost]\nqueue_size = 2", "vhost.queue_size = 2 is not allowed: must be a power of two from 4 to 1024"),
            ("[vhost]\nqueue_size = 100", "vhost.queue_size = 100"),
            ("[vhost]\nqueue_size = 2048", "vhost.queue_size = 2048"),
            ("[vhost]\npoll_max = \"2ms\"", "vhost.poll_max = \"2ms\" is not allowed: must be a duration from \"0s\" to \"1ms\""),
            ("[vhost]\npoll_max = \"short\"", "vhost.poll_max = \"short\""),
            ("[nbd_server]\nmax_payload = \"1K\"", "nbd_server.max_payload = \"1K\" is not allowed: must be from 4K to 4G"),
            ("[nbd_server]\nmax_payload = \"5G\"", "nbd_server.max_payload = \"5G\""),
            ("[nbd_server]\nmax_inflight_per_connection = 0", "nbd_server.max_inflight_per_connection = 0 is not allowed: must be at least 1"),
            ("[nbd_server]\nhandshake_timeout = \"0s\"", "nbd_server.handshake_timeout = \"0s\" is not allowed: must be a nonzero duration"),
            ("[nbd_server]\nhandshake_timeout = \"soon\"", "nbd_server.handshake_timeout = \"soon\""),
            ("[nbd_server]\nmax_connections = 0", "nbd_server.max_connections (--nbd-max-connections) = 0 is not allowed: must be at least 1"),
            ("[nbd_server]\nmax_connections_per_client = 0", "nbd_server.max_connections_per_client (--nbd-max-connections-per-client) = 0"),
            ("[nbd_server]\nmax_inflight_bytes_per_connection = \"1M\"", "nbd_server.max_inflight_bytes_per_connection = \"1M\" is not allowed: must be at least nbd_server.max_payload (32M)"),
            ("[nbd_server]\ntls = \"maybe\"", "nbd_server.tls (--nbd-tls) = \"maybe\" is not allowed: must be allow or require"),
            ("[nbd_server]\ntls_ca = \"ca.pem\"", "nbd_server.tls_ca (--tls-ca) needs a server certificate"),
            ("[scrub]\ncheck_interval_secs = 0", "scrub.check_interval_secs = 0 is not allowed: must be at least 1"),
            ("[scrub]\nrate = \"fast\"", "setting scrub.rate"),
            ("[scrub]\ngarbage_threshold = \"x\"", "setting scrub.garbage_threshold"),
        ];
        for (text, expected) in cases {
            let file: FileConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let err = format!("{:#}", file.resolve(Overrides::default()).unwrap_err());
            assert!(err.contains(expected), "{text}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        // Flags are checked the same way.
        let err = FileConfig::default()
            .resolve(Overrides {
                write_buffer_limit: Some("2M".into()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(format!("{err:#}").contains("write_buffer_limit (--write-buffer-limit) = \"2M\""));
        let config = FileConfig::default()
            .resolve(Overrides {
                s3_retry_timeout: Some("2m".into()),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(config.s3_retry_timeout, std::time::Duration::from_secs(120));
        let err = FileConfig::default()
            .resolve(Overrides {
                dtl: Some("nowhere".into()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(format!("{err:#}").contains("setting dtl (--dtl) = \"nowhere\""));
        // The edges of each range are accepted.
        let edges = "write_buffer_limit = \"4M\"\n[volume_defaults]\nsco_size = \"128M\"\nwrite_buffer = \"128M\"\n[vhost]\nnum_queues = 8\nqueue_size = 4\n";
        let file: FileConfig = toml::from_str(edges).unwrap();
        file.resolve(Overrides::default()).unwrap();
    }

    #[test]
    fn scrub_settings_resolve() {
        let config = FileConfig::default().resolve(Overrides::default()).unwrap();
        assert_eq!(
            config.auto_scrub,
            Some(AutoScrub {
                garbage_threshold: 1 << 30,
                rate: Some(64 << 20),
                check_interval: std::time::Duration::from_secs(30),
            })
        );
        let text = "[scrub]\nauto = false\n";
        let off: FileConfig = toml::from_str(text).unwrap();
        assert!(off
            .resolve(Overrides::default())
            .unwrap()
            .auto_scrub
            .is_none());
        let unlimited: FileConfig = toml::from_str("[scrub]\nrate = \"0\"\n").unwrap();
        let resolved = unlimited.resolve(Overrides::default()).unwrap();
        assert_eq!(resolved.auto_scrub.unwrap().rate, None);
    }

    #[test]
    fn upload_settings_resolve() {
        let config = FileConfig::default().resolve(Overrides::default()).unwrap();
        assert_eq!(config.upload_concurrency, 4);
        assert_eq!(
            config.max_open_age,
            Some(std::time::Duration::from_secs(60))
        );
        let text = "[upload]\nconcurrency = 2\nmax_open_age = \"250ms\"\n";
        let file: FileConfig = toml::from_str(text).unwrap();
        let config = file
            .clone()
            .resolve(Overrides {
                upload_concurrency: Some(8),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(config.upload_concurrency, 8);
        assert_eq!(
            config.max_open_age,
            Some(std::time::Duration::from_millis(250))
        );
        let off: FileConfig = toml::from_str("[upload]\nmax_open_age = \"0s\"\n").unwrap();
        assert_eq!(
            off.resolve(Overrides::default()).unwrap().max_open_age,
            None
        );
        let bad: FileConfig = toml::from_str("[upload]\nmax_open_age = \"soon\"\n").unwrap();
        let err = bad.resolve(Overrides::default()).unwrap_err();
        assert!(
            format!("{err:#}").contains("upload.max_open_age"),
            "{err:#}"
        );
        let err = file
            .resolve(Overrides {
                upload_concurrency: Some(0),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(format!("{err:#}").contains("upload.concurrency"), "{err:#}");
    }

    #[test]
    fn flags_override_the_file() {
        let config = FileConfig::default()
            .resolve(Overrides {
                data_dir: Some("/tmp/d".into()),
                nbd: Some("127.0.0.1:0".into()),
                no_default_volume: true,
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(
            config.backend,
            BackendSpec::Dir(PathBuf::from("/tmp/d/backend"))
        );
        assert_eq!(config.nbd.port(), 0);
        assert!(config.default_volume.is_none());
    }

    #[test]
    fn backend_values_starting_with_s3_select_s3() {
        let resolve = |backend: &str| {
            FileConfig::default().resolve(Overrides {
                backend: Some(backend.into()),
                ..Overrides::default()
            })
        };
        let config = resolve("s3://vstor-bucket/cluster1").unwrap();
        assert_eq!(config.backend.to_string(), "s3://vstor-bucket/cluster1");
        assert!(matches!(config.backend, BackendSpec::S3(ref l) if l.prefix == "cluster1"));
        let file: FileConfig = toml::from_str("backend = \"s3://other\"\n").unwrap();
        let config = file.resolve(Overrides::default()).unwrap();
        assert!(matches!(config.backend, BackendSpec::S3(ref l) if l.bucket == "other"));
        assert_eq!(
            resolve("/srv/backend").unwrap().backend,
            BackendSpec::Dir("/srv/backend".into())
        );
        let err = resolve("s3://Bad_Bucket").unwrap_err().to_string();
        assert!(err.contains("s3://Bad_Bucket"), "{err}");
    }

    #[test]
    fn ec_backends_name_a_preset_and_need_a_cluster_registry() {
        assert_eq!(
            BackendSpec::parse(std::path::Path::new("ec")).unwrap(),
            BackendSpec::Ec { preset: None }
        );
        let spec = BackendSpec::parse(std::path::Path::new("ec:fast")).unwrap();
        assert_eq!(spec.to_string(), "ec:fast");
        assert!(BackendSpec::parse(std::path::Path::new("ec:")).is_err());
        assert_eq!(
            BackendSpec::parse(std::path::Path::new("./ec")).unwrap(),
            BackendSpec::Dir("./ec".into())
        );
        let single = FileConfig {
            backend: Some("ec".into()),
            ..FileConfig::default()
        }
        .resolve(Overrides::default());
        let err = single.unwrap_err().to_string();
        assert!(err.contains("--registry etcd://"), "{err}");
        let cluster = FileConfig {
            backend: Some("ec:fast".into()),
            ..FileConfig::default()
        }
        .resolve(Overrides {
            registry: Some("etcd://127.0.0.1:2379".into()),
            node: Some("n1".into()),
            ..Overrides::default()
        });
        assert_eq!(
            cluster.unwrap().backend,
            BackendSpec::Ec {
                preset: Some("fast".into())
            }
        );
    }

    #[test]
    fn etcd_settings_need_tls_and_go_together_and_the_password_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret\n").unwrap();
        let resolve = |registry: &str, file: &str, flags: EtcdSettings| {
            let mut config: FileConfig = toml::from_str(file).unwrap();
            config.cluster.registry = registry.into();
            config.cluster.node = "n1".into();
            config.resolve(Overrides {
                etcd: flags,
                ..Overrides::default()
            })
        };
        // From the file, the flag overriding the password file; the password is one line.
        let config = resolve(
            "etcd+https://e1:2379,e2:2379",
            "[cluster.etcd]\nuser = \"vstor\"\npassword_file = \"/nonexistent\"\n",
            EtcdSettings {
                password_file: Some(password.clone()),
                ..EtcdSettings::default()
            },
        )
        .unwrap();
        let target = config.identity.cluster.unwrap().registry;
        assert_eq!(target.endpoints, ["https://e1:2379", "https://e2:2379"]);
        assert_eq!(
            target.access.user,
            Some(("vstor".to_string(), "s3cret".to_string()))
        );
        assert!(!format!("{:?}", target.access).contains("s3cret"));
        let errors = [
            (
                "etcd://e1:2379",
                EtcdSettings {
                    ca: Some(password.clone()),
                    ..EtcdSettings::default()
                },
                "need a TLS registry",
            ),
            (
                "etcd+https://e1:2379",
                EtcdSettings {
                    cert: Some(password.clone()),
                    ..EtcdSettings::default()
                },
                "give --etcd-key",
            ),
            (
                "etcd+https://e1:2379",
                EtcdSettings {
                    ca: Some(password.clone()),
                    ..EtcdSettings::default()
                },
                "cluster.etcd.ca (--etcd-ca)",
            ),
            (
                "etcd://e1:2379",
                EtcdSettings {
                    password_file: Some(password.clone()),
                    ..EtcdSettings::default()
                },
                "give --etcd-user",
            ),
            (
                "",
                EtcdSettings {
                    user: Some("vstor".into()),
                    ..EtcdSettings::default()
                },
                "need a cluster registry",
            ),
        ];
        for (registry, flags, expected) in errors {
            let err = resolve(registry, "", flags).unwrap_err();
            assert!(format!("{err:#}").contains(expected), "{err:#}");
        }
    }

    #[test]
    fn the_registry_timeout_comes_from_the_file_or_the_flag_and_is_checked() {
        let resolve = |registry: &str, file: &str, flag: Option<&str>| {
            let mut config: FileConfig = toml::from_str(file).unwrap();
            config.cluster.registry = registry.into();
            config.cluster.node = "n1".into();
            config
                .resolve(Overrides {
                    etcd: EtcdSettings {
                        timeout: flag.map(str::to_string),
                        ..EtcdSettings::default()
                    },
                    ..Overrides::default()
                })
                .map(|c| c.identity.cluster.unwrap().registry.timeout)
        };
        let file = "[cluster.etcd]\ntimeout = \"5s\"\n";
        assert_eq!(
            resolve("etcd://e1:2379", "", None).unwrap(),
            crate::registry::etcd::DEFAULT_TIMEOUT
        );
        assert_eq!(
            resolve("etcd://e1:2379", file, None).unwrap(),
            std::time::Duration::from_secs(5)
        );
        assert_eq!(
            resolve("etcd://e1:2379", file, Some("1500ms")).unwrap(),
            std::time::Duration::from_millis(1500)
        );
        for (registry, flag, expected) in [
            ("etcd://e1:2379", "soon", "is not a duration"),
            ("etcd://e1:2379", "10ms", "must be from 100ms to 60s"),
            ("etcd://e1:2379", "2m", "must be from 100ms to 60s"),
            ("", "5s", "need a cluster registry"),
        ] {
            let err = format!("{:#}", resolve(registry, "", Some(flag)).unwrap_err());
            assert!(err.contains(expected), "{flag}: {err}");
            assert!(
                registry.is_empty() || err.contains("--registry-timeout"),
                "{err}"
            );
        }
    }

    #[test]
    fn peer_tls_files_go_together_and_bad_files_are_named() {
        let config = FileConfig::default().resolve(Overrides::default()).unwrap();
        assert!(config.peer_tls.is_none());

        let file: FileConfig =
            toml::from_str("[peer_tls]\ncert = \"/etc/vstor/node.pem\"\n").unwrap();
        let err = format!("{:#}", file.resolve(Overrides::default()).unwrap_err());
        assert!(
            err.contains("peer_tls.key (--peer-tls-key) and peer_tls.ca (--peer-tls-ca) missing"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("node.pem");
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let err = format!(
            "{:#}",
            FileConfig::default()
                .resolve(Overrides {
                    peer_tls_cert: Some(not_pem.clone()),
                    peer_tls_key: Some(dir.path().join("node-key.pem")),
                    peer_tls_ca: Some(dir.path().join("ca.pem")),
                    ..Overrides::default()
                })
                .unwrap_err()
        );
        assert!(err.contains("--peer-tls-cert"), "{err}");
        assert!(
            err.contains(&format!("certificate file {}", not_pem.display())),
            "{err}"
        );
        assert!(err.contains("no CERTIFICATE block"), "{err}");
    }
}

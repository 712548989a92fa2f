//! Per-volume settings and the backend's record of which TLogs make up a volume.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::access::VolumeAccess;
use crate::error::{Result, VolumeError};
use crate::types::{MAX_SCO_CLUSTERS, MAX_VOLUME_SIZE};

pub const CLUSTER_SIZE: u64 = 4096;
/// A TLog covers about this much written data (it is closed after `tlog_scos` SCOs).
pub const TLOG_TARGET_BYTES: u64 = 64 << 20;
pub const DEFAULT_SCO_SIZE: u64 = 64 << 20;
pub const DEFAULT_WRITE_BUFFER: u64 = 1 << 30;
/// SCO sizes offered to users; the engine itself accepts any size up to 65 536 clusters.
pub const USER_SCO_SIZE_RANGE: (u64, u64) = (4 << 20, 128 << 20);

pub const CONFIG_KIND: &[u8; 4] = b"VCFG";
pub const CONFIG_VERSION: u32 = 1;
pub const TLOG_LIST_KIND: &[u8; 4] = b"TLGS";
pub const TLOG_LIST_VERSION: u32 = 1;
/// Backend object holding the volume configuration.
pub const CONFIG_OBJECT: &str = "volume_config";
/// Backend object listing the volume's TLogs in order (the role of Open vStorage's snapshots.xml).
pub const TLOG_LIST_OBJECT: &str = "tlogs";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    pub name: String,
    /// Backend namespace holding this volume's SCOs and TLogs.
    pub namespace: String,
    pub size: u64,
    pub cluster_size: u64,
    pub sco_clusters: u64,
    /// A TLog is closed after this many SCOs.
    pub tlog_scos: u64,
    /// Not-yet-uploaded bytes above which writes are throttled.
    pub write_buffer: u64,
    pub owner_tag: u64,
    pub read_only: bool,
    /// Unix seconds.
    pub created: u64,
    /// Which incarnation of the name this volume is: its creation time in nanoseconds, so
    /// creations order and a volume deleted and created again (owner tags start again at 1)
    /// is told from the copy a node kept of the old one, even within the same second. The DTL
    /// registration carries it (`vstor_dtl::DtlStore::register`). 0: created before
    /// incarnations existed (then `created` tells incarnations apart, by the second).
    #[serde(default)]
    pub incarnation: u64,
    /// How writes are mirrored to the DTL.
    #[serde(default)]
    pub dtl_mode: DtlMode,
    /// `host:port` of the DTL server (required unless `dtl_mode` is `none`).
    #[serde(default)]
    pub dtl_addr: Option<String>,
    /// The snapshot this volume was cloned from.
    #[serde(default)]
    pub parent: Option<ParentRef>,
    /// Namespaces of the ancestors whose SCOs this volume reads: index 0 is clone id 1 (the
    /// parent), index 1 is clone id 2, and so on.
    #[serde(default)]
    pub ancestors: Vec<String>,
    /// A template is read-only and may only be cloned.
    #[serde(default)]
    pub template: bool,
    /// Who may open the volume over NBD (`crate::access`); both lists empty: everyone.
    /// Volumes written before allow lists existed load with empty lists.
    #[serde(default, flatten)]
    pub access: VolumeAccess,
    /// Encryption at rest (`volume::crypt`); absent: the volume stores plaintext. Set at
    /// creation, inherited by clones, never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// How a volume's data is encrypted: the mode, where the key is and which key it is. The key
/// itself is never stored, only read from `key_file` on the node that serves the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// `aes-256-xts`.
    pub mode: String,
    /// Absolute path of the key file on the serving node.
    pub key_file: std::path::PathBuf,
    /// The key's fingerprint (`vstor_backend::crypt`), checked whenever the volume is opened.
    pub fingerprint: String,
}

/// `VOLUME@SNAPSHOT` a clone was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub volume: String,
    pub snapshot: String,
}

impl std::fmt::Display for ParentRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.volume, self.snapshot)
    }
}

/// How a volume mirrors its writes to a DTL.
///
/// * `sync`: a write is acknowledged only once the DTL holds it.
/// * `async`: writes are sent in the background (bounded backlog); FLUSH and FUA wait for the
///   DTL, so everything acknowledged before a completed FLUSH survives the node's loss.
/// * `none`: no DTL; what is not on the backend is only in this node's write buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtlMode {
    #[default]
    None,
    Sync,
    Async,
}

impl DtlMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DtlMode::None => "none",
            DtlMode::Sync => "sync",
            DtlMode::Async => "async",
        }
    }
}

impl std::str::FromStr for DtlMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(DtlMode::None),
            "sync" => Ok(DtlMode::Sync),
            "async" => Ok(DtlMode::Async),
            other => Err(format!(
                "unknown DTL mode {other:?} (expected sync, async or none)"
            )),
        }
    }
}

/// A DTL address is `HOST:PORT` (a name or an IP, `[v6]:PORT`), the port a number from 1.
pub fn check_dtl_addr(addr: &str) -> std::result::Result<(), String> {
    let bad = || format!("DTL address {addr:?} is not HOST:PORT (e.g. 10.0.0.2:10810)");
    let (host, port) = addr.trim().rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok(())
}

/// Check a DTL setting: a mode other than `none` needs an address, and that address must be
/// `HOST:PORT`.
pub fn validate_dtl(volume: &str, mode: DtlMode, addr: Option<&str>) -> Result<()> {
    match (mode, addr) {
        (DtlMode::None, _) => Ok(()),
        (_, Some(addr)) if !addr.trim().is_empty() => {
            check_dtl_addr(addr).map_err(|reason| VolumeError::InvalidConfig {
                volume: volume.to_string(),
                reason,
            })
        }
        (mode, _) => Err(VolumeError::InvalidConfig {
            volume: volume.to_string(),
            reason: format!(
                "DTL mode {} needs a DTL address (--dtl HOST:PORT, or `vstor serve --dtl`)",
                mode.as_str()
            ),
        }),
    }
}

/// What a user may choose when creating a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOptions {
    pub size: u64,
    pub sco_size: u64,
    pub write_buffer: u64,
    pub dtl_mode: DtlMode,
    pub dtl_addr: Option<String>,
    /// The NBD allow list the volume starts with.
    pub access: VolumeAccess,
    /// Encrypt the volume's data with the key in this file (an absolute path on the node).
    pub encryption_key_file: Option<std::path::PathBuf>,
    /// The new volume's incarnation is above this, whatever this node's clock says: a cluster
    /// passes the highest incarnation issued in it (`src/cluster/incarnation.rs` in the `vstor`
    /// binary), so a volume created again under a name always counts as newer than the deleted
    /// one. 0: the clock alone.
    pub incarnation_floor: u64,
}

impl VolumeOptions {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            sco_size: DEFAULT_SCO_SIZE,
            write_buffer: DEFAULT_WRITE_BUFFER,
            dtl_mode: DtlMode::None,
            dtl_addr: None,
            access: VolumeAccess::default(),
            encryption_key_file: None,
            incarnation_floor: 0,
        }
    }
}

/// Now, in nanoseconds since the Unix epoch (a new volume's incarnation); never 0 (that means
/// "not known"). Two volumes of one name are never created in the same nanosecond: a create
/// takes the name's registry record first.
fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .max(1)
}

pub fn validate_volume_name(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(VolumeError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || name.starts_with('.')
        || name.starts_with('-')
    {
        return bad("use ASCII letters, digits, '-', '_' and '.', not starting with '.' or '-'");
    }
    Ok(())
}

/// `2147483648` → `2 GiB`, `1536` → `1.5 KiB`: sizes in messages a user reads.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let unit = UNITS.get(unit).copied().unwrap_or("B");
    if value.fract() == 0.0 {
        format!("{value:.0} {unit}")
    } else {
        format!("{value:.1} {unit}")
    }
}

pub fn validate_size(volume: &str, size: u64) -> Result<()> {
    let bad = |reason: String| {
        Err(VolumeError::InvalidConfig {
            volume: volume.to_string(),
            reason,
        })
    };
    if size == 0 {
        return bad("size must be greater than zero".into());
    }
    if !size.is_multiple_of(CLUSTER_SIZE) {
        return bad(format!(
            "size {size} is not a multiple of {CLUSTER_SIZE} bytes"
        ));
    }
    if size > MAX_VOLUME_SIZE {
        return bad(format!("size {size} exceeds the maximum of 64 TiB"));
    }
    Ok(())
}

impl VolumeConfig {
    /// Build and check a configuration. `sco_size` is checked against the engine's hard limits
    /// only; the API layer applies the narrower user-facing range.
    pub fn new(name: &str, options: &VolumeOptions, created: u64) -> Result<Self> {
        validate_volume_name(name)?;
        validate_size(name, options.size)?;
        let bad = |reason: String| {
            Err(VolumeError::InvalidConfig {
                volume: name.to_string(),
                reason,
            })
        };
        if options.sco_size == 0 || !options.sco_size.is_multiple_of(CLUSTER_SIZE) {
            return bad(format!(
                "SCO size {} must be a positive multiple of {CLUSTER_SIZE}",
                options.sco_size
            ));
        }
        let sco_clusters = options.sco_size / CLUSTER_SIZE;
        if sco_clusters > MAX_SCO_CLUSTERS {
            return bad(format!(
                "SCO size {} exceeds {} clusters",
                options.sco_size, MAX_SCO_CLUSTERS
            ));
        }
        if options.write_buffer < options.sco_size {
            return bad(format!(
                "write buffer {} must hold at least one SCO ({})",
                options.write_buffer, options.sco_size
            ));
        }
        validate_dtl(name, options.dtl_mode, options.dtl_addr.as_deref())?;
        let encryption = options
            .encryption_key_file
            .as_deref()
            .map(|path| Encryption::for_key_file(name, path))
            .transpose()?;
        Ok(Self {
            name: name.to_string(),
            namespace: name.to_string(),
            size: options.size,
            cluster_size: CLUSTER_SIZE,
            sco_clusters,
            tlog_scos: (TLOG_TARGET_BYTES / options.sco_size).max(1),
            write_buffer: options.write_buffer,
            owner_tag: 1,
            read_only: false,
            created,
            incarnation: now_nanos().max(options.incarnation_floor.saturating_add(1)),
            dtl_mode: options.dtl_mode,
            dtl_addr: options
                .dtl_addr
                .clone()
                .filter(|_| options.dtl_mode != DtlMode::None),
            parent: None,
            ancestors: Vec::new(),
            template: false,
            access: options.access.clone(),
            encryption,
        })
    }

    pub fn sco_size(&self) -> u64 {
        self.sco_clusters * self.cluster_size
    }

    pub fn encode(&self) -> Vec<u8> {
        crate::meta::encode(CONFIG_KIND, CONFIG_VERSION, self)
    }

    /// The configuration stored in the volume's backend namespace (`NotFound` without one).
    pub fn load_from_backend(
        backend: &dyn vstor_backend::ObjectStore,
        volume: &str,
    ) -> Result<Self> {
        let bytes = backend.get(volume, CONFIG_OBJECT).map_err(|e| match e {
            vstor_backend::BackendError::NoSuchNamespace { .. } => VolumeError::NotFound {
                volume: volume.to_string(),
            },
            other => VolumeError::backend(volume)(other),
        })?;
        Self::decode(volume, &format!("backend object {CONFIG_OBJECT}"), &bytes)
    }

    /// Whether this copy of a volume's configuration (a node's write buffer holds one) still
    /// owns its backend namespace, or what became of the namespace. Shared by a volume's open,
    /// a node back from a fence (`VolumeManager::backend_lost`) and the delete of a volume that
    /// failed to open (`owned_elsewhere`).
    ///
    /// Owner tags alone cannot tell a volume deleted and created again under the same name
    /// (it starts again at tag 1): the configuration's incarnation does (see
    /// [`same_incarnation`](Self::same_incarnation)).
    pub fn standing(&self, backend: &dyn vstor_backend::ObjectStore) -> Result<Standing> {
        let namespace = &self.namespace;
        let exists = backend
            .namespace_exists(namespace)
            .map_err(VolumeError::backend(&self.name))?;
        if !exists {
            return Ok(Standing::Deleted);
        }
        let current = backend
            .owner_tag(namespace)
            .map_err(VolumeError::backend(&self.name))?;
        if current > self.owner_tag {
            return Ok(Standing::Claimed { current });
        }
        let theirs = Self::load_from_backend(backend, namespace)?;
        Ok(if self.same_incarnation(&theirs) {
            Standing::Ours
        } else {
            Standing::Replaced {
                created: theirs.created,
                incarnation: theirs.incarnation,
            }
        })
    }

    /// Whether `other` is a configuration of the same volume, not of another one created under
    /// the same name: the same incarnation, or where either predates incarnations the same
    /// creation second.
    pub fn same_incarnation(&self, other: &Self) -> bool {
        if self.incarnation != 0 && other.incarnation != 0 {
            self.incarnation == other.incarnation
        } else {
            self.created == other.created
        }
    }

    pub fn decode(volume: &str, what: &str, bytes: &[u8]) -> Result<Self> {
        crate::meta::decode(CONFIG_KIND, CONFIG_VERSION, bytes)
            .map_err(|e| VolumeError::corrupt(volume, what, e.to_string()))
    }
}

/// What [`VolumeConfig::standing`] found on the backend for a copy of a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The namespace is this copy's (same incarnation, no newer owner tag).
    Ours,
    /// The namespace is gone: the volume was deleted.
    Deleted,
    /// Another node claimed the namespace with a newer owner tag (adopted or moved).
    Claimed { current: u64 },
    /// The namespace holds another volume of the same name, created at `created` (Unix
    /// seconds) as incarnation `incarnation` (two such volumes may share the second).
    Replaced { created: u64, incarnation: u64 },
}

impl Encryption {
    /// The setting for a new volume encrypted with the key in `path`: the file is read to take
    /// the key's fingerprint.
    pub fn for_key_file(volume: &str, path: &std::path::Path) -> Result<Self> {
        if !path.is_absolute() {
            return Err(VolumeError::InvalidConfig {
                volume: volume.to_string(),
                reason: format!(
                    "encryption key file {} must be an absolute path (on the node that serves the volume)",
                    path.display()
                ),
            });
        }
        let cipher = vstor_backend::crypt::UnitCipher::load(path).map_err(|source| {
            VolumeError::EncryptionKey {
                volume: volume.to_string(),
                source,
            }
        })?;
        Ok(Self {
            mode: vstor_backend::crypt::MODE.to_string(),
            key_file: path.to_path_buf(),
            fingerprint: cipher.fingerprint().to_string(),
        })
    }
}

/// One TLog on the backend and the SCOs whose data it references.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TLogRecord {
    pub number: u64,
    pub scos: Vec<u32>,
    /// Bytes of cluster data written into its SCOs.
    pub data_bytes: u64,
    /// Bumped each time scrubbing rewrites the TLog (merging it with the TLogs before it in its
    /// snapshot region); part of the object name so a rewrite never overwrites the live object.
    #[serde(default)]
    pub generation: u32,
    /// Versions of the SCOs in `scos` that scrubbing rewrote (absent = version 0).
    #[serde(default)]
    pub sco_versions: BTreeMap<u32, u8>,
}

impl TLogRecord {
    pub fn new(number: u64) -> Self {
        Self {
            number,
            scos: Vec::new(),
            data_bytes: 0,
            generation: 0,
            sco_versions: BTreeMap::new(),
        }
    }

    /// Backend object holding this TLog.
    pub fn object_name(&self) -> String {
        let base = crate::types::TLogNumber(self.number).object_name();
        match self.generation {
            0 => base,
            g => format!("{base}.g{g}"),
        }
    }

    pub fn sco_version(&self, sco: u32) -> u8 {
        self.sco_versions.get(&sco).copied().unwrap_or(0)
    }
}

/// A snapshot: a TLog boundary. The volume's state at the snapshot is the replay of every TLog
/// numbered up to `tlog`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    /// Unix seconds.
    pub created: u64,
    /// Last TLog of the snapshot (0: the volume was empty).
    pub tlog: u64,
    /// Bytes written between the previous snapshot and this one.
    pub written_bytes: u64,
    /// Volumes cloned from this snapshot.
    #[serde(default)]
    pub clones: Vec<String>,
    /// Volume size when the snapshot was taken.
    #[serde(default)]
    pub size: u64,
}

/// The backend's ordered list of a volume's TLogs; replaying them in order rebuilds the map.
/// It also carries the snapshots and what rollbacks dropped, so a restart from the backend alone
/// knows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TLogList {
    pub tlogs: Vec<TLogRecord>,
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
    /// TLog number ranges (inclusive) a rollback dropped: never replayed, wherever found.
    #[serde(default)]
    pub dropped: Vec<(u64, u64)>,
    /// DTL entries below this position (SCO, cluster) belong to history a rollback dropped.
    #[serde(default)]
    pub dtl_floor: (u32, u32),
}

impl TLogList {
    pub fn is_dropped(&self, number: u64) -> bool {
        self.dropped
            .iter()
            .any(|(from, to)| (*from..=*to).contains(&number))
    }

    pub fn last_number(&self) -> u64 {
        self.tlogs.last().map_or(0, |r| r.number)
    }
}

impl TLogList {
    pub fn encode(&self) -> Vec<u8> {
        crate::meta::encode(TLOG_LIST_KIND, TLOG_LIST_VERSION, self)
    }

    pub fn decode(volume: &str, bytes: &[u8]) -> Result<Self> {
        crate::meta::decode(TLOG_LIST_KIND, TLOG_LIST_VERSION, bytes).map_err(|e| {
            VolumeError::corrupt(
                volume,
                format!("backend object {TLOG_LIST_OBJECT}"),
                e.to_string(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node whose clock is behind the cluster's still issues a newer incarnation.
    #[test]
    fn an_incarnation_is_above_the_floor_whatever_the_clock() {
        let future = now_nanos() + 3600 * 1_000_000_000;
        let options = VolumeOptions {
            incarnation_floor: future,
            ..VolumeOptions::new(1 << 30)
        };
        let config = VolumeConfig::new("vol", &options, 1_700_000_000).unwrap();
        assert_eq!(config.incarnation, future + 1);
        let plain = VolumeConfig::new("vol", &VolumeOptions::new(1 << 30), 1_700_000_000).unwrap();
        assert!(plain.incarnation < future && plain.incarnation > 0);
    }

    #[test]
    fn incarnations_tell_volumes_of_one_name_apart_even_within_a_second() {
        let options = VolumeOptions::new(1 << 30);
        let first = VolumeConfig::new("vol", &options, 1_700_000_000).unwrap();
        let again = VolumeConfig::new("vol", &options, 1_700_000_000).unwrap();
        assert!(first.incarnation > 0 && again.incarnation > first.incarnation);
        assert!(
            !first.same_incarnation(&again),
            "same second, another volume"
        );
        let mut moved = first.clone();
        moved.owner_tag = 5;
        assert!(
            first.same_incarnation(&moved),
            "an adopted copy is the same volume"
        );
        // A configuration from before incarnations (none stored) loads as 0: creation seconds
        // decide.
        let json = String::from_utf8(first.encode()[32..].to_vec()).unwrap();
        let legacy: serde_json::Value = serde_json::from_str(&json).unwrap();
        let mut legacy = legacy.as_object().unwrap().clone();
        legacy.remove("incarnation").unwrap();
        let legacy: VolumeConfig = serde_json::from_value(legacy.into()).unwrap();
        assert_eq!(legacy.incarnation, 0);
        assert!(
            legacy.same_incarnation(&again),
            "same second, no incarnation on one side"
        );
        let mut later = again.clone();
        later.created += 1;
        assert!(!legacy.same_incarnation(&later));
        let decoded = VolumeConfig::decode("vol", "config", &first.encode()).unwrap();
        assert_eq!(decoded.incarnation, first.incarnation);
    }

    #[test]
    fn defaults_and_validation() {
        let config = VolumeConfig::new("vol", &VolumeOptions::new(1 << 30), 0).unwrap();
        assert_eq!(config.sco_clusters, 16384);
        assert_eq!(config.tlog_scos, 1);
        let mut small = VolumeOptions::new(1 << 30);
        small.sco_size = 4 << 20;
        assert_eq!(VolumeConfig::new("v", &small, 0).unwrap().tlog_scos, 16);
        assert!(VolumeConfig::new("bad/name", &VolumeOptions::new(4096), 0).is_err());
        assert!(VolumeConfig::new("v", &VolumeOptions::new(1000), 0).is_err());
        assert!(VolumeConfig::new("v", &VolumeOptions::new(0), 0).is_err());
        assert!(VolumeConfig::new("v", &VolumeOptions::new(MAX_VOLUME_SIZE + 4096), 0).is_err());
        let mut huge_sco = VolumeOptions::new(1 << 30);
        huge_sco.sco_size = 512 << 20;
        assert!(VolumeConfig::new("v", &huge_sco, 0).is_err());
        let bytes = config.encode();
        assert_eq!(
            VolumeConfig::decode("vol", "config", &bytes).unwrap(),
            config
        );
        let err = VolumeConfig::decode("vol", "config", &bytes[1..]).unwrap_err();
        assert!(
            err.to_string().contains("volume vol: config is corrupt"),
            "{err}"
        );
    }

    #[test]
    fn dtl_addresses_must_be_host_and_port() {
        for good in ["10.0.0.2:10810", "dtl-1:1", "[::1]:10810"] {
            assert_eq!(check_dtl_addr(good), Ok(()), "{good}");
        }
        for bad in [
            "notahost",
            "nowhere:port",
            ":10810",
            "host:0",
            "host:70000",
            "a b:1",
        ] {
            let err = check_dtl_addr(bad).unwrap_err();
            assert!(err.contains("is not HOST:PORT"), "{bad}: {err}");
        }
        let err = validate_dtl("v", DtlMode::Sync, Some("notahost")).unwrap_err();
        assert!(err.to_string().contains("volume v"), "{err}");
        assert!(validate_dtl("v", DtlMode::None, Some("notahost")).is_ok());
    }

    #[test]
    fn sizes_read_as_binary_units() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(512 << 20), "512 MiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(3 << 40), "3 TiB");
    }
}

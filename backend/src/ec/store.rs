//! The `ec` [`ObjectStore`]: objects erasure-coded over OSD daemons.
//!
//! **Put.** The namespace's record (owner tag, preset) comes from the [`TierMap`] (the registry).
//! The preset's best policy that the writable OSDs can hold is chosen; the object is cut into
//! chunks and pieces (`layout`), each chunk's `m` parity pieces are computed (`codec`), and
//! fragment `i` (piece `i` of every chunk, as a self-describing file, `fragment`) goes to the
//! OSD that `placement` computes for it. The put returns once `c` fragments are durable; the
//! others finish in the background. A fragment whose OSD fails (dead before the map knew) is
//! re-routed to the next OSD of its ranking, and the older versions of the object are deleted
//! once the new one is safe: see the write path, `ec/write.rs`.
//!
//! **Get.** An object's newest version with at least `k` fragments is found by asking OSDs
//! `Head` in rounds (see `find`): the two best-ranked for each index among the OSDs up or
//! draining, then every other such OSD if that found fewer than `k`, then the down ones. The
//! answer is cached, and forgotten when a read from a holder fails, so a read after repair or
//! rebalancing moved fragments finds them again. A failed read, cached holders or fresh ones,
//! is retried with the fragments found afresh whenever they are somewhere else now (a node's
//! own rebalance moves fragments, deleting each source, while it serves reads of them; up to
//! `READ_ATTEMPTS`): a read fails only when the object as stored now cannot be read, which
//! halts the volume reading it. A ranged read asks only the data fragments that hold the range
//! (`layout::locate`): 4 KiB of a 64 MiB object is one request to one OSD. When a data
//! fragment is unreachable, on an OSD the map says is down, or fails its CRC, the same fragment
//! range is read from `k` other fragments and decoded: Reed-Solomon works column by column, so
//! equal offsets in every fragment belong together.
//!
//! **OSD states.** The map gives each OSD a state ([`OsdState`]). New fragments go only to up
//! OSDs with room; reads use up and draining OSDs, go around down ones first (a down OSD is
//! asked only when the others do not suffice) and never ask an out one. Repair ([`super::repair`])
//! rebuilds what out OSDs held and empties draining ones.
//!
//! **Fencing.** Puts and deletes carry the writer's owner tag: the store refuses a tag that is
//! not the namespace's current one in the registry, and every OSD refuses tags older than the
//! newest it has seen (a claim sends `SetTag` to every OSD).
//!
//! **Delete** stores a *tombstone* (`fragment`: an empty record of the name at a new version,
//! carrying the owner tag) on every OSD that is not out; an OSD taking it removes its older
//! fragments of the name at once. It succeeds when every OSD that answered took it, even if
//! some could not be reached, as long as the map says those are down (a volume's garbage
//! collection must not stall for the whole grace period because one OSD died) and at least one
//! OSD took it; an OSD the map says is up (or draining) failing, or any OSD refusing (a fenced
//! writer: an old owner cannot tombstone the new owner's objects), fails it. What a down OSD
//! holds of the name stays there, older than the tombstone: `find` and `list` go by an object's
//! newest record, and when it is a tombstone the object does not exist (not "cannot be
//! rebuilt"), whatever older fragments reappear. Repair deletes those stale fragments and drops
//! the tombstones once every OSD that is not out is up and holds nothing older (`plan`). A put
//! of the same name later gets a newer version than the tombstone (versions from this store
//! never go backwards: see `next_version`), so it is read as usual. Versions come from the
//! clock: nodes whose clocks differ by more than the time between a delete on one and a put of
//! the same name on another would hide the put behind the tombstone (the volume driver never
//! reuses a name across owners that fast).
//!
//! **Compression.** A namespace whose preset compresses stores each object as a container of
//! independently compressed 64 KiB blocks with a block index (`compress`), made before
//! encryption and encoding; ranged reads of it are in `unpack`.
//!
//! Known limits (issue 12): the whole object is encoded (and compressed) in memory; older
//! versions a store never saw (written before its process started, and not read since) are
//! left for repair to collect (it deletes them); `list` reports a name once any up or draining
//! OSD holds a fragment of it newer than every tombstone of it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::codec::{codec, CodecId};
use super::compress::{self, BlockIndex};
use super::crypt;
use super::fragment::{encode_fragment, FragmentHeader, TOMBSTONE_INDEX};
use super::layout::Layout;
use super::local::local_parities;
use super::placement::{place, OsdSlot};
use super::preset::{Compression, Preset};
use super::write::{drive, Background, Clients, FoundCache, PutJob, Shared};
use crate::osd::client::OsdClient;
use crate::osd::proto::Message;
use crate::{validate_name, BackendError, ObjectStore, OwnerTag, Result};

/// A whole-object `get` that keeps meeting a newer version of another size (an object being
/// rewritten in a loop) gives up after this many reads.
const GET_ATTEMPTS: usize = 4;

/// A read whose fragments keep moving under it (a repair pass moving one object's fragments
/// one by one) gives up after this many attempts, each with the fragments found afresh.
const READ_ATTEMPTS: usize = 4;

/// An OSD's state in the tier's map (`vstor osd list` shows it).
///
/// The map decides it: `Up` while the OSD's lease/heartbeat lives; `Down` when it lapses; an OSD
/// down past the grace period (default 10 minutes) or marked out by an operator is `Out`, and
/// its fragments are rebuilt elsewhere; `Draining` (`vstor osd decommission`) keeps serving
/// reads while repair moves every fragment off it, then it becomes `Out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OsdState {
    Up,
    Down,
    Draining,
    Out,
}

impl OsdState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Draining => "draining",
            Self::Out => "out",
        }
    }
}

/// An OSD as the tier's map lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct OsdEntry {
    /// Placement's view: `writable` is `state == Up` and not full; weight 0 when `Out` or
    /// `Draining` (it takes nothing new).
    pub slot: OsdSlot,
    /// `host:port` of its OSD protocol listener.
    pub addr: String,
    pub state: OsdState,
}

/// A namespace as the registry records it for the tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceRecord {
    pub tag: OwnerTag,
    pub preset: String,
}

/// Where the tier's shared state lives: the OSD map, presets and namespaces (the cluster
/// registry, or a fixed map in tests). Blocking, like [`ObjectStore`].
///
/// `osds()` is called on every read and write, so implementations answer it from memory (the
/// registry-backed map keeps a cache that a watch or a short poll refreshes).
pub trait TierMap: Send + Sync + 'static {
    fn osds(&self) -> Result<Vec<OsdEntry>>;
    fn preset(&self, name: &str) -> Result<Option<Preset>>;
    fn namespace(&self, namespace: &str) -> Result<Option<NamespaceRecord>>;
    /// Create; `NamespaceExists` if it does.
    fn create_namespace(&self, namespace: &str, record: &NamespaceRecord) -> Result<()>;
    /// Set the tag to `new` if it is `expected` now (compare-and-swap).
    fn swap_tag(&self, namespace: &str, expected: OwnerTag, new: OwnerTag) -> Result<()>;
    fn delete_namespace(&self, namespace: &str) -> Result<()>;
    fn list_namespaces(&self) -> Result<Vec<String>>;
}

/// Tunables of the store.
#[derive(Debug, Clone)]
pub struct EcOptions {
    /// Preset of namespaces created by this store.
    pub default_preset: String,
    /// Bound on every OSD call.
    pub timeout: Duration,
    /// Name sent to OSDs in `Hello`.
    pub client: String,
    /// Mutual TLS with the OSDs; `None`: plain TCP.
    pub tls: Option<vstor_net::PeerTls>,
}

/// An object's newest readable version, as the OSDs report it.
#[derive(Debug, Clone)]
pub(super) struct Found {
    pub(super) version: u64,
    pub(super) layout: Layout,
    pub(super) codec: CodecId,
    /// Which OSD holds each fragment index (as far as the `Head` answers said).
    pub(super) holders: HashMap<u8, u64>,
    /// Other fragments known of the object, `(version, index, OSD)`: older versions, local
    /// parities, extra copies. The next put deletes them once its version is safe.
    pub(super) extra: Vec<(u64, u8, u64)>,
    /// For a version this store put: closed when the put's background work is over, so the
    /// next put collects this version only once no fragment of it can still land.
    pub(super) settled: Option<tokio::sync::watch::Receiver<()>>,
}

/// Placement's view of the map for new fragments: only an OSD that is up (and not full) takes
/// them, and one draining or out has no weight. The map should say so already; this makes it
/// hold whatever the map's `slot` says.
pub(super) fn write_slots(osds: &[OsdEntry]) -> Vec<OsdSlot> {
    osds.iter()
        .map(|o| OsdSlot {
            writable: o.slot.writable && o.state == OsdState::Up,
            weight: match o.state {
                OsdState::Up | OsdState::Down => o.slot.weight,
                OsdState::Draining | OsdState::Out => 0.0,
            },
            ..o.slot.clone()
        })
        .collect()
}

/// A compressed object's block index and the version it belongs to.
pub(super) type VersionedIndex = (u64, Arc<BlockIndex>);

/// How a namespace's objects are stored, from its preset.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    pub(super) key: Option<crypt::Key>,
    /// Objects are compressed containers (`compress`) made with this codec.
    pub(super) compression: Option<compress::Codec>,
}

impl Settings {
    pub(super) fn of(preset: &Preset) -> Self {
        Self {
            key: preset.encryption_key,
            compression: match preset.compression {
                Compression::None => None,
                Compression::Zstd => Some(compress::Codec::Zstd),
                Compression::Lz4 => Some(compress::Codec::Lz4),
            },
        }
    }
}

/// The erasure-coded store.
pub struct EcStore {
    pub(super) map: Arc<dyn TierMap>,
    pub(super) options: EcOptions,
    runtime: Option<tokio::runtime::Runtime>,
    pub(super) clients: Clients,
    pub(super) found: FoundCache,
    /// Puts completing in the background.
    background: Arc<Background>,
    /// Presets chosen for namespaces about to be created (`volume create --preset`), taken by
    /// `create_namespace`.
    reserved: Mutex<HashMap<String, String>>,
    /// Each namespace's encryption key, from its preset (fixed at creation), once looked up.
    keys: Mutex<HashMap<String, Settings>>,
    /// The block index of each compressed object read, with the version it belongs to.
    pub(super) indexes: Mutex<HashMap<(String, String), VersionedIndex>>,
    /// The last object version this store gave out (puts and tombstones).
    last_version: AtomicU64,
    /// Tests: run before each read of found fragments, first in first run (to move fragments
    /// between a read's find and its read).
    #[cfg(test)]
    pub(super) before_read: Mutex<std::collections::VecDeque<Box<dyn FnOnce() + Send>>>,
}

impl Drop for EcStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

pub(super) fn object_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl EcStore {
    pub fn new(map: Arc<dyn TierMap>, options: EcOptions) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vstor-ec")
            .enable_all()
            .build()
            .map_err(|e| BackendError::Osd {
                addr: "-".into(),
                reason: format!("cannot start the EC client runtime: {e}"),
            })?;
        Ok(Self {
            map,
            options,
            runtime: Some(runtime),
            clients: Arc::default(),
            found: Arc::default(),
            background: Arc::default(),
            reserved: Mutex::default(),
            keys: Mutex::default(),
            indexes: Mutex::default(),
            last_version: AtomicU64::new(0),
            #[cfg(test)]
            before_read: Mutex::default(),
        })
    }

    /// A version for a new put or tombstone: the clock in nanoseconds, but past `previous`
    /// (what this store last saw of the name) and past every version this store gave out, so
    /// a delete then a put of the same name in the same nanosecond still order.
    pub(super) fn next_version(&self, previous: Option<u64>) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let floor = previous.map_or(now, |p| now.max(p.saturating_add(1)));
        let mut last = self.last_version.load(Ordering::SeqCst);
        loop {
            let version = floor.max(last.saturating_add(1));
            match self.last_version.compare_exchange(
                last,
                version,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return version,
                Err(seen) => last = seen,
            }
        }
    }

    /// Make the next `create_namespace(namespace, …)` use `preset` instead of the store's
    /// default (a volume picks its preset at creation). The preset must exist.
    pub fn reserve_preset(&self, namespace: &str, preset: &str) -> Result<()> {
        if self.map.preset(preset)?.is_none() {
            return Err(BackendError::TierRegistry {
                reason: format!("preset {preset} does not exist (see `vstor preset list`)"),
            });
        }
        self.reserved
            .lock()
            .insert(namespace.to_string(), preset.to_string());
        Ok(())
    }

    /// The store's default preset.
    pub fn default_preset(&self) -> &str {
        &self.options.default_preset
    }

    /// The namespace's encryption key (`None`: its preset does not encrypt).
    pub(super) fn namespace_key(&self, namespace: &str) -> Result<Option<crypt::Key>> {
        Ok(self.settings(namespace)?.key)
    }

    /// How the namespace's objects are stored (encryption key, compression), from its preset.
    /// A namespace keeps the preset it was created with, and presets are never changed, so
    /// this is cached.
    pub(super) fn settings(&self, namespace: &str) -> Result<Settings> {
        if let Some(settings) = self.keys.lock().get(namespace) {
            return Ok(*settings);
        }
        let record = self.record(namespace)?;
        let settings = Settings::of(&self.preset_of(namespace, &record)?);
        self.keys.lock().insert(namespace.to_string(), settings);
        Ok(settings)
    }

    /// The preset `record` (namespace `namespace`'s) names.
    fn preset_of(&self, namespace: &str, record: &NamespaceRecord) -> Result<Preset> {
        self.map
            .preset(&record.preset)?
            .ok_or_else(|| BackendError::Osd {
                addr: "-".into(),
                reason: format!(
                    "namespace {namespace} uses unknown preset {}",
                    record.preset
                ),
            })
    }

    /// The map the store reads (the node's background repair watches it for changes).
    pub fn tier_map(&self) -> Arc<dyn TierMap> {
        self.map.clone()
    }

    /// Run `fut` on the store's runtime and wait for it (callable from any thread, also from
    /// inside another runtime's worker).
    pub(super) fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let runtime = self.runtime.as_ref().ok_or_else(|| BackendError::Osd {
            addr: "-".into(),
            reason: "the EC client runtime is shut down".into(),
        })?;
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| BackendError::Osd {
            addr: "-".into(),
            reason: "the EC client runtime stopped".into(),
        })
    }

    /// Wait until every put has finished its background work (the fragments past `c`, then
    /// collecting older versions); `false` if `timeout` passed first. For tests and an orderly
    /// shutdown: nothing else needs to wait.
    pub fn wait_background(&self, timeout: Duration) -> bool {
        self.background.wait_idle(timeout)
    }

    /// A connected client for OSD `entry`, reused across calls.
    pub(super) async fn client(
        clients: Clients,
        entry: OsdEntry,
        options: EcOptions,
    ) -> Result<Arc<OsdClient>> {
        if let Some(client) = clients.lock().get(&entry.slot.id).filter(|c| c.is_alive()) {
            return Ok(client.clone());
        }
        let client = OsdClient::connect(
            &entry.addr,
            &options.client,
            options.timeout,
            options.tls.as_ref(),
        )
        .await?;
        let client = Arc::new(client);
        clients.lock().insert(entry.slot.id, client.clone());
        Ok(client)
    }

    /// Send each request to its OSD, all at once, and wait for every answer (each bounded by
    /// the timeout).
    pub(super) fn call_all(
        &self,
        targets: Vec<(OsdEntry, Message)>,
    ) -> Result<Vec<(OsdEntry, Result<Message>)>> {
        let (clients, options) = (self.clients.clone(), self.options.clone());
        self.run(async move {
            let calls = targets.into_iter().map(|(entry, message)| {
                let (clients, options) = (clients.clone(), options.clone());
                async move {
                    let result = async {
                        let client = Self::client(clients, entry.clone(), options.clone()).await?;
                        client.call(message, options.timeout).await
                    }
                    .await;
                    (entry, result)
                }
            });
            futures::future::join_all(calls).await
        })
    }

    pub(super) fn record(&self, namespace: &str) -> Result<NamespaceRecord> {
        self.map
            .namespace(namespace)?
            .ok_or_else(|| BackendError::NoSuchNamespace {
                namespace: namespace.to_string(),
            })
    }

    fn check_owner(&self, namespace: &str, owner: OwnerTag) -> Result<NamespaceRecord> {
        let record = self.record(namespace)?;
        if record.tag != owner {
            return Err(BackendError::Fenced {
                namespace: namespace.to_string(),
                current: record.tag,
                presented: owner,
            });
        }
        Ok(record)
    }

    /// Tell every OSD the namespace's tag (best effort: an OSD that is down learns it from
    /// the writes it later refuses... or accepts from the current owner, which carry it).
    fn broadcast_tag(&self, namespace: &str, tag: OwnerTag) -> Result<()> {
        let targets = self
            .map
            .osds()?
            .into_iter()
            .filter(|entry| entry.state != OsdState::Out)
            .map(|entry| {
                (
                    entry,
                    Message::SetTag {
                        namespace: namespace.to_string(),
                        tag,
                    },
                )
            })
            .collect();
        for (entry, result) in self.call_all(targets)? {
            if let Err(e) = result {
                tracing::warn!(
                    osd = entry.slot.id,
                    "cannot tell OSD the owner tag of {namespace}: {e}"
                );
            }
        }
        Ok(())
    }

    /// Read `[offset, offset + buf.len())` of the object as stored (a compressed namespace's
    /// container), decrypted; returns the version read and its stored size.
    pub(super) fn read_stored(
        &self,
        namespace: &str,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(u64, u64)> {
        let key = self.namespace_key(namespace)?;
        let mut found = self.find(namespace, name)?;
        let mut attempt = 1;
        let (version, size) = loop {
            #[cfg(test)]
            self.run_test_hook();
            match self.read_found(namespace, name, &found, offset, buf) {
                Ok(()) => break (found.version, found.layout.size),
                Err(e @ BackendError::RangeOutOfBounds { .. }) => return Err(e),
                Err(e) => {
                    // The holders may be out of date: cached from before a repair moved or
                    // rebuilt fragments, or found just before one did (a node repairs and
                    // rebalances its volumes' objects while serving their reads, and a move
                    // deletes its source). Find again, and read again only if the fragments
                    // are somewhere else now: a read fails only when the object as it is
                    // stored now cannot be read.
                    self.forget(namespace, name);
                    let again = self.find(namespace, name)?;
                    let moved = again.version != found.version || again.holders != found.holders;
                    if !moved || attempt >= READ_ATTEMPTS {
                        return Err(e);
                    }
                    tracing::debug!(
                        "{namespace}/{name}: read failed ({e}); its fragments moved, reading again"
                    );
                    found = again;
                    attempt += 1;
                }
            }
        };
        if let Some(key) = key {
            crypt::apply(&key, namespace, name, version, offset, buf);
        }
        Ok((version, size))
    }

    #[cfg(test)]
    fn run_test_hook(&self) {
        let hook = self.before_read.lock().pop_front();
        if let Some(hook) = hook {
            hook();
        }
    }

    /// Put `data` as `name` under `owner`, as `version` if given (repair re-encoding an object
    /// writes the version after the one it read, so any put the owner made since stays newer),
    /// else as a new version from the clock (`next_version`).
    pub(super) fn put_version(
        &self,
        namespace: &str,
        name: &str,
        data: &[u8],
        owner: OwnerTag,
        version: Option<u64>,
    ) -> Result<()> {
        validate_name(name)?;
        let record = self.check_owner(namespace, owner)?;
        let preset = self.preset_of(namespace, &record)?;
        let osds = self.map.osds()?;
        let slots = write_slots(&osds);
        let (_, policy) = preset.choose(&slots).ok_or_else(|| BackendError::Osd {
            addr: "-".into(),
            reason: format!(
                "too few writable OSDs or domains for any policy of preset {} ({} OSDs)",
                preset.name,
                slots.iter().filter(|s| s.writable).count()
            ),
        })?;
        let placed = place(
            &object_key(namespace, name),
            &slots,
            policy.fragments(),
            usize::from(policy.x),
        )
        .map_err(|e| BackendError::Osd {
            addr: "-".into(),
            reason: e.to_string(),
        })?;
        // Versions grow with time, and past whatever this store last saw of the name.
        let previous = self
            .found
            .lock()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned();
        let version =
            version.unwrap_or_else(|| self.next_version(previous.as_ref().map(|f| f.version)));
        let packed;
        let data = match Settings::of(&preset).compression {
            Some(codec) => {
                packed = compress::pack(codec, data).map_err(|reason| BackendError::Corrupt {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    reason: format!("cannot compress: {reason}"),
                })?;
                packed.as_slice()
            }
            None => data,
        };
        let sealed;
        let data = match &preset.encryption_key {
            Some(key) => {
                let mut copy = data.to_vec();
                crypt::apply(key, namespace, name, version, 0, &mut copy);
                sealed = copy;
                sealed.as_slice()
            }
            None => data,
        };
        let files = Self::encode_object(
            namespace,
            name,
            data,
            preset.fragment_size,
            (policy.k, policy.m),
            (version, owner),
        )?;
        let locals = if preset.local_parity {
            local_parities(&object_key(namespace, name), &files, &placed, &slots).map_err(|e| {
                BackendError::Corrupt {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    reason: e.to_string(),
                }
            })?
        } else {
            Vec::new()
        };
        let job = PutJob {
            namespace: namespace.to_string(),
            name: name.to_string(),
            key: object_key(namespace, name),
            version,
            owner,
            layout: Layout {
                size: data.len() as u64,
                k: u32::from(policy.k),
                m: u32::from(policy.m),
                fragment_size: preset.fragment_size,
            },
            files: files.into_iter().map(Into::into).collect(),
            placed,
            locals: locals
                .into_iter()
                .map(|(osd, index, file)| (osd, index, file.into()))
                .collect(),
            osds,
            slots,
            needed: usize::from(policy.c),
            per_domain: usize::from(policy.x),
            previous,
            settled: tokio::sync::watch::channel(()).0,
        };
        let shared = Shared {
            clients: self.clients.clone(),
            options: self.options.clone(),
            found: self.found.clone(),
            map: self.map.clone(),
        };
        // Acknowledged once `c` of the `k + m` are durable (local parities do not count); the
        // rest, their re-routes and the collection of older versions go on in the background.
        let (ack, acked) = tokio::sync::oneshot::channel();
        let running = self.background.start();
        self.run(async move {
            tokio::spawn(drive(job, shared, ack, running));
            acked.await.unwrap_or_else(|_| {
                Err(BackendError::Osd {
                    addr: "-".into(),
                    reason: "the put was cancelled (the EC client runtime stopped)".into(),
                })
            })
        })?
    }

    /// The `k + m` fragment files of `data` as version `version` under `owner`.
    pub(super) fn encode_object(
        namespace: &str,
        name: &str,
        data: &[u8],
        fragment_size: u32,
        (k, m): (u8, u8),
        (version, owner): (u64, OwnerTag),
    ) -> Result<Vec<Vec<u8>>> {
        let layout = Layout {
            size: data.len() as u64,
            k: u32::from(k),
            m: u32::from(m),
            fragment_size,
        };
        let code =
            codec(CodecId::REED_SOLOMON_GF8, usize::from(k), usize::from(m)).map_err(|e| {
                BackendError::Corrupt {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    reason: e.to_string(),
                }
            })?;
        let frag_len = layout.fragment_len() as usize;
        let mut fragments = vec![Vec::with_capacity(frag_len); usize::from(k) + usize::from(m)];
        for chunk in 0..layout.chunks() {
            let start = (chunk * layout.chunk_bytes()) as usize;
            let chunk_data = &data[start..start + layout.chunk_len(chunk) as usize];
            let piece = layout.piece_len(chunk) as usize;
            let mut pieces: Vec<Vec<u8>> = (0..usize::from(k))
                .map(|i| {
                    let from = (i * piece).min(chunk_data.len());
                    let to = ((i + 1) * piece).min(chunk_data.len());
                    let mut p = chunk_data[from..to].to_vec();
                    p.resize(piece, 0);
                    p
                })
                .collect();
            let mut parity = vec![vec![0u8; piece]; usize::from(m)];
            {
                let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
                let mut outs: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
                code.encode(&refs, &mut outs)
                    .map_err(|e| BackendError::Corrupt {
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        reason: e.to_string(),
                    })?;
            }
            pieces.extend(parity);
            for (fragment, piece) in fragments.iter_mut().zip(pieces) {
                fragment.extend_from_slice(&piece);
            }
        }
        fragments
            .into_iter()
            .enumerate()
            .map(|(index, fragment_data)| {
                let header = FragmentHeader {
                    codec: CodecId::REED_SOLOMON_GF8,
                    k,
                    m,
                    index: index as u8,
                    fragment_size,
                    object_size: data.len() as u64,
                    object_version: version,
                    owner_tag: owner,
                    data_len: fragment_data.len() as u64,
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    local_group: Vec::new(),
                };
                encode_fragment(&header, &fragment_data).map_err(|e| BackendError::Corrupt {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }
}

impl ObjectStore for EcStore {
    fn create_namespace(&self, namespace: &str, owner: OwnerTag) -> Result<()> {
        validate_name(namespace)?;
        self.keys.lock().remove(namespace);
        let preset = self
            .reserved
            .lock()
            .remove(namespace)
            .unwrap_or_else(|| self.options.default_preset.clone());
        self.map
            .create_namespace(namespace, &NamespaceRecord { tag: owner, preset })?;
        self.broadcast_tag(namespace, owner)
    }

    fn delete_namespace(&self, namespace: &str) -> Result<()> {
        self.keys.lock().remove(namespace);
        let record = self.record(namespace)?;
        for name in self.list(namespace)? {
            self.delete_if_owner(namespace, &name, record.tag)?;
        }
        self.map.delete_namespace(namespace)
    }

    fn namespace_exists(&self, namespace: &str) -> Result<bool> {
        Ok(self.map.namespace(namespace)?.is_some())
    }

    fn list_namespaces(&self) -> Result<Vec<String>> {
        self.map.list_namespaces()
    }

    fn owner_tag(&self, namespace: &str) -> Result<OwnerTag> {
        Ok(self.record(namespace)?.tag)
    }

    fn claim(&self, namespace: &str, new: OwnerTag) -> Result<()> {
        let record = self.record(namespace)?;
        if new <= record.tag {
            return Err(BackendError::Fenced {
                namespace: namespace.to_string(),
                current: record.tag,
                presented: new,
            });
        }
        self.map.swap_tag(namespace, record.tag, new)?;
        self.broadcast_tag(namespace, new)
    }

    fn put(&self, namespace: &str, name: &str, data: &[u8]) -> Result<()> {
        let tag = self.record(namespace)?.tag;
        self.put_if_owner(namespace, name, data, tag)
    }

    fn put_if_owner(
        &self,
        namespace: &str,
        name: &str,
        data: &[u8],
        owner: OwnerTag,
    ) -> Result<()> {
        self.put_version(namespace, name, data, owner, None)
    }

    fn get(&self, namespace: &str, name: &str) -> Result<Vec<u8>> {
        if self.settings(namespace)?.compression.is_some() {
            return self.get_compressed(namespace, name, GET_ATTEMPTS);
        }
        // One version, whole. An object another client overwrites in place (a volume's `tlogs`
        // list, read by an MDS while its owner rewrites it) can change between finding it and
        // reading it: a stale cached location then makes the read find the object again, and
        // the version read may be another size than the buffer. Read again at that size rather
        // than return a prefix of the newer version (or fail on the shorter one).
        let mut last = None;
        for _ in 0..GET_ATTEMPTS {
            let size = self.find(namespace, name)?.layout.size;
            let mut buf = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX)];
            match self.read_stored(namespace, name, 0, &mut buf) {
                Ok((_, stored)) if stored == size => return Ok(buf),
                Ok((version, stored)) => {
                    tracing::debug!(
                        "{namespace}/{name}: version {version} ({stored} bytes) replaced the \
                         {size} bytes found; reading it again"
                    );
                    last = Some(BackendError::RangeOutOfBounds {
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        offset: 0,
                        len: size,
                        size: stored,
                    });
                }
                Err(e @ BackendError::RangeOutOfBounds { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
            self.forget(namespace, name);
        }
        Err(last.unwrap_or_else(|| BackendError::NoSuchObject {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }))
    }

    fn get_range(&self, namespace: &str, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.settings(namespace)?.compression.is_some() {
            return self.read_compressed(namespace, name, offset, buf);
        }
        self.read_stored(namespace, name, offset, buf).map(drop)
    }

    /// A ranged read asks k OSDs over the network (a LAN round trip, and a disk read on each):
    /// as on S3, 128 KiB more payload costs less than another such round.
    fn read_gap(&self) -> u64 {
        128 * 1024
    }

    fn size(&self, namespace: &str, name: &str) -> Result<u64> {
        if self.settings(namespace)?.compression.is_some() {
            return Ok(self.block_index(namespace, name)?.1.size);
        }
        Ok(self.find(namespace, name)?.layout.size)
    }

    fn exists(&self, namespace: &str, name: &str) -> Result<bool> {
        match self.find(namespace, name) {
            Ok(_) => Ok(true),
            Err(BackendError::NoSuchObject { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn delete(&self, namespace: &str, name: &str) -> Result<()> {
        let tag = self.record(namespace)?.tag;
        self.delete_if_owner(namespace, name, tag)
    }

    fn delete_if_owner(&self, namespace: &str, name: &str, owner: OwnerTag) -> Result<()> {
        validate_name(name)?;
        self.check_owner(namespace, owner)?;
        let previous = self
            .found
            .lock()
            .remove(&(namespace.to_string(), name.to_string()));
        let version = self.next_version(previous.map(|f| f.version));
        self.indexes
            .lock()
            .remove(&(namespace.to_string(), name.to_string()));
        let header = FragmentHeader::tombstone(namespace, name, version, owner);
        let file: bytes::Bytes = encode_fragment(&header, &[])
            .map_err(|e| BackendError::Corrupt {
                namespace: namespace.to_string(),
                name: name.to_string(),
                reason: e.to_string(),
            })?
            .into();
        let targets = self
            .map
            .osds()?
            .into_iter()
            .filter(|entry| entry.state != OsdState::Out)
            .map(|entry| {
                (
                    entry,
                    Message::Put {
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        version,
                        index: TOMBSTONE_INDEX,
                        tag: owner,
                        file: file.clone(),
                    },
                )
            })
            .collect();
        let answers = self.call_all(targets)?;
        // The map as it is now: an OSD may have been found dead while we asked it.
        let now = self.map.osds()?;
        let mut failed = Vec::new();
        let mut left = Vec::new();
        let mut stored = 0;
        for (entry, result) in answers {
            let Err(e) = result else {
                stored += 1;
                continue;
            };
            let down = Self::entry_of(&now, entry.slot.id)
                .is_some_and(|o| matches!(o.state, OsdState::Down | OsdState::Out));
            // An answer refusing the delete is a failure whatever the map says; silence from
            // an OSD the map says is down is expected.
            if down && !matches!(e, BackendError::OsdRefused { .. }) {
                left.push(entry.slot.id);
            } else {
                failed.push(format!("OSD {}: {e}", entry.slot.id));
            }
        }
        if !failed.is_empty() {
            return Err(BackendError::Osd {
                addr: "-".into(),
                reason: format!("delete {namespace}/{name}: {}", failed.join("; ")),
            });
        }
        if stored == 0 {
            return Err(BackendError::Osd {
                addr: "-".into(),
                reason: format!(
                    "delete {namespace}/{name}: no OSD took its tombstone (OSDs {left:?} are down)"
                ),
            });
        }
        if !left.is_empty() {
            tracing::info!(
                "delete {namespace}/{name}: OSDs {left:?} are down; the tombstone (version \
                 {version}) hides what they hold of it, and repair removes it once they are back"
            );
        }
        Ok(())
    }

    fn list(&self, namespace: &str) -> Result<Vec<String>> {
        self.record(namespace)?;
        // Per name, its newest fragment and newest tombstone: a name whose newest record is a
        // tombstone was deleted.
        let mut newest: HashMap<String, (Option<u64>, Option<u64>)> = HashMap::new();
        // Out OSDs are never asked, down ones skipped: k of k + m fragments are elsewhere.
        let osds = self.map.osds()?.into_iter();
        for entry in osds.filter(|o| matches!(o.state, OsdState::Up | OsdState::Draining)) {
            let mut after = String::new();
            loop {
                let answer = self.call_all(vec![(
                    entry.clone(),
                    Message::List {
                        namespace: namespace.to_string(),
                        after: after.clone(),
                        limit: 1000,
                    },
                )])?;
                let Some((_, Ok(Message::Listing { fragments }))) = answer.into_iter().next()
                else {
                    // An unreachable OSD: its fragments are on others too (k of k+m suffice).
                    break;
                };
                let Some(last) = fragments.last().map(|f| f.name.clone()) else {
                    break;
                };
                for f in fragments {
                    let (data, tomb) = newest.entry(f.name).or_default();
                    let slot = if f.index == TOMBSTONE_INDEX {
                        tomb
                    } else {
                        data
                    };
                    *slot = (*slot).max(Some(f.version));
                }
                after = last;
            }
        }
        let mut names: Vec<String> = newest
            .into_iter()
            .filter(|(_, (data, tomb))| data.is_some() && data > tomb)
            .map(|(name, _)| name)
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

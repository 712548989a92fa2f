//! The node's set of volumes: creation, deletion, restart, uploads, and the write buffer's size
//! limit.
//!
//! The registry file lists the volumes this node owns, so a restart knows what to bring back
//! even if a volume's write-buffer directory is gone (then it is rebuilt from the backend). One
//! [`UploadScheduler`] per node drives every volume's [`Volume::upload_one`] with a bounded
//! number of threads, backing a volume off while its backend fails; after every successful
//! upload the manager checks the write buffer against its limit and evicts disposable SCOs,
//! oldest first, from every volume.
//!
//! An optional [`MdsHook`] connects the node's metadata servers without the engine knowing
//! about networks: it is asked for a map to start each restarted or adopted volume from, and
//! told which volumes the node serves (to feed their master MDS) and which it stops serving.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use vstor_backend::ObjectStore;

use crate::config::{
    validate_volume_name, DtlMode, ParentRef, Standing, VolumeConfig, VolumeOptions,
};
use crate::error::{Result, VolumeError};
use crate::meta;
use crate::read_cache::{ReadCache, ReadCacheStats};
use crate::scheduler::{SchedulerConfig, UploadScheduler};
use crate::types::{ClusterLocation, ScoName};
use crate::volume::{MapSeed, ReplaySummary, Volume, VolumeInfo};
use crate::wbfs::{StdFs, WbFs};

mod clones;
mod handoff;
mod restart;
mod unserved;

pub use unserved::Unserved;

const REGISTRY_KIND: &[u8; 4] = b"REGY";
const REGISTRY_VERSION: u32 = 1;
/// Default of [`ManagerConfig::upload_concurrency`].
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 4;
/// Default of [`ManagerConfig::max_open_age`].
pub const DEFAULT_MAX_OPEN_AGE: Duration = Duration::from_secs(60);

/// The node's metadata servers as the manager sees them (see the module docs). Called from
/// blocking contexts (never a tokio worker): implementations may wait on the network, bounded.
pub trait MdsHook: Send + Sync {
    /// Start fetching a map to start `volume` from (restart or adoption). The open reads the
    /// volume's configuration, owner tag and backend list meanwhile (on S3 or the EC tier each
    /// a round trip), then calls the returned [`PendingSeed`] for the map, or `None` for a full
    /// backend replay. The engine checks the seed against the backend list and ignores one that
    /// does not fit.
    fn seed(&self, volume: &str) -> PendingSeed;
    /// `volume` is served by this node from now on (created, cloned, restarted or adopted):
    /// called before its first upload, so every uncorked TLog can reach the master.
    fn serving(&self, volume: &Arc<Volume>);
    /// `volume` is no longer served here: `deleted` when it is gone for good.
    fn stopped(&self, volume: &str, deleted: bool);
}

/// A seed on its way from an MDS: calling it waits for it (bounded by the hook).
pub type PendingSeed = Box<dyn FnOnce() -> Option<MapSeed> + Send>;

/// A shared [`MdsHook`] in the manager's configuration.
#[derive(Clone)]
pub struct MdsHookRef(pub Arc<dyn MdsHook>);

impl std::fmt::Debug for MdsHookRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MdsHook")
    }
}

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Directory holding one write-buffer directory per volume.
    pub write_buffer_dir: PathBuf,
    /// File listing the volumes this node owns.
    pub registry_path: PathBuf,
    /// Total SCO bytes the write buffer may hold before disposable SCOs are evicted.
    pub write_buffer_limit: u64,
    /// The frontends' runtime: DTL links run their workers there (see `vstor_dtl::mirror`).
    /// Without one each link gets a thread.
    pub runtime: Option<tokio::runtime::Handle>,
    /// Upload steps in flight at once across all volumes (the upload scheduler's threads).
    pub upload_concurrency: usize,
    /// An open TLog and SCO whose oldest data waited this long are closed and queued for upload,
    /// so an idle volume's last writes reach the backend. `None`: only when full (or at
    /// shutdown and snapshots).
    pub max_open_age: Option<Duration>,
    /// The node's metadata servers, if it uses any.
    pub mds: Option<MdsHookRef>,
    /// The node's mutual-TLS identity for its volumes' DTL links; `None`: plain TCP.
    pub dtl_tls: Option<vstor_net::PeerTls>,
    /// Bytes of backend SCO data the node keeps in RAM for its volumes' reads (`read_cache`);
    /// 0: none.
    pub read_cache_bytes: u64,
}

impl ManagerConfig {
    /// The standard layout under a node's data directory.
    pub fn under(data_dir: &Path, write_buffer_limit: u64) -> Self {
        Self {
            write_buffer_dir: data_dir.join("write-buffer"),
            registry_path: data_dir.join("registry"),
            write_buffer_limit,
            runtime: None,
            upload_concurrency: DEFAULT_UPLOAD_CONCURRENCY,
            max_open_age: Some(DEFAULT_MAX_OPEN_AGE),
            mds: None,
            dtl_tls: None,
            read_cache_bytes: 0,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    volumes: Vec<String>,
}

pub struct VolumeManager {
    config: ManagerConfig,
    /// The volumes' write buffers' file system (the registry, a node-level file, is not on it).
    fs: Arc<dyn WbFs>,
    backend: Arc<dyn ObjectStore>,
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    /// Volumes in the registry that could not be restarted, with the reason.
    failed: RwLock<BTreeMap<String, String>>,
    /// Volumes another node owns now, with that node's name (see [`Self::drop_moved`]).
    moved: RwLock<BTreeMap<String, String>>,
    uploads: UploadScheduler,
    registry_lock: Mutex<()>,
    /// Shared by every volume served here (see `read_cache`).
    read_cache: Option<Arc<ReadCache>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl VolumeManager {
    /// Open the node: restart every registered volume and start its uploader.
    pub fn open(config: ManagerConfig, backend: Arc<dyn ObjectStore>) -> Result<Arc<Self>> {
        Self::open_on(config, backend, Arc::new(StdFs))
    }

    /// [`open`](Self::open) with the volumes' write buffers on `wbfs` (a test's
    /// [`SimFs`](crate::SimFs)).
    pub fn open_on(
        config: ManagerConfig,
        backend: Arc<dyn ObjectStore>,
        wbfs: Arc<dyn WbFs>,
    ) -> Result<Arc<Self>> {
        let wb = &config.write_buffer_dir;
        wbfs.create_dir_all(wb).map_err(VolumeError::io("-", wb))?;
        let registry = Self::load_registry(&config.registry_path)?;
        let scheduler = SchedulerConfig {
            concurrency: config.upload_concurrency,
            max_open_age: config.max_open_age,
        };
        let read_cache = ReadCache::new(config.read_cache_bytes).map(Arc::new);
        let manager = Arc::new_cyclic(|me: &std::sync::Weak<Self>| {
            let me = me.clone();
            Self {
                read_cache,
                config,
                fs: wbfs,
                backend,
                volumes: RwLock::new(BTreeMap::new()),
                failed: RwLock::new(BTreeMap::new()),
                moved: RwLock::new(BTreeMap::new()),
                uploads: UploadScheduler::start(
                    scheduler,
                    Box::new(move || {
                        if let Some(manager) = me.upgrade() {
                            manager.enforce_write_buffer_limit();
                        }
                    }),
                ),
                registry_lock: Mutex::new(()),
            }
        });
        for name in registry.volumes {
            if let Err(e) = manager.open_registered(&name) {
                tracing::error!(volume = %name, error = %e, "volume could not be restarted");
                manager.failed.write().insert(name, e.to_string());
            }
        }
        Ok(manager)
    }

    /// Open registered volume `name` from its write buffer (and the MDS or the backend), replay
    /// its DTL and serve it: what a node start does for each volume, and what
    /// [`restart`](Self::restart) does for one.
    fn open_registered(self: &Arc<Self>, name: &str) -> Result<Arc<Volume>> {
        let dir = self.config.write_buffer_dir.join(name);
        let volume = self.open_map(name, &dir)?;
        tracing::info!(volume = %name, "volume restarted");
        // Writes acknowledged after the last FLUSH may be missing from the write buffer after a
        // crash; the DTL has them. An unreachable DTL is not fatal: the volume comes up degraded
        // with what the write buffer kept.
        if let Err(e) = volume.replay_dtl() {
            tracing::error!(volume = %name, error = %e, "DTL replay at restart failed; continuing without it");
        }
        self.serve(name, &volume);
        Ok(volume)
    }

    /// Open volume `name` from `dir`, its map seeded from the MDS when one has a usable table
    /// (else replayed from the backend), timing both for `VolumeInfo::opened_in_us`; the DTL is
    /// the caller's next step.
    fn open_map(&self, name: &str, dir: &Path) -> Result<Arc<Volume>> {
        let started = Instant::now();
        let seed = self.mds_seed(name);
        let volume =
            Volume::open_seeded_with(self.fs.clone(), dir, self.backend.clone(), name, seed)?;
        volume.set_opened_in(started.elapsed());
        volume.set_dtl_tls(self.config.dtl_tls.clone());
        Ok(volume)
    }

    fn mds_seed(&self, name: &str) -> PendingSeed {
        match &self.config.mds {
            Some(hook) => hook.0.seed(name),
            None => Box::new(|| None),
        }
    }

    /// Tell the MDS hook, if any, that `name` is no longer served here.
    pub(crate) fn mds_stopped(&self, name: &str, deleted: bool) {
        if let Some(hook) = &self.config.mds {
            hook.0.stopped(name, deleted);
        }
    }

    fn load_registry(path: &Path) -> Result<Registry> {
        match fs::read(path) {
            Ok(bytes) => meta::decode(REGISTRY_KIND, REGISTRY_VERSION, &bytes)
                .map_err(|e| VolumeError::corrupt("-", path.display().to_string(), e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
            Err(e) => Err(VolumeError::io("-", path)(e)),
        }
    }

    fn update_registry(&self, change: impl FnOnce(&mut Vec<String>)) -> Result<()> {
        let _guard = self.registry_lock.lock();
        let path = &self.config.registry_path;
        let mut registry = Self::load_registry(path)?;
        change(&mut registry.volumes);
        registry.volumes.sort();
        registry.volumes.dedup();
        meta::write_file_atomic(
            path,
            &meta::encode(REGISTRY_KIND, REGISTRY_VERSION, &registry),
        )
        .map_err(VolumeError::io("-", path))
    }

    /// Evict disposable SCOs while the write buffer holds more than its limit.
    pub fn enforce_write_buffer_limit(&self) {
        let volumes: Vec<Arc<Volume>> = self.volumes.read().values().cloned().collect();
        let total: u64 = volumes.iter().map(|v| v.local_bytes().0).sum();
        let mut excess = total.saturating_sub(self.config.write_buffer_limit);
        for volume in volumes {
            if excess == 0 {
                break;
            }
            let freed = volume.evict(excess);
            if freed > 0 {
                tracing::debug!(volume = %volume.name(), freed, "evicted disposable SCOs");
            }
            excess = excess.saturating_sub(freed);
        }
    }

    pub fn create(self: &Arc<Self>, name: &str, options: &VolumeOptions) -> Result<Arc<Volume>> {
        validate_volume_name(name)?;
        if self.volumes.read().contains_key(name) || self.failed.read().contains_key(name) {
            return Err(VolumeError::Exists {
                volume: name.to_string(),
            });
        }
        let config = VolumeConfig::new(name, options, now_secs())?;
        let dir = self.config.write_buffer_dir.join(name);
        let volume = Volume::create_on(self.fs.clone(), &dir, self.backend.clone(), config)?;
        if let Err(e) = self.update_registry(|names| names.push(name.to_string())) {
            let _ = volume.destroy();
            return Err(e);
        }
        self.serve(name, &volume);
        tracing::info!(volume = %name, size = options.size, "volume created");
        Ok(volume)
    }

    pub fn get(&self, name: &str) -> Result<Arc<Volume>> {
        if let Some(reason) = self.failed.read().get(name) {
            return Err(VolumeError::Halted {
                volume: name.to_string(),
                reason: format!("restart failed: {reason}"),
            });
        }
        if let Some(volume) = self.volumes.read().get(name) {
            return Ok(volume.clone());
        }
        if let Some(node) = self.moved.read().get(name) {
            return Err(VolumeError::Moved {
                volume: name.to_string(),
                node: node.clone(),
            });
        }
        Err(VolumeError::NotFound {
            volume: name.to_string(),
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.volumes.read().keys().cloned().collect()
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        self.volumes.read().values().map(|v| v.info()).collect()
    }

    /// The read cache's size and counters; `None` when the node has none.
    pub fn read_cache_stats(&self) -> Option<ReadCacheStats> {
        self.read_cache.as_ref().map(|c| c.stats())
    }

    /// Drop what the read cache keeps of `namespace` (a volume no longer served here).
    pub(crate) fn forget_cached(&self, namespace: &str) {
        if let Some(cache) = &self.read_cache {
            cache.forget_namespace(namespace);
        }
    }

    /// Volumes that failed to restart, with the reason.
    pub fn failed(&self) -> BTreeMap<String, String> {
        self.failed.read().clone()
    }

    /// Volumes this node served until another node took them, with that node's name.
    pub fn moved(&self) -> BTreeMap<String, String> {
        self.moved.read().clone()
    }

    /// Stop scheduling the volume's uploads; returns once no upload step of it is running.
    fn stop_uploader(&self, name: &str) {
        self.uploads.remove(name);
    }

    /// Clone snapshot `snapshot` of `parent` as a new volume `name` (see `Volume::create_clone`).
    /// Waits up to `wait` for the snapshot to reach the backend.
    pub fn clone_volume(
        self: &Arc<Self>,
        name: &str,
        parent: &str,
        snapshot: &str,
        options: &VolumeOptions,
        wait: Duration,
    ) -> Result<Arc<Volume>> {
        validate_volume_name(name)?;
        if self.volumes.read().contains_key(name) || self.failed.read().contains_key(name) {
            return Err(VolumeError::Exists {
                volume: name.to_string(),
            });
        }
        let source = self.get(parent)?;
        let parent_config = source.config();
        if parent_config.ancestors.len() >= u8::MAX as usize {
            return Err(VolumeError::Refused {
                volume: parent.to_string(),
                reason: format!("clone chains are at most {} deep", u8::MAX),
            });
        }
        if !source.wait_snapshot_in_backend(snapshot, Instant::now() + wait)? {
            return Err(VolumeError::NotInBackend {
                volume: parent.to_string(),
                snapshot: snapshot.to_string(),
            });
        }
        let (map, size) = source.snapshot_map(snapshot)?;
        let mut inherited = Vec::with_capacity(map.written_clusters() as usize);
        let mut too_deep = false;
        map.for_each_written(
            |address, location| match location.clone_id().checked_add(1) {
                Some(clone_id) => inherited.push((
                    address,
                    ClusterLocation::new(
                        ScoName {
                            clone_id,
                            ..location.sco()
                        },
                        location.offset(),
                    ),
                )),
                None => too_deep = true,
            },
        );
        if too_deep {
            return Err(VolumeError::Refused {
                volume: parent.to_string(),
                reason: "clone chain too deep".into(),
            });
        }
        if options.encryption_key_file.is_some() {
            return Err(VolumeError::InvalidConfig {
                volume: name.to_string(),
                reason: "a clone inherits its parent's encryption (and key): it cannot set its own"
                    .into(),
            });
        }
        let mut options = options.clone();
        options.size = size;
        options.sco_size = parent_config.sco_size();
        let mut config = VolumeConfig::new(name, &options, now_secs())?;
        // Same key, same cluster indexes: the clone reads its ancestors' clusters as they are.
        config.encryption = parent_config.encryption.clone();
        config.parent = Some(ParentRef {
            volume: parent.to_string(),
            snapshot: snapshot.to_string(),
        });
        config.ancestors = std::iter::once(parent_config.namespace.clone())
            .chain(parent_config.ancestors.iter().cloned())
            .collect();
        let dir = self.config.write_buffer_dir.join(name);
        let volume = Volume::create_clone_on(
            self.fs.clone(),
            &dir,
            self.backend.clone(),
            config,
            &inherited,
        )?;
        let registered = source
            .set_clone(snapshot, name, true)
            .and_then(|()| self.update_registry(|names| names.push(name.to_string())));
        if let Err(e) = registered {
            let _ = source.set_clone(snapshot, name, false);
            let _ = volume.destroy();
            return Err(e);
        }
        self.serve(name, &volume);
        tracing::info!(volume = %name, parent = %parent, %snapshot, clusters = inherited.len(), "clone created");
        Ok(volume)
    }

    /// Delete a volume, its write buffer and its backend namespace. Refused while clones of its
    /// snapshots exist (they read its SCOs).
    pub fn delete(&self, name: &str) -> Result<()> {
        if let Ok(volume) = self.get(name) {
            let clones = volume.clones();
            if !clones.is_empty() {
                return Err(VolumeError::HasClones {
                    volume: name.to_string(),
                    what: "a snapshot".into(),
                    clones,
                });
            }
        }
        let failed = self.failed.write().remove(name);
        if let Some(reason) = failed {
            let dir = self.config.write_buffer_dir.join(name);
            // A volume another node adopted is only forgotten here: its namespace is theirs.
            if self.owned_elsewhere(name, &dir) {
                tracing::info!(volume = %name, %reason, "forgetting a volume adopted by another node");
            } else {
                let _ = self.backend.delete_namespace(name);
            }
            let _ = self.fs.remove_dir_all(&dir);
            return self.update_registry(|names| names.retain(|n| n != name));
        }
        let volume = self
            .volumes
            .write()
            .remove(name)
            .ok_or_else(|| VolumeError::NotFound {
                volume: name.to_string(),
            })?;
        volume.stop();
        volume.detach_dtl();
        self.stop_uploader(name);
        self.mds_stopped(name, true);
        volume.forget_dtl();
        let config = volume.config();
        self.forget_cached(&config.namespace);
        let parent = config.parent;
        volume.destroy()?;
        self.update_registry(|names| names.retain(|n| n != name))?;
        if let Some(parent) = parent {
            match self.get(&parent.volume) {
                Ok(source) => {
                    if let Err(e) = source.set_clone(&parent.snapshot, name, false) {
                        tracing::warn!(volume = %name, %parent, error = %e, "could not unregister the clone from its parent");
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %name, %parent, error = %e, "parent of the deleted clone is not on this node");
                }
            }
        }
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    fn owned_elsewhere(&self, name: &str, dir: &Path) -> bool {
        let ours = self
            .fs
            .read(&dir.join("config"))
            .ok()
            .and_then(|bytes| VolumeConfig::decode(name, "config", &bytes).ok());
        ours.is_some_and(|ours| {
            matches!(
                ours.standing(self.backend.as_ref()),
                Ok(Standing::Claimed { .. } | Standing::Replaced { .. })
            )
        })
    }

    /// Change a volume's DTL mode and address; the link restarts (and catches up).
    pub fn update_dtl(&self, name: &str, mode: DtlMode, addr: Option<String>) -> Result<()> {
        let volume = self.get(name)?;
        volume.set_dtl(mode, addr)
    }

    /// Take over a volume whose node is gone: claim its backend namespace with a newer owner
    /// tag (fencing the old node's uploads), restore it from the backend into this node's write
    /// buffer, replay its DTL (registering with the new tag fences the old node's DTL writes),
    /// and serve it here. Fails if the DTL cannot be read: adopting without it would silently
    /// drop every acknowledged write that had not reached the backend.
    pub fn adopt(self: &Arc<Self>, name: &str) -> Result<(Arc<Volume>, ReplaySummary)> {
        self.adopt_as(name, None)
    }

    /// [`adopt`](Self::adopt) with the owner tag the cluster registry handed out
    /// (`take_ownership`), so the backend and the registry agree on the fencing token. Refused
    /// if the backend already carries that tag or a newer one (another node claimed it).
    pub fn adopt_with_tag(
        self: &Arc<Self>,
        name: &str,
        tag: u64,
    ) -> Result<(Arc<Volume>, ReplaySummary)> {
        self.adopt_as(name, Some(tag))
    }

    fn adopt_as(
        self: &Arc<Self>,
        name: &str,
        wanted: Option<u64>,
    ) -> Result<(Arc<Volume>, ReplaySummary)> {
        validate_volume_name(name)?;
        if self.volumes.read().contains_key(name) {
            return Err(VolumeError::InvalidConfig {
                volume: name.to_string(),
                reason: "already served by this node".into(),
            });
        }
        let mut config = VolumeConfig::load_from_backend(self.backend.as_ref(), name)?;
        let current = self
            .backend
            .owner_tag(&config.namespace)
            .map_err(VolumeError::backend(name))?;
        let newest = current.max(config.owner_tag);
        let tag = match wanted {
            None => newest + 1,
            Some(tag) if tag > newest => tag,
            Some(tag) => {
                return Err(VolumeError::Adopted {
                    volume: name.to_string(),
                    ours: tag,
                    current: newest,
                })
            }
        };
        self.backend
            .claim(&config.namespace, tag)
            .map_err(VolumeError::backend(name))?;
        config.owner_tag = tag;
        self.backend
            .put_if_owner(
                &config.namespace,
                crate::config::CONFIG_OBJECT,
                &config.encode(),
                tag,
            )
            .map_err(VolumeError::backend(name))?;
        let dir = self.config.write_buffer_dir.join(name);
        match self.fs.remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VolumeError::io(name, &dir)(e)),
        }
        self.failed.write().remove(name);
        let volume = self.open_map(name, &dir)?;
        let summary = match volume.replay_dtl() {
            Ok(summary) => summary,
            Err(e) => {
                volume.stop();
                let _ = self.fs.remove_dir_all(&dir);
                return Err(e);
            }
        };
        self.update_registry(|names| names.push(name.to_string()))?;
        self.serve(name, &volume);
        tracing::info!(volume = %name, owner_tag = tag, replayed = summary.applied, "volume adopted");
        Ok((volume, summary))
    }

    /// Start serving a volume this node now owns: list it, link its DTL, start its uploader.
    fn serve(self: &Arc<Self>, name: &str, volume: &Arc<Volume>) {
        self.moved.write().remove(name);
        self.volumes
            .write()
            .insert(name.to_string(), volume.clone());
        if let Some(cache) = &self.read_cache {
            volume.attach_read_cache(cache.clone());
        }
        volume.set_runtime(self.config.runtime.clone());
        volume.set_dtl_tls(self.config.dtl_tls.clone());
        volume.attach_dtl();
        if let Some(hook) = &self.config.mds {
            hook.0.serving(volume);
        }
        self.uploads.add(volume.clone());
    }

    /// Clean stop: refuse new writes, flush every volume, queue everything for upload, wait up
    /// to `timeout` for the uploads, then stop the volumes. Returns the names of volumes whose
    /// uploads did not finish.
    ///
    /// Like a move's `release`, a volume whose uploads finished counts as handed off
    /// (`Volume::is_handed_off`): in a cluster the next owner adopts it from the backend with
    /// nothing missing, and the edge server, still running, tells attached edges so.
    pub fn shutdown(&self, timeout: Duration) -> Vec<String> {
        let volumes: Vec<Arc<Volume>> = self.volumes.read().values().cloned().collect();
        // Whether each volume's flush worked: one that failed is never called handed off, even
        // if nothing was left to upload.
        let flushed: Vec<bool> = volumes
            .iter()
            .map(|volume| {
                volume.set_releasing(true);
                let flushed = volume.flush().and_then(|()| volume.close_current_tlog());
                if let Err(e) = &flushed {
                    tracing::error!(volume = %volume.name(), error = %e, "flush at shutdown failed");
                }
                flushed.is_ok()
            })
            .collect();
        let deadline = Instant::now() + timeout;
        let mut unfinished = Vec::new();
        for (volume, flushed) in volumes.iter().zip(flushed) {
            if volume.wait_for_uploads(deadline) && flushed {
                volume.set_handed_off();
            } else {
                unfinished.push(volume.name().to_string());
            }
            volume.stop();
            volume.detach_dtl();
        }
        self.uploads.shutdown();
        unfinished
    }
}

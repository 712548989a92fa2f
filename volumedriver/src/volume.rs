//! One volume: the cluster map, the open SCO and TLog, the upload queue, and restart.
//!
//! # Write path
//! A write appends whole clusters to the open SCO (unaligned writes are read-modify-written under
//! the volume lock, so two sub-cluster writes to one cluster cannot lose each other; a cluster
//! only on the backend is fetched first, without the lock), appends one
//! LOC entry per cluster to the current TLog, and updates the in-RAM map. Nothing is fsynced: the
//! data sits in the page cache until a FLUSH or FUA write. A full SCO is sealed (its CRC goes into
//! the TLog) and queued for upload; after `tlog_scos` SCOs the TLog is closed and queued behind
//! them.
//!
//! A large cluster-aligned write (128 KiB and up) makes all of those decisions under the lock but
//! copies its data into the reserved SCO slots after releasing it, so that several such writes
//! reach the disk at once (they go with `O_DIRECT`); reads of those slots, the SCO's upload,
//! FLUSH and TLog closes wait for the copy first. `inflight` has the rules.
//!
//! # FLUSH
//! A flush (1) writes the TLog's buffered entries out and notes the current end of the log, (2)
//! fsyncs every SCO and closed TLog written since the last flush, *outside* the volume lock, then
//! (3) appends a SYNC entry vouching for the noted end and fsyncs the TLog. A TLog that should be
//! closed while a flush is between (1) and (3) stays open until (3) is done (`roll_pending`), so
//! the SYNC always lands in the TLog it describes. Recovery keeps exactly what the last verified
//! SYNC (or CLOSE) covers; see `tlog`.
//!
//! # Upload pipeline and corking
//! The queue is FIFO: each TLog is queued after all of its SCOs, so uploading in order is the
//! barrier. Before a SCO leaves the node its data CRC is checked against the TLog's SCO-CRC entry;
//! before a TLog leaves, it is parsed and verified. After a TLog is on the backend, the backend's
//! TLog list is rewritten to include it; only then is the TLog *uncorked*: its SCOs become
//! disposable (evictable; still read locally until evicted) and its local file is deleted. The
//! engine performs no waiting of its own: [`Volume::upload_one`] does one step and the caller
//! (the node's upload scheduler, or a test) decides when to call it, which keeps this module
//! free of timers and threads.
//!
//! # Restart
//! The map is rebuilt by replaying the backend's TLogs (the source of truth) and then any newer
//! TLogs still in the write buffer. A closed local TLog is re-queued for upload with its SCOs. An
//! unclosed one (the node was killed) is cut back to its last verified SYNC, the SCOs it
//! references are truncated to the clusters it references and resealed, and it is rewritten as a
//! closed TLog; write-buffer files that nothing references any more are deleted. With the write
//! buffer gone entirely, the same code restarts the volume from the backend alone.
//!
//! # Modules, along the path a request takes
//! `state` (the state behind the lock, request checks, halting), `restart` (rebuild and crash
//! recovery), `read` (plan under the lock, execute without it), `write` (write, zero, discard,
//! SCO/TLog append, seal, roll, throttle), `inflight` (large writes copying without the lock),
//! `flush`, `upload` (upload steps, uncork, backend list
//! puts), `write_buffer` (local bytes, eviction), `info`; then the features built on them:
//! `snapshots` (and rollback, clones' views), `scrub`, `dtl_link`. This file keeps the
//! [`Volume`] struct, create/open, stop/destroy and configuration changes.
//!
//! # Locks
//! Taken in this order (outer first); a thread holding one never waits for an earlier one:
//!
//! 1. `upload_lock` — one upload step at a time ([`Volume::upload_one`]); `rollback` takes it to
//!    wait for the step in flight.
//! 2. `flush_lock` — one FLUSH at a time; also snapshot creation, `close_current_tlog`, rollback.
//! 3. `scrub_lock` — one scrub at a time.
//! 4. `config_lock` — one configuration change at a time (`change_config`).
//! 5. `list_lock` — every put of the backend TLog list, with the check that the list it built is
//!    still current (and every change of `State::backend_tlogs` after open).
//! 6. `state` — the `State`; the `upload_work` condvar waits on it.
//! 7. `runtime` — a leaf: never held with another lock.
//! 8. `inflight`'s tracker — a leaf. Waiting on it while holding `state` is allowed: finishing
//!    a copy takes no other lock, and a thread never waits while it holds a reservation.
//!
//! (A [`SnapshotView`]'s map cache lock is taken before `state`.)
//!
//! **The state lock is never held across backend I/O** — requests queue on it, so a slow backend
//! would stall every client. The exceptions are deliberate: `open` (the volume is not shared
//! yet); `rollback`, which replaces the whole state and holds the lock across its list put and
//! the rebuild that re-reads the backend's TLogs so that no request sees or writes into a
//! half-rolled-back volume (an admin operation; I/O waits for it). A read-modify-write of a
//! partial cluster whose data is only on the backend (an evicted SCO, a clone's ancestor) reads
//! that cluster without the lock and retries under it if the map moved meanwhile
//! (`read::fetch_cluster`). The tests `backend_calls_never_hold_the_state_lock` and
//! `partial_cluster_rewrites_read_the_backend_without_the_state_lock` (tests/engine.rs) check
//! this from inside every backend call.
//!
//! The serialising locks *are* held across backend I/O, by design: `upload_lock` across an
//! upload step's puts (steps must complete in queue order, and rollback must not race a put),
//! `list_lock` across a list put (two puts built from different states must not land out of
//! order), `scrub_lock` for a whole scrub, `config_lock` across the config put, a snapshot
//! view's map lock while it replays the snapshot's TLogs. None of them is taken on the client
//! read/write path (`flush_lock` is, by FLUSH, but only across local fsyncs), so holding them
//! delays only background and admin work, which would have to wait for each other anyway.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use parking_lot::Mutex;
use vstor_backend::{BackendError, ObjectStore};

use crate::config::{
    Standing, TLogList, TLogRecord, VolumeConfig, CONFIG_OBJECT, TLOG_LIST_OBJECT,
};
use crate::error::{Result, VolumeError};
use crate::tlog::{self, Entry};
use crate::types::{ClusterLocation, TLogNumber};
use crate::wbfs::{StdFs, WbFs};

mod crypt;
mod dtl_link;
mod fence;
mod flush;
mod inflight;
mod info;
mod mds_link;
mod read;
mod read_backend;
mod read_nonblocking;
mod restart;
mod scrub;
mod served;
mod snapshots;
mod state;
mod upload;
mod upload_hooks;
mod write;
mod write_buffer;

pub(crate) use dtl_link::unregister_dtl;
pub use dtl_link::{ReplaySummary, TRIM_MARKER_CLONE};
pub use info::VolumeInfo;
pub use mds_link::{MapSeed, SeedPage, UncorkSink};
pub use read_nonblocking::ReadAttempt;
pub use scrub::{ScrubProgress, ScrubReport};
#[cfg(feature = "fuzzing")]
pub use snapshots::fuzzing as snapshot_log;
pub use snapshots::{SnapshotInfo, SnapshotView};
pub use upload::UploadTask;
pub use write::WriteOutcome;

use snapshots::LocalMeta;
use state::{State, Stats, CONFIG_FILE, SCO_DIR, TLOG_DIR};

/// One volume: see the module docs.
pub struct Volume {
    name: String,
    dir: PathBuf,
    /// The write buffer's file system: every file under `dir` is read and written through it.
    fs: Arc<dyn WbFs>,
    backend: Arc<dyn ObjectStore>,
    cluster_size: u64,
    state: Mutex<State>,
    flush_lock: Mutex<()>,
    /// Serialises every put of the backend TLog list with the check that it is still current.
    list_lock: Mutex<()>,
    /// One scrub at a time.
    scrub_lock: Mutex<()>,
    /// One configuration change at a time (held across the config put, see `change_config`).
    config_lock: Mutex<()>,
    /// Held for each upload step; a rollback waits for the step in flight.
    upload_lock: Mutex<()>,
    runtime: Mutex<Option<tokio::runtime::Handle>>,
    /// The node's mutual-TLS identity for the DTL link (`None`: plain TCP); see
    /// [`Volume::set_dtl_tls`].
    dtl_tls: Mutex<Option<vstor_net::PeerTls>>,
    /// Notified whenever upload work is queued or done; also wakes the node's upload scheduler.
    upload_work: crate::scheduler::UploadSignal,
    /// Smoothed upload throughput in bytes per second (0 = not measured yet).
    upload_rate: AtomicU64,
    stats: Stats,
    /// Why the node fenced this volume, if it did (see [`Volume::set_fenced`]).
    fenced: parking_lot::RwLock<Option<String>>,
    /// Set while the volume is handed to another node (see `VolumeManager::release`): writes
    /// are refused, flushes still run.
    releasing: AtomicBool,
    /// Set once a release succeeded: everything this volume acknowledged is on the backend
    /// (see [`Volume::is_handed_off`]).
    handed_off: AtomicBool,
    /// Lock-free copies of facts the edge server checks on every request (see `served`).
    served: served::ServedFacts,
    /// Told about every uncorked TLog (an MDS master's feed), see `mds_link`.
    uncork_sink: parking_lot::RwLock<Option<Arc<dyn mds_link::UncorkSink>>>,
    /// Per-operation latency as the frontends see it (see `latency`).
    latency: crate::latency::IoLatency,
    /// The data's cipher if the volume is encrypted at rest (see `crypt`).
    cipher: Option<vstor_backend::crypt::UnitCipher>,
    /// Writes reserved under the state lock whose data is still being copied (see `inflight`).
    inflight: inflight::InFlight,
    /// The node's read cache, once the manager serves the volume (see `read_cache`).
    read_cache: std::sync::OnceLock<Arc<crate::read_cache::ReadCache>>,
}

impl Volume {
    /// Create a clone: a new volume whose backend history starts with one TLog (number 1) mapping
    /// every inherited cluster to its ancestor's SCO (`inherited`, clone ids already remapped).
    /// No data is copied.
    pub fn create_clone(
        dir: &Path,
        backend: Arc<dyn ObjectStore>,
        config: VolumeConfig,
        inherited: &[(u64, ClusterLocation)],
    ) -> Result<Arc<Self>> {
        Self::create_clone_on(Arc::new(StdFs), dir, backend, config, inherited)
    }

    /// [`create_clone`](Self::create_clone) with its write buffer on `fs`.
    pub fn create_clone_on(
        fs: Arc<dyn WbFs>,
        dir: &Path,
        backend: Arc<dyn ObjectStore>,
        config: VolumeConfig,
        inherited: &[(u64, ClusterLocation)],
    ) -> Result<Arc<Self>> {
        let name = config.name.clone();
        let namespace = config.namespace.clone();
        let owner = config.owner_tag;
        Self::create_on(fs.clone(), dir, backend.clone(), config)?;
        let base = (|| {
            let entries: Vec<Entry> = inherited
                .iter()
                .map(|(address, location)| Entry::Loc {
                    address: *address,
                    location: *location,
                })
                .collect();
            let record = TLogRecord::new(1);
            let bytes = tlog::encode_closed(TLogNumber(1), &entries);
            backend
                .put_if_owner(&namespace, &record.object_name(), &bytes, owner)
                .map_err(VolumeError::backend(&name))?;
            let list = TLogList {
                tlogs: vec![record],
                ..TLogList::default()
            };
            backend
                .put_if_owner(&namespace, TLOG_LIST_OBJECT, &list.encode(), owner)
                .map_err(VolumeError::backend(&name))?;
            Self::open_on(fs.clone(), dir, backend.clone(), &name)
        })();
        if base.is_err() {
            let _ = backend.delete_namespace(&namespace);
            let _ = fs.remove_dir_all(dir);
        }
        base
    }

    /// Create a new volume: its backend namespace (owned with the config's owner tag), its
    /// configuration there and in the write buffer directory `dir`.
    pub fn create(
        dir: &Path,
        backend: Arc<dyn ObjectStore>,
        config: VolumeConfig,
    ) -> Result<Arc<Self>> {
        Self::create_on(Arc::new(StdFs), dir, backend, config)
    }

    /// [`create`](Self::create) with the write buffer on `fs` (a test's [`SimFs`](crate::SimFs)).
    pub fn create_on(
        fs: Arc<dyn WbFs>,
        dir: &Path,
        backend: Arc<dyn ObjectStore>,
        config: VolumeConfig,
    ) -> Result<Arc<Self>> {
        let name = config.name.clone();
        let cipher = crypt::load_cipher(&config)?;
        backend
            .create_namespace(&config.namespace, config.owner_tag)
            .map_err(|e| match e {
                BackendError::NamespaceExists { .. } => VolumeError::Exists {
                    volume: name.clone(),
                },
                other => VolumeError::backend(&name)(other),
            })?;
        let setup = (|| {
            backend
                .put_if_owner(
                    &config.namespace,
                    CONFIG_OBJECT,
                    &config.encode(),
                    config.owner_tag,
                )
                .map_err(VolumeError::backend(&name))?;
            Self::prepare_dir(fs.as_ref(), &name, dir, &config)
        })();
        if let Err(e) = setup {
            let _ = backend.delete_namespace(&config.namespace);
            let _ = fs.remove_dir_all(dir);
            return Err(e);
        }
        Ok(Arc::new(Self::from_state(
            fs,
            dir,
            backend,
            State::new(config, TLogList::default()),
            cipher,
        )))
    }

    fn prepare_dir(fs: &dyn WbFs, name: &str, dir: &Path, config: &VolumeConfig) -> Result<()> {
        for sub in [SCO_DIR, TLOG_DIR] {
            let path = dir.join(sub);
            fs.create_dir_all(&path)
                .map_err(VolumeError::io(name, &path))?;
        }
        let path = dir.join(CONFIG_FILE);
        fs.write_atomic(&path, &config.encode())
            .map_err(VolumeError::io(name, &path))
    }

    fn from_state(
        fs: Arc<dyn WbFs>,
        dir: &Path,
        backend: Arc<dyn ObjectStore>,
        state: State,
        cipher: Option<vstor_backend::crypt::UnitCipher>,
    ) -> Self {
        let owner_tag = state.config.owner_tag;
        Self {
            name: state.config.name.clone(),
            dir: dir.to_path_buf(),
            fs,
            backend,
            cluster_size: state.config.cluster_size,
            state: Mutex::new(state),
            flush_lock: Mutex::new(()),
            list_lock: Mutex::new(()),
            scrub_lock: Mutex::new(()),
            config_lock: Mutex::new(()),
            upload_lock: Mutex::new(()),
            runtime: Mutex::new(None),
            dtl_tls: Mutex::new(None),
            upload_work: crate::scheduler::UploadSignal::default(),
            upload_rate: AtomicU64::new(0),
            inflight: inflight::InFlight::default(),
            read_cache: std::sync::OnceLock::new(),
            stats: Stats::default(),
            fenced: parking_lot::RwLock::new(None),
            releasing: AtomicBool::new(false),
            handed_off: AtomicBool::new(false),
            served: served::ServedFacts::new(owner_tag),
            uncork_sink: parking_lot::RwLock::new(None),
            latency: crate::latency::IoLatency::default(),
            cipher,
        }
    }

    /// Restart a volume. With its write-buffer directory present this is a local restart
    /// (including crash recovery); without it, the volume is rebuilt from the backend alone.
    pub fn open(dir: &Path, backend: Arc<dyn ObjectStore>, name: &str) -> Result<Arc<Self>> {
        Self::open_on(Arc::new(StdFs), dir, backend, name)
    }

    /// [`open`](Self::open) with the write buffer on `fs` (a test's [`SimFs`](crate::SimFs),
    /// after a power cut).
    pub fn open_on(
        fs: Arc<dyn WbFs>,
        dir: &Path,
        backend: Arc<dyn ObjectStore>,
        name: &str,
    ) -> Result<Arc<Self>> {
        Self::open_seeded(fs, dir, backend, name, None)
    }

    /// [`open_on`](Self::open_on), starting from `seed` (the map as of a prefix of the backend
    /// TLog list, e.g. an MDS table) instead of replaying that prefix. A seed that does not fit
    /// the backend list is ignored (full replay) with a log line saying why.
    pub fn open_seeded(
        fs: Arc<dyn WbFs>,
        dir: &Path,
        backend: Arc<dyn ObjectStore>,
        name: &str,
        seed: Option<MapSeed>,
    ) -> Result<Arc<Self>> {
        Self::open_seeded_with(fs, dir, backend, name, move || seed)
    }

    /// [`open_seeded`](Self::open_seeded), calling `seed` for the seed only once the volume's
    /// configuration, owner tag, backend list and local metadata are read, so a seed fetched
    /// over the network (an MDS dump) arrives while those reads run. Not called if the open
    /// fails before.
    pub fn open_seeded_with(
        fs: Arc<dyn WbFs>,
        dir: &Path,
        backend: Arc<dyn ObjectStore>,
        name: &str,
        seed: impl FnOnce() -> Option<MapSeed>,
    ) -> Result<Arc<Self>> {
        let config_path = dir.join(CONFIG_FILE);
        let config = match fs.read(&config_path) {
            Ok(bytes) => VolumeConfig::decode(name, &config_path.display().to_string(), &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let config = VolumeConfig::load_from_backend(backend.as_ref(), name)?;
                Self::prepare_dir(fs.as_ref(), name, dir, &config)?;
                config
            }
            Err(e) => return Err(VolumeError::io(name, &config_path)(e)),
        };
        if config.name != name {
            return Err(VolumeError::corrupt(
                name,
                config_path.display().to_string(),
                format!("configuration is for volume {:?}", config.name),
            ));
        }
        let cipher = crypt::load_cipher(&config)?;
        // A copy whose namespace is another node's, or another volume's of the same name, must
        // neither merge that namespace's TLogs nor upload into it.
        match config.standing(backend.as_ref())? {
            Standing::Ours => {}
            Standing::Deleted => {
                return Err(VolumeError::backend(name)(BackendError::NoSuchNamespace {
                    namespace: config.namespace.clone(),
                }))
            }
            Standing::Claimed { current } => {
                return Err(VolumeError::Adopted {
                    volume: name.to_string(),
                    ours: config.owner_tag,
                    current,
                })
            }
            Standing::Replaced {
                created,
                incarnation,
            } => {
                return Err(VolumeError::Replaced {
                    volume: name.to_string(),
                    ours: config.created,
                    theirs: created,
                    ours_incarnation: config.incarnation,
                    theirs_incarnation: incarnation,
                })
            }
        }
        let backend_tlogs = match backend.get(&config.namespace, TLOG_LIST_OBJECT) {
            Ok(bytes) => TLogList::decode(name, &bytes)?,
            Err(BackendError::NoSuchObject { .. }) => TLogList::default(),
            Err(e) => return Err(VolumeError::backend(name)(e)),
        };
        let mut state = State::new(config, backend_tlogs);
        state.meta = LocalMeta::load(fs.as_ref(), name, dir, &state.backend_tlogs)?;
        // Snapshot metadata the write buffer has and the backend list lacks (a crash before the
        // uploader put the list): put it again, or a restart from the backend would lose it.
        if state.meta.snapshots != state.backend_tlogs.snapshots
            || state.meta.dropped != state.backend_tlogs.dropped
            || state.meta.dtl_floor != state.backend_tlogs.dtl_floor
        {
            state.list_dirty = true;
            state.list_changes += 1;
        }
        let volume = Self::from_state(fs, dir, backend, state, cipher);
        let seed = seed();
        {
            let mut st = volume.state.lock();
            volume.rebuild(&mut st, seed)?;
            volume.settle_snapshots(&mut st)?;
        }
        Ok(Arc::new(volume))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size(&self) -> u64 {
        self.state.lock().config.size
    }

    pub fn read_only(&self) -> bool {
        self.state.lock().config.read_only
    }

    pub fn config(&self) -> VolumeConfig {
        self.state.lock().config.clone()
    }

    /// Grow the volume to `new_size` bytes.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        crate::config::validate_size(&self.name, new_size)?;
        self.change_config(|current| {
            if current.template {
                return Err(VolumeError::Refused {
                    volume: self.name.clone(),
                    reason: "it is a template, read-only for good: clone it and resize the clone"
                        .into(),
                });
            }
            if new_size < current.size {
                return Err(VolumeError::InvalidConfig {
                    volume: self.name.clone(),
                    reason: format!(
                        "cannot shrink from {} to {} (only growing is supported)",
                        crate::config::human_size(current.size),
                        crate::config::human_size(new_size)
                    ),
                });
            }
            Ok(VolumeConfig {
                size: new_size,
                ..current.clone()
            })
        })
    }

    /// Fence the volume (`Some(reason)`) or lift the fence (`None`). While fenced, writes,
    /// trims, write-zeroes and flushes fail with [`VolumeError::Fenced`] instead of being
    /// acknowledged; reads go on, and nothing is uploaded (see [`Volume::upload_one`]), nor is
    /// anything else written to the backend: configuration changes (resize, read-only, access,
    /// DTL, template), snapshots and their deletes, clone bookkeeping, rollbacks, scrubs and
    /// sweeps are refused with `Fenced` too. The cluster layer fences a node's volumes when the
    /// node may have lost its registry lease, so another node may adopt them (and the volume
    /// may be deleted and created again, starting again at owner tag 1, which the backend's
    /// owner check cannot tell from this copy's): this node must not acknowledge anything, nor
    /// write a backend object, from then on. A write that passed the gate before it closed may
    /// still complete; a flush checks the gate again after its work, so no FLUSH is
    /// acknowledged once fenced.
    pub fn set_fenced(&self, reason: Option<String>) {
        let mut fenced = self.fenced.write();
        if fenced.is_some() != reason.is_some() {
            match &reason {
                Some(reason) => {
                    tracing::warn!(volume = %self.name, %reason, "volume fenced: writes refused");
                }
                None => {
                    tracing::info!(volume = %self.name, "volume unfenced: writes accepted again");
                }
            }
        }
        let lifted = fenced.is_some() && reason.is_none();
        *fenced = reason;
        drop(fenced);
        if lifted {
            // Uploads paused while fenced (`upload_one`) resume now, not at the next tick.
            self.upload_work.notify_all();
        }
    }

    /// Whether the volume is fenced (see [`Volume::set_fenced`]).
    pub fn fenced(&self) -> Option<String> {
        self.fenced.read().clone()
    }

    /// `Err(Fenced)` while fenced. Frontends call it again before acknowledging a write whose
    /// DTL round trip was still in flight when the fence went up.
    pub fn check_fence(&self) -> Result<()> {
        match &*self.fenced.read() {
            Some(reason) => Err(VolumeError::Fenced {
                volume: self.name.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Make the volume read-only (writes fail with `ReadOnly`) or writable again. Writes that
    /// already completed are unaffected; flush first if they must be durable.
    pub fn set_read_only(&self, read_only: bool) -> Result<()> {
        self.change_config(|current| {
            if current.template && !read_only {
                return Err(VolumeError::Refused {
                    volume: self.name.clone(),
                    reason: "a template stays read-only; clone it instead".into(),
                });
            }
            Ok(VolumeConfig {
                read_only,
                ..current.clone()
            })
        })
    }

    /// Replace the volume's NBD allow list (`crate::access`). Connections already attached are
    /// not cut; the list is checked when a client opens or lists exports.
    pub fn set_access(&self, access: crate::access::VolumeAccess) -> Result<()> {
        self.change_config(|current| {
            Ok(VolumeConfig {
                access,
                ..current.clone()
            })
        })
    }

    /// The volume's NBD allow list.
    pub fn access(&self) -> crate::access::VolumeAccess {
        self.state.lock().config.access.clone()
    }

    /// Make the volume a template: flush it, snapshot its current state as `template` unless the
    /// newest snapshot already is it, and make it read-only for good. Templates are only cloned.
    pub fn set_template(&self) -> Result<SnapshotInfo> {
        self.flush()?;
        let needs_snapshot = {
            let st = self.state.lock();
            self.check_usable(&st)?;
            self.has_unclosed_data(&st)
                || st
                    .meta
                    .snapshots
                    .last()
                    .is_none_or(|s| s.tlog != snapshots_last_tlog(&st))
        };
        let snapshot = if needs_snapshot {
            self.snapshot_create("template")?
        } else {
            let st = self.state.lock();
            let last = st
                .meta
                .snapshots
                .last()
                .cloned()
                .ok_or_else(|| VolumeError::Refused {
                    volume: self.name.clone(),
                    reason: "no snapshot to base the template on".into(),
                })?;
            drop(st);
            self.snapshot(&last.name)?
        };
        self.change_config(|current| {
            Ok(VolumeConfig {
                read_only: true,
                template: true,
                ..current.clone()
            })
        })?;
        Ok(snapshot)
    }

    /// Change the configuration: `edit` derives the new one from the current one (or refuses),
    /// it is stored (see [`store_config`](Self::store_config)) and then takes effect. The
    /// `config_lock` serialises changes, so the state lock is not held across the backend put
    /// and no change is lost to a concurrent one. A grown size grows the map.
    pub(super) fn change_config(
        &self,
        edit: impl FnOnce(&VolumeConfig) -> Result<VolumeConfig>,
    ) -> Result<()> {
        let _change = self.config_lock.lock();
        self.check_fence()?;
        let config = {
            let st = self.state.lock();
            self.check_usable(&st)?;
            edit(&st.config)?
        };
        self.store_config(&config)?;
        let mut st = self.state.lock();
        if config.size > st.config.size {
            st.map.grow(config.size / self.cluster_size);
        }
        self.served.set_owner_tag(config.owner_tag);
        st.config = config;
        Ok(())
    }

    /// Persist a changed configuration: on the backend (the source of truth for a restart from
    /// the backend alone) and then in the write buffer.
    fn store_config(&self, config: &VolumeConfig) -> Result<()> {
        self.backend
            .put_if_owner(
                &config.namespace,
                CONFIG_OBJECT,
                &config.encode(),
                config.owner_tag,
            )
            .map_err(VolumeError::backend(&self.name))?;
        let path = self.dir.join(CONFIG_FILE);
        self.fs
            .write_atomic(&path, &config.encode())
            .map_err(VolumeError::io(&self.name, &path))
    }

    /// Refuse further I/O and wake the uploader so it can exit.
    pub fn stop(&self) {
        let mut st = self.state.lock();
        st.stopped = true;
        self.served.set_stopped();
        drop(st);
        self.upload_work.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        self.state.lock().stopped
    }

    /// Remove the volume's write buffer and backend namespace. The volume must be stopped.
    pub fn destroy(&self) -> Result<()> {
        self.stop();
        let namespace = self.state.lock().config.namespace.clone();
        match self.backend.delete_namespace(&namespace) {
            Ok(()) | Err(BackendError::NoSuchNamespace { .. }) => {}
            Err(e) => return Err(VolumeError::backend(&self.name)(e)),
        }
        match self.fs.remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VolumeError::io(&self.name, &self.dir)(e)),
        }
    }
}

fn snapshots_last_tlog(st: &State) -> u64 {
    st.closed_tlogs
        .back()
        .map_or(0, |t| t.number.0)
        .max(st.backend_tlogs.last_number())
}

//! One volume: the cluster map, the open SCO and TLog, the upload queue, and restart.
//!
//! # Write path
//! A write appends whole clusters to the open SCO (unaligned writes are read-modify-written under
//! the volume lock, so two sub-cluster writes to one cluster cannot lose each other), appends one
//! LOC entry per cluster to the current TLog, and updates the in-RAM map. Nothing is fsynced: the
//! data sits in the page cache until a FLUSH or FUA write. A full SCO is sealed (its CRC goes into
//! the TLog) and queued for upload; after `tlog_scos` SCOs the TLog is closed and queued behind
//! them.
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
//! (the manager's uploader thread, or a test) decides when to call it, which keeps this module
//! free of timers and threads.
//!
//! # Restart
//! The map is rebuilt by replaying the backend's TLogs (the source of truth) and then any newer
//! TLogs still in the write buffer. A closed local TLog is re-queued for upload with its SCOs. An
//! unclosed one (the node was killed) is cut back to its last verified SYNC, the SCOs it
//! references are truncated to the clusters it references and resealed, and it is rewritten as a
//! closed TLog; write-buffer files that nothing references any more are deleted. With the write
//! buffer gone entirely, the same code restarts the volume from the backend alone.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use vstor_backend::{BackendError, ChunkCrcs, ObjectStore};
use vstor_dtl::Ticket;

use crate::config::{TLogList, TLogRecord, VolumeConfig, CONFIG_OBJECT, TLOG_LIST_OBJECT};
use dtl_link::{DtlLink, Position};
pub use dtl_link::{ReplaySummary, TRIM_MARKER_CLONE};

mod dtl_link;
mod scrub;
mod snapshots;

use crate::error::{Result, VolumeError};
use crate::map::ClusterMap;
use crate::meta::write_file_atomic;
use crate::sco::{self, ScoHeader, SCO_HEADER_LEN};
use crate::tlog::{self, Entry, SyncPoint, TLogWriter};
use crate::types::{ClusterLocation, ScoName, ScoNumber, TLogNumber, LBA_SIZE};
pub use scrub::{ScrubProgress, ScrubReport};
use snapshots::LocalMeta;
pub use snapshots::{SnapshotInfo, SnapshotView};

/// Bounds of the delay imposed on one request while the volume is over its write-buffer budget.
const THROTTLE_MIN: Duration = Duration::from_micros(50);
const THROTTLE_MAX: Duration = Duration::from_millis(100);
/// Upload rate assumed before any upload was measured, and the floor of the estimate.
const MIN_UPLOAD_RATE: u64 = 16 << 20;
/// WRITE_ZEROES with allocation writes zeros in chunks of this size.
const ZERO_CHUNK: u64 = 1 << 20;

const CONFIG_FILE: &str = "config";
const SCO_DIR: &str = "sco";
const TLOG_DIR: &str = "tlog";

/// A reply to a write: done, and possibly a request to slow the client down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    pub throttle: Option<Duration>,
}

/// One step of the upload pipeline, in queue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadTask {
    Sco(ScoNumber),
    TLog(TLogNumber),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScoState {
    Open,
    Sealed { crc: u32 },
    Disposable,
}

struct LocalSco {
    file: Arc<File>,
    clusters: u64,
    state: ScoState,
    dirty: bool,
    /// CRC32C of each 64 KiB chunk of the file, computed while it was appended to; `None` for
    /// SCOs found at restart. Lets the upload hand the file to the backend without reading it.
    chunk_crcs: Option<Arc<[u32]>>,
}

struct OpenSco {
    number: ScoNumber,
    /// The file's per-chunk CRCs (header included); its data CRC for the TLog follows from them.
    crcs: ChunkCrcs,
    clusters: u64,
}

struct CurrentTLog {
    writer: TLogWriter,
    scos: Vec<u32>,
    data_bytes: u64,
    sealed_scos: u64,
    /// Clusters this TLog's entries made garbage (overwrites, trims).
    garbage: u64,
}

struct ClosedTLog {
    number: TLogNumber,
    path: PathBuf,
    file: Arc<File>,
    record: TLogRecord,
    dirty: bool,
    garbage: u64,
}

#[derive(Default)]
struct Stats {
    reads: AtomicU64,
    writes: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    backend_reads: AtomicU64,
    throttled_writes: AtomicU64,
    throttle_micros: AtomicU64,
    evicted_scos: AtomicU64,
    uploaded_scos: AtomicU64,
    uploaded_bytes: AtomicU64,
    uploaded_tlogs: AtomicU64,
    upload_errors: AtomicU64,
}

struct State {
    config: VolumeConfig,
    map: ClusterMap,
    scos: BTreeMap<ScoNumber, LocalSco>,
    open_sco: Option<OpenSco>,
    tlog: Option<CurrentTLog>,
    closed_tlogs: VecDeque<ClosedTLog>,
    uploads: VecDeque<UploadTask>,
    backend_tlogs: TLogList,
    next_sco: u32,
    next_tlog: u64,
    flush_in_progress: bool,
    roll_pending: bool,
    last_sync: Option<SyncPoint>,
    non_disposable_bytes: u64,
    disposable_bytes: u64,
    halted: Option<String>,
    stopped: bool,
    last_upload_error: Option<String>,
    /// A SCO or TLog file was created since the last flush: its directory entry must be fsynced
    /// too, or a power cut could lose the whole file.
    new_files: bool,
    /// The DTL link, when the volume's mode is not `none`.
    dtl: Option<DtlLink>,
    /// End of the write history applied at restart: the position after the newest cluster
    /// location read back from the backend's and the write buffer's TLogs (see `dtl_link`).
    applied_end: Position,
    /// Snapshots, rollback-dropped TLog ranges and the DTL floor (see `snapshots`).
    meta: LocalMeta,
    /// Backend namespaces reads may go to, by clone id: the volume's own, then its ancestors'.
    namespaces: Vec<Arc<str>>,
    /// Bumped by every change that rewrites the backend TLog list other than appending (a
    /// rollback, a scrub): an upload started before it must not put a list built on the old one.
    epoch: u64,
    /// The backend TLog list lacks a metadata change (snapshot, clone registration): the
    /// uploader puts it.
    list_dirty: bool,
    /// Counts metadata changes, so a list put only clears `list_dirty` if nothing changed
    /// while it was in flight.
    list_changes: u64,
    /// The snapshot log was appended to without fsync: the next FLUSH syncs it.
    meta_unsynced: bool,
    /// The open snapshot log (see `snapshots`).
    meta_log: Option<Arc<File>>,
    /// Clusters overwritten or trimmed since the last scrub (garbage estimate).
    garbage_clusters: u64,
}

/// Where the bytes of one piece of a read come from.
enum Source {
    Zero,
    Local {
        file: Arc<File>,
        offset: u64,
    },
    Backend {
        namespace: Arc<str>,
        /// The SCO object, named as in its own namespace (clone id 0).
        sco: ScoName,
        offset: u64,
    },
}

struct Segment {
    start: usize,
    len: usize,
    source: Source,
}

/// Everything `vstor volume info` shows about a volume.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub namespace: String,
    pub size: u64,
    pub cluster_size: u64,
    pub sco_size: u64,
    pub tlog_scos: u64,
    pub write_buffer: u64,
    pub read_only: bool,
    pub owner_tag: u64,
    pub created: u64,
    pub state: String,
    pub halted_reason: Option<String>,
    pub written_bytes: u64,
    pub map_memory_bytes: u64,
    pub local_sco_bytes: u64,
    pub not_uploaded_bytes: u64,
    pub disposable_bytes: u64,
    pub upload_queue: usize,
    pub tlogs_on_backend: usize,
    pub throttling: bool,
    pub throttled_writes: u64,
    pub throttle_ms: u64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub backend_reads: u64,
    pub evicted_scos: u64,
    pub uploaded_scos: u64,
    pub uploaded_bytes: u64,
    /// Smoothed upload throughput, bytes per second (0 until measured).
    pub upload_rate: u64,
    pub uploaded_tlogs: u64,
    pub upload_errors: u64,
    pub last_upload_error: Option<String>,
    /// `sync`, `async` or `none`.
    pub dtl_mode: String,
    pub dtl_addr: Option<String>,
    /// `ok_sync`, `ok_standalone`, `catch_up` or `degraded`.
    pub dtl_state: String,
    /// Every acknowledged write not on the backend is on the DTL (`dtl_state` is `ok_sync`).
    pub dtl_in_sync: bool,
    /// Data bytes queued for the DTL and not yet acknowledged by it.
    pub dtl_backlog_bytes: u64,
    /// Times the DTL link went degraded since the volume was opened.
    pub dtl_degradations: u64,
    pub dtl_last_error: Option<String>,
    /// Bytes of SCO data the backend TLogs reference.
    pub backend_bytes: u64,
    /// `VOLUME@SNAPSHOT` this volume was cloned from.
    pub parent: Option<String>,
    /// Volumes cloned from this volume's snapshots.
    pub children: Vec<String>,
    pub template: bool,
    pub snapshots: usize,
    /// Overwritten or trimmed data since the last scrub (an estimate of what a scrub frees).
    pub garbage_bytes: u64,
}

pub struct Volume {
    name: String,
    dir: PathBuf,
    backend: Arc<dyn ObjectStore>,
    cluster_size: u64,
    state: Mutex<State>,
    flush_lock: Mutex<()>,
    /// Serialises every put of the backend TLog list with the check that it is still current.
    list_lock: Mutex<()>,
    /// One scrub at a time.
    scrub_lock: Mutex<()>,
    /// Held for each upload step; a rollback waits for the step in flight.
    upload_lock: Mutex<()>,
    runtime: Mutex<Option<tokio::runtime::Handle>>,
    upload_work: Condvar,
    /// Smoothed upload throughput in bytes per second (0 = not measured yet).
    upload_rate: AtomicU64,
    stats: Stats,
}

/// Reads a SCO file from the start with positional reads (leaving its cursor alone) and
/// computes the CRC32C of its data (everything after the header) on the way.
struct ScoReader<'a> {
    file: &'a File,
    offset: u64,
    crc: u32,
}

impl std::io::Read for ScoReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        let data_start = SCO_HEADER_LEN.saturating_sub(self.offset).min(n as u64) as usize;
        self.crc = crc32c::crc32c_append(self.crc, &buf[data_start..n]);
        self.offset += n as u64;
        Ok(n)
    }
}

fn sco_path(dir: &Path, sco: ScoName) -> PathBuf {
    dir.join(SCO_DIR).join(sco.to_string())
}

fn tlog_path(dir: &Path, number: TLogNumber) -> PathBuf {
    dir.join(TLOG_DIR).join(number.object_name())
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
        let name = config.name.clone();
        let namespace = config.namespace.clone();
        let owner = config.owner_tag;
        Self::create(dir, backend.clone(), config)?;
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
            Self::open(dir, backend.clone(), &name)
        })();
        if base.is_err() {
            let _ = backend.delete_namespace(&namespace);
            let _ = fs::remove_dir_all(dir);
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
        let name = config.name.clone();
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
            Self::prepare_dir(&name, dir, &config)
        })();
        if let Err(e) = setup {
            let _ = backend.delete_namespace(&config.namespace);
            let _ = fs::remove_dir_all(dir);
            return Err(e);
        }
        Ok(Arc::new(Self::from_state(
            dir,
            backend,
            State::new(config, TLogList::default()),
        )))
    }

    fn prepare_dir(name: &str, dir: &Path, config: &VolumeConfig) -> Result<()> {
        for sub in [SCO_DIR, TLOG_DIR] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(VolumeError::io(name, &path))?;
        }
        let path = dir.join(CONFIG_FILE);
        write_file_atomic(&path, &config.encode()).map_err(VolumeError::io(name, &path))
    }

    fn from_state(dir: &Path, backend: Arc<dyn ObjectStore>, state: State) -> Self {
        Self {
            name: state.config.name.clone(),
            dir: dir.to_path_buf(),
            backend,
            cluster_size: state.config.cluster_size,
            state: Mutex::new(state),
            flush_lock: Mutex::new(()),
            list_lock: Mutex::new(()),
            scrub_lock: Mutex::new(()),
            upload_lock: Mutex::new(()),
            runtime: Mutex::new(None),
            upload_work: Condvar::new(),
            upload_rate: AtomicU64::new(0),
            stats: Stats::default(),
        }
    }

    /// Restart a volume. With its write-buffer directory present this is a local restart
    /// (including crash recovery); without it, the volume is rebuilt from the backend alone.
    pub fn open(dir: &Path, backend: Arc<dyn ObjectStore>, name: &str) -> Result<Arc<Self>> {
        let config_path = dir.join(CONFIG_FILE);
        let config = if config_path.exists() {
            let bytes = fs::read(&config_path).map_err(VolumeError::io(name, &config_path))?;
            VolumeConfig::decode(name, &config_path.display().to_string(), &bytes)?
        } else {
            let config = VolumeConfig::load_from_backend(backend.as_ref(), name)?;
            Self::prepare_dir(name, dir, &config)?;
            config
        };
        if config.name != name {
            return Err(VolumeError::corrupt(
                name,
                config_path.display().to_string(),
                format!("configuration is for volume {:?}", config.name),
            ));
        }
        match backend.owner_tag(&config.namespace) {
            Ok(current) if current > config.owner_tag => {
                return Err(VolumeError::Adopted {
                    volume: name.to_string(),
                    ours: config.owner_tag,
                    current,
                })
            }
            Ok(_) => {}
            Err(e) => return Err(VolumeError::backend(name)(e)),
        }
        let backend_tlogs = match backend.get(&config.namespace, TLOG_LIST_OBJECT) {
            Ok(bytes) => TLogList::decode(name, &bytes)?,
            Err(BackendError::NoSuchObject { .. }) => TLogList::default(),
            Err(e) => return Err(VolumeError::backend(name)(e)),
        };
        let mut state = State::new(config, backend_tlogs);
        state.meta = LocalMeta::load(name, dir, &state.backend_tlogs)?;
        let volume = Self::from_state(dir, backend, state);
        {
            let mut st = volume.state.lock();
            volume.rebuild(&mut st)?;
        }
        Ok(Arc::new(volume))
    }

    fn rebuild(&self, st: &mut State) -> Result<()> {
        let name = self.name.clone();
        let namespace = st.config.namespace.clone();
        let mut backend_scos = BTreeSet::new();
        // A rollback that was killed after writing its decision down but before rewriting the
        // backend list: finish it here.
        let before = st.backend_tlogs.tlogs.len();
        let meta = st.meta.clone();
        st.backend_tlogs
            .tlogs
            .retain(|r| !meta.is_dropped(r.number));
        if st.backend_tlogs.tlogs.len() != before {
            st.list_dirty = true;
            st.list_changes += 1;
        }
        let records = st.backend_tlogs.tlogs.clone();
        st.applied_end = st.applied_end.max(Position::from_pair(st.meta.dtl_floor));
        for record in &records {
            let object = record.object_name();
            let bytes = self
                .backend
                .get(&namespace, &object)
                .map_err(VolumeError::backend(&name))?;
            let parsed = tlog::parse(&bytes, true)
                .map_err(|e| VolumeError::corrupt(&name, format!("backend TLog {object}"), e))?;
            st.garbage_clusters += self.apply_entries(st, &parsed.entries, &object)?;
            backend_scos.extend(record.scos.iter().map(|n| (*n, record.sco_version(*n))));
            if let Some(newest) = record.scos.iter().max() {
                // Every SCO of an uploaded TLog is complete: nothing in it is left to replay.
                st.applied_end = st.applied_end.max(Position::new(*newest, u32::MAX));
            }
            st.next_tlog = st.next_tlog.max(record.number + 1);
        }
        if let Some((max, _)) = backend_scos.last() {
            st.next_sco = st.next_sco.max(max + 1);
        }
        // Numbers handed out before a rollback are never reused.
        st.next_sco = st.next_sco.max(st.meta.dtl_floor.0);
        if let Some(end) = st.meta.dropped.iter().map(|(_, to)| *to).max() {
            st.next_tlog = st.next_tlog.max(end + 1);
        }
        let last_backend_tlog = records.last().map_or(0, |r| r.number);

        // Local TLogs newer than the backend's, oldest first.
        let tlog_dir = self.dir.join(TLOG_DIR);
        let mut local_tlogs: Vec<(TLogNumber, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&tlog_dir).map_err(VolumeError::io(&name, &tlog_dir))? {
            let entry = entry.map_err(VolumeError::io(&name, &tlog_dir))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            match TLogNumber::parse_object_name(&file_name) {
                Some(number) => local_tlogs.push((number, entry.path())),
                None => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        local_tlogs.sort();
        let mut pending_scos = BTreeSet::new();
        let mut torn = false;
        for (number, path) in local_tlogs {
            if number.0 <= last_backend_tlog || torn || st.meta.is_dropped(number.0) {
                fs::remove_file(&path).map_err(VolumeError::io(&name, &path))?;
                continue;
            }
            let bytes = fs::read(&path).map_err(VolumeError::io(&name, &path))?;
            let parsed = match tlog::parse(&bytes, false) {
                Ok(parsed) if parsed.number == number => parsed,
                _ => {
                    // Not even a valid header: created, but nothing in it was ever synced.
                    fs::remove_file(&path).map_err(VolumeError::io(&name, &path))?;
                    torn = true;
                    continue;
                }
            };
            let entries = match (parsed.closed, self.first_bad_sco(st, &parsed.entries)) {
                (true, None) => parsed.entries,
                (true, Some(reason)) => {
                    tracing::warn!(
                        volume = %name,
                        tlog = %number.object_name(),
                        %reason,
                        "closed TLog describes data that did not reach the disk; keeping its synced prefix"
                    );
                    torn = true;
                    let prefix = tlog::parse_synced_prefix(&bytes)
                        .map_err(|e| VolumeError::corrupt(&name, path.display().to_string(), e))?;
                    self.reseal_after_crash(st, number, &path, prefix.entries)?
                }
                (false, _) => {
                    torn = true;
                    self.reseal_after_crash(st, number, &path, parsed.entries)?
                }
            };
            let garbage = self.apply_entries(st, &entries, &path.display().to_string())?;
            st.garbage_clusters += garbage;
            let mut record = TLogRecord::new(number.0);
            for entry in &entries {
                if let Entry::ScoCrc { sco, clusters, crc } = *entry {
                    let header = self.sco_header(st, sco);
                    let sco_file = sco_path(&self.dir, sco);
                    let (file, len) = sco::open(&sco_file, &header).map_err(|e| {
                        VolumeError::corrupt(&name, sco_file.display().to_string(), e)
                    })?;
                    let clusters = clusters as u64;
                    if len < sco::cluster_offset(clusters, self.cluster_size) {
                        return Err(VolumeError::corrupt(
                            &name,
                            sco_file.display().to_string(),
                            format!("holds fewer than the {clusters} clusters its TLog records"),
                        ));
                    }
                    st.scos.insert(
                        sco.number,
                        LocalSco {
                            file: Arc::new(file),
                            clusters,
                            state: ScoState::Sealed { crc },
                            dirty: true,
                            chunk_crcs: None,
                        },
                    );
                    st.uploads.push_back(UploadTask::Sco(sco.number));
                    st.non_disposable_bytes += clusters * self.cluster_size;
                    record.scos.push(sco.number.0);
                    record.data_bytes += clusters * self.cluster_size;
                    pending_scos.insert(sco.number.0);
                    st.next_sco = st.next_sco.max(sco.number.0 + 1);
                }
            }
            let file = File::open(&path).map_err(VolumeError::io(&name, &path))?;
            st.closed_tlogs.push_back(ClosedTLog {
                number,
                path,
                file: Arc::new(file),
                record,
                dirty: true,
                garbage,
            });
            st.uploads.push_back(UploadTask::TLog(number));
            st.next_tlog = st.next_tlog.max(number.0 + 1);
        }

        // SCO files: cached copies of backend SCOs stay (disposable); anything else is debris of
        // writes that no surviving TLog entry references.
        let sco_dir = self.dir.join(SCO_DIR);
        for entry in fs::read_dir(&sco_dir).map_err(VolumeError::io(&name, &sco_dir))? {
            let entry = entry.map_err(VolumeError::io(&name, &sco_dir))?;
            let path = entry.path();
            let parsed = ScoName::parse(&entry.file_name().to_string_lossy());
            let Some(sco) = parsed.filter(|s| s.clone_id == 0) else {
                let _ = fs::remove_file(&path);
                continue;
            };
            if pending_scos.contains(&sco.number.0) {
                continue;
            }
            if !backend_scos.contains(&(sco.number.0, sco.version)) {
                fs::remove_file(&path).map_err(VolumeError::io(&name, &path))?;
                continue;
            }
            let header = self.sco_header(st, sco);
            match sco::open(&path, &header) {
                Ok((file, len))
                    if len >= SCO_HEADER_LEN
                        && (len - SCO_HEADER_LEN).is_multiple_of(self.cluster_size) =>
                {
                    st.scos.insert(
                        sco.number,
                        LocalSco {
                            file: Arc::new(file),
                            clusters: (len - SCO_HEADER_LEN) / self.cluster_size,
                            state: ScoState::Disposable,
                            dirty: false,
                            chunk_crcs: None,
                        },
                    );
                    st.disposable_bytes += len;
                }
                // A damaged cached copy is dropped: the backend has the SCO.
                _ => fs::remove_file(&path).map_err(VolumeError::io(&name, &path))?,
            }
        }
        Ok(())
    }

    /// Why the SCOs sealed in `entries` cannot be trusted, if they cannot: a file missing, too
    /// short, or whose data no longer matches the CRC the TLog recorded for it.
    fn first_bad_sco(&self, st: &State, entries: &[Entry]) -> Option<String> {
        entries.iter().find_map(|entry| {
            let Entry::ScoCrc { sco, clusters, crc } = *entry else {
                return None;
            };
            let path = sco_path(&self.dir, sco);
            let clusters = clusters as u64;
            let check = sco::open(&path, &self.sco_header(st, sco)).and_then(|(file, len)| {
                if len < sco::cluster_offset(clusters, self.cluster_size) {
                    return Err(format!("holds fewer than {clusters} clusters"));
                }
                match sco::data_crc(&file, clusters, self.cluster_size) {
                    Ok(found) if found == crc => Ok(()),
                    Ok(_) => Err("data does not match its CRC".to_string()),
                    Err(e) => Err(format!("cannot read: {e}")),
                }
            });
            check.err().map(|reason| format!("SCO {sco}: {reason}"))
        })
    }

    /// Crash recovery of an unclosed TLog: keep its verified entries, truncate and reseal the SCOs
    /// they reference, and rewrite it as a closed TLog. Returns the entries of the closed TLog.
    fn reseal_after_crash(
        &self,
        st: &State,
        number: TLogNumber,
        path: &Path,
        mut entries: Vec<Entry>,
    ) -> Result<Vec<Entry>> {
        let name = &self.name;
        let mut sealed = BTreeMap::new();
        let mut referenced: BTreeMap<ScoNumber, u64> = BTreeMap::new();
        for entry in &entries {
            match *entry {
                Entry::ScoCrc { sco, clusters, .. } => {
                    sealed.insert(sco.number, clusters as u64);
                }
                Entry::Loc { location, .. }
                    if !location.is_unwritten() && location.clone_id() == 0 =>
                {
                    let end = referenced.entry(location.sco_number()).or_default();
                    *end = (*end).max(location.offset() as u64 + 1);
                }
                _ => {}
            }
        }
        for (&number, &clusters) in referenced.iter().filter(|(n, _)| !sealed.contains_key(n)) {
            let sco = ScoName::new(number);
            let sco_file = sco_path(&self.dir, sco);
            let (file, len) = sco::open(&sco_file, &self.sco_header(st, sco))
                .map_err(|e| VolumeError::corrupt(name, sco_file.display().to_string(), e))?;
            let want = sco::cluster_offset(clusters, self.cluster_size);
            if len < want {
                return Err(VolumeError::corrupt(
                    name,
                    sco_file.display().to_string(),
                    format!("is {len} bytes but its synced TLog entries reference {want}"),
                ));
            }
            file.set_len(want)
                .map_err(VolumeError::io(name, &sco_file))?;
            let crc = sco::data_crc(&file, clusters, self.cluster_size)
                .map_err(VolumeError::io(name, &sco_file))?;
            file.sync_all().map_err(VolumeError::io(name, &sco_file))?;
            entries.push(Entry::ScoCrc {
                sco,
                clusters: clusters as u32,
                crc,
            });
        }
        for (&number, &clusters) in &sealed {
            let sco_file = sco_path(&self.dir, ScoName::new(number));
            let want = sco::cluster_offset(clusters, self.cluster_size);
            if let Ok(file) = fs::OpenOptions::new().write(true).open(&sco_file) {
                if file.metadata().map(|m| m.len() > want).unwrap_or(false) {
                    file.set_len(want)
                        .map_err(VolumeError::io(name, &sco_file))?;
                }
            }
        }
        let bytes = tlog::encode_closed(number, &entries);
        write_file_atomic(path, &bytes).map_err(VolumeError::io(name, path))?;
        tracing::warn!(
            volume = %name,
            tlog = %number.object_name(),
            entries = entries.len(),
            "recovered an unclosed TLog after a crash"
        );
        Ok(entries)
    }

    /// Replay `entries` into the map; returns how many written clusters they overwrote or
    /// trimmed (the garbage estimate).
    fn apply_entries(&self, st: &mut State, entries: &[Entry], what: &str) -> Result<u64> {
        let clusters = st.map.clusters();
        let mut garbage = 0;
        for entry in entries {
            match *entry {
                Entry::Loc { address, location } => {
                    if address >= clusters {
                        return Err(VolumeError::corrupt(
                            &self.name,
                            what,
                            format!("entry for cluster {address} beyond the volume's {clusters}"),
                        ));
                    }
                    if !st.map.set(address, location).is_unwritten() {
                        garbage += 1;
                    }
                    if location.clone_id() == 0 && !location.is_unwritten() {
                        st.applied_end = st.applied_end.max(Position::after(location));
                    }
                }
                Entry::Trim { start, count } => {
                    st.map.clear_range(start, count, |_, _| garbage += 1)
                }
                Entry::ScoCrc { sco, clusters, .. } if sco.clone_id == 0 => {
                    st.applied_end = st.applied_end.max(Position::new(sco.number.0, clusters));
                }
                _ => {}
            }
        }
        Ok(garbage)
    }

    fn sco_header(&self, st: &State, sco: ScoName) -> ScoHeader {
        ScoHeader {
            cluster_size: self.cluster_size as u32,
            sco,
            namespace: st.config.namespace.clone(),
        }
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

    fn check_usable(&self, st: &State) -> Result<()> {
        if let Some(reason) = &st.halted {
            return Err(VolumeError::Halted {
                volume: self.name.clone(),
                reason: reason.clone(),
            });
        }
        if st.stopped {
            return Err(VolumeError::Stopped {
                volume: self.name.clone(),
            });
        }
        Ok(())
    }

    fn check_range(&self, st: &State, offset: u64, len: u64, write: bool) -> Result<()> {
        self.check_usable(st)?;
        if !offset.is_multiple_of(LBA_SIZE) || !len.is_multiple_of(LBA_SIZE) {
            return Err(VolumeError::Misaligned {
                volume: self.name.clone(),
                offset,
                len,
            });
        }
        let size = st.config.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::OutOfRange {
                volume: self.name.clone(),
                offset,
                len,
                size,
            });
        }
        if write && st.config.read_only {
            return Err(VolumeError::ReadOnly {
                volume: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Stop serving I/O permanently, recording why. Called on errors after which continuing
    /// could lose or corrupt data (a failed fsync, a fenced backend write, local corruption).
    fn halt(&self, st: &mut State, reason: String) {
        if st.halted.is_none() {
            tracing::error!(volume = %self.name, %reason, "volume halted");
            st.halted = Some(reason);
        }
    }

    fn halt_with<T>(&self, err: VolumeError) -> Result<T> {
        let mut st = self.state.lock();
        self.halt(&mut st, err.to_string());
        Err(err)
    }

    // ---------------------------------------------------------------- reads

    fn plan_read(&self, st: &State, offset: u64, len: usize) -> Vec<Segment> {
        self.plan_read_in(st, &st.map, offset, len)
    }

    /// Plan a read of `map` (the live map or a snapshot's): own SCOs from the write buffer when
    /// a copy of that version is there, everything else from its namespace on the backend
    /// (clone id `k` > 0 is the `k`-th ancestor).
    fn plan_read_in(&self, st: &State, map: &ClusterMap, offset: u64, len: usize) -> Vec<Segment> {
        let cs = self.cluster_size;
        let mut plan: Vec<Segment> = Vec::new();
        let mut pos = offset;
        let end = offset + len as u64;
        while pos < end {
            let cluster = pos / cs;
            let within = pos % cs;
            let n = (cs - within).min(end - pos) as usize;
            let start = (pos - offset) as usize;
            let location = map.get(cluster);
            let source = if location.is_unwritten() {
                Source::Zero
            } else {
                let file_offset = sco::cluster_offset(location.offset() as u64, cs) + within;
                let local = (location.clone_id(), location.version()) == (0, 0);
                match st.scos.get(&location.sco_number()).filter(|_| local) {
                    Some(cached) => Source::Local {
                        file: cached.file.clone(),
                        offset: file_offset,
                    },
                    // Clone id k reads from the k-th namespace: 0 is the volume's own.
                    None => Source::Backend {
                        namespace: st
                            .namespaces
                            .get(location.clone_id() as usize)
                            .unwrap_or(&st.namespaces[0])
                            .clone(),
                        sco: ScoName {
                            clone_id: 0,
                            ..location.sco()
                        },
                        offset: file_offset,
                    },
                }
            };
            let merged = match (plan.last_mut(), &source) {
                (Some(last), Source::Zero) if matches!(last.source, Source::Zero) => {
                    last.len += n;
                    true
                }
                (Some(last), Source::Local { file, offset }) => match &last.source {
                    Source::Local { file: f, offset: o }
                        if Arc::ptr_eq(f, file) && o + last.len as u64 == *offset =>
                    {
                        last.len += n;
                        true
                    }
                    _ => false,
                },
                (
                    Some(last),
                    Source::Backend {
                        namespace,
                        sco,
                        offset,
                    },
                ) => match &last.source {
                    Source::Backend {
                        namespace: ns,
                        sco: s,
                        offset: o,
                    } if Arc::ptr_eq(ns, namespace)
                        && s == sco
                        && o + last.len as u64 == *offset =>
                    {
                        last.len += n;
                        true
                    }
                    _ => false,
                },
                _ => false,
            };
            if !merged {
                plan.push(Segment {
                    start,
                    len: n,
                    source,
                });
            }
            pos += n as u64;
        }
        plan
    }

    fn execute_read(&self, plan: Vec<Segment>, buf: &mut [u8]) -> Result<()> {
        for segment in plan {
            let out = &mut buf[segment.start..segment.start + segment.len];
            match segment.source {
                Source::Zero => out.fill(0),
                Source::Local { file, offset } => {
                    file.read_exact_at(out, offset)
                        .map_err(|e| VolumeError::Io {
                            volume: self.name.clone(),
                            path: self.dir.join(SCO_DIR),
                            source: e,
                        })?;
                }
                Source::Backend {
                    namespace,
                    sco,
                    offset,
                } => {
                    self.stats.backend_reads.fetch_add(1, Ordering::Relaxed);
                    self.backend
                        .get_range(&namespace, &sco.to_string(), offset, out)
                        .map_err(VolumeError::backend(&self.name))?;
                }
            }
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` (both multiples of 512).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let plan = {
            let st = self.state.lock();
            self.check_range(&st, offset, buf.len() as u64, false)?;
            self.plan_read(&st, offset, buf.len())
        };
        self.execute_read(plan, buf)?;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Read one whole cluster while holding the lock (read-modify-write).
    fn read_cluster_locked(&self, st: &State, cluster: u64, out: &mut [u8]) -> Result<()> {
        let plan = self.plan_read(st, cluster * self.cluster_size, out.len());
        self.execute_read(plan, out)
    }

    // ---------------------------------------------------------------- writes

    /// Write `data` at `offset` (both multiples of 512). With `fua` the write is durable before
    /// this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<WriteOutcome> {
        let (outcome, dtl) = self.write_deferred(offset, data)?;
        if let Some(ticket) = dtl {
            self.dtl_wait(ticket)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(outcome)
    }

    /// A write without FUA whose DTL wait is left to the caller: when a ticket is returned
    /// (sync mode, or an async backlog over its bound), the write must not be acknowledged to
    /// the client before the ticket completes. Lets a frontend keep serving other requests
    /// while the DTL round trip is in flight.
    pub fn write_deferred(
        &self,
        offset: u64,
        data: &[u8],
    ) -> Result<(WriteOutcome, Option<Ticket>)> {
        let (outcome, dtl) = {
            let mut st = self.state.lock();
            self.check_range(&st, offset, data.len() as u64, true)?;
            self.dtl_service(&mut st)?;
            let written = self.write_locked(&mut st, offset, data);
            let dtl = self.dtl_submit(&mut st);
            (written?, dtl)
        };
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok((outcome, dtl))
    }

    fn write_locked(&self, st: &mut State, offset: u64, data: &[u8]) -> Result<WriteOutcome> {
        if data.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let cs = self.cluster_size;
        let end = offset + data.len() as u64;
        let first = offset / cs;
        if offset.is_multiple_of(cs) && end.is_multiple_of(cs) {
            self.write_clusters(st, first, data)?;
        } else {
            let last = (end - 1) / cs;
            let mut whole = vec![0u8; ((last - first + 1) * cs) as usize];
            if !offset.is_multiple_of(cs) {
                self.read_cluster_locked(st, first, &mut whole[..cs as usize])?;
            }
            if !end.is_multiple_of(cs) && (last != first || offset.is_multiple_of(cs)) {
                let at = ((last - first) * cs) as usize;
                self.read_cluster_locked(st, last, &mut whole[at..at + cs as usize])?;
            }
            let at = (offset - first * cs) as usize;
            whole[at..at + data.len()].copy_from_slice(data);
            self.write_clusters(st, first, &whole)?;
        }
        Ok(self.throttle(st, data.len() as u64))
    }

    /// Backpressure for a write of `bytes` while not-yet-uploaded data exceeds the budget: the
    /// delay that makes ingest match the upload rate, growing with the overshoot so that a backlog
    /// that keeps growing (the rate estimate is stale, the backend is failing) is pushed back
    /// harder, up to `THROTTLE_MAX` per request.
    fn throttle(&self, st: &State, bytes: u64) -> WriteOutcome {
        let budget = st.config.write_buffer;
        if st.non_disposable_bytes <= budget {
            return WriteOutcome::default();
        }
        let rate = self
            .upload_rate
            .load(Ordering::Relaxed)
            .max(MIN_UPLOAD_RATE);
        let overshoot = (st.non_disposable_bytes - budget) as f64 / budget as f64;
        let seconds = bytes as f64 / rate as f64 * (1.0 + 8.0 * overshoot);
        let delay = Duration::from_secs_f64(seconds).clamp(THROTTLE_MIN, THROTTLE_MAX);
        self.stats.throttled_writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .throttle_micros
            .fetch_add(delay.as_micros() as u64, Ordering::Relaxed);
        WriteOutcome {
            throttle: Some(delay),
        }
    }

    /// Tell the throttle how fast uploads currently go (bytes per second), as measured by
    /// whoever drives [`upload_one`](Self::upload_one).
    pub fn report_upload_rate(&self, bytes_per_second: u64) {
        let old = self.upload_rate.load(Ordering::Relaxed);
        let smoothed = if old == 0 {
            bytes_per_second
        } else {
            (old + bytes_per_second) / 2
        };
        self.upload_rate.store(smoothed, Ordering::Relaxed);
    }

    /// Append whole clusters starting at cluster `first`.
    fn write_clusters(&self, st: &mut State, first: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size;
        let mut done = 0u64;
        let total = data.len() as u64 / cs;
        while done < total {
            if st.open_sco.is_none() {
                self.open_new_sco(st)?;
            }
            let (number, index, room) = match &st.open_sco {
                Some(open) => (
                    open.number,
                    open.clusters,
                    st.config.sco_clusters - open.clusters,
                ),
                None => unreachable!("open_new_sco succeeded"),
            };
            let n = room.min(total - done);
            let chunk = &data[(done * cs) as usize..((done + n) * cs) as usize];
            let local = st.scos.get_mut(&number).expect("open SCO is local");
            if let Err(e) = local
                .file
                .write_all_at(chunk, sco::cluster_offset(index, cs))
            {
                let path = sco_path(&self.dir, ScoName::new(number));
                let err = VolumeError::io(&self.name, path)(e);
                self.halt(st, err.to_string());
                return Err(err);
            }
            local.clusters += n;
            local.dirty = true;
            if let Some(open) = st.open_sco.as_mut() {
                open.crcs.append(chunk);
                open.clusters += n;
            }
            let sco = ScoName::new(number);
            if st.dtl.is_some() {
                self.dtl_record_writes(st, sco, index, first + done, chunk);
            }
            for i in 0..n {
                let location = ClusterLocation::new(sco, (index + i) as u16);
                self.append_entry(
                    st,
                    Entry::Loc {
                        address: first + done + i,
                        location,
                    },
                )?;
                if !st.map.set(first + done + i, location).is_unwritten() {
                    Self::note_garbage(st, 1);
                }
            }
            st.non_disposable_bytes += n * cs;
            if let Some(tlog) = st.tlog.as_mut() {
                tlog.data_bytes += n * cs;
            }
            done += n;
            if index + n == st.config.sco_clusters {
                self.seal_and_maybe_roll(st)?;
            }
        }
        Ok(())
    }

    fn open_new_sco(&self, st: &mut State) -> Result<()> {
        let number = ScoNumber(st.next_sco);
        let sco = ScoName::new(number);
        let path = sco_path(&self.dir, sco);
        let header = self.sco_header(st, sco);
        let file = sco::create(&path, &header).map_err(VolumeError::io(&self.name, &path))?;
        st.next_sco += 1;
        st.new_files = true;
        st.scos.insert(
            number,
            LocalSco {
                file: Arc::new(file),
                clusters: 0,
                state: ScoState::Open,
                dirty: true,
                chunk_crcs: None,
            },
        );
        st.open_sco = Some(OpenSco {
            number,
            crcs: ChunkCrcs::with_prefix(&header.encode()),
            clusters: 0,
        });
        Ok(())
    }

    fn append_entry(&self, st: &mut State, entry: Entry) -> Result<()> {
        if st.tlog.is_none() {
            let number = TLogNumber(st.next_tlog);
            let path = tlog_path(&self.dir, number);
            let writer =
                TLogWriter::create(&path, number).map_err(VolumeError::io(&self.name, &path))?;
            st.next_tlog += 1;
            st.new_files = true;
            st.tlog = Some(CurrentTLog {
                writer,
                scos: Vec::new(),
                data_bytes: 0,
                sealed_scos: 0,
                garbage: 0,
            });
        }
        let tlog = st.tlog.as_mut().expect("just created");
        if let Err(e) = tlog.writer.append(entry) {
            let err = VolumeError::io(&self.name, tlog.writer.path().to_path_buf())(e);
            self.halt(st, err.to_string());
            return Err(err);
        }
        Ok(())
    }

    fn seal_open_sco(&self, st: &mut State) -> Result<()> {
        let Some(open) = st.open_sco.take() else {
            return Ok(());
        };
        if open.clusters == 0 {
            // Never written: drop the empty file instead of sealing it.
            st.scos.remove(&open.number);
            let _ = fs::remove_file(sco_path(&self.dir, ScoName::new(open.number)));
            return Ok(());
        }
        let crc = open.crcs.data_crc();
        self.append_entry(
            st,
            Entry::ScoCrc {
                sco: ScoName::new(open.number),
                clusters: open.clusters as u32,
                crc,
            },
        )?;
        if let Some(local) = st.scos.get_mut(&open.number) {
            local.state = ScoState::Sealed { crc };
            local.chunk_crcs = Some(open.crcs.chunk_crcs().into());
        }
        st.uploads.push_back(UploadTask::Sco(open.number));
        let tlog = st.tlog.as_mut().expect("a sealed SCO has TLog entries");
        tlog.scos.push(open.number.0);
        tlog.sealed_scos += 1;
        self.upload_work.notify_all();
        Ok(())
    }

    /// Seal the full open SCO and close the TLog if it now covers `tlog_scos` SCOs, or early if
    /// not-yet-uploaded data passed half the write-buffer budget: data only becomes disposable
    /// once its TLog is on the backend, so a TLog larger than the budget would throttle the
    /// volume forever. Closing is deferred while a flush is between its two phases.
    fn seal_and_maybe_roll(&self, st: &mut State) -> Result<()> {
        self.seal_open_sco(st)?;
        let over_budget = st.non_disposable_bytes > st.config.write_buffer / 2;
        if st
            .tlog
            .as_ref()
            .is_some_and(|t| t.sealed_scos >= st.config.tlog_scos || over_budget)
        {
            if st.flush_in_progress {
                st.roll_pending = true;
            } else {
                self.close_tlog(st)?;
            }
        }
        Ok(())
    }

    /// Close the current TLog (sealing the open SCO first) and queue it for upload.
    fn close_tlog(&self, st: &mut State) -> Result<()> {
        st.roll_pending = false;
        self.seal_open_sco(st)?;
        let Some(current) = st.tlog.take() else {
            return Ok(());
        };
        let (number, path, file) = match current.writer.close() {
            Ok(closed) => closed,
            Err(e) => {
                let err = VolumeError::io(
                    &self.name,
                    tlog_path(&self.dir, TLogNumber(st.next_tlog - 1)),
                )(e);
                self.halt(st, err.to_string());
                return Err(err);
            }
        };
        st.closed_tlogs.push_back(ClosedTLog {
            number,
            path,
            file,
            record: TLogRecord {
                scos: current.scos,
                data_bytes: current.data_bytes,
                ..TLogRecord::new(number.0)
            },
            dirty: true,
            garbage: current.garbage,
        });
        st.uploads.push_back(UploadTask::TLog(number));
        st.last_sync = None;
        self.upload_work.notify_all();
        Ok(())
    }

    /// Make `[offset, offset+len)` read as zeros without writing data: whole clusters are
    /// unmapped (a TRIM entry in the TLog), partial clusters at the edges are read-modify-written.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut st = self.state.lock();
        self.check_range(&st, offset, len, true)?;
        self.dtl_service(&mut st)?;
        let zeroed = self.zero_locked(&mut st, offset, len);
        let dtl = self.dtl_submit(&mut st);
        drop(st);
        zeroed?;
        if let Some(ticket) = dtl {
            self.dtl_wait(ticket)?;
        }
        self.stats.discards.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn zero_locked(&self, st: &mut State, offset: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size;
        let end = offset + len;
        let full_start = offset.div_ceil(cs);
        let full_end = end / cs;
        let partial = |st: &mut State, from: u64, to: u64| -> Result<()> {
            if from >= to {
                return Ok(());
            }
            let cluster = from / cs;
            if st.map.get(cluster).is_unwritten() {
                return Ok(());
            }
            let mut buf = vec![0u8; cs as usize];
            self.read_cluster_locked(st, cluster, &mut buf)?;
            buf[(from - cluster * cs) as usize..(to - cluster * cs) as usize].fill(0);
            self.write_clusters(st, cluster, &buf)
        };
        if full_start >= full_end {
            // No whole cluster inside: one or two partial clusters.
            let split = (offset / cs + 1) * cs;
            partial(st, offset, end.min(split))?;
            if end > split {
                partial(st, split, end)?;
            }
            return Ok(());
        }
        partial(st, offset, full_start * cs)?;
        partial(st, full_end * cs, end)?;
        let mut cleared = 0;
        st.map
            .clear_range(full_start, full_end - full_start, |_, _| cleared += 1);
        let garbage = cleared;
        let cleared = cleared > 0;
        if cleared {
            self.append_entry(
                st,
                Entry::Trim {
                    start: full_start,
                    count: full_end - full_start,
                },
            )?;
            Self::note_garbage(st, garbage);
            if st.dtl.is_some() {
                self.dtl_record_trim(st, full_start, full_end - full_start);
            }
        }
        Ok(())
    }

    /// WRITE_ZEROES: like `discard`, or with `allocate` by writing zeros as data.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        fua: bool,
    ) -> Result<WriteOutcome> {
        let outcome = if allocate {
            let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
            let mut outcome = WriteOutcome::default();
            let mut pos = offset;
            {
                let st = self.state.lock();
                self.check_range(&st, offset, len, true)?;
            }
            let mut dtl = None;
            while pos < offset + len {
                let n = (offset + len - pos).min(ZERO_CHUNK);
                let mut st = self.state.lock();
                self.check_usable(&st)?;
                self.dtl_service(&mut st)?;
                let step = self.write_locked(&mut st, pos, &zeros[..n as usize]);
                dtl = self.dtl_submit(&mut st).or(dtl);
                outcome.throttle = outcome.throttle.max(step?.throttle);
                pos += n;
            }
            if let Some(ticket) = dtl {
                self.dtl_wait(ticket)?;
            }
            outcome
        } else {
            self.discard(offset, len)?;
            WriteOutcome::default()
        };
        if fua {
            self.flush()?;
        }
        Ok(outcome)
    }

    // ---------------------------------------------------------------- flush

    /// Make every write completed before this call durable: in the write buffer, and on the DTL
    /// when the volume has one.
    pub fn flush(&self) -> Result<()> {
        let dtl = self.dtl_flush_ticket();
        self.flush_local()?;
        if let Some(ticket) = dtl {
            self.dtl_wait(ticket)?;
        }
        Ok(())
    }

    fn flush_local(&self) -> Result<()> {
        let _serial = self.flush_lock.lock();
        let (files, point) = {
            let mut st = self.state.lock();
            self.check_usable(&st)?;
            let mut files: Vec<(Arc<File>, PathBuf)> = Vec::new();
            for (number, local) in st.scos.iter_mut().filter(|(_, s)| s.dirty) {
                local.dirty = false;
                files.push((
                    local.file.clone(),
                    sco_path(&self.dir, ScoName::new(*number)),
                ));
            }
            for closed in st.closed_tlogs.iter_mut().filter(|t| t.dirty) {
                closed.dirty = false;
                files.push((closed.file.clone(), closed.path.clone()));
            }
            if std::mem::take(&mut st.meta_unsynced) {
                if let Some(log) = st.meta_log.clone() {
                    files.push((log, self.dir.join("snapshots.log")));
                }
            }
            if std::mem::take(&mut st.new_files) {
                for dir in [
                    self.dir.join(SCO_DIR),
                    self.dir.join(TLOG_DIR),
                    self.dir.clone(),
                ] {
                    match File::open(&dir) {
                        Ok(handle) => files.push((Arc::new(handle), dir)),
                        Err(e) => {
                            let err = VolumeError::io(&self.name, dir)(e);
                            self.halt(&mut st, err.to_string());
                            return Err(err);
                        }
                    }
                }
            }
            let last_sync = st.last_sync;
            let mut point = None;
            let mut failure = None;
            if let Some(tlog) = st
                .tlog
                .as_mut()
                .filter(|t| t.writer.has_entries_after(last_sync))
            {
                match tlog.writer.write_out() {
                    Ok(()) => point = Some(tlog.writer.sync_point()),
                    Err(e) => {
                        failure = Some(VolumeError::io(
                            &self.name,
                            tlog.writer.path().to_path_buf(),
                        )(e))
                    }
                }
            }
            if let Some(err) = failure {
                self.halt(&mut st, err.to_string());
                return Err(err);
            }
            if files.is_empty() && point.is_none() {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            st.flush_in_progress = true;
            (files, point)
        };
        let synced = files.iter().try_for_each(|(file, path)| {
            file.sync_data().map_err(VolumeError::io(&self.name, path))
        });
        let mut st = self.state.lock();
        st.flush_in_progress = false;
        if let Err(err) = synced {
            // After a failed fsync the page cache may have dropped the data: never pretend.
            self.halt(&mut st, err.to_string());
            return Err(err);
        }
        let mut tlog_file = None;
        let mut failure = None;
        if let (Some(point), Some(tlog)) = (point, st.tlog.as_mut()) {
            if tlog.writer.number() == point.number {
                let path = tlog.writer.path().to_path_buf();
                match tlog.writer.append_sync(point) {
                    Ok(()) => tlog_file = Some((tlog.writer.file().clone(), path, point)),
                    Err(e) => failure = Some(VolumeError::io(&self.name, path)(e)),
                }
            }
        }
        if let Some(err) = failure {
            self.halt(&mut st, err.to_string());
            return Err(err);
        }
        if let Some((_, _, point)) = &tlog_file {
            st.last_sync = Some(*point);
        }
        if st.roll_pending {
            self.close_tlog(&mut st)?;
        }
        drop(st);
        if let Some((file, path, _)) = tlog_file {
            if let Err(e) = file.sync_data() {
                return self.halt_with(VolumeError::io(&self.name, path)(e));
            }
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Seal the open SCO and close the current TLog so that everything written so far is queued
    /// for upload (clean shutdown; later, snapshots).
    pub fn close_current_tlog(&self) -> Result<()> {
        let _serial = self.flush_lock.lock();
        let mut st = self.state.lock();
        self.check_usable(&st)?;
        if self.has_unclosed_data(&st) {
            self.close_tlog(&mut st)?;
        }
        Ok(())
    }

    /// Whether the current TLog or open SCO holds anything not yet queued for upload.
    fn has_unclosed_data(&self, st: &State) -> bool {
        st.tlog
            .as_ref()
            .is_some_and(|t| t.writer.data_entries() > 0 || !t.scos.is_empty())
            || st.open_sco.as_ref().is_some_and(|o| o.clusters > 0)
    }

    // ---------------------------------------------------------------- uploads

    /// Perform the next upload step, if any. Returns whether there was one. On a transient
    /// backend error the step stays queued and the error is returned; the caller retries.
    pub fn upload_one(&self) -> Result<bool> {
        enum Job {
            Sco {
                number: ScoNumber,
                file: Arc<File>,
                clusters: u64,
                crc: u32,
                chunk_crcs: Option<Arc<[u32]>>,
            },
            TLog {
                number: TLogNumber,
                file: Arc<File>,
                path: PathBuf,
                record: TLogRecord,
            },
        }
        let _step = self.upload_lock.lock();
        let (job, namespace, owner, epoch) = {
            let st = self.state.lock();
            if let Some(reason) = &st.halted {
                return Err(VolumeError::Halted {
                    volume: self.name.clone(),
                    reason: reason.clone(),
                });
            }
            let job = match st.uploads.front() {
                None if st.list_dirty => {
                    drop(st);
                    self.put_backend_list()?;
                    return Ok(true);
                }
                None => return Ok(false),
                Some(UploadTask::Sco(number)) => match st.scos.get(number) {
                    Some(local) => match local.state {
                        ScoState::Sealed { crc } => Ok(Job::Sco {
                            number: *number,
                            file: local.file.clone(),
                            clusters: local.clusters,
                            crc,
                            chunk_crcs: local.chunk_crcs.clone(),
                        }),
                        _ => Err(VolumeError::corrupt(
                            &self.name,
                            ScoName::new(*number).to_string(),
                            "queued for upload but not sealed",
                        )),
                    },
                    None => Err(VolumeError::corrupt(
                        &self.name,
                        ScoName::new(*number).to_string(),
                        "queued for upload but missing from the write buffer",
                    )),
                },
                Some(UploadTask::TLog(number)) => {
                    match st.closed_tlogs.iter().find(|t| t.number == *number) {
                        Some(closed) => Ok(Job::TLog {
                            number: *number,
                            file: closed.file.clone(),
                            path: closed.path.clone(),
                            record: closed.record.clone(),
                        }),
                        None => Err(VolumeError::corrupt(
                            &self.name,
                            number.object_name(),
                            "queued for upload but not a closed local TLog",
                        )),
                    }
                }
            };
            (
                job,
                st.config.namespace.clone(),
                st.config.owner_tag,
                st.epoch,
            )
        };
        let job = match job {
            Ok(job) => job,
            Err(err) => return self.halt_with(err),
        };
        let upload =
            |object: &str,
             store_op: &mut dyn FnMut(&dyn ObjectStore, &str) -> vstor_backend::Result<()>|
             -> Result<()> {
                match store_op(self.backend.as_ref(), object) {
                    Ok(()) => Ok(()),
                    Err(e @ BackendError::Fenced { .. }) => {
                        self.halt_with(VolumeError::backend(&self.name)(e))
                    }
                    Err(e) => {
                        self.stats.upload_errors.fetch_add(1, Ordering::Relaxed);
                        let err = VolumeError::backend(&self.name)(e);
                        self.state.lock().last_upload_error = Some(err.to_string());
                        Err(err)
                    }
                }
            };
        let put = |object: &str, bytes: &[u8]| -> Result<()> {
            upload(object, &mut |store: &dyn ObjectStore, object: &str| {
                store.put_if_owner(&namespace, object, bytes, owner)
            })
        };
        let done = match job {
            Job::Sco {
                number,
                file,
                clusters,
                crc,
                chunk_crcs,
            } => {
                let name = ScoName::new(number);
                let path = sco_path(&self.dir, name);
                let len = sco::cluster_offset(clusters, self.cluster_size);
                // --- put_file: begin. A SCO sealed by this process comes with the chunk CRCs
                // its appends computed (its TLog CRC derives from them): hand the file itself
                // to the backend, which checks it against them and may hard-link it instead of
                // copying. A mismatch (the file was damaged in the write buffer) stores nothing
                // and halts the volume. The file is never written again once sealed
                // (`sco::create` replaces a path rather than truncating it; eviction unlinks).
                // SCOs found at restart have no chunk CRCs and stream as before.
                if let Some(chunk_crcs) = chunk_crcs {
                    let mut damaged = false;
                    upload(
                        &name.to_string(),
                        &mut |store: &dyn ObjectStore, object: &str| match store.put_file(
                            &namespace,
                            object,
                            &path,
                            len,
                            Some(&chunk_crcs[..]),
                            owner,
                        ) {
                            Err(BackendError::Corrupt { .. }) => {
                                damaged = true;
                                Ok(())
                            }
                            other => other,
                        },
                    )?;
                    if damaged {
                        return self.halt_with(VolumeError::corrupt(
                            &self.name,
                            path.display().to_string(),
                            "data does not match the CRC recorded when it was sealed",
                        ));
                    }
                } else {
                    // No fsync of the write-buffer copy first: the backend copy is made durable by
                    // the put, and restart verifies every not-yet-uploaded SCO against its CRC. The
                    // CRC is checked while streaming, in the same pass as the upload; a mismatch
                    // deletes the object again (no TLog references it yet) and halts the volume.
                    let mut reader = ScoReader {
                        file: &file,
                        offset: 0,
                        crc: 0,
                    };
                    upload(
                        &name.to_string(),
                        &mut |store: &dyn ObjectStore, object: &str| {
                            store.put_from(&namespace, object, len, &mut reader, owner)
                        },
                    )?;
                    if reader.crc != crc {
                        let _ = self
                            .backend
                            .delete_if_owner(&namespace, &name.to_string(), owner);
                        return self.halt_with(VolumeError::corrupt(
                            &self.name,
                            path.display().to_string(),
                            "data does not match the CRC recorded when it was sealed",
                        ));
                    }
                }
                // --- put_file: end.
                self.stats.uploaded_bytes.fetch_add(len, Ordering::Relaxed);
                self.stats.uploaded_scos.fetch_add(1, Ordering::Relaxed);
                UploadTask::Sco(number)
            }
            Job::TLog {
                number,
                file,
                path,
                record,
            } => {
                let mut bytes = Vec::new();
                let read = file.sync_data().and_then(|()| {
                    let len = file.metadata()?.len();
                    bytes.resize(len as usize, 0);
                    file.read_exact_at(&mut bytes, 0)
                });
                if let Err(e) = read {
                    return self.halt_with(VolumeError::io(&self.name, path)(e));
                }
                if let Err(reason) = tlog::parse(&bytes, true) {
                    return self.halt_with(VolumeError::corrupt(
                        &self.name,
                        path.display().to_string(),
                        reason,
                    ));
                }
                put(&record.object_name(), &bytes)?;
                let _list = self.list_lock.lock();
                let (list, changes) = {
                    let st = self.state.lock();
                    if st.epoch != epoch {
                        // A rollback or scrub rewrote the list meanwhile; the queue was rebuilt.
                        return Ok(true);
                    }
                    let mut list = Self::backend_list(&st);
                    list.tlogs.push(record.clone());
                    (list, st.list_changes)
                };
                put(TLOG_LIST_OBJECT, &list.encode())?;
                let mut st = self.state.lock();
                st.backend_tlogs.tlogs.push(record);
                if st.list_changes == changes {
                    st.list_dirty = false;
                }
                drop(st);
                self.stats.uploaded_tlogs.fetch_add(1, Ordering::Relaxed);
                UploadTask::TLog(number)
            }
        };
        let mut st = self.state.lock();
        st.last_upload_error = None;
        if let UploadTask::Sco(number) = done {
            // put_file: the chunk CRCs are only needed until the SCO is on the backend.
            if let Some(local) = st.scos.get_mut(&number) {
                local.chunk_crcs = None;
            }
        }
        if st.uploads.front() == Some(&done) {
            st.uploads.pop_front();
        }
        if let UploadTask::TLog(number) = done {
            self.uncork(&mut st, number);
        }
        if st.uploads.is_empty() {
            self.upload_work.notify_all();
        }
        Ok(true)
    }

    /// The TLog is on the backend: its SCOs become disposable and its local file goes.
    fn uncork(&self, st: &mut State, number: TLogNumber) {
        let Some(position) = st.closed_tlogs.iter().position(|t| t.number == number) else {
            return;
        };
        let Some(closed) = st.closed_tlogs.remove(position) else {
            return;
        };
        for sco in &closed.record.scos {
            if let Some(local) = st.scos.get_mut(&ScoNumber(*sco)) {
                local.state = ScoState::Disposable;
                local.dirty = false;
                let bytes = local.clusters * self.cluster_size;
                st.non_disposable_bytes = st.non_disposable_bytes.saturating_sub(bytes);
                st.disposable_bytes += bytes + SCO_HEADER_LEN;
            }
        }
        self.dtl_uncorked(st, &closed.record);
        if let Err(e) = fs::remove_file(&closed.path) {
            tracing::warn!(volume = %self.name, path = %closed.path.display(), error = %e, "could not remove uploaded TLog");
        }
    }

    /// Bytes of SCO data uploaded since the volume was opened.
    pub fn uploaded_bytes(&self) -> u64 {
        self.stats.uploaded_bytes.load(Ordering::Relaxed)
    }

    /// Run upload steps until the queue is empty (tests, clean shutdown).
    pub fn drain_uploads(&self) -> Result<()> {
        while self.upload_one()? {}
        Ok(())
    }

    /// Number of queued upload steps.
    pub fn pending_uploads(&self) -> usize {
        self.state.lock().uploads.len()
    }

    /// Block until there is upload work, the volume stops, or `timeout` passes.
    pub fn wait_for_upload_work(&self, timeout: Duration) {
        let mut st = self.state.lock();
        if st.uploads.is_empty() && !st.list_dirty && !st.stopped {
            self.upload_work.wait_for(&mut st, timeout);
        }
    }

    /// Block for `timeout` or until the volume stops (upload retry back-off).
    pub fn pause(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.state.lock();
        while !st.stopped && !self.upload_work.wait_until(&mut st, deadline).timed_out() {}
    }

    /// Block until the upload queue is empty, the volume halts, or `deadline` passes. Returns
    /// whether everything was uploaded.
    pub fn wait_for_uploads(&self, deadline: std::time::Instant) -> bool {
        let mut st = self.state.lock();
        while (!st.uploads.is_empty() || st.list_dirty) && st.halted.is_none() {
            if self.upload_work.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        st.uploads.is_empty() && !st.list_dirty
    }

    // ---------------------------------------------------------------- write buffer

    /// Bytes of SCO data held in the write buffer, and how much of it is disposable.
    pub fn local_bytes(&self) -> (u64, u64) {
        let st = self.state.lock();
        let total = st
            .scos
            .values()
            .map(|s| SCO_HEADER_LEN + s.clusters * self.cluster_size)
            .sum();
        (total, st.disposable_bytes)
    }

    /// Evict disposable SCOs, oldest first, until at least `want` bytes are freed or none are
    /// left. Later reads of their clusters go to the backend. Returns the bytes freed.
    pub fn evict(&self, want: u64) -> u64 {
        let mut st = self.state.lock();
        let victims: Vec<ScoNumber> = st
            .scos
            .iter()
            .filter(|(_, s)| s.state == ScoState::Disposable)
            .scan(0u64, |freed, (number, s)| {
                if *freed >= want {
                    return None;
                }
                *freed += SCO_HEADER_LEN + s.clusters * self.cluster_size;
                Some(*number)
            })
            .collect();
        let mut freed = 0;
        for number in victims {
            if let Some(local) = st.scos.remove(&number) {
                let bytes = SCO_HEADER_LEN + local.clusters * self.cluster_size;
                freed += bytes;
                st.disposable_bytes = st.disposable_bytes.saturating_sub(bytes);
                let path = sco_path(&self.dir, ScoName::new(number));
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(volume = %self.name, path = %path.display(), error = %e, "evict failed");
                }
                self.stats.evicted_scos.fetch_add(1, Ordering::Relaxed);
            }
        }
        freed
    }

    // ---------------------------------------------------------------- management

    /// Allocation map of `[offset, offset+len)`: runs of (length in bytes, is a hole).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let st = self.state.lock();
        self.check_range(&st, offset, len, false)?;
        Ok(allocation_runs(&st.map, self.cluster_size, offset, len))
    }

    /// Grow the volume to `new_size` bytes.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let mut st = self.state.lock();
        self.check_usable(&st)?;
        crate::config::validate_size(&self.name, new_size)?;
        if new_size < st.config.size {
            return Err(VolumeError::InvalidConfig {
                volume: self.name.clone(),
                reason: format!(
                    "cannot shrink from {} to {new_size} bytes (only growing is supported)",
                    st.config.size
                ),
            });
        }
        let mut config = st.config.clone();
        config.size = new_size;
        self.store_config(&config)?;
        st.map.grow(new_size / self.cluster_size);
        st.config = config;
        Ok(())
    }

    /// Make the volume read-only (writes fail with `ReadOnly`) or writable again. Writes that
    /// already completed are unaffected; flush first if they must be durable.
    pub fn set_read_only(&self, read_only: bool) -> Result<()> {
        let mut st = self.state.lock();
        self.check_usable(&st)?;
        if st.config.template && !read_only {
            return Err(VolumeError::Refused {
                volume: self.name.clone(),
                reason: "a template stays read-only; clone it instead".into(),
            });
        }
        let mut config = st.config.clone();
        config.read_only = read_only;
        self.store_config(&config)?;
        st.config = config;
        Ok(())
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
        let mut st = self.state.lock();
        let mut config = st.config.clone();
        config.read_only = true;
        config.template = true;
        self.store_config(&config)?;
        st.config = config;
        Ok(snapshot)
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
        write_file_atomic(&path, &config.encode()).map_err(VolumeError::io(&self.name, &path))
    }

    /// Refuse further I/O and wake the uploader so it can exit.
    pub fn stop(&self) {
        let mut st = self.state.lock();
        st.stopped = true;
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
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VolumeError::io(&self.name, &self.dir)(e)),
        }
    }

    pub fn info(&self) -> VolumeInfo {
        let st = self.state.lock();
        let dtl = Self::dtl_status(&st);
        let c = &st.config;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VolumeInfo {
            name: c.name.clone(),
            namespace: c.namespace.clone(),
            size: c.size,
            cluster_size: c.cluster_size,
            sco_size: c.sco_size(),
            tlog_scos: c.tlog_scos,
            write_buffer: c.write_buffer,
            read_only: c.read_only,
            owner_tag: c.owner_tag,
            created: c.created,
            state: if st.halted.is_some() {
                "halted"
            } else if st.stopped {
                "stopped"
            } else {
                "running"
            }
            .to_string(),
            halted_reason: st.halted.clone(),
            written_bytes: st.map.written_clusters() * c.cluster_size,
            map_memory_bytes: st.map.memory_bytes(),
            local_sco_bytes: st
                .scos
                .values()
                .map(|s| SCO_HEADER_LEN + s.clusters * c.cluster_size)
                .sum(),
            not_uploaded_bytes: st.non_disposable_bytes,
            disposable_bytes: st.disposable_bytes,
            upload_queue: st.uploads.len(),
            tlogs_on_backend: st.backend_tlogs.tlogs.len(),
            throttling: st.non_disposable_bytes > c.write_buffer,
            throttled_writes: load(&self.stats.throttled_writes),
            throttle_ms: load(&self.stats.throttle_micros) / 1000,
            reads: load(&self.stats.reads),
            writes: load(&self.stats.writes),
            read_bytes: load(&self.stats.read_bytes),
            write_bytes: load(&self.stats.write_bytes),
            flushes: load(&self.stats.flushes),
            discards: load(&self.stats.discards),
            backend_reads: load(&self.stats.backend_reads),
            evicted_scos: load(&self.stats.evicted_scos),
            uploaded_scos: load(&self.stats.uploaded_scos),
            uploaded_bytes: load(&self.stats.uploaded_bytes),
            upload_rate: self.upload_rate.load(Ordering::Relaxed),
            uploaded_tlogs: load(&self.stats.uploaded_tlogs),
            upload_errors: load(&self.stats.upload_errors),
            last_upload_error: st.last_upload_error.clone(),
            dtl_mode: c.dtl_mode.as_str().to_string(),
            dtl_addr: c.dtl_addr.clone(),
            dtl_state: dtl.state.as_str().to_string(),
            dtl_in_sync: dtl.state == vstor_dtl::DtlState::OkSync,
            dtl_backlog_bytes: dtl.backlog_bytes,
            dtl_degradations: dtl.degradations,
            dtl_last_error: dtl.last_error,
            backend_bytes: st.backend_tlogs.tlogs.iter().map(|r| r.data_bytes).sum(),
            parent: c.parent.as_ref().map(|p| p.to_string()),
            children: st
                .meta
                .snapshots
                .iter()
                .flat_map(|s| s.clones.iter().cloned())
                .collect(),
            template: c.template,
            snapshots: st.meta.snapshots.len(),
            garbage_bytes: st.garbage_clusters * c.cluster_size,
        }
    }
}

fn snapshots_last_tlog(st: &State) -> u64 {
    st.closed_tlogs
        .back()
        .map_or(0, |t| t.number.0)
        .max(st.backend_tlogs.last_number())
}

impl Volume {
    /// Count clusters made garbage by the operation being applied to the current TLog.
    fn note_garbage(st: &mut State, clusters: u64) {
        st.garbage_clusters += clusters;
        if let Some(tlog) = st.tlog.as_mut() {
            tlog.garbage += clusters;
        }
    }

    /// Garbage counted in TLogs not on the backend yet (a scrub cannot reclaim it).
    fn garbage_not_uploaded(st: &State) -> u64 {
        st.closed_tlogs.iter().map(|t| t.garbage).sum::<u64>()
            + st.tlog.as_ref().map_or(0, |t| t.garbage)
    }
}

/// Allocation runs of `[offset, offset+len)` in `map`: (length in bytes, is a hole), at most
/// 1024 runs.
fn allocation_runs(map: &ClusterMap, cs: u64, offset: u64, len: u64) -> Vec<(u64, bool)> {
    let end = offset + len;
    let mut runs = Vec::new();
    let mut pos = offset;
    while pos < end && runs.len() < 1024 {
        let cluster = pos / cs;
        let limit = (end - cluster * cs).div_ceil(cs);
        let (written, count) = map.run_at(cluster, limit);
        let run_end = ((cluster + count.max(1)) * cs).min(end);
        runs.push((run_end - pos, !written));
        pos = run_end;
    }
    runs
}

impl State {
    fn new(config: VolumeConfig, backend_tlogs: TLogList) -> Self {
        State {
            namespaces: std::iter::once(&config.namespace)
                .chain(&config.ancestors)
                .map(|ns| Arc::from(ns.as_str()))
                .collect(),
            map: ClusterMap::new(config.size / config.cluster_size),
            config,
            scos: BTreeMap::new(),
            open_sco: None,
            tlog: None,
            closed_tlogs: VecDeque::new(),
            uploads: VecDeque::new(),
            backend_tlogs,
            next_sco: 1,
            next_tlog: 1,
            flush_in_progress: false,
            roll_pending: false,
            last_sync: None,
            non_disposable_bytes: 0,
            disposable_bytes: 0,
            halted: None,
            stopped: false,
            last_upload_error: None,
            new_files: false,
            dtl: None,
            applied_end: Position::default(),
            meta: LocalMeta::default(),
            epoch: 0,
            list_dirty: false,
            list_changes: 0,
            meta_unsynced: false,
            meta_log: None,
            garbage_clusters: 0,
        }
    }
}

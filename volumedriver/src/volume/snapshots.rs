//! Snapshots, rollback, and reading a snapshot (views, clone bases).
//!
//! # A snapshot is a TLog boundary
//! Creating one seals the open SCO, closes the current TLog and records `(name, last TLog
//! number)`: the volume's state at the snapshot is the replay of every TLog up to that number.
//! Nothing is copied, so creation costs one TLog close and one small metadata file replace,
//! whatever the volume's size (the file reaches the disk with the next FLUSH, like the TLog).
//!
//! # Where snapshot metadata lives
//! The write buffer's `snapshots` file (format: `meta` envelope, kind `SNPS`) plus its
//! append-only companion `snapshots.log` are authoritative on this node: every change is written
//! there first. Creating a snapshot appends one record to the log (`u32` length, `u32` CRC32C,
//! JSON; a torn or corrupt tail ends the log) — one `write(2)` to an open file, no file creation
//! or rename, so it stays cheap while the volume is busy. Every other change (delete, rollback,
//! clone registration) rewrites `snapshots` atomically and durably and then empties the log.
//! Log records carry sequence numbers and the base file the next one, so a crash in between
//! leaves records that loading skips, even ones the base has deleted since (a rollback that
//! dropped a snapshot must not bring it back). The backend TLog list carries the same
//! records, so a restart from the backend alone knows them (snapshots whose TLogs never reached
//! the backend are dropped then: their history is gone). Each change marks the backend list
//! dirty and the uploader puts it.
//!
//! # Rollback
//! Rollback to snapshot `S` drops every later TLog and SCO. It is written down before anything is
//! removed: the TLog numbers after `S` become a *dropped range* that restart never replays,
//! wherever such a TLog is still found (write buffer or backend), and the *DTL floor* moves
//! past every SCO number handed out so far, so DTL entries of the dropped history are never
//! replayed either. SCO and TLog numbers are never reused. Then the backend list is rewritten
//! without the dropped TLogs, the in-memory state is rebuilt by the restart code itself, and the
//! dropped objects are deleted (anything a crash leaves behind is swept by the next scrub).
//!
//! # Reading a snapshot
//! A [`SnapshotView`] replays the snapshot's TLogs into its own map and reads through the volume's
//! read path (write-buffer copies of SCOs where present, ranged backend reads otherwise). Its map
//! is rebuilt whenever a scrub or rollback changed the TLogs under it.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::read::Segment;
use super::read_nonblocking::{self, ReadAttempt};
use super::{State, Volume, TLOG_LIST_OBJECT};
use crate::config::{validate_volume_name, SnapshotRecord, TLogList};
use crate::error::{Result, VolumeError};
use crate::map::ClusterMap;
use crate::meta;
use crate::tlog::{self, Entry};
use crate::types::{TLogNumber, LBA_SIZE};
use crate::wbfs::WbFs;

const META_FILE: &str = "snapshots";
const META_LOG: &str = "snapshots.log";
const META_KIND: &[u8; 4] = b"SNPS";
const META_VERSION: u32 = 1;

/// The node-local copy of a volume's snapshot metadata (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LocalMeta {
    pub snapshots: Vec<SnapshotRecord>,
    pub dropped: Vec<(u64, u64)>,
    pub dtl_floor: (u32, u32),
    /// Sequence number the next snapshot-log record gets; every record below it is folded into
    /// this (base) document, deletions and rollbacks included.
    #[serde(default)]
    pub next_log_seq: u64,
}

/// One record of the snapshot log.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LogRecord {
    seq: u64,
    snapshot: SnapshotRecord,
}

impl LocalMeta {
    pub fn load(fs: &dyn WbFs, volume: &str, dir: &Path, backend: &TLogList) -> Result<Self> {
        let path = dir.join(META_FILE);
        let log = match fs.read(&dir.join(META_LOG)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(VolumeError::io(volume, dir.join(META_LOG))(e)),
        };
        let base = match fs.read(&path) {
            Ok(bytes) => meta::decode(META_KIND, META_VERSION, &bytes).map_err(|e| {
                VolumeError::corrupt(volume, path.display().to_string(), e.to_string())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let last = backend.last_number();
                Ok(Self {
                    snapshots: backend
                        .snapshots
                        .iter()
                        .filter(|s| s.tlog <= last)
                        .cloned()
                        .collect(),
                    dropped: backend.dropped.clone(),
                    dtl_floor: backend.dtl_floor,
                    next_log_seq: 0,
                })
            }
            Err(e) => Err(VolumeError::io(volume, &path)(e)),
        };
        let mut meta = base?;
        if !log.is_empty() {
            // A crash (kill -9) may have left records that never reached the disk: whatever
            // this restart shows must survive a power cut that follows it.
            let log_path = dir.join(META_LOG);
            fs.open(&log_path)
                .and_then(|file| file.sync_data())
                .and_then(|()| fs.sync_dir(dir))
                .map_err(VolumeError::io(volume, &log_path))?;
        }
        // Records the base already folded in (a crash between rewriting the base and emptying
        // the log) are skipped by sequence number: the base may have deleted them since.
        let (records, valid) = log_records(&log);
        if valid < log.len() {
            // Cut a torn tail off, or the next record would land behind it, unreadable.
            let log_path = dir.join(META_LOG);
            fs.open(&log_path)
                .and_then(|file| {
                    file.set_len(valid as u64)?;
                    file.sync_data()
                })
                .map_err(VolumeError::io(volume, &log_path))?;
        }
        for record in records {
            if record.seq < meta.next_log_seq {
                continue;
            }
            meta.next_log_seq = record.seq + 1;
            if !meta
                .snapshots
                .iter()
                .any(|s| s.name == record.snapshot.name)
            {
                meta.snapshots.push(record.snapshot);
            }
        }
        Ok(meta)
    }

    pub fn is_dropped(&self, number: u64) -> bool {
        self.dropped
            .iter()
            .any(|(from, to)| (*from..=*to).contains(&number))
    }
}

/// What `vstor snapshot list` shows about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub created: u64,
    /// Bytes written between the previous snapshot and this one.
    pub written_bytes: u64,
    /// Every TLog of the snapshot is on the backend (it can be cloned and exported).
    pub in_backend: bool,
    pub clones: Vec<String>,
    pub size: u64,
    pub tlog: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn validate_snapshot_name(volume: &str, name: &str) -> Result<()> {
    validate_volume_name(name).map_err(|e| VolumeError::InvalidConfig {
        volume: volume.to_string(),
        reason: match e {
            VolumeError::InvalidName { reason, .. } => {
                format!("invalid snapshot name {name:?}: {reason}")
            }
            other => format!("invalid snapshot name {name:?}: {other}"),
        },
    })
}

/// Where to read one TLog of a snapshot from.
enum TLogSource {
    Backend(String),
    Local(std::path::PathBuf, String),
}

impl Volume {
    /// Persist the snapshot metadata durably: rewrite the base file, then empty the log.
    pub(super) fn store_meta(&self, st: &mut State) -> Result<()> {
        let path = self.dir.join(META_FILE);
        let bytes = meta::encode(META_KIND, META_VERSION, &st.meta);
        let log = self.dir.join(META_LOG);
        let written = self
            .fs
            .write_atomic(&path, &bytes)
            .and_then(|()| match &st.meta_log {
                Some(file) => file.set_len(0).and_then(|()| file.sync_data()),
                None => match self.fs.remove(&log) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                },
            });
        if let Err(e) = written {
            let err = VolumeError::io(&self.name, &path)(e);
            self.halt(st, err.to_string());
            return Err(err);
        }
        self.meta_changed(st);
        Ok(())
    }

    /// Append one new snapshot to the log: crash-safe at once, durable at the next FLUSH.
    fn append_snapshot(&self, st: &mut State, record: &SnapshotRecord) -> Result<()> {
        let path = self.dir.join(META_LOG);
        let frame = log_frame(&LogRecord {
            seq: st.meta.next_log_seq,
            snapshot: record.clone(),
        });
        let written = (|| {
            let log = match &st.meta_log {
                Some(log) => log.clone(),
                None => {
                    let log = match self.fs.open(&path) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            self.fs.create(&path)?
                        }
                        other => other?,
                    };
                    st.new_files = true;
                    st.meta_log = Some(log.clone());
                    log
                }
            };
            // Appends happen under the state lock, so the end of the file is where this
            // record goes.
            log.write_all_at(&frame, log.size()?)
        })();
        if let Err(e) = written {
            let err = VolumeError::io(&self.name, &path)(e);
            self.halt(st, err.to_string());
            return Err(err);
        }
        st.meta.next_log_seq += 1;
        st.meta_unsynced = true;
        self.meta_changed(st);
        Ok(())
    }

    fn meta_changed(&self, st: &mut State) {
        st.list_dirty = true;
        st.list_changes += 1;
        self.upload_work.notify_all();
    }

    fn snapshot_info(st: &State, record: &SnapshotRecord) -> SnapshotInfo {
        SnapshotInfo {
            name: record.name.clone(),
            created: record.created,
            written_bytes: record.written_bytes,
            in_backend: st.backend_tlogs.last_number() >= record.tlog,
            clones: record.clones.clone(),
            size: if record.size > 0 {
                record.size
            } else {
                st.config.size
            },
            tlog: record.tlog,
        }
    }

    fn find_snapshot<'a>(&self, st: &'a State, name: &str) -> Result<&'a SnapshotRecord> {
        st.meta
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| VolumeError::SnapshotNotFound {
                volume: self.name.clone(),
                snapshot: name.to_string(),
            })
    }

    /// Number of the newest TLog that exists (uploaded or closed locally), 0 if none.
    fn last_closed_tlog(st: &State) -> u64 {
        st.closed_tlogs
            .back()
            .map_or(st.backend_tlogs.last_number(), |t| t.number.0)
            .max(st.backend_tlogs.last_number())
    }

    /// Take a snapshot: seal the open SCO, close the current TLog, record the boundary.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        validate_snapshot_name(&self.name, name)?;
        let _serial = self.flush_lock.lock();
        self.check_fence()?;
        let mut st = self.state.lock();
        self.check_usable(&st)?;
        if st.meta.snapshots.iter().any(|s| s.name == name) {
            return Err(VolumeError::SnapshotExists {
                volume: self.name.clone(),
                snapshot: name.to_string(),
            });
        }
        if self.has_unclosed_data(&st) {
            self.close_tlog(&mut st)?;
        }
        let tlog = Self::last_closed_tlog(&st);
        let previous = st.meta.snapshots.last().map_or(0, |s| s.tlog);
        let written_bytes = st
            .backend_tlogs
            .tlogs
            .iter()
            .map(|r| (r.number, r.data_bytes))
            .chain(
                st.closed_tlogs
                    .iter()
                    .map(|t| (t.number.0, t.record.data_bytes)),
            )
            .filter(|(number, _)| *number > previous && *number <= tlog)
            .map(|(_, bytes)| bytes)
            .sum();
        let record = SnapshotRecord {
            name: name.to_string(),
            created: now_secs(),
            tlog,
            written_bytes,
            clones: Vec::new(),
            size: st.config.size,
        };
        st.meta.snapshots.push(record.clone());
        self.append_snapshot(&mut st, &record)?;
        Ok(Self::snapshot_info(&st, &record))
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let st = self.state.lock();
        st.meta
            .snapshots
            .iter()
            .map(|s| Self::snapshot_info(&st, s))
            .collect()
    }

    pub fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        let st = self.state.lock();
        let record = self.find_snapshot(&st, name)?;
        Ok(Self::snapshot_info(&st, record))
    }

    /// Delete a snapshot: its TLogs now belong to the next snapshot's region, and the next scrub
    /// reclaims what only it kept alive. Refused while it has clones.
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.check_fence()?;
        let mut st = self.state.lock();
        self.check_usable(&st)?;
        let record = self.find_snapshot(&st, name)?;
        if !record.clones.is_empty() {
            return Err(VolumeError::HasClones {
                volume: self.name.clone(),
                what: format!("snapshot {name}"),
                clones: record.clones.clone(),
            });
        }
        st.meta.snapshots.retain(|s| s.name != name);
        self.store_meta(&mut st)
    }

    /// Clones of any snapshot of this volume.
    pub fn clones(&self) -> Vec<String> {
        let st = self.state.lock();
        st.meta
            .snapshots
            .iter()
            .flat_map(|s| s.clones.iter().cloned())
            .collect()
    }

    /// Record (or forget) that `clone` was made from snapshot `name`.
    pub fn set_clone(&self, name: &str, clone: &str, present: bool) -> Result<()> {
        self.check_fence()?;
        {
            let mut st = self.state.lock();
            let Some(record) = st.meta.snapshots.iter_mut().find(|s| s.name == name) else {
                return Err(VolumeError::SnapshotNotFound {
                    volume: self.name.clone(),
                    snapshot: name.to_string(),
                });
            };
            record.clones.retain(|c| c != clone);
            if present {
                record.clones.push(clone.to_string());
            }
            self.store_meta(&mut st)?;
        }
        self.put_backend_list()
    }

    /// Roll the volume back to snapshot `name`, dropping every later write, TLog, SCO and
    /// snapshot (see the module docs). Refused if a later snapshot has clones.
    pub fn rollback(&self, name: &str) -> Result<()> {
        let _uploads = self.upload_lock.lock();
        let _serial = self.flush_lock.lock();
        let _list = self.list_lock.lock();
        self.check_fence()?;
        let mut st = self.state.lock();
        self.check_usable(&st)?;
        if st.config.template {
            return Err(VolumeError::Refused {
                volume: self.name.clone(),
                reason: "a template cannot be rolled back".into(),
            });
        }
        let index = st
            .meta
            .snapshots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| VolumeError::SnapshotNotFound {
                volume: self.name.clone(),
                snapshot: name.to_string(),
            })?;
        if let Some(later) = st.meta.snapshots[index + 1..]
            .iter()
            .find(|s| !s.clones.is_empty())
        {
            return Err(VolumeError::HasClones {
                volume: self.name.clone(),
                what: format!("later snapshot {}", later.name),
                clones: later.clones.clone(),
            });
        }
        let boundary = st.meta.snapshots[index].tlog;
        // Nothing may still be copying into files the rollback is about to drop.
        self.wait_for_copies()?;
        if self.has_unclosed_data(&st) {
            self.close_tlog(&mut st)?;
        }
        // 1. Write the decision down: dropped range, DTL floor, remaining snapshots.
        let last = st.next_tlog.saturating_sub(1);
        if last > boundary {
            st.meta.dropped.push((boundary + 1, last));
        }
        st.meta.dtl_floor = (st.next_sco, 0);
        st.meta.snapshots.truncate(index + 1);
        self.store_meta(&mut st)?;
        // 2. The backend list without the dropped TLogs.
        let dropped_local: Vec<_> = st
            .closed_tlogs
            .iter()
            .filter(|t| t.number.0 > boundary)
            .map(|t| t.record.clone())
            .collect();
        let (kept, mut dropped): (Vec<_>, Vec<_>) = st
            .backend_tlogs
            .tlogs
            .iter()
            .cloned()
            .partition(|r| r.number <= boundary);
        st.backend_tlogs.tlogs = kept;
        // Their SCOs may already be on the backend even though the TLog is not.
        dropped.extend(dropped_local);
        st.epoch += 1;
        let list = Self::backend_list(&st);
        let namespace = st.config.namespace.clone();
        let owner = st.config.owner_tag;
        if let Err(e) =
            self.backend
                .put_if_owner(&namespace, TLOG_LIST_OBJECT, &list.encode(), owner)
        {
            tracing::warn!(volume = %self.name, error = %e, "rollback: backend TLog list not updated yet; the uploader retries");
            st.list_dirty = true;
        } else {
            st.list_dirty = false;
        }
        // 3. Rebuild the in-memory state with the restart code.
        let (next_sco, next_tlog) = (st.next_sco, st.next_tlog);
        let mut fresh = State::new(st.config.clone(), st.backend_tlogs.clone());
        fresh.meta = st.meta.clone();
        fresh.epoch = st.epoch;
        fresh.list_dirty = st.list_dirty;
        fresh.dtl = st.dtl.take();
        fresh.next_sco = next_sco;
        fresh.next_tlog = next_tlog;
        // Open files of the dropped SCOs and TLogs close with the old state.
        let old = std::mem::replace(&mut *st, fresh);
        drop(old);
        if let Err(e) = self.rebuild(&mut st, None) {
            self.halt(&mut st, e.to_string());
            return Err(e);
        }
        st.next_sco = st.next_sco.max(next_sco);
        st.next_tlog = st.next_tlog.max(next_tlog);
        self.upload_work.notify_all();
        drop(st);
        // 4. Delete what was dropped from the backend (best effort; scrub sweeps leftovers).
        for record in dropped {
            let _ = self
                .backend
                .delete_if_owner(&namespace, &record.object_name(), owner);
            let scos: Vec<crate::types::ScoName> = record
                .scos
                .iter()
                .map(|sco| crate::types::ScoName {
                    clone_id: 0,
                    number: crate::types::ScoNumber(*sco),
                    version: record.sco_version(*sco),
                })
                .collect();
            for object in &scos {
                let _ = self
                    .backend
                    .delete_if_owner(&namespace, &object.to_string(), owner);
            }
            self.forget_cached_scos(&namespace, &scos);
        }
        tracing::info!(volume = %self.name, snapshot = %name, "rolled back");
        Ok(())
    }

    /// Block until snapshot `name` is entirely on the backend, or `deadline`. Returns whether it is.
    pub fn wait_snapshot_in_backend(
        &self,
        name: &str,
        deadline: std::time::Instant,
    ) -> Result<bool> {
        let mut st = self.state.lock();
        loop {
            let tlog = self.find_snapshot(&st, name)?.tlog;
            if st.backend_tlogs.last_number() >= tlog {
                return Ok(true);
            }
            if st.halted.is_some() || self.upload_work.wait_until(&mut st, deadline).timed_out() {
                return Ok(st.backend_tlogs.last_number() >= tlog);
            }
        }
    }

    /// The map of the volume at snapshot `name`, replayed from its TLogs, and its size.
    pub fn snapshot_map(&self, name: &str) -> Result<(ClusterMap, u64)> {
        let (sources, size, namespace) = {
            let st = self.state.lock();
            let record = self.find_snapshot(&st, name)?;
            let info = Self::snapshot_info(&st, record);
            let mut sources: Vec<TLogSource> = st
                .backend_tlogs
                .tlogs
                .iter()
                .filter(|r| r.number <= record.tlog)
                .map(|r| TLogSource::Backend(r.object_name()))
                .collect();
            sources.extend(
                st.closed_tlogs
                    .iter()
                    .filter(|t| t.number.0 <= record.tlog)
                    .map(|t| TLogSource::Local(t.path.clone(), t.record.object_name())),
            );
            (sources, info.size, st.config.namespace.clone())
        };
        let mut map = ClusterMap::new(size / self.cluster_size);
        for source in sources {
            let (bytes, what) = match source {
                TLogSource::Backend(object) => (
                    self.backend
                        .get(&namespace, &object)
                        .map_err(VolumeError::backend(&self.name))?,
                    object,
                ),
                // Uploaded (and removed locally) since the list was taken: the backend has it.
                TLogSource::Local(path, object) => match self.fs.read(&path) {
                    Ok(bytes) => (bytes, path.display().to_string()),
                    Err(_) => (
                        self.backend
                            .get(&namespace, &object)
                            .map_err(VolumeError::backend(&self.name))?,
                        object,
                    ),
                },
            };
            let parsed = tlog::parse(&bytes, true)
                .map_err(|e| VolumeError::corrupt(&self.name, &what, e))?;
            for entry in parsed.entries {
                match entry {
                    Entry::Loc { address, location } if address < map.clusters() => {
                        map.set(address, location);
                    }
                    Entry::Trim { start, count } => map.clear_range(start, count, |_, _| {}),
                    _ => {}
                }
            }
        }
        Ok((map, size))
    }

    /// A read-only view of snapshot `name`.
    pub fn snapshot_view(self: &Arc<Self>, name: &str) -> Result<SnapshotView> {
        let (map, size) = self.snapshot_map(name)?;
        let epoch = self.state.lock().epoch;
        Ok(SnapshotView {
            volume: self.clone(),
            snapshot: name.to_string(),
            size,
            map: Mutex::new((epoch, Arc::new(map))),
        })
    }

    pub(super) fn current_epoch(&self) -> u64 {
        self.state.lock().epoch
    }
}

/// A snapshot, readable like a read-only volume (NBD export `VOL@SNAP`, vhost-user RO).
pub struct SnapshotView {
    volume: Arc<Volume>,
    snapshot: String,
    size: u64,
    map: Mutex<(u64, Arc<ClusterMap>)>,
}

impl SnapshotView {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    pub fn snapshot(&self) -> &str {
        &self.snapshot
    }

    /// Whether the map was built since the last scrub or rollback: reads and block status need
    /// no backend I/O to rebuild it.
    pub fn map_is_current(&self) -> bool {
        self.map.lock().0 == self.volume.current_epoch()
    }

    /// The map, rebuilt if a scrub or rollback rewrote the TLogs since it was built. The rebuild
    /// reads TLogs from the backend, so it runs without the map's lock: a reader that finds the
    /// map current is never queued behind it (two that find it stale both rebuild).
    fn current_map(&self) -> Result<Arc<ClusterMap>> {
        let epoch = self.volume.current_epoch();
        {
            let cached = self.map.lock();
            if cached.0 == epoch {
                return Ok(cached.1.clone());
            }
        }
        let (map, _) = self.volume.snapshot_map(&self.snapshot)?;
        let map = Arc::new(map);
        let mut cached = self.map.lock();
        // Epochs only grow: keep a map built for a later one if a concurrent rebuild stored it.
        if cached.0 < epoch {
            *cached = (epoch, map.clone());
        }
        Ok(map)
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let name = format!("{}@{}", self.volume.name(), self.snapshot);
        if !offset.is_multiple_of(LBA_SIZE) || !len.is_multiple_of(LBA_SIZE) {
            return Err(VolumeError::Misaligned {
                volume: name,
                offset,
                len,
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(VolumeError::OutOfRange {
                volume: name,
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let map = self.current_map()?;
        let plan = self.plan(&map, offset, buf.len())?;
        self.volume.execute_read(plan, buf)
    }

    /// [`read`](Self::read) if it needs no backend I/O: neither for the data nor for rebuilding
    /// the map after a scrub or rollback (see `read_nonblocking`).
    pub fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadAttempt> {
        self.check(offset, buf.len() as u64)?;
        let map = {
            let cached = self.map.lock();
            if cached.0 != self.volume.current_epoch() {
                return Ok(ReadAttempt::WouldBlock);
            }
            cached.1.clone()
        };
        let plan = self.plan(&map, offset, buf.len())?;
        if read_nonblocking::needs_backend(&plan) {
            return Ok(ReadAttempt::WouldBlock);
        }
        self.volume.execute_read(plan, buf)?;
        Ok(ReadAttempt::Done)
    }

    fn plan(&self, map: &ClusterMap, offset: u64, len: usize) -> Result<Vec<Segment>> {
        let st = self.volume.state.lock();
        self.volume.check_usable(&st)?;
        self.volume.find_snapshot(&st, &self.snapshot).map(|_| ())?;
        Ok(self.volume.plan_read_in(&st, map, offset, len))
    }

    /// Allocation map of `[offset, offset+len)`: runs of (length in bytes, is a hole).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        self.check(offset, len)?;
        let map = self.current_map()?;
        Ok(super::read::allocation_runs(
            &map,
            self.volume.cluster_size,
            offset,
            len,
        ))
    }
}

/// Number of the TLog object a record names; used by scrub and sweep.
pub(super) fn tlog_number_of(object: &str) -> Option<u64> {
    let base = object.split('.').next()?;
    TLogNumber::parse_object_name(base).map(|n| n.0)
}

/// One snapshot-log record as it is appended: `u32` length, `u32` CRC32C, JSON.
fn log_frame(record: &LogRecord) -> Vec<u8> {
    // Serialising a plain data struct to JSON cannot fail.
    let json = serde_json::to_vec(record).unwrap_or_default();
    let mut frame = Vec::with_capacity(json.len() + 8);
    frame.extend_from_slice(&(json.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    frame.extend_from_slice(&json);
    frame
}

/// The snapshot-log reader and writer for the fuzz target `snapshot_log` (`fuzz/`).
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use super::{log_frame, log_records, LogRecord, SnapshotRecord};

    /// The records of a log (sequence number, snapshot) and how many bytes they take.
    pub fn parse(bytes: &[u8]) -> (Vec<(u64, SnapshotRecord)>, usize) {
        let (records, valid) = log_records(bytes);
        let records = records.into_iter().map(|r| (r.seq, r.snapshot)).collect();
        (records, valid)
    }

    /// One record as `Volume::snapshot_create` appends it.
    pub fn encode(seq: u64, snapshot: &SnapshotRecord) -> Vec<u8> {
        log_frame(&LogRecord {
            seq,
            snapshot: snapshot.clone(),
        })
    }
}

/// The records of a snapshot log, up to the first torn or corrupt one, and how many bytes they
/// take.
fn log_records(mut bytes: &[u8]) -> (Vec<LogRecord>, usize) {
    let mut records = Vec::new();
    let mut valid = 0;
    while bytes.len() >= 8 {
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let Some(json) = bytes.get(8..8 + len) else {
            break;
        };
        if crc32c::crc32c(json) != crc {
            break;
        }
        match serde_json::from_slice(json) {
            Ok(record) => records.push(record),
            Err(_) => break,
        }
        bytes = &bytes[8 + len..];
        valid += 8 + len;
    }
    (records, valid)
}

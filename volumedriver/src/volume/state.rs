//! The volume's mutable state behind its one `state` mutex, and the checks every request makes.
//!
//! Everything a request decides with is here so that the decision is one short critical
//! section: the map, the local SCOs (open, sealed, disposable), the current and closed TLogs, the
//! upload queue, byte accounting and the halted/stopped flags. The I/O that follows a decision
//! happens in the other modules, mostly with the lock released (see the lock order in the
//! module docs of `volume`).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::config::{TLogList, TLogRecord, VolumeConfig};
use crate::error::{Result, VolumeError};
use crate::map::ClusterMap;
use crate::sco::ScoHeader;
use crate::tlog::{SyncPoint, TLogWriter};
use crate::types::{ScoName, ScoNumber, TLogNumber, LBA_SIZE};
use crate::wbfs::WbFile;

use super::dtl_link::{DtlLink, Position};
use super::snapshots::LocalMeta;
use super::upload::UploadTask;
use super::Volume;

pub(super) const CONFIG_FILE: &str = "config";
pub(super) const SCO_DIR: &str = "sco";
pub(super) const TLOG_DIR: &str = "tlog";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ScoState {
    Open,
    Sealed { crc: u32 },
    Disposable,
}

pub(super) struct LocalSco {
    pub(super) file: Arc<dyn WbFile>,
    pub(super) clusters: u64,
    pub(super) state: ScoState,
    pub(super) dirty: bool,
    /// CRC32C of every backend chunk of the sealed file (header included), kept from the write
    /// path so the upload need not checksum the SCO again (`ObjectStore::put_file`). `None` for a
    /// SCO restored after a restart: the upload then computes them in one read.
    pub(super) chunk_crcs: Option<Arc<[u32]>>,
    /// The newest write reservation into this file (0: none since open): the upload waits for
    /// it before reading the file (see `inflight`).
    pub(super) last_write: u64,
    /// Reservations whose copy into this file may still run: (sequence, first slot, end slot).
    /// A read of a slot in one of them waits for it. Finished ones are pruned as new ones come.
    pub(super) copying: Vec<(u64, u64, u64)>,
}

impl LocalSco {
    /// The newest reservation that may still be copying into `slot` (0: none).
    pub(super) fn copying_into(&self, slot: u64) -> u64 {
        self.copying
            .iter()
            .filter(|&&(_, start, end)| (start..end).contains(&slot))
            .map(|&(seq, _, _)| seq)
            .max()
            .unwrap_or(0)
    }
}

pub(super) struct OpenSco {
    pub(super) number: ScoNumber,
    /// Chunk CRCs of the file so far; their combination is the data CRC recorded at seal.
    pub(super) crcs: vstor_backend::ChunkCrcs,
    pub(super) clusters: u64,
}

pub(super) struct CurrentTLog {
    pub(super) writer: TLogWriter,
    pub(super) scos: Vec<u32>,
    pub(super) data_bytes: u64,
    pub(super) sealed_scos: u64,
    /// Clusters this TLog's entries made garbage (overwrites, trims).
    pub(super) garbage: u64,
    /// When its first entry was written (the age of data not yet queued for upload).
    pub(super) opened: std::time::Instant,
}

pub(super) struct ClosedTLog {
    pub(super) number: TLogNumber,
    pub(super) path: PathBuf,
    pub(super) file: Arc<dyn WbFile>,
    pub(super) record: TLogRecord,
    pub(super) dirty: bool,
    pub(super) garbage: u64,
}

#[derive(Default)]
pub(super) struct Stats {
    pub(super) reads: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) read_bytes: AtomicU64,
    pub(super) write_bytes: AtomicU64,
    pub(super) flushes: AtomicU64,
    pub(super) discards: AtomicU64,
    pub(super) backend_reads: AtomicU64,
    pub(super) cache_hits: AtomicU64,
    pub(super) throttled_writes: AtomicU64,
    pub(super) throttle_micros: AtomicU64,
    pub(super) evicted_scos: AtomicU64,
    pub(super) uploaded_scos: AtomicU64,
    pub(super) uploaded_bytes: AtomicU64,
    pub(super) uploaded_tlogs: AtomicU64,
    pub(super) upload_errors: AtomicU64,
}

pub(super) struct State {
    pub(super) config: VolumeConfig,
    pub(super) map: ClusterMap,
    pub(super) scos: BTreeMap<ScoNumber, LocalSco>,
    pub(super) open_sco: Option<OpenSco>,
    pub(super) tlog: Option<CurrentTLog>,
    pub(super) closed_tlogs: VecDeque<ClosedTLog>,
    pub(super) uploads: VecDeque<UploadTask>,
    pub(super) backend_tlogs: TLogList,
    pub(super) next_sco: u32,
    pub(super) next_tlog: u64,
    pub(super) flush_in_progress: bool,
    pub(super) roll_pending: bool,
    pub(super) last_sync: Option<SyncPoint>,
    pub(super) non_disposable_bytes: u64,
    pub(super) disposable_bytes: u64,
    pub(super) halted: Option<String>,
    pub(super) stopped: bool,
    pub(super) last_upload_error: Option<String>,
    /// A SCO or TLog file was created since the last flush: its directory entry must be fsynced
    /// too, or a power cut could lose the whole file.
    pub(super) new_files: bool,
    /// The DTL link, when the volume's mode is not `none`.
    pub(super) dtl: Option<DtlLink>,
    /// End of the write history applied at restart: the position after the newest cluster
    /// location read back from the backend's and the write buffer's TLogs (see `dtl_link`).
    pub(super) applied_end: Position,
    /// Snapshots, rollback-dropped TLog ranges and the DTL floor (see `snapshots`).
    pub(super) meta: LocalMeta,
    /// Backend namespaces reads may go to, by clone id: the volume's own, then its ancestors'.
    pub(super) namespaces: Vec<Arc<str>>,
    /// Bumped by every change that rewrites the backend TLog list other than appending (a
    /// rollback, a scrub): an upload started before it must not put a list built on the old one.
    pub(super) epoch: u64,
    /// The backend TLog list lacks a metadata change (snapshot, clone registration): the
    /// uploader puts it.
    pub(super) list_dirty: bool,
    /// Counts metadata changes, so a list put only clears `list_dirty` if nothing changed
    /// while it was in flight.
    pub(super) list_changes: u64,
    /// The snapshot log was appended to without fsync: the next FLUSH syncs it.
    pub(super) meta_unsynced: bool,
    /// The open snapshot log (see `snapshots`).
    pub(super) meta_log: Option<Arc<dyn WbFile>>,
    /// Clusters overwritten or trimmed since the last scrub (garbage estimate).
    pub(super) garbage_clusters: u64,
    /// At the last open: backend TLogs a seed (an MDS table) stood for, and TLogs replayed.
    pub(super) opened_seeded: u64,
    pub(super) opened_replayed: u64,
    /// At the last open: how long loading the map took (MDS seed and TLog replay).
    pub(super) opened_in: std::time::Duration,
}

pub(super) fn sco_path(dir: &Path, sco: ScoName) -> PathBuf {
    dir.join(SCO_DIR).join(sco.to_string())
}

pub(super) fn tlog_path(dir: &Path, number: TLogNumber) -> PathBuf {
    dir.join(TLOG_DIR).join(number.object_name())
}

impl Volume {
    pub(super) fn sco_header(&self, st: &State, sco: ScoName) -> ScoHeader {
        ScoHeader {
            cluster_size: self.cluster_size as u32,
            sco,
            namespace: st.config.namespace.clone(),
        }
    }

    pub(super) fn check_usable(&self, st: &State) -> Result<()> {
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

    pub(super) fn check_range(&self, st: &State, offset: u64, len: u64, write: bool) -> Result<()> {
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
        if write {
            self.check_write_gates()?;
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
    pub(super) fn halt(&self, st: &mut State, reason: String) {
        if st.halted.is_none() {
            tracing::error!(volume = %self.name, %reason, "volume halted");
            st.halted = Some(reason);
            self.served.set_halted();
        }
    }

    pub(super) fn halt_with<T>(&self, err: VolumeError) -> Result<T> {
        let mut st = self.state.lock();
        self.halt(&mut st, err.to_string());
        Err(err)
    }
}

impl Volume {
    /// Count clusters made garbage by the operation being applied to the current TLog.
    pub(super) fn note_garbage(st: &mut State, clusters: u64) {
        st.garbage_clusters += clusters;
        if let Some(tlog) = st.tlog.as_mut() {
            tlog.garbage += clusters;
        }
    }

    /// Garbage counted in TLogs not on the backend yet (a scrub cannot reclaim it).
    pub(super) fn garbage_not_uploaded(st: &State) -> u64 {
        st.closed_tlogs.iter().map(|t| t.garbage).sum::<u64>()
            + st.tlog.as_ref().map_or(0, |t| t.garbage)
    }
}

impl State {
    pub(super) fn new(config: VolumeConfig, backend_tlogs: TLogList) -> Self {
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
            opened_seeded: 0,
            opened_replayed: 0,
            opened_in: std::time::Duration::ZERO,
        }
    }
}

/// States for unit tests of the pure decisions (plan and complete an upload step, choose
/// eviction victims). The file handles in them are of an empty [`SimFs`](crate::wbfs::SimFs):
/// the pure functions only carry handles on to the I/O step, they never read or write them.
#[cfg(test)]
pub(super) mod testing {
    use super::*;
    use crate::config::VolumeOptions;
    use crate::sco::SCO_HEADER_LEN;

    pub const CLUSTER: u64 = crate::config::CLUSTER_SIZE;

    pub fn state() -> State {
        let config = VolumeConfig::new("unit", &VolumeOptions::new(1 << 30), 0)
            .expect("a valid test configuration");
        State::new(config, TLogList::default())
    }

    fn handle() -> Arc<dyn WbFile> {
        use crate::wbfs::{SimFs, WbFs};
        SimFs::new()
            .create(Path::new("/unit/file"))
            .expect("a simulated file")
    }

    /// A local SCO of `clusters` clusters in `state`, with the byte accounting it implies.
    pub fn add_sco(st: &mut State, number: u32, clusters: u64, state: ScoState) {
        match state {
            ScoState::Disposable => st.disposable_bytes += SCO_HEADER_LEN + clusters * CLUSTER,
            _ => st.non_disposable_bytes += clusters * CLUSTER,
        }
        st.scos.insert(
            ScoNumber(number),
            LocalSco {
                file: handle(),
                clusters,
                state,
                dirty: true,
                chunk_crcs: None,
                last_write: 0,
                copying: Vec::new(),
            },
        );
    }

    /// A closed TLog covering `scos`.
    pub fn add_closed_tlog(st: &mut State, number: u64, scos: &[u32]) {
        st.closed_tlogs.push_back(ClosedTLog {
            number: TLogNumber(number),
            path: PathBuf::from(format!("/nonexistent/{number}")),
            file: handle(),
            record: TLogRecord {
                scos: scos.to_vec(),
                ..TLogRecord::new(number)
            },
            dirty: true,
            garbage: 0,
        });
    }
}

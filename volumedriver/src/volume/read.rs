//! Reads: a pure plan (`plan_read_in`: which bytes come from zeros, a local SCO file or a
//! backend SCO object) made under the state lock, executed (`execute_read`) without it.
//!
//! The plan holds `Arc<dyn WbFile>`s of the local SCOs, so an eviction or upload that happens between
//! planning and executing cannot pull a file out from under the read.
//!
//! Backend pieces (evicted or ancestor SCOs) are fetched by `read_backend`: nearby ones of one
//! object by one ranged get, several gets at once. Local and zero pieces are done on the
//! caller's thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Result, VolumeError};
use crate::map::ClusterMap;
use crate::sco;
use crate::types::{ClusterLocation, ScoName};
use crate::wbfs::WbFile;

use super::state::{ScoState, State, SCO_DIR};
use super::Volume;

/// One cluster read from the backend without the state lock for a read-modify-write: its
/// address, the location it was read from, and its bytes.
pub(super) struct Fetched {
    cluster: u64,
    location: ClusterLocation,
    data: Vec<u8>,
}

/// Where the bytes of one piece of a read come from.
pub(super) enum Source {
    Zero,
    Local {
        file: Arc<dyn WbFile>,
        offset: u64,
        /// The newest write reservation into the file when the read was planned: its data must
        /// be in before the file is read (see `inflight`).
        written_by: u64,
    },
    Backend {
        namespace: Arc<str>,
        /// The SCO object, named as in its own namespace (clone id 0).
        sco: ScoName,
        offset: u64,
    },
}

pub(super) struct Segment {
    /// Where the piece goes in the caller's buffer.
    pub(super) start: usize,
    pub(super) len: usize,
    /// Its byte offset in the volume (which clusters it is, for decryption).
    pub(super) at: u64,
    pub(super) source: Source,
}

impl Volume {
    pub(super) fn plan_read(&self, st: &State, offset: u64, len: usize) -> Vec<Segment> {
        self.plan_read_in(st, &st.map, offset, len)
    }

    /// Plan a read of `map` (the live map or a snapshot's): own SCOs from the write buffer when
    /// a copy of that version is there, everything else from its namespace on the backend
    /// (clone id `k` > 0 is the `k`-th ancestor).
    pub(super) fn plan_read_in(
        &self,
        st: &State,
        map: &ClusterMap,
        offset: u64,
        len: usize,
    ) -> Vec<Segment> {
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
                let file_offset = sco::cluster_offset(u64::from(location.offset()), cs) + within;
                let local = (location.clone_id(), location.version()) == (0, 0);
                // A cached copy of an uploaded SCO is used only where it is long enough: after
                // a power cut it may have lost its unsynced tail, which the backend still has.
                let cached = st.scos.get(&location.sco_number()).filter(|cached| {
                    local
                        && (cached.state != ScoState::Disposable
                            || u64::from(location.offset()) < cached.clusters)
                });
                match cached {
                    Some(cached) => Source::Local {
                        file: cached.file.clone(),
                        offset: file_offset,
                        written_by: cached.copying_into(u64::from(location.offset())),
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
                (Some(last), Source::Local { file, offset, .. }) => match &last.source {
                    Source::Local {
                        file: f, offset: o, ..
                    } if Arc::ptr_eq(f, file) && o + last.len as u64 == *offset => {
                        last.len += n;
                        if let (
                            Source::Local {
                                written_by: merged, ..
                            },
                            Source::Local { written_by, .. },
                        ) = (&mut last.source, &source)
                        {
                            *merged = (*merged).max(*written_by);
                        }
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
                    at: pos,
                    source,
                });
            }
            pos += n as u64;
        }
        plan
    }

    pub(super) fn execute_read(&self, plan: Vec<Segment>, buf: &mut [u8]) -> Result<()> {
        let remote = plan
            .iter()
            .filter(|s| matches!(s.source, Source::Backend { .. }))
            .count();
        if remote < 2 {
            for segment in &plan {
                self.execute_segment(
                    segment,
                    &mut buf[segment.start..segment.start + segment.len],
                )?;
            }
            return Ok(());
        }
        // Each piece gets its own part of `buf` (the plan's pieces are in buffer order and do
        // not overlap): local ones now, backend ones together (`read_backend`).
        let mut backend: Vec<(&Segment, &mut [u8])> = Vec::with_capacity(remote);
        let mut rest = buf;
        let mut at = 0;
        for segment in &plan {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(segment.start - at);
            let (out, tail) = tail.split_at_mut(segment.len);
            rest = tail;
            at = segment.start + segment.len;
            if matches!(segment.source, Source::Backend { .. }) {
                backend.push((segment, out));
            } else {
                self.execute_segment(segment, out)?;
            }
        }
        self.fetch_backend_pieces(backend)
    }

    /// Read one piece of a plan into `out` (its part of the caller's buffer).
    pub(super) fn execute_segment(&self, segment: &Segment, out: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size;
        if matches!(segment.source, Source::Zero) {
            out.fill(0);
            return Ok(());
        }
        let first = segment.at / cs;
        let (within, extent) = self.stored_extent(segment.at, out.len() as u64);
        if extent == out.len() as u64 {
            self.read_stored(&segment.source, 0, out)?;
            self.open_clusters(first, out)
        } else {
            let mut whole = vec![0u8; extent as usize];
            self.read_stored(&segment.source, within, &mut whole)?;
            self.open_into(first, within, &mut whole, out)
        }
    }

    /// What must be read for a piece at volume offset `at` of `len` bytes: how far into the
    /// stored bytes the piece starts, and how many stored bytes that is. The piece itself,
    /// except on an encrypted volume where it starts or ends inside a cluster: XTS decrypts
    /// whole clusters only, so then the clusters it touches (all in one SCO: a piece never
    /// spans two).
    pub(super) fn stored_extent(&self, at: u64, len: u64) -> (u64, u64) {
        let cs = self.cluster_size;
        let within = at % cs;
        if !self.encrypted() || (within == 0 && len.is_multiple_of(cs)) {
            (0, len)
        } else {
            (within, (within + len).div_ceil(cs) * cs)
        }
    }

    /// Decrypt `stored` (a piece's stored extent, its clusters from `first` on) in place and
    /// copy the piece's bytes, `within` bytes in, to `out`.
    pub(super) fn open_into(
        &self,
        first: u64,
        within: u64,
        stored: &mut [u8],
        out: &mut [u8],
    ) -> Result<()> {
        self.open_clusters(first, stored)?;
        let within = within as usize;
        out.copy_from_slice(&stored[within..within + out.len()]);
        Ok(())
    }

    /// Read stored bytes (ciphertext for an encrypted volume) of a local or backend source into
    /// `out`, starting `back` bytes before the source's offset.
    fn read_stored(&self, source: &Source, back: u64, out: &mut [u8]) -> Result<()> {
        match source {
            Source::Zero => out.fill(0),
            Source::Local {
                file,
                offset,
                written_by,
            } => {
                self.inflight
                    .wait_through(*written_by)
                    .map_err(|reason| VolumeError::Halted {
                        volume: self.name.clone(),
                        reason,
                    })?;
                file.read_exact_at(out, offset - back)
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
            } => self.get_stored(namespace, sco, offset - back, out)?,
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

    /// Read one whole cluster under the lock, for a read-modify-write. Zeros and local data are
    /// read here; data that is only on the backend (an evicted SCO, a clone's ancestor) is not,
    /// since the state lock is never held across backend I/O: it must be in `fetched`, read
    /// without the lock ([`fetch_cluster`](Self::fetch_cluster)) from the location the map
    /// still has. Returns `false` when it is not there: fetch it, then retry.
    pub(super) fn read_cluster_locked(
        &self,
        st: &State,
        cluster: u64,
        out: &mut [u8],
        fetched: &[Fetched],
    ) -> Result<bool> {
        let plan = self.plan_read(st, cluster * self.cluster_size, out.len());
        if plan
            .iter()
            .any(|s| matches!(s.source, Source::Backend { .. }))
        {
            let location = st.map.get(cluster);
            return Ok(
                match fetched
                    .iter()
                    .find(|f| f.cluster == cluster && f.location == location)
                {
                    Some(f) => {
                        out.copy_from_slice(&f.data);
                        true
                    }
                    None => false,
                },
            );
        }
        self.execute_read(plan, out)?;
        Ok(true)
    }

    /// Read one whole cluster for a later read-modify-write: planned under the lock, read
    /// without it. The data at a location never changes, so it stays valid for as long as the
    /// map still points at the same location.
    pub(super) fn fetch_cluster(&self, cluster: u64) -> Result<Fetched> {
        let (plan, location) = {
            let st = self.state.lock();
            self.check_usable(&st)?;
            let offset = cluster * self.cluster_size;
            (
                self.plan_read(&st, offset, self.cluster_size as usize),
                st.map.get(cluster),
            )
        };
        let mut data = vec![0u8; self.cluster_size as usize];
        self.execute_read(plan, &mut data)?;
        Ok(Fetched {
            cluster,
            location,
            data,
        })
    }

    /// Allocation map of `[offset, offset+len)`: runs of (length in bytes, is a hole).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let st = self.state.lock();
        self.check_range(&st, offset, len, false)?;
        Ok(allocation_runs(&st.map, self.cluster_size, offset, len))
    }
}

/// Allocation runs of `[offset, offset+len)` in `map`: (length in bytes, is a hole), at most
/// 1024 runs.
pub(super) fn allocation_runs(
    map: &ClusterMap,
    cs: u64,
    offset: u64,
    len: u64,
) -> Vec<(u64, bool)> {
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

//! Writes, zeroing and discard: append whole clusters to the open SCO, one TLog entry per
//! cluster, update the map; seal a full SCO and roll the TLog (`seal_and_maybe_roll`,
//! `close_tlog`); and the throttle that pushes back when the upload backlog is over budget.
//!
//! The decisions run under the state lock: slots in the SCO, TLog entries and map updates must
//! be made in the order the map sees. A small or unaligned write also copies its data under the
//! lock (a page-cache copy of a few KiB costs less than the bookkeeping of doing it later). A
//! large cluster-aligned write (`DEFERRED_COPY_MIN`) only *reserves* under the lock and copies
//! its data afterwards, so that several large writes reach the disk at once; `inflight` says who
//! waits for such a copy and why that is safe.

use std::sync::atomic::Ordering;
use std::time::Duration;

use vstor_dtl::Ticket;

use crate::config::TLogRecord;
use crate::error::{Result, VolumeError};
use crate::sco;
use crate::tlog::{Entry, TLogWriter};
use crate::types::{ClusterLocation, ScoName, ScoNumber, TLogNumber};

use super::read::Fetched;
use super::state::{
    sco_path, tlog_path, ClosedTLog, CurrentTLog, LocalSco, OpenSco, ScoState, State,
};
use super::upload::UploadTask;
use super::Volume;

/// Bounds of the delay imposed on one request while the volume is over its write-buffer budget.
const THROTTLE_MIN: Duration = Duration::from_micros(50);
const THROTTLE_MAX: Duration = Duration::from_millis(100);
/// Upload rate assumed before any upload was measured, and the floor of the estimate.
const MIN_UPLOAD_RATE: u64 = 16 << 20;
/// WRITE_ZEROES with allocation writes zeros in chunks of this size.
const ZERO_CHUNK: u64 = 1 << 20;
/// Cluster-aligned writes of at least this size copy their data without the state lock (see
/// `inflight`). The same size from which the write buffer writes with `O_DIRECT`
/// (`wbfs::direct`): from there on a copy waits for the device, which is what must not happen
/// under the lock.
const DEFERRED_COPY_MIN: usize = 128 << 10;

/// What a write reserved under the state lock and copies after releasing it (see `inflight`).
struct Reservation {
    seq: u64,
    copies: Vec<SlotCopy>,
    /// The reservation filled a SCO whose TLog is due to be closed: closing (which waits for
    /// every reservation, this one included) is left until the copy is done (`roll_pending`).
    roll_deferred: bool,
}

/// One run of reserved slots: `data[range]` goes to `file` at byte `at`.
struct SlotCopy {
    file: std::sync::Arc<dyn crate::wbfs::WbFile>,
    sco: ScoName,
    at: u64,
    range: std::ops::Range<usize>,
}

/// The result of a step under the state lock that may need a cluster read from the backend
/// first (a read-modify-write of a cluster whose data is not local): done, or which cluster to
/// fetch without the lock before retrying the step.
enum Locked<T> {
    Done(T),
    Fetch(u64),
}

/// A reply to a write: done, and possibly a request to slow the client down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    pub throttle: Option<Duration>,
}

impl Volume {
    /// Write `data` at `offset` (both multiples of 512). With `fua` the write is durable before
    /// this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<WriteOutcome> {
        let (outcome, dtl) = self.write_deferred(offset, data)?;
        if let Some(ticket) = dtl {
            self.dtl_wait(ticket)?;
            self.check_fence()?;
        }
        if fua {
            self.flush()?;
        }
        Ok(outcome)
    }

    /// Whether a cluster-aligned write of `len` bytes goes to the disk rather than the page cache
    /// (`O_DIRECT`, see `wbfs`) and copies its data without the volume lock: a frontend should
    /// run it where it may block, and gains from having several in flight.
    pub fn write_waits_for_device(len: usize) -> bool {
        len >= DEFERRED_COPY_MIN
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
        let cs = self.cluster_size;
        if data.len() >= DEFERRED_COPY_MIN
            && offset.is_multiple_of(cs)
            && (data.len() as u64).is_multiple_of(cs)
        {
            return self.write_reserved(offset, data);
        }
        let mut fetched = Vec::new();
        let mut dtl = None;
        let outcome = loop {
            let mut st = self.state.lock();
            self.check_range(&st, offset, data.len() as u64, true)?;
            self.dtl_service(&mut st)?;
            let written = self.write_locked(&mut st, offset, data, &fetched);
            dtl = self.dtl_submit(&mut st).or(dtl);
            drop(st);
            match written? {
                Locked::Done(outcome) => break outcome,
                Locked::Fetch(cluster) => fetched.push(self.fetch_cluster(cluster)?),
            }
        };
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok((outcome, dtl))
    }

    /// A large cluster-aligned write: reserve under the state lock, copy without it (see
    /// `inflight`). Encryption happens before the lock is taken.
    fn write_reserved(&self, offset: u64, data: &[u8]) -> Result<(WriteOutcome, Option<Ticket>)> {
        let first = offset / self.cluster_size;
        let stored = self.seal_clusters(first, data)?;
        let (reservation, outcome, dtl) = {
            let mut st = self.state.lock();
            self.check_range(&st, offset, data.len() as u64, true)?;
            self.dtl_service(&mut st)?;
            let mut reservation = Reservation {
                seq: self.inflight.begin(),
                copies: Vec::new(),
                roll_deferred: false,
            };
            let appended = self.append_clusters_in(&mut st, first, &stored, Some(&mut reservation));
            let dtl = self.dtl_submit(&mut st);
            if let Err(e) = appended {
                // The volume is halted (every append failure halts it); what was reserved is
                // never read again.
                self.inflight.finish(reservation.seq, Some(e.to_string()));
                return Err(e);
            }
            (reservation, self.throttle(&st, data.len() as u64), dtl)
        };
        let copied = reservation.copies.iter().try_for_each(|copy| {
            copy.file
                .write_all_at(&stored[copy.range.clone()], copy.at)
                .map_err(VolumeError::io(&self.name, sco_path(&self.dir, copy.sco)))
        });
        self.inflight.finish(
            reservation.seq,
            copied.as_ref().err().map(ToString::to_string),
        );
        if let Err(err) = copied {
            return self.halt_with(err);
        }
        if reservation.roll_deferred {
            let mut st = self.state.lock();
            if st.roll_pending && !st.flush_in_progress {
                self.close_tlog(&mut st)?;
            }
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok((outcome, dtl))
    }

    /// Write under the lock. A partial cluster at either end is read-modify-written; if its data
    /// is only on the backend and not in `fetched`, nothing is written and `Fetch` says which
    /// cluster to read without the lock before retrying.
    fn write_locked(
        &self,
        st: &mut State,
        offset: u64,
        data: &[u8],
        fetched: &[Fetched],
    ) -> Result<Locked<WriteOutcome>> {
        if data.is_empty() {
            return Ok(Locked::Done(WriteOutcome::default()));
        }
        let cs = self.cluster_size;
        let end = offset + data.len() as u64;
        let first = offset / cs;
        if offset.is_multiple_of(cs) && end.is_multiple_of(cs) {
            self.write_clusters(st, first, data)?;
        } else {
            let last = (end - 1) / cs;
            let mut whole = vec![0u8; ((last - first + 1) * cs) as usize];
            if !offset.is_multiple_of(cs)
                && !self.read_cluster_locked(st, first, &mut whole[..cs as usize], fetched)?
            {
                return Ok(Locked::Fetch(first));
            }
            if !end.is_multiple_of(cs) && (last != first || offset.is_multiple_of(cs)) {
                let at = ((last - first) * cs) as usize;
                if !self.read_cluster_locked(st, last, &mut whole[at..at + cs as usize], fetched)? {
                    return Ok(Locked::Fetch(last));
                }
            }
            let at = (offset - first * cs) as usize;
            whole[at..at + data.len()].copy_from_slice(data);
            self.write_clusters(st, first, &whole)?;
        }
        Ok(Locked::Done(self.throttle(st, data.len() as u64)))
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

    /// Write whole plaintext clusters starting at cluster `first`: encrypted if the volume is
    /// (`crypt`), then appended.
    pub(super) fn write_clusters(&self, st: &mut State, first: u64, data: &[u8]) -> Result<()> {
        let stored = self.seal_clusters(first, data)?;
        self.append_clusters(st, first, &stored)
    }

    /// Append whole clusters, as stored (ciphertext for an encrypted volume), starting at
    /// cluster `first`: to the open SCO, the TLog, the map and the DTL.
    pub(super) fn append_clusters(&self, st: &mut State, first: u64, data: &[u8]) -> Result<()> {
        self.append_clusters_in(st, first, data, None)
    }

    /// [`append_clusters`](Self::append_clusters), copying the data now, or with a `reservation`
    /// only reserving the slots and noting the copies to make once the lock is released.
    fn append_clusters_in(
        &self,
        st: &mut State,
        first: u64,
        data: &[u8],
        mut reservation: Option<&mut Reservation>,
    ) -> Result<()> {
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
            let Some(local) = st.scos.get_mut(&number) else {
                return self.halt_with(VolumeError::corrupt(
                    &self.name,
                    ScoName::new(number).to_string(),
                    "the open SCO is missing from the write buffer's table",
                ));
            };
            let at = sco::cluster_offset(index, cs);
            if let Some(r) = reservation.as_deref_mut() {
                local.last_write = r.seq;
                let inflight = &self.inflight;
                local.copying.retain(|&(seq, _, _)| !inflight.is_done(seq));
                local.copying.push((r.seq, index, index + n));
                r.copies.push(SlotCopy {
                    file: local.file.clone(),
                    sco: ScoName::new(number),
                    at,
                    range: (done * cs) as usize..((done + n) * cs) as usize,
                });
            } else if let Err(e) = local.file.write_all_at(chunk, at) {
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
                let defer = reservation.is_some();
                if self.seal_and_maybe_roll(st, defer)? {
                    if let Some(r) = reservation.as_deref_mut() {
                        r.roll_deferred = true;
                    }
                }
            }
        }
        Ok(())
    }

    fn open_new_sco(&self, st: &mut State) -> Result<()> {
        let number = ScoNumber(st.next_sco);
        let sco = ScoName::new(number);
        let path = sco_path(&self.dir, sco);
        let header = self.sco_header(st, sco);
        let file = sco::create(self.fs.as_ref(), &path, &header)
            .map_err(VolumeError::io(&self.name, &path))?;
        st.next_sco += 1;
        st.new_files = true;
        st.scos.insert(
            number,
            LocalSco {
                file,
                clusters: 0,
                state: ScoState::Open,
                dirty: true,
                chunk_crcs: None,
                last_write: 0,
                copying: Vec::new(),
            },
        );
        st.open_sco = Some(OpenSco {
            number,
            crcs: vstor_backend::ChunkCrcs::with_prefix(&header.encode()),
            clusters: 0,
        });
        Ok(())
    }

    fn append_entry(&self, st: &mut State, entry: Entry) -> Result<()> {
        let tlog = match &mut st.tlog {
            Some(tlog) => tlog,
            None => {
                let number = TLogNumber(st.next_tlog);
                let path = tlog_path(&self.dir, number);
                let writer = TLogWriter::create(self.fs.as_ref(), &path, number)
                    .map_err(VolumeError::io(&self.name, &path))?;
                st.next_tlog += 1;
                st.new_files = true;
                st.tlog.insert(CurrentTLog {
                    writer,
                    scos: Vec::new(),
                    data_bytes: 0,
                    sealed_scos: 0,
                    garbage: 0,
                    opened: std::time::Instant::now(),
                })
            }
        };
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
        let crc = open.crcs.data_crc();
        if open.clusters == 0 {
            // Never written: drop the empty file instead of sealing it.
            st.scos.remove(&open.number);
            let _ = self
                .fs
                .remove(&sco_path(&self.dir, ScoName::new(open.number)));
            return Ok(());
        }
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
        // `append_entry` above made sure there is a current TLog.
        if let Some(tlog) = st.tlog.as_mut() {
            tlog.scos.push(open.number.0);
            tlog.sealed_scos += 1;
        }
        self.upload_work.notify_all();
        Ok(())
    }

    /// Seal the full open SCO and close the TLog if it now covers `tlog_scos` SCOs, or early if
    /// not-yet-uploaded data passed half the write-buffer budget: data only becomes disposable
    /// once its TLog is on the backend, so a TLog larger than the budget would throttle the
    /// volume forever. Closing is deferred (`roll_pending`) while a flush is between its two
    /// phases, and with `defer` (the caller holds a write reservation, which closing would wait
    /// for); true if it was deferred for that reason.
    fn seal_and_maybe_roll(&self, st: &mut State, defer: bool) -> Result<bool> {
        self.seal_open_sco(st)?;
        let over_budget = st.non_disposable_bytes > st.config.write_buffer / 2;
        if st
            .tlog
            .as_ref()
            .is_some_and(|t| t.sealed_scos >= st.config.tlog_scos || over_budget)
        {
            if st.flush_in_progress || defer {
                st.roll_pending = true;
                return Ok(defer);
            } else {
                self.close_tlog(st)?;
            }
        }
        Ok(false)
    }

    /// Close the current TLog (sealing the open SCO first) and queue it for upload.
    pub(super) fn close_tlog(&self, st: &mut State) -> Result<()> {
        st.roll_pending = false;
        self.seal_open_sco(st)?;
        // Its CLOSE vouches for the data of every SCO it seals (see `inflight`).
        self.wait_for_copies()?;
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

    /// Wait until the data of every write reserved so far is in the write buffer (see
    /// `inflight`); never called by a thread holding a reservation.
    pub(super) fn wait_for_copies(&self) -> Result<()> {
        self.inflight
            .wait_all()
            .map_err(|reason| VolumeError::Halted {
                volume: self.name.clone(),
                reason,
            })
    }

    /// Make `[offset, offset+len)` read as zeros without writing data: whole clusters are
    /// unmapped (a TRIM entry in the TLog), partial clusters at the edges are read-modify-written.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut fetched = Vec::new();
        loop {
            let mut st = self.state.lock();
            self.check_range(&st, offset, len, true)?;
            self.dtl_service(&mut st)?;
            let zeroed = self.zero_locked(&mut st, offset, len, &fetched);
            let dtl = self.dtl_submit(&mut st);
            drop(st);
            let zeroed = zeroed?;
            if let Some(ticket) = dtl {
                self.dtl_wait(ticket)?;
                self.check_fence()?;
            }
            match zeroed {
                Locked::Done(()) => break,
                Locked::Fetch(cluster) => fetched.push(self.fetch_cluster(cluster)?),
            }
        }
        self.stats.discards.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Zero `[offset, offset+len)` under the lock: the partial clusters at the edges are
    /// read-modify-written (both read before either is written, so a `Fetch` leaves nothing
    /// half done), the whole clusters are trimmed.
    fn zero_locked(
        &self,
        st: &mut State,
        offset: u64,
        len: u64,
        fetched: &[Fetched],
    ) -> Result<Locked<()>> {
        let cs = self.cluster_size;
        let end = offset + len;
        let full_start = offset.div_ceil(cs);
        let full_end = end / cs;
        let edges = if full_start >= full_end {
            // No whole cluster inside: one or two partial clusters.
            let split = (offset / cs + 1) * cs;
            [(offset, end.min(split)), (split, end)]
        } else {
            [(offset, full_start * cs), (full_end * cs, end)]
        };
        let mut patched = Vec::new();
        for (from, to) in edges {
            let cluster = from / cs;
            if from >= to || st.map.get(cluster).is_unwritten() {
                continue;
            }
            let mut buf = vec![0u8; cs as usize];
            if !self.read_cluster_locked(st, cluster, &mut buf, fetched)? {
                return Ok(Locked::Fetch(cluster));
            }
            buf[(from - cluster * cs) as usize..(to - cluster * cs) as usize].fill(0);
            patched.push((cluster, buf));
        }
        for (cluster, buf) in patched {
            self.write_clusters(st, cluster, &buf)?;
        }
        if full_start < full_end {
            self.trim_locked(st, full_start, full_end - full_start)?;
        }
        Ok(Locked::Done(()))
    }

    /// Unmap `count` whole clusters from `start`: one TRIM entry, if any of them was mapped.
    pub(super) fn trim_locked(&self, st: &mut State, start: u64, count: u64) -> Result<()> {
        let mut cleared = 0;
        st.map.clear_range(start, count, |_, _| cleared += 1);
        if cleared > 0 {
            self.append_entry(st, Entry::Trim { start, count })?;
            Self::note_garbage(st, cleared);
            if st.dtl.is_some() {
                self.dtl_record_trim(st, start, count);
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
            let mut fetched = Vec::new();
            while pos < offset + len {
                let n = (offset + len - pos).min(ZERO_CHUNK);
                let mut st = self.state.lock();
                self.check_usable(&st)?;
                self.check_write_gates()?;
                self.dtl_service(&mut st)?;
                let step = self.write_locked(&mut st, pos, &zeros[..n as usize], &fetched);
                dtl = self.dtl_submit(&mut st).or(dtl);
                drop(st);
                match step? {
                    Locked::Done(step) => {
                        outcome.throttle = outcome.throttle.max(step.throttle);
                        pos += n;
                    }
                    Locked::Fetch(cluster) => fetched.push(self.fetch_cluster(cluster)?),
                }
            }
            if let Some(ticket) = dtl {
                self.dtl_wait(ticket)?;
                self.check_fence()?;
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
}

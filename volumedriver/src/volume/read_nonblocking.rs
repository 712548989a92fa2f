//! Reads that never wait on the backend: what a frontend calls on its reactor or queue thread.
//!
//! Why: a frontend serves many requests from one task (an NBD connection) or one thread (a
//! vhost-user queue). A read of data that is no longer in the write buffer (an evicted SCO, a
//! clone's ancestor, a volume restarted from the backend) is a `get_range` on the backend, and
//! every backend after the local one is on the network. Running it inline would stall every
//! other request behind it for a network round trip.
//!
//! So the frontend first calls [`Volume::try_read`]: the read is planned under the volume lock
//! exactly like [`Volume::read`] does. If every piece of the plan is zeros or write-buffer data,
//! it is executed at once (page-cache reads, run to completion: no thread hop, which is what QD1
//! latency needs). If any piece needs the backend, nothing is read and
//! [`ReadAttempt::WouldBlock`] tells the frontend to run [`Volume::read`] on a pool instead. The
//! plan is then made again there: planning is cheap next to a backend round trip, and a fresh
//! plan sees whatever changed in between (the data may even be local again after a rewrite).
//!
//! Writes: a sub-cluster write (or trim) whose partial cluster lives only on the backend reads
//! that cluster first (without the volume lock, retrying if the map moved meanwhile:
//! `read::fetch_cluster`). [`Volume::write_may_read_backend`] says so beforehand, so that a
//! frontend can run such a write where waiting holds up nothing else: NBD and edge connections
//! and vhost-user queues hand it to the blocking pool (`BlockTarget::write_reads_backend`).

use std::sync::atomic::Ordering;

use super::read::{Segment, Source};
use super::Volume;
use crate::error::Result;

/// What [`Volume::try_read`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAttempt {
    /// The buffer holds the data.
    Done,
    /// Part of the range is only on the backend: nothing useful is in the buffer; call `read`
    /// where waiting is allowed.
    WouldBlock,
}

/// Whether executing `plan` would read from the backend.
pub(super) fn needs_backend(plan: &[Segment]) -> bool {
    plan.iter()
        .any(|segment| matches!(segment.source, Source::Backend { .. }))
}

impl Volume {
    /// [`read`](Self::read) if it can be done without backend I/O (see the module docs).
    /// Errors (out of range, misaligned, halted) are reported as `read` would.
    pub fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadAttempt> {
        let plan = {
            let st = self.state.lock();
            self.check_range(&st, offset, buf.len() as u64, false)?;
            self.plan_read(&st, offset, buf.len())
        };
        if needs_backend(&plan) {
            return Ok(ReadAttempt::WouldBlock);
        }
        self.execute_read(plan, buf)?;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(ReadAttempt::Done)
    }

    /// Whether a write, trim or write-zeroes of `[offset, offset+len)` would first read a
    /// cluster it covers only in part from the backend (the read-modify-write of data that was
    /// evicted or is inherited from a parent), so that a frontend can issue it where waiting for
    /// the backend holds up nothing else. The answer may be stale by the time the write runs;
    /// then the write waits where it is. A request the write will refuse (out of range) says
    /// false: it fails at once.
    pub fn write_may_read_backend(&self, offset: u64, len: u64) -> bool {
        let cs = self.cluster_size;
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        // Asked before every write: an aligned one (the usual kind) answers without the lock.
        let head = (!offset.is_multiple_of(cs)).then_some(offset / cs);
        let tail = (!end.is_multiple_of(cs)).then_some(end / cs);
        if head.is_none() && tail.is_none() {
            return false;
        }
        let st = self.state.lock();
        if self.check_range(&st, offset, len, true).is_err() {
            return false;
        }
        head.into_iter()
            .chain(tail)
            .any(|cluster| needs_backend(&self.plan_read(&st, cluster * cs, cs as usize)))
    }
}

//! Writes whose data is still being copied into the write buffer after the state lock was
//! released.
//!
//! Why: a write used to copy its data into the open SCO while holding the state lock, so the
//! writes of a client at queue depth 8 reached the disk one at a time, and a large write (which
//! goes to the disk with `O_DIRECT`, see `wbfs::direct`) kept every other request of the volume
//! waiting for the disk. A large cluster-aligned write now *reserves* under the lock: its SCO
//! slots, its TLog entries, its map updates, its DTL record and its chunk CRCs (all decided and
//! computed from the caller's buffer, in the order the map sees); it then copies the data into
//! the reserved slots without the lock, so several writes are on their way to the disk at once.
//!
//! Between the reservation and the end of the copy the map already points at slots whose bytes
//! are not in the file yet. This tracker closes that window: each reservation gets a sequence
//! number, issued under the state lock in reservation order, and everything that reads or vouches
//! for reserved slots first waits until every reservation up to the newest one it can see is
//! complete ([`InFlight::wait_through`]):
//!
//! * a read of a reserved slot (`execute_read`: a concurrent read of a slot being written returns
//!   the new data, never the zeros of a hole) — each local SCO lists the slot ranges of its
//!   reservations that may still be copying, so a read of other slots of the same SCO does not
//!   wait;
//! * a SCO's upload, which reads or links the whole file — each local SCO remembers its newest
//!   reservation;
//! * FLUSH, before its fsyncs: the SYNC it appends vouches for every TLog entry before it;
//! * closing a TLog (its CLOSE vouches for the data of every SCO it seals) and rollback.
//!
//! Invariants:
//! * sequence numbers are issued under the state lock, so "issued so far" seen under the lock
//!   covers every reservation the state shows;
//! * a thread holding an unfinished reservation never waits on the tracker (it would wait for
//!   itself): the write path defers a TLog roll it triggers to after its copy (`roll_pending`);
//! * finishing a reservation needs no other lock, so waiting on the tracker while holding the
//!   state lock cannot deadlock;
//! * a failed copy is remembered: a waiter whose range includes it gets an error instead of going
//!   on as if the data were there (the writer halts the volume as well).
//!
//! TLog entries of a reservation may reach the TLog file (its 64 KiB write-out) before the data
//! reaches the SCO; that is harmless because restart trusts an unclosed TLog only up to its last
//! SYNC, which FLUSH appends only after waiting here.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

/// The reservation tracker of one volume (see the module docs).
pub(super) struct InFlight {
    tracker: Mutex<Tracker>,
    finished: Condvar,
    /// Every reservation numbered below this is complete (lock-free fast path of waits).
    watermark: AtomicU64,
    /// The lowest failed reservation, or `u64::MAX`.
    first_failed: AtomicU64,
    /// Waits that had to block (`VolumeInfo::copy_waits`).
    waits: AtomicU64,
}

struct Tracker {
    next: u64,
    pending: BTreeSet<u64>,
    failure: Option<String>,
}

impl Default for InFlight {
    fn default() -> Self {
        Self {
            tracker: Mutex::new(Tracker {
                next: 1,
                pending: BTreeSet::new(),
                failure: None,
            }),
            finished: Condvar::new(),
            watermark: AtomicU64::new(1),
            first_failed: AtomicU64::new(u64::MAX),
            waits: AtomicU64::new(0),
        }
    }
}

impl InFlight {
    /// Start a reservation; call with the state lock held. Sequence 0 is never issued: it stands
    /// for "no reservation" (a SCO never written by one).
    pub(super) fn begin(&self) -> u64 {
        let mut t = self.tracker.lock();
        let seq = t.next;
        t.next += 1;
        t.pending.insert(seq);
        seq
    }

    /// The newest sequence number issued (0 if none).
    pub(super) fn issued(&self) -> u64 {
        self.tracker.lock().next - 1
    }

    /// Finish reservation `seq`: its data is in the file, or the copy failed with `failure`.
    pub(super) fn finish(&self, seq: u64, failure: Option<String>) {
        let mut t = self.tracker.lock();
        t.pending.remove(&seq);
        if let Some(reason) = failure {
            self.first_failed.fetch_min(seq, Ordering::AcqRel);
            t.failure.get_or_insert(reason);
        }
        let low = t.pending.first().copied().unwrap_or(t.next);
        self.watermark.store(low, Ordering::Release);
        drop(t);
        self.finished.notify_all();
    }

    /// Wait until every reservation numbered `seq` or lower is complete. An error says why one
    /// of them failed: its slots do not hold the data the map says they do.
    pub(super) fn wait_through(&self, seq: u64) -> Result<(), String> {
        if self.watermark.load(Ordering::Acquire) <= seq {
            let mut t = self.tracker.lock();
            if t.pending.first().is_some_and(|&low| low <= seq) {
                self.waits.fetch_add(1, Ordering::Relaxed);
            }
            while t.pending.first().is_some_and(|&low| low <= seq) {
                self.finished.wait(&mut t);
            }
        }
        if self.first_failed.load(Ordering::Acquire) <= seq {
            let t = self.tracker.lock();
            return Err(t
                .failure
                .clone()
                .unwrap_or_else(|| "a write's data did not reach the write buffer".into()));
        }
        Ok(())
    }

    /// Whether reservation `seq` is finished (lock-free).
    pub(super) fn is_done(&self, seq: u64) -> bool {
        seq < self.watermark.load(Ordering::Acquire)
    }

    /// How many waits had to block so far.
    pub(super) fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Wait for every reservation issued so far.
    pub(super) fn wait_all(&self) -> Result<(), String> {
        self.wait_through(self.issued())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn waits_cover_exactly_the_reservations_up_to_the_sequence() {
        let f = InFlight::default();
        assert_eq!(f.wait_through(0), Ok(()));
        let a = f.begin();
        let b = f.begin();
        assert_eq!((a, b, f.issued()), (1, 2, 2));
        f.finish(b, None);
        // `a` is still pending: a wait through 0 returns, a wait through 1 would block.
        assert_eq!(f.wait_through(0), Ok(()));
        let f = Arc::new(f);
        let waiter = {
            let f = Arc::clone(&f);
            std::thread::spawn(move || f.wait_through(2))
        };
        f.finish(a, None);
        assert_eq!(waiter.join().expect("waiter"), Ok(()));
        assert_eq!(f.wait_all(), Ok(()));
    }

    #[test]
    fn a_failed_copy_fails_the_waits_that_cover_it_only() {
        let f = InFlight::default();
        let a = f.begin();
        let b = f.begin();
        f.finish(a, None);
        f.finish(b, Some("disk full".into()));
        assert_eq!(f.wait_through(a), Ok(()));
        assert_eq!(f.wait_through(b), Err("disk full".into()));
        assert_eq!(f.wait_all(), Err("disk full".into()));
    }
}

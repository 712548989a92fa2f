//! Which in-flight requests a client resends to a volume's new owner, and how long the guest
//! waits for one: a pure state machine ([`Recovery`]), no sockets, timers or files. The client
//! (`remote::client`) feeds it events (replies, connection lost, connected, clock ticks) and does
//! what it answers.
//!
//! # Why resending is safe, and when it is not
//!
//! Open vStorage's rule: *requests are resent only if the DTL was in sync.* A write the old owner
//! acknowledged is on its DTL when the DTL is in sync, and the new owner replays the DTL before it
//! serves the volume, so nothing acknowledged is lost; a write *not* acknowledged may or may not
//! have been applied, and resending it is harmless because writing the same data at the same
//! offset twice is idempotent (so are trim, write-zeroes and flush). Requests are resent in id
//! order, i.e. the order the guest issued them; the guest never has two overlapping writes in
//! flight whose order matters (a block device makes no ordering promise between in-flight
//! requests), so a resend cannot reorder anything the guest relies on.
//!
//! When the last reply from the old owner said the DTL was *not* in sync, acknowledged writes may
//! be gone with that node. Resending the unacknowledged ones would then build on a volume that
//! silently lost earlier data. Instead every in-flight mutating request (write, trim,
//! write-zeroes, flush) fails with an I/O error, and, if writes were acknowledged since the last
//! flush and no failing flush tells the guest already, the *next* flush fails too: that is how a
//! guest learns that acknowledged-but-unflushed data may be lost (the same contract as a disk
//! losing its volatile cache). Reads and block-status queries are always resent: they change
//! nothing. On a read-only volume (snapshot, template) everything is resent.
//!
//! A request the owner *refused* as no longer its own (`NotOwner`, `Fenced`, `StaleTag`,
//! `Shutdown`, `Released`) never ran, so it is always resent. After such a refusal the client
//! sends nothing more on that connection and gives it up only once every request sent on it has
//! its answer (done, or refused): on a move, nothing is left whose fate is unknown, and the rule
//! above applies to none.
//!
//! A refusal with `Released` says more: the owner handed the volume over cleanly (a
//! `volume move`: flushed, everything on the backend, which the next owner reads), so nothing it
//! acknowledged can be lost, DTL or not ([`Recovery::on_released`]). The loss of that
//! connection is then safe, and the next flush does not fail. After a bare `NotOwner` or
//! `Fenced` the client cannot tell a clean hand-off from a fence, and the rule above applies.
//!
//! # The pause bound
//!
//! While the owner is unreachable, requests wait (the guest sees a pause). Once `bound` has passed
//! since the connection was lost, everything waiting fails with an I/O error and new requests fail
//! at once (`Failed`) until a connection succeeds again; the client keeps trying meanwhile.

use std::time::{Duration, Instant};

/// What a request does, as far as resending is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Trim,
    WriteZeroes,
    Flush,
    BlockStatus,
}

impl Kind {
    /// Whether the request changes the volume (or its durability).
    pub fn mutating(self) -> bool {
        !matches!(self, Kind::Read | Kind::BlockStatus)
    }
}

/// The fate of one in-flight request when its connection is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it again on the next connection.
    Resend,
    /// Complete it with an I/O error now.
    Fail,
}

/// What to do with a request the guest submits now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Connected: send it.
    Send,
    /// Reconnecting: keep it until a connection is up (or the bound passes).
    Wait,
    /// Fail it with an I/O error at once.
    Fail(FailReason),
}

/// Why a request failed without reaching an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// The owner stayed unreachable past the reconnect bound.
    Unreachable,
    /// The old owner was lost while its DTL was out of sync: acknowledged writes may be lost.
    DtlOutOfSync,
}

impl FailReason {
    pub fn describe(self) -> &'static str {
        match self {
            FailReason::Unreachable => "the volume's owner is unreachable (reconnect bound passed)",
            FailReason::DtlOutOfSync => {
                "the volume's owner was lost while its DTL was out of sync: \
                 acknowledged writes since the last flush may be lost"
            }
        }
    }
}

/// Connection state as the state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Connected,
    /// Lost at `since`; requests wait.
    Reconnecting {
        since: Instant,
    },
    /// The bound passed; requests fail until a connection succeeds.
    Failed,
}

/// The resubmission state machine of one remote volume; see the module docs.
#[derive(Debug, Clone)]
pub struct Recovery {
    link: Link,
    read_only: bool,
    /// What the current (or, while reconnecting, the lost) owner last said about its DTL.
    dtl_in_sync: bool,
    /// Mutating requests (flushes aside) acknowledged so far, and how many of the first of them a
    /// completed flush covers: those in between may be lost if the owner dies out of sync.
    acked: u64,
    flushed: u64,
    /// The next flush must fail (see the module docs).
    poison_flush: bool,
    /// The current connection's owner said `Released`: its loss is safe.
    released: bool,
}

impl Recovery {
    /// Just connected (handshake done) to an owner whose `Welcome` said `dtl_in_sync`.
    pub fn new(read_only: bool, dtl_in_sync: bool) -> Self {
        Self {
            link: Link::Connected,
            read_only,
            dtl_in_sync,
            acked: 0,
            flushed: 0,
            poison_flush: false,
            released: false,
        }
    }

    pub fn link(&self) -> Link {
        self.link
    }

    pub fn dtl_in_sync(&self) -> bool {
        self.dtl_in_sync
    }

    /// A successful reply of a `kind` request arrived, carrying the owner's DTL state (`None`
    /// for replies without it). A flush's reply is reported with [`Recovery::on_flushed`] too.
    pub fn on_reply(&mut self, kind: Kind, dtl_in_sync: Option<bool>) {
        if let Some(in_sync) = dtl_in_sync {
            self.dtl_in_sync = in_sync;
        }
        if kind.mutating() && kind != Kind::Flush {
            self.acked += 1;
        }
    }

    /// What a flush submitted now covers: pass it to [`Recovery::on_flushed`] when it succeeds.
    /// (A write acknowledged while the flush is in flight is not covered by it.)
    pub fn flush_mark(&self) -> u64 {
        self.acked
    }

    /// A flush submitted at `mark` succeeded.
    pub fn on_flushed(&mut self, mark: u64) {
        self.flushed = self.flushed.max(mark);
    }

    /// The owner refused a request with `Released`: it handed the volume over cleanly, so
    /// everything acknowledged so far (and whatever it still acknowledges on that connection)
    /// is on the backend, and losing that connection loses nothing.
    pub fn on_released(&mut self) {
        self.released = true;
        self.flushed = self.acked;
    }

    /// The connection died at `now` with `inflight` requests (id, kind) sent or waiting to be
    /// sent on it. Returns each one's fate, in the order given.
    pub fn on_lost<I>(&mut self, now: Instant, inflight: I) -> Vec<(u64, Decision)>
    where
        I: IntoIterator<Item = (u64, Kind)>,
    {
        if self.link == Link::Connected {
            self.link = Link::Reconnecting { since: now };
        }
        let safe = self.dtl_in_sync || self.read_only || self.released;
        if std::mem::take(&mut self.released) {
            self.flushed = self.acked;
        }
        let mut failed_flush = false;
        let decisions = inflight
            .into_iter()
            .map(|(id, kind)| {
                if safe || !kind.mutating() {
                    (id, Decision::Resend)
                } else {
                    failed_flush |= kind == Kind::Flush;
                    (id, Decision::Fail)
                }
            })
            .collect();
        if !safe && self.acked > self.flushed && !failed_flush {
            self.poison_flush = true;
        }
        if !safe {
            // What was acknowledged is now either lost or reported (a failed flush).
            self.flushed = self.acked;
        }
        decisions
    }

    /// A connection (handshake done) to an owner whose `Welcome` said `dtl_in_sync`.
    pub fn on_connected(&mut self, dtl_in_sync: bool) {
        self.link = Link::Connected;
        self.dtl_in_sync = dtl_in_sync;
        self.released = false;
    }

    /// Decide about a request the guest submits now.
    pub fn admit(&mut self, kind: Kind) -> Admit {
        if kind == Kind::Flush && self.poison_flush {
            self.poison_flush = false;
            return Admit::Fail(FailReason::DtlOutOfSync);
        }
        match self.link {
            Link::Connected => Admit::Send,
            Link::Reconnecting { .. } => Admit::Wait,
            Link::Failed => Admit::Fail(FailReason::Unreachable),
        }
    }

    /// When waiting requests fail if no connection succeeds before.
    pub fn deadline(&self, bound: Duration) -> Option<Instant> {
        match self.link {
            Link::Reconnecting { since } => Some(since + bound),
            _ => None,
        }
    }

    /// The clock says `now`. True when the bound just passed: the caller fails every waiting
    /// request with [`FailReason::Unreachable`].
    pub fn on_tick(&mut self, now: Instant, bound: Duration) -> bool {
        match self.deadline(bound) {
            Some(deadline) if now >= deadline => {
                self.link = Link::Failed;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Kind; 6] = [
        Kind::Read,
        Kind::Write,
        Kind::Trim,
        Kind::WriteZeroes,
        Kind::Flush,
        Kind::BlockStatus,
    ];

    fn inflight() -> Vec<(u64, Kind)> {
        ALL.iter()
            .enumerate()
            .map(|(i, k)| (i as u64 + 1, *k))
            .collect()
    }

    #[test]
    fn in_sync_resends_everything() {
        let mut r = Recovery::new(false, true);
        r.on_reply(Kind::Write, Some(true));
        let t0 = Instant::now();
        let d = r.on_lost(t0, inflight());
        assert!(d.iter().all(|(_, d)| *d == Decision::Resend), "{d:?}");
        assert_eq!(
            d.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(r.link(), Link::Reconnecting { since: t0 });
        assert_eq!(r.admit(Kind::Write), Admit::Wait);
        r.on_connected(true);
        assert_eq!(
            r.admit(Kind::Flush),
            Admit::Send,
            "nothing was lost: flush works"
        );
    }

    #[test]
    fn out_of_sync_fails_mutating_requests_and_resends_reads() {
        let mut r = Recovery::new(false, true);
        r.on_reply(Kind::Write, Some(false));
        let d = r.on_lost(Instant::now(), inflight());
        for (id, decision) in d {
            let kind = ALL[id as usize - 1];
            let want = if kind.mutating() {
                Decision::Fail
            } else {
                Decision::Resend
            };
            assert_eq!(decision, want, "{kind:?}");
        }
    }

    #[test]
    fn last_reply_decides_not_the_welcome() {
        let mut r = Recovery::new(false, false);
        r.on_reply(Kind::Read, Some(true));
        let d = r.on_lost(Instant::now(), [(1, Kind::Write)]);
        assert_eq!(d, [(1, Decision::Resend)]);

        let mut r = Recovery::new(false, true);
        r.on_reply(Kind::Read, Some(false));
        // A reply without a DTL state (block status) changes nothing.
        r.on_reply(Kind::BlockStatus, None);
        let d = r.on_lost(Instant::now(), [(1, Kind::Write)]);
        assert_eq!(d, [(1, Decision::Fail)]);
    }

    #[test]
    fn read_only_volumes_resend_everything() {
        let mut r = Recovery::new(true, false);
        let d = r.on_lost(Instant::now(), inflight());
        assert!(d.iter().all(|(_, d)| *d == Decision::Resend));
    }

    #[test]
    fn acknowledged_unflushed_writes_lost_out_of_sync_fail_the_next_flush() {
        let mut r = Recovery::new(false, true);
        r.on_reply(Kind::Write, Some(false));
        let d = r.on_lost(Instant::now(), [(9, Kind::Read)]);
        assert_eq!(d, [(9, Decision::Resend)]);
        r.on_connected(true);
        assert_eq!(r.admit(Kind::Write), Admit::Send, "writes go on");
        assert_eq!(r.admit(Kind::Flush), Admit::Fail(FailReason::DtlOutOfSync));
        assert_eq!(r.admit(Kind::Flush), Admit::Send, "only once");
    }

    #[test]
    fn a_clean_hand_off_loses_nothing_so_the_next_flush_works() {
        let mut r = Recovery::new(false, false);
        r.on_reply(Kind::Write, Some(false));
        r.on_released();
        // A write the old owner still acknowledged after its refusal is on the backend too.
        r.on_reply(Kind::Write, Some(false));
        let d = r.on_lost(Instant::now(), [(7, Kind::Write), (8, Kind::Flush)]);
        assert_eq!(d, [(7, Decision::Resend), (8, Decision::Resend)]);
        r.on_connected(false);
        assert_eq!(r.admit(Kind::Flush), Admit::Send);
        // The promise was that connection's only: the next owner's loss out of sync is not safe.
        r.on_reply(Kind::Write, Some(false));
        let d = r.on_lost(Instant::now(), [(9, Kind::Write)]);
        assert_eq!(d, [(9, Decision::Fail)]);
        r.on_connected(false);
        assert_eq!(r.admit(Kind::Flush), Admit::Fail(FailReason::DtlOutOfSync));
    }

    #[test]
    fn a_failed_inflight_flush_already_tells_the_guest() {
        let mut r = Recovery::new(false, true);
        r.on_reply(Kind::Write, Some(false));
        let d = r.on_lost(Instant::now(), [(1, Kind::Flush)]);
        assert_eq!(d, [(1, Decision::Fail)]);
        r.on_connected(true);
        assert_eq!(r.admit(Kind::Flush), Admit::Send);
    }

    #[test]
    fn flushed_writes_are_not_at_risk() {
        let mut r = Recovery::new(false, true);
        r.on_reply(Kind::Write, Some(false));
        let mark = r.flush_mark();
        r.on_reply(Kind::Flush, Some(false));
        r.on_flushed(mark);
        r.on_lost(Instant::now(), []);
        r.on_connected(true);
        assert_eq!(r.admit(Kind::Flush), Admit::Send);
    }

    #[test]
    fn a_write_acknowledged_while_a_flush_was_in_flight_is_not_covered_by_it() {
        let mut r = Recovery::new(false, true);
        r.on_reply(Kind::Write, Some(false));
        let mark = r.flush_mark();
        r.on_reply(Kind::Write, Some(false));
        r.on_reply(Kind::Flush, Some(false));
        r.on_flushed(mark);
        r.on_lost(Instant::now(), []);
        r.on_connected(true);
        assert_eq!(r.admit(Kind::Flush), Admit::Fail(FailReason::DtlOutOfSync));
    }

    #[test]
    fn the_bound_fails_waiting_requests_then_fails_fast_until_connected() {
        let bound = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut r = Recovery::new(false, true);
        r.on_lost(t0, []);
        assert_eq!(r.deadline(bound), Some(t0 + bound));
        assert!(!r.on_tick(t0 + bound - Duration::from_millis(1), bound));
        assert_eq!(r.admit(Kind::Read), Admit::Wait);
        assert!(r.on_tick(t0 + bound, bound));
        assert_eq!(r.link(), Link::Failed);
        assert!(!r.on_tick(t0 + bound * 2, bound), "reported once");
        assert_eq!(r.deadline(bound), None);
        assert_eq!(r.admit(Kind::Read), Admit::Fail(FailReason::Unreachable));
        // A second loss while failed does not restart the clock: still failing fast.
        r.on_lost(t0 + bound * 3, []);
        assert_eq!(r.link(), Link::Failed);
        r.on_connected(true);
        assert_eq!(r.admit(Kind::Read), Admit::Send);
    }

    #[test]
    fn a_second_loss_is_timed_from_itself() {
        let bound = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut r = Recovery::new(false, true);
        r.on_lost(t0, []);
        r.on_connected(true);
        let t1 = t0 + Duration::from_secs(5);
        r.on_lost(t1, []);
        assert_eq!(r.deadline(bound), Some(t1 + bound));
        // A loss reported twice (reader and writer both notice) keeps the first time.
        r.on_lost(t1 + Duration::from_millis(500), []);
        assert_eq!(r.deadline(bound), Some(t1 + bound));
    }
}

//! The state one remote target shares between the frontends' calls, its connection's reader and
//! writer tasks and its supervisor: the in-flight table, the resubmission state machine and the
//! counters.
//!
//! Every request gets an id (increasing: id order is issue order) and an entry in the table
//! holding all that is needed to send it again (a write's data as [`Bytes`], shared, not copied)
//! and the sender completing the frontend's future. The entry leaves the table when the request
//! completes, fails or the target closes. One mutex guards the table and the state machine; it is
//! held only for map operations and channel sends (never across I/O or an await), and sending a
//! frame to the writer while holding it is what keeps frames in id order on the wire.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::send::{FrameSender, Send};
use super::{ConnState, RemoteConfig, LATENCY_BUCKETS_US};
use crate::remote::proto::{AllowList, ErrorCode, Frame, Message};
use crate::remote::resubmit::{Admit, Decision, FailReason, Kind, Link, Recovery};
use crate::remote::{Endpoint, Resolver};
use crate::target::{Extent, TargetError};

/// A request, without the owner tag (added when it is sent, so a resend carries the new one).
#[derive(Debug, Clone)]
pub(super) enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        fua: bool,
        data: Bytes,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        allocate: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u64,
    },
}

impl Op {
    pub(super) fn kind(&self) -> Kind {
        match self {
            Op::Read { .. } => Kind::Read,
            Op::Write { .. } => Kind::Write,
            Op::Flush => Kind::Flush,
            Op::Trim { .. } => Kind::Trim,
            Op::WriteZeroes { .. } => Kind::WriteZeroes,
            Op::BlockStatus { .. } => Kind::BlockStatus,
        }
    }

    /// The byte range the request covers (`(0, 0)` for a flush).
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Read { offset, len } => (*offset, u64::from(*len)),
            Op::Write { offset, data, .. } => (*offset, data.len() as u64),
            Op::Flush => (0, 0),
            Op::Trim { offset, len }
            | Op::WriteZeroes { offset, len, .. }
            | Op::BlockStatus { offset, len } => (*offset, *len),
        }
    }

    fn message(&self, tag: u64) -> Message {
        match self.clone() {
            Op::Read { offset, len } => Message::Read { tag, offset, len },
            Op::Write { offset, fua, data } => Message::Write {
                tag,
                offset,
                fua,
                data,
            },
            Op::Flush => Message::Flush { tag },
            Op::Trim { offset, len } => Message::Trim { tag, offset, len },
            Op::WriteZeroes {
                offset,
                len,
                allocate,
                fua,
            } => Message::WriteZeroes {
                tag,
                offset,
                len,
                allocate,
                fua,
            },
            Op::BlockStatus { offset, len } => Message::BlockStatus { tag, offset, len },
        }
    }
}

/// A successful answer.
#[derive(Debug)]
pub(super) enum Reply {
    Done,
    Data(Bytes),
    Extents(Vec<Extent>),
}

pub(super) type Outcome = Result<Reply, TargetError>;

struct Pending {
    op: Op,
    /// Generation of the connection it was sent on; `None` while it waits for one.
    sent_on: Option<u64>,
    /// For a flush: the acknowledged writes it covers (`Recovery::flush_mark`).
    mark: u64,
    started: Instant,
    done: oneshot::Sender<Outcome>,
}

/// The connection requests are sent on.
pub(super) struct Conn {
    pub(super) generation: u64,
    pub(super) tag: u64,
    pub(super) frames: Arc<FrameSender>,
    /// Cancelled when this connection is given up: stops its reader.
    pub(super) stop: CancellationToken,
    /// The owner refused a request as no longer its own (moved, fenced, stopping): nothing more
    /// is sent on this connection, and it is given up once every request sent on it has its
    /// answer. Each answer is certain (done, or refused and so not executed), so only requests
    /// whose fate is really unknown go through the resubmission rule.
    pub(super) draining: bool,
}

pub(super) struct Inner {
    pub(super) recovery: Recovery,
    /// The volume's NBD allow list as the owner last sent it (`Access`).
    pub(super) access: AllowList,
    pub(super) conn: Option<Conn>,
    pub(super) owner: Option<Endpoint>,
    pub(super) generations: u64,
    pub(super) closed: bool,
    next_id: u64,
    table: BTreeMap<u64, Pending>,
}

/// Counters for [`super::RemoteStats`].
#[derive(Default)]
pub(super) struct Counters {
    pub(super) reconnects: AtomicU64,
    pub(super) resubmitted: AtomicU64,
    pub(super) completed: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub(super) latency_sum_us: AtomicU64,
}

impl Counters {
    fn record(&self, started: Instant, ok: bool) {
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.completed.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub(super) struct Shared {
    pub(super) volume: String,
    pub(super) config: RemoteConfig,
    pub(super) resolver: std::sync::Arc<dyn Resolver>,
    pub(super) size: u64,
    pub(super) read_only: bool,
    pub(super) inner: Mutex<Inner>,
    pub(super) counters: Counters,
    /// Wakes the supervisor: a connection was lost.
    pub(super) lost: Notify,
    /// Cancelled by `close()`: every task stops.
    pub(super) shutdown: CancellationToken,
}

thread_local! {
    /// The target this thread plugged (`BlockTarget::plug`), by the address of its shared state;
    /// 0: none. Per thread because a plug covers the requests of one frontend pass, while other
    /// threads (another queue, an NBD connection) keep sending theirs at once.
    static PLUGGED: Cell<usize> = const { Cell::new(0) };
}

fn unreachable_error(volume: &str, reason: FailReason) -> TargetError {
    TargetError::Io(format!("volume {volume}: {}", reason.describe()))
}

impl Shared {
    pub(super) fn new(
        volume: &str,
        config: RemoteConfig,
        resolver: std::sync::Arc<dyn Resolver>,
        size: u64,
        read_only: bool,
        dtl_in_sync: bool,
        access: AllowList,
    ) -> Self {
        Self {
            volume: volume.to_owned(),
            config,
            resolver,
            size,
            read_only,
            inner: Mutex::new(Inner {
                recovery: Recovery::new(read_only, dtl_in_sync),
                access,
                conn: None,
                owner: None,
                generations: 0,
                closed: false,
                next_id: 1,
                table: BTreeMap::new(),
            }),
            counters: Counters::default(),
            lost: Notify::new(),
            shutdown: CancellationToken::new(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn state(&self) -> ConnState {
        let inner = self.lock();
        if inner.closed {
            return ConnState::Closed;
        }
        match inner.recovery.link() {
            Link::Connected => ConnState::Connected,
            Link::Reconnecting { .. } => ConnState::Reconnecting,
            Link::Failed => ConnState::Failed,
        }
    }

    pub(super) fn inflight(&self) -> usize {
        self.lock().table.len()
    }

    /// Queue `op`; the receiver yields its outcome. On a plugged thread its frame is not sent
    /// until [`Shared::unplug`] or [`Shared::flush`].
    pub(super) fn submit(&self, op: Op) -> oneshot::Receiver<Outcome> {
        let hold = self.held();
        let (done, rx) = oneshot::channel();
        let started = Instant::now();
        let mut inner = self.lock();
        if inner.closed {
            drop(inner);
            let _ = done.send(Err(TargetError::Shutdown));
            return rx;
        }
        let admit = inner.recovery.admit(op.kind());
        let mark = inner.recovery.flush_mark();
        let id = inner.next_id;
        inner.next_id += 1;
        match admit {
            Admit::Fail(reason) => {
                drop(inner);
                self.counters.record(started, false);
                let _ = done.send(Err(unreachable_error(&self.volume, reason)));
                return rx;
            }
            Admit::Wait => {}
            Admit::Send => {
                if let Some(conn) = inner.conn.as_ref().filter(|c| !c.draining) {
                    let frame = Frame::new(id, op.message(conn.tag));
                    // Held on a plugged thread; alone in flight, written from this thread if the
                    // writer is idle; else left to the writer. A failed send is reported by the
                    // writer, and the loss handling resends it.
                    let how = if hold {
                        Send::Hold
                    } else if inner.table.is_empty() {
                        Send::Direct
                    } else {
                        Send::Queue
                    };
                    conn.frames.send(&frame, how);
                    let sent_on = Some(conn.generation);
                    inner.table.insert(
                        id,
                        Pending {
                            op,
                            sent_on,
                            mark,
                            started,
                            done,
                        },
                    );
                    return rx;
                }
            }
        }
        inner.table.insert(
            id,
            Pending {
                op,
                sent_on: None,
                mark,
                started,
                done,
            },
        );
        rx
    }

    /// Hold this thread's frames from now on (`BlockTarget::plug`).
    pub(super) fn plug(&self) {
        PLUGGED.with(|p| p.set(self.key()));
    }

    /// Send what this thread held, and send at once again (`BlockTarget::unplug`).
    pub(super) fn unplug(&self) {
        PLUGGED.with(|p| {
            if p.get() == self.key() {
                p.set(0);
            }
        });
        self.flush();
    }

    /// Whether this thread plugged this target: its frames wait for `unplug`.
    pub(super) fn held(&self) -> bool {
        PLUGGED.with(Cell::get) == self.key()
    }

    fn key(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// Send the frames held by [`Shared::submit`] on a plugged thread.
    pub(super) fn flush(&self) {
        let frames = self.lock().conn.as_ref().map(|c| Arc::clone(&c.frames));
        if let Some(frames) = frames {
            frames.flush();
        }
    }

    /// A reply to request `id` arrived on connection `generation`.
    pub(super) fn reply(&self, generation: u64, id: u64, message: Message) {
        let mut inner = self.lock();
        if inner.conn.as_ref().map(|c| c.generation) != Some(generation) {
            return;
        }
        let Some(pending) = inner.table.get(&id) else {
            debug!(
                volume = self.volume,
                id, "reply for an unknown request; ignored"
            );
            return;
        };
        if pending.sent_on != Some(generation) {
            return;
        }
        let kind = pending.op.kind();
        let outcome = match message {
            Message::Error { code, message } if code.means_owner_changed() => {
                // Not executed: the owner moved. The request waits for the next owner whatever
                // the DTL says (it never ran); the others sent on this connection still get
                // their answers before it is given up (`draining`).
                if let Some(p) = inner.table.get_mut(&id) {
                    p.sent_on = None;
                }
                if code == ErrorCode::Released {
                    inner.recovery.on_released();
                }
                let first = inner
                    .conn
                    .as_mut()
                    .is_some_and(|c| !std::mem::replace(&mut c.draining, true));
                let drained = !inner.table.values().any(|p| p.sent_on == Some(generation));
                drop(inner);
                if first {
                    warn!(
                        volume = self.volume,
                        id,
                        ?code,
                        "owner refused a request: {message}; draining the connection"
                    );
                }
                if drained {
                    self.connection_lost(
                        generation,
                        &format!("owner refused a request: {message}"),
                    );
                }
                return;
            }
            Message::Error { code, message } => Err(match code {
                ErrorCode::OutOfRange => {
                    let (offset, len) = pending.op.range();
                    TargetError::OutOfRange {
                        offset,
                        len,
                        size: self.size,
                    }
                }
                ErrorCode::ReadOnly => TargetError::ReadOnly,
                _ => TargetError::Io(format!("volume {}: {message}", self.volume)),
            }),
            Message::Done { dtl_in_sync } if kind != Kind::Read && kind != Kind::BlockStatus => {
                let mark = pending.mark;
                inner.recovery.on_reply(kind, Some(dtl_in_sync));
                if kind == Kind::Flush {
                    inner.recovery.on_flushed(mark);
                }
                Ok(Reply::Done)
            }
            Message::Data { dtl_in_sync, data } => match pending.op {
                Op::Read { len, .. } if data.len() == len as usize => {
                    inner.recovery.on_reply(kind, Some(dtl_in_sync));
                    Ok(Reply::Data(data))
                }
                _ => Err(TargetError::Io(format!(
                    "volume {}: protocol error: unexpected {} bytes of data for request {id}",
                    self.volume,
                    data.len()
                ))),
            },
            Message::Extents { extents } if kind == Kind::BlockStatus => {
                inner.recovery.on_reply(kind, None);
                Ok(Reply::Extents(extents))
            }
            other => Err(TargetError::Io(format!(
                "volume {}: protocol error: {} is no answer to request {id}",
                self.volume,
                other.name()
            ))),
        };
        let Some(pending) = inner.table.remove(&id) else {
            return;
        };
        let drained = inner.conn.as_ref().is_some_and(|c| c.draining)
            && !inner.table.values().any(|p| p.sent_on == Some(generation));
        drop(inner);
        self.counters.record(pending.started, outcome.is_ok());
        let _ = pending.done.send(outcome);
        if drained {
            self.connection_lost(
                generation,
                "the owner handed the volume over; connection drained",
            );
        }
    }

    /// Connection `generation` is dead (EOF, I/O or protocol error, owner refused): decide the
    /// fate of what was in flight on it and wake the supervisor. Reported by whichever task
    /// noticed first; later reports of the same connection are ignored.
    pub(super) fn connection_lost(&self, generation: u64, why: &str) {
        let mut inner = self.lock();
        match &inner.conn {
            Some(conn) if conn.generation == generation => conn.stop.cancel(),
            _ => return,
        }
        inner.conn = None;
        if inner.closed {
            return;
        }
        warn!(
            volume = self.volume,
            generation, "connection to the owner lost: {why}"
        );
        let sent: Vec<(u64, Kind)> = inner
            .table
            .iter()
            .filter(|(_, p)| p.sent_on.is_some())
            .map(|(id, p)| (*id, p.op.kind()))
            .collect();
        let decisions = inner.recovery.on_lost(Instant::now(), sent);
        let mut failed = Vec::new();
        for (id, decision) in decisions {
            match decision {
                Decision::Resend => {
                    if let Some(p) = inner.table.get_mut(&id) {
                        p.sent_on = None;
                    }
                }
                Decision::Fail => failed.extend(inner.table.remove(&id)),
            }
        }
        drop(inner);
        if !failed.is_empty() {
            warn!(
                volume = self.volume,
                count = failed.len(),
                "failing unacknowledged writes: the owner's DTL was out of sync"
            );
        }
        for p in failed {
            self.counters.record(p.started, false);
            let _ = p.done.send(Err(unreachable_error(
                &self.volume,
                FailReason::DtlOutOfSync,
            )));
        }
        self.lost.notify_one();
    }

    /// The owner of connection `generation` said, unasked (id 0), that it handed the volume over
    /// cleanly: it is stopping, and nothing it acknowledged can be lost with the connection.
    pub(super) fn released(&self, generation: u64) {
        let mut inner = self.lock();
        if inner.conn.as_ref().map(|c| c.generation) == Some(generation) {
            inner.recovery.on_released();
        }
    }

    /// The owner sent the volume's allow list on connection `generation` (a connection that
    /// was replaced meanwhile is not listened to: its successor's handshake carried the list).
    pub(super) fn set_access(&self, generation: u64, access: AllowList) {
        let mut inner = self.lock();
        if inner.conn.as_ref().map(|c| c.generation) != Some(generation) {
            return;
        }
        if inner.access != access {
            info!(
                volume = self.volume,
                subjects = access.subjects.len(),
                networks = access.networks.len(),
                "the owner changed the volume's allow list"
            );
            inner.access = access;
        }
    }

    /// A new connection is up: send everything waiting, in id order, under its tag.
    pub(super) fn connected(
        &self,
        conn: Conn,
        owner: Endpoint,
        dtl_in_sync: bool,
        access: AllowList,
    ) {
        let mut inner = self.lock();
        if inner.closed {
            conn.stop.cancel();
            return;
        }
        inner.recovery.on_connected(dtl_in_sync);
        inner.access = access;
        let mut resent = 0u64;
        let Inner { table, .. } = &mut *inner;
        for (id, p) in table.iter_mut().filter(|(_, p)| p.sent_on.is_none()) {
            conn.frames
                .send(&Frame::new(*id, p.op.message(conn.tag)), Send::Queue);
            p.sent_on = Some(conn.generation);
            resent += 1;
        }
        inner.owner = Some(owner);
        inner.conn = Some(conn);
        drop(inner);
        self.counters
            .resubmitted
            .fetch_add(resent, Ordering::Relaxed);
    }

    /// Check the reconnect bound; fail everything waiting once it passed.
    pub(super) fn tick(&self) {
        let mut inner = self.lock();
        if !inner
            .recovery
            .on_tick(Instant::now(), self.config.reconnect_bound)
        {
            return;
        }
        let waiting: Vec<u64> = inner
            .table
            .iter()
            .filter(|(_, p)| p.sent_on.is_none())
            .map(|(id, _)| *id)
            .collect();
        let failed: Vec<Pending> = waiting
            .iter()
            .filter_map(|id| inner.table.remove(id))
            .collect();
        drop(inner);
        warn!(volume = self.volume, count = failed.len(), bound = ?self.config.reconnect_bound,
            "owner unreachable past the reconnect bound: failing requests");
        for p in failed {
            self.counters.record(p.started, false);
            let _ = p.done.send(Err(unreachable_error(
                &self.volume,
                FailReason::Unreachable,
            )));
        }
    }

    /// `close()`: fail everything with `Shutdown` and stop the tasks.
    pub(super) fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        if let Some(conn) = inner.conn.take() {
            conn.stop.cancel();
        }
        let table = std::mem::take(&mut inner.table);
        drop(inner);
        self.shutdown.cancel();
        for (_, p) in table {
            self.counters.record(p.started, false);
            let _ = p.done.send(Err(TargetError::Shutdown));
        }
    }
}

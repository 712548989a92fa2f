//! Client side of the edge protocol: [`RemoteTarget`], a [`BlockTarget`] whose operations are
//! requests to the node that owns the volume.
//!
//! Layering: `inflight` holds the state shared by everyone (the table of requests in flight, the
//! resubmission state machine of `remote::resubmit`, counters); `conn` runs the connection
//! (reader) and the supervisor that replaces it after a failure; `send` queues and writes its
//! frames (from the caller's thread when nothing else is in flight); this module maps the
//! `BlockTarget` contract onto requests.
//!
//! The target is *asynchronous* in the sense of the contract (`target.rs`): `try_read` always
//! says `WouldBlock` and `read_async`, `flush_async`, `block_status_async` hand out futures;
//! writes, trims and write-zeroes (FUA included: `fua_inline`) are queued at once and return their
//! acknowledgement as `WriteAck::pending`, which completes when the owner answered. So the
//! frontends never block a reactor or queue thread on the network. The blocking `read`, `flush`
//! and `block_status` wait for the same futures (only frontends without a reactor call them, from
//! threads where blocking is allowed).
//!
//! Ordering: a request is sent on the connection in the order `write`/`read`/... were called (one
//! queue, filled under the table's lock), and the server makes requests take effect in arrival
//! order (a large write it runs off its connection's task holds back whatever touches its range:
//! `server::device_writes`), so a read issued after a write returned sees that write, as the
//! contract requires.

mod conn;
mod inflight;
mod send;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use self::inflight::{Op, Outcome, Reply, Shared};
use super::proto::{AllowList, ErrorCode, ProtoError, MAX_FRAME_PAYLOAD};
use super::Resolver;
use crate::target::{
    BlockTarget, Extent, ExtentsFuture, PendingAck, ReadAttempt, ReadFuture, TargetError, WriteAck,
};

/// Largest read sent as one request; a larger `read_async` is split.
const MAX_READ: usize = 16 << 20;
const _: () = assert!(MAX_READ + 64 <= MAX_FRAME_PAYLOAD);

/// Tunables of a remote target.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// This edge's name, sent in `Hello` (server logs and metrics).
    pub client_name: String,
    /// How long the guest may see a pause while the owner is unreachable before in-flight and new
    /// requests fail with an I/O error.
    pub reconnect_bound: Duration,
    /// Bound on one TCP connect + handshake attempt.
    pub connect_timeout: Duration,
    /// How long the owner may stay silent at the TCP level (unacknowledged data, or no answer to
    /// keepalive probes) before the connection counts as dead: catches an owner that vanished
    /// without closing its sockets (power loss, network partition).
    pub liveness: Duration,
    /// Mutual TLS with the owners' edge servers; `None`: plain TCP.
    pub tls: Option<vstor_net::PeerTls>,
    /// First and longest pause between two reconnection attempts while the owner cannot be
    /// reached (doubling from the first). A notice from
    /// [`Resolver::watch`](super::Resolver::watch) cuts a pause short, so these bound the wait
    /// only when the watch missed the change or the resolver has none.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            client_name: "edge".into(),
            reconnect_bound: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            liveness: Duration::from_secs(4),
            tls: None,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(250),
        }
    }
}

/// Why a remote target could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot find the owner of volume {volume}: {reason}")]
    Resolve { volume: String, reason: String },
    #[error("cannot connect to {addr} for volume {volume}: {source}")]
    Connect {
        volume: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot open volume {volume} on {addr}: {source}")]
    Tls {
        volume: String,
        addr: String,
        source: vstor_net::NetError,
    },
    #[error("node {addr} refused volume {volume} ({code:?}): {message}")]
    Refused {
        volume: String,
        addr: String,
        code: ErrorCode,
        message: String,
    },
    #[error("edge protocol error with {addr} for volume {volume}: {source}")]
    Proto {
        volume: String,
        addr: String,
        source: ProtoError,
    },
    #[error("timed out after {after:?} opening volume {volume} on {addr}")]
    Timeout {
        volume: String,
        addr: String,
        after: Duration,
    },
}

/// Connection state of a remote target, as `vstor edge list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Connected,
    /// The owner is being looked up again / reconnected; requests wait.
    Reconnecting,
    /// The reconnect bound passed: requests fail with EIO until a connection succeeds again.
    Failed,
    /// Closed by `close()` (detached).
    Closed,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Connected => "connected",
            ConnState::Reconnecting => "reconnecting",
            ConnState::Failed => "failed",
            ConnState::Closed => "closed",
        }
    }
}

/// Upper bounds (microseconds) of the latency histogram buckets in [`RemoteStats`]; a last,
/// implicit bucket is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 50_000, 100_000, 1_000_000, 10_000_000,
];

/// A snapshot of a remote target's counters, for `vstor edge list` and `/metrics`.
#[derive(Debug, Clone)]
pub struct RemoteStats {
    pub volume: String,
    /// Owner node and address last resolved, and the tag it holds the volume under.
    pub owner: Option<String>,
    pub addr: Option<String>,
    pub tag: u64,
    pub state: ConnState,
    pub size: u64,
    pub read_only: bool,
    pub dtl_in_sync: bool,
    /// Successful reconnections after the first connection.
    pub reconnects: u64,
    /// Requests sent (or waiting to be sent) and not yet answered.
    pub inflight: usize,
    /// Requests resent to a new connection after a reconnect.
    pub resubmitted: u64,
    /// Requests completed, and of them failed.
    pub completed: u64,
    pub failed: u64,
    /// Per-bucket counts (not cumulative) for [`LATENCY_BUCKETS_US`], plus the +Inf bucket.
    pub latency_buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    /// Sum of all completed requests' latencies, microseconds.
    pub latency_sum_us: u64,
}

/// A volume served by another node, seen as a [`BlockTarget`].
pub struct RemoteTarget {
    shared: Arc<Shared>,
}

impl RemoteTarget {
    /// Resolve the owner, connect and handshake before returning, so an attach fails fast with a
    /// clear error (no such volume, no owner, refused). Must be called inside a tokio runtime;
    /// the target's connection tasks run on it.
    pub async fn connect(
        volume: &str,
        resolver: Arc<dyn Resolver>,
        config: RemoteConfig,
    ) -> Result<Arc<Self>, RemoteError> {
        let welcomed = conn::open(volume, &resolver, &config).await?;
        let shared = Arc::new(Shared::new(
            volume,
            config,
            resolver,
            welcomed.size,
            welcomed.read_only,
            welcomed.dtl_in_sync,
            welcomed.access.clone(),
        ));
        conn::install(&shared, welcomed);
        tokio::spawn(conn::supervise(Arc::clone(&shared)));
        Ok(Arc::new(Self { shared }))
    }

    pub fn stats(&self) -> RemoteStats {
        let s = &self.shared;
        let (owner, addr, tag, dtl_in_sync) = {
            let inner = s.lock();
            let owner = inner.owner.as_ref();
            (
                owner.map(|o| o.node.clone()),
                owner.map(|o| o.addr.clone()),
                owner.map_or(0, |o| o.tag),
                inner.recovery.dtl_in_sync(),
            )
        };
        let c = &s.counters;
        let mut latency_buckets = [0u64; LATENCY_BUCKETS_US.len() + 1];
        for (out, bucket) in latency_buckets.iter_mut().zip(c.latency.iter()) {
            *out = bucket.load(Ordering::Relaxed);
        }
        RemoteStats {
            volume: s.volume.clone(),
            owner,
            addr,
            tag,
            state: s.state(),
            size: s.size,
            read_only: s.read_only,
            dtl_in_sync,
            reconnects: c.reconnects.load(Ordering::Relaxed),
            inflight: s.inflight(),
            resubmitted: c.resubmitted.load(Ordering::Relaxed),
            completed: c.completed.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            latency_buckets,
            latency_sum_us: c.latency_sum_us.load(Ordering::Relaxed),
        }
    }

    /// The volume's NBD allow list as its owner last sent it: from the handshake of every
    /// (re)connection, and pushed by the owner when it changes there. The frontends enforce it
    /// through the edge's export registry (`ExportRegistry::allows`).
    pub fn access(&self) -> AllowList {
        self.shared.lock().access.clone()
    }

    /// Stop: fail what is in flight with `Shutdown` and close the connection.
    pub async fn close(&self) {
        self.shared.close();
    }

    /// Wait on this thread for a request just submitted. A plugged thread's frames are sent
    /// first: waiting for an answer to a request still held back would never end.
    fn block_on<T>(&self, request: impl std::future::Future<Output = T>) -> T {
        if self.shared.held() {
            self.shared.flush();
        }
        futures::executor::block_on(request)
    }

    fn check(&self, offset: u64, len: u64, modifies: bool) -> Result<(), TargetError> {
        if modifies && self.shared.read_only {
            return Err(TargetError::ReadOnly);
        }
        let size = self.shared.size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(TargetError::OutOfRange { offset, len, size }),
        }
    }

    /// Queue a request that answers `Done`; its acknowledgement is the pending future.
    fn mutate(&self, op: Op) -> WriteAck {
        let rx = self.shared.submit(op);
        let pending: PendingAck = Box::pin(async move { outcome(rx.await).map(|_| ()) });
        WriteAck {
            throttle: None,
            pending: Some(pending),
        }
    }

    fn read_future(&self, offset: u64, len: usize) -> ReadFuture {
        if len <= MAX_READ {
            let rx = self.shared.submit(Op::Read {
                offset,
                len: len as u32,
            });
            return Box::pin(async move {
                match outcome(rx.await)? {
                    Reply::Data(data) => Ok(data),
                    other => Err(TargetError::Io(format!("unexpected reply {other:?}"))),
                }
            });
        }
        // Split: requests are bounded by the frame size.
        let parts: Vec<ReadFuture> = (0..len)
            .step_by(MAX_READ)
            .map(|at| self.read_future(offset + at as u64, (len - at).min(MAX_READ)))
            .collect();
        Box::pin(async move {
            let mut data = bytes::BytesMut::with_capacity(len);
            for part in futures::future::join_all(parts).await {
                data.extend_from_slice(&part?);
            }
            Ok(data.freeze())
        })
    }
}

impl Drop for RemoteTarget {
    fn drop(&mut self) {
        // Stop the tasks (they hold the shared state, not the target).
        self.shared.close();
    }
}

/// A request's outcome; a dropped sender (the tasks are gone) means the target shut down.
fn outcome(
    received: Result<Outcome, tokio::sync::oneshot::error::RecvError>,
) -> Result<Reply, TargetError> {
    received.unwrap_or(Err(TargetError::Shutdown))
}

impl BlockTarget for RemoteTarget {
    fn size(&self) -> u64 {
        self.shared.size
    }

    fn read_only(&self) -> bool {
        self.shared.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        self.check(offset, buf.len() as u64, false)?;
        let data = self.block_on(self.read_future(offset, buf.len()))?;
        if data.len() != buf.len() {
            return Err(TargetError::Io(format!(
                "volume {}: read returned {} bytes, not {}",
                self.shared.volume,
                data.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadAttempt, TargetError> {
        self.check(offset, buf.len() as u64, false)?;
        Ok(ReadAttempt::WouldBlock)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<WriteAck, TargetError> {
        self.check(offset, data.len() as u64, true)?;
        Ok(self.mutate(Op::Write {
            offset,
            fua,
            data: Bytes::copy_from_slice(data),
        }))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<WriteAck, TargetError> {
        self.check(offset, len, true)?;
        Ok(self.mutate(Op::Trim { offset, len }))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        fua: bool,
    ) -> Result<WriteAck, TargetError> {
        self.check(offset, len, true)?;
        Ok(self.mutate(Op::WriteZeroes {
            offset,
            len,
            allocate,
            fua,
        }))
    }

    fn flush(&self) -> Result<(), TargetError> {
        self.block_on(acknowledged(self.mutate(Op::Flush)))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, TargetError> {
        self.block_on(self.extents(offset, len))
    }

    fn read_async(&self, offset: u64, len: usize) -> Option<ReadFuture> {
        if let Err(e) = self.check(offset, len as u64, false) {
            return Some(Box::pin(async move { Err(e) }));
        }
        Some(self.read_future(offset, len))
    }

    fn flush_async(&self) -> Option<PendingAck> {
        self.mutate(Op::Flush).pending
    }

    fn block_status_async(&self, offset: u64, len: u64) -> Option<ExtentsFuture> {
        Some(self.extents(offset, len))
    }

    fn fua_inline(&self) -> bool {
        true
    }

    fn plug(&self) {
        self.shared.plug();
    }

    fn unplug(&self) {
        self.shared.unplug();
    }
}

impl RemoteTarget {
    fn extents(&self, offset: u64, len: u64) -> ExtentsFuture {
        if let Err(e) = self.check(offset, len, false) {
            return Box::pin(async move { Err(e) });
        }
        let rx = self.shared.submit(Op::BlockStatus { offset, len });
        Box::pin(async move {
            match outcome(rx.await)? {
                Reply::Extents(extents) => Ok(extents),
                other => Err(TargetError::Io(format!("unexpected reply {other:?}"))),
            }
        })
    }
}

/// A write's acknowledgement as a future (`Ok` at once when nothing is pending).
async fn acknowledged(ack: WriteAck) -> Result<(), TargetError> {
    match ack.pending {
        Some(pending) => pending.await,
        None => Ok(()),
    }
}

//! Client side of the edge protocol: [`RemoteTarget`]. SKELETON: the public API is fixed; the
//! implementation is being written.

use std::sync::Arc;
use std::time::Duration;

use super::proto::{ErrorCode, ProtoError};
use super::Resolver;
use crate::target::{BlockTarget, Extent, TargetError, WriteAck};

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
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            client_name: "edge".into(),
            reconnect_bound: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
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
    _private: (),
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
        let _ = (volume, resolver, config);
        unimplemented!("remote target")
    }

    pub fn stats(&self) -> RemoteStats {
        unimplemented!("remote target")
    }

    /// Stop: fail what is in flight with `Shutdown` and close the connection.
    pub async fn close(&self) {
        unimplemented!("remote target")
    }
}

impl BlockTarget for RemoteTarget {
    fn size(&self) -> u64 {
        unimplemented!()
    }
    fn read_only(&self) -> bool {
        unimplemented!()
    }
    fn read(&self, _offset: u64, _buf: &mut [u8]) -> Result<(), TargetError> {
        unimplemented!()
    }
    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<WriteAck, TargetError> {
        unimplemented!()
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<WriteAck, TargetError> {
        unimplemented!()
    }
    fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _allocate: bool,
        _fua: bool,
    ) -> Result<WriteAck, TargetError> {
        unimplemented!()
    }
    fn flush(&self) -> Result<(), TargetError> {
        unimplemented!()
    }
    fn block_status(&self, _offset: u64, _len: u64) -> Result<Vec<Extent>, TargetError> {
        unimplemented!()
    }
}

//! The contract between a frontend (NBD today, vhost-user-blk next) and whatever serves a volume's
//! blocks: the local volume engine in `vstor serve`, or later a remote volume driver reached over the
//! edge protocol.
//!
//! Frontends never see SCOs, TLogs or the backend; they see a byte-addressed device with a size, a
//! read-only bit and six operations. Keeping the trait this small is what lets a frontend be tested
//! against an in-memory target and lets the binary swap the engine in without the frontend knowing.
//!
//! Blocking contract: `try_read`, `write` without FUA, `discard`, `write_zeroes` and `block_status`
//! touch only memory and the page cache on the fast path, so a frontend may call them inline on its
//! reactor thread (run to completion, no thread hop). `read` may wait for the backend (data no
//! longer in the write buffer: a network round trip once the backend is remote), so frontends call
//! `try_read` inline and only when it answers [`ReadAttempt::WouldBlock`] run `read` on the bounded
//! backend-read pool (`read_pool`). `flush` and FUA writes wait for fsync and may take
//! milliseconds; frontends run them off the reactor (e.g. `spawn_blocking`).
//!
//! Asynchronous targets: a target whose operations are network requests (the edge's
//! `remote::client::RemoteTarget`) would block a reactor or queue thread for a round trip on every
//! call above. It offers futures instead, through default methods a local target leaves alone:
//! [`BlockTarget::read_async`] (asked for when `try_read` says `WouldBlock`),
//! [`BlockTarget::flush_async`], [`BlockTarget::block_status_async`], and
//! [`BlockTarget::fua_inline`] (a FUA write returns at once and its durability is in
//! `WriteAck::pending`). Frontends complete such requests when the future does, on the runtime,
//! without a thread of their own waiting; `discard` returns a [`WriteAck`] for the same reason.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// Why an operation on a target failed. Frontends map these onto their protocol's error codes
/// (NBD: `EINVAL`, `ENOSPC`, `EPERM`, `EIO`, `ESHUTDOWN`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("request [{offset}, +{len}) is outside the device of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("device is read-only")]
    ReadOnly,
    #[error("device is shutting down or was removed")]
    Shutdown,
    #[error("I/O error: {0}")]
    Io(String),
}

/// Completes when a write may be acknowledged to the client (e.g. once its DTL mirror holds it),
/// or fails: then the write must be reported as failed.
pub type PendingAck = Pin<Box<dyn Future<Output = Result<(), TargetError>> + Send + 'static>>;

/// The data of a read that completes later (see [`BlockTarget::read_async`]).
pub type ReadFuture = Pin<Box<dyn Future<Output = Result<Bytes, TargetError>> + Send + 'static>>;

/// An allocation map that completes later (see [`BlockTarget::block_status_async`]).
pub type ExtentsFuture =
    Pin<Box<dyn Future<Output = Result<Vec<Extent>, TargetError>> + Send + 'static>>;

/// What a successful write reports back besides "done".
#[derive(Default)]
pub struct WriteAck {
    /// The engine is over its write-buffer budget: the frontend should wait this long before taking
    /// more requests from this client (backpressure: slow the client down, never fail it).
    pub throttle: Option<Duration>,
    /// The write is applied (later reads see it) but must not be acknowledged before this
    /// completes. Frontends await it without blocking their other requests.
    pub pending: Option<PendingAck>,
}

impl WriteAck {
    /// Wait for `pending` on the calling thread (frontends without an async reactor).
    pub fn wait_blocking(&mut self) -> Result<(), TargetError> {
        match self.pending.take() {
            Some(pending) => futures::executor::block_on(pending),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for WriteAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteAck")
            .field("throttle", &self.throttle)
            .field("pending", &self.pending.is_some())
            .finish()
    }
}

/// One run of the `base:allocation` map: `length` bytes that are either all allocated (written
/// data) or all a hole that reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub hole: bool,
}

/// What [`BlockTarget::try_read`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAttempt {
    /// The buffer holds the data.
    Done,
    /// The data (or part of it) must come from somewhere slow: the buffer holds nothing useful,
    /// and `read` must be called where blocking is allowed.
    WouldBlock,
}

/// A block device served by a frontend. Offsets and lengths are in bytes; any 512-byte-aligned
/// request is valid, and implementations handle sub-cluster I/O themselves.
pub trait BlockTarget: Send + Sync + 'static {
    /// Size in bytes; a multiple of 512.
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Fill `buf` with the bytes at `offset`. Unwritten ranges read as zeros.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError>;
    /// `read`, but only if it can be done without waiting on the backend; otherwise
    /// [`ReadAttempt::WouldBlock`] and nothing was waited for. The default suits targets whose
    /// reads only touch memory and the page cache.
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadAttempt, TargetError> {
        self.read(offset, buf).map(|()| ReadAttempt::Done)
    }
    /// Write `data` at `offset`. With `fua`, the data is durable before this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<WriteAck, TargetError>;
    /// Unmap `[offset, offset+len)`: afterwards it reads as zeros and costs no space. Like a
    /// write, it may be acknowledged later (`WriteAck::pending`).
    fn discard(&self, offset: u64, len: u64) -> Result<WriteAck, TargetError>;
    /// Make `[offset, offset+len)` read as zeros. With `allocate` (NBD's NO_HOLE), the range stays
    /// allocated (zeros are written as data) instead of becoming a hole.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        fua: bool,
    ) -> Result<WriteAck, TargetError>;
    /// Every write completed before this call (on any connection) is durable when it returns.
    fn flush(&self) -> Result<(), TargetError>;
    /// Allocation map of `[offset, offset+len)`, in order, covering at least the first byte and at
    /// most the whole range.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, TargetError>;

    /// `read` as a future, for targets whose slow reads are network requests: `Some` means the
    /// frontend awaits it instead of running `read` on a blocking thread. Frontends ask only after
    /// `try_read` said `WouldBlock`. The default (`None`) suits local targets.
    fn read_async(&self, offset: u64, len: usize) -> Option<ReadFuture> {
        let _ = (offset, len);
        None
    }

    /// `flush` as a future (`None`: call `flush` off the reactor).
    fn flush_async(&self) -> Option<PendingAck> {
        None
    }

    /// `block_status` as a future (`None`: call `block_status` inline).
    fn block_status_async(&self, offset: u64, len: u64) -> Option<ExtentsFuture> {
        let _ = (offset, len);
        None
    }

    /// True when a plain `write` of `len` bytes waits for a device rather than only copying into
    /// memory or the page cache, so frontends run it off the reactor where several such writes
    /// are in flight at once (a client at queue depth 8 then reaches the disk at queue depth 8).
    /// The default suits targets whose writes are memory copies or network sends.
    fn write_waits(&self, len: usize) -> bool {
        let _ = len;
        false
    }

    /// True when a write, discard or write-zeroes of `[offset, offset+len)` will wait for a
    /// remote backend before it completes: it covers part of a block whose data the target must
    /// first fetch (a volume's read-modify-write of a cluster that is only on the backend). A
    /// frontend thread that serves many requests runs such a request off that thread, as it
    /// does reads that say `WouldBlock`. The default: never.
    fn write_reads_backend(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// True when a FUA `write` / `write_zeroes` returns at once and its durability is in
    /// `WriteAck::pending`, so frontends call it inline instead of off the reactor.
    fn fua_inline(&self) -> bool {
        false
    }

    /// Requests this thread submits from now on may be held back and sent together at
    /// [`BlockTarget::unplug`] (like the kernel's block plugging). A frontend that takes a batch
    /// of requests at once (a vhost-user queue pass) plugs around it, so a network target sends
    /// the batch in one write instead of waking its writer for every request. Every `plug` must
    /// be followed by `unplug` on the same thread before that thread waits for anything. The
    /// default (local targets) does nothing.
    fn plug(&self) {}

    /// Send what this thread submitted since [`BlockTarget::plug`]; its requests are sent at
    /// once again.
    fn unplug(&self) {}
}

/// Plugs `target` for the calling thread until dropped ([`BlockTarget::plug`]).
pub struct PlugGuard<'a>(&'a dyn BlockTarget);

impl<'a> PlugGuard<'a> {
    pub fn new(target: &'a dyn BlockTarget) -> Self {
        target.plug();
        Self(target)
    }

    /// Send what is held, and stay plugged: before the thread waits for anything.
    pub fn flush(&self) {
        self.0.unplug();
        self.0.plug();
    }
}

impl Drop for PlugGuard<'_> {
    fn drop(&mut self) {
        self.0.unplug();
    }
}

/// Who is asking for an export: what a registry's allow list is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client's address as the server's socket sees it.
    pub addr: SocketAddr,
    /// The subject common name (CN) of the client certificate verified during the TLS handshake;
    /// `None` without TLS, without client certificates, or when the certificate has no CN.
    pub subject: Option<String>,
}

/// Name → target lookup for the frontends. The export name is the volume name.
pub trait ExportRegistry: Send + Sync + 'static {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockTarget>>;
    /// Names of every export, for NBD_OPT_LIST.
    fn list(&self) -> Vec<String>;
    /// Whether `client` may see and open the export `name`. The NBD server asks before
    /// `lookup` and filters `list` with it; a refused export is answered exactly like an unknown
    /// one, so a client cannot probe which exports exist. The default allows everyone (registries
    /// without allow lists); the answer for a name that does not exist does not matter.
    fn allows(&self, name: &str, client: &Client) -> bool {
        let _ = (name, client);
        true
    }
}

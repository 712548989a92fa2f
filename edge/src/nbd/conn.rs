//! Transmission phase of one connection.
//!
//! One task per connection owns both halves of the socket and runs an event loop over: socket
//! readable, reply bytes writable, a blocking operation finished, throttle expired, shutdown,
//! and forced disconnect. Each turn of the loop first pulls every complete request out of the read
//! buffer and executes it:
//!
//! * `READ`, `WRITE`, `TRIM`, `WRITE_ZEROES` and `BLOCK_STATUS` run inline. The target contract
//!   says these only touch memory and the page cache, so a thread hop would cost more than the
//!   operation; `READ` data is filled straight into the reply buffer (`BlockTarget::try_read`).
//! * A `READ` the target cannot serve without the backend (`ReadAttempt::WouldBlock`: data no
//!   longer in the write buffer) goes to the bounded backend-read pool (`read_pool`) and is
//!   answered when it completes, like a flush: other requests on the connection keep being served
//!   and answered meanwhile, so replies go out of order, matched by cookie. It takes one of the
//!   `max_inflight` slots while it runs.
//! * `FLUSH`, anything carrying FUA, writes the target says wait for a device
//!   (`BlockTarget::write_waits`: large writes that go to the disk with `O_DIRECT`), and writes,
//!   trims and write-zeroes it says must first fetch data from the backend
//!   (`BlockTarget::write_reads_backend`: a sub-cluster write over evicted data) go to
//!   `spawn_blocking`, so several are in flight at once; their
//!   completions come back over a channel to this same task, which stays the only writer of the
//!   socket. Reads keep flowing while a flush is in progress, and replies go out in completion
//!   order, matched by cookie. At most `max_inflight` of them run at once per connection; the next
//!   one waits (and the socket is not read) until a slot frees up, which pushes back on the client.
//!
//! * A write the target applied but whose acknowledgement is pending (`WriteAck::pending`: a
//!   sync-mode DTL round trip) is answered when that future completes; the futures are polled by
//!   this task in a `FuturesUnordered`, so the connection keeps taking requests meanwhile and a
//!   client at queue depth 32 has its writes' round trips overlap.
//!
//! Replies accumulate in one buffer and are written when the read buffer has no complete request
//! left, so a client pipelining 32 requests gets their replies in a handful of `write` calls.
//!
//! When the target asks for throttling (`WriteAck::throttle`), the loop stops taking requests and
//! stops reading the socket until the delay has passed, so TCP flow control slows the client down.

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::handshake::{Negotiated, MIN_BLOCK_SIZE};
use super::proto::*;
use super::stream::NbdStream;
use super::NbdError;
use crate::read_pool;
use crate::target::{BlockTarget, Extent, PlugGuard, ReadAttempt, TargetError, WriteAck};

/// Socket read size; large enough for a QD32 burst of 4 KiB writes in one `read`.
const READ_BUF: usize = 256 * 1024;
/// Below this much free space the read buffer is topped up before reading.
const READ_MIN_SPARE: usize = 16 * 1024;
/// Stop executing requests once this many reply bytes are waiting to be written.
const WRITE_HIGH_WATER: usize = 4 * 1024 * 1024;
/// Cap on descriptors in one `BLOCK_STATUS` reply; the client asks again for the rest.
const MAX_DESCRIPTORS: usize = 128 * 1024;

pub(crate) struct ConnParams {
    pub peer: SocketAddr,
    pub max_payload: u32,
    pub max_inflight: usize,
    pub max_inflight_bytes: u64,
    pub shutdown_grace: Duration,
}

/// Why a connection ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed its side of the connection.
    Eof,
    /// `disconnect_export` closed it.
    Killed,
    /// Server shutdown: the grace period for the client to disconnect ran out.
    Shutdown,
}

impl End {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            End::Disconnect => "client sent NBD_CMD_DISC",
            End::Eof => "client closed the connection",
            End::Killed => "export disconnected by the server",
            End::Shutdown => "server shut down",
        }
    }

    /// Whether the socket should be shut down cleanly (FIN after the last reply).
    pub(crate) fn graceful(self) -> bool {
        self != End::Killed
    }
}

struct Completion {
    cookie: u64,
    command: Command,
    /// What the request counted against `max_inflight_bytes`.
    bytes: u64,
    result: Result<Output, TargetError>,
}

/// What a request in flight counts against the per-connection byte limit: the data it carries or
/// will carry back.
fn weight(req: &Request) -> u64 {
    match req.command {
        Command::Read | Command::Write => u64::from(req.length),
        _ => 0,
    }
}

/// What a request completed off the connection's task produced.
enum Output {
    Ack(WriteAck),
    /// A `READ`'s data.
    Data {
        offset: u64,
        data: Bytes,
    },
    /// A `BLOCK_STATUS` answered by an asynchronous target.
    Extents {
        context_id: u32,
        descriptors: Vec<(u32, u32)>,
    },
}

/// Sends a request's completion to the connection; if dropped unsent (the job never ran: the
/// runtime is shutting down, or it panicked) it reports the request as failed, so the connection
/// never waits for a completion that cannot come.
struct Completer {
    tx: mpsc::UnboundedSender<Completion>,
    cookie: u64,
    command: Command,
    bytes: u64,
    sent: bool,
}

impl Completer {
    fn send(mut self, result: Result<Output, TargetError>) {
        self.sent = true;
        // The connection may be gone (forced disconnect); then nobody wants the reply.
        let _ = self.tx.send(Completion {
            cookie: self.cookie,
            command: self.command,
            bytes: self.bytes,
            result,
        });
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if !self.sent {
            let _ = self.tx.send(Completion {
                cookie: self.cookie,
                command: self.command,
                bytes: self.bytes,
                result: Err(TargetError::Io("request was abandoned".into())),
            });
        }
    }
}

/// Whether a request was executed (or handed off), or must wait for a free in-flight slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Done,
    Stall,
}

/// Why `READ` data could not be filled in inline.
enum Fill {
    Failed(TargetError),
    WouldBlock,
}

/// A request that failed: the NBD error to send, a message, and whose fault it was (client
/// protocol violations are logged as warnings).
struct Failure {
    errno: u32,
    message: Cow<'static, str>,
    client_fault: bool,
}

fn client_fault(errno: u32, message: &'static str) -> Failure {
    Failure {
        errno,
        message: Cow::Borrowed(message),
        client_fault: true,
    }
}

fn target_failure(command: Command, err: TargetError) -> Failure {
    let errno = match &err {
        TargetError::OutOfRange { .. } => match command {
            Command::Write | Command::WriteZeroes => NBD_ENOSPC,
            _ => NBD_EINVAL,
        },
        TargetError::ReadOnly => NBD_EPERM,
        TargetError::Shutdown => NBD_ESHUTDOWN,
        TargetError::Io(_) => NBD_EIO,
    };
    Failure {
        errno,
        message: Cow::Owned(err.to_string()),
        client_fault: false,
    }
}

/// Turn the target's allocation map into `base:allocation` descriptors covering at most `len`
/// bytes: adjacent runs of the same kind are merged and empty runs dropped.
pub(crate) fn descriptors(extents: &[Extent], len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let len = u64::from(len);
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut covered = 0u64;
    for extent in extents {
        if covered >= len {
            break;
        }
        let take = extent.length.min(len - covered);
        if take == 0 {
            continue;
        }
        let flags = if extent.hole {
            NBD_STATE_HOLE | NBD_STATE_ZERO
        } else {
            0
        };
        covered += take;
        // `covered <= len <= u32::MAX`, so neither the run nor a merged run overflows.
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += take as u32,
            _ => {
                if out.len() == MAX_DESCRIPTORS {
                    break;
                }
                out.push((take as u32, flags));
            }
        }
    }
    if req_one {
        out.truncate(1);
    }
    out
}

struct Session {
    peer: SocketAddr,
    export: String,
    target: Arc<dyn BlockTarget>,
    structured: bool,
    base_allocation: Option<u32>,
    max_payload: u32,
    max_inflight: usize,
    inflight: usize,
    max_inflight_bytes: u64,
    inflight_bytes: u64,
    done_tx: mpsc::UnboundedSender<Completion>,
    /// Writes applied but waiting for their acknowledgement (a DTL round trip), polled by this
    /// task itself: no spawn and no channel hop per write.
    acks: FuturesUnordered<Pin<Box<dyn Future<Output = Completion> + Send>>>,
    wbuf: BytesMut,
    throttle_until: Option<Instant>,
    disc: bool,
}

impl Session {
    fn push(&mut self, reply: Reply) {
        let cookie = match &reply {
            Reply::Simple { cookie, .. }
            | Reply::SimpleData { cookie, .. }
            | Reply::OffsetData { cookie, .. }
            | Reply::Done { cookie }
            | Reply::Error { cookie, .. }
            | Reply::BlockStatus { cookie, .. } => *cookie,
        };
        if let Err(e) = ReplyEncoder.encode(reply, &mut self.wbuf) {
            error!(peer = %self.peer, export = %self.export, error = %e, "cannot encode NBD reply");
            self.wbuf.reserve(16);
            let _ = ReplyEncoder.encode(
                Reply::Simple {
                    cookie,
                    error: NBD_EIO,
                },
                &mut self.wbuf,
            );
        }
    }

    fn fail(&mut self, req: &Request, failure: Failure) {
        if failure.client_fault {
            warn!(
                peer = %self.peer,
                export = %self.export,
                command = ?req.command,
                flags = req.flags,
                offset = req.offset,
                length = req.length,
                errno = failure.errno,
                "NBD protocol violation: {}",
                failure.message
            );
        } else if failure.errno == NBD_EIO {
            warn!(peer = %self.peer, export = %self.export, command = ?req.command,
                offset = req.offset, length = req.length, "NBD request failed: {}", failure.message);
        } else {
            debug!(peer = %self.peer, export = %self.export, command = ?req.command,
                errno = failure.errno, "NBD request failed: {}", failure.message);
        }
        let reply =
            if self.structured && matches!(req.command, Command::Read | Command::BlockStatus) {
                Reply::Error {
                    cookie: req.cookie,
                    error: failure.errno,
                    message: failure.message.into_owned(),
                }
            } else {
                Reply::Simple {
                    cookie: req.cookie,
                    error: failure.errno,
                }
            };
        self.push(reply);
    }

    fn ok(&mut self, req: &Request) {
        self.push(Reply::Simple {
            cookie: req.cookie,
            error: 0,
        });
    }

    fn throttle(&mut self, ack: WriteAck) {
        if let Some(delay) = ack.throttle {
            let until = Instant::now() + delay;
            self.throttle_until = Some(self.throttle_until.map_or(until, |t| t.max(until)));
        }
    }

    fn throttled(&mut self) -> bool {
        match self.throttle_until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                self.throttle_until = None;
                false
            }
            None => false,
        }
    }

    fn needs_blocking(req: &Request) -> bool {
        match req.command {
            Command::Flush => true,
            Command::Write | Command::Trim | Command::WriteZeroes => {
                req.flags & NBD_CMD_FLAG_FUA != 0
            }
            _ => false,
        }
    }

    /// Execute or queue one request; its reply is either in `wbuf` on return or will come back as
    /// a completion. A request handed back must be retried once an in-flight slot is free.
    fn handle(&mut self, req: Request, shutting_down: bool) -> Option<Request> {
        if req.command == Command::Disc {
            self.disc = true;
            return None;
        }
        let result = if shutting_down {
            Err(Failure {
                errno: NBD_ESHUTDOWN,
                message: Cow::Borrowed("server is shutting down"),
                client_fault: false,
            })
        } else {
            self.execute(&req)
        };
        match result {
            Ok(Step::Done) => None,
            Ok(Step::Stall) => Some(req),
            Err(failure) => {
                self.fail(&req, failure);
                None
            }
        }
    }

    fn execute(&mut self, req: &Request) -> Result<Step, Failure> {
        let allowed = NBD_CMD_FLAG_FUA
            | match req.command {
                Command::Read => NBD_CMD_FLAG_DF,
                Command::WriteZeroes => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
                Command::BlockStatus => NBD_CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        if req.flags & !allowed != 0 {
            return Err(client_fault(
                NBD_EINVAL,
                "command flags not valid for this command",
            ));
        }
        let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
        match req.command {
            Command::Read => return self.read(req),
            Command::Write => self.write(req, fua),
            Command::Flush => {
                match self.target.flush_async() {
                    Some(flush) => self.later(req, async move {
                        flush.await.map(|()| Output::Ack(WriteAck::default()))
                    }),
                    None => self.spawn(req, |t| t.flush().map(|()| WriteAck::default())),
                }
                Ok(())
            }
            Command::Trim => self.trim(req, fua),
            Command::WriteZeroes => self.write_zeroes(req, fua),
            Command::BlockStatus => self.block_status(req),
            Command::Disc | Command::Cache | Command::Unknown(_) => {
                Err(client_fault(NBD_EINVAL, "unsupported command"))
            }
        }
        .map(|()| Step::Done)
    }

    /// Validate `[offset, offset+length)`: nonzero, 512-aligned, inside the export. `beyond` is
    /// the error for a range past the end (ENOSPC for writes, EINVAL otherwise).
    fn check_range(&self, req: &Request, beyond: u32) -> Result<(), Failure> {
        let len = u64::from(req.length);
        if len == 0 {
            return Err(client_fault(NBD_EINVAL, "zero-length request"));
        }
        let align = u64::from(MIN_BLOCK_SIZE);
        if !req.offset.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(client_fault(
                NBD_EINVAL,
                "request not aligned to the 512-byte minimum block size",
            ));
        }
        match req.offset.checked_add(len) {
            Some(end) if end <= self.target.size() => Ok(()),
            _ => Err(client_fault(
                beyond,
                "request extends beyond the end of the export",
            )),
        }
    }

    fn writable(&self) -> Result<(), Failure> {
        if self.target.read_only() {
            return Err(client_fault(NBD_EPERM, "export is read-only"));
        }
        Ok(())
    }

    fn spawn<F>(&mut self, req: &Request, op: F)
    where
        F: FnOnce(&dyn BlockTarget) -> Result<WriteAck, TargetError> + Send + 'static,
    {
        let target = Arc::clone(&self.target);
        let done = self.completer(req);
        tokio::task::spawn_blocking(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let mut ack = op(target.as_ref())?;
                ack.wait_blocking()?;
                Ok(Output::Ack(ack))
            }))
            .unwrap_or_else(|_| Err(TargetError::Io("target panicked".into())));
            done.send(result);
        });
    }

    /// Take an in-flight slot for `req`, completed through the returned sender.
    fn completer(&mut self, req: &Request) -> Completer {
        self.inflight += 1;
        self.inflight_bytes += weight(req);
        Completer {
            tx: self.done_tx.clone(),
            cookie: req.cookie,
            command: req.command,
            bytes: weight(req),
            sent: false,
        }
    }

    /// Complete `req` when `fut` does (an asynchronous target's operation), polled by this task.
    fn later<F>(&mut self, req: &Request, fut: F)
    where
        F: Future<Output = Result<Output, TargetError>> + Send + 'static,
    {
        self.inflight += 1;
        let (cookie, command, bytes) = (req.cookie, req.command, weight(req));
        self.inflight_bytes += bytes;
        self.acks.push(Box::pin(async move {
            Completion {
                cookie,
                command,
                bytes,
                result: fut.await,
            }
        }));
    }

    /// Run a `READ` that waits for the backend on the backend-read pool.
    fn spawn_read(&mut self, req: &Request) {
        let target = Arc::clone(&self.target);
        let done = self.completer(req);
        let (offset, len) = (req.offset, req.length as usize);
        read_pool::spawn(&tokio::runtime::Handle::current(), move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let mut data = vec![0u8; len];
                target.read(offset, &mut data).map(|()| Output::Data {
                    offset,
                    data: data.into(),
                })
            }))
            .unwrap_or_else(|_| Err(TargetError::Io("target panicked".into())));
            done.send(result);
        });
    }

    /// Reply to a completed write now, or once its pending acknowledgement (a DTL round trip)
    /// completes; the connection keeps taking requests meanwhile.
    fn acknowledge(&mut self, req: &Request, mut ack: WriteAck) {
        let Some(pending) = ack.pending.take() else {
            self.throttle(ack);
            self.ok(req);
            return;
        };
        self.throttle(ack);
        self.inflight += 1;
        let (cookie, command, bytes) = (req.cookie, req.command, weight(req));
        self.inflight_bytes += bytes;
        self.acks.push(Box::pin(async move {
            Completion {
                cookie,
                command,
                bytes,
                result: pending.await.map(|()| Output::Ack(WriteAck::default())),
            }
        }));
    }

    fn complete(&mut self, done: Completion) {
        self.inflight -= 1;
        self.inflight_bytes = self.inflight_bytes.saturating_sub(done.bytes);
        match done.result {
            Ok(Output::Ack(ack)) => {
                self.throttle(ack);
                self.push(Reply::Simple {
                    cookie: done.cookie,
                    error: 0,
                });
            }
            Ok(Output::Extents {
                context_id,
                descriptors,
            }) => {
                if descriptors.is_empty() {
                    let req = Self::placeholder(done.cookie, done.command);
                    self.fail(&req, empty_map());
                } else {
                    self.push(Reply::BlockStatus {
                        cookie: done.cookie,
                        context_id,
                        descriptors,
                    });
                }
            }
            Ok(Output::Data { offset, data }) => {
                let cookie = done.cookie;
                self.push(if self.structured {
                    Reply::OffsetData {
                        cookie,
                        offset,
                        data,
                    }
                } else {
                    Reply::SimpleData { cookie, data }
                });
            }
            Err(err) => {
                let req = Self::placeholder(done.cookie, done.command);
                let failure = target_failure(done.command, err);
                self.fail(&req, failure);
            }
        }
    }

    /// A request standing for a completed one in `fail` (which needs only cookie and command).
    fn placeholder(cookie: u64, command: Command) -> Request {
        Request {
            flags: 0,
            command,
            cookie,
            offset: 0,
            length: 0,
            payload: Default::default(),
            payload_discarded: false,
        }
    }

    fn read(&mut self, req: &Request) -> Result<Step, Failure> {
        self.check_range(req, NBD_EINVAL)?;
        if req.length > self.max_payload {
            return Err(client_fault(
                NBD_EINVAL,
                "read larger than the maximum block size",
            ));
        }
        let target = &self.target;
        let filled = encode_read_reply(
            &mut self.wbuf,
            req.cookie,
            req.offset,
            req.length as usize,
            self.structured,
            |buf| match target.try_read(req.offset, buf) {
                Ok(ReadAttempt::Done) => Ok(()),
                Ok(ReadAttempt::WouldBlock) => Err(Fill::WouldBlock),
                Err(e) => Err(Fill::Failed(e)),
            },
        );
        match filled {
            Ok(()) => Ok(Step::Done),
            Err(Fill::Failed(e)) => Err(target_failure(Command::Read, e)),
            Err(Fill::WouldBlock) if self.inflight >= self.max_inflight => Ok(Step::Stall),
            Err(Fill::WouldBlock) => {
                let offset = req.offset;
                match self.target.read_async(offset, req.length as usize) {
                    Some(read) => self.later(req, async move {
                        read.await.map(|data| Output::Data { offset, data })
                    }),
                    None => self.spawn_read(req),
                }
                Ok(Step::Done)
            }
        }
    }

    fn write(&mut self, req: &Request, fua: bool) -> Result<(), Failure> {
        self.writable()?;
        if req.payload_discarded {
            return Err(client_fault(
                NBD_EINVAL,
                "write larger than the maximum block size",
            ));
        }
        self.check_range(req, NBD_ENOSPC)?;
        if (fua && !self.target.fua_inline())
            || self.target.write_waits(req.payload.len())
            || self
                .target
                .write_reads_backend(req.offset, req.payload.len() as u64)
        {
            let (offset, data) = (req.offset, req.payload.clone());
            self.spawn(req, move |t| t.write(offset, &data, fua));
            return Ok(());
        }
        let ack = self
            .target
            .write(req.offset, &req.payload, fua)
            .map_err(|e| target_failure(Command::Write, e))?;
        self.acknowledge(req, ack);
        Ok(())
    }

    fn trim(&mut self, req: &Request, fua: bool) -> Result<(), Failure> {
        self.writable()?;
        self.check_range(req, NBD_EINVAL)?;
        let (offset, len) = (req.offset, u64::from(req.length));
        if (fua && !self.target.fua_inline()) || self.target.write_reads_backend(offset, len) {
            self.spawn(req, move |t| {
                let mut ack = t.discard(offset, len)?;
                if !fua {
                    return Ok(ack);
                }
                ack.wait_blocking()?;
                t.flush()?;
                Ok(WriteAck::default())
            });
            return Ok(());
        }
        let mut ack = self
            .target
            .discard(offset, len)
            .map_err(|e| target_failure(Command::Trim, e))?;
        if fua {
            // An asynchronous target: flush once the discard is acknowledged, so the flush
            // covers it.
            self.throttle(WriteAck {
                throttle: ack.throttle,
                pending: None,
            });
            let (pending, target) = (ack.pending.take(), Arc::clone(&self.target));
            self.later(req, async move {
                if let Some(pending) = pending {
                    pending.await?;
                }
                match target.flush_async() {
                    Some(flush) => flush.await?,
                    None => tokio::task::spawn_blocking(move || target.flush())
                        .await
                        .map_err(|e| TargetError::Io(format!("flush failed: {e}")))??,
                }
                Ok(Output::Ack(WriteAck::default()))
            });
            return Ok(());
        }
        self.acknowledge(req, ack);
        Ok(())
    }

    fn write_zeroes(&mut self, req: &Request, fua: bool) -> Result<(), Failure> {
        self.writable()?;
        self.check_range(req, NBD_ENOSPC)?;
        let allocate = req.flags & NBD_CMD_FLAG_NO_HOLE != 0;
        if allocate && req.flags & NBD_CMD_FLAG_FAST_ZERO != 0 {
            // Keeping the range allocated means writing zeros as data: no faster than a WRITE.
            return Err(Failure {
                errno: NBD_ENOTSUP,
                message: Cow::Borrowed("zeroing with NO_HOLE is not fast"),
                client_fault: false,
            });
        }
        let (offset, len) = (req.offset, u64::from(req.length));
        if (fua && !self.target.fua_inline()) || self.target.write_reads_backend(offset, len) {
            self.spawn(req, move |t| t.write_zeroes(offset, len, allocate, fua));
            return Ok(());
        }
        let ack = self
            .target
            .write_zeroes(offset, len, allocate, fua)
            .map_err(|e| target_failure(Command::WriteZeroes, e))?;
        self.acknowledge(req, ack);
        Ok(())
    }

    fn block_status(&mut self, req: &Request) -> Result<(), Failure> {
        let context_id = match self.base_allocation {
            Some(id) if self.structured => id,
            _ => {
                return Err(client_fault(
                    NBD_EINVAL,
                    "BLOCK_STATUS without a negotiated metadata context",
                ))
            }
        };
        self.check_range(req, NBD_EINVAL)?;
        let (len, req_one) = (req.length, req.flags & NBD_CMD_FLAG_REQ_ONE != 0);
        if let Some(map) = self.target.block_status_async(req.offset, u64::from(len)) {
            self.later(req, async move {
                map.await.map(|extents| Output::Extents {
                    context_id,
                    descriptors: descriptors(&extents, len, req_one),
                })
            });
            return Ok(());
        }
        let extents = self
            .target
            .block_status(req.offset, u64::from(req.length))
            .map_err(|e| target_failure(Command::BlockStatus, e))?;
        let descriptors = descriptors(&extents, req.length, req.flags & NBD_CMD_FLAG_REQ_ONE != 0);
        if descriptors.is_empty() {
            return Err(empty_map());
        }
        self.push(Reply::BlockStatus {
            cookie: req.cookie,
            context_id,
            descriptors,
        });
        Ok(())
    }
}

fn empty_map() -> Failure {
    Failure {
        errno: NBD_EIO,
        message: Cow::Borrowed("target returned an empty allocation map"),
        client_fault: false,
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Write the reply buffer out and, on a stream that buffers (TLS), flush it. For TCP this is
/// `write_all_buf` alone: `NEEDS_FLUSH` is a constant.
async fn write_out<S: NbdStream, W: AsyncWrite + Unpin>(
    wr: &mut W,
    buf: &mut BytesMut,
) -> std::io::Result<()> {
    if !buf.is_empty() {
        wr.write_all_buf(buf).await?;
    }
    if S::NEEDS_FLUSH {
        wr.flush().await?;
    }
    Ok(())
}

/// Serve requests until the client disconnects, the export is disconnected (`kill`), or the
/// server shuts down. On return every reply that could be produced has been written.
pub(crate) async fn run<S: NbdStream>(
    stream: &mut S,
    negotiated: Negotiated,
    params: &ConnParams,
    shutdown: &CancellationToken,
    kill: &CancellationToken,
) -> Result<End, NbdError> {
    let (mut rd, mut wr) = stream.halves();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut s = Session {
        peer: params.peer,
        export: negotiated.name,
        target: negotiated.target,
        structured: negotiated.structured,
        base_allocation: negotiated.base_allocation,
        max_payload: params.max_payload,
        max_inflight: params.max_inflight.max(1),
        inflight: 0,
        max_inflight_bytes: params.max_inflight_bytes.max(1),
        inflight_bytes: 0,
        done_tx,
        acks: FuturesUnordered::new(),
        wbuf: BytesMut::with_capacity(64 * 1024),
        throttle_until: None,
        disc: false,
    };
    let mut decoder = RequestDecoder::new(params.max_payload);
    let mut rbuf = BytesMut::with_capacity(READ_BUF);
    let mut stalled: Option<Request> = None;
    let mut eof = false;
    let mut drain_deadline: Option<Instant> = None;
    let mut grace_over = false;
    // Bytes handed to a stream that buffers them (TLS) and not yet flushed to the socket.
    let mut unflushed = false;

    loop {
        while let Ok(done) = done_rx.try_recv() {
            s.complete(done);
        }

        let mut input_drained = false;
        // The requests taken from one socket read leave together to a network target (one
        // write for the batch, `BlockTarget::plug`); nothing in this loop waits.
        let target = Arc::clone(&s.target);
        let plug = PlugGuard::new(target.as_ref());
        while !s.disc
            && !grace_over
            && s.wbuf.len() < WRITE_HIGH_WATER
            && s.inflight_bytes < s.max_inflight_bytes
            && !s.throttled()
        {
            let req = match stalled.take() {
                Some(req) => req,
                None => match decoder.decode(&mut rbuf)? {
                    Some(req) => req,
                    None => {
                        input_drained = true;
                        break;
                    }
                },
            };
            let shutting_down = shutdown.is_cancelled();
            if !shutting_down && Session::needs_blocking(&req) && s.inflight >= s.max_inflight {
                stalled = Some(req);
                break;
            }
            if let Some(req) = s.handle(req, shutting_down) {
                stalled = Some(req);
                break;
            }
        }
        drop(plug);

        let idle = s.inflight == 0 && s.wbuf.is_empty() && !unflushed;
        if idle && s.disc {
            return Ok(End::Disconnect);
        }
        if idle && grace_over {
            return Ok(End::Shutdown);
        }
        if idle && eof && input_drained && stalled.is_none() {
            return Ok(End::Eof);
        }

        let can_read = !s.disc
            && !eof
            && !grace_over
            && stalled.is_none()
            && s.throttle_until.is_none()
            && s.wbuf.len() < WRITE_HIGH_WATER
            && s.inflight_bytes < s.max_inflight_bytes;
        if can_read && rbuf.capacity() - rbuf.len() < READ_MIN_SPARE {
            rbuf.reserve(READ_BUF);
        }

        if S::NEEDS_FLUSH && !s.wbuf.is_empty() {
            unflushed = true;
        }
        tokio::select! {
            biased;
            _ = kill.cancelled() => {
                // Operations still running on the blocking pool must finish before the
                // connection counts as gone (a forced disconnect waits for that).
                let mut running = s.inflight - s.acks.len();
                while running > 0 && done_rx.recv().await.is_some() {
                    running -= 1;
                }
                return Ok(End::Killed);
            }
            _ = shutdown.cancelled(), if drain_deadline.is_none() => {
                drain_deadline = Some(Instant::now() + params.shutdown_grace);
            }
            _ = until(drain_deadline), if drain_deadline.is_some() && !grace_over => {
                grace_over = true;
            }
            Some(done) = done_rx.recv() => s.complete(done),
            Some(done) = s.acks.next(), if !s.acks.is_empty() => s.complete(done),
            written = write_out::<S, _>(&mut wr, &mut s.wbuf), if !s.wbuf.is_empty() || unflushed => {
                written?;
                unflushed = false;
            }
            _ = until(s.throttle_until), if s.throttle_until.is_some() => {
                s.throttle_until = None;
            }
            read = rd.read_buf(&mut rbuf), if can_read => {
                if read? == 0 {
                    eof = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64, hole: bool) -> Extent {
        Extent { length, hole }
    }

    #[test]
    fn descriptors_are_clamped_merged_and_nonempty() {
        let map = [
            ext(4096, false),
            ext(0, true),
            ext(4096, false),
            ext(1 << 40, true),
        ];
        assert_eq!(
            descriptors(&map, 16384, false),
            vec![(8192, 0), (8192, NBD_STATE_HOLE | NBD_STATE_ZERO)]
        );
        assert_eq!(descriptors(&map, 16384, true), vec![(8192, 0)]);
        assert_eq!(descriptors(&map, 512, false), vec![(512, 0)]);
        assert_eq!(
            descriptors(&[ext(u64::MAX, true)], u32::MAX, false),
            vec![(u32::MAX, 3)]
        );
        assert!(descriptors(&[], 512, false).is_empty());
    }

    #[test]
    fn out_of_range_maps_per_command() {
        let oor = TargetError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(
            target_failure(Command::Write, oor.clone()).errno,
            NBD_ENOSPC
        );
        assert_eq!(
            target_failure(Command::WriteZeroes, oor.clone()).errno,
            NBD_ENOSPC
        );
        assert_eq!(target_failure(Command::Read, oor.clone()).errno, NBD_EINVAL);
        assert_eq!(target_failure(Command::Trim, oor).errno, NBD_EINVAL);
        assert_eq!(
            target_failure(Command::Read, TargetError::Io("x".into())).errno,
            NBD_EIO
        );
        assert_eq!(
            target_failure(Command::Flush, TargetError::Shutdown).errno,
            NBD_ESHUTDOWN
        );
        assert_eq!(
            target_failure(Command::Write, TargetError::ReadOnly).errno,
            NBD_EPERM
        );
    }
}

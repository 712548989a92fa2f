//! Server side of the edge protocol (runs in `vstor serve --edge-listen ADDR`).
//!
//! One tokio task per connection owns both halves of the socket, like the NBD server's
//! connections (`nbd::conn`), and runs one event loop over: socket readable, replies writable,
//! a request's completion, throttle expired, shutdown.
//!
//! * **Handshake.** The first frame must be `Hello`. Another protocol version gets
//!   `VersionMismatch`; a volume this node does not serve, or serves under another owner tag, or
//!   has fenced, gets `Error` (id 0: `NotOwner`, `StaleTag`, `Fenced`) and the connection closes.
//!   Otherwise `Welcome` carries the size, read-only bit, tag and DTL state, and the connection
//!   speaks the client's version (any from `MIN_PROTOCOL_VERSION`).
//! * **An early edge waits.** The registry names a new owner (the ownership transaction) before
//!   that node has opened the volume, and an edge follows the registry's notice at once. A
//!   `Hello` for a volume this node is still opening ([`RemoteExports::opening`]: an adoption
//!   or a move under way) waits for it, up to [`OPENING_WAIT`], instead of being refused and
//!   backing off.
//! * **Allow list.** On a version-2 connection `Access` follows `Welcome` with the volume's NBD
//!   allow list ([`ServedState::access`]), and the session looks for a change every
//!   `ACCESS_POLL` (one comparison of two short lists) and pushes the new list, so a
//!   `vstor volume update --allow-…` reaches attached edges within about a second, and every
//!   reconnect carries the current list anyway.
//! * **Owner check per request.** Every request's tag is compared with [`ServedState::tag`] and the
//!   volume's fenced / alive state before anything runs, so an edge that missed a failover can
//!   never write through this node once it lost the volume. A request tag lower than ours is
//!   `StaleTag` (the edge holds an old tag); a higher one means the registry moved the volume past
//!   this node: `NotOwner`.
//! * **A hand-off holds requests back.** While the volume is being handed to another node
//!   ([`Handoff::Releasing`](super::Handoff): a `volume move` flushing it to the backend), a
//!   request that finds it no longer served waits (polled every [`HANDOFF_POLL`], at most
//!   [`HANDOFF_WAIT`]) instead of being refused: it runs here if the hand-off fails, and once it
//!   succeeded it is refused with `Released` (version 3), which promises the edge that everything
//!   acknowledged on the connection is on the backend. A request that fails with an I/O error
//!   while the owner check no longer passes (the volume's own gate refused a write because the
//!   hand-off or a fence began just after its check, or a FUA write on the blocking pool met it)
//!   is answered with the owner's refusal (held like the others during a hand-off), not with the
//!   I/O error: it was not acknowledged, and the edge resends it to the next owner. Reads and
//!   block status under the volume's tag are not held: nothing can change the volume until the
//!   hand-off ends, so they run here meanwhile (`Session::may_read_during_handoff`); requests
//!   behind a held one wait with it, in order.
//! * **Goodbye.** When the server stops (a clean stop of the node, which hands every volume
//!   over first), each session answers what it holds and, for a volume handed over cleanly,
//!   sends `Released` once more with id 0 before it closes (`Session::say_goodbye`, at most
//!   [`CLOSE_GRACE`]): an edge would otherwise take the close for a crash.
//! * **Execution.** Reads are tried inline (`try_read`: write buffer and page cache); a read that
//!   must wait for the backend goes to the async path the target offers or to the bounded
//!   backend-read pool (`read_pool`). Writes, trims and write-zeroes run inline and their pending
//!   acknowledgement (a DTL round trip) is awaited in a `FuturesUnordered` polled by this task, so
//!   the connection keeps taking requests meanwhile. Flush and FUA operations run on the blocking
//!   pool unless the target completes them asynchronously, and so do writes the target says wait
//!   for a device (`BlockTarget::write_waits`: a volume's large `O_DIRECT` writes), which would
//!   otherwise hold this task and its runtime thread for the disk's time; requests that touch
//!   such a write's range, and flushes, wait for it (`device_writes`), so requests still take
//!   effect in arrival order. Replies go out in completion order,
//!   matched by id, each carrying [`ServedState::dtl_in_sync`] at the time of the reply: the
//!   client needs it to decide what is safe to resend after a failover (`remote::resubmit`).
//! * **Backpressure.** At most `max_inflight` requests wait for a completion per connection;
//!   beyond that, and while the target asks for throttling, the socket is not read, so TCP flow
//!   control slows the client down.
//! * **Security.** With [`EdgeServerConfig::tls`] every connection must be mutual TLS with a client
//!   certificate of the cluster CA (`vstor_net::accept_peer`, bounded by the Hello timeout); a
//!   plain-text edge gets an `Error` naming the requirement in reply to its `Hello`. The session
//!   loop is generic over the stream (`nbd::stream::NbdStream`, shared with the NBD server):
//!   plain TCP keeps its borrowed, lock-free `split`; TLS is flushed once the reply queue drains.
//!   A frame whose first bytes arrived must be complete within
//!   [`EdgeServerConfig::frame_timeout`], or the connection is closed (slowloris clients).
//! * **Bad input.** A frame that does not decode (CRC, magic, unknown kind) is logged with the
//!   volume and peer and the connection closes: after a corrupted frame nothing that follows can
//!   be trusted. Unaligned or out-of-range requests get an `Error` reply and the connection stays.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vstor_net::{Accepted, PeerStream, PeerTls};

mod device_writes;
mod handshake;

use self::device_writes::DeviceWrites;
use self::handshake::{await_opening, handshake, owner_check, read_frame, Refused};
use super::outq::OutQueue;
use super::proto::RELEASED_VERSION;
use super::proto::{AllowList, EdgeCodec, ErrorCode, Frame, Message, ProtoError, ACCESS_POLL};
use super::proto::{MAX_EXTENTS, MAX_FRAME_PAYLOAD};
use super::{Handoff, RemoteExports, ServedVolume};
use crate::nbd::stream::NbdStream;
use crate::read_pool;
use crate::target::{BlockTarget, Extent, ReadAttempt, TargetError, WriteAck};

/// Tunables of the edge server.
#[derive(Debug, Clone)]
pub struct EdgeServerConfig {
    /// Requests one connection may have in flight before the server stops reading its socket.
    pub max_inflight: usize,
    /// A frame whose first bytes arrived must be complete within this, or the connection is
    /// closed. Idle connections between frames are kept (keepalive finds dead ones).
    pub frame_timeout: Duration,
    /// Mutual TLS: edges must present a certificate of the cluster CA. `None`: plain TCP.
    pub tls: Option<PeerTls>,
}

impl Default for EdgeServerConfig {
    fn default() -> Self {
        Self {
            max_inflight: 256,
            frame_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// How long a new connection may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `Hello` waits for a volume this node is still opening
/// ([`RemoteExports::opening`]) before the handshake goes on (and refuses, if it is still not
/// served). An edge gives up on a handshake sooner (`RemoteConfig::connect_timeout`, 3 s) and
/// tries again.
pub const OPENING_WAIT: Duration = Duration::from_secs(10);
/// Socket read size: a QD32 burst of 4 KiB writes fits in one `read`.
const READ_BUF: usize = 256 * 1024;
/// Below this much free space the read buffer is topped up before reading.
const READ_MIN_SPARE: usize = 16 * 1024;
/// Stop executing requests while this many reply bytes wait to be written.
const WRITE_HIGH_WATER: usize = 4 * 1024 * 1024;
/// Reply bytes produced by one round of executing requests before the loop writes them. A
/// client that sends a batch of reads at once (an edge's vhost-user queue pass, 32 reads at
/// queue depth 32) then gets the first replies while the rest execute, so its completions, and
/// the guest's next requests, overlap with this side's work instead of alternating with it.
/// Measured with `vstor-bench edge --cpus split` (4 KiB reads at QD32, two runs each): 128 KiB
/// (a whole batch, no overlap) kept 0.48–0.51× of the local IOPS and 16 KiB (more writes)
/// 0.58–0.84×, against a median of 0.77–0.88× at 32 KiB.
const REPLY_BATCH: usize = 32 * 1024;
/// How often a request held back by a hand-off ([`Refused::Wait`]) looks at its outcome: a
/// move's release takes from milliseconds (a flush and a TLog upload) to seconds, and while it
/// runs the edge's requests wait anyway.
const HANDOFF_POLL: Duration = Duration::from_millis(2);
/// Longest a request waits for a hand-off's outcome before it is refused as `NotOwner`.
const HANDOFF_WAIT: Duration = Duration::from_secs(10);
/// How long a stopping server gives a session to write its goodbye (`Session::say_goodbye`)
/// before the connection is dropped anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Largest read one request may ask for (its reply must fit in a frame).
const MAX_READ: usize = MAX_FRAME_PAYLOAD - 64;
/// Requests are 512-byte aligned, like the frontends'.
const SECTOR: u64 = 512;

/// Where the edge server takes its connections: the TCP listener (`--edge-listen`), or the unix
/// socket (`--edge-socket`) that edges on the same host prefer.
pub enum EdgeListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for EdgeListener {
    fn from(listener: TcpListener) -> Self {
        EdgeListener::Tcp(listener)
    }
}

impl From<UnixListener> for EdgeListener {
    fn from(listener: UnixListener) -> Self {
        EdgeListener::Unix(listener)
    }
}

/// An accepted connection, before its session.
enum Incoming {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl EdgeListener {
    async fn accept(&self) -> std::io::Result<Incoming> {
        match self {
            EdgeListener::Tcp(l) => l.accept().await.map(|(s, a)| Incoming::Tcp(s, a)),
            EdgeListener::Unix(l) => l.accept().await.map(|(s, _)| Incoming::Unix(s)),
        }
    }
}

/// Serve the edge protocol on `listener` until `shutdown` is cancelled; then every connection is
/// closed (clients reconnect elsewhere or later).
pub async fn serve(
    listener: impl Into<EdgeListener>,
    exports: Arc<dyn RemoteExports>,
    config: EdgeServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = listener.into();
    let config = Arc::new(config);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            // Checked first: no connection is accepted once the server is stopping.
            biased;
            _ = shutdown.cancelled() => break,
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let incoming = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: keep serving the connections we have.
                        warn!(error = %e, "edge server: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let exports = Arc::clone(&exports);
                let config = Arc::clone(&config);
                let stop = shutdown.child_token();
                conns.spawn(async move {
                    let goodbye = stop.clone();
                    let served = async {
                        match incoming {
                            Incoming::Tcp(stream, peer) => {
                                connection(stream, peer, exports, config, goodbye).await;
                            }
                            Incoming::Unix(stream) => {
                                local(stream, exports, &config, goodbye).await;
                            }
                        }
                    };
                    tokio::pin!(served);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        () = &mut served => return,
                    }
                    // A session sees the same token and ends by itself once it has told its
                    // edge what it may assume (`Session::say_goodbye`); one still in its
                    // handshake, or whose edge does not read, is dropped.
                    if tokio::time::timeout(CLOSE_GRACE, served).await.is_err() {
                        debug!("edge connection closed by server shutdown");
                    }
                });
            }
        }
    }
    // Every connection ends by itself within `CLOSE_GRACE` of the shutdown (after its
    // goodbye); aborting them here would cut the goodbye short.
    while conns.join_next().await.is_some() {}
    Ok(())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    exports: Arc<dyn RemoteExports>,
    config: Arc<EdgeServerConfig>,
    stop: CancellationToken,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    // An edge host that lost power leaves no FIN: keepalive frees its connection in ~20 s.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
        debug!(%peer, error = %e, "cannot set TCP keepalive");
    }
    let label = peer.to_string();
    match vstor_net::accept_peer(config.tls.as_ref(), stream, HELLO_TIMEOUT).await {
        Ok(Accepted::Stream(PeerStream::Plain(tcp))) => {
            session(tcp, label, exports, &config, stop).await;
        }
        Ok(Accepted::Stream(PeerStream::Server(tls))) => {
            session(*tls, label, exports, &config, stop).await;
        }
        Ok(Accepted::Stream(PeerStream::Client(_) | PeerStream::Unix(_)) | Accepted::Closed) => {}
        Ok(Accepted::PlainRefused(mut tcp)) => {
            warn!(%peer, "plain-text edge refused: this edge server requires mutual TLS");
            refuse_plain(&mut tcp).await;
        }
        Err(e) => warn!(%peer, error = %e, "edge client refused"),
    }
}

/// A connection on the unix socket: an edge on this host. TLS is not asked for (nothing
/// crosses a network); instead the peer must run as this server's user or as root
/// (`SO_PEERCRED`), on top of the socket file's mode 0600. Anyone else is closed on without a
/// word: it could not have reached the socket unless its permissions were loosened.
async fn local(
    stream: UnixStream,
    exports: Arc<dyn RemoteExports>,
    config: &EdgeServerConfig,
    stop: CancellationToken,
) {
    let cred = match stream.peer_cred() {
        Ok(cred) => cred,
        Err(e) => {
            warn!(error = %e, "edge server: cannot read a local peer's credentials, closing");
            return;
        }
    };
    let pid = cred
        .pid()
        .map_or_else(|| "?".to_string(), |p| p.to_string());
    if !local_peer_allowed(cred.uid(), effective_uid()) {
        warn!(
            uid = cred.uid(),
            pid, "edge server: local peer refused (neither root nor this server's user)"
        );
        return;
    }
    session(stream, format!("local pid {pid}"), exports, config, stop).await;
}

/// Whether a local peer running as `peer_uid` may speak to a server running as `own_uid`.
fn local_peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Answer a plain-text client's `Hello` on a TLS server with the reason, then close.
async fn refuse_plain(tcp: &mut TcpStream) {
    let mut rbuf = BytesMut::with_capacity(READ_BUF);
    if let Ok(Ok(Some(_))) = tokio::time::timeout(HELLO_TIMEOUT, read_frame(tcp, &mut rbuf)).await {
        let mut out = OutQueue::new();
        let refusal = Message::Error {
            code: ErrorCode::Invalid,
            message: vstor_net::PLAIN_REFUSED.to_string(),
        };
        if out.push(&Frame::new(0, refusal)).is_ok() {
            let _ = out.write_all(tcp).await;
        }
    }
}

/// Handshake and serve one connection on its (plain or TLS) stream.
async fn session<S: NbdStream>(
    mut stream: S,
    peer: String,
    exports: Arc<dyn RemoteExports>,
    config: &EdgeServerConfig,
    stop: CancellationToken,
) {
    let mut rbuf = BytesMut::with_capacity(READ_BUF);
    let mut out = OutQueue::new();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream, &mut rbuf)).await
    {
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "edge handshake: bad frame, closing");
            return;
        }
        Err(_) => {
            warn!(%peer, "edge handshake: no Hello within {HELLO_TIMEOUT:?}, closing");
            return;
        }
    };
    await_opening(&hello, &exports, &peer, OPENING_WAIT).await;
    // A server that began stopping welcomes nobody: the goodbye's grace is for sessions that
    // have an edge to tell something, not for one that would only connect and be closed.
    if stop.is_cancelled() {
        return;
    }
    let Some(welcomed) = handshake(hello, &exports, &mut out, &peer) else {
        // Best effort: the refusal is what the client needs, the close follows anyway.
        let _ = out.write_all(&mut stream).await;
        return;
    };
    if let Err(e) = out.write_all(&mut stream).await {
        debug!(%peer, volume = welcomed.volume, error = %e, "edge handshake: cannot send Welcome");
        return;
    }
    let mut session = Session {
        peer,
        volume: welcomed.volume,
        served: welcomed.served,
        version: welcomed.version,
        access: welcomed.access,
        max_inflight: config.max_inflight.max(1),
        frame_timeout: config.frame_timeout,
        pending: FuturesUnordered::new(),
        out,
        throttle_until: None,
        device_writes: DeviceWrites::default(),
        handoff_since: None,
        held: Vec::new(),
        stop,
    };
    match session.run(&mut stream, rbuf).await {
        Ok(()) => info!(
            peer = session.peer,
            volume = session.volume,
            "edge client disconnected"
        ),
        Err(e) => warn!(peer = session.peer, volume = session.volume, error = %e,
            "edge connection closed"),
    }
}

fn error_code(err: &TargetError) -> ErrorCode {
    match err {
        TargetError::OutOfRange { .. } => ErrorCode::OutOfRange,
        TargetError::ReadOnly => ErrorCode::ReadOnly,
        TargetError::Shutdown => ErrorCode::Shutdown,
        TargetError::Io(_) => ErrorCode::Io,
    }
}

/// What a completed request answers.
enum Output {
    Done(WriteAck),
    Data(Bytes),
    Extents(Vec<Extent>),
}

struct Completion {
    id: u64,
    result: Result<Output, TargetError>,
}

type PendingCompletion = Pin<Box<dyn Future<Output = Completion> + Send>>;

/// A request refused before it ran.
struct Refusal(ErrorCode, String);

impl From<TargetError> for Refusal {
    fn from(err: TargetError) -> Self {
        Refusal(error_code(&err), err.to_string())
    }
}

struct Session {
    /// `IP:port` of a TCP peer, `local pid N` of one on the unix socket, for the log.
    peer: String,
    volume: String,
    served: ServedVolume,
    /// Protocol version of this connection (chosen from the client's `Hello`).
    version: u16,
    /// The allow list last sent (`None` on a version-1 connection: nothing is pushed).
    access: Option<AllowList>,
    max_inflight: usize,
    frame_timeout: Duration,
    /// Every request that completes later: pending acknowledgements, blocking operations and slow
    /// reads, polled by this task (its length is the number in flight).
    pending: FuturesUnordered<PendingCompletion>,
    out: OutQueue,
    throttle_until: Option<Instant>,
    /// Writes running on the blocking pool because they wait for the disk, and the rule for
    /// what must wait for them (`device_writes`).
    device_writes: DeviceWrites,
    /// Since when requests wait for a hand-off of the volume (`owner_check`).
    handoff_since: Option<Instant>,
    /// Requests that failed while the volume was being handed over, answered once the
    /// hand-off's outcome is known (`settle_held`).
    held: Vec<u64>,
    /// Cancelled when the server stops: the session says goodbye (`say_goodbye`) and ends.
    stop: CancellationToken,
}

impl Session {
    fn target(&self) -> &Arc<dyn BlockTarget> {
        &self.served.target
    }

    fn reply(&mut self, id: u64, message: Message) {
        if let Err(e) = self.out.push(&Frame::new(id, message)) {
            warn!(peer = %self.peer, volume = self.volume, id, error = %e, "cannot encode reply");
            let _ = self.out.push(&Frame::new(
                id,
                Message::Error {
                    code: ErrorCode::Io,
                    message: format!("cannot encode reply: {e}"),
                },
            ));
        }
    }

    fn complete(&mut self, done: Completion) {
        self.device_writes.end(done.id);
        if matches!(done.result, Err(TargetError::Io(_))) && self.owner_changed_meanwhile(done.id) {
            return;
        }
        let dtl_in_sync = self.served.state.dtl_in_sync();
        let message = match done.result {
            Ok(Output::Done(ack)) => {
                self.throttle(&ack);
                Message::Done { dtl_in_sync }
            }
            Ok(Output::Data(data)) => Message::Data { dtl_in_sync, data },
            Ok(Output::Extents(extents)) => Message::Extents { extents },
            Err(err) => {
                debug!(peer = %self.peer, volume = self.volume, id = done.id, error = %err,
                    "edge request failed");
                Message::Error {
                    code: error_code(&err),
                    message: format!("volume {}: {err}", self.volume),
                }
            }
        };
        self.reply(done.id, message);
    }

    /// Push the volume's allow list if it changed since it was last sent.
    fn refresh_access(&mut self) {
        let Some(sent) = &self.access else {
            return;
        };
        let now = self.served.state.access();
        if *sent == now {
            return;
        }
        match self.out.push(&Frame::new(0, Message::Access(now.clone()))) {
            Ok(()) => {
                info!(peer = %self.peer, volume = self.volume, subjects = now.subjects.len(),
                    networks = now.networks.len(), "allow list changed: sent to the edge");
                self.access = Some(now);
            }
            // Keep the old one as "sent": the next poll tries again.
            Err(e) => warn!(peer = %self.peer, volume = self.volume, error = %e,
                "cannot send the changed allow list"),
        }
    }

    fn throttle(&mut self, ack: &WriteAck) {
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

    fn full(&self) -> bool {
        self.pending.len() >= self.max_inflight
    }

    /// Execute one request, or hand it back (`Err`) when it needs an in-flight slot and none is
    /// free.
    fn handle(&mut self, frame: Frame) -> Result<(), Frame> {
        let id = frame.id;
        let Some(tag) = frame.message.tag() else {
            warn!(peer = %self.peer, volume = self.volume, id, got = frame.message.name(),
                "edge client sent a non-request frame");
            let message = format!("{} is not a request", frame.message.name());
            self.reply(
                id,
                Message::Error {
                    code: ErrorCode::Invalid,
                    message,
                },
            );
            return Ok(());
        };
        match self.owner_check(tag) {
            Ok(()) => {}
            Err(Refused::Wait) if self.may_read_during_handoff(&frame.message, tag) => {}
            Err(Refused::Wait) => return Err(frame),
            Err(Refused::Now(code, message)) => {
                self.reply(id, Message::Error { code, message });
                return Ok(());
            }
        }
        if (self.full() && self.may_need_slot(&frame.message))
            || self.device_writes.blocks(&frame.message)
        {
            return Err(frame);
        }
        if let Err(Refusal(code, message)) = self.execute(id, frame.message) {
            if !(code == ErrorCode::Io && self.owner_changed_meanwhile(id)) {
                self.reply(id, Message::Error { code, message });
            }
        }
        Ok(())
    }

    /// Whether `message` may run although the volume is being handed to another node
    /// ([`Refused::Wait`]): a read or block status under the tag the volume is held under. The
    /// volume is still here and unchanged since its writes were refused, and no other node
    /// serves it before the hand-off ends, so a read answers what the next owner would; a
    /// guest that only reads then sees no pause until the hand-off is done. A read that
    /// finishes after the volume stopped fails at it and is answered with the owner's refusal
    /// (`owner_changed_meanwhile`), so the edge sends it again. Writes, flushes and trims still
    /// wait: only the hand-off's outcome says where they must run.
    fn may_read_during_handoff(&self, message: &Message, tag: u64) -> bool {
        matches!(message, Message::Read { .. } | Message::BlockStatus { .. })
            && tag == self.served.state.tag()
    }

    /// Request `id` failed with an I/O error. The volume refuses writes by itself once a
    /// hand-off or a fence began, which can happen after the owner check that let the request
    /// run (between the check and an inline write, or while a FUA write waited for the blocking
    /// pool): that is the owner changing, not an I/O error, and the request was not
    /// acknowledged. If the owner check no longer passes, answer its refusal instead, or, during
    /// a hand-off, hold the answer until its outcome (`settle_held`). True when so answered.
    fn owner_changed_meanwhile(&mut self, id: u64) -> bool {
        match self.owner_check(self.served.state.tag()) {
            Ok(()) => false,
            Err(Refused::Wait) => {
                self.held.push(id);
                true
            }
            Err(Refused::Now(code, message)) => {
                self.reply(id, Message::Error { code, message });
                true
            }
        }
    }

    /// Answer the requests whose failure waits for a hand-off's outcome (`held`) once it is
    /// known: refused (`Released` after a clean hand-off), or, if the hand-off failed and the
    /// volume is served here again, refused as `NotOwner` so that the edge sends them again
    /// (they failed at the volume's gate and did not run).
    fn settle_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let (code, message) = match self.owner_check(self.served.state.tag()) {
            Err(Refused::Wait) => return,
            Err(Refused::Now(code, message)) => (code, message),
            Ok(()) => (
                ErrorCode::NotOwner,
                format!(
                    "volume {}: refused while it was being handed over; send it again",
                    self.volume
                ),
            ),
        };
        for id in std::mem::take(&mut self.held) {
            self.reply(
                id,
                Message::Error {
                    code,
                    message: message.clone(),
                },
            );
        }
    }

    /// The server is stopping (a clean stop of the node, after its volumes were flushed and
    /// uploaded): answer the requests waiting for the hand-off, and, if the volume was handed
    /// over cleanly, say so once more with id 0, so that an edge with nothing in flight learns
    /// it too (the connection's close alone would look like a crash). Requests still executing
    /// are left to the edge's resubmission rule.
    fn say_goodbye(&mut self, stalled: Option<Frame>) {
        let released = self.version >= RELEASED_VERSION
            && self.served.state.fenced().is_none()
            && self.served.state.handoff() == Handoff::Released;
        let (code, message) = if released {
            (
                ErrorCode::Released,
                format!(
                    "volume {} was handed to another node; all its data is on the backend",
                    self.volume
                ),
            )
        } else {
            (
                ErrorCode::Shutdown,
                format!("volume {}: this node is stopping", self.volume),
            )
        };
        let waiting = stalled.map(|frame| frame.id).into_iter();
        for id in waiting.chain(std::mem::take(&mut self.held)) {
            self.reply(
                id,
                Message::Error {
                    code,
                    message: message.clone(),
                },
            );
        }
        if released {
            self.reply(0, Message::Error { code, message });
        }
    }

    /// [`owner_check`] for a request of this connection, bounding how long requests wait for
    /// a hand-off ([`HANDOFF_WAIT`]): past that they are refused as `NotOwner`, and the edge
    /// looks for the owner without the promise that `Released` would have carried.
    fn owner_check(&mut self, tag: u64) -> Result<(), Refused> {
        let checked = owner_check(&self.served, &self.volume, tag, self.version);
        if !matches!(checked, Err(Refused::Wait)) {
            self.handoff_since = None;
            return checked;
        }
        let now = Instant::now();
        let since = *self.handoff_since.get_or_insert(now);
        if now.duration_since(since) >= HANDOFF_WAIT {
            return Err(Refused::Now(
                ErrorCode::NotOwner,
                format!(
                    "volume {} is being handed to another node (still after {HANDOFF_WAIT:?})",
                    self.volume
                ),
            ));
        }
        Err(Refused::Wait)
    }

    fn may_need_slot(&self, message: &Message) -> bool {
        // Writes may return a pending acknowledgement; reads may go to the backend.
        !matches!(message, Message::BlockStatus { .. })
    }

    fn execute(&mut self, id: u64, message: Message) -> Result<(), Refusal> {
        match message {
            Message::Read { offset, len, .. } => self.read(id, offset, len as usize),
            Message::Write {
                offset, fua, data, ..
            } => {
                self.check(offset, data.len() as u64, true)?;
                // A write that waits for the disk (a volume's large `O_DIRECT` copy) or must
                // first fetch data from the backend (a sub-cluster write over evicted data)
                // would stop this task, and the runtime thread under it, for the device's or the
                // backend's time: it runs on the blocking pool, and what touches its range waits
                // (`device_writes`).
                if self.target().write_waits(data.len())
                    || self.target().write_reads_backend(offset, data.len() as u64)
                {
                    let len = data.len() as u64;
                    self.spawn_ordered(id, offset, len, move |t| t.write(offset, &data, fua));
                    return Ok(());
                }
                if fua && !self.target().fua_inline() {
                    self.spawn_blocking(id, move |t| t.write(offset, &data, true));
                    return Ok(());
                }
                let ack = self.target().write(offset, &data, fua)?;
                self.acknowledge(id, ack);
                Ok(())
            }
            Message::Flush { .. } => {
                match self.target().flush_async() {
                    Some(flush) => self.acknowledge(
                        id,
                        WriteAck {
                            throttle: None,
                            pending: Some(flush),
                        },
                    ),
                    None => self.spawn_blocking(id, |t| t.flush().map(|()| WriteAck::default())),
                }
                Ok(())
            }
            Message::Trim { offset, len, .. } => {
                self.check(offset, len, true)?;
                if self.target().write_reads_backend(offset, len) {
                    self.spawn_ordered(id, offset, len, move |t| t.discard(offset, len));
                    return Ok(());
                }
                let ack = self.target().discard(offset, len)?;
                self.acknowledge(id, ack);
                Ok(())
            }
            Message::WriteZeroes {
                offset,
                len,
                allocate,
                fua,
                ..
            } => {
                self.check(offset, len, true)?;
                if self.target().write_reads_backend(offset, len) {
                    self.spawn_ordered(id, offset, len, move |t| {
                        t.write_zeroes(offset, len, allocate, fua)
                    });
                    return Ok(());
                }
                if fua && !self.target().fua_inline() {
                    self.spawn_blocking(id, move |t| t.write_zeroes(offset, len, allocate, true));
                    return Ok(());
                }
                let ack = self.target().write_zeroes(offset, len, allocate, fua)?;
                self.acknowledge(id, ack);
                Ok(())
            }
            Message::BlockStatus { offset, len, .. } => {
                self.check(offset, len, false)?;
                let mut extents = self.target().block_status(offset, len)?;
                extents.truncate(MAX_EXTENTS);
                self.complete(Completion {
                    id,
                    result: Ok(Output::Extents(extents)),
                });
                Ok(())
            }
            other => Err(Refusal(
                ErrorCode::Invalid,
                format!("{} is not a request", other.name()),
            )),
        }
    }

    /// Validate `[offset, offset+len)`: nonzero, 512-byte aligned, inside the volume, and
    /// writable if it modifies.
    fn check(&self, offset: u64, len: u64, modifies: bool) -> Result<(), Refusal> {
        if modifies && self.target().read_only() {
            return Err(Refusal(
                ErrorCode::ReadOnly,
                format!("volume {} is read-only", self.volume),
            ));
        }
        if len == 0 || !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(Refusal(
                ErrorCode::Invalid,
                format!("request [{offset}, +{len}) is empty or not 512-byte aligned"),
            ));
        }
        let size = self.target().size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Refusal(
                ErrorCode::OutOfRange,
                format!(
                    "request [{offset}, +{len}) is beyond the end of volume {} ({size} bytes)",
                    self.volume
                ),
            )),
        }
    }

    fn read(&mut self, id: u64, offset: u64, len: usize) -> Result<(), Refusal> {
        self.check(offset, len as u64, false)?;
        if len > MAX_READ {
            return Err(Refusal(
                ErrorCode::Invalid,
                format!("read of {len} bytes exceeds the limit of {MAX_READ}"),
            ));
        }
        let mut buf = BytesMut::zeroed(len);
        match self.target().try_read(offset, &mut buf)? {
            ReadAttempt::Done => {
                let dtl_in_sync = self.served.state.dtl_in_sync();
                let data = buf.freeze();
                self.reply(id, Message::Data { dtl_in_sync, data });
            }
            ReadAttempt::WouldBlock => self.spawn_read(id, offset, buf),
        }
        Ok(())
    }

    /// A read that must wait for the backend: the target's asynchronous read, or the bounded
    /// backend-read pool.
    fn spawn_read(&mut self, id: u64, offset: u64, mut buf: BytesMut) {
        if let Some(read) = self.target().read_async(offset, buf.len()) {
            self.pending.push(Box::pin(async move {
                let result = read.await.map(Output::Data);
                Completion { id, result }
            }));
            return;
        }
        let target = Arc::clone(self.target());
        let (tx, rx) = oneshot::channel();
        read_pool::spawn(&tokio::runtime::Handle::current(), move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                target
                    .read(offset, &mut buf)
                    .map(|()| Output::Data(buf.freeze()))
            }))
            .unwrap_or_else(|_| Err(TargetError::Io("target panicked".into())));
            let _ = tx.send(result);
        });
        self.pending.push(Box::pin(async move {
            let result = rx
                .await
                .unwrap_or_else(|_| Err(TargetError::Io("read was abandoned".into())));
            Completion { id, result }
        }));
    }

    /// Flush and FUA operations wait for fsync, large writes for the disk: run them on the
    /// blocking pool.
    /// Run `op`, a request on `[offset, offset+len)` that waits for the disk or the backend, on
    /// the blocking pool; requests touching its range (and flushes) wait for it
    /// (`device_writes`), so they still take effect in arrival order.
    fn spawn_ordered<F>(&mut self, id: u64, offset: u64, len: u64, op: F)
    where
        F: FnOnce(&dyn BlockTarget) -> Result<WriteAck, TargetError> + Send + 'static,
    {
        self.device_writes.begin(id, offset, len);
        self.spawn_blocking(id, op);
    }

    fn spawn_blocking<F>(&mut self, id: u64, op: F)
    where
        F: FnOnce(&dyn BlockTarget) -> Result<WriteAck, TargetError> + Send + 'static,
    {
        let target = Arc::clone(self.target());
        let job = tokio::task::spawn_blocking(move || {
            let mut ack = op(target.as_ref())?;
            ack.wait_blocking()?;
            Ok(Output::Done(ack))
        });
        self.pending.push(Box::pin(async move {
            let result = job
                .await
                .unwrap_or_else(|e| Err(TargetError::Io(format!("operation failed: {e}"))));
            Completion { id, result }
        }));
    }

    /// Reply now, or once the write's pending acknowledgement completes.
    fn acknowledge(&mut self, id: u64, mut ack: WriteAck) {
        match ack.pending.take() {
            None => self.complete(Completion {
                id,
                result: Ok(Output::Done(ack)),
            }),
            Some(pending) => {
                self.throttle(&ack);
                self.pending.push(Box::pin(async move {
                    let result = pending.await.map(|()| Output::Done(WriteAck::default()));
                    Completion { id, result }
                }));
            }
        }
    }

    /// Serve requests until the client closes the connection (after its replies went out) or
    /// something fails.
    async fn run<S: NbdStream>(
        &mut self,
        stream: &mut S,
        mut rbuf: BytesMut,
    ) -> Result<(), ProtoError> {
        let (mut rd, mut wr) = stream.halves();
        let mut codec = EdgeCodec::with_version(self.version);
        let mut access_check = Instant::now() + ACCESS_POLL;
        let mut stalled: Option<Frame> = None;
        let mut eof = false;
        // When the frame partly buffered now must be complete (`None`: no partial frame).
        let mut frame_deadline: Option<Instant> = None;
        loop {
            self.settle_held();
            let mut drained = false;
            let replies_before = self.out.len();
            while self.out.len() < WRITE_HIGH_WATER && !self.throttled() {
                if self.out.len() - replies_before >= REPLY_BATCH {
                    // Let these replies go before executing more: see `REPLY_BATCH`.
                    break;
                }
                let frame = match stalled.take() {
                    Some(f) => f,
                    None => match codec.decode(&mut rbuf) {
                        Ok(Some(f)) => f,
                        Ok(None) => {
                            drained = true;
                            break;
                        }
                        Err(e) => {
                            warn!(peer = %self.peer, volume = self.volume, error = %e,
                                "malformed edge frame, closing the connection");
                            // Send what is already complete: those requests did run.
                            let _ = self.out.write_all(&mut wr).await;
                            return Err(e);
                        }
                    },
                };
                if let Err(frame) = self.handle(frame) {
                    stalled = Some(frame);
                    break;
                }
            }
            if eof && self.pending.is_empty() && self.out.is_empty() {
                return Ok(());
            }
            // Only a frame waiting for the client's bytes counts, not one this side has not
            // read yet because of backpressure.
            frame_deadline = match (drained && !rbuf.is_empty(), frame_deadline) {
                (false, _) => None,
                (true, None) => Some(Instant::now() + self.frame_timeout),
                (true, deadline) => deadline,
            };
            let can_read = !eof
                && stalled.is_none()
                && self.throttle_until.is_none()
                && self.out.len() < WRITE_HIGH_WATER;
            if can_read && rbuf.capacity() - rbuf.len() < READ_MIN_SPARE {
                rbuf.reserve(READ_BUF);
            }
            let throttle_until = self.throttle_until;
            let pushes_access = self.access.is_some();
            // A request held back by a hand-off looks again shortly (`HANDOFF_POLL`).
            let handoff_retry = ((stalled.is_some() && self.handoff_since.is_some())
                || !self.held.is_empty())
            .then(|| Instant::now() + HANDOFF_POLL);
            // In order: completions, then replies out, before more requests are read in, so a
            // batch's replies leave as they are made (`REPLY_BATCH`). Nothing starves: writing
            // empties `out`, and reading is bounded by `max_inflight`.
            tokio::select! {
                biased;
                Some(done) = self.pending.next(), if !self.pending.is_empty() => {
                    self.complete(done);
                    // Batch: take every completion that is ready before writing.
                    while let Some(Some(done)) = self.pending.next().now_or_never() {
                        self.complete(done);
                    }
                }
                written = self.out.write_some(&mut wr), if !self.out.is_empty() => {
                    written?;
                    // TLS keeps records until flushed (the client's reader always reads, so
                    // this cannot wait on us); TCP's flush is skipped at compile time.
                    if S::NEEDS_FLUSH && self.out.is_empty() {
                        wr.flush().await?;
                    }
                }
                () = sleep_until(throttle_until), if throttle_until.is_some() => {
                    self.throttle_until = None;
                }
                () = sleep_until(handoff_retry), if handoff_retry.is_some() => {}
                () = self.stop.cancelled() => {
                    self.say_goodbye(stalled.take());
                    self.out.write_all(&mut wr).await?;
                    if S::NEEDS_FLUSH {
                        wr.flush().await?;
                    }
                    return Ok(());
                }
                () = tokio::time::sleep_until(access_check), if pushes_access => {
                    self.refresh_access();
                    access_check = Instant::now() + ACCESS_POLL;
                }
                () = sleep_until(frame_deadline), if frame_deadline.is_some() && can_read => {
                    return Err(ProtoError::Truncated(
                        "frame incomplete within the frame timeout",
                    ));
                }
                read = rd.read_buf(&mut rbuf), if can_read => {
                    if read? == 0 {
                        eof = true;
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::local_peer_allowed;

    #[test]
    fn a_local_peer_must_be_root_or_the_servers_user() {
        assert!(local_peer_allowed(0, 1000));
        assert!(local_peer_allowed(1000, 1000));
        assert!(local_peer_allowed(0, 0));
        assert!(!local_peer_allowed(1001, 1000));
        assert!(!local_peer_allowed(1000, 0));
    }
}

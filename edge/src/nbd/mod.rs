//! The NBD server: exports every volume of an [`ExportRegistry`] over the Network Block Device
//! protocol (`doc/proto.md` of the NBD project), so that qemu, libnbd tools or the kernel's
//! `nbd-client` can use a vstor volume as a disk.
//!
//! # Why a server of our own
//!
//! The `nbd` crate only offers a synchronous, one-request-at-a-time server without `NBD_OPT_GO`,
//! structured replies or block status. qemu and the kernel keep tens of requests in flight per
//! connection and expect `NBD_OPT_GO`, block-size negotiation, `base:allocation` and FUA, so the
//! server is written here on tokio.
//!
//! # Shape
//!
//! * [`proto`]: constants and the transmission-phase codec (requests decoded with a
//!   `tokio_util` `Decoder`, replies encoded with an `Encoder`).
//! * `handshake`: fixed-newstyle option haggling (`NBD_OPT_GO`/`INFO`/`EXPORT_NAME`/`LIST`,
//!   structured replies, `base:allocation`).
//! * `conn`: the per-connection event loop. Fast operations run inline on the connection's task;
//!   only fsync-bound ones (`FLUSH`, FUA) hop to the blocking pool. See that module for why.
//! * [`tls`]: `NBD_OPT_STARTTLS` (allow or require, optional client certificates), and `stream`,
//!   which lets `conn` run on plain TCP or TLS without slowing the plain path.
//! * Per-export allow lists: the handshake knows the client (peer address, verified certificate
//!   CN) and lets the registry decide which exports it sees and opens (`handshake`).
//!
//! [`NbdServer`] owns the bookkeeping around them: a table of live connections (used by
//! [`NbdServer::connections`], [`NbdServer::disconnect_export`] and [`NbdServer::shutdown`]) and
//! the shutdown signal.
//!
//! # Shutdown
//!
//! `shutdown()` stops the accept loops and closes connections still in the handshake. Attached
//! connections switch to draining: operations already started finish and are answered, every
//! request that arrives afterwards gets `NBD_ESHUTDOWN`, and the connection closes as soon as the
//! client sends `NBD_CMD_DISC` or hangs up, or after a grace period
//! ([`NbdServer::with_shutdown_grace`], 1 s by default) once nothing is in flight.
//!
//! # Errors and hostile clients
//!
//! Malformed requests get an NBD error reply and the connection carries on. The connection is
//! closed only where the stream cannot be trusted any more (bad magic, unknown client flags, a
//! failing `NBD_OPT_EXPORT_NAME`). All buffering is bounded: option data by 64 KiB, `WRITE`
//! payloads by `max_payload` (larger ones are read and dropped, then answered with `EINVAL`), and
//! replies waiting for a slow reader by a high-water mark after which the socket is not read.
//!
//! Limits against clients that hold resources rather than misbehave on the wire: connections in
//! total and per client IP address (a connection past either is closed right after `accept`,
//! before the greeting), the time from connect to the transmission phase (`handshake_timeout`:
//! a client that trickles its options, or never sends a TLS ClientHello, is dropped), and the
//! bytes of `READ`/`WRITE` requests in flight per connection (past it the connection stops
//! reading the socket until some complete, so TCP pushes back on the client).

pub mod client;
pub mod client_tls;
pub mod map_client;
pub mod proto;
pub mod tls;

mod conn;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod handshake;
pub(crate) mod stream;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::target::{Client, ExportRegistry};
use handshake::{Negotiated, Outcome, TlsPhase, PREFERRED_BLOCK_SIZE};
use stream::NbdStream;
pub use tls::{NbdTls, TlsFiles, TlsMode};

/// How long a client may take to finish the handshake, by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Largest READ/WRITE we can describe: a structured data chunk carries 8 bytes of offset in a
/// 32-bit length, and the maximum block size must be a multiple of the 512-byte minimum.
const MAX_PAYLOAD_LIMIT: u32 = (u32::MAX - 8) & !511;

/// Failures of the NBD server itself (as opposed to errors reported to clients).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error("client flags {0:#x} contain unknown bits")]
    UnknownClientFlags(u32),
    #[error("export name of {0} bytes is longer than 4096")]
    ExportNameTooLong(u32),
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("reply of {0} bytes does not fit in one chunk")]
    ReplyTooLarge(usize),
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("client sent NBD_OPT_EXPORT_NAME without STARTTLS, but TLS is required")]
    TlsRequired,
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error("TLS {what} {path}: {reason}")]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
}

/// Tunables of the NBD server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdServerConfig {
    /// Largest READ/WRITE accepted, advertised as the maximum block size. Rounded down to a
    /// multiple of 512 and kept within [4096, 2^32 - 512].
    pub max_payload: u32,
    /// Operations running off the connection's task at once per connection (`FLUSH`, FUA
    /// writes, reads waiting for the backend); further ones wait, and the connection stops
    /// reading until one finishes.
    pub max_inflight_per_conn: usize,
    /// How long a client may take from connecting to entering the transmission phase (option
    /// haggling and the TLS handshake included); then the connection is closed.
    pub handshake_timeout: Duration,
    /// Connections at once, in total (handshakes included).
    pub max_connections: usize,
    /// Connections at once from one client IP address.
    pub max_connections_per_client: usize,
    /// Bytes of `READ`/`WRITE` requests in flight per connection (running off the connection's
    /// task) above which the connection stops reading requests.
    pub max_inflight_bytes_per_conn: u64,
}

impl Default for NbdServerConfig {
    fn default() -> Self {
        Self {
            max_payload: 32 * 1024 * 1024,
            max_inflight_per_conn: 64,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: 1024,
            max_connections_per_client: 128,
            max_inflight_bytes_per_conn: 256 * 1024 * 1024,
        }
    }
}

impl NbdServerConfig {
    fn effective_max_payload(&self) -> u32 {
        (self.max_payload & !511).clamp(PREFERRED_BLOCK_SIZE, MAX_PAYLOAD_LIMIT)
    }
}

struct ConnEntry {
    ip: IpAddr,
    export: Option<String>,
    kill: CancellationToken,
}

#[derive(Default)]
struct ConnTable {
    shutting_down: bool,
    conns: HashMap<u64, ConnEntry>,
    per_client: HashMap<IpAddr, usize>,
}

/// Why a new connection was not registered.
enum Refused {
    ShuttingDown,
    TooMany(usize),
    TooManyFromClient(usize),
}

struct Inner {
    registry: Arc<dyn ExportRegistry>,
    max_payload: u32,
    max_inflight: usize,
    handshake_timeout: Duration,
    max_connections: usize,
    max_connections_per_client: usize,
    max_inflight_bytes: u64,
    tls: Option<NbdTls>,
    shutdown_grace_ms: AtomicU64,
    shutdown: CancellationToken,
    table: Mutex<ConnTable>,
    all_closed: Notify,
    /// Notified whenever a connection goes away.
    conn_closed: Notify,
    next_id: AtomicU64,
}

impl Inner {
    fn table(&self) -> MutexGuard<'_, ConnTable> {
        // The table stays consistent across a panic (single inserts/removes), so poisoning is moot.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Add a connection unless the server is shutting down or a connection limit is reached.
    fn register(&self, kill: &CancellationToken, ip: IpAddr) -> Result<u64, Refused> {
        let mut table = self.table();
        if table.shutting_down {
            return Err(Refused::ShuttingDown);
        }
        if table.conns.len() >= self.max_connections {
            return Err(Refused::TooMany(self.max_connections));
        }
        let from_client = table.per_client.entry(ip).or_insert(0);
        if *from_client >= self.max_connections_per_client {
            return Err(Refused::TooManyFromClient(self.max_connections_per_client));
        }
        *from_client += 1;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        table.conns.insert(
            id,
            ConnEntry {
                ip,
                export: None,
                kill: kill.clone(),
            },
        );
        Ok(id)
    }

    fn attach(&self, id: u64, export: &str) {
        if let Some(entry) = self.table().conns.get_mut(&id) {
            entry.export = Some(export.to_owned());
        }
    }

    fn deregister(&self, id: u64) {
        let mut table = self.table();
        if let Some(entry) = table.conns.remove(&id) {
            if let Some(n) = table.per_client.get_mut(&entry.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    table.per_client.remove(&entry.ip);
                }
            }
        }
        if table.conns.is_empty() {
            self.all_closed.notify_waiters();
        }
        self.conn_closed.notify_waiters();
    }
}

/// Removes the connection from the table when dropped, so that it disappears even if its task is
/// aborted.
struct Registration {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.inner.deregister(self.id);
    }
}

/// The NBD server. Cloning is cheap and every clone controls the same server.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

impl NbdServer {
    pub fn new(registry: Arc<dyn ExportRegistry>, config: NbdServerConfig) -> Self {
        Self::with_tls(registry, config, None)
    }

    /// A server that offers (or requires) TLS when `tls` is given.
    pub fn with_tls(
        registry: Arc<dyn ExportRegistry>,
        config: NbdServerConfig,
        tls: Option<NbdTls>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry,
                max_payload: config.effective_max_payload(),
                max_inflight: config.max_inflight_per_conn.max(1),
                handshake_timeout: config.handshake_timeout,
                max_connections: config.max_connections.max(1),
                max_connections_per_client: config.max_connections_per_client.max(1),
                max_inflight_bytes: config.max_inflight_bytes_per_conn.max(1),
                tls,
                shutdown_grace_ms: AtomicU64::new(DEFAULT_SHUTDOWN_GRACE.as_millis() as u64),
                shutdown: CancellationToken::new(),
                table: Mutex::new(ConnTable::default()),
                all_closed: Notify::new(),
                conn_closed: Notify::new(),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// How long, after [`shutdown`](Self::shutdown), an idle client is given to send
    /// `NBD_CMD_DISC` before the server closes the connection. Applies to connections accepted
    /// after the call.
    pub fn with_shutdown_grace(self, grace: Duration) -> Self {
        let ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.inner.shutdown_grace_ms.store(ms, Ordering::Relaxed);
        self
    }

    /// Accept connections on an already-bound listener until [`shutdown`](Self::shutdown) is
    /// called. May run on several listeners at once.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        match listener.local_addr() {
            Ok(addr) => info!(%addr, "NBD server listening"),
            Err(e) => debug!(error = %e, "NBD listener has no local address"),
        }
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.inner.shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => self.spawn_connection(stream, peer),
                Err(e) if is_connection_error(&e) => {
                    debug!(error = %e, "NBD accept: connection failed before it was accepted");
                }
                Err(e) => {
                    // Typically EMFILE/ENFILE: back off instead of spinning on the error.
                    error!(error = %e, "NBD accept failed; retrying in 1 s");
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    fn spawn_connection(&self, stream: TcpStream, peer: SocketAddr) {
        if let Err(e) = stream.set_nodelay(true) {
            warn!(%peer, error = %e, "cannot set TCP_NODELAY on NBD connection");
        }
        let kill = CancellationToken::new();
        let id = match self.inner.register(&kill, peer.ip()) {
            Ok(id) => id,
            Err(Refused::ShuttingDown) => {
                debug!(%peer, "NBD server shutting down; dropping new connection");
                return;
            }
            Err(Refused::TooMany(limit)) => {
                warn!(%peer, limit, "NBD connection limit reached; closing new connection");
                return;
            }
            Err(Refused::TooManyFromClient(limit)) => {
                warn!(%peer, limit, "NBD connections per client address limit reached; closing new connection");
                return;
            }
        };
        let registration = Registration {
            inner: Arc::clone(&self.inner),
            id,
        };
        tokio::spawn(serve_connection(stream, peer, kill, registration));
    }

    /// Stop accepting; in-flight requests finish and are answered; requests arriving afterwards
    /// get `NBD_ESHUTDOWN`; then connections close. Returns when every connection has ended.
    pub async fn shutdown(&self) {
        let first = {
            let mut table = self.inner.table();
            !std::mem::replace(&mut table.shutting_down, true)
        };
        if first {
            info!("NBD server shutting down");
        }
        self.inner.shutdown.cancel();
        loop {
            let closed = self.inner.all_closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.inner.table().conns.is_empty() {
                return;
            }
            closed.await;
        }
    }

    /// Forcibly disconnect every client of one export (used when a volume is deleted). Remove the
    /// export from the registry first: a client still in the handshake then either fails to find
    /// it or is counted here. Returns how many were closed.
    pub fn disconnect_export(&self, name: &str) -> usize {
        let table = self.inner.table();
        let mut closed = 0;
        for entry in table.conns.values() {
            if entry.export.as_deref() == Some(name) && !entry.kill.is_cancelled() {
                entry.kill.cancel();
                closed += 1;
            }
        }
        drop(table);
        if closed > 0 {
            info!(export = name, closed, "disconnected NBD clients of export");
        }
        closed
    }

    /// Like [`disconnect_export`](Self::disconnect_export), and then wait (up to `timeout`)
    /// until those connections are gone, including any FLUSH or FUA write they had running:
    /// afterwards no request of theirs can still reach the export. Returns whether they are gone.
    pub async fn disconnect_export_and_wait(&self, name: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        self.disconnect_export(name);
        loop {
            let closed = self.inner.conn_closed.notified();
            let remaining = self
                .inner
                .table()
                .conns
                .values()
                .filter(|e| e.export.as_deref() == Some(name))
                .count();
            if remaining == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                return false;
            }
        }
    }

    /// Number of connected clients per export (for `vstor volume info`).
    pub fn connections(&self, name: &str) -> usize {
        self.inner
            .table()
            .conns
            .values()
            .filter(|e| e.export.as_deref() == Some(name) && !e.kill.is_cancelled())
            .count()
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}

/// A connection that finished the handshake, on whichever stream it ended up.
enum Handshaken {
    Plain(TcpStream, Negotiated),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Negotiated),
    Aborted,
}

/// Greeting, option haggling and, when the client sends `NBD_OPT_STARTTLS`, the TLS handshake
/// and a second round of haggling on the encrypted stream.
async fn handshake(
    mut stream: TcpStream,
    peer: SocketAddr,
    inner: &Inner,
) -> Result<Handshaken, NbdError> {
    let registry = inner.registry.as_ref();
    let mut client = Client {
        addr: peer,
        subject: None,
    };
    let no_zeroes = handshake::greet(&mut stream).await?;
    let phase = match &inner.tls {
        None => TlsPhase::Unavailable,
        Some(tls) => TlsPhase::Offered {
            required: tls.mode() == TlsMode::Require,
        },
    };
    let outcome = handshake::negotiate(
        &mut stream,
        registry,
        &client,
        inner.max_payload,
        no_zeroes,
        phase,
    )
    .await?;
    let acceptor = match (outcome, &inner.tls) {
        (Outcome::Transmission(negotiated), _) => return Ok(Handshaken::Plain(stream, negotiated)),
        (Outcome::Aborted, _) => return Ok(Handshaken::Aborted),
        (Outcome::StartTls, Some(tls)) => tls.acceptor(),
        // `negotiate` acknowledges STARTTLS only when TLS is offered.
        (Outcome::StartTls, None) => {
            return Err(NbdError::TlsConfig("TLS is not configured".into()))
        }
    };
    let mut tls = acceptor
        .accept(stream)
        .await
        .map_err(NbdError::TlsHandshake)?;
    // Only a certificate the verifier accepted is here: without `--tls-ca` none is asked for.
    client.subject = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(tls::client_subject);
    let outcome = handshake::negotiate(
        &mut tls,
        registry,
        &client,
        inner.max_payload,
        no_zeroes,
        TlsPhase::Active,
    )
    .await?;
    match outcome {
        Outcome::Transmission(negotiated) => Ok(Handshaken::Tls(Box::new(tls), negotiated)),
        Outcome::Aborted => {
            let _ = tls.shutdown().await;
            Ok(Handshaken::Aborted)
        }
        Outcome::StartTls => Err(NbdError::TlsConfig("TLS is already active".into())),
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    kill: CancellationToken,
    registration: Registration,
) {
    let inner = Arc::clone(&registration.inner);
    // One INFO line per connection ("attached"); the rest of its life is at DEBUG unless it
    // ends abnormally.
    debug!(%peer, "NBD client connected");

    let timeout = inner.handshake_timeout;
    let handshake = tokio::time::timeout(timeout, handshake(stream, peer, &inner));
    let outcome = tokio::select! {
        biased;
        _ = inner.shutdown.cancelled() => {
            info!(%peer, "NBD client closed during handshake: server shutting down");
            return;
        }
        outcome = handshake => outcome.unwrap_or(Err(NbdError::HandshakeTimeout(timeout))),
    };
    match outcome {
        Ok(Handshaken::Plain(stream, negotiated)) => {
            transmit(stream, negotiated, peer, false, kill, registration).await;
        }
        Ok(Handshaken::Tls(stream, negotiated)) => {
            transmit(*stream, negotiated, peer, true, kill, registration).await;
        }
        Ok(Handshaken::Aborted) => {
            debug!(%peer, "NBD client ended the handshake (NBD_OPT_ABORT)");
        }
        Err(NbdError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            debug!(%peer, "NBD client hung up during the handshake");
        }
        Err(e) => {
            warn!(%peer, error = %e, "NBD handshake failed; closing connection");
        }
    }
}

/// The transmission phase of an attached connection, on plain TCP or TLS.
async fn transmit<S: NbdStream>(
    mut stream: S,
    negotiated: Negotiated,
    peer: SocketAddr,
    tls: bool,
    kill: CancellationToken,
    registration: Registration,
) {
    let inner = Arc::clone(&registration.inner);
    let export = negotiated.name.clone();
    inner.attach(registration.id, &export);
    // Checked after attaching: if the export is removed concurrently, either this sees it gone or
    // the remover's `disconnect_export` sees this connection.
    if inner.registry.lookup(&export).is_none() {
        info!(%peer, %export, "NBD export removed during the handshake; closing");
        return;
    }
    info!(%peer, %export, tls, structured = negotiated.structured,
        block_status = negotiated.base_allocation.is_some(), "NBD client attached");

    let params = conn::ConnParams {
        peer,
        max_payload: inner.max_payload,
        max_inflight: inner.max_inflight,
        max_inflight_bytes: inner.max_inflight_bytes,
        shutdown_grace: Duration::from_millis(inner.shutdown_grace_ms.load(Ordering::Relaxed)),
    };
    let result = conn::run(&mut stream, negotiated, &params, &inner.shutdown, &kill).await;
    let graceful = match &result {
        Ok(end) => {
            debug!(%peer, %export, reason = end.describe(), "NBD client disconnected");
            end.graceful()
        }
        Err(NbdError::Io(e)) => {
            info!(%peer, %export, error = %e, "NBD connection lost");
            false
        }
        Err(e) => {
            warn!(%peer, %export, error = %e, "NBD protocol error; closing connection");
            false
        }
    };
    // Leave the table before the client can observe the close, so that anyone who saw the
    // connection end also sees it gone from `connections()`.
    drop(registration);
    if graceful {
        let _ = stream.shutdown().await;
    }
}

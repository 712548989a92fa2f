//! The DTL daemon (`vstor dtl`): a tokio TCP server in front of a [`DtlStore`].
//!
//! One task per connection; each connection is a strict request → reply(ies) sequence processed
//! in order, which is all a volume needs (it keeps one connection per volume and pipelining comes
//! from batching entries, not from many requests in flight). The store is called directly from
//! the connection task: a page-cache append is a few microseconds, and a hand-off to another
//! thread would cost more than the work (see DESIGN.md, performance notes).
//!
//! A connection must start with `Hello`, within the frame timeout of connecting (or of the TLS
//! handshake), else it gets `Error` and is closed; a version mismatch is answered and the
//! connection closed. A frame that fails to decode (bad magic, CRC, oversized, unknown kind, ...) gets a
//! best-effort `Error` reply and the connection is closed: after a framing error the byte stream
//! cannot be trusted to be aligned on frames any more. Nothing of a bad frame reaches the store,
//! and other connections are unaffected.
//!
//! With [`DtlServerConfig::tls`] every connection must open with a mutual-TLS handshake
//! (`vstor_net`: a client certificate of the cluster CA is required), bounded by the frame
//! timeout; a refused handshake closes that connection only. A client that speaks the DTL
//! protocol in plain text gets a DTL `Error` saying the server requires mutual TLS, so its
//! operator reads why instead of a TLS alert decoded as a corrupt frame.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use vstor_net::{Accepted, PeerStream, PeerTls};

use crate::error::DtlError;
use crate::protocol::{
    DtlCodec, Message, MAX_FRAME_PAYLOAD, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::store::DtlStore;
use crate::Result;

/// Largest `Entries` batch the server sends back (entries / bytes of data).
const REPLY_MAX_ENTRIES: usize = 256;
const REPLY_MAX_BYTES: usize = 8 << 20;

#[derive(Clone, Debug)]
pub struct DtlServerConfig {
    /// fdatasync every batch before acknowledging it (see the `store` module doc).
    pub fsync: bool,
    /// A frame whose first bytes arrived must be complete within this (at most twice this from
    /// its first byte), or the connection is closed: a client that trickles a frame (slowloris)
    /// cannot hold a connection and its buffer forever. Idle connections between frames are
    /// not affected.
    pub frame_timeout: Duration,
    /// Mutual TLS: only clients with a certificate of the cluster CA are served. `None`: plain
    /// TCP, no authentication (a trusted network only, see `docs/security.md`).
    pub tls: Option<PeerTls>,
}

/// Default [`DtlServerConfig::frame_timeout`]: a 64 MiB frame needs only ~2 MB/s to make it.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for DtlServerConfig {
    fn default() -> Self {
        Self {
            fsync: false,
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
            tls: None,
        }
    }
}

/// The DTL server. Cheap to share behind an `Arc`; `serve` may run on several listeners.
pub struct DtlServer {
    store: Arc<DtlStore>,
    frame_timeout: Duration,
    tls: Option<PeerTls>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl DtlServer {
    /// Opens (and recovers) the store in `data_dir`. Blocking: call before serving.
    pub fn new(data_dir: impl Into<PathBuf>, config: DtlServerConfig) -> Result<Self> {
        let store = DtlStore::open(data_dir, config.fsync)?;
        Ok(Self {
            store: Arc::new(store),
            frame_timeout: config.frame_timeout,
            tls: config.tls,
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    pub fn store(&self) -> &Arc<DtlStore> {
        &self.store
    }

    /// Accepts connections until [`shutdown`](Self::shutdown) is called.
    pub async fn serve(&self, listener: TcpListener) -> Result<()> {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, fsync = self.store.fsync_enabled(), mtls = self.tls.is_some(), "DTL server listening");
        }
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(()),
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let store = self.store.clone();
                    let cancel = self.cancel.clone();
                    let frame_timeout = self.frame_timeout;
                    let tls = self.tls.clone();
                    self.tracker.spawn(async move {
                        let conn =
                            handle_connection(store, stream, peer, cancel, frame_timeout, tls);
                        if let Err(e) = conn.await {
                            debug!(%peer, error = %e, "DTL connection ended");
                        }
                    });
                }
                // Per-connection accept errors (ECONNABORTED, EMFILE, ...) must not stop the
                // server; EMFILE would spin, so yield to let connections finish.
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    /// Stops accepting, ends every connection (between requests), waits for them, and syncs
    /// the open segments.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        if let Err(e) = self.store.sync_all() {
            warn!(error = %e, "sync at shutdown failed");
        }
    }
}

fn error_reply(e: &DtlError) -> Message {
    let mut message = e.to_string();
    message.truncate(1024);
    Message::Error {
        code: e.code(),
        message,
    }
}

async fn handle_connection(
    store: Arc<DtlStore>,
    stream: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
    frame_timeout: Duration,
    tls: Option<PeerTls>,
) -> Result<()> {
    stream.set_nodelay(true)?;
    let stream = match tls {
        None => PeerStream::Plain(stream),
        Some(tls) => tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            s = accept_tls(&tls, stream, peer, frame_timeout) => match s? {
                Some(s) => s,
                None => return Ok(()),
            },
        },
    };
    let mut framed = Framed::new(stream, DtlCodec::new());
    let mut greeted = false;
    loop {
        // `Framed::next` is cancel-safe (bytes read stay in its buffer), so it is restarted
        // every `frame_timeout`; finding part of a frame buffered when it expires means the
        // frame took too long.
        let next = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                n = tokio::time::timeout(frame_timeout, framed.next()) => match n {
                    Ok(n) => break n,
                    // Idle between frames is fine once greeted; a connection that has not
                    // said `Hello` within the frame timeout holds a task for nothing.
                    Err(_) if !greeted => {
                        let e = DtlError::Timeout {
                            during: "waiting for Hello",
                            after: frame_timeout,
                        };
                        warn!(%peer, error = %e, "closing connection");
                        let _ = framed.send(error_reply(&e)).await;
                        return Err(e);
                    }
                    Err(_) if framed.read_buffer().is_empty() => continue,
                    Err(_) => {
                        let e = DtlError::FrameTimeout {
                            buffered: framed.read_buffer().len(),
                            timeout: frame_timeout,
                        };
                        warn!(%peer, error = %e, "closing connection");
                        let _ = framed.send(error_reply(&e)).await;
                        return Err(e);
                    }
                },
            }
        };
        let msg = match next {
            None => return Ok(()),
            Some(Ok(m)) => m,
            Some(Err(DtlError::Io(e))) => return Err(e.into()),
            Some(Err(e)) => {
                warn!(%peer, error = %e, "malformed frame; closing connection");
                let _ = framed.send(error_reply(&e)).await;
                return Err(e);
            }
        };
        if !greeted {
            match msg {
                Message::Hello { version }
                    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) =>
                {
                    // An older client (a rolling upgrade) is served in its own version.
                    framed.codec_mut().set_version(version);
                    framed.send(Message::HelloOk { version }).await?;
                    greeted = true;
                    continue;
                }
                Message::Hello { version } => {
                    warn!(%peer, client = version, "protocol version mismatch");
                    framed
                        .send(Message::VersionMismatch {
                            server: PROTOCOL_VERSION,
                            client: version,
                        })
                        .await?;
                    return Ok(());
                }
                other => {
                    let e = DtlError::Invalid(format!("expected Hello, got {}", other.name()));
                    let _ = framed.send(error_reply(&e)).await;
                    return Err(e);
                }
            }
        }
        match msg {
            Message::GetEntries {
                namespace,
                from_sco,
                to_sco,
            } => stream_entries(&store, &mut framed, &namespace, from_sco, to_sco).await?,
            other => {
                let reply = match handle_request(&store, other) {
                    Ok(r) => r,
                    Err(e) => {
                        debug!(%peer, error = %e, "request refused");
                        error_reply(&e)
                    }
                };
                framed.send(reply).await?;
            }
        }
    }
}

/// The server side of the mutual-TLS handshake (`vstor_net::accept_peer`), bounded by
/// `frame_timeout`. `None`: the client closed, or spoke plain text and was answered with a DTL
/// `Error` saying why.
async fn accept_tls(
    tls: &PeerTls,
    stream: TcpStream,
    peer: SocketAddr,
    frame_timeout: Duration,
) -> Result<Option<PeerStream>> {
    match vstor_net::accept_peer(Some(tls), stream, frame_timeout).await {
        Ok(Accepted::Stream(s)) => Ok(Some(s)),
        Ok(Accepted::Closed) => Ok(None),
        Ok(Accepted::PlainRefused(stream)) => {
            warn!(%peer, "plain-text client refused: this DTL server requires mutual TLS");
            let mut framed = Framed::new(stream, DtlCodec::new());
            // Read the client's `Hello` first: closing with unread bytes would reset the
            // connection and could discard the reply before the client reads it.
            let _ = tokio::time::timeout(frame_timeout, framed.next()).await;
            let e = DtlError::Invalid(vstor_net::PLAIN_REFUSED.into());
            let _ = framed.send(error_reply(&e)).await;
            Ok(None)
        }
        Err(e) => {
            warn!(%peer, error = %e, "DTL client refused");
            Err(e.into())
        }
    }
}

fn handle_request(store: &DtlStore, msg: Message) -> Result<Message> {
    Ok(match msg {
        Message::Register {
            namespace,
            cluster_size,
            owner_tag,
            incarnation,
        } => {
            store.register(&namespace, cluster_size, owner_tag, incarnation)?;
            Message::Ok
        }
        Message::AddEntries {
            namespace,
            owner_tag,
            sco,
            entries,
        } => {
            store.add_entries(&namespace, owner_tag, sco, &entries)?;
            Message::Ok
        }
        Message::Flush { namespace } => {
            store.flush(&namespace)?;
            Message::Ok
        }
        Message::GetScoRange { namespace } => Message::ScoRange(store.sco_range(&namespace)?),
        Message::RemoveUpTo {
            namespace,
            owner_tag,
            sco,
        } => {
            store.remove_up_to(&namespace, owner_tag, sco)?;
            Message::Ok
        }
        Message::Clear {
            namespace,
            owner_tag,
        } => {
            store.clear(&namespace, owner_tag)?;
            Message::Ok
        }
        Message::Unregister {
            namespace,
            owner_tag,
            incarnation,
        } => {
            store.unregister(&namespace, owner_tag, incarnation)?;
            Message::Ok
        }
        other => {
            return Err(DtlError::Invalid(format!(
                "{} is not a request the server accepts here",
                other.name()
            )))
        }
    })
}

/// Streams `Entries` batches, then `EntriesEnd`; a failure part-way ends the stream with
/// `Error` instead (the client must treat what it got as incomplete).
async fn stream_entries(
    store: &DtlStore,
    framed: &mut Framed<PeerStream, DtlCodec>,
    namespace: &str,
    from: u32,
    to: u32,
) -> Result<()> {
    let snapshots = match store.segments(namespace, from, to) {
        Ok(s) => s,
        Err(e) => return framed.send(error_reply(&e)).await,
    };
    for snap in snapshots {
        let mut reader = match snap.open() {
            Ok(Some(r)) => r,
            Ok(None) => continue, // trimmed since the snapshot
            Err(e) => return framed.send(error_reply(&e)).await,
        };
        let per_entry = snap.cluster_size() as usize + 20;
        let max = REPLY_MAX_ENTRIES
            .min(REPLY_MAX_BYTES / per_entry)
            .min((MAX_FRAME_PAYLOAD - 64) / per_entry)
            .max(1);
        loop {
            match reader.next_batch(max) {
                Ok(batch) if batch.is_empty() => break,
                Ok(entries) => {
                    framed
                        .send(Message::Entries {
                            sco: snap.sco,
                            entries,
                        })
                        .await?;
                }
                Err(e) => {
                    warn!(namespace, sco = snap.sco, error = %e, "reading entries failed");
                    return framed.send(error_reply(&e)).await;
                }
            }
        }
    }
    framed.send(Message::EntriesEnd).await?;
    Ok(())
}

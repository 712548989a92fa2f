//! The network side of `vstor osd`: serves a [`FragmentStore`] over the OSD protocol.
//!
//! One task per connection reads frames; each request runs on the blocking pool (the store does
//! file I/O and CRCs) while the connection keeps reading, so a slow fsync does not hold up the
//! reads pipelined behind it. Replies go back through one writer task per connection, in
//! completion order, matched by id. At most `max_inflight` requests run per connection: past
//! that the socket is not read, and TCP pushes back on the client. A malformed frame closes the
//! connection (logged with the peer); the client reconnects.
//!
//! With [`OsdServerConfig::tls`] every connection must be mutual TLS with a client certificate
//! of the cluster CA (`vstor_net::accept_served`, bounded by the handshake timeout); a plain-text
//! client gets an `Error` naming the requirement in reply to its `Hello`, and is closed.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use vstor_net::PeerTls;

use super::proto::{ErrorCode, Frame, Message, OsdCodec, ProtoError, PROTOCOL_VERSION};
use super::store::FragmentStore;
use crate::BackendError;

/// Who this OSD is, and its limits.
#[derive(Debug, Clone)]
pub struct OsdServerConfig {
    pub osd_id: u64,
    pub domain: String,
    /// Requests one connection may have running at once.
    pub max_inflight: usize,
    /// A connection must say `Hello` within this.
    pub handshake_timeout: Duration,
    /// A frame whose first bytes arrived must be complete within this (at most twice this from
    /// its first byte), or the connection is closed: a client that trickles a frame (slowloris)
    /// cannot hold a connection and its buffer forever. Idle connections are not affected.
    pub frame_timeout: Duration,
    /// Mutual TLS: clients must present a certificate of the cluster CA. `None`: plain TCP.
    pub tls: Option<PeerTls>,
}

impl OsdServerConfig {
    pub fn new(osd_id: u64, domain: &str) -> Self {
        Self {
            osd_id,
            domain: domain.to_string(),
            max_inflight: 64,
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Serve `store` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    store: Arc<FragmentStore>,
    config: OsdServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let config = Arc::new(config);
    loop {
        // Shutdown first: once cancelled, no connection is accepted, even one already queued.
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let (store, config, shutdown) = (store.clone(), config.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, store, &config, shutdown).await {
                warn!(osd = config.osd_id, %peer, "OSD connection closed: {e}");
            }
        });
    }
}

async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    codec: &OsdCodec,
) -> Result<Option<Frame>, ProtoError> {
    loop {
        if let Some(frame) = codec.decode(buf)? {
            return Ok(Some(frame));
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(256 * 1024);
        }
        if rd.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ProtoError::Truncated("frame: connection closed mid-frame"))
            };
        }
    }
}

async fn connection(
    stream: TcpStream,
    store: Arc<FragmentStore>,
    config: &OsdServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ProtoError> {
    stream.set_nodelay(true)?;
    let Some((stream, refusal)) = vstor_net::accept_served(
        config.tls.as_ref(),
        stream,
        config.handshake_timeout,
        "OSD",
        &config.osd_id,
    )
    .await
    else {
        return Ok(());
    };
    let (mut rd, mut wr) = stream.into_split();
    let codec = OsdCodec::default();
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let hello = tokio::time::timeout(
        config.handshake_timeout,
        read_frame(&mut rd, &mut buf, &codec),
    )
    .await
    .map_err(|_| ProtoError::Truncated("handshake: no Hello in time"))??;
    let reply = match hello.map(|f| f.message) {
        Some(_) if refusal.is_some() => Some(Message::Error {
            code: ErrorCode::Invalid,
            message: refusal.unwrap_or_default().to_string(),
        }),
        Some(Message::Hello { version, client }) if version == PROTOCOL_VERSION => {
            debug!(osd = config.osd_id, client, "OSD client connected");
            None
        }
        Some(Message::Hello { version, .. }) => Some(Message::VersionMismatch {
            server: PROTOCOL_VERSION,
            client: version,
        }),
        Some(other) => Some(Message::Error {
            code: ErrorCode::Invalid,
            message: format!("expected Hello, got {}", other.name()),
        }),
        None => return Ok(()),
    };
    let refused = reply.is_some();
    let first = reply.unwrap_or(Message::Welcome {
        version: PROTOCOL_VERSION,
        osd_id: config.osd_id,
        domain: config.domain.clone(),
    });
    let mut out = BytesMut::new();
    codec.encode(
        &Frame {
            id: 0,
            message: first,
        },
        &mut out,
    )?;
    wr.write_all(&out).await?;
    wr.flush().await?;
    if refused {
        return Ok(());
    }

    let (tx, mut rx) = mpsc::channel::<Frame>(config.max_inflight * 2);
    let wcodec = codec.clone();
    let writer = tokio::spawn(async move {
        let codec = wcodec;
        let mut out = BytesMut::with_capacity(256 * 1024);
        while let Some(frame) = rx.recv().await {
            out.clear();
            codec.encode(&frame, &mut out)?;
            // Batch whatever else is ready into the same write.
            while let Ok(more) = rx.try_recv() {
                codec.encode(&more, &mut out)?;
            }
            wr.write_all(&out).await?;
            // TLS keeps records until flushed; a no-op on TCP.
            wr.flush().await?;
        }
        Ok::<(), ProtoError>(())
    });
    let permits = Arc::new(Semaphore::new(config.max_inflight));
    let result = loop {
        // Shutdown first: a request that arrives after it is not served (a stopped OSD stops
        // at once, and a test's killed OSD is dead for every request sent after the kill).
        let frame = tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            frame = tokio::time::timeout(
                config.frame_timeout,
                read_frame(&mut rd, &mut buf, &codec),
            ) => frame,
        };
        // `read_frame` is cancel-safe (what it read stays in `buf`): restarted every
        // `frame_timeout`, and finding part of a frame buffered when it expires means the frame
        // took too long.
        let frame = match frame {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => break Ok(()),
            Ok(Err(e)) => break Err(e),
            Err(_) if buf.is_empty() => continue,
            Err(_) => {
                break Err(ProtoError::Truncated(
                    "frame: incomplete within the frame timeout",
                ))
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break Ok(());
        };
        let (store, tx) = (store.clone(), tx.clone());
        tokio::spawn(async move {
            let id = frame.id;
            let message = tokio::task::spawn_blocking(move || handle(&store, frame.message))
                .await
                .unwrap_or_else(|e| Message::Error {
                    code: ErrorCode::Io,
                    message: format!("request failed: {e}"),
                });
            // The writer is gone only when the connection is: nothing to tell.
            let _ = tx.send(Frame { id, message }).await;
            drop(permit);
        });
    };
    drop(tx);
    // Let replies already computed go out before closing.
    match writer.await {
        Ok(Err(e)) if result.is_ok() => return Err(e),
        _ => {}
    }
    result
}

/// Run one request against the store.
fn handle(store: &FragmentStore, message: Message) -> Message {
    let result = match message {
        Message::Put {
            namespace,
            name,
            version,
            index,
            tag,
            file,
        } => store
            .put(&namespace, &name, version, index, tag, &file)
            .map(|()| Message::Done),
        Message::GetRange {
            namespace,
            name,
            version,
            index,
            offset,
            len,
        } => store
            .get_range(&namespace, &name, version, index, offset, len)
            .map(|data| Message::Data { data: data.into() }),
        Message::GetFile {
            namespace,
            name,
            version,
            index,
        } => store
            .get_file(&namespace, &name, version, index)
            .map(|data| Message::Data { data: data.into() }),
        Message::Delete {
            namespace,
            name,
            tag,
        } => store.delete(&namespace, &name, tag).map(|()| Message::Done),
        Message::List {
            namespace,
            after,
            limit,
        } => store
            .list(
                &namespace,
                &after,
                (limit as usize).min(super::proto::MAX_LIST),
            )
            .map(|fragments| Message::Listing { fragments }),
        Message::Head { namespace, name } => store
            .head(&namespace, &name)
            .map(|heads| Message::Heads { heads }),
        Message::SetTag { namespace, tag } => {
            store.set_tag(&namespace, tag).map(|()| Message::Done)
        }
        Message::Stat => Ok(Message::Usage(store.usage())),
        Message::Verify {
            namespace,
            name,
            version,
            index,
        } => store
            .verify(&namespace, &name, version, index)
            .map(|()| Message::Done),
        Message::DeleteFragment {
            namespace,
            name,
            version,
            index,
            tag,
        } => store
            .delete_fragment(&namespace, &name, version, index, tag)
            .map(|()| Message::Done),
        other => {
            return Message::Error {
                code: ErrorCode::Invalid,
                message: format!("{} is not a request", other.name()),
            }
        }
    };
    result.unwrap_or_else(|e| Message::Error {
        code: error_code(&e),
        message: e.to_string(),
    })
}

fn error_code(e: &BackendError) -> ErrorCode {
    match e {
        BackendError::NoSuchObject { .. } | BackendError::NoSuchNamespace { .. } => {
            ErrorCode::NotFound
        }
        BackendError::Corrupt { .. } => ErrorCode::Corrupt,
        BackendError::Fenced { .. } => ErrorCode::Fenced,
        BackendError::Full { .. } => ErrorCode::Full,
        BackendError::InvalidName { .. } | BackendError::RangeOutOfBounds { .. } => {
            ErrorCode::Invalid
        }
        _ => ErrorCode::Io,
    }
}

//! The network side of `vstor mds`: serves an [`MdsStore`] over the MDS protocol, and catches
//! slave tables up with the backend on a timer.
//!
//! One task per connection reads frames; each request runs on the blocking pool (redb commits
//! fsync, catch-up reads the backend) while the connection keeps reading. Replies go back
//! through one writer task per connection in completion order, matched by id. At most
//! `max_inflight` requests run per connection: past that the socket is not read and TCP pushes
//! back. No lock is held across I/O: the store serialises its own write transactions. A
//! malformed frame closes the connection (logged with the peer); the client reconnects.
//!
//! A frame whose first bytes arrived must be complete within [`MdsServerConfig::frame_timeout`]
//! (slowloris clients would otherwise hold a connection and its buffer forever); idle
//! connections between frames are kept. With [`MdsServerConfig::tls`] every connection must be
//! mutual TLS with a client certificate of the cluster CA; a plain-text client gets an `Error`
//! naming the requirement in reply to its `Hello`, and is closed.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vstor_backend::ObjectStore;
use vstor_net::PeerTls;

use crate::catchup;
use crate::proto::{
    ErrorCode, Frame, MdsCodec, Message, ProtoError, MAX_BATCH, MAX_PAGES, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use crate::store::MdsStore;
use crate::table::Role;
use crate::MdsError;

/// Who this MDS is, and its limits.
#[derive(Clone)]
pub struct MdsServerConfig {
    /// Name reported in `Welcome` (logs, `mds list`).
    pub name: String,
    /// Where catch-up reads TLogs; without one, catch-up requests are refused.
    pub backend: Option<Arc<dyn ObjectStore>>,
    /// How often slave tables catch up on their own (`None`: only on demand).
    pub catch_up_every: Option<Duration>,
    /// Requests one connection may have running at once.
    pub max_inflight: usize,
    /// A connection must say `Hello` within this (the TLS handshake included).
    pub handshake_timeout: Duration,
    /// A frame whose first bytes arrived must be complete within this (at most twice this from
    /// its first byte), or the connection is closed. Idle connections are not affected.
    pub frame_timeout: Duration,
    /// Mutual TLS: clients must present a certificate of the cluster CA. `None`: plain TCP.
    pub tls: Option<PeerTls>,
    /// Newest protocol version to speak (default [`PROTOCOL_VERSION`]; a lower one makes this
    /// server answer as an older build would, for mixed-version tests and staged upgrades).
    pub max_version: u16,
}

impl MdsServerConfig {
    pub fn new(name: &str, backend: Option<Arc<dyn ObjectStore>>) -> Self {
        Self {
            name: name.to_string(),
            backend,
            catch_up_every: Some(Duration::from_secs(60)),
            max_inflight: 64,
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(30),
            tls: None,
            max_version: PROTOCOL_VERSION,
        }
    }
}

/// Serve `store` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    store: Arc<MdsStore>,
    config: MdsServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let config = Arc::new(config);
    if let (Some(every), Some(backend)) = (config.catch_up_every, config.backend.clone()) {
        tokio::spawn(catch_up_loop(
            store.clone(),
            backend,
            every,
            shutdown.clone(),
        ));
    }
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = shutdown.cancelled() => return Ok(()),
        };
        let (store, config, shutdown) = (store.clone(), config.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, store, &config, shutdown).await {
                warn!(mds = %config.name, %peer, "MDS connection closed: {e}");
            }
        });
    }
}

/// Every `every`, replay the backend TLogs each slave table lacks.
async fn catch_up_loop(
    store: Arc<MdsStore>,
    backend: Arc<dyn ObjectStore>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let (store, backend) = (store.clone(), backend.clone());
        let round = tokio::task::spawn_blocking(move || catch_up_slaves(&store, backend.as_ref()));
        if let Err(e) = round.await {
            warn!("MDS catch-up round failed: {e}");
        }
    }
}

/// One catch-up round over every slave table (errors are logged per volume).
pub fn catch_up_slaves(store: &MdsStore, backend: &dyn ObjectStore) {
    let tables = match store.tables() {
        Ok(tables) => tables,
        Err(e) => {
            warn!("MDS catch-up: cannot list tables: {e}");
            return;
        }
    };
    for t in tables.iter().filter(|t| t.meta.role == Role::Slave) {
        match catchup::catch_up(store, backend, &t.volume, false) {
            Ok(r) if r.replayed > 0 => {
                info!(volume = %t.volume, replayed = r.replayed, cork = r.cork.tlog, "MDS slave caught up");
            }
            Ok(_) => {}
            Err(e) => warn!(volume = %t.volume, "MDS slave catch-up failed: {e}"),
        }
    }
}

async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    codec: &MdsCodec,
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
    store: Arc<MdsStore>,
    config: &Arc<MdsServerConfig>,
    shutdown: CancellationToken,
) -> Result<(), ProtoError> {
    stream.set_nodelay(true)?;
    let Some((stream, refusal)) = vstor_net::accept_served(
        config.tls.as_ref(),
        stream,
        config.handshake_timeout,
        "MDS",
        &config.name,
    )
    .await
    else {
        return Ok(());
    };
    let (mut rd, mut wr) = stream.into_split();
    // `Hello` is frozen across versions: any codec reads it.
    let codec = MdsCodec::with_version(config.max_version);
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let hello = tokio::time::timeout(
        config.handshake_timeout,
        read_frame(&mut rd, &mut buf, &codec),
    )
    .await
    .map_err(|_| ProtoError::Truncated("handshake: no Hello in time"))??;
    let mut agreed = config.max_version;
    let reply = match hello.map(|f| f.message) {
        Some(_) if refusal.is_some() => Some(Message::Error {
            code: ErrorCode::Invalid,
            message: refusal.unwrap_or_default().to_string(),
        }),
        Some(Message::Hello { version, client })
            if (MIN_PROTOCOL_VERSION..=config.max_version).contains(&version) =>
        {
            debug!(mds = %config.name, client, version, "MDS client connected");
            agreed = version;
            None
        }
        Some(Message::Hello { version, .. }) => Some(Message::VersionMismatch {
            server: config.max_version,
            client: version,
        }),
        Some(other) => Some(Message::Error {
            code: ErrorCode::Invalid,
            message: format!("expected Hello, got {}", other.name()),
        }),
        None => return Ok(()),
    };
    let refused = reply.is_some();
    let codec = MdsCodec::with_version(agreed);
    let first = reply.unwrap_or(Message::Welcome {
        version: agreed,
        server: config.name.clone(),
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
        let frame = tokio::select! {
            frame = tokio::time::timeout(
                config.frame_timeout,
                read_frame(&mut rd, &mut buf, &codec),
            ) => frame,
            () = shutdown.cancelled() => break Ok(()),
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
        let (store, tx, config) = (store.clone(), tx.clone(), config.clone());
        tokio::spawn(async move {
            let id = frame.id;
            let message =
                tokio::task::spawn_blocking(move || handle(&store, &config, frame.message))
                    .await
                    .unwrap_or_else(|e| Message::Error {
                        code: ErrorCode::Io,
                        message: format!("request failed: {e}"),
                    });
            let _ = tx.send(Frame { id, message }).await;
            drop(permit);
        });
    };
    drop(tx);
    match writer.await {
        Ok(Err(e)) if result.is_ok() => return Err(e),
        _ => {}
    }
    result
}

/// Run one request against the store.
pub fn handle(store: &MdsStore, config: &MdsServerConfig, message: Message) -> Message {
    let result = match message {
        Message::MultiGet { volume, addresses } => store
            .multi_get(&volume, &addresses)
            .map(|(cork, locations)| Message::Locations { cork, locations }),
        Message::MultiSet {
            volume,
            owner_tag,
            expect,
            cork,
            updates,
        } => store
            .multi_set(&volume, owner_tag, expect, cork, &updates)
            .map(|_| Message::Done),
        Message::SetRole {
            volume,
            namespace,
            role,
            owner_tag,
        } => store
            .set_role(&volume, &namespace, role, owner_tag)
            .map(|_| Message::Done),
        Message::CatchUp { volume, dry_run } => match &config.backend {
            Some(backend) => {
                catchup::catch_up(store, backend.as_ref(), &volume, dry_run).map(|r| {
                    Message::CaughtUp {
                        behind: r.behind,
                        replayed: r.replayed,
                        full_rebuild: r.full_rebuild,
                        cork: r.cork,
                    }
                })
            }
            None => Err(MdsError::Invalid {
                volume,
                reason: "this MDS has no backend to catch up from (start it with --backend)".into(),
            }),
        },
        Message::Stat { volume } => store.info(&volume).map(Message::Table),
        Message::List => store.tables().map(Message::Tables),
        Message::Dump {
            volume,
            after,
            limit,
        } => store
            .dump(&volume, after, (limit as usize).min(MAX_BATCH))
            .map(|(cork, entries)| Message::Entries { cork, entries }),
        Message::DumpPages {
            volume,
            first,
            count,
        } => store
            .dump_pages(&volume, first, u64::from(count).min(MAX_PAGES as u64))
            .map(|(cork, next, pages)| Message::Pages { cork, next, pages }),
        Message::Drop { volume, owner_tag } => {
            store.drop_table(&volume, owner_tag).map(|()| Message::Done)
        }
        other => {
            return Message::Error {
                code: ErrorCode::Invalid,
                message: format!("{} is not a request", other.name()),
            }
        }
    };
    result.unwrap_or_else(|e| Message::Error {
        code: ErrorCode::of(&e),
        message: e.to_string(),
    })
}

//! One connection of a remote target, and the supervisor that replaces it.
//!
//! A connection is the owner's unix socket when [`Endpoint::unix`] names one that answers (an
//! owner on this host), else a TCP socket (TCP_NODELAY), mutual TLS on it with
//! [`RemoteConfig::tls`]; either way the session starts with a `Hello` → `Welcome` + `Access`
//! exchange (the volume's allow list; later `Access` frames replace it while the connection
//! lives), and is served by two tasks: the *writer* (`send`) writes the frames the frontends'
//! calls queue without blocking, every frame ready at once in one vectored write (`OutQueue`: a
//! write's data block goes out from the frontend's buffer without another copy), unless the
//! caller wrote its frame itself (no TLS, nothing else in flight); the *reader* decodes replies
//! and completes requests by id. Whichever notices the connection die (EOF, I/O error, corrupt
//! frame, an owner-changed refusal) reports it once (`Shared::connection_lost`).
//!
//! The *supervisor* (one task per target) then looks the owner up again through the [`Resolver`]
//! and reconnects, backing off from 50 ms to 1 s between attempts, and resends what waits. It also
//! keeps the clock for the reconnect bound (`Shared::tick`). Being paused is not an error: the
//! frontends' requests simply wait.
//!
//! [`Resolver`]: crate::remote::Resolver

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Framed};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vstor_net::{PeerReader, PeerStream};

use super::inflight::{Conn, Shared};
use super::send;
use super::{RemoteConfig, RemoteError};
use crate::remote::proto::{AllowList, EdgeCodec, Frame, Message, ProtoError, PROTOCOL_VERSION};
use crate::remote::{Endpoint, Resolver};

/// First and longest pause between reconnection attempts. The longest is short because the
/// guest waits out every attempt: after an owner's death the registry names the new owner about
/// 4.5 s later (lease expiry plus adoption), and with a 1 s cap the edge found it up to 1 s
/// after that (`vstor-bench cluster --edge`: pauses of 4.6 or 5.6 s, nothing between). An
/// attempt while the owner is dead costs two registry reads (volume record, owner key).
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Socket read size of the reader.
const READ_BUF: usize = 256 * 1024;

/// An established, welcomed connection.
pub(super) struct Welcomed {
    pub(super) stream: PeerStream,
    pub(super) endpoint: Endpoint,
    pub(super) size: u64,
    pub(super) read_only: bool,
    pub(super) dtl_in_sync: bool,
    /// The volume's allow list (`Access`, right after `Welcome`).
    pub(super) access: AllowList,
}

/// Resolve the owner of `volume`, connect and handshake, all within `config.connect_timeout`
/// (the resolution too: a registry that hangs is as bad as an owner that does).
pub(super) async fn open(
    volume: &str,
    resolver: &Arc<dyn Resolver>,
    config: &RemoteConfig,
) -> Result<Welcomed, RemoteError> {
    let endpoint =
        match tokio::time::timeout(config.connect_timeout, resolver.resolve(volume)).await {
            Ok(Ok(endpoint)) => endpoint,
            Ok(Err(reason)) => {
                return Err(RemoteError::Resolve {
                    volume: volume.to_owned(),
                    reason,
                })
            }
            Err(_) => {
                return Err(RemoteError::Resolve {
                    volume: volume.to_owned(),
                    reason: format!("no answer within {:?}", config.connect_timeout),
                })
            }
        };
    let addr = endpoint.addr.clone();
    match tokio::time::timeout(config.connect_timeout, handshake(volume, endpoint, config)).await {
        Ok(result) => result,
        Err(_) => Err(RemoteError::Timeout {
            volume: volume.to_owned(),
            addr,
            after: config.connect_timeout,
        }),
    }
}

async fn handshake(
    volume: &str,
    mut endpoint: Endpoint,
    config: &RemoteConfig,
) -> Result<Welcomed, RemoteError> {
    let addr = endpoint.addr.clone();
    let connect_err = |source| RemoteError::Connect {
        volume: volume.to_owned(),
        addr: addr.clone(),
        source,
    };
    let stream = match connect_unix(volume, &endpoint).await {
        Some((stream, label)) => {
            endpoint.addr = label;
            stream
        }
        None => {
            let stream = TcpStream::connect(&endpoint.addr)
                .await
                .map_err(connect_err)?;
            stream.set_nodelay(true).map_err(connect_err)?;
            set_liveness(&stream, config.liveness).map_err(connect_err)?;
            vstor_net::connect_peer(config.tls.as_ref(), &addr, stream)
                .await
                .map_err(|source| RemoteError::Tls {
                    volume: volume.to_owned(),
                    addr: addr.clone(),
                    source,
                })?
        }
    };
    let addr = endpoint.addr.clone();
    let proto_err = |source| RemoteError::Proto {
        volume: volume.to_owned(),
        addr: addr.clone(),
        source,
    };
    let mut framed = Framed::new(stream, EdgeCodec::new());
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        volume: volume.to_owned(),
        tag: endpoint.tag,
        client: config.client_name.clone(),
    };
    framed.send(Frame::new(0, hello)).await.map_err(proto_err)?;
    let reply = match framed.next().await {
        Some(reply) => reply.map_err(proto_err)?,
        None => {
            return Err(proto_err(ProtoError::Truncated(
                "handshake: the node closed the connection",
            )))
        }
    };
    match reply.message {
        Message::Welcome {
            size,
            read_only,
            tag,
            dtl_in_sync,
            ..
        } if tag == endpoint.tag => {
            // A version-2 server sends the allow list right after Welcome; the edge holds no
            // connection (and serves nothing) without it.
            let access = match framed.next().await {
                Some(Ok(Frame {
                    id: 0,
                    message: Message::Access(access),
                })) => access,
                Some(Ok(Frame {
                    message: Message::Error { code, message },
                    ..
                })) => {
                    return Err(RemoteError::Refused {
                        volume: volume.to_owned(),
                        addr,
                        code,
                        message,
                    })
                }
                Some(Ok(other)) => {
                    return Err(proto_err(ProtoError::Malformed(format!(
                        "expected Access after Welcome, got {}",
                        other.message.name()
                    ))))
                }
                Some(Err(e)) => return Err(proto_err(e)),
                None => {
                    return Err(proto_err(ProtoError::Truncated(
                        "handshake: the node closed the connection after Welcome",
                    )))
                }
            };
            // Anything already buffered after the handshake would be a reply to nothing.
            let parts = framed.into_parts();
            if !parts.read_buf.is_empty() {
                return Err(proto_err(ProtoError::Malformed(
                    "data after Welcome before any request".into(),
                )));
            }
            Ok(Welcomed {
                stream: parts.io,
                endpoint,
                size,
                read_only,
                dtl_in_sync,
                access,
            })
        }
        Message::Welcome { tag, .. } => Err(proto_err(ProtoError::Malformed(format!(
            "Welcome for owner tag {tag}, asked for {}",
            endpoint.tag
        )))),
        Message::Error { code, message } => Err(RemoteError::Refused {
            volume: volume.to_owned(),
            addr,
            code,
            message,
        }),
        Message::VersionMismatch { server, .. } => Err(proto_err(ProtoError::UnsupportedVersion {
            got: server,
            ours: PROTOCOL_VERSION,
        })),
        other => Err(proto_err(ProtoError::Malformed(format!(
            "expected Welcome, got {}",
            other.name()
        )))),
    }
}

/// The owner's unix socket, when it has one on this host and it answers; `None` (after a debug
/// line saying why) sends the caller to TCP. No TLS on it: the socket file is the owner's to
/// protect (mode 0600) and the owner checks the peer's uid (`SO_PEERCRED`). A dead owner's socket
/// refuses at once (no listener), so the liveness timers TCP needs have nothing to watch here.
async fn connect_unix(volume: &str, endpoint: &Endpoint) -> Option<(PeerStream, String)> {
    let path = endpoint.unix.as_deref()?;
    match tokio::net::UnixStream::connect(path).await {
        Ok(stream) => Some((PeerStream::Unix(stream), format!("unix:{path}"))),
        Err(e) => {
            debug!(volume, path, error = %e, "owner's unix socket unreachable; using TCP");
            None
        }
    }
}

/// Declare the connection dead after `after` of silence from the peer's TCP: unacknowledged
/// data for that long (`TCP_USER_TIMEOUT`), or an idle connection whose keepalive probes (sent
/// every quarter of it) go unanswered. Without this an owner that lost power or sits behind a
/// partition would leave requests waiting for the kernel's default of ~15 minutes, far past the
/// reconnect bound.
fn set_liveness(stream: &TcpStream, after: Duration) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    let probe = (after / 4).max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(probe)
        .with_interval(probe)
        .with_retries(3);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(after))
}

/// Make `welcomed` the target's connection: start its reader and writer and resend what waits.
pub(super) fn install(shared: &Arc<Shared>, welcomed: Welcomed) {
    let generation = {
        let mut inner = shared.lock();
        inner.generations += 1;
        inner.generations
    };
    if welcomed.size != shared.size || welcomed.read_only != shared.read_only {
        warn!(
            volume = shared.volume,
            size = welcomed.size,
            read_only = welcomed.read_only,
            "the new owner reports another size or mode; keeping the attached one"
        );
    }
    // Owned halves for two tasks: lock-free on TCP, `tokio::io::split` over TLS (`vstor_net`).
    let (rd, wr) = welcomed.stream.into_split();
    let (frames, side) = send::channel(wr);
    let stop = shared.shutdown.child_token();
    let lost = {
        let shared = Arc::clone(shared);
        move |why: &str| shared.connection_lost(generation, why)
    };
    tokio::spawn(send::writer(Arc::clone(&frames), side, stop.clone(), lost));
    tokio::spawn(reader(Arc::clone(shared), generation, rd, stop.clone()));
    info!(
        volume = shared.volume,
        node = welcomed.endpoint.node,
        addr = welcomed.endpoint.addr,
        tag = welcomed.endpoint.tag,
        generation,
        "connected to the volume's owner"
    );
    let conn = Conn {
        generation,
        tag: welcomed.endpoint.tag,
        frames,
        stop,
        draining: false,
    };
    shared.connected(
        conn,
        welcomed.endpoint,
        welcomed.dtl_in_sync,
        welcomed.access,
    );
}

async fn reader(shared: Arc<Shared>, generation: u64, mut rd: PeerReader, stop: CancellationToken) {
    let mut codec = EdgeCodec::new();
    let mut buf = BytesMut::with_capacity(READ_BUF);
    loop {
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Frame {
                    id: 0,
                    message: Message::Access(access),
                })) => shared.set_access(generation, access),
                Ok(Some(Frame {
                    message: Message::Access(_),
                    ..
                })) => {
                    shared.connection_lost(
                        generation,
                        "bad frame from the owner: Access with a request id",
                    );
                    return;
                }
                Ok(Some(frame)) => shared.reply(generation, frame.id, frame.message),
                Ok(None) => break,
                Err(e) => {
                    shared.connection_lost(generation, &format!("bad frame from the owner: {e}"));
                    return;
                }
            }
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(READ_BUF);
        }
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            read = rd.read_buf(&mut buf) => read,
        };
        match read {
            Ok(0) => {
                shared.connection_lost(generation, "the owner closed the connection");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                shared.connection_lost(generation, &format!("read failed: {e}"));
                return;
            }
        }
    }
}

/// Sleep until `until`, but wake for the reconnect bound and for `close()`. False once closed.
async fn pause(shared: &Shared, until: Instant) -> bool {
    loop {
        let deadline = shared
            .lock()
            .recovery
            .deadline(shared.config.reconnect_bound)
            .map(Instant::from_std);
        let wake = deadline.map_or(until, |d| d.min(until));
        tokio::select! {
            _ = shared.shutdown.cancelled() => return false,
            () = tokio::time::sleep_until(wake) => {}
        }
        shared.tick();
        if Instant::now() >= until {
            return true;
        }
    }
}

/// Reconnect whenever the connection is lost, until the target is closed.
pub(super) async fn supervise(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            () = shared.lost.notified() => {}
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            if shared.lock().conn.is_some() {
                break;
            }
            let attempt = open(&shared.volume, &shared.resolver, &shared.config);
            tokio::pin!(attempt);
            // Keep the clock of the bound while an attempt is under way.
            let result = loop {
                let deadline = shared
                    .lock()
                    .recovery
                    .deadline(shared.config.reconnect_bound)
                    .map(Instant::from_std);
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    result = &mut attempt => break result,
                    () = sleep_opt(deadline) => shared.tick(),
                }
            };
            match result {
                Ok(welcomed) => {
                    shared
                        .counters
                        .reconnects
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    install(&shared, welcomed);
                    break;
                }
                Err(e) => {
                    debug!(volume = shared.volume, error = %e, ?backoff, "reconnect attempt failed");
                    if !pause(&shared, Instant::now() + backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

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
//! and reconnects, and resends what waits. Between failed attempts it backs off from
//! [`RemoteConfig::backoff_min`] (50 ms) to [`RemoteConfig::backoff_max`] (250 ms), but for the
//! whole episode it also follows the resolver's watch ([`Resolver::watch`]: the registry's volume
//! record and owner key), and retries at once when a notice arrives. Why both: after an owner's
//! death the registry names the new owner about 4.5 s later (lease expiry plus adoption); polling
//! alone found it up to a backoff step after that (with a 1 s cap, pauses of 4.6 or 5.6 s and
//! nothing between, in `vstor-bench cluster --edge`), and every attempt costs registry reads, for
//! every volume that lost its owner. The watch ends the pause at the adoption; the backoff remains
//! for a notice missed before the watch started, a broken watch, or a resolver without one. The
//! supervisor also keeps the clock for the reconnect bound (`Shared::tick`). Being paused is not an
//! error: the frontends' requests simply wait.
//!
//! [`Resolver`]: crate::remote::Resolver

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Framed};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};
use vstor_net::{PeerReader, PeerStream};

use super::inflight::{Conn, Shared};
use super::send;
use super::{RemoteConfig, RemoteError};
use crate::remote::proto::{
    AllowList, EdgeCodec, ErrorCode, Frame, Message, ProtoError, PROTOCOL_VERSION,
};
use crate::remote::{Endpoint, Resolver};

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
                    id: 0,
                    message:
                        Message::Error {
                            code: ErrorCode::Released,
                            ..
                        },
                })) => shared.released(generation),
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

/// Sleep until `until` or a notice of `changes`, but wake for the reconnect bound and for
/// `close()`. False once closed.
async fn pause(shared: &Shared, until: Instant, changes: &Notify) -> bool {
    loop {
        let deadline = shared
            .lock()
            .recovery
            .deadline(shared.config.reconnect_bound)
            .map(Instant::from_std);
        let wake = deadline.map_or(until, |d| d.min(until));
        tokio::select! {
            _ = shared.shutdown.cancelled() => return false,
            () = changes.notified() => {
                shared.tick();
                return true;
            }
            () = tokio::time::sleep_until(wake) => {}
        }
        shared.tick();
        if Instant::now() >= until {
            return true;
        }
    }
}

/// Follow the resolver's watch of the volume for one reconnection episode: every notice wakes
/// (or pre-arms, through `Notify`'s stored permit) the supervisor's next pause. Aborted when the
/// episode ends, which drops the watch.
fn follow_changes(shared: &Shared) -> (Arc<Notify>, AbortOnDropHandle<()>) {
    let changes = Arc::new(Notify::new());
    let watch = shared.resolver.watch(&shared.volume);
    let timeout = shared.config.connect_timeout;
    let volume = shared.volume.clone();
    let notify = Arc::clone(&changes);
    let task = tokio::spawn(async move {
        let mut notices = match tokio::time::timeout(timeout, watch).await {
            Ok(Some(notices)) => notices,
            Ok(None) => return,
            Err(_) => {
                debug!(volume, "no registry watch within {timeout:?}; polling only");
                return;
            }
        };
        while notices.next().await.is_some() {
            notify.notify_one();
        }
        debug!(volume, "registry watch ended; polling only");
    });
    (changes, AbortOnDropHandle::new(task))
}

/// Reconnect whenever the connection is lost, until the target is closed.
pub(super) async fn supervise(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            () = shared.lost.notified() => {}
        }
        let mut backoff = shared.config.backoff_min;
        let (changes, _watch) = follow_changes(&shared);
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
                    if !pause(&shared, Instant::now() + backoff, &changes).await {
                        return;
                    }
                    backoff =
                        (backoff * 2).min(shared.config.backoff_max.max(shared.config.backoff_min));
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

//! A connection to one MDS: pipelined requests, each with a deadline.
//!
//! A volume's owner must never hang on its MDS: every call has a timeout, and when the
//! connection breaks every pending call fails at once with the MDS's address in the error, so
//! the caller falls back (to the next MDS, or to a backend replay). One writer task owns the
//! socket's write half and one reader task its read half; a call registers a one-shot
//! completion under a fresh id, queues its frame and awaits the reply matched by id. No lock is
//! held across I/O (the pending map's mutex is taken only to insert or remove an entry).
//!
//! With a cluster identity ([`PeerTls`]) the connection is mutual TLS and the MDS's certificate
//! must name the host dialled. The halves come from [`vstor_net::PeerStream::into_split`]:
//! `TcpStream::into_split` (lock-free) on plain TCP, `tokio::io::split` over TLS, whose state
//! machine serves both directions (see `vstor_net::split`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use vstor_net::PeerTls;

use crate::catchup::CatchUpReport;
use crate::error::{MdsError, Result};
use crate::proto::{Frame, MdsCodec, Message, PROTOCOL_VERSION};
use crate::store::TableInfo;
use crate::table::{Cork, Role, Update};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>;

/// Entries per `Dump` page.
pub const DUMP_PAGE: u32 = 65_536;

/// A connected MDS.
pub struct MdsClient {
    addr: String,
    /// The name the MDS gave in its `Welcome`.
    pub server: String,
    timeout: Duration,
    next_id: AtomicU64,
    pending: Pending,
    frames: mpsc::UnboundedSender<Frame>,
    alive: Arc<AtomicBool>,
}

fn net(addr: &str, reason: impl std::fmt::Display) -> MdsError {
    MdsError::Net {
        addr: addr.to_string(),
        reason: reason.to_string(),
    }
}

fn unexpected(addr: &str, what: &str, got: &Message) -> MdsError {
    net(addr, format!("answered {what} with {}", got.name()))
}

impl MdsClient {
    /// Connect over plain TCP and handshake within `timeout`; later calls each wait at most
    /// `timeout` too.
    pub async fn connect(addr: &str, client: &str, timeout: Duration) -> Result<Self> {
        Self::connect_with(addr, client, timeout, None).await
    }

    /// [`Self::connect`], over mutual TLS with `tls` (the handshake counts towards `timeout`).
    pub async fn connect_with(
        addr: &str,
        client: &str,
        timeout: Duration,
        tls: Option<&PeerTls>,
    ) -> Result<Self> {
        tokio::time::timeout(timeout, Self::connect_now(addr, client, timeout, tls))
            .await
            .map_err(|_| net(addr, format!("no answer within {timeout:?}")))?
    }

    async fn connect_now(
        addr: &str,
        client: &str,
        timeout: Duration,
        tls: Option<&PeerTls>,
    ) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| net(addr, format!("connect: {e}")))?;
        stream.set_nodelay(true).map_err(|e| net(addr, e))?;
        let stream = vstor_net::connect_peer(tls, addr, stream)
            .await
            .map_err(|e| net(addr, e))?;
        let (mut rd, mut wr) = stream.into_split();
        let codec = MdsCodec::default();
        let mut out = BytesMut::new();
        codec
            .encode(
                &Frame {
                    id: 0,
                    message: Message::Hello {
                        version: PROTOCOL_VERSION,
                        client: client.to_string(),
                    },
                },
                &mut out,
            )
            .map_err(|e| net(addr, e))?;
        wr.write_all(&out).await.map_err(|e| net(addr, e))?;
        wr.flush().await.map_err(|e| net(addr, e))?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let welcome = loop {
            if let Some(frame) = codec.decode(&mut buf).map_err(|e| net(addr, e))? {
                break frame.message;
            }
            if rd.read_buf(&mut buf).await.map_err(|e| net(addr, e))? == 0 {
                return Err(net(addr, "closed during the handshake"));
            }
        };
        let server = match welcome {
            Message::Welcome { server, .. } => server,
            Message::VersionMismatch { server, client } => {
                return Err(net(
                    addr,
                    format!("speaks MDS protocol {server}, this build {client}"),
                ))
            }
            Message::Error { message, .. } => return Err(net(addr, message)),
            other => return Err(unexpected(addr, "Hello", &other)),
        };

        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (frames, mut queue) = mpsc::unbounded_channel::<Frame>();
        {
            let (alive, codec) = (alive.clone(), codec.clone());
            tokio::spawn(async move {
                let mut out = BytesMut::with_capacity(256 * 1024);
                while let Some(frame) = queue.recv().await {
                    out.clear();
                    let mut ok = codec.encode(&frame, &mut out).is_ok();
                    while let Ok(more) = queue.try_recv() {
                        ok &= codec.encode(&more, &mut out).is_ok();
                    }
                    // `flush`: TLS keeps records until then; a no-op on TCP.
                    if !ok || wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                        break;
                    }
                }
                alive.store(false, Ordering::SeqCst);
            });
        }
        {
            let (pending, alive) = (pending.clone(), alive.clone());
            tokio::spawn(async move {
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(frame)) => {
                            if let Some(done) = pending.lock().remove(&frame.id) {
                                let _ = done.send(frame.message);
                            }
                            continue;
                        }
                        Ok(None) => {}
                        Err(_) => break,
                    }
                    match rd.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                alive.store(false, Ordering::SeqCst);
                // Dropping the senders fails every pending call at once.
                pending.lock().clear();
            });
        }
        Ok(Self {
            addr: addr.to_string(),
            server,
            timeout,
            next_id: AtomicU64::new(1),
            pending,
            frames,
            alive,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The connection still works (as far as this client knows).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Send `message` and wait at most the client's timeout for its reply. An `Error` reply
    /// becomes [`MdsError::Refused`] with its code.
    pub async fn call(&self, message: Message) -> Result<Message> {
        if !self.is_alive() {
            return Err(net(&self.addr, "connection lost"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, reply) = oneshot::channel();
        self.pending.lock().insert(id, done);
        if self.frames.send(Frame { id, message }).is_err() {
            self.pending.lock().remove(&id);
            return Err(net(&self.addr, "connection lost"));
        }
        let reply = match tokio::time::timeout(self.timeout, reply).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(net(&self.addr, "connection lost")),
            Err(_) => {
                self.pending.lock().remove(&id);
                return Err(net(
                    &self.addr,
                    format!("no reply within {:?}", self.timeout),
                ));
            }
        };
        match reply {
            Message::Error { code, message } => Err(MdsError::Refused {
                addr: self.addr.clone(),
                code,
                message,
            }),
            other => Ok(other),
        }
    }

    async fn done(&self, message: Message) -> Result<()> {
        match self.call(message).await? {
            Message::Done => Ok(()),
            other => Err(unexpected(&self.addr, "a request", &other)),
        }
    }

    pub async fn set_role(
        &self,
        volume: &str,
        namespace: &str,
        role: Role,
        owner_tag: u64,
    ) -> Result<()> {
        self.done(Message::SetRole {
            volume: volume.into(),
            namespace: namespace.into(),
            role,
            owner_tag,
        })
        .await
    }

    pub async fn multi_set(
        &self,
        volume: &str,
        owner_tag: u64,
        expect: Cork,
        cork: Cork,
        updates: Vec<Update>,
    ) -> Result<()> {
        self.done(Message::MultiSet {
            volume: volume.into(),
            owner_tag,
            expect,
            cork,
            updates,
        })
        .await
    }

    pub async fn multi_get(&self, volume: &str, addresses: Vec<u64>) -> Result<(Cork, Vec<u64>)> {
        match self
            .call(Message::MultiGet {
                volume: volume.into(),
                addresses,
            })
            .await?
        {
            Message::Locations { cork, locations } => Ok((cork, locations)),
            other => Err(unexpected(&self.addr, "MultiGet", &other)),
        }
    }

    pub async fn catch_up(&self, volume: &str, dry_run: bool) -> Result<CatchUpReport> {
        match self
            .call(Message::CatchUp {
                volume: volume.into(),
                dry_run,
            })
            .await?
        {
            Message::CaughtUp {
                behind,
                replayed,
                full_rebuild,
                cork,
            } => Ok(CatchUpReport {
                behind,
                replayed,
                full_rebuild,
                cork,
            }),
            other => Err(unexpected(&self.addr, "CatchUp", &other)),
        }
    }

    pub async fn stat(&self, volume: &str) -> Result<TableInfo> {
        match self
            .call(Message::Stat {
                volume: volume.into(),
            })
            .await?
        {
            Message::Table(info) => Ok(info),
            other => Err(unexpected(&self.addr, "Stat", &other)),
        }
    }

    pub async fn list(&self) -> Result<Vec<TableInfo>> {
        match self.call(Message::List).await? {
            Message::Tables(tables) => Ok(tables),
            other => Err(unexpected(&self.addr, "List", &other)),
        }
    }

    pub async fn drop_table(&self, volume: &str, owner_tag: u64) -> Result<()> {
        self.done(Message::Drop {
            volume: volume.into(),
            owner_tag,
        })
        .await
    }

    /// The whole map, page by page. The cork must not move between pages (a table that changes
    /// under the dump gives an error rather than a mix of two states).
    pub async fn dump_all(&self, volume: &str) -> Result<(Cork, BTreeMap<u64, u64>)> {
        let mut map = BTreeMap::new();
        let mut after = None;
        let mut first: Option<Cork> = None;
        loop {
            let (cork, entries) = match self
                .call(Message::Dump {
                    volume: volume.into(),
                    after,
                    limit: DUMP_PAGE,
                })
                .await?
            {
                Message::Entries { cork, entries } => (cork, entries),
                other => return Err(unexpected(&self.addr, "Dump", &other)),
            };
            match first {
                None => first = Some(cork),
                Some(c) if c != cork => {
                    return Err(net(
                        &self.addr,
                        format!("table of {volume} moved from {c} to {cork} during the dump"),
                    ))
                }
                Some(_) => {}
            }
            let Some(last) = entries.last().map(|(a, _)| *a) else {
                return Ok((first.unwrap_or_default(), map));
            };
            if after.is_some_and(|a| last <= a) {
                return Err(net(&self.addr, "dump pages do not advance"));
            }
            let full = entries.len() == DUMP_PAGE as usize;
            map.extend(entries);
            if !full {
                return Ok((first.unwrap_or_default(), map));
            }
            after = Some(last);
        }
    }
}

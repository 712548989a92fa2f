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
use vstor_volumedriver::SeedPage;

use crate::catchup::CatchUpReport;
use crate::error::{MdsError, Result};
use crate::proto::{
    Frame, MdsCodec, Message, MIN_PROTOCOL_VERSION, PAGE_BYTES, PAGE_ENTRIES, PROTOCOL_VERSION,
};
use crate::store::TableInfo;
use crate::table::{Cork, Role, Update};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>;

/// Entries per `Dump` page.
pub const DUMP_PAGE: u32 = 65_536;
/// Map pages asked for per `DumpPages` (4 MiB of reply at most).
const PAGES_PER_CALL: u32 = 1024;
/// `DumpPages` calls kept in flight: the MDS reads the next range while this side decodes.
const PAGE_CALLS_IN_FLIGHT: usize = 4;

/// A connected MDS.
pub struct MdsClient {
    addr: String,
    /// The name the MDS gave in its `Welcome`.
    pub server: String,
    /// The protocol version the connection agreed on.
    pub version: u16,
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

fn version_error(addr: &str, server: u16) -> MdsError {
    net(
        addr,
        format!(
            "speaks MDS protocol {server}, this build {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
        ),
    )
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
        let connect = async {
            match Self::connect_now(addr, client, timeout, tls, PROTOCOL_VERSION).await? {
                Ok(connected) => Ok(connected),
                // An older MDS: speak its version if this build still does.
                Err(server) if (MIN_PROTOCOL_VERSION..PROTOCOL_VERSION).contains(&server) => {
                    match Self::connect_now(addr, client, timeout, tls, server).await? {
                        Ok(connected) => Ok(connected),
                        Err(server) => Err(version_error(addr, server)),
                    }
                }
                Err(server) => Err(version_error(addr, server)),
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| net(addr, format!("no answer within {timeout:?}")))?
    }

    /// Connect speaking `version`; `Ok(Err(v))`: the MDS speaks only version `v`.
    async fn connect_now(
        addr: &str,
        client: &str,
        timeout: Duration,
        tls: Option<&PeerTls>,
        version: u16,
    ) -> Result<std::result::Result<Self, u16>> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| net(addr, format!("connect: {e}")))?;
        stream.set_nodelay(true).map_err(|e| net(addr, e))?;
        let stream = vstor_net::connect_peer(tls, addr, stream)
            .await
            .map_err(|e| net(addr, e))?;
        let (mut rd, mut wr) = stream.into_split();
        let codec = MdsCodec::with_version(version);
        let mut out = BytesMut::new();
        codec
            .encode(
                &Frame {
                    id: 0,
                    message: Message::Hello {
                        version,
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
            Message::Welcome {
                server,
                version: agreed,
            } if agreed == version => server,
            Message::Welcome {
                version: agreed, ..
            } => {
                return Err(net(
                    addr,
                    format!("welcomed protocol {agreed} after a Hello for {version}"),
                ))
            }
            Message::VersionMismatch { server, .. } => return Ok(Err(server)),
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
        Ok(Ok(Self {
            addr: addr.to_string(),
            server,
            version,
            timeout,
            next_id: AtomicU64::new(1),
            pending,
            frames,
            alive,
        }))
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
        let (id, reply) = self.send(message)?;
        self.reply(id, reply).await
    }

    /// Queue `message`; its reply arrives on the receiver (see [`reply`](Self::reply)).
    fn send(&self, message: Message) -> Result<(u64, oneshot::Receiver<Message>)> {
        if !self.is_alive() {
            return Err(net(&self.addr, "connection lost"));
        }
        if message.since_version() > self.version {
            return Err(net(
                &self.addr,
                format!(
                    "{} needs MDS protocol {}; this MDS speaks {}",
                    message.name(),
                    message.since_version(),
                    self.version
                ),
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, reply) = oneshot::channel();
        self.pending.lock().insert(id, done);
        if self.frames.send(Frame { id, message }).is_err() {
            self.pending.lock().remove(&id);
            return Err(net(&self.addr, "connection lost"));
        }
        Ok((id, reply))
    }

    /// Wait at most the client's timeout for the reply to request `id`.
    async fn reply(&self, id: u64, reply: oneshot::Receiver<Message>) -> Result<Message> {
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
        let (cork, entries) = self.dump_sorted(volume).await?;
        Ok((cork, entries.into_iter().collect()))
    }

    /// A dump's pages must all be as of one cork (a table that changes under the dump gives an
    /// error rather than a mix of two states): `seen` is the first page's.
    fn same_cork(&self, volume: &str, seen: &mut Option<Cork>, got: Cork) -> Result<()> {
        match *seen {
            None => *seen = Some(got),
            Some(c) if c != got => {
                return Err(net(
                    &self.addr,
                    format!("table of {volume} moved from {c} to {got} during the dump"),
                ))
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// [`dump_all`](Self::dump_all) as a vector in strictly increasing address order: what a
    /// restart loads, without building a search tree it does not need.
    pub async fn dump_sorted(&self, volume: &str) -> Result<(Cork, Vec<(u64, u64)>)> {
        if self.version >= 2 {
            let (cork, pages) = self.dump_by_pages(volume).await?;
            let mut entries = Vec::new();
            for (number, page) in pages {
                let base = number * PAGE_ENTRIES as u64;
                entries.extend(
                    page.iter()
                        .enumerate()
                        .filter(|(_, raw)| **raw != 0)
                        .map(|(i, raw)| (base + i as u64, *raw)),
                );
            }
            return Ok((cork, entries));
        }
        let mut map: Vec<(u64, u64)> = Vec::new();
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
            self.same_cork(volume, &mut first, cork)?;
            let Some(last) = entries.last().map(|(a, _)| *a) else {
                return Ok((first.unwrap_or_default(), map));
            };
            // Each page must continue the previous one in strictly increasing order: the
            // restart loads the vector as it is.
            let mut previous = after;
            for (address, _) in &entries {
                if previous.is_some_and(|p| *address <= p) {
                    return Err(net(&self.addr, "dump pages are not in address order"));
                }
                previous = Some(*address);
            }
            let full = entries.len() == DUMP_PAGE as usize;
            if map.is_empty() {
                map = entries;
            } else {
                map.extend(entries);
            }
            if !full {
                return Ok((first.unwrap_or_default(), map));
            }
            after = Some(last);
        }
    }

    /// The whole map in pages of 512 raw locations (0 = unwritten), in page order: what a
    /// restart loads. Protocol 2 sends it as the MDS stores it; from an MDS of protocol 1 the
    /// entries are gathered into pages here.
    pub async fn dump_pages(&self, volume: &str) -> Result<(Cork, Vec<(u64, SeedPage)>)> {
        if self.version >= 2 {
            return self.dump_by_pages(volume).await;
        }
        let (cork, entries) = self.dump_sorted(volume).await?;
        let mut pages: Vec<(u64, SeedPage)> = Vec::new();
        for (address, location) in entries {
            let number = address / PAGE_ENTRIES as u64;
            if pages.last().is_none_or(|(n, _)| *n != number) {
                pages.push((number, Box::new([0; PAGE_ENTRIES])));
            }
            if let Some((_, page)) = pages.last_mut() {
                page[(address % PAGE_ENTRIES as u64) as usize] = location;
            }
        }
        Ok((cork, pages))
    }

    /// [`dump_pages`](Self::dump_pages) over protocol 2: ranges of pages, several in flight.
    /// Ranges are asked in increasing order and their replies read in that order, so the pages
    /// come out sorted; a reply's `next` skips unwritten stretches and ends the dump.
    async fn dump_by_pages(&self, volume: &str) -> Result<(Cork, Vec<(u64, SeedPage)>)> {
        let mut map: Vec<(u64, SeedPage)> = Vec::new();
        let mut in_flight = std::collections::VecDeque::new();
        let (mut cursor, mut done) = (0u64, false);
        let mut cork: Option<Cork> = None;
        loop {
            while !done && in_flight.len() < PAGE_CALLS_IN_FLIGHT {
                let call = self.send(Message::DumpPages {
                    volume: volume.into(),
                    first: cursor,
                    count: PAGES_PER_CALL,
                })?;
                in_flight.push_back((cursor, call));
                match cursor.checked_add(u64::from(PAGES_PER_CALL)) {
                    Some(next) => cursor = next,
                    None => done = true,
                }
            }
            let Some((first, (id, reply))) = in_flight.pop_front() else {
                return Ok((cork.unwrap_or_default(), map));
            };
            let end = first.saturating_add(u64::from(PAGES_PER_CALL));
            let (got, next, pages) = match self.reply(id, reply).await? {
                Message::Pages { cork, next, pages } => (cork, next, pages),
                other => return Err(unexpected(&self.addr, "DumpPages", &other)),
            };
            self.same_cork(volume, &mut cork, got)?;
            let mut previous = None;
            for (number, page) in &pages {
                let in_range =
                    (first..end).contains(number) && previous.is_none_or(|p| *number > p);
                if !in_range || page.len() != PAGE_BYTES {
                    return Err(net(
                        &self.addr,
                        format!("page {number} of {volume} is out of order, out of range or not {PAGE_BYTES} bytes"),
                    ));
                }
                previous = Some(*number);
                let mut entries: SeedPage = Box::new([0; PAGE_ENTRIES]);
                for (entry, raw) in entries.iter_mut().zip(page.chunks_exact(8)) {
                    let mut le = [0u8; 8];
                    le.copy_from_slice(raw);
                    *entry = u64::from_le_bytes(le);
                }
                map.push((*number, entries));
            }
            match next {
                None => done = true,
                Some(n) if n < end => {
                    return Err(net(
                        &self.addr,
                        format!("dump of {volume}: next page {n} inside the range"),
                    ))
                }
                // Skip an unwritten stretch: ask from the next written page on.
                Some(n) => cursor = cursor.max(n),
            }
            // Ranges asked before `done` beyond the table's end come back empty.
        }
    }
}

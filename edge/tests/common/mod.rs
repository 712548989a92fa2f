//! Shared test support: an in-process server on 127.0.0.1 and a hand-written raw NBD client.
//!
//! The client deliberately does not reuse the server's constants or codec: it encodes the wire
//! format from the protocol document on its own, so a mistake on the server side cannot be
//! mirrored here and go unnoticed.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use vstor_edge::testing::{MemRegistry, MemTarget};
use vstor_edge::{NbdServer, NbdServerConfig};

pub const NBDMAGIC: u64 = 0x4e42444d41474943;
pub const IHAVEOPT: u64 = 0x49484156454f5054;
pub const REP_MAGIC: u64 = 0x3e889045565a9;

pub const C_FIXED_NEWSTYLE: u32 = 1;
pub const C_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const FLAG_HAS_FLAGS: u16 = 1;
pub const FLAG_READ_ONLY: u16 = 2;
pub const FLAG_SEND_FLUSH: u16 = 4;
pub const FLAG_SEND_FUA: u16 = 8;
pub const FLAG_SEND_TRIM: u16 = 32;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 64;
pub const FLAG_CAN_MULTI_CONN: u16 = 256;
pub const FLAG_SEND_FAST_ZERO: u16 = 2048;

pub const REQUEST_MAGIC: u32 = 0x25609513;
pub const SIMPLE_MAGIC: u32 = 0x67446698;
pub const STRUCTURED_MAGIC: u32 = 0x668e33ef;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 2;
pub const CMD_FLAG_DF: u16 = 4;
pub const CMD_FLAG_REQ_ONE: u16 = 8;
pub const CMD_FLAG_FAST_ZERO: u16 = 16;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const MIB: u64 = 1024 * 1024;
/// Upper bound on any single wait in a test, so a server bug fails the test instead of hanging it.
pub const STEP: Duration = Duration::from_secs(10);

pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A multi-thread runtime of its own for a server under test, shut down in the background when
/// dropped (also while a failing test unwinds, where blocking on its shutdown is not allowed).
/// A test that looks for a server blocking its runtime thread runs the server here: blocked,
/// that runtime's timers stop too, but the test's timeouts (`within`) still fire on its own.
pub struct ServerRuntime(Option<tokio::runtime::Runtime>);

impl ServerRuntime {
    pub fn new() -> Self {
        Self(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("server runtime"),
        ))
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("runtime is kept until drop")
            .handle()
    }
}

impl Drop for ServerRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub struct TestServer {
    pub server: NbdServer,
    pub addr: SocketAddr,
    pub registry: Arc<MemRegistry>,
    pub serve: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(registry: Arc<MemRegistry>) -> Self {
        Self::start_with(registry, NbdServerConfig::default(), None).await
    }

    pub async fn start_with(
        registry: Arc<MemRegistry>,
        config: NbdServerConfig,
        grace: Option<Duration>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut server = NbdServer::new(registry.clone(), config);
        if let Some(grace) = grace {
            server = server.with_shutdown_grace(grace);
        }
        let serve = {
            let server = server.clone();
            tokio::spawn(async move { server.serve(listener).await })
        };
        Self {
            server,
            addr,
            registry,
            serve,
        }
    }

    /// A server with one writable export `name` of `size` bytes.
    pub async fn with_export(name: &str, size: u64) -> (Self, Arc<MemTarget>) {
        let registry = Arc::new(MemRegistry::new());
        let target = Arc::new(MemTarget::new(size));
        registry.insert(name, target.clone());
        (Self::start(registry).await, target)
    }

    pub async fn connect(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    /// Connect, negotiate with `NBD_OPT_GO` and return a client in the transmission phase.
    pub async fn client(&self, name: &str, structured: bool, meta: bool) -> Client {
        let mut raw = self.connect().await;
        raw.greet(C_FIXED_NEWSTYLE | C_NO_ZEROES).await;
        if structured {
            raw.send_option(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(raw.read_option_reply().await.kind, REP_ACK);
        }
        if meta {
            raw.send_option(
                OPT_SET_META_CONTEXT,
                &meta_request(name, &["base:allocation"]),
            )
            .await;
            let replies = raw.read_option_replies().await;
            assert_eq!(replies.last().unwrap().kind, REP_ACK);
            assert_eq!(replies.len(), 2, "one context selected");
        }
        let replies = raw.go(OPT_GO, name, &[INFO_BLOCK_SIZE]).await;
        assert_eq!(replies.last().unwrap().kind, REP_ACK, "GO {name} failed");
        raw.into_client(structured)
    }
}

#[derive(Debug, Clone)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Data of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// Data of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
pub fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Wait for the server to close `stream` (EOF or reset), failing if it sends anything instead.
pub async fn expect_eof(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match within("connection close", stream.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("expected close, got {n} bytes: {:?}", &buf[..n]),
    }
}

/// A connection in the handshake phase.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
        Self { stream }
    }

    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        within("server bytes", self.stream.read_exact(&mut buf))
            .await
            .unwrap();
        buf
    }

    /// Read the greeting (checking its magics) and send `client_flags`; returns the handshake
    /// flags.
    pub async fn greet(&mut self, client_flags: u32) -> u16 {
        let hello = self.read_exact(18).await;
        assert_eq!(be64(&hello[0..]), NBDMAGIC);
        assert_eq!(be64(&hello[8..]), IHAVEOPT);
        let flags = be16(&hello[16..]);
        self.stream
            .write_all(&client_flags.to_be_bytes())
            .await
            .unwrap();
        flags
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut v = Vec::new();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.stream.write_all(&v).await.unwrap();
    }

    pub async fn read_option_reply(&mut self) -> OptReply {
        let h = self.read_exact(20).await;
        assert_eq!(be64(&h), REP_MAGIC, "option reply magic");
        let option = be32(&h[8..]);
        let kind = be32(&h[12..]);
        let len = be32(&h[16..]) as usize;
        let data = self.read_exact(len).await;
        OptReply { option, kind, data }
    }

    /// Replies up to and including the final ACK or error.
    pub async fn read_option_replies(&mut self) -> Vec<OptReply> {
        let mut out = Vec::new();
        loop {
            let r = self.read_option_reply().await;
            let last = r.kind == REP_ACK || r.kind & 0x8000_0000 != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    pub async fn go(&mut self, option: u32, name: &str, infos: &[u16]) -> Vec<OptReply> {
        self.send_option(option, &info_request(name, infos)).await;
        let replies = self.read_option_replies().await;
        for r in &replies {
            assert_eq!(r.option, option);
        }
        replies
    }

    /// Wait for the server to close the connection (EOF or reset), failing if it sends data.
    pub async fn expect_closed(&mut self) {
        expect_eof(&mut self.stream).await;
    }

    pub fn into_client(self, structured: bool) -> Client {
        Client {
            stream: self.stream,
            structured,
            reads: HashMap::new(),
        }
    }
}

/// One reply as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        cookie: u64,
        error: u32,
        data: Vec<u8>,
    },
    Chunk {
        cookie: u64,
        flags: u16,
        kind: u16,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The NBD error of the reply (0 on success), from either reply format.
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { kind, payload, .. } if *kind & 0x8000 != 0 => be32(payload),
            Reply::Chunk { .. } => 0,
        }
    }

    /// The data of a successful read, from either reply format.
    pub fn data(&self) -> &[u8] {
        match self {
            Reply::Simple { data, .. } => data,
            Reply::Chunk { kind, payload, .. } if *kind == REPLY_TYPE_OFFSET_DATA => &payload[8..],
            other => panic!("not a data reply: {other:?}"),
        }
    }
}

/// A connection in the transmission phase.
pub struct Client {
    pub stream: TcpStream,
    pub structured: bool,
    /// Outstanding READ lengths by cookie, to parse simple replies.
    reads: HashMap<u64, u32>,
}

pub fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(28);
    v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

impl Client {
    pub async fn send(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        if cmd == CMD_READ {
            self.reads.insert(cookie, len);
        }
        self.stream
            .write_all(&request(flags, cmd, cookie, offset, len))
            .await
            .unwrap();
    }

    pub async fn send_write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let mut v = request(flags, CMD_WRITE, cookie, offset, data.len() as u32);
        v.extend_from_slice(data);
        self.stream.write_all(&v).await.unwrap();
    }

    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        within("reply bytes", self.stream.read_exact(&mut buf))
            .await
            .unwrap();
        buf
    }

    pub async fn reply(&mut self) -> Reply {
        let magic = be32(&self.read_exact(4).await);
        match magic {
            SIMPLE_MAGIC => {
                let h = self.read_exact(12).await;
                let error = be32(&h);
                let cookie = be64(&h[4..]);
                let read_len = self.reads.remove(&cookie);
                let data = match read_len {
                    Some(len) if error == 0 => {
                        assert!(
                            !self.structured,
                            "simple reply to READ with structured replies"
                        );
                        self.read_exact(len as usize).await
                    }
                    _ => Vec::new(),
                };
                Reply::Simple {
                    cookie,
                    error,
                    data,
                }
            }
            STRUCTURED_MAGIC => {
                assert!(self.structured, "structured reply without negotiation");
                let h = self.read_exact(16).await;
                let flags = be16(&h);
                let kind = be16(&h[2..]);
                let cookie = be64(&h[4..]);
                let len = be32(&h[12..]) as usize;
                let payload = self.read_exact(len).await;
                if flags & REPLY_FLAG_DONE != 0 {
                    self.reads.remove(&cookie);
                }
                Reply::Chunk {
                    cookie,
                    flags,
                    kind,
                    payload,
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Send one request and wait for its (single) reply.
    pub async fn call(&mut self, flags: u16, cmd: u16, offset: u64, len: u32) -> Reply {
        let cookie = offset.wrapping_add(0x1000) ^ u64::from(len);
        self.send(flags, cmd, cookie, offset, len).await;
        let r = self.reply().await;
        assert_eq!(r.cookie(), cookie);
        r
    }

    pub async fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        let cookie = offset.wrapping_add(0x2000);
        self.send_write(flags, cookie, offset, data).await;
        let r = self.reply().await;
        assert_eq!(r.cookie(), cookie);
        r.error()
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let r = self.call(0, CMD_READ, offset, len).await;
        assert_eq!(r.error(), 0, "read at {offset} failed: {r:?}");
        if let Reply::Chunk { flags, payload, .. } = &r {
            assert_eq!(flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
            assert_eq!(be64(payload), offset);
        }
        r.data().to_vec()
    }

    pub async fn disc(&mut self) {
        self.send(0, CMD_DISC, 0xd15c, 0, 0).await;
    }

    pub async fn expect_closed(&mut self) {
        expect_eof(&mut self.stream).await;
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, to compare large buffers with short assertion messages.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Wait for `n` completions; returns (user_data, ret) sorted by user_data.
pub fn wait_all(q: &mut blkio::Blkioq, n: usize) -> Vec<(usize, i32)> {
    let mut completions: Vec<std::mem::MaybeUninit<blkio::Completion>> =
        (0..n).map(|_| std::mem::MaybeUninit::uninit()).collect();
    let mut out = Vec::new();
    while out.len() < n {
        let got = q
            .do_io(&mut completions[..n - out.len()], 1, None, None)
            .unwrap();
        for c in &completions[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_read() };
            out.push((c.user_data, c.ret));
        }
    }
    out.sort();
    out
}

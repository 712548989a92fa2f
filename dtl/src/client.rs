//! The volume side of the DTL: an async client over one TCP connection.
//!
//! Every call is one request and its reply (or reply stream), bounded by
//! [`DtlClientConfig::request_timeout`]; connecting (TCP + `Hello`) is bounded by
//! [`DtlClientConfig::connect_timeout`]. The defaults are Open vStorage's (1 s connect, 60 s
//! request).
//!
//! *Why a failed call poisons the client:* after a timeout, a transport error, or a call whose
//! future was dropped mid-way, a reply may still be in flight, and the next call would read it as
//! its own. The client therefore marks itself broken at the start of every exchange and clears
//! the mark only once the exchange completed; a broken client fails fast with
//! [`DtlError::ConnectionBroken`] and the owner reconnects (and, in the engine, goes degraded).
//! A server *refusal* (`Error` reply, e.g. a stale owner tag) leaves the connection usable.
//!
//! With [`DtlClientConfig::tls`] the connection is mutual TLS (`vstor_net`): the client presents
//! the node's certificate and checks the server's against the cluster CA and the host it dialled;
//! the TLS handshake counts towards the connect timeout.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::time::timeout;
use tokio_util::codec::Framed;
use vstor_net::{PeerStream, PeerTls};

use crate::error::DtlError;
use crate::protocol::{DtlCodec, Entry, Message, ScoRange, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use crate::Result;

#[derive(Clone, Debug)]
pub struct DtlClientConfig {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Mutual TLS with the DTL server; `None`: plain TCP.
    pub tls: Option<PeerTls>,
}

impl Default for DtlClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

pub struct DtlClient {
    framed: Framed<PeerStream, DtlCodec>,
    config: DtlClientConfig,
    broken: bool,
}

impl DtlClient {
    /// Connects with default timeouts and checks the protocol version.
    pub async fn connect(addr: impl ToSocketAddrs + std::fmt::Display) -> Result<Self> {
        Self::connect_with(addr, DtlClientConfig::default()).await
    }

    /// Connects to `addr` (`host:port`; with TLS its host is the name the server's certificate
    /// must carry) and checks the protocol version. A server of an older version this build
    /// still speaks (a rolling upgrade: [`MIN_PROTOCOL_VERSION`]) says so in its
    /// `VersionMismatch`; the client then connects again speaking that version, which costs
    /// what the old version lacks (a v1 `Register` carries no incarnation).
    pub async fn connect_with(
        addr: impl ToSocketAddrs + std::fmt::Display,
        config: DtlClientConfig,
    ) -> Result<Self> {
        let after = config.connect_timeout;
        let name = addr.to_string();
        let connect = async {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
            match Self::handshake(&addrs, &name, &config, PROTOCOL_VERSION).await {
                Err(DtlError::VersionMismatch { server, .. })
                    if (MIN_PROTOCOL_VERSION..PROTOCOL_VERSION).contains(&server) =>
                {
                    Self::handshake(&addrs, &name, &config, server).await
                }
                other => other,
            }
        };
        let framed = timeout(after, connect)
            .await
            .map_err(|_| DtlError::Timeout {
                during: "connecting to the DTL",
                after,
            })??;
        Ok(Self {
            framed,
            config,
            broken: false,
        })
    }

    /// One connection's handshake, speaking `version`.
    async fn handshake(
        addrs: &[std::net::SocketAddr],
        name: &str,
        config: &DtlClientConfig,
        version: u16,
    ) -> Result<Framed<PeerStream, DtlCodec>> {
        let stream = TcpStream::connect(addrs).await?;
        stream.set_nodelay(true)?;
        let stream = match &config.tls {
            Some(tls) => tls.connect(name, stream).await?,
            None => PeerStream::Plain(stream),
        };
        let mut framed = Framed::new(stream, DtlCodec::with_version(version));
        framed.send(Message::Hello { version }).await?;
        match framed.next().await {
            Some(Ok(Message::HelloOk { version: agreed })) if agreed == version => Ok(framed),
            Some(Ok(
                Message::HelloOk { version: server } | Message::VersionMismatch { server, .. },
            )) => Err(DtlError::VersionMismatch {
                server,
                client: version,
            }),
            Some(Ok(Message::Error { code, message })) => Err(DtlError::Remote { code, message }),
            Some(Ok(other)) => Err(DtlError::UnexpectedMessage(format!(
                "{} in reply to Hello",
                other.name()
            ))),
            Some(Err(e)) => Err(e),
            None => Err(DtlError::ConnectionClosed),
        }
    }

    /// The protocol version this connection speaks.
    pub fn version(&self) -> u16 {
        self.framed.codec().version()
    }

    pub fn config(&self) -> &DtlClientConfig {
        &self.config
    }

    /// False once a call failed in a way that leaves the connection out of step.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    async fn send(&mut self, msg: Message, during: &'static str) -> Result<()> {
        let after = self.config.request_timeout;
        timeout(after, self.framed.send(msg))
            .await
            .map_err(|_| DtlError::Timeout { during, after })?
    }

    async fn recv(&mut self, during: &'static str) -> Result<Message> {
        let after = self.config.request_timeout;
        match timeout(after, self.framed.next())
            .await
            .map_err(|_| DtlError::Timeout { during, after })?
        {
            Some(r) => r,
            None => Err(DtlError::ConnectionClosed),
        }
    }

    /// One request, one reply. A server `Error` is returned as [`DtlError::Remote`].
    async fn call(&mut self, msg: Message, during: &'static str) -> Result<Message> {
        if self.broken {
            return Err(DtlError::ConnectionBroken);
        }
        self.broken = true;
        self.send(msg, during).await?;
        let reply = self.recv(during).await?;
        self.broken = false;
        match reply {
            Message::Error { code, message } => Err(DtlError::Remote { code, message }),
            other => Ok(other),
        }
    }

    async fn call_ok(&mut self, msg: Message, during: &'static str) -> Result<()> {
        match self.call(msg, during).await? {
            Message::Ok => Ok(()),
            other => {
                self.broken = true;
                Err(DtlError::UnexpectedMessage(format!(
                    "{} while {during}",
                    other.name()
                )))
            }
        }
    }

    /// Registers `namespace`, or takes it over with a newer `owner_tag` or for a newer
    /// `incarnation` of the volume (0: not known; see `DtlStore::register`).
    pub async fn register(
        &mut self,
        namespace: &str,
        cluster_size: u32,
        owner_tag: u64,
        incarnation: u64,
    ) -> Result<()> {
        let msg = Message::Register {
            namespace: namespace.to_string(),
            cluster_size,
            owner_tag,
            incarnation,
        };
        self.call_ok(msg, "registering").await
    }

    /// Forgets `namespace` and deletes its entries on the server.
    /// `incarnation`: the volume's (0: not known); a namespace holding a newer one is left alone.
    pub async fn unregister(
        &mut self,
        namespace: &str,
        owner_tag: u64,
        incarnation: u64,
    ) -> Result<()> {
        let msg = Message::Unregister {
            namespace: namespace.to_string(),
            owner_tag,
            incarnation,
        };
        self.call_ok(msg, "unregistering").await
    }

    /// Appends a batch; all entries must belong to SCO `sco`. `Ok` means the server stored it.
    pub async fn add_entries(
        &mut self,
        namespace: &str,
        owner_tag: u64,
        sco: u32,
        entries: Vec<Entry>,
    ) -> Result<()> {
        let msg = Message::AddEntries {
            namespace: namespace.to_string(),
            owner_tag,
            sco,
            entries,
        };
        self.call_ok(msg, "adding entries").await
    }

    pub async fn flush(&mut self, namespace: &str) -> Result<()> {
        let msg = Message::Flush {
            namespace: namespace.to_string(),
        };
        self.call_ok(msg, "flushing").await
    }

    pub async fn sco_range(&mut self, namespace: &str) -> Result<ScoRange> {
        let msg = Message::GetScoRange {
            namespace: namespace.to_string(),
        };
        match self.call(msg, "getting the SCO range").await? {
            Message::ScoRange(r) => Ok(r),
            other => {
                self.broken = true;
                Err(DtlError::UnexpectedMessage(format!(
                    "{} in reply to GetScoRange",
                    other.name()
                )))
            }
        }
    }

    /// All entries of SCOs `from_sco..=to_sco`, in append order. Each reply batch is bounded by
    /// the request timeout, not the whole transfer.
    pub async fn entries(
        &mut self,
        namespace: &str,
        from_sco: u32,
        to_sco: u32,
    ) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        self.for_each_batch(namespace, from_sco, to_sco, |_, batch| {
            out.extend(batch);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Streams the entries of SCOs `from_sco..=to_sco` batch by batch to `f(sco, entries)`
    /// without holding them all in memory (replay). An error from `f` aborts the transfer and
    /// leaves the client broken (the rest of the stream is still in flight).
    pub async fn for_each_batch(
        &mut self,
        namespace: &str,
        from_sco: u32,
        to_sco: u32,
        mut f: impl FnMut(u32, Vec<Entry>) -> Result<()>,
    ) -> Result<()> {
        if self.broken {
            return Err(DtlError::ConnectionBroken);
        }
        self.broken = true;
        let during = "getting entries";
        self.send(
            Message::GetEntries {
                namespace: namespace.to_string(),
                from_sco,
                to_sco,
            },
            during,
        )
        .await?;
        loop {
            match self.recv(during).await? {
                Message::Entries { sco, entries } => f(sco, entries)?,
                Message::EntriesEnd => {
                    self.broken = false;
                    return Ok(());
                }
                Message::Error { code, message } => {
                    self.broken = false;
                    return Err(DtlError::Remote { code, message });
                }
                other => {
                    return Err(DtlError::UnexpectedMessage(format!(
                        "{} while {during}",
                        other.name()
                    )))
                }
            }
        }
    }

    /// Trim: the server drops every entry of SCOs `<= sco`.
    pub async fn remove_up_to(&mut self, namespace: &str, owner_tag: u64, sco: u32) -> Result<()> {
        let msg = Message::RemoveUpTo {
            namespace: namespace.to_string(),
            owner_tag,
            sco,
        };
        self.call_ok(msg, "trimming").await
    }

    pub async fn clear(&mut self, namespace: &str, owner_tag: u64) -> Result<()> {
        let msg = Message::Clear {
            namespace: namespace.to_string(),
            owner_tag,
        };
        self.call_ok(msg, "clearing").await
    }
}

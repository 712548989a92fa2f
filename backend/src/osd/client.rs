//! A connection to one OSD: pipelined requests with a deadline each.
//!
//! The EC tier reads and writes fragments on many OSDs at once, and an OSD that died or hangs
//! must cost a bounded wait, never a stuck volume: every call has a timeout, and when the
//! connection breaks every pending call fails at once with the OSD's address in the error, so the
//! caller re-routes (degraded read) or gives up the fragment (put, completed by repair).
//!
//! One writer task owns the socket's write half and one reader task its read half; a call
//! registers a one-shot completion under a fresh id, queues its frame, and awaits the reply
//! matched by id.
//!
//! With a cluster identity ([`vstor_net::PeerTls`]) the connection is mutual TLS: the client
//! presents its certificate and checks the OSD's against the cluster CA and the host it dialled.
//! The halves come from [`vstor_net::PeerStream::into_split`]: `TcpStream::into_split` (no lock,
//! the plain fast path) without TLS, `tokio::io::split` over TLS (see that module for why).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use vstor_net::PeerTls;

use super::proto::{Frame, Message, OsdCodec, PROTOCOL_VERSION};
use crate::{BackendError, Result};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>;

/// A connected OSD.
pub struct OsdClient {
    addr: String,
    pub osd_id: u64,
    pub domain: String,
    next_id: AtomicU64,
    pending: Pending,
    frames: mpsc::UnboundedSender<Frame>,
    alive: Arc<AtomicBool>,
}

fn osd_error(addr: &str, reason: impl std::fmt::Display) -> BackendError {
    BackendError::Osd {
        addr: addr.to_string(),
        reason: reason.to_string(),
    }
}

impl OsdClient {
    /// Connect and handshake (TLS included, with `tls`) within `timeout`.
    pub async fn connect(
        addr: &str,
        client: &str,
        timeout: Duration,
        tls: Option<&PeerTls>,
    ) -> Result<Self> {
        tokio::time::timeout(timeout, Self::connect_now(addr, client, tls))
            .await
            .map_err(|_| osd_error(addr, format!("no answer within {timeout:?}")))?
    }

    async fn connect_now(addr: &str, client: &str, tls: Option<&PeerTls>) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| osd_error(addr, format!("connect: {e}")))?;
        stream.set_nodelay(true).map_err(|e| osd_error(addr, e))?;
        let stream = vstor_net::connect_peer(tls, addr, stream)
            .await
            .map_err(|e| osd_error(addr, e))?;
        let (mut rd, mut wr) = stream.into_split();
        let codec = OsdCodec::default();
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
            .map_err(|e| osd_error(addr, e))?;
        wr.write_all(&out).await.map_err(|e| osd_error(addr, e))?;
        wr.flush().await.map_err(|e| osd_error(addr, e))?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let welcome = loop {
            if let Some(frame) = codec.decode(&mut buf).map_err(|e| osd_error(addr, e))? {
                break frame.message;
            }
            if rd
                .read_buf(&mut buf)
                .await
                .map_err(|e| osd_error(addr, e))?
                == 0
            {
                return Err(osd_error(addr, "closed during the handshake"));
            }
        };
        let (osd_id, domain) = match welcome {
            Message::Welcome { osd_id, domain, .. } => (osd_id, domain),
            Message::VersionMismatch { server, client } => {
                return Err(osd_error(
                    addr,
                    format!("speaks OSD protocol {server}, this build {client}"),
                ))
            }
            Message::Error { message, .. } => return Err(osd_error(addr, message)),
            other => {
                return Err(osd_error(
                    addr,
                    format!("answered Hello with {}", other.name()),
                ))
            }
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
            osd_id,
            domain,
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

    /// Send `message` and wait at most `timeout` for its reply. An `Error` reply becomes the
    /// matching [`BackendError`].
    pub async fn call(&self, message: Message, timeout: Duration) -> Result<Message> {
        if !self.is_alive() {
            return Err(osd_error(&self.addr, "connection lost"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, reply) = oneshot::channel();
        self.pending.lock().insert(id, done);
        if self.frames.send(Frame { id, message }).is_err() {
            self.pending.lock().remove(&id);
            return Err(osd_error(&self.addr, "connection lost"));
        }
        let reply = match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(osd_error(&self.addr, "connection lost")),
            Err(_) => {
                self.pending.lock().remove(&id);
                return Err(osd_error(
                    &self.addr,
                    format!("no reply within {timeout:?}"),
                ));
            }
        };
        match reply {
            Message::Error { code, message } => Err(BackendError::OsdRefused {
                addr: self.addr.clone(),
                code,
                message,
            }),
            other => Ok(other),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests {
    use super::*;
    use crate::ec::codec::CodecId;
    use crate::ec::fragment::{encode_fragment, FragmentHeader};
    use crate::osd::server::{serve, OsdServerConfig};
    use crate::osd::store::FragmentStore;
    use tokio_util::sync::CancellationToken;

    const T: Duration = Duration::from_secs(5);

    fn file(index: u8, data: &[u8]) -> Vec<u8> {
        let header = FragmentHeader {
            codec: CodecId::REED_SOLOMON_GF8,
            k: 2,
            m: 1,
            index,
            fragment_size: 4096,
            object_size: 2 * data.len() as u64,
            object_version: 1,
            owner_tag: 3,
            data_len: data.len() as u64,
            namespace: "ns".into(),
            name: "obj".into(),
            local_group: Vec::new(),
        };
        encode_fragment(&header, data).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_stores_reads_lists_and_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FragmentStore::open(dir.path(), 1 << 30).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            store,
            OsdServerConfig::new(7, "rack1"),
            shutdown.clone(),
        ));
        let client = OsdClient::connect(&addr, "test", T, None).await.unwrap();
        assert_eq!((client.osd_id, client.domain.as_str()), (7, "rack1"));
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // Pipelined: several puts in flight at once.
        let puts = (0..3u8).map(|index| {
            client.call(
                Message::Put {
                    namespace: "ns".into(),
                    name: "obj".into(),
                    version: 1,
                    index,
                    tag: 3,
                    file: file(index, &data).into(),
                },
                T,
            )
        });
        for reply in futures::future::join_all(puts).await {
            assert_eq!(reply.unwrap(), Message::Done);
        }
        let got = client
            .call(
                Message::GetRange {
                    namespace: "ns".into(),
                    name: "obj".into(),
                    version: 1,
                    index: 1,
                    offset: 4000,
                    len: 3000,
                },
                T,
            )
            .await
            .unwrap();
        assert_eq!(
            got,
            Message::Data {
                data: data[4000..7000].to_vec().into()
            }
        );
        let Message::Listing { fragments } = client
            .call(
                Message::List {
                    namespace: "ns".into(),
                    after: String::new(),
                    limit: 100,
                },
                T,
            )
            .await
            .unwrap()
        else {
            panic!("not a listing");
        };
        assert_eq!(fragments.len(), 3);
        let stale = client
            .call(
                Message::Delete {
                    namespace: "ns".into(),
                    name: "obj".into(),
                    tag: 2,
                },
                T,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                stale,
                BackendError::OsdRefused {
                    code: crate::osd::proto::ErrorCode::Fenced,
                    ..
                }
            ),
            "{stale}"
        );
        let Message::Usage(usage) = client.call(Message::Stat, T).await.unwrap() else {
            panic!("not usage");
        };
        assert_eq!(usage.fragments, 3);

        // The OSD goes away: calls fail at once with its address, not after the timeout.
        shutdown.cancel();
        server.await.unwrap().unwrap();
        drop(client);
        let client = OsdClient::connect(&addr, "test", Duration::from_secs(1), None).await;
        assert!(client.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_osd_costs_the_timeout_not_forever() {
        // A listener that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let started = std::time::Instant::now();
        let err = OsdClient::connect(&addr, "test", Duration::from_millis(300), None)
            .await
            .err()
            .expect("no Welcome");
        assert!(err.to_string().contains(&addr), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}

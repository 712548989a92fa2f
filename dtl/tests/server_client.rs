//! Server + client over 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::codec::{Decoder, Framed};
use vstor_dtl::{
    DtlClient, DtlClientConfig, DtlCodec, DtlError, DtlServer, DtlServerConfig, Entry, ErrorCode,
    Message, ScoRange, PROTOCOL_VERSION,
};

const CS: u32 = 4096;

struct Running {
    server: Arc<DtlServer>,
    addr: SocketAddr,
    task: JoinHandle<vstor_dtl::Result<()>>,
}

impl Running {
    async fn start(dir: &Path, fsync: bool) -> Self {
        let server = Arc::new(
            DtlServer::new(
                dir,
                DtlServerConfig {
                    fsync,
                    ..DtlServerConfig::default()
                },
            )
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = server.clone();
        let task = tokio::spawn(async move { s.serve(listener).await });
        Running { server, addr, task }
    }

    async fn stop(self) {
        self.server.shutdown().await;
        self.task.await.unwrap().unwrap();
    }
}

fn batch(sco: u32, first_offset: u16, n: u16, seed: u8) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            let off = first_offset + i;
            let data: Vec<u8> = (0..CS as usize)
                .map(|j| (j as u8) ^ seed ^ (off as u8).wrapping_mul(31))
                .collect();
            Entry {
                location: u64::from(sco) | u64::from(off) << 32,
                lba: (u64::from(sco) * 1_000 + u64::from(off)) * 8,
                data: Bytes::from(data),
            }
        })
        .collect()
}

#[tokio::test]
async fn full_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path(), false).await;
    let mut c = DtlClient::connect(srv.addr).await.unwrap();
    c.register("vol", CS, 1, 0).await.unwrap();

    let mut expect = Vec::new();
    for sco in 1..=3u32 {
        for k in 0..3u16 {
            // 300 entries per SCO: the server must split them into several reply batches.
            let b = batch(sco, k * 100, 100, sco as u8 * 7 + k as u8);
            c.add_entries("vol", 1, sco, b.clone()).await.unwrap();
            expect.extend(b);
        }
    }
    c.flush("vol").await.unwrap();
    assert_eq!(
        c.sco_range("vol").await.unwrap(),
        ScoRange {
            oldest: Some(1),
            newest: Some(3)
        }
    );
    let got = c.entries("vol", 0, u32::MAX).await.unwrap();
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "entries differ from what was added");
    assert_eq!(
        c.entries("vol", 2, 2).await.unwrap(),
        expect[300..600].to_vec()
    );
    // Batches arrive tagged with their SCO and in order.
    let mut seen = Vec::new();
    c.for_each_batch("vol", 0, u32::MAX, |sco, b| {
        assert!(b.iter().all(|e| e.sco() == sco));
        seen.push((sco, b.len()));
        Ok(())
    })
    .await
    .unwrap();
    assert!(
        seen.len() > 3,
        "300 x 4 KiB per SCO should need several batches: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0));

    c.remove_up_to("vol", 1, 2).await.unwrap();
    assert_eq!(c.sco_range("vol").await.unwrap().oldest, Some(3));
    assert_eq!(
        c.entries("vol", 0, u32::MAX).await.unwrap(),
        expect[600..].to_vec()
    );

    c.clear("vol", 1).await.unwrap();
    assert_eq!(c.sco_range("vol").await.unwrap(), ScoRange::default());
    assert!(c.entries("vol", 0, u32::MAX).await.unwrap().is_empty());

    // Refusals come back with their code and leave the connection usable.
    let e = c.sco_range("nope").await.unwrap_err();
    assert_eq!(e.remote_code(), Some(ErrorCode::UnknownNamespace), "{e}");
    let e = c.entries("nope", 0, 1).await.unwrap_err();
    assert_eq!(e.remote_code(), Some(ErrorCode::UnknownNamespace), "{e}");
    let e = c
        .add_entries("vol", 1, 5, batch(4, 0, 1, 0))
        .await
        .unwrap_err();
    assert_eq!(e.remote_code(), Some(ErrorCode::Invalid), "{e}");
    assert!(c.is_usable());

    c.unregister("vol", 1, 0).await.unwrap();
    let e = c.flush("vol").await.unwrap_err();
    assert_eq!(e.remote_code(), Some(ErrorCode::UnknownNamespace));
    srv.stop().await;
}

#[tokio::test]
async fn stale_owner_tag_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path(), false).await;
    let mut old = DtlClient::connect(srv.addr).await.unwrap();
    old.register("vol", CS, 10, 0).await.unwrap();
    let first = batch(1, 0, 4, 1);
    old.add_entries("vol", 10, 1, first.clone()).await.unwrap();

    // The volume moves: the new owner registers with a newer tag and sees the old entries.
    let mut new = DtlClient::connect(srv.addr).await.unwrap();
    new.register("vol", CS, 11, 0).await.unwrap();
    assert_eq!(new.entries("vol", 0, u32::MAX).await.unwrap(), first);

    for e in [
        old.add_entries("vol", 10, 1, batch(1, 4, 1, 2))
            .await
            .unwrap_err(),
        old.remove_up_to("vol", 10, 1).await.unwrap_err(),
        old.clear("vol", 10).await.unwrap_err(),
        old.register("vol", CS, 10, 0).await.unwrap_err(),
    ] {
        assert_eq!(e.remote_code(), Some(ErrorCode::StaleOwnerTag), "{e}");
    }
    // Nothing the old owner sent landed.
    assert_eq!(new.entries("vol", 0, u32::MAX).await.unwrap(), first);
    new.add_entries("vol", 11, 2, batch(2, 0, 1, 3))
        .await
        .unwrap();
    assert_eq!(new.sco_range("vol").await.unwrap().newest, Some(2));
    srv.stop().await;
}

#[tokio::test]
async fn acknowledged_entries_survive_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path(), true).await;
    let mut c = DtlClient::connect(srv.addr).await.unwrap();
    c.register("a", CS, 3, 0).await.unwrap();
    c.register("b", CS, 1, 0).await.unwrap();
    let mut expect = Vec::new();
    for sco in [4u32, 5, 9] {
        let b = batch(sco, 0, 50, sco as u8);
        c.add_entries("a", 3, sco, b.clone()).await.unwrap();
        expect.extend(b);
    }
    c.remove_up_to("a", 3, 4).await.unwrap();
    expect.drain(..50);
    drop(c);
    srv.stop().await;

    let srv = Running::start(dir.path(), true).await;
    let mut c = DtlClient::connect(srv.addr).await.unwrap();
    assert_eq!(
        c.sco_range("a").await.unwrap(),
        ScoRange {
            oldest: Some(5),
            newest: Some(9)
        }
    );
    assert_eq!(c.entries("a", 0, u32::MAX).await.unwrap(), expect);
    assert_eq!(c.sco_range("b").await.unwrap(), ScoRange::default());
    // The registration (owner tag) survived too: fencing still holds after the restart.
    let e = c
        .add_entries("a", 2, 9, batch(9, 50, 1, 0))
        .await
        .unwrap_err();
    assert_eq!(e.remote_code(), Some(ErrorCode::StaleOwnerTag));
    c.add_entries("a", 3, 9, batch(9, 50, 1, 0)).await.unwrap();
    srv.stop().await;
}

/// Reads until EOF (bounded so a broken server fails the test instead of hanging it).
async fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("server should close the connection")
        .unwrap();
    out
}

#[tokio::test]
async fn garbage_client_is_disconnected_others_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path(), false).await;
    let mut good = DtlClient::connect(srv.addr).await.unwrap();
    good.register("vol", CS, 1, 0).await.unwrap();
    let b = batch(1, 0, 8, 9);
    good.add_entries("vol", 1, 1, b.clone()).await.unwrap();

    // 1. Pure garbage before any Hello.
    let mut bad = TcpStream::connect(srv.addr).await.unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reply = read_to_eof(&mut bad).await;
    let msg = DtlCodec::new()
        .decode(&mut BytesMut::from(&reply[..]))
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            msg,
            Message::Error {
                code: ErrorCode::Corrupt,
                ..
            }
        ),
        "{msg:?}"
    );

    // 2. A proper handshake, then an AddEntries frame with one flipped payload byte.
    let mut bad = TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = BytesMut::new();
    let mut codec = DtlCodec::new();
    tokio_util::codec::Encoder::encode(
        &mut codec,
        Message::Hello {
            version: PROTOCOL_VERSION,
        },
        &mut buf,
    )
    .unwrap();
    let hello_len = buf.len();
    tokio_util::codec::Encoder::encode(
        &mut codec,
        Message::AddEntries {
            namespace: "vol".into(),
            owner_tag: 1,
            sco: 1,
            entries: batch(1, 8, 1, 0),
        },
        &mut buf,
    )
    .unwrap();
    let last = buf.len() - 1;
    buf[last] ^= 1;
    assert!(last > hello_len);
    bad.write_all(&buf).await.unwrap();
    let reply = read_to_eof(&mut bad).await;
    let mut rb = BytesMut::from(&reply[..]);
    assert_eq!(
        codec.decode(&mut rb).unwrap(),
        Some(Message::HelloOk {
            version: PROTOCOL_VERSION
        })
    );
    assert!(matches!(
        codec.decode(&mut rb).unwrap(),
        Some(Message::Error {
            code: ErrorCode::Corrupt,
            ..
        })
    ));

    // 3. A frame header announcing more than 64 MiB.
    let mut bad = TcpStream::connect(srv.addr).await.unwrap();
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&vstor_dtl::protocol::MAGIC.to_le_bytes());
    hdr.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hdr.extend_from_slice(&11u16.to_le_bytes());
    hdr.extend_from_slice(&(100u32 << 20).to_le_bytes());
    hdr.extend_from_slice(&0u32.to_le_bytes());
    bad.write_all(&hdr).await.unwrap();
    let reply = read_to_eof(&mut bad).await;
    let msg = DtlCodec::new()
        .decode(&mut BytesMut::from(&reply[..]))
        .unwrap()
        .unwrap();
    assert!(matches!(msg, Message::Error { .. }), "{msg:?}");

    // 4. A request before Hello.
    let mut bad = Framed::new(TcpStream::connect(srv.addr).await.unwrap(), DtlCodec::new());
    bad.send(Message::Flush {
        namespace: "vol".into(),
    })
    .await
    .unwrap();
    assert!(matches!(
        bad.next().await,
        Some(Ok(Message::Error {
            code: ErrorCode::Invalid,
            ..
        }))
    ));
    assert!(bad.next().await.is_none());

    // The good client, connected all along, still works and the data is intact.
    assert_eq!(good.entries("vol", 0, u32::MAX).await.unwrap(), b);
    let b2 = batch(1, 8, 2, 4);
    good.add_entries("vol", 1, 1, b2.clone()).await.unwrap();
    assert_eq!(good.entries("vol", 1, 1).await.unwrap().len(), 10);
    srv.stop().await;
}

/// A node not yet upgraded (protocol 1, no incarnation in `Register`) still mirrors to an
/// upgraded DTL: the server speaks version 1 on that connection.
#[tokio::test]
async fn a_version_1_client_is_served_in_its_own_version() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path(), false).await;
    let mut v1 = Framed::new(
        TcpStream::connect(srv.addr).await.unwrap(),
        DtlCodec::with_version(1),
    );
    v1.send(Message::Hello { version: 1 }).await.unwrap();
    assert_eq!(
        v1.next().await.unwrap().unwrap(),
        Message::HelloOk { version: 1 }
    );
    let entries = batch(3, 0, 4, 7);
    for request in [
        Message::Register {
            namespace: "vol".into(),
            cluster_size: CS,
            owner_tag: 2,
            incarnation: 99, // not on a v1 wire: the server reads 0
        },
        Message::AddEntries {
            namespace: "vol".into(),
            owner_tag: 2,
            sco: 3,
            entries: entries.clone(),
        },
    ] {
        v1.send(request).await.unwrap();
        assert_eq!(v1.next().await.unwrap().unwrap(), Message::Ok);
    }
    v1.send(Message::GetScoRange {
        namespace: "vol".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        v1.next().await.unwrap().unwrap(),
        Message::ScoRange(ScoRange {
            oldest: Some(3),
            newest: Some(3)
        })
    );
    let reg = srv.server.store().registration("vol").unwrap();
    assert_eq!((reg.owner_tag, reg.incarnation), (2, 0));
    assert_eq!(
        srv.server.store().entries("vol", 0, u32::MAX).unwrap(),
        entries
    );
    // An upgraded client of the same volume records its incarnation and keeps the entries.
    let mut c = DtlClient::connect(srv.addr).await.unwrap();
    c.register("vol", CS, 2, 1234).await.unwrap();
    assert_eq!(
        srv.server.store().registration("vol").unwrap().incarnation,
        1234
    );
    assert_eq!(
        srv.server.store().entries("vol", 0, u32::MAX).unwrap(),
        entries
    );
    srv.stop().await;
}

/// An upgraded node mirrors to a DTL not upgraded yet: told the server speaks version 1, the
/// client connects again in version 1 (whose `Register` has no incarnation).
#[tokio::test]
async fn a_client_falls_back_to_a_version_1_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let old_server = tokio::spawn(async move {
        // First connection: a v1 server's answer to a v2 Hello, then it closes.
        let (s, _) = listener.accept().await.unwrap();
        let mut f = Framed::new(s, DtlCodec::with_version(1));
        let hello = f.next().await.unwrap().unwrap();
        f.send(Message::VersionMismatch {
            server: 1,
            client: PROTOCOL_VERSION,
        })
        .await
        .unwrap();
        drop(f);
        // Second connection: the client speaks v1.
        let (s, _) = listener.accept().await.unwrap();
        let mut f = Framed::new(s, DtlCodec::with_version(1));
        let again = f.next().await.unwrap().unwrap();
        f.send(Message::HelloOk { version: 1 }).await.unwrap();
        let register = f.next().await.unwrap().unwrap();
        f.send(Message::Ok).await.unwrap();
        (hello, again, register)
    });
    let mut c = DtlClient::connect(addr).await.unwrap();
    assert_eq!(c.version(), 1);
    c.register("vol", CS, 4, 777).await.unwrap();
    let (hello, again, register) = old_server.await.unwrap();
    assert_eq!(
        hello,
        Message::Hello {
            version: PROTOCOL_VERSION
        }
    );
    assert_eq!(again, Message::Hello { version: 1 });
    assert_eq!(
        register,
        Message::Register {
            namespace: "vol".into(),
            cluster_size: CS,
            owner_tag: 4,
            incarnation: 0,
        },
        "a v1 Register carries no incarnation"
    );
    // With a current server the client speaks the current version.
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path(), false).await;
    let c = DtlClient::connect(srv.addr).await.unwrap();
    assert_eq!(c.version(), PROTOCOL_VERSION);
    srv.stop().await;
}

#[tokio::test]
async fn version_mismatch_is_reported_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path(), false).await;

    // A future client talking to this server.
    let mut v2 = Framed::new(
        TcpStream::connect(srv.addr).await.unwrap(),
        DtlCodec::with_version(PROTOCOL_VERSION + 1),
    );
    v2.send(Message::Hello {
        version: PROTOCOL_VERSION + 1,
    })
    .await
    .unwrap();
    assert_eq!(
        v2.next().await.unwrap().unwrap(),
        Message::VersionMismatch {
            server: PROTOCOL_VERSION,
            client: PROTOCOL_VERSION + 1
        }
    );
    assert!(v2.next().await.is_none(), "server closes after a mismatch");
    srv.stop().await;

    // This client talking to a future server.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut f = Framed::new(s, DtlCodec::with_version(PROTOCOL_VERSION + 1));
        let hello = f.next().await.unwrap().unwrap();
        assert_eq!(
            hello,
            Message::Hello {
                version: PROTOCOL_VERSION
            }
        );
        f.send(Message::VersionMismatch {
            server: PROTOCOL_VERSION + 1,
            client: PROTOCOL_VERSION,
        })
        .await
        .unwrap();
    });
    let err = DtlClient::connect(addr).await.err().unwrap();
    assert!(
        matches!(err, DtlError::VersionMismatch { server, client } if server == PROTOCOL_VERSION + 1 && client == PROTOCOL_VERSION),
        "{err}"
    );
    fake.await.unwrap();
}

#[tokio::test]
async fn timeouts_are_reported_and_poison_the_client() {
    // A server that accepts and completes the handshake, then never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let silent = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut f = Framed::new(s, DtlCodec::new());
        let _ = f.next().await;
        f.send(Message::HelloOk {
            version: PROTOCOL_VERSION,
        })
        .await
        .unwrap();
        let _ = f.next().await; // the request, never answered
        let _ = done_rx.await;
    });
    let config = DtlClientConfig {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_millis(100),
        tls: None,
    };
    let mut c = DtlClient::connect_with(addr, config).await.unwrap();
    let e = c.flush("vol").await.unwrap_err();
    assert!(matches!(e, DtlError::Timeout { .. }), "{e}");
    assert!(!c.is_usable());
    assert!(matches!(
        c.flush("vol").await.unwrap_err(),
        DtlError::ConnectionBroken
    ));
    done_tx.send(()).unwrap();
    silent.await.unwrap();

    // Connect timeout: a listener that never accepts still completes TCP (backlog), but never
    // answers Hello.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = DtlClientConfig {
        connect_timeout: Duration::from_millis(100),
        request_timeout: Duration::from_secs(5),
        tls: None,
    };
    let e = DtlClient::connect_with(addr, config).await.err().unwrap();
    assert!(matches!(e, DtlError::Timeout { .. }), "{e}");
    drop(listener);
}

#[tokio::test]
async fn many_clients_many_namespaces_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Running::start(dir.path(), false).await;
    let mut tasks = Vec::new();
    for v in 0..8u8 {
        let addr = srv.addr;
        tasks.push(tokio::spawn(async move {
            let ns = format!("vol{v}");
            let mut c = DtlClient::connect(addr).await.unwrap();
            c.register(&ns, CS, 1, 0).await.unwrap();
            let mut expect = Vec::new();
            for sco in 1..=4u32 {
                let b = batch(sco, 0, 16, v);
                c.add_entries(&ns, 1, sco, b.clone()).await.unwrap();
                expect.extend(b);
            }
            c.flush(&ns).await.unwrap();
            assert_eq!(c.entries(&ns, 0, u32::MAX).await.unwrap(), expect);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    srv.stop().await;
}

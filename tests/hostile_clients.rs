//! Hostile clients against the `vstor dtl`, `vstor osd` and `vstor mds` processes and the edge
//! server of `vstor serve --edge-listen` (docs/security.md, "Internal protocol limits"): a frame
//! header claiming 4 GiB, garbage, and a slowloris frame that never completes; a DTL client that
//! never says `Hello`. Each hostile connection must be closed within a bound, the daemon must
//! stay up, and a well-behaved client must be served afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use crate::common;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

use common::etcd::Etcd;
use common::mds::Mds;
use common::tier::Osd;
use common::{start_dtl, Daemon};

/// The daemons run with this frame timeout, so a slowloris frame is dropped within twice it.
const FRAME_TIMEOUT: Duration = Duration::from_secs(1);
/// What "closed within a bound" means here: generous for a loaded CI machine.
const CLOSE_BOUND: Duration = Duration::from_secs(15);

/// Reads until the server closes; fails the test if it does not within `CLOSE_BOUND`.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(CLOSE_BOUND, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept a hostile connection open");
    out
}

/// A frame header of the OSD, MDS and edge protocols (the same layout): magic, version, kind,
/// id, payload length, CRC.
fn header(magic: u32, version: u16, kind: u16, len: u32) -> BytesMut {
    let mut huge = BytesMut::new();
    huge.put_u32_le(magic);
    huge.put_u16_le(version);
    huge.put_u16_le(kind);
    huge.put_u64_le(1);
    huge.put_u32_le(len);
    huge.put_u32_le(0);
    huge
}

/// A 4 GiB header, garbage, and a frame cut short after `prefix` (a valid opening, e.g. the
/// handshake): what the server sent on each connection before it closed it.
async fn hostile(addr: &str, huge: &[u8], prefix: &[u8], partial: &[u8]) -> [Vec<u8>; 3] {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(huge).await.unwrap();
    let huge_reply = read_until_closed(&mut s).await;

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0xa5; 1024]).await.unwrap();
    let garbage_reply = read_until_closed(&mut s).await;

    // The clock starts before the connection exists, so a test thread descheduled after the
    // connect cannot make a timely close look early.
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(prefix).await.unwrap();
    s.write_all(partial).await.unwrap();
    let slow_reply = read_until_closed(&mut s).await;
    assert!(
        started.elapsed() >= FRAME_TIMEOUT,
        "closed before the frame timeout: {:?}",
        started.elapsed()
    );
    [huge_reply, garbage_reply, slow_reply]
}

/// The OSD, MDS and edge servers close a connection on a bad frame without a reply; the
/// slowloris connection got its `Welcome` and nothing after it. `welcome`: decode the handshake's
/// answer and say whether it is a `Welcome` (for the edge: followed by its `Access`).
fn assert_silent_closes_and_welcome(
    replies: &[Vec<u8>; 3],
    welcome: impl Fn(&mut BytesMut) -> bool,
) {
    let [huge, garbage, slow] = replies;
    assert!(huge.is_empty(), "{huge:?}");
    assert!(garbage.is_empty(), "{garbage:?}");
    let mut buf = BytesMut::from(&slow[..]);
    assert!(welcome(&mut buf), "no Welcome first: {slow:?}");
    assert!(buf.is_empty(), "nothing after Welcome: {buf:?}");
}

fn dtl_messages(bytes: &[u8]) -> Vec<vstor_dtl::Message> {
    let mut codec = vstor_dtl::DtlCodec::new();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(m)) = codec.decode(&mut buf) {
        out.push(m);
    }
    out
}

fn dtl_error_text(bytes: &[u8]) -> String {
    match dtl_messages(bytes).pop() {
        Some(vstor_dtl::Message::Error { message, .. }) => message,
        other => panic!("expected an Error reply, got {other:?}"),
    }
}

#[tokio::test]
async fn the_dtl_drops_hostile_clients_and_serves_others() {
    use vstor_dtl::protocol::{MAGIC, PROTOCOL_VERSION};
    use vstor_dtl::{DtlClient, Entry, Message};

    let tmp = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_dtl(
        tmp.path(),
        &["--listen", "127.0.0.1:0", "--frame-timeout", "1s"],
    );

    let mut huge = BytesMut::new();
    huge.put_u32_le(MAGIC);
    huge.put_u16_le(PROTOCOL_VERSION);
    huge.put_u16_le(11); // AddEntries
    huge.put_u32_le(u32::MAX);
    huge.put_u32_le(0);
    let mut hello = BytesMut::new();
    vstor_dtl::DtlCodec::new()
        .encode(
            Message::Hello {
                version: PROTOCOL_VERSION,
            },
            &mut hello,
        )
        .unwrap();
    let [huge_reply, garbage_reply, slow_reply] = hostile(&addr, &huge, &hello, &huge[..10]).await;

    assert!(
        dtl_error_text(&huge_reply).contains("exceeds the limit"),
        "{huge_reply:?}"
    );
    assert!(
        dtl_error_text(&garbage_reply).contains("bad frame magic"),
        "{garbage_reply:?}"
    );
    let slow = dtl_messages(&slow_reply);
    assert!(
        matches!(slow.first(), Some(Message::HelloOk { .. })),
        "{slow:?}"
    );
    assert!(
        dtl_error_text(&slow_reply).contains("frame incomplete after"),
        "{slow:?}"
    );

    assert!(child.try_wait().unwrap().is_none(), "vstor dtl exited");
    let mut client = DtlClient::connect(addr.as_str()).await.unwrap();
    client.register("vol", 4096, 1, 0).await.unwrap();
    let entries = vec![Entry {
        location: 1,
        lba: 0,
        data: bytes::Bytes::from(vec![7u8; 4096]),
    }];
    client
        .add_entries("vol", 1, 1, entries.clone())
        .await
        .unwrap();
    assert_eq!(client.entries("vol", 1, 1).await.unwrap(), entries);
    drop(client);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn the_osd_drops_hostile_clients_and_serves_others() {
    use vstor_backend::osd::client::OsdClient;
    use vstor_backend::osd::proto::{Frame, Message, OsdCodec, MAGIC, PROTOCOL_VERSION};

    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(tmp.path());
    let osd = Osd::start_with(
        tmp.path(),
        "osd0",
        &etcd.url(),
        "d0",
        "1G",
        &["--frame-timeout", "1s"],
    );

    let huge = header(MAGIC, PROTOCOL_VERSION, 10, u32::MAX); // Put
    let mut hello = BytesMut::new();
    OsdCodec::default()
        .encode(
            &Frame {
                id: 0,
                message: Message::Hello {
                    version: PROTOCOL_VERSION,
                    client: "hostile".into(),
                },
            },
            &mut hello,
        )
        .unwrap();
    let replies = hostile(&osd.addr, &huge, &hello, &huge[..10]).await;
    assert_silent_closes_and_welcome(&replies, |buf| {
        matches!(
            OsdCodec::default().decode(buf),
            Ok(Some(Frame {
                message: Message::Welcome { .. },
                ..
            }))
        )
    });

    let client = OsdClient::connect(&osd.addr, "good", Duration::from_secs(10), None)
        .await
        .unwrap();
    let usage = client
        .call(Message::Stat, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(matches!(usage, Message::Usage(_)), "{usage:?}");
    // The OSD logs why it dropped a connection after the connection is gone (its writer
    // closes the socket first), so the last line may land just after the client saw the close.
    let reasons = ["exceeds the limit", "incomplete within the frame timeout"];
    common::poll(
        "the OSD to log why it dropped each connection",
        CLOSE_BOUND,
        || {
            let log = std::fs::read_to_string(&osd.log).unwrap();
            reasons.iter().all(|r| log.contains(r)).then_some(())
        },
    );
    drop(osd);
    drop(etcd);
}

#[tokio::test]
async fn the_dtl_closes_a_connection_that_never_says_hello() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_dtl(
        tmp.path(),
        &["--listen", "127.0.0.1:0", "--frame-timeout", "1s"],
    );
    // Before the connect: the server cannot start its timer any earlier, so a test thread
    // descheduled after the connect cannot make a timely close look early.
    let started = Instant::now();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let reply = read_until_closed(&mut silent).await;
    assert!(
        started.elapsed() >= FRAME_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
    let text = dtl_error_text(&reply);
    assert!(text.contains("waiting for Hello"), "{text}");
    assert!(child.try_wait().unwrap().is_none(), "vstor dtl exited");
    let mut client = vstor_dtl::DtlClient::connect(addr.as_str()).await.unwrap();
    client.register("vol", 4096, 1, 0).await.unwrap();
    drop(client);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn the_mds_drops_hostile_clients_and_serves_others() {
    use vstor_mds::client::MdsClient;
    use vstor_mds::proto::{Frame, MdsCodec, Message, MAGIC, PROTOCOL_VERSION};

    let tmp = tempfile::tempdir().unwrap();
    let backend = tmp.path().join("backend");
    std::fs::create_dir_all(&backend).unwrap();
    let mut mds = Mds::start_at(
        &tmp.path().join("mds"),
        &backend,
        "127.0.0.1:0",
        &["--catch-up-every", "0s", "--frame-timeout", "1s"],
    );
    let huge = header(MAGIC, PROTOCOL_VERSION, 10, u32::MAX);
    let mut hello = BytesMut::new();
    MdsCodec::default()
        .encode(
            &Frame {
                id: 0,
                message: Message::Hello {
                    version: PROTOCOL_VERSION,
                    client: "hostile".into(),
                },
            },
            &mut hello,
        )
        .unwrap();
    let replies = hostile(&mds.addr, &huge, &hello, &huge[..10]).await;
    assert_silent_closes_and_welcome(&replies, |buf| {
        matches!(
            MdsCodec::default().decode(buf),
            Ok(Some(Frame {
                message: Message::Welcome { .. },
                ..
            }))
        )
    });

    let client = MdsClient::connect(&mds.addr, "good", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(client.list().await.unwrap().is_empty());
    drop(client);
    mds.kill9();
}

#[tokio::test]
async fn the_edge_server_drops_hostile_clients_and_serves_others() {
    use vstor_edge::remote::proto::{EdgeCodec, Frame, Message, MAGIC, PROTOCOL_VERSION};

    let tmp = tempfile::tempdir().unwrap();
    let node = Daemon::start_with(
        tmp.path(),
        &["--edge-listen", "127.0.0.1:0", "--edge-frame-timeout", "1s"],
    );
    node.create_volume("vol", "16M");
    let tag = node.info("vol")["owner_tag"].as_u64().unwrap();
    let nodes: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["node", "list", "--json"])).unwrap();
    let addr = nodes[0]["edge_addr"].as_str().unwrap().to_string();
    let mut hello = BytesMut::new();
    EdgeCodec::new()
        .encode(
            Frame::new(
                0,
                Message::Hello {
                    version: PROTOCOL_VERSION,
                    volume: "vol".into(),
                    tag,
                    client: "hostile".into(),
                },
            ),
            &mut hello,
        )
        .unwrap();
    let huge = header(MAGIC, PROTOCOL_VERSION, 10, u32::MAX);
    let replies = hostile(&addr, &huge, &hello, &huge[..10]).await;
    // The edge's handshake is Welcome followed by the volume's allow list.
    assert_silent_closes_and_welcome(&replies, |buf| {
        let mut codec = EdgeCodec::new();
        matches!(
            codec.decode(buf),
            Ok(Some(Frame {
                message: Message::Welcome { .. },
                ..
            }))
        ) && matches!(
            codec.decode(buf),
            Ok(Some(Frame {
                id: 0,
                message: Message::Access(_),
            }))
        )
    });
    let log = node.log_text();
    assert!(
        log.contains("frame incomplete within the frame timeout"),
        "{log}"
    );
    // Still serving: a well-behaved edge is welcomed.
    let mut good = TcpStream::connect(&addr).await.unwrap();
    good.write_all(&hello).await.unwrap();
    let mut reply = BytesMut::new();
    let welcome = loop {
        if let Some(frame) = EdgeCodec::new().decode(&mut reply).unwrap() {
            break frame;
        }
        let n = tokio::time::timeout(CLOSE_BOUND, good.read_buf(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before Welcome");
    };
    assert!(
        matches!(welcome.message, Message::Welcome { .. }),
        "{welcome:?}"
    );
}

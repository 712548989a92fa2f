//! Hostile clients against the `vstor dtl` and `vstor osd` processes (docs/security.md,
//! "Internal protocol limits"): a frame header claiming 4 GiB, garbage, and a slowloris frame
//! that never completes. Each hostile connection must be closed within a bound, the daemon must
//! stay up, and a well-behaved client must be served afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

use common::etcd::Etcd;
use common::start_dtl;
use common::tier::Osd;

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

/// A 4 GiB header, garbage, and a frame cut short after `prefix` (a valid opening, e.g. the
/// handshake): what the server sent on each connection before it closed it.
async fn hostile(addr: &str, huge: &[u8], prefix: &[u8], partial: &[u8]) -> [Vec<u8>; 3] {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(huge).await.unwrap();
    let huge_reply = read_until_closed(&mut s).await;

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0xa5; 1024]).await.unwrap();
    let garbage_reply = read_until_closed(&mut s).await;

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(prefix).await.unwrap();
    s.write_all(partial).await.unwrap();
    let started = Instant::now();
    let slow_reply = read_until_closed(&mut s).await;
    assert!(
        started.elapsed() >= FRAME_TIMEOUT,
        "closed before the frame timeout: {:?}",
        started.elapsed()
    );
    [huge_reply, garbage_reply, slow_reply]
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
    client.register("vol", 4096, 1).await.unwrap();
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

    let mut huge = BytesMut::new();
    huge.put_u32_le(MAGIC);
    huge.put_u16_le(PROTOCOL_VERSION);
    huge.put_u16_le(10); // Put
    huge.put_u64_le(1);
    huge.put_u32_le(u32::MAX);
    huge.put_u32_le(0);
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
    // The OSD closes a connection on a bad frame without a reply.
    let [huge_reply, garbage_reply, slow_reply] =
        hostile(&osd.addr, &huge, &hello, &huge[..10]).await;
    assert!(huge_reply.is_empty(), "{huge_reply:?}");
    assert!(garbage_reply.is_empty(), "{garbage_reply:?}");
    let mut buf = BytesMut::from(&slow_reply[..]);
    let welcome = OsdCodec::default().decode(&mut buf).unwrap();
    assert!(
        matches!(
            welcome,
            Some(Frame {
                message: Message::Welcome { .. },
                ..
            })
        ),
        "{welcome:?}"
    );
    assert!(buf.is_empty(), "nothing after Welcome: {buf:?}");

    let client = OsdClient::connect(&osd.addr, "good", Duration::from_secs(10))
        .await
        .unwrap();
    let usage = client
        .call(Message::Stat, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(matches!(usage, Message::Usage(_)), "{usage:?}");
    let log = std::fs::read_to_string(&osd.log).unwrap();
    assert!(log.contains("exceeds the limit"), "{log}");
    assert!(log.contains("incomplete within the frame timeout"), "{log}");
    drop(osd);
    drop(etcd);
}

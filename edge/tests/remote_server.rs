#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The edge server (`remote::server`) over an in-memory target, driven by a raw protocol client
//! (the codec on a TCP socket): handshake refusals, the allow list after `Welcome` and its pushed
//! changes, a version-1 edge, owner-tag checks per request, validation, pipelining and corrupt
//! frames.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Encoder, Framed};
use tokio_util::sync::CancellationToken;
use vstor_edge::remote::proto::{
    AllowList, EdgeCodec, ErrorCode, Frame, Message, ACCESS_POLL, PROTOCOL_VERSION,
};
use vstor_edge::remote::server::{serve, EdgeServerConfig};
use vstor_edge::remote::Handoff;
use vstor_edge::testing::remote::{MemExports, MemServedState};
use vstor_edge::testing::MemTarget;

const SIZE: u64 = 16 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

struct Server {
    addr: std::net::SocketAddr,
    target: Arc<MemTarget>,
    state: Arc<MemServedState>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

async fn server(tag: u64) -> Server {
    server_with(tag, EdgeServerConfig::default()).await
}

async fn server_with(tag: u64, config: EdgeServerConfig) -> Server {
    let target = Arc::new(MemTarget::new(SIZE));
    let state = MemServedState::new(tag);
    let exports = MemExports::new();
    exports.insert("vol", target.clone(), state.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(listener, exports, config, stop.clone()));
    Server {
        addr,
        target,
        state,
        stop,
        task,
    }
}

type Conn = Framed<TcpStream, EdgeCodec>;

async fn recv(conn: &mut Conn) -> Option<Frame> {
    tokio::time::timeout(TIMEOUT, conn.next())
        .await
        .expect("reply in time")
        .map(|r| r.expect("well-formed reply"))
}

/// `Hello` in the current version; the first reply. After a `Welcome` the `Access` that must
/// follow it is read too (and must be the volume's list), so callers see request replies next.
async fn hello(addr: std::net::SocketAddr, volume: &str, tag: u64) -> (Conn, Frame) {
    let (mut conn, reply) = hello_in(addr, volume, tag, PROTOCOL_VERSION).await;
    if matches!(reply.message, Message::Welcome { .. }) {
        let access = recv(&mut conn).await.expect("Access after Welcome");
        assert_eq!(access.id, 0);
        assert!(
            matches!(access.message, Message::Access(_)),
            "expected Access after Welcome, got {access:?}"
        );
    }
    (conn, reply)
}

/// `Hello` in protocol `version`; the first reply.
async fn hello_in(
    addr: std::net::SocketAddr,
    volume: &str,
    tag: u64,
    version: u16,
) -> (Conn, Frame) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut conn = Framed::new(stream, EdgeCodec::with_version(version));
    conn.send(Frame::new(
        0,
        Message::Hello {
            version,
            volume: volume.into(),
            tag,
            client: "test".into(),
        },
    ))
    .await
    .unwrap();
    let reply = recv(&mut conn).await.expect("handshake reply");
    (conn, reply)
}

fn allow_list(subjects: &[&str], networks: &[&str]) -> AllowList {
    AllowList {
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        networks: networks.iter().map(|n| n.parse().unwrap()).collect(),
    }
}

#[tokio::test]
async fn the_allow_list_follows_welcome_and_changes_are_pushed() {
    let s = server(7).await;
    s.state
        .set_access(allow_list(&["alice"], &["10.1.0.0/16", "fd00::/64"]));
    let (mut c, reply) = hello_in(s.addr, "vol", 7, PROTOCOL_VERSION).await;
    assert!(
        matches!(reply.message, Message::Welcome { version, .. } if version == PROTOCOL_VERSION)
    );
    assert_eq!(
        recv(&mut c).await.unwrap(),
        Frame::new(
            0,
            Message::Access(allow_list(&["alice"], &["10.1.0.0/16", "fd00::/64"]))
        )
    );
    // A change is pushed within the poll period, on an idle connection, while requests still
    // get their replies.
    s.state.set_access(allow_list(&[], &["127.0.0.0/8"]));
    let pushed = tokio::time::timeout(ACCESS_POLL * 3, c.next())
        .await
        .expect("the change within three poll periods")
        .unwrap()
        .unwrap();
    assert_eq!(
        pushed,
        Frame::new(0, Message::Access(allow_list(&[], &["127.0.0.0/8"])))
    );
    c.send(Frame::new(5, Message::Flush { tag: 7 }))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut c).await.unwrap(),
        Frame::new(5, Message::Done { dtl_in_sync: true })
    );
    // No change, nothing pushed.
    assert!(
        tokio::time::timeout(ACCESS_POLL * 2, c.next())
            .await
            .is_err(),
        "an unchanged list is not resent"
    );
    // Lifted: the empty list (everyone) is pushed too.
    s.state.set_access(AllowList::default());
    let pushed = tokio::time::timeout(ACCESS_POLL * 3, c.next())
        .await
        .expect("the change within three poll periods")
        .unwrap()
        .unwrap();
    assert_eq!(pushed, Frame::new(0, Message::Access(AllowList::default())));
}

/// An edge of the previous release (version 1) is still served: `Welcome` in its version, no
/// `Access` (it could not decode it), and replies in version-1 frames.
#[tokio::test]
async fn a_version_1_edge_is_served_without_access() {
    let s = server(7).await;
    s.state.set_access(allow_list(&["alice"], &[]));
    let (mut c, reply) = hello_in(s.addr, "vol", 7, 1).await;
    assert_eq!(
        reply.message,
        Message::Welcome {
            version: 1,
            size: SIZE,
            read_only: false,
            tag: 7,
            dtl_in_sync: true
        }
    );
    let data = pattern(3, 4096);
    c.send(Frame::new(
        1,
        Message::Write {
            tag: 7,
            offset: 0,
            fua: false,
            data: data.clone(),
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        recv(&mut c).await.unwrap(),
        Frame::new(1, Message::Done { dtl_in_sync: true })
    );
    // A list change is not pushed to it.
    s.state.set_access(allow_list(&["bob"], &[]));
    c.send(Frame::new(
        2,
        Message::Read {
            tag: 7,
            offset: 0,
            len: 4096,
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        recv(&mut c).await.unwrap(),
        Frame::new(
            2,
            Message::Data {
                dtl_in_sync: true,
                data
            }
        )
    );
    assert!(
        tokio::time::timeout(ACCESS_POLL * 2, c.next())
            .await
            .is_err(),
        "nothing unasked for on a version-1 connection"
    );
}

/// After a clean hand-off, requests are refused with `Released` on a version-3 connection and
/// with `NotOwner` on older ones (which cannot decode the new code); a `Hello` while the
/// hand-off runs is refused, not held.
#[tokio::test]
async fn a_released_volume_says_so_only_to_edges_that_understand_it() {
    let s = server(7).await;
    let (mut v3, _) = hello(s.addr, "vol", 7).await;
    let (mut v2, reply) = hello_in(s.addr, "vol", 7, 2).await;
    assert!(matches!(reply.message, Message::Welcome { version: 2, .. }));
    let access = recv(&mut v2).await.unwrap();
    assert!(matches!(access.message, Message::Access(_)), "{access:?}");
    s.state.set_handoff(Handoff::Releasing);
    s.state.set_alive(false);
    let (_, refused) = hello(s.addr, "vol", 7).await;
    assert!(
        matches!(
            refused.message,
            Message::Error {
                code: ErrorCode::NotOwner,
                ..
            }
        ),
        "{refused:?}"
    );
    s.state.set_handoff(Handoff::Released);
    for (conn, want) in [
        (&mut v3, ErrorCode::Released),
        (&mut v2, ErrorCode::NotOwner),
    ] {
        conn.send(Frame::new(4, Message::Flush { tag: 7 }))
            .await
            .unwrap();
        let reply = recv(conn).await.unwrap();
        assert!(
            matches!(&reply.message, Message::Error { code, .. } if *code == want),
            "want {want:?}: {reply:?}"
        );
    }
    assert_eq!(s.target.flushes(), 0, "a refused flush did not run");
}

/// While a hand-off runs, reads and block status under the volume's tag are answered (the
/// volume is still here and cannot change), while a read under a stale tag and a write wait for
/// the hand-off's outcome like every other request, and are refused with `Released` once it
/// succeeded, without running.
#[tokio::test]
async fn reads_are_answered_while_a_hand_off_runs_and_the_rest_waits_for_it() {
    let s = server(7).await;
    let data = pattern(11, 8192);
    s.target.preload(65536, &data);
    let (mut conn, _) = hello(s.addr, "vol", 7).await;
    s.state.set_handoff(Handoff::Releasing);
    s.state.set_alive(false);
    let read = |id: u64, tag: u64| {
        Frame::new(
            id,
            Message::Read {
                tag,
                offset: 65536,
                len: 8192,
            },
        )
    };
    conn.send(read(1, 7)).await.unwrap();
    let reply = recv(&mut conn).await.unwrap();
    assert_eq!(reply.id, 1);
    match reply.message {
        Message::Data { data: got, .. } => assert_eq!(got, data, "read during the hand-off"),
        other => panic!("a read during a hand-off is answered, got {other:?}"),
    }
    conn.send(Frame::new(
        2,
        Message::BlockStatus {
            tag: 7,
            offset: 0,
            len: SIZE,
        },
    ))
    .await
    .unwrap();
    let reply = recv(&mut conn).await.unwrap();
    assert_eq!(reply.id, 2);
    assert!(
        matches!(reply.message, Message::Extents { .. }),
        "block status during a hand-off: {reply:?}"
    );

    // A stale tag is not served (it waits, then is refused), and the write behind it waits too.
    let ops_before = s.target.ops().len();
    let checks = s.state.handoff_checks();
    conn.send(read(3, 6)).await.unwrap();
    conn.send(write_frame(4, 7, 0)).await.unwrap();
    // The server looks at the hand-off again and again while it holds them (every 2 ms).
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while s.state.handoff_checks() < checks + 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never held the requests"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.state.set_handoff(Handoff::Released);
    for id in [3, 4] {
        let reply = recv(&mut conn).await.unwrap();
        assert_eq!(reply.id, id);
        assert!(
            matches!(
                reply.message,
                Message::Error {
                    code: ErrorCode::Released,
                    ..
                }
            ),
            "request {id} after the hand-off: {reply:?}"
        );
    }
    assert_eq!(
        s.target.ops().len(),
        ops_before,
        "nothing ran after the hand-off"
    );
}

fn pattern(seed: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn handshake_welcomes_the_owner_tag_and_refuses_others() {
    let s = server(7).await;
    let (_c, reply) = hello(s.addr, "vol", 7).await;
    assert_eq!(
        reply.message,
        Message::Welcome {
            version: PROTOCOL_VERSION,
            size: SIZE,
            read_only: false,
            tag: 7,
            dtl_in_sync: true
        }
    );
    for (volume, tag, code) in [
        ("vol", 6, ErrorCode::StaleTag),
        ("vol", 8, ErrorCode::NotOwner),
        ("nope", 7, ErrorCode::NotOwner),
    ] {
        let (mut c, reply) = hello(s.addr, volume, tag).await;
        match reply.message {
            Message::Error { code: got, .. } => assert_eq!(got, code, "{volume} tag {tag}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(
            recv(&mut c).await.is_none(),
            "connection closes after a refusal"
        );
    }
    s.state.set_fenced(Some("lease lost"));
    let (_c, reply) = hello(s.addr, "vol", 7).await;
    assert!(matches!(
        reply.message,
        Message::Error {
            code: ErrorCode::Fenced,
            ..
        }
    ));
}

#[tokio::test]
async fn other_version_gets_version_mismatch() {
    let s = server(1).await;
    let stream = TcpStream::connect(s.addr).await.unwrap();
    let mut conn = Framed::new(stream, EdgeCodec::with_version(9));
    conn.send(Frame::new(
        0,
        Message::Hello {
            version: 9,
            volume: "vol".into(),
            tag: 1,
            client: "future".into(),
        },
    ))
    .await
    .unwrap();
    let reply = recv(&mut conn).await.unwrap();
    assert_eq!(
        reply.message,
        Message::VersionMismatch {
            server: PROTOCOL_VERSION,
            client: 9
        }
    );
}

#[tokio::test]
async fn pipelined_writes_read_back_and_requests_are_checked() {
    let s = server(3).await;
    let (mut c, _) = hello(s.addr, "vol", 3).await;
    // 64 pipelined writes of distinct patterns, then 64 reads.
    for i in 0..64u64 {
        c.feed(Frame::new(
            i + 1,
            Message::Write {
                tag: 3,
                offset: i * 8192,
                fua: i % 8 == 0,
                data: pattern(i, 8192),
            },
        ))
        .await
        .unwrap();
    }
    SinkExt::<Frame>::flush(&mut c).await.unwrap();
    let mut acked = std::collections::HashSet::new();
    for _ in 0..64 {
        let f = recv(&mut c).await.unwrap();
        assert_eq!(f.message, Message::Done { dtl_in_sync: true });
        assert!(acked.insert(f.id));
    }
    for i in 0..64u64 {
        c.feed(Frame::new(
            1000 + i,
            Message::Read {
                tag: 3,
                offset: i * 8192,
                len: 8192,
            },
        ))
        .await
        .unwrap();
    }
    SinkExt::<Frame>::flush(&mut c).await.unwrap();
    for _ in 0..64 {
        let f = recv(&mut c).await.unwrap();
        let i = f.id - 1000;
        match f.message {
            Message::Data { data, dtl_in_sync } => {
                assert!(dtl_in_sync);
                assert_eq!(data, pattern(i, 8192), "block {i}");
            }
            other => panic!("read {i}: {other:?}"),
        }
    }
    assert_eq!(s.target.contents(8192, 8192), pattern(1, 8192).to_vec());

    // Validation and owner checks, one request each; the connection stays usable.
    let cases = [
        (
            Message::Read {
                tag: 3,
                offset: 100,
                len: 512,
            },
            ErrorCode::Invalid,
        ),
        (
            Message::Read {
                tag: 3,
                offset: SIZE,
                len: 512,
            },
            ErrorCode::OutOfRange,
        ),
        (
            Message::Trim {
                tag: 3,
                offset: 0,
                len: 0,
            },
            ErrorCode::Invalid,
        ),
        (Message::Flush { tag: 2 }, ErrorCode::StaleTag),
        (Message::Flush { tag: 4 }, ErrorCode::NotOwner),
    ];
    for (n, (msg, code)) in cases.into_iter().enumerate() {
        c.send(Frame::new(5000 + n as u64, msg)).await.unwrap();
        let f = recv(&mut c).await.unwrap();
        assert_eq!(f.id, 5000 + n as u64);
        match f.message {
            Message::Error { code: got, .. } => assert_eq!(got, code, "case {n}"),
            other => panic!("case {n}: {other:?}"),
        }
    }
    // The owner moves on: the same connection's requests are refused as stale.
    s.state.set_tag(4);
    s.state.set_dtl_in_sync(false);
    c.send(Frame::new(6000, Message::Flush { tag: 3 }))
        .await
        .unwrap();
    assert!(matches!(
        recv(&mut c).await.unwrap().message,
        Message::Error {
            code: ErrorCode::StaleTag,
            ..
        }
    ));
    c.send(Frame::new(6001, Message::Flush { tag: 4 }))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut c).await.unwrap().message,
        Message::Done { dtl_in_sync: false }
    );
    // Trim and block status.
    c.send(Frame::new(
        6002,
        Message::Trim {
            tag: 4,
            offset: 0,
            len: 8192,
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        recv(&mut c).await.unwrap().message,
        Message::Done { dtl_in_sync: false }
    );
    c.send(Frame::new(
        6003,
        Message::BlockStatus {
            tag: 4,
            offset: 0,
            len: 16384,
        },
    ))
    .await
    .unwrap();
    match recv(&mut c).await.unwrap().message {
        Message::Extents { extents } => {
            assert!(extents[0].hole);
            assert_eq!(extents[0].length, 8192);
            assert!(!extents[1].hole);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn corrupt_frame_closes_the_connection() {
    let s = server(1).await;
    let (c, _) = hello(s.addr, "vol", 1).await;
    let mut stream = c.into_inner();
    let mut buf = BytesMut::new();
    EdgeCodec::new()
        .encode(
            Frame::new(
                1,
                Message::Write {
                    tag: 1,
                    offset: 0,
                    fua: false,
                    data: pattern(1, 4096),
                },
            ),
            &mut buf,
        )
        .unwrap();
    let last = buf.len() - 1;
    buf[last] ^= 0x40;
    stream.write_all(&buf).await.unwrap();
    let mut conn = Framed::new(stream, EdgeCodec::new());
    assert!(
        recv(&mut conn).await.is_none(),
        "server closes after a corrupt frame"
    );
    assert_eq!(
        s.target.contents(0, 4096),
        vec![0u8; 4096],
        "corrupt write not applied"
    );
}

#[tokio::test]
async fn shutdown_closes_connections() {
    let s = server(1).await;
    let (mut c, _) = hello(s.addr, "vol", 1).await;
    s.stop.cancel();
    assert!(recv(&mut c).await.is_none());
}

fn write_frame(id: u64, tag: u64, offset: u64) -> Frame {
    Frame::new(
        id,
        Message::Write {
            tag,
            offset,
            fua: false,
            data: pattern(id, 4096),
        },
    )
}

#[tokio::test]
async fn a_full_connection_stops_taking_requests_until_acks_complete() {
    let s = server_with(
        1,
        EdgeServerConfig {
            max_inflight: 2,
            ..EdgeServerConfig::default()
        },
    )
    .await;
    let (mut c, _) = hello(s.addr, "vol", 1).await;
    let hold = s.target.hold_acks();
    for id in 1..=5u64 {
        c.feed(write_frame(id, 1, id * 4096)).await.unwrap();
    }
    SinkExt::<Frame>::flush(&mut c).await.unwrap();
    // Two writes take the two slots; the third waits in the socket, not in the target.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while s.target.ops().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "writes never reached the target"
        );
        tokio::task::yield_now().await;
    }
    // A reply cannot come while the acknowledgements are held, so the server has had every
    // chance to (wrongly) take more requests by the time this times out.
    assert!(tokio::time::timeout(Duration::from_millis(200), c.next())
        .await
        .is_err());
    assert_eq!(
        s.target.ops().len(),
        2,
        "a full connection took another request"
    );
    drop(hold);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let f = recv(&mut c).await.unwrap();
        assert_eq!(f.message, Message::Done { dtl_in_sync: true });
        ids.push(f.id);
    }
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    for id in 1..=5u64 {
        assert_eq!(
            s.target.contents(id * 4096, 4096),
            pattern(id, 4096).to_vec()
        );
    }
}

#[tokio::test]
async fn a_throttling_target_pauses_the_connection() {
    let s = server(1).await;
    let (mut c, _) = hello(s.addr, "vol", 1).await;
    s.target.set_throttle(Some(Duration::from_millis(300)));
    let start = std::time::Instant::now();
    c.send(write_frame(1, 1, 0)).await.unwrap();
    assert_eq!(
        recv(&mut c).await.unwrap().id,
        1,
        "the throttled write is answered"
    );
    s.target.set_throttle(None);
    c.send(write_frame(2, 1, 4096)).await.unwrap();
    assert_eq!(recv(&mut c).await.unwrap().id, 2);
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "the next request ran before the throttle delay: {:?}",
        start.elapsed()
    );
}

//! Protocol conformance of the NBD server, driven by a hand-written raw client.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use vstor_edge::testing::{MemRegistry, MemTarget, Op};
use vstor_edge::NbdServerConfig;

/// Compile-time check: the binary spawns these futures on a multi-threaded runtime.
#[allow(dead_code)]
fn server_futures_are_send(server: vstor_edge::NbdServer, listener: tokio::net::TcpListener) {
    fn is_send<T: Send>(_: &T) {}
    is_send(&server.serve(listener));
    is_send(&server.shutdown());
}

fn infos(replies: &[OptReply]) -> HashMap<u16, Vec<u8>> {
    replies
        .iter()
        .filter(|r| r.kind == REP_INFO)
        .map(|r| (be16(&r.data), r.data[2..].to_vec()))
        .collect()
}

const RW_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN
    | FLAG_SEND_FAST_ZERO;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_then_go_reports_export_and_block_sizes() {
    let (srv, target) = TestServer::with_export("vol", 16 * MIB).await;
    let mut raw = srv.connect().await;
    assert_eq!(raw.greet(C_FIXED_NEWSTYLE | C_NO_ZEROES).await, 0b11);

    let replies = raw.go(OPT_INFO, "vol", &[INFO_BLOCK_SIZE, INFO_NAME]).await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    let info = infos(&replies);
    let export = &info[&INFO_EXPORT];
    assert_eq!(export.len(), 10);
    assert_eq!(be64(export), 16 * MIB);
    assert_eq!(be16(&export[8..]), RW_FLAGS);
    let bs = &info[&INFO_BLOCK_SIZE];
    assert_eq!(
        (be32(bs), be32(&bs[4..]), be32(&bs[8..])),
        (512, 4096, 32 << 20)
    );
    assert_eq!(info[&INFO_NAME], b"vol");

    // INFO stays in negotiation; GO (without asking) still gets the block sizes.
    let replies = raw.go(OPT_GO, "vol", &[]).await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    let info = infos(&replies);
    assert_eq!(be64(&info[&INFO_EXPORT]), 16 * MIB);
    assert!(info.contains_key(&INFO_BLOCK_SIZE));

    target.preload(4096, b"hello, nbd");
    let mut c = raw.into_client(false);
    assert_eq!(&c.read(4096, 512).await[..10], b"hello, nbd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_max_payload_is_advertised_rounded_to_512() {
    let registry = Arc::new(MemRegistry::new());
    registry.insert("vol", Arc::new(MemTarget::new(MIB)));
    let config = NbdServerConfig {
        max_payload: 64 * 1024 + 100,
        max_inflight_per_conn: 4,
        ..NbdServerConfig::default()
    };
    let srv = TestServer::start_with(registry, config, None).await;
    let mut raw = srv.connect().await;
    raw.greet(C_FIXED_NEWSTYLE).await;
    let info = infos(&raw.go(OPT_INFO, "vol", &[INFO_BLOCK_SIZE]).await);
    assert_eq!(be32(&info[&INFO_BLOCK_SIZE][8..]), 64 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_names_every_export_and_rejects_data() {
    let registry = Arc::new(MemRegistry::new());
    registry.insert("alpha", Arc::new(MemTarget::new(MIB)));
    registry.insert("beta", Arc::new(MemTarget::new_read_only(MIB)));
    let srv = TestServer::start(registry).await;
    let mut raw = srv.connect().await;
    raw.greet(C_FIXED_NEWSTYLE | C_NO_ZEROES).await;

    raw.send_option(OPT_LIST, &[]).await;
    let replies = raw.read_option_replies().await;
    let names: Vec<String> = replies
        .iter()
        .filter(|r| r.kind == REP_SERVER)
        .map(|r| {
            let len = be32(&r.data) as usize;
            String::from_utf8(r.data[4..4 + len].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert_eq!(replies.len(), 3);
    assert_eq!(replies[2].kind, REP_ACK);
    assert!(replies.iter().all(|r| r.option == OPT_LIST));

    raw.send_option(OPT_LIST, b"junk").await;
    assert_eq!(raw.read_option_reply().await.kind, REP_ERR_INVALID);

    let replies = raw.go(OPT_GO, "beta", &[]).await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    let flags = be16(&infos(&replies)[&INFO_EXPORT][8..]);
    assert_eq!(
        flags,
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_with_and_without_no_zeroes() {
    let (srv, _target) = TestServer::with_export("vol", 4 * MIB).await;
    for no_zeroes in [false, true] {
        let mut raw = srv.connect().await;
        let flags = C_FIXED_NEWSTYLE | if no_zeroes { C_NO_ZEROES } else { 0 };
        raw.greet(flags).await;
        raw.send_option(OPT_EXPORT_NAME, b"vol").await;
        let reply = raw.read_exact(if no_zeroes { 10 } else { 134 }).await;
        assert_eq!(be64(&reply), 4 * MIB);
        assert_eq!(be16(&reply[8..]), RW_FLAGS);
        assert!(reply[10..].iter().all(|&b| b == 0));
        // Any stray or missing padding would desynchronise this exchange.
        let mut c = raw.into_client(false);
        let data = pattern(u64::from(no_zeroes), 512);
        assert_eq!(c.write(0, 8192, &data).await, 0);
        assert_eq!(c.read(8192, 512).await, data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_for_unknown_or_default_export_closes() {
    let (srv, _target) = TestServer::with_export("vol", MIB).await;
    for name in [&b"nope"[..], b""] {
        let mut raw = srv.connect().await;
        raw.greet(C_FIXED_NEWSTYLE).await;
        raw.send_option(OPT_EXPORT_NAME, name).await;
        raw.expect_closed().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_is_acknowledged_then_closed() {
    let (srv, _target) = TestServer::with_export("vol", MIB).await;
    let mut raw = srv.connect().await;
    raw.greet(C_FIXED_NEWSTYLE | C_NO_ZEROES).await;
    raw.send_option(OPT_ABORT, &[]).await;
    let r = raw.read_option_reply().await;
    assert_eq!((r.option, r.kind), (OPT_ABORT, REP_ACK));
    raw.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_and_oversized_options_do_not_break_negotiation() {
    let (srv, target) = TestServer::with_export("vol", MIB).await;
    let mut raw = srv.connect().await;
    raw.greet(C_FIXED_NEWSTYLE | C_NO_ZEROES).await;

    raw.send_option(99, &[0xaa; 100]).await;
    let r = raw.read_option_reply().await;
    assert_eq!((r.option, r.kind), (99, REP_ERR_UNSUP));

    raw.send_option(OPT_STARTTLS, &[]).await;
    let r = raw.read_option_reply().await;
    assert!(r.kind == REP_ERR_UNSUP || r.kind == REP_ERR_POLICY);

    raw.send_option(4242, &vec![0x55; 200 * 1024]).await;
    let r = raw.read_option_reply().await;
    assert_eq!((r.option, r.kind), (4242, REP_ERR_TOO_BIG));

    let replies = raw.go(OPT_GO, "vol", &[]).await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    target.preload(0, &[9; 512]);
    let mut c = raw.into_client(false);
    assert_eq!(c.read(0, 512).await, vec![9; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_errors_unknown_empty_and_malformed() {
    let (srv, _target) = TestServer::with_export("vol", MIB).await;
    let mut raw = srv.connect().await;
    raw.greet(C_FIXED_NEWSTYLE | C_NO_ZEROES).await;

    for name in ["missing", ""] {
        let replies = raw.go(OPT_GO, name, &[INFO_BLOCK_SIZE]).await;
        assert_eq!(replies.len(), 1, "no INFO before ERR_UNKNOWN");
        assert_eq!(replies[0].kind, REP_ERR_UNKNOWN);
    }

    // Name length pointing past the end of the data.
    let mut bad = 100u32.to_be_bytes().to_vec();
    bad.extend_from_slice(b"vol\0\0");
    // Trailing byte after the information requests.
    let mut trailing = info_request("vol", &[INFO_BLOCK_SIZE]);
    trailing.push(0);
    // Count claims two requests, data holds one.
    let mut short = info_request("vol", &[INFO_BLOCK_SIZE]);
    short[4 + 3 + 1] = 2;
    for data in [bad, trailing, short, Vec::new()] {
        raw.send_option(OPT_GO, &data).await;
        let r = raw.read_option_reply().await;
        assert_eq!(r.kind, REP_ERR_INVALID, "data {data:?}");
    }

    let replies = raw.go(OPT_GO, "vol", &[]).await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    let mut c = raw.into_client(false);
    assert_eq!(c.read(0, 512).await, vec![0; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_flags_or_option_magic_close_the_connection() {
    let (srv, _target) = TestServer::with_export("vol", MIB).await;

    let mut raw = srv.connect().await;
    raw.greet(C_FIXED_NEWSTYLE | 0x8000_0000).await;
    raw.expect_closed().await;

    let mut raw = srv.connect().await;
    raw.greet(C_FIXED_NEWSTYLE).await;
    raw.stream.write_all(&[0x42; 16]).await.unwrap();
    raw.expect_closed().await;

    // The server is still fine.
    let mut c = srv.client("vol", false, false).await;
    assert_eq!(c.read(0, 512).await, vec![0; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_for_reads_and_errors() {
    let (srv, target) = TestServer::with_export("vol", MIB).await;
    let mut raw = srv.connect().await;
    raw.greet(C_FIXED_NEWSTYLE | C_NO_ZEROES).await;
    raw.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(raw.read_option_reply().await.kind, REP_ACK);
    raw.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(raw.read_option_reply().await.kind, REP_ERR_INVALID);
    let replies = raw.go(OPT_GO, "vol", &[INFO_BLOCK_SIZE]).await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    let mut c = raw.into_client(true);

    let data = pattern(7, 4096);
    target.preload(8192, &data);
    match c.call(0, CMD_READ, 8192, 4096).await {
        Reply::Chunk {
            flags,
            kind,
            payload,
            ..
        } => {
            assert_eq!(flags, REPLY_FLAG_DONE);
            assert_eq!(kind, REPLY_TYPE_OFFSET_DATA);
            assert_eq!(be64(&payload), 8192);
            assert_eq!(&payload[8..], &data[..]);
        }
        other => panic!("expected a data chunk, got {other:?}"),
    }

    match c.call(0, CMD_READ, MIB, 512).await {
        Reply::Chunk {
            flags,
            kind,
            payload,
            ..
        } => {
            assert_eq!(flags, REPLY_FLAG_DONE);
            assert_eq!(kind, REPLY_TYPE_ERROR);
            assert_eq!(be32(&payload), EINVAL);
            assert_eq!(usize::from(be16(&payload[4..])) + 6, payload.len());
        }
        other => panic!("expected an error chunk, got {other:?}"),
    }

    // Non-read commands may keep simple replies.
    assert_eq!(c.write(0, 0, &[1; 512]).await, 0);
    assert_eq!(c.read(0, 512).await, vec![1; 512]);
}

fn meta_contexts(replies: &[OptReply]) -> Vec<(u32, String)> {
    replies
        .iter()
        .filter(|r| r.kind == REP_META_CONTEXT)
        .map(|r| {
            (
                be32(&r.data),
                String::from_utf8(r.data[4..].to_vec()).unwrap(),
            )
        })
        .collect()
}

/// Expand block-status descriptors into per-4 KiB "is a hole" flags.
fn holes_per_block(descriptors: &[(u32, u32)]) -> Vec<bool> {
    let mut out = Vec::new();
    for &(len, flags) in descriptors {
        assert_eq!(len % 4096, 0);
        out.extend(std::iter::repeat_n(flags == 3, (len / 4096) as usize));
        assert!(flags == 0 || flags == 3, "flags {flags}");
    }
    out
}

fn block_status_reply(r: &Reply, context: u32) -> Vec<(u32, u32)> {
    match r {
        Reply::Chunk {
            flags,
            kind,
            payload,
            ..
        } => {
            assert_eq!(*flags, REPLY_FLAG_DONE);
            assert_eq!(*kind, REPLY_TYPE_BLOCK_STATUS, "payload {payload:?}");
            assert_eq!(be32(payload), context);
            assert_eq!((payload.len() - 4) % 8, 0);
            payload[4..]
                .chunks(8)
                .map(|d| (be32(d), be32(&d[4..])))
                .collect()
        }
        other => panic!("expected a block status chunk, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_context_negotiation_and_block_status() {
    let registry = Arc::new(MemRegistry::new());
    let a = Arc::new(MemTarget::new(MIB));
    registry.insert("a", a.clone());
    registry.insert("b", Arc::new(MemTarget::new(MIB)));
    let srv = TestServer::start(registry).await;

    let mut raw = srv.connect().await;
    raw.greet(C_FIXED_NEWSTYLE | C_NO_ZEROES).await;
    raw.send_option(
        OPT_SET_META_CONTEXT,
        &meta_request("a", &["base:allocation"]),
    )
    .await;
    assert_eq!(raw.read_option_reply().await.kind, REP_ERR_INVALID);

    for queries in [&[][..], &["base:"], &["base:allocation", "qemu:foo"]] {
        raw.send_option(OPT_LIST_META_CONTEXT, &meta_request("a", queries))
            .await;
        let replies = raw.read_option_replies().await;
        assert_eq!(replies.last().unwrap().kind, REP_ACK);
        assert_eq!(meta_contexts(&replies), [(0, "base:allocation".into())]);
    }
    raw.send_option(
        OPT_LIST_META_CONTEXT,
        &meta_request("a", &["qemu:dirty-bitmap:x"]),
    )
    .await;
    let replies = raw.read_option_replies().await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].kind, REP_ACK);
    raw.send_option(OPT_LIST_META_CONTEXT, &meta_request("zzz", &[]))
        .await;
    assert_eq!(raw.read_option_reply().await.kind, REP_ERR_UNKNOWN);
    let mut truncated = meta_request("a", &["base:allocation"]);
    truncated.truncate(truncated.len() - 3);
    raw.send_option(OPT_LIST_META_CONTEXT, &truncated).await;
    assert_eq!(raw.read_option_reply().await.kind, REP_ERR_INVALID);

    raw.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(raw.read_option_reply().await.kind, REP_ACK);
    raw.send_option(
        OPT_SET_META_CONTEXT,
        &meta_request("a", &["x-foo:bar", "base:allocation"]),
    )
    .await;
    let replies = raw.read_option_replies().await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    let contexts = meta_contexts(&replies);
    assert_eq!(contexts.len(), 1);
    let (id, name) = &contexts[0];
    assert_ne!(*id, 0);
    assert_eq!(name, "base:allocation");
    let id = *id;

    let replies = raw.go(OPT_GO, "a", &[INFO_BLOCK_SIZE]).await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    let mut c = raw.into_client(true);

    assert_eq!(c.write(0, 0, &pattern(1, 4096)).await, 0);
    assert_eq!(c.write(0, 12288, &pattern(2, 4096)).await, 0);
    let r = c
        .call(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 32768, 4096)
        .await;
    assert_eq!(r.error(), 0);

    let r = c.call(0, CMD_BLOCK_STATUS, 0, 65536).await;
    let descriptors = block_status_reply(&r, id);
    assert_eq!(
        descriptors,
        [
            (4096, 0),
            (8192, 3),
            (4096, 0),
            (16384, 3),
            (4096, 0),
            (28672, 3)
        ]
    );
    assert_eq!(
        holes_per_block(&descriptors),
        a.allocation()[..16].iter().map(|&x| !x).collect::<Vec<_>>()
    );

    // Whole device: one run of the tail hole, clamped to the request.
    let r = c.call(0, CMD_BLOCK_STATUS, 0, MIB as u32).await;
    let descriptors = block_status_reply(&r, id);
    assert_eq!(descriptors.iter().map(|d| u64::from(d.0)).sum::<u64>(), MIB);
    assert_eq!(
        holes_per_block(&descriptors),
        a.allocation().iter().map(|&x| !x).collect::<Vec<_>>()
    );

    let r = c
        .call(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4096, 61440)
        .await;
    assert_eq!(block_status_reply(&r, id), [(8192, 3)]);

    let r = c.call(0, CMD_BLOCK_STATUS, MIB - 4096, 8192).await;
    assert_eq!(r.error(), EINVAL);
    assert!(matches!(
        r,
        Reply::Chunk {
            kind: REPLY_TYPE_ERROR,
            ..
        }
    ));

    // Context selected for "b" does not carry over to "a".
    let mut raw = srv.connect().await;
    raw.greet(C_FIXED_NEWSTYLE | C_NO_ZEROES).await;
    raw.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(raw.read_option_reply().await.kind, REP_ACK);
    raw.send_option(
        OPT_SET_META_CONTEXT,
        &meta_request("b", &["base:allocation"]),
    )
    .await;
    assert_eq!(meta_contexts(&raw.read_option_replies().await).len(), 1);
    assert_eq!(raw.go(OPT_GO, "a", &[]).await.last().unwrap().kind, REP_ACK);
    let mut c = raw.into_client(true);
    assert_eq!(c.call(0, CMD_BLOCK_STATUS, 0, 4096).await.error(), EINVAL);

    // A failed SET clears an earlier successful one.
    let mut raw = srv.connect().await;
    raw.greet(C_FIXED_NEWSTYLE | C_NO_ZEROES).await;
    raw.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(raw.read_option_reply().await.kind, REP_ACK);
    raw.send_option(
        OPT_SET_META_CONTEXT,
        &meta_request("a", &["base:allocation"]),
    )
    .await;
    assert_eq!(meta_contexts(&raw.read_option_replies().await).len(), 1);
    raw.send_option(
        OPT_SET_META_CONTEXT,
        &meta_request("zzz", &["base:allocation"]),
    )
    .await;
    assert_eq!(raw.read_option_reply().await.kind, REP_ERR_UNKNOWN);
    assert_eq!(raw.go(OPT_GO, "a", &[]).await.last().unwrap().kind, REP_ACK);
    let mut c = raw.into_client(true);
    assert_eq!(c.call(0, CMD_BLOCK_STATUS, 0, 4096).await.error(), EINVAL);

    // Without structured replies there is no block status at all.
    let mut c = srv.client("a", false, false).await;
    let r = c.call(0, CMD_BLOCK_STATUS, 0, 4096).await;
    assert!(matches!(r, Reply::Simple { error: EINVAL, .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_round_trip() {
    let (srv, target) = TestServer::with_export("vol", 8 * MIB).await;
    let data = pattern(42, MIB as usize);
    let mut c = srv.client("vol", false, false).await;
    for (i, chunk) in data.chunks(64 * 1024).enumerate() {
        assert_eq!(c.write(0, MIB + (i as u64) * 65536, chunk).await, 0);
    }
    let back = c.read(MIB, MIB as u32).await;
    assert_eq!(checksum(&back), checksum(&data));
    assert!(back == data);
    assert!(target.contents(MIB, MIB as usize) == data);

    let mut s = srv.client("vol", true, false).await;
    let back = s.read(MIB, MIB as u32).await;
    assert_eq!(checksum(&back), checksum(&data));
    // Neighbouring ranges are untouched.
    assert_eq!(c.read(MIB - 512, 512).await, vec![0; 512]);
    assert_eq!(c.read(2 * MIB, 512).await, vec![0; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_unaligned_and_oversized_requests() {
    let registry = Arc::new(MemRegistry::new());
    let target = Arc::new(MemTarget::new(MIB));
    registry.insert("vol", target.clone());
    let config = NbdServerConfig {
        max_payload: 64 * 1024,
        max_inflight_per_conn: 8,
        ..NbdServerConfig::default()
    };
    let srv = TestServer::start_with(registry, config, None).await;
    let mut c = srv.client("vol", false, false).await;

    assert_eq!(c.call(0, CMD_READ, MIB - 512, 1024).await.error(), EINVAL);
    assert_eq!(
        c.call(0, CMD_READ, u64::MAX - 511, 512).await.error(),
        EINVAL
    );
    assert_eq!(c.write(0, MIB, &[1; 512]).await, ENOSPC);
    assert_eq!(c.write(0, MIB - 512, &[1; 1024]).await, ENOSPC);
    assert_eq!(c.call(0, CMD_WRITE_ZEROES, MIB, 4096).await.error(), ENOSPC);
    assert_eq!(c.call(0, CMD_TRIM, MIB - 4096, 8192).await.error(), EINVAL);
    assert_eq!(c.call(0, CMD_READ, 100, 512).await.error(), EINVAL);
    assert_eq!(c.write(0, 0, &[1; 100]).await, EINVAL);
    assert_eq!(c.call(0, CMD_READ, 0, 0).await.error(), EINVAL);
    assert_eq!(c.call(0, CMD_TRIM, 0, 0).await.error(), EINVAL);
    assert_eq!(c.call(0, CMD_READ, 0, 128 * 1024).await.error(), EINVAL);
    assert_eq!(c.write(0, 0, &vec![1; 128 * 1024]).await, EINVAL);
    // Zeroing has no payload, so it is not bounded by the maximum block size.
    assert_eq!(c.call(0, CMD_WRITE_ZEROES, 0, 256 * 1024).await.error(), 0);

    // None of the rejected writes reached the target, and the stream is still in sync.
    assert!(target
        .ops()
        .iter()
        .all(|op| !matches!(op, Op::Write { .. })));
    let data = pattern(3, 64 * 1024);
    assert_eq!(c.write(0, 4096, &data).await, 0);
    assert_eq!(c.read(4096, 64 * 1024).await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes() {
    let registry = Arc::new(MemRegistry::new());
    let target = Arc::new(MemTarget::new_read_only(MIB));
    target.preload(0, &[5; 4096]);
    registry.insert("ro", target.clone());
    let srv = TestServer::start(registry).await;
    let mut c = srv.client("ro", false, false).await;

    assert_eq!(c.write(0, 0, &[1; 512]).await, EPERM);
    assert_eq!(c.write(CMD_FLAG_FUA, 0, &[1; 512]).await, EPERM);
    assert_eq!(c.call(0, CMD_TRIM, 0, 4096).await.error(), EPERM);
    assert_eq!(c.call(0, CMD_WRITE_ZEROES, 0, 4096).await.error(), EPERM);
    assert_eq!(c.read(0, 4096).await, vec![5; 4096]);
    assert_eq!(c.call(0, CMD_FLUSH, 0, 0).await.error(), 0);
    assert_eq!(target.contents(0, 4096), vec![5; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_and_flags_are_einval() {
    let (srv, _target) = TestServer::with_export("vol", MIB).await;
    let mut c = srv.client("vol", false, false).await;

    assert_eq!(c.call(0, 42, 0, 512).await.error(), EINVAL);
    assert_eq!(c.call(0, CMD_CACHE, 0, 512).await.error(), EINVAL);
    assert_eq!(c.call(1 << 7, CMD_READ, 0, 512).await.error(), EINVAL);
    assert_eq!(
        c.call(CMD_FLAG_REQ_ONE, CMD_READ, 0, 512).await.error(),
        EINVAL
    );
    assert_eq!(
        c.call(CMD_FLAG_NO_HOLE, CMD_TRIM, 0, 4096).await.error(),
        EINVAL
    );
    // A WRITE with a bad flag still has its payload consumed.
    assert_eq!(c.write(CMD_FLAG_NO_HOLE, 0, &[3; 4096]).await, EINVAL);
    // FUA is valid on every command (it is ignored where meaningless); DF on reads.
    assert_eq!(c.call(CMD_FLAG_FUA, CMD_READ, 0, 512).await.error(), 0);
    assert_eq!(c.call(CMD_FLAG_DF, CMD_READ, 0, 512).await.error(), 0);
    assert_eq!(c.read(0, 4096).await, vec![0; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes_only_that_connection() {
    let (srv, _target) = TestServer::with_export("vol", MIB).await;
    let mut bad = srv.client("vol", false, false).await;
    let mut good = srv.client("vol", false, false).await;
    assert_eq!(good.write(0, 0, &[8; 512]).await, 0);
    assert_eq!(bad.read(0, 512).await, vec![8; 512]);
    assert_eq!(srv.server.connections("vol"), 2);

    let mut req = request(0, CMD_READ, 1, 0, 512);
    req[0] = 0xde;
    bad.stream.write_all(&req).await.unwrap();
    bad.expect_closed().await;
    assert_eq!(srv.server.connections("vol"), 1);

    assert_eq!(good.read(0, 512).await, vec![8; 512]);
    // Garbage instead of a request header does the same.
    let mut bad = srv.client("vol", true, true).await;
    bad.stream.write_all(&pattern(9, 100)).await.unwrap();
    bad.expect_closed().await;
    assert_eq!(good.write(0, 512, &[9; 512]).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_by_cookie() {
    let (srv, target) = TestServer::with_export("vol", 4 * MIB).await;
    for structured in [false, true] {
        let mut c = srv.client("vol", structured, false).await;
        let base = if structured { MIB } else { 0 };
        for i in 0..32u64 {
            c.send_write(0, i, base + i * 4096, &pattern(i + base, 4096))
                .await;
        }
        for i in 0..32u64 {
            c.send(0, CMD_READ, 100 + i, base + i * 4096, 4096).await;
        }
        let mut replies = HashMap::new();
        for _ in 0..64 {
            let r = c.reply().await;
            assert_eq!(r.error(), 0, "{r:?}");
            assert!(replies.insert(r.cookie(), r).is_none(), "duplicate cookie");
        }
        let expected: HashSet<u64> = (0..32).chain(100..132).collect();
        assert_eq!(replies.keys().copied().collect::<HashSet<_>>(), expected);
        for i in 0..32u64 {
            assert_eq!(replies[&(100 + i)].data(), &pattern(i + base, 4096)[..]);
        }
        assert!(target.contents(base, 4096) == pattern(base, 4096));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_and_fua_reach_the_target() {
    let (srv, target) = TestServer::with_export("vol", MIB).await;
    let mut c = srv.client("vol", false, false).await;

    assert_eq!(c.call(0, CMD_FLUSH, 0, 0).await.error(), 0);
    assert_eq!(target.flushes(), 1);

    target.clear_ops();
    assert_eq!(c.write(CMD_FLAG_FUA, 0, &[1; 4096]).await, 0);
    assert_eq!(c.write(0, 4096, &[2; 4096]).await, 0);
    assert_eq!(
        c.call(
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_WRITE_ZEROES,
            8192,
            4096
        )
        .await
        .error(),
        0
    );
    assert_eq!(c.call(CMD_FLAG_FUA, CMD_TRIM, 12288, 4096).await.error(), 0);
    assert_eq!(
        target.ops(),
        [
            Op::Write {
                offset: 0,
                len: 4096,
                fua: true
            },
            Op::Write {
                offset: 4096,
                len: 4096,
                fua: false
            },
            Op::WriteZeroes {
                offset: 8192,
                len: 4096,
                allocate: true,
                fua: true
            },
            Op::Discard {
                offset: 12288,
                len: 4096
            },
            Op::Flush,
        ]
    );
    assert_eq!(target.flushes(), 2);
    assert_eq!(c.read(0, 4096).await, vec![1; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_answered_while_a_flush_is_in_progress() {
    let (srv, target) = TestServer::with_export("vol", MIB).await;
    target.preload(0, &[4; 4096]);
    let mut c = srv.client("vol", false, false).await;

    let mut hold = target.hold_flushes();
    c.send(0, CMD_FLUSH, 1, 0, 0).await;
    within("flush to start", hold.started()).await;
    c.send(0, CMD_READ, 2, 0, 4096).await;
    let r = c.reply().await;
    assert_eq!(r.cookie(), 2, "the read overtakes the pending flush");
    assert_eq!(r.data(), &[4; 4096][..]);
    assert_eq!(target.flushes(), 0);

    hold.release();
    let r = c.reply().await;
    assert_eq!((r.cookie(), r.error()), (1, 0));
    assert_eq!(target.flushes(), 1);
}

/// A server with a 4 MiB export "vol" on a runtime of its own: a connection that blocked its
/// runtime thread would also stop that runtime's timers, and the test's must still fire. Keep
/// the runtime alive.
async fn server_on_its_own_runtime() -> (ServerRuntime, TestServer, Arc<MemTarget>) {
    let server_rt = ServerRuntime::new();
    let (srv, target) = server_rt
        .handle()
        .spawn(TestServer::with_export("vol", 4 * MIB))
        .await
        .unwrap();
    (server_rt, srv, target)
}

/// A write the target says waits for the disk (`write_waits`: a volume's large `O_DIRECT`
/// copy) leaves the connection's task: a second one reaches the device while the first is held
/// there, and a read is answered meanwhile.
///
/// The server runs on a runtime of its own: a connection that blocked its runtime thread in the
/// write (what this test looks for) would also stop that runtime's timers, and the test's
/// timeouts must still fire on this one.
#[tokio::test(flavor = "current_thread")]
async fn writes_that_wait_for_the_disk_run_several_at_once_and_reads_overtake_them() {
    let (_server_rt, srv, target) = server_on_its_own_runtime().await;
    target.set_device_writes_from(Some(128 << 10));
    target.preload(3 * MIB, &[4; 4096]);
    let mut c = srv.client("vol", false, false).await;

    let mut hold = target.hold_device_writes();
    c.send_write(0, 1, 0, &[7; 1 << 20]).await;
    within("the first large write to reach the device", hold.started()).await;
    // A connection stuck in the first write would not even read the second one off the socket.
    within(
        "the second large write to be sent",
        c.send_write(0, 2, MIB, &[8; 1 << 20]),
    )
    .await;
    within("a second large write while the first waits", hold.started()).await;
    c.send(0, CMD_READ, 3, 3 * MIB, 4096).await;
    let r = c.reply().await;
    assert_eq!(r.cookie(), 3, "the read overtakes the held writes");
    assert_eq!(r.data(), &[4; 4096][..]);

    hold.release();
    let mut done = [c.reply().await, c.reply().await].map(|r| (r.cookie(), r.error()));
    done.sort_unstable();
    assert_eq!(done, [(1, 0), (2, 0)]);
    assert_eq!(
        target.contents(MIB - 4096, 8192),
        [[7; 4096], [8; 4096]].concat()
    );
}

/// Writes, trims and write-zeroes that must first fetch their block from the backend
/// (`write_reads_backend`: a volume's sub-cluster write over evicted data) leave the
/// connection's task: all three reach the fetch while it is held, a read elsewhere is answered
/// meanwhile, and once released they land merged with the block's data around them. (Own
/// server runtime, as above.)
#[tokio::test(flavor = "current_thread")]
async fn writes_that_must_fetch_from_the_backend_leave_the_connection_free() {
    let (_server_rt, srv, target) = server_on_its_own_runtime().await;
    target.preload(0, &[5; 4096]);
    target.preload(3 * MIB, &[4; 4096]);
    target.add_slow_range(0..65536, Duration::from_millis(1));
    let mut c = srv.client("vol", false, false).await;

    let mut hold = target.hold_device_writes();
    c.send_write(0, 1, 512, &[7; 512]).await;
    within("the partial write to reach the fetch", hold.started()).await;
    within("the trim to be sent", c.send(0, CMD_TRIM, 2, 1536, 512)).await;
    within("the partial trim to reach it", hold.started()).await;
    within(
        "the write-zeroes to be sent",
        c.send(0, CMD_WRITE_ZEROES, 3, 2560, 512),
    )
    .await;
    within("the partial write-zeroes to reach it", hold.started()).await;
    c.send(0, CMD_READ, 4, 3 * MIB, 4096).await;
    let r = c.reply().await;
    assert_eq!(r.cookie(), 4, "the read overtakes the held requests");
    assert_eq!(r.data(), &[4; 4096][..]);

    hold.release();
    let mut done =
        [c.reply().await, c.reply().await, c.reply().await].map(|r| (r.cookie(), r.error()));
    done.sort_unstable();
    assert_eq!(done, [(1, 0), (2, 0), (3, 0)]);
    let mut expected = [5u8; 4096];
    expected[512..1024].fill(7);
    expected[1536..2048].fill(0);
    expected[2560..3072].fill(0);
    assert_eq!(target.contents(0, 4096), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_answered_only_once_their_pending_ack_completes() {
    let (srv, target) = TestServer::with_export("vol", MIB).await;
    let mut c = srv.client("vol", false, false).await;

    let hold = target.hold_acks();
    c.send_write(0, 1, 0, &[9; 4096]).await;
    c.send(0, CMD_READ, 2, 0, 4096).await;
    // The write is applied (the read sees it) but not acknowledged, and the connection keeps
    // serving requests meanwhile.
    let r = c.reply().await;
    assert_eq!(r.cookie(), 2, "the read overtakes the unacknowledged write");
    assert_eq!(r.data(), &[9; 4096][..]);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), c.reply())
            .await
            .is_err(),
        "a write was acknowledged before its pending ack completed"
    );
    hold.release();
    let r = c.reply().await;
    assert_eq!((r.cookie(), r.error()), (1, 0));
}

/// Past `max_inflight_bytes_per_conn` of requests in flight the connection takes no more
/// requests (and stops reading the socket) until some complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_inflight_byte_limit_wait() {
    let registry = Arc::new(MemRegistry::new());
    let target = Arc::new(MemTarget::new(MIB));
    registry.insert("vol", target.clone());
    let config = NbdServerConfig {
        max_inflight_bytes_per_conn: 8192,
        ..NbdServerConfig::default()
    };
    let srv = TestServer::start_with(registry, config, None).await;
    let mut c = srv.client("vol", false, false).await;

    let hold = target.hold_acks();
    c.send_write(0, 1, 0, &[7; 4096]).await;
    c.send_write(0, 2, 4096, &[8; 4096]).await;
    c.send(0, CMD_READ, 3, 0, 8192).await;
    // Both writes are applied and wait for their acknowledgement: 8 KiB in flight, so the read
    // is neither executed nor answered.
    assert!(tokio::time::timeout(Duration::from_millis(200), c.reply())
        .await
        .is_err());
    assert!(!target.ops().iter().any(|op| matches!(op, Op::Read { .. })));

    hold.release();
    let mut data = None;
    let mut cookies = HashSet::new();
    for _ in 0..3 {
        let r = c.reply().await;
        assert_eq!(r.error(), 0);
        if r.cookie() == 3 {
            data = Some(r.data().to_vec());
        }
        cookies.insert(r.cookie());
    }
    assert_eq!(cookies, HashSet::from([1, 2, 3]));
    let mut expected = vec![7; 4096];
    expected.extend([8; 4096]);
    assert_eq!(data.unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_operations_are_limited_per_connection() {
    let registry = Arc::new(MemRegistry::new());
    let target = Arc::new(MemTarget::new(MIB));
    registry.insert("vol", target.clone());
    let config = NbdServerConfig {
        max_payload: 1 << 20,
        max_inflight_per_conn: 1,
        ..NbdServerConfig::default()
    };
    let srv = TestServer::start_with(registry, config, None).await;
    let mut c = srv.client("vol", false, false).await;

    let mut hold = target.hold_flushes();
    c.send(0, CMD_FLUSH, 1, 0, 0).await;
    c.send(0, CMD_FLUSH, 2, 0, 0).await;
    c.send(0, CMD_READ, 3, 0, 512).await;
    within("first flush to start", hold.started()).await;
    // The second flush waits for a slot, and the read queued behind it waits too.
    assert!(tokio::time::timeout(Duration::from_millis(200), c.reply())
        .await
        .is_err());
    assert_eq!(
        target.ops().iter().filter(|op| **op == Op::Flush).count(),
        1
    );
    assert!(!target.ops().iter().any(|op| matches!(op, Op::Read { .. })));

    hold.release();
    let mut cookies = HashSet::new();
    for _ in 0..3 {
        let r = c.reply().await;
        assert_eq!(r.error(), 0);
        cookies.insert(r.cookie());
    }
    assert_eq!(cookies, HashSet::from([1, 2, 3]));
    assert_eq!(target.flushes(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_zeroes_no_hole_and_fast_zero() {
    let (srv, target) = TestServer::with_export("vol", MIB).await;
    let mut c = srv.client("vol", false, false).await;
    assert_eq!(c.write(0, 0, &[0xff; 16384]).await, 0);

    assert_eq!(
        c.call(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 0, 8192)
            .await
            .error(),
        0
    );
    assert_eq!(&target.allocation()[..2], [true, true]);
    assert_eq!(target.contents(0, 8192), vec![0; 8192]);

    assert_eq!(
        c.call(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 8192, 4096)
            .await
            .error(),
        0
    );
    assert!(!target.allocation()[2]);
    assert_eq!(target.contents(8192, 4096), vec![0; 4096]);

    target.clear_ops();
    assert_eq!(
        c.call(
            CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
            CMD_WRITE_ZEROES,
            12288,
            4096
        )
        .await
        .error(),
        ENOTSUP
    );
    assert!(
        target.ops().is_empty(),
        "fast-zero refusal must not touch data"
    );
    assert_eq!(target.contents(12288, 4096), vec![0xff; 4096]);

    assert_eq!(c.call(0, CMD_WRITE_ZEROES, 12288, 4096).await.error(), 0);
    assert_eq!(
        target.ops(),
        [Op::WriteZeroes {
            offset: 12288,
            len: 4096,
            allocate: false,
            fua: false
        }]
    );
    assert!(!target.allocation()[3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_finishes_outstanding_requests_then_closes() {
    let (srv, target) = TestServer::with_export("vol", MIB).await;
    let mut c = srv.client("vol", false, false).await;
    let data = pattern(5, 8192);
    // WRITE and DISC in one segment: the write's reply must still go out before the close.
    let mut batch = request(0, CMD_WRITE, 7, 0, 8192);
    batch.extend_from_slice(&data);
    batch.extend(request(0, CMD_DISC, 0xd15c, 0, 0));
    c.stream.write_all(&batch).await.unwrap();
    let r = c.reply().await;
    assert_eq!((r.cookie(), r.error()), (7, 0));
    c.expect_closed().await;
    assert!(target.contents(0, 8192) == data);
    assert_eq!(srv.server.connections("vol"), 0);

    // A flush still running when DISC arrives is completed and answered first.
    let mut c = srv.client("vol", false, false).await;
    let mut hold = target.hold_flushes();
    c.send(0, CMD_FLUSH, 8, 0, 0).await;
    within("flush to start", hold.started()).await;
    c.disc().await;
    // Give the server time to act on DISC; it must keep the connection open meanwhile.
    assert!(tokio::time::timeout(Duration::from_millis(100), c.reply())
        .await
        .is_err());
    hold.release();
    let r = c.reply().await;
    assert_eq!((r.cookie(), r.error()), (8, 0));
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_and_refuses_new_requests() {
    let registry = Arc::new(MemRegistry::new());
    let target = Arc::new(MemTarget::new(MIB));
    registry.insert("vol", target.clone());
    // A long grace period: the connection must end because of DISC, not the timer.
    let mut srv = TestServer::start_with(
        registry,
        NbdServerConfig::default(),
        Some(Duration::from_secs(60)),
    )
    .await;
    let mut c = srv.client("vol", false, false).await;
    let mut negotiating = srv.connect().await;
    negotiating.greet(C_FIXED_NEWSTYLE).await;

    let mut hold = target.hold_flushes();
    c.send(0, CMD_FLUSH, 1, 0, 0).await;
    within("flush to start", hold.started()).await;

    let shutdown = srv.server.shutdown();
    tokio::pin!(shutdown);
    assert!(futures::poll!(shutdown.as_mut()).is_pending());

    c.send(0, CMD_READ, 2, 0, 512).await;
    let r = c.reply().await;
    assert_eq!((r.cookie(), r.error()), (2, ESHUTDOWN));
    c.send_write(0, 3, 0, &[1; 512]).await;
    let r = c.reply().await;
    assert_eq!((r.cookie(), r.error()), (3, ESHUTDOWN));
    assert_eq!(target.contents(0, 512), vec![0; 512]);

    // The accept loop has stopped and a connection still negotiating is dropped.
    within("serve to return", &mut srv.serve)
        .await
        .unwrap()
        .unwrap();
    negotiating.expect_closed().await;
    assert!(tokio::net::TcpStream::connect(srv.addr).await.is_err());

    hold.release();
    let r = c.reply().await;
    assert_eq!((r.cookie(), r.error()), (1, 0));
    assert_eq!(target.flushes(), 1);

    c.disc().await;
    c.expect_closed().await;
    within("shutdown to finish", shutdown).await;
    assert_eq!(srv.server.connections("vol"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_clients_after_the_grace_period() {
    let registry = Arc::new(MemRegistry::new());
    registry.insert("vol", Arc::new(MemTarget::new(MIB)));
    let srv = TestServer::start_with(
        registry,
        NbdServerConfig::default(),
        Some(Duration::from_millis(50)),
    )
    .await;
    let mut c = srv.client("vol", true, true).await;
    assert_eq!(c.read(0, 512).await, vec![0; 512]);
    within("shutdown", srv.server.shutdown()).await;
    c.expect_closed().await;
    assert_eq!(srv.server.connections("vol"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_export_closes_only_that_exports_clients() {
    let registry = Arc::new(MemRegistry::new());
    registry.insert("a", Arc::new(MemTarget::new(MIB)));
    registry.insert("b", Arc::new(MemTarget::new(MIB)));
    let srv = TestServer::start(registry).await;

    let mut a1 = srv.client("a", false, false).await;
    let mut a2 = srv.client("a", true, true).await;
    let mut b1 = srv.client("b", false, false).await;
    let mut negotiating = srv.connect().await;
    negotiating.greet(C_FIXED_NEWSTYLE).await;
    // A completed request proves the server side has attached the connection to its export.
    for c in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(c.read(0, 512).await, vec![0; 512]);
    }
    assert_eq!(srv.server.connections("a"), 2);
    assert_eq!(srv.server.connections("b"), 1);
    assert_eq!(srv.server.connections("nope"), 0);

    assert_eq!(srv.server.disconnect_export("a"), 2);
    assert_eq!(srv.server.connections("a"), 0);
    a1.expect_closed().await;
    a2.expect_closed().await;
    assert_eq!(srv.server.disconnect_export("a"), 0);

    assert_eq!(srv.server.connections("b"), 1);
    assert_eq!(b1.write(0, 0, &[6; 512]).await, 0);
    assert_eq!(b1.read(0, 512).await, vec![6; 512]);
    let replies = negotiating.go(OPT_GO, "a", &[]).await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    let mut a3 = negotiating.into_client(false);
    assert_eq!(a3.read(0, 512).await, vec![0; 512]);
    assert_eq!(srv.server.connections("a"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_delays_the_next_request() {
    let (srv, target) = TestServer::with_export("vol", MIB).await;
    let mut c = srv.client("vol", false, false).await;
    target.set_throttle(Some(Duration::from_millis(300)));
    let start = Instant::now();
    assert_eq!(c.write(0, 0, &[1; 4096]).await, 0);
    target.set_throttle(None);
    assert_eq!(c.read(0, 4096).await, vec![1; 4096]);
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "next request served after {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_io_errors_become_eio() {
    let (srv, target) = TestServer::with_export("vol", MIB).await;
    let mut c = srv.client("vol", false, false).await;
    let mut s = srv.client("vol", true, true).await;
    target.set_fail_io(true);
    assert_eq!(c.call(0, CMD_READ, 0, 512).await.error(), EIO);
    assert_eq!(c.write(0, 0, &[1; 512]).await, EIO);
    assert_eq!(c.write(CMD_FLAG_FUA, 0, &[1; 512]).await, EIO);
    assert_eq!(c.call(0, CMD_FLUSH, 0, 0).await.error(), EIO);
    let r = s.call(0, CMD_READ, 0, 512).await;
    assert!(matches!(
        r,
        Reply::Chunk {
            kind: REPLY_TYPE_ERROR,
            ..
        }
    ));
    assert_eq!(r.error(), EIO);
    assert_eq!(s.call(0, CMD_BLOCK_STATUS, 0, 4096).await.error(), EIO);
    target.set_fail_io(false);
    assert_eq!(c.read(0, 512).await, vec![0; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_disconnect_waits_for_requests_still_running() {
    let (srv, target) = TestServer::with_export("vol", MIB).await;
    let mut c = srv.client("vol", false, false).await;
    let mut hold = target.hold_flushes();
    c.send(0, CMD_FLUSH, 1, 0, 0).await;
    within("flush to start", hold.started()).await;
    let server = srv.server.clone();
    let waiter = tokio::spawn(async move {
        server
            .disconnect_export_and_wait("vol", Duration::from_secs(10))
            .await
    });
    // The connection is cut, but the flush it started is still running: not gone yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), async {
            while !waiter.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .is_err(),
        "disconnect returned while a flush was running"
    );
    assert_eq!(target.flushes(), 0);
    hold.release();
    assert!(
        waiter.await.unwrap(),
        "connections gone once the flush is done"
    );
    assert_eq!(target.flushes(), 1);
    assert_eq!(srv.server.connections("vol"), 0);
}

/// A read of a slow range (data only on the backend) is answered from the backend-read pool:
/// requests pipelined behind it on the same connection are answered first, in simple and in
/// structured mode, and its data arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reads_do_not_hold_up_the_connection() {
    const DELAY: Duration = Duration::from_millis(200);
    for structured in [false, true] {
        let (srv, target) = TestServer::with_export("vol", MIB).await;
        let slow = pattern(1, 64 * 1024);
        let fast = pattern(2, 4096);
        target.preload(0, &slow);
        target.preload(512 * 1024, &fast);
        target.add_slow_range(0..64 * 1024, DELAY);
        let mut c = srv.client("vol", structured, false).await;

        let started = Instant::now();
        c.send(0, CMD_READ, 1, 0, 64 * 1024).await;
        for cookie in 2..=11 {
            c.send(0, CMD_READ, cookie, 512 * 1024, 4096).await;
        }
        for cookie in 2..=11 {
            let r = c.reply().await;
            assert_eq!(
                r.cookie(),
                cookie,
                "fast reads are answered first, in order"
            );
            assert_eq!(checksum(r.data()), checksum(&fast));
        }
        assert!(
            started.elapsed() < DELAY,
            "fast reads waited for the slow one ({:?})",
            started.elapsed()
        );
        let r = c.reply().await;
        assert_eq!((r.cookie(), r.error()), (1, 0));
        assert_eq!(checksum(r.data()), checksum(&slow));
        if let Reply::Chunk { flags, payload, .. } = &r {
            assert_eq!(flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
            assert_eq!(be64(payload), 0, "offset of the data chunk");
        }
        assert!(started.elapsed() >= DELAY);
        assert_eq!(target.slow_reads(), 1);
    }
}

/// Backend reads take the connection's in-flight slots: with one slot, a second slow read waits
/// for the first (and requests behind it wait too), then everything is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reads_are_limited_per_connection() {
    let registry = Arc::new(MemRegistry::new());
    let target = Arc::new(MemTarget::new(MIB));
    registry.insert("vol", target.clone());
    target.preload(0, &pattern(3, 8192));
    target.preload(65536, &pattern(4, 4096));
    target.add_slow_range(0..8192, Duration::from_millis(100));
    let config = NbdServerConfig {
        max_payload: 1 << 20,
        max_inflight_per_conn: 1,
        ..NbdServerConfig::default()
    };
    let srv = TestServer::start_with(registry, config, None).await;
    let mut c = srv.client("vol", false, false).await;

    c.send(0, CMD_READ, 1, 0, 4096).await;
    c.send(0, CMD_READ, 2, 4096, 4096).await;
    c.send(0, CMD_READ, 3, 65536, 4096).await;
    let mut order = Vec::new();
    for _ in 0..3 {
        let r = c.reply().await;
        assert_eq!(r.error(), 0);
        let (offset, seed) = match r.cookie() {
            1 => (0, 3),
            2 => (4096, 3),
            _ => (0, 4),
        };
        let want = &pattern(seed, offset + 4096)[offset..];
        assert_eq!(checksum(r.data()), checksum(want), "cookie {}", r.cookie());
        order.push(r.cookie());
    }
    // Read 2 waited for read 1's slot; read 3 was queued behind read 2 and ran inline as soon as
    // read 2 was handed to the pool.
    assert_eq!(order, [1, 3, 2]);
    assert_eq!(target.slow_reads(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_client_writes_reads_flushes_and_reports_errors() {
    use vstor_edge::nbd::client::NbdClient;
    let (srv, target) = TestServer::with_export("vol", 4 * MIB).await;
    let addr = srv.addr.to_string();
    let result = tokio::task::spawn_blocking(move || {
        let mut client =
            NbdClient::connect_timeout(&addr, "vol", Some(Duration::from_secs(10))).unwrap();
        assert_eq!(client.size, 4 * MIB);
        let data = pattern(7, 8192);
        assert_eq!(client.write(4096, &data, true).unwrap(), 0);
        assert_eq!(client.flush().unwrap(), 0);
        let mut back = vec![0u8; 8192];
        assert_eq!(client.read(4096, &mut back).unwrap(), 0);
        assert_eq!(back, data);
        // Out of range: an NBD error code, and the connection stays usable.
        let mut past = vec![0u8; 4096];
        assert_ne!(client.read(4 * MIB, &mut past).unwrap(), 0);
        assert_eq!(client.read(4096, &mut back).unwrap(), 0);
        // Pipelined reads come back with their cookies.
        client.send_read(100, 4096, 4096).unwrap();
        client.send_read(101, 8192, 4096).unwrap();
        let mut seen = HashSet::new();
        for _ in 0..2 {
            let (cookie, error, bytes) = client.reply(|_| 4096).unwrap();
            assert_eq!(error, 0);
            let at = if cookie == 100 { 0 } else { 4096 };
            assert_eq!(bytes, data[at..at + 4096]);
            seen.insert(cookie);
        }
        assert_eq!(seen, HashSet::from([100, 101]));
        // An unknown export: an error, not a panic or a hang.
        let err = NbdClient::connect_timeout(&addr, "nope", Some(Duration::from_secs(10)))
            .err()
            .expect("unknown export refused");
        assert!(err.to_string().contains("nope"), "{err}");
        data
    })
    .await
    .unwrap();
    assert_eq!(target.contents(4096, 8192), result);
}

/// `MapClient`, the blocking client `vstor volume export` asks for the allocation map, reads the
/// server's block status as runs (data where the target holds data, zeros elsewhere, never past
/// the range asked); a range past the end and an unknown export are errors with the server's
/// reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_client_reads_the_allocation_map_as_runs() {
    use vstor_edge::nbd::map_client::{MapClient, Run};
    let (srv, target) = TestServer::with_export("vol", 4 * MIB).await;
    target.preload(0, &[1; 8192]);
    target.preload(MIB, &[2; 4096]);
    let addr = srv.addr.to_string();
    let timeout = Some(Duration::from_secs(10));
    let (runs, inner, unknown) = tokio::task::spawn_blocking(move || {
        let mut map = MapClient::connect(&addr, "vol", timeout, None).unwrap();
        assert_eq!(map.size, 4 * MIB);
        let mut runs: Vec<Run> = Vec::new();
        let mut at = 0;
        while at < map.size {
            let got = map.block_status(at, (map.size - at) as u32).unwrap();
            at = got.last().map(|r| r.offset + r.length).unwrap();
            runs.extend(got);
        }
        let inner = map.block_status(4096, 8192).unwrap();
        // Past the end: the server's error, and the connection still answers.
        let past = map
            .block_status(4 * MIB - 4096, 8192)
            .unwrap_err()
            .to_string();
        assert!(past.contains("NBD error"), "{past}");
        assert_eq!(map.block_status(0, 4096).unwrap().len(), 1);
        let unknown = MapClient::connect(&addr, "nosuch", timeout, None).err();
        (runs, inner, unknown)
    })
    .await
    .unwrap();
    // Adjacent runs of the same kind merged: the server may split them anywhere.
    let merge = |runs: &[Run]| {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for r in runs {
            match out.last_mut() {
                Some(last) if last.2 == r.zero && last.0 + last.1 == r.offset => last.1 += r.length,
                _ => out.push((r.offset, r.length, r.zero)),
            }
        }
        out
    };
    assert_eq!(
        merge(&runs),
        [
            (0, 8192, false),
            (8192, MIB - 8192, true),
            (MIB, 4096, false),
            (MIB + 4096, 3 * MIB - 4096, true),
        ]
    );
    assert_eq!(merge(&inner), [(4096, 4096, false), (8192, 4096, true)]);
    let unknown = unknown.expect("an unknown export is refused").to_string();
    assert!(unknown.contains("refused option"), "{unknown}");
}

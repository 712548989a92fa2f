//! Client and server over real sockets: every request kind, fencing, slave refusals, catch-up
//! from a backend, a version mismatch at the handshake, a client falling back to an older MDS's
//! version, and a dead MDS costing a bounded wait.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use vstor_backend::{LocalStore, ObjectStore};
use vstor_mds::client::MdsClient;
use vstor_mds::proto::{ErrorCode, Frame, MdsCodec, Message};
use vstor_mds::server::{serve, MdsServerConfig};
use vstor_mds::{Cork, MdsError, MdsStore, Role, Update};
use vstor_volumedriver::config::TLogRecord;
use vstor_volumedriver::{Volume, VolumeConfig, VolumeOptions};

const T: Duration = Duration::from_secs(5);

fn refused(e: &MdsError) -> Option<ErrorCode> {
    match e {
        MdsError::Refused { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fencing_roles_and_catch_up_over_the_wire() {
    let tmp = tempfile::tempdir().unwrap();
    let backend: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(tmp.path().join("backend")).unwrap());
    let store = Arc::new(MdsStore::open(&tmp.path().join("mds")).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let mut config = MdsServerConfig::new("mds-a", Some(backend.clone()));
    config.catch_up_every = None;
    let server = tokio::spawn(serve(listener, store, config, shutdown.clone()));
    let client = MdsClient::connect(&addr, "test", T).await.unwrap();
    assert_eq!(client.server, "mds-a");

    // Master: pipelined sets, each on top of the previous cork.
    client.set_role("m", "ns-m", Role::Master, 4).await.unwrap();
    let c1 = Cork::EMPTY.after(&TLogRecord::new(1));
    let c2 = c1.after(&TLogRecord::new(2));
    let loc = |a: u64| Update::Loc {
        address: a,
        location: (a << 32) | 9,
    };
    client
        .multi_set("m", 4, Cork::EMPTY, c1, (0..100).map(loc).collect())
        .await
        .unwrap();
    client
        .multi_set(
            "m",
            4,
            c1,
            c2,
            vec![Update::Trim {
                start: 10,
                count: 80,
            }],
        )
        .await
        .unwrap();
    let (cork, got) = client.multi_get("m", vec![5, 10, 95, 1000]).await.unwrap();
    assert_eq!(cork, c2);
    assert_eq!(got, vec![(5 << 32) | 9, 0, (95 << 32) | 9, 0]);
    let (cork, all) = client.dump_all("m").await.unwrap();
    assert_eq!((cork, all.len()), (c2, 20));
    // Fencing: an older owner tag is refused, and changes nothing.
    let err = client
        .multi_set("m", 3, c2, c2.after(&TLogRecord::new(3)), vec![loc(50)])
        .await
        .unwrap_err();
    assert_eq!(refused(&err), Some(ErrorCode::Fenced), "{err}");
    let err = client
        .multi_set("m", 4, c1, c2, vec![loc(50)])
        .await
        .unwrap_err();
    assert_eq!(refused(&err), Some(ErrorCode::CorkMismatch), "{err}");
    let info = client.stat("m").await.unwrap();
    assert_eq!((info.entries, info.meta.counters.refused), (20, 2));
    assert_eq!(client.multi_get("m", vec![50]).await.unwrap().1, vec![0]);

    // Slave of a real volume: refuses sets, catches up from the backend on demand.
    let mut options = VolumeOptions::new(1 << 20);
    options.sco_size = 4 << 20;
    let volume = Volume::create(
        &tmp.path().join("wb"),
        backend.clone(),
        VolumeConfig::new("v", &options, 0).unwrap(),
    )
    .unwrap();
    for round in 0..3u8 {
        volume
            .write(u64::from(round) * 8192, &[round + 1; 8192], false)
            .unwrap();
        volume.flush().unwrap();
        volume.close_current_tlog().unwrap();
        volume.drain_uploads().unwrap();
    }
    client.set_role("v", "v", Role::Slave, 0).await.unwrap();
    let err = client
        .multi_set("v", 0, Cork::EMPTY, c1, vec![])
        .await
        .unwrap_err();
    assert_eq!(refused(&err), Some(ErrorCode::NotMaster), "{err}");
    assert_eq!(client.catch_up("v", true).await.unwrap().behind, 3);
    let report = client.catch_up("v", false).await.unwrap();
    assert_eq!((report.behind, report.replayed), (3, 3));
    assert_eq!(report.cork.tlog, 3);
    let (_, map) = client.dump_all("v").await.unwrap();
    assert_eq!(map.len(), 6);
    let tables = client.list().await.unwrap();
    let names: Vec<&str> = tables.iter().map(|t| t.volume.as_str()).collect();
    assert_eq!(names, vec!["m", "v"]);
    let err = client.stat("nope").await.unwrap_err();
    assert_eq!(refused(&err), Some(ErrorCode::NotFound), "{err}");
    client.drop_table("m", 4).await.unwrap();
    assert_eq!(client.list().await.unwrap().len(), 1);

    // The MDS goes away: pending and later calls fail at once, naming it.
    shutdown.cancel();
    server.await.unwrap().unwrap();
    let deadline = Instant::now() + T;
    while client.is_alive() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !client.is_alive(),
        "the server closed the connection at shutdown"
    );
    let err = client.list().await.unwrap_err();
    assert!(err.to_string().contains(&addr), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_version_is_told_and_a_hung_mds_costs_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(MdsStore::open(tmp.path()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        store,
        MdsServerConfig::new("mds", None),
        shutdown.clone(),
    ));
    // A client of a newer version gets VersionMismatch naming both, then the connection closes.
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let codec = MdsCodec::with_version(3);
    let mut out = BytesMut::new();
    codec
        .encode(
            &Frame {
                id: 0,
                message: Message::Hello {
                    version: 3,
                    client: "future".into(),
                },
            },
            &mut out,
        )
        .unwrap();
    stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let reply = loop {
        if let Some(frame) = codec.decode(&mut buf).unwrap() {
            break frame.message;
        }
        assert!(stream.read_buf(&mut buf).await.unwrap() > 0, "closed early");
    };
    assert_eq!(
        reply,
        Message::VersionMismatch {
            server: 2,
            client: 3
        }
    );
    assert_eq!(stream.read_buf(&mut buf).await.unwrap(), 0);
    // Catch-up without a backend is refused, not a hang.
    let client = MdsClient::connect(&addr, "t", T).await.unwrap();
    client.set_role("v", "v", Role::Slave, 0).await.unwrap();
    let err = client.catch_up("v", false).await.unwrap_err();
    assert_eq!(refused(&err), Some(ErrorCode::Invalid), "{err}");
    shutdown.cancel();
    server.await.unwrap().unwrap();

    // A listener that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let started = Instant::now();
    let err = MdsClient::connect(&silent_addr, "t", Duration::from_millis(300))
        .await
        .err()
        .expect("no Welcome");
    assert!(err.to_string().contains(&silent_addr), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A table over many pages, dumped by pages (protocol 2) and by entries from an MDS that
/// speaks only protocol 1 (as an older build during an upgrade): the client falls back, and
/// both dumps equal the store's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dumps_the_same_by_pages_and_from_an_older_mds() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(MdsStore::open(&tmp.path().join("mds")).unwrap());
    store.set_role("v", "v", Role::Master, 1).unwrap();
    // Sparse: runs, isolated clusters and a far page, so ranges of pages come back empty and
    // `next` has to skip ahead.
    let mut updates: Vec<Update> = (0..3000u64)
        .chain((600_000..600_700).step_by(3))
        .chain([5_000_000_000, 5_000_000_511])
        .map(|a| Update::Loc {
            address: a,
            location: (a << 32) | 7,
        })
        .collect();
    updates.push(Update::Trim {
        start: 100,
        count: 900,
    });
    let cork = Cork::EMPTY.after(&TLogRecord::new(1));
    store
        .multi_set("v", 1, Cork::EMPTY, cork, &updates)
        .unwrap();
    let mut want = Vec::new();
    let mut after = None;
    loop {
        let (_, page) = store.dump("v", after, 1000).unwrap();
        let Some(last) = page.last().map(|(a, _)| *a) else {
            break;
        };
        want.extend(page);
        after = Some(last);
    }
    assert_eq!(want.len(), 3000 - 900 + 234 + 2);

    for max_version in [2, 1] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let mut config = MdsServerConfig::new("mds", None);
        config.max_version = max_version;
        let server = tokio::spawn(serve(listener, store.clone(), config, shutdown.clone()));
        let client = MdsClient::connect(&addr, "t", T).await.unwrap();
        assert_eq!(client.version, max_version);
        let (got_cork, got) = client.dump_sorted("v").await.unwrap();
        assert_eq!(got_cork, cork);
        assert_eq!(got, want, "dump over protocol {max_version}");
        if max_version == 1 {
            // The older MDS does not know DumpPages: it is not even sent.
            let err = client
                .call(Message::DumpPages {
                    volume: "v".into(),
                    first: 0,
                    count: 1,
                })
                .await
                .unwrap_err();
            assert!(
                matches!(&err, MdsError::Net { reason, .. } if reason.contains("needs MDS protocol 2")),
                "{err}"
            );
            assert!(client.is_alive(), "the connection survives the refusal");
        }
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}

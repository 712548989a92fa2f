#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The edge protocol end to end, in process, on loopback: `RemoteTarget` clients against
//! `remote::server` nodes over in-memory targets. Data written reads back (checksums), pipelined
//! random I/O, the allow list (handshake, pushed change, failover), owner-tag refusals, corrupt
//! frames, failover with and without the DTL in sync, the
//! reconnect bound, and a real NBD client (`qemu-io`) through the NBD server on a `RemoteTarget`.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{checksum, pattern, within, ServerRuntime, TestServer, MIB};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use vstor_edge::remote::client::{ConnState, RemoteConfig, RemoteError, RemoteTarget};
use vstor_edge::remote::proto::{AllowList, ErrorCode};
use vstor_edge::remote::server::{serve, EdgeServerConfig};
use vstor_edge::remote::{Endpoint, Handoff};
use vstor_edge::testing::remote::{MemExports, MemServedState, StaticResolver};
use vstor_edge::testing::{MemRegistry, MemTarget};
use vstor_edge::{BlockTarget, TargetError};

const SIZE: u64 = 64 * MIB;
const BLOCK: usize = 4096;

/// One "node": an edge server serving `vol` from a shared in-memory target under a tag.
struct Node {
    addr: std::net::SocketAddr,
    state: Arc<MemServedState>,
    stop: CancellationToken,
    /// The unix socket it also serves on (`Node::start_local`).
    unix: Option<std::path::PathBuf>,
    exports: Arc<MemExports>,
}

impl Node {
    async fn start(target: &Arc<MemTarget>, tag: u64) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, target, tag)
    }

    fn start_on(listener: TcpListener, target: &Arc<MemTarget>, tag: u64) -> Node {
        let state = MemServedState::new(tag);
        let exports = MemExports::new();
        exports.insert("vol", target.clone(), state.clone());
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            exports.clone(),
            EdgeServerConfig::default(),
            stop.clone(),
        ));
        Node {
            addr,
            state,
            stop,
            unix: None,
            exports,
        }
    }

    /// A node that also serves on a unix socket at `path`, as `vstor serve --edge-socket`.
    async fn start_local(target: &Arc<MemTarget>, tag: u64, path: &std::path::Path) -> Node {
        let mut node = Self::start(target, tag).await;
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(serve(
            listener,
            node.exports.clone(),
            EdgeServerConfig::default(),
            node.stop.clone(),
        ));
        node.unix = Some(path.to_path_buf());
        node
    }

    fn endpoint(&self, name: &str) -> Endpoint {
        Endpoint {
            node: name.into(),
            addr: self.addr.to_string(),
            tag: self.state_tag(),
            unix: self.unix.as_ref().map(|p| p.to_string_lossy().into_owned()),
        }
    }

    fn state_tag(&self) -> u64 {
        use vstor_edge::remote::ServedState;
        self.state.tag()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn config(bound: Duration) -> RemoteConfig {
    RemoteConfig {
        client_name: "test-edge".into(),
        reconnect_bound: bound,
        connect_timeout: Duration::from_secs(2),
        liveness: Duration::from_secs(4),
        ..RemoteConfig::default()
    }
}

async fn write(t: &RemoteTarget, offset: u64, data: &[u8]) -> Result<(), TargetError> {
    let mut ack = t.write(offset, data, false)?;
    match ack.pending.take() {
        Some(p) => p.await,
        None => Ok(()),
    }
}

async fn read(t: &RemoteTarget, offset: u64, len: usize) -> Result<Vec<u8>, TargetError> {
    let fut = t
        .read_async(offset, len)
        .expect("remote target reads asynchronously");
    fut.await.map(|b| b.to_vec())
}

async fn flush(t: &RemoteTarget) -> Result<(), TargetError> {
    t.flush_async().expect("asynchronous flush").await
}

/// Poll `cond` until it holds, failing the test after 10 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn connect(resolver: &Arc<StaticResolver>, bound: Duration) -> Arc<RemoteTarget> {
    RemoteTarget::connect("vol", resolver.clone(), config(bound))
        .await
        .expect("connect")
}

/// A node serving `target` (tag 5) on a runtime of its own, so that a node that blocked cannot
/// stop the test's timeouts, and a target connected to it. Keep the runtime and node alive.
async fn node_on_its_own_runtime(
    target: &Arc<MemTarget>,
) -> (ServerRuntime, Node, Arc<RemoteTarget>) {
    let server_rt = ServerRuntime::new();
    let served = target.clone();
    let node = server_rt
        .handle()
        .spawn(async move { Node::start(&served, 5).await })
        .await
        .unwrap();
    let resolver = StaticResolver::new(node.endpoint("a"));
    let t = connect(&resolver, Duration::from_secs(30)).await;
    (server_rt, node, t)
}

/// Two nodes serving one in-memory target, as two nodes read one backend (A under tag 1, B
/// under tag 2), and a client connected to A by a resolver that names A.
async fn a_and_b() -> (
    Arc<MemTarget>,
    Node,
    Node,
    Arc<StaticResolver>,
    Arc<RemoteTarget>,
) {
    let target = Arc::new(MemTarget::new(SIZE));
    let a = Node::start(&target, 1).await;
    let b = Node::start(&target, 2).await;
    let resolver = StaticResolver::new(a.endpoint("a"));
    let t = connect(&resolver, Duration::from_secs(30)).await;
    (target, a, b, resolver, t)
}

/// A frontend pass plugs the target: what it submits leaves together at `unplug`, in order
/// (the reads see the writes before them). A blocking call on a plugged thread sends what is
/// held first instead of waiting forever for an answer to a request never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugged_pass_sends_its_requests_at_unplug() {
    let target = Arc::new(MemTarget::new(SIZE));
    let node = Node::start(&target, 5).await;
    let resolver = StaticResolver::new(node.endpoint("a"));
    let t = connect(&resolver, Duration::from_secs(30)).await;
    let t2 = t.clone();
    let (done, result) = std::sync::mpsc::channel();
    // A thread of its own, like a vhost-user queue's (and so that a hang fails the test
    // instead of holding up the runtime's shutdown).
    std::thread::spawn(move || {
        t2.plug();
        let mut acks: Vec<_> = (0..8u64)
            .map(|i| t2.write(i * 4096, &pattern(i, 4096), false).unwrap())
            .collect();
        let reads: Vec<_> = (0..8u64)
            .map(|i| t2.read_async(i * 4096, 4096).unwrap())
            .collect();
        t2.unplug();
        for ack in &mut acks {
            ack.wait_blocking().unwrap();
        }
        for (i, read) in reads.into_iter().enumerate() {
            let data = futures::executor::block_on(read).unwrap();
            assert_eq!(
                checksum(&data),
                checksum(&pattern(i as u64, 4096)),
                "read {i}"
            );
        }
        // Plugged again, a blocking read and flush must not wait on themselves.
        t2.plug();
        let write = t2.write(9 * 4096, &pattern(9, 4096), false).unwrap();
        let mut buf = vec![0u8; 4096];
        t2.read(9 * 4096, &mut buf).unwrap();
        t2.flush().unwrap();
        t2.unplug();
        drop(write);
        let _ = done.send(buf);
    });
    let buf = tokio::task::spawn_blocking(move || result.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("a plugged thread's requests were never sent");
    assert_eq!(checksum(&buf), checksum(&pattern(9, 4096)));
    assert_eq!(
        checksum(&target.contents(0, 8 * 4096)),
        checksum(
            &(0..8u64)
                .flat_map(|i| pattern(i, 4096))
                .collect::<Vec<u8>>()
        )
    );
    assert_eq!(t.stats().failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_written_reads_back() {
    let target = Arc::new(MemTarget::new(SIZE));
    let node = Node::start(&target, 5).await;
    let resolver = StaticResolver::new(node.endpoint("a"));
    let t = connect(&resolver, Duration::from_secs(30)).await;
    assert_eq!(t.size(), SIZE);
    assert!(!t.read_only());

    for i in 0..32u64 {
        write(&t, i * 65536, &pattern(i, 65536)).await.unwrap();
    }
    for i in 0..32u64 {
        let got = read(&t, i * 65536, 65536).await.unwrap();
        assert_eq!(checksum(&got), checksum(&pattern(i, 65536)), "block {i}");
    }
    assert_eq!(
        checksum(&target.contents(65536, 65536)),
        checksum(&pattern(1, 65536))
    );
    // A large read (several frames' worth is split by the client) and the blocking API.
    let t2 = t.clone();
    let big = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 32 * 65536];
        t2.read(0, &mut buf).unwrap();
        t2.flush().unwrap();
        buf
    })
    .await
    .unwrap();
    assert_eq!(checksum(&big[65536..131072]), checksum(&pattern(1, 65536)));
    flush(&t).await.unwrap();
    assert!(target.flushes() >= 2);

    // Trim, write-zeroes (FUA inline), block status.
    t.discard(0, 65536).unwrap().pending.unwrap().await.unwrap();
    t.write_zeroes(65536, 65536, true, true)
        .unwrap()
        .pending
        .unwrap()
        .await
        .unwrap();
    assert!(read(&t, 0, 131072).await.unwrap().iter().all(|&b| b == 0));
    let map = t.block_status_async(0, 3 * 65536).unwrap().await.unwrap();
    assert!(map[0].hole && map[0].length == 65536, "{map:?}");
    assert!(!map[1].hole, "{map:?}");
    // Out of range and unaligned requests fail with the right error, and the target stays usable.
    assert!(matches!(
        t.write(SIZE, &[0; 512], false),
        Err(TargetError::OutOfRange { .. })
    ));
    assert!(write(&t, 100, &[1; 512]).await.is_err());
    write(&t, 0, &pattern(99, 4096)).await.unwrap();

    let stats = t.stats();
    assert_eq!(stats.state, ConnState::Connected);
    assert_eq!(stats.owner.as_deref(), Some("a"));
    assert_eq!(stats.tag, 5);
    assert_eq!(stats.reconnects, 0);
    assert_eq!(stats.inflight, 0);
    assert!(stats.completed >= 70, "{stats:?}");
    assert_eq!(stats.latency_buckets.iter().sum::<u64>(), stats.completed);
    t.close().await;
    assert_eq!(t.stats().state, ConnState::Closed);
    assert_eq!(write(&t, 0, &[0; 512]).await, Err(TargetError::Shutdown));
}

/// A write or write-zeroes that must first fetch its block from the backend
/// (`write_reads_backend`: a volume's sub-cluster write over evicted data) runs off the
/// connection's task: while they wait, the same connection still answers a write and a read
/// elsewhere; released, they land merged with the block's data around them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_must_fetch_from_the_backend_do_not_hold_up_the_connection() {
    let target = Arc::new(MemTarget::new(SIZE));
    let old = pattern(3, BLOCK);
    target.preload(0, &old);
    target.add_slow_range(0..(64 << 10), Duration::from_millis(1));
    let (_server_rt, _node, t) = node_on_its_own_runtime(&target).await;
    let mut hold = target.hold_device_writes();
    let partial = {
        let t = t.clone();
        tokio::spawn(async move { write(&t, 512, &pattern(9, 512)).await })
    };
    within(
        "the partial write to reach the backend fetch",
        hold.started(),
    )
    .await;
    let zeroes = {
        let t = t.clone();
        tokio::spawn(async move {
            let mut ack = t.write_zeroes(2560, 512, false, false)?;
            match ack.pending.take() {
                Some(p) => p.await,
                None => Ok(()),
            }
        })
    };
    within("the partial write-zeroes to reach it", hold.started()).await;
    within("a write elsewhere", write(&t, 8 * MIB, &pattern(8, BLOCK)))
        .await
        .unwrap();
    let got = within("a read elsewhere", read(&t, 8 * MIB, BLOCK))
        .await
        .unwrap();
    assert_eq!(checksum(&got), checksum(&pattern(8, BLOCK)));
    assert!(!partial.is_finished() && !zeroes.is_finished());
    hold.release();
    within("the partial write", partial).await.unwrap().unwrap();
    within("the partial write-zeroes", zeroes)
        .await
        .unwrap()
        .unwrap();
    let got = within("reading the block back", read(&t, 0, BLOCK))
        .await
        .unwrap();
    let mut expected = old;
    expected[512..1024].copy_from_slice(&pattern(9, 512));
    expected[2560..3072].fill(0);
    assert_eq!(checksum(&got), checksum(&expected));
    t.close().await;
}

/// A write the target says waits for the disk (a volume's large `O_DIRECT` copy) runs off the
/// connection's task: while one is held in the device, a second one reaches the device too, and
/// the same connection still answers a small write and a read. Released, both land. The node
/// runs on a runtime of its own (`ServerRuntime`), so a node that blocked cannot stop this
/// test's timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_wait_for_the_disk_do_not_hold_up_the_connection() {
    const LARGE: usize = 1 << 20;
    let target = Arc::new(MemTarget::new(SIZE));
    target.set_device_writes_from(Some(128 << 10));
    let (_server_rt, _node, t) = node_on_its_own_runtime(&target).await;
    let mut hold = target.hold_device_writes();
    let large = |i: u64| {
        let t = t.clone();
        tokio::spawn(async move { write(&t, i * MIB, &pattern(i, LARGE)).await })
    };
    let first = large(0);
    within("the first large write to reach the device", hold.started()).await;
    let second = large(1);
    within(
        "a second large write to reach the device while the first waits",
        hold.started(),
    )
    .await;
    within("a small write", write(&t, 8 * MIB, &pattern(8, BLOCK)))
        .await
        .unwrap();
    let got = within("a read", read(&t, 8 * MIB, BLOCK)).await.unwrap();
    assert_eq!(checksum(&got), checksum(&pattern(8, BLOCK)));
    assert!(!first.is_finished() && !second.is_finished());
    // A read of a held write's range waits for it: sent after the write, it must see it.
    let behind = {
        let t = t.clone();
        tokio::spawn(async move { read(&t, MIB - 4096, 8192).await })
    };
    // Either it waits in flight with the two writes, or (had it not waited) it is answered.
    until("the read to be in flight or answered", || {
        t.stats().inflight == 3 || behind.is_finished()
    })
    .await;
    hold.release();
    within("the large writes", async {
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
    })
    .await;
    let got = within("the read behind them", behind)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        checksum(&got),
        checksum(
            &[
                &pattern(0, LARGE)[LARGE - 4096..],
                &pattern(1, LARGE)[..4096]
            ]
            .concat()
        ),
        "a read sent after the large writes did not see them"
    );
    for i in 0..2 {
        assert_eq!(
            checksum(&target.contents(i * MIB, LARGE)),
            checksum(&pattern(i, LARGE)),
            "large write {i}"
        );
    }
    t.close().await;
}

/// 32 workers, each owning a disjoint region, do random writes and verifying reads at once.
async fn qd32_load(t: &Arc<RemoteTarget>, ops: usize, model: &Arc<Mutex<HashMap<u64, u64>>>) {
    let mut tasks = Vec::new();
    for w in 0..32u64 {
        let t = t.clone();
        let model = model.clone();
        tasks.push(tokio::spawn(async move {
            let mut x = w * 7919 + 1;
            for n in 0..ops {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let block = w * 64 + (x >> 33) % 64;
                let offset = block * BLOCK as u64;
                if n % 3 == 2 {
                    let want = model.lock().unwrap().get(&block).copied();
                    let got = read(&t, offset, BLOCK).await.unwrap();
                    let want = want.map_or(vec![0; BLOCK], |seed| pattern(seed, BLOCK));
                    assert_eq!(checksum(&got), checksum(&want), "block {block}");
                } else {
                    let seed = (w << 32) | n as u64;
                    write(&t, offset, &pattern(seed, BLOCK)).await.unwrap();
                    model.lock().unwrap().insert(block, seed);
                }
            }
        }));
    }
    for task in tasks {
        within("QD32 workers", task).await.unwrap();
    }
}

fn verify(target: &MemTarget, model: &HashMap<u64, u64>) {
    for (&block, &seed) in model {
        assert_eq!(
            checksum(&target.contents(block * BLOCK as u64, BLOCK)),
            checksum(&pattern(seed, BLOCK)),
            "block {block} lost its last acknowledged write"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_qd32_random_io() {
    let target = Arc::new(MemTarget::new(SIZE));
    let node = Node::start(&target, 1).await;
    let resolver = StaticResolver::new(node.endpoint("a"));
    let t = connect(&resolver, Duration::from_secs(30)).await;
    let model = Arc::new(Mutex::new(HashMap::new()));
    qd32_load(&t, 300, &model).await;
    verify(&target, &model.lock().unwrap());
    assert_eq!(t.stats().failed, 0);
}

/// An owner on the same host is reached over its unix socket: pipelined I/O reads back, a stale
/// tag is refused there too, and an edge that cannot reach the socket (another mount namespace,
/// a stopped owner's leftover path) uses TCP in the same attempt. The owner's death fails the
/// socket at once and the edge follows the volume to the next owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_host_owner_is_reached_over_its_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let target = Arc::new(MemTarget::new(SIZE));
    let node = Node::start_local(&target, 3, &dir.path().join("a.sock")).await;
    let resolver = StaticResolver::new(node.endpoint("a"));
    let t = connect(&resolver, Duration::from_secs(30)).await;
    let stats = t.stats();
    let want = format!("unix:{}", dir.path().join("a.sock").display());
    assert_eq!(stats.addr.as_deref(), Some(want.as_str()), "{stats:?}");
    let model = Arc::new(Mutex::new(HashMap::new()));
    qd32_load(&t, 200, &model).await;
    verify(&target, &model.lock().unwrap());
    flush(&t).await.unwrap();

    // A stale tag on the unix socket gets the same refusal as on TCP.
    let mut stale = node.endpoint("a");
    stale.tag = 2;
    match RemoteTarget::connect(
        "vol",
        StaticResolver::new(stale),
        config(Duration::from_secs(5)),
    )
    .await
    {
        Err(RemoteError::Refused { code, addr, .. }) => {
            assert_eq!(code, ErrorCode::StaleTag);
            assert_eq!(addr, want);
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a stale tag was welcomed over the unix socket"),
    }

    // A path nobody listens on: TCP, same attempt, same data.
    let mut elsewhere = node.endpoint("a");
    elsewhere.unix = Some(dir.path().join("missing.sock").display().to_string());
    let tcp = connect(&StaticResolver::new(elsewhere), Duration::from_secs(30)).await;
    assert_eq!(tcp.stats().addr, Some(node.addr.to_string()));
    let (&block, &seed) = model.lock().unwrap().iter().next().unwrap();
    let got = read(&tcp, block * BLOCK as u64, BLOCK).await.unwrap();
    assert_eq!(checksum(&got), checksum(&pattern(seed, BLOCK)));
    tcp.close().await;

    // The owner goes away (its listeners and connections close); the next owner, also local,
    // takes over under a newer tag and the edge carries on over its socket.
    let next = Node::start_local(&target, 4, &dir.path().join("b.sock")).await;
    drop(node);
    resolver.set(Ok(next.endpoint("b")));
    write(&t, 0, &pattern(77, BLOCK)).await.unwrap();
    assert_eq!(
        checksum(&read(&t, 0, BLOCK).await.unwrap()),
        checksum(&pattern(77, BLOCK))
    );
    let stats = t.stats();
    let want = format!("unix:{}", dir.path().join("b.sock").display());
    assert_eq!(stats.addr.as_deref(), Some(want.as_str()), "{stats:?}");
    assert_eq!((stats.tag, stats.reconnects, stats.failed), (4, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_tag_is_refused_at_hello_and_per_request() {
    let target = Arc::new(MemTarget::new(SIZE));
    let node = Node::start(&target, 10).await;
    let mut stale = node.endpoint("a");
    stale.tag = 9;
    let resolver = StaticResolver::new(stale);
    match RemoteTarget::connect("vol", resolver.clone(), config(Duration::from_secs(30))).await {
        Err(RemoteError::Refused { code, .. }) => assert_eq!(code, ErrorCode::StaleTag),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a stale tag was welcomed"),
    }
    resolver.set(Ok(node.endpoint("a")));
    let t = connect(&resolver, Duration::from_secs(30)).await;
    write(&t, 0, &pattern(1, BLOCK)).await.unwrap();
    // The node now holds the volume under a newer tag (the registry moved it on): the next
    // request carries a stale tag, is refused, and the client looks the owner up again.
    node.state.set_tag(11);
    resolver.set(Ok(node.endpoint("a")));
    write(&t, 4096, &pattern(2, BLOCK)).await.unwrap();
    assert_eq!(read(&t, 4096, BLOCK).await.unwrap(), pattern(2, BLOCK));
    let stats = t.stats();
    assert_eq!(stats.reconnects, 1);
    assert_eq!(stats.tag, 11);
    assert_eq!(stats.failed, 0);
}

/// A TCP proxy that flips one byte of the client → server stream of its first connection.
async fn corrupting_proxy(upstream: std::net::SocketAddr, at: usize) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let corrupted = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            let corrupt = !corrupted.swap(true, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut dr, mut dw) = down.split();
                let (mut ur, mut uw) = up.split();
                let to_server = async {
                    let mut seen = 0usize;
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match dr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if corrupt && seen <= at && at < seen + n {
                            buf[at - seen] ^= 0x01;
                        }
                        seen += n;
                        if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = uw.shutdown().await;
                };
                let to_client = async {
                    let _ = tokio::io::copy(&mut ur, &mut dw).await;
                    let _ = dw.shutdown().await;
                };
                tokio::select! {
                    () = to_server => {}
                    () = to_client => {}
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_frame_closes_the_connection_and_the_client_reconnects() {
    let target = Arc::new(MemTarget::new(SIZE));
    let node = Node::start(&target, 1).await;
    // Byte 1000 of the client's stream lies inside the first write's data block.
    let proxy = corrupting_proxy(node.addr, 1000).await;
    let mut endpoint = node.endpoint("a");
    endpoint.addr = proxy.to_string();
    let resolver = StaticResolver::new(endpoint);
    let t = connect(&resolver, Duration::from_secs(30)).await;
    for i in 0..8u64 {
        write(&t, i * BLOCK as u64, &pattern(i, BLOCK))
            .await
            .unwrap();
    }
    for i in 0..8u64 {
        assert_eq!(
            checksum(&target.contents(i * BLOCK as u64, BLOCK)),
            checksum(&pattern(i, BLOCK)),
            "block {i}"
        );
    }
    let stats = t.stats();
    assert_eq!(stats.reconnects, 1, "{stats:?}");
    assert!(stats.resubmitted >= 1, "{stats:?}");
    assert_eq!(stats.failed, 0);
}

/// The volume's allow list reaches the edge with the handshake, follows a change on the owner
/// while connected, and after a failover is the new owner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_comes_with_the_handshake_and_follows_changes_and_failover() {
    let target = Arc::new(MemTarget::new(SIZE));
    let a = Node::start(&target, 1).await;
    let alice = AllowList {
        subjects: vec!["alice".into()],
        networks: vec![],
    };
    a.state.set_access(alice.clone());
    let resolver = StaticResolver::new(a.endpoint("a"));
    let t = connect(&resolver, Duration::from_secs(30)).await;
    assert_eq!(t.access(), alice, "known as soon as connect returns");
    let nets = AllowList {
        subjects: vec![],
        networks: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/64".parse().unwrap()],
    };
    a.state.set_access(nets.clone());
    until("the pushed list", || t.access() == nets).await;
    write(&t, 0, &pattern(1, BLOCK)).await.unwrap();

    let b = Node::start(&target, 2).await;
    b.state.set_access(AllowList::default());
    resolver.set(Ok(b.endpoint("b")));
    drop(a);
    until("the new owner's list", || {
        t.access() == AllowList::default()
    })
    .await;
    assert_eq!(t.stats().owner.as_deref(), Some("b"));
    assert_eq!(read(&t, 0, BLOCK).await.unwrap(), pattern(1, BLOCK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_resends_inflight_writes_and_loses_nothing_acknowledged() {
    let (target, a, b, resolver, t) = a_and_b().await;
    let model = Arc::new(Mutex::new(HashMap::new()));
    qd32_load(&t, 30, &model).await;

    // Load running; hold acknowledgements so writes are surely in flight when A goes.
    let hold = target.hold_acks();
    let errors = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let t = t.clone();
        let model = model.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..20u64 {
                let block = 4096 + w * 8 + n % 8;
                let seed = 1_000_000 + (w << 16) + n;
                match write(&t, block * BLOCK as u64, &pattern(seed, BLOCK)).await {
                    Ok(()) => {
                        model.lock().unwrap().insert(block, seed);
                    }
                    Err(e) => {
                        eprintln!("write failed: {e}");
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    until("16 writes in flight", || t.stats().inflight >= 16).await;
    drop(a);
    until("the client notices", || {
        t.stats().state == ConnState::Reconnecting
    })
    .await;
    drop(hold);
    resolver.set(Ok(b.endpoint("b")));
    for task in tasks {
        within("writers", task).await.unwrap();
    }
    assert_eq!(errors.load(Ordering::SeqCst), 0, "the guest saw an error");
    verify(&target, &model.lock().unwrap());
    let stats = t.stats();
    assert_eq!(stats.state, ConnState::Connected);
    assert_eq!(stats.owner.as_deref(), Some("b"));
    assert_eq!(stats.tag, 2);
    assert_eq!(stats.reconnects, 1);
    assert!(stats.resubmitted >= 16, "{stats:?}");
    assert_eq!(stats.failed, 0);
    flush(&t).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_the_dtl_out_of_sync_fails_unacknowledged_writes_and_the_next_flush() {
    let (target, a, b, resolver, t) = a_and_b().await;
    a.state.set_dtl_in_sync(false);
    write(&t, 0, &pattern(1, BLOCK)).await.unwrap();
    assert!(!t.stats().dtl_in_sync);

    let hold = target.hold_acks();
    let pending: Vec<_> = (1..5u64)
        .map(|i| {
            t.write(i * BLOCK as u64, &pattern(i, BLOCK), false)
                .unwrap()
                .pending
                .unwrap()
        })
        .collect();
    until("4 writes in flight", || t.stats().inflight == 4).await;
    drop(a);
    // Released only once the client saw A go: A must not acknowledge them on its way down.
    until("the client notices", || {
        t.stats().state == ConnState::Reconnecting
    })
    .await;
    drop(hold);
    resolver.set(Ok(b.endpoint("b")));
    for p in pending {
        match within("failed write", p).await {
            Err(TargetError::Io(msg)) => assert!(msg.contains("DTL"), "{msg}"),
            other => panic!("an unacknowledged write survived a DTL out of sync: {other:?}"),
        }
    }
    until("reconnected", || t.stats().state == ConnState::Connected).await;
    // The guest learns that acknowledged data may be gone: its next flush fails, once.
    assert!(matches!(flush(&t).await, Err(TargetError::Io(_))));
    flush(&t).await.unwrap();
    write(&t, 0, &pattern(7, BLOCK)).await.unwrap();
    assert_eq!(read(&t, 0, BLOCK).await.unwrap(), pattern(7, BLOCK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_after_the_bound_then_succeed_once_an_owner_returns() {
    let bound = Duration::from_secs(1);
    let target = Arc::new(MemTarget::new(SIZE));
    let a = Node::start(&target, 1).await;
    let resolver = StaticResolver::new(a.endpoint("a"));
    let t = connect(&resolver, bound).await;
    write(&t, 0, &pattern(1, BLOCK)).await.unwrap();
    drop(a);
    resolver.set(Err("no node owns the volume".into()));
    // The node stops asynchronously: a request sent before its session closed would still be
    // served (and acknowledged), so wait for the client to see the connection go.
    until("the connection is lost", || {
        t.stats().state != ConnState::Connected
    })
    .await;
    let lost = Instant::now();
    let result = within("the bound", write(&t, 4096, &pattern(2, BLOCK))).await;
    assert!(matches!(result, Err(TargetError::Io(_))), "{result:?}");
    let waited = lost.elapsed();
    assert!(waited >= bound - Duration::from_millis(100), "{waited:?}");
    assert_eq!(t.stats().state, ConnState::Failed);
    // Fail fast now.
    let t0 = Instant::now();
    assert!(read(&t, 0, BLOCK).await.is_err());
    assert!(t0.elapsed() < Duration::from_millis(500));

    let c = Node::start(&target, 2).await;
    resolver.set(Ok(c.endpoint("c")));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(data) = read(&t, 0, BLOCK).await {
            assert_eq!(data, pattern(1, BLOCK));
            break;
        }
        assert!(Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.stats().state, ConnState::Connected);
    write(&t, 4096, &pattern(3, BLOCK)).await.unwrap();
    assert_eq!(read(&t, 4096, BLOCK).await.unwrap(), pattern(3, BLOCK));
}

/// A client of `vol` (block 0 written) whose owner died and that the resolver names no owner
/// for: its first attempt has failed, it watches the resolver and would back off for a minute
/// (so within a test's 10 s only a notice can bring it back).
async fn orphaned_with_a_slow_backoff(
    target: &Arc<MemTarget>,
) -> (Arc<StaticResolver>, Arc<RemoteTarget>) {
    let a = Node::start(target, 1).await;
    let resolver = StaticResolver::new(a.endpoint("a"));
    let backoff = Duration::from_secs(60);
    let config = RemoteConfig {
        backoff_min: backoff,
        backoff_max: backoff,
        ..config(Duration::from_secs(300))
    };
    let t = RemoteTarget::connect("vol", resolver.clone(), config)
        .await
        .expect("connect");
    write(&t, 0, &pattern(1, BLOCK)).await.unwrap();
    assert_eq!(resolver.watches(), 0, "no watch while connected");
    let calls = resolver.calls();
    resolver.set(Err("the owner of volume vol, node a, is not alive".into()));
    drop(a);
    until("a failed attempt and an open watch", || {
        resolver.calls() > calls && resolver.watches() == 1
    })
    .await;
    assert_ne!(t.stats().state, ConnState::Connected);
    (resolver, t)
}

/// Block 0 of an [`orphaned_with_a_slow_backoff`] client reads back, through node B, within
/// 10 s, after one reconnect and no failed request.
async fn reads_back_through_b(t: &RemoteTarget) {
    let data = within("the reconnect", read(t, 0, BLOCK)).await.unwrap();
    assert_eq!(data, pattern(1, BLOCK));
    let stats = t.stats();
    assert_eq!(stats.owner.as_deref(), Some("b"));
    assert_eq!((stats.reconnects, stats.failed), (1, 0), "{stats:?}");
}

/// While no owner can be found the client backs off between attempts, but a notice from the
/// resolver's watch (the registry naming a new owner) ends the pause at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_notice_ends_the_reconnect_pause_at_once() {
    let target = Arc::new(MemTarget::new(SIZE));
    let (resolver, t) = orphaned_with_a_slow_backoff(&target).await;
    let b = Node::start(&target, 2).await;
    resolver.set(Ok(b.endpoint("b")));
    reads_back_through_b(&t).await;
    // The episode's watch is closed once connected.
    until("the watch to close", || resolver.watches() == 0).await;
}

/// The registry names a new owner before that node has opened the volume. An edge that follows
/// the notice at once finds it still opening: its handshake waits there for the volume instead
/// of being refused (and backing off for a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_early_at_the_new_owner_waits_for_the_volume_to_open() {
    let target = Arc::new(MemTarget::new(SIZE));
    let (resolver, t) = orphaned_with_a_slow_backoff(&target).await;
    // B has taken the volume in the registry but is still opening it.
    let b = Node::start(&target, 2).await;
    assert!(b.exports.remove("vol"));
    b.exports.begin_opening("vol");
    resolver.set(Ok(b.endpoint("b")));
    until("the edge's handshake to wait at B", || {
        b.exports.opening_waits() == 1
    })
    .await;
    assert_ne!(t.stats().state, ConnState::Connected);
    b.exports.insert("vol", target.clone(), b.state.clone());
    b.exports.end_opening("vol");
    reads_back_through_b(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_through_nbd_on_a_remote_target() {
    let found = std::process::Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("VSTOR_SKIP_NBD_TOOLS").is_some(),
            "qemu-io is not installed (apt-get install qemu-utils), or set VSTOR_SKIP_NBD_TOOLS=1"
        );
        return;
    }
    let target = Arc::new(MemTarget::new(16 * MIB));
    let node = Node::start(&target, 3).await;
    let resolver = StaticResolver::new(node.endpoint("a"));
    let remote = connect(&resolver, Duration::from_secs(30)).await;
    let registry = Arc::new(MemRegistry::new());
    registry.insert("vol", remote.clone());
    let nbd = TestServer::start(registry).await;
    let uri = format!("nbd://{}/vol", nbd.addr);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                &uri,
                "-c",
                "write -P 0xab 0 64k",
                "-c",
                "write -P 0xcd 1m 1m",
                "-c",
                "write -z 2m 128k",
                "-c",
                "write -P 0xee 3m 64k",
                "-c",
                "discard 3m 64k",
                "-c",
                "flush",
                "-c",
                "read -P 0xab 0 64k",
                "-c",
                "read -P 0xcd 1m 1m",
                "-c",
                "read -P 0 2m 128k",
                "-c",
                "read -P 0 3m 64k",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("qemu-io in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("fail") && !stdout.contains("error"),
        "qemu-io: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The owner's target holds the data (checksums against what qemu-io wrote).
    assert_eq!(
        checksum(&target.contents(0, 65536)),
        checksum(&[0xab; 65536])
    );
    assert_eq!(
        checksum(&target.contents(MIB, MIB as usize)),
        checksum(&vec![0xcd; MIB as usize])
    );
    assert!(target.flushes() >= 1);
    assert!(remote.stats().completed >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_or_fenced_volume_is_followed_to_its_new_owner() {
    let target = Arc::new(MemTarget::new(SIZE));
    let a = Node::start(&target, 1).await;
    let b = Node::start(&target, 2).await;
    let c = Node::start(&target, 3).await;
    let resolver = StaticResolver::new(a.endpoint("a"));
    let t = connect(&resolver, Duration::from_secs(30)).await;
    write(&t, 0, &pattern(1, BLOCK)).await.unwrap();
    // A move: A still runs but no longer serves the volume (NotOwner per request).
    a.state.set_alive(false);
    resolver.set(Ok(b.endpoint("b")));
    write(&t, 4096, &pattern(2, BLOCK)).await.unwrap();
    assert_eq!(t.stats().owner.as_deref(), Some("b"));
    // A fence: B fenced the volume (lease lost); C took it over.
    b.state.set_fenced(Some("lease lost"));
    resolver.set(Ok(c.endpoint("c")));
    write(&t, 8192, &pattern(3, BLOCK)).await.unwrap();
    let stats = t.stats();
    assert_eq!(stats.owner.as_deref(), Some("c"));
    assert_eq!((stats.reconnects, stats.failed), (2, 0), "{stats:?}");
    for i in 0..3u64 {
        assert_eq!(
            read(&t, i * 4096, BLOCK).await.unwrap(),
            pattern(i + 1, BLOCK)
        );
    }
}

/// A move while the DTL is out of sync: the old owner refuses new requests (`NotOwner`) but
/// still answers those it accepted; the client drains the connection, so every write either
/// completed there or was refused unexecuted and is resent: none fails, none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_with_the_dtl_out_of_sync_fails_no_write() {
    let (target, a, b, resolver, t) = a_and_b().await;
    a.state.set_dtl_in_sync(false);
    write(&t, 0, &pattern(1, BLOCK)).await.unwrap();
    let hold = target.hold_acks();
    let mut pending: Vec<_> = (1..5u64)
        .map(|i| {
            t.write(i * BLOCK as u64, &pattern(i + 1, BLOCK), false)
                .unwrap()
                .pending
                .unwrap()
        })
        .collect();
    until("4 writes in flight", || t.stats().inflight == 4).await;
    // The volume moves: A stops serving it; new requests get NotOwner.
    a.state.set_alive(false);
    resolver.set(Ok(b.endpoint("b")));
    pending.push(
        t.write(5 * BLOCK as u64, &pattern(6, BLOCK), false)
            .unwrap()
            .pending
            .unwrap(),
    );
    // The refused write does not fail the ones A still owes answers for.
    until("five in flight", || t.stats().inflight == 5).await;
    drop(hold);
    for p in pending {
        within("write across the move", p).await.unwrap();
    }
    let stats = t.stats();
    assert_eq!(stats.owner.as_deref(), Some("b"), "{stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    blocks_read_back(&t, 6).await;
}

/// Blocks `0..count` read back as `pattern(block + 1)`.
async fn blocks_read_back(t: &RemoteTarget, count: u64) {
    for i in 0..count {
        assert_eq!(
            read(t, i * BLOCK as u64, BLOCK).await.unwrap(),
            pattern(i + 1, BLOCK),
            "block {i}"
        );
    }
}

/// A move of a volume whose DTL is out of sync, as a node does it: while the release runs
/// (`Handoff::Releasing`) the old owner holds new requests back; once it succeeded it refuses
/// them with `Released`, which tells the edge that everything acknowledged is on the backend.
/// So the guest's next flush does not fail (after a bare `NotOwner` it would: the edge could not
/// tell a clean hand-off from a fence), and no write fails or is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_hand_off_keeps_the_next_flush_without_an_in_sync_dtl() {
    let (_target, a, b, resolver, t) = a_and_b().await;
    a.state.set_dtl_in_sync(false);
    write(&t, 0, &pattern(1, BLOCK)).await.unwrap();
    // The release begins: A serves the volume no more, and its answer waits for the outcome.
    a.state.set_handoff(Handoff::Releasing);
    a.state.set_alive(false);
    let held = t
        .write(BLOCK as u64, &pattern(2, BLOCK), false)
        .unwrap()
        .pending
        .unwrap();
    until("A looks at the hand-off", || a.state.handoff_checks() > 0).await;
    let stats = t.stats();
    assert_eq!(
        (stats.state, stats.inflight, stats.reconnects),
        (ConnState::Connected, 1, 0),
        "held, not refused: {stats:?}"
    );
    // Done: everything on the backend (here, the shared target); B serves it.
    resolver.set(Ok(b.endpoint("b")));
    a.state.set_handoff(Handoff::Released);
    within("the held write, on B", held).await.unwrap();
    let stats = t.stats();
    assert_eq!(stats.owner.as_deref(), Some("b"), "{stats:?}");
    assert_eq!((stats.reconnects, stats.failed), (1, 0), "{stats:?}");
    flush(&t).await.expect("nothing acknowledged was at risk");
    blocks_read_back(&t, 2).await;
}

/// A hand-off that fails (the release could not get the data to the backend in time): the old
/// owner serves the volume again, and the requests it held back run there; the edge never left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_held_by_a_failed_hand_off_run_where_they_were() {
    let target = Arc::new(MemTarget::new(SIZE));
    let a = Node::start(&target, 1).await;
    let resolver = StaticResolver::new(a.endpoint("a"));
    let t = connect(&resolver, Duration::from_secs(30)).await;
    a.state.set_handoff(Handoff::Releasing);
    a.state.set_alive(false);
    let held = t
        .write(0, &pattern(3, BLOCK), false)
        .unwrap()
        .pending
        .unwrap();
    let reading = t.read_async(BLOCK as u64, BLOCK).unwrap();
    until("A looks at the hand-off", || a.state.handoff_checks() > 0).await;
    assert!(target.ops().is_empty(), "nothing ran while held");
    a.state.set_alive(true);
    a.state.set_handoff(Handoff::None);
    within("the held write", held).await.unwrap();
    assert_eq!(
        within("the held read", reading).await.unwrap().to_vec(),
        vec![0u8; BLOCK]
    );
    let stats = t.stats();
    assert_eq!((stats.reconnects, stats.failed), (0, 0), "{stats:?}");
    assert_eq!(target.contents(0, BLOCK), pattern(3, BLOCK));
    flush(&t).await.unwrap();
}

/// The race a move opens: a write passes the owner check, then the volume refuses it because
/// the release began. It was not acknowledged, so it is held and then refused like any request
/// that came later, and the edge resends it to the new owner: the guest sees no error. Inline
/// writes and FUA writes (which run on the blocking pool and fail in a completion) alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_volume_refuses_as_a_hand_off_begins_is_resent_not_failed() {
    for fua in [false, true] {
        let target = Arc::new(MemTarget::new(SIZE));
        let a = Node::start(&target, 1).await;
        let state = a.state.clone();
        target.refuse_next_write(move || {
            state.set_handoff(Handoff::Releasing);
            state.set_alive(false);
        });
        let b = Node::start(&target, 2).await;
        let resolver = StaticResolver::new(a.endpoint("a"));
        let t = connect(&resolver, Duration::from_secs(30)).await;
        let refused = t
            .write(0, &pattern(4, BLOCK), fua)
            .unwrap()
            .pending
            .unwrap();
        until("A looks at the hand-off", || a.state.handoff_checks() > 0).await;
        resolver.set(Ok(b.endpoint("b")));
        a.state.set_handoff(Handoff::Released);
        within("the write, on B", refused).await.unwrap();
        let stats = t.stats();
        assert_eq!(stats.owner.as_deref(), Some("b"), "fua {fua}: {stats:?}");
        assert_eq!(stats.failed, 0, "fua {fua}: {stats:?}");
        assert_eq!(target.contents(0, BLOCK), pattern(4, BLOCK), "fua {fua}");
    }
}

/// A node that stops after handing the volume over cleanly (what a clean stop does) tells an
/// idle edge so before it closes (`Released` with id 0), so the close is not taken for a crash:
/// the guest's next flush works although the DTL was out of sync. A node that stops without
/// having handed the volume over closes as before, and that flush fails once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_owner_that_handed_the_volume_over_says_so_before_it_closes() {
    for handed_over in [true, false] {
        let (_target, a, b, resolver, t) = a_and_b().await;
        a.state.set_dtl_in_sync(false);
        write(&t, 0, &pattern(1, BLOCK)).await.unwrap();
        if handed_over {
            a.state.set_handoff(Handoff::Released);
            a.state.set_alive(false);
        }
        resolver.set(Ok(b.endpoint("b")));
        drop(a);
        until("connected to B", || {
            let stats = t.stats();
            stats.owner.as_deref() == Some("b") && stats.state == ConnState::Connected
        })
        .await;
        let flushed = flush(&t).await;
        assert_eq!(
            flushed.is_ok(),
            handed_over,
            "handed over {handed_over}: {flushed:?}"
        );
        blocks_read_back(&t, 1).await;
    }
}

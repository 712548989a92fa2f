//! Reads of data that left the write buffer wait for the backend off the frontend's hot path: the
//! real engine (`VolumeManager`, evicted SCOs, a snapshot) behind the real NBD and vhost-user-blk
//! servers and the binary's own export glue, over a backend whose ranged reads take 50 ms (the
//! engine tests' `FaultStore`, slowed down). The vhost-user client is libblkio's driver.
//!
//! Why here: the root crate is the only one that depends on both the engine and the frontends,
//! and the glue between them (`src/export.rs`) belongs to the binary, which has no library
//! target; it is compiled into this test by path, so the test runs exactly the code `vstor serve`
//! runs. The daemon itself cannot be used: its backend cannot be slowed down from outside.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;
#[allow(dead_code)]
#[path = "../src/export.rs"]
mod export;
#[path = "../volumedriver/tests/common/mod.rs"]
mod store;

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::NbdClient;
use store::FaultStore;
use vstor_edge::vhost::{VhostConfig, VhostServer};
use vstor_edge::{ExportRegistry, NbdServer, NbdServerConfig};
use vstor_volumedriver::{ManagerConfig, Volume, VolumeManager, VolumeOptions};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// What one backend round trip costs here.
const BACKEND_DELAY: Duration = Duration::from_millis(50);
/// Evicted data: only on the backend.
const COLD: u64 = 0;
const COLD_LEN: u64 = 2 * MIB;
/// Written after the eviction: in the write buffer.
const HOT: u64 = 8 * MIB;
const HOT_LEN: u64 = 256 * KIB;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
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

fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// A node: volume manager, NBD server on loopback, and the slow backend. Dropping it shuts the
/// server, the uploaders and the runtime down.
struct Node {
    store: Arc<FaultStore>,
    manager: Arc<VolumeManager>,
    exports: Arc<export::Exports>,
    server: NbdServer,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    _tmp: tempfile::TempDir,
}

impl Node {
    fn start() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Two workers, like `vstor serve` on this two-core machine.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let store = Arc::new(FaultStore::open(&tmp.path().join("backend")));
        let mut config = ManagerConfig::under(tmp.path(), 1 << 40);
        config.runtime = Some(runtime.handle().clone());
        let manager = VolumeManager::open(config, store.clone()).expect("volume manager");
        let exports = Arc::new(export::Exports::new(manager.clone()));
        let server = NbdServer::new(exports.clone(), NbdServerConfig::default());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let serving = server.clone();
        runtime.spawn(async move { serving.serve(listener).await });
        Self {
            store,
            manager,
            exports,
            server,
            addr,
            runtime: Some(runtime),
            _tmp: tmp,
        }
    }

    fn create(&self, name: &str) -> Arc<Volume> {
        let mut options = VolumeOptions::new(16 * MIB);
        options.sco_size = 256 * KIB;
        self.manager.create(name, &options).expect("create volume")
    }

    fn connect(&self, export: &str) -> NbdClient {
        NbdClient::connect(&self.addr.to_string(), export).expect("NBD connect")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            let server = self.server.clone();
            let _ = runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await
            });
            self.manager.shutdown(Duration::from_secs(5));
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// Volume `slow`: `COLD` written, snapshot `snap` taken, uploaded and evicted; then `HOT`
/// written (write buffer only). Volume `other`: `HOT` written. From then on every ranged read of
/// `slow`'s objects takes `BACKEND_DELAY`.
fn setup(node: &Node) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let cold = pattern(1, COLD_LEN as usize);
    let hot = pattern(2, HOT_LEN as usize);
    let other = pattern(3, HOT_LEN as usize);
    let slow = node.create("slow");
    slow.write(COLD, &cold, false).expect("write cold data");
    slow.snapshot_create("snap").expect("snapshot");
    slow.flush().expect("flush");
    slow.close_current_tlog().expect("close tlog");
    let deadline = Instant::now() + Duration::from_secs(30);
    assert!(slow.wait_for_uploads(deadline), "uploads did not finish");
    assert!(slow.wait_snapshot_in_backend("snap", deadline).unwrap());
    assert!(slow.evict(u64::MAX) >= COLD_LEN, "cold data evicted");
    slow.write(HOT, &hot, false).expect("write hot data");
    node.create("other")
        .write(HOT, &other, false)
        .expect("write other volume");
    let namespace = slow.info().namespace;
    node.store
        .delay_reads(BACKEND_DELAY, move |ns, _| ns == namespace);
    (cold, hot, other)
}

/// Poll until `cond` holds or 10 s pass.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// QD1 reads of 4 KiB spread over `[base, base + HOT_LEN)` for at least `span` (so that several
/// backend round trips overlap them) and at least 300 of them, each checked against `want`;
/// returns the latencies, sorted.
fn timed_reads(client: &mut NbdClient, base: u64, want: &[u8], span: Duration) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut buf = vec![0u8; 4096];
    let started = Instant::now();
    for i in 0.. {
        if i >= 300 && started.elapsed() >= span {
            break;
        }
        let at = (i as u64 * 7 % (HOT_LEN / 4096)) * 4096;
        let started = Instant::now();
        assert_eq!(client.read(base + at, &mut buf).expect("read"), 0);
        latencies.push(started.elapsed());
        let at = at as usize;
        assert_eq!(
            crc(&buf),
            crc(&want[at..at + 4096]),
            "data at {}",
            base + at as u64
        );
    }
    latencies.sort();
    latencies
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99).div_ceil(100) - 1]
}

#[test]
fn write_buffer_reads_keep_their_latency_while_backend_reads_wait() {
    let node = Node::start();
    let (cold, hot, other) = setup(&node);
    let cold = Arc::new(cold);

    // More clients reading evicted data than the runtime has workers: inline backend reads
    // would occupy every worker.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3u64)
        .map(|r| {
            let mut client = node.connect("slow");
            let (stop, cold) = (stop.clone(), cold.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::SeqCst) {
                    let at = ((r * 11 + reads * 5) % (COLD_LEN / (64 * KIB))) * 64 * KIB;
                    assert_eq!(client.read(COLD + at, &mut buf).expect("cold read"), 0);
                    let at = at as usize;
                    assert_eq!(crc(&buf), crc(&cold[at..at + buf.len()]), "cold data");
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    wait_until("three backend reads are waiting", || {
        node.store.delayed_reads() >= 3
    });

    let before = node.store.delayed_reads();
    let mut same = node.connect("slow");
    let span = 20 * BACKEND_DELAY;
    let same_volume = timed_reads(&mut same, HOT, &hot, span);
    let mut elsewhere = node.connect("other");
    let other_volume = timed_reads(&mut elsewhere, HOT, &other, span);
    let during = node.store.delayed_reads() - before;

    stop.store(true, Ordering::SeqCst);
    let cold_reads: Vec<u64> = readers
        .into_iter()
        .map(|r| r.join().expect("cold reader"))
        .collect();
    eprintln!(
        "same volume: {} reads, p50 {:?} p99 {:?} max {:?}; other volume: {} reads, p50 {:?} \
         p99 {:?} max {:?}; backend reads meanwhile {during}; cold reads per client {cold_reads:?}",
        same_volume.len(),
        same_volume[same_volume.len() / 2],
        p99(&same_volume),
        same_volume.last().expect("reads"),
        other_volume.len(),
        other_volume[other_volume.len() / 2],
        p99(&other_volume),
        other_volume.last().expect("reads"),
    );
    assert!(during >= 40, "backend reads kept going while measuring");
    assert!(cold_reads.iter().all(|&n| n > 0));
    assert!(
        p99(&same_volume) < Duration::from_millis(5),
        "same volume p99 {:?}",
        p99(&same_volume)
    );
    assert!(
        p99(&other_volume) < Duration::from_millis(5),
        "other volume p99 {:?}",
        p99(&other_volume)
    );
}

/// On one connection, reads pipelined behind a read of evicted data are answered before it; the
/// same for the snapshot export `slow@snap`, whose data is all on the backend.
#[test]
fn pipelined_reads_overtake_a_backend_read_on_the_same_connection() {
    let node = Node::start();
    let (cold, hot, _) = setup(&node);

    for (export, fast_at, fast_want) in [
        ("slow", HOT, hot[..4096].to_vec()),
        // Never written in the snapshot: zeros, without the backend.
        ("slow@snap", HOT, vec![0u8; 4096]),
    ] {
        let mut client = node.connect(export);
        let before = node.store.delayed_reads();
        let started = Instant::now();
        client
            .send_read(1, COLD + 64 * KIB, 64 * 1024)
            .expect("send");
        for cookie in 2..=11 {
            client.send_read(cookie, fast_at, 4096).expect("send");
        }
        let len_of = |cookie| if cookie == 1 { 64 * 1024 } else { 4096 };
        for expected in 2..=11 {
            let (cookie, error, data) = client.reply(len_of).expect("reply");
            assert_eq!((cookie, error), (expected, 0), "{export}: fast reads first");
            assert_eq!(crc(&data), crc(&fast_want), "{export}: fast data");
        }
        assert!(
            started.elapsed() < BACKEND_DELAY,
            "{export}: fast reads waited {:?}",
            started.elapsed()
        );
        let (cookie, error, data) = client.reply(len_of).expect("reply");
        assert_eq!((cookie, error), (1, 0), "{export}: the backend read");
        let want = &cold[64 * 1024..128 * 1024];
        assert_eq!(crc(&data), crc(want), "{export}: backend data");
        assert!(started.elapsed() >= BACKEND_DELAY);
        assert!(
            node.store.delayed_reads() > before,
            "{export}: went to the backend"
        );
    }
}

/// A vhost-user-blk server for the node's exports, dropped (shut down) before the node.
struct Vhost {
    server: VhostServer,
    _dir: tempfile::TempDir,
}

impl Vhost {
    fn start(node: &Node) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry: Arc<dyn ExportRegistry> = node.exports.clone();
        let server = VhostServer::new(
            registry,
            dir.path().join("sockets"),
            VhostConfig::default(),
            node.runtime.as_ref().expect("runtime").handle().clone(),
        )
        .expect("vhost server");
        Self { server, _dir: dir }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

/// On one virtqueue, reads submitted behind a read of evicted data complete before it, and
/// every buffer holds the right data (the volume and its snapshot).
#[test]
fn vhost_reads_overtake_a_backend_read_on_the_same_queue() {
    let node = Node::start();
    let (cold, hot, _) = setup(&node);
    let vhost = Vhost::start(&node);

    for (export, fast_want) in [
        ("slow", hot[..4096].to_vec()),
        ("slow@snap", vec![0u8; 4096]),
    ] {
        let path = vhost.server.add_export(export).expect("add export");
        let mut blkio = blkio::Blkio::new("virtio-blk-vhost-user").expect("blkio");
        blkio
            .set_str("path", path.to_str().expect("utf-8 path"))
            .expect("path");
        if export.contains('@') {
            blkio.set_bool("read-only", true).expect("read-only");
        }
        blkio.connect().expect("connect");
        blkio.set_i32("num-queues", 1).expect("num-queues");
        let mut queues = blkio.start().expect("start").queues;
        let region = blkio.alloc_mem_region(MIB as usize).expect("region");
        blkio.map_mem_region(&region).expect("map region");
        let buf = |off: usize| (region.addr + off) as *mut u8;
        let contents = |off: usize, len: usize| {
            let mut out = vec![0u8; len];
            // SAFETY: inside the mapped region; no request is using it any more.
            unsafe { std::ptr::copy_nonoverlapping(buf(off), out.as_mut_ptr(), len) };
            out
        };

        let q = &mut queues[0];
        let before = node.store.delayed_reads();
        let started = Instant::now();
        q.read(
            COLD + 64 * KIB,
            buf(0),
            64 * 1024,
            1,
            blkio::ReqFlags::empty(),
        );
        for i in 2..=11usize {
            let at = 64 * 1024 + i * 4096;
            q.read(HOT, buf(at), 4096, i, blkio::ReqFlags::empty());
        }
        let mut order = Vec::new();
        let mut one = [MaybeUninit::<blkio::Completion>::uninit()];
        while order.len() < 11 {
            if q.do_io(&mut one, 1, None, None).expect("do_io") == 1 {
                // SAFETY: do_io initialised the first entry.
                let c = unsafe { one[0].assume_init_read() };
                assert_eq!(c.ret, 0, "{export}: request {} failed", c.user_data);
                order.push(c.user_data);
                if order.len() == 10 {
                    assert!(
                        started.elapsed() < BACKEND_DELAY,
                        "{export}: fast reads waited {:?}",
                        started.elapsed()
                    );
                }
            }
        }
        assert_eq!(order[10], 1, "{export}: the backend read completes last");
        for i in 2..=11usize {
            let got = contents(64 * 1024 + i * 4096, 4096);
            assert_eq!(crc(&got), crc(&fast_want), "{export}: fast data");
        }
        let want = &cold[64 * 1024..128 * 1024];
        assert_eq!(
            crc(&contents(0, 64 * 1024)),
            crc(want),
            "{export}: backend data"
        );
        assert!(
            node.store.delayed_reads() > before,
            "{export}: went to the backend"
        );
        drop(queues);
        drop(blkio);
        vhost.server.remove_export(export);
    }
}

/// `clients` threads asking `node` for the view of `slow@snap` at once: what each got.
fn views_at_once(
    node: &Node,
    clients: usize,
) -> Vec<Result<Arc<vstor_volumedriver::SnapshotView>, String>> {
    let start = Arc::new(std::sync::Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (exports, start) = (node.exports.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                exports
                    .snapshot_view("slow", "snap")
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Clients that ask for a snapshot view while it is being built (from its TLogs on a backend
/// whose every get is a round trip) wait for that build and get the same view: four at once
/// cost the backend what one build costs, not four times that. A build that fails fails them
/// all, with its reason, and the next client builds afresh.
#[test]
fn clients_asking_for_a_view_being_built_share_that_build() {
    let node = Node::start();
    setup(&node);
    let gets = Arc::new(AtomicUsize::new(0));
    let counted = gets.clone();
    node.store.on_call(Some(Arc::new(move |op: &str| {
        if op == "get" {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(BACKEND_DELAY); // the round trip each get costs
        }
    })));

    // The backend cannot give the TLogs back: one attempt, four failures that say why.
    node.store.set_unreadable(true);
    let failed = views_at_once(&node, 4);
    node.store.set_unreadable(false);
    assert_eq!(
        gets.swap(0, Ordering::SeqCst),
        1,
        "one attempt for four clients"
    );
    for outcome in &failed {
        let err = outcome.as_ref().err().expect("no view without its TLogs");
        assert!(err.contains("fragments reachable"), "{err}");
    }

    let views: Vec<_> = views_at_once(&node, 4)
        .into_iter()
        .map(|v| v.expect("snapshot view"))
        .collect();
    let together = gets.load(Ordering::SeqCst);
    assert!(views.iter().all(|v| Arc::ptr_eq(v, &views[0])), "one view");

    // One client alone, for comparison.
    node.exports.forget("slow", Some("snap"));
    drop(views);
    let before = gets.load(Ordering::SeqCst);
    node.exports
        .snapshot_view("slow", "snap")
        .expect("snapshot view");
    let alone = gets.load(Ordering::SeqCst) - before;
    node.store.on_call(None);
    assert!(alone > 0, "the build read nothing from the backend");
    assert_eq!(
        together, alone,
        "four clients cost {together} gets, one {alone}"
    );
}

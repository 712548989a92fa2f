//! The vhost-user-blk server driven end to end by a real virtio-blk driver: libblkio's
//! `virtio-blk-vhost-user` driver (pure Rust), in this process, over the export's UNIX socket.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common;

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};
use common::{checksum, pattern, wait_all};
use vstor_edge::testing::{MemRegistry, MemTarget, Op};
use vstor_edge::vhost::{VhostConfig, VhostError, VhostServer};
use vstor_edge::BlockTarget;

const MIB: u64 = 1 << 20;
const DEV_SIZE: u64 = 16 * MIB;

struct Fixture {
    server: VhostServer,
    registry: Arc<MemRegistry>,
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

impl Fixture {
    fn new(config: VhostConfig) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let registry = Arc::new(MemRegistry::new());
        let dir = tempfile::tempdir().unwrap();
        let server = VhostServer::new(
            Arc::clone(&registry) as _,
            dir.path().join("sockets"),
            config,
            rt.handle().clone(),
        )
        .unwrap();
        Self {
            server,
            registry,
            dir,
            _rt: rt,
        }
    }

    /// A server exporting one writable 16 MiB volume called `vol`.
    fn with_volume() -> (Self, Arc<MemTarget>) {
        let f = Self::new(VhostConfig::default());
        let target = f.add("vol", MemTarget::new(DEV_SIZE));
        (f, target)
    }

    fn add(&self, name: &str, target: MemTarget) -> Arc<MemTarget> {
        let target = Arc::new(target);
        self.registry
            .insert(name, Arc::clone(&target) as Arc<dyn BlockTarget>);
        let path = self.server.add_export(name).unwrap();
        assert_eq!(path, self.server.socket_path(name));
        target
    }
}

/// Poll `cond` until it holds (state changes made by the server's export threads).
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A connected libblkio instance with one buffer region shared with the device.
struct Client {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
}

fn try_connect(path: &Path, num_queues: i32, read_only: bool) -> Result<Client, blkio::Error> {
    try_connect_sized(path, num_queues, read_only, 256)
}

fn try_connect_sized(
    path: &Path,
    num_queues: i32,
    read_only: bool,
    queue_size: i32,
) -> Result<Client, blkio::Error> {
    let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
    blkio.set_str("path", path.to_str().unwrap())?;
    if read_only {
        blkio.set_bool("read-only", true)?;
    }
    blkio.connect()?;
    blkio.set_i32("num-queues", num_queues)?;
    blkio.set_i32("queue-size", queue_size)?;
    let queues = blkio.start()?.queues;
    let region = blkio.alloc_mem_region(8 * MIB as usize)?;
    blkio.map_mem_region(&region)?;
    Ok(Client {
        queues,
        region,
        blkio,
    })
}

fn connect(path: &Path, num_queues: i32) -> Client {
    try_connect(path, num_queues, false).unwrap()
}

impl Client {
    /// Buffer `[off, off + len)` of the shared region.
    fn buf(&self, off: usize, len: usize) -> *mut u8 {
        assert!(off + len <= self.region.len);
        (self.region.addr + off) as *mut u8
    }

    fn fill(&self, off: usize, data: &[u8]) {
        // SAFETY: the range is inside our mapped region and no request uses it concurrently.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf(off, data.len()), data.len());
        }
    }

    fn contents(&self, off: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        // SAFETY: as in `fill`.
        unsafe { std::ptr::copy_nonoverlapping(self.buf(off, len), out.as_mut_ptr(), len) }
        out
    }

    fn write(&mut self, offset: u64, buf_off: usize, len: usize) -> i32 {
        let buf = self.buf(buf_off, len);
        run_one(&mut self.queues[0], |q| {
            q.write(offset, buf, len, 0, ReqFlags::empty());
        })
    }

    fn read(&mut self, offset: u64, buf_off: usize, len: usize) -> i32 {
        let buf = self.buf(buf_off, len);
        run_one(&mut self.queues[0], |q| {
            q.read(offset, buf, len, 0, ReqFlags::empty());
        })
    }

    fn write_data(&mut self, offset: u64, data: &[u8]) {
        self.fill(0, data);
        assert_eq!(self.write(offset, 0, data.len()), 0, "write at {offset}");
    }

    fn read_data(&mut self, offset: u64, len: usize) -> Vec<u8> {
        assert_eq!(self.read(offset, 0, len), 0, "read at {offset}");
        self.contents(0, len)
    }
}

/// Submit one request on `q` and wait for its completion; returns its `ret` (0 or -errno).
fn run_one(q: &mut Blkioq, submit: impl FnOnce(&mut Blkioq)) -> i32 {
    submit(q);
    let rets = wait_all(q, 1);
    rets[0].1
}

#[test]
fn write_read_and_flush_on_one_queue() {
    let (f, target) = Fixture::with_volume();
    let mut c = connect(&f.server.socket_path("vol"), 1);
    assert_eq!(c.blkio.get_u64("capacity").unwrap(), DEV_SIZE);
    assert_eq!(c.blkio.get_i32("max-queues").unwrap(), 4);

    let mut written = Vec::new();
    for (i, (offset, len)) in [
        (0u64, 4096usize),
        (MIB + 512, 65536),
        (DEV_SIZE - 8192, 8192),
        (3 * MIB, 1 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(i as u64 + 1, len);
        c.write_data(offset, &data);
        written.push((offset, data));
    }
    for (offset, data) in &written {
        let back = c.read_data(*offset, data.len());
        assert_eq!(checksum(&back), checksum(data), "read back at {offset}");
        assert_eq!(target.contents(*offset, data.len()), *data);
    }
    // Never written: zeros.
    assert_eq!(c.read_data(8 * MIB, 4096), vec![0; 4096]);

    let before = target.flushes();
    assert_eq!(
        run_one(&mut c.queues[0], |q| q.flush(0, ReqFlags::empty())),
        0
    );
    assert_eq!(target.flushes(), before + 1);
    // FUA writes are emulated by libblkio as write + flush.
    c.fill(0, &pattern(9, 4096));
    let buf = c.buf(0, 4096);
    assert_eq!(
        run_one(&mut c.queues[0], |q| q.write(
            0,
            buf,
            4096,
            0,
            ReqFlags::FUA
        )),
        0
    );
    assert_eq!(target.flushes(), before + 2);
}

#[test]
fn several_queues_in_parallel() {
    const QUEUES: usize = 4;
    const PER_QUEUE: u64 = 2 * MIB;
    const BLOCK: usize = 64 * 1024;
    const DEPTH: usize = 8;
    let (f, target) = Fixture::with_volume();
    let mut c = connect(&f.server.socket_path("vol"), QUEUES as i32);
    assert_eq!(c.queues.len(), QUEUES);
    let base = c.region.addr;
    let queues = std::mem::take(&mut c.queues);

    std::thread::scope(|s| {
        for (qi, mut q) in queues.into_iter().enumerate() {
            s.spawn(move || {
                // Each queue owns 2 MiB of the buffer region and of the device.
                let buf = base + qi * PER_QUEUE as usize;
                let dev = qi as u64 * PER_QUEUE;
                let data = pattern(100 + qi as u64, PER_QUEUE as usize);
                // SAFETY: this thread's own part of the mapped region.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf as *mut u8, data.len()) };
                let blocks = PER_QUEUE as usize / BLOCK;
                for batch in (0..blocks).collect::<Vec<_>>().chunks(DEPTH) {
                    for &b in batch {
                        let p = (buf + b * BLOCK) as *const u8;
                        q.write(dev + (b * BLOCK) as u64, p, BLOCK, b, ReqFlags::empty());
                    }
                    for (b, ret) in wait_all(&mut q, batch.len()) {
                        assert_eq!(ret, 0, "queue {qi} write of block {b}");
                    }
                }
                // SAFETY: as above.
                unsafe { std::ptr::write_bytes(buf as *mut u8, 0, PER_QUEUE as usize) };
                for batch in (0..blocks).collect::<Vec<_>>().chunks(DEPTH) {
                    for &b in batch {
                        let p = (buf + b * BLOCK) as *mut u8;
                        q.read(dev + (b * BLOCK) as u64, p, BLOCK, b, ReqFlags::empty());
                    }
                    for (b, ret) in wait_all(&mut q, batch.len()) {
                        assert_eq!(ret, 0, "queue {qi} read of block {b}");
                    }
                }
                let mut back = vec![0u8; PER_QUEUE as usize];
                // SAFETY: as above; all reads have completed.
                unsafe {
                    std::ptr::copy_nonoverlapping(buf as *const u8, back.as_mut_ptr(), back.len());
                };
                assert_eq!(checksum(&back), checksum(&data), "queue {qi}");
            });
        }
    });
    for qi in 0..QUEUES as u64 {
        let data = pattern(100 + qi, PER_QUEUE as usize);
        assert_eq!(target.contents(qi * PER_QUEUE, PER_QUEUE as usize), data);
    }
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let (f, target) = Fixture::with_volume();
    let mut c = connect(&f.server.socket_path("vol"), 1);
    let data = pattern(5, 64 * 1024);
    c.write_data(0, &data);
    target.clear_ops();

    assert_eq!(
        run_one(&mut c.queues[0], |q| q.discard(
            0,
            8192,
            0,
            ReqFlags::empty()
        )),
        0
    );
    assert_eq!(
        run_one(&mut c.queues[0], |q| q.write_zeroes(
            8192,
            8192,
            0,
            ReqFlags::empty()
        )),
        0
    );
    assert_eq!(
        run_one(&mut c.queues[0], |q| q.write_zeroes(
            16384,
            4096,
            0,
            ReqFlags::NO_UNMAP
        )),
        0
    );
    assert_eq!(
        target.ops(),
        [
            Op::Discard {
                offset: 0,
                len: 8192
            },
            Op::WriteZeroes {
                offset: 8192,
                len: 8192,
                allocate: false,
                fua: false
            },
            Op::WriteZeroes {
                offset: 16384,
                len: 4096,
                allocate: true,
                fua: false
            },
        ]
    );
    let back = c.read_data(0, data.len());
    assert_eq!(back[..20480], vec![0; 20480]);
    assert_eq!(back[20480..], data[20480..]);
    assert_eq!(
        target.allocation()[..6],
        [false, false, false, false, true, true]
    );
}

#[test]
fn out_of_range_requests_fail_and_the_device_keeps_working() {
    let (f, target) = Fixture::with_volume();
    let mut c = connect(&f.server.socket_path("vol"), 1);
    c.write_data(DEV_SIZE - 4096, &pattern(3, 4096));
    target.clear_ops();

    assert!(c.read(DEV_SIZE, 0, 4096) < 0, "read past the end");
    assert!(c.read(DEV_SIZE - 512, 0, 1024) < 0, "read crossing the end");
    assert!(
        c.write(DEV_SIZE - 4096, 0, 8192) < 0,
        "write crossing the end"
    );
    assert!(
        run_one(&mut c.queues[0], |q| q.discard(
            DEV_SIZE,
            4096,
            0,
            ReqFlags::empty()
        )) < 0,
        "discard past the end"
    );
    assert_eq!(target.ops(), [], "rejected before reaching the target");

    assert_eq!(c.read_data(DEV_SIZE - 4096, 4096), pattern(3, 4096));
}

#[test]
fn read_only_volume() {
    let f = Fixture::new(VhostConfig::default());
    let target = MemTarget::new_read_only(DEV_SIZE);
    target.preload(0, &pattern(8, 4096));
    let target = f.add("ro", target);
    let path = f.server.socket_path("ro");

    // The device says VIRTIO_BLK_F_RO: libblkio refuses to start it read-write.
    let err = try_connect(&path, 1, false)
        .err()
        .expect("read-write start must fail");
    assert_eq!(err.errno(), Errno::ROFS);

    let mut c = try_connect(&path, 1, true).unwrap();
    assert_eq!(c.read_data(0, 4096), pattern(8, 4096));
    assert!(c.write(0, 0, 4096) < 0);
    assert!(!target.ops().iter().any(|op| matches!(op, Op::Write { .. })));
}

#[test]
fn reconnect_sees_the_same_data() {
    let (f, _target) = Fixture::with_volume();
    let path = f.server.socket_path("vol");
    assert!(!f.server.connected("vol"));

    let mut c = connect(&path, 2);
    wait_until("the first client is connected", || {
        f.server.connected("vol")
    });
    let data = pattern(77, 128 * 1024);
    c.write_data(4 * MIB, &data);
    drop(c);
    wait_until("the first client is gone", || !f.server.connected("vol"));

    let mut c = connect(&path, 1);
    wait_until("the second client is connected", || {
        f.server.connected("vol")
    });
    assert_eq!(checksum(&c.read_data(4 * MIB, data.len())), checksum(&data));
    drop(c);

    // And a third time, with more queues than before.
    let mut c = connect(&path, 4);
    assert_eq!(c.read_data(4 * MIB, 4096), data[..4096]);
}

#[test]
fn a_resized_volume_is_seen_by_the_next_connection() {
    let (f, _target) = Fixture::with_volume();
    let path = f.server.socket_path("vol");
    let c = connect(&path, 1);
    assert_eq!(c.blkio.get_u64("capacity").unwrap(), DEV_SIZE);
    drop(c);
    wait_until("the client is gone", || !f.server.connected("vol"));
    f.registry.insert(
        "vol",
        Arc::new(MemTarget::new(2 * DEV_SIZE)) as Arc<dyn BlockTarget>,
    );
    let c = connect(&path, 1);
    assert_eq!(c.blkio.get_u64("capacity").unwrap(), 2 * DEV_SIZE);
}

#[test]
fn remove_export_disconnects_and_removes_the_socket() {
    let (f, _target) = Fixture::with_volume();
    let idle = f.add("idle", MemTarget::new(DEV_SIZE));
    let path = f.server.socket_path("vol");
    let idle_path = f.server.socket_path("idle");
    assert!(path.exists() && idle_path.exists());

    let mut c = connect(&path, 1);
    c.write_data(0, &pattern(1, 4096));
    wait_until("the client is connected", || f.server.connected("vol"));
    f.server.remove_export("vol");
    assert!(!f.server.connected("vol"));
    assert!(!path.exists(), "socket file removed");
    assert!(try_connect(&path, 1, false).is_err());

    // An export nobody is connected to: its thread is blocked in accept.
    f.server.remove_export("idle");
    assert!(!idle_path.exists());
    drop(idle);

    // Removing again, or something unknown, is a no-op; adding back works.
    f.server.remove_export("vol");
    f.server.remove_export("nope");
    f.server.add_export("vol").unwrap();
    let mut c = connect(&path, 1);
    assert_eq!(c.read_data(0, 4096), pattern(1, 4096));
}

#[test]
fn remove_export_waits_for_requests_in_flight() {
    let (f, target) = Fixture::with_volume();
    let mut c = connect(&f.server.socket_path("vol"), 1);
    wait_until("the client is connected", || f.server.connected("vol"));
    let mut hold = target.hold_flushes();
    c.queues[0].flush(7, ReqFlags::empty());
    // Submit without waiting for the completion.
    let mut none: [MaybeUninit<Completion>; 0] = [];
    c.queues[0].do_io(&mut none, 0, None, None).unwrap();
    f._rt.block_on(hold.started());

    let (tx, rx) = mpsc::channel();
    let server = f.server.clone();
    let remover = std::thread::spawn(move || {
        server.remove_export("vol");
        tx.send(()).unwrap();
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_millis(100)),
        Err(mpsc::RecvTimeoutError::Timeout),
        "remove_export returned while a flush was in flight"
    );
    hold.release();
    rx.recv().unwrap();
    remover.join().unwrap();
    assert_eq!(target.flushes(), 1);
    // The flush was completed to the (now disconnected) client before removal finished.
    assert_eq!(wait_all(&mut c.queues[0], 1), [(7, 0)]);
}

#[test]
fn writes_complete_only_once_their_pending_ack_completes() {
    let (f, target) = Fixture::with_volume();
    let mut c = connect(&f.server.socket_path("vol"), 1);
    c.fill(0, &pattern(3, 4096));
    let hold = target.hold_acks();
    let buf = c.buf(0, 4096);
    c.queues[0].write(0, buf, 4096, 1, ReqFlags::empty());
    let mut none: [MaybeUninit<Completion>; 0] = [];
    c.queues[0].do_io(&mut none, 0, None, None).unwrap();
    // The write is applied (a read on the same queue sees it) but does not complete yet.
    let read_buf = c.buf(8192, 4096);
    c.queues[0].read(0, read_buf, 4096, 2, ReqFlags::empty());
    let mut one = [MaybeUninit::<Completion>::uninit()];
    assert_eq!(c.queues[0].do_io(&mut one, 1, None, None).unwrap(), 1);
    // SAFETY: do_io initialised the first entry.
    let first = unsafe { one[0].assume_init_read() };
    assert_eq!(
        (first.user_data, first.ret),
        (2, 0),
        "the read completed first"
    );
    assert_eq!(
        checksum(&c.contents(8192, 4096)),
        checksum(&pattern(3, 4096))
    );
    let later = c.queues[0].do_io(&mut one, 0, None, None).unwrap();
    assert_eq!(later, 0, "the write completed before its ack was released");
    hold.release();
    assert_eq!(wait_all(&mut c.queues[0], 1), [(1, 0)]);
}

#[test]
fn requests_waiting_for_durability_are_bounded_per_queue() {
    const FLUSHES: usize = 40;
    const BOUND: usize = 32;
    let (f, target) = Fixture::with_volume();
    let mut c = connect(&f.server.socket_path("vol"), 1);
    let mut hold = target.hold_flushes();
    for i in 0..FLUSHES {
        c.queues[0].flush(i, ReqFlags::empty());
    }
    let mut none: [MaybeUninit<Completion>; 0] = [];
    c.queues[0].do_io(&mut none, 0, None, None).unwrap();
    for _ in 0..BOUND {
        f._rt.block_on(hold.started());
    }
    let more = f
        ._rt
        .block_on(async { tokio::time::timeout(Duration::from_millis(100), hold.started()).await });
    assert!(
        more.is_err(),
        "more than {BOUND} flushes of one queue reached the target"
    );
    hold.release();
    let done = wait_all(&mut c.queues[0], FLUSHES);
    assert_eq!(done, (0..FLUSHES).map(|i| (i, 0)).collect::<Vec<_>>());
    assert_eq!(target.flushes(), FLUSHES as u64);
}

#[test]
fn shutdown_stops_every_export() {
    let (f, _target) = Fixture::with_volume();
    f.add("other", MemTarget::new(DEV_SIZE));
    let mut c = connect(&f.server.socket_path("vol"), 1);
    c.write_data(0, &pattern(1, 4096));
    f.server.shutdown();
    assert!(!f.server.socket_path("vol").exists());
    assert!(!f.server.socket_path("other").exists());
    assert!(!f.server.connected("vol"));
    assert!(matches!(
        f.server.add_export("vol"),
        Err(VhostError::ShuttingDown)
    ));
    f.server.shutdown();
}

#[test]
fn add_export_validates_and_replaces_stale_sockets() {
    let f = Fixture::new(VhostConfig {
        num_queues: 2,
        queue_size: 128,
        ..VhostConfig::default()
    });
    assert!(matches!(
        f.server.add_export("missing"),
        Err(VhostError::UnknownExport(_))
    ));
    for bad in ["", ".", "..", "a/b"] {
        assert!(
            matches!(f.server.add_export(bad), Err(VhostError::InvalidName(_))),
            "{bad:?}"
        );
    }
    // A name too long for `<dir>/<name>.sock` is served at a hashed path that fits.
    let long = "x".repeat(200);
    f.add(&long, MemTarget::new(DEV_SIZE));
    let long_path = f.server.socket_path(&long);
    assert!(
        long_path.as_os_str().len() <= 107,
        "{}",
        long_path.display()
    );
    assert_eq!(
        long_path.parent(),
        Some(f.dir.path().join("sockets").as_path())
    );
    let file_name = long_path.file_name().unwrap().to_str().unwrap();
    assert!(
        file_name.starts_with("xxx") && file_name.contains('~'),
        "{file_name}"
    );
    let other = format!("{}y", "x".repeat(199));
    assert_ne!(f.server.socket_path(&other), long_path);
    let mut c = try_connect_sized(&long_path, 1, false, 128).unwrap();
    c.write_data(8192, &pattern(7, 4096));
    assert_eq!(c.read_data(8192, 4096), pattern(7, 4096));
    drop(c);

    // A socket file left behind by a dead process is replaced.
    let path = f.server.socket_path("vol");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    f.add("vol", MemTarget::new(DEV_SIZE));
    assert_eq!(f.server.add_export("vol").unwrap(), path, "idempotent");
    // The frontend may not use queues larger than configured.
    assert!(try_connect(&path, 1, false).is_err());
    let mut c = try_connect_sized(&path, 2, false, 128).unwrap();
    assert_eq!(c.blkio.get_i32("max-queues").unwrap(), 2);
    c.write_data(0, &pattern(4, 4096));
    assert_eq!(c.read_data(0, 4096), pattern(4, 4096));

    // Anything else at the path is left alone.
    f.registry.insert(
        "file",
        Arc::new(MemTarget::new(DEV_SIZE)) as Arc<dyn BlockTarget>,
    );
    std::fs::write(f.server.socket_path("file"), b"not a socket").unwrap();
    assert!(matches!(
        f.server.add_export("file"),
        Err(VhostError::Listen { .. })
    ));
    assert!(f.dir.path().join("sockets/file.sock").is_file());
}

#[test]
fn invalid_configs_are_refused() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for config in [
        VhostConfig {
            num_queues: 0,
            queue_size: 256,
            ..VhostConfig::default()
        },
        VhostConfig {
            num_queues: 9,
            queue_size: 256,
            ..VhostConfig::default()
        },
        VhostConfig {
            num_queues: 1,
            queue_size: 100,
            ..VhostConfig::default()
        },
        VhostConfig {
            num_queues: 1,
            queue_size: 2,
            ..VhostConfig::default()
        },
        VhostConfig {
            poll_max: vstor_edge::vhost::MAX_POLL + Duration::from_micros(1),
            ..VhostConfig::default()
        },
    ] {
        let err = VhostServer::new(
            Arc::new(MemRegistry::new()),
            dir.path().to_owned(),
            config,
            rt.handle().clone(),
        )
        .err()
        .expect("invalid config accepted");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{config:?}");
    }
    // A directory too long to hold any socket path.
    let long_dir = dir.path().join("d".repeat(90));
    let err = VhostServer::new(
        Arc::new(MemRegistry::new()),
        long_dir.clone(),
        VhostConfig::default(),
        rt.handle().clone(),
    )
    .err()
    .expect("too long a socket directory accepted");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("is too long"), "{err}");
    assert!(!long_dir.exists(), "the directory was created");
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn idle_exports_cost_no_thread() {
    let before = threads();
    let f = Fixture::new(VhostConfig::default());
    let with_server = threads();
    assert!(with_server <= before + 2, "{before} -> {with_server}");
    let targets: Vec<_> = (0..50)
        .map(|i| f.add(&format!("idle{i}"), MemTarget::new(DEV_SIZE)))
        .collect();
    let idle = threads();
    assert!(
        idle <= with_server,
        "50 idle exports: {with_server} -> {idle} threads"
    );

    // A frontend still gets served on any of them, and another after it disconnects.
    for round in 0..2u64 {
        let mut c = connect(&f.server.socket_path("idle17"), 1);
        wait_until("connected", || f.server.connected("idle17"));
        c.write_data(round * 4096, &pattern(round + 1, 4096));
        assert_eq!(c.read_data(round * 4096, 4096), pattern(round + 1, 4096));
        drop(c);
        wait_until("disconnected", || !f.server.connected("idle17"));
    }
    assert_eq!(
        checksum(&targets[17].contents(0, 8192)),
        checksum(&[pattern(1, 4096), pattern(2, 4096)].concat())
    );
    // Once the frontend is gone, its threads end too (allowing for the runtime's idle blocking
    // threads, which linger 10 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    while threads() > idle {
        assert!(
            Instant::now() < deadline,
            "threads left: {} > {idle}",
            threads()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    f.server.shutdown();
    assert!(!f.server.socket_path("idle0").exists());
}

/// Completions in the order they arrive: (user_data, ret).
fn completions_in_order(q: &mut Blkioq, n: usize) -> Vec<(usize, i32)> {
    let mut out = Vec::new();
    let mut one = [MaybeUninit::<Completion>::uninit()];
    while out.len() < n {
        if q.do_io(&mut one, 1, None, None).unwrap() == 1 {
            // SAFETY: do_io initialised the first entry.
            let c = unsafe { one[0].assume_init_read() };
            out.push((c.user_data, c.ret));
        }
    }
    out
}

/// A read of a slow range (data only on the backend) completes from the backend-read pool:
/// reads submitted after it on the same queue complete first, and every buffer holds the right
/// data.
#[test]
fn backend_reads_do_not_hold_up_the_queue() {
    const DELAY: Duration = Duration::from_millis(200);
    let (f, target) = Fixture::with_volume();
    let slow = pattern(5, 256 * 1024);
    let fast = pattern(6, 4096);
    target.preload(0, &slow);
    target.preload(MIB, &fast);
    target.add_slow_range(0..256 * 1024, DELAY);
    let mut c = connect(&f.server.socket_path("vol"), 1);

    let started = Instant::now();
    let buf = c.buf(0, slow.len());
    c.queues[0].read(0, buf, slow.len(), 1, ReqFlags::empty());
    for i in 2..=11usize {
        let buf = c.buf(MIB as usize + i * 4096, 4096);
        c.queues[0].read(MIB, buf, 4096, i, ReqFlags::empty());
    }
    let done = completions_in_order(&mut c.queues[0], 10);
    let fast_done = started.elapsed();
    let mut want: Vec<(usize, i32)> = (2..=11).map(|i| (i, 0)).collect();
    let mut got = done.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the fast reads complete before the slow one");
    assert!(fast_done < DELAY, "fast reads waited ({fast_done:?})");
    for i in 2..=11usize {
        assert_eq!(
            checksum(&c.contents(MIB as usize + i * 4096, 4096)),
            checksum(&fast)
        );
    }
    assert_eq!(completions_in_order(&mut c.queues[0], 1), [(1, 0)]);
    assert!(started.elapsed() >= DELAY);
    assert_eq!(checksum(&c.contents(0, slow.len())), checksum(&slow));
    assert_eq!(target.slow_reads(), 1);
    // The queue keeps working normally afterwards.
    c.write_data(2 * MIB, &pattern(7, 8192));
    assert_eq!(
        checksum(&c.read_data(2 * MIB, 8192)),
        checksum(&pattern(7, 8192))
    );
}

/// A read larger than one bounce chunk whose later chunk is slow: the local chunk is copied
/// inline, then the whole request is redone on the backend-read pool; the guest sees all of it.
#[test]
fn a_large_read_with_a_slow_tail_completes_intact() {
    let (f, target) = Fixture::with_volume();
    let data = pattern(8, 3 * MIB as usize);
    target.preload(0, &data);
    target.add_slow_range(2 * MIB + 4096..2 * MIB + 8192, Duration::from_millis(20));
    let mut c = connect(&f.server.socket_path("vol"), 1);
    let got = c.read_data(0, data.len());
    assert_eq!(checksum(&got), checksum(&data));
    assert_eq!(
        target.slow_reads(),
        1,
        "one chunk went through the blocking path"
    );
}

/// A guest that sends its next request right after each completion (QD1, like a database's log
/// writer) is caught by the queue worker's polling: the server counts passes that found work
/// without a kick. With polling off, none are, and either way every byte reads back.
#[test]
fn queue_workers_poll_for_a_quick_guest_and_not_when_told_not_to() {
    for (poll_max, polls) in [(vstor_edge::vhost::MAX_POLL, true), (Duration::ZERO, false)] {
        let f = Fixture::new(VhostConfig {
            poll_max,
            ..VhostConfig::default()
        });
        let target = f.add("vol", MemTarget::new(DEV_SIZE));
        let mut c = connect(&f.server.socket_path("vol"), 1);
        // Enough round trips that, even on a loaded machine, many come back within 1 ms.
        for i in 0..1000u64 {
            let offset = (i * 7919 % 4096) * 4096;
            let data = pattern(i, 4096);
            c.write_data(offset, &data);
            assert_eq!(
                checksum(&c.read_data(offset, 4096)),
                checksum(&data),
                "read back at {offset}"
            );
            assert_eq!(target.contents(offset, 4096), data);
        }
        let polled = f.server.polled();
        if polls {
            assert!(polled > 0, "no request was found by polling");
        } else {
            assert_eq!(polled, 0, "polled with poll_max 0");
        }
    }
}

//! The vhost-user-blk backend on a `RemoteTarget` (the edge's path for a QEMU disk): libblkio's
//! virtio-blk driver writes, reads, flushes, discards and zeroes through the backend, whose
//! asynchronous paths (`read_async`, `flush_async`, pending acknowledgements) send everything over
//! the edge protocol to a server over an in-memory target.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::sync::Arc;
use std::time::Duration;

use crate::common;

use blkio::{Blkio, MemoryRegion, ReqFlags};
use common::{checksum, pattern, wait_all};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vstor_edge::remote::client::{RemoteConfig, RemoteTarget};
use vstor_edge::remote::server::{serve, EdgeServerConfig};
use vstor_edge::remote::Endpoint;
use vstor_edge::testing::remote::{MemExports, MemServedState, StaticResolver};
use vstor_edge::testing::{MemRegistry, MemTarget};
use vstor_edge::vhost::{VhostConfig, VhostServer};
use vstor_edge::BlockTarget;

const MIB: u64 = 1 << 20;
const DEV_SIZE: u64 = 16 * MIB;

struct Region(MemoryRegion);

impl Region {
    fn buf(&self, off: usize, len: usize) -> *mut u8 {
        assert!(off + len <= self.0.len);
        (self.0.addr + off) as *mut u8
    }
    fn fill(&self, off: usize, data: &[u8]) {
        // SAFETY: inside the mapped region; no request uses this range concurrently.
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
}

#[test]
fn blkio_through_vhost_on_a_remote_target() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let target = Arc::new(MemTarget::new(DEV_SIZE));
    let stop = CancellationToken::new();
    let remote = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exports = MemExports::new();
        exports.insert("vol", target.clone(), MemServedState::new(4));
        tokio::spawn(serve(
            listener,
            exports,
            EdgeServerConfig::default(),
            stop.clone(),
        ));
        let resolver = StaticResolver::new(Endpoint {
            node: "a".into(),
            addr: addr.to_string(),
            tag: 4,
            unix: None,
        });
        let config = RemoteConfig {
            reconnect_bound: Duration::from_secs(10),
            ..RemoteConfig::default()
        };
        RemoteTarget::connect("vol", resolver, config)
            .await
            .unwrap()
    });
    let registry = Arc::new(MemRegistry::new());
    registry.insert("vol", remote.clone() as Arc<dyn BlockTarget>);
    let dir = tempfile::tempdir().unwrap();
    let server = VhostServer::new(
        Arc::clone(&registry) as _,
        dir.path().join("sockets"),
        VhostConfig::default(),
        rt.handle().clone(),
    )
    .unwrap();
    let path = server.add_export("vol").unwrap();

    let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
    blkio.set_str("path", path.to_str().unwrap()).unwrap();
    blkio.connect().unwrap();
    blkio.set_i32("num-queues", 1).unwrap();
    blkio.set_i32("queue-size", 256).unwrap();
    let mut queues = blkio.start().unwrap().queues;
    let region = Region(blkio.alloc_mem_region(8 * MIB as usize).unwrap());
    blkio.map_mem_region(&region.0).unwrap();
    assert_eq!(blkio.get_u64("capacity").unwrap(), DEV_SIZE);
    let q = &mut queues[0];

    // 32 writes of 64 KiB in flight at once, then 32 reads into other buffers.
    const N: usize = 32;
    const LEN: usize = 65536;
    for i in 0..N {
        region.fill(i * LEN, &pattern(i as u64, LEN));
        q.write(
            (i * LEN) as u64,
            region.buf(i * LEN, LEN),
            LEN,
            i,
            ReqFlags::empty(),
        );
    }
    assert!(wait_all(q, N).iter().all(|(_, ret)| *ret == 0));
    for i in 0..N {
        assert_eq!(
            checksum(&target.contents((i * LEN) as u64, LEN)),
            checksum(&pattern(i as u64, LEN)),
            "owner's copy of block {i}"
        );
    }
    region.fill(0, &vec![0u8; N * LEN]);
    for i in 0..N {
        q.read(
            (i * LEN) as u64,
            region.buf(i * LEN, LEN),
            LEN,
            i,
            ReqFlags::empty(),
        );
    }
    assert!(wait_all(q, N).iter().all(|(_, ret)| *ret == 0));
    for i in 0..N {
        assert_eq!(
            checksum(&region.contents(i * LEN, LEN)),
            checksum(&pattern(i as u64, LEN)),
            "read back block {i}"
        );
    }

    // Flush, discard and write-zeroes go over the wire too.
    let flushes = target.flushes();
    q.flush(0, ReqFlags::empty());
    assert_eq!(wait_all(q, 1)[0].1, 0);
    assert_eq!(target.flushes(), flushes + 1);
    q.discard(0, 8192, 0, ReqFlags::empty());
    assert_eq!(wait_all(q, 1)[0].1, 0);
    q.write_zeroes(8192, 8192, 0, ReqFlags::NO_UNMAP);
    assert_eq!(wait_all(q, 1)[0].1, 0);
    q.read(0, region.buf(0, LEN), LEN, 0, ReqFlags::empty());
    assert_eq!(wait_all(q, 1)[0].1, 0);
    let back = region.contents(0, LEN);
    assert!(back[..16384].iter().all(|&b| b == 0));
    assert_eq!(back[16384..], pattern(0, LEN)[16384..]);
    // A read past the end fails, and the device keeps working.
    q.read(DEV_SIZE, region.buf(0, 4096), 4096, 0, ReqFlags::empty());
    assert_ne!(wait_all(q, 1)[0].1, 0);
    assert!(remote.stats().completed >= 2 * N as u64 + 4);
    assert_eq!(remote.stats().failed, 0);

    drop(queues);
    drop(blkio);
    server.shutdown();
    stop.cancel();
}

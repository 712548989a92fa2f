//! Unit tests of the request path: descriptor chains are built in guest memory with
//! virtio-queue's `MockSplitQueue`, served by a real [`BlkBackend`] through a `VringRwLock`, and
//! checked through the used ring, the status bytes, the guest buffers and the `MemTarget`.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use super::backend::{BlkBackend, Polling};
use super::config::VirtioBlockConfig;
use super::request::{GuestMem, MAX_DISCARD_SECTORS};
use crate::target::BlockTarget;
use crate::testing::{MemRegistry, MemTarget, Op, ALLOC_BLOCK};
use vm_memory::ByteValued;

const QSIZE: u16 = 16;
const GUEST_MEM: usize = 2 << 20;
const DEV_SIZE: u64 = 1 << 20;
const BUF_BASE: u64 = 0x1_0000;
const OUTSIDE: u64 = 0x4000_0000;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// One descriptor of a chain: (guest address, length, device-writable).
type D = (u64, u32, bool);

fn r(addr: u64, len: u32) -> D {
    (addr, len, false)
}
fn w(addr: u64, len: u32) -> D {
    (addr, len, true)
}

struct Queue {
    vq: MockSplitQueue<'static, GuestMem>,
    vring: VringRwLock,
    avail: u16,
    used_seen: u16,
}

struct Harness {
    mem: &'static GuestMem,
    queues: Vec<Queue>,
    backend: Arc<BlkBackend>,
    target: Arc<MemTarget>,
    rt: Option<tokio::runtime::Runtime>,
    next_buf: u64,
}

impl Harness {
    fn new(target: MemTarget) -> Self {
        Self::build(target, "vol0", 1)
    }

    fn build(target: MemTarget, name: &str, num_queues: usize) -> Self {
        // Leaked so the mock queues can borrow it for the whole test (a few MiB per test).
        let mem: &'static GuestMem = Box::leak(Box::new(
            GuestMem::from_ranges(&[(GuestAddress(0), GUEST_MEM)]).unwrap(),
        ));
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let target = Arc::new(target);
        let registry = MemRegistry::new();
        registry.insert(name, Arc::clone(&target) as Arc<dyn BlockTarget>);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let backend = Arc::new(BlkBackend::new(
            name,
            Arc::new(registry),
            rt.handle().clone(),
            num_queues,
            QSIZE,
            Polling {
                max: super::DEFAULT_POLL_MAX,
                polled: Arc::default(),
            },
            atomic.clone(),
        ));
        backend.acked_features(backend.features());
        let queues = (0..num_queues)
            .map(|i| {
                let vq = MockSplitQueue::create(mem, GuestAddress(i as u64 * 0x1000), QSIZE);
                let vring = VringRwLock::new(atomic.clone(), QSIZE).unwrap();
                vring
                    .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
                    .unwrap();
                vring.set_queue_ready(true);
                vring.set_enabled(true);
                Queue {
                    vq,
                    vring,
                    avail: 0,
                    used_seen: 0,
                }
            })
            .collect();
        Self {
            mem,
            queues,
            backend,
            target,
            rt: Some(rt),
            next_buf: BUF_BASE,
        }
    }

    /// A fresh guest buffer of `len` bytes.
    fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.next_buf;
        self.next_buf = (addr + len as u64).next_multiple_of(64);
        assert!(self.next_buf <= GUEST_MEM as u64);
        addr
    }

    fn buf(&mut self, data: &[u8]) -> u64 {
        let addr = self.alloc(data.len());
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        addr
    }

    fn header(&mut self, req_type: u32, sector: u64) -> u64 {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.buf(&h)
    }

    fn status_byte(&mut self) -> u64 {
        // Pre-filled with a value no status has, to see whether it was written.
        self.buf(&[0xee])
    }

    fn dwz(&mut self, segments: &[(u64, u32, u32)]) -> u64 {
        let mut data = Vec::new();
        for &(sector, num, flags) in segments {
            data.extend_from_slice(&sector.to_le_bytes());
            data.extend_from_slice(&num.to_le_bytes());
            data.extend_from_slice(&flags.to_le_bytes());
        }
        self.buf(&data)
    }

    fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    fn status_at(&self, addr: u64) -> u8 {
        self.read_guest(addr, 1)[0]
    }

    /// Put a chain on queue `q`'s descriptor table (from index 0; earlier chains have completed)
    /// and make it available. Returns the head index.
    fn submit_on(&mut self, q: usize, descs: &[D]) -> u16 {
        let queue = &mut self.queues[q];
        assert!(descs.len() <= QSIZE as usize);
        // Start after the chains still waiting in the avail ring.
        let pending = queue.avail.wrapping_sub(queue.used_seen);
        let start = if pending == 0 {
            0
        } else {
            Self::next_free(queue)
        };
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let idx = start + i as u16;
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let desc = SplitDescriptor::new(addr, len, flags, idx + 1);
            queue
                .vq
                .desc_table()
                .store(idx, RawDescriptor::from(desc))
                .unwrap();
        }
        Self::publish(queue, start);
        start
    }

    fn next_free(queue: &Queue) -> u16 {
        // Chains on the table are packed from 0; find the first index after the last one used.
        let mut idx = 0u16;
        for _ in 0..queue.avail.wrapping_sub(queue.used_seen) {
            loop {
                let desc = SplitDescriptor::from(queue.vq.desc_table().load(idx).unwrap());
                idx += 1;
                if desc.flags() & VRING_DESC_F_NEXT as u16 == 0 {
                    break;
                }
            }
        }
        idx
    }

    fn publish(queue: &mut Queue, head: u16) {
        let slot = usize::from(queue.avail % QSIZE);
        queue.vq.avail().ring().ref_at(slot).unwrap().store(head);
        queue.avail = queue.avail.wrapping_add(1);
        queue.vq.avail().idx().store(queue.avail);
    }

    fn submit(&mut self, descs: &[D]) -> u16 {
        self.submit_on(0, descs)
    }

    /// A chain through an indirect table holding `descs`.
    fn submit_indirect(&mut self, descs: &[D]) -> u16 {
        let table = self.alloc(descs.len() * 16);
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1));
            self.mem
                .write_obj(desc, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let queue = &mut self.queues[0];
        assert_eq!(
            queue.avail, queue.used_seen,
            "indirect submit needs an idle queue"
        );
        let head = SplitDescriptor::new(
            table,
            16 * descs.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        queue
            .vq
            .desc_table()
            .store(0, RawDescriptor::from(head))
            .unwrap();
        Self::publish(queue, 0);
        0
    }

    /// Kick queue `q` and wait until everything it started (including off-thread requests) is
    /// done.
    fn run_on(&self, q: usize) {
        let vring = &self.queues[q].vring;
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(vring), q)
            .unwrap();
        self.backend.stop_vring(q as u32).unwrap();
    }

    fn run(&self) {
        self.run_on(0);
    }

    /// Used-ring entries (head, len) added since the last call.
    fn used_on(&mut self, q: usize) -> Vec<(u32, u32)> {
        let queue = &mut self.queues[q];
        let idx = queue.vq.used().idx().load();
        let mut out = Vec::new();
        while queue.used_seen != idx {
            let slot = usize::from(queue.used_seen % QSIZE);
            let elem = queue.vq.used().ring().ref_at(slot).unwrap().load();
            out.push((elem.id(), elem.len()));
            queue.used_seen = queue.used_seen.wrapping_add(1);
        }
        out
    }

    fn used(&mut self) -> Vec<(u32, u32)> {
        self.used_on(0)
    }

    /// Submit one chain, run it, and return its used length.
    fn one(&mut self, descs: &[D]) -> u32 {
        let head = self.submit(descs);
        self.run();
        let used = self.used();
        assert_eq!(used.len(), 1, "exactly one completion expected: {used:?}");
        assert_eq!(used[0].0, u32::from(head));
        used[0].1
    }

    fn config(&self) -> VirtioBlockConfig {
        let bytes = self.backend.get_config(0, 60);
        *VirtioBlockConfig::from_slice(&bytes).unwrap()
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn write_then_read_across_segments() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    let data = pattern(7, 8192);
    let hdr = h.header(VIRTIO_BLK_T_OUT, 8);
    let a = h.buf(&data[..4096]);
    let b = h.buf(&data[4096..]);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), r(a, 4096), r(b, 4096), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), OK);
    assert_eq!(h.target.contents(8 * 512, 8192), data);
    assert_eq!(
        h.target.ops(),
        [Op::Write {
            offset: 4096,
            len: 8192,
            fua: false
        }]
    );

    // Read it back into differently split buffers: used length = bytes written + status.
    let hdr = h.header(VIRTIO_BLK_T_IN, 8);
    let x = h.alloc(1024);
    let y = h.alloc(4096);
    let z = h.alloc(3072);
    let st = h.status_byte();
    assert_eq!(
        h.one(&[r(hdr, 16), w(x, 1024), w(y, 4096), w(z, 3072), w(st, 1)]),
        8193
    );
    assert_eq!(h.status_at(st), OK);
    let mut back = h.read_guest(x, 1024);
    back.extend(h.read_guest(y, 4096));
    back.extend(h.read_guest(z, 3072));
    assert_eq!(back, data);
}

#[test]
fn any_layout_header_and_status_in_shared_descriptors() {
    // Header and payload in one readable descriptor; payload and status in one writable one.
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    let data = pattern(3, 512);
    let mut out = Vec::new();
    out.extend_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&2u64.to_le_bytes());
    out.extend_from_slice(&data);
    let req = h.buf(&out);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(req, 528), w(st, 1)]), 1);
    assert_eq!(h.target.contents(1024, 512), data);

    let hdr = h.header(VIRTIO_BLK_T_IN, 2);
    let buf = h.alloc(513);
    assert_eq!(h.one(&[r(hdr, 16), w(buf, 513)]), 513);
    assert_eq!(h.read_guest(buf, 512), data);
    assert_eq!(h.status_at(buf + 512), OK);
}

#[test]
fn flush_runs_off_thread_and_completes() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), OK);
    assert_eq!(h.target.flushes(), 1);
}

#[test]
fn stop_vring_waits_for_a_flush_in_flight() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    let target = Arc::clone(&h.target);
    let mut hold = target.hold_flushes();
    let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let st = h.status_byte();
    h.submit(&[r(hdr, 16), w(st, 1)]);
    let vring = h.queues[0].vring.clone();
    h.backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .unwrap();
    h.rt.as_ref().unwrap().block_on(hold.started());

    let (tx, rx) = mpsc::channel();
    let backend = Arc::clone(&h.backend);
    let stopper = std::thread::spawn(move || {
        backend.stop_vring(0).unwrap();
        tx.send(()).unwrap();
    });
    // While the flush is held, the ring must not be reported stopped, and nothing is used yet.
    assert_eq!(
        rx.recv_timeout(Duration::from_millis(100)),
        Err(mpsc::RecvTimeoutError::Timeout)
    );
    assert!(h.used().is_empty());
    hold.release();
    rx.recv().unwrap();
    stopper.join().unwrap();
    // Once stop_vring returned, the completion is already in guest memory.
    assert_eq!(h.used(), [(0, 1)]);
    assert_eq!(h.status_at(st), OK);
    assert_eq!(target.flushes(), 1);
}

/// A write that must first fetch its block from a remote backend (`write_reads_backend`: a
/// sub-cluster write over evicted data) runs off the queue thread, which meanwhile serves the
/// read behind it; the write completes once its fetch does, merged with the data around it.
#[test]
fn a_write_that_must_fetch_from_the_backend_leaves_the_queue_thread() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    let target = Arc::clone(&h.target);
    let old = pattern(1, 8192);
    target.preload(0, &old);
    target.preload(128 << 10, &pattern(2, 4096));
    target.add_slow_range(0..(64 << 10), Duration::from_millis(1));
    let mut hold = target.hold_device_writes();
    // 512 bytes at sector 1, inside the first (slow) block; then a read of a fast block.
    let hdr = h.header(VIRTIO_BLK_T_OUT, 1);
    let data = h.buf(&pattern(9, 512));
    let write_status = h.status_byte();
    let write_head = h.submit(&[r(hdr, 16), r(data, 512), w(write_status, 1)]);
    let hdr = h.header(VIRTIO_BLK_T_IN, 256);
    let buf = h.alloc(4096);
    let read_status = h.status_byte();
    let read_head = h.submit(&[r(hdr, 16), w(buf, 4096), w(read_status, 1)]);

    let backend = Arc::clone(&h.backend);
    let vring = h.queues[0].vring.clone();
    let (done, passed) = mpsc::channel();
    let queue_thread = std::thread::spawn(move || {
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
        let _ = done.send(());
    });
    h.rt.as_ref().unwrap().block_on(hold.started());
    // The write waits at the gate; the queue's pass is over all the same (bounded wait: on the
    // queue thread, the write would hold it until released).
    let pass_over = passed.recv_timeout(Duration::from_secs(10)).is_ok();
    let used = h.used();
    hold.release();
    queue_thread.join().unwrap();
    assert!(pass_over, "the queue thread waited for the backend");
    assert_eq!(used, [(u32::from(read_head), 4097)]);
    assert_eq!(h.status_at(read_status), OK);
    assert_eq!(h.read_guest(buf, 4096), pattern(2, 4096));
    h.backend.stop_vring(0).unwrap();
    assert_eq!(h.used(), [(u32::from(write_head), 1)]);
    assert_eq!(h.status_at(write_status), OK);
    let mut expected = old;
    expected[512..1024].copy_from_slice(&pattern(9, 512));
    assert_eq!(target.contents(0, 8192), expected);
}

#[test]
fn deferred_request_dropped_by_a_dead_runtime_completes_with_ioerr() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    h.rt.take().unwrap().shutdown_background();
    let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), IOERR);
    assert_eq!(h.target.flushes(), 0);
}

#[test]
fn get_id_returns_the_export_name() {
    let mut h = Harness::build(MemTarget::new(DEV_SIZE), "vol0", 1);
    let hdr = h.header(VIRTIO_BLK_T_GET_ID, 0);
    let id = h.buf(&[0xaa; 20]);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), w(id, 20), w(st, 1)]), 21);
    assert_eq!(h.status_at(st), OK);
    let mut expect = [0u8; 20];
    expect[..4].copy_from_slice(b"vol0");
    assert_eq!(h.read_guest(id, 20), expect);

    // Long names are truncated to 20 bytes; a short buffer gets what fits.
    let name = "a-volume-with-a-long-name";
    let mut h = Harness::build(MemTarget::new(DEV_SIZE), name, 1);
    let hdr = h.header(VIRTIO_BLK_T_GET_ID, 0);
    let id = h.alloc(32);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), w(id, 32), w(st, 1)]), 21);
    assert_eq!(h.read_guest(id, 20), &name.as_bytes()[..20]);
    let hdr = h.header(VIRTIO_BLK_T_GET_ID, 0);
    let id = h.alloc(8);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), w(id, 8), w(st, 1)]), 9);
    assert_eq!(h.read_guest(id, 8), &name.as_bytes()[..8]);
}

#[test]
fn discard_and_write_zeroes_map_to_the_target() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    h.target.preload(0, &pattern(1, 4 * ALLOC_BLOCK as usize));
    assert_eq!(h.target.allocation()[..4], [true; 4]);

    // DISCARD the first 4 KiB.
    let hdr = h.header(VIRTIO_BLK_T_DISCARD, 0);
    let seg = h.dwz(&[(0, 8, 0)]);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), r(seg, 16), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), OK);

    // WRITE_ZEROES with UNMAP may deallocate; without it the range stays allocated.
    let hdr = h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let seg = h.dwz(&[(8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), r(seg, 16), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), OK);
    let hdr = h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let seg = h.dwz(&[(16, 8, 0)]);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), r(seg, 16), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), OK);

    assert_eq!(
        h.target.ops(),
        [
            Op::Discard {
                offset: 0,
                len: 4096
            },
            Op::WriteZeroes {
                offset: 4096,
                len: 4096,
                allocate: false,
                fua: false
            },
            Op::WriteZeroes {
                offset: 8192,
                len: 4096,
                allocate: true,
                fua: false
            },
        ]
    );
    assert_eq!(h.target.contents(0, 3 * 4096), vec![0; 3 * 4096]);
    assert_eq!(h.target.allocation()[..4], [false, false, true, true]);
}

#[test]
fn writethrough_mode_makes_writes_fua() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    assert_eq!(h.config().writeback, 1);
    h.backend.set_config(32, &[0]).unwrap();
    assert_eq!(h.config().writeback, 0);
    assert_eq!(h.backend.get_config(32, 1), [0]);

    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let data = h.buf(&pattern(9, 512));
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), r(data, 512), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), OK);
    let hdr = h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let seg = h.dwz(&[(8, 8, 0)]);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), r(seg, 16), w(st, 1)]), 1);
    assert_eq!(
        h.target.ops(),
        [
            Op::Write {
                offset: 0,
                len: 512,
                fua: true
            },
            Op::WriteZeroes {
                offset: 4096,
                len: 4096,
                allocate: true,
                fua: true
            }
        ]
    );
    assert_eq!(h.target.contents(0, 512), pattern(9, 512));

    // Back to writeback.
    h.backend.set_config(32, &[1]).unwrap();
    h.target.clear_ops();
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let data = h.buf(&pattern(9, 512));
    let st = h.status_byte();
    h.one(&[r(hdr, 16), r(data, 512), w(st, 1)]);
    assert_eq!(
        h.target.ops(),
        [Op::Write {
            offset: 0,
            len: 512,
            fua: false
        }]
    );
}

#[test]
fn without_negotiated_flush_writes_are_durable() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    h.backend
        .acked_features(h.backend.features() & !(1 << VIRTIO_BLK_F_FLUSH));
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let data = h.buf(&pattern(9, 512));
    let st = h.status_byte();
    h.one(&[r(hdr, 16), r(data, 512), w(st, 1)]);
    assert_eq!(
        h.target.ops(),
        [Op::Write {
            offset: 0,
            len: 512,
            fua: true
        }]
    );
}

/// Every malformed chain: (description, chain builder, expected used length, expected status).
#[test]
fn malformed_chains_are_rejected_without_touching_the_target() {
    type Build = fn(&mut Harness) -> (Vec<D>, Option<u64>);
    let cases: Vec<(&str, Build, u32, Option<u8>)> = vec![
        (
            "no writable descriptor: no status",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, 0);
                let d = h.alloc(512);
                (vec![r(hdr, 16), r(d, 512)], None)
            },
            0,
            None,
        ),
        (
            "zero-length status descriptor",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
                let st = h.status_byte();
                (vec![r(hdr, 16), w(st, 0)], Some(st))
            },
            0,
            Some(0xee),
        ),
        (
            "status outside guest memory",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
                (vec![r(hdr, 16), w(OUTSIDE, 1)], None)
            },
            0,
            None,
        ),
        (
            "status at the top of the address space",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
                (vec![r(hdr, 16), w(u64::MAX, 1)], None)
            },
            0,
            None,
        ),
        (
            "header device-writable",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, 0);
                let d = h.alloc(512);
                let st = h.status_byte();
                (vec![w(hdr, 16), w(d, 512), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "short header",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, 0);
                let st = h.status_byte();
                (vec![r(hdr, 8), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "IN with a readable data descriptor",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, 0);
                let d = h.alloc(512);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(d, 512), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "OUT with a writable data descriptor",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
                let d = h.alloc(512);
                let st = h.status_byte();
                (vec![r(hdr, 16), w(d, 512), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "readable descriptor after a writable one",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
                let a = h.alloc(512);
                let b = h.alloc(512);
                let st = h.status_byte();
                (vec![r(hdr, 16), w(a, 512), r(b, 512), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "IN length not a multiple of 512",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, 0);
                let d = h.alloc(500);
                let st = h.status_byte();
                (vec![r(hdr, 16), w(d, 500), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "OUT length not a multiple of 512",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
                let d = h.alloc(513);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(d, 513), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "IN starting past the end",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, DEV_SIZE / 512);
                let d = h.alloc(512);
                let st = h.status_byte();
                (vec![r(hdr, 16), w(d, 512), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "IN crossing the end",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, DEV_SIZE / 512 - 1);
                let d = h.alloc(1024);
                let st = h.status_byte();
                (vec![r(hdr, 16), w(d, 1024), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "OUT with sector * 512 overflowing",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_OUT, u64::MAX / 256);
                let d = h.alloc(512);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(d, 512), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "OUT with sector * 512 + len overflowing",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_OUT, u64::MAX / 512);
                let d = h.alloc(1024);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(d, 1024), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "data descriptor outside guest memory",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, 0);
                let st = h.status_byte();
                (vec![r(hdr, 16), w(OUTSIDE, 512), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "data descriptor running off the end of guest memory",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
                let st = h.status_byte();
                (
                    vec![r(hdr, 16), r(GUEST_MEM as u64 - 512, 1024), w(st, 1)],
                    Some(st),
                )
            },
            1,
            Some(IOERR),
        ),
        (
            "data descriptor wrapping the address space",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(u64::MAX - 100, 512), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "chain longer than 4 GiB in total (the chain ends early: no status)",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, 0);
                let st = h.status_byte();
                (vec![r(hdr, 16), w(0, u32::MAX - 8), w(st, 1)], Some(st))
            },
            0,
            Some(0xee),
        ),
        (
            "unknown request type",
            |h| {
                let hdr = h.header(99, 0);
                let st = h.status_byte();
                (vec![r(hdr, 16), w(st, 1)], Some(st))
            },
            1,
            Some(UNSUPP),
        ),
        (
            "secure erase is not offered",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_SECURE_ERASE, 0);
                let seg = h.dwz(&[(0, 8, 0)]);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(seg, 16), w(st, 1)], Some(st))
            },
            1,
            Some(UNSUPP),
        ),
        (
            "FLUSH with a payload",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
                let d = h.alloc(512);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(d, 512), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "GET_ID with a readable payload",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_GET_ID, 0);
                let d = h.alloc(20);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(d, 20), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "DISCARD with two segments",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_DISCARD, 0);
                let seg = h.dwz(&[(0, 8, 0), (16, 8, 0)]);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(seg, 32), w(st, 1)], Some(st))
            },
            1,
            Some(UNSUPP),
        ),
        (
            "DISCARD with the UNMAP flag",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_DISCARD, 0);
                let seg = h.dwz(&[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(seg, 16), w(st, 1)], Some(st))
            },
            1,
            Some(UNSUPP),
        ),
        (
            "WRITE_ZEROES with an unknown flag",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
                let seg = h.dwz(&[(0, 8, 2)]);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(seg, 16), w(st, 1)], Some(st))
            },
            1,
            Some(UNSUPP),
        ),
        (
            "DISCARD with a truncated segment",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_DISCARD, 0);
                let seg = h.dwz(&[(0, 8, 0)]);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(seg, 8), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "DISCARD without a segment",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_DISCARD, 0);
                let st = h.status_byte();
                (vec![r(hdr, 16), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "DISCARD past the end",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_DISCARD, 0);
                let seg = h.dwz(&[(DEV_SIZE / 512 - 4, 8, 0)]);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(seg, 16), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "WRITE_ZEROES with sector * 512 overflowing",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
                let seg = h.dwz(&[(u64::MAX - 3, 8, 0)]);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(seg, 16), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "DISCARD larger than max_discard_sectors",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_DISCARD, 0);
                let seg = h.dwz(&[(0, MAX_DISCARD_SECTORS + 1, 0)]);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(seg, 16), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "WRITE_ZEROES with a writable payload",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
                let seg = h.dwz(&[(0, 8, 0)]);
                let d = h.alloc(16);
                let st = h.status_byte();
                (vec![r(hdr, 16), r(seg, 16), w(d, 16), w(st, 1)], Some(st))
            },
            1,
            Some(IOERR),
        ),
        (
            "more descriptors than seg_max + 2",
            |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, 0);
                let st = h.status_byte();
                let mut chain = vec![r(hdr, 16)];
                for _ in 0..QSIZE - 1 {
                    let d = h.alloc(512);
                    chain.push(w(d, 512));
                }
                chain.push(w(st, 1));
                (chain, Some(st))
            },
            1,
            Some(IOERR),
        ),
    ];

    for (what, build, used_len, status) in cases {
        let mut h = Harness::new(MemTarget::new(DEV_SIZE));
        let (chain, st) = build(&mut h);
        let head = if chain.len() > QSIZE as usize {
            h.submit_indirect(&chain)
        } else {
            h.submit(&chain)
        };
        h.run();
        assert_eq!(h.used(), [(u32::from(head), used_len)], "{what}: used ring");
        if let (Some(st), Some(status)) = (st, status) {
            assert_eq!(h.status_at(st), status, "{what}: status");
        }
        assert_eq!(h.target.ops(), [], "{what}: the target must not be touched");
        assert_eq!(h.target.flushes(), 0, "{what}");

        // The queue keeps working after the bad chain.
        let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
        let st = h.status_byte();
        assert_eq!(h.one(&[r(hdr, 16), w(st, 1)]), 1, "{what}: next request");
        assert_eq!(h.status_at(st), OK, "{what}: next request");
    }
}

#[test]
fn bad_and_good_chains_in_one_batch() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    let data = pattern(5, 1024);
    let bad_hdr = h.header(42, 0);
    let bad_st = h.status_byte();
    let hdr = h.header(VIRTIO_BLK_T_OUT, 4);
    let d = h.buf(&data);
    let st = h.status_byte();
    let noise = h.alloc(512);
    let first = h.submit(&[r(bad_hdr, 16), w(bad_st, 1)]);
    let second = h.submit(&[r(hdr, 16), r(d, 1024), w(st, 1)]);
    let third = h.submit(&[r(noise, 512)]);
    h.run();
    assert_eq!(
        h.used(),
        [
            (u32::from(first), 1),
            (u32::from(second), 1),
            (u32::from(third), 0)
        ]
    );
    assert_eq!(h.status_at(bad_st), UNSUPP);
    assert_eq!(h.status_at(st), OK);
    assert_eq!(h.target.contents(2048, 1024), data);
}

#[test]
fn indirect_chains_are_served() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    h.target.preload(0, &pattern(2, 2048));
    let hdr = h.header(VIRTIO_BLK_T_IN, 1);
    let a = h.alloc(512);
    let b = h.alloc(1024);
    let st = h.status_byte();
    let head = h.submit_indirect(&[r(hdr, 16), w(a, 512), w(b, 1024), w(st, 1)]);
    h.run();
    assert_eq!(h.used(), [(u32::from(head), 1537)]);
    assert_eq!(h.status_at(st), OK);
    let mut back = h.read_guest(a, 512);
    back.extend(h.read_guest(b, 1024));
    assert_eq!(back, pattern(2, 2048)[512..2048]);
}

#[test]
fn read_only_target_rejects_writes() {
    let mut h = Harness::new(MemTarget::new_read_only(DEV_SIZE));
    assert_ne!(h.backend.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let d = h.buf(&[1; 512]);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), r(d, 512), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), IOERR);
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let hdr = h.header(t, 0);
        let seg = h.dwz(&[(0, 8, 0)]);
        let st = h.status_byte();
        assert_eq!(h.one(&[r(hdr, 16), r(seg, 16), w(st, 1)]), 1);
        assert_eq!(h.status_at(st), IOERR);
    }
    assert_eq!(h.target.ops(), []);

    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let d = h.alloc(512);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), w(d, 512), w(st, 1)]), 513);
    assert_eq!(h.status_at(st), OK);

    let rw = Harness::new(MemTarget::new(DEV_SIZE));
    assert_eq!(rw.backend.features() & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn target_errors_become_ioerr() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    h.target.set_fail_io(true);
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let d = h.buf(&[0x55; 512]);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), w(d, 512), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), IOERR);
    assert_eq!(
        h.read_guest(d, 512),
        vec![0x55; 512],
        "nothing written on error"
    );
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let d = h.buf(&[1; 512]);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), r(d, 512), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), IOERR);
    let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), IOERR);
}

#[test]
fn event_idx_loop_serves_every_chain() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    h.backend.set_event_idx(true);
    h.queues[0].vring.set_queue_event_idx(true);
    let mut statuses = Vec::new();
    for i in 0..4u64 {
        let hdr = h.header(VIRTIO_BLK_T_OUT, i);
        let d = h.buf(&pattern(i as u8, 512));
        let st = h.status_byte();
        h.submit(&[r(hdr, 16), r(d, 512), w(st, 1)]);
        statuses.push(st);
    }
    h.run();
    assert_eq!(h.used().len(), 4);
    for (i, st) in statuses.into_iter().enumerate() {
        assert_eq!(h.status_at(st), OK);
        assert_eq!(
            h.target.contents(i as u64 * 512, 512),
            pattern(i as u8, 512)
        );
    }
}

/// Without EVENT_IDX the worker asks the guest not to kick while it serves
/// (`VRING_USED_F_NO_NOTIFY`), and must take that back before it sleeps: a flag left set would
/// leave the guest's next request unnoticed.
#[test]
fn without_event_idx_kicks_are_wanted_again_after_every_pass() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    for i in 0..3u64 {
        let hdr = h.header(VIRTIO_BLK_T_OUT, i);
        let d = h.buf(&pattern(i as u8 + 7, 512));
        let st = h.status_byte();
        assert_eq!(h.one(&[r(hdr, 16), r(d, 512), w(st, 1)]), 1);
        assert_eq!(h.status_at(st), OK);
        // The used ring starts with its flags.
        let flags: u16 = h.mem.read_obj(h.queues[0].vq.used_addr()).unwrap();
        assert_eq!(flags, 0, "pass {i}");
    }
    assert_eq!(h.target.contents(2 * 512, 512), pattern(9, 512));
}

#[test]
fn throttled_writes_still_complete() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    h.target.set_throttle(Some(Duration::from_millis(1)));
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let d = h.buf(&[3; 512]);
    let st = h.status_byte();
    assert_eq!(h.one(&[r(hdr, 16), r(d, 512), w(st, 1)]), 1);
    assert_eq!(h.status_at(st), OK);
    assert_eq!(h.target.contents(0, 512), vec![3; 512]);
}

#[test]
fn a_bad_chain_on_one_queue_does_not_affect_another() {
    let mut h = Harness::build(MemTarget::new(DEV_SIZE), "vol0", 2);
    let bad = h.header(VIRTIO_BLK_T_IN, 0);
    let bad_st = h.status_byte();
    h.submit_on(0, &[r(bad, 16), w(OUTSIDE, 512), w(bad_st, 1)]);
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let d = h.buf(&[7; 512]);
    let st = h.status_byte();
    h.submit_on(1, &[r(hdr, 16), r(d, 512), w(st, 1)]);
    h.run_on(0);
    h.run_on(1);
    assert_eq!(h.used_on(0), [(0, 1)]);
    assert_eq!(h.used_on(1), [(0, 1)]);
    assert_eq!(h.status_at(bad_st), IOERR);
    assert_eq!(h.status_at(st), OK);
    assert_eq!(h.target.contents(0, 512), vec![7; 512]);
}

#[test]
fn stopped_or_disabled_rings_are_not_served() {
    let mut h = Harness::new(MemTarget::new(DEV_SIZE));
    let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let st = h.status_byte();
    h.submit(&[r(hdr, 16), w(st, 1)]);
    h.queues[0].vring.set_enabled(false);
    h.run();
    assert!(h.used().is_empty());
    h.queues[0].vring.set_enabled(true);
    h.run();
    assert_eq!(h.used(), [(0, 1)]);

    // After close() (the connection is over) nothing is served either.
    let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let st = h.status_byte();
    h.submit(&[r(hdr, 16), w(st, 1)]);
    h.backend.close();
    h.run();
    assert!(h.used().is_empty());
    assert_eq!(h.status_at(st), 0xee);
}

#[test]
fn config_space_describes_the_device() {
    let h = Harness::build(MemTarget::new(DEV_SIZE), "vol0", 3);
    let c = h.config();
    assert_eq!({ c.capacity }, DEV_SIZE / 512);
    assert_eq!({ c.seg_max }, u32::from(QSIZE) - 2);
    assert_eq!({ c.blk_size }, 512);
    assert_eq!(c.physical_block_exp, 3);
    assert_eq!({ c.min_io_size }, 8);
    assert_eq!({ c.opt_io_size }, 8);
    assert_eq!(c.writeback, 1);
    assert_eq!({ c.num_queues }, 3);
    assert_eq!({ c.max_discard_sectors }, MAX_DISCARD_SECTORS);
    assert_eq!({ c.max_discard_seg }, 1);
    assert_eq!({ c.discard_sector_alignment }, 8);
    assert_eq!({ c.max_write_zeroes_seg }, 1);
    assert_eq!(c.write_zeroes_may_unmap, 1);
    // Replies always have the requested size, zero past the end of our structure.
    assert_eq!(h.backend.get_config(56, 8), [1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(h.backend.get_config(0, 8), (DEV_SIZE / 512).to_le_bytes());
    // Read-only fields ignore writes; writes past the structure fail.
    h.backend.set_config(0, &[0xff; 8]).unwrap();
    assert_eq!({ h.config().capacity }, DEV_SIZE / 512);
    assert!(h.backend.set_config(60, &[1]).is_err());

    let features = h.backend.features();
    for bit in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_CONFIG_WCE,
        32, // VIRTIO_F_VERSION_1
        29, // VIRTIO_RING_F_EVENT_IDX
        28, // VIRTIO_RING_F_INDIRECT_DESC
        30, // VHOST_USER_F_PROTOCOL_FEATURES
    ] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(h.backend.queues_per_thread(), [1, 2, 4]);
}

#[test]
fn a_vanished_export_is_an_empty_read_only_device() {
    let registry = MemRegistry::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mem = GuestMemoryAtomic::new(GuestMem::new());
    let backend = BlkBackend::new(
        "gone",
        Arc::new(registry),
        rt.handle().clone(),
        1,
        QSIZE,
        Polling {
            max: Duration::ZERO,
            polled: Arc::default(),
        },
        mem,
    );
    assert_ne!(backend.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!({ backend.config().capacity }, 0);
}

//! The vhost-user-blk server driven message by message with rust-vmm's vhost-user `Frontend`, the
//! way QEMU drives it: feature and config negotiation, and the GET_VRING_BASE (stop) path.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vstor_edge::testing::{MemRegistry, MemTarget};
use vstor_edge::vhost::{VhostConfig, VhostServer};
use vstor_edge::BlockTarget;

const DEV_SIZE: u64 = 8 << 20;

struct Fixture {
    server: VhostServer,
    target: Arc<MemTarget>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn fixture(target: MemTarget) -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let registry = Arc::new(MemRegistry::new());
    let target = Arc::new(target);
    registry.insert("vol", Arc::clone(&target) as Arc<dyn BlockTarget>);
    let dir = tempfile::tempdir().unwrap();
    let server = VhostServer::new(
        registry,
        dir.path().to_owned(),
        VhostConfig {
            num_queues: 3,
            queue_size: 64,
            ..VhostConfig::default()
        },
        rt.handle().clone(),
    )
    .unwrap();
    server.add_export("vol").unwrap();
    Fixture {
        server,
        target,
        rt,
        _dir: dir,
    }
}

/// Connect and negotiate everything offered, as QEMU does.
fn negotiate(f: &Fixture) -> (Frontend, u64) {
    let mut frontend = Frontend::connect(f.server.socket_path("vol"), 3).unwrap();
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    frontend.set_protocol_features(protocol).unwrap();
    (frontend, features)
}

#[test]
fn features_queues_and_config_space() {
    let f = fixture(MemTarget::new(DEV_SIZE));
    let mut frontend = Frontend::connect(f.server.socket_path("vol"), 3).unwrap();
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    let expected = [
        32, // VIRTIO_F_VERSION_1
        29, // VIRTIO_RING_F_EVENT_IDX
        28, // VIRTIO_RING_F_INDIRECT_DESC
        30, // VHOST_USER_F_PROTOCOL_FEATURES
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_CONFIG_WCE,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | (1 << bit));
    assert_eq!(features, expected, "{features:#x}");
    frontend.set_features(features).unwrap();

    let protocol = frontend.get_protocol_features().unwrap();
    assert_eq!(
        protocol,
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
    );
    frontend.set_protocol_features(protocol).unwrap();
    assert_eq!(frontend.get_queue_num().unwrap(), 3);

    // QEMU asks for the config size its negotiated features imply; the reply has that size.
    let (_, cfg) = frontend
        .get_config(0, 60, VhostUserConfigFlags::empty(), &[0; 60])
        .unwrap();
    let le32 = |off: usize| u32::from_le_bytes(cfg[off..off + 4].try_into().unwrap());
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        DEV_SIZE / 512
    );
    assert_eq!(le32(12), 62, "seg_max = queue_size - 2");
    assert_eq!(le32(20), 512, "blk_size");
    assert_eq!(cfg[24], 3, "physical_block_exp");
    assert_eq!(u16::from_le_bytes([cfg[26], cfg[27]]), 8, "min_io_size");
    assert_eq!(le32(28), 8, "opt_io_size");
    assert_eq!(cfg[32], 1, "writeback");
    assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 3, "num_queues");
    assert_eq!((le32(40), le32(44)), (1, 8), "discard seg / alignment");
    assert_eq!(le32(52), 1, "max_write_zeroes_seg");
    assert_eq!(cfg[56], 1, "write_zeroes_may_unmap");
    let (_, big) = frontend
        .get_config(0, 96, VhostUserConfigFlags::empty(), &[0; 96])
        .unwrap();
    assert_eq!(big[..60], cfg[..]);
    assert_eq!(big[60..], [0; 36]);

    // The guest switches the cache to writethrough.
    frontend
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    let (_, wce) = frontend
        .get_config(32, 1, VhostUserConfigFlags::empty(), &[0])
        .unwrap();
    assert_eq!(wce, [0]);

    // Not offered: in-flight tracking. (A failed request ends the connection: that is how
    // vhost-user-backend treats errors.)
    let inflight = VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 3,
        queue_size: 64,
    };
    assert!(frontend.get_inflight_fd(&inflight).is_err());
    drop(frontend);

    // The next frontend is served; queues larger than configured are refused.
    let (frontend, _) = negotiate(&f);
    frontend.set_vring_num(0, 64).unwrap();
    assert!(frontend.set_vring_num(0, 128).is_err());
}

#[test]
fn read_only_volumes_offer_the_ro_feature() {
    let f = fixture(MemTarget::new_read_only(DEV_SIZE));
    let (_frontend, features) = negotiate(&f);
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn get_vring_base_waits_for_a_flush_in_flight() {
    const MEM: usize = 1 << 20;
    const QSIZE: u16 = 16;
    let f = fixture(MemTarget::new(DEV_SIZE));
    let (frontend, _) = negotiate(&f);

    // Guest memory shared through a file, as QEMU shares a memfd.
    let file = tempfile::tempfile().unwrap();
    file.set_len(MEM as u64).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    let region = mem.find_region(GuestAddress(0)).unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
    let host = info.userspace_addr;
    frontend.set_mem_table(&[info]).unwrap();

    let vq = MockSplitQueue::new(&mem, QSIZE);
    frontend.set_vring_num(0, QSIZE).unwrap();
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host + vq.desc_table_addr().0,
                used_ring_addr: host + vq.used_addr().0,
                avail_ring_addr: host + vq.avail_addr().0,
                log_addr: None,
            },
        )
        .unwrap();
    frontend.set_vring_base(0, 0).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    frontend.set_vring_call(0, &call).unwrap();
    frontend.set_vring_kick(0, &kick).unwrap();
    let mut frontend = frontend;
    frontend.set_vring_enable(0, true).unwrap();

    // A FLUSH: header, then the status byte.
    let header = 0x1_0000u64;
    let status = 0x1_0100u64;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
    mem.write_slice(&h, GuestAddress(header)).unwrap();
    mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
    let descs = [
        SplitDescriptor::new(header, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(status, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, d) in descs.into_iter().enumerate() {
        vq.desc_table()
            .store(i as u16, RawDescriptor::from(d))
            .unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().idx().store(1);

    let mut hold = f.target.hold_flushes();
    kick.write(1).unwrap();
    f.rt.block_on(hold.started());

    let (tx, rx) = mpsc::channel();
    let stopper = std::thread::spawn(move || {
        let base = frontend.get_vring_base(0).unwrap();
        tx.send(base).unwrap();
        frontend
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_millis(100)),
        Err(mpsc::RecvTimeoutError::Timeout),
        "GET_VRING_BASE answered while a request was in flight"
    );
    assert_eq!(vq.used().idx().load(), 0);
    hold.release();
    assert_eq!(rx.recv().unwrap(), 1, "next avail index");
    let _frontend = stopper.join().unwrap();
    // By the time the ring was reported stopped, the request was complete and signalled.
    assert_eq!(vq.used().idx().load(), 1);
    let used = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!((used.id(), used.len()), (0, 1));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
    assert!(call.read().unwrap() >= 1);
    assert_eq!(f.target.flushes(), 1);
}

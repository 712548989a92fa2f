//! The node's read cache (`read_cache.rs`) as a node's volumes use it: evicted data read once
//! is read again from memory (no backend request, the same bytes, also on an encrypted volume
//! and at sub-cluster offsets), still reads while the backend cannot, clones of one template
//! share what was read of it, and a volume served again (here: restarted) reads its objects
//! afresh, because a new owner may have rewritten them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::FaultStore;
use vstor_backend::ObjectStore;
use vstor_volumedriver::{ManagerConfig, ScoName, Volume, VolumeManager, VolumeOptions};

const CS: usize = 4096;
const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ ((i / CS) as u8))
        .collect()
}

struct Node {
    _tmp: tempfile::TempDir,
    backend: Arc<FaultStore>,
    manager: Arc<VolumeManager>,
}

/// A node with a 64 MiB read cache on a store that, like S3, prefers one get over gaps of up
/// to 128 KiB; volume `v` holds `data` (8 MiB), all of it uploaded and evicted.
fn node_with_evicted_volume(encrypted: bool, data: &[u8]) -> (Node, Arc<Volume>) {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    backend.set_read_gap(128 << 10);
    let config = ManagerConfig {
        max_open_age: None,
        read_cache_bytes: 64 << 20,
        ..ManagerConfig::under(&tmp.path().join("node"), 1 << 30)
    };
    let manager = VolumeManager::open(config, backend.clone()).unwrap();
    let key = tmp.path().join("volume.key");
    std::fs::write(&key, [0x42; 32]).unwrap();
    let options = VolumeOptions {
        sco_size: 4 << 20,
        encryption_key_file: encrypted.then_some(key),
        ..VolumeOptions::new(64 << 20)
    };
    let volume = manager.create("v", &options).unwrap();
    volume.write(0, data, false).unwrap();
    volume.flush().unwrap();
    volume.close_current_tlog().unwrap();
    assert!(volume.wait_for_uploads(Instant::now() + Duration::from_secs(30)));
    let (local, _) = volume.local_bytes();
    assert_eq!(volume.evict(u64::MAX), local, "everything evicted");
    (
        Node {
            _tmp: tmp,
            backend,
            manager,
        },
        volume,
    )
}

/// Read `len` bytes at `offset` in reads of `chunk` bytes.
fn read(volume: &Volume, offset: usize, len: usize, chunk: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, part) in out.chunks_mut(chunk).enumerate() {
        volume.read((offset + i * chunk) as u64, part).unwrap();
    }
    out
}

fn evicted_data_is_fetched_once(encrypted: bool) {
    let data = pattern(8 * MIB, 5);
    let (node, volume) = node_with_evicted_volume(encrypted, &data);
    assert!(read(&volume, 0, data.len(), MIB) == data, "first read");
    let first = volume.info();
    assert!(first.backend_reads > 0, "{first:?}");

    // Again, in other shapes: whole 1 MiB reads, clusters, and 512-byte sectors that start
    // inside clusters (an encrypted volume decrypts whole clusters of what the cache gives).
    assert!(read(&volume, 0, data.len(), MIB) == data, "second read");
    assert!(read(&volume, 3 * MIB, 64 * CS, CS) == data[3 * MIB..3 * MIB + 64 * CS]);
    let odd = 5 * MIB + 3 * 512;
    assert!(read(&volume, odd, 40 * 512, 512) == data[odd..odd + 40 * 512]);
    let second = volume.info();
    assert_eq!(second.backend_reads, first.backend_reads, "{second:?}");
    assert!(second.cache_hits >= 8 + 64 + 40, "{second:?}");

    // The backend cannot give anything back now: what the cache holds still reads, and the
    // volume keeps running.
    node.backend.set_unreadable(true);
    assert!(
        read(&volume, 0, data.len(), 256 << 10) == data,
        "read in the outage"
    );
    assert_eq!(volume.info().state, "running");
    node.backend.set_unreadable(false);

    let stats = node.manager.read_cache_stats().unwrap();
    assert_eq!(stats.capacity_bytes, 64 << 20);
    assert!(stats.bytes >= data.len() as u64, "{stats:?}");
    assert!(stats.hits >= volume.info().cache_hits, "{stats:?}");
    // Deleting the volume drops what the cache kept of it.
    drop(volume);
    node.manager.delete("v").unwrap();
    assert_eq!(node.manager.read_cache_stats().unwrap().bytes, 0);
}

#[test]
fn evicted_data_is_fetched_once_and_then_read_from_the_cache() {
    evicted_data_is_fetched_once(false);
}

#[test]
fn an_encrypted_volume_reads_its_cached_ciphertext_back_as_its_data() {
    evicted_data_is_fetched_once(true);
}

#[test]
fn a_volume_served_again_reads_its_objects_afresh() {
    let data = pattern(8 * MIB, 9);
    let (node, volume) = node_with_evicted_volume(false, &data);
    let half = 4 * MIB;
    assert!(read(&volume, 0, half, MIB) == data[..half]);

    // Another owner rewrites the volume's SCO objects under the same names (what a new owner's
    // DTL replay may do to SCOs its fenced predecessor uploaded): every data byte inverted.
    let mut rewritten = 0;
    for name in node.backend.list("v").unwrap() {
        if ScoName::parse(&name).is_none() {
            continue;
        }
        let mut object = node.backend.get("v", &name).unwrap();
        for byte in &mut object[CS..] {
            *byte ^= 0xff;
        }
        node.backend.put("v", &name, &object).unwrap();
        rewritten += 1;
    }
    assert!(rewritten >= 2, "{rewritten} SCOs");
    let inverted: Vec<u8> = data.iter().map(|b| b ^ 0xff).collect();

    // This instance keeps reading what it read before (its own view), from the cache.
    let before = volume.info().backend_reads;
    assert!(read(&volume, 0, half, MIB) == data[..half]);
    assert_eq!(volume.info().backend_reads, before);

    // Halt it (a read the backend cannot serve), and serve it again: the new instance reads
    // the objects as they are now, not what the cache kept for the old one.
    node.backend.set_unreadable(true);
    let mut buf = vec![0u8; CS];
    assert!(volume.read(half as u64, &mut buf).is_err());
    assert_eq!(volume.info().state, "halted");
    node.backend.set_unreadable(false);
    let restarted = node.manager.restart("v").unwrap();
    assert!(
        read(&restarted, 0, half, MIB) == inverted[..half],
        "the restarted volume read what the cache kept for the old instance"
    );
    let reads = restarted.info().backend_reads;
    assert!(reads > 0);
    assert!(read(&restarted, 0, half, MIB) == inverted[..half]);
    assert_eq!(restarted.info().backend_reads, reads, "cached again");
}

#[test]
fn clones_of_one_template_share_what_was_read_of_it() {
    let data = pattern(8 * MIB, 3);
    let (node, template) = node_with_evicted_volume(false, &data);
    template.snapshot_create("gold").unwrap();
    let options = VolumeOptions::new(64 << 20);
    let wait = Duration::from_secs(30);
    let a = node
        .manager
        .clone_volume("a", "v", "gold", &options, wait)
        .unwrap();
    let b = node
        .manager
        .clone_volume("b", "v", "gold", &options, wait)
        .unwrap();
    // The first clone's reads go to the template's objects on the backend...
    assert!(read(&a, 0, data.len(), MIB) == data);
    assert!(a.info().backend_reads > 0);
    // ...and the second clone finds them in the cache: not one backend read.
    assert!(read(&b, 0, data.len(), MIB) == data);
    let info = b.info();
    assert_eq!(info.backend_reads, 0, "{info:?}");
    assert!(info.cache_hits >= 8, "{info:?}");
    // A clone's own writes are its own: the other clone still reads the template.
    a.write(0, &pattern(CS, 77), false).unwrap();
    assert!(read(&b, 0, CS, CS) == data[..CS]);
    assert!(read(&a, 0, CS, CS) == pattern(CS, 77));
}

#[test]
fn a_scrub_and_a_rollback_forget_the_scos_they_delete() {
    let mut expected = pattern(8 * MIB, 11);
    let (node, volume) = node_with_evicted_volume(false, &expected);
    let cached = || node.manager.read_cache_stats().unwrap().bytes;
    // Write `data` at 0, upload and evict it, and read the whole volume (into the cache).
    let overwrite = |expected: &mut Vec<u8>, data: &[u8]| {
        volume.write(0, data, false).unwrap();
        expected[..data.len()].copy_from_slice(data);
        volume.flush().unwrap();
        volume.close_current_tlog().unwrap();
        assert!(volume.wait_for_uploads(Instant::now() + Duration::from_secs(30)));
        volume.evict(u64::MAX);
        assert!(read(&volume, 0, expected.len(), MIB) == *expected);
    };
    // Most of the first SCO overwritten: garbage for the scrub.
    overwrite(&mut expected, &pattern(3 * MIB + MIB / 2, 12));
    let before = cached();
    let report = volume.scrub(None, &mut |_| {}).unwrap();
    assert!(report.scos_rewritten > 0, "{report:?}");
    let after_scrub = cached();
    assert!(after_scrub < before, "{after_scrub} of {before} bytes kept");
    assert!(
        read(&volume, 0, expected.len(), MIB) == expected,
        "after the scrub"
    );

    // Back to a snapshot: the SCOs written since are dropped, and so are their cached blocks.
    volume.snapshot_create("s0").unwrap();
    let at_s0 = expected.clone();
    overwrite(&mut expected, &pattern(2 * MIB, 13));
    let filled = cached();
    volume.rollback("s0").unwrap();
    assert!(cached() < filled, "{} of {filled} bytes kept", cached());
    assert!(
        read(&volume, 0, at_s0.len(), MIB) == at_s0,
        "after the rollback"
    );
}

//! The EC store against six real OSD servers (in-process, loopback) in three domains.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use super::*;
use crate::ec::testkit::{object, tier, Tier};
use crate::osd::proto::ErrorCode;

#[test]
fn objects_round_trip_and_small_reads_touch_one_osd() {
    let t = tier(6);
    t.store.create_namespace("vol", 1).unwrap();
    let data = object((3 << 20) + 12_345, 1);
    t.store.put_if_owner("vol", "sco1", &data, 1).unwrap();
    assert_eq!(t.store.get("vol", "sco1").unwrap(), data);
    assert_eq!(t.store.size("vol", "sco1").unwrap(), data.len() as u64);
    let before: u64 = t.osds.iter().map(|o| o.store.range_reads()).sum();
    let mut buf = vec![0u8; 4096];
    t.store
        .get_range("vol", "sco1", (1 << 20) + 8192, &mut buf)
        .unwrap();
    assert_eq!(buf, data[(1 << 20) + 8192..(1 << 20) + 12_288]);
    let after: u64 = t.osds.iter().map(|o| o.store.range_reads()).sum();
    assert_eq!(after - before, 1, "a 4 KiB read is one request to one OSD");
    assert_eq!(t.store.list("vol").unwrap(), vec!["sco1".to_string()]);
    // Every fragment of the 4+2 policy is on its own OSD, at most 2 per domain (the put
    // returned at c = 5: wait for the sixth).
    assert!(t.store.wait_background(std::time::Duration::from_secs(20)));
    let holders: usize = t
        .osds
        .iter()
        .map(|o| o.store.usage().fragments as usize)
        .sum();
    assert_eq!(holders, 6);
    t.store.delete("vol", "sco1").unwrap();
    assert!(!t.store.exists("vol", "sco1").unwrap());
    drop(t.runtime);
}

#[test]
fn reads_survive_m_lost_osds_and_a_corrupt_fragment_but_not_more() {
    let t = tier(6);
    t.store.create_namespace("vol", 1).unwrap();
    let data = object(700_000, 2);
    t.store.put("vol", "obj", &data).unwrap();
    // Corrupt one data block of every fragment on OSD 0 on disk.
    let root = t.osds[0].dir.path().join("fragments/vol/obj");
    for file in std::fs::read_dir(&root).unwrap() {
        let path = file.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = FragmentHeader::decode(&bytes).unwrap().data_offset() as usize + 100;
        bytes[at] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    assert_eq!(
        t.store.get("vol", "obj").unwrap(),
        data,
        "a corrupt fragment is decoded around"
    );
    // Two OSDs die (m = 2; one of them the corrupt one): still every byte.
    t.osds[0].shutdown.cancel();
    t.osds[1].shutdown.cancel();
    let store = EcStore::new(t.map.clone(), t.store.options.clone()).unwrap();
    assert_eq!(store.get("vol", "obj").unwrap(), data, "m lost OSDs");
    // A third one: more than m fragments lost, reads fail with an error.
    t.osds[2].shutdown.cancel();
    let store = EcStore::new(t.map.clone(), t.store.options.clone()).unwrap();
    let err = store.get("vol", "obj").unwrap_err();
    assert!(
        err.is_unreadable() && err.to_string().contains("cannot be rebuilt"),
        "a clear error, never wrong data: {err}"
    );
    drop(t.runtime);
}

#[test]
fn fencing_holds_in_the_registry_and_on_the_osds() {
    let t = tier(6);
    t.store.create_namespace("vol", 3).unwrap();
    t.store.put_if_owner("vol", "a", b"first", 3).unwrap();
    // A new owner claims the namespace: the old tag is refused by the store...
    t.store.claim("vol", 4).unwrap();
    assert!(matches!(
        t.store.put_if_owner("vol", "a", b"stale", 3),
        Err(BackendError::Fenced { current: 4, .. })
    ));
    assert!(t.store.delete_if_owner("vol", "a", 3).is_err());
    // ...and by every OSD, even when a stale node's registry view still says 3.
    t.map.namespaces.lock().get_mut("vol").unwrap().tag = 3;
    let stale = t.store.put_if_owner("vol", "a", b"stale", 3).unwrap_err();
    assert!(
        matches!(
            stale,
            BackendError::OsdRefused {
                code: ErrorCode::Fenced,
                ..
            }
        ),
        "{stale}"
    );
    t.map.namespaces.lock().get_mut("vol").unwrap().tag = 4;
    assert_eq!(t.store.get("vol", "a").unwrap(), b"first");
    t.store.put_if_owner("vol", "a", b"second", 4).unwrap();
    let fresh = EcStore::new(t.map.clone(), t.store.options.clone()).unwrap();
    assert_eq!(
        fresh.get("vol", "a").unwrap(),
        b"second",
        "the newest version wins"
    );
    drop(t.runtime);
}

#[test]
fn a_lost_domain_falls_back_to_the_next_policy() {
    let t = tier(6);
    t.store.create_namespace("vol", 1).unwrap();
    for entry in t.map.osds.lock().iter_mut() {
        if entry.slot.domain == "d0" {
            entry.slot.writable = false;
        }
    }
    let data = object(100_000, 3);
    t.store.put("vol", "obj", &data).unwrap();
    assert!(t.store.wait_background(std::time::Duration::from_secs(20)));
    let held: usize = t
        .osds
        .iter()
        .map(|o| o.store.usage().fragments as usize)
        .sum();
    assert_eq!(held, 3, "2+1 over the two domains left");
    assert_eq!(t.store.get("vol", "obj").unwrap(), data);
    drop(t.runtime);
}

#[test]
fn encrypted_presets_keep_plaintext_off_the_osds_and_reads_partial() {
    let t = tier(6);
    t.store.reserve_preset("sealed", "enc").unwrap();
    t.store.create_namespace("sealed", 1).unwrap();
    // A recognisable plaintext: if any 64-byte run of it reached a disk, it would be found.
    let data: Vec<u8> = (0..(1u32 << 20) + 777)
        .map(|i| b"vstor-plaintext-"[(i % 16) as usize])
        .collect();
    t.store.put_if_owner("sealed", "sco1", &data, 1).unwrap();
    assert_eq!(t.store.get("sealed", "sco1").unwrap(), data);
    let before: u64 = t.osds.iter().map(|o| o.store.range_reads()).sum();
    let mut buf = vec![0u8; 4096];
    t.store
        .get_range("sealed", "sco1", 300_001, &mut buf)
        .unwrap();
    assert_eq!(buf, data[300_001..304_097]);
    let after: u64 = t.osds.iter().map(|o| o.store.range_reads()).sum();
    assert!(
        after - before <= 2,
        "a 4 KiB read stays partial: {}",
        after - before
    );
    let needle = &data[..64];
    for osd in &t.osds {
        let mut stack = vec![osd.dir.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir)
                .unwrap()
                .map(std::result::Result::unwrap)
            {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let bytes = std::fs::read(&path).unwrap();
                    assert!(
                        !bytes.windows(64).any(|w| w == needle),
                        "plaintext in {}",
                        path.display()
                    );
                }
            }
        }
    }
    // Degraded reads decrypt too: two OSDs of six gone.
    t.osds[0].shutdown.cancel();
    t.osds[1].shutdown.cancel();
    t.store.forget("sealed", "sco1");
    assert_eq!(t.store.get("sealed", "sco1").unwrap(), data);
    drop(t.runtime);
}

#[test]
fn compressed_objects_store_less_and_read_back_in_part_touching_few_osds() {
    for preset in ["zstd", "lz4", "zenc"] {
        let t = tier(6);
        t.store.reserve_preset("vol", preset).unwrap();
        t.store.create_namespace("vol", 1).unwrap();
        // Runs (compressible) then noise (stored raw).
        let mut data: Vec<u8> = (0..3_000_000u32).map(|i| (i / 5000) as u8).collect();
        data.extend(object(300_000, 4));
        t.store.put("vol", "sco", &data).unwrap();
        t.store.put("vol", "empty", &[]).unwrap();
        assert!(t.store.wait_background(std::time::Duration::from_secs(20)));
        let used: u64 = t.osds.iter().map(|o| o.store.usage().used).sum();
        // Uncompressed, 4+2 stores 1.5 times the data; here the runs nearly vanish.
        assert!(used < 700_000, "{preset}: {used} bytes on the OSDs");
        let reader = t.client();
        assert_eq!(reader.size("vol", "sco").unwrap(), data.len() as u64);
        assert_eq!(reader.get("vol", "empty").unwrap(), Vec::<u8>::new());
        let reads = || -> u64 { t.osds.iter().map(|o| o.store.range_reads()).sum() };
        for (i, (offset, len)) in [
            (1_000_000usize, 4096usize),
            (65_535, 2),
            (3_100_000, 4096),
            (data.len() - 10, 10),
            (0, data.len()),
        ]
        .into_iter()
        .enumerate()
        {
            let before = reads();
            let mut buf = vec![0u8; len];
            reader
                .get_range("vol", "sco", offset as u64, &mut buf)
                .unwrap();
            assert_eq!(
                buf,
                data[offset..offset + len],
                "{preset}: {len} at {offset}"
            );
            if i > 0 && len < 5000 {
                // The index is cached after the first read: a small read asks for its blocks
                // only (one data fragment, two if they straddle a piece boundary).
                assert!(
                    reads() - before <= 2,
                    "{preset}: {} requests",
                    reads() - before
                );
            }
        }
        let mut past = vec![0u8; 11];
        assert!(matches!(
            reader.get_range("vol", "sco", data.len() as u64 - 10, &mut past),
            Err(BackendError::RangeOutOfBounds { .. })
        ));
        // Rewritten by the store that had read it (its index cached): the new version is read.
        t.store.get_range("vol", "sco", 0, &mut [0u8; 10]).unwrap();
        let other: Vec<u8> = (0..200_000u32).map(|i| (i / 999) as u8 ^ 0x5a).collect();
        t.store.put("vol", "sco", &other).unwrap();
        assert_eq!(t.store.get("vol", "sco").unwrap(), other);
        let mut buf = vec![0u8; 4096];
        t.store.get_range("vol", "sco", 100_000, &mut buf).unwrap();
        assert_eq!(buf, other[100_000..104_096]);
        drop(t.runtime);
    }
}

/// Another client rewrites `tlogs` to each of `rewrites` (length, seed) after `reader` read it
/// once: every read returns the rewrite whole, at its own size.
fn a_reader_gets_each_rewrite_whole(t: &Tier, rewrites: &[(usize, u32)], label: &str) {
    let first = object(5_000, 1);
    t.store.put_if_owner("vol", "tlogs", &first, 1).unwrap();
    let reader = t.client();
    assert_eq!(reader.get("vol", "tlogs").unwrap(), first);
    for &(len, seed) in rewrites {
        let next = object(len, seed);
        t.store.put_if_owner("vol", "tlogs", &next, 1).unwrap();
        assert!(t.store.wait_background(std::time::Duration::from_secs(20)));
        let got = reader.get("vol", "tlogs").unwrap();
        assert_eq!(
            got.len(),
            len,
            "{label}: read {} bytes of a {len}-byte object",
            got.len()
        );
        assert_eq!(got, next, "{label}");
    }
}

#[test]
fn a_reader_with_a_stale_location_gets_the_rewritten_object_whole() {
    // An MDS reads a volume's `tlogs` list while the owner, another client, rewrites it in
    // place: the reader's cached location names a version that is gone.
    let t = tier(6);
    t.store.create_namespace("vol", 1).unwrap();
    a_reader_gets_each_rewrite_whole(&t, &[(9_000, 2), (3_000, 3), (9_000, 4)], "plain");
    drop(t.runtime);
}

#[test]
fn a_reader_with_a_stale_index_gets_the_rewritten_compressed_object_whole() {
    // The same on a compressed namespace, where the reader also caches the object's block
    // index: a list that grows or shrinks is read at the size of the version actually read.
    for preset in ["zstd", "lz4"] {
        let t = tier(6);
        t.store.reserve_preset("vol", preset).unwrap();
        t.store.create_namespace("vol", 1).unwrap();
        a_reader_gets_each_rewrite_whole(&t, &[(90_000, 2), (3_000, 3), (200_000, 4)], preset);
        drop(t.runtime);
    }
}

/// A read finds an object's fragments, and before it reads them a repair elsewhere (a node's
/// rebalance runs beside its reads) moves them off the OSDs it found them on, twice: the read
/// finds them again where they went, and returns the object's bytes.
#[test]
fn a_read_follows_fragments_moved_between_finding_and_reading_them() {
    use crate::ec::repair::RepairOptions;
    use crate::ec::testkit::{options, set_state};

    let t = tier(9);
    t.store.create_namespace("vol", 1).unwrap();
    let data = object(1_500_000, 3);
    t.store.put("vol", "sco1", &data).unwrap();
    assert!(t.store.wait_background(std::time::Duration::from_secs(20)));
    // 4+2 over three domains of three OSDs: two fragments in each domain, one OSD free there.
    let holders: Vec<u64> = (0..9).filter(|id| t.fragments_on(*id) > 0).collect();
    assert_eq!(holders.len(), 6);
    let first: Vec<u64> = (0..3)
        .map(|d| *holders.iter().find(|id| *id % 3 == d).unwrap())
        .collect();
    let free: Vec<u64> = (0..9).filter(|id| !holders.contains(id)).collect();
    // Drain `from` and bring `back` up again, then repair: the fragments on `from` move.
    let mover = |from: Vec<u64>, back: Vec<u64>| {
        let map = t.map.clone();
        Box::new(move || {
            for id in &back {
                set_state(&map, *id, OsdState::Up);
            }
            for id in &from {
                set_state(&map, *id, OsdState::Draining);
            }
            let elsewhere = EcStore::new(map.clone(), options()).unwrap();
            let report = elsewhere
                .repair_namespace("vol", &RepairOptions::default(), &|_| {})
                .unwrap();
            assert!(report.errors.is_empty(), "{report:?}");
            assert_eq!(report.fragments_moved, 3, "{report:?}");
        }) as Box<dyn FnOnce() + Send>
    };
    let reader = t.client();
    reader
        .before_read
        .lock()
        .push_back(mover(first.clone(), vec![]));
    reader
        .before_read
        .lock()
        .push_back(mover(free.clone(), first.clone()));
    let mut buf = vec![0u8; data.len()];
    reader.get_range("vol", "sco1", 0, &mut buf).unwrap();
    assert!(
        buf == data,
        "the object's bytes, read after its fragments moved twice"
    );
    assert!(reader.before_read.lock().is_empty(), "both moves ran");
    for id in &first {
        assert_eq!(t.fragments_on(*id), 1, "OSD {id}: its fragment moved back");
    }
    for id in &free {
        assert_eq!(t.fragments_on(*id), 0, "OSD {id}: drained");
    }
    drop(t.runtime);
}

//! Rough figures, not a pass/fail test (run with `--ignored --nocapture`): slave catch-up
//! throughput in TLogs per second, the MDS's disk use per written cluster, and a restart map
//! rebuilt from the table plus the TLogs after its cork against a full backend replay.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::sync::Arc;
use std::time::Instant;

use vstor_backend::{LocalStore, ObjectStore};
use vstor_mds::catchup::{catch_up, read_list, restore_map};
use vstor_mds::{MdsStore, Role};
use vstor_volumedriver::{Volume, VolumeConfig, VolumeOptions};

const CS: u64 = 4096;

#[test]
#[ignore = "figures for the closing note, not a check"]
fn catch_up_and_restore_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let backend: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(tmp.path().join("backend")).unwrap());
    let clusters = 65_536u64; // 256 MiB volume
    let mut options = VolumeOptions::new(clusters * CS);
    options.sco_size = 4 << 20;
    let volume = Volume::create(
        &tmp.path().join("wb"),
        backend.clone(),
        VolumeConfig::new("v", &options, 0).unwrap(),
    )
    .unwrap();
    let (tlogs, per_tlog) = (200u64, 1024u64);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let block = vec![7u8; CS as usize];
    for _ in 0..tlogs {
        for _ in 0..per_tlog {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            volume.write((x % clusters) * CS, &block, false).unwrap();
        }
        volume.flush().unwrap();
        volume.close_current_tlog().unwrap();
        volume.drain_uploads().unwrap();
    }
    let store = MdsStore::open(&tmp.path().join("mds")).unwrap();
    store.set_role("v", "v", Role::Slave, 0).unwrap();
    let started = Instant::now();
    let report = catch_up(&store, backend.as_ref(), "v", false).unwrap();
    let took = started.elapsed();
    let info = store.info("v").unwrap();
    let disk = std::fs::metadata(store.path()).unwrap().len();
    println!(
        "catch-up: {} TLogs ({} updates) in {:?} = {:.0} TLogs/s; table {} entries, {} bytes on disk ({:.1} B/entry)",
        report.replayed,
        tlogs * per_tlog,
        took,
        report.replayed as f64 / took.as_secs_f64(),
        info.entries,
        disk,
        disk as f64 / info.entries as f64
    );
    let list = read_list(backend.as_ref(), "v", "v").unwrap();
    let mut table = std::collections::BTreeMap::new();
    let mut after = None;
    let started = Instant::now();
    let cork = loop {
        let (cork, page) = store.dump("v", after, 65_536).unwrap();
        let Some(last) = page.last().map(|(a, _)| *a) else {
            break cork;
        };
        table.extend(page);
        after = Some(last);
    };
    let seeded = restore_map(backend.as_ref(), "v", "v", &list.tlogs, Some((cork, table))).unwrap();
    let from_mds = started.elapsed();
    let started = Instant::now();
    let full = restore_map(backend.as_ref(), "v", "v", &list.tlogs, None).unwrap();
    let from_backend = started.elapsed();
    assert_eq!(seeded.map, full.map);
    println!(
        "restore map: from the MDS {:?} (0 TLogs read) vs full replay {:?} ({} TLogs): {:.1}x",
        from_mds,
        from_backend,
        full.replayed,
        from_backend.as_secs_f64() / from_mds.as_secs_f64()
    );
}

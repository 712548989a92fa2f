//! Model test: a real volume on a local backend goes through random writes, trims, uploads,
//! snapshots, rollbacks, scrubs and MDS restarts, while an MDS table follows it by catch-up
//! (sometimes skipped, so the table lags). After every step, the map restored from the MDS
//! table plus the TLogs after its cork equals the full backend replay; after every upload that
//! replay holds exactly the clusters the model says are written.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use vstor_backend::{LocalStore, ObjectStore};
use vstor_mds::catchup::{backend_map, catch_up, read_list, restore_map};
use vstor_mds::{Cork, MdsStore, Role};
use vstor_volumedriver::{Volume, VolumeConfig, VolumeOptions};

const CS: u64 = 4096;
const CLUSTERS: u64 = 256;

#[derive(Debug, Clone)]
enum Op {
    Write { cluster: u64, count: u64 },
    Trim { cluster: u64, count: u64 },
    Upload,
    CatchUp,
    Snapshot,
    Rollback,
    Scrub,
    ReopenMds,
    RestartVolume,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..CLUSTERS, 1u64..16).prop_map(|(cluster, count)| Op::Write { cluster, count }),
        2 => (0..CLUSTERS, 1u64..32).prop_map(|(cluster, count)| Op::Trim { cluster, count }),
        4 => Just(Op::Upload),
        3 => Just(Op::CatchUp),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Rollback),
        1 => Just(Op::Scrub),
        1 => Just(Op::ReopenMds),
        1 => Just(Op::RestartVolume),
    ]
}

fn upload(volume: &Volume) {
    volume.flush().unwrap();
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
}

fn check(
    store: &MdsStore,
    backend: &dyn ObjectStore,
    written: Option<&BTreeMap<u64, bool>>,
) -> Result<(), TestCaseError> {
    let (full_cork, full) = backend_map(backend, "v", "v").unwrap();
    let list = read_list(backend, "v", "v").unwrap();
    let (cork, table) = dump(store);
    let restored = restore_map(backend, "v", "v", &list.tlogs, Some((cork, table))).unwrap();
    prop_assert_eq!(&restored.map, &full);
    prop_assert_eq!(restored.cork, full_cork);
    if let Some(model) = written {
        let want: Vec<u64> = model.iter().filter(|(_, w)| **w).map(|(a, _)| *a).collect();
        let got: Vec<u64> = full.keys().copied().collect();
        prop_assert_eq!(got, want);
    }
    Ok(())
}

fn dump(store: &MdsStore) -> (Cork, BTreeMap<u64, u64>) {
    let mut map = BTreeMap::new();
    let mut after = None;
    loop {
        let (cork, page) = store.dump("v", after, 1000).unwrap();
        let Some(last) = page.last().map(|(a, _)| *a) else {
            return (cork, map);
        };
        map.extend(page);
        after = Some(last);
    }
}

fn open_volume(dir: &Path, backend: &Arc<dyn ObjectStore>) -> Arc<Volume> {
    Volume::open(dir, backend.clone(), "v").unwrap()
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let backend: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(tmp.path().join("backend")).unwrap());
    let wb = tmp.path().join("wb");
    let mut options = VolumeOptions::new(CLUSTERS * CS);
    options.sco_size = 4 << 20;
    let config = VolumeConfig::new("v", &options, 0).unwrap();
    let mut volume = Volume::create(&wb, backend.clone(), config).unwrap();
    let mds_dir = tmp.path().join("mds");
    let mut store = MdsStore::open(&mds_dir).unwrap();
    store.set_role("v", "v", Role::Slave, 0).unwrap();
    // cluster -> written (the model only tracks which clusters hold data)
    let mut model: BTreeMap<u64, bool> = BTreeMap::new();
    let mut snapshots: Vec<(String, BTreeMap<u64, bool>)> = Vec::new();
    let mut seed = 0u8;
    for op in ops {
        let mut uploaded = false;
        match op {
            Op::Write { cluster, count } => {
                let end = (cluster + count).min(CLUSTERS);
                seed = seed.wrapping_add(1);
                let data = vec![seed; ((end - cluster) * CS) as usize];
                volume.write(cluster * CS, &data, false).unwrap();
                for c in cluster..end {
                    model.insert(c, true);
                }
            }
            Op::Trim { cluster, count } => {
                let end = (cluster + count).min(CLUSTERS);
                volume.discard(cluster * CS, (end - cluster) * CS).unwrap();
                for c in cluster..end {
                    model.insert(c, false);
                }
            }
            Op::Upload => {
                upload(&volume);
                uploaded = true;
            }
            Op::CatchUp => {
                let report = catch_up(&store, backend.as_ref(), "v", false).unwrap();
                let again = catch_up(&store, backend.as_ref(), "v", true).unwrap();
                prop_assert_eq!(again.behind, 0, "behind after catch-up: {:?}", report);
                let (cork, table) = dump(&store);
                let (full_cork, full) = backend_map(backend.as_ref(), "v", "v").unwrap();
                prop_assert_eq!(cork, full_cork);
                prop_assert_eq!(table, full);
            }
            Op::Snapshot => {
                let name = format!("s{}", snapshots.len());
                volume.snapshot_create(&name).unwrap();
                snapshots.push((name, model.clone()));
            }
            Op::Rollback => {
                if let Some((name, state)) = snapshots.last().cloned() {
                    volume.rollback(&name).unwrap();
                    model = state;
                }
            }
            Op::Scrub => {
                upload(&volume);
                volume.scrub(None, &mut |_| {}).unwrap();
                uploaded = true;
            }
            Op::ReopenMds => {
                drop(store);
                store = MdsStore::open(&mds_dir).unwrap();
            }
            Op::RestartVolume => {
                upload(&volume);
                volume.stop();
                drop(volume);
                volume = open_volume(&wb, &backend);
                uploaded = true;
            }
        }
        check(&store, backend.as_ref(), uploaded.then_some(&model))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 100, .. ProptestConfig::default() })]
    #[test]
    fn map_from_mds_plus_tlogs_after_cork_equals_full_backend_replay(
        ops in prop::collection::vec(arb_op(), 1..40)
    ) {
        run(ops)?;
    }
}

/// A table more than zero TLogs behind restores by replaying only the TLogs after its cork; a
/// table whose history was rewritten (scrub) or that is missing falls back to a full replay.
#[test]
fn restore_replays_only_after_the_cork_and_falls_back_when_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let backend: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(tmp.path().join("backend")).unwrap());
    let mut options = VolumeOptions::new(CLUSTERS * CS);
    options.sco_size = 4 << 20;
    let config = VolumeConfig::new("v", &options, 0).unwrap();
    let volume = Volume::create(&tmp.path().join("wb"), backend.clone(), config).unwrap();
    let store = MdsStore::open(&tmp.path().join("mds")).unwrap();
    store.set_role("v", "v", Role::Slave, 0).unwrap();
    for round in 0..4u8 {
        volume
            .write(0, &vec![round; 8 * CS as usize], false)
            .unwrap();
        upload(&volume);
    }
    let r = catch_up(&store, backend.as_ref(), "v", false).unwrap();
    assert_eq!((r.behind, r.replayed, r.full_rebuild.clone()), (4, 4, None));
    for round in 0..3u8 {
        volume
            .write(16 * CS, &vec![round; 4 * CS as usize], false)
            .unwrap();
        upload(&volume);
    }
    assert_eq!(
        catch_up(&store, backend.as_ref(), "v", true)
            .unwrap()
            .behind,
        3
    );
    let list = read_list(backend.as_ref(), "v", "v").unwrap();
    let (_, full) = backend_map(backend.as_ref(), "v", "v").unwrap();
    let restored =
        restore_map(backend.as_ref(), "v", "v", &list.tlogs, Some(dump(&store))).unwrap();
    assert_eq!(
        (restored.replayed, restored.full_replay.is_none()),
        (3, true)
    );
    assert_eq!(restored.map, full);
    let missing = restore_map(backend.as_ref(), "v", "v", &list.tlogs, None).unwrap();
    assert_eq!(missing.replayed, list.tlogs.len() as u64);
    assert_eq!(missing.map, full);

    // Scrub rewrites the history the table's cork names: a full rebuild, counted.
    volume.scrub(None, &mut |_| {}).unwrap();
    let list = read_list(backend.as_ref(), "v", "v").unwrap();
    let (_, full) = backend_map(backend.as_ref(), "v", "v").unwrap();
    let stale = restore_map(backend.as_ref(), "v", "v", &list.tlogs, Some(dump(&store))).unwrap();
    assert!(stale.full_replay.is_some(), "{stale:?}");
    assert_eq!(stale.map, full);
    let r = catch_up(&store, backend.as_ref(), "v", false).unwrap();
    assert!(r.full_rebuild.is_some(), "{r:?}");
    assert_eq!(dump(&store).1, full);
    assert_eq!(store.info("v").unwrap().meta.counters.full_rebuilds, 1);
}

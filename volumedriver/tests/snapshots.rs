//! Snapshots, clones (of clones), rollback, snapshot deletion, scrubbing and restarts against a
//! model: after every step every volume and every snapshot must read back exactly as the model
//! says. Runs the real manager (uploader threads included) on a local backend.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common;

use common::FaultStore;
use proptest::prelude::*;
use vstor_backend::{LocalStore, ObjectStore};
use vstor_volumedriver::{ManagerConfig, VolumeError, VolumeManager, VolumeOptions};

const CS: u64 = 4096;
const CLUSTERS: u64 = 48;

fn options() -> VolumeOptions {
    VolumeOptions {
        sco_size: 8 * CS,
        write_buffer: 16 * CS,
        ..VolumeOptions::new(CLUSTERS * CS)
    }
}

fn content(seed: u32) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..CS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Model of one volume: per cluster the seed of its content (None = zeros).
#[derive(Clone, Default)]
struct ModelVolume {
    clusters: Vec<Option<u32>>,
    snapshots: Vec<(String, Vec<Option<u32>>)>,
}

struct Rig {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    backend: Arc<LocalStore>,
    manager: Arc<VolumeManager>,
}

impl Rig {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let backend = Arc::new(LocalStore::open(tmp.path().join("backend")).unwrap());
        let manager = Self::open_manager(tmp.path(), &backend);
        Self {
            root: tmp.path().to_path_buf(),
            _tmp: tmp,
            backend,
            manager,
        }
    }

    fn open_manager(root: &Path, backend: &Arc<LocalStore>) -> Arc<VolumeManager> {
        VolumeManager::open(
            ManagerConfig::under(&root.join("node"), 1 << 30),
            backend.clone(),
        )
        .unwrap()
    }

    fn restart(&mut self) {
        let unfinished = self.manager.shutdown(Duration::from_secs(30));
        assert!(unfinished.is_empty(), "uploads unfinished: {unfinished:?}");
        self.manager = Self::open_manager(&self.root, &self.backend);
    }

    /// Restart after losing the write buffers (everything is on the backend after shutdown).
    fn restart_from_backend(&mut self) {
        let unfinished = self.manager.shutdown(Duration::from_secs(30));
        assert!(unfinished.is_empty(), "uploads unfinished: {unfinished:?}");
        std::fs::remove_dir_all(self.root.join("node").join("write-buffer")).unwrap();
        self.manager = Self::open_manager(&self.root, &self.backend);
    }
}

fn check_volume(rig: &Rig, name: &str, model: &ModelVolume) -> Result<(), TestCaseError> {
    let volume = rig.manager.get(name).unwrap();
    let mut buf = vec![0u8; (CLUSTERS * CS) as usize];
    volume.read(0, &mut buf).unwrap();
    compare(&buf, &model.clusters, name)?;
    let snapshots = volume.snapshots();
    prop_assert_eq!(
        snapshots.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
        model
            .snapshots
            .iter()
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>(),
        "snapshots of {}",
        name
    );
    for (snapshot, expected) in &model.snapshots {
        let view = volume.snapshot_view(snapshot).unwrap();
        view.read(0, &mut buf).unwrap();
        compare(&buf, expected, &format!("{name}@{snapshot}"))?;
    }
    Ok(())
}

fn compare(buf: &[u8], expected: &[Option<u32>], what: &str) -> Result<(), TestCaseError> {
    for (cluster, seed) in expected.iter().enumerate() {
        let got = &buf[cluster * CS as usize..(cluster + 1) * CS as usize];
        match seed {
            Some(seed) => prop_assert!(
                got == &content(*seed)[..],
                "{}: cluster {} is not content {}",
                what,
                cluster,
                seed
            ),
            None => prop_assert!(
                got.iter().all(|b| *b == 0),
                "{}: cluster {} is not zero",
                what,
                cluster
            ),
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        volume: usize,
        cluster: u64,
        count: u64,
    },
    Trim {
        volume: usize,
        cluster: u64,
        count: u64,
    },
    Snapshot {
        volume: usize,
    },
    Clone {
        volume: usize,
        snapshot: usize,
    },
    Rollback {
        volume: usize,
        snapshot: usize,
    },
    DeleteSnapshot {
        volume: usize,
        snapshot: usize,
    },
    Scrub {
        volume: usize,
    },
    Restart,
    RestartFromBackend,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..4usize, 0..CLUSTERS, 1..6u64).prop_map(|(volume, cluster, count)| Op::Write { volume, cluster, count }),
        2 => (0..4usize, 0..CLUSTERS, 1..12u64).prop_map(|(volume, cluster, count)| Op::Trim { volume, cluster, count }),
        3 => (0..4usize).prop_map(|volume| Op::Snapshot { volume }),
        2 => (0..4usize, 0..4usize).prop_map(|(volume, snapshot)| Op::Clone { volume, snapshot }),
        1 => (0..4usize, 0..4usize).prop_map(|(volume, snapshot)| Op::Rollback { volume, snapshot }),
        2 => (0..4usize, 0..4usize).prop_map(|(volume, snapshot)| Op::DeleteSnapshot { volume, snapshot }),
        2 => (0..4usize).prop_map(|volume| Op::Scrub { volume }),
        1 => Just(Op::Restart),
        1 => Just(Op::RestartFromBackend),
    ]
}

/// Run `ops` from one volume `v0`, encrypted at rest (and so are its clones) if `encrypted`.
fn run(ops: Vec<Op>, encrypted: bool) -> Result<(), TestCaseError> {
    let mut rig = Rig::new();
    let key = rig.root.join("volume.key");
    std::fs::write(&key, [0x42; 32]).unwrap();
    let v0 = VolumeOptions {
        encryption_key_file: encrypted.then_some(key),
        ..options()
    };
    rig.manager.create("v0", &v0).unwrap();
    let mut names = vec!["v0".to_string()];
    let mut models: BTreeMap<String, ModelVolume> = BTreeMap::new();
    models.insert(
        "v0".into(),
        ModelVolume {
            clusters: vec![None; CLUSTERS as usize],
            ..ModelVolume::default()
        },
    );
    let mut seed = 1u32;
    let mut counter = 0;
    for op in ops {
        match op {
            Op::Write {
                volume,
                cluster,
                count,
            } => {
                let name = &names[volume % names.len()];
                let end = (cluster + count).min(CLUSTERS);
                let mut data = Vec::new();
                let model = models.get_mut(name).unwrap();
                for c in cluster..end {
                    seed += 1;
                    data.extend(content(seed));
                    model.clusters[c as usize] = Some(seed);
                }
                rig.manager
                    .get(name)
                    .unwrap()
                    .write(cluster * CS, &data, false)
                    .unwrap();
            }
            Op::Trim {
                volume,
                cluster,
                count,
            } => {
                let name = &names[volume % names.len()];
                let end = (cluster + count).min(CLUSTERS);
                rig.manager
                    .get(name)
                    .unwrap()
                    .discard(cluster * CS, (end - cluster) * CS)
                    .unwrap();
                let model = models.get_mut(name).unwrap();
                for c in cluster..end {
                    model.clusters[c as usize] = None;
                }
            }
            Op::Snapshot { volume } => {
                let name = &names[volume % names.len()];
                counter += 1;
                let snapshot = format!("s{counter}");
                rig.manager
                    .get(name)
                    .unwrap()
                    .snapshot_create(&snapshot)
                    .unwrap();
                let model = models.get_mut(name).unwrap();
                let state = model.clusters.clone();
                model.snapshots.push((snapshot, state));
            }
            Op::Clone { volume, snapshot } => {
                let name = names[volume % names.len()].clone();
                let model = models[&name].clone();
                if model.snapshots.is_empty() || names.len() >= 6 {
                    continue;
                }
                let (snap, state) = &model.snapshots[snapshot % model.snapshots.len()];
                counter += 1;
                let clone = format!("c{counter}");
                rig.manager
                    .clone_volume(&clone, &name, snap, &options(), Duration::from_secs(30))
                    .unwrap();
                names.push(clone.clone());
                models.insert(
                    clone,
                    ModelVolume {
                        clusters: state.clone(),
                        snapshots: Vec::new(),
                    },
                );
            }
            Op::Rollback { volume, snapshot } => {
                let name = &names[volume % names.len()];
                let model = models.get_mut(name).unwrap();
                if model.snapshots.is_empty() {
                    continue;
                }
                let index = snapshot % model.snapshots.len();
                let volume = rig.manager.get(name).unwrap();
                let has_later_clones = volume.snapshots()[index + 1..]
                    .iter()
                    .any(|s| !s.clones.is_empty());
                let result = volume.rollback(&model.snapshots[index].0);
                if has_later_clones {
                    prop_assert!(
                        matches!(result, Err(VolumeError::HasClones { .. })),
                        "rollback past a cloned snapshot: {:?}",
                        result
                    );
                } else {
                    result.unwrap();
                    model.clusters = model.snapshots[index].1.clone();
                    model.snapshots.truncate(index + 1);
                }
            }
            Op::DeleteSnapshot { volume, snapshot } => {
                let name = &names[volume % names.len()];
                let model = models.get_mut(name).unwrap();
                if model.snapshots.is_empty() {
                    continue;
                }
                let index = snapshot % model.snapshots.len();
                let volume = rig.manager.get(name).unwrap();
                let has_clones = !volume.snapshots()[index].clones.is_empty();
                let result = volume.snapshot_delete(&model.snapshots[index].0);
                if has_clones {
                    prop_assert!(
                        matches!(result, Err(VolumeError::HasClones { .. })),
                        "deleting a cloned snapshot: {:?}",
                        result
                    );
                } else {
                    result.unwrap();
                    model.snapshots.remove(index);
                }
            }
            Op::Scrub { volume } => {
                let name = &names[volume % names.len()];
                let volume = rig.manager.get(name).unwrap();
                volume.flush().unwrap();
                volume.close_current_tlog().unwrap();
                volume
                    .wait_for_uploads(std::time::Instant::now() + Duration::from_secs(30))
                    .then_some(())
                    .expect("uploads finish");
                volume.scrub(None, &mut |_| {}).unwrap();
                // A second scrub finds nothing left behind.
                let again = volume.scrub(None, &mut |_| {}).unwrap();
                prop_assert_eq!(again.orphans_deleted, 0, "leaked objects after scrub");
                prop_assert_eq!(again.scos_deleted, 0);
            }
            Op::Restart => rig.restart(),
            Op::RestartFromBackend => rig.restart_from_backend(),
        }
        for name in &names {
            check_volume(&rig, name, &models[name])?;
        }
    }
    // Everything the backend holds is referenced.
    for name in &names {
        let volume = rig.manager.get(name).unwrap();
        volume.flush().unwrap();
        volume.close_current_tlog().unwrap();
        assert!(volume.wait_for_uploads(std::time::Instant::now() + Duration::from_secs(30)));
        prop_assert_eq!(
            volume.sweep().unwrap(),
            0,
            "unreferenced objects in {}",
            name
        );
    }
    let _ = rig.backend.list_namespaces();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 200, .. ProptestConfig::default() })]
    #[test]
    fn snapshots_clones_rollback_scrub_match_the_model(ops in prop::collection::vec(arb_op(), 1..40)) {
        run(ops, false)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, max_shrink_iters: 200, .. ProptestConfig::default() })]
    /// The same with encryption at rest: clusters move between SCOs (scrub), are read from
    /// ancestors (clones) and from snapshots, and still decrypt (the tweak is the cluster index).
    #[test]
    fn encrypted_volumes_match_the_model_too(ops in prop::collection::vec(arb_op(), 1..40)) {
        run(ops, true)?;
    }
}

#[test]
fn scrub_frees_overwritten_data_and_keeps_snapshots() {
    let rig = Rig::new();
    let volume = rig.manager.create("v", &options()).unwrap();
    let mut model = ModelVolume {
        clusters: vec![None; CLUSTERS as usize],
        ..ModelVolume::default()
    };
    for round in 0..6u32 {
        for c in 0..CLUSTERS {
            let seed = round * 1000 + c as u32;
            volume.write(c * CS, &content(seed), false).unwrap();
            model.clusters[c as usize] = Some(seed);
        }
        if round == 2 {
            volume.snapshot_create("keep").unwrap();
            model
                .snapshots
                .push(("keep".into(), model.clusters.clone()));
        }
    }
    volume.flush().unwrap();
    volume.close_current_tlog().unwrap();
    assert!(volume.wait_for_uploads(std::time::Instant::now() + Duration::from_secs(30)));
    let objects_before = rig.backend.list("v").unwrap().len();
    let report = volume.scrub(None, &mut |_| {}).unwrap();
    assert!(report.scos_deleted > 0, "{report:?}");
    assert!(report.tlogs_after < report.tlogs_before, "{report:?}");
    let objects_after = rig.backend.list("v").unwrap().len();
    assert!(
        objects_after < objects_before,
        "{objects_before} -> {objects_after}"
    );
    check_volume(&rig, "v", &model).unwrap();
    // Deleting the snapshot frees what only it kept alive.
    volume.snapshot_delete("keep").unwrap();
    model.snapshots.clear();
    let report = volume.scrub(None, &mut |_| {}).unwrap();
    assert!(report.scos_deleted > 0, "{report:?}");
    check_volume(&rig, "v", &model).unwrap();
}

/// Scrub and rollback cut off after every possible number of backend mutations, followed by a
/// restart: contents and snapshots are intact, and a re-run leaves no unreferenced object.
#[test]
fn interrupted_scrub_and_rollback_lose_nothing_and_leak_nothing() {
    use vstor_volumedriver::{Volume, VolumeConfig};
    for operation in ["scrub", "rollback"] {
        for cut in 0..24i64 {
            let tmp = tempfile::tempdir().unwrap();
            let store = Arc::new(FaultStore::open(&tmp.path().join("backend")));
            let dir = tmp.path().join("wb");
            let config = VolumeConfig::new("v", &options(), 0).unwrap();
            let volume = Volume::create(&dir, store.clone(), config).unwrap();
            let mut model = ModelVolume {
                clusters: vec![None; CLUSTERS as usize],
                ..ModelVolume::default()
            };
            for round in 0..4u32 {
                for c in (u64::from(round) % 3..CLUSTERS).step_by(2) {
                    let seed = round * 1000 + c as u32;
                    volume.write(c * CS, &content(seed), false).unwrap();
                    model.clusters[c as usize] = Some(seed);
                }
                if round == 1 {
                    volume.snapshot_create("mid").unwrap();
                    model.snapshots.push(("mid".into(), model.clusters.clone()));
                }
            }
            volume.close_current_tlog().unwrap();
            volume.drain_uploads().unwrap();
            store.cut_after(cut);
            let finished = match operation {
                "scrub" => volume.scrub(None, &mut |_| {}).is_ok(),
                _ => {
                    let done = volume.rollback("mid").is_ok();
                    if done {
                        model.clusters = model.snapshots[0].1.clone();
                    }
                    done
                }
            };
            // The process dies here, whatever state the operation reached.
            volume.stop();
            drop(volume);
            store.set_failing(false);
            let reopened = Volume::open(&dir, store.clone(), "v").unwrap();
            if operation == "rollback" && !finished {
                // A rollback whose decision reached the disk completes at restart; one that did
                // not never happened. Either way the volume is one of the two states.
                let mut buf = vec![0u8; (CLUSTERS * CS) as usize];
                reopened.read(0, &mut buf).unwrap();
                let at_snapshot = compare(&buf, &model.snapshots[0].1, "v").is_ok();
                if at_snapshot {
                    model.clusters = model.snapshots[0].1.clone();
                }
            }
            let mut buf = vec![0u8; (CLUSTERS * CS) as usize];
            reopened.read(0, &mut buf).unwrap();
            compare(&buf, &model.clusters, &format!("{operation} cut at {cut}")).unwrap();
            let view = reopened.snapshot_view("mid").unwrap();
            view.read(0, &mut buf).unwrap();
            compare(
                &buf,
                &model.snapshots[0].1,
                &format!("{operation} cut at {cut}: snapshot"),
            )
            .unwrap();
            reopened.drain_uploads().unwrap();
            reopened.scrub(None, &mut |_| {}).unwrap();
            let again = reopened.scrub(None, &mut |_| {}).unwrap();
            assert_eq!(
                again.orphans_deleted, 0,
                "{operation} cut at {cut}: {again:?}"
            );
            assert_eq!(reopened.sweep().unwrap(), 0, "{operation} cut at {cut}");
            reopened.read(0, &mut buf).unwrap();
            compare(
                &buf,
                &model.clusters,
                &format!("{operation} cut at {cut}, scrubbed"),
            )
            .unwrap();
        }
    }
}

/// Clones of clones down to the deepest chain a clone id can express: every level reads its own
/// write plus everything inherited; one level more is refused with a clear error.
#[test]
fn clone_chains_255_deep() {
    let rig = Rig::new();
    let small = VolumeOptions {
        size: 256 * CS,
        ..options()
    };
    rig.manager.create("c0", &small).unwrap();
    let mut expected: Vec<Option<u32>> = vec![None; 256];
    for depth in 0..=255u32 {
        let name = format!("c{depth}");
        let volume = rig.manager.get(&name).unwrap();
        volume
            .write(u64::from(depth) * CS, &content(depth + 1), false)
            .unwrap();
        expected[depth as usize] = Some(depth + 1);
        volume.snapshot_create("s").unwrap();
        let next = format!("c{}", depth + 1);
        let cloned = rig
            .manager
            .clone_volume(&next, &name, "s", &small, Duration::from_secs(30));
        if depth == 255 {
            let err = cloned.err().expect("a 256th level is refused");
            assert!(err.to_string().contains("at most 255"), "{err}");
            break;
        }
        let clone = cloned.unwrap();
        assert_eq!(clone.config().ancestors.len(), depth as usize + 1);
    }
    for depth in [1u32, 17, 128, 255] {
        let volume = rig.manager.get(&format!("c{depth}")).unwrap();
        let mut buf = vec![0u8; (256 * CS) as usize];
        volume.read(0, &mut buf).unwrap();
        let upto: Vec<Option<u32>> = expected
            .iter()
            .enumerate()
            .map(|(i, s)| s.filter(|_| i as u32 <= depth))
            .collect();
        compare(&buf, &upto, &format!("c{depth}")).unwrap();
    }
}

/// Snapshots survive a crash right after creation (no FLUSH), a torn record at the end of the
/// snapshot log is ignored, and a later durable change folds the log into the base file.
#[test]
fn snapshot_log_survives_crashes_and_torn_tails() {
    use vstor_volumedriver::{Volume, VolumeConfig};
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(tmp.path().join("backend")).unwrap());
    let dir = tmp.path().join("wb");
    let volume = Volume::create(
        &dir,
        store.clone(),
        VolumeConfig::new("v", &options(), 0).unwrap(),
    )
    .unwrap();
    for i in 0..3u32 {
        volume.write(u64::from(i) * CS, &content(i), false).unwrap();
        volume.snapshot_create(&format!("s{i}")).unwrap();
    }
    volume.stop();
    drop(volume);
    // A record cut short by the crash.
    let log = dir.join("snapshots.log");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, b'{']);
    std::fs::write(&log, bytes).unwrap();
    let reopened = Volume::open(&dir, store.clone(), "v").unwrap();
    let names: Vec<String> = reopened.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s0", "s1", "s2"]);
    let mut buf = vec![0u8; (CLUSTERS * CS) as usize];
    reopened
        .snapshot_view("s1")
        .unwrap()
        .read(0, &mut buf)
        .unwrap();
    let mut expected = vec![None; CLUSTERS as usize];
    expected[0] = Some(0);
    expected[1] = Some(1);
    compare(&buf, &expected, "v@s1").unwrap();
    let log_before_delete = std::fs::read(&log).unwrap();
    reopened.snapshot_delete("s0").unwrap();
    assert_eq!(std::fs::metadata(&log).map_or(0, |m| m.len()), 0);
    // A crash after the base file was rewritten but before the log was emptied: the deleted
    // snapshot's record is still in the log and must stay deleted.
    reopened.stop();
    drop(reopened);
    std::fs::write(&log, &log_before_delete).unwrap();
    let reopened = Volume::open(&dir, store.clone(), "v").unwrap();
    let names: Vec<String> = reopened.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        ["s1", "s2"],
        "a deleted snapshot came back from the log"
    );
    reopened.snapshot_create("s3").unwrap();
    reopened.stop();
    drop(reopened);
    let again = Volume::open(&dir, store, "v").unwrap();
    let names: Vec<String> = again.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1", "s2", "s3"]);
}

/// After a restart from the backend alone, the snapshots the backend knows are kept when the
/// next snapshot starts a new local log.
#[test]
fn snapshots_from_the_backend_survive_the_next_local_snapshot() {
    let mut rig = Rig::new();
    let volume = rig.manager.create("v", &options()).unwrap();
    volume.snapshot_create("s1").unwrap();
    volume.write(0, &content(1), false).unwrap();
    drop(volume);
    rig.restart_from_backend();
    rig.manager.get("v").unwrap().snapshot_create("s2").unwrap();
    rig.restart();
    let names: Vec<String> = rig
        .manager
        .get("v")
        .unwrap()
        .snapshots()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["s1", "s2"]);
}

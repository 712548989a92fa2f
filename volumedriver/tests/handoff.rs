//! Fencing and hand-off in the engine: a fenced volume acknowledges no write, trim or flush but
//! still reads; `release` puts everything on the backend before a volume leaves (and keeps
//! serving when it cannot); `drop_moved` forgets a volume another node took and says where it
//! went. Two managers share one backend directory, as two nodes share a backend.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::FaultStore;
use vstor_backend::ObjectStore;
use vstor_volumedriver::{ManagerConfig, VolumeError, VolumeManager, VolumeOptions};

const CS: u64 = 4096;

fn node(root: &Path, name: &str, backend: &Arc<FaultStore>) -> Arc<VolumeManager> {
    let config = ManagerConfig {
        max_open_age: None,
        ..ManagerConfig::under(&root.join(name), 1 << 30)
    };
    VolumeManager::open(config, backend.clone()).unwrap()
}

fn pattern(cluster: u64, round: u64) -> Vec<u8> {
    (0..CS)
        .map(|i| (i as u8) ^ (cluster as u8).rotate_left(2) ^ (round as u8).wrapping_mul(29))
        .collect()
}

/// 4 MiB volume with small SCOs so a few hundred writes span several SCOs and TLogs.
fn options() -> VolumeOptions {
    VolumeOptions {
        sco_size: 4 << 20,
        ..VolumeOptions::new(1024 * CS)
    }
}

fn check(manager: &VolumeManager, name: &str, written: &[(u64, Vec<u8>)]) {
    let volume = manager.get(name).unwrap();
    let mut buf = vec![0u8; CS as usize];
    for (cluster, want) in written {
        volume.read(cluster * CS, &mut buf).unwrap();
        assert!(&buf == want, "cluster {cluster} of {name} differs");
    }
}

#[test]
fn fenced_volume_refuses_writes_trims_and_flushes_but_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    let volume = a.create("fenceme", &options()).unwrap();
    let old = pattern(7, 1);
    volume.write(7 * CS, &old, false).unwrap();

    volume.set_fenced(Some("this node lost its cluster lease".into()));
    assert!(volume.fenced().is_some());
    assert_eq!(volume.info().state, "fenced");
    let err = volume.write(7 * CS, &pattern(7, 2), false).unwrap_err();
    assert!(matches!(err, VolumeError::Fenced { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("fenceme") && message.contains("lost its cluster lease"),
        "{message}"
    );
    assert!(matches!(
        volume.write_deferred(8 * CS, &pattern(8, 2)),
        Err(VolumeError::Fenced { .. })
    ));
    assert!(matches!(volume.flush(), Err(VolumeError::Fenced { .. })));
    assert!(matches!(
        volume.discard(7 * CS, CS),
        Err(VolumeError::Fenced { .. })
    ));
    for allocate in [false, true] {
        assert!(matches!(
            volume.write_zeroes(7 * CS, CS, allocate, false),
            Err(VolumeError::Fenced { .. })
        ));
    }
    // Reads still work and see exactly the acknowledged data.
    let mut buf = vec![0u8; CS as usize];
    volume.read(7 * CS, &mut buf).unwrap();
    assert_eq!(buf, old);
    volume.read(8 * CS, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0), "refused write landed");

    volume.set_fenced(None);
    assert!(volume.info().fenced.is_none());
    assert_eq!(volume.info().state, "running");
    let new = pattern(7, 3);
    volume.write(7 * CS, &new, true).unwrap();
    volume.flush().unwrap();
    volume.read(7 * CS, &mut buf).unwrap();
    assert_eq!(buf, new);
}

#[test]
fn release_puts_everything_on_the_backend_and_another_node_adopts_it() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    let volume = a.create("moving", &options()).unwrap();
    let tag = volume.info().owner_tag;
    let written: Vec<(u64, Vec<u8>)> = (0..600u64)
        .map(|i| {
            let cluster = (i * 37) % 1024;
            (cluster, pattern(cluster, i))
        })
        .collect();
    let mut last = std::collections::BTreeMap::new();
    for (cluster, data) in &written {
        // No flush: release itself must make all of it durable and uploaded.
        volume.write(cluster * CS, data, false).unwrap();
        last.insert(*cluster, data.clone());
    }
    let last: Vec<(u64, Vec<u8>)> = last.into_iter().collect();

    a.release("moving", Duration::from_secs(60)).unwrap();
    assert!(volume.is_stopped());
    assert!(matches!(a.get("moving"), Err(VolumeError::NotFound { .. })));
    assert!(a.names().is_empty());
    assert!(!tmp.path().join("a/write-buffer/moving").exists());
    assert!(matches!(
        volume.write(0, &pattern(0, 0), false),
        Err(VolumeError::Stopped { .. } | VolumeError::Refused { .. })
    ));
    // The registry file forgot it: a restart of node a does not bring it back.
    drop(a);
    let a = node(tmp.path(), "a", &backend);
    assert!(a.names().is_empty() && a.failed().is_empty());

    // Node b adopts from the backend alone (no DTL: mode none) and has every write.
    let b = node(tmp.path(), "b", &backend);
    let (adopted, summary) = b.adopt("moving").unwrap();
    assert_eq!(summary.applied, 0);
    assert!(adopted.info().owner_tag > tag);
    check(&b, "moving", &last);
}

/// The lock-free facts the edge server checks per request follow the volume: its owner tag, the
/// fence, DTL sync (none without a DTL) and whether it is still served here.
#[test]
fn served_facts_follow_fence_release_and_adoption() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    let volume = a.create("facts", &options()).unwrap();
    let tag = volume.info().owner_tag;
    assert_eq!(volume.owner_tag(), tag);
    assert!(!volume.is_gone());
    assert!(!volume.dtl_in_sync(), "no DTL: not in sync");
    volume.set_fenced(Some("test fence".into()));
    assert_eq!(volume.fenced().as_deref(), Some("test fence"));
    volume.set_fenced(None);
    volume.write(0, &pattern(0, 1), false).unwrap();
    a.release("facts", Duration::from_secs(60)).unwrap();
    assert!(volume.is_gone(), "released: no longer served here");
    let b = node(tmp.path(), "b", &backend);
    let (adopted, _) = b.adopt("facts").unwrap();
    assert!(adopted.owner_tag() > tag);
    assert_eq!(adopted.owner_tag(), adopted.info().owner_tag);
    assert!(!adopted.is_gone());
}

#[test]
fn release_that_cannot_upload_in_time_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    let volume = a.create("stuck", &options()).unwrap();
    let first = pattern(3, 1);
    volume.write(3 * CS, &first, false).unwrap();
    backend.set_failing(true);
    let err = a.release("stuck", Duration::from_millis(500)).unwrap_err();
    assert!(matches!(err, VolumeError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("stays on this node"), "{err}");
    // Still served, accepting writes again.
    let served = a.get("stuck").unwrap();
    assert!(Arc::ptr_eq(&served, &volume));
    let second = pattern(4, 1);
    volume.write(4 * CS, &second, false).unwrap();
    // With the backend back the release goes through and nothing is missing.
    backend.set_failing(false);
    a.release("stuck", Duration::from_secs(60)).unwrap();
    let b = node(tmp.path(), "b", &backend);
    b.adopt("stuck").unwrap();
    check(&b, "stuck", &[(3, first), (4, second)]);
}

#[test]
fn drop_moved_forgets_the_volume_and_says_where_it_went() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    let volume = a.create("taken", &options()).unwrap();
    let data = pattern(9, 1);
    volume.write(9 * CS, &data, true).unwrap();
    a.release("taken", Duration::from_secs(60)).unwrap();
    // Simulate the failover case: a serves it again, then b adopts behind its back.
    a.adopt("taken").unwrap();
    let b = node(tmp.path(), "b", &backend);
    b.adopt("taken").unwrap();

    a.drop_moved("taken", "node-b").unwrap();
    let err = a.get("taken").err().expect("volume still served");
    assert!(matches!(err, VolumeError::Moved { .. }), "{err}");
    assert!(err.to_string().contains("node-b"), "{err}");
    assert_eq!(a.moved().get("taken").map(String::as_str), Some("node-b"));
    assert!(a.names().is_empty());
    assert!(!tmp.path().join("a/write-buffer/taken").exists());
    // Unknown volumes are an error; dropping twice is harmless.
    assert!(matches!(
        a.drop_moved("nothere", "node-b"),
        Err(VolumeError::NotFound { .. })
    ));
    a.drop_moved("taken", "node-b").unwrap();
    // The backend data stayed for b.
    check(&b, "taken", &[(9, data)]);
    // A restart of a does not bring it back.
    drop(a);
    let a = node(tmp.path(), "a", &backend);
    assert!(a.names().is_empty() && a.failed().is_empty());
}

#[test]
fn adopt_with_tag_uses_the_registry_tag_and_refuses_an_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    let volume = a.create("tagged", &options()).unwrap();
    let data = pattern(5, 5);
    volume.write(5 * CS, &data, true).unwrap();
    let tag = volume.info().owner_tag;
    a.release("tagged", Duration::from_secs(60)).unwrap();
    let b = node(tmp.path(), "b", &backend);
    // The registry's tag may jump ahead of the backend's: the backend follows it.
    let (adopted, _) = b.adopt_with_tag("tagged", tag + 5).unwrap();
    assert_eq!(adopted.info().owner_tag, tag + 5);
    check(&b, "tagged", &[(5, data)]);
    // A tag that is not newer than the backend's is refused: another node got there first.
    let c = node(tmp.path(), "c", &backend);
    for stale in [tag + 5, tag + 1] {
        let err = c
            .adopt_with_tag("tagged", stale)
            .err()
            .expect("stale tag adopted");
        assert!(matches!(err, VolumeError::Adopted { .. }), "{err}");
    }
    assert!(c.names().is_empty());
    // b still serves it.
    b.get("tagged")
        .unwrap()
        .write(6 * CS, &pattern(6, 6), true)
        .unwrap();
}

/// No clone known to exist elsewhere.
fn none() -> std::collections::BTreeSet<String> {
    std::collections::BTreeSet::new()
}

/// A volume the cluster names this node the owner of, but that it does not serve (halted, or a
/// leftover record): the check refuses one served here, one another node claimed with a newer
/// tag and one whose snapshots have clones, and removes nothing; the purge removes the backend
/// namespace and frees the name.
#[test]
fn an_unserved_volume_is_checked_before_it_is_purged() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    let b = node(tmp.path(), "b", &backend);
    let served = a.create("served", &options()).unwrap();
    let err = a
        .check_unserved_delete("served", served.info().owner_tag, &none())
        .unwrap_err();
    assert!(matches!(err, VolumeError::InvalidConfig { .. }), "{err}");

    let gone = a.create("gone", &options()).unwrap();
    gone.write(3 * CS, &pattern(3, 1), true).unwrap();
    let tag = gone.info().owner_tag;
    a.release("gone", Duration::from_secs(60)).unwrap();
    // A record older than the backend's claim: another node took the volume.
    let err = b
        .check_unserved_delete("gone", tag - 1, &none())
        .unwrap_err();
    assert!(matches!(err, VolumeError::Adopted { .. }), "{err}");

    // Clones read a parent's SCOs: a parent with a clone stays.
    let parent = a.create("parent", &options()).unwrap();
    parent.write(0, &pattern(0, 1), true).unwrap();
    parent.snapshot_create("s").unwrap();
    a.clone_volume("child", "parent", "s", &options(), Duration::from_secs(30))
        .unwrap();
    let parent_tag = parent.info().owner_tag;
    a.release("parent", Duration::from_secs(60)).unwrap();
    let err = b
        .check_unserved_delete("parent", parent_tag, &none())
        .unwrap_err();
    assert!(
        matches!(&err, VolumeError::HasClones { clones, .. } if clones == &["child"]),
        "{err}"
    );
    assert!(backend.namespace_exists("parent").unwrap());

    let unserved = b.check_unserved_delete("gone", tag, &none()).unwrap();
    assert!(unserved.has_backend_data());
    assert!(backend.namespace_exists("gone").unwrap());
    assert_eq!(b.purge_unserved(unserved), Vec::<String>::new());
    assert!(!backend.namespace_exists("gone").unwrap());
    // Nothing of it is left to adopt, and the name is free.
    assert!(matches!(b.adopt("gone"), Err(VolumeError::NotFound { .. })));
    let again = a.create("gone", &options()).unwrap();
    let mut buf = vec![0xffu8; CS as usize];
    again.read(3 * CS, &mut buf).unwrap();
    assert!(buf.iter().all(|x| *x == 0), "old data in the new volume");

    // A clone: the parent's snapshot stops listing it when the parent is served here...
    let p2 = a.create("p2", &options()).unwrap();
    p2.write(0, &pattern(0, 2), true).unwrap();
    p2.snapshot_create("s").unwrap();
    let c2 = a
        .clone_volume("c2", "p2", "s", &options(), Duration::from_secs(30))
        .unwrap();
    let c2_tag = c2.info().owner_tag;
    a.release("c2", Duration::from_secs(60)).unwrap();
    let unserved = a.check_unserved_delete("c2", c2_tag, &none()).unwrap();
    assert_eq!(a.purge_unserved(unserved), Vec::<String>::new());
    assert!(p2.clones().is_empty());
    a.delete("p2").unwrap();
    // ... and says it could not when the parent is not.
    let child_tag = a.get("child").unwrap().info().owner_tag;
    a.release("child", Duration::from_secs(60)).unwrap();
    let unserved = b
        .check_unserved_delete("child", child_tag, &none())
        .unwrap();
    let left = b.purge_unserved(unserved);
    assert!(
        left.len() == 1 && left[0].contains("clone list of parent's snapshot s"),
        "{left:?}"
    );
    assert!(!backend.namespace_exists("child").unwrap());
    // So "parent" still lists "child" on the backend; a clone that is gone does not hold its
    // delete up, one the registry knows of (or a namespace naming the snapshot) does.
    assert_eq!(b.backend_listed_clones("parent").unwrap(), ["child"]);
    let known: std::collections::BTreeSet<String> = ["child".to_string()].into();
    let err = b
        .check_unserved_delete("parent", parent_tag, &known)
        .unwrap_err();
    assert!(matches!(err, VolumeError::HasClones { .. }), "{err}");
    let unserved = b
        .check_unserved_delete("parent", parent_tag, &none())
        .unwrap();
    assert_eq!(b.purge_unserved(unserved), Vec::<String>::new());
    assert!(!backend.namespace_exists("parent").unwrap());

    // A record whose volume never reached the backend (a rolled-back create).
    let never = b.check_unserved_delete("never", 1, &none()).unwrap();
    assert!(!never.has_backend_data());
    assert_eq!(b.purge_unserved(never), Vec::<String>::new());
}

/// A node back from a fence that finds no cluster record of a volume it serves asks the backend
/// whether the volume is still its own: not when its namespace was deleted, claimed with a newer
/// owner tag, or holds another volume of the same name.
#[test]
fn backend_lost_tells_a_deleted_taken_or_replaced_volume_from_ours() {
    use vstor_volumedriver::config::{VolumeConfig, CONFIG_OBJECT};
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    for name in ["kept", "deleted", "taken", "replaced"] {
        a.create(name, &options()).unwrap();
    }
    assert_eq!(a.backend_lost("kept").unwrap(), None);

    backend.delete_namespace("deleted").unwrap();
    let why = a.backend_lost("deleted").unwrap().expect("deleted");
    assert!(why.contains("deleted"), "{why}");

    let tag = a.get("taken").unwrap().info().owner_tag;
    backend.claim("taken", tag + 1).unwrap();
    let why = a.backend_lost("taken").unwrap().expect("taken");
    assert!(why.contains(&format!("owner tag {}", tag + 1)), "{why}");

    // Another volume of the same name, created later, under the same tag.
    let mut other = VolumeConfig::load_from_backend(backend.as_ref(), "replaced").unwrap();
    other.created += 60;
    other.incarnation += 60_000_000_000;
    backend
        .put("replaced", CONFIG_OBJECT, &other.encode())
        .unwrap();
    let why = a.backend_lost("replaced").unwrap().expect("replaced");
    assert!(why.contains("another volume of the same name"), "{why}");
    // Both incarnations are named: two volumes of one second are told apart in the message too.
    assert!(
        why.contains(&format!("incarnation {}", other.incarnation))
            && why.contains(&format!(
                "incarnation {}",
                other.incarnation - 60_000_000_000
            )),
        "{why}"
    );

    assert!(matches!(
        a.backend_lost("nosuch"),
        Err(VolumeError::NotFound { .. })
    ));
}

/// Write clusters 0 to 7 with `pattern(cluster, round)`; returns what was written.
fn write_round(volume: &vstor_volumedriver::Volume, round: u64) -> Vec<(u64, Vec<u8>)> {
    (0..8)
        .map(|cluster| {
            let data = pattern(cluster, round);
            volume.write(cluster * CS, &data, false).unwrap();
            (cluster, data)
        })
        .collect()
}

/// Every object of `namespace` with its content (none when the namespace is gone).
/// The cluster deleted "vol" and created it again on node "b" (under `root`), at the same owner
/// tag as the cut-off node's copy `zombie`, and wrote `round` to it, all on the backend. Returns
/// node b, what it wrote, and the backend's objects of "vol" then.
#[allow(clippy::type_complexity)] // test helper: the three things a caller checks
fn recreated_on_b(
    root: &Path,
    backend: &Arc<FaultStore>,
    zombie: &vstor_volumedriver::Volume,
    round: u64,
) -> (
    Arc<VolumeManager>,
    Vec<(u64, Vec<u8>)>,
    Vec<(String, Vec<u8>)>,
) {
    backend.delete_namespace("vol").unwrap();
    let b = node(root, "b", backend);
    let new = b.create("vol", &options()).unwrap();
    assert_eq!(new.owner_tag(), zombie.owner_tag(), "the dangerous case");
    let written = write_round(&new, round);
    new.flush().unwrap();
    new.close_current_tlog().unwrap();
    new.drain_uploads().unwrap();
    let before = objects(backend, "vol");
    (b, written, before)
}

fn objects(backend: &FaultStore, namespace: &str) -> Vec<(String, Vec<u8>)> {
    let mut names = match backend.list(namespace) {
        Ok(names) => names,
        Err(vstor_backend::BackendError::NoSuchNamespace { .. }) => Vec::new(),
        Err(e) => panic!("cannot list {namespace}: {e}"),
    };
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let bytes = backend.get(namespace, &name).unwrap();
            (name, bytes)
        })
        .collect()
}

/// A fenced node (cut off; another node may own the volume by now) uploads nothing of it. Else,
/// once the volume was deleted and re-created under the same name, which starts again at the
/// same owner tag, the old node's pending SCO and TLog would overwrite the new volume's objects
/// of the same names. When the fence lifts because the volume is still this node's, the paused
/// uploads go out.
#[test]
fn a_fenced_volume_uploads_nothing_and_resumes_when_the_fence_lifts() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);

    // Old node: writes whose TLog and SCO could not be uploaded before the node was cut off.
    let zombie = a.create("vol", &options()).unwrap();
    let kept = a.create("kept", &options()).unwrap();
    backend.set_failing(true);
    for volume in [&zombie, &kept] {
        write_round(volume, 1);
        volume.flush().unwrap();
        volume.close_current_tlog().unwrap();
        assert!(volume.pending_uploads() > 0);
        volume.set_fenced(Some("this node lost its cluster lease".into()));
    }

    // The backend is reachable again: from here on the old node's scheduler would upload.
    backend.set_failing(false);
    // Meanwhile the cluster deleted "vol" and created it again on another node, at tag 1 too.
    let (b, written, before) = recreated_on_b(tmp.path(), &backend, &zombie, 2);

    // The old node tries (its scheduler would, on every tick): nothing reaches the backend.
    for _ in 0..3 {
        let err = zombie.upload_one().unwrap_err();
        assert!(matches!(err, VolumeError::Fenced { .. }), "{err}");
    }
    assert!(zombie.pending_uploads() > 0);
    assert_eq!(
        objects(&backend, "vol"),
        before,
        "a fenced node changed the re-created volume's objects"
    );
    b.release("vol", Duration::from_secs(10)).unwrap();
    let c = node(tmp.path(), "c", &backend);
    c.adopt("vol").unwrap();
    check(&c, "vol", &written);

    // "kept" is still this node's: once unfenced, its paused uploads go out, and another node
    // adopting it from the backend alone reads the old node's writes.
    assert!(kept.upload_one().is_err(), "fenced");
    kept.set_fenced(None);
    kept.drain_uploads().unwrap();
    assert_eq!(kept.pending_uploads(), 0);
    a.release("kept", Duration::from_secs(10)).unwrap();
    c.adopt("kept").unwrap();
    let old: Vec<_> = (0..8)
        .map(|cluster| (cluster, pattern(cluster, 1)))
        .collect();
    check(&c, "kept", &old);
}

/// Uploads are not the only backend writes a fenced node could make into a namespace that is
/// another volume's by now: configuration changes, snapshots, clone bookkeeping, rollbacks,
/// scrubs and sweeps write or delete objects under the same owner tag. All are refused while
/// fenced, and work again once the fence lifts.
#[test]
fn a_fenced_volume_changes_nothing_on_the_backend_and_works_again_unfenced() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    let zombie = a.create("vol", &options()).unwrap();
    write_round(&zombie, 1);
    zombie.snapshot_create("s1").unwrap();
    write_round(&zombie, 2);
    zombie.flush().unwrap();
    zombie.close_current_tlog().unwrap();
    zombie.drain_uploads().unwrap();
    zombie.set_fenced(Some("this node lost its cluster lease".into()));
    // The cluster deleted "vol" and created it again on another node, at tag 1 too.
    let (b, written, before) = recreated_on_b(tmp.path(), &backend, &zombie, 3);

    let size = zombie.size();
    let attempts: Vec<(&str, Result<(), VolumeError>)> = vec![
        ("resize", zombie.resize(size * 2)),
        ("read-only", zombie.set_read_only(true)),
        ("snapshot", zombie.snapshot_create("s2").map(drop)),
        ("snapshot delete", zombie.snapshot_delete("s1")),
        ("clone record", zombie.set_clone("s1", "c1", true)),
        ("rollback", zombie.rollback("s1")),
        ("scrub", zombie.scrub(None, &mut |_| {}).map(drop)),
        ("sweep", zombie.sweep().map(drop)),
        ("template", zombie.set_template().map(drop)),
    ];
    for (what, result) in attempts {
        assert!(
            matches!(result, Err(VolumeError::Fenced { .. })),
            "{what} while fenced: {result:?}"
        );
    }
    assert_eq!(
        objects(&backend, "vol"),
        before,
        "a fenced node changed the re-created volume's objects"
    );
    assert_eq!(zombie.size(), size);
    assert_eq!(zombie.snapshots().len(), 1);
    b.release("vol", Duration::from_secs(10)).unwrap();
    let c = node(tmp.path(), "c", &backend);
    c.adopt("vol").unwrap();
    check(&c, "vol", &written);

    // A volume still this node's works again once unfenced.
    let kept = a.create("kept", &options()).unwrap();
    write_round(&kept, 4);
    kept.set_fenced(Some("this node lost its cluster lease".into()));
    assert!(kept.snapshot_create("k1").is_err());
    kept.set_fenced(None);
    kept.resize(kept.size() * 2).unwrap();
    kept.snapshot_create("k1").unwrap();
    kept.flush().unwrap();
    kept.drain_uploads().unwrap();
    kept.scrub(None, &mut |_| {}).unwrap();
    assert_eq!(kept.snapshots().len(), 1);
}

/// A scrub under way when the fence goes up puts no further object, deletes nothing and does
/// not commit its TLog list; unfenced, the next scrub does the work and the data reads back.
#[test]
fn a_scrub_under_way_stops_at_the_fence() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    let volume = a.create("vol", &options()).unwrap();
    // Four TLogs, each with its own SCO: clusters 0-7 overwritten every time, and 8 clusters
    // of its own, so every SCO but the newest is half garbage and the scrub rewrites them.
    let mut model = std::collections::BTreeMap::new();
    for round in 1..=4u64 {
        for cluster in (0..8).chain(round * 8 + 8..round * 8 + 16) {
            let data = pattern(cluster, round);
            volume.write(cluster * CS, &data, false).unwrap();
            model.insert(cluster, data);
        }
        volume.flush().unwrap();
        volume.close_current_tlog().unwrap();
    }
    let written: Vec<(u64, Vec<u8>)> = model.into_iter().collect();
    volume.drain_uploads().unwrap();
    let before = objects(&backend, "vol");
    let mut rewrites = 0;
    let err = volume
        .scrub(None, &mut |p| {
            if p.phase == "rewriting SCOs" {
                rewrites += 1;
                volume.set_fenced(Some("this node lost its cluster lease".into()));
            }
        })
        .unwrap_err();
    assert!(matches!(err, VolumeError::Fenced { .. }), "{err}");
    assert_eq!(
        rewrites, 1,
        "the scrub stopped after the SCO it was writing"
    );
    let after = objects(&backend, "vol");
    for object in &before {
        assert!(after.contains(object), "{} changed or went", object.0);
    }
    assert_eq!(
        after.len(),
        before.len() + 1,
        "one rewritten SCO, unreferenced"
    );
    volume.set_fenced(None);
    let report = volume.scrub(None, &mut |_| {}).unwrap();
    assert!(report.scos_rewritten > 1, "{report:?}");
    check(&a, "vol", &written);
    a.release("vol", Duration::from_secs(10)).unwrap();
    let b = node(tmp.path(), "b", &backend);
    b.adopt("vol").unwrap();
    check(&b, "vol", &written);
}

/// A node that was down while its volume was deleted and created again elsewhere (at owner tag
/// 1 again) restarts with its old copy. The copy is not opened: it would merge the new volume's
/// TLogs and upload its own pending ones into the new namespace. It is listed as failed with the
/// reason, and deleting it there removes the local copy only.
#[test]
fn a_copy_of_a_volume_created_again_elsewhere_is_not_opened_and_its_delete_spares_the_new_one() {
    use vstor_volumedriver::config::VolumeConfig;
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    let old = a.create("vol", &options()).unwrap();
    write_round(&old, 1);
    let dir = old.dir().to_path_buf();
    // Down with writes not on the backend yet.
    backend.set_failing(true);
    assert_eq!(a.shutdown(Duration::ZERO), ["vol"]);
    drop((old, a));
    backend.set_failing(false);

    backend.delete_namespace("vol").unwrap();
    let b = node(tmp.path(), "b", &backend);
    let new = b.create("vol", &options()).unwrap();
    let written = write_round(&new, 2);
    new.flush().unwrap();
    new.close_current_tlog().unwrap();
    new.drain_uploads().unwrap();
    // The two were most likely created within the same second: their incarnations (creation
    // times in nanoseconds) tell them apart.
    let config =
        VolumeConfig::decode("vol", "config", &std::fs::read(dir.join("config")).unwrap()).unwrap();
    assert_eq!(config.owner_tag, new.owner_tag(), "the dangerous case");
    assert_ne!(config.incarnation, new.config().incarnation);
    let before = objects(&backend, "vol");

    let a = node(tmp.path(), "a", &backend);
    assert!(a.get("vol").is_err(), "the old copy is served");
    let failed = a.failed();
    let reason = failed.get("vol").expect("listed as failed");
    assert!(
        reason.contains("another volume of the same name"),
        "{reason}"
    );
    a.delete("vol").unwrap();
    assert!(!dir.exists(), "the old copy stays in the write buffer");
    assert_eq!(
        objects(&backend, "vol"),
        before,
        "the old node changed the new volume's objects"
    );
    b.release("vol", Duration::from_secs(10)).unwrap();
    let c = node(tmp.path(), "c", &backend);
    c.adopt("vol").unwrap();
    check(&c, "vol", &written);
}

/// A parent's snapshots keep listing clones deleted on other nodes; `forget_deleted_clones`
/// drops those and only those: a clone served elsewhere (its namespace names the parent), one
/// the caller knows of, and one served here stay; a deleted one and a name reused by an
/// unrelated volume go; a snapshot filter touches only that snapshot.
#[test]
fn a_parent_forgets_only_clones_that_no_longer_exist() {
    use std::collections::BTreeSet;
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let a = node(tmp.path(), "a", &backend);
    let b = node(tmp.path(), "b", &backend);
    let parent = a.create("parent", &options()).unwrap();
    parent.write(0, &pattern(0, 1), true).unwrap();
    parent.snapshot_create("s").unwrap();
    parent.snapshot_create("t").unwrap();
    let wait = Duration::from_secs(30);
    for clone in ["here", "moved", "known", "deleted", "reused", "other"] {
        let snapshot = if clone == "other" { "t" } else { "s" };
        a.clone_volume(clone, "parent", snapshot, &options(), wait)
            .unwrap();
    }
    // "moved" and "known" are served by b now; "deleted" and "reused" were deleted there, and
    // "reused" is the name of a new, unrelated volume; "other" (of snapshot t) was deleted too.
    for clone in ["moved", "known", "deleted", "reused", "other"] {
        a.release(clone, wait).unwrap();
        b.adopt(clone).unwrap();
    }
    for clone in ["deleted", "reused", "other"] {
        b.delete(clone).unwrap();
    }
    b.create("reused", &options()).unwrap();
    // A namespace the caller knows of is kept even when the backend cannot show it.
    backend.delete_namespace("known").unwrap();
    let known = BTreeSet::from(["known".to_string()]);
    let listed = |snapshot: &str| parent.snapshot(snapshot).unwrap().clones;
    assert_eq!(listed("s"), ["here", "moved", "known", "deleted", "reused"]);

    let forgotten = a
        .forget_deleted_clones("parent", Some("s"), &known)
        .unwrap();
    let pair = |s: &str, c: &str| (s.to_string(), c.to_string());
    assert_eq!(forgotten, [pair("s", "deleted"), pair("s", "reused")]);
    assert_eq!(listed("s"), ["here", "moved", "known"]);
    assert_eq!(listed("t"), ["other"], "another snapshot was touched");
    let forgotten = a.forget_deleted_clones("parent", None, &known).unwrap();
    assert_eq!(forgotten, [pair("t", "other")]);
    assert!(a
        .forget_deleted_clones("parent", None, &known)
        .unwrap()
        .is_empty());
    // What stays still keeps the parent.
    assert!(matches!(
        a.delete("parent"),
        Err(VolumeError::HasClones { .. })
    ));
}

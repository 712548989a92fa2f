//! The write path against real OSD servers (in-process, loopback): puts around OSDs that died
//! before the map knew, older versions collected after a put, deletes with an OSD down.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::time::Duration;

use super::placement::place;
use super::store::{object_key, write_slots, OsdState};
use super::testkit::{object, tier};
use crate::{BackendError, ObjectStore};

const NS: &str = "vol";
const SETTLE: Duration = Duration::from_secs(20);

/// Eight OSDs (d0: 0 3 6, d1: 1 4 7, d2: 2 5) and a 4+2 policy with c = 5, x = 2: every
/// object has two fragments in d2. Both d2 OSDs die and the map still says up: each put
/// re-routes those two fragments to the free OSDs of d0 and d1 (over x, since no OSD within
/// it is left), and reads, with and without cached holders, return every byte.
#[test]
fn puts_reroute_around_dead_osds_the_map_still_thinks_up() {
    let t = tier(8);
    t.store.create_namespace(NS, 1).unwrap();
    let slots = write_slots(&t.map.osds.lock());
    t.kill(2);
    t.kill(5);
    let objects: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("{i:08}.sco"), object(300_000 + i * 4099, i as u32)))
        .collect();
    for (name, data) in &objects {
        let placed = place(&object_key(NS, name), &slots, 6, 2).unwrap();
        assert!(placed.contains(&2) && placed.contains(&5), "{placed:?}");
        t.store
            .put(NS, name, data)
            .expect("the put goes around the dead OSDs");
    }
    assert!(t.store.wait_background(SETTLE));
    for (name, data) in &objects {
        // One fragment on each live OSD, none anywhere else.
        for id in 0..8 {
            let held = t.fragment_files(id, NS, name).len();
            let want = usize::from(id != 2 && id != 5);
            assert_eq!(held, want, "{name} on OSD {id}");
        }
        assert_eq!(
            &t.store.get(NS, name).unwrap(),
            data,
            "{name}, cached holders"
        );
        assert_eq!(
            &t.client().get(NS, name).unwrap(),
            data,
            "{name}, found anew"
        );
    }
    // Once the map knows, reads are still exact.
    t.set_state(2, OsdState::Down);
    t.set_state(5, OsdState::Down);
    for (name, data) in &objects {
        assert_eq!(&t.client().get(NS, name).unwrap(), data, "{name}");
    }
    drop(t.runtime);
}

/// With fewer live OSDs than `c`, the put fails with an error (it does not hang), and even
/// then no OSD holds two fragments of the object.
#[test]
fn a_put_with_fewer_live_osds_than_c_fails_and_never_doubles_up() {
    let t = tier(6);
    t.store.create_namespace(NS, 1).unwrap();
    for id in [0, 1, 2] {
        t.kill(id);
    }
    let err = t.store.put(NS, "obj", &object(50_000, 7)).unwrap_err();
    assert!(
        matches!(err, BackendError::Osd { ref reason, .. } if reason.contains("only 3 of the 5")),
        "{err}"
    );
    assert!(t.store.wait_background(SETTLE));
    for id in 3..6 {
        assert_eq!(t.fragment_files(id, NS, "obj").len(), 1, "OSD {id}");
    }
    drop(t.runtime);
}

/// An object rewritten in place (a volume's TLog list) keeps one version's fragments, not
/// one set per write.
#[test]
fn overwrites_collect_the_older_versions() {
    let t = tier(6);
    t.store.create_namespace(NS, 1).unwrap();
    let mut last = Vec::new();
    for i in 0..10 {
        last = object(20_000 + i * 1000, i as u32);
        t.store.put(NS, "tlogs", &last).unwrap();
    }
    assert!(t.store.wait_background(SETTLE));
    assert_eq!(t.total_fragments(), 6, "one version's k + m");
    let health = t.store.inspect(NS, Some("tlogs"), false).unwrap();
    assert!(health[0].stale.is_empty(), "{:?}", health[0].stale);
    assert_eq!(t.store.get(NS, "tlogs").unwrap(), last);
    assert_eq!(t.client().get(NS, "tlogs").unwrap(), last);
    // A store that never saw the object (a restarted node) does not know the older version:
    // it is left for repair...
    let blind = t.client();
    blind.put(NS, "tlogs", b"blind").unwrap();
    assert!(blind.wait_background(SETTLE));
    assert_eq!(t.total_fragments(), 12);
    // ...but one that read the object learnt every version from the OSDs' answers, and its
    // next put collects them all.
    let other = t.client();
    assert_eq!(other.get(NS, "tlogs").unwrap(), b"blind");
    other.put(NS, "tlogs", b"and again").unwrap();
    assert!(other.wait_background(SETTLE));
    assert_eq!(t.total_fragments(), 6);
    assert_eq!(t.client().get(NS, "tlogs").unwrap(), b"and again");
    drop(t.runtime);
}

/// A delete succeeds while an OSD the map says is down cannot be reached; it fails while the
/// map says that OSD is up. The down OSD's fragment stays behind, hidden by the tombstones on
/// the others, until repair removes it.
#[test]
fn deletes_tolerate_down_osds() {
    let mut t = tier(6);
    t.store.create_namespace(NS, 1).unwrap();
    let data = object(100_000, 9);
    t.store.put(NS, "obj", &data).unwrap();
    assert!(t.store.wait_background(SETTLE));
    t.kill(0);
    let err = t.store.delete(NS, "obj").unwrap_err();
    assert!(err.to_string().contains("OSD 0"), "{err}");
    t.set_state(0, OsdState::Down);
    t.store.delete(NS, "obj").expect("OSD 0 is down in the map");
    assert_eq!(
        t.total_fragments(),
        1,
        "only the down OSD's fragment is left"
    );
    assert!(t.store.list(NS).unwrap().is_empty());
    // Back up: its fragment is older than the tombstones, so the name stays deleted.
    t.restart(0);
    assert!(t.store.list(NS).unwrap().is_empty());
    assert!(!t.client().exists(NS, "obj").unwrap());
    let report = t
        .store
        .repair_namespace(NS, &crate::ec::repair::RepairOptions::default(), &|_| {})
        .unwrap();
    assert_eq!(report.fragments_deleted, 1, "{report:?}");
    assert_eq!(t.total_fragments(), 0);
    assert!((0..6).all(|id| t.fragment_files(id, NS, "obj").is_empty()));
    drop(t.runtime);
}

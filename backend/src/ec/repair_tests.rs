//! Repair, rebalancing, draining and scrub against real OSD servers (in-process, loopback).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::fragment::FragmentHeader;
use super::inspect::{FragmentStatus, ObjectStatus};
use super::plan::Action;
use super::repair::{RepairOptions, RepairProgress, RepairReport};
use super::store::{NamespaceRecord, OsdState, TierMap};
use super::testkit::{object, tier, Tier};
use crate::{BackendError, ObjectStore};

const NS: &str = "vol";

/// `count` objects of assorted sizes (empty, tiny, one chunk, several chunks).
fn fill(t: &Tier, count: usize) -> Vec<(String, Vec<u8>)> {
    t.store.create_namespace(NS, 1).unwrap();
    let objects = (0..count)
        .map(|i| {
            let len = match i % 4 {
                0 => 0,
                1 => 100 + i,
                2 => 200_000 + i * 31,
                _ => 700_000 + i * 17,
            };
            let name = format!("{i:08}.sco");
            let data = object(len, i as u32);
            t.store.put(NS, &name, &data).unwrap();
            (name, data)
        })
        .collect();
    settle(t, count as u64 * 6);
    objects
}

/// A put returns once `c` of its fragments are durable; wait (bounded) for the rest.
fn settle(t: &Tier, fragments: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.total_fragments() < fragments {
        assert!(Instant::now() < deadline, "puts never completed");
        std::thread::yield_now();
    }
}

fn assert_exact(store: &dyn ObjectStore, objects: &[(String, Vec<u8>)]) {
    for (name, data) in objects {
        assert_eq!(&store.get(NS, name).unwrap(), data, "{name}");
    }
}

fn repair(t: &Tier) -> RepairReport {
    t.store
        .repair_namespace(NS, &RepairOptions::default(), &|_| {})
        .unwrap()
}

fn assert_all_healthy(t: &Tier, count: usize) {
    let health = t.store.inspect(NS, None, true).unwrap();
    assert_eq!(health.len(), count);
    for object in health {
        assert_eq!(object.status, ObjectStatus::Healthy, "{object:?}");
        assert!(object
            .fragments
            .iter()
            .all(|f| f.status == FragmentStatus::Healthy && f.copies.len() == 1));
    }
}

fn assert_nothing_done(report: &RepairReport) {
    assert_eq!(
        (
            report.fragments_rebuilt,
            report.fragments_moved,
            report.fragments_deleted,
            report.bytes_written
        ),
        (0, 0, 0, 0),
        "{report:?}"
    );
}

#[test]
fn osds_lost_and_marked_out_are_rebuilt_with_exact_data() {
    let t = tier(9);
    let objects = fill(&t, 12);
    let lost = t.fragments_on(0) + t.fragments_on(1);
    assert!(lost > 0);
    // m = 2 OSDs die and are marked out: reads decode around them at once.
    t.kill(0);
    t.kill(1);
    t.set_state(0, OsdState::Out);
    t.set_state(1, OsdState::Out);
    assert_exact(&t.store, &objects);
    let seen = RefCell::new(Vec::<RepairProgress>::new());
    let report = t
        .store
        .repair_namespace(NS, &RepairOptions::default(), &|p| {
            seen.borrow_mut().push(p.clone());
        })
        .unwrap();
    assert!(report.fully_redundant(), "{report:?}");
    assert_eq!(report.objects_checked, 12);
    assert_eq!(report.fragments_rebuilt, lost, "{report:?}");
    assert!(report.bytes_read > 0 && report.bytes_written > 0);
    assert!(
        report.cross_domain_bytes > 0,
        "4 sources cannot all share a domain"
    );
    let seen = seen.into_inner();
    assert_eq!(seen.len(), 12);
    assert_eq!(seen.last().unwrap().objects_checked, 12);
    assert_eq!(seen.last().unwrap().fragments_rebuilt, lost);
    // Full redundancy again: every fragment once, on a live OSD, CRC-checked; and exact data
    // from a client that never saw the old layout.
    assert_eq!(t.total_fragments() - lost, 12 * 6);
    assert_all_healthy(&t, 12);
    assert_exact(&t.client(), &objects);
    assert_nothing_done(&repair(&t));
    // And it survives two more losses.
    let live: Vec<u64> = (2..9)
        .filter(|id| t.fragments_on(*id) > 0)
        .take(2)
        .collect();
    for id in &live {
        t.kill(*id);
        t.set_state(*id, OsdState::Out);
    }
    assert_exact(&t.client(), &objects);
    drop(t.runtime);
}

#[test]
fn without_rebalance_a_loss_costs_only_its_rebuilds() {
    let t = tier(9);
    let objects = fill(&t, 12);
    let lost = t.fragments_on(0) + t.fragments_on(1);
    for id in [0, 1] {
        t.kill(id);
        t.set_state(id, OsdState::Out);
    }
    let sticky = RepairOptions {
        rebalance: false,
        ..RepairOptions::default()
    };
    let report = t.store.repair_namespace(NS, &sticky, &|_| {}).unwrap();
    assert!(report.fully_redundant(), "{report:?}");
    assert_eq!(
        (report.fragments_rebuilt, report.fragments_moved),
        (lost, 0)
    );
    // Still one fragment per OSD, at most two per domain.
    for (name, _) in &objects {
        let holders: Vec<u64> = (2..9)
            .filter(|id| !t.fragment_files(*id, NS, name).is_empty())
            .collect();
        assert_eq!(holders.len(), 6, "{name}: {holders:?}");
        assert!(holders
            .iter()
            .all(|id| t.fragment_files(*id, NS, name).len() == 1));
        for domain in 0..3 {
            assert!(holders.iter().filter(|id| *id % 3 == domain).count() <= 2);
        }
    }
    assert_exact(&t.client(), &objects);
    assert_nothing_done(&t.store.repair_namespace(NS, &sticky, &|_| {}).unwrap());
    // A rebalancing pass then puts everything where placement wants it.
    let report = repair(&t);
    assert_eq!(report.fragments_rebuilt, 0);
    assert_all_healthy(&t, 12);
    assert_exact(&t.client(), &objects);
    drop(t.runtime);
}

#[test]
fn with_local_parity_one_loss_is_rebuilt_within_its_domain() {
    let t = tier(9);
    t.map
        .create_namespace(
            NS,
            &NamespaceRecord {
                tag: 1,
                preset: "lrc".into(),
            },
        )
        .unwrap();
    let objects: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| {
            let name = format!("{i:08}.sco");
            let data = object(50_000 + i * 40_000, i as u32);
            t.store.put(NS, &name, &data).unwrap();
            (name, data)
        })
        .collect();
    // 4+2 over three domains of three OSDs: two fragments per domain, and its local parity
    // on the third OSD.
    settle(&t, 10 * 9);
    for object in t.store.inspect(NS, None, true).unwrap() {
        assert_eq!(object.status, ObjectStatus::Healthy, "{object:?}");
        assert_eq!(object.local_parities.len(), 3, "{object:?}");
        assert!(object.local_parities.iter().all(|p| p.group.len() == 2));
    }
    assert_exact(&t.client(), &objects);
    let lost = (0..9).max_by_key(|id| t.fragments_on(*id)).unwrap();
    let globals: u64 = objects
        .iter()
        .flat_map(|(name, _)| t.fragment_files(lost, NS, name))
        .filter(|path| {
            let index = path.extension().unwrap().to_str().unwrap();
            index.parse::<u8>().unwrap() < 6
        })
        .count() as u64;
    assert!(globals > 0);
    t.kill(lost);
    t.set_state(lost, OsdState::Out);
    assert_exact(&t.client(), &objects);
    let sticky = RepairOptions {
        rebalance: false,
        ..RepairOptions::default()
    };
    let report = t.store.repair_namespace(NS, &sticky, &|_| {}).unwrap();
    assert!(report.fully_redundant(), "{report:?}");
    assert_eq!(report.fragments_rebuilt, globals, "{report:?}");
    assert_eq!(report.fragments_rebuilt_locally, globals, "{report:?}");
    assert_eq!(report.cross_domain_bytes, 0, "{report:?}");
    assert!(report.bytes_read > 0);
    assert_exact(&t.client(), &objects);
    assert_nothing_done(&t.store.repair_namespace(NS, &sticky, &|_| {}).unwrap());
    drop(t.runtime);
}

#[test]
fn a_joining_osd_gets_its_share_and_reads_stay_exact() {
    let mut t = tier(6);
    let objects = fill(&t, 28);
    let reader = t.client();
    assert_exact(&reader, &objects); // its holders are cached now
    let new = t.add_osd("d3");
    let done = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let reading = s.spawn(|| {
            let mut rounds = 0;
            // Bounded: the repair of 28 objects ends long before.
            while !done.load(Ordering::SeqCst) && rounds < 10_000 {
                for (name, data) in &objects {
                    assert_eq!(
                        &reader.get(NS, name).unwrap(),
                        data,
                        "{name} during rebalance"
                    );
                }
                rounds += 1;
            }
            rounds
        });
        let report = repair(&t);
        done.store(true, Ordering::SeqCst);
        assert!(reading.join().unwrap() > 0);
        report
    });
    assert!(report.fully_redundant(), "{report:?}");
    assert_eq!(report.fragments_rebuilt, 0);
    let total = 28 * 6;
    assert_eq!(t.total_fragments(), total);
    let share = t.fragments_on(new) as f64 / total as f64;
    assert!(
        (0.07..0.25).contains(&share),
        "the newcomer took {share:.3} of the fragments (1/7 expected)"
    );
    assert!(report.fragments_moved >= t.fragments_on(new));
    assert_all_healthy(&t, 28);
    assert_exact(&reader, &objects);
    assert_exact(&t.client(), &objects);
    assert_nothing_done(&repair(&t));
    drop(t.runtime);
}

#[test]
fn a_draining_osd_is_emptied() {
    let t = tier(7);
    let objects = fill(&t, 16);
    let before = t.fragments_on(0);
    assert!(before > 0);
    t.set_state(0, OsdState::Draining);
    // Still read from while draining.
    assert_exact(&t.client(), &objects);
    let report = repair(&t);
    assert!(report.fully_redundant(), "{report:?}");
    assert_eq!(
        report.fragments_rebuilt, 0,
        "drained by copying, not decoding"
    );
    assert_eq!(t.fragments_on(0), 0, "{report:?}");
    assert_eq!(t.total_fragments(), 16 * 6);
    assert_all_healthy(&t, 16);
    t.kill(0);
    t.set_state(0, OsdState::Out);
    assert_exact(&t.client(), &objects);
    drop(t.runtime);
}

#[test]
fn repair_keeps_to_its_bandwidth() {
    let t = tier(7);
    let objects = fill(&t, 4);
    // Drain the busiest OSD of the domain with three.
    let drained = [0, 3, 6]
        .into_iter()
        .max_by_key(|id| t.fragments_on(*id))
        .unwrap();
    t.set_state(drained, OsdState::Draining);
    let limit = 1_000_000;
    let started = Instant::now();
    let report = t
        .store
        .repair_namespace(
            NS,
            &RepairOptions {
                bandwidth: Some(limit),
                ..RepairOptions::default()
            },
            &|_| {},
        )
        .unwrap();
    let bytes = report.bytes_read + report.bytes_written;
    assert!(bytes > 100_000, "{report:?}");
    assert!(
        started.elapsed() >= Duration::from_secs_f64(bytes as f64 / limit as f64),
        "{bytes} bytes in {:?} at {limit} B/s",
        started.elapsed()
    );
    assert_eq!(t.fragments_on(drained), 0);
    assert_exact(&t.client(), &objects);
    drop(t.runtime);
}

#[test]
fn an_object_deleted_while_repaired_leaves_nothing_behind() {
    let t = tier(7);
    let objects = fill(&t, 1);
    let name = &objects[0].0;
    let drained = [0, 3, 6]
        .into_iter()
        .find(|id| t.fragments_on(*id) > 0)
        .unwrap();
    t.set_state(drained, OsdState::Draining);
    let osds = t.map.osds.lock().clone();
    // Repair observes (and so plans) first; then the owner's delete lands everywhere but on
    // the draining OSD, whose fragment repair is about to move.
    let observed = t.store.observe_all(NS, None, &osds, false).unwrap();
    for (id, osd) in t.osds.iter().enumerate() {
        if id as u64 != drained {
            osd.store.delete(NS, name, 1).unwrap();
        }
    }
    let report = t
        .store
        .repair_observed(NS, &osds, observed, &RepairOptions::default(), &|_| {})
        .unwrap();
    assert!(report.bytes_written > 0, "the move was made: {report:?}");
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(report.errors[0].contains("deleted while repair copied it"));
    assert_eq!(t.total_fragments(), 0, "nothing left behind: {report:?}");
    assert!(!t.client().exists(NS, name).unwrap());
    drop(t.runtime);
}

#[test]
fn scrub_finds_a_corrupt_fragment_and_rebuilds_it() {
    let t = tier(6);
    let objects = fill(&t, 4);
    let (name, _) = &objects[3];
    let path = t.fragment_files(2, NS, name).pop().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let at = FragmentHeader::decode(&bytes).unwrap().data_offset() as usize + 5000;
    bytes[at] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    // Without checking CRCs, nothing looks wrong.
    assert_nothing_done(&repair(&t));
    let health = t.store.inspect(NS, Some(name), true).unwrap();
    let bad: Vec<_> = health[0]
        .fragments
        .iter()
        .filter(|f| f.status == FragmentStatus::Corrupt)
        .collect();
    assert_eq!(bad.len(), 1, "{health:?}");
    assert_eq!(bad[0].copies[0].osd.id, 2);
    assert_eq!(health[0].status, ObjectStatus::Degraded);
    let report = t
        .store
        .scrub_namespace(NS, &RepairOptions::default(), &|_| {})
        .unwrap();
    assert_eq!((report.corrupt_found, report.fragments_rebuilt), (1, 1));
    assert!(report.fully_redundant(), "{report:?}");
    // Rewritten in place, sound again.
    assert_ne!(std::fs::read(&path).unwrap(), bytes);
    let again = t
        .store
        .scrub_namespace(NS, &RepairOptions::default(), &|_| {})
        .unwrap();
    assert_eq!(again.corrupt_found, 0);
    assert_nothing_done(&again);
    assert_all_healthy(&t, 4);
    assert_exact(&t.client(), &objects);
    drop(t.runtime);
}

#[test]
fn more_than_m_lost_is_reported_and_never_read_as_wrong_data() {
    let t = tier(9);
    let objects = fill(&t, 8);
    let (victim, _) = &objects[3];
    let holders: Vec<u64> = (0..9)
        .filter(|id| !t.fragment_files(*id, NS, victim).is_empty())
        .collect();
    assert_eq!(holders.len(), 6);
    let dead = &holders[..3];
    for id in dead {
        t.kill(*id);
        t.set_state(*id, OsdState::Out);
    }
    let expect_lost: Vec<String> = objects
        .iter()
        .filter(|(name, _)| {
            dead.iter()
                .filter(|id| !t.fragment_files(**id, NS, name).is_empty())
                .count()
                > 2
        })
        .map(|(name, _)| name.clone())
        .collect();
    assert!(expect_lost.contains(victim));
    let left: usize = holders[3..]
        .iter()
        .map(|id| t.fragment_files(*id, NS, victim).len())
        .sum();
    let health = t.store.inspect(NS, Some(victim), false).unwrap();
    assert_eq!(health[0].status, ObjectStatus::Unrecoverable, "{health:?}");
    assert_eq!(health[0].healthy_fragments, 3);
    assert!(health[0].planned.is_empty());
    let report = repair(&t);
    assert_eq!(report.unrecoverable, expect_lost, "{report:?}");
    assert!(!report.fully_redundant());
    // What is left of the lost object is kept (nothing acts on fewer than k).
    let still: usize = holders[3..]
        .iter()
        .map(|id| t.fragment_files(*id, NS, victim).len())
        .sum();
    assert_eq!(still, left);
    let err = t.client().get(NS, victim).unwrap_err();
    assert!(
        err.is_unreadable() && err.to_string().contains("cannot be rebuilt"),
        "a clear error: {err}"
    );
    // The others were repaired and read back exact.
    for (name, data) in &objects {
        if !expect_lost.contains(name) {
            assert_eq!(&t.client().get(NS, name).unwrap(), data);
        }
    }
    drop(t.runtime);
}

#[test]
fn a_down_osd_waits_and_comes_back_needing_no_repair() {
    let mut t = tier(9);
    let objects = fill(&t, 10);
    let held = t.fragments_on(4);
    assert!(held > 0);
    t.kill(4);
    t.set_state(4, OsdState::Down);
    assert_exact(&t.client(), &objects);
    // Down is not out: its fragments are presumed there, nothing is rebuilt or moved.
    let report = repair(&t);
    assert_nothing_done(&report);
    assert_eq!(report.pending_fragments, held);
    assert!(!report.fully_redundant());
    let health = t.store.inspect(NS, None, false).unwrap();
    assert!(health
        .iter()
        .all(|o| matches!(o.status, ObjectStatus::Degraded | ObjectStatus::Healthy)));
    // Back with its data: nothing to do.
    t.restart(4);
    let report = repair(&t);
    assert_nothing_done(&report);
    assert!(report.fully_redundant(), "{report:?}");
    assert_eq!(report.fragments_rebuilt, 0);
    assert_all_healthy(&t, 10);
    assert_exact(&t.client(), &objects);
    drop(t.runtime);
}

#[test]
fn new_puts_go_to_up_osds_only() {
    let t = tier(9);
    t.store.create_namespace(NS, 1).unwrap();
    t.set_state(0, OsdState::Down);
    t.set_state(1, OsdState::Draining);
    t.set_state(2, OsdState::Out);
    for i in 0..10 {
        t.store
            .put(NS, &format!("o{i}"), &object(10_000, i))
            .unwrap();
    }
    settle(&t, 60);
    assert_eq!(
        (t.fragments_on(0), t.fragments_on(1), t.fragments_on(2)),
        (0, 0, 0)
    );
    assert_eq!(t.total_fragments(), 60);
    drop(t.runtime);
}

#[test]
fn a_delete_while_an_osd_is_down_stays_deleted_when_it_returns() {
    let mut t = tier(9);
    let objects = fill(&t, 8);
    let down = 4;
    let (gone, kept): (Vec<_>, Vec<_>) = objects
        .iter()
        .cloned()
        .partition(|(name, _)| !t.fragment_files(down, NS, name).is_empty());
    assert!(gone.len() >= 2, "{} objects on OSD {down}", gone.len());
    t.kill(down);
    t.set_state(down, OsdState::Down);
    for (name, _) in &gone {
        t.store.delete(NS, name).unwrap();
    }
    // A writer holding an older owner tag cannot delete the new owner's objects.
    t.store.claim(NS, 2).unwrap();
    let fenced = t.store.delete_if_owner(NS, &kept[0].0, 1).unwrap_err();
    assert!(matches!(fenced, BackendError::Fenced { .. }), "{fenced}");
    // The same name put again while the OSD is still down.
    let again = gone[0].0.clone();
    let fresh = object(300_000, 99);
    t.store.put(NS, &again, &fresh).unwrap();
    assert!(t.store.wait_background(Duration::from_secs(10)));
    let mut expected: Vec<(String, Vec<u8>)> = kept.clone();
    expected.push((again.clone(), fresh));
    expected.sort();
    let names: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(t.client().list(NS).unwrap(), names);
    // While the OSD is down the tombstones must stay.
    let report = repair(&t);
    assert_eq!(report.tombstones_kept, gone.len() as u64 - 1, "{report:?}");

    t.restart(down);
    // Its stale fragments are back, and hidden from every reader.
    assert!(gone[1..]
        .iter()
        .all(|(name, _)| !t.fragment_files(down, NS, name).is_empty()));
    let client = t.client();
    assert_eq!(client.list(NS).unwrap(), names);
    for (name, _) in &gone[1..] {
        let err = client.get(NS, name).unwrap_err();
        assert!(matches!(err, BackendError::NoSuchObject { .. }), "{err}");
        assert!(!client.exists(NS, name).unwrap());
    }
    assert_exact(&client, &expected);
    let listed: Vec<String> = t
        .store
        .inspect(NS, None, false)
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(listed, names);
    let one = t.store.inspect(NS, Some(&gone[1].0), false).unwrap();
    assert_eq!(one[0].status, ObjectStatus::Deleted, "{one:?}");

    // Repair removes the stale fragments, then the tombstones: nothing of them is left.
    let report = repair(&t);
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(report.fragments_deleted > 0, "{report:?}");
    assert!(report.tombstones_dropped >= gone.len() as u64, "{report:?}");
    for id in 0..9 {
        for (name, _) in &gone[1..] {
            assert_eq!(
                t.fragment_files(id, NS, name),
                Vec::<std::path::PathBuf>::new()
            );
        }
        assert!(t
            .fragment_files(id, NS, &again)
            .iter()
            .all(|f| !f.to_string_lossy().ends_with(".255")));
    }
    assert_exact(&t.client(), &expected);
    let report = repair(&t);
    assert_eq!(
        (
            report.tombstones_dropped,
            report.tombstones_kept,
            report.fragments_deleted
        ),
        (0, 0, 0),
        "{report:?}"
    );
    drop(t.runtime);
}

#[test]
fn objects_written_under_a_fallback_policy_are_re_encoded_once_the_osds_are_back() {
    for preset in ["p", "enc"] {
        // Three OSDs hold 2+1 (the fallback), not 4+2 at most two per domain.
        let mut t = tier(3);
        t.store.reserve_preset(NS, preset).unwrap();
        t.store.create_namespace(NS, 1).unwrap();
        let objects: Vec<(String, Vec<u8>)> = (0..6)
            .map(|i| {
                let data = object([0, 100, 200_000, 700_000][i % 4] + i, i as u32);
                let name = format!("{i:08}.sco");
                t.store.put(NS, &name, &data).unwrap();
                (name, data)
            })
            .collect();
        assert!(t.store.wait_background(Duration::from_secs(10)));
        let shapes = |t: &Tier| -> Vec<(u8, u8)> {
            let health = t.store.inspect(NS, None, false).unwrap();
            health.iter().map(|o| (o.k, o.m)).collect()
        };
        assert_eq!(shapes(&t), vec![(2, 1); 6]);
        // Nothing better fits yet: nothing planned.
        let report = repair(&t);
        assert_eq!(report.objects_reencoded, 0, "{report:?}");
        for d in 0..3 {
            t.add_osd(&format!("d{d}"));
        }
        let health = t.store.inspect(NS, None, false).unwrap();
        for o in &health {
            assert_eq!(o.planned, vec![Action::ReEncode { k: 4, m: 2 }], "{o:?}");
        }
        let report = repair(&t);
        assert!(report.errors.is_empty(), "{report:?}");
        assert_eq!(report.objects_reencoded, 6, "{report:?}");
        assert!(t.store.wait_background(Duration::from_secs(10)));
        assert_eq!(shapes(&t), vec![(4, 2); 6]);
        assert_exact(&t.client(), &objects);
        // What the re-encoding puts did not collect goes now; then nothing is left to do.
        repair(&t);
        assert_all_healthy(&t, 6);
        let report = repair(&t);
        assert_nothing_done(&report);
        assert_eq!(report.objects_reencoded, 0);
        assert_exact(&t.client(), &objects);
        drop(t.runtime);
    }
}

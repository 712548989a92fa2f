//! Tests of the `store` module (kept apart so the module stays readable).

use super::*;
use crate::table::apply_to_model;
use proptest::prelude::*;
use std::collections::BTreeMap;
use vstor_volumedriver::config::TLogRecord;

fn all(store: &MdsStore, volume: &str) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    let mut after = None;
    loop {
        let (_, page) = store.dump(volume, after, 7).unwrap();
        if page.is_empty() {
            return out;
        }
        after = page.last().map(|(k, _)| *k);
        out.extend(page);
    }
}

#[test]
fn tables_survive_reopen_and_fence_old_owners() {
    let dir = tempfile::tempdir().unwrap();
    let c1 = Cork::EMPTY.after(&TLogRecord::new(1));
    {
        let store = MdsStore::open(dir.path()).unwrap();
        assert!(matches!(
            store.multi_set("v", 1, Cork::EMPTY, c1, &[]),
            Err(MdsError::NoTable { .. })
        ));
        store.set_role("v", "ns-v", Role::Master, 3).unwrap();
        store
            .multi_set(
                "v",
                3,
                Cork::EMPTY,
                c1,
                &[
                    Update::Loc {
                        address: 10,
                        location: 0x1_0000_0005,
                    },
                    Update::Loc {
                        address: 11,
                        location: 0x2_0000_0005,
                    },
                ],
            )
            .unwrap();
        let err = store.multi_set("v", 2, c1, c1, &[]).unwrap_err();
        assert!(
            matches!(
                err,
                MdsError::Fenced {
                    got: 2,
                    known: 3,
                    ..
                }
            ),
            "{err}"
        );
        let err = store.multi_set("v", 3, Cork::EMPTY, c1, &[]).unwrap_err();
        assert!(matches!(err, MdsError::CorkMismatch { .. }), "{err}");
    }
    let store = MdsStore::open(dir.path()).unwrap();
    let info = store.info("v").unwrap();
    assert_eq!(info.meta.cork, c1);
    assert_eq!(info.meta.owner_tag, 3);
    assert_eq!(info.meta.counters.sets, 1);
    assert_eq!(info.meta.counters.refused, 2);
    assert_eq!(info.entries, 2);
    assert_eq!(
        store.multi_get("v", &[10, 11, 12]).unwrap(),
        (c1, vec![0x1_0000_0005, 0x2_0000_0005, 0])
    );
    // A slave takes no sets; an old owner cannot change roles or drop the table.
    store.set_role("v", "ns-v", Role::Slave, 3).unwrap();
    assert!(matches!(
        store.multi_set("v", 3, c1, c1, &[]),
        Err(MdsError::NotMaster { .. })
    ));
    assert!(matches!(
        store.set_role("v", "ns-v", Role::Master, 1),
        Err(MdsError::Fenced { .. })
    ));
    assert!(matches!(
        store.drop_table("v", 2),
        Err(MdsError::Fenced { .. })
    ));
    store.drop_table("v", 3).unwrap();
    assert!(store.meta("v").unwrap().is_none());
    assert!(store.tables().unwrap().is_empty());
}

#[test]
fn replay_resets_and_checks_the_cork() {
    let dir = tempfile::tempdir().unwrap();
    let store = MdsStore::open(dir.path()).unwrap();
    store.set_role("v", "ns", Role::Slave, 1).unwrap();
    let c1 = Cork::EMPTY.after(&TLogRecord::new(1));
    let set = |a| Update::Loc {
        address: a,
        location: 0x1_0000_0001,
    };
    store
        .replay("v", false, Cork::EMPTY, c1, &[set(1), set(2)])
        .unwrap();
    assert!(matches!(
        store.replay("v", false, Cork::EMPTY, c1, &[]),
        Err(MdsError::CorkMismatch { .. })
    ));
    let fresh = Cork::EMPTY.after(&TLogRecord::new(9));
    let meta = store.replay("v", true, c1, fresh, &[set(5)]).unwrap();
    assert_eq!(meta.counters.full_rebuilds, 1);
    assert_eq!(all(&store, "v"), BTreeMap::from([(5, 0x1_0000_0001)]));
}

#[derive(Debug, Clone)]
enum Op {
    Set(Vec<Update>),
    Reopen,
}

fn arb_update() -> impl Strategy<Value = Update> {
    prop_oneof![
        // Addresses over several 512-cluster pages, so updates and trims cross page boundaries
        // and batches overflow the (test-sized) working set of pages.
        4 => (0u64..3000, 0u64..4).prop_map(|(address, sco)| Update::Loc {
            address,
            location: sco | (address << 32),
        }),
        1 => (0u64..3000, 0u64..1200).prop_map(|(start, count)| Update::Trim { start, count }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn store_matches_the_model_across_reopens(ops in proptest::collection::vec(
        prop_oneof![
            5 => proptest::collection::vec(arb_update(), 0..30).prop_map(Op::Set),
            1 => Just(Op::Reopen),
        ], 1..20))
    {
        let dir = tempfile::tempdir().unwrap();
        let mut store = MdsStore::open(dir.path()).unwrap();
        store.set_role("v", "ns", Role::Master, 1).unwrap();
        let mut model = BTreeMap::new();
        let mut cork = Cork::EMPTY;
        let mut n = 0;
        for op in ops {
            match op {
                Op::Set(updates) => {
                    n += 1;
                    let next = cork.after(&TLogRecord::new(n));
                    store.multi_set("v", 1, cork, next, &updates).unwrap();
                    apply_to_model(&mut model, &updates);
                    cork = next;
                }
                Op::Reopen => {
                    drop(store);
                    store = MdsStore::open(dir.path()).unwrap();
                }
            }
            prop_assert_eq!(&all(&store, "v"), &model);
            prop_assert_eq!(store.info("v").unwrap().entries, model.len() as u64);
            let probe: Vec<u64> = (0..3000).step_by(7).collect();
            let (_, got) = store.multi_get("v", &probe).unwrap();
            let want: Vec<u64> = probe.iter().map(|a| model.get(a).copied().unwrap_or(0)).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(store.meta("v").unwrap().unwrap().cork, cork);
        }
    }
}

#[test]
fn a_store_of_the_first_format_is_rewritten_as_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = BTreeMap::new();
    {
        // The first format: metadata in `volumes`, one key per cluster in `map:<volume>`.
        let store = MdsStore::open(dir.path()).unwrap();
        let tx = store.db.begin_write().unwrap();
        tx.delete_table(VOLUMES).unwrap();
        {
            let meta = TableMeta::new("ns", Role::Master, 1);
            tx.open_table(FIRST_FORMAT_VOLUMES)
                .unwrap()
                .insert("v", meta.encode().as_slice())
                .unwrap();
            let mut old = tx
                .open_table(TableDefinition::<u64, u64>::new("map:v"))
                .unwrap();
            for address in (0..5000u64).step_by(3) {
                let location = 1 | (address << 32);
                old.insert(address, location).unwrap();
                model.insert(address, location);
            }
        }
        tx.commit().unwrap();
    }
    let store = MdsStore::open(dir.path()).unwrap();
    assert_eq!(all(&store, "v"), model);
    let info = store.info("v").unwrap();
    assert_eq!(info.entries, model.len() as u64);
    assert_eq!(
        (info.meta.namespace.as_str(), info.meta.owner_tag),
        ("ns", 1)
    );
    let tx = store.db.begin_read().unwrap();
    assert!(
        tx.list_tables()
            .unwrap()
            .all(|t| !t.name().starts_with("map:") && t.name() != "volumes"),
        "the old tables are gone, so a first-format binary sees an empty store"
    );
}

/// Upgrade, downgrade (the older binary writes the first format again beside the pages), upgrade:
/// the second rewrite takes the first-format tables as they are, never mixed with stale pages.
#[test]
fn a_rewrite_after_a_downgrade_drops_the_stale_pages() {
    let dir = tempfile::tempdir().unwrap();
    let c1 = Cork::EMPTY.after(&TLogRecord::new(1));
    {
        let store = MdsStore::open(dir.path()).unwrap();
        store.set_role("v", "ns", Role::Master, 1).unwrap();
        let updates: Vec<Update> = (0..2000u64)
            .map(|address| Update::Loc {
                address,
                location: 1 | (address << 32),
            })
            .collect();
        store.multi_set("v", 1, Cork::EMPTY, c1, &updates).unwrap();
        // What an older binary leaves: `volumes` (it does not see `tables`) with a table at
        // another cork, and a map with one entry.
        let tx = store.db.begin_write().unwrap();
        {
            let mut meta = TableMeta::new("ns", Role::Master, 2);
            meta.cork = Cork::EMPTY.after(&TLogRecord::new(7));
            tx.open_table(FIRST_FORMAT_VOLUMES)
                .unwrap()
                .insert("v", meta.encode().as_slice())
                .unwrap();
            tx.open_table(TableDefinition::<u64, u64>::new("map:v"))
                .unwrap()
                .insert(5, 9 | (5 << 32))
                .unwrap();
        }
        tx.commit().unwrap();
    }
    let store = MdsStore::open(dir.path()).unwrap();
    assert_eq!(all(&store, "v"), BTreeMap::from([(5, 9 | (5 << 32))]));
    let info = store.info("v").unwrap();
    assert_eq!(info.entries, 1);
    assert_eq!(info.meta.cork, Cork::EMPTY.after(&TLogRecord::new(7)));
}

#[test]
fn a_page_of_the_wrong_size_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = MdsStore::open(dir.path()).unwrap();
    store.set_role("v", "ns", Role::Master, 1).unwrap();
    let tx = store.db.begin_write().unwrap();
    {
        let name = pages::table_name("v");
        let mut t = tx.open_table(pages::definition(&name)).unwrap();
        t.insert(2, [1u8; 100].as_slice()).unwrap();
    }
    tx.commit().unwrap();
    let err = store.dump("v", None, 10).unwrap_err();
    assert!(
        matches!(&err, MdsError::Corrupt { volume, reason } if volume == "v" && reason.contains("page 2")),
        "{err}"
    );
    assert!(matches!(
        store.multi_get("v", &[1030]),
        Err(MdsError::Corrupt { .. })
    ));
}

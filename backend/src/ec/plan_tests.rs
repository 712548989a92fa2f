//! The planner against a model of the OSDs: plans are applied action by action and checked.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

/// (version, index, osd) → health: what the OSDs that answered hold.
type Model = BTreeMap<(u64, u8, u64), CopyHealth>;

fn osd(id: u64, domain: usize, state: OsdState) -> PlanOsd {
    PlanOsd {
        slot: OsdSlot {
            id,
            domain: format!("d{domain}"),
            weight: 1.0,
            writable: true,
        },
        state,
    }
}

fn seen_of(key: &str, model: &Model, shapes: &BTreeMap<u64, (u8, u8)>) -> ObjectSeen {
    let mut seen = ObjectSeen {
        key: key.into(),
        ..ObjectSeen::default()
    };
    for ((version, index, osd), health) in model {
        let (k, m) = shapes[version];
        seen.versions
            .entry(*version)
            .or_insert_with(|| VersionSeen {
                k,
                m,
                copies: BTreeMap::new(),
            })
            .copies
            .entry(*index)
            .or_default()
            .insert(*osd, *health);
    }
    seen
}

fn healthy_copies(model: &Model, version: u64, index: u8) -> usize {
    model
        .iter()
        .filter(|((v, i, _), h)| *v == version && *i == index && h.usable())
        .count()
}

/// Apply `plan` to `model`, checking every action's preconditions and the never-lose rule.
fn apply(plan: &Plan, model: &mut Model, osds: &[PlanOsd]) -> Result<(), TestCaseError> {
    let writable = |id: u64| {
        osds.iter()
            .any(|o| o.slot.id == id && o.state == OsdState::Up && o.slot.writable)
    };
    let Some(v) = plan.version else {
        prop_assert!(plan.actions.is_empty(), "acted on an unreadable object");
        return Ok(());
    };
    let n = usize::from(plan.k) + usize::from(plan.m);
    for action in &plan.actions {
        match *action {
            Action::Rebuild { index, to } => {
                prop_assert!(writable(to), "rebuild onto {to}, not writable");
                let others = (0..n as u8)
                    .filter(|i| *i != index && healthy_copies(model, v, *i) > 0)
                    .count();
                prop_assert!(others >= usize::from(plan.k), "rebuild from {others} < k");
                model.insert((v, index, to), CopyHealth::Healthy);
            }
            Action::Move { index, from, to } => {
                prop_assert!(writable(to), "move onto {to}, not writable");
                prop_assert!(
                    model.get(&(v, index, from)).is_some_and(|h| h.usable()),
                    "move from a copy that is not healthy"
                );
                model.insert((v, index, to), CopyHealth::Healthy);
                model.remove(&(v, index, from));
            }
            Action::DropTombstone { version, .. } => {
                prop_assert!(version < v, "dropped a tombstone not older than the object");
            }
            Action::ReEncode { .. } => prop_assert!(false, "the planner never re-encodes"),
            Action::Delete { version, index, on } => {
                prop_assert!(version <= v, "deleted a newer version");
                prop_assert!(model.remove(&(version, index, on)).is_some());
                if version == v {
                    prop_assert!(
                        healthy_copies(model, v, index) > 0,
                        "deleted the last copy of fragment {index}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// The map, what the OSDs hold, each version's (k, m), and x.
type Case = (Vec<PlanOsd>, Model, BTreeMap<u64, (u8, u8)>, usize, bool);

fn arb_case() -> impl Strategy<Value = Case> {
    (
        3usize..10,
        1usize..4,
        proptest::collection::vec((0u8..10, 0u8..10), 10),
        (1u8..5, 0u8..3),
        (1usize..4, any::<bool>()),
        proptest::collection::vec(
            proptest::collection::vec(proptest::collection::vec((0u64..10, 0u8..4), 0..3), 8),
            1..3,
        ),
    )
        .prop_map(
            |(count, domains, traits, (k, m), (x, rebalance), versions)| {
                let osds: Vec<PlanOsd> = (0..count)
                    .map(|i| {
                        let (state, full) = traits[i];
                        let state = match state {
                            0..=5 => OsdState::Up,
                            6 | 7 => OsdState::Down,
                            8 => OsdState::Draining,
                            _ => OsdState::Out,
                        };
                        let mut o = osd(i as u64, i % domains, state);
                        o.slot.writable = full != 0;
                        o
                    })
                    .collect();
                let mut model = Model::new();
                let mut shapes = BTreeMap::new();
                for (vi, copies) in versions.iter().enumerate() {
                    let version = 10 * (vi as u64 + 1);
                    shapes.insert(version, (k, m));
                    let n = usize::from(k) + usize::from(m);
                    for (index, holders) in copies.iter().take(n).enumerate() {
                        for (id, health) in holders {
                            // Only what an up or draining OSD reports is seen.
                            if *id as usize >= count || !reachable(osds[*id as usize].state) {
                                continue;
                            }
                            let health = match health {
                                0 => CopyHealth::Corrupt,
                                1 => CopyHealth::Healthy,
                                _ => CopyHealth::Unverified,
                            };
                            model.insert((version, index as u8, *id), health);
                        }
                    }
                }
                (osds, model, shapes, x, rebalance)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn plans_never_lose_data_and_converge((osds, mut model, shapes, x, rebalance) in arb_case()) {
        let seen = seen_of("ns/obj", &model, &shapes);
        let plan = plan_object(&seen, &osds, |_, _| x, rebalance);
        let readable = |model: &Model, version: u64, (k, m): (u8, u8)| {
            (0..k + m).filter(|i| healthy_copies(model, version, *i) > 0).count() >= usize::from(k)
        };
        match plan.version {
            None => {
                prop_assert!(plan.actions.is_empty());
                prop_assert!(
                    shapes.iter().all(|(v, s)| !readable(&model, *v, *s)),
                    "a readable object was called unrecoverable"
                );
                prop_assert_eq!(plan.unrecoverable.is_some(), !model.is_empty());
                return Ok(());
            }
            Some(v) => prop_assert!(readable(&model, v, shapes[&v])),
        }
        let v = plan.version.unwrap();
        apply(&plan, &mut model, &osds)?;
        let n = usize::from(plan.k) + usize::from(plan.m);
        for index in 0..n as u8 {
            let waiting = plan.pending.contains(&index) || plan.unplaceable.contains(&index);
            prop_assert!(
                waiting || healthy_copies(&model, v, index) > 0,
                "fragment {index} has no healthy copy after the plan"
            );
        }
        prop_assert!(
            model.keys().all(|(version, _, _)| *version >= v),
            "a stale version survived"
        );
        // A healthy map (nothing down, every up OSD has room, placement feasible): exactly
        // one copy of every fragment, where placement wants it.
        let up = |id: u64| osds.iter().any(|o| o.slot.id == id && o.state == OsdState::Up);
        if !rebalance {
            // Sound copies on up OSDs stay; new copies go where no other fragment will be.
            for action in &plan.actions {
                let (from, to) = match *action {
                    Action::Move { from, to, .. } => (Some(from), to),
                    Action::Rebuild { to, .. } => (None, to),
                    Action::Delete { .. }
                    | Action::DropTombstone { .. }
                    | Action::ReEncode { .. } => continue,
                };
                prop_assert!(!from.is_some_and(up), "moved off an up OSD");
                {
                        let held = model
                            .iter()
                            .filter(|((version, _, osd), h)| *version == v && *osd == to && h.usable())
                            .count();
                        prop_assert_eq!(held, 1, "OSD {} holds several fragments", to);
                }
            }
        }
        let calm = rebalance
            && osds.iter().all(|o| o.state != OsdState::Down)
            && osds.iter().all(|o| o.state != OsdState::Up || o.slot.writable)
            && plan.desired.iter().all(Option::is_some);
        if calm {
            prop_assert!(plan.pending.is_empty() && plan.unplaceable.is_empty());
            for index in 0..n as u8 {
                let holders: Vec<u64> = model
                    .keys()
                    .filter(|(version, i, _)| *version == v && *i == index)
                    .map(|(_, _, osd)| *osd)
                    .collect();
                prop_assert_eq!(holders, vec![plan.desired[usize::from(index)].unwrap()]);
            }
        }
        // Converged: planning again finds nothing to do.
        let again = plan_object(&seen_of("ns/obj", &model, &shapes), &osds, |_, _| x, rebalance);
        prop_assert_eq!(again.version, Some(v));
        prop_assert!(again.actions.is_empty(), "second plan: {:?}", again.actions);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// With tombstones: a tombstone newer than every readable version makes the object deleted
    /// (nothing older survives the plan, nothing newer is touched, and tombstones go only once
    /// no OSD is down and no newer version is under way); one older than a readable version
    /// changes nothing about the repair of that version but is dropped.
    #[test]
    fn tombstones_delete_what_is_older_and_go_only_when_nothing_can_come_back(
        (osds, mut model, shapes, x, rebalance) in arb_case(),
        (at, holders) in (0u64..4, proptest::collection::btree_set(0u64..10, 1..4)),
    ) {
        let mut seen = seen_of("ns/obj", &model, &shapes);
        // Tombstones on OSDs that answered (a down OSD's tombstone is not seen).
        let on: BTreeSet<u64> = holders
            .into_iter()
            .filter(|id| osds.get(*id as usize).is_some_and(|o| reachable(o.state)))
            .collect();
        if on.is_empty() {
            return Ok(());
        }
        let tombstone = at * 10 + 5; // between versions (10, 20, ...): never equal to one
        seen.tombstones.insert(tombstone, on.clone());
        let without = plan_object(&seen_of("ns/obj", &model, &shapes), &osds, |_, _| x, rebalance);
        let plan = plan_object(&seen, &osds, |_, _| x, rebalance);
        let drops: Vec<&Action> = plan
            .actions
            .iter()
            .filter(|a| matches!(a, Action::DropTombstone { .. }))
            .collect();
        // Drops come last.
        let first_drop = plan.actions.iter().position(|a| matches!(a, Action::DropTombstone { .. }));
        let drops_last = first_drop.is_none_or(|at| {
            plan.actions[at..]
                .iter()
                .all(|a| matches!(a, Action::DropTombstone { .. }))
        });
        prop_assert!(drops_last, "a tombstone dropped before a delete");
        match without.version {
            Some(v) if v > tombstone => {
                // The tombstone is stale: the plan is the plain one, plus its drops.
                prop_assert_eq!(plan.version, Some(v));
                prop_assert_eq!(&plan.actions[..without.actions.len()], &without.actions[..]);
                prop_assert_eq!(drops.len(), on.len());
            }
            _ => {
                prop_assert_eq!(plan.version, None);
                prop_assert_eq!(plan.deleted, Some(tombstone));
                for action in &plan.actions {
                    if let Action::Delete { version, index, on } = *action {
                        prop_assert!(version < tombstone, "deleted a version after the delete");
                        prop_assert!(model.remove(&(version, index, on)).is_some());
                    }
                }
                prop_assert!(
                    model.keys().all(|(version, _, _)| *version > tombstone),
                    "a copy older than the delete survived: {:?}", model
                );
                let nothing_down = osds.iter().all(|o| o.state != OsdState::Down);
                let newer = shapes.keys().any(|v| *v > tombstone)
                    && model.keys().any(|(v, _, _)| *v > tombstone);
                if nothing_down && !newer {
                    prop_assert_eq!(drops.len(), on.len());
                } else {
                    prop_assert!(drops.is_empty(), "dropped a tombstone too early");
                }
            }
        }
    }
}

fn placed(osds: &[PlanOsd], key: &str, n: usize, x: usize) -> Model {
    let members: Vec<OsdSlot> = osds.iter().map(|o| o.slot.clone()).collect();
    place(key, &members, n, x)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, id)| ((1, i as u8, id), CopyHealth::Unverified))
        .collect()
}

#[test]
fn a_down_osd_waits_and_an_out_one_is_rebuilt() {
    let mut osds: Vec<PlanOsd> = (0..9)
        .map(|i| osd(i, i as usize % 3, OsdState::Up))
        .collect();
    let mut model = placed(&osds, "ns/o", 6, 2);
    let shapes = BTreeMap::from([(1, (4, 2))]);
    let lost = model.keys().next().unwrap().2;
    osds[lost as usize].state = OsdState::Down;
    model.retain(|k, _| k.2 != lost);
    let plan = plan_object(&seen_of("ns/o", &model, &shapes), &osds, |_, _| 2, true);
    assert!(plan.is_noop(), "down: wait, {:?}", plan.actions);
    assert_eq!(plan.pending.len(), 1);
    osds[lost as usize].state = OsdState::Out;
    let plan = plan_object(&seen_of("ns/o", &model, &shapes), &osds, |_, _| 2, true);
    // One rebuild; placement over the smaller map may also move others (knock-on).
    let rebuilds: Vec<&Action> = plan
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Rebuild { .. }))
        .collect();
    assert!(
        matches!(rebuilds[..], [Action::Rebuild { index: 0, to }] if *to != lost),
        "{:?}",
        plan.actions
    );
    apply(&plan, &mut model, &osds).unwrap();
    assert!((0..6).all(|i| healthy_copies(&model, 1, i) == 1));
}

#[test]
fn a_draining_osd_is_emptied_by_moves_and_unreadable_objects_are_left_alone() {
    let mut osds: Vec<PlanOsd> = (0..9)
        .map(|i| osd(i, i as usize % 3, OsdState::Up))
        .collect();
    let mut model = placed(&osds, "ns/o", 6, 2);
    let shapes = BTreeMap::from([(1, (4, 2))]);
    let (_, index, drained) = *model.keys().next().unwrap();
    osds[drained as usize].state = OsdState::Draining;
    let plan = plan_object(&seen_of("ns/o", &model, &shapes), &osds, |_, _| 2, true);
    assert!(
        plan.actions
            .iter()
            .all(|a| matches!(a, Action::Move { .. })),
        "{:?}",
        plan.actions
    );
    assert!(plan.actions.contains(&Action::Move {
        index,
        from: drained,
        to: plan.desired[usize::from(index)].unwrap()
    }));
    apply(&plan, &mut model, &osds).unwrap();
    assert!(model.keys().all(|(_, _, osd)| *osd != drained));
    // Three of six fragments left of a 4+2 object: report it, touch nothing.
    let few: Model = model.into_iter().take(3).collect();
    let plan = plan_object(&seen_of("ns/o", &few, &shapes), &osds, |_, _| 2, true);
    assert!(plan.actions.is_empty());
    let lost = plan.unrecoverable.unwrap();
    assert_eq!((lost.version, lost.healthy, lost.k), (1, 3, 4));
}

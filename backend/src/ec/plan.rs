//! The repair planner: what to do about one object, decided from what the OSDs reported and
//! the current map. Pure: no I/O, no clock, so every rule below is property-tested.
//!
//! **Which version.** The newest version with at least `k` indices that have a healthy copy on
//! an OSD that answered (up or draining) is the object. Older versions are stale: their copies
//! are deleted once the plan's rebuilds and moves are done. Newer versions with fewer than `k`
//! are left alone (a put in progress, or the remains of a failed one); they are never deleted
//! here. With no version readable the object is *unrecoverable* (or *unavailable* while an OSD
//! that may hold the rest is only down), and nothing is done to it: acting on fewer than `k`
//! fragments could only lose what is left.
//!
//! **Deleted objects.** A tombstone (a delete, `fragment`) newer than every readable version
//! means the object is deleted: every copy of an older version on an OSD that answered is
//! deleted (an OSD that was down at the delete came back with them), and once no OSD of the
//! map is down (nothing older can come back: an OSD taking a tombstone drops what it holds
//! that is older) and no newer version is under way, the tombstones themselves are dropped,
//! after those deletes succeeded. A readable version newer than the tombstones makes them
//! stale: they are dropped with the other stale copies. Versions newer than the tombstone
//! with fewer than `k` fragments (a put in progress) are left alone.
//!
//! **Where fragments belong.** Placement is recomputed over the map's *members*: OSDs up or
//! down (a down OSD is still a member until it is out, so its fragments are not rebuilt while
//! it might come back: Ceph's grace period), with their weights; draining and out OSDs are not
//! members. For each index `i` with desired OSD `d`:
//! - `d` holds a healthy copy: keep it; any other copy of `i` is deleted (misplaced or corrupt).
//! - `d` is down: keep a healthy copy where it is, or, with none, assume `d` has it (*pending*).
//! - `d` is up and writable: move a healthy copy there (copy, then delete the source), or with
//!   none, rebuild `i` onto `d` from `k` other fragments.
//! - otherwise (placement is infeasible, or `d` is full): keep a healthy copy on an up OSD,
//!   else move or rebuild onto the best-ranked writable OSD that holds nothing of the object,
//!   keeping at most `x` per domain when possible.
//!
//! **Order and safety.** Actions come rebuilds first, then moves, then deletes; the executor
//! runs the deletes of an object only once all its rebuilds and moves succeeded. A delete
//! never removes the last healthy copy of an index of the object's version (a property test
//! applies plans to a model and checks it after every action).

use std::collections::{BTreeMap, BTreeSet};

use super::placement::{place, ranking, OsdSlot};
use super::store::OsdState;

/// An OSD as the planner sees it: placement's slot (domain, weight, `writable` = has room) and
/// its state in the map.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOsd {
    pub slot: OsdSlot,
    pub state: OsdState,
}

/// What is known of one copy of a fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyHealth {
    /// Its CRCs were checked on the OSD (`Verify`) and hold.
    Healthy,
    /// Present with a sound header; its data was not checked this time.
    Unverified,
    /// Failed its CRC check: lost.
    Corrupt,
}

impl CopyHealth {
    pub fn usable(self) -> bool {
        self != CopyHealth::Corrupt
    }
}

/// One version of an object as the OSDs that answered reported it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionSeen {
    pub k: u8,
    pub m: u8,
    /// Fragment index → OSD → health of the copy there.
    pub copies: BTreeMap<u8, BTreeMap<u64, CopyHealth>>,
}

/// An object as observed: its placement key (`namespace/name`), every version seen and every
/// tombstone seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectSeen {
    pub key: String,
    pub versions: BTreeMap<u64, VersionSeen>,
    /// Tombstone version → the OSDs holding it.
    pub tombstones: BTreeMap<u64, BTreeSet<u64>>,
}

/// One step of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Decode fragment `index` of the plan's version from `k` others and write it to `to`.
    Rebuild { index: u8, to: u64 },
    /// Copy fragment `index` from `from` to `to`, then delete it on `from`.
    Move { index: u8, from: u64, to: u64 },
    /// Delete fragment `index` of `version` on `on` (stale version, misplaced or corrupt copy).
    Delete { version: u64, index: u8, on: u64 },
    /// Drop the tombstone of `version` on `on`: the delete it records can no longer be undone
    /// by an OSD coming back, or a newer version supersedes it. Always after the deletes.
    DropTombstone { version: u64, on: u64 },
    /// The object was written under a fallback policy and the map now holds a better one of
    /// its preset: write it again as `k + m` (the next version; the old one is then stale).
    /// Decided outside the planner, from the preset (`inspect::Observed::plan`); alone in
    /// its plan.
    ReEncode { k: u8, m: u8 },
}

/// Why nothing can be done for an object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Unrecoverable {
    /// The newest version seen.
    pub version: u64,
    /// Indices with a healthy copy on an OSD that answered.
    pub healthy: usize,
    pub k: u8,
    /// Some OSD that may hold the rest is down (not out): it may come back.
    pub waiting_for_down: bool,
}

/// What to do about one object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The version repaired; `None` when nothing of the object was seen or none is readable.
    pub version: Option<u64>,
    pub k: u8,
    pub m: u8,
    /// Where placement wants each index (`None`: no feasible placement over the members).
    pub desired: Vec<Option<u64>>,
    /// Rebuilds, then moves, then deletes.
    pub actions: Vec<Action>,
    /// Indices presumed on a down OSD: rebuilt only once it is out.
    pub pending: Vec<u8>,
    /// Indices with no healthy copy and no OSD that could take one.
    pub unplaceable: Vec<u8>,
    pub unrecoverable: Option<Unrecoverable>,
    /// The object was deleted: the newest tombstone's version (`version` is then `None`).
    pub deleted: Option<u64>,
}

impl Plan {
    /// Nothing to do, and nothing wrong that could be done something about.
    pub fn is_noop(&self) -> bool {
        self.actions.is_empty()
    }
}

fn reachable(state: OsdState) -> bool {
    matches!(state, OsdState::Up | OsdState::Draining)
}

/// Plan the repair of `seen` under the map `osds`; `x` is the most fragments per domain for
/// the object's `(k, m)` (the preset policy's `x`). Without `rebalance`, a sound copy on an up
/// OSD stays where it is (only lost fragments are rebuilt and draining OSDs emptied, each onto
/// an OSD holding nothing else of the object): the least traffic after a loss, at the price of
/// fragments left off their computed place (reads still find them, in a later lookup round).
pub fn plan_object(
    seen: &ObjectSeen,
    osds: &[PlanOsd],
    x: impl Fn(u8, u8) -> usize,
    rebalance: bool,
) -> Plan {
    let by_id: BTreeMap<u64, &PlanOsd> = osds.iter().map(|o| (o.slot.id, o)).collect();
    let state = |id: u64| by_id.get(&id).map_or(OsdState::Out, |o| o.state);
    let writable = |id: u64| {
        by_id
            .get(&id)
            .is_some_and(|o| o.state == OsdState::Up && o.slot.writable && o.slot.weight > 0.0)
    };
    // Healthy copies of each index of `v`, on OSDs that answered; up ones first.
    let healthy = |v: &VersionSeen, index: u8| -> Vec<u64> {
        let mut ids: Vec<u64> = v
            .copies
            .get(&index)
            .into_iter()
            .flatten()
            .filter(|(id, h)| h.usable() && reachable(state(**id)))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_by_key(|id| (state(*id) != OsdState::Up, *id));
        ids
    };
    let readable = |v: &VersionSeen| {
        v.copies
            .keys()
            .filter(|i| u16::from(**i) < u16::from(v.k) + u16::from(v.m))
            .filter(|i| !healthy(v, **i).is_empty())
            .count()
    };
    // Deletes of every copy, on an OSD that answered, of the versions before `version`.
    let older_than = |version: u64| -> Vec<Action> {
        let mut out = Vec::new();
        for (older, v) in seen.versions.range(..version) {
            for (index, copies) in &v.copies {
                for id in copies.keys().filter(|id| reachable(state(**id))) {
                    out.push(Action::Delete {
                        version: *older,
                        index: *index,
                        on: *id,
                    });
                }
            }
        }
        out
    };
    let tombstone = seen.tombstones.keys().next_back().copied();
    // Tombstone copies on OSDs that answered: dropped last, only once nothing else failed.
    let drops = || -> Vec<Action> {
        seen.tombstones
            .iter()
            .flat_map(|(version, on)| {
                on.iter()
                    .filter(|id| reachable(state(**id)))
                    .map(|id| Action::DropTombstone {
                        version: *version,
                        on: *id,
                    })
            })
            .collect()
    };
    let Some((&version, current)) = seen.versions.iter().rev().find(|(version, v)| {
        v.k > 0 && readable(v) >= usize::from(v.k) && Some(**version) > tombstone
    }) else {
        if let Some(deleted) = tombstone {
            // Every reachable copy older than the delete goes; versions newer than it (a put
            // under way) stay, and so do the tombstones while they do or an OSD is down.
            let mut actions = older_than(deleted);
            let settled = seen.versions.range(deleted..).next().is_none()
                && osds.iter().all(|o| o.state != OsdState::Down);
            if settled {
                actions.extend(drops());
            }
            return Plan {
                actions,
                deleted: Some(deleted),
                ..Plan::default()
            };
        }
        let unrecoverable = seen
            .versions
            .iter()
            .next_back()
            .map(|(version, v)| Unrecoverable {
                version: *version,
                healthy: readable(v),
                k: v.k,
                waiting_for_down: osds.iter().any(|o| o.state == OsdState::Down),
            });
        return Plan {
            unrecoverable,
            ..Plan::default()
        };
    };
    let (k, m) = (current.k, current.m);
    let n = usize::from(k) + usize::from(m);
    let per_domain = x(k, m).max(1);
    let members: Vec<OsdSlot> = osds
        .iter()
        .filter(|o| matches!(o.state, OsdState::Up | OsdState::Down) && o.slot.weight > 0.0)
        .map(|o| OsdSlot {
            writable: true,
            ..o.slot.clone()
        })
        .collect();
    let desired: Vec<Option<u64>> = match place(&seen.key, &members, n, per_domain) {
        Ok(placed) => placed.into_iter().map(Some).collect(),
        Err(_) => vec![None; n],
    };

    // First pass: where each index will live (`keep`), and what needs an OSD chosen later.
    let mut keep: Vec<Option<u64>> = vec![None; n];
    let mut rebuilds = Vec::new();
    let mut moves = Vec::new();
    let mut pending = Vec::new();
    let mut need_target: Vec<(u8, Option<u64>)> = Vec::new();
    for i in 0..n {
        let index = i as u8;
        let hs = healthy(current, index);
        if !rebalance {
            match (hs.iter().find(|h| state(**h) == OsdState::Up), desired[i]) {
                (Some(h), _) => keep[i] = Some(*h),
                (None, Some(d)) if hs.is_empty() && state(d) == OsdState::Down => {
                    keep[i] = Some(d);
                    pending.push(index);
                }
                (None, _) => need_target.push((index, hs.first().copied())),
            }
            continue;
        }
        match desired[i] {
            Some(d) if hs.contains(&d) => keep[i] = Some(d),
            Some(d) if state(d) == OsdState::Down => match hs.first() {
                Some(h) => keep[i] = Some(*h),
                None => {
                    keep[i] = Some(d);
                    pending.push(index);
                }
            },
            Some(d) if writable(d) => {
                keep[i] = Some(d);
                match hs.first() {
                    Some(from) => moves.push(Action::Move {
                        index,
                        from: *from,
                        to: d,
                    }),
                    None => rebuilds.push(Action::Rebuild { index, to: d }),
                }
            }
            _ => match hs.first() {
                Some(h) if state(*h) == OsdState::Up => keep[i] = Some(*h),
                source => need_target.push((index, source.copied())),
            },
        }
    }
    // Second pass: an OSD for each index placement could not give one (or, without rebalance,
    // each index without a sound copy on an up OSD), holding nothing else of the object: the
    // desired one if it can, else the best-ranked for the index, at most `x` per domain when
    // possible.
    let mut unplaceable = Vec::new();
    for (index, source) in need_target {
        let used: BTreeSet<u64> = keep.iter().flatten().copied().collect();
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for id in &used {
            if let Some(o) = by_id.get(id) {
                *per.entry(o.slot.domain.as_str()).or_default() += 1;
            }
        }
        let candidates: Vec<OsdSlot> = osds
            .iter()
            .filter(|o| writable(o.slot.id) && !used.contains(&o.slot.id))
            .map(|o| o.slot.clone())
            .collect();
        let i = usize::from(index);
        let fits = |o: &OsdSlot| per.get(o.domain.as_str()).copied().unwrap_or(0) < per_domain;
        let ranked = ranking(&seen.key, i, &candidates);
        let pick = ranked
            .iter()
            .copied()
            .find(|o| Some(o.id) == desired[i] && fits(o))
            .or_else(|| ranked.iter().copied().find(|o| fits(o)))
            .or(ranked.first().copied())
            .map(|o| o.id);
        match (pick, source) {
            (Some(to), Some(from)) => {
                keep[i] = Some(to);
                moves.push(Action::Move { index, from, to });
            }
            (Some(to), None) => {
                keep[i] = Some(to);
                rebuilds.push(Action::Rebuild { index, to });
            }
            // Nowhere to go: a copy on a draining OSD stays until there is room.
            (None, Some(from)) => {
                keep[i] = Some(from);
                unplaceable.push(index);
            }
            (None, None) => unplaceable.push(index),
        }
    }
    // Deletes: every other copy of an index whose future home is settled (not pending, which
    // trusts a down OSD), and every copy of an older version.
    let mut deletes = Vec::new();
    for (i, home) in keep.iter().enumerate() {
        let index = i as u8;
        let Some(home) = home else { continue };
        if pending.contains(&index) {
            continue;
        }
        let moved_from = moves.iter().find_map(|a| match a {
            Action::Move { index: j, from, .. } if *j == index => Some(*from),
            _ => None,
        });
        for id in current
            .copies
            .get(&index)
            .into_iter()
            .flatten()
            .map(|c| *c.0)
        {
            if id != *home && Some(id) != moved_from && reachable(state(id)) {
                deletes.push(Action::Delete {
                    version,
                    index,
                    on: id,
                });
            }
        }
    }
    // Local parities (indices past the code) are extras: a copy that is corrupt or on an OSD
    // being emptied goes (its group falls back to the code until a put rewrites it).
    for (index, copies) in current.copies.range(n.min(255) as u8..) {
        if usize::from(*index) < n {
            continue;
        }
        for (id, health) in copies {
            if reachable(state(*id)) && (!health.usable() || state(*id) == OsdState::Draining) {
                deletes.push(Action::Delete {
                    version,
                    index: *index,
                    on: *id,
                });
            }
        }
    }
    // Older versions are stale: the object's version is readable, so they are never needed.
    deletes.extend(older_than(version));
    let mut actions = rebuilds;
    actions.extend(moves);
    actions.extend(deletes);
    // Tombstones older than a readable version: that version is what reads return anyway.
    actions.extend(drops());
    Plan {
        version: Some(version),
        k,
        m,
        desired,
        actions,
        pending,
        unplaceable,
        unrecoverable: None,
        deleted: None,
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;

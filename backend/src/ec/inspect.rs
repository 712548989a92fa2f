//! Inspection (`vstor backend inspect`): what the OSDs hold of a namespace's objects and how
//! healthy it is, as serialisable reports (L-Store's `lio_inspect`).
//!
//! Nothing per object is stored centrally, so inspection asks the OSDs: every OSD that is up
//! or draining lists the namespace (`List`, paged), and each object's holders answer `Head`
//! (every version and index they hold). With `verify`, every copy of the object's current and
//! newer versions is CRC-checked on its OSD (`Verify`: nothing crosses the wire but the
//! answer). An OSD that does not answer is treated as down for the object: what it holds is
//! unknown, so nothing is rebuilt or deleted on the strength of its silence. The same survey
//! feeds the planner ([`super::plan`]); a report shows the actions repair would take.

use std::collections::{BTreeMap, BTreeSet};

use super::fragment::TOMBSTONE_INDEX;
use super::plan::{plan_object, Action, CopyHealth, ObjectSeen, Plan, PlanOsd, VersionSeen};
use super::preset::Preset;
use super::store::{object_key, write_slots, EcStore, OsdEntry, OsdState};
use crate::osd::proto::{ErrorCode, HeadEntry, Message};
use crate::{validate_name, BackendError, Result};

/// An OSD as a report names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OsdRef {
    pub id: u64,
    pub addr: String,
    pub domain: String,
    pub state: OsdState,
}

/// One copy of a fragment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FragmentCopy {
    pub osd: OsdRef,
    pub health: CopyHealth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FragmentStatus {
    /// One sound copy, where placement wants it.
    Healthy,
    /// Sound, but not (only) where placement wants it: repair moves it or drops extra copies.
    Misplaced,
    /// Presumed on an OSD that is down: rebuilt if it goes out.
    Pending,
    /// No sound copy: repair rebuilds it from `k` others.
    Missing,
    /// Only corrupt copies: repair rebuilds it.
    Corrupt,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FragmentHealth {
    pub index: u8,
    pub status: FragmentStatus,
    pub copies: Vec<FragmentCopy>,
    /// Where placement under the current map wants it (`None`: the map cannot place it).
    pub desired: Option<OsdRef>,
}

/// A local parity: the XOR of the fragments in `group`, kept in their domain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalParity {
    pub index: u8,
    pub group: Vec<u8>,
    pub copies: Vec<FragmentCopy>,
}

/// A copy of an older version, left to be deleted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StaleFragment {
    pub version: u64,
    pub index: u8,
    pub osd: OsdRef,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectStatus {
    /// Every fragment sound where placement wants it; nothing stale.
    Healthy,
    /// Readable; repair has work (missing, misplaced, corrupt or stale fragments), or some
    /// fragments wait for a down OSD.
    Degraded,
    /// Fewer than `k` fragments reachable, but an OSD that may hold more is down.
    Unavailable,
    /// Fewer than `k` fragments exist: the object is lost.
    Unrecoverable,
    /// Its newest record is a tombstone: reads and listings do not see it; repair removes
    /// the older fragments left (an OSD that was down at the delete) and the tombstones.
    /// A namespace's inspection leaves such objects out; asking for one by name shows it.
    Deleted,
}

/// One object's health, as `vstor backend inspect` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectHealth {
    pub name: String,
    pub status: ObjectStatus,
    /// The version reads return (for an unreadable object, the newest seen).
    pub version: u64,
    pub k: u8,
    pub m: u8,
    pub size: u64,
    /// Fragments with a sound copy.
    pub healthy_fragments: usize,
    pub fragments: Vec<FragmentHealth>,
    pub stale: Vec<StaleFragment>,
    /// Local parities of the version (presets with `local_parity`).
    pub local_parities: Vec<LocalParity>,
    /// Newer versions with fewer than `k` fragments (a put in progress or a failed one).
    pub incomplete_versions: Vec<u64>,
    /// What repair would do now.
    pub planned: Vec<Action>,
}

/// Object name → the OSDs that listed a fragment of it.
pub(super) type Holders = BTreeMap<String, BTreeSet<u64>>;

/// What the OSDs said about one object.
pub(super) struct Observed {
    pub(super) name: String,
    pub(super) seen: ObjectSeen,
    /// One header per version (size, codec, fragment size).
    pub(super) heads: BTreeMap<u64, HeadEntry>,
    /// OSDs expected to answer that did not.
    pub(super) silent: BTreeSet<u64>,
    /// The group of each local parity seen, by (version, index).
    pub(super) groups: BTreeMap<(u64, u8), Vec<u8>>,
}

impl Observed {
    /// The planner's view of the map for this object: a silent OSD counts as down if it was up
    /// (it may hold fragments: don't rebuild them on its silence) and as out if draining.
    pub(super) fn plan_osds(&self, osds: &[OsdEntry]) -> Vec<PlanOsd> {
        osds.iter()
            .map(|o| PlanOsd {
                slot: o.slot.clone(),
                state: match o.state {
                    OsdState::Up if self.silent.contains(&o.slot.id) => OsdState::Down,
                    OsdState::Draining if self.silent.contains(&o.slot.id) => OsdState::Out,
                    other => other,
                },
            })
            .collect()
    }

    /// The repair plan of the object. With `rebalance`, an object written under one of its
    /// preset's fallback policies is re-encoded once the writable OSDs (those that answered)
    /// hold a better policy: its plan is then that alone (the rewrite replaces every fragment,
    /// so rebuilding or moving the old ones first would be wasted).
    pub(super) fn plan(&self, osds: &[OsdEntry], preset: Option<&Preset>, rebalance: bool) -> Plan {
        let mut plan = plan_object(
            &self.seen,
            &self.plan_osds(osds),
            |k, m| {
                preset
                    .and_then(|p| p.policies.iter().find(|p| p.k == k && p.m == m))
                    .map_or(usize::from(m.max(1)), |p| usize::from(p.x))
            },
            rebalance,
        );
        let Some(preset) = preset.filter(|_| rebalance && plan.version.is_some()) else {
            return plan;
        };
        let current = preset
            .policies
            .iter()
            .position(|p| (p.k, p.m) == (plan.k, plan.m));
        let answering: Vec<OsdEntry> = osds
            .iter()
            .filter(|o| !self.silent.contains(&o.slot.id))
            .cloned()
            .collect();
        if let (Some(current), Some((best, policy))) =
            (current, preset.choose(&write_slots(&answering)))
        {
            if best < current {
                plan.actions = vec![Action::ReEncode {
                    k: policy.k,
                    m: policy.m,
                }];
                plan.pending.clear();
                plan.unplaceable.clear();
            }
        }
        plan
    }
}

fn osd_ref(osds: &[OsdEntry], id: u64) -> OsdRef {
    match osds.iter().find(|o| o.slot.id == id) {
        Some(o) => OsdRef {
            id,
            addr: o.addr.clone(),
            domain: o.slot.domain.clone(),
            state: o.state,
        },
        None => OsdRef {
            id,
            addr: "-".into(),
            domain: "-".into(),
            state: OsdState::Out,
        },
    }
}

impl EcStore {
    /// Every object of `namespace` any up or draining OSD holds a fragment of, with the OSDs
    /// that listed it, and the OSDs that could not list.
    pub(super) fn survey_names(
        &self,
        namespace: &str,
        osds: &[OsdEntry],
    ) -> Result<(Holders, BTreeSet<u64>)> {
        let mut names: Holders = BTreeMap::new();
        let mut silent = BTreeSet::new();
        // When no OSD can be reached, the survey knows nothing: say why (the first OSD's error,
        // e.g. a refused TLS handshake) rather than report an empty namespace.
        let (mut first_error, mut unreachable) = (None, 0);
        let live: Vec<&OsdEntry> = osds
            .iter()
            .filter(|o| matches!(o.state, OsdState::Up | OsdState::Draining))
            .collect();
        for &entry in &live {
            let mut after = String::new();
            // Bounded: each page moves `after` forward, and a name sorts after the last one.
            loop {
                let answer = self.call_all(vec![(
                    entry.clone(),
                    Message::List {
                        namespace: namespace.to_string(),
                        after: after.clone(),
                        limit: 1000,
                    },
                )])?;
                let fragments = match answer.into_iter().next() {
                    Some((_, Ok(Message::Listing { fragments }))) => fragments,
                    other => {
                        if let Some((_, Err(e @ BackendError::Osd { .. }))) = other {
                            first_error.get_or_insert(e);
                            unreachable += 1;
                        }
                        silent.insert(entry.slot.id);
                        break;
                    }
                };
                let Some(last) = fragments.last().map(|f| f.name.clone()) else {
                    break;
                };
                for f in fragments {
                    names.entry(f.name).or_default().insert(entry.slot.id);
                }
                if last <= after {
                    break;
                }
                after = last;
            }
        }
        if !live.is_empty() && unreachable == live.len() {
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        Ok((names, silent))
    }

    /// Ask `holders` what they hold of `name`; with `verify`, CRC-check on the OSDs every copy
    /// of the newest version with `k` fragments and of any newer one.
    pub(super) fn observe(
        &self,
        namespace: &str,
        name: &str,
        holders: &[OsdEntry],
        verify: bool,
    ) -> Result<Observed> {
        let mut observed = Observed {
            name: name.to_string(),
            seen: ObjectSeen {
                key: object_key(namespace, name),
                ..ObjectSeen::default()
            },
            heads: BTreeMap::new(),
            silent: BTreeSet::new(),
            groups: BTreeMap::new(),
        };
        let targets = holders
            .iter()
            .map(|o| {
                (
                    o.clone(),
                    Message::Head {
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                    },
                )
            })
            .collect();
        for (entry, answer) in self.call_all(targets)? {
            let Ok(Message::Heads { heads }) = answer else {
                observed.silent.insert(entry.slot.id);
                continue;
            };
            for head in heads {
                if head.index == TOMBSTONE_INDEX && head.k == 0 {
                    observed
                        .seen
                        .tombstones
                        .entry(head.version)
                        .or_default()
                        .insert(entry.slot.id);
                    continue;
                }
                let version = observed
                    .seen
                    .versions
                    .entry(head.version)
                    .or_insert_with(|| VersionSeen {
                        k: head.k,
                        m: head.m,
                        copies: BTreeMap::new(),
                    });
                version
                    .copies
                    .entry(head.index)
                    .or_default()
                    .insert(entry.slot.id, CopyHealth::Unverified);
                if !head.group.is_empty() {
                    observed
                        .groups
                        .insert((head.version, head.index), head.group.clone());
                }
                observed.heads.entry(head.version).or_insert(head);
            }
        }
        if verify {
            let from = observed
                .seen
                .versions
                .iter()
                .rev()
                .find(|(_, v)| v.copies.len() >= usize::from(v.k))
                .map_or(0, |(version, _)| *version);
            let mut checks = Vec::new();
            for (version, v) in observed.seen.versions.range(from..) {
                for (index, copies) in &v.copies {
                    for osd in copies.keys() {
                        if let Some(entry) = holders.iter().find(|o| o.slot.id == *osd) {
                            checks.push((*version, *index, entry.clone()));
                        }
                    }
                }
            }
            let targets = checks
                .iter()
                .map(|(version, index, entry)| {
                    (
                        entry.clone(),
                        Message::Verify {
                            namespace: namespace.to_string(),
                            name: name.to_string(),
                            version: *version,
                            index: *index,
                        },
                    )
                })
                .collect();
            for ((version, index, _), (entry, answer)) in checks.iter().zip(self.call_all(targets)?)
            {
                let health = match answer {
                    Ok(Message::Done) => CopyHealth::Healthy,
                    // Gone since the Head, or damaged: either way not a copy to count on.
                    Err(BackendError::OsdRefused {
                        code: ErrorCode::Corrupt | ErrorCode::NotFound,
                        ..
                    }) => CopyHealth::Corrupt,
                    _ => {
                        observed.silent.insert(entry.slot.id);
                        CopyHealth::Unverified
                    }
                };
                if let Some(copy) = observed
                    .seen
                    .versions
                    .get_mut(version)
                    .and_then(|v| v.copies.get_mut(index))
                    .and_then(|c| c.get_mut(&entry.slot.id))
                {
                    *copy = health;
                }
            }
        }
        Ok(observed)
    }

    /// The health of every object of `namespace`, or of `object` alone; `verify` checks every
    /// current fragment's CRCs on its OSD (a scrub that changes nothing).
    pub fn inspect(
        &self,
        namespace: &str,
        object: Option<&str>,
        verify: bool,
    ) -> Result<Vec<ObjectHealth>> {
        validate_name(namespace)?;
        let record = self.record(namespace)?;
        let preset = self.map.preset(&record.preset)?;
        let osds = self.map.osds()?;
        let mut out = Vec::new();
        for observed in self.observe_all(namespace, object, &osds, verify)? {
            let plan = observed.plan(&osds, preset.as_ref(), true);
            // A deleted object is not part of the namespace (unless asked for by name).
            if plan.deleted.is_some() && object.is_none() {
                continue;
            }
            out.push(health_of(&observed, &plan, &osds));
        }
        Ok(out)
    }

    /// Observe every object of the namespace (or just `object`), with the OSD list each was
    /// asked of. An object is surveyed on the OSDs that listed it.
    pub(super) fn observe_all(
        &self,
        namespace: &str,
        object: Option<&str>,
        osds: &[OsdEntry],
        verify: bool,
    ) -> Result<Vec<Observed>> {
        let live: Vec<OsdEntry> = osds
            .iter()
            .filter(|o| matches!(o.state, OsdState::Up | OsdState::Draining))
            .cloned()
            .collect();
        let mut out = Vec::new();
        match object {
            Some(name) => {
                validate_name(name)?;
                let observed = self.observe(namespace, name, &live, verify)?;
                out.push(observed);
            }
            None => {
                let (names, silent) = self.survey_names(namespace, osds)?;
                for (name, holders) in names {
                    let holders: Vec<OsdEntry> = live
                        .iter()
                        .filter(|o| holders.contains(&o.slot.id))
                        .cloned()
                        .collect();
                    let mut observed = self.observe(namespace, &name, &holders, verify)?;
                    observed.silent.extend(silent.iter().copied());
                    out.push(observed);
                }
            }
        }
        Ok(out)
    }
}

/// The report of one object from what was observed and the plan.
pub(super) fn health_of(observed: &Observed, plan: &Plan, osds: &[OsdEntry]) -> ObjectHealth {
    let newest = observed.seen.versions.keys().next_back().copied();
    let version = plan.version.or(plan.deleted).or(newest).unwrap_or(0);
    let head = observed.heads.get(&version);
    let (k, m) = head.map_or((0, 0), |h| (h.k, h.m));
    let current = observed.seen.versions.get(&version);
    let mut fragments = Vec::new();
    let mut healthy_fragments = 0;
    for index in 0..(u16::from(k) + u16::from(m)) {
        let index = index as u8;
        let copies: Vec<FragmentCopy> = current
            .and_then(|v| v.copies.get(&index))
            .into_iter()
            .flatten()
            .map(|(id, health)| FragmentCopy {
                osd: osd_ref(osds, *id),
                health: *health,
            })
            .collect();
        let sound = copies.iter().any(|c| c.health.usable());
        healthy_fragments += usize::from(sound);
        let touched = plan.actions.iter().any(|a| match a {
            Action::Rebuild { index: i, .. } | Action::Move { index: i, .. } => *i == index,
            Action::Delete {
                version: v,
                index: i,
                ..
            } => *v == version && *i == index,
            Action::DropTombstone { .. } | Action::ReEncode { .. } => false,
        });
        let status = if plan.pending.contains(&index) {
            FragmentStatus::Pending
        } else if !sound && !copies.is_empty() {
            FragmentStatus::Corrupt
        } else if !sound {
            FragmentStatus::Missing
        } else if touched || plan.unplaceable.contains(&index) {
            FragmentStatus::Misplaced
        } else {
            FragmentStatus::Healthy
        };
        fragments.push(FragmentHealth {
            index,
            status,
            copies,
            desired: plan
                .desired
                .get(usize::from(index))
                .copied()
                .flatten()
                .map(|id| osd_ref(osds, id)),
        });
    }
    let stale = observed
        .seen
        .versions
        .range(..version)
        .flat_map(|(v, seen)| {
            seen.copies.iter().flat_map(move |(index, copies)| {
                copies.keys().map(move |id| StaleFragment {
                    version: *v,
                    index: *index,
                    osd: osd_ref(osds, *id),
                })
            })
        })
        .collect();
    let status = match &plan.unrecoverable {
        _ if plan.deleted.is_some() => ObjectStatus::Deleted,
        Some(lost) if lost.waiting_for_down => ObjectStatus::Unavailable,
        Some(_) => ObjectStatus::Unrecoverable,
        None if plan.actions.is_empty()
            && plan.pending.is_empty()
            && plan.unplaceable.is_empty() =>
        {
            ObjectStatus::Healthy
        }
        None => ObjectStatus::Degraded,
    };
    ObjectHealth {
        name: observed.name.clone(),
        status,
        version,
        k,
        m,
        size: head.map_or(0, |h| h.object_size),
        healthy_fragments,
        fragments,
        stale,
        local_parities: current
            .into_iter()
            .flat_map(|v| {
                v.copies
                    .range((u16::from(k) + u16::from(m)).min(255) as u8..)
            })
            .filter(|(index, _)| u16::from(**index) >= u16::from(k) + u16::from(m))
            .map(|(index, copies)| LocalParity {
                index: *index,
                group: observed
                    .groups
                    .get(&(version, *index))
                    .cloned()
                    .unwrap_or_default(),
                copies: copies
                    .iter()
                    .map(|(id, health)| FragmentCopy {
                        osd: osd_ref(osds, *id),
                        health: *health,
                    })
                    .collect(),
            })
            .collect(),
        incomplete_versions: observed
            .seen
            .versions
            .range(version.saturating_add(1)..)
            .map(|(v, _)| *v)
            .collect(),
        planned: plan.actions.clone(),
    }
}

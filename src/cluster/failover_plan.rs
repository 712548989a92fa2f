//! Pure failover decisions: no I/O, no clock, no registry. Every survivor of a node's death
//! runs the same functions on the same registry snapshot and so computes the same plan, which
//! is what lets them split the dead node's volumes without talking to each other first (the
//! registry's ownership transaction still decides the one winner of each volume).
//!
//! - [`plan_adoptions`]: each orphaned volume to a survivor, spread by load.
//! - [`may_adopt`]: whether this node may take a volume now (its planned adopter, or anyone
//!   once the planned one had its grace period).
//! - Where a re-placed DTL goes is the create-time rule, `placement::dtl_node`.
//! - [`recovery`]: whether an orphan can be recovered at all or must halt.
//! - [`ownership_landed`]: whether an ownership transaction that got no answer took effect;
//!   [`create_landed`]: the same for the record of a volume this node just created.
//! - [`after_failed_adoption`]: whether a failed adoption is tried again or halts the volume.
//! - [`dtl_back_since_halt`]: whether a halted volume is adopted again on its own.
//! - [`after_fence`]: what a node does with a volume it held once its lease is back.
//! - [`UnservedWatch`]: which volumes the registry says this node serves, that nothing here
//!   serves, have stayed so long enough for this node to adopt them (the caller passes the
//!   time in: no clock here).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::registry::VolumeRecord;

/// A live node as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveNode {
    pub name: String,
    pub domain: String,
    pub recovery_domain: Option<String>,
    /// Volumes the node owns now.
    pub volumes: usize,
}

/// A volume whose owner died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub name: String,
    /// The node holding its DTL, if it has one.
    pub dtl_node: Option<String>,
    /// The volume's DTL mode is not `none`: acknowledged writes may exist only on the DTL.
    pub mirrored: bool,
}

/// Assign every orphan to a live node: volumes in name order, each to the node with the fewest
/// volumes at that point (counting the ones already assigned), preferring a node that is not
/// the volume's DTL node (so the DTL stays where it is and needs no re-placement), then the
/// smallest name. Deterministic for a given input, whatever order it comes in. Empty when no
/// node is alive.
pub fn plan_adoptions(live: &[LiveNode], orphans: &[Orphan]) -> BTreeMap<String, String> {
    let mut load: BTreeMap<&str, usize> =
        live.iter().map(|n| (n.name.as_str(), n.volumes)).collect();
    let mut sorted: Vec<&Orphan> = orphans.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut plan = BTreeMap::new();
    for orphan in sorted {
        let best = load
            .iter()
            .min_by_key(|(name, count)| {
                (**count, orphan.dtl_node.as_deref() == Some(**name), **name)
            })
            .map(|(name, _)| *name);
        if let Some(node) = best {
            *load.entry(node).or_default() += 1;
            plan.insert(orphan.name.clone(), node.to_string());
        }
    }
    plan
}

/// Whether node `me` may try to take a volume now: it is the planned adopter, or the planned
/// adopter has had `grace` since the death was seen and has not taken it (it may be dead too, or
/// stuck). The registry transaction makes sure only one attempt wins.
pub fn may_adopt(me: &str, planned: Option<&str>, since_death: Duration, grace: Duration) -> bool {
    planned == Some(me) || since_death >= grace
}

/// Whether an orphan can be brought back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Adopt it: the backend plus (if any) the DTL hold every acknowledged write.
    Adopt,
    /// Do not serve it: data may be missing. The reason goes to `volume info`.
    Halt(String),
}

/// A mirrored volume whose DTL node is dead too may have acknowledged writes that exist
/// nowhere else: serving it would hand out stale data, so it halts until an operator decides.
/// A volume without a DTL (mode `none`) acknowledged only what a FLUSH put on its own node, so
/// it is adopted from the backend as its mode promised.
pub fn recovery(orphan: &Orphan, live: &[LiveNode]) -> Recovery {
    match (&orphan.dtl_node, orphan.mirrored) {
        (_, false) => Recovery::Adopt,
        (Some(dtl), true) if live.iter().any(|n| &n.name == dtl) => Recovery::Adopt,
        (Some(dtl), true) => Recovery::Halt(format!(
            "its owner and its DTL node {dtl} are both gone; {DTL_LOST_CONSEQUENCE}"
        )),
        (None, true) => Recovery::Halt(
            "its owner is gone and it has no DTL node on record; acknowledged writes not yet on the backend may be lost".into(),
        ),
    }
}

/// What a volume whose owner and DTL node are both gone means for its data, and what brings it
/// back: said alike whichever way the survivors found out ([`recovery`],
/// [`failed_adoption_reason`]).
const DTL_LOST_CONSEQUENCE: &str = "acknowledged writes not yet on the backend may be lost, so it is not served until the DTL node is back or an operator adopts it";

/// The halt reason when `me`'s adoption failed for good with `error`. `dtl_gone` names the
/// volume's DTL node if the failure was the DTL's and the registry says that node is dead by
/// now: the owner and the DTL node died together, but the DTL node's lease outlived the
/// owner's, so the survivor saw a dead owner with a live DTL node and tried. The reason then
/// tells the same story as when both leases had expired by the survivor's pass ([`recovery`]),
/// so the operator reads why, not only which connection was refused.
pub fn failed_adoption_reason(me: &str, error: &str, dtl_gone: Option<&str>) -> String {
    match dtl_gone {
        Some(dtl) => format!(
            "adoption by {me} failed: its DTL node {dtl} is gone too ({error}); {DTL_LOST_CONSEQUENCE}"
        ),
        None => format!("adoption by {me} failed: {error}"),
    }
}

/// How many times a survivor tries to adopt a volume before it records the volume halted.
pub const ADOPT_ATTEMPTS: u32 = 3;

/// The pause after the first failed attempt; it doubles after each further one.
pub const ADOPT_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// What a survivor does after its adoption attempt number `attempt` (from 1) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailedAdoption {
    /// Take the volume again under a newer tag after the pause.
    Retry { after: Duration },
    /// Record the volume halted with the error as the reason.
    Halt,
}

/// A DTL or backend that did not answer (in time) on a loaded machine is no reason to halt a
/// volume for good: such a failure (`may_succeed_later`) is retried, with a growing pause, up
/// to [`ADOPT_ATTEMPTS`] in all. Anything else (another node claimed the volume, its
/// configuration cannot be read) fails the same way again and halts at once.
pub fn after_failed_adoption(attempt: u32, may_succeed_later: bool) -> AfterFailedAdoption {
    if may_succeed_later && attempt < ADOPT_ATTEMPTS {
        AfterFailedAdoption::Retry {
            after: ADOPT_RETRY_PAUSE * (1 << (attempt - 1).min(8)),
        }
    } else {
        AfterFailedAdoption::Halt
    }
}

/// A `take_ownership` that got no answer (a timeout, a lost connection) may still have been
/// applied by the registry. `now` is the volume's (owner, tag) read afterwards: if it names this
/// node with a newer tag than the one expected, the transaction landed and this node owns the
/// volume under that tag. It must adopt it then: nobody else will, the owner being alive.
pub fn ownership_landed(now: Option<(&str, u64)>, me: &str, expected: u64) -> Option<u64> {
    match now {
        Some((owner, tag)) if owner == me && tag > expected => Some(tag),
        _ => None,
    }
}

/// Whether a volume create whose registry write got no answer took effect: the record read
/// afterwards is the one this node wrote (same owner, tag and creation time; another node's
/// create of the same name, or an older volume, differs in one of them). The node then keeps
/// the volume it created, instead of deleting it under a record that names it as the owner.
pub fn create_landed(now: Option<&VolumeRecord>, written: &VolumeRecord) -> bool {
    now.is_some_and(|r| {
        r.owner == written.owner
            && r.owner_tag == written.owner_tag
            && r.created_at == written.created_at
    })
}

/// A halted volume is adopted again when its DTL node has been alive since after the halt
/// (`dtl_alive_since_ms`, `None` while it is dead): restarted, or back from a partition. The
/// acknowledged writes the halt protected may be readable again. A halt recorded after that
/// (the new attempt failed too) is not retried until the DTL node comes back once more.
pub fn dtl_back_since_halt(halted_at_ms: u64, dtl_alive_since_ms: Option<u64>) -> bool {
    dtl_alive_since_ms.is_some_and(|since| since > halted_at_ms)
}

/// How long a volume must stay *unserved here* before this node adopts it: its record names
/// this node, serving, yet nothing here serves it, adopts it, or is letting it go (delete,
/// move). Longer than any window in which that is normal for a moment and not marked (a
/// registry write on its way), short next to the failover detection time.
pub const UNSERVED_GRACE: Duration = Duration::from_secs(5);

/// The volumes found unserved here, pass after pass, and since when.
///
/// Why it exists: the registry can name this node as the serving owner of a volume it does not
/// serve: an ownership transaction applied after the node gave up waiting for its answer, a
/// node restarted with its write-buffer disk replaced (no other node was alive to adopt its
/// volumes meanwhile), a create or delete whose record write landed late. Nothing else would
/// ever serve such a volume, since its owner is alive; the node adopts it from the backend and
/// its DTL, as in a failover, once it has stayed that way for [`UNSERVED_GRACE`].
#[derive(Debug, Default)]
pub struct UnservedWatch {
    since: BTreeMap<String, Instant>,
}

impl UnservedWatch {
    /// Note this pass's unserved volumes (`now`); returns those unserved for at least `grace`.
    /// A volume missing from `unserved` is forgotten, so its time starts again if it comes back.
    pub fn update(
        &mut self,
        now: Instant,
        unserved: &BTreeSet<String>,
        grace: Duration,
    ) -> Vec<String> {
        self.since.retain(|name, _| unserved.contains(name));
        for name in unserved {
            self.since.entry(name.clone()).or_insert(now);
        }
        self.since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= grace)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// What a node does with a volume it served once its lease is back after being fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFence {
    /// Nobody took it: take it again under a new owner tag and serve it.
    Retake,
    /// Another node owns it now: stop serving it here and say where it went.
    DropMoved(String),
}

/// `registry_owner` is the volume's owner as the registry says now (`None`: no owner key, e.g.
/// it expired with our lease and nobody adopted the volume yet).
pub fn after_fence(me: &str, registry_owner: Option<&str>) -> AfterFence {
    match registry_owner {
        Some(owner) if owner != me => AfterFence::DropMoved(owner.to_string()),
        _ => AfterFence::Retake,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_adoption_whose_dtl_node_died_too_says_so_like_a_double_failure() {
        let error = "volume vol: DTL 127.0.0.1:26074: I/O error: Connection refused";
        let plain = failed_adoption_reason("n2", error, None);
        assert_eq!(plain, format!("adoption by n2 failed: {error}"));
        let gone = failed_adoption_reason("n2", error, Some("n1"));
        assert!(
            gone.starts_with("adoption by n2 failed: its DTL node n1 is gone too"),
            "{gone}"
        );
        assert!(gone.contains(error), "{gone}");
        let orphan = Orphan {
            name: "vol".into(),
            dtl_node: Some("n1".into()),
            mirrored: true,
        };
        let Recovery::Halt(both) = recovery(&orphan, &[]) else {
            panic!("a mirrored orphan without its DTL node is not adopted");
        };
        assert!(gone.ends_with(DTL_LOST_CONSEQUENCE) && both.ends_with(DTL_LOST_CONSEQUENCE));
        assert!(gone.contains("may be lost"), "{gone}");
    }

    #[test]
    fn a_volume_is_adopted_only_after_staying_unserved_for_the_grace() {
        let grace = Duration::from_secs(5);
        let t0 = Instant::now();
        let set = |names: &[&str]| {
            names
                .iter()
                .map(ToString::to_string)
                .collect::<BTreeSet<_>>()
        };
        let mut watch = UnservedWatch::default();
        assert!(watch.update(t0, &set(&["a", "b"]), grace).is_empty());
        let t1 = t0 + Duration::from_secs(3);
        assert!(watch.update(t1, &set(&["a", "b", "c"]), grace).is_empty());
        // b is served again (or being let go) for one pass: its time starts over.
        let t2 = t0 + Duration::from_secs(4);
        assert!(watch.update(t2, &set(&["a", "c"]), grace).is_empty());
        let t3 = t0 + Duration::from_secs(5);
        assert_eq!(watch.update(t3, &set(&["a", "b", "c"]), grace), ["a"]);
        let t4 = t0 + Duration::from_secs(8);
        assert_eq!(watch.update(t4, &set(&["a", "b", "c"]), grace), ["a", "c"]);
        assert_eq!(
            watch.update(t0 + Duration::from_secs(10), &set(&["b"]), grace),
            ["b"]
        );
        assert!(watch.update(t4, &set(&[]), grace).is_empty());
    }

    fn node(name: &str, domain: &str, recovery: Option<&str>, volumes: usize) -> LiveNode {
        LiveNode {
            name: name.into(),
            domain: domain.into(),
            recovery_domain: recovery.map(Into::into),
            volumes,
        }
    }

    fn orphan(name: &str, dtl: Option<&str>) -> Orphan {
        Orphan {
            name: name.into(),
            dtl_node: dtl.map(Into::into),
            mirrored: true,
        }
    }

    #[test]
    fn failed_adoptions_retry_only_what_may_succeed_later_and_only_a_few_times() {
        assert_eq!(
            after_failed_adoption(1, true),
            AfterFailedAdoption::Retry {
                after: Duration::from_secs(1)
            }
        );
        assert_eq!(
            after_failed_adoption(2, true),
            AfterFailedAdoption::Retry {
                after: Duration::from_secs(2)
            }
        );
        assert_eq!(
            after_failed_adoption(ADOPT_ATTEMPTS, true),
            AfterFailedAdoption::Halt
        );
        assert_eq!(after_failed_adoption(1, false), AfterFailedAdoption::Halt);
        assert_eq!(
            after_failed_adoption(u32::MAX, true),
            AfterFailedAdoption::Halt
        );
    }

    #[test]
    fn an_unanswered_ownership_transaction_landed_only_if_the_record_names_us_newer() {
        assert_eq!(ownership_landed(Some(("b", 8)), "b", 7), Some(8));
        // Not applied (yet): the old owner and tag.
        assert_eq!(ownership_landed(Some(("a", 7)), "b", 7), None);
        // Another survivor's transaction won.
        assert_eq!(ownership_landed(Some(("c", 8)), "b", 7), None);
        // Named us before this attempt (an older attempt's tag): not this transaction.
        assert_eq!(ownership_landed(Some(("b", 7)), "b", 7), None);
        // Deleted meanwhile, or the read failed too.
        assert_eq!(ownership_landed(None, "b", 7), None);
    }

    #[test]
    fn an_unanswered_create_landed_only_if_the_record_is_the_one_written() {
        let written = crate::registry::VolumeRecord {
            name: "v".into(),
            owner: "n1".into(),
            owner_tag: 1,
            dtl_node: Some("n2".into()),
            dtl_addr: None,
            dtl_mode: vstor_volumedriver::DtlMode::Sync,
            state: crate::registry::VolumeState::Serving,
            size: 1 << 30,
            created_at: 1_700_000_000,
        };
        assert!(create_landed(Some(&written), &written));
        // Not applied (yet), or deleted meanwhile.
        assert!(!create_landed(None, &written));
        // Another node created the name, or this node did at another time.
        for other in [
            VolumeRecord {
                owner: "n3".into(),
                ..written.clone()
            },
            VolumeRecord {
                owner_tag: 2,
                ..written.clone()
            },
            VolumeRecord {
                created_at: written.created_at - 60,
                ..written.clone()
            },
        ] {
            assert!(!create_landed(Some(&other), &written), "{other:?}");
        }
    }

    #[test]
    fn a_halted_volume_is_revived_only_by_a_dtl_node_back_since_the_halt() {
        // Restarted (or seen back) after the halt.
        assert!(dtl_back_since_halt(10_000, Some(12_999)));
        // Alive since before the halt: the halt already saw it (an unreadable DTL, say).
        assert!(!dtl_back_since_halt(10_000, Some(9_999)));
        assert!(!dtl_back_since_halt(10_000, Some(10_000)));
        // Still dead.
        assert!(!dtl_back_since_halt(10_000, None));
        // A record from before halts had a time: revived by any live DTL node.
        assert!(dtl_back_since_halt(0, Some(1)));
    }

    #[test]
    fn adoptions_spread_by_load() {
        let live = [node("b", "d1", None, 3), node("c", "d1", None, 0)];
        let orphans: Vec<Orphan> = (0..5).map(|i| orphan(&format!("v{i}"), None)).collect();
        let plan = plan_adoptions(&live, &orphans);
        assert_eq!(plan.len(), 5);
        let to_c = plan.values().filter(|n| *n == "c").count();
        // c starts 3 behind: it takes the first 3, then they alternate (b wins ties by name).
        assert_eq!(to_c, 4);
        assert_eq!(plan["v0"], "c");
        assert_eq!(plan["v3"], "b");
        assert_eq!(plan["v4"], "c");
    }

    #[test]
    fn plan_is_the_same_whatever_the_input_order() {
        let live = [
            node("n1", "a", None, 1),
            node("n2", "a", None, 2),
            node("n3", "b", None, 1),
        ];
        let orphans: Vec<Orphan> = (0..9)
            .map(|i| orphan(&format!("vol{i}"), Some(["n1", "n2", "n3"][i % 3])))
            .collect();
        let plan = plan_adoptions(&live, &orphans);
        let mut live_rev = live.to_vec();
        live_rev.reverse();
        let mut orphans_rev = orphans.clone();
        orphans_rev.reverse();
        assert_eq!(plan, plan_adoptions(&live_rev, &orphans_rev));
        // Loads end balanced: 1+2+1 existing + 9 new = 13 over 3 nodes.
        let mut counts = BTreeMap::new();
        for n in plan.values() {
            *counts.entry(n.as_str()).or_insert(0) += 1;
        }
        let total: Vec<usize> = ["n1", "n2", "n3"]
            .iter()
            .zip([1, 2, 1])
            .map(|(n, base)| base + counts.get(n).copied().unwrap_or(0))
            .collect();
        assert!(
            total.iter().max().unwrap() - total.iter().min().unwrap() <= 1,
            "{total:?}"
        );
    }

    #[test]
    fn adopter_avoids_the_dtl_node_on_a_tie() {
        let live = [node("a", "d", None, 0), node("b", "d", None, 0)];
        let plan = plan_adoptions(&live, &[orphan("v", Some("a"))]);
        assert_eq!(plan["v"], "b");
        // But load wins over the preference.
        let live = [node("a", "d", None, 0), node("b", "d", None, 5)];
        let plan = plan_adoptions(&live, &[orphan("v", Some("a"))]);
        assert_eq!(plan["v"], "a");
    }

    #[test]
    fn no_survivor_no_plan() {
        assert!(plan_adoptions(&[], &[orphan("v", None)]).is_empty());
    }

    #[test]
    fn anyone_may_adopt_after_the_grace() {
        let grace = Duration::from_secs(3);
        assert!(may_adopt("a", Some("a"), Duration::ZERO, grace));
        assert!(!may_adopt("b", Some("a"), Duration::from_secs(1), grace));
        assert!(may_adopt("b", Some("a"), Duration::from_secs(3), grace));
        assert!(!may_adopt("b", None, Duration::from_secs(2), grace));
    }

    #[test]
    fn orphan_with_a_dead_dtl_halts() {
        let live = [node("b", "d", None, 0)];
        assert_eq!(recovery(&orphan("v", Some("b")), &live), Recovery::Adopt);
        match recovery(&orphan("v", Some("gone")), &live) {
            Recovery::Halt(reason) => assert!(reason.contains("gone"), "{reason}"),
            Recovery::Adopt => panic!("adopted without its DTL"),
        }
        assert!(matches!(
            recovery(&orphan("v", None), &live),
            Recovery::Halt(_)
        ));
        let unmirrored = Orphan {
            mirrored: false,
            ..orphan("v", Some("gone"))
        };
        assert_eq!(recovery(&unmirrored, &live), Recovery::Adopt);
    }

    #[test]
    fn after_the_fence_drop_what_moved_and_retake_the_rest() {
        assert_eq!(
            after_fence("a", Some("b")),
            AfterFence::DropMoved("b".into())
        );
        assert_eq!(after_fence("a", Some("a")), AfterFence::Retake);
        assert_eq!(after_fence("a", None), AfterFence::Retake);
    }
}

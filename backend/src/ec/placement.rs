//! Which OSDs hold an object's fragments: computed from the OSD map, never stored per object.
//!
//! Rendezvous (highest-random-weight) hashing, per fragment: fragment `i` of an object scores
//! every OSD by a hash of (object key, `i`, OSD id) and goes to the best-scoring OSD that is
//! writable, holds no other fragment of the object, and keeps its failure domain at most at `x`
//! fragments; fragments are placed in index order. Why rendezvous rather than a stored table or
//! CRUSH: any node computes any object's placement from the OSD map alone (which the registry
//! holds), so 10^8 objects cost the registry nothing; when an OSD joins, a fragment moves only if
//! the newcomer beats its current OSD (about `1 / N` of them, plus rare knock-on moves of later
//! fragments), which is exactly what rebalancing has to move; and it needs no hierarchy
//! description, which CRUSH would for the same domain rule. Why per fragment rather than one
//! ranking per object: with one ranking, fragment `i` is the `i`-th pick, and a newcomer ranked
//! in the middle would shift every later fragment to another OSD. The price is O(N) hashes per
//! fragment, microseconds for hundreds of OSDs.
//!
//! Weights: an OSD's score is `-ln(u) / weight`-style weighted rendezvous (the smallest wins),
//! with its weight proportional to its capacity, so bigger disks get proportionally more.

/// An OSD as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct OsdSlot {
    pub id: u64,
    pub domain: String,
    /// Relative weight (e.g. capacity in GiB); 0 takes nothing new.
    pub weight: f64,
    /// Up and accepting new fragments (not draining, not out, not full).
    pub writable: bool,
}

/// Why no placement was possible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot place {needed} fragments with at most {per_domain} per domain: only {available} OSDs fit")]
pub struct PlacementError {
    pub needed: usize,
    pub per_domain: usize,
    pub available: usize,
}

/// 64-bit mix of `key` and `osd` (FNV-1a then the SplitMix64 finaliser): stable across builds
/// and platforms, which placement must be, since every node must compute the same answer.
fn hash(key: &str, index: usize, osd: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let index = (index as u64).to_le_bytes();
    for b in key
        .as_bytes()
        .iter()
        .chain(&index)
        .chain(&osd.to_le_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Weighted rendezvous score: lower is better.
fn score(key: &str, index: usize, osd: &OsdSlot) -> f64 {
    // A uniform in (0, 1]: never 0, so ln is finite.
    let u = ((hash(key, index, osd.id) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    -u.ln() / osd.weight
}

/// Every OSD in preference order for fragment `index` of `key` (best first), writable or not:
/// a reader whose map changed since the put (an OSD joined, rebalancing not done yet) walks this
/// to find the fragment.
pub fn ranking<'a>(key: &str, index: usize, osds: &'a [OsdSlot]) -> Vec<&'a OsdSlot> {
    let mut ranked: Vec<(&OsdSlot, f64)> = osds
        .iter()
        .filter(|o| o.weight > 0.0)
        .map(|o| (o, score(key, index, o)))
        .collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.id.cmp(&b.0.id)));
    ranked.into_iter().map(|(o, _)| o).collect()
}

/// The OSDs for `count` fragments of `key`: entry `i` holds fragment `i`.
pub fn place(
    key: &str,
    osds: &[OsdSlot],
    count: usize,
    per_domain: usize,
) -> Result<Vec<u64>, PlacementError> {
    let mut chosen: Vec<u64> = Vec::with_capacity(count);
    let mut per: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for index in 0..count {
        let pick = osds
            .iter()
            .filter(|o| o.writable && o.weight > 0.0 && !chosen.contains(&o.id))
            .filter(|o| per.get(o.domain.as_str()).copied().unwrap_or(0) < per_domain)
            .map(|o| (o, score(key, index, o)))
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.id.cmp(&b.0.id)));
        let Some((osd, _)) = pick else {
            return Err(PlacementError {
                needed: count,
                per_domain,
                available: chosen.len(),
            });
        };
        *per.entry(osd.domain.as_str()).or_default() += 1;
        chosen.push(osd.id);
    }
    Ok(chosen)
}

/// Where fragment `index` of `key` goes when the OSD it was sent to failed during the put: the
/// best-ranked writable OSD for the index that is not in `taken` (the OSDs holding, or being
/// sent, the object's other fragments) nor in `failed` (the OSDs that failed during this put),
/// keeping its domain under `per_domain` fragments of `taken` when some OSD can; when none
/// can, the cap is relaxed (a put at lower domain spread beats a failed one, and repair moves
/// the fragment once the map allows), but one OSD never holds two fragments of the object.
/// `None` when no OSD is left.
pub fn reroute(
    key: &str,
    index: usize,
    osds: &[OsdSlot],
    taken: &[u64],
    failed: &std::collections::BTreeSet<u64>,
    per_domain: usize,
) -> Option<u64> {
    let mut per: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for osd in osds.iter().filter(|o| taken.contains(&o.id)) {
        *per.entry(osd.domain.as_str()).or_default() += 1;
    }
    let candidates: Vec<OsdSlot> = osds
        .iter()
        .filter(|o| o.writable && !taken.contains(&o.id) && !failed.contains(&o.id))
        .cloned()
        .collect();
    let ranked = ranking(key, index, &candidates);
    let fits = |o: &&&OsdSlot| per.get(o.domain.as_str()).copied().unwrap_or(0) < per_domain;
    ranked.iter().find(fits).or(ranked.first()).map(|o| o.id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn osds(n: u64, domains: u64) -> Vec<OsdSlot> {
        (0..n)
            .map(|id| OsdSlot {
                id,
                domain: format!("d{}", id % domains),
                weight: 1.0,
                writable: true,
            })
            .collect()
    }

    #[test]
    fn placement_is_deterministic_distinct_and_respects_domains() {
        let map = osds(6, 3);
        for i in 0..200 {
            let key = format!("vol/{i:08}.sco");
            let a = place(&key, &map, 6, 2).unwrap();
            assert_eq!(a, place(&key, &map, 6, 2).unwrap(), "same map, same answer");
            let mut sorted = a.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 6, "distinct OSDs: {a:?}");
            let mut per = HashMap::new();
            for id in &a {
                *per.entry(id % 3).or_insert(0) += 1;
            }
            assert!(per.values().all(|n| *n <= 2), "{a:?}");
        }
        let err = place("x", &map, 6, 1).unwrap_err();
        assert_eq!(err.available, 3);
    }

    #[test]
    fn load_spreads_with_weight() {
        let mut map = osds(8, 8);
        map[0].weight = 2.0;
        let mut counts = HashMap::new();
        for i in 0..20_000 {
            for id in place(&format!("o{i}"), &map, 3, 1).unwrap() {
                *counts.entry(id).or_insert(0u32) += 1;
            }
        }
        let mean_others: f64 = (1..8).map(|id| f64::from(counts[&id])).sum::<f64>() / 7.0;
        for id in 1..8 {
            let c = f64::from(counts[&id]);
            assert!(
                (c / mean_others - 1.0).abs() < 0.1,
                "osd {id}: {c} vs {mean_others}"
            );
        }
        let heavy = f64::from(counts[&0]) / mean_others;
        assert!(heavy > 1.5 && heavy < 2.2, "double weight took {heavy:.2}x");
    }

    /// A new OSD takes only fragments it now wins: about 1/N of them move to it, and few others
    /// move at all (the knock-on of a fragment leaving an OSD that a later fragment preferred).
    #[test]
    fn a_joining_osd_moves_only_its_share() {
        let before = osds(10, 10);
        let mut after = before.clone();
        after.push(OsdSlot {
            id: 10,
            domain: "d10".into(),
            weight: 1.0,
            writable: true,
        });
        let (mut to_new, mut elsewhere, mut total) = (0, 0, 0);
        for i in 0..5000 {
            let key = format!("o{i}");
            let a = place(&key, &before, 5, 1).unwrap();
            let b = place(&key, &after, 5, 1).unwrap();
            for (old, new) in a.iter().zip(&b) {
                total += 1;
                if old != new {
                    if *new == 10 {
                        to_new += 1;
                    } else {
                        elsewhere += 1;
                    }
                }
            }
        }
        let share = f64::from(to_new) / f64::from(total);
        assert!(
            (share - 1.0 / 11.0).abs() < 0.03,
            "{share:.3} of fragments went to the newcomer"
        );
        let churn = f64::from(elsewhere) / f64::from(total);
        assert!(
            churn < 0.05,
            "{churn:.3} of fragments moved between old OSDs"
        );
    }

    #[test]
    fn unwritable_osds_are_skipped_but_still_ranked() {
        let mut map = osds(5, 5);
        map[2].writable = false;
        let placed = place("obj", &map, 4, 1).unwrap();
        assert!(!placed.contains(&2));
        assert_eq!(ranking("obj", 0, &map).len(), 5);
    }

    #[test]
    fn a_failed_fragment_goes_to_the_next_free_osd_within_the_cap_then_beyond() {
        // Nine OSDs, three per domain: six placed leave one free in each domain, and only
        // the failed OSD's own domain has room under the cap.
        let key = "vol/obj";
        let nine = osds(9, 3);
        let placed = place(key, &nine, 6, 2).unwrap();
        let mut failed = std::collections::BTreeSet::new();
        failed.insert(placed[0]);
        let taken: Vec<u64> = placed[1..].to_vec();
        let next = reroute(key, 0, &nine, &taken, &failed, 2).unwrap();
        assert!(!placed.contains(&next), "{next} in {placed:?}");
        assert_eq!(next % 3, placed[0] % 3, "within the cap");
        let map = osds(8, 3); // d0: 0 3 6, d1: 1 4 7, d2: 2 5
                              // Every free OSD failed or taken but one whose domain is full: the cap gives way.
        let mut failed: std::collections::BTreeSet<u64> = (0..8).collect();
        failed.remove(&6);
        let taken = vec![0, 3, 1, 4, 2];
        assert_eq!(reroute(key, 5, &map, &taken, &failed, 2), Some(6));
        // Nothing left: never an OSD that already holds a fragment.
        failed.insert(6);
        assert_eq!(reroute(key, 5, &map, &taken, &failed, 2), None);
        let mut unwritable = map.clone();
        for o in &mut unwritable {
            o.writable = false;
        }
        assert_eq!(
            reroute(key, 5, &unwritable, &[], &Default::default(), 2),
            None
        );
    }
}

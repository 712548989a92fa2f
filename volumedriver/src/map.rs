//! The in-RAM map from cluster address to [`ClusterLocation`].
//!
//! All metadata lives in memory (no page-cache misses on the I/O path), so the map must cost what
//! the volume *uses*, not what it could hold: a 64 TiB thin volume has 2^34 clusters, and a flat
//! array of 8-byte locations would be 128 GiB. The map is a two-level radix tree of 4 KiB pages:
//!
//! * a **leaf** is one 4 KiB page of 512 locations (2 MiB of volume), freed when its count of
//!   written entries drops to zero (after a trim);
//! * a **directory** node holds 512 leaves, each a page pointer and its count (1 GiB of volume);
//! * the root vector holds one slot per GiB of volume size (8 KiB per TiB).
//!
//! A 1 TiB volume with 1 GiB written sequentially therefore costs ~2 MiB of leaves plus a few KiB
//! of directories and root. Unwritten runs are skipped a leaf or a directory at a time, so block
//! status over a large empty volume is cheap.
//!
//! A leaf's page is a plain `Box<[u64; 512]>` (its count lives beside the pointer, not in the
//! page), so a restart from an MDS adopts the pages the MDS client decoded instead of copying
//! them: loading a 10 GiB volume's map is then a scan per page, not an allocation, a page fault
//! and a copy per page (which had been most of the restart's own time).

use crate::types::{ClusterAddress, ClusterLocation};

const LEAF_BITS: u32 = 9;
const LEAF_ENTRIES: usize = 1 << LEAF_BITS;
/// Clusters per leaf: the unit [`ClusterMap::load_leaf`] loads (an MDS page is the same).
pub const LEAF_CLUSTERS: u64 = LEAF_ENTRIES as u64;
const DIR_BITS: u32 = 9;
const DIR_ENTRIES: usize = 1 << DIR_BITS;
const DIR_SPAN: u64 = (LEAF_ENTRIES * DIR_ENTRIES) as u64;

/// A leaf's 512 raw locations (0 = unwritten): the unit [`ClusterMap::load_leaf`] adopts.
pub type LeafPage = Box<[u64; LEAF_ENTRIES]>;

struct Leaf {
    entries: LeafPage,
    written: u16,
}

type Directory = [Option<Leaf>; DIR_ENTRIES];

pub struct ClusterMap {
    root: Vec<Option<Box<Directory>>>,
    clusters: u64,
    leaves: usize,
    directories: usize,
    written: u64,
}

fn split(address: ClusterAddress) -> (usize, usize, usize) {
    (
        (address / DIR_SPAN) as usize,
        ((address >> LEAF_BITS) as usize) & (DIR_ENTRIES - 1),
        (address as usize) & (LEAF_ENTRIES - 1),
    )
}

impl ClusterMap {
    /// An empty map for a volume of `clusters` clusters.
    pub fn new(clusters: u64) -> Self {
        let mut map = Self {
            root: Vec::new(),
            clusters: 0,
            leaves: 0,
            directories: 0,
            written: 0,
        };
        map.grow(clusters);
        map
    }

    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    /// Extend the addressable range (volume resize); existing entries are kept.
    pub fn grow(&mut self, clusters: u64) {
        if clusters > self.clusters {
            self.clusters = clusters;
            self.root
                .resize_with(clusters.div_ceil(DIR_SPAN) as usize, || None);
        }
    }

    pub fn get(&self, address: ClusterAddress) -> ClusterLocation {
        let (d, l, e) = split(address);
        self.root
            .get(d)
            .and_then(|dir| dir.as_ref())
            .and_then(|dir| dir[l].as_ref())
            .map_or(ClusterLocation::UNWRITTEN, |leaf| {
                ClusterLocation::from_raw(leaf.entries[e])
            })
    }

    /// Set the location of a cluster; `UNWRITTEN` clears it. Returns the previous location.
    ///
    /// Panics if `address` is outside the map: callers validate I/O ranges first.
    pub fn set(&mut self, address: ClusterAddress, location: ClusterLocation) -> ClusterLocation {
        assert!(address < self.clusters, "cluster {address} outside the map");
        let (d, l, e) = split(address);
        if location.is_unwritten() {
            let Some(dir) = self.root[d].as_mut() else {
                return ClusterLocation::UNWRITTEN;
            };
            let Some(leaf) = dir[l].as_mut() else {
                return ClusterLocation::UNWRITTEN;
            };
            let old = ClusterLocation::from_raw(leaf.entries[e]);
            if !old.is_unwritten() {
                leaf.entries[e] = 0;
                leaf.written -= 1;
                self.written -= 1;
                if leaf.written == 0 {
                    dir[l] = None;
                    self.leaves -= 1;
                    if dir.iter().all(Option::is_none) {
                        self.root[d] = None;
                        self.directories -= 1;
                    }
                }
            }
            return old;
        }
        let dir = self.root[d].get_or_insert_with(|| {
            self.directories += 1;
            Box::new(std::array::from_fn(|_| None))
        });
        let leaf = dir[l].get_or_insert_with(|| {
            self.leaves += 1;
            Leaf {
                entries: Box::new([0; LEAF_ENTRIES]),
                written: 0,
            }
        });
        let old = ClusterLocation::from_raw(leaf.entries[e]);
        if old.is_unwritten() {
            leaf.written += 1;
            self.written += 1;
        }
        leaf.entries[e] = location.raw();
        old
    }

    /// Replace the leaf of clusters `leaf * LEAF_CLUSTERS ..` with `entries` (raw locations;
    /// unwritten ones are stored as 0): a restart's bulk load, which adopts the page as the
    /// leaf (no copy) instead of a lookup per cluster, and calls `visit` with each written
    /// location in the same pass. The caller has checked that no written entry lies beyond the
    /// map.
    ///
    /// Panics if the leaf starts outside the map.
    pub fn load_leaf(
        &mut self,
        leaf: u64,
        mut entries: LeafPage,
        mut visit: impl FnMut(ClusterLocation),
    ) {
        let start = leaf * LEAF_CLUSTERS;
        assert!(start < self.clusters, "leaf {leaf} outside the map");
        let (d, l, _) = split(start);
        let mut written = 0u16;
        for raw in entries.iter_mut() {
            let location = ClusterLocation::from_raw(*raw);
            if location.is_unwritten() {
                *raw = 0;
            } else {
                written += 1;
                visit(location);
            }
        }
        let loaded = Leaf { entries, written };
        let dir = self.root[d].get_or_insert_with(|| {
            self.directories += 1;
            Box::new(std::array::from_fn(|_| None))
        });
        match dir[l].take() {
            Some(old) => {
                self.written -= u64::from(old.written);
            }
            None => self.leaves += 1,
        }
        self.written += u64::from(loaded.written);
        if loaded.written == 0 {
            self.leaves -= 1;
            if dir.iter().all(Option::is_none) {
                self.root[d] = None;
                self.directories -= 1;
            }
        } else {
            dir[l] = Some(loaded);
        }
    }

    /// Clear `[start, start+count)`, visiting only allocated leaves. Calls `on_cleared` with the
    /// address and old location of every cluster that was written.
    pub fn clear_range(
        &mut self,
        start: ClusterAddress,
        count: u64,
        mut on_cleared: impl FnMut(ClusterAddress, ClusterLocation),
    ) {
        let end = (start + count).min(self.clusters);
        let mut address = start;
        while address < end {
            let (d, l, _) = split(address);
            let leaf_end = ((address >> LEAF_BITS) + 1) << LEAF_BITS;
            let present = self.root[d].as_ref().is_some_and(|dir| dir[l].is_some());
            if present {
                for a in address..leaf_end.min(end) {
                    let old = self.set(a, ClusterLocation::UNWRITTEN);
                    if !old.is_unwritten() {
                        on_cleared(a, old);
                    }
                }
            }
            address = if self.root[d].is_none() {
                (d as u64 + 1) * DIR_SPAN
            } else {
                leaf_end
            };
        }
    }

    /// Length in clusters of the run starting at `start` whose clusters are all written (or all
    /// unwritten, matching the first one), capped at `limit` clusters. Returns (written, length).
    pub fn run_at(&self, start: ClusterAddress, limit: u64) -> (bool, u64) {
        let end = start.saturating_add(limit).min(self.clusters);
        if start >= end {
            return (false, 0);
        }
        let written = !self.get(start).is_unwritten();
        let mut address = start;
        while address < end {
            let (d, l, e) = split(address);
            match self.root[d].as_ref() {
                None if !written => address = (d as u64 + 1) * DIR_SPAN,
                None => break,
                Some(dir) => match dir[l].as_ref() {
                    None if !written => address = ((address >> LEAF_BITS) + 1) << LEAF_BITS,
                    None => break,
                    Some(leaf) => {
                        let same = leaf.entries[e..]
                            .iter()
                            .take_while(|raw| {
                                (ClusterLocation::from_raw(**raw).is_unwritten()) != written
                            })
                            .count();
                        address += same as u64;
                        if e + same < LEAF_ENTRIES {
                            break;
                        }
                    }
                },
            }
        }
        (written, address.min(end) - start)
    }

    /// Visit every written cluster in address order.
    pub fn for_each_written(&self, mut visit: impl FnMut(ClusterAddress, ClusterLocation)) {
        for (d, dir) in self.root.iter().enumerate() {
            let Some(dir) = dir else { continue };
            for (l, leaf) in dir.iter().enumerate() {
                let Some(leaf) = leaf else { continue };
                for (e, raw) in leaf.entries.iter().enumerate() {
                    let location = ClusterLocation::from_raw(*raw);
                    if !location.is_unwritten() {
                        visit(
                            d as u64 * DIR_SPAN + ((l as u64) << LEAF_BITS) + e as u64,
                            location,
                        );
                    }
                }
            }
        }
    }

    /// Number of written clusters.
    pub fn written_clusters(&self) -> u64 {
        self.written
    }

    /// Bytes of RAM the map occupies.
    pub fn memory_bytes(&self) -> u64 {
        (self.root.capacity() * std::mem::size_of::<Option<Box<Directory>>>()
            + self.directories * std::mem::size_of::<Directory>()
            + self.leaves * std::mem::size_of::<[u64; LEAF_ENTRIES]>()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ScoName, ScoNumber};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn loc(n: u32, off: u16) -> ClusterLocation {
        ClusterLocation::new(ScoName::new(ScoNumber(n)), off)
    }

    #[test]
    fn thin_volume_costs_what_it_uses() {
        let clusters = (1u64 << 40) / 4096;
        let mut map = ClusterMap::new(clusters);
        let empty = map.memory_bytes();
        assert!(empty < 16 * 1024, "empty 1 TiB map costs {empty} bytes");
        for a in 0..(1u64 << 30) / 4096 {
            map.set(
                a + 12345 * 512,
                loc(1 + (a / 16384) as u32, (a % 16384) as u16),
            );
        }
        let used = map.memory_bytes();
        assert!(
            used < 2 * 1024 * 1024 + 64 * 1024,
            "1 GiB written costs {used} bytes of map"
        );
        assert_eq!(map.written_clusters(), (1 << 30) / 4096);
        map.clear_range(0, clusters, |_, _| {});
        assert_eq!(map.written_clusters(), 0);
        assert_eq!(map.memory_bytes(), empty);
    }

    #[test]
    fn runs_skip_holes_and_stop_at_changes() {
        let mut map = ClusterMap::new(10 * DIR_SPAN);
        assert_eq!(map.run_at(0, u64::MAX), (false, 10 * DIR_SPAN));
        map.set(3 * DIR_SPAN + 7, loc(1, 0));
        map.set(3 * DIR_SPAN + 8, loc(1, 1));
        assert_eq!(map.run_at(0, u64::MAX), (false, 3 * DIR_SPAN + 7));
        assert_eq!(map.run_at(3 * DIR_SPAN + 7, u64::MAX), (true, 2));
        assert_eq!(map.run_at(3 * DIR_SPAN + 8, 1), (true, 1));
        assert_eq!(
            map.run_at(3 * DIR_SPAN + 9, u64::MAX),
            (false, 7 * DIR_SPAN - 9)
        );
        assert_eq!(map.run_at(10 * DIR_SPAN, 5), (false, 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u32),
        Clear(u64, u64),
        /// Load leaf n with every `step`th cluster written (0: an empty leaf).
        Load(u64, u64),
    }

    proptest! {
        #[test]
        fn map_matches_a_btreemap(ops in proptest::collection::vec(
            prop_oneof![
                (0u64..3000, 0u32..4).prop_map(|(a, n)| Op::Set(a, n)),
                (0u64..3000, 0u64..1500).prop_map(|(a, n)| Op::Clear(a, n)),
                (0u64..5, 0u64..4).prop_map(|(l, step)| Op::Load(l, step)),
            ], 1..200))
        {
            let mut map = ClusterMap::new(3000);
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Set(a, 0) => { map.set(a, ClusterLocation::UNWRITTEN); model.remove(&a); }
                    Op::Set(a, n) => { map.set(a, loc(n, a as u16)); model.insert(a, loc(n, a as u16)); }
                    Op::Clear(a, n) => {
                        let mut cleared = Vec::new();
                        map.clear_range(a, n, |addr, _| cleared.push(addr));
                        let expect: Vec<u64> = model.range(a..a + n).map(|(k, _)| *k).collect();
                        prop_assert_eq!(cleared, expect);
                        model.retain(|k, _| *k < a || *k >= a + n);
                    }
                    Op::Load(leaf, step) => {
                        let base = leaf * LEAF_CLUSTERS;
                        let mut entries: LeafPage = Box::new([0u64; LEAF_ENTRIES]);
                        model.retain(|k, _| *k < base || *k >= base + LEAF_CLUSTERS);
                        for (i, e) in entries.iter_mut().enumerate() {
                            let a = base + i as u64;
                            if step > 0 && (i as u64).is_multiple_of(step) && a < 3000 {
                                *e = loc(7, i as u16).raw();
                                model.insert(a, loc(7, i as u16));
                            } else if i % 5 == 1 {
                                // Unwritten but not zero (SCO 0): loaded as unwritten.
                                *e = 0x0001_0000_0000;
                            }
                        }
                        let mut visited = 0;
                        map.load_leaf(leaf, entries, |_| visited += 1);
                        prop_assert_eq!(visited, model.range(base..base + LEAF_CLUSTERS).count());
                    }
                }
            }
            for a in 0..3000 {
                prop_assert_eq!(map.get(a), model.get(&a).copied().unwrap_or_default());
            }
            let mut start = 0;
            while start < 3000 {
                let (written, len) = map.run_at(start, u64::MAX);
                prop_assert!(len > 0);
                for a in start..start + len {
                    prop_assert_eq!(model.contains_key(&a), written);
                }
                start += len;
            }
            prop_assert_eq!(map.written_clusters(), model.len() as u64);
        }
    }
}

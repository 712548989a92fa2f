//! The node's read cache: bytes of backend SCO objects that reads fetched, kept in RAM so the
//! next read of them is not another backend request (DESIGN's read path: map, write buffer,
//! read cache, then a ranged backend read).
//!
//! Why: on S3 or the erasure-coded tier every read of evicted data, or a clone's read of its
//! template's data, is a network request of milliseconds. Guests reread their hot data (boot
//! files, database pages), and every clone of one template on a node reads the same template
//! clusters; without a cache each of those reads paid the round trip again. On a local backend
//! directory the kernel's page cache does this job already, so the node leaves the cache off
//! there (`read_cache` in the node's configuration; see the README).
//!
//! What is kept: stored bytes (ciphertext on an encrypted volume: nothing decrypted is kept),
//! in blocks of [`BLOCK`] bytes aligned in the object, keyed by namespace, SCO name and block.
//! A read that misses fetches whole blocks (widened to block alignment: an SCO object is a
//! 4 KiB header plus 4 KiB clusters, so its length is a multiple of [`BLOCK`] and a widened
//! range never passes its end), and every block a get returned is kept, including the bytes a
//! coalesced get fetched between the pieces it served (`read_backend.rs`): a free read-ahead.
//! A read is served from the cache only when every block it needs is there.
//!
//! Bounded by bytes (a count of equal blocks). Eviction is `quick_cache`'s, a CLOCK-Pro
//! variant close to S3-FIFO, not a plain LRU: blocks enter on probation and only those read
//! again are kept over new arrivals. Why: one sequential pass over more than the cache (a
//! `volume export`, a backup agent, a guest's `dd` or virus scan) would otherwise push every
//! volume's hot blocks out, and every clone on the node would pay the backend again for its
//! template's boot blocks. Why this crate: scan resistant, bounded per item, a `retain` for the
//! forgets, small and widely used (the `lru` crate, kept for the S3 store's header cache, has
//! no scan resistance).
//!
//! Invariants that make the cache safe without asking the backend:
//! * An SCO name is never written with other content by its owner: SCO numbers only grow (a
//!   rollback keeps counting from where it was), and a scrub's rewrite bumps the SCO version,
//!   which is part of the name. Even so, the SCOs an owner deletes (a scrub's old versions, a
//!   rollback's dropped SCOs) are forgotten ([`ReadCache::forget_scos`]): the version is 8
//!   bits, and a name that came back after 256 scrubs must not find old bytes. The backend
//!   store checks every fetched byte's CRC, so what is kept was good when fetched.
//! * A new owner may rewrite an SCO its fenced predecessor uploaded (replaying the DTL from the
//!   last TLog on the backend). So whenever a node starts serving a volume (create, restart,
//!   adoption, clone) the manager forgets everything kept of its namespace first
//!   ([`ReadCache::forget_namespace`]), and a fetch that started before that forget does not
//!   put its bytes back: every fetch carries the namespace's generation it saw at its miss
//!   ([`Lookup::Miss`]), and [`ReadCache::insert`] drops bytes of an older generation.
//! * Data a clone reads from its ancestors' namespaces belongs to snapshots on the backend,
//!   whose SCOs were all uploaded before the snapshot's TLog: no owner rewrites those.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::types::ScoName;

/// Bytes per cached block: the cluster size, and the SCO header's length.
pub const BLOCK: u64 = 4096;
const _: () = assert!(BLOCK == crate::sco::SCO_HEADER_LEN && BLOCK == crate::config::CLUSTER_SIZE);

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    /// The namespace's generation (see the module docs): unique per namespace and forget.
    generation: u64,
    sco: ScoName,
    block: u64,
}

struct Inner {
    blocks: quick_cache::unsync::Cache<Key, Arc<[u8]>>,
    /// The current generation of each namespace with blocks kept (or a miss since its forget).
    generations: HashMap<String, u64>,
    next_generation: u64,
}

/// What [`ReadCache::read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Every byte was in the cache and is now in the caller's buffer.
    Hit,
    /// Something was missing: fetch, then [`ReadCache::insert`] with this generation.
    Miss(u64),
}

/// Counters of a [`ReadCache`], for the node's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadCacheStats {
    pub capacity_bytes: u64,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
}

/// See the module docs. Shared by every volume of a node.
pub struct ReadCache {
    inner: Mutex<Inner>,
    capacity: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCache")
            .field("stats", &self.stats())
            .finish()
    }
}

impl ReadCache {
    /// A cache of at most `capacity` bytes; `None` for less than one block.
    pub fn new(capacity: u64) -> Option<Self> {
        let blocks = NonZeroUsize::new(usize::try_from(capacity / BLOCK).ok()?)?;
        Some(Self {
            inner: Mutex::new(Inner {
                blocks: quick_cache::unsync::Cache::new(blocks.get()),
                generations: HashMap::new(),
                next_generation: 0,
            }),
            capacity: blocks.get() as u64 * BLOCK,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// The block-aligned range a fetch of `len` bytes at `offset` should get, so that
    /// [`insert`](Self::insert) can keep all of it.
    pub fn widen(offset: u64, len: u64) -> (u64, u64) {
        let lo = offset - offset % BLOCK;
        (lo, (offset + len).div_ceil(BLOCK) * BLOCK)
    }

    /// Copy `out.len()` bytes at `offset` of SCO `sco` in `namespace` into `out` if every
    /// block of them is kept ([`Lookup::Hit`]; they count as used again).
    pub fn read(&self, namespace: &str, sco: &ScoName, offset: u64, out: &mut [u8]) -> Lookup {
        let found = {
            let mut inner = self.inner.lock();
            let generation = inner.generation(namespace);
            let mut found = Vec::new();
            for block in Self::blocks(offset, out.len() as u64) {
                let key = Key {
                    generation,
                    sco: *sco,
                    block,
                };
                match inner.blocks.get(&key) {
                    Some(data) => found.push(data.clone()),
                    None => {
                        self.misses.fetch_add(1, Ordering::Relaxed);
                        return Lookup::Miss(generation);
                    }
                }
            }
            found
        };
        // Copied without the lock: the blocks are immutable and shared.
        let mut at = offset;
        let mut written = 0;
        for data in found {
            let within = (at % BLOCK) as usize;
            let n = (data.len() - within).min(out.len() - written);
            out[written..written + n].copy_from_slice(&data[within..within + n]);
            written += n;
            at += n as u64;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Lookup::Hit
    }

    /// Keep the whole blocks of `data` (bytes at `offset` of SCO `sco` in `namespace`) fetched
    /// after a miss of `generation`; dropped if the namespace was forgotten since.
    pub fn insert(
        &self,
        generation: u64,
        namespace: &str,
        sco: &ScoName,
        offset: u64,
        data: &[u8],
    ) {
        let first = offset.div_ceil(BLOCK);
        let end = (offset + data.len() as u64) / BLOCK;
        let blocks: Vec<(u64, Arc<[u8]>)> = (first..end)
            .map(|block| {
                let at = (block * BLOCK - offset) as usize;
                (block, Arc::from(&data[at..at + BLOCK as usize]))
            })
            .collect();
        let mut inner = self.inner.lock();
        if inner.generations.get(namespace) != Some(&generation) {
            return;
        }
        for (block, data) in blocks {
            let key = Key {
                generation,
                sco: *sco,
                block,
            };
            inner.blocks.insert(key, data);
        }
    }

    /// Forget every block of `namespace`, and make fetches that missed before this call keep
    /// nothing (see the module docs).
    pub fn forget_namespace(&self, namespace: &str) {
        let mut inner = self.inner.lock();
        if let Some(generation) = inner.generations.remove(namespace) {
            inner.drop_blocks(|key| key.generation == generation);
        }
    }

    /// Forget every block of the SCOs `scos` of `namespace` (objects its owner deleted: a
    /// scrub's old versions, a rollback's dropped SCOs), so a name that ever came back could
    /// not be answered from memory.
    pub fn forget_scos(&self, namespace: &str, scos: &[ScoName]) {
        if scos.is_empty() {
            return;
        }
        let mut inner = self.inner.lock();
        if let Some(&generation) = inner.generations.get(namespace) {
            let gone: std::collections::HashSet<&ScoName> = scos.iter().collect();
            inner.drop_blocks(|key| key.generation == generation && gone.contains(&key.sco));
        }
    }

    pub fn stats(&self) -> ReadCacheStats {
        ReadCacheStats {
            capacity_bytes: self.capacity,
            bytes: self.inner.lock().blocks.len() as u64 * BLOCK,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    fn blocks(offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / BLOCK..(offset + len).div_ceil(BLOCK)
    }
}

impl Inner {
    /// Drop every block whose key `stale` picks (a walk over the whole cache).
    fn drop_blocks(&mut self, stale: impl Fn(&Key) -> bool) {
        self.blocks.retain(|key, _| !stale(key));
    }

    fn generation(&mut self, namespace: &str) -> u64 {
        if let Some(generation) = self.generations.get(namespace) {
            return *generation;
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        self.generations.insert(namespace.to_string(), generation);
        generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ScoNumber;

    fn sco(n: u32) -> ScoName {
        ScoName::new(ScoNumber(n))
    }

    /// An object whose byte `i` is `(i * 7 + seed) % 251`, so every block differs.
    fn object(seed: u64, len: u64) -> Vec<u8> {
        (0..len).map(|i| ((i * 7 + seed) % 251) as u8).collect()
    }

    fn fetch(cache: &ReadCache, ns: &str, name: &ScoName, obj: &[u8], offset: u64, len: usize) {
        let mut out = vec![0u8; len];
        let Lookup::Miss(generation) = cache.read(ns, name, offset, &mut out) else {
            panic!("expected a miss at {offset}+{len}");
        };
        let (lo, hi) = ReadCache::widen(offset, len as u64);
        cache.insert(generation, ns, name, lo, &obj[lo as usize..hi as usize]);
    }

    #[test]
    fn a_read_fetched_once_is_served_from_memory_at_any_offset_inside() {
        let cache = ReadCache::new(1 << 20).unwrap();
        let obj = object(3, 64 * BLOCK);
        // A misaligned read widens to whole blocks, which are all kept.
        fetch(&cache, "a", &sco(1), &obj, 5 * BLOCK + 100, 3 * 4096);
        for (offset, len) in [
            (5 * BLOCK, 4 * BLOCK as usize),
            (5 * BLOCK + 100, 3 * 4096),
            (6 * BLOCK + 17, 512),
            (8 * BLOCK + 4095, 1),
        ] {
            let mut out = vec![0u8; len];
            assert_eq!(cache.read("a", &sco(1), offset, &mut out), Lookup::Hit);
            assert_eq!(out, obj[offset as usize..offset as usize + len]);
        }
        // Beyond what was fetched, another SCO, another namespace: misses.
        let mut out = vec![0u8; 4096];
        assert!(matches!(
            cache.read("a", &sco(1), 9 * BLOCK, &mut out),
            Lookup::Miss(_)
        ));
        assert!(matches!(
            cache.read("a", &sco(2), 5 * BLOCK, &mut out),
            Lookup::Miss(_)
        ));
        assert!(matches!(
            cache.read("b", &sco(1), 5 * BLOCK, &mut out),
            Lookup::Miss(_)
        ));
        // A read that is only partly kept misses as a whole.
        let mut out = vec![0u8; 2 * 4096];
        assert!(matches!(
            cache.read("a", &sco(1), 8 * BLOCK, &mut out),
            Lookup::Miss(_)
        ));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.bytes), (4, 5, 4 * BLOCK));
    }

    #[test]
    fn partial_blocks_of_an_insert_are_not_kept() {
        let cache = ReadCache::new(1 << 20).unwrap();
        let obj = object(1, 8 * BLOCK);
        let mut out = vec![0u8; 4096];
        let Lookup::Miss(generation) = cache.read("a", &sco(1), BLOCK, &mut out) else {
            panic!()
        };
        // Bytes 100..3*BLOCK+100: only blocks 1 and 2 are whole.
        cache.insert(
            generation,
            "a",
            &sco(1),
            100,
            &obj[100..3 * BLOCK as usize + 100],
        );
        assert_eq!(cache.stats().bytes, 2 * BLOCK);
        assert_eq!(cache.read("a", &sco(1), BLOCK, &mut out), Lookup::Hit);
        assert_eq!(out, obj[BLOCK as usize..2 * BLOCK as usize]);
        assert!(matches!(
            cache.read("a", &sco(1), 0, &mut out),
            Lookup::Miss(_)
        ));
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let cache = ReadCache::new(64 * BLOCK + 100).unwrap();
        assert_eq!(cache.stats().capacity_bytes, 64 * BLOCK);
        for n in 0..8 {
            let obj = object(n.into(), 32 * BLOCK);
            fetch(&cache, "a", &sco(n), &obj, 0, 32 * 4096);
            assert!(cache.stats().bytes <= 64 * BLOCK, "after SCO {n}");
        }
        // What is kept reads back right.
        let mut hits = 0;
        for n in 0..8 {
            let obj = object(n.into(), 32 * BLOCK);
            for block in 0..32 {
                let mut out = vec![0u8; 4096];
                if cache.read("a", &sco(n), block * BLOCK, &mut out) == Lookup::Hit {
                    assert_eq!(out, obj[(block * BLOCK) as usize..][..4096]);
                    hits += 1;
                }
            }
        }
        assert!(hits > 0 && hits <= 64, "{hits} blocks kept");
        assert!(ReadCache::new(BLOCK - 1).is_none());
    }

    /// Blocks read again survive a pass over four times the cache's size that reads every
    /// block once; a plain LRU would have lost every one of them.
    #[test]
    fn a_scan_does_not_push_out_what_is_read_again() {
        let cache = ReadCache::new(256 * BLOCK).unwrap();
        let hot = object(1, 64 * BLOCK);
        let mut out = vec![0u8; 4096];
        for _ in 0..3 {
            for block in 0..64 {
                if cache.read("a", &sco(1), block * BLOCK, &mut out) != Lookup::Hit {
                    fetch(&cache, "a", &sco(1), &hot, block * BLOCK, 4096);
                }
            }
        }
        let scan = object(2, 1024 * BLOCK);
        for block in 0..1024 {
            fetch(&cache, "b", &sco(2), &scan, block * BLOCK, 4096);
        }
        assert!(cache.stats().bytes <= 256 * BLOCK);
        let kept = (0..64)
            .filter(|block| {
                let hit = cache.read("a", &sco(1), block * BLOCK, &mut out) == Lookup::Hit;
                if hit {
                    assert_eq!(out, hot[(block * BLOCK) as usize..][..4096]);
                }
                hit
            })
            .count();
        assert!(kept >= 60, "only {kept} of 64 hot blocks survived the scan");
    }

    #[test]
    fn a_forgotten_namespace_is_read_afresh_and_late_fetches_keep_nothing() {
        let cache = ReadCache::new(1 << 20).unwrap();
        let old = object(1, 4 * BLOCK);
        let new = object(2, 4 * BLOCK);
        fetch(&cache, "a", &sco(1), &old, 0, 4096);
        fetch(&cache, "b", &sco(1), &old, 0, 4096);
        // A fetch of "a" misses, then the namespace is forgotten (a new owner serves it) before
        // the fetch returns: its bytes must not come back.
        let mut out = vec![0u8; 4096];
        let Lookup::Miss(late) = cache.read("a", &sco(1), BLOCK, &mut out) else {
            panic!()
        };
        cache.forget_namespace("a");
        cache.insert(
            late,
            "a",
            &sco(1),
            BLOCK,
            &old[BLOCK as usize..2 * BLOCK as usize],
        );
        assert_eq!(cache.stats().bytes, BLOCK, "only b's block is left");
        for block in [0, 1] {
            assert!(matches!(
                cache.read("a", &sco(1), block * BLOCK, &mut out),
                Lookup::Miss(_)
            ));
        }
        // Read afresh: the new content.
        fetch(&cache, "a", &sco(1), &new, 0, 4096);
        assert_eq!(cache.read("a", &sco(1), 0, &mut out), Lookup::Hit);
        assert_eq!(out, new[..4096]);
        assert_eq!(cache.read("b", &sco(1), 0, &mut out), Lookup::Hit);
        assert_eq!(out, old[..4096]);
        cache.forget_namespace("never-seen");
    }

    #[test]
    fn deleted_scos_are_forgotten_and_the_others_kept() {
        let cache = ReadCache::new(1 << 20).unwrap();
        let obj = object(4, 4 * BLOCK);
        for n in 1..=3 {
            fetch(&cache, "a", &sco(n), &obj, 0, 2 * 4096);
        }
        fetch(&cache, "b", &sco(2), &obj, 0, 4096);
        cache.forget_scos("a", &[sco(2), sco(3), sco(9)]);
        cache.forget_scos("never-seen", &[sco(1)]);
        let mut out = vec![0u8; 4096];
        let hit = |ns: &str, n: u32, out: &mut [u8]| cache.read(ns, &sco(n), 0, out) == Lookup::Hit;
        assert!(hit("a", 1, &mut out));
        assert!(!hit("a", 2, &mut out));
        assert!(!hit("a", 3, &mut out));
        assert!(
            hit("b", 2, &mut out),
            "another namespace's SCO of the same name stays"
        );
        assert_eq!(cache.stats().bytes, 3 * BLOCK);
    }
}

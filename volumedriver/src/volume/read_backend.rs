//! The backend pieces of one read: which ranged gets fetch them ([`coalesce`], pure), and
//! fetching those gets at once ([`Volume::fetch_backend_pieces`]).
//!
//! A read whose plan has several backend pieces (clusters of evicted or ancestor SCOs that are
//! not adjacent in the volume) gets them with up to [`BACKEND_READS_IN_FLIGHT`] ranged gets at
//! a time. Why: each get is a network round trip on S3 or the EC tier, and one at a time a
//! 1 MiB read of scattered clusters (data a scrub rewrote, or a clone's reads of its template)
//! paid up to 256 of them in a row. Measured: the EC scrub test (`tests/snapshots.rs`, whose
//! checks read 48 MiB of scrubbed data back through NBD) went from 7.6 s to 5.0–5.7 s. Scoped
//! threads rather than a pool: such reads are rare next to local ones and each piece is a
//! network round trip, which dwarfs a thread's start.
//!
//! Pieces that sit in the same SCO object at most the store's `read_gap` apart (128 KiB on S3
//! and the EC tier, 0 on a local directory: adjacent only) are fetched by one ranged get of up
//! to [`SPAN_MAX`] bytes (the bytes between are read and dropped). Why: volume neighbours end
//! up scattered over a few SCOs (a scrub keeps each old SCO's live clusters together; random
//! writes fill SCOs in arrival order), so one read's pieces are often near each other inside
//! those SCOs. On S3 a get costs a round trip of milliseconds and 128 KiB more payload about
//! one; one get per 4 KiB cluster is the worst trade there is, while on a local file a request
//! costs little more than its bytes. Measured on moto (which copies the whole object for every
//! ranged get): the S3 scrub test (`tests/snapshots.rs`, 48 MiB of scrubbed data read back
//! five times) went from 161–204 s to 46–67 s, and the EC one from 5.0–5.7 s to 4.7–5.3 s. The
//! cost: a get reads up to 32 times the bytes asked for (4 KiB pieces 128 KiB apart), at most
//! 1 MiB.
//!
//! Encrypted volumes decrypt whole clusters, so a piece that starts or ends inside a cluster
//! is fetched as the whole clusters it touches (a piece never spans two SCOs).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Result, VolumeError};
use crate::read_cache::{Lookup, ReadCache};
use crate::types::ScoName;

use super::read::{Segment, Source};
use super::Volume;

/// How many ranged gets of one read are in flight at once (see the module docs).
pub(super) const BACKEND_READS_IN_FLIGHT: usize = 8;

/// One get fetches at most this many bytes, so a read's memory stays bounded; a single piece
/// longer than this is fetched by itself, as it is.
pub(super) const SPAN_MAX: u64 = 1 << 20;

/// The stored bytes one piece needs: its object (any key that tells objects apart) and the
/// byte range `lo..hi` in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Need<K> {
    pub(super) object: K,
    pub(super) lo: u64,
    pub(super) hi: u64,
}

/// Group pieces into gets: each group is the indices of pieces in one object whose ranges,
/// sorted, are each at most `gap` after the group's end so far, and which span at most `max`
/// bytes in all. Every index is in exactly one group; groups come in object, then offset,
/// order.
pub(super) fn coalesce<K: Ord + Copy>(needs: &[Need<K>], gap: u64, max: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..needs.len()).collect();
    order.sort_by_key(|&i| (needs[i].object, needs[i].lo));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut current: Option<(K, u64, u64)> = None; // object, lo, hi of the last group
    for i in order {
        let need = needs[i];
        let joins = current.is_some_and(|(object, lo, hi)| {
            object == need.object
                && need.lo <= hi.saturating_add(gap)
                && need.hi.max(hi) - lo <= max
        });
        match (joins, current.as_mut(), groups.last_mut()) {
            (true, Some((_, _, hi)), Some(group)) => {
                *hi = (*hi).max(need.hi);
                group.push(i);
            }
            _ => {
                current = Some((need.object, need.lo, need.hi));
                groups.push(vec![i]);
            }
        }
    }
    groups
}

/// One backend piece of a read: its plan segment, its part of the caller's buffer, the stored
/// range it needs, and how far into that range its bytes start.
struct Piece<'p, 'b> {
    segment: &'p Segment,
    out: &'b mut [u8],
    need: Need<(&'p str, ScoName)>,
    within: u64,
}

/// One ranged get of a read: `lo..hi` of one object, and the pieces it serves.
struct Get<'p, 'b> {
    object: (&'p str, ScoName),
    lo: u64,
    hi: u64,
    pieces: Vec<Piece<'p, 'b>>,
}

impl Volume {
    /// The stored range a backend piece needs (whole clusters where it must be decrypted and
    /// does not cover whole clusters), and how far into that range its bytes start; `None`
    /// for a piece that is not on the backend.
    fn stored_need<'s>(&self, segment: &'s Segment) -> Option<(Need<(&'s str, ScoName)>, u64)> {
        let Source::Backend {
            namespace,
            sco,
            offset,
        } = &segment.source
        else {
            return None;
        };
        let (within, extent) = self.stored_extent(segment.at, segment.len as u64);
        let lo = offset - within;
        let need = Need {
            object: (&**namespace, *sco),
            lo,
            hi: lo + extent,
        };
        Some((need, within))
    }

    /// Fetch `pieces` (the backend pieces of one read, each with its part of the caller's
    /// buffer): nearby pieces of one object by one get ([`coalesce`]), the gets up to
    /// [`BACKEND_READS_IN_FLIGHT`] at a time. The first failure fails the read, and the gets
    /// not started then are not made.
    pub(super) fn fetch_backend_pieces(&self, pieces: Vec<(&Segment, &mut [u8])>) -> Result<()> {
        let mut backend = Vec::with_capacity(pieces.len());
        for (segment, out) in pieces {
            match self.stored_need(segment) {
                Some((need, within)) => backend.push(Some(Piece {
                    segment,
                    out,
                    need,
                    within,
                })),
                // Not on the backend after all: read where it is.
                None => self.execute_segment(segment, out)?,
            }
        }
        let needs: Vec<_> = backend.iter().flatten().map(|p| p.need).collect();
        let gets: Vec<Get> = coalesce(&needs, self.backend.read_gap(), SPAN_MAX)
            .into_iter()
            .filter_map(|group| {
                let pieces: Vec<Piece> = group.iter().filter_map(|&i| backend[i].take()).collect();
                Some(Get {
                    object: pieces.first()?.need.object,
                    lo: pieces.iter().map(|p| p.need.lo).min()?,
                    hi: pieces.iter().map(|p| p.need.hi).max()?,
                    pieces,
                })
            })
            .collect();
        let count = gets.len();
        let queue = Mutex::new(gets.into_iter());
        let failed: Mutex<Option<VolumeError>> = Mutex::new(None);
        let work = || loop {
            if failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
            {
                return;
            }
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some(get) = next else { return };
            if let Err(e) = self.fetch_get(get) {
                failed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(e);
                return;
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..count.min(BACKEND_READS_IN_FLIGHT) {
                // A thread that cannot be started (the process is at its limit) leaves its share
                // to the others and this one: slower, never a failed read.
                if std::thread::Builder::new()
                    .name("vstor-read".into())
                    .spawn_scoped(scope, work)
                    .is_err()
                {
                    break;
                }
            }
            work();
        });
        match failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One get: a single piece straight into its buffer, several through one buffer of the
    /// span, each then decrypted and copied to its place.
    fn fetch_get(&self, mut get: Get) -> Result<()> {
        if get.pieces.len() == 1 {
            if let Some(piece) = get.pieces.pop() {
                return self.execute_segment(piece.segment, piece.out);
            }
        }
        let mut span = vec![0u8; (get.hi - get.lo) as usize];
        self.get_stored(get.object.0, &get.object.1, get.lo, &mut span)?;
        // The span is only read from: pieces whose stored ranges overlap (none should) would
        // each still decrypt their own copy.
        for piece in get.pieces {
            let stored =
                &span[(piece.need.lo - get.lo) as usize..(piece.need.hi - get.lo) as usize];
            let first = piece.segment.at / self.cluster_size;
            if stored.len() == piece.out.len() {
                piece.out.copy_from_slice(stored);
                self.open_clusters(first, piece.out)?;
            } else {
                self.open_into(first, piece.within, &mut stored.to_vec(), piece.out)?;
            }
        }
        Ok(())
    }

    /// One ranged get of stored bytes (ciphertext for an encrypted volume) of SCO `sco` in
    /// `namespace` at `offset`, counted in the volume's backend reads. Data the backend cannot
    /// give back (an EC object with fewer than k fragments reachable) halts the volume rather
    /// than let the guest carry on around a hole; never called with the state lock held
    /// (`read_cluster_locked` does not read the backend).
    ///
    /// With the node's read cache (`read_cache.rs`), bytes kept there answer without a get; a
    /// miss fetches the range widened to whole cache blocks and keeps them.
    pub(super) fn get_stored(
        &self,
        namespace: &str,
        sco: &ScoName,
        offset: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let Some(cache) = self.read_cache.get() else {
            return self.get_range(namespace, sco, offset, out);
        };
        let generation = match cache.read(namespace, sco, offset, out) {
            Lookup::Hit => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Lookup::Miss(generation) => generation,
        };
        let (lo, hi) = ReadCache::widen(offset, out.len() as u64);
        if (lo, hi) == (offset, offset + out.len() as u64) {
            self.get_range(namespace, sco, offset, out)?;
            cache.insert(generation, namespace, sco, offset, out);
        } else {
            let mut whole = vec![0u8; (hi - lo) as usize];
            self.get_range(namespace, sco, lo, &mut whole)?;
            let within = (offset - lo) as usize;
            out.copy_from_slice(&whole[within..within + out.len()]);
            cache.insert(generation, namespace, sco, lo, &whole);
        }
        Ok(())
    }

    /// One ranged get from the backend (see [`get_stored`](Self::get_stored)).
    fn get_range(&self, namespace: &str, sco: &ScoName, offset: u64, out: &mut [u8]) -> Result<()> {
        self.stats.backend_reads.fetch_add(1, Ordering::Relaxed);
        match self
            .backend
            .get_range(namespace, &sco.to_string(), offset, out)
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_unreadable() => self.halt_with(VolumeError::backend(&self.name)(e)),
            Err(e) => Err(VolumeError::backend(&self.name)(e)),
        }
    }

    /// Make the read cache forget SCOs of this volume's `namespace` that it deleted from the
    /// backend (see `read_cache`).
    pub(super) fn forget_cached_scos(&self, namespace: &str, scos: &[ScoName]) {
        if let Some(cache) = self.read_cache.get() {
            cache.forget_scos(namespace, scos);
        }
    }

    /// Read through the node's read cache from now on, forgetting first whatever it kept of
    /// this volume's namespace (a previous owner may have written its SCOs differently: see
    /// `read_cache`). Once per instance; the manager calls it when it starts serving the volume.
    pub fn attach_read_cache(&self, cache: Arc<ReadCache>) {
        let namespace = self.state.lock().config.namespace.clone();
        cache.forget_namespace(&namespace);
        let _ = self.read_cache.set(cache);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(object: u8, lo: u64, hi: u64) -> Need<u8> {
        Need { object, lo, hi }
    }

    #[test]
    fn nearby_pieces_of_one_object_share_a_get_and_others_do_not() {
        const K: u64 = 1024;
        let needs = [
            need(1, 40 * K, 44 * K),   // 0
            need(2, 0, 4 * K),         // 1: another object
            need(1, 0, 4 * K),         // 2
            need(1, 8 * K, 12 * K),    // 3: 4 KiB after 2
            need(1, 300 * K, 304 * K), // 4: more than the gap after 0
            need(2, 4 * K, 8 * K),     // 5: adjacent to 1
        ];
        let groups = coalesce(&needs, 128 * K, 1024 * K);
        assert_eq!(groups, vec![vec![2, 3, 0], vec![4], vec![1, 5]]);
        // Every piece is fetched once.
        let mut all: Vec<usize> = groups.concat();
        all.sort_unstable();
        assert_eq!(all, (0..needs.len()).collect::<Vec<_>>());
    }

    #[test]
    fn a_get_never_spans_more_than_the_maximum_and_a_long_piece_goes_alone() {
        const K: u64 = 1024;
        // Pieces every 64 KiB: within the gap, so only the span bound splits them.
        let needs: Vec<Need<u8>> = (0..32)
            .map(|i| need(7, i * 64 * K, i * 64 * K + 4 * K))
            .collect();
        let groups = coalesce(&needs, 128 * K, 1024 * K);
        for group in &groups {
            let lo = group.iter().map(|&i| needs[i].lo).min().unwrap();
            let hi = group.iter().map(|&i| needs[i].hi).max().unwrap();
            assert!(hi - lo <= 1024 * K, "{group:?} spans {}", hi - lo);
        }
        assert_eq!(groups.len(), 2, "{groups:?}");
        // A piece longer than the maximum, and a small one right after it.
        let needs = [need(1, 0, 4096 * K), need(1, 4096 * K, 4100 * K)];
        assert_eq!(coalesce(&needs, 128 * K, 1024 * K), vec![vec![0], vec![1]]);
        // Overlapping ranges (whole clusters rounded out) join; nothing is lost.
        let needs = [need(1, 0, 8 * K), need(1, 4 * K, 12 * K)];
        assert_eq!(coalesce(&needs, 0, 1024 * K), vec![vec![0, 1]]);
        assert!(coalesce::<u8>(&[], 128 * K, 1024 * K).is_empty());
    }
}

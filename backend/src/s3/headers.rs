//! The S3 store's cache of object headers, so that a ranged read is one GET, not two.
//!
//! A ranged read needs the object's header and CRC table ([`super::format`]): where the payload
//! starts, and the checksums of the chunks the span touches. Read afresh every time, that is a
//! GET of its own before the span's GET: two round trips for every read of evicted data, and
//! reads of evicted data are where a volume on S3 waits for the network. Objects are read many
//! times and rarely change, so the header read once is kept here, with the ETag of the object it
//! came from.
//!
//! **Why a cached header cannot serve stale bytes.** The span's GET carries `If-Match` with the
//! cached ETag. An object written again since (a new owner rewriting a name a fenced owner had
//! uploaded, with other bytes and perhaps another length) or deleted answers 412 or 404; the
//! reader then forgets the entry and reads the header afresh, as it did before the cache. A span
//! that did come back is therefore from the very object the header describes, so the chunk CRCs
//! verify it exactly as with a fresh header. The one decision taken from the header alone, "this
//! range is beyond the object's end", is checked against a fresh header before it becomes an
//! error (the object may have grown).
//!
//! **Bound.** Entries are counted in bytes (key, ETag, table and a fixed overhead) and the least
//! recently used go first once [`DEFAULT_CAPACITY`] is passed: 8 MiB holds the headers of about
//! 2,000 SCOs of the default 64 MiB (a 4 KiB CRC table each; 120 GiB of data), so a node's
//! working set of evicted data fits while the memory stays small next to the volumes' maps. The store forgets the names it writes or
//! deletes itself (a deleted namespace's objects too: they are deleted by name); entries of
//! objects other nodes rewrite or delete are found out by `If-Match`, and then forgotten.
//!
//! The lock is held for one map operation, never across a request.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lru::LruCache;

use super::format::Header;

/// The cache's size in bytes when the store opens.
pub(super) const DEFAULT_CAPACITY: usize = 8 * 1024 * 1024;

/// What an entry costs beyond its key, ETag and table: the map's node, the `Arc`s, the header's
/// fixed fields.
const ENTRY_OVERHEAD: usize = 128;

/// A header read from S3 and the ETag of the object it was read from.
#[derive(Debug, Clone)]
pub(super) struct Cached {
    pub header: Arc<Header>,
    pub etag: Arc<str>,
}

impl Cached {
    fn cost(&self, key: &str) -> usize {
        key.len() + self.etag.len() + 4 * self.header.chunk_crcs.len() + ENTRY_OVERHEAD
    }
}

struct Inner {
    map: LruCache<String, Cached>,
    bytes: usize,
}

/// A byte-bounded LRU map from object key to [`Cached`] (unbounded in entries: the bytes are the
/// bound).
pub(super) struct HeaderCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl HeaderCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entry of `key`, marked as the most recently used.
    pub(super) fn get(&self, key: &str) -> Option<Cached> {
        self.lock().map.get(key).cloned()
    }

    /// Keep `header` (read from the object whose ETag is `etag`) for `key`, replacing what was
    /// there, and return it as an entry. An entry larger than the whole cache is not kept.
    pub(super) fn insert(&self, key: &str, header: Header, etag: String) -> Cached {
        let cached = Cached {
            header: Arc::new(header),
            etag: Arc::from(etag),
        };
        let cost = cached.cost(key);
        let mut inner = self.lock();
        if let Some(old) = inner.map.pop(key) {
            inner.bytes -= old.cost(key);
        }
        if cost <= self.capacity {
            inner.bytes += cost;
            inner.map.put(key.to_owned(), cached.clone());
            while inner.bytes > self.capacity {
                let Some((old_key, old)) = inner.map.pop_lru() else {
                    break;
                };
                inner.bytes -= old.cost(&old_key);
            }
        }
        cached
    }

    /// Forget `key` (written, deleted, or found changed).
    pub(super) fn forget(&self, key: &str) {
        let mut inner = self.lock();
        if let Some(old) = inner.map.pop(key) {
            inner.bytes -= old.cost(key);
        }
    }

    /// Entries held and the bytes they count for.
    #[cfg(test)]
    pub(super) fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.map.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(chunks: usize) -> Header {
        Header {
            payload_len: chunks as u64 * 65536,
            chunk_size: 65536,
            owner: 1,
            chunk_crcs: vec![7; chunks],
        }
    }

    fn cost(key: &str, etag: &str, chunks: usize) -> usize {
        key.len() + etag.len() + 4 * chunks + ENTRY_OVERHEAD
    }

    #[test]
    fn entries_are_found_replaced_and_forgotten_with_their_bytes() {
        let cache = HeaderCache::new(1 << 20);
        assert!(cache.get("ns/a").is_none());
        cache.insert("ns/a", header(64), "\"e1\"".into());
        let got = cache.get("ns/a").expect("cached");
        assert_eq!((&*got.etag, got.header.chunk_crcs.len()), ("\"e1\"", 64));
        assert_eq!(cache.usage(), (1, cost("ns/a", "\"e1\"", 64)));
        // A rewrite replaces the entry and its cost.
        cache.insert("ns/a", header(2), "\"e22\"".into());
        assert_eq!(&*cache.get("ns/a").unwrap().etag, "\"e22\"");
        assert_eq!(cache.usage(), (1, cost("ns/a", "\"e22\"", 2)));
        cache.insert("ns/b", header(1), "\"e3\"".into());
        cache.forget("ns/a");
        assert!(cache.get("ns/a").is_none());
        cache.forget("ns/missing");
        assert!(cache.get("ns/b").is_some());
        assert_eq!(cache.usage(), (1, cost("ns/b", "\"e3\"", 1)));
    }

    #[test]
    fn the_least_recently_used_go_once_the_bytes_are_spent() {
        let one = cost("k0", "e", 10);
        let cache = HeaderCache::new(3 * one);
        for k in 0..3 {
            cache.insert(&format!("k{k}"), header(10), "e".into());
        }
        assert_eq!(cache.usage(), (3, 3 * one));
        // k0 is used, so k1 is the oldest when k3 arrives.
        assert!(cache.get("k0").is_some());
        cache.insert("k3", header(10), "e".into());
        assert_eq!(cache.usage(), (3, 3 * one));
        assert!(cache.get("k1").is_none());
        for k in ["k0", "k2", "k3"] {
            assert!(cache.get(k).is_some(), "{k}");
        }
        // One large entry pushes out as many as it needs.
        cache.insert("big", header(20), "e".into());
        assert!(cache.usage().1 <= 3 * one);
        assert!(cache.get("big").is_some());
        // An entry larger than the cache is returned but not kept.
        let huge = cache.insert("huge", header(10_000), "e".into());
        assert_eq!(huge.header.chunk_crcs.len(), 10_000);
        assert!(cache.get("huge").is_none());
        assert!(cache.get("big").is_some());
    }
}

//! Backend latency for `/metrics`: an [`ObjectStore`] that times every call of the store it
//! wraps, per kind of request, into the same fixed-bucket histograms as volume I/O
//! (`vstor_volumedriver::latency`), and counts failures. It only measures: every call goes to
//! the inner store unchanged (streaming `put_from`/`put_file` included), so wrapping cannot
//! change what reaches the backend.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vstor_backend::{ObjectStore, OwnerTag, Result};
use vstor_volumedriver::latency::{LatencyHistogram, LatencySnapshot};

/// The kinds of backend request measured.
pub const KINDS: [&str; 6] = ["put", "get", "get_range", "delete", "list", "meta"];

/// Histograms and error counts per kind (indexes of [`KINDS`]).
#[derive(Debug, Default)]
pub struct BackendTiming {
    latency: [LatencyHistogram; 6],
    errors: [AtomicU64; 6],
}

impl BackendTiming {
    /// `(kind, latency, errors)` for every kind.
    pub fn snapshot(&self) -> Vec<(&'static str, LatencySnapshot, u64)> {
        KINDS
            .iter()
            .enumerate()
            .map(|(i, kind)| {
                (
                    *kind,
                    self.latency[i].snapshot(),
                    self.errors[i].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// The timed store.
pub struct TimedStore {
    inner: Arc<dyn ObjectStore>,
    timing: Arc<BackendTiming>,
}

impl TimedStore {
    pub fn wrap(inner: Arc<dyn ObjectStore>) -> (Arc<dyn ObjectStore>, Arc<BackendTiming>) {
        let timing = Arc::new(BackendTiming::default());
        let store = Arc::new(Self {
            inner,
            timing: timing.clone(),
        });
        (store, timing)
    }

    fn time<T>(&self, kind: usize, call: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = Instant::now();
        let result = call();
        self.timing.latency[kind].record(started.elapsed());
        if result.is_err() {
            self.timing.errors[kind].fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

const PUT: usize = 0;
const GET: usize = 1;
const GET_RANGE: usize = 2;
const DELETE: usize = 3;
const LIST: usize = 4;
const META: usize = 5;

impl ObjectStore for TimedStore {
    fn create_namespace(&self, namespace: &str, owner: OwnerTag) -> Result<()> {
        self.time(META, || self.inner.create_namespace(namespace, owner))
    }
    fn delete_namespace(&self, namespace: &str) -> Result<()> {
        self.time(DELETE, || self.inner.delete_namespace(namespace))
    }
    fn namespace_exists(&self, namespace: &str) -> Result<bool> {
        self.time(META, || self.inner.namespace_exists(namespace))
    }
    fn list_namespaces(&self) -> Result<Vec<String>> {
        self.time(LIST, || self.inner.list_namespaces())
    }
    fn owner_tag(&self, namespace: &str) -> Result<OwnerTag> {
        self.time(META, || self.inner.owner_tag(namespace))
    }
    fn claim(&self, namespace: &str, new: OwnerTag) -> Result<()> {
        self.time(META, || self.inner.claim(namespace, new))
    }
    fn put(&self, namespace: &str, name: &str, data: &[u8]) -> Result<()> {
        self.time(PUT, || self.inner.put(namespace, name, data))
    }
    fn put_if_owner(
        &self,
        namespace: &str,
        name: &str,
        data: &[u8],
        owner: OwnerTag,
    ) -> Result<()> {
        self.time(PUT, || {
            self.inner.put_if_owner(namespace, name, data, owner)
        })
    }
    fn put_from(
        &self,
        namespace: &str,
        name: &str,
        len: u64,
        source: &mut dyn Read,
        owner: OwnerTag,
    ) -> Result<()> {
        self.time(PUT, || {
            self.inner.put_from(namespace, name, len, source, owner)
        })
    }
    fn put_file(
        &self,
        namespace: &str,
        name: &str,
        path: &Path,
        len: u64,
        chunk_crcs: Option<&[u32]>,
        owner: OwnerTag,
    ) -> Result<()> {
        self.time(PUT, || {
            self.inner
                .put_file(namespace, name, path, len, chunk_crcs, owner)
        })
    }
    fn get(&self, namespace: &str, name: &str) -> Result<Vec<u8>> {
        self.time(GET, || self.inner.get(namespace, name))
    }
    fn get_range(&self, namespace: &str, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.time(GET_RANGE, || {
            self.inner.get_range(namespace, name, offset, buf)
        })
    }
    fn read_gap(&self) -> u64 {
        self.inner.read_gap()
    }
    fn size(&self, namespace: &str, name: &str) -> Result<u64> {
        self.time(META, || self.inner.size(namespace, name))
    }
    fn exists(&self, namespace: &str, name: &str) -> Result<bool> {
        self.time(META, || self.inner.exists(namespace, name))
    }
    fn delete(&self, namespace: &str, name: &str) -> Result<()> {
        self.time(DELETE, || self.inner.delete(namespace, name))
    }
    fn delete_if_owner(&self, namespace: &str, name: &str, owner: OwnerTag) -> Result<()> {
        self.time(DELETE, || {
            self.inner.delete_if_owner(namespace, name, owner)
        })
    }
    fn list(&self, namespace: &str) -> Result<Vec<String>> {
        self.time(LIST, || self.inner.list(namespace))
    }
}

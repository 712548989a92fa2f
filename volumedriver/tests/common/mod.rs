//! Test support shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use vstor_backend::{BackendError, LocalStore, ObjectStore, OwnerTag};

/// See [`FaultStore::on_call`].
pub type Hook = Arc<dyn Fn(&str) + Send + Sync>;

/// A local store whose mutations (puts and deletes) can be refused: all of them while
/// "unreachable", or every one after a budget is spent. An operation cut off by the budget
/// leaves on the backend exactly what `kill -9` at that point would. Ranged reads of chosen
/// objects can be slowed down, like a backend across a network.
pub struct FaultStore {
    inner: LocalStore,
    /// Mutations still allowed; `i64::MAX` means no limit.
    budget: AtomicI64,
    /// Called at the start of every object read, write, delete and listing, with the
    /// operation's name (to observe the engine from inside a backend call).
    on_call: Mutex<Option<Hook>>,
    slow: RwLock<Option<SlowReads>>,
    slow_reads: AtomicU64,
    /// Object reads fail as data the backend cannot give back (an EC object that lost more
    /// than `m` fragments).
    unreadable: std::sync::atomic::AtomicBool,
    /// What [`ObjectStore::read_gap`] says (the local store's 0 unless set).
    read_gap: AtomicU64,
}

/// Whether a `get_range` of (namespace, object) is slow.
type ReadFilter = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// Which `get_range` calls are delayed, and by how much.
struct SlowReads {
    delay: Duration,
    matches: ReadFilter,
}

impl FaultStore {
    pub fn open(dir: &Path) -> Self {
        Self {
            inner: LocalStore::open(dir).expect("local store"),
            budget: AtomicI64::new(i64::MAX),
            on_call: Mutex::new(None),
            slow: RwLock::new(None),
            slow_reads: AtomicU64::new(0),
            unreadable: std::sync::atomic::AtomicBool::new(false),
            read_gap: AtomicU64::new(0),
        }
    }

    /// Answer `gap` to [`ObjectStore::read_gap`], as a store whose requests cost a round trip.
    pub fn set_read_gap(&self, gap: u64) {
        self.read_gap.store(gap, Ordering::SeqCst);
    }

    /// Make every object read fail with [`BackendError::Unreadable`] (`true`), or work again.
    pub fn set_unreadable(&self, unreadable: bool) {
        self.unreadable.store(unreadable, Ordering::SeqCst);
    }

    fn readable(&self, ns: &str, name: &str) -> vstor_backend::Result<()> {
        if self.unreadable.load(Ordering::SeqCst) {
            return Err(BackendError::Unreadable {
                namespace: ns.to_string(),
                name: name.to_string(),
                reason: "2 fragments reachable (k = 4) (injected)".into(),
            });
        }
        Ok(())
    }

    /// Delay every `get_range` of an object for which `matches(namespace, name)` holds by
    /// `delay` (a network round trip), from now on.
    pub fn delay_reads(
        &self,
        delay: Duration,
        matches: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
    ) {
        *self
            .slow
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(SlowReads {
            delay,
            matches: Box::new(matches),
        });
    }

    /// Number of `get_range` calls delayed so far (counted when the delay starts).
    pub fn delayed_reads(&self) -> u64 {
        self.slow_reads.load(Ordering::SeqCst)
    }

    /// Call `hook` at the start of every object read, write, delete and listing (`None`: stop).
    pub fn on_call(&self, hook: Option<Hook>) {
        *self.on_call.lock().expect("hook lock") = hook;
    }

    fn observe(&self, operation: &str) {
        let hook = self.on_call.lock().expect("hook lock").clone();
        if let Some(hook) = hook {
            hook(operation);
        }
    }

    /// Refuse every mutation (an unreachable backend) or accept them all again.
    pub fn set_failing(&self, failing: bool) {
        self.budget
            .store(if failing { 0 } else { i64::MAX }, Ordering::SeqCst);
    }

    /// Allow `mutations` more puts and deletes, then refuse the rest.
    pub fn cut_after(&self, mutations: i64) {
        self.budget.store(mutations, Ordering::SeqCst);
    }

    fn spend(&self) -> vstor_backend::Result<()> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            self.budget.fetch_add(1, Ordering::SeqCst);
            return Err(BackendError::Io {
                path: "injected".into(),
                source: std::io::Error::other("backend unreachable (injected)"),
            });
        }
        Ok(())
    }
}

impl ObjectStore for FaultStore {
    fn create_namespace(&self, ns: &str, owner: OwnerTag) -> vstor_backend::Result<()> {
        self.inner.create_namespace(ns, owner)
    }
    fn delete_namespace(&self, ns: &str) -> vstor_backend::Result<()> {
        self.inner.delete_namespace(ns)
    }
    fn namespace_exists(&self, ns: &str) -> vstor_backend::Result<bool> {
        self.inner.namespace_exists(ns)
    }
    fn list_namespaces(&self) -> vstor_backend::Result<Vec<String>> {
        self.inner.list_namespaces()
    }
    fn owner_tag(&self, ns: &str) -> vstor_backend::Result<OwnerTag> {
        self.inner.owner_tag(ns)
    }
    fn claim(&self, ns: &str, new: OwnerTag) -> vstor_backend::Result<()> {
        self.inner.claim(ns, new)
    }
    fn put(&self, ns: &str, name: &str, data: &[u8]) -> vstor_backend::Result<()> {
        self.spend()?;
        self.inner.put(ns, name, data)
    }
    fn put_if_owner(
        &self,
        ns: &str,
        name: &str,
        data: &[u8],
        owner: OwnerTag,
    ) -> vstor_backend::Result<()> {
        self.spend()?;
        self.observe("put_if_owner");
        self.inner.put_if_owner(ns, name, data, owner)
    }
    fn put_from(
        &self,
        ns: &str,
        name: &str,
        len: u64,
        data: &mut dyn std::io::Read,
        owner: OwnerTag,
    ) -> vstor_backend::Result<()> {
        self.spend()?;
        self.observe("put_from");
        self.inner.put_from(ns, name, len, data, owner)
    }
    fn put_file(
        &self,
        ns: &str,
        name: &str,
        path: &std::path::Path,
        len: u64,
        chunk_crcs: Option<&[u32]>,
        owner: OwnerTag,
    ) -> vstor_backend::Result<()> {
        self.spend()?;
        self.observe("put_file");
        self.inner.put_file(ns, name, path, len, chunk_crcs, owner)
    }
    fn get(&self, ns: &str, name: &str) -> vstor_backend::Result<Vec<u8>> {
        self.observe("get");
        self.readable(ns, name)?;
        self.inner.get(ns, name)
    }
    fn get_range(
        &self,
        ns: &str,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> vstor_backend::Result<()> {
        self.observe("get_range");
        self.readable(ns, name)?;
        let delay = self
            .slow
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|slow| (slow.matches)(ns, name))
            .map(|slow| slow.delay);
        if let Some(delay) = delay {
            self.slow_reads.fetch_add(1, Ordering::SeqCst);
            // Stands in for the round trip to a remote backend.
            std::thread::sleep(delay);
        }
        self.inner.get_range(ns, name, offset, buf)
    }
    fn read_gap(&self) -> u64 {
        self.read_gap.load(Ordering::SeqCst)
    }
    fn size(&self, ns: &str, name: &str) -> vstor_backend::Result<u64> {
        self.observe("size");
        self.inner.size(ns, name)
    }
    fn exists(&self, ns: &str, name: &str) -> vstor_backend::Result<bool> {
        self.inner.exists(ns, name)
    }
    fn delete(&self, ns: &str, name: &str) -> vstor_backend::Result<()> {
        self.spend()?;
        self.inner.delete(ns, name)
    }
    fn delete_if_owner(&self, ns: &str, name: &str, owner: OwnerTag) -> vstor_backend::Result<()> {
        self.spend()?;
        self.observe("delete_if_owner");
        self.inner.delete_if_owner(ns, name, owner)
    }
    fn list(&self, ns: &str) -> vstor_backend::Result<Vec<String>> {
        self.observe("list");
        self.inner.list(ns)
    }
}

//! Test support shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use vstor_backend::{BackendError, LocalStore, ObjectStore, OwnerTag};

/// See [`FaultStore::on_call`].
pub type Hook = Arc<dyn Fn(&str) + Send + Sync>;

/// A local store whose mutations (puts and deletes) can be refused: all of them while
/// "unreachable", or every one after a budget is spent. An operation cut off by the budget
/// leaves on the backend exactly what `kill -9` at that point would.
pub struct FaultStore {
    inner: LocalStore,
    /// Mutations still allowed; `i64::MAX` means no limit.
    budget: AtomicI64,
    /// Called at the start of every object read, write, delete and listing, with the
    /// operation's name (to observe the engine from inside a backend call).
    on_call: Mutex<Option<Hook>>,
}

impl FaultStore {
    pub fn open(dir: &Path) -> Self {
        Self {
            inner: LocalStore::open(dir).expect("local store"),
            budget: AtomicI64::new(i64::MAX),
            on_call: Mutex::new(None),
        }
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
    fn get(&self, ns: &str, name: &str) -> vstor_backend::Result<Vec<u8>> {
        self.observe("get");
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
        self.inner.get_range(ns, name, offset, buf)
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

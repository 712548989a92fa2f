//! The node's upload scheduler with real volumes on a local backend: a stuck or failing backend
//! of one volume does not hold up the others, every volume's TLog reaches the backend only
//! after its SCOs, and an idle volume's open TLog is uploaded once it is older than
//! `max_open_age`. Every test reads the data back from the backend alone.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use vstor_backend::{BackendError, LocalStore, ObjectStore, OwnerTag};
use vstor_volumedriver::config::TLOG_LIST_OBJECT;
use vstor_volumedriver::{ManagerConfig, Volume, VolumeManager, VolumeOptions};

const SCO: u64 = 4 << 20;

/// A local store that logs every successful put per namespace, can make one namespace's puts
/// fail, and can hold one namespace's puts until released (a backend that hangs).
struct TestStore {
    inner: LocalStore,
    log: Mutex<Vec<(String, String)>>,
    failing: Mutex<HashSet<String>>,
    stuck: Mutex<HashSet<String>>,
    released: Condvar,
}

impl TestStore {
    fn open(dir: &Path) -> Self {
        Self {
            inner: LocalStore::open(dir).expect("local store"),
            log: Mutex::new(Vec::new()),
            failing: Mutex::new(HashSet::new()),
            stuck: Mutex::new(HashSet::new()),
            released: Condvar::new(),
        }
    }

    fn release_all(&self) {
        self.failing.lock().clear();
        self.stuck.lock().clear();
        self.released.notify_all();
    }

    fn before_put(&self, ns: &str) -> vstor_backend::Result<()> {
        let mut stuck = self.stuck.lock();
        while stuck.contains(ns) {
            self.released.wait(&mut stuck);
        }
        drop(stuck);
        if self.failing.lock().contains(ns) {
            return Err(BackendError::Io {
                path: ns.into(),
                source: std::io::Error::other("backend unreachable (injected)"),
            });
        }
        Ok(())
    }

    fn logged(
        &self,
        ns: &str,
        name: &str,
        result: vstor_backend::Result<()>,
    ) -> vstor_backend::Result<()> {
        if result.is_ok() {
            self.log.lock().push((ns.to_string(), name.to_string()));
        }
        result
    }

    /// Objects put into `ns`, in order.
    fn puts(&self, ns: &str) -> Vec<String> {
        self.log
            .lock()
            .iter()
            .filter(|(n, _)| n == ns)
            .map(|(_, name)| name.clone())
            .collect()
    }
}

impl ObjectStore for TestStore {
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
        self.before_put(ns)?;
        self.logged(ns, name, self.inner.put(ns, name, data))
    }
    fn put_if_owner(
        &self,
        ns: &str,
        name: &str,
        data: &[u8],
        owner: OwnerTag,
    ) -> vstor_backend::Result<()> {
        self.before_put(ns)?;
        self.logged(ns, name, self.inner.put_if_owner(ns, name, data, owner))
    }
    fn put_from(
        &self,
        ns: &str,
        name: &str,
        len: u64,
        data: &mut dyn std::io::Read,
        owner: OwnerTag,
    ) -> vstor_backend::Result<()> {
        self.before_put(ns)?;
        self.logged(ns, name, self.inner.put_from(ns, name, len, data, owner))
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
        self.before_put(ns)?;
        self.logged(
            ns,
            name,
            self.inner.put_file(ns, name, path, len, chunk_crcs, owner),
        )
    }
    fn get(&self, ns: &str, name: &str) -> vstor_backend::Result<Vec<u8>> {
        self.inner.get(ns, name)
    }
    fn get_range(
        &self,
        ns: &str,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> vstor_backend::Result<()> {
        self.inner.get_range(ns, name, offset, buf)
    }
    fn size(&self, ns: &str, name: &str) -> vstor_backend::Result<u64> {
        self.inner.size(ns, name)
    }
    fn exists(&self, ns: &str, name: &str) -> vstor_backend::Result<bool> {
        self.inner.exists(ns, name)
    }
    fn delete(&self, ns: &str, name: &str) -> vstor_backend::Result<()> {
        self.inner.delete(ns, name)
    }
    fn delete_if_owner(&self, ns: &str, name: &str, owner: OwnerTag) -> vstor_backend::Result<()> {
        self.inner.delete_if_owner(ns, name, owner)
    }
    fn list(&self, ns: &str) -> vstor_backend::Result<Vec<String>> {
        self.inner.list(ns)
    }
}

/// A node on a temporary directory. Dropping it releases the store first (so no upload step
/// hangs) and then stops the manager's workers.
struct Node {
    store: Arc<TestStore>,
    manager: Option<Arc<VolumeManager>>,
    tmp: tempfile::TempDir,
}

impl Node {
    fn start(concurrency: usize, max_open_age: Option<Duration>) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(TestStore::open(&tmp.path().join("backend")));
        let config = ManagerConfig {
            upload_concurrency: concurrency,
            max_open_age,
            ..ManagerConfig::under(&tmp.path().join("node"), 1 << 40)
        };
        let manager = VolumeManager::open(config, store.clone()).expect("open manager");
        Self {
            store,
            manager: Some(manager),
            tmp,
        }
    }

    fn manager(&self) -> &Arc<VolumeManager> {
        self.manager.as_ref().expect("running")
    }

    fn create(&self, name: &str, size: u64) -> Arc<Volume> {
        let mut options = VolumeOptions::new(size);
        options.sco_size = SCO;
        self.manager()
            .create(name, &options)
            .expect("create volume")
    }

    /// Stop the node without closing open TLogs or waiting for uploads (like a crash, minus
    /// the data loss: the write-buffer files stay, but the tests do not use them).
    fn crash(&mut self) {
        self.store.release_all();
        if let Some(manager) = self.manager.take() {
            for name in manager.names() {
                if let Ok(volume) = manager.get(&name) {
                    volume.stop();
                }
            }
        }
    }

    /// Rebuild `name` from the backend alone, in a fresh write-buffer directory.
    fn open_from_backend(&self, name: &str) -> Arc<Volume> {
        let dir = self.tmp.path().join("restore").join(name);
        Volume::open(&dir, self.store.clone(), name).expect("restart from the backend alone")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.crash();
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn checksum(volume: &Volume, len: usize) -> u32 {
    let mut buf = vec![0u8; len];
    volume.read(0, &mut buf).expect("read back");
    crc32c::crc32c(&buf)
}

/// Poll `ready` until it holds or `within` passes.
fn wait_until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn all_uploaded(volume: &Volume) -> bool {
    let info = volume.info();
    info.upload_queue == 0 && info.not_uploaded_bytes == 0 && info.tlogs_on_backend >= 1
}

/// In `puts` (one namespace's objects, in upload order), every TLog comes after each SCO its
/// backend record lists, and the TLog list after the TLog.
fn assert_barrier_order(store: &TestStore, volume: &str) {
    let puts = store.puts(volume);
    let position = |name: &str| {
        puts.iter()
            .position(|p| p == name)
            .unwrap_or_else(|| panic!("{volume}: {name} never uploaded; uploads: {puts:?}"))
    };
    let list = vstor_volumedriver::config::TLogList::decode(
        volume,
        &store.get(volume, TLOG_LIST_OBJECT).expect("TLog list"),
    )
    .expect("TLog list decodes");
    assert!(!list.tlogs.is_empty(), "{volume}: no TLog on the backend");
    for record in &list.tlogs {
        let tlog = position(&record.object_name());
        for sco in &record.scos {
            let object = puts
                .iter()
                .position(|p| p.len() == 14 && p.split('_').nth(1) == Some(&format!("{sco:08x}")))
                .unwrap_or_else(|| panic!("{volume}: SCO {sco} never uploaded"));
            assert!(
                object < tlog,
                "{volume}: SCO {sco} uploaded after its TLog: {puts:?}"
            );
        }
        let list_put = puts
            .iter()
            .rposition(|p| p == TLOG_LIST_OBJECT)
            .expect("list uploaded");
        assert!(tlog < list_put, "{volume}: TLog list before the TLog");
    }
}

#[test]
fn stuck_and_failing_backends_do_not_stall_other_volumes() {
    let mut node = Node::start(2, None);
    let data = SCO as usize + (64 << 10);
    let names: Vec<String> = (0..12).map(|i| format!("v{i:02}")).collect();
    let volumes: Vec<Arc<Volume>> = names.iter().map(|n| node.create(n, 16 << 20)).collect();
    // v00's uploads hang inside the backend (holding one of the two workers); v01's fail.
    node.store.stuck.lock().insert("v00".into());
    node.store.failing.lock().insert("v01".into());
    let mut sums = HashMap::new();
    for (i, (name, volume)) in names.iter().zip(volumes).enumerate() {
        volume.write(0, &pattern(data, i as u64), false).unwrap();
        // Two SCOs (one full, one partial) and their TLog queued, in that order.
        volume.close_current_tlog().unwrap();
        sums.insert(name.clone(), checksum(&volume, data));
    }
    let manager = node.manager().clone();
    let others: Vec<Arc<Volume>> = names[2..].iter().map(|n| manager.get(n).unwrap()).collect();
    wait_until(
        "the healthy volumes' uploads with one worker hung and one volume failing",
        Duration::from_secs(60),
        || others.iter().all(|v| all_uploaded(v)),
    );
    let failing = manager.get("v01").unwrap();
    wait_until("v01 retried", Duration::from_secs(10), || {
        failing.info().upload_errors >= 2
    });
    assert!(failing.pending_uploads() > 0, "v01's backend refuses puts");
    assert!(manager.get("v00").unwrap().pending_uploads() > 0);
    // The backend recovers: the two laggards catch up.
    node.store.release_all();
    let laggards = [manager.get("v00").unwrap(), failing];
    wait_until(
        "v00 and v01 after recovery",
        Duration::from_secs(60),
        || laggards.iter().all(|v| all_uploaded(v)),
    );
    drop((others, laggards, manager));
    node.crash();
    for name in &names {
        assert_barrier_order(&node.store, name);
        let restored = node.open_from_backend(name);
        assert_eq!(
            checksum(&restored, data),
            sums[name],
            "{name}: backend copy differs"
        );
    }
}

#[test]
fn idle_volume_reaches_the_backend_after_max_open_age() {
    let max_age = Duration::from_millis(200);
    let mut node = Node::start(1, Some(max_age));
    let volume = node.create("idle", 8 << 20);
    let len = 300 << 10;
    let written = Instant::now();
    volume.write(4096, &pattern(len, 7), false).unwrap();
    let sum = checksum(&volume, len + 4096);
    // Far less than a SCO: without the age rule this would stay in the write buffer.
    wait_until(
        "the idle volume's TLog on the backend",
        Duration::from_secs(30),
        || all_uploaded(&volume),
    );
    assert!(
        written.elapsed() >= max_age,
        "uploaded before the open TLog was {max_age:?} old"
    );
    let objects = node.store.list("idle").unwrap();
    assert!(
        objects.iter().any(|o| o.starts_with("tlog_")),
        "{objects:?}"
    );
    assert_barrier_order(&node.store, "idle");
    // Nothing more to close: the volume stays put while idle.
    let tlogs = volume.info().tlogs_on_backend;
    assert_eq!(volume.unclosed_data_age(), None);
    drop(volume);
    node.crash();
    let restored = node.open_from_backend("idle");
    assert_eq!(restored.info().tlogs_on_backend, tlogs);
    assert_eq!(checksum(&restored, len + 4096), sum);
}

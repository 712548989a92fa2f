//! The engine with a real DTL server (in this process, on loopback): modes, replay after losing
//! the write buffer, replay after a crash that kept it, trims, catch-up after an outage, and
//! fencing of a previous owner. Node loss is simulated by dropping a volume without flushing and
//! deleting its write-buffer directory; uploads are stepped by hand unless a manager runs them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vstor_backend::{LocalStore, ObjectStore};
use vstor_dtl::{DtlServer, DtlServerConfig, DtlStore};
use vstor_volumedriver::{
    DtlMode, DtlState, ManagerConfig, Volume, VolumeConfig, VolumeError, VolumeManager,
    VolumeOptions,
};

const CS: u64 = 4096;

/// A DTL server on its own runtime thread, restartable on the same port and directory.
struct DtlRig {
    dir: PathBuf,
    addr: SocketAddr,
    running: Option<(Arc<DtlServer>, tokio::runtime::Runtime)>,
}

impl DtlRig {
    fn start(dir: &Path) -> Self {
        let mut rig = Self {
            dir: dir.to_path_buf(),
            addr: "127.0.0.1:0".parse().unwrap(),
            running: None,
        };
        rig.launch();
        rig
    }

    /// An address nothing listens on yet; `launch` later binds it.
    fn reserved(dir: &Path) -> Self {
        let addr = vstor_backend::testing::free_addr().parse().unwrap();
        Self {
            dir: dir.to_path_buf(),
            addr,
            running: None,
        }
    }

    fn launch(&mut self) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = Arc::new(DtlServer::new(&self.dir, DtlServerConfig::default()).unwrap());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .unwrap();
        self.addr = listener.local_addr().unwrap();
        let serving = server.clone();
        runtime.spawn(async move { serving.serve(listener).await });
        self.running = Some((server, runtime));
    }

    fn stop(&mut self) {
        if let Some((server, runtime)) = self.running.take() {
            runtime.block_on(server.shutdown());
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }

    fn store(&self) -> &Arc<DtlStore> {
        self.running.as_ref().expect("DTL running").0.store()
    }

    fn addr(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for DtlRig {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Node {
    _tmp: tempfile::TempDir,
    backend: Arc<LocalStore>,
    root: PathBuf,
}

impl Node {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let backend = Arc::new(LocalStore::open(tmp.path().join("backend")).unwrap());
        Self {
            root: tmp.path().to_path_buf(),
            _tmp: tmp,
            backend,
        }
    }

    fn dir(&self) -> PathBuf {
        self.root.join("wb").join("vol")
    }

    /// 4 MiB volume, SCOs of 16 clusters, TLogs of 2 SCOs: rollovers happen constantly.
    fn create(&self, mode: DtlMode, dtl: &str) -> Arc<Volume> {
        self.create_with_key(mode, dtl, None)
    }

    /// [`create`](Self::create), encrypted at rest with `key` if given.
    fn create_with_key(&self, mode: DtlMode, dtl: &str, key: Option<PathBuf>) -> Arc<Volume> {
        let options = VolumeOptions {
            dtl_mode: mode,
            dtl_addr: Some(dtl.to_string()),
            encryption_key_file: key,
            ..VolumeOptions::new(1024 * CS)
        };
        let mut config = VolumeConfig::new("vol", &options, 0).unwrap();
        config.sco_clusters = 16;
        config.tlog_scos = 2;
        let volume = Volume::create(&self.dir(), self.backend.clone(), config).unwrap();
        volume.attach_dtl();
        volume
    }

    /// What `kill -9` plus a lost disk leaves: nothing of the process, no write buffer.
    fn lose(&self, volume: Arc<Volume>) {
        volume.stop();
        volume.detach_dtl();
        drop(volume);
        std::fs::remove_dir_all(self.dir()).unwrap();
    }

    /// Adopt the volume on a second node sharing the backend.
    fn adopt(&self, name: &str) -> (Arc<VolumeManager>, Arc<Volume>, u64) {
        let config = ManagerConfig::under(&self.root.join(format!("node-{name}")), 1 << 30);
        let manager = VolumeManager::open(config, self.backend.clone()).unwrap();
        let (volume, summary) = manager.adopt("vol").expect("adopt");
        (manager, volume, summary.applied)
    }
}

fn wait_for_state(volume: &Volume, want: DtlState) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        volume.dtl_tick();
        let info = volume.info();
        if info.dtl_state == want.as_str() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "DTL state stayed {} (wanted {}), last error {:?}",
            info.dtl_state,
            want.as_str(),
            info.dtl_last_error
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Expected content of the volume: cluster -> bytes (absent = zeros).
#[derive(Default)]
struct Model(BTreeMap<u64, Vec<u8>>);

impl Model {
    fn write(&mut self, volume: &Volume, cluster: u64, seed: u64) {
        let data: Vec<u8> = (0..CS)
            .map(|i| (i as u8) ^ (seed as u8) ^ ((seed >> 8) as u8).rotate_left(3))
            .collect();
        volume.write(cluster * CS, &data, false).expect("write");
        self.0.insert(cluster, data);
    }

    fn discard(&mut self, volume: &Volume, cluster: u64, count: u64) {
        volume.discard(cluster * CS, count * CS).expect("discard");
        for c in cluster..cluster + count {
            self.0.remove(&c);
        }
    }

    fn check(&self, volume: &Volume) {
        let mut buf = vec![0u8; volume.size() as usize];
        volume.read(0, &mut buf).expect("read");
        for cluster in 0..volume.size() / CS {
            let got = &buf[(cluster * CS) as usize..((cluster + 1) * CS) as usize];
            match self.0.get(&cluster) {
                Some(want) => assert!(got == &want[..], "cluster {cluster} differs"),
                None => assert!(got.iter().all(|b| *b == 0), "cluster {cluster} not zero"),
            }
        }
    }
}

/// Pseudo-random cluster numbers, reproducible.
fn clusters(seed: u64, n: usize, max: u64) -> Vec<u64> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % max
        })
        .collect()
}

#[test]
fn sync_writes_survive_losing_the_node_and_adoption_fences_the_dtl() {
    let tmp = tempfile::tempdir().unwrap();
    let dtl = DtlRig::start(&tmp.path().join("dtl"));
    let node = Node::new();
    let volume = node.create(DtlMode::Sync, &dtl.addr());
    wait_for_state(&volume, DtlState::OkSync);
    let mut model = Model::default();
    // Part of the history reaches the backend, the rest only the write buffer and the DTL.
    for (i, c) in clusters(1, 200, 1024).into_iter().enumerate() {
        model.write(&volume, c, i as u64);
    }
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    for (i, c) in clusters(2, 300, 1024).into_iter().enumerate() {
        model.write(&volume, c, 1000 + i as u64);
    }
    model.discard(&volume, 100, 40);
    let old_tag = volume.info().owner_tag;
    assert!(
        dtl.store().sco_range("vol").unwrap().newest.is_some(),
        "the DTL holds the writes not on the backend"
    );
    node.lose(volume);

    let (_manager, adopted, replayed) = node.adopt("a");
    assert!(
        replayed > 0,
        "the DTL, not the backend, had the last writes"
    );
    assert!(adopted.info().owner_tag > old_tag);
    model.check(&adopted);
    assert_eq!(
        dtl.store().registration("vol").unwrap().owner_tag,
        adopted.info().owner_tag,
        "the adopter took the DTL registration over"
    );
}

#[test]
fn encrypted_volumes_mirror_ciphertext_and_replay_it_as_is() {
    let tmp = tempfile::tempdir().unwrap();
    let dtl = DtlRig::start(&tmp.path().join("dtl"));
    let node = Node::new();
    let key = tmp.path().join("volume.key");
    std::fs::write(&key, [9u8; 32]).unwrap();
    let volume = node.create_with_key(DtlMode::Sync, &dtl.addr(), Some(key.clone()));
    wait_for_state(&volume, DtlState::OkSync);
    let mut model = Model::default();
    for (i, c) in clusters(7, 60, 1024).into_iter().enumerate() {
        model.write(&volume, c, i as u64);
    }
    // The DTL holds each cluster encrypted exactly once, its cluster index as the tweak (so the
    // scan can find what it looks for), and no plaintext.
    let cipher = vstor_backend::crypt::UnitCipher::load(&key).unwrap();
    let find = |needle: &[u8]| {
        !vstor_backend::testing::files_containing(&tmp.path().join("dtl"), needle).is_empty()
    };
    for (&cluster, plain) in &model.0 {
        let mut sealed = plain.clone();
        cipher
            .encrypt_units(&mut sealed, CS as usize, cluster, 0)
            .unwrap();
        assert!(
            find(&sealed[..64]),
            "cluster {cluster}'s ciphertext is on the DTL"
        );
        assert!(
            !find(&plain[..64]),
            "cluster {cluster}'s plaintext is on the DTL"
        );
    }
    node.lose(volume);
    // Replay appends the DTL's ciphertext as it is: read back, it decrypts once.
    let (_manager, adopted, replayed) = node.adopt("a");
    assert!(replayed > 0, "the DTL had the writes");
    model.check(&adopted);
}

#[test]
fn crash_with_the_write_buffer_kept_replays_unflushed_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dtl = DtlRig::start(&tmp.path().join("dtl"));
    let node = Node::new();
    let volume = node.create(DtlMode::Sync, &dtl.addr());
    wait_for_state(&volume, DtlState::OkSync);
    let mut model = Model::default();
    for (i, c) in clusters(3, 100, 1024).into_iter().enumerate() {
        model.write(&volume, c, i as u64);
    }
    volume.flush().unwrap();
    for (i, c) in clusters(4, 57, 1024).into_iter().enumerate() {
        model.write(&volume, c, 500 + i as u64);
    }
    // kill -9: the TLog entries buffered since the flush are lost with the process.
    volume.stop();
    volume.detach_dtl();
    drop(volume);

    let reopened = Volume::open(&node.dir(), node.backend.clone(), "vol").unwrap();
    let summary = reopened.replay_dtl().unwrap();
    assert!(
        summary.applied > 0 && summary.applied < summary.held,
        "replay applies exactly what the write buffer lost: {summary:?}"
    );
    model.check(&reopened);
    // And again: a second crash right after replay loses nothing either (replay flushed).
    reopened.stop();
    drop(reopened);
    let again = Volume::open(&node.dir(), node.backend.clone(), "vol").unwrap();
    let second = again.replay_dtl().unwrap();
    assert_eq!(second.applied, 0, "nothing left to replay: {second:?}");
    model.check(&again);
}

#[test]
fn async_mode_keeps_everything_acknowledged_before_a_flush() {
    let tmp = tempfile::tempdir().unwrap();
    let dtl = DtlRig::start(&tmp.path().join("dtl"));
    let node = Node::new();
    let volume = node.create(DtlMode::Async, &dtl.addr());
    wait_for_state(&volume, DtlState::OkSync);
    let mut model = Model::default();
    for (i, c) in clusters(5, 400, 1024).into_iter().enumerate() {
        model.write(&volume, c, i as u64);
    }
    model.discard(&volume, 0, 512);
    for (i, c) in clusters(6, 100, 1024).into_iter().enumerate() {
        model.write(&volume, c, 9000 + i as u64);
    }
    volume.flush().unwrap();
    assert_eq!(
        volume.info().dtl_backlog_bytes,
        0,
        "flush drained the backlog"
    );
    node.lose(volume);
    let (_manager, adopted, _) = node.adopt("a");
    model.check(&adopted);
}

#[test]
fn uploads_trim_the_dtl() {
    let tmp = tempfile::tempdir().unwrap();
    let dtl = DtlRig::start(&tmp.path().join("dtl"));
    let node = Node::new();
    let volume = node.create(DtlMode::Sync, &dtl.addr());
    wait_for_state(&volume, DtlState::OkSync);
    let mut model = Model::default();
    for (i, c) in clusters(7, 200, 1024).into_iter().enumerate() {
        model.write(&volume, c, i as u64);
    }
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    // Trims are sent in the background: wait until the DTL holds nothing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while dtl.store().sco_range("vol").unwrap().newest.is_some() {
        assert!(Instant::now() < deadline, "DTL was never trimmed");
        std::thread::sleep(Duration::from_millis(10));
    }
    model.check(&volume);
}

#[test]
fn outage_goes_degraded_then_catches_up_without_replaying_history() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dtl = DtlRig::reserved(&tmp.path().join("dtl"));
    let node = Node::new();
    let volume = node.create(DtlMode::Sync, &dtl.addr());
    let mut model = Model::default();
    // No DTL yet: writes are not failed, the volume says it is unprotected.
    for (i, c) in clusters(8, 50, 1024).into_iter().enumerate() {
        model.write(&volume, c, i as u64);
    }
    assert_eq!(volume.info().dtl_state, "degraded");

    dtl.launch();
    wait_for_state(&volume, DtlState::CatchUp);
    // New writes are mirrored from a fresh SCO; the state stays catch_up until what was written
    // unprotected is on the backend.
    for (i, c) in clusters(9, 30, 1024).into_iter().enumerate() {
        model.write(&volume, c, 100 + i as u64);
    }
    volume.dtl_tick();
    assert_eq!(volume.info().dtl_state, "catch_up");
    let held: u64 = dtl.store().entry_counts("vol").unwrap().values().sum();
    assert_eq!(held, 30, "only writes after the reconnection were sent");
    volume.drain_uploads().unwrap();
    wait_for_state(&volume, DtlState::OkSync);
    // The lock-free accessor the edge server reads per request agrees.
    assert!(volume.dtl_in_sync());

    // Kill the DTL mid-way: degraded, writes continue; back: catch-up again.
    dtl.stop();
    for (i, c) in clusters(10, 40, 1024).into_iter().enumerate() {
        model.write(&volume, c, 200 + i as u64);
    }
    wait_for_state(&volume, DtlState::Degraded);
    assert!(!volume.dtl_in_sync());
    assert!(volume.info().dtl_degradations >= 1);
    dtl.launch();
    wait_for_state(&volume, DtlState::CatchUp);
    volume.drain_uploads().unwrap();
    wait_for_state(&volume, DtlState::OkSync);
    for (i, c) in clusters(11, 40, 1024).into_iter().enumerate() {
        model.write(&volume, c, 300 + i as u64);
    }
    // Everything acknowledged is on the backend or the DTL.
    node.lose(volume);
    let (_manager, adopted, replayed) = node.adopt("a");
    assert!(replayed >= 40, "the last writes came from the DTL");
    model.check(&adopted);
}

#[test]
fn previous_owner_is_fenced_by_the_dtl_and_halts() {
    let tmp = tempfile::tempdir().unwrap();
    let dtl = DtlRig::start(&tmp.path().join("dtl"));
    let node = Node::new();
    let volume = node.create(DtlMode::Sync, &dtl.addr());
    wait_for_state(&volume, DtlState::OkSync);
    let mut model = Model::default();
    for (i, c) in clusters(12, 64, 1024).into_iter().enumerate() {
        model.write(&volume, c, i as u64);
    }
    // The old node is partitioned, not dead: another node adopts meanwhile.
    let (_manager, adopted, _) = node.adopt("a");
    model.check(&adopted);
    // The old node's next writes reach the DTL with a stale owner tag: it halts.
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        match volume.write(0, &[7u8; CS as usize], false) {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "old owner never fenced"),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(matches!(err, VolumeError::Halted { .. }), "{err}");
    assert!(err.to_string().contains("owner tag"), "{err}");
    // Its uploads are fenced by the backend too, and nothing it did reached the new owner.
    assert!(volume.drain_uploads().is_err());
    model.check(&adopted);
    // Restarting the old node's copy is refused.
    volume.stop();
    volume.detach_dtl();
    drop(volume);
    let err = Volume::open(&node.dir(), node.backend.clone(), "vol")
        .err()
        .expect("old copy refused");
    assert!(matches!(err, VolumeError::Adopted { .. }), "{err}");
    assert!(node.backend.namespace_exists("vol").unwrap());
}

#[test]
fn adopt_refuses_without_a_readable_dtl() {
    let tmp = tempfile::tempdir().unwrap();
    let dtl = DtlRig::reserved(&tmp.path().join("dtl"));
    let node = Node::new();
    let volume = node.create(DtlMode::Sync, &dtl.addr());
    volume.write(0, &[1u8; CS as usize], false).unwrap();
    node.lose(volume);
    let config = ManagerConfig::under(&node.root.join("node-b"), 1 << 30);
    let manager = VolumeManager::open(config, node.backend.clone()).unwrap();
    let err = manager.adopt("vol").err().expect("adopt must fail");
    assert!(matches!(err, VolumeError::Dtl { .. }), "{err}");
    assert!(manager.get("vol").is_err());
    let err = manager.adopt("nosuch").err().expect("no such volume");
    assert!(matches!(err, VolumeError::NotFound { .. }), "{err}");
}

/// A volume deleted while its DTL node was down leaves its entries there. The same name created
/// again and mirrored to that DTL is another volume: the old entries' higher owner tag must not
/// fence it, and none of them may be replayed into it when its node is lost.
#[test]
fn a_volume_created_again_ignores_a_deleted_namesakes_dtl_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let dtl = DtlRig::start(&tmp.path().join("dtl"));
    let node = Node::new();
    // The first volume: adopted once (tag 2), with writes only the DTL holds.
    let first = node.create(DtlMode::Sync, &dtl.addr());
    wait_for_state(&first, DtlState::OkSync);
    let mut old = Model::default();
    for (i, c) in clusters(21, 120, 1024).into_iter().enumerate() {
        old.write(&first, c, 5000 + i as u64);
    }
    node.lose(first);
    let (manager, adopted, _) = node.adopt("a");
    old.check(&adopted);
    for (i, c) in clusters(22, 60, 1024).into_iter().enumerate() {
        old.write(&adopted, c, 7000 + i as u64);
    }
    let old_reg = dtl.store().registration("vol").unwrap();
    assert!(old_reg.owner_tag >= 2, "{old_reg:?}");
    assert!(dtl.store().sco_range("vol").unwrap().newest.is_some());
    // Deleted while the DTL is away: its entries stay there. (The delete of the backend
    // namespace is what `volume delete` does; the DTL's part fails.)
    adopted.stop();
    adopted.detach_dtl();
    drop(adopted);
    drop(manager);
    node.backend.delete_namespace("vol").unwrap();
    std::fs::remove_dir_all(node.root.join("node-a")).unwrap();

    // Created again under the same name, on the same DTL: tag 1, a newer incarnation.
    let again = node.create(DtlMode::Sync, &dtl.addr());
    wait_for_state(&again, DtlState::OkSync);
    let mut new = Model::default();
    for (i, c) in clusters(23, 40, 1024).into_iter().enumerate() {
        new.write(&again, c, 9000 + i as u64);
    }
    new.check(&again);
    let reg = dtl.store().registration("vol").unwrap();
    assert_eq!(reg.owner_tag, 1, "the new volume took the namespace over");
    assert_eq!(reg.incarnation, again.config().incarnation);
    assert!(reg.incarnation > old_reg.incarnation);
    // The deleted volume's delete reaching this DTL only now, under tag 1 like the new
    // volume's, leaves the new volume's entries alone.
    let late = vstor_dtl::replay::unregister(
        &dtl.addr(),
        "vol",
        1,
        old_reg.incarnation,
        vstor_dtl::MirrorConfig::new(&dtl.addr(), "", 0, 0).client,
    );
    assert!(late.unwrap_err().to_string().contains("newer incarnation"));
    // Its node is lost before anything reached the backend: the adopter replays the DTL,
    // which must hold the new volume's writes and nothing of the old one's.
    node.lose(again);
    let (_manager, adopted, replayed) = node.adopt("b");
    assert!(
        replayed >= 40,
        "the new writes came from the DTL ({replayed})"
    );
    new.check(&adopted);
}

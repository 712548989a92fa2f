//! Encryption at rest in the engine, on the real manager (uploader threads included) and a local
//! backend: an encrypted volume's write buffer and backend hold no plaintext (a plaintext control
//! volume's do, so the scan can fail); partial-cluster writes and reads, allocated zeroes and
//! discards, reads from the write buffer and from the backend, snapshots, clones, scrub and
//! restarts all read back what was written; a replaced or missing key fails that volume's open,
//! naming the volume and the file, while the node's other volumes run.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vstor_backend::LocalStore;
use vstor_volumedriver::{ManagerConfig, Volume, VolumeError, VolumeManager, VolumeOptions};

const CS: usize = 4096;
const CLUSTERS: usize = 64;
/// What the scan looks for: every cluster written holds it many times.
const MARKER: &[u8] = b"VSTOR-PLAINTEXT-MARKER-0123456789";

/// Cluster content: the marker repeated, stamped with the cluster and a seed.
fn cluster(index: usize, seed: u8) -> Vec<u8> {
    let mut data: Vec<u8> = MARKER.iter().copied().cycle().take(CS).collect();
    data[..8].copy_from_slice(&(index as u64).to_le_bytes());
    data[8] = seed;
    data
}

fn contains_marker(dir: &Path) -> Vec<PathBuf> {
    vstor_backend::testing::files_containing(dir, MARKER)
}

struct Rig {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    backend: Arc<LocalStore>,
    manager: Arc<VolumeManager>,
}

impl Rig {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let backend = Arc::new(LocalStore::open(root.join("backend")).unwrap());
        let manager = Self::open_manager(&root, &backend);
        Self {
            _tmp: tmp,
            root,
            backend,
            manager,
        }
    }

    fn open_manager(root: &Path, backend: &Arc<LocalStore>) -> Arc<VolumeManager> {
        let config = ManagerConfig {
            max_open_age: None,
            ..ManagerConfig::under(&root.join("node"), 1 << 30)
        };
        VolumeManager::open(config, backend.clone()).unwrap()
    }

    fn restart(&mut self) {
        let unfinished = self.manager.shutdown(Duration::from_secs(30));
        assert!(unfinished.is_empty(), "uploads unfinished: {unfinished:?}");
        self.manager = Self::open_manager(&self.root, &self.backend);
    }

    fn key(&self) -> PathBuf {
        self.root.join("volume.key")
    }

    fn stored(&self, volume: &str) -> [PathBuf; 2] {
        [
            self.root.join("backend").join(volume),
            self.root.join("node").join("write-buffer").join(volume),
        ]
    }
}

fn options(key: Option<&Path>) -> VolumeOptions {
    VolumeOptions {
        sco_size: 16 * CS as u64,
        write_buffer: 64 * CS as u64,
        encryption_key_file: key.map(Path::to_path_buf),
        ..VolumeOptions::new((CLUSTERS * CS) as u64)
    }
}

/// A volume and the bytes it must read back.
struct Model {
    volume: Arc<Volume>,
    bytes: Vec<u8>,
}

impl Model {
    fn new(volume: Arc<Volume>) -> Self {
        Self {
            volume,
            bytes: vec![0; CLUSTERS * CS],
        }
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        self.volume.write(offset as u64, data, false).unwrap();
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    fn zero(&mut self, offset: usize, len: usize, allocate: bool) {
        self.volume
            .write_zeroes(offset as u64, len as u64, allocate, false)
            .unwrap();
        self.bytes[offset..offset + len].fill(0);
    }

    /// The whole volume and some unaligned pieces read back as written.
    fn check(&self, what: &str) {
        let mut all = vec![0u8; CLUSTERS * CS];
        self.volume.read(0, &mut all).unwrap();
        assert!(
            all == self.bytes,
            "{what}: {} reads back wrong",
            self.volume.name()
        );
        for (offset, len) in [
            (512, 512),
            (5 * CS + 1024, 3 * CS),
            (7 * CS, 1536),
            (CS - 512, 1024),
        ] {
            let mut part = vec![0u8; len];
            self.volume.read(offset as u64, &mut part).unwrap();
            assert!(
                part == self.bytes[offset..offset + len],
                "{what}: {} [{offset}, +{len}) reads back wrong",
                self.volume.name()
            );
        }
    }

    fn upload_and_evict(&self) {
        self.volume.flush().unwrap();
        self.volume.close_current_tlog().unwrap();
        assert!(self
            .volume
            .wait_for_uploads(Instant::now() + Duration::from_secs(30)));
        self.volume.evict(u64::MAX);
    }
}

/// The same writes to any volume: whole clusters, sub-cluster writes (read-modify-write),
/// allocated zeroes and a partial discard.
fn write_mix(model: &mut Model, seed: u8) {
    let data: Vec<u8> = (0..20).flat_map(|i| cluster(i, seed)).collect();
    model.write(0, &data);
    model.write(5 * CS + 512, &cluster(99, seed)[..1024]);
    model.zero(10 * CS, CS, true);
    model.zero(12 * CS + 512, 1024, false);
}

#[test]
fn encrypted_volumes_store_only_ciphertext_and_read_back_everywhere() {
    let mut rig = Rig::new();
    std::fs::write(rig.key(), [0x5a; 32]).unwrap();
    let key = rig.key();
    let mut enc = Model::new(rig.manager.create("enc", &options(Some(&key))).unwrap());
    let mut plain = Model::new(rig.manager.create("plain", &options(None)).unwrap());
    let info = enc.volume.info();
    assert_eq!(info.encryption.as_deref(), Some("aes-256-xts"));
    let fingerprint = info.encryption_key_fingerprint.clone().unwrap();
    assert_eq!(fingerprint.len(), 16);
    assert_eq!(plain.volume.info().encryption, None);

    for model in [&mut enc, &mut plain] {
        write_mix(model, 1);
        model.check("written");
        model.upload_and_evict();
        // Now from the backend, including a read-modify-write of a cluster only there.
        model.check("evicted");
        model.write(7 * CS + 1024, &cluster(7, 2)[..512]);
        model.check("rewritten over the backend");
    }
    enc.upload_and_evict();
    plain.upload_and_evict();
    let leaks: Vec<PathBuf> = rig
        .stored("enc")
        .iter()
        .flat_map(|d| contains_marker(d))
        .collect();
    assert!(leaks.is_empty(), "plaintext in {leaks:?}");
    assert!(
        !contains_marker(&rig.stored("plain")[0]).is_empty(),
        "the control volume's backend holds the plaintext: the scan works"
    );

    // Snapshot and clone: the clone inherits the key and reads the parent's clusters; a partial
    // write to an inherited cluster reads it from the parent's SCO.
    enc.volume.snapshot_create("s1").unwrap();
    let clone = rig
        .manager
        .clone_volume("encc", "enc", "s1", &options(None), Duration::from_secs(30))
        .unwrap();
    assert_eq!(
        clone.info().encryption_key_fingerprint.as_deref(),
        Some(fingerprint.as_str())
    );
    let mut clone = Model {
        volume: clone,
        bytes: enc.bytes.clone(),
    };
    clone.check("clone");
    clone.write(3 * CS + 2048, &cluster(3, 3)[..1024]);
    clone.check("clone after a partial write");
    let err = rig
        .manager
        .clone_volume(
            "bad",
            "enc",
            "s1",
            &options(Some(&key)),
            Duration::from_secs(30),
        )
        .err()
        .expect("a clone cannot choose its own key");
    assert!(err.to_string().contains("inherits"), "{err}");

    // Overwrites, then scrub: relocated ciphertext still decrypts.
    let data: Vec<u8> = (0..16).flat_map(|i| cluster(i, 4)).collect();
    enc.write(0, &data);
    enc.upload_and_evict();
    let report = enc.volume.scrub(None, &mut |_| {}).unwrap();
    enc.check(&format!("after scrub {report:?}"));
    enc.upload_and_evict();
    clone.upload_and_evict();
    for volume in ["enc", "encc"] {
        let leaks: Vec<PathBuf> = rig
            .stored(volume)
            .iter()
            .flat_map(|d| contains_marker(d))
            .collect();
        assert!(leaks.is_empty(), "plaintext in {leaks:?}");
    }

    // Restart: the key is read again.
    rig.restart();
    for model in [&mut enc, &mut clone, &mut plain] {
        model.volume = rig.manager.get(model.volume.name()).unwrap();
        model.check("restarted");
    }

    // Another key in the file, then no file: the encrypted volumes fail, by name and file.
    std::fs::write(rig.key(), [0xa5; 32]).unwrap();
    rig.restart();
    let failed = rig.manager.failed();
    for volume in ["enc", "encc"] {
        let reason = &failed[volume];
        assert!(
            reason.contains(&format!("volume {volume}"))
                && reason.contains(&key.display().to_string())
                && reason.contains(&fingerprint),
            "{reason}"
        );
    }
    plain.volume = rig.manager.get("plain").unwrap();
    plain.check("beside failed volumes");
    std::fs::remove_file(rig.key()).unwrap();
    rig.restart();
    let reason = &rig.manager.failed()["enc"];
    assert!(
        reason.contains("volume enc") && reason.contains(&key.display().to_string()),
        "{reason}"
    );
    assert!(matches!(
        rig.manager.get("enc").err(),
        Some(VolumeError::Halted { .. })
    ));

    // The right key back: everything reads again.
    std::fs::write(rig.key(), [0x5a; 32]).unwrap();
    rig.restart();
    for model in [&mut enc, &mut clone] {
        model.volume = rig.manager.get(model.volume.name()).unwrap();
        model.check("key restored");
    }
}

#[test]
fn bad_key_files_are_refused_at_creation() {
    let rig = Rig::new();
    let short = rig.root.join("short.key");
    std::fs::write(&short, b"0123456789").unwrap();
    let err = rig
        .manager
        .create("a", &options(Some(&short)))
        .err()
        .expect("a short key is refused");
    assert!(matches!(err, VolumeError::EncryptionKey { .. }), "{err}");
    assert!(
        err.to_string().contains("volume a") && err.to_string().contains("short.key"),
        "{err}"
    );
    let err = rig
        .manager
        .create("b", &options(Some(Path::new("relative.key"))))
        .err()
        .expect("a relative path is refused");
    assert!(err.to_string().contains("absolute"), "{err}");
    let missing = rig.root.join("missing.key");
    let err = rig
        .manager
        .create("c", &options(Some(&missing)))
        .err()
        .expect("a missing file is refused");
    assert!(err.to_string().contains("missing.key"), "{err}");
    assert!(rig.manager.names().is_empty());
}

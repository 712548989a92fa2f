//! Engine tests through the public API: no sockets, no threads, no timers. Uploads are stepped by
//! hand, crashes are simulated by dropping a volume without flushing (what `kill -9` leaves:
//! everything written to files survives, everything buffered in the process is gone), power cuts
//! by a simulated write buffer (`SimFs`) that forgets or tears what was not synced.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use vstor_backend::ObjectStore;
use vstor_volumedriver::config::{TLogList, TLOG_LIST_OBJECT};
use vstor_volumedriver::{
    PowerCut, ReadAttempt, SimFs, StdFs, UploadTask, Volume, VolumeConfig, VolumeError,
    VolumeOptions, WbFs,
};

const CS: usize = 4096;

use crate::common;

use common::FaultStore;

struct Rig {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    store: Arc<FaultStore>,
    /// The write buffer's simulated file system (power cuts), or `None` for the real one.
    sim: Option<Arc<SimFs>>,
}

impl Rig {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(FaultStore::open(&tmp.path().join("backend")));
        Self {
            dir: tmp.path().join("wb").join("vol"),
            _tmp: tmp,
            store,
            sim: None,
        }
    }

    /// A rig whose write buffer is a [`SimFs`] (the backend stays a real local store: it
    /// survives the power cuts).
    fn simulated() -> Self {
        Self {
            sim: Some(Arc::new(SimFs::new())),
            ..Self::new()
        }
    }

    fn fs(&self) -> Arc<dyn WbFs> {
        match &self.sim {
            Some(sim) => sim.clone(),
            None => Arc::new(StdFs),
        }
    }

    /// Lose power now; on the real file system, only the process dies (`kill -9`).
    fn power_cut(&self, how: PowerCut) {
        if let Some(sim) = &self.sim {
            sim.power_cut(how);
        }
    }

    /// A small volume: `clusters` clusters, SCOs of `sco_clusters`, TLogs of `tlog_scos` SCOs.
    fn create(
        &self,
        clusters: u64,
        sco_clusters: u64,
        tlog_scos: u64,
        write_buffer: u64,
    ) -> Arc<Volume> {
        let mut config =
            VolumeConfig::new("vol", &VolumeOptions::new(clusters * CS as u64), 0).unwrap();
        config.sco_clusters = sco_clusters;
        config.tlog_scos = tlog_scos;
        config.write_buffer = write_buffer;
        Volume::create_on(self.fs(), &self.dir, self.store.clone(), config).expect("create volume")
    }

    fn open(&self) -> Arc<Volume> {
        Volume::open_on(self.fs(), &self.dir, self.store.clone(), "vol").expect("reopen volume")
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(7)
                .wrapping_add(seed)
                .wrapping_add((i >> 9) as u8)
        })
        .collect()
}

fn read_all(volume: &Volume) -> Vec<u8> {
    let mut buf = vec![0u8; volume.size() as usize];
    volume.read(0, &mut buf).expect("read whole volume");
    buf
}

fn sco_dir(dir: &Path) -> PathBuf {
    dir.join("sco")
}

#[test]
fn unaligned_writes_read_back_and_unwritten_reads_zero() {
    let rig = Rig::new();
    let volume = rig.create(16, 4, 2, 1 << 30);
    assert!(read_all(&volume).iter().all(|b| *b == 0));
    let data = pattern(3 * 512, 1);
    volume.write(512 * 7, &data, false).unwrap();
    let mut back = vec![0u8; data.len()];
    volume.read(512 * 7, &mut back).unwrap();
    assert_eq!(back, data);
    let mut around = vec![0xffu8; 512];
    volume.read(512 * 6, &mut around).unwrap();
    assert!(
        around.iter().all(|b| *b == 0),
        "neighbouring sector untouched"
    );
    // Errors: out of range, misaligned, zero-length is fine.
    let size = volume.size();
    assert!(matches!(
        volume.write(size - 512, &[0u8; 1024], false),
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        volume.read(u64::MAX - 511, &mut [0u8; 512]),
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        volume.write(100, &[0u8; 512], false),
        Err(VolumeError::Misaligned { .. })
    ));
    volume.write(0, &[], false).unwrap();
}

#[test]
fn sco_and_tlog_rollover_upload_in_barrier_order() {
    let rig = Rig::new();
    let volume = rig.create(64, 4, 2, 1 << 30);
    volume.write(0, &pattern(8 * CS, 3), false).unwrap(); // fills SCO 1 and 2 → TLog 1 closes
    let info = volume.info();
    assert_eq!(info.upload_queue, 3);
    assert!(volume.upload_one().unwrap());
    assert!(rig.store.exists("vol", "00_00000001_00").unwrap());
    assert!(!rig.store.exists("vol", "tlog_0000000000000001").unwrap());
    volume.drain_uploads().unwrap();
    assert!(rig.store.exists("vol", "00_00000002_00").unwrap());
    assert!(rig.store.exists("vol", "tlog_0000000000000001").unwrap());
    let list = TLogList::decode("vol", &rig.store.get("vol", TLOG_LIST_OBJECT).unwrap()).unwrap();
    assert_eq!(list.tlogs.len(), 1);
    assert_eq!(list.tlogs[0].scos, vec![1, 2]);
    let info = volume.info();
    assert_eq!(info.not_uploaded_bytes, 0);
    assert_eq!(info.disposable_bytes, 2 * (4096 + 4 * CS as u64));
    assert_eq!(info.tlogs_on_backend, 1);
    assert!(
        !rig.dir.join("tlog").join("tlog_0000000000000001").exists(),
        "uncorked TLog removed locally"
    );
}

#[test]
fn a_sco_damaged_in_the_write_buffer_is_caught_on_its_first_backend_read() {
    // The checksums are computed once, when the data is written; the local store links the
    // sealed SCO with them and every backend read checks them. Damage done behind the engine's
    // back between the write and the upload gives an error naming the SCO, never wrong data.
    let rig = Rig::new();
    let volume = rig.create(64, 4, 2, 1 << 30);
    volume.write(0, &pattern(4 * CS, 5), false).unwrap();
    let path = sco_dir(&rig.dir).join("00_00000001_00");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096 + 100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    volume.close_current_tlog().unwrap();
    while volume.upload_one().unwrap() {}
    assert!(rig.store.exists("vol", "00_00000001_00").unwrap());
    volume.evict(u64::MAX);
    let mut back = vec![0u8; CS];
    let err = volume.read(0, &mut back).unwrap_err();
    assert!(
        err.to_string().contains("00_00000001_00") && err.to_string().contains("checksum"),
        "{err}"
    );
    // Undamaged data elsewhere still reads back (the SCO is one 64 KiB checksum chunk here).
    let other = pattern(4 * CS, 6);
    volume.write(8 * CS as u64, &other, false).unwrap();
    let mut back = vec![0u8; 4 * CS];
    volume.read(8 * CS as u64, &mut back).unwrap();
    assert_eq!(back, other);
}

#[test]
fn throttles_but_never_fails_when_backend_is_down() {
    let rig = Rig::new();
    let volume = rig.create(256, 4, 1, 8 * CS as u64);
    rig.store.set_failing(true);
    let mut throttled = 0;
    for i in 0..64u64 {
        let outcome = volume
            .write(i * CS as u64, &pattern(CS, i as u8), false)
            .unwrap();
        throttled += u32::from(outcome.throttle.is_some());
        if i % 8 == 7 {
            let err = volume.upload_one().unwrap_err();
            assert!(err.to_string().contains("backend unreachable"), "{err}");
        }
    }
    assert!(throttled > 0);
    let info = volume.info();
    assert!(info.throttling);
    assert!(info.throttled_writes >= u64::from(throttled));
    assert!(info
        .last_upload_error
        .as_deref()
        .unwrap_or("")
        .contains("unreachable"));
    volume.flush().unwrap();
    // Backend back: everything drains, throttling stops, nothing was lost.
    rig.store.set_failing(false);
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    let info = volume.info();
    assert!(!info.throttling);
    assert!(info.last_upload_error.is_none());
    for i in 0..64u64 {
        let mut back = vec![0u8; CS];
        volume.read(i * CS as u64, &mut back).unwrap();
        assert_eq!(back, pattern(CS, i as u8), "cluster {i}");
    }
}

#[test]
fn evicted_scos_are_read_back_with_ranged_backend_reads() {
    let rig = Rig::new();
    let volume = rig.create(64, 8, 1, 1 << 30);
    let data = pattern(32 * CS, 9);
    volume.write(0, &data, false).unwrap();
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    let (local, disposable) = volume.local_bytes();
    assert_eq!(local, disposable);
    let freed = volume.evict(u64::MAX);
    assert_eq!(freed, local);
    assert_eq!(std::fs::read_dir(sco_dir(&rig.dir)).unwrap().count(), 0);
    let mut part = vec![0u8; 3 * 512];
    volume.read(5 * CS as u64 + 512, &mut part).unwrap();
    assert_eq!(part, data[5 * CS + 512..5 * CS + 512 + 3 * 512]);
    assert_eq!(read_all(&volume)[..data.len()], data[..]);
    assert!(volume.info().backend_reads > 0);
    // A restart does not need the evicted SCOs locally either.
    drop(volume);
    let volume = rig.open();
    assert_eq!(read_all(&volume)[..data.len()], data[..]);
}

/// One read of clusters scattered over several evicted SCOs fetches the pieces that lie
/// together in one SCO by one ranged get, the SCOs concurrently, and puts every byte in its
/// place; a piece that cannot be read fails the read.
#[test]
fn scattered_backend_pieces_of_one_read_are_fetched_concurrently() {
    scattered_backend_read(false);
}

/// The same on a volume encrypted at rest, with reads that start and end inside clusters:
/// the pieces of one get are decrypted each with its own clusters' tweaks.
#[test]
fn scattered_backend_pieces_of_an_encrypted_volume_decrypt_in_their_places() {
    scattered_backend_read(true);
}

/// A volume of 64 clusters in SCOs of 8, encrypted at rest if `encrypted`.
fn small_volume(rig: &Rig, encrypted: bool) -> Arc<Volume> {
    if !encrypted {
        return rig.create(64, 8, 1, 1 << 30);
    }
    let key = rig._tmp.path().join("volume.key");
    std::fs::write(&key, [0x42; 32]).unwrap();
    let options = VolumeOptions {
        encryption_key_file: Some(key),
        ..VolumeOptions::new(64 * CS as u64)
    };
    let mut config = VolumeConfig::new("vol", &options, 0).unwrap();
    config.sco_clusters = 8;
    config.tlog_scos = 1;
    config.write_buffer = 1 << 30;
    Volume::create_on(rig.fs(), &rig.dir, rig.store.clone(), config).expect("create volume")
}

/// Clusters of one SCO with gaps between them are fetched by one get where the store says
/// reading across the gaps is cheaper than more requests (`read_gap`: S3, EC), and one by one
/// where it does not (a local directory); the bytes are the same either way, encrypted or not.
#[test]
fn nearby_pieces_of_one_sco_share_a_get_where_the_store_says_so() {
    for encrypted in [false, true] {
        let rig = Rig::new();
        let volume = small_volume(&rig, encrypted);
        // Clusters 0..16 fill SCOs A and B in order; the odd ones are then overwritten into
        // SCO C. A read of 0..16 wants every other cluster of A and of B (gaps of one cluster)
        // and all of C (adjacent there, though not in the volume).
        let mut data = pattern(16 * CS, 33);
        for cluster in 0..16 {
            let at = cluster * CS;
            volume.write(at as u64, &data[at..at + CS], false).unwrap();
        }
        let odd = pattern(16 * CS, 77);
        for cluster in (1..16).step_by(2) {
            let at = cluster * CS;
            data[at..at + CS].copy_from_slice(&odd[at..at + CS]);
            volume.write(at as u64, &odd[at..at + CS], false).unwrap();
        }
        volume.close_current_tlog().unwrap();
        volume.drain_uploads().unwrap();
        assert!(volume.evict(u64::MAX) > 0);
        for (gap, gets) in [(0, 4 + 4 + 1), (128 * 1024, 3)] {
            rig.store.set_read_gap(gap);
            let before = volume.info().backend_reads;
            let mut back = vec![0u8; 16 * CS];
            volume.read(0, &mut back).unwrap();
            assert!(
                back == data,
                "gap {gap}, encrypted {encrypted}: other bytes read back"
            );
            assert_eq!(
                volume.info().backend_reads - before,
                gets,
                "gap {gap}, encrypted {encrypted}"
            );
            // Starting and ending inside clusters.
            let (from, to) = (CS + 1536, 15 * CS - 512);
            let mut part = vec![0u8; to - from];
            volume.read(from as u64, &mut part).unwrap();
            assert!(
                part == data[from..to],
                "gap {gap}, encrypted {encrypted}: unaligned read"
            );
        }
    }
}

fn scattered_backend_read(encrypted: bool) {
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    let rig = Rig::new();
    let volume = small_volume(&rig, encrypted);
    // Clusters 0, 4, 8, ... fill the first SCO, 1, 5, 9, ... the second, and so on: every two
    // neighbours of the volume live in different SCOs, so a read of 0..32 has 32 pieces.
    let data = pattern(32 * CS, 21);
    for first in 0..4 {
        for cluster in (first..32).step_by(4) {
            let at = cluster * CS;
            volume.write(at as u64, &data[at..at + CS], false).unwrap();
        }
    }
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    assert!(volume.evict(u64::MAX) > 0);
    let reads_before = volume.info().backend_reads;

    // The first ranged get waits (up to 10 s) for a second one to start while it waits: only a
    // read that has two in flight at once gets past it without the wait.
    #[derive(Default)]
    struct Probe {
        first_taken: bool,
        first_waiting: bool,
        overlapped: bool,
    }
    let probe = Arc::new((Mutex::new(Probe::default()), Condvar::new()));
    rig.store.on_call(Some(Arc::new({
        let probe = probe.clone();
        move |op: &str| {
            if op != "get_range" {
                return;
            }
            let (state, changed) = &*probe;
            let mut st = state.lock().unwrap();
            if st.first_taken {
                if st.first_waiting {
                    st.overlapped = true;
                    changed.notify_all();
                }
                return;
            }
            st.first_taken = true;
            st.first_waiting = true;
            let (mut st, _) = changed
                .wait_timeout_while(st, Duration::from_secs(10), |st| !st.overlapped)
                .unwrap();
            st.first_waiting = false;
        }
    })));
    let mut back = vec![0u8; 32 * CS];
    volume.read(0, &mut back).unwrap();
    assert!(back == data, "the scattered read returned other bytes");
    assert!(
        probe.0.lock().unwrap().overlapped,
        "no two backend pieces of the read were in flight at once"
    );
    // Each SCO holds 8 of the read's clusters side by side: one get per SCO, not per cluster.
    assert_eq!(volume.info().backend_reads - reads_before, 4);
    rig.store.on_call(None);
    // A read that starts and ends inside clusters: every byte still lands in its place.
    let (from, to) = (3 * CS + 512, 29 * CS - 1024);
    let mut part = vec![0u8; to - from];
    volume.read(from as u64, &mut part).unwrap();
    assert!(
        part == data[from..to],
        "the unaligned scattered read returned other bytes"
    );

    // One SCO gone from the backend: the read fails (and names the volume); pieces in the
    // other SCOs still read back.
    let mut scos: Vec<String> = rig
        .store
        .list("vol")
        .unwrap()
        .into_iter()
        .filter(|n| vstor_volumedriver::ScoName::parse(n).is_some())
        .collect();
    scos.sort();
    assert_eq!(scos.len(), 4, "{scos:?}");
    rig.store.delete("vol", &scos[1]).unwrap();
    let err = volume.read(0, &mut back).unwrap_err();
    assert!(err.to_string().contains("vol"), "{err}");
    let mut first = vec![0u8; CS];
    volume.read(0, &mut first).unwrap();
    assert_eq!(first, data[..CS]);
}

/// Watches a volume from inside every backend call: another thread must get through a call
/// that takes the volume's state lock (`size`), or the backend call holds it.
struct LockProbe {
    target: Arc<std::sync::Mutex<std::sync::Weak<Volume>>>,
    calls: Arc<std::sync::Mutex<Vec<String>>>,
    blocked: Arc<std::sync::Mutex<Vec<String>>>,
}

impl LockProbe {
    fn install(rig: &Rig, volume: &Arc<Volume>) -> Self {
        let probe = Self {
            target: Arc::new(std::sync::Mutex::new(Arc::downgrade(volume))),
            calls: Arc::default(),
            blocked: Arc::default(),
        };
        let (target, calls, blocked) = (
            probe.target.clone(),
            probe.calls.clone(),
            probe.blocked.clone(),
        );
        rig.store.on_call(Some(Arc::new(move |operation: &str| {
            let Some(volume) = target.lock().unwrap().upgrade() else {
                return;
            };
            calls.lock().unwrap().push(operation.to_string());
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(volume.size());
            });
            if rx.recv_timeout(std::time::Duration::from_secs(10)).is_err() {
                blocked.lock().unwrap().push(operation.to_string());
            }
        })));
        probe
    }

    fn calls(&self, operation: &str) -> usize {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|c| *c == operation).count()
    }

    fn blocked(&self) -> Vec<String> {
        self.blocked.lock().unwrap().clone()
    }
}

impl Drop for LockProbe {
    fn drop(&mut self) {
        *self.target.lock().unwrap() = std::sync::Weak::new();
    }
}

/// A read-modify-write of a partial cluster whose data is only on the backend (write, discard,
/// allocating WRITE_ZEROES) reads it without holding the volume's state lock.
#[test]
fn partial_cluster_rewrites_read_the_backend_without_the_state_lock() {
    let rig = Rig::new();
    let volume = rig.create(64, 8, 1, 1 << 30);
    let mut expected = pattern(8 * CS, 3);
    volume.write(0, &expected, false).unwrap();
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    volume.evict(u64::MAX);
    assert_eq!(std::fs::read_dir(sco_dir(&rig.dir)).unwrap().count(), 0);

    let probe = LockProbe::install(&rig, &volume);
    let patch = pattern(1024, 77);
    volume.write(CS as u64 + 512, &patch, false).unwrap();
    expected[CS + 512..CS + 1536].copy_from_slice(&patch);
    volume.discard(3 * CS as u64 + 1024, 2048).unwrap();
    expected[3 * CS + 1024..3 * CS + 3072].fill(0);
    volume
        .write_zeroes(5 * CS as u64 + 2048, 1024, true, false)
        .unwrap();
    expected[5 * CS + 2048..5 * CS + 3072].fill(0);

    assert!(
        probe.calls("get_range") >= 3,
        "each rewrite read the backend"
    );
    assert_eq!(
        probe.blocked(),
        Vec::<String>::new(),
        "backend calls under the state lock"
    );
    drop(probe);
    assert_eq!(read_all(&volume)[..expected.len()], expected[..]);
    volume.flush().unwrap();
    drop(volume);
    assert_eq!(read_all(&rig.open())[..expected.len()], expected[..]);
}

/// Uploads (SCO, TLog, list puts), snapshot metadata puts, configuration changes, backend reads,
/// scrub and sweep all do their backend I/O without holding the volume's state lock.
#[test]
fn backend_calls_never_hold_the_state_lock() {
    let rig = Rig::new();
    let volume = rig.create(64, 4, 2, 1 << 30);
    let probe = LockProbe::install(&rig, &volume);
    let mut expected = pattern(16 * CS, 5);
    volume.write(0, &expected, false).unwrap();
    volume.flush().unwrap();
    volume.snapshot_create("one").unwrap();
    volume.drain_uploads().unwrap();
    // Overwrites make garbage for the scrub.
    let again = pattern(8 * CS, 6);
    volume.write(0, &again, true).unwrap();
    expected[..again.len()].copy_from_slice(&again);
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    volume.resize(128 * CS as u64).unwrap();
    volume.set_read_only(true).unwrap();
    volume.set_read_only(false).unwrap();
    volume.snapshot_delete("one").unwrap();
    volume.drain_uploads().unwrap();
    volume.evict(u64::MAX);
    assert_eq!(read_all(&volume)[..expected.len()], expected[..]);
    let report = volume.scrub(None, &mut |_| {}).unwrap();
    // It rewrote TLogs, so its list commit ran too.
    assert!(report.tlogs_after < report.tlogs_before, "{report:?}");
    volume.sweep().unwrap();

    for operation in ["put_file", "put_if_owner", "get", "get_range", "list"] {
        assert!(probe.calls(operation) > 0, "no {operation} observed");
    }
    assert_eq!(
        probe.blocked(),
        Vec::<String>::new(),
        "backend calls under the state lock"
    );
    drop(probe);
    assert_eq!(volume.size(), 128 * CS as u64);
    assert_eq!(read_all(&volume)[..expected.len()], expected[..]);
    drop(volume);
    assert_eq!(read_all(&rig.open())[..expected.len()], expected[..]);
}

/// `write_may_read_backend` says which writes and trims will read a partly covered cluster from
/// the backend first (a frontend runs those off its runtime's worker), and asking reads nothing.
#[test]
fn writes_that_will_read_the_backend_are_known_beforehand() {
    let rig = Rig::new();
    let volume = rig.create(64, 8, 1, 1 << 30);
    let cold = pattern(16 * CS, 5);
    volume.write(0, &cold, false).unwrap();
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    assert!(volume.evict(u64::MAX) > 0);
    volume
        .write(32 * CS as u64, &pattern(4 * CS, 6), false)
        .unwrap();
    rig.store
        .delay_reads(std::time::Duration::from_millis(1), |_, _| true);
    let cs = CS as u64;
    for (offset, len, expected, why) in [
        (0, cs, false, "whole evicted cluster: nothing to read"),
        (0, 4 * cs, false, "whole evicted clusters"),
        (512, 512, true, "inside an evicted cluster"),
        (cs - 512, 1024, true, "across two evicted clusters"),
        (2 * cs, cs + 512, true, "ends inside an evicted cluster"),
        (
            15 * cs + 512,
            cs,
            true,
            "starts inside the last evicted cluster",
        ),
        (16 * cs + 512, 512, false, "inside a cluster never written"),
        (32 * cs + 512, 512, false, "inside a local cluster"),
        (33 * cs - 512, 1024, false, "across two local clusters"),
        (
            63 * cs + 512,
            cs,
            false,
            "out of range: the write fails at once",
        ),
    ] {
        assert_eq!(
            volume.write_may_read_backend(offset, len),
            expected,
            "{offset}+{len}: {why}"
        );
    }
    assert_eq!(rig.store.delayed_reads(), 0, "asking reads nothing");
    // And a write it named does read the backend, then merges.
    volume.write(512, &[0xEE; 512], false).unwrap();
    assert!(rig.store.delayed_reads() >= 1);
    let mut buf = vec![0u8; CS];
    volume.read(0, &mut buf).unwrap();
    assert_eq!(buf[..512], cold[..512]);
    assert_eq!(buf[512..1024], [0xEE; 512]);
    assert_eq!(buf[1024..], cold[1024..CS]);
}

#[test]
fn try_read_serves_local_data_and_refuses_backend_reads_without_touching_the_backend() {
    let rig = Rig::new();
    let volume = rig.create(64, 8, 1, 1 << 30);
    let cold = pattern(16 * CS, 3);
    volume.write(0, &cold, false).unwrap();
    volume.snapshot_create("snap").unwrap();
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    assert!(volume.evict(u64::MAX) > 0);
    let hot = pattern(4 * CS, 4);
    volume.write(32 * CS as u64, &hot, false).unwrap();
    // Every ranged backend read from now on is counted (and would take 1 ms).
    rig.store
        .delay_reads(std::time::Duration::from_millis(1), |_, _| true);

    let mut buf = vec![0u8; 4 * CS];
    assert_eq!(
        volume.try_read(32 * CS as u64, &mut buf).unwrap(),
        ReadAttempt::Done
    );
    assert_eq!(buf, hot);
    assert_eq!(
        volume.try_read(48 * CS as u64, &mut buf).unwrap(),
        ReadAttempt::Done
    );
    assert_eq!(buf, vec![0u8; 4 * CS], "unwritten reads as zeros");
    assert_eq!(
        volume.try_read(28 * CS as u64 - 512, &mut buf).unwrap(),
        ReadAttempt::Done,
        "zeros and local data only"
    );
    // One evicted cluster in the range is enough to refuse it.
    assert_eq!(
        volume.try_read(15 * CS as u64, &mut buf).unwrap(),
        ReadAttempt::WouldBlock
    );
    let view = volume.snapshot_view("snap").unwrap();
    assert_eq!(view.try_read(0, &mut buf).unwrap(), ReadAttempt::WouldBlock);
    assert_eq!(
        view.try_read(32 * CS as u64, &mut buf).unwrap(),
        ReadAttempt::Done
    );
    assert_eq!(
        buf,
        vec![0u8; 4 * CS],
        "not written when the snapshot was taken"
    );
    assert_eq!(
        rig.store.delayed_reads(),
        0,
        "try_read never reads the backend"
    );
    assert!(matches!(
        volume.try_read(63 * CS as u64, &mut buf),
        Err(VolumeError::OutOfRange { .. })
    ));

    // `read` gets what `try_read` refused.
    volume.read(15 * CS as u64, &mut buf).unwrap();
    assert_eq!(buf[..CS], cold[15 * CS..]);
    assert_eq!(buf[CS..], vec![0u8; 3 * CS][..]);
    view.read(0, &mut buf).unwrap();
    assert_eq!(buf, cold[..4 * CS]);
    assert!(rig.store.delayed_reads() >= 2);
}

#[test]
fn fenced_volume_halts_instead_of_overwriting_the_new_owner() {
    let rig = Rig::new();
    let volume = rig.create(64, 4, 1, 1 << 30);
    volume.write(0, &pattern(4 * CS, 1), false).unwrap();
    rig.store.claim("vol", 2).unwrap();
    let err = volume.upload_one().unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
    assert!(!rig.store.exists("vol", "00_00000001_00").unwrap());
    assert!(matches!(
        volume.read(0, &mut [0u8; 512]),
        Err(VolumeError::Halted { .. })
    ));
}

#[test]
fn corrupt_backend_tlog_is_reported_on_restart() {
    let rig = Rig::new();
    let volume = rig.create(64, 4, 1, 1 << 30);
    volume.write(0, &pattern(4 * CS, 1), false).unwrap();
    volume.drain_uploads().unwrap();
    drop(volume);
    // Replace the TLog with garbage (a valid backend object whose content is not a TLog).
    rig.store
        .put("vol", "tlog_0000000000000001", b"not a tlog at all")
        .unwrap();
    std::fs::remove_dir_all(&rig.dir).unwrap();
    let err = Volume::open(&rig.dir, rig.store.clone(), "vol")
        .err()
        .expect("must fail");
    assert!(
        err.to_string()
            .contains("backend TLog tlog_0000000000000001 is corrupt"),
        "{err}"
    );
    let err = Volume::open(&rig.dir.with_file_name("other"), rig.store.clone(), "other")
        .err()
        .expect("must fail");
    assert!(matches!(err, VolumeError::NotFound { .. }), "{err}");
}

#[test]
fn crash_keeps_flushed_and_fua_writes() {
    let rig = Rig::new();
    let volume = rig.create(64, 4, 2, 1 << 30);
    volume.write(0, &pattern(3 * CS, 1), false).unwrap();
    volume.flush().unwrap();
    volume.write(8 * CS as u64, &pattern(CS, 2), true).unwrap(); // FUA
    volume
        .write(20 * CS as u64, &pattern(CS, 3), false)
        .unwrap(); // never flushed
    drop(volume); // kill -9
    let volume = rig.open();
    let mut back = vec![0u8; 3 * CS];
    volume.read(0, &mut back).unwrap();
    assert_eq!(back, pattern(3 * CS, 1));
    let mut one = vec![0u8; CS];
    volume.read(8 * CS as u64, &mut one).unwrap();
    assert_eq!(one, pattern(CS, 2));
    volume.read(20 * CS as u64, &mut one).unwrap();
    assert!(one == pattern(CS, 3) || one.iter().all(|b| *b == 0));
    // The recovered TLog and its SCO reach the backend normally.
    volume.drain_uploads().unwrap();
    assert!(volume.info().tlogs_on_backend >= 1);
}

#[test]
fn power_loss_before_sco_data_reached_disk_falls_back_to_the_last_flush() {
    let rig = Rig::new();
    let volume = rig.create(64, 4, 1, 1 << 30);
    volume.write(0, &pattern(2 * CS, 1), false).unwrap();
    volume.flush().unwrap();
    // Two more clusters fill the SCO: it is sealed and its TLog closed, but nothing is fsynced.
    volume
        .write(2 * CS as u64, &pattern(2 * CS, 2), false)
        .unwrap();
    assert_eq!(volume.pending_uploads(), 2, "SCO and TLog queued");
    drop(volume);
    // The page cache never wrote the unflushed clusters: on disk their blocks hold stale bytes.
    let path = sco_dir(&rig.dir).join("00_00000001_00");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096 + 2 * CS..].fill(0xee);
    std::fs::write(&path, &bytes).unwrap();

    let volume = rig.open();
    let all = read_all(&volume);
    assert_eq!(
        &all[..2 * CS],
        &pattern(2 * CS, 1)[..],
        "flushed clusters survive"
    );
    assert!(
        all[2 * CS..].iter().all(|b| *b == 0),
        "unflushed clusters read as before"
    );
    // The recovered TLog uploads cleanly and the volume keeps working.
    volume.drain_uploads().unwrap();
    volume.write(0, &pattern(CS, 3), true).unwrap();
    drop(volume);
    std::fs::remove_dir_all(&rig.dir).unwrap();
    let volume = rig.open();
    let mut first = vec![0u8; CS];
    volume.read(0, &mut first).unwrap();
    // Cluster 0 was rewritten with FUA but its TLog is still open locally, which is gone now:
    // from the backend alone we see the uploaded state.
    assert_eq!(first, pattern(2 * CS, 1)[..CS]);
}

#[test]
fn discard_and_block_status() {
    let rig = Rig::new();
    let volume = rig.create(1024, 64, 1, 1 << 30);
    volume.write(0, &pattern(16 * CS, 4), false).unwrap();
    volume.discard(4 * CS as u64 + 512, 4 * CS as u64).unwrap();
    let all = read_all(&volume);
    let mut expect = pattern(16 * CS, 4);
    expect[4 * CS + 512..8 * CS + 512].fill(0);
    assert_eq!(&all[..16 * CS], &expect[..]);
    let runs = volume.block_status(0, volume.size()).unwrap();
    assert_eq!(
        runs,
        vec![
            (5 * CS as u64, false),
            (3 * CS as u64, true),
            (8 * CS as u64, false),
            ((1024 - 16) * CS as u64, true)
        ]
    );
    volume
        .write_zeroes(10 * CS as u64, 2 * CS as u64, true, false)
        .unwrap();
    assert_eq!(
        volume.block_status(10 * CS as u64, CS as u64).unwrap(),
        vec![(CS as u64, false)]
    );
    let runs = volume.block_status(512, 1024).unwrap();
    assert_eq!(runs, vec![(1024, false)]);
}

#[test]
fn read_only_volumes_refuse_writes_and_stay_read_only_across_restarts() {
    let rig = Rig::new();
    let volume = rig.create(64, 4, 1, 1 << 30);
    volume.write(0, &pattern(CS, 1), false).unwrap();
    volume.set_read_only(true).unwrap();
    assert!(matches!(
        volume.write(0, &pattern(CS, 2), false),
        Err(VolumeError::ReadOnly { .. })
    ));
    assert!(matches!(
        volume.discard(0, CS as u64),
        Err(VolumeError::ReadOnly { .. })
    ));
    let mut back = vec![0u8; CS];
    volume.read(0, &mut back).unwrap();
    assert_eq!(back, pattern(CS, 1));
    volume.flush().unwrap();
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    drop(volume);
    std::fs::remove_dir_all(&rig.dir).unwrap();
    let volume = rig.open();
    assert!(
        volume.read_only(),
        "read-only survives a restart from the backend"
    );
    volume.set_read_only(false).unwrap();
    volume.write(0, &pattern(CS, 3), false).unwrap();
}

#[test]
fn restart_from_backend_alone_after_clean_stop() {
    let rig = Rig::new();
    let volume = rig.create(128, 4, 2, 1 << 30);
    for i in 0..40u64 {
        volume
            .write(i * 3 * 512, &pattern(1536, i as u8), false)
            .unwrap();
    }
    volume.discard(10 * CS as u64, 8 * CS as u64).unwrap();
    let before = read_all(&volume);
    volume.flush().unwrap();
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    volume.resize(256 * CS as u64).unwrap();
    drop(volume);
    std::fs::remove_dir_all(&rig.dir).unwrap();
    let volume = rig.open();
    assert_eq!(volume.size(), 256 * CS as u64);
    let after = read_all(&volume);
    assert_eq!(&after[..before.len()], &before[..]);
    assert!(after[before.len()..].iter().all(|b| *b == 0));
    // And it keeps working: new writes get fresh SCO numbers.
    volume.write(0, &pattern(CS, 77), false).unwrap();
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    let names = rig.store.list("vol").unwrap();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("tlog_")).count(),
        volume.info().tlogs_on_backend
    );
}

// ------------------------------------------------------------------ model-based property test

/// What a power cut interrupts: it fires at the `after`-th write-buffer operation that changes
/// something (see `SimFs::cut_power_after`), or right after the operation if it needs fewer.
#[derive(Debug, Clone, Copy)]
enum During {
    Flush,
    Upload(u8),
    Snapshot,
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        seed: u8,
        fua: bool,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Zero {
        sector: u64,
        sectors: u64,
        allocate: bool,
    },
    Flush,
    Upload(u8),
    Evict,
    Snapshot,
    Crash,
    /// Lose power (a torn cut keeps a prefix of each file's unsynced writes), then restart.
    PowerCut {
        torn: Option<u64>,
    },
    /// Lose power in the middle of an operation, then restart.
    CutDuring {
        what: During,
        after: u8,
        torn: Option<u64>,
    },
    CleanRestart,
    BackendRestart,
}

const CLUSTERS: u64 = 48;
const SECTORS: u64 = CLUSTERS * 8;
/// Clusters of a large write: the smallest that copies its data without the volume lock.
const BIG: u64 = 32;

fn arb_op() -> impl Strategy<Value = Op> {
    let range = (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(40)));
    let during = prop_oneof![
        Just(During::Flush),
        (1u8..4).prop_map(During::Upload),
        Just(During::Snapshot),
    ];
    prop_oneof![
        8 => (range.clone(), any::<u8>(), prop::bool::weighted(0.1)).prop_map(|((sector, sectors), seed, fua)| Op::Write { sector, sectors, seed, fua }),
        // Large cluster-aligned writes reserve under the lock and copy after it (`inflight`).
        2 => (0..=CLUSTERS - BIG, any::<u8>(), prop::bool::weighted(0.1)).prop_map(|(cluster, seed, fua)| Op::Write { sector: cluster * 8, sectors: BIG * 8, seed, fua }),
        2 => range.clone().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        1 => (range, any::<bool>()).prop_map(|((sector, sectors), allocate)| Op::Zero { sector, sectors, allocate }),
        2 => Just(Op::Flush),
        2 => (1u8..6).prop_map(Op::Upload),
        1 => Just(Op::Evict),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Crash),
        2 => proptest::option::of(any::<u64>()).prop_map(|torn| Op::PowerCut { torn }),
        2 => (during, 0u8..12, proptest::option::of(any::<u64>()))
            .prop_map(|(what, after, torn)| Op::CutDuring { what, after, torn }),
        1 => Just(Op::CleanRestart),
        1 => Just(Op::BackendRestart),
    ]
}

/// A snapshot as the client took it: its content then, and what its clusters may hold if no
/// FLUSH completed after it (a power cut may then lose the snapshot, or keep it with the
/// clusters its TLogs still describe).
struct ModelSnapshot {
    name: String,
    image: Vec<u8>,
    durable_then: Vec<u8>,
    since_flush_then: HashMap<usize, Vec<Vec<u8>>>,
    /// A FLUSH completed after it was taken: it must survive, exactly.
    flushed: bool,
}

/// The disk as the client should see it, plus what may legitimately be seen after a crash or
/// a power cut: every cluster changed since the last completed flush may hold any version it
/// had since then; everything else holds exactly what the flush made durable.
struct Model {
    current: Vec<u8>,
    durable: Vec<u8>,
    since_flush: HashMap<usize, Vec<Vec<u8>>>,
    snapshots: Vec<ModelSnapshot>,
    next_snapshot: u32,
}

impl Model {
    fn changed(&mut self, start: usize, len: usize) {
        for cluster in start / CS..(start + len).div_ceil(CS) {
            let version = self.current[cluster * CS..(cluster + 1) * CS].to_vec();
            self.since_flush.entry(cluster).or_default().push(version);
        }
    }

    fn flushed(&mut self) {
        self.durable = self.current.clone();
        self.since_flush.clear();
        for snapshot in &mut self.snapshots {
            snapshot.flushed = true;
        }
    }

    fn snapshot_taken(&mut self, name: String) {
        self.snapshots.push(ModelSnapshot {
            name,
            image: self.current.clone(),
            durable_then: self.durable.clone(),
            since_flush_then: self.since_flush.clone(),
            flushed: false,
        });
    }
}

/// Whether cluster `cluster` of `got` is one the model allows: exactly `durable`'s, or any
/// version `since_flush` recorded for it.
fn allowed(
    got: &[u8],
    durable: &[u8],
    since_flush: &HashMap<usize, Vec<Vec<u8>>>,
    cluster: usize,
) -> bool {
    let got = &got[cluster * CS..(cluster + 1) * CS];
    got == &durable[cluster * CS..(cluster + 1) * CS]
        || since_flush
            .get(&cluster)
            .is_some_and(|versions| versions.iter().any(|v| v == got))
}

/// After a crash or power cut and restart: every cluster holds what the last completed flush
/// made durable or a version written since (never anything else), and every snapshot a flush
/// made durable is there with exactly its content; one taken since may be gone, or hold the
/// clusters its TLogs kept.
fn check_after_restart(
    model: &mut Model,
    volume: &Arc<Volume>,
    step: usize,
) -> Result<(), TestCaseError> {
    let actual = read_all(volume);
    for cluster in 0..CLUSTERS as usize {
        prop_assert!(
            allowed(&actual, &model.durable, &model.since_flush, cluster),
            "step {}: cluster {} holds content that was never written there",
            step,
            cluster
        );
    }
    // What the volume shows now is one of the allowed versions; later crashes may still show
    // any of them until the next flush.
    model.current = actual;
    let names: Vec<String> = volume.snapshots().into_iter().map(|s| s.name).collect();
    for snapshot in &mut model.snapshots {
        let present = names.contains(&snapshot.name);
        prop_assert!(
            present || !snapshot.flushed,
            "step {}: flushed snapshot {} is gone",
            step,
            snapshot.name
        );
        if !present {
            continue;
        }
        let view = volume.snapshot_view(&snapshot.name).unwrap();
        let mut content = vec![0u8; snapshot.image.len()];
        view.read(0, &mut content).unwrap();
        if snapshot.flushed {
            prop_assert!(
                content == snapshot.image,
                "step {}: snapshot {} differs from what was snapshotted",
                step,
                snapshot.name
            );
        } else {
            for cluster in 0..CLUSTERS as usize {
                prop_assert!(
                    content[cluster * CS..(cluster + 1) * CS]
                        == snapshot.image[cluster * CS..(cluster + 1) * CS]
                        || allowed(
                            &content,
                            &snapshot.durable_then,
                            &snapshot.since_flush_then,
                            cluster
                        ),
                    "step {}: snapshot {} cluster {} holds content never written there",
                    step,
                    snapshot.name,
                    cluster
                );
            }
            // That is the snapshot now: the next flush makes exactly this durable.
            snapshot.image = content;
        }
    }
    model.snapshots.retain(|s| names.contains(&s.name));
    // A snapshot that survived a restart may still be lost by a later cut, unless a flush
    // made it durable; the same name is never taken again.
    prop_assert!(
        names.len() == model.snapshots.len(),
        "step {}: snapshots {:?} appeared that were never taken",
        step,
        names
    );
    Ok(())
}

fn run_model(ops: Vec<Op>, sim: bool) -> Result<(), TestCaseError> {
    let rig = if sim { Rig::simulated() } else { Rig::new() };
    let mut volume = rig.create(CLUSTERS, 4, 2, 8 * CS as u64);
    let size = (CLUSTERS * CS as u64) as usize;
    let mut model = Model {
        current: vec![0; size],
        durable: vec![0; size],
        since_flush: HashMap::new(),
        snapshots: Vec::new(),
        next_snapshot: 0,
    };
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Write {
                sector,
                sectors,
                seed,
                fua,
            } => {
                let data = pattern((sectors * 512) as usize, seed);
                let at = (sector * 512) as usize;
                volume.write(at as u64, &data, fua).unwrap();
                model.current[at..at + data.len()].copy_from_slice(&data);
                model.changed(at, data.len());
                if fua {
                    model.flushed();
                }
            }
            Op::Discard { sector, sectors }
            | Op::Zero {
                sector,
                sectors,
                allocate: false,
            } => {
                let (at, len) = ((sector * 512) as usize, (sectors * 512) as usize);
                volume.discard(at as u64, len as u64).unwrap();
                model.current[at..at + len].fill(0);
                model.changed(at, len);
            }
            Op::Zero {
                sector,
                sectors,
                allocate: true,
            } => {
                let (at, len) = ((sector * 512) as usize, (sectors * 512) as usize);
                volume
                    .write_zeroes(at as u64, len as u64, true, false)
                    .unwrap();
                model.current[at..at + len].fill(0);
                model.changed(at, len);
            }
            Op::Flush => {
                volume.flush().unwrap();
                model.flushed();
            }
            Op::Upload(steps) => {
                for _ in 0..steps {
                    volume.upload_one().unwrap();
                }
            }
            Op::Evict => {
                volume.evict(u64::MAX);
            }
            Op::Snapshot => {
                let name = format!("s{}", model.next_snapshot);
                model.next_snapshot += 1;
                volume.snapshot_create(&name).unwrap();
                model.snapshot_taken(name);
            }
            Op::Crash | Op::PowerCut { .. } | Op::CutDuring { .. } => {
                let how = |torn: Option<u64>| torn.map_or(PowerCut::Clean, PowerCut::Torn);
                match op {
                    Op::PowerCut { torn } => {
                        drop(volume);
                        rig.power_cut(how(torn));
                    }
                    Op::CutDuring { what, after, torn } => {
                        if let Some(sim) = &rig.sim {
                            sim.cut_power_after(u64::from(after), how(torn));
                        }
                        // Whatever fails once the power is gone is not acknowledged.
                        match what {
                            During::Flush => {
                                if volume.flush().is_ok() {
                                    model.flushed();
                                }
                            }
                            During::Upload(steps) => {
                                for _ in 0..steps {
                                    if !matches!(volume.upload_one(), Ok(true)) {
                                        break;
                                    }
                                }
                            }
                            During::Snapshot => {
                                let name = format!("s{}", model.next_snapshot);
                                model.next_snapshot += 1;
                                // Taken or not, it may survive: the model allows both.
                                let _ = volume.snapshot_create(&name);
                                model.snapshot_taken(name);
                            }
                        }
                        drop(volume);
                        let fired = rig.sim.as_ref().is_some_and(|sim| sim.power_on());
                        if !fired {
                            rig.power_cut(how(torn));
                        }
                    }
                    _ => drop(volume), // kill -9: every file write survives
                }
                volume = rig.open();
                check_after_restart(&mut model, &volume, step)?;
                continue;
            }
            Op::CleanRestart | Op::BackendRestart => {
                volume.flush().unwrap();
                volume.close_current_tlog().unwrap();
                volume.drain_uploads().unwrap();
                model.flushed();
                drop(volume);
                if matches!(op, Op::BackendRestart) {
                    rig.fs().remove_dir_all(&rig.dir).unwrap();
                }
                volume = rig.open();
            }
        }
        let actual = read_all(&volume);
        prop_assert!(
            actual == model.current,
            "step {}: volume differs from the model",
            step
        );
        for (len, hole) in volume
            .block_status(0, size as u64)
            .unwrap()
            .into_iter()
            .scan(0u64, |pos, (len, hole)| {
                let start = *pos;
                *pos += len;
                Some((start..start + len, hole))
            })
        {
            if hole {
                prop_assert!(model.current[len.start as usize..len.end as usize]
                    .iter()
                    .all(|b| *b == 0));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    /// Three cases in four run on a simulated write buffer (`SimFs`), where power cuts lose
    /// unsynced writes or tear them; the rest on the real file system, where a power cut
    /// degrades to `kill -9`.
    #[test]
    fn engine_matches_model_across_crashes_and_restarts(
        ops in proptest::collection::vec(arb_op(), 1..60),
        sim in prop::bool::weighted(0.75),
    ) {
        run_model(ops, sim)?;
    }
}

#[test]
fn upload_queue_names_tasks() {
    let rig = Rig::new();
    let volume = rig.create(64, 4, 1, 1 << 30);
    volume.write(0, &pattern(4 * CS, 1), false).unwrap();
    assert_eq!(volume.pending_uploads(), 2);
    assert_eq!(
        UploadTask::Sco(vstor_volumedriver::ScoNumber(1)),
        UploadTask::Sco(vstor_volumedriver::ScoNumber(1))
    );
}

/// Regression (found by the power-cut model test): an uploaded SCO's write-buffer copy stays as
/// a cache that restart keeps and reads from, so it must be complete after a power cut even if
/// no FLUSH covered its last clusters.
#[test]
fn an_uploaded_scos_cached_copy_survives_a_power_cut_complete() {
    let rig = Rig::simulated();
    let volume = rig.create(64, 4, 1, 1 << 30);
    volume.write(0, &pattern(2 * CS, 1), true).unwrap();
    // Fills the SCO (sealed, TLog closed), never flushed.
    volume
        .write(2 * CS as u64, &pattern(2 * CS, 2), false)
        .unwrap();
    volume.drain_uploads().unwrap();
    drop(volume);
    rig.power_cut(PowerCut::Clean);
    let volume = rig.open();
    let mut back = vec![0u8; 4 * CS];
    volume.read(0, &mut back).unwrap();
    assert_eq!(&back[..2 * CS], &pattern(2 * CS, 1)[..]);
    assert_eq!(&back[2 * CS..], &pattern(2 * CS, 2)[..]);
}

/// Regression (found by the power-cut model test): a snapshot a `kill -9` left only in the page
/// cache, seen again at restart, is made durable by the next FLUSH.
#[test]
fn a_snapshot_seen_after_a_crash_is_durable_after_the_next_flush() {
    let rig = Rig::simulated();
    let volume = rig.create(64, 4, 1, 1 << 30);
    volume.snapshot_create("s").unwrap();
    drop(volume); // kill -9: the log record is written, not synced
    let volume = rig.open();
    assert_eq!(volume.snapshots().len(), 1);
    volume.flush().unwrap();
    drop(volume);
    rig.power_cut(PowerCut::Clean);
    let volume = rig.open();
    let names: Vec<String> = volume.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["s".to_string()]);
}

/// Regression (found by the power-cut model test): a power cut that keeps a snapshot's record
/// but loses the TLog it closed must not let later writes land in a TLog of that number (the
/// snapshot would change), nor make a restart from the backend drop the snapshot.
#[test]
fn a_snapshot_whose_tlog_a_power_cut_lost_stays_as_taken() {
    let rig = Rig::simulated();
    let sim = rig.sim.clone().unwrap();
    let volume = rig.create(64, 4, 2, 1 << 30);
    volume.write(0, &pattern(CS, 1), true).unwrap();
    volume.close_current_tlog().unwrap();
    volume.flush().unwrap();
    // A new TLog, never flushed, which the snapshot closes.
    volume.write(CS as u64, &pattern(CS, 2), false).unwrap();
    volume.snapshot_create("s").unwrap();
    // Make the snapshot record durable, but not the TLog it closed nor the SCO: sync only the
    // snapshot log and its directory, as a torn cut might leave them.
    let log = rig.dir.join("snapshots.log");
    sim.open(&log).unwrap().sync_data().unwrap();
    sim.sync_dir(&rig.dir).unwrap();
    drop(volume);
    sim.power_cut(PowerCut::Clean);
    let volume = rig.open();
    let snapshot = volume.snapshot_view("s").unwrap();
    let mut taken = vec![0u8; 2 * CS];
    snapshot.read(0, &mut taken).unwrap();
    assert_eq!(
        &taken[..CS],
        &pattern(CS, 1)[..],
        "flushed before the snapshot"
    );
    // A restart from the backend alone keeps it.
    volume.drain_uploads().unwrap();
    drop(volume);
    rig.fs().remove_dir_all(&rig.dir).unwrap();
    let volume = rig.open();
    let names: Vec<String> = volume.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["s".to_string()]);
    let mut from_backend = vec![0u8; 2 * CS];
    volume
        .snapshot_view("s")
        .unwrap()
        .read(0, &mut from_backend)
        .unwrap();
    assert_eq!(from_backend, taken);
    // New writes, made durable and uploaded, do not change it.
    volume.write(CS as u64, &pattern(CS, 3), true).unwrap();
    volume.close_current_tlog().unwrap();
    volume.drain_uploads().unwrap();
    let mut again = vec![0u8; 2 * CS];
    volume
        .snapshot_view("s")
        .unwrap()
        .read(0, &mut again)
        .unwrap();
    assert_eq!(again, taken);
}

/// Regression (found by the power-cut model test): a snapshot recorded in the write buffer but
/// not yet in the backend's TLog list when the node crashed must still reach the list after the
/// restart, or losing the write buffer (or an adoption by another node) loses a flushed snapshot.
#[test]
fn a_snapshot_not_yet_in_the_backend_list_at_a_crash_reaches_it_after_restart() {
    let rig = Rig::new();
    let volume = rig.create(64, 4, 1, 1 << 30);
    volume.write(0, &pattern(4 * CS, 1), true).unwrap();
    volume.drain_uploads().unwrap();
    volume.snapshot_create("before-crash").unwrap();
    volume.flush().unwrap();
    drop(volume); // kill -9 before the uploader put the list
    let volume = rig.open();
    volume.drain_uploads().unwrap();
    drop(volume);
    std::fs::remove_dir_all(&rig.dir).unwrap();
    let volume = rig.open();
    let names: Vec<String> = volume.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["before-crash".to_string()]);
    let view = volume.snapshot_view("before-crash").unwrap();
    let mut back = vec![0u8; 4 * CS];
    view.read(0, &mut back).unwrap();
    assert_eq!(back, pattern(4 * CS, 1));
}

/// A fenced volume acknowledges no write, trim, write-zeroes or flush, still serves reads, and
/// accepts writes again once the fence is lifted; data written before the fence is intact.
#[test]
fn fenced_volumes_refuse_writes_and_flushes_until_unfenced() {
    let rig = Rig::new();
    let volume = rig.create(64, 4, 2, 1 << 30);
    let before = pattern(4 * CS, 11);
    volume.write(0, &before, true).unwrap();
    volume.set_fenced(Some("lease lost".into()));
    assert_eq!(volume.fenced().as_deref(), Some("lease lost"));
    let refused = |e: VolumeError| matches!(e, VolumeError::Fenced { .. });
    assert!(refused(
        volume.write(0, &pattern(CS, 12), false).unwrap_err()
    ));
    assert!(refused(volume.discard(0, CS as u64).unwrap_err()));
    assert!(refused(
        volume.write_zeroes(0, CS as u64, false, false).unwrap_err()
    ));
    assert!(refused(volume.flush().unwrap_err()));
    assert_eq!(read_all(&volume)[..before.len()], before[..]);
    volume.set_fenced(None);
    let after = pattern(CS, 13);
    volume.write(0, &after, true).unwrap();
    let mut expected = before.clone();
    expected[..CS].copy_from_slice(&after);
    assert_eq!(read_all(&volume)[..expected.len()], expected[..]);
}

/// Regression (found by the power-cut model test): a power cut during a flush, more writes, an
/// upload, then a power cut during the next upload.
#[test]
fn power_cut_during_an_upload_after_a_cut_during_a_flush() {
    let write = |sectors| Op::Write {
        sector: 0,
        sectors,
        seed: 0,
        fua: false,
    };
    let ops = vec![
        write(1),
        Op::CutDuring {
            what: During::Flush,
            after: 3,
            torn: None,
        },
        write(17),
        write(33),
        Op::Upload(1),
        Op::CutDuring {
            what: During::Upload(2),
            after: 2,
            torn: None,
        },
    ];
    run_model(ops, true).unwrap();
}

/// Regression (found by the power-cut model test): a power cut during the first flush, writes
/// to other clusters, uploads, then a torn power cut during the next uploads.
#[test]
fn torn_power_cut_during_uploads_after_a_cut_during_the_first_flush() {
    let ops = vec![
        Op::Write {
            sector: 0,
            sectors: 1,
            seed: 0,
            fua: false,
        },
        Op::CutDuring {
            what: During::Flush,
            after: 3,
            torn: None,
        },
        Op::Write {
            sector: 8,
            sectors: 17,
            seed: 0,
            fua: false,
        },
        Op::Write {
            sector: 151,
            sectors: 26,
            seed: 47,
            fua: false,
        },
        Op::Upload(5),
        Op::CutDuring {
            what: During::Upload(2),
            after: 8,
            torn: Some(16_466_478_080_166_134_327),
        },
    ];
    run_model(ops, true).unwrap();
}

/// Regression (found by the power-cut model test): a cut during the first flush, a kill -9,
/// writes and uploads, then a torn power cut during the next uploads.
#[test]
fn torn_power_cut_during_uploads_after_a_cut_during_a_flush_and_a_crash() {
    let ops = vec![
        Op::Write {
            sector: 0,
            sectors: 1,
            seed: 0,
            fua: false,
        },
        Op::CutDuring {
            what: During::Flush,
            after: 3,
            torn: None,
        },
        Op::Crash,
        Op::Write {
            sector: 8,
            sectors: 30,
            seed: 44,
            fua: false,
        },
        Op::Upload(4),
        Op::Write {
            sector: 271,
            sectors: 33,
            seed: 237,
            fua: false,
        },
        Op::CutDuring {
            what: During::Upload(2),
            after: 10,
            torn: Some(14_443_886_925_458_661_256),
        },
    ];
    run_model(ops, true).unwrap();
}

#[test]
fn a_replay_of_many_tlogs_applies_them_in_order_and_names_a_corrupt_one() {
    // Replays fetch several TLogs at once (`vstor_backend::prefetch`) but must apply them in
    // list order: twelve TLogs overwrite the same three places, so any other order reads back
    // something else.
    let rig = Rig::new();
    let volume = rig.create(64, 4, 1, 1 << 30);
    let span = 4 * CS;
    for round in 0..12u8 {
        let offset = u64::from(round % 3) * span as u64;
        volume
            .write(offset, &pattern(span, round + 1), false)
            .unwrap();
    }
    volume.drain_uploads().unwrap();
    let mut expected = vec![0u8; 3 * span];
    for (index, chunk) in expected.chunks_mut(span).enumerate() {
        chunk.copy_from_slice(&pattern(span, 10 + index as u8));
    }
    drop(volume);
    std::fs::remove_dir_all(&rig.dir).unwrap();
    let reopened = rig.open();
    let info = reopened.info();
    assert!(info.opened_replayed_tlogs >= 12, "{info:?}");
    let mut got = vec![0u8; 3 * span];
    reopened.read(0, &mut got).unwrap();
    assert!(got == expected, "the replay applied the TLogs out of order");
    drop(reopened);

    // One corrupt TLog amid the others: the open fails and names that one.
    std::fs::remove_dir_all(&rig.dir).unwrap();
    rig.store
        .put("vol", "tlog_0000000000000005", b"not a tlog at all")
        .unwrap();
    let err = Volume::open(&rig.dir, rig.store.clone(), "vol")
        .err()
        .expect("must fail");
    assert!(
        err.to_string()
            .contains("backend TLog tlog_0000000000000005 is corrupt"),
        "{err}"
    );
}

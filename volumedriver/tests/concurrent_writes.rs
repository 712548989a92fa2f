//! Large writes reserve their slots under the volume lock and copy their data without it
//! (`volume/inflight.rs`). These tests drive that from several threads: the lock is free while a
//! copy is stuck, a read of the range being copied waits and sees the new data, and data written
//! by concurrent writers while uploads, SCO seals and TLog rolls run reads back exactly, after a
//! crash and from the backend.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vstor_volumedriver::{StdFs, Volume, VolumeConfig, VolumeOptions, WbFile, WbFs};

use crate::common;

use common::FaultStore;

const CS: usize = 4096;
/// The smallest write that copies without the lock.
const LARGE: usize = 128 << 10;
/// Bound on every wait in these tests: far above what the operations need.
const PATIENCE: Duration = Duration::from_secs(30);

/// A real write buffer whose next large write can be held in the middle of its copy.
#[derive(Default)]
struct Gate {
    armed: Mutex<Option<(Sender<()>, Receiver<()>)>>,
    /// The next large write fails as a full disk would.
    fail_next: AtomicBool,
}

impl Gate {
    /// Hold the next write of at least `LARGE` bytes: the first receiver says it is held, and
    /// sending on the returned sender lets it go on.
    fn arm(&self) -> (Receiver<()>, Sender<()>) {
        let (held_tx, held_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        *self.armed.lock().unwrap() = Some((held_tx, release_rx));
        (held_rx, release_tx)
    }
}

struct GateFs {
    gate: Arc<Gate>,
}

struct GateFile {
    inner: Arc<dyn WbFile>,
    gate: Arc<Gate>,
}

impl WbFile for GateFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.len() >= LARGE && self.gate.fail_next.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("No space left on device (test)"));
        }
        if buf.len() >= LARGE {
            let armed = self.gate.armed.lock().unwrap().take();
            if let Some((held, release)) = armed {
                held.send(()).unwrap();
                release
                    .recv_timeout(PATIENCE)
                    .expect("the test releases the held write");
            }
        }
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
}

impl GateFs {
    fn wrap(&self, file: Arc<dyn WbFile>) -> Arc<dyn WbFile> {
        Arc::new(GateFile {
            inner: file,
            gate: self.gate.clone(),
        })
    }
}

impl WbFs for GateFs {
    fn create(&self, path: &Path) -> io::Result<Arc<dyn WbFile>> {
        StdFs.create(path).map(|f| self.wrap(f))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn WbFile>> {
        StdFs.open(path).map(|f| self.wrap(f))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        StdFs.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFs.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdFs.sync_dir(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFs.list(dir)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdFs.create_dir_all(dir)
    }
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdFs.remove_dir_all(dir)
    }
    fn real_path(&self, path: &Path) -> Option<PathBuf> {
        StdFs.real_path(path)
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(97)) as u8
        })
        .collect()
}

fn config(clusters: usize, sco_clusters: u64, tlog_scos: u64) -> VolumeConfig {
    let mut config = VolumeConfig::new("vol", &VolumeOptions::new((clusters * CS) as u64), 0)
        .expect("volume config");
    config.sco_clusters = sco_clusters;
    config.tlog_scos = tlog_scos;
    config.write_buffer = 1 << 30;
    config
}

fn read(volume: &Volume, offset: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    volume.read(offset as u64, &mut buf).expect("read");
    buf
}

/// Run `f` on a thread and wait (bounded) for its result: a deadlock fails the test instead of
/// hanging it.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("{what} did not complete within {PATIENCE:?}"))
}

#[test]
fn a_large_write_copies_its_data_without_the_volume_lock_and_reads_wait_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let gate = Arc::new(Gate::default());
    let fs: Arc<dyn WbFs> = Arc::new(GateFs { gate: gate.clone() });
    let dir = tmp.path().join("wb").join("vol");
    let volume = Volume::create_on(fs.clone(), &dir, store.clone(), config(1024, 256, 4))
        .expect("create volume");

    let old = pattern(2 * LARGE, 1);
    volume.write(0, &old, false).unwrap();
    let new = pattern(2 * LARGE, 2);
    let (held, release) = gate.arm();
    let writer = {
        let (volume, new) = (volume.clone(), new.clone());
        thread::spawn(move || volume.write(0, &new, false))
    };
    held.recv_timeout(PATIENCE)
        .expect("the large write reaches its copy");

    // Its copy is stuck, yet the volume serves everything else.
    let elsewhere = pattern(8 * CS, 3);
    let got = within("a small write and read while a large write copies", {
        let (volume, elsewhere) = (volume.clone(), elsewhere.clone());
        move || {
            volume.write(LARGE as u64 * 4, &elsewhere, false).unwrap();
            read(&volume, LARGE * 4, elsewhere.len())
        }
    });
    assert_eq!(got, elsewhere);
    let other_large = pattern(LARGE, 4);
    within("another large write while one copies", {
        let (volume, data) = (volume.clone(), other_large.clone());
        move || volume.write(LARGE as u64 * 6, &data, false).unwrap()
    });

    // A read of the range being copied waits for the copy, then sees the new data (never the
    // zeros of a slot not yet written).
    let waits_before = volume.info().copy_waits;
    let reader = {
        let volume = volume.clone();
        thread::spawn(move || read(&volume, 0, 2 * LARGE))
    };
    let deadline = Instant::now() + PATIENCE;
    while volume.info().copy_waits == waits_before {
        assert!(
            Instant::now() < deadline,
            "the read never waited for the copy"
        );
        thread::sleep(Duration::from_millis(1));
    }
    release.send(()).unwrap();
    writer.join().unwrap().expect("the held write completes");
    assert!(
        reader.join().unwrap() == new,
        "the read saw the copied data"
    );

    // Durable and correct through a crash (drop without stop) and from the backend.
    volume.flush().unwrap();
    drop(volume);
    let volume = Volume::open_on(fs, &dir, store.clone(), "vol").expect("reopen");
    assert!(read(&volume, 0, 2 * LARGE) == new);
    assert_eq!(read(&volume, LARGE * 4, elsewhere.len()), elsewhere);
    assert!(read(&volume, LARGE * 6, LARGE) == other_large);
    volume.close_current_tlog().unwrap();
    while volume.upload_one().unwrap() {}
    volume.evict(u64::MAX);
    assert!(read(&volume, 0, 2 * LARGE) == new);
    assert!(
        volume.info().backend_reads > 0,
        "read back from the backend"
    );
}

#[test]
fn concurrent_large_writes_with_uploads_flushes_and_rolls_read_back_after_a_crash() {
    const WRITERS: usize = 4;
    const REGION: usize = 1 << 20;
    const ROUNDS: u32 = 24;
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let dir = tmp.path().join("wb").join("vol");
    // Small SCOs and TLogs: every large write seals SCOs and most roll the TLog.
    let volume = Volume::create(&dir, store.clone(), config(WRITERS * REGION / CS, 16, 2))
        .expect("create volume");

    let done = Arc::new(AtomicBool::new(false));
    let uploader = {
        let (volume, done) = (volume.clone(), done.clone());
        thread::spawn(move || {
            let mut steps = 0u64;
            while !done.load(Ordering::Relaxed) {
                if volume.upload_one().expect("upload step") {
                    steps += 1;
                } else {
                    thread::yield_now();
                }
            }
            steps
        })
    };
    let flusher = {
        let (volume, done) = (volume.clone(), done.clone());
        thread::spawn(move || {
            let mut flushes = 0u64;
            while !done.load(Ordering::Relaxed) {
                volume.flush().expect("flush");
                flushes += 1;
            }
            flushes
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let volume = volume.clone();
            thread::spawn(move || {
                let base = w * REGION;
                let mut image = vec![0u8; REGION];
                for round in 0..ROUNDS {
                    // 128, 256 or 384 KiB at a cluster-aligned offset inside the region.
                    let len = LARGE * (1 + (round as usize + w) % 3);
                    let at = ((round as usize * 7 + w * 3) * 4 * CS) % (REGION - len);
                    let data = pattern(len, round * 31 + w as u32);
                    volume.write((base + at) as u64, &data, false).unwrap();
                    image[at..at + len].copy_from_slice(&data);
                    assert!(
                        read(&volume, base + at, len) == data,
                        "writer {w} reads back round {round}"
                    );
                }
                image
            })
        })
        .collect();
    let images: Vec<Vec<u8>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    let steps = uploader.join().unwrap();
    let flushes = flusher.join().unwrap();
    assert!(
        steps > 0 && flushes > 0,
        "uploads ({steps}) and flushes ({flushes}) ran alongside"
    );
    let expected: Vec<u8> = images.concat();
    assert!(read(&volume, 0, expected.len()) == expected, "live volume");

    volume.flush().unwrap();
    drop(volume);
    let volume = Volume::open(&dir, store.clone(), "vol").expect("reopen after the crash");
    assert!(
        read(&volume, 0, expected.len()) == expected,
        "after the crash"
    );
    volume.close_current_tlog().unwrap();
    while volume.upload_one().unwrap() {}
    volume.evict(u64::MAX);
    assert!(
        read(&volume, 0, expected.len()) == expected,
        "from the backend"
    );
    volume.stop();
    drop(volume);
    let volume = Volume::open(&dir, store, "vol").expect("reopen after a clean stop");
    assert!(
        read(&volume, 0, expected.len()) == expected,
        "after a clean restart"
    );
}

#[test]
fn a_failed_copy_halts_the_volume_and_keeps_what_was_flushed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultStore::open(&tmp.path().join("backend")));
    let gate = Arc::new(Gate::default());
    let fs: Arc<dyn WbFs> = Arc::new(GateFs { gate: gate.clone() });
    let dir = tmp.path().join("wb").join("vol");
    let volume = Volume::create_on(fs.clone(), &dir, store.clone(), config(1024, 256, 4))
        .expect("create volume");
    let kept = pattern(2 * LARGE, 7);
    volume.write(0, &kept, false).unwrap();
    volume.flush().unwrap();

    gate.fail_next.store(true, Ordering::SeqCst);
    let err = volume
        .write(LARGE as u64 * 2, &pattern(LARGE, 8), false)
        .expect_err("the copy failed: the write is not acknowledged");
    assert!(err.to_string().contains("No space left"), "{err}");
    // Halted: nothing more is acknowledged, and the reason is the failed copy.
    let later = volume.write(LARGE as u64 * 4, &pattern(8 * CS, 9), false);
    assert!(later.is_err(), "a halted volume refuses writes");
    assert!(volume.flush().is_err(), "a halted volume refuses flushes");
    let halted = volume.info().halted_reason.expect("halted");
    assert!(halted.contains("No space left"), "{halted}");

    drop(volume);
    let volume = Volume::open_on(fs, &dir, store, "vol").expect("reopen");
    assert!(
        read(&volume, 0, kept.len()) == kept,
        "what was flushed survives"
    );
}

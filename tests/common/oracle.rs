//! The crash-oracle writer pattern: writers that record, per block, which write must survive
//! (acknowledged in sync mode, flushed in async mode) and which may or may not, and a reader
//! that checks a whole volume against that record after a crash, a failover or a move.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{block_content, decode_block, NbdClient};

pub const BLOCK: usize = 4096;
/// Blocks the writers touch (16 MiB of the volume); the rest of it must stay zeros.
pub const BLOCKS: u64 = 4096;
/// Bytes per read when checking a volume.
const READ_CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Sync,
    Async,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }
}

/// What the writers know, per block: the newest write that must survive (0: none), and every
/// write issued after it (acknowledged but not flushed, or in flight when the node died).
#[derive(Default)]
pub struct Oracle {
    must: HashMap<u64, u64>,
    since: HashMap<u64, Vec<u64>>,
}

impl Oracle {
    pub fn issue(&mut self, block: u64, seq: u64) {
        self.since.entry(block).or_default().push(seq);
    }

    /// Write `seq` to `block` must survive from now on (writes to one block are sequential).
    pub fn commit(&mut self, block: u64, seq: u64) {
        let must = self.must.entry(block).or_default();
        *must = (*must).max(seq);
        if let Some(later) = self.since.get_mut(&block) {
            later.retain(|s| *s > seq);
        }
    }

    /// Is `found` an acceptable content for `block`? Afterwards it is what the block holds.
    pub fn check_and_settle(&mut self, block: u64, found: u64) -> Result<(), String> {
        let must = self.must.get(&block).copied().unwrap_or(0);
        let later = self.since.remove(&block).unwrap_or_default();
        self.must.insert(block, found);
        if found == must || (found > must && later.contains(&found)) {
            Ok(())
        } else {
            Err(format!(
                "block {block} reads write {found}; the newest write that must survive is {must}, \
                 later writes issued: {later:?}"
            ))
        }
    }
}

/// Shared by the writer threads of a test.
#[derive(Default)]
pub struct Load {
    pub oracle: Mutex<Oracle>,
    pub seq: AtomicU64,
    /// Acknowledged writes (sync) or writes (async) since the last reset.
    pub progress: AtomicU64,
    pub stop: AtomicBool,
}

impl Load {
    pub fn new() -> Arc<Self> {
        let load = Load::default();
        load.seq.store(1, Ordering::SeqCst);
        Arc::new(load)
    }
}

pub const LANES: u64 = 2;
/// Async writers issue a FLUSH after this many writes.
pub const FLUSH_EVERY: u64 = 16;

/// One writer: blocks `lane`, `lane + LANES`, ... in pseudo-random order, one request at a time.
/// Returns how it ended: `Ok` when told to stop, `Err` at the first failed request.
pub fn writer(
    addr: String,
    volume: String,
    lane: u64,
    mode: Mode,
    load: Arc<Load>,
) -> Result<u64, String> {
    let mut client =
        NbdClient::connect(&addr, &volume).map_err(|e| format!("lane {lane}: connect: {e}"))?;
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ load.seq.load(Ordering::SeqCst) ^ (lane << 32);
    let mut unflushed: Vec<(u64, u64)> = Vec::new();
    let mut writes = 0u64;
    while !load.stop.load(Ordering::SeqCst) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let block = (rng % (BLOCKS / LANES)) * LANES + lane;
        let seq = load.seq.fetch_add(1, Ordering::SeqCst);
        let fua = mode == Mode::Async && (rng >> 20).is_multiple_of(37);
        load.oracle.lock().unwrap().issue(block, seq);
        match client.write(block * BLOCK as u64, &block_content(block, seq, BLOCK), fua) {
            Ok(0) => {}
            Ok(error) => {
                return Err(format!(
                    "lane {lane}: write {seq} to block {block} failed: NBD error {error}"
                ))
            }
            Err(e) => return Err(format!("lane {lane}: write {seq} to block {block}: {e}")),
        }
        writes += 1;
        match mode {
            Mode::Sync => load.oracle.lock().unwrap().commit(block, seq),
            Mode::Async => {
                unflushed.push((block, seq));
                if fua || writes.is_multiple_of(FLUSH_EVERY) {
                    if !fua {
                        match client.flush() {
                            Ok(0) => {}
                            Ok(error) => {
                                return Err(format!("lane {lane}: FLUSH failed: NBD error {error}"))
                            }
                            Err(e) => return Err(format!("lane {lane}: FLUSH: {e}")),
                        }
                    }
                    let mut oracle = load.oracle.lock().unwrap();
                    for (block, seq) in unflushed.drain(..) {
                        oracle.commit(block, seq);
                    }
                }
            }
        }
        load.progress.fetch_add(1, Ordering::SeqCst);
    }
    Ok(writes)
}

/// Start `LANES` writers on export `volume` of the NBD server at `nbd`.
pub fn start_writers(
    nbd: &str,
    volume: &str,
    mode: Mode,
    load: &Arc<Load>,
) -> Vec<JoinHandle<Result<u64, String>>> {
    load.progress.store(0, Ordering::SeqCst);
    load.stop.store(false, Ordering::SeqCst);
    (0..LANES)
        .map(|lane| {
            let (addr, volume, load) = (nbd.to_string(), volume.to_string(), load.clone());
            std::thread::spawn(move || writer(addr, volume, lane, mode, load))
        })
        .collect()
}

/// Wait until the writers acknowledged `target` more writes; every writer must still be running.
pub fn wait_progress(
    load: &Load,
    writers: &[JoinHandle<Result<u64, String>>],
    target: u64,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while load.progress.load(Ordering::SeqCst) < target {
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "{what}: a writer stopped early at {} writes",
            load.progress.load(Ordering::SeqCst)
        );
        assert!(
            Instant::now() < deadline,
            "{what}: writers stalled at {} of {target} writes",
            load.progress.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Stop the writers cleanly; every request they made must have succeeded.
pub fn stop_writers(load: &Load, writers: Vec<JoinHandle<Result<u64, String>>>) -> u64 {
    load.stop.store(true, Ordering::SeqCst);
    writers
        .into_iter()
        .map(|w| match w.join().expect("writer panicked") {
            Ok(writes) => writes,
            Err(e) => panic!("a write failed: {e}"),
        })
        .sum()
}

/// Read the whole volume `volume` at `nbd` and check every block against the oracle; returns the number
/// of blocks holding data.
pub fn verify(nbd: &str, volume: &str, load: &Load, context: &str) -> u64 {
    let mut client =
        NbdClient::connect(nbd, volume).unwrap_or_else(|e| panic!("{context}: NBD connect: {e}"));
    let size = client.size;
    verify_with(size, load, context, |offset, buf| {
        let error = client
            .read(offset, buf)
            .unwrap_or_else(|e| panic!("{context}: read at {offset}: {e}"));
        assert_eq!(error, 0, "{context}: read at {offset} failed");
    })
}

/// Read the NBD export at `uri` with a real client (`qemu-img convert` into a raw file in `dir`)
/// and check every block of the copy against the oracle, as [`verify`] does.
pub fn verify_with_qemu_img(uri: &str, dir: &std::path::Path, load: &Load, context: &str) -> u64 {
    use std::os::unix::fs::FileExt;
    let path = dir.join("oracle-copy.raw");
    let _ = std::fs::remove_file(&path);
    super::run_ok(
        std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(uri)
            .arg(&path),
    );
    let file = std::fs::File::open(&path).unwrap();
    let size = file.metadata().unwrap().len();
    let written = verify_with(size, load, context, |offset, buf| {
        file.read_exact_at(buf, offset)
            .unwrap_or_else(|e| panic!("{context}: read the copy at {offset}: {e}"));
    });
    std::fs::remove_file(&path).unwrap();
    written
}

/// Check `size` bytes read through `read` against the oracle; returns the blocks holding data.
fn verify_with(size: u64, load: &Load, context: &str, mut read: impl FnMut(u64, &mut [u8])) -> u64 {
    let mut oracle = load.oracle.lock().unwrap();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut written = 0;
    let mut errors = Vec::new();
    for offset in (0..size).step_by(READ_CHUNK) {
        let len = READ_CHUNK.min((size - offset) as usize);
        read(offset, &mut buf[..len]);
        for (i, data) in buf[..len].chunks(BLOCK).enumerate() {
            let block = offset / BLOCK as u64 + i as u64;
            match decode_block(block, data) {
                Some(found) => {
                    written += u64::from(found != 0);
                    if let Err(e) = oracle.check_and_settle(block, found) {
                        errors.push(e);
                    }
                }
                None => errors.push(format!("block {block} holds bytes no write produced")),
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{context}: {} bad blocks, first ones:\n{}",
        errors.len(),
        errors[..errors.len().min(10)].join("\n")
    );
    written
}

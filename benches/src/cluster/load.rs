//! The client of `vstor-bench cluster`: one writer at queue depth 1 that follows the volume to
//! wherever it is served, the way a re-attaching hypervisor would, and keeps what it needs to
//! measure I/O pauses and to prove afterwards that no acknowledged write was lost.
//!
//! Each write puts a self-describing 4 KiB block (block number, sequence number, filler derived
//! from both) at the next block of a 16 MiB window. After an error or a dead connection the
//! writer asks the nodes' APIs where the volume is now and reconnects there. A gap between two
//! acknowledgements longer than [`PAUSE`] is recorded with its start and end.
//!
//! With `--edge` the writer instead stays on one address, a `vstor edge`'s NBD export, which
//! follows the volume itself: there the writer must never see an error nor reconnect, and the
//! pauses it records are what a guest on the edge sees.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use vstor_edge::nbd::client::NbdClient;

use super::nodes::owner_of;

pub(crate) const BLOCK: usize = 4096;
/// Blocks the writer cycles over (16 MiB).
pub(crate) const BLOCKS: u64 = 4096;
/// Gaps between acknowledgements shorter than this are not pauses (a QD1 write with a sync DTL
/// takes well under a millisecond here; scheduling noise on 2 vCPUs stays below this).
const PAUSE: Duration = Duration::from_millis(5);
/// Socket timeout: a stopped server must not hang the writer.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Socket timeout through an edge: above the edge's 30 s pause bound.
const EDGE_IO_TIMEOUT: Duration = Duration::from_secs(40);

/// Content of `block` written with sequence number `seq`.
pub(crate) fn block_content(block: u64, seq: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK];
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&(seq ^ ((i as u64) << 40)).to_le_bytes());
    }
    out
}

/// The sequence number a block's content came from: 0 for zeros, `None` for anything else.
pub(crate) fn decode_block(block: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|b| *b == 0) {
        return Some(0);
    }
    let seq = u64::from_le_bytes(data.get(8..16)?.try_into().ok()?);
    (block_content(block, seq) == data).then_some(seq)
}

#[derive(Default)]
struct Log {
    last_ack: Option<Instant>,
    /// (last ack before, first ack after) of every pause.
    pauses: Vec<(Instant, Instant)>,
    acked: u64,
    /// Last acknowledged sequence number per block.
    expected: Vec<u64>,
    reconnects: u64,
}

/// Where the writer finds the volume.
#[derive(Clone)]
enum Route {
    /// Ask these nodes' APIs for the owner, and reconnect there after an error.
    Owner(Arc<Mutex<Vec<String>>>),
    /// Always this NBD address (an edge that follows the volume itself).
    Fixed(String),
}

pub(crate) struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    apis: Arc<Mutex<Vec<String>>>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Writer {
    /// Start writing to `volume`, found through the APIs in `apis`.
    pub(crate) fn start(volume: &str, apis: Vec<String>) -> Self {
        let apis = Arc::new(Mutex::new(apis));
        Self::start_on(volume, apis.clone(), Route::Owner(apis))
    }

    /// Start writing to `volume` at the NBD server `addr`, always there.
    pub(crate) fn start_fixed(volume: &str, addr: &str) -> Self {
        Self::start_on(
            volume,
            Arc::new(Mutex::new(Vec::new())),
            Route::Fixed(addr.to_string()),
        )
    }

    fn start_on(volume: &str, apis: Arc<Mutex<Vec<String>>>, route: Route) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Log {
            expected: vec![0; BLOCKS as usize],
            ..Log::default()
        }));
        let handle = {
            let (stop, log, volume) = (stop.clone(), log.clone(), volume.to_string());
            std::thread::spawn(move || write_loop(&volume, &stop, &log, &route))
        };
        Self {
            stop,
            log,
            apis,
            handle: Some(handle),
        }
    }

    /// The nodes' API addresses changed (a node restarted on new ephemeral ports).
    pub(crate) fn set_apis(&self, apis: Vec<String>) {
        *self.apis.lock().unwrap_or_else(PoisonError::into_inner) = apis;
    }

    pub(crate) fn acked(&self) -> u64 {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .acked
    }

    /// The last acknowledgement, if any.
    pub(crate) fn last_ack(&self) -> Option<Instant> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_ack
    }

    /// The longest pause that overlaps `[from, to]`, or the time since the last ack when the
    /// writer is still paused.
    pub(crate) fn pause_around(&self, from: Instant, to: Instant) -> Duration {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let ongoing = log
            .last_ack
            .filter(|last| *last <= to && to - *last > PAUSE)
            .map(|last| (last, to));
        log.pauses
            .iter()
            .copied()
            .chain(ongoing)
            .filter(|(start, end)| *start <= to && *end >= from)
            .map(|(start, end)| end - start)
            .max()
            .unwrap_or_default()
    }

    /// Stop and return (acknowledged writes, reconnects, last acknowledged sequence per block).
    pub(crate) fn finish(mut self) -> Result<(u64, u64, Vec<u64>)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            handle
                .join()
                .map_err(|_| anyhow!("the writer thread panicked"))??;
        }
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        Ok((log.acked, log.reconnects, log.expected.clone()))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Ask each API in turn where `volume` is served; `None` if no node knows a live owner.
pub(crate) fn locate(apis: &[String], volume: &str) -> Option<(String, String)> {
    apis.iter()
        .find_map(|api| owner_of(api, volume).ok().flatten())
}

fn write_loop(volume: &str, stop: &AtomicBool, log: &Mutex<Log>, route: &Route) -> Result<()> {
    let mut seq = 0u64;
    let mut client: Option<NbdClient> = None;
    while !stop.load(Ordering::SeqCst) {
        let Some(conn) = client.as_mut() else {
            let addr = match route {
                Route::Owner(apis) => {
                    let apis = apis.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    locate(&apis, volume).map(|(_, addr)| addr)
                }
                Route::Fixed(addr) => Some(addr.clone()),
            };
            client = addr.and_then(|addr| {
                // Through an edge a request may wait out a whole failover.
                let timeout = match route {
                    Route::Owner(_) => IO_TIMEOUT,
                    Route::Fixed(_) => EDGE_IO_TIMEOUT,
                };
                NbdClient::connect_timeout(&addr, volume, Some(timeout)).ok()
            });
            if client.is_none() {
                std::thread::sleep(Duration::from_millis(10));
            } else {
                log.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .reconnects += 1;
            }
            continue;
        };
        seq += 1;
        let block = seq % BLOCKS;
        match conn.write(block * BLOCK as u64, &block_content(block, seq), false) {
            Ok(0) => {
                let now = Instant::now();
                let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(last) = log.last_ack.filter(|last| now - *last > PAUSE) {
                    log.pauses.push((last, now));
                }
                log.last_ack = Some(now);
                log.acked += 1;
                log.expected[block as usize] = seq;
            }
            // An NBD error (fenced, halted, shutting down) or a dead connection: find the
            // volume again.
            Ok(_) | Err(_) => client = None,
        }
    }
    Ok(())
}

/// Read the window back through the volume's current owner; the number of blocks whose content
/// is older than their last acknowledged write (lost), or not a block the writer wrote (corrupt).
pub(crate) fn verify(apis: &[String], volume: &str, expected: &[u64]) -> Result<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        if let Some((_, addr)) = locate(apis, volume) {
            break addr;
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "volume {volume} has no live owner to verify through"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut client = NbdClient::connect_timeout(&addr, volume, Some(Duration::from_secs(30)))?;
    let (mut lost, mut corrupt) = (0, 0);
    let mut buf = vec![0u8; BLOCK];
    for (block, &want) in expected.iter().enumerate() {
        let block = block as u64;
        let error = client.read(block * BLOCK as u64, &mut buf)?;
        if error != 0 {
            return Err(anyhow!(
                "reading block {block} of {volume}: NBD error {error}"
            ));
        }
        match decode_block(block, &buf) {
            Some(seq) if seq >= want => {}
            Some(_) => lost += 1,
            None => corrupt += 1,
        }
    }
    Ok((lost, corrupt))
}

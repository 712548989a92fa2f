//! The load the engine benchmark puts on a volume, straight through [`Volume`]'s API: a writer
//! thread doing 4 KiB random writes, fills and overwrites, and timed read loops.
//!
//! Writes honour the engine's backpressure as the NBD and vhost-user frontends do: when a write
//! comes back with a throttle delay (the volume holds more not-yet-uploaded data than its write
//! buffer budget), the writer sleeps for that long before its next write.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use vstor_volumedriver::Volume;

use crate::common::histogram::Histogram;
use crate::common::process::check_interrupted;
use crate::common::rng::Rng;

/// The cluster size, and the size of every random read and write.
pub(crate) const BLOCK: u64 = 4096;
/// The size of every sequential read and write.
pub(crate) const CHUNK: u64 = 1 << 20;
/// How long uploads may take to drain before a phase that needs them done.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// The figures of one phase of a [`Writer`].
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct WriterFigures {
    pub seconds: f64,
    pub writes: u64,
    pub iops: f64,
    /// Write latency (the `Volume::write` call, not the throttle sleep after it).
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Writes that came back with a throttle delay, and the delays' total.
    pub throttled_writes: u64,
    pub throttle_ms: f64,
}

/// What the writer thread counted in one phase.
#[derive(Default)]
struct PhaseCounts {
    writes: u64,
    latency: Histogram,
    throttled: u64,
    throttle: Duration,
}

struct Shared {
    stop: AtomicBool,
    phase: AtomicUsize,
}

/// A thread writing 4 KiB at pseudo-random 4 KiB-aligned offsets over a whole volume, without
/// flushes, from [`Writer::start`] until [`Writer::finish`]. Its time is cut into phases
/// ([`Writer::next_phase`]); each write counts towards the phase in which it started. Phase 0,
/// from the start to the first `next_phase`, is a warm-up that is not reported.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<Result<Vec<PhaseCounts>>>>,
    /// When each phase began, phase 0 first.
    marks: Vec<Instant>,
}

impl Writer {
    pub(crate) fn start(volume: Arc<Volume>, seed: u64) -> Result<Self> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            phase: AtomicUsize::new(0),
        });
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("bench-writer".into())
            .spawn(move || write_loop(&volume, &thread_shared, seed))
            .context("cannot start the writer thread")?;
        Ok(Self {
            shared,
            handle: Some(handle),
            marks: vec![Instant::now()],
        })
    }

    /// Ends the current phase and begins the next; returns the new phase's number (1, 2, ...).
    /// Fails if the writer thread has stopped (a write failed).
    pub(crate) fn next_phase(&mut self) -> Result<usize> {
        if self.handle.as_ref().is_some_and(JoinHandle::is_finished) {
            self.finish()?;
            bail!("the writer thread stopped early");
        }
        self.marks.push(Instant::now());
        let phase = self.marks.len() - 1;
        self.shared.phase.store(phase, Ordering::Relaxed);
        Ok(phase)
    }

    /// Stops the thread and returns the figures of phases 1 onwards, in order. The last phase
    /// ends now.
    pub(crate) fn finish(&mut self) -> Result<Vec<WriterFigures>> {
        let end = Instant::now();
        self.shared.stop.store(true, Ordering::Relaxed);
        let handle = self
            .handle
            .take()
            .ok_or_else(|| anyhow!("the writer was already stopped"))?;
        let mut counts = handle
            .join()
            .map_err(|_| anyhow!("the writer thread panicked"))?
            .context("writer")?;
        counts.resize_with(self.marks.len(), PhaseCounts::default);
        let ends = self.marks.iter().skip(1).copied().chain([end]);
        Ok(self
            .marks
            .iter()
            .zip(ends)
            .zip(&counts)
            .skip(1)
            .map(|((start, end), counts)| phase_figures(counts, end.duration_since(*start)))
            .collect())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn phase_figures(counts: &PhaseCounts, elapsed: Duration) -> WriterFigures {
    let seconds = elapsed.as_secs_f64();
    let us = |percent: f64| counts.latency.percentile(percent).map_or(f64::NAN, micros);
    WriterFigures {
        seconds,
        writes: counts.writes,
        iops: counts.writes as f64 / seconds,
        p50_us: us(50.0),
        p99_us: us(99.0),
        max_us: us(100.0),
        throttled_writes: counts.throttled,
        throttle_ms: counts.throttle.as_secs_f64() * 1e3,
    }
}

fn micros(nanos: u64) -> f64 {
    nanos as f64 / 1e3
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn write_loop(volume: &Volume, shared: &Shared, seed: u64) -> Result<Vec<PhaseCounts>> {
    let clusters = volume.size() / BLOCK;
    let mut rng = Rng::new(seed);
    let mut block = payload(BLOCK as usize, seed);
    let mut phases: Vec<PhaseCounts> = vec![PhaseCounts::default()];
    let mut stamp = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let phase = shared.phase.load(Ordering::Relaxed);
        if phases.len() <= phase {
            phases.resize_with(phase + 1, PhaseCounts::default);
        }
        stamp += 1;
        block[..8].copy_from_slice(&stamp.to_le_bytes());
        let offset = rng.below(clusters) * BLOCK;
        let started = Instant::now();
        let outcome = volume
            .write(offset, &block, false)
            .with_context(|| format!("4 KiB write at {offset} to {}", volume.name()))?;
        let counts = &mut phases[phase];
        counts.latency.record(nanos(started.elapsed()));
        counts.writes += 1;
        if let Some(delay) = outcome.throttle {
            counts.throttled += 1;
            counts.throttle += delay;
            std::thread::sleep(delay);
        }
    }
    Ok(phases)
}

/// `len` pseudo-random bytes.
pub(crate) fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut bytes = vec![0u8; len];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
    }
    bytes
}

/// Writes the whole volume once with sequential 1 MiB writes (pseudo-random bytes, a fresh stamp
/// in each); returns MB/s (10^6 bytes/s), throttle sleeps included.
pub(crate) fn fill(volume: &Volume, seed: u64) -> Result<f64> {
    let size = volume.size();
    let mut chunk = payload(CHUNK as usize, seed);
    let started = Instant::now();
    let mut offset = 0;
    while offset < size {
        chunk[..8].copy_from_slice(&offset.to_le_bytes());
        let len = CHUNK.min(size - offset) as usize;
        let outcome = volume
            .write(offset, &chunk[..len], false)
            .with_context(|| format!("1 MiB write at {offset} to {}", volume.name()))?;
        if let Some(delay) = outcome.throttle {
            std::thread::sleep(delay);
        }
        offset += len as u64;
        if offset % (256 * CHUNK) == 0 {
            check_interrupted()?;
        }
    }
    Ok(size as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// `count` 4 KiB writes at pseudo-random 4 KiB-aligned offsets (with repeats: each one turns the
/// cluster's previous copy into garbage).
pub(crate) fn overwrite(volume: &Volume, count: u64, seed: u64) -> Result<()> {
    let clusters = volume.size() / BLOCK;
    let mut rng = Rng::new(seed);
    let mut block = payload(BLOCK as usize, seed);
    for index in 0..count {
        block[..8].copy_from_slice(&index.to_le_bytes());
        let offset = rng.below(clusters) * BLOCK;
        let outcome = volume
            .write(offset, &block, false)
            .with_context(|| format!("4 KiB write at {offset} to {}", volume.name()))?;
        if let Some(delay) = outcome.throttle {
            std::thread::sleep(delay);
        }
        if index % 65_536 == 0 {
            check_interrupted()?;
        }
    }
    Ok(())
}

/// Makes everything written so far durable and queued (flush, then seal the open SCO and close
/// the TLog) and waits until the backend has it.
pub(crate) fn upload_all(volume: &Volume) -> Result<()> {
    volume.flush().context("flush")?;
    volume.close_current_tlog().context("close_current_tlog")?;
    if !volume.wait_for_uploads(Instant::now() + UPLOAD_TIMEOUT) {
        let info = volume.info();
        bail!(
            "volume {}: uploads did not finish within {} s ({} steps queued, last error: {})",
            volume.name(),
            UPLOAD_TIMEOUT.as_secs(),
            info.upload_queue,
            info.last_upload_error.as_deref().unwrap_or("none")
        );
    }
    Ok(())
}

/// The figures of one read loop.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct ReadFigures {
    pub seconds: f64,
    pub bytes: u64,
    pub reads: u64,
    /// 10^6 bytes/s.
    pub mb_per_s: f64,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Ranged backend reads the volume made meanwhile (its `backend_reads` counter): 0 means
    /// everything came from the write buffer.
    pub backend_reads: u64,
}

/// How a read loop picks its offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadPattern {
    /// 1 MiB reads from offset 0 up, wrapping at the end: at least one whole pass, and on until
    /// the runtime is over.
    Sequential,
    /// 4 KiB reads at pseudo-random aligned offsets for the runtime.
    Random { seed: u64 },
}

/// Reads `volume` through [`Volume::read`] with one thread, as `pattern` says, for `runtime`.
pub(crate) fn read(
    volume: &Volume,
    pattern: ReadPattern,
    runtime: Duration,
) -> Result<ReadFigures> {
    let size = volume.size();
    let backend_reads_before = volume.info().backend_reads;
    let mut latency = Histogram::new();
    let (mut reads, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    match pattern {
        ReadPattern::Sequential => {
            let mut buf = vec![0u8; CHUNK as usize];
            let mut offset = 0;
            loop {
                let len = CHUNK.min(size - offset) as usize;
                let t = Instant::now();
                volume
                    .read(offset, &mut buf[..len])
                    .with_context(|| format!("1 MiB read at {offset} of {}", volume.name()))?;
                latency.record(nanos(t.elapsed()));
                reads += 1;
                bytes += len as u64;
                offset += len as u64;
                if offset >= size {
                    offset = 0;
                    check_interrupted()?;
                }
                if bytes >= size && started.elapsed() >= runtime {
                    break;
                }
            }
        }
        ReadPattern::Random { seed } => {
            let clusters = size / BLOCK;
            let mut rng = Rng::new(seed);
            let mut buf = vec![0u8; BLOCK as usize];
            while started.elapsed() < runtime {
                for _ in 0..64 {
                    let offset = rng.below(clusters) * BLOCK;
                    let t = Instant::now();
                    volume
                        .read(offset, &mut buf)
                        .with_context(|| format!("4 KiB read at {offset} of {}", volume.name()))?;
                    latency.record(nanos(t.elapsed()));
                }
                reads += 64;
                bytes += 64 * BLOCK;
                check_interrupted()?;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let us = |percent: f64| latency.percentile(percent).map_or(f64::NAN, micros);
    Ok(ReadFigures {
        seconds,
        bytes,
        reads,
        mb_per_s: bytes as f64 / seconds / 1e6,
        iops: reads as f64 / seconds,
        p50_us: us(50.0),
        p99_us: us(99.0),
        backend_reads: volume.info().backend_reads - backend_reads_before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_figures_divide_by_the_phase_length() {
        let mut counts = PhaseCounts::default();
        for nanos in [10_000, 20_000, 30_000, 40_000] {
            counts.latency.record(nanos);
        }
        counts.writes = 4_000;
        counts.throttled = 2;
        counts.throttle = Duration::from_millis(3);
        let figures = phase_figures(&counts, Duration::from_millis(500));
        assert_eq!(figures.iops, 8_000.0);
        assert_eq!(figures.writes, 4_000);
        assert!((figures.p50_us - 20.0).abs() < 0.5, "{figures:?}");
        assert!((figures.max_us - 40.0).abs() < 0.7, "{figures:?}");
        assert_eq!(figures.throttled_writes, 2);
        assert!((figures.throttle_ms - 3.0).abs() < 1e-9);
    }

    #[test]
    fn payloads_are_reproducible_and_not_constant() {
        let a = payload(4096, 9);
        assert_eq!(a, payload(4096, 9));
        assert_ne!(a, payload(4096, 10));
        assert!(a.chunks(8).any(|word| word != &a[..8]));
        assert_eq!(payload(13, 1).len(), 13);
    }
}

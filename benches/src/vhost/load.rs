//! The load generator: a vhost-user-blk client built on libblkio's pure-Rust driver
//! (`virtio-blk-vhost-user`), the same code against both servers.
//!
//! Each measurement connects afresh, as a new fio process would, asks for `queues` virtqueues
//! and runs one thread per queue. A thread keeps `iodepth` requests of 4 KiB in flight at
//! random 4 KiB-aligned offsets over the whole device: whenever one completes, the next is
//! queued in its slot. Completions are waited for on the queue's completion eventfd (no busy
//! polling, which on a small machine would take the server's CPU away), so the latency of a
//! request is from when the thread queued it to when the thread saw it complete, including the
//! client's own wake-up, exactly as a guest driver would see it.
//!
//! The first `warmup` of a run is not counted; after it, every completion within `runtime`
//! counts towards IOPS and goes into a [`Histogram`] of latencies. Requests still in flight at
//! the end are drained but not counted.
//!
//! Request buffers live in one memory region allocated by libblkio (a memfd, which is how a
//! vhost-user back end gets to see them) and mapped into the device before the run. Writes carry
//! pseudo-random bytes, so neither server can take a shortcut on zeroes.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};

use crate::common::cpu;
use crate::common::histogram::Histogram;
use crate::common::process::{check_interrupted, POLL};
use crate::common::rng::Rng;

const DRIVER: &str = "virtio-blk-vhost-user";
/// The request size of the measured rows.
pub(crate) const BLOCK_SIZE: usize = 4096;
/// How long one wait for completions lasts before the thread checks for a stall, a failed
/// sibling or a Ctrl-C.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// No completion for this long means the server is stuck: the run fails instead of hanging.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a measurement waits for the server to accept it after the previous one hung up.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Prefill writes are 1 MiB (or the device's maximum transfer, if smaller), 8 at a time.
const PREFILL_CHUNK: usize = 1 << 20;
const PREFILL_DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

/// What one measurement runs: `queues` threads with `iodepth` 4 KiB requests in flight each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Workload {
    pub op: Op,
    pub iodepth: usize,
    pub queues: usize,
}

/// What one measurement counted in its measured window.
#[derive(Debug, Clone)]
pub(crate) struct Measurement {
    /// Requests completed within the window.
    pub ios: u64,
    /// The window's length.
    pub seconds: f64,
    /// Their latencies in nanoseconds.
    pub latency: Histogram,
    /// The machine's busy CPU time within the window ([`crate::common::cpu`]), if it could be
    /// read.
    pub cpu_seconds: Option<f64>,
}

impl Measurement {
    pub(crate) fn iops(&self) -> f64 {
        self.ios as f64 / self.seconds
    }

    /// The machine's busy CPU time per completed request, in microseconds.
    pub(crate) fn cpu_us_per_io(&self) -> Option<f64> {
        self.cpu_seconds.map(|busy| busy * 1e6 / self.ios as f64)
    }
}

/// A whole-device sequential write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prefill {
    pub bytes: u64,
    pub seconds: f64,
}

impl Prefill {
    pub(crate) fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e6
    }
}

/// A connected, started device with one mapped buffer region.
struct Device {
    /// The connection: queues and buffers are only valid while it lives.
    _blkio: Blkio,
    queues: Vec<Blkioq>,
    capacity: u64,
    max_transfer: usize,
    region: MemoryRegion,
}

/// Connects to the vhost-user-blk socket at `socket`, retrying for up to `connect_for` while
/// nothing listens yet, starts `queues` queues and maps a buffer region of at least
/// `buffer_bytes`.
fn open(
    socket: &Path,
    queues: usize,
    buffer_bytes: usize,
    connect_for: Duration,
) -> Result<Device> {
    let path = socket
        .to_str()
        .ok_or_else(|| anyhow!("socket path {} is not UTF-8", socket.display()))?;
    let deadline = Instant::now() + connect_for;
    let mut blkio = loop {
        check_interrupted()?;
        let mut blkio =
            Blkio::new(DRIVER).context("libblkio has no virtio-blk-vhost-user driver")?;
        blkio
            .set_str("path", path)
            .context("cannot set libblkio's path")?;
        match blkio.connect() {
            Ok(()) => break blkio,
            Err(e)
                if matches!(e.errno(), Errno::CONNREFUSED | Errno::NOENT)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(POLL);
            }
            Err(e) => {
                return Err(anyhow!("{e} ({})", e.errno()))
                    .with_context(|| format!("cannot connect to {}", socket.display()))
            }
        }
    };
    let max_queues = blkio
        .get_i32("max-queues")
        .context("cannot read max-queues")?;
    if usize::try_from(max_queues).unwrap_or(0) < queues {
        bail!(
            "{} offers {max_queues} queue(s); the run needs {queues}",
            socket.display()
        );
    }
    let queues_i32 = i32::try_from(queues).context("too many queues")?;
    blkio
        .set_i32("num-queues", queues_i32)
        .context("cannot set num-queues")?;
    let capacity = blkio.get_u64("capacity").context("cannot read capacity")?;
    let max_transfer = blkio
        .get_i32("max-transfer")
        .context("cannot read max-transfer")?;
    let alignment = blkio
        .get_u64("mem-region-alignment")
        .context("cannot read mem-region-alignment")?
        .max(4096) as usize;
    let outcome = blkio
        .start()
        .with_context(|| format!("cannot start {queues} queue(s) on {}", socket.display()))?;
    let region = blkio
        .alloc_mem_region(buffer_bytes.next_multiple_of(alignment))
        .context("cannot allocate the request buffers")?;
    blkio
        .map_mem_region(&region)
        .context("cannot map the request buffers into the device")?;
    Ok(Device {
        _blkio: blkio,
        queues: outcome.queues,
        capacity,
        max_transfer: usize::try_from(max_transfer).unwrap_or(0),
        region,
    })
}

/// Runs `workload` against the device at `socket`: `warmup`, then `runtime` measured. `seed`
/// picks the offsets (the same seed gives every server the same sequence per queue).
pub(crate) fn run(
    socket: &Path,
    workload: Workload,
    warmup: Duration,
    runtime: Duration,
    seed: u64,
) -> Result<Measurement> {
    if workload.iodepth == 0 || workload.queues == 0 {
        bail!("iodepth and queues must be at least 1");
    }
    let slots = workload.queues * workload.iodepth;
    let mut device = open(
        socket,
        workload.queues,
        slots * BLOCK_SIZE,
        RECONNECT_TIMEOUT,
    )?;
    let blocks = device.capacity / BLOCK_SIZE as u64;
    if blocks == 0 {
        bail!(
            "{} reports a capacity of {} bytes",
            socket.display(),
            device.capacity
        );
    }
    let base = device.region.addr;
    if workload.op == Op::Write {
        fill_random(&device.region, seed);
    }

    let start = Instant::now();
    let measure_from = start + warmup;
    let until = measure_from + runtime;
    let abort = AtomicBool::new(false);
    let queues = std::mem::take(&mut device.queues);
    let (results, cpu_seconds) = std::thread::scope(|scope| {
        let abort = &abort;
        let meter = scope.spawn(move || cpu::busy_between(measure_from, until, abort));
        let mut workers = Vec::with_capacity(queues.len());
        let mut spawn_error = None;
        for (index, mut queue) in queues.into_iter().enumerate() {
            let buffers = base + index * workload.iodepth * BLOCK_SIZE;
            let mut rng = Rng::new(seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let worker = std::thread::Builder::new()
                .name(format!("blkio-q{index}"))
                .spawn_scoped(scope, move || {
                    let mut latency = Histogram::new();
                    let result = drive(
                        &mut queue,
                        workload.op,
                        buffers,
                        BLOCK_SIZE,
                        workload.iodepth,
                        abort,
                        |now| (now < until).then(|| rng.below(blocks) * BLOCK_SIZE as u64),
                        |submitted, completed| {
                            if completed >= measure_from && completed < until {
                                latency.record(nanos(completed - submitted));
                            }
                        },
                    );
                    if result.is_err() {
                        abort.store(true, Ordering::SeqCst);
                    }
                    result.map(|()| latency)
                });
            match worker {
                Ok(worker) => workers.push(worker),
                Err(e) => {
                    abort.store(true, Ordering::SeqCst);
                    spawn_error = Some(anyhow!(e).context("cannot start a load thread"));
                    break;
                }
            }
        }
        let mut results: Vec<Result<Histogram>> = workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("a load thread panicked")))
            })
            .collect();
        results.extend(spawn_error.map(Err));
        let cpu_seconds = meter.join().ok().flatten();
        (results, cpu_seconds)
    });
    let mut latency = Histogram::new();
    for result in results {
        latency.merge(&result?);
    }
    drop(device);
    let ios = latency.count();
    if ios == 0 {
        bail!(
            "no request completed within the measured {} s",
            runtime.as_secs_f64()
        );
    }
    Ok(Measurement {
        ios,
        seconds: runtime.as_secs_f64(),
        latency,
        cpu_seconds,
    })
}

/// Writes the whole device at `socket`, which must be `size` bytes, sequentially, so that later
/// reads find data; waits up to `connect_for` for the server to accept the connection.
pub(crate) fn prefill(socket: &Path, size: u64, connect_for: Duration) -> Result<Prefill> {
    sequential(socket, size, Op::Write, connect_for)
}

/// Reads the whole device at `socket` once, sequentially: after a prefill whose large writes
/// bypassed the page cache (`O_DIRECT`), so that the first measurement does not pay for
/// bringing the data in and the next one find it cached.
pub(crate) fn read_through(socket: &Path, size: u64, connect_for: Duration) -> Result<Prefill> {
    sequential(socket, size, Op::Read, connect_for)
}

fn sequential(socket: &Path, size: u64, op: Op, connect_for: Duration) -> Result<Prefill> {
    let mut device = open(socket, 1, PREFILL_DEPTH * PREFILL_CHUNK, connect_for)?;
    if device.capacity != size {
        bail!(
            "{} reports a capacity of {} bytes, not the {size} the benchmark made it",
            socket.display(),
            device.capacity
        );
    }
    let chunk = match device.max_transfer {
        0 => PREFILL_CHUNK,
        max => (max.min(PREFILL_CHUNK) / BLOCK_SIZE * BLOCK_SIZE).max(BLOCK_SIZE),
    };
    if op == Op::Write {
        fill_random(&device.region, 0x5eed);
    }
    let mut queue = device
        .queues
        .pop()
        .ok_or_else(|| anyhow!("libblkio started no queue"))?;
    let abort = AtomicBool::new(false);
    let mut next = 0u64;
    let mut covered = 0u64;
    let start = Instant::now();
    drive(
        &mut queue,
        op,
        device.region.addr,
        chunk,
        PREFILL_DEPTH,
        &abort,
        |_| {
            let offset = next;
            (offset < size).then(|| {
                next += chunk as u64;
                offset
            })
        },
        |_, _| covered += chunk as u64,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    drop(queue);
    drop(device);
    if covered != size {
        bail!(
            "the sequential {} covered {covered} of {size} bytes",
            op.name()
        );
    }
    Ok(Prefill {
        bytes: covered,
        seconds,
    })
}

/// Keeps up to `depth` requests of `len` bytes in flight on `queue`, slot `i` using the buffer at
/// `buffers + i * len`. `next(now)` gives the offset of the next request, or `None` once no more
/// should be queued; `done(submitted, completed)` is told of every completion. Returns when
/// nothing is in flight any more, or with an error when a request fails, the server stalls, the
/// harness is interrupted or (`Ok`) when `abort` is set by a failing sibling.
#[allow(clippy::too_many_arguments)]
fn drive(
    queue: &mut Blkioq,
    op: Op,
    buffers: usize,
    len: usize,
    depth: usize,
    abort: &AtomicBool,
    mut next: impl FnMut(Instant) -> Option<u64>,
    mut done: impl FnMut(Instant, Instant),
) -> Result<()> {
    let mut submitted = vec![Instant::now(); depth];
    let mut offsets = vec![0u64; depth];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let mut in_flight = 0;
    let submit = |queue: &mut Blkioq, slot: usize, offset: u64| {
        let buffer = (buffers + slot * len) as *mut u8;
        match op {
            Op::Read => queue.read(offset, buffer, len, slot, ReqFlags::empty()),
            Op::Write => queue.write(offset, buffer, len, slot, ReqFlags::empty()),
        }
    };
    let now = Instant::now();
    for slot in 0..depth {
        let Some(offset) = next(now) else { break };
        submitted[slot] = Instant::now();
        offsets[slot] = offset;
        submit(queue, slot, offset);
        in_flight += 1;
    }
    let mut last_completion = Instant::now();
    while in_flight > 0 {
        check_interrupted()?;
        if abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut timeout = WAIT_SLICE;
        let count = match queue.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(count) => count,
            Err(e) if matches!(e.errno(), Errno::TIME | Errno::INTR) => {
                if last_completion.elapsed() >= STALL_TIMEOUT {
                    bail!(
                        "no request completed for {} s with {in_flight} in flight; is the server stuck?",
                        STALL_TIMEOUT.as_secs()
                    );
                }
                continue;
            }
            Err(e) => {
                return Err(anyhow!("{e} ({})", e.errno()))
                    .context("waiting for completions failed")
            }
        };
        let now = Instant::now();
        last_completion = now;
        for completion in &completions[..count] {
            // SAFETY: do_io() initialised the first `count` entries.
            let completion = unsafe { completion.assume_init_read() };
            let slot = completion.user_data;
            if completion.ret != 0 {
                bail!(
                    "a {len}-byte {} at offset {} failed: {}",
                    op.name(),
                    offsets[slot],
                    Errno::from_raw_os_error(-completion.ret)
                );
            }
            in_flight -= 1;
            done(submitted[slot], now);
            if let Some(offset) = next(now) {
                submitted[slot] = now;
                offsets[slot] = offset;
                submit(queue, slot, offset);
                in_flight += 1;
            }
        }
    }
    Ok(())
}

/// Fills `region` with pseudo-random bytes.
fn fill_random(region: &MemoryRegion, seed: u64) {
    // SAFETY: libblkio mapped `len` writable bytes at `addr`, and no request is in flight yet.
    let bytes = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    let mut rng = Rng::new(seed);
    for chunk in bytes.chunks_mut(8) {
        let word = rng.next().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_measurement_reports_iops_over_its_window() {
        let mut latency = Histogram::new();
        latency.record(50_000);
        let measurement = Measurement {
            ios: 30_000,
            seconds: 3.0,
            latency,
            cpu_seconds: Some(0.375),
        };
        assert_eq!(measurement.iops(), 10_000.0);
        assert_eq!(measurement.cpu_us_per_io(), Some(12.5));
        let prefill = Prefill {
            bytes: 256 << 20,
            seconds: 0.5,
        };
        assert!((prefill.mb_per_s() - 536.870912).abs() < 1e-9);
    }
}

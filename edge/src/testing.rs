//! In-memory [`BlockTarget`] and [`ExportRegistry`] for tests (enabled by `cfg(test)` or the
//! `testing` feature).
//!
//! [`MemTarget`] keeps the device in a `Vec<u8>`, tracks allocation per 4 KiB block the way a
//! thin-provisioned volume would (writes allocate, whole-block discards and hole-punching zeroes
//! deallocate), records every operation it receives, and has a few knobs to make a frontend's
//! behaviour observable: a flush gate that holds `flush` until released, writes that wait for a
//! device (`write_waits`, like a volume's large `O_DIRECT` writes) and a gate that holds those,
//! a throttle returned in every `WriteAck`, I/O-error injection, and slow ranges whose reads
//! behave like reads from a remote backend (`try_read` says `WouldBlock`, `read` takes a set
//! delay; a write, discard or write-zeroes that covers part of a 4 KiB block there says
//! `write_reads_backend` and waits at the device-write gate, like a volume's read-modify-write
//! of an evicted cluster).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::target::{BlockTarget, ExportRegistry, Extent, ReadAttempt, TargetError, WriteAck};

pub mod remote;

/// Allocation granularity of [`MemTarget`].
pub const ALLOC_BLOCK: u64 = 4096;

/// One call received by a [`MemTarget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        allocate: bool,
        fua: bool,
    },
    Flush,
    BlockStatus {
        offset: u64,
        len: u64,
    },
}

struct Device {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

/// Holds the calls that pass it (flushes, or writes that wait for the device) while a [`Hold`]
/// of it lives.
#[derive(Default)]
struct Gate {
    held: Mutex<bool>,
    released: Condvar,
    entered: Mutex<Option<mpsc::UnboundedSender<()>>>,
}

impl Gate {
    fn hold(&self) -> Hold<'_> {
        let (tx, rx) = mpsc::unbounded_channel();
        *lock(&self.entered) = Some(tx);
        *lock(&self.held) = true;
        Hold {
            gate: self,
            entered: rx,
        }
    }

    /// Block while held, after telling the hold that a call arrived.
    fn pass(&self) {
        let mut held = lock(&self.held);
        if *held {
            if let Some(tx) = lock(&self.entered).as_ref() {
                let _ = tx.send(());
            }
            while *held {
                held = self
                    .released
                    .wait(held)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }
}

/// A RAM-backed block device; see the module docs.
pub struct MemTarget {
    size: u64,
    read_only: bool,
    device: Mutex<Device>,
    ops: Mutex<Vec<Op>>,
    flushes: AtomicU64,
    throttle: Mutex<Option<Duration>>,
    fail_io: AtomicBool,
    gate: Gate,
    /// `write_waits(len)` is true from this length on (`None`: never).
    device_writes_from: Mutex<Option<usize>>,
    device_gate: Gate,
    /// While set, writes return acknowledgements that stay pending until the sender says true.
    ack_gate: Mutex<Option<tokio::sync::watch::Receiver<bool>>>,
    /// Byte ranges "only on the backend", and how long a `read` touching one takes.
    slow: Mutex<Option<(Vec<std::ops::Range<u64>>, Duration)>>,
    slow_reads: AtomicU64,
    /// Run by the next write, which then fails unapplied (see [`MemTarget::refuse_next_write`]).
    refuse_next_write: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// Holds the acknowledgements of writes made while it lives (see [`MemTarget::hold_acks`]).
pub struct AckHold<'a> {
    target: &'a MemTarget,
    release: tokio::sync::watch::Sender<bool>,
}

impl AckHold<'_> {
    /// Let every held acknowledgement complete, and stop holding new ones.
    pub fn release(self) {}
}

impl Drop for AckHold<'_> {
    fn drop(&mut self) {
        *lock(&self.target.ack_gate) = None;
        let _ = self.release.send(true);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemTarget {
    /// A writable device of `size` bytes (a multiple of 4096), all holes.
    pub fn new(size: u64) -> Self {
        Self::build(size, false)
    }

    /// A read-only device of `size` bytes.
    pub fn new_read_only(size: u64) -> Self {
        Self::build(size, true)
    }

    fn build(size: u64, read_only: bool) -> Self {
        assert!(
            size.is_multiple_of(ALLOC_BLOCK),
            "MemTarget size must be a multiple of 4096"
        );
        let len = usize::try_from(size).expect("MemTarget size fits in memory");
        Self {
            size,
            read_only,
            device: Mutex::new(Device {
                data: vec![0; len],
                allocated: vec![false; (size / ALLOC_BLOCK) as usize],
            }),
            ops: Mutex::new(Vec::new()),
            flushes: AtomicU64::new(0),
            throttle: Mutex::new(None),
            fail_io: AtomicBool::new(false),
            gate: Gate::default(),
            device_writes_from: Mutex::new(None),
            device_gate: Gate::default(),
            ack_gate: Mutex::new(None),
            slow: Mutex::new(None),
            slow_reads: AtomicU64::new(0),
            refuse_next_write: Mutex::new(None),
        }
    }

    /// The next write runs `closing` and then fails with `TargetError::Io` without being applied
    /// or recorded: a volume whose own gate closed (a hand-off or a fence began, which `closing`
    /// tells the served state) between the edge server's owner check and the write.
    pub fn refuse_next_write(&self, closing: impl FnOnce() + Send + 'static) {
        *lock(&self.refuse_next_write) = Some(Box::new(closing));
    }

    /// Put data on the device without going through (or recording) the `BlockTarget` API.
    pub fn preload(&self, offset: u64, data: &[u8]) {
        let mut dev = lock(&self.device);
        Self::store(&mut dev, offset, data);
    }

    /// Copy of `len` bytes at `offset`.
    pub fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        let dev = lock(&self.device);
        dev.data[offset as usize..offset as usize + len].to_vec()
    }

    /// Allocation state of every 4 KiB block.
    pub fn allocation(&self) -> Vec<bool> {
        lock(&self.device).allocated.clone()
    }

    /// Every operation received so far, in order.
    pub fn ops(&self) -> Vec<Op> {
        lock(&self.ops).clone()
    }

    pub fn clear_ops(&self) {
        lock(&self.ops).clear();
    }

    /// Number of completed `flush` calls.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Report this throttle delay in every `WriteAck` from now on.
    pub fn set_throttle(&self, delay: Option<Duration>) {
        *lock(&self.throttle) = delay;
    }

    /// Make reads that touch `range` slow, like reads of data that is only on a remote backend:
    /// `try_read` answers `WouldBlock` and `read` sleeps `delay` first (the latest delay given
    /// applies to every slow range).
    pub fn add_slow_range(&self, range: std::ops::Range<u64>, delay: Duration) {
        let mut slow = lock(&self.slow);
        let ranges = slow.take().map(|(ranges, _)| ranges).unwrap_or_default();
        *slow = Some((ranges.into_iter().chain([range]).collect(), delay));
    }

    /// Number of `read` calls that were slow (went through the blocking path).
    pub fn slow_reads(&self) -> u64 {
        self.slow_reads.load(Ordering::SeqCst)
    }

    /// The delay of a read of `[offset, offset+len)` if it touches a slow range.
    fn slow_delay(&self, offset: u64, len: u64) -> Option<Duration> {
        let slow = lock(&self.slow);
        let (ranges, delay) = slow.as_ref()?;
        let end = offset.saturating_add(len);
        ranges
            .iter()
            .any(|r| r.start < end && offset < r.end)
            .then_some(*delay)
    }

    /// Make every operation fail with `TargetError::Io`.
    pub fn set_fail_io(&self, fail: bool) {
        self.fail_io.store(fail, Ordering::SeqCst);
    }

    /// Make `flush` block until the returned hold is released or dropped (dropping it on a test
    /// failure keeps blocked flushes from hanging the runtime's shutdown).
    pub fn hold_flushes(&self) -> Hold<'_> {
        self.gate.hold()
    }

    /// Say that writes of `len` bytes or more wait for a device (`BlockTarget::write_waits`),
    /// as a volume's large `O_DIRECT` writes do; `None`: no write does.
    pub fn set_device_writes_from(&self, len: Option<usize>) {
        *lock(&self.device_writes_from) = len;
    }

    /// Make writes that wait for the device block in `write` until the returned hold is released
    /// or dropped.
    pub fn hold_device_writes(&self) -> Hold<'_> {
        self.device_gate.hold()
    }

    fn record(&self, op: Op) {
        lock(&self.ops).push(op);
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<(), TargetError> {
        if self.fail_io.load(Ordering::SeqCst) {
            return Err(TargetError::Io("injected failure".into()));
        }
        if write && self.read_only {
            return Err(TargetError::ReadOnly);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(TargetError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn ack(&self) -> WriteAck {
        let pending = lock(&self.ack_gate).clone().map(|mut released| {
            Box::pin(async move {
                let _ = released.wait_for(|released| *released).await;
                Ok(())
            }) as crate::PendingAck
        });
        WriteAck {
            throttle: *lock(&self.throttle),
            pending,
        }
    }

    /// Until the returned hold is released, writes are applied at once but their
    /// acknowledgements stay pending (what a sync-mode DTL round trip looks like to a frontend).
    pub fn hold_acks(&self) -> AckHold<'_> {
        let (release, released) = tokio::sync::watch::channel(false);
        *lock(&self.ack_gate) = Some(released);
        AckHold {
            target: self,
            release,
        }
    }

    fn store(dev: &mut Device, offset: u64, data: &[u8]) {
        let start = offset as usize;
        dev.data[start..start + data.len()].copy_from_slice(data);
        if !data.is_empty() {
            let first = offset / ALLOC_BLOCK;
            let last = (offset + data.len() as u64 - 1) / ALLOC_BLOCK;
            for b in first..=last {
                dev.allocated[b as usize] = true;
            }
        }
    }

    /// Zero `[offset, offset+len)`; blocks entirely inside become holes unless `allocate`, in
    /// which case every touched block becomes allocated.
    fn zero(dev: &mut Device, offset: u64, len: u64, allocate: bool) {
        dev.data[offset as usize..(offset + len) as usize].fill(0);
        if len == 0 {
            return;
        }
        let first_touched = offset / ALLOC_BLOCK;
        let last_touched = (offset + len - 1) / ALLOC_BLOCK;
        for b in first_touched..=last_touched {
            let block_start = b * ALLOC_BLOCK;
            let whole = block_start >= offset && block_start + ALLOC_BLOCK <= offset + len;
            if allocate {
                dev.allocated[b as usize] = true;
            } else if whole {
                dev.allocated[b as usize] = false;
            }
        }
    }
}

impl BlockTarget for MemTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        self.record(Op::Read {
            offset,
            len: buf.len() as u64,
        });
        self.check(offset, buf.len() as u64, false)?;
        if let Some(delay) = self.slow_delay(offset, buf.len() as u64) {
            // Stands in for a backend round trip.
            std::thread::sleep(delay);
            self.slow_reads.fetch_add(1, Ordering::SeqCst);
        }
        let dev = lock(&self.device);
        buf.copy_from_slice(&dev.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadAttempt, TargetError> {
        if self.slow_delay(offset, buf.len() as u64).is_some() {
            return Ok(ReadAttempt::WouldBlock);
        }
        self.read(offset, buf).map(|()| ReadAttempt::Done)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<WriteAck, TargetError> {
        let refuse = lock(&self.refuse_next_write).take();
        if let Some(closing) = refuse {
            closing();
            return Err(TargetError::Io(
                "injected: the volume refuses writes (its gate closed)".into(),
            ));
        }
        self.record(Op::Write {
            offset,
            len: data.len() as u64,
            fua,
        });
        self.check(offset, data.len() as u64, true)?;
        if self.write_waits(data.len()) || self.write_reads_backend(offset, data.len() as u64) {
            self.device_gate.pass();
        }
        Self::store(&mut lock(&self.device), offset, data);
        Ok(self.ack())
    }

    fn write_waits(&self, len: usize) -> bool {
        lock(&self.device_writes_from).is_some_and(|from| len >= from)
    }

    fn write_reads_backend(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        let partial = |at: u64| {
            let block = at - at % ALLOC_BLOCK;
            !at.is_multiple_of(ALLOC_BLOCK) && self.slow_delay(block, ALLOC_BLOCK).is_some()
        };
        partial(offset) || partial(end)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<WriteAck, TargetError> {
        self.record(Op::Discard { offset, len });
        self.check(offset, len, true)?;
        if self.write_reads_backend(offset, len) {
            self.device_gate.pass();
        }
        Self::zero(&mut lock(&self.device), offset, len, false);
        Ok(WriteAck::default())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allocate: bool,
        fua: bool,
    ) -> Result<WriteAck, TargetError> {
        self.record(Op::WriteZeroes {
            offset,
            len,
            allocate,
            fua,
        });
        self.check(offset, len, true)?;
        if self.write_reads_backend(offset, len) {
            self.device_gate.pass();
        }
        Self::zero(&mut lock(&self.device), offset, len, allocate);
        Ok(self.ack())
    }

    fn flush(&self) -> Result<(), TargetError> {
        self.record(Op::Flush);
        if self.fail_io.load(Ordering::SeqCst) {
            return Err(TargetError::Io("injected failure".into()));
        }
        self.gate.pass();
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, TargetError> {
        self.record(Op::BlockStatus { offset, len });
        self.check(offset, len, false)?;
        let dev = lock(&self.device);
        let end = offset + len;
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / ALLOC_BLOCK;
            let next = ((block + 1) * ALLOC_BLOCK).min(end);
            let hole = !dev.allocated[block as usize];
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.length += next - pos,
                _ => extents.push(Extent {
                    length: next - pos,
                    hole,
                }),
            }
            pos = next;
        }
        Ok(extents)
    }
}

/// Calls that pass a [`MemTarget`]'s gate block while this exists: flushes
/// ([`MemTarget::hold_flushes`]) or writes that wait for the device
/// ([`MemTarget::hold_device_writes`]).
pub struct Hold<'a> {
    gate: &'a Gate,
    entered: mpsc::UnboundedReceiver<()>,
}

impl Hold<'_> {
    /// Wait until one more call is blocked on this hold.
    pub async fn started(&mut self) {
        self.entered
            .recv()
            .await
            .expect("the target keeps the sender while held");
    }

    /// Let held and future calls through.
    pub fn release(self) {}
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        *lock(&self.gate.entered) = None;
        *lock(&self.gate.held) = false;
        self.gate.released.notify_all();
    }
}

/// A name → target map.
#[derive(Default)]
pub struct MemRegistry {
    exports: Mutex<BTreeMap<String, Arc<dyn BlockTarget>>>,
}

impl MemRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, name: &str, target: Arc<dyn BlockTarget>) {
        lock(&self.exports).insert(name.to_owned(), target);
    }

    pub fn remove(&self, name: &str) -> bool {
        lock(&self.exports).remove(name).is_some()
    }
}

impl ExportRegistry for MemRegistry {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockTarget>> {
        lock(&self.exports).get(name).cloned()
    }

    fn list(&self) -> Vec<String> {
        lock(&self.exports).keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_follows_writes_discards_and_zeroes() {
        let t = MemTarget::new(8 * ALLOC_BLOCK);
        t.write(512, &[1; 512], false).unwrap();
        t.write(3 * ALLOC_BLOCK, &[2; 8192], false).unwrap();
        assert_eq!(
            t.allocation(),
            [true, false, false, true, true, false, false, false]
        );
        // Partial discard keeps the block allocated but zeroes the bytes.
        t.discard(0, 1024).unwrap();
        assert!(t.allocation()[0]);
        assert_eq!(t.contents(512, 512), vec![0; 512]);
        t.discard(3 * ALLOC_BLOCK, ALLOC_BLOCK).unwrap();
        assert!(!t.allocation()[3]);
        t.write_zeroes(6 * ALLOC_BLOCK, ALLOC_BLOCK, true, false)
            .unwrap();
        assert!(t.allocation()[6]);
        let map = t.block_status(0, 8 * ALLOC_BLOCK).unwrap();
        let expect = [
            (4096, false),
            (12288, true),
            (4096, false),
            (4096, true),
            (4096, false),
            (4096, true),
        ];
        assert_eq!(
            map,
            expect
                .iter()
                .map(|&(length, hole)| Extent { length, hole })
                .collect::<Vec<_>>()
        );
        assert_eq!(
            t.block_status(512, 1024).unwrap(),
            vec![Extent {
                length: 1024,
                hole: false
            }]
        );
        assert!(matches!(
            t.read(8 * ALLOC_BLOCK, &mut [0; 512]),
            Err(TargetError::OutOfRange { .. })
        ));
    }
}

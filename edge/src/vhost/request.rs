//! One virtio-blk request: parsing a descriptor chain into a [`Request`] and executing it against a
//! [`BlockTarget`].
//!
//! # Layout
//!
//! Virtio 1.x devices must not assume a descriptor layout (VIRTIO_F_VERSION_1 implies
//! ANY_LAYOUT), so the chain is treated as two byte streams, as QEMU's own virtio-blk does:
//!
//! * the device-readable stream: the 16-byte `virtio_blk_outhdr` (type, ioprio, sector), then the
//!   payload of `OUT`, or the `virtio_blk_discard_write_zeroes` segment of `DISCARD` and
//!   `WRITE_ZEROES`;
//! * the device-writable stream: the payload of `IN` and `GET_ID`, then the 1-byte status as its
//!   very last byte.
//!
//! Drivers in practice (Linux, QEMU's block layer, libblkio) use one descriptor for the header,
//! one per data segment and a 1-byte status descriptor; that is the common case of the above.
//!
//! # Validation
//!
//! Everything the guest controls is checked before the target is touched:
//!
//! * the chain has at most `max_descs` descriptors and every readable descriptor precedes every
//!   writable one;
//! * every descriptor lies inside guest memory (checked ranges, overflow-safe address arithmetic);
//! * the header is complete, the payload has the writability its type requires, `IN`/`OUT`
//!   payloads are whole sectors, `sector * 512 + len` does not overflow or pass the end of the
//!   device, and discard/write-zeroes carry exactly one segment with known flags.
//!
//! A chain whose status byte cannot be located (no writable byte at all, or the status outside
//! guest memory) is returned with used length 0 and nothing else happens. Any other bad chain gets
//! `VIRTIO_BLK_S_IOERR` (malformed, out of range, read-only) or `VIRTIO_BLK_S_UNSUPP` (unknown
//! type, flags or more segments than advertised).
//!
//! Guest memory is only accessed through vm-memory's checked, volatile-safe `Bytes` accessors,
//! copying into or out of a bounce buffer that we own; no `&[u8]` is ever formed over guest memory
//! (the guest may change it concurrently). Payloads are moved in chunks of at most
//! [`BOUNCE_CHUNK`] bytes so a huge request cannot make the backend allocate gigabytes.

use std::time::Duration;

use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap};

use crate::target::{BlockTarget, PendingAck, ReadAttempt, ReadFuture, TargetError};

/// The guest memory type of the backend: plain mmap regions, no dirty bitmap (live migration's
/// dirty logging is not offered).
pub(crate) type GuestMem = GuestMemoryMmap<()>;

/// Virtio-blk addresses in 512-byte sectors whatever the advertised block size.
pub(crate) const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: u64 = 16;
const DWZ_SEGMENT_LEN: u64 = 16;
/// Length of the `GET_ID` serial.
pub(crate) const ID_LEN: usize = 20;
/// Largest piece of payload moved between guest memory and the target in one call.
pub(crate) const BOUNCE_CHUNK: usize = 1 << 20;
/// Advertised `max_discard_sectors` (1 GiB).
pub(crate) const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Advertised `max_write_zeroes_sectors` (1 GiB).
pub(crate) const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;

pub(crate) const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(crate) const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(crate) const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// A guest-physical byte range named by a descriptor (or part of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u64,
}

/// What the device is asked to do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RequestKind {
    /// `IN`: read `len` bytes at `offset` into `data` (device-writable).
    Read {
        offset: u64,
        len: u64,
        data: Vec<Segment>,
    },
    /// `OUT`: write the `len` bytes of `data` (device-readable) at `offset`.
    Write {
        offset: u64,
        len: u64,
        data: Vec<Segment>,
    },
    Flush,
    /// `GET_ID`: the serial goes into `data` (device-writable), truncated to its length.
    GetId {
        data: Vec<Segment>,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

/// A validated request and where its status byte goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub status: GuestAddress,
    pub kind: RequestKind,
}

/// Result of parsing a chain.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// No usable status byte: return the chain with used length 0.
    NoStatus(&'static str),
    /// Rejected: write `code` to `status`, used length 1.
    Rejected {
        status: GuestAddress,
        code: u8,
        reason: &'static str,
    },
    Request(Request),
}

/// Device properties the parser checks requests against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most descriptors a chain may have (`seg_max` + header + status).
    pub max_descs: usize,
    /// Device size in bytes (a multiple of 512).
    pub capacity: u64,
    pub read_only: bool,
}

/// Reads and writes a sequence of segments as one byte stream.
struct Cursor<'a> {
    segs: &'a [Segment],
    idx: usize,
    off: u64,
}

impl<'a> Cursor<'a> {
    fn new(segs: &'a [Segment]) -> Self {
        Self {
            segs,
            idx: 0,
            off: 0,
        }
    }

    /// Runs `f(guest address, byte range of the buffer)` over the next `len` bytes of the stream.
    fn walk(
        &mut self,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), GuestMemoryError>,
    ) -> Result<(), GuestMemoryError> {
        let mut done = 0usize;
        while done < len {
            let Some(seg) = self.segs.get(self.idx) else {
                return Err(GuestMemoryError::PartialBuffer {
                    expected: len,
                    completed: done,
                });
            };
            let n = (seg.len - self.off).min((len - done) as u64) as usize;
            // Segments were range-checked against guest memory, so `addr + off` cannot overflow.
            let addr = GuestAddress(seg.addr.0 + self.off);
            f(addr, done..done + n)?;
            done += n;
            self.off += n as u64;
            if self.off == seg.len {
                self.idx += 1;
                self.off = 0;
            }
        }
        Ok(())
    }

    /// Fill `out` from guest memory.
    fn read_into(&mut self, mem: &GuestMem, out: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.walk(out.len(), |addr, range| {
            mem.read_slice(&mut out[range], addr)
        })
    }

    /// Copy `data` into guest memory.
    fn write_from(&mut self, mem: &GuestMem, data: &[u8]) -> Result<(), GuestMemoryError> {
        self.walk(data.len(), |addr, range| {
            mem.write_slice(&data[range], addr)
        })
    }

    /// The part of the stream not consumed yet.
    fn rest(&self) -> Vec<Segment> {
        let mut out = Vec::with_capacity(self.segs.len().saturating_sub(self.idx));
        if let Some(first) = self.segs.get(self.idx) {
            out.push(Segment {
                addr: GuestAddress(first.addr.0 + self.off),
                len: first.len - self.off,
            });
            out.extend_from_slice(&self.segs[self.idx + 1..]);
        }
        out
    }
}

fn total_len(segs: &[Segment]) -> u64 {
    // Each length is < 2^32 and there are at most `max_descs` (< 2^16) of them: no overflow.
    segs.iter().map(|s| s.len).sum()
}

fn in_guest_memory(mem: &GuestMem, seg: &Segment) -> bool {
    let Ok(len) = usize::try_from(seg.len) else {
        return false;
    };
    seg.addr.0.checked_add(seg.len).is_some() && mem.check_range(seg.addr, len)
}

/// Byte offset of `[sector * 512, + len)` if it lies inside the device.
fn device_range(sector: u64, len: u64, capacity: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= capacity).then_some(offset)
}

/// Parse and validate one chain (see the module docs).
pub(crate) fn parse(
    descs: impl Iterator<Item = Descriptor>,
    mem: &GuestMem,
    limits: &Limits,
) -> Parsed {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut count = 0usize;
    let mut too_many = false;
    let mut misordered = false;
    let mut seen_writable = false;
    // The last non-empty writable descriptor holds the status byte. Tracked even past the
    // descriptor limit so an over-long chain can still be failed properly.
    let mut last_writable: Option<Segment> = None;

    for desc in descs {
        count += 1;
        let seg = Segment {
            addr: desc.addr(),
            len: u64::from(desc.len()),
        };
        if desc.is_write_only() {
            seen_writable = true;
            if seg.len > 0 {
                last_writable = Some(seg);
            }
        } else if seen_writable {
            misordered = true;
        }
        if count > limits.max_descs {
            too_many = true;
            continue;
        }
        if seg.len == 0 {
            continue;
        }
        if desc.is_write_only() {
            writable.push(seg);
        } else {
            readable.push(seg);
        }
    }

    let Some(last) = last_writable else {
        return Parsed::NoStatus("chain has no device-writable byte for the status");
    };
    let Some(status) = last.addr.0.checked_add(last.len - 1).map(GuestAddress) else {
        return Parsed::NoStatus("status descriptor wraps the address space");
    };
    if !mem.check_range(status, 1) {
        return Parsed::NoStatus("status byte is outside guest memory");
    }
    let reject = |code, reason| Parsed::Rejected {
        status,
        code,
        reason,
    };
    if too_many {
        return reject(
            STATUS_IOERR,
            "chain has more descriptors than seg_max allows",
        );
    }
    if misordered {
        return reject(
            STATUS_IOERR,
            "device-readable descriptor after a writable one",
        );
    }
    // Take the status byte off the writable stream: `last` is its final element here.
    if let Some(tail) = writable.last_mut() {
        tail.len -= 1;
        if tail.len == 0 {
            writable.pop();
        }
    }
    if !readable
        .iter()
        .chain(writable.iter())
        .all(|s| in_guest_memory(mem, s))
    {
        return reject(STATUS_IOERR, "descriptor outside guest memory");
    }

    let readable_len = total_len(&readable);
    let in_len = total_len(&writable);
    if readable_len < HEADER_LEN {
        return reject(STATUS_IOERR, "request header is missing or short");
    }
    let mut stream = Cursor::new(&readable);
    let mut header = [0u8; HEADER_LEN as usize];
    if stream.read_into(mem, &mut header).is_err() {
        return reject(STATUS_IOERR, "cannot read the request header");
    }
    let req_type = le_u32(&header, 0);
    let sector = le_u64(&header, 8);
    let out_len = readable_len - HEADER_LEN;

    let kind = match req_type {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return reject(STATUS_IOERR, "IN request with device-readable payload");
            }
            if !in_len.is_multiple_of(SECTOR_SIZE) {
                return reject(STATUS_IOERR, "IN length is not a multiple of 512");
            }
            let Some(offset) = device_range(sector, in_len, limits.capacity) else {
                return reject(STATUS_IOERR, "IN request beyond the end of the device");
            };
            RequestKind::Read {
                offset,
                len: in_len,
                data: writable,
            }
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return reject(STATUS_IOERR, "OUT request with device-writable payload");
            }
            if !out_len.is_multiple_of(SECTOR_SIZE) {
                return reject(STATUS_IOERR, "OUT length is not a multiple of 512");
            }
            if limits.read_only {
                return reject(STATUS_IOERR, "OUT request on a read-only device");
            }
            let Some(offset) = device_range(sector, out_len, limits.capacity) else {
                return reject(STATUS_IOERR, "OUT request beyond the end of the device");
            };
            RequestKind::Write {
                offset,
                len: out_len,
                data: stream.rest(),
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if in_len != 0 || out_len != 0 {
                return reject(STATUS_IOERR, "FLUSH request with a payload");
            }
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 {
                return reject(STATUS_IOERR, "GET_ID request with device-readable payload");
            }
            RequestKind::GetId { data: writable }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            if in_len != 0 {
                return reject(
                    STATUS_IOERR,
                    "discard/write-zeroes with device-writable payload",
                );
            }
            if out_len == 0 || !out_len.is_multiple_of(DWZ_SEGMENT_LEN) {
                return reject(
                    STATUS_IOERR,
                    "discard/write-zeroes payload is not whole segments",
                );
            }
            if out_len > DWZ_SEGMENT_LEN {
                return reject(
                    STATUS_UNSUPP,
                    "more discard/write-zeroes segments than advertised",
                );
            }
            let mut seg = [0u8; DWZ_SEGMENT_LEN as usize];
            if stream.read_into(mem, &mut seg).is_err() {
                return reject(STATUS_IOERR, "cannot read the discard/write-zeroes segment");
            }
            let start = le_u64(&seg, 0);
            let sectors = le_u32(&seg, 8);
            let flags = le_u32(&seg, 12);
            let (known_flags, max_sectors) = if discard {
                // The spec reserves UNMAP for write-zeroes; a discard always unmaps.
                (0, MAX_DISCARD_SECTORS)
            } else {
                (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, MAX_WRITE_ZEROES_SECTORS)
            };
            if flags & !known_flags != 0 {
                return reject(STATUS_UNSUPP, "unknown discard/write-zeroes flags");
            }
            if sectors > max_sectors {
                return reject(STATUS_IOERR, "discard/write-zeroes larger than advertised");
            }
            if limits.read_only {
                return reject(STATUS_IOERR, "discard/write-zeroes on a read-only device");
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let Some(offset) = device_range(start, len, limits.capacity) else {
                return reject(
                    STATUS_IOERR,
                    "discard/write-zeroes beyond the end of the device",
                );
            };
            if discard {
                RequestKind::Discard { offset, len }
            } else {
                RequestKind::WriteZeroes {
                    offset,
                    len,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            }
        }
        _ => return reject(STATUS_UNSUPP, "unsupported request type"),
    };
    Parsed::Request(Request { status, kind })
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub status: u8,
    /// Payload bytes written into guest memory (the used length is this plus the status byte).
    pub written: u64,
    /// Backpressure asked for by the target (see [`crate::WriteAck`]).
    pub throttle: Option<Duration>,
}

impl Outcome {
    fn new(status: u8, written: u64) -> Self {
        Self {
            status,
            written,
            throttle: None,
        }
    }
}

/// Whether `kind` must leave the queue thread: it waits for durability (fsync) when `fua` is set
/// (writethrough mode) or always for FLUSH, or it is a write that waits for a device
/// ([`BlockTarget::write_waits`]: large writes that go to the disk with `O_DIRECT`), which then
/// runs on the blocking pool so that several reach the disk at once, as over NBD, or a write,
/// discard or write-zeroes that must first fetch data from a remote backend
/// ([`BlockTarget::write_reads_backend`]), which would hold up the queue for a network round
/// trip (for as long as the backend's retries last, when it is down).
pub(crate) fn is_blocking(kind: &RequestKind, fua: bool, target: &dyn BlockTarget) -> bool {
    match kind {
        RequestKind::Flush => true,
        RequestKind::Write { offset, len, .. } => {
            fua || usize::try_from(*len).is_ok_and(|len| target.write_waits(len))
                || target.write_reads_backend(*offset, *len)
        }
        RequestKind::WriteZeroes { offset, len, .. } => {
            fua || target.write_reads_backend(*offset, *len)
        }
        RequestKind::Discard { offset, len } => target.write_reads_backend(*offset, *len),
        _ => false,
    }
}

fn target_failed(op: &'static str, offset: u64, len: u64, e: &TargetError) -> Outcome {
    match e {
        TargetError::Io(_) => warn!(op, offset, len, error = %e, "vhost-user-blk request failed"),
        _ => debug!(op, offset, len, error = %e, "vhost-user-blk request failed"),
    }
    Outcome::new(STATUS_IOERR, 0)
}

fn max_throttle(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Run a validated request. `bounce` is scratch space (grown up to [`BOUNCE_CHUNK`]); `fua` makes
/// writes durable before they complete. Waits for the backend and for any pending
/// acknowledgement on this thread.
pub(crate) fn execute(
    kind: &RequestKind,
    mem: &GuestMem,
    target: &dyn BlockTarget,
    fua: bool,
    id: &[u8; ID_LEN],
    bounce: &mut Vec<u8>,
) -> Outcome {
    let mut pending = Vec::new();
    let outcome = run(kind, mem, target, fua, id, bounce, &mut pending, true)
        .unwrap_or_else(|| Outcome::new(STATUS_IOERR, 0));
    settle(
        outcome,
        pending.into_iter().map(futures::executor::block_on),
    )
}

/// The outcome of a request once its pending acknowledgements settled: any failure fails it.
pub(crate) fn settle(
    outcome: Outcome,
    acks: impl IntoIterator<Item = Result<(), TargetError>>,
) -> Outcome {
    for ack in acks {
        if let Err(e) = ack {
            return target_failed("write acknowledgement", 0, 0, &e);
        }
    }
    outcome
}

/// Like [`execute`], for the queue thread: it does not wait for the backend, and
/// acknowledgements the target left pending (a sync-mode DTL round trip) are handed back in
/// `pending`: the request's status must not be published before they all complete, and the caller
/// decides where to wait for them.
///
/// `None`: a read whose data is (partly) only on the backend (`ReadAttempt::WouldBlock`); nothing
/// is complete, and the caller runs it with [`execute`] where waiting is allowed. Guest memory may
/// have been partly written meanwhile; that is harmless, the status is not published yet.
pub(crate) fn execute_deferrable(
    kind: &RequestKind,
    mem: &GuestMem,
    target: &dyn BlockTarget,
    fua: bool,
    id: &[u8; ID_LEN],
    bounce: &mut Vec<u8>,
    pending: &mut Vec<PendingAck>,
) -> Option<Outcome> {
    run(kind, mem, target, fua, id, bounce, pending, false)
}

/// Run a request; with `may_block` false, reads use `try_read` and `None` means "would block".
#[allow(clippy::too_many_arguments)]
fn run(
    kind: &RequestKind,
    mem: &GuestMem,
    target: &dyn BlockTarget,
    fua: bool,
    id: &[u8; ID_LEN],
    bounce: &mut Vec<u8>,
    pending: &mut Vec<PendingAck>,
    may_block: bool,
) -> Option<Outcome> {
    let outcome = match kind {
        RequestKind::Read { offset, len, data } => {
            let mut cursor = Cursor::new(data);
            let mut done = 0u64;
            while done < *len {
                let n = (*len - done).min(BOUNCE_CHUNK as u64) as usize;
                if bounce.len() < n {
                    bounce.resize(n, 0);
                }
                let at = offset + done;
                let attempt = if may_block {
                    target
                        .read(at, &mut bounce[..n])
                        .map(|()| ReadAttempt::Done)
                } else {
                    target.try_read(at, &mut bounce[..n])
                };
                match attempt {
                    Ok(ReadAttempt::Done) => {}
                    Ok(ReadAttempt::WouldBlock) => return None,
                    Err(e) => {
                        return Some(Outcome {
                            written: done,
                            ..target_failed("read", *offset, *len, &e)
                        })
                    }
                }
                if cursor.write_from(mem, &bounce[..n]).is_err() {
                    debug!(offset, len, "IN request: guest buffer became inaccessible");
                    return Some(Outcome::new(STATUS_IOERR, done));
                }
                done += n as u64;
            }
            Outcome::new(STATUS_OK, done)
        }
        RequestKind::Write { offset, len, data } => {
            let mut cursor = Cursor::new(data);
            let mut done = 0u64;
            let mut throttle = None;
            while done < *len {
                let n = (*len - done).min(BOUNCE_CHUNK as u64) as usize;
                if bounce.len() < n {
                    bounce.resize(n, 0);
                }
                if cursor.read_into(mem, &mut bounce[..n]).is_err() {
                    debug!(offset, len, "OUT request: guest buffer became inaccessible");
                    return Some(Outcome::new(STATUS_IOERR, 0));
                }
                match target.write(offset + done, &bounce[..n], fua) {
                    Ok(mut ack) => {
                        pending.extend(ack.pending.take());
                        throttle = max_throttle(throttle, ack.throttle);
                    }
                    Err(e) => return Some(target_failed("write", *offset, *len, &e)),
                }
                done += n as u64;
            }
            Outcome {
                status: STATUS_OK,
                written: 0,
                throttle,
            }
        }
        RequestKind::Flush => match target.flush() {
            Ok(()) => Outcome::new(STATUS_OK, 0),
            Err(e) => target_failed("flush", 0, 0, &e),
        },
        RequestKind::GetId { data } => {
            let n = (total_len(data) as usize).min(ID_LEN);
            if Cursor::new(data).write_from(mem, &id[..n]).is_err() {
                return Some(Outcome::new(STATUS_IOERR, 0));
            }
            Outcome::new(STATUS_OK, n as u64)
        }
        RequestKind::Discard { offset, len } => match target.discard(*offset, *len) {
            Ok(mut ack) => {
                pending.extend(ack.pending.take());
                Outcome {
                    status: STATUS_OK,
                    written: 0,
                    throttle: ack.throttle,
                }
            }
            Err(e) => target_failed("discard", *offset, *len, &e),
        },
        RequestKind::WriteZeroes { offset, len, unmap } => {
            match target.write_zeroes(*offset, *len, !unmap, fua) {
                Ok(mut ack) => {
                    pending.extend(ack.pending.take());
                    Outcome {
                        status: STATUS_OK,
                        written: 0,
                        throttle: ack.throttle,
                    }
                }
                Err(e) => target_failed("write_zeroes", *offset, *len, &e),
            }
        }
    };
    Some(outcome)
}

/// An `IN` request as reads of an asynchronous target (`BlockTarget::read_async`), one per
/// [`BOUNCE_CHUNK`] piece, or `None` when the target does not offer them (or `kind` is no read).
pub(crate) fn read_async(kind: &RequestKind, target: &dyn BlockTarget) -> Option<Vec<ReadFuture>> {
    let RequestKind::Read { offset, len, .. } = kind else {
        return None;
    };
    let mut reads = Vec::new();
    let mut done = 0u64;
    while done < *len {
        let n = (*len - done).min(BOUNCE_CHUNK as u64) as usize;
        reads.push(target.read_async(offset + done, n)?);
        done += n as u64;
    }
    Some(reads)
}

/// Copy the pieces [`read_async`] produced into the request's guest buffers.
pub(crate) fn finish_read(
    kind: &RequestKind,
    mem: &GuestMem,
    pieces: Vec<Result<bytes::Bytes, TargetError>>,
) -> Outcome {
    let RequestKind::Read { offset, len, data } = kind else {
        return Outcome::new(STATUS_IOERR, 0);
    };
    let mut cursor = Cursor::new(data);
    let mut done = 0u64;
    for piece in pieces {
        let piece = match piece {
            Ok(piece) => piece,
            Err(e) => {
                return Outcome {
                    written: done,
                    ..target_failed("read", *offset, *len, &e)
                }
            }
        };
        let want = (*len - done).min(BOUNCE_CHUNK as u64) as usize;
        if piece.len() != want {
            let e = TargetError::Io(format!("read returned {} bytes, not {want}", piece.len()));
            return Outcome {
                written: done,
                ..target_failed("read", *offset, *len, &e)
            };
        }
        if cursor.write_from(mem, &piece).is_err() {
            debug!(offset, len, "IN request: guest buffer became inaccessible");
            return Outcome::new(STATUS_IOERR, done);
        }
        done += piece.len() as u64;
    }
    Outcome::new(STATUS_OK, done)
}

/// The `GET_ID` serial for an export: its name, truncated or zero-padded to 20 bytes.
pub(crate) fn serial(name: &str) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let n = name.len().min(ID_LEN);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);
    id
}

/// The little-endian `u32` at `at` of a header whose length the caller has checked.
fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The little-endian `u64` at `at` of a header whose length the caller has checked.
fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

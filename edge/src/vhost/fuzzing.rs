//! Entry point for the fuzz target `vhost_request` (`fuzz/`, feature `fuzzing`).
//!
//! The chain parser is private to the backend, so the fuzzer calls it here: the input describes
//! a descriptor chain and the guest memory it points into, the parser validates it against a
//! small device, and a request it accepts is executed against an in-memory target. The checks
//! are the parser's promises (module docs of `request`): every accepted segment lies in guest
//! memory, `offset + len` lies inside the device, a read-only device never gets a write.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::request::{self, GuestMem, Limits, Parsed, RequestKind, Segment, ID_LEN};
use crate::testing::MemTarget;

/// Guest memory: two regions with a hole between them, so descriptors can straddle a gap.
const REGION0: (u64, usize) = (0, 64 << 10);
const REGION1: (u64, usize) = (0x2_0000, 16 << 10);
/// Device size.
pub const CAPACITY: u64 = 256 << 10;
/// Bytes per descriptor in the input.
pub const DESC_LEN: usize = 13;

/// One descriptor of a fuzz input: where it points, how long, whether it is device-writable.
#[derive(Debug, Clone, Copy)]
pub struct FuzzDesc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// Encodes an input: a flags byte (bit 0: read-only device; bits 1..: `max_descs`), the number
/// of descriptors, the descriptors, then the bytes that fill guest memory from address 0.
pub fn encode_input(read_only: bool, max_descs: u8, descs: &[FuzzDesc], memory: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(read_only) | (max_descs << 1), descs.len() as u8];
    for d in descs {
        out.extend_from_slice(&d.addr.to_le_bytes());
        out.extend_from_slice(&d.len.to_le_bytes());
        out.push(u8::from(d.writable));
    }
    out.extend_from_slice(memory);
    out
}

fn decode_input(input: &[u8]) -> Option<(bool, usize, Vec<FuzzDesc>, &[u8])> {
    let (&flags, rest) = input.split_first()?;
    let (&count, mut rest) = rest.split_first()?;
    let mut descs = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let (d, tail) = rest.split_at_checked(DESC_LEN)?;
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&d[at..at + 4]);
            u64::from_le_bytes(b)
        };
        descs.push(FuzzDesc {
            addr: word(0) | (word(4) << 32),
            len: word(8) as u32,
            writable: d[12] & 1 != 0,
        });
        rest = tail;
    }
    Some((flags & 1 != 0, usize::from(flags >> 1).max(1), descs, rest))
}

fn in_memory(mem: &GuestMem, seg: &Segment) -> bool {
    usize::try_from(seg.len).is_ok_and(|len| mem.check_range(seg.addr, len))
}

/// Parses (and, if valid, executes) the chain `input` describes; panics if the parser breaks
/// one of its promises.
pub fn parse_chain(input: &[u8]) {
    let Some((read_only, max_descs, descs, memory)) = decode_input(input) else {
        return;
    };
    let Ok(mem) = GuestMem::from_ranges(&[
        (GuestAddress(REGION0.0), REGION0.1),
        (GuestAddress(REGION1.0), REGION1.1),
    ]) else {
        return;
    };
    let fill = &memory[..memory.len().min(REGION0.1)];
    if mem.write_slice(fill, GuestAddress(0)).is_err() {
        return;
    }
    let limits = Limits {
        max_descs,
        capacity: CAPACITY,
        read_only,
    };
    let chain = descs.iter().enumerate().map(|(i, d)| {
        let flags = if d.writable {
            virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        virtio_queue::desc::split::Descriptor::new(d.addr, d.len, flags, i as u16 + 1)
    });
    let req = match request::parse(chain, &mem, &limits) {
        Parsed::NoStatus(_) => return,
        Parsed::Rejected { status, .. } => {
            assert!(mem.check_range(status, 1), "rejected status outside memory");
            return;
        }
        Parsed::Request(req) => req,
    };
    assert!(mem.check_range(req.status, 1), "status outside memory");
    match &req.kind {
        RequestKind::Read { offset, len, data } | RequestKind::Write { offset, len, data } => {
            assert!(
                data.iter().all(|s| in_memory(&mem, s)),
                "segment outside memory"
            );
            assert_eq!(*len, data.iter().map(|s| s.len).sum::<u64>(), "length");
            assert!(offset.checked_add(*len).is_some_and(|end| end <= CAPACITY));
            assert!(offset % 512 == 0 && len % 512 == 0, "not whole sectors");
            let is_write = matches!(req.kind, RequestKind::Write { .. });
            assert!(
                !(is_write && read_only),
                "write accepted on a read-only device"
            );
        }
        RequestKind::GetId { data } => {
            assert!(
                data.iter().all(|s| in_memory(&mem, s)),
                "segment outside memory"
            );
        }
        RequestKind::Discard { offset, len } | RequestKind::WriteZeroes { offset, len, .. } => {
            assert!(offset.checked_add(*len).is_some_and(|end| end <= CAPACITY));
            assert!(!read_only, "discard accepted on a read-only device");
        }
        RequestKind::Flush => {}
    }
    let target = if read_only {
        MemTarget::new_read_only(CAPACITY)
    } else {
        MemTarget::new(CAPACITY)
    };
    let mut bounce = Vec::new();
    let outcome = request::execute(&req.kind, &mem, &target, false, &[0; ID_LEN], &mut bounce);
    if let RequestKind::Read { len, .. } = req.kind {
        assert!(outcome.written <= len, "wrote more than asked");
    }
}

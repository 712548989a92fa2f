//! The virtio-blk configuration space and feature bits we offer.

use vm_memory::ByteValued;

/// Offset of `writeback` in the configuration space (the only field the driver may write).
pub(crate) const WRITEBACK_OFFSET: usize = 32;

/// `struct virtio_blk_config` up to the write-zeroes fields (the secure-erase and zoned fields
/// belong to features we do not offer). All multi-byte fields are little-endian.
///
/// `virtio_bindings::virtio_blk::virtio_blk_config` does not implement `ByteValued` and carries the
/// zoned fields, hence this copy.
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct VirtioBlockConfig {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
}

const _: () = assert!(std::mem::size_of::<VirtioBlockConfig>() == 60);
const _: () = assert!(std::mem::offset_of!(VirtioBlockConfig, writeback) == WRITEBACK_OFFSET);
const _: () = assert!(std::mem::offset_of!(VirtioBlockConfig, max_discard_sectors) == 36);
const _: () = assert!(std::mem::offset_of!(VirtioBlockConfig, write_zeroes_may_unmap) == 56);

// SAFETY: `VirtioBlockConfig` is `repr(C, packed)` and made only of integers and byte arrays, so
// it has no padding and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioBlockConfig {}

impl VirtioBlockConfig {
    /// The bytes `[offset, offset + size)` of the configuration space, zero beyond its end (the
    /// vhost-user reply must have exactly the requested size).
    pub(crate) fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(bytes.len());
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }
}

//! Compression of a preset's objects in independent blocks, so partial reads stay partial.
//!
//! A namespace whose preset compresses (`vstor preset create --compression zstd|lz4`) stores
//! every object as the *container* below, which is then encrypted (if the preset encrypts) and
//! erasure-coded like any object. Each [`BLOCK`] (64 KiB) of object data is compressed on its
//! own, so a 4 KiB read decompresses one block and asks the OSDs only for that block's stored
//! bytes (plus, once per object version, the block index at the container's start). A block
//! that does not shrink is stored raw. Compressing the whole object as one stream would ratio
//! a little better but make every small read fetch and decompress everything before it.
//!
//! Whether a namespace's objects are containers is fixed by its preset (a namespace keeps the
//! preset it was created with, and presets never change), and every container says which codec
//! compressed it: a reader never guesses, and a container that does not parse (magic, version,
//! CRC) is reported corrupt, never read as data.
//!
//! Crates: `zstd` (the bindings to the reference libzstd, kept by the zstd-rs project: the best
//! ratio for its speed, and one call per block) and `lz4_flex` (pure Rust, safe by default,
//! the fastest maintained LZ4 in Rust; its block format, since the container frames blocks).
//!
//! ```text
//! offset size field (little-endian)
//!      0    4 magic            "VSZ1"
//!      4    2 format version   1
//!      6    1 codec            1 zstd, 2 lz4
//!      7    1 reserved         0
//!      8    4 block size       object bytes per block (the last block may be shorter)
//!     12    8 object size      bytes of the object before compression
//!     20    4 blocks           n = ceil(object size / block size)
//!     24   4n block entries    stored length (bits 0..31) | raw flag (bit 31)
//!  24+4n    4 index CRC32C     over every byte before it
//!  28+4n      blocks           block 0, block 1, ... as the entries say
//! ```

use std::sync::Arc;

/// Object bytes per compressed block.
pub const BLOCK: u32 = 64 * 1024;
/// "VSZ1".
pub const MAGIC: [u8; 4] = *b"VSZ1";
pub const FORMAT_VERSION: u16 = 1;
const FIXED: usize = 24;
const RAW: u32 = 1 << 31;
/// zstd's level: its default (a good ratio at several hundred MB/s per core).
const ZSTD_LEVEL: i32 = 3;

/// A container's codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Zstd = 1,
    Lz4 = 2,
}

impl Codec {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Zstd),
            2 => Some(Self::Lz4),
            _ => None,
        }
    }

    fn compress(self, block: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Self::Zstd => zstd::bulk::compress(block, ZSTD_LEVEL).map_err(|e| e.to_string()),
            Self::Lz4 => Ok(lz4_flex::block::compress(block)),
        }
    }

    fn decompress(self, stored: &[u8], len: usize) -> Result<Vec<u8>, String> {
        let out = match self {
            Self::Zstd => zstd::bulk::decompress(stored, len).map_err(|e| e.to_string())?,
            Self::Lz4 => lz4_flex::block::decompress(stored, len).map_err(|e| e.to_string())?,
        };
        if out.len() != len {
            return Err(format!(
                "a block decompressed to {} bytes, not {len}",
                out.len()
            ));
        }
        Ok(out)
    }
}

/// Bytes of a container's header and index for `blocks` blocks.
pub fn index_len(blocks: u64) -> u64 {
    FIXED as u64 + 4 * blocks + 4
}

/// The container of `data`.
pub fn pack(codec: Codec, data: &[u8]) -> Result<Vec<u8>, String> {
    let blocks: Vec<&[u8]> = data.chunks(BLOCK as usize).collect();
    let count = u32::try_from(blocks.len()).map_err(|_| "object too large".to_string())?;
    let mut entries = Vec::with_capacity(blocks.len());
    let mut body = Vec::new();
    for block in blocks {
        let packed = codec.compress(block)?;
        if packed.len() < block.len() {
            entries.push(packed.len() as u32);
            body.extend_from_slice(&packed);
        } else {
            entries.push(block.len() as u32 | RAW);
            body.extend_from_slice(block);
        }
    }
    let mut out = Vec::with_capacity(index_len(u64::from(count)) as usize + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[codec as u8, 0]);
    out.extend_from_slice(&BLOCK.to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    for entry in entries {
        out.extend_from_slice(&entry.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// One block as the index describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// Where its stored bytes start in the container.
    at: u64,
    len: u32,
    raw: bool,
}

/// A container's header and block index: where each block of the object is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIndex {
    pub codec: Codec,
    pub block_size: u32,
    /// Bytes of the object before compression.
    pub size: u64,
    entries: Vec<Entry>,
}

/// What parsing the start of a container found.
#[derive(Debug)]
pub enum Parsed {
    Index(Arc<BlockIndex>),
    /// The prefix was too short: the index needs this many bytes.
    Need(u64),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(raw)
}

/// Parse the index at the start of a container of `stored` bytes from `prefix` (its first
/// bytes, as many as the caller has).
pub fn parse_index(prefix: &[u8], stored: u64) -> Result<Parsed, String> {
    if prefix.len() < FIXED {
        return if stored < FIXED as u64 {
            Err(format!(
                "{stored} bytes: too short for a compressed container"
            ))
        } else {
            Ok(Parsed::Need(FIXED as u64))
        };
    }
    if prefix[..4] != MAGIC {
        return Err("not a compressed container (bad magic)".into());
    }
    let version = u16::from_le_bytes([prefix[4], prefix[5]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "compressed container format {version} is not supported (this build reads 1)"
        ));
    }
    let codec = Codec::from_u8(prefix[6])
        .ok_or_else(|| format!("unknown compression codec {}", prefix[6]))?;
    let block_size = u32_at(prefix, 8);
    let mut size = [0u8; 8];
    size.copy_from_slice(&prefix[12..20]);
    let size = u64::from_le_bytes(size);
    let count = u32_at(prefix, 20);
    let need = index_len(u64::from(count));
    if need > stored {
        return Err(format!(
            "an index of {count} blocks does not fit in {stored} bytes"
        ));
    }
    if (prefix.len() as u64) < need {
        return Ok(Parsed::Need(need));
    }
    let end = need as usize - 4;
    if crc32c::crc32c(&prefix[..end]) != u32_at(prefix, end) {
        return Err("compressed container index CRC mismatch".into());
    }
    if block_size == 0 || u64::from(count) != size.div_ceil(u64::from(block_size)) {
        return Err(format!(
            "{count} blocks of {block_size} bytes for an object of {size}"
        ));
    }
    let mut at = need;
    let mut entries = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let raw_entry = u32_at(prefix, FIXED + 4 * i);
        let len = raw_entry & !RAW;
        let raw = raw_entry & RAW != 0;
        let logical = (size - i as u64 * u64::from(block_size)).min(u64::from(block_size));
        if raw && u64::from(len) != logical {
            return Err(format!("raw block {i} of {len} bytes, expected {logical}"));
        }
        entries.push(Entry { at, len, raw });
        at += u64::from(len);
    }
    if at != stored {
        return Err(format!(
            "the blocks end at {at}, the container holds {stored} bytes"
        ));
    }
    Ok(Parsed::Index(Arc::new(BlockIndex {
        codec,
        block_size,
        size,
        entries,
    })))
}

impl BlockIndex {
    /// The blocks `[first, last)` holding object bytes `[offset, offset + len)` (`len > 0`,
    /// within the object).
    pub fn blocks_for(&self, offset: u64, len: u64) -> (usize, usize) {
        let bs = u64::from(self.block_size);
        ((offset / bs) as usize, (offset + len).div_ceil(bs) as usize)
    }

    /// Where blocks `[first, last)` are stored in the container: `(offset, length)`.
    pub fn stored_span(&self, first: usize, last: usize) -> (u64, u64) {
        let Some(start) = self.entries.get(first).map(|e| e.at) else {
            return (0, 0);
        };
        let end = last
            .checked_sub(1)
            .and_then(|i| self.entries.get(i))
            .map_or(start, |e| e.at + u64::from(e.len));
        (start, end - start)
    }

    /// Fill `out` with object bytes from `offset`, out of `stored`: the stored bytes of blocks
    /// `[first, last)` (as `stored_span` locates them).
    pub fn unpack(
        &self,
        (first, last): (usize, usize),
        stored: &[u8],
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), String> {
        let (base, _) = self.stored_span(first, last);
        let bs = u64::from(self.block_size);
        let end = offset + out.len() as u64;
        for (i, entry) in self.entries[first..last].iter().enumerate() {
            let block = (first + i) as u64;
            let logical_start = block * bs;
            let logical_len = (self.size - logical_start).min(bs) as usize;
            let from = (entry.at - base) as usize;
            let bytes = stored
                .get(from..from + entry.len as usize)
                .ok_or_else(|| format!("block {block} lies outside the bytes read"))?;
            let plain;
            let data = if entry.raw {
                bytes
            } else {
                plain = self
                    .codec
                    .decompress(bytes, logical_len)
                    .map_err(|e| format!("block {block}: {e}"))?;
                &plain[..]
            };
            // The part of this block inside [offset, end).
            let lo = offset.max(logical_start);
            let hi = end.min(logical_start + logical_len as u64);
            if lo >= hi {
                continue;
            }
            out[(lo - offset) as usize..(hi - offset) as usize].copy_from_slice(
                &data[(lo - logical_start) as usize..(hi - logical_start) as usize],
            );
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index_of(container: &[u8]) -> Arc<BlockIndex> {
        match parse_index(container, container.len() as u64).unwrap() {
            Parsed::Index(index) => index,
            Parsed::Need(n) => panic!("needs {n}"),
        }
    }

    fn read(container: &[u8], offset: u64, len: usize) -> Vec<u8> {
        let index = index_of(container);
        let mut out = vec![0u8; len];
        if len == 0 {
            return out;
        }
        let blocks = index.blocks_for(offset, len as u64);
        let (at, n) = index.stored_span(blocks.0, blocks.1);
        index
            .unpack(
                blocks,
                &container[at as usize..(at + n) as usize],
                offset,
                &mut out,
            )
            .unwrap();
        out
    }

    /// Half compressible (runs), half not (xorshift noise), block by block.
    fn mixed(len: usize, seed: u32) -> Vec<u8> {
        let mut x = u64::from(seed) | 1 << 40;
        (0..len as u32)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / BLOCK).is_multiple_of(2) {
                    (i / 1000) as u8 ^ seed as u8
                } else {
                    (x >> 24) as u8
                }
            })
            .collect()
    }

    #[test]
    fn compressible_blocks_shrink_and_noise_is_stored_raw() {
        for codec in [Codec::Zstd, Codec::Lz4] {
            let data = mixed(4 * BLOCK as usize + 1000, 3);
            let container = pack(codec, &data).unwrap();
            let index = index_of(&container);
            assert_eq!(index.size, data.len() as u64);
            assert_eq!(
                index.entries.iter().map(|e| e.raw).collect::<Vec<_>>(),
                vec![false, true, false, true, false]
            );
            assert!(container.len() < data.len() * 3 / 4, "{}", container.len());
            assert_eq!(read(&container, 0, data.len()), data);
            // A small read touches one block's stored bytes only.
            let blocks = index.blocks_for(70_000, 100);
            assert_eq!(blocks, (1, 2));
            let (_, n) = index.stored_span(blocks.0, blocks.1);
            assert_eq!(n, u64::from(BLOCK));
        }
        let empty = pack(Codec::Zstd, &[]).unwrap();
        assert_eq!(empty.len() as u64, index_len(0));
        assert_eq!(index_of(&empty).size, 0);
    }

    #[test]
    fn damage_and_short_prefixes_are_reported() {
        let data = mixed(3 * BLOCK as usize, 1);
        let container = pack(Codec::Lz4, &data).unwrap();
        let stored = container.len() as u64;
        assert!(matches!(
            parse_index(&container[..10], stored),
            Ok(Parsed::Need(24))
        ));
        assert!(matches!(
            parse_index(&container[..30], stored),
            Ok(Parsed::Need(n)) if n == index_len(3)
        ));
        let mut bad = container.clone();
        bad[25] ^= 1;
        assert!(parse_index(&bad, stored).unwrap_err().contains("CRC"));
        let mut bad = container.clone();
        bad[0] = b'X';
        assert!(parse_index(&bad, stored).is_err());
        assert!(parse_index(&container, stored + 1).is_err());
        // (Damaged block bytes are the fragments' CRCs' to catch, below this format.)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any range of any object reads back exactly what was packed, with either codec.
        #[test]
        fn every_range_reads_back(
            len in 0usize..(5 * BLOCK as usize),
            seed in any::<u32>(),
            lz4 in any::<bool>(),
            ranges in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..200_000), 4),
        ) {
            let codec = if lz4 { Codec::Lz4 } else { Codec::Zstd };
            let data = mixed(len, seed);
            let container = pack(codec, &data).unwrap();
            for (at, n) in ranges {
                if len == 0 {
                    break;
                }
                let offset = at.index(len);
                let n = n.min(len - offset);
                prop_assert_eq!(read(&container, offset as u64, n), &data[offset..offset + n]);
            }
        }
    }
}

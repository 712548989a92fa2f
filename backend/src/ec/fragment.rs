//! The fragment file: what an OSD stores for one fragment of one object version.
//!
//! Fragments are self-describing, so the tier needs no central manifest: any object's layout
//! and health can be rebuilt by asking the OSDs what they hold (issue 12, DESIGN "Backend tier").
//!
//! ```text
//! offset size field
//!      0    4 magic            0x56534631 ("VSF1"), little-endian
//!      4    2 format version   1, 2 for a local parity, 3 for a tombstone
//!      6    2 codec id         see `codec::CodecId`
//!      8    1 k                data fragments
//!      9    1 m                parity fragments
//!     10    1 index            this fragment (data 0..k, parity k..k+m, local parities after)
//!     11    1 flags            bit 0: local parity (version 2); bit 1: tombstone (version 3);
//!                              others reserved, 0
//!     12    4 fragment size    bytes per piece of a full chunk (see `layout`)
//!     16    8 object size      bytes of the whole object
//!     24    8 object version   the object's version (a put of the same name makes a new one)
//!     32    8 owner tag        the namespace owner's tag at the put (fencing, repair checks)
//!     40    8 data length      bytes of fragment data after the header (`Layout::fragment_len`)
//!     48    2 namespace length
//!     50    2 name length
//!     52    n namespace, then object name (UTF-8)
//!           g (version 2 only) group: 1 byte count, then the indices the local parity covers
//!  52+n+g   4 header CRC32C    over every header byte before it
//!      h    d data
//!    h+d  4*b block CRCs       CRC32C of each BLOCK (4 KiB) of data, the last one partial
//!        4    table CRC32C     over the block CRCs
//! ```
//!
//! Invariants: the header CRC covers every header byte before it, so a damaged header is never
//! trusted (a wrong `data length` would misplace the CRC table). Data is checked per 4 KiB
//! block, so a partial read verifies only the blocks it touches: reading 4 KiB costs 4 KiB plus
//! one CRC, not the whole fragment. A fragment whose block fails its CRC is treated as lost for
//! that range, and the read decodes from other fragments.
//!
//! A *local parity* (presets with `local_parity`, Open vStorage's NC-ECC) is the XOR of the
//! fragments of one object that sit in one failure domain, stored in that domain, so one lost
//! fragment there is rebuilt from its domain alone. Its header lists the indices it covers
//! (placement can change later; the group cannot), which is why it needs format version 2.
//! Fragments without local parity keep version 1, readable by every build.
//!
//! A *tombstone* records that the object was deleted at `object version` by the owner holding
//! `owner tag`: an empty fragment (k = m = 0, index [`TOMBSTONE_INDEX`], no data, so
//! its block table is only the table CRC) with format version 3 and flag bit 1. It is stored beside the
//! fragments of the name on every OSD that takes it, so a delete is durable while an OSD is
//! down: when that OSD returns, its older fragments are older than the tombstone, and reads,
//! listings and repair treat the name as deleted (see `ec::store`, `ec::plan`). A build that
//! reads only versions 1 and 2 refuses the header, so an older OSD takes no tombstone and an
//! older client skips one like any damaged header (it then sees the name as before: listed
//! while fragments remain).

use super::codec::CodecId;

/// "VSF1".
pub const MAGIC: u32 = 0x5653_4631;
pub const FORMAT_VERSION: u16 = 1;
/// Format of a local parity fragment (adds the group to the header).
pub const FORMAT_VERSION_LOCAL: u16 = 2;
/// Header flag: the fragment is a local parity.
pub const FLAG_LOCAL_PARITY: u8 = 1;
/// Format of a tombstone.
pub const FORMAT_VERSION_TOMBSTONE: u16 = 3;
/// Header flag: the fragment is a tombstone (format version 3).
pub const FLAG_TOMBSTONE: u8 = 2;
/// The index a tombstone carries (no code fragment uses it: `k + m + local parities < 255`).
pub const TOMBSTONE_INDEX: u8 = u8::MAX;
/// Granularity of the data CRCs.
pub const BLOCK: usize = 4096;
const FIXED_HEADER: usize = 52;
/// Longest namespace or object name.
pub const MAX_NAME: usize = 1024;

/// Why a fragment could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    #[error("not a fragment (magic {0:#010x})")]
    BadMagic(u32),
    #[error("fragment format version {0} is not supported (this build reads 1, 2 and 3)")]
    Version(u16),
    #[error("fragment {what} is truncated")]
    Truncated { what: &'static str },
    #[error("fragment header CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("fragment block CRC table is corrupt")]
    TableCrc,
    #[error("fragment data block {block} is corrupt")]
    BlockCrc { block: u64 },
    #[error("invalid fragment header: {0}")]
    Invalid(String),
}

/// Everything a fragment says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentHeader {
    pub codec: CodecId,
    pub k: u8,
    pub m: u8,
    pub index: u8,
    pub fragment_size: u32,
    pub object_size: u64,
    pub object_version: u64,
    pub owner_tag: u64,
    pub data_len: u64,
    pub namespace: String,
    pub name: String,
    /// For a local parity, the indices (all `< k + m`, ascending) whose XOR it is; empty for
    /// a data or parity fragment.
    pub local_group: Vec<u8>,
}

impl FragmentHeader {
    /// Bytes of the encoded header, CRC included.
    pub fn encoded_len(&self) -> usize {
        let group = if self.local_group.is_empty() {
            0
        } else {
            1 + self.local_group.len()
        };
        FIXED_HEADER + self.namespace.len() + self.name.len() + group + 4
    }

    /// A local parity (XOR of `local_group`), not one of the `k + m` code fragments.
    pub fn is_local_parity(&self) -> bool {
        !self.local_group.is_empty()
    }

    /// The tombstone of `namespace/name`, deleted at `version` under `owner_tag`.
    pub fn tombstone(namespace: &str, name: &str, version: u64, owner_tag: u64) -> Self {
        Self {
            codec: CodecId(0),
            k: 0,
            m: 0,
            index: TOMBSTONE_INDEX,
            fragment_size: 0,
            object_size: 0,
            object_version: version,
            owner_tag,
            data_len: 0,
            namespace: namespace.to_string(),
            name: name.to_string(),
            local_group: Vec::new(),
        }
    }

    /// A tombstone: the object was deleted at `object_version`.
    pub fn is_tombstone(&self) -> bool {
        self.k == 0 && self.index == TOMBSTONE_INDEX
    }

    fn validate(&self) -> Result<(), FragmentError> {
        if self.namespace.len() > MAX_NAME || self.name.len() > MAX_NAME {
            return Err(FragmentError::Invalid("name longer than 1024 bytes".into()));
        }
        if self.is_tombstone() {
            if self.m != 0 || self.data_len != 0 || self.object_size != 0 || self.is_local_parity()
            {
                return Err(FragmentError::Invalid(
                    "a tombstone has no code, data or group".into(),
                ));
            }
            return Ok(());
        }
        if self.index == TOMBSTONE_INDEX {
            return Err(FragmentError::Invalid(format!(
                "index {TOMBSTONE_INDEX} is a tombstone's"
            )));
        }
        let n = u16::from(self.k) + u16::from(self.m);
        if self.k == 0 || (u16::from(self.index) >= n) != self.is_local_parity() {
            return Err(FragmentError::Invalid(format!(
                "index {} of a {}+{} code{}",
                self.index,
                self.k,
                self.m,
                if self.is_local_parity() {
                    " for a local parity"
                } else {
                    ""
                }
            )));
        }
        if self.is_local_parity()
            && (self.local_group.windows(2).any(|w| w[0] >= w[1])
                || self.local_group.iter().any(|i| u16::from(*i) >= n))
        {
            return Err(FragmentError::Invalid(format!(
                "local group {:?} of a {}+{} code",
                self.local_group, self.k, self.m
            )));
        }
        if self.fragment_size == 0 {
            return Err(FragmentError::Invalid("fragment size 0".into()));
        }
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, FragmentError> {
        self.validate()?;
        let mut out = Vec::with_capacity(self.encoded_len());
        let (version, flags) = if self.is_tombstone() {
            (FORMAT_VERSION_TOMBSTONE, FLAG_TOMBSTONE)
        } else if self.is_local_parity() {
            (FORMAT_VERSION_LOCAL, FLAG_LOCAL_PARITY)
        } else {
            (FORMAT_VERSION, 0)
        };
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&self.codec.0.to_le_bytes());
        out.extend_from_slice(&[self.k, self.m, self.index, flags]);
        out.extend_from_slice(&self.fragment_size.to_le_bytes());
        out.extend_from_slice(&self.object_size.to_le_bytes());
        out.extend_from_slice(&self.object_version.to_le_bytes());
        out.extend_from_slice(&self.owner_tag.to_le_bytes());
        out.extend_from_slice(&self.data_len.to_le_bytes());
        out.extend_from_slice(&(self.namespace.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        out.extend_from_slice(self.namespace.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        if self.is_local_parity() {
            out.push(self.local_group.len() as u8);
            out.extend_from_slice(&self.local_group);
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Parse the header at the start of `bytes` (which may hold more, or only the header).
    pub fn decode(bytes: &[u8]) -> Result<Self, FragmentError> {
        let field = |at: usize, len: usize| -> Result<&[u8], FragmentError> {
            bytes
                .get(at..at + len)
                .ok_or(FragmentError::Truncated { what: "header" })
        };
        let u16_at = |at| -> Result<u16, FragmentError> {
            Ok(u16::from_le_bytes([field(at, 2)?[0], field(at, 2)?[1]]))
        };
        let u32_at = |at| -> Result<u32, FragmentError> {
            let mut b = [0u8; 4];
            b.copy_from_slice(field(at, 4)?);
            Ok(u32::from_le_bytes(b))
        };
        let u64_at = |at| -> Result<u64, FragmentError> {
            let mut b = [0u8; 8];
            b.copy_from_slice(field(at, 8)?);
            Ok(u64::from_le_bytes(b))
        };
        let magic = u32_at(0)?;
        if magic != MAGIC {
            return Err(FragmentError::BadMagic(magic));
        }
        let ns_len = usize::from(u16_at(48)?);
        let name_len = usize::from(u16_at(50)?);
        if ns_len > MAX_NAME || name_len > MAX_NAME {
            return Err(FragmentError::Invalid("name longer than 1024 bytes".into()));
        }
        let version = u16_at(4)?;
        let flags = field(11, 1)?[0];
        let local = version == FORMAT_VERSION_LOCAL && flags & FLAG_LOCAL_PARITY != 0;
        let names_end = FIXED_HEADER + ns_len + name_len;
        let end = if local {
            names_end + 1 + usize::from(field(names_end, 1)?[0])
        } else {
            names_end
        };
        let stored = u32_at(end)?;
        let computed = crc32c::crc32c(field(0, end)?);
        if stored != computed {
            return Err(FragmentError::HeaderCrc { stored, computed });
        }
        if ![
            FORMAT_VERSION,
            FORMAT_VERSION_LOCAL,
            FORMAT_VERSION_TOMBSTONE,
        ]
        .contains(&version)
        {
            return Err(FragmentError::Version(version));
        }
        let tombstone = version == FORMAT_VERSION_TOMBSTONE;
        if tombstone != (flags & FLAG_TOMBSTONE != 0) {
            return Err(FragmentError::Invalid(format!(
                "format version {version} with flags {flags:#04x}"
            )));
        }
        let text = |at: usize, len: usize| -> Result<String, FragmentError> {
            String::from_utf8(field(at, len)?.to_vec())
                .map_err(|_| FragmentError::Invalid("name is not UTF-8".into()))
        };
        let small = field(8, 4)?;
        let header = Self {
            codec: CodecId(u16_at(6)?),
            k: small[0],
            m: small[1],
            index: small[2],
            fragment_size: u32_at(12)?,
            object_size: u64_at(16)?,
            object_version: u64_at(24)?,
            owner_tag: u64_at(32)?,
            data_len: u64_at(40)?,
            namespace: text(FIXED_HEADER, ns_len)?,
            name: text(FIXED_HEADER + ns_len, name_len)?,
            local_group: if local {
                field(names_end + 1, end - names_end - 1)?.to_vec()
            } else {
                Vec::new()
            },
        };
        header.validate()?;
        if tombstone != header.is_tombstone() {
            return Err(FragmentError::Invalid(
                "a tombstone's format with a fragment's fields, or the reverse".into(),
            ));
        }
        Ok(header)
    }

    /// Data blocks (and so block CRCs) of the fragment.
    pub fn blocks(&self) -> u64 {
        self.data_len.div_ceil(BLOCK as u64)
    }

    /// Where the data starts in the file.
    pub fn data_offset(&self) -> u64 {
        self.encoded_len() as u64
    }

    /// Where the block CRC table starts in the file.
    pub fn table_offset(&self) -> u64 {
        self.data_offset() + self.data_len
    }

    /// Total bytes of the fragment file.
    pub fn file_len(&self) -> u64 {
        self.table_offset() + 4 * self.blocks() + 4
    }
}

/// The block CRC table of `data` and its own CRC, as stored after the data.
pub fn block_table(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(BLOCK) * 4 + 4);
    for block in data.chunks(BLOCK) {
        out.extend_from_slice(&crc32c::crc32c(block).to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A whole fragment file: header, data, block table.
pub fn encode_fragment(header: &FragmentHeader, data: &[u8]) -> Result<Vec<u8>, FragmentError> {
    if data.len() as u64 != header.data_len {
        return Err(FragmentError::Invalid(format!(
            "{} data bytes for a header saying {}",
            data.len(),
            header.data_len
        )));
    }
    let mut out = header.encode()?;
    out.extend_from_slice(data);
    out.extend_from_slice(&block_table(data));
    Ok(out)
}

/// Parse the block CRC table (as read from `table_offset`) and check its own CRC.
pub fn parse_table(header: &FragmentHeader, table: &[u8]) -> Result<Vec<u32>, FragmentError> {
    let blocks = usize::try_from(header.blocks())
        .map_err(|_| FragmentError::Invalid("too many blocks".into()))?;
    if table.len() != blocks * 4 + 4 {
        return Err(FragmentError::Truncated { what: "CRC table" });
    }
    let (crcs, stored) = table.split_at(blocks * 4);
    if crc32c::crc32c(crcs) != u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]) {
        return Err(FragmentError::TableCrc);
    }
    Ok(crcs
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The whole blocks covering data bytes `[offset, offset + len)`: `(first block, byte range in
/// the data)`. A partial read fetches that range and the table entries of those blocks.
pub fn block_span(header: &FragmentHeader, offset: u64, len: u64) -> (u64, u64, u64) {
    let first = offset / BLOCK as u64;
    let end = (offset + len).min(header.data_len);
    let last = end.div_ceil(BLOCK as u64).max(first + 1);
    let start = first * BLOCK as u64;
    let stop = (last * BLOCK as u64).min(header.data_len);
    (first, start, stop)
}

/// Check `blocks_data` (whole blocks starting at block `first`, as [`block_span`] gave) against
/// the table.
pub fn verify_blocks(crcs: &[u32], first: u64, blocks_data: &[u8]) -> Result<(), FragmentError> {
    for (i, block) in blocks_data.chunks(BLOCK).enumerate() {
        let n = first + i as u64;
        let expected = usize::try_from(n)
            .ok()
            .and_then(|n| crcs.get(n))
            .ok_or(FragmentError::Truncated { what: "CRC table" })?;
        if crc32c::crc32c(block) != *expected {
            return Err(FragmentError::BlockCrc { block: n });
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(data_len: u64) -> FragmentHeader {
        FragmentHeader {
            codec: CodecId::REED_SOLOMON_GF8,
            k: 8,
            m: 3,
            index: 9,
            fragment_size: 1 << 20,
            object_size: 64 << 20,
            object_version: 7,
            owner_tag: 3,
            data_len,
            namespace: "vol-a".into(),
            name: "00000001.sco".into(),
            local_group: Vec::new(),
        }
    }

    #[test]
    fn a_fragment_reads_back_whole_and_in_part() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let h = header(data.len() as u64);
        let file = encode_fragment(&h, &data).unwrap();
        assert_eq!(file.len() as u64, h.file_len());
        let back = FragmentHeader::decode(&file).unwrap();
        assert_eq!(back, h);
        let table = parse_table(&back, &file[back.table_offset() as usize..]).unwrap();
        assert_eq!(table.len(), 3);
        // A partial read: 100 bytes at 5000 need block 1 only.
        let (first, start, stop) = block_span(&back, 5000, 100);
        assert_eq!((first, start, stop), (1, 4096, 8192));
        let d0 = back.data_offset() as usize;
        verify_blocks(
            &table,
            first,
            &file[d0 + start as usize..d0 + stop as usize],
        )
        .unwrap();
        // The short last block.
        let (first, start, stop) = block_span(&back, 9999, 1);
        assert_eq!((first, start, stop), (2, 8192, 10_000));
        verify_blocks(
            &table,
            first,
            &file[d0 + start as usize..d0 + stop as usize],
        )
        .unwrap();
    }

    #[test]
    fn damage_is_detected_where_it_is() {
        let data = vec![5u8; 3 * BLOCK];
        let h = header(data.len() as u64);
        let file = encode_fragment(&h, &data).unwrap();
        let d0 = h.data_offset() as usize;
        let table = parse_table(&h, &file[h.table_offset() as usize..]).unwrap();
        let mut bad = file[d0..d0 + 3 * BLOCK].to_vec();
        bad[BLOCK + 17] ^= 0x40;
        assert_eq!(
            verify_blocks(&table, 0, &bad),
            Err(FragmentError::BlockCrc { block: 1 })
        );
        // Blocks 0 and 2 alone still verify: a partial read elsewhere is unaffected.
        verify_blocks(&table, 2, &bad[2 * BLOCK..]).unwrap();
        let mut bad_table = file[h.table_offset() as usize..].to_vec();
        bad_table[0] ^= 1;
        assert_eq!(parse_table(&h, &bad_table), Err(FragmentError::TableCrc));
        assert!(matches!(
            FragmentHeader::decode(
                b"VSF0 and some bytes that are not a fragment header at all...."
            ),
            Err(FragmentError::BadMagic(_))
        ));
        assert!(matches!(
            FragmentHeader::decode(&file[..20]),
            Err(FragmentError::Truncated { .. })
        ));
        let mut wrong_index = header(0);
        wrong_index.index = 11;
        assert!(wrong_index.encode().is_err());
    }

    #[test]
    fn a_local_parity_carries_its_group() {
        let mut h = header(10);
        h.index = 11;
        h.local_group = vec![0, 4, 9];
        let bytes = h.encode().unwrap();
        assert_eq!(bytes.len(), h.encoded_len());
        assert_eq!(
            u16::from_le_bytes([bytes[4], bytes[5]]),
            FORMAT_VERSION_LOCAL
        );
        assert_eq!(FragmentHeader::decode(&bytes).unwrap(), h);
        // A global fragment stays version 1; a local index needs a group and vice versa.
        assert_eq!(u16::from_le_bytes([header(10).encode().unwrap()[4], 0]), 1);
        h.local_group.clear();
        assert!(h.encode().is_err());
        let mut g = header(10);
        g.local_group = vec![1, 2];
        assert!(g.encode().is_err());
    }

    #[test]
    fn a_tombstone_reads_back_and_cannot_pose_as_a_fragment() {
        let t = FragmentHeader::tombstone("vol-a", "00000001.sco", 42, 7);
        let file = encode_fragment(&t, &[]).unwrap();
        assert_eq!(file.len() as u64, t.file_len());
        assert_eq!(
            u16::from_le_bytes([file[4], file[5]]),
            FORMAT_VERSION_TOMBSTONE
        );
        let back = FragmentHeader::decode(&file).unwrap();
        assert!(back.is_tombstone());
        assert_eq!(back, t);
        assert!(parse_table(&back, &file[back.table_offset() as usize..])
            .unwrap()
            .is_empty());
        // A tombstone with data, or a fragment with the tombstone's index, is refused.
        let mut with_data = t.clone();
        with_data.data_len = 1;
        assert!(with_data.encode().is_err());
        let mut posing = header(10);
        posing.index = TOMBSTONE_INDEX;
        assert!(posing.encode().is_err());
        // Format 3 without the flag (or a fragment's header with it) is refused.
        let mut bytes = t.encode().unwrap();
        bytes[11] = 0;
        let end = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
        assert!(FragmentHeader::decode(&bytes).is_err());
        assert!(!header(10).is_tombstone());
    }

    proptest! {
        /// Any single flipped byte of a header is caught: the decoder errors, never misreads.
        #[test]
        fn every_header_corruption_is_detected(
            pos in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            local in any::<bool>(),
            tombstone in any::<bool>(),
        ) {
            let mut h = header(12_345);
            if tombstone {
                h = FragmentHeader::tombstone("vol-a", "obj", 9, 2);
            } else if local {
                h.index = 11;
                h.local_group = vec![2, 5, 7];
            }
            let mut bytes = h.encode().unwrap();
            let at = pos.index(bytes.len());
            bytes[at] ^= flip;
            prop_assert!(FragmentHeader::decode(&bytes).is_err());
        }
    }
}

//! The byte layout of every object the S3 store writes (data objects and namespace owner
//! records alike), all integers little-endian:
//!
//! ```text
//! 0   u32  magic 0x33535356 ("VSS3")
//! 4   u16  format version (1)
//! 6   u16  reserved (0)
//! 8   u64  payload length in bytes
//! 16  u32  chunk size in bytes (65536)
//! 20  u32  chunk count = ceil(payload length / chunk size)
//! 24  u64  owner tag of the writer
//! 32  u32  CRC32C of bytes 0..32 followed by the chunk CRC table
//! 36  u32  reserved (0)
//! 40  u32 × chunk count: CRC32C of each payload chunk
//! ..  payload
//! ```
//!
//! Why the writer's tag is *inside* the bytes rather than in S3 user metadata: the S3 ETag is
//! computed over the bytes only (MD5 for plain PUTs), and fencing relies on "the ETag changed"
//! meaning "someone wrote". With the tag in the bytes, a new owner rewriting identical payload
//! still produces a new ETag, so an old owner's `If-Match` on the ETag it saw before fails.
//! The header and CRC table come first so that a ranged read fetches them with one small GET
//! and then verifies only the 64 KiB chunks its range touches.

use crate::OwnerTag;

pub(super) const MAGIC: u32 = 0x3353_5356;
pub(super) const VERSION: u16 = 1;
pub(super) const HEADER_LEN: u64 = 40;
pub(super) const CHUNK_SIZE: u32 = 64 * 1024;

/// A decoded, checksum-verified header.
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub payload_len: u64,
    pub chunk_size: u32,
    pub owner: OwnerTag,
    pub chunk_crcs: Vec<u32>,
}

impl Header {
    /// Offset of the first payload byte in the object.
    pub fn payload_start(&self) -> u64 {
        HEADER_LEN + 4 * self.chunk_crcs.len() as u64
    }

    pub fn object_len(&self) -> u64 {
        self.payload_start() + self.payload_len
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Header and CRC table for `payload` written by `owner`; the payload follows unchanged.
pub(super) fn encode_header(payload: &[u8], owner: OwnerTag) -> Vec<u8> {
    let crcs: Vec<u32> = payload
        .chunks(CHUNK_SIZE as usize)
        .map(crc32c::crc32c)
        .collect();
    let mut out = Vec::with_capacity(HEADER_LEN as usize + crcs.len() * 4);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&CHUNK_SIZE.to_le_bytes());
    out.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
    out.extend_from_slice(&owner.to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    for crc in crcs {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    seal(&mut out);
    out
}

/// A whole object: header, table and payload.
pub(super) fn encode(payload: &[u8], owner: OwnerTag) -> Vec<u8> {
    let mut out = encode_header(payload, owner);
    out.extend_from_slice(payload);
    out
}

/// Recompute the header CRC of `object` (header and table already in place).
fn seal(object: &mut [u8]) {
    let chunk_count = u32_at(object, 20) as usize;
    let table_end = HEADER_LEN as usize + 4 * chunk_count;
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&object[..32]),
        &object[HEADER_LEN as usize..table_end],
    );
    object[32..36].copy_from_slice(&crc.to_le_bytes());
}

/// Rewrite the writer's tag of an already verified object in place.
pub(super) fn restamp(object: &mut [u8], owner: OwnerTag) {
    object[24..32].copy_from_slice(&owner.to_le_bytes());
    seal(object);
}

/// Number of table bytes that follow the fixed header, or why the fixed part is bad.
pub(super) fn table_len(fixed: &[u8]) -> Result<u64, String> {
    if fixed.len() < HEADER_LEN as usize {
        return Err("shorter than its header".into());
    }
    if u32_at(fixed, 0) != MAGIC {
        return Err("bad magic number".into());
    }
    let version = u16::from_le_bytes([fixed[4], fixed[5]]);
    if version != VERSION {
        return Err(format!("unsupported format version {version}"));
    }
    let payload_len = u64_at(fixed, 8);
    let chunk_size = u32_at(fixed, 16);
    let chunk_count = u64::from(u32_at(fixed, 20));
    if chunk_size == 0 || payload_len.div_ceil(u64::from(chunk_size)) != chunk_count {
        return Err("inconsistent chunk geometry".into());
    }
    Ok(chunk_count * 4)
}

/// Decode and verify the header from the first bytes of an object (header plus whole table).
pub(super) fn decode_header(bytes: &[u8]) -> Result<Header, String> {
    let table_len = table_len(bytes)? as usize;
    let table_end = HEADER_LEN as usize + table_len;
    if bytes.len() < table_end {
        return Err("shorter than its checksum table".into());
    }
    let table = &bytes[HEADER_LEN as usize..table_end];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..32]), table);
    if crc != u32_at(bytes, 32) {
        return Err("header checksum mismatch".into());
    }
    Ok(Header {
        payload_len: u64_at(bytes, 8),
        chunk_size: u32_at(bytes, 16),
        owner: u64_at(bytes, 24),
        chunk_crcs: table.chunks_exact(4).map(|c| u32_at(c, 0)).collect(),
    })
}

/// Verify the payload chunks `first..` held in `span` (which starts at chunk `first`).
pub(super) fn verify_chunks(header: &Header, first: usize, span: &[u8]) -> Result<(), String> {
    for (i, chunk) in span.chunks(header.chunk_size as usize).enumerate() {
        let index = first + i;
        if header.chunk_crcs.get(index) != Some(&crc32c::crc32c(chunk)) {
            return Err(format!("checksum mismatch in chunk {index}"));
        }
    }
    Ok(())
}

/// Decode a whole object, verifying every checksum; returns the header and the payload range.
pub(super) fn decode(object: &[u8]) -> Result<(Header, std::ops::Range<usize>), String> {
    let header = decode_header(object)?;
    if object.len() as u64 != header.object_len() {
        return Err(format!(
            "object is {} bytes, header promises {}",
            object.len(),
            header.object_len()
        ));
    }
    let start = header.payload_start() as usize;
    verify_chunks(&header, 0, &object[start..])?;
    Ok((header, start..object.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_restamp_and_every_flipped_byte_is_caught() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let mut object = encode(&payload, 5);
        let (header, range) = decode(&object).unwrap();
        assert_eq!((header.owner, header.payload_len), (5, 70_000));
        assert_eq!(&object[range], &payload[..]);
        restamp(&mut object, 9);
        assert_eq!(decode(&object).unwrap().0.owner, 9);
        for pos in [0, 5, 9, 17, 21, 25, 33, 41, 48, 1000, object.len() - 1] {
            let mut bad = object.clone();
            bad[pos] ^= 0x20;
            assert!(decode(&bad).is_err(), "flip at {pos}");
        }
        assert!(decode(&object[..object.len() - 1]).is_err());
        assert!(decode(&[]).is_err());
        let empty = encode(b"", 1);
        assert_eq!(empty.len() as u64, HEADER_LEN);
        assert_eq!(decode(&empty).unwrap().1.len(), 0);
    }
}

//! Per-chunk CRC32Cs of an object built up while its bytes are appended.
//!
//! Why: [`ObjectStore::put_file`](crate::ObjectStore::put_file) takes a finished file (a sealed
//! SCO) with the CRC32C of every [`CHUNK_SIZE`] chunk of it, and checks the file against them
//! while storing it, so a file damaged after it was written never reaches the store. The engine
//! already checksums every cluster it appends to its open SCO; keeping those checksums per chunk
//! instead of one running CRC costs nothing extra, and the CRC of the data as a whole (which the
//! engine records in its TLog) follows from the chunk CRCs with `crc32c_combine`: one checksum
//! pass when the data is written, one when it is stored.
//!
//! An object may start with a *prefix* whose bytes are known up front (a SCO's 4 KiB header):
//! the prefix counts towards the first chunk but not towards [`data_crc`](ChunkCrcs::data_crc).

/// Chunk size of the per-chunk CRCs, the granularity at which ranged reads are verified.
pub const CHUNK_SIZE: u32 = 64 * 1024;

/// The per-chunk CRC32Cs of `prefix + data`, where `data` arrives in pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkCrcs {
    prefix_len: u64,
    prefix_crc: u32,
    /// CRC of each chunk's *data* bytes: for the first chunk without the prefix.
    data_crcs: Vec<u32>,
    /// Data bytes appended so far.
    data_len: u64,
}

impl ChunkCrcs {
    /// Start with `prefix` (shorter than one chunk) as the first bytes of the object.
    pub fn with_prefix(prefix: &[u8]) -> Self {
        assert!(
            (prefix.len() as u64) < u64::from(CHUNK_SIZE),
            "prefix must be shorter than a chunk"
        );
        Self {
            prefix_len: prefix.len() as u64,
            prefix_crc: crc32c::crc32c(prefix),
            data_crcs: Vec::new(),
            data_len: 0,
        }
    }

    /// Add `bytes` at the end of the object.
    pub fn append(&mut self, mut bytes: &[u8]) {
        let chunk = u64::from(CHUNK_SIZE);
        while !bytes.is_empty() {
            let offset = self.prefix_len + self.data_len;
            let index = (offset / chunk) as usize;
            if self.data_crcs.len() <= index {
                self.data_crcs.push(0);
            }
            let used = offset % chunk;
            let room = (chunk - used) as usize;
            let n = room.min(bytes.len());
            if let Some(last) = self.data_crcs.last_mut() {
                *last = crc32c::crc32c_append(*last, &bytes[..n]);
            }
            self.data_len += n as u64;
            bytes = &bytes[n..];
        }
    }

    /// Length of the object (prefix and data) in bytes.
    pub fn len(&self) -> u64 {
        self.prefix_len + self.data_len
    }

    /// Whether neither a prefix nor data was given.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// CRC32C of the data appended (without the prefix).
    pub fn data_crc(&self) -> u32 {
        let mut crc = 0u32;
        for (index, chunk_crc) in self.data_crcs.iter().enumerate() {
            let len = self.data_len_of(index);
            crc = if len == u64::from(CHUNK_SIZE) {
                shift_one_chunk(crc) ^ chunk_crc
            } else {
                crc32c::crc32c_combine(crc, *chunk_crc, len as usize)
            };
        }
        crc
    }

    /// CRC32C of each [`CHUNK_SIZE`] chunk of the object, prefix included; the last chunk may be
    /// shorter.
    pub fn chunk_crcs(&self) -> Vec<u32> {
        let mut crcs = self.data_crcs.clone();
        match crcs.first_mut() {
            Some(first) if self.prefix_len > 0 => {
                *first =
                    crc32c::crc32c_combine(self.prefix_crc, *first, self.data_len_of(0) as usize);
            }
            None if self.prefix_len > 0 => crcs.push(self.prefix_crc),
            _ => {}
        }
        crcs
    }

    /// Data bytes in chunk `index`.
    fn data_len_of(&self, index: usize) -> u64 {
        let chunk = u64::from(CHUNK_SIZE);
        let start = (index as u64 * chunk).max(self.prefix_len);
        let end = ((index as u64 + 1) * chunk).min(self.len());
        end.saturating_sub(start)
    }
}

/// `crc` advanced over [`CHUNK_SIZE`] zero bytes: the first half of `crc32c_combine(crc, next,
/// CHUNK_SIZE)`, which is `shift_one_chunk(crc) ^ next`.
///
/// Why not `crc32c_combine` itself: it rebuilds the zeros operator by repeated squaring of a
/// 32×32 bit matrix on every call (zlib's method), tens of microseconds each; a 64 MiB SCO has
/// 1,024 chunks, and combining them that way cost more CPU than writing the SCO. The operator is
/// linear, so it is built once, column by column, and applied with 32 XORs at most.
fn shift_one_chunk(crc: u32) -> u32 {
    static COLUMNS: std::sync::OnceLock<[u32; 32]> = std::sync::OnceLock::new();
    let columns = COLUMNS.get_or_init(|| {
        std::array::from_fn(|bit| crc32c::crc32c_combine(1 << bit, 0, CHUNK_SIZE as usize))
    });
    columns
        .iter()
        .enumerate()
        .filter(|(bit, _)| crc >> bit & 1 == 1)
        .fold(0, |acc, (_, column)| acc ^ column)
}

/// The CRC32C of each [`CHUNK_SIZE`] chunk of `bytes`.
pub fn chunk_crcs_of(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(CHUNK_SIZE as usize)
        .map(crc32c::crc32c)
        .collect()
}

/// Reads the first `len` bytes of `inner`, failing with `InvalidData` as soon as a completed
/// [`CHUNK_SIZE`] chunk (or the last, shorter one) does not match its expected CRC.
pub(crate) struct CheckingReader<'a, R> {
    inner: std::io::Take<R>,
    expected: Option<&'a [u32]>,
    chunk: usize,
    crc: u32,
    filled: usize,
}

impl<'a, R: std::io::Read> CheckingReader<'a, R> {
    pub(crate) fn new(inner: R, len: u64, expected: Option<&'a [u32]>) -> Self {
        Self {
            inner: inner.take(len),
            expected,
            chunk: 0,
            crc: 0,
            filled: 0,
        }
    }

    fn finish_chunk(&mut self) -> std::io::Result<()> {
        let Some(expected) = self.expected else {
            return Ok(());
        };
        if expected.get(self.chunk) != Some(&self.crc) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("chunk {} does not match its CRC", self.chunk),
            ));
        }
        self.chunk += 1;
        self.crc = 0;
        self.filled = 0;
        Ok(())
    }
}

impl<R: std::io::Read> std::io::Read for CheckingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.expected.is_none() {
            return self.inner.read(buf);
        }
        let room = CHUNK_SIZE as usize - self.filled;
        let want = buf.len().min(room);
        let n = self.inner.read(&mut buf[..want])?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.filled += n;
        if self.filled == CHUNK_SIZE as usize || (self.inner.limit() == 0 && self.filled > 0) {
            self.finish_chunk()?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn matches_a_one_shot_computation_for_any_split() {
        let chunk = CHUNK_SIZE as usize;
        for (prefix_len, data_len, piece) in [
            (4096usize, 0usize, 1usize),
            (4096, 4096, 4096),
            (4096, chunk - 4096, 4096),
            (4096, chunk - 4095, 777),
            (4096, 5 * chunk + 12_345, 4096 * 3),
            (0, 3 * chunk, chunk),
            (0, 3 * chunk + 1, 1000),
            (0, 0, 1),
        ] {
            let object = pattern(prefix_len + data_len);
            let (prefix, data) = object.split_at(prefix_len);
            let mut crcs = ChunkCrcs::with_prefix(prefix);
            for part in data.chunks(piece) {
                crcs.append(part);
            }
            let case = format!("prefix {prefix_len}, data {data_len}, pieces of {piece}");
            assert_eq!(crcs.len(), object.len() as u64, "{case}");
            assert_eq!(crcs.chunk_crcs(), chunk_crcs_of(&object), "{case}");
            assert_eq!(crcs.data_crc(), crc32c::crc32c(data), "{case}");
        }
    }

    #[test]
    fn checking_reader_passes_good_data_and_stops_at_a_bad_chunk() {
        use std::io::Read;
        let data = pattern(3 * CHUNK_SIZE as usize + 100);
        let crcs = chunk_crcs_of(&data);
        let mut out = Vec::new();
        CheckingReader::new(&data[..], data.len() as u64, Some(&crcs))
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        for bad_at in [10usize, CHUNK_SIZE as usize + 5, data.len() - 1] {
            let mut bad = data.clone();
            bad[bad_at] ^= 1;
            let mut buf = vec![0u8; data.len()];
            let err = CheckingReader::new(&bad[..], bad.len() as u64, Some(&crcs))
                .read_exact(&mut buf)
                .unwrap_err();
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::InvalidData,
                "flip at {bad_at}"
            );
        }
    }
}

//! SCO (Storage Container Object) files: append-only containers of consecutive cluster writes.
//!
//! Format (version 1), identical in the write buffer and as a backend object:
//!
//! ```text
//! 0     [u8; 8]  magic "VSTORSCO"
//! 8     u32      format version (1)
//! 12    u32      cluster size in bytes
//! 16    u32      SCO number
//! 20    u8       clone id
//! 21    u8       SCO version
//! 22    u16      length N of the namespace name
//! 24    u32      CRC32C of bytes 0..24 followed by the namespace name
//! 28    [u8; N]  namespace (volume) name, N <= 255
//! ..4096         zero padding
//! 4096  clusters, each `cluster size` bytes, in the order they were written
//! ```
//!
//! Invariants:
//! * The header occupies exactly one 4 KiB block, so cluster `i` starts at `4096 + i * cluster
//!   size` and the data stays block-aligned (ranged backend reads and direct I/O need that).
//! * A SCO is only ever appended to while it is the volume's open SCO. Once sealed it is never
//!   written again (the local backend may hold it by hard link). Once sealed, its length is
//!   `4096 + clusters * cluster size` and its data CRC32C is recorded in the TLog (an SCO-CRC entry),
//!   which the uploader checks before the SCO leaves the node: a SCO damaged in the write buffer is
//!   caught before it reaches a store that copies it (S3, the EC tier, a local store on another
//!   file system). The local store on the same file system links the file with the chunk CRCs
//!   the write path computed, without reading it again (one checksum pass, issue 9); there the
//!   damage is caught by the CRC check of its first read.
//! * The header names its SCO and volume, so a misplaced or swapped file is detected on open.

use std::path::Path;
use std::sync::Arc;

use crate::types::{ScoName, ScoNumber};
use crate::wbfs::{WbFile, WbFs};

pub const SCO_HEADER_LEN: u64 = 4096;
const MAGIC: &[u8; 8] = b"VSTORSCO";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoHeader {
    pub cluster_size: u32,
    pub sco: ScoName,
    pub namespace: String,
}

impl ScoHeader {
    pub fn encode(&self) -> Vec<u8> {
        let name = self.namespace.as_bytes();
        let name = &name[..name.len().min(255)];
        let mut out = vec![0u8; SCO_HEADER_LEN as usize];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.cluster_size.to_le_bytes());
        out[16..20].copy_from_slice(&self.sco.number.0.to_le_bytes());
        out[20] = self.sco.clone_id;
        out[21] = self.sco.version;
        out[22..24].copy_from_slice(&(name.len() as u16).to_le_bytes());
        out[28..28 + name.len()].copy_from_slice(name);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..24]), name);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < SCO_HEADER_LEN as usize {
            return Err("shorter than the SCO header".into());
        }
        if &bytes[..8] != MAGIC {
            return Err("bad SCO magic".into());
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!("unsupported SCO format version {version}"));
        }
        let name_len = u16::from_le_bytes([bytes[22], bytes[23]]) as usize;
        if name_len > 255 {
            return Err("namespace name too long".into());
        }
        let name = &bytes[28..28 + name_len];
        if crc32c::crc32c_append(crc32c::crc32c(&bytes[..24]), name) != u32_at(24) {
            return Err("SCO header checksum mismatch".into());
        }
        Ok(Self {
            cluster_size: u32_at(12),
            sco: ScoName {
                clone_id: bytes[20],
                number: ScoNumber(u32_at(16)),
                version: bytes[21],
            },
            namespace: String::from_utf8_lossy(name).into_owned(),
        })
    }
}

/// Byte offset of cluster `index` inside a SCO.
pub fn cluster_offset(index: u64, cluster_size: u64) -> u64 {
    SCO_HEADER_LEN + index * cluster_size
}

/// Create a new SCO file holding just its header. A file already at `path` is unlinked, never
/// truncated: an uploaded SCO may share its inode with the backend's copy (a hard link made by
/// `ObjectStore::put_file`), which must not change.
pub fn create(fs: &dyn WbFs, path: &Path, header: &ScoHeader) -> std::io::Result<Arc<dyn WbFile>> {
    match fs.remove(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let file = fs.create(path)?;
    file.write_all_at(&header.encode(), 0)?;
    Ok(file)
}

/// Open an existing SCO file and check that its header is the expected one.
pub fn open(
    fs: &dyn WbFs,
    path: &Path,
    expected: &ScoHeader,
) -> Result<(Arc<dyn WbFile>, u64), String> {
    let file = fs.open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut header = vec![0u8; SCO_HEADER_LEN as usize];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| format!("cannot read header: {e}"))?;
    let found = ScoHeader::decode(&header)?;
    if &found != expected {
        return Err(format!(
            "header names SCO {} of {:?}, expected {} of {:?}",
            found.sco, found.namespace, expected.sco, expected.namespace
        ));
    }
    let len = file.size().map_err(|e| format!("cannot stat: {e}"))?;
    Ok((file, len))
}

/// CRC32C of the first `clusters` clusters of an open SCO file.
pub fn data_crc(file: &dyn WbFile, clusters: u64, cluster_size: u64) -> std::io::Result<u32> {
    let mut crc = 0u32;
    let mut buf = vec![0u8; (1 << 20).min((clusters * cluster_size).max(1)) as usize];
    let mut offset = SCO_HEADER_LEN;
    let end = cluster_offset(clusters, cluster_size);
    while offset < end {
        let n = ((end - offset) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], offset)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        offset += n as u64;
    }
    Ok(crc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wbfs::StdFs;

    fn header() -> ScoHeader {
        ScoHeader {
            cluster_size: 4096,
            sco: ScoName::new(ScoNumber(42)),
            namespace: "vol-a".into(),
        }
    }

    #[test]
    fn header_round_trips_and_corruption_is_detected() {
        let bytes = header().encode();
        assert_eq!(bytes.len(), 4096);
        assert_eq!(ScoHeader::decode(&bytes).unwrap(), header());
        for pos in (0..24).chain(28..33) {
            let mut bad = bytes.clone();
            bad[pos] ^= 1;
            assert!(ScoHeader::decode(&bad).is_err(), "flip at {pos}");
        }
        assert!(ScoHeader::decode(&bytes[..100]).is_err());
    }

    #[test]
    fn open_rejects_a_swapped_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sco");
        let file = create(&StdFs, &path, &header()).unwrap();
        file.write_all_at(&[7u8; 8192], cluster_offset(0, 4096))
            .unwrap();
        let (_, len) = open(&StdFs, &path, &header()).unwrap();
        assert_eq!(len, 4096 + 8192);
        assert_eq!(
            data_crc(file.as_ref(), 2, 4096).unwrap(),
            crc32c::crc32c(&[7u8; 8192])
        );
        let mut other = header();
        other.sco.number = ScoNumber(43);
        let Err(err) = open(&StdFs, &path, &other) else {
            panic!("a swapped SCO opens");
        };
        assert!(err.contains("expected 00_0000002b_00"), "{err}");
    }
}

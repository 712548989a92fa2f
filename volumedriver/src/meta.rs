//! Small metadata documents (volume configuration, the backend TLog list, the node registry) in a
//! checksummed envelope.
//!
//! The payload is JSON, because these documents are tiny, rarely written and worth reading with
//! `cat` during an incident; the envelope makes them as trustworthy as the binary formats:
//!
//! ```text
//! 0   [u8; 8]  magic "VSTORMD\0"
//! 8   [u8; 4]  document kind, e.g. "VCFG" (volume config), "TLGS" (TLog list), "REGY" (registry)
//! 12  u32      format version of that kind
//! 16  u64      payload length
//! 24  u32      CRC32C of bytes 0..24 followed by the payload
//! 28  u32      reserved (0)
//! 32  payload  JSON
//! ```
//!
//! A document whose magic, kind, version, length or checksum is off is rejected as a whole: we
//! never act on half of a configuration.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"VSTORMD\0";
const HEADER_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("not a vstor metadata document (bad magic)")]
    BadMagic,
    #[error("expected a {expected} document, found {found}")]
    WrongKind { expected: String, found: String },
    #[error("unsupported {kind} document version {version}")]
    Version { kind: String, version: u32 },
    #[error("document is truncated or has trailing bytes")]
    Length,
    #[error("checksum mismatch")]
    Checksum,
    #[error("invalid JSON payload: {0}")]
    Json(#[from] serde_json::Error),
}

pub fn encode<T: Serialize>(kind: &[u8; 4], version: u32, value: &T) -> Vec<u8> {
    // Serialising plain data structs to JSON cannot fail.
    let payload = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(kind);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..24]), &payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

pub fn decode<T: DeserializeOwned>(
    kind: &[u8; 4],
    version: u32,
    bytes: &[u8],
) -> Result<T, MetaError> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(MetaError::BadMagic);
    }
    if &bytes[8..12] != kind {
        return Err(MetaError::WrongKind {
            expected: String::from_utf8_lossy(kind).into_owned(),
            found: String::from_utf8_lossy(&bytes[8..12]).into_owned(),
        });
    }
    let found_version = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if found_version != version {
        return Err(MetaError::Version {
            kind: String::from_utf8_lossy(kind).into_owned(),
            version: found_version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    if u64::from_le_bytes(len) != (bytes.len() - HEADER_LEN) as u64 {
        return Err(MetaError::Length);
    }
    let stored = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
    let payload = &bytes[HEADER_LEN..];
    if crc32c::crc32c_append(crc32c::crc32c(&bytes[..24]), payload) != stored {
        return Err(MetaError::Checksum);
    }
    Ok(serde_json::from_slice(payload)?)
}

/// Replace `path` atomically with `bytes`: temp file, fsync, rename, fsync of the directory.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".tmp-{file_name}-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flip_detected() {
        let doc = vec!["a".to_string(), "b".to_string()];
        let bytes = encode(b"TEST", 1, &doc);
        let back: Vec<String> = decode(b"TEST", 1, &bytes).unwrap();
        assert_eq!(back, doc);
        for pos in 0..bytes.len() {
            if (28..32).contains(&pos) {
                continue; // reserved
            }
            let mut bad = bytes.clone();
            bad[pos] ^= 0x04;
            assert!(
                decode::<Vec<String>>(b"TEST", 1, &bad).is_err(),
                "flip at {pos} undetected"
            );
        }
        assert!(matches!(
            decode::<Vec<String>>(b"OTHR", 1, &bytes),
            Err(MetaError::WrongKind { .. })
        ));
        assert!(matches!(
            decode::<Vec<String>>(b"TEST", 2, &bytes),
            Err(MetaError::Version { .. })
        ));
        assert!(matches!(
            decode::<Vec<String>>(b"TEST", 1, &bytes[..bytes.len() - 1]),
            Err(MetaError::Length)
        ));
    }
}

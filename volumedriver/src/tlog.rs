//! TLogs: the append-only transaction logs that are the source of truth for a volume's metadata.
//!
//! A TLog is a flat sequence of fixed 16-byte entries, two little-endian u64 words each. The top
//! byte of the first word is the entry type:
//!
//! | type | word 0 (low 56 bits)                        | word 1                                  |
//! |------|---------------------------------------------|-----------------------------------------|
//! | 0x01 HEADER | magic 0x474c5456 ("VTLG") << 16 \| version | TLog number                       |
//! | 0x02 LOC    | cluster address                      | [`ClusterLocation`] (unwritten = zeroed)|
//! | 0x03 TRIM   | first cluster address                | cluster count                           |
//! | 0x04 SCOCRC | cluster count << 32 \| CRC32C of the SCO's data | SCO identity as a location with offset 0 |
//! | 0x05 SYNC   | entry index i                        | CRC32C of the entries before index i    |
//! | 0x06 CLOSE  | entry count n                        | CRC32C of the n entries before it       |
//!
//! Invariants and why they hold:
//! * Entry 0 is the HEADER; every CRC covers the raw bytes of entries from index 0.
//! * A TLog on the backend is **closed**: its last entry is a CLOSE whose CRC matches. A TLog that
//!   is not closed is only ever found in a node's write buffer after a crash.
//! * A SYNC entry is appended only after every SCO holding data for the entries before its index
//!   has been fsynced, and is itself followed by an fsync of the TLog. Recovery of an unclosed TLog
//!   therefore keeps exactly the entries before the highest SYNC index whose CRC verifies: every
//!   acknowledged FLUSH survives, and nothing whose data may be missing is replayed. The SYNC may
//!   sit physically after entries it does not cover (writes that raced the flush); those are
//!   dropped, which leaves their clusters with their previous content.
//! * A SCO's entries all live in one TLog, followed by its SCOCRC entry; a TLog is closed only
//!   after the SCOCRC of every SCO it references.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::types::{ClusterAddress, ClusterLocation, ScoName, TLogNumber};
use crate::wbfs::{WbFile, WbFs};

pub const ENTRY_LEN: usize = 16;
const MAGIC: u64 = 0x474c_5456;
const VERSION: u64 = 1;
const LOW56: u64 = (1 << 56) - 1;

const T_HEADER: u64 = 0x01;
const T_LOC: u64 = 0x02;
const T_TRIM: u64 = 0x03;
const T_SCOCRC: u64 = 0x04;
const T_SYNC: u64 = 0x05;
const T_CLOSE: u64 = 0x06;

/// Write buffered entries to the file once this many bytes are pending.
const WRITE_OUT_THRESHOLD: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Header {
        number: TLogNumber,
    },
    Loc {
        address: ClusterAddress,
        location: ClusterLocation,
    },
    Trim {
        start: ClusterAddress,
        count: u64,
    },
    ScoCrc {
        sco: ScoName,
        clusters: u32,
        crc: u32,
    },
    Sync {
        index: u64,
        crc: u32,
    },
    Close {
        count: u64,
        crc: u32,
    },
}

impl Entry {
    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let (w0, w1) = match *self {
            Entry::Header { number } => (T_HEADER << 56 | MAGIC << 16 | VERSION, number.0),
            Entry::Loc { address, location } => (T_LOC << 56 | (address & LOW56), location.raw()),
            Entry::Trim { start, count } => (T_TRIM << 56 | (start & LOW56), count),
            Entry::ScoCrc { sco, clusters, crc } => (
                T_SCOCRC << 56 | (u64::from(clusters) & 0xff_ffff) << 32 | u64::from(crc),
                ClusterLocation::new(sco, 0).raw(),
            ),
            Entry::Sync { index, crc } => (T_SYNC << 56 | (index & LOW56), u64::from(crc)),
            Entry::Close { count, crc } => (T_CLOSE << 56 | (count & LOW56), u64::from(crc)),
        };
        let mut out = [0u8; ENTRY_LEN];
        out[..8].copy_from_slice(&w0.to_le_bytes());
        out[8..].copy_from_slice(&w1.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; ENTRY_LEN]) -> Result<Self, String> {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[..8]);
        let w0 = u64::from_le_bytes(w);
        w.copy_from_slice(&bytes[8..]);
        let w1 = u64::from_le_bytes(w);
        let payload = w0 & LOW56;
        Ok(match w0 >> 56 {
            T_HEADER => {
                if payload >> 16 != MAGIC {
                    return Err("bad TLog magic".into());
                }
                if payload & 0xffff != VERSION {
                    return Err(format!("unsupported TLog version {}", payload & 0xffff));
                }
                Entry::Header {
                    number: TLogNumber(w1),
                }
            }
            T_LOC => Entry::Loc {
                address: payload,
                location: ClusterLocation::from_raw(w1),
            },
            T_TRIM => Entry::Trim {
                start: payload,
                count: w1,
            },
            T_SCOCRC => Entry::ScoCrc {
                sco: ClusterLocation::from_raw(w1).sco(),
                clusters: (payload >> 32) as u32,
                crc: payload as u32,
            },
            T_SYNC if u32::try_from(w1).is_ok() => Entry::Sync {
                index: payload,
                crc: w1 as u32,
            },
            T_CLOSE if u32::try_from(w1).is_ok() => Entry::Close {
                count: payload,
                crc: w1 as u32,
            },
            other => return Err(format!("unknown TLog entry type {other:#x}")),
        })
    }
}

/// What a TLog says once parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTLog {
    pub number: TLogNumber,
    /// LOC, TRIM and SCOCRC entries to replay, in order.
    pub entries: Vec<Entry>,
    /// True if the TLog ends with a valid CLOSE: every entry is trustworthy.
    pub closed: bool,
}

/// Parse a TLog. A closed TLog must verify completely. An unclosed one (crash recovery) yields the
/// entries covered by its last valid SYNC marker; with `require_closed` it is an error instead.
pub fn parse(bytes: &[u8], require_closed: bool) -> Result<ParsedTLog, String> {
    parse_inner(bytes, require_closed, true)
}

/// Parse a TLog as if it had no CLOSE: only the prefix vouched for by its last verified SYNC.
/// Used when a closed TLog's SCOs turn out not to hold what it describes (power was lost before
/// they reached the disk).
pub fn parse_synced_prefix(bytes: &[u8]) -> Result<ParsedTLog, String> {
    parse_inner(bytes, false, false)
}

fn parse_inner(
    bytes: &[u8],
    require_closed: bool,
    trust_close: bool,
) -> Result<ParsedTLog, String> {
    if bytes.len() < ENTRY_LEN {
        return Err("empty TLog (no header)".into());
    }
    let mut entry = [0u8; ENTRY_LEN];
    entry.copy_from_slice(&bytes[..ENTRY_LEN]);
    let Entry::Header { number } = Entry::decode(&entry)? else {
        return Err("TLog does not start with a header".into());
    };
    // crc_before[i] = CRC of entries [0, i).
    let whole = bytes.len() / ENTRY_LEN;
    let mut crc_before = Vec::with_capacity(whole + 1);
    crc_before.push(0u32);
    let mut decoded = Vec::with_capacity(whole);
    let mut valid_upto = 1usize;
    let mut closed = false;
    for (index, chunk) in bytes.chunks_exact(ENTRY_LEN).enumerate() {
        let running = crc_before[index];
        crc_before.push(crc32c::crc32c_append(running, chunk));
        entry.copy_from_slice(chunk);
        let parsed = if index == 0 {
            Ok(Entry::Header { number })
        } else {
            Entry::decode(&entry)
        };
        match parsed {
            Ok(Entry::Close { .. }) if !trust_close => break,
            Ok(Entry::Close { count, crc }) => {
                if count == index as u64 && crc == running {
                    if (index + 1) * ENTRY_LEN != bytes.len() {
                        return Err("data after the CLOSE entry".into());
                    }
                    closed = true;
                    valid_upto = index;
                    decoded.push(Entry::Close { count, crc });
                    break;
                }
                if require_closed {
                    return Err(format!("CLOSE entry at {index} does not verify"));
                }
                break;
            }
            Ok(Entry::Sync { index: upto, crc }) => {
                if (upto as usize) <= index && crc_before[upto as usize] == crc {
                    valid_upto = valid_upto.max(upto as usize);
                } else if require_closed {
                    return Err(format!("SYNC entry at {index} does not verify"));
                }
                decoded.push(Entry::Sync { index: upto, crc });
            }
            Ok(Entry::Header { .. }) if index > 0 => {
                if require_closed {
                    return Err(format!("second header at entry {index}"));
                }
                break;
            }
            Ok(other) => decoded.push(other),
            Err(e) => {
                if require_closed {
                    return Err(format!("entry {index}: {e}"));
                }
                break;
            }
        }
    }
    if require_closed && !closed {
        return Err("TLog is not closed (no valid CLOSE entry)".into());
    }
    let entries = decoded
        .into_iter()
        .take(valid_upto)
        .filter(|e| {
            matches!(
                e,
                Entry::Loc { .. } | Entry::Trim { .. } | Entry::ScoCrc { .. }
            )
        })
        .collect();
    Ok(ParsedTLog {
        number,
        entries,
        closed,
    })
}

/// Encode a complete, closed TLog from its replayable entries.
pub fn encode_closed(number: TLogNumber, entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity((entries.len() + 2) * ENTRY_LEN);
    out.extend_from_slice(&Entry::Header { number }.encode());
    for entry in entries {
        out.extend_from_slice(&entry.encode());
    }
    let close = Entry::Close {
        count: (out.len() / ENTRY_LEN) as u64,
        crc: crc32c::crc32c(&out),
    };
    out.extend_from_slice(&close.encode());
    out
}

/// A point in an open TLog that a SYNC entry can later vouch for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPoint {
    pub number: TLogNumber,
    pub index: u64,
    pub crc: u32,
}

/// The volume's current TLog: entries are buffered in memory and written to the file in batches,
/// and always before a SYNC or CLOSE.
pub struct TLogWriter {
    number: TLogNumber,
    path: PathBuf,
    file: Arc<dyn WbFile>,
    buffer: Vec<u8>,
    entries: u64,
    written: u64,
    crc: u32,
    loc_entries: u64,
}

impl TLogWriter {
    pub fn create(fs: &dyn WbFs, path: &Path, number: TLogNumber) -> std::io::Result<Self> {
        let file = fs.create(path)?;
        let mut writer = Self {
            number,
            path: path.to_path_buf(),
            file,
            buffer: Vec::with_capacity(WRITE_OUT_THRESHOLD + ENTRY_LEN),
            entries: 0,
            written: 0,
            crc: 0,
            loc_entries: 0,
        };
        writer.push(Entry::Header { number });
        Ok(writer)
    }

    pub fn number(&self) -> TLogNumber {
        self.number
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &Arc<dyn WbFile> {
        &self.file
    }

    /// Number of LOC and TRIM entries so far.
    pub fn data_entries(&self) -> u64 {
        self.loc_entries
    }

    fn push(&mut self, entry: Entry) {
        let bytes = entry.encode();
        self.crc = crc32c::crc32c_append(self.crc, &bytes);
        self.buffer.extend_from_slice(&bytes);
        self.entries += 1;
    }

    /// Append an entry; writes the buffer out when it is large enough.
    pub fn append(&mut self, entry: Entry) -> std::io::Result<()> {
        if matches!(entry, Entry::Loc { .. } | Entry::Trim { .. }) {
            self.loc_entries += 1;
        }
        self.push(entry);
        if self.buffer.len() >= WRITE_OUT_THRESHOLD {
            self.write_out()?;
        }
        Ok(())
    }

    /// Write every buffered entry to the file (page cache; no fsync).
    pub fn write_out(&mut self) -> std::io::Result<()> {
        if !self.buffer.is_empty() {
            self.file
                .write_all_at(&self.buffer, self.written * ENTRY_LEN as u64)?;
            self.written = self.entries;
            self.buffer.clear();
        }
        Ok(())
    }

    /// The current end of the log, for a later SYNC entry.
    pub fn sync_point(&self) -> SyncPoint {
        SyncPoint {
            number: self.number,
            index: self.entries,
            crc: self.crc,
        }
    }

    /// True if entries were added since `point`.
    pub fn has_entries_after(&self, point: Option<SyncPoint>) -> bool {
        match point {
            Some(p) if p.number == self.number => self.entries > p.index,
            _ => self.entries > 1,
        }
    }

    /// Append a SYNC for `point` (which must be of this TLog) and write it out.
    pub fn append_sync(&mut self, point: SyncPoint) -> std::io::Result<()> {
        debug_assert_eq!(point.number, self.number);
        self.push(Entry::Sync {
            index: point.index,
            crc: point.crc,
        });
        self.write_out()
    }

    /// Append the CLOSE entry and write everything out. The file is not fsynced here.
    pub fn close(mut self) -> std::io::Result<(TLogNumber, PathBuf, Arc<dyn WbFile>)> {
        let close = Entry::Close {
            count: self.entries,
            crc: self.crc,
        };
        self.push(close);
        self.write_out()?;
        Ok((self.number, self.path, self.file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ScoNumber;
    use proptest::prelude::*;

    fn loc(n: u32, off: u16) -> ClusterLocation {
        ClusterLocation::new(ScoName::new(ScoNumber(n)), off)
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            (0u64..(1 << 35), 1u32.., any::<u16>()).prop_map(|(a, n, o)| Entry::Loc {
                address: a,
                location: loc(n, o)
            }),
            (0u64..(1 << 35)).prop_map(|a| Entry::Loc {
                address: a,
                location: ClusterLocation::UNWRITTEN
            }),
            (0u64..(1 << 35), 1u64..(1 << 35))
                .prop_map(|(s, c)| Entry::Trim { start: s, count: c }),
            (1u32.., 1u32..=65536, any::<u32>()).prop_map(|(n, c, crc)| Entry::ScoCrc {
                sco: ScoName::new(ScoNumber(n)),
                clusters: c,
                crc
            }),
        ]
    }

    proptest! {
        #[test]
        fn closed_tlogs_round_trip(entries in proptest::collection::vec(arb_entry(), 0..100), number: u64) {
            let bytes = encode_closed(TLogNumber(number), &entries);
            let parsed = parse(&bytes, true).unwrap();
            prop_assert!(parsed.closed);
            prop_assert_eq!(parsed.number, TLogNumber(number));
            prop_assert_eq!(parsed.entries, entries);
        }

        #[test]
        fn any_corruption_of_a_closed_tlog_is_detected(
            entries in proptest::collection::vec(arb_entry(), 1..50),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut bytes = encode_closed(TLogNumber(1), &entries);
            let at = pos.index(bytes.len());
            bytes[at] ^= 1 << bit;
            prop_assert!(parse(&bytes, true).is_err());
            // Truncation too.
            let good = encode_closed(TLogNumber(1), &entries);
            prop_assert!(parse(&good[..good.len() - ENTRY_LEN], true).is_err());
        }
    }

    #[test]
    fn unclosed_tlog_keeps_exactly_the_synced_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tlog");
        let mut writer = TLogWriter::create(&crate::wbfs::StdFs, &path, TLogNumber(3)).unwrap();
        let e = |a: u64| Entry::Loc {
            address: a,
            location: loc(1, a as u16),
        };
        writer.append(e(1)).unwrap();
        writer.append(e(2)).unwrap();
        let point = writer.sync_point();
        writer.append(e(3)).unwrap(); // raced the flush: after the point
        writer.append_sync(point).unwrap();
        writer.append(e(4)).unwrap();
        writer.write_out().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let parsed = parse(&bytes, false).unwrap();
        assert!(!parsed.closed);
        assert_eq!(parsed.entries, vec![e(1), e(2)]);
        assert!(parse(&bytes, true).is_err());

        // A torn (garbage) tail does not hide the verified prefix.
        let mut torn = bytes.clone();
        torn.extend_from_slice(&[0xffu8; 10]);
        assert_eq!(parse(&torn, false).unwrap().entries, vec![e(1), e(2)]);

        // A SYNC whose CRC does not match what precedes it is ignored.
        let mut forged = bytes.clone();
        let sync_at = 4 * ENTRY_LEN + 8;
        forged[sync_at] ^= 1;
        assert!(parse(&forged, false).unwrap().entries.is_empty());

        // Closing makes every entry count, unless the CLOSE is not to be trusted.
        let (_, _, _) = writer.close().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let closed = parse(&bytes, true).unwrap();
        assert!(closed.closed);
        assert_eq!(closed.entries, vec![e(1), e(2), e(3), e(4)]);
        let prefix = parse_synced_prefix(&bytes).unwrap();
        assert!(!prefix.closed);
        assert_eq!(prefix.entries, vec![e(1), e(2)]);
    }

    #[test]
    fn header_is_checked() {
        let bytes = encode_closed(TLogNumber(1), &[]);
        let mut bad = bytes.clone();
        bad[3] ^= 0xff; // magic
        assert!(parse(&bad, false).is_err());
        assert!(parse(&bytes[..8], false).is_err());
        assert!(parse(&bytes[ENTRY_LEN..], false).is_err());
    }
}

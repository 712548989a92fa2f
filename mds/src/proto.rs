//! The MDS protocol: what a volume's owner (and the CLI, and tests) say to an MDS. One versioned
//! message enum and one codec, shared by client and server, in the shape of the OSD protocol.
//!
//! # Frame
//!
//! ```text
//! offset size field
//!      0    4 magic          0x5653_4D31 ("VSM1"), little-endian
//!      4    2 version        protocol version of the sender
//!      6    2 kind           message kind (see `Message::kind`)
//!      8    8 id             request id chosen by the client; a reply carries its request's id
//!     16    4 payload length bytes after the header, at most MAX_FRAME_PAYLOAD
//!     20    4 CRC32C         over bytes 4..20 of the header + payload
//!     24    n payload        little-endian fields per kind
//! ```
//!
//! Invariants: the CRC covers the header fields too, so a flipped `kind` or `id` never turns
//! into another valid request or completes the wrong call; a length above the limit is refused
//! before anything is buffered; counts inside a payload are checked against the bytes present
//! before allocating; a payload must be consumed exactly (trailing bytes are an error).
//!
//! # Versioning
//!
//! `Hello`, `Welcome` and `VersionMismatch` are frozen across versions; every other kind is
//! accepted only with the version the connection agreed on. A server speaks every version from
//! [`MIN_PROTOCOL_VERSION`] to [`PROTOCOL_VERSION`]: its `Welcome` carries the client's version
//! and the connection uses it. A server that does not speak the client's version answers
//! `VersionMismatch` and closes; the client then retries once with the server's version when it
//! speaks that one (an older MDS during an upgrade), and otherwise reports both versions.
//!
//! Version 2 adds `DumpPages`/`Pages`: the map as the store keeps it, 512 locations (4 KiB) per
//! page, so a restart loads a table with one copy per page instead of a decode per cluster; a
//! version-1 connection refuses these kinds as unknown.
//!
//! # Requests
//!
//! `MultiSet` carries the owner tag (older than the table's: `Fenced`) and the cork the owner
//! believes the table is at (`expect`) with the cork after the update (`cork`): a table at
//! another cork answers `CorkMismatch`, so an update is never applied on top of a history it
//! does not follow.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::store::TableInfo;
use crate::table::{Cork, Counters, Role, TableMeta, Update};

/// "VSM1".
pub const MAGIC: u32 = 0x5653_4D31;
pub const PROTOCOL_VERSION: u16 = 2;
/// Oldest version a server still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Locations in one map page of `Pages` (the store's and the volume map's page).
pub const PAGE_ENTRIES: usize = 512;
/// Bytes of one page in `Pages`: `PAGE_ENTRIES` little-endian u64 raw locations, 0 = unwritten.
pub const PAGE_BYTES: usize = PAGE_ENTRIES * 8;
/// Most pages in one `Pages` reply (16 MiB).
pub const MAX_PAGES: usize = 4096;
pub const HEADER_LEN: usize = 24;
pub const MAX_FRAME_PAYLOAD: usize = 32 << 20;
pub const MAX_STRING_LEN: usize = 4096;
/// Most addresses, updates or entries in one message.
pub const MAX_BATCH: usize = 1 << 20;
/// Most tables in one `Tables` reply.
pub const MAX_TABLES: usize = 100_000;

/// Why a frame could not be encoded or decoded. Any of these ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(
        "bad frame magic {magic:#010x} ({hint})",
        magic = .0,
        hint = vstor_net::bad_magic_hint(*.0, "not an MDS protocol peer?")
    )]
    BadMagic(u32),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame CRC mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    CrcMismatch { expected: u32, actual: u32 },
    #[error("peer speaks MDS protocol version {got}, this build speaks {ours}")]
    UnsupportedVersion { got: u16, ours: u16 },
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Why an MDS refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// No table for the volume.
    NotFound = 1,
    /// The owner tag is older than the table's.
    Fenced = 2,
    /// The table is a slave: no map updates.
    NotMaster = 3,
    /// The table is not at the cork the update expects.
    CorkMismatch = 4,
    /// The request is not valid.
    Invalid = 5,
    /// The MDS's disk failed.
    Io = 6,
    /// Catch-up could not read the backend.
    Backend = 7,
    /// The table's stored metadata is corrupt.
    Corrupt = 8,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => ErrorCode::NotFound,
            2 => ErrorCode::Fenced,
            3 => ErrorCode::NotMaster,
            4 => ErrorCode::CorkMismatch,
            5 => ErrorCode::Invalid,
            6 => ErrorCode::Io,
            7 => ErrorCode::Backend,
            8 => ErrorCode::Corrupt,
            _ => return None,
        })
    }

    /// The code an MDS answers for `e`.
    pub fn of(e: &crate::MdsError) -> Self {
        use crate::MdsError as E;
        match e {
            E::NoTable { .. } => ErrorCode::NotFound,
            E::Fenced { .. } => ErrorCode::Fenced,
            E::NotMaster { .. } => ErrorCode::NotMaster,
            E::CorkMismatch { .. } => ErrorCode::CorkMismatch,
            E::Invalid { .. } => ErrorCode::Invalid,
            E::Backend { .. } => ErrorCode::Backend,
            E::Corrupt { .. } => ErrorCode::Corrupt,
            E::Store { .. } | E::Net { .. } => ErrorCode::Io,
            E::Refused { code, .. } => *code,
        }
    }
}

/// Every message of the protocol, requests and replies alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    // --- handshake (frozen across versions) ---
    Hello {
        version: u16,
        client: String,
    },
    Welcome {
        version: u16,
        server: String,
    },
    VersionMismatch {
        server: u16,
        client: u16,
    },
    // --- requests ---
    /// Locations of `addresses` (0 = unwritten).
    MultiGet {
        volume: String,
        addresses: Vec<u64>,
    },
    /// The master's update: apply `updates`, moving the cork from `expect` to `cork`.
    MultiSet {
        volume: String,
        owner_tag: u64,
        expect: Cork,
        cork: Cork,
        updates: Vec<Update>,
    },
    /// Create the table if needed and set its role.
    SetRole {
        volume: String,
        namespace: String,
        role: Role,
        owner_tag: u64,
    },
    /// Replay the backend TLogs after the cork (with `dry_run`: only count them).
    CatchUp {
        volume: String,
        dry_run: bool,
    },
    /// One table's metadata, counters and size.
    Stat {
        volume: String,
    },
    /// Every table.
    List,
    /// A page of the map: at most `limit` entries after address `after` (from the start without).
    Dump {
        volume: String,
        after: Option<u64>,
        limit: u32,
    },
    /// Remove a table.
    Drop {
        volume: String,
        owner_tag: u64,
    },
    /// (v2) The written pages among `count` pages from page `first` (page n holds clusters
    /// n * 512 .. n * 512 + 511).
    DumpPages {
        volume: String,
        first: u64,
        count: u32,
    },
    // --- replies ---
    Done,
    Locations {
        cork: Cork,
        locations: Vec<u64>,
    },
    CaughtUp {
        behind: u64,
        replayed: u64,
        full_rebuild: Option<String>,
        cork: Cork,
    },
    Table(TableInfo),
    Tables(Vec<TableInfo>),
    Entries {
        cork: Cork,
        entries: Vec<(u64, u64)>,
    },
    /// (v2) Answer to `DumpPages`: the written pages in the range, by page number, each
    /// `PAGE_BYTES` long; `next` is the first written page after the range (`None`: there is
    /// none, the dump is complete).
    Pages {
        cork: Cork,
        next: Option<u64>,
        pages: Vec<(u64, Bytes)>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

mod kind {
    pub const HELLO: u16 = 1;
    pub const WELCOME: u16 = 2;
    pub const VERSION_MISMATCH: u16 = 3;
    pub const MULTI_GET: u16 = 10;
    pub const MULTI_SET: u16 = 11;
    pub const SET_ROLE: u16 = 12;
    pub const CATCH_UP: u16 = 13;
    pub const STAT: u16 = 14;
    pub const LIST: u16 = 15;
    pub const DUMP: u16 = 16;
    pub const DROP: u16 = 17;
    pub const DUMP_PAGES: u16 = 18;
    pub const DONE: u16 = 100;
    pub const LOCATIONS: u16 = 101;
    pub const CAUGHT_UP: u16 = 102;
    pub const TABLE: u16 = 103;
    pub const TABLES: u16 = 104;
    pub const ENTRIES: u16 = 105;
    pub const ERROR: u16 = 106;
    pub const PAGES: u16 = 107;

    pub fn is_frozen(kind: u16) -> bool {
        matches!(kind, HELLO | WELCOME | VERSION_MISMATCH)
    }

    /// The protocol version that introduced `kind`.
    pub fn since(kind: u16) -> u16 {
        match kind {
            DUMP_PAGES | PAGES => 2,
            _ => 1,
        }
    }
}

const UPDATE_LOC: u8 = 1;
const UPDATE_TRIM: u8 = 2;
/// Encoded size of one update (tag + two u64).
const UPDATE_LEN: usize = 17;
/// Smallest encoded table info (two empty strings and the fixed fields).
const TABLE_INFO_MIN: usize = 2 + 2 + 1 + 8 + 16 + 5 * 8 + 8;

impl Message {
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello { .. } => kind::HELLO,
            Message::Welcome { .. } => kind::WELCOME,
            Message::VersionMismatch { .. } => kind::VERSION_MISMATCH,
            Message::MultiGet { .. } => kind::MULTI_GET,
            Message::MultiSet { .. } => kind::MULTI_SET,
            Message::SetRole { .. } => kind::SET_ROLE,
            Message::CatchUp { .. } => kind::CATCH_UP,
            Message::Stat { .. } => kind::STAT,
            Message::List => kind::LIST,
            Message::Dump { .. } => kind::DUMP,
            Message::Drop { .. } => kind::DROP,
            Message::DumpPages { .. } => kind::DUMP_PAGES,
            Message::Done => kind::DONE,
            Message::Locations { .. } => kind::LOCATIONS,
            Message::CaughtUp { .. } => kind::CAUGHT_UP,
            Message::Table(_) => kind::TABLE,
            Message::Tables(_) => kind::TABLES,
            Message::Entries { .. } => kind::ENTRIES,
            Message::Pages { .. } => kind::PAGES,
            Message::Error { .. } => kind::ERROR,
        }
    }

    /// The protocol version that introduced this message.
    pub fn since_version(&self) -> u16 {
        kind::since(self.kind())
    }

    /// Short name for logs (never includes data).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::VersionMismatch { .. } => "VersionMismatch",
            Message::MultiGet { .. } => "MultiGet",
            Message::MultiSet { .. } => "MultiSet",
            Message::SetRole { .. } => "SetRole",
            Message::CatchUp { .. } => "CatchUp",
            Message::Stat { .. } => "Stat",
            Message::List => "List",
            Message::Dump { .. } => "Dump",
            Message::Drop { .. } => "Drop",
            Message::DumpPages { .. } => "DumpPages",
            Message::Done => "Done",
            Message::Locations { .. } => "Locations",
            Message::CaughtUp { .. } => "CaughtUp",
            Message::Table(_) => "Table",
            Message::Tables(_) => "Tables",
            Message::Entries { .. } => "Entries",
            Message::Pages { .. } => "Pages",
            Message::Error { .. } => "Error",
        }
    }

    fn encode_payload(&self, out: &mut BytesMut) -> Result<(), ProtoError> {
        match self {
            Message::Hello { version, client } => {
                out.put_u16_le(*version);
                put_string(out, client)?;
            }
            Message::Welcome { version, server } => {
                out.put_u16_le(*version);
                put_string(out, server)?;
            }
            Message::VersionMismatch { server, client } => {
                out.put_u16_le(*server);
                out.put_u16_le(*client);
            }
            Message::MultiGet { volume, addresses } => {
                put_string(out, volume)?;
                put_count(out, addresses.len(), MAX_BATCH)?;
                for a in addresses {
                    out.put_u64_le(*a);
                }
            }
            Message::MultiSet {
                volume,
                owner_tag,
                expect,
                cork,
                updates,
            } => {
                put_string(out, volume)?;
                out.put_u64_le(*owner_tag);
                put_cork(out, *expect);
                put_cork(out, *cork);
                put_count(out, updates.len(), MAX_BATCH)?;
                for u in updates {
                    let (tag, a, b) = match *u {
                        Update::Loc { address, location } => (UPDATE_LOC, address, location),
                        Update::Trim { start, count } => (UPDATE_TRIM, start, count),
                    };
                    out.put_u8(tag);
                    out.put_u64_le(a);
                    out.put_u64_le(b);
                }
            }
            Message::SetRole {
                volume,
                namespace,
                role,
                owner_tag,
            } => {
                put_string(out, volume)?;
                put_string(out, namespace)?;
                out.put_u8(role.as_u8());
                out.put_u64_le(*owner_tag);
            }
            Message::CatchUp { volume, dry_run } => {
                put_string(out, volume)?;
                out.put_u8(u8::from(*dry_run));
            }
            Message::Stat { volume } => put_string(out, volume)?,
            Message::List | Message::Done => {}
            Message::Dump {
                volume,
                after,
                limit,
            } => {
                put_string(out, volume)?;
                match after {
                    Some(a) => {
                        out.put_u8(1);
                        out.put_u64_le(*a);
                    }
                    None => out.put_u8(0),
                }
                out.put_u32_le(*limit);
            }
            Message::Drop { volume, owner_tag } => {
                put_string(out, volume)?;
                out.put_u64_le(*owner_tag);
            }
            Message::Locations { cork, locations } => {
                put_cork(out, *cork);
                put_count(out, locations.len(), MAX_BATCH)?;
                for l in locations {
                    out.put_u64_le(*l);
                }
            }
            Message::CaughtUp {
                behind,
                replayed,
                full_rebuild,
                cork,
            } => {
                out.put_u64_le(*behind);
                out.put_u64_le(*replayed);
                match full_rebuild {
                    Some(reason) => {
                        out.put_u8(1);
                        put_string(out, truncate(reason))?;
                    }
                    None => out.put_u8(0),
                }
                put_cork(out, *cork);
            }
            Message::Table(info) => put_table(out, info)?,
            Message::Tables(tables) => {
                put_count(out, tables.len(), MAX_TABLES)?;
                for t in tables {
                    put_table(out, t)?;
                }
            }
            Message::DumpPages {
                volume,
                first,
                count,
            } => {
                put_string(out, volume)?;
                out.put_u64_le(*first);
                out.put_u32_le(*count);
            }
            Message::Pages { cork, next, pages } => {
                put_cork(out, *cork);
                match next {
                    Some(n) => {
                        out.put_u8(1);
                        out.put_u64_le(*n);
                    }
                    None => out.put_u8(0),
                }
                put_count(out, pages.len(), MAX_PAGES)?;
                for (number, page) in pages {
                    if page.len() != PAGE_BYTES {
                        return Err(ProtoError::Malformed(format!(
                            "page {number} is {} bytes, not {PAGE_BYTES}",
                            page.len()
                        )));
                    }
                    out.put_u64_le(*number);
                    out.put_slice(page);
                }
            }
            Message::Entries { cork, entries } => {
                put_cork(out, *cork);
                put_count(out, entries.len(), MAX_BATCH)?;
                for (a, l) in entries {
                    out.put_u64_le(*a);
                    out.put_u64_le(*l);
                }
            }
            Message::Error { code, message } => {
                out.put_u16_le(*code as u16);
                put_string(out, truncate(message))?;
            }
        }
        Ok(())
    }

    fn decode_payload(kind: u16, payload: Bytes) -> Result<Message, ProtoError> {
        let mut r = Reader(payload);
        let msg = match kind {
            kind::HELLO => Message::Hello {
                version: r.u16()?,
                client: r.string()?,
            },
            kind::WELCOME => Message::Welcome {
                version: r.u16()?,
                server: r.string()?,
            },
            kind::VERSION_MISMATCH => Message::VersionMismatch {
                server: r.u16()?,
                client: r.u16()?,
            },
            kind::MULTI_GET => {
                let volume = r.string()?;
                let n = r.count(MAX_BATCH, 8)?;
                let mut addresses = Vec::with_capacity(n);
                for _ in 0..n {
                    addresses.push(r.u64()?);
                }
                Message::MultiGet { volume, addresses }
            }
            kind::MULTI_SET => {
                let volume = r.string()?;
                let owner_tag = r.u64()?;
                let expect = r.cork()?;
                let cork = r.cork()?;
                let n = r.count(MAX_BATCH, UPDATE_LEN)?;
                let mut updates = Vec::with_capacity(n);
                for _ in 0..n {
                    let tag = r.u8()?;
                    let (a, b) = (r.u64()?, r.u64()?);
                    updates.push(match tag {
                        UPDATE_LOC => Update::Loc {
                            address: a,
                            location: b,
                        },
                        UPDATE_TRIM => Update::Trim { start: a, count: b },
                        other => {
                            return Err(ProtoError::Malformed(format!(
                                "unknown update type {other}"
                            )))
                        }
                    });
                }
                Message::MultiSet {
                    volume,
                    owner_tag,
                    expect,
                    cork,
                    updates,
                }
            }
            kind::SET_ROLE => Message::SetRole {
                volume: r.string()?,
                namespace: r.string()?,
                role: r.role()?,
                owner_tag: r.u64()?,
            },
            kind::CATCH_UP => Message::CatchUp {
                volume: r.string()?,
                dry_run: r.flag()?,
            },
            kind::STAT => Message::Stat {
                volume: r.string()?,
            },
            kind::LIST => Message::List,
            kind::DUMP => {
                let volume = r.string()?;
                let after = if r.flag()? { Some(r.u64()?) } else { None };
                Message::Dump {
                    volume,
                    after,
                    limit: r.u32()?,
                }
            }
            kind::DROP => Message::Drop {
                volume: r.string()?,
                owner_tag: r.u64()?,
            },
            kind::DONE => Message::Done,
            kind::LOCATIONS => {
                let cork = r.cork()?;
                let n = r.count(MAX_BATCH, 8)?;
                let mut locations = Vec::with_capacity(n);
                for _ in 0..n {
                    locations.push(r.u64()?);
                }
                Message::Locations { cork, locations }
            }
            kind::CAUGHT_UP => {
                let behind = r.u64()?;
                let replayed = r.u64()?;
                let full_rebuild = if r.flag()? { Some(r.string()?) } else { None };
                Message::CaughtUp {
                    behind,
                    replayed,
                    full_rebuild,
                    cork: r.cork()?,
                }
            }
            kind::TABLE => Message::Table(r.table()?),
            kind::TABLES => {
                let n = r.count(MAX_TABLES, TABLE_INFO_MIN)?;
                let mut tables = Vec::with_capacity(n);
                for _ in 0..n {
                    tables.push(r.table()?);
                }
                Message::Tables(tables)
            }
            kind::ENTRIES => {
                let cork = r.cork()?;
                let n = r.count(MAX_BATCH, 16)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push((r.u64()?, r.u64()?));
                }
                Message::Entries { cork, entries }
            }
            kind::DUMP_PAGES => Message::DumpPages {
                volume: r.string()?,
                first: r.u64()?,
                count: r.u32()?,
            },
            kind::PAGES => {
                let cork = r.cork()?;
                let next = if r.flag()? { Some(r.u64()?) } else { None };
                let n = r.count(MAX_PAGES, 8 + PAGE_BYTES)?;
                let mut pages = Vec::with_capacity(n);
                for _ in 0..n {
                    let number = r.u64()?;
                    pages.push((number, r.bytes(PAGE_BYTES)?));
                }
                Message::Pages { cork, next, pages }
            }
            kind::ERROR => {
                let raw = r.u16()?;
                let code = ErrorCode::from_u16(raw)
                    .ok_or_else(|| ProtoError::Malformed(format!("unknown error code {raw}")))?;
                Message::Error {
                    code,
                    message: r.string()?,
                }
            }
            other => return Err(ProtoError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(MAX_STRING_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_string(out: &mut BytesMut, s: &str) -> Result<(), ProtoError> {
    if s.len() > MAX_STRING_LEN {
        return Err(ProtoError::Malformed(format!(
            "string of {} bytes exceeds {MAX_STRING_LEN}",
            s.len()
        )));
    }
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
    Ok(())
}

fn put_count(out: &mut BytesMut, n: usize, max: usize) -> Result<(), ProtoError> {
    if n > max {
        return Err(ProtoError::Malformed(format!("{n} items exceed {max}")));
    }
    out.put_u32_le(n as u32);
    Ok(())
}

fn put_cork(out: &mut BytesMut, cork: Cork) {
    out.put_u64_le(cork.tlog);
    out.put_u32_le(cork.count);
    out.put_u32_le(cork.crc);
}

fn put_table(out: &mut BytesMut, t: &TableInfo) -> Result<(), ProtoError> {
    put_string(out, &t.volume)?;
    put_string(out, &t.meta.namespace)?;
    out.put_u8(t.meta.role.as_u8());
    out.put_u64_le(t.meta.owner_tag);
    put_cork(out, t.meta.cork);
    let c = &t.meta.counters;
    for v in [
        c.sets,
        c.refused,
        c.tlogs_replayed,
        c.full_rebuilds,
        c.incremental,
    ] {
        out.put_u64_le(v);
    }
    out.put_u64_le(t.entries);
    Ok(())
}

/// Bounds-checked little-endian reader over a payload; running short is `Truncated`.
struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize) -> Result<(), ProtoError> {
        if self.0.remaining() < n {
            Err(ProtoError::Truncated("payload"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn flag(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(ProtoError::Malformed(format!("flag byte {other}"))),
        }
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        self.need(2)?;
        Ok(self.0.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        self.need(4)?;
        Ok(self.0.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        self.need(8)?;
        Ok(self.0.get_u64_le())
    }
    /// A count of items of at least `item_len` bytes each, checked against the bytes present.
    fn count(&mut self, max: usize, item_len: usize) -> Result<usize, ProtoError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(ProtoError::Malformed(format!("{n} items exceed {max}")));
        }
        self.need(n.saturating_mul(item_len))?;
        Ok(n)
    }
    /// `n` bytes, sharing the frame's buffer.
    fn bytes(&mut self, n: usize) -> Result<Bytes, ProtoError> {
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    fn cork(&mut self) -> Result<Cork, ProtoError> {
        Ok(Cork {
            tlog: self.u64()?,
            count: self.u32()?,
            crc: self.u32()?,
        })
    }
    fn role(&mut self) -> Result<Role, ProtoError> {
        let raw = self.u8()?;
        Role::from_u8(raw).ok_or_else(|| ProtoError::Malformed(format!("unknown role {raw}")))
    }
    fn string(&mut self) -> Result<String, ProtoError> {
        let len = usize::from(self.u16()?);
        if len > MAX_STRING_LEN {
            return Err(ProtoError::Malformed(format!(
                "string of {len} bytes exceeds {MAX_STRING_LEN}"
            )));
        }
        self.need(len)?;
        let raw = self.0.split_to(len);
        String::from_utf8(raw.to_vec())
            .map_err(|_| ProtoError::Malformed("string is not UTF-8".into()))
    }
    fn table(&mut self) -> Result<TableInfo, ProtoError> {
        let volume = self.string()?;
        let namespace = self.string()?;
        let role = self.role()?;
        let owner_tag = self.u64()?;
        let cork = self.cork()?;
        let counters = Counters {
            sets: self.u64()?,
            refused: self.u64()?,
            tlogs_replayed: self.u64()?,
            full_rebuilds: self.u64()?,
            incremental: self.u64()?,
        };
        Ok(TableInfo {
            volume,
            meta: TableMeta {
                namespace,
                role,
                owner_tag,
                cork,
                counters,
            },
            entries: self.u64()?,
        })
    }
    fn finish(self) -> Result<(), ProtoError> {
        if self.0.has_remaining() {
            Err(ProtoError::Malformed(format!(
                "{} trailing bytes after the message",
                self.0.remaining()
            )))
        } else {
            Ok(())
        }
    }
}

/// One frame: a message and the request id it belongs to (0 for the handshake).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub id: u64,
    pub message: Message,
}

/// Frame codec for [`Message`], used by both client and server.
#[derive(Clone, Debug)]
pub struct MdsCodec {
    version: u16,
}

impl Default for MdsCodec {
    fn default() -> Self {
        Self {
            version: PROTOCOL_VERSION,
        }
    }
}

impl MdsCodec {
    pub fn with_version(version: u16) -> Self {
        Self { version }
    }

    /// The version this codec writes and accepts.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Append `frame` to `dst`.
    pub fn encode(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let kind = frame.message.kind();
        if kind::since(kind) > self.version {
            return Err(ProtoError::Malformed(format!(
                "{} needs protocol version {}, the connection speaks {}",
                frame.message.name(),
                kind::since(kind),
                self.version
            )));
        }
        let start = dst.len();
        dst.put_bytes(0, HEADER_LEN);
        if let Err(e) = frame.message.encode_payload(dst) {
            dst.truncate(start);
            return Err(e);
        }
        let len = dst.len() - start - HEADER_LEN;
        if len > MAX_FRAME_PAYLOAD {
            dst.truncate(start);
            return Err(ProtoError::FrameTooLarge {
                len,
                max: MAX_FRAME_PAYLOAD,
            });
        }
        let (head, payload) = dst[start..].split_at_mut(HEADER_LEN);
        head[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        head[4..6].copy_from_slice(&self.version.to_le_bytes());
        head[6..8].copy_from_slice(&frame.message.kind().to_le_bytes());
        head[8..16].copy_from_slice(&frame.id.to_le_bytes());
        head[16..20].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head[4..20]), payload);
        head[20..24].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// Take one complete frame off the front of `src`, or `None` if more bytes are needed.
    pub fn decode(&self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let magic = (&src[0..4]).get_u32_le();
        if magic != MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = (&src[16..20]).get_u32_le() as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(ProtoError::FrameTooLarge {
                len,
                max: MAX_FRAME_PAYLOAD,
            });
        }
        if src.len() < HEADER_LEN + len {
            vstor_net::reserve_frame(src, HEADER_LEN + len);
            return Ok(None);
        }
        let frame = src.split_to(HEADER_LEN + len).freeze();
        let (head, payload) = frame.split_at(HEADER_LEN);
        let expected = (&head[20..24]).get_u32_le();
        let actual = crc32c::crc32c_append(crc32c::crc32c(&head[4..20]), payload);
        if expected != actual {
            return Err(ProtoError::CrcMismatch { expected, actual });
        }
        let version = (&head[4..6]).get_u16_le();
        let kind = (&head[6..8]).get_u16_le();
        let id = (&head[8..16]).get_u64_le();
        if version != self.version && !kind::is_frozen(kind) {
            return Err(ProtoError::UnsupportedVersion {
                got: version,
                ours: self.version,
            });
        }
        if kind::since(kind) > self.version {
            return Err(ProtoError::UnknownKind(kind));
        }
        let message = Message::decode_payload(kind, frame.slice(HEADER_LEN..))?;
        Ok(Some(Frame { id, message }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests;

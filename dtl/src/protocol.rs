//! DTL wire protocol: one versioned message enum and one codec shared by client and server.
//!
//! # Frame
//!
//! ```text
//! offset size field
//!      0    4 magic          0x44544C31 ("DTL1"), little-endian
//!      4    2 version        protocol version of the sender
//!      6    2 kind           message kind (see `Message::kind`)
//!      8    4 payload length bytes following the header, at most MAX_FRAME_PAYLOAD
//!     12    4 CRC32C         over bytes 4..12 of the header (version, kind, length) + payload
//!     16    n payload        hand-written little-endian encoding, per kind
//! ```
//!
//! *Why the CRC also covers version/kind/length:* with a payload-only CRC a single flipped bit in
//! `kind` can turn a valid `Flush` into a valid `GetScoRange` (same payload layout), and the
//! receiver would act on it. Covering the header fields makes every single-byte corruption of a
//! frame detectable: magic → `BadMagic`, length → `FrameTooLarge`, CRC mismatch or (if the length
//! grew) a truncated frame at EOF, anything else → `CrcMismatch`.
//!
//! *Why a hand-written payload encoding:* the data path carries `cluster_size` bytes per entry
//! and the frame is CRC'd anyway; a fixed little-endian layout costs one memcpy per cluster, no
//! allocations per field, and decodes entries as zero-copy slices of the received frame.
//!
//! Payload primitives: integers little-endian; `string` = u16 length + UTF-8; `Option<u32>` =
//! u8 flag (0/1) + u32 (always present, 0 when absent); `entries` = u32 count + per entry
//! `location u64, lba u64, data_len u32, data`.
//!
//! # Versioning
//!
//! `Hello`, `HelloOk` and `VersionMismatch` are frozen: their kind and payload never change, and
//! the decoder accepts them whatever version the frame header carries, so a client and a server
//! of different versions can always tell each other so. Every other kind is only accepted with
//! the receiver's own version in the header (`UnsupportedVersion` otherwise). A connection must
//! start with `Hello`; the server answers `HelloOk` or `VersionMismatch` and closes.
//!
//! Version 2 added the volume's incarnation to `Register` and `Unregister` (a trailing u64). A server serves
//! clients of versions [`MIN_PROTOCOL_VERSION`]..=[`PROTOCOL_VERSION`]: it answers `HelloOk`
//! with the client's version and speaks it on that connection (a v1 `Register` is incarnation
//! 0, "not known"). A client told by `VersionMismatch` that the server speaks an older version
//! it still knows connects again in that version (`DtlClient::connect_with`), so during a
//! rolling upgrade nodes of both versions mirror to each other; what an old DTL cannot hold
//! (the incarnation) is simply not sent.
//!
//! # Limits
//!
//! Frames above [`MAX_FRAME_PAYLOAD`] (64 MiB) are refused by both encoder and decoder *from the
//! header alone*, before any payload is buffered, so a hostile peer cannot make us allocate. A
//! batch carries at most [`MAX_BATCH_ENTRIES`] entries.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::DtlError;

/// "DTL1".
pub const MAGIC: u32 = 0x4454_4C31;
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest version a server of this build still serves (a client of it, during a rolling
/// upgrade): version 1's `Register` has no incarnation.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted or produced (64 MiB).
pub const MAX_FRAME_PAYLOAD: usize = 64 << 20;
/// Largest number of entries in one `AddEntries` / `Entries` batch.
pub const MAX_BATCH_ENTRIES: usize = 4096;
/// Longest string (namespace, error message) on the wire.
pub const MAX_STRING_LEN: usize = u16::MAX as usize;

/// One mirrored cluster write: where the volume put it, which LBA it covers, and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Raw `ClusterLocation` (SCO number in the low 32 bits).
    pub location: u64,
    /// First LBA of the cluster in the volume.
    pub lba: u64,
    /// The cluster's data, exactly `cluster_size` bytes.
    pub data: Bytes,
}

impl Entry {
    /// SCO number encoded in the low 32 bits of the raw `ClusterLocation`.
    pub fn sco(&self) -> u32 {
        self.location as u32
    }
}

/// Reply to `GetScoRange`: oldest and newest SCO holding entries (both `None` when empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScoRange {
    pub oldest: Option<u32>,
    pub newest: Option<u32>,
}

/// Why a server refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    UnknownNamespace = 1,
    /// The request carried an owner tag older than the registered one (fencing).
    StaleOwnerTag = 2,
    Corrupt = 3,
    Io = 4,
    Invalid = 5,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => ErrorCode::UnknownNamespace,
            2 => ErrorCode::StaleOwnerTag,
            3 => ErrorCode::Corrupt,
            4 => ErrorCode::Io,
            5 => ErrorCode::Invalid,
            _ => return None,
        })
    }
}

/// Every message of the protocol, requests and replies alike.
///
/// Mutating requests carry the sender's owner tag so the server can fence a volume's previous
/// owner: `AddEntries`, `RemoveUpTo`, `Clear` and `Unregister` from an older tag than the
/// registered one are refused with [`ErrorCode::StaleOwnerTag`] (a stale owner trimming or
/// clearing would destroy the new owner's entries just as surely as appending would corrupt them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    // --- handshake (frozen across versions) ---
    Hello {
        version: u16,
    },
    HelloOk {
        version: u16,
    },
    VersionMismatch {
        server: u16,
        client: u16,
    },
    // --- requests ---
    /// Create the namespace, or take it over with a newer owner tag (entries are kept), or
    /// for a newer incarnation of the volume (its entries dropped; see `DtlStore::register`).
    /// `incarnation` 0: not known. (Version 2 added `incarnation`.)
    Register {
        namespace: String,
        cluster_size: u32,
        owner_tag: u64,
        incarnation: u64,
    },
    /// Append entries that all belong to SCO `sco`.
    AddEntries {
        namespace: String,
        owner_tag: u64,
        sco: u32,
        entries: Vec<Entry>,
    },
    Flush {
        namespace: String,
    },
    GetScoRange {
        namespace: String,
    },
    /// Stream the entries of SCOs `from_sco..=to_sco` as `Entries` batches ending in `EntriesEnd`
    /// (or in `Error` if the server fails part-way).
    GetEntries {
        namespace: String,
        from_sco: u32,
        to_sco: u32,
    },
    /// Trim: drop every entry of SCOs `<= sco`.
    RemoveUpTo {
        namespace: String,
        owner_tag: u64,
        sco: u32,
    },
    Clear {
        namespace: String,
        owner_tag: u64,
    },
    /// Forget the namespace and delete its entries, unless it holds a newer incarnation of the
    /// volume than `incarnation` (0: not known). (Version 2 added `incarnation`.)
    Unregister {
        namespace: String,
        owner_tag: u64,
        incarnation: u64,
    },
    // --- replies ---
    Ok,
    Error {
        code: ErrorCode,
        message: String,
    },
    ScoRange(ScoRange),
    Entries {
        sco: u32,
        entries: Vec<Entry>,
    },
    EntriesEnd,
}

mod kind {
    pub const HELLO: u16 = 1;
    pub const HELLO_OK: u16 = 2;
    pub const VERSION_MISMATCH: u16 = 3;
    pub const REGISTER: u16 = 10;
    pub const ADD_ENTRIES: u16 = 11;
    pub const FLUSH: u16 = 12;
    pub const GET_SCO_RANGE: u16 = 13;
    pub const GET_ENTRIES: u16 = 14;
    pub const REMOVE_UP_TO: u16 = 15;
    pub const CLEAR: u16 = 16;
    pub const UNREGISTER: u16 = 17;
    pub const OK: u16 = 100;
    pub const ERROR: u16 = 101;
    pub const SCO_RANGE: u16 = 102;
    pub const ENTRIES: u16 = 103;
    pub const ENTRIES_END: u16 = 104;

    /// Kinds whose layout never changes, accepted under any header version.
    pub fn is_frozen(kind: u16) -> bool {
        matches!(kind, HELLO | HELLO_OK | VERSION_MISMATCH)
    }
}

impl Message {
    /// Wire kind of this message.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello { .. } => kind::HELLO,
            Message::HelloOk { .. } => kind::HELLO_OK,
            Message::VersionMismatch { .. } => kind::VERSION_MISMATCH,
            Message::Register { .. } => kind::REGISTER,
            Message::AddEntries { .. } => kind::ADD_ENTRIES,
            Message::Flush { .. } => kind::FLUSH,
            Message::GetScoRange { .. } => kind::GET_SCO_RANGE,
            Message::GetEntries { .. } => kind::GET_ENTRIES,
            Message::RemoveUpTo { .. } => kind::REMOVE_UP_TO,
            Message::Clear { .. } => kind::CLEAR,
            Message::Unregister { .. } => kind::UNREGISTER,
            Message::Ok => kind::OK,
            Message::Error { .. } => kind::ERROR,
            Message::ScoRange(_) => kind::SCO_RANGE,
            Message::Entries { .. } => kind::ENTRIES,
            Message::EntriesEnd => kind::ENTRIES_END,
        }
    }

    /// Short name for logs and error messages (never includes data).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::HelloOk { .. } => "HelloOk",
            Message::VersionMismatch { .. } => "VersionMismatch",
            Message::Register { .. } => "Register",
            Message::AddEntries { .. } => "AddEntries",
            Message::Flush { .. } => "Flush",
            Message::GetScoRange { .. } => "GetScoRange",
            Message::GetEntries { .. } => "GetEntries",
            Message::RemoveUpTo { .. } => "RemoveUpTo",
            Message::Clear { .. } => "Clear",
            Message::Unregister { .. } => "Unregister",
            Message::Ok => "Ok",
            Message::Error { .. } => "Error",
            Message::ScoRange(_) => "ScoRange",
            Message::Entries { .. } => "Entries",
            Message::EntriesEnd => "EntriesEnd",
        }
    }

    fn encode_payload(&self, version: u16, out: &mut BytesMut) -> Result<(), DtlError> {
        match self {
            Message::Hello { version } | Message::HelloOk { version } => out.put_u16_le(*version),
            Message::VersionMismatch { server, client } => {
                out.put_u16_le(*server);
                out.put_u16_le(*client);
            }
            Message::Register {
                namespace,
                cluster_size,
                owner_tag,
                incarnation,
            } => {
                put_string(out, namespace)?;
                out.put_u32_le(*cluster_size);
                out.put_u64_le(*owner_tag);
                if version >= 2 {
                    out.put_u64_le(*incarnation);
                }
            }
            Message::AddEntries {
                namespace,
                owner_tag,
                sco,
                entries,
            } => {
                put_string(out, namespace)?;
                out.put_u64_le(*owner_tag);
                out.put_u32_le(*sco);
                put_entries(out, entries)?;
            }
            Message::Flush { namespace } | Message::GetScoRange { namespace } => {
                put_string(out, namespace)?;
            }
            Message::GetEntries {
                namespace,
                from_sco,
                to_sco,
            } => {
                put_string(out, namespace)?;
                out.put_u32_le(*from_sco);
                out.put_u32_le(*to_sco);
            }
            Message::RemoveUpTo {
                namespace,
                owner_tag,
                sco,
            } => {
                put_string(out, namespace)?;
                out.put_u64_le(*owner_tag);
                out.put_u32_le(*sco);
            }
            Message::Clear {
                namespace,
                owner_tag,
            } => {
                put_string(out, namespace)?;
                out.put_u64_le(*owner_tag);
            }
            Message::Unregister {
                namespace,
                owner_tag,
                incarnation,
            } => {
                put_string(out, namespace)?;
                out.put_u64_le(*owner_tag);
                if version >= 2 {
                    out.put_u64_le(*incarnation);
                }
            }
            Message::Ok | Message::EntriesEnd => {}
            Message::Error { code, message } => {
                out.put_u16_le(*code as u16);
                put_string(out, message)?;
            }
            Message::ScoRange(range) => {
                put_opt_u32(out, range.oldest);
                put_opt_u32(out, range.newest);
            }
            Message::Entries { sco, entries } => {
                out.put_u32_le(*sco);
                put_entries(out, entries)?;
            }
        }
        Ok(())
    }

    fn decode_payload(kind: u16, version: u16, payload: Bytes) -> Result<Message, DtlError> {
        let mut r = Reader(payload);
        let msg = match kind {
            kind::HELLO => Message::Hello { version: r.u16()? },
            kind::HELLO_OK => Message::HelloOk { version: r.u16()? },
            kind::VERSION_MISMATCH => Message::VersionMismatch {
                server: r.u16()?,
                client: r.u16()?,
            },
            kind::REGISTER => Message::Register {
                namespace: r.string()?,
                cluster_size: r.u32()?,
                owner_tag: r.u64()?,
                incarnation: if version >= 2 { r.u64()? } else { 0 },
            },
            kind::ADD_ENTRIES => Message::AddEntries {
                namespace: r.string()?,
                owner_tag: r.u64()?,
                sco: r.u32()?,
                entries: r.entries()?,
            },
            kind::FLUSH => Message::Flush {
                namespace: r.string()?,
            },
            kind::GET_SCO_RANGE => Message::GetScoRange {
                namespace: r.string()?,
            },
            kind::GET_ENTRIES => Message::GetEntries {
                namespace: r.string()?,
                from_sco: r.u32()?,
                to_sco: r.u32()?,
            },
            kind::REMOVE_UP_TO => Message::RemoveUpTo {
                namespace: r.string()?,
                owner_tag: r.u64()?,
                sco: r.u32()?,
            },
            kind::CLEAR => Message::Clear {
                namespace: r.string()?,
                owner_tag: r.u64()?,
            },
            kind::UNREGISTER => Message::Unregister {
                namespace: r.string()?,
                owner_tag: r.u64()?,
                incarnation: if version >= 2 { r.u64()? } else { 0 },
            },
            kind::OK => Message::Ok,
            kind::ERROR => {
                let raw = r.u16()?;
                let code = ErrorCode::from_u16(raw)
                    .ok_or_else(|| DtlError::Malformed(format!("unknown error code {raw}")))?;
                Message::Error {
                    code,
                    message: r.string()?,
                }
            }
            kind::SCO_RANGE => Message::ScoRange(ScoRange {
                oldest: r.opt_u32()?,
                newest: r.opt_u32()?,
            }),
            kind::ENTRIES => Message::Entries {
                sco: r.u32()?,
                entries: r.entries()?,
            },
            kind::ENTRIES_END => Message::EntriesEnd,
            other => return Err(DtlError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

fn put_string(out: &mut BytesMut, s: &str) -> Result<(), DtlError> {
    if s.len() > MAX_STRING_LEN {
        return Err(DtlError::Invalid(format!(
            "string of {} bytes exceeds {MAX_STRING_LEN}",
            s.len()
        )));
    }
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
    Ok(())
}

fn put_opt_u32(out: &mut BytesMut, v: Option<u32>) {
    out.put_u8(u8::from(v.is_some()));
    out.put_u32_le(v.unwrap_or(0));
}

fn put_entries(out: &mut BytesMut, entries: &[Entry]) -> Result<(), DtlError> {
    if entries.len() > MAX_BATCH_ENTRIES {
        return Err(DtlError::TooManyEntries {
            count: entries.len(),
            max: MAX_BATCH_ENTRIES,
        });
    }
    let bytes: usize = entries.iter().map(|e| 20 + e.data.len()).sum();
    if bytes > MAX_FRAME_PAYLOAD {
        return Err(DtlError::FrameTooLarge {
            len: bytes,
            max: MAX_FRAME_PAYLOAD,
        });
    }
    out.reserve(4 + bytes);
    out.put_u32_le(entries.len() as u32);
    for e in entries {
        out.put_u64_le(e.location);
        out.put_u64_le(e.lba);
        out.put_u32_le(e.data.len() as u32);
        out.put_slice(&e.data);
    }
    Ok(())
}

/// Bounds-checked little-endian reader over a payload; running short is `Truncated`.
struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize) -> Result<(), DtlError> {
        if self.0.remaining() < n {
            Err(DtlError::Truncated("payload"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DtlError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DtlError> {
        self.need(2)?;
        Ok(self.0.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, DtlError> {
        self.need(4)?;
        Ok(self.0.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, DtlError> {
        self.need(8)?;
        Ok(self.0.get_u64_le())
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, DtlError> {
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    fn string(&mut self) -> Result<String, DtlError> {
        let len = self.u16()? as usize;
        let raw = self.bytes(len)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| DtlError::Malformed("string is not UTF-8".into()))
    }
    fn opt_u32(&mut self) -> Result<Option<u32>, DtlError> {
        let flag = self.u8()?;
        let v = self.u32()?;
        match flag {
            0 if v == 0 => Ok(None),
            1 => Ok(Some(v)),
            _ => Err(DtlError::Malformed(format!(
                "bad option encoding {flag}/{v}"
            ))),
        }
    }
    fn entries(&mut self) -> Result<Vec<Entry>, DtlError> {
        let count = self.u32()? as usize;
        if count > MAX_BATCH_ENTRIES {
            return Err(DtlError::TooManyEntries {
                count,
                max: MAX_BATCH_ENTRIES,
            });
        }
        // Each entry needs at least 20 bytes: don't trust `count` for the allocation.
        self.need(count.saturating_mul(20))?;
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let location = self.u64()?;
            let lba = self.u64()?;
            let len = self.u32()? as usize;
            let data = self.bytes(len)?;
            entries.push(Entry {
                location,
                lba,
                data,
            });
        }
        Ok(entries)
    }
    fn finish(self) -> Result<(), DtlError> {
        if self.0.has_remaining() {
            Err(DtlError::Malformed(format!(
                "{} trailing bytes after the message",
                self.0.remaining()
            )))
        } else {
            Ok(())
        }
    }
}

/// Frame codec for [`Message`], used by both client and server.
#[derive(Clone, Debug)]
pub struct DtlCodec {
    version: u16,
}

impl Default for DtlCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl DtlCodec {
    /// A codec speaking [`PROTOCOL_VERSION`].
    pub fn new() -> Self {
        Self {
            version: PROTOCOL_VERSION,
        }
    }

    /// A codec speaking another version (for compatibility tests and future migrations).
    pub fn with_version(version: u16) -> Self {
        Self { version }
    }

    pub fn version(&self) -> u16 {
        self.version
    }

    /// Speak `version` from now on (a server, once a client's `Hello` named it).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }
}

fn frame_crc(header: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[4..12]), payload)
}

impl Encoder<Message> for DtlCodec {
    type Error = DtlError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), DtlError> {
        self.encode(&msg, dst)
    }
}

impl Encoder<&Message> for DtlCodec {
    type Error = DtlError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), DtlError> {
        let start = dst.len();
        dst.reserve(HEADER_LEN);
        dst.put_bytes(0, HEADER_LEN);
        if let Err(e) = msg.encode_payload(self.version, dst) {
            dst.truncate(start);
            return Err(e);
        }
        let len = dst.len() - start - HEADER_LEN;
        if len > MAX_FRAME_PAYLOAD {
            dst.truncate(start);
            return Err(DtlError::FrameTooLarge {
                len,
                max: MAX_FRAME_PAYLOAD,
            });
        }
        let (head, payload) = dst[start..].split_at_mut(HEADER_LEN);
        head[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        head[4..6].copy_from_slice(&self.version.to_le_bytes());
        head[6..8].copy_from_slice(&msg.kind().to_le_bytes());
        head[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = frame_crc(head, payload);
        head[12..16].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }
}

impl Decoder for DtlCodec {
    type Item = Message;
    type Error = DtlError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, DtlError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let magic = (&src[0..4]).get_u32_le();
        if magic != MAGIC {
            return Err(DtlError::BadMagic(magic));
        }
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = (&src[8..12]).get_u32_le() as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(DtlError::FrameTooLarge {
                len,
                max: MAX_FRAME_PAYLOAD,
            });
        }
        if src.len() < HEADER_LEN + len {
            vstor_net::reserve_frame(src, HEADER_LEN + len);
            return Ok(None);
        }
        // The frame is complete: consume it whatever happens next, so the buffer stays aligned
        // on frame boundaries.
        let frame = src.split_to(HEADER_LEN + len).freeze();
        let (head, payload) = frame.split_at(HEADER_LEN);
        let expected = (&head[12..16]).get_u32_le();
        let actual = frame_crc(head, payload);
        if expected != actual {
            return Err(DtlError::CrcMismatch { expected, actual });
        }
        let version = (&head[4..6]).get_u16_le();
        let kind = (&head[6..8]).get_u16_le();
        if version != self.version && !kind::is_frozen(kind) {
            return Err(DtlError::UnsupportedVersion {
                got: version,
                ours: self.version,
            });
        }
        Message::decode_payload(kind, version, frame.slice(HEADER_LEN..)).map(Some)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, DtlError> {
        match self.decode(buf)? {
            Some(msg) => Ok(Some(msg)),
            None if buf.is_empty() => Ok(None),
            None => Err(DtlError::Truncated("frame: connection closed mid-frame")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(msg: &Message) -> BytesMut {
        let mut buf = BytesMut::new();
        DtlCodec::new().encode(msg, &mut buf).unwrap();
        buf
    }

    fn decode_all(buf: &mut BytesMut) -> Result<Option<Message>, DtlError> {
        DtlCodec::new().decode_eof(buf)
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(location, lba, data)| Entry {
                location,
                lba,
                data: Bytes::from(data),
            })
    }

    fn arb_entries() -> impl Strategy<Value = Vec<Entry>> {
        proptest::collection::vec(arb_entry(), 0..8)
    }

    fn arb_code() -> impl Strategy<Value = ErrorCode> {
        (1u16..=5).prop_map(|c| ErrorCode::from_u16(c).unwrap())
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let ns = "[a-zA-Z0-9._-]{0,40}";
        prop_oneof![
            any::<u16>().prop_map(|version| Message::Hello { version }),
            any::<u16>().prop_map(|version| Message::HelloOk { version }),
            (any::<u16>(), any::<u16>())
                .prop_map(|(server, client)| Message::VersionMismatch { server, client }),
            (ns, any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
                |(namespace, cluster_size, owner_tag, incarnation)| Message::Register {
                    namespace,
                    cluster_size,
                    owner_tag,
                    incarnation,
                }
            ),
            (ns, any::<u64>(), any::<u32>(), arb_entries()).prop_map(
                |(namespace, owner_tag, sco, entries)| Message::AddEntries {
                    namespace,
                    owner_tag,
                    sco,
                    entries
                }
            ),
            ns.prop_map(|namespace| Message::Flush { namespace }),
            ns.prop_map(|namespace| Message::GetScoRange { namespace }),
            (ns, any::<u32>(), any::<u32>()).prop_map(|(namespace, from_sco, to_sco)| {
                Message::GetEntries {
                    namespace,
                    from_sco,
                    to_sco,
                }
            }),
            (ns, any::<u64>(), any::<u32>()).prop_map(|(namespace, owner_tag, sco)| {
                Message::RemoveUpTo {
                    namespace,
                    owner_tag,
                    sco,
                }
            }),
            (ns, any::<u64>()).prop_map(|(namespace, owner_tag)| Message::Clear {
                namespace,
                owner_tag
            }),
            (ns, any::<u64>(), any::<u64>()).prop_map(|(namespace, owner_tag, incarnation)| {
                Message::Unregister {
                    namespace,
                    owner_tag,
                    incarnation,
                }
            }),
            Just(Message::Ok),
            (arb_code(), ".{0,60}").prop_map(|(code, message)| Message::Error { code, message }),
            (
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>())
            )
                .prop_map(|(oldest, newest)| Message::ScoRange(ScoRange { oldest, newest })),
            (any::<u32>(), arb_entries())
                .prop_map(|(sco, entries)| Message::Entries { sco, entries }),
            Just(Message::EntriesEnd),
        ]
    }

    proptest! {
            #[test]
            fn round_trip(msg in arb_message()) {
                let mut buf = encode(&msg);
                let decoded = decode_all(&mut buf).unwrap().unwrap();
                prop_assert_eq!(&decoded, &msg);
                prop_assert!(buf.is_empty());
            }

            #[test]
            fn round_trip_byte_by_byte_and_back_to_back(a in arb_message(), b in arb_message()) {
                let mut wire = encode(&a);
                wire.extend_from_slice(&encode(&b));
                let mut codec = DtlCodec::new();
                let mut buf = BytesMut::new();
                let mut out = Vec::new();
                for byte in wire.iter() {
                    buf.put_u8(*byte);
                    while let Some(m) = codec.decode(&mut buf).unwrap() {
                        out.push(m);
                    }
                }
                prop_assert_eq!(out, vec![a, b]);
            }

            #[test]
            fn any_flipped_byte_is_detected(msg in arb_message(), pos in any::<proptest::sample::Index>(), mask in 1u8..=255) {
                let mut buf = encode(&msg);
                let i = pos.index(buf.len());
                buf[i] ^= mask;
                let res = decode_all(&mut buf);
                prop_assert!(
                    matches!(
                        res,
                        Err(DtlError::BadMagic(_) | DtlError::CrcMismatch { .. } |
    DtlError::FrameTooLarge { .. } | DtlError::Truncated(_))
                    ),
                    "flip at {} gave {:?}", i, res
                );
            }
        }

    #[test]
    fn every_kind_is_distinct() {
        let msgs = [
            Message::Hello { version: 1 },
            Message::HelloOk { version: 1 },
            Message::VersionMismatch {
                server: 1,
                client: 2,
            },
            Message::Register {
                namespace: String::new(),
                cluster_size: 0,
                owner_tag: 0,
                incarnation: 0,
            },
            Message::AddEntries {
                namespace: String::new(),
                owner_tag: 0,
                sco: 0,
                entries: vec![],
            },
            Message::Flush {
                namespace: String::new(),
            },
            Message::GetScoRange {
                namespace: String::new(),
            },
            Message::GetEntries {
                namespace: String::new(),
                from_sco: 0,
                to_sco: 0,
            },
            Message::RemoveUpTo {
                namespace: String::new(),
                owner_tag: 0,
                sco: 0,
            },
            Message::Clear {
                namespace: String::new(),
                owner_tag: 0,
            },
            Message::Unregister {
                namespace: String::new(),
                owner_tag: 0,
                incarnation: 0,
            },
            Message::Ok,
            Message::Error {
                code: ErrorCode::Io,
                message: String::new(),
            },
            Message::ScoRange(ScoRange::default()),
            Message::Entries {
                sco: 0,
                entries: vec![],
            },
            Message::EntriesEnd,
        ];
        let mut kinds: Vec<u16> = msgs.iter().map(Message::kind).collect();
        kinds.sort();
        kinds.dedup();
        assert_eq!(kinds.len(), msgs.len());
    }

    /// Builds a frame with a valid CRC around an arbitrary payload.
    fn raw_frame(version: u16, kind: u16, payload: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u32_le(MAGIC);
        buf.put_u16_le(version);
        buf.put_u16_le(kind);
        buf.put_u32_le(payload.len() as u32);
        let crc = frame_crc(&buf[..], payload);
        buf.put_u32_le(crc);
        buf.put_slice(payload);
        buf
    }

    #[test]
    fn unknown_kind_is_reported() {
        let mut buf = raw_frame(PROTOCOL_VERSION, 999, &[]);
        assert!(matches!(
            decode_all(&mut buf),
            Err(DtlError::UnknownKind(999))
        ));
    }

    #[test]
    fn truncated_payload_with_valid_crc_is_reported() {
        // Register needs a string, u32 and u64; give it only a string.
        let mut buf = raw_frame(PROTOCOL_VERSION, kind::REGISTER, &[2, 0, b'a', b'b']);
        assert!(matches!(
            decode_all(&mut buf),
            Err(DtlError::Truncated("payload"))
        ));
        // Entry count promising more than the payload holds.
        let mut buf = raw_frame(PROTOCOL_VERSION, kind::ENTRIES, &[1, 0, 0, 0, 9, 0, 0, 0]);
        assert!(matches!(decode_all(&mut buf), Err(DtlError::Truncated(_))));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut buf = raw_frame(PROTOCOL_VERSION, kind::OK, &[0]);
        assert!(matches!(decode_all(&mut buf), Err(DtlError::Malformed(_))));
    }

    #[test]
    fn truncated_frame_at_eof_is_reported() {
        let full = encode(&Message::Flush {
            namespace: "vol".into(),
        });
        for cut in 1..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            let mut codec = DtlCodec::new();
            assert!(codec.decode(&mut buf).unwrap().is_none(), "cut {cut}");
            assert!(
                matches!(codec.decode_eof(&mut buf), Err(DtlError::Truncated(_))),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn oversized_frames_are_rejected_from_the_header() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(MAGIC);
        buf.put_u16_le(PROTOCOL_VERSION);
        buf.put_u16_le(kind::ADD_ENTRIES);
        buf.put_u32_le((MAX_FRAME_PAYLOAD + 1) as u32);
        buf.put_u32_le(0);
        // No payload at all: the decoder must refuse without waiting for 64 MiB.
        assert!(matches!(
            DtlCodec::new().decode(&mut buf),
            Err(DtlError::FrameTooLarge { .. })
        ));

        // The encoder refuses to build one too.
        let big = Bytes::from(vec![0u8; 1 << 20]);
        let entries: Vec<Entry> = (0..65)
            .map(|i| Entry {
                location: i,
                lba: i,
                data: big.clone(),
            })
            .collect();
        let mut out = BytesMut::new();
        let msg = Message::Entries { sco: 1, entries };
        assert!(matches!(
            DtlCodec::new().encode(&msg, &mut out),
            Err(DtlError::FrameTooLarge { .. })
        ));
        assert!(out.is_empty(), "a refused message leaves nothing behind");
    }

    #[test]
    fn a_header_claiming_4_gib_is_refused_without_allocating() {
        let mut buf = BytesMut::with_capacity(HEADER_LEN);
        buf.put_u32_le(MAGIC);
        buf.put_u16_le(PROTOCOL_VERSION);
        buf.put_u16_le(kind::ADD_ENTRIES);
        buf.put_u32_le(u32::MAX);
        buf.put_u32_le(0);
        let capacity = buf.capacity();
        let err = DtlCodec::new().decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, DtlError::FrameTooLarge { len, max }
                if len == u32::MAX as usize && max == MAX_FRAME_PAYLOAD),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "frame payload of 4294967295 bytes exceeds the limit of 67108864 bytes"
        );
        assert_eq!(
            buf.capacity(),
            capacity,
            "nothing reserved for the claimed payload"
        );
    }

    #[test]
    fn too_many_entries_rejected_both_ways() {
        let entries: Vec<Entry> = (0..MAX_BATCH_ENTRIES as u64 + 1)
            .map(|i| Entry {
                location: i,
                lba: i,
                data: Bytes::new(),
            })
            .collect();
        let msg = Message::Entries { sco: 1, entries };
        let mut out = BytesMut::new();
        assert!(matches!(
            DtlCodec::new().encode(&msg, &mut out),
            Err(DtlError::TooManyEntries { .. })
        ));
        let mut payload = vec![1, 0, 0, 0];
        payload.extend_from_slice(&((MAX_BATCH_ENTRIES as u32 + 1).to_le_bytes()));
        let mut buf = raw_frame(PROTOCOL_VERSION, kind::ENTRIES, &payload);
        assert!(matches!(
            decode_all(&mut buf),
            Err(DtlError::TooManyEntries { .. })
        ));
    }

    #[test]
    fn version_rules() {
        // A v3 Hello is understood by a v2 decoder (frozen kind)...
        let mut buf = BytesMut::new();
        DtlCodec::with_version(3)
            .encode(&Message::Hello { version: 3 }, &mut buf)
            .unwrap();
        assert_eq!(
            decode_all(&mut buf).unwrap(),
            Some(Message::Hello { version: 3 })
        );
        // ...but any other v3 message is refused.
        let mut buf = BytesMut::new();
        DtlCodec::with_version(3)
            .encode(&Message::Ok, &mut buf)
            .unwrap();
        assert!(matches!(
            decode_all(&mut buf),
            Err(DtlError::UnsupportedVersion { got: 3, ours: 2 })
        ));
    }

    #[test]
    fn a_version_1_register_has_no_incarnation_and_a_version_2_one_round_trips_it() {
        let register = |incarnation| Message::Register {
            namespace: "vol".into(),
            cluster_size: 4096,
            owner_tag: 3,
            incarnation,
        };
        // What a v1 client sends: a server speaking v1 on that connection reads incarnation 0.
        let mut v1 = DtlCodec::with_version(1);
        let mut buf = BytesMut::new();
        v1.encode(&register(77), &mut buf).unwrap();
        assert_eq!(
            buf.len(),
            HEADER_LEN + 2 + 3 + 4 + 8,
            "v1 payload: no incarnation"
        );
        let mut server = DtlCodec::new();
        assert!(matches!(
            server.decode(&mut buf.clone()),
            Err(DtlError::UnsupportedVersion { got: 1, ours: 2 })
        ));
        server.set_version(1);
        assert_eq!(server.decode(&mut buf).unwrap(), Some(register(0)));
        // v2 carries it.
        let mut buf = encode(&register(77));
        assert_eq!(buf.len(), HEADER_LEN + 2 + 3 + 4 + 8 + 8);
        assert_eq!(decode_all(&mut buf).unwrap(), Some(register(77)));
    }

    #[test]
    fn decoded_entry_data_is_exact() {
        let data = Bytes::from((0..4096u32).map(|i| i as u8).collect::<Vec<_>>());
        let msg = Message::AddEntries {
            namespace: "v".into(),
            owner_tag: 7,
            sco: 3,
            entries: vec![Entry {
                location: 3 | (5 << 32),
                lba: 40,
                data: data.clone(),
            }],
        };
        let mut buf = encode(&msg);
        assert_eq!(buf.len(), HEADER_LEN + 2 + 1 + 8 + 4 + 4 + 20 + 4096);
        match decode_all(&mut buf).unwrap().unwrap() {
            Message::AddEntries { entries, .. } => {
                assert_eq!(entries[0].data, data);
                assert_eq!(entries[0].sco(), 3);
            }
            other => panic!("{other:?}"),
        }
    }
}

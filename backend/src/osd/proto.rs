//! The OSD protocol: what the EC tier's client (the `ec` store on a node) and an OSD daemon say
//! to each other. One versioned message enum and one codec, shared by client and server.
//!
//! # Frame
//!
//! ```text
//! offset size field
//!      0    4 magic          0x5653_4F31 ("VSO1"), little-endian
//!      4    2 version        protocol version of the sender
//!      6    2 kind           message kind (see `Message::kind`)
//!      8    8 id             request id chosen by the client; a reply carries its request's id
//!     16    4 payload length bytes after the header, at most MAX_FRAME_PAYLOAD
//!     20    4 CRC32C         over bytes 4..20 of the header + payload
//!     24    n payload        little-endian fields per kind; a data block comes last
//! ```
//!
//! The CRC covers the header fields for the same reason as the DTL's and the edge's: a flipped
//! `kind` or `id` must not turn into another valid request or complete the wrong one. Requests
//! are pipelined and answered in completion order, matched by id.
//!
//! A fragment travels whole on `Put` (the file as `ec::fragment` encodes it, header and CRC
//! table included), so the OSD stores exactly the bytes the client checksummed. `GetRange` asks
//! for a byte range of a fragment's *data*; the OSD checks the 4 KiB block CRCs that cover it
//! and answers `Corrupt` rather than bytes it cannot vouch for.
//!
//! # Fencing
//!
//! Mutating requests carry the namespace owner's tag. An OSD remembers the highest tag it has
//! seen per namespace (`SetTag`, or any accepted request) and refuses older ones with
//! [`ErrorCode::Fenced`].
//!
//! # Versioning
//!
//! `Hello`, `Welcome` and `VersionMismatch` are frozen across versions; every other kind is
//! accepted only with the receiver's version, so a peer of another version learns it at the
//! handshake (`VersionMismatch`), never as an unknown kind in the middle of a connection.
//!
//! - Version 1: `Put`, `GetRange`, `GetFile`, `Head`, `Delete`, `List`, `SetTag`, `Stat`.
//! - Version 2 (repair, issue 12): `Verify` checks a whole fragment's CRCs on the OSD and
//!   answers `Done` or `Error { Corrupt }`, so a scrub does not ship fragments over the wire;
//!   `DeleteFragment` removes one fragment (one version, one index) under the owner tag, for
//!   moves (after the new copy is durable), misplaced copies and stale versions; each `Heads`
//!   entry ends with the local parity group it covers (count byte, then indices).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// "VSO1".
pub const MAGIC: u32 = 0x5653_4F31;
pub const PROTOCOL_VERSION: u16 = 2;
pub const HEADER_LEN: usize = 24;
/// A fragment of a 64 MiB object under k = 1 plus fields.
pub const MAX_FRAME_PAYLOAD: usize = (64 << 20) + (1 << 20);
pub const MAX_STRING_LEN: usize = 4096;
/// Most entries in one `Listing`.
pub const MAX_LIST: usize = 10_000;

/// Why a frame could not be encoded or decoded. Any of these ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(
        "bad frame magic {magic:#010x} ({hint})",
        magic = .0,
        hint = vstor_net::bad_magic_hint(*.0, "not an OSD protocol peer?")
    )]
    BadMagic(u32),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame CRC mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    CrcMismatch { expected: u32, actual: u32 },
    #[error("peer speaks OSD protocol version {got}, this build speaks {ours}")]
    UnsupportedVersion { got: u16, ours: u16 },
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Why an OSD refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// No such fragment (or namespace).
    NotFound = 1,
    /// The fragment's bytes failed their CRC: treat the fragment as lost for this range.
    Corrupt = 2,
    /// The request's owner tag is older than one the OSD has seen for the namespace.
    Fenced = 3,
    /// The OSD is full (or draining): it takes no new fragments.
    Full = 4,
    /// The request is not valid (bad name, range outside the fragment, bad fragment file).
    Invalid = 5,
    /// The OSD's disk failed the request.
    Io = 6,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => ErrorCode::NotFound,
            2 => ErrorCode::Corrupt,
            3 => ErrorCode::Fenced,
            4 => ErrorCode::Full,
            5 => ErrorCode::Invalid,
            6 => ErrorCode::Io,
            _ => return None,
        })
    }
}

/// A fragment an OSD holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FragmentId {
    pub name: String,
    pub version: u64,
    pub index: u8,
    /// Bytes of the fragment file.
    pub size: u64,
}

/// What a fragment's header says, as `Head` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadEntry {
    pub version: u64,
    pub index: u8,
    pub k: u8,
    pub m: u8,
    pub codec: u16,
    pub fragment_size: u32,
    pub object_size: u64,
    pub data_len: u64,
    /// For a local parity, the indices it covers; empty otherwise.
    pub group: Vec<u8>,
}

/// An OSD's usage, as `Stat` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Usage {
    pub capacity: u64,
    pub used: u64,
    pub fragments: u64,
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
        osd_id: u64,
        domain: String,
    },
    VersionMismatch {
        server: u16,
        client: u16,
    },
    // --- requests ---
    /// Store a whole fragment file (replacing the same name, version and index).
    Put {
        namespace: String,
        name: String,
        version: u64,
        index: u8,
        tag: u64,
        file: Bytes,
    },
    /// `len` bytes of a fragment's data at `offset`, CRC-checked by the OSD.
    GetRange {
        namespace: String,
        name: String,
        version: u64,
        index: u8,
        offset: u64,
        len: u32,
    },
    /// The whole fragment file (repair, rebalancing, inspection).
    GetFile {
        namespace: String,
        name: String,
        version: u64,
        index: u8,
    },
    /// The headers of the fragments of `name` this OSD holds (every version and index).
    Head {
        namespace: String,
        name: String,
    },
    /// Delete every fragment of every version of `name` this OSD holds in `namespace`.
    Delete {
        namespace: String,
        name: String,
        tag: u64,
    },
    /// Fragments of `namespace` whose name sorts after `after`, at most `limit`.
    List {
        namespace: String,
        after: String,
        limit: u32,
    },
    /// Raise the namespace's fencing tag (a new owner claimed it).
    SetTag {
        namespace: String,
        tag: u64,
    },
    Stat,
    /// Check every CRC of one fragment file on the OSD (scrub); `Done` or `Error { Corrupt }`.
    Verify {
        namespace: String,
        name: String,
        version: u64,
        index: u8,
    },
    /// Delete one fragment (deleting one that is absent is fine).
    DeleteFragment {
        namespace: String,
        name: String,
        version: u64,
        index: u8,
        tag: u64,
    },
    // --- replies ---
    Done,
    Data {
        data: Bytes,
    },
    Listing {
        fragments: Vec<FragmentId>,
    },
    Heads {
        heads: Vec<HeadEntry>,
    },
    Usage(Usage),
    Error {
        code: ErrorCode,
        message: String,
    },
}

mod kind {
    pub const HELLO: u16 = 1;
    pub const WELCOME: u16 = 2;
    pub const VERSION_MISMATCH: u16 = 3;
    pub const PUT: u16 = 10;
    pub const GET_RANGE: u16 = 11;
    pub const GET_FILE: u16 = 12;
    pub const DELETE: u16 = 13;
    pub const LIST: u16 = 14;
    pub const SET_TAG: u16 = 15;
    pub const STAT: u16 = 16;
    pub const HEAD: u16 = 17;
    pub const VERIFY: u16 = 18;
    pub const DELETE_FRAGMENT: u16 = 19;
    pub const DONE: u16 = 100;
    pub const DATA: u16 = 101;
    pub const LISTING: u16 = 102;
    pub const USAGE: u16 = 103;
    pub const ERROR: u16 = 104;
    pub const HEADS: u16 = 105;

    pub fn is_frozen(kind: u16) -> bool {
        matches!(kind, HELLO | WELCOME | VERSION_MISMATCH)
    }
}

impl Message {
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello { .. } => kind::HELLO,
            Message::Welcome { .. } => kind::WELCOME,
            Message::VersionMismatch { .. } => kind::VERSION_MISMATCH,
            Message::Put { .. } => kind::PUT,
            Message::GetRange { .. } => kind::GET_RANGE,
            Message::GetFile { .. } => kind::GET_FILE,
            Message::Delete { .. } => kind::DELETE,
            Message::List { .. } => kind::LIST,
            Message::SetTag { .. } => kind::SET_TAG,
            Message::Stat => kind::STAT,
            Message::Head { .. } => kind::HEAD,
            Message::Verify { .. } => kind::VERIFY,
            Message::DeleteFragment { .. } => kind::DELETE_FRAGMENT,
            Message::Heads { .. } => kind::HEADS,
            Message::Done => kind::DONE,
            Message::Data { .. } => kind::DATA,
            Message::Listing { .. } => kind::LISTING,
            Message::Usage(_) => kind::USAGE,
            Message::Error { .. } => kind::ERROR,
        }
    }

    /// Short name for logs (never includes data).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::VersionMismatch { .. } => "VersionMismatch",
            Message::Put { .. } => "Put",
            Message::GetRange { .. } => "GetRange",
            Message::GetFile { .. } => "GetFile",
            Message::Delete { .. } => "Delete",
            Message::List { .. } => "List",
            Message::SetTag { .. } => "SetTag",
            Message::Stat => "Stat",
            Message::Head { .. } => "Head",
            Message::Verify { .. } => "Verify",
            Message::DeleteFragment { .. } => "DeleteFragment",
            Message::Heads { .. } => "Heads",
            Message::Done => "Done",
            Message::Data { .. } => "Data",
            Message::Listing { .. } => "Listing",
            Message::Usage(_) => "Usage",
            Message::Error { .. } => "Error",
        }
    }

    fn encode_payload(&self, out: &mut BytesMut) -> Result<(), ProtoError> {
        match self {
            Message::Hello { version, client } => {
                out.put_u16_le(*version);
                put_string(out, client)?;
            }
            Message::Welcome {
                version,
                osd_id,
                domain,
            } => {
                out.put_u16_le(*version);
                out.put_u64_le(*osd_id);
                put_string(out, domain)?;
            }
            Message::VersionMismatch { server, client } => {
                out.put_u16_le(*server);
                out.put_u16_le(*client);
            }
            Message::Put {
                namespace,
                name,
                version,
                index,
                tag,
                file,
            } => {
                put_string(out, namespace)?;
                put_string(out, name)?;
                out.put_u64_le(*version);
                out.put_u8(*index);
                out.put_u64_le(*tag);
                out.put_slice(file);
            }
            Message::GetRange {
                namespace,
                name,
                version,
                index,
                offset,
                len,
            } => {
                put_string(out, namespace)?;
                put_string(out, name)?;
                out.put_u64_le(*version);
                out.put_u8(*index);
                out.put_u64_le(*offset);
                out.put_u32_le(*len);
            }
            Message::GetFile {
                namespace,
                name,
                version,
                index,
            }
            | Message::Verify {
                namespace,
                name,
                version,
                index,
            } => {
                put_string(out, namespace)?;
                put_string(out, name)?;
                out.put_u64_le(*version);
                out.put_u8(*index);
            }
            Message::DeleteFragment {
                namespace,
                name,
                version,
                index,
                tag,
            } => {
                put_string(out, namespace)?;
                put_string(out, name)?;
                out.put_u64_le(*version);
                out.put_u8(*index);
                out.put_u64_le(*tag);
            }
            Message::Delete {
                namespace,
                name,
                tag,
            } => {
                put_string(out, namespace)?;
                put_string(out, name)?;
                out.put_u64_le(*tag);
            }
            Message::Head { namespace, name } => {
                put_string(out, namespace)?;
                put_string(out, name)?;
            }
            Message::Heads { heads } => {
                if heads.len() > MAX_LIST {
                    return Err(ProtoError::Malformed(format!(
                        "{} heads exceed {MAX_LIST}",
                        heads.len()
                    )));
                }
                out.put_u32_le(heads.len() as u32);
                for h in heads {
                    out.put_u64_le(h.version);
                    out.put_u8(h.index);
                    out.put_u8(h.k);
                    out.put_u8(h.m);
                    out.put_u16_le(h.codec);
                    out.put_u32_le(h.fragment_size);
                    out.put_u64_le(h.object_size);
                    out.put_u64_le(h.data_len);
                    if h.group.len() > 255 {
                        return Err(ProtoError::Malformed("local group over 255".into()));
                    }
                    out.put_u8(h.group.len() as u8);
                    out.put_slice(&h.group);
                }
            }
            Message::List {
                namespace,
                after,
                limit,
            } => {
                put_string(out, namespace)?;
                put_string(out, after)?;
                out.put_u32_le(*limit);
            }
            Message::SetTag { namespace, tag } => {
                put_string(out, namespace)?;
                out.put_u64_le(*tag);
            }
            Message::Stat | Message::Done => {}
            Message::Data { data } => out.put_slice(data),
            Message::Listing { fragments } => {
                if fragments.len() > MAX_LIST {
                    return Err(ProtoError::Malformed(format!(
                        "{} entries exceed {MAX_LIST}",
                        fragments.len()
                    )));
                }
                out.put_u32_le(fragments.len() as u32);
                for f in fragments {
                    put_string(out, &f.name)?;
                    out.put_u64_le(f.version);
                    out.put_u8(f.index);
                    out.put_u64_le(f.size);
                }
            }
            Message::Usage(usage) => {
                out.put_u64_le(usage.capacity);
                out.put_u64_le(usage.used);
                out.put_u64_le(usage.fragments);
            }
            Message::Error { code, message } => {
                out.put_u16_le(*code as u16);
                let mut end = message.len().min(MAX_STRING_LEN);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                put_string(out, &message[..end])?;
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
                osd_id: r.u64()?,
                domain: r.string()?,
            },
            kind::VERSION_MISMATCH => Message::VersionMismatch {
                server: r.u16()?,
                client: r.u16()?,
            },
            kind::PUT => Message::Put {
                namespace: r.string()?,
                name: r.string()?,
                version: r.u64()?,
                index: r.u8()?,
                tag: r.u64()?,
                file: r.rest(),
            },
            kind::GET_RANGE => Message::GetRange {
                namespace: r.string()?,
                name: r.string()?,
                version: r.u64()?,
                index: r.u8()?,
                offset: r.u64()?,
                len: r.u32()?,
            },
            kind::GET_FILE => Message::GetFile {
                namespace: r.string()?,
                name: r.string()?,
                version: r.u64()?,
                index: r.u8()?,
            },
            kind::VERIFY => Message::Verify {
                namespace: r.string()?,
                name: r.string()?,
                version: r.u64()?,
                index: r.u8()?,
            },
            kind::DELETE_FRAGMENT => Message::DeleteFragment {
                namespace: r.string()?,
                name: r.string()?,
                version: r.u64()?,
                index: r.u8()?,
                tag: r.u64()?,
            },
            kind::DELETE => Message::Delete {
                namespace: r.string()?,
                name: r.string()?,
                tag: r.u64()?,
            },
            kind::LIST => Message::List {
                namespace: r.string()?,
                after: r.string()?,
                limit: r.u32()?,
            },
            kind::SET_TAG => Message::SetTag {
                namespace: r.string()?,
                tag: r.u64()?,
            },
            kind::STAT => Message::Stat,
            kind::HEAD => Message::Head {
                namespace: r.string()?,
                name: r.string()?,
            },
            kind::HEADS => {
                let count = r.u32()? as usize;
                if count > MAX_LIST {
                    return Err(ProtoError::Malformed(format!(
                        "{count} heads exceed {MAX_LIST}"
                    )));
                }
                r.need(count.saturating_mul(34))?;
                let mut heads = Vec::with_capacity(count);
                for _ in 0..count {
                    heads.push(HeadEntry {
                        version: r.u64()?,
                        index: r.u8()?,
                        k: r.u8()?,
                        m: r.u8()?,
                        codec: r.u16()?,
                        fragment_size: r.u32()?,
                        object_size: r.u64()?,
                        data_len: r.u64()?,
                        group: {
                            let len = usize::from(r.u8()?);
                            r.need(len)?;
                            r.0.split_to(len).to_vec()
                        },
                    });
                }
                Message::Heads { heads }
            }
            kind::DONE => Message::Done,
            kind::DATA => Message::Data { data: r.rest() },
            kind::LISTING => {
                let count = r.u32()? as usize;
                if count > MAX_LIST {
                    return Err(ProtoError::Malformed(format!(
                        "{count} entries exceed {MAX_LIST}"
                    )));
                }
                // At least 19 bytes per entry: don't trust `count` for the allocation.
                r.need(count.saturating_mul(19))?;
                let mut fragments = Vec::with_capacity(count);
                for _ in 0..count {
                    fragments.push(FragmentId {
                        name: r.string()?,
                        version: r.u64()?,
                        index: r.u8()?,
                        size: r.u64()?,
                    });
                }
                Message::Listing { fragments }
            }
            kind::USAGE => Message::Usage(Usage {
                capacity: r.u64()?,
                used: r.u64()?,
                fragments: r.u64()?,
            }),
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
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.0)
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
pub struct OsdCodec {
    version: u16,
}

impl Default for OsdCodec {
    fn default() -> Self {
        Self {
            version: PROTOCOL_VERSION,
        }
    }
}

impl OsdCodec {
    pub fn with_version(version: u16) -> Self {
        Self { version }
    }

    /// Append `frame` to `dst`.
    pub fn encode(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
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
        let message = Message::decode_payload(kind, frame.slice(HEADER_LEN..))?;
        Ok(Some(Frame { id, message }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = Message> {
        let s = "[a-z0-9._/-]{0,30}";
        let data = proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        prop_oneof![
            (any::<u16>(), s).prop_map(|(version, client)| Message::Hello { version, client }),
            (any::<u16>(), any::<u64>(), s).prop_map(|(version, osd_id, domain)| {
                Message::Welcome {
                    version,
                    osd_id,
                    domain,
                }
            }),
            (s, s, any::<u64>(), any::<u8>(), any::<u64>(), data.clone()).prop_map(
                |(namespace, name, version, index, tag, file)| Message::Put {
                    namespace,
                    name,
                    version,
                    index,
                    tag,
                    file
                }
            ),
            (s, s, any::<u64>(), any::<u8>(), any::<u64>(), any::<u32>()).prop_map(
                |(namespace, name, version, index, offset, len)| Message::GetRange {
                    namespace,
                    name,
                    version,
                    index,
                    offset,
                    len
                }
            ),
            (s, s, any::<u64>()).prop_map(|(namespace, name, tag)| Message::Delete {
                namespace,
                name,
                tag
            }),
            (s, s, any::<u32>()).prop_map(|(namespace, after, limit)| Message::List {
                namespace,
                after,
                limit
            }),
            Just(Message::Stat),
            (s, s, any::<u64>(), any::<u8>()).prop_map(|(namespace, name, version, index)| {
                Message::Verify {
                    namespace,
                    name,
                    version,
                    index,
                }
            }),
            (s, s, any::<u64>(), any::<u8>(), any::<u64>()).prop_map(
                |(namespace, name, version, index, tag)| Message::DeleteFragment {
                    namespace,
                    name,
                    version,
                    index,
                    tag
                }
            ),
            (s, s).prop_map(|(namespace, name)| Message::Head { namespace, name }),
            proptest::collection::vec(
                (
                    any::<(u64, u8, u8, u8, u16, u32, u64, u64)>(),
                    proptest::collection::vec(any::<u8>(), 0..5)
                ),
                0..4
            )
            .prop_map(|v| Message::Heads {
                heads: v
                    .into_iter()
                    .map(
                        |(
                            (version, index, k, m, codec, fragment_size, object_size, data_len),
                            group,
                        )| {
                            HeadEntry {
                                version,
                                index,
                                k,
                                m,
                                codec,
                                fragment_size,
                                object_size,
                                data_len,
                                group,
                            }
                        }
                    )
                    .collect()
            }),
            Just(Message::Done),
            data.prop_map(|data| Message::Data { data }),
            proptest::collection::vec((s, any::<u64>(), any::<u8>(), any::<u64>()), 0..5).prop_map(
                |v| Message::Listing {
                    fragments: v
                        .into_iter()
                        .map(|(name, version, index, size)| FragmentId {
                            name,
                            version,
                            index,
                            size
                        })
                        .collect()
                }
            ),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(capacity, used, fragments)| {
                Message::Usage(Usage {
                    capacity,
                    used,
                    fragments,
                })
            }),
            ((1u16..=6), "[ -~]{0,40}").prop_map(|(code, message)| Message::Error {
                code: ErrorCode::from_u16(code).unwrap(),
                message
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(id in any::<u64>(), message in arb_message()) {
            let frame = Frame { id, message };
            let mut buf = BytesMut::new();
            OsdCodec::default().encode(&frame, &mut buf).unwrap();
            prop_assert_eq!(OsdCodec::default().decode(&mut buf).unwrap(), Some(frame));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn every_corrupted_byte_is_detected(
            message in arb_message(),
            pos in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut buf = BytesMut::new();
            OsdCodec::default().encode(&Frame { id: 3, message }, &mut buf).unwrap();
            let at = pos.index(buf.len());
            buf[at] ^= flip;
            // Either an error, or (a grown length) a frame that never completes.
            match OsdCodec::default().decode(&mut buf) {
                Err(_) | Ok(None) => {}
                Ok(Some(frame)) => prop_assert!(false, "corruption at {} decoded as {:?}", at, frame),
            }
        }
    }

    #[test]
    fn hostile_headers_are_refused_before_buffering() {
        // A `Stat` frame as `codec` encodes it.
        let stat = |codec: OsdCodec| {
            let mut buf = BytesMut::new();
            codec
                .encode(
                    &Frame {
                        id: 1,
                        message: Message::Stat,
                    },
                    &mut buf,
                )
                .unwrap();
            buf
        };
        // A header claiming 4 GiB: refused with nothing reserved for it.
        let mut buf = stat(OsdCodec::default());
        buf[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        buf.truncate(HEADER_LEN);
        let capacity = buf.capacity();
        let err = OsdCodec::default().decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, ProtoError::FrameTooLarge { len, max }
                if len == u32::MAX as usize && max == MAX_FRAME_PAYLOAD),
            "{err:?}"
        );
        assert_eq!(
            buf.capacity(),
            capacity,
            "nothing reserved for the claimed payload"
        );

        let mut buf = stat(OsdCodec::default());
        buf[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            OsdCodec::default().decode(&mut buf),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        let mut buf = stat(OsdCodec::with_version(1));
        assert!(matches!(
            OsdCodec::default().decode(&mut buf),
            Err(ProtoError::UnsupportedVersion { got: 1, ours: 2 })
        ));
    }
}

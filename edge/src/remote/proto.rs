//! The edge protocol: what an edge process (a hypervisor host's frontends) and the node that owns a
//! volume say to each other. One versioned message enum and one codec, shared by the client
//! (`remote::client`) and the server (`remote::server`).
//!
//! # Frame
//!
//! ```text
//! offset size field
//!      0    4 magic          0x56534531 ("VSE1"), little-endian
//!      4    2 version        protocol version of the sender
//!      6    2 kind           message kind (see `Message::kind`)
//!      8    8 id             request id chosen by the client; a reply carries its request's id
//!     16    4 payload length bytes following the header, at most MAX_FRAME_PAYLOAD
//!     20    4 CRC32C         over bytes 4..20 of the header (version, kind, id, length) + payload
//!     24    n payload        little-endian fields per kind; a data block comes last
//! ```
//!
//! *Why the CRC covers the header fields:* a flipped bit in `kind` could otherwise turn a `Trim`
//! into a `WriteZeroes` with the same payload layout, and a flipped `id` would complete the wrong
//! request. With the header covered every corruption of a frame is detected: magic → `BadMagic`,
//! length → `FrameTooLarge` or a CRC mismatch, anything else → `CrcMismatch`. The connection is
//! then closed; the client reconnects and resubmits what was in flight (see `remote::resubmit`).
//!
//! *Why the id sits in the header:* requests are pipelined (many in flight per connection) and
//! replies come back in completion order, so every frame is matched by id. Handshake frames use 0.
//!
//! *Zero copy:* a `Write`'s or `Data`'s block is the last field of its payload, so the decoder
//! hands it out as a slice of the received buffer ([`Bytes`], no copy), and
//! [`EdgeCodec::encode_parts`] gives the header and fields apart from the block so a sender can
//! write both with one vectored write instead of copying the block into a frame.
//!
//! # Owner tags
//!
//! Every request after the handshake carries the owner tag the client last saw for the volume
//! (from the registry, confirmed by `Welcome`). The server refuses a request whose tag differs from
//! the tag it holds the volume under with [`ErrorCode::StaleTag`], and a volume it does not own
//! with [`ErrorCode::NotOwner`]: an edge that missed a failover can never write through a node
//! that is no longer the owner, nor past a newer owner.
//!
//! # Versioning
//!
//! `Hello`, `Welcome` and `VersionMismatch` are frozen: their kind and layout never change and the
//! decoder accepts them whatever version the header carries, so peers of different versions can
//! always say so. Every other kind is accepted only with the version of the connection.
//!
//! The version of a connection is chosen by the server from the client's `Hello`: a server
//! speaks every version from [`MIN_PROTOCOL_VERSION`] to [`PROTOCOL_VERSION`]; a `Hello` in that
//! range is answered with a `Welcome` carrying the client's version, and every later frame of the
//! connection, both ways, is of that version (its header and its set of kinds). A `Hello` outside
//! the range gets `VersionMismatch`. A client does not fall back: an edge newer than the node
//! that owns its volume is refused (upgrade nodes before edges), because a version-1 connection
//! cannot carry what a newer edge must enforce (the allow list below).
//!
//! | version | adds |
//! |---------|------|
//! | 1       | handshake, requests, replies |
//! | 2       | `Access` (kind 20): the volume's NBD allow list, server → client |
//! | 3       | [`ErrorCode::Released`]: a refusal that also says the volume was handed over cleanly |
//!
//! # Released (version 3)
//!
//! An `Error` with code [`ErrorCode::Released`] answers a request the server did not run because
//! it handed the volume to another node, and promises that everything it acknowledged on the
//! connection is on the backend. A stopping server also sends it once with id 0, unasked, before
//! it closes the connection (a clean stop hands every volume over), so an edge with nothing in
//! flight learns it too. A client keeps the promise for that connection only.
//!
//! # Access (version 2)
//!
//! The volume's NBD allow list (`vstor volume create|update --allow-subject/--allow-net`), which
//! an edge enforces on its own NBD clients exactly as the node does (see
//! `vstor_volumedriver::access` for the rule). Invariants:
//!
//! * Sent by the server only, with id 0, never as a reply to a request: once right after
//!   `Welcome` (the handshake of a version-2 connection is `Hello` → `Welcome` + `Access`, and a
//!   client holds no connection until it has both), and again whenever the list changes on the
//!   node while the connection is open. The server looks for changes every
//!   [`ACCESS_POLL`]; every reconnect carries the current list anyway.
//! * Each `Access` replaces the whole list (no deltas): losing or reordering one cannot leave an
//!   edge with a list the node never had. Empty lists mean everyone (as on the node).
//! * Payload: `u16` subject count, each a string (`u16` length + UTF-8, at most
//!   [`MAX_ACCESS_SUBJECT_LEN`] bytes); `u16` network count, each `u8` family (4 or 6), the
//!   address (4 or 16 bytes) and `u8` prefix length (at most 32 or 128). At most
//!   [`MAX_ACCESS_ENTRIES`] of each. Anything else is `Malformed` and closes the connection
//!   (the edge reconnects and gets the list again).
//!
//! # Limits
//!
//! Frames above [`MAX_FRAME_PAYLOAD`] are refused from the header alone, before any payload is
//! buffered. A block status reply carries at most [`MAX_EXTENTS`] extents.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ipnet::IpNet;
use tokio_util::codec::{Decoder, Encoder};

use crate::target::Extent;

/// "VSE1".
pub const MAGIC: u32 = 0x5653_4531;
/// The newest protocol version this build speaks (what a client sends in `Hello`).
pub const PROTOCOL_VERSION: u16 = 3;
/// The oldest version a server still serves (edges of older builds keep working; they get no
/// `Access` and so enforce no allow list).
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The first version with `Access`.
pub const ACCESS_VERSION: u16 = 2;
/// The first version with [`ErrorCode::Released`] (older connections get `NotOwner` instead).
pub const RELEASED_VERSION: u16 = 3;
/// How often a server looks for a change of a served volume's allow list to push.
pub const ACCESS_POLL: Duration = Duration::from_secs(1);
/// Most subjects and most networks in one `Access` (the volume config's own limit).
pub const MAX_ACCESS_ENTRIES: usize = 256;
/// Longest subject in an `Access` (X.509's upper bound for a common name).
pub const MAX_ACCESS_SUBJECT_LEN: usize = 64;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 24;
/// Largest payload accepted or produced: a 32 MiB block (NBD's largest request) plus fields.
pub const MAX_FRAME_PAYLOAD: usize = (32 << 20) + 4096;
/// Longest string (volume name, client name, error message) on the wire.
pub const MAX_STRING_LEN: usize = 4096;
/// Most extents in one `Extents` reply.
pub const MAX_EXTENTS: usize = 65_536;

/// Why a frame could not be encoded or decoded. Any of these ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(
        "bad frame magic {magic:#010x} ({hint})",
        magic = .0,
        hint = vstor_net::bad_magic_hint(*.0, "not an edge protocol peer?")
    )]
    BadMagic(u32),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame CRC mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    CrcMismatch { expected: u32, actual: u32 },
    #[error("peer speaks edge protocol version {got}, this build speaks {ours}")]
    UnsupportedVersion { got: u16, ours: u16 },
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Why a server refused a request. The client maps these onto [`crate::TargetError`] or, for
/// `StaleTag`, `NotOwner`, `Fenced`, `Shutdown` and `Released`, onto "find the owner again and
/// resubmit".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request reaches beyond the end of the volume.
    OutOfRange = 1,
    /// A mutating request on a read-only volume (snapshot, template).
    ReadOnly = 2,
    /// The volume is stopping or was removed on this node.
    Shutdown = 3,
    /// The engine failed the request (halted volume, backend error, ...).
    Io = 4,
    /// The request carried another owner tag than the one this node holds the volume under.
    StaleTag = 5,
    /// This node does not serve the volume (it moved, or was never here).
    NotOwner = 6,
    /// This node fenced the volume (it may have lost its cluster lease): another node may own it.
    Fenced = 7,
    /// The request is not valid (unaligned, zero length, a request before `Hello`, ...).
    Invalid = 8,
    /// Version 3. The request did not run: this node handed the volume to another node
    /// (`vstor volume move`), and the hand-off was clean: everything it acknowledged on this
    /// connection is on the backend, where the next owner reads it. So, unlike after a bare
    /// `NotOwner`, nothing acknowledged can be lost even without an in-sync DTL
    /// (`remote::resubmit`).
    Released = 9,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => ErrorCode::OutOfRange,
            2 => ErrorCode::ReadOnly,
            3 => ErrorCode::Shutdown,
            4 => ErrorCode::Io,
            5 => ErrorCode::StaleTag,
            6 => ErrorCode::NotOwner,
            7 => ErrorCode::Fenced,
            8 => ErrorCode::Invalid,
            9 => ErrorCode::Released,
            _ => return None,
        })
    }

    /// The owner may have changed: the client should look it up again and resubmit.
    pub fn means_owner_changed(self) -> bool {
        matches!(
            self,
            ErrorCode::StaleTag
                | ErrorCode::NotOwner
                | ErrorCode::Fenced
                | ErrorCode::Shutdown
                | ErrorCode::Released
        )
    }
}

/// A volume's NBD allow list as the edge protocol carries it (`Message::Access`): client
/// certificate subject CNs and source networks. Both empty: everyone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    pub subjects: Vec<String>,
    pub networks: Vec<IpNet>,
}

/// Every message of the protocol, requests and replies alike. The request id travels in the frame
/// header, next to the message (see [`EdgeCodec`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    // --- handshake (frozen across versions) ---
    /// First frame of a connection: which volume, under which owner tag, and who asks.
    Hello {
        version: u16,
        volume: String,
        tag: u64,
        /// The edge's name, for the server's logs and metrics.
        client: String,
    },
    /// The server holds `volume` under `tag` and serves it on this connection.
    Welcome {
        version: u16,
        size: u64,
        read_only: bool,
        tag: u64,
        dtl_in_sync: bool,
    },
    /// The server does not speak the client's version; the connection closes.
    VersionMismatch {
        server: u16,
        client: u16,
    },
    // --- notices (server → client, id 0; version 2) ---
    /// The volume's allow list, after `Welcome` and whenever it changes (see the module docs).
    Access(AllowList),
    // --- requests ---
    Read {
        tag: u64,
        offset: u64,
        len: u32,
    },
    Write {
        tag: u64,
        offset: u64,
        fua: bool,
        data: Bytes,
    },
    Flush {
        tag: u64,
    },
    Trim {
        tag: u64,
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        tag: u64,
        offset: u64,
        len: u64,
        allocate: bool,
        fua: bool,
    },
    BlockStatus {
        tag: u64,
        offset: u64,
        len: u64,
    },
    // --- replies ---
    /// A write, flush, trim or write-zeroes completed (durably, if it was a flush or FUA).
    /// `dtl_in_sync`: after it, every acknowledged write not on the backend is on the DTL.
    Done {
        dtl_in_sync: bool,
    },
    /// A read's bytes.
    Data {
        dtl_in_sync: bool,
        data: Bytes,
    },
    /// A block status answer.
    Extents {
        extents: Vec<Extent>,
    },
    /// The request (or, with id 0, the handshake) failed.
    Error {
        code: ErrorCode,
        message: String,
    },
}

mod kind {
    pub const HELLO: u16 = 1;
    pub const WELCOME: u16 = 2;
    pub const VERSION_MISMATCH: u16 = 3;
    pub const ACCESS: u16 = 20;
    pub const READ: u16 = 10;
    pub const WRITE: u16 = 11;
    pub const FLUSH: u16 = 12;
    pub const TRIM: u16 = 13;
    pub const WRITE_ZEROES: u16 = 14;
    pub const BLOCK_STATUS: u16 = 15;
    pub const DONE: u16 = 100;
    pub const DATA: u16 = 101;
    pub const EXTENTS: u16 = 102;
    pub const ERROR: u16 = 103;

    /// Kinds whose layout never changes, accepted under any header version.
    pub fn is_frozen(kind: u16) -> bool {
        matches!(kind, HELLO | WELCOME | VERSION_MISMATCH)
    }
}

impl Message {
    /// Wire kind of this message.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello { .. } => kind::HELLO,
            Message::Welcome { .. } => kind::WELCOME,
            Message::VersionMismatch { .. } => kind::VERSION_MISMATCH,
            Message::Access(_) => kind::ACCESS,
            Message::Read { .. } => kind::READ,
            Message::Write { .. } => kind::WRITE,
            Message::Flush { .. } => kind::FLUSH,
            Message::Trim { .. } => kind::TRIM,
            Message::WriteZeroes { .. } => kind::WRITE_ZEROES,
            Message::BlockStatus { .. } => kind::BLOCK_STATUS,
            Message::Done { .. } => kind::DONE,
            Message::Data { .. } => kind::DATA,
            Message::Extents { .. } => kind::EXTENTS,
            Message::Error { .. } => kind::ERROR,
        }
    }

    /// Short name for logs and error messages (never includes data).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::VersionMismatch { .. } => "VersionMismatch",
            Message::Access(_) => "Access",
            Message::Read { .. } => "Read",
            Message::Write { .. } => "Write",
            Message::Flush { .. } => "Flush",
            Message::Trim { .. } => "Trim",
            Message::WriteZeroes { .. } => "WriteZeroes",
            Message::BlockStatus { .. } => "BlockStatus",
            Message::Done { .. } => "Done",
            Message::Data { .. } => "Data",
            Message::Extents { .. } => "Extents",
            Message::Error { .. } => "Error",
        }
    }

    /// The owner tag a request carries (`None` for handshake frames and replies).
    pub fn tag(&self) -> Option<u64> {
        match self {
            Message::Read { tag, .. }
            | Message::Write { tag, .. }
            | Message::Flush { tag }
            | Message::Trim { tag, .. }
            | Message::WriteZeroes { tag, .. }
            | Message::BlockStatus { tag, .. } => Some(*tag),
            _ => None,
        }
    }

    /// The data block sent after the fixed fields (`Write`, `Data`), if any.
    fn block(&self) -> Option<&Bytes> {
        match self {
            Message::Write { data, .. } | Message::Data { data, .. } => Some(data),
            _ => None,
        }
    }

    /// Encode every field except the trailing data block.
    fn encode_fields(&self, out: &mut BytesMut) -> Result<(), ProtoError> {
        match self {
            Message::Hello {
                version,
                volume,
                tag,
                client,
            } => {
                out.put_u16_le(*version);
                put_string(out, volume)?;
                out.put_u64_le(*tag);
                put_string(out, client)?;
            }
            Message::Welcome {
                version,
                size,
                read_only,
                tag,
                dtl_in_sync,
            } => {
                out.put_u16_le(*version);
                out.put_u64_le(*size);
                out.put_u8(u8::from(*read_only));
                out.put_u64_le(*tag);
                out.put_u8(u8::from(*dtl_in_sync));
            }
            Message::VersionMismatch { server, client } => {
                out.put_u16_le(*server);
                out.put_u16_le(*client);
            }
            Message::Access(list) => put_access(out, list)?,
            Message::Read { tag, offset, len } => {
                out.put_u64_le(*tag);
                out.put_u64_le(*offset);
                out.put_u32_le(*len);
            }
            Message::Write {
                tag, offset, fua, ..
            } => {
                out.put_u64_le(*tag);
                out.put_u64_le(*offset);
                out.put_u8(u8::from(*fua));
            }
            Message::Flush { tag } => out.put_u64_le(*tag),
            Message::Trim { tag, offset, len } | Message::BlockStatus { tag, offset, len } => {
                out.put_u64_le(*tag);
                out.put_u64_le(*offset);
                out.put_u64_le(*len);
            }
            Message::WriteZeroes {
                tag,
                offset,
                len,
                allocate,
                fua,
            } => {
                out.put_u64_le(*tag);
                out.put_u64_le(*offset);
                out.put_u64_le(*len);
                out.put_u8(u8::from(*allocate));
                out.put_u8(u8::from(*fua));
            }
            Message::Done { dtl_in_sync } | Message::Data { dtl_in_sync, .. } => {
                out.put_u8(u8::from(*dtl_in_sync));
            }
            Message::Extents { extents } => {
                if extents.len() > MAX_EXTENTS {
                    return Err(ProtoError::Malformed(format!(
                        "{} extents exceed the limit of {MAX_EXTENTS}",
                        extents.len()
                    )));
                }
                out.put_u32_le(extents.len() as u32);
                for e in extents {
                    out.put_u64_le(e.length);
                    out.put_u8(u8::from(e.hole));
                }
            }
            Message::Error { code, message } => {
                out.put_u16_le(*code as u16);
                // Error texts are for humans: cut rather than fail on a long one.
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
                volume: r.string()?,
                tag: r.u64()?,
                client: r.string()?,
            },
            kind::WELCOME => Message::Welcome {
                version: r.u16()?,
                size: r.u64()?,
                read_only: r.bool()?,
                tag: r.u64()?,
                dtl_in_sync: r.bool()?,
            },
            kind::VERSION_MISMATCH => Message::VersionMismatch {
                server: r.u16()?,
                client: r.u16()?,
            },
            kind::ACCESS => Message::Access(r.access()?),
            kind::READ => Message::Read {
                tag: r.u64()?,
                offset: r.u64()?,
                len: r.u32()?,
            },
            kind::WRITE => Message::Write {
                tag: r.u64()?,
                offset: r.u64()?,
                fua: r.bool()?,
                data: r.rest(),
            },
            kind::FLUSH => Message::Flush { tag: r.u64()? },
            kind::TRIM => Message::Trim {
                tag: r.u64()?,
                offset: r.u64()?,
                len: r.u64()?,
            },
            kind::WRITE_ZEROES => Message::WriteZeroes {
                tag: r.u64()?,
                offset: r.u64()?,
                len: r.u64()?,
                allocate: r.bool()?,
                fua: r.bool()?,
            },
            kind::BLOCK_STATUS => Message::BlockStatus {
                tag: r.u64()?,
                offset: r.u64()?,
                len: r.u64()?,
            },
            kind::DONE => Message::Done {
                dtl_in_sync: r.bool()?,
            },
            kind::DATA => Message::Data {
                dtl_in_sync: r.bool()?,
                data: r.rest(),
            },
            kind::EXTENTS => {
                let count = r.u32()? as usize;
                if count > MAX_EXTENTS {
                    return Err(ProtoError::Malformed(format!(
                        "{count} extents exceed the limit of {MAX_EXTENTS}"
                    )));
                }
                // 9 bytes per extent: don't trust `count` for the allocation.
                r.need(count.saturating_mul(9))?;
                let mut extents = Vec::with_capacity(count);
                for _ in 0..count {
                    extents.push(Extent {
                        length: r.u64()?,
                        hole: r.bool()?,
                    });
                }
                Message::Extents { extents }
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

fn put_access(out: &mut BytesMut, list: &AllowList) -> Result<(), ProtoError> {
    if list.subjects.len() > MAX_ACCESS_ENTRIES || list.networks.len() > MAX_ACCESS_ENTRIES {
        return Err(ProtoError::Malformed(format!(
            "allow list of {} subjects and {} networks exceeds {MAX_ACCESS_ENTRIES} of each",
            list.subjects.len(),
            list.networks.len()
        )));
    }
    out.put_u16_le(list.subjects.len() as u16);
    for subject in &list.subjects {
        if subject.len() > MAX_ACCESS_SUBJECT_LEN {
            return Err(ProtoError::Malformed(format!(
                "subject of {} bytes exceeds {MAX_ACCESS_SUBJECT_LEN}",
                subject.len()
            )));
        }
        put_string(out, subject)?;
    }
    out.put_u16_le(list.networks.len() as u16);
    for net in &list.networks {
        match net.addr() {
            IpAddr::V4(a) => {
                out.put_u8(4);
                out.put_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.put_u8(6);
                out.put_slice(&a.octets());
            }
        }
        out.put_u8(net.prefix_len());
    }
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
    fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(ProtoError::Malformed(format!("bad boolean {other}"))),
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
    fn string(&mut self) -> Result<String, ProtoError> {
        let len = self.u16()? as usize;
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
    fn count(&mut self, what: &str) -> Result<usize, ProtoError> {
        let n = self.u16()? as usize;
        if n > MAX_ACCESS_ENTRIES {
            return Err(ProtoError::Malformed(format!(
                "{n} {what} exceed the limit of {MAX_ACCESS_ENTRIES}"
            )));
        }
        Ok(n)
    }
    fn access(&mut self) -> Result<AllowList, ProtoError> {
        let n = self.count("subjects")?;
        let mut subjects = Vec::with_capacity(n);
        for _ in 0..n {
            let subject = self.string()?;
            if subject.len() > MAX_ACCESS_SUBJECT_LEN {
                return Err(ProtoError::Malformed(format!(
                    "subject of {} bytes exceeds {MAX_ACCESS_SUBJECT_LEN}",
                    subject.len()
                )));
            }
            subjects.push(subject);
        }
        let n = self.count("networks")?;
        let mut networks = Vec::with_capacity(n);
        for _ in 0..n {
            let addr = match self.u8()? {
                4 => {
                    self.need(4)?;
                    let mut octets = [0u8; 4];
                    self.0.copy_to_slice(&mut octets);
                    IpAddr::V4(Ipv4Addr::from(octets))
                }
                6 => {
                    self.need(16)?;
                    let mut octets = [0u8; 16];
                    self.0.copy_to_slice(&mut octets);
                    IpAddr::V6(Ipv6Addr::from(octets))
                }
                other => {
                    return Err(ProtoError::Malformed(format!(
                        "unknown address family {other}"
                    )))
                }
            };
            let prefix = self.u8()?;
            let net = IpNet::new(addr, prefix).map_err(|_| {
                ProtoError::Malformed(format!("prefix length {prefix} is too long for {addr}"))
            })?;
            networks.push(net);
        }
        Ok(AllowList { subjects, networks })
    }
    /// Everything left: the trailing data block, without a copy.
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

/// One frame: the message and the request id it belongs to (0 for the handshake).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub id: u64,
    pub message: Message,
}

impl Frame {
    pub fn new(id: u64, message: Message) -> Self {
        Self { id, message }
    }
}

/// Frame codec for [`Message`], used by both client and server.
#[derive(Clone, Debug)]
pub struct EdgeCodec {
    version: u16,
}

impl Default for EdgeCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl EdgeCodec {
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

    /// Encode `frame` as its header and fixed fields, appended to `dst`, and its data block
    /// (`Write`, `Data`) returned apart, so the caller can send both with one vectored write and
    /// never copy the block. The CRC in the header covers the block.
    pub fn encode_parts(
        &self,
        frame: &Frame,
        dst: &mut BytesMut,
    ) -> Result<Option<Bytes>, ProtoError> {
        let start = dst.len();
        dst.reserve(HEADER_LEN + 32);
        dst.put_bytes(0, HEADER_LEN);
        if let Err(e) = frame.message.encode_fields(dst) {
            dst.truncate(start);
            return Err(e);
        }
        let block = frame.message.block().filter(|b| !b.is_empty()).cloned();
        let fields = dst.len() - start - HEADER_LEN;
        let len = fields + block.as_ref().map_or(0, Bytes::len);
        if len > MAX_FRAME_PAYLOAD {
            dst.truncate(start);
            return Err(ProtoError::FrameTooLarge {
                len,
                max: MAX_FRAME_PAYLOAD,
            });
        }
        let (head, fields) = dst[start..].split_at_mut(HEADER_LEN);
        head[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        head[4..6].copy_from_slice(&self.version.to_le_bytes());
        head[6..8].copy_from_slice(&frame.message.kind().to_le_bytes());
        head[8..16].copy_from_slice(&frame.id.to_le_bytes());
        head[16..20].copy_from_slice(&(len as u32).to_le_bytes());
        let mut crc = crc32c::crc32c_append(crc32c::crc32c(&head[4..20]), fields);
        if let Some(block) = &block {
            crc = crc32c::crc32c_append(crc, block);
        }
        head[20..24].copy_from_slice(&crc.to_le_bytes());
        Ok(block)
    }
}

impl Encoder<Frame> for EdgeCodec {
    type Error = ProtoError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        self.encode(&frame, dst)
    }
}

impl Encoder<&Frame> for EdgeCodec {
    type Error = ProtoError;

    /// The whole frame into `dst` (the block copied in); see [`EdgeCodec::encode_parts`].
    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        if let Some(block) = self.encode_parts(frame, dst)? {
            dst.extend_from_slice(&block);
        }
        Ok(())
    }
}

impl Decoder for EdgeCodec {
    type Item = Frame;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
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
        // The frame is complete: consume it whatever happens next, so the buffer stays aligned
        // on frame boundaries.
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

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(ProtoError::Truncated("frame: connection closed mid-frame")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        EdgeCodec::new().encode(frame, &mut buf).unwrap();
        buf
    }

    fn arb_code() -> impl Strategy<Value = ErrorCode> {
        (1u16..=9).prop_map(|c| ErrorCode::from_u16(c).unwrap())
    }

    fn arb_data() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..600).prop_map(Bytes::from)
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| IpNet::new(IpAddr::from(a), p).unwrap()),
            (any::<[u8; 16]>(), 0u8..=128)
                .prop_map(|(a, p)| IpNet::new(IpAddr::from(a), p).unwrap()),
        ]
    }

    fn arb_access() -> impl Strategy<Value = AllowList> {
        (
            proptest::collection::vec("[ -~]{1,64}", 0..6),
            proptest::collection::vec(arb_net(), 0..6),
        )
            .prop_map(|(subjects, networks)| AllowList { subjects, networks })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let name = "[a-zA-Z0-9._@-]{0,40}";
        prop_oneof![
            arb_access().prop_map(Message::Access),
            (any::<u16>(), name, any::<u64>(), name).prop_map(|(version, volume, tag, client)| {
                Message::Hello {
                    version,
                    volume,
                    tag,
                    client,
                }
            }),
            (
                any::<u16>(),
                any::<u64>(),
                any::<bool>(),
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(|(version, size, read_only, tag, dtl_in_sync)| {
                    Message::Welcome {
                        version,
                        size,
                        read_only,
                        tag,
                        dtl_in_sync,
                    }
                }),
            (any::<u16>(), any::<u16>())
                .prop_map(|(server, client)| Message::VersionMismatch { server, client }),
            (any::<u64>(), any::<u64>(), any::<u32>())
                .prop_map(|(tag, offset, len)| Message::Read { tag, offset, len }),
            (any::<u64>(), any::<u64>(), any::<bool>(), arb_data()).prop_map(
                |(tag, offset, fua, data)| Message::Write {
                    tag,
                    offset,
                    fua,
                    data
                }
            ),
            any::<u64>().prop_map(|tag| Message::Flush { tag }),
            (any::<u64>(), any::<u64>(), any::<u64>())
                .prop_map(|(tag, offset, len)| Message::Trim { tag, offset, len }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(tag, offset, len, allocate, fua)| {
                    Message::WriteZeroes {
                        tag,
                        offset,
                        len,
                        allocate,
                        fua,
                    }
                }),
            (any::<u64>(), any::<u64>(), any::<u64>())
                .prop_map(|(tag, offset, len)| Message::BlockStatus { tag, offset, len }),
            any::<bool>().prop_map(|dtl_in_sync| Message::Done { dtl_in_sync }),
            (any::<bool>(), arb_data())
                .prop_map(|(dtl_in_sync, data)| Message::Data { dtl_in_sync, data }),
            proptest::collection::vec((any::<u64>(), any::<bool>()), 0..20).prop_map(|v| {
                Message::Extents {
                    extents: v
                        .into_iter()
                        .map(|(length, hole)| Extent { length, hole })
                        .collect(),
                }
            }),
            (arb_code(), "[ -~]{0,80}")
                .prop_map(|(code, message)| Message::Error { code, message }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(id in any::<u64>(), message in arb_message()) {
            let frame = Frame::new(id, message);
            let mut buf = encode(&frame);
            let decoded = EdgeCodec::new().decode_eof(&mut buf).unwrap();
            prop_assert_eq!(decoded, Some(frame));
            prop_assert!(buf.is_empty());
        }

        /// Any single flipped byte is detected: the decoder errors (never returns another frame).
        #[test]
        fn every_corrupted_byte_is_detected(
            id in any::<u64>(),
            message in arb_message(),
            pos in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let frame = Frame::new(id, message);
            let mut buf = encode(&frame);
            let at = pos.index(buf.len());
            buf[at] ^= flip;
            match EdgeCodec::new().decode_eof(&mut buf) {
                Err(_) => {}
                Ok(got) => prop_assert!(false, "corruption at {} decoded as {:?}", at, got),
            }
        }

        /// Frames split at any point decode once the rest arrives, in order.
        #[test]
        fn split_frames_decode_in_order(
            a in arb_message(),
            b in arb_message(),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut all = encode(&Frame::new(1, a.clone()));
            all.extend_from_slice(&encode(&Frame::new(2, b.clone())));
            let cut = cut.index(all.len());
            let mut codec = EdgeCodec::new();
            let mut buf = BytesMut::from(&all[..cut]);
            let mut out = Vec::new();
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
            buf.extend_from_slice(&all[cut..]);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
            prop_assert_eq!(out, vec![Frame::new(1, a), Frame::new(2, b)]);
        }
    }

    #[test]
    fn encode_parts_keeps_the_block_apart_and_covers_it_with_the_crc() {
        let data = Bytes::from(vec![7u8; 4096]);
        let frame = Frame::new(
            9,
            Message::Write {
                tag: 3,
                offset: 8192,
                fua: false,
                data: data.clone(),
            },
        );
        let mut head = BytesMut::new();
        let block = EdgeCodec::new().encode_parts(&frame, &mut head).unwrap();
        assert_eq!(block.as_ref(), Some(&data));
        assert!(
            head.len() < 64,
            "the block must not be copied into the head"
        );
        let mut whole = head.clone();
        whole.extend_from_slice(&data);
        assert_eq!(
            EdgeCodec::new().decode(&mut whole.clone()).unwrap(),
            Some(frame)
        );
        // A flipped bit in the block fails the CRC.
        let last = whole.len() - 1;
        whole[last] ^= 1;
        assert!(matches!(
            EdgeCodec::new().decode(&mut whole),
            Err(ProtoError::CrcMismatch { .. })
        ));
    }

    #[test]
    fn oversized_frame_is_refused_from_the_header_alone() {
        let mut buf = encode(&Frame::new(1, Message::Flush { tag: 1 }));
        buf[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        buf.truncate(HEADER_LEN);
        let capacity = buf.capacity();
        let err = EdgeCodec::new().decode(&mut buf).unwrap_err();
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
        assert!(matches!(
            EdgeCodec::new().decode(&mut buf),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn other_versions_only_pass_the_frozen_handshake() {
        let hello = Frame::new(
            0,
            Message::Hello {
                version: PROTOCOL_VERSION + 1,
                volume: "v".into(),
                tag: 1,
                client: "e".into(),
            },
        );
        let mut buf = BytesMut::new();
        EdgeCodec::with_version(PROTOCOL_VERSION + 1)
            .encode(&hello, &mut buf)
            .unwrap();
        assert_eq!(EdgeCodec::new().decode(&mut buf).unwrap(), Some(hello));
        let mut buf = BytesMut::new();
        EdgeCodec::with_version(PROTOCOL_VERSION + 1)
            .encode(&Frame::new(5, Message::Flush { tag: 1 }), &mut buf)
            .unwrap();
        assert!(matches!(
            EdgeCodec::new().decode(&mut buf),
            Err(ProtoError::UnsupportedVersion { got, ours })
                if got == PROTOCOL_VERSION + 1 && ours == PROTOCOL_VERSION
        ));
    }

    /// The frozen handshake frames are byte for byte what version 1 sent, so a version-1 edge
    /// and a version-2 node understand each other's `Hello` and `Welcome`.
    #[test]
    fn frozen_frames_keep_their_version_1_layout() {
        let welcome = Frame::new(
            0,
            Message::Welcome {
                version: 1,
                size: 0x0102_0304_0506_0708,
                read_only: true,
                tag: 9,
                dtl_in_sync: false,
            },
        );
        let mut buf = BytesMut::new();
        EdgeCodec::with_version(1)
            .encode(&welcome, &mut buf)
            .unwrap();
        let mut want = vec![1u8, 0];
        want.extend(0x0102_0304_0506_0708u64.to_le_bytes());
        want.push(1);
        want.extend(9u64.to_le_bytes());
        want.push(0);
        assert_eq!(&buf[6..8], &2u16.to_le_bytes(), "kind of Welcome");
        assert_eq!(&buf[HEADER_LEN..], &want[..]);
        assert_eq!(EdgeCodec::new().decode(&mut buf).unwrap(), Some(welcome));
    }

    fn access_frame(list: AllowList) -> BytesMut {
        encode(&Frame::new(0, Message::Access(list)))
    }

    /// Re-seal a hand-edited frame's CRC, so the decoder's field checks are what is tested.
    fn reseal(buf: &mut BytesMut) {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[4..20]), &buf[HEADER_LEN..]);
        buf[20..24].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn access_carries_both_families_and_its_layout_is_fixed() {
        let list = AllowList {
            subjects: vec!["alice".into()],
            networks: vec!["10.1.0.0/16".parse().unwrap(), "fd00::/64".parse().unwrap()],
        };
        let mut buf = access_frame(list.clone());
        let mut want = vec![1u8, 0, 5, 0];
        want.extend(b"alice");
        want.extend([2, 0, 4, 10, 1, 0, 0, 16, 6, 0xfd]);
        want.extend([0u8; 15]);
        want.push(64);
        assert_eq!(&buf[6..8], &20u16.to_le_bytes(), "kind of Access");
        assert_eq!(&buf[HEADER_LEN..], &want[..]);
        assert_eq!(
            EdgeCodec::new().decode(&mut buf).unwrap(),
            Some(Frame::new(0, Message::Access(list)))
        );
        // An empty list (everyone) is four bytes.
        let mut buf = access_frame(AllowList::default());
        assert_eq!(&buf[HEADER_LEN..], &[0u8, 0, 0, 0]);
        assert_eq!(
            EdgeCodec::new().decode(&mut buf).unwrap(),
            Some(Frame::new(0, Message::Access(AllowList::default())))
        );
    }

    #[test]
    fn access_with_bad_fields_is_malformed_even_with_a_good_crc() {
        let one_net = |net: &str| AllowList {
            subjects: vec![],
            networks: vec![net.parse().unwrap()],
        };
        // Prefix longer than the family allows.
        let mut buf = access_frame(one_net("10.0.0.0/8"));
        let last = buf.len() - 1;
        buf[last] = 33;
        reseal(&mut buf);
        assert!(matches!(
            EdgeCodec::new().decode(&mut buf),
            Err(ProtoError::Malformed(m)) if m.contains("prefix length 33")
        ));
        let mut buf = access_frame(one_net("fd00::/8"));
        let last = buf.len() - 1;
        buf[last] = 129;
        reseal(&mut buf);
        assert!(matches!(
            EdgeCodec::new().decode(&mut buf),
            Err(ProtoError::Malformed(_))
        ));
        // Unknown family.
        let mut buf = access_frame(one_net("10.0.0.0/8"));
        buf[HEADER_LEN + 4] = 5;
        reseal(&mut buf);
        assert!(matches!(
            EdgeCodec::new().decode(&mut buf),
            Err(ProtoError::Malformed(m)) if m.contains("family 5")
        ));
        // A count beyond the limit is refused before anything is allocated for it.
        let mut buf = access_frame(AllowList::default());
        buf[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        reseal(&mut buf);
        assert!(matches!(
            EdgeCodec::new().decode(&mut buf),
            Err(ProtoError::Malformed(m)) if m.contains("subjects exceed")
        ));
        // A count the payload does not hold.
        let mut buf = access_frame(AllowList::default());
        buf[HEADER_LEN + 2] = 3;
        reseal(&mut buf);
        assert!(matches!(
            EdgeCodec::new().decode(&mut buf),
            Err(ProtoError::Truncated(_))
        ));
        // A subject longer than a CN.
        let mut buf = access_frame(AllowList {
            subjects: vec!["x".repeat(MAX_ACCESS_SUBJECT_LEN)],
            networks: vec![],
        });
        let long = AllowList {
            subjects: vec!["x".repeat(MAX_ACCESS_SUBJECT_LEN + 1)],
            networks: vec![],
        };
        assert!(EdgeCodec::new().decode(&mut buf).unwrap().is_some());
        let mut out = BytesMut::new();
        assert!(matches!(
            EdgeCodec::new().encode(&Frame::new(0, Message::Access(long)), &mut out),
            Err(ProtoError::Malformed(_))
        ));
        assert!(out.is_empty(), "nothing queued for a refused frame");
    }

    #[test]
    fn access_is_not_accepted_on_a_version_1_connection() {
        let mut buf = BytesMut::new();
        EdgeCodec::with_version(ACCESS_VERSION)
            .encode(
                &Frame::new(0, Message::Access(AllowList::default())),
                &mut buf,
            )
            .unwrap();
        assert!(matches!(
            EdgeCodec::with_version(1).decode(&mut buf),
            Err(ProtoError::UnsupportedVersion { got: 2, ours: 1 })
        ));
    }

    #[test]
    fn garbage_is_not_a_frame() {
        let mut buf = BytesMut::from(&b"NBDMAGIC and more bytes than a header"[..]);
        assert!(matches!(
            EdgeCodec::new().decode(&mut buf),
            Err(ProtoError::BadMagic(_))
        ));
        let mut short = encode(&Frame::new(1, Message::Flush { tag: 1 }));
        short.truncate(short.len() - 1);
        assert!(matches!(
            EdgeCodec::new().decode_eof(&mut short),
            Err(ProtoError::Truncated(_))
        ));
    }
}

//! NBD wire format: the constants of `doc/proto.md` and the transmission-phase codec.
//!
//! Requests are decoded with a [`tokio_util::codec::Decoder`] so the connection task can pull every
//! complete request out of one socket read before it writes anything back; that is what lets a
//! pipelining client's replies coalesce into a few large writes. A `WRITE` payload is split off the
//! read buffer without copying. A `WRITE` larger than the advertised maximum is not buffered: its
//! payload is skipped as it arrives and the request is handed on marked as discarded, so the server
//! can answer `EINVAL` and stay in sync with the stream instead of either allocating an arbitrary
//! amount of memory or dropping the client.
//!
//! Replies are encoded with [`ReplyEncoder`]. `READ` replies have a separate entry point,
//! [`encode_read_reply`], that lets the target fill the data straight into the output buffer, so a
//! read costs one copy (target → socket buffer) rather than two.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::NbdError;

// Handshake magics.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server, 16 bits) and client flags (32 bits).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// NBD_REP_INFO types.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// Transmission phase magics.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Commands.
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured replies.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// `base:allocation` state flags.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
pub const NBD_STATE_ZERO: u32 = 1 << 1;

// Error values (the only ones the protocol allows).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Size of a (non-extended) request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
const SIMPLE_REPLY_HEADER_LEN: usize = 16;
const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Longest string the protocol allows (export names, error messages).
pub const MAX_STRING_LEN: usize = 4096;

/// The request's command, decoded from its 16-bit type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_wire(kind: u16) -> Self {
        match kind {
            NBD_CMD_READ => Command::Read,
            NBD_CMD_WRITE => Command::Write,
            NBD_CMD_DISC => Command::Disc,
            NBD_CMD_FLUSH => Command::Flush,
            NBD_CMD_TRIM => Command::Trim,
            NBD_CMD_CACHE => Command::Cache,
            NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_READ,
            Command::Write => NBD_CMD_WRITE,
            Command::Disc => NBD_CMD_DISC,
            Command::Flush => NBD_CMD_FLUSH,
            Command::Trim => NBD_CMD_TRIM,
            Command::Cache => NBD_CMD_CACHE,
            Command::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Command::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Command::Unknown(other) => other,
        }
    }
}

/// One decoded transmission-phase request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
    /// The data of a `WRITE`; empty for every other command.
    pub payload: Bytes,
    /// A `WRITE` longer than the decoder's limit: its payload was read off the stream and dropped.
    pub payload_discarded: bool,
}

#[derive(Debug, Clone, Copy)]
struct Header {
    flags: u16,
    command: Command,
    cookie: u64,
    offset: u64,
    length: u32,
}

impl Header {
    fn into_request(self, payload: Bytes, payload_discarded: bool) -> Request {
        Request {
            flags: self.flags,
            command: self.command,
            cookie: self.cookie,
            offset: self.offset,
            length: self.length,
            payload,
            payload_discarded,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum DecodeState {
    Header,
    Payload(Header),
    Discard { header: Header, remaining: usize },
}

/// Decoder for transmission-phase requests (fixed-size headers, no extended headers).
#[derive(Debug)]
pub struct RequestDecoder {
    max_payload: u32,
    state: DecodeState,
}

impl RequestDecoder {
    /// `max_payload` bounds how much `WRITE` data is buffered for one request.
    pub fn new(max_payload: u32) -> Self {
        Self {
            max_payload,
            state: DecodeState::Header,
        }
    }

    /// Whether a request header has been consumed but its payload has not fully arrived yet.
    pub fn is_mid_request(&self) -> bool {
        !matches!(self.state, DecodeState::Header)
    }
}

impl Decoder for RequestDecoder {
    type Item = Request;
    type Error = NbdError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Request>, NbdError> {
        loop {
            match self.state {
                DecodeState::Header => {
                    if src.len() < REQUEST_HEADER_LEN {
                        src.reserve(REQUEST_HEADER_LEN - src.len());
                        return Ok(None);
                    }
                    let magic = src.get_u32();
                    if magic != NBD_REQUEST_MAGIC {
                        return Err(NbdError::BadRequestMagic(magic));
                    }
                    let header = Header {
                        flags: src.get_u16(),
                        command: Command::from_wire(src.get_u16()),
                        cookie: src.get_u64(),
                        offset: src.get_u64(),
                        length: src.get_u32(),
                    };
                    if header.command != Command::Write || header.length == 0 {
                        return Ok(Some(header.into_request(Bytes::new(), false)));
                    }
                    self.state = if header.length > self.max_payload {
                        DecodeState::Discard {
                            header,
                            remaining: header.length as usize,
                        }
                    } else {
                        DecodeState::Payload(header)
                    };
                }
                DecodeState::Payload(header) => {
                    let len = header.length as usize;
                    if src.len() < len {
                        src.reserve(len - src.len());
                        return Ok(None);
                    }
                    self.state = DecodeState::Header;
                    let payload = src.split_to(len).freeze();
                    return Ok(Some(header.into_request(payload, false)));
                }
                DecodeState::Discard { header, remaining } => {
                    let n = remaining.min(src.len());
                    src.advance(n);
                    if n < remaining {
                        self.state = DecodeState::Discard {
                            header,
                            remaining: remaining - n,
                        };
                        return Ok(None);
                    }
                    self.state = DecodeState::Header;
                    return Ok(Some(header.into_request(Bytes::new(), true)));
                }
            }
        }
    }
}

/// A reply to one request. Every structured variant is a single chunk carrying
/// `NBD_REPLY_FLAG_DONE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Simple reply without data: success (`error == 0`) of a non-`READ` command, or any error
    /// when structured replies are off.
    Simple { cookie: u64, error: u32 },
    /// Simple reply to a successful `READ`.
    SimpleData { cookie: u64, data: Bytes },
    /// `NBD_REPLY_TYPE_OFFSET_DATA` for a successful `READ`.
    OffsetData {
        cookie: u64,
        offset: u64,
        data: Bytes,
    },
    /// `NBD_REPLY_TYPE_NONE`: success of a command that returns nothing.
    Done { cookie: u64 },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error {
        cookie: u64,
        error: u32,
        message: String,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` for one metadata context: `(length, flags)` descriptors.
    BlockStatus {
        cookie: u64,
        context_id: u32,
        descriptors: Vec<(u32, u32)>,
    },
}

/// Encoder for [`Reply`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplyEncoder;

fn put_simple_header(dst: &mut BytesMut, cookie: u64, error: u32) {
    dst.put_u32(NBD_SIMPLE_REPLY_MAGIC);
    dst.put_u32(error);
    dst.put_u64(cookie);
}

fn put_chunk_header(dst: &mut BytesMut, cookie: u64, kind: u16, length: u32) {
    dst.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
    dst.put_u16(NBD_REPLY_FLAG_DONE);
    dst.put_u16(kind);
    dst.put_u64(cookie);
    dst.put_u32(length);
}

/// Cut `message` to the protocol's string limit without splitting a UTF-8 sequence.
fn truncate_message(message: &str) -> &str {
    if message.len() <= MAX_STRING_LEN {
        return message;
    }
    let mut end = MAX_STRING_LEN;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

fn chunk_len(len: usize) -> Result<u32, NbdError> {
    u32::try_from(len).map_err(|_| NbdError::ReplyTooLarge(len))
}

impl Encoder<Reply> for ReplyEncoder {
    type Error = NbdError;

    fn encode(&mut self, reply: Reply, dst: &mut BytesMut) -> Result<(), NbdError> {
        match reply {
            Reply::Simple { cookie, error } => {
                dst.reserve(SIMPLE_REPLY_HEADER_LEN);
                put_simple_header(dst, cookie, error);
            }
            Reply::SimpleData { cookie, data } => {
                dst.reserve(SIMPLE_REPLY_HEADER_LEN + data.len());
                put_simple_header(dst, cookie, 0);
                dst.put_slice(&data);
            }
            Reply::OffsetData {
                cookie,
                offset,
                data,
            } => {
                let len = chunk_len(8 + data.len())?;
                dst.reserve(STRUCTURED_REPLY_HEADER_LEN + len as usize);
                put_chunk_header(dst, cookie, NBD_REPLY_TYPE_OFFSET_DATA, len);
                dst.put_u64(offset);
                dst.put_slice(&data);
            }
            Reply::Done { cookie } => {
                dst.reserve(STRUCTURED_REPLY_HEADER_LEN);
                put_chunk_header(dst, cookie, NBD_REPLY_TYPE_NONE, 0);
            }
            Reply::Error {
                cookie,
                error,
                message,
            } => {
                let message = truncate_message(&message);
                let len = 6 + message.len();
                dst.reserve(STRUCTURED_REPLY_HEADER_LEN + len);
                put_chunk_header(dst, cookie, NBD_REPLY_TYPE_ERROR, len as u32);
                dst.put_u32(error);
                dst.put_u16(message.len() as u16);
                dst.put_slice(message.as_bytes());
            }
            Reply::BlockStatus {
                cookie,
                context_id,
                descriptors,
            } => {
                let len = chunk_len(4 + 8 * descriptors.len())?;
                dst.reserve(STRUCTURED_REPLY_HEADER_LEN + len as usize);
                put_chunk_header(dst, cookie, NBD_REPLY_TYPE_BLOCK_STATUS, len);
                dst.put_u32(context_id);
                for (length, flags) in descriptors {
                    dst.put_u32(length);
                    dst.put_u32(flags);
                }
            }
        }
        Ok(())
    }
}

/// Append the successful reply to a `READ` of `len` bytes at `offset`, letting `fill` write the
/// data in place. If `fill` fails, nothing is appended and its error is returned so the caller can
/// encode an error reply instead.
pub fn encode_read_reply<E>(
    dst: &mut BytesMut,
    cookie: u64,
    offset: u64,
    len: usize,
    structured: bool,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<(), E> {
    let start = dst.len();
    if structured {
        // `len` is bounded by the maximum payload (at most u32::MAX - 8 after sanitising).
        let chunk = (8 + len) as u32;
        dst.reserve(STRUCTURED_REPLY_HEADER_LEN + 8 + len);
        put_chunk_header(dst, cookie, NBD_REPLY_TYPE_OFFSET_DATA, chunk);
        dst.put_u64(offset);
    } else {
        dst.reserve(SIMPLE_REPLY_HEADER_LEN + len);
        put_simple_header(dst, cookie, 0);
    }
    let data_start = dst.len();
    dst.resize(data_start + len, 0);
    match fill(&mut dst[data_start..]) {
        Ok(()) => Ok(()),
        Err(e) => {
            dst.truncate(start);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&length.to_be_bytes());
        v
    }

    #[test]
    fn decodes_requests_split_at_every_byte() {
        let mut wire = header(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 7, 4096, 5);
        wire.extend_from_slice(b"hello");
        wire.extend(header(0, NBD_CMD_READ, 8, 512, 1024));
        let mut dec = RequestDecoder::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in wire {
            buf.put_u8(b);
            while let Some(req) = dec.decode(&mut buf).unwrap() {
                out.push(req);
            }
        }
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].command, Command::Write);
        assert_eq!(out[0].flags, NBD_CMD_FLAG_FUA);
        assert_eq!(out[0].cookie, 7);
        assert_eq!(out[0].offset, 4096);
        assert_eq!(&out[0].payload[..], b"hello");
        assert_eq!(out[1].command, Command::Read);
        assert_eq!(out[1].length, 1024);
        assert!(out[1].payload.is_empty());
        assert!(buf.is_empty());
        assert!(!dec.is_mid_request());
    }

    #[test]
    fn oversized_write_is_skipped_and_stream_stays_in_sync() {
        let mut wire = header(0, NBD_CMD_WRITE, 1, 0, 100);
        wire.extend(std::iter::repeat_n(0xaa, 100));
        wire.extend(header(0, NBD_CMD_FLUSH, 2, 0, 0));
        let mut dec = RequestDecoder::new(64);
        let mut buf = BytesMut::from(&wire[..40]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert!(dec.is_mid_request());
        buf.extend_from_slice(&wire[40..]);
        let big = dec.decode(&mut buf).unwrap().unwrap();
        assert!(big.payload_discarded);
        assert!(big.payload.is_empty());
        let flush = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(flush.command, Command::Flush);
        assert_eq!(flush.cookie, 2);
    }

    #[test]
    fn bad_magic_is_an_error() {
        let mut wire = header(0, NBD_CMD_READ, 1, 0, 512);
        wire[0] ^= 1;
        let mut dec = RequestDecoder::new(64);
        let mut buf = BytesMut::from(&wire[..]);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(NbdError::BadRequestMagic(_))
        ));
    }

    #[test]
    fn unknown_command_has_no_payload() {
        let mut wire = header(0, 42, 9, 0, 512);
        wire.extend(header(0, NBD_CMD_DISC, 10, 0, 0));
        let mut dec = RequestDecoder::new(64);
        let mut buf = BytesMut::from(&wire[..]);
        let first = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(first.command, Command::Unknown(42));
        assert_eq!(
            dec.decode(&mut buf).unwrap().unwrap().command,
            Command::Disc
        );
    }

    #[test]
    fn encodes_replies() {
        let mut enc = ReplyEncoder;
        let mut dst = BytesMut::new();
        enc.encode(
            Reply::Simple {
                cookie: 0x0102_0304_0506_0708,
                error: NBD_EINVAL,
            },
            &mut dst,
        )
        .unwrap();
        assert_eq!(
            &dst[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]
        );

        dst.clear();
        enc.encode(
            Reply::BlockStatus {
                cookie: 1,
                context_id: 1,
                descriptors: vec![(4096, 0), (8192, NBD_STATE_HOLE | NBD_STATE_ZERO)],
            },
            &mut dst,
        )
        .unwrap();
        assert_eq!(dst.len(), 20 + 4 + 16);
        assert_eq!(&dst[4..6], &NBD_REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&dst[6..8], &NBD_REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        assert_eq!(&dst[16..20], &20u32.to_be_bytes());
        assert_eq!(&dst[36..40], &3u32.to_be_bytes());

        dst.clear();
        enc.encode(
            Reply::Error {
                cookie: 1,
                error: NBD_EIO,
                message: "x".repeat(5000),
            },
            &mut dst,
        )
        .unwrap();
        assert_eq!(dst.len(), 20 + 6 + MAX_STRING_LEN);
    }

    #[test]
    fn read_reply_rolls_back_on_error() {
        let mut dst = BytesMut::from(&b"keep"[..]);
        let r: Result<(), ()> = encode_read_reply(&mut dst, 1, 0, 512, true, |_| Err(()));
        assert!(r.is_err());
        assert_eq!(&dst[..], b"keep");
        let r: Result<(), ()> = encode_read_reply(&mut dst, 1, 4096, 4, true, |buf| {
            buf.copy_from_slice(b"data");
            Ok(())
        });
        assert!(r.is_ok());
        assert_eq!(dst.len(), 4 + 20 + 8 + 4);
        assert_eq!(&dst[4 + 16..4 + 20], &12u32.to_be_bytes());
        assert_eq!(&dst[4 + 20..4 + 28], &4096u64.to_be_bytes());
        assert_eq!(&dst[4 + 28..], b"data");
    }
}

//! The crate's single error type. Wire decoding, storage and client failures share it so that a
//! server can map any failure onto a wire [`ErrorCode`] in one place and a client can surface the
//! server's refusal (e.g. a stale owner tag) without losing its meaning.

use std::time::Duration;

use crate::protocol::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum DtlError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "bad frame magic {magic:#010x} ({hint})",
        magic = .0,
        hint = vstor_net::bad_magic_hint(*.0, "not a DTL protocol peer?")
    )]
    BadMagic(u32),
    #[error("frame CRC mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    CrcMismatch { expected: u32, actual: u32 },
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("unsupported protocol version {got} in frame header (this side speaks {ours})")]
    UnsupportedVersion { got: u16, ours: u16 },
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame incomplete after {timeout:?} ({buffered} bytes of it received)")]
    FrameTimeout { buffered: usize, timeout: Duration },
    #[error("batch of {count} entries exceeds the limit of {max}")]
    TooManyEntries { count: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("protocol version mismatch: server speaks {server}, client speaks {client}")]
    VersionMismatch { server: u16, client: u16 },
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
    #[error("stale owner tag {got} for namespace {namespace:?} (registered tag is {registered})")]
    StaleOwnerTag {
        namespace: String,
        registered: u64,
        got: u64,
    },
    /// A registration or unregistration from an older incarnation of the volume than the one
    /// the namespace holds: the requester is a copy of a volume deleted and created again
    /// since. On the wire it is a stale owner tag, so such a copy's mirror is fenced.
    #[error("namespace {namespace:?} holds a newer incarnation of the volume ({registered}) than the request's ({got}): that volume was deleted and the name created again")]
    OlderIncarnation {
        namespace: String,
        registered: u64,
        got: u64,
    },
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("DTL server refused the request ({code:?}): {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("timed out after {after:?} while {during}")]
    Timeout {
        during: &'static str,
        after: Duration,
    },
    #[error("connection closed by the peer")]
    ConnectionClosed,
    #[error("connection is unusable after an earlier failure or timeout; reconnect")]
    ConnectionBroken,
    #[error("unexpected message from the peer: {0}")]
    UnexpectedMessage(String),
    /// Mutual TLS failed: our certificate or the peer's was refused, or a file is bad.
    #[error(transparent)]
    Tls(#[from] vstor_net::NetError),
}

impl DtlError {
    /// The wire code a server reports for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            DtlError::UnknownNamespace(_) => ErrorCode::UnknownNamespace,
            DtlError::StaleOwnerTag { .. } | DtlError::OlderIncarnation { .. } => {
                ErrorCode::StaleOwnerTag
            }
            DtlError::Corrupt(_)
            | DtlError::CrcMismatch { .. }
            | DtlError::BadMagic(_)
            | DtlError::Truncated(_) => ErrorCode::Corrupt,
            DtlError::Io(_) => ErrorCode::Io,
            DtlError::Remote { code, .. } => *code,
            _ => ErrorCode::Invalid,
        }
    }

    /// The server-side code carried by a [`DtlError::Remote`], if this is one.
    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            DtlError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}

//! Opening a link with or without TLS, the same way on every internal protocol.
//!
//! *Client side* ([`connect_peer`]): TLS when the process has a cluster identity, plain TCP
//! otherwise. *Server side* ([`accept_peer`]): a server with an identity must still answer a
//! plain-text client, in its own protocol, with a message that says what is wrong (a TLS alert
//! would reach a plain client as garbage, and a bare close as "connection reset"). So the server
//! peeks at the first byte: a TLS connection starts with a handshake record (`0x16`), every vstor
//! protocol with its frame magic, and the two never collide. A plain client on a TLS server comes
//! back as [`Accepted::PlainRefused`]; the server reads its first frame and answers with
//! [`PLAIN_REFUSED`] before closing.
//!
//! *Frame buffers* ([`reserve_frame`]): a codec that has a frame's header knows its length, but
//! reserving all of it at once lets a hostile peer pin up to a maximum frame per connection by
//! sending one header. Reserving in steps of [`FRAME_RESERVE_STEP`] as the bytes arrive costs a
//! large legitimate frame a few amortised reallocations (the buffer grows geometrically) and
//! caps what a header alone can claim.

use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::{NetError, PeerStream, PeerTls};

/// First byte of a TLS handshake record.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a server with mutual TLS answers a plain-text client (in its protocol's error reply).
pub const PLAIN_REFUSED: &str = "this server requires mutual TLS: give the client a certificate \
     of the cluster CA (--peer-tls-cert, --peer-tls-key, --peer-tls-ca or [peer_tls])";

/// What a frame whose first four bytes (read as a little-endian u32) are not the protocol's magic
/// probably is, for the error message: a plain server that is sent a TLS handshake (the peer was
/// given `--peer-tls-*` and this end was not) is told so; anything else gets `otherwise`.
pub fn bad_magic_hint(magic: u32, otherwise: &str) -> String {
    let first = magic.to_le_bytes();
    if first[0] == TLS_HANDSHAKE_RECORD && first[1] == 0x03 {
        "the peer speaks TLS and this end does not: give both ends the cluster identity \
         (--peer-tls-cert, --peer-tls-key, --peer-tls-ca or [peer_tls]), or neither"
            .to_string()
    } else {
        otherwise.to_string()
    }
}

/// At most this much is reserved ahead of the bytes that arrived for a frame.
pub const FRAME_RESERVE_STEP: usize = 1 << 20;

/// Make room in `src` for more of a frame of `frame_len` bytes (header included) of which
/// `src.len()` arrived: at most [`FRAME_RESERVE_STEP`] beyond what is buffered.
pub fn reserve_frame(src: &mut BytesMut, frame_len: usize) {
    let missing = frame_len.saturating_sub(src.len());
    src.reserve(missing.min(FRAME_RESERVE_STEP));
}

/// An accepted connection, by what its client spoke.
#[derive(Debug)]
pub enum Accepted {
    /// Ready for the protocol: plain TCP on a plain server, mutual TLS on a TLS server.
    Stream(PeerStream),
    /// A plain-text client on a server that requires TLS: answer [`PLAIN_REFUSED`] and close.
    PlainRefused(TcpStream),
    /// The client closed before sending anything.
    Closed,
}

/// Client side: TLS to `addr` (the host is the name the server's certificate must carry) with
/// an identity, plain TCP without one.
pub async fn connect_peer(
    tls: Option<&PeerTls>,
    addr: &str,
    tcp: TcpStream,
) -> Result<PeerStream, NetError> {
    match tls {
        Some(tls) => tls.connect(addr, tcp).await,
        None => Ok(PeerStream::Plain(tcp)),
    }
}

/// [`accept_peer`] for a request/reply server (the MDS and the OSDs), with the one wording of its
/// log lines: the stream to serve and, for a plain-text client of a server that requires TLS,
/// the refusal to answer its first request with ([`PLAIN_REFUSED`]) before closing. `None`: nothing
/// to serve (the client closed, or its handshake failed; logged). `server` names the kind of
/// server (`"OSD"`, `"MDS"`) and `id` this one.
pub async fn accept_served(
    tls: Option<&PeerTls>,
    tcp: TcpStream,
    timeout: Duration,
    server: &str,
    id: &(dyn std::fmt::Display + Sync),
) -> Option<(PeerStream, Option<&'static str>)> {
    let peer = tcp
        .peer_addr()
        .map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
    match accept_peer(tls, tcp, timeout).await {
        Ok(Accepted::Stream(s)) => Some((s, None)),
        Ok(Accepted::PlainRefused(s)) => {
            tracing::warn!(%id, %peer, "plain-text client refused: this {server} requires mutual TLS");
            Some((PeerStream::Plain(s), Some(PLAIN_REFUSED)))
        }
        Ok(Accepted::Closed) => None,
        Err(e) => {
            tracing::warn!(%id, %peer, error = %e, "{server} client refused");
            None
        }
    }
}

/// Server side: without an identity, the connection as it is; with one, the TLS handshake (the
/// client must present a certificate of the cluster CA), or [`Accepted::PlainRefused`] for a
/// client that speaks plain text. Everything up to the end of the handshake is bounded by
/// `timeout`.
pub async fn accept_peer(
    tls: Option<&PeerTls>,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<Accepted, NetError> {
    let Some(tls) = tls else {
        return Ok(Accepted::Stream(PeerStream::Plain(tcp)));
    };
    let peer = tcp
        .peer_addr()
        .map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
    let timed_out = || NetError::Timeout {
        peer: peer.clone(),
        after: timeout,
    };
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(timeout, tcp.peek(&mut first))
        .await
        .map_err(|_| timed_out())?
        .map_err(|source| NetError::Handshake {
            peer: peer.clone(),
            source,
        })?;
    if n == 0 {
        return Ok(Accepted::Closed);
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        return Ok(Accepted::PlainRefused(tcp));
    }
    tokio::time::timeout(timeout, tls.accept(tcp))
        .await
        .map_err(|_| timed_out())?
        .map(Accepted::Stream)
}

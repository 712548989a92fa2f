//! The handshake of an edge connection (`Hello` → `Welcome` (+ `Access` from version 2) or a
//! refusal) and the owner check every request repeats.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::Decoder;
use tracing::{info, warn};

use crate::remote::outq::OutQueue;
use crate::remote::proto::{
    AllowList, EdgeCodec, ErrorCode, Frame, Message, ProtoError, ACCESS_VERSION,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, RELEASED_VERSION,
};
use crate::remote::{Handoff, RemoteExports, ServedVolume};

/// Read one frame (handshake only; the session loop decodes in place).
pub(super) async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
) -> Result<Option<Frame>, ProtoError> {
    let mut codec = EdgeCodec::new();
    loop {
        if let Some(frame) = codec.decode(rbuf)? {
            return Ok(Some(frame));
        }
        if stream.read_buf(rbuf).await? == 0 {
            return Ok(None);
        }
    }
}

/// If this node is opening the volume a `Hello` asks for (an adoption or a move under way,
/// [`RemoteExports::opening`]), wait until that ended, at most `bound`: the handshake then
/// finds the volume served instead of refusing an edge that was only early.
pub(super) async fn await_opening(
    hello: &Frame,
    exports: &Arc<dyn RemoteExports>,
    peer: &str,
    bound: Duration,
) {
    let Message::Hello { volume, .. } = &hello.message else {
        return;
    };
    let Some(opened) = exports.opening(volume) else {
        return;
    };
    info!(%peer, volume, "edge handshake: waiting for this node to open the volume");
    if tokio::time::timeout(bound, opened).await.is_err() {
        warn!(%peer, volume, "edge handshake: the volume is still being opened after {bound:?}");
    }
}

fn refuse(out: &mut OutQueue, code: ErrorCode, message: String) {
    let _ = out.push(&Frame::new(0, Message::Error { code, message }));
}

/// A welcomed connection: its volume, the protocol version chosen for it, and the allow list
/// sent (`None` on a version-1 connection, which has no `Access`).
pub(super) struct Welcomed {
    pub(super) volume: String,
    pub(super) served: ServedVolume,
    pub(super) version: u16,
    pub(super) access: Option<AllowList>,
}

/// Check a connection's `Hello`; queue `Welcome` and, from version 2, `Access` (and return the
/// volume), or the refusal. The connection speaks the client's version from here on.
pub(super) fn handshake(
    hello: Frame,
    exports: &Arc<dyn RemoteExports>,
    out: &mut OutQueue,
    peer: &str,
) -> Option<Welcomed> {
    let Message::Hello {
        version,
        volume,
        tag,
        client,
    } = hello.message
    else {
        warn!(%peer, got = hello.message.name(), "edge handshake: first frame is not Hello");
        refuse(
            out,
            ErrorCode::Invalid,
            format!("expected Hello, got {}", hello.message.name()),
        );
        return None;
    };
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        warn!(%peer, volume, client, version, "edge handshake: unsupported protocol version");
        let _ = out.push(&Frame::new(
            0,
            Message::VersionMismatch {
                server: PROTOCOL_VERSION,
                client: version,
            },
        ));
        return None;
    }
    let Some(served) = exports.lookup(&volume) else {
        info!(%peer, volume, client, "edge handshake: volume not served here");
        refuse(
            out,
            ErrorCode::NotOwner,
            format!("volume {volume} is not served on this node"),
        );
        return None;
    };
    // A handshake does not wait out a hand-off: the edge comes back, to whichever node then
    // serves the volume.
    if let Err(refused) = owner_check(&served, &volume, tag, version) {
        let (code, message) = match refused {
            Refused::Now(code, message) => (code, message),
            Refused::Wait => (
                ErrorCode::NotOwner,
                format!("volume {volume} is being handed to another node"),
            ),
        };
        info!(%peer, volume, client, tag, ?code, "edge handshake refused: {message}");
        refuse(out, code, message);
        return None;
    }
    let target = &served.target;
    out.set_version(version);
    let _ = out.push(&Frame::new(
        0,
        Message::Welcome {
            version,
            size: target.size(),
            read_only: target.read_only(),
            tag,
            dtl_in_sync: served.state.dtl_in_sync(),
        },
    ));
    let access = (version >= ACCESS_VERSION).then(|| served.state.access());
    if let Some(list) = &access {
        if let Err(e) = out.push(&Frame::new(0, Message::Access(list.clone()))) {
            // The node's own limits keep a list encodable; if one is not, the edge must not
            // serve the volume with no list at all.
            warn!(%peer, volume, client, error = %e, "edge handshake: cannot send the allow list");
            refuse(
                out,
                ErrorCode::Io,
                format!("volume {volume}: cannot send its allow list: {e}"),
            );
            return None;
        }
    }
    info!(%peer, volume, client, tag, version, "edge client connected");
    Some(Welcomed {
        volume,
        served,
        version,
        access,
    })
}

/// Why [`owner_check`] does not let a request run.
pub(super) enum Refused {
    /// The volume is being handed to another node ([`Handoff::Releasing`]): ask again once
    /// that settled (the request runs here if the hand-off fails).
    Wait,
    /// Refuse it now with this code and message.
    Now(ErrorCode, String),
}

/// May a request (or handshake) under `tag` run on this node, on a connection of protocol
/// `version`?
pub(super) fn owner_check(
    served: &ServedVolume,
    volume: &str,
    tag: u64,
    version: u16,
) -> Result<(), Refused> {
    let state = &served.state;
    if let Some(reason) = state.fenced() {
        return Err(Refused::Now(
            ErrorCode::Fenced,
            format!("volume {volume} is fenced on this node: {reason}"),
        ));
    }
    if !state.alive() {
        return Err(match state.handoff() {
            Handoff::Releasing => Refused::Wait,
            Handoff::Released if version >= RELEASED_VERSION => Refused::Now(
                ErrorCode::Released,
                format!(
                    "volume {volume} was handed to another node; all its data is on the backend"
                ),
            ),
            Handoff::Released | Handoff::None => Refused::Now(
                ErrorCode::NotOwner,
                format!("volume {volume} is no longer served on this node"),
            ),
        });
    }
    let ours = state.tag();
    if tag < ours {
        return Err(Refused::Now(
            ErrorCode::StaleTag,
            format!(
                "stale owner tag {tag} for volume {volume}: this node holds it under tag {ours}"
            ),
        ));
    }
    if tag > ours {
        return Err(Refused::Now(
            ErrorCode::NotOwner,
            format!("volume {volume} has owner tag {tag}, newer than this node's {ours}: it moved"),
        ));
    }
    Ok(())
}

//! What every fuzz target checks, and the seed inputs (`seeds`) made with the real encoders.
//!
//! A target must not panic on any input; where a format round-trips, a decoded value re-encodes
//! to bytes that decode to the same value. The frame formats carry a CRC32C that random
//! mutations almost never get right, so each framed target decodes the input twice: as given
//! (framing, magic, length and CRC checks) and once more with its length and CRC fields
//! recomputed (`fix_*`), which takes the mutated payload to the per-kind decoders.

pub mod codecs;
pub mod engine;
pub mod frontends;
pub mod seeds;

pub use codecs::{dtl_codec, edge_codec, mds_codec, osd_codec};
pub use engine::{meta_envelope, sco_header, snapshot_log, tlog};
pub use frontends::{nbd_handshake, nbd_request, vhost_request};

/// Where a frame format keeps its length and CRC: `[len_at, len_at + 4)` is the payload length,
/// `[crc_at, crc_at + 4)` the CRC32C over `[4, len_at + 4)` of the header and the payload.
#[derive(Clone, Copy)]
pub struct FrameLayout {
    pub header_len: usize,
    pub len_at: usize,
    pub crc_at: usize,
}

/// The input with the first frame's length set to "the rest of the input" (when that fits in a
/// `u32`) and its CRC recomputed; `None` if the input is shorter than a header.
pub fn fix_frame(data: &[u8], layout: FrameLayout) -> Option<Vec<u8>> {
    if data.len() < layout.header_len {
        return None;
    }
    let mut out = data.to_vec();
    let len = u32::try_from(data.len() - layout.header_len).ok()?;
    out[layout.len_at..layout.len_at + 4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&out[4..layout.len_at + 4]),
        &out[layout.header_len..],
    );
    out[layout.crc_at..layout.crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    Some(out)
}

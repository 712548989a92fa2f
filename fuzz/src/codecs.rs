//! The internal protocols' frame codecs: DTL, MDS, OSD and the edge protocol. Each decodes a
//! stream of frames until it needs more bytes or refuses one; every decoded frame must re-encode
//! and decode to itself.

use bytes::BytesMut;

use crate::{fix_frame, FrameLayout};

/// The 24-byte headers of the MDS, OSD and edge protocols (magic, version, kind, id, len, CRC).
const ID_HEADER: FrameLayout = FrameLayout {
    header_len: 24,
    len_at: 16,
    crc_at: 20,
};

fn both(data: &[u8], layout: FrameLayout, decode_all: impl Fn(&[u8])) {
    decode_all(data);
    if let Some(fixed) = fix_frame(data, layout) {
        decode_all(&fixed);
    }
}

/// Decode frames from `data` with `codec` until it needs more bytes or refuses one; every
/// decoded frame must re-encode and decode to itself. `decode` and `encode` call the codec's own
/// methods (inherent, or `tokio_util`'s traits), which differ in receiver and item type.
fn round_trips<C, F, D, E>(
    data: &[u8],
    codec: &mut C,
    decode: impl Fn(&mut C, &mut BytesMut) -> Result<Option<F>, D>,
    encode: impl Fn(&mut C, &F, &mut BytesMut) -> Result<(), E>,
) where
    F: std::fmt::Debug + PartialEq,
    D: std::fmt::Debug,
    E: std::fmt::Display,
{
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode(codec, &mut buf) {
        let mut out = BytesMut::new();
        if let Err(e) = encode(codec, &frame, &mut out) {
            panic!("decoded {frame:?} does not re-encode: {e}");
        }
        match decode(codec, &mut out) {
            Ok(Some(again)) => assert_eq!(again, frame, "round trip changed the frame"),
            other => panic!("re-encoded {frame:?} does not decode: {other:?}"),
        }
        assert!(out.is_empty(), "re-encoded frame has trailing bytes");
    }
}

pub mod dtl_codec {
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};
    use vstor_dtl::protocol::{DtlCodec, HEADER_LEN};

    use crate::FrameLayout;

    pub const LAYOUT: FrameLayout = FrameLayout {
        header_len: HEADER_LEN,
        len_at: 8,
        crc_at: 12,
    };

    fn decode_all(data: &[u8]) {
        super::round_trips(
            data,
            &mut DtlCodec::new(),
            |c: &mut DtlCodec, b: &mut BytesMut| c.decode(b),
            |c: &mut DtlCodec, m, b: &mut BytesMut| c.encode(m, b),
        );
    }

    pub fn check(data: &[u8]) {
        super::both(data, LAYOUT, decode_all);
    }
}

pub mod mds_codec {
    use bytes::BytesMut;
    use vstor_mds::proto::MdsCodec;

    fn decode_all(data: &[u8]) {
        super::round_trips(
            data,
            &mut MdsCodec::default(),
            |c: &mut MdsCodec, b: &mut BytesMut| c.decode(b),
            |c: &mut MdsCodec, f, b: &mut BytesMut| c.encode(f, b),
        );
    }

    pub fn check(data: &[u8]) {
        super::both(data, super::ID_HEADER, decode_all);
    }
}

pub mod osd_codec {
    use bytes::BytesMut;
    use vstor_backend::osd::proto::OsdCodec;

    fn decode_all(data: &[u8]) {
        super::round_trips(
            data,
            &mut OsdCodec::default(),
            |c: &mut OsdCodec, b: &mut BytesMut| c.decode(b),
            |c: &mut OsdCodec, f, b: &mut BytesMut| c.encode(f, b),
        );
    }

    pub fn check(data: &[u8]) {
        super::both(data, super::ID_HEADER, decode_all);
    }
}

pub mod edge_codec {
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};
    use vstor_edge::remote::proto::EdgeCodec;

    fn decode_all(data: &[u8]) {
        super::round_trips(
            data,
            &mut EdgeCodec::new(),
            |c: &mut EdgeCodec, b: &mut BytesMut| c.decode(b),
            |c: &mut EdgeCodec, f, b: &mut BytesMut| c.encode(f, b),
        );
    }

    pub fn check(data: &[u8]) {
        super::both(data, super::ID_HEADER, decode_all);
    }
}

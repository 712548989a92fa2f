//! The internal protocols' frame codecs: DTL, MDS, OSD and the edge protocol. Each decodes a
//! stream of frames until it needs more bytes or refuses one; every decoded frame must re-encode
//! and decode to itself.

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
        let mut codec = DtlCodec::new();
        let mut buf = BytesMut::from(data);
        while let Ok(Some(msg)) = codec.decode(&mut buf) {
            let mut out = BytesMut::new();
            if let Err(e) = codec.encode(&msg, &mut out) {
                panic!("decoded {msg:?} does not re-encode: {e}");
            }
            match codec.decode(&mut out) {
                Ok(Some(again)) => assert_eq!(again, msg, "round trip changed the message"),
                other => panic!("re-encoded {msg:?} does not decode: {other:?}"),
            }
            assert!(out.is_empty(), "re-encoded frame has trailing bytes");
        }
    }

    pub fn check(data: &[u8]) {
        super::both(data, LAYOUT, decode_all);
    }
}

pub mod mds_codec {
    use bytes::BytesMut;
    use vstor_mds::proto::MdsCodec;

    fn decode_all(data: &[u8]) {
        let codec = MdsCodec::default();
        let mut buf = BytesMut::from(data);
        while let Ok(Some(frame)) = codec.decode(&mut buf) {
            let mut out = BytesMut::new();
            if let Err(e) = codec.encode(&frame, &mut out) {
                panic!("decoded {frame:?} does not re-encode: {e}");
            }
            match codec.decode(&mut out) {
                Ok(Some(again)) => assert_eq!(again, frame, "round trip changed the frame"),
                other => panic!("re-encoded {frame:?} does not decode: {other:?}"),
            }
            assert!(out.is_empty(), "re-encoded frame has trailing bytes");
        }
    }

    pub fn check(data: &[u8]) {
        super::both(data, super::ID_HEADER, decode_all);
    }
}

pub mod osd_codec {
    use bytes::BytesMut;
    use vstor_backend::osd::proto::OsdCodec;

    fn decode_all(data: &[u8]) {
        let codec = OsdCodec::default();
        let mut buf = BytesMut::from(data);
        while let Ok(Some(frame)) = codec.decode(&mut buf) {
            let mut out = BytesMut::new();
            if let Err(e) = codec.encode(&frame, &mut out) {
                panic!("decoded {frame:?} does not re-encode: {e}");
            }
            match codec.decode(&mut out) {
                Ok(Some(again)) => assert_eq!(again, frame, "round trip changed the frame"),
                other => panic!("re-encoded {frame:?} does not decode: {other:?}"),
            }
            assert!(out.is_empty(), "re-encoded frame has trailing bytes");
        }
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
        let mut codec = EdgeCodec::new();
        let mut buf = BytesMut::from(data);
        while let Ok(Some(frame)) = codec.decode(&mut buf) {
            let mut out = BytesMut::new();
            if let Err(e) = codec.encode(&frame, &mut out) {
                panic!("decoded {frame:?} does not re-encode: {e}");
            }
            match codec.decode(&mut out) {
                Ok(Some(again)) => assert_eq!(again, frame, "round trip changed the frame"),
                other => panic!("re-encoded {frame:?} does not decode: {other:?}"),
            }
            assert!(out.is_empty(), "re-encoded frame has trailing bytes");
        }
    }

    pub fn check(data: &[u8]) {
        super::both(data, super::ID_HEADER, decode_all);
    }
}

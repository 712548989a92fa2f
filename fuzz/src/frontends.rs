//! The frontends' parsers of guest and client bytes: the NBD handshake, the NBD request decoder
//! and the virtio-blk chain parser.

pub mod nbd_handshake {
    use vstor_edge::nbd::fuzzing::{handshake, HandshakeEnd};

    /// Most bytes the server may answer per byte of input (an `NBD_OPT_LIST` or `INFO` reply is a
    /// few dozen bytes for a 16-byte option) plus the greeting: a reply must stay proportional.
    const REPLY_FACTOR: usize = 64;

    pub fn check(data: &[u8]) {
        let (end, written) = handshake(data);
        assert!(
            written <= 1024 + REPLY_FACTOR * data.len(),
            "{written} bytes answered to {} bytes",
            data.len()
        );
        if let HandshakeEnd::Transmission { export, .. } = end {
            assert!(
                export == vstor_edge::nbd::fuzzing::EXPORT_RW
                    || export == vstor_edge::nbd::fuzzing::EXPORT_RO,
                "entered an export that does not exist: {export:?}"
            );
        }
    }
}

pub mod nbd_request {
    use bytes::{BufMut, BytesMut};
    use tokio_util::codec::Decoder;
    use vstor_edge::nbd::proto::{Command, Request, RequestDecoder, NBD_REQUEST_MAGIC};

    /// Small, so that the "too large, read and drop" path is reached too.
    pub const MAX_PAYLOAD: u32 = 64 << 10;

    /// A request as a client sends it.
    pub fn encode(req: &Request) -> BytesMut {
        let mut out = BytesMut::new();
        out.put_u32(NBD_REQUEST_MAGIC);
        out.put_u16(req.flags);
        out.put_u16(req.command.to_wire());
        out.put_u64(req.cookie);
        out.put_u64(req.offset);
        out.put_u32(req.length);
        out.put_slice(&req.payload);
        out
    }

    pub fn check(data: &[u8]) {
        let mut decoder = RequestDecoder::new(MAX_PAYLOAD);
        let mut buf = BytesMut::from(data);
        while let Ok(Some(req)) = decoder.decode(&mut buf) {
            assert!(
                req.payload.len() <= MAX_PAYLOAD as usize,
                "payload over the limit"
            );
            if req.command == Command::Write && !req.payload_discarded {
                assert_eq!(req.payload.len(), req.length as usize, "payload length");
            } else {
                assert!(req.payload.is_empty(), "payload on a non-write");
            }
            if req.payload_discarded {
                continue;
            }
            let mut out = encode(&req);
            match RequestDecoder::new(MAX_PAYLOAD).decode(&mut out) {
                Ok(Some(again)) => assert_eq!(again, req, "round trip changed the request"),
                other => panic!("re-encoded {req:?} does not decode: {other:?}"),
            }
            assert!(out.is_empty(), "re-encoded request has trailing bytes");
        }
    }
}

pub mod vhost_request {
    pub fn check(data: &[u8]) {
        vstor_edge::vhost::fuzzing::parse_chain(data);
    }
}

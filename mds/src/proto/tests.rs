//! Tests of the `proto` module (kept apart so the module stays readable).

use super::*;
use proptest::prelude::*;

fn arb_cork() -> impl Strategy<Value = Cork> {
    any::<(u64, u32, u32)>().prop_map(|(tlog, count, crc)| Cork { tlog, count, crc })
}

fn arb_table() -> impl Strategy<Value = TableInfo> {
    (
        "[a-z0-9._-]{0,20}",
        "[a-z0-9._-]{0,20}",
        any::<bool>(),
        any::<u64>(),
        arb_cork(),
        any::<(u64, u64, u64, u64, u64)>(),
        any::<u64>(),
    )
        .prop_map(
            |(volume, namespace, slave, owner_tag, cork, c, entries)| TableInfo {
                volume,
                meta: TableMeta {
                    namespace,
                    role: if slave { Role::Slave } else { Role::Master },
                    owner_tag,
                    cork,
                    counters: Counters {
                        sets: c.0,
                        refused: c.1,
                        tlogs_replayed: c.2,
                        full_rebuilds: c.3,
                        incremental: c.4,
                    },
                },
                entries,
            },
        )
}

fn arb_message() -> impl Strategy<Value = Message> {
    let s = "[a-z0-9._/-]{0,30}";
    let update = prop_oneof![
        any::<(u64, u64)>().prop_map(|(address, location)| Update::Loc { address, location }),
        any::<(u64, u64)>().prop_map(|(start, count)| Update::Trim { start, count }),
    ];
    prop_oneof![
        (any::<u16>(), s).prop_map(|(version, client)| Message::Hello { version, client }),
        (any::<u16>(), s).prop_map(|(version, server)| Message::Welcome { version, server }),
        any::<(u16, u16)>()
            .prop_map(|(server, client)| Message::VersionMismatch { server, client }),
        (s, proptest::collection::vec(any::<u64>(), 0..20))
            .prop_map(|(volume, addresses)| Message::MultiGet { volume, addresses }),
        (
            s,
            any::<u64>(),
            arb_cork(),
            arb_cork(),
            proptest::collection::vec(update, 0..20)
        )
            .prop_map(|(volume, owner_tag, expect, cork, updates)| {
                Message::MultiSet {
                    volume,
                    owner_tag,
                    expect,
                    cork,
                    updates,
                }
            }),
        (s, s, any::<bool>(), any::<u64>()).prop_map(|(volume, namespace, slave, owner_tag)| {
            Message::SetRole {
                volume,
                namespace,
                role: if slave { Role::Slave } else { Role::Master },
                owner_tag,
            }
        }),
        (s, any::<bool>()).prop_map(|(volume, dry_run)| Message::CatchUp { volume, dry_run }),
        s.prop_map(|volume| Message::Stat { volume }),
        Just(Message::List),
        (s, any::<Option<u64>>(), any::<u32>()).prop_map(|(volume, after, limit)| {
            Message::Dump {
                volume,
                after,
                limit,
            }
        }),
        (s, any::<u64>()).prop_map(|(volume, owner_tag)| Message::Drop { volume, owner_tag }),
        (s, any::<u64>(), any::<u32>()).prop_map(|(volume, first, count)| Message::DumpPages {
            volume,
            first,
            count
        }),
        (
            arb_cork(),
            any::<Option<u64>>(),
            proptest::collection::vec((any::<u64>(), any::<u8>()), 0..3)
        )
            .prop_map(|(cork, next, pages)| Message::Pages {
                cork,
                next,
                pages: pages
                    .into_iter()
                    .map(|(n, fill)| (n, Bytes::from(vec![fill; PAGE_BYTES])))
                    .collect(),
            }),
        Just(Message::Done),
        (arb_cork(), proptest::collection::vec(any::<u64>(), 0..20))
            .prop_map(|(cork, locations)| Message::Locations { cork, locations }),
        (
            any::<u64>(),
            any::<u64>(),
            proptest::option::of("[ -~]{0,40}"),
            arb_cork()
        )
            .prop_map(|(behind, replayed, full_rebuild, cork)| Message::CaughtUp {
                behind,
                replayed,
                full_rebuild,
                cork
            }),
        arb_table().prop_map(Message::Table),
        proptest::collection::vec(arb_table(), 0..4).prop_map(Message::Tables),
        (
            arb_cork(),
            proptest::collection::vec(any::<(u64, u64)>(), 0..20)
        )
            .prop_map(|(cork, entries)| Message::Entries { cork, entries }),
        ((1u16..=8), "[ -~]{0,40}").prop_map(|(code, message)| Message::Error {
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
        MdsCodec::default().encode(&frame, &mut buf).unwrap();
        prop_assert_eq!(MdsCodec::default().decode(&mut buf).unwrap(), Some(frame));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn every_corrupted_byte_is_detected(
        message in arb_message(),
        pos in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut buf = BytesMut::new();
        MdsCodec::default().encode(&Frame { id: 3, message }, &mut buf).unwrap();
        let at = pos.index(buf.len());
        buf[at] ^= flip;
        // Either an error, or (a grown length) a frame that never completes.
        match MdsCodec::default().decode(&mut buf) {
            Err(_) | Ok(None) => {}
            Ok(Some(frame)) => prop_assert!(false, "corruption at {} decoded as {:?}", at, frame),
        }
    }

    #[test]
    fn frames_split_anywhere_decode_once_complete(
        messages in proptest::collection::vec(arb_message(), 1..5),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let codec = MdsCodec::default();
        let mut wire = BytesMut::new();
        let frames: Vec<Frame> = messages
            .into_iter()
            .enumerate()
            .map(|(i, message)| Frame { id: i as u64, message })
            .collect();
        for f in &frames {
            codec.encode(f, &mut wire).unwrap();
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len())).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut from = 0;
        for to in points {
            buf.extend_from_slice(&wire[from..to]);
            from = to;
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                got.push(frame);
            }
        }
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
    }
}

#[test]
fn hostile_headers_and_other_versions_are_refused() {
    let stat = Frame {
        id: 1,
        message: Message::List,
    };
    let mut buf = BytesMut::new();
    MdsCodec::default().encode(&stat, &mut buf).unwrap();
    buf[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        MdsCodec::default().decode(&mut buf),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    let mut buf = BytesMut::new();
    MdsCodec::with_version(3).encode(&stat, &mut buf).unwrap();
    assert!(matches!(
        MdsCodec::default().decode(&mut buf),
        Err(ProtoError::UnsupportedVersion { got: 3, ours: 2 })
    ));
    // Kinds newer than a connection's version are neither written nor read on it.
    let pages = Frame {
        id: 2,
        message: Message::DumpPages {
            volume: "v".into(),
            first: 0,
            count: 1,
        },
    };
    let mut buf = BytesMut::new();
    assert!(MdsCodec::with_version(1).encode(&pages, &mut buf).is_err());
    assert!(buf.is_empty());
    MdsCodec::with_version(2).encode(&pages, &mut buf).unwrap();
    buf[4..6].copy_from_slice(&1u16.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[4..20]), &buf[HEADER_LEN..]);
    buf[20..24].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        MdsCodec::with_version(1).decode(&mut buf),
        Err(ProtoError::UnknownKind(18))
    ));
    // A page of the wrong size is refused when written.
    let short = Frame {
        id: 3,
        message: Message::Pages {
            cork: Cork::EMPTY,
            next: None,
            pages: vec![(1, Bytes::from_static(&[0; 8]))],
        },
    };
    assert!(MdsCodec::default()
        .encode(&short, &mut BytesMut::new())
        .is_err());
    // The handshake is frozen: a v3 Hello still decodes, so a v2 server can answer it.
    let mut buf = BytesMut::new();
    let hello = Frame {
        id: 0,
        message: Message::Hello {
            version: 3,
            client: "c".into(),
        },
    };
    MdsCodec::with_version(3).encode(&hello, &mut buf).unwrap();
    assert_eq!(MdsCodec::default().decode(&mut buf).unwrap(), Some(hello));
    // A count larger than the bytes present is refused before allocating.
    let mut payload = BytesMut::new();
    put_string(&mut payload, "v").unwrap();
    payload.put_u32_le(1_000_000);
    assert!(matches!(
        Message::decode_payload(kind::MULTI_GET, payload.freeze()),
        Err(ProtoError::Truncated(_))
    ));
}

#[test]
fn a_header_claiming_4_gib_is_refused_without_allocating() {
    let mut buf = BytesMut::new();
    MdsCodec::default()
        .encode(
            &Frame {
                id: 1,
                message: Message::List,
            },
            &mut buf,
        )
        .unwrap();
    buf[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    buf.truncate(HEADER_LEN);
    let capacity = buf.capacity();
    let err = MdsCodec::default().decode(&mut buf).unwrap_err();
    assert!(
        matches!(err, ProtoError::FrameTooLarge { len, max }
            if len == u32::MAX as usize && max == MAX_FRAME_PAYLOAD),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("frame of 4294967295 bytes exceeds the limit of {MAX_FRAME_PAYLOAD}")
    );
    assert_eq!(
        buf.capacity(),
        capacity,
        "nothing reserved for the claimed payload"
    );
}

#[test]
fn a_tls_handshake_sent_to_a_plain_server_is_named_as_such() {
    // The start of a TLS 1.2/1.3 ClientHello record: handshake (0x16), version 3.1, length.
    let mut hello = BytesMut::from(&[0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc][..]);
    hello.resize(HEADER_LEN + 8, 0);
    let err = MdsCodec::default().decode(&mut hello).unwrap_err();
    assert!(
        err.to_string()
            .contains("the peer speaks TLS and this end does not"),
        "{err}"
    );
    let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
    garbage.resize(HEADER_LEN + 8, 0);
    let err = MdsCodec::default().decode(&mut garbage).unwrap_err();
    assert!(
        err.to_string().contains("not an MDS protocol peer?"),
        "{err}"
    );
}

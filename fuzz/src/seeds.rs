//! Seed inputs for every target, made with the real encoders (so every seed is a valid input),
//! written to `fuzz/corpus/TARGET/seed-N` by `gen_corpus`.

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::Encoder;

/// `(target, seeds)` for every target.
pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("nbd_handshake", nbd_handshake()),
        ("nbd_request", nbd_request()),
        ("vhost_request", vhost_request()),
        ("dtl_codec", dtl_codec()),
        ("mds_codec", mds_codec()),
        ("osd_codec", osd_codec()),
        ("edge_codec", edge_codec()),
        ("tlog", tlog()),
        ("sco_header", sco_header()),
        ("meta_envelope", meta_envelope()),
        ("snapshot_log", snapshot_log()),
    ]
}

fn nbd_handshake() -> Vec<Vec<u8>> {
    use vstor_edge::nbd::proto::*;
    fn option(out: &mut BytesMut, option: u32, data: &[u8]) {
        out.put_u64(IHAVEOPT);
        out.put_u32(option);
        out.put_u32(data.len() as u32);
        out.put_slice(data);
    }
    fn name_and_infos(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = BytesMut::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u16(infos.len() as u16);
        for &i in infos {
            d.put_u16(i);
        }
        d.to_vec()
    }
    fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = BytesMut::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u32(queries.len() as u32);
        for q in queries {
            d.put_u32(q.len() as u32);
            d.put_slice(q.as_bytes());
        }
        d.to_vec()
    }
    let flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    let mut seeds = Vec::new();

    let mut s = BytesMut::new();
    s.put_u32(NBD_FLAG_C_FIXED_NEWSTYLE);
    option(&mut s, NBD_OPT_EXPORT_NAME, b"vol0");
    seeds.push(s.to_vec());

    let mut s = BytesMut::new();
    s.put_u32(flags);
    option(&mut s, NBD_OPT_LIST, &[]);
    option(&mut s, NBD_OPT_STRUCTURED_REPLY, &[]);
    option(&mut s, NBD_OPT_LIST_META_CONTEXT, &meta("vol0", &["base:"]));
    option(
        &mut s,
        NBD_OPT_SET_META_CONTEXT,
        &meta("vol0", &["base:allocation"]),
    );
    option(
        &mut s,
        NBD_OPT_GO,
        &name_and_infos("vol0", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]),
    );
    seeds.push(s.to_vec());

    let mut s = BytesMut::new();
    s.put_u32(flags);
    option(
        &mut s,
        NBD_OPT_INFO,
        &name_and_infos("ro", &[NBD_INFO_DESCRIPTION]),
    );
    option(&mut s, NBD_OPT_STARTTLS, &[]);
    option(&mut s, NBD_OPT_INFO, &name_and_infos("missing", &[]));
    option(&mut s, NBD_OPT_ABORT, &[]);
    seeds.push(s.to_vec());
    seeds
}

fn nbd_request() -> Vec<Vec<u8>> {
    use vstor_edge::nbd::proto::{Command, Request};
    let req = |command, flags, offset, length: u32, payload: &[u8]| Request {
        flags,
        command,
        cookie: 0x1122_3344_5566_7788,
        offset,
        length,
        payload: Bytes::copy_from_slice(payload),
        payload_discarded: false,
    };
    let data = vec![0xab; 4096];
    let mut stream = BytesMut::new();
    for r in [
        req(Command::Read, 0, 0, 4096, &[]),
        req(Command::Write, 1, 4096, 4096, &data),
        req(Command::Flush, 0, 0, 0, &[]),
        req(Command::Trim, 0, 8192, 65536, &[]),
        req(Command::WriteZeroes, 2, 0, 1 << 20, &[]),
        req(Command::BlockStatus, 8, 0, 1 << 20, &[]),
        req(Command::Disc, 0, 0, 0, &[]),
    ] {
        stream.put_slice(&crate::nbd_request::encode(&r));
    }
    let single = crate::nbd_request::encode(&req(Command::Write, 0, 0, 512, &data[..512]));
    vec![stream.to_vec(), single.to_vec()]
}

fn vhost_request() -> Vec<Vec<u8>> {
    use vstor_edge::vhost::fuzzing::{encode_input, FuzzDesc};
    let d = |addr, len, writable| FuzzDesc {
        addr,
        len,
        writable,
    };
    let header = |kind: u32, sector: u64| {
        let mut h = Vec::new();
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        h
    };
    let mut dwz = header(13, 0);
    dwz.extend_from_slice(&16u64.to_le_bytes()); // sector
    dwz.extend_from_slice(&8u32.to_le_bytes()); // sectors
    dwz.extend_from_slice(&0u32.to_le_bytes()); // flags
    vec![
        // IN: header, 4 KiB into two segments, status.
        encode_input(
            false,
            8,
            &[
                d(0, 16, false),
                d(0x1000, 2048, true),
                d(0x2000, 2048, true),
                d(0x3000, 1, true),
            ],
            &header(0, 8),
        ),
        // OUT: header and data in one descriptor, status.
        encode_input(
            false,
            8,
            &[d(0, 16 + 512, false), d(0x3000, 1, true)],
            &header(1, 0),
        ),
        // FLUSH on a read-only device.
        encode_input(
            true,
            4,
            &[d(0, 16, false), d(0x3000, 1, true)],
            &header(4, 0),
        ),
        // GET_ID into the second memory region.
        encode_input(
            false,
            4,
            &[d(0, 16, false), d(0x2_0000, 20, true), d(0x3000, 1, true)],
            &header(8, 0),
        ),
        // DISCARD with one segment.
        {
            let mut mem = dwz.clone();
            mem[..4].copy_from_slice(&11u32.to_le_bytes());
            encode_input(false, 4, &[d(0, 32, false), d(0x3000, 1, true)], &mem)
        },
        // WRITE_ZEROES with one segment.
        encode_input(false, 4, &[d(0, 32, false), d(0x3000, 1, true)], &dwz),
    ]
}

fn dtl_codec() -> Vec<Vec<u8>> {
    use vstor_dtl::{DtlCodec, Entry, ErrorCode, Message, ScoRange, PROTOCOL_VERSION};
    let entries = |n: u64| -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                location: 7 | (i << 32),
                lba: i * 8,
                data: Bytes::from(vec![i as u8; 512]),
            })
            .collect()
    };
    let ns = || "vol0".to_string();
    let messages = vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
        },
        Message::Register {
            namespace: ns(),
            cluster_size: 512,
            owner_tag: 3,
            incarnation: 1_800_000_000_000_000_000,
        },
        Message::AddEntries {
            namespace: ns(),
            owner_tag: 3,
            sco: 7,
            entries: entries(2),
        },
        Message::GetEntries {
            namespace: ns(),
            from_sco: 1,
            to_sco: 9,
        },
        Message::RemoveUpTo {
            namespace: ns(),
            owner_tag: 3,
            sco: 5,
        },
        Message::Unregister {
            namespace: ns(),
            owner_tag: 3,
            incarnation: 1_800_000_000_000_000_000,
        },
        Message::Error {
            code: ErrorCode::StaleOwnerTag,
            message: "stale".into(),
        },
        Message::ScoRange(ScoRange {
            oldest: Some(1),
            newest: None,
        }),
        Message::Entries {
            sco: 7,
            entries: entries(1),
        },
    ];
    let mut codec = DtlCodec::new();
    let mut stream = BytesMut::new();
    let mut seeds = Vec::new();
    for m in &messages {
        let mut one = BytesMut::new();
        let _ = codec.encode(m, &mut one);
        stream.put_slice(&one);
        seeds.push(one.to_vec());
    }
    seeds.push(stream.to_vec());
    seeds
}

fn mds_codec() -> Vec<Vec<u8>> {
    use vstor_mds::proto::{Frame, MdsCodec, Message, PROTOCOL_VERSION};
    use vstor_mds::{Cork, Role, Update};
    let cork = Cork {
        tlog: 4,
        count: 4,
        crc: 0xdead_beef,
    };
    let vol = || "vol0".to_string();
    let messages = vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            client: "node-a".into(),
        },
        Message::MultiGet {
            volume: vol(),
            addresses: vec![0, 1, 4096],
        },
        Message::MultiSet {
            volume: vol(),
            owner_tag: 2,
            expect: cork,
            cork: Cork { tlog: 5, ..cork },
            updates: vec![
                Update::Loc {
                    address: 1,
                    location: 0x0100_0001,
                },
                Update::Trim { start: 8, count: 8 },
            ],
        },
        Message::SetRole {
            volume: vol(),
            namespace: vol(),
            role: Role::Slave,
            owner_tag: 2,
        },
        Message::Dump {
            volume: vol(),
            after: Some(9),
            limit: 100,
        },
        Message::Locations {
            cork,
            locations: vec![0, 0x0100_0001],
        },
        Message::List,
        Message::DumpPages {
            volume: vol(),
            first: 2,
            count: 16,
        },
        Message::Pages {
            cork,
            next: Some(40),
            pages: vec![(
                3,
                bytes::Bytes::from(vec![1u8; vstor_mds::proto::PAGE_BYTES]),
            )],
        },
    ];
    let codec = MdsCodec::default();
    framed(messages, |id, message, out| {
        let _ = codec.encode(&Frame { id, message }, out);
    })
}

fn osd_codec() -> Vec<Vec<u8>> {
    use vstor_backend::osd::proto::{FragmentId, Frame, Message, OsdCodec, PROTOCOL_VERSION};
    let ns = || "vol0".to_string();
    let messages = vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            client: "node-a".into(),
        },
        Message::Put {
            namespace: ns(),
            name: "sco_1".into(),
            version: 1,
            index: 2,
            tag: 3,
            file: Bytes::from(vec![7u8; 300]),
        },
        Message::GetRange {
            namespace: ns(),
            name: "sco_1".into(),
            version: 1,
            index: 2,
            offset: 4096,
            len: 8192,
        },
        Message::List {
            namespace: ns(),
            after: String::new(),
            limit: 10,
        },
        Message::Listing {
            fragments: vec![FragmentId {
                name: "sco_1".into(),
                version: 1,
                index: 2,
                size: 300,
            }],
        },
        Message::Stat,
        Message::Data {
            data: Bytes::from_static(b"fragment bytes"),
        },
    ];
    let codec = OsdCodec::default();
    framed(messages, |id, message, out| {
        let _ = codec.encode(&Frame { id, message }, out);
    })
}

fn edge_codec() -> Vec<Vec<u8>> {
    use vstor_edge::remote::proto::{
        AllowList, EdgeCodec, ErrorCode, Frame, Message, PROTOCOL_VERSION,
    };
    use vstor_edge::Extent;
    let messages = vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            volume: "vol0".into(),
            tag: 3,
            client: "edge-a".into(),
        },
        Message::Access(AllowList {
            subjects: vec!["alice".into()],
            networks: ["10.1.0.0/16", "fd00::/64"]
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
        }),
        Message::Write {
            tag: 3,
            offset: 4096,
            fua: true,
            data: Bytes::from(vec![0x5a; 4096]),
        },
        Message::Read {
            tag: 3,
            offset: 0,
            len: 4096,
        },
        Message::WriteZeroes {
            tag: 3,
            offset: 0,
            len: 1 << 20,
            allocate: false,
            fua: false,
        },
        Message::Extents {
            extents: vec![
                Extent {
                    length: 4096,
                    hole: false,
                },
                Extent {
                    length: 8192,
                    hole: true,
                },
            ],
        },
        Message::Error {
            code: ErrorCode::StaleTag,
            message: "stale tag".into(),
        },
    ];
    let mut codec = EdgeCodec::new();
    framed(messages, |id, message, out| {
        let _ = codec.encode(Frame { id, message }, out);
    })
}

/// One seed per message (ids 1, 2, ...) and one with all of them in a row.
fn framed<M>(messages: Vec<M>, mut encode: impl FnMut(u64, M, &mut BytesMut)) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let mut stream = BytesMut::new();
    for (i, m) in messages.into_iter().enumerate() {
        let mut one = BytesMut::new();
        encode(i as u64 + 1, m, &mut one);
        stream.put_slice(&one);
        seeds.push(one.to_vec());
    }
    seeds.push(stream.to_vec());
    seeds
}

fn tlog() -> Vec<Vec<u8>> {
    use vstor_volumedriver::tlog::{encode_closed, Entry};
    use vstor_volumedriver::types::{ClusterLocation, ScoName, ScoNumber, TLogNumber};
    let sco = ScoName::new(ScoNumber(3));
    let entries = [
        Entry::Loc {
            address: 10,
            location: ClusterLocation::new(sco, 0),
        },
        Entry::Loc {
            address: 11,
            location: ClusterLocation::new(sco, 1),
        },
        Entry::Trim {
            start: 64,
            count: 8,
        },
        Entry::ScoCrc {
            sco,
            clusters: 2,
            crc: 0x1234_5678,
        },
    ];
    let closed = encode_closed(TLogNumber(5), &entries);
    // The same TLog left open after a crash: its last entry a SYNC vouching for the rest.
    let mut open = closed[..closed.len() - 16].to_vec();
    let sync = Entry::Sync {
        index: (open.len() / 16) as u64,
        crc: crc32c::crc32c(&open),
    };
    open.extend_from_slice(&sync.encode());
    vec![closed, open, encode_closed(TLogNumber(1), &[])]
}

fn sco_header() -> Vec<Vec<u8>> {
    use vstor_volumedriver::sco::ScoHeader;
    use vstor_volumedriver::types::{ScoName, ScoNumber};
    let header = |namespace: &str, number| ScoHeader {
        cluster_size: 4096,
        sco: ScoName {
            clone_id: 1,
            number: ScoNumber(number),
            version: 2,
        },
        namespace: namespace.into(),
    };
    // Only the header matters; the trailing zero padding is cut to keep the seeds small.
    let trimmed = |h: ScoHeader| {
        let mut b = h.encode();
        let end = 28 + h.namespace.len();
        b.truncate(end);
        b
    };
    vec![
        trimmed(header("vol0", 7)),
        trimmed(header(&"v".repeat(255), 1)),
    ]
}

fn meta_envelope() -> Vec<Vec<u8>> {
    use vstor_volumedriver::config::{
        DtlMode, SnapshotRecord, TLogList, TLogRecord, VolumeConfig, VolumeOptions,
    };
    let mut seeds = Vec::new();
    let mut options = VolumeOptions::new(1 << 30);
    options.dtl_mode = DtlMode::Sync;
    options.dtl_addr = Some("127.0.0.1:7900".into());
    if let Ok(mut config) = VolumeConfig::new("vol0", &options, 1_700_000_000) {
        // Fixed, so the committed seed does not change at every regeneration.
        config.incarnation = 1_700_000_000_123_456_789;
        seeds.push(config.encode());
    }
    let mut record = TLogRecord::new(4);
    record.scos = vec![1, 2];
    record.data_bytes = 8192;
    record.sco_versions.insert(2, 1);
    let list = TLogList {
        tlogs: vec![TLogRecord::new(1), record],
        snapshots: vec![SnapshotRecord {
            name: "snap1".into(),
            created: 1_700_000_000,
            tlog: 1,
            written_bytes: 4096,
            clones: vec!["clone1".into()],
            size: 1 << 30,
        }],
        dropped: vec![(2, 3)],
        dtl_floor: (2, 0),
    };
    seeds.push(list.encode());
    seeds
}

fn snapshot_log() -> Vec<Vec<u8>> {
    use vstor_volumedriver::config::SnapshotRecord;
    use vstor_volumedriver::volume::snapshot_log::encode;
    let snap = |name: &str, tlog| SnapshotRecord {
        name: name.into(),
        created: 1_700_000_000,
        tlog,
        written_bytes: 4096 * tlog,
        clones: Vec::new(),
        size: 1 << 30,
    };
    let one = encode(0, &snap("daily-1", 3));
    let mut two = one.clone();
    two.extend_from_slice(&encode(1, &snap("daily-2", 9)));
    // A torn tail: the last record cut short, as a crash leaves it.
    let mut torn = two.clone();
    torn.extend_from_slice(&encode(2, &snap("daily-3", 12))[..20]);
    vec![one, two, torn]
}

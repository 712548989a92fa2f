//! The engine's on-disk and backend formats: TLogs, SCO headers, metadata envelopes and the
//! snapshot log. These are read back from the write buffer and the backend, which a crash, a
//! bad disk or a hostile backend can fill with anything.

pub mod tlog {
    use vstor_volumedriver::tlog::{self, Entry, ENTRY_LEN};

    pub fn check(data: &[u8]) {
        for chunk in data.chunks_exact(ENTRY_LEN) {
            let mut raw = [0u8; ENTRY_LEN];
            raw.copy_from_slice(chunk);
            if let Ok(entry) = Entry::decode(&raw) {
                assert_eq!(
                    Entry::decode(&entry.encode()),
                    Ok(entry),
                    "entry round trip"
                );
            }
        }
        let _ = tlog::parse(data, false);
        let _ = tlog::parse_synced_prefix(data);
        if let Ok(parsed) = tlog::parse(data, true) {
            assert!(parsed.closed, "a TLog that must be closed parsed as open");
            let again = tlog::encode_closed(parsed.number, &parsed.entries);
            match tlog::parse(&again, true) {
                Ok(reparsed) => assert_eq!(reparsed, parsed, "TLog round trip"),
                Err(e) => panic!("re-encoded TLog does not parse: {e}"),
            }
        }
    }
}

pub mod sco_header {
    use vstor_volumedriver::sco::{ScoHeader, SCO_HEADER_LEN};

    /// The input padded to a whole header, with the header CRC recomputed when asked to.
    fn header(data: &[u8], fix_crc: bool) -> Vec<u8> {
        let mut out = data.to_vec();
        if out.len() < SCO_HEADER_LEN as usize {
            out.resize(SCO_HEADER_LEN as usize, 0);
        }
        if fix_crc {
            let name_len = usize::from(u16::from_le_bytes([out[22], out[23]])).min(255);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..24]), &out[28..28 + name_len]);
            out[24..28].copy_from_slice(&crc.to_le_bytes());
        }
        out
    }

    pub fn check(data: &[u8]) {
        for fix_crc in [false, true] {
            let bytes = header(data, fix_crc);
            let Ok(decoded) = ScoHeader::decode(&bytes) else {
                continue;
            };
            let name_len = usize::from(u16::from_le_bytes([bytes[22], bytes[23]]));
            // A name that is not UTF-8 is read lossily (it only names the SCO in messages), so
            // only UTF-8 names must come back unchanged.
            if std::str::from_utf8(&bytes[28..28 + name_len]).is_err() {
                continue;
            }
            match ScoHeader::decode(&decoded.encode()) {
                Ok(again) => assert_eq!(again, decoded, "SCO header round trip"),
                Err(e) => panic!("re-encoded SCO header does not decode: {e}"),
            }
        }
    }
}

pub mod meta_envelope {
    use vstor_volumedriver::config::{TLogList, VolumeConfig};
    use vstor_volumedriver::meta;

    const HEADER_LEN: usize = 32;

    /// The input with its envelope's length and CRC recomputed.
    fn fix(data: &[u8]) -> Option<Vec<u8>> {
        if data.len() < HEADER_LEN {
            return None;
        }
        let mut out = data.to_vec();
        out[16..24].copy_from_slice(&((data.len() - HEADER_LEN) as u64).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..24]), &out[HEADER_LEN..]);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
        Some(out)
    }

    fn decode_all(bytes: &[u8]) {
        if let Ok(config) = VolumeConfig::decode("fuzz", "input", bytes) {
            match VolumeConfig::decode("fuzz", "again", &config.encode()) {
                Ok(again) => assert_eq!(again, config, "volume config round trip"),
                Err(e) => panic!("re-encoded volume config does not decode: {e}"),
            }
        }
        if let Ok(list) = TLogList::decode("fuzz", bytes) {
            match TLogList::decode("fuzz", &list.encode()) {
                Ok(again) => assert_eq!(again, list, "TLog list round trip"),
                Err(e) => panic!("re-encoded TLog list does not decode: {e}"),
            }
        }
        // Any kind and version, as far as the envelope and the JSON parser go.
        if bytes.len() >= 16 {
            let mut kind = [0u8; 4];
            kind.copy_from_slice(&bytes[8..12]);
            let version = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
            let _ = meta::decode::<serde_json::Value>(&kind, version, bytes);
        }
    }

    pub fn check(data: &[u8]) {
        decode_all(data);
        if let Some(fixed) = fix(data) {
            decode_all(&fixed);
        }
    }
}

pub mod snapshot_log {
    use vstor_volumedriver::volume::snapshot_log::{encode, parse};

    /// The input with every record's CRC recomputed, as far as the lengths lead.
    fn fix(data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        let mut at = 0usize;
        while out.len() - at >= 8 {
            let len = u32::from_le_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
            let Some(end) = (at + 8)
                .checked_add(len as usize)
                .filter(|&e| e <= out.len())
            else {
                break;
            };
            let crc = crc32c::crc32c(&out[at + 8..end]);
            out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
            at = end;
        }
        out
    }

    fn decode_all(bytes: &[u8]) {
        let (records, valid) = parse(bytes);
        assert!(valid <= bytes.len(), "valid prefix longer than the log");
        let again: Vec<u8> = records
            .iter()
            .flat_map(|(seq, s)| encode(*seq, s))
            .collect();
        let (reparsed, revalid) = parse(&again);
        assert_eq!(reparsed, records, "snapshot log round trip");
        assert_eq!(revalid, again.len(), "re-encoded log not valid to its end");
    }

    pub fn check(data: &[u8]) {
        decode_all(data);
        decode_all(&fix(data));
    }
}

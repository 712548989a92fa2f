//! Local parities (presets with `local_parity`; Open vStorage's NC-ECC, an LRC-style code):
//! for each failure domain holding at least two of an object's `k + m` fragments, one more
//! fragment, the XOR of those, stored on another OSD of the same domain. One lost fragment of
//! the domain is then rebuilt from the domain alone (the other members and the parity), with
//! no byte crossing domains, instead of from `k` fragments of which most are elsewhere.
//!
//! A local parity is not one of the `k + m`: reads never need it, it does not count towards
//! `k` or the put's `c`, and losing it costs only the cheap rebuild of its group. Its header
//! lists the group (`fragment`), because placement may later move members elsewhere; the XOR
//! stays correct wherever they are, only no longer local.

use std::collections::BTreeMap;

use super::fragment::{encode_fragment, FragmentError, FragmentHeader};
use super::placement::{ranking, OsdSlot};

/// `a ^= b` byte by byte (equal lengths: all fragments of an object are).
pub fn xor_into(acc: &mut [u8], b: &[u8]) {
    for (x, y) in acc.iter_mut().zip(b) {
        *x ^= *y;
    }
}

/// The local parities of an object whose fragment files are `files`, fragment `i` on OSD
/// `placed[i]`: `(OSD, index, file)` for each domain with two or more fragments and a free
/// writable OSD. Local parity `g` gets index `k + m + g`, groups in order of their first index.
pub fn local_parities(
    key: &str,
    files: &[Vec<u8>],
    placed: &[u64],
    slots: &[OsdSlot],
) -> Result<Vec<(u64, u8, Vec<u8>)>, FragmentError> {
    let domain_of = |id: u64| slots.iter().find(|s| s.id == id).map(|s| s.domain.clone());
    let mut groups: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (index, osd) in placed.iter().enumerate() {
        if let Some(domain) = domain_of(*osd) {
            groups.entry(domain).or_default().push(index as u8);
        }
    }
    let mut groups: Vec<(String, Vec<u8>)> =
        groups.into_iter().filter(|(_, g)| g.len() >= 2).collect();
    groups.sort_by_key(|(_, g)| g[0]);
    let mut used: Vec<u64> = placed.to_vec();
    let mut out = Vec::new();
    for (g, (domain, members)) in groups.into_iter().enumerate() {
        let index = placed.len() + g;
        let Ok(index) = u8::try_from(index) else {
            break;
        };
        let candidates: Vec<OsdSlot> = slots
            .iter()
            .filter(|s| s.domain == domain && s.writable && !used.contains(&s.id))
            .cloned()
            .collect();
        let Some(osd) = ranking(key, usize::from(index), &candidates)
            .first()
            .map(|s| s.id)
        else {
            continue;
        };
        let mut header: Option<FragmentHeader> = None;
        let mut parity: Vec<u8> = Vec::new();
        for member in &members {
            let file = &files[usize::from(*member)];
            let h = FragmentHeader::decode(file)?;
            let data = &file[h.data_offset() as usize..h.table_offset() as usize];
            if header.is_none() {
                parity = data.to_vec();
            } else {
                xor_into(&mut parity, data);
            }
            header.get_or_insert(h);
        }
        let Some(header) = header else { continue };
        let file = encode_fragment(
            &FragmentHeader {
                index,
                local_group: members,
                ..header
            },
            &parity,
        )?;
        used.push(osd);
        out.push((osd, index, file));
    }
    Ok(out)
}

//! The `ec` store's read path: finding an object's newest readable version on the OSDs, and
//! reading ranges of it, decoding around fragments that are unreachable or corrupt (see the
//! `store` module docs for the rules).

use std::collections::{BTreeSet, HashMap};

use super::codec::{codec, CodecId};
use super::fragment::TOMBSTONE_INDEX;
use super::layout::Layout;
use super::placement::{ranking, OsdSlot};
use super::store::{object_key, EcStore, Found, OsdEntry, OsdState};
use crate::osd::proto::{HeadEntry, Message};
use crate::{validate_name, BackendError, Result};

impl EcStore {
    /// Find the newest version of `name` with at least `k` fragments.
    ///
    /// Asked in rounds, so the usual case costs few requests and a moved or drained fragment is
    /// still found: first the two best-ranked OSDs of every fragment index among the OSDs that
    /// are up or draining (ranked regardless of weight, so a draining OSD is still asked where
    /// placement put its fragments); when that finds fewer than `k` fragments of any version,
    /// every other up or draining OSD; and only then the OSDs the map says are down (each
    /// costs at most the timeout). An OSD that is out is never asked.
    ///
    /// A tombstone (a delete) counts like a readable version: when the newest of those is a
    /// tombstone the object does not exist, whatever older fragments an OSD that missed the
    /// delete still holds. A lookup that found a tombstone does not ask the down OSDs.
    pub(super) fn find(&self, namespace: &str, name: &str) -> Result<Found> {
        let key = (namespace.to_string(), name.to_string());
        if let Some(found) = self.found.lock().get(&key) {
            return Ok(found.clone());
        }
        validate_name(namespace)?;
        validate_name(name)?;
        let osds = self.map.osds()?;
        let object = object_key(namespace, name);
        let live: Vec<OsdSlot> = osds
            .iter()
            .filter(|o| matches!(o.state, OsdState::Up | OsdState::Draining))
            .map(|o| OsdSlot {
                weight: if o.slot.weight > 0.0 {
                    o.slot.weight
                } else {
                    1.0
                },
                ..o.slot.clone()
            })
            .collect();
        let mut first: BTreeSet<u64> = BTreeSet::new();
        for index in 0..live.len().min(255) {
            for osd in ranking(&object, index, &live).into_iter().take(2) {
                first.insert(osd.id);
            }
        }
        let rest: BTreeSet<u64> = live
            .iter()
            .map(|s| s.id)
            .filter(|id| !first.contains(id))
            .collect();
        let down: BTreeSet<u64> = osds
            .iter()
            .filter(|o| o.state == OsdState::Down)
            .map(|o| o.slot.id)
            .collect();
        let mut versions: HashMap<u64, (HeadEntry, HashMap<u8, u64>)> = HashMap::new();
        // Every fragment seen, local parities and extra copies included: `(version, index, OSD)`.
        let mut seen: Vec<(u64, u8, u64)> = Vec::new();
        let mut unreachable = Vec::new();
        let mut tombstone: Option<u64> = None;
        for (round, is_down) in [(first, false), (rest, false), (down, true)] {
            let readable = versions
                .iter()
                .filter(|(_, (head, holders))| holders.len() >= usize::from(head.k))
                .map(|(version, _)| *version)
                .max();
            // Settled: a readable version newer than any tombstone seen, or (after asking every
            // OSD that is up) a tombstone.
            if readable > tombstone || (tombstone.is_some() && is_down) {
                break;
            }
            let targets = osds
                .iter()
                .filter(|o| round.contains(&o.slot.id))
                .map(|o| {
                    (
                        o.clone(),
                        Message::Head {
                            namespace: namespace.to_string(),
                            name: name.to_string(),
                        },
                    )
                })
                .collect::<Vec<_>>();
            if targets.is_empty() {
                continue;
            }
            for (entry, result) in self.call_all(targets)? {
                let Ok(Message::Heads { heads }) = result else {
                    unreachable.push(entry.slot.id);
                    continue;
                };
                seen.extend(heads.iter().map(|h| (h.version, h.index, entry.slot.id)));
                for head in heads
                    .iter()
                    .filter(|h| h.index == TOMBSTONE_INDEX && h.k == 0)
                {
                    tombstone = tombstone.max(Some(head.version));
                }
                // Local parities are for repair; reads and `k` count the code's fragments.
                for head in heads.into_iter().filter(|h| h.group.is_empty() && h.k > 0) {
                    let slot = versions
                        .entry(head.version)
                        .or_insert_with(|| (head.clone(), HashMap::new()));
                    slot.1.insert(head.index, entry.slot.id);
                }
            }
        }
        let newest_seen = versions
            .iter()
            .max_by_key(|(version, _)| **version)
            .map(|(_, (head, holders))| (holders.len(), head.k));
        let best = versions
            .into_iter()
            .filter(|(_, (head, holders))| holders.len() >= usize::from(head.k))
            .max_by_key(|(version, _)| *version)
            .filter(|(version, _)| Some(*version) > tombstone);
        if best.is_none() && tombstone.is_some() {
            // Deleted (and any newer version is a put still in progress, or a failed one).
            return Err(BackendError::NoSuchObject {
                namespace: namespace.to_string(),
                name: name.to_string(),
            });
        }
        let Some((version, (head, holders))) = best else {
            // Nothing readable. With every OSD answering and no fragment anywhere, the object
            // does not exist; otherwise it may, and saying so would make a caller treat lost
            // data as never written. (Out OSDs hold nothing the tier counts on.)
            if unreachable.is_empty() && newest_seen.is_none() {
                return Err(BackendError::NoSuchObject {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                });
            }
            let (seen, k) = newest_seen.unwrap_or((0, 0));
            return Err(BackendError::Unreadable {
                namespace: namespace.to_string(),
                name: name.to_string(),
                reason: format!(
                    "{seen} fragments reachable (k = {k}), OSDs {unreachable:?} unreachable"
                ),
            });
        };
        let found = Found {
            version,
            layout: Layout {
                size: head.object_size,
                k: u32::from(head.k),
                m: u32::from(head.m),
                fragment_size: head.fragment_size,
            },
            codec: CodecId(head.codec),
            // What the next put collects: all but the holders of this version (newer versions
            // with fewer than `k` fragments may be a put in progress: never collected).
            extra: seen
                .into_iter()
                .filter(|(v, index, osd)| {
                    *v < version || (*v == version && holders.get(index) != Some(osd))
                })
                .collect(),
            holders,
            settled: None,
        };
        self.found.lock().insert(key, found.clone());
        Ok(found)
    }

    /// Forget what [`find`](Self::find) cached for `name` (a read from a holder failed, or
    /// repair moved its fragments): the next read asks the OSDs again.
    pub(super) fn forget(&self, namespace: &str, name: &str) {
        self.found
            .lock()
            .remove(&(namespace.to_string(), name.to_string()));
    }

    pub(super) fn entry_of(osds: &[OsdEntry], id: u64) -> Option<OsdEntry> {
        osds.iter().find(|o| o.slot.id == id).cloned()
    }

    /// Read `[offset, offset + len)` of fragment `index` of `found` from its OSD. A holder
    /// that is out is never asked; one that is down only `with_down` (it costs the timeout if
    /// it really is down, so a read first goes around it).
    fn read_fragment_ranges(
        &self,
        namespace: &str,
        name: &str,
        found: &Found,
        osds: &[OsdEntry],
        reads: Vec<(u8, u64, u64)>,
        with_down: bool,
    ) -> Result<Vec<Result<Vec<u8>>>> {
        let mut targets = Vec::new();
        let mut missing = Vec::new();
        for (i, (index, offset, len)) in reads.iter().enumerate() {
            match found
                .holders
                .get(index)
                .and_then(|id| Self::entry_of(osds, *id))
                .filter(|e| match e.state {
                    OsdState::Up | OsdState::Draining => true,
                    OsdState::Down => with_down,
                    OsdState::Out => false,
                }) {
                Some(entry) => targets.push((
                    entry,
                    Message::GetRange {
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        version: found.version,
                        index: *index,
                        offset: *offset,
                        len: u32::try_from(*len).unwrap_or(u32::MAX),
                    },
                )),
                None => missing.push(i),
            }
        }
        let mut answers = self.call_all(targets)?.into_iter();
        let mut out = Vec::with_capacity(reads.len());
        for (i, read) in reads.iter().enumerate() {
            if missing.contains(&i) {
                out.push(Err(BackendError::Osd {
                    addr: "-".into(),
                    reason: format!(
                        "no reachable OSD holds fragment {} of {namespace}/{name}",
                        read.0
                    ),
                }));
                continue;
            }
            out.push(match answers.next() {
                Some((_, Ok(Message::Data { data }))) => Ok(data.to_vec()),
                Some((_, Ok(other))) => Err(BackendError::Osd {
                    addr: "-".into(),
                    reason: format!("answered GetRange with {}", other.name()),
                }),
                Some((_, Err(e))) => Err(e),
                None => Err(BackendError::Osd {
                    addr: "-".into(),
                    reason: "missing answer".into(),
                }),
            });
        }
        Ok(out)
    }

    /// Fragment `index`'s bytes `[offset, offset + len)` rebuilt from `k` other fragments.
    fn degraded_read(
        &self,
        namespace: &str,
        name: &str,
        found: &Found,
        osds: &[OsdEntry],
        (index, offset, len): (u8, u64, u64),
    ) -> Result<Vec<u8>> {
        let (k, m) = (found.layout.k as usize, found.layout.m as usize);
        let others: Vec<u8> = (0..(k + m) as u8).filter(|i| *i != index).collect();
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; k + m];
        // First around the OSDs the map says are down; then, if that is not enough, them too.
        for with_down in [false, true] {
            let wanted: Vec<u8> = others
                .iter()
                .copied()
                .filter(|i| shards[usize::from(*i)].is_none())
                .collect();
            let reads = wanted.iter().map(|i| (*i, offset, len)).collect();
            let answers =
                self.read_fragment_ranges(namespace, name, found, osds, reads, with_down)?;
            for (i, answer) in wanted.iter().zip(answers) {
                match answer {
                    Ok(data) if data.len() as u64 == len => shards[usize::from(*i)] = Some(data),
                    _ => {}
                }
            }
            if shards.iter().flatten().count() >= k {
                break;
            }
        }
        let code = codec(found.codec, k, m).map_err(|e| BackendError::Corrupt {
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        code.reconstruct(&mut shards, true)
            .map_err(|e| BackendError::Unreadable {
                namespace: namespace.to_string(),
                name: name.to_string(),
                reason: format!("fragment {index} is lost and the others do not decode: {e}"),
            })?;
        shards[usize::from(index)]
            .take()
            .ok_or_else(|| BackendError::Corrupt {
                namespace: namespace.to_string(),
                name: name.to_string(),
                reason: format!("fragment {index} was not rebuilt"),
            })
    }

    /// Read `[offset, offset + buf.len())` of the version `found` describes. A fragment that
    /// cannot be read is decoded from the others, and the cached holders are forgotten so the
    /// next read finds the fragments again.
    pub(super) fn read_found(
        &self,
        namespace: &str,
        name: &str,
        found: &Found,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let len = buf.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > found.layout.size)
        {
            return Err(BackendError::RangeOutOfBounds {
                namespace: namespace.to_string(),
                name: name.to_string(),
                offset,
                len,
                size: found.layout.size,
            });
        }
        let osds = self.map.osds()?;
        let pieces = found.layout.locate(offset, len);
        let reads = pieces
            .iter()
            .map(|p| (p.index as u8, p.fragment_offset, p.len))
            .collect();
        let answers = self.read_fragment_ranges(namespace, name, found, &osds, reads, false)?;
        for (piece, answer) in pieces.iter().zip(answers) {
            let data = match answer {
                Ok(data) if data.len() as u64 == piece.len => data,
                failed => {
                    if let Err(e) = &failed {
                        tracing::warn!(
                            "{namespace}/{name}: fragment {} unreadable ({e}); decoding from the others",
                            piece.index
                        );
                    }
                    self.forget(namespace, name);
                    self.degraded_read(
                        namespace,
                        name,
                        found,
                        &osds,
                        (piece.index as u8, piece.fragment_offset, piece.len),
                    )?
                }
            };
            let at = (piece.object_offset - offset) as usize;
            buf[at..at + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}

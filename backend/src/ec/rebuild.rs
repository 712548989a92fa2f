//! Rebuilding lost fragments (part of the repair executor, see `repair`): from a local parity
//! and the rest of its group when one covers the fragment (its own domain alone), otherwise
//! from `k` survivors through the code. Either way the rebuilt fragment gets the survivors'
//! header (same version, object size and codec; only the index differs).

use super::{EcStore, Run};
use crate::ec::codec::{codec, CodecId};
use crate::ec::fragment::{encode_fragment, FragmentHeader};
use crate::ec::inspect::Observed;
use crate::ec::local::xor_into;
use crate::ec::plan::Plan;
use crate::ec::store::{OsdEntry, OsdState};
use crate::osd::proto::Message;
use crate::{BackendError, Result};

impl EcStore {
    /// Rebuild fragment `index` onto `to` from a local parity and the rest of its group, if
    /// every one of them has a sound copy: `Ok(false)` when not (the code then rebuilds it).
    fn rebuild_local(
        &self,
        run: &mut Run<'_>,
        observed: &Observed,
        (version, index): (u64, u8),
        to: u64,
        skip: &[u8],
    ) -> Result<bool> {
        let name = observed.name.as_str();
        let Some(current) = observed.seen.versions.get(&version) else {
            return Ok(false);
        };
        let plan_osds = observed.plan_osds(run.osds);
        let sound = |i: u8| -> Option<&OsdEntry> {
            current
                .copies
                .get(&i)?
                .iter()
                .filter(|(id, h)| {
                    h.usable()
                        && plan_osds.iter().any(|o| {
                            o.slot.id == **id
                                && matches!(o.state, OsdState::Up | OsdState::Draining)
                        })
                })
                .filter_map(|(id, _)| run.osds.iter().find(|o| o.slot.id == *id))
                .min_by_key(|o| (o.state != OsdState::Up, o.slot.id))
        };
        // A local parity covering `index` whose other members are all there.
        let Some(sources) = observed
            .groups
            .iter()
            .filter(|((v, _), group)| *v == version && group.contains(&index))
            .find_map(|((_, parity), group)| {
                let mut sources = vec![(*parity, sound(*parity)?)];
                for member in group.iter().filter(|m| **m != index) {
                    if skip.contains(member) {
                        return None;
                    }
                    sources.push((*member, sound(*member)?));
                }
                Some(sources)
            })
        else {
            return Ok(false);
        };
        let dest = Self::osd(run, to)?;
        let targets = sources
            .iter()
            .map(|(i, entry)| {
                (
                    (*entry).clone(),
                    Message::GetFile {
                        namespace: run.namespace.to_string(),
                        name: name.to_string(),
                        version,
                        index: *i,
                    },
                )
            })
            .collect();
        let mut data: Option<Vec<u8>> = None;
        let mut header: Option<FragmentHeader> = None;
        for ((i, entry), (_, answer)) in sources.iter().zip(self.call_all(targets)?) {
            let Ok(Message::Data { data: file }) = answer else {
                return Ok(false);
            };
            let len = file.len() as u64;
            run.report.bytes_read += len;
            if entry.slot.domain != dest.slot.domain {
                run.report.cross_domain_bytes += len;
            }
            run.throttle.account(len);
            let h = match FragmentHeader::decode(&file) {
                Ok(h) if h.object_version == version && h.index == *i && len == h.file_len() => h,
                _ => return Ok(false),
            };
            let part = &file[h.data_offset() as usize..h.table_offset() as usize];
            match &mut data {
                None => data = Some(part.to_vec()),
                Some(acc) if acc.len() == part.len() => xor_into(acc, part),
                Some(_) => return Ok(false),
            }
            if !h.is_local_parity() {
                header.get_or_insert(h);
            }
        }
        let (Some(data), Some(header)) = (data, header) else {
            return Ok(false);
        };
        let file = encode_fragment(
            &FragmentHeader {
                index,
                local_group: Vec::new(),
                ..header
            },
            &data,
        )
        .map_err(|e| BackendError::Corrupt {
            namespace: run.namespace.to_string(),
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        self.put_file(run, name, (version, index), dest, file)?;
        run.report.fragments_rebuilt += 1;
        run.report.fragments_rebuilt_locally += 1;
        Ok(true)
    }

    /// Rebuild `targets` (index, destination) of `version`: from a local parity and its
    /// domain where one covers the index, otherwise from `k` surviving fragments.
    pub(super) fn rebuild(
        &self,
        run: &mut Run<'_>,
        observed: &Observed,
        plan: &Plan,
        version: u64,
        targets: &[(u8, u64)],
    ) -> Result<()> {
        let name = observed.name.as_str();
        let missing: Vec<u8> = targets.iter().map(|(i, _)| *i).collect();
        let mut rest = Vec::new();
        for (index, to) in targets {
            if !self.rebuild_local(run, observed, (version, *index), *to, &missing)? {
                rest.push((*index, *to));
            }
        }
        if rest.is_empty() {
            return Ok(());
        }
        let targets = &rest[..];
        let (k, m) = (usize::from(plan.k), usize::from(plan.m));
        let dest_domains: Vec<&str> = targets
            .iter()
            .filter_map(|(_, to)| Self::osd(run, *to).ok())
            .map(|o| o.slot.domain.as_str())
            .collect();
        let current = observed.seen.versions.get(&version);
        // Survivors: one sound copy per index not being rebuilt, local (destination's
        // domain) and up ones first.
        let plan_osds = observed.plan_osds(run.osds);
        let mut sources: Vec<(u8, &OsdEntry)> = Vec::new();
        for (index, copies) in current.into_iter().flat_map(|v| v.copies.iter()) {
            if targets.iter().any(|(i, _)| i == index) || usize::from(*index) >= k + m {
                continue;
            }
            let best = copies
                .iter()
                .filter(|(id, health)| {
                    health.usable()
                        && plan_osds.iter().any(|o| {
                            o.slot.id == **id
                                && matches!(o.state, OsdState::Up | OsdState::Draining)
                        })
                })
                .filter_map(|(id, _)| run.osds.iter().find(|o| o.slot.id == *id))
                .min_by_key(|o| {
                    (
                        !dest_domains.contains(&o.slot.domain.as_str()),
                        o.state != OsdState::Up,
                        o.slot.id,
                    )
                });
            if let Some(entry) = best {
                sources.push((*index, entry));
            }
        }
        sources.sort_by_key(|(index, o)| {
            (
                !dest_domains.contains(&o.slot.domain.as_str()),
                o.state != OsdState::Up,
                *index,
            )
        });
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; k + m];
        let mut header: Option<FragmentHeader> = None;
        let mut got = 0;
        let mut errors = Vec::new();
        let mut sources = sources.into_iter();
        // Read the k best survivors at once; if some fail, the next ones, until k are in.
        while got < k {
            let batch: Vec<(u8, &OsdEntry)> = sources.by_ref().take(k - got).collect();
            if batch.is_empty() {
                break;
            }
            let targets = batch
                .iter()
                .map(|(index, entry)| {
                    (
                        (*entry).clone(),
                        Message::GetFile {
                            namespace: run.namespace.to_string(),
                            name: name.to_string(),
                            version,
                            index: *index,
                        },
                    )
                })
                .collect();
            for ((index, entry), (_, answer)) in batch.iter().zip(self.call_all(targets)?) {
                let file = match answer {
                    Ok(Message::Data { data }) => data,
                    Ok(other) => {
                        errors.push(format!(
                            "fragment {index} on OSD {}: answered {}",
                            entry.slot.id,
                            other.name()
                        ));
                        continue;
                    }
                    Err(e) => {
                        errors.push(format!("fragment {index} on OSD {}: {e}", entry.slot.id));
                        continue;
                    }
                };
                let len = file.len() as u64;
                run.report.bytes_read += len;
                if dest_domains.iter().any(|d| *d != entry.slot.domain) {
                    run.report.cross_domain_bytes += len;
                }
                run.throttle.account(len);
                let h = match FragmentHeader::decode(&file) {
                    Ok(h)
                        if h.object_version == version
                            && h.index == *index
                            && file.len() as u64 == h.file_len() =>
                    {
                        h
                    }
                    _ => {
                        errors.push(format!(
                            "fragment {index} on OSD {}: not the fragment asked for",
                            entry.slot.id
                        ));
                        continue;
                    }
                };
                shards[usize::from(*index)] =
                    Some(file[h.data_offset() as usize..h.table_offset() as usize].to_vec());
                header.get_or_insert(h);
                got += 1;
            }
        }
        let header = match header {
            Some(h) if got >= k => h,
            _ => {
                return Err(BackendError::Osd {
                    addr: "-".into(),
                    reason: format!(
                        "{}/{name}: only {got} of the {k} fragments needed to rebuild could be read: {}",
                        run.namespace,
                        errors.join("; ")
                    ),
                })
            }
        };
        if header.data_len > 0 {
            let code = codec(CodecId(header.codec.0), k, m).map_err(|e| BackendError::Corrupt {
                namespace: run.namespace.to_string(),
                name: name.to_string(),
                reason: e.to_string(),
            })?;
            code.reconstruct(&mut shards, false)
                .map_err(|e| BackendError::Corrupt {
                    namespace: run.namespace.to_string(),
                    name: name.to_string(),
                    reason: format!("cannot rebuild: {e}"),
                })?;
        }
        for (index, to) in targets {
            let data = match header.data_len {
                0 => Vec::new(),
                _ => shards[usize::from(*index)].take().unwrap_or_default(),
            };
            let file = encode_fragment(
                &FragmentHeader {
                    index: *index,
                    local_group: Vec::new(),
                    ..header.clone()
                },
                &data,
            )
            .map_err(|e| BackendError::Corrupt {
                namespace: run.namespace.to_string(),
                name: name.to_string(),
                reason: e.to_string(),
            })?;
            let dest = Self::osd(run, *to)?;
            self.put_file(run, name, (version, *index), dest, file)?;
            run.report.fragments_rebuilt += 1;
        }
        Ok(())
    }
}

//! Scrubbing: reclaiming the backend space that overwrites, trims and snapshot deletions free.
//!
//! # What is live
//! The snapshots cut the backend TLogs into *regions* (the TLogs up to the first snapshot, then
//! up to the next, ..., then those after the last snapshot). Within a region only the last write
//! to each cluster can ever be read (by that snapshot or by the live volume), so each region
//! reduces to a *summary*: per cluster its last location, or trimmed. A cluster location is live
//! if some summary holds it; every other cluster of a SCO is garbage. Deleting a snapshot merges
//! two regions, which is how it frees space.
//!
//! # What a scrub does
//! 1. Reads every backend TLog and builds the summaries (off the I/O path, no lock held).
//! 2. Picks the SCOs whose live fraction is below [`FILL_RATIO`]: with nothing live they are
//!    deleted; otherwise their live clusters are copied, in order, into a new object of the
//!    same SCO number with the version bumped (`00_NNNNNNNN_VV+1`). Copies are rate-limited.
//! 3. Writes each changed region as one TLog (TRIM ranges, then LOC entries with the relocations
//!    applied) under the region's last TLog number and a bumped *generation*, which is part of
//!    the object name: nothing live is overwritten.
//! 4. Commits by putting the new backend TLog list, under the list lock and only if no rollback
//!    or other rewrite happened meanwhile (else it gives up; a re-run starts over), and applies
//!    the relocations to the live map where it still points at the old location.
//! 5. Deletes the replaced TLogs and SCOs, then sweeps the namespace: every SCO or TLog object
//!    older than the newest one the list references and not referenced by it is removed.
//!
//! # Crash safety
//! Until step 4 nothing the volume reads has changed, so `kill -9` anywhere before it leaves only
//! unreferenced new objects; after it, only unreferenced old ones. Either way the next run's
//! sweep deletes them: no data is lost and no space leaks.
//!
//! # Clones
//! A clone reads its parent's SCOs as they were when it was made, so no SCO referenced by a
//! region up to the newest snapshot that has clones is ever rewritten or deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::Serialize;
use vstor_backend::BackendError;

use super::state::{sco_path, ScoState};
use super::Volume;
use crate::config::TLogRecord;
use crate::config::TLOG_LIST_OBJECT;
use crate::error::{Result, VolumeError};
use crate::sco::{self, ScoHeader, SCO_HEADER_LEN};
use crate::tlog::{self, Entry};
use crate::types::{ClusterLocation, ScoName, ScoNumber, TLogNumber};

/// SCOs with less than this fraction of live clusters are rewritten.
pub const FILL_RATIO: f64 = 0.9;

/// Where a scrub is, for progress reports.
#[derive(Debug, Clone, Serialize)]
pub struct ScrubProgress {
    pub phase: &'static str,
    pub done: u64,
    pub total: u64,
}

/// What a scrub did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScrubReport {
    pub tlogs_before: usize,
    pub tlogs_after: usize,
    pub scos_rewritten: u64,
    pub scos_deleted: u64,
    pub bytes_copied: u64,
    pub bytes_freed: u64,
    pub orphans_deleted: u64,
}

/// The reduced content of one snapshot region.
#[derive(Default)]
struct Summary {
    /// Indexes into the record list.
    first: usize,
    last: usize,
    locations: BTreeMap<u64, ClusterLocation>,
    /// Trimmed cluster ranges `[start, end)`, merged.
    trims: BTreeMap<u64, u64>,
}

impl Summary {
    fn trim(&mut self, start: u64, count: u64) {
        let end = start + count;
        let doomed: Vec<u64> = self.locations.range(start..end).map(|(a, _)| *a).collect();
        for address in doomed {
            self.locations.remove(&address);
        }
        let (mut start, mut end) = (start, end);
        let overlapping: Vec<(u64, u64)> = self
            .trims
            .range(..=end)
            .filter(|(s, e)| **e >= start && **s <= end)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in overlapping {
            self.trims.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.trims.insert(start, end);
    }

    fn entries(&self, relocate: &HashMap<(u32, u8, u16), u16>) -> Vec<Entry> {
        let mut entries: Vec<Entry> = self
            .trims
            .iter()
            .map(|(s, e)| Entry::Trim {
                start: *s,
                count: e - s,
            })
            .collect();
        entries.extend(self.locations.iter().map(|(address, location)| Entry::Loc {
            address: *address,
            location: relocated(*location, relocate),
        }));
        entries
    }
}

fn key(location: ClusterLocation) -> (u32, u8) {
    (location.sco_number().0, location.version())
}

fn relocated(
    location: ClusterLocation,
    relocate: &HashMap<(u32, u8, u16), u16>,
) -> ClusterLocation {
    if location.clone_id() != 0 {
        return location;
    }
    let (number, version) = key(location);
    match relocate.get(&(number, version, location.offset())) {
        Some(offset) => ClusterLocation::new(
            ScoName {
                clone_id: 0,
                number: ScoNumber(number),
                version: version + 1,
            },
            *offset,
        ),
        None => location,
    }
}

enum Fate {
    Delete,
    Rewrite(Vec<u16>),
}

impl Volume {
    /// Scrub the volume (see the module docs). `rate` bounds the bytes copied per second;
    /// `progress` is called as work proceeds.
    pub fn scrub(
        &self,
        rate: Option<u64>,
        progress: &mut dyn FnMut(ScrubProgress),
    ) -> Result<ScrubReport> {
        let _one = self.scrub_lock.lock();
        self.check_fence()?;
        let (records, snapshots, epoch, namespace, owner, covered) = {
            let st = self.state.lock();
            self.check_usable(&st)?;
            (
                st.backend_tlogs.tlogs.clone(),
                st.meta.snapshots.clone(),
                st.epoch,
                st.config.namespace.clone(),
                st.config.owner_tag,
                // What this scrub looks at: garbage counted so far, minus what is in TLogs not
                // on the backend yet (left for a later scrub).
                st.garbage_clusters
                    .saturating_sub(Self::garbage_not_uploaded(&st)),
            )
        };
        let backend_error = VolumeError::backend(&self.name);
        let mut report = ScrubReport {
            tlogs_before: records.len(),
            tlogs_after: records.len(),
            ..ScrubReport::default()
        };

        // 1. Summaries per snapshot region.
        let mut boundaries: Vec<u64> = snapshots.iter().map(|s| s.tlog).collect();
        boundaries.sort_unstable();
        boundaries.dedup();
        let pinned_until = snapshots
            .iter()
            .filter(|s| !s.clones.is_empty())
            .map(|s| s.tlog)
            .max();
        let mut summaries: Vec<Summary> = Vec::new();
        let mut region_of_last: Option<usize> = None;
        for (index, record) in records.iter().enumerate() {
            let region = boundaries.partition_point(|b| *b < record.number);
            let summary = match summaries.last_mut() {
                Some(summary) if region_of_last == Some(region) => summary,
                _ => {
                    region_of_last = Some(region);
                    summaries.push(Summary {
                        first: index,
                        ..Summary::default()
                    });
                    let last = summaries.len() - 1;
                    &mut summaries[last]
                }
            };
            summary.last = index;
            let object = record.object_name();
            let bytes = self
                .backend
                .get(&namespace, &object)
                .map_err(VolumeError::backend(&self.name))?;
            let parsed = tlog::parse(&bytes, true).map_err(|e| {
                VolumeError::corrupt(&self.name, format!("backend TLog {object}"), e)
            })?;
            for entry in parsed.entries {
                match entry {
                    Entry::Loc { address, location } => {
                        summary.locations.insert(address, location);
                    }
                    Entry::Trim { start, count } => summary.trim(start, count),
                    _ => {}
                }
            }
            progress(ScrubProgress {
                phase: "reading TLogs",
                done: index as u64 + 1,
                total: records.len() as u64,
            });
        }

        // 2. Live clusters per SCO, pinned SCOs, and the fate of each SCO.
        let mut live: HashMap<(u32, u8), BTreeSet<u16>> = HashMap::new();
        let mut pinned: BTreeSet<u32> = BTreeSet::new();
        for summary in &summaries {
            let pin = pinned_until.is_some_and(|until| records[summary.first].number <= until);
            for location in summary.locations.values().filter(|l| l.clone_id() == 0) {
                live.entry(key(*location))
                    .or_default()
                    .insert(location.offset());
                if pin {
                    pinned.insert(location.sco_number().0);
                }
            }
        }
        let mut fates: BTreeMap<(u32, u8), Fate> = BTreeMap::new();
        let own: BTreeSet<(u32, u8)> = records
            .iter()
            .flat_map(|r| r.scos.iter().map(move |n| (*n, r.sco_version(*n))))
            .collect();
        for &(number, version) in &own {
            if pinned.contains(&number) {
                continue;
            }
            let name = ScoName {
                clone_id: 0,
                number: ScoNumber(number),
                version,
            };
            let total = match self.backend.size(&namespace, &name.to_string()) {
                Ok(size) => size.saturating_sub(SCO_HEADER_LEN) / self.cluster_size,
                Err(BackendError::NoSuchObject { .. }) => 0,
                Err(e) => return Err(backend_error(e)),
            };
            let offsets = live.get(&(number, version));
            let alive = offsets.map_or(0, |o| o.len() as u64);
            if alive == 0 {
                fates.insert((number, version), Fate::Delete);
                report.bytes_freed += total * self.cluster_size;
            } else if (alive as f64) < FILL_RATIO * total as f64 && version < u8::MAX {
                let offsets = offsets
                    .map(|o| o.iter().copied().collect())
                    .unwrap_or_default();
                fates.insert((number, version), Fate::Rewrite(offsets));
                report.bytes_freed += (total - alive) * self.cluster_size;
            }
        }

        // 3. Copy the live clusters of rewritten SCOs into their next version.
        let started = Instant::now();
        let mut relocate: HashMap<(u32, u8, u16), u16> = HashMap::new();
        let rewrites = fates
            .values()
            .filter(|f| matches!(f, Fate::Rewrite(_)))
            .count() as u64;
        for (&(number, version), fate) in &fates {
            let Fate::Rewrite(offsets) = fate else {
                report.scos_deleted += 1;
                continue;
            };
            let old = ScoName {
                clone_id: 0,
                number: ScoNumber(number),
                version,
            };
            let new = ScoName {
                version: version + 1,
                ..old
            };
            let bytes = self
                .backend
                .get(&namespace, &old.to_string())
                .map_err(VolumeError::backend(&self.name))?;
            let cs = self.cluster_size as usize;
            let mut out = ScoHeader {
                cluster_size: self.cluster_size as u32,
                sco: new,
                namespace: namespace.clone(),
            }
            .encode();
            for (new_offset, old_offset) in offsets.iter().enumerate() {
                let at = sco::cluster_offset(u64::from(*old_offset), self.cluster_size) as usize;
                let Some(cluster) = bytes.get(at..at + cs) else {
                    return Err(VolumeError::corrupt(
                        &self.name,
                        format!("backend SCO {old}"),
                        format!("too short for live cluster {old_offset}"),
                    ));
                };
                out.extend_from_slice(cluster);
                relocate.insert((number, version, *old_offset), new_offset as u16);
            }
            // Fenced meanwhile: not one more object (see `set_fenced`).
            self.check_fence()?;
            self.backend
                .put_if_owner(&namespace, &new.to_string(), &out, owner)
                .map_err(VolumeError::backend(&self.name))?;
            report.scos_rewritten += 1;
            report.bytes_copied += (offsets.len() * cs) as u64;
            progress(ScrubProgress {
                phase: "rewriting SCOs",
                done: report.scos_rewritten,
                total: rewrites,
            });
            if let Some(rate) = rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(report.bytes_copied as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }

        // 4. One TLog per changed region.
        let mut replaced: Vec<(usize, usize, TLogRecord)> = Vec::new();
        for summary in &summaries {
            let touches = summary
                .locations
                .values()
                .any(|l| l.clone_id() == 0 && fates.contains_key(&key(*l)))
                || records[summary.first..=summary.last].iter().any(|r| {
                    r.scos
                        .iter()
                        .any(|n| fates.contains_key(&(*n, r.sco_version(*n))))
                });
            if summary.first == summary.last && !touches {
                continue;
            }
            let region = &records[summary.first..=summary.last];
            let number = records[summary.last].number;
            let mut record = TLogRecord::new(number);
            record.generation = region.iter().map(|r| r.generation).max().unwrap_or(0) + 1;
            let entries = summary.entries(&relocate);
            let mut scos = BTreeMap::new();
            for entry in &entries {
                if let Entry::Loc { location, .. } = entry {
                    if location.clone_id() == 0 {
                        scos.insert(location.sco_number().0, location.version());
                    }
                }
            }
            // A SCO keeps being listed by its region even with nothing live, so the sweep
            // never mistakes a pinned or untouched one for garbage.
            for r in region {
                for n in &r.scos {
                    let v = r.sco_version(*n);
                    if !fates.contains_key(&(*n, v)) {
                        scos.entry(*n).or_insert(v);
                    }
                }
            }
            record.scos = scos.keys().copied().collect();
            record.sco_versions = scos.into_iter().filter(|(_, v)| *v > 0).collect();
            record.data_bytes = summary
                .locations
                .values()
                .filter(|l| l.clone_id() == 0)
                .count() as u64
                * self.cluster_size;
            let bytes = tlog::encode_closed(TLogNumber(number), &entries);
            self.check_fence()?;
            self.backend
                .put_if_owner(&namespace, &record.object_name(), &bytes, owner)
                .map_err(VolumeError::backend(&self.name))?;
            replaced.push((summary.first, summary.last, record));
        }

        // 5. Commit.
        let old_objects: Vec<String> = {
            // The list lock (not the state lock) is held across the list put: every change of
            // `backend_tlogs` takes it, so the list built here stays current until committed.
            let _list = self.list_lock.lock();
            // Fenced since the scrub began: the objects it put stay unreferenced (a later sweep
            // of the owner's removes them), and the list is not touched.
            self.check_fence()?;
            let (tlogs, list, changes, old_objects) = {
                let st = self.state.lock();
                self.check_usable(&st)?;
                if st.epoch != epoch || !st.backend_tlogs.tlogs.starts_with(&records) {
                    return Err(VolumeError::Refused {
                        volume: self.name.clone(),
                        reason: "the volume was rolled back during the scrub; run it again".into(),
                    });
                }
                let mut tlogs: Vec<TLogRecord> = Vec::new();
                let mut next = 0;
                let mut old_objects = Vec::new();
                for (first, last, record) in &replaced {
                    tlogs.extend_from_slice(&records[next..*first]);
                    old_objects.extend(
                        records[*first..=*last]
                            .iter()
                            .map(super::super::config::TLogRecord::object_name),
                    );
                    tlogs.push(record.clone());
                    next = last + 1;
                }
                tlogs.extend_from_slice(&st.backend_tlogs.tlogs[next..]);
                let mut list = Self::backend_list(&st);
                list.tlogs = tlogs.clone();
                (tlogs, list, st.list_changes, old_objects)
            };
            self.backend
                .put_if_owner(&namespace, TLOG_LIST_OBJECT, &list.encode(), owner)
                .map_err(backend_error)?;
            let mut st = self.state.lock();
            st.backend_tlogs.tlogs = tlogs;
            st.epoch += 1;
            // A snapshot change made while the list was in flight is still to be put.
            if st.list_changes == changes {
                st.list_dirty = false;
            }
            report.tlogs_after = st.backend_tlogs.tlogs.len();
            // A cluster the live map still takes from a rewritten SCO (whatever region wrote it)
            // now reads its new version.
            for summary in &summaries {
                for (address, location) in &summary.locations {
                    let moved = relocated(*location, &relocate);
                    if moved != *location && st.map.get(*address) == *location {
                        st.map.set(*address, moved);
                    }
                }
            }
            for &(number, _) in fates.keys().filter(|(_, v)| *v == 0) {
                let cached = st
                    .scos
                    .get(&ScoNumber(number))
                    .is_some_and(|s| s.state == ScoState::Disposable);
                if cached {
                    if let Some(local) = st.scos.remove(&ScoNumber(number)) {
                        let bytes = SCO_HEADER_LEN + local.clusters * self.cluster_size;
                        st.disposable_bytes = st.disposable_bytes.saturating_sub(bytes);
                        let _ = self
                            .fs
                            .remove(&sco_path(&self.dir, ScoName::new(ScoNumber(number))));
                    }
                }
            }
            st.garbage_clusters = st.garbage_clusters.saturating_sub(covered);
            old_objects
        };

        // 6. Delete what the list no longer references, then sweep. Fenced meanwhile, it stops
        // (what it leaves is garbage the owner's next sweep finds).
        for object in old_objects {
            self.check_fence()?;
            let _ = self.backend.delete_if_owner(&namespace, &object, owner);
        }
        let rewritten: Vec<ScoName> = fates
            .keys()
            .map(|&(number, version)| ScoName {
                clone_id: 0,
                number: ScoNumber(number),
                version,
            })
            .collect();
        for name in &rewritten {
            self.check_fence()?;
            let _ = self
                .backend
                .delete_if_owner(&namespace, &name.to_string(), owner);
        }
        // After the deletes: a read planned on the old map before the switch cannot put them
        // back (the objects are gone).
        self.forget_cached_scos(&namespace, &rewritten);
        report.orphans_deleted = self.sweep()?;
        progress(ScrubProgress {
            phase: "done",
            done: 1,
            total: 1,
        });
        tracing::info!(volume = %self.name, ?report, "scrub done");
        Ok(report)
    }

    /// Delete every SCO and TLog object the backend list does not reference and that no upload
    /// can still add to it: anything older than the newest object the list references, anything
    /// a rollback dropped (below the DTL floor, or in a dropped TLog range), but never a SCO the
    /// write buffer still has to upload. These are the leftovers of interrupted scrubs and
    /// rollbacks. Returns how many were deleted.
    pub fn sweep(&self) -> Result<u64> {
        let _list = self.list_lock.lock();
        self.check_fence()?;
        let (referenced_tlogs, referenced_scos, pending, newest_tlog, newest_sco, meta) = {
            let st = self.state.lock();
            let records = &st.backend_tlogs.tlogs;
            let tlogs: BTreeSet<String> = records
                .iter()
                .map(super::super::config::TLogRecord::object_name)
                .collect();
            let scos: BTreeSet<(u32, u8)> = records
                .iter()
                .flat_map(|r| r.scos.iter().map(move |n| (*n, r.sco_version(*n))))
                .collect();
            let pending: BTreeSet<u32> = st
                .scos
                .iter()
                .filter(|(_, s)| s.state != ScoState::Disposable)
                .map(|(n, _)| n.0)
                .collect();
            (
                tlogs,
                scos.clone(),
                pending,
                st.backend_tlogs.last_number(),
                scos.iter()
                    .map(|(n, _)| *n)
                    .max()
                    .unwrap_or(0)
                    .max(st.meta.dtl_floor.0.saturating_sub(1)),
                st.meta.clone(),
            )
        };
        let (namespace, owner) = {
            let st = self.state.lock();
            (st.config.namespace.clone(), st.config.owner_tag)
        };
        let mut deleted = 0;
        let objects = self
            .backend
            .list(&namespace)
            .map_err(VolumeError::backend(&self.name))?;
        for object in objects {
            let garbage = if let Some(sco) = ScoName::parse(&object) {
                sco.clone_id == 0
                    && sco.number.0 <= newest_sco
                    && !pending.contains(&sco.number.0)
                    && !referenced_scos.contains(&(sco.number.0, sco.version))
            } else if let Some(number) = super::snapshots::tlog_number_of(&object) {
                (number <= newest_tlog || meta.is_dropped(number))
                    && !referenced_tlogs.contains(&object)
            } else {
                false
            };
            if garbage {
                self.check_fence()?;
                self.backend
                    .delete_if_owner(&namespace, &object, owner)
                    .map_err(VolumeError::backend(&self.name))?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Clusters overwritten or trimmed since the last scrub: an estimate of the garbage a scrub
    /// would find (snapshots may keep some of it alive).
    pub fn garbage_bytes(&self) -> u64 {
        self.state.lock().garbage_clusters * self.cluster_size
    }
}

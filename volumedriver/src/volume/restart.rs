//! Restart: rebuild the map from the backend's TLogs and then the write buffer's, and recover an
//! unclosed TLog left by a crash.
//!
//! The backend list is the source of truth; local TLogs newer than it are replayed on top. A
//! closed local TLog whose SCOs do not match their CRCs, or an unclosed one, is cut back to its
//! last verified SYNC and resealed (`reseal_after_crash`); anything after a torn TLog is
//! dropped, because later TLogs could depend on it. Files nothing references are deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::config::TLogRecord;
use crate::error::{Result, VolumeError};
use crate::sco::{self, SCO_HEADER_LEN};
use crate::tlog::{self, Entry};
use crate::types::{ScoName, ScoNumber, TLogNumber};

use super::dtl_link::Position;
use super::mds_link::MapSeed;
use super::state::{sco_path, ClosedTLog, LocalSco, ScoState, State, SCO_DIR, TLOG_DIR};
use super::upload::UploadTask;
use super::Volume;

impl Volume {
    pub(super) fn rebuild(&self, st: &mut State, seed: Option<MapSeed>) -> Result<()> {
        let name = self.name.clone();
        let namespace = st.config.namespace.clone();
        let mut backend_scos = BTreeSet::new();
        // A rollback that was killed after writing its decision down but before rewriting the
        // backend list: finish it here.
        let before = st.backend_tlogs.tlogs.len();
        let meta = st.meta.clone();
        st.backend_tlogs
            .tlogs
            .retain(|r| !meta.is_dropped(r.number));
        if st.backend_tlogs.tlogs.len() != before {
            st.list_dirty = true;
            st.list_changes += 1;
        }
        let records = st.backend_tlogs.tlogs.clone();
        st.applied_end = st.applied_end.max(Position::from_pair(st.meta.dtl_floor));
        // A map seeded from an MDS stands for the replay of the first `seeded` records.
        let seeded = self.apply_seed(st, &records, seed);
        st.opened_seeded = seeded as u64;
        st.opened_replayed = (records.len() - seeded) as u64;
        // The TLogs after the seed, applied in list order while the next few are fetched and
        // verified (on S3 or the EC tier each is a round trip).
        let replayed = &records[seeded..];
        vstor_backend::prefetch::in_order(
            replayed.len(),
            vstor_backend::prefetch::DEFAULT_DEPTH,
            |index| {
                let object = replayed[index].object_name();
                let bytes = self
                    .backend
                    .get(&namespace, &object)
                    .map_err(VolumeError::backend(&name))?;
                let parsed = tlog::parse(&bytes, true).map_err(|e| {
                    VolumeError::corrupt(&name, format!("backend TLog {object}"), e)
                })?;
                Ok((object, parsed.entries))
            },
            |_, (object, entries)| {
                st.garbage_clusters += self.apply_entries(st, &entries, &object)?;
                Ok(())
            },
        )?;
        // What the whole list says, seeded or replayed (every step is a maximum, so order
        // against the replay above does not matter).
        for record in &records {
            backend_scos.extend(record.scos.iter().map(|n| (*n, record.sco_version(*n))));
            if let Some(newest) = record.scos.iter().max() {
                // Every SCO of an uploaded TLog is complete: nothing in it is left to replay.
                st.applied_end = st.applied_end.max(Position::new(*newest, u32::MAX));
            }
            st.next_tlog = st.next_tlog.max(record.number + 1);
        }
        if let Some((max, _)) = backend_scos.last() {
            st.next_sco = st.next_sco.max(max + 1);
        }
        // Numbers handed out before a rollback are never reused.
        st.next_sco = st.next_sco.max(st.meta.dtl_floor.0);
        if let Some(end) = st.meta.dropped.iter().map(|(_, to)| *to).max() {
            st.next_tlog = st.next_tlog.max(end + 1);
        }
        // Nor a TLog number a snapshot ends at: a power cut can keep the snapshot's record but
        // lose the TLog it closed, and a new TLog under that number would change the snapshot.
        if let Some(end) = st.meta.snapshots.iter().map(|s| s.tlog).max() {
            st.next_tlog = st.next_tlog.max(end + 1);
        }
        let last_backend_tlog = records.last().map_or(0, |r| r.number);

        // Local TLogs newer than the backend's, oldest first.
        let tlog_dir = self.dir.join(TLOG_DIR);
        let mut local_tlogs: Vec<(TLogNumber, PathBuf)> = Vec::new();
        for file_name in self
            .fs
            .list(&tlog_dir)
            .map_err(VolumeError::io(&name, &tlog_dir))?
        {
            let path = tlog_dir.join(&file_name);
            match TLogNumber::parse_object_name(&file_name) {
                Some(number) => local_tlogs.push((number, path)),
                None => {
                    let _ = self.fs.remove(&path);
                }
            }
        }
        local_tlogs.sort();
        let mut pending_scos = BTreeSet::new();
        let mut torn = false;
        for (number, path) in local_tlogs {
            if number.0 <= last_backend_tlog || torn || st.meta.is_dropped(number.0) {
                self.fs
                    .remove(&path)
                    .map_err(VolumeError::io(&name, &path))?;
                continue;
            }
            let bytes = self.fs.read(&path).map_err(VolumeError::io(&name, &path))?;
            let parsed = match tlog::parse(&bytes, false) {
                Ok(parsed) if parsed.number == number => parsed,
                _ => {
                    // Not even a valid header: created, but nothing in it was ever synced.
                    self.fs
                        .remove(&path)
                        .map_err(VolumeError::io(&name, &path))?;
                    torn = true;
                    continue;
                }
            };
            let entries = match (parsed.closed, self.first_bad_sco(st, &parsed.entries)) {
                (true, None) => parsed.entries,
                (true, Some(reason)) => {
                    tracing::warn!(
                        volume = %name,
                        tlog = %number.object_name(),
                        %reason,
                        "closed TLog describes data that did not reach the disk; keeping its synced prefix"
                    );
                    torn = true;
                    let prefix = tlog::parse_synced_prefix(&bytes)
                        .map_err(|e| VolumeError::corrupt(&name, path.display().to_string(), e))?;
                    self.reseal_after_crash(st, number, &path, prefix.entries)?
                }
                (false, _) => {
                    torn = true;
                    self.reseal_after_crash(st, number, &path, parsed.entries)?
                }
            };
            let garbage = self.apply_entries(st, &entries, &path.display().to_string())?;
            st.garbage_clusters += garbage;
            let mut record = TLogRecord::new(number.0);
            for entry in &entries {
                if let Entry::ScoCrc { sco, clusters, crc } = *entry {
                    let header = self.sco_header(st, sco);
                    let sco_file = sco_path(&self.dir, sco);
                    let (file, len) =
                        sco::open(self.fs.as_ref(), &sco_file, &header).map_err(|e| {
                            VolumeError::corrupt(&name, sco_file.display().to_string(), e)
                        })?;
                    let clusters = u64::from(clusters);
                    if len < sco::cluster_offset(clusters, self.cluster_size) {
                        return Err(VolumeError::corrupt(
                            &name,
                            sco_file.display().to_string(),
                            format!("holds fewer than the {clusters} clusters its TLog records"),
                        ));
                    }
                    st.scos.insert(
                        sco.number,
                        LocalSco {
                            file,
                            clusters,
                            state: ScoState::Sealed { crc },
                            dirty: true,
                            chunk_crcs: None,
                            last_write: 0,
                            copying: Vec::new(),
                        },
                    );
                    st.uploads.push_back(UploadTask::Sco(sco.number));
                    st.non_disposable_bytes += clusters * self.cluster_size;
                    record.scos.push(sco.number.0);
                    record.data_bytes += clusters * self.cluster_size;
                    pending_scos.insert(sco.number.0);
                    st.next_sco = st.next_sco.max(sco.number.0 + 1);
                }
            }
            let file = self.fs.open(&path).map_err(VolumeError::io(&name, &path))?;
            st.closed_tlogs.push_back(ClosedTLog {
                number,
                path,
                file,
                record,
                dirty: true,
                garbage,
            });
            st.uploads.push_back(UploadTask::TLog(number));
            st.next_tlog = st.next_tlog.max(number.0 + 1);
            // After a kill -9 neither the files nor their directory entries need be on disk
            // yet: the next FLUSH syncs both (the files are `dirty`).
            st.new_files = true;
        }

        // SCO files: cached copies of backend SCOs stay (disposable); anything else is debris of
        // writes that no surviving TLog entry references.
        let sco_dir = self.dir.join(SCO_DIR);
        let sco_files = self
            .fs
            .list(&sco_dir)
            .map_err(VolumeError::io(&name, &sco_dir))?;
        // No SCO number that names a file here is handed out again, debris included: removing
        // debris is a directory change, and a power cut before the next FLUSH syncs the
        // directory undoes it. The old file would then come back under a name a newer SCO (and
        // its backend object) has, and be taken for that SCO's cached copy.
        if let Some(max) = sco_files
            .iter()
            .filter_map(|file_name| ScoName::parse(file_name))
            .map(|sco| sco.number.0)
            .max()
        {
            st.next_sco = st.next_sco.max(max + 1);
        }
        for file_name in sco_files {
            let path = sco_dir.join(&file_name);
            let parsed = ScoName::parse(&file_name);
            let Some(sco) = parsed.filter(|s| s.clone_id == 0) else {
                let _ = self.fs.remove(&path);
                continue;
            };
            if pending_scos.contains(&sco.number.0) {
                continue;
            }
            if !backend_scos.contains(&(sco.number.0, sco.version)) {
                self.fs
                    .remove(&path)
                    .map_err(VolumeError::io(&name, &path))?;
                continue;
            }
            let header = self.sco_header(st, sco);
            match sco::open(self.fs.as_ref(), &path, &header) {
                Ok((file, len))
                    if len >= SCO_HEADER_LEN
                        && (len - SCO_HEADER_LEN).is_multiple_of(self.cluster_size) =>
                {
                    st.scos.insert(
                        sco.number,
                        LocalSco {
                            file,
                            clusters: (len - SCO_HEADER_LEN) / self.cluster_size,
                            state: ScoState::Disposable,
                            dirty: false,
                            chunk_crcs: None,
                            last_write: 0,
                            copying: Vec::new(),
                        },
                    );
                    st.disposable_bytes += len;
                }
                // A damaged cached copy is dropped: the backend has the SCO.
                _ => self
                    .fs
                    .remove(&path)
                    .map_err(VolumeError::io(&name, &path))?,
            }
        }
        // Make this restart's removals durable before anything new is written. Otherwise a
        // later power cut (with no FLUSH in between, e.g. after a kill -9 and another restart,
        // which no longer sees the file and hands its number out again) brings a removed file
        // back: old debris under the name of a newer SCO that reached the backend is then taken
        // for that SCO's cached copy (wrong data), and a removed TLog under a reused number
        // would replay entries nothing acknowledged.
        for dir in [&sco_dir, &tlog_dir] {
            self.fs.sync_dir(dir).map_err(VolumeError::io(&name, dir))?;
        }
        Ok(())
    }

    /// After a restart: a snapshot whose boundary TLog does not exist (a power cut kept its
    /// record but lost the TLog it closed, which held nothing a FLUSH had covered) ends at the
    /// newest TLog that does, which is the same content. Otherwise a restart from the backend
    /// alone would take it for a snapshot whose history never reached the backend and drop it.
    pub(super) fn settle_snapshots(&self, st: &mut State) -> Result<()> {
        let newest = st
            .closed_tlogs
            .back()
            .map_or(0, |t| t.number.0)
            .max(st.backend_tlogs.last_number());
        let mut changed = false;
        for snapshot in st.meta.snapshots.iter_mut().filter(|s| s.tlog > newest) {
            tracing::warn!(
                volume = %self.name,
                snapshot = %snapshot.name,
                from = snapshot.tlog,
                to = newest,
                "snapshot's last TLog was lost before it was flushed; it ends at the newest TLog"
            );
            snapshot.tlog = newest;
            changed = true;
        }
        if changed {
            self.store_meta(st)?;
        }
        Ok(())
    }

    /// Why the SCOs sealed in `entries` cannot be trusted, if they cannot: a file missing, too
    /// short, or whose data no longer matches the CRC the TLog recorded for it.
    fn first_bad_sco(&self, st: &State, entries: &[Entry]) -> Option<String> {
        entries.iter().find_map(|entry| {
            let Entry::ScoCrc { sco, clusters, crc } = *entry else {
                return None;
            };
            let path = sco_path(&self.dir, sco);
            let clusters = u64::from(clusters);
            let check = sco::open(self.fs.as_ref(), &path, &self.sco_header(st, sco)).and_then(
                |(file, len)| {
                    if len < sco::cluster_offset(clusters, self.cluster_size) {
                        return Err(format!("holds fewer than {clusters} clusters"));
                    }
                    match sco::data_crc(file.as_ref(), clusters, self.cluster_size) {
                        Ok(found) if found == crc => Ok(()),
                        Ok(_) => Err("data does not match its CRC".to_string()),
                        Err(e) => Err(format!("cannot read: {e}")),
                    }
                },
            );
            check.err().map(|reason| format!("SCO {sco}: {reason}"))
        })
    }

    /// Crash recovery of an unclosed TLog: keep its verified entries, truncate and reseal the SCOs
    /// they reference, and rewrite it as a closed TLog. Returns the entries of the closed TLog.
    fn reseal_after_crash(
        &self,
        st: &State,
        number: TLogNumber,
        path: &Path,
        mut entries: Vec<Entry>,
    ) -> Result<Vec<Entry>> {
        let name = &self.name;
        let mut sealed = BTreeMap::new();
        let mut referenced: BTreeMap<ScoNumber, u64> = BTreeMap::new();
        for entry in &entries {
            match *entry {
                Entry::ScoCrc { sco, clusters, .. } => {
                    sealed.insert(sco.number, u64::from(clusters));
                }
                Entry::Loc { location, .. }
                    if !location.is_unwritten() && location.clone_id() == 0 =>
                {
                    let end = referenced.entry(location.sco_number()).or_default();
                    *end = (*end).max(u64::from(location.offset()) + 1);
                }
                _ => {}
            }
        }
        for (&number, &clusters) in referenced.iter().filter(|(n, _)| !sealed.contains_key(n)) {
            let sco = ScoName::new(number);
            let sco_file = sco_path(&self.dir, sco);
            let (file, len) = sco::open(self.fs.as_ref(), &sco_file, &self.sco_header(st, sco))
                .map_err(|e| VolumeError::corrupt(name, sco_file.display().to_string(), e))?;
            let want = sco::cluster_offset(clusters, self.cluster_size);
            if len < want {
                return Err(VolumeError::corrupt(
                    name,
                    sco_file.display().to_string(),
                    format!("is {len} bytes but its synced TLog entries reference {want}"),
                ));
            }
            file.set_len(want)
                .map_err(VolumeError::io(name, &sco_file))?;
            let crc = sco::data_crc(file.as_ref(), clusters, self.cluster_size)
                .map_err(VolumeError::io(name, &sco_file))?;
            file.sync_data().map_err(VolumeError::io(name, &sco_file))?;
            entries.push(Entry::ScoCrc {
                sco,
                clusters: clusters as u32,
                crc,
            });
        }
        for (&number, &clusters) in &sealed {
            let sco_file = sco_path(&self.dir, ScoName::new(number));
            let want = sco::cluster_offset(clusters, self.cluster_size);
            if let Ok(file) = self.fs.open(&sco_file) {
                if file.size().is_ok_and(|len| len > want) {
                    file.set_len(want)
                        .map_err(VolumeError::io(name, &sco_file))?;
                }
            }
        }
        let bytes = tlog::encode_closed(number, &entries);
        self.fs
            .write_atomic(path, &bytes)
            .map_err(VolumeError::io(name, path))?;
        tracing::warn!(
            volume = %name,
            tlog = %number.object_name(),
            entries = entries.len(),
            "recovered an unclosed TLog after a crash"
        );
        Ok(entries)
    }

    /// Replay `entries` into the map; returns how many written clusters they overwrote or
    /// trimmed (the garbage estimate).
    fn apply_entries(&self, st: &mut State, entries: &[Entry], what: &str) -> Result<u64> {
        let clusters = st.map.clusters();
        let mut garbage = 0;
        for entry in entries {
            match *entry {
                Entry::Loc { address, location } => {
                    if address >= clusters {
                        return Err(VolumeError::corrupt(
                            &self.name,
                            what,
                            format!("entry for cluster {address} beyond the volume's {clusters}"),
                        ));
                    }
                    if !st.map.set(address, location).is_unwritten() {
                        garbage += 1;
                    }
                    if location.clone_id() == 0 && !location.is_unwritten() {
                        st.applied_end = st.applied_end.max(Position::after(location));
                    }
                }
                Entry::Trim { start, count } => {
                    st.map.clear_range(start, count, |_, _| garbage += 1);
                }
                Entry::ScoCrc { sco, clusters, .. } if sco.clone_id == 0 => {
                    st.applied_end = st.applied_end.max(Position::new(sco.number.0, clusters));
                }
                _ => {}
            }
        }
        Ok(garbage)
    }
}

//! The repair executor (`vstor backend repair`, rebalancing, decommission, scrub): survey the
//! OSDs (`inspect`), plan each object (`plan`), and carry the plan out.
//!
//! - **Rebuild**: the `k` surviving fragments are read whole (`GetFile`; each OSD checks its
//!   CRCs before answering), preferring OSDs in the destination's domain and up ones over
//!   draining ones, the missing indices are re-encoded with the object's codec (Reed-Solomon
//!   works column by column, so whole fragments decode like single pieces), and written with
//!   the survivors' header (same version, object size and codec; only the index differs).
//!   Every index of an object missing at once is rebuilt from one read of the survivors.
//! - **Move**: the fragment file is copied verbatim (`GetFile`, `Put`), then deleted on its
//!   source (`DeleteFragment`): never before the new copy is durable.
//! - **Delete** (stale versions, misplaced and corrupt copies): only once every rebuild and
//!   move of the object succeeded.
//! - **Drop a tombstone**: last, only once every delete of the object succeeded (for a deleted
//!   object, the planner asks for it only when no OSD is down: see `plan`).
//!
//! Writes carry the namespace's current owner tag from the map: repair runs on the volume's
//! owner node, and a repair started under an older tag is fenced like any stale writer.
//! Repair is throttled to a byte rate (read plus written) so client I/O keeps its share, and
//! reports progress after every object. Bytes read from an OSD in another failure domain than
//! a destination count as cross-domain bytes (what a local parity would save).
//!
//! - **Re-encode** (an object written under a fallback policy, now that the map holds a better
//!   one): the object is read whole (decrypted and decompressed) and put again as the
//!   version after the one read, under the best policy the map holds; the put collects the old
//!   version once the new one is safe. Skipped if the object changed since the survey. The
//!   next version, not the clock's: an owner's put since then is newer and stays the object,
//!   and two repairs re-encoding the same object write the same fragments.
//!
//! Known limits: the object's data is rebuilt in memory (`k` fragments at once, or the whole
//! object to re-encode it); a client delete racing a rebuild of the same object can leave a fragment behind (less
//! than `k`: unreadable, and the next repair reports it), which repair on the owner node,
//! serialised with the owner's deletes, avoids.

use std::time::{Duration, Instant};

#[path = "rebuild.rs"]
mod rebuild;

use super::fragment::TOMBSTONE_INDEX;
use super::inspect::Observed;
use super::plan::{Action, Plan};
use super::preset::Preset;
use super::store::{EcStore, OsdEntry, OsdState};
use crate::osd::proto::Message;
use crate::{validate_name, BackendError, ObjectStore, OwnerTag, Result};

/// How a repair runs.
#[derive(Debug, Clone)]
pub struct RepairOptions {
    /// Most bytes per second repair reads plus writes (`None`: as fast as it can).
    pub bandwidth: Option<u64>,
    /// Check every current fragment's CRCs on its OSD first, and rebuild corrupt ones (scrub).
    pub verify: bool,
    /// Move fragments to where placement wants them (a joined OSD's share, and the knock-on
    /// of a changed map). Without it, sound fragments on up OSDs stay put: lost ones are
    /// rebuilt and draining OSDs emptied onto OSDs holding nothing else of the object (the
    /// least traffic after a loss); a later rebalancing pass puts everything in place.
    pub rebalance: bool,
}

impl Default for RepairOptions {
    fn default() -> Self {
        Self {
            bandwidth: None,
            verify: false,
            rebalance: true,
        }
    }
}

/// Where a repair is, after each object.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepairProgress {
    pub namespace: String,
    /// The object just handled.
    pub object: String,
    pub objects_total: u64,
    pub objects_checked: u64,
    pub fragments_rebuilt: u64,
    pub fragments_moved: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// What a repair did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepairReport {
    pub objects_checked: u64,
    /// Objects with at least one action carried out.
    pub objects_repaired: u64,
    pub fragments_rebuilt: u64,
    /// Of those, rebuilt from a local parity and its own domain.
    pub fragments_rebuilt_locally: u64,
    pub fragments_moved: u64,
    /// Stale versions, misplaced and corrupt copies removed (for a deleted object, what an
    /// OSD that missed the delete still held).
    pub fragments_deleted: u64,
    /// Tombstones dropped: their deletes can no longer be undone by an OSD coming back.
    #[serde(default)]
    pub tombstones_dropped: u64,
    /// Deleted objects whose tombstones must stay (an OSD is down, or a put is under way).
    #[serde(default)]
    pub tombstones_kept: u64,
    /// Objects written under a fallback policy and written again under a better one.
    #[serde(default)]
    pub objects_reencoded: u64,
    /// Copies that failed their CRC check (with `verify`).
    pub corrupt_found: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Bytes read from an OSD in another domain than the fragment's destination.
    pub cross_domain_bytes: u64,
    /// Objects with fewer than `k` fragments left: lost.
    pub unrecoverable: Vec<String>,
    /// Objects with fewer than `k` fragments reachable while some OSD is down.
    pub unavailable: Vec<String>,
    /// Fragments presumed on down OSDs (not rebuilt until the OSD is out).
    pub pending_fragments: u64,
    /// Fragments no OSD could take (too few OSDs or domains for the object's code).
    pub unplaceable_fragments: u64,
    /// Actions that failed, with the object and the reason; retried by the next repair.
    pub errors: Vec<String>,
}

impl RepairReport {
    /// Every object checked is fully redundant where placement wants it.
    pub fn fully_redundant(&self) -> bool {
        self.unrecoverable.is_empty()
            && self.unavailable.is_empty()
            && self.pending_fragments == 0
            && self.unplaceable_fragments == 0
            && self.errors.is_empty()
    }
}

/// Keeps repair's byte rate under a limit by sleeping (rate limiting, not synchronisation).
struct Throttle {
    limit: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Throttle {
    fn account(&mut self, bytes: u64) {
        self.bytes += bytes;
        let Some(limit) = self.limit.filter(|l| *l > 0) else {
            return;
        };
        let due = Duration::from_secs_f64(self.bytes as f64 / limit as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

struct Run<'a> {
    namespace: &'a str,
    tag: OwnerTag,
    osds: &'a [OsdEntry],
    report: RepairReport,
    throttle: Throttle,
}

impl EcStore {
    /// Repair every object of `namespace`: rebuild lost and corrupt fragments, move fragments
    /// off draining OSDs and onto where placement wants them, delete stale versions and
    /// misplaced copies. Returns when every object was handled; the report says whether all
    /// are fully redundant (`RepairReport::fully_redundant`).
    pub fn repair_namespace(
        &self,
        namespace: &str,
        options: &RepairOptions,
        progress: &dyn Fn(&RepairProgress),
    ) -> Result<RepairReport> {
        self.repair(namespace, None, options, progress)
    }

    /// Repair one object (see [`repair_namespace`](Self::repair_namespace)).
    pub fn repair_object(
        &self,
        namespace: &str,
        name: &str,
        options: &RepairOptions,
    ) -> Result<RepairReport> {
        self.repair(namespace, Some(name), options, &|_| {})
    }

    /// Scrub: check every fragment's CRCs on its OSD and rebuild the corrupt ones (a repair
    /// with `verify`).
    pub fn scrub_namespace(
        &self,
        namespace: &str,
        options: &RepairOptions,
        progress: &dyn Fn(&RepairProgress),
    ) -> Result<RepairReport> {
        let options = RepairOptions {
            verify: true,
            ..options.clone()
        };
        self.repair(namespace, None, &options, progress)
    }

    fn repair(
        &self,
        namespace: &str,
        object: Option<&str>,
        options: &RepairOptions,
        progress: &dyn Fn(&RepairProgress),
    ) -> Result<RepairReport> {
        validate_name(namespace)?;
        let osds = self.map.osds()?;
        let observed = self.observe_all(namespace, object, &osds, options.verify)?;
        self.repair_observed(namespace, &osds, observed, options, progress)
    }

    /// Plan and carry out the repair of what was observed, under the map `osds`.
    pub(super) fn repair_observed(
        &self,
        namespace: &str,
        osds: &[OsdEntry],
        observed: Vec<Observed>,
        options: &RepairOptions,
        progress: &dyn Fn(&RepairProgress),
    ) -> Result<RepairReport> {
        let record = self.record(namespace)?;
        let preset: Option<Preset> = self.map.preset(&record.preset)?;
        let mut run = Run {
            namespace,
            tag: record.tag,
            osds,
            report: RepairReport::default(),
            throttle: Throttle {
                limit: options.bandwidth,
                start: Instant::now(),
                bytes: 0,
            },
        };
        let total = observed.len() as u64;
        for observed in observed {
            let plan = observed.plan(osds, preset.as_ref(), options.rebalance);
            run.report.objects_checked += 1;
            run.report.corrupt_found += observed
                .seen
                .versions
                .values()
                .flat_map(|v| v.copies.values().flat_map(|c| c.values()))
                .filter(|h| !h.usable())
                .count() as u64;
            run.report.pending_fragments += plan.pending.len() as u64;
            if plan.deleted.is_some()
                && !plan
                    .actions
                    .iter()
                    .any(|a| matches!(a, Action::DropTombstone { .. }))
            {
                run.report.tombstones_kept += 1;
            }
            run.report.unplaceable_fragments += plan.unplaceable.len() as u64;
            match &plan.unrecoverable {
                Some(lost) if lost.waiting_for_down => {
                    run.report.unavailable.push(observed.name.clone());
                }
                Some(_) => run.report.unrecoverable.push(observed.name.clone()),
                None => {}
            }
            if !plan.actions.is_empty() {
                run.report.objects_repaired += 1;
                if let Err(e) = self.execute(&mut run, &observed, &plan) {
                    run.report
                        .errors
                        .push(format!("{namespace}/{}: {e}", observed.name));
                }
                self.forget(namespace, &observed.name);
            }
            progress(&RepairProgress {
                namespace: namespace.to_string(),
                object: observed.name.clone(),
                objects_total: total,
                objects_checked: run.report.objects_checked,
                fragments_rebuilt: run.report.fragments_rebuilt,
                fragments_moved: run.report.fragments_moved,
                bytes_read: run.report.bytes_read,
                bytes_written: run.report.bytes_written,
            });
        }
        Ok(run.report)
    }

    fn osd<'a>(run: &Run<'a>, id: u64) -> Result<&'a OsdEntry> {
        run.osds
            .iter()
            .find(|o| o.slot.id == id)
            .ok_or_else(|| BackendError::Osd {
                addr: "-".into(),
                reason: format!("OSD {id} is not in the map"),
            })
    }

    /// One request to one OSD.
    fn call_one(&self, entry: &OsdEntry, message: Message) -> Result<Message> {
        self.call_all(vec![(entry.clone(), message)])?
            .into_iter()
            .next()
            .map_or_else(
                || {
                    Err(BackendError::Osd {
                        addr: entry.addr.clone(),
                        reason: "no answer".into(),
                    })
                },
                |(_, answer)| answer,
            )
    }

    fn get_file(
        &self,
        run: &Run<'_>,
        name: &str,
        (version, index): (u64, u8),
        entry: &OsdEntry,
    ) -> Result<Vec<u8>> {
        match self.call_one(
            entry,
            Message::GetFile {
                namespace: run.namespace.to_string(),
                name: name.to_string(),
                version,
                index,
            },
        )? {
            Message::Data { data } => Ok(data.to_vec()),
            other => Err(BackendError::Osd {
                addr: entry.addr.clone(),
                reason: format!("answered GetFile with {}", other.name()),
            }),
        }
    }

    fn put_file(
        &self,
        run: &mut Run<'_>,
        name: &str,
        (version, index): (u64, u8),
        entry: &OsdEntry,
        file: Vec<u8>,
    ) -> Result<()> {
        let len = file.len() as u64;
        self.call_one(
            entry,
            Message::Put {
                namespace: run.namespace.to_string(),
                name: name.to_string(),
                version,
                index,
                tag: run.tag,
                file: file.into(),
            },
        )?;
        run.report.bytes_written += len;
        run.throttle.account(len);
        Ok(())
    }

    fn delete_fragment(
        &self,
        run: &mut Run<'_>,
        name: &str,
        (version, index): (u64, u8),
        on: u64,
    ) -> Result<()> {
        let entry = Self::osd(run, on)?;
        self.call_one(
            entry,
            Message::DeleteFragment {
                namespace: run.namespace.to_string(),
                name: name.to_string(),
                version,
                index,
                tag: run.tag,
            },
        )?;
        Ok(())
    }

    /// Carry out `plan` for one object: rebuilds, moves, then (if all succeeded) deletes.
    fn execute(&self, run: &mut Run<'_>, observed: &Observed, plan: &Plan) -> Result<()> {
        let Some(version) = plan.version else {
            // A deleted object: only deletes and tombstone drops.
            return self.delete_and_drop(run, &observed.name, plan);
        };
        if plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::ReEncode { .. }))
        {
            return self.reencode(run, &observed.name, version);
        }
        let name = observed.name.as_str();
        let rebuilds: Vec<(u8, u64)> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Rebuild { index, to } => Some((*index, *to)),
                _ => None,
            })
            .collect();
        let mut failed = Vec::new();
        let written_before = run.report.bytes_written;
        if !rebuilds.is_empty() {
            if let Err(e) = self.rebuild(run, observed, plan, version, &rebuilds) {
                failed.push(e.to_string());
            }
        }
        for action in &plan.actions {
            let Action::Move { index, from, to } = *action else {
                continue;
            };
            let result = (|| {
                let (source, dest) = (Self::osd(run, from)?, Self::osd(run, to)?);
                let file = self.get_file(run, name, (version, index), source)?;
                let len = file.len() as u64;
                run.report.bytes_read += len;
                if source.slot.domain != dest.slot.domain {
                    run.report.cross_domain_bytes += len;
                }
                run.throttle.account(len);
                self.put_file(run, name, (version, index), dest, file)?;
                // The new copy is durable: only now the old one goes.
                self.delete_fragment(run, name, (version, index), from)?;
                run.report.fragments_moved += 1;
                Ok::<(), BackendError>(())
            })();
            if let Err(e) = result {
                failed.push(format!(
                    "move of fragment {index} from OSD {from} to {to}: {e}"
                ));
            }
        }
        if run.report.bytes_written > written_before {
            self.undo_if_deleted(run, observed, plan, version)?;
        }
        if !failed.is_empty() {
            return Err(BackendError::Osd {
                addr: "-".into(),
                reason: format!("{} (nothing deleted)", failed.join("; ")),
            });
        }
        self.delete_and_drop(run, name, plan)
    }

    /// Write `name` (read at `version`) again as `version + 1` under the best policy the map
    /// holds (see the module docs).
    fn reencode(&self, run: &mut Run<'_>, name: &str, version: u64) -> Result<()> {
        let namespace = run.namespace;
        self.forget(namespace, name);
        let found = self.find(namespace, name)?;
        if found.version != version {
            // Rewritten or deleted since the survey: the next pass looks again.
            return Ok(());
        }
        // The object as a client reads it (decrypted, decompressed): the put below encodes it
        // as a put would, under the best policy the map holds now.
        let data = ObjectStore::get(self, namespace, name)?;
        if self.find(namespace, name)?.version != version {
            return Ok(());
        }
        run.report.bytes_read += data.len() as u64;
        run.throttle.account(data.len() as u64);
        self.put_version(namespace, name, &data, run.tag, Some(version + 1))?;
        let written = self.find(namespace, name).map_or(0, |f| {
            f.layout.fragment_len() * (u64::from(f.layout.k) + u64::from(f.layout.m))
        });
        run.report.bytes_written += written;
        run.throttle.account(written);
        run.report.objects_reencoded += 1;
        Ok(())
    }

    /// The plan's deletes, then (all of them done) its tombstone drops.
    fn delete_and_drop(&self, run: &mut Run<'_>, name: &str, plan: &Plan) -> Result<()> {
        for action in &plan.actions {
            if let Action::Delete { version, index, on } = *action {
                self.delete_fragment(run, name, (version, index), on)?;
                run.report.fragments_deleted += 1;
            }
        }
        for action in &plan.actions {
            if let Action::DropTombstone { version, on } = *action {
                self.delete_fragment(run, name, (version, TOMBSTONE_INDEX), on)?;
                run.report.tombstones_dropped += 1;
            }
        }
        Ok(())
    }

    /// The owner may have deleted the object while repair copied it, and a fragment written
    /// after the delete would linger (fewer than `k`: never readable, reported unrecoverable
    /// forever). So after writing, look again: if every live OSD answered and fewer than `k`
    /// fragments of the version are left, the object was deleted, and what repair wrote goes.
    fn undo_if_deleted(
        &self,
        run: &mut Run<'_>,
        observed: &Observed,
        plan: &Plan,
        version: u64,
    ) -> Result<()> {
        let name = observed.name.as_str();
        let live: Vec<OsdEntry> = run
            .osds
            .iter()
            .filter(|o| matches!(o.state, OsdState::Up | OsdState::Draining))
            .cloned()
            .collect();
        let now = self.observe(run.namespace, name, &live, false)?;
        let left = now.seen.versions.get(&version).map_or(0, |v| {
            v.copies
                .keys()
                .filter(|i| u16::from(**i) < u16::from(plan.k) + u16::from(plan.m))
                .count()
        });
        if !now.silent.is_empty() || left >= usize::from(plan.k) {
            return Ok(());
        }
        for (index, copies) in now
            .seen
            .versions
            .get(&version)
            .into_iter()
            .flat_map(|v| &v.copies)
        {
            for on in copies.keys() {
                self.delete_fragment(run, name, (version, *index), *on)?;
                run.report.fragments_deleted += 1;
            }
        }
        Err(BackendError::NoSuchObject {
            namespace: run.namespace.to_string(),
            name: format!("{name} (deleted while repair copied it; its copies were removed)"),
        })
    }
}

//! Catch-up: bring a table to the backend's history by replaying the volume's backend TLogs
//! after its cork, as a slave does on a timer and on demand, and as `mds rebuild` does from an
//! empty table.
//!
//! The backend's TLog list (`tlogs` object, [`TLogList`]) orders the history; each TLog is read
//! and verified with the volume driver's own parser ([`tlog::parse`], which insists on a closed
//! TLog) and applied in one store commit together with the new cork. A table whose cork does not
//! name a prefix of the list (scrub rewrote it, a rollback dropped it) is cleared and rebuilt
//! from the first TLog: the first replay commit clears it, so a crash in the middle leaves a
//! table whose cork is a true prefix, and the next catch-up continues from there.
//!
//! All calls are blocking (backend and store I/O): run them on the blocking pool.

use std::collections::BTreeMap;

use vstor_backend::{BackendError, ObjectStore};
use vstor_volumedriver::config::{TLogList, TLOG_LIST_OBJECT};
use vstor_volumedriver::tlog;

use crate::error::{MdsError, Result};
use crate::store::MdsStore;
use crate::table::{apply_to_model, plan_catch_up, updates_of, CatchUpPlan, Cork, Update};

/// What a catch-up did (or, dry, would do).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatchUpReport {
    /// TLogs the table was behind the backend when it started.
    pub behind: u64,
    /// TLogs replayed.
    pub replayed: u64,
    /// Why the table was cleared and rebuilt from the whole history, if it was.
    pub full_rebuild: Option<String>,
    /// The table's cork at the end.
    pub cork: Cork,
}

/// The volume's backend TLog list, without TLogs a rollback dropped (as the volume's restart
/// filters them). A namespace without a list has an empty history.
pub fn read_list(backend: &dyn ObjectStore, volume: &str, namespace: &str) -> Result<TLogList> {
    let mut list = match backend.get(namespace, TLOG_LIST_OBJECT) {
        Ok(bytes) => TLogList::decode(volume, &bytes).map_err(|e| MdsError::Backend {
            volume: volume.to_string(),
            reason: e.to_string(),
        })?,
        Err(BackendError::NoSuchObject { .. }) => TLogList::default(),
        Err(e) => {
            return Err(MdsError::Backend {
                volume: volume.to_string(),
                reason: format!("reading {namespace}/{TLOG_LIST_OBJECT}: {e}"),
            })
        }
    };
    let dropped = list.clone();
    list.tlogs.retain(|r| !dropped.is_dropped(r.number));
    Ok(list)
}

/// The map updates of one backend TLog, verified (it must be closed and intact).
pub fn read_tlog_updates(
    backend: &dyn ObjectStore,
    volume: &str,
    namespace: &str,
    object: &str,
) -> Result<Vec<Update>> {
    let bytes = backend
        .get(namespace, object)
        .map_err(|e| MdsError::Backend {
            volume: volume.to_string(),
            reason: format!("reading TLog {namespace}/{object}: {e}"),
        })?;
    let parsed = tlog::parse(&bytes, true).map_err(|e| MdsError::Backend {
        volume: volume.to_string(),
        reason: format!("TLog {namespace}/{object} is corrupt: {e}"),
    })?;
    Ok(updates_of(&parsed.entries))
}

/// Catch-up commits after this many TLogs or updates, whichever comes first: few commits (each
/// is two fsyncs), bounded memory, and progress that survives a crash.
const BATCH_TLOGS: usize = 64;
const BATCH_UPDATES: usize = 1 << 20;

/// How many attempts a catch-up makes when the master moves the table under it.
const ATTEMPTS: usize = 3;

/// Replay the backend TLogs `volume`'s table lacks (all of them after clearing it, when its cork
/// names another history). With `dry_run`, only count them.
pub fn catch_up(
    store: &MdsStore,
    backend: &dyn ObjectStore,
    volume: &str,
    dry_run: bool,
) -> Result<CatchUpReport> {
    let mut last_err = None;
    for _ in 0..ATTEMPTS {
        match catch_up_once(store, backend, volume, dry_run) {
            Err(e @ MdsError::CorkMismatch { .. }) => last_err = Some(e),
            other => return other,
        }
    }
    Err(last_err.unwrap_or_else(|| MdsError::Invalid {
        volume: volume.to_string(),
        reason: "catch-up made no attempt".into(),
    }))
}

fn catch_up_once(
    store: &MdsStore,
    backend: &dyn ObjectStore,
    volume: &str,
    dry_run: bool,
) -> Result<CatchUpReport> {
    let meta = store.meta(volume)?.ok_or_else(|| MdsError::NoTable {
        volume: volume.to_string(),
    })?;
    let list = read_list(backend, volume, &meta.namespace)?;
    let plan = plan_catch_up(meta.cork, &list.tlogs);
    let behind = plan.tlogs(list.tlogs.len()) as u64;
    let mut report = CatchUpReport {
        behind,
        replayed: 0,
        full_rebuild: match &plan {
            CatchUpPlan::Full { reason } => Some(reason.clone()),
            _ => None,
        },
        cork: meta.cork,
    };
    if dry_run || plan == CatchUpPlan::UpToDate {
        return Ok(report);
    }
    let (from, mut reset) = match &plan {
        CatchUpPlan::Incremental { from } => (*from, false),
        CatchUpPlan::Full { reason } => {
            tracing::info!(volume, %reason, "MDS table is rebuilt from the whole backend history");
            (0, true)
        }
        CatchUpPlan::UpToDate => return Ok(report),
    };
    let mut cork = if reset {
        Cork::EMPTY
    } else {
        Cork::of_prefix(&list.tlogs[..from])
    };
    if reset && list.tlogs.is_empty() {
        store.replay(volume, true, meta.cork, Cork::EMPTY, &[])?;
        report.cork = Cork::EMPTY;
        return Ok(report);
    }
    let mut expect = meta.cork;
    let mut batch: Vec<(Cork, Vec<Update>)> = Vec::new();
    let mut batched = 0usize;
    let records = &list.tlogs[from..];
    // TLogs are fetched and verified a few at a time (each is a round trip on S3 or the EC
    // tier) and committed in list order.
    vstor_backend::prefetch::in_order(
        records.len(),
        vstor_backend::prefetch::DEFAULT_DEPTH,
        |index| {
            read_tlog_updates(
                backend,
                volume,
                &meta.namespace,
                &records[index].object_name(),
            )
        },
        |index, updates| {
            cork = cork.after(&records[index]);
            batched += updates.len();
            batch.push((cork, updates));
            if batch.len() >= BATCH_TLOGS || batched >= BATCH_UPDATES || index + 1 == records.len()
            {
                store.replay_batch(volume, reset, expect, &batch)?;
                reset = false;
                expect = cork;
                report.replayed += batch.len() as u64;
                report.cork = cork;
                batch.clear();
                batched = 0;
            }
            Ok(())
        },
    )?;
    if report.full_rebuild.is_none() {
        store.count_incremental(volume)?;
    }
    Ok(report)
}

/// The map a full replay of the backend history gives (the reference a table must equal), and
/// the cork of that history.
pub fn backend_map(
    backend: &dyn ObjectStore,
    volume: &str,
    namespace: &str,
) -> Result<(Cork, BTreeMap<u64, u64>)> {
    let list = read_list(backend, volume, namespace)?;
    let mut map = BTreeMap::new();
    for record in &list.tlogs {
        let updates = read_tlog_updates(backend, volume, namespace, &record.object_name())?;
        apply_to_model(&mut map, &updates);
    }
    Ok((Cork::of_prefix(&list.tlogs), map))
}

/// A volume's map rebuilt from an MDS table plus the backend TLogs after its cork.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub map: BTreeMap<u64, u64>,
    /// Cork of the whole list: what the map now reflects.
    pub cork: Cork,
    /// TLogs read from the backend.
    pub replayed: u64,
    /// Why the table could not be used and the whole history was replayed, if so.
    pub full_replay: Option<String>,
}

/// Restart from an MDS: start from `table` (the MDS's cork and map; `None` when the MDS had no
/// usable table) and replay only the backend TLogs of `list` after its cork. A table whose cork
/// is not a prefix of `list` is ignored and the whole list is replayed, with a log line saying
/// why. The result equals a full backend replay of `list`.
pub fn restore_map(
    backend: &dyn ObjectStore,
    volume: &str,
    namespace: &str,
    list: &[vstor_volumedriver::config::TLogRecord],
    table: Option<(Cork, BTreeMap<u64, u64>)>,
) -> Result<Restored> {
    let (from, mut map, full_replay) = match table {
        None => (0, BTreeMap::new(), Some("no MDS table".to_string())),
        Some((cork, map)) => match plan_catch_up(cork, list) {
            CatchUpPlan::UpToDate => (list.len(), map, None),
            CatchUpPlan::Incremental { from } => (from, map, None),
            CatchUpPlan::Full { reason } => (0, BTreeMap::new(), Some(reason)),
        },
    };
    if let Some(reason) = &full_replay {
        tracing::warn!(volume, %reason, tlogs = list.len(), "MDS table not usable: full backend replay");
    }
    for record in &list[from..] {
        let updates = read_tlog_updates(backend, volume, namespace, &record.object_name())?;
        apply_to_model(&mut map, &updates);
    }
    Ok(Restored {
        map,
        cork: Cork::of_prefix(list),
        replayed: (list.len() - from) as u64,
        full_replay,
    })
}

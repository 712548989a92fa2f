//! The volume owner's side of the MDS: seed a restart from the master's table, and feed the
//! master every uncorked TLog.
//!
//! * [`seed_from_mds`]: dump the table, check its cork against the backend TLog list
//!   ([`plan_catch_up`]) and hand the volume a [`MapSeed`] standing for the list prefix the
//!   table holds; the volume then replays only the TLogs after it. A missing, unreachable,
//!   stale (history rewritten) or corrupt table gives `None` and a log line saying why: the
//!   volume replays its whole backend history, which is always right.
//! * [`MdsFeed`]: the volume's [`UncorkSink`]. The engine calls it outside its locks and must
//!   not block, so it only queues; one task sends each TLog's updates as a multi-set whose
//!   `expect` is the cork of the list before that TLog. Any refusal but fencing (the table lags,
//!   or was rebuilt) makes the master catch up from the backend, which brings it to the list
//!   including the TLog just refused; fencing stops the feed (a newer owner exists).
//!   [`MdsFeed::follow`] feeds whichever MDS is master now: when the node promotes a slave it
//!   publishes the new master, and the feed brings that table to the backend list (catch-up)
//!   before its next update. While there is no master, TLogs are skipped: the next master's
//!   catch-up covers them.
//!
//! Correctness never depends on the feed: a table that missed updates has a cork that does not
//! fingerprint the backend list, and a restart then replays from the backend.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use vstor_backend::ObjectStore;
use vstor_volumedriver::config::TLogRecord;
use vstor_volumedriver::tlog::Entry;
use vstor_volumedriver::{MapSeed, UncorkSink};

use crate::catchup::read_list;
use crate::client::MdsClient;
use crate::error::MdsError;
use crate::proto::ErrorCode;
use crate::table::{plan_catch_up, updates_of, CatchUpPlan, Cork, Update};

/// The master's table as a seed for `volume`'s restart, or `None` (logged) when it cannot be
/// used. Blocking backend reads run on the blocking pool.
pub async fn seed_from_mds(
    client: &MdsClient,
    backend: Arc<dyn ObjectStore>,
    volume: &str,
    namespace: &str,
) -> Option<MapSeed> {
    // The backend list is read while the table comes in (on S3 it is a round trip of its own).
    // Either may be read first: the check below only asks whether the table's cork fingerprints
    // a prefix of the list, and nothing else writes the list while the volume is not open.
    let list = {
        let (volume, namespace) = (volume.to_string(), namespace.to_string());
        tokio::task::spawn_blocking(move || read_list(backend.as_ref(), &volume, &namespace))
    };
    let (table, list) = tokio::join!(client.dump_pages(volume), list);
    let (cork, pages) = match table {
        Ok(table) => table,
        Err(e) => {
            tracing::warn!(volume, mds = client.addr(), error = %e, "no MDS table to restart from: full backend replay");
            return None;
        }
    };
    let list = match list {
        Ok(Ok(list)) => list,
        Ok(Err(e)) => {
            tracing::warn!(volume, error = %e, "cannot read the backend TLog list to check the MDS table");
            return None;
        }
        Err(e) => {
            tracing::warn!(volume, error = %e, "checking the MDS table failed");
            return None;
        }
    };
    let records = match plan_catch_up(cork, &list.tlogs) {
        CatchUpPlan::UpToDate => list.tlogs.len(),
        CatchUpPlan::Incremental { from } => from,
        CatchUpPlan::Full { reason } => {
            tracing::warn!(volume, mds = client.addr(), %reason, "MDS table is stale: full backend replay");
            return None;
        }
    };
    if records == 0 {
        return None;
    }
    Some(MapSeed {
        records,
        through_tlog: cork.tlog,
        pages,
    })
}

/// Feeds a master MDS the volume's uncorked TLogs (see the module docs).
pub struct MdsFeed {
    queue: mpsc::UnboundedSender<(TLogRecord, Vec<Update>)>,
}

impl MdsFeed {
    /// Start feeding `client`'s table of `volume` as owner `owner_tag`; `start` is the cork of
    /// the backend list as the volume opened it (see [`Cork::of_prefix`]). Must be called
    /// within a tokio runtime.
    pub fn start(client: Arc<MdsClient>, volume: &str, owner_tag: u64, start: Cork) -> Arc<Self> {
        let (_, master) = watch::channel(Some(client));
        Self::follow(master, volume, owner_tag, start)
    }

    /// [`start`](Self::start), feeding whichever client `master` holds at each TLog (`None`:
    /// no master now, the TLog is left to the next master's catch-up).
    pub fn follow(
        master: watch::Receiver<Option<Arc<MdsClient>>>,
        volume: &str,
        owner_tag: u64,
        start: Cork,
    ) -> Arc<Self> {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(pump(master, volume.to_string(), owner_tag, start, rx));
        Arc::new(Self { queue })
    }
}

impl UncorkSink for MdsFeed {
    fn uncorked(&self, _volume: &str, record: &TLogRecord, entries: &[Entry]) {
        // A closed queue means the feed stopped (fenced): nothing to do.
        let _ = self.queue.send((record.clone(), updates_of(entries)));
    }
}

/// Bring a (new) master's table to where the feed stands, or to the backend list (always
/// when the feed `skipped` TLogs: a table at the feed's cork then lacks them).
async fn sync(client: &MdsClient, volume: &str, cork: Cork, skipped: bool) -> Cork {
    match client.stat(volume).await {
        Ok(info) if info.meta.cork == cork && !skipped => cork,
        _ => match client.catch_up(volume, false).await {
            Ok(report) => report.cork,
            Err(e) => {
                tracing::warn!(volume, mds = client.addr(), error = %e, "MDS catch-up failed; its table lags until the next one");
                cork
            }
        },
    }
}

async fn pump(
    mut master: watch::Receiver<Option<Arc<MdsClient>>>,
    volume: String,
    owner_tag: u64,
    mut cork: Cork,
    mut rx: mpsc::UnboundedReceiver<(TLogRecord, Vec<Update>)>,
) {
    // The table should stand where the volume's list does; if not, let it catch up first.
    let mut synced: Option<Arc<MdsClient>> = None;
    let mut skipped = false;
    while let Some((record, updates)) = rx.recv().await {
        let Some(client) = master.borrow_and_update().clone() else {
            synced = None;
            skipped = true;
            continue;
        };
        if !synced.as_ref().is_some_and(|s| Arc::ptr_eq(s, &client)) {
            cork = sync(&client, &volume, cork, skipped).await;
            synced = Some(client.clone());
            skipped = false;
        }
        if record.number <= cork.tlog {
            // Already in the table (a catch-up got there first).
            continue;
        }
        let next = cork.after(&record);
        match client
            .multi_set(&volume, owner_tag, cork, next, updates)
            .await
        {
            Ok(()) => cork = next,
            Err(MdsError::Refused {
                code: ErrorCode::Fenced,
                message,
                ..
            }) => {
                tracing::warn!(volume, mds = client.addr(), %message, "MDS refused our owner tag: the feed stops");
                return;
            }
            Err(e) => {
                tracing::warn!(volume, mds = client.addr(), tlog = record.number, error = %e, "MDS update refused or lost: asking the MDS to catch up from the backend");
                match client.catch_up(&volume, false).await {
                    Ok(report) => cork = report.cork,
                    Err(e) => {
                        tracing::warn!(volume, mds = client.addr(), error = %e, "MDS catch-up failed; its table lags until the next one");
                        // Keep `cork` as the list's: the next set is refused again and retried.
                        cork = next;
                    }
                }
            }
        }
    }
}

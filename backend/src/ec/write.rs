//! The `ec` store's write path: a put, the re-routing of fragments whose OSD fails during it,
//! and the collection of the object's older versions once the new one is safe.
//!
//! **Re-routing.** The map learns that an OSD died only when its lease lapses (seconds), and
//! until then placement still sends it fragments. A put therefore drives each fragment
//! itself: when the OSD it went to fails (connect refused, timeout, an error answer other
//! than `Fenced`), the fragment goes to the next OSD of its ranking ([`reroute`]) that holds
//! nothing else of the object, within the per-domain cap `x` when some OSD allows it, and the
//! failed OSD is skipped by every later choice of the same put. The put is acknowledged once
//! `c` fragments are durable, as before; the others (and their re-routes) finish in the
//! background. A `Fenced` answer is not re-routed: every OSD would refuse the stale owner.
//! Readers find re-routed fragments: `find` asks every up OSD when the best-ranked ones hold
//! fewer than `k` fragments, and a put caches where its fragments actually went.
//!
//! **Older versions.** An object rewritten in place (a volume's TLog list, its config) would
//! leave every older version's fragments on the OSDs until a repair deleted them. When all of
//! a put's fragments have finished and at least `k + 1` of them are durable (the new version
//! survives one more loss, so the old one is never needed again), the store deletes the
//! older versions' fragments it knows of (`DeleteFragment` per version and index, on their
//! holders, from its cache: what the previous put or `find` saw). Best effort: a failure or a
//! holder that is down leaves the fragment for repair, which deletes stale versions too.
//!
//! Known limit: a store that never saw the older versions (a fresh process) does not look
//! for them; repair collects those.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::codec::CodecId;
use super::layout::Layout;
use super::placement::{reroute, OsdSlot};
use super::store::{EcOptions, EcStore, Found, OsdEntry, OsdState, TierMap};
use crate::osd::client::OsdClient;
use crate::osd::proto::{ErrorCode, Message};
use crate::{BackendError, OwnerTag, Result};

pub(super) type Clients = Arc<Mutex<HashMap<u64, Arc<OsdClient>>>>;
pub(super) type FoundCache = Arc<Mutex<HashMap<(String, String), Found>>>;

/// Puts still completing in the background, so a caller (tests, shutdown) can wait for them.
#[derive(Default)]
pub(super) struct Background {
    running: parking_lot::Mutex<usize>,
    idle: parking_lot::Condvar,
}

/// Held by a background put; dropping it (done, or the runtime shut down) counts it out.
pub(super) struct BackgroundGuard(Arc<Background>);

impl Background {
    pub(super) fn start(self: &Arc<Self>) -> BackgroundGuard {
        *self.running.lock() += 1;
        BackgroundGuard(self.clone())
    }

    /// Wait until no put is completing in the background; `false` if `timeout` passed first.
    pub(super) fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut running = self.running.lock();
        while *running > 0 {
            if self.idle.wait_until(&mut running, deadline).timed_out() {
                return *running == 0;
            }
        }
        true
    }
}

impl Drop for BackgroundGuard {
    fn drop(&mut self) {
        let mut running = self.0.running.lock();
        *running = running.saturating_sub(1);
        if *running == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// Everything a put's driver needs, decided before the first byte is sent.
pub(super) struct PutJob {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) key: String,
    pub(super) version: u64,
    pub(super) owner: OwnerTag,
    pub(super) layout: Layout,
    /// The `k + m` fragment files, fragment `i` first sent to `placed[i]`.
    pub(super) files: Vec<Bytes>,
    pub(super) placed: Vec<u64>,
    /// Local parities `(OSD, index, file)`: sent once, never re-routed (repair rebuilds them).
    pub(super) locals: Vec<(u64, u8, Bytes)>,
    /// The map's OSDs and placement's writable view of them when the put started.
    pub(super) osds: Vec<OsdEntry>,
    pub(super) slots: Vec<OsdSlot>,
    /// Fragments durable before the put is acknowledged (`c`), and the per-domain cap (`x`).
    pub(super) needed: usize,
    pub(super) per_domain: usize,
    /// What the store knew of the object before the put: the versions to collect after it.
    pub(super) previous: Option<Found>,
    /// Dropped when the put's work is over (see [`Found::settled`]).
    pub(super) settled: tokio::sync::watch::Sender<()>,
}

/// What the driver shares with the store.
pub(super) struct Shared {
    pub(super) clients: Clients,
    pub(super) options: EcOptions,
    pub(super) found: FoundCache,
    pub(super) map: Arc<dyn TierMap>,
}

/// Send one request to OSD `entry` (a cached connection, or a new one).
pub(super) async fn call_one(
    clients: Clients,
    options: EcOptions,
    entry: OsdEntry,
    message: Message,
) -> Result<Message> {
    let client = EcStore::client(clients, entry, options.clone()).await?;
    client.call(message, options.timeout).await
}

fn is_fenced(e: &BackendError) -> bool {
    matches!(
        e,
        BackendError::OsdRefused {
            code: ErrorCode::Fenced,
            ..
        }
    )
}

/// The error a put that did not reach `c` durable fragments returns: a fenced writer learns
/// it as such, not as a generic OSD failure.
fn put_failed(job: &PutJob, ok: usize, mut errors: Vec<(u64, BackendError)>) -> BackendError {
    if let Some(pos) = errors.iter().position(|(_, e)| is_fenced(e)) {
        return errors.swap_remove(pos).1;
    }
    BackendError::Osd {
        addr: "-".into(),
        reason: format!(
            "put {}/{}: only {ok} of the {} fragments needed were stored: {}",
            job.namespace,
            job.name,
            job.needed,
            errors
                .iter()
                .map(|(id, e)| format!("OSD {id}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

impl PutJob {
    fn message(&self, index: u8, file: Bytes) -> Message {
        Message::Put {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            version: self.version,
            index,
            tag: self.owner,
            file,
        }
    }

    /// The cache entry for this version with fragment `i` on `holders[i]`.
    fn found(&self, holders: &[Option<u64>]) -> Found {
        Found {
            version: self.version,
            layout: self.layout,
            codec: CodecId::REED_SOLOMON_GF8,
            holders: holders
                .iter()
                .enumerate()
                .filter_map(|(i, id)| id.map(|id| (i as u8, id)))
                .collect(),
            extra: self
                .locals
                .iter()
                .map(|(osd, index, _)| (self.version, *index, *osd))
                .collect(),
            settled: Some(self.settled.subscribe()),
        }
    }

    /// Cache `found` unless the cache already has a newer version of the object.
    fn cache(&self, shared: &Shared, found: Found) {
        let mut cache = shared.found.lock();
        let key = (self.namespace.clone(), self.name.clone());
        if cache.get(&key).is_none_or(|f| f.version <= found.version) {
            cache.insert(key, found);
        }
    }

    /// The fragments of older versions to collect: the previous version's holders and what
    /// else the store knew of (older versions, local parities, extra copies).
    fn stale(&self) -> Vec<(u64, u8, u64)> {
        let Some(previous) = &self.previous else {
            return Vec::new();
        };
        let mut stale: BTreeSet<(u64, u8, u64)> = previous
            .holders
            .iter()
            .map(|(index, osd)| (previous.version, *index, *osd))
            .collect();
        stale.extend(previous.extra.iter().copied());
        stale
            .into_iter()
            .filter(|(version, _, _)| *version < self.version)
            .collect()
    }
}

/// Drive a put to its end: every fragment stored or out of OSDs to try, `ack` answered as soon
/// as `c` are durable (or when that became impossible), then the older versions collected.
pub(super) async fn drive(
    job: PutJob,
    shared: Shared,
    ack: oneshot::Sender<Result<()>>,
    _running: BackgroundGuard,
) {
    let n = job.files.len();
    let k = job.layout.k as usize;
    let entry = |id: u64| job.osds.iter().find(|o| o.slot.id == id).cloned();
    let send = |index: u8, osd: u64, file: Bytes, local: bool| {
        let (clients, options) = (shared.clients.clone(), shared.options.clone());
        let target = entry(osd);
        let message = job.message(index, file);
        async move {
            let result = match target {
                Some(target) => call_one(clients, options, target, message).await,
                None => Err(BackendError::Osd {
                    addr: "-".into(),
                    reason: format!("OSD {osd} is not in the map"),
                }),
            };
            (index, osd, local, result)
        }
    };
    let mut attempts = FuturesUnordered::new();
    let mut assigned: Vec<Option<u64>> = job.placed.iter().copied().map(Some).collect();
    for (i, (osd, file)) in job.placed.iter().zip(&job.files).enumerate() {
        attempts.push(send(i as u8, *osd, file.clone(), false));
    }
    for (osd, index, file) in &job.locals {
        attempts.push(send(*index, *osd, file.clone(), true));
    }
    let local_osds: Vec<u64> = job.locals.iter().map(|(osd, _, _)| *osd).collect();
    let mut durable = vec![false; n];
    let mut failed: BTreeSet<u64> = BTreeSet::new();
    let mut errors: Vec<(u64, BackendError)> = Vec::new();
    let mut ack = Some(ack);
    while let Some((index, osd, local, result)) = attempts.next().await {
        let i = usize::from(index);
        match result {
            Ok(_) if local => {}
            Ok(_) => {
                durable[i] = true;
                if durable.iter().filter(|d| **d).count() >= job.needed {
                    if let Some(ack) = ack.take() {
                        // Cached before the caller returns, so its next read finds the
                        // fragments where they went (in-flight ones too: most will land).
                        job.cache(&shared, job.found(&assigned));
                        let _ = ack.send(Ok(()));
                    }
                }
            }
            Err(e) => {
                let fenced = is_fenced(&e);
                tracing::debug!(
                    osd,
                    "put {}/{} v{}: fragment {index} failed: {e}",
                    job.namespace,
                    job.name,
                    job.version
                );
                errors.push((osd, e));
                if !fenced {
                    failed.insert(osd);
                }
                if local || fenced {
                    continue;
                }
                assigned[i] = None;
                let taken: Vec<u64> = assigned
                    .iter()
                    .flatten()
                    .chain(&local_osds)
                    .copied()
                    .collect();
                if let Some(next) =
                    reroute(&job.key, i, &job.slots, &taken, &failed, job.per_domain)
                {
                    tracing::info!(
                        "put {}/{} v{}: fragment {index} re-routed from OSD {osd} to OSD {next}",
                        job.namespace,
                        job.name,
                        job.version
                    );
                    assigned[i] = Some(next);
                    attempts.push(send(index, next, job.files[i].clone(), false));
                }
            }
        }
    }
    let ok = durable.iter().filter(|d| **d).count();
    if let Some(ack) = ack.take() {
        let _ = ack.send(Err(put_failed(&job, ok, errors)));
        return;
    }
    for (holder, done) in assigned.iter_mut().zip(&durable) {
        if !done {
            *holder = None;
        }
    }
    let mut found = job.found(&assigned);
    if ok > k {
        // At least k + 1 durable: the new version survives one more loss.
        found.extra.extend(collect_stale(&job, &shared).await);
    } else {
        // Not safe to drop the older versions yet: keep knowing of them for the next put.
        found.extra.extend(job.stale());
    }
    job.cache(&shared, found);
}

/// Delete the older versions' fragments `job` knows of; returns those that could not be
/// (left for the next put of the object, or for repair).
async fn collect_stale(job: &PutJob, shared: &Shared) -> Vec<(u64, u8, u64)> {
    let stale = job.stale();
    if stale.is_empty() {
        return stale;
    }
    // A fragment of the previous put still on its way would land after its delete: wait for
    // that put to finish (bounded: each of its calls is, and it waits on nothing later).
    if let Some(mut settled) = job.previous.as_ref().and_then(|p| p.settled.clone()) {
        while settled.changed().await.is_ok() {}
    }
    let osds = match shared.map.osds() {
        Ok(osds) => osds,
        Err(e) => {
            tracing::debug!("put {}: no map to collect old versions: {e}", job.key);
            return stale;
        }
    };
    let mut left = Vec::new();
    let mut calls = Vec::new();
    for (version, index, osd) in stale {
        // Only where it costs no timeout: a down OSD's copies wait for repair.
        let Some(entry) = osds
            .iter()
            .find(|o| o.slot.id == osd)
            .filter(|o| matches!(o.state, OsdState::Up | OsdState::Draining))
            .cloned()
        else {
            left.push((version, index, osd));
            continue;
        };
        let message = Message::DeleteFragment {
            namespace: job.namespace.clone(),
            name: job.name.clone(),
            version,
            index,
            tag: job.owner,
        };
        let (clients, options) = (shared.clients.clone(), shared.options.clone());
        calls.push(async move {
            let result = call_one(clients, options, entry, message).await;
            ((version, index, osd), result)
        });
    }
    for (fragment, result) in futures::future::join_all(calls).await {
        if let Err(e) = result {
            tracing::debug!(
                "put {}: old fragment {fragment:?} not deleted (left for repair): {e}",
                job.key
            );
            // Fenced: a newer owner's business now; otherwise try again after the next put.
            if !is_fenced(&e) {
                left.push(fragment);
            }
        }
    }
    left
}

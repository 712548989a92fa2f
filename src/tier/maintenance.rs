//! A node's background care of its volumes' objects on the EC tier: repair when the OSD map
//! changes (an OSD out, draining or new: rebuild, empty, rebalance), a repair pass every
//! [`PERIODIC`] anyway, and a scrub (every fragment's CRCs checked on its OSD, corrupt ones
//! rebuilt) every [`SCRUB_EVERY`].
//!
//! Why on the owner node: repair writes under the namespace's owner tag, and the owner is the
//! one writer of its namespace, so its repairs never race its own deletes; a volume that moves
//! is repaired by its new owner. The decision of *when* is [`due`], a pure function of the map
//! and the clock; the passes run on the blocking pool, throttled to [`BANDWIDTH`] so client
//! I/O keeps its share, and log their progress.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vstor_backend::ec::repair::{RepairOptions, RepairReport};
use vstor_backend::ec::store::{EcStore, OsdEntry, TierMap};
use vstor_volumedriver::VolumeManager;

/// How often the map is looked at.
pub const TICK: Duration = Duration::from_secs(5);
/// A repair pass runs at least this often, map change or not.
pub const PERIODIC: Duration = Duration::from_secs(3600);
/// A scrub pass runs this often.
pub const SCRUB_EVERY: Duration = Duration::from_secs(24 * 3600);
/// Repair's byte rate (read plus written) per node.
pub const BANDWIDTH: u64 = 128 << 20;

/// What of the map matters to repair: who is a member, in which state, with room or not.
pub type MapSignature = BTreeSet<(u64, &'static str, bool)>;

pub fn signature(osds: &[OsdEntry]) -> MapSignature {
    osds.iter()
        .map(|o| (o.slot.id, o.state.as_str(), o.slot.writable))
        .collect()
}

/// What the background passes are doing, for `/metrics` (counters since the node started).
#[derive(Debug, Default)]
pub struct RepairStatus {
    /// 1 while a repair or scrub pass runs.
    pub running: AtomicU64,
    /// Objects of the namespace being repaired: checked so far, and in all.
    pub objects_checked: AtomicU64,
    pub objects_total: AtomicU64,
    pub passes: AtomicU64,
    pub fragments_rebuilt: AtomicU64,
    pub fragments_moved: AtomicU64,
    pub corrupt_found: AtomicU64,
    pub failures: AtomicU64,
}

/// What the node last completed.
#[derive(Debug, Clone, Default)]
pub struct Done {
    /// The map a pass last finished under without errors.
    pub map: Option<MapSignature>,
    pub repaired_at: Option<Instant>,
    pub scrubbed_at: Option<Instant>,
}

/// Which pass is due now: `Some(true)` a scrub, `Some(false)` a repair, `None` nothing.
pub fn due(done: &Done, map: &MapSignature, now: Instant) -> Option<bool> {
    let older = |at: Option<Instant>, every: Duration| {
        at.is_none_or(|at| now.saturating_duration_since(at) >= every)
    };
    if older(done.scrubbed_at, SCRUB_EVERY) && done.map.is_some() {
        return Some(true);
    }
    if done.map.as_ref() != Some(map) || older(done.repaired_at, PERIODIC) {
        return Some(false);
    }
    None
}

/// Run the loop until the task is aborted.
pub fn start(
    store: Arc<EcStore>,
    map: Arc<dyn TierMap>,
    manager: Arc<VolumeManager>,
    status: Arc<RepairStatus>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut done = Done {
            // The first scrub comes a day after start, not at once.
            scrubbed_at: Some(Instant::now()),
            ..Done::default()
        };
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let Ok(osds) = map.osds() else { continue };
            let sig = signature(&osds);
            let Some(scrub) = due(&done, &sig, Instant::now()) else {
                continue;
            };
            let (store, manager, st) = (store.clone(), manager.clone(), status.clone());
            status.running.store(1, Ordering::Relaxed);
            let pass =
                tokio::task::spawn_blocking(move || run_pass(&store, &manager, scrub, &st)).await;
            status.running.store(0, Ordering::Relaxed);
            status.passes.fetch_add(1, Ordering::Relaxed);
            let clean = match pass {
                Ok(clean) => clean,
                Err(e) => {
                    tracing::error!("tier repair pass failed: {e}");
                    false
                }
            };
            let now = Instant::now();
            if clean {
                done.map = Some(sig);
                done.repaired_at = Some(now);
            }
            if scrub {
                done.scrubbed_at = Some(now);
            }
        }
    })
}

/// One pass over the node's volumes; `true` when every namespace was handled without errors
/// (objects waiting on a down OSD are fine: the next map change brings them back to repair).
fn run_pass(store: &EcStore, manager: &VolumeManager, scrub: bool, status: &RepairStatus) -> bool {
    // Two passes: the first restores redundancy at the least traffic (lost fragments rebuilt,
    // draining OSDs emptied, sound fragments left where they are); the second moves fragments
    // to where placement wants them (a new OSD's share, and the knock-on of a changed map).
    let mut clean = true;
    for rebalance in [false, true] {
        let options = RepairOptions {
            bandwidth: Some(BANDWIDTH),
            verify: scrub && !rebalance,
            rebalance,
        };
        clean &= pass_over_volumes(store, manager, scrub, &options, status);
    }
    clean
}

fn pass_over_volumes(
    store: &EcStore,
    manager: &VolumeManager,
    scrub: bool,
    options: &RepairOptions,
    status: &RepairStatus,
) -> bool {
    let mut clean = true;
    for name in manager.names() {
        let started = Instant::now();
        let report: Result<RepairReport, _> = store.repair_namespace(&name, options, &|p| {
            status
                .objects_checked
                .store(p.objects_checked, Ordering::Relaxed);
            status
                .objects_total
                .store(p.objects_total, Ordering::Relaxed);
            if p.objects_checked.is_multiple_of(256) && p.objects_checked > 0 {
                tracing::info!(
                    volume = %p.namespace,
                    "{}: {}/{} objects, {} fragments rebuilt, {} moved",
                    if scrub { "tier scrub" } else { "tier repair" },
                    p.objects_checked,
                    p.objects_total,
                    p.fragments_rebuilt,
                    p.fragments_moved
                );
            }
        });
        match report {
            Ok(r) => {
                status
                    .fragments_rebuilt
                    .fetch_add(r.fragments_rebuilt, Ordering::Relaxed);
                status
                    .fragments_moved
                    .fetch_add(r.fragments_moved, Ordering::Relaxed);
                status
                    .corrupt_found
                    .fetch_add(r.corrupt_found, Ordering::Relaxed);
                if r.fragments_rebuilt + r.fragments_moved + r.fragments_deleted + r.corrupt_found
                    > 0
                    || !r.unrecoverable.is_empty()
                {
                    tracing::info!(
                        volume = %name,
                        rebuilt = r.fragments_rebuilt,
                        moved = r.fragments_moved,
                        deleted = r.fragments_deleted,
                        corrupt = r.corrupt_found,
                        cross_domain_bytes = r.cross_domain_bytes,
                        lost = r.unrecoverable.len(),
                        secs = started.elapsed().as_secs_f64(),
                        "{} done",
                        if scrub { "tier scrub" } else { "tier repair" }
                    );
                }
                if !r.errors.is_empty() {
                    tracing::warn!(volume = %name, errors = ?r.errors, "tier repair left errors; retrying");
                    clean = false;
                }
            }
            Err(e) => {
                tracing::warn!(volume = %name, "tier repair failed: {e}");
                status.failures.fetch_add(1, Ordering::Relaxed);
                clean = false;
            }
        }
    }
    clean
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstor_backend::ec::store::OsdState;

    fn sig(states: &[OsdState]) -> MapSignature {
        states
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, s.as_str(), *s == OsdState::Up))
            .collect()
    }

    #[test]
    fn a_pass_runs_on_a_new_map_and_periodically_and_a_scrub_daily() {
        let now = Instant::now();
        let map = sig(&[OsdState::Up, OsdState::Up]);
        let fresh = Done {
            scrubbed_at: Some(now),
            ..Done::default()
        };
        assert_eq!(due(&fresh, &map, now), Some(false), "first pass at start");
        let done = Done {
            map: Some(map.clone()),
            repaired_at: Some(now),
            scrubbed_at: Some(now),
        };
        assert_eq!(due(&done, &map, now + TICK), None);
        let changed = sig(&[OsdState::Up, OsdState::Draining]);
        assert_eq!(due(&done, &changed, now + TICK), Some(false));
        assert_eq!(due(&done, &map, now + PERIODIC), Some(false));
        assert_eq!(due(&done, &map, now + SCRUB_EVERY), Some(true));
    }
}

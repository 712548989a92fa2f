//! A cluster node's sweep of DTL leftovers: namespaces its DTL server holds that no volume will
//! ever register, replay or unregister again.
//!
//! *Why there are leftovers.* A volume's DTL entries are removed by its owner's `Unregister`
//! when the volume is deleted, and by the old DTL node's `Unregister` when the volume's DTL is
//! placed elsewhere. If this node was down (or cut off) at that moment, the request never
//! arrived, and nothing else would ever remove the namespace: its entries, up to a volume's
//! whole not-yet-uploaded write buffer, took disk space for good. A volume created again under
//! the name with its DTL here took the namespace over (see `vstor_dtl::DtlStore::register`);
//! any other name stayed.
//!
//! *The rule* ([`leftover`], pure): a namespace is a leftover when the registry has no volume of
//! its name, or the volume's record places its DTL on another node, or on none. A volume with
//! an explicit DTL address (`--dtl HOST:PORT`) is always kept: its address cannot be matched to
//! this node with certainty. The sweep also needs the namespace to be *idle*: no client
//! registered, wrote, trimmed or read it for `dtl_leftover_grace_secs` (a cluster setting, 10
//! minutes by default), which covers a volume being created or its DTL being moved here while
//! the record does not say so yet. The removal itself checks again, under the namespace's lock,
//! that the namespace is unchanged and still idle (`DtlStore::remove_leftover`).
//!
//! An unreachable registry skips the pass: without the record nothing is removed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vstor_dtl::DtlStore;

use crate::registry::{Registry, VolumeRecord};

/// The sweep looks at the namespaces at least this often (more often for a short grace).
pub const EVERY: Duration = Duration::from_secs(60);

/// What the sweep did, for `/metrics` (counters since the node started).
#[derive(Debug, Default)]
pub struct SweepStatus {
    pub passes: AtomicU64,
    pub removed: AtomicU64,
    /// Passes or namespaces skipped because the registry or the store failed.
    pub failures: AtomicU64,
}

/// Why namespace `namespace` on node `me` is a leftover, given the registry's record of the
/// volume of that name (`None`: the registry has none); `None`: keep it.
pub fn leftover(me: &str, record: Option<&VolumeRecord>) -> Option<String> {
    let Some(record) = record else {
        return Some(
            "the registry has no volume of that name (deleted while this node was away)".into(),
        );
    };
    match (&record.dtl_node, &record.dtl_addr) {
        (Some(node), _) if node == me => None,
        (Some(node), _) => Some(format!("the volume's DTL is on node {node} now")),
        (None, Some(_)) => None,
        (None, None) => Some("the volume has no DTL now".into()),
    }
}

/// How often to look, for grace `grace`: twice per grace, between 1 s and [`EVERY`].
fn tick(grace: Duration) -> Duration {
    (grace / 2).clamp(Duration::from_secs(1), EVERY)
}

/// Sweep `store` every so often, as node `me` of `registry`'s cluster; runs until aborted.
pub fn start(
    store: Arc<DtlStore>,
    registry: Arc<dyn Registry>,
    me: String,
    status: Arc<SweepStatus>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let grace = match registry.settings().await {
                Ok(settings) => settings.dtl_leftover_grace(),
                Err(e) => {
                    status.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "DTL leftover sweep: cannot read the cluster settings; skipping a pass");
                    tokio::time::sleep(EVERY).await;
                    continue;
                }
            };
            sweep_once(&store, registry.as_ref(), &me, grace, &status).await;
            status.passes.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(tick(grace)).await;
        }
    })
}

/// One pass: every namespace idle for `grace` whose record says it is a leftover is removed.
async fn sweep_once(
    store: &Arc<DtlStore>,
    registry: &dyn Registry,
    me: &str,
    grace: Duration,
    status: &SweepStatus,
) {
    let idle = store
        .idle_namespaces()
        .into_iter()
        .filter(|(_, _, idle)| *idle >= grace);
    for (namespace, registration, _) in idle {
        let record = match registry.volume(&namespace).await {
            Ok(record) => record,
            Err(e) => {
                status.failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%namespace, error = %e, "DTL leftover sweep: cannot read the volume's record; kept");
                continue;
            }
        };
        let Some(why) = leftover(me, record.as_ref()) else {
            continue;
        };
        let removing = {
            let store = store.clone();
            let namespace = namespace.clone();
            tokio::task::spawn_blocking(move || {
                store.remove_leftover(&namespace, registration, grace)
            })
        };
        match removing.await {
            Ok(Ok(true)) => {
                status.removed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    %namespace,
                    owner_tag = registration.owner_tag,
                    reason = %why,
                    "removed a leftover DTL namespace"
                );
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                status.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%namespace, error = %e, "cannot remove a leftover DTL namespace");
            }
            Err(e) => {
                status.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%namespace, error = %e, "the DTL leftover removal panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::VolumeState;
    use vstor_volumedriver::DtlMode;

    fn record(dtl_node: Option<&str>, dtl_addr: Option<&str>) -> VolumeRecord {
        VolumeRecord {
            name: "vol".into(),
            owner: "n0".into(),
            owner_tag: 3,
            dtl_node: dtl_node.map(str::to_string),
            dtl_addr: dtl_addr.map(str::to_string),
            dtl_mode: DtlMode::Sync,
            state: VolumeState::Serving,
            size: 1 << 30,
            created_at: 1,
        }
    }

    #[test]
    fn a_namespace_is_a_leftover_only_when_no_record_places_the_dtl_here() {
        assert!(leftover("n1", None)
            .unwrap()
            .contains("no volume of that name"));
        assert_eq!(leftover("n1", Some(&record(Some("n1"), None))), None);
        assert!(leftover("n1", Some(&record(Some("n2"), None)))
            .unwrap()
            .contains("on node n2"));
        assert!(leftover("n1", Some(&record(None, None)))
            .unwrap()
            .contains("no DTL"));
        // An explicit address may well be this node's: kept.
        assert_eq!(
            leftover("n1", Some(&record(None, Some("10.0.0.1:7801")))),
            None
        );
        // A halted volume whose DTL is here is still replayed from here when it comes back.
        let mut halted = record(Some("n1"), None);
        halted.state = VolumeState::Halted {
            reason: "x".into(),
            at_ms: 0,
        };
        assert_eq!(leftover("n1", Some(&halted)), None);
    }

    #[test]
    fn the_sweep_looks_twice_per_grace_within_bounds() {
        assert_eq!(tick(Duration::from_secs(600)), EVERY);
        assert_eq!(tick(Duration::from_secs(10)), Duration::from_secs(5));
        assert_eq!(tick(Duration::ZERO), Duration::from_secs(1));
    }
}

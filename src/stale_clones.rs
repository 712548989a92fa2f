//! Before a volume or snapshot delete is refused because a snapshot lists clones: drop the
//! entries of clones that no longer exist (`VolumeManager::forget_deleted_clones` says how it
//! tells). Deleting a clone on a node that does not serve its parent leaves its entry behind, and
//! without this the parent could never be deleted. In a cluster a clone the registry has a record
//! of exists, whatever the backend says; a registry that cannot be asked keeps every entry.

use std::collections::BTreeSet;

use crate::api::{blocking, ApiError, ApiState};

/// Which of the clones `listed` by volume `parent`'s snapshots the cluster registry has a record
/// of; a clone the registry cannot be asked about counts as known (its entry stays).
pub(crate) async fn known_to(
    cluster: &crate::cluster::Cluster,
    parent: &str,
    listed: Vec<String>,
) -> BTreeSet<String> {
    let mut known = BTreeSet::new();
    for clone in listed {
        match cluster.registry.volume(&clone).await {
            Ok(None) => {}
            Ok(Some(_)) => {
                known.insert(clone);
            }
            Err(e) => {
                tracing::debug!(volume = %parent, %clone, error = %e, "cannot ask the registry about a clone; its entry stays");
                known.insert(clone);
            }
        }
    }
    known
}

/// Drop the stale clone entries of volume `name`'s snapshots (only `snapshot`'s, when given).
/// Nothing is done (and nothing asked) when none lists a clone.
pub(crate) async fn forget(
    state: &ApiState,
    name: &str,
    snapshot: Option<&str>,
) -> Result<(), ApiError> {
    let Ok(volume) = state.manager.get(name) else {
        return Ok(());
    };
    let listed: Vec<String> = volume
        .snapshots()
        .into_iter()
        .filter(|s| snapshot.is_none_or(|want| want == s.name))
        .flat_map(|s| s.clones)
        .collect();
    if listed.is_empty() {
        return Ok(());
    }
    let known = match &state.cluster {
        Some(cluster) => known_to(cluster, name, listed).await,
        None => BTreeSet::new(),
    };
    let manager = state.manager.clone();
    let (target, snapshot) = (name.to_string(), snapshot.map(str::to_string));
    blocking(move || manager.forget_deleted_clones(&target, snapshot.as_deref(), &known)).await?;
    Ok(())
}

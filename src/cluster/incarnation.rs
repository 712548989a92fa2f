//! The cluster's incarnation floor: the highest volume incarnation any node has issued, kept in
//! the registry (`/vstor/incarnation`), so that incarnations order creations exactly whatever
//! the nodes' clocks say.
//!
//! *Why.* A volume's incarnation (`VolumeConfig::incarnation`) tells a volume from a deleted
//! namesake: the DTL drops a namespace's entries for a newer incarnation and refuses an older
//! one as a stale copy (`vstor_dtl::DtlStore::register`). It is the creation time in
//! nanoseconds, taken on the node that creates the volume. If that node's clock were behind the
//! clock of the node that created the deleted namesake, by more than the time between the delete
//! and the new create, the new volume would count as *older*: its DTL registration refused, its
//! mirror fenced, the volume halted on its first write. So a cluster create first reads the
//! floor, the new volume's incarnation is above it (`VolumeOptions::incarnation_floor`), and the
//! create raises the floor to it before the volume's registry record exists (so before anybody
//! can delete it).
//!
//! The floor is only ever raised (compare-and-swap, [`raised`] is the pure rule). If the raise
//! cannot be written (etcd unreachable right after the create), the create stands with a
//! warning: that volume's incarnation is then ordered by clocks, as before.

use std::sync::Arc;

use crate::registry::{Registry, Result};

/// The floor's key, relative to the registry's root.
const KEY: &str = "incarnation";
/// Compare-and-swap attempts before giving up on a raise (other creates racing).
const ATTEMPTS: usize = 8;

/// The floor after issuing `issued`, if it has to change (`current`: what it is now, `None`
/// when it was never written).
pub fn raised(current: Option<u64>, issued: u64) -> Option<u64> {
    match current {
        Some(floor) if floor >= issued => None,
        _ => Some(issued),
    }
}

fn decode(bytes: &[u8]) -> Option<u64> {
    serde_json::from_slice(bytes).ok()
}

/// The highest incarnation issued in the cluster so far (0: none recorded). An unreadable value
/// counts as 0 with a warning: it only ever raises new incarnations, never lowers them.
pub async fn floor(registry: &Arc<dyn Registry>) -> Result<u64> {
    Ok(match registry.get_record(KEY).await? {
        None => 0,
        Some((bytes, _)) => decode(&bytes).unwrap_or_else(|| {
            tracing::warn!(
                key = KEY,
                "the registry's incarnation floor is not a number; ignoring it"
            );
            0
        }),
    })
}

/// Raise the floor to `issued` (volume `volume`'s new incarnation) unless it is already at or
/// above it. Errors are logged, not returned: see the module docs.
pub async fn raise(registry: &Arc<dyn Registry>, volume: &str, issued: u64) {
    for _ in 0..ATTEMPTS {
        let (current, revision) = match registry.get_record(KEY).await {
            Ok(Some((bytes, revision))) => (decode(&bytes), revision),
            Ok(None) => (None, 0),
            Err(e) => {
                tracing::warn!(%volume, error = %e, "cannot read the incarnation floor; this volume's incarnation is ordered by clocks");
                return;
            }
        };
        let Some(new) = raised(current, issued) else {
            return;
        };
        let value = new.to_string();
        match registry
            .swap_record(KEY, revision, Some(value.as_bytes()), None)
            .await
        {
            Ok(true) => return,
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(%volume, error = %e, "cannot raise the incarnation floor; this volume's incarnation is ordered by clocks");
                return;
            }
        }
    }
    tracing::warn!(%volume, "the incarnation floor kept changing under a raise; this volume's incarnation is ordered by clocks");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_only_rises() {
        assert_eq!(raised(None, 5), Some(5));
        assert_eq!(raised(Some(3), 5), Some(5));
        assert_eq!(raised(Some(5), 5), None);
        assert_eq!(raised(Some(9), 5), None);
    }

    #[tokio::test]
    async fn a_local_registry_keeps_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let registry: Arc<dyn Registry> = Arc::new(
            crate::registry::local::LocalRegistry::open(&dir.path().join("registry")).unwrap(),
        );
        assert_eq!(floor(&registry).await.unwrap(), 0);
        raise(&registry, "a", 100).await;
        raise(&registry, "b", 50).await;
        assert_eq!(floor(&registry).await.unwrap(), 100);
        raise(&registry, "c", 200).await;
        assert_eq!(floor(&registry).await.unwrap(), 200);
    }
}

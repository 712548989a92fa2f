//! `DELETE /v1/volumes/{name}` of a volume the registry says this node owns but that nothing
//! here serves: halted here (its adoption failed and the operator gives up on it), or left
//! behind by a record write that took effect after this node gave up on it (a rolled-back
//! create, a delete whose record removal timed out). Before, every request for such a volume
//! was answered "halted" or "being taken over, retry in a moment", and none removed it.
//!
//! The same delete runs on any node for a volume recorded halted on a node that is dead: nothing
//! adopts such a volume (unless its DTL node comes back), and before, its delete answered
//! "owner dead, cannot be managed until it is adopted", so the operator had to `volume adopt`
//! it (which halted it again, on a live node) and then delete it.
//!
//! Refused while an adoption of the volume is under way on this node, while the node is
//! fenced, and by the engine's checks (`VolumeManager::check_unserved_delete`: clones that still
//! exist, which the registry helps tell, and a newer owner tag on the backend). Then the record
//! goes first, conditional on the owner tag read, and the backend namespace, DTL registration
//! and write-buffer leftovers after it (the engine's module docs say why in that order). What
//! could not be removed after the record went is reported in the answer (`left_behind`) and
//! logged; the delete stands.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::Json;

use super::Cluster;
use crate::api::{blocking, ApiError, ApiState};
use crate::api_types::VolumeDeleted;
use crate::registry::{RegistryError, VolumeRecord};

/// Delete `record`'s volume, which names this node (or a dead one, halted) as its owner and is
/// not served here.
pub(super) async fn delete(
    state: &ApiState,
    cluster: &Arc<Cluster>,
    record: &VolumeRecord,
) -> Result<Json<VolumeDeleted>, ApiError> {
    let name = record.name.clone();
    let node = &state.node.name;
    if cluster.is_fenced() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("node {node} is fenced (it cannot renew its registry lease): volume {name} was not deleted; retry once the node is healthy"),
        ));
    }
    if state
        .failover
        .as_ref()
        .is_some_and(|f| f.log.pending(&name))
    {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("volume {name} is being taken over by node {node}; not deleted, retry once it is served or halted"),
        ));
    }
    // Not adopted by the failover pass (as an unserved volume) while it is being deleted.
    let _held = state.failover.as_ref().map(|f| f.log.hold(&name));
    // Clones deleted through other nodes stay listed by this volume's snapshots: only those
    // that still exist hold the delete up.
    let manager = state.manager.clone();
    let target = name.clone();
    let listed = blocking(move || manager.backend_listed_clones(&target)).await?;
    let known = crate::stale_clones::known_to(cluster, &name, listed).await;
    let manager = state.manager.clone();
    let (target, tag) = (name.clone(), record.owner_tag);
    let unserved = blocking(move || manager.check_unserved_delete(&target, tag, &known)).await?;
    match cluster.registry.delete_volume(&name, tag).await {
        Ok(()) => {}
        Err(e @ RegistryError::StaleTag { .. }) => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "volume {name} was taken over while it was being deleted; nothing deleted: {e}"
                ),
            ))
        }
        Err(e) => {
            let ApiError(status, message) = ApiError::from(e);
            return Err(ApiError(
                status,
                format!("volume {name}: its cluster record could not be removed, so nothing was deleted: {message}"),
            ));
        }
    }
    let manager = state.manager.clone();
    let had_data = unserved.has_backend_data();
    let left_behind = tokio::task::spawn_blocking(move || manager.purge_unserved(unserved))
        .await
        .unwrap_or_else(|e| vec![format!("the clean-up task failed: {e}")]);
    state.exports.forget(&name, None);
    state.scrubs.forget(&name);
    tracing::info!(volume = %name, owner = %record.owner, halted = !matches!(record.state, crate::registry::VolumeState::Serving), backend_data = had_data, "volume deleted (not served here)");
    Ok(Json(VolumeDeleted {
        deleted: name,
        left_behind,
        ..VolumeDeleted::default()
    }))
}

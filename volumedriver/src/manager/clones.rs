//! Forgetting clones that were deleted where their parent could not hear of it.
//!
//! A snapshot lists the clones made from it, and a volume or snapshot with clones cannot be
//! deleted (the clones read its SCOs). Deleting a clone takes it off that list, but only when
//! the parent is served by the same node. In a cluster the clone may have moved or failed over
//! to another node, or been deleted through the unserved path; its parent then keeps listing a
//! clone that no longer exists, and could never be deleted.
//!
//! So before refusing a delete for its clones, the node asks whether each listed clone still
//! exists: served or failed here, known to the caller (the cluster registry has a record of
//! it), or with a backend namespace whose configuration names this snapshot as its parent. A
//! clone none of that holds for is gone for good (the backend is shared by every node, and a
//! clone's namespace is made before it is listed and removed when it is deleted), and its entry
//! is dropped. When the backend cannot be asked the entry stays: the delete is refused as before.

use std::collections::BTreeSet;

use crate::config::VolumeConfig;
use crate::error::Result;

use super::VolumeManager;

impl VolumeManager {
    /// Drop from volume `name`'s snapshots (only `snapshot`, when given) the clones that no
    /// longer exist (see the module docs); `known` are names that exist elsewhere. Returns the
    /// (snapshot, clone) entries dropped.
    pub fn forget_deleted_clones(
        &self,
        name: &str,
        snapshot: Option<&str>,
        known: &BTreeSet<String>,
    ) -> Result<Vec<(String, String)>> {
        let volume = self.get(name)?;
        let mut forgotten = Vec::new();
        for record in volume.snapshots() {
            if snapshot.is_some_and(|s| s != record.name) {
                continue;
            }
            for clone in &record.clones {
                if self.clone_exists(name, &record.name, clone, known) {
                    continue;
                }
                volume.set_clone(&record.name, clone, false)?;
                tracing::warn!(volume = %name, snapshot = %record.name, %clone, "forgot a clone that no longer exists (deleted through another node)");
                forgotten.push((record.name.clone(), clone.clone()));
            }
        }
        Ok(forgotten)
    }

    /// Whether `clone`, listed by `parent`'s snapshot `snapshot`, may still exist.
    pub(super) fn clone_exists(
        &self,
        parent: &str,
        snapshot: &str,
        clone: &str,
        known: &BTreeSet<String>,
    ) -> bool {
        if known.contains(clone)
            || self.volumes.read().contains_key(clone)
            || self.failed.read().contains_key(clone)
        {
            return true;
        }
        match self.backend_tag(clone) {
            Ok(None) => false,
            // Another volume of that name (the clone was deleted and the name reused) is not it.
            Ok(Some(_)) => match VolumeConfig::load_from_backend(self.backend.as_ref(), clone) {
                Ok(config) => config
                    .parent
                    .is_some_and(|p| p.volume == parent && p.snapshot == snapshot),
                Err(_) => true,
            },
            Err(_) => true,
        }
    }
}

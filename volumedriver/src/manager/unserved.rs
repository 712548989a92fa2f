//! Deleting a volume that this node is the recorded owner of but does not serve.
//!
//! Why this exists: a cluster registry can name a node as a volume's owner while nothing on
//! that node serves it. The volume halted there (its adoption failed and the operator gives up
//! on it), or a record write that got no answer took effect after the node had given up on it
//! (a create it rolled back, a delete whose record removal timed out). Such a record answered
//! every request with "halted" or "being taken over", and no command removed it. The node's API
//! deletes it in three steps, this module doing the first and the last:
//!
//! 1. [`VolumeManager::check_unserved_delete`]: refuse, removing nothing, if the volume is
//!    served here, if a snapshot of it has clones that still exist (they read its SCOs; a clone
//!    deleted through a node that did not serve this volume stays listed, and is told apart as
//!    in `clones.rs`), or if its backend namespace carries a newer owner tag than the record
//!    (another node claimed it).
//! 2. The caller removes the registry record, conditional on its owner tag.
//! 3. [`VolumeManager::purge_unserved`]: the backend namespace, the DTL registration, what is
//!    left in the write buffer, and, for a clone, its entry in its parent's snapshot (when the
//!    parent is served here; otherwise that is reported as left behind).
//!
//! Record first: once it is gone no node can adopt the volume (adoption starts with an
//! ownership transaction on the record), so the namespace can go without racing one; and an
//! adoption that took ownership before makes step 2 fail on the tag, with nothing deleted.

use std::collections::BTreeSet;

use vstor_backend::{BackendError, ObjectStore};

use crate::config::{TLogList, VolumeConfig, TLOG_LIST_OBJECT};
use crate::error::{Result, VolumeError};
use crate::volume::unregister_dtl;

use super::handoff::remove_dir;
use super::VolumeManager;

/// A volume [`VolumeManager::check_unserved_delete`] found deletable: what
/// [`VolumeManager::purge_unserved`] needs.
#[derive(Debug)]
pub struct Unserved {
    name: String,
    tag: u64,
    /// Whether the backend has a namespace for it (a rolled-back create has none).
    namespace: bool,
    /// Its configuration on the backend, when it has one (for the DTL registration).
    config: Option<VolumeConfig>,
}

impl Unserved {
    /// Whether the backend holds data of the volume.
    pub fn has_backend_data(&self) -> bool {
        self.namespace
    }
}

impl VolumeManager {
    /// The clones the snapshots of volume `name` list on the backend (for a volume not served
    /// here: the caller asks the registry which of them exist before
    /// [`check_unserved_delete`](Self::check_unserved_delete)).
    pub fn backend_listed_clones(&self, name: &str) -> Result<Vec<String>> {
        crate::config::validate_volume_name(name)?;
        Ok(snapshot_clones(self.backend.as_ref(), name)?
            .into_iter()
            .map(|(_, clone)| clone)
            .collect())
    }

    /// Check that volume `name`, which the cluster registry says this node owns under owner
    /// tag `tag` but which this node does not serve, may be deleted (see the module docs).
    ///
    /// `known`: clones that exist elsewhere (the cluster registry has a record of them); a
    /// listed clone that is neither known, nor served or failed here, nor has a namespace
    /// naming this volume's snapshot as its parent, is gone and does not hold the delete up.
    pub fn check_unserved_delete(
        &self,
        name: &str,
        tag: u64,
        known: &BTreeSet<String>,
    ) -> Result<Unserved> {
        crate::config::validate_volume_name(name)?;
        if self.volumes.read().contains_key(name) {
            return Err(VolumeError::InvalidConfig {
                volume: name.to_string(),
                reason: "it is served by this node; delete it as usual".into(),
            });
        }
        let backend = self.backend.as_ref();
        let Some(current) = self.backend_tag(name)? else {
            return Ok(Unserved {
                name: name.to_string(),
                tag,
                namespace: false,
                config: None,
            });
        };
        if current > tag {
            return Err(VolumeError::Adopted {
                volume: name.to_string(),
                ours: tag,
                current,
            });
        }
        let clones: Vec<String> = snapshot_clones(backend, name)?
            .into_iter()
            .filter(|(snapshot, clone)| self.clone_exists(name, snapshot, clone, known))
            .map(|(_, clone)| clone)
            .collect();
        if !clones.is_empty() {
            return Err(VolumeError::HasClones {
                volume: name.to_string(),
                what: "a snapshot".into(),
                clones,
            });
        }
        let config = match VolumeConfig::load_from_backend(backend, name) {
            Ok(config) => Some(config),
            // A namespace without a configuration (a create interrupted early): nothing
            // registered with a DTL either.
            Err(
                VolumeError::Backend {
                    source: BackendError::NoSuchObject { .. },
                    ..
                }
                | VolumeError::NotFound { .. },
            ) => None,
            Err(e) => return Err(e),
        };
        Ok(Unserved {
            name: name.to_string(),
            tag,
            namespace: true,
            config,
        })
    }

    /// The owner tag of backend namespace `namespace`, or `None` when the
    /// backend has no such namespace.
    pub(super) fn backend_tag(&self, namespace: &str) -> Result<Option<u64>> {
        let exists = self
            .backend
            .namespace_exists(namespace)
            .map_err(VolumeError::backend(namespace))?;
        if !exists {
            return Ok(None);
        }
        self.backend
            .owner_tag(namespace)
            .map(Some)
            .map_err(VolumeError::backend(namespace))
    }

    /// Remove what is left of a volume [`check_unserved_delete`](Self::check_unserved_delete)
    /// accepted, once its registry record is gone: its backend namespace, its DTL registration
    /// and its write-buffer directory. Returns what could not be removed, each with the reason
    /// (the record is gone already, so the delete stands; the operator learns what to clean).
    pub fn purge_unserved(&self, unserved: Unserved) -> Vec<String> {
        let name = unserved.name.as_str();
        let mut left = Vec::new();
        if let Some(config) = &unserved.config {
            let tag = unserved.tag.max(config.owner_tag);
            if let Err(e) = unregister_dtl(config, tag, self.config.dtl_tls.clone()) {
                left.push(format!("its DTL entries: {e}"));
            }
        }
        if let Some(parent) = unserved.config.as_ref().and_then(|c| c.parent.as_ref()) {
            // A clone: its parent's snapshot must stop listing it, or the parent could never be
            // deleted. Only a parent served here can be told.
            let forgotten = match self.get(&parent.volume) {
                Ok(source) => source
                    .set_clone(&parent.snapshot, name, false)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = forgotten {
                left.push(format!(
                    "its entry in the clone list of {}'s snapshot {}: {e}",
                    parent.volume, parent.snapshot
                ));
            }
        }
        if unserved.namespace {
            match self.backend.delete_namespace(name) {
                Ok(()) | Err(BackendError::NoSuchNamespace { .. }) => {}
                Err(e) => left.push(format!("its backend namespace: {e}")),
            }
        }
        if let Err(e) = remove_dir(name, &self.config.write_buffer_dir.join(name)) {
            left.push(format!("its write buffer: {e}"));
        }
        self.failed.write().remove(name);
        if let Err(e) = self.update_registry(|names| names.retain(|n| n != name)) {
            left.push(format!("its entry in this node's volume list: {e}"));
        }
        for what in &left {
            tracing::warn!(volume = %name, "deleted, but could not remove {what}");
        }
        tracing::info!(volume = %name, backend_data = unserved.namespace, "unserved volume deleted");
        left
    }
}

/// `(snapshot, clone)` for every clone the backend TLog list of volume `name` lists.
fn snapshot_clones(backend: &dyn ObjectStore, name: &str) -> Result<Vec<(String, String)>> {
    let list = match backend.get(name, TLOG_LIST_OBJECT) {
        Ok(bytes) => TLogList::decode(name, &bytes)?,
        Err(BackendError::NoSuchObject { .. } | BackendError::NoSuchNamespace { .. }) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(VolumeError::backend(name)(e)),
    };
    Ok(list
        .snapshots
        .into_iter()
        .flat_map(|s| {
            let snapshot = s.name;
            s.clones.into_iter().map(move |c| (snapshot.clone(), c))
        })
        .collect())
}

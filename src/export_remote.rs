//! The node's volumes as the edge server sees them (`vstor serve --edge-listen ADDR`): each
//! lookup gives the same [`VolumeExport`] the NBD server and the vhost-user backend use, plus a
//! [`ServedState`] read on every request from the volume's lock-free accessors
//! (`owner_tag`, `dtl_in_sync`, `fenced`, `is_gone`), so a check never waits for the volume's
//! state lock; the allow list (`access`, read at the handshake and once a second per edge
//! connection, never per request) is the one thing that takes it. `VOLUME@SNAPSHOT` gives the snapshot read-only, as over NBD.

use std::sync::Arc;

use vstor_edge::remote::proto::AllowList;
use vstor_edge::remote::{
    Handoff, Opening, OpeningFuture, RemoteExports, ServedState, ServedVolume,
};
use vstor_volumedriver::Volume;

use crate::export::{export_volume, snapshot_export_name, Exports, SnapshotExport, VolumeExport};

/// [`ServedState`] of one volume on this node.
struct VolumeState(Arc<Volume>);

impl ServedState for VolumeState {
    fn tag(&self) -> u64 {
        self.0.owner_tag()
    }

    fn dtl_in_sync(&self) -> bool {
        self.0.dtl_in_sync()
    }

    fn fenced(&self) -> Option<String> {
        self.0.fenced()
    }

    fn alive(&self) -> bool {
        // A volume being handed to another node is no longer served here: the edge looks for
        // the new owner instead of waiting on refused writes.
        !self.0.is_gone() && !self.0.is_releasing()
    }

    fn handoff(&self) -> Handoff {
        if self.0.is_handed_off() {
            Handoff::Released
        } else if self.0.is_releasing() {
            Handoff::Releasing
        } else {
            Handoff::None
        }
    }

    fn access(&self) -> AllowList {
        // A snapshot's state is its volume's: it follows the volume's list, as over NBD.
        let access = self.0.access();
        AllowList {
            subjects: access.allow_subjects,
            networks: access.allow_networks,
        }
    }
}

/// The node's volumes (and their snapshots) for the edge server.
pub struct RemoteVolumes {
    pub exports: Arc<Exports>,
    /// The adoptions and moves under way on this node (`FailoverLog`); `None` outside a cluster.
    pub opening: Option<Arc<Opening>>,
}

impl RemoteExports for RemoteVolumes {
    fn lookup(&self, name: &str) -> Option<ServedVolume> {
        if let Some((volume, snapshot)) = snapshot_export_name(name) {
            let view = self.exports.snapshot_view(volume, snapshot).ok()?;
            let source = view.volume().clone();
            return Some(ServedVolume {
                target: Arc::new(SnapshotExport(view)),
                state: Arc::new(VolumeState(source)),
            });
        }
        let volume = self.exports.manager().get(name).ok()?;
        Some(ServedVolume {
            target: Arc::new(VolumeExport(volume.clone())),
            state: Arc::new(VolumeState(volume)),
        })
    }

    fn opening(&self, name: &str) -> Option<OpeningFuture> {
        self.opening.as_ref()?.until_ended(export_volume(name))
    }
}

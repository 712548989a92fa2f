//! Restarting one volume in place, for a volume that stopped serving for a reason that has since
//! gone away: halted because the backend could not give back its data (an EC object with fewer
//! than `k` fragments reachable while OSDs were down), or failed to open at node start (the
//! backend unreachable then).
//!
//! Why not for a running volume: a restart reopens the volume from its write buffer while
//! frontends may still hold the old instance, and only a volume that serves no I/O (halted, or
//! never opened) guarantees that no write is half-way into the old instance's files meanwhile.
//! A running volume that needs a fresh start gets one from a node restart or a move.

use std::sync::Arc;

use crate::error::{Result, VolumeError};
use crate::volume::Volume;

use super::VolumeManager;

impl VolumeManager {
    /// Stop halted (or failed) volume `name` and open it again from its write buffer, the MDS
    /// or the backend, and its DTL, exactly as a node start does. On success it is served again
    /// (clients reconnect: the old instance answers them as stopped); on failure it is listed as
    /// failed with the reason, and can be restarted again.
    pub fn restart(self: &Arc<Self>, name: &str) -> Result<Arc<Volume>> {
        let old = self.volumes.read().get(name).cloned();
        match &old {
            Some(volume) => {
                if volume.info().halted_reason.is_none() {
                    return Err(VolumeError::Refused {
                        volume: name.to_string(),
                        reason: "the volume is running; only a halted volume, or one that failed to restart, can be restarted".into(),
                    });
                }
                // Take it out of the table first, so a concurrent restart finds nothing to do.
                let mut volumes = self.volumes.write();
                if !volumes.get(name).is_some_and(|v| Arc::ptr_eq(v, volume)) {
                    return Err(VolumeError::Refused {
                        volume: name.to_string(),
                        reason: "the volume is being restarted already".into(),
                    });
                }
                volumes.remove(name);
            }
            None => {
                if self.failed.write().remove(name).is_none() {
                    // Not served here: the same error as any other call on it.
                    return self.get(name);
                }
            }
        }
        if let Some(volume) = old {
            volume.stop();
            volume.detach_dtl();
            // Returns once no upload step of the old instance runs any more.
            self.stop_uploader(name);
            self.mds_stopped(name, false);
        }
        tracing::info!(volume = %name, "restarting the volume");
        self.open_registered(name).inspect_err(|e| {
            tracing::error!(volume = %name, error = %e, "volume could not be restarted");
            self.failed.write().insert(name.to_string(), e.to_string());
        })
    }
}

//! Handing a volume to another node: a clean release (for a move) and dropping a volume another
//! node has already taken (after a failover this node was fenced through).
//!
//! Neither touches the backend namespace or the DTL registration: they belong to the next owner,
//! whose newer owner tag fences anything this node might still send.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Standing;
use crate::error::{Result, VolumeError};
use crate::volume::Volume;

use super::VolumeManager;

impl VolumeManager {
    /// Hand volume `name` off cleanly: refuse new writes, flush, close the current TLog, wait up
    /// to `timeout` until everything is on the backend, then stop serving it (stop the volume,
    /// detach its DTL, drop it from this node's registry file and write buffer). The backend data
    /// and the DTL stay for the next owner, which adopts it with a newer owner tag.
    ///
    /// If the data does not reach the backend in time (or the flush fails) the volume accepts
    /// writes again, keeps being served here, and the error says why.
    pub fn release(&self, name: &str, timeout: Duration) -> Result<()> {
        let volume = self.get(name)?;
        let deadline = Instant::now() + timeout;
        volume.set_releasing(true);
        let drained = volume
            .flush()
            .and_then(|()| volume.close_current_tlog())
            .and_then(|()| {
                if volume.wait_for_uploads(deadline) {
                    Ok(())
                } else {
                    let info = volume.info();
                    Err(VolumeError::Refused {
                        volume: name.to_string(),
                        reason: format!(
                            "release: {} bytes in {} upload steps did not reach the backend within {timeout:?}{}; the volume stays on this node",
                            info.not_uploaded_bytes,
                            info.upload_queue,
                            info.last_upload_error
                                .map(|e| format!(" (last upload error: {e})"))
                                .unwrap_or_default()
                        ),
                    })
                }
            });
        if let Err(e) = drained {
            volume.set_releasing(false);
            tracing::warn!(volume = %name, error = %e, "release failed; still serving the volume");
            return Err(e);
        }
        volume.set_handed_off();
        self.unserve(name, &volume)?;
        tracing::info!(volume = %name, "volume released: all data on the backend, no longer served here");
        Ok(())
    }

    /// Stop serving volume `name`, which node `new_owner` owns now, without uploading anything
    /// (the new owner's tag fences this node's uploads anyway), remove its write buffer, and
    /// remember where it went so `get` and `moved` can say so. Works for a volume that failed to
    /// restart here too.
    pub fn drop_moved(&self, name: &str, new_owner: &str) -> Result<()> {
        let served = self.volumes.read().get(name).cloned();
        let failed = self.failed.write().remove(name).is_some();
        match served {
            Some(volume) => self.unserve(name, &volume)?,
            None if failed => {
                let dir = self.config.write_buffer_dir.join(name);
                remove_dir(name, &dir)?;
                self.update_registry(|names| names.retain(|n| n != name))?;
            }
            None => {
                if !self.moved.read().contains_key(name) {
                    return Err(VolumeError::NotFound {
                        volume: name.to_string(),
                    });
                }
            }
        }
        self.moved
            .write()
            .insert(name.to_string(), new_owner.to_string());
        tracing::warn!(volume = %name, new_owner, "volume moved to another node; dropped here");
        Ok(())
    }

    /// Why volume `name`, served here, no longer owns its backend namespace, or `None` if it
    /// still does. For a node back from a fence that finds no cluster record of the volume:
    /// either the volume never was in the cluster (it serves on), or it was deleted there while
    /// this node was cut off, possibly re-created under the same name by another node (it must
    /// not serve: its writes would never reach a backend, and the name is someone else's).
    /// "Still ours": the namespace exists, carries no newer owner tag than this volume's, and
    /// its configuration is this volume's incarnation (same creation time).
    pub fn backend_lost(&self, name: &str) -> Result<Option<String>> {
        let config = self.get(name)?.config();
        Ok(match config.standing(self.backend.as_ref())? {
            Standing::Ours => None,
            Standing::Deleted => Some("its backend namespace was deleted".into()),
            Standing::Claimed { current } => Some(format!(
                "its backend namespace was claimed with owner tag {current} (this node holds {})",
                config.owner_tag
            )),
            Standing::Replaced {
                created,
                incarnation,
            } => Some(format!(
                "its backend namespace holds another volume of the same name (created at {created}, incarnation {incarnation}; this one at {}, incarnation {})",
                config.created, config.incarnation
            )),
        })
    }

    /// Stop serving a volume and forget it locally: out of the volume table, stopped, DTL link
    /// and uploader gone, write buffer removed, out of the registry file.
    fn unserve(&self, name: &str, volume: &Arc<Volume>) -> Result<()> {
        {
            let mut volumes = self.volumes.write();
            if volumes.get(name).is_some_and(|v| Arc::ptr_eq(v, volume)) {
                volumes.remove(name);
            }
        }
        volume.stop();
        volume.detach_dtl();
        self.stop_uploader(name);
        self.mds_stopped(name, false);
        self.forget_cached(&volume.config().namespace);
        remove_dir(name, volume.dir())?;
        self.update_registry(|names| names.retain(|n| n != name))
    }
}

pub(super) fn remove_dir(name: &str, dir: &std::path::Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VolumeError::io(name, dir)(e)),
    }
}

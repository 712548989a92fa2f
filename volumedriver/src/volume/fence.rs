//! Gates that stop a volume acknowledging writes without stopping it: the cluster fence (this
//! node lost its lease, so another node may adopt the volume at any moment) and the hand-off
//! gate of a move.
//!
//! Why not `halted` or `read_only`: a halt is permanent and a read-only flag is configuration
//! stored on the backend, while a fence must lift again by itself when the lease comes back and
//! must not touch the backend (the node may be cut off from it too). Reads keep working while
//! fenced: they return what this node acknowledged, which the next owner also has.
//!
//! The flags are atomics but are set under the state lock, and every write, trim and flush
//! checks them under that lock, so an operation that starts after `set_fenced(true)` returns
//! is refused. A write that was already applied and is waiting for its DTL ticket is checked
//! again by the frontend before its acknowledgement (see [`Volume::check_fence`]).

use std::sync::atomic::Ordering;

use crate::error::{Result, VolumeError};

use super::Volume;

impl Volume {
    /// Fence the volume (`Some(reason)`, e.g. "this node lost its cluster lease") or lift the
    /// fence (`None`). While fenced, writes, trims, write-zeroes and flushes fail with
    /// [`VolumeError::Fenced`] instead of being acknowledged; reads go on.
    pub fn set_fenced(&self, reason: Option<String>) {
        let _st = self.state.lock();
        let mut fenced = self.fenced.write();
        if fenced.is_some() != reason.is_some() {
            match &reason {
                Some(reason) => {
                    tracing::warn!(volume = %self.name, %reason, "volume fenced: writes refused");
                }
                None => {
                    tracing::info!(volume = %self.name, "volume unfenced: writes accepted again")
                }
            }
        }
        *fenced = reason;
    }

    /// Why the volume is fenced, if it is (see [`Volume::set_fenced`]).
    pub fn fenced(&self) -> Option<String> {
        self.fenced.read().clone()
    }

    /// Refuse (or accept again) writes while the volume is handed to another node.
    pub(crate) fn set_releasing(&self, releasing: bool) {
        let _st = self.state.lock();
        self.releasing.store(releasing, Ordering::SeqCst);
    }

    pub fn is_releasing(&self) -> bool {
        self.releasing.load(Ordering::SeqCst)
    }

    /// `Err(Fenced)` while the volume is fenced. Frontends call it again before acknowledging
    /// a write whose DTL round trip was still in flight when the fence went up.
    pub fn check_fence(&self) -> Result<()> {
        match &*self.fenced.read() {
            Some(reason) => Err(VolumeError::Fenced {
                volume: self.name.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Whether a write, trim or write-zeroes may start now (call under the state lock).
    pub(super) fn check_write_gates(&self) -> Result<()> {
        self.check_fence()?;
        if self.is_releasing() {
            return Err(VolumeError::Refused {
                volume: self.name.clone(),
                reason: "it is being handed to another node; writes are refused".into(),
            });
        }
        Ok(())
    }
}

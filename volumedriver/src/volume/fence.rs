//! Gates that stop a volume acknowledging writes without stopping it: the cluster fence (this
//! node lost its lease, so another node may adopt the volume at any moment; `set_fenced` in
//! `volume.rs`) and the hand-off gate of a move (here).
//!
//! Why not `halted` or `read_only`: a halt is permanent and a read-only flag is configuration
//! stored on the backend, while a fence must lift again by itself when the lease comes back and
//! must not touch the backend (the node may be cut off from it too). Reads keep working while
//! fenced: they return what this node acknowledged, which the next owner also has.
//!
//! Every write, trim and flush checks both gates under the state lock, and the releasing flag
//! is set under it, so a write that starts after `release` began is refused. A write that was
//! already applied and is waiting for its DTL ticket when the fence goes up is checked again
//! before its acknowledgement (see [`Volume::check_fence`]).

use std::sync::atomic::Ordering;

use crate::error::{Result, VolumeError};

use super::Volume;

impl Volume {
    /// Refuse (or accept again) writes while the volume is handed to another node.
    pub(crate) fn set_releasing(&self, releasing: bool) {
        let _st = self.state.lock();
        self.releasing.store(releasing, Ordering::SeqCst);
    }

    pub fn is_releasing(&self) -> bool {
        self.releasing.load(Ordering::SeqCst)
    }

    /// The release finished: writes stayed refused since it began, and everything acknowledged
    /// before is on the backend, where the next owner reads it. Set before the volume stops
    /// being served and never cleared (a volume taken back after a failed move is a new
    /// `Volume`).
    pub(crate) fn set_handed_off(&self) {
        self.handed_off.store(true, Ordering::SeqCst);
    }

    /// Whether a release of this volume succeeded (see `set_handed_off`): the edge server tells
    /// edges so, and they then know nothing they had acknowledged can be lost.
    pub fn is_handed_off(&self) -> bool {
        self.handed_off.load(Ordering::SeqCst)
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

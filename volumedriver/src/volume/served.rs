//! Cheap, lock-free facts about a volume for frontends that check them on every request (the
//! edge server: `vstor serve --edge-listen`): the owner tag, whether the DTL is in sync, and
//! whether the volume still serves I/O. They are copies of what the state lock guards, updated
//! where the state changes, so a per-request check never queues behind the volume's big lock
//! (which writes hold while they append to the SCO).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vstor_dtl::{DtlState, Mirror};

use super::Volume;

pub(super) struct ServedFacts {
    owner_tag: AtomicU64,
    stopped: AtomicBool,
    halted: AtomicBool,
    /// The DTL link's mirror (its state lock is its own, small one), `None` without a DTL.
    mirror: parking_lot::RwLock<Option<Arc<Mirror>>>,
}

impl ServedFacts {
    pub(super) fn new(owner_tag: u64) -> Self {
        Self {
            owner_tag: AtomicU64::new(owner_tag),
            stopped: AtomicBool::new(false),
            halted: AtomicBool::new(false),
            mirror: parking_lot::RwLock::new(None),
        }
    }

    pub(super) fn set_owner_tag(&self, tag: u64) {
        self.owner_tag.store(tag, Ordering::SeqCst);
    }

    pub(super) fn set_stopped(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    pub(super) fn set_halted(&self) {
        self.halted.store(true, Ordering::SeqCst);
    }

    pub(super) fn set_mirror(&self, mirror: Option<Arc<Mirror>>) {
        *self.mirror.write() = mirror;
    }
}

impl Volume {
    /// The owner tag this node holds the volume under (without the state lock).
    pub fn owner_tag(&self) -> u64 {
        self.served.owner_tag.load(Ordering::SeqCst)
    }

    /// Every acknowledged write not yet on the backend is on the DTL: the volume has a DTL
    /// link and it is in sync. False without a DTL (mode `none`) or while it is degraded or
    /// catching up. Does not take the state lock.
    pub fn dtl_in_sync(&self) -> bool {
        self.served
            .mirror
            .read()
            .as_ref()
            .is_some_and(|mirror| mirror.state() == DtlState::OkSync)
    }

    /// Stopped (shut down, deleted, handed to another node) or halted: it serves no more I/O
    /// here. Does not take the state lock.
    pub fn is_gone(&self) -> bool {
        self.served.stopped.load(Ordering::SeqCst) || self.served.halted.load(Ordering::SeqCst)
    }
}

//! What the node's upload scheduler (`crate::scheduler`) needs from a volume beyond
//! `upload_one`: a wake-up when work is queued, and the age of data not yet queued.

use std::time::Duration;

use super::Volume;
use crate::scheduler::Notifier;

impl Volume {
    /// Install (or remove) the callback run whenever this volume queues upload work.
    pub fn set_upload_notifier(&self, notifier: Option<Notifier>) {
        self.upload_work.set_notifier(notifier);
    }

    /// How long the oldest data not yet queued for upload (in the open TLog and SCO) has been
    /// waiting; `None` when there is none.
    pub fn unclosed_data_age(&self) -> Option<Duration> {
        let st = self.state.lock();
        if !self.has_unclosed_data(&st) {
            return None;
        }
        st.tlog.as_ref().map(|t| t.opened.elapsed())
    }
}

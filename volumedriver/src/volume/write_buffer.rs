//! Write-buffer space: how much SCO data is local and how much of it is disposable, and eviction
//! of disposable SCOs (their data is on the backend, so reads fall back to it).

use std::fs;
use std::sync::atomic::Ordering;

use crate::sco::SCO_HEADER_LEN;
use crate::types::{ScoName, ScoNumber};

use super::state::{sco_path, ScoState};
use super::Volume;

impl Volume {
    /// Bytes of SCO data held in the write buffer, and how much of it is disposable.
    pub fn local_bytes(&self) -> (u64, u64) {
        let st = self.state.lock();
        let total = st
            .scos
            .values()
            .map(|s| SCO_HEADER_LEN + s.clusters * self.cluster_size)
            .sum();
        (total, st.disposable_bytes)
    }

    /// Evict disposable SCOs, oldest first, until at least `want` bytes are freed or none are
    /// left. Later reads of their clusters go to the backend. Returns the bytes freed.
    pub fn evict(&self, want: u64) -> u64 {
        let mut st = self.state.lock();
        let victims: Vec<ScoNumber> = st
            .scos
            .iter()
            .filter(|(_, s)| s.state == ScoState::Disposable)
            .scan(0u64, |freed, (number, s)| {
                if *freed >= want {
                    return None;
                }
                *freed += SCO_HEADER_LEN + s.clusters * self.cluster_size;
                Some(*number)
            })
            .collect();
        let mut freed = 0;
        for number in victims {
            if let Some(local) = st.scos.remove(&number) {
                let bytes = SCO_HEADER_LEN + local.clusters * self.cluster_size;
                freed += bytes;
                st.disposable_bytes = st.disposable_bytes.saturating_sub(bytes);
                let path = sco_path(&self.dir, ScoName::new(number));
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(volume = %self.name, path = %path.display(), error = %e, "evict failed");
                }
                self.stats.evicted_scos.fetch_add(1, Ordering::Relaxed);
            }
        }
        freed
    }
}

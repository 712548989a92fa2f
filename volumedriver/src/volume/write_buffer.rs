//! Write-buffer space: how much SCO data is local and how much of it is disposable, and eviction
//! of disposable SCOs (their data is on the backend, so reads fall back to it).

use std::sync::atomic::Ordering;

use crate::sco::SCO_HEADER_LEN;
use crate::types::{ScoName, ScoNumber};

use super::state::{sco_path, ScoState, State};
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
    ///
    /// The victims are chosen and forgotten under the state lock ([`choose_victims`],
    /// [`forget_victims`]); the files are unlinked after it is released. A read planned before
    /// holds its own handle of the file, and SCO numbers are never reused, so nothing can
    /// open the name again in between.
    pub fn evict(&self, want: u64) -> u64 {
        let (freed, victims) = {
            let mut st = self.state.lock();
            let victims = choose_victims(&st, want, self.cluster_size);
            let freed = forget_victims(&mut st, &victims, self.cluster_size);
            (freed, victims)
        };
        for number in victims {
            let path = sco_path(&self.dir, ScoName::new(number));
            if let Err(e) = self.fs.remove(&path) {
                tracing::warn!(volume = %self.name, path = %path.display(), error = %e, "evict failed");
            }
            self.stats.evicted_scos.fetch_add(1, Ordering::Relaxed);
        }
        freed
    }
}

/// The disposable SCOs to evict to free at least `want` bytes (pure): oldest (lowest number)
/// first, stopping as soon as enough is chosen; all of them if they are not enough.
fn choose_victims(st: &State, want: u64, cluster_size: u64) -> Vec<ScoNumber> {
    st.scos
        .iter()
        .filter(|(_, s)| s.state == ScoState::Disposable)
        .scan(0u64, |freed, (number, s)| {
            if *freed >= want {
                return None;
            }
            *freed += SCO_HEADER_LEN + s.clusters * cluster_size;
            Some(*number)
        })
        .collect()
}

/// Forget the `victims` (pure): drop them from the local SCOs and the disposable bytes.
/// Returns the bytes freed.
fn forget_victims(st: &mut State, victims: &[ScoNumber], cluster_size: u64) -> u64 {
    let mut freed = 0;
    for number in victims {
        if let Some(local) = st.scos.remove(number) {
            let bytes = SCO_HEADER_LEN + local.clusters * cluster_size;
            freed += bytes;
            st.disposable_bytes = st.disposable_bytes.saturating_sub(bytes);
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::super::state::testing::{add_sco, state, CLUSTER};
    use super::*;

    fn size(clusters: u64) -> u64 {
        SCO_HEADER_LEN + clusters * CLUSTER
    }

    #[test]
    fn victims_are_disposable_scos_oldest_first_until_enough() {
        let mut st = state();
        add_sco(&mut st, 1, 2, ScoState::Sealed { crc: 0 });
        add_sco(&mut st, 2, 3, ScoState::Disposable);
        add_sco(&mut st, 3, 1, ScoState::Open);
        add_sco(&mut st, 4, 4, ScoState::Disposable);
        add_sco(&mut st, 5, 1, ScoState::Disposable);
        let numbers = |v: Vec<ScoNumber>| v.into_iter().map(|n| n.0).collect::<Vec<_>>();
        assert!(choose_victims(&st, 0, CLUSTER).is_empty());
        assert_eq!(numbers(choose_victims(&st, 1, CLUSTER)), vec![2]);
        assert_eq!(numbers(choose_victims(&st, size(3), CLUSTER)), vec![2]);
        assert_eq!(
            numbers(choose_victims(&st, size(3) + 1, CLUSTER)),
            vec![2, 4]
        );
        // Not enough disposable data: everything disposable, nothing else.
        assert_eq!(
            numbers(choose_victims(&st, u64::MAX, CLUSTER)),
            vec![2, 4, 5]
        );
    }

    #[test]
    fn forgetting_victims_frees_their_bytes_only() {
        let mut st = state();
        add_sco(&mut st, 1, 2, ScoState::Sealed { crc: 0 });
        add_sco(&mut st, 2, 3, ScoState::Disposable);
        add_sco(&mut st, 4, 4, ScoState::Disposable);
        let victims = choose_victims(&st, 1, CLUSTER);
        assert_eq!(forget_victims(&mut st, &victims, CLUSTER), size(3));
        assert_eq!(st.disposable_bytes, size(4));
        assert_eq!(st.non_disposable_bytes, 2 * CLUSTER);
        assert_eq!(st.scos.keys().map(|n| n.0).collect::<Vec<_>>(), vec![1, 4]);
        // A victim already gone (forgotten twice) frees nothing.
        assert_eq!(forget_victims(&mut st, &victims, CLUSTER), 0);
    }
}

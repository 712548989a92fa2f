//! What a metadata server (MDS) needs from a volume, without the engine knowing about networks:
//!
//! * an [`UncorkSink`] is told about every TLog once it is on the backend and in the backend
//!   list (the uncork), with its map-changing entries, in history order: an MDS master's feed.
//!   The MDS therefore never holds a location whose data the backend lacks;
//! * a [`MapSeed`] lets a restart start from a map as of a prefix of the backend TLog list
//!   (an MDS table) and replay only the TLogs after it, instead of the whole history.
//!
//! The sink is called from the upload step, outside the state lock, and must not block (the
//! MDS client queues the update and sends it from its own task). A seed is checked against the
//! backend list at open: one that does not name a prefix of it is ignored, with a log line, and
//! the restart replays everything (the MDS side checks the finer fingerprint before seeding).
//! The garbage estimate that drives background scrubbing only counts what was replayed: a
//! seeded restart starts it lower (scrub still finds everything when it runs).

use std::path::Path;
use std::sync::Arc;

use crate::config::TLogRecord;
use crate::error::{Result, VolumeError};
use crate::map::LEAF_CLUSTERS;
use crate::tlog::{self, Entry};
use crate::types::{ClusterAddress, ClusterLocation};

use super::dtl_link::Position;
use super::state::State;
use super::Volume;

/// Raw locations of one page of [`LEAF_CLUSTERS`] clusters (0 = unwritten): a map leaf, which
/// the restart adopts as it is.
pub type SeedPage = crate::map::LeafPage;

/// A map as of the first `records` records of the backend TLog list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSeed {
    /// How many backend list records the map stands for (they are not replayed).
    pub records: usize,
    /// Number of the last of them (checked against the list).
    pub through_tlog: u64,
    /// The map in pages of [`LEAF_CLUSTERS`] (page n holds clusters n * 512 ..), the layout of
    /// an MDS table and of the map's leaves, so a restart loads it a page at a time. Pages not
    /// listed are unwritten.
    pub pages: Vec<(u64, SeedPage)>,
}

impl MapSeed {
    /// A seed from written clusters in any order.
    pub fn from_entries(
        records: usize,
        through_tlog: u64,
        entries: impl IntoIterator<Item = (ClusterAddress, ClusterLocation)>,
    ) -> Self {
        let mut pages: std::collections::BTreeMap<u64, SeedPage> = Default::default();
        for (address, location) in entries {
            let page = pages
                .entry(address / LEAF_CLUSTERS)
                .or_insert_with(|| Box::new([0; LEAF_CLUSTERS as usize]));
            page[(address % LEAF_CLUSTERS) as usize] = location.raw();
        }
        Self {
            records,
            through_tlog,
            pages: pages.into_iter().collect(),
        }
    }
}

/// Receives every uncorked TLog, in order (see the module docs).
pub trait UncorkSink: Send + Sync {
    /// `record` is now in the backend list; `entries` are its LOC, TRIM and SCOCRC entries.
    fn uncorked(&self, volume: &str, record: &TLogRecord, entries: &[Entry]);
}

impl Volume {
    /// Install (or remove) the sink told about every uncorked TLog from now on.
    pub fn set_uncork_sink(&self, sink: Option<Arc<dyn UncorkSink>>) {
        *self.uncork_sink.write() = sink;
    }

    /// Tell the sink, if any, about an uncorked TLog whose local copy is still at `path`.
    pub(super) fn notify_uncorked(&self, record: &TLogRecord, path: &Path) {
        let Some(sink) = self.uncork_sink.read().clone() else {
            return;
        };
        let parsed = self
            .fs
            .read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| tlog::parse(&bytes, true));
        match parsed {
            Ok(parsed) => sink.uncorked(&self.name, record, &parsed.entries),
            // The MDS then lags (its next update is refused for the cork gap and it catches
            // up from the backend); the volume itself is fine.
            Err(e) => tracing::warn!(
                volume = %self.name,
                tlog = record.number,
                error = %e,
                "cannot read the uncorked TLog for the MDS"
            ),
        }
    }

    /// Load `seed` into the map if it fits `records`; returns how many records it stands for
    /// (0: replay them all).
    pub(super) fn apply_seed(
        &self,
        st: &mut State,
        records: &[TLogRecord],
        seed: Option<MapSeed>,
    ) -> usize {
        let Some(seed) = seed else { return 0 };
        let seeded = seed.records;
        match self.load_seed(st, records, seed) {
            Ok(()) => {
                tracing::info!(
                    volume = %self.name,
                    seeded,
                    replay = records.len() - seeded,
                    "restart from the MDS: replaying only the TLogs after its cork"
                );
                seeded
            }
            Err(e) => {
                tracing::warn!(volume = %self.name, error = %e, "MDS map not usable: full backend replay");
                0
            }
        }
    }

    fn load_seed(&self, st: &mut State, records: &[TLogRecord], seed: MapSeed) -> Result<()> {
        let fits = seed.records <= records.len()
            && (seed.records == 0 || records[seed.records - 1].number == seed.through_tlog);
        if !fits {
            return Err(VolumeError::corrupt(
                &self.name,
                "MDS map",
                format!(
                    "it stands for {} records through TLog {}, which the backend list does not start with",
                    seed.records, seed.through_tlog
                ),
            ));
        }
        let clusters = st.map.clusters();
        // Check everything before changing anything: a refused seed leaves no trace. Only a
        // page reaching past the volume's end can hold an entry beyond it.
        for (page, entries) in &seed.pages {
            let base = page.saturating_mul(LEAF_CLUSTERS);
            if base.saturating_add(LEAF_CLUSTERS) <= clusters {
                continue;
            }
            let beyond = entries.iter().enumerate().find(|(i, raw)| {
                base.saturating_add(*i as u64) >= clusters
                    && !ClusterLocation::from_raw(**raw).is_unwritten()
            });
            if let Some((i, _)) = beyond {
                return Err(VolumeError::corrupt(
                    &self.name,
                    "MDS map",
                    format!(
                        "entry for cluster {} beyond the volume's {clusters}",
                        base.saturating_add(i as u64)
                    ),
                ));
            }
        }
        for (page, entries) in seed.pages {
            if page.saturating_mul(LEAF_CLUSTERS) >= clusters {
                continue; // nothing written there (checked above)
            }
            let mut applied_end = st.applied_end;
            st.map.load_leaf(page, entries, |location| {
                if location.clone_id() == 0 {
                    applied_end = applied_end.max(Position::after(location));
                }
            });
            st.applied_end = applied_end;
        }
        Ok(())
    }
}

//! [`VolumeInfo`]: everything `vstor volume info` shows, gathered in one pass under the lock.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::sco::SCO_HEADER_LEN;

use super::Volume;

/// Everything `vstor volume info` shows about a volume.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub namespace: String,
    pub size: u64,
    pub cluster_size: u64,
    pub sco_size: u64,
    pub tlog_scos: u64,
    pub write_buffer: u64,
    pub read_only: bool,
    /// Encryption at rest: the mode (`aes-256-xts`), the key's fingerprint and its file on
    /// the serving node; all `None` for a plaintext volume.
    pub encryption: Option<String>,
    pub encryption_key_fingerprint: Option<String>,
    pub encryption_key_file: Option<String>,
    pub owner_tag: u64,
    pub created: u64,
    pub state: String,
    pub halted_reason: Option<String>,
    /// Why this node fenced the volume (it may have lost its cluster lease): writes, trims and
    /// flushes are refused until the fence is lifted.
    pub fenced: Option<String>,
    pub written_bytes: u64,
    pub map_memory_bytes: u64,
    pub local_sco_bytes: u64,
    pub not_uploaded_bytes: u64,
    pub disposable_bytes: u64,
    pub upload_queue: usize,
    pub tlogs_on_backend: usize,
    pub throttling: bool,
    pub throttled_writes: u64,
    pub throttle_ms: u64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    /// Reads, uploads, flushes and TLog closes that waited for a large write still copying its
    /// data into the write buffer without the volume lock (`inflight`).
    pub copy_waits: u64,
    pub backend_reads: u64,
    /// Backend reads the node's read cache answered instead (`read_cache`).
    pub cache_hits: u64,
    pub evicted_scos: u64,
    pub uploaded_scos: u64,
    pub uploaded_bytes: u64,
    /// Smoothed upload throughput, bytes per second (0 until measured).
    pub upload_rate: u64,
    pub uploaded_tlogs: u64,
    pub upload_errors: u64,
    pub last_upload_error: Option<String>,
    /// `sync`, `async` or `none`.
    pub dtl_mode: String,
    pub dtl_addr: Option<String>,
    /// `ok_sync`, `ok_standalone`, `catch_up` or `degraded`.
    pub dtl_state: String,
    /// Every acknowledged write not on the backend is on the DTL (`dtl_state` is `ok_sync`).
    pub dtl_in_sync: bool,
    /// Data bytes queued for the DTL and not yet acknowledged by it.
    pub dtl_backlog_bytes: u64,
    /// Times the DTL link went degraded since the volume was opened.
    pub dtl_degradations: u64,
    pub dtl_last_error: Option<String>,
    /// Bytes of SCO data the backend TLogs reference.
    pub backend_bytes: u64,
    /// `VOLUME@SNAPSHOT` this volume was cloned from.
    pub parent: Option<String>,
    /// Volumes cloned from this volume's snapshots.
    pub children: Vec<String>,
    pub template: bool,
    /// The NBD allow list (`crate::access`).
    pub access: crate::access::VolumeAccess,
    pub snapshots: usize,
    /// Overwritten or trimmed data since the last scrub (an estimate of what a scrub frees).
    pub garbage_bytes: u64,
    /// At the last open (restart or adoption): backend TLogs whose map came from an MDS table
    /// instead of a replay (0: full replay, or a new volume).
    pub opened_from_mds_tlogs: u64,
    /// At the last open: backend TLogs replayed.
    pub opened_replayed_tlogs: u64,
    /// At the last open: microseconds spent loading the map (fetching the MDS seed, replaying
    /// TLogs); what a restart or an adoption costs before the DTL replay (0: a new volume).
    pub opened_in_us: u64,
}

impl Volume {
    /// Record one request's latency (called by the export glue around each request).
    pub fn record_latency(&self, op: crate::latency::IoOp, latency: std::time::Duration) {
        self.latency.record(op, latency);
    }

    /// A copy of the latency histogram of `op`.
    pub fn latency(&self, op: crate::latency::IoOp) -> crate::latency::LatencySnapshot {
        self.latency.snapshot(op)
    }

    /// Every written cluster and where it is, by address: the whole map, copied (to compare
    /// restarts, e.g. from an MDS, with a full replay).
    pub fn map_entries(
        &self,
    ) -> Vec<(crate::types::ClusterAddress, crate::types::ClusterLocation)> {
        let st = self.state.lock();
        let mut entries = Vec::with_capacity(st.map.written_clusters() as usize);
        st.map
            .for_each_written(|address, location| entries.push((address, location)));
        entries
    }

    /// Record how long the last open took to load the map (the manager times the MDS seed and
    /// [`Volume::open_seeded`] together).
    pub fn set_opened_in(&self, took: std::time::Duration) {
        self.state.lock().opened_in = took;
    }

    pub fn info(&self) -> VolumeInfo {
        let st = self.state.lock();
        let dtl = Self::dtl_status(&st);
        let c = &st.config;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VolumeInfo {
            name: c.name.clone(),
            namespace: c.namespace.clone(),
            size: c.size,
            cluster_size: c.cluster_size,
            sco_size: c.sco_size(),
            tlog_scos: c.tlog_scos,
            write_buffer: c.write_buffer,
            read_only: c.read_only,
            encryption: c.encryption.as_ref().map(|e| e.mode.clone()),
            encryption_key_fingerprint: c.encryption.as_ref().map(|e| e.fingerprint.clone()),
            encryption_key_file: c
                .encryption
                .as_ref()
                .map(|e| e.key_file.display().to_string()),
            owner_tag: c.owner_tag,
            created: c.created,
            state: if st.halted.is_some() {
                "halted"
            } else if st.stopped {
                "stopped"
            } else if self.fenced.read().is_some() {
                "fenced"
            } else {
                "running"
            }
            .to_string(),
            halted_reason: st.halted.clone(),
            fenced: self.fenced(),
            written_bytes: st.map.written_clusters() * c.cluster_size,
            map_memory_bytes: st.map.memory_bytes(),
            local_sco_bytes: st
                .scos
                .values()
                .map(|s| SCO_HEADER_LEN + s.clusters * c.cluster_size)
                .sum(),
            not_uploaded_bytes: st.non_disposable_bytes,
            disposable_bytes: st.disposable_bytes,
            upload_queue: st.uploads.len(),
            tlogs_on_backend: st.backend_tlogs.tlogs.len(),
            throttling: st.non_disposable_bytes > c.write_buffer,
            throttled_writes: load(&self.stats.throttled_writes),
            throttle_ms: load(&self.stats.throttle_micros) / 1000,
            reads: load(&self.stats.reads),
            writes: load(&self.stats.writes),
            read_bytes: load(&self.stats.read_bytes),
            write_bytes: load(&self.stats.write_bytes),
            flushes: load(&self.stats.flushes),
            discards: load(&self.stats.discards),
            copy_waits: self.inflight.waits(),
            backend_reads: load(&self.stats.backend_reads),
            cache_hits: load(&self.stats.cache_hits),
            evicted_scos: load(&self.stats.evicted_scos),
            uploaded_scos: load(&self.stats.uploaded_scos),
            uploaded_bytes: load(&self.stats.uploaded_bytes),
            upload_rate: self.upload_rate.load(Ordering::Relaxed),
            uploaded_tlogs: load(&self.stats.uploaded_tlogs),
            upload_errors: load(&self.stats.upload_errors),
            last_upload_error: st.last_upload_error.clone(),
            dtl_mode: c.dtl_mode.as_str().to_string(),
            dtl_addr: c.dtl_addr.clone(),
            dtl_state: dtl.state.as_str().to_string(),
            dtl_in_sync: dtl.state == vstor_dtl::DtlState::OkSync,
            dtl_backlog_bytes: dtl.backlog_bytes,
            dtl_degradations: dtl.degradations,
            dtl_last_error: dtl.last_error,
            backend_bytes: st.backend_tlogs.tlogs.iter().map(|r| r.data_bytes).sum(),
            parent: c.parent.as_ref().map(std::string::ToString::to_string),
            children: st
                .meta
                .snapshots
                .iter()
                .flat_map(|s| s.clones.iter().cloned())
                .collect(),
            template: c.template,
            access: c.access.clone(),
            snapshots: st.meta.snapshots.len(),
            garbage_bytes: st.garbage_clusters * c.cluster_size,
            opened_from_mds_tlogs: st.opened_seeded,
            opened_replayed_tlogs: st.opened_replayed,
            opened_in_us: u64::try_from(st.opened_in.as_micros()).unwrap_or(u64::MAX),
        }
    }
}

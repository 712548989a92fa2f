//! The engine's side of the DTL: what is mirrored, when a write may be acknowledged, catch-up,
//! trim, and replay after a restart or an adoption.
//!
//! # What is mirrored
//! Every cluster the volume writes becomes one DTL entry `(location, lba, data)`, recorded under
//! the volume lock while the write is applied and submitted to the [`Mirror`] before the lock is
//! released, so the DTL receives the volume's history in order. A discard that unmaps whole
//! clusters is mirrored too, as a *trim marker*: an entry whose location carries clone id
//! [`TRIM_MARKER_CLONE`] (no real write has one: writes always go to the volume's own SCOs, clone
//! id 0), whose LBA is the first trimmed cluster's, and whose data starts with the cluster count.
//! Without it, replay would bring discarded data back.
//!
//! # Positions
//! Locations are handed out in write order (SCO number, then offset), so a location is also a
//! *position* in the history. A trim marker takes the position the next cluster write would take.
//! Both the write buffer after crash recovery and the DTL hold a *prefix* of the history; replay
//! applies exactly the DTL entries at or after the end of what the volume already has
//! (`applied_end`, the position after the newest location read back at restart). That is what
//! makes one rule serve a local restart after `kill -9` (the write buffer was cut back to its last
//! SYNC; the DTL has the acknowledged rest) and an adoption (only the backend is left). Replayed
//! clusters are written as new writes into SCOs numbered above everything the DTL holds, so
//! positions stay comparable if the node dies again before they reach the backend.
//!
//! # Modes
//! `sync`: the write's ticket is returned to the frontend, which acknowledges the client once the
//! DTL holds the write (NBD keeps taking requests meanwhile). `async`: the write is acknowledged at
//! once unless the backlog is over its bound (then it waits like a sync write); FLUSH waits for
//! everything submitted. In both modes a degraded link completes tickets at once: writes are never
//! failed because the DTL is away.
//!
//! # Catch-up and trim
//! When the link (re)connects, the engine seals its SCO and closes its TLog (the *barrier*); new
//! writes go to a new SCO, numbered above anything the DTL holds. Once the barrier TLog is on the
//! backend the DTL again covers everything the backend lacks and the link is `ok_sync`. Each TLog
//! that reaches the backend trims the DTL up to its newest SCO.

use std::sync::Arc;

use bytes::Bytes;
use vstor_dtl::{DtlState, Entry as DtlEntry, Mirror, MirrorConfig, Ticket};

use super::{State, Volume};
use crate::config::{DtlMode, TLogRecord};
use crate::error::{Result, VolumeError};
use crate::types::{ClusterLocation, ScoName, ScoNumber, TLogNumber, LBA_SIZE};

/// How long a replay waits for the DTL to accept its connection and say hello.
const REPLAY_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a replay waits for each answer (registration, SCO range, a batch of entries).
const REPLAY_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Clone id marking a DTL entry as a trim instead of a cluster write.
pub const TRIM_MARKER_CLONE: u8 = 0xFF;

/// A place in the volume's write history: SCO number, then cluster offset within it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    sco: u32,
    cluster: u32,
}

impl Position {
    pub fn new(sco: u32, cluster: u32) -> Self {
        Self { sco, cluster }
    }

    pub fn from_pair((sco, cluster): (u32, u32)) -> Self {
        Self::new(sco, cluster)
    }

    /// The position just after `location`.
    pub fn after(location: ClusterLocation) -> Self {
        Self::new(location.sco_number().0, u32::from(location.offset()) + 1)
    }

    fn of(location: ClusterLocation) -> Self {
        Self::new(location.sco_number().0, u32::from(location.offset()))
    }
}

pub(super) struct DtlLink {
    mirror: Arc<Mirror>,
    mode: DtlMode,
    /// Entries recorded by the current operation, submitted before the lock is released.
    pending: Vec<(u32, DtlEntry)>,
    /// Catch-up in progress: its epoch and the TLog that must reach the backend first.
    barrier: Option<(u64, TLogNumber)>,
}

pub(super) struct DtlStatusView {
    pub state: DtlState,
    pub backlog_bytes: u64,
    pub degradations: u64,
    pub last_error: Option<String>,
}

/// What a DTL replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Entries the DTL held.
    pub held: u64,
    /// Entries applied (the rest were already in the volume).
    pub applied: u64,
}

impl Volume {
    pub(super) fn dtl_status(st: &State) -> DtlStatusView {
        match &st.dtl {
            Some(link) => {
                let status = link.mirror.status();
                DtlStatusView {
                    state: status.state,
                    backlog_bytes: status.backlog_bytes,
                    degradations: status.degradations,
                    last_error: status.last_error,
                }
            }
            None => DtlStatusView {
                state: if st.config.dtl_mode == DtlMode::None {
                    DtlState::OkStandalone
                } else {
                    DtlState::Degraded
                },
                backlog_bytes: 0,
                degradations: 0,
                last_error: None,
            },
        }
    }

    /// Record the clusters of `chunk`, written at offset `index` of `sco` for volume clusters
    /// starting at `first_cluster`.
    pub(super) fn dtl_record_writes(
        &self,
        st: &mut State,
        sco: ScoName,
        index: u64,
        first_cluster: u64,
        chunk: &[u8],
    ) {
        let cs = self.cluster_size as usize;
        let Some(link) = st.dtl.as_mut() else {
            return;
        };
        let data = Bytes::copy_from_slice(chunk);
        for i in 0..chunk.len() / cs {
            let location = ClusterLocation::new(sco, (index + i as u64) as u16);
            link.pending.push((
                sco.number.0,
                DtlEntry {
                    location: location.raw(),
                    lba: (first_cluster + i as u64) * self.cluster_size / LBA_SIZE,
                    data: data.slice(i * cs..(i + 1) * cs),
                },
            ));
        }
    }

    pub(super) fn dtl_record_trim(&self, st: &mut State, start: u64, count: u64) {
        let (sco, cluster) = match &st.open_sco {
            Some(open) => (open.number.0, open.clusters),
            None => (st.next_sco, 0),
        };
        let cs = self.cluster_size as usize;
        let Some(link) = st.dtl.as_mut() else {
            return;
        };
        let marker = ScoName {
            clone_id: TRIM_MARKER_CLONE,
            number: ScoNumber(sco),
            version: 0,
        };
        let mut data = vec![0u8; cs];
        data[..8].copy_from_slice(&count.to_le_bytes());
        link.pending.push((
            sco,
            DtlEntry {
                location: ClusterLocation::new(marker, cluster as u16).raw(),
                lba: start * self.cluster_size / LBA_SIZE,
                data: Bytes::from(data),
            },
        ));
    }

    /// Submit what the current operation recorded. Returns the ticket the caller must wait for
    /// before acknowledging: always in sync mode, in async mode only over the backlog bound.
    pub(super) fn dtl_submit(&self, st: &mut State) -> Option<Ticket> {
        let link = st.dtl.as_mut()?;
        if link.pending.is_empty() {
            return None;
        }
        let mut last = None;
        let mut pending = std::mem::take(&mut link.pending).into_iter().peekable();
        while let Some((sco, entry)) = pending.next() {
            let mut batch = vec![entry];
            while let Some((_, next)) = pending.next_if(|(next_sco, _)| *next_sco == sco) {
                batch.push(next);
            }
            last = Some(link.mirror.submit(sco, batch));
        }
        let ticket = last?;
        match link.mode {
            DtlMode::Sync => Some(ticket),
            DtlMode::Async if link.mirror.over_backlog() => Some(ticket),
            _ => None,
        }
    }

    /// Act on what the link asks for: halt when fenced, begin a catch-up when reconnected.
    pub(super) fn dtl_service(&self, st: &mut State) -> Result<()> {
        let Some(mirror) = st
            .dtl
            .as_ref()
            .filter(|l| l.mirror.needs_attention())
            .map(|l| l.mirror.clone())
        else {
            return Ok(());
        };
        if let Some(reason) = mirror.fenced() {
            self.halt(st, reason.clone());
            return Err(VolumeError::Halted {
                volume: self.name.clone(),
                reason,
            });
        }
        if st.flush_in_progress {
            return Ok(());
        }
        let Some(request) = mirror.take_catch_up() else {
            return Ok(());
        };
        if self.has_unclosed_data(st) {
            self.close_tlog(st)?;
        }
        st.next_sco = st.next_sco.max(request.min_next_sco);
        let barrier = st.closed_tlogs.back().map(|t| t.number);
        tracing::info!(volume = %self.name, barrier = ?barrier.map(super::super::types::TLogNumber::object_name), "DTL catch-up: sealed the current SCO");
        match (barrier, st.dtl.as_mut()) {
            (Some(number), Some(link)) => link.barrier = Some((request.epoch, number)),
            _ => mirror.caught_up(request.epoch),
        }
        Ok(())
    }

    /// A TLog reached the backend: trim the DTL and finish a catch-up waiting for it.
    pub(super) fn dtl_uncorked(&self, st: &mut State, record: &TLogRecord) {
        let Some(link) = st.dtl.as_mut() else {
            return;
        };
        if let Some(newest) = record.scos.iter().max() {
            link.mirror.trim(*newest);
        }
        if let Some((epoch, barrier)) = link.barrier {
            if record.number >= barrier.0 {
                link.barrier = None;
                link.mirror.caught_up(epoch);
            }
        }
    }

    /// Wait for a DTL ticket; a fenced link halts the volume and fails the operation (another
    /// node owns the volume: acknowledging would report a write the new owner never sees).
    pub(super) fn dtl_wait(&self, ticket: Ticket) -> Result<()> {
        ticket
            .wait_blocking()
            .map_err(|reason| self.dtl_fenced(reason))
    }

    /// Halt the volume because its DTL link was fenced; the error to report.
    pub fn dtl_fenced(&self, reason: String) -> VolumeError {
        let mut st = self.state.lock();
        self.halt(&mut st, reason.clone());
        VolumeError::Halted {
            volume: self.name.clone(),
            reason,
        }
    }

    pub(super) fn dtl_flush_ticket(&self) -> Option<Ticket> {
        let st = self.state.lock();
        st.dtl.as_ref().map(|l| l.mirror.flush_ticket())
    }

    /// Let the volume act on its DTL link while no I/O arrives (called by the uploader).
    pub fn dtl_tick(&self) {
        let mut st = self.state.lock();
        if st.halted.is_none() && !st.stopped {
            let _ = self.dtl_service(&mut st);
        }
    }

    /// Start mirroring to the DTL the configuration names (nothing for mode `none`). The link
    /// starts degraded and catches up once connected.
    pub fn attach_dtl(self: &Arc<Self>) {
        let config = self.config();
        let Some(addr) = dtl_target(&config) else {
            return;
        };
        let volume = Arc::downgrade(self);
        let mut mirror_config = MirrorConfig::new(
            addr,
            &config.namespace,
            config.cluster_size as u32,
            config.owner_tag,
        );
        mirror_config.incarnation = config.incarnation;
        mirror_config.client = self.dtl_client_config(addr);
        let mirror = Mirror::start(
            mirror_config,
            Box::new(move || {
                if let Some(volume) = volume.upgrade() {
                    volume.upload_work.notify_all();
                }
            }),
            self.runtime.lock().clone(),
        );
        let old = {
            let mut st = self.state.lock();
            self.served.set_mirror(Some(mirror.clone()));
            st.dtl.replace(DtlLink {
                mirror,
                mode: config.dtl_mode,
                pending: Vec::new(),
                barrier: None,
            })
        };
        if let Some(old) = old {
            old.mirror.stop();
        }
    }

    /// The node's mutual-TLS identity for the DTL link: the mirror and replays connect with it
    /// from then on (`None`: plain TCP). Set before [`replay_dtl`](Self::replay_dtl) and
    /// [`attach_dtl`](Self::attach_dtl); a running link keeps the one it started with.
    pub fn set_dtl_tls(&self, tls: Option<vstor_net::PeerTls>) {
        *self.dtl_tls.lock() = tls;
    }

    /// The DTL client settings for `addr`: the mirror's timeouts and the node's TLS identity
    /// (cloned out: no lock is held while connecting).
    fn dtl_client_config(&self, addr: &str) -> vstor_dtl::DtlClientConfig {
        let mut client = MirrorConfig::new(addr, "", 0, 0).client;
        client.tls = self.dtl_tls.lock().clone();
        client
    }

    /// The runtime DTL link workers run on (none: a thread per link).
    pub fn set_runtime(&self, runtime: Option<tokio::runtime::Handle>) {
        *self.runtime.lock() = runtime;
    }

    /// Stop mirroring (volume stop, mode change).
    pub fn detach_dtl(&self) {
        let link = {
            let mut st = self.state.lock();
            self.served.set_mirror(None);
            st.dtl.take()
        };
        if let Some(link) = link {
            link.mirror.stop();
        }
    }

    /// Drop the volume's registration and entries on its DTL (volume deletion). Best effort:
    /// an unreachable DTL keeps the entries until an operator clears them.
    pub fn forget_dtl(&self) {
        self.forget_dtl_at(&self.config());
    }

    fn forget_dtl_at(&self, config: &crate::config::VolumeConfig) {
        let tls = self.dtl_tls.lock().clone();
        if let Err(e) = unregister_dtl(config, config.owner_tag, tls) {
            tracing::warn!(volume = %self.name, error = %e, "could not unregister from the DTL");
        }
    }

    /// Change the DTL mode and address, persist them, and re-attach the link.
    pub fn set_dtl(self: &Arc<Self>, mode: DtlMode, addr: Option<String>) -> Result<()> {
        crate::config::validate_dtl(&self.name, mode, addr.as_deref())?;
        let before = self.config();
        let moved =
            before.dtl_mode != DtlMode::None && (mode == DtlMode::None || before.dtl_addr != addr);
        self.change_config(|current| {
            Ok(crate::config::VolumeConfig {
                dtl_mode: mode,
                dtl_addr: addr,
                ..current.clone()
            })
        })?;
        self.detach_dtl();
        if moved {
            // The old DTL would otherwise keep this volume's entries forever.
            self.forget_dtl_at(&before);
        }
        self.attach_dtl();
        Ok(())
    }

    /// Read the DTL back and apply every entry the volume does not have yet (see the module
    /// docs), then make the result durable and queue it for upload. Registers with the volume's
    /// owner tag first, which fences a previous owner. Must run before [`attach_dtl`].
    ///
    /// [`attach_dtl`]: Self::attach_dtl
    pub fn replay_dtl(&self) -> Result<ReplaySummary> {
        let (addr, namespace, owner_tag, incarnation) = {
            let st = self.state.lock();
            self.check_usable(&st)?;
            match (&st.config.dtl_addr, st.config.dtl_mode, &st.dtl) {
                (_, DtlMode::None, _) | (None, _, _) => return Ok(ReplaySummary::default()),
                (_, _, Some(_)) => {
                    return Err(VolumeError::InvalidConfig {
                        volume: self.name.clone(),
                        reason: "cannot replay the DTL while mirroring to it".into(),
                    })
                }
                (Some(addr), _, None) => (
                    addr.clone(),
                    st.config.namespace.clone(),
                    st.config.owner_tag,
                    st.config.incarnation,
                ),
            }
        };
        let dtl_error = |reason: String| VolumeError::Dtl {
            volume: self.name.clone(),
            addr: addr.clone(),
            reason,
        };
        let mut client = self.dtl_client_config(&addr);
        // A replay is a bulk read the volume cannot serve without: the mirror's short timeouts
        // (made to degrade a sync write quickly) would fail an adoption on a merely busy DTL.
        client.connect_timeout = REPLAY_CONNECT_TIMEOUT;
        client.request_timeout = REPLAY_REQUEST_TIMEOUT;
        let mut summary = ReplaySummary::default();
        let mut first = true;
        vstor_dtl::replay::fetch(
            &addr,
            &namespace,
            vstor_dtl::Registration {
                cluster_size: self.cluster_size as u32,
                owner_tag,
                incarnation,
            },
            client,
            |range| {
                if let Some(newest) = range.newest {
                    let mut st = self.state.lock();
                    st.next_sco = st.next_sco.max(newest.saturating_add(1));
                }
            },
            |_, entry| {
                summary.held += 1;
                let mut st = self.state.lock();
                if first {
                    first = false;
                    tracing::info!(volume = %self.name, from = ?st.applied_end, "replaying the DTL");
                }
                match self.replay_entry(&mut st, &entry) {
                    Ok(true) => {
                        summary.applied += 1;
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .map_err(|e| dtl_error(e.to_string()))?;
        if summary.applied > 0 {
            self.flush()?;
            self.close_current_tlog()?;
        }
        tracing::info!(volume = %self.name, held = summary.held, applied = summary.applied, "DTL replay done");
        Ok(summary)
    }

    /// Apply one DTL entry unless the volume already has it. Returns whether it was applied.
    fn replay_entry(&self, st: &mut State, entry: &DtlEntry) -> Result<bool> {
        let location = ClusterLocation::from_raw(entry.location);
        if Position::of(location) < st.applied_end {
            return Ok(false);
        }
        let cs = self.cluster_size;
        let byte_offset = entry.lba.checked_mul(LBA_SIZE);
        let bad = |reason: String| {
            Err(VolumeError::corrupt(
                &self.name,
                format!("DTL entry at {location:?}"),
                reason,
            ))
        };
        let Some(byte_offset) = byte_offset.filter(|o| o.is_multiple_of(cs)) else {
            return bad(format!("LBA {} is not cluster-aligned", entry.lba));
        };
        if entry.data.len() as u64 != cs {
            return bad(format!("holds {} bytes, not one cluster", entry.data.len()));
        }
        let address = byte_offset / cs;
        let clusters = st.map.clusters();
        if location.clone_id() == TRIM_MARKER_CLONE {
            let mut count_bytes = [0u8; 8];
            count_bytes.copy_from_slice(&entry.data[..8]);
            let count = u64::from_le_bytes(count_bytes);
            if address.checked_add(count).is_none_or(|end| end > clusters) {
                return bad(format!(
                    "trims {count} clusters at {address}, beyond the volume"
                ));
            }
            self.trim_locked(st, address, count)?;
        } else {
            if address >= clusters {
                return bad(format!("cluster {address} is beyond the volume"));
            }
            // The DTL holds clusters as stored (ciphertext for an encrypted volume).
            self.append_clusters(st, address, &entry.data)?;
        }
        Ok(true)
    }
}

/// Drop the volume's log from the DTL `config` names (if any), as owner tag `tag`. Also used
/// for a volume no longer served here (`VolumeManager::purge_unserved`). The error names the
/// DTL's address.
pub(crate) fn unregister_dtl(
    config: &crate::config::VolumeConfig,
    tag: u64,
    tls: Option<vstor_net::PeerTls>,
) -> std::result::Result<(), String> {
    let Some(addr) = dtl_target(config) else {
        return Ok(());
    };
    let mut client = MirrorConfig::new(addr, "", 0, 0).client;
    client.tls = tls;
    vstor_dtl::replay::unregister(addr, &config.namespace, tag, config.incarnation, client)
        .map_err(|e| format!("DTL {addr}: {e}"))
}

/// The DTL a volume's configuration mirrors to, if any.
fn dtl_target(config: &crate::config::VolumeConfig) -> Option<&str> {
    config
        .dtl_addr
        .as_deref()
        .filter(|_| config.dtl_mode != DtlMode::None)
}

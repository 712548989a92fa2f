//! Automatic failover, DTL re-placement and the clean-up after a fence, carried out against the
//! registry and the volume manager. The decisions themselves are the pure functions of
//! [`failover_plan`](super::failover_plan); this module is the I/O around them.
//!
//! Every node runs one [`Failover`] task. It watches node leases ([`Registry::watch_nodes`]) and
//! also sweeps the registry every `sweep` interval, so a missed event (a watch re-established,
//! a node that died while this one was down) is caught up within one sweep.
//!
//! When a node's lease ends:
//! 1. Volumes this node owns whose DTL lived on the dead node get a new DTL node (placement
//!    rule: the owner's recovery domain, else its own domain, never the owner); the DTL link
//!    then catches up and returns to `ok_sync` by itself. So does a DTL on the owner itself
//!    (its DTL node adopted it when no other node was alive), once another node is.
//! 2. The dead node's volumes (record still names it, owner key gone with its lease) are split
//!    over the survivors by [`plan_adoptions`]; each survivor computes the same plan. The planned
//!    adopter takes its share at once: [`Registry::take_ownership`] (one transaction, expected
//!    tag: at most one winner), then [`VolumeManager::adopt_with_tag`] (claims the backend with
//!    that tag, replays the DTL). If the planned adopter has not taken a volume after `grace`,
//!    any survivor may (the transaction still picks one). An adoption that fails because the
//!    DTL or the backend did not answer is tried again under a newer tag
//!    ([`after_failed_adoption`]); one that cannot succeed records the volume halted.
//! 3. A mirrored volume whose DTL node is dead too is recorded halted with the reason
//!    ([`recovery`]) instead of being served with acknowledged writes missing.
//!
//! A volume whose record names this node (alive) as its serving owner while nothing here serves
//! it, adopts it or holds it ([`FailoverLog::hold`]: a delete, a move, a restart) is adopted by
//! this node once it has stayed so for [`UNSERVED_GRACE`] (`last_failover.kind` `unserved`;
//! [`UnservedWatch`] lists how that state comes about).
//!
//! After a fence: a volume this node still serves while fenced whose record names another
//! owner now was taken over; it is dropped here ([`VolumeManager::drop_moved`]), its clients
//! disconnected, and `volume list` says where it went.
//!
//! Each adoption is logged (node log, `volume failed over`) and kept in a [`FailoverLog`]
//! that `volume info` shows as `last_failover`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vstor_edge::remote::Opening;
use vstor_volumedriver::{DtlMode, VolumeError, VolumeManager};

use super::failover_plan::{
    after_failed_adoption, after_fence, dtl_back_since_halt, failed_adoption_reason, may_adopt,
    ownership_landed, plan_adoptions, recovery, AfterFailedAdoption, AfterFence, LiveNode, Orphan,
    Recovery, UnservedWatch, UNSERVED_GRACE,
};
use super::placement;
use crate::registry::{
    now_ms, now_secs, LeaseId, NodeEvent, NodeRecord, NodeStatus, Registry, RegistryError,
    VolumeRecord, VolumeState,
};

/// Whether an adoption that failed with `error` may succeed if tried again: the DTL or the
/// backend did not answer (in time). Anything else (another node claimed the volume, its
/// configuration cannot be read) fails the same way again.
fn adoption_may_succeed_later(error: &VolumeError) -> bool {
    matches!(
        error,
        VolumeError::Dtl { .. } | VolumeError::Backend { .. } | VolumeError::Io { .. }
    )
}

/// How often, and how far apart, the record is read after a registry write that got no answer
/// (about the registry call timeout in all).
const LANDED_READS: u32 = 4;
const LANDED_READ_PAUSE: Duration = Duration::from_millis(500);

/// Volume `name`'s record, read after a write to it got no answer: etcd may apply a
/// transaction whose answer the client gave up on, so the writer must look before it acts on
/// the failure. Read a few times, since the registry that just timed out may be slow a little
/// longer; `None` if no read answered (the write is then taken as lost).
pub(crate) async fn read_back_after_no_answer(
    registry: &dyn Registry,
    name: &str,
) -> Option<Option<VolumeRecord>> {
    for attempt in 0..LANDED_READS {
        if attempt > 0 {
            tokio::time::sleep(LANDED_READ_PAUSE).await;
        }
        if let Ok(record) = registry.volume(name).await {
            return Some(record);
        }
    }
    None
}

/// Why [`Failover::adopt`] did not adopt a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdoptError {
    /// Another node took the volume first; it names the owner now.
    Taken(String),
    /// The registry did not answer, or refused the transaction (this node's lease is gone).
    Registry(String),
    /// The engine could not adopt it: the volume is recorded halted with this reason.
    Halted(String),
}

impl std::fmt::Display for AdoptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Taken(owner) => write!(f, "node {owner} took the volume first"),
            Self::Registry(e) => write!(f, "cannot take ownership in the registry: {e}"),
            Self::Halted(reason) => write!(f, "{reason}; the volume is recorded halted"),
        }
    }
}

/// One adoption as `volume info` shows it (`last_failover`).
pub use crate::api_types::FailoverRecord;

/// The last adoption of each volume this node made, and the adoptions under way.
///
/// An adoption is marked pending before the engine opens the volume and stays so until its
/// record is written: the engine publishes the volume as soon as it is open, so without the mark
/// `volume info` could show the new owner `running` with no `last_failover` yet (the API shows a
/// pending volume as `adopting`).
///
/// The adoptions under way are also what the edge server's handshake waits for
/// ([`FailoverLog::opening`]): an edge follows the registry to this node as soon as the
/// ownership transaction is written, before the engine has opened the volume.
#[derive(Default)]
pub struct FailoverLog {
    records: Mutex<BTreeMap<String, FailoverRecord>>,
    pending: Arc<Opening>,
    /// Volumes this node is working on outside the manager's table of served volumes (a
    /// delete, a move, a restart) while the registry names it their owner: the pass must not
    /// take them for unserved and adopt them.
    held: Arc<Mutex<BTreeMap<String, usize>>>,
}

/// Marks a volume as held by a delete, move or restart while it lives ([`FailoverLog::hold`]).
pub struct Held {
    names: Arc<Mutex<BTreeMap<String, usize>>>,
    volume: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = names.get_mut(&self.volume) {
            *count -= 1;
            if *count == 0 {
                names.remove(&self.volume);
            }
        }
    }
}

impl FailoverLog {
    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FailoverRecord>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An adoption of `volume` starts.
    pub fn begin(&self, volume: &str) {
        self.pending.begin(volume);
    }

    /// The adoption of `volume` failed: nothing to record.
    pub fn abort(&self, volume: &str) {
        self.pending.end(volume);
    }

    /// The adoption of `volume` finished as `record` (recorded before it stops being pending, so
    /// `volume info` never shows it neither adopting nor adopted).
    pub fn record(&self, volume: &str, record: FailoverRecord) {
        self.records().insert(volume.to_string(), record);
        self.pending.end(volume);
    }

    pub fn get(&self, volume: &str) -> Option<FailoverRecord> {
        self.records().get(volume).cloned()
    }

    /// Whether an adoption of `volume` is under way on this node.
    pub fn pending(&self, volume: &str) -> bool {
        self.pending.contains(volume)
    }

    /// This node starts working on `volume` outside the manager's table (deleting, moving or
    /// restarting it); that ends when the guard is dropped. Several may overlap (a delete during
    /// a move): each guard counts.
    pub fn hold(&self, volume: &str) -> Held {
        *self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(volume.to_string())
            .or_default() += 1;
        Held {
            names: Arc::clone(&self.held),
            volume: volume.to_string(),
        }
    }

    /// Whether a delete, move or restart of `volume` holds it now.
    pub fn is_held(&self, volume: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(volume)
    }

    /// The adoptions under way, for the edge server ([`RemoteExports::opening`]).
    ///
    /// [`RemoteExports::opening`]: vstor_edge::remote::RemoteExports::opening
    pub fn opening(&self) -> Arc<Opening> {
        Arc::clone(&self.pending)
    }
}

/// Called with a volume's name when this node starts serving it (export it over vhost-user) and
/// when it stops (disconnect its NBD clients, remove the vhost-user export).
pub type VolumeHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Everything failover needs from the node.
pub struct Failover {
    pub registry: Arc<dyn Registry>,
    pub node: NodeRecord,
    /// The node's current lease (it changes when the node registers again after losing it).
    pub lease: watch::Receiver<LeaseId>,
    pub manager: Arc<VolumeManager>,
    /// How long the planned adopter has before any survivor may take a volume.
    pub grace: Duration,
    /// How often the registry is swept for orphans and moved volumes.
    pub sweep: Duration,
    pub on_served: VolumeHook,
    pub on_dropped: VolumeHook,
    pub log: Arc<FailoverLog>,
    /// When this node first saw each dead owner (for the grace period and the timings).
    seen_dead: Mutex<HashMap<String, Instant>>,
    /// When this node saw each node alive again after seeing it dead (ms since the epoch): a
    /// DTL node back from a partition keeps its `started_at`.
    came_back: Mutex<HashMap<String, u64>>,
    /// The last pass failed (its error was logged as a warning).
    pass_failing: std::sync::atomic::AtomicBool,
    /// One pass at a time (events and sweeps both start passes).
    passes: tokio::sync::Mutex<()>,
    /// Volumes whose DTL needs a new node and found none (warned about once).
    no_dtl_node: Mutex<BTreeSet<String>>,
    /// Volumes the registry says this node serves that nothing here serves, and since when.
    unserved: Mutex<UnservedWatch>,
}

pub(super) fn live_view(nodes: &[NodeStatus]) -> Vec<LiveNode> {
    nodes
        .iter()
        .filter(|n| n.alive)
        .map(|n| LiveNode {
            name: n.record.name.clone(),
            domain: n.record.domain.clone(),
            recovery_domain: n.record.recovery_domain.clone(),
            volumes: n.volumes,
        })
        .collect()
}

impl Failover {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        registry: Arc<dyn Registry>,
        node: NodeRecord,
        lease: watch::Receiver<LeaseId>,
        manager: Arc<VolumeManager>,
        grace: Duration,
        on_served: VolumeHook,
        on_dropped: VolumeHook,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            node,
            lease,
            manager,
            grace,
            sweep: Duration::from_secs(1),
            on_served,
            on_dropped,
            log: Arc::new(FailoverLog::default()),
            seen_dead: Mutex::new(HashMap::new()),
            came_back: Mutex::new(HashMap::new()),
            pass_failing: std::sync::atomic::AtomicBool::new(false),
            passes: tokio::sync::Mutex::new(()),
            no_dtl_node: Mutex::new(BTreeSet::new()),
            unserved: Mutex::new(UnservedWatch::default()),
        })
    }

    fn lease(&self) -> LeaseId {
        *self.lease.borrow()
    }

    /// Run until the task is aborted: react to lease events, sweep periodically.
    pub fn start(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move { me.run().await })
    }

    async fn run(self: Arc<Self>) {
        let mut events = None;
        let mut sweep = tokio::time::interval(self.sweep);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if events.is_none() {
                match self.registry.watch_nodes().await {
                    Ok(rx) => events = Some(rx),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot watch node leases; sweeping only");
                    }
                }
            }
            let event = async {
                match events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = event => match event {
                    Some(NodeEvent::Down(node)) => {
                        self.saw_dead(&node);
                        self.clone().spawn_pass();
                    }
                    Some(NodeEvent::Live(_) | NodeEvent::Up(_)) => self.clone().spawn_pass(),
                    None => events = None,
                },
                _ = sweep.tick() => self.clone().spawn_pass(),
            }
        }
    }

    fn saw_dead(&self, node: &str) {
        self.seen_dead
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(node.to_string())
            .or_insert_with(Instant::now);
    }

    fn forget_dead(&self, alive: &BTreeSet<String>) {
        let mut back = Vec::new();
        self.seen_dead
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|node, _| {
                let dead = !alive.contains(node);
                if !dead {
                    back.push(node.clone());
                }
                dead
            });
        let now = now_ms();
        let mut came_back = self
            .came_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for node in back {
            came_back.insert(node, now);
        }
    }

    /// Since when (ms since the epoch, rounded up) `node` has been alive as far as this node
    /// knows: its process start, or when it was seen back after being seen dead.
    fn alive_since_ms(&self, node: &str, nodes: &[NodeStatus]) -> Option<u64> {
        let status = nodes.iter().find(|n| n.alive && n.record.name == node)?;
        // `started_at` is whole seconds: the start was at most 999 ms later.
        let started = status.record.started_at.saturating_mul(1000) + 999;
        let back = self
            .came_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .copied()
            .unwrap_or(0);
        Some(started.max(back))
    }

    fn dead_since(&self, node: &str) -> Duration {
        self.seen_dead
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .map_or(Duration::ZERO, Instant::elapsed)
    }

    /// One pass in its own task, so a slow adoption never delays the next event.
    fn spawn_pass(self: Arc<Self>) {
        tokio::spawn(async move {
            let result = self.pass().await;
            // Said once when passes start failing and once when they work again: a pass runs
            // every second, and a registry that is down is already reported by the fencing
            // monitor.
            let was_failing = self
                .pass_failing
                .swap(result.is_err(), std::sync::atomic::Ordering::Relaxed);
            match result {
                Err(e) if !was_failing => {
                    tracing::warn!(error = %e, "failover pass incomplete; no volume is adopted until a pass works again");
                }
                Err(e) => tracing::debug!(error = %e, "failover pass incomplete"),
                Ok(()) if was_failing => tracing::info!("failover passes work again"),
                Ok(()) => {}
            }
        });
    }

    /// Compare the registry with the live nodes and act on what changed.
    pub async fn pass(self: &Arc<Self>) -> Result<(), RegistryError> {
        let _one = self.passes.lock().await;
        let nodes = self.registry.nodes().await?;
        let alive: BTreeSet<String> = nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.record.name.clone())
            .collect();
        if !alive.contains(&self.node.name) {
            // This node's own lease is gone: it is fenced, it must not take anything.
            return Ok(());
        }
        self.forget_dead(&alive);
        let live = live_view(&nodes);
        let records = self.registry.volumes().await?;
        self.drop_moved_volumes(&records);
        self.replace_dead_dtls(&records, &alive, &live, &nodes)
            .await;

        // Orphans: volumes whose owner is dead, serving, or halted with their DTL node back
        // since the halt (`dtl_back`); planned and adopted alike. A halted volume whose
        // recorded owner is this node (its adoption here failed) is this node's to retry.
        let mut orphans = Vec::new();
        let mut by_name = BTreeMap::new();
        let mut halted_here = Vec::new();
        let mut unserved_here = BTreeMap::new();
        // Read once per pass, not per record: the pass runs every second.
        let served: BTreeSet<String> = self.manager.names().into_iter().collect();
        let failed = self.manager.failed();
        for record in records {
            let revive = self.dtl_back(&record, &nodes);
            if alive.contains(&record.owner) {
                let mine_unserved = record.owner == self.node.name
                    && !self.log.pending(&record.name)
                    && !served.contains(&record.name);
                if revive && mine_unserved {
                    halted_here.push(record);
                } else if mine_unserved
                    && record.state == VolumeState::Serving
                    && !self.log.is_held(&record.name)
                    && !failed.contains_key(&record.name)
                {
                    unserved_here.insert(record.name.clone(), record);
                }
                continue;
            }
            if record.state != VolumeState::Serving && !revive {
                continue;
            }
            if self.registry.owner(&record.name).await?.is_some() {
                continue; // the owner key is still there: not dead yet as far as etcd knows
            }
            self.saw_dead(&record.owner);
            orphans.push(Orphan {
                name: record.name.clone(),
                dtl_node: record.dtl_node.clone(),
                // A DTL at an explicit address outside the cluster is not tracked here: the
                // adoption's replay finds out whether it is reachable.
                mirrored: record.dtl_mode != DtlMode::None && record.dtl_addr.is_none(),
            });
            by_name.insert(record.name.clone(), record);
        }
        for record in halted_here {
            self.adopt_again(&record, &nodes, &live).await;
        }
        self.adopt_unserved(unserved_here, &nodes, &live).await;
        if orphans.is_empty() {
            return Ok(());
        }
        let plan = plan_adoptions(&live, &orphans);
        for orphan in orphans {
            let Some(record) = by_name.remove(&orphan.name) else {
                continue;
            };
            let planned = plan.get(&orphan.name).map(String::as_str);
            let since = self.dead_since(&record.owner);
            match recovery(&orphan, &live) {
                Recovery::Halt(reason) => {
                    if planned == Some(self.node.name.as_str()) {
                        self.halt(&record, &reason).await;
                    }
                }
                Recovery::Adopt => {
                    if !may_adopt(&self.node.name, planned, since, self.grace) {
                        continue;
                    }
                    if record.state == VolumeState::Serving {
                        // Failures are logged, and halt the volume when they must.
                        let _ = self.adopt(&record, &nodes, &live, since, "failover").await;
                    } else {
                        self.adopt_again(&record, &nodes, &live).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Adopt the volumes the registry says this node serves but nothing here serves, once they
    /// stayed so for [`UNSERVED_GRACE`] ([`UnservedWatch`] says why they exist). A failure
    /// halts the volume with the reason, as any adoption's does, so the operator sees it (and
    /// may delete it: `cluster::unserved`).
    async fn adopt_unserved(
        self: &Arc<Self>,
        mut unserved: BTreeMap<String, VolumeRecord>,
        nodes: &[NodeStatus],
        live: &[LiveNode],
    ) {
        let names: BTreeSet<String> = unserved.keys().cloned().collect();
        let due = self
            .unserved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update(Instant::now(), &names, UNSERVED_GRACE);
        for name in due {
            let Some(record) = unserved.remove(&name) else {
                continue;
            };
            tracing::warn!(volume = %name, owner_tag = record.owner_tag, "the registry says this node serves the volume, but nothing here does: adopting it");
            // Failures are logged, and halt the volume when they must.
            let _ = self
                .adopt(&record, nodes, live, Duration::ZERO, "unserved")
                .await;
        }
    }

    /// Adopt a halted volume whose DTL node is back (`last_failover.kind` `dtl-back`). A failure
    /// is logged and recorded as a new halt.
    async fn adopt_again(
        self: &Arc<Self>,
        record: &VolumeRecord,
        nodes: &[NodeStatus],
        live: &[LiveNode],
    ) {
        tracing::warn!(volume = %record.name, dtl_node = ?record.dtl_node, "the halted volume's DTL node is back; adopting it again");
        let _ = self
            .adopt(record, nodes, live, Duration::ZERO, "dtl-back")
            .await;
    }

    /// `record` is halted and its DTL node has been alive since after the halt
    /// ([`dtl_back_since_halt`]): it is adopted again, once per comeback (a new failure is a
    /// new halt, later than the comeback, so an unreadable DTL is not tried every pass).
    fn dtl_back(&self, record: &VolumeRecord, nodes: &[NodeStatus]) -> bool {
        let VolumeState::Halted { at_ms, .. } = &record.state else {
            return false;
        };
        record
            .dtl_node
            .as_ref()
            .is_some_and(|dtl| dtl_back_since_halt(*at_ms, self.alive_since_ms(dtl, nodes)))
    }

    async fn halt(&self, record: &VolumeRecord, reason: &str) {
        let state = VolumeState::Halted {
            reason: format!("owner {} died: {reason}", record.owner),
            at_ms: now_ms(),
        };
        match self
            .registry
            .set_state(&record.name, record.owner_tag, state)
            .await
        {
            Ok(()) => {
                tracing::error!(volume = %record.name, owner = %record.owner, %reason, "volume halted: cannot be recovered");
            }
            Err(e) => {
                tracing::debug!(volume = %record.name, error = %e, "recording the halt failed");
            }
        }
    }

    /// Take `record`'s volume: the registry transaction first (losing it is normal: another
    /// survivor got there first), then the engine's adoption with the new tag.
    pub async fn adopt(
        self: &Arc<Self>,
        record: &VolumeRecord,
        nodes: &[NodeStatus],
        live: &[LiveNode],
        since: Duration,
        kind: &str,
    ) -> Result<FailoverRecord, AdoptError> {
        let started = Instant::now();
        let name = record.name.clone();
        // Pending before the registry names this node: an edge that follows the registry here
        // at once must find the volume opening, so its handshake waits for it.
        self.log.begin(&name);
        let mut expected = record.owner_tag;
        let mut attempt = 1;
        let (tag, summary) = loop {
            let tag = match self
                .registry
                .take_ownership(&name, expected, &self.node.name, self.lease())
                .await
            {
                Ok(tag) => tag,
                Err(RegistryError::StaleTag { owner, .. }) => {
                    self.log.abort(&name);
                    tracing::debug!(volume = %name, %owner, "another node took the volume first");
                    return Err(AdoptError::Taken(owner));
                }
                Err(e @ RegistryError::Unreachable { .. }) => {
                    match self.ownership_after_no_answer(&name, expected).await {
                        Some(tag) => {
                            tracing::warn!(volume = %name, error = %e, owner_tag = tag, "taking ownership got no answer but took effect; adopting");
                            tag
                        }
                        None => {
                            self.log.abort(&name);
                            tracing::warn!(volume = %name, error = %e, "cannot take ownership");
                            return Err(AdoptError::Registry(e.to_string()));
                        }
                    }
                }
                Err(e) => {
                    self.log.abort(&name);
                    tracing::warn!(volume = %name, error = %e, "cannot take ownership");
                    return Err(AdoptError::Registry(e.to_string()));
                }
            };
            let manager = self.manager.clone();
            let target = name.clone();
            // A failure: whether another attempt may succeed, and why it failed.
            let (may_succeed_later, dtl_failed, error) =
                match tokio::task::spawn_blocking(move || manager.adopt_with_tag(&target, tag))
                    .await
                {
                    Ok(Ok((_, summary))) => break (tag, summary),
                    Ok(Err(e)) => (
                        adoption_may_succeed_later(&e),
                        matches!(e, VolumeError::Dtl { .. }),
                        e.to_string(),
                    ),
                    Err(e) => (false, false, format!("the adoption task failed: {e}")),
                };
            if let AfterFailedAdoption::Retry { after } =
                after_failed_adoption(attempt, may_succeed_later)
            {
                // Again under a newer tag, which fences this attempt's claim like any other.
                tracing::warn!(volume = %name, attempt, %error, "adoption failed; retrying");
                tokio::time::sleep(after).await;
                expected = tag;
                attempt += 1;
                continue;
            }
            self.log.abort(&name);
            let dtl_gone = if dtl_failed {
                self.dtl_node_dead(record).await
            } else {
                None
            };
            let reason = failed_adoption_reason(&self.node.name, &error, dtl_gone.as_deref());
            tracing::error!(volume = %name, %reason, attempts = attempt, "volume halted");
            let halted = VolumeState::Halted {
                reason: reason.clone(),
                at_ms: now_ms(),
            };
            if let Err(e) = self.registry.set_state(&name, tag, halted).await {
                tracing::warn!(volume = %name, error = %e, "recording the halt failed");
            }
            return Err(AdoptError::Halted(reason));
        };
        let entry = FailoverRecord {
            from: record.owner.clone(),
            to: self.node.name.clone(),
            kind: kind.to_string(),
            at: now_secs(),
            adopt_ms: u64::try_from((since + started.elapsed()).as_millis()).unwrap_or(u64::MAX),
            owner_tag: tag,
            dtl_entries_replayed: summary.applied,
        };
        tracing::warn!(
            volume = %name,
            from = %record.owner,
            to = %self.node.name,
            kind,
            owner_tag = tag,
            replayed = summary.applied,
            detected_to_serving_ms = entry.adopt_ms,
            adopt_ms = started.elapsed().as_millis() as u64,
            "volume failed over"
        );
        // Recorded before anything else; until then `volume info` says `adopting` (`FailoverLog`).
        self.log.record(&name, entry.clone());
        (self.on_served)(&name);
        let dtl_dead = record
            .dtl_node
            .as_ref()
            .is_some_and(|d| !live.iter().any(|n| &n.name == d));
        if record.dtl_node.as_deref() == Some(self.node.name.as_str()) || dtl_dead {
            self.replace_dtl(&name, tag, record.dtl_mode, live, nodes)
                .await;
        }
        Ok(entry)
    }

    /// `record`'s DTL node if the registry says it is dead now (read afresh: the caller's view
    /// is from before its adoption attempts); `None` if it is alive, there is none, or the
    /// registry does not answer.
    async fn dtl_node_dead(&self, record: &VolumeRecord) -> Option<String> {
        let dtl = record.dtl_node.as_ref()?;
        let nodes = self.registry.nodes().await.ok()?;
        let alive = nodes.iter().any(|n| n.alive && &n.record.name == dtl);
        (!alive).then(|| dtl.clone())
    }

    /// After a `take_ownership` of `name` (expecting `expected`) got no answer: this node's tag
    /// if it took effect anyway ([`ownership_landed`], [`read_back_after_no_answer`]). If the
    /// registry never answers, the transaction is taken as lost (a volume it did give this node
    /// is then found unserved by a later pass and adopted: [`UnservedWatch`]).
    async fn ownership_after_no_answer(&self, name: &str, expected: u64) -> Option<u64> {
        let record = read_back_after_no_answer(self.registry.as_ref(), name).await?;
        let now = record.as_ref().map(|r| (r.owner.as_str(), r.owner_tag));
        ownership_landed(now, &self.node.name, expected)
    }

    /// Point volume `name` (owned here with `tag`) at a new DTL node chosen by the placement
    /// rule; without a candidate it stays on its current (dead) DTL, degraded.
    async fn replace_dtl(
        &self,
        name: &str,
        tag: u64,
        mode: DtlMode,
        live: &[LiveNode],
        nodes: &[NodeStatus],
    ) {
        if mode == DtlMode::None {
            return;
        }
        // The placement rule of new volumes, with DTLs counted from the registry.
        let mut dtls = BTreeMap::new();
        for record in self.registry.volumes().await.unwrap_or_default() {
            if let Some(node) = record.dtl_node {
                *dtls.entry(node).or_insert(0) += 1;
            }
        }
        let live_records: Vec<NodeRecord> = nodes
            .iter()
            .filter(|n| n.alive && live.iter().any(|l| l.name == n.record.name))
            .map(|n| n.record.clone())
            .collect();
        let Some(pick) =
            placement::dtl_node(&self.node, &live_records, &dtls).map(|n| n.name.clone())
        else {
            // Said once per volume: the sweep asks again every second until a node can hold it.
            if self
                .no_dtl_node
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(name.to_string())
            {
                tracing::warn!(volume = %name, "no live node can hold the DTL (recovery domain, own domain, never this node); the volume stays degraded");
            }
            return;
        };
        self.no_dtl_node
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        let Some(addr) = nodes
            .iter()
            .find(|n| n.record.name == pick)
            .map(|n| n.record.dtl_addr.clone())
        else {
            return;
        };
        let manager = self.manager.clone();
        let target = name.to_string();
        let dtl_addr = addr.clone();
        let updated =
            tokio::task::spawn_blocking(move || manager.update_dtl(&target, mode, Some(dtl_addr)))
                .await;
        match updated {
            Ok(Ok(())) => {
                if let Err(e) = self.registry.set_dtl(name, tag, Some(pick.clone())).await {
                    tracing::warn!(volume = %name, error = %e, "cannot record the new DTL node");
                }
                tracing::warn!(volume = %name, dtl_node = %pick, %addr, "DTL re-placed");
            }
            Ok(Err(e)) => tracing::error!(volume = %name, error = %e, "cannot re-place the DTL"),
            Err(e) => tracing::error!(volume = %name, error = %e, "DTL re-placement task failed"),
        }
    }

    /// Volumes this node owns whose DTL node is dead get a new one.
    async fn replace_dead_dtls(
        &self,
        records: &[VolumeRecord],
        alive: &BTreeSet<String>,
        live: &[LiveNode],
        nodes: &[NodeStatus],
    ) {
        for record in records {
            let Some(dtl) = &record.dtl_node else {
                continue;
            };
            // A DTL on the owner itself (the DTL node adopted the volume when no other node
            // could take the DTL) protects nothing: it moves as soon as another node can hold it.
            if record.owner != self.node.name || (alive.contains(dtl) && *dtl != self.node.name) {
                continue;
            }
            let Ok(volume) = self.manager.get(&record.name) else {
                continue;
            };
            let info = volume.info();
            if info.owner_tag != record.owner_tag || volume.fenced().is_some() {
                continue;
            }
            let mode = volume.config().dtl_mode;
            self.replace_dtl(&record.name, record.owner_tag, mode, live, nodes)
                .await;
        }
    }

    /// Volumes served here whose record names another owner were taken over while this node
    /// was cut off: stop serving them and say where they went.
    fn drop_moved_volumes(&self, records: &[VolumeRecord]) {
        let failed = self.manager.failed();
        for record in records {
            if record.owner != self.node.name && failed.contains_key(&record.name) {
                // Could not restart here because another node adopted it meanwhile.
                match self.manager.drop_moved(&record.name, &record.owner) {
                    Ok(()) => {
                        tracing::warn!(volume = %record.name, new_owner = %record.owner, "volume adopted by another node while this one was down; dropped here");
                    }
                    Err(e) => {
                        tracing::error!(volume = %record.name, error = %e, "cannot drop a volume that moved");
                    }
                }
                continue;
            }
            let AfterFence::DropMoved(owner) = after_fence(&self.node.name, Some(&record.owner))
            else {
                continue;
            };
            let Ok(volume) = self.manager.get(&record.name) else {
                continue;
            };
            if record.owner_tag <= volume.info().owner_tag {
                continue; // not a newer owner (a record being moved to us, say)
            }
            (self.on_dropped)(&record.name);
            match self.manager.drop_moved(&record.name, &owner) {
                Ok(()) => {
                    tracing::warn!(volume = %record.name, new_owner = %record.owner, tag = record.owner_tag, "volume taken over by another node while this one was cut off; dropped here");
                }
                Err(e) => {
                    tracing::error!(volume = %record.name, error = %e, "cannot drop a volume that moved");
                }
            }
        }
    }
}

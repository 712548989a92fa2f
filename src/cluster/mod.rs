//! The node runtime of a cluster on a registry: registration under a lease, the keepalive loop
//! that drives the self-fencing [`fencing::Monitor`], the fence gate on this node's volumes, the
//! in-process DTL server, and create placement ([`placement`]).
//!
//! The loop is thin: every keepalive interval it renews the lease, feeds the outcome to the
//! monitor, and carries out what the monitor asks (probe the peers' APIs, register again). The
//! node's [`Health`] is published on a `tokio::sync::watch` channel; [`Cluster::gate`] applies
//! it to the volumes (fenced: no write or flush is acknowledged).
//!
//! Failover ([`failover`], decisions in [`failover_plan`]) and moves ([`moving`]) run on top.

pub mod api;
pub mod dtl_sweep;
pub mod failover;
pub mod failover_plan;
pub mod fencing;
pub mod forward;
pub mod incarnation;
pub mod move_api;
pub mod moving;
pub mod placement;
mod unserved;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use vstor_volumedriver::VolumeManager;

use crate::registry::{ClusterSettings, KeepAlive, LeaseId, NodeRecord, Registry, RegistryError};
pub use fencing::Health;
use fencing::{Action, Monitor};

/// How long [`Cluster::join`] keeps trying a registry that stopped answering after it was
/// connected. A node started by a service manager is restarted anyway; this only spares it a
/// restart (and the operator a scary log line) for a registry that is slow for a few seconds.
pub const JOIN_PATIENCE: Duration = Duration::from_secs(30);
const JOIN_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// A failed registry call during [`Cluster::join`] is tried again when it is a timeout or a
/// lost connection (the registry may answer in a moment) and there is patience left; anything
/// else (refused credentials, corrupt records, a live node of the same name) fails the start.
pub(crate) fn may_retry_join(error: &RegistryError, patience: Instant) -> bool {
    matches!(error, RegistryError::Unreachable { .. }) && Instant::now() < patience
}

/// A node of the cluster: its registry, its record, its current lease and health.
pub struct Cluster {
    pub registry: Arc<dyn Registry>,
    pub node: NodeRecord,
    pub settings: ClusterSettings,
    lease: watch::Sender<LeaseId>,
    health: watch::Sender<Health>,
    /// The nodes this node would ask whether they reach the registry: every other node seen
    /// alive since it started.
    peers: watch::Sender<Vec<NodeRecord>>,
}

impl Cluster {
    /// Register `node` under a new lease. A name held by another lease is refused at once when
    /// that node's API answers as that node; otherwise it may be this node's previous run
    /// (killed), whose lease runs out within the TTL: wait for that, then try once more.
    ///
    /// The registry answered when it was connected (a wrong address or credentials fail before
    /// this), so a call that times out here is a registry busy for a moment (an etcd whose disk
    /// stalls its fsyncs, a leader election): it is tried again for up to [`JOIN_PATIENCE`]
    /// rather than failing the node's start on one slow answer.
    pub async fn join(registry: Arc<dyn Registry>, node: NodeRecord) -> Result<Arc<Self>> {
        let patience = Instant::now() + JOIN_PATIENCE;
        let settings = loop {
            match registry.settings().await {
                Ok(settings) => break settings,
                Err(e) if may_retry_join(&e, patience) => {
                    tracing::warn!(node = %node.name, error = %e, "reading the cluster settings failed; retrying");
                    tokio::time::sleep(JOIN_RETRY_PAUSE).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot read the cluster settings from {}",
                            registry.describe()
                        )
                    })
                }
            }
        };
        settings.validate()?;
        let ttl = settings.lease_ttl();
        let deadline = Instant::now() + ttl + Duration::from_secs(2);
        let lease = loop {
            match registry.register_node(&node, ttl).await {
                Ok(lease) => break lease,
                Err(RegistryError::NodeAlive { api_addr, .. })
                    if Instant::now() < deadline
                        && !forward::is_node(&api_addr, &node.name).await =>
                {
                    tracing::info!(node = %node.name, "waiting for the previous registration of this node to expire");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) if may_retry_join(&e, patience) => {
                    tracing::warn!(node = %node.name, error = %e, "registering the node failed; retrying");
                    tokio::time::sleep(JOIN_RETRY_PAUSE).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot register node {} in {}",
                            node.name,
                            registry.describe()
                        )
                    })
                }
            }
        };
        tracing::info!(node = %node.name, domain = %node.domain, lease = lease.id, registry = %registry.describe(), "node registered");
        let (lease_tx, _) = watch::channel(lease.id);
        let (health, _) = watch::channel(Health::Healthy);
        let (peers, _) = watch::channel(Vec::new());
        Ok(Arc::new(Self {
            registry,
            node,
            settings,
            lease: lease_tx,
            health,
            peers,
        }))
    }

    pub fn lease(&self) -> LeaseId {
        *self.lease.borrow()
    }

    /// The node's lease as it changes (a new one after registering again).
    pub fn lease_watch(&self) -> watch::Receiver<LeaseId> {
        self.lease.subscribe()
    }

    /// The node's health as the self-fencing monitor sees it (for part B: failover waits on it).
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// Names of the peers the self-fencing monitor would ask.
    pub fn peer_names(&self) -> Vec<String> {
        self.peers.borrow().iter().map(|p| p.name.clone()).collect()
    }

    pub fn is_fenced(&self) -> bool {
        matches!(*self.health.borrow(), Health::Fenced { .. })
    }

    /// Run the keepalive loop and the monitor until the task is aborted.
    pub fn start(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move { me.keepalive_loop().await })
    }

    /// Renew the lease every keepalive interval (each attempt bounded by the interval), report
    /// each outcome with the time its request was sent, and refresh the list of peers while the
    /// registry answers. Runs beside the monitor so a slow registry never delays its ticks.
    async fn renew_loop(
        self: Arc<Self>,
        results: tokio::sync::mpsc::Sender<(Instant, Result<KeepAlive, RegistryError>)>,
    ) {
        let interval = self.settings.keepalive_interval();
        loop {
            let sent = Instant::now();
            let result = match tokio::time::timeout(
                interval,
                self.registry.keep_alive(self.lease()),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(RegistryError::Unreachable {
                    registry: self.registry.describe(),
                    reason: format!("lease renewal: no answer within {interval:?}"),
                }),
            };
            let renewed = matches!(result, Ok(KeepAlive::Renewed { .. }));
            if results.send((sent, result)).await.is_err() {
                return;
            }
            // Peers to ask if this node is cut off: every node seen alive since this one
            // started (a dead one just does not answer), refreshed while the registry answers.
            if renewed {
                if let Ok(Ok(live)) =
                    tokio::time::timeout(interval / 2, self.registry.live_nodes()).await
                {
                    self.peers.send_if_modified(|known| {
                        let before = known.clone();
                        for node in live.into_iter().filter(|n| n.name != self.node.name) {
                            match known.iter_mut().find(|k| k.name == node.name) {
                                Some(k) => *k = node,
                                None => known.push(node),
                            }
                        }
                        *known != before
                    });
                }
            }
            tokio::time::sleep(interval.saturating_sub(sent.elapsed())).await;
        }
    }

    /// The monitor: fed with renewal outcomes, ticked four times a keepalive interval, carrying
    /// out its actions and publishing the node's health.
    async fn keepalive_loop(self: Arc<Self>) {
        let (results_tx, mut results) = tokio::sync::mpsc::channel(16);
        let peers = self.peers.subscribe();
        let renewer = tokio::spawn(self.clone().renew_loop(results_tx));
        let _stop_renewer = AbortOnDropHandle::new(renewer);
        let mut monitor = Monitor::new(Instant::now(), self.settings.fence_after());
        let mut ticker = tokio::time::interval(self.settings.keepalive_interval() / 4);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut actions = Vec::new();
            tokio::select! {
                result = results.recv() => match result {
                    Some((sent, Ok(KeepAlive::Renewed { .. }))) => monitor.renewed(sent),
                    Some((_, Ok(KeepAlive::Expired))) => actions.extend(monitor.lease_expired()),
                    Some((_, Err(e))) => tracing::debug!(error = %e, "lease renewal failed"),
                    None => return,
                },
                _ = ticker.tick() => {}
            }
            actions.extend(monitor.tick(Instant::now()));
            for action in actions {
                match action {
                    Action::Probe => {
                        let peers = peers.borrow().clone();
                        let answers =
                            forward::probe_registry(&peers, self.settings.peer_probe_timeout())
                                .await;
                        // A peer reaches the registry. When it came back for everybody at once
                        // (etcd restarted), this node's own next renewal can be up to a
                        // keepalive interval away, and fencing now would fail the writes in
                        // flight for nothing. One renewal first, bounded to a tenth of the
                        // fence margin (at most 100 ms) so the fence still goes up well before
                        // the lease can expire: renewed, the answers are moot; not, the peers
                        // decide as before.
                        if answers.contains(&Some(true)) {
                            let recheck = Duration::from_millis(
                                (self.settings.fence_margin_ms / 10).min(100),
                            );
                            let sent = Instant::now();
                            if let Ok(Ok(KeepAlive::Renewed { .. })) = tokio::time::timeout(
                                recheck,
                                self.registry.keep_alive(self.lease()),
                            )
                            .await
                            {
                                monitor.renewed(sent);
                            }
                        }
                        monitor.probed(Instant::now(), &answers);
                    }
                    Action::Register => {
                        let sent = Instant::now();
                        match self
                            .registry
                            .register_node(&self.node, self.settings.lease_ttl())
                            .await
                        {
                            Ok(lease) => {
                                self.lease.send_replace(lease.id);
                                monitor.registered(sent);
                                tracing::info!(
                                    lease = lease.id,
                                    "registered again with a new lease"
                                );
                            }
                            Err(e) => tracing::debug!(error = %e, "registering again failed"),
                        }
                    }
                }
            }
            let health = monitor.health().clone();
            self.health.send_if_modified(|current| {
                if *current == health {
                    return false;
                }
                match &health {
                    Health::Fenced { reason } => tracing::error!(%reason, "node fenced: writes are not acknowledged"),
                    Health::RegistryDown => tracing::warn!("the registry is unreachable for every peer too: serving on, no ownership changes possible"),
                    Health::Healthy => tracing::info!("node healthy again"),
                }
                *current = health;
                true
            });
        }
    }

    /// Apply the node's health to `manager`'s volumes, now and whenever it changes: fenced
    /// volumes acknowledge no writes. On the way back to healthy, volumes whose record no longer
    /// names this node with their tag stay fenced (another node took them over), and the others
    /// get their owner key back under the current lease.
    ///
    /// The current health is applied before this returns, so a node that starts calls it before
    /// any export serves: a volume whose record names another owner now (taken over while the
    /// node was down, its backend not claimed yet) is fenced before a write can reach it.
    pub async fn gate(
        self: &Arc<Self>,
        manager: Arc<VolumeManager>,
    ) -> tokio::task::JoinHandle<()> {
        let mut health = self.health();
        let mut lease = self.lease.subscribe();
        let current = health.borrow_and_update().clone();
        self.apply_health(&manager, current).await;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = health.changed() => if changed.is_err() { return },
                    changed = lease.changed() => if changed.is_err() { return },
                }
                let current = health.borrow_and_update().clone();
                me.apply_health(&manager, current).await;
            }
        })
    }

    /// Fence every volume, or unfence those still this node's (`reclaim`).
    async fn apply_health(&self, manager: &Arc<VolumeManager>, health: Health) {
        match health {
            Health::Fenced { reason } => {
                for name in manager.names() {
                    if let Ok(volume) = manager.get(&name) {
                        volume.set_fenced(Some(reason.clone()));
                    }
                }
            }
            Health::Healthy | Health::RegistryDown => self.reclaim(manager).await,
        }
    }

    /// Unfence the volumes this node still owns and put their owner keys under the current
    /// lease (a no-op when they are there already).
    pub async fn reclaim(&self, manager: &Arc<VolumeManager>) {
        let lease = self.lease();
        for name in manager.names() {
            let Ok(volume) = manager.get(&name) else {
                continue;
            };
            let tag = volume.info().owner_tag;
            // Why the volume is not this node's any more, when its cluster record is gone.
            let mut lost = None;
            let still_ours =
                match self.registry.volume(&name).await {
                    Ok(Some(record))
                        if record.owner == self.node.name && record.owner_tag == tag =>
                    {
                        match self.registry.owner(&name).await {
                        Ok(Some(owner)) if owner.lease == lease => true,
                        _ => self
                            .registry
                            .refresh_owner(&name, &self.node.name, tag, lease)
                            .await
                            .map_err(|e| tracing::warn!(volume = %name, error = %e, "cannot put the owner key back"))
                            .is_ok(),
                    }
                    }
                    Ok(Some(record)) => {
                        tracing::warn!(volume = %name, owner = %record.owner, tag = record.owner_tag, ours = tag, "volume is owned by another node now; it stays fenced here");
                        false
                    }
                    // No record: a volume of this node the cluster does not know (created before
                    // the node joined a cluster) serves on; one the cluster deleted (and maybe
                    // re-created elsewhere) while this node was cut off does not: the backend
                    // tells them apart (`backend_lost`).
                    Ok(None) => {
                        let manager = manager.clone();
                        let target = name.clone();
                        match tokio::task::spawn_blocking(move || manager.backend_lost(&target))
                            .await
                        {
                            Ok(Ok(None)) => true,
                            Ok(Ok(Some(reason))) => {
                                tracing::warn!(volume = %name, %reason, "the cluster has no record of the volume and its backend is not its own any more: it stays fenced here");
                                lost = Some(format!(
                                    "the volume was deleted in the cluster while this node was cut off ({reason})"
                                ));
                                false
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(volume = %name, error = %e, "cannot check the volume's backend");
                                volume.fenced().is_none()
                            }
                            Err(e) => {
                                tracing::warn!(volume = %name, error = %e, "the backend check failed");
                                volume.fenced().is_none()
                            }
                        }
                    }
                    Err(e) => {
                        // Registry down for everybody: nobody can have taken it; serve on.
                        tracing::debug!(volume = %name, error = %e, "cannot check the volume's record");
                        volume.fenced().is_none()
                    }
                };
            if still_ours {
                volume.set_fenced(None);
            } else if let Some(reason) = lost {
                volume.set_fenced(Some(reason));
            } else if volume.fenced().is_none() {
                volume.set_fenced(Some("the volume is owned by another node".into()));
            }
        }
    }

    /// Leave the cluster at a clean stop: the lease goes, and the node shows as dead at once.
    pub async fn leave(&self) {
        if let Err(e) = self.registry.revoke(self.lease()).await {
            tracing::warn!(error = %e, "cannot revoke the node's lease; it expires on its own");
        }
    }
}

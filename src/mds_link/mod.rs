//! The node's metadata servers (`vstor serve --mds A,B…`): the [`MdsHook`] the volume manager
//! calls, and a periodic check of every served volume's tables.
//!
//! * **Restart and adoption** ask [`MdsLink::seed`]: the master's table (or, with the master
//!   gone, the most caught-up slave no more than `max_behind` TLogs behind) is loaded and only
//!   the TLogs after its cork are replayed. Any doubt (no table, unreachable, history rewritten,
//!   corrupt) means a full backend replay, which is always right, with a log line saying why.
//! * **Serving** a volume installs an [`MdsFeed`] as its uncork sink: the master receives each
//!   TLog's map updates only after the TLog is on the backend.
//! * **The check** (every `check_every`, and at once when a volume starts being served) probes
//!   each MDS of the volume (`stat`, compared with the backend TLog list read by the node), and
//!   carries out [`plan::check`]: promote the most caught-up slave when the master is dead (not
//!   one more than `max_behind` behind), make a returning old master a slave, create missing
//!   tables, and catch lagging slaves up (on demand, besides the MDS's own timer). Promotions
//!   are written to the registry (`mds/volumes/VOLUME`), so the next owner, after a restart or a
//!   failover, uses the same master.
//!
//! * **Placement** comes from `--mds` (the first is the master, the others slaves) or, on a
//!   cluster registry without `--mds`, from the live MDS records ([`registration`]): the master
//!   beside the owner, one slave in its recovery domain. Either way it is stored per volume.
//!
//! Decisions are pure ([`plan`]); this module is the I/O around them. No lock is held across a
//! network call: the per-volume state is copied out, the calls made, the result written back.
//! Every MDS call is bounded by [`CALL_TIMEOUT`], so a dead MDS costs a check seconds, never a
//! hang, and never blocks a write (the feed only queues).

pub mod plan;
pub mod registration;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use vstor_backend::ObjectStore;
use vstor_mds::catchup::read_list;
use vstor_mds::client::MdsClient;
use vstor_mds::owner::{seed_from_mds, MdsFeed};
use vstor_mds::proto::ErrorCode;
use vstor_mds::table::{plan_catch_up, CatchUpPlan};
use vstor_mds::{Cork, MdsError, Role};
use vstor_volumedriver::{MapSeed, MdsHook, PendingSeed, Volume};

use crate::api_types::{MdsServerStatus, MdsStatus};
use crate::registry::{now_secs, NodeRecord, Registry};
use plan::{Placement, Probe};

/// Every call to an MDS waits at most this long.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A restart waits at most this long for its seed (a large table's dump) before replaying.
const SEED_WAIT: Duration = Duration::from_secs(120);

/// `[mds]` / `--mds`: which MDSes the node's volumes use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdsSettings {
    /// `HOST:PORT`; the first is the master of new volumes, the others slaves. Empty: placed
    /// automatically on the MDSes registered in the cluster registry.
    pub servers: Vec<String>,
    /// A slave more TLogs than this behind the backend is not promoted (nor seeded from).
    pub max_behind: u64,
    /// How often each served volume's tables are checked.
    pub check_every: Duration,
}

/// The node's side of its MDSes (see the module docs).
pub struct MdsLink {
    inner: Arc<Inner>,
}

struct Inner {
    settings: MdsSettings,
    runtime: tokio::runtime::Handle,
    backend: Arc<dyn ObjectStore>,
    registry: Arc<dyn Registry>,
    /// This node (its name and recovery domain place new volumes automatically).
    node: NodeRecord,
    /// Mutual TLS with the MDSes (`[peer_tls]`); `None`: plain TCP.
    tls: Option<vstor_net::PeerTls>,
    clients: Mutex<HashMap<String, Arc<MdsClient>>>,
    served: Mutex<BTreeMap<String, Served>>,
}

struct Served {
    volume: Weak<Volume>,
    owner_tag: u64,
    /// `None` until the first check read it from the registry.
    placement: Option<Placement>,
    /// Roles (and the owner tag) were written to every reachable MDS since serving began.
    roles_set: bool,
    /// The master the volume's feed sends to.
    master: watch::Sender<Option<Arc<MdsClient>>>,
    status: MdsStatus,
}

fn placement_key(volume: &str) -> String {
    format!("mds/volumes/{volume}")
}

impl MdsLink {
    pub fn new(
        settings: MdsSettings,
        runtime: tokio::runtime::Handle,
        backend: Arc<dyn ObjectStore>,
        registry: Arc<dyn Registry>,
        node: NodeRecord,
        tls: Option<vstor_net::PeerTls>,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::new(Inner {
                settings,
                runtime,
                backend,
                registry,
                node,
                tls,
                clients: Mutex::new(HashMap::new()),
                served: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// Check every served volume every `check_every` until the returned task is aborted.
    pub fn start(&self) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            let mut tick = tokio::time::interval(inner.settings.check_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let names: Vec<String> = inner.served.lock().keys().cloned().collect();
                for name in names {
                    inner.check(&name).await;
                }
            }
        })
    }

    /// The volume's MDSes as last checked (`None`: not served here, or not checked yet).
    pub fn status(&self, volume: &str) -> Option<MdsStatus> {
        let served = self.inner.served.lock();
        let s = served.get(volume)?;
        (s.status.checked_at > 0).then(|| s.status.clone())
    }

    /// Run `fut` on the node's runtime; its result arrives on the receiver, which a blocking
    /// context waits on.
    fn spawn_for<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> std::sync::mpsc::Receiver<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx
    }
}

impl MdsHook for MdsLink {
    fn seed(&self, volume: &str) -> PendingSeed {
        let (inner, name) = (self.inner.clone(), volume.to_string());
        let wait = self.spawn_for(async move { inner.seed(&name).await });
        let volume = volume.to_string();
        Box::new(move || {
            let seed = wait.recv_timeout(SEED_WAIT).ok();
            if seed.is_none() {
                tracing::warn!(
                    volume,
                    "no answer from the MDSes in {SEED_WAIT:?}: full backend replay"
                );
            }
            seed.flatten()
        })
    }

    fn serving(&self, volume: &Arc<Volume>) {
        let name = volume.name().to_string();
        let owner_tag = volume.config().owner_tag;
        let (master, rx) = watch::channel(None);
        let feed = {
            let _runtime = self.inner.runtime.enter();
            MdsFeed::follow(rx, &name, owner_tag, Cork::EMPTY)
        };
        volume.set_uncork_sink(Some(feed));
        self.inner.served.lock().insert(
            name.clone(),
            Served {
                volume: Arc::downgrade(volume),
                owner_tag,
                placement: None,
                roles_set: false,
                master,
                status: MdsStatus::default(),
            },
        );
        let inner = self.inner.clone();
        self.inner
            .runtime
            .spawn(async move { inner.check(&name).await });
    }

    fn stopped(&self, volume: &str, deleted: bool) {
        let Some(served) = self.inner.served.lock().remove(volume) else {
            return;
        };
        if !deleted {
            return;
        }
        let (inner, name) = (self.inner.clone(), volume.to_string());
        self.inner.runtime.spawn(async move {
            let placement = match served.placement {
                Some(p) => Some(p),
                None => inner.load_placement(&name).await,
            };
            for addr in placement.iter().flat_map(Placement::all) {
                let dropped = match inner.client(addr).await {
                    Ok(client) => client.drop_table(&name, served.owner_tag).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = dropped {
                    tracing::warn!(volume = %name, mds = %addr, error = %e, "could not drop the deleted volume's MDS table");
                }
            }
            inner.save_placement(&name, None).await;
        });
    }
}

impl Inner {
    /// A live connection to `addr` (reconnecting if the last one broke).
    async fn client(&self, addr: &str) -> Result<Arc<MdsClient>, MdsError> {
        if let Some(client) = self.clients.lock().get(addr) {
            if client.is_alive() {
                return Ok(client.clone());
            }
        }
        let client = Arc::new(
            MdsClient::connect_with(addr, "vstor-node", CALL_TIMEOUT, self.tls.as_ref()).await?,
        );
        self.clients.lock().insert(addr.to_string(), client.clone());
        Ok(client)
    }

    async fn load_placement(&self, volume: &str) -> Option<Placement> {
        let stored = match self.registry.get_record(&placement_key(volume)).await {
            Ok(Some((bytes, _))) => match serde_json::from_slice(&bytes) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(volume, error = %e, "unreadable MDS placement in the registry; using the configured order");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(volume, error = %e, "cannot read the MDS placement from the registry; using the configured order");
                None
            }
        };
        if !self.settings.servers.is_empty() {
            return Placement::reconcile(stored, &self.settings.servers);
        }
        if stored.is_some() {
            return stored;
        }
        let live = match registration::servers(self.registry.as_ref()).await {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!(volume, error = %e, "cannot list the MDSes in the registry");
                return None;
            }
        };
        let candidates: Vec<(String, Option<String>, String)> = live
            .into_iter()
            .map(|r| (r.addr, r.node, r.domain))
            .collect();
        let recovery = self
            .node
            .recovery_domain
            .as_deref()
            .unwrap_or(&self.node.domain);
        let placed = Placement::automatic(&candidates, &self.node.name, recovery)?;
        tracing::info!(volume, master = %placed.master, slaves = ?placed.slaves, "MDS placement chosen from the registry");
        self.save_placement(volume, Some(&placed)).await;
        Some(placed)
    }

    /// Write (or with `None` delete) the volume's placement record.
    async fn save_placement(&self, volume: &str, placement: Option<&Placement>) {
        let key = placement_key(volume);
        let bytes = placement.and_then(|p| serde_json::to_vec(p).ok());
        for _ in 0..3 {
            let rev = match self.registry.get_record(&key).await {
                Ok(found) => found.map_or(0, |(_, rev)| rev),
                Err(e) => {
                    tracing::warn!(volume, error = %e, "cannot write the MDS placement to the registry");
                    return;
                }
            };
            if rev == 0 && bytes.is_none() {
                return;
            }
            match self
                .registry
                .swap_record(&key, rev, bytes.as_deref(), None)
                .await
            {
                Ok(true) => return,
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(volume, error = %e, "cannot write the MDS placement to the registry");
                    return;
                }
            }
        }
    }

    /// What each MDS of `placement` says about the volume's table, against the backend list.
    /// Every MDS of `placement` against the backend's TLog list, and that list's length (what
    /// `behind` counts out of).
    async fn probe(
        &self,
        volume: &str,
        placement: &Placement,
    ) -> Option<(Vec<(String, Probe)>, u64)> {
        let list = {
            let (backend, name) = (self.backend.clone(), volume.to_string());
            tokio::task::spawn_blocking(move || read_list(backend.as_ref(), &name, &name)).await
        };
        let list = match list {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => {
                tracing::warn!(volume, error = %e, "cannot read the backend TLog list to check the MDSes");
                return None;
            }
            Err(e) => {
                tracing::warn!(volume, error = %e, "checking the MDSes failed");
                return None;
            }
        };
        let tlogs = &list.tlogs;
        let probes = placement.all().map(|addr| async move {
            let probe = match self.client(addr).await {
                Err(e) => Probe::Unreachable(e.to_string()),
                Ok(client) => match client.stat(volume).await {
                    Ok(info) => Probe::Table {
                        master: info.meta.role == Role::Master,
                        behind: match plan_catch_up(info.meta.cork, tlogs) {
                            CatchUpPlan::Full { .. } => None,
                            plan => Some(plan.tlogs(tlogs.len()) as u64),
                        },
                    },
                    Err(MdsError::Refused {
                        code: ErrorCode::NotFound,
                        ..
                    }) => Probe::NoTable,
                    Err(e) => Probe::Unreachable(e.to_string()),
                },
            };
            (addr.clone(), probe)
        });
        let probes = futures::future::join_all(probes).await;
        Some((probes, tlogs.len() as u64))
    }

    async fn seed(&self, volume: &str) -> Option<MapSeed> {
        let placement = self.load_placement(volume).await?;
        let (probes, _) = self.probe(volume, &placement).await?;
        let source = match plan::seed_source(&placement, &probes, self.settings.max_behind) {
            Ok(addr) => addr.to_string(),
            Err(reason) => {
                tracing::warn!(volume, %reason, "no MDS table to start from: full backend replay");
                return None;
            }
        };
        let client = match self.client(&source).await {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(volume, error = %e, "MDS lost while seeding: full backend replay");
                return None;
            }
        };
        seed_from_mds(&client, self.backend.clone(), volume, volume).await
    }

    /// One check of a served volume (see the module docs).
    async fn check(&self, volume: &str) {
        let (owner_tag, stored, roles_set) = {
            let served = self.served.lock();
            let Some(s) = served.get(volume) else { return };
            if s.volume.strong_count() == 0 {
                return;
            }
            (s.owner_tag, s.placement.clone(), s.roles_set)
        };
        let mut placement = match stored {
            Some(p) => p,
            None => match self.load_placement(volume).await {
                Some(p) => p,
                None => return,
            },
        };
        let Some((probes, backend_tlogs)) = self.probe(volume, &placement).await else {
            return;
        };
        let decided = plan::check(&placement, &probes, self.settings.max_behind);
        let mut notes = Vec::new();
        // Whether this check changed anything an MDS reports: only then is a second probe
        // (for the status `volume info` shows) worth its backend list read.
        let mut acted = false;
        if let Some(to) = &decided.promote {
            acted = true;
            let behind = probes.iter().find(|(a, _)| a == to).map(|(_, p)| p.clone());
            match self.promote(volume, to, owner_tag).await {
                Ok(()) => {
                    tracing::warn!(volume, old = %placement.master, new = %to, probe = ?behind, "MDS master unreachable: promoted the most caught-up slave");
                    placement = placement.promote(to);
                    self.save_placement(volume, Some(&placement)).await;
                }
                Err(e) => {
                    tracing::warn!(volume, mds = %to, error = %e, "promoting the MDS slave failed; trying again at the next check");
                    notes.push(format!("promoting {to} failed: {e}"));
                }
            }
        }
        if let Some(reason) = &decided.no_master {
            tracing::warn!(volume, master = %placement.master, %reason, "MDS master unreachable and not replaced; a restart now replays the backend");
            notes.push(reason.clone());
        }
        let reachable = |addr: &str| {
            probes
                .iter()
                .any(|(a, p)| a == addr && !matches!(p, Probe::Unreachable(_)))
        };
        let mut all_roles = true;
        if decided.make_master || (!roles_set && reachable(&placement.master)) {
            acted = true;
            all_roles &= self
                .set_role(volume, &placement.master, Role::Master, owner_tag)
                .await;
        }
        for slave in &placement.slaves {
            let wanted = decided.make_slave.contains(slave) || !roles_set;
            if wanted && reachable(slave) {
                acted = true;
                all_roles &= self.set_role(volume, slave, Role::Slave, owner_tag).await;
            }
        }
        for addr in &decided.catch_up {
            if let Ok(client) = self.client(addr).await {
                acted = true;
                match client.catch_up(volume, false).await {
                    Ok(r) if r.replayed > 0 => {
                        tracing::info!(volume, mds = %addr, replayed = r.replayed, full = ?r.full_rebuild, "MDS table caught up on demand");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(volume, mds = %addr, error = %e, "MDS catch-up failed");
                    }
                }
            }
        }
        // Feed the master we have now.
        let master_client = if reachable(&placement.master) || decided.promote.is_some() {
            self.client(&placement.master).await.ok()
        } else {
            None
        };
        let (probes, backend_tlogs) = if acted {
            self.probe(volume, &placement)
                .await
                .unwrap_or_else(|| (probes.clone(), backend_tlogs))
        } else {
            (probes.clone(), backend_tlogs)
        };
        let status = status_of(&placement, &probes, backend_tlogs, notes);
        let mut served = self.served.lock();
        let Some(s) = served.get_mut(volume) else {
            return;
        };
        s.roles_set |= all_roles && placement.all().all(|a| reachable(a));
        s.placement = Some(placement);
        s.status = status;
        let current = s.master.borrow().clone();
        let changed = match (&current, &master_client) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, None) => false,
            _ => true,
        };
        if changed {
            s.master.send_replace(master_client);
        }
    }

    async fn promote(&self, volume: &str, to: &str, owner_tag: u64) -> Result<(), MdsError> {
        let client = self.client(to).await?;
        // Up to date first, so the feed's next update fits; without a backend on the MDS the
        // feed's own catch-up tries again.
        if let Err(e) = client.catch_up(volume, false).await {
            tracing::warn!(volume, mds = %to, error = %e, "catch-up before promotion failed");
        }
        client
            .set_role(volume, volume, Role::Master, owner_tag)
            .await
    }

    async fn set_role(&self, volume: &str, addr: &str, role: Role, owner_tag: u64) -> bool {
        let result = match self.client(addr).await {
            Ok(client) => client.set_role(volume, volume, role, owner_tag).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(volume, mds = %addr, role = role.as_str(), error = %e, "cannot set the MDS role");
                false
            }
        }
    }
}

fn status_of(
    placement: &Placement,
    probes: &[(String, Probe)],
    backend_tlogs: u64,
    notes: Vec<String>,
) -> MdsStatus {
    let servers = placement
        .all()
        .map(|addr| {
            let probe = probes.iter().find(|(a, _)| a == addr).map(|(_, p)| p);
            let (reachable, behind, error) = match probe {
                Some(Probe::Table { behind, .. }) => (true, *behind, None),
                Some(Probe::NoTable) => (true, None, Some("no table".to_string())),
                Some(Probe::Unreachable(e)) => (false, None, Some(e.clone())),
                None => (false, None, None),
            };
            MdsServerStatus {
                addr: addr.clone(),
                role: if *addr == placement.master {
                    "master"
                } else {
                    "slave"
                }
                .to_string(),
                reachable,
                behind,
                error,
            }
        })
        .collect();
    MdsStatus {
        master: placement.master.clone(),
        servers,
        backend_tlogs,
        promotions: placement.promotions,
        checked_at: now_secs(),
        problem: (!notes.is_empty()).then(|| notes.join("; ")),
    }
}

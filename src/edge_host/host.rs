//! The edge's attached volumes: each a [`RemoteTarget`] served by the NBD server and the
//! vhost-user-blk backend, and an entry in the registry's attachment list.
//!
//! Attach: connect the remote target first (so a missing volume, a dead owner, an owner without
//! `--edge-listen` or a refused tag fails fast, before anything is recorded), then record the
//! attachment (the registry's one-writer rule), then serve the vhost-user socket. Detach
//! reverses it. Each step undoes the earlier ones when a later one fails. Attach and detach of
//! one volume are serialised by a `busy` set (no lock is held across the network calls).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use vstor_edge::nbd::NbdServer;
use vstor_edge::remote::client::{RemoteConfig, RemoteError, RemoteTarget};
use vstor_edge::remote::Resolver;
use vstor_edge::vhost::VhostServer;
use vstor_edge::{BlockTarget, Client, ExportRegistry};
use vstor_volumedriver::access::VolumeAccess;

use crate::registry::{Registry, RegistryError};

use super::report::{attachment, Frontends};
use crate::api_types::{Attachment, Detached};

/// Why an attach or detach failed, with the HTTP status the API answers.
#[derive(Debug)]
pub enum HostError {
    NotFound(String),
    Conflict(String),
    Unavailable(String),
}

impl HostError {
    pub fn message(&self) -> &str {
        match self {
            HostError::NotFound(m) | HostError::Conflict(m) | HostError::Unavailable(m) => m,
        }
    }
}

impl From<RegistryError> for HostError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::VolumeNotFound { .. } | RegistryError::NotAttached { .. } => {
                HostError::NotFound(e.to_string())
            }
            RegistryError::AttachedElsewhere { .. } | RegistryError::StaleTag { .. } => {
                HostError::Conflict(e.to_string())
            }
            other => HostError::Unavailable(other.to_string()),
        }
    }
}

fn remote_error(e: &RemoteError) -> HostError {
    match e {
        RemoteError::Resolve { reason, .. } if reason.contains("not in the cluster registry") => {
            HostError::NotFound(e.to_string())
        }
        RemoteError::Refused { .. } => HostError::Conflict(e.to_string()),
        _ => HostError::Unavailable(e.to_string()),
    }
}

/// The attached volumes as the frontends' export registry.
#[derive(Default)]
pub struct EdgeExports {
    map: Mutex<BTreeMap<String, Arc<RemoteTarget>>>,
}

impl EdgeExports {
    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Arc<RemoteTarget>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, name: &str) -> Option<Arc<RemoteTarget>> {
        self.map().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<RemoteTarget>> {
        self.map().values().cloned().collect()
    }
}

impl ExportRegistry for EdgeExports {
    /// The volume's allow list as its owner sent it over the edge protocol, under the node's
    /// rule (`VolumeAccess::allows`): an edge refuses exactly the clients the owner would.
    fn allows(&self, name: &str, client: &Client) -> bool {
        match self.get(name) {
            Some(target) => {
                let list = target.access();
                VolumeAccess {
                    allow_subjects: list.subjects,
                    allow_networks: list.networks,
                }
                .allows(client.addr.ip(), client.subject.as_deref())
            }
            // Not attached: `lookup` answers it as unknown.
            None => true,
        }
    }

    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockTarget>> {
        self.get(name).map(|t| t as Arc<dyn BlockTarget>)
    }

    fn list(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }
}

/// Everything an edge daemon runs; shared by its API handlers.
pub struct EdgeHost {
    pub name: String,
    pub registry: Arc<dyn Registry>,
    pub resolver: Arc<dyn Resolver>,
    pub remote: RemoteConfig,
    pub exports: Arc<EdgeExports>,
    pub nbd: NbdServer,
    pub nbd_addr: SocketAddr,
    pub vhost: VhostServer,
    /// Reloads of the edge's credentials (`credentials`), for `/metrics`.
    pub credential_reloads: Arc<crate::credentials::ReloadStats>,
    busy: Mutex<BTreeSet<String>>,
}

/// Marks one volume busy (an attach or detach in progress) until dropped.
struct Busy<'a>(&'a EdgeHost, String);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.1);
    }
}

impl EdgeHost {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        registry: Arc<dyn Registry>,
        resolver: Arc<dyn Resolver>,
        remote: RemoteConfig,
        exports: Arc<EdgeExports>,
        nbd: NbdServer,
        nbd_addr: SocketAddr,
        vhost: VhostServer,
        credential_reloads: Arc<crate::credentials::ReloadStats>,
    ) -> Self {
        Self {
            name,
            registry,
            resolver,
            remote,
            exports,
            nbd,
            nbd_addr,
            vhost,
            credential_reloads,
            busy: Mutex::new(BTreeSet::new()),
        }
    }

    fn busy(&self, volume: &str) -> Result<Busy<'_>, HostError> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if !busy.insert(volume.to_string()) {
            return Err(HostError::Conflict(format!(
                "volume {volume}: an attach or detach is already in progress on edge {}",
                self.name
            )));
        }
        Ok(Busy(self, volume.to_string()))
    }

    /// `vstor edge attach VOLUME`. Attaching a volume already attached here answers its view.
    pub async fn attach(&self, volume: &str) -> Result<Attachment, HostError> {
        if volume.is_empty() || volume.contains(['/', '\0']) {
            return Err(HostError::NotFound(format!(
                "{volume:?} is not a volume name"
            )));
        }
        let _busy = self.busy(volume)?;
        if self.exports.get(volume).is_some() {
            return self
                .view(volume)
                .ok_or_else(|| HostError::NotFound(format!("volume {volume} is not attached")));
        }
        let target = RemoteTarget::connect(volume, self.resolver.clone(), self.remote.clone())
            .await
            .map_err(|e| remote_error(&e))?;
        if let Err(e) = self
            .registry
            .attach(volume, &self.name, target.read_only())
            .await
        {
            target.close().await;
            return Err(e.into());
        }
        self.exports
            .map()
            .insert(volume.to_string(), target.clone());
        let vhost = self.vhost.clone();
        let name = volume.to_string();
        let added = tokio::task::spawn_blocking(move || vhost.add_export(&name))
            .await
            .map_err(|e| HostError::Unavailable(e.to_string()))
            .and_then(|r| r.map_err(|e| HostError::Unavailable(e.to_string())));
        if let Err(e) = added {
            self.exports.map().remove(volume);
            target.close().await;
            let _ = self.registry.detach(volume, &self.name).await;
            return Err(HostError::Unavailable(format!(
                "volume {volume}: cannot serve it over vhost-user: {}",
                e.message()
            )));
        }
        tracing::info!(%volume, edge = %self.name, "volume attached");
        self.view(volume)
            .ok_or_else(|| HostError::NotFound(format!("volume {volume} is not attached")))
    }

    /// `vstor edge detach VOLUME [--force]`.
    pub async fn detach(&self, volume: &str, force: bool) -> Result<Detached, HostError> {
        let _busy = self.busy(volume)?;
        let Some(target) = self.exports.get(volume) else {
            return Err(HostError::NotFound(format!(
                "volume {volume} is not attached on edge {}",
                self.name
            )));
        };
        let nbd_clients = self.nbd.connections(volume);
        let vhost_connected = self.vhost.connected(volume);
        if !force && (nbd_clients > 0 || vhost_connected) {
            let mut users = Vec::new();
            if nbd_clients > 0 {
                users.push(format!("{nbd_clients} NBD client(s)"));
            }
            if vhost_connected {
                users.push("a vhost-user frontend".to_string());
            }
            return Err(HostError::Conflict(format!(
                "volume {volume} is in use on edge {} ({} connected); disconnect them first, or use --force to disconnect them and detach",
                self.name,
                users.join(" and ")
            )));
        }
        let vhost = self.vhost.clone();
        let name = volume.to_string();
        let _ = tokio::task::spawn_blocking(move || vhost.remove_export(&name)).await;
        if !self
            .nbd
            .disconnect_export_and_wait(volume, Duration::from_secs(30))
            .await
        {
            tracing::warn!(%volume, "NBD clients did not disconnect within 30 s");
        }
        self.exports.map().remove(volume);
        target.close().await;
        match self.registry.detach(volume, &self.name).await {
            Ok(()) | Err(RegistryError::NotAttached { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(%volume, edge = %self.name, "volume detached");
        Ok(Detached {
            volume: volume.to_string(),
            edge: self.name.clone(),
            nbd_clients_disconnected: nbd_clients,
            vhost_frontend_disconnected: vhost_connected,
        })
    }

    /// One attached volume as `vstor edge list` shows it.
    pub fn view(&self, volume: &str) -> Option<Attachment> {
        let target = self.exports.get(volume)?;
        Some(attachment(
            &target.stats(),
            &Frontends {
                socket: self.vhost.socket_path(volume).display().to_string(),
                nbd_uri: format!("nbd://{}/{volume}", self.nbd_addr),
                nbd_clients: self.nbd.connections(volume),
                vhost_connected: self.vhost.connected(volume),
                access: target.access(),
            },
        ))
    }

    pub fn list(&self) -> Vec<Attachment> {
        self.exports
            .list()
            .iter()
            .filter_map(|volume| self.view(volume))
            .collect()
    }

    /// Re-attach what the registry records for this edge (after a restart), retrying in the
    /// background those whose owner cannot be reached yet until they attach or are detached.
    pub async fn reattach(self: &Arc<Self>) -> Result<usize, RegistryError> {
        let mine: Vec<String> = self
            .registry
            .attachments()
            .await?
            .into_iter()
            .filter(|(_, list)| list.iter().any(|a| a.edge == self.name))
            .map(|(volume, _)| volume)
            .collect();
        let count = mine.len();
        for volume in mine {
            match self.attach(&volume).await {
                Ok(_) => tracing::info!(%volume, "re-attached from the registry"),
                Err(e) => {
                    tracing::warn!(%volume, error = e.message(), "cannot re-attach yet; retrying");
                    let host = self.clone();
                    tokio::spawn(async move { host.retry_attach(volume).await });
                }
            }
        }
        Ok(count)
    }

    async fn retry_attach(&self, volume: String) {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let still_mine = match self.registry.attachments().await {
                Ok(all) => all
                    .iter()
                    .any(|(v, list)| *v == volume && list.iter().any(|a| a.edge == self.name)),
                Err(_) => true,
            };
            if !still_mine || self.exports.get(&volume).is_some() {
                return;
            }
            match self.attach(&volume).await {
                Ok(_) => {
                    tracing::info!(%volume, "re-attached from the registry");
                    return;
                }
                Err(e) => tracing::debug!(%volume, error = e.message(), "re-attach failed"),
            }
        }
    }

    /// Stop serving the volumes the registry no longer lists for this edge (after its lease
    /// expired, another edge may have taken a writable one over: two hosts must not write it).
    pub async fn drop_lost_attachments(&self) -> Result<(), RegistryError> {
        let listed: BTreeSet<String> = self
            .registry
            .attachments()
            .await?
            .into_iter()
            .filter(|(_, list)| list.iter().any(|a| a.edge == self.name))
            .map(|(volume, _)| volume)
            .collect();
        for volume in self.exports.list() {
            if !listed.contains(&volume) {
                tracing::error!(%volume, edge = %self.name, "the registry no longer lists this attachment (taken over while the edge's lease was gone): detaching");
                if let Err(e) = self.detach(&volume, true).await {
                    tracing::error!(%volume, error = e.message(), "cannot detach");
                }
            }
        }
        Ok(())
    }

    /// Close every remote target (the daemon stops; the attachments stay in the registry).
    pub async fn close_all(&self) {
        for target in self.exports.all() {
            target.close().await;
        }
    }
}

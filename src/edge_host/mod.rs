//! `vstor edge`: the edge daemon on a hypervisor host (no volumes of its own) and its CLI verbs.
//!
//! It registers itself in the cluster registry under its own lease (`/vstor/edges/NAME`), runs
//! the NBD server and the vhost-user-blk backend over the volumes attached to it, each a
//! [`RemoteTarget`](vstor_edge::remote::client::RemoteTarget) talking the edge protocol to the
//! volume's owner (found by [`resolver`]), and answers `vstor edge attach|detach|list` on its
//! HTTP API ([`api`]). On start it re-attaches what the registry records for its name, so after
//! an edge restart QEMU (`reconnect=1`) finds its socket again.
//!
//! Security is `vstor serve`'s: NBD TLS, client certificates and connection limits
//! (`--tls-*`, `--nbd-tls`, `--nbd-max-connections[-per-client]`, the same NBD server code), a
//! bearer token on the API (`--api-token-file`, the same middleware), and mutual TLS to the
//! owners' edge servers (`--peer-tls-*`). Per-volume allow lists are *not* enforced here: they
//! live in the volume's config on its owner, and the edge protocol's `Welcome` does not carry
//! them (docs/security.md, known limits).
//!
//! Defaults (chosen not to clash with `vstor serve` on the same host: API 7800, NBD 10809):
//! API `127.0.0.1:7900`, NBD `127.0.0.1:10909`, sockets under `./vstor-edge/vhost`.

pub mod api;
pub mod cli;
pub mod host;
pub mod report;
pub mod resolver;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use vstor_edge::nbd::{NbdServer, NbdServerConfig};
use vstor_edge::remote::client::RemoteConfig;
use vstor_edge::vhost::{VhostConfig, VhostServer};

use crate::registry::{self, EdgeRecord, KeepAlive, Registry, RegistryError};
use host::{EdgeExports, EdgeHost};

pub const DEFAULT_EDGE_API: &str = "127.0.0.1:7900";
pub const DEFAULT_EDGE_NBD: &str = "127.0.0.1:10909";
pub const DEFAULT_EDGE_VHOST_DIR: &str = "./vstor-edge/vhost";

/// `vstor edge` daemon settings, resolved from its flags.
pub struct EdgeConfig {
    /// The cluster registry and how to reach it (`--registry`, `--etcd-*`).
    pub registry: registry::etcd::EtcdTarget,
    pub name: String,
    pub vhost_dir: PathBuf,
    pub nbd: SocketAddr,
    pub api: SocketAddr,
    pub reconnect_bound: Duration,
    /// This host's id (`crate::host_id`), to reach owners on it by their unix socket; `None`
    /// with `--transport tcp`.
    pub local_host: Option<String>,
    /// NBD TLS (`--tls-*`, `--nbd-tls`), checked and loaded.
    pub nbd_tls: Option<vstor_edge::nbd::NbdTls>,
    pub nbd_max_connections: usize,
    pub nbd_max_connections_per_client: usize,
    /// Mutual TLS to the owners' edge servers (`--peer-tls-*`).
    pub peer_tls: Option<vstor_net::PeerTls>,
    /// The bearer token the API requires (`--api-token-file`).
    pub api_token: Option<Arc<crate::api_auth::ApiTokens>>,
}

/// This machine's host name (the default edge name).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Register the edge; when the name is held by a previous run of this same edge (same host, same
/// API address, which this process could bind, so that run is dead) wait for its lease to expire.
/// A registry call that times out is tried again for a while, as in [`crate::cluster::Cluster::join`].
async fn register(
    registry: &dyn Registry,
    record: &EdgeRecord,
    ttl: Duration,
) -> Result<registry::Lease> {
    let deadline = Instant::now() + ttl * 2 + Duration::from_secs(2);
    // A registry that answered at connect but times out now is busy for a moment (as for a node).
    let patience = Instant::now() + crate::cluster::JOIN_PATIENCE;
    loop {
        match registry.register_edge(record, ttl).await {
            Ok(lease) => return Ok(lease),
            Err(RegistryError::EdgeAlive { host, api_addr, .. })
                if host == record.host
                    && api_addr == record.api_addr
                    && Instant::now() < deadline =>
            {
                tracing::info!(edge = %record.name, "the previous run's lease is still alive; waiting for it to expire");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) if crate::cluster::may_retry_join(&e, patience) => {
                tracing::warn!(edge = %record.name, error = %e, "registering the edge failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("cannot register the edge"),
        }
    }
}

pub async fn run(config: EdgeConfig) -> Result<()> {
    crate::config::validate_edge_name(&config.name)?;
    let vhost_dir = std::path::absolute(&config.vhost_dir)
        .with_context(|| format!("cannot resolve path {}", config.vhost_dir.display()))?;
    vstor_edge::vhost::check_socket_dir(&vhost_dir)
        .map_err(|e| anyhow::anyhow!("--vhost-dir: {e}; choose a shorter one"))?;
    // Renewed certificates are picked up on SIGHUP and when their files change.
    let credential_reloads = crate::credentials::spawn(crate::credentials::of(
        config.peer_tls.clone(),
        config.nbd_tls.clone(),
        None,
        config.api_token.clone(),
    ))?;
    let registry: Arc<dyn Registry> = Arc::new(config.registry.connect().await.context(
        "cannot reach the cluster registry; is etcd running, and are --registry and \
             --etcd-* right?",
    )?);
    let settings = registry.settings().await?;
    let api_listener = TcpListener::bind(config.api)
        .await
        .with_context(|| format!("cannot listen for the edge API on {} (--api)", config.api))?;
    let nbd_listener = TcpListener::bind(config.nbd)
        .await
        .with_context(|| format!("cannot listen for NBD on {} (--nbd)", config.nbd))?;
    let api_addr = api_listener.local_addr()?;
    let nbd_addr = nbd_listener.local_addr()?;
    let record = EdgeRecord {
        name: config.name.clone(),
        api_addr: api_addr.to_string(),
        host: host_name(),
        nbd_addr: nbd_addr.to_string(),
        started_at: registry::now_secs(),
    };
    let lease = register(registry.as_ref(), &record, settings.lease_ttl()).await?;

    let exports = Arc::new(EdgeExports::default());
    crate::api_auth::warn_exposed(
        api_addr,
        false,
        config.api_token.is_some(),
        nbd_addr,
        config.nbd_tls.as_ref(),
    );
    let nbd = NbdServer::with_tls(
        exports.clone(),
        NbdServerConfig {
            max_connections: config.nbd_max_connections,
            max_connections_per_client: config.nbd_max_connections_per_client,
            ..NbdServerConfig::default()
        },
        config.nbd_tls.clone(),
    );
    let vhost = VhostServer::new(
        exports.clone(),
        vhost_dir.clone(),
        VhostConfig {
            // No polling on an edge: its queue workers hand requests to the network. A QD1
            // guest behind it comes back only after the owner's round trip, beyond any window,
            // and at QD32 a spinning worker takes CPU from the threads that talk to the owner.
            // Measured with a fixed 30 µs window on two vCPUs (`vstor-bench edge`): no gain
            // (QD32 reads 155-158 k IOPS with it, 158-178 k without; QD1 read p50 78 µs against
            // 73), while the owner's own export gained a lot from the same change. Nor did
            // polling from the moment a reply's completion was published (a wake in the
            // worker's epoll set): no QD1 gain, QD32 reads on shared CPUs 7-20 % lower
            // (`benches/README.md`, 2026-12-07 evening).
            poll_max: Duration::ZERO,
            ..VhostConfig::default()
        },
        tokio::runtime::Handle::current(),
    )
    .with_context(|| format!("cannot use vhost socket directory {}", vhost_dir.display()))?;
    let remote = RemoteConfig {
        client_name: config.name.clone(),
        reconnect_bound: config.reconnect_bound,
        tls: config.peer_tls.clone(),
        ..RemoteConfig::default()
    };
    let host = Arc::new(EdgeHost::new(
        config.name.clone(),
        registry.clone(),
        Arc::new(resolver::RegistryResolver {
            registry: registry.clone(),
            local_host: config.local_host.clone(),
        }),
        remote,
        exports,
        nbd.clone(),
        nbd_addr,
        vhost.clone(),
        credential_reloads,
    ));
    let keepalive = tokio::spawn(keep_registered(
        host.clone(),
        record.clone(),
        lease,
        settings.keepalive_interval(),
    ));
    let nbd_task = {
        let nbd = nbd.clone();
        tokio::spawn(async move { nbd.serve(nbd_listener).await })
    };
    let api_stop = Arc::new(tokio::sync::Notify::new());
    let api_task = {
        let token = crate::api_auth::RequiredToken(config.api_token.clone());
        // Outermost: a request is checked before it is routed.
        let app = api::router(host.clone()).layer(axum::middleware::from_fn_with_state(
            token,
            crate::api_auth::require_token,
        ));
        let stop = api_stop.clone();
        tokio::spawn(async move {
            axum::serve(api_listener, app)
                .with_graceful_shutdown(async move { stop.notified().await })
                .await
        })
    };
    let reattached = host.reattach().await?;
    crate::server::announce(&format!(
        "vstor edge ready: name={} api=http://{api_addr} nbd={}://{nbd_addr} vhost={} reattached={reattached}",
        config.name,
        if config.nbd_tls.is_some() { "nbds" } else { "nbd" },
        vhost_dir.display()
    ));
    tracing::info!(edge = %config.name, registry = %registry.describe(), "vstor edge serving");

    crate::server::until_stop_signal(nbd_task, "edge NBD server").await?;
    nbd.shutdown().await;
    api_stop.notify_one();
    let _ = api_task.await;
    tokio::task::spawn_blocking(move || vhost.shutdown()).await?;
    host.close_all().await;
    keepalive.abort();
    // The attachments stay: the next start re-attaches them.
    let _ = registry.revoke(lease.id).await;
    Ok(())
}

/// Renew the edge's lease; register again with a new one if it expired (the registry was
/// unreachable for longer than the TTL).
async fn keep_registered(
    host: Arc<EdgeHost>,
    record: EdgeRecord,
    mut lease: registry::Lease,
    interval: Duration,
) {
    let registry = host.registry.clone();
    loop {
        tokio::time::sleep(interval).await;
        match registry.keep_alive(lease.id).await {
            Ok(KeepAlive::Renewed { .. }) => {}
            Ok(KeepAlive::Expired) => {
                tracing::error!(edge = %record.name, "edge lease expired; registering again");
                match registry.register_edge(&record, lease.ttl).await {
                    Ok(new) => {
                        lease = new;
                        if let Err(e) = host.drop_lost_attachments().await {
                            tracing::error!(error = %e, "cannot check the edge's attachments");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot register the edge again"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew the edge lease"),
        }
    }
}

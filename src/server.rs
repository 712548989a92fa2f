//! `vstor serve`: one node of the embedded single-node default — local-directory backend, the
//! volume engine, the NBD server and the management API — until SIGTERM or SIGINT, then a clean
//! stop: refuse new I/O, answer what is in flight, flush, upload, exit 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::task::AbortOnDropHandle;
use vstor_backend::ec::store::{EcOptions, EcStore, TierMap};
use vstor_backend::{LocalStore, ObjectStore, S3Options, S3Store};
use vstor_edge::nbd::{NbdServer, NbdServerConfig};
use vstor_edge::vhost::{VhostConfig, VhostServer};
use vstor_volumedriver::{DtlMode, ManagerConfig, VolumeManager, VolumeOptions};

use crate::api::{router, ApiState};
use crate::cluster::failover::Failover;
use crate::cluster::Cluster;

/// Bound on every call to an OSD: a dead OSD fails the call in this time, and the request is
/// served from the other fragments.
pub(crate) const EC_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the planned adopter of a dead node's volume has before any survivor may take it.
const FAILOVER_GRACE: Duration = Duration::from_secs(3);
use crate::config::{BackendSpec, ServeConfig};
use crate::dirlock::DirLock;
use crate::export::Exports;
use crate::export_remote::RemoteVolumes;
use crate::registry::{self, etcd::EtcdTarget, local::LocalRegistry, NodeRecord, Registry};
use crate::scrub::{AutoScrubber, Scrubs};
use crate::tier::map::RegistryTierMap;
use crate::tier::records::default_preset;
use vstor_edge::remote::server::{EdgeListener, EdgeServerConfig};

pub async fn serve(mut config: ServeConfig) -> Result<()> {
    // Absolute paths: they are shown to users (socket paths) and must not depend on a later cwd.
    let backend_dir = match &mut config.backend {
        BackendSpec::Dir(dir) => Some(dir),
        BackendSpec::S3(_) | BackendSpec::Ec { .. } => None,
    };
    for path in [&mut config.data_dir, &mut config.vhost_dir]
        .into_iter()
        .chain(backend_dir)
    {
        *path = std::path::absolute(&*path)
            .with_context(|| format!("cannot resolve path {}", path.display()))?;
    }
    // Settings that depend on the absolute paths, checked before anything is touched.
    vstor_edge::vhost::check_socket_dir(&config.vhost_dir).map_err(|e| {
        anyhow::anyhow!("setting vhost_dir (--vhost-dir): {e}; choose a shorter one")
    })?;
    // The API's certificate and key are checked before anything is touched.
    let api_tls = config
        .api_security
        .tls
        .as_ref()
        .map(|(cert, key)| crate::api_tls::ApiTls::load(cert, key))
        .transpose()?;
    // Renewed certificates and token files are picked up on SIGHUP and when they change.
    let api_ca = config
        .api_security
        .ca_file
        .as_deref()
        .map(|path| crate::api_auth::ApiCa::load(path, "setting api.ca_file (--api-ca)"))
        .transpose()?;
    let mut credentials = crate::credentials::of(
        config.peer_tls.clone(),
        config.nbd_tls.clone(),
        api_tls.clone(),
        config.api_security.token.clone(),
    );
    credentials.extend(api_ca.clone().map(crate::credentials::Credentials::ApiCa));
    let credential_reloads = crate::credentials::spawn(credentials)?;
    // Calls to other nodes' APIs (forwarding, moves, fencing probes) carry this node's token: the
    // nodes of a cluster share one token file, and one TLS setting.
    crate::api_auth::set_outgoing(crate::api_auth::Outgoing {
        token: config
            .api_security
            .token
            .clone()
            .map(crate::api_auth::OutgoingToken::Node),
        token_source: Some("setting api.token_file (--api-token-file)".into()),
        ca: api_ca,
        https: api_tls.is_some(),
    });
    // Before anything in the directory is read or written: a second node must not touch it.
    let _lock = DirLock::acquire(&config.data_dir, "vstor serve")?;
    // The registry first: a cluster node that cannot reach etcd, or whose name a live node
    // holds, stops here, before its volumes are touched.
    let registry: Arc<dyn Registry> = match &config.identity.cluster {
        Some(cluster) => Arc::new(cluster.registry.connect().await.context(
            "cannot reach the cluster registry; is etcd running, and are --registry and \
                 --etcd-* right?",
        )?),
        None => Arc::new(LocalRegistry::open(
            &config.data_dir.join(registry::local::FILE_NAME),
        )?),
    };
    let nbd_listener = TcpListener::bind(config.nbd)
        .await
        .with_context(|| format!("cannot listen for NBD on {}", config.nbd))?;
    let api_listener = TcpListener::bind(config.api)
        .await
        .with_context(|| format!("cannot listen for the API on {}", config.api))?;
    let edge_listener = match config.edge_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen for edges on {addr} (--edge-listen / edge_listen)")
        })?),
        None => None,
    };
    let nbd_addr = nbd_listener.local_addr()?;
    let api_addr = api_listener.local_addr()?;
    crate::api_auth::warn_exposed(
        api_addr,
        api_tls.is_some(),
        config.api_security.token.is_some(),
        nbd_addr,
        config.nbd_tls.as_ref(),
    );
    let edge_addr = edge_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let edge_socket = match &config.edge_socket {
        Some(path) => Some(bind_edge_socket(path)?),
        None => None,
    };
    // Every cluster node runs a DTL server for the other nodes' volumes.
    let dtl = match &config.identity.cluster {
        Some(cluster) => Some(
            start_node_dtl(
                &config.data_dir,
                cluster
                    .dtl_listen
                    .unwrap_or_else(|| std::net::SocketAddr::new(api_addr.ip(), 0)),
                config.peer_tls.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let node = NodeRecord {
        name: config.identity.name.clone(),
        domain: config.identity.domain.clone(),
        recovery_domain: config
            .identity
            .cluster
            .as_ref()
            .and_then(|c| c.recovery_domain.clone()),
        api_addr: api_addr.to_string(),
        nbd_addr: nbd_addr.to_string(),
        dtl_addr: dtl
            .as_ref()
            .map_or_else(String::new, |(_, addr, _)| addr.to_string()),
        edge_addr: edge_addr.map(|addr| addr.to_string()),
        edge_socket: edge_socket
            .as_ref()
            .map(|(_, path)| path.display().to_string()),
        host_id: Some(crate::host_id::host_id()),
        started_at: registry::now_secs(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let cluster = if registry.is_cluster() {
        Some(Cluster::join(registry.clone(), node.clone()).await?)
    } else {
        registry
            .register_node(&node, std::time::Duration::from_secs(5))
            .await
            .context("cannot register the node in the local registry")?;
        None
    };
    let keepalive = cluster.as_ref().map(Cluster::start);
    let spec = config.backend.clone();
    let (tier_endpoints, node_name) = (
        config.identity.cluster.as_ref().map(|c| c.registry.clone()),
        config.identity.name.clone(),
    );
    let osd_tls = config.peer_tls.clone();
    let s3_retry_timeout = config.s3_retry_timeout;
    let (backend, tier) = tokio::task::spawn_blocking(move || {
        open_backend(
            &spec,
            tier_endpoints,
            &node_name,
            osd_tls,
            Some(s3_retry_timeout),
        )
    })
    .await??;
    // Every backend call is timed for `/metrics` (the wrapper only measures).
    let (backend, backend_timing) = crate::backend_timing::TimedStore::wrap(backend);
    // The MDS link exists before the volumes restart: each restart asks it for a seed.
    let mds = config.mds.clone().map(|settings| {
        crate::mds_link::MdsLink::new(
            settings,
            tokio::runtime::Handle::current(),
            backend.clone(),
            registry.clone(),
            node.clone(),
            config.peer_tls.clone(),
        )
    });
    let _mds_checks = mds
        .as_ref()
        .map(|link| AbortOnDropHandle::new(link.start()));
    let manager_config = ManagerConfig {
        runtime: Some(tokio::runtime::Handle::current()),
        mds: mds.clone().map(|link| {
            vstor_volumedriver::MdsHookRef(link as Arc<dyn vstor_volumedriver::MdsHook>)
        }),
        upload_concurrency: config.upload_concurrency,
        max_open_age: config.max_open_age,
        dtl_tls: config.peer_tls.clone(),
        read_cache_bytes: config.read_cache,
        ..ManagerConfig::under(&config.data_dir, config.write_buffer_limit)
    };
    let manager = tokio::task::spawn_blocking(move || VolumeManager::open(manager_config, backend))
        .await?
        .context("cannot start the volume manager")?;

    // Before any export serves a volume: the gate applies the node's health (and the volumes'
    // records) before it returns, then follows it.
    let gate = match &cluster {
        Some(cluster) => Some(cluster.gate(manager.clone()).await),
        None => None,
    };
    // The EC tier's background repair of this node's volumes (aborted with the runtime).
    let tier_repair = Arc::new(crate::tier::maintenance::RepairStatus::default());
    let _tier_maintenance = tier.as_ref().map(|store| {
        crate::tier::maintenance::start(
            store.clone(),
            store.tier_map(),
            manager.clone(),
            tier_repair.clone(),
        )
    });
    if cluster.is_some() && config.default_volume.is_some() {
        tracing::info!("cluster node: no default volume is created (create volumes with `vstor volume create`)");
    }
    if let (Some((name, size)), None) = (&config.default_volume, &cluster) {
        if manager.names().is_empty() && manager.failed().is_empty() {
            let options = VolumeOptions {
                size: *size,
                sco_size: config.sco_size,
                write_buffer: config.write_buffer,
                dtl_mode: config.dtl.as_ref().map_or(DtlMode::None, |(mode, _)| *mode),
                dtl_addr: config.dtl.as_ref().map(|(_, addr)| addr.clone()),
                access: Default::default(),
                encryption_key_file: None,
                incarnation_floor: 0,
            };
            match manager.create(name, &options) {
                Ok(_) => {}
                // A second node on a shared backend: the default volume is another node's.
                Err(vstor_volumedriver::VolumeError::Exists { .. }) => tracing::warn!(
                    volume = %name,
                    "default volume {name} already exists on the backend (another node's?): not created; start with --no-default-volume to stop trying"
                ),
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                    "cannot create the default volume {name} (or start with --no-default-volume)"
                )))
                }
            }
        }
    }

    let exports = Arc::new(Exports::new(manager.clone()));
    if let Some(tls) = &config.nbd_tls {
        tracing::info!(mode = ?tls.mode(), client_certificates = tls.client_auth(), "NBD TLS enabled");
    }
    let nbd = NbdServer::with_tls(
        exports.clone(),
        NbdServerConfig {
            max_payload: config.nbd_max_payload,
            max_inflight_per_conn: config.nbd_max_inflight,
            handshake_timeout: config.nbd_handshake_timeout,
            max_connections: config.nbd_max_connections,
            max_connections_per_client: config.nbd_max_connections_per_client,
            max_inflight_bytes_per_conn: config.nbd_max_inflight_bytes,
        },
        config.nbd_tls.clone(),
    );
    let vhost = VhostServer::new(
        exports.clone(),
        config.vhost_dir.clone(),
        VhostConfig {
            num_queues: config.vhost_queues,
            queue_size: config.vhost_queue_size,
            poll_max: config.vhost_poll_max,
        },
        tokio::runtime::Handle::current(),
    )
    .with_context(|| {
        format!(
            "cannot use vhost socket directory {}",
            config.vhost_dir.display()
        )
    })?;
    vhost.set_socket_permissions(config.vhost_socket);
    for name in manager.names() {
        vhost
            .add_export(&name)
            .with_context(|| format!("cannot export volume {name} over vhost-user"))?;
    }

    let scrubs = Arc::new(Scrubs::default());
    let auto_scrub = config
        .auto_scrub
        .map(|settings| AutoScrubber::start(manager.clone(), scrubs.clone(), settings));

    // Snapshots exported over vhost-user before the restart are exported again.
    let vhost_snapshots_file = config.data_dir.join("vhost-snapshot-exports.json");
    let mut vhost_snapshots = crate::api::load_vhost_snapshots(&vhost_snapshots_file);
    vhost_snapshots.retain(|export| {
        let exists = export.split_once('@').is_some_and(|(volume, snapshot)| {
            manager
                .get(volume)
                .is_ok_and(|v| v.snapshot(snapshot).is_ok())
        });
        exists
            && vhost
                .add_export(export)
                .map_err(|e| tracing::error!(%export, error = %e, "cannot export the snapshot over vhost-user"))
                .is_ok()
    });
    // Failover and moves: every cluster node watches the others' leases.
    let failover = cluster.as_ref().map(|cluster| {
        let served_vhost = vhost.clone();
        let dropped_vhost = vhost.clone();
        let dropped_nbd = nbd.clone();
        let dropped_exports = exports.clone();
        Failover::new(
            cluster.registry.clone(),
            cluster.node.clone(),
            cluster.lease_watch(),
            manager.clone(),
            FAILOVER_GRACE,
            Arc::new(move |name: &str| {
                if let Err(e) = served_vhost.add_export(name) {
                    tracing::error!(volume = %name, error = %e, "cannot export the volume over vhost-user");
                }
            }),
            Arc::new(move |name: &str| {
                dropped_vhost.remove_export(name);
                dropped_nbd.disconnect_export(name);
                dropped_exports.forget(name, None);
            }),
        )
    });
    let failover_task = failover.as_ref().map(Failover::start);
    // DTL namespaces of volumes deleted (or whose DTL moved) while this node was away.
    let dtl_sweep = Arc::new(crate::cluster::dtl_sweep::SweepStatus::default());
    let _dtl_sweep_task = cluster
        .as_ref()
        .zip(dtl.as_ref())
        .map(|(cluster, (server, ..))| {
            crate::cluster::dtl_sweep::start(
                server.store().clone(),
                cluster.registry.clone(),
                cluster.node.name.clone(),
                dtl_sweep.clone(),
            )
        });
    let nbd_task = {
        let nbd = nbd.clone();
        tokio::spawn(async move { nbd.serve(nbd_listener).await })
    };
    // The edge server: the same exports as NBD and vhost-user, for `vstor edge` processes.
    let edge_stop = tokio_util::sync::CancellationToken::new();
    let edge_listeners = edge_listener
        .map(EdgeListener::from)
        .into_iter()
        .chain(edge_socket.map(|(listener, _)| EdgeListener::from(listener)));
    let edge_tasks: Vec<_> = edge_listeners
        .map(|listener| {
            let exports: Arc<dyn vstor_edge::remote::RemoteExports> = Arc::new(RemoteVolumes {
                exports: exports.clone(),
                opening: failover.as_ref().map(|f| f.log.opening()),
            });
            let stop = edge_stop.clone();
            let edge_config = EdgeServerConfig {
                frame_timeout: config.edge_frame_timeout,
                tls: config.peer_tls.clone(),
                ..EdgeServerConfig::default()
            };
            tokio::spawn(async move {
                if let Err(e) =
                    vstor_edge::remote::server::serve(listener, exports, edge_config, stop).await
                {
                    tracing::error!(error = %e, "edge server stopped");
                }
            })
        })
        .collect();
    let api_stop = Arc::new(tokio::sync::Notify::new());
    let api_token = crate::api_auth::RequiredToken(config.api_security.token.clone());
    let api_task = {
        let app = router(ApiState {
            manager: manager.clone(),
            nbd: nbd.clone(),
            nbd_addr,
            vhost: vhost.clone(),
            default_sco_size: config.sco_size,
            default_write_buffer: config.write_buffer,
            default_dtl: config.dtl.clone(),
            exports,
            scrubs,
            vhost_snapshots: Arc::new(std::sync::Mutex::new(vhost_snapshots)),
            vhost_snapshots_file,
            node: node.clone(),
            registry: registry.clone(),
            cluster: cluster.clone(),
            failover: failover.clone(),
            tier: tier.clone(),
            mds: mds.clone(),
            backend_timing: backend_timing.clone(),
            tier_repair: tier.as_ref().map(|_| tier_repair.clone()),
            dtl_sweep: cluster.as_ref().map(|_| dtl_sweep.clone()),
            credential_reloads,
        })
        // Outermost: a request is checked before it is routed or forwarded to another node.
        .layer(axum::middleware::from_fn_with_state(
            api_token,
            crate::api_auth::require_token,
        ));
        let stop = api_stop.clone();
        let shutdown = async move { stop.notified().await };
        match api_tls {
            Some(tls) => {
                let listener = crate::api_tls::TlsListener::new(api_listener, tls)?;
                tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown)
                        .await
                })
            }
            None => tokio::spawn(async move {
                axum::serve(api_listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }),
        }
    };

    let scheme = if config.api_security.tls.is_some() {
        "https"
    } else {
        "http"
    };
    announce(&format!(
        "vstor ready: api={scheme}://{api_addr} nbd=nbd://{nbd_addr}"
    ));
    if let Some(addr) = edge_addr {
        announce(&format!("vstor edge listener: {addr}"));
    }
    if let Some(path) = &node.edge_socket {
        announce(&format!("vstor edge socket: {path}"));
    }
    if let Some(cluster) = &cluster {
        announce(&format!(
            "vstor node: {} domain={} dtl={} registry={}",
            node.name,
            node.domain,
            node.dtl_addr,
            cluster.registry.describe()
        ));
    }
    tracing::info!(dir = %config.vhost_dir.display(), "vhost-user-blk sockets");
    tracing::info!(api = %api_addr, nbd = %nbd_addr, data_dir = %config.data_dir.display(), "vstor serving");

    until_stop_signal(nbd_task, "NBD server").await?;

    if let Some(auto_scrub) = auto_scrub {
        auto_scrub.stop();
    }
    nbd.shutdown().await;
    api_stop.notify_one();
    let _ = api_task.await;
    tokio::task::spawn_blocking(move || vhost.shutdown()).await?;
    // The edge server runs on while the volumes are flushed and uploaded: edges' requests wait
    // (the volumes refuse writes meanwhile), and once a volume's data is all on the backend
    // they are refused with `Released`, so an edge knows that nothing it acknowledged is lost
    // and resends to the next owner without failing anything (`edge::remote::resubmit`).
    let timeout = Duration::from_secs(config.shutdown_upload_timeout_secs);
    let unfinished = tokio::task::spawn_blocking(move || manager.shutdown(timeout)).await?;
    edge_stop.cancel();
    for task in edge_tasks {
        let _ = task.await;
    }
    if let Some(path) = &config.edge_socket {
        // Edges that find no socket use TCP at once; a leftover file would only cost them a
        // refused connect.
        let _ = std::fs::remove_file(path);
    }
    if let Some(task) = failover_task {
        task.abort();
    }
    if let Some(gate) = gate {
        gate.abort();
    }
    if let Some(keepalive) = keepalive {
        keepalive.abort();
    }
    if let Some(cluster) = &cluster {
        cluster.leave().await;
    }
    if let Some((server, _, task)) = dtl {
        server.shutdown().await;
        task.abort();
    }
    if unfinished.is_empty() {
        tracing::info!("all volumes flushed and uploaded; bye");
    } else {
        tracing::warn!(
            volumes = ?unfinished,
            "uploads did not finish in time; the data is safe in the write buffer and will be uploaded at the next start"
        );
    }
    Ok(())
}

type NodeDtl = (
    Arc<vstor_dtl::DtlServer>,
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::result::Result<(), vstor_dtl::DtlError>>,
);

/// A cluster node's own DTL server (data under `<data-dir>/dtl`), serving until shut down.
async fn start_node_dtl(
    data_dir: &std::path::Path,
    listen: std::net::SocketAddr,
    tls: Option<vstor_net::PeerTls>,
) -> Result<NodeDtl> {
    let dir = data_dir.join("dtl");
    let config = vstor_dtl::DtlServerConfig {
        tls,
        ..vstor_dtl::DtlServerConfig::default()
    };
    let server = Arc::new(
        vstor_dtl::DtlServer::new(&dir, config)
            .with_context(|| format!("cannot open the DTL data directory {}", dir.display()))?,
    );
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for the DTL on {listen} (--dtl-listen)"))?;
    let addr = listener.local_addr()?;
    let task = {
        let server = server.clone();
        tokio::spawn(async move { server.serve(listener).await })
    };
    Ok((server, addr, task))
}

/// `vstor dtl`: a DTL server until SIGTERM or SIGINT.
pub async fn serve_dtl(
    listen: std::net::SocketAddr,
    data_dir: std::path::PathBuf,
    config: vstor_dtl::DtlServerConfig,
    metrics: &crate::daemon_metrics::MetricsArgs,
) -> Result<()> {
    let _lock = DirLock::acquire(&data_dir, "vstor dtl")?;
    let tls = config.tls.clone();
    let server = Arc::new(
        vstor_dtl::DtlServer::new(&data_dir, config).with_context(|| {
            format!("cannot open the DTL data directory {}", data_dir.display())
        })?,
    );
    crate::daemon_metrics::start("dtl", tls, metrics).await?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for the DTL on {listen}"))?;
    let addr = listener.local_addr()?;
    let task = {
        let server = server.clone();
        tokio::spawn(async move { server.serve(listener).await })
    };
    announce(&format!("vstor dtl ready: {addr}"));
    until_stop_signal(task, "DTL server").await?;
    server.shutdown().await;
    Ok(())
}

/// Wait for SIGTERM or SIGINT. The server task ending first (with an error or not) is an error:
/// a daemon that silently stopped serving must not look like a clean stop.
pub(crate) async fn until_stop_signal<E>(
    task: tokio::task::JoinHandle<std::result::Result<(), E>>,
    what: &str,
) -> Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let mut terminate =
        signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
        _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
        result = task => {
            result??;
            anyhow::bail!("{what} stopped unexpectedly");
        }
    }
    Ok(())
}

/// SIGTERM or SIGINT, for daemons that select on more than one task. A handler that cannot be
/// installed is logged and that signal left at its default action (which also stops the
/// process).
pub(crate) async fn stop_signal() {
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    match (terminate, interrupt) {
        (Ok(mut terminate), Ok(mut interrupt)) => tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
            _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
        },
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("cannot install a stop signal handler: {e}");
            std::future::pending::<()>().await;
        }
    }
}

/// The node's object store, and the same store as the `ec` store when it is one.
type OpenedBackend = (Arc<dyn ObjectStore>, Option<Arc<EcStore>>);

/// Open the configured backend; a bad bucket or bad credentials fail here, at startup. The
/// `ec` store is also returned as itself: volume creation picks presets through it.
/// `s3_retry_timeout` bounds each S3 request's retries (`None`: [`S3Options::default`]'s).
pub(crate) fn open_backend(
    spec: &BackendSpec,
    registry: Option<EtcdTarget>,
    node: &str,
    tls: Option<vstor_net::PeerTls>,
    s3_retry_timeout: Option<Duration>,
) -> Result<OpenedBackend> {
    let store: Arc<dyn ObjectStore> = match spec {
        BackendSpec::Ec { preset } => {
            let store = open_ec(preset.as_deref(), registry, node, tls)?;
            return Ok((store.clone(), Some(store)));
        }
        BackendSpec::Dir(dir) => Arc::new(
            LocalStore::open(dir)
                .with_context(|| format!("cannot open backend directory {}", dir.display()))?,
        ),
        BackendSpec::S3(location) => {
            let options = S3Options {
                // The objects the volume layer overwrites in place: a claim re-stamps them so a
                // fenced node can no longer replace them (backend/src/s3.rs explains).
                restamp_on_claim: vec![
                    vstor_volumedriver::config::CONFIG_OBJECT.to_string(),
                    vstor_volumedriver::config::TLOG_LIST_OBJECT.to_string(),
                ],
                retry_timeout: s3_retry_timeout.unwrap_or(S3Options::default().retry_timeout),
                ..S3Options::default()
            };
            Arc::new(
                S3Store::open(location.clone(), options)
                    .with_context(|| format!("cannot open S3 backend {location}"))?,
            )
        }
    };
    Ok((store, None))
}

/// The `ec` store over the cluster's OSDs, its map in the registry at `registry`; `preset`
/// names the default preset of new namespaces (`None`: `default`, created when missing).
/// With `tls`, every OSD connection is mutual TLS.
fn open_ec(
    preset: Option<&str>,
    registry: Option<EtcdTarget>,
    node: &str,
    tls: Option<vstor_net::PeerTls>,
) -> Result<Arc<EcStore>> {
    let target = registry
        .context("the ec backend needs the cluster registry (--registry etcd://HOST:PORT)")?;
    let map = RegistryTierMap::open(move || async move {
        let registry: Arc<dyn Registry> = Arc::new(target.connect().await?);
        Ok(registry)
    })
    .context("cannot open the EC tier's map in the registry")?;
    let default_preset = match preset {
        Some(name) => {
            if map.preset(name)?.is_none() {
                anyhow::bail!(
                    "--backend ec:{name}: there is no preset {name}; create it with \
                     `vstor preset create {name} --k K --m M`"
                );
            }
            name.to_string()
        }
        None => {
            map.ensure_preset(&default_preset("default"))
                .context("cannot create the tier's default preset")?;
            "default".to_string()
        }
    };
    Ok(Arc::new(
        EcStore::new(
            Arc::new(map),
            EcOptions {
                default_preset,
                timeout: EC_CALL_TIMEOUT,
                client: node.to_string(),
                tls,
            },
        )
        .context("cannot start the EC store")?,
    ))
}

/// Print a startup line on stdout for whoever started the daemon (scripts and tests wait for
/// them). A reader that went away is not the daemon's problem: `println!` would panic on the
/// broken pipe and take the node down with it, so errors are ignored (the same facts are
/// logged).
pub(crate) fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Bind the edge protocol's unix socket at `path` (`--edge-socket`), mode 0600. A socket file
/// left by a node that died (nobody accepts on it) is replaced; a live one (another node given
/// the same path) or any other file there is an error, not overwritten. Returns the listener
/// and the absolute path other processes should dial.
fn bind_edge_socket(
    path: &std::path::Path,
) -> Result<(tokio::net::UnixListener, std::path::PathBuf)> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let what = || format!("cannot serve edges on unix socket {}", path.display());
    let path = std::path::absolute(path).with_context(what)?;
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(anyhow::anyhow!(
                    "another process is serving on {} (--edge-socket / edge_socket)",
                    path.display()
                ))
                .with_context(what);
            }
            std::fs::remove_file(&path).with_context(what)?;
        }
        Ok(_) => {
            return Err(anyhow::anyhow!(
                "{} exists and is not a socket (--edge-socket / edge_socket)",
                path.display()
            ))
            .with_context(what)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(what),
    }
    let listener = tokio::net::UnixListener::bind(&path).with_context(what)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).with_context(what)?;
    Ok((listener, path))
}

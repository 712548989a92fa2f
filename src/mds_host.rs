//! `vstor mds [FLAGS] [list | rebuild VOLUME]`: without a verb, run an MDS daemon (per-volume
//! map tables in `<data-dir>/mds.redb`, served over the MDS protocol, slave tables caught up
//! from the backend on a timer); with a verb, ask running MDSes.
//!
//! The daemon takes the data directory's lock first (see `dirlock`), like every daemon. Slaves
//! can only catch up when the MDS can read the volumes' backend (`--backend`, the same value
//! the nodes use).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;
use vstor_mds::client::MdsClient;
use vstor_mds::proto::ErrorCode;
use vstor_mds::server::{serve, MdsServerConfig};
use vstor_mds::{MdsError, MdsStore, Role};

use crate::config::BackendSpec;
use crate::dirlock::DirLock;
use crate::mds_link::registration;
use crate::registry::Registry;
use crate::server::{announce, open_backend, until_stop_signal};

/// Every call to an MDS from the CLI waits at most this long.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct MdsArgs {
    /// Listen address (daemon).
    #[arg(long, default_value = "127.0.0.1:10820")]
    listen: String,
    /// Where the tables are kept (daemon).
    #[arg(long, default_value = "./vstor-mds")]
    data_dir: PathBuf,
    /// Backend the volumes' TLogs are read from for catch-up, as the nodes name it: a directory,
    /// s3://BUCKET[/PREFIX], or `ec` (the cluster's erasure-coded tier; needs `--registry`)
    /// [default: none, slaves do not catch up].
    #[arg(long)]
    backend: Option<PathBuf>,
    /// Cluster registry (etcd://HOST:PORT[,...] or etcd+https://HOST:PORT[,...]): the MDS
    /// registers there (under a lease), and cluster nodes started without `--mds` place
    /// volumes' tables on the registered MDSes.
    #[arg(long, env = "VSTOR_REGISTRY")]
    registry: Option<String>,
    /// TLS and credentials to etcd (the daemon's `--registry` and `list --registry`).
    #[command(flatten)]
    etcd: crate::security_args::EtcdArgs,
    /// The node this MDS runs beside: volumes that node owns get their master table here.
    #[arg(long)]
    node: Option<String>,
    /// Failure domain of this MDS (a volume's slave goes to its owner's recovery domain).
    #[arg(long, default_value = "default")]
    domain: String,
    /// Name this MDS reports to clients [default: the listen address].
    #[arg(long)]
    name: Option<String>,
    /// How often slave tables catch up with the backend ("0s": only on demand).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    catch_up_every: Duration,
    /// Close a connection whose frame is still incomplete this long after its first bytes
    /// arrived (slowloris clients); idle connections between frames are kept (daemon).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    frame_timeout: Duration,
    /// Mutual TLS: the daemon serves only clients with a certificate of the cluster CA; the
    /// verbs connect with it.
    #[command(flatten)]
    peer_tls: crate::security_args::PeerTlsArgs,
    /// Prometheus metrics of the daemon.
    #[command(flatten)]
    metrics: crate::daemon_metrics::MetricsArgs,
    #[command(subcommand)]
    verb: Option<MdsVerb>,
}

#[derive(Subcommand)]
enum MdsVerb {
    /// Each MDS's tables: volume, role, cork, owner tag, entries, TLogs behind the backend.
    List {
        /// MDS addresses, comma-separated.
        #[arg(long, value_delimiter = ',', required_unless_present = "registry")]
        mds: Vec<String>,
        /// List the MDSes registered in this cluster registry (etcd://HOST:PORT) instead.
        #[arg(long, env = "VSTOR_REGISTRY")]
        registry: Option<String>,
    },
    /// Rebuild a volume's table on an MDS from the backend (a new table is a slave).
    Rebuild {
        volume: String,
        /// The MDS holding (or to hold) the table.
        #[arg(long)]
        mds: String,
        /// Backend namespace of the volume [default: the volume name].
        #[arg(long)]
        namespace: Option<String>,
    },
}

pub fn run(args: MdsArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let tls = args.peer_tls.load()?;
    match args.verb {
        None => {
            crate::init_logging();
            let mut server = MdsServerConfig::new("", None);
            server.catch_up_every = (!args.catch_up_every.is_zero()).then_some(args.catch_up_every);
            server.frame_timeout = args.frame_timeout;
            server.tls = tls;
            runtime.block_on(daemon(
                args.listen,
                args.data_dir,
                args.backend,
                Placement {
                    registry: args.registry,
                    etcd: args.etcd,
                    name: args.name,
                    node: args.node,
                    domain: args.domain,
                },
                server,
                &args.metrics,
            ))
        }
        Some(MdsVerb::List { mds, registry }) => runtime.block_on(async move {
            let mds = match (mds.is_empty(), registry) {
                (true, Some(spec)) => {
                    let registry = connect(&spec, &args.etcd).await?;
                    let live = registration::servers(registry.as_ref()).await?;
                    if live.is_empty() {
                        bail!("no MDS is registered in {spec}");
                    }
                    for r in &live {
                        println!(
                            "registered: {} at {} (node {}, domain {})",
                            r.name,
                            r.addr,
                            r.node.as_deref().unwrap_or("-"),
                            r.domain
                        );
                    }
                    live.into_iter().map(|r| r.addr).collect()
                }
                _ => mds,
            };
            list(mds, tls.as_ref()).await
        }),
        Some(MdsVerb::Rebuild {
            volume,
            mds,
            namespace,
        }) => runtime.block_on(rebuild(&volume, &mds, namespace.as_deref(), tls)),
    }
}

/// Where the daemon announces itself.
struct Placement {
    registry: Option<String>,
    etcd: crate::security_args::EtcdArgs,
    name: Option<String>,
    node: Option<String>,
    domain: String,
}

async fn connect(spec: &str, etcd: &crate::security_args::EtcdArgs) -> Result<Arc<dyn Registry>> {
    let target = etcd.target(spec)?;
    Ok(Arc::new(
        target
            .connect()
            .await
            .context("cannot reach the cluster registry")?,
    ))
}

async fn daemon(
    listen: String,
    data_dir: PathBuf,
    backend: Option<PathBuf>,
    placement: Placement,
    mut config: MdsServerConfig,
    metrics: &crate::daemon_metrics::MetricsArgs,
) -> Result<()> {
    let listen: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("listen address {listen:?} is not IP:PORT"))?;
    let _lock = DirLock::acquire(&data_dir, "vstor mds")?;
    crate::daemon_metrics::start("mds", config.tls.clone(), metrics).await?;
    let store = Arc::new(
        tokio::task::spawn_blocking({
            let dir = data_dir.clone();
            move || MdsStore::open(&dir)
        })
        .await?
        .with_context(|| format!("cannot open the MDS store in {}", data_dir.display()))?,
    );
    let backend = match backend {
        Some(spec) => {
            let spec = BackendSpec::parse(&spec)?;
            // The EC tier's map lives in the cluster registry, and its OSDs take the same mutual
            // TLS as the MDS's peers: an `ec` backend without `--registry` fails here with the
            // reason. Blocking (an S3 or EC store connects at open).
            let registry = placement
                .registry
                .as_deref()
                .map(|spec| placement.etcd.target(spec))
                .transpose()?;
            let tls = config.tls.clone();
            let (store, _) = tokio::task::spawn_blocking(move || {
                open_backend(&spec, registry, "mds", tls, None)
            })
            .await??;
            Some(store)
        }
        None => None,
    };
    // The registry before listening: a daemon told to register that cannot stops here.
    let registry = match &placement.registry {
        Some(spec) => Some(connect(spec, &placement.etcd).await?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for the MDS on {listen}"))?;
    let addr = listener.local_addr()?;
    let name = placement.name.unwrap_or_else(|| addr.to_string());
    config.name.clone_from(&name);
    config.backend = backend;
    let tls = config.tls.is_some();
    let registered = match registry {
        Some(registry) => {
            let record =
                registration::record(&name, &addr.to_string(), placement.node, &placement.domain);
            let lease = registration::register(registry.as_ref(), &record).await?;
            let keep = tokio::spawn(registration::keep_registered(
                registry.clone(),
                record,
                lease,
            ));
            Some((registry, lease, keep))
        }
        None => None,
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, store, config, shutdown.clone()));
    tracing::info!(%addr, mutual_tls = tls, "MDS serving");
    announce(&format!("vstor mds ready: {addr}"));
    let result = until_stop_signal(task, "MDS server").await;
    shutdown.cancel();
    if let Some((registry, lease, keep)) = registered {
        keep.abort();
        let _ = registry.revoke(lease).await;
    }
    result
}

async fn list(addrs: Vec<String>, tls: Option<&vstor_net::PeerTls>) -> Result<()> {
    let mut failed = 0;
    for addr in &addrs {
        let client = match MdsClient::connect_with(addr, "vstor-cli", CLI_TIMEOUT, tls).await {
            Ok(client) => client,
            Err(e) => {
                println!("{addr}: unreachable: {e}");
                failed += 1;
                continue;
            }
        };
        let tables = client.list().await?;
        println!("{addr} ({}): {} tables", client.server, tables.len());
        for t in tables {
            let behind = match client.catch_up(&t.volume, true).await {
                Ok(r) => r.behind.to_string(),
                Err(_) => "?".to_string(),
            };
            println!(
                "  {:<24} {:<6} cork {:<8} owner tag {:<6} entries {:<10} behind {}",
                t.volume,
                t.meta.role.as_str(),
                t.meta.cork.tlog,
                t.meta.owner_tag,
                t.entries,
                behind
            );
        }
    }
    if failed == addrs.len() {
        bail!("no MDS answered");
    }
    Ok(())
}

/// A whole-history rebuild is one request; it may take this long.
const REBUILD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Progress of a rebuild, read from a second connection: the table commits once per TLog, so
/// its cork's record count is how many of the backend's TLogs it holds. A bar on a terminal, a
/// line every few seconds otherwise.
async fn show_progress(addr: String, volume: String, total: u64, tls: Option<vstor_net::PeerTls>) {
    let connect = MdsClient::connect_with(&addr, "vstor-cli-progress", CLI_TIMEOUT, tls.as_ref());
    let Ok(client) = connect.await else {
        return;
    };
    let bar = crate::client::progress_bar(
        "rebuild {prefix}: [{bar:40}] {pos}/{len} TLogs ({elapsed}, {per_sec})",
        &volume,
        total,
    );
    let mut last_line = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(info) = client.stat(&volume).await else {
            continue;
        };
        let done = u64::from(info.meta.cork.count);
        match &bar {
            Some(bar) => bar.set_position(done),
            None if last_line.elapsed() >= Duration::from_secs(5) => {
                eprintln!("rebuild {volume}: {done}/{total} TLogs");
                last_line = std::time::Instant::now();
            }
            None => {}
        }
    }
}

async fn rebuild(
    volume: &str,
    addr: &str,
    namespace: Option<&str>,
    tls: Option<vstor_net::PeerTls>,
) -> Result<()> {
    let client = MdsClient::connect_with(addr, "vstor-cli", REBUILD_TIMEOUT, tls.as_ref()).await?;
    let (namespace, role, owner) = match client.stat(volume).await {
        Ok(info) => {
            client.drop_table(volume, info.meta.owner_tag).await?;
            (info.meta.namespace, info.meta.role, info.meta.owner_tag)
        }
        Err(MdsError::Refused {
            code: ErrorCode::NotFound,
            ..
        }) => (namespace.unwrap_or(volume).to_string(), Role::Slave, 0),
        Err(e) => return Err(e.into()),
    };
    client.set_role(volume, &namespace, role, owner).await?;
    let total = client.catch_up(volume, true).await?.behind;
    let progress = tokio::spawn(show_progress(
        addr.to_string(),
        volume.to_string(),
        total,
        tls,
    ));
    let report = client.catch_up(volume, false).await;
    progress.abort();
    let _ = progress.await;
    let report = report?;
    println!(
        "rebuilt the table of {volume} on {addr}: {} TLogs replayed, cork TLog {}",
        report.replayed, report.cork.tlog
    );
    Ok(())
}

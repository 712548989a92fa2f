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
    /// Backend the volumes' TLogs are read from for catch-up: a directory or s3://BUCKET[/PREFIX]
    /// [default: none, slaves do not catch up].
    #[arg(long)]
    backend: Option<PathBuf>,
    /// Cluster registry (etcd://...). Accepted for the cluster setup; placement through the
    /// registry is not implemented yet, so the MDS only logs it.
    #[arg(long)]
    registry: Option<String>,
    /// Name this MDS reports to clients [default: the listen address].
    #[arg(long)]
    name: Option<String>,
    /// How often slave tables catch up with the backend ("0s": only on demand).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    catch_up_every: Duration,
    #[command(subcommand)]
    verb: Option<MdsVerb>,
}

#[derive(Subcommand)]
enum MdsVerb {
    /// Each MDS's tables: volume, role, cork, owner tag, entries, TLogs behind the backend.
    List {
        /// MDS addresses, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        mds: Vec<String>,
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
    match args.verb {
        None => {
            crate::init_logging();
            runtime.block_on(daemon(
                args.listen,
                args.data_dir,
                args.backend,
                args.registry,
                args.name,
                args.catch_up_every,
            ))
        }
        Some(MdsVerb::List { mds }) => runtime.block_on(list(mds)),
        Some(MdsVerb::Rebuild {
            volume,
            mds,
            namespace,
        }) => runtime.block_on(rebuild(&volume, &mds, namespace.as_deref())),
    }
}

async fn daemon(
    listen: String,
    data_dir: PathBuf,
    backend: Option<PathBuf>,
    registry: Option<String>,
    name: Option<String>,
    catch_up_every: Duration,
) -> Result<()> {
    let listen: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("listen address {listen:?} is not IP:PORT"))?;
    let _lock = DirLock::acquire(&data_dir, "vstor mds")?;
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
            // Blocking (an S3 or EC store connects at open). No registry: an `ec` backend
            // needs one and fails here with the reason.
            let (store, _) =
                tokio::task::spawn_blocking(move || open_backend(&spec, None, "mds")).await??;
            Some(store)
        }
        None => None,
    };
    if let Some(registry) = registry {
        tracing::warn!(%registry, "MDS placement through the registry is not implemented yet; volumes name their MDSes with `vstor serve --mds`");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for the MDS on {listen}"))?;
    let addr = listener.local_addr()?;
    let mut config = MdsServerConfig::new(&name.unwrap_or_else(|| addr.to_string()), backend);
    config.catch_up_every = (!catch_up_every.is_zero()).then_some(catch_up_every);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, store, config, shutdown.clone()));
    announce(&format!("vstor mds ready: {addr}"));
    let result = until_stop_signal(task, "MDS server").await;
    shutdown.cancel();
    result
}

async fn list(addrs: Vec<String>) -> Result<()> {
    let mut failed = 0;
    for addr in &addrs {
        let client = match MdsClient::connect(addr, "vstor-cli", CLI_TIMEOUT).await {
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

async fn rebuild(volume: &str, addr: &str, namespace: Option<&str>) -> Result<()> {
    let client = MdsClient::connect(addr, "vstor-cli", CLI_TIMEOUT).await?;
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
    let report = client.catch_up(volume, false).await?;
    println!(
        "rebuilt the table of {volume} on {addr}: {} TLogs replayed, cork TLog {}",
        report.replayed, report.cork.tlog
    );
    Ok(())
}

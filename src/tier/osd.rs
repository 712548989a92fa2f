//! `vstor osd`: one OSD daemon per disk. It stores fragments under its data directory
//! (`vstor_backend::osd::store`), serves them over the OSD protocol, and keeps itself in the
//! registry: its persistent record (`tier/osds/{id}`, address, domain, capacity, `last_seen`)
//! and its live record under a lease (`tier/osd-live/{id}`, usage), so the tier sees it up while
//! it runs and down within the lease TTL after it dies (`kill -9` included).
//!
//! Identity: the id is allocated from the registry's counter on first start and kept in
//! `<data-dir>/osd-id` (checksummed), so a restarted OSD with its disk intact comes back as the
//! same OSD and its fragments need no repair. A second daemon on the same directory is refused
//! (`DirLock`), and so is a second daemon claiming the same id while the first one's lease lives.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vstor_backend::osd::server::{serve, OsdServerConfig};
use vstor_backend::osd::store::FragmentStore;
use vstor_volumedriver::meta;

use super::map::{allocate_osd_id, read, update};
use super::records::{OsdAdmin, OsdLive, OsdRecord, LAST_SEEN_INTERVAL, OSDS, OSD_LIVE};
use crate::dirlock::DirLock;
use crate::registry::{self, KeepAlive, Registry, RegistryError};

const ID_FILE: &str = "osd-id";
const ID_KIND: &[u8; 4] = b"OSID";
const ID_VERSION: u32 = 1;
/// How often the live record's usage is refreshed.
const REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// `vstor osd` settings.
pub struct OsdConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    pub registry: Arc<dyn Registry>,
    pub domain: String,
    pub capacity: Option<u64>,
    /// See `OsdServerConfig::frame_timeout`.
    pub frame_timeout: std::time::Duration,
    /// Mutual TLS: see `OsdServerConfig::tls`.
    pub tls: Option<vstor_net::PeerTls>,
    /// `--metrics`.
    pub metrics: crate::daemon_metrics::MetricsArgs,
}

/// The id in `<data-dir>/osd-id`, if the OSD ran before.
fn stored_id(dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(ID_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(
            meta::decode(ID_KIND, ID_VERSION, &bytes)
                .with_context(|| format!("OSD id file {} is corrupt", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Bytes of the filesystem holding `dir` (the default capacity).
fn filesystem_size(dir: &Path) -> Result<u64> {
    let stat = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("cannot stat the filesystem of {}", dir.display()))?;
    Ok(stat.blocks().saturating_mul(stat.fragment_size()))
}

pub async fn run(config: OsdConfig) -> Result<()> {
    let data_dir = std::path::absolute(&config.data_dir)
        .with_context(|| format!("cannot resolve {}", config.data_dir.display()))?;
    let _lock = DirLock::acquire(&data_dir, "vstor osd")?;
    crate::daemon_metrics::start("osd", config.tls.clone(), &config.metrics).await?;
    let registry = config.registry;
    let capacity = match config.capacity {
        Some(c) => c,
        None => filesystem_size(&data_dir)?,
    };
    let id = match stored_id(&data_dir)? {
        Some(id) => id,
        None => {
            let id = allocate_osd_id(registry.as_ref())
                .await
                .context("cannot allocate an OSD id in the registry")?;
            meta::write_file_atomic(
                &data_dir.join(ID_FILE),
                &meta::encode(ID_KIND, ID_VERSION, &id),
            )
            .with_context(|| format!("cannot write {}", data_dir.join(ID_FILE).display()))?;
            id
        }
    };
    let dir = data_dir.clone();
    let store = Arc::new(
        tokio::task::spawn_blocking(move || FragmentStore::open(&dir, capacity))
            .await?
            .with_context(|| format!("cannot open the fragment store in {}", data_dir.display()))?,
    );
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen for the OSD protocol on {}", config.listen))?;
    let addr = listener.local_addr()?.to_string();
    let record = OsdRecord {
        id,
        addr: addr.clone(),
        domain: config.domain.clone(),
        capacity,
        data_dir: data_dir.display().to_string(),
        admin: OsdAdmin::In,
        last_seen: registry::now_secs(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let ttl = registry.settings().await?.lease_ttl();
    let mut lease = register(registry.as_ref(), &record, &store, ttl).await?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        store.clone(),
        OsdServerConfig {
            frame_timeout: config.frame_timeout,
            tls: config.tls.clone(),
            ..OsdServerConfig::new(id, &config.domain)
        },
        shutdown.clone(),
    ));
    crate::server::announce(&format!(
        "vstor osd {id} (domain {}) listening on {addr}, data in {}{}",
        config.domain,
        data_dir.display(),
        if config.tls.is_some() {
            ", mutual TLS"
        } else {
            ""
        }
    ));
    tracing::info!(osd = id, %addr, "OSD up");

    let keep = async {
        let settings = registry.settings().await?;
        let mut renew = tokio::time::interval(settings.keepalive_interval());
        let mut report = tokio::time::interval(REPORT_INTERVAL);
        let mut seen = tokio::time::interval(LAST_SEEN_INTERVAL);
        loop {
            tokio::select! {
                _ = renew.tick() => match registry.keep_alive(lease).await {
                    Ok(KeepAlive::Renewed { .. }) => {}
                    Ok(KeepAlive::Expired) => {
                        tracing::warn!(osd = id, "lease expired; registering again");
                        lease = register(registry.as_ref(), &record, &store, ttl).await?;
                    }
                    Err(e) => tracing::warn!(osd = id, "cannot renew the lease: {e}"),
                },
                _ = report.tick() => {
                    if let Err(e) = write_live(registry.as_ref(), &record, &store, lease).await {
                        tracing::warn!(osd = id, "cannot report usage: {e}");
                    }
                }
                _ = seen.tick() => {
                    let now = registry::now_secs();
                    if let Err(e) = update::<OsdRecord>(registry.as_ref(), &format!("{OSDS}{id}"), None, |r| {
                        Ok(r.map(|r| OsdRecord { last_seen: now, ..r }))
                    }).await {
                        tracing::warn!(osd = id, "cannot refresh last_seen: {e}");
                    }
                }
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    let outcome = tokio::select! {
        result = keep => result,
        result = server => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::from(e).context("the OSD server stopped")),
            Err(e) => Err(anyhow::Error::from(e).context("the OSD server task failed")),
        },
        () = crate::server::stop_signal() => {
            tracing::info!(osd = id, "stopping");
            Ok(())
        }
    };
    shutdown.cancel();
    let _ = registry.revoke(lease).await;
    outcome
}

/// Write the persistent record (keeping the operator's `admin` decision) and the live record
/// under a new lease. Refused while another process holds this OSD's live record.
async fn register(
    registry: &dyn Registry,
    record: &OsdRecord,
    store: &FragmentStore,
    ttl: Duration,
) -> Result<registry::LeaseId> {
    let id = record.id;
    if let Some((live, _)) = read::<OsdLive>(registry, &format!("{OSD_LIVE}{id}")).await? {
        // This process holds the data directory's lock, so a record from this host and
        // directory is a previous run that died (kill -9) before its lease expired.
        if live.host == host_name() && live.data_dir == record.data_dir {
            tracing::info!(osd = id, "ending the lease of this OSD's previous run");
            registry.revoke(live.lease).await?;
        } else {
            bail!(
                "OSD {id} is already running at {} on host {} (its data directory was copied?); \
                 refusing to start a second copy",
                live.addr,
                live.host
            );
        }
    }
    update::<OsdRecord>(registry, &format!("{OSDS}{id}"), None, |current| {
        Ok(Some(OsdRecord {
            admin: current.map_or(OsdAdmin::In, |c| c.admin),
            ..record.clone()
        }))
    })
    .await
    .with_context(|| format!("cannot register OSD {id}"))?;
    let lease = registry.grant_lease(ttl).await?.id;
    write_live(registry, record, store, lease).await?;
    Ok(lease)
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

async fn write_live(
    registry: &dyn Registry,
    record: &OsdRecord,
    store: &FragmentStore,
    lease: registry::LeaseId,
) -> Result<(), RegistryError> {
    let id = record.id;
    let usage = store.usage();
    let live = OsdLive {
        addr: record.addr.clone(),
        host: host_name(),
        data_dir: record.data_dir.clone(),
        lease,
        used: usage.used,
        capacity: usage.capacity,
        fragments: usage.fragments,
        reported_at: registry::now_secs(),
    };
    update::<OsdLive>(registry, &format!("{OSD_LIVE}{id}"), Some(lease), |_| {
        Ok(Some(live.clone()))
    })
    .await
    .map(|_| ())
}

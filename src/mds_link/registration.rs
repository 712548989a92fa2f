//! MDS daemons in the cluster registry, so nodes place volumes' tables without `--mds`.
//!
//! `vstor mds --registry etcd://… --node NODE --domain DOMAIN` writes `mds/servers/NAME` (an
//! [`MdsRecord`]) under a lease it keeps alive: the record disappears within the lease TTL of
//! the daemon's death (`kill -9` included), and comes back when it runs again. A node on the
//! registry lists the live records when it first places a volume (see `plan::automatic`): the
//! master on the MDS beside the owner (`--node`), one slave in the owner's recovery domain.
//! The placement itself is then stored with the volume (`mds/volumes/VOLUME`), so a dead MDS
//! stays in it and is replaced by promotion, not silently forgotten.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::registry::{self, KeepAlive, LeaseId, Registry};

/// Key prefix of the live MDS records.
pub const SERVERS: &str = "mds/servers/";

/// One live `vstor mds` (JSON in the registry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdsRecord {
    pub name: String,
    /// Where nodes reach it (`HOST:PORT`).
    pub addr: String,
    /// The node it runs beside, if it says (its volumes' masters go there).
    #[serde(default)]
    pub node: Option<String>,
    /// Its failure domain.
    pub domain: String,
    pub started_at: u64,
}

/// Every live MDS, by name.
pub async fn servers(registry: &dyn Registry) -> Result<Vec<MdsRecord>> {
    let mut records = Vec::new();
    for (key, value, _) in registry.list_records(SERVERS).await? {
        match serde_json::from_slice::<MdsRecord>(&value) {
            Ok(record) => records.push(record),
            Err(e) => tracing::warn!(%key, error = %e, "unreadable MDS record in the registry"),
        }
    }
    records.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(records)
}

async fn write(registry: &dyn Registry, record: &MdsRecord, lease: LeaseId) -> Result<()> {
    let key = format!("{SERVERS}{}", record.name);
    let value = serde_json::to_vec(record)?;
    for _ in 0..5 {
        let rev = registry.get_record(&key).await?.map_or(0, |(_, rev)| rev);
        if registry
            .swap_record(&key, rev, Some(&value), Some(lease))
            .await?
        {
            return Ok(());
        }
    }
    anyhow::bail!("the registry record {key} kept changing under this MDS")
}

/// Register `record` under a fresh lease.
pub async fn register(registry: &dyn Registry, record: &MdsRecord) -> Result<LeaseId> {
    let ttl = registry.settings().await?.lease_ttl();
    let lease = registry.grant_lease(ttl).await?.id;
    write(registry, record, lease)
        .await
        .with_context(|| format!("cannot register MDS {} in the registry", record.name))?;
    Ok(lease)
}

/// Keep the record alive until the task is dropped (re-registering if the lease was lost,
/// e.g. while etcd was down), then revoke it. Returns only on an unrecoverable error.
pub async fn keep_registered(
    registry: Arc<dyn Registry>,
    record: MdsRecord,
    mut lease: LeaseId,
) -> Result<()> {
    let every = registry
        .settings()
        .await
        .map_or(Duration::from_secs(1), |s| s.keepalive_interval());
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match registry.keep_alive(lease).await {
            Ok(KeepAlive::Renewed { .. }) => {}
            Ok(KeepAlive::Expired) => {
                tracing::warn!(mds = %record.name, "registry lease expired; registering again");
                match register(registry.as_ref(), &record).await {
                    Ok(new) => lease = new,
                    Err(e) => {
                        tracing::warn!(mds = %record.name, error = %e, "cannot register again; retrying");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(mds = %record.name, error = %e, "cannot renew the registry lease");
            }
        }
    }
}

/// A new record for this daemon.
pub fn record(name: &str, addr: &str, node: Option<String>, domain: &str) -> MdsRecord {
    MdsRecord {
        name: name.to_string(),
        addr: addr.to_string(),
        node,
        domain: domain.to_string(),
        started_at: registry::now_secs(),
    }
}

//! The tier's records in the registry: typed reads and compare-and-swap updates (used by the OSD
//! daemon and the CLI), and [`RegistryTierMap`], the blocking `TierMap` the `ec` store reads.
//!
//! Why the map has its own runtime and registry connection: the `ec` store is called from the
//! engine's blocking threads (uploads, backend reads) and sometimes from code running on the
//! node's runtime. Waiting there for a registry call that itself needs the node's runtime could
//! starve it; a private single-worker runtime cannot be starved by the node, and no lock is held
//! while a call is in flight.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use serde::Serialize;
use vstor_backend::ec::preset::Preset;
use vstor_backend::ec::store::{NamespaceRecord, OsdEntry, TierMap};
use vstor_backend::BackendError;

use super::records::{
    osd_entry, osd_state, osd_status, NamespaceEntry, OsdLive, OsdRecord, OsdStatus, PresetRecord,
    NAMESPACES, NEXT_OSD_ID, OSDS, OSD_LIVE, PRESETS,
};
use crate::registry::{self, Registry, RegistryError};

/// Compare-and-swap retries before an update gives up.
const ATTEMPTS: usize = 16;

/// Record `key` decoded, with its revision.
pub async fn read<T: DeserializeOwned>(
    registry: &dyn Registry,
    key: &str,
) -> Result<Option<(T, i64)>, RegistryError> {
    match registry.get_record(key).await? {
        None => Ok(None),
        Some((bytes, rev)) => serde_json::from_slice(&bytes)
            .map(|value| Some((value, rev)))
            .map_err(|e| RegistryError::Corrupt {
                key: key.to_string(),
                reason: e.to_string(),
            }),
    }
}

/// Every record under `prefix`, decoded: (key after the prefix, value).
pub async fn list<T: DeserializeOwned>(
    registry: &dyn Registry,
    prefix: &str,
) -> Result<Vec<(String, T)>, RegistryError> {
    registry
        .list_records(prefix)
        .await?
        .into_iter()
        .map(|(key, bytes, _)| {
            serde_json::from_slice(&bytes)
                .map(|value| (key.clone(), value))
                .map_err(|e| RegistryError::Corrupt {
                    key: format!("{prefix}{key}"),
                    reason: e.to_string(),
                })
        })
        .collect()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain records: serialising cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Read-modify-write `key` until no other writer got in between: `change` gets the current
/// value (or `None`) and returns the new one (`None`: delete) or an error that stops the update.
pub async fn update<T: Serialize + DeserializeOwned>(
    registry: &dyn Registry,
    key: &str,
    lease: Option<registry::LeaseId>,
    change: impl Fn(Option<T>) -> Result<Option<T>, RegistryError>,
) -> Result<Option<T>, RegistryError> {
    for _ in 0..ATTEMPTS {
        let (current, rev) = match read::<T>(registry, key).await? {
            Some((value, rev)) => (Some(value), rev),
            None => (None, 0),
        };
        let next = change(current)?;
        let bytes = next.as_ref().map(encode);
        if registry
            .swap_record(key, rev, bytes.as_deref(), lease)
            .await?
        {
            return Ok(next);
        }
    }
    Err(RegistryError::Failed {
        op: format!("update {key}"),
        reason: format!("the record kept changing ({ATTEMPTS} attempts)"),
    })
}

/// A new OSD id from the registry's counter (ids start at 1 and are never reused).
pub async fn allocate_osd_id(registry: &dyn Registry) -> Result<u64, RegistryError> {
    let next = update::<u64>(registry, NEXT_OSD_ID, None, |current| {
        Ok(Some(current.unwrap_or(0) + 1))
    })
    .await?;
    next.ok_or_else(|| RegistryError::Failed {
        op: "allocate an OSD id".into(),
        reason: "the counter vanished".into(),
    })
}

/// Every OSD with its state and usage, by id.
pub async fn osds(
    registry: &dyn Registry,
) -> Result<Vec<(OsdRecord, Option<OsdLive>, OsdStatus, OsdEntry)>, RegistryError> {
    let grace = registry.settings().await?.osd_out_grace();
    let records: Vec<(String, OsdRecord)> = list(registry, OSDS).await?;
    let live: Vec<(String, OsdLive)> = list(registry, OSD_LIVE).await?;
    let now = registry::now_secs();
    let mut out: Vec<_> = records
        .into_iter()
        .map(|(key, record)| {
            let live = live.iter().find(|(k, _)| *k == key).map(|(_, l)| l.clone());
            let state = osd_state(&record, live.is_some(), now, grace);
            let status = osd_status(&record, live.as_ref(), state);
            let entry = osd_entry(&record, live.as_ref(), state);
            (record, live, status, entry)
        })
        .collect();
    out.sort_by_key(|(record, ..)| record.id);
    Ok(out)
}

pub async fn preset(registry: &dyn Registry, name: &str) -> Result<Option<Preset>, RegistryError> {
    let Some((record, _)) = read::<PresetRecord>(registry, &format!("{PRESETS}{name}")).await?
    else {
        return Ok(None);
    };
    record
        .to_preset()
        .map(Some)
        .map_err(|reason| RegistryError::Corrupt {
            key: format!("{PRESETS}{name}"),
            reason,
        })
}

/// Store a new preset; refused if one of that name exists (presets are not edited in place:
/// namespaces refer to them by name).
pub async fn create_preset(registry: &dyn Registry, preset: &Preset) -> Result<(), RegistryError> {
    preset.validate().map_err(|reason| RegistryError::Failed {
        op: format!("create preset {}", preset.name),
        reason,
    })?;
    let key = format!("{PRESETS}{}", preset.name);
    if registry
        .swap_record(
            &key,
            0,
            Some(&encode(&PresetRecord::from_preset(preset))),
            None,
        )
        .await?
    {
        Ok(())
    } else {
        Err(RegistryError::Failed {
            op: format!("create preset {}", preset.name),
            reason: "a preset of that name exists".into(),
        })
    }
}

/// The `TierMap` of a node's `ec` store, over the registry.
pub struct RegistryTierMap {
    registry: Arc<dyn Registry>,
    runtime: Option<tokio::runtime::Runtime>,
    /// The OSD map, refreshed every [`REFRESH`] by a task on `runtime`.
    osds: Arc<RwLock<Vec<OsdEntry>>>,
}

/// How often the cached OSD map is refreshed.
pub const REFRESH: Duration = Duration::from_secs(1);

impl Drop for RegistryTierMap {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn tier_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::TierRegistry {
        reason: e.to_string(),
    }
}

impl RegistryTierMap {
    /// Open the map: `connect` makes the registry connection on the map's own runtime; the
    /// OSD map is loaded once before this returns. Blocking; callable from any thread.
    pub fn open<F, Fut>(connect: F) -> anyhow::Result<Self>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<Arc<dyn Registry>>> + Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("vstor-tier-map")
            .enable_all()
            .build()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let connecting = connect();
        runtime.spawn(async move {
            let opened = async {
                let registry = connecting.await?;
                let first = osds(registry.as_ref()).await?;
                anyhow::Ok((registry, first))
            }
            .await;
            let _ = tx.send(opened);
        });
        let (registry, first) = rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the tier map's runtime stopped"))??;
        let cache = Arc::new(RwLock::new(
            first.into_iter().map(|(.., entry)| entry).collect(),
        ));
        let (task_registry, task_cache) = (registry.clone(), cache.clone());
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            loop {
                tick.tick().await;
                match osds(task_registry.as_ref()).await {
                    Ok(all) => {
                        *task_cache.write() = all.into_iter().map(|(.., entry)| entry).collect();
                    }
                    Err(e) => tracing::warn!("cannot refresh the OSD map: {e}"),
                }
            }
        });
        Ok(Self {
            registry,
            runtime: Some(runtime),
            osds: cache,
        })
    }

    /// Create `preset` unless a preset of that name exists.
    pub fn ensure_preset(&self, preset: &Preset) -> Result<(), BackendError> {
        let preset = preset.clone();
        self.call(move |r| async move {
            if self::preset(r.as_ref(), &preset.name).await?.is_some() {
                return Ok(());
            }
            match create_preset(r.as_ref(), &preset).await {
                // Another node created it meanwhile.
                Err(_) if self::preset(r.as_ref(), &preset.name).await?.is_some() => Ok(()),
                other => other,
            }
        })
    }

    /// Run `f(registry)` on the map's runtime and wait for it.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<dyn Registry>) -> Fut,
        Fut: Future<Output = Result<T, RegistryError>> + Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| tier_err("the tier map is shut down"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let fut = f(self.registry.clone());
        runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| tier_err("the tier map's runtime stopped"))?
            .map_err(tier_err)
    }
}

impl TierMap for RegistryTierMap {
    fn osds(&self) -> vstor_backend::Result<Vec<OsdEntry>> {
        Ok(self.osds.read().clone())
    }

    fn preset(&self, name: &str) -> vstor_backend::Result<Option<Preset>> {
        let name = name.to_string();
        self.call(move |r| async move { preset(r.as_ref(), &name).await })
    }

    fn namespace(&self, namespace: &str) -> vstor_backend::Result<Option<NamespaceRecord>> {
        let key = format!("{NAMESPACES}{namespace}");
        let entry =
            self.call(move |r| async move { read::<NamespaceEntry>(r.as_ref(), &key).await })?;
        Ok(entry.map(|(e, _)| e.into()))
    }

    fn create_namespace(
        &self,
        namespace: &str,
        record: &NamespaceRecord,
    ) -> vstor_backend::Result<()> {
        let key = format!("{NAMESPACES}{namespace}");
        let bytes = encode(&NamespaceEntry::from(record));
        let created =
            self.call(move |r| async move { r.swap_record(&key, 0, Some(&bytes), None).await })?;
        if created {
            Ok(())
        } else {
            Err(BackendError::NamespaceExists {
                namespace: namespace.to_string(),
            })
        }
    }

    fn swap_tag(&self, namespace: &str, expected: u64, new: u64) -> vstor_backend::Result<()> {
        let key = format!("{NAMESPACES}{namespace}");
        let ns = namespace.to_string();
        let outcome = self.call(move |r| async move {
            let Some((mut entry, rev)) = read::<NamespaceEntry>(r.as_ref(), &key).await? else {
                return Ok(Err(BackendError::NoSuchNamespace { namespace: ns }));
            };
            if entry.tag != expected {
                return Ok(Err(BackendError::Fenced {
                    namespace: ns,
                    current: entry.tag,
                    presented: new,
                }));
            }
            entry.tag = new;
            if r.swap_record(&key, rev, Some(&encode(&entry)), None)
                .await?
            {
                Ok(Ok(()))
            } else {
                // Someone else changed the tag between the read and the swap: the claim lost.
                let current = read::<NamespaceEntry>(r.as_ref(), &key)
                    .await?
                    .map_or(0, |(e, _)| e.tag);
                Ok(Err(BackendError::Fenced {
                    namespace: ns,
                    current,
                    presented: new,
                }))
            }
        })?;
        outcome
    }

    fn delete_namespace(&self, namespace: &str) -> vstor_backend::Result<()> {
        let key = format!("{NAMESPACES}{namespace}");
        self.call(move |r| async move {
            update::<NamespaceEntry>(r.as_ref(), &key, None, |_| Ok(None)).await
        })?;
        Ok(())
    }

    fn list_namespaces(&self) -> vstor_backend::Result<Vec<String>> {
        let names = self.call(|r| async move { r.list_records(NAMESPACES).await })?;
        Ok(names.into_iter().map(|(name, ..)| name).collect())
    }
}

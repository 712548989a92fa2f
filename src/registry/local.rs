//! The local registry: the embedded single-node default (`vstor serve` without `--registry`).
//!
//! Persistent records (settings, the member list, volume records) live in one checksummed file,
//! `<data-dir>/cluster-registry` (the `vstor_volumedriver::meta` envelope: magic, kind `CREG`,
//! version, CRC32C, JSON payload), replaced atomically on every change. Leases, live keys and
//! owner keys live in memory only, as in etcd where they die with their lease: here the lease
//! holder is this process, so a lease never expires while it runs and is gone after a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use vstor_volumedriver::meta;

use super::edges::{attach_rule, detach_rule};
use super::{
    Attachment, ClusterSettings, EdgeRecord, KeepAlive, Lease, LeaseId, NodeEvent, NodeRecord,
    NodeStatus, OwnerRecord, Registry, RegistryError, Result, VolumeChange, VolumeRecord,
    VolumeState,
};

const KIND: &[u8; 4] = b"CREG";
const VERSION: u32 = 1;
/// File name under the data directory.
pub const FILE_NAME: &str = "cluster-registry";

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Persistent {
    #[serde(default)]
    settings: Option<ClusterSettings>,
    #[serde(default)]
    nodes: BTreeMap<String, NodeRecord>,
    #[serde(default)]
    volumes: BTreeMap<String, VolumeRecord>,
    #[serde(default)]
    attachments: BTreeMap<String, Vec<Attachment>>,
    /// Raw records (`Registry::get_record`): key → (JSON value, revision).
    #[serde(default)]
    records: BTreeMap<String, (String, i64)>,
}

#[derive(Default)]
struct State {
    stored: Persistent,
    next_lease: LeaseId,
    /// Live nodes: name → (record, lease).
    live: BTreeMap<String, (NodeRecord, LeaseId)>,
    owners: BTreeMap<String, OwnerRecord>,
    /// Live edges: name → (record, lease).
    edges: BTreeMap<String, (EdgeRecord, LeaseId)>,
    watchers: Vec<mpsc::Sender<NodeEvent>>,
    /// `watch_volume`'s receivers: volume name → senders.
    volume_watchers: Vec<(String, mpsc::Sender<VolumeChange>)>,
    /// Leases granted by `grant_lease` (live until revoked or the process ends).
    granted: std::collections::BTreeSet<LeaseId>,
    /// Raw records held under a lease: key → (value, revision, lease). Memory only.
    leased: BTreeMap<String, (String, i64, LeaseId)>,
    /// Next revision for raw records.
    next_rev: i64,
}

pub struct LocalRegistry {
    path: PathBuf,
    state: Mutex<State>,
}

impl LocalRegistry {
    /// Open (or start) the registry file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let stored = match std::fs::read(path) {
            Ok(bytes) => {
                meta::decode(KIND, VERSION, &bytes).map_err(|e| RegistryError::Corrupt {
                    key: path.display().to_string(),
                    reason: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persistent::default(),
            Err(e) => {
                return Err(RegistryError::Failed {
                    op: format!("read {}", path.display()),
                    reason: e.to_string(),
                })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            state: Mutex::new(State {
                next_rev: stored.records.values().map(|(_, r)| *r).max().unwrap_or(0) + 1,
                stored,
                next_lease: 1,
                ..State::default()
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Apply `change` to a copy of the persistent records, write the file, then keep the copy:
    /// a failed write changes nothing.
    fn persist<T>(
        &self,
        state: &mut State,
        change: impl FnOnce(&mut Persistent, &mut BTreeMap<String, OwnerRecord>) -> Result<T>,
    ) -> Result<T> {
        let mut stored = state.stored.clone();
        let mut owners = state.owners.clone();
        let value = change(&mut stored, &mut owners)?;
        meta::write_file_atomic(&self.path, &meta::encode(KIND, VERSION, &stored)).map_err(
            |e| RegistryError::Failed {
                op: format!("write {}", self.path.display()),
                reason: e.to_string(),
            },
        )?;
        let old_volumes = std::mem::replace(&mut state.stored, stored).volumes;
        let old_owners = std::mem::replace(&mut state.owners, owners);
        Self::notify_volumes(state, Some(&old_volumes), &old_owners);
        Ok(value)
    }

    /// Tell `watch_volume`'s receivers which of their volumes' keys differ from `old_*`
    /// (`old_volumes`: `None` when the records did not change).
    fn notify_volumes(
        state: &mut State,
        old_volumes: Option<&BTreeMap<String, VolumeRecord>>,
        old_owners: &BTreeMap<String, OwnerRecord>,
    ) {
        let State {
            stored,
            owners,
            volume_watchers,
            ..
        } = state;
        volume_watchers.retain(|(volume, tx)| {
            let mut changes = Vec::new();
            if old_volumes.is_some_and(|old| stored.volumes.get(volume) != old.get(volume)) {
                changes.push(VolumeChange::Record);
            }
            if owners.get(volume) != old_owners.get(volume) {
                changes.push(VolumeChange::Owner);
            }
            // A full receiver loses the notice (see `Registry::watch_volume`); a closed one goes.
            changes
                .into_iter()
                .all(|change| !matches!(tx.try_send(change), Err(TrySendError::Closed(_))))
        });
    }

    fn notify(state: &mut State, event: &NodeEvent) {
        state
            .watchers
            .retain(|tx| tx.try_send(event.clone()).is_ok() || !tx.is_closed());
    }

    fn lease_alive(state: &State, lease: LeaseId) -> bool {
        state.live.values().any(|(_, l)| *l == lease)
            || state.edges.values().any(|(_, l)| *l == lease)
            || state.granted.contains(&lease)
    }
}

fn record_mut<'a>(
    stored: &'a mut Persistent,
    volume: &str,
    tag: u64,
) -> Result<&'a mut VolumeRecord> {
    let record = stored
        .volumes
        .get_mut(volume)
        .ok_or_else(|| RegistryError::VolumeNotFound {
            volume: volume.to_string(),
        })?;
    if record.owner_tag != tag {
        return Err(RegistryError::StaleTag {
            volume: volume.to_string(),
            expected: tag,
            actual: record.owner_tag,
            owner: record.owner.clone(),
        });
    }
    Ok(record)
}

#[async_trait::async_trait]
impl Registry for LocalRegistry {
    fn describe(&self) -> String {
        format!("local registry {}", self.path.display())
    }

    fn is_cluster(&self) -> bool {
        false
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn settings(&self) -> Result<ClusterSettings> {
        Ok(self.state().stored.settings.clone().unwrap_or_default())
    }

    async fn put_settings(&self, settings: &ClusterSettings) -> Result<()> {
        settings.validate()?;
        let mut state = self.state();
        self.persist(&mut state, |stored, _| {
            stored.settings = Some(settings.clone());
            Ok(())
        })
    }

    async fn register_node(&self, node: &NodeRecord, ttl: Duration) -> Result<Lease> {
        let mut state = self.state();
        if let Some((holder, _)) = state.live.get(&node.name) {
            return Err(RegistryError::NodeAlive {
                node: node.name.clone(),
                api_addr: holder.api_addr.clone(),
            });
        }
        self.persist(&mut state, |stored, _| {
            stored.nodes.insert(node.name.clone(), node.clone());
            Ok(())
        })?;
        let lease = state.next_lease;
        state.next_lease += 1;
        state.live.insert(node.name.clone(), (node.clone(), lease));
        Self::notify(&mut state, &NodeEvent::Up(Box::new(node.clone())));
        Ok(Lease { id: lease, ttl })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<KeepAlive> {
        let state = self.state();
        Ok(if Self::lease_alive(&state, lease) {
            KeepAlive::Renewed {
                ttl: state
                    .stored
                    .settings
                    .clone()
                    .unwrap_or_default()
                    .lease_ttl(),
            }
        } else {
            KeepAlive::Expired
        })
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let mut state = self.state();
        let gone: Vec<String> = state
            .live
            .iter()
            .filter(|(_, (_, l))| *l == lease)
            .map(|(name, _)| name.clone())
            .collect();
        let old_owners = state.owners.clone();
        state.owners.retain(|_, owner| owner.lease != lease);
        Self::notify_volumes(&mut state, None, &old_owners);
        state.edges.retain(|_, (_, l)| *l != lease);
        state.granted.remove(&lease);
        state.leased.retain(|_, (_, _, l)| *l != lease);
        for name in gone {
            state.live.remove(&name);
            Self::notify(&mut state, &NodeEvent::Down(name));
        }
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeStatus>> {
        let state = self.state();
        Ok(state
            .stored
            .nodes
            .values()
            .map(|member| {
                let live = state.live.get(&member.name);
                NodeStatus {
                    record: live.map_or_else(|| member.clone(), |(r, _)| r.clone()),
                    alive: live.is_some(),
                    volumes: state
                        .stored
                        .volumes
                        .values()
                        .filter(|v| v.owner == member.name)
                        .count(),
                }
            })
            .collect())
    }

    async fn live_nodes(&self) -> Result<Vec<NodeRecord>> {
        Ok(self.state().live.values().map(|(r, _)| r.clone()).collect())
    }

    async fn watch_nodes(&self) -> Result<mpsc::Receiver<NodeEvent>> {
        let (tx, rx) = mpsc::channel(64);
        let mut state = self.state();
        let live = state.live.values().map(|(r, _)| r.clone()).collect();
        let _ = tx.try_send(NodeEvent::Live(live));
        state.watchers.push(tx);
        Ok(rx)
    }

    async fn watch_volume(&self, volume: &str) -> Result<mpsc::Receiver<VolumeChange>> {
        let (tx, rx) = mpsc::channel(16);
        self.state().volume_watchers.push((volume.to_string(), tx));
        Ok(rx)
    }

    async fn create_volume(&self, record: &VolumeRecord, lease: LeaseId) -> Result<()> {
        let mut state = self.state();
        if !Self::lease_alive(&state, lease) {
            return Err(RegistryError::LeaseExpired { lease });
        }
        self.persist(&mut state, |stored, owners| {
            if let Some(existing) = stored.volumes.get(&record.name) {
                return Err(RegistryError::VolumeExists {
                    volume: record.name.clone(),
                    owner: existing.owner.clone(),
                });
            }
            stored.volumes.insert(record.name.clone(), record.clone());
            owners.insert(
                record.name.clone(),
                OwnerRecord {
                    node: record.owner.clone(),
                    tag: record.owner_tag,
                    lease,
                },
            );
            Ok(())
        })
    }

    async fn delete_volume(&self, volume: &str, tag: u64) -> Result<()> {
        let mut state = self.state();
        self.persist(&mut state, |stored, owners| {
            record_mut(stored, volume, tag)?;
            stored.volumes.remove(volume);
            owners.remove(volume);
            Ok(())
        })
    }

    async fn volume(&self, volume: &str) -> Result<Option<VolumeRecord>> {
        Ok(self.state().stored.volumes.get(volume).cloned())
    }

    async fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        Ok(self.state().stored.volumes.values().cloned().collect())
    }

    async fn take_ownership(
        &self,
        volume: &str,
        expected_tag: u64,
        new_owner: &str,
        lease: LeaseId,
    ) -> Result<u64> {
        let mut state = self.state();
        if !Self::lease_alive(&state, lease) {
            return Err(RegistryError::LeaseExpired { lease });
        }
        self.persist(&mut state, |stored, owners| {
            let record = record_mut(stored, volume, expected_tag)?;
            record.owner = new_owner.to_string();
            record.owner_tag = expected_tag + 1;
            record.state = VolumeState::Serving;
            owners.insert(
                volume.to_string(),
                OwnerRecord {
                    node: new_owner.to_string(),
                    tag: record.owner_tag,
                    lease,
                },
            );
            Ok(record.owner_tag)
        })
    }

    async fn refresh_owner(
        &self,
        volume: &str,
        owner: &str,
        tag: u64,
        lease: LeaseId,
    ) -> Result<()> {
        let mut state = self.state();
        if !Self::lease_alive(&state, lease) {
            return Err(RegistryError::LeaseExpired { lease });
        }
        let record = record_mut(&mut state.stored, volume, tag)?;
        if record.owner != owner {
            return Err(RegistryError::StaleTag {
                volume: volume.to_string(),
                expected: tag,
                actual: record.owner_tag,
                owner: record.owner.clone(),
            });
        }
        let old_owners = state.owners.clone();
        state.owners.insert(
            volume.to_string(),
            OwnerRecord {
                node: owner.to_string(),
                tag,
                lease,
            },
        );
        Self::notify_volumes(&mut state, None, &old_owners);
        Ok(())
    }

    async fn owner(&self, volume: &str) -> Result<Option<OwnerRecord>> {
        Ok(self.state().owners.get(volume).cloned())
    }

    async fn set_dtl(&self, volume: &str, tag: u64, dtl_node: Option<String>) -> Result<()> {
        let mut state = self.state();
        self.persist(&mut state, |stored, _| {
            record_mut(stored, volume, tag)?.dtl_node = dtl_node;
            Ok(())
        })
    }

    async fn set_state(&self, volume: &str, tag: u64, volume_state: VolumeState) -> Result<()> {
        let mut state = self.state();
        self.persist(&mut state, |stored, _| {
            record_mut(stored, volume, tag)?.state = volume_state;
            Ok(())
        })
    }

    async fn register_edge(&self, edge: &EdgeRecord, ttl: Duration) -> Result<Lease> {
        let mut state = self.state();
        if let Some((holder, _)) = state.edges.get(&edge.name) {
            return Err(RegistryError::EdgeAlive {
                edge: edge.name.clone(),
                host: holder.host.clone(),
                api_addr: holder.api_addr.clone(),
            });
        }
        let lease = state.next_lease;
        state.next_lease += 1;
        state.edges.insert(edge.name.clone(), (edge.clone(), lease));
        Ok(Lease { id: lease, ttl })
    }

    async fn live_edges(&self) -> Result<Vec<EdgeRecord>> {
        Ok(self
            .state()
            .edges
            .values()
            .map(|(r, _)| r.clone())
            .collect())
    }

    async fn attachments(&self) -> Result<Vec<(String, Vec<Attachment>)>> {
        Ok(self
            .state()
            .stored
            .attachments
            .iter()
            .map(|(volume, list)| (volume.clone(), list.clone()))
            .collect())
    }

    async fn attach(&self, volume: &str, edge: &str, read_only: bool) -> Result<Vec<Attachment>> {
        let mut state = self.state();
        let live = state.edges.keys().cloned().collect();
        self.persist(&mut state, |stored, _| {
            let current = stored.attachments.get(volume).cloned().unwrap_or_default();
            let next = attach_rule(volume, &current, &live, edge, read_only, super::now_secs())?;
            stored.attachments.insert(volume.to_string(), next.clone());
            Ok(next)
        })
    }

    async fn detach(&self, volume: &str, edge: &str) -> Result<()> {
        let mut state = self.state();
        self.persist(&mut state, |stored, _| {
            let current = stored.attachments.get(volume).cloned().unwrap_or_default();
            let next = detach_rule(volume, &current, edge)?;
            if next.is_empty() {
                stored.attachments.remove(volume);
            } else {
                stored.attachments.insert(volume.to_string(), next);
            }
            Ok(())
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        let mut state = self.state();
        let lease = state.next_lease;
        state.next_lease += 1;
        state.granted.insert(lease);
        Ok(Lease { id: lease, ttl })
    }

    async fn get_record(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>> {
        let state = self.state();
        Ok(current_record(&state, key).map(|(value, rev)| (value.as_bytes().to_vec(), rev)))
    }

    async fn list_records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>, i64)>> {
        let state = self.state();
        let stored = state.stored.records.iter().map(|(k, (v, r))| (k, v, *r));
        let leased = state.leased.iter().map(|(k, (v, r, _))| (k, v, *r));
        let mut out: Vec<_> = stored
            .chain(leased)
            .filter_map(|(k, v, r)| {
                k.strip_prefix(prefix)
                    .map(|rest| (rest.to_string(), v.as_bytes().to_vec(), r))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn swap_record(
        &self,
        key: &str,
        expected: i64,
        value: Option<&[u8]>,
        lease: Option<LeaseId>,
    ) -> Result<bool> {
        let value = value
            .map(|v| {
                String::from_utf8(v.to_vec()).map_err(|_| RegistryError::Failed {
                    op: format!("write record {key}"),
                    reason: "the value is not UTF-8 JSON".into(),
                })
            })
            .transpose()?;
        let mut state = self.state();
        if current_record(&state, key).map_or(0, |(_, rev)| rev) != expected {
            return Ok(false);
        }
        if let Some(lease) = lease {
            if !Self::lease_alive(&state, lease) {
                return Err(RegistryError::LeaseExpired { lease });
            }
        }
        let rev = state.next_rev;
        state.next_rev += 1;
        let was_stored = state.stored.records.contains_key(key);
        state.leased.remove(key);
        match (value, lease) {
            (Some(value), Some(lease)) => {
                if was_stored {
                    self.persist(&mut state, |stored, _| {
                        stored.records.remove(key);
                        Ok(())
                    })?;
                }
                state.leased.insert(key.to_string(), (value, rev, lease));
            }
            (Some(value), None) => self.persist(&mut state, |stored, _| {
                stored.records.insert(key.to_string(), (value, rev));
                Ok(())
            })?,
            (None, _) => {
                if was_stored {
                    self.persist(&mut state, |stored, _| {
                        stored.records.remove(key);
                        Ok(())
                    })?;
                }
            }
        }
        Ok(true)
    }
}

/// A raw record's value and revision, leased or stored.
fn current_record<'a>(state: &'a State, key: &str) -> Option<(&'a String, i64)> {
    state
        .leased
        .get(key)
        .map(|(v, r, _)| (v, *r))
        .or_else(|| state.stored.records.get(key).map(|(v, r)| (v, *r)))
}

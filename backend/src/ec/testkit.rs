//! Test harness of the EC tier: real OSD servers (in-process, loopback) over temporary
//! directories, a map in memory whose OSD states tests set, and helpers to kill, restart and
//! add OSDs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::placement::OsdSlot;
use super::preset::{Compression, Policy, Preset};
use super::store::{EcOptions, EcStore, NamespaceRecord, OsdEntry, OsdState, TierMap};
use crate::osd::server::{serve, OsdServerConfig};
use crate::osd::store::FragmentStore;
use crate::{BackendError, OwnerTag, Result};

pub(super) struct MemMap {
    pub(super) osds: Mutex<Vec<OsdEntry>>,
    pub(super) namespaces: Mutex<HashMap<String, NamespaceRecord>>,
}

impl TierMap for MemMap {
    fn osds(&self) -> Result<Vec<OsdEntry>> {
        Ok(self.osds.lock().clone())
    }
    fn preset(&self, name: &str) -> Result<Option<Preset>> {
        // "p": 4+2 (2+1 when a domain is missing); "lrc": the same with local parities; "enc":
        // the same, encrypted; "zstd", "lz4": compressed; "zenc": compressed and encrypted.
        let known = ["p", "lrc", "enc", "zstd", "lz4", "zenc"];
        Ok(known.contains(&name).then(|| Preset {
            name: name.into(),
            policies: vec![
                Policy {
                    x: 2,
                    ..Policy::new(4, 2)
                },
                Policy {
                    x: 2,
                    ..Policy::new(2, 1)
                },
            ],
            fragment_size: 64 * 1024,
            compression: match name {
                "zstd" | "zenc" => Compression::Zstd,
                "lz4" => Compression::Lz4,
                _ => Compression::None,
            },
            encryption_key: ["enc", "zenc"].contains(&name).then_some([0x5e; 32]),
            local_parity: name == "lrc",
        }))
    }
    fn namespace(&self, namespace: &str) -> Result<Option<NamespaceRecord>> {
        Ok(self.namespaces.lock().get(namespace).cloned())
    }
    fn create_namespace(&self, namespace: &str, record: &NamespaceRecord) -> Result<()> {
        let mut all = self.namespaces.lock();
        if all.contains_key(namespace) {
            return Err(BackendError::NamespaceExists {
                namespace: namespace.into(),
            });
        }
        all.insert(namespace.into(), record.clone());
        Ok(())
    }
    fn swap_tag(&self, namespace: &str, expected: OwnerTag, new: OwnerTag) -> Result<()> {
        let mut all = self.namespaces.lock();
        let record = all.get_mut(namespace).unwrap();
        if record.tag != expected {
            return Err(BackendError::Fenced {
                namespace: namespace.into(),
                current: record.tag,
                presented: expected,
            });
        }
        record.tag = new;
        Ok(())
    }
    fn delete_namespace(&self, namespace: &str) -> Result<()> {
        self.namespaces.lock().remove(namespace);
        Ok(())
    }
    fn list_namespaces(&self) -> Result<Vec<String>> {
        Ok(self.namespaces.lock().keys().cloned().collect())
    }
}

pub(super) struct Osd {
    pub(super) store: Arc<FragmentStore>,
    pub(super) dir: tempfile::TempDir,
    pub(super) shutdown: CancellationToken,
    pub(super) domain: String,
}

pub(super) struct Tier {
    pub(super) runtime: tokio::runtime::Runtime,
    pub(super) osds: Vec<Osd>,
    pub(super) map: Arc<MemMap>,
    pub(super) store: EcStore,
}

pub(super) fn options() -> EcOptions {
    EcOptions {
        default_preset: "p".into(),
        timeout: Duration::from_secs(2),
        client: "test".into(),
        tls: None,
    }
}

/// `count` OSDs, OSD `i` in domain `d{i % 3}`.
pub(super) fn tier(count: u64) -> Tier {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let map = Arc::new(MemMap {
        osds: Mutex::new(Vec::new()),
        namespaces: Mutex::default(),
    });
    let store = EcStore::new(map.clone(), options()).unwrap();
    let mut tier = Tier {
        runtime,
        osds: Vec::new(),
        map,
        store,
    };
    for id in 0..count {
        tier.add_osd(&format!("d{}", id % 3));
    }
    tier
}

impl Tier {
    /// Serve OSD `id`'s directory on a fresh port; returns the address.
    fn start(&self, id: u64, store: Arc<FragmentStore>, shutdown: CancellationToken) -> String {
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let domain = self
            .osds
            .get(id as usize)
            .map_or_else(|| "?".to_string(), |o| o.domain.clone());
        self.runtime.spawn(serve(
            listener,
            store,
            OsdServerConfig::new(id, &domain),
            shutdown,
        ));
        addr
    }

    /// A new OSD in `domain`, up in the map; returns its id.
    pub(super) fn add_osd(&mut self, domain: &str) -> u64 {
        let id = self.osds.len() as u64;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FragmentStore::open(dir.path(), 1 << 30).unwrap());
        let shutdown = CancellationToken::new();
        self.osds.push(Osd {
            store: store.clone(),
            dir,
            shutdown: shutdown.clone(),
            domain: domain.to_string(),
        });
        let addr = self.start(id, store, shutdown);
        self.map.osds.lock().push(OsdEntry {
            slot: OsdSlot {
                id,
                domain: domain.to_string(),
                weight: 1.0,
                writable: true,
            },
            addr,
            state: OsdState::Up,
        });
        id
    }

    /// Stop OSD `id`'s server (its data stays on disk); the map is not told.
    pub(super) fn kill(&self, id: u64) {
        self.osds[id as usize].shutdown.cancel();
    }

    /// Start a killed OSD again on its data, at a new address, and mark it up.
    pub(super) fn restart(&mut self, id: u64) {
        let i = id as usize;
        let store = Arc::new(FragmentStore::open(self.osds[i].dir.path(), 1 << 30).unwrap());
        let shutdown = CancellationToken::new();
        self.osds[i].store = store.clone();
        self.osds[i].shutdown = shutdown.clone();
        let addr = self.start(id, store, shutdown);
        self.map.osds.lock()[i].addr = addr;
        self.set_state(id, OsdState::Up);
    }

    /// Set an OSD's state the way the registry does (see [`set_state`]).
    pub(super) fn set_state(&self, id: u64, state: OsdState) {
        set_state(&self.map, id, state);
    }

    pub(super) fn fragments_on(&self, id: u64) -> u64 {
        self.osds[id as usize].store.usage().fragments
    }

    pub(super) fn total_fragments(&self) -> u64 {
        (0..self.osds.len() as u64)
            .map(|id| self.fragments_on(id))
            .sum()
    }

    /// The fragment files of `namespace/name` on OSD `id`.
    pub(super) fn fragment_files(&self, id: u64, namespace: &str, name: &str) -> Vec<PathBuf> {
        let dir = self.osds[id as usize]
            .dir
            .path()
            .join("fragments")
            .join(namespace)
            .join(name);
        match std::fs::read_dir(dir) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Another client of the same tier (its own connections and caches).
    pub(super) fn client(&self) -> EcStore {
        EcStore::new(self.map.clone(), options()).unwrap()
    }
}

/// Set an OSD's state in `map` the way the registry does: only an up OSD takes new fragments,
/// and draining and out ones have no weight.
pub(super) fn set_state(map: &MemMap, id: u64, state: OsdState) {
    let mut osds = map.osds.lock();
    let entry = &mut osds[id as usize];
    entry.state = state;
    entry.slot.writable = state == OsdState::Up;
    entry.slot.weight = match state {
        OsdState::Up | OsdState::Down => 1.0,
        OsdState::Draining | OsdState::Out => 0.0,
    };
}

/// Deterministic object bytes.
pub(super) fn object(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
        .collect()
}

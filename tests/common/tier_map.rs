//! A read-only `TierMap` over the tier's etcd records, so tests can open the `ec` store a node
//! uses and look at its objects (the node's own map lives in the `vstor` binary). Key layout:
//! `src/tier/mod.rs`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use etcd_client::{Client, GetOptions};
use serde_json::Value;
use vstor_backend::ec::placement::OsdSlot;
use vstor_backend::ec::preset::{Compression, Policy, Preset};
use vstor_backend::ec::store::{NamespaceRecord, OsdEntry, OsdState, TierMap};
use vstor_backend::{BackendError, Result};

/// A client of the `ec` store over the tier at `url` (etcd), as a node opens it.
pub fn ec_store(url: &str) -> vstor_backend::ec::store::EcStore {
    vstor_backend::ec::store::EcStore::new(
        std::sync::Arc::new(EtcdTierMap::new(url)),
        vstor_backend::ec::store::EcOptions {
            default_preset: "default".into(),
            timeout: std::time::Duration::from_secs(5),
            client: "test".into(),
            tls: None,
        },
    )
    .expect("open the EC store")
}

pub struct EtcdTierMap {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl EtcdTierMap {
    pub fn new(url: &str) -> Self {
        let endpoint = url.replace("etcd://", "http://");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = runtime
            .block_on(Client::connect([endpoint], None))
            .expect("connect to etcd");
        Self { runtime, client }
    }

    fn get(&self, key: &str, prefix: bool) -> Vec<(String, Value)> {
        let mut kv = self.client.kv_client();
        let options = prefix.then(|| GetOptions::new().with_prefix());
        let key = format!("/vstor/{key}");
        let response = std::thread::scope(|s| {
            s.spawn(|| self.runtime.block_on(kv.get(key.as_str(), options)))
                .join()
                .unwrap()
        })
        .expect("etcd get");
        response
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key())
                        .trim_start_matches(key.as_str())
                        .to_string(),
                    serde_json::from_slice(kv.value()).unwrap(),
                )
            })
            .collect()
    }
}

fn read_only() -> BackendError {
    BackendError::TierRegistry {
        reason: "the tests' tier map is read-only".into(),
    }
}

impl TierMap for EtcdTierMap {
    fn osds(&self) -> Result<Vec<OsdEntry>> {
        let live = self.get("tier/osd-live/", true);
        Ok(self
            .get("tier/osds/", true)
            .into_iter()
            .map(|(key, record)| {
                let live = live.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
                let up = live.is_some() && record["admin"] != "out";
                OsdEntry {
                    slot: OsdSlot {
                        id: record["id"].as_u64().unwrap(),
                        domain: record["domain"].as_str().unwrap().to_string(),
                        weight: 1.0,
                        writable: up,
                    },
                    addr: live.as_ref().map_or_else(
                        || record["addr"].as_str().unwrap().to_string(),
                        |l| l["addr"].as_str().unwrap().to_string(),
                    ),
                    state: if up { OsdState::Up } else { OsdState::Down },
                }
            })
            .collect())
    }

    fn preset(&self, name: &str) -> Result<Option<Preset>> {
        Ok(self
            .get(&format!("tier/presets/{name}"), false)
            .into_iter()
            .next()
            .map(|(_, p)| Preset {
                name: name.to_string(),
                policies: p["policies"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|q| Policy {
                        k: q["k"].as_u64().unwrap() as u8,
                        m: q["m"].as_u64().unwrap() as u8,
                        c: q["c"].as_u64().unwrap() as u8,
                        x: q["x"].as_u64().unwrap() as u8,
                    })
                    .collect(),
                fragment_size: p["fragment_size"].as_u64().unwrap() as u32,
                compression: Compression::None,
                encryption_key: None,
                local_parity: p["local_parity"].as_bool().unwrap_or(false),
            }))
    }

    fn namespace(&self, namespace: &str) -> Result<Option<NamespaceRecord>> {
        Ok(self
            .get(&format!("tier/namespaces/{namespace}"), false)
            .into_iter()
            .next()
            .map(|(_, v)| NamespaceRecord {
                tag: v["tag"].as_u64().unwrap(),
                preset: v["preset"].as_str().unwrap().to_string(),
            }))
    }

    fn create_namespace(&self, _: &str, _: &NamespaceRecord) -> Result<()> {
        Err(read_only())
    }

    fn swap_tag(&self, _: &str, _: u64, _: u64) -> Result<()> {
        Err(read_only())
    }

    fn delete_namespace(&self, _: &str) -> Result<()> {
        Err(read_only())
    }

    fn list_namespaces(&self) -> Result<Vec<String>> {
        Ok(self
            .get("tier/namespaces/", true)
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }
}

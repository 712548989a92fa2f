//! The EC store against six real OSD servers (in-process, loopback) in three domains.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::ec::preset::{Compression, Policy};
use crate::osd::server::{serve, OsdServerConfig};
use crate::osd::store::FragmentStore;

struct MemMap {
    osds: Mutex<Vec<OsdEntry>>,
    namespaces: Mutex<HashMap<String, NamespaceRecord>>,
}

impl TierMap for MemMap {
    fn osds(&self) -> Result<Vec<OsdEntry>> {
        Ok(self.osds.lock().clone())
    }
    fn preset(&self, name: &str) -> Result<Option<Preset>> {
        Ok((name == "p").then(|| Preset {
            name: "p".into(),
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
            compression: Compression::None,
            encrypted: false,
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

struct Osd {
    store: Arc<FragmentStore>,
    dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

struct Tier {
    runtime: tokio::runtime::Runtime,
    osds: Vec<Osd>,
    map: Arc<MemMap>,
    store: EcStore,
}

fn tier() -> Tier {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut osds = Vec::new();
    let mut entries = Vec::new();
    for id in 0..6u64 {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FragmentStore::open(dir.path(), 1 << 30).unwrap());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let domain = format!("d{}", id % 3);
        runtime.spawn(serve(
            listener,
            store.clone(),
            OsdServerConfig::new(id, &domain),
            shutdown.clone(),
        ));
        entries.push(OsdEntry {
            slot: OsdSlot {
                id,
                domain,
                weight: 1.0,
                writable: true,
            },
            addr,
            state: OsdState::Up,
        });
        osds.push(Osd {
            store,
            dir,
            shutdown,
        });
    }
    let map = Arc::new(MemMap {
        osds: Mutex::new(entries),
        namespaces: Mutex::default(),
    });
    let store = EcStore::new(
        map.clone(),
        EcOptions {
            default_preset: "p".into(),
            timeout: Duration::from_secs(2),
            client: "test".into(),
        },
    )
    .unwrap();
    Tier {
        runtime,
        osds,
        map,
        store,
    }
}

fn object(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
        .collect()
}

#[test]
fn objects_round_trip_and_small_reads_touch_one_osd() {
    let t = tier();
    t.store.create_namespace("vol", 1).unwrap();
    let data = object((3 << 20) + 12_345, 1);
    t.store.put_if_owner("vol", "sco1", &data, 1).unwrap();
    assert_eq!(t.store.get("vol", "sco1").unwrap(), data);
    assert_eq!(t.store.size("vol", "sco1").unwrap(), data.len() as u64);
    let before: u64 = t.osds.iter().map(|o| o.store.range_reads()).sum();
    let mut buf = vec![0u8; 4096];
    t.store
        .get_range("vol", "sco1", (1 << 20) + 8192, &mut buf)
        .unwrap();
    assert_eq!(buf, data[(1 << 20) + 8192..(1 << 20) + 12_288]);
    let after: u64 = t.osds.iter().map(|o| o.store.range_reads()).sum();
    assert_eq!(after - before, 1, "a 4 KiB read is one request to one OSD");
    assert_eq!(t.store.list("vol").unwrap(), vec!["sco1".to_string()]);
    // Every fragment of the 4+2 policy is on its own OSD, at most 2 per domain.
    let holders: usize = t
        .osds
        .iter()
        .map(|o| o.store.usage().fragments as usize)
        .sum();
    assert_eq!(holders, 6);
    t.store.delete("vol", "sco1").unwrap();
    assert!(!t.store.exists("vol", "sco1").unwrap());
    drop(t.runtime);
}

#[test]
fn reads_survive_m_lost_osds_and_a_corrupt_fragment_but_not_more() {
    let t = tier();
    t.store.create_namespace("vol", 1).unwrap();
    let data = object(700_000, 2);
    t.store.put("vol", "obj", &data).unwrap();
    // Corrupt one data block of every fragment on OSD 0 on disk.
    let root = t.osds[0].dir.path().join("fragments/vol/obj");
    for file in std::fs::read_dir(&root).unwrap() {
        let path = file.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = FragmentHeader::decode(&bytes).unwrap().data_offset() as usize + 100;
        bytes[at] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    assert_eq!(
        t.store.get("vol", "obj").unwrap(),
        data,
        "a corrupt fragment is decoded around"
    );
    // Two OSDs die (m = 2; one of them the corrupt one): still every byte.
    t.osds[0].shutdown.cancel();
    t.osds[1].shutdown.cancel();
    let store = EcStore::new(t.map.clone(), t.store.options.clone()).unwrap();
    assert_eq!(store.get("vol", "obj").unwrap(), data, "m lost OSDs");
    // A third one: more than m fragments lost, reads fail with an error.
    t.osds[2].shutdown.cancel();
    let store = EcStore::new(t.map.clone(), t.store.options.clone()).unwrap();
    let err = store.get("vol", "obj").unwrap_err();
    assert!(
        matches!(err, BackendError::Osd { ref reason, .. } if reason.contains("cannot be rebuilt")),
        "a clear error, never wrong data: {err}"
    );
    drop(t.runtime);
}

#[test]
fn fencing_holds_in_the_registry_and_on_the_osds() {
    let t = tier();
    t.store.create_namespace("vol", 3).unwrap();
    t.store.put_if_owner("vol", "a", b"first", 3).unwrap();
    // A new owner claims the namespace: the old tag is refused by the store...
    t.store.claim("vol", 4).unwrap();
    assert!(matches!(
        t.store.put_if_owner("vol", "a", b"stale", 3),
        Err(BackendError::Fenced { current: 4, .. })
    ));
    assert!(t.store.delete_if_owner("vol", "a", 3).is_err());
    // ...and by every OSD, even when a stale node's registry view still says 3.
    t.map.namespaces.lock().get_mut("vol").unwrap().tag = 3;
    let stale = t.store.put_if_owner("vol", "a", b"stale", 3).unwrap_err();
    assert!(
        matches!(
            stale,
            BackendError::OsdRefused {
                code: ErrorCode::Fenced,
                ..
            }
        ),
        "{stale}"
    );
    t.map.namespaces.lock().get_mut("vol").unwrap().tag = 4;
    assert_eq!(t.store.get("vol", "a").unwrap(), b"first");
    t.store.put_if_owner("vol", "a", b"second", 4).unwrap();
    let fresh = EcStore::new(t.map.clone(), t.store.options.clone()).unwrap();
    assert_eq!(
        fresh.get("vol", "a").unwrap(),
        b"second",
        "the newest version wins"
    );
    drop(t.runtime);
}

#[test]
fn a_lost_domain_falls_back_to_the_next_policy() {
    let t = tier();
    t.store.create_namespace("vol", 1).unwrap();
    for entry in t.map.osds.lock().iter_mut() {
        if entry.slot.domain == "d0" {
            entry.slot.writable = false;
        }
    }
    let data = object(100_000, 3);
    t.store.put("vol", "obj", &data).unwrap();
    let held: usize = t
        .osds
        .iter()
        .map(|o| o.store.usage().fragments as usize)
        .sum();
    assert_eq!(held, 3, "2+1 over the two domains left");
    assert_eq!(t.store.get("vol", "obj").unwrap(), data);
    drop(t.runtime);
}

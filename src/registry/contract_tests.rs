//! One contract, both registries: the local file and a real etcd (`tests/common/etcd.rs`).

use std::time::{Duration, Instant};

use super::etcd::{EtcdAccess, EtcdRegistry};
use super::local::LocalRegistry;
use super::*;

#[path = "../../tests/common/etcd.rs"]
mod harness;

fn node(name: &str) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        domain: "a".into(),
        recovery_domain: Some("b".into()),
        api_addr: format!("127.0.0.1:{}", 1000 + name.len()),
        nbd_addr: "127.0.0.1:2".into(),
        dtl_addr: "127.0.0.1:3".into(),
        edge_addr: Some("127.0.0.1:4".into()),
        edge_socket: None,
        host_id: None,
        started_at: 1,
        version: "t".into(),
    }
}

fn volume(name: &str, owner: &str, tag: u64) -> VolumeRecord {
    VolumeRecord {
        name: name.into(),
        owner: owner.into(),
        owner_tag: tag,
        dtl_node: None,
        dtl_addr: None,
        dtl_mode: DtlMode::Sync,
        state: VolumeState::Serving,
        size: 1 << 30,
        created_at: 1,
    }
}

async fn next_event(rx: &mut mpsc::Receiver<NodeEvent>) -> NodeEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a node event within 10 s")
        .expect("watch open")
}

/// The next `want.len()` notices of a volume watch, compared with `want` in any order (etcd
/// reports a transaction's keys on separate watches).
async fn expect_changes(rx: &mut mpsc::Receiver<VolumeChange>, want: &[VolumeChange], after: &str) {
    let mut got = Vec::new();
    while got.len() < want.len() {
        let change = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{after}: got {got:?} of {want:?} within 10 s"))
            .expect("volume watch open");
        got.push(change);
    }
    let key = |c: &VolumeChange| *c == VolumeChange::Owner;
    got.sort_by_key(key);
    let mut want = want.to_vec();
    want.sort_by_key(key);
    assert_eq!(got, want, "{after}");
}

async fn contract(registry: &dyn Registry) {
    const TTL: Duration = Duration::from_secs(5);
    // Settings: defaults, then stored; invalid ones refused.
    assert_eq!(
        registry.settings().await.unwrap(),
        ClusterSettings::default()
    );
    let settings = ClusterSettings {
        lease_ttl_secs: 6,
        ..ClusterSettings::default()
    };
    registry.put_settings(&settings).await.unwrap();
    assert_eq!(registry.settings().await.unwrap(), settings);
    let bad = ClusterSettings {
        lease_ttl_secs: 1,
        ..settings
    };
    assert!(matches!(
        registry.put_settings(&bad).await,
        Err(RegistryError::InvalidSettings { .. })
    ));

    // Nodes: one live registration per name.
    let l1 = registry.register_node(&node("n1"), TTL).await.unwrap();
    match registry.register_node(&node("n1"), TTL).await {
        Err(RegistryError::NodeAlive { node, api_addr }) => {
            assert_eq!(node, "n1");
            assert_eq!(api_addr, "127.0.0.1:1002");
        }
        other => panic!("duplicate registration: {other:?}"),
    }
    let l2 = registry.register_node(&node("n2"), TTL).await.unwrap();
    let l3 = registry.register_node(&node("n3"), TTL).await.unwrap();
    let names = |nodes: Vec<NodeRecord>| nodes.into_iter().map(|n| n.name).collect::<Vec<_>>();
    assert_eq!(
        names(registry.live_nodes().await.unwrap()),
        ["n1", "n2", "n3"]
    );
    let mut watch = registry.watch_nodes().await.unwrap();
    match next_event(&mut watch).await {
        NodeEvent::Live(nodes) => assert_eq!(names(nodes), ["n1", "n2", "n3"]),
        other => panic!("first event {other:?}"),
    }
    assert!(matches!(
        registry.keep_alive(l3.id).await.unwrap(),
        KeepAlive::Renewed { .. }
    ));
    registry.revoke(l3.id).await.unwrap();
    assert_eq!(next_event(&mut watch).await, NodeEvent::Down("n3".into()));
    assert_eq!(
        registry.keep_alive(l3.id).await.unwrap(),
        KeepAlive::Expired
    );
    let l3 = registry.register_node(&node("n3"), TTL).await.unwrap();
    assert_eq!(
        next_event(&mut watch).await,
        NodeEvent::Up(Box::new(node("n3")))
    );

    // Volumes: created with the owner key under the owner's lease; one record per name. A
    // watch of the volume sees each of its keys change (and nothing for a failed write).
    use VolumeChange::{Owner, Record};
    let mut changes = registry.watch_volume("v").await.unwrap();
    registry
        .create_volume(&volume("v", "n1", 1), l1.id)
        .await
        .unwrap();
    expect_changes(&mut changes, &[Record, Owner], "create").await;
    match registry.create_volume(&volume("v", "n2", 1), l2.id).await {
        Err(RegistryError::VolumeExists { owner, .. }) => assert_eq!(owner, "n1"),
        other => panic!("second create: {other:?}"),
    }
    assert_eq!(
        registry.volume("v").await.unwrap(),
        Some(volume("v", "n1", 1))
    );
    assert_eq!(registry.volume("w").await.unwrap(), None);
    assert_eq!(registry.volumes().await.unwrap(), [volume("v", "n1", 1)]);
    let owner = registry.owner("v").await.unwrap().unwrap();
    assert_eq!(
        (owner.node.as_str(), owner.tag, owner.lease),
        ("n1", 1, l1.id)
    );
    let counts: Vec<(String, bool, usize)> = registry
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.record.name, n.alive, n.volumes))
        .collect();
    assert_eq!(
        counts,
        [
            ("n1".into(), true, 1),
            ("n2".into(), true, 0),
            ("n3".into(), true, 0)
        ]
    );

    // Ownership: two nodes race from the same tag; exactly one wins.
    let (a, b) = tokio::join!(
        registry.take_ownership("v", 1, "n2", l2.id),
        registry.take_ownership("v", 1, "n3", l3.id)
    );
    let (winner, lease) = match (a, b) {
        (Ok(2), Err(RegistryError::StaleTag { actual: 2, .. })) => ("n2", l2.id),
        (Err(RegistryError::StaleTag { actual: 2, .. }), Ok(2)) => ("n3", l3.id),
        other => panic!("race outcome {other:?}"),
    };
    let record = registry.volume("v").await.unwrap().unwrap();
    assert_eq!((record.owner.as_str(), record.owner_tag), (winner, 2));
    assert_eq!(registry.owner("v").await.unwrap().unwrap().node, winner);
    expect_changes(&mut changes, &[Record, Owner], "take_ownership").await;

    // Conditional writes need the current tag.
    assert!(matches!(
        registry.set_dtl("v", 1, Some("n1".into())).await,
        Err(RegistryError::StaleTag {
            expected: 1,
            actual: 2,
            ..
        })
    ));
    registry.set_dtl("v", 2, Some("n1".into())).await.unwrap();
    let halted = VolumeState::Halted {
        reason: "test".into(),
        at_ms: 1_700_000_000_123,
    };
    registry.set_state("v", 2, halted.clone()).await.unwrap();
    let record = registry.volume("v").await.unwrap().unwrap();
    assert_eq!(record.dtl_node.as_deref(), Some("n1"));
    assert_eq!(record.state, halted);
    expect_changes(&mut changes, &[Record, Record], "set_dtl, set_state").await;

    // The owner's lease ends: its owner key goes, the record stays.
    registry.revoke(lease).await.unwrap();
    expect_changes(&mut changes, &[Owner], "revoke").await;
    assert_eq!(registry.owner("v").await.unwrap(), None);
    assert_eq!(registry.volume("v").await.unwrap().unwrap().owner, winner);
    assert!(matches!(
        registry.take_ownership("v", 2, winner, lease).await,
        Err(RegistryError::LeaseExpired { .. })
    ));
    // Back with a new lease, the owner puts its key back; another node cannot.
    let again = registry.register_node(&node(winner), TTL).await.unwrap();
    assert!(matches!(
        registry.refresh_owner("v", "n1", 2, l1.id).await,
        Err(RegistryError::StaleTag { .. })
    ));
    registry
        .refresh_owner("v", winner, 2, again.id)
        .await
        .unwrap();
    assert_eq!(registry.owner("v").await.unwrap().unwrap().lease, again.id);
    expect_changes(&mut changes, &[Owner], "refresh_owner").await;
    assert_eq!(registry.volume("v").await.unwrap().unwrap().state, halted);

    // Taking a halted volume (an operator's adoption) serves it again.
    assert_eq!(
        registry
            .take_ownership("v", 2, winner, again.id)
            .await
            .unwrap(),
        3
    );
    let record = registry.volume("v").await.unwrap().unwrap();
    assert_eq!((record.owner_tag, record.state), (3, VolumeState::Serving));
    expect_changes(
        &mut changes,
        &[Record, Owner],
        "take_ownership of a halted volume",
    )
    .await;

    // Delete needs the current tag too.
    assert!(matches!(
        registry.delete_volume("v", 2).await,
        Err(RegistryError::StaleTag { .. })
    ));
    registry.delete_volume("v", 3).await.unwrap();
    assert_eq!(registry.volume("v").await.unwrap(), None);
    assert_eq!(registry.owner("v").await.unwrap(), None);
    expect_changes(&mut changes, &[Record, Owner], "delete").await;
    assert!(changes.try_recv().is_err(), "a notice no change explains");
    assert!(matches!(
        registry.delete_volume("v", 3).await,
        Err(RegistryError::VolumeNotFound { .. })
    ));

    edges_contract(registry).await;
}

fn edge(name: &str) -> EdgeRecord {
    EdgeRecord {
        name: name.into(),
        api_addr: format!("127.0.0.1:{}", 2000 + name.len()),
        host: format!("host-{name}"),
        nbd_addr: "127.0.0.1:5".into(),
        started_at: 1,
    }
}

/// Edges under leases; attachments: one writer or many readers, a dead holder taken over.
async fn edges_contract(registry: &dyn Registry) {
    const TTL: Duration = Duration::from_secs(5);
    let e1 = registry.register_edge(&edge("e1"), TTL).await.unwrap();
    match registry.register_edge(&edge("e1"), TTL).await {
        Err(RegistryError::EdgeAlive { edge, host, .. }) => {
            assert_eq!((edge.as_str(), host.as_str()), ("e1", "host-e1"));
        }
        other => panic!("duplicate edge: {other:?}"),
    }
    let e2 = registry.register_edge(&edge("e2"), TTL).await.unwrap();
    assert!(matches!(
        registry.keep_alive(e2.id).await.unwrap(),
        KeepAlive::Renewed { .. }
    ));
    let names = |edges: Vec<EdgeRecord>| edges.into_iter().map(|e| e.name).collect::<Vec<_>>();
    assert_eq!(names(registry.live_edges().await.unwrap()), ["e1", "e2"]);

    let list = registry.attach("vol", "e1", false).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].edge.as_str(), list[0].read_only), ("e1", false));
    let refused = registry.attach("vol", "e2", false).await.unwrap_err();
    assert!(
        matches!(&refused, RegistryError::AttachedElsewhere { edge, .. } if edge == "e1"),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("attached writable on edge e1"));
    // Attaching again on the same edge is idempotent.
    registry.attach("vol", "e1", false).await.unwrap();
    // Read-only: several edges.
    registry.attach("tpl", "e1", true).await.unwrap();
    let shared = registry.attach("tpl", "e2", true).await.unwrap();
    assert_eq!(shared.len(), 2);
    let all = registry.attachments().await.unwrap();
    assert_eq!(
        all.iter()
            .map(|(v, l)| (v.as_str(), l.len()))
            .collect::<Vec<_>>(),
        [("tpl", 2), ("vol", 1)]
    );
    // Detach removes the entry; detaching again is an error.
    registry.detach("tpl", "e2").await.unwrap();
    assert!(matches!(
        registry.detach("tpl", "e2").await,
        Err(RegistryError::NotAttached { .. })
    ));
    registry.detach("tpl", "e1").await.unwrap();
    assert_eq!(registry.attachments().await.unwrap().len(), 1);
    // The holder dies: its lease goes, and the writable attach is taken over.
    registry.revoke(e1.id).await.unwrap();
    assert_eq!(names(registry.live_edges().await.unwrap()), ["e2"]);
    let taken = registry.attach("vol", "e2", false).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].edge, "e2");
    registry.detach("vol", "e2").await.unwrap();
    assert!(registry.attachments().await.unwrap().is_empty());
    registry.revoke(e2.id).await.unwrap();
}

/// The raw records the EC tier's map is built on: compare-and-swap by revision, prefixes,
/// records under a lease vanish with it.
async fn records_contract(registry: &dyn Registry) {
    assert_eq!(registry.get_record("tier/x/a").await.unwrap(), None);
    assert!(registry
        .swap_record("tier/x/a", 0, Some(b"{\"v\":1}"), None)
        .await
        .unwrap());
    // Creating again (expected 0) loses: the key exists.
    assert!(!registry
        .swap_record("tier/x/a", 0, Some(b"{\"v\":2}"), None)
        .await
        .unwrap());
    let (value, rev) = registry.get_record("tier/x/a").await.unwrap().unwrap();
    assert_eq!(value, b"{\"v\":1}");
    assert!(!registry
        .swap_record("tier/x/a", rev + 100, Some(b"{}"), None)
        .await
        .unwrap());
    assert!(registry
        .swap_record("tier/x/a", rev, Some(b"{\"v\":3}"), None)
        .await
        .unwrap());
    let lease = registry.grant_lease(Duration::from_secs(5)).await.unwrap();
    assert!(registry
        .swap_record("tier/x/b", 0, Some(b"{}"), Some(lease.id))
        .await
        .unwrap());
    assert!(registry
        .swap_record("tier/y/c", 0, Some(b"{}"), None)
        .await
        .unwrap());
    let listed: Vec<String> = registry
        .list_records("tier/x/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert_eq!(listed, ["a", "b"]);
    registry.revoke(lease.id).await.unwrap();
    assert_eq!(registry.get_record("tier/x/b").await.unwrap(), None);
    let (_, rev) = registry.get_record("tier/x/a").await.unwrap().unwrap();
    assert!(registry
        .swap_record("tier/x/a", rev, None, None)
        .await
        .unwrap());
    assert_eq!(registry.list_records("tier/x/").await.unwrap().len(), 0);
}

#[tokio::test]
async fn local_registry_keeps_the_contract_and_its_records_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(local::FILE_NAME);
    let registry = LocalRegistry::open(&path).unwrap();
    contract(&registry).await;
    records_contract(&registry).await;
    assert!(registry
        .swap_record("tier/kept", 0, Some(b"{\"k\":1}"), None)
        .await
        .unwrap());
    let lease = registry
        .register_node(&node("n9"), Duration::from_secs(5))
        .await;
    let lease = lease.unwrap();
    registry
        .create_volume(&volume("kept", "n9", 4), lease.id)
        .await
        .unwrap();
    drop(registry);
    let reopened = LocalRegistry::open(&path).unwrap();
    assert_eq!(
        reopened.volume("kept").await.unwrap(),
        Some(volume("kept", "n9", 4))
    );
    // Leases (and the owner keys under them) died with the process.
    assert_eq!(reopened.owner("kept").await.unwrap(), None);
    assert!(reopened.live_nodes().await.unwrap().is_empty());
    assert_eq!(reopened.nodes().await.unwrap().len(), 4);
    assert_eq!(
        reopened.get_record("tier/kept").await.unwrap().unwrap().0,
        b"{\"k\":1}"
    );
    // A damaged file is refused, not half-read.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    assert!(matches!(
        LocalRegistry::open(&path),
        Err(RegistryError::Corrupt { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registry_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = harness::Etcd::start(dir.path());
    let registry = EtcdRegistry::connect(
        &[etcd.endpoint()],
        &EtcdAccess::default(),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    contract(&registry).await;
    records_contract(&registry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leases_expire_without_keepalive_and_unreachable_etcd_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = harness::Etcd::start(dir.path());
    // A live etcd must answer within the timeout: 1 s was not always enough with the other tests
    // keeping the disk busy (a list once took longer in CI).
    let timeout = Duration::from_secs(3);
    let registry = EtcdRegistry::connect(&[etcd.endpoint()], &EtcdAccess::default(), timeout)
        .await
        .unwrap();
    let lease = registry
        .register_node(&node("short"), Duration::from_secs(2))
        .await
        .unwrap();
    registry
        .create_volume(&volume("v", "short", 1), lease.id)
        .await
        .unwrap();
    let started = Instant::now();
    while !registry.live_nodes().await.unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(registry.owner("v").await.unwrap(), None);
    assert_eq!(
        registry.keep_alive(lease.id).await.unwrap(),
        KeepAlive::Expired
    );
    let nodes = registry.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert!(!nodes[0].alive);
    assert_eq!(nodes[0].volumes, 1);

    // etcd gone: calls fail in bounded time with Unreachable; a new client cannot connect.
    etcd.kill9();
    let started = Instant::now();
    let ping = registry.ping().await;
    assert!(
        matches!(ping, Err(RegistryError::Unreachable { .. })),
        "{ping:?}"
    );
    assert!(started.elapsed() < timeout + Duration::from_secs(2));
    assert!(matches!(
        EtcdRegistry::connect(
            &[etcd.endpoint()],
            &EtcdAccess::default(),
            Duration::from_secs(1)
        )
        .await,
        Err(RegistryError::Unreachable { .. })
    ));
    // Back on the same data: the records are there.
    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match registry.volume("v").await {
            Ok(record) => {
                assert_eq!(record, Some(volume("v", "short", 1)));
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "etcd did not come back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

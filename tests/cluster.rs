//! A cluster on a real etcd: three `vstor serve` processes on loopback sharing one backend
//! directory, each registered under a lease, each running a DTL server.
//!
//! Domains: n1 in `a` (recovery domain `b`), n2 in `b` (recovery `a`), n3 in `a` (recovery `b`),
//! so a volume on n2 gets its DTL on n1 or n3, and one on n1 or n3 on n2.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{serve_fails, Daemon, NbdClient, TestBackend, Thaw};
use serde_json::Value;

/// Lease TTL of the cluster (the default).
const TTL: Duration = Duration::from_secs(5);

struct Cluster {
    etcd: Etcd,
    nodes: Vec<Daemon>,
    root: tempfile::TempDir,
}

const LAYOUT: [(&str, &str, &str); 3] = [("n1", "a", "b"), ("n2", "b", "a"), ("n3", "a", "b")];

fn node_args<'a>(etcd: &'a str, name: &'a str, domain: &'a str, recovery: &'a str) -> Vec<&'a str> {
    vec![
        "--registry",
        etcd,
        "--node",
        name,
        "--domain",
        domain,
        "--recovery-domain",
        recovery,
    ]
}

impl Cluster {
    fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(root.path());
        let backend = TestBackend::Dir(root.path().join("backend"));
        let url = etcd.url();
        let nodes = LAYOUT
            .iter()
            .map(|(name, domain, recovery)| {
                let dir = root.path().join(name);
                std::fs::create_dir_all(&dir).unwrap();
                Daemon::start_on(&dir, &backend, &node_args(&url, name, domain, recovery))
            })
            .collect();
        Cluster { etcd, nodes, root }
    }

    fn node(&self, name: &str) -> &Daemon {
        let i = LAYOUT.iter().position(|(n, _, _)| *n == name).unwrap();
        &self.nodes[i]
    }

    fn json(daemon: &Daemon, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&daemon.cli_ok(&all)).unwrap()
    }

    fn node_list(daemon: &Daemon) -> Vec<Value> {
        Self::json(daemon, &["node", "list"])
            .as_array()
            .unwrap()
            .clone()
    }
}

/// A real etcd and one node, `n1`, on `backend`, both in `root`: a cluster of one.
fn etcd_and_n1(root: &std::path::Path, backend: &TestBackend) -> (Etcd, Daemon) {
    let etcd = Etcd::start(root);
    let dir = root.join("n1");
    std::fs::create_dir_all(&dir).unwrap();
    let n1 = Daemon::start_on(&dir, backend, &node_args(&etcd.url(), "n1", "a", "b"));
    (etcd, n1)
}

fn find<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list:?}"))
}

fn crc_of(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[test]
fn nodes_volumes_forwarding_placement_and_delete_across_three_nodes() {
    let cluster = Cluster::start();
    let (n1, n2, n3) = (cluster.node("n1"), cluster.node("n2"), cluster.node("n3"));

    // Every node sees the three live nodes with their domains and addresses.
    let nodes = Cluster::node_list(n3);
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    for ((name, domain, recovery), daemon) in LAYOUT.iter().zip(&cluster.nodes) {
        let node = find(&nodes, name);
        assert_eq!(node["alive"], true, "{node}");
        assert_eq!(node["domain"], *domain);
        assert_eq!(node["recovery_domain"], *recovery);
        assert_eq!(node["api_addr"], daemon.api.as_str());
        assert_eq!(node["nbd_addr"], daemon.nbd.as_str());
        assert_eq!(node["volumes"], 0);
        assert!(node["dtl_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    let text = n1.cli_ok(&["node", "list"]);
    assert!(
        text.lines().count() == 4 && text.contains("n2") && text.contains("yes"),
        "{text}"
    );

    // Created through n1 on n2: it lands on n2.
    let created = Cluster::json(
        n1,
        &["volume", "create", "v1", "--size", "64M", "--node", "n2"],
    );
    assert_eq!(created["owner"], "n2", "{created}");
    assert_eq!(created["nbd_uri"], format!("nbd://{}/v1", n2.nbd));
    assert!(n2.cli_ok(&["volume", "list"]).contains("v1"));

    // Its DTL is on a live node of n2's recovery domain (a), not on n2, and in sync.
    let dtl_node = created["dtl_node"].as_str().unwrap().to_string();
    assert!(dtl_node == "n1" || dtl_node == "n3", "{created}");
    let dtl_addr = find(&nodes, &dtl_node)["dtl_addr"].clone();
    assert_eq!(created["dtl_addr"], dtl_addr);
    assert_eq!(created["dtl_mode"], "sync");

    // Info from n3 is n2's: owner, its NBD export, the DTL address.
    let info = n3.wait_for("v1", "the DTL in sync", |v| v["dtl_state"] == "ok_sync");
    assert_eq!(info["owner"], "n2");
    assert_eq!(info["nbd_uri"], format!("nbd://{}/v1", n2.nbd));
    assert_eq!(info["dtl_addr"], dtl_addr);
    assert!(info["owner_tag"].as_u64().unwrap() >= 1);

    // Write through that NBD URI, read back through it, compare checksums.
    let addr = info["nbd_uri"]
        .as_str()
        .unwrap()
        .trim_start_matches("nbd://")
        .trim_end_matches("/v1")
        .to_string();
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    {
        let mut client = NbdClient::connect(&addr, "v1").unwrap();
        assert_eq!(client.write(4096, &data, false).unwrap(), 0);
        assert_eq!(client.flush().unwrap(), 0);
        let mut back = vec![0u8; data.len()];
        assert_eq!(client.read(4096, &mut back).unwrap(), 0);
        assert_eq!(crc_of(&back), crc_of(&data));
    }
    // The sync DTL holds the writes: it is still in sync after them.
    let info = n1.wait_for("v1", "the DTL in sync after writes", |v| {
        v["dtl_state"] == "ok_sync"
    });
    assert!(
        info["written_bytes"].as_u64().unwrap() >= data.len() as u64,
        "{info}"
    );

    // A second volume without --node goes to the least-loaded node (n1, by name among the
    // empty ones), its DTL on n2 (n1's recovery domain b).
    let second = Cluster::json(n2, &["volume", "create", "v2", "--size", "16M"]);
    assert_eq!(second["owner"], "n1", "{second}");
    assert_eq!(second["dtl_node"], "n2");

    // Every node lists every volume with its owner.
    for daemon in &cluster.nodes {
        let list = Cluster::json(daemon, &["volume", "list"]);
        let list = list.as_array().unwrap();
        assert_eq!(find(list, "v1")["owner"], "n2");
        assert_eq!(find(list, "v2")["owner"], "n1");
        assert_eq!(list.len(), 2);
    }
    let nodes = Cluster::node_list(n1);
    assert_eq!(find(&nodes, "n2")["volumes"], 1);
    assert_eq!(find(&nodes, "n1")["volumes"], 1);

    // Delete from n1 (forwarded to n2): gone everywhere.
    n1.cli_ok(&["volume", "delete", "v1"]);
    for daemon in &cluster.nodes {
        let out = daemon.cli(&["volume", "info", "v1"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("v1"));
        let list = Cluster::json(daemon, &["volume", "list"]);
        assert!(
            list.as_array().unwrap().iter().all(|v| v["name"] != "v1"),
            "{list}"
        );
    }
    assert_eq!(find(&Cluster::node_list(n3), "n2")["volumes"], 0);
    // A duplicate name is refused wherever it is asked.
    let out = n3.cli(&["volume", "create", "v2", "--size", "16M"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );
}

#[test]
fn a_killed_node_shows_dead_within_the_lease_ttl_and_its_volumes_fail_over() {
    let mut cluster = Cluster::start();
    Cluster::json(
        cluster.node("n1"),
        &["volume", "create", "v3", "--size", "16M", "--node", "n3"],
    );
    let killed = Instant::now();
    cluster.nodes[2].kill9();
    let n1 = cluster.node("n1");
    let deadline = killed + TTL + Duration::from_secs(3);
    loop {
        let nodes = Cluster::node_list(n1);
        if find(&nodes, "n3")["alive"] == false {
            assert_eq!(find(&nodes, "n1")["alive"], true);
            assert_eq!(find(&nodes, "n2")["alive"], true);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n3 still alive after {:?}: {nodes:?}",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        killed.elapsed() <= TTL + Duration::from_secs(2),
        "{:?}",
        killed.elapsed()
    );
    // Automatic failover (part B): a survivor adopts the volume and serves it.
    let info = n1.wait_for("v3", "v3 adopted by a survivor", |v| {
        v["state"] == "running" && (v["owner"] == "n1" || v["owner"] == "n2")
    });
    assert_eq!(info["last_failover"]["from"], "n3", "{info}");
    let new_owner = info["owner"].as_str().unwrap().to_string();

    // n3 comes back (new ports, new lease): it does not serve v3 any more and says where it went;
    // the volume is managed through any node.
    cluster.nodes[2].launch();
    let n3 = cluster.node("n3");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = Cluster::json(n3, &["volume", "list"]);
        let moved = list
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "v3" && v["moved_to"] == new_owner.as_str());
        if moved {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n3 does not report v3 moved: {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let nodes = Cluster::node_list(cluster.node("n2"));
    assert_eq!(find(&nodes, "n3")["alive"], true);
    let out = cluster
        .node("n2")
        .cli(&["volume", "resize", "v3", "--size", "32M"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(cluster.node("n1").info("v3")["size"], 32 << 20);
}

/// GET a JSON document from a node's API (Null when it does not answer).
fn http_get_json(addr: &str, path: &str) -> Value {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return Value::Null;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return Value::Null;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(Value::Null)
}

#[test]
fn startup_refuses_unreachable_etcd_a_live_duplicate_name_and_a_missing_name() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let url = etcd.url();
    let first = root.path().join("first");
    std::fs::create_dir_all(&first).unwrap();
    let n1 = Daemon::start_on(
        &first,
        &TestBackend::Default,
        &node_args(&url, "n1", "a", "b"),
    );

    let unused = vstor_backend::testing::free_port();
    let err = serve_fails(
        &root.path().join("x"),
        &[
            "--registry",
            &format!("etcd://127.0.0.1:{unused}"),
            "--node",
            "nx",
        ],
    );
    assert!(err.contains("cannot reach the cluster registry"), "{err}");

    let err = serve_fails(
        &root.path().join("y"),
        &["--registry", &url, "--node", "n1"],
    );
    assert!(
        err.contains("node n1 is already registered by a live node"),
        "{err}"
    );

    let err = serve_fails(&root.path().join("z"), &["--registry", &url]);
    assert!(err.contains("--node NAME"), "{err}");

    let err = serve_fails(
        &root.path().join("w"),
        &["--registry", "127.0.0.1:2379", "--node", "n"],
    );
    assert!(err.contains("etcd://HOST:PORT"), "{err}");

    // A clean stop leaves the cluster at once (its lease is revoked): the name is free again.
    let mut n1 = n1;
    assert!(n1.terminate().success());
    let second = root.path().join("second");
    std::fs::create_dir_all(&second).unwrap();
    let again = Daemon::start_on(
        &second,
        &TestBackend::Default,
        &node_args(&url, "n1", "a", "b"),
    );
    let nodes = Cluster::node_list(&again);
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["alive"], true);
    assert_eq!(nodes[0]["api_addr"], again.api.as_str());
}

/// `--registry-timeout`: two nodes on one etcd, n1 allowing each registry call 10 s, n2 with the
/// default 2 s. etcd is stopped (SIGSTOP: it keeps its sockets, as an etcd stuck on its disk
/// does); a `volume create` on n1 and a `node list` on n2 are sent. n2's answer is the registry's
/// timeout, and only once it came is etcd woken: n1's create must then complete, and the volume be
/// served.
#[test]
fn a_longer_registry_timeout_rides_out_an_etcd_stall_that_fails_the_default() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let url = etcd.url();
    let start = |name: &str, domain: &str, recovery: &str, extra: &[&str]| {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = node_args(&url, name, domain, recovery);
        args.extend_from_slice(extra);
        Daemon::start_on(&dir, &TestBackend::Dir(root.path().join("backend")), &args)
    };
    let patient = start("n1", "a", "b", &["--registry-timeout", "10s"]);
    let default = start("n2", "b", "a", &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Cluster::node_list(&patient).len() < 2 {
        assert!(Instant::now() < deadline, "n1 never saw n2 registered");
        std::thread::sleep(Duration::from_millis(100));
    }

    let pid = Pid::from_raw(i32::try_from(etcd.pid()).unwrap());
    let thaw = Thaw(pid);
    kill(pid, Signal::SIGSTOP).unwrap();
    let stalled_at = Instant::now();
    let (created, listed) = std::thread::scope(|s| {
        let create = s.spawn(|| {
            patient.cli(&[
                "volume", "create", "slow", "--size", "16M", "--node", "n1", "--json",
            ])
        });
        let listed = default.cli(&["node", "list", "--json"]);
        let waited = stalled_at.elapsed();
        assert!(
            !create.is_finished(),
            "n1's create ended within n2's 2 s timeout ({waited:?}): {:?}",
            create
                .join()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        );
        drop(thaw);
        (create.join().unwrap(), listed)
    });
    let listed_err = String::from_utf8_lossy(&listed.stderr);
    assert!(
        !listed.status.success(),
        "n2 answered while etcd was stopped"
    );
    // The etcd client's own request timeout and the registry's bound around each call are
    // both n2's 2 s; whichever fires first words it.
    assert!(
        listed_err.contains("cannot reach the registry")
            && (listed_err.contains("Timeout") || listed_err.contains("no answer within 2s")),
        "{listed_err}"
    );
    assert!(
        created.status.success(),
        "n1's create failed although etcd answered within its 10 s: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let created: Value = serde_json::from_slice(&created.stdout).unwrap();
    assert_eq!(created["owner"], "n1", "{created}");
    let info = Cluster::json(&default, &["volume", "info", "slow"]);
    assert_eq!(info["owner"], "n1", "{info}");
    assert_eq!(info["state"], "running", "{info}");
    // Served: what a client writes reads back.
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut client = NbdClient::connect(&patient.nbd, "slow").unwrap();
    assert_eq!(client.write(4096, &data, true).unwrap(), 0);
    let mut back = vec![0u8; data.len()];
    assert_eq!(client.read(4096, &mut back).unwrap(), 0);
    assert_eq!(crc_of(&back), crc_of(&data));
}

#[test]
fn with_etcd_down_for_everybody_nodes_keep_serving_and_recover_when_it_returns() {
    let mut cluster = Cluster::start();
    let created = Cluster::json(
        cluster.node("n1"),
        &["volume", "create", "v4", "--size", "16M", "--node", "n1"],
    );
    assert_eq!(created["owner"], "n1");
    let health = |daemon: &Daemon| -> Value { http_get_json(&daemon.api, "/v1/health") };
    let wait_health = |daemon: &Daemon, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let h = health(daemon);
            if h["cluster_health"] == want {
                return;
            }
            assert!(Instant::now() < deadline, "node never became {want}: {h}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Every node knows the two others it would ask (it learns them from the registry).
    for daemon in &cluster.nodes {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let h = health(daemon);
            if h["cluster_health"] == "healthy"
                && h["peers"].as_array().is_some_and(|p| p.len() == 2)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node does not know its peers: {h}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    cluster.etcd.kill9();
    // Past TTL - margin every node asks its peers; all say etcd is unreachable: serve on.
    wait_health(cluster.node("n1"), "registry_down");
    let n1 = cluster.node("n1");
    let data = vec![0x5au8; 256 * 1024];
    let mut client = NbdClient::connect(&n1.nbd, "v4").unwrap();
    assert_eq!(client.write(0, &data, true).unwrap(), 0);
    assert_eq!(client.flush().unwrap(), 0);
    let mut back = vec![0u8; data.len()];
    assert_eq!(client.read(0, &mut back).unwrap(), 0);
    assert_eq!(crc_of(&back), crc_of(&data));
    drop(client);
    cluster.etcd.restart();
    for daemon in &cluster.nodes {
        wait_health(daemon, "healthy");
    }
    // Ownership intact: same owner, same tag, owner key back under n1's lease.
    let info = Cluster::json(cluster.node("n2"), &["volume", "info", "v4"]);
    assert_eq!(info["owner"], "n1");
    assert_eq!(info["owner_tag"], created["owner_tag"]);
    assert_eq!(info["state"], "running");
    let _ = &cluster.root;
}

#[test]
fn a_node_restarted_at_once_after_kill_9_waits_for_its_old_lease_then_serves() {
    let root = tempfile::tempdir().unwrap();
    let (_etcd, mut n1) = etcd_and_n1(root.path(), &TestBackend::Default);
    Cluster::json(&n1, &["volume", "create", "v5", "--size", "16M"]);
    let killed = Instant::now();
    n1.kill9();
    // Its old lease still holds the name; the old API does not answer, so the new process
    // waits for the lease to expire instead of failing, then serves its volume again.
    n1.launch();
    let waited = killed.elapsed();
    assert!(waited < TTL + Duration::from_secs(5), "{waited:?}");
    let info = n1.wait_for("v5", "v5 served again", |v| v["state"] == "running");
    assert_eq!(info["owner"], "n1");
    assert!(n1
        .log_text()
        .contains("waiting for the previous registration"));
    let nodes = Cluster::node_list(&n1);
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["volumes"], 1);
}

/// A node comes back from a clean stop with an empty write-buffer disk (replaced, say), and no
/// other node was there to adopt its volumes meanwhile: the registry still names it the serving
/// owner of volumes it knows nothing of. It adopts v6 from the backend (`last_failover.kind`
/// `unserved`) instead of answering "being taken over" for ever, and what was written reads
/// back. v7's backend namespace is gone too (a record that outlived its volume): its adoption
/// halts it with the reason, and `volume delete` removes the record and frees the name.
#[test]
fn a_node_back_with_an_empty_disk_serves_the_volumes_the_registry_gives_it() {
    let root = tempfile::tempdir().unwrap();
    let backend = TestBackend::Dir(root.path().join("backend"));
    let (_etcd, mut n1) = etcd_and_n1(root.path(), &backend);
    Cluster::json(&n1, &["volume", "create", "v6", "--size", "16M"]);
    Cluster::json(&n1, &["volume", "create", "v7", "--size", "16M"]);
    let data: Vec<u8> = (0..512 * 1024u32).map(|i| (i * 13 % 253) as u8).collect();
    let mut client = NbdClient::connect(&n1.nbd, "v6").unwrap();
    assert_eq!(client.write(1 << 20, &data, true).unwrap(), 0);
    drop(client);
    // A clean stop puts everything on the backend; then the disk goes.
    assert!(n1.terminate().success());
    std::fs::remove_dir_all(&n1.data_dir).unwrap();
    std::fs::remove_dir_all(root.path().join("backend").join("v7")).unwrap();
    n1.launch();
    let info = n1.wait_for("v6", "v6 served again by n1", |v| v["state"] == "running");
    assert_eq!(info["owner"], "n1", "{info}");
    assert_eq!(info["last_failover"]["kind"], "unserved", "{info}");
    assert_eq!(info["last_failover"]["from"], "n1", "{info}");
    let mut client = NbdClient::connect(&n1.nbd, "v6").unwrap();
    let mut back = vec![0u8; data.len()];
    assert_eq!(client.read(1 << 20, &mut back).unwrap(), 0);
    assert_eq!(crc_of(&back), crc_of(&data), "v6's data after the adoption");
    assert!(n1.log_text().contains("nothing here does: adopting it"));

    let halted = n1.wait_for("v7", "v7 halted", |v| v["state"] == "halted");
    let reason = halted["halted_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("adoption by n1 failed") && reason.contains("does not exist"),
        "{halted}"
    );
    let deleted = n1.cli_ok(&["volume", "delete", "v7"]);
    assert_eq!(deleted.trim(), "deleted volume v7", "{deleted}");
    let out = n1.cli(&["volume", "info", "v7"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not exist"),
        "{err}"
    );
    Cluster::json(&n1, &["volume", "create", "v7", "--size", "16M"]);
    assert_eq!(n1.info("v7")["state"], "running");
}

#[test]
fn node_list_on_a_single_node_shows_that_node() {
    let root = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(root.path());
    daemon.create_volume("solo", "16M");
    let nodes = Cluster::node_list(&daemon);
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["name"], "local");
    assert_eq!(nodes[0]["alive"], true);
    assert_eq!(nodes[0]["volumes"], 1);
    assert_eq!(nodes[0]["api_addr"], daemon.api.as_str());
    assert_eq!(nodes[0]["nbd_addr"], daemon.nbd.as_str());
    assert_eq!(daemon.info("solo")["owner"], "local");
    let text = daemon.cli_ok(&["node", "list"]);
    assert!(text.contains("local") && text.contains("yes"), "{text}");
}

/// The NBD `host:port` of a volume's owner, as a node's `volume info` gives it.
fn nbd_addr_of(info: &Value, volume: &str) -> String {
    info["nbd_uri"]
        .as_str()
        .unwrap_or_else(|| panic!("no nbd_uri for {volume}: {info}"))
        .trim_start_matches("nbd://")
        .trim_end_matches(&format!("/{volume}"))
        .to_string()
}

#[test]
fn clones_are_made_by_the_parents_owner_recorded_and_fail_over() {
    let mut cluster = Cluster::start();
    let (n1, n3) = (cluster.node("n1"), cluster.node("n3"));
    Cluster::json(
        n1,
        &["volume", "create", "base", "--size", "16M", "--node", "n2"],
    );
    let info = n1.wait_for("base", "base's DTL in sync", |v| {
        v["dtl_state"] == "ok_sync"
    });
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    {
        let mut client = NbdClient::connect(&nbd_addr_of(&info, "base"), "base").unwrap();
        assert_eq!(client.write(0, &data, false).unwrap(), 0);
        assert_eq!(client.flush().unwrap(), 0);
    }
    // Snapshot and clone asked on n3: both run on n2, the parent's owner.
    n3.cli_ok(&["snapshot", "create", "base", "gold"]);
    let clone = Cluster::json(n3, &["clone", "create", "c1", "--from", "base@gold"]);
    assert_eq!(clone["owner"], "n2", "{clone}");
    assert_eq!(clone["cloned_from"], "base@gold", "{clone}");
    // Recorded in the registry: every node lists it with its owner.
    for daemon in &cluster.nodes {
        let list = Cluster::json(daemon, &["volume", "list"]);
        assert_eq!(
            find(list.as_array().unwrap(), "c1")["owner"],
            "n2",
            "{list}"
        );
    }
    let read_clone = |daemon: &Daemon| {
        let info = daemon.info("c1");
        let mut client = NbdClient::connect(&nbd_addr_of(&info, "c1"), "c1").unwrap();
        let mut back = vec![0u8; data.len()];
        assert_eq!(client.read(0, &mut back).unwrap(), 0);
        (info["owner"].as_str().unwrap().to_string(), crc_of(&back))
    };
    assert_eq!(read_clone(n1), ("n2".to_string(), crc_of(&data)));
    // A duplicate clone name is refused on any node.
    let out = n1.cli(&["clone", "create", "c1", "--from", "base@gold"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );

    // The owner dies: the clone fails over like any volume and still reads its parent's data.
    cluster.nodes[1].kill9();
    let n1 = cluster.node("n1");
    // While a survivor adopts it, `volume info` answers "being taken over" (503): poll.
    let deadline = Instant::now() + TTL + Duration::from_secs(20);
    loop {
        let out = n1.cli(&["volume", "info", "c1", "--json"]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["state"] == "running" && (v["owner"] == "n1" || v["owner"] == "n3") {
                break;
            }
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("c1"), "{err}");
        }
        assert!(Instant::now() < deadline, "c1 not adopted: {out:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (owner, crc) = read_clone(n1);
    assert!(owner == "n1" || owner == "n3", "{owner}");
    assert_eq!(crc, crc_of(&data));
}

/// A clone deleted on a node that does not serve its parent (it moved) cannot take itself off
/// the parent's snapshot there. The parent's node finds that out when the entry is in the way:
/// its snapshot and volume deletes drop entries of clones that no longer exist, and still
/// refuse for clones that do.
#[test]
fn a_parent_forgets_clones_deleted_on_another_node() {
    let cluster = Cluster::start();
    let n1 = cluster.node("n1");
    Cluster::json(
        n1,
        &["volume", "create", "base", "--size", "16M", "--node", "n2"],
    );
    for snapshot in ["gold", "silver"] {
        n1.cli_ok(&["snapshot", "create", "base", snapshot]);
    }
    for (clone, from) in [("c1", "base@gold"), ("c2", "base@silver")] {
        let made = Cluster::json(n1, &["clone", "create", clone, "--from", from]);
        assert_eq!(made["owner"], "n2", "{made}");
        n1.cli_ok(&["volume", "move", clone, "--to", "n3"]);
        assert_eq!(n1.info(clone)["owner"], "n3");
    }
    let refused = |args: &[&str], want: &str| {
        let out = n1.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("has clones") && err.contains(want),
            "{args:?}: {err}"
        );
    };
    // Clones that exist keep their parent.
    refused(&["volume", "delete", "base"], "c1, c2");

    n1.cli_ok(&["volume", "delete", "c1"]);
    n1.cli_ok(&["snapshot", "delete", "base", "gold"]);
    refused(&["volume", "delete", "base"], "c2");
    n1.cli_ok(&["volume", "delete", "c2"]);
    let deleted = n1.cli_ok(&["volume", "delete", "base"]);
    assert!(deleted.starts_with("deleted volume base"), "{deleted}");
    let backend = cluster.root.path().join("backend");
    for name in ["base", "c1", "c2"] {
        assert!(!backend.join(name).exists(), "{name}'s namespace is left");
        let out = n1.cli(&["volume", "info", name]);
        assert!(!out.status.success(), "{name} still exists");
    }
}

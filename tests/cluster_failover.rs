//! Cluster failover as processes: a real etcd on loopback, three `vstor serve` nodes on one
//! shared backend directory, crash-oracle writers over NBD (`common::oracle`).
//!
//! - The owner of a sync-DTL volume is killed (`kill -9`) under load: another node adopts it
//!   by itself and every acknowledged write reads back there (10 rounds).
//! - The DTL node is killed: the owner re-places the DTL and is back to `ok_sync` by itself.
//! - etcd is killed and restarted under load: no I/O error, ownership unchanged.
//! - `vstor volume move` under load: no acknowledged write lost, the clients reconnect to the
//!   printed address.
//! - A DTL node that was down while its volume's DTL moved away, or while the volume was
//!   deleted, removes the entries it kept once it is back (the leftover sweep).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::netns::NetNs;
use common::oracle::{self, stop_writers, wait_progress, Load, Mode};
use common::{block_content, Daemon, NbdClient, TestBackend, Thaw};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const VOLUME: &str = "vol";
const NODES: usize = 3;

struct Cluster {
    _tmp: tempfile::TempDir,
    etcd: Etcd,
    nodes: Vec<Daemon>,
}

impl Cluster {
    fn start() -> Self {
        Self::start_with(|_| Vec::new())
    }

    /// Like [`start`](Self::start), each node's DTL on a fixed port, so that a node restarted
    /// after `kill -9` serves its DTL where its volumes' configurations say it is.
    fn start_with_fixed_dtl_ports() -> Self {
        Self::start_with(|_| {
            vec![
                "--dtl-listen".to_string(),
                format!("127.0.0.1:{}", vstor_backend::testing::free_port()),
            ]
        })
    }

    fn start_with(extra: impl Fn(usize) -> Vec<String>) -> Self {
        Self::start_with_settings(extra, None)
    }

    /// Like [`start_with`](Self::start_with), with the cluster settings (`/vstor/settings`)
    /// `settings` in etcd before the nodes start.
    fn start_with_settings(extra: impl Fn(usize) -> Vec<String>, settings: Option<&str>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("etcd")).unwrap();
        let etcd = Etcd::start(&tmp.path().join("etcd"));
        if let Some(settings) = settings {
            etcd.put("/vstor/settings", settings);
        }
        let backend = TestBackend::Dir(tmp.path().join("backend"));
        let nodes = (0..NODES)
            .map(|i| {
                let extra = extra(i);
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                common::start_cluster_node(
                    tmp.path(),
                    &etcd.url(),
                    &backend,
                    &format!("n{i}"),
                    "d1",
                    &extra,
                )
            })
            .collect();
        Self {
            _tmp: tmp,
            etcd,
            nodes,
        }
    }

    /// Wait until every node's self-fencing monitor knows all its peers (so an etcd outage
    /// finds them to ask).
    fn wait_peers_known(&self) {
        wait_peers_known(&self.nodes);
    }

    fn index(&self, name: &str) -> usize {
        index(name)
    }

    /// The node holding the DTL of the volume `info` describes (asking node `via` for the
    /// node list when `info` is the owner's local view, which names only the address).
    fn dtl_node(&self, via: usize, info: &serde_json::Value) -> String {
        info["dtl_node"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                // Local view: find the node whose DTL address the volume uses.
                let nodes = json(&self.nodes[via].cli_ok(&["node", "list", "--json"]));
                nodes.as_array().and_then(|list| {
                    list.iter()
                        .find(|n| n["dtl_addr"] == info["dtl_addr"])
                        .and_then(|n| n["name"].as_str().map(str::to_string))
                })
            })
            .expect("the volume has a DTL node")
    }

    /// Create the test volume on node `n0`, sync DTL, small SCOs and write buffer so TLogs reach
    /// the backend (and trim the DTL) every few MiB.
    fn create_volume(&self) -> serde_json::Value {
        self.nodes[0].cli_ok(&common::SYNC_DTL_VOLUME_ON_N0);
        wait_info(
            &self.nodes[0],
            "the new volume's DTL link",
            Duration::from_secs(30),
            |i| i["dtl_state"] == "ok_sync" && i["owner"] == "n0",
        )
    }
}

fn wait_peers_known(nodes: &[Daemon]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in nodes {
        loop {
            let health = http_get(&node.api, "/v1/health");
            if health["peers"].as_array().map(Vec::len) == Some(nodes.len() - 1) {
                break;
            }
            assert!(Instant::now() < deadline, "peers not known: {health}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn index(name: &str) -> usize {
    name.strip_prefix('n')
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("not a node name: {name}"))
}

/// GET `path` from the API at `addr` (HTTP/1.1 by hand: the tests have no HTTP client).
fn http_get(addr: &str, path: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    json(body.trim())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn try_info(node: &Daemon) -> Option<serde_json::Value> {
    let out = node.cli(&["volume", "info", VOLUME, "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Poll the volume's info through `node` until `ready` holds.
fn wait_info(
    node: &Daemon,
    what: &str,
    timeout: Duration,
    ready: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    try_wait_info(node, what, timeout, ready).unwrap_or_else(|e| panic!("{e}"))
}

/// [`wait_info`], saying on a timeout what it waited for and the last info seen.
fn try_wait_info(
    node: &Daemon,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(info) = try_info(node) {
            if ready(&info) {
                return Ok(info);
            }
            last = Some(info);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}: {last:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last lines of every node's log, for a failure report.
fn log_tails(nodes: &[Daemon]) -> String {
    let mut out = String::new();
    for (i, node) in nodes.iter().enumerate() {
        let text = node.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(80)..];
        out.push_str(&format!("--- n{i} log (last {} lines) ---\n", tail.len()));
        for line in tail {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn writers_end_with_errors(
    writers: Vec<std::thread::JoinHandle<Result<u64, String>>>,
    context: &str,
) {
    for w in writers {
        assert!(
            w.join().expect("writer panicked").is_err(),
            "{context}: writer ended without an error"
        );
    }
}

const ROUNDS: u64 = 10;

#[test]
fn owner_killed_under_load_fails_over_without_losing_a_write() {
    let mut cluster = Cluster::start();
    let info = cluster.create_volume();
    let mut owner_tag = info["owner_tag"].as_u64().expect("owner_tag");
    let load = Load::new();
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let context = format!("round {round}");
        let any = &cluster.nodes[(round as usize) % NODES];
        let info = try_wait_info(
            any,
            &format!("{context}: volume serving"),
            Duration::from_secs(30),
            |i| i["state"] == "running" && i["dtl_state"] == "ok_sync",
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&cluster.nodes)));
        let owner = info["owner"].as_str().expect("owner").to_string();
        let owner_idx = cluster.index(&owner);
        let writers =
            oracle::start_writers(&cluster.nodes[owner_idx].nbd, VOLUME, Mode::Sync, &load);
        let target = 300 + (round * 719) % 3000;
        wait_progress(&load, &writers, target, &context);
        let killed = Instant::now();
        cluster.nodes[owner_idx].kill9();
        writers_end_with_errors(writers, &context);

        let survivor = &cluster.nodes[(owner_idx + 1) % NODES];
        let adopted = try_wait_info(
            survivor,
            &format!("{context}: adoption"),
            Duration::from_secs(30),
            |i| {
                i["owner"] != owner.as_str()
                    && i["state"] == "running"
                    && !i["last_failover"].is_null()
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&cluster.nodes)));
        let took = killed.elapsed();
        times.push(took);
        let new_owner = adopted["owner"].as_str().expect("owner").to_string();
        let tag = adopted["owner_tag"].as_u64().expect("owner_tag");
        assert!(
            tag > owner_tag,
            "{context}: owner tag {tag} after {owner_tag}"
        );
        owner_tag = tag;
        let failover = &adopted["last_failover"];
        assert_eq!(failover["from"], owner.as_str(), "{context}: {adopted}");
        assert_eq!(failover["to"], new_owner.as_str(), "{context}: {adopted}");
        let new_idx = cluster.index(&new_owner);
        let written = oracle::verify(&cluster.nodes[new_idx].nbd, VOLUME, &load, &context);
        assert!(written > 0, "{context}: nothing written");
        // The killed node comes back (same data directory): it must not serve the volume.
        cluster.nodes[owner_idx].launch();
        let back = &cluster.nodes[owner_idx];
        try_wait_info(
            back,
            &format!("{context}: the old owner forwards to the new one"),
            Duration::from_secs(30),
            |i| i["owner"] == new_owner.as_str(),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&cluster.nodes)));
        eprintln!("{context}: {owner} killed, {new_owner} serving after {took:?}");
    }
    times.sort();
    eprintln!(
        "failover (kill -9 to serving on the new owner) over {ROUNDS} rounds: p50 {:?}, max {:?}",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    // Detection within the lease TTL (5 s) plus adoption within 2 s, with slack for a loaded
    // machine.
    assert!(
        times[times.len() / 2] < Duration::from_secs(10),
        "median failover took {:?}",
        times[times.len() / 2]
    );
}

#[test]
fn dtl_node_killed_is_replaced_and_back_to_ok_sync() {
    let mut cluster = Cluster::start();
    let info = cluster.create_volume();
    let dtl_node = cluster.dtl_node(0, &info);
    assert_ne!(dtl_node, "n0");
    let old_addr = info["dtl_addr"].as_str().expect("dtl_addr").to_string();
    let load = Load::new();
    let writers = oracle::start_writers(&cluster.nodes[0].nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 300, "before the DTL node dies");
    let idx = cluster.index(&dtl_node);
    let killed = Instant::now();
    cluster.nodes[idx].kill9();
    let healed = wait_dtl_replaced(&cluster.nodes[0], &old_addr);
    eprintln!(
        "DTL node {dtl_node} killed: ok_sync on {} after {:?}",
        healed["dtl_addr"],
        killed.elapsed()
    );
    // Writes went on, and keep going in sync with the new DTL.
    let before = load.progress.load(std::sync::atomic::Ordering::SeqCst);
    wait_progress(&load, &writers, before + 200, "after the DTL moved");
    stop_writers(&load, writers);
    oracle::verify(
        &cluster.nodes[0].nbd,
        VOLUME,
        &load,
        "after DTL re-placement",
    );
    // The re-placed DTL really holds the writes: kill the owner and the adopter replays them.
    let writers = oracle::start_writers(&cluster.nodes[0].nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 300, "before the owner dies");
    cluster.nodes[0].kill9();
    writers_end_with_errors(writers, "owner killed after DTL re-placement");
    let survivor = cluster
        .nodes
        .iter()
        .enumerate()
        .find(|(i, _)| *i != 0 && *i != idx)
        .map(|(_, d)| d)
        .unwrap();
    let adopted = wait_info(survivor, "adoption", Duration::from_secs(30), |i| {
        i["owner"] != "n0" && i["state"] == "running"
    });
    let new_owner = cluster.index(adopted["owner"].as_str().unwrap());
    oracle::verify(
        &cluster.nodes[new_owner].nbd,
        VOLUME,
        &load,
        "after the owner died too",
    );
}

/// The survivor that is not the DTL node is frozen with SIGSTOP when the owner dies, long
/// enough for its lease to run out too: the DTL node, the only live node left, adopts the
/// volume, replays its own DTL and loses no acknowledged write. A DTL on the owner itself
/// protects nothing, so it moves to the frozen node as soon as that one is back.
#[test]
fn the_dtl_node_adopts_when_the_planned_adopter_is_frozen() {
    let mut cluster = Cluster::start();
    let info = cluster.create_volume();
    let dtl_node = cluster.dtl_node(0, &info);
    let dtl_idx = cluster.index(&dtl_node);
    let frozen_idx = (1..NODES).find(|i| *i != dtl_idx).unwrap();
    let load = Load::new();
    let writers = oracle::start_writers(&cluster.nodes[0].nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 500, "before the owner dies");
    let frozen = cluster.nodes[frozen_idx].pid();
    kill(frozen, Signal::SIGSTOP).unwrap();
    let _thaw = Thaw(frozen);
    cluster.nodes[0].kill9();
    writers_end_with_errors(writers, "owner killed");
    let adopted = try_wait_info(
        &cluster.nodes[dtl_idx],
        "adoption by the DTL node",
        Duration::from_secs(30),
        |i| i["owner"] == dtl_node.as_str() && i["state"] == "running",
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&cluster.nodes)));
    assert_eq!(adopted["last_failover"]["from"], "n0", "{adopted}");
    oracle::verify(
        &cluster.nodes[dtl_idx].nbd,
        VOLUME,
        &load,
        "after the DTL node adopted",
    );
    // The frozen node comes back; the volume's DTL must not stay on its own owner.
    kill(frozen, Signal::SIGCONT).unwrap();
    let frozen_name = format!("n{frozen_idx}");
    let healed = try_wait_info(
        &cluster.nodes[dtl_idx],
        "the DTL moved off the owner",
        Duration::from_secs(30),
        |i| i["dtl_state"] == "ok_sync" && cluster.dtl_node(dtl_idx, i) == frozen_name,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&cluster.nodes)));
    eprintln!("DTL re-placed: {healed}");
    let writers = oracle::start_writers(&cluster.nodes[dtl_idx].nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 300, "after the DTL moved");
    stop_writers(&load, writers);
    oracle::verify(
        &cluster.nodes[dtl_idx].nbd,
        VOLUME,
        &load,
        "after writing with the new DTL",
    );
}

/// The DTL the adopter must replay is corrupt on disk: the adopter tries three times, then
/// records the volume halted with the reason, and `volume info` says so through every node
/// (not "being taken over, retry in a moment" forever). The operator then gives up on the
/// volume: `volume delete` removes it, its backend data and its DTL entries, and frees the name.
#[test]
fn an_adoption_that_cannot_read_the_dtl_halts_the_volume_says_why_and_it_can_be_deleted() {
    let mut cluster = Cluster::start();
    let info = cluster.create_volume();
    let dtl_idx = cluster.index(&cluster.dtl_node(0, &info));
    let adopter = (1..NODES).find(|i| *i != dtl_idx).unwrap();
    let load = Load::new();
    let writers = oracle::start_writers(&cluster.nodes[0].nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 300, "before the owner dies");
    cluster.nodes[0].kill9();
    writers_end_with_errors(writers, "owner killed");
    // Within the lease TTL, before anyone adopts: flip a byte of every entry's data.
    let dir = cluster.nodes[dtl_idx].data_dir.join("dtl").join(VOLUME);
    let mut corrupted = 0;
    for segment in std::fs::read_dir(&dir).unwrap() {
        let path = segment.unwrap().path();
        if path.extension().is_none_or(|e| e != "seg") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let mut at = 20 + 28;
        while at < bytes.len() {
            bytes[at] ^= 0xff;
            corrupted += 1;
            at += 28 + 4096;
        }
        std::fs::write(&path, &bytes).unwrap();
    }
    assert!(corrupted > 0, "no DTL entries in {}", dir.display());
    let adopter_name = format!("n{adopter}");
    for via in [adopter, dtl_idx] {
        let halted = try_wait_info(
            &cluster.nodes[via],
            "the volume halted by its adopter",
            Duration::from_secs(30),
            |i| i["state"] == "halted",
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&cluster.nodes)));
        assert_eq!(halted["owner"], adopter_name.as_str(), "{halted}");
        assert!(halted["nbd_uri"].is_null(), "served nowhere: {halted}");
        let reason = halted["halted_reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(&format!("adoption by {adopter_name} failed"))
                && reason.contains("SCO"),
            "{halted}"
        );
    }
    let log = cluster.nodes[adopter].log_text();
    assert_eq!(
        log.matches("adoption failed; retrying").count(),
        2,
        "three attempts expected:\n{log}"
    );
    // Nobody serves it with acknowledged writes missing.
    assert!(NbdClient::connect(&cluster.nodes[adopter].nbd, VOLUME).is_err());

    // Deleted through the DTL node, which sends the request on to the adopter the record names.
    let backend_ns = cluster._tmp.path().join("backend").join(VOLUME);
    assert!(backend_ns.is_dir(), "{} missing", backend_ns.display());
    let deleted = cluster.nodes[dtl_idx].cli_ok(&["volume", "delete", VOLUME]);
    assert_eq!(
        deleted.trim(),
        format!("deleted volume {VOLUME}"),
        "{deleted}"
    );
    for via in [adopter, dtl_idx] {
        let out = cluster.nodes[via].cli(&["volume", "info", VOLUME]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("does not exist"),
            "volume info through n{via} after the delete: {err}"
        );
        let list = json(&cluster.nodes[via].cli_ok(&["volume", "list", "--json"]));
        assert!(
            list.as_array().unwrap().iter().all(|v| v["name"] != VOLUME),
            "{list}"
        );
    }
    assert!(!backend_ns.exists(), "backend namespace left behind");
    assert!(
        !dir.exists(),
        "DTL entries left behind in {}",
        dir.display()
    );
    // The name is free again, for a volume with nothing of the old one in it.
    cluster.nodes[adopter].cli_ok(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "64M",
        "--node",
        &adopter_name,
    ]);
    let mut client = NbdClient::connect(&cluster.nodes[adopter].nbd, VOLUME).unwrap();
    let mut head = vec![0xa5u8; 1 << 20];
    assert_eq!(client.read(0, &mut head).unwrap(), 0);
    assert!(
        head.iter().all(|b| *b == 0),
        "the new volume shows old data"
    );
}

/// Write `writes` times to the volume on n0, then kill n0 and the volume's DTL node: the
/// survivor records the volume halted. Returns the writes, the DTL node, the survivor and the
/// owner the halted record names: n0 if the survivor saw both leases gone at once, the
/// survivor itself if the DTL node's lease outlived n0's (up to a keepalive) so that it took
/// the volume and found the DTL dead. The reason says the DTL node is gone either way.
fn halt_by_a_double_failure(
    cluster: &mut Cluster,
    writes: u64,
) -> (Arc<Load>, usize, usize, String) {
    let info = cluster.create_volume();
    let dtl_idx = cluster.index(&cluster.dtl_node(0, &info));
    let load = Load::new();
    let writers = oracle::start_writers(&cluster.nodes[0].nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, writes, "before the double failure");
    stop_writers(&load, writers);
    cluster.nodes[dtl_idx].kill9();
    cluster.nodes[0].kill9();
    let survivor = (1..NODES).find(|i| *i != dtl_idx).unwrap();
    let halted = try_wait_info(
        &cluster.nodes[survivor],
        "the volume halted",
        Duration::from_secs(30),
        |i| i["state"] == "halted",
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&cluster.nodes)));
    let owner = halted["owner"].as_str().unwrap_or_default().to_string();
    assert!(owner == "n0" || owner == format!("n{survivor}"), "{halted}");
    let reason = halted["halted_reason"].as_str().unwrap_or_default();
    let dtl_name = format!("n{dtl_idx}");
    assert!(
        reason.contains(&format!("DTL node {dtl_name}")) && reason.contains("may be lost"),
        "{halted}"
    );
    (load, dtl_idx, survivor, owner)
}

/// The owner and the DTL node die together and nobody intervenes: the volume halts, and when
/// the DTL node is restarted a survivor adopts the volume on its own and loses nothing.
#[test]
fn a_volume_halted_by_a_dead_dtl_node_is_served_again_when_it_comes_back() {
    let mut cluster = Cluster::start_with_fixed_dtl_ports();
    let (load, dtl_idx, survivor, halted_owner) = halt_by_a_double_failure(&mut cluster, 300);
    cluster.nodes[dtl_idx].launch();
    let served = try_wait_info(
        &cluster.nodes[survivor],
        "served again",
        Duration::from_secs(30),
        |i| i["state"] == "running",
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&cluster.nodes)));
    assert_eq!(served["last_failover"]["kind"], "dtl-back", "{served}");
    assert_eq!(
        served["last_failover"]["from"],
        halted_owner.as_str(),
        "{served}"
    );
    let owner = cluster.index(served["owner"].as_str().expect("owner"));
    assert_ne!(owner, 0, "{served}");
    oracle::verify(
        &cluster.nodes[owner].nbd,
        VOLUME,
        &load,
        "after the DTL node came back",
    );
    // The same through a real client.
    let written = oracle::verify_with_qemu_img(
        &cluster.nodes[owner].uri(VOLUME),
        cluster._tmp.path(),
        &load,
        "qemu-img's copy after the DTL node came back",
    );
    assert!(written > 0, "nothing written");
}

/// The owner and the DTL node die together and the operator gives the volume up: `volume
/// delete` through the survivor removes the volume recorded halted on the dead owner at once,
/// with no `volume adopt` first, and says what it could not remove (the dead DTL node's copy).
#[test]
fn a_volume_halted_on_a_dead_node_is_deleted_through_a_survivor() {
    let mut cluster = Cluster::start();
    let (_, _, survivor, _) = halt_by_a_double_failure(&mut cluster, 100);
    let backend_ns = cluster._tmp.path().join("backend").join(VOLUME);
    assert!(backend_ns.is_dir(), "{} missing", backend_ns.display());

    let deleted = cluster.nodes[survivor].cli_ok(&["volume", "delete", VOLUME]);
    let mut lines = deleted.lines();
    assert_eq!(
        lines.next(),
        Some(format!("deleted volume {VOLUME}").as_str()),
        "{deleted}"
    );
    let warning = lines.next().unwrap_or_default();
    assert!(
        warning.starts_with("warning: could not remove its DTL entries"),
        "the dead DTL node's copy is reported: {deleted}"
    );
    let out = cluster.nodes[survivor].cli(&["volume", "info", VOLUME]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not exist"),
        "volume info after the delete: {err}"
    );
    let list = json(&cluster.nodes[survivor].cli_ok(&["volume", "list", "--json"]));
    assert!(
        list.as_array().unwrap().iter().all(|v| v["name"] != VOLUME),
        "{list}"
    );
    assert!(!backend_ns.exists(), "backend namespace left behind");
}

/// A node restarted while etcd stalls (a disk that holds its fsyncs, a leader election) is not
/// failed by a registry call that times out: it tries again and joins once etcd answers.
#[test]
fn a_node_restarting_while_etcd_stalls_joins_once_it_answers() {
    let mut cluster = Cluster::start();
    let info = cluster.create_volume();
    let tag = info["owner_tag"].as_u64().expect("owner_tag");
    let dtl_idx = cluster.index(&cluster.dtl_node(0, &info));
    let restarted = (1..NODES).find(|i| *i != dtl_idx).unwrap();
    cluster.nodes[restarted].kill9();
    // The restarted node first waits for its killed run's lease to expire; etcd is stopped
    // then, and woken only once the node has seen a registry call time out.
    let log = cluster.nodes[restarted].log.clone();
    let from = std::fs::metadata(&log).map_or(0, |m| m.len());
    let etcd = Pid::from_raw(i32::try_from(cluster.etcd.pid()).unwrap());
    let staller = std::thread::spawn(move || {
        let _thaw = Thaw(etcd);
        if !wait_log(&log, from, "waiting for the previous registration") {
            return Err("the node never waited for its previous registration");
        }
        kill(etcd, Signal::SIGSTOP).unwrap();
        if !wait_log(&log, from, "registering the node failed; retrying") {
            return Err("the node never saw the stalled registry time out");
        }
        Ok(())
    });
    cluster.nodes[restarted].launch();
    staller
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}; node log:\n{}", cluster.nodes[restarted].log_text()));
    let seen = wait_info(
        &cluster.nodes[restarted],
        "volume info through the restarted node",
        Duration::from_secs(30),
        |i| i["owner"] == "n0" && i["state"] == "running",
    );
    assert_eq!(seen["owner_tag"].as_u64(), Some(tag), "no failover: {seen}");
    let nodes = json(&cluster.nodes[restarted].cli_ok(&["node", "list", "--json"]));
    let me = format!("n{restarted}");
    let listed = nodes
        .as_array()
        .and_then(|list| list.iter().find(|n| n["name"] == me.as_str()))
        .unwrap_or_else(|| panic!("{me} not listed: {nodes}"));
    assert_eq!(
        listed["api_addr"],
        cluster.nodes[restarted].api.as_str(),
        "registered with its new run's address: {listed}"
    );
}

/// Whether `needle` appears in `log` after byte `from` within 30 s (polled: the log is the
/// only event a daemon's start gives).
fn wait_log(log: &std::path::Path, from: u64, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let text = std::fs::read(log).unwrap_or_default();
        let tail = text
            .get(usize::try_from(from).unwrap_or(0)..)
            .unwrap_or_default();
        if String::from_utf8_lossy(tail).contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn etcd_killed_and_restarted_under_load_changes_nothing() {
    let mut cluster = Cluster::start();
    let info = cluster.create_volume();
    let tag = info["owner_tag"].as_u64().unwrap();
    cluster.wait_peers_known();
    let load = Load::new();
    let writers = oracle::start_writers(&cluster.nodes[0].nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 300, "before etcd dies");
    cluster.etcd.kill9();
    // Longer than the lease TTL (5 s): every node notices, none may stop serving or take over.
    let until = Instant::now() + Duration::from_secs(7);
    let mut progress = load.progress.load(std::sync::atomic::Ordering::SeqCst);
    while Instant::now() < until {
        if let Some(i) = writers
            .iter()
            .position(std::thread::JoinHandle::is_finished)
        {
            let ended = writers.into_iter().nth(i).unwrap().join().unwrap();
            panic!(
                "a writer stopped while etcd was down: {ended:?}; node log:\n{}",
                cluster.nodes[0].log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        load.progress.load(std::sync::atomic::Ordering::SeqCst) > progress + 100,
        "writes stalled while etcd was down"
    );
    progress = load.progress.load(std::sync::atomic::Ordering::SeqCst);
    cluster.etcd.restart();
    wait_progress(&load, &writers, progress + 300, "after etcd is back");
    stop_writers(&load, writers);
    let after = wait_info(
        &cluster.nodes[1],
        "volume info through another node",
        Duration::from_secs(30),
        |i| i["owner"] == "n0",
    );
    assert_eq!(after["owner_tag"].as_u64(), Some(tag), "{after}");
    oracle::verify(&cluster.nodes[0].nbd, VOLUME, &load, "after etcd restarted");
    // Each node said once that its failover passes failed, and that they work again: a pass
    // runs every second, so one line per second would bury everything else.
    for node in &cluster.nodes {
        let back = wait_log(&node.log, 0, "failover passes work again");
        let log = node.log_text();
        let failing = log.matches("failover pass incomplete").count();
        assert!(
            back && (1..=3).contains(&failing),
            "{failing} warnings:\n{log}"
        );
    }
}

#[test]
fn move_under_load_loses_no_write_and_prints_the_new_address() {
    let cluster = Cluster::start();
    cluster.create_volume();
    let load = Load::new();
    let writers = oracle::start_writers(&cluster.nodes[0].nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 500, "before the move");
    // Asked on a node that is neither the owner nor the target: forwarded to the owner.
    let started = Instant::now();
    let out = cluster.nodes[1].cli(&["volume", "move", VOLUME, "--to", "n2"]);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "move failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let expected = format!("nbd://{}/{VOLUME}", cluster.nodes[2].nbd);
    assert_eq!(printed, expected);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("moving volume vol to n2"), "{stderr}");
    // The old owner's clients were disconnected; unacknowledged writes are allowed to be lost.
    writers_end_with_errors(writers, "move");
    let info = wait_info(&cluster.nodes[0], "moved", Duration::from_secs(10), |i| {
        i["owner"] == "n2"
    });
    assert_eq!(info["last_failover"]["kind"], "move", "{info}");
    eprintln!("move took {took:?}");
    // Clients reconnect to the printed address and go on.
    let addr = printed
        .strip_prefix("nbd://")
        .and_then(|r| r.strip_suffix(&format!("/{VOLUME}")))
        .unwrap();
    oracle::verify(addr, VOLUME, &load, "right after the move");
    let writers = oracle::start_writers(addr, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 300, "after the move");
    stop_writers(&load, writers);
    oracle::verify(addr, VOLUME, &load, "after writing on the new owner");
    // Clear errors.
    for (args, needle) in [
        (vec!["--to", "n2"], "already its owner"),
        (vec!["--to", "nope"], "no node nope"),
    ] {
        let mut full = vec!["volume", "move", VOLUME];
        full.extend(args);
        let out = cluster.nodes[0].cli(&full);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{full:?}: {stderr}");
    }
}

/// Three nodes in their own network namespaces (so one can be cut off), the sync-DTL test volume
/// on n0 with its DTL in sync, and some acknowledged writes in it. Dropped in field order:
/// nodes, then etcd, then the namespaces.
struct NetCluster {
    nodes: Vec<Daemon>,
    _etcd: Etcd,
    net: NetNs,
    _tmp: tempfile::TempDir,
    load: Arc<Load>,
}

fn net_cluster() -> NetCluster {
    let net = NetNs::new(NODES);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("etcd")).unwrap();
    let etcd = Etcd::start_also_on(&tmp.path().join("etcd"), Some(net.host_ip()));
    let backend = TestBackend::Dir(tmp.path().join("backend"));
    let registry = etcd.url_on(net.host_ip());
    let nodes: Vec<Daemon> = (0..NODES)
        .map(|i| {
            let dir = tmp.path().join(format!("n{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let name = format!("n{i}");
            Daemon::start_in_netns(
                &dir,
                &backend,
                &["--registry", &registry, "--node", &name, "--domain", "d1"],
                &net.ns(i),
                net.ip(i),
            )
        })
        .collect();
    nodes[0].cli_ok(&common::SYNC_DTL_VOLUME_ON_N0);
    wait_info(
        &nodes[0],
        "the new volume's DTL link",
        Duration::from_secs(30),
        |i| i["dtl_state"] == "ok_sync",
    );
    wait_peers_known(&nodes);
    let load = Load::new();
    let writers = oracle::start_writers(&nodes[0].nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 500, "before the partition");
    stop_writers(&load, writers);
    NetCluster {
        nodes,
        _etcd: etcd,
        net,
        _tmp: tmp,
        load,
    }
}

/// The survivor that serves the test volume once n0 is cut off, asked of the survivors' own
/// volume lists (a request forwarded to the cut-off owner would wait for TCP to give up).
fn survivor_serving(nodes: &[Daemon]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let serving = nodes[1..].iter().find_map(|node| {
            let out = node.cli(&["volume", "list", "--json"]);
            let list = json(&String::from_utf8_lossy(&out.stdout));
            list.as_array()?
                .iter()
                .find(|v| v["name"] == VOLUME && v["state"] == "running" && v["owner"] != "n0")
                .and_then(|v| v["owner"].as_str().map(str::to_string))
        });
        if let Some(owner) = serving {
            return owner;
        }
        assert!(
            Instant::now() < deadline,
            "nobody adopted the volume; n1 log:\n{}",
            nodes[1].log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn partitioned_owner_stops_acknowledging_and_learns_the_volume_moved() {
    let cluster = net_cluster();
    let (nodes, net, load) = (&cluster.nodes, &cluster.net, &cluster.load);
    net.link_down(0);
    let cut = Instant::now();
    // n0 stops acknowledging: a client on n0 itself sees its writes fail (EIO) once the node
    // fenced itself, before its lease can expire anywhere.
    let nbd = nodes[0].nbd.clone();
    let local = load.clone();
    let refused_after = net.run_in(0, move || {
        let mut client = NbdClient::connect(&nbd, VOLUME).expect("connect on n0");
        let deadline = Instant::now() + Duration::from_secs(15);
        let block = 100;
        loop {
            let seq = local.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            local.oracle.lock().unwrap().issue(block, seq);
            match client.write(block * 4096, &block_content(block, seq, 4096), false) {
                Ok(0) => local.oracle.lock().unwrap().commit(block, seq),
                Ok(5) => return Some(Instant::now()),
                other => panic!("unexpected write result {other:?}"),
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let refused_after = refused_after.expect("n0 kept acknowledging writes while cut off") - cut;
    // The lease TTL is 5 s: the fence must come before it can expire elsewhere.
    assert!(
        refused_after < Duration::from_secs(5),
        "fenced only after {refused_after:?}"
    );

    let new_owner = survivor_serving(nodes);
    eprintln!(
        "partition: n0 fenced after {refused_after:?}, {new_owner} serving after {:?}",
        cut.elapsed()
    );
    oracle::verify(
        &nodes[index(&new_owner)].nbd,
        VOLUME,
        load,
        "after the partition",
    );

    net.link_up(0);
    // Back on the network, n0 learns the volume moved, drops it and says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = nodes[0].cli(&["volume", "list", "--json"]);
        let list = json(&String::from_utf8_lossy(&out.stdout));
        let moved = list.as_array().and_then(|l| {
            l.iter()
                .find(|v| v["name"] == VOLUME && v["state"] == "moved")
                .cloned()
        });
        if let Some(entry) = moved {
            assert_eq!(entry["moved_to"], new_owner.as_str(), "{entry}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n0 does not report the move: {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And it serves the volume no more: no export, no writes.
    assert!(NbdClient::connect(&nodes[0].nbd, VOLUME).is_err());
    oracle::verify(
        &nodes[index(&new_owner)].nbd,
        VOLUME,
        load,
        "after n0 came back",
    );
}

/// The owner is cut off, a survivor adopts the volume, and the operator deletes it there. Back
/// on the network, the old owner finds no record of the volume: it must not take that for a
/// volume the cluster never knew and serve it again (its writes would reach no backend, and
/// the name may be someone else's by then). It stays fenced and says why.
#[test]
fn a_volume_deleted_while_its_old_owner_was_cut_off_stays_fenced_there() {
    let cluster = net_cluster();
    let (nodes, net) = (&cluster.nodes, &cluster.net);
    net.link_down(0);
    let new_owner = survivor_serving(nodes);
    let deleted = nodes[index(&new_owner)].cli_ok(&["volume", "delete", VOLUME]);
    assert_eq!(
        deleted.trim(),
        format!("deleted volume {VOLUME}"),
        "{deleted}"
    );
    net.link_up(0);
    let entry = common::poll(
        "n0 keeping the deleted volume fenced",
        Duration::from_secs(30),
        || {
            let out = nodes[0].cli(&["volume", "list", "--json"]);
            let list = json(&String::from_utf8_lossy(&out.stdout));
            list.as_array()?
                .iter()
                .find(|v| {
                    v["name"] == VOLUME
                        && v["fenced"]
                            .as_str()
                            .is_some_and(|r| r.contains("deleted in the cluster"))
                })
                .cloned()
        },
    );
    assert_eq!(entry["state"], "fenced", "{entry}");
    assert!(
        entry["fenced"]
            .as_str()
            .is_some_and(|r| r.contains("backend namespace was deleted")),
        "{entry}"
    );
    // A client still on n0 gets its writes refused.
    let nbd = nodes[0].nbd.clone();
    let refused = net.run_in(0, move || {
        let mut client = NbdClient::connect(&nbd, VOLUME).expect("connect on n0");
        client.write(0, &[0x77u8; 4096], false)
    });
    assert_eq!(
        refused.unwrap(),
        5,
        "n0 acknowledged a write to a deleted volume"
    );
    // Nor can an operator there change it: what would write the backend (the name may be
    // another volume's by now, at the same owner tag) is refused as fenced.
    for args in [
        vec!["snapshot", "create", VOLUME, "after-the-delete"],
        vec!["volume", "resize", VOLUME, "--size", "128M"],
    ] {
        let out = nodes[0].cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("fenced"),
            "{args:?} on n0: {err}"
        );
    }
}

/// The owner and the DTL node die together: the volume halts with the reason. The operator
/// cannot adopt it while the DTL is gone (a clear error, still halted); once the DTL node is
/// back, the survivor whose adoption failed adopts it again on its own, replays its DTL and
/// every acknowledged write reads back.
#[test]
fn owner_and_dtl_node_both_killed_halts_the_volume_with_the_reason() {
    let mut cluster = Cluster::start_with_fixed_dtl_ports();
    let info = cluster.create_volume();
    let dtl_addr = info["dtl_addr"].as_str().expect("dtl_addr").to_string();
    let nodes = json(&cluster.nodes[0].cli_ok(&["node", "list", "--json"]));
    let dtl_name = nodes
        .as_array()
        .and_then(|l| l.iter().find(|n| n["dtl_addr"] == dtl_addr.as_str()))
        .and_then(|n| n["name"].as_str())
        .expect("the DTL node is listed")
        .to_string();
    let load = Load::new();
    let writers = oracle::start_writers(&cluster.nodes[0].nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 300, "before the double failure");
    // The writers stop first: a write acknowledged between the two kills would be acknowledged
    // by a degraded owner (its DTL just died) and exist on that owner only, which the DTL design
    // gives up with the owner. The DTL still holds the entries not yet on the backend.
    stop_writers(&load, writers);
    let dtl_idx = cluster.index(&dtl_name);
    cluster.nodes[dtl_idx].kill9();
    cluster.nodes[0].kill9();
    let survivor = (0..NODES).find(|i| *i != 0 && *i != dtl_idx).unwrap();
    let halted = wait_info(
        &cluster.nodes[survivor],
        "the volume halted",
        Duration::from_secs(30),
        |i| i["state"] == "halted",
    );
    // Two ways to find out, one story: the survivor's pass sees both leases gone (the record
    // keeps the dead owner), or the DTL node's lease outlived the owner's by up to a keepalive,
    // so the survivor took the volume, found the DTL dead and halted it as its owner.
    let reason = halted["halted_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("DTL node {dtl_name}"))
            && reason.contains("gone")
            && reason.contains("may be lost"),
        "{halted}"
    );
    let survivor_name = format!("n{survivor}");
    if halted["owner"] != "n0" {
        assert_eq!(halted["owner"], survivor_name.as_str(), "{halted}");
        assert!(
            reason.starts_with(&format!("adoption by {survivor_name} failed")),
            "{halted}"
        );
    }
    // Nobody serves it with writes missing.
    assert!(halted["nbd_uri"].is_null(), "{halted}");

    // The operator asks a survivor to adopt it while the DTL node is still down.
    let at = &cluster.nodes[survivor];
    let out = at.cli(&["volume", "adopt", VOLUME]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("adoption failed") && stderr.contains("DTL"),
        "{stderr}"
    );
    let info = try_info(at).expect("volume info after a failed adoption");
    assert_eq!(info["state"], "halted", "{info}");
    assert!(info["nbd_uri"].is_null(), "{info}");

    // The DTL node comes back with its entries: the node whose adoption failed (the record's
    // owner now) adopts the volume again on its own, and loses nothing.
    cluster.nodes[dtl_idx].launch();
    let at = &cluster.nodes[survivor];
    let served = try_wait_info(at, "served again", Duration::from_secs(30), |i| {
        i["state"] == "running"
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&cluster.nodes)));
    assert_eq!(served["owner"], survivor_name.as_str(), "{served}");
    assert_eq!(served["last_failover"]["kind"], "dtl-back", "{served}");
    assert!(
        served["last_failover"]["dtl_entries_replayed"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{served}"
    );
    oracle::verify(&at.nbd, VOLUME, &load, "after the DTL node came back");
    // Served: the operator's adopt on the owner is refused.
    let out = at.cli(&["volume", "adopt", VOLUME]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("volume move"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A volume with a live owner is moved, not adopted: asked elsewhere, the owner says so.
    let other = (0..NODES).find(|i| *i != survivor && *i != 0).unwrap();
    let out = cluster.nodes[other].cli(&["volume", "adopt", VOLUME]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains(&format!("served by node {survivor_name}"))
            && stderr.contains("volume move"),
        "{stderr}"
    );
    assert_eq!(
        try_info(at).expect("volume info")["owner"],
        survivor_name.as_str()
    );
}

/// Wait until the owner `owner` has its volume's DTL on another server than `old_addr`, in
/// sync (the owner re-places the DTL of a dead node by itself).
fn wait_dtl_replaced(owner: &Daemon, old_addr: &str) -> serde_json::Value {
    wait_info(
        owner,
        "DTL re-placed and in sync",
        Duration::from_secs(40),
        |i| i["dtl_state"] == "ok_sync" && i["dtl_addr"] != old_addr,
    )
}

/// Node `node`'s counter `name` (`_total` included) from its `/metrics`; 0 when absent.
fn node_counter(node: &Daemon, name: &str) -> u64 {
    common::metrics_text(&node.api)
        .lines()
        .find(|line| line.starts_with(&format!("{name}{{")))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

/// Restart `node` and wait until its sweep logs the removal of namespace `VOLUME` for `reason`
/// (the log line follows the removal, so the directory is gone by then).
fn restart_and_wait_swept(node: &mut Daemon, reason: &str) {
    let from = std::fs::metadata(&node.log).map_or(0, |m| m.len());
    node.launch();
    let needle = format!("removed a leftover DTL namespace namespace={VOLUME}");
    assert!(
        wait_log(&node.log, from, &needle),
        "never swept:\n{}",
        node.log_text()
    );
    let text = node.log_text();
    assert!(text[from as usize..].contains(reason), "{text}");
}

/// DTL entries a node kept while it was away are removed once it is back: first when the
/// volume's DTL was placed on another node meanwhile, then when the volume was deleted
/// meanwhile (the `Unregister` of either never reached it). A live volume's namespace stays
/// however long it is idle. The grace is 2 s here (cluster setting
/// `dtl_leftover_grace_secs`; 10 minutes by default).
#[test]
fn a_dtl_node_back_from_the_dead_sweeps_what_it_kept_of_moved_and_deleted_volumes() {
    let mut cluster =
        Cluster::start_with_settings(|_| Vec::new(), Some(r#"{"dtl_leftover_grace_secs":2}"#));
    let info = cluster.create_volume();
    let first = cluster.index(&cluster.dtl_node(0, &info));
    let dirs: Vec<_> = cluster.nodes.iter().map(|n| n.data_dir.clone()).collect();
    let namespace_on = |idx: usize| dirs[idx].join("dtl").join(VOLUME);
    common::run_ok(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        &cluster.nodes[0].uri(VOLUME),
        "-c",
        "write -P 0x5a 0 1M",
    ]));
    assert!(namespace_on(first).join("registration").is_file());

    // Idle for several graces, but the volume's DTL is here: kept.
    let sweeps = |node: &Daemon| node_counter(node, "vstor_dtl_leftover_sweeps_total");
    let from = sweeps(&cluster.nodes[first]);
    common::poll("four more sweeps", Duration::from_secs(30), || {
        (sweeps(&cluster.nodes[first]) >= from + 4).then_some(())
    });
    assert!(namespace_on(first).join("registration").is_file());
    assert_eq!(
        node_counter(&cluster.nodes[first], "vstor_dtl_leftovers_removed_total"),
        0
    );

    // The DTL node dies; the owner places the DTL on the third node.
    let old_addr = info["dtl_addr"].as_str().unwrap().to_string();
    cluster.nodes[first].kill9();
    let moved = wait_dtl_replaced(&cluster.nodes[0], &old_addr);
    let second = cluster.index(&cluster.dtl_node(0, &moved));
    assert!(second != first && second != 0);
    // Back: what it kept is a leftover now, the DTL being on the other node.
    assert!(namespace_on(first).is_dir(), "kept across the crash");
    restart_and_wait_swept(
        &mut cluster.nodes[first],
        &format!("the volume's DTL is on node n{second} now"),
    );
    assert!(!namespace_on(first).exists());
    assert!(namespace_on(second).join("registration").is_file());

    // The second DTL node dies too, and the volume is deleted while it is away.
    let second_addr = moved["dtl_addr"].as_str().unwrap().to_string();
    cluster.nodes[second].kill9();
    wait_dtl_replaced(&cluster.nodes[0], &second_addr);
    cluster.nodes[0].cli_ok(&["volume", "delete", VOLUME]);
    assert!(
        !namespace_on(first).exists(),
        "the delete unregistered the live DTL"
    );
    assert!(namespace_on(second).is_dir(), "kept across the crash");
    restart_and_wait_swept(
        &mut cluster.nodes[second],
        "the registry has no volume of that name",
    );
    assert!(!namespace_on(second).exists());
    assert_eq!(
        node_counter(&cluster.nodes[second], "vstor_dtl_leftovers_removed_total"),
        1
    );
}

/// Incarnations order creations whatever the nodes' clocks say. The DTL node holds entries of
/// a deleted volume "vol" created on a node whose clock ran an hour ahead (its registration
/// names that incarnation, and the cluster's incarnation floor in etcd says it was issued).
/// "vol" is created again on `n0`, whose clock is right, with its DTL on that node: its
/// incarnation is above the floor, so the DTL takes it for the newer volume (it drops the old
/// entries) instead of refusing it as an older copy, and the volume is in sync and writes.
#[test]
fn a_volume_created_again_is_newer_than_its_namesake_even_if_that_ones_clock_ran_ahead() {
    let mut cluster = Cluster::start();
    let dtl_idx = 1;
    // The deleted namesake's leftovers, written while the DTL node is stopped.
    cluster.nodes[dtl_idx].terminate();
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        + 3600 * 1_000_000_000;
    {
        let store =
            vstor_dtl::DtlStore::open(cluster.nodes[dtl_idx].data_dir.join("dtl"), true).unwrap();
        store.register(VOLUME, 4096, 2, ahead).unwrap();
    }
    cluster.etcd.put("/vstor/incarnation", &ahead.to_string());
    cluster.nodes[dtl_idx].launch();
    let nodes = json(&cluster.nodes[0].cli_ok(&["node", "list", "--json"]));
    let dtl_addr = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "n1" && n["alive"] == true)
        .and_then(|n| n["dtl_addr"].as_str())
        .unwrap_or_else(|| panic!("n1 is not alive with a DTL: {nodes}"))
        .to_string();

    cluster.nodes[0].cli_ok(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "64M",
        "--node",
        "n0",
        "--dtl",
        &dtl_addr,
        "--dtl-mode",
        "sync",
    ]);
    wait_info(
        &cluster.nodes[0],
        "the new volume in sync with its DTL",
        Duration::from_secs(30),
        |i| i["dtl_state"] == "ok_sync",
    );
    let uri = cluster.nodes[0].uri(VOLUME);
    common::run_ok(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x33 0 1M",
        "-c",
        "read -P 0x33 0 1M",
    ]));
    let info = cluster.nodes[0].info(VOLUME);
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["dtl_state"], "ok_sync", "{info}");
    // The DTL holds the new volume's registration: owner tag 1, an incarnation past the floor.
    let registration = std::fs::read(
        cluster.nodes[dtl_idx]
            .data_dir
            .join("dtl")
            .join(VOLUME)
            .join("registration"),
    )
    .unwrap();
    let tag = u64::from_le_bytes(registration[12..20].try_into().unwrap());
    let incarnation = u64::from_le_bytes(registration[20..28].try_into().unwrap());
    assert_eq!(tag, 1);
    assert!(incarnation > ahead, "{incarnation} not above {ahead}");
    // And the floor is the new volume's incarnation now, for the next namesake.
    assert_eq!(
        cluster.etcd.get("/vstor/incarnation"),
        Some(incarnation.to_string())
    );
    // A clone is created above the floor and raises it too.
    cluster.nodes[0].cli_ok(&["snapshot", "create", VOLUME, "s1"]);
    cluster.nodes[0].cli_ok(&[
        "clone",
        "create",
        "child",
        "--from",
        &format!("{VOLUME}@s1"),
    ]);
    let floor: u64 = cluster
        .etcd
        .get("/vstor/incarnation")
        .expect("the floor")
        .parse()
        .unwrap();
    assert!(
        floor > incarnation,
        "the clone's {floor} is not above {incarnation}"
    );
}

/// A node restarting while its volume's record names another owner (a takeover under way: the
/// registry says so, the backend is not claimed yet) fences the volume before it serves
/// anything: the fence is in place before its vhost-user export listens. The owner on record
/// being dead, the node then adopts the volume itself like any survivor, with its data.
#[test]
fn a_restarting_node_fences_a_volume_taken_over_while_it_was_down_before_serving_it() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("etcd")).unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let backend = TestBackend::Dir(tmp.path().join("backend"));
    let mut node = common::start_cluster_node(tmp.path(), &etcd.url(), &backend, "n0", "d1", &[]);
    node.cli_ok(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "64M",
        "--dtl-mode",
        "none",
    ]);
    common::run_ok(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        &node.uri(VOLUME),
        "-c",
        "write -P 0x11 0 1M",
        "-c",
        "flush",
    ]));
    node.terminate();

    // Another node took it over in the registry while this one was down.
    let key = format!("/vstor/volumes/{VOLUME}");
    let mut record: serde_json::Value =
        serde_json::from_str(&etcd.get(&key).expect("the volume's record")).unwrap();
    assert_eq!(record["owner"], "n0", "{record}");
    let tag = record["owner_tag"].as_u64().unwrap();
    record["owner"] = "n9".into();
    record["owner_tag"] = (tag + 1).into();
    etcd.put(&key, &record.to_string());

    let from = std::fs::metadata(&node.log).unwrap().len() as usize;
    node.launch();
    let log = node.log_text()[from..].to_string();
    let fenced = log
        .find("volume is owned by another node now; it stays fenced here")
        .unwrap_or_else(|| panic!("not fenced:\n{log}"));
    // Logged as the export starts serving, before the node says it is ready.
    let exported = log
        .find(&format!(
            "vhost-user-blk export listening export=\"{VOLUME}\""
        ))
        .unwrap_or_else(|| panic!("not exported over vhost-user:\n{log}"));
    assert!(
        fenced < exported,
        "the volume was exported before it was fenced:\n{log}"
    );
    // The owner on record, n9, is not alive: this node adopts the volume from the backend as
    // any survivor would (a newer tag than n9's), and serves it with its data.
    let adopted = node.wait_for(VOLUME, "adopted again from the dead n9", |i| {
        i["state"] == "running" && i["owner_tag"].as_u64() == Some(tag + 2)
    });
    assert_eq!(adopted["owner"], "n0", "{adopted}");
    common::run_ok(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        &node.uri(VOLUME),
        "-c",
        "read -P 0x11 0 1M",
        "-c",
        "write -P 0x22 0 64k",
        "-c",
        "read -P 0x22 0 64k",
    ]));
}

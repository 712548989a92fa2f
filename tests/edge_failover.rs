//! The edge through failover, as processes: a real etcd, three `vstor serve` nodes (each with
//! `--edge-listen`) on one shared backend directory, and a `vstor edge` on loopback that serves
//! the test volume to a QEMU guest (vhost-user-blk) or to NBD clients, whichever node owns it.
//!
//! - A TCG guest writes and reads back 1 MiB regions in a loop (O_DIRECT + fsync, `loop` mode
//!   of `tests/guest/init.sh`) while the owner gets `kill -9`: the guest sees a pause, never an
//!   I/O error, and every region it wrote reads back on the new owner as the guest last wrote it.
//! - Crash-oracle NBD writers on the edge's NBD export while the owner gets `kill -9`: no request
//!   fails, and every acknowledged write reads back (through the edge and on the new owner).
//! - `vstor volume move` under the same load through the edge: nothing fails, nothing is lost;
//!   for a volume without a DTL too, whose writers' flushes go on working across the move, and
//!   across a clean stop (SIGTERM) of its owner.
//! - The edge itself is killed and restarted under a running guest: it re-attaches its volumes
//!   from the registry and QEMU reconnects to the socket (`reconnect=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::edge::EdgeDaemon;
use common::etcd::Etcd;
use common::guest::{
    reconnect_option, sha256, wait_with_deadline, ConsoleReader, GuestImage, KillOnDrop, TestDir,
};
use common::oracle::{self, stop_writers, wait_progress, Load, Mode};
use common::{Daemon, NbdClient, TestBackend};
use serde_json::Value;

const VOLUME: &str = "vol";
const VOLUME_SIZE: u64 = 64 << 20;
const NODES: usize = 3;
const GUEST_QUEUES: usize = 2;
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
const REGION: u64 = 1 << 20;

struct Cluster {
    tmp: TestDir,
    _etcd: Etcd,
    nodes: Vec<Daemon>,
    edge: EdgeDaemon,
}

/// Create a test volume on `n0` (through `node`'s API) with DTL mode `dtl_mode`, small SCOs and
/// write buffer so TLogs reach the backend every few MiB.
fn create_volume(node: &Daemon, name: &str, dtl_mode: &str) {
    let mut args: [&str; 13] = common::SYNC_DTL_VOLUME_ON_N0;
    assert_eq!((args[2], args[9]), ("vol", "--dtl-mode"));
    args[2] = name;
    args[10] = dtl_mode;
    node.cli_ok(&args);
}

impl Cluster {
    /// etcd, three nodes, the test volume on `n0` (sync DTL, small SCOs and write buffer so
    /// TLogs reach the backend every few MiB), and an edge with the volume attached.
    fn start() -> Self {
        Self::start_with(false)
    }

    /// `start`, with every node also serving edges on a unix socket (`--edge-socket`), which the
    /// edge, on the same host, then uses.
    fn start_with(edge_socket: bool) -> Self {
        let tmp = TestDir::new();
        std::fs::create_dir_all(tmp.path().join("etcd")).unwrap();
        let etcd = Etcd::start(&tmp.path().join("etcd"));
        let backend = TestBackend::Dir(tmp.path().join("backend"));
        let nodes: Vec<Daemon> = (0..NODES)
            .map(|i| {
                let dir = tmp.path().join(format!("n{i}"));
                std::fs::create_dir_all(&dir).unwrap();
                let name = format!("n{i}");
                let socket = dir.join("edge.sock").display().to_string();
                let url = etcd.url();
                let mut args = vec![
                    "--registry",
                    &url,
                    "--node",
                    &name,
                    "--domain",
                    "d1",
                    "--edge-listen",
                    "127.0.0.1:0",
                ];
                if edge_socket {
                    args.extend(["--edge-socket", &socket]);
                }
                Daemon::start_on(&dir, &backend, &args)
            })
            .collect();
        create_volume(&nodes[0], VOLUME, "sync");
        nodes[0].wait_for(VOLUME, "the new volume's DTL link", |i| {
            i["dtl_state"] == "ok_sync" && i["owner"] == "n0"
        });
        let edge_dir = tmp.path().join("edge");
        std::fs::create_dir_all(&edge_dir).unwrap();
        let edge = EdgeDaemon::start(&edge_dir, "e0", &etcd.url(), &[]);
        edge.cli_ok(&["attach", VOLUME]);
        let cluster = Self {
            tmp,
            _etcd: etcd,
            nodes,
            edge,
        };
        let entry = cluster.edge_entry();
        assert_eq!(entry["owner"], "n0", "edge list: {entry}");
        assert_eq!(entry["state"], "connected", "edge list: {entry}");
        cluster
    }

    fn index(name: &str) -> usize {
        name.strip_prefix('n')
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("not a node name: {name}"))
    }

    /// The test volume's entry in `vstor edge list --json`.
    fn edge_entry(&self) -> Value {
        self.edge_entry_of(VOLUME)
    }

    /// Volume `volume`'s entry in `vstor edge list --json`.
    fn edge_entry_of(&self, volume: &str) -> Value {
        let list: Value = serde_json::from_str(&self.edge.cli_ok(&["list", "--json"]))
            .expect("edge list --json is JSON");
        list.as_array()
            .and_then(|l| l.iter().find(|v| v["volume"] == volume).cloned())
            .unwrap_or_else(|| panic!("{volume} in edge list: {list}"))
    }

    /// Poll `vstor edge list` until the test volume's entry satisfies `ready`.
    fn wait_edge(&self, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        self.wait_edge_of(VOLUME, what, ready)
    }

    /// Poll `vstor edge list` until volume `volume`'s entry satisfies `ready`.
    fn wait_edge_of(&self, volume: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let entry = self.edge_entry_of(volume);
            if ready(&entry) {
                return entry;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {entry}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The current owner, as the registry (through any live node) says.
    fn owner(&self, through: usize) -> (String, u64) {
        let info =
            self.nodes[through].wait_for(VOLUME, "the volume running", |i| i["state"] == "running");
        (
            info["owner"].as_str().expect("owner").to_string(),
            info["owner_tag"].as_u64().expect("owner_tag"),
        )
    }

    /// Kill the owner and wait until another node serves the volume under a newer tag and the
    /// edge is connected to it; returns the new owner's index.
    fn kill_owner_and_wait_for_failover(&mut self, context: &str) -> usize {
        let (owner, tag) = self.owner(0);
        let owner_idx = Self::index(&owner);
        let killed = Instant::now();
        self.nodes[owner_idx].kill9();
        let survivor = &self.nodes[(owner_idx + 1) % NODES];
        let adopted = survivor.wait_for(VOLUME, &format!("{context}: adoption"), |i| {
            i["owner"] != owner.as_str() && i["state"] == "running"
        });
        let new_owner = adopted["owner"].as_str().expect("owner").to_string();
        let new_tag = adopted["owner_tag"].as_u64().expect("owner_tag");
        assert!(new_tag > tag, "{context}: owner tag {new_tag} after {tag}");
        let entry = self.wait_edge(&format!("{context}: the edge on {new_owner}"), |e| {
            e["owner"] == new_owner.as_str()
                && e["state"] == "connected"
                && e["tag"].as_u64() == Some(new_tag)
        });
        assert!(
            entry["reconnects"].as_u64().unwrap_or(0) >= 1,
            "{context}: the edge counts its reconnect: {entry}"
        );
        eprintln!(
            "{context}: {owner} killed; {new_owner} serving and the edge reconnected after {:?}",
            killed.elapsed()
        );
        Self::index(&new_owner)
    }
}

/// The last digest the guest reported for each region it wrote, and when each round ended.
#[derive(Default)]
struct Rounds {
    count: u64,
    regions: BTreeMap<u64, String>,
    ended: Vec<Instant>,
}

impl Rounds {
    /// Take a `VSTOR-ROUND <round> <region> <sha256>` line into account; panic on a failure line.
    fn take(&mut self, (arrived, line): (Instant, String), context: &dyn Fn() -> String) {
        let line = line.as_str();
        if line.contains("VSTOR-FAIL") {
            panic!("the guest failed: {}\n{}", line.trim(), context());
        }
        let Some(at) = line.find("VSTOR-ROUND ") else {
            return;
        };
        let fields: Vec<&str> = line[at + 12..].split_whitespace().collect();
        let [round, region, sum] = fields[..] else {
            panic!("bad round line {line:?}");
        };
        let round: u64 = round.parse().unwrap();
        assert_eq!(
            round,
            self.count + 1,
            "rounds are reported in order: {line}"
        );
        self.count = round;
        self.ended.push(arrived);
        self.regions
            .insert(region.parse().unwrap(), sum.to_string());
    }

    /// The longest pause between two consecutive rounds around `moment`: pairs of round ends of
    /// which the later is after `moment` and the earlier within `within` of it. Not just the pair
    /// spanning `moment`: a round end is timed when the host reads its console line, which can
    /// come a little after the guest printed it, so a round that ended just before the kill may
    /// be read just after it, and the pause is then the next pair.
    fn longest_gap_after(&self, moment: Instant, within: Duration) -> Option<Duration> {
        self.ended
            .windows(2)
            .filter(|w| w[1] >= moment && w[0] <= moment + within)
            .map(|w| w[1] - w[0])
            .max()
    }

    /// Read console lines until the guest completed `rounds` rounds.
    fn until(&mut self, console: &ConsoleReader, rounds: u64, context: &dyn Fn() -> String) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while self.count < rounds {
            match console.next_timed(deadline) {
                Ok(timed) => self.take(timed, context),
                Err(e) => panic!(
                    "waiting for round {rounds} (at {}): {e}\n{}",
                    self.count,
                    context()
                ),
            }
        }
    }

    /// Take every line already printed.
    fn drain(&mut self, console: &ConsoleReader, context: &dyn Fn() -> String) {
        while let Ok(timed) = console.next_timed(Instant::now()) {
            self.take(timed, context);
        }
    }
}

#[test]
fn guest_on_the_edge_sees_a_pause_not_an_error_when_the_owner_dies() {
    let mut cluster = Cluster::start();
    let image = GuestImage::build(cluster.tmp.path());
    let socket = cluster.edge.socket(VOLUME);
    assert!(socket.exists(), "{} exists after attach", socket.display());
    let console_path = image.dir.join("console-loop.log");
    let qemu_log = image.dir.join("qemu-loop.log");
    let mut qemu = KillOnDrop(
        image
            .qemu(&socket, "loop", GUEST_QUEUES, None)
            .args(["-serial", "stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&qemu_log).unwrap())
            .spawn()
            .expect("spawn qemu-system-x86_64"),
    );
    let mut input = qemu.0.stdin.take().expect("QEMU's stdin");
    let console = ConsoleReader::spawn(qemu.0.stdout.take().expect("QEMU's stdout"), &console_path);
    let edge_log = cluster.edge.log.clone();
    let context = || {
        format!(
            "--- console:\n{}\n--- QEMU:\n{}\n--- edge log:\n{}",
            tail_of(&console_path, 40),
            tail_of(&qemu_log, 20),
            tail_of(&edge_log, 40)
        )
    };

    let mut rounds = Rounds::default();
    rounds.until(&console, 3, &context);
    let killed = Instant::now();
    cluster.kill_owner_and_wait_for_failover("guest");
    rounds.drain(&console, &context);
    // The guest goes on through the new owner.
    let resumed_at = rounds.count;
    rounds.until(&console, resumed_at + 5, &context);
    input.write_all(b"stop\n").unwrap();
    input.flush().unwrap();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut lines = Vec::new();
    loop {
        match console.next_timed(deadline) {
            Ok((at, line)) => {
                rounds.take((at, line.clone()), &context);
                let done = line.contains("VSTOR-DONE");
                lines.push(line);
                if done {
                    break;
                }
            }
            Err(e) => panic!("waiting for the guest to finish: {e}\n{}", context()),
        }
    }
    let status = wait_with_deadline(&mut qemu.0, BOOT_TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "QEMU exits cleanly ({status:?})\n{}",
        context()
    );
    drop(input);
    drop(qemu);
    console.finish();
    let report = |key: &str| -> String {
        lines
            .iter()
            .find_map(|l| {
                l.find(&format!("VSTOR-{key} "))
                    .map(|at| l[at + key.len() + 7..].trim().to_string())
            })
            .unwrap_or_else(|| panic!("no VSTOR-{key} line\n{}", context()))
    };
    assert_eq!(
        report("VERIFIED"),
        rounds.regions.len().to_string(),
        "the guest re-read every region it wrote\n{}",
        context()
    );
    assert_eq!(
        report("IOERRORS"),
        "0",
        "the guest's kernel logged no I/O error\n{}",
        context()
    );

    // The host reads every region on the new owner as the guest last wrote it.
    let (owner, _) = cluster.owner(1);
    let node = &cluster.nodes[Cluster::index(&owner)];
    let mut client = NbdClient::connect(&node.nbd, VOLUME).expect("NBD connect to the owner");
    assert_eq!(client.size, VOLUME_SIZE);
    let mut buf = vec![0u8; REGION as usize];
    for (region, sum) in &rounds.regions {
        assert_eq!(client.read(region * REGION, &mut buf).unwrap(), 0);
        assert_eq!(
            &sha256(&buf),
            sum,
            "region {region} on {owner} holds what the guest last wrote there"
        );
    }
    // The kill caught the guest mid-round: the round in progress waited out the failover (a
    // pause of seconds between two rounds that otherwise take a fraction of one) and then
    // completed without an error.
    let gap = rounds
        .longest_gap_after(killed, Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no round ended after the owner was killed\n{}", context()));
    assert!(
        gap >= Duration::from_secs(2),
        "the round in progress at the kill waited out the failover, but took only {gap:?}"
    );
    eprintln!(
        "guest: {} rounds over {} regions, {} after the failover; the round across the kill took {gap:?}",
        rounds.count,
        rounds.regions.len(),
        rounds.count - resumed_at
    );
}

#[test]
fn nbd_client_on_the_edge_loses_nothing_when_the_owner_dies() {
    let mut cluster = Cluster::start();
    writers_lose_nothing_across_an_owner_kill(&mut cluster, "nbd");
}

/// Crash-oracle NBD writers on the edge while the owner gets `kill -9`: they never see an error,
/// go on through the new owner, and every write they completed reads back through the edge and
/// on the new owner. Returns the new owner's index.
fn writers_lose_nothing_across_an_owner_kill(cluster: &mut Cluster, context: &str) -> usize {
    let load = Load::new();
    let writers = oracle::start_writers(&cluster.edge.nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 500, "before the owner dies");
    let new_owner = cluster.kill_owner_and_wait_for_failover(context);
    let before = load.progress.load(std::sync::atomic::Ordering::SeqCst);
    wait_progress(&load, &writers, before + 500, "after the failover");
    let writes = stop_writers(&load, writers);
    assert!(writes > 1000, "{writes} writes");
    oracle::verify(&cluster.edge.nbd, VOLUME, &load, "through the edge");
    oracle::verify(
        &cluster.nodes[new_owner].nbd,
        VOLUME,
        &load,
        "on the new owner",
    );
    new_owner
}

/// Nodes with `--edge-socket`: the edge on their host reaches the owner over its unix socket,
/// and after the owner's `kill -9` (its socket file stays behind, refusing) over the new
/// owner's. Crash-oracle NBD writers on the edge lose nothing.
#[test]
fn a_same_host_edge_uses_the_owners_unix_socket_and_loses_nothing_when_the_owner_dies() {
    let mut cluster = Cluster::start_with(true);
    let root = cluster.tmp.path().to_path_buf();
    let socket_of = |i: usize| format!("unix:{}", root.join(format!("n{i}/edge.sock")).display());
    let entry = cluster.edge_entry();
    assert_eq!(entry["owner_addr"], socket_of(0).as_str(), "{entry}");
    let new_owner = writers_lose_nothing_across_an_owner_kill(&mut cluster, "unix");
    let entry = cluster.edge_entry();
    assert_eq!(
        entry["owner_addr"],
        socket_of(new_owner).as_str(),
        "{entry}"
    );
}

#[test]
fn volume_moves_under_load_through_the_edge() {
    let cluster = Cluster::start();
    let load = Load::new();
    let writers = oracle::start_writers(&cluster.edge.nbd, VOLUME, Mode::Sync, &load);
    wait_progress(&load, &writers, 500, "before the move");
    let (_, tag) = cluster.owner(0);
    cluster.nodes[0].cli_ok(&["volume", "move", VOLUME, "--to", "n2"]);
    let moved = cluster.nodes[1].wait_for(VOLUME, "the move to n2", |i| {
        i["owner"] == "n2" && i["state"] == "running"
    });
    let new_tag = moved["owner_tag"].as_u64().expect("owner_tag");
    assert!(new_tag > tag, "owner tag {new_tag} after {tag}");
    cluster.wait_edge("the edge on n2", |e| {
        e["owner"] == "n2" && e["state"] == "connected" && e["tag"].as_u64() == Some(new_tag)
    });
    let before = load.progress.load(std::sync::atomic::Ordering::SeqCst);
    wait_progress(&load, &writers, before + 500, "after the move");
    stop_writers(&load, writers);
    oracle::verify(&cluster.edge.nbd, VOLUME, &load, "through the edge");
    oracle::verify(&cluster.nodes[2].nbd, VOLUME, &load, "on n2");
}

/// A second test volume, without a DTL (`--dtl-mode none`).
const PLAIN: &str = "plain";

impl Cluster {
    /// Create `PLAIN` on `n0` and attach it on the edge; returns its owner tag.
    fn add_plain_volume(&self) -> u64 {
        create_volume(&self.nodes[0], PLAIN, "none");
        let created = self.nodes[0].wait_for(PLAIN, "the DTL-less volume", |i| {
            i["owner"] == "n0" && i["state"] == "running"
        });
        self.edge.cli_ok(&["attach", PLAIN]);
        self.wait_edge_of(PLAIN, "the edge on n0", |e| {
            e["owner"] == "n0" && e["state"] == "connected"
        });
        created["owner_tag"].as_u64().expect("owner_tag")
    }

    /// Wait until `node` says `PLAIN` is served by another node than `n0` under a tag above
    /// `tag`, and the edge is connected to that owner; returns the new owner's index.
    fn wait_plain_left_n0(&self, node: usize, tag: u64, context: &str) -> usize {
        let info = self.nodes[node].wait_for(PLAIN, context, |i| {
            i["owner"] != "n0" && i["state"] == "running"
        });
        let owner = info["owner"].as_str().expect("owner").to_string();
        let new_tag = info["owner_tag"].as_u64().expect("owner_tag");
        assert!(new_tag > tag, "{context}: owner tag {new_tag} after {tag}");
        self.wait_edge_of(PLAIN, &format!("{context}: the edge on {owner}"), |e| {
            e["owner"] == owner.as_str()
                && e["state"] == "connected"
                && e["tag"].as_u64() == Some(new_tag)
        });
        Self::index(&owner)
    }
}

/// Writers on the edge's export of `PLAIN` that flush every few writes, while `hand_off` makes
/// `n0` give the volume up cleanly; no write and no flush may fail, and every flushed write
/// must read back through the edge and on the new owner.
fn plain_writers_across(
    cluster: &mut Cluster,
    context: &str,
    hand_off: impl FnOnce(&mut Cluster) -> usize,
) {
    let load = Load::new();
    let writers = oracle::start_writers(&cluster.edge.nbd, PLAIN, Mode::Async, &load);
    wait_progress(&load, &writers, 500, &format!("{context}: before"));
    let new_owner = hand_off(cluster);
    let before = load.progress.load(std::sync::atomic::Ordering::SeqCst);
    wait_progress(&load, &writers, before + 500, &format!("{context}: after"));
    let writes = stop_writers(&load, writers);
    assert!(writes > 1000, "{context}: {writes} writes");
    let entry = cluster.edge_entry_of(PLAIN);
    assert_eq!(entry["failed"], 0, "{context}: edge list: {entry}");
    oracle::verify(
        &cluster.edge.nbd,
        PLAIN,
        &load,
        &format!("{context}: through the edge"),
    );
    oracle::verify(
        &cluster.nodes[new_owner].nbd,
        PLAIN,
        &load,
        &format!("{context}: on the new owner"),
    );
    // A real client reads the whole volume both ways too: the same bytes.
    let dir = cluster.tmp.path();
    let through_edge = common::uri_checksum(&cluster.edge.uri(PLAIN), &dir.join("edge.raw"));
    let on_owner = common::export_checksum(&cluster.nodes[new_owner], PLAIN, dir);
    assert_eq!(through_edge, on_owner, "{context}: qemu-img reads differ");
}

/// A volume without a DTL, moved under load through the edge by writers that flush every few
/// writes. The old owner holds the edge's requests while its release puts everything on the
/// backend, then refuses them with `Released`, so the edge knows nothing it acknowledged can be
/// lost: no write and no flush fails across the move (an edge that cannot tell a clean hand-off
/// from a fence fails the guest's next flush, as it must after a fence), and every flushed write
/// reads back through the edge and on the new owner.
///
/// Meanwhile `qemu-io` reads a region the writers do not touch through the edge, one run after
/// the other from before the move until the new owner serves the volume: every run must find
/// the pattern written there first (the old owner answers reads while it hands the volume over,
/// and the edge sends what it did not answer to the new owner).
#[test]
fn a_volume_without_a_dtl_moves_through_the_edge_and_no_flush_fails() {
    let mut cluster = Cluster::start();
    let tag = cluster.add_plain_volume();
    // Beyond the writers' blocks (`oracle::LANES` × `oracle::BLOCKS`).
    let (at, len) = ("32M", "16M");
    let uri = cluster.edge.uri(PLAIN);
    common::run_ok(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        &format!("write -P 0x5a {at} {len}"),
    ]));
    plain_writers_across(&mut cluster, "move", |cluster| {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (stop, uri) = (stop.clone(), uri.clone());
            std::thread::spawn(move || {
                let mut runs = 0u32;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) || runs < 2 {
                    let out = common::run_ok(std::process::Command::new("qemu-io").args([
                        "-f",
                        "raw",
                        &uri,
                        "-c",
                        &format!("read -P 0x5a {at} {len}"),
                    ]));
                    assert!(
                        out.contains("read 16777216/16777216 bytes") && !out.contains("failed"),
                        "qemu-io read through the edge during the move: {out}"
                    );
                    runs += 1;
                }
                runs
            })
        };
        cluster.nodes[0].cli_ok(&["volume", "move", PLAIN, "--to", "n2"]);
        let new_owner = cluster.wait_plain_left_n0(1, tag, "the move to n2");
        assert_eq!(new_owner, 2);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let runs = reader.join().expect("the qemu-io reader");
        assert!(runs >= 2, "{runs} qemu-io reads");
        // Zeroes again, for the oracle's check of the whole volume (no write of its own there).
        common::run_ok(std::process::Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("write -z {at} {len}"),
        ]));
        new_owner
    });
}

/// The owner of a volume without a DTL stops cleanly (SIGTERM) under the same writers: it
/// refuses new writes, uploads everything, and meanwhile holds the edge's requests, then
/// refuses them with `Released`; another node adopts the volume from the backend, and the
/// writers on the edge see a pause, no error, and lose nothing. (Had the node closed its edge
/// connections first, as it used to, the writes in flight would fail: without a DTL the edge
/// must assume a crash.)
#[test]
fn a_clean_stop_of_the_owner_fails_nothing_on_the_edge_without_a_dtl() {
    let mut cluster = Cluster::start();
    let tag = cluster.add_plain_volume();
    plain_writers_across(&mut cluster, "clean stop", |cluster| {
        let status = cluster.nodes[0].terminate();
        assert!(status.success(), "n0 after SIGTERM: {status:?}");
        cluster.wait_plain_left_n0(1, tag, "adoption after n0's clean stop")
    });
}

/// The edge is killed (`kill -9`) under a running guest whose file system is mounted, and
/// started again: it re-attaches the volume from the registry, QEMU reconnects to the socket by
/// itself, and the guest reads its files back and writes new ones. As in the vhost-user restart
/// test of `vhost_guest.rs`, the guest is idle while the edge is down (vhost-user-backend keeps
/// no inflight record for QEMU to resubmit from).
#[test]
fn guest_reconnects_after_the_edge_restarts() {
    let mut cluster = Cluster::start();
    let image = GuestImage::build(cluster.tmp.path());
    let socket = cluster.edge.socket(VOLUME);
    let console_path = image.dir.join("console-reconnect.log");
    let qemu_log = image.dir.join("qemu-reconnect.log");
    let mut qemu = KillOnDrop(
        image
            .qemu(&socket, "reconnect", GUEST_QUEUES, Some(reconnect_option()))
            .args(["-serial", "stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&qemu_log).unwrap())
            .spawn()
            .expect("spawn qemu-system-x86_64"),
    );
    let mut input = qemu.0.stdin.take().expect("QEMU's stdin");
    let console = ConsoleReader::spawn(qemu.0.stdout.take().expect("QEMU's stdout"), &console_path);
    let edge_log = cluster.edge.log.clone();
    let context = || {
        format!(
            "--- console:\n{}\n--- QEMU:\n{}\n--- edge log:\n{}",
            tail_of(&console_path, 40),
            tail_of(&qemu_log, 20),
            tail_of(&edge_log, 40)
        )
    };
    if let Err(e) = console.wait_for("VSTOR-READY-FOR-RESTART", Instant::now() + BOOT_TIMEOUT) {
        panic!("the guest gets ready for the restart: {e}\n{}", context());
    }
    cluster.wait_edge("QEMU connected to the edge", |e| {
        e["vhost_connected"] == true
    });
    cluster.edge.kill9();
    cluster.edge.launch();
    cluster.wait_edge("QEMU reconnected to the restarted edge", |e| {
        e["vhost_connected"] == true && e["state"] == "connected"
    });
    input.write_all(b"go\n").unwrap();
    input.flush().unwrap();
    let status = wait_with_deadline(&mut qemu.0, BOOT_TIMEOUT);
    drop(input);
    drop(qemu);
    console.finish();
    assert!(
        status.is_some_and(|s| s.success()),
        "QEMU exits cleanly ({status:?})\n{}",
        context()
    );
    let text = std::fs::read_to_string(&console_path)
        .unwrap()
        .replace('\r', "");
    let reports: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.find("VSTOR-").map(|at| &l[at + 6..]))
        .map(|r| {
            let (k, v) = r.split_once(' ').unwrap_or((r, ""));
            (k.to_string(), v.trim().to_string())
        })
        .collect();
    assert!(
        !reports.iter().any(|(k, _)| k == "FAIL") && reports.iter().any(|(k, _)| k == "DONE"),
        "the guest finishes without a failure\n{}",
        context()
    );
    let digests = |key: &str| -> BTreeMap<String, String> {
        reports
            .iter()
            .filter(|(k, _)| k == key)
            .filter_map(|(_, v)| v.split_once(' '))
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect()
    };
    let sums = digests("SUM");
    let reread = digests("REREAD");
    assert_eq!(reread.len(), 3, "three files re-read\n{}", context());
    for (name, sum) in &reread {
        assert_eq!(
            sums.get(name),
            Some(sum),
            "{name} reads back after the edge restart as written before it"
        );
    }
    // The host reads the raw last MiB the guest wrote after the restart, on the owner.
    let (owner, _) = cluster.owner(0);
    let node = &cluster.nodes[Cluster::index(&owner)];
    let mut client = NbdClient::connect(&node.nbd, VOLUME).expect("NBD connect to the owner");
    let mut tail = vec![0u8; REGION as usize];
    assert_eq!(client.read(VOLUME_SIZE - REGION, &mut tail).unwrap(), 0);
    assert_eq!(
        Some(&sha256(&tail)),
        sums.get("tail"),
        "the last MiB on the owner is what the guest wrote through the restarted edge"
    );
}

fn tail_of(path: &Path, lines: usize) -> String {
    common::guest::tail(&std::fs::read_to_string(path).unwrap_or_default(), lines)
}

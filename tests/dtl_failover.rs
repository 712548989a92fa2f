//! DTL failover as processes: a node mirrors its writes to a `vstor dtl`, dies (`kill -9`, write
//! buffer deleted) and another node on the same backend adopts the volume; every acknowledged
//! write (sync mode) or every write acknowledged before a completed FLUSH (async mode) must read
//! back. Also: fencing of the old node, a DTL killed or paused under load, and CLI errors.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::oracle::{self, stop_writers, wait_progress, Load, Mode, BLOCK};
use common::{block_content, poll, Daemon, NbdClient, TestBackend, VSTOR};

const VOLUME: &str = "vol";

// ------------------------------------------------------------------------------------- DTL

/// A `vstor dtl` process; killed when dropped (also when SIGSTOPped).
struct Dtl {
    child: Option<Child>,
    addr: String,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Dtl {
    fn start(root: &Path) -> Self {
        std::fs::create_dir_all(root).unwrap();
        let mut dtl = Dtl {
            child: None,
            addr: String::new(),
            data_dir: root.join("data"),
            log: root.join("dtl.log"),
        };
        // A reserved port, not an ephemeral one: `restart` binds it again after a kill, and an
        // ephemeral port may meanwhile be the source port of some outgoing connection.
        if let Err(e) = dtl.launch(&vstor_backend::testing::free_addr()) {
            panic!("vstor dtl did not start: {e}");
        }
        dtl
    }

    fn launch(&mut self, listen: &str) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("dtl log");
        let mut child = Command::new(VSTOR)
            .args(["dtl", "--listen", listen, "--data-dir"])
            .arg(&self.data_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn vstor dtl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let addr = line
                    .strip_prefix("vstor dtl ready: ")
                    .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
                self.addr = addr.to_string();
                self.child = Some(child);
                Ok(())
            }
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                Err(format!(
                    "vstor dtl on {listen} exited ({status:?}); log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ))
            }
        }
    }

    /// Start again on the same address and data directory (retrying while the port is busy).
    fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running DTL");
        let addr = self.addr.clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.launch(&addr) {
                Ok(()) => {
                    assert_eq!(self.addr, addr, "DTL restarted on another address");
                    return;
                }
                Err(e) => assert!(Instant::now() < deadline, "DTL restart failed: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap_or_else(|e| panic!("{signal} to the DTL: {e}"));
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill -9");
            child.wait().expect("reap");
        }
    }
}

impl Drop for Dtl {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ------------------------------------------------------------------------------- nodes

/// A node in `<root>/<name>` on the shared backend, mirroring new volumes to `dtl`.
fn start_node(root: &Path, name: &str, backend: &TestBackend, dtl: &str) -> Daemon {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    Daemon::start_on(&dir, backend, &["--dtl", dtl])
}

/// Poll the volume's info until `ready` holds; the last info is in the failure message.
fn wait_info(
    node: &Daemon,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let info = node.info(VOLUME);
        if ready(&info) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_ok_sync(node: &Daemon, what: &str) -> serde_json::Value {
    wait_info(node, what, Duration::from_secs(30), |i| {
        i["dtl_state"] == "ok_sync"
    })
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `vstor volume adopt` on `node`; returns its JSON answer.
fn adopt(node: &Daemon) -> serde_json::Value {
    json(&node.cli_ok(&["volume", "adopt", VOLUME, "--json"]))
}

fn stop_process(pid: Pid, signal: Signal) {
    kill(pid, signal).unwrap_or_else(|e| panic!("{signal} to {pid}: {e}"));
}

// ------------------------------------------------------------------------ load and oracle
// The crash-oracle writers live in `common::oracle` (the cluster tests use them too).

fn start_writers(
    node: &Daemon,
    mode: Mode,
    load: &Arc<Load>,
) -> Vec<JoinHandle<Result<u64, String>>> {
    oracle::start_writers(&node.nbd, VOLUME, mode, load)
}

/// Read the whole volume on `node` and check every block against the oracle; returns the number
/// of blocks holding data.
fn verify(node: &Daemon, load: &Load, context: &str) -> u64 {
    oracle::verify(&node.nbd, VOLUME, load, context)
}

// ------------------------------------------------------------------------- crash oracle

const ROUNDS: u64 = 20;

/// Rounds of: write under load, `kill -9` the node, delete its data directory, adopt the volume
/// on a fresh node on the same backend and DTL, check every block; the new node is the next
/// round's writer.
fn crash_oracle_adopt(mode: Mode, kind: TestBackend, rounds: u64) {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let backend = kind.shared(&tmp.path().join("backend"));
    let dtl = Dtl::start(&tmp.path().join("dtl"));
    let mut node = start_node(tmp.path(), "node-0", &backend, &dtl.addr);
    node.cli_ok(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "64M",
        "--sco-size",
        "4M",
        // TLogs close (and reach the backend, trimming the DTL) every few MiB, so an adoption
        // restores part of the data from the backend and replays the rest from the DTL.
        "--write-buffer",
        "8M",
        "--dtl-mode",
        mode.as_str(),
    ]);
    let info = wait_ok_sync(&node, "the new volume's DTL link");
    assert_eq!(info["dtl_mode"], mode.as_str(), "{info}");
    assert_eq!(info["dtl_addr"], dtl.addr.as_str(), "{info}");
    let mut owner_tag = info["owner_tag"].as_u64().expect("owner_tag");
    let load = Load::new();
    let mut replayed_rounds = 0;
    let mut replayed_total = 0;
    let mut held_total = 0;
    for round in 0..rounds {
        let context = format!("{} round {round}", mode.as_str());
        let writers = start_writers(&node, mode, &load);
        // Vary the moment of the crash: sometimes early in a SCO, sometimes after a rollover.
        let target = 300 + (round * 719) % 3600;
        wait_progress(&load, &writers, target, &context);
        node.kill9();
        for w in writers {
            // Every writer ends with an error once its node is gone.
            assert!(
                w.join().expect("writer panicked").is_err(),
                "{context}: writer ended without an error"
            );
        }
        std::fs::remove_dir_all(&node.data_dir).unwrap();

        let next = start_node(
            tmp.path(),
            &format!("node-{}", round + 1),
            &backend,
            &dtl.addr,
        );
        let adopted = adopt(&next);
        assert_eq!(adopted["state"], "running", "{context}: {adopted}");
        assert_eq!(adopted["dtl_mode"], mode.as_str(), "{context}: {adopted}");
        let tag = adopted["owner_tag"].as_u64().expect("owner_tag");
        assert!(
            tag > owner_tag,
            "{context}: owner tag {tag} after {owner_tag}"
        );
        owner_tag = tag;
        let held = adopted["dtl_entries_held"].as_u64().expect("held");
        let replayed = adopted["dtl_entries_replayed"].as_u64().expect("replayed");
        assert!(replayed <= held, "{context}: {adopted}");
        replayed_rounds += u64::from(replayed > 0);
        replayed_total += replayed;
        held_total += held;

        let written = verify(&next, &load, &context);
        assert!(written > 0, "{context}: nothing written");
        // The adopted volume mirrors again before it takes the next round's writes.
        wait_ok_sync(&next, &format!("{context}: DTL link after adopt"));
        node = next;
    }
    // Replay, not the backend, saved the writes that had not been uploaded yet.
    assert!(
        replayed_rounds >= rounds / 2,
        "only {replayed_rounds} of {rounds} adoptions replayed DTL entries"
    );
    eprintln!(
        "{} mode: {rounds} rounds on {}, {} writes, {replayed_total} DTL entries replayed \
         ({held_total} held) in {replayed_rounds} adoptions, {:.1} s",
        mode.as_str(),
        if backend.is_s3() { "S3" } else { "a directory" },
        load.seq.load(Ordering::SeqCst) - 1,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn crash_oracle_adopt_sync() {
    crash_oracle_adopt(Mode::Sync, TestBackend::Default, ROUNDS);
}

#[test]
fn crash_oracle_adopt_async() {
    crash_oracle_adopt(Mode::Async, TestBackend::Default, ROUNDS);
}

/// Fewer rounds on S3: each adoption restores from a Python S3 server.
#[test]
fn crash_oracle_adopt_sync_on_s3() {
    crash_oracle_adopt(Mode::Sync, TestBackend::s3(), 4);
}

#[test]
fn crash_oracle_adopt_sync_on_ec() {
    crash_oracle_adopt(Mode::Sync, TestBackend::ec(), 4);
}

// ------------------------------------------------------------------------- fencing

/// Write `blocks` one at a time through `client` (each acknowledged write must survive).
fn write_blocks(client: &mut NbdClient, load: &Load, blocks: impl IntoIterator<Item = u64>) {
    for block in blocks {
        let seq = load.seq.fetch_add(1, Ordering::SeqCst);
        load.oracle.lock().unwrap().issue(block, seq);
        let result = client.write(
            block * BLOCK as u64,
            &block_content(block, seq, BLOCK),
            false,
        );
        assert!(
            matches!(result, Ok(0)),
            "write {seq} to block {block}: {result:?}"
        );
        load.oracle.lock().unwrap().commit(block, seq);
    }
}

/// Run `work` on another thread, failing if it takes longer than `timeout` (a request to a
/// process that never answers must fail the test, not hang it).
fn within<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|e| panic!("{what}: no answer within {timeout:?} ({e})"))
}

/// `vstor volume info` on `node` as JSON, or the error it printed.
fn try_info(node: &Daemon) -> Result<serde_json::Value, String> {
    let out = node.cli(&["volume", "info", VOLUME, "--json"]);
    if out.status.success() {
        Ok(json(&String::from_utf8_lossy(&out.stdout)))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn old_node_is_fenced_after_adopt() {
    old_node_is_fenced_after_adopt_on(TestBackend::Default);
}

#[test]
fn old_node_is_fenced_after_adopt_on_s3() {
    old_node_is_fenced_after_adopt_on(TestBackend::s3());
}

#[test]
fn old_node_is_fenced_after_adopt_on_ec() {
    old_node_is_fenced_after_adopt_on(TestBackend::ec());
}

fn old_node_is_fenced_after_adopt_on(kind: TestBackend) {
    let tmp = tempfile::tempdir().unwrap();
    let backend = kind.shared(&tmp.path().join("backend"));
    let dtl = Dtl::start(&tmp.path().join("dtl"));
    let mut a = start_node(tmp.path(), "node-a", &backend, &dtl.addr);
    a.cli_ok(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "64M",
        "--sco-size",
        "4M",
        "--dtl-mode",
        "sync",
    ]);
    wait_ok_sync(&a, "A's DTL link");
    let load = Load::new();
    let writers = start_writers(&a, Mode::Sync, &load);
    wait_progress(&load, &writers, 600, "A");
    stop_writers(&load, writers);
    // A connection to A that stays open across the pause; it works now.
    let mut a_client = NbdClient::connect(&a.nbd, VOLUME).unwrap();
    write_blocks(&mut a_client, &load, [7, 8]);
    let a_tag = a.info(VOLUME)["owner_tag"].as_u64().unwrap();

    // A stops answering (not dead); B takes the volume over.
    let a_pid = a.pid();
    stop_process(a_pid, Signal::SIGSTOP);
    let b = start_node(tmp.path(), "node-b", &backend, &dtl.addr);
    let adopted = adopt(&b);
    assert_eq!(adopted["state"], "running", "{adopted}");
    assert!(
        adopted["owner_tag"].as_u64().unwrap() > a_tag,
        "owner tag after adoption: {adopted}"
    );
    assert!(
        adopted["dtl_entries_replayed"].as_u64().unwrap() > 0,
        "A's writes were not on the backend yet; the DTL must have supplied them: {adopted}"
    );
    verify(&b, &load, "B right after the adoption");
    wait_ok_sync(&b, "B's DTL link");
    let writers = start_writers(&b, Mode::Sync, &load);
    wait_progress(&load, &writers, 400, "B");
    stop_writers(&load, writers);
    let mut b_client = NbdClient::connect(&b.nbd, VOLUME).unwrap();
    write_blocks(&mut b_client, &load, [7]);

    // A wakes up and is written to through its old connection: that write is not B's.
    stop_process(a_pid, Signal::SIGCONT);
    let stale = load.seq.fetch_add(1, Ordering::SeqCst);
    let (first, mut a_client) = within("write through A", Duration::from_secs(30), move || {
        let result = a_client.write(7 * BLOCK as u64, &block_content(7, stale, BLOCK), false);
        (result, a_client)
    });
    let first_acknowledged = matches!(first, Ok(0));
    eprintln!("first write through A after the adoption: {first:?}");
    let halted = poll("A's volume halted", Duration::from_secs(20), || {
        try_info(&a).ok().filter(|i| i["state"] == "halted")
    });
    let reason = halted["halted_reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "halted without a reason: {halted}");
    // Once halted, A fails every write (or has dropped the connection).
    let stale2 = load.seq.fetch_add(1, Ordering::SeqCst);
    let (second, _a_client) = within(
        "second write through A",
        Duration::from_secs(30),
        move || {
            let result = a_client.write(8 * BLOCK as u64, &block_content(8, stale2, BLOCK), false);
            (result, a_client)
        },
    );
    assert!(
        !matches!(second, Ok(0)),
        "a halted volume acknowledged a write"
    );
    // None of that reached B.
    verify(&b, &load, "B after A's stale writes");

    // A restarted on its data directory refuses to serve the volume.
    a.kill9();
    a.launch();
    let list = json(&a.cli_ok(&["volume", "list", "--json"]));
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == VOLUME)
        .unwrap_or_else(|| panic!("A does not list {VOLUME}: {list}"))
        .clone();
    assert_eq!(entry["state"], "failed", "{entry}");
    assert!(
        entry["halted_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("adopted"),
        "{entry}"
    );
    // Its info shows why it is not served (issue 14: not an error).
    let info = try_info(&a).expect("info of an adopted volume on the old node");
    assert_eq!(info["state"], "failed", "{info}");
    assert!(
        info["halted_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("adopted"),
        "{info}"
    );
    assert!(
        NbdClient::connect(&a.nbd, VOLUME).is_err(),
        "A still exports {VOLUME} over NBD"
    );
    // Deleting it on A only forgets it there.
    a.cli_ok(&["volume", "delete", VOLUME]);
    let list = json(&a.cli_ok(&["volume", "list", "--json"]));
    assert!(
        list.as_array().unwrap().iter().all(|v| v["name"] != VOLUME),
        "{list}"
    );
    assert!(
        backend.store(&a.data_dir).namespace_exists(VOLUME).unwrap(),
        "A deleted B's namespace"
    );
    verify(&b, &load, "B after A deleted its copy");

    // B's backend data and DTL registration are intact: B dies, C adopts and reads it all.
    let mut b = b;
    let writers = start_writers(&b, Mode::Sync, &load);
    wait_progress(&load, &writers, 400, "B after A's delete");
    b.kill9();
    for w in writers {
        assert!(w.join().expect("writer panicked").is_err());
    }
    std::fs::remove_dir_all(&b.data_dir).unwrap();
    let c = start_node(tmp.path(), "node-c", &backend, &dtl.addr);
    let adopted = adopt(&c);
    assert_eq!(adopted["state"], "running", "{adopted}");
    verify(&c, &load, "C after B died");

    // Sync mode acknowledges a write only once the DTL holds it; the DTL refused A's (stale
    // owner tag), and B never sees it, so acknowledging it loses an acknowledged write.
    assert!(
        !first_acknowledged,
        "A acknowledged a sync write after B adopted the volume (it is on no DTL and B never \
         sees it); A halted only afterwards: {halted}"
    );
}

// ------------------------------------------------------------------ DTL crash and pause

/// A node with `vol` (64M, sync DTL) and writers running on it.
fn node_with_writers(
    root: &Path,
    backend: &TestBackend,
    dtl: &Dtl,
    load: &Arc<Load>,
) -> (Daemon, Vec<JoinHandle<Result<u64, String>>>) {
    let node = start_node(root, "node-a", backend, &dtl.addr);
    node.cli_ok(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "64M",
        "--sco-size",
        "4M",
        "--write-buffer",
        "8M",
        "--dtl-mode",
        "sync",
    ]);
    wait_ok_sync(&node, "the new volume's DTL link");
    let writers = start_writers(&node, Mode::Sync, load);
    (node, writers)
}

/// `kill -9` the node under load, drop its write buffer, adopt on a fresh node, check it all.
fn crash_and_adopt(
    root: &Path,
    backend: &TestBackend,
    dtl: &Dtl,
    mut node: Daemon,
    load: &Load,
    writers: Vec<JoinHandle<Result<u64, String>>>,
) {
    node.kill9();
    for w in writers {
        assert!(w.join().expect("writer panicked").is_err());
    }
    std::fs::remove_dir_all(&node.data_dir).unwrap();
    let next = start_node(root, "node-b", backend, &dtl.addr);
    let adopted = adopt(&next);
    assert_eq!(adopted["state"], "running", "{adopted}");
    // The writes since the last TLog reached the backend come from the DTL.
    assert!(
        adopted["dtl_entries_replayed"].as_u64() > Some(0),
        "{adopted}"
    );
    verify(&next, load, "adopted after kill -9");
}

/// Poll the DTL state until `ok_sync`; returns the distinct states seen on the way.
fn states_until_ok_sync(node: &Daemon) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let info = wait_info(node, "ok_sync", Duration::from_secs(30), |i| {
        let state = i["dtl_state"].as_str().unwrap_or("?").to_string();
        let done = state == "ok_sync";
        if seen.last() != Some(&state) {
            seen.push(state);
        }
        done
    });
    assert!(info["dtl_last_error"].is_null() || info["dtl_state"] == "ok_sync");
    seen
}

#[test]
fn dtl_killed_and_restarted_during_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = TestBackend::Dir(tmp.path().join("backend"));
    let mut dtl = Dtl::start(&tmp.path().join("dtl"));
    let load = Load::new();
    let (node, writers) = node_with_writers(tmp.path(), &backend, &dtl, &load);
    wait_progress(&load, &writers, 800, "before the DTL dies");

    dtl.kill9();
    let info = wait_info(&node, "degraded", Duration::from_secs(15), |i| {
        i["dtl_state"] == "degraded"
    });
    assert!(!info["dtl_last_error"].is_null(), "{info}");
    // Writes go on without the DTL (wait_progress fails if a writer got an error).
    let at = load.progress.load(Ordering::SeqCst);
    wait_progress(&load, &writers, at + 1500, "while the DTL is dead");
    assert_eq!(node.info(VOLUME)["dtl_state"], "degraded");

    dtl.restart();
    let seen = states_until_ok_sync(&node);
    assert!(
        seen.iter()
            .all(|s| ["degraded", "catch_up", "ok_sync"].contains(&s.as_str())),
        "{seen:?}"
    );
    let info = node.info(VOLUME);
    assert!(info["dtl_degradations"].as_u64() >= Some(1), "{info}");
    eprintln!("DTL restarted: states {seen:?}");
    let at = load.progress.load(Ordering::SeqCst);
    wait_progress(&load, &writers, at + 800, "after the DTL is back");
    // Writes acknowledged while degraded are on the backend by now (catch-up waited for it);
    // the rest are on the DTL.
    crash_and_adopt(tmp.path(), &backend, &dtl, node, &load, writers);
}

#[test]
fn dtl_paused_with_sigstop() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = TestBackend::Dir(tmp.path().join("backend"));
    let dtl = Dtl::start(&tmp.path().join("dtl"));
    let load = Load::new();
    let (node, writers) = node_with_writers(tmp.path(), &backend, &dtl, &load);
    wait_progress(&load, &writers, 800, "before the pause");

    dtl.signal(Signal::SIGSTOP);
    let paused = Instant::now();
    let info = wait_info(&node, "degraded", Duration::from_secs(15), |i| {
        i["dtl_state"] == "degraded"
    });
    let took = paused.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "degraded only after {took:?}: {info}"
    );
    // The writers are not held while the DTL stays paused.
    let at = load.progress.load(Ordering::SeqCst);
    wait_progress(&load, &writers, at + 800, "while the DTL is paused");
    assert_eq!(node.info(VOLUME)["dtl_state"], "degraded");

    dtl.signal(Signal::SIGCONT);
    let seen = states_until_ok_sync(&node);
    assert!(
        seen.iter()
            .all(|s| ["degraded", "catch_up", "ok_sync"].contains(&s.as_str())),
        "{seen:?}"
    );
    eprintln!("DTL paused: degraded after {took:?}; after SIGCONT: states {seen:?}");
    let at = load.progress.load(Ordering::SeqCst);
    wait_progress(&load, &writers, at + 800, "after the DTL resumed");
    stop_writers(&load, writers);
    // Every write was acknowledged: the volume reads back exactly, here and after a takeover.
    verify(&node, &load, "same node");
    let writers = start_writers(&node, Mode::Sync, &load);
    wait_progress(&load, &writers, 500, "before the crash");
    crash_and_adopt(tmp.path(), &backend, &dtl, node, &load, writers);
}

// ------------------------------------------------------------------------------- CLI

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn dtl_cli_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dtl = Dtl::start(&tmp.path().join("dtl"));
    // A node without a default DTL.
    std::fs::create_dir_all(tmp.path().join("node")).unwrap();
    let node = Daemon::start(&tmp.path().join("node"));

    let out = node.cli(&[
        "volume",
        "create",
        "x",
        "--size",
        "16M",
        "--dtl-mode",
        "sync",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("DTL") && err.contains("address") && err.contains("--dtl"),
        "{err}"
    );
    assert!(node.cli(&["volume", "info", "x"]).status.code() != Some(0));

    let out = node.cli(&[
        "volume",
        "create",
        "x",
        "--size",
        "16M",
        "--dtl-mode",
        "bogus",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bogus"), "{}", stderr(&out));

    let out = node.cli(&["volume", "adopt", "nosuch"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("nosuch") && err.contains("does not exist"),
        "{err}"
    );

    // An address without a mode means sync; deleting the volume unregisters it from the DTL.
    node.cli_ok(&["volume", "create", "y", "--size", "16M", "--dtl", &dtl.addr]);
    let info = json(&node.cli_ok(&["volume", "info", "y", "--json"]));
    assert_eq!(info["dtl_mode"], "sync", "{info}");
    assert_eq!(info["dtl_addr"], dtl.addr.as_str(), "{info}");
    node.cli_ok(&["volume", "delete", "y"]);

    // Without a DTL a volume is standalone.
    node.create_volume(VOLUME, "16M");
    let info = node.info(VOLUME);
    assert_eq!(info["dtl_mode"], "none", "{info}");
    assert_eq!(info["dtl_state"], "ok_standalone", "{info}");
    let load = Load::new();
    let mut client = NbdClient::connect(&node.nbd, VOLUME).unwrap();
    write_blocks(&mut client, &load, 0..32);

    let out = node.cli(&["volume", "update", VOLUME, "--dtl-mode", "async"]);
    assert!(!out.status.success(), "async without an address");
    assert!(stderr(&out).contains("address"), "{}", stderr(&out));
    assert_eq!(node.info(VOLUME)["dtl_mode"], "none");

    let updated = json(&node.cli_ok(&[
        "volume",
        "update",
        VOLUME,
        "--dtl-mode",
        "async",
        "--dtl",
        &dtl.addr,
        "--json",
    ]));
    assert_eq!(updated["dtl_mode"], "async", "{updated}");
    assert_eq!(updated["dtl_addr"], dtl.addr.as_str(), "{updated}");
    let info = wait_ok_sync(&node, "async link");
    assert_eq!(info["dtl_mode"], "async", "{info}");
    write_blocks(&mut client, &load, 16..64);
    assert_eq!(client.flush().unwrap(), 0);

    node.cli_ok(&["volume", "update", VOLUME, "--dtl-mode", "sync"]);
    let info = wait_ok_sync(&node, "sync link");
    assert_eq!(info["dtl_mode"], "sync", "{info}");
    assert_eq!(info["dtl_addr"], dtl.addr.as_str(), "{info}");
    write_blocks(&mut client, &load, 48..96);

    node.cli_ok(&["volume", "update", VOLUME, "--dtl-mode", "none"]);
    let info = node.info(VOLUME);
    assert_eq!(info["dtl_mode"], "none", "{info}");
    assert_eq!(info["dtl_state"], "ok_standalone", "{info}");
    write_blocks(&mut client, &load, 80..128);
    assert_eq!(client.flush().unwrap(), 0);
    verify(&node, &load, "after the mode changes");
}

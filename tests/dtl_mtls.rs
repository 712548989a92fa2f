//! Mutual TLS on the DTL link as processes (issue 15): a `vstor dtl` started with
//! `--peer-tls-*` serves only nodes with a certificate of the cluster CA. With one, a sync-DTL
//! volume reaches `ok_sync` and writes acknowledged through NBD are replayed from the DTL after
//! the node is killed; a node without TLS, or with a certificate of another CA, stays degraded
//! with the reason in its log, and the DTL server keeps serving the others.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::tls::{peer_tls_flags, Pki};
use common::{require_tool, run_ok, Daemon, TestBackend, VSTOR};

const VOLUME: &str = "vol";

/// A `vstor dtl` process with extra flags; killed when dropped.
struct Dtl {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Dtl {
    fn start(root: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(root).unwrap();
        let log = root.join("dtl.log");
        let mut child = Command::new(VSTOR)
            .args(["dtl", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(root.join("data"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
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
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vstor dtl did not start; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        let addr = line
            .strip_prefix("vstor dtl ready: ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Dtl { child, addr, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the DTL server exited; log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Dtl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(root: &Path, name: &str, backend: &TestBackend, dtl: &str, tls: &[String]) -> Daemon {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut extra = vec!["--dtl", dtl];
    extra.extend(tls.iter().map(String::as_str));
    Daemon::start_on(&dir, backend, &extra)
}

fn create_sync_volume(node: &Daemon) {
    node.cli_ok(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "64M",
        "--dtl-mode",
        "sync",
    ]);
}

fn qemu_io(uri: &str, command: &str) {
    run_ok(Command::new("qemu-io").args(["-f", "raw", uri, "-c", command]));
}

#[test]
fn mtls_dtl_replays_sync_writes_after_kill_9() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "cluster");
    let dtl = Dtl::start(
        &tmp.path().join("dtl"),
        &peer_tls_flags(&pki.peer("dtl"), &pki.ca())
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let backend = TestBackend::Default.shared(&tmp.path().join("backend"));
    let mut a = start_node(
        tmp.path(),
        "node-a",
        &backend,
        &dtl.addr,
        &peer_tls_flags(&pki.peer("node-a"), &pki.ca()),
    );
    create_sync_volume(&a);
    let info = a.wait_for(VOLUME, "the DTL link in sync", |i| {
        i["dtl_state"] == "ok_sync"
    });
    assert_eq!(info["dtl_addr"], dtl.addr.as_str(), "{info}");

    // Acknowledged sync-mode writes are on the DTL; the node dies before any upload (TLogs
    // close after 60 s or when full) and its write buffer is lost.
    qemu_io(&a.uri(VOLUME), "write -P 0x5a 0 1M");
    qemu_io(&a.uri(VOLUME), "write -P 0xa5 4M 256k");
    a.kill9();
    std::fs::remove_dir_all(&a.data_dir).unwrap();

    let b = start_node(
        tmp.path(),
        "node-b",
        &backend,
        &dtl.addr,
        &peer_tls_flags(&pki.peer("node-b"), &pki.ca()),
    );
    let adopted: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["volume", "adopt", VOLUME, "--json"])).unwrap();
    assert_eq!(adopted["state"], "running", "{adopted}");
    assert!(
        adopted["dtl_entries_replayed"].as_u64() > Some(0),
        "the writes were only on the DTL: {adopted}"
    );
    qemu_io(&b.uri(VOLUME), "read -P 0x5a 0 1M");
    qemu_io(&b.uri(VOLUME), "read -P 0xa5 4M 256k");
    qemu_io(&b.uri(VOLUME), "read -P 0 1M 3M");
    b.wait_for(VOLUME, "the new owner's DTL link in sync", |i| {
        i["dtl_state"] == "ok_sync"
    });
}

#[test]
fn nodes_without_a_cluster_certificate_cannot_attach() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "cluster");
    let foreign = Pki::new(tmp.path(), "foreign");
    let mut dtl = Dtl::start(
        &tmp.path().join("dtl"),
        &peer_tls_flags(&pki.peer("dtl"), &pki.ca())
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );

    // No TLS at all: the DTL answers in its own protocol why it refuses.
    let plain = start_node(
        &tmp.path().join("plain"),
        "node",
        &TestBackend::Default,
        &dtl.addr,
        &[],
    );
    create_sync_volume(&plain);
    let info = plain.wait_for(VOLUME, "a refusal", |i| {
        i["dtl_state"] == "degraded" && i["dtl_last_error"].as_str().is_some()
    });
    let reason = info["dtl_last_error"].as_str().unwrap();
    assert!(reason.contains("requires mutual TLS"), "{info}");
    let log = plain.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("DTL degraded") && l.contains("requires mutual TLS")),
        "node log:\n{log}"
    );

    // A certificate of another CA (the node trusts the cluster CA, the DTL does not trust the
    // node): refused at the handshake.
    let stranger = start_node(
        &tmp.path().join("stranger"),
        "node",
        &TestBackend::Default,
        &dtl.addr,
        &peer_tls_flags(&foreign.peer("stranger"), &pki.ca()),
    );
    create_sync_volume(&stranger);
    let info = stranger.wait_for(VOLUME, "a refusal", |i| {
        i["dtl_state"] == "degraded" && i["dtl_last_error"].as_str().is_some()
    });
    let reason = info["dtl_last_error"].as_str().unwrap();
    assert!(reason.contains("alert"), "{info}");
    let log = stranger.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("DTL degraded") && l.contains("alert")),
        "node log:\n{log}"
    );
    dtl.assert_running();
    let dtl_log = dtl.log_text();
    assert!(
        dtl_log.contains("plain-text client refused") && dtl_log.contains("DTL client refused"),
        "DTL log:\n{dtl_log}"
    );

    // The DTL still serves cluster members.
    let member = start_node(
        &tmp.path().join("member"),
        "node",
        &TestBackend::Default,
        &dtl.addr,
        &peer_tls_flags(&pki.peer("member"), &pki.ca()),
    );
    create_sync_volume(&member);
    member.wait_for(VOLUME, "the DTL link in sync", |i| {
        i["dtl_state"] == "ok_sync"
    });
    // The refused nodes are still refused, and still running degraded.
    for node in [&plain, &stranger] {
        assert_eq!(node.info(VOLUME)["dtl_state"], "degraded");
    }
    dtl.assert_running();
}

//! Crash safety and backend behaviour of `vstor serve` as a process: `kill -9` under load with a
//! crash oracle, clean stop and restart from the backend alone, eviction, a broken backend.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{block_content, decode_block, require_tool, run_ok, Daemon, NbdClient, TestBackend};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 2048;

/// What the writer knows: per block, the last write acknowledged before a completed FLUSH (or
/// with FUA), and every write sent after it (acknowledged or in flight when the node died).
#[derive(Default)]
struct Oracle {
    committed: HashMap<u64, u64>,
    since: HashMap<u64, Vec<u64>>,
}

fn writer(addr: String, oracle: Arc<Mutex<Oracle>>, seq: Arc<AtomicU64>, progress: Arc<AtomicU64>) {
    let Ok(mut client) = NbdClient::connect(&addr, "crash") else {
        return;
    };
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ seq.load(Ordering::SeqCst);
    let mut unflushed: Vec<(u64, u64)> = Vec::new();
    loop {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let block = rng % BLOCKS;
        let n = seq.fetch_add(1, Ordering::SeqCst);
        let fua = rng.is_multiple_of(17);
        oracle
            .lock()
            .unwrap()
            .since
            .entry(block)
            .or_default()
            .push(n);
        match client.write(block * BLOCK as u64, &block_content(block, n, BLOCK), fua) {
            Ok(0) => {}
            _ => return,
        }
        if fua {
            let mut o = oracle.lock().unwrap();
            o.committed.insert(block, n);
            if let Some(v) = o.since.get_mut(&block) {
                v.retain(|s| *s > n);
            }
        } else {
            unflushed.push((block, n));
        }
        if n.is_multiple_of(8) {
            match client.flush() {
                Ok(0) => {}
                _ => return,
            }
            let mut o = oracle.lock().unwrap();
            for (block, n) in unflushed.drain(..) {
                if o.committed.get(&block).is_none_or(|c| *c < n) {
                    o.committed.insert(block, n);
                }
                if let Some(v) = o.since.get_mut(&block) {
                    v.retain(|s| *s > n);
                }
            }
        }
        progress.fetch_add(1, Ordering::SeqCst);
    }
}

fn kill_9_under_load_loses_no_flushed_write_on(backend: TestBackend, rounds: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_on(tmp.path(), &backend, &[]);
    daemon.cli_ok(&[
        "volume",
        "create",
        "crash",
        "--size",
        "64M",
        "--sco-size",
        "4M",
        "--write-buffer",
        "16M",
    ]);
    let oracle = Arc::new(Mutex::new(Oracle::default()));
    let seq = Arc::new(AtomicU64::new(1));
    for round in 0..rounds {
        let progress = Arc::new(AtomicU64::new(0));
        let handle = {
            let (addr, oracle, seq, progress) = (
                daemon.nbd.clone(),
                oracle.clone(),
                seq.clone(),
                progress.clone(),
            );
            std::thread::spawn(move || writer(addr, oracle, seq, progress))
        };
        let target = 1500 + round * 700;
        let deadline = Instant::now() + Duration::from_secs(120);
        while progress.load(Ordering::SeqCst) < target {
            assert!(
                Instant::now() < deadline,
                "writer stalled at {}",
                progress.load(Ordering::SeqCst)
            );
            assert!(!handle.is_finished(), "writer stopped early");
            std::thread::sleep(Duration::from_millis(5));
        }
        daemon.kill9();
        handle.join().unwrap();
        daemon.launch();

        let mut client = NbdClient::connect(&daemon.nbd, "crash").unwrap();
        let mut o = oracle.lock().unwrap();
        let mut buf = vec![0u8; BLOCK];
        let mut checked_nonzero = 0;
        for block in 0..BLOCKS {
            assert_eq!(client.read(block * BLOCK as u64, &mut buf).unwrap(), 0);
            let found = decode_block(block, &buf).unwrap_or_else(|| {
                panic!("round {round}: block {block} holds bytes no write produced")
            });
            let committed = o.committed.get(&block).copied().unwrap_or(0);
            let later = o
                .since
                .get(&block)
                .is_some_and(|v| v.contains(&found) && found > committed);
            assert!(
                found == committed || later,
                "round {round}: block {block} reads write {found}, last flushed write was {committed}"
            );
            checked_nonzero += u32::from(found != 0);
            o.committed.insert(block, found);
        }
        o.since.clear();
        assert!(
            checked_nonzero > 500,
            "round {round}: only {checked_nonzero} blocks written"
        );
    }
    let log = daemon.log_text();
    assert!(
        log.contains("recovered an unclosed TLog"),
        "recovery path exercised:\n{log}"
    );
}

#[test]
fn kill_9_under_load_loses_no_flushed_write() {
    kill_9_under_load_loses_no_flushed_write_on(TestBackend::Default, 4);
}

#[test]
fn kill_9_under_load_on_s3_loses_no_flushed_write() {
    kill_9_under_load_loses_no_flushed_write_on(TestBackend::s3(), 2);
}

#[test]
fn kill_9_under_load_on_ec_loses_no_flushed_write() {
    kill_9_under_load_loses_no_flushed_write_on(TestBackend::ec(), 2);
}

fn clean_stop_then_restart_from_backend_alone_on(backend: TestBackend) {
    require_tool("qemu-img");
    let tmp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_on(tmp.path(), &backend, &[]);
    daemon.cli_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "128M",
        "--sco-size",
        "4M",
    ]);
    daemon.create_volume("other", "64M");
    let reference = tmp.path().join("reference.raw");
    std::fs::File::create(&reference)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    common::write_with_reference(
        &daemon.uri("vol"),
        &reference,
        &[
            "write -P 0x41 0 10M",
            "write -P 0x42 5000k 3M",
            "write -P 0x43 100M 512",
            "discard 2M 1M",
            "write -z 9M 64k",
        ],
    );
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &daemon.uri("other"),
        "-c",
        "write -P 0x77 0 1M",
    ]));
    daemon.cli_ok(&["volume", "resize", "other", "--size", "96M"]);

    let status = daemon.terminate();
    assert!(status.success(), "SIGTERM exit status {status}");
    assert!(
        daemon
            .log_text()
            .contains("all volumes flushed and uploaded"),
        "{}",
        daemon.log_text()
    );
    std::fs::remove_dir_all(daemon.data_dir.join("write-buffer")).unwrap();

    daemon.launch();
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&reference)
            .arg(daemon.uri("vol")),
    );
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &daemon.uri("other"),
        "-c",
        "read -P 0x77 0 1M",
        "-c",
        "read -P 0 1M 95M",
    ]));
    assert_eq!(daemon.info("other")["size"], 96u64 << 20);
    let info = daemon.info("vol");
    assert_eq!(info["state"], "running");
    assert_eq!(
        info["local_sco_bytes"], 0,
        "everything is read from the backend now: {info}"
    );
}

#[test]
fn clean_stop_then_restart_from_backend_alone() {
    clean_stop_then_restart_from_backend_alone_on(TestBackend::Default);
}

#[test]
fn clean_stop_then_restart_from_s3_alone() {
    clean_stop_then_restart_from_backend_alone_on(TestBackend::s3());
}

#[test]
fn clean_stop_then_restart_from_ec_alone() {
    clean_stop_then_restart_from_backend_alone_on(TestBackend::ec());
}

#[test]
fn evicted_data_is_read_back_from_the_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with(tmp.path(), &["--write-buffer-limit", "8M"]);
    daemon.cli_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "128M",
        "--sco-size",
        "4M",
        "--write-buffer",
        "64M",
    ]);
    let uri = daemon.uri("vol");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x61 0 32M",
        "-c",
        "write -P 0x62 40M 32M",
        "-c",
        "flush",
    ]));
    let info = daemon.wait_for("vol", "uploads and eviction", |i| {
        i["evicted_scos"].as_u64() >= Some(6)
    });
    assert!(
        info["local_sco_bytes"].as_u64().unwrap() < 64 << 20,
        "{info}"
    );
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "read -P 0x61 0 32M",
        "-c",
        "read -P 0 32M 8M",
        "-c",
        "read -P 0x62 40M 32M",
    ]));
    assert!(daemon.info("vol")["backend_reads"].as_u64().unwrap() > 0);
}

#[test]
fn broken_backend_throttles_writes_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.cli_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "128M",
        "--sco-size",
        "4M",
        "--write-buffer",
        "8M",
    ]);
    // Break the volume's backend namespace: its object directory becomes a plain file.
    let objects = daemon.data_dir.join("backend").join("vol").join("objects");
    let saved = tmp.path().join("objects-saved");
    std::fs::rename(&objects, &saved).unwrap();
    std::fs::write(&objects, b"not a directory").unwrap();

    let uri = daemon.uri("vol");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x55 0 24M",
        "-c",
        "flush",
    ]));
    let info = daemon.wait_for("vol", "upload errors", |i| {
        i["upload_errors"].as_u64() > Some(0)
    });
    assert_eq!(info["state"], "running");
    assert_eq!(info["throttling"], true, "{info}");
    assert!(info["throttled_writes"].as_u64().unwrap() > 0, "{info}");
    assert!(
        info["last_upload_error"]
            .as_str()
            .unwrap()
            .contains("objects"),
        "{info}"
    );
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x55 0 24M"]));

    // Backend repaired: the queue drains and throttling ends.
    std::fs::remove_file(&objects).unwrap();
    std::fs::rename(&saved, &objects).unwrap();
    let info = daemon.wait_for("vol", "uploads after repair", |i| {
        i["upload_queue"].as_u64() <= Some(1) && i["throttling"] == false
    });
    assert!(info["last_upload_error"].is_null(), "{info}");
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x55 0 24M"]));
}

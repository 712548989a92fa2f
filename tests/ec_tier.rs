//! The erasure-coded tier with real processes: etcd, six `vstor osd` daemons in three domains and
//! a node on `--backend ec`, driven by fio and qemu-io over NBD. The write buffer is kept small
//! so the data a client reads back really comes from the OSDs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::tier::Tier;
use common::{require_tool, run_ok, Daemon};

/// Node settings that keep little in the write buffer: SCOs are evicted once uploaded.
const SMALL_BUFFER: &[&str] = &["--write-buffer-limit", "24M"];

fn create_small_volume(node: &Daemon, name: &str, size: &str, extra: &[&str]) {
    let mut args = vec![
        "volume",
        "create",
        name,
        "--size",
        size,
        "--sco-size",
        "4M",
        "--write-buffer",
        "8M",
    ];
    args.extend_from_slice(extra);
    node.cli_ok(&args);
}

/// fio over NBD on `uri`: `mode` is "write" (write then verify) or "verify" (verify what an
/// earlier write left). Runs in a temporary directory (fio writes state files into its cwd).
fn fio(uri: &str, size: &str, mode: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("fio");
    cmd.current_dir(dir.path()).args([
        "--name=ec",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=write",
        "--bs=64k",
        &format!("--size={size}"),
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=1234",
    ]);
    if mode == "verify" {
        cmd.arg("--verify_only");
    }
    cmd.output().unwrap()
}

fn assert_fio_ok(out: &std::process::Output, what: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stdout.contains("verify:") && !stderr.contains("verify"),
        "fio {what} failed:\n{stdout}\n{stderr}"
    );
}

/// Poll `check` until it gives a value (bounded).
fn poll<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn osds_register_and_a_node_stores_volumes_on_them() {
    let tmp = tempfile::tempdir().unwrap();
    let tier = Tier::start(tmp.path(), 6, 3);
    let osds = tier.osd_list();
    assert_eq!(osds.len(), 6);
    for (i, osd) in osds.iter().enumerate() {
        assert_eq!(osd["state"], "up", "{osd}");
        assert_eq!(osd["fragments"], 0, "{osd}");
        assert_eq!(osd["capacity"], 4u64 << 30, "{osd}");
        assert!(osd["domain"].as_str().unwrap().starts_with('d'), "{osd}");
        assert_eq!(osd["id"], (i + 1) as u64);
    }
    let text = tier.cli_ok(&["osd", "list"]);
    assert!(
        text.lines().next().unwrap().contains("STATE") && text.contains(" up "),
        "{text}"
    );

    // A preset of our own, and a volume on it.
    tier.cli_ok(&[
        "preset",
        "create",
        "wide",
        "--k",
        "3",
        "--m",
        "2",
        "--x",
        "2",
        "--fallback",
        "2,1",
        "--fragment-size",
        "64K",
    ]);
    let shown: serde_json::Value =
        serde_json::from_str(&tier.cli_ok(&["preset", "show", "wide", "--json"])).unwrap();
    assert_eq!(shown["policies"][0]["k"], 3);
    assert_eq!(shown["policies"][0]["c"], 4, "c defaults to k+1");
    assert_eq!(shown["policies"][1]["m"], 1);
    let dup = tier.cli(&["preset", "create", "wide", "--k", "2", "--m", "1"]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("exists"));
    let bad = tier.cli(&[
        "preset", "create", "bad", "--k", "2", "--m", "1", "--c", "9",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("c = 9"));

    let node = tier.node("n1", SMALL_BUFFER);
    create_small_volume(&node, "v", "256M", &["--preset", "wide"]);
    let missing = node.cli(&["volume", "create", "w", "--size", "1G", "--preset", "nope"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("preset nope does not exist"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    require_tool("qemu-io");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 40M",
        &node.uri("v"),
    ]));
    // Uploaded, evicted, and read back from the OSDs.
    node.wait_for("v", "everything uploaded", |i| {
        i["not_uploaded_bytes"] == 0 && i["upload_queue"] == 0
    });
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5a 0 40M", &node.uri("v")]));
    assert!(node.info("v")["backend_reads"].as_u64().unwrap() > 0);
    // 3+2 spreads every object over five OSDs: each holds about a fifth of 40 MiB × 5/3.
    let osds = tier.wait_osds("usage reported", |osds| {
        osds.iter()
            .map(|o| o["used"].as_u64().unwrap_or(0))
            .sum::<u64>()
            >= (40 << 20) * 5 / 3
    });
    for osd in &osds {
        assert!(osd["fragments"].as_u64().unwrap() > 0, "{osd}");
    }
}

#[test]
fn m_osds_killed_under_fio_lose_nothing_and_m_plus_one_fail_cleanly() {
    require_tool("fio");
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mut tier = Tier::start(tmp.path(), 6, 3);
    let node = tier.node("n1", SMALL_BUFFER);
    create_small_volume(&node, "v", "512M", &[]);
    let uri = node.uri("v");

    // fio writes 160 MiB and verifies it; two OSDs (m = 2 in the default 4+2) die mid-write.
    let writer = {
        let uri = uri.clone();
        std::thread::spawn(move || fio(&uri, "160M", "write"))
    };
    poll(
        "a third of the data written",
        Duration::from_secs(120),
        || (node.info("v")["written_bytes"].as_u64().unwrap() >= 48 << 20).then_some(()),
    );
    tier.osds[0].kill9();
    poll(
        "two thirds of the data written",
        Duration::from_secs(120),
        || (node.info("v")["written_bytes"].as_u64().unwrap() >= 96 << 20).then_some(()),
    );
    tier.osds[4].kill9();
    let out = writer.join().unwrap();
    assert_fio_ok(&out, "write+verify with two OSDs dead");
    let info = node.wait_for("v", "everything uploaded", |i| {
        i["not_uploaded_bytes"] == 0 && i["upload_queue"] == 0
    });
    // Puts that raced the deaths (before the map saw the OSDs down) were retried: the client
    // saw none of it.
    assert_eq!(info["state"], "running", "{info}");
    assert!(info["backend_reads"].as_u64().unwrap() > 0, "{info}");
    tier.wait_osds("the two dead OSDs seen down", |osds| {
        osds.iter().filter(|o| o["state"] == "down").count() == 2
    });
    // Everything again, from the tier.
    assert_fio_ok(&fio(&uri, "160M", "verify"), "verify with two OSDs dead");

    // A third dead OSD: data that lost more than m fragments is an I/O error, never wrong data.
    tier.osds[2].kill9();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 160M", &uri])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Input/output error"), "{text}");
    assert!(
        node.log_text().contains("cannot be rebuilt"),
        "the node says why"
    );

    // The OSDs come back with their disks intact: every byte is readable again.
    for i in [0, 2, 4] {
        tier.osds[i].launch();
    }
    tier.wait_osds("all up again", |osds| {
        osds.iter().all(|o| o["state"] == "up")
    });
    // The node refreshes its OSD map every second: wait until it reads the first block.
    poll(
        "the node to see the OSDs back",
        Duration::from_secs(20),
        || {
            Command::new("qemu-io")
                .args(["-f", "raw", "-c", "read 0 4M", &uri])
                .output()
                .unwrap()
                .stdout
                .starts_with(b"read 4194304/4194304 bytes")
                .then_some(())
        },
    );
    assert_fio_ok(
        &fio(&uri, "160M", "verify"),
        "verify after the OSDs returned",
    );
}

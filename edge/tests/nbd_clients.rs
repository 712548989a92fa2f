//! Real NBD clients (libnbd's `nbdinfo`, qemu's `qemu-io` and `qemu-img`) against the in-process
//! server.
//!
//! These tools must be installed (`apt-get install libnbd-bin qemu-utils`); set
//! `VSTOR_SKIP_NBD_TOOLS=1` to skip the tests on a machine without them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::process::Command;
use vstor_edge::testing::{MemTarget, Op};

const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether `tool` can run; panics when it is missing unless skipping was asked for.
fn have(tool: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("VSTOR_SKIP_NBD_TOOLS").is_some(),
            "{tool} is not installed (apt-get install libnbd-bin qemu-utils), \
             or set VSTOR_SKIP_NBD_TOOLS=1"
        );
        eprintln!("skipping: {tool} not installed");
    }
    found
}

/// Run a tool to completion (the server keeps running on the test runtime meanwhile) and return
/// its stdout, failing the test on a nonzero exit.
async fn run(tool: &str, args: &[&str]) -> String {
    let child = Command::new(tool).args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(TOOL_TIMEOUT, child)
        .await
        .unwrap_or_else(|_| panic!("{tool} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

fn uri(srv: &TestServer, name: &str) -> String {
    format!("nbd://{}/{}", srv.addr, name)
}

/// Allocated 4 KiB blocks as merged `(offset, length, is_data)` runs.
fn runs(allocation: &[bool]) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (i, &data) in allocation.iter().enumerate() {
        match out.last_mut() {
            Some(last) if last.2 == data => last.1 += 4096,
            _ => out.push((i as u64 * 4096, 4096, data)),
        }
    }
    out
}

/// A 4 MiB export with data at [0, 64K), [1M, 1M+4K) and [3M, 3M+128K), holes elsewhere.
async fn server_with_sparse_export() -> (TestServer, Arc<MemTarget>) {
    let (srv, target) = TestServer::with_export("vol", 4 * MIB).await;
    target.preload(0, &pattern(1, 65536));
    target.preload(MIB, &pattern(2, 4096));
    target.preload(3 * MIB, &pattern(3, 131072));
    (srv, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let (srv, _target) = server_with_sparse_export().await;
    let out = run("nbdinfo", &["--json", &uri(&srv, "vol")]).await;
    let json: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(json["protocol"], "newstyle-fixed");
    let exports = json["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1);
    let e = &exports[0];
    assert_eq!(e["export-name"], "vol");
    assert_eq!(e["export-size"], 4 * MIB);
    assert_eq!(e["is_read_only"], false);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    assert!(e["contexts"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c == "base:allocation")));

    // Unknown export: nbdinfo fails cleanly (NBD_REP_ERR_UNKNOWN to its NBD_OPT_GO).
    let status = Command::new("nbdinfo")
        .arg(uri(&srv, "missing"))
        .output()
        .await
        .unwrap()
        .status;
    assert!(!status.success());

    let list = run("nbdinfo", &["--list", "--json", &uri(&srv, "")]).await;
    let json: Value = serde_json::from_str(&list).unwrap_or_else(|e| panic!("{e}: {list}"));
    let names: Vec<&str> = json["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vol"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_shows_holes_and_data() {
    if !have("nbdinfo") {
        return;
    }
    let (srv, target) = server_with_sparse_export().await;
    let out = run("nbdinfo", &["--map", &uri(&srv, "vol")]).await;
    // Lines look like: "     65536      983040    3  hole,zero"
    let map: Vec<(u64, u64, bool)> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let kind: u32 = f[2].parse().unwrap();
            assert!(kind == 0 || kind == 3, "unexpected type in {l:?}");
            (f[0].parse().unwrap(), f[1].parse().unwrap(), kind == 0)
        })
        .collect();
    assert_eq!(map, runs(&target.allocation()), "nbdinfo --map:\n{out}");
    assert_eq!(
        map,
        [
            (0, 65536, true),
            (65536, MIB - 65536, false),
            (MIB, 4096, true),
            (MIB + 4096, 2 * MIB - 4096, false),
            (3 * MIB, 131072, true),
            (3 * MIB + 131072, MIB - 131072, false),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_back() {
    if !have("qemu-io") {
        return;
    }
    let (srv, target) = TestServer::with_export("vol", 16 * MIB).await;
    // Neighbouring data that qemu's read-modify-write of the unaligned request must preserve.
    target.preload(65536, &[0x77; 8192]);
    let uri = uri(&srv, "vol");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0x77 64k 8k",
            "-c",
            "write -P 0xcd 1m 1m",
            "-c",
            "read -P 0xcd 1m 1m",
            "-c",
            "write -P 0x11 69120 3000",
            "-c",
            "read -P 0x11 69120 3000",
            "-c",
            "read -P 0x77 65536 3584",
            "-c",
            "write -z 2m 128k",
            "-c",
            "read -P 0 2m 128k",
            "-c",
            "write -P 0xee 3m 128k",
            "-c",
            "write -z -u 3m 128k",
            "-c",
            "read -P 0 3m 128k",
            "-c",
            "flush",
        ],
    )
    .await;
    assert!(
        !out.contains("verification failed") && !out.contains("error"),
        "qemu-io output:\n{out}"
    );
    assert!(target.contents(0, 65536).iter().all(|&b| b == 0xab));
    assert!(target
        .contents(MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0xcd));
    // 69120 = 64K + 3584: an unaligned 3000-byte write in the middle of preserved 0x77 bytes.
    let around = target.contents(65536, 8192);
    assert!(around[..3584].iter().all(|&b| b == 0x77));
    assert!(around[3584..3584 + 3000].iter().all(|&b| b == 0x11));
    assert!(around[3584 + 3000..].iter().all(|&b| b == 0x77));
    assert!(target.flushes() >= 1);
    // `write -z` maps to WRITE_ZEROES with NO_HOLE, `write -z -u` to one that may punch a hole.
    let zeroes: Vec<(u64, u64, bool)> = target
        .ops()
        .iter()
        .filter_map(|op| match *op {
            Op::WriteZeroes {
                offset,
                len,
                allocate,
                ..
            } => Some((offset, len, allocate)),
            _ => None,
        })
        .collect();
    assert_eq!(
        zeroes,
        [(2 * MIB, 128 * 1024, true), (3 * MIB, 128 * 1024, false)]
    );
    assert!(target.allocation()[(2 * MIB / 4096) as usize]);
    assert!(!target.allocation()[(3 * MIB / 4096) as usize]);

    // A second process sees the data (no client-side caching in the way).
    let out = run(
        "qemu-io",
        &["-f", "raw", "-r", &uri, "-c", "read -P 0x11 69120 3000"],
    )
    .await;
    assert!(!out.contains("verification failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_detects_corruption() {
    if !have("qemu-io") {
        return;
    }
    // Guards the test above: a wrong pattern must be reported by qemu-io.
    let (srv, target) = TestServer::with_export("vol", MIB).await;
    target.preload(0, &[0x42; 4096]);
    let child = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-r",
            &uri(&srv, "vol"),
            "-c",
            "read -P 0x43 0 4k",
        ])
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&child.stdout);
    assert!(
        out.contains("verification failed") || !child.status.success(),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_finds_holes() {
    if !have("qemu-img") {
        return;
    }
    let (srv, target) = server_with_sparse_export().await;
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &uri(&srv, "vol")],
    )
    .await;
    let json: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let mut map: Vec<(u64, u64, bool)> = Vec::new();
    for e in json.as_array().expect("array") {
        let start = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        assert_eq!(e["zero"].as_bool().unwrap(), !data, "{e}");
        match map.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == start => last.1 += length,
            _ => map.push((start, length, data)),
        }
    }
    assert_eq!(map, runs(&target.allocation()), "qemu-img map:\n{out}");
}

//! `vstor dtl` as a process: entries acknowledged with `--fsync` survive `kill -9`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::process::{Child, Command};

use bytes::Bytes;
use common::{start_dtl, VSTOR};
use vstor_dtl::{DtlClient, Entry};

fn start(dir: &std::path::Path, listen: &str) -> (Child, String) {
    start_dtl(dir, &["--fsync", "--listen", listen])
}

fn cluster(seed: u8) -> Bytes {
    Bytes::from(
        (0..4096u32)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed)
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test]
async fn acknowledged_entries_survive_kill_9_of_the_dtl() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(tmp.path(), "127.0.0.1:0");
    let mut client = DtlClient::connect(addr.as_str()).await.unwrap();
    client.register("vol", 4096, 1, 0).await.unwrap();
    let batch = |sco: u32, seed: u8| -> Vec<Entry> {
        (0..16u64)
            .map(|i| Entry {
                location: u64::from(sco) | (i << 32),
                lba: (u64::from(seed) * 16 + i) * 8,
                data: cluster(seed.wrapping_add(i as u8)),
            })
            .collect()
    };
    client.add_entries("vol", 1, 1, batch(1, 1)).await.unwrap();
    client.add_entries("vol", 1, 2, batch(2, 2)).await.unwrap();
    drop(client);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();

    let (mut child, addr) = start(tmp.path(), "127.0.0.1:0");
    let mut client = DtlClient::connect(addr.as_str()).await.unwrap();
    let range = client.sco_range("vol").await.unwrap();
    assert_eq!((range.oldest, range.newest), (Some(1), Some(2)));
    let entries = client.entries("vol", 1, 2).await.unwrap();
    let expected: Vec<Entry> = batch(1, 1).into_iter().chain(batch(2, 2)).collect();
    assert_eq!(entries, expected);
    // The old owner is fenced once a newer one registers.
    client.register("vol", 4096, 2, 0).await.unwrap();
    let err = client
        .add_entries("vol", 1, 3, batch(3, 3))
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("owner"), "{err}");
    let _ = child.kill();
    let _ = child.wait();

    let out = Command::new(VSTOR)
        .args(["dtl", "--listen", "nowhere"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listen address \"nowhere\" is not IP:PORT")
    );
    // A --metrics value that is no address is refused before the daemon starts.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(VSTOR)
        .args([
            "dtl",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "nowhere",
            "--data-dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value 'nowhere' for '--metrics <IP:PORT>'"),
        "{stderr}"
    );
}

/// `--metrics` on an address another process holds: the daemon stops at startup and says which
/// flag and address, rather than running without the metrics an alert depends on.
#[test]
fn a_busy_metrics_address_stops_the_daemon_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    // Killed when dropped, should it keep running.
    let mut child = common::guest::KillOnDrop(
        Command::new(VSTOR)
            .args(["dtl", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path())
            .args(["--metrics", &addr])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = common::poll(
        "vstor dtl to stop",
        std::time::Duration::from_secs(30),
        || child.0.try_wait().unwrap(),
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen for --metrics on {addr}")),
        "{stderr}"
    );
}

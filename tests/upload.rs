//! The node's upload scheduler seen from outside: the number of upload threads does not grow
//! with the number of volumes, and an idle volume's writes reach the backend after
//! `[upload] max_open_age` (set in the config file), so the volume comes back from the backend
//! alone after a crash that also lost its write buffer.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::time::{Duration, Instant};

use common::{Daemon, NbdClient};

/// Thread names (`comm`) of a process.
fn thread_names(pid: i32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .collect()
}

struct Threads {
    total: usize,
    upload: usize,
    /// vhost-user connection threads (`vhost-NAME`): only exports with a frontend have one.
    vhost: usize,
}

fn count_threads(daemon: &Daemon) -> Threads {
    let names = thread_names(daemon.pid().as_raw());
    Threads {
        total: names.len(),
        upload: names.iter().filter(|n| n.starts_with("upload")).count(),
        vhost: names
            .iter()
            .filter(|n| n.starts_with("vhost-") && *n != "vhost-acceptor")
            .count(),
    }
}

fn write_some(daemon: &Daemon, volume: &str, seed: u8) {
    let mut client = NbdClient::connect(&daemon.nbd, volume).expect("connect");
    let data: Vec<u8> = (0..64 << 10).map(|i| (i as u8) ^ seed).collect();
    client.write(0, &data, false).expect("write");
    client.flush().expect("flush");
}

#[test]
fn upload_threads_do_not_grow_with_the_number_of_volumes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with(tmp.path(), &["--upload-concurrency", "3"]);
    let create = |range: std::ops::Range<usize>| {
        for i in range {
            let name = format!("t{i:03}");
            daemon.create_volume(&name, "64M");
            if i % 10 == 0 {
                write_some(&daemon, &name, i as u8);
            }
        }
    };
    create(0..10);
    let few = count_threads(&daemon);
    create(10..200);
    let list: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["volume", "list", "--json"])).expect("list JSON");
    assert_eq!(list.as_array().map(Vec::len), Some(200), "{list}");
    let many = count_threads(&daemon);
    eprintln!(
        "threads with 10 volumes: {} ({} upload, {} vhost); with 200: {} ({} upload, {} vhost)",
        few.total, few.upload, few.vhost, many.total, many.upload, many.vhost
    );
    assert_eq!(few.upload, 3, "one upload thread per unit of concurrency");
    assert_eq!(many.upload, 3, "200 volumes, still 3 upload threads");
    // No frontend is connected over vhost-user: idle exports share one acceptor thread.
    assert_eq!(
        many.vhost, 0,
        "idle vhost-user exports must not own threads"
    );
    // The total must not grow with the volume count; a little slack for the async runtime's
    // blocking pool.
    assert!(
        many.total <= few.total + 8,
        "threads grew from {} to {} with 190 more volumes",
        few.total,
        many.total
    );
    // The written volumes' data still gets uploaded by the shared workers.
    for i in (0..200).step_by(10) {
        let name = format!("t{i:03}");
        daemon.wait_for(&name, "upload of the written volume", |info| {
            info["tlogs_on_backend"].as_u64() >= Some(1) && info["upload_queue"] == 0
        });
    }
}

#[test]
fn idle_volume_survives_losing_its_write_buffer_after_max_open_age() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("vstor.toml");
    std::fs::write(&config, "[upload]\nmax_open_age = \"300ms\"\n").expect("write config");
    let mut daemon = Daemon::start_with(tmp.path(), &["--config", config.to_str().unwrap()]);
    daemon.create_volume("idle", "64M");
    let data: Vec<u8> = (0..(1usize << 20) + 512)
        .map(|i| (i * 31 + i / 4096) as u8)
        .collect();
    let mut client = NbdClient::connect(&daemon.nbd, "idle").expect("connect");
    client.write(8192, &data, false).expect("write");
    let started = Instant::now();
    // No flush and far less than a SCO: only the age rule sends it to the backend.
    let info = daemon.wait_for("idle", "the idle volume's data on the backend", |info| {
        info["tlogs_on_backend"].as_u64() >= Some(1)
            && info["upload_queue"] == 0
            && info["not_uploaded_bytes"] == 0
    });
    assert!(started.elapsed() < Duration::from_secs(60), "{info}");
    drop(client);
    daemon.kill9();
    let wb = daemon.data_dir.join("write-buffer").join("idle");
    assert!(wb.is_dir(), "write buffer at {}", wb.display());
    std::fs::remove_dir_all(&wb).expect("remove the write buffer");
    daemon.launch();
    let mut client = NbdClient::connect(&daemon.nbd, "idle").expect("reconnect");
    let mut back = vec![0u8; data.len()];
    client.read(8192, &mut back).expect("read");
    assert_eq!(
        crc32c::crc32c(&back),
        crc32c::crc32c(&data),
        "data restored from the backend alone differs"
    );
}

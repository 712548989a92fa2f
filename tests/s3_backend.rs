//! `vstor serve --backend s3://...`: startup errors for bad S3 settings are one clear line, and
//! an S3 outage is a pause for reads of evicted data up to `--s3-retry-timeout`, then an I/O
//! error, never lost data. (The node's behaviour on S3 is otherwise covered by the `_on_s3`
//! variants of the crash, snapshot, scrub and DTL failover tests.) Snapshot exports whose views
//! wait for S3 during an outage, and writes that must first read evicted data from it, hold up
//! no other client of the node. Rereads of evicted data come from the node's read cache.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{require_tool, run_any, run_ok, Daemon, NbdClient, TestBackend, VSTOR};
use vstor_backend::testing::{Moto, Proxy};

/// Run `vstor serve` on `backend` with `env`; it must fail at once. Returns its stderr.
fn serve_fails(backend: &str, env: &[(String, String)]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(VSTOR)
        .args(["serve", "--data-dir"])
        .arg(tmp.path().join("data"))
        .args([
            "--backend",
            backend,
            "--api",
            "127.0.0.1:0",
            "--nbd",
            "127.0.0.1:0",
        ])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run vstor serve");
    assert!(
        !out.status.success(),
        "vstor serve --backend {backend} started"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    errors[0].to_string()
}

#[test]
fn serve_refuses_bad_s3_settings_at_startup_with_one_line() {
    let err = serve_fails("s3://No_Such", &[]);
    assert!(
        err.contains("invalid S3 location \"s3://No_Such\""),
        "{err}"
    );

    let moto = Moto::start();
    let err = serve_fails("s3://missing-bucket/vols", &moto.env());
    assert!(
        err.contains("s3://missing-bucket/vols")
            && err.contains("S3 bucket missing-bucket does not exist"),
        "{err}"
    );

    let strict = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let err = serve_fails("s3://some-bucket", &strict.env());
    assert!(
        err.contains("S3 refused the credentials for bucket some-bucket"),
        "{err}"
    );

    // An endpoint nobody answers on: the startup check retries for its own budget (10 s), not
    // the data path's 30 s, then names the bucket and the cause.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let err = serve_fails("s3://some-bucket", &Moto::env_for_port(closed_port));
    let took = started.elapsed();
    assert!(
        err.contains("some-bucket") && err.contains(&closed_port.to_string()),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(25),
        "the startup check gave up after {took:?}, not after its 10 s budget: {err}"
    );
}

/// qemu-io reading `len` bytes at `offset` of `uri`, checking every byte is `pattern`.
fn read_pattern(uri: &str, offset: &str, len: &str, pattern: u8) -> Command {
    let mut cmd = Command::new("qemu-io");
    cmd.args([
        "-f",
        "raw",
        uri,
        "-c",
        &format!("read -P {pattern:#x} {offset} {len}"),
    ]);
    cmd
}

/// A node on `backend` with volume `vol` (32 MiB in 4 MiB SCOs): 0x61 in its first 12 MiB,
/// 0x62 in the next 12, and its oldest SCOs (the first among them) evicted, so that reading them,
/// or writing part of one of their clusters, goes to S3.
fn node_with_evicted_volume(root: &std::path::Path, backend: &TestBackend) -> Daemon {
    let node = Daemon::start_on(root, backend, &["--write-buffer-limit", "8M"]);
    node.cli_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "32M",
        "--sco-size",
        "4M",
        "--write-buffer",
        "32M",
    ]);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &node.uri("vol"),
        "-c",
        "write -P 0x61 0 12M",
        "-c",
        "write -P 0x62 12M 12M",
        "-c",
        "flush",
    ]));
    // Oldest first: the first 4 MiB SCO is among those evicted.
    node.wait_for("vol", "uploads and eviction", |i| {
        i["not_uploaded_bytes"] == 0 && i["evicted_scos"].as_u64() >= Some(3)
    });
    node
}

/// A volume whose first SCOs are evicted to S3, so reading them goes to the server: reads
/// during an outage shorter than the retry timeout wait for it and return the data; past a
/// short timeout they fail with an I/O error, and read the same data once the server is back
/// (the volume is not halted, nothing is lost).
#[test]
fn reads_of_evicted_data_ride_out_an_s3_outage_up_to_the_retry_timeout() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let (mut proxy, backend) = s3_behind_a_proxy();
    let mut node = node_with_evicted_volume(tmp.path(), &backend);
    let uri = node.uri("vol");
    let backend_reads = |node: &Daemon| node.info("vol")["backend_reads"].as_u64().unwrap();

    // An outage of 5 s, inside the default 30 s: the read waits and returns the data.
    let before = backend_reads(&node);
    proxy.down();
    let started = Instant::now();
    let mut reader = read_pattern(&uri, "0", "4M", 0x61).spawn().unwrap();
    // The node says once, within the outage, that S3 is not answering (after 3 s without an
    // answer), instead of a line per retry of every request.
    let outage = Duration::from_secs(5);
    common::poll("the node's S3 outage warning", outage, || {
        node.log_text()
            .contains("S3 is not answering")
            .then_some(())
    });
    // The outage itself is what is being tested: the server is away for this long.
    std::thread::sleep(outage.saturating_sub(started.elapsed()));
    assert!(
        reader.try_wait().unwrap().is_none(),
        "the read finished during the outage: {}",
        node.log_text()
    );
    proxy.up();
    let status = reader.wait().unwrap();
    assert!(status.success(), "the read failed: {}", node.log_text());
    assert!(started.elapsed() >= outage);
    assert!(backend_reads(&node) > before, "the read went to S3");
    // The next read of evicted data is answered at once: the node says S3 is back, once.
    run_ok(&mut read_pattern(&uri, "4M", "4M", 0x61));
    let log = node.log_text();
    assert_eq!(
        log.matches("S3 is not answering").count(),
        1,
        "one warning per outage: {log}"
    );
    assert_eq!(
        log.matches("S3 answers again").count(),
        1,
        "one line when it ends: {log}"
    );
    assert!(
        !log.contains("backing off"),
        "object_store's line per retry is filtered out by default: {log}"
    );

    // The same node with a 1 s budget: a longer outage fails the read, with a clear error.
    node.terminate();
    node.extra_args(&["--s3-retry-timeout", "1s"]);
    node.launch();
    proxy.down();
    let started = Instant::now();
    let (ok, out) = run_any(&mut read_pattern(&uri_of(&node), "0", "4M", 0x61));
    let took = started.elapsed();
    proxy.up();
    assert!(!ok, "the read succeeded with S3 down: {out}");
    assert!(out.contains("Input/output error"), "{out}");
    assert!(
        took < Duration::from_secs(20),
        "gave up in bounded time: {took:?}"
    );
    let log = node.log_text();
    assert!(
        log.contains("S3 request on bucket vstor-tests") && log.contains("retries"),
        "the node's log names the bucket and the retries: {log}"
    );
    // The server is back: the same read returns the data, and the rest of the volume is intact.
    run_ok(&mut read_pattern(&uri_of(&node), "0", "12M", 0x61));
    run_ok(&mut read_pattern(&uri_of(&node), "12M", "12M", 0x62));
    assert_eq!(node.info("vol")["state"], "running");

    // `volume export` reads over several connections at once: through the same outage the
    // reads of evicted data get the I/O error, and the export stops in bounded time naming the
    // volume, the offset and the error; with S3 back it copies the volume. (Without the read
    // cache, which holds what was just read.)
    node.terminate();
    node.extra_args(&["--read-cache", "0"]);
    node.launch();
    let image = tmp.path().join("export.raw");
    let image_arg = image.to_str().unwrap();
    proxy.down();
    let started = Instant::now();
    let out = node.cli(&["volume", "export", "vol", image_arg, "--force"]);
    let took = started.elapsed();
    proxy.up();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exported with S3 down");
    assert!(
        err.contains("reading volume vol at byte") && err.contains("Input/output error"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(30),
        "gave up in bounded time: {took:?}"
    );
    node.cli_ok(&["volume", "export", "vol", image_arg, "--force"]);
    let data = std::fs::read(&image).unwrap();
    assert_eq!(data.len(), 32 << 20);
    assert!(data[..12 << 20].iter().all(|b| *b == 0x61));
    assert!(data[12 << 20..24 << 20].iter().all(|b| *b == 0x62));
    assert!(data[24 << 20..].iter().all(|b| *b == 0));
}

/// The node's read cache on S3 (on by default there, 256 MiB): evicted data read once is read
/// again without a request to S3, so it reads back even while S3 is away; metrics and volume
/// info count the hits. With `--read-cache 0` every reread goes to S3 again.
#[test]
fn rereads_of_evicted_data_come_from_the_read_cache_even_during_an_s3_outage() {
    require_tool("qemu-io");
    require_tool("timeout");
    let tmp = tempfile::tempdir().unwrap();
    let (mut proxy, backend) = s3_behind_a_proxy();
    let mut node = node_with_evicted_volume(tmp.path(), &backend);
    let uri = node.uri("vol");
    let counts = |node: &Daemon| {
        let info = node.info("vol");
        let count = |key: &str| info[key].as_u64().unwrap();
        (count("backend_reads"), count("cache_hits"))
    };
    let reread = [
        "read -P 0x61 0 4M",
        "read -P 0x61 512 3584",
        "read -P 0x61 1M 8k",
    ];

    let (before, _) = counts(&node);
    run_ok(&mut read_pattern(&uri, "0", "4M", 0x61));
    let (fetched, hits) = counts(&node);
    assert!(fetched > before, "the first read went to S3");

    // S3 is away: the same data, also in other shapes, reads back from the cache at once.
    proxy.down();
    let (ok, out) = run_any(&mut qemu_io_within(Duration::from_secs(20), &uri, &reread));
    proxy.up();
    assert!(ok, "a reread waited for S3: {out}");
    let (after, more_hits) = counts(&node);
    assert_eq!(after, fetched, "a reread went to S3");
    assert!(more_hits > hits, "no cache hits counted: {more_hits}");
    let scrape = metrics(&node);
    assert_eq!(
        metric(&scrape, "vstor_read_cache_capacity_bytes", None),
        Some(256.0 * 1024.0 * 1024.0)
    );
    assert!(metric(&scrape, "vstor_read_cache_bytes", None) >= Some(4.0 * 1024.0 * 1024.0));
    assert!(metric(&scrape, "vstor_read_cache_hits_total", None) >= Some(more_hits as f64));
    assert_eq!(
        metric(&scrape, "vstor_volume_read_cache_hits_total", Some("vol")),
        Some(more_hits as f64)
    );

    // Without the cache every reread is a request to S3 again.
    node.terminate();
    node.extra_args(&["--read-cache", "0"]);
    node.launch();
    let uri = node.uri("vol");
    for _ in 0..2 {
        let (before, _) = counts(&node);
        run_ok(&mut read_pattern(&uri, "0", "4M", 0x61));
        assert!(counts(&node).0 > before, "a reread did not go to S3");
    }
    assert_eq!(counts(&node).1, 0);
    let scrape = metrics(&node);
    assert_eq!(
        metric(&scrape, "vstor_read_cache_capacity_bytes", None),
        None
    );
}

/// The node's metrics, parsed.
fn metrics(node: &Daemon) -> prometheus_parse::Scrape {
    let text = common::metrics_text(&node.api);
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format")
}

/// The value of `name` (of volume `volume`, if given) in `scrape`, if it is there.
fn metric(scrape: &prometheus_parse::Scrape, name: &str, volume: Option<&str>) -> Option<f64> {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && volume.is_none_or(|v| s.labels.get("volume") == Some(v)))?;
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => Some(v),
        _ => None,
    }
}

fn uri_of(node: &Daemon) -> String {
    node.uri("vol")
}

/// moto behind a proxy the test can take down, and a backend on it.
fn s3_behind_a_proxy() -> (Proxy, TestBackend) {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port());
    let backend = TestBackend::s3_through(moto, proxy.port());
    (proxy, backend)
}

/// A new qemu-io client of `volume` writes, flushes and reads back 1 MiB at `at` within 20 s:
/// the node serves it while other clients wait for S3.
fn io_carries_on(node: &Daemon, volume: &str, at: &str) {
    let (ok, out) = run_any(&mut qemu_io_within(
        Duration::from_secs(20),
        &node.uri(volume),
        &[
            &format!("write -P 0x71 {at} 1M"),
            "flush",
            &format!("read -P 0x71 {at} 1M"),
        ],
    ));
    assert!(ok, "I/O on volume {volume} waited for S3: {out}");
}

/// Wait for the node to say that S3 has not answered a request for 3 s: the requests the test
/// started are waiting for S3.
fn wait_outage_warning(node: &Daemon) {
    common::poll(
        "the node's S3 outage warning",
        Duration::from_secs(20),
        || {
            node.log_text()
                .contains("S3 is not answering")
                .then_some(())
        },
    );
}

/// qemu-io on `uri` running `commands`, given at most `bound` (coreutils `timeout`): a client
/// that hangs fails instead of holding the test up. Snapshot exports (`VOL@SNAP`) are opened
/// read-only.
fn qemu_io_within(bound: Duration, uri: &str, commands: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(bound.as_secs().to_string())
        .args(["qemu-io", "-f", "raw", uri]);
    if uri.contains('@') {
        cmd.arg("-r");
    }
    for command in commands {
        cmd.args(["-c", command]);
    }
    cmd
}

/// Snapshot list of `volume`, as JSON.
fn snapshots(node: &Daemon, volume: &str) -> Vec<serde_json::Value> {
    let out = node.cli_ok(&["snapshot", "list", volume, "--json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Opening a snapshot export builds its view from the snapshot's TLogs on S3, and a block-status
/// query of a view whose volume was scrubbed since rebuilds its map from them, so during an S3
/// outage those clients wait for S3. Only those: with six such opens and queries pending (more
/// than the node's runtime has worker threads, one per CPU, on a machine of up to six CPUs:
/// each used to block one for as long as S3 was away), another volume's NBD clients still
/// connect, write and read back, and a snapshot view built before the outage opens at once.
/// Once S3 is back, the waiting clients read their snapshots' data and allocation.
#[test]
fn snapshot_exports_waiting_for_s3_hold_up_no_other_client() {
    require_tool("qemu-io");
    require_tool("timeout");
    require_tool("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let (mut proxy, backend) = s3_behind_a_proxy();
    let node = Daemon::start_on(tmp.path(), &backend, &[]);
    // a: two snapshots, 4 MiB each of 0x61 and 0x62; b: one of 0x70; c: one of 0x80, then the
    // same range written twice more (garbage for the scrub below) and a second snapshot.
    for (volume, snapshots_of) in [
        ("a", &["s1", "s2"][..]),
        ("b", &["s0"][..]),
        ("c", &["s0", "s1", "s2"][..]),
    ] {
        node.cli_ok(&["volume", "create", volume, "--size", "16M"]);
        for (i, snapshot) in snapshots_of.iter().enumerate() {
            let pattern = match volume {
                "a" => 0x61 + i,
                "b" => 0x70,
                _ => 0x80 + i,
            };
            run_ok(Command::new("qemu-io").args([
                "-f",
                "raw",
                &node.uri(volume),
                "-c",
                &format!("write -P {pattern:#x} 0 4M"),
                "-c",
                "flush",
            ]));
            node.cli_ok(&["snapshot", "create", volume, snapshot]);
        }
        common::poll(
            &format!("the snapshots of {volume} on S3"),
            Duration::from_secs(60),
            || {
                snapshots(&node, volume)
                    .iter()
                    .all(|s| s["in_backend"] == true)
                    .then_some(())
            },
        );
    }
    // b@s0's and c@s0's views are built (and cached) while S3 answers; then c is scrubbed,
    // which rewrites its TLog list, so c@s0's map must be rebuilt before its next answer.
    let bound = Duration::from_secs(20);
    let b_snap = node.uri("b@s0");
    run_ok(&mut qemu_io_within(bound, &b_snap, &["read -P 0x70 0 4M"]));
    let c_snap = node.uri("c@s0");
    run_ok(&mut qemu_io_within(bound, &c_snap, &["read -P 0x80 0 4M"]));
    node.cli_ok(&["snapshot", "delete", "c", "s1"]);
    let report: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["volume", "scrub", "c", "--json"])).unwrap();
    assert!(
        report["scos_rewritten"].as_u64() > Some(0)
            || report["tlogs_after"] != report["tlogs_before"],
        "the scrub rewrote nothing: {report}"
    );

    proxy.down();
    let mut waiting: Vec<_> = [("s1", 0x61), ("s1", 0x61), ("s2", 0x62)]
        .iter()
        .map(|(snapshot, pattern)| {
            let uri = node.uri(&format!("a@{snapshot}"));
            let read = format!("read -P {pattern:#x} 0 4M");
            qemu_io_within(Duration::from_secs(120), &uri, &[&read])
                .spawn()
                .unwrap()
        })
        .collect();
    let mut maps: Vec<_> = (0..3)
        .map(|_| {
            Command::new("timeout")
                .args(["120", "nbdinfo", "--map", &c_snap])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // The views' TLog reads are under way: S3 has not answered one for 3 s.
    wait_outage_warning(&node);
    // Meanwhile: another volume's clients connect and do I/O, and the view built before the
    // outage opens again; each within the bound, while S3 is still away.
    io_carries_on(&node, "b", "4M");
    let (ok, out) = run_any(&mut qemu_io_within(bound, &b_snap, &["read -P 0x70 0 4M"]));
    assert!(ok, "the cached view of b@s0 waited for S3: {out}");
    for client in waiting.iter_mut().chain(maps.iter_mut()) {
        assert!(
            client.try_wait().unwrap().is_none(),
            "a snapshot client finished with S3 away: {}",
            node.log_text()
        );
    }

    proxy.up();
    for mut reader in waiting {
        let status = reader.wait().unwrap();
        assert!(
            status.success(),
            "a snapshot client failed once S3 was back ({status}): {}",
            node.log_text()
        );
    }
    for map in maps {
        let out = map.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "nbdinfo --map failed: {text}");
        // The first 4 MiB hold c@s0's data, the rest of the 16 MiB volume is a hole.
        let first = text.split_whitespace().take(3).collect::<Vec<_>>();
        assert_eq!(first, ["0", "4194304", "0"], "c@s0's allocation: {text}");
    }
    run_ok(&mut qemu_io_within(bound, &c_snap, &["read -P 0x80 0 4M"]));
    assert_eq!(node.info("a")["state"], "running");
}

/// A write that covers part of a cluster whose data is only on S3 reads that cluster first, so
/// during an S3 outage such writes wait for S3. Only they: with six of them pending (more than
/// the node's runtime has worker threads on a machine of up to six CPUs), another volume's
/// clients still connect, write and read back. Once S3 is back, every waiting write completes
/// and reads back merged with the evicted data around it.
#[test]
fn partial_writes_over_evicted_data_waiting_for_s3_hold_up_no_other_client() {
    require_tool("qemu-io");
    require_tool("timeout");
    let tmp = tempfile::tempdir().unwrap();
    let (mut proxy, backend) = s3_behind_a_proxy();
    let node = node_with_evicted_volume(tmp.path(), &backend);
    node.cli_ok(&["volume", "create", "other", "--size", "16M"]);
    let uri = node.uri("vol");

    proxy.down();
    // 512 bytes inside each of six evicted 4 KiB clusters of the first SCO, each from its own
    // NBD connection (our client: qemu aligns such writes to 4 KiB itself, reading first).
    let offsets: Vec<u64> = (0..6).map(|i| i * 65536 + 512).collect();
    let writers: Vec<_> = offsets
        .iter()
        .map(|&offset| {
            let addr = node.nbd.clone();
            std::thread::spawn(move || {
                let mut client =
                    NbdClient::connect_timeout(&addr, "vol", Some(Duration::from_secs(120)))?;
                client.write(offset, &[0x99; 512], false)
            })
        })
        .collect();
    wait_outage_warning(&node);
    io_carries_on(&node, "other", "0");
    assert!(
        writers.iter().all(|writer| !writer.is_finished()),
        "a write over evicted data finished with S3 away: {}",
        node.log_text()
    );

    proxy.up();
    for writer in writers {
        let answer = writer.join().unwrap();
        assert!(
            matches!(answer, Ok(0)),
            "a write failed once S3 was back ({answer:?}): {}",
            node.log_text()
        );
    }
    for offset in offsets {
        let cluster = offset - 512;
        run_ok(&mut qemu_io_within(
            Duration::from_secs(60),
            &uri,
            &[
                &format!("read -P 0x61 {cluster} 512"),
                &format!("read -P 0x99 {offset} 512"),
                &format!("read -P 0x61 {} 3072", offset + 512),
            ],
        ));
    }
    run_ok(&mut read_pattern(&uri, "4M", "8M", 0x61));
    run_ok(&mut read_pattern(&uri, "12M", "12M", 0x62));
    assert_eq!(node.info("vol")["state"], "running");
}

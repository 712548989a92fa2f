//! Real NBD clients against `vstor serve`: qemu-io, qemu-img, nbdinfo, nbdcopy and fio.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::process::Command;

use common::{checksum_file, require_tool, run_ok, Daemon};
use serde_json::Value;

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");
    out
}

#[test]
fn qemu_io_patterns_aligned_unaligned_discard_and_zero() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("vol", "256M");
    let uri = daemon.uri("vol");
    let out = qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "write -P 0x11 1536 3584",
            "write -P 0x22 1M 4M",
            "write -P 0x33 130560 1024",
            "flush",
        ],
    );
    assert!(out.contains("wrote 65536/65536 bytes"), "{out}");
    let out = qemu_io(
        &uri,
        &[
            "read -P 0xab 0 1536",
            "read -P 0x11 1536 3584",
            "read -P 0xab 5120 60416",
            "read -P 0x22 1M 4M",
            "read -P 0 65536 65024",
            "read -P 0x33 130560 1024",
            "read -P 0 131584 512",
        ],
    );
    assert_eq!(out.matches("read ").count(), 7, "{out}");
    // A wrong expectation must be reported: this is what makes the checks above meaningful.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "read -P 0xcd 0 4k"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));

    qemu_io(
        &uri,
        &["discard 1M 1M", "write -z 3M 1M", "write -z -u 4M 512k"],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0 1M 1M",
            "read -P 0x22 2M 1M",
            "read -P 0 3M 1M",
            "read -P 0 4M 512k",
            "read -P 0x22 4608k 512k",
        ],
    );
    let info = daemon.info("vol");
    assert!(info["discards"].as_u64().unwrap() >= 1, "{info}");

    // A read-only volume: reads work, writes are refused with EPERM and change nothing.
    daemon.cli_ok(&["volume", "update", "vol", "--read-only", "true"]);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-r", &uri, "-c", "read -P 0x22 2M 1M"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -P 0x99 2M 4k"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Operation not permitted")
            || text.contains("read-only")
            || text.contains("Permission denied"),
        "{text}"
    );
    daemon.cli_ok(&["volume", "update", "vol", "--read-only", "false"]);
    qemu_io(&uri, &["read -P 0x22 2M 1M"]);
    assert!(info["flushes"].as_u64().unwrap() >= 1, "{info}");
}

#[test]
fn nbdinfo_reports_size_capabilities_and_allocation() {
    require_tool("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("vol", "1G");
    qemu_io(
        &daemon.uri("vol"),
        &["write -P 0x5a 0 1M", "write -P 0x5a 512M 64k"],
    );

    let json: Value = serde_json::from_str(&run_ok(
        Command::new("nbdinfo").args(["--json", &daemon.uri("vol")]),
    ))
    .unwrap();
    let export = &json["exports"][0];
    assert_eq!(export["export-name"], "vol");
    assert_eq!(export["export-size"], 1u64 << 30);
    for capability in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[capability], true, "{capability}: {export}");
    }
    assert_eq!(export["is_read_only"], false);
    let contexts: Vec<&str> = export["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(contexts.contains(&"base:allocation"), "{export}");

    let map = run_ok(Command::new("nbdinfo").args(["--map", &daemon.uri("vol")]));
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|line| {
            let mut f = line.split_whitespace();
            (
                f.next().unwrap().parse().unwrap(),
                f.next().unwrap().parse().unwrap(),
                f.next().unwrap().parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, 1 << 20, 0),
            (1 << 20, (512 << 20) - (1 << 20), 3),
            (512 << 20, 64 << 10, 0),
            ((512 << 20) + (64 << 10), (512 << 20) - (64 << 10), 3),
        ],
        "{map}"
    );
    let list = run_ok(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd://{}", daemon.nbd),
    ]));
    assert!(list.contains("\"vol\""), "{list}");
}

/// Data extents of `qemu-img map --output=json`, merged.
fn data_extents(target: &str) -> Vec<(u64, u64)> {
    let json: Value = serde_json::from_str(&run_ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        target,
    ])))
    .unwrap();
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for entry in json.as_array().unwrap() {
        if entry["data"] != true {
            continue;
        }
        let (start, length) = (
            entry["start"].as_u64().unwrap(),
            entry["length"].as_u64().unwrap(),
        );
        match extents.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += length,
            _ => extents.push((start, length)),
        }
    }
    extents
}

#[test]
fn qemu_img_convert_sparse_image_in_and_out() {
    require_tool("qemu-img");
    require_tool("nbdcopy");
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("img", "4G");
    let uri = daemon.uri("img");

    // A 4 GiB sparse raw image with random data in a few places.
    let source = tmp.path().join("source.raw");
    let file = std::fs::File::create(&source).unwrap();
    file.set_len(4 << 30).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for (offset, len) in [
        (0u64, 8u64 << 20),
        (1 << 30, 16 << 20),
        ((3 << 30) + (1 << 29), 1 << 20),
        ((4 << 30) - (64 << 10), 64 << 10),
    ] {
        let data: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8 | 1
            })
            .collect();
        std::os::unix::fs::FileExt::write_all_at(&file, &data, offset).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);

    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&source)
            .arg(&uri),
    );
    let out = tmp.path().join("out.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&out),
    );
    let source_checksum = checksum_file(&source);
    assert_eq!(checksum_file(&out), source_checksum);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&source)
            .arg(&uri),
    );

    let expected = data_extents(source.to_str().unwrap());
    assert_eq!(expected.len(), 4, "{expected:?}");
    assert_eq!(
        data_extents(&uri),
        expected,
        "the volume's hole map matches the image's"
    );
    assert_eq!(
        daemon.info("img")["written_bytes"],
        (8u64 << 20) + (16 << 20) + (1 << 20) + (64 << 10)
    );

    // nbdcopy volume to volume (multi-conn, block status on both ends) gives the same bytes
    // and the same holes.
    daemon.create_volume("copy", "4G");
    let copy = daemon.uri("copy");
    run_ok(Command::new("nbdcopy").args(["--connections=2", &uri, &copy]));
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&source)
            .arg(&copy),
    );
    assert_eq!(data_extents(&copy), expected);
    let copied = tmp.path().join("copied.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &copy])
            .arg(&copied),
    );
    assert_eq!(checksum_file(&copied), source_checksum);
}

#[test]
fn fio_verify_at_depth_32_over_two_connections() {
    require_tool("fio");
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("fio", "256M");
    // fio saves `local-verify-N-verify.state` files into its working directory: run it in the
    // test's temporary directory, not in the repository.
    let out = run_ok(Command::new("fio").current_dir(tmp.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", daemon.uri("fio")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--numjobs=2",
        "--size=64M",
        "--offset_increment=64M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let json: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let jobs = json["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    for job in jobs {
        assert_eq!(job["error"], 0, "{job}");
        assert!(
            job["write"]["io_bytes"].as_u64().unwrap() >= 64 << 20,
            "{job}"
        );
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 64 << 20,
            "verify read back: {job}"
        );
    }
    assert_eq!(daemon.info("fio")["written_bytes"], 128u64 << 20);
}

/// fio with 256 KiB random writes at queue depth 8: large enough that the NBD server runs them on
/// its blocking pool and the volume copies their data without its lock (`volume/inflight.rs`),
/// several at once. Verified as written, and again after `kill -9` and a restart (the job ends
/// with a flush, so every write it made must be there).
#[test]
fn fio_large_writes_at_depth_8_verify_before_and_after_kill_9() {
    require_tool("fio");
    let tmp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(tmp.path());
    daemon.create_volume("big", "256M");
    let fio = |uri: String, verify_only: bool| {
        let mut cmd = Command::new("fio");
        // fio writes its verify state into its working directory: the test's, not the repo.
        cmd.current_dir(tmp.path()).args([
            "--name=large",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=256k",
            "--iodepth=8",
            "--size=192M",
            "--randseed=4242",
            "--end_fsync=1",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
        ]);
        if verify_only {
            cmd.arg("--verify_only");
        }
        let out = run_ok(&mut cmd);
        let json: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
        let job = json["jobs"][0].clone();
        assert_eq!(job["error"], 0, "{job}");
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 192 << 20,
            "verify read everything back: {job}"
        );
        job
    };
    let written = fio(daemon.uri("big"), false);
    assert!(
        written["write"]["io_bytes"].as_u64().unwrap() >= 192 << 20,
        "{written}"
    );
    daemon.kill9();
    daemon.launch();
    fio(daemon.uri("big"), true);
}

//! `vstor volume import` and `vstor volume export` with real images: a sparse raw file and a
//! qcow2 image made by qemu-img/qemu-io go in, read back identical (qemu-img compare), and only
//! their data is written; a volume comes out as a sparse raw file that compares equal. Wrong
//! input gets a clear error and creates nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::{require_tool, run_ok, Daemon};

fn qemu_io(format: &str, target: &str, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format, target]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run_ok(&mut cmd);
}

fn compare(format: &str, image: &std::path::Path, uri: &str) {
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", format, "-F", "raw"])
            .arg(image)
            .arg(uri),
    );
}

fn json(daemon: &Daemon, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&daemon.cli_ok(&all)).unwrap()
}

fn failure(daemon: &Daemon, args: &[&str]) -> String {
    let out = daemon.cli(args);
    assert!(!out.status.success(), "vstor {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn images_go_in_and_out_holes_stay_holes() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());

    // A sparse raw image, 48 MiB + 512 bytes (not a multiple of 4 KiB), 3 MiB + 4 KiB of data.
    let raw = tmp.path().join("disk.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len((48 << 20) + 512)
        .unwrap();
    let raw_s = raw.to_str().unwrap();
    qemu_io(
        "raw",
        raw_s,
        &[
            "write -P 0x41 0 1M",
            "write -P 0x42 20M 2M",
            "write -P 0x43 48M 512",
        ],
    );
    qemu_io("raw", raw_s, &["write -z 20M 4k"]); // zeros inside data: not written
    let report = json(&daemon, &["volume", "import", raw_s, "raw-vol"]);
    assert_eq!(report["format"], "raw");
    assert_eq!(report["size"], (48u64 << 20) + 4096);
    let data = report["data_bytes"].as_u64().unwrap();
    assert!(data <= (3 << 20) + 4096, "holes were written: {report}");
    assert!(data >= (3 << 20) - 4096, "{report}");
    let info = daemon.info("raw-vol");
    assert!(
        info["written_bytes"].as_u64().unwrap() <= (3 << 20) + 4096,
        "{info}"
    );
    // The padded tail reads as zeros: compare the image with the volume's first bytes.
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&raw)
            .arg(daemon.uri("raw-vol")),
    );

    // A qcow2 image (format detected by its magic).
    let qcow2 = tmp.path().join("disk.qcow2");
    run_ok(Command::new("qemu-img").args([
        "create",
        "-f",
        "qcow2",
        qcow2.to_str().unwrap(),
        "32M",
    ]));
    qemu_io(
        "qcow2",
        qcow2.to_str().unwrap(),
        &["write -P 0x51 1M 2M", "write -P 0x52 30M 64k"],
    );
    let report = json(
        &daemon,
        &["volume", "import", qcow2.to_str().unwrap(), "q-vol"],
    );
    assert_eq!(report["format"], "qcow2");
    assert_eq!(report["size"], 32u64 << 20);
    compare("qcow2", &qcow2, &daemon.uri("q-vol"));

    // Export: a sparse file equal to the volume. Only the data is read: the allocation map
    // says where the 2 MiB + 64 KiB are.
    let out = tmp.path().join("out.raw");
    let read_bytes = || daemon.info("q-vol")["read_bytes"].as_u64().unwrap();
    let before = read_bytes();
    let report = json(
        &daemon,
        &["volume", "export", "q-vol", out.to_str().unwrap()],
    );
    let read = read_bytes() - before;
    assert!(
        ((2 << 20) + (64 << 10)..=4 << 20).contains(&read),
        "export read {read} bytes of a 32 MiB volume holding 2 MiB + 64 KiB"
    );
    assert_eq!(report["data_bytes"], (2u64 << 20) + (64 << 10), "{report}");
    assert_eq!(report["size"], 32u64 << 20);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 32 << 20);
    compare("raw", &out, &daemon.uri("q-vol"));
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated < 8 << 20,
        "export wrote {allocated} bytes for 2 MiB of data"
    );
    // Text output names what happened.
    let text = daemon.cli_ok(&[
        "volume",
        "export",
        "raw-vol",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert!(text.contains("exported volume raw-vol"), "{text}");

    // Wrong input: clear errors, nothing created.
    let err = failure(
        &daemon,
        &["volume", "export", "q-vol", out.to_str().unwrap()],
    );
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    let err = failure(&daemon, &["volume", "import", "/nonexistent.img", "ghost"]);
    assert!(err.contains("/nonexistent.img"), "{err}");
    let err = failure(
        &daemon,
        &["volume", "import", raw_s, "small", "--size", "1M"],
    );
    assert!(err.contains("smaller than the image"), "{err}");
    let err = failure(&daemon, &["volume", "import", raw_s, "raw-vol"]);
    assert!(err.contains("raw-vol"), "{err}");
    let err = failure(
        &daemon,
        &["volume", "import", raw_s, "x", "--format", "vmdk"],
    );
    assert!(err.contains("vmdk"), "{err}");
    for ghost in ["ghost", "small", "x"] {
        assert!(
            !daemon.cli(&["volume", "info", ghost]).status.success(),
            "{ghost} exists"
        );
    }
}

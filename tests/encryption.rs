//! Encryption at rest (`vstor volume create --encryption-key-file`) with real processes: a
//! `vstor serve`, a `vstor dtl`, and nbdcopy/qemu-img as the clients. A distinctive plaintext
//! written over NBD is found nowhere on disk (backend, write buffer, DTL) for an encrypted
//! volume, while a plaintext control volume's backend does hold it (so the scan can fail); the
//! data reads back after `kill -9`, through a snapshot and a clone and after a scrub; a replaced
//! or missing key fails that one volume, by name and file, while the node's other volumes run.
//! The S3 variant scans the bucket's objects.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::guest::KillOnDrop;
use common::{
    checksum_file, export_checksum, require_tool, run_ok, start_dtl, Daemon, TestBackend,
};

const MARKER: &[u8] = b"VSTOR-PLAINTEXT-MARKER-0123456789";
/// The volumes' size, and the image written into them.
const IMAGE_BYTES: usize = 8 << 20;
const SIZE: &str = "8M";
const KEY: [u8; 32] = *b"0123456789abcdef-a-test-key-32b!";

/// A raw image of the marker repeated, each 4 KiB block stamped with its number.
fn write_image(path: &Path) {
    let mut data: Vec<u8> = MARKER.iter().copied().cycle().take(IMAGE_BYTES).collect();
    for (i, block) in data.chunks_mut(4096).enumerate() {
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    std::fs::write(path, data).unwrap();
}

/// Files under `dir` (recursively) that contain the marker.
fn files_with_marker(dir: &Path) -> Vec<PathBuf> {
    vstor_backend::testing::files_containing(dir, MARKER)
}

fn has_marker(bytes: &[u8]) -> bool {
    bytes.windows(MARKER.len()).any(|w| w == MARKER)
}

/// Objects of `volume`'s namespace that contain the marker (any backend, read through the store).
fn objects_with_marker(daemon: &Daemon, volume: &str) -> Vec<String> {
    let store = daemon.backend.store(&daemon.data_dir);
    let names = store.list(volume).unwrap();
    assert!(!names.is_empty(), "{volume} has objects");
    names
        .into_iter()
        .filter(|name| has_marker(&store.get(volume, name).unwrap()))
        .collect()
}

/// `nbdcopy` the image into the export.
fn copy_in(daemon: &Daemon, volume: &str, image: &Path) {
    run_ok(Command::new("nbdcopy").arg(image).arg(daemon.uri(volume)));
}

/// Write zeros over `[offset, +len)` of the export (qemu-io) and of the reference file.
fn zero(daemon: &Daemon, volume: &str, reference: &Path, offset: usize, len: usize) {
    let write = format!("write -P 0 {offset} {len}");
    common::write_with_reference(&daemon.uri(volume), reference, &[write]);
}

/// Total bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            if p.is_dir() {
                dir_bytes(&p)
            } else {
                p.metadata().unwrap().len()
            }
        })
        .sum()
}

/// Close the open TLog (a snapshot) and wait until everything is on the backend.
fn upload(daemon: &Daemon, volume: &str, snapshot: &str) {
    daemon.cli_ok(&["snapshot", "create", volume, snapshot]);
    daemon.wait_uploaded(volume);
}

fn create(daemon: &Daemon, volume: &str, extra: &[&str]) {
    let mut args = vec![
        "volume",
        "create",
        volume,
        "--size",
        SIZE,
        "--sco-size",
        "4M",
    ];
    args.extend_from_slice(extra);
    daemon.cli_ok(&args);
}

#[test]
fn encrypted_volumes_keep_plaintext_off_every_disk_and_need_their_key() {
    require_tool("nbdcopy");
    require_tool("qemu-img");
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let dtl_dir = tmp.path().join("dtl");
    std::fs::create_dir_all(&dtl_dir).unwrap();
    let (dtl, dtl_addr) = start_dtl(&dtl_dir, &["--listen", "127.0.0.1:0"]);
    let _dtl = KillOnDrop(dtl);
    let key = tmp.path().join("vol.key");
    std::fs::write(&key, KEY).unwrap();
    let key_arg = key.display().to_string();
    let image = tmp.path().join("image.raw");
    write_image(&image);
    let expected = checksum_file(&image);
    // What the volume should hold, kept in step with it.
    let reference = tmp.path().join("reference.raw");
    std::fs::copy(&image, &reference).unwrap();

    let node = tmp.path().join("node");
    std::fs::create_dir_all(&node).unwrap();
    let mut daemon = Daemon::start(&node);
    create(
        &daemon,
        "enc",
        &[
            "--dtl-mode",
            "sync",
            "--dtl",
            &dtl_addr,
            "--encryption-key-file",
            &key_arg,
        ],
    );
    create(&daemon, "plain", &[]);
    let info = daemon.info("enc");
    assert_eq!(info["encryption"], "aes-256-xts", "{info}");
    let fingerprint = info["encryption_key_fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(fingerprint.len(), 16, "{info}");
    assert!(!daemon
        .info("plain")
        .as_object()
        .unwrap()
        .contains_key("encryption"));
    let shown = daemon.cli_ok(&["volume", "info", "enc"]);
    assert!(
        shown.contains("aes-256-xts") && shown.contains(&fingerprint),
        "{shown}"
    );

    copy_in(&daemon, "enc", &image);
    copy_in(&daemon, "plain", &image);
    // Written, its TLog not uploaded yet: the DTL holds the data, as ciphertext, and so does
    // the write buffer.
    let wb = daemon.data_dir.join("write-buffer");
    assert!(
        dir_bytes(&dtl_dir) >= IMAGE_BYTES as u64,
        "the DTL holds the writes"
    );
    assert!(
        files_with_marker(&dtl_dir).is_empty(),
        "plaintext on the DTL's disk"
    );
    assert!(
        files_with_marker(&wb.join("enc")).is_empty(),
        "plaintext in the write buffer"
    );
    upload(&daemon, "enc", "s1");
    upload(&daemon, "plain", "s1");
    let backend = daemon.data_dir.join("backend");
    let leaked: Vec<PathBuf> = [backend.join("enc"), wb.join("enc"), dtl_dir.clone()]
        .iter()
        .flat_map(|dir| files_with_marker(dir))
        .collect();
    assert!(leaked.is_empty(), "plaintext in {leaked:?}");
    assert!(
        !files_with_marker(&backend.join("plain")).is_empty(),
        "the control volume's backend holds the plaintext: the scan can fail"
    );
    assert_eq!(export_checksum(&daemon, "enc", tmp.path()), expected);

    // kill -9 with a write only in the write buffer and the DTL: it reads back after restart.
    zero(&daemon, "enc", &reference, 1 << 20, 64 << 10);
    daemon.kill9();
    daemon.launch();
    assert_eq!(
        export_checksum(&daemon, "enc", tmp.path()),
        checksum_file(&reference)
    );

    // The snapshot's export and a clone of it read the snapshot; the clone inherits the key.
    assert_eq!(export_checksum(&daemon, "enc@s1", tmp.path()), expected);
    daemon.cli_ok(&["clone", "create", "encc", "--from", "enc@s1"]);
    assert_eq!(
        daemon.info("encc")["encryption_key_fingerprint"],
        fingerprint.as_str()
    );
    assert_eq!(export_checksum(&daemon, "encc", tmp.path()), expected);

    // Rewrite everything, overwrite a quarter of each SCO, scrub: the live clusters are
    // copied into new SCOs, ciphertext as it is, and still decrypt.
    copy_in(&daemon, "enc", &image);
    std::fs::copy(&image, &reference).unwrap();
    zero(&daemon, "enc", &reference, 0, 1 << 20);
    zero(&daemon, "enc", &reference, 5 << 20, 1 << 20);
    upload(&daemon, "enc", "s2");
    daemon.cli_ok(&["snapshot", "delete", "enc", "s2"]);
    let report = daemon.cli_ok(&["volume", "scrub", "enc", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(report["bytes_copied"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        export_checksum(&daemon, "enc", tmp.path()),
        checksum_file(&reference)
    );
    assert!(files_with_marker(&backend.join("enc")).is_empty());

    // Another key in the file: after a restart the encrypted volumes fail, by name and file;
    // the plaintext volume is served.
    std::fs::write(&key, [0u8; 32]).unwrap();
    daemon.kill9();
    daemon.launch();
    for volume in ["enc", "encc"] {
        let info = daemon.info(volume);
        assert_eq!(info["state"], "failed", "{info}");
        let reason = info["halted_reason"].as_str().unwrap();
        assert!(
            reason.contains(&format!("volume {volume}"))
                && reason.contains(&key_arg)
                && reason.contains(&fingerprint),
            "{reason}"
        );
    }
    assert_eq!(export_checksum(&daemon, "plain", tmp.path()), expected);
    // No key file at all: `volume restart` says why.
    std::fs::remove_file(&key).unwrap();
    let out = daemon.cli(&["volume", "restart", "enc"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("volume enc") && err.contains(&key_arg),
        "{err}"
    );
    // The key back: restarting the volume serves it again.
    std::fs::write(&key, KEY).unwrap();
    daemon.cli_ok(&["volume", "restart", "enc"]);
    assert_eq!(
        export_checksum(&daemon, "enc", tmp.path()),
        checksum_file(&reference)
    );
    daemon.terminate();
}

#[test]
fn s3_backed_encrypted_volumes_store_only_ciphertext() {
    require_tool("nbdcopy");
    require_tool("qemu-img");
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("vol.key");
    std::fs::write(&key, KEY).unwrap();
    let image = tmp.path().join("image.raw");
    write_image(&image);
    let node = tmp.path().join("node");
    std::fs::create_dir_all(&node).unwrap();
    let mut daemon = Daemon::start_on(&node, &TestBackend::s3(), &[]);
    create(
        &daemon,
        "enc",
        &["--encryption-key-file", &key.display().to_string()],
    );
    create(&daemon, "plain", &[]);
    for volume in ["enc", "plain"] {
        copy_in(&daemon, volume, &image);
        upload(&daemon, volume, "s1");
    }
    let leaked = objects_with_marker(&daemon, "enc");
    assert!(leaked.is_empty(), "plaintext in S3 objects {leaked:?}");
    assert!(
        !objects_with_marker(&daemon, "plain").is_empty(),
        "the control volume's objects hold the plaintext: the scan can fail"
    );
    // From S3 alone: restart without the write buffer.
    daemon.terminate();
    std::fs::remove_dir_all(daemon.data_dir.join("write-buffer").join("enc")).unwrap();
    daemon.launch();
    assert_eq!(
        export_checksum(&daemon, "enc", tmp.path()),
        checksum_file(&image)
    );
    daemon.terminate();
}

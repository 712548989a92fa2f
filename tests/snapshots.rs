//! Snapshots, clones, templates and scrubbing through `vstor serve` as a process: the CLI and its
//! errors, real clients (qemu-img, qemu-io, nbdinfo) on `VOL@SNAP` exports and clones, a
//! vhost-user probe on a snapshot socket, backend object accounting, and `kill -9` during
//! snapshot creation, rollback and scrubbing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    block_content, checksum_file, decode_block, export_checksum, require_tool, run_ok, Daemon,
    NbdClient, TestBackend,
};
use serde_json::Value;

const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;
const EPERM: u32 = 1;
const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Helpers

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run the CLI, insist that it fails with one clear line on stderr; returns that line.
fn cli_fails(daemon: &Daemon, args: &[&str]) -> String {
    let out = daemon.cli(args);
    assert!(
        !out.status.success(),
        "vstor {args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err:?}");
    assert!(err.starts_with("error: "), "{err}");
    err.trim_end().to_string()
}

fn cli_json(daemon: &Daemon, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = daemon.cli_ok(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("vstor {args:?}: bad JSON ({e}): {out}"))
}

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io {commands:?} on {uri}: {out}"
    );
    out
}

/// Read-only qemu-io session (`-r`), for snapshot exports.
fn qemu_io_ro(uri: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-r", "-f", "raw", uri]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io -r {commands:?} on {uri}: {out}"
    );
    out
}

fn qemu_img_compare(a: &str, b: &str) -> Output {
    Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", a, b])
        .output()
        .expect("run qemu-img compare")
}

fn snapshot_list(daemon: &Daemon, volume: &str) -> Vec<Value> {
    cli_json(daemon, &["snapshot", "list", volume])
        .as_array()
        .cloned()
        .expect("snapshot list is an array")
}

fn snapshot_names(daemon: &Daemon, volume: &str) -> Vec<String> {
    snapshot_list(daemon, volume)
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Poll until every snapshot of `volume` is on the backend.
fn wait_snapshots_in_backend(daemon: &Daemon, volume: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let list = snapshot_list(daemon, volume);
        if list.iter().all(|s| s["in_backend"] == true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "snapshots never reached the backend: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Poll until the volume's backend namespace holds exactly the objects its TLog list
/// references (no leaked SCO or TLog, none missing).
fn wait_no_leaked_objects(daemon: &Daemon, volume: &str) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let objects = daemon.backend_objects(volume);
        let referenced = daemon.backend_referenced(volume);
        if objects == referenced {
            return objects;
        }
        if Instant::now() > deadline {
            let leaked: Vec<_> = objects.difference(&referenced).collect();
            let missing: Vec<_> = referenced.difference(&objects).collect();
            panic!(
                "volume {volume}: backend objects differ from the referenced ones; leaked {leaked:?}, missing {missing:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sco_objects(objects: &BTreeSet<String>) -> usize {
    objects
        .iter()
        .filter(|o| vstor_volumedriver::ScoName::parse(o).is_some())
        .count()
}

fn scrub(daemon: &Daemon, volume: &str) -> Value {
    cli_json(daemon, &["volume", "scrub", volume])
}

/// Deterministic xorshift; the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn from_time(what: &str) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("{what}: seed {seed:#x}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The expected content of the first blocks of a volume: per 4 KiB block, the sequence number
/// of the `block_content` written there (0: never written, reads as zeros).
type Model = Vec<u64>;

/// Write `seqs` to consecutive blocks from `first`, 1 MiB per request, then FLUSH.
fn write_run(client: &mut NbdClient, first: u64, seqs: &[u64]) {
    for (i, chunk) in seqs.chunks(256).enumerate() {
        let start = first + i as u64 * 256;
        let mut buf = Vec::with_capacity(chunk.len() * BLOCK as usize);
        for (j, seq) in chunk.iter().enumerate() {
            buf.extend_from_slice(&block_content(start + j as u64, *seq, BLOCK as usize));
        }
        assert_eq!(client.write(start * BLOCK, &buf, false).unwrap(), 0);
    }
    assert_eq!(client.flush().unwrap(), 0);
}

/// Read the first `model.len()` blocks of an export and compare with the model.
fn check_content(daemon: &Daemon, export: &str, model: &[u64]) {
    let found = read_seqs(daemon, export, model.len() as u64);
    let wrong: Vec<String> = model
        .iter()
        .zip(&found)
        .enumerate()
        .filter(|(_, (want, got))| Some(**want) != **got)
        .map(|(block, (want, got))| format!("block {block}: want {want}, got {got:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{export}: {} of {} blocks wrong, e.g. {:?}",
        wrong.len(),
        model.len(),
        &wrong[..wrong.len().min(8)]
    );
}

fn read_seqs(daemon: &Daemon, export: &str, blocks: u64) -> Vec<Option<u64>> {
    let mut client = NbdClient::connect(&daemon.nbd, export)
        .unwrap_or_else(|e| panic!("connect to {export}: {e}"));
    let mut out = Vec::with_capacity(blocks as usize);
    let mut buf = vec![0u8; (256 * BLOCK) as usize];
    let mut block = 0;
    while block < blocks {
        let n = (blocks - block).min(256);
        let len = (n * BLOCK) as usize;
        assert_eq!(
            client.read(block * BLOCK, &mut buf[..len]).unwrap(),
            0,
            "read {export}"
        );
        for i in 0..n {
            let at = (i * BLOCK) as usize;
            out.push(decode_block(block + i, &buf[at..at + BLOCK as usize]));
        }
        block += n;
    }
    out
}

/// A minimal vhost-user frontend: enough of the protocol to read the device's features and
/// capacity (what a VMM learns before it boots the guest).
struct VhostProbe {
    stream: UnixStream,
}

const VHOST_USER_GET_FEATURES: u32 = 1;
const VHOST_USER_GET_PROTOCOL_FEATURES: u32 = 15;
const VHOST_USER_SET_PROTOCOL_FEATURES: u32 = 16;
const VHOST_USER_GET_CONFIG: u32 = 24;
const VHOST_USER_PROTOCOL_F_CONFIG: u64 = 1 << 9;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;

impl VhostProbe {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Self { stream }
    }

    fn send(&mut self, code: u32, payload: &[u8]) {
        let mut msg = Vec::new();
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&1u32.to_le_bytes()); // version 1
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        self.stream.write_all(&msg).unwrap();
    }

    fn request(&mut self, code: u32, payload: &[u8]) -> Vec<u8> {
        self.send(code, payload);
        let mut header = [0u8; 12];
        self.stream.read_exact(&mut header).unwrap();
        assert_eq!(u32::from_le_bytes(header[..4].try_into().unwrap()), code);
        let size = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size];
        self.stream.read_exact(&mut body).unwrap();
        body
    }

    fn features(&mut self) -> u64 {
        u64::from_le_bytes(
            self.request(VHOST_USER_GET_FEATURES, &[])[..8]
                .try_into()
                .unwrap(),
        )
    }

    /// Capacity in 512-byte sectors (virtio-blk config offset 0).
    fn capacity(&mut self) -> u64 {
        let protocol = self.request(VHOST_USER_GET_PROTOCOL_FEATURES, &[]);
        let protocol = u64::from_le_bytes(protocol[..8].try_into().unwrap());
        assert!(protocol & VHOST_USER_PROTOCOL_F_CONFIG != 0);
        self.send(
            VHOST_USER_SET_PROTOCOL_FEATURES,
            &VHOST_USER_PROTOCOL_F_CONFIG.to_le_bytes(),
        );
        let mut payload = Vec::new();
        payload.extend_from_slice(&0u32.to_le_bytes()); // offset
        payload.extend_from_slice(&8u32.to_le_bytes()); // size
        payload.extend_from_slice(&0u32.to_le_bytes()); // flags
        payload.extend_from_slice(&[0u8; 8]);
        let reply = self.request(VHOST_USER_GET_CONFIG, &payload);
        assert_eq!(reply.len(), 20, "GET_CONFIG reply");
        u64::from_le_bytes(reply[12..20].try_into().unwrap())
    }

    /// True once the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
    }
}

fn require_qemu_tools() {
    require_tool("qemu-img");
    require_tool("qemu-io");
}

// ---------------------------------------------------------------------------------------------
// Snapshots, clones, templates, exports

#[test]
fn snapshots_are_created_listed_read_through_nbd_and_deleted() {
    require_qemu_tools();
    require_tool("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.cli_ok(&[
        "volume",
        "create",
        "web",
        "--size",
        "256M",
        "--sco-size",
        "4M",
    ]);
    let web = daemon.uri("web");
    qemu_io(&web, &["write -P 0xaa 0 8M", "write -P 0xab 64M 4M"]);

    let out = daemon.cli_ok(&["snapshot", "create", "web", "s1"]);
    assert!(
        out.contains(
            "created snapshot s1 of volume web (12 MiB written since the previous snapshot)"
        ) && out.contains(&daemon.uri("web@s1")),
        "{out}"
    );
    qemu_io(&web, &["write -P 0xbb 0 4M", "discard 64M 4M"]);
    let s2 = cli_json(&daemon, &["snapshot", "create", "web", "s2"]);
    assert_eq!(s2["name"], "s2");
    assert_eq!(s2["written_bytes"], 4 * MIB);
    assert_eq!(s2["volume"], "web");

    // Errors a user meets.
    let err = cli_fails(&daemon, &["snapshot", "create", "web", "s1"]);
    assert!(
        err.contains("volume web already has a snapshot \"s1\""),
        "{err}"
    );
    let err = cli_fails(&daemon, &["snapshot", "create", "web", "bad/name"]);
    assert!(err.contains("snapshot name"), "{err}");
    let err = cli_fails(&daemon, &["snapshot", "create", "nope", "s1"]);
    assert!(err.contains("volume nope does not exist"), "{err}");
    let err = cli_fails(&daemon, &["snapshot", "delete", "web", "s9"]);
    assert!(err.contains("volume web has no snapshot \"s9\""), "{err}");

    wait_snapshots_in_backend(&daemon, "web");
    let list = snapshot_list(&daemon, "web");
    let names: Vec<&str> = list.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["s1", "s2"]);
    assert_eq!(list[0]["written_bytes"], 12 * MIB);
    assert!(list.iter().all(|s| s["clones"] == serde_json::json!([])));
    let text = daemon.cli_ok(&["snapshot", "list", "web"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("ON BACKEND"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("s1 ") && lines[1].contains("12 MiB") && lines[1].contains(" yes "),
        "{text}"
    );
    assert_eq!(daemon.info("web")["snapshots"], 2);

    // Each snapshot reads as it was, whatever the volume became.
    qemu_io_ro(
        &daemon.uri("web@s1"),
        &[
            "read -P 0xaa 0 8M",
            "read -P 0 8M 56M",
            "read -P 0xab 64M 4M",
        ],
    );
    qemu_io_ro(
        &daemon.uri("web@s2"),
        &[
            "read -P 0xbb 0 4M",
            "read -P 0xaa 4M 4M",
            "read -P 0 64M 4M",
        ],
    );
    qemu_io(&web, &["read -P 0xbb 0 4M", "read -P 0 64M 4M"]);

    // qemu-img convert out of the snapshot equals what was written before it.
    let expected = tmp.path().join("expected.raw");
    {
        let file = std::fs::File::create(&expected).unwrap();
        file.set_len(256 * MIB).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(&vec![0xaa; 8 * MIB as usize], 0).unwrap();
        file.write_all_at(&vec![0xab; 4 * MIB as usize], 64 * MIB)
            .unwrap();
    }
    assert_eq!(
        export_checksum(&daemon, "web@s1", tmp.path()),
        checksum_file(&expected)
    );
    let out = qemu_img_compare(&daemon.uri("web@s1"), expected.to_str().unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Read-only: writes get EPERM, the snapshot is unchanged.
    let mut client = NbdClient::connect(&daemon.nbd, "web@s1").unwrap();
    assert_eq!(client.size, 256 * MIB);
    assert_eq!(client.write(0, &[0x55; 4096], false).unwrap(), EPERM);
    drop(client);
    qemu_io_ro(&daemon.uri("web@s1"), &["read -P 0xaa 0 8M"]);

    // NBD_OPT_LIST shows the snapshots.
    let listing =
        run_ok(Command::new("nbdinfo").args(["--list", &format!("nbd://{}", daemon.nbd)]));
    for export in ["\"web\"", "\"web@s1\"", "\"web@s2\""] {
        assert!(listing.contains(export), "{listing}");
    }

    let out = daemon.cli_ok(&["snapshot", "delete", "web", "s1"]);
    assert!(out.contains("deleted snapshot s1 of volume web"), "{out}");
    assert_eq!(snapshot_names(&daemon, "web"), ["s2"]);
    let gone = Command::new("qemu-io")
        .args(["-r", "-f", "raw", &daemon.uri("web@s1"), "-c", "read 0 4k"])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "a deleted snapshot is not exported");
    qemu_io_ro(
        &daemon.uri("web@s2"),
        &["read -P 0xbb 0 4M", "read -P 0xaa 4M 4M"],
    );
    let err = cli_fails(&daemon, &["snapshot", "delete", "web", "s1"]);
    assert!(err.contains("has no snapshot \"s1\""), "{err}");
}

fn clone_equals_its_snapshot_and_then_diverges_on_its_own_on(backend: TestBackend) {
    require_qemu_tools();
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_on(tmp.path(), &backend, &[]);
    daemon.cli_ok(&[
        "volume",
        "create",
        "base",
        "--size",
        "256M",
        "--sco-size",
        "4M",
    ]);
    qemu_io(
        &daemon.uri("base"),
        &["write -P 0xa1 0 16M", "write -P 0xa2 100M 8M"],
    );
    daemon.cli_ok(&["snapshot", "create", "base", "gold"]);
    qemu_io(&daemon.uri("base"), &["write -P 0xb1 0 4M"]);

    let out = daemon.cli_ok(&["clone", "create", "c1", "--from", "base@gold"]);
    assert!(
        out.contains("created clone c1 of base@gold (256 MiB)") && out.contains(&daemon.uri("c1")),
        "{out}"
    );
    let info = daemon.info("c1");
    assert_eq!(info["parent"], "base@gold");
    assert_eq!(info["size"], 256 * MIB);
    assert!(info["vhost_socket"].as_str().unwrap().ends_with("/c1.sock"));
    assert!(Path::new(info["vhost_socket"].as_str().unwrap()).exists());
    assert_eq!(daemon.info("base")["children"], serde_json::json!(["c1"]));
    assert_eq!(
        snapshot_list(&daemon, "base")[0]["clones"],
        serde_json::json!(["c1"])
    );

    let out = qemu_img_compare(&daemon.uri("c1"), &daemon.uri("base@gold"));
    assert!(
        out.status.success(),
        "clone differs from its snapshot: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let gold = export_checksum(&daemon, "base@gold", tmp.path());
    let base = export_checksum(&daemon, "base", tmp.path());
    assert_ne!(gold, base);

    // Writes and trims on the clone touch neither the parent nor the snapshot.
    qemu_io(
        &daemon.uri("c1"),
        &["write -P 0xc1 4M 4M", "discard 100M 4M"],
    );
    qemu_io(
        &daemon.uri("c1"),
        &[
            "read -P 0xa1 0 4M",
            "read -P 0xc1 4M 4M",
            "read -P 0xa1 8M 8M",
            "read -P 0 100M 4M",
            "read -P 0xa2 104M 4M",
        ],
    );
    assert_eq!(export_checksum(&daemon, "base@gold", tmp.path()), gold);
    assert_eq!(export_checksum(&daemon, "base", tmp.path()), base);
    qemu_io(
        &daemon.uri("base"),
        &[
            "read -P 0xb1 0 4M",
            "read -P 0xa1 4M 12M",
            "read -P 0xa2 100M 8M",
        ],
    );
    let out = qemu_img_compare(&daemon.uri("c1"), &daemon.uri("base@gold"));
    assert_eq!(out.status.code(), Some(1), "the clone diverged");

    // A clone of a clone.
    daemon.cli_ok(&["snapshot", "create", "c1", "cs"]);
    daemon.cli_ok(&["clone", "create", "c2", "--from", "c1@cs"]);
    let out = qemu_img_compare(&daemon.uri("c2"), &daemon.uri("c1"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    qemu_io(&daemon.uri("c2"), &["write -P 0xc2 0 4k"]);
    qemu_io(&daemon.uri("c1"), &["read -P 0xa1 0 4M"]);

    // Scrubbing the parent after it overwrote everything the snapshot had keeps what the clones
    // read (their snapshot pins its SCOs); scrubbing a clone keeps what it inherited.
    qemu_io(
        &daemon.uri("base"),
        &[
            "write -P 0xb2 0 16M",
            "write -P 0xb3 100M 8M",
            "write -P 0xb4 0 16M",
        ],
    );
    daemon.cli_ok(&["snapshot", "create", "base", "after"]);
    wait_snapshots_in_backend(&daemon, "base");
    let report = scrub(&daemon, "base");
    eprintln!("parent scrub: {report}");
    assert_eq!(export_checksum(&daemon, "base@gold", tmp.path()), gold);
    let clone_reads = [
        "read -P 0xa1 0 4M",
        "read -P 0xc1 4M 4M",
        "read -P 0xa1 8M 8M",
        "read -P 0 100M 4M",
        "read -P 0xa2 104M 4M",
    ];
    qemu_io(&daemon.uri("c1"), &clone_reads);
    qemu_io(
        &daemon.uri("base"),
        &["read -P 0xb4 0 16M", "read -P 0xb3 100M 8M"],
    );
    wait_no_leaked_objects(&daemon, "base");
    daemon.cli_ok(&["snapshot", "create", "c1", "before-scrub"]);
    wait_snapshots_in_backend(&daemon, "c1");
    let report = scrub(&daemon, "c1");
    eprintln!("clone scrub: {report}");
    qemu_io(&daemon.uri("c1"), &clone_reads);
    let out = qemu_img_compare(&daemon.uri("c2"), &daemon.uri("c1@cs"));
    assert_eq!(out.status.code(), Some(1), "c2 has its own write");
    qemu_io(
        &daemon.uri("c2"),
        &[
            "read -P 0xc2 0 4k",
            "read -P 0xa1 4k 4092k",
            "read -P 0xc1 4M 4M",
        ],
    );

    // Errors.
    let err = cli_fails(&daemon, &["clone", "create", "c1", "--from", "base@gold"]);
    assert!(err.contains("volume c1 already exists"), "{err}");
    let err = cli_fails(&daemon, &["clone", "create", "x", "--from", "base@nope"]);
    assert!(
        err.contains("volume base has no snapshot \"nope\""),
        "{err}"
    );
    let err = cli_fails(&daemon, &["clone", "create", "x", "--from", "nope@gold"]);
    assert!(err.contains("volume nope does not exist"), "{err}");
    let err = cli_fails(&daemon, &["clone", "create", "x", "--from", "base"]);
    assert!(err.contains("volume base is not a template"), "{err}");
    let err = cli_fails(&daemon, &["snapshot", "delete", "base", "gold"]);
    assert!(
        err.contains("snapshot gold of volume base has clones (c1); delete them first"),
        "{err}"
    );
    let err = cli_fails(&daemon, &["volume", "delete", "base"]);
    assert!(err.contains("volume base has clones (c1)"), "{err}");
    let err = cli_fails(&daemon, &["volume", "delete", "c1"]);
    assert!(err.contains("volume c1 has clones (c2)"), "{err}");
    // A refused delete leaves the volume fully served.
    let info = daemon.info("base");
    assert_eq!(info["state"], "running");
    assert!(Path::new(info["vhost_socket"].as_str().unwrap()).exists());
    qemu_io(&daemon.uri("base"), &["read -P 0xb4 0 4M"]);

    // Deleting the clones releases the snapshot, then the volume.
    daemon.cli_ok(&["volume", "delete", "c2"]);
    daemon.cli_ok(&["volume", "delete", "c1"]);
    assert_eq!(daemon.info("base")["children"], serde_json::json!([]));
    daemon.cli_ok(&["snapshot", "delete", "base", "gold"]);
    daemon.cli_ok(&["volume", "delete", "base"]);
    assert!(daemon.backend_objects("base").is_empty());
}

#[test]
fn clone_equals_its_snapshot_and_then_diverges_on_its_own() {
    clone_equals_its_snapshot_and_then_diverges_on_its_own_on(TestBackend::Default);
}

#[test]
fn clone_on_s3_equals_its_snapshot_and_then_diverges_on_its_own() {
    clone_equals_its_snapshot_and_then_diverges_on_its_own_on(TestBackend::s3());
}

#[test]
fn clone_on_ec_equals_its_snapshot_and_then_diverges_on_its_own() {
    clone_equals_its_snapshot_and_then_diverges_on_its_own_on(TestBackend::ec());
}

#[test]
fn rollback_is_refused_while_in_use_and_forced_rollback_restores_the_snapshot() {
    require_qemu_tools();
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.cli_ok(&[
        "volume",
        "create",
        "db",
        "--size",
        "128M",
        "--sco-size",
        "4M",
    ]);
    qemu_io(&daemon.uri("db"), &["write -P 0x11 0 8M"]);
    daemon.cli_ok(&["snapshot", "create", "db", "s1"]);
    let s1 = export_checksum(&daemon, "db@s1", tmp.path());
    qemu_io(
        &daemon.uri("db"),
        &["write -P 0x22 0 4M", "write -P 0x23 32M 4M"],
    );
    daemon.cli_ok(&["snapshot", "create", "db", "s2"]);
    qemu_io(&daemon.uri("db"), &["write -P 0x33 8M 4M"]);

    // An NBD client: refused, nothing changes.
    let mut client = NbdClient::connect(&daemon.nbd, "db").unwrap();
    daemon.wait_for("db", "the NBD client", |i| i["nbd_connections"] == 1);
    let err = cli_fails(&daemon, &["snapshot", "rollback", "db", "s1"]);
    assert!(
        err.contains("volume db is in use (1 NBD client connected)") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(snapshot_names(&daemon, "db"), ["s1", "s2"]);
    let mut buf = vec![0u8; 4096];
    assert_eq!(client.read(0, &mut buf).unwrap(), 0);
    assert!(
        buf.iter().all(|b| *b == 0x22),
        "data unchanged by the refused rollback"
    );
    drop(client);
    daemon.wait_for("db", "the NBD client to leave", |i| {
        i["nbd_connections"] == 0
    });

    // A vhost-user frontend: refused too.
    let socket = PathBuf::from(daemon.info("db")["vhost_socket"].as_str().unwrap());
    let mut probe = VhostProbe::connect(&socket);
    assert_eq!(
        probe.features() & VIRTIO_BLK_F_RO,
        0,
        "a volume is writable"
    );
    daemon.wait_for("db", "the vhost-user frontend", |i| {
        i["vhost_connected"] == true
    });
    let err = cli_fails(&daemon, &["snapshot", "rollback", "db", "s1"]);
    assert!(err.contains("a vhost-user frontend connected"), "{err}");
    let err = cli_fails(&daemon, &["snapshot", "rollback", "db", "nope", "--force"]);
    assert!(err.contains("volume db has no snapshot \"nope\""), "{err}");

    // --force disconnects both and rolls back.
    let mut client = NbdClient::connect(&daemon.nbd, "db").unwrap();
    daemon.wait_for("db", "the NBD client", |i| i["nbd_connections"] == 1);
    let out = daemon.cli_ok(&["snapshot", "rollback", "db", "s1", "--force"]);
    assert!(
        out.contains("rolled volume db back to snapshot s1 (dropped snapshots s2; disconnected 1 NBD client(s); disconnected the vhost-user frontend)"),
        "{out}"
    );
    assert!(
        client.read(0, &mut buf).is_err(),
        "the NBD client was disconnected"
    );
    assert!(probe.closed(), "the vhost-user frontend was disconnected");
    assert!(socket.exists(), "the vhost-user export is back");
    let info = daemon.wait_for("db", "clients gone", |i| {
        i["nbd_connections"] == 0 && i["vhost_connected"] == false
    });
    assert_eq!(info["snapshots"], 1);

    assert_eq!(export_checksum(&daemon, "db", tmp.path()), s1);
    let out = qemu_img_compare(&daemon.uri("db"), &daemon.uri("db@s1"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(snapshot_names(&daemon, "db"), ["s1"]);
    let gone = Command::new("qemu-io")
        .args(["-r", "-f", "raw", &daemon.uri("db@s2"), "-c", "read 0 4k"])
        .output()
        .unwrap();
    assert!(
        !gone.status.success(),
        "the dropped snapshot is not exported"
    );

    // The volume works on from the snapshot; the name s2 is free again.
    qemu_io(
        &daemon.uri("db"),
        &[
            "write -P 0x44 0 4k",
            "read -P 0x44 0 4k",
            "read -P 0x11 4k 8188k",
        ],
    );
    daemon.cli_ok(&["snapshot", "create", "db", "s2"]);
    qemu_io_ro(
        &daemon.uri("db@s2"),
        &["read -P 0x44 0 4k", "read -P 0 32M 4M"],
    );
    let mut probe = VhostProbe::connect(&socket);
    assert_eq!(probe.capacity(), 128 * MIB / 512);
}

#[test]
fn template_refuses_writes_and_clones_from_it_work() {
    require_qemu_tools();
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.cli_ok(&[
        "volume",
        "create",
        "golden",
        "--size",
        "64M",
        "--sco-size",
        "4M",
    ]);
    qemu_io(&daemon.uri("golden"), &["write -P 0x5a 0 8M"]);

    let out = daemon.cli_ok(&["template", "set", "golden"]);
    assert!(
        out.contains("volume golden is now a read-only template (snapshot template)"),
        "{out}"
    );
    let info = daemon.info("golden");
    assert_eq!(info["template"], true);
    assert_eq!(info["read_only"], true);
    assert_eq!(info["snapshots"], 1);
    let text = daemon.cli_ok(&["volume", "info", "golden"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("template:") && l.ends_with("true")),
        "{text}"
    );

    // Writes are refused (NBD: EPERM), and the template cannot be made writable or rolled back.
    let mut client = NbdClient::connect(&daemon.nbd, "golden").unwrap();
    assert_eq!(client.write(0, &[1u8; 4096], false).unwrap(), EPERM);
    drop(client);
    let err = cli_fails(
        &daemon,
        &["volume", "update", "golden", "--read-only", "false"],
    );
    assert!(
        err.contains("a template stays read-only; clone it instead"),
        "{err}"
    );
    let err = cli_fails(&daemon, &["snapshot", "rollback", "golden", "template"]);
    assert!(err.contains("a template cannot be rolled back"), "{err}");
    qemu_io_ro(
        &daemon.uri("golden"),
        &["read -P 0x5a 0 8M", "read -P 0 8M 56M"],
    );

    // Clones from the template (by name) are ordinary writable volumes.
    let out = daemon.cli_ok(&["clone", "create", "vm1", "--from", "golden"]);
    assert!(
        out.contains("created clone vm1 of golden@template (64 MiB)"),
        "{out}"
    );
    let vm2 = cli_json(
        &daemon,
        &["clone", "create", "vm2", "--from", "golden@template"],
    );
    assert_eq!(vm2["parent"], "golden@template");
    assert_eq!(vm2["read_only"], false);
    for vm in ["vm1", "vm2"] {
        let out = qemu_img_compare(&daemon.uri(vm), &daemon.uri("golden"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    qemu_io(
        &daemon.uri("vm1"),
        &[
            "write -P 0x71 0 1M",
            "read -P 0x71 0 1M",
            "read -P 0x5a 1M 7M",
        ],
    );
    qemu_io(&daemon.uri("vm2"), &["read -P 0x5a 0 8M"]);
    qemu_io_ro(&daemon.uri("golden"), &["read -P 0x5a 0 8M"]);
    let mut children: Vec<String> = daemon.info("golden")["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    children.sort();
    assert_eq!(children, ["vm1", "vm2"]);
    let err = cli_fails(&daemon, &["volume", "delete", "golden"]);
    assert!(err.contains("has clones"), "{err}");
}

#[test]
fn snapshot_export_over_vhost_user_is_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(tmp.path());
    daemon.cli_ok(&[
        "volume",
        "create",
        "img",
        "--size",
        "64M",
        "--sco-size",
        "4M",
    ]);
    let mut client = NbdClient::connect(&daemon.nbd, "img").unwrap();
    write_run(&mut client, 0, &(1..=256).collect::<Vec<u64>>());
    drop(client);
    daemon.cli_ok(&["snapshot", "create", "img", "s1"]);

    let out = daemon.cli_ok(&["snapshot", "export", "img", "s1"]);
    let socket = daemon.data_dir.join("vhost").join("img@s1.sock");
    let socket = std::path::absolute(socket).unwrap();
    assert!(
        out.contains(&format!("served read-only at {}", socket.display())),
        "{out}"
    );
    assert!(socket.exists());
    // The export comes back after a restart.
    assert!(daemon.terminate().success());
    daemon.launch();
    assert!(socket.exists(), "snapshot socket re-created by the restart");
    let listed = snapshot_list(&daemon, "img");
    assert_eq!(listed[0]["vhost_socket"], socket.to_str().unwrap());

    let mut probe = VhostProbe::connect(&socket);
    assert_ne!(
        probe.features() & VIRTIO_BLK_F_RO,
        0,
        "VIRTIO_BLK_F_RO advertised"
    );
    assert_eq!(probe.capacity(), 64 * MIB / 512);
    let deadline = Instant::now() + DEADLINE;
    while snapshot_list(&daemon, "img")[0]["vhost_connected"] != true {
        assert!(Instant::now() < deadline, "vhost frontend not seen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let volume_socket = PathBuf::from(daemon.info("img")["vhost_socket"].as_str().unwrap());
    let mut volume_probe = VhostProbe::connect(&volume_socket);
    assert_eq!(
        volume_probe.features() & VIRTIO_BLK_F_RO,
        0,
        "the volume itself is writable"
    );

    let out = daemon.cli_ok(&["snapshot", "unexport", "img", "s1"]);
    assert!(out.contains("no longer served over vhost-user"), "{out}");
    assert!(probe.closed(), "the frontend was disconnected");
    assert!(!socket.exists(), "socket removed");
    let err = cli_fails(&daemon, &["snapshot", "unexport", "img", "s1"]);
    assert!(err.contains("is not exported over vhost-user"), "{err}");
    let err = cli_fails(&daemon, &["snapshot", "export", "img", "nope"]);
    assert!(err.contains("volume img has no snapshot \"nope\""), "{err}");

    // Deleting an exported snapshot removes its socket.
    daemon.cli_ok(&["snapshot", "export", "img", "s1"]);
    assert!(socket.exists());
    daemon.cli_ok(&["snapshot", "delete", "img", "s1"]);
    assert!(!socket.exists(), "socket of the deleted snapshot removed");
    assert!(volume_socket.exists());
}

/// One HTTP/1.1 request to the daemon's API; returns the status and the JSON body.
fn http(daemon: &Daemon, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut stream = std::net::TcpStream::connect(&daemon.api).unwrap();
    let (content_type, body) = match body {
        Some(body) => ("Content-Type: application/json\r\n", body.to_string()),
        None => ("", String::new()),
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
        daemon.api,
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    let value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{method} {path}: {e}: {body:?}"));
    (status, value)
}

fn expect_status(
    daemon: &Daemon,
    method: &str,
    path: &str,
    body: Option<Value>,
    status: u16,
) -> Value {
    let (got, value) = http(daemon, method, path, body);
    assert_eq!(got, status, "{method} {path}: {value}");
    if status >= 400 {
        assert!(
            value["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{value}"
        );
    }
    value
}

#[test]
fn api_answers_with_the_documented_statuses() {
    use serde_json::json;
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.cli_ok(&["volume", "create", "a", "--size", "64M", "--sco-size", "4M"]);
    daemon.cli_ok(&["volume", "create", "b", "--size", "64M", "--sco-size", "4M"]);
    let mut client = NbdClient::connect(&daemon.nbd, "a").unwrap();
    write_run(&mut client, 0, &(1..=512).collect::<Vec<u64>>());

    let snap = Some(json!({ "name": "s" }));
    let created = expect_status(
        &daemon,
        "POST",
        "/v1/volumes/a/snapshots",
        snap.clone(),
        201,
    );
    assert_eq!(created["written_bytes"], 2 * MIB);
    expect_status(
        &daemon,
        "POST",
        "/v1/volumes/a/snapshots",
        snap.clone(),
        409,
    );
    expect_status(
        &daemon,
        "POST",
        "/v1/volumes/a/snapshots",
        Some(json!({ "name": "x/y" })),
        400,
    );
    expect_status(&daemon, "POST", "/v1/volumes/nope/snapshots", snap, 404);
    expect_status(&daemon, "GET", "/v1/volumes/a/snapshots/nope", None, 404);
    expect_status(&daemon, "DELETE", "/v1/volumes/a/snapshots/nope", None, 404);
    expect_status(&daemon, "GET", "/v1/volumes/nope/snapshots", None, 404);
    let one = expect_status(&daemon, "GET", "/v1/volumes/a/snapshots/s", None, 200);
    assert_eq!(one["name"], "s");

    // Rollback while an NBD client is connected: 409, then forced.
    let rollback = "/v1/volumes/a/snapshots/s/rollback";
    expect_status(&daemon, "POST", rollback, None, 409);
    let done = expect_status(
        &daemon,
        "POST",
        rollback,
        Some(json!({ "force": true })),
        200,
    );
    assert_eq!(done["nbd_clients_disconnected"], 1);
    assert_eq!(done["rolled_back_to"], "s");
    assert!(client.flush().is_err(), "disconnected");

    // Clones.
    let clone = expect_status(
        &daemon,
        "POST",
        "/v1/clones",
        Some(json!({ "name": "c", "from": "a@s" })),
        201,
    );
    assert_eq!(clone["cloned_from"], "a@s");
    expect_status(
        &daemon,
        "POST",
        "/v1/clones",
        Some(json!({ "name": "c", "from": "a@s" })),
        409,
    );
    expect_status(
        &daemon,
        "POST",
        "/v1/clones",
        Some(json!({ "name": "x", "from": "a" })),
        400,
    );
    expect_status(
        &daemon,
        "POST",
        "/v1/clones",
        Some(json!({ "name": "x", "from": "a@" })),
        400,
    );
    expect_status(
        &daemon,
        "POST",
        "/v1/clones",
        Some(json!({ "name": "x", "from": "a@no" })),
        404,
    );
    expect_status(&daemon, "DELETE", "/v1/volumes/a/snapshots/s", None, 409);
    expect_status(&daemon, "DELETE", "/v1/volumes/a", None, 409);
    expect_status(
        &daemon,
        "POST",
        "/v1/volumes/a/snapshots/s/export",
        None,
        200,
    );
    expect_status(
        &daemon,
        "DELETE",
        "/v1/volumes/a/snapshots/s/export",
        None,
        200,
    );
    expect_status(
        &daemon,
        "DELETE",
        "/v1/volumes/a/snapshots/s/export",
        None,
        404,
    );

    // Templates.
    let template = expect_status(&daemon, "POST", "/v1/volumes/c/template", None, 200);
    assert_eq!(template["template"], true);
    assert_eq!(template["template_snapshot"]["name"], "template");
    expect_status(
        &daemon,
        "PATCH",
        "/v1/volumes/c",
        Some(json!({ "read_only": false })),
        409,
    );
    expect_status(
        &daemon,
        "POST",
        "/v1/volumes/c/snapshots/template/rollback",
        Some(json!({})),
        409,
    );
    expect_status(
        &daemon,
        "POST",
        "/v1/clones",
        Some(json!({ "name": "d", "from": "c" })),
        201,
    );

    // Scrub.
    let report = expect_status(&daemon, "POST", "/v1/volumes/a/scrub", None, 200);
    assert_eq!(report["volume"], "a");
    assert!(report["orphans_deleted"].is_u64(), "{report}");
    expect_status(
        &daemon,
        "POST",
        "/v1/volumes/nope/scrub",
        Some(json!({})),
        404,
    );

    // A snapshot whose TLogs cannot reach the backend cannot be cloned yet: 503.
    let mut client = NbdClient::connect(&daemon.nbd, "b").unwrap();
    let objects = daemon.backend_dir("b");
    let saved = tmp.path().join("objects-saved");
    std::fs::rename(&objects, &saved).unwrap();
    std::fs::write(&objects, b"not a directory").unwrap();
    write_run(&mut client, 0, &(1..=256).collect::<Vec<u64>>());
    drop(client);
    expect_status(
        &daemon,
        "POST",
        "/v1/volumes/b/snapshots",
        Some(json!({ "name": "s" })),
        201,
    );
    let err = expect_status(
        &daemon,
        "POST",
        "/v1/clones",
        Some(json!({ "name": "e", "from": "b@s", "wait_secs": 1 })),
        503,
    );
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("is not on the backend yet"),
        "{err}"
    );
    assert_eq!(snapshot_list(&daemon, "b")[0]["in_backend"], false);
    std::fs::remove_file(&objects).unwrap();
    std::fs::rename(&saved, &objects).unwrap();
    expect_status(
        &daemon,
        "POST",
        "/v1/clones",
        Some(json!({ "name": "e", "from": "b@s", "wait_secs": 60 })),
        201,
    );
    check_content(&daemon, "e", &(1..=256).collect::<Vec<u64>>());
}

// ---------------------------------------------------------------------------------------------
// Scrubbing

/// Write `blocks` blocks in order (generation 1), then overwrite a random half of them one by
/// one and the first `dead` blocks entirely (generation 2). Returns the model.
fn make_garbage(
    daemon: &Daemon,
    volume: &str,
    blocks: u64,
    dead: u64,
    model: &mut Model,
    next_seq: &mut u64,
    rng: &mut Rng,
) {
    let mut client = NbdClient::connect(&daemon.nbd, volume).unwrap();
    if model.len() < blocks as usize {
        model.resize(blocks as usize, 0);
    }
    if model.iter().all(|s| *s == 0) {
        let seqs: Vec<u64> = (0..blocks).map(|b| *next_seq + b).collect();
        *next_seq += blocks;
        write_run(&mut client, 0, &seqs);
        model[..blocks as usize].copy_from_slice(&seqs);
    }
    for _ in 0..blocks / 2 {
        let block = rng.below(blocks);
        let seq = *next_seq;
        *next_seq += 1;
        let data = block_content(block, seq, BLOCK as usize);
        assert_eq!(client.write(block * BLOCK, &data, false).unwrap(), 0);
        model[block as usize] = seq;
    }
    let seqs: Vec<u64> = (0..dead).map(|b| *next_seq + b).collect();
    *next_seq += dead;
    write_run(&mut client, 0, &seqs);
    model[..dead as usize].copy_from_slice(&seqs);
}

fn scrub_reclaims_overwritten_and_unpinned_space_and_leaves_only_referenced_objects_on(
    backend: TestBackend,
) {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_on(tmp.path(), &backend, &[]);
    daemon.cli_ok(&[
        "volume",
        "create",
        "sc",
        "--size",
        "256M",
        "--sco-size",
        "4M",
    ]);
    let mut rng = Rng::from_time("scrub");
    let (mut model, mut seq) = (Model::new(), 1u64);
    let blocks = 48 * MIB / BLOCK;
    make_garbage(&daemon, "sc", blocks, 2048, &mut model, &mut seq, &mut rng);
    daemon.cli_ok(&["snapshot", "create", "sc", "s1"]);
    wait_snapshots_in_backend(&daemon, "sc");
    let before = wait_no_leaked_objects(&daemon, "sc");
    let info = daemon.info("sc");
    assert!(
        info["garbage_bytes"].as_u64().unwrap() >= 24 * MIB,
        "{info}"
    );
    let disk_before = daemon.backend_disk_bytes("sc");

    let report = scrub(&daemon, "sc");
    eprintln!("first scrub: {report}");
    let deleted = report["scos_deleted"].as_u64().unwrap();
    assert!(report["scos_rewritten"].as_u64().unwrap() > 0, "{report}");
    assert!(
        deleted >= 2,
        "the fully overwritten SCOs are deleted: {report}"
    );
    let freed = report["bytes_freed"].as_u64().unwrap();
    assert!(freed >= 24 * MIB, "{report}");
    assert_eq!(report["orphans_deleted"], 0, "{report}");

    let after = wait_no_leaked_objects(&daemon, "sc");
    assert_eq!(sco_objects(&after), sco_objects(&before) - deleted as usize);
    let disk_after = daemon.backend_disk_bytes("sc");
    assert!(
        disk_after + freed * 9 / 10 <= disk_before,
        "backend shrank by {} bytes, the scrub says {freed} were freed",
        i128::from(disk_before) - i128::from(disk_after)
    );
    check_content(&daemon, "sc", &model);
    check_content(&daemon, "sc@s1", &model);
    let info = daemon.info("sc");
    assert_eq!(info["garbage_bytes"], 0);
    assert_eq!(info["backend_bytes"], blocks * BLOCK, "{info}");
    assert_eq!(info["last_scrub"]["trigger"], "api");
    assert_eq!(info["last_scrub"]["report"]["bytes_freed"], freed);
    assert!(info["scrub_progress"].is_null());
    let text = daemon.cli_ok(&["volume", "info", "sc"]);
    assert!(text.contains("scrub:") && text.contains("(api)"), "{text}");

    // Nothing left to do.
    let again = scrub(&daemon, "sc");
    assert_eq!(again["scos_rewritten"], 0, "{again}");
    assert_eq!(again["scos_deleted"], 0, "{again}");
    assert_eq!(again["orphans_deleted"], 0, "{again}");

    // Data overwritten after s1 stays while s1 pins it, and goes once s1 is deleted.
    let old_model = model.clone();
    let mut client = NbdClient::connect(&daemon.nbd, "sc").unwrap();
    let seqs: Vec<u64> = (0..4096).map(|b| seq + b).collect();
    write_run(&mut client, 0, &seqs);
    model[..4096].copy_from_slice(&seqs);
    drop(client);
    daemon.cli_ok(&["snapshot", "create", "sc", "s2"]);
    wait_snapshots_in_backend(&daemon, "sc");
    let pinned = scrub(&daemon, "sc");
    assert_eq!(pinned["scos_deleted"], 0, "s1 pins its data: {pinned}");
    check_content(&daemon, "sc@s1", &old_model);
    daemon.cli_ok(&["snapshot", "delete", "sc", "s1"]);
    let unpinned = scrub(&daemon, "sc");
    eprintln!("after deleting s1: {unpinned}");
    assert!(
        unpinned["bytes_freed"].as_u64().unwrap() >= 15 * MIB,
        "deleting s1 frees what only it kept: {unpinned}"
    );
    check_content(&daemon, "sc", &model);
    check_content(&daemon, "sc@s2", &model);
    wait_no_leaked_objects(&daemon, "sc");
    assert_eq!(daemon.info("sc")["backend_bytes"], blocks * BLOCK);
}

#[test]
fn scrub_reclaims_overwritten_and_unpinned_space_and_leaves_only_referenced_objects() {
    scrub_reclaims_overwritten_and_unpinned_space_and_leaves_only_referenced_objects_on(
        TestBackend::Default,
    );
}

#[test]
fn scrub_on_s3_reclaims_space_and_leaves_only_referenced_objects() {
    scrub_reclaims_overwritten_and_unpinned_space_and_leaves_only_referenced_objects_on(
        TestBackend::s3(),
    );
}

#[test]
fn scrub_on_ec_reclaims_space_and_leaves_only_referenced_objects() {
    scrub_reclaims_overwritten_and_unpinned_space_and_leaves_only_referenced_objects_on(
        TestBackend::ec(),
    );
}

/// A daemon in `root` whose background scrub checks every second and scrubs a volume once its
/// garbage passes `threshold`, copying at `rate` ("0": unthrottled).
fn background_scrub_daemon(root: &std::path::Path, threshold: &str, rate: &str) -> Daemon {
    let config = root.join("vstor.toml");
    std::fs::write(
        &config,
        format!(
            "[scrub]\nauto = true\ngarbage_threshold = \"{threshold}\"\nrate = \"{rate}\"\ncheck_interval_secs = 1\n"
        ),
    )
    .unwrap();
    Daemon::start_with(root, &["--config", config.to_str().unwrap()])
}

#[test]
fn background_scrub_runs_once_garbage_passes_the_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = background_scrub_daemon(tmp.path(), "8M", "0");
    daemon.cli_ok(&[
        "volume",
        "create",
        "bg",
        "--size",
        "64M",
        "--sco-size",
        "4M",
    ]);
    daemon.cli_ok(&[
        "volume",
        "create",
        "quiet",
        "--size",
        "64M",
        "--sco-size",
        "4M",
    ]);
    let mut client = NbdClient::connect(&daemon.nbd, "bg").unwrap();
    let first: Vec<u64> = (1..=4096).collect();
    write_run(&mut client, 0, &first);
    let second: Vec<u64> = (5000..5000 + 4096).collect();
    write_run(&mut client, 0, &second);
    drop(client);
    let mut quiet = NbdClient::connect(&daemon.nbd, "quiet").unwrap();
    write_run(&mut quiet, 0, &(1..=512).collect::<Vec<u64>>());
    drop(quiet);
    // Closes the TLog so that all of it reaches the backend.
    daemon.cli_ok(&["snapshot", "create", "bg", "s"]);

    let info = daemon.wait_for("bg", "a background scrub", |i| {
        i["last_scrub"]["trigger"] == "auto" && i["garbage_bytes"] == 0
    });
    let report = &info["last_scrub"]["report"];
    assert!(report["scos_deleted"].as_u64().unwrap() >= 4, "{info}");
    assert_eq!(info["backend_bytes"], 16 * MIB, "{info}");
    wait_no_leaked_objects(&daemon, "bg");
    check_content(&daemon, "bg", &second);
    check_content(&daemon, "bg@s", &second);
    // Below the threshold: left alone.
    assert!(daemon.info("quiet")["last_scrub"].is_null());
    assert!(daemon.log_text().contains("background scrubbing enabled"));
    // Nothing was written while it ran: it kept up.
    assert_eq!(info["last_scrub"]["behind"], false, "{info}");
    assert_eq!(info["last_scrub"]["garbage_after"], 0, "{info}");
    assert!(!daemon.log_text().contains("falling behind"));
}

/// A background scrub that the writes outrun says so, before the disk fills: `last_scrub`
/// (`behind`, `garbage_after`) in `volume info`, its text, the `vstor_volume_scrub_behind`
/// gauge and a warning in the log. The data written meanwhile reads back.
#[test]
fn a_background_scrub_outrun_by_the_writes_says_it_falls_behind() {
    let tmp = tempfile::tempdir().unwrap();
    // At 1 MiB/s the scrub copies the live half of 8 MiB for about 4 s.
    let daemon = background_scrub_daemon(tmp.path(), "2M", "1M");
    let create = [
        "volume",
        "create",
        "busy",
        "--size",
        "64M",
        "--sco-size",
        "4M",
    ];
    daemon.cli_ok(&create);
    let mut client = NbdClient::connect(&daemon.nbd, "busy").unwrap();
    let first: Vec<u64> = (1..=2048).collect();
    write_run(&mut client, 0, &first);
    // Every other block again: each SCO is half garbage, so the scrub copies the other half.
    for block in (0..2048u64).step_by(2) {
        let data = block_content(block, 10_000 + block, BLOCK as usize);
        assert_eq!(client.write(block * BLOCK, &data, false).unwrap(), 0);
    }
    assert_eq!(client.flush().unwrap(), 0);
    // A snapshot closes the TLog (all of it reaches the backend); deleted, it pins nothing.
    daemon.cli_ok(&["snapshot", "create", "busy", "s"]);
    daemon.cli_ok(&["snapshot", "delete", "busy", "s"]);
    daemon.wait_for("busy", "the background scrub to start", |i| {
        !i["scrub_progress"].is_null()
    });
    // While it copies, 8 MiB is overwritten: four times the threshold in new garbage.
    let second: Vec<u64> = (50_000..50_000 + 2048).collect();
    write_run(&mut client, 0, &second);
    drop(client);
    let info = daemon.wait_for("busy", "the background scrub's outcome", |i| {
        i["last_scrub"]["trigger"] == "auto"
    });
    let last = &info["last_scrub"];
    assert!(last["error"].is_null(), "{info}");
    assert_eq!(last["behind"], true, "{info}");
    assert!(last["garbage_after"].as_u64().unwrap() >= 8 * MIB, "{info}");
    let text = daemon.cli_ok(&["volume", "info", "busy"]);
    assert!(text.contains("FALLING BEHIND"), "{text}");
    assert!(text.contains("raise [scrub] rate"), "{text}");
    let metrics = common::metrics_text(&daemon.api);
    assert!(
        metrics.contains("vstor_volume_scrub_behind{volume=\"busy\"} 1"),
        "{metrics}"
    );
    assert!(
        daemon
            .log_text()
            .contains("the background scrub is falling behind the writes"),
        "{}",
        daemon.log_text()
    );
    check_content(&daemon, "busy", &second);
}

// ---------------------------------------------------------------------------------------------
// kill -9

/// What the snapshot writer thread knows.
#[derive(Default)]
struct SnapState {
    model: Model,
    /// Acknowledged snapshots and the content they must have.
    acked: Vec<(String, Model)>,
    /// The snapshot being created when the node died, if any.
    attempting: Option<(String, Model)>,
    /// A FUA write in flight: (block, seq).
    inflight: Option<(u64, u64)>,
}

const SNAP_BLOCKS: u64 = 256;

fn snapshot_writer(daemon_api: String, nbd: String, round: u32, state: Arc<Mutex<SnapState>>) {
    let Ok(mut client) = NbdClient::connect(&nbd, "crash") else {
        return;
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(round));
    let mut counter = 0u64;
    for i in 0.. {
        for _ in 0..4 {
            let block = rng.below(SNAP_BLOCKS);
            counter += 1;
            let seq = (u64::from(round) + 1) << 32 | counter;
            state.lock().unwrap().inflight = Some((block, seq));
            match client.write(
                block * BLOCK,
                &block_content(block, seq, BLOCK as usize),
                true,
            ) {
                Ok(0) => {}
                _ => return,
            }
            let mut st = state.lock().unwrap();
            st.model[block as usize] = seq;
            st.inflight = None;
        }
        let name = format!("r{round}-s{i}");
        {
            let mut st = state.lock().unwrap();
            st.attempting = Some((name.clone(), st.model.clone()));
        }
        let out = Command::new(common::VSTOR)
            .args(["snapshot", "create", "crash", &name])
            .env("VSTOR_API", &daemon_api)
            .output()
            .unwrap();
        if !out.status.success() {
            return;
        }
        let mut st = state.lock().unwrap();
        let attempt = st.attempting.take().unwrap();
        st.acked.push(attempt);
    }
}

#[test]
fn kill_9_during_snapshot_creation_keeps_every_acknowledged_snapshot_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(tmp.path());
    daemon.cli_ok(&[
        "volume",
        "create",
        "crash",
        "--size",
        "64M",
        "--sco-size",
        "4M",
    ]);
    let mut rng = Rng::from_time("snapshot crash");
    let state = Arc::new(Mutex::new(SnapState {
        model: vec![0; SNAP_BLOCKS as usize],
        ..SnapState::default()
    }));
    for round in 0..3u32 {
        let target = state.lock().unwrap().acked.len() + 3 + rng.below(6) as usize;
        let writer = {
            let (api, nbd, state) = (daemon.api.clone(), daemon.nbd.clone(), state.clone());
            std::thread::spawn(move || snapshot_writer(api, nbd, round, state))
        };
        let deadline = Instant::now() + DEADLINE;
        while state.lock().unwrap().acked.len() < target {
            assert!(
                !writer.is_finished(),
                "the writer stopped early: {}",
                daemon.log_text()
            );
            assert!(Instant::now() < deadline, "snapshots too slow");
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_micros(rng.below(30_000)));
        daemon.kill9();
        writer.join().unwrap();
        daemon.launch();

        let mut st = state.lock().unwrap();
        let present = snapshot_names(&daemon, "crash");
        for (name, _) in &st.acked {
            assert!(
                present.contains(name),
                "acknowledged snapshot {name} lost: {present:?}"
            );
        }
        for name in &present {
            let model = st
                .acked
                .iter()
                .chain(st.attempting.iter())
                .find(|(n, _)| n == name)
                .map_or_else(|| panic!("unknown snapshot {name}"), |(_, m)| m.clone());
            check_content(&daemon, &format!("crash@{name}"), &model);
        }
        let mut attempt_outcome = None;
        if let Some((name, model)) = st.attempting.take() {
            attempt_outcome = Some(present.contains(&name));
            if present.contains(&name) {
                st.acked.push((name, model));
            }
        }
        // The volume: every acknowledged (FUA) write; the one in flight is old or new.
        let found = read_seqs(&daemon, "crash", SNAP_BLOCKS);
        let inflight = st.inflight.take();
        for (block, got) in found.iter().enumerate() {
            let want = st.model[block];
            let ok = *got == Some(want)
                || inflight.is_some_and(|(b, s)| b == block as u64 && *got == Some(s));
            assert!(
                ok,
                "block {block}: want {want} (in flight {inflight:?}), got {got:?}"
            );
            st.model[block] = got.unwrap();
        }
        eprintln!(
            "round {round}: {} snapshots intact, the one being created at the kill {}",
            present.len(),
            match &attempt_outcome {
                Some(true) => "survived",
                Some(false) => "is gone",
                None => "- (none was)",
            }
        );
    }
    // Everything reaches the backend; a scrub completes and leaves no stray object.
    wait_snapshots_in_backend(&daemon, "crash");
    let report = scrub(&daemon, "crash");
    eprintln!("scrub after the crashes: {report}");
    wait_no_leaked_objects(&daemon, "crash");
    let st = state.lock().unwrap();
    for (name, model) in &st.acked {
        check_content(&daemon, &format!("crash@{name}"), model);
    }
    check_content(&daemon, "crash", &st.model);
    assert_eq!(scrub(&daemon, "crash")["orphans_deleted"], 0);
}

#[test]
fn kill_9_during_rollback_leaves_the_volume_before_or_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(tmp.path());
    daemon.cli_ok(&[
        "volume",
        "create",
        "rb",
        "--size",
        "128M",
        "--sco-size",
        "4M",
    ]);
    let mut rng = Rng::from_time("rollback crash");
    let blocks = 6144u64; // 24 MiB
    let mut client = NbdClient::connect(&daemon.nbd, "rb").unwrap();
    let base: Model = (1..=1024)
        .chain(std::iter::repeat_n(0, (blocks - 1024) as usize))
        .collect();
    write_run(&mut client, 0, &base[..1024]);
    drop(client);
    daemon.cli_ok(&["snapshot", "create", "rb", "base"]);
    let mut seq = 10_000u64;
    let (mut rolled_back, mut not_rolled_back) = (0, 0);
    for round in 0..4 {
        // Later history: 24 MiB over six SCOs, a snapshot of it, and a bit more.
        let mut client = NbdClient::connect(&daemon.nbd, "rb").unwrap();
        let later: Model = (0..blocks).map(|b| seq + b).collect();
        seq += blocks;
        write_run(&mut client, 0, &later);
        daemon.cli_ok(&["snapshot", "create", "rb", "later"]);
        let mut latest = later.clone();
        for b in 0..64 {
            latest[b as usize] = seq;
            assert_eq!(
                client
                    .write(b * BLOCK, &block_content(b, seq, BLOCK as usize), true)
                    .unwrap(),
                0
            );
            seq += 1;
        }
        drop(client);
        daemon.wait_for("rb", "the client to leave", |i| i["nbd_connections"] == 0);

        let cli = Command::new(common::VSTOR)
            .args(["snapshot", "rollback", "rb", "base"])
            .env("VSTOR_API", &daemon.api)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(40_000)));
        daemon.kill9();
        let acknowledged = cli.wait_with_output().unwrap().status.success();
        daemon.launch();

        let found = read_seqs(&daemon, "rb", blocks);
        let is = |model: &Model| found.iter().zip(model).all(|(g, w)| *g == Some(*w));
        let names = snapshot_names(&daemon, "rb");
        if is(&base) {
            rolled_back += 1;
            assert_eq!(names, ["base"], "round {round}");
        } else {
            assert!(
                is(&latest),
                "round {round}: the volume is neither the snapshot nor what it was"
            );
            assert!(
                !acknowledged,
                "round {round}: an acknowledged rollback was lost"
            );
            not_rolled_back += 1;
            assert_eq!(names, ["base", "later"], "round {round}");
            check_content(&daemon, "rb@later", &later);
            daemon.cli_ok(&["snapshot", "rollback", "rb", "base"]);
            check_content(&daemon, "rb", &base);
        }
        check_content(&daemon, "rb@base", &base);
    }
    eprintln!("rolled back before the kill: {rolled_back}, not: {not_rolled_back}");
    // A scrub right away sweeps whatever the kills left behind: objects of dropped history are
    // below the DTL floor or in a dropped TLog range.
    let report = scrub(&daemon, "rb");
    eprintln!("scrub right after the crashes: {report}");
    wait_no_leaked_objects(&daemon, "rb");
    check_content(&daemon, "rb", &base);
    // New history after the rollbacks, scrubbed again.
    let mut client = NbdClient::connect(&daemon.nbd, "rb").unwrap();
    let mut model = base.clone();
    for b in 0..2048u64 {
        model[b as usize] = seq + b;
    }
    write_run(&mut client, 0, &model[..2048]);
    drop(client);
    daemon.cli_ok(&["snapshot", "create", "rb", "after"]);
    wait_snapshots_in_backend(&daemon, "rb");
    let report = scrub(&daemon, "rb");
    eprintln!("scrub after the crashes: {report}");
    wait_no_leaked_objects(&daemon, "rb");
    check_content(&daemon, "rb", &model);
    check_content(&daemon, "rb@base", &base);
    check_content(&daemon, "rb@after", &model);
}

#[test]
fn kill_9_during_scrub_loses_nothing_and_the_next_scrub_leaves_no_leak() {
    let tmp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(tmp.path());
    daemon.cli_ok(&[
        "volume",
        "create",
        "ks",
        "--size",
        "256M",
        "--sco-size",
        "4M",
    ]);
    let mut rng = Rng::from_time("scrub crash");
    let (mut model, mut seq) = (Model::new(), 1u64);
    let blocks = 48 * MIB / BLOCK;
    let mut snapshots: Vec<(String, Model)> = Vec::new();
    // Round 0: a rate-limited scrub killed while it rewrites SCOs (its progress is seen on the
    // way); rounds 1 and 2: unlimited ones killed at a random moment, possibly after the commit.
    for round in 0..3 {
        make_garbage(&daemon, "ks", blocks, 1024, &mut model, &mut seq, &mut rng);
        let name = format!("s{round}");
        daemon.cli_ok(&["snapshot", "create", "ks", &name]);
        snapshots.push((name, model.clone()));
        wait_snapshots_in_backend(&daemon, "ks");

        let limited = round == 0;
        let mut args = vec!["volume", "scrub", "ks"];
        if limited {
            args.extend(["--rate", "24M"]);
        }
        let cli = Command::new(common::VSTOR)
            .args(&args)
            .env("VSTOR_API", &daemon.api)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + DEADLINE;
        let seen = loop {
            let info = daemon.info("ks");
            let phase = info["scrub_progress"]["phase"].clone();
            if limited && phase == "rewriting SCOs" || !limited && !phase.is_null() {
                break phase;
            }
            if !limited && !info["last_scrub"].is_null() {
                break Value::from("finished");
            }
            assert!(
                info["last_scrub"].is_null(),
                "the scrub ended before it was seen rewriting: {info}"
            );
            assert!(Instant::now() < deadline, "no scrub progress: {info}");
            std::thread::sleep(Duration::from_millis(5));
        };
        if limited {
            let err = cli_fails(&daemon, &["volume", "scrub", "ks"]);
            assert!(
                err.contains("volume ks: a scrub is already running"),
                "{err}"
            );
            let text = daemon.cli_ok(&["volume", "info", "ks"]);
            assert!(text.contains("running: rewriting SCOs"), "{text}");
        }
        let jitter = if limited {
            // The CLI shows the progress from 0.5 s on: let it print some before the kill.
            700_000 + rng.below(1_000_000)
        } else {
            // An unlimited scrub of this volume takes about a second here.
            rng.below(1_500_000)
        };
        std::thread::sleep(Duration::from_micros(jitter));
        daemon.kill9();
        let out = cli.wait_with_output().unwrap();
        eprintln!(
            "round {round}: killed {} ms after seeing {seen}; CLI {}",
            jitter / 1000,
            if out.status.success() {
                "finished"
            } else {
                "cut off"
            }
        );
        if limited {
            let progress = stderr(&out);
            assert!(progress.contains("scrub ks: "), "CLI progress: {progress}");
        }
        daemon.launch();

        check_content(&daemon, "ks", &model);
        for (name, snapshot) in &snapshots {
            check_content(&daemon, &format!("ks@{name}"), snapshot);
        }
    }
    let report = scrub(&daemon, "ks");
    eprintln!("scrub after the crashes: {report}");
    check_content(&daemon, "ks", &model);
    for (name, snapshot) in &snapshots {
        check_content(&daemon, &format!("ks@{name}"), snapshot);
    }
    wait_no_leaked_objects(&daemon, "ks");
    let again = scrub(&daemon, "ks");
    assert_eq!(again["orphans_deleted"], 0, "{again}");
    assert_eq!(again["scos_rewritten"], 0, "{again}");
    wait_no_leaked_objects(&daemon, "ks");
}

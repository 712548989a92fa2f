//! The erasure-coded tier with real processes: etcd, six `vstor osd` daemons in three domains and
//! a node on `--backend ec`, driven by fio and qemu-io over NBD. The write buffer is kept small
//! so the data a client reads back really comes from the OSDs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::tier::Tier;
use common::tier_map;
use common::tls::{peer_tls_flags, strs, Pki};
use common::{poll, require_tool, run_any, run_ok, Daemon, VSTOR};
use vstor_backend::{BackendError, ObjectStore};

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

/// `vstor preset create NAME --k 4 --m 2 --x 2 EXTRA...`.
fn create_preset(tier: &Tier, name: &str, extra: &[&str]) {
    let mut args = vec!["preset", "create", name, "--k", "4", "--m", "2", "--x", "2"];
    args.extend_from_slice(extra);
    tier.cli_ok(&args);
}

fn assert_fio_ok(out: &std::process::Output, what: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stdout.contains("verify:") && !stderr.contains("verify"),
        "fio {what} failed:\n{stdout}\n{stderr}"
    );
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
    node.wait_uploaded("v");
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
fn m_osds_killed_under_fio_lose_nothing_and_m_plus_one_halt_the_volume_until_restarted() {
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
    let info = node.wait_uploaded("v");
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
    // The volume halts rather than serve around the hole, and says why.
    let info = node.info("v");
    assert_eq!(info["state"], "halted", "{info}");
    assert!(
        info["halted_reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot be rebuilt")),
        "{info}"
    );

    // The OSDs come back with their disks intact; the operator restarts the volume and every
    // byte is readable again.
    for i in [0, 2, 4] {
        tier.osds[i].launch();
    }
    tier.wait_osds("all up again", |osds| {
        osds.iter().all(|o| o["state"] == "up")
    });
    // The node refreshes its OSD map every second: until it has, a restart fails (the volume
    // is then listed as failed) and may be tried again.
    poll("the volume restarted", Duration::from_secs(20), || {
        node.cli(&["volume", "restart", "v"])
            .status
            .success()
            .then_some(())
    });
    assert_eq!(node.info("v")["state"], "running");
    assert_fio_ok(
        &fio(&uri, "160M", "verify"),
        "verify after the OSDs returned",
    );
}

fn qemu_io(uri: &str, command: &str) -> String {
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", command, uri]))
}

/// `vstor backend repair NS --json`: the namespace's report (the command must succeed).
fn repair(tier: &Tier, namespace: &str) -> serde_json::Value {
    let out = tier.cli(&["backend", "repair", namespace, "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "repair of {namespace} failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(all[0]["fully_redundant"], true, "{all}");
    all[0]["report"].clone()
}

/// `vstor backend inspect NS --json`.
fn inspect(tier: &Tier, namespace: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(&tier.cli_ok(&["backend", "inspect", namespace, "--json"])).unwrap()
}

fn fragments_on(osds: &[serde_json::Value], id: u64) -> u64 {
    osds.iter()
        .find(|o| o["id"] == id)
        .and_then(|o| o["fragments"].as_u64())
        .unwrap_or(0)
}

#[test]
fn repair_rebuilds_what_out_osds_held_and_a_restarted_osd_needs_none() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mut tier = Tier::start(tmp.path(), 6, 3);
    // 2+2, at most two per domain: with two OSDs of a domain out, four OSDs in two domains
    // still hold every object at full redundancy (4+2 would need six OSDs).
    tier.cli_ok(&[
        "preset", "create", "r22", "--k", "2", "--m", "2", "--x", "2",
    ]);
    let node = tier.node("n1", SMALL_BUFFER);
    create_small_volume(&node, "v", "256M", &["--preset", "r22"]);
    let uri = node.uri("v");
    qemu_io(&uri, "write -P 0x3c 0 48M");
    node.wait_uploaded("v");
    // Objects the volume rewrites in place (its TLog list) leave older versions behind until
    // a repair collects them.
    let report = repair(&tier, "v");
    assert_eq!(report["fragments_rebuilt"], 0, "{report}");
    let objects = inspect(&tier, "v");
    assert!(objects.len() >= 12, "{} objects", objects.len());
    let unhealthy: Vec<_> = objects
        .iter()
        .filter(|o| o["status"] != "healthy")
        .collect();
    assert!(unhealthy.is_empty(), "{unhealthy:?}");

    // An OSD killed and restarted with its disk intact: nothing to rebuild.
    let id = tier.osds[1].id;
    tier.osds[1].kill9();
    tier.osds[1].launch();
    assert_eq!(tier.osds[1].id, id, "the same OSD came back");
    tier.wait_osds("all up", |osds| osds.iter().all(|o| o["state"] == "up"));
    let report = repair(&tier, "v");
    assert_eq!(report["fragments_rebuilt"], 0, "{report}");
    assert_eq!(report["fragments_moved"], 0, "{report}");

    // Two OSDs die and are marked out: their fragments are rebuilt on the other four.
    let (a, b) = (tier.osds[0].id, tier.osds[3].id);
    tier.osds[0].kill9();
    tier.osds[3].kill9();
    for id in [a, b] {
        tier.cli_ok(&["osd", "out", &id.to_string()]);
    }
    tier.wait_osds("two out", |osds| {
        osds.iter().filter(|o| o["state"] == "out").count() == 2
    });
    repair(&tier, "v");
    let objects = inspect(&tier, "v");
    for o in &objects {
        assert_eq!(o["status"], "healthy", "{o}");
        for f in o["fragments"].as_array().unwrap() {
            for c in f["copies"].as_array().unwrap() {
                let on = c["osd"]["id"].as_u64().unwrap();
                assert!(on != a && on != b, "a fragment left on an out OSD: {o}");
            }
        }
    }
    // And the data is intact, read from the tier.
    qemu_io(&uri, "read -P 0x3c 0 48M");
    let text = tier.cli_ok(&["backend", "inspect", "v"]);
    assert!(
        text.contains("need repair") && text.contains(" 0 need repair"),
        "{text}"
    );

    // A fragment rots on disk: a verifying inspect finds it, a verifying repair rebuilds it.
    let file = tier.osds[1]
        .fragment_files()
        .into_iter()
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&file, bytes).unwrap();
    let corrupt = |objects: &[serde_json::Value]| {
        objects
            .iter()
            .flat_map(|o| o["fragments"].as_array().unwrap().clone())
            .filter(|f| f["status"] == "corrupt")
            .count()
    };
    let objects: Vec<serde_json::Value> =
        serde_json::from_str(&tier.cli_ok(&["backend", "inspect", "v", "--verify", "--json"]))
            .unwrap();
    assert_eq!(corrupt(&objects), 1, "{objects:?}");
    let out = tier.cli_ok(&["backend", "repair", "v", "--verify", "--json"]);
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(all[0]["report"]["corrupt_found"], 1, "{all}");
    assert_eq!(all[0]["fully_redundant"], true, "{all}");
    let objects: Vec<serde_json::Value> =
        serde_json::from_str(&tier.cli_ok(&["backend", "inspect", "v", "--verify", "--json"]))
            .unwrap();
    assert_eq!(corrupt(&objects), 0);
    qemu_io(&uri, "read -P 0x3c 0 48M");
}

#[test]
fn a_new_osd_gets_its_share_under_load_and_decommission_empties_one() {
    require_tool("fio");
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mut tier = Tier::start(tmp.path(), 6, 3);
    let node = tier.node("n1", SMALL_BUFFER);
    create_small_volume(&node, "v", "512M", &[]);
    let uri = node.uri("v");
    qemu_io(&uri, "write -P 0x77 256M 64M");
    node.wait_uploaded("v");

    // Under load (fio writes and verifies the first 96 MiB), a seventh OSD joins.
    let writer = {
        let uri = uri.clone();
        std::thread::spawn(move || fio(&uri, "96M", "write"))
    };
    let new = tier.add_osd("d0");
    let new_id = tier.osds[new].id;
    let osds = tier.wait_osds("the new OSD gets fragments", |osds| {
        fragments_on(osds, new_id) > 0
    });
    assert!(osds.iter().any(|o| o["id"] == new_id && o["state"] == "up"));
    assert_fio_ok(&writer.join().unwrap(), "write+verify while an OSD joined");
    node.wait_uploaded("v");
    repair(&tier, "v");
    // Its share: with seven equal OSDs, about a seventh of the fragments.
    // The node's background rebalancing moves fragments after the repair returns: wait (bounded)
    // until the counts settle with the new OSD holding its share.
    let osds = tier.wait_osds("usage reported after the rebalance", |osds| {
        let total: u64 = osds.iter().filter_map(|o| o["fragments"].as_u64()).sum();
        let objects = inspect(&tier, "v").len() as u64;
        let mine = fragments_on(osds, new_id);
        total == objects * 6 && mine * 7 * 2 >= total
    });
    let total: u64 = osds.iter().filter_map(|o| o["fragments"].as_u64()).sum();
    let mine = fragments_on(&osds, new_id);
    assert!(
        mine * 7 * 2 >= total && mine * 7 <= total * 2,
        "the new OSD holds {mine} of {total} fragments"
    );

    // Decommission one: it empties, and nothing is lost.
    let gone = tier.osds[2].id;
    tier.cli_ok(&["osd", "decommission", &gone.to_string()]);
    tier.wait_osds("the decommissioned OSD empty", |osds| {
        osds.iter()
            .any(|o| o["id"] == gone && o["state"] == "draining" && o["fragments"] == 0)
    });
    repair(&tier, "v");
    qemu_io(&uri, "read -P 0x77 256M 64M");
    assert_fio_ok(&fio(&uri, "96M", "verify"), "verify after decommission");
}

#[test]
fn with_local_parity_a_lost_osd_is_rebuilt_without_crossing_domains() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    // Three OSDs per domain: two hold an object's fragments there, the third its local parity.
    let mut tier = Tier::start(tmp.path(), 9, 3);
    create_preset(&tier, "lrc", &["--local-parity"]);
    let mut node = tier.node("n1", SMALL_BUFFER);
    create_small_volume(&node, "v", "256M", &["--preset", "lrc"]);
    qemu_io(&node.uri("v"), "write -P 0x21 0 32M");
    node.wait_uploaded("v");
    // The node stops, so the CLI's repair below is the only one.
    assert!(node.terminate().success());
    repair(&tier, "v");

    let lost = tier.osds[4].id;
    tier.osds[4].kill9();
    tier.cli_ok(&["osd", "out", &lost.to_string()]);
    tier.wait_osds("the OSD out", |osds| {
        osds.iter().any(|o| o["id"] == lost && o["state"] == "out")
    });
    let out = tier.cli_ok(&["backend", "repair", "v", "--no-rebalance", "--json"]);
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    let report = &all[0]["report"];
    assert_eq!(all[0]["fully_redundant"], true, "{all}");
    assert!(
        report["fragments_rebuilt"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(
        report["fragments_rebuilt_locally"], report["fragments_rebuilt"],
        "{report}"
    );
    assert_eq!(report["cross_domain_bytes"], 0, "{report}");

    // Every byte is still there.
    node.launch();
    qemu_io(&node.uri("v"), "read -P 0x21 0 32M");
}

#[test]
fn an_encrypted_preset_keeps_plaintext_off_the_osds() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let tier = Tier::start(tmp.path(), 6, 3);
    let key_file = tmp.path().join("tier.key");
    std::fs::write(&key_file, [0xa7u8; 32]).unwrap();
    let bad_key = tmp.path().join("bad.key");
    std::fs::write(&bad_key, b"too short").unwrap();
    let bad = tier.cli(&[
        "preset",
        "create",
        "x",
        "--k",
        "4",
        "--m",
        "2",
        "--x",
        "2",
        "--encryption-key-file",
        bad_key.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--encryption-key-file"));
    tier.cli_ok(&[
        "preset",
        "create",
        "sealed",
        "--k",
        "4",
        "--m",
        "2",
        "--x",
        "2",
        "--encryption-key-file",
        key_file.to_str().unwrap(),
    ]);
    let shown = tier.cli_ok(&["preset", "show", "sealed", "--json"]);
    assert!(shown.contains("key_fingerprint"), "{shown}");
    assert!(
        !shown.contains(&"a7".repeat(32)),
        "the key is never printed: {shown}"
    );

    let node = tier.node("n1", SMALL_BUFFER);
    create_small_volume(&node, "v", "256M", &["--preset", "sealed"]);
    let uri = node.uri("v");
    // 0x6b repeated: any 64 plaintext bytes on an OSD's disk would be found.
    qemu_io(&uri, "write -P 0x6b 0 24M");
    node.wait_uploaded("v");
    let needle = [0x6bu8; 64];
    let mut files = 0;
    for osd in &tier.osds {
        for file in osd.fragment_files() {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !bytes.windows(64).any(|w| w == needle),
                "plaintext in {}",
                file.display()
            );
            files += 1;
        }
    }
    assert!(files >= 36, "{files} fragment files");
    qemu_io(&uri, "read -P 0x6b 0 24M");
    qemu_io(&uri, "read -P 0x6b 12345k 4k");
}

/// Deterministic bytes for objects the tests put themselves.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
        .collect()
}

fn is_tombstone(file: &std::path::Path) -> bool {
    file.extension().is_some_and(|e| e == "255")
}

#[test]
fn objects_deleted_while_an_osd_is_down_stay_deleted_when_it_returns() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mut tier = Tier::start(tmp.path(), 6, 3);
    let mut node = tier.node("n1", SMALL_BUFFER);
    create_small_volume(&node, "v", "256M", &[]);
    qemu_io(&node.uri("v"), "write -P 0x5a 0 16M");
    node.wait_uploaded("v");
    // The node stops: this test's deletes and the CLI's repair are the only writers.
    assert!(node.terminate().success());

    // Objects of our own in the volume's namespace, under its owner tag.
    let store = tier_map::ec_store(&tier.url());
    let objects: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("gone-{i}"), pattern(300_000 + i * 1000, i as u32)))
        .collect();
    for (name, data) in &objects {
        store.put("v", name, data).unwrap();
    }
    assert!(store.wait_background(Duration::from_secs(30)));
    let ours = |osd: &common::tier::Osd| {
        osd.fragment_files()
            .into_iter()
            .filter(|f| f.to_string_lossy().contains("/gone-"))
            .collect::<Vec<_>>()
    };
    let victim = (0..6).max_by_key(|i| ours(&tier.osds[*i]).len()).unwrap();
    let held = ours(&tier.osds[victim]).len();
    assert!(held >= 3, "OSD {victim} holds {held} of our fragments");
    let id = tier.osds[victim].id;
    tier.osds[victim].kill9();
    tier.wait_osds("the killed OSD down", |osds| {
        osds.iter().any(|o| o["id"] == id && o["state"] == "down")
    });
    for (name, _) in &objects {
        store.delete("v", name).unwrap();
    }
    // The same name, put again after its delete (under the fallback policy: one OSD is down).
    let fresh = pattern(123_457, 77);
    store.put("v", "gone-0", &fresh).unwrap();
    assert!(store.wait_background(Duration::from_secs(30)));

    tier.osds[victim].launch();
    tier.wait_osds("all up again", |osds| {
        osds.iter().all(|o| o["state"] == "up")
    });
    // The OSD came back with its stale fragments; nobody sees them.
    let stale = ours(&tier.osds[victim]);
    assert_eq!(stale.len(), held, "{stale:?}");
    let reader = tier_map::ec_store(&tier.url());
    let listed: Vec<String> = reader
        .list("v")
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("gone-"))
        .collect();
    assert_eq!(listed, vec!["gone-0".to_string()]);
    for (name, _) in &objects[1..] {
        let err = reader.get("v", name).unwrap_err();
        assert!(
            matches!(err, BackendError::NoSuchObject { .. }),
            "{name}: {err}"
        );
    }
    assert_eq!(reader.get("v", "gone-0").unwrap(), fresh);
    let inspected: Vec<String> = inspect(&tier, "v")
        .iter()
        .filter_map(|o| o["name"].as_str().map(str::to_string))
        .filter(|n| n.starts_with("gone-"))
        .collect();
    assert_eq!(inspected, vec!["gone-0".to_string()]);

    // Repair removes the stale fragments, then every tombstone: nothing is left of them.
    let report = repair(&tier, "v");
    assert!(
        report["fragments_deleted"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["tombstones_dropped"].as_u64().unwrap() > 0,
        "{report}"
    );
    for osd in &tier.osds {
        for file in ours(osd) {
            let text = file.to_string_lossy();
            assert!(
                text.contains("/gone-0/") && !is_tombstone(&file),
                "left behind: {text}"
            );
        }
    }
    assert_eq!(
        tier_map::ec_store(&tier.url()).get("v", "gone-0").unwrap(),
        fresh
    );
    // The volume's own objects were untouched.
    node.launch();
    qemu_io(&node.uri("v"), "read -P 0x5a 0 16M");
}

#[test]
fn objects_written_under_a_fallback_policy_are_re_encoded_when_osds_join() {
    require_tool("fio");
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    // Three OSDs in three domains hold 2+1 at most one per domain, not 4+2 at most two.
    let mut tier = Tier::start(tmp.path(), 3, 3);
    create_preset(&tier, "grow", &["--fallback", "2,1"]);
    let mut node = tier.node("n1", SMALL_BUFFER);
    create_small_volume(&node, "v", "256M", &["--preset", "grow"]);
    let uri = node.uri("v");
    assert_fio_ok(
        &fio(&uri, "20M", "write"),
        "write under the fallback policy",
    );
    node.wait_uploaded("v");
    let part = hexdump(&uri, "read -v 8195k 6k");
    // The node stops, so the CLI's repair below is the only one.
    assert!(node.terminate().success());
    let policies = |tier: &Tier| -> Vec<(u64, u64, String)> {
        inspect(tier, "v")
            .iter()
            .map(|o| {
                (
                    o["k"].as_u64().unwrap(),
                    o["m"].as_u64().unwrap(),
                    o["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let before = policies(&tier);
    assert!(before.len() >= 5, "{before:?}");
    assert!(
        before.iter().all(|(k, m, _)| (*k, *m) == (2, 1)),
        "{before:?}"
    );
    let text = tier.cli_ok(&["backend", "inspect", "v"]);
    assert!(
        !text.contains("re-encodes"),
        "nothing better fits yet: {text}"
    );

    for d in 0..3 {
        tier.add_osd(&format!("d{d}"));
    }
    tier.wait_osds("six OSDs up", |osds| {
        osds.iter().filter(|o| o["state"] == "up").count() == 6
    });
    let text = tier.cli_ok(&["backend", "inspect", "v"]);
    assert!(text.contains("repair re-encodes it as 4+2"), "{text}");
    let report = repair(&tier, "v");
    assert_eq!(
        report["objects_reencoded"].as_u64().unwrap(),
        before.len() as u64,
        "{report}"
    );
    let after = policies(&tier);
    assert_eq!(after.len(), before.len());
    assert!(
        after
            .iter()
            .all(|(k, m, status)| (*k, *m) == (4, 2) && status == "healthy"),
        "{after:?}"
    );
    // Every fragment where placement wants it, one per OSD at most two per domain: six each.
    tier.wait_osds("the old fragments gone from the OSDs' counts", |osds| {
        let total: u64 = osds.iter().filter_map(|o| o["fragments"].as_u64()).sum();
        total == after.len() as u64 * 6
    });
    // The data reads back the same (fio's checksums), whole and in part, from the tier.
    node.launch();
    let uri = node.uri("v");
    assert_fio_ok(&fio(&uri, "20M", "verify"), "verify after re-encoding");
    assert_eq!(hexdump(&uri, "read -v 8195k 6k"), part);
}

/// The hex dump lines of a `qemu-io read -v` (without its timing line).
fn hexdump(uri: &str, command: &str) -> Vec<String> {
    let lines: Vec<String> = qemu_io(uri, command)
        .lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(at, _)| at.len() == 8 && u64::from_str_radix(at, 16).is_ok())
        })
        .map(str::to_string)
        .collect();
    assert!(!lines.is_empty(), "no dump from {command}");
    lines
}

#[test]
fn a_compressed_preset_stores_fewer_bytes_and_reads_back_in_part() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let tier = Tier::start(tmp.path(), 6, 3);
    for (name, codec) in [("z", "zstd"), ("l", "lz4")] {
        create_preset(&tier, name, &["--compression", codec]);
        let shown: serde_json::Value =
            serde_json::from_str(&tier.cli_ok(&["preset", "show", name, "--json"])).unwrap();
        assert_eq!(shown["compression"], codec, "{shown}");
    }
    let bad = tier.cli(&[
        "preset",
        "create",
        "b",
        "--k",
        "2",
        "--m",
        "1",
        "--compression",
        "xz",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("choose zstd, lz4 or none"));

    let node = tier.node("n1", SMALL_BUFFER);
    let volumes = [("vz", "z"), ("vl", "l")];
    for (volume, preset) in volumes {
        create_small_volume(&node, volume, "256M", &["--preset", preset]);
        let uri = node.uri(volume);
        qemu_io(&uri, "write -P 0x61 0 24M");
        qemu_io(&uri, "write -P 0x17 5000k 3000k");
        node.wait_uploaded(volume);
    }
    // Once the OSDs' reports count every fragment, the bytes they hold: 48 MiB written, which
    // 4+2 would store as 72 MiB uncompressed.
    let objects: usize = volumes.iter().map(|(v, _)| inspect(&tier, v).len()).sum();
    let osds = tier.wait_osds("every fragment counted", |osds| {
        osds.iter()
            .filter_map(|o| o["fragments"].as_u64())
            .sum::<u64>()
            >= objects as u64 * 6
    });
    let used: u64 = osds.iter().filter_map(|o| o["used"].as_u64()).sum();
    assert!(
        used < 8 << 20,
        "{used} bytes on the OSDs for 48 MiB written"
    );
    // Every byte back, whole and in part (qemu-io checks each against its pattern).
    for (volume, _) in volumes {
        let uri = node.uri(volume);
        qemu_io(&uri, "read -P 0x61 0 5000k");
        qemu_io(&uri, "read -P 0x17 5000k 3000k");
        qemu_io(&uri, "read -P 0x61 8000k 16576k");
        qemu_io(&uri, "read -P 0x17 6001k 4k");
        qemu_io(&uri, "read -P 0x61 20000k 512");
    }
    let info = node.info("vz");
    assert!(info["backend_reads"].as_u64().unwrap() > 0, "{info}");
}

/// `vstor backend [FLAGS] inspect NS --json` as an operator with `flags` (`--peer-tls-*`, or
/// none): its exit status and everything it printed.
fn inspect_as(tier: &Tier, flags: &[String], namespace: &str) -> (bool, String) {
    run_any(
        Command::new(VSTOR)
            .arg("backend")
            .args(flags)
            .args(["inspect", namespace, "--json"])
            .env("VSTOR_REGISTRY", tier.url()),
    )
}

#[test]
fn on_mutual_tls_osds_a_node_reads_back_its_data_and_strangers_are_refused() {
    require_tool("fio");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "cluster");
    let foreign = Pki::new(tmp.path(), "foreign");
    let tier = Tier::start_with(tmp.path(), 3, 3, &pki.peer_flags("osd"));
    let node_tls = pki.peer_flags("node");
    let mut extra = SMALL_BUFFER.to_vec();
    extra.extend(strs(&node_tls));
    let node = tier.node("n1", &extra);
    create_small_volume(&node, "v", "256M", &[]);

    // 96 MiB through a 24 MiB write buffer: the verify pass reads most of it from the OSDs.
    let uri = node.uri("v");
    assert_fio_ok(&fio(&uri, "96M", "write"), "write+verify over mutual TLS");
    node.wait_uploaded("v");
    assert_fio_ok(&fio(&uri, "96M", "verify"), "verify over mutual TLS");
    let (ok, text) = inspect_as(&tier, &pki.peer_flags("operator"), "v");
    assert!(ok, "{text}");
    let objects: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(!objects.is_empty());
    assert!(
        objects.iter().all(|o| o["status"] == "healthy"),
        "{objects:?}"
    );

    // No certificate, and a certificate of another CA: refused by every OSD, with the reason
    // and the OSD's address.
    let osd = &tier.osds[0];
    let (_, plain) = inspect_as(&tier, &[], "v");
    assert!(
        plain.contains("requires mutual TLS") && plain.contains(&osd.addr),
        "{plain}"
    );
    let stranger = peer_tls_flags(&foreign.peer("stranger"), &pki.ca());
    let (_, refused) = inspect_as(&tier, &stranger, "v");
    assert!(
        refused.contains("alert") && refused.contains(&osd.addr),
        "{refused}"
    );
    // The OSD logs a failed handshake after dropping the connection: the line may land just
    // after the client reported the refusal.
    common::poll(
        "the OSD to log both refusals",
        Duration::from_secs(15),
        || {
            let log = std::fs::read_to_string(&osd.log).unwrap();
            (log.contains("plain-text client refused") && log.contains("OSD client refused"))
                .then_some(())
        },
    );

    // Nothing was lost, and the node still reads everything back.
    assert_fio_ok(&fio(&uri, "96M", "verify"), "verify after the refusals");
    let (ok, text) = inspect_as(&tier, &pki.peer_flags("operator2"), "v");
    assert!(ok, "{text}");
    assert!(
        !text.contains("unavailable") && !text.contains("missing"),
        "{text}"
    );
}

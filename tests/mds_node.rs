//! Nodes using their MDSes (`vstor serve --mds A,B`), as processes:
//!
//! * `kill -9` of the master MDS under write load: the slave is promoted (visible in
//!   `volume info`), no write fails, the crash oracle finds every acknowledged write, and the
//!   new master's table equals a full replay of the backend history (full map dumps);
//! * restarts load the map from the MDS and replay only the TLogs it lacks: 0, at least 1, and
//!   many TLogs behind, each time with the volume's contents checked against a reference file;
//! * an MDS whose data directory was deleted gets its table rebuilt, and the next restart loads
//!   from it again;
//! * rollback, scrub (with relocations) and a clone: the tables equal the backend replay, and
//!   a restart loads both volumes from the MDS with nothing to replay;
//! * on a cluster (real etcd), the owner is killed under sync-DTL write load: the adopter loads
//!   the map from the MDS, the crash oracle finds every acknowledged write, and the master's
//!   table moves to the new owner's tag (the old owner's is refused from then on);
//! * on the erasure-coded tier (etcd and six OSDs), MDSes given `--backend ec` catch their slave
//!   tables up from the OSDs, a promoted slave holds the tier's map, and a restart loads from it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::mds::Mds;
use common::oracle::{start_writers, stop_writers, verify, wait_progress, Load, Mode};
use common::tls::{peer_tls_flags, strs, Pki};
use common::{
    require_tool, run_any, run_ok, start_cluster_node, write_with_reference, Daemon, TestBackend,
    SYNC_DTL_VOLUME_ON_N0, VSTOR,
};
use vstor_backend::testing::free_addr;
use vstor_backend::{LocalStore, ObjectStore};
use vstor_mds::catchup::backend_map;
use vstor_mds::client::MdsClient;

/// Node settings: TLogs close after `max_open_age` ("0s": only when full, at snapshots and at
/// shutdown); MDSes are checked every 200 ms.
fn node_config(dir: &Path, max_open_age: &str) -> PathBuf {
    let path = dir.join("vstor.toml");
    std::fs::write(
        &path,
        format!("[upload]\nmax_open_age = \"{max_open_age}\"\n\n[mds]\ncheck_every = \"200ms\"\n"),
    )
    .unwrap();
    path
}

/// MDS `k` (0: the master) of the volume whose info `i` is is 0 TLogs behind, by a check that
/// saw the backend's latest TLog list: a check from before the last upload says 0 too.
fn mds_caught_up(i: &serde_json::Value, k: usize) -> bool {
    i["mds"]["servers"][k]["behind"] == 0 && i["mds"]["backend_tlogs"] == i["tlogs_on_backend"]
}

fn start_node(root: &Path, config: &Path, mds: &[&str]) -> Daemon {
    start_node_with(root, config, mds, &[])
}

/// `start_node` with more flags.
fn start_node_with(root: &Path, config: &Path, mds: &[&str], extra: &[&str]) -> Daemon {
    std::fs::create_dir_all(root).unwrap();
    let mds = mds.join(",");
    let mut args = vec!["--config", config.to_str().unwrap(), "--mds", &mds];
    args.extend_from_slice(extra);
    Daemon::start_with(root, &args)
}

/// Poll until the table `mds` holds for `volume` equals a full replay of the backend history
/// (cork and map), or fail after a minute with both sides' sizes.
fn wait_table_equals_backend(mds: &str, backend: &Path, volume: &str) -> usize {
    wait_table_equals_store(mds, &LocalStore::open(backend).unwrap(), volume)
}

/// [`wait_table_equals_backend`] for any store (the EC tier's).
fn wait_table_equals_store(mds: &str, store: &dyn ObjectStore, volume: &str) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (cork, map) = backend_map(store, volume, volume).unwrap();
        // No table yet (an MDS that lost its data) is a state to wait through.
        let table = runtime.block_on(async {
            let client = MdsClient::connect(mds, "test", Duration::from_secs(10))
                .await
                .unwrap();
            client.dump_all(volume).await
        });
        let table = match table {
            Ok(table) if table == (cork, map.clone()) => return map.len(),
            Ok((got, entries)) => format!("cork {got}, {} entries", entries.len()),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "the MDS table of {volume} on {mds} ({table}) never matched the backend (cork \
             {cork}, {} entries)",
            map.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `vol`, 64 MiB, in 4 MiB SCOs (several SCOs per test).
const CREATE_VOL_4M_SCOS: [&str; 7] = [
    "volume",
    "create",
    "vol",
    "--size",
    "64M",
    "--sco-size",
    "4M",
];

/// A sparse file of `len` zero bytes (the reference a volume is compared with).
fn zeroed_file(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

fn u(info: &serde_json::Value, key: &str) -> u64 {
    info[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {info}"))
}

#[test]
fn a_killed_master_is_replaced_and_the_new_master_holds_the_backend_map() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (free_addr(), free_addr());
    let config = node_config(tmp.path(), "200ms");
    let node = start_node(&tmp.path().join("node"), &config, &[&a, &b]);
    let backend = node.data_dir.join("backend");
    let mut master = Mds::start_at(&tmp.path().join("mds-a"), &backend, &a, &[]);
    let _slave = Mds::start_at(&tmp.path().join("mds-b"), &backend, &b, &[]);
    node.cli_ok(&CREATE_VOL_4M_SCOS);
    node.wait_for("vol", "both MDSes checked", |i| {
        i["mds"]["master"] == a.as_str()
            && i["mds"]["servers"][1]["role"] == "slave"
            && i["mds"]["servers"][1]["reachable"] == true
    });

    let load = Load::new();
    let writers = start_writers(&node.nbd, "vol", Mode::Sync, &load);
    wait_progress(&load, &writers, 2000, "before the MDS dies");
    node.wait_for("vol", "TLogs on the backend", |i| {
        i["tlogs_on_backend"].as_u64() >= Some(3)
    });
    master.kill9();
    let info = node.wait_for("vol", "the slave promoted", |i| {
        i["mds"]["master"] == b.as_str() && i["mds"]["promotions"] == 1
    });
    assert_eq!(info["mds"]["servers"][1]["addr"], a.as_str(), "{info}");
    assert_eq!(info["mds"]["servers"][1]["reachable"], false, "{info}");
    wait_progress(&load, &writers, 2000, "after the promotion");
    stop_writers(&load, writers);
    verify(&node.nbd, "vol", &load, "after the promotion");

    node.wait_uploaded("vol");
    let entries = wait_table_equals_backend(&b, &backend, "vol");
    assert!(entries > 100, "only {entries} clusters mapped");
    let text = node.cli_ok(&["volume", "info", "vol"]);
    assert!(
        text.contains(&format!("master {b}")) && text.contains("promotions 1"),
        "{text}"
    );
}

/// Write a pattern to the volume and the reference file, then snapshot (which closes the TLog
/// and queues it for upload).
fn write_round(node: &Daemon, reference: &Path, round: u64) {
    let offset = (round * 1_310_720) % (60 << 20);
    write_with_reference(
        &node.uri("vol"),
        reference,
        &[
            format!("write -P {} {offset} 640k", 0x30 + round % 64),
            format!(
                "write -P {} {} 4k",
                0x90 + round % 32,
                (round * 8192) % (64 << 20)
            ),
        ],
    );
    node.cli_ok(&["snapshot", "create", "vol", &format!("s{round}")]);
}

fn compare(node: &Daemon, reference: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(reference)
            .arg(node.uri("vol")),
    );
}

/// Stop the node cleanly, run `between`, and start the node again; returns the volume's info
/// once it serves.
fn restart(node: &mut Daemon, between: impl FnOnce()) -> serde_json::Value {
    let status = node.terminate();
    assert!(status.success(), "SIGTERM exit status {status}");
    between();
    node.launch();
    node.info("vol")
}

/// Restart the node with its MDS caught up (`before`: the volume's info then): the whole map
/// comes from the MDS, nothing is replayed, and the volume equals `reference`.
fn restart_loads_everything_from_the_mds(
    node: &mut Daemon,
    before: &serde_json::Value,
    reference: &Path,
) {
    let info = restart(node, || {});
    assert_eq!(u(&info, "opened_replayed_tlogs"), 0, "{info}");
    // The open is timed (the figure `volume info` and `vstor-bench` report).
    assert!(u(&info, "opened_in_us") > 0, "{info}");
    assert_eq!(
        u(&info, "opened_from_mds_tlogs"),
        u(before, "tlogs_on_backend"),
        "{info}"
    );
    compare(node, reference);
}

#[test]
fn restarts_load_the_map_from_the_mds_and_replay_only_what_it_lacks() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let a = free_addr();
    let config = node_config(tmp.path(), "0s");
    let mut node = start_node(&tmp.path().join("node"), &config, &[&a]);
    let backend = node.data_dir.join("backend");
    let mut mds = Mds::start_at(&tmp.path().join("mds"), &backend, &a, &[]);
    node.create_volume("vol", "64M");
    let reference = tmp.path().join("reference.raw");
    zeroed_file(&reference, 64 << 20);
    let caught_up = |node: &Daemon| {
        node.wait_uploaded("vol");
        node.wait_for("vol", "the MDS caught up", |i| mds_caught_up(i, 0))
    };
    let mut round = 0;
    for _ in 0..3 {
        round += 1;
        write_round(&node, &reference, round);
    }

    // 0 behind: the whole history comes from the MDS.
    let before = caught_up(&node);
    restart_loads_everything_from_the_mds(&mut node, &before, &reference);

    // Behind by 1 and by many: the MDS is down while TLogs reach the backend.
    for missed in [1u64, 12] {
        let held = u(&caught_up(&node), "tlogs_on_backend");
        mds.kill9();
        for _ in 0..missed {
            round += 1;
            write_round(&node, &reference, round);
        }
        node.wait_uploaded("vol");
        // Back only once the node is down: a running node would catch it up at once.
        let info = restart(&mut node, || mds.launch());
        assert_eq!(u(&info, "opened_from_mds_tlogs"), held, "{info}");
        let replayed = u(&info, "opened_replayed_tlogs");
        assert!(
            replayed >= missed,
            "{missed} missed, {replayed} replayed: {info}"
        );
        assert_eq!(held + replayed, u(&info, "tlogs_on_backend"), "{info}");
        compare(&node, &reference);
    }

    // A deleted data directory: the node recreates the table and it catches up from the
    // backend; the next restart loads from it again.
    mds.kill9();
    std::fs::remove_dir_all(mds.dir()).unwrap();
    mds.launch();
    let before = caught_up(&node);
    wait_table_equals_backend(&a, &backend, "vol");
    let info = restart(&mut node, || {});
    assert_eq!(
        u(&info, "opened_from_mds_tlogs"),
        u(&before, "tlogs_on_backend"),
        "{info}"
    );
    compare(&node, &reference);
}

#[test]
fn wrong_mds_settings_are_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    for (mds, expected) in [
        ("127.0.0.1", "is not HOST:PORT"),
        ("127.0.0.1:7,127.0.0.1:7", "listed twice"),
        ("host:0", "is not HOST:PORT"),
    ] {
        let out = Command::new(common::VSTOR)
            .args(["serve", "--data-dir"])
            .arg(tmp.path().join("data"))
            .args(["--mds", mds])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--mds {mds} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "--mds {mds}: {stderr}");
    }
}

/// The volume's info through `node`, or `None` while it cannot answer (the owner died and no
/// one adopted the volume yet, or the adoption is under way).
fn try_info(node: &Daemon) -> Option<serde_json::Value> {
    let out = node.cli(&["volume", "info", "vol", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

#[test]
fn an_adoption_after_node_loss_starts_from_the_mds_and_loses_no_write() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("etcd")).unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let backend_dir = tmp.path().join("backend");
    std::fs::create_dir_all(&backend_dir).unwrap();
    let backend = TestBackend::Dir(backend_dir.clone());
    let (a, b) = (free_addr(), free_addr());
    let _master = Mds::start_at(&tmp.path().join("mds-a"), &backend_dir, &a, &[]);
    let _slave = Mds::start_at(&tmp.path().join("mds-b"), &backend_dir, &b, &[]);
    let config = node_config(tmp.path(), "200ms");
    let mds = format!("{a},{b}");
    let mut nodes: Vec<Daemon> = ["n0", "n1"]
        .iter()
        .map(|name| {
            let extra = ["--config", config.to_str().unwrap(), "--mds", &mds];
            start_cluster_node(tmp.path(), &etcd.url(), &backend, name, "d1", &extra)
        })
        .collect();
    nodes[0].cli_ok(&SYNC_DTL_VOLUME_ON_N0);
    let info = nodes[0].wait_for("vol", "DTL in sync and the MDSes checked", |i| {
        i["dtl_state"] == "ok_sync" && i["mds"]["master"] == a.as_str()
    });
    let old_tag = u(&info, "owner_tag");

    let load = Load::new();
    let writers = start_writers(&nodes[0].nbd, "vol", Mode::Sync, &load);
    wait_progress(&load, &writers, 1500, "before the owner dies");
    nodes[0].wait_for("vol", "TLogs on the backend", |i| {
        i["tlogs_on_backend"].as_u64() >= Some(3)
    });
    wait_progress(&load, &writers, 3000, "before the owner dies");
    nodes[0].kill9();
    for w in writers {
        assert!(
            w.join().unwrap().is_err(),
            "a writer went on after its node died"
        );
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let adopted = loop {
        if let Some(info) = try_info(&nodes[1]) {
            if info["owner"] == "n1" && info["state"] == "running" {
                break info;
            }
        }
        assert!(Instant::now() < deadline, "n1 never adopted the volume");
        std::thread::sleep(Duration::from_millis(50));
    };
    let seeded = u(&adopted, "opened_from_mds_tlogs");
    assert!(
        seeded >= 2,
        "the adoption did not start from the MDS: {adopted}"
    );
    assert!(u(&adopted, "owner_tag") > old_tag, "{adopted}");
    let written = verify(&nodes[1].nbd, "vol", &load, "after the adoption");
    assert!(written > 0);

    // The new owner took the master's table over: the old owner's tag is refused there.
    let new_tag = u(&adopted, "owner_tag");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tag = runtime.block_on(async {
            let client = MdsClient::connect(&a, "test", Duration::from_secs(10))
                .await
                .unwrap();
            client.stat("vol").await.unwrap().meta.owner_tag
        });
        if tag == new_tag {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the master's table kept owner tag {tag}, not the new owner's {new_tag}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nodes[1].wait_uploaded("vol");
    wait_table_equals_backend(&a, &backend_dir, "vol");
}

#[test]
fn on_a_cluster_the_master_goes_beside_the_owner_and_a_slave_to_its_recovery_domain() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("etcd")).unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    let backend_dir = tmp.path().join("backend");
    std::fs::create_dir_all(&backend_dir).unwrap();
    let url = etcd.url();
    let mut mdses: Vec<Mds> = [("m0", "n0", "d1"), ("m1", "n1", "d2"), ("m2", "n2", "d1")]
        .iter()
        .map(|(name, node, domain)| {
            Mds::start_at(
                &tmp.path().join(name),
                &backend_dir,
                "127.0.0.1:0",
                &[
                    "--registry",
                    &url,
                    "--name",
                    name,
                    "--node",
                    node,
                    "--domain",
                    domain,
                ],
            )
        })
        .collect();
    let listing = mdses[0].cli(&["list", "--registry", &url]);
    for (name, mds) in ["m0", "m1", "m2"].iter().zip(&mdses) {
        assert!(
            listing.contains(&format!("registered: {name} at {}", mds.addr)),
            "{listing}"
        );
    }

    let config = node_config(tmp.path(), "200ms");
    let extra = [
        "--recovery-domain",
        "d2",
        "--config",
        config.to_str().unwrap(),
    ];
    let node = start_cluster_node(
        tmp.path(),
        &url,
        &TestBackend::Dir(backend_dir.clone()),
        "n0",
        "d1",
        &extra,
    );
    node.create_volume("vol", "64M");
    let (m0, m1) = (mdses[0].addr.clone(), mdses[1].addr.clone());
    let info = node.wait_for("vol", "automatic MDS placement", |i| {
        i["mds"]["master"] == m0.as_str() && mds_caught_up(i, 1)
    });
    let servers = info["mds"]["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{info}");
    assert_eq!(servers[1]["addr"], m1.as_str(), "{info}");

    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &node.uri("vol"),
        "-c",
        "write -P 0x5a 0 8M",
    ]));
    node.wait_uploaded("vol");
    mdses[0].kill9();
    node.wait_for("vol", "the slave in the recovery domain promoted", |i| {
        i["mds"]["master"] == m1.as_str() && i["mds"]["promotions"] == 1
    });
    node.wait_uploaded("vol");
    wait_table_equals_backend(&m1, &backend_dir, "vol");
}

/// Wait until the node shows `volume`'s master 0 TLogs behind, with everything uploaded.
fn wait_master_caught_up(node: &Daemon, volume: &str) -> serde_json::Value {
    node.wait_uploaded(volume);
    node.wait_for(volume, "the master caught up", |i| mds_caught_up(i, 0))
}

#[test]
fn rollback_scrub_and_clones_keep_the_tables_right() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let a = free_addr();
    let config = node_config(tmp.path(), "0s");
    let mut node = start_node(&tmp.path().join("node"), &config, &[&a]);
    let backend = node.data_dir.join("backend");
    let _mds = Mds::start_at(&tmp.path().join("mds"), &backend, &a, &[]);
    node.cli_ok(&CREATE_VOL_4M_SCOS);
    let reference = tmp.path().join("reference.raw");
    let at_s3 = tmp.path().join("at-s3.raw");
    zeroed_file(&reference, 64 << 20);
    for round in 1..=3 {
        write_round(&node, &reference, round);
    }
    std::fs::copy(&reference, &at_s3).unwrap();
    for round in 4..=6 {
        write_round(&node, &reference, round);
    }
    wait_master_caught_up(&node, "vol");

    // A clone of s3: its table starts with the inherited map.
    node.cli_ok(&["clone", "create", "c1", "--from", "vol@s3"]);
    // Rollback to s3 rewrites the history the table followed: the table is rebuilt.
    node.cli_ok(&["snapshot", "rollback", "vol", "s3"]);
    std::fs::copy(&at_s3, &reference).unwrap();
    wait_master_caught_up(&node, "vol");
    wait_master_caught_up(&node, "c1");
    wait_table_equals_backend(&a, &backend, "vol");
    wait_table_equals_backend(&a, &backend, "c1");

    // Half of two SCOs overwritten before any snapshot: the scrub relocates the other halves.
    write_with_reference(
        &node.uri("vol"),
        &reference,
        &[
            "write -P 0x61 40M 8M".to_string(),
            "write -P 0x62 40M 2M".to_string(),
            "write -P 0x63 44M 2M".to_string(),
        ],
    );
    node.cli_ok(&["snapshot", "create", "vol", "s7"]);
    wait_master_caught_up(&node, "vol");
    let out = node.cli_ok(&["volume", "scrub", "vol", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rewritten = report["report"]["scos_rewritten"]
        .as_u64()
        .or_else(|| report["scos_rewritten"].as_u64())
        .unwrap_or_else(|| panic!("no scos_rewritten in {report}"));
    assert!(rewritten > 0, "the scrub relocated nothing: {report}");
    wait_master_caught_up(&node, "vol");
    wait_table_equals_backend(&a, &backend, "vol");

    let tlogs = |name: &str| u(&node.info(name), "tlogs_on_backend");
    let (vol_tlogs, clone_tlogs) = (tlogs("vol"), tlogs("c1"));
    let info = restart(&mut node, || {});
    assert_eq!(u(&info, "opened_from_mds_tlogs"), vol_tlogs, "{info}");
    assert_eq!(u(&info, "opened_replayed_tlogs"), 0, "{info}");
    compare(&node, &reference);
    let clone = node.info("c1");
    assert_eq!(u(&clone, "opened_from_mds_tlogs"), clone_tlogs, "{clone}");
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&at_s3)
            .arg(node.uri("c1")),
    );
}

/// `vstor mds [FLAGS] list --mds ADDR`: exit status and what it printed.
fn mds_list_as(addr: &str, flags: &[String]) -> (bool, String) {
    run_any(
        Command::new(VSTOR)
            .arg("mds")
            .args(flags)
            .args(["list", "--mds", addr]),
    )
}

#[test]
fn over_mutual_tls_a_restart_loads_the_map_from_the_mds_and_strangers_are_refused() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "cluster");
    let foreign = Pki::new(tmp.path(), "foreign");
    let a = free_addr();
    let config = node_config(tmp.path(), "0s");
    let node_tls = pki.peer_flags("node");
    let mut node = start_node_with(&tmp.path().join("node"), &config, &[&a], &strs(&node_tls));
    let backend = node.data_dir.join("backend");
    let mut mds_flags = vec!["--catch-up-every".to_string(), "0s".to_string()];
    mds_flags.extend(pki.peer_flags("mds"));
    let _mds = Mds::start_at(&tmp.path().join("mds"), &backend, &a, &strs(&mds_flags));
    node.create_volume("vol", "64M");
    let reference = tmp.path().join("reference.raw");
    zeroed_file(&reference, 64 << 20);
    for round in 1..=3 {
        write_round(&node, &reference, round);
    }
    node.wait_uploaded("vol");
    let before = node.wait_for("vol", "the MDS caught up over mutual TLS", |i| {
        mds_caught_up(i, 0)
    });
    restart_loads_everything_from_the_mds(&mut node, &before, &reference);

    // An operator with the cluster's certificate sees the table; one without, or with another
    // CA's, is refused with the reason and the MDS's address.
    let (ok, text) = mds_list_as(&a, &pki.peer_flags("operator"));
    assert!(ok && text.contains("vol"), "{text}");
    let (ok, text) = mds_list_as(&a, &[]);
    assert!(
        !ok && text.contains(&a) && text.contains("requires mutual TLS"),
        "{text}"
    );
    let stranger = peer_tls_flags(&foreign.peer("stranger"), &pki.ca());
    let (ok, text) = mds_list_as(&a, &stranger);
    assert!(!ok && text.contains(&a) && text.contains("alert"), "{text}");

    // The refusals cost the node nothing: it still writes through its MDS and reads back.
    write_round(&node, &reference, 4);
    node.wait_uploaded("vol");
    node.wait_for("vol", "the MDS caught up again", |i| mds_caught_up(i, 0));
    compare(&node, &reference);
}

/// A node on the erasure-coded tier with `--mds m0,m1`, both MDSes on `--backend ec --registry`:
/// the slave catches up by reading TLogs from the OSDs (before the master dies), is promoted
/// after `kill -9` of the master with a table equal to a full replay of the tier's history, and
/// a restart then loads the whole map from it with the contents unchanged.
#[test]
fn on_the_ec_tier_slaves_catch_up_from_the_osds() {
    require_tool("qemu-io");
    let backend = TestBackend::ec();
    let TestBackend::Ec(ec) = &backend else {
        unreachable!("TestBackend::ec is the EC tier")
    };
    let url = ec.tier.url();
    let tmp = tempfile::tempdir().unwrap();
    // The slave catches up on its own timer: nothing but the OSDs tells it what was written.
    let mut mdses: Vec<Mds> = ["m0", "m1"]
        .iter()
        .map(|name| {
            Mds::start_at(
                &tmp.path().join(name),
                Path::new("ec"),
                "127.0.0.1:0",
                &[
                    "--registry",
                    &url,
                    "--name",
                    name,
                    "--catch-up-every",
                    "200ms",
                ],
            )
        })
        .collect();
    let (m0, m1) = (mdses[0].addr.clone(), mdses[1].addr.clone());
    let mds = format!("{m0},{m1}");
    let node_dir = tmp.path().join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    let mut node = Daemon::start_on(&node_dir, &backend, &["--mds", &mds]);
    node.cli_ok(&CREATE_VOL_4M_SCOS);
    let reference = tmp.path().join("reference.raw");
    zeroed_file(&reference, 64 << 20);
    for round in 0..3 {
        write_round(&node, &reference, round);
    }
    node.wait_uploaded("vol");
    let before = node.wait_for("vol", "the slave caught up from the OSDs", |i| {
        i["tlogs_on_backend"].as_u64() >= Some(3) && mds_caught_up(i, 0) && mds_caught_up(i, 1)
    });
    let store = backend.store(&node.data_dir);
    let entries = wait_table_equals_store(&m1, store.as_ref(), "vol");
    assert!(entries > 0, "{before}");

    mdses[0].kill9();
    write_round(&node, &reference, 3);
    node.wait_uploaded("vol");
    let before = node.wait_for("vol", "the slave promoted and caught up", |i| {
        i["mds"]["master"] == m1.as_str() && i["mds"]["promotions"] == 1 && mds_caught_up(i, 0)
    });
    wait_table_equals_store(&m1, store.as_ref(), "vol");
    restart_loads_everything_from_the_mds(&mut node, &before, &reference);
}

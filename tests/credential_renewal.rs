//! Renewed credentials without restarts (`src/credentials.rs`), as processes with certificates
//! made by the `openssl` CLI and files replaced the way renewal tools do (a new file renamed over
//! the old one), then `SIGHUP`:
//!
//! * a node and its `vstor dtl` move the whole cluster to a new CA in the three usual steps
//!   (trust both CAs, new certificates, trust only the new CA) while a sync-DTL volume takes
//!   writes: the link that was up stays in sync, the DTL presents its new certificate to new
//!   clients, the node's reconnection after the DTL restarts uses its new identity, and every
//!   acknowledged write is read back by the node that adopts the volume after a `kill -9`;
//! * a node's NBD and API certificates are replaced: new clients need the new CA, the volume's
//!   data reads back over the new certificate, and broken files are reported and change nothing;
//! * the OSD, MDS and edge daemons present their renewed certificates;
//! * a cluster node's etcd client certificate is renewed: after `SIGHUP` and an etcd restart
//!   that trusts only the new CA, the node keeps its lease and writes to the registry;
//! * two cluster nodes change their shared API token in the three steps of a rotation (accept
//!   both, send the new one, drop the old one) and never refuse a request forwarded between
//!   them;
//! * two cluster nodes move their HTTPS APIs to a new CA in the three steps (their `--api-ca`
//!   bundles re-read) and keep forwarding requests to each other throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::edge::EdgeDaemon;
use common::etcd::{Etcd, EtcdTls};
use common::mds::Mds;
use common::tier::Osd;
use common::tls::{file_flags, nbds_uri, peer_tls_flags, strs, Pki};
use common::{
    metrics_text, poll, require_tool, run_ok, stdout_lines, try_nbdinfo_list, Daemon, TestBackend,
    VSTOR,
};

const VOLUME: &str = "vol";
const RELOADED: &str = "credentials reloaded";
const RELOAD_FAILED: &str = "cannot reload credentials";

/// Replace `dst` as renewal tools do: a new file next to it, renamed over it.
fn replace(dst: &Path, bytes: &[u8]) {
    let tmp = dst.with_extension("renewed");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

/// A process's certificate, key and CA file at fixed paths.
struct TlsFiles {
    dir: PathBuf,
}

impl TlsFiles {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Install a certificate and its key (key first: until the certificate follows, a reload
    /// would find them mismatched and keep the old pair).
    fn install_identity(&self, (cert, key): &(PathBuf, PathBuf)) {
        replace(&self.key(), &std::fs::read(key).unwrap());
        replace(&self.cert(), &std::fs::read(cert).unwrap());
    }

    /// Trust the CAs of `pkis` (one bundle file).
    fn install_cas(&self, pkis: &[&Pki]) {
        let bundle: Vec<u8> = pkis
            .iter()
            .flat_map(|p| std::fs::read(p.ca()).unwrap())
            .collect();
        replace(&self.ca(), &bundle);
    }

    fn peer_flags(&self) -> Vec<String> {
        peer_tls_flags(&(self.cert(), self.key()), &self.ca())
    }
}

fn sighup(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP).expect("kill -HUP");
}

/// Wait until `log` says `what` at least `count` times.
fn wait_for_log(log: &Path, what: &str, count: usize) {
    poll(
        &format!("{count} × {what:?} in {}", log.display()),
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            (text.matches(what).count() >= count).then_some(())
        },
    );
}

/// A `vstor dtl` process with its log; killed when dropped.
struct Dtl {
    child: Child,
    addr: String,
    log: PathBuf,
    /// Its `--metrics` listener.
    metrics: String,
}

impl Dtl {
    fn start(root: &Path, listen: &str, tls: &TlsFiles) -> Self {
        let log = root.join("dtl.log");
        let metrics = vstor_backend::testing::free_addr();
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut child = Command::new(VSTOR)
            .args(["dtl", "--listen", listen, "--data-dir"])
            .arg(root.join("data"))
            .args(tls.peer_flags())
            .args(["--metrics", &metrics])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn vstor dtl");
        let ready = stdout_lines(&mut child)
            .recv_timeout(Duration::from_secs(30))
            .expect("vstor dtl ready line");
        let addr = ready
            .strip_prefix("vstor dtl ready: ")
            .unwrap_or_else(|| panic!("unexpected first line {ready:?}"))
            .to_string();
        Dtl {
            child,
            addr,
            log,
            metrics,
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        self.child.wait().unwrap();
    }
}

impl Drop for Dtl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a TLS client trusting only `ca` accepts the certificate the server at `addr`
/// presents (the client shows `client`'s certificate, for servers that require one).
fn server_trusted(addr: &str, ca: &Path, client: &TlsFiles) -> bool {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            addr,
            "-verify_return_error",
            "-brief",
        ])
        .arg("-CAfile")
        .arg(ca)
        .arg("-cert")
        .arg(client.cert())
        .arg("-key")
        .arg(client.key())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    out.status.success()
}

fn qemu_io(uri: &str, command: &str) {
    run_ok(Command::new("qemu-io").args(["-f", "raw", uri, "-c", command]));
}

/// The value of the node-level counter `name` in a scrape of `api`.
fn counter(api: &str, name: &str) -> u64 {
    let text = metrics_text(api);
    let line = text
        .lines()
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} in the scrape:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_node_and_its_dtl_move_to_a_new_ca_without_restarting_and_lose_no_acknowledged_write() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let old = Pki::new(tmp.path(), "old-ca");
    let new = Pki::new(tmp.path(), "new-ca");
    let dtl_tls = TlsFiles::new(&tmp.path().join("dtl-tls"));
    dtl_tls.install_identity(&old.peer("dtl-old"));
    dtl_tls.install_cas(&[&old]);
    let node_tls = TlsFiles::new(&tmp.path().join("node-tls"));
    node_tls.install_identity(&old.peer("node-old"));
    node_tls.install_cas(&[&old]);
    // What an outside client uses to look at the DTL's certificate.
    let probe = TlsFiles::new(&tmp.path().join("probe"));
    probe.install_identity(&new.peer("probe"));

    let dtl_dir = tmp.path().join("dtl");
    std::fs::create_dir_all(&dtl_dir).unwrap();
    let mut dtl = Dtl::start(&dtl_dir, "127.0.0.1:0", &dtl_tls);
    let backend = TestBackend::Default.shared(&tmp.path().join("backend"));
    let node_dir = tmp.path().join("node-a");
    std::fs::create_dir_all(&node_dir).unwrap();
    let mut extra = vec!["--dtl".to_string(), dtl.addr.clone()];
    extra.extend(node_tls.peer_flags());
    let mut a = Daemon::start_on(&node_dir, &backend, &strs(&extra));
    a.cli_ok(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "64M",
        "--dtl-mode",
        "sync",
    ]);
    a.wait_for(VOLUME, "the DTL link in sync", |i| {
        i["dtl_state"] == "ok_sync"
    });
    qemu_io(&a.uri(VOLUME), "write -P 0x5a 0 1M");
    let node_pid = a.child.as_ref().unwrap().id();

    // Step 1: everyone trusts both CAs.
    let rotate = |step: usize| {
        sighup(dtl.child.id());
        sighup(node_pid);
        wait_for_log(&dtl.log, RELOADED, step);
        wait_for_log(&a.log, RELOADED, step);
    };
    dtl_tls.install_cas(&[&old, &new]);
    node_tls.install_cas(&[&old, &new]);
    rotate(1);
    assert!(
        !server_trusted(&dtl.addr, &new.ca(), &probe),
        "still the old certificate"
    );

    // Step 2: certificates of the new CA.
    dtl_tls.install_identity(&new.peer("dtl-new"));
    node_tls.install_identity(&new.peer("node-new"));
    rotate(2);
    assert!(
        server_trusted(&dtl.addr, &new.ca(), &probe),
        "the DTL presents its new certificate to new clients"
    );
    assert!(!server_trusted(&dtl.addr, &old.ca(), &probe));

    // Step 3: only the new CA is trusted.
    dtl_tls.install_cas(&[&new]);
    node_tls.install_cas(&[&new]);
    rotate(3);

    // The link that was up through the rotation carried on, and still carries sync writes.
    assert_eq!(a.info(VOLUME)["dtl_state"], "ok_sync");
    qemu_io(&a.uri(VOLUME), "write -P 0xa5 4M 256k");
    assert_eq!(a.info(VOLUME)["dtl_state"], "ok_sync");
    // Three reloads, one per step (a periodic check that caught a new key before its
    // certificate could only add a failure, never a reload).
    assert_eq!(counter(&a.api, "vstor_credential_reloads_total"), 3);
    assert_eq!(counter(&dtl.metrics, "vstor_credential_reloads_total"), 3);

    // A new connection: the DTL restarts on its address; the node's reconnection only gets
    // through with the node's new identity (the DTL trusts only the new CA now, and presents a
    // certificate only the new CA vouches for).
    let addr = dtl.addr.clone();
    dtl.kill9();
    let _dtl = Dtl::start(&dtl_dir, &addr, &dtl_tls);
    // (A write makes sure the node noticed the old connection's end.)
    qemu_io(&a.uri(VOLUME), "write -P 0x77 12M 64k");
    a.wait_for(
        VOLUME,
        "the node back in sync with the restarted DTL",
        |i| i["dtl_degradations"].as_u64() >= Some(1) && i["dtl_state"] == "ok_sync",
    );
    qemu_io(&a.uri(VOLUME), "write -P 0x3c 8M 512k");

    // Every acknowledged write survives the owner's death: a node of the new CA adopts the
    // volume from the backend and the DTL.
    a.kill9();
    std::fs::remove_dir_all(&a.data_dir).unwrap();
    let b_tls = TlsFiles::new(&tmp.path().join("node-b-tls"));
    b_tls.install_identity(&new.peer("node-b"));
    b_tls.install_cas(&[&new]);
    let b_dir = tmp.path().join("node-b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let mut extra = vec!["--dtl".to_string(), addr];
    extra.extend(b_tls.peer_flags());
    let b = Daemon::start_on(&b_dir, &backend, &strs(&extra));
    let adopted: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["volume", "adopt", VOLUME, "--json"])).unwrap();
    assert_eq!(adopted["state"], "running", "{adopted}");
    qemu_io(&b.uri(VOLUME), "read -P 0x5a 0 1M");
    qemu_io(&b.uri(VOLUME), "read -P 0xa5 4M 256k");
    qemu_io(&b.uri(VOLUME), "read -P 0x3c 8M 512k");
    qemu_io(&b.uri(VOLUME), "read -P 0x77 12M 64k");
    qemu_io(&b.uri(VOLUME), "read -P 0 1M 3M");
}

/// `vstor ARGS` against an HTTPS API trusting `ca`.
fn api_cli(api: &str, ca: &Path, args: &[&str]) -> Output {
    Command::new(VSTOR)
        .args(args)
        .arg("--api")
        .arg(format!("https://{api}"))
        .arg("--api-ca")
        .arg(ca)
        .output()
        .unwrap()
}

/// Whether libnbd, trusting only `ca`, can read the export's size over TLS.
fn nbd_size(nbd: &str, client_dir: &Path) -> Result<String, String> {
    let out = Command::new("nbdinfo")
        .arg("--size")
        .arg(nbds_uri(nbd, VOLUME, client_dir))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn renewed_nbd_and_api_certificates_reach_new_clients_and_broken_files_change_nothing() {
    require_tool("nbdinfo");
    require_tool("nbdcopy");
    let tmp = tempfile::tempdir().unwrap();
    let old = Pki::new(tmp.path(), "old-ca");
    let new = Pki::new(tmp.path(), "new-ca");
    let tls = TlsFiles::new(&tmp.path().join("tls"));
    tls.install_identity(&old.server("node-old", false));
    let old_client = old.client_dir(tmp.path(), "old-client", None);
    let new_client = new.client_dir(tmp.path(), "new-client", None);
    let (cert, key) = (tls.cert(), tls.key());
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let node_dir = tmp.path().join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    let node = Daemon::start_with(
        &node_dir,
        &[
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--api-tls-cert",
            cert,
            "--api-tls-key",
            key,
        ],
    );
    let created = api_cli(
        &node.api,
        &old.ca(),
        &["volume", "create", VOLUME, "--size", "8M"],
    );
    assert!(created.status.success(), "{created:?}");
    // Some data to read back through the renewed certificate.
    let data = tmp.path().join("data.bin");
    let bytes: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&data, &bytes).unwrap();
    run_ok(
        Command::new("nbdcopy")
            .arg(&data)
            .arg(nbds_uri(&node.nbd, VOLUME, &old_client)),
    );
    assert_eq!(nbd_size(&node.nbd, &old_client).unwrap(), "8388608");
    assert!(nbd_size(&node.nbd, &new_client).is_err());

    // Renewed by the new CA; nothing changes until the node is told (or its check comes).
    tls.install_identity(&new.server("node-new", false));
    sighup(node.child.as_ref().unwrap().id());
    // Two configurations read those files: the NBD server's and the API's.
    wait_for_log(&node.log, RELOADED, 2);
    let refused = nbd_size(&node.nbd, &old_client).unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    let back = tmp.path().join("back.bin");
    run_ok(
        Command::new("nbdcopy")
            .arg(nbds_uri(&node.nbd, VOLUME, &new_client))
            .arg(&back),
    );
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "the data read back over the new certificate differs"
    );
    let listed = api_cli(&node.api, &new.ca(), &["volume", "list"]);
    assert!(listed.status.success(), "{listed:?}");
    assert!(String::from_utf8_lossy(&listed.stdout).contains(VOLUME));
    assert!(!api_cli(&node.api, &old.ca(), &["volume", "list"])
        .status
        .success());

    // A renewal gone wrong (the key file is not a key): both reloads fail, naming the file, and
    // the node keeps serving with the certificates it had.
    replace(
        &tls.key(),
        b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
    );
    sighup(node.child.as_ref().unwrap().id());
    wait_for_log(&node.log, RELOAD_FAILED, 2);
    let log = node.log_text();
    assert!(
        log.lines()
            .filter(|l| l.contains(RELOAD_FAILED))
            .all(|l| l.contains("key")),
        "{log}"
    );
    assert_eq!(nbd_size(&node.nbd, &new_client).unwrap(), "8388608");
    assert!(api_cli(&node.api, &new.ca(), &["volume", "list"])
        .status
        .success());
}

#[test]
fn the_osd_mds_and_edge_daemons_serve_their_renewed_certificates_after_sighup() {
    require_tool("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(tmp.path());
    let old = Pki::new(tmp.path(), "old-ca");
    let new = Pki::new(tmp.path(), "new-ca");
    let probe = TlsFiles::new(&tmp.path().join("probe"));
    probe.install_identity(&new.peer("probe"));
    let peer_files = |name: &str| {
        let files = TlsFiles::new(&tmp.path().join(format!("{name}-tls")));
        files.install_identity(&old.peer(&format!("{name}-old")));
        files.install_cas(&[&old, &new]);
        files
    };

    // Both report their reloads on --metrics (they have no API).
    let osd_metrics = vstor_backend::testing::free_addr();
    let mds_metrics = vstor_backend::testing::free_addr();
    let with_metrics = |files: &TlsFiles, addr: &str| {
        let mut flags = files.peer_flags();
        flags.extend(["--metrics".to_string(), addr.to_string()]);
        flags
    };
    let osd_tls = peer_files("osd");
    let osd = Osd::start_with(
        tmp.path(),
        "osd",
        &etcd.url(),
        "rack-a",
        "1G",
        &strs(&with_metrics(&osd_tls, &osd_metrics)),
    );
    let mds_tls = peer_files("mds");
    let backend = tmp.path().join("backend");
    std::fs::create_dir_all(&backend).unwrap();
    let mds_addr = vstor_backend::testing::free_addr();
    let mds = Mds::start_at(
        &tmp.path().join("mds"),
        &backend,
        &mds_addr,
        &strs(&with_metrics(&mds_tls, &mds_metrics)),
    );
    let edge_tls = TlsFiles::new(&tmp.path().join("edge-tls"));
    edge_tls.install_identity(&old.server("edge-old", false));
    let (cert, key) = (edge_tls.cert(), edge_tls.key());
    let edge = EdgeDaemon::start(
        tmp.path(),
        "edge",
        &etcd.url(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let old_client = old.client_dir(tmp.path(), "old-client", None);
    let new_client = new.client_dir(tmp.path(), "new-client", None);
    let edge_list = |dir: &Path| {
        try_nbdinfo_list(&format!(
            "nbds://{}/?tls-certificates={}",
            edge.nbd,
            dir.display()
        ))
    };

    for addr in [&osd.addr, &mds.addr] {
        assert!(
            server_trusted(addr, &old.ca(), &probe),
            "{addr}: the old certificate"
        );
        assert!(!server_trusted(addr, &new.ca(), &probe), "{addr}");
    }
    edge_list(&old_client).unwrap();
    assert!(edge_list(&new_client).is_err());

    osd_tls.install_identity(&new.peer("osd-new"));
    mds_tls.install_identity(&new.peer("mds-new"));
    edge_tls.install_identity(&new.server("edge-new", false));
    for pid in [osd.pid(), mds.pid(), edge.pid()] {
        sighup(pid);
    }
    for addr in [&osd.addr, &mds.addr] {
        poll(
            &format!("{addr} presenting its new certificate"),
            Duration::from_secs(30),
            || server_trusted(addr, &new.ca(), &probe).then_some(()),
        );
        assert!(!server_trusted(addr, &old.ca(), &probe), "{addr}");
    }
    poll(
        "the edge's new NBD certificate",
        Duration::from_secs(30),
        || edge_list(&new_client).ok(),
    );
    assert!(edge_list(&old_client).is_err());
    // The signal reloaded them; it ended none of them.
    wait_for_log(&osd.log, RELOADED, 1);
    wait_for_log(&edge.log, RELOADED, 1);
    assert_eq!(counter(&edge.api, "vstor_credential_reloads_total"), 1);
    assert_eq!(counter(&edge.api, "vstor_credential_reload_failing"), 0);
    // The OSD and the MDS count theirs on --metrics.
    for addr in [&osd_metrics, &mds_metrics] {
        poll(
            &format!("{addr}: the reload counted"),
            Duration::from_secs(30),
            || (counter(addr, "vstor_credential_reloads_total") == 1).then_some(()),
        );
        assert_eq!(
            counter(addr, "vstor_credential_reload_failing"),
            0,
            "{addr}"
        );
    }
    // A renewal gone wrong on the MDS (its key file is not a key) is what an alert sees: the
    // gauge stays up until the files are mended, and the MDS serves its certificate meanwhile.
    let mds_counter = |name: &str, what: &str, value: u64| {
        poll(what, Duration::from_secs(30), || {
            (counter(&mds_metrics, name) == value).then_some(())
        });
    };
    let renewed_key = std::fs::read(mds_tls.key()).unwrap();
    replace(&mds_tls.key(), b"not a key\n");
    sighup(mds.pid());
    mds_counter(
        "vstor_credential_reload_failing",
        "the MDS's failed renewal reported",
        1,
    );
    assert!(counter(&mds_metrics, "vstor_credential_reload_failures_total") >= 1);
    assert!(server_trusted(&mds.addr, &new.ca(), &probe));
    replace(&mds_tls.key(), &renewed_key);
    sighup(mds.pid());
    mds_counter(
        "vstor_credential_reload_failing",
        "the MDS's renewal mended",
        0,
    );
    assert_eq!(counter(&mds_metrics, "vstor_credential_reloads_total"), 1);
    let statuses: Vec<serde_json::Value> =
        serde_json::from_str(&run_ok(Command::new(VSTOR).args([
            "osd",
            "list",
            "--json",
            "--registry",
            &etcd.url(),
        ])))
        .unwrap();
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!(statuses[0]["state"], "up", "{statuses:?}");
}

/// The status of `GET path` on `api` with bearer `token`.
fn get_status(api: &str, path: &str, token: &str) -> u16 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    agent
        .get(format!("http://{api}{path}"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn cluster_nodes_rotate_their_api_token_without_refusing_a_forwarded_request() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let backend = TestBackend::Dir(root.path().join("backend"));
    let token_files: Vec<PathBuf> = ["n1", "n2"]
        .iter()
        .map(|n| {
            let path = root.path().join(format!("{n}-api-token"));
            std::fs::write(&path, "old-token\n").unwrap();
            path
        })
        .collect();
    let node = |i: usize, name: &str, domain: &str| {
        common::start_cluster_node(
            root.path(),
            &etcd.url(),
            &backend,
            name,
            domain,
            &["--api-token-file", token_files[i].to_str().unwrap()],
        )
    };
    let n1 = node(0, "n1", "a");
    let n2 = node(1, "n2", "b");
    // On n2, reached through n1: every request below is forwarded with n1's token.
    n1.cli_ok(&[
        "volume",
        "create",
        "fw",
        "--size",
        "16M",
        "--node",
        "n2",
        "--dtl-mode",
        "none",
    ]);
    let forwarded = |token: &str| get_status(&n1.api, "/v1/volumes/fw", token);
    let direct = |token: &str| get_status(&n2.api, "/v1/volumes/fw", token);
    assert_eq!((forwarded("old-token"), direct("old-token")), (200, 200));
    assert_eq!((forwarded("new-token"), direct("new-token")), (401, 401));

    let step = |i: usize, daemon: &Daemon, content: &str, reloads: usize| {
        replace(&token_files[i], content.as_bytes());
        sighup(daemon.child.as_ref().unwrap().id());
        wait_for_log(&daemon.log, RELOADED, reloads);
    };
    // 1: both nodes accept both tokens; clients may move to the new one.
    step(0, &n1, "old-token\nnew-token\n", 1);
    step(1, &n2, "old-token\nnew-token\n", 1);
    for token in ["old-token", "new-token"] {
        assert_eq!((forwarded(token), direct(token)), (200, 200), "{token}");
    }
    // 2: n1 sends the new token first (n2 not yet told): its forwarded requests still pass.
    step(0, &n1, "new-token\nold-token\n", 2);
    assert_eq!(forwarded("old-token"), 200);
    step(1, &n2, "new-token\nold-token\n", 2);
    // 3: the old token is dropped; n2 first, so n1's forwarding must already send the new one.
    step(1, &n2, "new-token\n", 3);
    assert_eq!(forwarded("new-token"), 200);
    step(0, &n1, "new-token\n", 3);
    assert_eq!((forwarded("old-token"), direct("old-token")), (401, 401));
    assert_eq!((forwarded("new-token"), direct("new-token")), (200, 200));
    // The CLI reads the file's (first) token as before.
    n1.cli_ok(&["volume", "delete", "fw"]);
    assert_eq!(direct("new-token"), 404);
}

#[test]
fn cluster_nodes_move_their_https_apis_to_a_new_ca_without_refusing_a_forwarded_request() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let backend = TestBackend::Dir(root.path().join("backend"));
    let old = Pki::new(root.path(), "old-ca");
    let new = Pki::new(root.path(), "new-ca");
    // Each node's API certificate and the CA bundle it checks the other's against (--api-ca).
    let names = ["n1", "n2"];
    let files: Vec<TlsFiles> = names
        .iter()
        .map(|n| {
            let files = TlsFiles::new(&root.path().join(format!("{n}-api")));
            files.install_identity(&old.server(&format!("{n}-old"), false));
            files.install_cas(&[&old]);
            files
        })
        .collect();
    let nodes: Vec<Daemon> = files
        .iter()
        .zip(names.iter().zip(["a", "b"]))
        .map(|(f, (name, domain))| {
            let flags = file_flags(&[
                ("--api-tls-cert", &f.cert()),
                ("--api-tls-key", &f.key()),
                ("--api-ca", &f.ca()),
            ]);
            common::start_cluster_node(
                root.path(),
                &etcd.url(),
                &backend,
                name,
                domain,
                &strs(&flags),
            )
        })
        .collect();
    // The test's own CLI trusts both CAs throughout: what is rotated is the nodes' trust.
    let both = TlsFiles::new(&root.path().join("cli"));
    both.install_cas(&[&old, &new]);
    let cli = |i: usize, args: &[&str]| api_cli(&nodes[i].api, &both.ca(), args);
    // "fw1" lives on n1, "fw2" on n2; each is asked for through the other node, which forwards
    // the request over HTTPS to the owner.
    for (i, volume) in [(1, "fw1"), (0, "fw2")] {
        let owner = names[1 - i];
        let args = ["volume", "create", volume, "--size", "16M", "--node", owner];
        let created = cli(i, &[&args[..], &["--dtl-mode", "none"]].concat());
        assert!(created.status.success(), "{created:?}");
    }
    // The owner's own answer, or why the asked node could not get it (`volume info` then
    // answers from the registry with `owner_unreachable`).
    let forwarded = |through: usize, volume: &str| -> Result<(), String> {
        let out = cli(through, &["volume", "info", volume, "--json"]);
        assert!(out.status.success(), "{out:?}");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["name"], volume, "{info}");
        match &info["owner_unreachable"] {
            serde_json::Value::Null => Ok(()),
            why => Err(why.to_string()),
        }
    };
    let both_ways = |step: &str| {
        forwarded(0, "fw2").unwrap_or_else(|e| panic!("{step}: n1 → n2: {e}"));
        forwarded(1, "fw1").unwrap_or_else(|e| panic!("{step}: n2 → n1: {e}"));
    };
    both_ways("before");
    let tell = |i: usize, reloads: usize| {
        sighup(nodes[i].child.as_ref().unwrap().id());
        wait_for_log(&nodes[i].log, RELOADED, reloads);
    };

    // 1: every node trusts both CAs.
    for (i, f) in files.iter().enumerate() {
        f.install_cas(&[&old, &new]);
        tell(i, 1);
    }
    both_ways("both CAs trusted");
    // 2: API certificates of the new CA, one node after the other; forwarding to the node
    // already moved only works because the other re-read its bundle in step 1.
    for (i, f) in files.iter().enumerate() {
        f.install_identity(&new.server(&format!("{}-new", names[i]), false));
        tell(i, 2);
        assert!(
            !api_cli(&nodes[i].api, &old.ca(), &["volume", "list"])
                .status
                .success(),
            "{} still presents its old certificate",
            names[i]
        );
        both_ways(&format!("{} on the new CA", names[i]));
    }
    // 3: only the new CA is trusted.
    for (i, f) in files.iter().enumerate() {
        f.install_cas(&[&new]);
        tell(i, 3);
    }
    both_ways("only the new CA trusted");

    // A bundle without the CA n2's certificate comes from: n1 refuses n2's API from then on
    // (its bundle is what it checks against, not some default store), saying where it failed.
    files[0].install_cas(&[&old]);
    tell(0, 4);
    let refused = forwarded(0, "fw2").unwrap_err();
    assert!(refused.contains("cannot reach node API"), "{refused}");
    forwarded(1, "fw1").unwrap();
}

#[test]
fn a_node_reconnects_to_etcd_with_its_renewed_client_certificate() {
    let root = tempfile::tempdir().unwrap();
    let etcd_ca = Pki::new(root.path(), "etcd-ca");
    let old = Pki::new(root.path(), "old-client-ca");
    let new = Pki::new(root.path(), "new-client-ca");
    let (cert, key) = etcd_ca.server("etcd", false);
    // etcd trusts client certificates of both CAs while the node moves over.
    let trusted = root.path().join("etcd-trusted.pem");
    let bundle = [old.ca(), new.ca()]
        .iter()
        .flat_map(|ca| std::fs::read(ca).unwrap())
        .collect::<Vec<u8>>();
    std::fs::write(&trusted, bundle).unwrap();
    let mut etcd = Etcd::start_tls(
        root.path(),
        EtcdTls {
            cert,
            key,
            client_ca: trusted,
        },
    );
    let client = TlsFiles::new(&root.path().join("node-etcd-tls"));
    client.install_identity(&old.client("n1-old", "n1"));
    let flags = file_flags(&[
        ("--etcd-ca", &etcd_ca.ca()),
        ("--etcd-cert", &client.cert()),
        ("--etcd-key", &client.key()),
    ]);
    let backend = TestBackend::Dir(root.path().join("backend"));
    let n1 =
        common::start_cluster_node(root.path(), &etcd.url(), &backend, "n1", "a", &strs(&flags));
    n1.cli_ok(&[
        "volume",
        "create",
        "before",
        "--size",
        "16M",
        "--dtl-mode",
        "none",
    ]);

    client.install_identity(&new.client("n1-new", "n1"));
    sighup(n1.child.as_ref().unwrap().id());
    wait_for_log(&n1.log, RELOADED, 1);

    // etcd restarts trusting only the new CA: the node's connections break, and only its new
    // certificate gets it back in.
    etcd.kill9();
    let only_new = root.path().join("etcd-trusted-new.pem");
    std::fs::copy(new.ca(), &only_new).unwrap();
    etcd.tls.as_mut().unwrap().client_ca = only_new;
    etcd.restart();
    poll(
        "a registry write through the renewed client",
        Duration::from_secs(30),
        || {
            let out = n1.cli(&[
                "volume",
                "create",
                "after",
                "--size",
                "16M",
                "--dtl-mode",
                "none",
            ]);
            out.status.success().then_some(())
        },
    );
    let nodes: serde_json::Value =
        serde_json::from_str(&n1.cli_ok(&["node", "list", "--json"])).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
    assert_eq!(nodes[0]["alive"], true, "the node kept its lease: {nodes}");
    // (A node that lost its lease fences its volumes.)
    for volume in ["before", "after"] {
        assert_eq!(n1.info(volume)["state"], "running", "{volume}");
    }
}

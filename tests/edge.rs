//! `vstor edge` against a real cluster on loopback: etcd, nodes n1 and n2 serving edges
//! (`--edge-listen`), n3 serving none, and edges e1 and e2. Data written through an edge is read
//! back (patterns and checksums) through the edge and through the owner's own NBD export; the
//! attachment rule, the error texts, a stale owner tag refused by the node, an edge restart
//! (kill -9) that re-attaches from the registry, and the volumes' NBD allow lists (networks and
//! client-certificate subjects) enforced by the edge's NBD server as the owner changes them; on
//! a mutual-TLS cluster, an edge beside its owner reaching it over the owner's unix socket
//! (`--edge-socket`) and another over TLS (`--transport tcp`). Failover under load is in
//! `edge_failover.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::edge::EdgeDaemon;
use common::etcd::Etcd;
use common::tls::{nbds_uri, peer_tls_flags, qemu_tls_args, strs, Pki};
use common::vhost_client::VhostClient;
use common::{
    checksum_file, nbdinfo_list, poll, require_tool, run_any, run_ok, try_nbdinfo_list,
    uri_checksum, Daemon, NbdClient, TestBackend, VSTOR,
};
use serde_json::Value;

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    // A read-only export (a snapshot) is opened read-only.
    if uri.contains('@') {
        cmd.arg("-r");
    }
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");
    out
}

fn node(
    root: &std::path::Path,
    backend: &TestBackend,
    etcd: &str,
    name: &str,
    edge: bool,
) -> Daemon {
    node_with(root, backend, etcd, name, edge, &[])
}

/// `node` with more flags.
fn node_with(
    root: &std::path::Path,
    backend: &TestBackend,
    etcd: &str,
    name: &str,
    edge: bool,
    extra: &[&str],
) -> Daemon {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = vec!["--registry", etcd, "--node", name];
    if edge {
        args.extend(["--edge-listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    Daemon::start_on(&dir, backend, &args)
}

fn failure(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure, got: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn entry<'a>(list: &'a [Value], volume: &str) -> &'a Value {
    list.iter()
        .find(|v| v["volume"] == volume)
        .unwrap_or_else(|| panic!("{volume} not in {list:?}"))
}

/// `Hello` with `tag` straight to a node's edge listener: the first reply.
fn raw_hello(addr: &str, volume: &str, tag: u64) -> vstor_edge::remote::proto::Message {
    use futures::{SinkExt, StreamExt};
    use vstor_edge::remote::proto::{EdgeCodec, Frame, Message, PROTOCOL_VERSION};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut conn = tokio_util::codec::Framed::new(stream, EdgeCodec::new());
        conn.send(Frame::new(
            0,
            Message::Hello {
                version: PROTOCOL_VERSION,
                volume: volume.into(),
                tag,
                client: "stale-edge".into(),
            },
        ))
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(10), conn.next())
            .await
            .expect("a reply within 10 s")
            .expect("a reply, not a closed connection")
            .expect("a well-formed reply")
            .message
    })
}

fn node_edge_addr(daemon: &Daemon, name: &str) -> String {
    let nodes: Value = serde_json::from_str(&daemon.cli_ok(&["node", "list", "--json"])).unwrap();
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap();
    node["edge_addr"].as_str().expect("edge_addr").to_string()
}

#[test]
fn edge_attaches_serves_refuses_and_reattaches_after_a_restart() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let url = etcd.url();
    let backend = TestBackend::Dir(root.path().join("backend"));
    let n1 = node(root.path(), &backend, &url, "n1", true);
    let _n2 = node(root.path(), &backend, &url, "n2", true);
    let n3 = node(root.path(), &backend, &url, "n3", false);
    n1.cli_ok(&["volume", "create", "vol", "--size", "64M", "--node", "n1"]);
    n1.cli_ok(&["volume", "create", "far", "--size", "16M", "--node", "n3"]);
    // `node list` shows which nodes serve edges.
    assert!(node_edge_addr(&n1, "n1").starts_with("127.0.0.1:"));
    let nodes: Value = serde_json::from_str(&n1.cli_ok(&["node", "list", "--json"])).unwrap();
    let n3_record = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "n3")
        .unwrap();
    assert!(n3_record["edge_addr"].is_null(), "{n3_record}");

    let mut e1 = EdgeDaemon::start(root.path(), "e1", &url, &[]);
    let e2 = EdgeDaemon::start(root.path(), "e2", &url, &[]);
    assert_eq!(e1.reattached, 0);

    // Attach: a socket and an NBD export on the edge.
    let out = e1.cli_ok(&["attach", "vol"]);
    assert!(out.contains(&e1.uri("vol")), "{out}");
    assert!(e1.socket("vol").exists(), "no vhost-user socket");

    // Write through the edge; read back through the edge and through the owner itself.
    qemu_io(
        &e1.uri("vol"),
        &["write -P 0xa5 0 1M", "write -P 0x3c 20M 64k", "flush"],
    );
    qemu_io(
        &e1.uri("vol"),
        &[
            "read -P 0xa5 0 1M",
            "read -P 0x3c 20M 64k",
            "read -P 0 1M 4M",
        ],
    );
    let source = root.path().join("random.img");
    let random: Vec<u8> = (0..(8u64 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&source, &random).unwrap();
    run_ok(Command::new("nbdcopy").args([source.to_str().unwrap(), &e1.uri("vol")]));
    let via_owner = root.path().join("via-owner.img");
    let via_edge = root.path().join("via-edge.img");
    run_ok(Command::new("nbdcopy").args([&n1.uri("vol"), via_owner.to_str().unwrap()]));
    run_ok(Command::new("nbdcopy").args([&e1.uri("vol"), via_edge.to_str().unwrap()]));
    let want = checksum_file(&source);
    let head = |path: &std::path::Path| {
        let mut bytes = std::fs::read(path).unwrap();
        bytes.truncate(random.len());
        let out = path.with_extension("head");
        std::fs::write(&out, bytes).unwrap();
        checksum_file(&out)
    };
    assert_eq!(head(&via_owner), want, "owner's export differs");
    assert_eq!(head(&via_edge), want, "edge's export differs");

    // The same through the edge's vhost-user-blk socket, read back through the owner's export;
    // detach is refused while the frontend is connected.
    {
        let mut guest = VhostClient::connect(&e1.socket("vol"));
        let block: Vec<u8> = (0..65_536u32).map(|i| (i % 253) as u8 ^ 0x5a).collect();
        guest.write(30 << 20, &block);
        guest.flush();
        assert_eq!(
            crc32c::crc32c(&guest.read(30 << 20, block.len())),
            crc32c::crc32c(&block)
        );
        let err = failure(&e1.cli(&["detach", "vol"]));
        assert!(err.contains("a vhost-user frontend"), "{err}");
        let mut owner = NbdClient::connect(&n1.nbd, "vol").unwrap();
        let mut back = vec![0u8; block.len()];
        assert_eq!(owner.read(30 << 20, &mut back).unwrap(), 0);
        assert_eq!(
            crc32c::crc32c(&back),
            crc32c::crc32c(&block),
            "owner sees the vhost write"
        );
    }

    // `edge list`: owner, tag, state; the tag is the owner's.
    let tag = n1.info("vol")["owner_tag"].as_u64().unwrap();
    let list = e1.list();
    let vol = entry(&list, "vol");
    assert_eq!(vol["owner"], "n1", "{vol}");
    assert_eq!(vol["tag"], tag, "{vol}");
    assert_eq!(vol["state"], "connected", "{vol}");
    assert_eq!(vol["read_only"], false);
    assert_eq!(vol["nbd_uri"], e1.uri("vol"));
    assert!(vol["completed"].as_u64().unwrap() > 0, "{vol}");
    let text = e1.cli_ok(&["list"]);
    assert!(text.contains("vol") && text.contains("connected"), "{text}");
    let metrics = common::metrics_text(&e1.api);
    assert!(
        metrics.contains("vstor_edge_volume_state{edge=\"e1\",volume=\"vol\",owner=\"n1\",state=\"connected\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "vstor_edge_request_latency_seconds_bucket{edge=\"e1\",volume=\"vol\",le=\"+Inf\"}"
    ));
    // What the alert rules query of an edge, it exports.
    let checked =
        common::assert_alerted_metrics_exported(&metrics, |m| m.starts_with("vstor_edge_"));
    assert!(checked >= 2, "{checked}");

    // A second writable attach elsewhere is refused, naming the holder.
    let err = failure(&e2.cli(&["attach", "vol"]));
    assert!(
        err.contains("volume vol is attached writable on edge e1"),
        "{err}"
    );
    assert!(!e2.socket("vol").exists());
    // Unknown volume, a node without --edge-listen: clear errors.
    let err = failure(&e1.cli(&["attach", "nosuch"]));
    assert!(
        err.contains("volume nosuch is not in the cluster registry"),
        "{err}"
    );
    let err = failure(&e1.cli(&["attach", "far"]));
    assert!(
        err.contains("node n3 owns volume far but serves no edges"),
        "{err}"
    );
    let err = failure(&e1.cli(&["detach", "far"]));
    assert!(
        err.contains("volume far is not attached on edge e1"),
        "{err}"
    );
    // A second edge process under a live name is refused.
    let mut dup = EdgeDaemon::start_command(root.path(), "e1", &url);
    let out = dup.output().unwrap();
    let err = failure(&out);
    assert!(err.contains("edge e1 is already running"), "{err}");

    // Read-only: a snapshot attaches on several edges.
    n1.cli_ok(&["snapshot", "create", "vol", "s1"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = e1.cli(&["attach", "vol@s1"]);
        if out.status.success() {
            break;
        }
        // The snapshot's view needs it on the backend: poll until it is.
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    e2.cli_ok(&["attach", "vol@s1"]);
    assert_eq!(entry(&e2.list(), "vol@s1")["read_only"], true);
    qemu_io(&e2.uri("vol@s1"), &["read -P 0x3c 20M 64k"]);

    // A stale edge (an old owner tag) is refused by the node.
    let addr = node_edge_addr(&n1, "n1");
    match raw_hello(&addr, "vol", tag - 1) {
        vstor_edge::remote::proto::Message::Error { code, message } => {
            assert_eq!(
                code,
                vstor_edge::remote::proto::ErrorCode::StaleTag,
                "{message}"
            );
        }
        other => panic!("stale tag accepted: {other:?}"),
    }
    assert!(matches!(
        raw_hello(&addr, "vol", tag),
        vstor_edge::remote::proto::Message::Welcome { .. }
    ));

    // kill -9 the edge: it comes back with its attachments and serves the same data.
    e1.kill9();
    e1.launch();
    assert_eq!(e1.reattached, 2, "{}", e1.log_text());
    let deadline = Instant::now() + Duration::from_secs(30);
    while entry(&e1.list(), "vol")["state"] != "connected" {
        assert!(Instant::now() < deadline, "{:?}", e1.list());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(e1.socket("vol").exists());
    qemu_io(&e1.uri("vol"), &["read -P 0x3c 20M 64k"]);

    // Detach is refused while a client is connected, unless forced.
    let client = NbdClient::connect(&e1.nbd, "vol").unwrap();
    let err = failure(&e1.cli(&["detach", "vol"]));
    assert!(err.contains("volume vol is in use on edge e1"), "{err}");
    e1.cli_ok(&["detach", "vol", "--force"]);
    drop(client);
    assert!(!e1.socket("vol").exists());
    e1.cli_ok(&["detach", "vol@s1"]);
    e2.cli_ok(&["detach", "vol@s1"]);
    assert!(e1.list().is_empty());
    // Detached: another edge may attach it writable now.
    e2.cli_ok(&["attach", "vol"]);
    qemu_io(&e2.uri("vol"), &["read -P 0x3c 20M 64k"]);
    drop(n3);
}

#[test]
fn edge_command_line_errors_are_clear() {
    let run = |args: &[&str]| {
        let out = Command::new(VSTOR)
            .args(args)
            .env_remove("VSTOR_EDGE_API")
            .output()
            .unwrap();
        failure(&out)
    };
    let err = run(&["edge"]);
    assert!(
        err.contains("vstor edge needs the cluster registry"),
        "{err}"
    );
    let err = run(&["edge", "--registry", "/some/dir"]);
    assert!(
        err.contains("an edge needs the cluster registry, etcd://"),
        "{err}"
    );
    let err = run(&[
        "edge",
        "--registry",
        "etcd://127.0.0.1:1",
        "--name",
        "x",
        "--api",
        "127.0.0.1:0",
        "--nbd",
        "127.0.0.1:0",
    ]);
    assert!(err.contains("cannot reach the cluster registry"), "{err}");
    let err = run(&[
        "edge",
        "--registry",
        "etcd://127.0.0.1:1",
        "--reconnect-bound",
        "soon",
    ]);
    assert!(
        err.contains("--reconnect-bound \"soon\" is not a duration"),
        "{err}"
    );
    let err = run(&[
        "edge",
        "--registry",
        "etcd://127.0.0.1:1",
        "--name",
        "bad/name",
    ]);
    assert!(
        err.contains("edge name \"bad/name\" is not allowed"),
        "{err}"
    );
    let err = run(&["edge", "list", "--api", "127.0.0.1:1"]);
    assert!(err.contains("is `vstor edge` running?"), "{err}");
    let err = run(&["edge", "attach"]);
    assert!(err.contains("VOLUME"), "{err}");
    let err = run(&["serve", "--edge-listen", "nowhere"]);
    assert!(err.contains("edge_listen (--edge-listen)"), "{err}");
    let err = run(&[
        "edge",
        "--registry",
        "etcd://127.0.0.1:1",
        "--transport",
        "udp",
    ]);
    assert!(
        err.contains("invalid value 'udp' for '--transport"),
        "{err}"
    );
    let err = run(&["serve", "--edge-socket", "/tmp/vstor-no-listen.sock"]);
    assert!(
        err.contains("--edge-socket /tmp/vstor-no-listen.sock) needs edge_listen"),
        "{err}"
    );
    // A file in the socket's place is not the node's to replace.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let serve_on = |socket: &std::path::Path| {
        run(&[
            "serve",
            "--data-dir",
            &data,
            "--api",
            "127.0.0.1:0",
            "--nbd",
            "127.0.0.1:0",
            "--edge-listen",
            "127.0.0.1:0",
            "--edge-socket",
            &socket.display().to_string(),
        ])
    };
    let taken = dir.path().join("edge.sock");
    std::fs::write(&taken, b"keep me").unwrap();
    let err = serve_on(&taken);
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");
    // Nor is a socket another process serves on; a dead one's leftover is replaced.
    let live = dir.path().join("live.sock");
    let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let err = serve_on(&live);
    assert!(err.contains("another process is serving on"), "{err}");
    drop(listener);
    let node_dir = dir.path().join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    let live = live.display().to_string();
    let _node = Daemon::start_with(
        &node_dir,
        &["--edge-listen", "127.0.0.1:0", "--edge-socket", &live],
    );
    std::os::unix::net::UnixStream::connect(&live).expect("the node serves on the leftover path");
}

#[test]
fn an_edge_on_mutual_tls_serves_nbd_over_tls_behind_a_token_and_strangers_are_refused() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let url = etcd.url();
    let cluster = Pki::new(root.path(), "cluster");
    let foreign = Pki::new(root.path(), "foreign");
    let nbd_ca = Pki::new(root.path(), "nbd-ca");
    let backend = TestBackend::Dir(root.path().join("backend"));
    let n1_tls = cluster.peer_flags("n1");
    let n1 = node_with(root.path(), &backend, &url, "n1", true, &strs(&n1_tls));
    for volume in ["vol", "other"] {
        n1.cli_ok(&["volume", "create", volume, "--size", "64M", "--node", "n1"]);
    }

    // e1: mutual TLS to the owner, NBD TLS required of its clients, a token on its API.
    let token = root.path().join("edge-token");
    std::fs::write(&token, "edge-secret\n").unwrap();
    let token = token.display().to_string();
    let (cert, key) = nbd_ca.server("edge-nbd", false);
    let mut e1_args = vec![
        "--tls-cert".to_string(),
        cert.display().to_string(),
        "--tls-key".to_string(),
        key.display().to_string(),
        "--api-token-file".to_string(),
        token.clone(),
    ];
    e1_args.extend(cluster.peer_flags("e1"));
    let e1 = EdgeDaemon::start(root.path(), "e1", &url, &strs(&e1_args));
    let no_token = failure(&e1.cli(&["list"]));
    assert!(no_token.contains("401"), "{no_token}");
    e1.cli_ok(&["--api-token-file", &token, "attach", "vol"]);
    let listed = e1.cli_ok(&["--api-token-file", &token, "list", "--json"]);
    assert!(listed.contains("\"vol\""), "{listed}");

    // Written through the edge over NBD TLS, read back through it and through the owner.
    let client = nbd_ca.client_dir(root.path(), "client", None);
    let mut qemu = Command::new("qemu-io");
    qemu.args(qemu_tls_args(&e1.nbd, "vol", &client)).args([
        "-c",
        "write -P 0x3c 0 2M",
        "-c",
        "write -P 0xc3 5M 512k",
        "-c",
        "read -P 0x3c 0 2M",
    ]);
    let out = run_ok(&mut qemu);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let (via_edge, via_owner) = (root.path().join("edge.raw"), root.path().join("owner.raw"));
    run_ok(
        Command::new("nbdcopy")
            .arg(nbds_uri(&e1.nbd, "vol", &client))
            .arg(&via_edge),
    );
    run_ok(Command::new("nbdcopy").arg(n1.uri("vol")).arg(&via_owner));
    assert_eq!(checksum_file(&via_edge), checksum_file(&via_owner));
    qemu_io(&n1.uri("vol"), &["read -P 0xc3 5M 512k", "read -P 0 2M 3M"]);
    // A plain NBD client is refused by the edge.
    let plain = Command::new("qemu-io")
        .args(["-f", "raw", &e1.uri("vol"), "-c", "read 0 4k"])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plain NBD client was served");

    // Edges without the cluster's certificate: refused by the owner, with the reason.
    let e2 = EdgeDaemon::start(root.path(), "e2", &url, &[]);
    let plain_edge = failure(&e2.cli(&["attach", "other"]));
    assert!(plain_edge.contains("requires mutual TLS"), "{plain_edge}");
    let stranger = peer_tls_flags(&foreign.peer("e3"), &cluster.ca());
    let e3 = EdgeDaemon::start(root.path(), "e3", &url, &strs(&stranger));
    let foreign_edge = failure(&e3.cli(&["attach", "other"]));
    assert!(foreign_edge.contains("alert"), "{foreign_edge}");
    let log = n1.log_text();
    assert!(
        log.contains("plain-text edge refused") && log.contains("edge client refused"),
        "{log}"
    );

    // e1 still serves what it wrote.
    qemu_io_tls_read(&e1.nbd, &client);
}

/// On a mutual-TLS cluster, a node with `--edge-socket`: an edge on its host reaches it over
/// the unix socket (no certificate needed there: the socket's mode and the peer's uid are the
/// check), an edge told `--transport tcp` over TLS, and both see the same data.
#[test]
fn on_a_tls_cluster_a_same_host_edge_uses_the_socket_and_a_tcp_edge_keeps_tls() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let url = etcd.url();
    let cluster = Pki::new(root.path(), "cluster");
    let backend = TestBackend::Dir(root.path().join("backend"));
    let socket = root.path().join("n1-edge.sock").display().to_string();
    let mut n1_args = cluster.peer_flags("n1");
    n1_args.extend(["--edge-socket".to_string(), socket.clone()]);
    let n1 = node_with(root.path(), &backend, &url, "n1", true, &strs(&n1_args));
    n1.cli_ok(&["volume", "create", "vol", "--size", "64M", "--node", "n1"]);
    // The socket is in the node list, in its table as in its JSON.
    let table = n1.cli_ok(&["node", "list"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("n1 "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.ends_with(&socket), "{table}");
    let owner_addr = |edge: &EdgeDaemon| {
        let list: Vec<Value> = serde_json::from_str(&edge.cli_ok(&["list", "--json"])).unwrap();
        entry(&list, "vol")["owner_addr"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // No peer certificate: the socket admits it, TCP would not.
    let local = EdgeDaemon::start(root.path(), "local", &url, &[]);
    local.cli_ok(&["attach", "vol"]);
    assert_eq!(owner_addr(&local), format!("unix:{socket}"));
    qemu_io(
        &local.uri("vol"),
        &[
            "write -P 0x5a 0 1M",
            "write -P 0xa5 3M 64k",
            "read -P 0x5a 0 1M",
        ],
    );
    local.cli_ok(&["detach", "vol"]);

    let tcp_args = {
        let mut args = cluster.peer_flags("remote");
        args.extend(["--transport".to_string(), "tcp".to_string()]);
        args
    };
    let remote = EdgeDaemon::start(root.path(), "remote", &url, &strs(&tcp_args));
    remote.cli_ok(&["attach", "vol"]);
    let addr = owner_addr(&remote);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    qemu_io(
        &remote.uri("vol"),
        &[
            "read -P 0x5a 0 1M",
            "read -P 0xa5 3M 64k",
            "read -P 0 1M 2M",
        ],
    );
    assert!(
        n1.log_text().contains("local pid"),
        "the node logs the local edge by pid"
    );
}

fn qemu_io_tls_read(nbd: &str, client: &std::path::Path) {
    let mut qemu = Command::new("qemu-io");
    qemu.args(qemu_tls_args(nbd, "vol", client)).args([
        "-c",
        "read -P 0x3c 0 2M",
        "-c",
        "read -P 0xc3 5M 512k",
    ]);
    let out = run_ok(&mut qemu);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// `nbdinfo URI` (one export): whether it opened, and what it said.
fn nbdinfo_opens(uri: &str) -> (bool, String) {
    run_any(Command::new("nbdinfo").arg(uri))
}

/// Poll until the edge's `nbdinfo --list` (at `list_uri`) shows exactly `want`: an allow list
/// changed on the node reaches an attached edge within about a second (pushed over the edge
/// protocol), so a few seconds is a generous bound. A listing that fails meanwhile (nbdinfo
/// listed an export the change then closed to it) counts as not yet.
fn until_listed(list_uri: &str, want: &[&str]) {
    poll(
        &format!("{list_uri} to list {want:?}"),
        Duration::from_secs(10),
        || (try_nbdinfo_list(list_uri).ok()? == want).then_some(()),
    );
}

/// The allow list `vstor edge list --json` shows in force for `volume`: (networks, subjects).
fn edge_allow(edge: &EdgeDaemon, volume: &str) -> (Vec<String>, Vec<String>) {
    let list: Value = serde_json::from_str(&edge.cli_ok(&["list", "--json"])).unwrap();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["volume"] == volume)
        .unwrap_or_else(|| panic!("{volume} not in {list}"));
    let strings = |key: &str| -> Vec<String> {
        entry[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    (strings("allow_networks"), strings("allow_subjects"))
}

/// On `n1`: volume `vol` (16 MiB) restricted by `flag value`, and volume `open` with no list.
fn restricted_and_open_volumes(n1: &Daemon, flag: &str, value: &str) {
    n1.cli_ok(&[
        "volume", "create", "vol", "--size", "16M", "--node", "n1", flag, value,
    ]);
    n1.cli_ok(&["volume", "create", "open", "--size", "16M", "--node", "n1"]);
}

/// Issue 15 on an edge: a volume's NBD allow list, kept by its owner, is enforced by
/// `vstor edge`'s own NBD server exactly as by the node's: an excluded client (every tool here
/// connects from 127.0.0.1) does not see the volume in `nbdinfo --list` and cannot open it,
/// `volume update` takes effect on the attached edge without a re-attach, and a restarted edge
/// enforces the list it gets when it re-attaches.
#[test]
fn an_edge_enforces_the_volume_network_allow_list_and_follows_updates() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    require_tool("qemu-img");
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let url = etcd.url();
    let backend = TestBackend::Dir(root.path().join("backend"));
    let n1 = node(root.path(), &backend, &url, "n1", true);
    restricted_and_open_volumes(&n1, "--allow-net", "192.0.2.0/24");
    let mut e1 = EdgeDaemon::start(root.path(), "e1", &url, &[]);
    e1.cli_ok(&["attach", "vol"]);
    e1.cli_ok(&["attach", "open"]);
    let list_uri = format!("nbd://{}", e1.nbd);

    // Excluded: not listed, and neither nbdinfo nor qemu-img can open it; the other volume is
    // served as usual. The edge answers exactly what the owner's own NBD server answers.
    assert_eq!(nbdinfo_list(&list_uri), ["open"]);
    assert_eq!(nbdinfo_list(&format!("nbd://{}", n1.nbd)), ["open"]);
    let (opened, said) = nbdinfo_opens(&e1.uri("vol"));
    assert!(
        !opened,
        "an excluded client opened vol through the edge: {said}"
    );
    let (opened, said) = run_any(Command::new("qemu-img").args(["info", &e1.uri("vol")]));
    assert!(!opened, "qemu-img opened vol through the edge: {said}");
    let (opened, said) = nbdinfo_opens(&e1.uri("open"));
    assert!(opened, "{said}");
    let log = e1.log_text();
    assert!(
        log.lines().any(|l| l.contains("refused by its allow list")
            && l.contains("export=\"vol\"")
            && l.contains("client=127.0.0.1:")),
        "{log}"
    );
    // `vstor edge list` shows the list in force.
    assert_eq!(
        edge_allow(&e1, "vol"),
        (vec!["192.0.2.0/24".into()], vec![])
    );
    assert_eq!(edge_allow(&e1, "open"), (vec![], vec![]));
    let text = e1.cli_ok(&["list"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("vol ") && l.contains("networks 192.0.2.0/24")),
        "{text}"
    );

    // Allowed on the node: the attached edge follows without a re-attach; written through the
    // edge, read back, and the same bytes through the edge and through the owner.
    n1.cli_ok(&["volume", "update", "vol", "--allow-net", "127.0.0.0/8"]);
    until_listed(&list_uri, &["open", "vol"]);
    assert_eq!(edge_allow(&e1, "vol"), (vec!["127.0.0.0/8".into()], vec![]));
    qemu_io(
        &e1.uri("vol"),
        &[
            "write -P 0x7e 0 1M",
            "write -P 0x81 9M 256k",
            "read -P 0x7e 0 1M",
        ],
    );
    let via_edge = uri_checksum(&e1.uri("vol"), &root.path().join("edge.raw"));
    let via_owner = uri_checksum(&n1.uri("vol"), &root.path().join("owner.raw"));
    assert_eq!(via_edge, via_owner);
    assert!(
        e1.log_text()
            .contains("the owner changed the volume's allow list"),
        "{}",
        e1.log_text()
    );

    // Excluded again: refused again, the data stays where it is.
    n1.cli_ok(&["volume", "update", "vol", "--allow-net", "198.51.100.0/24"]);
    until_listed(&list_uri, &["open"]);
    assert!(!nbdinfo_opens(&e1.uri("vol")).0);

    // A restarted edge re-attaches and enforces the list its owner sends in the handshake.
    e1.kill9();
    e1.launch();
    assert_eq!(e1.reattached, 2);
    assert_eq!(nbdinfo_list(&list_uri), ["open"]);
    assert!(!nbdinfo_opens(&e1.uri("vol")).0);

    // --allow-any lifts it: every client again, and what was written is there.
    n1.cli_ok(&["volume", "update", "vol", "--allow-any"]);
    until_listed(&list_uri, &["open", "vol"]);
    qemu_io(
        &e1.uri("vol"),
        &["read -P 0x7e 0 1M", "read -P 0x81 9M 256k"],
    );
    assert_eq!(
        uri_checksum(&e1.uri("vol"), &root.path().join("edge.raw")),
        via_owner
    );
}

/// The subject half of the rule on an edge whose NBD server asks for client certificates: only
/// the listed certificate CN sees and opens the volume through the edge.
#[test]
fn an_edge_with_client_certificates_admits_only_the_allowed_subject() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let url = etcd.url();
    let nbd_ca = Pki::new(root.path(), "nbd-ca");
    let backend = TestBackend::Dir(root.path().join("backend"));
    let n1 = node(root.path(), &backend, &url, "n1", true);
    restricted_and_open_volumes(&n1, "--allow-subject", "alice");
    let (cert, key) = nbd_ca.server("edge-nbd", false);
    let ca = nbd_ca.ca();
    let e1 = EdgeDaemon::start(
        root.path(),
        "e1",
        &url,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-ca",
            ca.to_str().unwrap(),
        ],
    );
    e1.cli_ok(&["attach", "vol"]);
    e1.cli_ok(&["attach", "open"]);
    assert_eq!(edge_allow(&e1, "vol"), (vec![], vec!["alice".into()]));
    let alice = nbd_ca.client_dir(root.path(), "alice", Some(("alice", &nbd_ca, false)));
    let bob = nbd_ca.client_dir(root.path(), "bob", Some(("bob", &nbd_ca, false)));
    let list_uri =
        |dir: &std::path::Path| format!("nbds://{}/?tls-certificates={}", e1.nbd, dir.display());

    assert_eq!(nbdinfo_list(&list_uri(&alice)), ["open", "vol"]);
    let mut qemu = Command::new("qemu-io");
    qemu.args(qemu_tls_args(&e1.nbd, "vol", &alice)).args([
        "-c",
        "write -P 0x5a 0 64k",
        "-c",
        "read -P 0x5a 0 64k",
    ]);
    let out = run_ok(&mut qemu);
    assert!(!out.contains("Pattern verification failed"), "{out}");

    assert_eq!(nbdinfo_list(&list_uri(&bob)), ["open"]);
    let (opened, said) = nbdinfo_opens(&nbds_uri(&e1.nbd, "vol", &bob));
    assert!(!opened, "bob opened vol through the edge: {said}");
    let (opened, said) = nbdinfo_opens(&nbds_uri(&e1.nbd, "open", &bob));
    assert!(opened, "{said}");
    let log = e1.log_text();
    assert!(
        log.lines().any(|l| l.contains("refused by its allow list")
            && l.contains("export=\"vol\"")
            && l.contains("subject=Some(\"bob\")")),
        "{log}"
    );

    // Bob added on the node: admitted through the attached edge, and reads what alice wrote.
    n1.cli_ok(&[
        "volume",
        "update",
        "vol",
        "--allow-subject",
        "alice",
        "--allow-subject",
        "bob",
    ]);
    until_listed(&list_uri(&bob), &["open", "vol"]);
    let mut qemu = Command::new("qemu-io");
    qemu.args(qemu_tls_args(&e1.nbd, "vol", &bob))
        .args(["-c", "read -P 0x5a 0 64k"]);
    let out = run_ok(&mut qemu);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

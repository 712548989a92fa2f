//! Per-volume NBD allow lists (issue 15) against `vstor serve` with real and raw clients:
//! a volume limited to a source network is neither listed nor opened from other addresses, one
//! limited to a client-certificate subject only for that subject, and the list survives a
//! restart, is lifted with `--allow-any`, and bad entries are refused by the CLI.
//!
//! Why a raw-socket client for the network cases: libnbd (nbdinfo) and qemu cannot choose their
//! source address, and every loopback connection to 127.0.0.1 comes from 127.0.0.1. The test
//! binds its own socket to 127.0.0.2 (all of 127/8 is loopback) and speaks the handshake itself
//! for `NBD_OPT_LIST` and `NBD_OPT_GO`, then hands the socket to the edge crate's `NbdClient`
//! for reads and writes. Clients from 127.0.0.1 are the real tools.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::nbd_raw::{self, greet};
use common::tls::Pki;
use common::{nbdinfo_list, poll, require_tool, Daemon, NbdClient};

const IHAVEOPT: u64 = 0x49484156454f5054;
const REP_MAGIC: u64 = 0x3e889045565a9;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const OPT_ABORT: u32 = 2;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A connection to `addr` from source address `ip`.
fn connect_from(ip: &str, addr: &str) -> TcpStream {
    nbd_raw::connect_from(ip, addr.parse().unwrap(), Duration::from_secs(30))
}

fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend(option.to_be_bytes());
    b.extend(u32::try_from(data.len()).unwrap().to_be_bytes());
    b.extend(data);
    s.write_all(&b).unwrap();
}

/// (option, reply type, data) of the next option reply.
fn reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REP_MAGIC);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        data,
    )
}

/// `NBD_OPT_LIST` from source address `ip`: the export names, in the server's order.
fn raw_list(ip: &str, nbd: &str) -> Vec<String> {
    let mut s = connect_from(ip, nbd);
    greet(&mut s);
    send_option(&mut s, OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (option, kind, data) = reply(&mut s);
        assert_eq!(option, OPT_LIST);
        match kind {
            REP_SERVER => {
                let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
            }
            REP_ACK => break,
            other => panic!("unexpected reply {other:#x} to NBD_OPT_LIST"),
        }
    }
    send_option(&mut s, OPT_ABORT, &[]);
    names
}

/// `NBD_OPT_GO` on `export` from source address `ip`: `Ok(size)`, or `Err((reply type,
/// message))` for a refusal.
fn raw_go(ip: &str, nbd: &str, export: &str) -> Result<u64, (u32, String)> {
    let mut s = connect_from(ip, nbd);
    greet(&mut s);
    let mut data = u32::try_from(export.len()).unwrap().to_be_bytes().to_vec();
    data.extend(export.as_bytes());
    data.extend(0u16.to_be_bytes());
    send_option(&mut s, OPT_GO, &data);
    let mut size = None;
    loop {
        let (option, kind, data) = reply(&mut s);
        assert_eq!(option, OPT_GO);
        match kind {
            REP_INFO if u16::from_be_bytes([data[0], data[1]]) == 0 => {
                size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
            }
            REP_INFO => {}
            REP_ACK => return Ok(size.unwrap()),
            error => return Err((error, String::from_utf8_lossy(&data).into_owned())),
        }
    }
}

/// What an unknown export gets: the refusal of an allowed-list export must be identical.
fn unknown(export: &str) -> Result<u64, (u32, String)> {
    Err((REP_ERR_UNKNOWN, format!("unknown export {export:?}")))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

fn qemu_io(args: &[String], commands: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(args);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.output().unwrap()
}

fn assert_ok_patterns(out: &Output) {
    let all = text(out);
    assert!(out.status.success(), "{all}");
    assert!(!all.contains("Pattern verification failed"), "{all}");
    assert!(!all.contains("error"), "{all}");
}

fn cli_fails(daemon: &Daemon, args: &[&str]) -> String {
    let out = daemon.cli(args);
    assert!(
        !out.status.success(),
        "vstor {args:?} succeeded: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// A PATCH on the management API; the whole answer, status line first.
fn http_patch(api: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "PATCH {path} HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn a_network_allow_list_hides_the_volume_and_its_snapshots_from_other_addresses() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("open", "16M");
    daemon.cli_ok(&[
        "volume",
        "create",
        "netvol",
        "--size",
        "16M",
        "--allow-net",
        "127.0.0.2/32",
    ]);
    let info = daemon.info("netvol");
    assert_eq!(strings(&info["allow_networks"]), ["127.0.0.2/32"]);
    assert_eq!(strings(&info["allow_subjects"]), Vec::<String>::new());

    // From 127.0.0.2: listed, opened, written and read back.
    assert_eq!(
        sorted(
            &raw_list("127.0.0.2", &daemon.nbd)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        ),
        sorted(&["netvol", "open"])
    );
    assert_eq!(raw_go("127.0.0.2", &daemon.nbd, "netvol"), Ok(16 << 20));
    let mut client = NbdClient::over(connect_from("127.0.0.2", &daemon.nbd), "netvol").unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(client.write(4096, &data, true).unwrap(), 0);
    let mut back = vec![0u8; data.len()];
    assert_eq!(client.read(4096, &mut back).unwrap(), 0);
    assert_eq!(back, data);
    drop(client);

    // A snapshot of it follows the volume's list.
    daemon.cli_ok(&["snapshot", "create", "netvol", "s1"]);
    poll(
        "snapshot s1 on the backend",
        Duration::from_secs(120),
        || {
            let out = daemon.cli_ok(&["snapshot", "list", "netvol", "--json"]);
            let list: serde_json::Value = serde_json::from_str(&out).unwrap();
            list.as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == "s1" && s["in_backend"] == true)
                .then_some(())
        },
    );
    assert_eq!(
        sorted(
            &raw_list("127.0.0.2", &daemon.nbd)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        ),
        sorted(&["netvol", "netvol@s1", "open"])
    );
    let mut snap = NbdClient::over(connect_from("127.0.0.2", &daemon.nbd), "netvol@s1").unwrap();
    let mut back = vec![0u8; data.len()];
    assert_eq!(snap.read(4096, &mut back).unwrap(), 0);
    assert_eq!(back, data);
    drop(snap);

    // From 127.0.0.1: neither listed (nbdinfo and a raw LIST) nor opened, and the refusal is
    // the unknown-export reply, word for word.
    let list_uri = format!("nbd://{}", daemon.nbd);
    assert_eq!(nbdinfo_list(&list_uri), ["open"]);
    assert_eq!(raw_list("127.0.0.1", &daemon.nbd), ["open"]);
    assert_eq!(
        raw_go("127.0.0.1", &daemon.nbd, "nosuch"),
        unknown("nosuch")
    );
    assert_eq!(
        raw_go("127.0.0.1", &daemon.nbd, "netvol"),
        unknown("netvol")
    );
    assert_eq!(
        raw_go("127.0.0.1", &daemon.nbd, "netvol@s1"),
        unknown("netvol@s1")
    );
    assert_eq!(raw_go("127.0.0.1", &daemon.nbd, "open"), Ok(16 << 20));
    // NBD_OPT_EXPORT_NAME has no error reply: the connection is closed.
    let err = NbdClient::connect(&daemon.nbd, "netvol").err().unwrap();
    assert!(err.to_string().contains("refused export"), "{err}");
    let out = Command::new("nbdinfo")
        .arg(daemon.uri("netvol"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let out = qemu_io(
        &["-f".into(), "raw".into(), daemon.uri("netvol")],
        &["read 0 4k"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert_ok_patterns(&qemu_io(
        &["-f".into(), "raw".into(), daemon.uri("open")],
        &["read -P 0 0 64k"],
    ));

    // The refusal is logged at INFO with the export and the client.
    let log = daemon.log_text();
    assert!(
        log.lines().any(|l| l.contains("refused by its allow list")
            && l.contains("export=\"netvol\"")
            && l.contains("client=127.0.0.1:")),
        "{log}"
    );
}

#[test]
fn a_subject_allow_list_admits_only_that_client_certificate() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "ca");
    let (cert, key) = pki.server("server", false);
    let ca = pki.ca();
    let daemon = Daemon::start_with(
        tmp.path(),
        &[
            "--tls-cert",
            path(&cert),
            "--tls-key",
            path(&key),
            "--tls-ca",
            path(&ca),
        ],
    );
    daemon.create_volume("open", "16M");
    daemon.cli_ok(&[
        "volume",
        "create",
        "alicevol",
        "--size",
        "16M",
        "--allow-subject",
        "alice",
    ]);
    let human = daemon.cli_ok(&["volume", "info", "alicevol"]);
    assert!(
        human
            .lines()
            .any(|l| l.contains("NBD allow list") && l.contains("subjects alice")),
        "{human}"
    );
    let alice = pki.client_dir(tmp.path(), "alice", Some(("alice", &pki, false)));
    let bob = pki.client_dir(tmp.path(), "bob", Some(("bob", &pki, false)));
    let (host, port) = daemon.nbd.rsplit_once(':').unwrap();
    let qemu_args = |volume: &str, dir: &Path| -> Vec<String> {
        vec![
            "--object".into(),
            format!("tls-creds-x509,id=tls0,dir={},endpoint=client", path(dir)),
            "--image-opts".into(),
            format!("driver=nbd,host={host},port={port},export={volume},tls-creds=tls0"),
        ]
    };
    let list_uri = |dir: &Path| format!("nbds://{}/?tls-certificates={}", daemon.nbd, path(dir));

    assert_eq!(
        nbdinfo_list(&list_uri(&alice)),
        sorted(&["alicevol", "open"])
    );
    assert_ok_patterns(&qemu_io(
        &qemu_args("alicevol", &alice),
        &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"],
    ));
    // Read back on a new connection.
    assert_ok_patterns(&qemu_io(
        &qemu_args("alicevol", &alice),
        &["read -P 0x5a 0 64k"],
    ));

    assert_eq!(nbdinfo_list(&list_uri(&bob)), ["open"]);
    let out = qemu_io(&qemu_args("alicevol", &bob), &["read 0 4k"]);
    assert!(!out.status.success(), "{}", text(&out));
    let out = Command::new("nbdinfo")
        .arg(format!(
            "nbds://{}/alicevol?tls-certificates={}",
            daemon.nbd,
            path(&bob)
        ))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert_ok_patterns(&qemu_io(&qemu_args("open", &bob), &["read -P 0 0 64k"]));

    let log = daemon.log_text();
    assert!(
        log.lines().any(|l| l.contains("refused by its allow list")
            && l.contains("export=\"alicevol\"")
            && l.contains("subject=Some(\"bob\")")),
        "{log}"
    );
}

#[test]
fn the_allow_list_survives_a_restart_allow_any_lifts_it_and_bad_entries_are_refused() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(tmp.path());
    daemon.cli_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "16M",
        "--allow-net",
        "127.0.0.2",
        "--allow-subject",
        "carol",
        "--allow-subject",
        "dave",
    ]);
    let list_uri = format!("nbd://{}", daemon.nbd);
    assert_eq!(nbdinfo_list(&list_uri), Vec::<String>::new());

    // Bad entries: a one-line error naming the entry, and nothing created or changed.
    let err = cli_fails(
        &daemon,
        &[
            "volume",
            "create",
            "bad",
            "--size",
            "16M",
            "--allow-net",
            "10.0.0.0/33",
        ],
    );
    assert!(
        err.contains("--allow-net: network \"10.0.0.0/33\" is not a CIDR"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let err = cli_fails(&daemon, &["volume", "info", "bad"]);
    assert!(err.contains("bad"), "{err}");
    let err = cli_fails(
        &daemon,
        &["volume", "update", "vol", "--allow-net", "nonsense"],
    );
    assert!(
        err.contains("--allow-net: network \"nonsense\" is not a CIDR"),
        "{err}"
    );
    let err = cli_fails(&daemon, &["volume", "update", "vol", "--allow-subject", ""]);
    assert!(err.contains("--allow-subject: subject \"\""), "{err}");
    // The API checks too (the CLI is not the only client): 400 naming the entry.
    let answer = http_patch(
        &daemon.api,
        "/v1/volumes/vol",
        r#"{"allow_networks": ["10.0.0.0/33"]}"#,
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains(r#"network \"10.0.0.0/33\" is not a CIDR"#),
        "{answer}"
    );

    // The list is part of the volume's configuration: a restart keeps it.
    assert!(daemon.terminate().success());
    daemon.launch();
    let info = daemon.info("vol");
    assert_eq!(strings(&info["allow_networks"]), ["127.0.0.2/32"]);
    assert_eq!(strings(&info["allow_subjects"]), ["carol", "dave"]);
    let list_uri = format!("nbd://{}", daemon.nbd);
    assert_eq!(nbdinfo_list(&list_uri), Vec::<String>::new());
    assert_eq!(raw_go("127.0.0.1", &daemon.nbd, "vol"), unknown("vol"));
    assert_eq!(raw_list("127.0.0.2", &daemon.nbd), ["vol"]);

    // Replacing one list keeps the other.
    daemon.cli_ok(&["volume", "update", "vol", "--allow-net", "127.0.0.1/32"]);
    let info = daemon.info("vol");
    assert_eq!(strings(&info["allow_networks"]), ["127.0.0.1/32"]);
    assert_eq!(strings(&info["allow_subjects"]), ["carol", "dave"]);
    assert_eq!(nbdinfo_list(&list_uri), ["vol"]);
    assert_eq!(raw_list("127.0.0.2", &daemon.nbd), Vec::<String>::new());

    // --allow-any opens it to every client.
    let out = daemon.cli_ok(&["volume", "update", "vol", "--allow-any"]);
    assert!(out.contains("NBD allow list any"), "{out}");
    let info = daemon.info("vol");
    assert_eq!(strings(&info["allow_networks"]), Vec::<String>::new());
    assert_eq!(strings(&info["allow_subjects"]), Vec::<String>::new());
    assert_eq!(nbdinfo_list(&list_uri), ["vol"]);
    assert_eq!(raw_list("127.0.0.2", &daemon.nbd), ["vol"]);
    assert_ok_patterns(&qemu_io(
        &["-f".into(), "raw".into(), daemon.uri("vol")],
        &["write -P 0x33 0 64k", "read -P 0x33 0 64k"],
    ));
    let err = cli_fails(
        &daemon,
        &[
            "volume",
            "update",
            "vol",
            "--allow-any",
            "--allow-net",
            "10.0.0.0/8",
        ],
    );
    assert!(err.contains("cannot be used with"), "{err}");
}

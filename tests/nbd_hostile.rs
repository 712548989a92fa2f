//! Hostile NBD clients on raw sockets against `vstor serve` with short limits: a slowloris
//! handshake, oversized options and huge lengths, a flood of connections from one address, and
//! garbage instead of a TLS ClientHello after STARTTLS. The server must stay up and a normal
//! client (qemu-io, and timed reads on another connection) must keep working meanwhile.
//!
//! The attackers connect from 127.0.0.2 and 127.0.0.3 (all of 127/8 is loopback), so the
//! per-address limit they run into is not the normal clients' (127.0.0.1).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::nbd_raw::{self, greet};
use common::tls::Pki;
use common::{poll, require_tool, run_ok, Daemon, NbdClient};

const IHAVEOPT: u64 = 0x49484156454f5054;
const REP_MAGIC: u64 = 0x3e889045565a9;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_STARTTLS: u32 = 5;
const REP_ACK: u32 = 1;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
const PER_CLIENT: usize = 8;

/// A connection to `addr` from source address `ip`.
fn connect_from(ip: &str, addr: SocketAddr) -> TcpStream {
    nbd_raw::connect_from(ip, addr, Duration::from_secs(10))
}

fn option_header(option: u32, len: u32) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend(option.to_be_bytes());
    b.extend(len.to_be_bytes());
    b
}

/// (option, reply type) of the next option reply, its data skipped.
fn reply(s: &mut TcpStream) -> (u32, u32) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REP_MAGIC);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
    )
}

/// Wait until the server closes `s` (EOF or reset), at most `limit`; whatever it sends first is
/// skipped (a TLS alert, say).
fn wait_closed(s: &mut TcpStream, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "server did not close the connection");
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("server did not close the connection: {e}"),
        }
    }
}

/// Time 64 KiB reads on an established connection; checks their data too.
fn timed_reads(client: &mut NbdClient, n: usize) -> Vec<Duration> {
    let mut buf = vec![0u8; 64 * 1024];
    (0..n)
        .map(|i| {
            let start = Instant::now();
            let err = client.read((i as u64 % 16) * 65536, &mut buf).unwrap();
            let took = start.elapsed();
            assert_eq!(err, 0);
            assert!(
                buf.iter().all(|b| *b == 0x42),
                "read {i} returned wrong data"
            );
            took
        })
        .collect()
}

#[test]
fn hostile_clients_are_cut_off_and_normal_clients_keep_working() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "ca");
    let (cert, key) = pki.server("server", false);
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, "[nbd_server]\nhandshake_timeout = \"1s\"\n").unwrap();
    let per_client = PER_CLIENT.to_string();
    let daemon = Daemon::start_with(
        tmp.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--nbd-tls",
            "allow",
            "--nbd-max-connections-per-client",
            &per_client,
        ],
    );
    daemon.create_volume("vol", "64M");
    let uri = daemon.uri("vol");
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x42 0 1M"]));
    let addr: SocketAddr = daemon.nbd.parse().unwrap();

    let mut normal = NbdClient::connect(&daemon.nbd, "vol").unwrap();
    let before = timed_reads(&mut normal, 8);

    // Slowloris: the greeting, then half an option header, then nothing.
    let slow_start = Instant::now();
    let mut slow = connect_from("127.0.0.2", addr);
    greet(&mut slow);
    slow.write_all(&IHAVEOPT.to_be_bytes()[..4]).unwrap();

    // An option announcing almost 4 GiB of data, of which a few bytes come.
    let mut huge = connect_from("127.0.0.2", addr);
    greet(&mut huge);
    huge.write_all(&option_header(4242, 0xffff_fff0)).unwrap();
    huge.write_all(&[0xaa; 1000]).unwrap();

    // An oversized option sent in full is refused, and haggling carries on.
    let mut big = connect_from("127.0.0.2", addr);
    greet(&mut big);
    big.write_all(&option_header(4243, 200 * 1024)).unwrap();
    big.write_all(&vec![0x55; 200 * 1024]).unwrap();
    assert_eq!(reply(&mut big), (4243, REP_ERR_TOO_BIG));
    big.write_all(&option_header(OPT_ABORT, 0)).unwrap();
    assert_eq!(reply(&mut big), (OPT_ABORT, REP_ACK));

    // Garbage instead of a TLS ClientHello after STARTTLS.
    let mut garbage = connect_from("127.0.0.2", addr);
    greet(&mut garbage);
    garbage.write_all(&option_header(OPT_STARTTLS, 0)).unwrap();
    assert_eq!(reply(&mut garbage), (OPT_STARTTLS, REP_ACK));
    garbage.write_all(&[0x17; 600]).unwrap();
    wait_closed(&mut garbage, Duration::from_secs(5));

    // Huge lengths in the transmission phase: a READ of almost 4 GiB is refused (EINVAL) and
    // the connection stays usable; a request with a bad magic closes it.
    let mut tx = connect_from("127.0.0.2", addr);
    greet(&mut tx);
    tx.write_all(&option_header(OPT_EXPORT_NAME, 3)).unwrap();
    tx.write_all(b"vol").unwrap();
    let mut export = [0u8; 10];
    tx.read_exact(&mut export).unwrap();
    let mut read = 0x2560_9513u32.to_be_bytes().to_vec();
    read.extend(0u16.to_be_bytes()); // flags
    read.extend(0u16.to_be_bytes()); // READ
    read.extend(7u64.to_be_bytes()); // cookie
    read.extend(0u64.to_be_bytes()); // offset
    read.extend(0xffff_f000u32.to_be_bytes());
    tx.write_all(&read).unwrap();
    let mut simple = [0u8; 16];
    tx.read_exact(&mut simple).unwrap();
    assert_eq!(u32::from_be_bytes(simple[4..8].try_into().unwrap()), 22);
    assert_eq!(u64::from_be_bytes(simple[8..16].try_into().unwrap()), 7);
    tx.write_all(&[0xde; 28]).unwrap();
    wait_closed(&mut tx, Duration::from_secs(5));

    // A flood from one address: PER_CLIENT connections get the greeting, the rest are closed.
    let mut flood: Vec<TcpStream> = (0..PER_CLIENT + 12)
        .map(|_| connect_from("127.0.0.3", addr))
        .collect();
    let mut greeted = 0;
    for s in &mut flood {
        let mut hello = [0u8; 18];
        match s.read_exact(&mut hello) {
            Ok(()) => greeted += 1,
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "flood connection neither greeted nor closed: {e}"
            ),
        }
    }
    assert_eq!(greeted, PER_CLIENT);

    // Meanwhile the normal clients are served, with their usual latency (generous bound).
    let during = timed_reads(&mut normal, 8);
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x42 0 1M"]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let slowest_before = before.iter().max().unwrap();
    let slowest_during = during.iter().max().unwrap();
    assert!(
        *slowest_during < Duration::from_millis(500).max(*slowest_before * 20),
        "reads slowed down under attack: before {before:?}, during {during:?}"
    );

    // The slow handshakes are cut off by the handshake timeout (1 s), not before.
    wait_closed(&mut slow, Duration::from_secs(10));
    assert!(slow_start.elapsed() >= Duration::from_millis(900));
    wait_closed(&mut huge, Duration::from_secs(10));
    // The flood's surviving connections are held to the same deadline; once they are gone the
    // address may connect again.
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    drop(flood);
    poll(
        "a new connection from the flooding address",
        Duration::from_secs(10),
        || {
            let mut s = connect_from("127.0.0.3", addr);
            let mut hello = [0u8; 18];
            s.read_exact(&mut hello).ok()
        },
    );

    let log = daemon.log_text();
    for line in [
        "handshake not completed within 1s",
        "TLS handshake failed",
        "connections per client address limit reached",
        "bad request magic",
    ] {
        assert!(log.contains(line), "daemon log lacks {line:?}");
    }
    assert!(timed_reads(&mut normal, 2).len() == 2);
    let info = daemon.info("vol");
    assert_eq!(info["nbd_connections"].as_u64(), Some(1), "{info}");
}

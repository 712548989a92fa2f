//! The network-namespace harness the partition tests use: two namespaces on a bridge talk TCP,
//! a link taken down cuts them apart, a link brought up joins them again, and nothing is left
//! behind afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::NetNs;

/// Connect from namespace `from` to `addr` and exchange one byte with the echo server.
fn exchange(net: &NetNs, from: usize, addr: SocketAddr) -> std::io::Result<u8> {
    net.run_in(from, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(700))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(&[41])?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        Ok(byte[0])
    })
}

/// An echo server that adds one to every byte, on its own thread.
fn echo(listener: TcpListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut byte = [0u8; 1];
            if stream.read_exact(&mut byte).is_ok() {
                let _ = stream.write_all(&[byte[0] + 1]);
            }
        }
    });
}

fn netns_names() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[test]
fn namespaces_talk_until_a_link_goes_down_and_cleanup_is_complete() {
    let net = NetNs::new(2);
    let ip1 = net.ip(1);
    let listener = net.run_in(1, move || TcpListener::bind((ip1, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    echo(listener);
    // The host side of the bridge is reachable too (etcd runs there in cluster tests).
    let host = TcpListener::bind((net.host_ip(), 0)).unwrap();
    let host_addr = host.local_addr().unwrap();
    echo(host);

    assert_eq!(exchange(&net, 0, addr).unwrap(), 42);
    assert_eq!(exchange(&net, 0, host_addr).unwrap(), 42);
    // A namespace does not see the host's loopback: it is isolated.
    let lo = TcpListener::bind("127.0.0.1:0").unwrap();
    let lo_addr = lo.local_addr().unwrap();
    assert!(exchange(&net, 0, lo_addr).is_err());

    net.link_down(1);
    assert!(
        exchange(&net, 0, addr).is_err(),
        "connected across a downed link"
    );
    assert!(
        exchange(&net, 1, host_addr).is_err(),
        "partitioned node reached the host"
    );
    net.link_up(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match exchange(&net, 0, addr) {
            Ok(byte) => {
                assert_eq!(byte, 42);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "link up but still cut off: {e}"),
        }
    }

    let names: Vec<String> = (0..net.nodes()).map(|i| net.ns(i)).collect();
    assert!(names.iter().all(|n| netns_names().contains(n.as_str())));
    drop(net);
    let left = netns_names();
    for name in names {
        assert!(
            !left
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str())),
            "{name} left behind"
        );
    }
}

#[test]
fn cleanup_also_happens_when_the_test_panics() {
    let names = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = names.clone();
    let result = std::panic::catch_unwind(move || {
        let net = NetNs::new(1);
        seen.lock().unwrap().push(net.ns(0));
        panic!("test failure inside the harness");
    });
    assert!(result.is_err());
    let names = names.lock().unwrap().clone();
    assert_eq!(names.len(), 1);
    let left = netns_names();
    assert!(
        !left
            .lines()
            .any(|l| l.split_whitespace().next() == Some(names[0].as_str())),
        "{} left behind",
        names[0]
    );
}

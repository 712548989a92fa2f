//! Raw NBD sockets for hostile-client and access-control tests: a connection from a chosen
//! loopback source address (libnbd and qemu cannot pick theirs) and the client's side of the
//! greeting, so a test can then send whatever options it likes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `NBDMAGIC`, the first 8 bytes of every server greeting.
pub const NBDMAGIC: u64 = 0x4e42444d41474943;

/// A blocking connection to `addr` from source address `ip` (e.g. `127.0.0.2`), whose reads
/// give up after `read_timeout`.
pub fn connect_from(ip: &str, addr: SocketAddr, read_timeout: Duration) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        socket.connect(addr).await.unwrap()
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(read_timeout)).unwrap();
    stream
}

/// Read the greeting and answer with fixed-newstyle + no-zeroes.
pub fn greet(s: &mut TcpStream) {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(u64::from_be_bytes(hello[..8].try_into().unwrap()), NBDMAGIC);
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

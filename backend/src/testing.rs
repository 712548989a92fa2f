//! Test harness for the S3 store (feature `testing`): a real S3 server, moto, started on a free
//! loopback port and stopped on drop, plus a TCP proxy that can refuse connections for a while
//! (to test retries), and a scan of stored files for plaintext (encryption tests). Shared by this
//! crate's tests, the engine's and the root crate's process tests.
//!
//! moto comes from PyPI (`pip install 'moto[server]'`; `.ci/run` installs it). A test that needs
//! it and does not find it fails with a message saying so: a skipped S3 test would hide a
//! broken backend.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{S3Location, S3Options, S3Store};

/// Credentials moto accepts (it does not check them unless told to).
pub const ACCESS_KEY: &str = "vstor-test-key";
pub const SECRET_KEY: &str = "vstor-test-secret";

/// A loopback port for a server a test starts later (or restarts on the same address), which
/// no other test and no outgoing connection on this machine will take meanwhile.
///
/// Why not "bind port 0 and drop the listener": that port comes from the kernel's ephemeral
/// range, which the kernel also hands out as the source port of every outgoing connection and
/// to every other `bind(…:0)`. Between the drop and the server's own bind, any of those can
/// take it, and the server fails with "Address already in use" (it did, in CI). So ports come
/// from the range just below the ephemeral one, which the kernel never assigns by itself, and
/// a counter in a lock file shared by every test process (nextest runs each test in its own)
/// hands each port out once per cycle through that range. A port something still listens on
/// (a leftover from an earlier run) is skipped.
pub fn free_port() -> u16 {
    let (low, high) = reserved_port_range();
    let path = std::env::temp_dir().join("vstor-test-ports.next");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open the test port counter {}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("cannot lock the test port counter {}: {e}", path.display()));
    let mut text = String::new();
    // An unreadable or garbled counter starts over at the bottom of the range.
    let _ = file.read_to_string(&mut text);
    let mut next = text.trim().parse::<u16>().unwrap_or(low);
    for _ in 0..(high - low) {
        let port = if (low..high).contains(&next) {
            next
        } else {
            low
        };
        next = port + 1;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            let saved = std::fs::write(&path, next.to_string());
            saved.unwrap_or_else(|e| panic!("cannot save the test port counter: {e}"));
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}")
}

/// `free_port` as `127.0.0.1:PORT`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// The 10,000 ports below the kernel's ephemeral range (`ip_local_port_range`), or below
/// 32768 where that file cannot be read.
fn reserved_port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = ephemeral_low.max(11024);
    (high - 10_000, high)
}

/// A running moto server; killed on drop.
pub struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Start moto with authentication off (any credentials are accepted).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Start moto with extra environment, e.g. `INITIAL_NO_AUTH_ACTION_COUNT=0` to make it
    /// check credentials.
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for the moto log");
        let log = dir.path().join("moto.log");
        let port = free_port();
        let program = which("moto_server").unwrap_or_else(|| {
            panic!(
                "moto_server not found on PATH: the S3 tests need a real S3 server; install it \
                 with `pip install 'moto[server]'` (.ci/run does)"
            )
        });
        let out = std::fs::File::create(&log).expect("create the moto log");
        let err = out.try_clone().expect("clone the moto log handle");
        let child = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn moto_server");
        let mut moto = Self {
            child,
            port,
            log,
            _dir: dir,
        };
        moto.wait_ready();
        moto
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "moto_server exited with {status} before serving: {}",
                    self.log_text()
                );
            }
            if let Ok((200, _)) = http(self.port, "GET", "/moto-api/", &[]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server on port {} not ready within 60 s: {}",
                self.port,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create a bucket (moto accepts the unsigned request).
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = http(self.port, "PUT", &format!("/{bucket}"), &[])
            .unwrap_or_else(|e| panic!("create bucket {bucket}: {e}"));
        assert_eq!(status, 200, "create bucket {bucket}: {body:?}");
    }

    /// The environment a client (a store or a `vstor serve`) needs to reach this server
    /// through `port` (this server's, or a proxy's in front of it).
    pub fn env_for_port(port: u16) -> Vec<(String, String)> {
        vec![
            (
                "AWS_ENDPOINT_URL".into(),
                format!("http://127.0.0.1:{port}"),
            ),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
        ]
    }

    pub fn env(&self) -> Vec<(String, String)> {
        Self::env_for_port(self.port)
    }

    /// Open a store on `bucket[/prefix]` of this server.
    pub fn store(&self, uri: &str, options: S3Options) -> crate::Result<S3Store> {
        S3Store::open_with_env(S3Location::parse(uri)?, options, &self.env())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and the body.
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Err(bad(
            "chunked responses are not supported by this test client",
        ));
    }
    Ok((status, response[split + 4..].to_vec()))
}

/// A loopback TCP proxy in front of a server, which can be taken down (connections refused,
/// open ones cut) and brought back up on the same port.
pub struct Proxy {
    port: u16,
    target: u16,
    running: Option<Running>,
}

/// A running proxy: its stop flag, its accept thread, and the connections it holds open.
type Running = (Arc<AtomicBool>, JoinHandle<()>, Arc<Mutex<Vec<TcpStream>>>);

impl Proxy {
    pub fn start(target: u16) -> Self {
        let mut proxy = Self {
            port: free_port(),
            target,
            running: None,
        };
        proxy.up();
        proxy
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Listen again (no-op when up).
    pub fn up(&mut self) {
        if self.running.is_some() {
            return;
        }
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("rebind the proxy port");
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (target, stop2, conns2) = (self.target, stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let mut list = conns2.lock().expect("proxy connection list");
                for stream in [&client, &server] {
                    if let Ok(clone) = stream.try_clone() {
                        list.push(clone);
                    }
                }
                drop(list);
                pipe(&client, &server);
                pipe(&server, &client);
            }
        });
        self.running = Some((stop, thread, conns));
    }

    /// Stop listening and cut every open connection.
    pub fn down(&mut self) {
        if let Some((stop, thread, conns)) = self.running.take() {
            stop.store(true, Ordering::SeqCst);
            // Wake the accept loop so it sees the flag and drops the listener.
            let _ = TcpStream::connect(("127.0.0.1", self.port));
            let _ = thread.join();
            for stream in conns.lock().expect("proxy connection list").drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
    }
}

fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Files under `dir` (recursively; none if it does not exist) whose bytes contain `needle`: where
/// an encryption test looks for plaintext that must not be there (or ciphertext that must).
pub fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let path = entry.expect("read a directory entry").path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path)
            .unwrap_or_default()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            found.push(path);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let (low, high) = reserved_port_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            ports.len(),
            "a port handed out twice: {ports:?}"
        );
        for port in ports {
            assert!((low..high).contains(&port), "{port} not in {low}..{high}");
            TcpListener::bind(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("port {port} handed out but not bindable: {e}"));
        }
        // And the kernel never hands one of them out by itself.
        let ephemeral = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(!(low..high).contains(&ephemeral.port()), "{ephemeral}");
    }
}

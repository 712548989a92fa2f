//! Safety rails a new user runs into: one daemon per data directory, no deleting a volume under
//! its clients, every accepted volume name usable on every frontend, settings validated at start.

mod common;

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, NbdClient, VSTOR};

/// Run `cmd` (a daemon expected to refuse to start) with a deadline; its stderr goes to `log`.
/// A process still running at the deadline is killed and the test fails: it started.
fn run_expecting_exit(cmd: &mut Command, log: &Path) -> (ExitStatus, String) {
    let file = std::fs::File::create(log).expect("log file");
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn vstor");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (status, std::fs::read_to_string(log).unwrap_or_default());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} is still running: it should have refused to start; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `vstor dtl` process, killed on drop.
struct Dtl(std::process::Child);

impl Dtl {
    fn start(dir: &Path) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(VSTOR)
            .args(["dtl", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vstor dtl");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        assert!(line.starts_with("vstor dtl ready: "), "{line:?}");
        Dtl(child)
    }
}

impl Drop for Dtl {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 12) as u8)
        .collect()
}

fn read_crc(addr: &str, volume: &str, offset: u64, len: usize) -> u32 {
    let mut client = NbdClient::connect(addr, volume).expect("NBD connect");
    let mut buf = vec![0u8; len];
    assert_eq!(
        client.read(offset, &mut buf).expect("read"),
        0,
        "read error"
    );
    crc32c::crc32c(&buf)
}

fn write_flushed(addr: &str, volume: &str, offset: u64, data: &[u8]) {
    let mut client = NbdClient::connect(addr, volume).expect("NBD connect");
    assert_eq!(client.write(offset, data, false).expect("write"), 0);
    assert_eq!(client.flush().expect("flush"), 0);
}

#[test]
fn a_second_daemon_on_a_data_directory_refuses_and_leaves_the_first_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let mut first = Daemon::start(tmp.path());
    first.create_volume("v", "64M");
    let one = pattern(1, 1 << 20);
    write_flushed(&first.nbd, "v", 0, &one);
    let pid = first.pid().to_string();

    // Other ports, then the running node's own ports.
    let attempts: [[&str; 4]; 2] = [
        ["--api", "127.0.0.1:0", "--nbd", "127.0.0.1:0"],
        ["--api", &first.api, "--nbd", &first.nbd],
    ];
    for (i, ports) in attempts.iter().enumerate() {
        let (status, log) = run_expecting_exit(
            Command::new(VSTOR)
                .args(["serve", "--no-default-volume", "--data-dir"])
                .arg(&first.data_dir)
                .args(ports),
            &tmp.path().join(format!("second-{i}.log")),
        );
        assert!(!status.success(), "{log}");
        assert!(
            log.contains("is in use by another process") && log.contains(&format!("(PID {pid})")),
            "{log}"
        );
    }

    // The first node still serves, its data intact; a write flushed now survives kill -9.
    assert_eq!(
        read_crc(&first.nbd, "v", 0, one.len()),
        crc32c::crc32c(&one)
    );
    let two = pattern(2, 1 << 20);
    write_flushed(&first.nbd, "v", 8 << 20, &two);
    first.kill9();
    // kill -9 released the lock: the node restarts on its directory.
    first.launch();
    assert_eq!(
        read_crc(&first.nbd, "v", 0, one.len()),
        crc32c::crc32c(&one)
    );
    assert_eq!(
        read_crc(&first.nbd, "v", 8 << 20, two.len()),
        crc32c::crc32c(&two)
    );
    let info = first.info("v");
    assert_eq!(info["state"], "running", "{info}");
}

#[test]
fn a_second_dtl_on_a_data_directory_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dtl");
    let first = Dtl::start(&dir);
    let (status, log) = run_expecting_exit(
        Command::new(VSTOR)
            .args(["dtl", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir),
        &tmp.path().join("second.log"),
    );
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "is in use by another process (PID {})",
            first.0.id()
        )),
        "{log}"
    );
    // The first one is unaffected, and once it is gone (kill -9) the directory is free again.
    let mut first = first;
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the first DTL exited"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    first.0.wait().unwrap();
    let _again = Dtl::start(&dir);
}

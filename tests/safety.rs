//! Safety rails a new user runs into: one daemon per data directory, no deleting a volume under
//! its clients, every accepted volume name usable on every frontend, settings validated at start.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::vhost_client::VhostClient;
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

#[test]
fn volume_delete_refuses_while_a_client_is_connected_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("v", "64M");
    let data = pattern(3, 1 << 20);
    write_flushed(&daemon.nbd, "v", 4096, &data);
    let mut held = NbdClient::connect(&daemon.nbd, "v").expect("NBD connect");
    daemon.wait_for("v", "the NBD connection to show", |i| {
        i["nbd_connections"] == 1
    });

    let out = daemon.cli(&["volume", "delete", "v"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("volume v is in use (1 NBD client connected)")
            && err.contains("--force to disconnect them and delete"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Untouched: the connected client still reads the data back.
    let mut buf = vec![0u8; data.len()];
    assert_eq!(held.read(4096, &mut buf).expect("read"), 0);
    assert_eq!(crc32c::crc32c(&buf), crc32c::crc32c(&data));
    assert_eq!(daemon.info("v")["state"], "running");

    let out = daemon.cli_ok(&["volume", "delete", "v", "--force"]);
    assert!(
        out.contains("deleted volume v (disconnected 1 NBD client(s))"),
        "{out}"
    );
    let list = daemon.cli_ok(&["volume", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list, serde_json::json!([]), "{list}");
    // The forced client's connection is closed.
    assert!(held.read(0, &mut buf[..4096]).is_err());
}

#[test]
fn a_volume_name_of_the_maximum_length_works_over_nbd_and_vhost_user() {
    use std::os::unix::fs::FileTypeExt;
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    let name = format!("v{}", "x".repeat(127));
    daemon.create_volume(&name, "64M");
    let too_long = daemon.cli(&["volume", "create", &format!("{name}y"), "--size", "64M"]);
    assert!(!too_long.status.success(), "129 characters accepted");

    let data = pattern(5, 64 << 10);
    write_flushed(&daemon.nbd, &name, 1 << 20, &data);
    assert_eq!(
        read_crc(&daemon.nbd, &name, 1 << 20, data.len()),
        crc32c::crc32c(&data)
    );

    let info = daemon.info(&name);
    let socket = std::path::PathBuf::from(info["vhost_socket"].as_str().expect("socket path"));
    assert!(socket.as_os_str().len() <= 107, "{}", socket.display());
    assert!(
        std::fs::symlink_metadata(&socket)
            .expect("socket exists")
            .file_type()
            .is_socket(),
        "{}",
        socket.display()
    );
    let text = daemon.cli_ok(&["volume", "info", &name]);
    assert!(text.contains(socket.to_str().unwrap()), "{text}");

    let mut vhost = VhostClient::connect(&socket);
    assert_eq!(vhost.blkio.get_u64("capacity").unwrap(), 64 << 20);
    daemon.wait_for(&name, "the vhost-user frontend", |i| {
        i["vhost_connected"] == true
    });
    assert_eq!(
        crc32c::crc32c(&vhost.read(1 << 20, data.len())),
        crc32c::crc32c(&data)
    );
    let more = pattern(6, 64 << 10);
    vhost.write(4 << 20, &more);
    assert_eq!(
        read_crc(&daemon.nbd, &name, 4 << 20, more.len()),
        crc32c::crc32c(&more)
    );

    // Delete is refused while the vhost-user frontend is connected, and forced it cuts it. The
    // NBD reads above have closed their connections, but the server may not have seen it yet.
    daemon.wait_for(&name, "the NBD clients gone", |i| i["nbd_connections"] == 0);
    let out = daemon.cli(&["volume", "delete", &name]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "volume {name} is in use (a vhost-user frontend connected)"
        )),
        "{err}"
    );
    assert_eq!(
        crc32c::crc32c(&vhost.read(1 << 20, data.len())),
        crc32c::crc32c(&data)
    );
    let out = daemon.cli_ok(&["volume", "delete", &name, "--force"]);
    assert!(
        out.contains("(disconnected the vhost-user frontend)"),
        "{out}"
    );
    drop(vhost);
    assert!(!socket.exists(), "{}", socket.display());
}

#[test]
fn serve_refuses_a_vhost_dir_too_long_for_any_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let vhost_dir = tmp.path().join("v".repeat(100));
    let data_dir = tmp.path().join("data");
    let (status, log) = run_expecting_exit(
        Command::new(VSTOR)
            .args([
                "serve",
                "--api",
                "127.0.0.1:0",
                "--nbd",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&data_dir)
            .arg("--vhost-dir")
            .arg(&vhost_dir),
        &tmp.path().join("serve.log"),
    );
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("setting vhost_dir (--vhost-dir): vhost socket directory")
            && log.contains("is too long"),
        "{log}"
    );
    assert!(!data_dir.exists() && !vhost_dir.exists(), "{log}");
}

#[test]
fn serve_refuses_a_bad_setting_naming_it_and_its_range() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("vstor.toml");
    std::fs::write(&config, "[volume_defaults]\nsco_size = \"3M\"\n").unwrap();
    let data_dir = tmp.path().join("data");
    let (status, log) = run_expecting_exit(
        Command::new(VSTOR)
            .args([
                "serve",
                "--api",
                "127.0.0.1:0",
                "--nbd",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&config)
            .arg("--data-dir")
            .arg(&data_dir),
        &tmp.path().join("serve.log"),
    );
    assert!(!status.success(), "{log}");
    assert_eq!(
        log.trim(),
        "error: setting volume_defaults.sco_size = \"3M\" is not allowed: must be a multiple of 4K from 4M to 128M"
    );
    assert!(!data_dir.exists());
}

//! A real Linux guest on a vstor volume through vhost-user-blk.
//!
//! Each boot runs `qemu-system-x86_64 -accel tcg` with guest RAM in a shared memfd (which
//! vhost-user needs) and a `vhost-user-blk-pci` device on the volume's socket. The guest is the
//! host's Debian kernel (`linux-image-amd64`) with an initramfs this test writes as a `newc` cpio
//! archive: a static busybox, the virtio/ext4 modules taken from `/lib/modules` in
//! `modules.dep` order, and `tests/guest/init.sh` as `/init`. The init script reads its scenario
//! from the kernel command line (`vstor.mode=...`), prints `VSTOR-<KEY> <value>` lines on the
//! serial console and powers off, so the test only waits for QEMU to exit (bounded by
//! [`BOOT_TIMEOUT`]) and parses the console file.
//!
//! The scenario, on a [`VOLUME_SIZE`] volume:
//! 1. `write`: the guest sees the volume's size and a writable disk, makes an ext2 file system
//!    over all but the last MiB, writes files (one byte to 3 MiB) and a random last MiB of raw
//!    device, drops its caches and reports the SHA-256 of each as read back from the disk. The
//!    host reads the last MiB itself and checks its digest.
//! 2. The server is restarted on the same storage; `verify`: the guest reports the same digests.
//! 3. The volume is made read-only; `readonly`: the guest sees `ro` = 1, a raw write and a
//!    read-write mount both fail, the files still read back; the volume's content, checksummed
//!    by the host before and after, is unchanged.
//!
//! The scenario runs against `vstor serve` and, as a control that tells a broken guest setup from
//! a broken vstor, against `qemu-storage-daemon` exporting a raw file.
//!
//! A third test restarts `vstor serve` under a running guest whose QEMU reconnects to the
//! socket; see [`guest_keeps_its_disk_across_a_vstor_restart`].
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::guest::{
    reconnect_option, sha256, tail, wait_with_deadline, ConsoleReader, GuestImage, KillOnDrop,
    TestDir,
};
use common::{checksum_file, require_tool, Daemon, NbdClient};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const VOLUME_SIZE: u64 = 256 << 20;
const VOLUME_SIZE_ARG: &str = "256M";
const TAIL_LEN: u64 = 1 << 20;
const GUEST_FILES: [&str; 4] = ["small.bin", "one-byte.bin", "big.bin", "dir/nested.bin"];
/// The files of the `reconnect` scenario, written before and after the server restarts.
const RECONNECT_FILES_BEFORE: [&str; 3] = ["before/small.bin", "before/big.bin", "before/odd.bin"];
const RECONNECT_FILES_AFTER: [&str; 3] = ["after/small.bin", "after/big.bin", "after/odd.bin"];
/// As many as the guest has CPUs, so that its virtio-blk driver uses them all.
const GUEST_QUEUES: usize = 2;
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
const SERVER_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn guest_writes_and_verifies_files_on_vstor_volume() {
    let tmp = TestDir::new();
    let guest = Guest::build(tmp.path());
    let mut server = VstorServer::start(tmp.path(), "guest");
    run_scenario(&guest, &mut server);
}

#[test]
fn guest_writes_and_verifies_files_on_qemu_storage_daemon_control() {
    require_tool("qemu-storage-daemon");
    let tmp = TestDir::new();
    let guest = Guest::build(tmp.path());
    let mut server = QsdServer::start(tmp.path());
    run_scenario(&guest, &mut server);
}

/// After `vstor serve` restarts, a QEMU whose vhost-user chardev reconnects (`reconnect=1`, or
/// `reconnect-ms=1000` on QEMU ≥ 9.2) gets its disk back and the running guest carries on with
/// its mounted file system.
///
/// The guest (`reconnect`) makes an ext2 file system, writes and syncs files, reports their
/// digests, prints `VSTOR-READY-FOR-RESTART` and blocks reading a line from its console. The
/// host then stops vstor with SIGTERM (exit status 0), starts it again on the same data
/// directory, waits until the volume's info says QEMU has reconnected by itself, and sends `go`.
/// The guest drops its caches, reads the earlier files back through the restarted server, writes
/// new files and a random raw last MiB, and reports their digests as read back from the device.
/// The host reads the last MiB over NBD, and a second, fresh boot (`verify`) reads every file.
///
/// The guest must be idle while the server is down: vhost-user-backend has no inflight tracking
/// (no `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), so requests in flight when the backend goes away
/// are not resubmitted by QEMU after the reconnect. Hence the handshake on the console instead
/// of restarting under load, and `noatime` so that reading files dirties nothing.
#[test]
fn guest_keeps_its_disk_across_a_vstor_restart() {
    let tmp = TestDir::new();
    let guest = Guest::build(tmp.path());
    let mut server = VstorServer::start(tmp.path(), "guest");

    let resumed = guest.boot_across_restart(&mut server, "reconnect");
    resumed.check_device(VOLUME_SIZE, false);
    let sums = resumed.sums();
    let before: BTreeSet<&str> = RECONNECT_FILES_BEFORE.into_iter().collect();
    let expected: BTreeSet<&str> = before
        .iter()
        .copied()
        .chain(RECONNECT_FILES_AFTER)
        .chain(["tail"])
        .collect();
    resumed.check(
        sums.keys().map(String::as_str).collect::<BTreeSet<_>>() == expected,
        &format!("digests of {expected:?}, got {sums:?}"),
    );
    let reread = resumed.digests("REREAD");
    let written_before: BTreeMap<String, String> = sums
        .iter()
        .filter(|(name, _)| before.contains(name.as_str()))
        .map(|(name, sum)| (name.clone(), sum.clone()))
        .collect();
    resumed.check(
        reread == written_before,
        &format!(
            "the files written before the restart read back unchanged after it: \
             {written_before:?}, got {reread:?}"
        ),
    );
    let host_tail = sha256(&server.read(VOLUME_SIZE - TAIL_LEN, TAIL_LEN as usize));
    resumed.check(
        host_tail == sums["tail"],
        &format!(
            "the host reads the last MiB as the guest wrote it after the restart ({host_tail})"
        ),
    );

    let verified = guest.boot(&mut server, "verify");
    verified.check_device(VOLUME_SIZE, false);
    verified.check(
        verified.sums() == sums,
        &format!("a fresh boot reads back every file as written around the restart: {sums:?}"),
    );
}

fn run_scenario(guest: &Guest, server: &mut dyn VhostServer) {
    let written = guest.boot(server, "write");
    written.check_device(VOLUME_SIZE, false);
    let sums = written.sums();
    let expected: BTreeSet<&str> = GUEST_FILES.iter().copied().chain(["tail"]).collect();
    written.check(
        sums.keys().map(String::as_str).collect::<BTreeSet<_>>() == expected,
        &format!("digests of {expected:?}, got {sums:?}"),
    );
    let host_tail = sha256(&server.read(VOLUME_SIZE - TAIL_LEN, TAIL_LEN as usize));
    written.check(
        host_tail == sums["tail"],
        &format!("the host reads the device's last MiB as the guest wrote it ({host_tail})"),
    );

    server.restart();
    let verified = guest.boot(server, "verify");
    verified.check_device(VOLUME_SIZE, false);
    verified.check(
        verified.sums() == sums,
        &format!("the files read back after a restart as written: {sums:?}"),
    );

    let before = server.checksum();
    server.make_read_only();
    let read_only = guest.boot(server, "readonly");
    read_only.check_device(VOLUME_SIZE, true);
    read_only.check(
        read_only.has("WRITE-FAILED") && !read_only.has("WRITE-OK"),
        "a raw write to the read-only disk fails",
    );
    read_only.check(
        read_only.has("MOUNT-RW-FAILED") && !read_only.has("MOUNT-RW-OK"),
        "a read-write mount of the read-only disk fails",
    );
    read_only.check(
        read_only.sums() == sums,
        &format!("the files read back from the read-only disk: {sums:?}"),
    );
    let after = server.checksum();
    read_only.check(
        before == after,
        &format!("the read-only volume is unchanged: {before} before, {after} after"),
    );
}

/// What the scenario needs from a vhost-user-blk server.
trait VhostServer {
    fn socket(&self) -> PathBuf;
    /// Stop and start again on the same storage.
    fn restart(&mut self);
    /// Make the volume read-only for frontends that connect from now on.
    fn make_read_only(&mut self);
    /// Read the volume from the host while no guest is attached.
    fn read(&self, offset: u64, len: usize) -> Vec<u8>;
    /// A digest of the whole volume, read from the host.
    fn checksum(&self) -> String;
    /// Whether the server says a frontend is connected, for servers that report it.
    fn connected(&self) -> Option<bool>;
    /// Wait until the server has seen the frontend go away.
    fn await_disconnect(&self);
    fn log_tail(&self) -> String;
}

struct VstorServer {
    daemon: Daemon,
    volume: String,
}

impl VstorServer {
    fn start(root: &Path, volume: &str) -> Self {
        let daemon = Daemon::start(root);
        daemon.create_volume(volume, VOLUME_SIZE_ARG);
        let server = Self {
            daemon,
            volume: volume.to_string(),
        };
        server.check_socket();
        server
    }

    /// The socket exists as soon as `volume create` or the daemon's ready line says the volume
    /// does, and the volume's info names it.
    fn check_socket(&self) {
        let socket = self.socket();
        assert!(
            socket.exists(),
            "{} does not exist once the volume exists; log:\n{}",
            socket.display(),
            self.log_tail()
        );
        let info = self.daemon.info(&self.volume);
        let named = info["vhost_socket"]
            .as_str()
            .and_then(|path| std::fs::canonicalize(path).ok());
        assert_eq!(
            named,
            std::fs::canonicalize(&socket).ok(),
            "volume info names the vhost socket {}: {info}",
            socket.display()
        );
    }
}

impl VhostServer for VstorServer {
    fn socket(&self) -> PathBuf {
        self.daemon
            .data_dir
            .join("vhost")
            .join(format!("{}.sock", self.volume))
    }

    fn restart(&mut self) {
        let status = self.daemon.terminate();
        assert!(
            status.success(),
            "vstor serve exited with {status} on SIGTERM; log:\n{}",
            self.log_tail()
        );
        self.daemon.launch();
        self.check_socket();
    }

    fn make_read_only(&mut self) {
        self.daemon
            .cli_ok(&["volume", "update", &self.volume, "--read-only", "true"]);
        let info = self.daemon.info(&self.volume);
        assert_eq!(info["read_only"], true, "volume is read-only: {info}");
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut client = NbdClient::connect(&self.daemon.nbd, &self.volume).expect("NBD connect");
        assert_eq!(client.size, VOLUME_SIZE, "NBD export size");
        let mut out = vec![0u8; len];
        for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
            let at = offset + (i as u64) * (1 << 20);
            let error = client.read(at, chunk).expect("NBD read");
            assert_eq!(error, 0, "NBD read at {at} failed");
        }
        out
    }

    fn checksum(&self) -> String {
        let mut client = NbdClient::connect(&self.daemon.nbd, &self.volume).expect("NBD connect");
        let mut buf = vec![0u8; 4 << 20];
        let mut crc = 0u32;
        for at in (0..client.size).step_by(buf.len()) {
            let len = buf.len().min((client.size - at) as usize);
            let error = client.read(at, &mut buf[..len]).expect("NBD read");
            assert_eq!(error, 0, "NBD read at {at} failed");
            crc = crc32c::crc32c_append(crc, &buf[..len]);
        }
        format!("{crc:08x}/{}", client.size)
    }

    fn connected(&self) -> Option<bool> {
        let info = self.daemon.info(&self.volume);
        let connected = info["vhost_connected"].as_bool();
        assert!(
            connected.is_some(),
            "volume info has a vhost_connected flag: {info}"
        );
        connected
    }

    fn await_disconnect(&self) {
        self.daemon
            .wait_for(&self.volume, "the vhost frontend to disconnect", |info| {
                info["vhost_connected"] == false
            });
    }

    fn log_tail(&self) -> String {
        tail(&self.daemon.log_text(), 40)
    }
}

/// `qemu-storage-daemon` exporting a raw file: the same guest scenario against QEMU's own
/// vhost-user-blk server.
struct QsdServer {
    child: Option<KillOnDrop>,
    dir: PathBuf,
    disk: PathBuf,
    writable: bool,
}

impl QsdServer {
    fn start(root: &Path) -> Self {
        let dir = root.join("qsd");
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.raw");
        File::create(&disk).unwrap().set_len(VOLUME_SIZE).unwrap();
        let mut server = Self {
            child: None,
            dir,
            disk,
            writable: true,
        };
        server.launch();
        server
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("qsd.pid")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("qsd.log")
    }

    /// Start and wait for the pid file, which qemu-storage-daemon writes once its exports
    /// listen.
    fn launch(&mut self) {
        let _ = std::fs::remove_file(self.pidfile());
        let _ = std::fs::remove_file(self.socket());
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let writable = if self.writable { "on" } else { "off" };
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                self.disk.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},\
                 writable={writable},num-queues={GUEST_QUEUES}",
                self.socket().display()
            ))
            .arg("--pidfile")
            .arg(self.pidfile())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn qemu-storage-daemon");
        self.child = Some(KillOnDrop(child));
        let deadline = Instant::now() + SERVER_TIMEOUT;
        while !self.pidfile().exists() {
            let exited = self.child.as_mut().unwrap().0.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "qemu-storage-daemon did not start ({exited:?}); log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(Pid::from_raw(child.0.id() as i32), Signal::SIGTERM).expect("SIGTERM");
            let status = wait_with_deadline(&mut child.0, SERVER_TIMEOUT)
                .unwrap_or_else(|| panic!("qemu-storage-daemon did not stop after SIGTERM"));
            assert!(
                status.success(),
                "qemu-storage-daemon exited with {status}; log:\n{}",
                self.log_tail()
            );
        }
    }
}

impl VhostServer for QsdServer {
    fn socket(&self) -> PathBuf {
        self.dir.join("vhost.sock")
    }

    fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn make_read_only(&mut self) {
        self.stop();
        self.writable = false;
        self.launch();
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut out = vec![0u8; len];
        File::open(&self.disk)
            .unwrap()
            .read_exact_at(&mut out, offset)
            .unwrap();
        out
    }

    fn checksum(&self) -> String {
        checksum_file(&self.disk)
    }

    fn connected(&self) -> Option<bool> {
        None
    }

    fn await_disconnect(&self) {}

    fn log_tail(&self) -> String {
        tail(
            &std::fs::read_to_string(self.log_path()).unwrap_or_default(),
            40,
        )
    }
}

/// The guest image, booted against a [`VhostServer`].
struct Guest {
    image: GuestImage,
}

impl Guest {
    fn build(root: &Path) -> Self {
        Self {
            image: GuestImage::build(root),
        }
    }

    fn qemu(&self, socket: &Path, mode: &str, reconnect: Option<&str>) -> Command {
        self.image.qemu(socket, mode, GUEST_QUEUES, reconnect)
    }

    /// Boot once in `mode` and return what the guest reported; panics (with the console's tail)
    /// if QEMU fails, times out, or the guest reports a failure or does not finish.
    fn boot(&self, server: &mut dyn VhostServer, mode: &str) -> Boot {
        let console = self.image.dir.join(format!("console-{mode}.log"));
        let qemu_log = self.image.dir.join(format!("qemu-{mode}.log"));
        let log = File::create(&qemu_log).unwrap();
        let started = Instant::now();
        let mut qemu = KillOnDrop(
            self.qemu(&server.socket(), mode, None)
                .arg("-serial")
                .arg(format!("file:{}", console.display()))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn qemu-system-x86_64"),
        );

        let deadline = started + BOOT_TIMEOUT;
        let mut seen_connected = false;
        let status = loop {
            if let Some(status) = qemu.0.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            if !seen_connected {
                seen_connected = server.connected().unwrap_or(true);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        drop(qemu);
        let boot = Boot::finished(mode, &console, &qemu_log, server, status, started);
        boot.check(
            seen_connected,
            "the server reports the frontend connected while the guest runs",
        );
        boot
    }

    /// Boot once in `mode` with a reconnecting vhost-user chardev and the serial console on
    /// QEMU's stdin/stdout; when the guest reports `READY-FOR-RESTART`, restart `vstor serve`,
    /// wait until QEMU has reconnected by itself, and tell the guest to go on (a line on its
    /// console). Returns what the guest reported, with the same checks as [`Guest::boot`].
    fn boot_across_restart(&self, server: &mut VstorServer, mode: &str) -> Boot {
        let console = self.image.dir.join(format!("console-{mode}.log"));
        let qemu_log = self.image.dir.join(format!("qemu-{mode}.log"));
        let log = File::create(&qemu_log).unwrap();
        let started = Instant::now();
        let mut qemu = KillOnDrop(
            self.qemu(&server.socket(), mode, Some(reconnect_option()))
                .args(["-serial", "stdio"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .expect("spawn qemu-system-x86_64"),
        );
        let mut input = qemu.0.stdin.take().expect("QEMU's stdin");
        let output = ConsoleReader::spawn(qemu.0.stdout.take().expect("QEMU's stdout"), &console);
        let fail = |server: &VstorServer, message: &str| -> ! {
            Boot::new(mode, &console, &qemu_log, server).fail(message)
        };

        let deadline = started + BOOT_TIMEOUT;
        if let Err(e) = output.wait_for("VSTOR-READY-FOR-RESTART", deadline) {
            fail(
                server,
                &format!("expected the guest to get ready for the restart: {e}"),
            );
        }
        if server.connected() != Some(true) {
            fail(
                server,
                "expected the server to report the frontend connected",
            );
        }
        eprintln!(
            "boot {mode}: ready for the restart after {:.1} s",
            started.elapsed().as_secs_f64()
        );

        server.restart();
        let restarted = Instant::now();
        loop {
            if let Some(status) = qemu.0.try_wait().unwrap() {
                fail(
                    server,
                    &format!("expected QEMU to reconnect, but it exited ({status})"),
                );
            }
            if server.connected() == Some(true) {
                break;
            }
            if restarted.elapsed() >= SERVER_TIMEOUT {
                fail(
                    server,
                    &format!(
                        "expected QEMU to reconnect within {} s of the restart",
                        SERVER_TIMEOUT.as_secs()
                    ),
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "boot {mode}: QEMU reconnected {:.1} s after the restart",
            restarted.elapsed().as_secs_f64()
        );
        if let Err(e) = input.write_all(b"go\n").and_then(|()| input.flush()) {
            fail(server, &format!("cannot write to the guest's console: {e}"));
        }

        let status = wait_with_deadline(&mut qemu.0, BOOT_TIMEOUT);
        drop(input);
        drop(qemu);
        output.finish();
        let boot = Boot::finished(mode, &console, &qemu_log, server, status, started);
        boot.check(
            boot.value("RESUMED") == "go",
            "the guest reads `go` from its console after the restart",
        );
        boot
    }
}

/// What one boot reported: the `VSTOR-<KEY> <value>` lines of its console, and the logs for
/// failure messages.
struct Boot {
    mode: String,
    reports: Vec<(String, String)>,
    context: String,
}

impl Boot {
    fn new(mode: &str, console: &Path, qemu_log: &Path, server: &dyn VhostServer) -> Self {
        let text =
            String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).replace('\r', "");
        let reports = text
            .lines()
            .filter_map(|line| line.find("VSTOR-").map(|at| &line[at + 6..]))
            .map(|report| {
                let (key, value) = report.split_once(' ').unwrap_or((report, ""));
                (key.to_string(), value.trim().to_string())
            })
            .collect();
        let context = format!(
            "--- guest console ({}), last lines:\n{}\n--- QEMU:\n{}\n--- server log, last lines:\n{}",
            console.display(),
            tail(&text, 60),
            tail(&std::fs::read_to_string(qemu_log).unwrap_or_default(), 20),
            server.log_tail(),
        );
        Self {
            mode: mode.to_string(),
            reports,
            context,
        }
    }

    /// The report of a boot that QEMU ended with `status` (`None`: still running at the
    /// deadline), checked: QEMU exited cleanly, the server saw it go, the guest ran `mode` to the
    /// end without a failure.
    fn finished(
        mode: &str,
        console: &Path,
        qemu_log: &Path,
        server: &dyn VhostServer,
        status: Option<ExitStatus>,
        started: Instant,
    ) -> Self {
        let boot = Self::new(mode, console, qemu_log, server);
        eprintln!("boot {mode}: {:.1} s", started.elapsed().as_secs_f64());
        let Some(status) = status else {
            boot.fail(&format!(
                "QEMU did not exit within {} s: the guest hung or never started",
                BOOT_TIMEOUT.as_secs()
            ));
        };
        boot.check(status.success(), &format!("QEMU exits cleanly ({status})"));
        server.await_disconnect();
        boot.check(
            boot.value("MODE") == mode,
            &format!("the guest runs scenario {mode}"),
        );
        boot.check(!boot.has("FAIL"), "no step in the guest fails");
        boot.check(boot.has("DONE"), "the guest finishes its scenario");
        boot
    }

    fn fail(&self, message: &str) -> ! {
        panic!("boot `{}`: {message}\n{}", self.mode, self.context);
    }

    /// Panic unless `ok`, saying what was `expected` and showing the logs.
    fn check(&self, ok: bool, expected: &str) {
        if !ok {
            self.fail(&format!("expected {expected}"));
        }
    }

    fn has(&self, key: &str) -> bool {
        self.reports.iter().any(|(k, _)| k == key)
    }

    fn value(&self, key: &str) -> &str {
        let mut values = self.reports.iter().filter(|(k, _)| k == key);
        match (values.next(), values.next()) {
            (Some((_, value)), None) => value,
            _ => self.fail(&format!("expected exactly one VSTOR-{key} line")),
        }
    }

    fn sums(&self) -> BTreeMap<String, String> {
        self.digests("SUM")
    }

    /// The `VSTOR-<key> <name> <sha256>` lines, by name.
    fn digests(&self, key: &str) -> BTreeMap<String, String> {
        self.reports
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| {
                let (name, sum) = v.split_once(' ').unwrap_or_else(|| {
                    self.fail(&format!(
                        "expected `VSTOR-{key} <name> <sha256>`, got {v:?}"
                    ))
                });
                (name.to_string(), sum.to_string())
            })
            .collect()
    }

    fn check_device(&self, size: u64, read_only: bool) {
        self.check(
            self.value("SIZE") == size.to_string(),
            &format!("the guest's disk to have the volume's size {size}"),
        );
        self.check(
            self.value("RO") == if read_only { "1" } else { "0" },
            &format!("the guest's disk read-only = {read_only}"),
        );
        self.check(
            self.value("QUEUES") == GUEST_QUEUES.to_string(),
            &format!("the guest's disk to have {GUEST_QUEUES} request queues"),
        );
    }
}

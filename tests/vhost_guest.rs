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

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{checksum_file, require_tool, run_ok, Daemon, NbdClient};
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
const GUEST_DIRS: &str = "bin dev etc lib lib/modules mnt proc sys tmp";
const GUEST_MODULES: [&str; 4] = ["virtio_pci", "virtio_blk", "ext4", "crc32c_generic"];
const INIT_SCRIPT: &str = include_str!("guest/init.sh");

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

/// The guest's kernel and the initramfs built for it.
struct Guest {
    dir: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Guest {
    fn build(root: &Path) -> Self {
        require_tool("qemu-system-x86_64");
        require_tool("sha256sum");
        let dir = root.join("guest");
        std::fs::create_dir_all(&dir).unwrap();
        let (kernel, modules_dir) = find_kernel();
        let busybox = std::fs::read("/bin/busybox")
            .expect("/bin/busybox (apt-get install busybox-static) is readable");

        let mut cpio = Cpio::default();
        for dir in GUEST_DIRS.split_whitespace() {
            cpio.dir(dir);
        }
        cpio.char_device("dev/console", 5, 1);
        cpio.file("bin/busybox", 0o755, &busybox);
        cpio.file("init", 0o755, INIT_SCRIPT.as_bytes());
        let mut order = String::new();
        for module in module_load_order(&modules_dir, &GUEST_MODULES) {
            let name = module_name(&module);
            cpio.file(
                &format!("lib/modules/{name}.ko"),
                0o644,
                &read_module(&modules_dir.join(&module)),
            );
            order.push_str(&format!("{name}.ko\n"));
        }
        cpio.file("etc/modules", 0o644, order.as_bytes());
        let initrd = dir.join("initrd.cpio");
        std::fs::write(&initrd, cpio.finish()).unwrap();
        Self {
            dir,
            kernel,
            initrd,
        }
    }

    /// Boot once in `mode` and return what the guest reported; panics (with the console's tail)
    /// if QEMU fails, times out, or the guest reports a failure or does not finish.
    fn boot(&self, server: &mut dyn VhostServer, mode: &str) -> Boot {
        let console = self.dir.join(format!("console-{mode}.log"));
        let qemu_log = self.dir.join(format!("qemu-{mode}.log"));
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
        let console = self.dir.join(format!("console-{mode}.log"));
        let qemu_log = self.dir.join(format!("qemu-{mode}.log"));
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

    /// QEMU with the guest and its vhost-user-blk device on `socket`, without a serial port or
    /// stdio; `reconnect` is the chardev option that makes QEMU reconnect to a restarted server.
    fn qemu(&self, socket: &Path, mode: &str, reconnect: Option<&str>) -> Command {
        let mut chardev = format!("socket,id=vhost0,path={}", socket.display());
        if let Some(option) = reconnect {
            chardev.push(',');
            chardev.push_str(option);
        }
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(["-accel", "tcg", "-m", "256"])
            .args(["-smp", &GUEST_QUEUES.to_string()])
            .args(["-nodefaults", "-no-user-config", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 vstor.mode={mode}"))
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(chardev)
            .arg("-device")
            .arg(format!(
                "vhost-user-blk-pci,chardev=vhost0,num-queues={GUEST_QUEUES}"
            ));
        command
    }
}

/// The chardev option that makes QEMU reconnect to a vhost-user server every second:
/// `reconnect=1` before QEMU 9.2, `reconnect-ms=1000` since (which removed `reconnect`).
fn reconnect_option() -> &'static str {
    let out = run_ok(Command::new("qemu-system-x86_64").arg("--version"));
    let version = out
        .split_whitespace()
        .skip_while(|word| *word != "version")
        .nth(1)
        .unwrap_or_else(|| panic!("no version in `qemu-system-x86_64 --version`: {out}"));
    let mut numbers = version.split(['.', '-', '+']).map(str::parse::<u32>);
    let (Some(Ok(major)), Some(Ok(minor))) = (numbers.next(), numbers.next()) else {
        panic!("cannot parse QEMU version {version:?}");
    };
    if (major, minor) >= (9, 2) {
        "reconnect-ms=1000"
    } else {
        "reconnect=1"
    }
}

/// A guest's serial console read from QEMU's stdout, line by line as it comes, by a thread that
/// also appends it to a file.
struct ConsoleReader {
    lines: mpsc::Receiver<String>,
    thread: std::thread::JoinHandle<()>,
}

impl ConsoleReader {
    fn spawn(output: impl Read + Send + 'static, file: &Path) -> Self {
        let mut file = File::create(file).unwrap();
        let (tx, lines) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut output = BufReader::new(output);
            let mut line = Vec::new();
            loop {
                line.clear();
                match output.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        file.write_all(&line).unwrap();
                        // The test may have stopped listening; the file still gets everything.
                        let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
                    }
                }
            }
        });
        Self { lines, thread }
    }

    /// Wait until a line contains `marker`; an error if the guest reports a failure, QEMU closes
    /// its stdout (it exited) or `deadline` passes first.
    fn wait_for(&self, marker: &str, deadline: Instant) -> Result<(), String> {
        loop {
            let timeout = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(timeout) {
                Ok(line) if line.contains(marker) => return Ok(()),
                Ok(line) if line.contains("VSTOR-FAIL") => {
                    return Err(format!("the guest failed: {}", line.trim()))
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("no {marker} on the console in time"))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("QEMU closed the console before {marker}"))
                }
            }
        }
    }

    /// Wait for the reader to have written everything to the file (QEMU has exited).
    fn finish(self) {
        drop(self.lines);
        self.thread.join().expect("console reader");
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

/// The last (by name) `/boot/vmlinuz-*` whose modules are installed, and its modules directory.
fn find_kernel() -> (PathBuf, PathBuf) {
    let mut kernels: Vec<(PathBuf, PathBuf)> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let release = path.file_name()?.to_str()?.strip_prefix("vmlinuz-")?;
            let modules = Path::new("/lib/modules").join(release);
            modules
                .join("modules.dep")
                .exists()
                .then_some((path, modules))
        })
        .collect();
    kernels.sort();
    kernels.pop().expect(
        "a kernel in /boot with modules in /lib/modules (apt-get install linux-image-amd64)",
    )
}

/// The module files (relative to `modules_dir`) that `wanted` needs, each after its
/// dependencies; modules built into the kernel are left out.
fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> Vec<String> {
    let dep_text = std::fs::read_to_string(modules_dir.join("modules.dep")).unwrap();
    let deps: BTreeMap<&str, Vec<&str>> = dep_text
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| (module, deps.split_whitespace().collect()))
        .collect();
    let builtin = std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let mut order = Vec::new();
    for name in wanted {
        if builtin.lines().any(|path| module_name(path) == *name) {
            continue;
        }
        let module = deps
            .keys()
            .find(|path| module_name(path) == *name)
            .unwrap_or_else(|| panic!("module {name} is neither built in nor in modules.dep"));
        add_with_deps(module, &deps, &mut order);
    }
    order
}

fn add_with_deps(module: &str, deps: &BTreeMap<&str, Vec<&str>>, order: &mut Vec<String>) {
    if order.iter().any(|m| m == module) {
        return;
    }
    for dep in deps.get(module).into_iter().flatten() {
        add_with_deps(dep, deps, order);
    }
    order.push(module.to_string());
}

/// `kernel/drivers/block/virtio_blk.ko.xz` → `virtio_blk`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A module file's content, decompressed: busybox's insmod takes plain `.ko` files.
fn read_module(path: &Path) -> Vec<u8> {
    let name = path.to_string_lossy();
    let tool = match name.rsplit('.').next() {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return std::fs::read(path).unwrap(),
    };
    require_tool(tool);
    let out = Command::new(tool).arg("-dc").arg(path).output().unwrap();
    assert!(out.status.success(), "{tool} -dc {name} failed");
    out.stdout
}

/// A `newc` cpio archive, the format the kernel unpacks as an initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 2, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, 1, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, 1, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.out
    }

    fn entry(&mut self, name: &str, mode: u32, links: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            links,
            0,
            u32::try_from(data.len()).expect("cpio entry under 4 GiB"),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

fn sha256(data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    std::fs::write(&path, data).unwrap();
    let out = run_ok(Command::new("sha256sum").arg(&path));
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The test's temporary directory, kept (and named on stderr) if the test fails, so the consoles
/// and logs can be read.
struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    fn new() -> Self {
        Self(Some(tempfile::tempdir().unwrap()))
    }

    fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = self.0.take().unwrap().keep();
            eprintln!("test files kept in {}", kept.display());
        }
    }
}

/// A child process that is killed and reaped when dropped, also when a test panics.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

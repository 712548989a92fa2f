//! A real Linux guest for vhost-user-blk tests: the host's Debian kernel (`linux-image-amd64`)
//! with an initramfs written here as a `newc` cpio archive (a static busybox, the virtio/ext4
//! modules from `/lib/modules` in `modules.dep` order, and `tests/guest/init.sh` as `/init`), the
//! QEMU command line that boots it with its disk on a vhost-user socket, and the helpers to read
//! its serial console. The init script reads its scenario from the kernel command line
//! (`vstor.mode=...`) and reports `VSTOR-<KEY> <value>` lines.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{require_tool, run_ok};

const GUEST_DIRS: &str = "bin dev etc lib lib/modules mnt proc sys tmp";
const GUEST_MODULES: [&str; 4] = ["virtio_pci", "virtio_blk", "ext4", "crc32c_generic"];
const INIT_SCRIPT: &str = include_str!("../guest/init.sh");

/// The guest's kernel and the initramfs built for it, in `dir`.
pub struct GuestImage {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImage {
    pub fn build(root: &Path) -> Self {
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

    /// QEMU (TCG) booting the guest in `mode` with `queues` CPUs and a vhost-user-blk device of
    /// as many queues on `socket`, without a serial port or stdio; `reconnect` is the chardev
    /// option that makes QEMU reconnect to a restarted server ([`reconnect_option`]).
    pub fn qemu(
        &self,
        socket: &Path,
        mode: &str,
        queues: usize,
        reconnect: Option<&str>,
    ) -> Command {
        let mut chardev = format!("socket,id=vhost0,path={}", socket.display());
        if let Some(option) = reconnect {
            chardev.push(',');
            chardev.push_str(option);
        }
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(["-accel", "tcg", "-m", "256"])
            .args(["-smp", &queues.to_string()])
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
                "vhost-user-blk-pci,chardev=vhost0,num-queues={queues}"
            ));
        command
    }
}

/// The chardev option that makes QEMU reconnect to a vhost-user server every second:
/// `reconnect=1` before QEMU 9.2, `reconnect-ms=1000` since (which removed `reconnect`).
pub fn reconnect_option() -> &'static str {
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
/// also appends it to a file. Each line keeps the moment it arrived.
pub struct ConsoleReader {
    lines: mpsc::Receiver<(Instant, String)>,
    thread: std::thread::JoinHandle<()>,
}

impl ConsoleReader {
    pub fn spawn(output: impl Read + Send + 'static, file: &Path) -> Self {
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
                        let text = String::from_utf8_lossy(&line).into_owned();
                        let _ = tx.send((Instant::now(), text));
                    }
                }
            }
        });
        Self { lines, thread }
    }

    /// Wait until a line contains `marker`; an error if the guest reports a failure, QEMU closes
    /// its stdout (it exited) or `deadline` passes first.
    pub fn wait_for(&self, marker: &str, deadline: Instant) -> Result<(), String> {
        loop {
            let timeout = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(timeout) {
                Ok((_, line)) if line.contains(marker) => return Ok(()),
                Ok((_, line)) if line.contains("VSTOR-FAIL") => {
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

    /// The next console line, or an error if QEMU closed its stdout or `deadline` passed.
    pub fn next_line(&self, deadline: Instant) -> Result<String, String> {
        self.next_timed(deadline).map(|(_, line)| line)
    }

    /// The next console line and when it arrived.
    pub fn next_timed(&self, deadline: Instant) -> Result<(Instant, String), String> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(timeout) {
            Ok(timed) => Ok(timed),
            Err(mpsc::RecvTimeoutError::Timeout) => Err("no console line in time".into()),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("QEMU closed the console".into()),
        }
    }

    /// Wait for the reader to have written everything to the file (QEMU has exited).
    pub fn finish(self) {
        drop(self.lines);
        self.thread.join().expect("console reader");
    }
}

/// The last (by name) `/boot/vmlinuz-*` whose modules are installed, and its modules directory.
pub fn find_kernel() -> (PathBuf, PathBuf) {
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
pub fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> Vec<String> {
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

pub fn add_with_deps(module: &str, deps: &BTreeMap<&str, Vec<&str>>, order: &mut Vec<String>) {
    if order.iter().any(|m| m == module) {
        return;
    }
    for dep in deps.get(module).into_iter().flatten() {
        add_with_deps(dep, deps, order);
    }
    order.push(module.to_string());
}

/// `kernel/drivers/block/virtio_blk.ko.xz` → `virtio_blk`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A module file's content, decompressed: busybox's insmod takes plain `.ko` files.
pub fn read_module(path: &Path) -> Vec<u8> {
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
pub struct Cpio {
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

    pub fn finish(mut self) -> Vec<u8> {
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

pub fn sha256(data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    std::fs::write(&path, data).unwrap();
    let out = run_ok(Command::new("sha256sum").arg(&path));
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

pub fn wait_with_deadline(
    child: &mut Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
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
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    pub fn new() -> Self {
        Self(Some(tempfile::tempdir().unwrap()))
    }

    pub fn path(&self) -> &Path {
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
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

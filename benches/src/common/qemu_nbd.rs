//! The peer NBD server: `qemu-nbd` on a raw file (vstor's side is [`crate::common::vstor`]).
//!
//! It listens on loopback only and logs to a file in the work directory, whose tail goes into
//! the error when it dies early.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::common::process::{check_interrupted, log_file, log_tail, ChildGuard, POLL};

const QEMU_READY_TIMEOUT: Duration = Duration::from_secs(30);
const QEMU_STOP_GRACE: Duration = Duration::from_secs(30);

/// `qemu-nbd` serving a raw file, in the foreground, with the settings a fair peer would use:
/// host page cache in writeback mode, thread-pool AIO, and several clients allowed.
pub(crate) struct QemuNbd {
    process: ChildGuard,
    address: SocketAddr,
}

impl QemuNbd {
    pub(crate) fn start(image: &Path, size: u64, export: &str, log_path: &Path) -> Result<Self> {
        std::fs::File::create(image)
            .and_then(|file| file.set_len(size))
            .with_context(|| format!("cannot create {}", image.display()))?;
        let address = free_loopback_port()?;
        let log = log_file(log_path)?;
        let mut command = Command::new("qemu-nbd");
        command
            .args(["-f", "raw", "-x", export])
            .args([
                "-p",
                &address.port().to_string(),
                "-b",
                &address.ip().to_string(),
            ])
            .args([
                "--cache=writeback",
                "--aio=threads",
                "--persistent",
                "--shared=8",
            ])
            .arg(image)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut process = ChildGuard::spawn(&mut command, "qemu-nbd", QEMU_STOP_GRACE)?;
        let deadline = Instant::now() + QEMU_READY_TIMEOUT;
        while TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_err() {
            if let Some(status) = process.try_wait()? {
                bail!(
                    "qemu-nbd exited before it listened ({status})\n{}",
                    log_tail(log_path, 20)
                );
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                bail!(
                    "qemu-nbd did not listen on {address} within {} s\n{}",
                    QEMU_READY_TIMEOUT.as_secs(),
                    log_tail(log_path, 20)
                );
            }
            std::thread::sleep(POLL);
        }
        Ok(Self { process, address })
    }

    pub(crate) fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.address)
    }

    pub(crate) fn stop(mut self) -> Result<()> {
        self.process.stop().map(drop)
    }
}

/// A free loopback port for qemu-nbd, from the tests' allocator (below the ephemeral range,
/// so no outgoing connection takes it before qemu-nbd binds it).
fn free_loopback_port() -> Result<SocketAddr> {
    let addr = vstor_backend::testing::free_addr();
    addr.parse()
        .with_context(|| format!("bad loopback address {addr}"))
}

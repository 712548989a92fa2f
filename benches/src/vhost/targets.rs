//! The two vhost-user-blk servers: `qemu-storage-daemon` exporting a raw file, and vstor's
//! per-volume socket under its data directory (`vstor serve` itself is
//! [`crate::common::vstor`]).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::common::process::{check_interrupted, log_file, log_tail, ChildGuard, POLL};
use crate::common::vstor::Vstor;

/// How long vstor has, after `volume create`, to put the volume's socket in place.
pub(crate) const VSTOR_SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
const QSD_READY_TIMEOUT: Duration = Duration::from_secs(30);
const QSD_STOP_GRACE: Duration = Duration::from_secs(30);
/// Queues the qemu-storage-daemon export offers: enough for the 2-queue rows.
pub(crate) const QSD_QUEUES: u32 = 2;

/// Where vstor serves `volume` over vhost-user-blk: `<data-dir>/vhost/<volume>.sock`.
pub(crate) fn vstor_socket_path(data_dir: &Path, volume: &str) -> PathBuf {
    data_dir.join("vhost").join(format!("{volume}.sock"))
}

/// Waits for vstor's socket of `volume` to appear.
pub(crate) fn wait_for_vstor_socket(vstor: &mut Vstor, volume: &str) -> Result<PathBuf> {
    let socket = vstor_socket_path(vstor.data_dir(), volume);
    let deadline = Instant::now() + VSTOR_SOCKET_TIMEOUT;
    while !is_socket(&socket) {
        vstor.check_running()?;
        check_interrupted()?;
        if Instant::now() >= deadline {
            bail!(
                "vstor did not create its vhost-user-blk socket {} within {} s of `vstor volume create {volume}`; \
                 this vstor build may not have the vhost-user-blk export\n{}",
                socket.display(),
                VSTOR_SOCKET_TIMEOUT.as_secs(),
                vstor.log_tail(20)
            );
        }
        std::thread::sleep(POLL);
    }
    Ok(socket)
}

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_socket())
}

/// The `qemu-storage-daemon` command line: the raw file through the host page cache with
/// thread-pool AIO (as qemu-nbd in `bench nbd`), exported writable over a UNIX socket with
/// [`QSD_QUEUES`] queues. The same options exist from QEMU 7.2 on.
pub(crate) fn qsd_args(image: &Path, socket: &Path) -> Vec<String> {
    vec![
        "--blockdev".to_string(),
        format!(
            "driver=file,node-name=file0,filename={},cache.direct=off,aio=threads",
            qemu_option_value(image)
        ),
        "--export".to_string(),
        format!(
            "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable=on,num-queues={QSD_QUEUES}",
            qemu_option_value(socket)
        ),
    ]
}

/// QEMU's option syntax ends a value at a comma and reads ",," as a literal one.
fn qemu_option_value(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// `qemu-storage-daemon` exporting a raw file over vhost-user-blk, in the foreground.
pub(crate) struct QemuStorageDaemon {
    process: ChildGuard,
    socket: PathBuf,
    log_path: PathBuf,
}

impl QemuStorageDaemon {
    /// Creates a sparse raw file of `size` bytes at `image`, starts the daemon and waits for its
    /// socket.
    pub(crate) fn start(image: &Path, size: u64, socket: &Path, log_path: &Path) -> Result<Self> {
        std::fs::File::create(image)
            .and_then(|file| file.set_len(size))
            .with_context(|| format!("cannot create {}", image.display()))?;
        let log = log_file(log_path)?;
        let mut command = Command::new("qemu-storage-daemon");
        command
            .args(qsd_args(image, socket))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut process = ChildGuard::spawn(&mut command, "qemu-storage-daemon", QSD_STOP_GRACE)?;
        let deadline = Instant::now() + QSD_READY_TIMEOUT;
        while !is_socket(socket) {
            if let Some(status) = process.try_wait()? {
                bail!(
                    "qemu-storage-daemon exited before it listened ({status})\n{}",
                    log_tail(log_path, 20)
                );
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                bail!(
                    "qemu-storage-daemon did not create {} within {} s\n{}",
                    socket.display(),
                    QSD_READY_TIMEOUT.as_secs(),
                    log_tail(log_path, 20)
                );
            }
            std::thread::sleep(POLL);
        }
        Ok(Self {
            process,
            socket: socket.to_path_buf(),
            log_path: log_path.to_path_buf(),
        })
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// An error with the tail of its log if the daemon has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.process.try_wait()? {
            bail!(
                "qemu-storage-daemon exited ({status})\n{}",
                log_tail(&self.log_path, 20)
            );
        }
        Ok(())
    }

    pub(crate) fn stop(mut self) -> Result<()> {
        self.process.stop().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vstor_socket_lives_under_the_data_dir() {
        assert_eq!(
            vstor_socket_path(Path::new("/var/tmp/x/vstor"), "bench"),
            Path::new("/var/tmp/x/vstor/vhost/bench.sock")
        );
    }

    #[test]
    fn qsd_command_line_exports_the_raw_file() {
        let args = qsd_args(Path::new("/w/qemu.raw"), Path::new("/w/a,b.sock"));
        assert_eq!(
            args,
            [
                "--blockdev",
                "driver=file,node-name=file0,filename=/w/qemu.raw,cache.direct=off,aio=threads",
                "--export",
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=/w/a,,b.sock,writable=on,num-queues=2",
            ]
        );
    }
}

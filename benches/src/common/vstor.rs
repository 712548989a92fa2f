//! `vstor serve` under test, with its own data directory, ephemeral loopback ports and its log
//! in the work directory, whose tail goes into the error when it dies early; and `vstor dtl`,
//! the DTL server `bench dtl` mirrors to, kept the same way.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::process::{log_tail, spawn_until_ready, ChildGuard};

const VSTOR_READY_TIMEOUT: Duration = Duration::from_secs(60);
const VSTOR_STOP_GRACE: Duration = Duration::from_secs(120);

/// A running `vstor serve` with its own data directory.
pub(crate) struct Vstor {
    process: ChildGuard,
    bin: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    api: String,
    nbd: SocketAddr,
}

impl Vstor {
    /// Starts `vstor serve` on ephemeral loopback ports and waits for its ready line.
    pub(crate) fn start(bin: &Path, data_dir: &Path, log_path: &Path) -> Result<Self> {
        Self::start_with(bin, data_dir, log_path, &[])
    }

    /// Like [`start`](Self::start), with more arguments to `vstor serve` (e.g. `--backend ec
    /// --registry ...`, `--write-buffer-limit 24M`).
    pub(crate) fn start_with(
        bin: &Path,
        data_dir: &Path,
        log_path: &Path,
        extra: &[String],
    ) -> Result<Self> {
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--api",
                "127.0.0.1:0",
                "--nbd",
                "127.0.0.1:0",
                "--no-default-volume",
            ])
            .args(extra)
            // Plain text in the log file, whose tail goes into error messages.
            .env("NO_COLOR", "1");
        let (process, (api, nbd)) = spawn_until_ready(
            &mut command,
            "vstor serve",
            VSTOR_STOP_GRACE,
            log_path,
            VSTOR_READY_TIMEOUT,
            parse_ready_line,
        )?;
        Ok(Self {
            process,
            bin: bin.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            log_path: log_path.to_path_buf(),
            api,
            nbd,
        })
    }

    /// The NBD URI of `export`.
    pub(crate) fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd)
    }

    /// `HOST:PORT` of its management API.
    pub(crate) fn api(&self) -> &str {
        &self.api
    }

    /// The `--data-dir` it was started with.
    pub(crate) fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// An error with the tail of its log if `vstor serve` has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.process.try_wait()? {
            bail!(
                "vstor serve exited ({status})\n{}",
                log_tail(&self.log_path, 20)
            );
        }
        Ok(())
    }

    /// The last lines of its log, for errors.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub(crate) fn create_volume(&self, name: &str, size: u64) -> Result<()> {
        self.create_volume_with(name, size, &[])
    }

    /// `vstor volume create NAME --size SIZE` with more options, e.g. `--dtl-mode sync`.
    pub(crate) fn create_volume_with(&self, name: &str, size: u64, options: &[&str]) -> Result<()> {
        let size = size.to_string();
        let mut args = vec!["volume", "create", name, "--size", &size];
        args.extend_from_slice(options);
        self.cli(&args).map(drop)
    }

    pub(crate) fn volume_info(&self, name: &str) -> Result<Value> {
        let output = self.cli(&["volume", "info", name, "--json"])?;
        serde_json::from_str(&output)
            .with_context(|| format!("`vstor volume info {name} --json` did not print JSON"))
    }

    /// Wait until `volume`'s upload queue is empty: sealed SCOs and TLogs go on being uploaded
    /// (on a local backend: copied) after the writes that made them, on the same disk and
    /// CPUs as whatever is measured next.
    pub(crate) fn wait_uploaded(&self, volume: &str) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let info = self.volume_info(volume)?;
            if info.get("upload_queue").and_then(Value::as_u64) == Some(0) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("vstor's upload queue of {volume} did not drain within 120 s: {info}");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        let output = Command::new(&self.bin)
            .args(args)
            .args(["--api", &self.api])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "`vstor {}` failed ({}): {}{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                stdout.trim()
            );
        }
        Ok(stdout)
    }

    pub(crate) fn stop(mut self) -> Result<()> {
        let status = self.process.stop()?;
        if !status.success() {
            eprintln!("warning: vstor serve exited with {status} on SIGTERM");
        }
        Ok(())
    }
}

/// A running `vstor dtl`: the DTL server volumes mirror their writes to, on an ephemeral
/// loopback port, acknowledging once entries are in the page cache (no `--fsync`).
pub(crate) struct VstorDtl {
    process: ChildGuard,
    log_path: PathBuf,
    address: SocketAddr,
}

impl VstorDtl {
    /// Starts `vstor dtl` and waits for its ready line.
    pub(crate) fn start(bin: &Path, data_dir: &Path, log_path: &Path) -> Result<Self> {
        let mut command = Command::new(bin);
        command
            .arg("dtl")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("NO_COLOR", "1");
        let (process, address) = spawn_until_ready(
            &mut command,
            "vstor dtl",
            VSTOR_STOP_GRACE,
            log_path,
            VSTOR_READY_TIMEOUT,
            parse_dtl_ready_line,
        )?;
        Ok(Self {
            process,
            log_path: log_path.to_path_buf(),
            address,
        })
    }

    /// The `HOST:PORT` it listens on.
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// An error with the tail of its log if `vstor dtl` has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.process.try_wait()? {
            bail!(
                "vstor dtl exited ({status})\n{}",
                log_tail(&self.log_path, 20)
            );
        }
        Ok(())
    }

    /// The last lines of its log, for errors.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    pub(crate) fn stop(mut self) -> Result<()> {
        let status = self.process.stop()?;
        if !status.success() {
            eprintln!("warning: vstor dtl exited with {status} on SIGTERM");
        }
        Ok(())
    }
}

/// `vstor dtl ready: IP:PORT` → the address.
fn parse_dtl_ready_line(line: &str) -> Option<SocketAddr> {
    line.trim()
        .strip_prefix("vstor dtl ready:")?
        .trim()
        .parse()
        .ok()
}

/// `vstor ready: api=http://IP:PORT nbd=nbd://IP:PORT` → (`IP:PORT` of the API, NBD address).
pub(crate) fn parse_ready_line(line: &str) -> Option<(String, SocketAddr)> {
    let rest = line.trim().strip_prefix("vstor ready:")?;
    let mut api = None;
    let mut nbd = None;
    for word in rest.split_whitespace() {
        if let Some(address) = word.strip_prefix("api=http://") {
            api = Some(address.trim_end_matches('/').to_string());
        } else if let Some(address) = word.strip_prefix("nbd=nbd://") {
            nbd = address.trim_end_matches('/').parse().ok();
        }
    }
    Some((api?, nbd?))
}

/// Resident set size of a process, from `VmRSS` in `/proc/<pid>/status`.
pub(crate) fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_vm_rss(&status).ok_or_else(|| anyhow!("no VmRSS line in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_gives_both_addresses() {
        let (api, nbd) =
            parse_ready_line("vstor ready: api=http://127.0.0.1:41234 nbd=nbd://127.0.0.1:40111")
                .unwrap();
        assert_eq!(api, "127.0.0.1:41234");
        assert_eq!(nbd, "127.0.0.1:40111".parse().unwrap());
        assert!(parse_ready_line("vstor starting").is_none());
        assert!(parse_ready_line("vstor ready: api=http://127.0.0.1:1").is_none());
    }

    #[test]
    fn dtl_ready_line_gives_the_address() {
        assert_eq!(
            parse_dtl_ready_line("vstor dtl ready: 127.0.0.1:40112"),
            Some("127.0.0.1:40112".parse().unwrap())
        );
        assert!(
            parse_dtl_ready_line("vstor ready: api=http://127.0.0.1:1 nbd=nbd://127.0.0.1:2")
                .is_none()
        );
        assert!(parse_dtl_ready_line("vstor dtl ready: soon").is_none());
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tvstor\nVmPeak:\t  900000 kB\nVmRSS:\t   12345 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }
}

//! `vstor serve` under test, with its own data directory, ephemeral loopback ports and its log
//! in the work directory, whose tail goes into the error when it dies early.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::process::{check_interrupted, log_file, log_tail, ChildGuard, POLL};

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
            // Plain text in the log file, whose tail goes into error messages.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(log_path)?);
        let mut process = ChildGuard::spawn(&mut command, "vstor serve", VSTOR_STOP_GRACE)?;
        let stdout = process
            .child_mut()
            .stdout
            .take()
            .ok_or_else(|| anyhow!("vstor serve has no stdout pipe"))?;
        let lines = forward_lines(stdout);

        let deadline = Instant::now() + VSTOR_READY_TIMEOUT;
        let mut seen = Vec::new();
        let (api, nbd) = loop {
            check_interrupted()?;
            match lines.recv_timeout(POLL) {
                Ok(line) => match parse_ready_line(&line) {
                    Some(addresses) => break addresses,
                    None => seen.push(line),
                },
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = process.wait_timeout(Duration::from_secs(5))?;
                    let stdout = if seen.is_empty() {
                        String::new()
                    } else {
                        format!("its stdout:\n{}\n", seen.join("\n"))
                    };
                    bail!(
                        "vstor serve exited before it was ready ({})\n{stdout}{}",
                        status.map_or_else(|| "closed its stdout".to_string(), |s| s.to_string()),
                        log_tail(log_path, 20)
                    );
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "vstor serve did not print its ready line within {} s\n{}",
                    VSTOR_READY_TIMEOUT.as_secs(),
                    log_tail(log_path, 20)
                );
            }
        };
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
        self.cli(&["volume", "create", name, "--size", &size.to_string()])
            .map(drop)
    }

    pub(crate) fn volume_info(&self, name: &str) -> Result<Value> {
        let output = self.cli(&["volume", "info", name, "--json"])?;
        serde_json::from_str(&output)
            .with_context(|| format!("`vstor volume info {name} --json` did not print JSON"))
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

/// Sends each line of `stdout` over a channel until the receiver goes away, then keeps draining
/// the pipe so the server never blocks on a full stdout.
fn forward_lines(stdout: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            if sender.send(line.trim_end().to_string()).is_err() {
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
                return;
            }
            line.clear();
        }
    });
    receiver
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
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tvstor\nVmPeak:\t  900000 kB\nVmRSS:\t   12345 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }
}

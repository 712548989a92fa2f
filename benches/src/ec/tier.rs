//! The processes of `vstor-bench ec`: an etcd, `vstor osd` daemons in failure domains, and the
//! `vstor` CLI pointed at the tier's registry. Every process is a [`ChildGuard`], so an error or
//! Ctrl-C anywhere stops them all before the work directory goes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::cluster::nodes::Etcd;
use crate::common::process::{check_interrupted, spawn_until_ready, ChildGuard};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(20);

/// One `vstor osd`.
pub(crate) struct Osd {
    process: Option<ChildGuard>,
    pub(crate) id: u64,
    pub(crate) domain: String,
    pub(crate) data_dir: PathBuf,
}

impl Osd {
    fn start(bin: &Path, work: &Path, name: &str, registry: &str, domain: &str) -> Result<Self> {
        let data_dir = work.join(name);
        let mut command = Command::new(bin);
        command
            .args(["osd", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .args(["--registry", registry, "--domain", domain])
            .args(["--capacity", "4G"])
            .env("NO_COLOR", "1");
        let (process, id) = spawn_until_ready(
            &mut command,
            &format!("vstor osd ({name})"),
            STOP_GRACE,
            &work.join(format!("{name}.log")),
            READY_TIMEOUT,
            parse_osd_line,
        )?;
        Ok(Self {
            process: Some(process),
            id,
            domain: domain.to_string(),
            data_dir,
        })
    }

    /// `kill -9`, as a crash.
    pub(crate) fn kill9(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.kill9()?;
        }
        Ok(())
    }

    /// Bytes of fragment files under its data directory (what a repair must rebuild once it is
    /// gone).
    pub(crate) fn fragment_bytes(&self) -> u64 {
        let mut total = 0;
        let mut stack = vec![self.data_dir.join("fragments")];
        // Bounded by the directory tree; unreadable entries count as empty.
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.map_while(Result::ok) {
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                if meta.is_dir() {
                    stack.push(entry.path());
                } else if !entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    total += meta.len();
                }
            }
        }
        total
    }
}

/// `vstor osd ID (domain D) listening on ADDR, data in DIR` → ID.
fn parse_osd_line(line: &str) -> Option<u64> {
    let rest = line.trim().strip_prefix("vstor osd ")?;
    let (id, rest) = rest.split_once(' ')?;
    rest.contains("listening on ").then_some(())?;
    id.parse().ok()
}

/// etcd and `count` OSDs round-robin over `domains` domains (`d0`, `d1`, ...).
pub(crate) struct Tier {
    pub(crate) osds: Vec<Osd>,
    bin: PathBuf,
    work: PathBuf,
    registry: String,
    // Dropped last: the OSDs stop before their registry.
    _etcd: Etcd,
}

impl Tier {
    pub(crate) fn start(bin: &Path, work: &Path, count: usize, domains: usize) -> Result<Self> {
        let etcd = Etcd::start(work)?;
        let registry = format!("etcd://127.0.0.1:{}", etcd.client_port);
        let mut osds = Vec::new();
        for i in 0..count {
            osds.push(Osd::start(
                bin,
                work,
                &format!("osd{i}"),
                &registry,
                &format!("d{}", i % domains.max(1)),
            )?);
        }
        let tier = Self {
            osds,
            bin: bin.to_path_buf(),
            work: work.to_path_buf(),
            registry,
            _etcd: etcd,
        };
        tier.wait_osds("every OSD up", Duration::from_secs(60), |osds| {
            osds.iter().filter(|o| o["state"] == "up").count() == count
        })?;
        Ok(tier)
    }

    /// One more OSD in `domain` (a replacement disk); waits until the registry lists it up.
    pub(crate) fn add_osd(&mut self, domain: &str) -> Result<u64> {
        let name = format!("osd{}", self.osds.len());
        let osd = Osd::start(&self.bin, &self.work, &name, &self.registry, domain)?;
        let id = osd.id;
        self.osds.push(osd);
        self.wait_osds(&format!("OSD {id} up"), Duration::from_secs(60), |osds| {
            osds.iter().any(|o| o["id"] == id && o["state"] == "up")
        })?;
        Ok(id)
    }

    /// `etcd://127.0.0.1:PORT`, for `vstor serve --registry`.
    pub(crate) fn registry(&self) -> &str {
        &self.registry
    }

    /// `vstor ARGS` against the tier's registry, whatever its exit status.
    pub(crate) fn cli_output(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(&self.bin)
            .args(args)
            .env("VSTOR_REGISTRY", &self.registry)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))
    }

    /// `vstor ARGS` against the tier's registry; its stdout, or an error with its stderr.
    pub(crate) fn cli(&self, args: &[&str]) -> Result<String> {
        let output = self.cli_output(args)?;
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

    /// `vstor osd list --json`.
    pub(crate) fn osd_list(&self) -> Result<Vec<Value>> {
        let text = self.cli(&["osd", "list", "--json"])?;
        serde_json::from_str(&text).context("`vstor osd list --json` did not print a JSON list")
    }

    /// Polls `vstor osd list` until `ready` holds, for at most `timeout`.
    pub(crate) fn wait_osds(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            let osds = self.osd_list()?;
            if ready(&osds) {
                return Ok(osds);
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "timed out after {} s waiting for {what}: {osds:?}",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn osd_startup_line_gives_the_id() {
        assert_eq!(
            parse_osd_line(
                "vstor osd 3 (domain d0) listening on 127.0.0.1:4100, data in /var/tmp/x/osd0"
            ),
            Some(3)
        );
        assert_eq!(parse_osd_line("vstor osd starting"), None);
        assert_eq!(parse_osd_line("vstor ready: api=http://x"), None);
    }
}

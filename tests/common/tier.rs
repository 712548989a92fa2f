//! The erasure-coded tier for process tests: a real etcd and real `vstor osd` processes, each
//! with its own data directory, domain and port; `kill9` and `restart` as after a crash.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::etcd::Etcd;
use super::{stdout_lines, Daemon, VSTOR};

/// One `vstor osd` process.
pub struct Osd {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub domain: String,
    pub registry: String,
    pub capacity: String,
    /// More `vstor osd` arguments.
    pub extra: Vec<String>,
    /// Its id, from its startup line.
    pub id: u64,
    pub addr: String,
}

impl Osd {
    pub fn start(root: &Path, name: &str, registry: &str, domain: &str, capacity: &str) -> Self {
        Self::start_with(root, name, registry, domain, capacity, &[])
    }

    /// Like `start`, with more `vstor osd` arguments.
    pub fn start_with(
        root: &Path,
        name: &str,
        registry: &str,
        domain: &str,
        capacity: &str,
        extra: &[&str],
    ) -> Self {
        let mut osd = Osd {
            child: None,
            data_dir: root.join(name),
            log: root.join(format!("{name}.log")),
            domain: domain.to_string(),
            registry: registry.to_string(),
            capacity: capacity.to_string(),
            extra: extra.iter().map(ToString::to_string).collect(),
            id: 0,
            addr: String::new(),
        };
        osd.launch();
        osd
    }

    /// (Re)start on the same data directory (a new port); waits for the startup line.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new(VSTOR)
            .args(["osd", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&self.data_dir)
            .args([
                "--registry",
                &self.registry,
                "--domain",
                &self.domain,
                "--capacity",
                &self.capacity,
            ])
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn vstor osd");
        let rx = stdout_lines(&mut child);
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "vstor osd did not start; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            });
        // "vstor osd ID (domain D) listening on ADDR, data in DIR"
        let rest = line
            .strip_prefix("vstor osd ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        let (id, rest) = rest.split_once(' ').unwrap();
        self.id = id.parse().unwrap();
        let addr = rest.split("listening on ").nth(1).unwrap();
        self.addr = addr.split(',').next().unwrap().to_string();
        self.child = Some(child);
    }

    /// The running process's id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
            child.wait().unwrap();
        }
    }

    /// Fragment files on its disk.
    pub fn fragment_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.data_dir.join("fragments")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.map_while(Result::ok) {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if !entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    out.push(path);
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for Osd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// etcd plus OSDs in domains.
pub struct Tier {
    pub etcd: Etcd,
    pub osds: Vec<Osd>,
    pub root: PathBuf,
    /// More `vstor osd` arguments for every OSD (`--peer-tls-*`).
    pub osd_extra: Vec<String>,
}

impl Tier {
    /// `count` OSDs spread round-robin over `domains` domains (`d0`, `d1`, ...).
    pub fn start(root: &Path, count: usize, domains: usize) -> Self {
        Self::start_with(root, count, domains, &[])
    }

    /// Like `start`, every OSD with more arguments.
    pub fn start_with(root: &Path, count: usize, domains: usize, osd_extra: &[String]) -> Self {
        let etcd = Etcd::start(root);
        let mut tier = Tier {
            etcd,
            osds: Vec::new(),
            root: root.to_path_buf(),
            osd_extra: osd_extra.to_vec(),
        };
        for i in 0..count {
            tier.add_osd(&format!("d{}", i % domains));
        }
        tier.wait_osds("every OSD up", |osds| {
            osds.iter().filter(|o| o["state"] == "up").count() == count
        });
        tier
    }

    pub fn url(&self) -> String {
        self.etcd.url()
    }

    pub fn add_osd(&mut self, domain: &str) -> usize {
        let name = format!("osd{}", self.osds.len());
        let extra: Vec<&str> = self.osd_extra.iter().map(String::as_str).collect();
        let osd = Osd::start_with(&self.root, &name, &self.url(), domain, "4G", &extra);
        self.osds.push(osd);
        self.osds.len() - 1
    }

    /// Run `vstor <args>` against the tier's registry.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(VSTOR)
            .args(args)
            .env("VSTOR_REGISTRY", self.url())
            .output()
            .unwrap()
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "vstor {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `vstor osd list --json`.
    pub fn osd_list(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.cli_ok(&["osd", "list", "--json"])).unwrap()
    }

    /// Poll `vstor osd list` until `ready` holds (bounded).
    pub fn wait_osds(
        &self,
        what: &str,
        ready: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let osds = self.osd_list();
            if ready(&osds) {
                return osds;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {osds:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A node on the tier: `vstor serve --backend ec --registry … --node NAME`, with `extra`.
    pub fn node(&self, name: &str, extra: &[&str]) -> Daemon {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let url = self.url();
        // Open SCOs are sealed and uploaded within a second of going idle, so tests need not
        // wait a minute for the last one. No read cache: these tests read back from the tier
        // (degraded reads, repairs, halts), which a cache would answer from memory; a test of
        // the cache passes `--read-cache`.
        let config = dir.join("vstor.toml");
        std::fs::write(
            &config,
            "read_cache = \"0\"\n[upload]\nmax_open_age = \"1s\"\n",
        )
        .unwrap();
        let config = config.display().to_string();
        let mut args = vec![
            "--config",
            config.as_str(),
            "--backend",
            "ec",
            "--registry",
            url.as_str(),
            "--node",
            name,
        ];
        args.extend_from_slice(extra);
        Daemon::start_with(&dir, &args)
    }
}

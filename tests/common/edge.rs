//! A `vstor edge` process for tests: its API and NBD ports are picked once and kept across
//! restarts (as on a real host, where QEMU and NBD clients keep their addresses), its vhost-user
//! sockets under its own directory; killed in `Drop`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{stdout_lines, VSTOR};

pub struct EdgeDaemon {
    child: Option<Child>,
    pub name: String,
    pub registry: String,
    pub api: String,
    pub nbd: String,
    pub vhost_dir: PathBuf,
    pub log: PathBuf,
    extra: Vec<String>,
    /// The number of volumes re-attached at the last start (from the ready line).
    pub reattached: usize,
}

use vstor_backend::testing::free_addr;

impl EdgeDaemon {
    /// Start edge `name` on `registry` (`etcd://…`) with its files under `root/name`.
    pub fn start(root: &Path, name: &str, registry: &str, extra: &[&str]) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut edge = EdgeDaemon {
            child: None,
            name: name.to_string(),
            registry: registry.to_string(),
            api: free_addr(),
            nbd: free_addr(),
            vhost_dir: dir.join("vhost"),
            log: dir.join("edge.log"),
            extra: extra.iter().map(ToString::to_string).collect(),
            reattached: 0,
        };
        edge.launch();
        edge
    }

    /// The command line of an edge named `name` that is not started (a duplicate, for tests).
    pub fn start_command(root: &Path, name: &str, registry: &str) -> Command {
        let dir = root.join(format!("{name}-dup"));
        let mut command = Command::new(VSTOR);
        command
            .args(["edge", "--registry", registry, "--name", name])
            .args(["--api", &free_addr(), "--nbd", &free_addr()])
            .arg("--vhost-dir")
            .arg(dir.join("vhost"));
        command
    }

    /// The command line of this edge.
    pub fn command(&self) -> Command {
        let mut command = Command::new(VSTOR);
        command
            .args(["edge", "--registry", &self.registry, "--name", &self.name])
            .args(["--api", &self.api, "--nbd", &self.nbd])
            .arg("--vhost-dir")
            .arg(&self.vhost_dir)
            .args(&self.extra)
            .env("RUST_LOG", "info");
        command
    }

    /// (Re)start the process on the same ports and directories; waits for its ready line.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn vstor edge");
        let rx = stdout_lines(&mut child);
        // A restart after kill -9 waits for the previous run's lease (5 s TTL) first.
        let ready = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vstor edge did not become ready; log:\n{}", self.log_text())
            });
        assert!(
            ready.starts_with("vstor edge ready: "),
            "unexpected first line {ready:?}"
        );
        self.reattached = ready
            .rsplit_once("reattached=")
            .and_then(|(_, n)| n.trim().parse().ok())
            .expect("reattached count in the ready line");
        self.child = Some(child);
    }

    /// The running process's id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// `vstor edge <args>` against this edge's API.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(VSTOR)
            .arg("edge")
            .args(args)
            .env("VSTOR_EDGE_API", &self.api)
            .output()
            .expect("run vstor edge cli")
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "vstor edge {args:?} failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `vstor edge list --json`.
    pub fn list(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.cli_ok(&["list", "--json"])).expect("list JSON")
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    pub fn socket(&self, volume: &str) -> PathBuf {
        self.vhost_dir.join(format!("{volume}.sock"))
    }
}

impl Drop for EdgeDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

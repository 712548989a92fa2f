//! A `vstor mds` daemon for process tests: started on a given or reserved loopback port,
//! restartable on the same address (nodes name their MDSes by address), killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::VSTOR;

/// A running `vstor mds`; killed (SIGKILL) when dropped.
pub struct Mds {
    child: Option<Child>,
    pub addr: String,
    dir: PathBuf,
    backend: PathBuf,
    extra: Vec<String>,
}

impl Mds {
    /// Start on a reserved port (`launch` binds it again after a kill); slaves catch up only
    /// on demand.
    pub fn start(dir: &Path, backend: &Path) -> Self {
        let addr = vstor_backend::testing::free_addr();
        Self::start_at(dir, backend, &addr, &["--catch-up-every", "0s"])
    }

    /// Start listening on `addr` with `extra` flags.
    pub fn start_at(dir: &Path, backend: &Path, addr: &str, extra: &[&str]) -> Self {
        let mut mds = Self {
            child: None,
            addr: addr.to_string(),
            dir: dir.to_path_buf(),
            backend: backend.to_path_buf(),
            extra: extra.iter().map(ToString::to_string).collect(),
        };
        mds.launch();
        mds
    }

    /// (Re)start on the same address and data directory.
    pub fn launch(&mut self) {
        let mut child = Command::new(VSTOR)
            .args(["mds", "--listen", &self.addr])
            .args(&self.extra)
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--backend")
            .arg(&self.backend)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vstor mds");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        self.addr = line
            .trim()
            .strip_prefix("vstor mds ready: ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        self.child = Some(child);
    }

    /// The running process's id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// Run `vstor mds ARGS` and insist on success; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(VSTOR)
            .arg("mds")
            .args(args)
            .output()
            .expect("run vstor mds");
        assert!(
            out.status.success(),
            "vstor mds {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }
}

impl Drop for Mds {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

//! The processes of `vstor-bench edge` besides etcd and the node: `vstor edge` daemons (one on
//! the host, one in a network namespace standing for another hypervisor host) and the namespace
//! itself, joined to the host by a veth pair on a bridge.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cluster::nodes::free_port;
use crate::common::process::{log_tail, spawn_until_ready, ChildGuard};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(30);

/// A network namespace with one veth pair to a bridge on the host: the host is `host_ip`, the
/// namespace `ns_ip`. Removed when dropped.
pub(crate) struct Netns {
    pub(crate) name: String,
    bridge: String,
    pub(crate) host_ip: Ipv4Addr,
    pub(crate) ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (apt-get install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    pub(crate) fn create() -> Result<Self> {
        let id = (0..=255u8)
            .find(|id| ip(&["link", "add", &format!("vbbr{id}"), "type", "bridge"]).is_ok())
            .context("no free bridge name vbbr0..vbbr255 (root is needed for namespaces)")?;
        let net = Self {
            name: format!("vstor-bench{id}"),
            bridge: format!("vbbr{id}"),
            host_ip: Ipv4Addr::new(10, 214, id, 1),
            ns_ip: Ipv4Addr::new(10, 214, id, 10),
        };
        let (outer, inner) = (format!("vb{id}h"), format!("vb{id}n"));
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host_ip),
            "dev",
            &net.bridge,
        ])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        let _ = ip(&["netns", "del", &net.name]);
        ip(&["netns", "add", &net.name])?;
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        ip(&["link", "set", &outer, "master", &net.bridge])?;
        ip(&["link", "set", &outer, "up"])?;
        ip(&["link", "set", &inner, "netns", &net.name])?;
        ip(&["-n", &net.name, "link", "set", &inner, "name", "eth0"])?;
        ip(&[
            "-n",
            &net.name,
            "addr",
            "add",
            &format!("{}/24", net.ns_ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &net.name, "link", "set", "eth0", "up"])?;
        ip(&["-n", &net.name, "link", "set", "lo", "up"])?;
        Ok(net)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// One `vstor edge` daemon.
pub(crate) struct Edge {
    process: Option<ChildGuard>,
    bin: PathBuf,
    command: Vec<String>,
    log: PathBuf,
    pub(crate) name: String,
    /// `host:port` of its API and NBD server, reachable from the host.
    pub(crate) api: String,
    pub(crate) nbd: String,
    pub(crate) vhost_dir: PathBuf,
}

impl Edge {
    /// Start `vstor edge` named `name` on registry `registry`, in `netns` if given (listening on
    /// the namespace's address), with its sockets and log in `work` and `extra` flags.
    pub(crate) fn start(
        bin: &Path,
        work: &Path,
        name: &str,
        registry: &str,
        netns: Option<&Netns>,
        extra: &[&str],
    ) -> Result<Self> {
        let host = netns.map_or(Ipv4Addr::LOCALHOST, |n| n.ns_ip);
        let api = format!("{host}:{}", free_port()?);
        let nbd = format!("{host}:{}", free_port()?);
        let vhost_dir = work.join(format!("{name}-vhost"));
        std::fs::create_dir_all(&vhost_dir)?;
        let mut command = Vec::new();
        if let Some(netns) = netns {
            command.extend(["ip", "netns", "exec", netns.name.as_str()].map(String::from));
        }
        command.push(bin.display().to_string());
        command.extend([
            "edge".to_string(),
            "--registry".into(),
            registry.into(),
            "--name".into(),
            name.into(),
            "--vhost-dir".into(),
            vhost_dir.display().to_string(),
            "--nbd".into(),
            nbd.clone(),
            "--api".into(),
            api.clone(),
        ]);
        command.extend(extra.iter().map(ToString::to_string));
        let mut edge = Self {
            process: None,
            bin: bin.to_path_buf(),
            command,
            log: work.join(format!("{name}.log")),
            name: name.to_string(),
            api,
            nbd,
            vhost_dir,
        };
        edge.launch()?;
        Ok(edge)
    }

    /// Start the process and wait for its ready line (printed once its API and sockets are up).
    pub(crate) fn launch(&mut self) -> Result<()> {
        let mut command = Command::new(&self.command[0]);
        command
            .args(&self.command[1..])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        let (process, ()) = spawn_until_ready(
            &mut command,
            &format!("vstor edge {}", self.name),
            STOP_GRACE,
            &self.log,
            READY_TIMEOUT,
            |line| line.starts_with("vstor edge ready:").then_some(()),
        )?;
        self.process = Some(process);
        Ok(())
    }

    /// The running process's id (`ip netns exec` execs the edge, so it is the edge's).
    pub(crate) fn pid(&self) -> Result<u32> {
        self.process
            .as_ref()
            .map(ChildGuard::pid)
            .with_context(|| format!("vstor edge {} is not running", self.name))
    }

    /// `vstor edge ARGS --api API`, its stdout, or an error with its stderr.
    pub(crate) fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .arg("edge")
            .args(args)
            .args(["--api", &self.api])
            .output()
            .context("cannot run vstor edge")?;
        if !out.status.success() {
            bail!(
                "vstor edge {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The socket `vstor edge attach` made for `volume`.
    pub(crate) fn socket(&self, volume: &str) -> PathBuf {
        self.vhost_dir.join(format!("{volume}.sock"))
    }

    /// `volume`'s entry in `vstor edge list --json`.
    pub(crate) fn entry(&self, volume: &str) -> Result<Option<Value>> {
        let list: Value = serde_json::from_str(&self.cli(&["list", "--json"])?)
            .context("vstor edge list --json is not JSON")?;
        Ok(list
            .as_array()
            .and_then(|l| l.iter().find(|v| v["volume"] == volume).cloned()))
    }

    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log, 20)
    }

    pub(crate) fn stop(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.stop()?;
        }
        Ok(())
    }
}

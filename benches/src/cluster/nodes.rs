//! The processes of `vstor-bench cluster`: one `etcd` on loopback and `vstor serve` nodes
//! registered in it, sharing one local backend directory, plus a small blocking client of the
//! nodes' management API.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::common::process::{log_file, log_tail, spawn_until_ready, ChildGuard};
use crate::common::vstor::parse_ready_line;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(30);
/// Every API call is bounded: a stopped or dead node must not stall the measurement.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// A free TCP port on the host (a network namespace has its own ports, all free), from the
/// tests' allocator: below the ephemeral range, so no outgoing connection takes it before the
/// process started on it binds it.
pub(crate) fn free_port() -> Result<u16> {
    Ok(vstor_backend::testing::free_port())
}

/// `etcd` (package etcd-server) with its data and log in the work directory.
pub(crate) struct Etcd {
    process: ChildGuard,
    pub(crate) client_port: u16,
}

impl Etcd {
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub(crate) fn start(work: &Path) -> Result<Self> {
        Self::start_also_on(work, None)
    }

    /// Like [`start`](Self::start), also listening for clients on `also_on` (a bridge address
    /// that a network namespace reaches the host by).
    pub(crate) fn start_also_on(work: &Path, also_on: Option<std::net::Ipv4Addr>) -> Result<Self> {
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client = format!("http://127.0.0.1:{client_port}");
        let listen = match also_on {
            Some(ip) => format!("{client},http://{ip}:{client_port}"),
            None => client.clone(),
        };
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = work.join("etcd.log");
        let mut command = Command::new("etcd");
        command
            .arg("--name=bench")
            .arg(format!("--data-dir={}", work.join("etcd-data").display()))
            .arg(format!("--listen-client-urls={listen}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=bench={peer}"))
            .arg("--log-level=warn")
            .stdout(log_file(&log)?)
            .stderr(log_file(&log)?);
        let mut process = ChildGuard::spawn(&mut command, "etcd", STOP_GRACE)
            .context("cannot start etcd (apt-get install etcd-server)")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], client_port));
        let deadline = Instant::now() + READY_TIMEOUT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = process.try_wait()? {
                bail!("etcd exited ({status})\n{}", log_tail(&log, 20));
            }
            if Instant::now() > deadline {
                bail!("etcd did not listen on {addr}\n{}", log_tail(&log, 20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            process,
            client_port,
        })
    }
}

/// One `vstor serve --registry etcd://…` node.
pub(crate) struct Node {
    pub(crate) name: String,
    process: Option<ChildGuard>,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    pub(crate) api: String,
}

impl Node {
    /// Start node `name` on etcd at `etcd_port`, with `extra` arguments to `vstor serve`.
    pub(crate) fn start_with(
        bin: &Path,
        work: &Path,
        etcd_port: u16,
        name: &str,
        backend: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let data = work.join(name);
        let mut args = vec![
            "serve".to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--backend".into(),
            backend.display().to_string(),
            "--api".into(),
            "127.0.0.1:0".into(),
            "--nbd".into(),
            "127.0.0.1:0".into(),
            "--no-default-volume".into(),
            "--registry".into(),
            format!("etcd://127.0.0.1:{etcd_port}"),
            "--node".into(),
            name.into(),
            "--domain".into(),
            "bench".into(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_string()));
        let mut node = Self {
            name: name.to_string(),
            process: None,
            bin: bin.to_path_buf(),
            args,
            log: work.join(format!("{name}.log")),
            api: String::new(),
        };
        node.launch()?;
        Ok(node)
    }

    fn launch(&mut self) -> Result<()> {
        let mut command = Command::new(&self.bin);
        command
            .args(&self.args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        let (process, (api, _nbd)) = spawn_until_ready(
            &mut command,
            &format!("vstor serve (node {})", self.name),
            STOP_GRACE,
            &self.log,
            READY_TIMEOUT,
            parse_ready_line,
        )?;
        self.process = Some(process);
        self.api = api;
        Ok(())
    }

    /// The running process's id.
    pub(crate) fn pid(&self) -> Result<u32> {
        self.process
            .as_ref()
            .map(ChildGuard::pid)
            .with_context(|| format!("node {} is not running", self.name))
    }

    /// `kill -9`, and wait until it is gone.
    pub(crate) fn kill9(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.kill9()?;
        }
        Ok(())
    }

    /// Start again with the same data directory after [`kill9`](Self::kill9).
    pub(crate) fn restart(&mut self) -> Result<()> {
        self.launch()
    }

    pub(crate) fn is_running(&self) -> bool {
        self.process.is_some()
    }

    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log, 20)
    }
}

/// `GET http://API/PATH`, parsed as JSON; `None` when the node does not answer (dead, or the
/// request timed out), an error when it answers with an error.
pub(crate) fn get(api: &str, path: &str) -> Result<Option<Value>> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(API_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let Ok(mut response) = agent.get(format!("http://{api}{path}")).call() else {
        return Ok(None);
    };
    let status = response.status();
    let body: Value = response
        .body_mut()
        .read_json()
        .with_context(|| format!("GET {path} on {api}: not JSON"))?;
    // 503: the node cannot say yet (a volume being adopted); ask again.
    if status == 503 {
        return Ok(None);
    }
    if !status.is_success() {
        bail!("GET {path} on {api}: {status}: {body}");
    }
    Ok(Some(body))
}

/// `POST http://API/PATH` with a JSON body; an error unless it answers with success.
pub(crate) fn post(api: &str, path: &str, body: &Value, timeout: Duration) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .post(format!("http://{api}{path}"))
        .send_json(body)
        .with_context(|| format!("POST {path} on {api}"))?;
    if !response.status().is_success() {
        let answer = response.body_mut().read_to_string().unwrap_or_default();
        bail!("POST {path} on {api}: {}: {answer}", response.status());
    }
    Ok(())
}

/// Whether `node` is alive according to the node at `api` (`None`: that node did not answer).
pub(crate) fn node_alive(api: &str, node: &str) -> Result<Option<bool>> {
    let Some(list) = get(api, "/v1/nodes")? else {
        return Ok(None);
    };
    let nodes = list
        .as_array()
        .or_else(|| list.get("nodes").and_then(Value::as_array))
        .ok_or_else(|| anyhow!("GET /v1/nodes on {api}: no node list in {list}"))?;
    Ok(Some(nodes.iter().any(|n| {
        n.get("name").and_then(Value::as_str) == Some(node)
            && n.get("alive").and_then(Value::as_bool) == Some(true)
    })))
}

/// (owner, NBD address `host:port`) of `volume` as the node at `api` sees it, when its owner is
/// alive and exports it.
pub(crate) fn owner_of(api: &str, volume: &str) -> Result<Option<(String, String)>> {
    let Some(info) = get(api, &format!("/v1/volumes/{volume}"))? else {
        return Ok(None);
    };
    let owner = info.get("owner").and_then(Value::as_str);
    let uri = info.get("nbd_uri").and_then(Value::as_str);
    let alive = info
        .get("owner_alive")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    Ok(match (owner, uri) {
        (Some(owner), Some(uri)) if alive => {
            let addr = uri
                .strip_prefix("nbd://")
                .and_then(|rest| rest.split('/').next())
                .ok_or_else(|| anyhow!("volume {volume}: bad nbd_uri {uri:?}"))?;
            Some((owner.to_string(), addr.to_string()))
        }
        _ => None,
    })
}

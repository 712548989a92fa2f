//! Test harness: a `vstor serve` process on loopback ports with its own data directory, the CLI,
//! real client tools, and a minimal synchronous NBD client for crash tests.
#![allow(dead_code)]

pub mod edge;
pub mod etcd;
pub mod guest;
pub mod mds;
pub mod nbd_raw;
pub mod netns;
pub mod oracle;
pub mod tier;
pub mod tier_map;
pub mod tls;
pub mod vhost_client;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const VSTOR: &str = env!("CARGO_BIN_EXE_vstor");

/// The backend a test's daemons run on.
#[derive(Clone)]
pub enum TestBackend {
    /// Each daemon's default `<data-dir>/backend`.
    Default,
    /// A directory shared by the daemons given it (`--backend DIR`).
    Dir(PathBuf),
    /// A bucket on a real S3 server (moto) started for the test (`--backend s3://...`).
    S3(Arc<S3Fixture>),
    /// The erasure-coded tier: etcd and six OSDs in three domains started for the test
    /// (`--backend ec --registry etcd://… --node NAME`: each daemon is a cluster node, named
    /// after its data directory so a restart is the same node).
    Ec(Arc<EcFixture>),
}

pub struct EcFixture {
    pub tier: tier::Tier,
    /// Node settings: open SCOs are uploaded after a second idle.
    pub config: PathBuf,
    _root: tempfile::TempDir,
}

/// A moto server and the bucket and prefix the daemons use; the server stops when the last
/// daemon and test holding it drop it.
pub struct S3Fixture {
    pub moto: vstor_backend::testing::Moto,
    pub uri: String,
    /// The port daemons reach the server on: moto's own, or a proxy's in front of it.
    pub port: u16,
}

impl TestBackend {
    /// A fresh moto server with a bucket, used under a key prefix.
    pub fn s3() -> Self {
        let moto = vstor_backend::testing::Moto::start();
        moto.create_bucket("vstor-tests");
        let port = moto.port();
        TestBackend::S3(Arc::new(S3Fixture {
            moto,
            uri: "s3://vstor-tests/nodes".into(),
            port,
        }))
    }

    /// A bucket on `moto` that daemons reach through `port` (a `Proxy` in front of it, which
    /// the test takes down for an outage); the test's own clients go to moto directly.
    pub fn s3_through(moto: vstor_backend::testing::Moto, port: u16) -> Self {
        moto.create_bucket("vstor-tests");
        TestBackend::S3(Arc::new(S3Fixture {
            moto,
            uri: "s3://vstor-tests/nodes".into(),
            port,
        }))
    }

    /// A backend of the same kind as `self` that daemons can share: `dir` for local ones.
    pub fn shared(&self, dir: &Path) -> Self {
        match self {
            TestBackend::S3(_) => self.clone(),
            _ => TestBackend::Dir(dir.to_path_buf()),
        }
    }

    /// etcd and six `vstor osd` processes in three domains.
    pub fn ec() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let tier = tier::Tier::start(root.path(), 6, 3);
        let config = root.path().join("node.toml");
        std::fs::write(&config, "[upload]\nmax_open_age = \"1s\"\n").expect("node config");
        TestBackend::Ec(Arc::new(EcFixture {
            tier,
            config,
            _root: root,
        }))
    }

    pub fn is_s3(&self) -> bool {
        matches!(self, TestBackend::S3(_))
    }

    /// Objects are read through `store()`, not from files.
    pub fn is_remote(&self) -> bool {
        matches!(self, TestBackend::S3(_) | TestBackend::Ec(_))
    }

    fn args(&self, data_dir: &Path) -> Vec<String> {
        match self {
            TestBackend::Default => vec![],
            TestBackend::Dir(dir) => vec!["--backend".into(), dir.display().to_string()],
            TestBackend::S3(s3) => vec!["--backend".into(), s3.uri.clone()],
            TestBackend::Ec(ec) => {
                // A node name that stays the same across restarts on the same directory.
                let hash = crc32c::crc32c(data_dir.display().to_string().as_bytes());
                vec![
                    "--config".into(),
                    ec.config.display().to_string(),
                    "--backend".into(),
                    "ec".into(),
                    "--registry".into(),
                    ec.tier.url(),
                    "--node".into(),
                    format!("n{hash:08x}"),
                ]
            }
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        match self {
            TestBackend::S3(s3) => vstor_backend::testing::Moto::env_for_port(s3.port),
            _ => vec![],
        }
    }

    /// A client of the store a daemon on `data_dir` uses.
    pub fn store(&self, data_dir: &Path) -> Arc<dyn vstor_backend::ObjectStore> {
        match self {
            TestBackend::Default => Arc::new(
                vstor_backend::LocalStore::open(data_dir.join("backend")).expect("open backend"),
            ),
            TestBackend::Dir(dir) => {
                Arc::new(vstor_backend::LocalStore::open(dir).expect("open backend"))
            }
            TestBackend::S3(s3) => Arc::new(
                s3.moto
                    .store(&s3.uri, vstor_backend::S3Options::default())
                    .expect("open the S3 backend"),
            ),
            TestBackend::Ec(ec) => Arc::new(tier_map::ec_store(&ec.tier.url())),
        }
    }
}

pub struct Daemon {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub api: String,
    pub nbd: String,
    pub log: PathBuf,
    pub backend: TestBackend,
    extra: Vec<String>,
    /// Run inside this network namespace, listening on this address (partition tests).
    netns: Option<(String, std::net::Ipv4Addr)>,
}

/// Is a command-line tool installed? Tests of real clients require it: a missing tool is a
/// failed test, not a skipped one (`.ci/run` installs them).
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is not installed (run .ci/run or apt-get install it)"
    );
}

impl Daemon {
    /// Start a daemon on a fresh data directory inside `root`.
    pub fn start(root: &Path) -> Self {
        Self::start_with(root, &[])
    }

    pub fn start_with(root: &Path, extra: &[&str]) -> Self {
        Self::start_on(root, &TestBackend::Default, extra)
    }

    /// Start a daemon on a fresh data directory inside `root`, on `backend`.
    pub fn start_on(root: &Path, backend: &TestBackend, extra: &[&str]) -> Self {
        let mut daemon = Daemon {
            child: None,
            data_dir: root.join("data"),
            api: String::new(),
            nbd: String::new(),
            log: root.join("daemon.log"),
            backend: backend.clone(),
            extra: extra.iter().map(std::string::ToString::to_string).collect(),
            netns: None,
        };
        daemon.launch();
        daemon
    }

    /// Like [`start_on`](Self::start_on), inside network namespace `ns` (see `netns`), with
    /// its API, NBD server and DTL listening on `ip`.
    pub fn start_in_netns(
        root: &Path,
        backend: &TestBackend,
        extra: &[&str],
        ns: &str,
        ip: std::net::Ipv4Addr,
    ) -> Self {
        let mut daemon = Daemon {
            child: None,
            data_dir: root.join("data"),
            api: String::new(),
            nbd: String::new(),
            log: root.join("daemon.log"),
            backend: backend.clone(),
            extra: extra.iter().map(std::string::ToString::to_string).collect(),
            netns: Some((ns.to_string(), ip)),
        };
        daemon.launch();
        daemon
    }

    /// (Re)start the process on the same data directory, on new ports.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let (mut command, listen) = match &self.netns {
            // `ip netns exec` execs the daemon: the child's pid is the daemon's.
            Some((ns, ip)) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns.as_str(), VSTOR]);
                (command, format!("{ip}:0"))
            }
            None => (Command::new(VSTOR), "127.0.0.1:0".to_string()),
        };
        let mut child = command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--api",
                listen.as_str(),
                "--nbd",
                listen.as_str(),
                "--no-default-volume",
            ])
            .args(self.backend.args(&self.data_dir))
            .args(&self.extra)
            .envs(self.backend.env())
            // The node's own default filter, as a user gets it (not the runner's `RUST_LOG`).
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn vstor serve");
        let rx = stdout_lines(&mut child);
        let ready = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "vstor serve did not become ready; log:\n{}",
                    self.log_text()
                )
            });
        let rest = ready
            .strip_prefix("vstor ready: api=http://")
            .or_else(|| ready.strip_prefix("vstor ready: api=https://"))
            .unwrap_or_else(|| panic!("unexpected first line {ready:?}"));
        let (api, nbd) = rest
            .split_once(" nbd=nbd://")
            .expect("ready line has nbd address");
        self.api = api.to_string();
        self.nbd = nbd.to_string();
        self.child = Some(child);
    }

    /// Arguments added to `vstor serve` from the next [`launch`](Self::launch) on.
    pub fn extra_args(&mut self, args: &[&str]) {
        self.extra
            .extend(args.iter().map(std::string::ToString::to_string));
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{}", self.nbd, volume)
    }

    /// Run `vstor <args> --api <this daemon>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = Command::new(VSTOR);
        command.args(args).env("VSTOR_API", &self.api);
        // A daemon started with a token file: the CLI sends the same token.
        if let Some(file) = self.token_file() {
            command.env("VSTOR_API_TOKEN_FILE", file);
        }
        command.output().expect("run vstor cli")
    }

    /// The `--api-token-file` the daemon was started with, if any.
    pub fn token_file(&self) -> Option<&str> {
        let at = self.extra.iter().position(|a| a == "--api-token-file")?;
        self.extra.get(at + 1).map(String::as_str)
    }

    /// Run the CLI and insist on success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "vstor {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn create_volume(&self, name: &str, size: &str) {
        self.cli_ok(&["volume", "create", name, "--size", size]);
    }

    pub fn info(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["volume", "info", name, "--json"])).expect("info JSON")
    }

    /// Wait until every write to `name` is on the backend (nothing unuploaded, nothing queued).
    pub fn wait_uploaded(&self, name: &str) -> serde_json::Value {
        self.wait_for(name, "everything uploaded", |i| {
            i["not_uploaded_bytes"] == 0 && i["upload_queue"] == 0
        })
    }

    /// Poll the volume's info until `ready` holds (state-based synchronisation with a deadline).
    pub fn wait_for(
        &self,
        name: &str,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            // In a cluster, a volume that is being adopted answers 503 "being taken over" for
            // a moment: a state to wait through, not a failure.
            let out = self.cli(&["volume", "info", name, "--json"]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() && stderr.contains("being taken over") {
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}: {stderr}"
                );
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            assert!(out.status.success(), "volume info {name} failed: {stderr}");
            let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info JSON");
            if ready(&info) {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {info}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The lines `child` prints on stdout, read by a thread that keeps draining them after the
/// test stopped listening (a closed pipe would make the daemon's next line fail).
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Poll `check` until it returns something, failing after `timeout` (state-based
/// synchronisation with a deadline).
pub fn poll<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run a command, insisting on success; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `cmd` whatever its outcome: whether it succeeded, and its stdout then stderr.
pub fn run_any(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// CRC32C and length of a file's whole logical content (holes read as zeros). Hardware CRC32C
/// keeps this at about a second per 4 GiB; any wrong byte changes it.
pub fn checksum_file(path: &Path) -> String {
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 4 << 20];
    let (mut crc, mut len) = (0u32, 0u64);
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            return format!("{crc:08x}/{len}");
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        len += n as u64;
    }
}

/// `qemu-img convert` an export of `daemon` to a raw file in `dir`; returns its checksum.
pub fn export_checksum(daemon: &Daemon, export: &str, dir: &Path) -> String {
    let file = dir.join(format!("{}.raw", export.replace('@', "_at_")));
    uri_checksum(&daemon.uri(export), &file)
}

/// `qemu-img convert` the NBD export at `uri` to the raw file `file` (removed afterwards);
/// returns its checksum.
pub fn uri_checksum(uri: &str, file: &Path) -> String {
    let _ = std::fs::remove_file(file);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(uri)
            .arg(file),
    );
    let sum = checksum_file(file);
    std::fs::remove_file(file).unwrap();
    sum
}

/// `nbdinfo --list --json URI`: the export names, sorted (the URI may carry TLS parameters).
/// libnbd connects from 127.0.0.1.
pub fn nbdinfo_list(uri: &str) -> Vec<String> {
    try_nbdinfo_list(uri).unwrap_or_else(|e| panic!("{e}"))
}

/// The OpenMetrics text of `GET /metrics` on a node's or an edge's API address.
pub fn metrics_text(api: &str) -> String {
    ureq::get(format!("http://{api}/metrics"))
        .call()
        .unwrap_or_else(|e| panic!("GET http://{api}/metrics: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("GET http://{api}/metrics: body: {e}"))
}

/// The `vstor_…` metric names a PromQL expression queries, in order, with repeats.
pub fn metric_names(expr: &str) -> Vec<String> {
    expr.match_indices("vstor_")
        .map(|(i, _)| {
            expr[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect()
        })
        .collect()
}

/// Whether the scrape `text` has series `name` (a sample name, with the suffixes Prometheus
/// adds), or declares its family by a TYPE line: families whose series exist only in some
/// states (a running scrub, an MDS, an OSD) are declared even when empty. A counter's family
/// is declared without its `_total`.
pub fn scrape_has(text: &str, name: &str) -> bool {
    let sampled = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .any(|l| l.split(['{', ' ']).next() == Some(name));
    let declared = |family: &str| text.contains(&format!("# TYPE {family} "));
    sampled || declared(name) || name.strip_suffix("_total").is_some_and(declared)
}

/// Every (alert, metric) pair of `docs/prometheus-alerts.yml`: the `vstor_…` names each
/// alert's expression queries.
pub fn alert_rule_metrics() -> Vec<(String, String)> {
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/prometheus-alerts.yml"
    ))
    .unwrap();
    let mut alert = String::new();
    let mut pairs = Vec::new();
    for line in rules.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert:") {
            alert = name.trim().to_string();
        } else if let Some(expr) = line.strip_prefix("expr:") {
            pairs.extend(metric_names(expr).into_iter().map(|m| (alert.clone(), m)));
        }
    }
    pairs
}

/// Assert that the scrape `text` has every metric the alert rules query among those `which`
/// selects; returns how many were checked.
pub fn assert_alerted_metrics_exported(text: &str, which: impl Fn(&str) -> bool) -> usize {
    let mut checked = 0;
    for (alert, metric) in alert_rule_metrics() {
        if which(&metric) {
            assert!(
                scrape_has(text, &metric),
                "alert {alert} queries {metric}, which the scrape lacks:\n{text}"
            );
            checked += 1;
        }
    }
    checked
}

/// [`nbdinfo_list`], with nbdinfo's failure as an error: while a server's exports change,
/// nbdinfo can list an export and then fail to open it.
pub fn try_nbdinfo_list(uri: &str) -> Result<Vec<String>, String> {
    let out = Command::new("nbdinfo")
        .args(["--list", "--json", uri])
        .output()
        .unwrap_or_else(|e| panic!("cannot run nbdinfo: {e}"));
    if !out.status.success() {
        return Err(format!(
            "nbdinfo --list {uri}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("nbdinfo JSON: {e}"));
    let mut names: Vec<String> = doc["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports array: {doc}"))
        .iter()
        .filter_map(|e| e["export-name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

/// The small blocking NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies, one
/// request at a time) crash tests use to control exactly which writes were acknowledged.
pub use vstor_edge::nbd::client::NbdClient;

/// Sends SIGCONT on drop, so a failed test never leaves a process it stopped (SIGSTOP) behind.
pub struct Thaw(pub Pid);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// Content of `block` for write sequence number `seq`: derived from both, so a read tells which
/// write it came from.
pub fn block_content(block: u64, seq: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&(seq ^ (i as u64) << 40).to_le_bytes());
    }
    out
}

/// Which write (sequence number) a block's content came from; 0 for never written (zeros).
pub fn decode_block(block: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|b| *b == 0) {
        return Some(0);
    }
    let seq = u64::from_le_bytes(data[8..16].try_into().ok()?);
    (block_content(block, seq, data.len()) == data).then_some(seq)
}

/// Payload of a local-backend object file (`backend/src/local.rs`: a 32-byte header whose bytes
/// 20..24 hold the chunk count, a CRC32C per chunk, then the payload).
pub fn backend_payload(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let chunks = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes")) as usize;
    bytes[32 + 4 * chunks..].to_vec()
}

impl Daemon {
    /// A volume's backend namespace directory (`<data-dir>/backend/<volume>/objects`).
    pub fn backend_dir(&self, volume: &str) -> PathBuf {
        self.data_dir.join("backend").join(volume).join("objects")
    }

    /// Names of the complete objects in a volume's backend namespace (puts in progress, named
    /// `.tmp-*`, left out).
    pub fn backend_objects(&self, volume: &str) -> std::collections::BTreeSet<String> {
        if self.backend.is_remote() {
            return self
                .backend
                .store(&self.data_dir)
                .list(volume)
                .map(|names| names.into_iter().collect())
                .unwrap_or_default();
        }
        std::fs::read_dir(self.backend_dir(volume))
            .map(|dir| {
                dir.filter_map(std::result::Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| !name.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Total size of the files in a volume's backend namespace.
    pub fn backend_disk_bytes(&self, volume: &str) -> u64 {
        if self.backend.is_remote() {
            // Payload bytes of each object (S3 does not show the space it really uses).
            let store = self.backend.store(&self.data_dir);
            return store
                .list(volume)
                .unwrap_or_default()
                .iter()
                .filter_map(|name| store.size(volume, name).ok())
                .sum();
        }
        // Descriptors and whole objects under `objects/`, and the payloads of linked objects
        // (SCOs stored by hard link, `put_file`) under `data/`.
        let objects = self.backend_dir(volume);
        let data = objects.with_file_name("data");
        [objects, data]
            .iter()
            .map(|dir| {
                std::fs::read_dir(dir).map_or(0, |dir| {
                    dir.filter_map(std::result::Result::ok)
                        .filter_map(|e| e.metadata().ok())
                        .map(|m| m.len())
                        .sum::<u64>()
                })
            })
            .sum()
    }

    /// The volume's backend TLog list (the `tlogs` object).
    pub fn backend_tlog_list(&self, volume: &str) -> vstor_volumedriver::config::TLogList {
        let payload = match self.backend {
            TestBackend::S3(_) | TestBackend::Ec(_) => self
                .backend
                .store(&self.data_dir)
                .get(volume, "tlogs")
                .expect("backend tlogs"),
            _ => backend_payload(&self.backend_dir(volume).join("tlogs")),
        };
        vstor_volumedriver::config::TLogList::decode(volume, &payload).expect("backend tlogs")
    }

    /// Every object the volume's backend TLog list references: `volume_config`, `tlogs`, each
    /// listed TLog and each SCO (at its version) a listed TLog names.
    pub fn backend_referenced(&self, volume: &str) -> std::collections::BTreeSet<String> {
        let list = self.backend_tlog_list(volume);
        let mut names: std::collections::BTreeSet<String> =
            ["volume_config".to_string(), "tlogs".to_string()].into();
        for record in &list.tlogs {
            names.insert(record.object_name());
            for sco in &record.scos {
                let name = vstor_volumedriver::ScoName {
                    clone_id: 0,
                    number: vstor_volumedriver::ScoNumber(*sco),
                    version: record.sco_version(*sco),
                };
                names.insert(name.to_string());
            }
        }
        names
    }
}

/// `vstor volume create vol` on node `n0` of a cluster: sync DTL, small SCOs and write buffer,
/// so TLogs reach the backend (and trim the DTL) every few MiB.
pub const SYNC_DTL_VOLUME_ON_N0: [&str; 13] = [
    "volume",
    "create",
    "vol",
    "--size",
    "64M",
    "--sco-size",
    "4M",
    "--write-buffer",
    "8M",
    "--dtl-mode",
    "sync",
    "--node",
    "n0",
];

/// Start cluster node `name` in failure domain `domain` on the etcd at `registry`, its data
/// directory under `root/name`, with `extra` flags.
pub fn start_cluster_node(
    root: &Path,
    registry: &str,
    backend: &TestBackend,
    name: &str,
    domain: &str,
    extra: &[&str],
) -> Daemon {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("node directory");
    let mut args = vec!["--registry", registry, "--node", name, "--domain", domain];
    args.extend_from_slice(extra);
    Daemon::start_on(&dir, backend, &args)
}

/// Run the same qemu-io `commands` on the volume at `uri` and on the raw file `reference`.
pub fn write_with_reference(uri: &str, reference: &Path, commands: &[impl AsRef<str>]) {
    for target in [uri.to_string(), reference.display().to_string()] {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &target]);
        for c in commands {
            cmd.args(["-c", c.as_ref()]);
        }
        run_ok(&mut cmd);
    }
}

/// Run `vstor serve` on `data_dir` (API and NBD on free loopback ports, no default volume) with
/// `args`, expecting it to refuse to start; returns its stderr.
pub fn serve_fails(data_dir: &Path, args: &[&str]) -> String {
    let mut child = Command::new(VSTOR)
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
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                !status.success(),
                "vstor serve {args:?} exited with success"
            );
            let output = child.wait_with_output().unwrap();
            return String::from_utf8_lossy(&output.stderr).into_owned();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vstor serve {args:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start `vstor dtl --data-dir DIR ARGS` (ARGS must include `--listen`); returns the process and
/// the address from its ready line.
pub fn start_dtl(dir: &Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(VSTOR)
        .arg("dtl")
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vstor dtl");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let addr = line
        .trim()
        .strip_prefix("vstor dtl ready: ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, addr)
}

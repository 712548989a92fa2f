//! A real `etcd` (`/usr/bin/etcd`, package etcd-server) on loopback for cluster tests: random free
//! ports, its own data directory, killed in `Drop`. `kill9` + `restart` bring it back on the same
//! ports and data, as after a crash. [`Etcd::start_tls`] serves clients over TLS only, with
//! client certificates required; [`Etcd::enable_auth`] turns on etcd's authentication.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ETCD: &str = "etcd";

/// TLS on the client port: etcd's certificate and key, and the CA client certificates must
/// chain to (etcd's `--client-cert-auth`).
#[derive(Clone)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

pub struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    pub peer_port: u16,
    /// Plain-HTTP `/health` (and `/metrics`), whatever the client port speaks.
    pub metrics_port: u16,
    pub tls: Option<EtcdTls>,
    pub data_dir: PathBuf,
    /// The tmpfs directory holding `data_dir`, removed after etcd is killed.
    _shm: Option<tempfile::TempDir>,
    pub log: PathBuf,
    /// Also listen for clients on this address (nodes in network namespaces reach it there).
    pub also_on: Option<std::net::Ipv4Addr>,
}

use vstor_backend::testing::free_port;

impl Etcd {
    /// Start etcd with its data and log under `root`; waits until it is healthy.
    pub fn start(root: &Path) -> Self {
        Self::start_also_on(root, None)
    }

    /// Like `start`, also listening for clients on `ip` (the host end of a netns bridge).
    pub fn start_also_on(root: &Path, also_on: Option<std::net::Ipv4Addr>) -> Self {
        Self::start_with(root, also_on, None)
    }

    /// Like `start`, clients only over TLS with a certificate of `tls.client_ca`.
    pub fn start_tls(root: &Path, tls: EtcdTls) -> Self {
        Self::start_with(root, None, Some(tls))
    }

    fn start_with(root: &Path, also_on: Option<std::net::Ipv4Addr>, tls: Option<EtcdTls>) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            // etcd fsyncs every write and its calls time out after 2 s in vstor; on this one shared
            // disk the other tests' fsync storms stalled it past that (a production etcd gets a
            // disk of its own). Its data lives on tmpfs when there is one; the stall itself is
            // tested on purpose (`cluster_failover`, SIGSTOP).
            let shm = tempfile::Builder::new()
                .prefix("vstor-test-etcd")
                .tempdir_in("/dev/shm")
                .ok();
            let data_dir = shm
                .as_ref()
                .map_or_else(|| root.join("etcd-data"), |d| d.path().join("etcd-data"));
            let mut etcd = Etcd {
                child: None,
                client_port: free_port(),
                peer_port: free_port(),
                metrics_port: free_port(),
                tls: tls.clone(),
                data_dir,
                _shm: shm,
                log: root.join("etcd.log"),
                also_on,
            };
            let _ = std::fs::remove_dir_all(&etcd.data_dir);
            match etcd.launch() {
                Ok(()) => return etcd,
                Err(e) => last = e,
            }
        }
        panic!("etcd did not start: {last}");
    }

    /// `etcd://127.0.0.1:PORT` (`etcd+https://…` with TLS), as `vstor serve --registry` takes it.
    pub fn url(&self) -> String {
        format!(
            "{}127.0.0.1:{}",
            self.scheme("etcd://", "etcd+https://"),
            self.client_port
        )
    }

    fn scheme<'a>(&self, plain: &'a str, tls: &'a str) -> &'a str {
        if self.tls.is_some() {
            tls
        } else {
            plain
        }
    }

    /// `etcd://IP:PORT` on the extra address given to `start_also_on`.
    pub fn url_on(&self, ip: std::net::Ipv4Addr) -> String {
        format!("etcd://{ip}:{}", self.client_port)
    }

    pub fn endpoint(&self) -> String {
        format!(
            "{}127.0.0.1:{}",
            self.scheme("http://", "https://"),
            self.client_port
        )
    }

    fn launch(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let client = self.endpoint();
        let scheme = self.scheme("http://", "https://");
        let listen = match self.also_on {
            Some(ip) => format!("{client},{scheme}{ip}:{}", self.client_port),
            None => client.clone(),
        };
        let mut tls_args = Vec::new();
        if let Some(tls) = &self.tls {
            tls_args = vec![
                format!("--cert-file={}", tls.cert.display()),
                format!("--key-file={}", tls.key.display()),
                format!("--trusted-ca-file={}", tls.client_ca.display()),
                "--client-cert-auth".to_string(),
                // Authentication tokens expire after 1 s unused (default 300 s): clients must
                // authenticate again, as a long-running node does.
                "--auth-token-ttl=1".to_string(),
            ];
        }
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(ETCD)
            .arg("--name=vstor-test")
            .arg(format!("--data-dir={}", self.data_dir.display()))
            .arg(format!("--listen-client-urls={listen}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=vstor-test={peer}"))
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                self.metrics_port
            ))
            .args(&tls_args)
            .arg("--log-level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {ETCD} (apt-get install etcd-server): {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "etcd exited with {status}; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ));
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        Err("etcd did not become healthy within 30 s".into())
    }

    /// etcd's own `/health` endpoint (on the plain-HTTP metrics port) says it serves.
    pub fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = format!(
            "GET /health HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.metrics_port
        );
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.contains("\"health\":\"true\"")
    }

    /// Run `f` with a client of this etcd (plain, no authentication) on a runtime of its own.
    fn with_client<T>(&self, f: impl AsyncFnOnce(&mut etcd_client::Client) -> T) -> T {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut etcd = etcd_client::Client::connect([self.endpoint()], None)
                .await
                .expect("connect to etcd");
            f(&mut etcd).await
        })
    }

    /// Put `value` under `key`: cluster settings for a test, say.
    pub fn put(&self, key: &str, value: &str) {
        self.with_client(async |etcd| {
            etcd.put(key, value, None).await.expect("etcd put");
        });
    }

    /// The value under `key`, if any.
    pub fn get(&self, key: &str) -> Option<String> {
        self.with_client(async |etcd| {
            let got = etcd.get(key, None).await.expect("etcd get");
            got.kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        })
    }

    /// Turn on etcd's authentication: user `root` with `root_password`, and user `user` with
    /// `password` whose role may read and write the keys under `/vstor/` only (what a vstor
    /// process needs). With TLS, connects with `client` (certificate and key) and trusting
    /// `ca`.
    pub fn enable_auth(
        &self,
        ca: Option<&Path>,
        client: Option<(&Path, &Path)>,
        root_password: &str,
        user: &str,
        password: &str,
    ) {
        use etcd_client::{Certificate, Client, ConnectOptions, Identity, Permission, TlsOptions};
        let mut options = ConnectOptions::new().with_timeout(Duration::from_secs(5));
        if self.tls.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = ca {
                tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
            }
            if let Some((cert, key)) = client {
                tls = tls.identity(Identity::from_pem(
                    std::fs::read(cert).unwrap(),
                    std::fs::read(key).unwrap(),
                ));
            }
            options = options.with_tls(tls);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut etcd = Client::connect([self.endpoint()], Some(options))
                .await
                .expect("connect to etcd to enable auth");
            let role = format!("{user}-role");
            etcd.role_add(role.as_str()).await.unwrap();
            etcd.role_grant_permission(
                role.as_str(),
                Permission::read_write("/vstor/").with_prefix(),
            )
            .await
            .unwrap();
            etcd.user_add(user, password, None).await.unwrap();
            etcd.user_grant_role(user, role.as_str()).await.unwrap();
            etcd.user_add("root", root_password, None).await.unwrap();
            // etcd 3.4 knows the `root` role without it being added; a later one may want it.
            let _ = etcd.role_add("root").await;
            etcd.user_grant_role("root", "root").await.unwrap();
            etcd.auth_enable().await.expect("etcd auth enable");
        });
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The etcd process's id (to stop it with SIGSTOP, as a stalled disk would).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("etcd is running").id()
    }

    /// Start again on the same ports and data (after `kill9`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is still running");
        self.launch().expect("etcd restart");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill9();
    }
}

//! Issue 15, the API part: the management API's bearer token (every documented route refuses a
//! missing or wrong token with 401, `GET /v1/health` stays open), the CLI's token sources and
//! its error without one, HTTPS with a private CA, a cluster forwarding with the shared token, the
//! loud warnings for listeners reachable from the network, and the vhost-user sockets' mode and
//! group.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::etcd::Etcd;
use common::{poll, serve_fails, start_cluster_node, stdout_lines, Daemon, TestBackend, VSTOR};
use serde_json::Value;

const TOKEN: &str = "s3cr3t-api-token-for-tests";
const NEEDS_TOKEN: &str = "401: the API needs a token: --api-token-file or VSTOR_API_TOKEN";

/// A token file holding [`TOKEN`] (with the newline an editor leaves).
fn token_file(dir: &Path) -> PathBuf {
    let path = dir.join("api-token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    path
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One plain HTTP/1.1 request with an optional `Authorization` header.
fn http(addr: &str, method: &str, path: &str, authorization: Option<&str>) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    );
    if let Some(value) = authorization {
        request.push_str(&format!("Authorization: {value}\r\n"));
    }
    request.push_str("\r\n{}");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn assert_unauthorized(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 401, "{what}: {}", answer.body);
    assert_eq!(
        answer.header("www-authenticate").as_deref(),
        Some("Bearer"),
        "{what}: {}",
        answer.head
    );
    let value: Value = serde_json::from_str(&answer.body).unwrap();
    assert!(
        value["error"].as_str().unwrap().contains("token"),
        "{what}: {}",
        answer.body
    );
}

#[test]
fn every_documented_route_needs_the_token_but_health() {
    let tmp = tempfile::tempdir().unwrap();
    let file = token_file(tmp.path());
    let daemon = Daemon::start_with(tmp.path(), &["--api-token-file", file.to_str().unwrap()]);
    let api = daemon.api.as_str();
    let bearer = format!("Bearer {TOKEN}");

    // The OpenAPI document itself needs the token, and describes it.
    assert_unauthorized(&http(api, "GET", "/v1/openapi.json", None), "openapi");
    let doc = http(api, "GET", "/v1/openapi.json", Some(&bearer));
    assert_eq!(doc.status, 200, "{}", doc.body);
    let doc: Value = serde_json::from_str(&doc.body).unwrap();
    let scheme = &doc["components"]["securitySchemes"]["api_token"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"], "bearer", "{scheme}");
    assert_eq!(doc["security"][0]["api_token"], serde_json::json!([]));

    let paths = doc["paths"].as_object().unwrap();
    let mut asked = 0;
    for (path, methods) in paths {
        for method in methods.as_object().unwrap().keys() {
            let concrete = path.replace("{name}", "nosuch").replace("{snap}", "nosnap");
            let method = method.to_uppercase();
            let what = format!("{method} {concrete}");
            if path == "/v1/health" {
                let open = http(api, &method, &concrete, None);
                assert_eq!(open.status, 200, "{what}: {}", open.body);
                assert_eq!(methods["get"]["security"], serde_json::json!([{}]));
                continue;
            }
            assert_unauthorized(&http(api, &method, &concrete, None), &what);
            let wrong = http(api, &method, &concrete, Some("Bearer not-the-token"));
            assert_unauthorized(&wrong, &what);
            // Same length, one byte off.
            let near = format!("Bearer {}X", &TOKEN[..TOKEN.len() - 1]);
            assert_unauthorized(&http(api, &method, &concrete, Some(&near)), &what);
            assert_unauthorized(
                &http(api, &method, &concrete, Some(&format!("Basic {TOKEN}"))),
                &what,
            );
            // With the token, the request reaches its handler (a 404 for the missing volume is
            // fine; a 401 is not).
            let with = http(api, &method, &concrete, Some(&bearer));
            assert_ne!(with.status, 401, "{what} with the token: {}", with.body);
            asked += 1;
        }
    }
    assert!(asked >= 25, "only {asked} routes asked");
    // Routes no document lists, and unknown ones, are refused too.
    assert_unauthorized(
        &http(api, "POST", "/v1/volumes/x/takeover", None),
        "takeover",
    );
    assert_unauthorized(&http(api, "GET", "/v1/nosuch", None), "unknown route");
    // Prometheus' scrape: refused without, served with the token.
    assert_unauthorized(&http(api, "GET", "/metrics", None), "metrics");
    let metrics = http(api, "GET", "/metrics", Some(&bearer));
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("vstor_"), "{}", metrics.body);
    // The dashboard page loads (it asks for the token for its data calls).
    let page = http(api, "GET", "/", None);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("token-form"));
}

fn vstor(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(VSTOR)
        .args(args)
        .env_remove("VSTOR_API_TOKEN")
        .env_remove("VSTOR_API_TOKEN_FILE")
        .env_remove("VSTOR_API_CA")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_needs_token(out: &Output) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(NEEDS_TOKEN), "{stderr}");
}

#[test]
fn the_cli_sends_the_token_from_its_flag_or_environment_and_says_when_it_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let file = token_file(tmp.path());
    let file = file.to_str().unwrap();
    let daemon = Daemon::start_with(tmp.path(), &["--api-token-file", file]);
    let api = daemon.api.as_str();

    // --api-token-file, after or before the command.
    assert_ok(&vstor(
        &[
            "volume",
            "create",
            "a",
            "--size",
            "16M",
            "--api",
            api,
            "--api-token-file",
            file,
        ],
        &[],
    ));
    let list = assert_ok(&vstor(
        &["--api", api, "--api-token-file", file, "volume", "list"],
        &[],
    ));
    assert!(list.contains('a'), "{list}");
    // VSTOR_API_TOKEN, then VSTOR_API_TOKEN_FILE.
    assert_ok(&vstor(
        &["volume", "create", "b", "--size", "16M", "--api", api],
        &[("VSTOR_API_TOKEN", TOKEN)],
    ));
    let info = assert_ok(&vstor(
        &["volume", "info", "b", "--json", "--api", api],
        &[("VSTOR_API_TOKEN_FILE", file)],
    ));
    assert_eq!(serde_json::from_str::<Value>(&info).unwrap()["name"], "b");
    // The flag wins over the environment.
    assert_ok(&vstor(
        &["node", "list", "--api", api, "--api-token-file", file],
        &[("VSTOR_API_TOKEN", "wrong")],
    ));
    // `vstor top` and `volume stats` go through the same client.
    assert_ok(&vstor(
        &["top", "--count", "1", "--interval", "100ms", "--api", api],
        &[("VSTOR_API_TOKEN", TOKEN)],
    ));

    // No token, a wrong one: the one clear line.
    assert_needs_token(&vstor(&["volume", "list", "--api", api], &[]));
    assert_needs_token(&vstor(
        &["volume", "list", "--api", api],
        &[("VSTOR_API_TOKEN", "wrong")],
    ));
    let out = vstor(&["volume", "list", "--api", api, "--json"], &[]);
    assert_needs_token(&out);
    // An empty or missing token file is refused before anything is sent.
    let empty = tmp.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let out = vstor(
        &[
            "volume",
            "list",
            "--api",
            api,
            "--api-token-file",
            empty.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is empty"),
        "{out:?}"
    );
}

#[test]
fn bad_token_files_tls_files_and_socket_groups_stop_the_node_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::write(&empty, "  \n").unwrap();
    let err = serve_fails(
        &tmp.path().join("d1"),
        &["--api-token-file", empty.to_str().unwrap()],
    );
    assert!(
        err.contains("api.token_file") && err.contains("is empty"),
        "{err}"
    );
    let err = serve_fails(
        &tmp.path().join("d2"),
        &["--api-token-file", "/nonexistent/t"],
    );
    assert!(
        err.contains("cannot read the API token file /nonexistent/t"),
        "{err}"
    );
    // The config file's spelling.
    let config = tmp.path().join("vstor.toml");
    std::fs::write(&config, "[api]\ntoken_file = \"/nonexistent/t\"\n").unwrap();
    let err = serve_fails(
        &tmp.path().join("d3"),
        &["--config", config.to_str().unwrap()],
    );
    assert!(err.contains("api.token_file"), "{err}");
    let err = serve_fails(
        &tmp.path().join("d4"),
        &["--api-tls-cert", "/nonexistent/c"],
    );
    assert!(err.contains("go together"), "{err}");
    let err = serve_fails(
        &tmp.path().join("d5"),
        &[
            "--api-tls-cert",
            "/nonexistent/c",
            "--api-tls-key",
            "/nonexistent/k",
        ],
    );
    assert!(
        err.contains("api.tls_cert") && err.contains("/nonexistent/c"),
        "{err}"
    );
    std::fs::write(&config, "[vhost]\nsocket_group = \"no-such-group-x\"\n").unwrap();
    let err = serve_fails(
        &tmp.path().join("d6"),
        &["--config", config.to_str().unwrap()],
    );
    assert!(
        err.contains("vhost.socket_group = \"no-such-group-x\": no such group"),
        "{err}"
    );
    std::fs::write(&config, "[vhost]\nsocket_mode = \"rw\"\n").unwrap();
    let err = serve_fails(
        &tmp.path().join("d7"),
        &["--config", config.to_str().unwrap()],
    );
    assert!(err.contains("vhost.socket_mode"), "{err}");
}

/// A private CA and a certificate for 127.0.0.1 it signed, made with the openssl CLI.
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    common::require_tool("openssl");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=vstor test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("node.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.pem",
        "-days",
        "2",
        "-extfile",
        "node.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("node.pem"),
        dir.join("node.key"),
    )
}

#[test]
fn the_api_over_https_with_a_private_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(tmp.path());
    let file = token_file(tmp.path());
    let daemon = Daemon::start_with(
        tmp.path(),
        &[
            "--api-tls-cert",
            cert.to_str().unwrap(),
            "--api-tls-key",
            key.to_str().unwrap(),
            "--api-token-file",
            file.to_str().unwrap(),
        ],
    );
    let https = format!("https://{}", daemon.api);
    let ca = ca.to_str().unwrap();
    let token = [("VSTOR_API_TOKEN", TOKEN)];

    // --api-ca, or VSTOR_API_CA.
    assert_ok(&vstor(
        &[
            "volume", "create", "v", "--size", "16M", "--api", &https, "--api-ca", ca,
        ],
        &token,
    ));
    let list = assert_ok(&vstor(
        &["volume", "list", "--api", &https],
        &[("VSTOR_API_TOKEN", TOKEN), ("VSTOR_API_CA", ca)],
    ));
    assert!(list.contains('v'), "{list}");
    // Without the CA the certificate is not trusted; the token is still required over TLS.
    let out = vstor(&["volume", "list", "--api", &https], &token);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach"), "{stderr}");
    assert_needs_token(&vstor(
        &["volume", "list", "--api", &https, "--api-ca", ca],
        &[],
    ));
    // Plain HTTP to the TLS port gets nowhere.
    let out = vstor(&["volume", "list", "--api", &daemon.api], &token);
    assert!(!out.status.success());
    // A standard client agrees: curl with the CA and the token.
    if Command::new("curl").arg("--version").output().is_ok() {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--cacert", ca, "-H"])
            .arg(format!("Authorization: Bearer {TOKEN}"))
            .arg(format!("{https}/v1/volumes/v"))
            .output()
            .unwrap();
        let body = assert_ok(&out);
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["name"], "v");
    }
}

#[test]
fn cluster_nodes_forward_with_the_shared_token() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let backend = TestBackend::Dir(root.path().join("backend"));
    let file = token_file(root.path());
    let flags = ["--api-token-file", file.to_str().unwrap()];
    let n1 = start_cluster_node(root.path(), &etcd.url(), &backend, "n1", "a", &flags);
    let n2 = start_cluster_node(root.path(), &etcd.url(), &backend, "n2", "b", &flags);

    // Created through n1 on n2 (forwarded), read and deleted through n1 (forwarded).
    let created: Value = serde_json::from_str(&n1.cli_ok(&[
        "volume",
        "create",
        "fw",
        "--size",
        "16M",
        "--node",
        "n2",
        "--dtl-mode",
        "none",
        "--json",
    ]))
    .unwrap();
    assert_eq!(created["owner"], "n2", "{created}");
    assert_eq!(n1.info("fw")["owner"], "n2");
    let nodes: Value = serde_json::from_str(&n1.cli_ok(&["node", "list", "--json"])).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    // The raw API of n1 still wants the token for a volume n2 owns.
    assert_unauthorized(&http(&n1.api, "GET", "/v1/volumes/fw", None), "forwarded");
    n1.cli_ok(&["volume", "delete", "fw"]);
    assert!(!n2.cli(&["volume", "info", "fw"]).status.success());
    drop((n1, n2));
    drop(etcd);
}

/// `vstor serve` on `listen` with `extra`, until it is ready: the child and its log.
fn serve_on(dir: &Path, listen: &str, extra: &[&str]) -> (Child, PathBuf) {
    let log = dir.join("serve.log");
    let mut child = Command::new(VSTOR)
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--api", listen, "--nbd", listen, "--no-default-volume"])
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let lines = stdout_lines(&mut child);
    let ready = lines.recv_timeout(Duration::from_secs(60));
    if !matches!(&ready, Ok(line) if line.starts_with("vstor ready:")) {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "not ready: {ready:?}\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
    }
    (child, log)
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn warnings(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("SECURITY"))
        .map(str::to_string)
        .collect()
}

#[test]
fn listeners_reachable_from_the_network_without_protection_are_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    // Wildcard address, nothing set: the API warning names the address, TLS and the token; the
    // NBD one its address.
    let open = tmp.path().join("open");
    std::fs::create_dir_all(&open).unwrap();
    let (child, log) = serve_on(&open, "0.0.0.0:0", &[]);
    stop(child);
    let lines = warnings(&log);
    let api = lines
        .iter()
        .find(|l| l.contains("management API listens on 0.0.0.0:"))
        .unwrap_or_else(|| panic!("no API warning in {lines:?}"));
    assert!(api.contains("TLS") && api.contains("a token"), "{api}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("NBD server listens on 0.0.0.0:")),
        "{lines:?}"
    );

    // Token and TLS: no API warning; NBD (no TLS in this branch) still warned about.
    let (_, cert, key) = private_ca(tmp.path());
    let file = token_file(tmp.path());
    let guarded = tmp.path().join("guarded");
    std::fs::create_dir_all(&guarded).unwrap();
    let (child, log) = serve_on(
        &guarded,
        "0.0.0.0:0",
        &[
            "--api-token-file",
            file.to_str().unwrap(),
            "--api-tls-cert",
            cert.to_str().unwrap(),
            "--api-tls-key",
            key.to_str().unwrap(),
        ],
    );
    stop(child);
    let lines = warnings(&log);
    assert!(
        !lines.iter().any(|l| l.contains("management API")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("NBD server")), "{lines:?}");

    // A token only: the warning says TLS is missing, not the token.
    let half = tmp.path().join("half");
    std::fs::create_dir_all(&half).unwrap();
    let (child, log) = serve_on(
        &half,
        "0.0.0.0:0",
        &["--api-token-file", file.to_str().unwrap()],
    );
    stop(child);
    let lines = warnings(&log);
    let api = lines
        .iter()
        .find(|l| l.contains("management API"))
        .unwrap_or_else(|| panic!("no API warning in {lines:?}"));
    assert!(api.contains("TLS") && !api.contains("a token"), "{api}");

    // Loopback, the default: silent.
    let quiet = tmp.path().join("quiet");
    std::fs::create_dir_all(&quiet).unwrap();
    let (child, log) = serve_on(&quiet, "127.0.0.1:0", &[]);
    stop(child);
    assert_eq!(warnings(&log), Vec::<String>::new());
}

/// The socket of `volume` under the daemon's default vhost directory, once it exists.
fn socket(daemon: &Daemon, volume: &str) -> std::fs::Metadata {
    let path = daemon.data_dir.join("vhost").join(format!("{volume}.sock"));
    poll("the vhost-user socket", Duration::from_secs(30), || {
        std::fs::symlink_metadata(&path).ok()
    })
}

#[test]
fn vhost_user_sockets_get_the_configured_mode_and_group() {
    // The default: 0600, the daemon's own group.
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("plain", "16M");
    let meta = socket(&daemon, "plain");
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.gid(), nix::unistd::getegid().as_raw());
    drop(daemon);

    // 0660 and group `disk` (exists on every Debian system: gid 6).
    let disk = nix::unistd::Group::from_name("disk").unwrap().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("vstor.toml");
    std::fs::write(
        &config,
        "[vhost]\nsocket_mode = \"0660\"\nsocket_group = \"disk\"\n",
    )
    .unwrap();
    let daemon = Daemon::start_with(tmp.path(), &["--config", config.to_str().unwrap()]);
    daemon.create_volume("shared", "16M");
    let meta = socket(&daemon, "shared");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), disk.gid.as_raw());
    // A snapshot export's socket too.
    daemon.cli_ok(&["snapshot", "create", "shared", "s1"]);
    daemon.cli_ok(&["snapshot", "export", "shared", "s1"]);
    let meta = socket(&daemon, "shared@s1");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), disk.gid.as_raw());
}

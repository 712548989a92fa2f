//! vstor on an etcd that protects its client port (issue 15): TLS only, client certificates
//! required (`--client-cert-auth`), and authentication enabled, with a `vstor` user whose role
//! may only read and write `/vstor/`.
//!
//! With the right CA, client certificate and password a node joins and serves a volume; with
//! the wrong CA, without a client certificate, or with a wrong password `vstor serve` stops at
//! startup, in bounded time, with a message naming the registry and what failed. The CLI verbs
//! that talk to the registry directly take the same flags (and the password from the
//! environment).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::etcd::{Etcd, EtcdTls};
use common::tls::Pki;
use common::{serve_fails, start_cluster_node, NbdClient, TestBackend, VSTOR};

const PASSWORD: &str = "vstor-secret";

struct Fixture {
    root: tempfile::TempDir,
    etcd: Etcd,
    pki: Pki,
    /// A CA that did not sign etcd's certificate.
    other: Pki,
    /// A client certificate of etcd's CA (CN `vstor-node`, which is no etcd user).
    client: (PathBuf, PathBuf),
    password_file: PathBuf,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path(), "etcd-ca");
    let (cert, key) = pki.server("etcd", false);
    let etcd = Etcd::start_tls(
        root.path(),
        EtcdTls {
            cert,
            key,
            client_ca: pki.ca(),
        },
    );
    let client = pki.client("vstor-node", "vstor-node");
    etcd.enable_auth(
        Some(&pki.ca()),
        Some((&client.0, &client.1)),
        "root-secret",
        "vstor",
        PASSWORD,
    );
    let password_file = root.path().join("etcd-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let other = Pki::new(root.path(), "other-ca");
    Fixture {
        root,
        etcd,
        pki,
        other,
        client,
        password_file,
    }
}

/// `--etcd-*` flags: CA, client certificate (if any), user `vstor` with `password_file` (if
/// any).
fn etcd_flags(
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    password_file: Option<&Path>,
) -> Vec<String> {
    let mut flags = vec!["--etcd-ca".to_string(), ca.display().to_string()];
    if let Some((cert, key)) = client {
        flags.extend([
            "--etcd-cert".to_string(),
            cert.display().to_string(),
            "--etcd-key".to_string(),
            key.display().to_string(),
        ]);
    }
    flags.extend(["--etcd-user".to_string(), "vstor".to_string()]);
    if let Some(file) = password_file {
        flags.extend([
            "--etcd-password-file".to_string(),
            file.display().to_string(),
        ]);
    }
    flags
}

fn crc_of(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[test]
fn a_node_joins_an_etcd_with_tls_client_certificates_and_authentication() {
    let f = fixture();
    let url = f.etcd.url();
    assert!(url.starts_with("etcd+https://127.0.0.1:"), "{url}");
    let flags = etcd_flags(&f.pki.ca(), Some(&f.client), Some(&f.password_file));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let backend = TestBackend::Dir(f.root.path().join("backend"));
    let mut node = start_cluster_node(f.root.path(), &url, &backend, "n1", "a", &flags);

    // The node is registered in etcd, alive.
    let nodes: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["--json", "node", "list"])).unwrap();
    let n1 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "n1")
        .unwrap_or_else(|| panic!("n1 not listed: {nodes}"));
    assert_eq!(n1["alive"], true, "{n1}");

    // A volume is created in the registry and serves I/O; by now etcd's token (TTL 1 s here)
    // has expired, so the node authenticates again.
    std::thread::sleep(Duration::from_secs(3));
    node.cli_ok(&[
        "volume",
        "create",
        "v1",
        "--size",
        "64M",
        "--dtl-mode",
        "none",
    ]);
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    {
        let mut client = NbdClient::connect(&node.nbd, "v1").unwrap();
        assert_eq!(client.write(8192, &data, false).unwrap(), 0);
        assert_eq!(client.flush().unwrap(), 0);
        let mut back = vec![0u8; data.len()];
        assert_eq!(client.read(8192, &mut back).unwrap(), 0);
        assert_eq!(crc_of(&back), crc_of(&data));
    }
    let info = node.info("v1");
    assert_eq!(info["owner"], "n1", "{info}");

    // A CLI verb that talks to the registry directly, the password from the environment.
    let flags = etcd_flags(&f.pki.ca(), Some(&f.client), None);
    let out = Command::new(VSTOR)
        .args(["preset", "list", "--registry", &url])
        .args(&flags)
        .env("VSTOR_ETCD_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vstor preset list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(VSTOR)
        .args(["preset", "list", "--registry", &url])
        .args(&flags)
        .env("VSTOR_ETCD_PASSWORD", "wrong")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("wrong etcd user or password"),
        "{stderr}"
    );

    assert!(node.terminate().success());
}

#[test]
fn the_wrong_ca_no_client_certificate_or_a_wrong_password_stop_startup_with_the_reason() {
    let f = fixture();
    let url = f.etcd.url();
    let wrong_password = f.root.path().join("wrong-password");
    std::fs::write(&wrong_password, "not-the-password\n").unwrap();
    let cases = [
        (
            "wrong CA",
            etcd_flags(&f.other.ca(), Some(&f.client), Some(&f.password_file)),
            "etcd's certificate is not trusted",
        ),
        // etcd closes the connection; the client sees the alert or, as often, a broken pipe.
        (
            "no client certificate",
            etcd_flags(&f.pki.ca(), None, Some(&f.password_file)),
            "client certificate",
        ),
        (
            "a client certificate of another CA",
            {
                let (cert, key) = f.other.client("stranger", "vstor");
                let mut flags = etcd_flags(&f.pki.ca(), None, Some(&f.password_file));
                flags.extend([
                    "--etcd-cert".to_string(),
                    cert.display().to_string(),
                    "--etcd-key".to_string(),
                    key.display().to_string(),
                ]);
                flags
            },
            "TLS with the registry",
        ),
        (
            "wrong password",
            etcd_flags(&f.pki.ca(), Some(&f.client), Some(&wrong_password)),
            "wrong etcd user or password",
        ),
    ];
    for (i, (case, flags, expected)) in cases.iter().enumerate() {
        let dir = f.root.path().join(format!("case{i}"));
        let mut args = vec!["--registry", url.as_str(), "--node", "n1"];
        args.extend(flags.iter().map(String::as_str));
        let started = Instant::now();
        // serve_fails waits for the process to exit (and reaps it): nothing is left running.
        let stderr = serve_fails(&dir, &args);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{case}: took {:?}",
            started.elapsed()
        );
        assert!(stderr.contains(expected), "{case}: {stderr}");
        if *case != "wrong password" {
            assert!(stderr.contains("TLS with the registry"), "{case}: {stderr}");
        }
        assert!(
            stderr.contains(&url),
            "{case}: the registry is named: {stderr}"
        );
    }

    // Configuration mistakes are refused before any connection.
    let dir = f.root.path().join("config");
    let plain = format!("etcd://127.0.0.1:{}", f.etcd.client_port);
    let ca = f.pki.ca().display().to_string();
    let stderr = serve_fails(
        &dir,
        &["--registry", &plain, "--node", "n1", "--etcd-ca", &ca],
    );
    assert!(stderr.contains("need a TLS registry"), "{stderr}");
    let stderr = serve_fails(
        &dir,
        &["--registry", &url, "--node", "n1", "--etcd-user", "vstor"],
    );
    assert!(stderr.contains("VSTOR_ETCD_PASSWORD"), "{stderr}");
    let cert = f.client.0.display().to_string();
    let stderr = serve_fails(
        &dir,
        &["--registry", &url, "--node", "n1", "--etcd-cert", &cert],
    );
    assert!(stderr.contains("give --etcd-key"), "{stderr}");
}

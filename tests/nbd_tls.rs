//! NBD over TLS (`NBD_OPT_STARTTLS`) with real clients: qemu-img/qemu-io with `tls-creds-x509`,
//! nbdinfo/nbdcopy with `nbds://` URIs; plain clients under `require`; wrong CA, expired and
//! missing certificates on either side; bad TLS settings at startup.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::tls::{nbds_uri, qemu_tls_args, Pki, NAMED_HOST};
use common::{checksum_file, poll, require_tool, run_ok, serve_fails, Daemon};

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qcow2`: the raw image `raw` converted by qemu-img.
fn qcow2_of(raw: &Path, qcow2: &Path) {
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path(raw),
        path(qcow2),
    ]));
}

/// A daemon serving NBD with the server certificate `stem` of `pki`, plus `extra` flags.
fn start_tls(root: &Path, pki: &Pki, stem: &str, expired: bool, extra: &[&str]) -> Daemon {
    let (cert, key) = pki.server(stem, expired);
    let mut args = vec!["--tls-cert", path(&cert), "--tls-key", path(&key)];
    args.extend(extra);
    Daemon::start_with(root, &args)
}

/// qemu arguments opening `volume` over TLS with the credentials in `dir`.
fn qemu_io_tls(daemon: &Daemon, volume: &str, dir: &Path, commands: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(qemu_tls_args(&daemon.nbd, volume, dir));
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_ok_patterns(out: &Output) {
    let all = text(out);
    assert!(out.status.success(), "{all}");
    assert!(!all.contains("Pattern verification failed"), "{all}");
    assert!(!all.contains("error"), "{all}");
}

fn assert_refused(out: &Output, expect: &[&str]) {
    let all = text(out);
    assert!(
        !out.status.success(),
        "client should have been refused: {all}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for e in expect {
        assert!(stderr.contains(e), "stderr lacks {e:?}: {all}");
    }
}

/// Wait until the daemon's log shows `needle` (the server's side of a refused handshake).
fn wait_log(daemon: &Daemon, needle: &str) {
    poll(
        &format!("daemon log line {needle:?}"),
        Duration::from_secs(10),
        || daemon.log_text().contains(needle).then_some(()),
    );
}

#[test]
fn qemu_clients_write_and_read_back_over_tls_and_plain_ones_are_refused() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "ca");
    let client = pki.client_dir(tmp.path(), "client", None);
    // A certificate alone means `require`.
    let daemon = start_tls(tmp.path(), &pki, "server", false, &[]);
    daemon.create_volume("vol", "64M");

    let info = run_ok(Command::new("qemu-img").arg("info").args(qemu_tls_args(
        &daemon.nbd,
        "vol",
        &client,
    )));
    assert!(info.contains("virtual size: 64 MiB"), "{info}");

    let out = qemu_io_tls(
        &daemon,
        "vol",
        &client,
        &["write -P 0xab 0 1M", "read -P 0xab 0 1M"],
    );
    assert_ok_patterns(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wrote 1048576/1048576 bytes"), "{stdout}");
    assert!(stdout.contains("read 1048576/1048576 bytes"), "{stdout}");
    // A new connection sees the data (and zeros past it): it is in the volume.
    let out = qemu_io_tls(
        &daemon,
        "vol",
        &client,
        &["read -P 0xab 0 1M", "read -P 0 1M 1M"],
    );
    assert_ok_patterns(&out);
    wait_log(&daemon, "tls=true");

    // Without TLS: refused, and the client says why.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &daemon.uri("vol"), "-c", "read 0 4k"])
        .output()
        .unwrap();
    assert_refused(
        &out,
        &[
            "TLS negotiation required",
            "TLS is required: send NBD_OPT_STARTTLS first",
        ],
    );
    let out = Command::new("qemu-img")
        .args(["info", "-f", "raw", &daemon.uri("vol")])
        .output()
        .unwrap();
    assert_refused(&out, &["TLS negotiation required"]);
}

#[test]
fn nbdcopy_copies_in_and_out_over_nbds_and_plain_libnbd_is_refused() {
    require_tool("nbdcopy");
    require_tool("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "ca");
    let client = pki.client_dir(tmp.path(), "client", None);
    let daemon = start_tls(tmp.path(), &pki, "server", false, &["--nbd-tls", "require"]);
    daemon.create_volume("vol", "8M");
    let uri = nbds_uri(&daemon.nbd, "vol", &client);

    let info = run_ok(Command::new("nbdinfo").arg(&uri));
    assert!(info.contains("with TLS"), "{info}");
    assert!(info.contains("export-size: 8388608"), "{info}");

    // Data that differs in every 4 KiB block.
    let src = tmp.path().join("src.img");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(path(&src)).arg(&uri));
    let dst = tmp.path().join("dst.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(path(&dst)));
    assert_eq!(checksum_file(&dst), checksum_file(&src));

    // libnbd without TLS: neither the export nor the export list is served.
    let out = Command::new("nbdinfo")
        .arg(daemon.uri("vol"))
        .output()
        .unwrap();
    assert_refused(&out, &["server replied with error to opt_go"]);
    let out = Command::new("nbdinfo")
        .args(["--list", &format!("nbd://{}", daemon.nbd)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("export=\"vol\""),
        "{}",
        text(&out)
    );
}

#[test]
fn allow_mode_serves_plain_and_tls_clients_the_same_volume() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "ca");
    let client = pki.client_dir(tmp.path(), "client", None);
    let daemon = start_tls(tmp.path(), &pki, "server", false, &["--nbd-tls", "allow"]);
    daemon.create_volume("vol", "16M");

    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &daemon.uri("vol"),
        "-c",
        "write -P 0xcd 0 64k",
    ]));
    let out = qemu_io_tls(&daemon, "vol", &client, &["read -P 0xcd 0 64k"]);
    assert_ok_patterns(&out);
    let plain = run_ok(Command::new("nbdinfo").arg(daemon.uri("vol")));
    assert!(plain.contains("without TLS"), "{plain}");
    let tls = run_ok(Command::new("nbdinfo").arg(nbds_uri(&daemon.nbd, "vol", &client)));
    assert!(tls.contains("with TLS"), "{tls}");
}

#[test]
fn wrong_ca_and_expired_server_certificate_fail_the_handshake() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "ca");
    let other = Pki::new(tmp.path(), "other-ca");
    let good = pki.client_dir(tmp.path(), "good", None);
    let wrong_ca = other.client_dir(tmp.path(), "wrong-ca", None);

    let valid_root = tmp.path().join("valid");
    std::fs::create_dir_all(&valid_root).unwrap();
    let daemon = start_tls(&valid_root, &pki, "server", false, &[]);
    daemon.create_volume("vol", "16M");
    run_ok(Command::new("nbdinfo").args(["--size", &nbds_uri(&daemon.nbd, "vol", &good)]));
    let out = Command::new("nbdinfo")
        .args(["--size", &nbds_uri(&daemon.nbd, "vol", &wrong_ca)])
        .output()
        .unwrap();
    assert_refused(&out, &["gnutls_handshake"]);
    let out = qemu_io_tls(&daemon, "vol", &wrong_ca, &["read 0 4k"]);
    assert_refused(&out, &["The certificate hasn't got a known issuer"]);
    drop(daemon);

    let expired_root = tmp.path().join("expired");
    std::fs::create_dir_all(&expired_root).unwrap();
    let daemon = start_tls(&expired_root, &pki, "expired-server", true, &[]);
    daemon.create_volume("vol", "16M");
    let out = Command::new("nbdinfo")
        .args(["--size", &nbds_uri(&daemon.nbd, "vol", &good)])
        .output()
        .unwrap();
    assert_refused(&out, &["gnutls_handshake", "certificate verification"]);
    // The same CA accepted the valid certificate above: this one fails for its dates.
    let out = qemu_io_tls(&daemon, "vol", &good, &["read 0 4k"]);
    assert_refused(&out, &["The certificate is not trusted"]);
}

#[test]
fn client_certificates_are_required_and_checked_when_a_ca_is_given() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "ca");
    let other = Pki::new(tmp.path(), "other-ca");
    let good = pki.client_dir(tmp.path(), "good", Some(("client1", &pki, false)));
    let none = pki.client_dir(tmp.path(), "none", None);
    let foreign = pki.client_dir(tmp.path(), "foreign", Some(("client1", &other, false)));
    let expired = pki.client_dir(tmp.path(), "expired", Some(("client1", &pki, true)));
    let ca = pki.ca();
    let daemon = start_tls(tmp.path(), &pki, "server", false, &["--tls-ca", path(&ca)]);
    daemon.create_volume("vol", "16M");

    let out = qemu_io_tls(
        &daemon,
        "vol",
        &good,
        &["write -P 0x5a 4k 128k", "read -P 0x5a 4k 128k"],
    );
    assert_ok_patterns(&out);
    let size =
        run_ok(Command::new("nbdinfo").args(["--size", &nbds_uri(&daemon.nbd, "vol", &good)]));
    assert_eq!(size.trim(), "16777216");

    // What the server logs for each. GnuTLS does not send a certificate whose issuer is not
    // among the CAs the server asks for, so a foreign one usually arrives as none at all.
    let cases: [(&PathBuf, &[&str]); 3] = [
        (&none, &["peer sent no certificates"]),
        (&foreign, &["peer sent no certificates", "UnknownIssuer"]),
        (&expired, &["certificate expired"]),
    ];
    for (dir, server_says) in cases {
        let seen = daemon.log_text().len();
        let out = Command::new("nbdinfo")
            .args(["--size", &nbds_uri(&daemon.nbd, "vol", dir)])
            .output()
            .unwrap();
        assert_refused(&out, &["nbd_connect_uri"]);
        let logged = poll("the server's refusal", Duration::from_secs(10), || {
            let log = daemon.log_text();
            let new = log.get(seen..).unwrap_or_default();
            new.contains("TLS handshake failed")
                .then(|| new.to_string())
        });
        assert!(
            server_says.iter().any(|s| logged.contains(s)),
            "{dir:?}: expected one of {server_says:?} in {logged}"
        );
        // qemu checks its own certificate against its CA file first and may refuse before
        // connecting (foreign, expired); either way it must not get in.
        let out = qemu_io_tls(&daemon, "vol", dir, &["read 0 4k"]);
        assert_refused(&out, &[]);
    }
    // The refused clients never attached; the good one still works.
    let out = qemu_io_tls(&daemon, "vol", &good, &["read -P 0x5a 4k 128k"]);
    assert_ok_patterns(&out);
}

#[test]
fn bad_tls_settings_stop_the_node_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "ca");
    let (cert, key) = pki.server("server", false);
    let (_, other_key) = pki.server("server2", false);
    let (cert, key, other_key) = (path(&cert), path(&key), path(&other_key));
    let missing = tmp.path().join("missing.pem");
    let missing = path(&missing);
    let config = tmp.path().join("node.toml");
    std::fs::write(
        &config,
        format!("[nbd_server]\ntls_cert = {cert:?}\ntls_key = {cert:?}\n"),
    )
    .unwrap();
    let ca = pki.ca();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--tls-cert", missing, "--tls-key", key],
            &["TLS certificate", "missing.pem", "No such file"],
        ),
        (
            &["--tls-cert", key, "--tls-key", key],
            &["TLS certificate", "no CERTIFICATE block"],
        ),
        (
            &["--tls-cert", cert, "--tls-key", cert],
            &["TLS private key", "server-cert.pem"],
        ),
        (
            &["--tls-cert", cert, "--tls-key", other_key],
            &["certificate and key", "KeyMismatch"],
        ),
        (
            &["--nbd-tls", "require"],
            &["--nbd-tls", "needs a server certificate"],
        ),
        (&["--tls-cert", cert], &["needs nbd_server.tls_key"]),
        (
            &[
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--nbd-tls",
                "allow",
                "--tls-ca",
                path(&ca),
            ],
            &["need TLS mode require"],
        ),
        (
            &["--config", path(&config)],
            &["TLS private key", "server-cert.pem"],
        ),
    ];
    for (args, expect) in cases {
        let stderr = serve_fails(&tmp.path().join("data"), args);
        for e in *expect {
            assert!(stderr.contains(e), "{args:?}: stderr lacks {e:?}: {stderr}");
        }
    }
}

/// `vstor volume import` and `export` against a node that requires TLS and client
/// certificates: with `--tls-certificates DIR` (the qemu/libnbd credentials layout) a raw and a
/// qcow2 image go in and come back out byte for byte; without it, or with a directory that
/// holds no client certificate, they are refused with a reason and leave no volume behind.
#[test]
fn volume_import_and_export_go_over_tls() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "ca");
    let good = pki.client_dir(tmp.path(), "good", Some(("client1", &pki, false)));
    let no_cert = pki.client_dir(tmp.path(), "no-cert", None);
    let ca = pki.ca();
    let daemon = start_tls(tmp.path(), &pki, "server", false, &["--tls-ca", path(&ca)]);

    // A 4 MiB raw image: data at both ends, a hole between.
    let raw = tmp.path().join("disk.raw");
    let mut image = vec![0u8; 4 << 20];
    for (i, b) in image[..256 << 10].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8 + 1;
    }
    let tail = image.len() - 8192;
    image[tail..].fill(0x6b);
    std::fs::write(&raw, &image).unwrap();
    let good_dir = path(&good);
    let out = daemon.cli_ok(&[
        "volume",
        "import",
        path(&raw),
        "vol",
        "--tls-certificates",
        good_dir,
    ]);
    assert!(out.contains("imported"), "{out}");
    let back = tmp.path().join("back.raw");
    daemon.cli_ok(&[
        "volume",
        "export",
        "vol",
        path(&back),
        "--tls-certificates",
        good_dir,
    ]);
    assert_eq!(checksum_file(&back), checksum_file(&raw));

    // qcow2 goes through qemu-img with the same directory.
    let qcow2 = tmp.path().join("disk.qcow2");
    qcow2_of(&raw, &qcow2);
    daemon.cli_ok(&[
        "volume",
        "import",
        path(&qcow2),
        "q-vol",
        "--tls-certificates",
        good_dir,
    ]);
    let q_back = tmp.path().join("q-back.raw");
    daemon.cli_ok(&[
        "volume",
        "export",
        "q-vol",
        path(&q_back),
        "--tls-certificates",
        good_dir,
    ]);
    assert_eq!(checksum_file(&q_back), checksum_file(&raw));

    // Plain clients: refused, with the hint, and the half-made volume is gone.
    let failed = |args: &[&str]| {
        let out = daemon.cli(args);
        assert!(!out.status.success(), "{args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = failed(&["volume", "import", path(&raw), "plain"]);
    assert!(err.contains("pass --tls-certificates"), "{err}");
    assert!(
        err.contains("the half-imported volume was deleted"),
        "{err}"
    );
    let err = failed(&[
        "volume",
        "export",
        "vol",
        path(&tmp.path().join("plain.raw")),
    ]);
    assert!(err.contains("TLS is required"), "the node's reason: {err}");
    // No client certificate, for a node that wants one: refused by the node.
    let err = failed(&[
        "volume",
        "export",
        "vol",
        path(&tmp.path().join("no-cert.raw")),
        "--tls-certificates",
        path(&no_cert),
    ]);
    // TLS 1.3: the client's handshake ends before the server checks its certificate, so the
    // refusal arrives with the first reply.
    assert!(
        err.contains("TLS session failed") && err.contains("CertificateRequired"),
        "{err}"
    );
    // A directory without ca-cert.pem is refused before any connection.
    let err = failed(&[
        "volume",
        "export",
        "vol",
        path(&tmp.path().join("x.raw")),
        "--tls-certificates",
        path(tmp.path()),
    ]);
    assert!(err.contains("has no ca-cert.pem"), "{err}");
    let err = failed(&[
        "volume",
        "import",
        path(&raw),
        "bad-dir",
        "--tls-certificates",
        path(tmp.path()),
    ]);
    assert!(
        err.contains("has no ca-cert.pem") && !err.contains("half-imported"),
        "refused before the volume is made: {err}"
    );
    let list = daemon.cli_ok(&["volume", "list"]);
    assert!(
        !list.contains("plain") && !list.contains("bad-dir"),
        "{list}"
    );
    // The node still serves the good client.
    let out = qemu_io_tls(&daemon, "vol", &good, &["read -P 0x6b 4186112 8192"]);
    assert_ok_patterns(&out);

    // A node without TLS answers STARTTLS with a refusal, which the client reports.
    let plain_root = tmp.path().join("plain-node");
    std::fs::create_dir_all(&plain_root).unwrap();
    let plain = common::Daemon::start_with(&plain_root, &[]);
    plain.create_volume("p", "4M");
    let out = plain.cli(&[
        "volume",
        "export",
        "p",
        path(&tmp.path().join("p.raw")),
        "--tls-certificates",
        good_dir,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("refused TLS"),
        "{err}"
    );
}

/// A node whose certificate names its host but not the address in its `nbd_uri` (127.0.0.1):
/// import and export check the certificate against that address, and fail, unless
/// `--tls-server-name` names the host; then raw and qcow2 images go in and come back out.
#[test]
fn tls_server_name_says_which_name_the_nodes_certificate_must_carry() {
    require_tool("qemu-img");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "ca");
    let (cert, key) = pki.server_named("named");
    let daemon = Daemon::start_with(
        tmp.path(),
        &["--tls-cert", path(&cert), "--tls-key", path(&key)],
    );
    let creds = pki.client_dir(tmp.path(), "creds", None);
    let creds = path(&creds);

    let raw = tmp.path().join("disk.raw");
    let image: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(&raw, &image).unwrap();
    let qcow2 = tmp.path().join("disk.qcow2");
    qcow2_of(&raw, &qcow2);

    // Without the name: the certificate does not carry 127.0.0.1.
    for (image, volume) in [(&raw, "raw-bad"), (&qcow2, "q-bad")] {
        let out = daemon.cli(&[
            "volume",
            "import",
            path(image),
            volume,
            "--tls-certificates",
            creds,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{volume}: {err}");
        assert!(err.contains("half-imported volume was deleted"), "{err}");
        if volume == "raw-bad" {
            assert!(err.contains("not valid for name"), "{err}");
        }
    }

    // With it: both formats in, and out again, byte for byte.
    let named = ["--tls-certificates", creds, "--tls-server-name", NAMED_HOST];
    for (image, volume) in [(&raw, "raw-vol"), (&qcow2, "q-vol")] {
        let mut args = vec!["volume", "import", path(image), volume];
        args.extend(named);
        daemon.cli_ok(&args);
        let back = tmp.path().join(format!("{volume}.back"));
        let mut args = vec!["volume", "export", volume, path(&back)];
        args.extend(named);
        daemon.cli_ok(&args);
        assert_eq!(checksum_file(&back), checksum_file(&raw), "{volume}");
    }
    let list = daemon.cli_ok(&["volume", "list"]);
    assert!(!list.contains("bad"), "{list}");

    // Export checks the name too; the flag needs credentials; a name must be one.
    let refused: [(&[&str], &str); 3] = [
        (&["--tls-certificates", creds], "not valid for name"),
        (&["--tls-server-name", NAMED_HOST], "--tls-certificates"),
        (
            &[
                "--tls-certificates",
                creds,
                "--tls-server-name",
                "not a name",
            ],
            "--tls-server-name",
        ),
    ];
    for (i, (flags, says)) in refused.into_iter().enumerate() {
        let out_file = tmp.path().join(format!("refused-{i}.raw"));
        let mut args = vec!["volume", "export", "raw-vol", path(&out_file)];
        args.extend(flags);
        let out = daemon.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{flags:?}: {err}"
        );
    }
}

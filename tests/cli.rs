//! The management CLI against a running daemon: every verb, `--json`, and the errors a user meets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::process::Command;

use common::{Daemon, VSTOR};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn volume_lifecycle_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());

    let out = daemon.cli_ok(&[
        "volume",
        "create",
        "disk1",
        "--size",
        "1G",
        "--sco-size",
        "4M",
        "--write-buffer",
        "256M",
    ]);
    assert!(out.contains("created volume disk1 (1 GiB)"), "{out}");
    assert!(out.contains(&daemon.uri("disk1")), "{out}");
    daemon.create_volume("disk2", "512M");

    let list = daemon.cli_ok(&["volume", "list"]);
    assert!(
        list.contains("disk1") && list.contains("disk2") && list.contains("1 GiB"),
        "{list}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["volume", "list", "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["disk1", "disk2"]);

    let info = daemon.info("disk1");
    assert_eq!(info["size"], 1u64 << 30);
    assert_eq!(info["sco_size"], 4u64 << 20);
    assert_eq!(info["write_buffer"], 256u64 << 20);
    assert_eq!(info["state"], "running");
    assert_eq!(info["nbd_connections"], 0);
    let text = daemon.cli_ok(&["volume", "info", "disk1"]);
    assert!(
        text.contains("size:") && text.contains("1 GiB") && text.contains("NBD export:"),
        "{text}"
    );

    let out = daemon.cli_ok(&["volume", "resize", "disk1", "--size", "2G"]);
    assert!(out.contains("resized volume disk1 to 2 GiB"), "{out}");
    assert_eq!(daemon.info("disk1")["size"], 2u64 << 30);

    let out = daemon.cli_ok(&["volume", "update", "disk1", "--read-only", "true"]);
    assert!(
        out.contains("updated volume disk1: read-only true"),
        "{out}"
    );
    assert_eq!(daemon.info("disk1")["read_only"], true);
    let out = daemon.cli(&["volume", "update", "disk1"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nothing to update"),
        "{}",
        stderr(&out)
    );
    daemon.cli_ok(&["volume", "update", "disk1", "--read-only", "false"]);
    assert_eq!(daemon.info("disk1")["read_only"], false);

    let out = daemon.cli_ok(&["volume", "delete", "disk2"]);
    assert!(out.contains("deleted volume disk2"), "{out}");
    let list = daemon.cli_ok(&["volume", "list"]);
    assert!(!list.contains("disk2"), "{list}");
    assert!(
        !daemon.data_dir.join("backend").join("disk2").exists(),
        "backend namespace removed"
    );
}

#[test]
fn cli_errors_are_one_clear_line_and_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("vol", "64M");

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["volume", "info", "nope"],
            "error: volume nope does not exist",
        ),
        (
            vec!["volume", "delete", "nope"],
            "error: volume nope does not exist",
        ),
        (
            vec!["volume", "create", "vol", "--size", "1G"],
            "error: volume vol already exists",
        ),
        (
            vec!["volume", "create", "x", "--size", "lots"],
            "error: bad size \"lots\"",
        ),
        (
            vec!["volume", "create", "x", "--size", "1000"],
            "is not a multiple of 4096 bytes",
        ),
        (
            vec!["volume", "create", "x", "--size", "65T"],
            "exceeds the maximum of 64 TiB",
        ),
        (
            vec!["volume", "create", "x", "--size", "1G", "--sco-size", "1M"],
            "SCO size must be between 4 MiB and 128 MiB",
        ),
        (
            vec!["volume", "create", "bad/name", "--size", "1G"],
            "invalid volume name",
        ),
        (
            vec!["volume", "resize", "vol", "--size", "32M"],
            "cannot shrink",
        ),
    ];
    for (args, expected) in cases {
        let out = daemon.cli(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = stderr(&out);
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line, got {err}"
        );
    }
    // The failed attempts changed nothing.
    assert_eq!(daemon.info("vol")["size"], 64u64 << 20);
}

#[test]
fn unreachable_daemon_and_bad_arguments() {
    let out = Command::new(VSTOR)
        .args(["volume", "list", "--api", "127.0.0.1:9"])
        .env_remove("VSTOR_API")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach the vstor daemon at 127.0.0.1:9"),
        "{err}"
    );

    let out = Command::new(VSTOR)
        .args(["volume", "create", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--size"), "{}", stderr(&out));

    let out = Command::new(VSTOR)
        .args(["serve", "--nbd", "not-an-address"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("NBD address \"not-an-address\" is not IP:PORT"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn serve_reports_bad_config_and_busy_ports() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("vstor.toml");
    std::fs::write(&config, "data_dir = \"x\"\nunknown_setting = 1\n").unwrap();
    let out = Command::new(VSTOR)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid config file"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("unknown_setting"), "{}", stderr(&out));

    let missing = tmp.path().join("missing.toml");
    let out = Command::new(VSTOR)
        .arg("serve")
        .arg("--config")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("cannot read config file"),
        "{}",
        stderr(&out)
    );

    let daemon = Daemon::start(tmp.path());
    let out = Command::new(VSTOR)
        .arg("serve")
        .arg("--data-dir")
        .arg(tmp.path().join("other"))
        .args([
            "--api",
            "127.0.0.1:0",
            "--nbd",
            &daemon.nbd,
            "--no-default-volume",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("cannot listen for NBD on {}", daemon.nbd)),
        "{}",
        stderr(&out)
    );
}

#[test]
fn default_volume_is_created_on_first_start_only() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("vstor.toml");
    std::fs::write(
        &config,
        "[default_volume]\nname = \"first\"\nsize = \"128M\"\n",
    )
    .unwrap();
    let data = tmp.path().join("data");
    let start = || {
        let mut child = Command::new(VSTOR)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .args(["--api", "127.0.0.1:0", "--nbd", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let api = line
            .trim()
            .strip_prefix("vstor ready: api=http://")
            .and_then(|rest| rest.split_once(' '))
            .map(|(api, _)| api.to_string())
            .unwrap();
        (child, api)
    };
    let (mut child, api) = start();
    let list = Command::new(VSTOR)
        .args(["volume", "list", "--json", "--api", &api])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list[0]["name"], "first");
    assert_eq!(list[0]["size"], 128u64 << 20);
    Command::new(VSTOR)
        .args(["volume", "delete", "first", "--api", &api])
        .output()
        .unwrap();
    Command::new(VSTOR)
        .args(["volume", "create", "mine", "--size", "64M", "--api", &api])
        .output()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let (mut child, api) = start();
    let list = Command::new(VSTOR)
        .args(["volume", "list", "--json", "--api", &api])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["mine"],
        "no default volume once the node owns one"
    );
    let _ = child.kill();
    let _ = child.wait();
}

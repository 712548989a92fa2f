//! The rough edges a new user hit (issue 14, items 1-19), one test each, through the real `vstor`
//! binary and daemon: each fails without its fix.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::etcd::Etcd;
use common::{poll, require_tool, Daemon, VSTOR};
use serde_json::Value;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `vstor ARGS` with no `VSTOR_API` in its environment.
fn vstor(args: &[&str]) -> Output {
    Command::new(VSTOR)
        .args(args)
        .env_remove("VSTOR_API")
        .output()
        .unwrap()
}

/// What `volume info NAME` says on stderr.
fn info_err(daemon: &Daemon, name: &str) -> String {
    stderr(&daemon.cli(&["volume", "info", name]))
}

fn failed_with(out: &Output, needle: &str) -> String {
    assert!(!out.status.success(), "succeeded: {}", stdout(out));
    let err = stderr(out);
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    err
}

/// A `vstor serve` started by hand (the harness always passes `--no-default-volume`); its API
/// address, from the ready line.
struct Serve {
    child: Child,
    api: String,
}

impl Serve {
    fn start(data_dir: &Path, extra: &[&str]) -> Result<Self, String> {
        let log = data_dir.with_extension("log");
        let mut child = Command::new(VSTOR)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--api", "127.0.0.1:0", "--nbd", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        match line.trim().strip_prefix("vstor ready: api=http://") {
            Some(rest) => {
                let api = rest.split(' ').next().unwrap().to_string();
                Ok(Serve { child, api })
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(std::fs::read_to_string(&log).unwrap_or_default())
            }
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rough edge 1: `VSTOR_API=http://HOST:PORT`, as the startup banner prints it, is accepted.
#[test]
fn api_address_may_be_the_url_the_banner_prints() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("v1", "64M");
    let url = format!("http://{}/", daemon.api);
    let out = Command::new(VSTOR)
        .args(["volume", "list"])
        .env("VSTOR_API", &url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("v1"), "{}", stdout(&out));
    let out = vstor(&["volume", "info", "v1", "--api", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Rough edge 2: `--api` is accepted before the command group, after it, and after the verb.
#[test]
fn api_flag_is_global() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("v1", "64M");
    let api = daemon.api.as_str();
    for args in [
        vec!["--api", api, "volume", "list"],
        vec!["volume", "--api", api, "list"],
        vec!["volume", "list", "--api", api],
        vec!["--api", api, "--json", "snapshot", "list", "v1"],
    ] {
        let out = vstor(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let out = vstor(&["--api", api, "volume", "list"]);
    assert!(stdout(&out).contains("v1"), "{}", stdout(&out));
    let out = vstor(&["--json", "--api", api, "volume", "list"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "v1");
}

/// Rough edge 3: With `--json`, errors are JSON too.
#[test]
fn json_errors_are_json() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    for args in [
        vec!["volume", "info", "nosuch", "--json"],
        vec!["--json", "volume", "info", "nosuch"],
    ] {
        let out = daemon.cli(&args);
        assert!(!out.status.success());
        let error: Value = serde_json::from_str(stderr(&out).trim())
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stderr(&out)));
        assert!(
            error["error"]
                .as_str()
                .unwrap()
                .contains("nosuch does not exist"),
            "{error}"
        );
    }
    // An unreachable daemon too.
    let out = vstor(&["volume", "list", "--json", "--api", "127.0.0.1:1"]);
    let error: Value = serde_json::from_str(stderr(&out).trim()).unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("cannot reach"),
        "{error}"
    );
}

/// Rough edge 4: Logs written to a file carry no ANSI colour codes.
#[test]
fn logs_are_plain_text_off_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("v1", "64M");
    let log = daemon.log_text();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in the log: {log:?}");
}

/// Rough edge 5: One NBD connection logs one INFO line, not three.
#[test]
fn one_info_line_per_nbd_connection() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("v1", "64M");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &daemon.uri("v1"), "-c", "write -P 7 0 4k"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    daemon.wait_for("v1", "the NBD client gone", |i| i["nbd_connections"] == 0);
    let log = daemon.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" INFO ") && l.contains("NBD client"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("attached") && lines[0].contains("v1"),
        "{lines:?}"
    );
}

/// A `vstor dtl` process on an ephemeral port; its address.
fn start_dtl(dir: &Path) -> (Child, String) {
    let mut child = Command::new(VSTOR)
        .args(["dtl", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("vstor dtl ready: ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, addr)
}

/// Rough edge 6: `volume update --dtl-mode async` shows the DTL's real state, not a transient
/// "degraded".
#[test]
fn dtl_mode_change_shows_a_healthy_dtl_as_healthy() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut dtl, addr) = start_dtl(&tmp.path().join("dtl"));
    let daemon = Daemon::start(tmp.path());
    let out = daemon.cli_ok(&["volume", "create", "v1", "--size", "64M", "--dtl", &addr]);
    assert!(out.contains("created volume v1"), "{out}");
    let out = daemon.cli(&["volume", "update", "v1", "--dtl-mode", "async"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("DTL async"), "{text}");
    assert!(!text.contains("degraded"), "{text}");
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    daemon.wait_for("v1", "DTL in sync", |i| i["dtl_state"] == "ok_sync");
    dtl.kill().unwrap();
    dtl.wait().unwrap();
}

/// Rough edge 7: A DTL address that is not HOST:PORT is refused; one that does not answer is warned about.
#[test]
fn dtl_addresses_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    let out = daemon.cli(&[
        "volume", "create", "v1", "--size", "64M", "--dtl", "notahost",
    ]);
    failed_with(&out, "not HOST:PORT");
    assert!(info_err(&daemon, "v1").contains("does not exist"));
    let out = daemon.cli(&[
        "volume",
        "create",
        "v2",
        "--size",
        "64M",
        "--dtl",
        "127.0.0.1:1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("warning") && err.contains("127.0.0.1:1") && err.contains("not reachable"),
        "{err}"
    );
    daemon.create_volume("v3", "64M");
    let out = daemon.cli(&["volume", "update", "v3", "--dtl", "127.0.0.1:1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("not reachable"), "{}", stderr(&out));
    let out = daemon.cli(&["volume", "update", "v3", "--dtl", "nowhere:port"]);
    failed_with(&out, "not HOST:PORT");
}

/// Rough edge 8: On a fenced node, `volume delete` is refused instead of deleting the volume locally.
#[test]
fn fenced_node_refuses_to_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(tmp.path());
    let dir = tmp.path().join("n1");
    std::fs::create_dir_all(&dir).unwrap();
    let node = Daemon::start_with(&dir, &["--registry", &etcd.url(), "--node", "n1"]);
    node.create_volume("v1", "64M");
    // The registry goes away: with no peer to say otherwise, the node fences itself.
    etcd.kill9();
    poll("n1 fenced", Duration::from_secs(60), || {
        let out = node.cli(&["volume", "info", "v1", "--json"]);
        let info: Value = serde_json::from_slice(&out.stdout).ok()?;
        (info["state"] == "fenced").then_some(())
    });
    let out = node.cli(&["volume", "delete", "v1"]);
    let err = failed_with(&out, "fenced");
    assert!(err.contains("not deleted"), "{err}");
    assert!(!stdout(&out).contains("deleted volume"), "{}", stdout(&out));
    // Still there, data and all.
    let info = node.info("v1");
    assert_eq!(info["name"], "v1");
    assert!(node.backend_dir("v1").exists());
}

/// Rough edge 9: A bad snapshot name is reported as a bad *snapshot* name.
#[test]
fn bad_snapshot_name_is_called_a_snapshot_name() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("v1", "64M");
    let out = daemon.cli(&["snapshot", "create", "v1", ".hidden"]);
    let err = failed_with(&out, "invalid snapshot name \".hidden\"");
    assert!(!err.contains("volume name"), "{err}");
}

/// Rough edge 10: The shrink error shows sizes a human reads.
#[test]
fn shrink_error_shows_readable_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("v1", "1G");
    let out = daemon.cli(&["volume", "resize", "v1", "--size", "512M"]);
    let err = failed_with(&out, "cannot shrink from 1 GiB to 512 MiB");
    assert!(!err.contains("1073741824"), "{err}");
}

/// Rough edge 11: `GB` is not silently taken as GiB: decimal units are refused with what to write instead;
/// binary ones are accepted, and `--help` says which is which.
#[test]
fn size_units_are_explicit() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    let out = daemon.cli(&["volume", "create", "v1", "--size", "10GB"]);
    failed_with(&out, "write 10G or 10GiB");
    assert!(info_err(&daemon, "v1").contains("does not exist"));
    daemon.create_volume("v1", "2GiB");
    assert_eq!(daemon.info("v1")["size"], 2u64 << 30);
    daemon.create_volume("v2", "2G");
    assert_eq!(daemon.info("v2")["size"], 2u64 << 30);
    let help = stdout(&vstor(&["volume", "create", "--help"]));
    assert!(help.contains("powers of 1024"), "{help}");
}

/// Rough edge 12: `volume list` columns stay aligned with long names and show parent and flags.
#[test]
fn volume_list_aligns_long_names_and_shows_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    let long = "a-rather-long-volume-name-of-forty-chars";
    assert_eq!(long.len(), 40);
    daemon.create_volume(long, "64M");
    daemon.create_volume("gold", "64M");
    daemon.cli_ok(&["template", "set", "gold"]);
    daemon.cli_ok(&["clone", "create", "web", "--from", "gold"]);
    daemon.create_volume("ro", "64M");
    daemon.cli_ok(&["volume", "update", "ro", "--read-only", "true"]);
    let list = daemon.cli_ok(&["volume", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    let header = lines[0];
    let state = header.find("STATE").unwrap();
    let flags = header.find("FLAGS").unwrap();
    let parent = header.find("PARENT").unwrap();
    for line in &lines[1..] {
        assert_eq!(line.find("running"), Some(state), "{list}");
        assert!(line.len() > parent, "{list}");
    }
    let row = |name: &str| {
        *lines
            .iter()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {list}"))
    };
    assert_eq!(&row("gold")[flags..flags + 11], "ro,template");
    assert_eq!(&row("ro")[flags..flags + 3], "ro ");
    assert!(row("web")[parent..].starts_with("gold@template"), "{list}");
    assert!(row(long)[parent..].starts_with('-'), "{list}");
}

/// Rough edge 13: `volume info` of a volume that failed to open shows why instead of an error.
#[test]
fn info_of_a_failed_volume_shows_why() {
    let tmp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(tmp.path());
    daemon.create_volume("v1", "64M");
    daemon.terminate();
    // Its write buffer and its backend data are gone: the restart cannot open it.
    std::fs::remove_dir_all(daemon.data_dir.join("write-buffer").join("v1")).unwrap();
    std::fs::remove_dir_all(daemon.backend_dir("v1")).unwrap();
    daemon.launch();
    let out = daemon.cli(&["volume", "info", "v1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("failed"), "{text}");
    let info = daemon.info("v1");
    assert_eq!(info["state"], "failed");
    let reason = info["halted_reason"].as_str().unwrap();
    assert!(!reason.is_empty(), "{info}");
    assert!(text.contains(reason), "{text}");
}

/// Rough edge 14: A template cannot be resized.
#[test]
fn template_cannot_be_resized() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("gold", "64M");
    daemon.cli_ok(&["template", "set", "gold"]);
    let out = daemon.cli(&["volume", "resize", "gold", "--size", "128M"]);
    failed_with(&out, "template");
    assert_eq!(daemon.info("gold")["size"], 64u64 << 20);
}

/// Rough edge 15: Data waiting in the open SCO is not shown as "uploading".
#[test]
fn list_does_not_call_buffered_data_uploading() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("v1", "64M");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &daemon.uri("v1"), "-c", "write -P 7 0 64k"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let info = daemon.info("v1");
    assert!(info["not_uploaded_bytes"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(info["upload_queue"], 0, "{info}");
    let list = daemon.cli_ok(&["volume", "list"]);
    assert!(!list.contains("UPLOADING"), "{list}");
    assert!(
        list.lines().next().unwrap().contains("NOT UPLOADED"),
        "{list}"
    );
}

/// Rough edge 16: A second node on a shared backend starts although the default volume exists.
#[test]
fn second_node_on_a_shared_backend_skips_the_existing_default_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = tmp.path().join("backend");
    let backend_arg = backend.to_str().unwrap();
    let first = Serve::start(&tmp.path().join("a"), &["--backend", backend_arg]).unwrap();
    let out = vstor(&["volume", "info", "vol0", "--json", "--api", &first.api]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = Serve::start(&tmp.path().join("b"), &["--backend", backend_arg])
        .unwrap_or_else(|log| panic!("the second node did not start: {log}"));
    let list = stdout(&vstor(&["volume", "list", "--api", &second.api]));
    assert!(list.contains("no volumes"), "{list}");
    let log = std::fs::read_to_string(tmp.path().join("b.log")).unwrap();
    assert!(log.contains("--no-default-volume"), "{log}");
    // The first node's vol0 is untouched.
    let out = vstor(&["volume", "info", "vol0", "--json", "--api", &first.api]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Rough edge 17: `--write-buffer-limit 0` is refused at start.
#[test]
fn zero_write_buffer_limit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let err = common::serve_fails(&tmp.path().join("d"), &["--write-buffer-limit", "0"]);
    assert!(
        err.contains("write_buffer_limit") && err.contains("at least"),
        "{err}"
    );
}

/// Rough edge 18: Help explains NAME and --size, and shows no default the config file overrides.
#[test]
fn help_explains_name_and_size_without_misleading_defaults() {
    let help = stdout(&vstor(&["volume", "create", "--help"]));
    let line_of = |needle: &str| {
        let lines: Vec<&str> = help.lines().collect();
        let i = lines
            .iter()
            .position(|l| l.trim_start().starts_with(needle))
            .unwrap_or_else(|| panic!("{needle} not in {help}"));
        format!("{} {}", lines[i], lines.get(i + 1).unwrap_or(&""))
    };
    assert!(line_of("<NAME>").contains("Volume name"), "{help}");
    assert!(line_of("--size").contains("Size of the volume"), "{help}");
    for stale in ["[default: 64M]", "[default: 1G]"] {
        assert!(!help.contains(stale), "{help}");
    }
    assert!(help.contains("config file"), "{help}");
    let help = stdout(&vstor(&["volume", "resize", "--help"]));
    assert!(help.contains("New size"), "{help}");
}

/// Rough edge 19: Every docs page the README links exists, and every snapshot verb is in the README.
#[test]
fn readme_documents_what_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut pages = 0;
    for (i, _) in readme.match_indices("docs/") {
        let rest = &readme[i..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "/-_.".contains(c)))
            .unwrap_or(rest.len());
        let path = rest[..end].trim_end_matches('.');
        if path.ends_with(".md") || path.ends_with(".toml") || path.ends_with(".json") {
            assert!(
                root.join(path).exists(),
                "README links {path}, which does not exist"
            );
            pages += 1;
        }
    }
    assert!(pages >= 2, "{pages}");
    let help = stdout(&vstor(&["snapshot", "--help"]));
    let verbs: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|v| *v != "help" && !v.starts_with('-') && !v.ends_with(':'))
        .take_while(|v| v.chars().all(|c| c.is_ascii_lowercase()))
        .collect();
    assert!(verbs.contains(&"unexport"), "{verbs:?}");
    for verb in verbs {
        assert!(
            readme.contains(&format!("vstor snapshot {verb}")),
            "README does not mention `vstor snapshot {verb}`"
        );
    }
}

/// Packaging: completions and man pages are generated from the CLI and name its commands; the
/// systemd units' command lines are ones the binary accepts, and `systemctl reload` sends the
/// signal that re-reads credentials.
#[test]
fn completions_man_pages_and_systemd_units() {
    for shell in ["bash", "zsh", "fish"] {
        let out = vstor(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        // fish spells long flags `-l write-buffer-limit`, bash and zsh `--write-buffer-limit`.
        for word in ["volume", "snapshot", "serve", "write-buffer-limit"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = vstor(&["man", tmp.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let main = std::fs::read_to_string(tmp.path().join("vstor.1")).unwrap();
    assert!(
        main.starts_with(".ie") || main.contains(".TH vstor 1"),
        "{main}"
    );
    assert!(
        main.contains("volume") && main.contains("snapshot"),
        "{main}"
    );
    let create = std::fs::read_to_string(tmp.path().join("vstor-volume-create.1")).unwrap();
    assert!(create.contains("Size of the volume"), "{create}");
    assert!(tmp.path().join("vstor-serve.1").exists());

    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&units).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{} has no ExecStart", path.display()));
        // The binary's own parser accepts the flags: `${VAR}` is the unit's default from its
        // `Environment=` lines, a bare `$VAR` (optional extra flags) is left out.
        let env: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("Environment="))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (format!("${{{k}}}"), v.to_string()))
            .collect();
        let args: Vec<String> = exec
            .split_whitespace()
            .skip(1)
            .map(|a| {
                env.iter()
                    .find(|(k, _)| k == a)
                    .map_or_else(|| a.to_string(), |(_, v)| v.clone())
            })
            .filter(|a| !a.starts_with('$'))
            .collect();
        let mut check: Vec<&str> = args.iter().map(String::as_str).collect();
        check.push("--help");
        let out = vstor(&check);
        assert!(
            out.status.success(),
            "{}: {args:?}: {}",
            path.display(),
            stderr(&out)
        );
        // `systemctl reload` is how an operator hands renewed certificates to the process
        // (`credentials`: SIGHUP).
        assert!(
            text.lines()
                .any(|l| l == "ExecReload=/bin/kill -HUP $MAINPID"),
            "{} has no ExecReload sending SIGHUP",
            path.display()
        );
        seen.push(args[0].clone());
    }
    seen.sort();
    assert_eq!(seen, ["dtl", "mds", "osd", "serve"]);
}

//! The web dashboard in a real browser: a node with a volume under NBD write load, the page
//! driven by headless Debian chromium through selenium (`tests/dashboard/dashboard_test.py`):
//! volume list, live IOPS and latency graphs, snapshot, create and delete through the UI. The
//! node's API then confirms what the UI did.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::process::Command;

use common::oracle::{start_writers, stop_writers, wait_progress, Load, Mode};
use common::{require_tool, Daemon};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/dashboard/dashboard_test.py"
);

#[test]
fn the_dashboard_shows_live_volumes_and_its_actions_work() {
    dashboard_flow(None);
}

/// The node needs an API token: the page asks for it (a wrong one is refused), keeps it for the
/// tab, and then works as without one.
#[test]
fn the_dashboard_asks_for_the_api_token_and_works_with_it() {
    dashboard_flow(Some("dashboard-token-5f1c"));
}

fn dashboard_flow(token: Option<&str>) {
    require_tool("chromium");
    require_tool("chromedriver");
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("api-token");
    let daemon = match token {
        Some(token) => {
            std::fs::write(&token_file, format!("{token}\n")).unwrap();
            Daemon::start_with(
                tmp.path(),
                &["--api-token-file", token_file.to_str().unwrap()],
            )
        }
        None => Daemon::start(tmp.path()),
    };
    daemon.create_volume("vol", "64M");
    daemon.create_volume("doomed", "16M");
    let load = Load::new();
    let writers = start_writers(&daemon.nbd, "vol", Mode::Sync, &load);
    wait_progress(&load, &writers, 100, "warm-up");

    // Kept after the test (target/tmp/dashboard*.png) for a human to look at.
    let name = if token.is_some() {
        "dashboard-token.png"
    } else {
        "dashboard.png"
    };
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("python3")
        .arg(SCRIPT)
        .arg(format!("http://{}/", daemon.api))
        .arg(&shot)
        .args(token)
        .env("SE_OFFLINE", "true")
        .output()
        .expect("run python3");
    stop_writers(&load, writers);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    assert_eq!(daemon.info("fromui")["size"], 32u64 << 20);
    assert!(!daemon.cli(&["volume", "info", "doomed"]).status.success());
    let snaps = daemon.cli_ok(&["snapshot", "list", "vol"]);
    assert!(snaps.contains("ui-snap"), "{snaps}");
}

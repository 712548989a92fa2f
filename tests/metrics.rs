//! What an operator sees of a running node: `GET /metrics` read by a Prometheus text parser
//! (names, labels, histograms that move after real I/O from qemu-io), and `vstor volume stats`
//! and `vstor top` under a live NBD write load.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use crate::common;

use std::collections::BTreeMap;
use std::process::Command;

use common::oracle::{start_writers, stop_writers, wait_progress, Load, Mode};
use common::{require_tool, run_ok, Daemon};
use prometheus_parse::{Sample, Scrape, Value};

fn scrape(daemon: &Daemon) -> Scrape {
    let mut response = ureq::get(format!("http://{}/metrics", daemon.api))
        .call()
        .unwrap();
    let content_type = response
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(content_type.contains("openmetrics-text"), "{content_type}");
    let text = response.body_mut().read_to_string().unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

fn labelled<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

/// The histogram of `op` on volume `vol`: its count and its cumulative buckets.
fn histogram(scrape: &Scrape, op: &str) -> (u64, Vec<(f64, u64)>) {
    histogram_of(
        scrape,
        "vstor_volume_io_latency_seconds",
        &[("volume", "vol"), ("op", op)],
    )
}

fn histogram_of(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> (u64, Vec<(f64, u64)>) {
    let op = labels
        .iter()
        .find(|(k, _)| *k == "op")
        .map_or("", |(_, v)| *v);
    let samples = labelled(scrape, metric, labels);
    assert_eq!(samples.len(), 1, "one histogram for op={op}");
    match &samples[0].value {
        Value::Histogram(buckets) => {
            let cumulative: Vec<(f64, u64)> = buckets
                .iter()
                .map(|b| (b.less_than, b.count as u64))
                .collect();
            (cumulative.last().map_or(0, |b| b.1), cumulative)
        }
        other => panic!("op={op} is not a histogram: {other:?}"),
    }
}

fn counter(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let samples = labelled(scrape, metric, labels);
    assert_eq!(samples.len(), 1, "{metric} {labels:?}: {samples:?}");
    match samples[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{metric} is {other:?}"),
    }
}

#[test]
fn metrics_parse_and_the_histograms_move_after_io() {
    require_tool("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("vol", "64M");
    let before = scrape(&daemon);
    let (writes_before, _) = histogram(&before, "write");
    let (reads_before, _) = histogram(&before, "read");

    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &daemon.uri("vol"),
        "-c",
        "write -P 0x11 0 1M",
        "-c",
        "write -P 0x12 1M 64k",
        "-c",
        "flush",
        "-c",
        "read -P 0x11 0 1M",
        "-c",
        "discard 2M 1M",
    ]));
    let after = scrape(&daemon);
    let (writes, buckets) = histogram(&after, "write");
    let (reads, _) = histogram(&after, "read");
    assert!(writes > writes_before, "{writes_before} -> {writes}");
    assert!(reads > reads_before, "{reads_before} -> {reads}");
    assert!(histogram(&after, "flush").0 >= 1);
    assert!(histogram(&after, "discard").0 >= 1);
    // Cumulative buckets never decrease and end at +Inf with the count.
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{buckets:?}"
    );
    assert_eq!(buckets.last().unwrap().0, f64::INFINITY);

    // Counters match what qemu-io did; the volume's gauges and the process are there.
    let written = counter(
        &after,
        "vstor_volume_io_bytes_total",
        &[("volume", "vol"), ("op", "write")],
    );
    assert!(written >= f64::from((1 << 20) + (64 << 10)), "{written}");
    assert!(
        counter(
            &after,
            "vstor_volume_ops_total",
            &[("volume", "vol"), ("op", "read")]
        ) >= 1.0
    );
    assert_eq!(
        counter(&after, "vstor_volume_size_bytes", &[("volume", "vol")]),
        f64::from(64 << 20)
    );
    assert_eq!(
        counter(
            &after,
            "vstor_volume_state",
            &[("volume", "vol"), ("state", "running")]
        ),
        1.0
    );
    assert!(counter(&after, "vstor_process_resident_memory_bytes", &[]) > 1e6);
    // The backend's requests are timed too (creating the volume put its configuration).
    let (puts, _) = histogram_of(
        &after,
        "vstor_backend_request_latency_seconds",
        &[("op", "put")],
    );
    assert!(puts >= 1, "{puts}");
    assert_eq!(
        counter(&after, "vstor_backend_errors_total", &[("op", "put")]),
        0.0
    );
    // The vhost-user server's polling counter is there (no vhost-user client here: NBD only).
    assert_eq!(counter(&after, "vstor_vhost_polled_total", &[]), 0.0);
    // Every name follows the conventions: a vstor_ prefix, lower snake case.
    let names: BTreeMap<&str, ()> = after
        .samples
        .iter()
        .map(|s| (s.metric.as_str(), ()))
        .collect();
    for name in names.keys() {
        assert!(
            name.starts_with("vstor_") && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{name}"
        );
    }
    // A deleted volume's series are gone.
    daemon.cli_ok(&["volume", "delete", "vol"]);
    assert!(labelled(
        &scrape(&daemon),
        "vstor_volume_size_bytes",
        &[("volume", "vol")]
    )
    .is_empty());
}

#[test]
fn volume_stats_and_top_show_a_live_load() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("vol", "64M");
    daemon.create_volume("idle", "16M");
    let load = Load::new();
    let writers = start_writers(&daemon.nbd, "vol", Mode::Sync, &load);
    wait_progress(&load, &writers, 200, "warm-up");

    let out = daemon.cli_ok(&["volume", "stats", "vol", "--interval", "500ms", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(stats["write_iops"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(
        stats["write_bytes_per_second"].as_f64().unwrap() > 0.0,
        "{stats}"
    );
    let write = stats["ops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["op"] == "write")
        .unwrap();
    let (p50, p99) = (
        write["p50_ms"].as_f64().unwrap(),
        write["p99_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{write}");

    let out = daemon.cli_ok(&["top", "--interval", "300ms", "--count", "2", "--json"]);
    let refreshes: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('['))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(refreshes.len(), 2, "{out}");
    let rows = refreshes[1].as_array().unwrap();
    let row = |name: &str| rows.iter().find(|r| r["name"] == name).unwrap();
    assert!(row("vol")["write_iops"].as_f64().unwrap() > 0.0, "{out}");
    assert_eq!(row("idle")["write_iops"].as_f64().unwrap(), 0.0, "{out}");
    let text = daemon.cli_ok(&["top", "--interval", "200ms", "--count", "1"]);
    assert!(text.contains("W p99 ms") && text.contains("vol"), "{text}");
    stop_writers(&load, writers);

    let err = daemon.cli(&["volume", "stats", "nosuch"]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("nosuch"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
}

/// `docs/grafana-dashboard.json` only queries series a node exports: every `vstor_…` name in
/// its expressions appears in a live scrape (with the suffixes Prometheus adds).
#[test]
fn the_grafana_dashboard_queries_metrics_that_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("vol", "16M");
    let text = common::metrics_text(&daemon.api);
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            for name in common::metric_names(target["expr"].as_str().unwrap()) {
                assert!(
                    common::scrape_has(&text, &name),
                    "panel {:?} queries {name}, which the node does not export",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 15, "{queried}");
}

/// `docs/prometheus-alerts.yml` is valid (`promtool check rules`), each alert fires on the series
/// it is meant for and stays quiet on the others (`promtool test rules` with
/// `docs/prometheus-alerts.test.yml`), and every node metric it queries is one a node exports.
/// The EC tier's repair series are checked in `osd_health_is_exported_on_the_ec_tier`, the
/// edge's in `tests/edge.rs`.
#[test]
fn the_alert_rules_pass_promtool_and_query_metrics_that_exist() {
    require_tool("promtool");
    let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");
    for args in [
        ["check", "rules", "prometheus-alerts.yml"],
        ["test", "rules", "prometheus-alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(docs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(tmp.path());
    daemon.create_volume("vol", "16M");
    let text = common::metrics_text(&daemon.api);
    let checked = common::assert_alerted_metrics_exported(&text, |m| {
        !m.starts_with("vstor_tier_repair_") && !m.starts_with("vstor_edge_")
    });
    assert!(checked >= 12, "{checked}");
}

/// On the erasure-coded tier, `/metrics` and `GET /v1/osds` show every OSD's state, and a
/// killed OSD turns `down` there.
#[test]
fn osd_health_is_exported_on_the_ec_tier() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tier = common::tier::Tier::start(tmp.path(), 3, 3);
    let node = tier.node("n1", &[]);
    let up = |daemon: &Daemon| {
        let scrape = scrape(daemon);
        labelled(&scrape, "vstor_osd_state", &[("state", "up")]).len()
    };
    assert_eq!(up(&node), 3);
    let osds: Vec<serde_json::Value> = serde_json::from_str(
        &ureq::get(format!("http://{}/v1/osds", node.api))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(osds.len(), 3, "{osds:?}");
    assert!(
        osds.iter()
            .all(|o| o["state"] == "up" && o["writable"] == true),
        "{osds:?}"
    );

    tier.osds[0].kill9();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while up(&node) != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed OSD never showed down"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let scraped = scrape(&node);
    assert_eq!(
        labelled(&scraped, "vstor_osd_state", &[("state", "down")]).len(),
        1
    );
    // The background repair ran (its start-up pass, or the map change) and says so.
    while counter(
        &scrape(&node),
        "vstor_tier_repair_passes_total",
        &[("node", "n1")],
    ) < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no background repair pass was counted"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The alert rules' EC series exist on a tier node.
    let text = common::metrics_text(&node.api);
    let checked = common::assert_alerted_metrics_exported(&text, |m| {
        m.starts_with("vstor_tier_repair_") || m.starts_with("vstor_osd_")
    });
    assert!(checked >= 3, "{checked}");
}

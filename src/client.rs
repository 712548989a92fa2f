//! The CLI side of the management API: `vstor volume|snapshot|clone|template ...` verbs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::size::format_size;

pub struct Client {
    base: String,
    addr: String,
    agent: ureq::Agent,
    /// The daemon the CLI expects at `addr`, for the "cannot reach" hint.
    daemon: &'static str,
}

impl Client {
    pub fn new(addr: &str) -> Self {
        Self::with_timeout(addr, Some(Duration::from_secs(300)))
    }

    /// For requests that take as long as the work they start (scrubbing, cloning).
    pub fn without_timeout(addr: &str) -> Self {
        Self::with_timeout(addr, None)
    }

    fn with_timeout(addr: &str, timeout: Option<Duration>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(timeout)
            .build()
            .into();
        Self {
            base: format!("http://{addr}"),
            addr: addr.to_string(),
            agent,
            daemon: "vstor serve",
        }
    }

    /// A client of a `vstor edge` daemon's API.
    pub fn edge(addr: &str) -> Self {
        Self {
            daemon: "vstor edge",
            ..Self::new(addr)
        }
    }

    fn handle(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let mut response = result.map_err(|e| {
            anyhow!(
                "cannot reach the vstor daemon at {} ({e}); is `{}` running? (set --api or VSTOR_API)",
                self.addr,
                self.daemon
            )
        })?;
        let status = response.status();
        let body: Value = response
            .body_mut()
            .read_json()
            .with_context(|| format!("daemon at {} sent a reply that is not JSON", self.addr))?;
        if !status.is_success() {
            let message = body
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| format!("daemon answered {status}"), str::to_string);
            bail!(message);
        }
        Ok(body)
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.handle(self.agent.get(format!("{}{path}", self.base)).call())
    }

    pub fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.handle(
            self.agent
                .post(format!("{}{path}", self.base))
                .send_json(body),
        )
    }

    pub fn patch(&self, path: &str, body: Value) -> Result<Value> {
        self.handle(
            self.agent
                .patch(format!("{}{path}", self.base))
                .send_json(body),
        )
    }

    pub fn delete(&self, path: &str) -> Result<Value> {
        self.handle(self.agent.delete(format!("{}{path}", self.base)).call())
    }
}

fn size_of(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_u64)
        .map_or_else(|| "-".into(), format_size)
}

fn text(value: &Value, key: &str) -> String {
    match value.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

pub fn print_list(volumes: &Value) {
    let empty = Vec::new();
    let volumes = volumes.as_array().unwrap_or(&empty);
    if volumes.is_empty() {
        println!("no volumes");
        return;
    }
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:<10} {:>7} {:<16}",
        "NAME", "SIZE", "WRITTEN", "UPLOADING", "STATE", "CLIENTS", "OWNER"
    );
    for volume in volumes {
        println!(
            "{:<24} {:>10} {:>10} {:>10} {:<10} {:>7} {:<16}",
            text(volume, "name"),
            size_of(volume, "size"),
            size_of(volume, "written_bytes"),
            size_of(volume, "not_uploaded_bytes"),
            match volume.get("moved_to").and_then(Value::as_str) {
                Some(node) => format!("moved to {node}"),
                None => text(volume, "state"),
            },
            text(volume, "nbd_connections"),
            text(volume, "owner"),
        );
    }
}

/// `vstor node list`.
pub fn print_nodes(nodes: &Value) {
    let empty = Vec::new();
    let nodes = nodes.as_array().unwrap_or(&empty);
    println!(
        "{:<16} {:<12} {:<12} {:<6} {:>7}  {:<21} {:<21} {:<21} {:<21}",
        "NODE", "DOMAIN", "RECOVERY", "ALIVE", "VOLUMES", "API", "NBD", "DTL", "EDGE"
    );
    for node in nodes {
        println!(
            "{:<16} {:<12} {:<12} {:<6} {:>7}  {:<21} {:<21} {:<21} {:<21}",
            text(node, "name"),
            text(node, "domain"),
            text(node, "recovery_domain"),
            if node["alive"] == true { "yes" } else { "no" },
            text(node, "volumes"),
            text(node, "api_addr"),
            text(node, "nbd_addr"),
            text(node, "dtl_addr"),
            text(node, "edge_addr"),
        );
    }
}

/// `1714567890` → `2024-05-01 12:51:30Z` (UTC).
pub fn format_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn print_snapshots(volume: &str, snapshots: &Value) {
    let empty = Vec::new();
    let snapshots = snapshots.as_array().unwrap_or(&empty);
    if snapshots.is_empty() {
        println!("volume {volume} has no snapshots");
        return;
    }
    println!(
        "{:<24} {:<20} {:>10} {:<10} CLONES",
        "NAME", "CREATED", "WRITTEN", "ON BACKEND"
    );
    for snapshot in snapshots {
        let clones: Vec<&str> = snapshot["clones"]
            .as_array()
            .map(|c| c.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "{:<24} {:<20} {:>10} {:<10} {}",
            text(snapshot, "name"),
            snapshot["created"]
                .as_u64()
                .map_or_else(|| "-".into(), format_time),
            size_of(snapshot, "written_bytes"),
            if snapshot["in_backend"] == true {
                "yes"
            } else {
                "no"
            },
            if clones.is_empty() {
                "-".to_string()
            } else {
                clones.join(",")
            },
        );
    }
}

fn progress_text(progress: &Value) -> String {
    format!(
        "{} {}/{}",
        text(progress, "phase"),
        text(progress, "done"),
        text(progress, "total")
    )
}

fn scrub_summary(report: &Value) -> String {
    format!(
        "{} SCOs rewritten, {} deleted, {} copied, {} freed, {} orphaned objects deleted, TLogs {} -> {}",
        text(report, "scos_rewritten"),
        text(report, "scos_deleted"),
        size_of(report, "bytes_copied"),
        size_of(report, "bytes_freed"),
        text(report, "orphans_deleted"),
        text(report, "tlogs_before"),
        text(report, "tlogs_after"),
    )
}

pub fn print_scrub(report: &Value) {
    println!(
        "scrubbed volume {} in {:.1} s: {}",
        text(report, "volume"),
        report["seconds"].as_f64().unwrap_or(0.0),
        scrub_summary(report)
    );
}

/// Prints a volume's scrub progress on stderr while a scrub request runs (polling its info).
pub struct ProgressPrinter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProgressPrinter {
    pub fn start(api: &str, volume: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let client = Client::new(api);
        let path = format!("/v1/volumes/{volume}");
        let volume = volume.to_string();
        let thread = std::thread::spawn(move || {
            let mut last = String::new();
            // Quick answers (a refusal, a small volume) print no progress.
            std::thread::park_timeout(Duration::from_millis(500));
            while !flag.load(Ordering::SeqCst) {
                if let Ok(info) = client.get(&path) {
                    let progress = &info["scrub_progress"];
                    if !progress.is_null() {
                        let line = progress_text(progress);
                        if line != last {
                            eprintln!("scrub {volume}: {line}");
                            last = line;
                        }
                    }
                }
                std::thread::park_timeout(Duration::from_millis(250));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

pub fn print_info(volume: &Value) {
    let scrub = if !volume["scrub_progress"].is_null() {
        format!("running: {}", progress_text(&volume["scrub_progress"]))
    } else if let Some(last) = volume["last_scrub"].as_object() {
        let when = last
            .get("finished")
            .and_then(Value::as_u64)
            .map_or_else(|| "-".into(), format_time);
        match last.get("error").and_then(Value::as_str) {
            Some(error) => format!("last one failed at {when}: {error}"),
            None => format!(
                "last one at {when} ({}): {}",
                text(&volume["last_scrub"], "trigger"),
                scrub_summary(&volume["last_scrub"]["report"])
            ),
        }
    } else {
        "-".into()
    };
    let children: Vec<&str> = volume["children"]
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let rows: Vec<(&str, String)> = vec![
        ("name", text(volume, "name")),
        ("owner", text(volume, "owner")),
        ("state", text(volume, "state")),
        ("halted reason", text(volume, "halted_reason")),
        ("size", size_of(volume, "size")),
        ("written", size_of(volume, "written_bytes")),
        ("on backend", size_of(volume, "backend_bytes")),
        ("garbage", size_of(volume, "garbage_bytes")),
        ("read-only", text(volume, "read_only")),
        ("template", text(volume, "template")),
        ("parent", text(volume, "parent")),
        (
            "clones",
            if children.is_empty() {
                "-".into()
            } else {
                children.join(", ")
            },
        ),
        ("snapshots", text(volume, "snapshots")),
        ("scrub", scrub),
        ("SCO size", size_of(volume, "sco_size")),
        ("write buffer budget", size_of(volume, "write_buffer")),
        ("in write buffer", size_of(volume, "local_sco_bytes")),
        ("not yet uploaded", size_of(volume, "not_uploaded_bytes")),
        ("upload queue", text(volume, "upload_queue")),
        ("TLogs on backend", text(volume, "tlogs_on_backend")),
        ("throttling", text(volume, "throttling")),
        (
            "DTL",
            format!(
                "{} {} ({}, backlog {}, last error: {})",
                text(volume, "dtl_mode"),
                text(volume, "dtl_addr"),
                text(volume, "dtl_state"),
                size_of(volume, "dtl_backlog_bytes"),
                text(volume, "dtl_last_error")
            ),
        ),
        (
            "throttled writes",
            format!(
                "{} ({} ms)",
                text(volume, "throttled_writes"),
                text(volume, "throttle_ms")
            ),
        ),
        (
            "upload errors",
            format!(
                "{} (last: {})",
                text(volume, "upload_errors"),
                text(volume, "last_upload_error")
            ),
        ),
        (
            "reads / writes",
            format!("{} / {}", text(volume, "reads"), text(volume, "writes")),
        ),
        ("flushes", text(volume, "flushes")),
        ("backend reads", text(volume, "backend_reads")),
        ("NBD export", text(volume, "nbd_uri")),
        ("NBD clients", text(volume, "nbd_connections")),
        ("vhost-user socket", text(volume, "vhost_socket")),
        (
            "vhost-user frontend",
            if volume["vhost_connected"] == true {
                "connected".into()
            } else {
                "none".into()
            },
        ),
    ];
    for (key, value) in rows {
        println!("{:<20} {value}", format!("{key}:"));
    }
}

pub fn create_body(
    name: &str,
    size: u64,
    sco_size: Option<u64>,
    write_buffer: Option<u64>,
) -> Value {
    let mut body = json!({ "name": name, "size": size });
    if let Some(sco) = sco_size {
        body["sco_size"] = json!(sco);
    }
    if let Some(wb) = write_buffer {
        body["write_buffer"] = json!(wb);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(1_714_567_890), "2024-05-01 12:51:30Z");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00Z");
    }
}

//! The CLI side of the management API: `vstor volume ...` verbs.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::size::format_size;

pub struct Client {
    base: String,
    addr: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(addr: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into();
        Self {
            base: format!("http://{addr}"),
            addr: addr.to_string(),
            agent,
        }
    }

    fn handle(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let mut response = result.map_err(|e| {
            anyhow!(
                "cannot reach the vstor daemon at {} ({e}); is `vstor serve` running? (set --api or VSTOR_API)",
                self.addr
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
                .map(str::to_string)
                .unwrap_or_else(|| format!("daemon answered {status}"));
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
        "{:<24} {:>10} {:>10} {:>10} {:<9} {:>7}",
        "NAME", "SIZE", "WRITTEN", "UPLOADING", "STATE", "CLIENTS"
    );
    for volume in volumes {
        println!(
            "{:<24} {:>10} {:>10} {:>10} {:<9} {:>7}",
            text(volume, "name"),
            size_of(volume, "size"),
            size_of(volume, "written_bytes"),
            size_of(volume, "not_uploaded_bytes"),
            text(volume, "state"),
            text(volume, "nbd_connections"),
        );
    }
}

pub fn print_info(volume: &Value) {
    let rows: [(&str, String); 23] = [
        ("name", text(volume, "name")),
        ("state", text(volume, "state")),
        ("halted reason", text(volume, "halted_reason")),
        ("size", size_of(volume, "size")),
        ("written", size_of(volume, "written_bytes")),
        ("read-only", text(volume, "read_only")),
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

//! The CLI side of the management API: `vstor volume|snapshot|clone|template ...` verbs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api_types::{
    ErrorBody, NodeView, ScrubAnswer, ScrubOutcome, ScrubProgress, ScrubReport, SnapshotView,
    VolumeView,
};
use crate::size::format_size;

pub struct Client {
    base: String,
    addr: String,
    agent: ureq::Agent,
    /// The daemon the CLI expects at `addr` and the variable that names it, for the "cannot
    /// reach" hint.
    daemon: &'static str,
    env: &'static str,
}

/// `https://HOST:PORT/` → (`https`, `HOST:PORT`); `http://HOST:PORT/` (the form `vstor serve`
/// prints) or no scheme → (`http`, `HOST:PORT`).
fn api_scheme_host(addr: &str) -> (&'static str, &str) {
    let addr = addr.trim();
    let (scheme, host) = match addr.strip_prefix("https://") {
        Some(host) => ("https", host),
        None => ("http", addr.strip_prefix("http://").unwrap_or(addr)),
    };
    (scheme, host.trim_end_matches('/'))
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
        let outgoing = crate::api_auth::outgoing();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(timeout)
            .tls_config(outgoing.tls_config())
            .build()
            .into();
        let (scheme, addr) = api_scheme_host(addr);
        Self {
            base: format!("{scheme}://{addr}"),
            addr: addr.to_string(),
            agent,
            daemon: "vstor serve",
            env: "VSTOR_API",
        }
    }

    /// A client of a `vstor edge` daemon's API.
    pub fn edge(addr: &str) -> Self {
        Self {
            daemon: "vstor edge",
            env: "VSTOR_EDGE_API",
            ..Self::new(addr)
        }
    }

    fn handle<T: DeserializeOwned>(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T> {
        let mut response = result.map_err(|e| {
            anyhow!(
                "cannot reach the vstor daemon at {} ({e}); is `{}` running? (set --api or {})",
                self.addr,
                self.daemon,
                self.env
            )
        })?;
        let status = response.status();
        let body = response
            .body_mut()
            .read_to_vec()
            .with_context(|| format!("cannot read the answer of the daemon at {}", self.addr))?;
        if status == ureq::http::StatusCode::UNAUTHORIZED {
            let outgoing = crate::api_auth::outgoing();
            match &outgoing.token_source {
                Some(source) => bail!(
                    "{} (the daemon at {} refused the token from {source})",
                    crate::api_auth::NEEDS_TOKEN,
                    self.addr
                ),
                None => bail!(
                    "{} (the daemon at {} was sent none)",
                    crate::api_auth::NEEDS_TOKEN,
                    self.addr
                ),
            }
        }
        if !status.is_success() {
            match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(error) => bail!(error.error),
                Err(_) => bail!("daemon at {} answered {status}", self.addr),
            }
        }
        serde_json::from_slice(&body).with_context(|| {
            format!(
                "daemon at {} sent an answer this CLI does not understand",
                self.addr
            )
        })
    }

    /// `request` with the API token, if this process has one.
    fn authorized<B>(request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match crate::api_auth::outgoing().authorization() {
            Some(value) => request.header("authorization", value),
            None => request,
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.handle(Self::authorized(self.agent.get(format!("{}{path}", self.base))).call())
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.handle(
            Self::authorized(self.agent.post(format!("{}{path}", self.base))).send_json(body),
        )
    }

    pub fn patch<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.handle(
            Self::authorized(self.agent.patch(format!("{}{path}", self.base))).send_json(body),
        )
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.handle(Self::authorized(self.agent.delete(format!("{}{path}", self.base))).call())
    }
}

fn size(value: Option<u64>) -> String {
    value.map_or_else(|| "-".into(), format_size)
}

fn opt<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

fn opt_str(value: Option<&String>) -> String {
    value.map_or_else(|| "-".into(), Clone::clone)
}

pub fn print_json(value: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Print rows under a header, each column as wide as its widest cell (names are up to 128
/// characters). Columns listed in `right` are right-aligned (numbers, sizes).
pub fn print_table(header: &[&str], rows: &[Vec<String>], right: &[usize]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, cell)| {
                let width = widths.get(i).copied().unwrap_or(0);
                if right.contains(&i) {
                    format!("{cell:>width$}")
                } else if i == last {
                    cell
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// `ro`, `template`, `clone` flags of a volume, `-` when none.
fn flags(volume: &VolumeView) -> String {
    let mut flags = Vec::new();
    if volume.read_only == Some(true) {
        flags.push("ro");
    }
    if volume.template == Some(true) {
        flags.push("template");
    }
    if flags.is_empty() {
        "-".into()
    } else {
        flags.join(",")
    }
}

pub fn print_list(volumes: &[VolumeView]) {
    if volumes.is_empty() {
        println!("no volumes");
        return;
    }
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                size(v.size),
                size(v.written_bytes),
                // Not on the backend yet: the open SCO and sealed SCOs waiting for upload.
                size(v.not_uploaded_bytes),
                match &v.moved_to {
                    Some(node) => format!("moved to {node}"),
                    None => v.state.clone(),
                },
                flags(v),
                opt_str(v.parent.as_ref()),
                opt(v.nbd_connections),
                opt_str(v.owner.as_ref()),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "SIZE",
            "WRITTEN",
            "NOT UPLOADED",
            "STATE",
            "FLAGS",
            "PARENT",
            "CLIENTS",
            "OWNER",
        ],
        &rows,
        &[1, 2, 3, 7],
    );
}

/// `vstor node list`.
pub fn print_nodes(nodes: &[NodeView]) {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.domain.clone(),
                opt_str(n.recovery_domain.as_ref()),
                if n.alive { "yes" } else { "no" }.to_string(),
                n.volumes.to_string(),
                n.api_addr.clone(),
                n.nbd_addr.clone(),
                n.dtl_addr.clone(),
                opt_str(n.edge_addr.as_ref()),
                opt_str(n.edge_socket.as_ref()),
            ]
        })
        .collect();
    print_table(
        &[
            "NODE",
            "DOMAIN",
            "RECOVERY",
            "ALIVE",
            "VOLUMES",
            "API",
            "NBD",
            "DTL",
            "EDGE",
            "EDGE SOCKET",
        ],
        &rows,
        &[4],
    );
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

pub fn print_snapshots(volume: &str, snapshots: &[SnapshotView]) {
    if snapshots.is_empty() {
        println!("volume {volume} has no snapshots");
        return;
    }
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                format_time(s.created),
                format_size(s.written_bytes),
                if s.in_backend { "yes" } else { "no" }.to_string(),
                if s.clones.is_empty() {
                    "-".to_string()
                } else {
                    s.clones.join(",")
                },
            ]
        })
        .collect();
    print_table(
        &["NAME", "CREATED", "WRITTEN", "ON BACKEND", "CLONES"],
        &rows,
        &[2],
    );
}

pub fn progress_text(progress: &ScrubProgress) -> String {
    format!("{} {}/{}", progress.phase, progress.done, progress.total)
}

fn scrub_summary(report: &ScrubReport) -> String {
    format!(
        "{} SCOs rewritten, {} deleted, {} copied, {} freed, {} orphaned objects deleted, TLogs {} -> {}",
        report.scos_rewritten,
        report.scos_deleted,
        format_size(report.bytes_copied),
        format_size(report.bytes_freed),
        report.orphans_deleted,
        report.tlogs_before,
        report.tlogs_after,
    )
}

pub fn print_scrub(answer: &ScrubAnswer) {
    println!(
        "scrubbed volume {} in {:.1} s: {}",
        answer.volume,
        answer.seconds,
        scrub_summary(&answer.report)
    );
}

/// Shows a volume's scrub progress while a scrub request runs (polling its info): a progress
/// bar on a terminal, plain lines on stderr otherwise (logs, pipes, CI).
pub struct ProgressPrinter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Whether progress is drawn as bars (stderr is a terminal) or printed as lines.
pub fn on_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// A progress bar of `len` in the style every verb uses (`template` is indicatif's, with
/// `{prefix}` set to `prefix`), or `None` off a terminal: callers then print plain lines.
pub fn progress_bar(template: &str, prefix: &str, len: u64) -> Option<indicatif::ProgressBar> {
    on_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(prefix.to_string());
        bar
    })
}

impl ProgressPrinter {
    pub fn start(api: &str, volume: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let client = Client::new(api);
        let path = format!("/v1/volumes/{volume}");
        let volume = volume.to_string();
        let thread = std::thread::spawn(move || {
            let bar = progress_bar(
                "scrub {prefix}: {msg:>12} [{bar:40}] {pos}/{len} ({elapsed})",
                &volume,
                0,
            );
            let mut last = String::new();
            // Quick answers (a refusal, a small volume) print no progress.
            std::thread::park_timeout(Duration::from_millis(500));
            while !flag.load(Ordering::SeqCst) {
                if let Ok(info) = client.get::<VolumeView>(&path) {
                    if let Some(progress) = &info.scrub_progress {
                        match &bar {
                            Some(bar) => {
                                bar.set_length(progress.total);
                                bar.set_position(progress.done);
                                bar.set_message(progress.phase.clone());
                            }
                            None => {
                                let line = progress_text(progress);
                                if line != last {
                                    eprintln!("scrub {volume}: {line}");
                                    last = line;
                                }
                            }
                        }
                    }
                }
                std::thread::park_timeout(Duration::from_millis(250));
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
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

/// A request that runs as long as its work (a clone waiting for its snapshot to reach the
/// backend, a move): a spinner with the elapsed time on a terminal, nothing otherwise (the
/// verb's result line says what happened; scripts get one line).
pub struct Waiting(Option<indicatif::ProgressBar>);

impl Waiting {
    pub fn start(what: &str) -> Self {
        if !on_terminal() {
            return Self(None);
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Self(Some(bar))
    }

    pub fn done(self) {
        if let Some(bar) = self.0 {
            bar.finish_and_clear();
        }
    }
}

fn last_scrub_text(last: &ScrubOutcome) -> String {
    let when = format_time(last.finished);
    let text = match (&last.error, &last.report) {
        (Some(error), _) => format!("last one failed at {when}: {error}"),
        (None, Some(report)) => format!(
            "last one at {when} ({}): {}",
            last.trigger,
            scrub_summary(report)
        ),
        (None, None) => format!("last one at {when} ({})", last.trigger),
    };
    if last.behind {
        format!(
            "{text}; FALLING BEHIND: the writes made {} of garbage while it ran (raise [scrub] rate)",
            crate::size::format_size(last.garbage_after)
        )
    } else {
        text
    }
}

/// The volume's MDSes (`master A, slaves B (2 behind), C (unreachable)`) and how its last
/// restart got its map.
fn mds_text(v: &VolumeView) -> String {
    let took = match v.opened_in_us {
        Some(us) if us > 0 => format!(" in {:.1} ms", us as f64 / 1000.0),
        _ => String::new(),
    };
    let opened = match (v.opened_from_mds_tlogs, v.opened_replayed_tlogs) {
        (Some(seeded), Some(replayed)) if seeded > 0 => {
            format!("; last open: {seeded} TLogs from the MDS, {replayed} replayed{took}")
        }
        (Some(_), Some(replayed)) => format!("; last open: {replayed} TLogs replayed{took}"),
        _ => String::new(),
    };
    let Some(mds) = &v.mds else {
        return format!("-{opened}");
    };
    let servers: Vec<String> = mds
        .servers
        .iter()
        .map(|s| {
            let state = match (s.reachable, s.behind, &s.error) {
                (false, _, _) => "unreachable".to_string(),
                (true, Some(b), _) => format!("{b} behind"),
                (true, None, Some(e)) => e.clone(),
                (true, None, None) => "?".to_string(),
            };
            format!("{} {} ({state})", s.role, s.addr)
        })
        .collect();
    let problem = mds
        .problem
        .as_ref()
        .map_or_else(String::new, |p| format!("; problem: {p}"));
    format!(
        "{}; promotions {}{problem}{opened}",
        servers.join(", "),
        mds.promotions
    )
}

/// Encryption at rest for humans: `aes-256-xts (key 0123abcd…, /path/to/key)`, `none` for a
/// plaintext volume, `-` when unknown (a volume answered from the registry).
fn encryption_text(volume: &VolumeView) -> String {
    match (&volume.encryption, volume.size) {
        (Some(mode), _) => format!(
            "{mode} (key {}, file {})",
            opt_str(volume.encryption_key_fingerprint.as_ref()),
            opt_str(volume.encryption_key_file.as_ref())
        ),
        (None, Some(_)) if volume.cluster_size.is_some() => "none".into(),
        (None, _) => "-".into(),
    }
}

/// The NBD allow list for humans: `any` when empty, else `subjects CN, CN; networks CIDR, CIDR`.
pub fn allow_list_text(volume: &VolumeView) -> String {
    allow_text(
        volume.allow_subjects.as_deref().unwrap_or_default(),
        volume.allow_networks.as_deref().unwrap_or_default(),
    )
}

/// [`allow_list_text`] of a list given as its parts (also `vstor edge list`).
pub fn allow_text(subjects: &[String], networks: &[String]) -> String {
    let mut parts = Vec::new();
    if !subjects.is_empty() {
        parts.push(format!("subjects {}", subjects.join(", ")));
    }
    if !networks.is_empty() {
        parts.push(format!("networks {}", networks.join(", ")));
    }
    if parts.is_empty() {
        "any".into()
    } else {
        parts.join("; ")
    }
}

pub fn print_info(volume: &VolumeView) {
    let scrub = match (&volume.scrub_progress, &volume.last_scrub) {
        (Some(progress), _) => format!("running: {}", progress_text(progress)),
        (None, Some(last)) => last_scrub_text(last),
        (None, None) => "-".into(),
    };
    let v = volume;
    let rows: Vec<(&str, String)> = vec![
        ("name", v.name.clone()),
        ("owner", opt_str(v.owner.as_ref())),
        ("state", v.state.clone()),
        ("halted reason", opt_str(v.halted_reason.as_ref())),
        ("size", size(v.size)),
        ("written", size(v.written_bytes)),
        ("on backend", size(v.backend_bytes)),
        ("garbage", size(v.garbage_bytes)),
        ("read-only", opt(v.read_only)),
        ("encryption", encryption_text(v)),
        ("NBD allow list", allow_list_text(v)),
        ("template", opt(v.template)),
        ("parent", opt_str(v.parent.as_ref())),
        (
            "clones",
            if v.children.is_empty() {
                "-".into()
            } else {
                v.children.join(", ")
            },
        ),
        ("snapshots", opt(v.snapshots)),
        ("scrub", scrub),
        ("SCO size", size(v.sco_size)),
        ("write buffer budget", size(v.write_buffer)),
        ("in write buffer", size(v.local_sco_bytes)),
        ("not yet uploaded", size(v.not_uploaded_bytes)),
        ("upload queue", opt(v.upload_queue)),
        ("TLogs on backend", opt(v.tlogs_on_backend)),
        ("throttling", opt(v.throttling)),
        (
            "DTL",
            format!(
                "{} {} ({}, backlog {}, last error: {})",
                opt_str(v.dtl_mode.as_ref()),
                opt_str(v.dtl_addr.as_ref()),
                opt_str(v.dtl_state.as_ref()),
                size(v.dtl_backlog_bytes),
                opt_str(v.dtl_last_error.as_ref())
            ),
        ),
        (
            "throttled writes",
            format!("{} ({} ms)", opt(v.throttled_writes), opt(v.throttle_ms)),
        ),
        (
            "upload errors",
            format!(
                "{} (last: {})",
                opt(v.upload_errors),
                opt_str(v.last_upload_error.as_ref())
            ),
        ),
        (
            "reads / writes",
            format!("{} / {}", opt(v.reads), opt(v.writes)),
        ),
        ("flushes", opt(v.flushes)),
        ("MDS", mds_text(v)),
        ("backend reads", opt(v.backend_reads)),
        ("read cache hits", opt(v.cache_hits)),
        ("NBD export", opt_str(v.nbd_uri.as_ref())),
        ("NBD clients", opt(v.nbd_connections)),
        ("vhost-user socket", opt_str(v.vhost_socket.as_ref())),
        (
            "vhost-user frontend",
            match v.vhost_connected {
                Some(true) => "connected".into(),
                Some(false) => "none".into(),
                None => "-".into(),
            },
        ),
    ];
    for (key, value) in rows {
        println!("{:<20} {value}", format!("{key}:"));
    }
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

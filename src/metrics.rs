//! `GET /metrics` (Prometheus text exposition) and `GET /v1/volumes/{name}/stats` (the raw
//! counters and latency histograms `vstor volume stats` and `vstor top` turn into rates).
//!
//! A scrape reads the node's state once into a [`Scrape`] (volume infos, latency snapshots,
//! scrub progress, process figures), then encodes it with `prometheus-client` through a
//! `Collector`: nothing is registered ahead of time, so a deleted volume's series simply stop.
//! Names follow Prometheus conventions: a `vstor_` prefix, base units (`_seconds`, `_bytes`),
//! `_total` on counters (added by the encoder), labels `volume`, `op`, `state`, `mds`, `role`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use vstor_volumedriver::latency::{IoOp, LatencySnapshot, BOUNDS_SECONDS};
use vstor_volumedriver::VolumeInfo;

use crate::api::{ApiError, ApiState};
use crate::api_types::{MdsStatus, OpLatency, OsdView, ScrubProgress, VolumeStats};

/// A per-volume metric read straight off [`VolumeInfo`]: name, help, value.
type PerVolume = (&'static str, &'static str, fn(&VolumeInfo) -> u64);

/// A process-level figure: name (the encoder adds `_total` to counters), help, kind, value.
pub(crate) type Figure = (&'static str, &'static str, MetricType, u64);

/// One volume as scraped.
#[derive(Debug)]
struct VolumeSample {
    info: VolumeInfo,
    latency: Vec<(IoOp, LatencySnapshot)>,
    nbd_connections: usize,
    vhost_connected: bool,
    scrub: Option<ScrubProgress>,
    /// The last scrub fell behind the writes (`ScrubOutcome::behind`).
    scrub_behind: bool,
    mds: Option<MdsStatus>,
}

/// Everything one scrape reports, read before encoding.
#[derive(Debug)]
struct Scrape {
    node: String,
    volumes: Vec<VolumeSample>,
    failed: usize,
    backend: Vec<(&'static str, LatencySnapshot, u64)>,
    /// The EC tier's OSDs (`None`: not on the EC tier; an error reading the map: empty).
    osds: Option<Vec<OsdView>>,
    /// Node-level figures (the tier's repair, the DTL leftover sweep, the read cache, the
    /// credential reloads, vhost-user polling).
    figures: Vec<Figure>,
    cpu_seconds: f64,
    rss_bytes: u64,
}

pub(crate) fn cpu_seconds() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        secs(u.user_time()) + secs(u.system_time())
    })
}

/// Resident set size (`VmRSS` of `/proc/self/status`); 0 if unreadable.
pub(crate) fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let kib = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
            kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// The tier's OSDs (blocking: the tier map may read the registry).
fn osd_views(state: &ApiState) -> Option<Vec<OsdView>> {
    let tier = state.tier.as_ref()?;
    let osds = match tier.tier_map().osds() {
        Ok(osds) => osds,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the tier's OSDs for the metrics");
            Vec::new()
        }
    };
    Some(
        osds.into_iter()
            .map(|o| OsdView {
                id: o.slot.id,
                addr: o.addr,
                domain: o.slot.domain,
                state: o.state.as_str().to_string(),
                writable: o.slot.writable,
            })
            .collect(),
    )
}

fn scrape(state: &ApiState) -> Scrape {
    let volumes = state
        .manager
        .names()
        .into_iter()
        .filter_map(|name| state.manager.get(&name).ok())
        .map(|volume| {
            let name = volume.name().to_string();
            let (scrub, last_scrub) = state.scrubs.status(&name);
            VolumeSample {
                latency: IoOp::ALL
                    .iter()
                    .map(|op| (*op, volume.latency(*op)))
                    .collect(),
                nbd_connections: state.nbd.connections(&name),
                vhost_connected: state.vhost.connected(&name),
                scrub,
                scrub_behind: last_scrub.is_some_and(|last| last.behind),
                mds: state.mds.as_ref().and_then(|m| m.status(&name)),
                info: volume.info(),
            }
        })
        .collect();
    Scrape {
        node: state.node.name.clone(),
        volumes,
        failed: state.manager.failed().len(),
        backend: state.backend_timing.snapshot(),
        osds: osd_views(state),
        figures: tier_repair_metrics(state)
            .into_iter()
            .chain(dtl_sweep_metrics(state))
            .chain(read_cache_metrics(state))
            .chain(credential_reload_metrics(&state.credential_reloads))
            .chain(std::iter::once((
                "vstor_vhost_polled",
                "Times a vhost-user queue worker found the guest's next requests by polling, \
                 without a kick or a wake-up ([vhost] poll_max)",
                MetricType::Counter,
                state.vhost.polled(),
            )))
            .collect(),
        cpu_seconds: cpu_seconds(),
        rss_bytes: rss_bytes(),
    }
}

/// The node's read cache (none when it is off).
fn read_cache_metrics(state: &ApiState) -> Vec<Figure> {
    let Some(c) = state.manager.read_cache_stats() else {
        return Vec::new();
    };
    vec![
        (
            "vstor_read_cache_capacity_bytes",
            "Bytes of backend data the read cache may keep",
            MetricType::Gauge,
            c.capacity_bytes,
        ),
        (
            "vstor_read_cache_bytes",
            "Bytes of backend data the read cache keeps",
            MetricType::Gauge,
            c.bytes,
        ),
        (
            "vstor_read_cache_hits",
            "Backend reads the read cache answered",
            MetricType::Counter,
            c.hits,
        ),
        (
            "vstor_read_cache_misses",
            "Backend reads the read cache could not answer",
            MetricType::Counter,
            c.misses,
        ),
    ]
}

/// The EC tier's background repair (none off the tier).
fn tier_repair_metrics(state: &ApiState) -> Vec<Figure> {
    let Some(r) = &state.tier_repair else {
        return Vec::new();
    };
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    vec![
        (
            "vstor_tier_repair_running",
            "1 while a background repair or scrub pass runs",
            MetricType::Gauge,
            get(&r.running),
        ),
        (
            "vstor_tier_repair_objects_checked",
            "Objects of the namespace being repaired checked so far",
            MetricType::Gauge,
            get(&r.objects_checked),
        ),
        (
            "vstor_tier_repair_objects",
            "Objects of the namespace being repaired",
            MetricType::Gauge,
            get(&r.objects_total),
        ),
        (
            "vstor_tier_repair_passes",
            "Background repair and scrub passes completed",
            MetricType::Counter,
            get(&r.passes),
        ),
        (
            "vstor_tier_repair_fragments_rebuilt",
            "Fragments rebuilt by background repair",
            MetricType::Counter,
            get(&r.fragments_rebuilt),
        ),
        (
            "vstor_tier_repair_fragments_moved",
            "Fragments moved by background repair",
            MetricType::Counter,
            get(&r.fragments_moved),
        ),
        (
            "vstor_tier_repair_corrupt_found",
            "Corrupt fragments found by background scrub",
            MetricType::Counter,
            get(&r.corrupt_found),
        ),
        (
            "vstor_tier_repair_failures",
            "Namespaces whose repair failed",
            MetricType::Counter,
            get(&r.failures),
        ),
    ]
}

/// A node-level counter read off an atomic.
fn counter(name: &'static str, help: &'static str, value: &std::sync::atomic::AtomicU64) -> Figure {
    let value = value.load(std::sync::atomic::Ordering::Relaxed);
    (name, help, MetricType::Counter, value)
}

/// The DTL leftover sweep's counters (a cluster node's; none elsewhere).
fn dtl_sweep_metrics(state: &ApiState) -> Vec<Figure> {
    let Some(sweep) = &state.dtl_sweep else {
        return Vec::new();
    };
    vec![
        counter(
            "vstor_dtl_leftover_sweeps",
            "Passes of the sweep of leftover DTL namespaces completed",
            &sweep.passes,
        ),
        counter(
            "vstor_dtl_leftovers_removed",
            "Leftover DTL namespaces (deleted volumes', or DTLs placed elsewhere) removed",
            &sweep.removed,
        ),
        counter(
            "vstor_dtl_leftover_sweep_failures",
            "Sweep passes or namespaces skipped because the registry or the DTL store failed",
            &sweep.failures,
        ),
    ]
}

/// Reloads of the process's certificates and API tokens (`credentials`): a node's, and the
/// daemons' (`daemon_metrics`).
pub(crate) fn credential_reload_metrics(stats: &crate::credentials::ReloadStats) -> Vec<Figure> {
    vec![
        counter(
            "vstor_credential_reloads",
            "Credentials (certificates, CA bundles, API tokens, etcd files) replaced by changed files",
            &stats.reloads,
        ),
        counter(
            "vstor_credential_reload_failures",
            "Checks of changed certificate or token files that could not be used (the old stay)",
            &stats.failures,
        ),
        (
            "vstor_credential_reload_failing",
            "Credentials whose changed files could not be used at the last check: they still \
             run on what was loaded before (certificates that will expire)",
            MetricType::Gauge,
            stats.failing.load(std::sync::atomic::Ordering::Relaxed),
        ),
    ]
}

/// Encode one metric family of `samples` (label values, metric).
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encode one histogram family: each sample's labels and latency snapshot (its buckets are
/// `BOUNDS_SECONDS` and +Inf).
fn histograms<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, &'a LatencySnapshot)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, snap) in samples {
        let buckets: Vec<(f64, u64)> = BOUNDS_SECONDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(snap.buckets.iter().copied())
            .collect();
        family
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(snap.sum_seconds, snap.count, &buckets, None)?;
    }
    Ok(())
}

fn vol(info: &VolumeInfo) -> Vec<(&'static str, String)> {
    vec![("volume", info.name.clone())]
}

fn vol_op(info: &VolumeInfo, op: &str) -> Vec<(&'static str, String)> {
    vec![("volume", info.name.clone()), ("op", op.to_string())]
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let vols = &self.volumes;
        let gauge = |v: u64| ConstGauge::new(v as i64);
        histograms(
            &mut encoder,
            "vstor_volume_io_latency_seconds",
            "Latency of a volume's requests as its frontends see them (NBD, vhost-user, edge)",
            vols.iter().flat_map(|v| {
                v.latency
                    .iter()
                    .map(|(op, snap)| (vol_op(&v.info, op.as_str()), snap))
            }),
        )?;
        family(
            &mut encoder,
            "vstor_volume_ops",
            "Requests served, by operation",
            MetricType::Counter,
            vols.iter().flat_map(|v| {
                let i = &v.info;
                [
                    ("read", i.reads),
                    ("write", i.writes),
                    ("flush", i.flushes),
                    ("discard", i.discards),
                ]
                .into_iter()
                .map(move |(op, n)| (vol_op(i, op), ConstCounter::new(n)))
            }),
        )?;
        family(
            &mut encoder,
            "vstor_volume_io_bytes",
            "Bytes read and written by clients",
            MetricType::Counter,
            vols.iter().flat_map(|v| {
                let i = &v.info;
                [("read", i.read_bytes), ("write", i.write_bytes)]
                    .into_iter()
                    .map(move |(op, n)| (vol_op(i, op), ConstCounter::new(n)))
            }),
        )?;
        let gauges: [PerVolume; 8] = [
            ("vstor_volume_size_bytes", "Volume size", |i| i.size),
            (
                "vstor_volume_written_bytes",
                "Bytes of the volume that hold data",
                |i| i.written_bytes,
            ),
            (
                "vstor_volume_write_buffer_bytes",
                "SCO bytes in the node's write buffer",
                |i| i.local_sco_bytes,
            ),
            (
                "vstor_volume_not_uploaded_bytes",
                "Write-buffer bytes not on the backend yet",
                |i| i.not_uploaded_bytes,
            ),
            (
                "vstor_volume_throttling",
                "1 while writes are throttled to the upload rate",
                |i| u64::from(i.throttling),
            ),
            ("vstor_volume_upload_queue", "Upload steps queued", |i| {
                i.upload_queue as u64
            }),
            (
                "vstor_volume_dtl_backlog_bytes",
                "Bytes queued for the DTL and not acknowledged",
                |i| i.dtl_backlog_bytes,
            ),
            (
                "vstor_volume_garbage_bytes",
                "Overwritten data a scrub would free (estimate)",
                |i| i.garbage_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            family(
                &mut encoder,
                name,
                help,
                MetricType::Gauge,
                vols.iter().map(|v| (vol(&v.info), gauge(value(&v.info)))),
            )?;
        }
        let counters: [PerVolume; 7] = [
            (
                "vstor_volume_throttled_writes",
                "Writes held back by the throttle",
                |i| i.throttled_writes,
            ),
            (
                "vstor_volume_uploaded_bytes",
                "Bytes uploaded to the backend",
                |i| i.uploaded_bytes,
            ),
            (
                "vstor_volume_uploaded_tlogs",
                "TLogs uploaded to the backend",
                |i| i.uploaded_tlogs,
            ),
            (
                "vstor_volume_upload_errors",
                "Failed upload attempts",
                |i| i.upload_errors,
            ),
            (
                "vstor_volume_backend_reads",
                "Reads served from the backend (write-buffer misses)",
                |i| i.backend_reads,
            ),
            (
                "vstor_volume_read_cache_hits",
                "Backend reads the node's read cache answered instead",
                |i| i.cache_hits,
            ),
            (
                "vstor_volume_evicted_scos",
                "SCOs evicted from the write buffer",
                |i| i.evicted_scos,
            ),
        ];
        for (name, help, value) in counters {
            family(
                &mut encoder,
                name,
                help,
                MetricType::Counter,
                vols.iter()
                    .map(|v| (vol(&v.info), ConstCounter::new(value(&v.info)))),
            )?;
        }
        family(
            &mut encoder,
            "vstor_volume_state",
            "1 for the volume's state (running, halted, stopped, fenced)",
            MetricType::Gauge,
            vols.iter().map(|v| {
                let mut labels = vol(&v.info);
                labels.push(("state", v.info.state.clone()));
                (labels, gauge(1))
            }),
        )?;
        family(
            &mut encoder,
            "vstor_volume_dtl_state",
            "1 for the volume's DTL state (ok_sync, ok_standalone, catch_up, degraded)",
            MetricType::Gauge,
            vols.iter().map(|v| {
                let mut labels = vol(&v.info);
                labels.push(("state", v.info.dtl_state.clone()));
                (labels, gauge(1))
            }),
        )?;
        family(
            &mut encoder,
            "vstor_volume_nbd_connections",
            "NBD clients connected to the volume",
            MetricType::Gauge,
            vols.iter()
                .map(|v| (vol(&v.info), gauge(v.nbd_connections as u64))),
        )?;
        family(
            &mut encoder,
            "vstor_volume_vhost_connected",
            "1 while a vhost-user frontend (QEMU) is connected to the volume",
            MetricType::Gauge,
            vols.iter()
                .map(|v| (vol(&v.info), gauge(u64::from(v.vhost_connected)))),
        )?;
        family(
            &mut encoder,
            "vstor_volume_scrub_done_ratio",
            "Progress of a running scrub (0 to 1)",
            MetricType::Gauge,
            vols.iter().filter_map(|v| {
                let p = v.scrub.as_ref()?;
                let ratio = if p.total == 0 {
                    0.0
                } else {
                    p.done as f64 / p.total as f64
                };
                Some((vol(&v.info), ConstGauge::new(ratio)))
            }),
        )?;
        family(
            &mut encoder,
            "vstor_volume_scrub_behind",
            "1 when the last background scrub fell behind the writes (raise [scrub] rate)",
            MetricType::Gauge,
            vols.iter()
                .map(|v| (vol(&v.info), gauge(u64::from(v.scrub_behind)))),
        )?;
        family(
            &mut encoder,
            "vstor_volume_mds_behind_tlogs",
            "Backend TLogs each of the volume's MDS tables lacks",
            MetricType::Gauge,
            vols.iter().flat_map(|v| {
                let name = v.info.name.clone();
                v.mds.iter().flat_map(move |m| {
                    let name = name.clone();
                    m.servers.iter().filter_map(move |s| {
                        let behind = s.behind?;
                        Some((
                            vec![
                                ("volume", name.clone()),
                                ("mds", s.addr.clone()),
                                ("role", s.role.clone()),
                            ],
                            gauge(behind),
                        ))
                    })
                })
            }),
        )?;
        histograms(
            &mut encoder,
            "vstor_backend_request_latency_seconds",
            "Latency of the node's backend requests by kind (put, get, get_range, delete, list, meta)",
            self.backend
                .iter()
                .map(|(kind, snap, _)| (vec![("op", (*kind).to_string())], snap)),
        )?;
        family(
            &mut encoder,
            "vstor_backend_errors",
            "Backend requests that failed, by kind",
            MetricType::Counter,
            self.backend.iter().map(|(kind, _, errors)| {
                (
                    vec![("op", (*kind).to_string())],
                    ConstCounter::new(*errors),
                )
            }),
        )?;
        let osds = self.osds.as_deref().unwrap_or_default();
        family(
            &mut encoder,
            "vstor_osd_state",
            "1 for each OSD of the erasure-coded tier in its state (up, down, draining, out)",
            MetricType::Gauge,
            osds.iter().map(|o| {
                (
                    vec![
                        ("osd", o.id.to_string()),
                        ("domain", o.domain.clone()),
                        ("state", o.state.clone()),
                    ],
                    gauge(1),
                )
            }),
        )?;
        family(
            &mut encoder,
            "vstor_osd_writable",
            "1 while the OSD takes new fragments",
            MetricType::Gauge,
            osds.iter().map(|o| {
                (
                    vec![("osd", o.id.to_string()), ("domain", o.domain.clone())],
                    gauge(u64::from(o.writable)),
                )
            }),
        )?;
        let node = || vec![("node", self.node.clone())];
        family(
            &mut encoder,
            "vstor_node_volumes",
            "Volumes served by the node, and those that failed to restart",
            MetricType::Gauge,
            [
                (
                    vec![("node", self.node.clone()), ("state", "served".into())],
                    gauge(vols.len() as u64),
                ),
                (
                    vec![("node", self.node.clone()), ("state", "failed".into())],
                    gauge(self.failed as u64),
                ),
            ],
        )?;
        process_figures(
            &mut encoder,
            &node(),
            &self.figures,
            self.cpu_seconds,
            self.rss_bytes,
        )
    }
}

/// Encode `figures` and the process's CPU time and resident memory, each labelled `labels`
/// (a node's `node`, a daemon's `daemon`).
pub(crate) fn process_figures(
    encoder: &mut DescriptorEncoder,
    labels: &[(&'static str, String)],
    figures: &[Figure],
    cpu_seconds: f64,
    rss_bytes: u64,
) -> Result<(), std::fmt::Error> {
    let gauge = |v: u64| ConstGauge::new(v as i64);
    for &(name, help, kind, value) in figures {
        match kind {
            MetricType::Counter => family(
                encoder,
                name,
                help,
                kind,
                [(labels.to_vec(), ConstCounter::new(value))],
            )?,
            _ => family(encoder, name, help, kind, [(labels.to_vec(), gauge(value))])?,
        }
    }
    family(
        encoder,
        "vstor_process_cpu_seconds",
        "User and system CPU time of the process",
        MetricType::Counter,
        [(labels.to_vec(), ConstCounter::new(cpu_seconds))],
    )?;
    family(
        encoder,
        "vstor_process_resident_memory_bytes",
        "Resident memory of the process",
        MetricType::Gauge,
        [(labels.to_vec(), gauge(rss_bytes))],
    )
}

/// The content type of a scrape.
pub(crate) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A scrape as text: `collector`'s families, encoded by `prometheus-client`.
pub(crate) fn encode_text(collector: impl Collector + 'static) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let scraped = tokio::task::spawn_blocking(move || scrape(&state))
        .await
        .map_err(|e| ApiError(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let text = encode_text(scraped).map_err(|e| {
        ApiError(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics failed: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, OPENMETRICS)], text))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// `GET /v1/volumes/{name}/stats`.
pub async fn stats(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<VolumeStats>, ApiError> {
    let volume = state.manager.get(&name)?;
    let info = volume.info();
    Ok(Json(VolumeStats {
        name,
        at_ms: now_ms(),
        reads: info.reads,
        writes: info.writes,
        flushes: info.flushes,
        discards: info.discards,
        read_bytes: info.read_bytes,
        write_bytes: info.write_bytes,
        bounds_seconds: BOUNDS_SECONDS.to_vec(),
        latency: IoOp::ALL
            .iter()
            .map(|op| {
                let s = volume.latency(*op);
                OpLatency {
                    op: op.as_str().to_string(),
                    buckets: s.buckets,
                    sum_seconds: s.sum_seconds,
                    count: s.count,
                }
            })
            .collect(),
    }))
}

/// `GET /v1/osds`.
pub async fn osds(State(state): State<ApiState>) -> Result<Json<Vec<OsdView>>, ApiError> {
    let views = tokio::task::spawn_blocking(move || osd_views(&state))
        .await
        .map_err(|e| ApiError(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(views.unwrap_or_default()))
}

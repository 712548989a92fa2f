//! What `vstor edge list` and `GET /metrics` show per attached volume, computed from the
//! remote target's counters ([`RemoteStats`]): pure functions, tested without a daemon.

use std::fmt::Write as _;

use vstor_edge::remote::client::{RemoteStats, LATENCY_BUCKETS_US};
use vstor_edge::remote::proto::AllowList;

use crate::api_types::Attachment;

/// The latency (upper bound of its histogram bucket, µs) under which a fraction `q` of the
/// completed requests fell; `None` without requests, `Some(u64::MAX)` in the +Inf bucket.
pub fn quantile_us(buckets: &[u64], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the q-th request, 1-based, at least 1.
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (i, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(LATENCY_BUCKETS_US.get(i).copied().unwrap_or(u64::MAX));
        }
    }
    Some(u64::MAX)
}

/// Frontend facts of an attached volume, next to its remote counters.
pub struct Frontends {
    pub socket: String,
    pub nbd_uri: String,
    pub nbd_clients: usize,
    pub vhost_connected: bool,
    /// The allow list the NBD frontend enforces (the owner's, see `EdgeHost::allows`).
    pub access: AllowList,
}

/// One attached volume as `GET /v1/attachments` answers it.
pub fn attachment(stats: &RemoteStats, frontends: &Frontends) -> Attachment {
    let mean = stats
        .latency_sum_us
        .checked_div(stats.completed)
        .filter(|_| stats.completed > 0);
    Attachment {
        volume: stats.volume.clone(),
        owner: stats.owner.clone(),
        owner_addr: stats.addr.clone(),
        tag: stats.tag,
        state: stats.state.as_str().to_string(),
        size: stats.size,
        read_only: stats.read_only,
        dtl_in_sync: stats.dtl_in_sync,
        reconnects: stats.reconnects,
        inflight: stats.inflight,
        resubmitted: stats.resubmitted,
        completed: stats.completed,
        failed: stats.failed,
        latency_mean_us: mean,
        latency_p50_us: quantile_us(&stats.latency_buckets, 0.50),
        latency_p99_us: quantile_us(&stats.latency_buckets, 0.99),
        socket: frontends.socket.clone(),
        nbd_uri: frontends.nbd_uri.clone(),
        nbd_clients: frontends.nbd_clients,
        vhost_connected: frontends.vhost_connected,
        allow_networks: frontends
            .access
            .networks
            .iter()
            .map(ToString::to_string)
            .collect(),
        allow_subjects: frontends.access.subjects.clone(),
    }
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A per-volume number: metric name, type, help, and how to read it.
type Counter = (
    &'static str,
    &'static str,
    &'static str,
    fn(&RemoteStats) -> u64,
);

/// Prometheus text exposition (format 0.0.4) of every attached volume. Written by hand: a
/// handful of gauges and one histogram per volume, no registry of metrics to keep.
pub fn metrics(edge: &str, volumes: &[RemoteStats]) -> String {
    let mut out = String::new();
    let edge = label(edge);
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut out,
        "vstor_edge_volume_state",
        "gauge",
        "1 for the volume's current connection state (connected, reconnecting, failed, closed).",
    );
    for s in volumes {
        for state in ["connected", "reconnecting", "failed", "closed"] {
            let _ = writeln!(
                out,
                "vstor_edge_volume_state{{edge=\"{edge}\",volume=\"{}\",owner=\"{}\",state=\"{state}\"}} {}",
                label(&s.volume),
                label(s.owner.as_deref().unwrap_or("")),
                u8::from(s.state.as_str() == state)
            );
        }
    }
    let simple: [Counter; 6] = [
        (
            "vstor_edge_owner_tag",
            "gauge",
            "Owner tag the edge last saw.",
            |s| s.tag,
        ),
        (
            "vstor_edge_reconnects_total",
            "counter",
            "Reconnections to an owner after the first connection.",
            |s| s.reconnects,
        ),
        (
            "vstor_edge_inflight_requests",
            "gauge",
            "Requests sent or waiting to be sent, not yet answered.",
            |s| s.inflight as u64,
        ),
        (
            "vstor_edge_resubmitted_total",
            "counter",
            "Requests resent after a reconnect.",
            |s| s.resubmitted,
        ),
        (
            "vstor_edge_requests_total",
            "counter",
            "Requests completed.",
            |s| s.completed,
        ),
        (
            "vstor_edge_failed_requests_total",
            "counter",
            "Requests completed with an error.",
            |s| s.failed,
        ),
    ];
    for (name, kind, help, value) in simple {
        family(&mut out, name, kind, help);
        for s in volumes {
            let _ = writeln!(
                out,
                "{name}{{edge=\"{edge}\",volume=\"{}\"}} {}",
                label(&s.volume),
                value(s)
            );
        }
    }
    let name = "vstor_edge_request_latency_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Latency of requests through the edge, as the frontend sees it.",
    );
    for s in volumes {
        let volume = label(&s.volume);
        let mut cumulative = 0;
        for (i, count) in s.latency_buckets.iter().enumerate() {
            cumulative += count;
            let le = LATENCY_BUCKETS_US
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(
                out,
                "{name}_bucket{{edge=\"{edge}\",volume=\"{volume}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_sum{{edge=\"{edge}\",volume=\"{volume}\"}} {}",
            s.latency_sum_us as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "{name}_count{{edge=\"{edge}\",volume=\"{volume}\"}} {cumulative}"
        );
    }
    out
}

/// The edge's credential reloads (`credentials`): the node's series
/// (`metrics::credential_reload_metrics`, one list of names and help texts), labelled by edge,
/// in this module's text exposition.
pub fn credential_metrics(edge: &str, stats: &crate::credentials::ReloadStats) -> String {
    let edge = label(edge);
    let mut out = String::new();
    for (name, help, kind, value) in crate::metrics::credential_reload_metrics(stats) {
        let (name, kind) = match kind {
            prometheus_client::metrics::MetricType::Counter => (format!("{name}_total"), "counter"),
            _ => (name.to_string(), "gauge"),
        };
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{edge=\"{edge}\"}} {value}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstor_edge::remote::client::ConnState;

    fn stats(buckets: [u64; LATENCY_BUCKETS_US.len() + 1]) -> RemoteStats {
        RemoteStats {
            volume: "v\"1".into(),
            owner: Some("n1".into()),
            addr: Some("127.0.0.1:1".into()),
            tag: 3,
            state: ConnState::Connected,
            size: 1 << 20,
            read_only: false,
            dtl_in_sync: true,
            reconnects: 2,
            inflight: 1,
            resubmitted: 0,
            completed: buckets.iter().sum(),
            failed: 0,
            latency_buckets: buckets,
            latency_sum_us: 1_000,
        }
    }

    #[test]
    fn quantiles_from_buckets() {
        assert_eq!(quantile_us(&[0; 13], 0.5), None);
        let mut b = [0; 13];
        b[0] = 50; // <= 50 µs
        b[3] = 49; // <= 500 µs
        b[12] = 1; // +Inf
        assert_eq!(quantile_us(&b, 0.5), Some(50));
        assert_eq!(quantile_us(&b, 0.99), Some(500));
        assert_eq!(quantile_us(&b, 1.0), Some(u64::MAX));
    }

    #[test]
    fn metrics_text_has_cumulative_buckets_and_escaped_labels() {
        let mut b = [0; 13];
        b[1] = 3;
        b[4] = 1;
        let text = metrics("e1", &[stats(b)]);
        assert!(text.contains(
            "vstor_edge_volume_state{edge=\"e1\",volume=\"v\\\"1\",owner=\"n1\",state=\"connected\"} 1"
        ));
        assert!(text.contains("vstor_edge_reconnects_total{edge=\"e1\",volume=\"v\\\"1\"} 2"));
        assert!(text.contains("le=\"0.0001\"} 3"), "{text}");
        assert!(text.contains("le=\"0.001\"} 4"));
        assert!(text.contains("le=\"+Inf\"} 4"));
        assert!(text
            .contains("vstor_edge_request_latency_seconds_count{edge=\"e1\",volume=\"v\\\"1\"} 4"));
        let view = attachment(
            &stats(b),
            &Frontends {
                socket: "/s".into(),
                nbd_uri: "nbd://x/v".into(),
                nbd_clients: 0,
                vhost_connected: false,
                access: AllowList {
                    subjects: vec!["alice".into()],
                    networks: vec!["192.0.2.0/24".parse().unwrap()],
                },
            },
        );
        assert_eq!(view.allow_networks, ["192.0.2.0/24"]);
        assert_eq!(view.allow_subjects, ["alice"]);
        assert_eq!(view.latency_p50_us, Some(100));
        assert_eq!(view.latency_mean_us, Some(250));
        assert_eq!(view.state, "connected");
    }
}

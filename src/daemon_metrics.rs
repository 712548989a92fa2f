//! `--metrics IP:PORT`: Prometheus metrics of the daemons that have no management API
//! (`vstor dtl`, `vstor osd`, `vstor mds`).
//!
//! Why: those processes hold certificates too, renewed without a restart (`credentials`), and a
//! renewal that keeps failing must reach someone before the certificate in use expires. A node
//! and an edge report that as `vstor_credential_reload_failing` on their API's `/metrics`; these
//! daemons could only log it. This listener serves the same series (labelled `daemon`), and the
//! process's CPU time and memory under the node's names, so one alert rule
//! (`VstorCredentialRenewalFailing`) and one dashboard query cover every vstor process. What the
//! daemons hold (OSD capacity and state, a volume's DTL and MDS state) is on the nodes'
//! `/metrics` already, read off the registry and the links.
//!
//! The listener answers `GET /metrics` and nothing else: it carries no volume data and cannot
//! change anything, so, like Prometheus exporters, it takes no token; bind it to loopback or a
//! management network. Not set: no listener.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::Args;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::credentials::ReloadStats;
use crate::metrics::{
    credential_reload_metrics, encode_text, process_figures, Figure, OPENMETRICS,
};

/// `--metrics`, shared by `vstor dtl`, `osd` and `mds`.
#[derive(Args, Clone, Debug, Default)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on IP:PORT (`GET /metrics`: credential reloads, CPU time,
    /// memory; no token, no data) [default: none].
    #[arg(long, value_name = "IP:PORT")]
    pub metrics: Option<SocketAddr>,
}

/// What a daemon's scrape reports.
#[derive(Clone)]
struct Daemon {
    /// `dtl`, `osd` or `mds`: the `daemon` label.
    kind: &'static str,
    reloads: Arc<ReloadStats>,
}

/// One scrape, read before encoding.
#[derive(Debug)]
struct Scrape {
    kind: &'static str,
    figures: Vec<Figure>,
    cpu_seconds: f64,
    rss_bytes: u64,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        process_figures(
            &mut encoder,
            &[("daemon", self.kind.to_string())],
            &self.figures,
            self.cpu_seconds,
            self.rss_bytes,
        )
    }
}

async fn metrics(State(daemon): State<Daemon>) -> impl IntoResponse {
    let scrape = Scrape {
        kind: daemon.kind,
        figures: credential_reload_metrics(&daemon.reloads),
        cpu_seconds: crate::metrics::cpu_seconds(),
        rss_bytes: crate::metrics::rss_bytes(),
    };
    match encode_text(scrape) {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics failed: {e}"),
        )
            .into_response(),
    }
}

/// What daemon `kind` does at startup (on the current runtime): reload its peer TLS
/// credentials on `SIGHUP` and at every check (`credentials`), and serve their counts on
/// `--metrics` if `args` ask for it. A listener that cannot be bound stops the daemon at
/// startup, as a busy protocol port does.
pub async fn start(
    kind: &'static str,
    tls: Option<vstor_net::PeerTls>,
    args: &MetricsArgs,
) -> Result<()> {
    let reloads = crate::credentials::spawn(crate::credentials::of(tls, None, None, None))?;
    serve(args, kind, reloads).await
}

/// Serve `GET /metrics` for daemon `kind` if `args` ask for it.
async fn serve(args: &MetricsArgs, kind: &'static str, reloads: Arc<ReloadStats>) -> Result<()> {
    let Some(addr) = args.metrics else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for --metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    let router = axum::Router::new()
        .route("/metrics", get(metrics))
        .with_state(Daemon { kind, reloads });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("the --metrics listener on {bound} stopped: {e}");
        }
    });
    tracing::info!("serving metrics on http://{bound}/metrics");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_names_the_daemon_and_reports_its_reloads() {
        let reloads = ReloadStats::default();
        reloads
            .reloads
            .store(2, std::sync::atomic::Ordering::Relaxed);
        reloads
            .failures
            .store(3, std::sync::atomic::Ordering::Relaxed);
        reloads
            .failing
            .store(1, std::sync::atomic::Ordering::Relaxed);
        let text = encode_text(Scrape {
            kind: "osd",
            figures: credential_reload_metrics(&reloads),
            cpu_seconds: 1.5,
            rss_bytes: 4096,
        })
        .unwrap();
        for line in [
            "vstor_credential_reloads_total{daemon=\"osd\"} 2",
            "vstor_credential_reload_failures_total{daemon=\"osd\"} 3",
            "vstor_credential_reload_failing{daemon=\"osd\"} 1",
            "vstor_process_cpu_seconds_total{daemon=\"osd\"} 1.5",
            "vstor_process_resident_memory_bytes{daemon=\"osd\"} 4096",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}

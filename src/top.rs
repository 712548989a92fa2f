//! `vstor volume stats NAME` and `vstor top`: per-volume IOPS, bandwidth and latency
//! percentiles, from two samples of `GET /v1/volumes/{name}/stats` an interval apart (the
//! node keeps cumulative counters and histograms; rates are what changed between the samples,
//! percentiles are estimated from the histogram of the requests in between).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use vstor_volumedriver::latency::LatencySnapshot;

use crate::api_types::{OpLatency, VolumeStats, VolumeView};
use crate::client::Client;

/// One operation's figures over an interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpFigures {
    pub op: String,
    pub per_second: f64,
    /// Estimated percentiles and mean, milliseconds (absent without requests).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

/// A volume's figures over an interval (`vstor volume stats --json`, `vstor top --json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VolumeRates {
    pub name: String,
    pub interval_seconds: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_bytes_per_second: f64,
    pub write_bytes_per_second: f64,
    pub ops: Vec<OpFigures>,
}

fn snapshot(l: &OpLatency) -> LatencySnapshot {
    LatencySnapshot {
        buckets: l.buckets.clone(),
        sum_seconds: l.sum_seconds,
        count: l.count,
    }
}

/// The figures between samples `a` and the later `b` of the same volume.
pub fn rates(a: &VolumeStats, b: &VolumeStats) -> VolumeRates {
    let secs = (b.at_ms.saturating_sub(a.at_ms) as f64 / 1000.0).max(0.001);
    let per_sec = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
    let ms = |s: Option<f64>| s.map(|v| v * 1000.0);
    let ops = b
        .latency
        .iter()
        .map(|later| {
            let delta = match a.latency.iter().find(|l| l.op == later.op) {
                Some(earlier) => snapshot(later).since(&snapshot(earlier)),
                None => snapshot(later),
            };
            OpFigures {
                op: later.op.clone(),
                per_second: delta.count as f64 / secs,
                p50_ms: ms(delta.quantile(0.5)),
                p99_ms: ms(delta.quantile(0.99)),
                mean_ms: ms(delta.mean()),
            }
        })
        .collect();
    VolumeRates {
        name: b.name.clone(),
        interval_seconds: secs,
        read_iops: per_sec(a.reads, b.reads),
        write_iops: per_sec(a.writes, b.writes),
        read_bytes_per_second: per_sec(a.read_bytes, b.read_bytes),
        write_bytes_per_second: per_sec(a.write_bytes, b.write_bytes),
        ops,
    }
}

fn stats(client: &Client, name: &str) -> Result<VolumeStats> {
    client.get(&format!("/v1/volumes/{name}/stats"))
}

/// `vstor volume stats NAME`: two samples `interval` apart.
pub fn volume_stats(client: &Client, name: &str, interval: Duration) -> Result<VolumeRates> {
    let a = stats(client, name)?;
    std::thread::sleep(interval);
    let b = stats(client, name)?;
    Ok(rates(&a, &b))
}

fn millis(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

fn mib(bytes_per_second: f64) -> String {
    format!("{:.1}", bytes_per_second / f64::from(1 << 20))
}

fn op<'a>(r: &'a VolumeRates, name: &str) -> Option<&'a OpFigures> {
    r.ops.iter().find(|o| o.op == name)
}

/// The table `vstor top` and `vstor volume stats` print.
pub fn print_rates(rows: &[VolumeRates]) {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
    println!(
        "{:<width$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "VOLUME",
        "R IOPS",
        "W IOPS",
        "R MiB/s",
        "W MiB/s",
        "R p50 ms",
        "R p99 ms",
        "W p50 ms",
        "W p99 ms",
        "F p99 ms"
    );
    for r in rows {
        let (read, write, flush) = (op(r, "read"), op(r, "write"), op(r, "flush"));
        println!(
            "{:<width$} {:>9.0} {:>9.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            r.name,
            r.read_iops,
            r.write_iops,
            mib(r.read_bytes_per_second),
            mib(r.write_bytes_per_second),
            millis(read.and_then(|o| o.p50_ms)),
            millis(read.and_then(|o| o.p99_ms)),
            millis(write.and_then(|o| o.p50_ms)),
            millis(write.and_then(|o| o.p99_ms)),
            millis(flush.and_then(|o| o.p99_ms)),
        );
    }
}

/// `vstor top`: refresh every `interval`, `count` times (0: until interrupted).
pub fn top(client: &Client, interval: Duration, count: u64, json: bool) -> Result<()> {
    let clear = !json && crate::client::on_terminal();
    let mut previous: BTreeMap<String, VolumeStats> = BTreeMap::new();
    let mut shown = 0u64;
    loop {
        let volumes: Vec<VolumeView> = client.get("/v1/volumes")?;
        let mut current = BTreeMap::new();
        for v in volumes.iter().filter(|v| v.state == "running") {
            // A volume deleted (or moved) between the list and its stats is skipped.
            if let Ok(s) = stats(client, &v.name) {
                current.insert(v.name.clone(), s);
            }
        }
        if !previous.is_empty() {
            let rows: Vec<VolumeRates> = current
                .iter()
                .filter_map(|(name, b)| Some(rates(previous.get(name)?, b)))
                .collect();
            if json {
                // One line per refresh (JSON lines), so a reader can follow the stream.
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                if clear {
                    print!("\x1b[2J\x1b[H");
                }
                println!("vstor top: {} volumes, every {interval:?}", rows.len());
                print_rates(&rows);
            }
            shown += 1;
            if count > 0 && shown >= count {
                return Ok(());
            }
        }
        previous = current;
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64, writes: u64, write_buckets: Vec<u64>) -> VolumeStats {
        VolumeStats {
            name: "v".into(),
            at_ms,
            writes,
            write_bytes: writes * 4096,
            latency: vec![OpLatency {
                op: "write".into(),
                count: write_buckets.iter().sum(),
                sum_seconds: 0.0,
                buckets: write_buckets,
            }],
            ..VolumeStats::default()
        }
    }

    #[test]
    fn rates_and_percentiles_cover_only_the_interval() {
        let mut early = vec![0u64; 17];
        early[12] = 1000; // old slow writes: not in the interval
        let mut late = early.clone();
        late[4] += 2000; // (0.5 ms, 1 ms]
        let r = rates(&sample(1_000, 1000, early), &sample(3_000, 3000, late));
        assert!((r.interval_seconds - 2.0).abs() < 1e-9);
        assert!((r.write_iops - 1000.0).abs() < 1e-9);
        assert!((r.write_bytes_per_second - 4096.0 * 1000.0).abs() < 1e-6);
        let w = op(&r, "write").unwrap();
        assert!((w.per_second - 1000.0).abs() < 1e-9);
        let (p50, p99) = (w.p50_ms.unwrap(), w.p99_ms.unwrap());
        assert!(
            (0.5..=1.0).contains(&p50) && (0.5..=1.0).contains(&p99),
            "{w:?}"
        );
        // Nothing happened: no percentiles.
        let idle = rates(&sample(0, 5, vec![0; 17]), &sample(1000, 5, vec![0; 17]));
        assert_eq!(op(&idle, "write").unwrap().p50_ms, None);
    }
}

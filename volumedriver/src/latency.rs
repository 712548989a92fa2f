//! Latency histograms of a volume's I/O, per operation, as its frontends see it (recorded by
//! the export glue around each request, including a sync DTL round trip and throttling).
//!
//! Fixed Prometheus-style buckets ([`BOUNDS_SECONDS`]) in atomics: recording is lock-free and
//! costs a bucket search and two relaxed adds, so every request is counted. A
//! [`LatencySnapshot`] is a copy of the counters; the difference of two snapshots is the
//! histogram of the requests between them, from which [`LatencySnapshot::quantile`] estimates
//! p50/p99 (linear within a bucket, as Prometheus' `histogram_quantile` does).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds of the buckets, in seconds; a last bucket (+Inf) takes the rest.
pub const BOUNDS_SECONDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];
const BUCKETS: usize = BOUNDS_SECONDS.len() + 1;

/// The operations measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IoOp {
    Read,
    Write,
    Flush,
    Discard,
}

impl IoOp {
    pub const ALL: [IoOp; 4] = [IoOp::Read, IoOp::Write, IoOp::Flush, IoOp::Discard];

    pub fn as_str(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Discard => "discard",
        }
    }
}

/// One operation's histogram.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let bucket = BOUNDS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        LatencySnapshot {
            count: buckets.iter().sum(),
            buckets,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A copy of a histogram: per-bucket (not cumulative) counts, the last for +Inf.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySnapshot {
    pub buckets: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl LatencySnapshot {
    /// The requests recorded after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &LatencySnapshot) -> LatencySnapshot {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| n.saturating_sub(earlier.buckets.get(i).copied().unwrap_or(0)))
            .collect();
        LatencySnapshot {
            count: buckets.iter().sum(),
            buckets,
            sum_seconds: (self.sum_seconds - earlier.sum_seconds).max(0.0),
        }
    }

    /// Estimated `q` quantile (0..=1) in seconds; `None` without requests. In the +Inf bucket
    /// the estimate is the last finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            let upto = below + n;
            if *n > 0 && upto as f64 >= rank {
                let Some(upper) = BOUNDS_SECONDS.get(i) else {
                    return BOUNDS_SECONDS.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { BOUNDS_SECONDS[i - 1] };
                let within = (rank - below as f64) / *n as f64;
                return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
            }
            below = upto;
        }
        BOUNDS_SECONDS.last().copied()
    }

    /// Mean latency in seconds; `None` without requests.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_seconds / self.count as f64)
    }
}

/// A volume's histograms, one per [`IoOp`].
#[derive(Debug, Default)]
pub struct IoLatency {
    ops: [LatencyHistogram; 4],
}

impl IoLatency {
    pub fn record(&self, op: IoOp, latency: Duration) {
        self.ops[op as usize].record(latency);
    }

    pub fn snapshot(&self, op: IoOp) -> LatencySnapshot {
        self.ops[op as usize].snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_their_buckets_and_quantiles_follow() {
        let h = LatencyHistogram::default();
        for _ in 0..90 {
            h.record(Duration::from_micros(80)); // (50 µs, 100 µs]
        }
        for _ in 0..10 {
            h.record(Duration::from_millis(20)); // (10 ms, 25 ms]
        }
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert_eq!(s.buckets[1], 90);
        assert_eq!(s.buckets[8], 10);
        let p50 = s.quantile(0.5).unwrap();
        assert!((0.000_05..=0.000_1).contains(&p50), "{p50}");
        let p99 = s.quantile(0.99).unwrap();
        assert!((0.01..=0.025).contains(&p99), "{p99}");
        assert!((s.mean().unwrap() - 0.002_072).abs() < 1e-6);

        let before = s;
        h.record(Duration::from_secs(30));
        let delta = h.snapshot().since(&before);
        assert_eq!(delta.count, 1);
        assert_eq!(delta.buckets[BUCKETS - 1], 1);
        assert_eq!(delta.quantile(0.5), Some(5.0));
        assert_eq!(LatencySnapshot::default().quantile(0.5), None);
    }
}

//! The result of `vstor-bench backend`, as a table for people or JSON (serde) for scripts.

use serde::Serialize;

use crate::common::table::{self, latencies};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// Which store, and where.
    pub backend: String,
    pub size_bytes: u64,
    pub runtime_secs: u64,
    /// Size of each uploaded object (the default SCO size).
    pub object_bytes: u64,
    pub uploads: Vec<UploadRow>,
    pub reads: Vec<ReadRow>,
}

/// Objects stored one after the other with one method; MB/s are 10^6 bytes per second.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UploadRow {
    pub method: String,
    pub objects: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
}

/// 4 KiB random reads of evicted data at one queue depth.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReadRow {
    pub iodepth: u32,
    pub reads: u64,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Ranged backend reads the volume made meanwhile (one per read that missed the write
    /// buffer, so about `reads` when everything was evicted).
    pub backend_reads: u64,
    /// Read through a read cache holding the whole volume (0 backend reads expected).
    pub cached: bool,
}

pub(crate) fn to_table(report: &Report) -> String {
    let mut out = format!(
        "vstor-bench backend: {}, {} MiB objects, {} MiB volume, {} s per read row\n\n",
        report.backend,
        report.object_bytes >> 20,
        report.size_bytes >> 20,
        report.runtime_secs
    );
    let mut lines = vec![vec![
        "upload".to_string(),
        "objects".to_string(),
        "s".to_string(),
        "MB/s".to_string(),
    ]];
    for row in &report.uploads {
        lines.push(vec![
            row.method.clone(),
            row.objects.to_string(),
            format!("{:.2}", row.seconds),
            format!("{:.0}", row.mb_per_s),
        ]);
    }
    out.push_str(&table::render(&lines));
    out.push('\n');
    let mut lines = vec![vec![
        "evicted 4k randread".to_string(),
        "IOPS".to_string(),
        "p50/p99 µs".to_string(),
        "backend reads".to_string(),
    ]];
    for row in &report.reads {
        lines.push(vec![
            if row.cached {
                format!("qd{}, read cache", row.iodepth)
            } else {
                format!("qd{}", row.iodepth)
            },
            format!("{:.0}", row.iops),
            latencies(row.p50_us, row.p99_us),
            format!("{} of {}", row.backend_reads, row.reads),
        ]);
    }
    out.push_str(&table::render(&lines));
    out
}

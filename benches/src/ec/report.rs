//! The result of `vstor-bench ec`, as tables for people (with the ratios the targets are stated
//! in) or JSON (serde) for scripts.

use serde::Serialize;

use super::codec::CodecRow;
use super::node::{ReadRow, RepairRow, UploadRow};
use crate::common::table::{self, latencies};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub size_bytes: u64,
    pub runtime_secs: u64,
    pub osds: usize,
    pub domains: usize,
    pub codec: Vec<CodecRow>,
    /// `local` then `ec`.
    pub backends: Vec<BackendRun>,
    pub repair: Option<RepairRow>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct BackendRun {
    pub backend: String,
    /// `buffered` then `small`.
    pub uploads: Vec<UploadRow>,
    pub reads: Vec<ReadRow>,
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}×", a / b)
    } else {
        "-".into()
    }
}

fn size(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

pub(crate) fn to_table(report: &Report) -> String {
    let mut out = String::new();
    if !report.codec.is_empty() {
        out.push_str(
            "codec: reed-solomon-erasure (simd-accel), one thread, GB/s of data shards; \
             anchor ISA-L 2.30 on this machine type (target ≥ 0.5×)\n\n",
        );
        let mut lines = vec![vec![
            "code".to_string(),
            "shard".into(),
            "op".into(),
            "GB/s".into(),
            "ISA-L".into(),
            "ratio".into(),
        ]];
        for r in &report.codec {
            let anchor = r.anchor_gb_per_s.unwrap_or(f64::NAN);
            lines.push(vec![
                format!("{}+{}", r.k, r.m),
                size(r.shard_bytes),
                if r.op == "encode" {
                    "encode".into()
                } else {
                    format!("decode {} lost", r.lost)
                },
                format!("{:.2}", r.gb_per_s),
                r.anchor_gb_per_s
                    .map_or_else(|| "-".into(), |a| format!("{a:.0}")),
                ratio(r.gb_per_s, anchor),
            ]);
        }
        out.push_str(&table::render(&lines));
        out.push('\n');
    }
    let by = |name: &str| report.backends.iter().find(|b| b.backend == name);
    let (local, ec) = (by("local"), by("ec"));
    let any_uploads = report.backends.iter().any(|b| !b.uploads.is_empty());
    if any_uploads {
        out.push_str(&format!(
            "upload: {} MiB sequential 1 MiB QD8 writes over NBD (fio), node write buffer \
             limit 24M; `buffered`: the volume's write buffer holds the whole write, so \
             `absorbed` is the backend's own pace; `small`: 4M SCOs, 8M write buffer, ingest \
             throttled to the uploads (ec: {} OSDs in {} domains, default preset 4+2)\n\n",
            report.size_bytes >> 20,
            report.osds,
            report.domains
        ));
        let mut lines = vec![vec![
            "volume".to_string(),
            "ingest MB/s".into(),
            "absorbed MB/s".into(),
            "total s".into(),
            "drain s".into(),
            "throttled".into(),
        ]];
        let kinds: Vec<&str> = ["buffered", "small"]
            .into_iter()
            .filter(|k| {
                report
                    .backends
                    .iter()
                    .any(|b| b.uploads.iter().any(|u| u.volume == *k))
            })
            .collect();
        for kind in kinds {
            lines.push(vec![kind.to_string()]);
            let find = |b: Option<&BackendRun>| {
                b.and_then(|b| b.uploads.iter().find(|u| u.volume == kind))
                    .cloned()
            };
            for b in &report.backends {
                if let Some(u) = find(Some(b)) {
                    lines.push(vec![
                        format!("  {}", b.backend),
                        format!("{:.0}", u.ingest_mb_per_s),
                        format!("{:.0}", u.upload_mb_per_s),
                        format!("{:.1}", u.total_secs),
                        format!("{:.1}", u.drain_secs),
                        u.throttled_writes.to_string(),
                    ]);
                }
            }
            if let (Some(l), Some(e)) = (find(local), find(ec)) {
                lines.push(vec![
                    "  ec/local".to_string(),
                    ratio(e.ingest_mb_per_s, l.ingest_mb_per_s),
                    ratio(e.upload_mb_per_s, l.upload_mb_per_s),
                ]);
            }
        }
        out.push_str(&table::render(&lines));
        out.push('\n');
    }
    let reads: Vec<&BackendRun> = report
        .backends
        .iter()
        .filter(|b| !b.reads.is_empty())
        .collect();
    if !reads.is_empty() {
        out.push_str(&format!(
            "evicted 4k random reads over NBD (fio), {} s per row\n\n",
            report.runtime_secs
        ));
        let mut lines = vec![vec![
            "row".to_string(),
            "IOPS".into(),
            "p50/p99 µs".into(),
            "from backend".into(),
        ]];
        for depth in [1u32, 32] {
            lines.push(vec![format!("qd{depth}")]);
            for b in &reads {
                if let Some(r) = b.reads.iter().find(|r| r.iodepth == depth) {
                    lines.push(vec![
                        format!("  {}", b.backend),
                        format!("{:.0}", r.iops),
                        latencies(r.p50_us, r.p99_us),
                        format!("{:.0}%", r.backend_fraction * 100.0),
                    ]);
                }
            }
            let find = |b: Option<&BackendRun>| -> Option<f64> {
                b.and_then(|b| b.reads.iter().find(|r| r.iodepth == depth))
                    .map(|r| r.iops)
            };
            if let (Some(l), Some(e)) = (find(local), find(ec)) {
                lines.push(vec!["  ec/local".to_string(), ratio(e, l)]);
            }
        }
        out.push_str(&table::render(&lines));
        out.push('\n');
    }
    if let Some(r) = &report.repair {
        out.push_str(&format!(
            "repair: OSD {} killed (-9){}, marked out; `vstor backend repair` timed{}\n\n",
            r.osd,
            r.replacement
                .map_or_else(String::new, |id| format!(", OSD {id} added in its domain")),
            if r.fully_redundant {
                ""
            } else {
                " (NOT fully redundant afterwards)"
            }
        ));
        let lines = vec![
            vec![
                "lost".to_string(),
                "repair s".into(),
                "rebuilt MB/s".into(),
                "rebuilt/moved".into(),
                "read/written".into(),
            ],
            vec![
                table::mib_or_gib(r.lost_bytes as f64),
                format!("{:.2}", r.repair_secs),
                format!("{:.0}", r.rebuilt_mb_per_s),
                format!("{}/{}", r.fragments_rebuilt, r.fragments_moved),
                format!(
                    "{}/{}",
                    table::mib_or_gib(r.bytes_read as f64),
                    table::mib_or_gib(r.bytes_written as f64)
                ),
            ],
        ];
        out.push_str(&table::render(&lines));
        out.push('\n');
        let iops = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.0}"));
        let before = r.iops_before.unwrap_or(f64::NAN);
        let mut lines = vec![vec![
            format!("client 4k randread qd{}", r.iodepth),
            "IOPS".to_string(),
            "vs before".into(),
        ]];
        for (name, value) in [
            ("before", r.iops_before),
            ("degraded (OSD dead)", r.iops_degraded),
            ("during repair", r.iops_during),
            ("after repair", r.iops_after),
        ] {
            lines.push(vec![
                name.to_string(),
                iops(value),
                ratio(value.unwrap_or(f64::NAN), before),
            ]);
        }
        out.push_str(&table::render(&lines));
    }
    out
}

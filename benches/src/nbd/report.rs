//! The benchmark's result, as a table for people or one JSON document for scripts.

use serde::Serialize;

use crate::common::fio::{Job, Sample};
use crate::common::table::{self, latencies, mib_or_gib};

const GIB: f64 = (1u64 << 30) as f64;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub size_bytes: u64,
    pub runtime_secs: u64,
    pub ramp_secs: u64,
    pub rounds: u32,
    pub fio_version: String,
    pub qemu_nbd_version: String,
    pub rows: Vec<Row>,
    pub vstor_memory: Memory,
}

/// One fio job, median over the rounds, for both servers.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub name: String,
    pub rw: String,
    pub block_size: u64,
    pub iodepth: u32,
    pub vstor: Sample,
    pub qemu_nbd: Sample,
    /// vstor IOPS / qemu-nbd IOPS: above 1 means vstor is faster.
    pub ratio: f64,
}

impl Row {
    pub(crate) fn new(job: &Job, vstor: Sample, qemu_nbd: Sample) -> Self {
        Self {
            name: job.name.to_string(),
            rw: job.rw.to_string(),
            block_size: job.block_size,
            iodepth: job.iodepth,
            vstor,
            qemu_nbd,
            ratio: vstor.iops / qemu_nbd.iops,
        }
    }

    fn is_large(&self) -> bool {
        self.block_size >= 1 << 20
    }
}

/// vstor's memory cost of written data: how much its RSS grew while the prefill wrote the whole
/// volume once, and what the volume says its block map takes.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Memory {
    pub rss_baseline_bytes: u64,
    pub rss_after_prefill_bytes: u64,
    pub prefill_bytes: u64,
    pub rss_per_gib_written_bytes: f64,
    pub map_memory_bytes: Option<u64>,
    pub written_bytes: Option<u64>,
}

impl Memory {
    pub(crate) fn new(
        rss_baseline_bytes: u64,
        rss_after_prefill_bytes: u64,
        prefill_bytes: u64,
        map_memory_bytes: Option<u64>,
        written_bytes: Option<u64>,
    ) -> Self {
        let growth = rss_after_prefill_bytes as f64 - rss_baseline_bytes as f64;
        Self {
            rss_baseline_bytes,
            rss_after_prefill_bytes,
            prefill_bytes,
            rss_per_gib_written_bytes: growth / (prefill_bytes as f64 / GIB),
            map_memory_bytes,
            written_bytes,
        }
    }
}

pub(crate) fn to_json(report: &Report) -> serde_json::Result<String> {
    serde_json::to_string_pretty(report)
}

pub(crate) fn to_table(report: &Report) -> String {
    let mut out = format!(
        "vstor vs qemu-nbd over NBD: {} volume, fio nbd engine, {} s per job after {} s ramp, \
         {} ({}, qemu-nbd {})\n\n",
        mib_or_gib(report.size_bytes as f64),
        report.runtime_secs,
        report.ramp_secs,
        table::rounds_label(report.rounds),
        report.fio_version,
        report.qemu_nbd_version,
    );

    let header = [
        "row",
        "vstor IOPS",
        "qemu-nbd IOPS",
        "ratio",
        "vstor p50/p99 µs",
        "qemu-nbd p50/p99 µs",
        "vstor MB/s",
        "qemu-nbd MB/s",
    ];
    let mut lines = vec![header.map(String::from).to_vec()];
    for row in &report.rows {
        let bandwidth = |sample: &Sample| {
            if row.is_large() {
                format!("{:.0}", sample.mb_per_s)
            } else {
                "-".to_string()
            }
        };
        lines.push(vec![
            row.name.clone(),
            format!("{:.0}", row.vstor.iops),
            format!("{:.0}", row.qemu_nbd.iops),
            format!("{:.2}", row.ratio),
            latencies(row.vstor.p50_us, row.vstor.p99_us),
            latencies(row.qemu_nbd.p50_us, row.qemu_nbd.p99_us),
            bandwidth(&row.vstor),
            bandwidth(&row.qemu_nbd),
        ]);
    }
    out.push_str(&table::render(&lines));

    let memory = &report.vstor_memory;
    out.push_str(&format!(
        "\nvstor memory: RSS {} at start, {} after writing {}: {} RSS per GiB written",
        mib_or_gib(memory.rss_baseline_bytes as f64),
        mib_or_gib(memory.rss_after_prefill_bytes as f64),
        mib_or_gib(memory.prefill_bytes as f64),
        mib_or_gib(memory.rss_per_gib_written_bytes),
    ));
    match memory.map_memory_bytes {
        Some(map) => out.push_str(&format!(
            "; volume map {} ({map} bytes)",
            mib_or_gib(map as f64)
        )),
        None => out.push_str("; volume map size not reported"),
    }
    if let Some(written) = memory.written_bytes {
        out.push_str(&format!(
            ", volume reports {} written",
            mib_or_gib(written as f64)
        ));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::super::JOBS;
    use super::*;
    use crate::common::fio::RAMP_SECS;

    fn sample(iops: f64, mb_per_s: f64, p50_us: f64, p99_us: f64) -> Sample {
        Sample {
            iops,
            mb_per_s,
            p50_us,
            p99_us,
            io_bytes: 1,
        }
    }

    fn report() -> Report {
        Report {
            size_bytes: 1 << 30,
            runtime_secs: 10,
            ramp_secs: RAMP_SECS,
            rounds: 3,
            fio_version: "fio-3.33".into(),
            qemu_nbd_version: "10.0.2".into(),
            rows: vec![
                Row::new(
                    &JOBS[0],
                    sample(30000.0, 122.9, 31.5, 88.2),
                    sample(20000.0, 81.9, 24.7, 142.3),
                ),
                Row::new(
                    &JOBS[4],
                    sample(500.0, 524.3, 15000.0, 21000.0),
                    sample(1000.0, 1048.6, 7800.0, 9900.0),
                ),
            ],
            vstor_memory: Memory::new(
                20 << 20,
                (52 << 20) + (1 << 19),
                1 << 30,
                Some(8 << 20),
                Some(1 << 30),
            ),
        }
    }

    #[test]
    fn table_rows_line_up_and_show_ratio_latency_and_bandwidth() {
        let table = to_table(&report());
        let lines: Vec<&str> = table.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("row ")).unwrap();
        let rows = &lines[header..header + 3];
        let width = rows[0].chars().count();
        assert!(rows.iter().all(|l| l.chars().count() == width), "{table}");

        let small: Vec<&str> = rows[1].split_whitespace().collect();
        assert_eq!(
            small,
            [
                "4k",
                "randread",
                "qd1",
                "30000",
                "20000",
                "1.50",
                "31.5/88.2",
                "24.7/142",
                "-",
                "-"
            ]
        );
        let large: Vec<&str> = rows[2].split_whitespace().collect();
        assert_eq!(
            large,
            [
                "1M",
                "seqwrite",
                "qd8",
                "500",
                "1000",
                "0.50",
                "15000/21000",
                "7800/9900",
                "524",
                "1049"
            ]
        );
        assert!(table.contains("median of 3 rounds"), "{table}");
        assert!(
            table.contains(
                "RSS 20 MiB at start, 52.5 MiB after writing 1 GiB: 32.5 MiB RSS per GiB written"
            ),
            "{table}"
        );
        assert!(
            table.contains("volume map 8 MiB (8388608 bytes)"),
            "{table}"
        );
    }

    #[test]
    fn json_carries_the_same_figures() {
        let json: serde_json::Value = serde_json::from_str(&to_json(&report()).unwrap()).unwrap();
        assert_eq!(json["rows"][0]["name"], "4k randread qd1");
        assert_eq!(json["rows"][0]["ratio"], 1.5);
        assert_eq!(json["rows"][1]["qemu_nbd"]["mb_per_s"], 1048.6);
        assert_eq!(json["rows"][0]["vstor"]["p99_us"], 88.2);
        assert!(json["rows"][0]["vstor"].get("io_bytes").is_none());
        assert_eq!(
            json["vstor_memory"]["rss_per_gib_written_bytes"],
            32.5 * 1048576.0
        );
        assert_eq!(json["vstor_memory"]["map_memory_bytes"], 8388608);
    }
}

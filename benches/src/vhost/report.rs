//! The benchmark's result, as a table for people or one JSON document for scripts.

use anyhow::{bail, Result};
use serde::Serialize;

use super::load::{Measurement, BLOCK_SIZE};
use super::Job;
use crate::common::stats::median;
use crate::common::table::{self, latencies, mib_or_gib};

/// vstor should at least match qemu-storage-daemon on every row.
pub(crate) const TARGET_RATIO: f64 = 1.0;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// What the first column measured: `vstor`, or a second qemu-storage-daemon in a
    /// calibration run.
    pub subject: String,
    pub calibration: bool,
    pub size_bytes: u64,
    pub runtime_secs: u64,
    pub warmup_secs: u64,
    pub rounds: u32,
    pub qemu_storage_daemon_version: String,
    pub client: String,
    pub prefill: PrefillSpeeds,
    pub rows: Vec<Row>,
    pub target_ratio: f64,
    /// Names of the rows whose ratio is below [`TARGET_RATIO`].
    pub rows_below_target: Vec<String>,
}

/// MB/s (10^6 bytes/s) of the sequential prefill of each device.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct PrefillSpeeds {
    pub vstor_mb_per_s: f64,
    pub qemu_storage_daemon_mb_per_s: f64,
}

/// One row, median over the rounds, for both servers.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub name: String,
    pub rw: String,
    pub block_size: u64,
    /// Requests in flight per queue.
    pub iodepth: u32,
    pub queues: u32,
    pub vstor: Sample,
    pub qemu_storage_daemon: Sample,
    /// vstor IOPS / qemu-storage-daemon IOPS: above 1 means vstor is faster.
    pub ratio: f64,
}

impl Row {
    pub(crate) fn new(job: &Job, vstor: Sample, qemu_storage_daemon: Sample) -> Self {
        Self {
            name: job.name.to_string(),
            rw: job.rw().to_string(),
            block_size: BLOCK_SIZE as u64,
            iodepth: job.workload.iodepth as u32,
            queues: job.workload.queues as u32,
            vstor,
            qemu_storage_daemon,
            ratio: vstor.iops / qemu_storage_daemon.iops,
        }
    }
}

/// What one run of one row on one server measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Sample {
    pub iops: f64,
    /// Completion latency percentiles in µs.
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Sample {
    pub(crate) fn from_measurement(measurement: &Measurement) -> Result<Self> {
        let percentile = |percent| {
            measurement
                .latency
                .percentile(percent)
                .map(|ns| ns as f64 / 1e3)
        };
        let (Some(p50_us), Some(p99_us)) = (percentile(50.0), percentile(99.0)) else {
            bail!("no latency was recorded");
        };
        Ok(Self {
            iops: measurement.iops(),
            p50_us,
            p99_us,
        })
    }

    /// Median of each figure on its own, as in `bench nbd`.
    pub(crate) fn median(samples: &[Sample]) -> Sample {
        Sample {
            iops: median(samples.iter().map(|s| s.iops)),
            p50_us: median(samples.iter().map(|s| s.p50_us)),
            p99_us: median(samples.iter().map(|s| s.p99_us)),
        }
    }
}

pub(crate) fn rows_below_target(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .filter(|row| row.ratio.is_nan() || row.ratio < TARGET_RATIO)
        .map(|row| row.name.clone())
        .collect()
}

pub(crate) fn to_json(report: &Report) -> serde_json::Result<String> {
    serde_json::to_string_pretty(report)
}

pub(crate) fn to_table(report: &Report) -> String {
    let mut out = format!(
        "{} vs qemu-storage-daemon over vhost-user-blk: {} device, {}, {} s per row after {} s warmup, \
         {} (qemu-storage-daemon {})\n",
        report.subject,
        mib_or_gib(report.size_bytes as f64),
        report.client,
        report.runtime_secs,
        report.warmup_secs,
        table::rounds_label(report.rounds),
        report.qemu_storage_daemon_version,
    );
    if report.calibration {
        out.push_str(
            "calibration run: both columns are qemu-storage-daemon, so the ratios show the noise \
             of the harness, not vstor\n",
        );
    }
    out.push_str("qd is per queue; qsd = qemu-storage-daemon\n\n");

    let subject = if report.calibration {
        "qsd-2"
    } else {
        report.subject.as_str()
    };
    let mut lines = vec![vec![
        "row".to_string(),
        format!("{subject} IOPS"),
        "qsd IOPS".to_string(),
        "ratio".to_string(),
        format!("{subject} p50/p99 µs"),
        "qsd p50/p99 µs".to_string(),
    ]];
    for row in &report.rows {
        lines.push(vec![
            row.name.clone(),
            format!("{:.0}", row.vstor.iops),
            format!("{:.0}", row.qemu_storage_daemon.iops),
            format!("{:.2}", row.ratio),
            latencies(row.vstor.p50_us, row.vstor.p99_us),
            latencies(
                row.qemu_storage_daemon.p50_us,
                row.qemu_storage_daemon.p99_us,
            ),
        ]);
    }
    out.push_str(&table::render(&lines));

    out.push_str(&format!(
        "\nprefill (sequential 1 MiB writes, queue depth 8): {subject} {:.0} MB/s, qsd {:.0} MB/s\n",
        report.prefill.vstor_mb_per_s, report.prefill.qemu_storage_daemon_mb_per_s,
    ));
    let below = &report.rows_below_target;
    if below.is_empty() {
        out.push_str(&format!(
            "target ratio >= {:.2} on every row: met\n",
            report.target_ratio
        ));
    } else {
        out.push_str(&format!(
            "target ratio >= {:.2} on every row: missed on {} of {} rows ({})\n",
            report.target_ratio,
            below.len(),
            report.rows.len(),
            below.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::JOBS;
    use super::*;
    use crate::common::histogram::Histogram;

    fn sample(iops: f64, p50_us: f64, p99_us: f64) -> Sample {
        Sample {
            iops,
            p50_us,
            p99_us,
        }
    }

    fn report() -> Report {
        let rows = vec![
            Row::new(
                &JOBS[0],
                sample(12000.0, 78.5, 140.2),
                sample(8000.0, 110.0, 190.4),
            ),
            Row::new(
                &JOBS[7],
                sample(90000.0, 650.0, 1480.0),
                sample(100000.0, 600.0, 1200.0),
            ),
        ];
        Report {
            subject: "vstor".into(),
            calibration: false,
            size_bytes: 256 << 20,
            runtime_secs: 3,
            warmup_secs: 1,
            rounds: 3,
            qemu_storage_daemon_version: "7.2.22".into(),
            client: "libblkio 0.5 virtio-blk-vhost-user".into(),
            prefill: PrefillSpeeds {
                vstor_mb_per_s: 812.4,
                qemu_storage_daemon_mb_per_s: 1530.6,
            },
            rows_below_target: rows_below_target(&rows),
            rows,
            target_ratio: TARGET_RATIO,
        }
    }

    #[test]
    fn rows_are_named_after_the_workload() {
        let names: Vec<&str> = JOBS.iter().map(|job| job.name).collect();
        assert_eq!(
            names,
            [
                "4k randread qd1 1q",
                "4k randread qd1 2q",
                "4k randread qd32 1q",
                "4k randread qd32 2q",
                "4k randwrite qd1 1q",
                "4k randwrite qd1 2q",
                "4k randwrite qd32 1q",
                "4k randwrite qd32 2q",
            ]
        );
        let row = Row::new(&JOBS[3], sample(2.0, 1.0, 1.0), sample(4.0, 1.0, 1.0));
        assert_eq!(
            (row.rw.as_str(), row.iodepth, row.queues),
            ("randread", 32, 2)
        );
        assert_eq!(row.ratio, 0.5);
    }

    #[test]
    fn table_rows_line_up_and_show_ratio_and_latency() {
        let table = to_table(&report());
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with(
                "vstor vs qemu-storage-daemon over vhost-user-blk: 256 MiB device, \
                 libblkio 0.5 virtio-blk-vhost-user, 3 s per row after 1 s warmup, median of 3 rounds"
            ),
            "{table}"
        );
        let header = lines.iter().position(|l| l.starts_with("row ")).unwrap();
        let rows = &lines[header..header + 3];
        let width = rows[0].chars().count();
        assert!(rows.iter().all(|l| l.chars().count() == width), "{table}");
        assert_eq!(
            rows[0]
                .split("  ")
                .filter(|c| !c.is_empty())
                .map(str::trim)
                .collect::<Vec<_>>(),
            [
                "row",
                "vstor IOPS",
                "qsd IOPS",
                "ratio",
                "vstor p50/p99 µs",
                "qsd p50/p99 µs"
            ]
        );
        let first: Vec<&str> = rows[1].split_whitespace().collect();
        assert_eq!(
            first,
            ["4k", "randread", "qd1", "1q", "12000", "8000", "1.50", "78.5/140", "110/190"]
        );
        let last: Vec<&str> = rows[2].split_whitespace().collect();
        assert_eq!(
            last,
            [
                "4k",
                "randwrite",
                "qd32",
                "2q",
                "90000",
                "100000",
                "0.90",
                "650/1480",
                "600/1200"
            ]
        );
        assert!(
            table.contains(
                "prefill (sequential 1 MiB writes, queue depth 8): vstor 812 MB/s, qsd 1531 MB/s"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "target ratio >= 1.00 on every row: missed on 1 of 2 rows (4k randwrite qd32 2q)"
            ),
            "{table}"
        );
        assert!(!table.contains("calibration"), "{table}");
    }

    #[test]
    fn calibration_tables_say_so_and_a_met_target_too() {
        let mut report = report();
        report.subject = "qemu-storage-daemon".into();
        report.calibration = true;
        report.rows.truncate(1);
        report.rows_below_target = rows_below_target(&report.rows);
        let table = to_table(&report);
        assert!(
            table.contains("calibration run: both columns are qemu-storage-daemon"),
            "{table}"
        );
        assert!(table.contains("qsd-2 IOPS"), "{table}");
        assert!(
            table.contains("target ratio >= 1.00 on every row: met\n"),
            "{table}"
        );
    }

    #[test]
    fn json_carries_the_same_figures() {
        let json: serde_json::Value = serde_json::from_str(&to_json(&report()).unwrap()).unwrap();
        assert_eq!(json["rows"][0]["name"], "4k randread qd1 1q");
        assert_eq!(json["rows"][0]["ratio"], 1.5);
        assert_eq!(json["rows"][0]["iodepth"], 1);
        assert_eq!(json["rows"][1]["queues"], 2);
        assert_eq!(json["rows"][1]["rw"], "randwrite");
        assert_eq!(json["rows"][1]["block_size"], 4096);
        assert_eq!(json["rows"][1]["qemu_storage_daemon"]["iops"], 100000.0);
        assert_eq!(json["rows"][0]["vstor"]["p99_us"], 140.2);
        assert_eq!(json["rows_below_target"][0], "4k randwrite qd32 2q");
        assert_eq!(json["prefill"]["vstor_mb_per_s"], 812.4);
        assert_eq!(json["calibration"], false);
    }

    #[test]
    fn samples_come_from_the_histogram_and_take_medians_per_column() {
        let mut latency = Histogram::new();
        for us in 1..=100u64 {
            latency.record(us * 1000);
        }
        let measured = Sample::from_measurement(&Measurement {
            ios: 100,
            seconds: 0.01,
            latency,
            cpu_seconds: None,
        })
        .unwrap();
        assert_eq!(measured.iops, 10_000.0);
        // 50 µs falls in 49664..=50175 ns (middle 49919), 99 µs in 98304..=99327 (middle 98815).
        assert_eq!(measured.p50_us, 49.919);
        assert_eq!(measured.p99_us, 98.815);

        let empty = Measurement {
            ios: 0,
            seconds: 1.0,
            latency: Histogram::new(),
            cpu_seconds: None,
        };
        assert!(Sample::from_measurement(&empty).is_err());

        let medians = Sample::median(&[
            sample(100.0, 30.0, 90.0),
            sample(300.0, 10.0, 70.0),
            sample(200.0, 20.0, 80.0),
        ]);
        assert_eq!(medians, sample(200.0, 20.0, 80.0));
    }
}

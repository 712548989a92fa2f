//! The benchmark's result, as a table for people or one JSON document for scripts.

use serde::Serialize;

use super::{Mode, Target};
use crate::common::fio::{Job, Sample, RAMP_SECS};
use crate::common::table::{self, latencies, mib_or_gib};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub size_bytes: u64,
    pub runtime_secs: u64,
    pub ramp_secs: u64,
    pub rounds: u32,
    pub fio_version: String,
    pub qemu_nbd_version: String,
    /// Whether `vstor dtl` acknowledged entries only once on disk. It runs without `--fsync`:
    /// entries are acknowledged once in its page cache.
    pub dtl_fsync: bool,
    pub prefill: Prefill,
    pub rows: Vec<Row>,
    /// The least vstor IOPS / qemu-nbd IOPS each DTL mode should reach on every row.
    pub targets: Vec<ModeTarget>,
    /// `"<row> dtl=<mode>"` of every vstor figure that missed its target, or that was measured
    /// while its DTL link went degraded.
    pub below_target: Vec<String>,
    pub targets_met: bool,
}

impl Report {
    pub(crate) fn new(
        size_bytes: u64,
        runtime_secs: u64,
        rounds: u32,
        fio_version: String,
        qemu_nbd_version: String,
        prefill: Prefill,
        rows: Vec<Row>,
    ) -> Self {
        let below_target: Vec<String> = rows
            .iter()
            .flat_map(|row| {
                row.vstor
                    .iter()
                    .filter(|figures| figures.meets_target == Some(false))
                    .map(|figures| format!("{} dtl={}", row.name, figures.dtl_mode.as_str()))
            })
            .collect();
        Self {
            size_bytes,
            runtime_secs,
            ramp_secs: RAMP_SECS,
            rounds,
            fio_version,
            qemu_nbd_version,
            dtl_fsync: false,
            prefill,
            rows,
            targets: Mode::ALL
                .iter()
                .filter_map(|&dtl_mode| {
                    dtl_mode.target_ratio().map(|min_ratio| ModeTarget {
                        dtl_mode,
                        min_ratio,
                    })
                })
                .collect(),
            targets_met: below_target.is_empty(),
            below_target,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct ModeTarget {
    pub dtl_mode: Mode,
    pub min_ratio: f64,
}

/// MB/s (10^6 bytes/s) of each target's sequential prefill.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Prefill {
    pub vstor_none_mb_per_s: f64,
    pub vstor_async_mb_per_s: f64,
    pub vstor_sync_mb_per_s: f64,
    pub qemu_nbd_mb_per_s: f64,
}

impl Prefill {
    pub(crate) fn set(&mut self, target: Target, mb_per_s: f64) {
        let field = match target {
            Target::Vstor(Mode::None) => &mut self.vstor_none_mb_per_s,
            Target::Vstor(Mode::Async) => &mut self.vstor_async_mb_per_s,
            Target::Vstor(Mode::Sync) => &mut self.vstor_sync_mb_per_s,
            Target::QemuNbd => &mut self.qemu_nbd_mb_per_s,
        };
        *field = mb_per_s;
    }
}

/// One fio job, median over the rounds, for qemu-nbd and each DTL mode.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub name: String,
    pub rw: String,
    pub block_size: u64,
    pub iodepth: u32,
    pub qemu_nbd: Sample,
    /// In the order none, async, sync.
    pub vstor: Vec<VstorFigures>,
}

/// One vstor volume's figures in a row.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct VstorFigures {
    pub dtl_mode: Mode,
    #[serde(flatten)]
    pub sample: Sample,
    /// IOPS / qemu-nbd's IOPS: above 1 means vstor is faster.
    pub ratio: f64,
    /// IOPS / the `none` volume's IOPS: what the DTL costs.
    pub vs_none: f64,
    pub target_ratio: Option<f64>,
    /// `None` for a mode without a target; `false` also when the DTL link went degraded.
    pub meets_target: Option<bool>,
    /// Times the volume's DTL link went degraded during this row's measurements.
    pub dtl_degradations: u64,
}

impl Row {
    /// `vstor`: per mode, the median sample and the degradations seen over the rounds.
    pub(crate) fn new(job: &Job, qemu_nbd: Sample, vstor: [(Mode, Sample, u64); 3]) -> Self {
        let none_iops = vstor
            .iter()
            .find(|(mode, _, _)| *mode == Mode::None)
            .map_or(f64::NAN, |(_, sample, _)| sample.iops);
        let vstor = vstor
            .into_iter()
            .map(|(dtl_mode, sample, dtl_degradations)| {
                let ratio = sample.iops / qemu_nbd.iops;
                let target_ratio = dtl_mode.target_ratio();
                VstorFigures {
                    dtl_mode,
                    sample,
                    ratio,
                    vs_none: sample.iops / none_iops,
                    target_ratio,
                    meets_target: target_ratio.map(|min| ratio >= min && dtl_degradations == 0),
                    dtl_degradations,
                }
            })
            .collect();
        Self {
            name: job.name.to_string(),
            rw: job.rw.to_string(),
            block_size: job.block_size,
            iodepth: job.iodepth,
            qemu_nbd,
            vstor,
        }
    }
}

pub(crate) fn to_json(report: &Report) -> serde_json::Result<String> {
    serde_json::to_string_pretty(report)
}

pub(crate) fn to_table(report: &Report) -> String {
    let mut out = format!(
        "vstor with a DTL vs qemu-nbd over NBD: {} volumes, fio nbd engine, {} s per job after {} s ramp, \
         {} ({}, qemu-nbd {})\n\
         DTL: `vstor dtl` in a process of its own on loopback, acknowledging from its page cache \
         (no --fsync)\n\n",
        mib_or_gib(report.size_bytes as f64),
        report.runtime_secs,
        report.ramp_secs,
        table::rounds_label(report.rounds),
        report.fio_version,
        report.qemu_nbd_version,
    );

    let header = [
        "row / server",
        "IOPS",
        "p50/p99 µs",
        "vs qemu-nbd",
        "vs none",
        "target",
    ];
    let mut lines = vec![header.map(String::from).to_vec()];
    for row in &report.rows {
        lines.push(vec![row.name.clone()]);
        let q = &row.qemu_nbd;
        lines.push(vec![
            format!("  {}", Target::QemuNbd.name()),
            format!("{:.0}", q.iops),
            latencies(q.p50_us, q.p99_us),
            "-".to_string(),
            "-".to_string(),
        ]);
        for figures in &row.vstor {
            let s = &figures.sample;
            let vs_none = if figures.dtl_mode == Mode::None {
                "-".to_string()
            } else {
                format!("{:.2}", figures.vs_none)
            };
            let target = match (figures.target_ratio, figures.meets_target) {
                (Some(min), Some(met)) => {
                    let verdict = if figures.dtl_degradations > 0 {
                        "degraded"
                    } else if met {
                        "met"
                    } else {
                        "missed"
                    };
                    format!(">= {min:.2} {verdict}")
                }
                _ => String::new(),
            };
            lines.push(vec![
                format!("  {}", Target::Vstor(figures.dtl_mode).name()),
                format!("{:.0}", s.iops),
                latencies(s.p50_us, s.p99_us),
                format!("{:.2}", figures.ratio),
                vs_none,
                target,
            ]);
        }
    }
    out.push_str(&table::render(&lines));

    let p = &report.prefill;
    out.push_str(&format!(
        "\nprefill (sequential 1 MiB writes, queue depth 8): qemu-nbd {:.0} MB/s, vstor dtl=none \
         {:.0} MB/s, dtl=async {:.0} MB/s, dtl=sync {:.0} MB/s\n",
        p.qemu_nbd_mb_per_s, p.vstor_none_mb_per_s, p.vstor_async_mb_per_s, p.vstor_sync_mb_per_s,
    ));
    let targets: Vec<String> = report
        .targets
        .iter()
        .map(|t| format!("dtl={} >= {:.2}", t.dtl_mode.as_str(), t.min_ratio))
        .collect();
    out.push_str(&format!(
        "targets (vstor IOPS / qemu-nbd IOPS on every row: {}): ",
        targets.join(", ")
    ));
    if report.targets_met {
        out.push_str("met\n");
    } else {
        out.push_str(&format!("missed on {}\n", report.below_target.join(", ")));
    }
    for row in &report.rows {
        for figures in row.vstor.iter().filter(|f| f.dtl_degradations > 0) {
            out.push_str(&format!(
                "warning: the DTL link of dtl={} went degraded {} times during {}; those writes \
                 were not all mirrored, so its figures flatter it\n",
                figures.dtl_mode.as_str(),
                figures.dtl_degradations,
                row.name
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::JOBS;
    use super::*;

    fn sample(iops: f64, p50_us: f64, p99_us: f64) -> Sample {
        Sample {
            iops,
            mb_per_s: iops * 4096.0 / 1e6,
            p50_us,
            p99_us,
            io_bytes: 1,
        }
    }

    fn report(sync_degradations: u64) -> Report {
        let prefill = Prefill {
            vstor_none_mb_per_s: 900.0,
            vstor_async_mb_per_s: 800.0,
            vstor_sync_mb_per_s: 600.0,
            qemu_nbd_mb_per_s: 1000.0,
        };
        Report::new(
            1 << 30,
            10,
            2,
            "fio-3.33".into(),
            "7.2.0".into(),
            prefill,
            vec![
                Row::new(
                    &JOBS[0],
                    sample(5000.0, 150.0, 280.0),
                    [
                        (Mode::None, sample(8000.0, 97.0, 187.0), 0),
                        (Mode::Async, sample(6000.0, 120.0, 250.0), 0),
                        (Mode::Sync, sample(4500.0, 170.0, 330.0), 0),
                    ],
                ),
                Row::new(
                    &JOBS[1],
                    sample(20000.0, 1600.0, 3000.0),
                    [
                        (Mode::None, sample(40000.0, 600.0, 2500.0), 0),
                        (Mode::Async, sample(19000.0, 1500.0, 3100.0), 0),
                        (
                            Mode::Sync,
                            sample(18000.0, 1700.0, 3500.0),
                            sync_degradations,
                        ),
                    ],
                ),
            ],
        )
    }

    #[test]
    fn table_groups_rows_and_judges_the_targets() {
        let table = to_table(&report(0));
        let lines: Vec<&str> = table.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.starts_with("row / server"))
            .unwrap();
        let width = lines[header].chars().count();
        let measured: Vec<&str> = lines[header + 1..header + 11]
            .iter()
            .copied()
            .filter(|l| l.starts_with("  "))
            .collect();
        assert_eq!(measured.len(), 8, "{table}");
        // Lines without a target end with the `vs none` column.
        let vs_none_end = lines[header].find("vs none").unwrap() + "vs none".len();
        let without_target = lines[header][..vs_none_end].chars().count();
        for line in &measured {
            let chars = line.chars().count();
            assert!(chars == width || chars == without_target, "{table}");
        }
        assert_eq!(lines[header + 1], "4k randwrite qd1", "{table}");
        let cells = |line: &str| {
            line.split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[header + 2]),
            ["qemu-nbd", "5000", "150/280", "-", "-"]
        );
        assert_eq!(
            cells(lines[header + 3]),
            ["vstor", "dtl=none", "8000", "97.0/187", "1.60", "-"]
        );
        assert_eq!(
            cells(lines[header + 4]),
            [
                "vstor",
                "dtl=async",
                "6000",
                "120/250",
                "1.20",
                "0.75",
                ">=",
                "1.00",
                "met"
            ]
        );
        assert_eq!(
            cells(lines[header + 5]),
            ["vstor", "dtl=sync", "4500", "170/330", "0.90", "0.56", ">=", "0.80", "met"]
        );
        assert_eq!(
            cells(lines[header + 9]),
            [
                "vstor",
                "dtl=async",
                "19000",
                "1500/3100",
                "0.95",
                "0.47",
                ">=",
                "1.00",
                "missed"
            ]
        );
        assert!(
            table.contains("targets (vstor IOPS / qemu-nbd IOPS on every row: dtl=async >= 1.00, dtl=sync >= 0.80): missed on 4k randwrite qd32 dtl=async\n"),
            "{table}"
        );
        assert!(table.contains("median of 2 rounds"), "{table}");
        assert!(
            table.contains("qemu-nbd 1000 MB/s, vstor dtl=none 900 MB/s"),
            "{table}"
        );
        assert!(!table.contains("warning"), "{table}");
    }

    #[test]
    fn a_degraded_link_misses_its_target_and_is_called_out() {
        let report = report(2);
        assert!(!report.targets_met);
        assert_eq!(
            report.below_target,
            ["4k randwrite qd32 dtl=async", "4k randwrite qd32 dtl=sync"]
        );
        let table = to_table(&report);
        assert!(table.contains(">= 0.80 degraded"), "{table}");
        assert!(
            table.contains(
                "warning: the DTL link of dtl=sync went degraded 2 times during 4k randwrite qd32"
            ),
            "{table}"
        );
    }

    #[test]
    fn all_targets_met() {
        let mut report = report(0);
        report.rows.truncate(1);
        let report = Report::new(
            report.size_bytes,
            report.runtime_secs,
            report.rounds,
            report.fio_version,
            report.qemu_nbd_version,
            report.prefill,
            report.rows,
        );
        assert!(report.targets_met);
        assert!(to_table(&report).contains("dtl=sync >= 0.80): met\n"));
    }

    #[test]
    fn json_carries_the_same_figures() {
        let json: serde_json::Value = serde_json::from_str(&to_json(&report(0)).unwrap()).unwrap();
        let row = &json["rows"][0];
        assert_eq!(row["name"], "4k randwrite qd1");
        assert_eq!(row["iodepth"], 1);
        assert_eq!(row["qemu_nbd"]["iops"], 5000.0);
        assert_eq!(row["vstor"][2]["dtl_mode"], "sync");
        assert_eq!(row["vstor"][2]["iops"], 4500.0);
        assert_eq!(row["vstor"][2]["p99_us"], 330.0);
        assert_eq!(row["vstor"][2]["ratio"], 0.9);
        assert_eq!(row["vstor"][2]["target_ratio"], 0.8);
        assert_eq!(row["vstor"][2]["meets_target"], true);
        assert_eq!(row["vstor"][0]["meets_target"], serde_json::Value::Null);
        assert!(row["vstor"][2].get("io_bytes").is_none());
        assert_eq!(json["targets"][0]["dtl_mode"], "async");
        assert_eq!(json["targets"][1]["min_ratio"], 0.8);
        assert_eq!(json["targets_met"], false);
        assert_eq!(json["dtl_fsync"], false);
        assert_eq!(json["prefill"]["vstor_sync_mb_per_s"], 600.0);
    }
}

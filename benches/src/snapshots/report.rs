//! The benchmark's result, as tables for people or one JSON document for scripts.

use std::time::Duration;

use serde::Serialize;
use vstor_volumedriver::ScrubReport;

use super::load::{ReadFigures, WriterFigures};
use crate::common::stats::percentile;
use crate::common::table::{self, latencies, mib_or_gib, micros};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub size_bytes: u64,
    pub runtime_secs: u64,
    pub warmup_secs: u64,
    pub cluster_size: u64,
    pub sco_size: u64,
    /// Not-yet-uploaded bytes per volume above which writes are throttled.
    pub volume_write_buffer: u64,
    /// SCO bytes the node's write buffer holds before disposable SCOs are evicted.
    pub node_write_buffer_limit: u64,
    /// Seed of the pseudo-random offsets and payloads.
    pub seed: u64,
    pub snapshots: SnapshotFigures,
    pub clones: CloneFigures,
    pub scrub: ScrubFigures,
    pub reads: ReadComparison,
}

/// A latency distribution over a handful to a few hundred samples, in µs.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Latency {
    pub count: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    /// Nearest-rank percentiles of `samples_us`: with fewer than 100 samples the p99 is the
    /// largest one.
    pub(crate) fn of(samples_us: &[f64]) -> Self {
        Self {
            count: samples_us.len(),
            p50_us: percentile(samples_us, 50.0),
            p99_us: percentile(samples_us, 99.0),
            max_us: percentile(samples_us, 100.0),
            mean_us: samples_us.iter().sum::<f64>() / samples_us.len() as f64,
        }
    }
}

/// `later` IOPS / `alone` IOPS.
fn iops_ratio(later: &WriterFigures, alone: &WriterFigures) -> f64 {
    later.iops / alone.iops
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SnapshotFigures {
    pub count: usize,
    /// Planned time between two snapshots under load (the runtime / the count).
    pub interval_ms: f64,
    /// `snapshot_create` on the volume without a writer, back to back, one 4 KiB write before each.
    pub create_idle: Latency,
    /// `snapshot_create` while the writer runs, at a steady pace.
    pub create_under_load: Latency,
    pub writer_alone: WriterFigures,
    pub writer_with_snapshots: WriterFigures,
    /// Writer IOPS with snapshots / without.
    pub writer_ratio: f64,
}

impl SnapshotFigures {
    pub(crate) fn new(
        count: usize,
        interval: Duration,
        create_idle: Latency,
        create_under_load: Latency,
        writer_alone: WriterFigures,
        writer_with_snapshots: WriterFigures,
    ) -> Self {
        Self {
            count,
            interval_ms: interval.as_secs_f64() * 1e3,
            create_idle,
            create_under_load,
            writer_ratio: iops_ratio(&writer_with_snapshots, &writer_alone),
            writer_alone,
            writer_with_snapshots,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct CloneFigures {
    /// Clones per batch.
    pub count: usize,
    /// Bytes written to the parent before its snapshot (all of it).
    pub parent_data_bytes: u64,
    /// MB/s of the parent's sequential 1 MiB fill.
    pub prefill_mb_per_s: f64,
    /// The parent's snapshot: its `snapshot_create`, and how long until it was on the backend.
    pub snapshot_create_us: f64,
    pub snapshot_in_backend_ms: f64,
    pub idle: Latency,
    pub under_load: Latency,
    /// The writer on the parent, without and then during the second batch.
    pub writer_alone: WriterFigures,
    pub writer_during_clones: WriterFigures,
    pub writer_ratio: f64,
}

impl CloneFigures {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        count: usize,
        parent_data_bytes: u64,
        prefill_mb_per_s: f64,
        snapshot_create_us: f64,
        snapshot_in_backend_ms: f64,
        idle: Latency,
        under_load: Latency,
        writer_alone: WriterFigures,
        writer_during_clones: WriterFigures,
    ) -> Self {
        Self {
            count,
            parent_data_bytes,
            prefill_mb_per_s,
            snapshot_create_us,
            snapshot_in_backend_ms,
            idle,
            under_load,
            writer_ratio: iops_ratio(&writer_during_clones, &writer_alone),
            writer_alone,
            writer_during_clones,
        }
    }
}

/// One scrub: the engine's [`ScrubReport`], its duration and what it amounts to per second.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScrubRun {
    /// Bytes per second the scrub could copy at most; `None` for no limit.
    pub rate_limit: Option<u64>,
    pub seconds: f64,
    /// The engine's garbage estimate (`garbage_bytes`) and the SCO data the backend TLogs
    /// referenced, before the scrub.
    pub garbage_bytes_before: u64,
    pub backend_bytes_before: u64,
    pub bytes_copied: u64,
    pub bytes_freed: u64,
    pub scos_rewritten: u64,
    pub scos_deleted: u64,
    pub tlogs_before: usize,
    pub tlogs_after: usize,
    pub orphans_deleted: u64,
    /// Live data copied, and space freed, per second of the whole scrub (10^6 bytes/s).
    pub copied_mb_per_s: f64,
    pub freed_mb_per_s: f64,
}

impl ScrubRun {
    pub(crate) fn new(
        rate_limit: Option<u64>,
        elapsed: Duration,
        garbage_bytes_before: u64,
        backend_bytes_before: u64,
        report: &ScrubReport,
    ) -> Self {
        let seconds = elapsed.as_secs_f64();
        Self {
            rate_limit,
            seconds,
            garbage_bytes_before,
            backend_bytes_before,
            bytes_copied: report.bytes_copied,
            bytes_freed: report.bytes_freed,
            scos_rewritten: report.scos_rewritten,
            scos_deleted: report.scos_deleted,
            tlogs_before: report.tlogs_before,
            tlogs_after: report.tlogs_after,
            orphans_deleted: report.orphans_deleted,
            copied_mb_per_s: report.bytes_copied as f64 / seconds / 1e6,
            freed_mb_per_s: report.bytes_freed as f64 / seconds / 1e6,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScrubFigures {
    /// 4 KiB overwrites at pseudo-random offsets before each scrub (as many as the volume has
    /// clusters).
    pub overwrites: u64,
    /// No writer, no rate limit.
    pub idle: ScrubRun,
    pub writer_alone: WriterFigures,
    /// At the product's default rate limit, while the writer writes to the volume.
    pub limited: ScrubRun,
    pub writer_during_limited: WriterFigures,
    pub limited_writer_ratio: f64,
    /// Without a limit, while the writer writes to the volume.
    pub unlimited: ScrubRun,
    pub writer_during_unlimited: WriterFigures,
    pub unlimited_writer_ratio: f64,
}

impl ScrubFigures {
    pub(crate) fn new(
        overwrites: u64,
        idle: ScrubRun,
        writer_alone: WriterFigures,
        limited: ScrubRun,
        writer_during_limited: WriterFigures,
        unlimited: ScrubRun,
        writer_during_unlimited: WriterFigures,
    ) -> Self {
        Self {
            overwrites,
            idle,
            limited_writer_ratio: iops_ratio(&writer_during_limited, &writer_alone),
            unlimited_writer_ratio: iops_ratio(&writer_during_unlimited, &writer_alone),
            writer_alone,
            limited,
            writer_during_limited,
            unlimited,
            writer_during_unlimited,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReadComparison {
    /// SCO bytes of the parent in its write buffer before the reads, and how much of it was
    /// evicted before the parent was read from the backend.
    pub parent_local_bytes: u64,
    pub evicted_bytes: u64,
    pub sequential: ReadRow,
    pub random: ReadRow,
}

/// One read pattern on the parent, with its write-buffer copies and then without, each next to
/// a measurement of the clone.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReadRow {
    pub parent_local: ReadFigures,
    /// The clone, measured right after `parent_local`.
    pub clone_1: ReadFigures,
    pub parent_backend: ReadFigures,
    /// The clone, measured right after `parent_backend`.
    pub clone_2: ReadFigures,
    /// The clone's MB/s / the parent's (same request size, so also the IOPS ratio).
    pub clone_vs_parent_local: f64,
    pub clone_vs_parent_backend: f64,
}

impl ReadRow {
    /// `(parent, clone)` with the parent's write-buffer copies, and after their eviction.
    pub(crate) fn new(
        local: (ReadFigures, ReadFigures),
        backend: (ReadFigures, ReadFigures),
    ) -> Self {
        let ((parent_local, clone_1), (parent_backend, clone_2)) = (local, backend);
        Self {
            clone_vs_parent_local: clone_1.mb_per_s / parent_local.mb_per_s,
            clone_vs_parent_backend: clone_2.mb_per_s / parent_backend.mb_per_s,
            parent_local,
            clone_1,
            parent_backend,
            clone_2,
        }
    }
}

pub(crate) fn to_json(report: &Report) -> serde_json::Result<String> {
    serde_json::to_string_pretty(report)
}

fn cells<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.map(String::from).to_vec()
}

/// Milliseconds with one decimal below 100 ms, whole ones above.
fn millis(us: f64) -> String {
    let ms = us / 1e3;
    if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".to_string();
    }
    format!("{:.0} %", part as f64 * 100.0 / whole as f64)
}

fn ratio(value: f64) -> String {
    format!("{value:.2}")
}

/// The writer's line: IOPS, vs alone, p50/p99/max µs, throttled share.
fn writer_line(name: &str, figures: &WriterFigures, vs_alone: Option<f64>) -> Vec<String> {
    vec![
        name.to_string(),
        format!("{:.0}", figures.iops),
        vs_alone.map_or("-".to_string(), ratio),
        format!(
            "{}/{}",
            latencies(figures.p50_us, figures.p99_us),
            micros(figures.max_us)
        ),
        percent(figures.throttled_writes, figures.writes),
        format!("{:.1}", figures.seconds),
    ]
}

fn writer_header(first: &str) -> Vec<String> {
    cells([
        first,
        "IOPS",
        "vs alone",
        "p50/p99/max µs",
        "throttled",
        "s",
    ])
}

fn rate_label(rate: Option<u64>) -> String {
    rate.map_or("none".to_string(), |r| {
        format!("{}/s", mib_or_gib(r as f64))
    })
}

fn scrub_line(name: &str, run: &ScrubRun) -> Vec<String> {
    vec![
        name.to_string(),
        rate_label(run.rate_limit),
        format!("{:.2}", run.seconds),
        mib_or_gib(run.bytes_copied as f64),
        format!("{:.0}", run.copied_mb_per_s),
        mib_or_gib(run.bytes_freed as f64),
        format!("{:.0}", run.freed_mb_per_s),
        format!("{}/{}", run.scos_rewritten, run.scos_deleted),
        format!("{}/{}", run.tlogs_before, run.tlogs_after),
    ]
}

fn read_lines(name: &str, row: &ReadRow, random: bool) -> Vec<Vec<String>> {
    let value = |f: &ReadFigures| {
        if random {
            format!("{:.0}", f.iops)
        } else {
            format!("{:.0}", f.mb_per_s)
        }
    };
    let pairs = [
        (&row.parent_local, &row.clone_1, row.clone_vs_parent_local),
        (
            &row.parent_backend,
            &row.clone_2,
            row.clone_vs_parent_backend,
        ),
    ];
    let mut figures = vec![name.to_string()];
    let mut latency = vec!["  p50/p99 µs".to_string()];
    let mut backend_reads = vec!["  backend reads".to_string()];
    for (parent, clone, clone_vs_parent) in pairs {
        figures.extend([value(parent), value(clone), ratio(clone_vs_parent)]);
        for f in [parent, clone] {
            latency.push(latencies(f.p50_us, f.p99_us));
            backend_reads.push(f.backend_reads.to_string());
        }
        latency.push(String::new());
        backend_reads.push(String::new());
    }
    vec![figures, latency, backend_reads]
}

pub(crate) fn to_table(report: &Report) -> String {
    let mut out = format!(
        "vstor engine: snapshots, clones, scrub and clone reads through the volume API (no frontend), \
         {} volumes on a local backend\n\
         {} KiB clusters, {} SCOs, {} write buffer per volume, {} node write-buffer limit, no DTL; \
         writer windows {} s after {} s warm-up; MB/s = 10^6 bytes/s\n",
        mib_or_gib(report.size_bytes as f64),
        report.cluster_size / 1024,
        mib_or_gib(report.sco_size as f64),
        mib_or_gib(report.volume_write_buffer as f64),
        mib_or_gib(report.node_write_buffer_limit as f64),
        report.runtime_secs,
        report.warmup_secs,
    );

    let s = &report.snapshots;
    out.push_str(&format!(
        "\n1. snapshot creation (Volume::snapshot_create), {} per row: idle, back to back with one \
         4 KiB write before each; then one every {:.1} ms while a writer does 4 KiB random writes \
         without flushes\n",
        s.count, s.interval_ms
    ));
    let snapshot_line = |name: &str, l: &Latency| {
        vec![
            name.to_string(),
            l.count.to_string(),
            micros(l.p50_us),
            micros(l.p99_us),
            micros(l.max_us),
            micros(l.mean_us),
        ]
    };
    out.push_str(&table::render(&[
        cells(["", "count", "p50 µs", "p99 µs", "max µs", "mean µs"]),
        snapshot_line("idle", &s.create_idle),
        snapshot_line("under write load", &s.create_under_load),
    ]));
    out.push('\n');
    out.push_str(&table::render(&[
        writer_header("writer"),
        writer_line("alone", &s.writer_alone, None),
        writer_line(
            "while snapshotting",
            &s.writer_with_snapshots,
            Some(s.writer_ratio),
        ),
    ]));

    let c = &report.clones;
    out.push_str(&format!(
        "\n2. clone creation (VolumeManager::clone_volume) of a snapshot of {} of written data, \
         {} clones back to back per row\n",
        mib_or_gib(c.parent_data_bytes as f64),
        c.count
    ));
    let clone_line = |name: &str, l: &Latency| {
        vec![
            name.to_string(),
            l.count.to_string(),
            millis(l.p50_us),
            millis(l.p99_us),
            millis(l.max_us),
            millis(l.mean_us),
        ]
    };
    out.push_str(&table::render(&[
        cells(["", "count", "p50 ms", "p99 ms", "max ms", "mean ms"]),
        clone_line("parent idle", &c.idle),
        clone_line("parent under write load", &c.under_load),
    ]));
    out.push('\n');
    out.push_str(&table::render(&[
        writer_header("writer on the parent"),
        writer_line("alone", &c.writer_alone, None),
        writer_line(
            "while cloning",
            &c.writer_during_clones,
            Some(c.writer_ratio),
        ),
    ]));
    out.push_str(&format!(
        "(p99 of {} clones is the slowest one; parent fill {:.0} MB/s, its snapshot took {} µs \
         and was on the backend after {} ms)\n",
        c.count,
        c.prefill_mb_per_s,
        micros(c.snapshot_create_us),
        millis(c.snapshot_in_backend_ms * 1e3),
    ));

    let sc = &report.scrub;
    out.push_str(&format!(
        "\n3. scrub after {} 4 KiB random overwrites of a fully written volume (about half of the \
         backend's clusters garbage)\n",
        sc.overwrites
    ));
    out.push_str(&table::render(&[
        cells([
            "",
            "rate limit",
            "s",
            "copied",
            "MB/s",
            "freed",
            "MB/s",
            "SCOs rewr/del",
            "TLogs before/after",
        ]),
        scrub_line("idle", &sc.idle),
        scrub_line("under writer", &sc.limited),
        scrub_line("under writer", &sc.unlimited),
    ]));
    out.push_str(&format!(
        "(garbage before each scrub, engine estimate / backend data: {} / {}, {} / {}, {} / {})\n\n",
        mib_or_gib(sc.idle.garbage_bytes_before as f64),
        mib_or_gib(sc.idle.backend_bytes_before as f64),
        mib_or_gib(sc.limited.garbage_bytes_before as f64),
        mib_or_gib(sc.limited.backend_bytes_before as f64),
        mib_or_gib(sc.unlimited.garbage_bytes_before as f64),
        mib_or_gib(sc.unlimited.backend_bytes_before as f64),
    ));
    out.push_str(&table::render(&[
        writer_header("writer on another volume"),
        writer_line("no scrub", &sc.writer_alone, None),
        writer_line(
            &format!("scrub at {}", rate_label(sc.limited.rate_limit)),
            &sc.writer_during_limited,
            Some(sc.limited_writer_ratio),
        ),
        writer_line(
            "scrub without limit",
            &sc.writer_during_unlimited,
            Some(sc.unlimited_writer_ratio),
        ),
    ]));

    let r = &report.reads;
    out.push_str(&format!(
        "\n4. reads of a clone's inherited data vs its parent (Volume::read, one thread); the parent \
         first with its {} of write-buffer SCOs, then after evicting {}\n",
        mib_or_gib(r.parent_local_bytes as f64),
        mib_or_gib(r.evicted_bytes as f64),
    ));
    let mut lines = vec![cells([
        "",
        "parent local",
        "clone",
        "clone/parent",
        "parent backend",
        "clone",
        "clone/parent",
    ])];
    lines.extend(read_lines("seq 1 MiB MB/s", &r.sequential, false));
    lines.extend(read_lines("rand 4 KiB IOPS", &r.random, true));
    out.push_str(&table::render(&lines));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(iops: f64) -> WriterFigures {
        WriterFigures {
            seconds: 2.0,
            writes: (iops * 2.0) as u64,
            iops,
            p50_us: 5.0,
            p99_us: 40.0,
            max_us: 900.0,
            throttled_writes: (iops * 0.2) as u64,
            throttle_ms: 10.0,
        }
    }

    fn reads(mb_per_s: f64, backend_reads: u64) -> ReadFigures {
        ReadFigures {
            seconds: 2.0,
            bytes: (mb_per_s * 2e6) as u64,
            reads: 100,
            mb_per_s,
            iops: mb_per_s * 1e6 / 4096.0,
            p50_us: 10.0,
            p99_us: 120.0,
            backend_reads,
        }
    }

    fn scrub(rate_limit: Option<u64>, seconds: f64) -> ScrubRun {
        let report = ScrubReport {
            tlogs_before: 9,
            tlogs_after: 2,
            scos_rewritten: 8,
            scos_deleted: 1,
            bytes_copied: 256 << 20,
            bytes_freed: 256 << 20,
            orphans_deleted: 0,
        };
        ScrubRun::new(
            rate_limit,
            Duration::from_secs_f64(seconds),
            256 << 20,
            512 << 20,
            &report,
        )
    }

    fn report() -> Report {
        let latencies: Vec<f64> = (1..=200).map(f64::from).collect();
        Report {
            size_bytes: 256 << 20,
            runtime_secs: 2,
            warmup_secs: 1,
            cluster_size: 4096,
            sco_size: 64 << 20,
            volume_write_buffer: 1 << 30,
            node_write_buffer_limit: 1 << 30,
            seed: 42,
            snapshots: SnapshotFigures::new(
                200,
                Duration::from_millis(10),
                Latency::of(&[50.0, 60.0]),
                Latency::of(&latencies),
                writer(100_000.0),
                writer(80_000.0),
            ),
            clones: CloneFigures::new(
                20,
                256 << 20,
                900.0,
                150.0,
                420.0,
                Latency::of(&[8_000.0, 12_000.0]),
                Latency::of(&[20_000.0, 30_000.0]),
                writer(100_000.0),
                writer(50_000.0),
            ),
            scrub: ScrubFigures::new(
                65_536,
                scrub(None, 0.5),
                writer(100_000.0),
                scrub(Some(64 << 20), 4.0),
                writer(90_000.0),
                scrub(None, 1.0),
                writer(60_000.0),
            ),
            reads: ReadComparison {
                parent_local_bytes: 256 << 20,
                evicted_bytes: 256 << 20,
                sequential: ReadRow::new(
                    (reads(2000.0, 0), reads(400.0, 300)),
                    (reads(800.0, 300), reads(400.0, 300)),
                ),
                random: ReadRow::new(
                    (reads(400.0, 0), reads(50.0, 9000)),
                    (reads(100.0, 9000), reads(50.0, 9000)),
                ),
            },
        }
    }

    fn words(line: &str) -> Vec<&str> {
        line.split_whitespace().collect()
    }

    fn line_starting<'a>(table: &'a str, prefix: &str, nth: usize) -> &'a str {
        table
            .lines()
            .filter(|l| l.starts_with(prefix))
            .nth(nth)
            .unwrap_or_else(|| panic!("no line {nth} starting with {prefix:?} in\n{table}"))
    }

    #[test]
    fn latencies_use_nearest_rank_percentiles() {
        let latency = Latency::of(&(1..=200).rev().map(f64::from).collect::<Vec<_>>());
        assert_eq!(latency.count, 200);
        assert_eq!(latency.p50_us, 100.0);
        assert_eq!(latency.p99_us, 198.0);
        assert_eq!(latency.max_us, 200.0);
        assert_eq!(latency.mean_us, 100.5);
        let few = Latency::of(&[3.0, 1.0, 2.0]);
        assert_eq!((few.p50_us, few.p99_us, few.max_us), (2.0, 3.0, 3.0));
    }

    #[test]
    fn ratios_and_rates() {
        let report = report();
        assert_eq!(report.snapshots.writer_ratio, 0.8);
        assert_eq!(report.clones.writer_ratio, 0.5);
        assert_eq!(report.scrub.limited_writer_ratio, 0.9);
        assert_eq!(report.scrub.unlimited_writer_ratio, 0.6);
        assert!((report.scrub.limited.copied_mb_per_s - 67.108864).abs() < 1e-9);
        assert!((report.scrub.idle.freed_mb_per_s - 536.870912).abs() < 1e-9);
        assert_eq!(report.reads.sequential.clone_vs_parent_local, 0.2);
        assert_eq!(report.reads.sequential.clone_vs_parent_backend, 0.5);
        assert_eq!(report.reads.random.clone_vs_parent_backend, 0.5);
    }

    #[test]
    fn table_rows() {
        let table = to_table(&report());
        assert!(table.contains("256 MiB volumes"), "{table}");
        assert!(table.contains("then one every 10.0 ms while"), "{table}");
        assert_eq!(
            words(line_starting(&table, "idle", 0)),
            ["idle", "2", "50.0", "60.0", "60.0", "55.0"]
        );
        assert_eq!(
            words(line_starting(&table, "under write load", 0)),
            ["under", "write", "load", "200", "100", "198", "200", "100"]
        );
        assert_eq!(
            words(line_starting(&table, "while snapshotting", 0)),
            [
                "while",
                "snapshotting",
                "80000",
                "0.80",
                "5.0/40.0/900",
                "10",
                "%",
                "2.0"
            ]
        );
        assert_eq!(
            words(line_starting(&table, "parent under write load", 0)),
            ["parent", "under", "write", "load", "2", "20.0", "30.0", "30.0", "25.0"]
        );
        assert_eq!(
            words(line_starting(&table, "idle", 1)),
            ["idle", "none", "0.50", "256", "MiB", "537", "256", "MiB", "537", "8/1", "9/2"]
        );
        assert_eq!(
            words(line_starting(&table, "under writer", 0))[..4],
            ["under", "writer", "64", "MiB/s"]
        );
        assert_eq!(
            words(line_starting(&table, "scrub at 64 MiB/s", 0))[4..6],
            ["90000", "0.90"]
        );
        assert_eq!(
            words(line_starting(&table, "seq 1 MiB MB/s", 0)),
            ["seq", "1", "MiB", "MB/s", "2000", "400", "0.20", "800", "400", "0.50"]
        );
        assert_eq!(
            words(line_starting(&table, "  backend reads", 1)),
            ["backend", "reads", "0", "9000", "9000", "9000"]
        );
        assert_eq!(
            words(line_starting(&table, "  p50/p99 µs", 0)),
            ["p50/p99", "µs", "10.0/120", "10.0/120", "10.0/120", "10.0/120"]
        );
    }

    #[test]
    fn json_carries_the_figures() {
        let json: serde_json::Value = serde_json::from_str(&to_json(&report()).unwrap()).unwrap();
        assert_eq!(json["snapshots"]["create_under_load"]["p99_us"], 198.0);
        assert_eq!(json["snapshots"]["create_idle"]["count"], 2);
        assert_eq!(json["snapshots"]["writer_with_snapshots"]["iops"], 80_000.0);
        assert_eq!(json["clones"]["under_load"]["count"], 2);
        assert_eq!(json["scrub"]["limited"]["rate_limit"], 64 << 20);
        assert_eq!(json["scrub"]["idle"]["rate_limit"], serde_json::Value::Null);
        assert_eq!(json["scrub"]["idle"]["scos_rewritten"], 8);
        assert_eq!(json["reads"]["random"]["clone_2"]["backend_reads"], 9000);
        assert_eq!(json["reads"]["random"]["parent_local"]["backend_reads"], 0);
        assert_eq!(json["reads"]["sequential"]["clone_vs_parent_backend"], 0.5);
        assert_eq!(json["seed"], 42);
    }
}

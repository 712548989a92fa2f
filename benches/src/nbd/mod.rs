//! `vstor-bench nbd`: vstor's NBD export against `qemu-nbd` on a raw file, measured with fio's
//! `nbd` engine (libnbd) in one run on one machine.
//!
//! How the numbers are made, and why:
//!
//! - **Same run, interleaved.** Both servers run side by side for the whole benchmark. For each
//!   row the vstor job runs, then the qemu-nbd job, and that pair repeats `rounds` times. Drift
//!   during the run (thermal throttling, a neighbour compiling, page cache filling up) then hits
//!   both servers alike instead of whichever happened to run second.
//! - **Medians.** Each figure of a row is the median over its rounds, taken per column, so one
//!   disturbed round does not move the result. The ratio is vstor IOPS / qemu-nbd IOPS of those
//!   medians.
//! - **Settled between jobs.** Before every job vstor's upload queue drains and `sync` writes
//!   back dirty pages, so neither server's background work (vstor's uploads, the kernel's
//!   writeback of qemu-nbd's page cache) lands in the other's measurement.
//! - **Prefill before reading.** vstor answers reads of never-written blocks from memory, and
//!   qemu-nbd reads holes of a sparse file almost as cheaply, so reading an empty volume measures
//!   neither. Both targets are first written end to end with sequential 1 MiB writes.
//! - **Memory.** vstor's RSS is read right after it is ready and again after the prefill has
//!   written the whole volume once; the growth per GiB written is what the block map and caches
//!   cost, reported next to the map size the volume itself accounts for (`map_memory_bytes`).
//! - **Loopback only.** Both servers bind 127.0.0.1; the network stack is the same for both, so
//!   the comparison is of the servers, not of the wire.
//!
//! fio is driven with `--direct=1 --time_based --runtime=N --ramp_time=1 --norandommap
//! --randrepeat=0`; latencies are fio's completion latency (`clat_ns`) percentiles.

mod report;

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::common::fio::{self, Job, Sample, RAMP_SECS};
use crate::common::process::InterruptGuard;
use crate::common::qemu_nbd::QemuNbd;
use crate::common::setup::{self, MIB};
use crate::common::vstor::{rss_bytes, Vstor};
use crate::BenchOptions;
use report::{Memory, Report, Row};

const EXPORT: &str = "bench";

/// The rows, in the order they run.
pub(crate) const JOBS: [Job; 7] = [
    Job {
        name: "4k randread qd1",
        rw: "randread",
        block_size: 4096,
        iodepth: 1,
        half_device: false,
    },
    Job {
        name: "4k randread qd32",
        rw: "randread",
        block_size: 4096,
        iodepth: 32,
        half_device: false,
    },
    Job {
        name: "4k randwrite qd1",
        rw: "randwrite",
        block_size: 4096,
        iodepth: 1,
        half_device: false,
    },
    Job {
        name: "4k randwrite qd32",
        rw: "randwrite",
        block_size: 4096,
        iodepth: 32,
        half_device: false,
    },
    Job {
        name: "1M seqwrite qd8",
        rw: "write",
        block_size: MIB,
        iodepth: 8,
        half_device: false,
    },
    Job {
        name: "1M seqread qd8",
        rw: "read",
        block_size: MIB,
        iodepth: 8,
        half_device: false,
    },
    Job {
        name: "1M seqwrite half qd8",
        rw: "write",
        block_size: MIB,
        iodepth: 8,
        half_device: true,
    },
];

/// Runs the benchmark and prints the report (table or JSON) to stdout. Progress goes to stderr.
pub fn run(options: &BenchOptions) -> Result<()> {
    let report = measure(options)?;
    if options.json {
        println!("{}", report::to_json(&report)?);
    } else {
        print!("{}", report::to_table(&report));
    }
    Ok(())
}

fn measure(options: &BenchOptions) -> Result<Report> {
    setup::validate(options.size, options.runtime_secs, options.rounds)?;
    let jobs = setup::select_rows(&JOBS, |job| job.name, options.rows.as_deref())?;
    let vstor_bin = setup::resolve_vstor_bin(&options.vstor_bin)?;
    let (fio_version, qemu_nbd_version) = fio::nbd_tools("nbd")?;

    let _signals = InterruptGuard::install()?;
    let work = setup::work_dir(options.work_dir.as_deref())?;
    setup::require_free_space(work.path(), options.size, 3)?;
    let fio_dir = work.path().join("fio");
    std::fs::create_dir(&fio_dir)?;
    progress(format_args!("work directory {}", work.path().display()));

    progress(format_args!("starting {} serve", vstor_bin.display()));
    let vstor = Vstor::start(
        &vstor_bin,
        &work.path().join("vstor"),
        &work.path().join("vstor.log"),
    )?;
    let rss_baseline = rss_bytes(vstor.pid())?;
    vstor.create_volume(EXPORT, options.size)?;
    progress(format_args!("starting qemu-nbd"));
    let qemu = QemuNbd::start(
        &work.path().join("qemu.raw"),
        options.size,
        EXPORT,
        &work.path().join("qemu-nbd.log"),
    )?;
    let vstor_uri = vstor.uri(EXPORT);
    let qemu_uri = qemu.uri(EXPORT);

    let vstor_prefill = fio::prefill("vstor", &vstor_uri, options.size, &fio_dir, &progress)?;
    let rss_after_prefill = rss_bytes(vstor.pid())?;
    let info = vstor.volume_info(EXPORT)?;
    let field = |name: &str| info.get(name).and_then(Value::as_u64);
    let vstor_memory = Memory::new(
        rss_baseline,
        rss_after_prefill,
        vstor_prefill.io_bytes,
        field("map_memory_bytes"),
        field("written_bytes"),
    );
    fio::prefill("qemu-nbd", &qemu_uri, options.size, &fio_dir, &progress)?;

    // A half-device write runs until done: allow it 10 MB/s at least.
    let job_timeout = Duration::from_secs(
        (options.runtime_secs + RAMP_SECS + 60).max(options.size / 2 / 10_000_000 + 60),
    );
    let total = jobs.len() * options.rounds as usize;
    let mut rows = Vec::with_capacity(jobs.len());
    for (index, job) in jobs.into_iter().enumerate() {
        let mut vstor_samples = Vec::new();
        let mut qemu_samples = Vec::new();
        for round in 1..=options.rounds {
            let args = |uri: &str| job.args(uri, options.runtime_secs, options.size);
            let label = |target: &str| format!("{target}-{}-{round}", job.name.replace(' ', "-"));
            settle(&vstor)?;
            let v = fio::run(
                &args(&vstor_uri),
                job.direction(),
                &fio_dir,
                &label("vstor"),
                job_timeout,
            )
            .with_context(|| format!("vstor's log ends with:\n{}", vstor.log_tail(20)))?;
            settle(&vstor)?;
            let q = fio::run(
                &args(&qemu_uri),
                job.direction(),
                &fio_dir,
                &label("qemu-nbd"),
                job_timeout,
            )?;
            progress(format_args!(
                "[{}/{total}] {} round {round}/{}: vstor {:.0} IOPS, qemu-nbd {:.0} IOPS",
                index * options.rounds as usize + round as usize,
                job.name,
                options.rounds,
                v.iops,
                q.iops
            ));
            vstor_samples.push(v);
            qemu_samples.push(q);
        }
        rows.push(Row::new(
            job,
            Sample::median(&vstor_samples),
            Sample::median(&qemu_samples),
        ));
    }

    progress(format_args!("stopping the servers"));
    vstor.stop()?;
    qemu.stop()?;
    Ok(Report {
        size_bytes: options.size,
        runtime_secs: options.runtime_secs,
        ramp_secs: RAMP_SECS,
        rounds: options.rounds,
        fio_version,
        qemu_nbd_version,
        rows,
        vstor_memory,
    })
}

/// Lets the previous job's background work finish before the next job starts, so no job pays
/// for another's: vstor's upload queue drains (uploads of sealed SCOs and TLogs continue after a
/// write job ends), then `sync` writes back every dirty page (qemu-nbd's writes sit in the page
/// cache, and the kernel would otherwise write them back during the next job, vstor's or not).
fn settle(vstor: &Vstor) -> Result<()> {
    vstor.wait_uploaded(EXPORT)?;
    nix::unistd::sync();
    Ok(())
}

fn progress(message: std::fmt::Arguments) {
    eprintln!("bench nbd: {message}");
}

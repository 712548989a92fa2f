//! `vstor-bench vhost`: vstor's vhost-user-blk export against `qemu-storage-daemon` exporting a
//! raw file, both driven by the same libblkio-based load generator in one run on one machine.
//!
//! How the numbers are made, and why (the same rules as [`crate::nbd`]):
//!
//! - **One client for both.** fio has no vhost-user engine, so the load generator is ours
//!   ([`load`]): libblkio's pure-Rust `virtio-blk-vhost-user` driver, one thread per virtqueue,
//!   `iodepth` 4 KiB requests in flight per queue at random aligned offsets, completions taken
//!   from the queue's eventfd. Both servers get exactly the same code, settings and offset
//!   sequence.
//! - **Same run, interleaved.** Both servers run side by side for the whole benchmark. For each
//!   row one measurement of each server runs, and that pair repeats `rounds` times, so drift
//!   during the run hits both alike. The order alternates (vstor first in odd rounds,
//!   qemu-storage-daemon first in even ones): a calibration run showed the first of a pair
//!   faring better on a busy machine. Every measurement is a fresh connection, as a fresh fio
//!   process would be.
//! - **Medians.** Each figure of a row is the median over its rounds, taken per column; the ratio
//!   is vstor IOPS / qemu-storage-daemon IOPS of those medians.
//! - **Prefill before reading.** vstor answers reads of never-written blocks from memory, and a
//!   sparse raw file's holes are nearly as cheap, so both devices are first written end to end
//!   with sequential 1 MiB writes, then `sync(2)` writes the page cache back so that the first
//!   rows do not race the prefill's writeback.
//! - **Warmup.** The first second of every measurement is not counted.
//!
//! [`run_calibration`] runs the same harness with a second qemu-storage-daemon in vstor's place:
//! its ratios show how far apart two identical servers land on this machine, which is the noise
//! any real ratio has to be read against.

pub(crate) mod load;
mod report;
mod targets;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::common::process::InterruptGuard;
use crate::common::setup::{self, MIB};
use crate::common::vstor::Vstor;
use crate::BenchOptions;
use load::{Op, Workload};
use report::{PrefillSpeeds, Report, Row, Sample, TARGET_RATIO};
use targets::{QemuStorageDaemon, VSTOR_SOCKET_TIMEOUT};

const VOLUME: &str = "bench";
/// Seconds at the start of every measurement that are not counted.
const WARMUP_SECS: u64 = 1;
const CLIENT: &str = "libblkio 0.5 virtio-blk-vhost-user";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// One row of the benchmark.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job {
    pub name: &'static str,
    pub workload: Workload,
}

impl Job {
    pub(crate) fn rw(&self) -> &'static str {
        match self.workload.op {
            Op::Read => "randread",
            Op::Write => "randwrite",
        }
    }
}

const fn job(name: &'static str, op: Op, iodepth: usize, queues: usize) -> Job {
    Job {
        name,
        workload: Workload {
            op,
            iodepth,
            queues,
        },
    }
}

/// 4 KiB random reads and writes at queue depth 1 and 32 (per queue), on one and two queues.
pub(crate) const JOBS: [Job; 8] = [
    job("4k randread qd1 1q", Op::Read, 1, 1),
    job("4k randread qd1 2q", Op::Read, 1, 2),
    job("4k randread qd32 1q", Op::Read, 32, 1),
    job("4k randread qd32 2q", Op::Read, 32, 2),
    job("4k randwrite qd1 1q", Op::Write, 1, 1),
    job("4k randwrite qd1 2q", Op::Write, 1, 2),
    job("4k randwrite qd32 1q", Op::Write, 32, 1),
    job("4k randwrite qd32 2q", Op::Write, 32, 2),
];

/// Runs the benchmark and prints the report (table or JSON) to stdout. Progress goes to stderr.
pub fn run(options: &BenchOptions) -> Result<()> {
    print(&measure(options, false)?, options.json)
}

/// Runs the benchmark with a second `qemu-storage-daemon` where vstor would be (`vstor_bin` is
/// not used): both columns then measure the same server, and the distance of the ratios from
/// 1.0 is the noise of the harness on this machine.
pub fn run_calibration(options: &BenchOptions) -> Result<()> {
    print(&measure(options, true)?, options.json)
}

fn print(report: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", report::to_json(report)?);
    } else {
        print!("{}", report::to_table(report));
    }
    Ok(())
}

/// The server in the first column: vstor, or a second qemu-storage-daemon when calibrating.
enum Subject {
    Vstor(Vstor),
    Qsd(QemuStorageDaemon),
}

impl Subject {
    fn check_running(&mut self) -> Result<()> {
        match self {
            Subject::Vstor(vstor) => vstor.check_running(),
            Subject::Qsd(qsd) => qsd.check_running(),
        }
    }

    fn stop(self) -> Result<()> {
        match self {
            Subject::Vstor(vstor) => vstor.stop(),
            Subject::Qsd(qsd) => qsd.stop(),
        }
    }
}

fn measure(options: &BenchOptions, calibration: bool) -> Result<Report> {
    setup::validate(options.size, options.runtime_secs, options.rounds)?;
    let jobs = setup::select_rows(&JOBS, |job| job.name, options.rows.as_deref())?;
    let vstor_bin = if calibration {
        None
    } else {
        Some(setup::resolve_vstor_bin(&options.vstor_bin)?)
    };
    let qsd_version = setup::tool_version("qemu-storage-daemon", "qemu-system-common", "vhost")?;
    let qsd_version = qsd_version
        .strip_prefix("qemu-storage-daemon version ")
        .unwrap_or(&qsd_version)
        .to_string();

    let _signals = InterruptGuard::install()?;
    let work = setup::work_dir(options.work_dir.as_deref())?;
    setup::require_free_space(work.path(), options.size, 3)?;
    progress(format_args!("work directory {}", work.path().display()));

    let (subject_name, mut subject, subject_socket) = match &vstor_bin {
        Some(vstor_bin) => {
            progress(format_args!("starting {} serve", vstor_bin.display()));
            let data_dir = work.path().join("vstor");
            check_socket_path(&targets::vstor_socket_path(&data_dir, VOLUME))?;
            let mut vstor = Vstor::start(vstor_bin, &data_dir, &work.path().join("vstor.log"))?;
            vstor.create_volume(VOLUME, options.size)?;
            progress(format_args!("waiting for vstor's vhost-user-blk socket"));
            let socket = targets::wait_for_vstor_socket(&mut vstor, VOLUME)?;
            ("vstor", Subject::Vstor(vstor), socket)
        }
        None => {
            progress(format_args!(
                "calibration: starting a second qemu-storage-daemon in vstor's place"
            ));
            let socket = work.path().join("qsd-2.sock");
            check_socket_path(&socket)?;
            let qsd = QemuStorageDaemon::start(
                &work.path().join("qsd-2.raw"),
                options.size,
                &socket,
                &work.path().join("qsd-2.log"),
            )?;
            ("qsd-2", Subject::Qsd(qsd), socket)
        }
    };
    progress(format_args!("starting qemu-storage-daemon"));
    let qsd_socket = work.path().join("qsd.sock");
    check_socket_path(&qsd_socket)?;
    let mut qsd = QemuStorageDaemon::start(
        &work.path().join("qsd.raw"),
        options.size,
        &qsd_socket,
        &work.path().join("qsd.log"),
    )?;

    let subject_prefill = prefill(subject_name, &subject_socket, options.size)?;
    if let Subject::Vstor(vstor) = &subject {
        check_vstor_prefill(vstor, options.size)?;
    }
    let qsd_prefill = prefill("qsd", qsd.socket(), options.size)?;
    // vstor goes on uploading the prefill's sealed SCOs (copying them to its backend) after
    // the writes: let that finish, as `bench nbd` does between jobs, or the first rows pay for
    // it. Then both prefills leave dirty page cache behind (the raw file, vstor's files); write
    // it back now rather than during the first rows.
    if let Subject::Vstor(vstor) = &subject {
        progress(format_args!("waiting for vstor's uploads of the prefill"));
        vstor.wait_uploaded(VOLUME)?;
    }
    progress(format_args!(
        "writing back the prefills' dirty pages (sync)"
    ));
    nix::unistd::sync();

    let base_seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.as_nanos() as u64);
    let total = jobs.len() * options.rounds as usize;
    let mut rows = Vec::with_capacity(jobs.len());
    for (index, job) in jobs.into_iter().enumerate() {
        let mut subject_samples = Vec::new();
        let mut qsd_samples = Vec::new();
        for round in 1..=options.rounds {
            // The same offsets for both servers within a round, new ones in every round.
            let seed = base_seed ^ ((index as u64) << 40) ^ u64::from(round);
            let mut measure_subject = || {
                sample(
                    subject_name,
                    &subject_socket,
                    job,
                    options.runtime_secs,
                    seed,
                    &mut || subject.check_running(),
                )
            };
            let mut measure_qsd = || {
                sample(
                    "qsd",
                    &qsd_socket,
                    job,
                    options.runtime_secs,
                    seed,
                    &mut || qsd.check_running(),
                )
            };
            // Odd rounds measure vstor first, even rounds qemu-storage-daemon first, so that
            // whatever favours the first (or second) of a pair favours neither server overall.
            let (s, q) = if round % 2 == 1 {
                let s = measure_subject()?;
                (s, measure_qsd()?)
            } else {
                let q = measure_qsd()?;
                (measure_subject()?, q)
            };
            progress(format_args!(
                "[{}/{total}] {} round {round}/{}: {subject_name} {:.0} IOPS, qsd {:.0} IOPS",
                index * options.rounds as usize + round as usize,
                job.name,
                options.rounds,
                s.iops,
                q.iops
            ));
            subject_samples.push(s);
            qsd_samples.push(q);
        }
        rows.push(Row::new(
            job,
            Sample::median(&subject_samples),
            Sample::median(&qsd_samples),
        ));
    }

    progress(format_args!("stopping the servers"));
    subject.stop()?;
    qsd.stop()?;
    Ok(Report {
        subject: if calibration {
            "qemu-storage-daemon".to_string()
        } else {
            "vstor".to_string()
        },
        calibration,
        size_bytes: options.size,
        runtime_secs: options.runtime_secs,
        warmup_secs: WARMUP_SECS,
        rounds: options.rounds,
        qemu_storage_daemon_version: qsd_version,
        client: CLIENT.to_string(),
        prefill: PrefillSpeeds {
            vstor_mb_per_s: subject_prefill,
            qemu_storage_daemon_mb_per_s: qsd_prefill,
        },
        rows_below_target: report::rows_below_target(&rows),
        rows,
        target_ratio: TARGET_RATIO,
    })
}

/// Writes the whole device once; returns MB/s.
fn prefill(target: &str, socket: &Path, size: u64) -> Result<f64> {
    progress(format_args!(
        "prefilling {target} ({} MiB of 1 MiB writes)",
        size / MIB
    ));
    let prefill = load::prefill(socket, size, VSTOR_SOCKET_TIMEOUT)
        .with_context(|| format!("prefill of {target} ({})", socket.display()))?;
    progress(format_args!(
        "prefilled {target} at {:.0} MB/s",
        prefill.mb_per_s()
    ));
    Ok(prefill.mb_per_s())
}

/// The reads are only worth measuring if they hit data: vstor's own count of the bytes written
/// to the volume must cover the prefill.
fn check_vstor_prefill(vstor: &Vstor, size: u64) -> Result<()> {
    let info = vstor.volume_info(VOLUME)?;
    if let Some(written) = info
        .get("written_bytes")
        .and_then(serde_json::Value::as_u64)
    {
        if written < size {
            bail!("after the prefill vstor reports {written} bytes written to the volume, less than its {size} bytes");
        }
    }
    Ok(())
}

/// One measurement of `job` on one server. When it fails, a server that has exited in the
/// meantime is the error to report.
fn sample(
    target: &str,
    socket: &Path,
    job: &Job,
    runtime_secs: u64,
    seed: u64,
    check_running: &mut dyn FnMut() -> Result<()>,
) -> Result<Sample> {
    check_running()?;
    load::run(
        socket,
        job.workload,
        Duration::from_secs(WARMUP_SECS),
        Duration::from_secs(runtime_secs),
        seed,
    )
    .and_then(|measurement| Sample::from_measurement(&measurement))
    .or_else(|error| {
        std::thread::sleep(Duration::from_millis(200));
        check_running()?;
        Err(error)
    })
    .with_context(|| format!("{target}: {}", job.name))
}

fn check_socket_path(path: &Path) -> Result<()> {
    let length = path.as_os_str().len();
    if length > MAX_SOCKET_PATH {
        bail!(
            "socket path {} is {length} bytes, over the {MAX_SOCKET_PATH} a UNIX socket allows; choose a shorter work_dir",
            path.display()
        );
    }
    Ok(())
}

fn progress(message: std::fmt::Arguments) {
    eprintln!("bench vhost: {message}");
}

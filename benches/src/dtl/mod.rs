//! `vstor-bench dtl`: what mirroring writes to a DTL costs. 4 KiB random writes at queue depth 1
//! and 32, driven by fio's `nbd` engine, against three vstor volumes, one per DTL mode (`none`,
//! `async`, `sync`), and against `qemu-nbd` serving a raw file, in one run on one machine.
//!
//! How the numbers are made, and why (the rules of [`crate::nbd`], with four targets):
//!
//! - **A real DTL.** `vstor dtl` runs as a process of its own on loopback, as it would on a
//!   second node, acknowledging entries once they are in its page cache (its default, no
//!   `--fsync`). One `vstor serve` holds the three volumes, created with `--dtl-mode none`,
//!   `async` and `sync`. A volume is only measured once it reports the `dtl_state` its mode
//!   should have (`ok_standalone` for `none`, `ok_sync` for the others), and a measurement during
//!   which the link went degraded (`dtl_degradations` grew) is flagged: its writes were not all
//!   mirrored, so its figures flatter the mode and its target counts as missed.
//! - **Same run, interleaved.** All four targets run side by side for the whole benchmark. For
//!   each row every target is measured once per round, `rounds` times; the order is reversed in
//!   every even round, so that over an even number of rounds no target is favoured by its place
//!   in the sequence.
//! - **Settled starts.** Before every measurement the page cache is written back (`sync(2)`) and
//!   the harness waits (up to a minute) until no vstor volume has uploads queued or DTL entries
//!   in flight, so no target pays for the previous one's background work.
//! - **Medians.** Each figure is the median over the rounds, per column. The ratio of a vstor
//!   row is its IOPS / qemu-nbd's IOPS of those medians; `vs none` is its IOPS / the `none`
//!   volume's, the price of the DTL itself.
//! - **Prefill.** Every target is first written end to end with sequential 1 MiB writes (at
//!   queue depth 8), as in `bench nbd`: the random writes then overwrite allocated blocks of the
//!   raw file rather than filling holes, and every vstor volume has its map populated.
//! - **Targets** (vstor IOPS / qemu-nbd IOPS, on every row): `async` ≥ 1.0, `sync` ≥ 0.8.
//!
//! fio is driven as in `bench nbd`: `--direct=1 --time_based --runtime=N --ramp_time=1
//! --norandommap --randrepeat=0`; latencies are fio's completion latency (`clat_ns`)
//! percentiles.

mod report;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::common::fio::{self, Direction, Job, Sample, RAMP_SECS};
use crate::common::process::{check_interrupted, InterruptGuard};
use crate::common::qemu_nbd::QemuNbd;
use crate::common::setup;
use crate::common::vstor::{Vstor, VstorDtl};
use crate::BenchOptions;
use report::{Prefill, Report, Row};

/// qemu-nbd's export name.
const EXPORT: &str = "bench";
/// How long a volume may take to reach the `dtl_state` its mode should have.
const DTL_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the harness waits for uploads and DTL backlogs to drain before a measurement.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
const STATE_POLL: Duration = Duration::from_millis(200);
/// The raw file, and per vstor volume its write buffer plus the backend copy (three volumes),
/// plus the DTL's log of what the backend does not have yet.
const SPACE_COPIES: u64 = 8;

/// The rows, in the order they run: the NBD benchmark's 4 KiB random-write rows.
pub(crate) const JOBS: [Job; 2] = [crate::nbd::JOBS[2], crate::nbd::JOBS[3]];

/// A vstor volume's DTL mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    None,
    Async,
    Sync,
}

impl Mode {
    pub(crate) const ALL: [Mode; 3] = [Mode::None, Mode::Async, Mode::Sync];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Async => "async",
            Mode::Sync => "sync",
        }
    }

    fn volume(self) -> String {
        format!("dtl-{}", self.as_str())
    }

    /// The `dtl_state` the volume reports when it is ready to be measured.
    fn ready_state(self) -> &'static str {
        match self {
            Mode::None => "ok_standalone",
            Mode::Async | Mode::Sync => "ok_sync",
        }
    }

    /// The least vstor IOPS / qemu-nbd IOPS this mode should reach on every row.
    pub(crate) fn target_ratio(self) -> Option<f64> {
        match self {
            Mode::None => None,
            Mode::Async => Some(1.0),
            Mode::Sync => Some(0.8),
        }
    }
}

/// One of the four servers measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Vstor(Mode),
    QemuNbd,
}

impl Target {
    /// Measurement order of odd rounds; even rounds run it backwards.
    const ALL: [Target; 4] = [
        Target::Vstor(Mode::None),
        Target::Vstor(Mode::Async),
        Target::Vstor(Mode::Sync),
        Target::QemuNbd,
    ];

    fn name(self) -> String {
        match self {
            Target::Vstor(mode) => format!("vstor dtl={}", mode.as_str()),
            Target::QemuNbd => "qemu-nbd".to_string(),
        }
    }

    /// Its place in [`Target::ALL`].
    fn index(self) -> usize {
        match self {
            Target::Vstor(Mode::None) => 0,
            Target::Vstor(Mode::Async) => 1,
            Target::Vstor(Mode::Sync) => 2,
            Target::QemuNbd => 3,
        }
    }

    /// For file names.
    fn slug(self) -> String {
        match self {
            Target::Vstor(mode) => format!("vstor-{}", mode.as_str()),
            Target::QemuNbd => "qemu-nbd".to_string(),
        }
    }
}

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

/// The servers under test, all running for the whole benchmark.
struct Servers {
    vstor: Vstor,
    dtl: VstorDtl,
    qemu: QemuNbd,
}

impl Servers {
    fn uri(&self, target: Target) -> String {
        match target {
            Target::Vstor(mode) => self.vstor.uri(&mode.volume()),
            Target::QemuNbd => self.qemu.uri(EXPORT),
        }
    }

    /// An error naming whichever vstor process has exited.
    fn check_running(&mut self) -> Result<()> {
        self.vstor.check_running()?;
        self.dtl.check_running()
    }

    fn volume_info(&mut self, mode: Mode) -> Result<Value> {
        self.check_running()?;
        self.vstor.volume_info(&mode.volume())
    }

    /// Waits until the volume of `mode` reports the `dtl_state` it should have; returns its info.
    fn wait_for_dtl_state(&mut self, mode: Mode) -> Result<Value> {
        let deadline = Instant::now() + DTL_READY_TIMEOUT;
        loop {
            let info = self.volume_info(mode)?;
            let state = text(&info, "dtl_state");
            if state == mode.ready_state() {
                return Ok(info);
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                bail!(
                    "volume {} (DTL mode {}) is still in dtl_state {state} after {} s, not {} (dtl_last_error: {})\n{}\n{}",
                    mode.volume(),
                    mode.as_str(),
                    DTL_READY_TIMEOUT.as_secs(),
                    mode.ready_state(),
                    text(&info, "dtl_last_error"),
                    self.vstor.log_tail(10),
                    self.dtl.log_tail(10)
                );
            }
            std::thread::sleep(STATE_POLL);
        }
    }

    /// Writes the page cache back and waits until no volume has uploads queued or DTL entries
    /// unacknowledged, so that the next measurement does not pay for the previous one's
    /// background work. Gives up (with a note) after [`SETTLE_TIMEOUT`].
    fn settle(&mut self) -> Result<()> {
        nix::unistd::sync();
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let mut busy = Vec::new();
            for mode in Mode::ALL {
                let info = self.volume_info(mode)?;
                let uploads = number(&info, "upload_queue");
                let backlog = number(&info, "dtl_backlog_bytes");
                if uploads > 0 || backlog > 0 {
                    busy.push(format!(
                        "{}: {uploads} uploads queued, {backlog} DTL bytes in flight",
                        mode.volume()
                    ));
                }
            }
            if busy.is_empty() {
                return Ok(());
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                progress(format_args!(
                    "still busy after {} s, measuring anyway ({})",
                    SETTLE_TIMEOUT.as_secs(),
                    busy.join("; ")
                ));
                return Ok(());
            }
            std::thread::sleep(STATE_POLL);
        }
    }

    /// One fio run of `job` on `target`, from a settled start; for a vstor volume also how often
    /// its DTL link went degraded meanwhile.
    fn measure(
        &mut self,
        target: Target,
        job: &Job,
        label: &str,
        runtime_secs: u64,
        fio_dir: &Path,
    ) -> Result<(Sample, u64)> {
        self.settle()?;
        let degradations_before = match target {
            Target::Vstor(mode) => {
                Some(number(&self.wait_for_dtl_state(mode)?, "dtl_degradations"))
            }
            Target::QemuNbd => None,
        };
        let timeout = Duration::from_secs(runtime_secs + RAMP_SECS + 60);
        let sample = fio::run(
            &job.args(&self.uri(target), runtime_secs, 0),
            Direction::Write,
            fio_dir,
            label,
            timeout,
        )
        .or_else(|error| {
            // A server that died is the better explanation of a failed fio.
            std::thread::sleep(Duration::from_millis(200));
            self.check_running()?;
            Err(error)
        })?;
        let degradations = match (target, degradations_before) {
            (Target::Vstor(mode), Some(before)) => {
                let info = self.volume_info(mode)?;
                let after = number(&info, "dtl_degradations");
                let degradations = after.saturating_sub(before);
                if degradations > 0 {
                    progress(format_args!(
                        "warning: the DTL link of {} went degraded {degradations} times during {label} (dtl_last_error: {})",
                        mode.volume(),
                        text(&info, "dtl_last_error")
                    ));
                }
                degradations
            }
            _ => 0,
        };
        Ok((sample, degradations))
    }
}

fn measure(options: &BenchOptions) -> Result<Report> {
    setup::validate(options.size, options.runtime_secs, options.rounds)?;
    let vstor_bin = setup::resolve_vstor_bin(&options.vstor_bin)?;
    let (fio_version, qemu_nbd_version) = fio::nbd_tools("dtl")?;

    let _signals = InterruptGuard::install()?;
    let work = setup::work_dir(options.work_dir.as_deref())?;
    setup::require_free_space(work.path(), options.size, SPACE_COPIES)?;
    let fio_dir = work.path().join("fio");
    std::fs::create_dir(&fio_dir)?;
    progress(format_args!("work directory {}", work.path().display()));

    progress(format_args!("starting {} dtl", vstor_bin.display()));
    let dtl = VstorDtl::start(
        &vstor_bin,
        &work.path().join("dtl"),
        &work.path().join("dtl.log"),
    )?;
    let dtl_address = dtl.address().to_string();
    progress(format_args!("starting {} serve", vstor_bin.display()));
    let vstor = Vstor::start(
        &vstor_bin,
        &work.path().join("vstor"),
        &work.path().join("vstor.log"),
    )?;
    for mode in Mode::ALL {
        let mut volume_options = vec!["--dtl-mode", mode.as_str()];
        if mode != Mode::None {
            volume_options.extend(["--dtl", &dtl_address]);
        }
        vstor.create_volume_with(&mode.volume(), options.size, &volume_options)?;
    }
    progress(format_args!("starting qemu-nbd"));
    let qemu = QemuNbd::start(
        &work.path().join("qemu.raw"),
        options.size,
        EXPORT,
        &work.path().join("qemu-nbd.log"),
    )?;
    let mut servers = Servers { vstor, dtl, qemu };

    progress(format_args!(
        "waiting for the volumes' DTL links (vstor dtl on {dtl_address})"
    ));
    for mode in Mode::ALL {
        servers.wait_for_dtl_state(mode)?;
    }
    let mut prefill = Prefill::default();
    for target in Target::ALL {
        let sample = fio::prefill(
            &target.name(),
            &servers.uri(target),
            options.size,
            &fio_dir,
            &progress,
        )
        .or_else(|error| {
            servers.check_running()?;
            Err(error)
        })?;
        prefill.set(target, sample.mb_per_s);
    }

    let total = JOBS.len() * options.rounds as usize;
    let mut rows = Vec::with_capacity(JOBS.len());
    for (index, job) in JOBS.iter().enumerate() {
        // Per target, in the order of `Target::ALL`.
        let mut samples: [Vec<Sample>; 4] = Default::default();
        let mut degradations = [0u64; 4];
        for round in 1..=options.rounds {
            let mut order = Target::ALL;
            if round % 2 == 0 {
                order.reverse();
            }
            for target in order {
                let label = format!("{}-{}-{round}", target.slug(), job.name.replace(' ', "-"));
                let (sample, degraded) = servers
                    .measure(target, job, &label, options.runtime_secs, &fio_dir)
                    .with_context(|| format!("{}: {} round {round}", target.name(), job.name))?;
                samples[target.index()].push(sample);
                degradations[target.index()] += degraded;
            }
            let iops: Vec<String> = Target::ALL
                .iter()
                .zip(&samples)
                .map(|(target, s)| format!("{} {:.0}", target.name(), s[s.len() - 1].iops))
                .collect();
            progress(format_args!(
                "[{}/{total}] {} round {round}/{}: IOPS {}",
                index * options.rounds as usize + round as usize,
                job.name,
                options.rounds,
                iops.join(", ")
            ));
        }
        let median = |target: Target| Sample::median(&samples[target.index()]);
        rows.push(Row::new(
            job,
            median(Target::QemuNbd),
            Mode::ALL.map(|mode| {
                let target = Target::Vstor(mode);
                (mode, median(target), degradations[target.index()])
            }),
        ));
    }

    progress(format_args!("stopping the servers"));
    let Servers { vstor, dtl, qemu } = servers;
    vstor.stop()?;
    dtl.stop()?;
    qemu.stop()?;
    Ok(Report::new(
        options.size,
        options.runtime_secs,
        options.rounds,
        fio_version,
        qemu_nbd_version,
        prefill,
        rows,
    ))
}

fn number(info: &Value, field: &str) -> u64 {
    info.get(field).and_then(Value::as_u64).unwrap_or(0)
}

fn text<'a>(info: &'a Value, field: &str) -> &'a str {
    info.get(field).and_then(Value::as_str).unwrap_or("-")
}

fn progress(message: std::fmt::Arguments) {
    eprintln!("bench dtl: {message}");
}

//! fio's `nbd` engine against an NBD URI (`bench nbd`, `bench dtl`): one job, the prefill that
//! writes a device end to end, and what we read back from fio's JSON report.
//!
//! fio runs as a child process with `--output-format=json --output=FILE`: its stdout carries
//! chatter from the nbd engine ("fio: connected to NBD server"), so the report goes to a file of
//! its own. A watchdog kills fio if a server stops answering, so a hung target fails the run
//! instead of stalling it forever.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::common::process::{log_file, log_tail, ChildGuard};
use crate::common::setup::MIB;
use crate::common::stats::median;

pub(crate) const RAMP_SECS: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Read,
    Write,
}

impl Direction {
    fn section(self) -> &'static str {
        match self {
            Direction::Read => "read",
            Direction::Write => "write",
        }
    }
}

/// One row of the benchmark: a time-based fio job, or one that writes half the device once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job {
    pub name: &'static str,
    pub rw: &'static str,
    pub block_size: u64,
    pub iodepth: u32,
    /// Write the first half of the device once (2 GiB into a 4 GiB volume) instead of running
    /// for `runtime` seconds: sustained ingest well past vstor's write-buffer budget, as a guest
    /// copying a large file does, with a fixed amount of work for both servers.
    pub half_device: bool,
}

impl Job {
    pub(crate) fn direction(&self) -> Direction {
        if self.rw.contains("read") {
            Direction::Read
        } else {
            Direction::Write
        }
    }

    fn slug(&self) -> String {
        self.name.replace(' ', "-")
    }

    /// fio's arguments for this job on the device at `uri` of `device_size` bytes.
    pub(crate) fn args(&self, uri: &str, runtime_secs: u64, device_size: u64) -> Vec<String> {
        let mut args = common_args(&self.slug(), uri, self.rw, self.block_size, self.iodepth);
        if self.half_device {
            args.push(format!("--size={}", device_size / 2));
            return args;
        }
        args.extend([
            "--time_based".into(),
            format!("--runtime={runtime_secs}"),
            format!("--ramp_time={RAMP_SECS}"),
            "--norandommap".into(),
            "--randrepeat=0".into(),
        ]);
        args
    }
}

/// A sequential 1 MiB write over the whole device, so later reads hit written data.
pub(crate) fn prefill_args(uri: &str, size: u64) -> Vec<String> {
    let mut args = common_args("prefill", uri, "write", MIB, 8);
    args.push(format!("--size={size}"));
    args
}

fn common_args(name: &str, uri: &str, rw: &str, block_size: u64, iodepth: u32) -> Vec<String> {
    vec![
        format!("--name={name}"),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--rw={rw}"),
        format!("--bs={block_size}"),
        format!("--iodepth={iodepth}"),
        "--direct=1".into(),
        "--output-format=json".into(),
    ]
}

/// An error unless this fio has the `nbd` engine (libnbd); `bench` names the benchmark that
/// needs it.
pub(crate) fn require_nbd_engine(bench: &str) -> Result<()> {
    let status = Command::new("fio")
        .arg("--enghelp=nbd")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot run `fio --enghelp=nbd`")?;
    if !status.success() {
        bail!("this fio has no nbd engine, which `vstor-bench {bench}` needs; it needs a fio built with libnbd (Debian/Ubuntu: apt-get install fio libnbd0)");
    }
    Ok(())
}

/// Writes the whole device at `uri` once with sequential 1 MiB writes and checks that fio really
/// got to the end. `progress` gets the messages for the user.
pub(crate) fn prefill(
    target: &str,
    uri: &str,
    size: u64,
    dir: &Path,
    progress: &dyn Fn(std::fmt::Arguments),
) -> Result<Sample> {
    progress(format_args!(
        "prefilling {target} ({} MiB of 1 MiB writes)",
        size / MIB
    ));
    let timeout = Duration::from_secs((size / (2 * MIB)).max(600));
    let sample = run(
        &prefill_args(uri, size),
        Direction::Write,
        dir,
        &format!("{target}-prefill"),
        timeout,
    )?;
    if sample.io_bytes != size {
        bail!(
            "prefill of {target} wrote {} of {size} bytes",
            sample.io_bytes
        );
    }
    progress(format_args!(
        "prefilled {target} at {:.0} MB/s",
        sample.mb_per_s
    ));
    Ok(sample)
}

/// What one fio run measured in the direction that matters for its job.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Sample {
    pub iops: f64,
    /// Decimal megabytes per second (10^6 bytes), as fio's `bw_bytes` / 10^6.
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    #[serde(skip)]
    pub io_bytes: u64,
}

impl Sample {
    /// Median of each figure on its own: with few rounds the middle value of every column is a
    /// better estimate than the run that happened to have the middle IOPS.
    pub(crate) fn median(samples: &[Sample]) -> Sample {
        Sample {
            iops: median(samples.iter().map(|s| s.iops)),
            mb_per_s: median(samples.iter().map(|s| s.mb_per_s)),
            p50_us: median(samples.iter().map(|s| s.p50_us)),
            p99_us: median(samples.iter().map(|s| s.p99_us)),
            io_bytes: samples.iter().map(|s| s.io_bytes).sum(),
        }
    }
}

/// Reads fio's JSON report: `jobs[0].<read|write>` with `iops`, `bw_bytes`, `io_bytes` and the
/// completion-latency percentiles `clat_ns.percentile["50.000000"]` / `["99.000000"]`.
pub(crate) fn parse_report(text: &str, direction: Direction) -> Result<Sample> {
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("fio wrote no JSON report"))?;
    let report: Value =
        serde_json::from_str(&text[start..]).context("fio's report is not valid JSON")?;
    let job = report
        .pointer("/jobs/0")
        .ok_or_else(|| anyhow!("fio's report has no jobs"))?;
    if let Some(error) = job.get("error").and_then(Value::as_i64).filter(|e| *e != 0) {
        bail!("fio job failed with error {error}");
    }
    let section_name = direction.section();
    let section = job
        .get(section_name)
        .ok_or_else(|| anyhow!("fio's report has no {section_name} section"))?;
    let number = |pointer: &str| {
        section
            .pointer(pointer)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("fio's report lacks {section_name}{pointer}"))
    };
    let io_bytes = section.get("io_bytes").and_then(Value::as_u64).unwrap_or(0);
    if io_bytes == 0 {
        bail!("fio did no {section_name} I/O");
    }
    Ok(Sample {
        iops: number("/iops")?,
        mb_per_s: number("/bw_bytes")? / 1e6,
        p50_us: number("/clat_ns/percentile/50.000000")? / 1e3,
        p99_us: number("/clat_ns/percentile/99.000000")? / 1e3,
        io_bytes,
    })
}

/// Runs fio with `args`, writing its report and log under `dir` as `<label>.json` / `.log`.
pub(crate) fn run(
    args: &[String],
    direction: Direction,
    dir: &Path,
    label: &str,
    timeout: Duration,
) -> Result<Sample> {
    // Absolute, because fio runs in `dir`: a relative `--work-dir` must not be resolved twice.
    let dir =
        &std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let report_path = dir.join(format!("{label}.json"));
    let log_path = dir.join(format!("{label}.log"));
    let log = log_file(&log_path)?;
    let mut command = Command::new("fio");
    command
        .args(args)
        .arg(format!("--output={}", report_path.display()))
        // fio drops state files (e.g. `*-verify.state`) into its working directory: keep them
        // in the benchmark's work directory, never in the caller's.
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut fio = ChildGuard::spawn(&mut command, "fio", Duration::from_secs(5))?;
    let Some(status) = fio.wait_timeout(timeout)? else {
        bail!(
            "fio ({label}) did not finish within {} s; is the server stuck?\n{}",
            timeout.as_secs(),
            log_tail(&log_path, 20)
        );
    };
    if !status.success() {
        bail!(
            "fio ({label}) failed ({status})\n{}",
            log_tail(&log_path, 20)
        );
    }
    let text = std::fs::read_to_string(&report_path)
        .with_context(|| format!("cannot read fio's report {}", report_path.display()))?;
    parse_report(&text, direction).with_context(|| format!("fio ({label})"))
}

/// Checks fio (with its nbd engine) and qemu-nbd are installed; returns their versions (qemu-nbd's
/// without the program name) for the report heading. `bench` names the benchmark in errors.
pub(crate) fn nbd_tools(bench: &str) -> anyhow::Result<(String, String)> {
    let fio_version = crate::common::setup::tool_version("fio", "fio", bench)?;
    require_nbd_engine(bench)?;
    let qemu_nbd_version = crate::common::setup::tool_version("qemu-nbd", "qemu-utils", bench)?;
    let qemu_nbd_version = qemu_nbd_version
        .strip_prefix("qemu-nbd ")
        .unwrap_or(&qemu_nbd_version)
        .to_string();
    Ok((fio_version, qemu_nbd_version))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"fio: connected to NBD server
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "4k-randread-qd1",
      "error" : 0,
      "read" : {
        "io_bytes" : 809476096,
        "bw_bytes" : 80947686,
        "iops" : 19762.618691,
        "clat_ns" : {
          "min" : 4832,
          "N" : 197626,
          "percentile" : {
            "1.000000" : 4832,
            "50.000000" : 24704,
            "99.000000" : 142336,
            "99.900000" : 1220608
          }
        }
      },
      "write" : {
        "io_bytes" : 0,
        "bw_bytes" : 0,
        "iops" : 0.000000,
        "clat_ns" : { "min" : 0, "max" : 0, "mean" : 0.000000, "stddev" : 0.000000, "N" : 0 }
      }
    }
  ]
}
"#;

    #[test]
    fn parses_the_read_section_after_engine_chatter() {
        let sample = parse_report(REPORT, Direction::Read).unwrap();
        assert!((sample.iops - 19762.618691).abs() < 1e-6);
        assert!((sample.mb_per_s - 80.947686).abs() < 1e-9);
        assert!((sample.p50_us - 24.704).abs() < 1e-9);
        assert!((sample.p99_us - 142.336).abs() < 1e-9);
        assert_eq!(sample.io_bytes, 809476096);
    }

    #[test]
    fn a_direction_without_io_is_an_error() {
        let err = parse_report(REPORT, Direction::Write)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "fio did no write I/O");
    }

    #[test]
    fn a_failed_job_is_an_error() {
        let failed = REPORT.replace("\"error\" : 0", "\"error\" : 5");
        let err = parse_report(&failed, Direction::Read)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "fio job failed with error 5");
    }

    #[test]
    fn job_args_carry_the_fixed_fio_settings() {
        let job = Job {
            name: "4k randread qd32",
            rw: "randread",
            block_size: 4096,
            iodepth: 32,
            half_device: false,
        };
        let args = job.args("nbd://127.0.0.1:10809/bench", 10, 1 << 30);
        for expected in [
            "--ioengine=nbd",
            "--uri=nbd://127.0.0.1:10809/bench",
            "--rw=randread",
            "--bs=4096",
            "--iodepth=32",
            "--direct=1",
            "--time_based",
            "--runtime=10",
            "--ramp_time=1",
            "--norandommap",
            "--randrepeat=0",
            "--output-format=json",
        ] {
            assert!(
                args.iter().any(|a| a == expected),
                "{expected} missing from {args:?}"
            );
        }
        let prefill = prefill_args("nbd://127.0.0.1:1/bench", 1 << 30);
        assert!(prefill.contains(&"--size=1073741824".to_string()));
        assert!(!prefill.iter().any(|a| a == "--time_based"));
    }
}

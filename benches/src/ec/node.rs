//! Phases 2–4 of `vstor-bench ec`, on one node: upload throughput of a sequential write, 4 KiB
//! random reads of evicted data, and (on the tier) a repair after an OSD is lost, with the
//! client's reads measured before, while degraded and during the repair.
//!
//! The node keeps little in its write buffer (`--write-buffer-limit 24M`, volumes with 4 MiB
//! SCOs and an 8 MiB write buffer), so ingest is throttled to what the backend absorbs and the
//! reads that follow go to the backend: what is measured is the backend, not the page cache of
//! the write buffer.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::tier::Tier;
use crate::cluster::nodes::get;
use crate::common::fio::{self, Direction, Job};
use crate::common::process::{check_interrupted, log_file, log_tail, ChildGuard};
use crate::common::setup::MIB;
use crate::common::vstor::Vstor;

pub(crate) const VOLUME: &str = "bench";
/// Bound on how long the backend may take to absorb the written data after fio is done.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(100);

/// The volume's counters, from `GET /v1/volumes/NAME` (what `vstor volume info --json` prints).
fn info(node: &Vstor, volume: &str) -> Result<Value> {
    get(node.api(), &format!("/v1/volumes/{volume}"))?
        .ok_or_else(|| anyhow!("the node did not answer GET /v1/volumes/{volume}"))
}

fn field(info: &Value, name: &str) -> Result<u64> {
    info.get(name).and_then(Value::as_u64).ok_or_else(|| {
        anyhow!(
            "volume {}: no {name} in its info {info}",
            info["name"].as_str().unwrap_or("?")
        )
    })
}

/// The volume reads and repair use: 4 MiB SCOs and an 8 MiB write buffer, so writes are
/// throttled to the upload rate and uploaded SCOs are evicted.
pub(crate) fn create_small_volume(node: &Vstor, size: u64) -> Result<()> {
    node.create_volume_with(VOLUME, size, &["--sco-size", "4M", "--write-buffer", "8M"])
}

/// A volume whose write buffer holds all of `size`: writes are never throttled, so the
/// uploads after them run as fast as the backend takes them.
pub(crate) fn create_buffered_volume(node: &Vstor, name: &str, size: u64) -> Result<()> {
    let buffer = size.to_string();
    node.create_volume_with(name, size, &["--write-buffer", &buffer])
}

/// A sequential write and how fast the backend absorbed it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UploadRow {
    /// `buffered` (write buffer ≥ the write) or `small` (8 MiB: ingest throttled to uploads).
    pub volume: String,
    pub bytes: u64,
    /// fio's sequential 1 MiB QD8 write rate: what the client got, throttled by the backend.
    pub ingest_mb_per_s: f64,
    /// Bytes uploaded from the first write until nothing is left to upload, over that time.
    pub upload_mb_per_s: f64,
    /// From the first write until `not_uploaded_bytes == 0` and the upload queue is empty.
    pub total_secs: f64,
    /// Of which after fio returned.
    pub drain_secs: f64,
    pub throttled_writes: u64,
}

/// Writes `size` bytes sequentially with fio and polls the volume's counters until the
/// backend holds all of it.
pub(crate) fn upload(
    node: &mut Vstor,
    volume: &str,
    kind: &str,
    size: u64,
    dir: &Path,
    label: &str,
) -> Result<UploadRow> {
    let before = info(node, volume)?;
    let uploaded_before = field(&before, "uploaded_bytes")?;
    let throttled_before = field(&before, "throttled_writes").unwrap_or(0);
    let args = fio::prefill_args(&node.uri(volume), size);
    let fio_dir = dir.to_path_buf();
    let fio_label = format!("{label}-{volume}-write");
    let started = Instant::now();
    let mut writer = Some(std::thread::spawn(move || {
        fio::run(
            &args,
            Direction::Write,
            &fio_dir,
            &fio_label,
            Duration::from_secs(600),
        )
    }));
    let mut fio_done: Option<(Result<fio::Sample>, f64)> = None;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let last = loop {
        check_interrupted()?;
        node.check_running()?;
        if let Some(handle) = writer.take_if(|w| w.is_finished()) {
            let result = handle
                .join()
                .map_err(|_| anyhow!("the fio thread panicked"))?;
            fio_done = Some((result, started.elapsed().as_secs_f64()));
        }
        let now = info(node, volume)?;
        if let Some((Ok(_), _)) = &fio_done {
            if field(&now, "not_uploaded_bytes")? == 0 && field(&now, "upload_queue")? == 0 {
                break now;
            }
        }
        if let Some((Err(e), _)) = &fio_done {
            bail!("fio's write to {label} failed: {e:#}");
        }
        if Instant::now() >= deadline {
            bail!(
                "{label}: the backend did not absorb {} MiB within {} s: {now}",
                size / MIB,
                DRAIN_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(POLL);
    };
    let total = started.elapsed().as_secs_f64();
    let Some((Ok(sample), fio_secs)) = fio_done else {
        bail!("{label}: fio did not finish");
    };
    if sample.io_bytes != size {
        bail!("{label}: fio wrote {} of {size} bytes", sample.io_bytes);
    }
    let uploaded = field(&last, "uploaded_bytes")? - uploaded_before;
    Ok(UploadRow {
        volume: kind.to_string(),
        bytes: size,
        ingest_mb_per_s: sample.mb_per_s,
        upload_mb_per_s: uploaded as f64 / total / 1e6,
        total_secs: total,
        drain_secs: (total - fio_secs).max(0.0),
        throttled_writes: field(&last, "throttled_writes").unwrap_or(0) - throttled_before,
    })
}

/// 4 KiB random reads at one queue depth.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReadRow {
    pub iodepth: u32,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Reads the volume sent to the backend over all reads it served meanwhile (≈1 when
    /// everything was evicted).
    pub backend_fraction: f64,
}

pub(crate) fn reads(node: &Vstor, runtime: u64, dir: &Path, label: &str) -> Result<Vec<ReadRow>> {
    let size = field(&info(node, VOLUME)?, "size")?;
    let mut rows = Vec::new();
    for (name, depth) in [("4k randread qd1", 1), ("4k randread qd32", 32)] {
        check_interrupted()?;
        let before = info(node, VOLUME)?;
        let job = Job {
            name,
            rw: "randread",
            block_size: 4096,
            iodepth: depth,
            half_device: false,
        };
        let sample = fio::run(
            &job.args(&node.uri(VOLUME), runtime, size),
            Direction::Read,
            dir,
            &format!("{label}-randread-qd{depth}"),
            Duration::from_secs(runtime + 120),
        )?;
        let after = info(node, VOLUME)?;
        let delta = |name: &str| -> Result<u64> {
            Ok(field(&after, name)?.saturating_sub(field(&before, name)?))
        };
        let reads = delta("reads")?.max(1);
        rows.push(ReadRow {
            iodepth: depth,
            iops: sample.iops,
            p50_us: sample.p50_us,
            p99_us: sample.p99_us,
            backend_fraction: delta("backend_reads")? as f64 / reads as f64,
        });
    }
    Ok(rows)
}

/// One OSD killed and rebuilt, with the client's reads meanwhile.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RepairRow {
    pub osd: u64,
    /// The OSD started in its domain before it was marked out, if any.
    pub replacement: Option<u64>,
    /// Fragment bytes the lost OSD held: what had to be rebuilt.
    pub lost_bytes: u64,
    pub repair_secs: f64,
    /// `lost_bytes` over `repair_secs`.
    pub rebuilt_mb_per_s: f64,
    /// From `vstor backend repair --json`.
    pub fragments_rebuilt: u64,
    /// Sound fragments moved (the rebalance onto the replacement OSD).
    pub fragments_moved: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub fully_redundant: bool,
    /// The client's 4 KiB random reads (QD `iodepth`), mean IOPS per window.
    pub iodepth: u32,
    pub iops_before: Option<f64>,
    pub iops_degraded: Option<f64>,
    pub iops_during: Option<f64>,
    pub iops_after: Option<f64>,
}

/// fio's averaging interval for the IOPS log.
const LOG_MS: u64 = 250;

/// With fio reading at QD32 throughout: `runtime` s of reads, kill -9 the OSD holding the most,
/// `runtime/2` s degraded, a replacement OSD in its domain (with `replace`), `vstor osd out`,
/// `vstor backend repair` (every namespace) timed, 2 s after.
pub(crate) fn repair(
    tier: &mut Tier,
    node: &Vstor,
    runtime: u64,
    dir: &Path,
    fio_timeout: Duration,
    replace: bool,
) -> Result<RepairRow> {
    let iodepth = 32;
    let dir = std::path::absolute(dir)?;
    let log_prefix = "repair-reads";
    let report = dir.join("repair-reads.json");
    let log = dir.join("repair-reads.log");
    let mut command = Command::new("fio");
    command
        .args([
            "--name=repair-reads",
            "--ioengine=nbd",
            &format!("--uri={}", node.uri(VOLUME)),
            "--rw=randread",
            "--bs=4096",
            &format!("--iodepth={iodepth}"),
            "--direct=1",
            "--time_based",
            &format!("--runtime={}", fio_timeout.as_secs()),
            "--norandommap",
            "--randrepeat=0",
            &format!("--write_iops_log={log_prefix}"),
            &format!("--log_avg_msec={LOG_MS}"),
            "--output-format=json",
            &format!("--output={}", report.display()),
        ])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log_file(&log)?)
        .stderr(log_file(&dir.join("repair-reads.err"))?);
    let mut fio = ChildGuard::spawn(&mut command, "fio (reads during repair)", STOP_FIO)?;
    let t0 = Instant::now();
    let ms = |at: Instant| at.duration_since(t0).as_millis() as u64;
    let wait = |secs: f64, fio: &mut ChildGuard| -> Result<()> {
        if let Some(status) = fio.wait_timeout(Duration::from_secs_f64(secs))? {
            bail!("fio stopped early ({status})\n{}", log_tail(&log, 20));
        }
        Ok(())
    };
    wait(runtime as f64 + 1.0, &mut fio)?;

    let victim = tier
        .osds
        .iter()
        .enumerate()
        .max_by_key(|(_, o)| o.fragment_bytes())
        .map(|(i, _)| i)
        .ok_or_else(|| anyhow!("the tier has no OSDs"))?;
    let lost_bytes = tier.osds[victim].fragment_bytes();
    let id = tier.osds[victim].id;
    let domain = tier.osds[victim].domain.clone();
    let killed = Instant::now();
    tier.osds[victim].kill9()?;
    wait((runtime as f64 / 2.0).max(2.0), &mut fio)?;
    let degraded_end = Instant::now();
    // A replacement disk in the same domain, as an operator would add: with 6 OSDs in 3
    // domains and the default 4+2 (at most 2 per domain), 5 OSDs cannot hold an object at full
    // redundancy, so without it repair would have nowhere to rebuild.
    let replacement = if replace {
        Some(tier.add_osd(&domain)?)
    } else {
        None
    };
    tier.cli(&["osd", "out", &id.to_string()])?;
    let repair_start = Instant::now();
    // Every namespace: the lost OSD held fragments of both volumes, and `lost_bytes` counts
    // them all.
    let output = tier.cli_output(&["backend", "repair", "--json"])?;
    let repair_end = Instant::now();
    let text = String::from_utf8_lossy(&output.stdout);
    let all: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "`vstor backend repair --json` printed no JSON ({}): {text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let entries = all
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| anyhow!("repair reported no namespace: {all}"))?;
    let number = |name: &str| -> u64 {
        entries
            .iter()
            .filter_map(|e| e["report"].get(name).and_then(Value::as_u64))
            .sum()
    };
    let fully_redundant = entries.iter().all(|e| e["fully_redundant"] == true);
    wait(2.0, &mut fio)?;
    let stopped = Instant::now();
    fio.stop()?;
    let samples = read_iops_log(&dir.join(format!("{log_prefix}_iops.1.log")))?;
    let window = |from: u64, to: u64| mean_in(&samples, from, to);
    let seconds = repair_end.duration_since(repair_start).as_secs_f64();
    Ok(RepairRow {
        osd: id,
        replacement,
        lost_bytes,
        repair_secs: seconds,
        rebuilt_mb_per_s: lost_bytes as f64 / seconds / 1e6,
        fragments_rebuilt: number("fragments_rebuilt"),
        fragments_moved: number("fragments_moved"),
        bytes_read: number("bytes_read"),
        bytes_written: number("bytes_written"),
        fully_redundant,
        iodepth,
        iops_before: window(1000, ms(killed)),
        iops_degraded: window(ms(killed), ms(degraded_end)),
        iops_during: window(ms(repair_start), ms(repair_end) + LOG_MS / 2),
        iops_after: window(ms(repair_end) + LOG_MS, ms(stopped)),
    })
}

const STOP_FIO: Duration = Duration::from_secs(10);

/// fio's IOPS log: `time_ms, iops, direction, bs, offset[, prio]` per line.
fn read_iops_log(path: &Path) -> Result<Vec<(u64, f64)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read fio's IOPS log {}", path.display()))?;
    Ok(parse_iops_log(&text))
}

fn parse_iops_log(text: &str) -> Vec<(u64, f64)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(',').map(str::trim);
            let time = fields.next()?.parse().ok()?;
            let value = fields.next()?.parse().ok()?;
            Some((time, value))
        })
        .collect()
}

/// Mean of the samples stamped in `(from, to]` ms; `None` when none are.
fn mean_in(samples: &[(u64, f64)], from: u64, to: u64) -> Option<f64> {
    let inside: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t > from && *t <= to)
        .map(|(_, v)| *v)
        .collect();
    (!inside.is_empty()).then(|| inside.iter().sum::<f64>() / inside.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iops_log_windows() {
        let log = "250, 1000, 0, 4096, 0\n500, 2000, 0, 4096, 0, 0\n750, 4000, 0, 4096, 0\nbad\n";
        let samples = parse_iops_log(log);
        assert_eq!(samples.len(), 3);
        assert_eq!(mean_in(&samples, 0, 500), Some(1500.0));
        assert_eq!(mean_in(&samples, 500, 750), Some(4000.0));
        assert_eq!(mean_in(&samples, 750, 2000), None);
    }
}

//! `vstor-bench ec`: the erasure-coded capacity tier (issue 12, "Speed"), in one run.
//!
//! 1. **Codec** ([`codec`]): encode and decode (1..=m lost data shards) of the tier's
//!    Reed-Solomon code, one thread, in GB/s of data against ISA-L on this machine type.
//! 2. **Upload**: a node on `--backend ec` (etcd, `--osds` OSDs in `--domains` domains) and a node
//!    on the local default backend each take a sequential write of `--size` over NBD (fio), with
//!    a write buffer small enough that ingest waits for the backend; the backend's absorption
//!    rate is the volume's `uploaded_bytes` over the time until `not_uploaded_bytes == 0`.
//! 3. **Reads of evicted data**: 4 KiB random reads at QD1 and QD32 (fio), ec against local.
//! 4. **Repair** (ec): with fio reading throughout, one OSD is killed (-9), marked out, and
//!    `vstor backend repair` rebuilds what it held; rebuilt MB/s and the client's IOPS before,
//!    degraded and during repair.
//!
//! Local runs first, then the tier, one node at a time, so the two never share the 2 cores.
//! Every process is a guarded child: an error or Ctrl-C stops them all.

pub(crate) mod codec;
mod node;
mod report;
mod tier;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::common::process::InterruptGuard;
use crate::common::setup::{self, MIB};
use crate::common::vstor::Vstor;
use report::{BackendRun, Report};

/// Settings of `vstor-bench ec`.
#[derive(Debug, Clone)]
pub struct EcOptions {
    pub vstor_bin: PathBuf,
    /// Bytes written sequentially (and the volume's size); a multiple of 1 MiB.
    pub size: u64,
    /// Seconds per random-read row, and of the window before the OSD is killed.
    pub runtime_secs: u64,
    /// Milliseconds per codec row.
    pub codec_ms: u64,
    pub osds: usize,
    pub domains: usize,
    /// Start a replacement OSD in the lost one's domain before repair (without one, 6 OSDs in
    /// 3 domains cannot hold the default 4+2 at full redundancy after a loss).
    pub replace: bool,
    /// Phases to run, of `codec`, `upload`, `reads`, `repair`.
    pub phases: Vec<String>,
    pub json: bool,
    pub work_dir: Option<PathBuf>,
}

pub const PHASES: [&str; 4] = ["codec", "upload", "reads", "repair"];

/// Runs the benchmark and prints the report (table or JSON) to stdout. Progress goes to stderr.
pub fn run(options: &EcOptions) -> Result<()> {
    for phase in &options.phases {
        if !PHASES.contains(&phase.as_str()) {
            bail!("unknown phase {phase:?} (phases: {})", PHASES.join(", "));
        }
    }
    let report = measure(options)?;
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::to_table(&report));
    }
    Ok(())
}

fn wants(options: &EcOptions, phase: &str) -> bool {
    options.phases.iter().any(|p| p == phase)
}

fn measure(options: &EcOptions) -> Result<Report> {
    setup::validate(options.size, options.runtime_secs, 1)?;
    let _signals = InterruptGuard::install()?;
    let mut report = Report {
        size_bytes: options.size,
        runtime_secs: options.runtime_secs,
        osds: options.osds,
        domains: options.domains,
        codec: Vec::new(),
        backends: Vec::new(),
        repair: None,
    };
    if wants(options, "codec") {
        report.codec = codec::measure(
            &[(8, 3), (4, 2)],
            &[4 << 10, 64 << 10, 1 << 20],
            Duration::from_millis(options.codec_ms.max(10)),
            &|m| progress(m),
        )?;
    }
    if !["upload", "reads", "repair"]
        .iter()
        .any(|p| wants(options, p))
    {
        return Ok(report);
    }
    let bin = setup::resolve_vstor_bin(&options.vstor_bin)?;
    setup::tool_version("fio", "fio", "ec")?;
    crate::common::fio::require_nbd_engine("ec")?;
    let work = setup::work_dir(options.work_dir.as_deref())?;
    // Local: write buffer plus store; ec: 1.5× on the OSDs plus the write buffer.
    setup::require_free_space(work.path(), options.size, 4)?;
    progress(format_args!("work directory {}", work.path().display()));
    if wants(options, "upload") || wants(options, "reads") {
        report.backends.push(local_run(&bin, work.path(), options)?);
    }
    let (run, repair) = ec_run(&bin, work.path(), options)?;
    report.backends.push(run);
    report.repair = repair;
    progress(format_args!("removing {}", work.path().display()));
    Ok(report)
}

/// `[upload] max_open_age = "1s"`: the last open SCO is sealed and uploaded a second after the
/// write stops, so the drain time is the backend's, not the idle timer's. `read_cache = "0"`:
/// the reads phase measures the tier, which rereads served from the node's memory would hide
/// (`vstor-bench backend` measures the cache).
fn node_config(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("vstor.toml");
    std::fs::write(
        &path,
        "read_cache = \"0\"\n[upload]\nmax_open_age = \"1s\"\n",
    )?;
    Ok(path.display().to_string())
}

fn small_buffer_args(config: String) -> Vec<String> {
    vec![
        "--config".into(),
        config,
        "--write-buffer-limit".into(),
        "24M".into(),
    ]
}

fn local_run(bin: &Path, work: &Path, options: &EcOptions) -> Result<BackendRun> {
    let dir = work.join("local");
    progress(format_args!("local: starting a node on the local backend"));
    let args = small_buffer_args(node_config(&work.join("local-config"))?);
    let mut node = Vstor::start_with(bin, &dir, &work.join("local.log"), &args)?;
    let run = phases(&mut node, work, options, "local")?;
    node.stop()?;
    Ok(run)
}

fn ec_run(
    bin: &Path,
    work: &Path,
    options: &EcOptions,
) -> Result<(BackendRun, Option<node::RepairRow>)> {
    progress(format_args!(
        "ec: starting etcd and {} OSDs in {} domains",
        options.osds, options.domains
    ));
    let tier_dir = work.join("tier");
    std::fs::create_dir_all(&tier_dir)?;
    let mut tier = tier::Tier::start(bin, &tier_dir, options.osds, options.domains)?;
    let mut args = small_buffer_args(node_config(&work.join("ec-config"))?);
    args.extend([
        "--backend".into(),
        "ec".into(),
        "--registry".into(),
        tier.registry().to_string(),
        "--node".into(),
        "n1".into(),
    ]);
    let mut node = Vstor::start_with(bin, &work.join("ec"), &work.join("ec.log"), &args)?;
    let run = phases(&mut node, work, options, "ec")?;
    let repair = if wants(options, "repair") {
        progress(format_args!(
            "ec: repair: {} s of reads, kill -9 an OSD, {} s degraded, out, repair",
            options.runtime_secs,
            (options.runtime_secs / 2).max(2)
        ));
        let row = node::repair(
            &mut tier,
            &node,
            options.runtime_secs,
            work,
            Duration::from_secs(900),
            options.replace,
        )?;
        progress(format_args!(
            "ec: repair rebuilt {} MiB in {:.1} s",
            row.lost_bytes / MIB,
            row.repair_secs
        ));
        Some(row)
    } else {
        None
    };
    node.stop()?;
    Ok((run, repair))
}

/// Upload and reads on one node. The upload phase writes a volume whose write buffer holds
/// the whole write (the backend's own pace) and then the small-buffer volume that reads and
/// repair use (ingest throttled to the uploads); the latter is written in any case, since reads
/// and repair need its data evicted to the backend.
fn phases(node: &mut Vstor, work: &Path, options: &EcOptions, label: &str) -> Result<BackendRun> {
    let mut uploads = Vec::new();
    if wants(options, "upload") {
        node::create_buffered_volume(node, "upload", options.size)?;
        uploads.push(write(node, "upload", "buffered", work, options, label)?);
    }
    node::create_small_volume(node, options.size)?;
    let small = write(node, node::VOLUME, "small", work, options, label)?;
    if wants(options, "upload") {
        uploads.push(small);
    }
    let reads = if wants(options, "reads") {
        progress(format_args!(
            "{label}: 4k random reads at qd1 and qd32, {} s each",
            options.runtime_secs
        ));
        node::reads(node, options.runtime_secs, work, label)?
    } else {
        Vec::new()
    };
    Ok(BackendRun {
        backend: label.to_string(),
        uploads,
        reads,
    })
}

/// A sequential write of `--size` into `volume`, until the backend holds it.
fn write(
    node: &mut Vstor,
    volume: &str,
    kind: &str,
    work: &Path,
    options: &EcOptions,
    label: &str,
) -> Result<node::UploadRow> {
    progress(format_args!(
        "{label}: writing {} MiB sequentially over NBD into the {kind} volume",
        options.size / MIB
    ));
    let row = node::upload(node, volume, kind, options.size, work, label)?;
    progress(format_args!(
        "{label}: ingest {:.0} MB/s, backend absorbed {:.0} MB/s ({:.1} s, {:.1} s after fio)",
        row.ingest_mb_per_s, row.upload_mb_per_s, row.total_secs, row.drain_secs
    ));
    Ok(row)
}

fn progress(message: std::fmt::Arguments) {
    eprintln!("bench ec: {message}");
}

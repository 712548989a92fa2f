//! `vstor-bench snapshots`: what snapshots, clones and scrubbing cost, measured on the volume
//! engine itself. No server, no NBD or vhost-user, no HTTP: the benchmark links
//! `vstor-volumedriver` and `vstor-backend`, opens a [`VolumeManager`] over a [`LocalStore`] in a
//! fresh work directory, and drives volumes through their API ([`Volume::write`],
//! [`Volume::read`], [`Volume::snapshot_create`], [`VolumeManager::clone_volume`],
//! [`Volume::scrub`]). One run reports:
//!
//! 1. **Snapshot creation.** [`SNAPSHOTS`] `snapshot_create` calls on an idle volume (one 4 KiB
//!    write before each, so each seals a SCO and closes a TLog), then as many at a steady pace
//!    over `runtime_secs` while a writer thread does 4 KiB writes at pseudo-random offsets over
//!    the whole volume, without flushes: latency (p50, p99, max), and the writer's IOPS and write
//!    latency while the snapshots are taken against a window of the same length just before.
//! 2. **Clone creation.** A volume is written end to end with 1 MiB writes, flushed and
//!    snapshotted; once the snapshot is on the backend, [`CLONES`] clones of it are made back to
//!    back with `VolumeManager::clone_volume`, first with the parent idle, then while a writer
//!    writes to the parent (and the writer's IOPS then against a window without clones).
//! 3. **Scrub.** A volume is written end to end, then overwritten with as many 4 KiB writes at
//!    pseudo-random offsets as it has clusters (with repeats), so that half of the clusters its
//!    backend TLogs reference are garbage; everything is uploaded (flush, close the TLog, wait
//!    for the uploads), then scrubbed without a rate limit on an idle node: duration, live data
//!    copied per second, space freed per second, SCOs rewritten and deleted. Then, after the
//!    same overwrite each time, it is scrubbed at the rate limit `vstor serve` uses by default
//!    ([`DEFAULT_SCRUB_RATE`]) and without a limit while a writer writes to another volume of
//!    the node (its own writes would change the scrub's work from run to run), against the
//!    writer's IOPS without a scrub.
//! 4. **Reading a clone's inherited data.** One of the clones, which has written nothing of its
//!    own, against its parent, through `Volume::read` with one thread: sequential 1 MiB reads
//!    (at least one whole pass over the volume, and on for `runtime_secs`) and 4 KiB reads at
//!    pseudo-random offsets for `runtime_secs`. A clone reads everything from its parent's SCOs
//!    on the backend (ranged reads); the parent reads the SCOs still in its write buffer
//!    locally. So the parent is read twice: as it is (local copies), and after evicting all its
//!    disposable SCOs ([`Volume::evict`]), when it too reads from the backend; each parent
//!    measurement is paired with one of the clone right after it.
//!
//! Every writer's windows start after a warm-up of [`WARMUP`]. Writes honour the engine's
//! throttle delays as the frontends do, and the report says how many were throttled, because a
//! writer held back by the write buffer budget measures the upload rate, not the engine. Volumes
//! have the product's default SCO size and write buffer budget and no DTL.

mod load;
mod report;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;
use vstor_backend::LocalStore;
use vstor_volumedriver::config::{CLUSTER_SIZE, DEFAULT_SCO_SIZE, DEFAULT_WRITE_BUFFER};
use vstor_volumedriver::{ManagerConfig, Volume, VolumeManager, VolumeOptions};

use crate::common::process::{check_interrupted, InterruptGuard};
use crate::common::setup;
use crate::BenchOptions;
use load::{ReadPattern, Writer, BLOCK};
use report::{
    CloneFigures, Latency, ReadComparison, ReadRow, Report, ScrubFigures, ScrubRun, SnapshotFigures,
};

/// Snapshots taken while the writer runs.
pub const SNAPSHOTS: usize = 200;
/// Clones made per batch (one batch with the parent idle, one under write load).
pub const CLONES: usize = 20;
/// What each writer runs before its first measured window.
pub const WARMUP: Duration = Duration::from_secs(1);
/// The scrub rate limit of `vstor serve` unless configured otherwise (`[scrub] rate = "64M"`,
/// read as 64 MiB per second).
pub const DEFAULT_SCRUB_RATE: u64 = 64 << 20;
/// How long `clone_volume` may wait for the snapshot to reach the backend (as the API does).
const CLONE_WAIT: Duration = Duration::from_secs(30);
/// How long the snapshot of the clone phase may take to reach the backend.
const SNAPSHOT_UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// Free space needed, in volume sizes: at most two volumes live at a time, each with its write
/// buffer and its backend copy, and the scrub volume's backend holds up to twice its size in
/// garbage before it is scrubbed.
const SPACE_COPIES: u64 = 6;
/// On top, what the writer may add per second it runs: it writes as fast as the engine takes
/// data, and everything it writes stays in the backend until its section ends (the section
/// with the longest writer runs `2 × runtime + warm-up`). A 2-vCPU VM took about 0.5 GB/s.
const WRITER_BYTES_PER_SEC: u64 = 512 << 20;

/// Runs the benchmark and prints the report (table or JSON) to stdout. Progress goes to stderr.
/// `options.vstor_bin` and `options.rounds` are not used: the engine is linked in, and every
/// figure is one measurement (percentiles over many snapshots or clones, or one timed window).
pub fn run(options: &BenchOptions) -> Result<()> {
    let report = measure(options)?;
    if options.json {
        println!("{}", report::to_json(&report)?);
    } else {
        print!("{}", report::to_table(&report));
    }
    Ok(())
}

/// The manager and its work directory; on the way out (also on errors) every volume is stopped
/// and every uploader thread joined before the directory is removed.
struct Node {
    manager: Arc<VolumeManager>,
    write_buffer_limit: u64,
    work: TempDir,
}

impl Node {
    fn open(options: &BenchOptions) -> Result<Self> {
        let work = setup::work_dir(options.work_dir.as_deref())?;
        let writer_secs = 2 * options.runtime_secs + WARMUP.as_secs();
        let needed = (options.size.saturating_mul(SPACE_COPIES))
            .saturating_add(writer_secs.saturating_mul(WRITER_BYTES_PER_SEC));
        setup::require_free_space(work.path(), needed, 1).with_context(|| {
            format!(
                "not enough room: {SPACE_COPIES} times the volume size, plus up to {} MiB per \
                 second of writer load ({writer_secs} s); use a smaller --size or --runtime",
                WRITER_BYTES_PER_SEC >> 20
            )
        })?;
        progress(format_args!("work directory {}", work.path().display()));
        let backend = LocalStore::open(work.path().join("backend"))
            .context("cannot open the local backend")?;
        let write_buffer_limit = write_buffer_limit(options.size);
        let manager = VolumeManager::open(
            ManagerConfig::under(&work.path().join("node"), write_buffer_limit),
            Arc::new(backend),
        )
        .context("cannot open the volume manager")?;
        Ok(Self {
            manager,
            write_buffer_limit,
            work,
        })
    }

    fn create(&self, name: &str, size: u64) -> Result<Arc<Volume>> {
        self.manager
            .create(name, &VolumeOptions::new(size))
            .with_context(|| format!("cannot create volume {name}"))
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.manager
            .delete(name)
            .with_context(|| format!("cannot delete volume {name}"))
    }

    fn path(&self) -> &Path {
        self.work.path()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for name in self.manager.names() {
            if let Ok(volume) = self.manager.get(&name) {
                volume.stop();
            }
        }
        // Stopped volumes skip the flush; this only joins the uploader threads.
        self.manager.shutdown(Duration::ZERO);
    }
}

/// The node's write buffer limit: room for one fully written volume with headroom, so the
/// parent of the clone phase keeps all its SCOs locally until the benchmark evicts them.
fn write_buffer_limit(size: u64) -> u64 {
    (2 * size).max(DEFAULT_WRITE_BUFFER)
}

fn measure(options: &BenchOptions) -> Result<Report> {
    setup::validate(options.size, options.runtime_secs, options.rounds)?;
    let size = options.size;
    let runtime = Duration::from_secs(options.runtime_secs);
    let _signals = InterruptGuard::install()?;
    let node = Node::open(options)?;
    // A different sequence of offsets in every run; the seed is in the JSON.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);

    let snapshots = snapshot_phase(&node, size, runtime, seed)?;
    let scrub = scrub_phase(&node, size, runtime, seed)?;
    let (clones, reads) = clone_and_read_phase(&node, size, runtime, seed)?;

    progress(format_args!(
        "removing the volumes and {}",
        node.path().display()
    ));
    Ok(Report {
        size_bytes: size,
        runtime_secs: options.runtime_secs,
        warmup_secs: WARMUP.as_secs(),
        cluster_size: CLUSTER_SIZE,
        sco_size: DEFAULT_SCO_SIZE,
        volume_write_buffer: DEFAULT_WRITE_BUFFER,
        node_write_buffer_limit: node.write_buffer_limit,
        seed,
        snapshots,
        clones,
        scrub,
        reads,
    })
}

/// Sleeps for `duration`, checking for Ctrl-C every 100 ms.
fn pause(duration: Duration) -> Result<()> {
    pause_until(Instant::now() + duration)
}

fn pause_until(deadline: Instant) -> Result<()> {
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
    }
}

/// Starts a writer on `volume` and lets it warm up.
fn start_writer(volume: &Arc<Volume>, seed: u64) -> Result<Writer> {
    let writer = Writer::start(volume.clone(), seed)?;
    pause(WARMUP)?;
    Ok(writer)
}

fn micros_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e6
}

fn snapshot_phase(node: &Node, size: u64, runtime: Duration, seed: u64) -> Result<SnapshotFigures> {
    const NAME: &str = "snapshots";
    let volume = node.create(NAME, size)?;
    progress(format_args!(
        "snapshots: {SNAPSHOTS} on the idle volume, then the writer alone for {} s, then \
         {SNAPSHOTS} snapshots over {} s",
        runtime.as_secs(),
        runtime.as_secs()
    ));
    // For reference, without write load: one 4 KiB write before each, so that every snapshot
    // seals a SCO and closes a TLog as it does under load.
    let block = load::payload(BLOCK as usize, seed);
    let mut idle = Vec::with_capacity(SNAPSHOTS);
    for index in 0..SNAPSHOTS {
        let offset = index as u64 % (size / BLOCK) * BLOCK;
        volume
            .write(offset, &block, false)
            .with_context(|| format!("4 KiB write at {offset} to {NAME}"))?;
        let name = format!("idle-{index:03}");
        let t = Instant::now();
        volume
            .snapshot_create(&name)
            .with_context(|| format!("snapshot {name} of {NAME}"))?;
        idle.push(micros_since(t));
    }
    check_interrupted()?;

    let mut writer = start_writer(&volume, seed)?;
    writer.next_phase()?;
    pause(runtime)?;
    writer.next_phase()?;
    let interval = runtime / SNAPSHOTS as u32;
    let started = Instant::now();
    let mut loaded = Vec::with_capacity(SNAPSHOTS);
    for index in 0..SNAPSHOTS {
        pause_until(started + interval * index as u32)?;
        let name = format!("load-{index:03}");
        let t = Instant::now();
        volume
            .snapshot_create(&name)
            .with_context(|| format!("snapshot {name} of {NAME}"))?;
        loaded.push(micros_since(t));
    }
    pause_until(started + interval * SNAPSHOTS as u32)?;
    let phases = writer.finish()?;
    let (idle, loaded) = (Latency::of(&idle), Latency::of(&loaded));
    progress(format_args!(
        "snapshots: p50/p99 {:.0}/{:.0} µs idle, {:.0}/{:.0} µs under load; writer {:.0} IOPS \
         alone, {:.0} during snapshots",
        idle.p50_us, idle.p99_us, loaded.p50_us, loaded.p99_us, phases[0].iops, phases[1].iops
    ));
    node.delete(NAME)?;
    Ok(SnapshotFigures::new(
        SNAPSHOTS, interval, idle, loaded, phases[0], phases[1],
    ))
}

/// Runs one scrub and times it.
fn timed_scrub(volume: &Volume, rate: Option<u64>) -> Result<ScrubRun> {
    let garbage_bytes = volume.garbage_bytes();
    let backend_bytes = volume.info().backend_bytes;
    let started = Instant::now();
    let report = volume
        .scrub(rate, &mut |_| {})
        .with_context(|| format!("scrub of {}", volume.name()))?;
    Ok(ScrubRun::new(
        rate,
        started.elapsed(),
        garbage_bytes,
        backend_bytes,
        &report,
    ))
}

/// Overwrites `clusters` pseudo-random clusters (half of what the backend then holds is
/// garbage) and uploads everything.
fn make_garbage(volume: &Volume, clusters: u64, seed: u64) -> Result<()> {
    load::overwrite(volume, clusters, seed)?;
    load::upload_all(volume)
}

fn scrub_phase(node: &Node, size: u64, runtime: Duration, seed: u64) -> Result<ScrubFigures> {
    const NAME: &str = "scrub";
    const WRITER: &str = "scrub-writer";
    let clusters = size / BLOCK;
    let volume = node.create(NAME, size)?;
    progress(format_args!(
        "scrub: filling {NAME} and overwriting {clusters} random clusters"
    ));
    load::fill(&volume, seed)?;
    make_garbage(&volume, clusters, seed ^ 1)?;
    let idle = timed_scrub(&volume, None)?;
    progress(format_args!(
        "scrub: idle, unlimited: {:.1} s, {:.0} MB/s copied, {:.0} MB/s freed",
        idle.seconds, idle.copied_mb_per_s, idle.freed_mb_per_s
    ));

    progress(format_args!(
        "scrub: overwriting again; writer on {WRITER} alone for {} s, then during a scrub at {} MiB/s",
        runtime.as_secs(),
        DEFAULT_SCRUB_RATE >> 20
    ));
    make_garbage(&volume, clusters, seed ^ 2)?;
    // The writer writes to a volume of its own, so that every scrub finds the same garbage; it
    // shares the CPU, the disk and the backend with the scrub.
    let writer_volume = node.create(WRITER, size)?;
    let mut writer = start_writer(&writer_volume, seed ^ 3)?;
    writer.next_phase()?;
    pause(runtime)?;
    writer.next_phase()?;
    let limited = timed_scrub(&volume, Some(DEFAULT_SCRUB_RATE))?;
    progress(format_args!(
        "scrub: overwriting again, then a scrub without limit during the writer"
    ));
    writer.next_phase()?;
    make_garbage(&volume, clusters, seed ^ 4)?;
    writer.next_phase()?;
    let unlimited = timed_scrub(&volume, None)?;
    let phases = writer.finish()?;
    let (writer_alone, writer_during_limited, writer_during_unlimited) =
        (phases[0], phases[1], phases[3]);
    progress(format_args!(
        "scrub: writer {:.0} IOPS alone, {:.0} during the limited scrub, {:.0} during the unlimited one",
        writer_alone.iops, writer_during_limited.iops, writer_during_unlimited.iops
    ));
    drop(writer_volume);
    node.delete(WRITER)?;
    node.delete(NAME)?;
    Ok(ScrubFigures::new(
        clusters,
        idle,
        writer_alone,
        limited,
        writer_during_limited,
        unlimited,
        writer_during_unlimited,
    ))
}

fn clone_and_read_phase(
    node: &Node,
    size: u64,
    runtime: Duration,
    seed: u64,
) -> Result<(CloneFigures, ReadComparison)> {
    const PARENT: &str = "parent";
    const SNAPSHOT: &str = "base";
    let parent = node.create(PARENT, size)?;
    progress(format_args!("clones: filling {PARENT}"));
    let prefill_mb_per_s = load::fill(&parent, seed)?;
    parent.flush().context("flush")?;
    let t = Instant::now();
    parent
        .snapshot_create(SNAPSHOT)
        .context("snapshot of the parent")?;
    let snapshot_create_us = micros_since(t);
    if !parent
        .wait_snapshot_in_backend(SNAPSHOT, Instant::now() + SNAPSHOT_UPLOAD_TIMEOUT)
        .context("waiting for the snapshot to reach the backend")?
    {
        bail!(
            "snapshot {PARENT}@{SNAPSHOT} is not on the backend after {} s",
            SNAPSHOT_UPLOAD_TIMEOUT.as_secs()
        );
    }
    let snapshot_in_backend_ms = t.elapsed().as_secs_f64() * 1e3;
    load::upload_all(&parent)?;

    let clone_options = VolumeOptions::new(size);
    let make_clones = |label: &str| -> Result<Vec<f64>> {
        let mut latencies = Vec::with_capacity(CLONES);
        for index in 1..=CLONES {
            let name = format!("clone-{label}-{index:02}");
            let t = Instant::now();
            node.manager
                .clone_volume(&name, PARENT, SNAPSHOT, &clone_options, CLONE_WAIT)
                .with_context(|| format!("clone {name} of {PARENT}@{SNAPSHOT}"))?;
            latencies.push(micros_since(t));
            check_interrupted()?;
        }
        Ok(latencies)
    };
    let delete_clones = |label: &str, keep: usize| -> Result<()> {
        for index in keep + 1..=CLONES {
            node.delete(&format!("clone-{label}-{index:02}"))?;
        }
        Ok(())
    };

    progress(format_args!("clones: {CLONES} clones, parent idle"));
    let idle = Latency::of(&make_clones("idle")?);
    delete_clones("idle", 1)?;

    progress(format_args!(
        "reads: clone vs parent, sequential and random, {} s each",
        runtime.as_secs()
    ));
    let clone = node.manager.get("clone-idle-01")?;
    let reads = read_phase(&parent, &clone, runtime, seed)?;
    node.delete("clone-idle-01")?;

    progress(format_args!(
        "clones: writer on {PARENT} alone for {} s, then {CLONES} clones",
        runtime.as_secs()
    ));
    let mut writer = start_writer(&parent, seed ^ 6)?;
    writer.next_phase()?;
    pause(runtime)?;
    writer.next_phase()?;
    let under_load = Latency::of(&make_clones("load")?);
    let phases = writer.finish()?;
    delete_clones("load", 0)?;
    progress(format_args!(
        "clones: p50 {:.1} ms idle, {:.1} ms under load",
        idle.p50_us / 1e3,
        under_load.p50_us / 1e3
    ));
    node.delete(PARENT)?;
    Ok((
        CloneFigures::new(
            CLONES,
            size,
            prefill_mb_per_s,
            snapshot_create_us,
            snapshot_in_backend_ms,
            idle,
            under_load,
            phases[0],
            phases[1],
        ),
        reads,
    ))
}

/// Reads the parent and the clone alternately: the parent with its write-buffer copies, then
/// (after evicting them) from the backend, each next to a measurement of the clone, so that
/// drift over the run affects each comparison alike.
fn read_phase(
    parent: &Volume,
    clone: &Volume,
    runtime: Duration,
    seed: u64,
) -> Result<ReadComparison> {
    let (parent_local_bytes, _) = parent.local_bytes();
    let patterns = [
        ReadPattern::Sequential,
        ReadPattern::Random { seed: seed ^ 7 },
    ];
    let mut local = Vec::new();
    for pattern in patterns {
        let parent_figures = load::read(parent, pattern, runtime)?;
        local.push((parent_figures, load::read(clone, pattern, runtime)?));
    }
    let evicted_bytes = parent.evict(u64::MAX);
    let mut backend = Vec::new();
    for pattern in patterns {
        let parent_figures = load::read(parent, pattern, runtime)?;
        backend.push((parent_figures, load::read(clone, pattern, runtime)?));
    }
    let row = |index: usize| ReadRow::new(local[index], backend[index]);
    Ok(ReadComparison {
        parent_local_bytes,
        evicted_bytes,
        sequential: row(0),
        random: row(1),
    })
}

fn progress(message: std::fmt::Arguments) {
    eprintln!("bench snapshots: {message}");
}

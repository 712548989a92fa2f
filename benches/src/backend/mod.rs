//! `vstor-bench backend`: what a backend store gives the engine, measured on the store itself
//! and through a volume whose data has been evicted from the write buffer.
//!
//! 1. **Uploads.** SCO-sized files (64 MiB of pseudo-random data with a valid SCO-like layout
//!    does not matter to a store: it stores bytes) are written into a write-buffer directory,
//!    their per-chunk CRCs computed while writing (as the engine does), and then stored twice:
//!    with [`ObjectStore::put_file`], the path sealed SCOs take (a hard link for the local store
//!    on the same filesystem), and with [`ObjectStore::put_from`], the streaming copy that SCOs
//!    found at restart, and stores that cannot link, take. Throughput is MB/s of payload, each
//!    put durable on return (fsyncs included).
//! 2. **Reads of evicted data.** A volume of `--size` on the store is written end to end with
//!    1 MiB writes, flushed, uploaded and then evicted ([`Volume::evict`]), so that every read
//!    goes to the backend (a ranged read verifying the 64 KiB chunks it touches). 4 KiB reads at
//!    pseudo-random aligned offsets for `--runtime` seconds at queue depth 1 (one thread) and
//!    32 (32 threads): IOPS and latency percentiles.
//! 3. **Rereads from the read cache.** The same volume then reads through a node read cache
//!    as large as the volume (`read_cache` in the node's configuration), filled by one
//!    sequential pass of 1 MiB reads, and the same random reads run again: what a node serves
//!    of data read before (a guest's hot blocks, the template clusters of every clone).
//!
//! `--backend` names the store: absent, a local store in the work directory (the embedded
//! default, on the same filesystem as the write buffer); a directory path or `file://PATH`, a
//! local store there (on another filesystem `put_file` copies); `s3://BUCKET[/PREFIX]`, the S3
//! store with endpoint, region and credentials from the standard `AWS_*` environment (the
//! bucket must exist; `put_file` streams there, as every store without links does).

mod report;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vstor_backend::{ChunkCrcs, LocalStore, ObjectStore, S3Location, S3Options, S3Store};
use vstor_volumedriver::config::DEFAULT_SCO_SIZE;
use vstor_volumedriver::{ManagerConfig, ReadCache, Volume, VolumeManager, VolumeOptions};

use crate::common::histogram::Histogram;
use crate::common::process::{check_interrupted, InterruptGuard};
use crate::common::rng::Rng;
use crate::common::setup::{self, MIB};
use crate::BenchOptions;
use report::{ReadRow, Report, UploadRow};

/// Objects uploaded per method: enough to get past the first fsync's warm-up.
const UPLOADS: u64 = 8;
/// Random reads are this big and aligned.
const BLOCK: u64 = 4096;
const NAMESPACE: &str = "bench-upload";
/// How long uploads of the filled volume may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs the benchmark and prints the report (table or JSON) to stdout. Progress goes to stderr.
pub fn run(options: &BenchOptions) -> Result<()> {
    let report = measure(options)?;
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::to_table(&report));
    }
    Ok(())
}

/// The store `--backend` names, and where it lives (`vstor-bench mds` opens its store here
/// too).
pub(crate) fn open_store(
    backend: Option<&str>,
    work: &Path,
) -> Result<(Arc<dyn ObjectStore>, String)> {
    let root = match backend {
        None => work.join("backend"),
        Some(uri) => match uri.split_once("://") {
            None => PathBuf::from(uri),
            Some(("file", path)) => PathBuf::from(path),
            Some(("s3", _)) => {
                let location = S3Location::parse(uri)?;
                let options = S3Options {
                    restamp_on_claim: vec![
                        vstor_volumedriver::config::CONFIG_OBJECT.to_string(),
                        vstor_volumedriver::config::TLOG_LIST_OBJECT.to_string(),
                    ],
                    ..S3Options::default()
                };
                let store = S3Store::open(location.clone(), options)
                    .with_context(|| format!("cannot open S3 backend {location}"))?;
                return Ok((Arc::new(store), format!("S3 {location}")));
            }
            Some((scheme, _)) => bail!(
                "backend {uri:?}: no {scheme} store (a directory, file://PATH or \
                 s3://BUCKET[/PREFIX])"
            ),
        },
    };
    let store = LocalStore::open(&root)
        .with_context(|| format!("cannot open a local store at {}", root.display()))?;
    Ok((Arc::new(store), format!("local {}", root.display())))
}

fn measure(options: &BenchOptions) -> Result<Report> {
    setup::validate(options.size, options.runtime_secs, options.rounds)?;
    let _signals = InterruptGuard::install()?;
    let work = setup::work_dir(options.work_dir.as_deref())?;
    setup::require_free_space(work.path(), options.size.max(UPLOADS * DEFAULT_SCO_SIZE), 3)?;
    progress(format_args!("work directory {}", work.path().display()));
    let (store, backend) = open_store(options.backend.as_deref(), work.path())?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);

    let uploads = upload_phase(store.as_ref(), work.path(), seed)?;
    let reads = read_phase(store.clone(), work.path(), options, seed)?;
    progress(format_args!("removing {}", work.path().display()));
    Ok(Report {
        backend,
        size_bytes: options.size,
        runtime_secs: options.runtime_secs,
        object_bytes: DEFAULT_SCO_SIZE,
        uploads,
        reads,
    })
}

/// Writes `UPLOADS` SCO-sized files with their chunk CRCs, then stores each with `put_file` and
/// with `put_from`.
fn upload_phase(store: &dyn ObjectStore, work: &Path, seed: u64) -> Result<Vec<UploadRow>> {
    let len = DEFAULT_SCO_SIZE;
    if store.namespace_exists(NAMESPACE)? {
        store.delete_namespace(NAMESPACE)?;
    }
    store.create_namespace(NAMESPACE, 1)?;
    let buffer = work.join("write-buffer");
    std::fs::create_dir_all(&buffer)?;
    progress(format_args!(
        "uploads: {UPLOADS} objects of {} MiB with put_file, then with put_from",
        len / MIB
    ));
    let mut files = Vec::new();
    for index in 0..UPLOADS {
        check_interrupted()?;
        let path = buffer.join(format!("sco-{index}"));
        let crcs = write_object_file(&path, len, seed ^ index)?;
        files.push((path, crcs));
    }
    let mut rows = Vec::new();
    for method in ["put_file", "put_from"] {
        let started = Instant::now();
        for (index, (path, crcs)) in files.iter().enumerate() {
            check_interrupted()?;
            let name = format!("{method}-{index}");
            match method {
                "put_file" => store.put_file(NAMESPACE, &name, path, len, Some(crcs), 1),
                _ => {
                    let mut file = File::open(path)?;
                    store.put_from(NAMESPACE, &name, len, &mut file, 1)
                }
            }
            .with_context(|| format!("{method} of {}", path.display()))?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let row = UploadRow {
            method: method.to_string(),
            objects: UPLOADS,
            seconds,
            mb_per_s: (UPLOADS * len) as f64 / seconds / 1e6,
        };
        progress(format_args!("{method}: {:.0} MB/s", row.mb_per_s));
        rows.push(row);
    }
    // Reading them back proves the puts stored the bytes, not just the names.
    let (path, _) = &files[0];
    let mut expected = vec![0u8; MIB as usize];
    File::open(path)?.read_exact_at(&mut expected, len - MIB)?;
    for method in ["put_file", "put_from"] {
        let mut got = vec![0u8; MIB as usize];
        store.get_range(NAMESPACE, &format!("{method}-0"), len - MIB, &mut got)?;
        if got != expected {
            bail!("{method}-0 reads back different bytes than were stored");
        }
    }
    store.delete_namespace(NAMESPACE)?;
    std::fs::remove_dir_all(&buffer)?;
    Ok(rows)
}

/// A file of `len` pseudo-random bytes, written 1 MiB at a time as the engine appends, with the
/// per-chunk CRCs computed on the way.
fn write_object_file(path: &Path, len: u64, seed: u64) -> Result<Vec<u32>> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut rng = Rng::new(seed);
    let mut crcs = ChunkCrcs::with_prefix(&[]);
    let mut piece = vec![0u8; MIB as usize];
    let mut offset = 0;
    while offset < len {
        for word in piece.chunks_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        let n = (len - offset).min(MIB) as usize;
        file.write_all_at(&piece[..n], offset)?;
        crcs.append(&piece[..n]);
        offset += n as u64;
    }
    Ok(crcs.chunk_crcs())
}

/// Fills a volume, uploads and evicts it, then measures random 4 KiB reads at QD 1 and 32.
fn read_phase(
    store: Arc<dyn ObjectStore>,
    work: &Path,
    options: &BenchOptions,
    seed: u64,
) -> Result<Vec<ReadRow>> {
    let size = options.size;
    let limit = (2 * size).max(1 << 30);
    let manager = VolumeManager::open(ManagerConfig::under(&work.join("node"), limit), store)
        .context("cannot open the volume manager")?;
    let manager = Manager(manager);
    let volume = manager
        .0
        .create("bench-reads", &VolumeOptions::new(size))
        .context("cannot create volume bench-reads")?;
    progress(format_args!(
        "reads: filling {} MiB, uploading and evicting it",
        size / MIB
    ));
    let mut chunk = vec![0u8; MIB as usize];
    let mut rng = Rng::new(seed);
    for offset in (0..size).step_by(MIB as usize) {
        check_interrupted()?;
        for word in chunk.chunks_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        let outcome = volume.write(offset, &chunk, false)?;
        if let Some(delay) = outcome.throttle {
            std::thread::sleep(delay);
        }
    }
    volume.flush()?;
    volume.close_current_tlog()?;
    if !volume.wait_for_uploads(Instant::now() + UPLOAD_TIMEOUT) {
        bail!(
            "uploads of bench-reads did not finish within {} s",
            UPLOAD_TIMEOUT.as_secs()
        );
    }
    volume.evict(u64::MAX);
    // Evicted data is read from the backend only; a read that still finds it locally would
    // flatter the figures, so check the write buffer is empty of it.
    let info = volume.info();
    progress(format_args!(
        "evicted; the write buffer holds {} bytes of SCOs",
        info.local_sco_bytes
    ));
    let mut rows = Vec::new();
    for cached in [false, true] {
        if cached {
            let cache = ReadCache::new(size).context("the volume is smaller than one block")?;
            volume.attach_read_cache(Arc::new(cache));
            progress(format_args!(
                "filling the read cache: {} MiB in 1 MiB reads",
                size / MIB
            ));
            for offset in (0..size).step_by(MIB as usize) {
                check_interrupted()?;
                let n = (size - offset).min(MIB) as usize;
                volume.read(offset, &mut chunk[..n])?;
            }
        }
        for depth in [1usize, 32] {
            check_interrupted()?;
            progress(format_args!(
                "4k random reads at qd{depth}{} for {} s",
                if cached { " from the read cache" } else { "" },
                options.runtime_secs
            ));
            let mut row = random_reads(
                &volume,
                depth,
                Duration::from_secs(options.runtime_secs),
                seed ^ depth as u64,
            )?;
            row.cached = cached;
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Stops every volume and joins the uploader on the way out, also on errors.
struct Manager(Arc<VolumeManager>);

impl Drop for Manager {
    fn drop(&mut self) {
        for name in self.0.names() {
            if let Ok(volume) = self.0.get(&name) {
                volume.stop();
            }
        }
        self.0.shutdown(Duration::ZERO);
    }
}

/// `depth` threads each reading 4 KiB at pseudo-random aligned offsets, one at a time, for
/// `runtime`.
fn random_reads(
    volume: &Arc<Volume>,
    depth: usize,
    runtime: Duration,
    seed: u64,
) -> Result<ReadRow> {
    let stop = Arc::new(AtomicBool::new(false));
    let blocks = volume.size() / BLOCK;
    let backend_reads_before = volume.info().backend_reads;
    let threads: Vec<_> = (0..depth)
        .map(|thread| {
            let volume = volume.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("bench-read-{thread}"))
                .spawn(move || -> Result<Histogram> {
                    let mut rng = Rng::new(seed.wrapping_add(thread as u64));
                    let mut buf = vec![0u8; BLOCK as usize];
                    let mut latency = Histogram::new();
                    while !stop.load(Ordering::Relaxed) {
                        let offset = rng.below(blocks) * BLOCK;
                        let started = Instant::now();
                        volume.read(offset, &mut buf).with_context(|| {
                            format!("4 KiB read at {offset} of {}", volume.name())
                        })?;
                        latency.record(started.elapsed().as_nanos() as u64);
                    }
                    Ok(latency)
                })
                .context("cannot start a reader thread")
        })
        .collect::<Result<_>>()?;
    let started = Instant::now();
    while started.elapsed() < runtime {
        if check_interrupted().is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50).min(runtime));
    }
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let mut all = Histogram::new();
    for thread in threads {
        let latency = thread
            .join()
            .map_err(|_| anyhow!("a reader thread panicked"))??;
        all.merge(&latency);
    }
    check_interrupted()?;
    let backend_reads = volume.info().backend_reads - backend_reads_before;
    let us = |percent: f64| {
        all.percentile(percent)
            .map_or(f64::NAN, |ns| ns as f64 / 1e3)
    };
    Ok(ReadRow {
        iodepth: depth as u32,
        reads: all.count(),
        iops: all.count() as f64 / seconds,
        p50_us: us(50.0),
        p99_us: us(99.0),
        backend_reads,
        cached: false,
    })
}

fn progress(message: std::fmt::Arguments) {
    eprintln!("bench backend: {message}");
}

//! `vstor-bench`: the benchmarks, in a binary of their own so that the product binary `vstor`
//! links neither this crate nor libblkio. The verbs and flags are those `vstor-bench ...` had;
//! the `vstor` binary under test is `--vstor PATH`, by default the one next to this executable
//! (both land in the same `target/<profile>/` directory).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vstor-bench",
    version,
    about = "Benchmarks of vstor against peer servers (qemu-nbd, qemu-storage-daemon) and of its engine"
)]
struct Cli {
    #[command(subcommand)]
    target: BenchTarget,
}

#[derive(Subcommand)]
enum BenchTarget {
    /// fio over NBD: vstor against qemu-nbd serving a raw file, interleaved in one run.
    Nbd(BenchOptions),
    /// A blkio load generator over vhost-user-blk: vstor against qemu-storage-daemon serving a
    /// raw file, interleaved in one run.
    Vhost(BenchOptions),
    /// fio 4k random writes over NBD: vstor volumes with DTL none, async and sync (a `vstor dtl`
    /// on loopback) against qemu-nbd serving a raw file, interleaved in one run.
    Dtl(BenchOptions),
    /// The engine's snapshots, clones and scrub: creation latency under write load, clone
    /// creation, scrub throughput and its impact, clone reads against the parent.
    Snapshots(BenchOptions),
    /// Restart from a `vstor mds` against a full backend replay (volume written with 4 KiB
    /// random writes; use --size 10G for the reference figure), MDS disk and memory per GiB,
    /// slave catch-up TLogs/s.
    Mds(MdsArgs),
    /// A backend store: upload throughput (put_file and put_from of 64 MiB objects) and 4 KiB
    /// random reads of evicted volume data at queue depth 1 and 32.
    Backend(BackendArgs),
    /// 4 KiB random I/O at QD1 and QD32 through `vstor edge` (vhost-user-blk) against the owner's
    /// own vhost-user-blk export, with the edge on the owner's host and in a network namespace.
    Edge(EdgeArgs),
    /// Failover and move on a 3-node cluster with a real etcd: detection, adoption and the
    /// client's I/O pause over repeated kill -9 of the owner; move duration and pause.
    Cluster(ClusterArgs),
    /// The erasure-coded tier: codec GB/s against ISA-L, upload throughput and evicted 4 KiB
    /// random reads of a node on `--backend ec` (etcd + OSDs) against the local backend, and
    /// repair after kill -9 of an OSD with the client's reads meanwhile.
    Ec(EcArgs),
}

#[derive(Args)]
struct EcArgs {
    /// Bytes written sequentially through NBD (and the volume's size).
    #[arg(long, default_value = "512M")]
    size: String,
    /// Seconds per random-read row (and of the read window before the OSD is killed).
    #[arg(long, default_value_t = 8)]
    runtime: u64,
    /// Milliseconds per codec row.
    #[arg(long, default_value_t = 300)]
    codec_ms: u64,
    /// OSDs of the tier.
    #[arg(long, default_value_t = 6)]
    osds: usize,
    /// Failure domains the OSDs are spread over.
    #[arg(long, default_value_t = 3)]
    domains: usize,
    /// Do not start a replacement OSD in the lost one's domain before repair.
    #[arg(long)]
    no_replacement: bool,
    /// Phases to run, comma-separated: codec, upload, reads, repair [default: all].
    #[arg(long, value_delimiter = ',')]
    phases: Option<Vec<String>>,
    /// Directory for the test data [default: a temporary directory under /var/tmp].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// The `vstor` binary to benchmark [default: the `vstor` next to this executable].
    #[arg(long)]
    vstor: Option<PathBuf>,
}

#[derive(Args)]
struct ClusterArgs {
    /// Owner kills (kill -9) to measure.
    #[arg(long, default_value_t = 20)]
    kills: u32,
    /// Volume moves to measure.
    #[arg(long, default_value_t = 10)]
    moves: u32,
    /// Directory for the test data [default: a temporary directory under /var/tmp].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Write through a `vstor edge` on the host instead of to the owner directly: the pause is
    /// then what a guest on the edge sees.
    #[arg(long)]
    edge: bool,
    /// The `vstor` binary to benchmark [default: the `vstor` next to this executable].
    #[arg(long)]
    vstor: Option<PathBuf>,
}

#[derive(Args)]
struct EdgeArgs {
    #[command(flatten)]
    options: BenchOptions,
    /// How the CPUs are shared: `shared` (nothing pinned), `split` (the node on the last CPU, the
    /// load generator and the edge on the others: two hosts on one machine) or `both`.
    #[arg(long, value_enum, default_value_t = Cpus::Both)]
    cpus: Cpus,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Cpus {
    Shared,
    Split,
    Both,
}

#[derive(Args)]
struct BackendArgs {
    #[command(flatten)]
    options: BenchOptions,
    /// The store: a directory, file://PATH, or s3://BUCKET/PREFIX once this build has an S3
    /// store [default: a local store in the work directory].
    #[arg(long)]
    backend: Option<String>,
}

#[derive(Args)]
struct MdsArgs {
    #[command(flatten)]
    options: BenchOptions,
    /// The backend the volume is written to and replayed from: `s3` (a moto server started for
    /// the run), s3://BUCKET[/PREFIX] (endpoint and credentials from the AWS_* environment), a
    /// directory or file://PATH [default: a local store in the work directory].
    #[arg(long)]
    backend: Option<String>,
}

#[derive(Args)]
struct BenchOptions {
    /// Size of the test volume and file.
    #[arg(long, default_value = "1G")]
    size: String,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Interleaved rounds per row; the median is reported (an even number cancels any advantage
    /// of running first).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Directory for the test data [default: a temporary directory under /var/tmp].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Run only the rows whose name contains this text (`nbd`, `edge` and `vhost`), e.g. `seqwrite` or `qd32`.
    #[arg(long)]
    rows: Option<String>,
    /// The `vstor` binary to benchmark [default: the `vstor` next to this executable].
    #[arg(long)]
    vstor: Option<PathBuf>,
}

/// A number of bytes with an optional binary suffix, as `vstor` parses sizes.
fn parse_size(text: &str) -> Result<u64> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(text.trim())
        .map_err(|e| {
            anyhow!("bad size {text:?}: {e} (use a number with an optional K, M, G or T suffix)")
        })
}

/// `vstor` in the directory of the running executable.
fn sibling_vstor() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the vstor-bench executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    Ok(dir.join("vstor"))
}

fn run(cli: Cli) -> Result<()> {
    let mut backend = None;
    let (run, o): (fn(&vstor_benches::BenchOptions) -> Result<()>, BenchOptions) = match cli.target
    {
        BenchTarget::Nbd(o) => (vstor_benches::nbd::run, o),
        BenchTarget::Vhost(o) => (vstor_benches::vhost::run, o),
        BenchTarget::Dtl(o) => (vstor_benches::dtl::run, o),
        BenchTarget::Snapshots(o) => (vstor_benches::snapshots::run, o),
        BenchTarget::Mds(args) => {
            backend = args.backend;
            (vstor_benches::mds::run, args.options)
        }
        BenchTarget::Edge(args) => {
            use vstor_benches::edge::cpus::CpuModel;
            let models: &[CpuModel] = match args.cpus {
                Cpus::Shared => &[CpuModel::Shared],
                Cpus::Split => &[CpuModel::Split],
                Cpus::Both => &[CpuModel::Shared, CpuModel::Split],
            };
            return vstor_benches::edge::run(&bench_options(args.options, None)?, models);
        }
        BenchTarget::Cluster(args) => {
            return vstor_benches::cluster::run(&vstor_benches::cluster::ClusterOptions {
                vstor_bin: match args.vstor {
                    Some(path) => path,
                    None => sibling_vstor()?,
                },
                kills: args.kills,
                moves: args.moves,
                json: args.json,
                work_dir: args.work_dir,
                edge: args.edge,
            });
        }
        BenchTarget::Ec(args) => {
            return vstor_benches::ec::run(&vstor_benches::ec::EcOptions {
                vstor_bin: match args.vstor {
                    Some(path) => path,
                    None => sibling_vstor()?,
                },
                size: parse_size(&args.size)?,
                runtime_secs: args.runtime,
                codec_ms: args.codec_ms,
                osds: args.osds,
                domains: args.domains,
                replace: !args.no_replacement,
                phases: args.phases.unwrap_or_else(|| {
                    vstor_benches::ec::PHASES
                        .iter()
                        .map(|p| (*p).to_string())
                        .collect()
                }),
                json: args.json,
                work_dir: args.work_dir,
            });
        }
        BenchTarget::Backend(args) => {
            backend = args.backend;
            (vstor_benches::backend::run, args.options)
        }
    };
    run(&bench_options(o, backend)?)
}

fn bench_options(o: BenchOptions, backend: Option<String>) -> Result<vstor_benches::BenchOptions> {
    let vstor_bin = match o.vstor {
        Some(path) => path,
        None => sibling_vstor()?,
    };
    Ok(vstor_benches::BenchOptions {
        vstor_bin,
        size: parse_size(&o.size)?,
        runtime_secs: o.runtime,
        rounds: o.rounds.max(1),
        json: o.json,
        backend,
        rows: o.rows,
        work_dir: o.work_dir,
    })
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

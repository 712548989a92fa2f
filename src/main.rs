//! `vstor`: the node daemon (`serve`, `dtl`) and the management CLI (`volume ...`, `snapshot
//! ...`), in one binary. The benchmarks are a separate binary, `vstor-bench` (crate
//! `vstor-benches`), so the product links neither them nor libblkio.

mod api;
mod api_auth;
mod api_tls;
mod api_types;
mod backend_timing;
mod client;
mod cluster;
mod config;
mod credentials;
mod daemon_metrics;
mod dashboard;
mod dirlock;
mod edge_host;
mod export;
mod export_remote;
mod host_id;
mod mds_host;
mod mds_link;
mod metrics;
mod openapi;
mod registry;
mod scrub;
mod security_args;
mod server;
mod size;
mod stale_clones;
mod tier;
mod top;
mod transfer;

/// mimalloc instead of glibc's malloc: request buffers are allocated on one thread and freed on
/// another at high rates (why this crate: the comment on it in `Cargo.toml`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::api_types::{
    CloneRequest, CreateRequest, MoveRequest, ResizeRequest, RollbackRequest, ScrubAnswer,
    ScrubRequest, SnapshotDeleted, SnapshotRequest, SnapshotUnexported, SnapshotView,
    UpdateRequest, VolumeDeleted, VolumeView,
};
use crate::client::{print_info, print_json, print_list, print_scrub, print_snapshots, Client};
use crate::config::{FileConfig, Overrides, DEFAULT_API};
use crate::security_args::{EtcdArgs, NbdFrontendArgs, PeerTlsArgs};
use crate::size::{format_size, parse_size};

#[derive(Parser)]
#[command(
    name = "vstor",
    version,
    about = "vstor: virtual block devices with SCO/TLog write buffer, NBD export and a local backend"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: volume engine, local backend, NBD server, management API.
    Serve(Box<ServeArgs>),
    /// Manage volumes through a running daemon's API.
    Volume(VolumeArgs),
    /// Snapshots of a volume: create, list, delete, roll back to, export read-only.
    Snapshot(SnapshotArgs),
    /// Clones: writable volumes made from a snapshot or a template, sharing its data.
    Clone(CloneArgs),
    /// Templates: read-only golden images that are only cloned.
    Template(TemplateArgs),
    /// Run a DTL (distributed transaction log) server that other nodes mirror writes to.
    Dtl(DtlArgs),
    /// The nodes of the cluster (one in the single-node default).
    Node(NodeArgs),
    /// A live view of every volume's IOPS, bandwidth and latency (p50/p99), refreshed every
    /// `--interval`.
    Top(TopArgs),
    /// Run an edge on a hypervisor host (serve volumes other nodes own over vhost-user and NBD),
    /// or, with a verb, manage a running edge: attach, detach, list.
    Edge(edge_host::cli::EdgeArgs),
    /// Run an OSD of the erasure-coded tier (one per disk), or, with a verb, manage the OSDs:
    /// list, decommission, out, in.
    Osd(tier::cli::OsdArgs),
    /// Presets of the erasure-coded tier: how objects are encoded and spread.
    Preset(tier::cli::PresetArgs),
    /// The erasure-coded tier's objects: inspect their fragments, repair them.
    Backend(tier::backend_cli::BackendArgs),
    /// Run an MDS (metadata server: per-volume map tables), or, with a verb, ask running ones:
    /// list, rebuild.
    Mds(mds_host::MdsArgs),
    /// Print a shell completion script: `vstor completions bash > /etc/bash_completion.d/vstor`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (vstor.1, vstor-volume.1, vstor-volume-create.1, ...) into DIR.
    Man {
        /// Directory to write the pages to (created if missing), e.g. /usr/local/share/man/man1.
        dir: PathBuf,
    },
}

#[derive(Args)]
struct TopArgs {
    #[command(flatten)]
    remote: Remote,
    /// Refresh period.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: std::time::Duration,
    /// Stop after this many refreshes [default: 0, until interrupted].
    #[arg(long, default_value_t = 0)]
    count: u64,
}

#[derive(Args)]
struct NodeArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    verb: NodeVerb,
}

#[derive(Subcommand)]
enum NodeVerb {
    /// List the nodes: name, domain, recovery domain, liveness, volume count, API/NBD/DTL
    /// addresses.
    List,
}

#[derive(Args)]
struct DtlArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:10810")]
    listen: String,
    /// Where the per-volume logs are kept.
    #[arg(long, default_value = "./vstor-dtl")]
    data_dir: PathBuf,
    /// Acknowledge entries only once they are on disk (fdatasync per batch) instead of once they
    /// are written to the page cache.
    #[arg(long)]
    fsync: bool,
    /// Close a connection whose frame is still incomplete this long after its first bytes
    /// arrived (slowloris clients); idle connections between frames are kept.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    frame_timeout: std::time::Duration,
    #[command(flatten)]
    peer_tls: PeerTlsArgs,
    #[command(flatten)]
    metrics: daemon_metrics::MetricsArgs,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (see docs/vstor.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node state directory (config: `data_dir`) [default: ./vstor-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Backend: a directory, or s3://BUCKET[/PREFIX] (endpoint, region and credentials from the
    /// AWS_* environment) [default: <data-dir>/backend].
    #[arg(long)]
    backend: Option<PathBuf>,
    /// Management API listen address (config: `api`) [default: 127.0.0.1:7800].
    #[arg(long)]
    api: Option<String>,
    /// NBD listen address (config: `nbd`) [default: 127.0.0.1:10809].
    #[arg(long)]
    nbd: Option<String>,
    #[command(flatten)]
    nbd_frontend: NbdFrontendArgs,
    /// Serve the edge protocol (for `vstor edge` on hypervisor hosts) on HOST:PORT [default:
    /// none, no edge can reach this node's volumes].
    #[arg(long)]
    edge_listen: Option<String>,
    /// Also serve the edge protocol on this unix socket (mode 0600), which `vstor edge` on the
    /// same host uses instead of TCP: no TCP stack and no TLS on the way [default: none; needs
    /// --edge-listen].
    #[arg(long, value_name = "PATH")]
    edge_socket: Option<PathBuf>,
    /// Close an edge connection whose frame is still incomplete this long after its first bytes
    /// arrived (slowloris clients) [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    edge_frame_timeout: Option<std::time::Duration>,
    /// Directory for the vhost-user-blk sockets [default: <data-dir>/vhost].
    #[arg(long)]
    vhost_dir: Option<PathBuf>,
    /// Write-buffer size limit before disposable SCOs are evicted, at least 4M (config:
    /// `write_buffer_limit`) [default: 8G].
    #[arg(long)]
    write_buffer_limit: Option<String>,
    /// RAM kept of backend data the volumes read, so rereads (and every clone's reads of one
    /// template) skip the backend; 0 turns it off (config: `read_cache`) [default: auto, 256M
    /// on S3 and the erasure-coded tier, off on a directory backend].
    #[arg(long, value_name = "SIZE")]
    read_cache: Option<String>,
    /// How long one request to an S3 backend is retried through an outage (connection refused,
    /// timeouts, 5xx) before the operation fails: a guest reading evicted data waits this long
    /// instead of getting an I/O error, 1s to 1h (config: `s3_retry_timeout`) [default: 30s].
    #[arg(long, value_name = "DURATION")]
    s3_retry_timeout: Option<String>,
    /// Upload steps in flight at once across all volumes (config: `upload_concurrency`)
    /// [default: 4].
    #[arg(long)]
    upload_concurrency: Option<usize>,
    /// DTL server (HOST:PORT) new volumes mirror their writes to, in sync mode unless the config
    /// file says otherwise [default: none].
    #[arg(long)]
    dtl: Option<String>,
    /// Do not create the default volume on first start.
    #[arg(long)]
    no_default_volume: bool,
    /// Metadata servers (`vstor mds`) the volumes keep their map tables on, HOST:PORT,
    /// comma-separated: the first is the master, the others slaves (config: `mds.servers`)
    /// [default: none, a restart replays the volume's backend history].
    #[arg(long, value_delimiter = ',')]
    mds: Option<Vec<String>>,
    /// A slave MDS more TLogs than this behind the backend is never promoted; the volume then
    /// replays its backend history at its next restart (config: `mds.max_behind`) [default: 64].
    #[arg(long)]
    mds_max_behind: Option<u64>,
    /// Cluster registry: etcd://HOST:PORT[,HOST:PORT...], or etcd+https://HOST:PORT[,...] for
    /// TLS (see --etcd-ca) [default: none, a single node with a local registry file].
    #[arg(long)]
    registry: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// This node's unique name in the cluster (required with --registry).
    #[arg(long)]
    node: Option<String>,
    /// The node's failure domain (rack, room...) [default: "default"].
    #[arg(long)]
    domain: Option<String>,
    /// Domain where this node's volumes keep their DTL [default: the node's own domain].
    #[arg(long)]
    recovery_domain: Option<String>,
    /// Listen address of the node's DTL server [default: an ephemeral port on the API's host].
    #[arg(long)]
    dtl_listen: Option<String>,
    /// Serve the API over HTTPS with this PEM certificate chain (config: `api.tls_cert`; needs
    /// --api-tls-key) [default: plain HTTP].
    #[arg(long, value_name = "FILE")]
    api_tls_cert: Option<PathBuf>,
    /// The PEM private key of --api-tls-cert (config: `api.tls_key`).
    #[arg(long, value_name = "FILE")]
    api_tls_key: Option<PathBuf>,
    #[command(flatten)]
    peer_tls: PeerTlsArgs,
}

/// How the management verbs reach the daemon and print its answer.
#[derive(Args)]
struct Remote {
    /// Address of the daemon's API, HOST:PORT, http://HOST:PORT or https://HOST:PORT [env:
    /// VSTOR_API] [default: 127.0.0.1:7800].
    #[arg(long, global = true, value_name = "ADDR")]
    api: Option<String>,
    /// Print the daemon's JSON answer instead of text (errors too: `{"error": "..."}` on
    /// stderr).
    #[arg(long, global = true)]
    json: bool,
}

/// `--api` and `--json` given before the command: `vstor --api ADDR volume list`.
#[derive(Args)]
struct GlobalOpts {
    /// Address of the daemon's API for the management verbs (volume, snapshot, clone,
    /// template, node), HOST:PORT, http://HOST:PORT or https://HOST:PORT [env: VSTOR_API] [default:
    /// 127.0.0.1:7800]. Also accepted after the command.
    #[arg(long, value_name = "ADDR")]
    api: Option<String>,
    /// Print JSON instead of text, errors included (`{"error": "..."}` on stderr).
    #[arg(long)]
    json: bool,
    /// File holding the API's bearer token. `vstor serve`: every API call but GET /v1/health
    /// must carry it (config: `api.token_file`) [default: no token]. Every other command: the
    /// token to send; else VSTOR_API_TOKEN, else the file VSTOR_API_TOKEN_FILE names.
    #[arg(long, global = true, value_name = "FILE")]
    api_token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for an https:// API (a private CA) [env: VSTOR_API_CA]
    /// [default: the system's]. `vstor serve`: for its calls to other nodes (config:
    /// `api.ca_file`).
    #[arg(long, global = true, value_name = "FILE")]
    api_ca: Option<PathBuf>,
}

impl Remote {
    /// The daemon's address: `--api` (before or after the command), else `VSTOR_API`, else
    /// the default.
    fn api(&self) -> String {
        self.api
            .clone()
            .or_else(|| std::env::var("VSTOR_API").ok().filter(|a| !a.is_empty()))
            .unwrap_or_else(|| DEFAULT_API.to_string())
    }

    fn show<T: serde::Serialize>(&self, value: &T, text: impl FnOnce(&T)) {
        if self.json {
            print_json(value);
        } else {
            text(value);
        }
    }

    /// Fill in `--api`/`--json` given before the command (`vstor --api X volume list`).
    fn inherit(&mut self, global: &GlobalOpts) {
        if self.api.is_none() {
            self.api.clone_from(&global.api);
        }
        self.json |= global.json;
    }
}

#[derive(Args)]
struct VolumeArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    verb: VolumeVerb,
}

#[derive(Args)]
struct SnapshotArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    verb: SnapshotVerb,
}

#[derive(Subcommand)]
enum SnapshotVerb {
    /// Snapshot a volume's current content (instant; durable once acknowledged).
    Create { volume: String, snapshot: String },
    /// List a volume's snapshots, oldest first.
    List { volume: String },
    /// Delete a snapshot (refused while clones of it exist); a scrub reclaims its space.
    Delete { volume: String, snapshot: String },
    /// Roll a volume back to a snapshot, dropping everything written and every snapshot taken
    /// after it. Refused while NBD clients or a vhost-user frontend use the volume.
    Rollback {
        volume: String,
        snapshot: String,
        /// Disconnect the volume's NBD clients and vhost-user frontend first.
        #[arg(long)]
        force: bool,
    },
    /// Serve a snapshot read-only over vhost-user at <vhost-dir>/VOLUME@SNAPSHOT.sock (over NBD
    /// every snapshot is always readable as export VOLUME@SNAPSHOT). Re-created by a restart.
    Export { volume: String, snapshot: String },
    /// Stop serving a snapshot over vhost-user.
    Unexport { volume: String, snapshot: String },
}

#[derive(Args)]
struct CloneArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    verb: CloneVerb,
}

#[derive(Subcommand)]
enum CloneVerb {
    /// Create a writable volume from a snapshot without copying data.
    Create {
        /// Name of the new volume (the clone).
        name: String,
        /// VOLUME@SNAPSHOT, or a template volume's name (its newest snapshot).
        #[arg(long)]
        from: String,
        /// Not-yet-uploaded data above which writes are throttled [default: the node's
        /// `volume_defaults.write_buffer`].
        #[arg(long)]
        write_buffer: Option<String>,
        /// DTL mode: sync, async or none [default: the node's].
        #[arg(long, value_parser = ["sync", "async", "none"])]
        dtl_mode: Option<String>,
        /// DTL server HOST:PORT [default: the node's].
        #[arg(long)]
        dtl: Option<String>,
        /// Seconds to wait for the snapshot to reach the backend.
        #[arg(long, default_value_t = 30)]
        wait: u64,
    },
}

#[derive(Args)]
struct TemplateArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    verb: TemplateVerb,
}

#[derive(Subcommand)]
enum TemplateVerb {
    /// Make a volume a template, read-only for good: its content is snapshotted as `template`
    /// (unless its newest snapshot already holds it) and clones are made from that.
    Set { volume: String },
}

#[derive(Subcommand)]
enum VolumeVerb {
    /// Create a thin volume.
    Create {
        /// Volume name: 1 to 128 ASCII letters, digits, '-', '_' and '.', not starting with '.'
        /// or '-'.
        name: String,
        /// Size of the volume, e.g. 10G or 10GiB (K, M, G, T: powers of 1024; KB, MB, GB, TB
        /// are refused as ambiguous). Thin: nothing is allocated until written.
        #[arg(long)]
        size: String,
        /// SCO size, 4M to 128M [default: the node's `volume_defaults.sco_size`, 64M unless
        /// its config file says otherwise].
        #[arg(long)]
        sco_size: Option<String>,
        /// Not-yet-uploaded data above which writes are throttled [default: the node's
        /// `volume_defaults.write_buffer`, 1G unless its config file says otherwise].
        #[arg(long)]
        write_buffer: Option<String>,
        /// DTL mode: sync, async or none [default: the node's, see `vstor serve --dtl`].
        #[arg(long, value_parser = ["sync", "async", "none"])]
        dtl_mode: Option<String>,
        /// DTL server HOST:PORT [default: the node's; in a cluster, a node chosen by the
        /// placement rule].
        #[arg(long, alias = "dtl-addr")]
        dtl: Option<String>,
        /// Cluster: the node that serves the volume [default: the least-loaded live node].
        #[arg(long)]
        node: Option<String>,
        /// The erasure-coded tier's preset for the volume's objects (`vstor preset list`)
        /// [default: the node's, from `--backend ec:PRESET`]. Needs `--backend ec`.
        #[arg(long)]
        preset: Option<String>,
        /// NBD allow list: a client-certificate subject CN allowed to see and open the volume
        /// (repeatable; needs `vstor serve --tls-ca`). See docs/security.md for the rule.
        #[arg(long = "allow-subject", value_name = "CN")]
        allow_subjects: Vec<String>,
        /// NBD allow list: a source network (CIDR such as 10.0.0.0/8, or an address) whose
        /// clients may see and open the volume (repeatable). Without any --allow-subject or
        /// --allow-net, every client may.
        #[arg(long = "allow-net", value_name = "CIDR")]
        allow_networks: Vec<String>,
        /// Encrypt the volume at rest (AES-256-XTS) with the key in PATH: at least 32 bytes
        /// (e.g. `head -c 32 /dev/urandom`), an absolute path on the node that serves the
        /// volume (and on any node that may adopt it), read there whenever the volume opens.
        /// Clones inherit it. See docs/security.md.
        #[arg(long, value_name = "PATH")]
        encryption_key_file: Option<String>,
    },
    /// List volumes (in a cluster: every volume of the cluster, with its owner).
    List,
    /// Show a volume's state and counters, and its vhost-user socket: `<vhost-dir>/NAME.sock`, or
    /// `<vhost-dir>/<prefix>~<hash>.sock` when that path is longer than a UNIX socket allows.
    Info {
        /// Volume name.
        name: String,
    },
    /// Create volume NAME from a disk image (raw or qcow2), writing only its data (holes and
    /// zeros are skipped, so a thin image stays thin).
    Import {
        /// The image file.
        file: PathBuf,
        /// Name of the new volume.
        name: String,
        /// Image format [default: detected: qcow2 by its magic, raw otherwise].
        #[arg(long, value_enum)]
        format: Option<transfer::Format>,
        /// Volume size, at least the image's [default: the image's (virtual) size, rounded up
        /// to 4 KiB].
        #[arg(long)]
        size: Option<String>,
        #[command(flatten)]
        tls: transfer::TlsArgs,
    },
    /// Copy a volume into a raw image file, sparse (zero ranges are left as holes).
    Export {
        /// Volume name.
        name: String,
        /// The image file to write.
        file: PathBuf,
        /// Overwrite FILE if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        tls: transfer::TlsArgs,
    },
    /// IOPS, bandwidth and latency percentiles (p50/p99 per operation) of a volume, measured
    /// over `--interval` (the figures `vstor top` refreshes).
    Stats {
        /// Volume name.
        name: String,
        /// How long to measure.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
    },
    /// Grow a volume (shrinking is refused, and so is resizing a template).
    Resize {
        /// Volume name.
        name: String,
        /// New size, larger than the current one, e.g. 20G (powers of 1024).
        #[arg(long)]
        size: String,
    },
    /// Change a volume's settings.
    Update {
        /// Volume name.
        name: String,
        /// Refuse writes (true) or accept them again (false).
        #[arg(long)]
        read_only: Option<bool>,
        /// DTL mode: sync, async or none. The link restarts and catches up.
        #[arg(long, value_parser = ["sync", "async", "none"])]
        dtl_mode: Option<String>,
        /// DTL server HOST:PORT.
        #[arg(long)]
        dtl: Option<String>,
        /// Replace the NBD allow list's subjects (client-certificate CNs; repeatable).
        #[arg(long = "allow-subject", value_name = "CN")]
        allow_subjects: Vec<String>,
        /// Replace the NBD allow list's networks (CIDRs or addresses; repeatable).
        #[arg(long = "allow-net", value_name = "CIDR")]
        allow_networks: Vec<String>,
        /// Empty the NBD allow list: every client may see and open the volume again.
        #[arg(long, conflicts_with_all = ["allow_subjects", "allow_networks"])]
        allow_any: bool,
    },
    /// Take over a volume whose node died: restore it from the backend, replay its DTL, fence
    /// the old node, and serve it from this node. In a cluster this goes through the registry
    /// and is how an operator brings back a volume recorded halted (once its DTL is reachable
    /// again); a volume with a live owner is refused (use `volume move`).
    Adopt {
        /// Volume name.
        name: String,
    },
    /// Restart a halted volume (for example one whose data the EC tier could not give back while
    /// too many OSDs were down), or one that failed to open when the node started, once the
    /// cause is gone: it is opened again from its write buffer, the backend and its DTL.
    Restart {
        /// Volume name.
        name: String,
    },
    /// Move a volume to another node of the cluster: flush, hand it over under a new owner tag,
    /// serve it from NODE. Its NBD clients are disconnected; the new NBD address is printed
    /// on stdout, progress on stderr.
    Move {
        /// Volume name.
        name: String,
        /// The node to move the volume to.
        #[arg(long)]
        to: String,
        /// How long the owner may take to put the volume's data on the backend.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Delete a volume and its backend data. Refused while clones of its snapshots exist, and
    /// while NBD clients or a vhost-user frontend use the volume.
    Delete {
        /// Volume name.
        name: String,
        /// Disconnect the volume's NBD clients and vhost-user frontend first.
        #[arg(long)]
        force: bool,
    },
    /// Reclaim backend space that overwrites, trims and deleted snapshots left behind; prints
    /// the progress on stderr and the report when done.
    Scrub {
        /// Volume name.
        name: String,
        /// Copy at most this many bytes per second, e.g. 64M [default: unlimited].
        #[arg(long)]
        rate: Option<String>,
    },
}

pub(crate) fn init_logging() {
    // `object_store` logs every retry of an S3 request at INFO (a line per request every
    // 0.1–5 s during an outage); the S3 store says when an outage begins and ends instead
    // (`vstor_backend::s3`'s outage watch). `RUST_LOG` still shows them.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,object_store=warn"));
    // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org): logs
    // redirected to a file or journald stay plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
}

fn run_volume(args: VolumeArgs) -> Result<()> {
    let api = args.remote.api();
    let client = Client::new(&api);
    let remote = &args.remote;
    match args.verb {
        VolumeVerb::Create {
            name,
            size,
            sco_size,
            write_buffer,
            dtl_mode,
            dtl,
            node,
            preset,
            allow_subjects,
            allow_networks,
            encryption_key_file,
        } => {
            let size = parse_size(&size)?;
            check_allow_list(&allow_subjects, &allow_networks)?;
            let request = CreateRequest {
                name: name.clone(),
                size,
                sco_size: sco_size.as_deref().map(parse_size).transpose()?,
                write_buffer: write_buffer.as_deref().map(parse_size).transpose()?,
                dtl_mode,
                dtl,
                node,
                preset,
                allow_subjects: (!allow_subjects.is_empty()).then_some(allow_subjects),
                allow_networks: (!allow_networks.is_empty()).then_some(allow_networks),
                encryption_key_file,
            };
            let value = settle_dtl(&client, client.post("/v1/volumes", &request)?);
            remote.show(&value, |v| {
                println!(
                    "created volume {name} ({}) on node {}, NBD export {}",
                    format_size(size),
                    v.owner.as_deref().unwrap_or("-"),
                    v.nbd_uri.as_deref().unwrap_or("-")
                );
            });
        }
        VolumeVerb::List => {
            let value: Vec<VolumeView> = client.get("/v1/volumes")?;
            remote.show(&value, |v| print_list(v));
        }
        VolumeVerb::Info { name } => {
            let value: VolumeView = client.get(&format!("/v1/volumes/{name}"))?;
            remote.show(&value, print_info);
        }
        VolumeVerb::Import {
            file,
            name,
            format,
            size,
            tls,
        } => {
            let size = size.as_deref().map(parse_size).transpose()?;
            let report = transfer::import(&client, &file, &name, format, size, &tls)?;
            remote.show(&report, |r| {
                println!(
                    "imported {} into volume {} ({}, {} of data) in {:.1} s",
                    r.file,
                    r.volume,
                    format_size(r.size),
                    format_size(r.data_bytes),
                    r.seconds
                );
            });
        }
        VolumeVerb::Export {
            name,
            file,
            force,
            tls,
        } => {
            let report = transfer::export(&client, &name, &file, force, &tls)?;
            remote.show(&report, |r| {
                println!(
                    "exported volume {} ({}, {} of data) to {} in {:.1} s",
                    r.volume,
                    format_size(r.size),
                    format_size(r.data_bytes),
                    r.file,
                    r.seconds
                );
            });
        }
        VolumeVerb::Stats { name, interval } => {
            let value = top::volume_stats(&client, &name, interval)?;
            remote.show(&value, |v| top::print_rates(std::slice::from_ref(v)));
        }
        VolumeVerb::Resize { name, size } => {
            let size = parse_size(&size)?;
            let value: VolumeView = client.post(
                &format!("/v1/volumes/{name}/resize"),
                &ResizeRequest { size },
            )?;
            remote.show(&value, |_| {
                println!("resized volume {name} to {}", format_size(size));
            });
        }
        VolumeVerb::Update {
            name,
            read_only,
            dtl_mode,
            dtl,
            allow_subjects,
            allow_networks,
            allow_any,
        } => {
            if read_only.is_none()
                && dtl_mode.is_none()
                && dtl.is_none()
                && allow_subjects.is_empty()
                && allow_networks.is_empty()
                && !allow_any
            {
                anyhow::bail!(
                    "nothing to update: give --read-only true|false, --dtl-mode, --dtl, \
                     --allow-subject, --allow-net or --allow-any"
                );
            }
            check_allow_list(&allow_subjects, &allow_networks)?;
            // A given list replaces the current one; --allow-any empties both.
            let list = |given: Vec<String>| {
                if allow_any {
                    Some(Vec::new())
                } else {
                    (!given.is_empty()).then_some(given)
                }
            };
            let request = UpdateRequest {
                read_only,
                dtl_mode,
                dtl,
                allow_subjects: list(allow_subjects),
                allow_networks: list(allow_networks),
            };
            let value = settle_dtl(
                &client,
                client.patch(&format!("/v1/volumes/{name}"), &request)?,
            );
            remote.show(&value, |v| {
                println!(
                    "updated volume {name}: read-only {}, DTL {}, NBD allow list {}",
                    v.read_only.unwrap_or(false),
                    dtl_text(v),
                    crate::client::allow_list_text(v)
                );
            });
        }
        VolumeVerb::Adopt { name } => {
            let value: VolumeView =
                client.post(&format!("/v1/volumes/{name}/adopt"), &serde_json::json!({}))?;
            remote.show(&value, |v| {
                println!(
                    "adopted volume {name}: owner tag {}, {} DTL entries replayed ({} held)",
                    v.owner_tag.unwrap_or(0),
                    v.dtl_entries_replayed.unwrap_or(0),
                    v.dtl_entries_held.unwrap_or(0)
                );
            });
        }
        VolumeVerb::Restart { name } => {
            let value: VolumeView = client.post(
                &format!("/v1/volumes/{name}/restart"),
                &serde_json::json!({}),
            )?;
            remote.show(&value, |v| {
                println!("restarted volume {name}: {}", v.state);
            });
        }
        VolumeVerb::Move {
            name,
            to,
            timeout_secs,
        } => {
            let what = format!(
                "moving volume {name} to {to}: flushing and uploading on its owner, then handing it over"
            );
            if !client::on_terminal() {
                eprintln!("{what}");
            }
            let waiting = client::Waiting::start(&what);
            let started = std::time::Instant::now();
            let moved: Result<VolumeView> = Client::without_timeout(&api).post(
                &format!("/v1/volumes/{name}/move"),
                &MoveRequest {
                    to: to.clone(),
                    timeout_secs: Some(timeout_secs),
                },
            );
            waiting.done();
            let value = moved?;
            eprintln!(
                "moved volume {name} from {} to {to} in {:.1} s ({} NBD clients disconnected); new owner tag {}",
                value.moved_from.as_deref().unwrap_or("?"),
                started.elapsed().as_secs_f64(),
                value.nbd_clients_disconnected.unwrap_or(0),
                value.owner_tag.unwrap_or(0)
            );
            remote.show(&value, |v| {
                println!("{}", v.nbd_uri.as_deref().unwrap_or("-"));
            });
        }
        VolumeVerb::Delete { name, force } => {
            let query = if force { "?force=true" } else { "" };
            let value: VolumeDeleted = client.delete(&format!("/v1/volumes/{name}{query}"))?;
            remote.show(&value, |v| {
                let mut notes = Vec::new();
                if v.nbd_clients_disconnected > 0 {
                    notes.push(format!(
                        "disconnected {} NBD client(s)",
                        v.nbd_clients_disconnected
                    ));
                }
                if v.vhost_frontend_disconnected {
                    notes.push("disconnected the vhost-user frontend".into());
                }
                if notes.is_empty() {
                    println!("deleted volume {name}");
                } else {
                    println!("deleted volume {name} ({})", notes.join("; "));
                }
                for what in &v.left_behind {
                    println!("warning: could not remove {what}");
                }
            });
        }
        VolumeVerb::Scrub { name, rate } => {
            let request = ScrubRequest {
                rate: rate.as_deref().map(parse_size).transpose()?,
            };
            let progress = client::ProgressPrinter::start(&api, &name);
            let result: Result<ScrubAnswer> =
                Client::without_timeout(&api).post(&format!("/v1/volumes/{name}/scrub"), &request);
            progress.stop();
            remote.show(&result?, print_scrub);
        }
    }
    Ok(())
}

/// `sync 127.0.0.1:10810 (ok_sync)`, or `none`.
fn dtl_text(v: &VolumeView) -> String {
    match v.dtl_mode.as_deref() {
        None | Some("none") => "none".into(),
        Some(mode) => format!(
            "{mode} {} ({})",
            v.dtl_addr.as_deref().unwrap_or("-"),
            v.dtl_state.as_deref().unwrap_or("-")
        ),
    }
}

/// A DTL link that was just (re)started reports `degraded` until its first connection
/// attempt ends: wait (a few seconds at most) for that, so that a healthy DTL is not shown as
/// degraded. A volume whose DTL still does not answer (a wrong or unreachable address) is served
/// without the DTL's protection: say so on stderr.
fn settle_dtl(client: &Client, mut v: VolumeView) -> VolumeView {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let starting =
        |v: &VolumeView| v.dtl_state.as_deref() == Some("degraded") && v.dtl_last_error.is_none();
    while starting(&v) && std::time::Instant::now() < deadline {
        std::thread::park_timeout(std::time::Duration::from_millis(100));
        // Only the DTL's fields are refreshed: the verb's own answer (`cloned_from`,
        // `dtl_node`, ...) is what is printed.
        match client.get::<VolumeView>(&format!("/v1/volumes/{}", v.name)) {
            Ok(now) => {
                v.dtl_state = now.dtl_state;
                v.dtl_in_sync = now.dtl_in_sync;
                v.dtl_last_error = now.dtl_last_error;
                v.dtl_backlog_bytes = now.dtl_backlog_bytes;
                v.dtl_degradations = now.dtl_degradations;
            }
            Err(_) => break,
        }
    }
    warn_dtl(&v);
    v
}

fn warn_dtl(v: &VolumeView) {
    if v.dtl_state.as_deref() == Some("degraded") {
        eprintln!(
            "warning: volume {}: its DTL {} is not reachable ({}); writes are not mirrored until it is",
            v.name,
            v.dtl_addr.as_deref().unwrap_or("-"),
            v.dtl_last_error.as_deref().unwrap_or("no answer")
        );
    }
}

fn run_snapshot(args: SnapshotArgs) -> Result<()> {
    let client = Client::new(&args.remote.api());
    let remote = &args.remote;
    let path = |volume: &str, snapshot: &str| format!("/v1/volumes/{volume}/snapshots/{snapshot}");
    match args.verb {
        SnapshotVerb::Create { volume, snapshot } => {
            let value: SnapshotView = client.post(
                &format!("/v1/volumes/{volume}/snapshots"),
                &SnapshotRequest {
                    name: snapshot.clone(),
                },
            )?;
            remote.show(&value, |v| {
                println!(
                    "created snapshot {snapshot} of volume {volume} ({} written since the previous snapshot), NBD export {}",
                    format_size(v.written_bytes),
                    v.nbd_uri
                );
            });
        }
        SnapshotVerb::List { volume } => {
            let value: Vec<SnapshotView> =
                client.get(&format!("/v1/volumes/{volume}/snapshots"))?;
            remote.show(&value, |v| print_snapshots(&volume, v));
        }
        SnapshotVerb::Delete { volume, snapshot } => {
            let value: SnapshotDeleted = client.delete(&path(&volume, &snapshot))?;
            remote.show(&value, |_| {
                println!("deleted snapshot {snapshot} of volume {volume}");
            });
        }
        SnapshotVerb::Rollback {
            volume,
            snapshot,
            force,
        } => {
            let value: VolumeView = client.post(
                &format!("{}/rollback", path(&volume, &snapshot)),
                &RollbackRequest { force },
            )?;
            remote.show(&value, |v| {
                let mut notes = Vec::new();
                if let Some(dropped) = v.snapshots_dropped.as_ref().filter(|d| !d.is_empty()) {
                    notes.push(format!("dropped snapshots {}", dropped.join(", ")));
                }
                let clients = v.nbd_clients_disconnected.unwrap_or(0);
                if clients > 0 {
                    notes.push(format!("disconnected {clients} NBD client(s)"));
                }
                if v.vhost_frontend_disconnected == Some(true) {
                    notes.push("disconnected the vhost-user frontend".into());
                }
                let notes = if notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", notes.join("; "))
                };
                println!("rolled volume {volume} back to snapshot {snapshot}{notes}");
            });
        }
        SnapshotVerb::Export { volume, snapshot } => {
            let value: SnapshotView = client.post(
                &format!("{}/export", path(&volume, &snapshot)),
                &serde_json::json!({}),
            )?;
            remote.show(&value, |v| {
                println!(
                    "snapshot {snapshot} of volume {volume} is served read-only at {} (vhost-user) and {} (NBD)",
                    v.vhost_socket.as_deref().unwrap_or("-"),
                    v.nbd_uri
                );
            });
        }
        SnapshotVerb::Unexport { volume, snapshot } => {
            let value: SnapshotUnexported =
                client.delete(&format!("{}/export", path(&volume, &snapshot)))?;
            remote.show(&value, |_| {
                println!(
                    "snapshot {snapshot} of volume {volume} is no longer served over vhost-user"
                );
            });
        }
    }
    Ok(())
}

fn run_clone(args: CloneArgs) -> Result<()> {
    let CloneVerb::Create {
        name,
        from,
        write_buffer,
        dtl_mode,
        dtl,
        wait,
    } = args.verb;
    let request = CloneRequest {
        name: name.clone(),
        from: from.clone(),
        write_buffer: write_buffer.as_deref().map(parse_size).transpose()?,
        dtl_mode,
        dtl,
        wait_secs: Some(wait),
    };
    let client = Client::without_timeout(&args.remote.api());
    let waiting = client::Waiting::start(&format!(
        "cloning {name} from {from} (waiting up to {wait} s for the snapshot to reach the backend)"
    ));
    let cloned = client.post("/v1/clones", &request);
    waiting.done();
    let value = settle_dtl(&client, cloned?);
    args.remote.show(&value, |v| {
        println!(
            "created clone {name} of {} ({}), NBD export {}",
            v.cloned_from.as_deref().unwrap_or(&from),
            format_size(v.size.unwrap_or(0)),
            v.nbd_uri.as_deref().unwrap_or("-")
        );
    });
    Ok(())
}

/// The same checks the API makes, before anything is sent: a bad CIDR or subject is named in a
/// one-line error.
fn check_allow_list(subjects: &[String], networks: &[String]) -> Result<()> {
    vstor_volumedriver::access::parse_subjects(subjects)
        .map_err(|e| anyhow::anyhow!("--allow-subject: {e}"))?;
    vstor_volumedriver::access::parse_networks(networks)
        .map_err(|e| anyhow::anyhow!("--allow-net: {e}"))?;
    Ok(())
}

fn run_template(args: TemplateArgs) -> Result<()> {
    let TemplateVerb::Set { volume } = args.verb;
    let value: VolumeView = Client::new(&args.remote.api()).post(
        &format!("/v1/volumes/{volume}/template"),
        &serde_json::json!({}),
    )?;
    args.remote.show(&value, |v| {
        println!(
            "volume {volume} is now a read-only template (snapshot {}); clone it with `vstor clone create NAME --from {volume}`",
            v.template_snapshot.as_ref().map_or("-", |s| s.name.as_str())
        );
    });
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let global = cli.global;
    if global.api.is_some()
        && !matches!(
            cli.command,
            Command::Serve(_)
                | Command::Volume(_)
                | Command::Snapshot(_)
                | Command::Clone(_)
                | Command::Template(_)
                | Command::Node(_)
                | Command::Top(_)
                | Command::Edge(_)
        )
    {
        anyhow::bail!(
            "--api before the command is for serve, volume, snapshot, clone, template, node, top and edge; this command has no --api"
        );
    }
    // ureq (HTTPS to an API) and the API's own TLS use rustls with this provider.
    api_tls::install_crypto_provider();
    // The commands that call a node's API send its token (and trust its CA).
    if matches!(
        cli.command,
        Command::Volume(_)
            | Command::Snapshot(_)
            | Command::Clone(_)
            | Command::Template(_)
            | Command::Node(_)
            | Command::Top(_)
            | Command::Edge(_)
    ) {
        api_auth::set_outgoing(api_auth::Outgoing::from_cli(
            global.api_token_file.as_deref(),
            global.api_ca.as_deref(),
        )?);
    }
    match cli.command {
        Command::Serve(mut args) => {
            if args.api.is_none() {
                args.api = global.api;
            }
            init_logging();
            let file = match &args.config {
                Some(path) => FileConfig::load(path)?,
                None => FileConfig::default(),
            };
            let config = file.resolve(Overrides {
                data_dir: args.data_dir,
                backend: args.backend,
                api: args.api,
                api_token_file: global.api_token_file,
                api_tls_cert: args.api_tls_cert,
                api_tls_key: args.api_tls_key,
                api_ca: global.api_ca,
                nbd: args.nbd,
                edge_listen: args.edge_listen,
                edge_socket: args.edge_socket,
                edge_frame_timeout: args.edge_frame_timeout,
                vhost_dir: args.vhost_dir,
                dtl: args.dtl,
                write_buffer_limit: args.write_buffer_limit,
                read_cache: args.read_cache,
                s3_retry_timeout: args.s3_retry_timeout,
                upload_concurrency: args.upload_concurrency,
                mds: args.mds,
                mds_max_behind: args.mds_max_behind,
                no_default_volume: args.no_default_volume,
                registry: args.registry,
                node: args.node,
                domain: args.domain,
                recovery_domain: args.recovery_domain,
                dtl_listen: args.dtl_listen,
                tls_cert: args.nbd_frontend.tls_cert,
                tls_key: args.nbd_frontend.tls_key,
                tls_ca: args.nbd_frontend.tls_ca,
                nbd_tls: args.nbd_frontend.nbd_tls,
                nbd_max_connections: args.nbd_frontend.nbd_max_connections,
                nbd_max_connections_per_client: args.nbd_frontend.nbd_max_connections_per_client,
                peer_tls_cert: args.peer_tls.peer_tls_cert,
                peer_tls_key: args.peer_tls.peer_tls_key,
                peer_tls_ca: args.peer_tls.peer_tls_ca,
                etcd: args.etcd.settings(),
            })?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(server::serve(config))
        }
        Command::Volume(mut args) => {
            args.remote.inherit(&global);
            run_volume(args)
        }
        Command::Snapshot(mut args) => {
            args.remote.inherit(&global);
            run_snapshot(args)
        }
        Command::Clone(mut args) => {
            args.remote.inherit(&global);
            run_clone(args)
        }
        Command::Template(mut args) => {
            args.remote.inherit(&global);
            run_template(args)
        }
        Command::Top(mut args) => {
            args.remote.inherit(&global);
            top::top(
                &Client::new(&args.remote.api()),
                args.interval,
                args.count,
                args.remote.json,
            )
        }
        Command::Node(mut args) => {
            args.remote.inherit(&global);
            let NodeVerb::List = args.verb;
            let value: Vec<api_types::NodeView> =
                Client::new(&args.remote.api()).get("/v1/nodes")?;
            args.remote.show(&value, |v| client::print_nodes(v));
            Ok(())
        }
        Command::Edge(mut args) => {
            // The edge's own `--api` is global to its verbs, and clap hands a global value to
            // the top level too: `vstor edge --api X` and `vstor --api X edge` both land here.
            args.inherit(global.api, global.json, global.api_token_file.clone());
            edge_host::cli::run(args)
        }
        Command::Osd(args) => tier::cli::run_osd(args),
        Command::Preset(args) => tier::cli::run_preset(args),
        Command::Backend(args) => tier::backend_cli::run(args),
        Command::Mds(args) => mds_host::run(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "vstor", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            println!("wrote the man pages into {}", dir.display());
            Ok(())
        }
        Command::Dtl(args) => {
            init_logging();
            let listen: std::net::SocketAddr = args
                .listen
                .parse()
                .with_context(|| format!("listen address {:?} is not IP:PORT", args.listen))?;
            let tls = args.peer_tls.load()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(server::serve_dtl(
                listen,
                args.data_dir,
                vstor_dtl::DtlServerConfig {
                    fsync: args.fsync,
                    frame_timeout: args.frame_timeout,
                    tls,
                },
                &args.metrics,
            ))
        }
    }
}

/// Whether `--json` is on the command line (before `--`): errors are then JSON too, whichever
/// command failed.
fn json_requested() -> bool {
    std::env::args()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json_requested() {
                let error = crate::api_types::ErrorBody {
                    error: format!("{e:#}"),
                };
                eprintln!("{}", serde_json::to_string(&error).unwrap_or_default());
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

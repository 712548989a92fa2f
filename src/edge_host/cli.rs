//! `vstor edge [FLAGS] [attach VOLUME | detach VOLUME | list]`: without a verb, run the edge
//! daemon; with one, ask the running daemon (at `--api`) to do it.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::{EdgeConfig, DEFAULT_EDGE_API, DEFAULT_EDGE_NBD, DEFAULT_EDGE_VHOST_DIR};
use crate::client::{print_json, Client};

#[derive(Args)]
pub struct EdgeArgs {
    /// Cluster registry: etcd://HOST:PORT[,HOST:PORT...] (required to run the daemon).
    #[arg(long)]
    registry: Option<String>,
    /// This edge's unique name [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// Directory of the vhost-user-blk sockets, <vhost-dir>/VOLUME.sock.
    #[arg(long, default_value = DEFAULT_EDGE_VHOST_DIR)]
    vhost_dir: std::path::PathBuf,
    /// NBD listen address; attached volumes are nbd://ADDR/VOLUME.
    #[arg(long, default_value = DEFAULT_EDGE_NBD)]
    nbd: String,
    /// The edge's HTTP API: where the daemon listens, and where the verbs reach it.
    #[arg(long, env = "VSTOR_EDGE_API", default_value = DEFAULT_EDGE_API, global = true)]
    api: String,
    /// How long the guest sees a pause, not an error, while the owner is unreachable (e.g. 30s,
    /// 500ms).
    #[arg(long, default_value = "30s")]
    reconnect_bound: String,
    /// Threads of the edge's network runtime (connections to owners, NBD, completions).
    /// One keeps a request's hand-offs on one thread: measured here, it adds 31 µs to a 4 KiB
    /// QD1 read instead of 42 µs with two, at the same QD32 throughput. More help only when many
    /// attached volumes are busy at once.
    #[arg(long, default_value_t = 1)]
    io_threads: usize,
    /// Print the daemon's JSON answer instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    verb: Option<EdgeVerb>,
}

#[derive(Subcommand)]
enum EdgeVerb {
    /// Attach a volume: serve it at <vhost-dir>/VOLUME.sock and nbd://NBD/VOLUME, whichever node
    /// owns it. A volume is attached on one edge at a time unless it is read-only.
    Attach { volume: String },
    /// Detach a volume. Refused while NBD clients or a vhost-user frontend use it.
    Detach {
        volume: String,
        /// Disconnect its NBD clients and vhost-user frontend first.
        #[arg(long)]
        force: bool,
    },
    /// The attached volumes: owner, tag, connection state, reconnects, in-flight requests,
    /// latency, socket and NBD URI.
    List,
}

fn text(value: &Value, key: &str) -> String {
    match value.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn micros(value: &Value, key: &str) -> String {
    match value.get(key).and_then(Value::as_u64) {
        Some(u64::MAX) => ">10s".into(),
        Some(us) => format!("{us}us"),
        None => "-".into(),
    }
}

fn print_list(value: &Value) {
    let empty = Vec::new();
    println!(
        "{:<20} {:<12} {:>5} {:<13} {:>10} {:>8} {:>9} {:>9} {:>9}  {:<40} NBD",
        "VOLUME", "OWNER", "TAG", "STATE", "RECONNECTS", "INFLIGHT", "MEAN", "P50", "P99", "SOCKET"
    );
    for v in value.as_array().unwrap_or(&empty) {
        println!(
            "{:<20} {:<12} {:>5} {:<13} {:>10} {:>8} {:>9} {:>9} {:>9}  {:<40} {}",
            text(v, "volume"),
            text(v, "owner"),
            text(v, "tag"),
            text(v, "state"),
            text(v, "reconnects"),
            text(v, "inflight"),
            micros(v, "latency_mean_us"),
            micros(v, "latency_p50_us"),
            micros(v, "latency_p99_us"),
            text(v, "socket"),
            text(v, "nbd_uri"),
        );
    }
}

pub fn run(args: EdgeArgs) -> Result<()> {
    let show = |value: Value, text: &dyn Fn(&Value)| {
        if args.json {
            print_json(&value);
        } else {
            text(&value);
        }
    };
    let client = || Client::edge(&args.api);
    match &args.verb {
        Some(EdgeVerb::Attach { volume }) => {
            let value =
                client().post("/v1/attachments", serde_json::json!({ "volume": volume }))?;
            show(value, &|v| {
                println!(
                    "attached volume {volume} (owner {}, tag {}{}): vhost-user {} , NBD {}",
                    text(v, "owner"),
                    text(v, "tag"),
                    if v["read_only"] == true {
                        ", read-only"
                    } else {
                        ""
                    },
                    text(v, "socket"),
                    text(v, "nbd_uri"),
                );
            });
            Ok(())
        }
        Some(EdgeVerb::Detach { volume, force }) => {
            let path = if *force {
                format!("/v1/attachments/{volume}?force=true")
            } else {
                format!("/v1/attachments/{volume}")
            };
            let value = client().delete(&path)?;
            show(value, &|_| println!("detached volume {volume}"));
            Ok(())
        }
        Some(EdgeVerb::List) => {
            show(client().get("/v1/attachments")?, &print_list);
            Ok(())
        }
        None => run_daemon(&args),
    }
}

fn run_daemon(args: &EdgeArgs) -> Result<()> {
    crate::init_logging();
    let Some(registry) = args.registry.clone() else {
        anyhow::bail!("vstor edge needs the cluster registry: give --registry etcd://HOST:PORT (or a verb: attach, detach, list)");
    };
    let parse = |what: &str, value: &str| -> Result<std::net::SocketAddr> {
        value
            .parse()
            .with_context(|| format!("{what} address {value:?} is not IP:PORT"))
    };
    let reconnect_bound = humantime::parse_duration(&args.reconnect_bound).with_context(|| {
        format!(
            "--reconnect-bound {:?} is not a duration (e.g. 30s, 500ms)",
            args.reconnect_bound
        )
    })?;
    if reconnect_bound.is_zero() {
        anyhow::bail!("--reconnect-bound must be more than 0");
    }
    let config = EdgeConfig {
        registry,
        name: args.name.clone().unwrap_or_else(super::host_name),
        vhost_dir: args.vhost_dir.clone(),
        nbd: parse("--nbd", &args.nbd)?,
        api: parse("--api", &args.api)?,
        reconnect_bound,
    };
    if args.io_threads == 0 {
        anyhow::bail!("--io-threads must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.io_threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(super::run(config))
}

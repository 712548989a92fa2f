//! `vstor edge [FLAGS] [attach VOLUME | detach VOLUME | list]`: without a verb, run the edge
//! daemon; with one, ask the running daemon (at `--api`) to do it.

use super::{EdgeConfig, DEFAULT_EDGE_API, DEFAULT_EDGE_NBD, DEFAULT_EDGE_VHOST_DIR};
use crate::api_types::{AttachRequest, Attachment, Detached};
use crate::client::{print_json, print_table, Client};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};

/// `vstor edge --transport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// The owner's unix socket when it shares this host (same `/etc/machine-id`), else TCP.
    Auto,
    /// TCP (with mutual TLS where configured) to every owner.
    Tcp,
}

#[derive(Args)]
pub struct EdgeArgs {
    /// Cluster registry: etcd://HOST:PORT[,HOST:PORT...] or etcd+https://HOST:PORT[,...]
    /// (required to run the daemon).
    #[arg(long)]
    registry: Option<String>,
    /// TLS and credentials to etcd.
    #[command(flatten)]
    etcd: crate::security_args::EtcdArgs,
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
    /// How to reach an owner on this same host that offers a unix socket (`vstor serve
    /// --edge-socket`): `auto` uses the socket (no TCP stack, no TLS), `tcp` always dials its
    /// `--edge-listen` address.
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    transport: Transport,
    /// NBD TLS and connection limits, as `vstor serve`'s.
    #[command(flatten)]
    nbd_frontend: crate::security_args::NbdFrontendArgs,
    /// Mutual TLS with the volumes' owners (their `--edge-listen` servers).
    #[command(flatten)]
    peer_tls: crate::security_args::PeerTlsArgs,
    /// `--api-token-file` (a global flag): the daemon's API requires that token.
    #[arg(skip)]
    api_token_file: Option<std::path::PathBuf>,
    /// Print the daemon's JSON answer instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    verb: Option<EdgeVerb>,
}

impl EdgeArgs {
    /// `--api`/`--json` given before the command: `vstor --api ADDR edge list`.
    pub fn inherit(
        &mut self,
        api: Option<String>,
        json: bool,
        api_token_file: Option<std::path::PathBuf>,
    ) {
        if let Some(api) = api {
            self.api = api;
        }
        self.json |= json;
        self.api_token_file = api_token_file;
    }
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

fn micros(value: Option<u64>) -> String {
    match value {
        Some(u64::MAX) => ">10s".into(),
        Some(us) => format!("{us}us"),
        None => "-".into(),
    }
}

fn print_list(attachments: &[Attachment]) {
    let rows: Vec<Vec<String>> = attachments
        .iter()
        .map(|a| {
            vec![
                a.volume.clone(),
                a.owner.clone().unwrap_or_else(|| "-".into()),
                a.tag.to_string(),
                a.state.clone(),
                a.reconnects.to_string(),
                a.inflight.to_string(),
                micros(a.latency_mean_us),
                micros(a.latency_p50_us),
                micros(a.latency_p99_us),
                a.socket.clone(),
                a.nbd_uri.clone(),
                crate::client::allow_text(&a.allow_subjects, &a.allow_networks),
            ]
        })
        .collect();
    print_table(
        &[
            "VOLUME",
            "OWNER",
            "TAG",
            "STATE",
            "RECONNECTS",
            "INFLIGHT",
            "MEAN",
            "P50",
            "P99",
            "SOCKET",
            "NBD",
            "NBD ALLOW",
        ],
        &rows,
        &[2, 4, 5, 6, 7, 8],
    );
}

pub fn run(args: EdgeArgs) -> Result<()> {
    fn show<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce(&T)) {
        if json {
            print_json(value);
        } else {
            text(value);
        }
    }
    let client = || Client::edge(&args.api);
    match &args.verb {
        Some(EdgeVerb::Attach { volume }) => {
            let value: Attachment = client().post(
                "/v1/attachments",
                &AttachRequest {
                    volume: volume.clone(),
                },
            )?;
            show(args.json, &value, |v| {
                println!(
                    "attached volume {volume} (owner {}, tag {}{}): vhost-user {} , NBD {}",
                    v.owner.as_deref().unwrap_or("-"),
                    v.tag,
                    if v.read_only { ", read-only" } else { "" },
                    v.socket,
                    v.nbd_uri,
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
            let value: Detached = client().delete(&path)?;
            show(args.json, &value, |_| println!("detached volume {volume}"));
            Ok(())
        }
        Some(EdgeVerb::List) => {
            let value: Vec<Attachment> = client().get("/v1/attachments")?;
            show(args.json, &value, |v| print_list(v));
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
    // The NBD frontend's settings are `vstor serve`'s (`[nbd_server]`), checked the same way.
    let front = &args.nbd_frontend;
    let mut nbd_settings = crate::config::NbdSettings::default();
    for (field, value) in [
        (&mut nbd_settings.tls_cert, &front.tls_cert),
        (&mut nbd_settings.tls_key, &front.tls_key),
        (&mut nbd_settings.tls_ca, &front.tls_ca),
        (&mut nbd_settings.tls, &front.nbd_tls),
    ] {
        if let Some(value) = value {
            field.clone_from(value);
        }
    }
    for (name, value) in [
        ("--nbd-max-connections", front.nbd_max_connections),
        (
            "--nbd-max-connections-per-client",
            front.nbd_max_connections_per_client,
        ),
    ] {
        if value == Some(0) {
            anyhow::bail!("{name} must be at least 1");
        }
    }
    let nbd_tls = nbd_settings.resolve_tls()?;
    let api_token = args
        .api_token_file
        .as_deref()
        .map(|path| crate::api_auth::ApiTokens::load(path, "--api-token-file"))
        .transpose()?;
    if crate::registry::etcd_endpoints(&registry).is_none() {
        anyhow::bail!(
            "--registry {registry:?} is not allowed: an edge needs the cluster registry, {}",
            crate::registry::ETCD_URI_FORMS
        );
    }
    let config = EdgeConfig {
        registry: args.etcd.target(&registry)?,
        name: args.name.clone().unwrap_or_else(super::host_name),
        vhost_dir: args.vhost_dir.clone(),
        nbd: parse("--nbd", &args.nbd)?,
        api: parse("--api", &args.api)?,
        reconnect_bound,
        local_host: match args.transport {
            Transport::Auto => Some(crate::host_id::host_id()),
            Transport::Tcp => None,
        },
        nbd_tls,
        nbd_max_connections: front
            .nbd_max_connections
            .unwrap_or(nbd_settings.max_connections),
        nbd_max_connections_per_client: front
            .nbd_max_connections_per_client
            .unwrap_or(nbd_settings.max_connections_per_client),
        peer_tls: args.peer_tls.clone().load()?,
        api_token,
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

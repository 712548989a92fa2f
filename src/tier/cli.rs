//! `vstor osd [FLAGS]` runs an OSD daemon; `vstor osd list|decommission|out|in` and
//! `vstor preset create|list|show` manage the tier. The verbs talk to the registry directly
//! (`--registry`, or `VSTOR_REGISTRY`): the tier is the cluster's, not one node's, and an
//! operator must be able to look at it with every node down.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use vstor_backend::ec::preset::{Compression, Policy, Preset};

use super::map::{self, update};
use super::osd::{run, OsdConfig};
use super::records::{OsdAdmin, OsdRecord, OsdStatus, PresetRecord, OSDS, PRESETS};
use crate::client::print_json;
use crate::registry::{self, Registry};
use crate::size::{format_size, parse_size};

#[derive(Args)]
pub struct OsdArgs {
    /// Cluster registry: etcd://HOST:PORT[,HOST:PORT...] or etcd+https://HOST:PORT[,...].
    #[arg(long, env = "VSTOR_REGISTRY", global = true)]
    registry: Option<String>,
    /// TLS and credentials to etcd.
    #[command(flatten)]
    etcd: crate::security_args::EtcdArgs,
    /// Listen address of the OSD protocol (daemon).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Where the fragments are kept: one OSD per disk (daemon).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Failure domain of the disk: a host, rack or room (daemon).
    #[arg(long, default_value = "default")]
    domain: String,
    /// Bytes the OSD may hold, e.g. 500G [default: the size of the data directory's
    /// filesystem]. Past it, puts are refused and placement skips the OSD.
    #[arg(long)]
    capacity: Option<String>,
    /// Close a connection whose frame is still incomplete this long after its first bytes
    /// arrived (slowloris clients); idle connections are kept (daemon).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    frame_timeout: std::time::Duration,
    /// Mutual TLS (daemon): clients must present a certificate of the cluster CA.
    #[command(flatten)]
    peer_tls: crate::security_args::PeerTlsArgs,
    /// Prometheus metrics of the daemon.
    #[command(flatten)]
    metrics: crate::daemon_metrics::MetricsArgs,
    /// Print JSON instead of text (verbs).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    verb: Option<OsdVerb>,
}

#[derive(Subcommand)]
enum OsdVerb {
    /// Every OSD: id, address, domain, state (up/down/draining/out), used and free space,
    /// fragment count.
    List,
    /// Drain an OSD online: it takes nothing new and repair moves its fragments elsewhere;
    /// it is out once empty.
    Decommission { id: u64 },
    /// Take an OSD out of service now: its fragments are rebuilt from the others.
    Out { id: u64 },
    /// Put a drained or out OSD back in service.
    In { id: u64 },
}

#[derive(Args)]
pub struct PresetArgs {
    /// Cluster registry: etcd://HOST:PORT[,HOST:PORT...] or etcd+https://HOST:PORT[,...].
    #[arg(long, env = "VSTOR_REGISTRY", global = true)]
    registry: Option<String>,
    /// TLS and credentials to etcd.
    #[command(flatten)]
    etcd: crate::security_args::EtcdArgs,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    verb: PresetVerb,
}

#[derive(Subcommand)]
enum PresetVerb {
    /// Create a preset: k data and m parity fragments per object, acknowledged once c are
    /// durable, at most x per failure domain; --fallback adds policies used, in order, when too
    /// few OSDs or domains are up for the first.
    Create {
        name: String,
        #[arg(long)]
        k: u8,
        #[arg(long)]
        m: u8,
        /// Fragments durable before a put is acknowledged [default: k+1, at most k+m].
        #[arg(long)]
        c: Option<u8>,
        /// Most fragments of an object in one failure domain [default: m].
        #[arg(long)]
        x: Option<u8>,
        /// Further policies, best first: K,M[,C[,X]] (repeatable).
        #[arg(long = "fallback")]
        fallbacks: Vec<String>,
        /// Bytes of each fragment piece of a full chunk, a multiple of 4 KiB [default: 1M].
        #[arg(long, default_value = "1M")]
        fragment_size: String,
        /// zstd, lz4 or none: objects are compressed in 64 KiB blocks (incompressible ones kept
        /// raw) before encryption and encoding, so partial reads stay partial.
        #[arg(long, default_value = "none")]
        compression: String,
        /// A key file (32 raw bytes, or 64 hex digits): objects are encrypted with AES-256-CTR
        /// before encoding, so OSDs and their disks hold only ciphertext and partial reads stay
        /// partial. The key is kept in the registry with the preset.
        #[arg(long)]
        encryption_key_file: Option<PathBuf>,
        /// Add a local parity per failure domain, so one lost fragment is rebuilt from its own
        /// domain (0 cross-domain repair bytes).
        #[arg(long)]
        local_parity: bool,
    },
    /// Every preset.
    List,
    /// One preset's policies and settings.
    Show { name: String },
}

/// Connect to the registry named by `--registry`, with the `--etcd-*` settings.
pub async fn connect(
    spec: Option<&str>,
    etcd: &crate::security_args::EtcdArgs,
) -> Result<Arc<dyn Registry>> {
    let Some(spec) = spec else {
        bail!(
            "the EC tier lives in the cluster registry: give --registry etcd://HOST:PORT (or set \
             VSTOR_REGISTRY)"
        );
    };
    if registry::etcd_endpoints(spec).is_none() {
        bail!(
            "registry {spec:?} is not {}: the EC tier needs the cluster registry (the \
             single-node local registry lives inside one `vstor serve` process, where OSD \
             daemons cannot reach it)",
            registry::ETCD_URI_FORMS
        );
    }
    let target = etcd.target(spec)?;
    Ok(Arc::new(
        target
            .connect()
            .await
            .context("cannot reach the cluster registry")?,
    ))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn run_osd(args: OsdArgs) -> Result<()> {
    let runtime = runtime()?;
    runtime.block_on(async move {
        let registry = connect(args.registry.as_deref(), &args.etcd).await?;
        match args.verb {
            None => {
                crate::init_logging();
                let Some(data_dir) = args.data_dir else {
                    bail!("vstor osd needs --data-dir DIR (one OSD per disk)");
                };
                let capacity = args
                    .capacity
                    .as_deref()
                    .map(parse_size)
                    .transpose()
                    .context("--capacity")?;
                if capacity == Some(0) {
                    bail!("--capacity must be more than 0");
                }
                run(OsdConfig {
                    listen: args.listen,
                    data_dir,
                    registry,
                    domain: args.domain,
                    capacity,
                    frame_timeout: args.frame_timeout,
                    tls: args.peer_tls.load()?,
                    metrics: args.metrics,
                })
                .await
            }
            Some(OsdVerb::List) => {
                let statuses: Vec<OsdStatus> = map::osds(registry.as_ref())
                    .await?
                    .into_iter()
                    .map(|(_, _, status, _)| status)
                    .collect();
                if args.json {
                    print_json(&serde_json::to_value(&statuses)?);
                } else {
                    print_osds(&statuses);
                }
                Ok(())
            }
            Some(OsdVerb::Decommission { id }) => {
                set_admin(registry.as_ref(), id, OsdAdmin::Draining).await?;
                println!(
                    "OSD {id} is draining: it takes no new fragments, and repair moves its \
                     fragments to the other OSDs (`vstor backend repair`, or the nodes' \
                     background repair); `vstor osd list` shows its fragment count"
                );
                Ok(())
            }
            Some(OsdVerb::Out { id }) => {
                set_admin(registry.as_ref(), id, OsdAdmin::Out).await?;
                println!("OSD {id} is out: its fragments are rebuilt from the other OSDs");
                Ok(())
            }
            Some(OsdVerb::In { id }) => {
                set_admin(registry.as_ref(), id, OsdAdmin::In).await?;
                println!("OSD {id} is in service again");
                Ok(())
            }
        }
    })
}

async fn set_admin(registry: &dyn Registry, id: u64, admin: OsdAdmin) -> Result<()> {
    let key = format!("{OSDS}{id}");
    let updated = update::<OsdRecord>(registry, &key, None, |record| {
        Ok(record.map(|r| OsdRecord { admin, ..r }))
    })
    .await?;
    if updated.is_none() {
        bail!("there is no OSD {id} (see `vstor osd list`)");
    }
    Ok(())
}

fn opt_size(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), format_size)
}

fn print_osds(osds: &[OsdStatus]) {
    println!(
        "{:>4}  {:<21} {:<12} {:<9} {:>10} {:>10} {:>10}  DATA",
        "ID", "ADDRESS", "DOMAIN", "STATE", "USED", "FREE", "FRAGMENTS"
    );
    for osd in osds {
        println!(
            "{:>4}  {:<21} {:<12} {:<9} {:>10} {:>10} {:>10}  {}",
            osd.id,
            osd.addr,
            osd.domain,
            osd.state.as_str(),
            opt_size(osd.used),
            opt_size(osd.free),
            osd.fragments.map_or_else(|| "-".into(), |f| f.to_string()),
            osd.data_dir
        );
    }
}

/// `K,M[,C[,X]]` → a policy with the defaults for what is left out.
fn parse_policy(text: &str) -> Result<Policy> {
    let parts: Vec<u8> = text
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<u8>()
                .with_context(|| format!("policy {text:?}: {p:?} is not a number 0-255"))
        })
        .collect::<Result<_>>()?;
    let policy = match parts[..] {
        [k, m] => Policy::new(k, m),
        [k, m, c] => Policy {
            c,
            ..Policy::new(k, m)
        },
        [k, m, c, x] => Policy {
            c,
            x,
            ..Policy::new(k, m)
        },
        _ => bail!("policy {text:?} is not K,M[,C[,X]]"),
    };
    policy
        .validate()
        .map_err(|e| anyhow::anyhow!("policy {text:?}: {e}"))?;
    Ok(policy)
}

pub fn run_preset(args: PresetArgs) -> Result<()> {
    let runtime = runtime()?;
    runtime.block_on(async move {
        let registry = connect(args.registry.as_deref(), &args.etcd).await?;
        match args.verb {
            PresetVerb::Create {
                name,
                k,
                m,
                c,
                x,
                fallbacks,
                fragment_size,
                compression,
                encryption_key_file,
                local_parity,
            } => {
                vstor_backend::validate_name(&name)
                    .map_err(|e| anyhow::anyhow!("preset name: {e}"))?;
                let mut first = Policy::new(k, m);
                if let Some(c) = c {
                    first.c = c;
                }
                if let Some(x) = x {
                    first.x = x;
                }
                let mut policies = vec![first];
                for text in &fallbacks {
                    policies.push(parse_policy(text)?);
                }
                let compression = match compression.as_str() {
                    "none" => Compression::None,
                    "zstd" => Compression::Zstd,
                    "lz4" => Compression::Lz4,
                    other => bail!("--compression {other}: choose zstd, lz4 or none"),
                };
                let encryption_key = match &encryption_key_file {
                    Some(path) => {
                        let bytes = std::fs::read(path).with_context(|| {
                            format!("cannot read the key file {}", path.display())
                        })?;
                        Some(vstor_backend::ec::crypt::parse_key(&bytes).map_err(|e| {
                            anyhow::anyhow!("--encryption-key-file {}: {e}", path.display())
                        })?)
                    }
                    None => None,
                };
                let fragment_size = u32::try_from(parse_size(&fragment_size)?)
                    .context("--fragment-size is too large")?;
                let preset = Preset {
                    name: name.clone(),
                    policies,
                    fragment_size,
                    compression,
                    encryption_key,
                    local_parity,
                };
                preset.validate().map_err(anyhow::Error::msg)?;
                map::create_preset(registry.as_ref(), &preset).await?;
                let shown = PresetRecord::from_preset(&preset).redacted();
                if args.json {
                    print_json(&serde_json::to_value(shown)?);
                } else {
                    println!("created preset {name}");
                    print_preset(&shown);
                }
                Ok(())
            }
            PresetVerb::List => {
                let presets: Vec<PresetRecord> = map::list(registry.as_ref(), PRESETS)
                    .await?
                    .into_iter()
                    .map(|(_, p)| PresetRecord::redacted(&p))
                    .collect();
                if args.json {
                    print_json(&serde_json::to_value(&presets)?);
                } else {
                    println!(
                        "{:<16} {:<28} {:>13} COMPRESSION",
                        "PRESET", "POLICIES (k+m/c/x)", "FRAGMENT"
                    );
                    for p in &presets {
                        println!(
                            "{:<16} {:<28} {:>13} {}",
                            p.name,
                            policies_text(p),
                            format_size(u64::from(p.fragment_size)),
                            p.compression
                        );
                    }
                }
                Ok(())
            }
            PresetVerb::Show { name } => {
                let Some((preset, _)) =
                    map::read::<PresetRecord>(registry.as_ref(), &format!("{PRESETS}{name}"))
                        .await?
                else {
                    bail!("there is no preset {name} (see `vstor preset list`)");
                };
                let preset = preset.redacted();
                if args.json {
                    print_json(&serde_json::to_value(&preset)?);
                } else {
                    print_preset(&preset);
                }
                Ok(())
            }
        }
    })
}

fn policies_text(p: &PresetRecord) -> String {
    p.policies
        .iter()
        .map(|p| format!("{}+{}/{}/{}", p.k, p.m, p.c, p.x))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_preset(p: &PresetRecord) {
    println!("preset {}:", p.name);
    for (i, policy) in p.policies.iter().enumerate() {
        println!(
            "  policy {i}: k={} m={} c={} x={}",
            policy.k, policy.m, policy.c, policy.x
        );
    }
    println!(
        "  fragment size: {}",
        format_size(u64::from(p.fragment_size))
    );
    println!("  compression: {}", p.compression);
    match &p.key_fingerprint {
        Some(fp) => println!("  encrypted: yes (AES-256-CTR, key fingerprint {fp})"),
        None => println!("  encrypted: {}", if p.encrypted { "yes" } else { "no" }),
    }
}

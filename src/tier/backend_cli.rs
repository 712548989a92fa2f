//! `vstor backend inspect NAMESPACE [OBJECT]` and `vstor backend repair [NAMESPACE]`: look at
//! and heal the erasure-coded tier's objects from any host that reaches the registry and the
//! OSDs (L-Store's `lio_inspect`, ALBA's maintenance), with every node down if need be.
//!
//! Repair writes under the namespace's current owner tag, like the owner node's own background
//! repair: it only ever re-creates fragments of the version the owner wrote (same bytes) or
//! moves them, so both may run at once; a repair racing an owner's delete removes what it wrote
//! (`vstor_backend::ec::repair`).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use vstor_backend::ec::inspect::{FragmentStatus, ObjectHealth, ObjectStatus};
use vstor_backend::ec::plan::Action;
use vstor_backend::ec::repair::{RepairOptions, RepairProgress, RepairReport};
use vstor_backend::ec::store::{EcOptions, EcStore, TierMap};
use vstor_backend::ObjectStore;

use super::map::RegistryTierMap;
use crate::client::print_json;
use crate::registry::{self, Registry};
use crate::size::{format_size, parse_size};

#[derive(Args)]
pub struct BackendArgs {
    /// Cluster registry: etcd://HOST:PORT[,HOST:PORT...] or etcd+https://HOST:PORT[,...].
    #[arg(long, env = "VSTOR_REGISTRY", global = true)]
    registry: Option<String>,
    /// TLS and credentials to etcd.
    #[command(flatten)]
    etcd: crate::security_args::EtcdArgs,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Mutual TLS with the OSDs (when they run with --peer-tls-*).
    #[command(flatten)]
    peer_tls: crate::security_args::PeerTlsArgs,
    #[command(subcommand)]
    verb: BackendVerb,
}

#[derive(Subcommand)]
enum BackendVerb {
    /// Each object's fragments: where they are and whether they are healthy, missing,
    /// misplaced or corrupt, and what repair would do.
    Inspect {
        /// The namespace (a volume's name).
        namespace: String,
        /// One object of it [default: every object].
        object: Option<String>,
        /// Check every fragment's CRCs on its OSD (reads the data on the OSDs, sends none).
        #[arg(long)]
        verify: bool,
    },
    /// Rebuild lost fragments, empty draining OSDs and rebalance; returns when every object is
    /// fully redundant again (exit status 1 if some cannot be, with the reason).
    Repair {
        /// One namespace [default: every namespace of the tier].
        namespace: Option<String>,
        /// Also check every fragment's CRCs and rebuild corrupt ones (a scrub).
        #[arg(long)]
        verify: bool,
        /// Only rebuild lost fragments and empty draining OSDs; leave sound fragments where
        /// they are.
        #[arg(long)]
        no_rebalance: bool,
        /// Most bytes per second repair reads plus writes, e.g. 100M [default: unlimited].
        #[arg(long)]
        bandwidth: Option<String>,
    },
}

/// An `ec` store over the tier at `spec`, for tools.
pub fn open_store(
    spec: Option<&str>,
    etcd: &crate::security_args::EtcdArgs,
    tls: Option<vstor_net::PeerTls>,
) -> Result<EcStore> {
    let Some(spec) = spec.filter(|spec| registry::etcd_endpoints(spec).is_some()) else {
        bail!("give the tier's registry: --registry etcd://HOST:PORT (or set VSTOR_REGISTRY)");
    };
    let target = etcd.target(spec)?;
    let map = RegistryTierMap::open(move || async move {
        let registry: Arc<dyn Registry> = Arc::new(target.connect().await?);
        Ok(registry)
    })
    .context("cannot read the EC tier's map from the registry")?;
    Ok(EcStore::new(
        Arc::new(map) as Arc<dyn TierMap>,
        EcOptions {
            default_preset: "default".into(),
            timeout: crate::server::EC_CALL_TIMEOUT,
            client: "vstor-cli".into(),
            tls,
        },
    )?)
}

pub fn run(args: BackendArgs) -> Result<()> {
    let store = open_store(
        args.registry.as_deref(),
        &args.etcd,
        args.peer_tls.clone().load()?,
    )?;
    match args.verb {
        BackendVerb::Inspect {
            namespace,
            object,
            verify,
        } => {
            if !store.namespace_exists(&namespace)? {
                bail!("the tier has no namespace {namespace} (a volume's name)");
            }
            let objects = store
                .inspect(&namespace, object.as_deref(), verify)
                .with_context(|| format!("cannot inspect {namespace}"))?;
            if object.is_some() && objects.is_empty() {
                bail!(
                    "no OSD holds a fragment of {namespace}/{}",
                    object.unwrap_or_default()
                );
            }
            if args.json {
                print_json(&serde_json::to_value(&objects)?);
            } else {
                print_inspection(&namespace, &objects);
            }
            Ok(())
        }
        BackendVerb::Repair {
            namespace,
            verify,
            no_rebalance,
            bandwidth,
        } => {
            let options = RepairOptions {
                bandwidth: bandwidth
                    .as_deref()
                    .map(parse_size)
                    .transpose()
                    .context("--bandwidth")?,
                verify,
                rebalance: !no_rebalance,
            };
            let namespaces = match namespace {
                Some(ns) => {
                    if !store.namespace_exists(&ns)? {
                        bail!("the tier has no namespace {ns} (a volume's name)");
                    }
                    vec![ns]
                }
                None => store.list_namespaces()?,
            };
            let mut all = Vec::new();
            for ns in &namespaces {
                let report = repair_until_done(&store, ns, &options, !args.json)?;
                all.push((ns.clone(), report));
            }
            let done = all.iter().all(|(_, r)| r.fully_redundant());
            if args.json {
                print_json(&serde_json::to_value(
                    all.iter()
                        .map(|(ns, r)| serde_json::json!({ "namespace": ns, "report": r, "fully_redundant": r.fully_redundant() }))
                        .collect::<Vec<_>>(),
                )?);
            } else {
                for (ns, report) in &all {
                    print_report(ns, report);
                }
            }
            if !done {
                bail!("some objects are not fully redundant (see above)");
            }
            Ok(())
        }
    }
}

/// Repair passes until a pass leaves the namespace fully redundant, one makes no progress, or
/// three passes ran (a pass can leave work: a fragment whose OSD failed mid-pass).
pub fn repair_until_done(
    store: &EcStore,
    namespace: &str,
    options: &RepairOptions,
    show: bool,
) -> Result<RepairReport> {
    // A bar on a terminal, a line every 64 objects otherwise (logs, pipes, CI).
    let bar = show
        .then(|| {
            crate::client::progress_bar(
                "repair {prefix}: [{bar:40}] {pos}/{len} objects ({elapsed}) {msg}",
                namespace,
                0,
            )
        })
        .flatten();
    let show_progress = |p: &RepairProgress| {
        if let Some(bar) = &bar {
            bar.set_length(p.objects_total);
            bar.set_position(p.objects_checked);
            bar.set_message(format!(
                "{} rebuilt, {} moved",
                p.fragments_rebuilt, p.fragments_moved
            ));
            return;
        }
        if show && (p.objects_checked.is_multiple_of(64) || p.objects_checked == p.objects_total) {
            eprintln!(
                "repair {}: {}/{} objects, {} fragments rebuilt, {} moved, {} read, {} written",
                p.namespace,
                p.objects_checked,
                p.objects_total,
                p.fragments_rebuilt,
                p.fragments_moved,
                format_size(p.bytes_read),
                format_size(p.bytes_written)
            );
        }
    };
    let mut total = RepairReport::default();
    for pass in 0..3 {
        let report = store
            .repair_namespace(namespace, options, &show_progress)
            .with_context(|| format!("repair of {namespace} failed"))?;
        // Re-encoded objects are puts: let their fragments past `c` land and the old version
        // go before looking again (and before this process exits).
        if !store.wait_background(std::time::Duration::from_secs(120)) {
            eprintln!("repair {namespace}: re-encoded objects still finishing in the background");
        }
        let acted = report.fragments_rebuilt
            + report.fragments_moved
            + report.fragments_deleted
            + report.tombstones_dropped
            + report.objects_reencoded;
        // A pass that re-encoded leaves the old versions to the next one.
        let reencoded = report.objects_reencoded > 0;
        merge(&mut total, report, pass == 0);
        if (total.fully_redundant() && !reencoded) || acted == 0 {
            break;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(total)
}

/// Add a later pass's counts to `total`; its lists replace the earlier ones (what is still
/// wrong after it).
fn merge(total: &mut RepairReport, pass: RepairReport, first: bool) {
    if first {
        total.objects_checked = pass.objects_checked;
    }
    total.objects_repaired += pass.objects_repaired;
    total.fragments_rebuilt += pass.fragments_rebuilt;
    total.fragments_rebuilt_locally += pass.fragments_rebuilt_locally;
    total.fragments_moved += pass.fragments_moved;
    total.fragments_deleted += pass.fragments_deleted;
    total.tombstones_dropped += pass.tombstones_dropped;
    total.tombstones_kept = pass.tombstones_kept;
    total.objects_reencoded += pass.objects_reencoded;
    total.corrupt_found += pass.corrupt_found;
    total.bytes_read += pass.bytes_read;
    total.bytes_written += pass.bytes_written;
    total.cross_domain_bytes += pass.cross_domain_bytes;
    total.unrecoverable = pass.unrecoverable;
    total.unavailable = pass.unavailable;
    total.pending_fragments = pass.pending_fragments;
    total.unplaceable_fragments = pass.unplaceable_fragments;
    total.errors = pass.errors;
}

fn print_report(namespace: &str, r: &RepairReport) {
    println!(
        "{namespace}: {} objects checked, {} repaired; fragments: {} rebuilt ({} from their domain's local parity), {} moved, {} deleted, {} corrupt found; {} read, {} written, {} across domains",
        r.objects_checked,
        r.objects_repaired,
        r.fragments_rebuilt,
        r.fragments_rebuilt_locally,
        r.fragments_moved,
        r.fragments_deleted,
        r.corrupt_found,
        format_size(r.bytes_read),
        format_size(r.bytes_written),
        format_size(r.cross_domain_bytes)
    );
    if r.objects_reencoded > 0 || r.tombstones_dropped > 0 || r.tombstones_kept > 0 {
        println!(
            "{namespace}: {} objects re-encoded under a better policy; {} tombstones dropped, {} deleted objects keep theirs (an OSD is down)",
            r.objects_reencoded, r.tombstones_dropped, r.tombstones_kept
        );
    }
    if r.fully_redundant() {
        println!("{namespace}: every object is fully redundant");
        return;
    }
    for name in &r.unrecoverable {
        println!("{namespace}/{name}: LOST (fewer than k fragments exist)");
    }
    for name in &r.unavailable {
        println!("{namespace}/{name}: unavailable until a down OSD returns");
    }
    if r.pending_fragments > 0 {
        println!(
            "{namespace}: {} fragments wait on down OSDs (rebuilt once they are out: `vstor osd out ID`, or after the grace period)",
            r.pending_fragments
        );
    }
    if r.unplaceable_fragments > 0 {
        println!(
            "{namespace}: {} fragments have no OSD to go to (too few OSDs or domains up)",
            r.unplaceable_fragments
        );
    }
    for e in &r.errors {
        println!("{namespace}: {e}");
    }
}

fn status_text(s: ObjectStatus) -> &'static str {
    match s {
        ObjectStatus::Healthy => "healthy",
        ObjectStatus::Degraded => "degraded",
        ObjectStatus::Unavailable => "unavailable",
        ObjectStatus::Unrecoverable => "LOST",
        ObjectStatus::Deleted => "deleted",
    }
}

fn fragment_text(s: FragmentStatus) -> &'static str {
    match s {
        FragmentStatus::Healthy => "ok",
        FragmentStatus::Misplaced => "misplaced",
        FragmentStatus::Pending => "pending",
        FragmentStatus::Missing => "missing",
        FragmentStatus::Corrupt => "corrupt",
    }
}

fn print_inspection(namespace: &str, objects: &[ObjectHealth]) {
    let healthy = objects
        .iter()
        .filter(|o| o.status == ObjectStatus::Healthy)
        .count();
    for o in objects {
        println!(
            "{namespace}/{}: {} ({}+{}, {}, version {}, {}/{} fragments sound)",
            o.name,
            status_text(o.status),
            o.k,
            o.m,
            format_size(o.size),
            o.version,
            o.healthy_fragments,
            usize::from(o.k) + usize::from(o.m)
        );
        for action in &o.planned {
            if let Action::ReEncode { k, m } = action {
                println!("  written under a fallback policy: repair re-encodes it as {k}+{m}");
            }
        }
        for f in &o.fragments {
            let copies = f
                .copies
                .iter()
                .map(|c| {
                    format!(
                        "osd {} ({}, {})",
                        c.osd.id,
                        c.osd.domain,
                        c.osd.state.as_str()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let desired = f
                .desired
                .as_ref()
                .map_or_else(|| "-".to_string(), |d| d.id.to_string());
            println!(
                "  fragment {:>3}: {:<9} on {}  (placement: osd {desired})",
                f.index,
                fragment_text(f.status),
                if copies.is_empty() {
                    "-".into()
                } else {
                    copies
                }
            );
        }
        if !o.stale.is_empty() {
            println!("  {} stale fragments of older versions", o.stale.len());
        }
    }
    println!(
        "{namespace}: {} objects, {healthy} healthy, {} need repair",
        objects.len(),
        objects.len() - healthy
    );
}

//! Reading a volume's DTL back for replay after a restart or an adoption.
//!
//! The DTL holds a prefix of the volume's write history in order (see [`crate::mirror`]); which
//! of those entries the restarted volume still lacks is the engine's decision. This module only
//! fetches: it registers with the caller's owner tag first — for an adoption that is the takeover
//! that fences the previous owner, so no entry can be added behind the replay's back — and then
//! streams every held SCO, oldest first, each in append order.
//!
//! The network side runs on its own thread with its own runtime and hands batches over a bounded
//! channel, so the caller may be any thread (including one inside another runtime) and memory
//! stays bounded whatever the DTL holds.

use std::sync::mpsc;

use crate::client::{DtlClient, DtlClientConfig};
use crate::error::DtlError;
use crate::protocol::{Entry, ScoRange};
use crate::store::Registration;
use crate::Result;

/// What a fetch found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetched {
    pub range: ScoRange,
    pub entries: u64,
}

enum Batch {
    Range(ScoRange),
    Entries(u32, Vec<Entry>),
}

/// Register `namespace` as `registration` says (cluster size, owner tag, the volume's
/// incarnation) on the DTL at `addr`, tell `begin` which SCOs it holds, and pass every held
/// entry to `apply(sco, entry)` in replay order. An error from `apply` stops the fetch and is
/// returned as [`DtlError::Invalid`].
pub fn fetch(
    addr: &str,
    namespace: &str,
    registration: Registration,
    config: DtlClientConfig,
    begin: impl FnOnce(ScoRange),
    mut apply: impl FnMut(u32, Entry) -> std::result::Result<(), String>,
) -> Result<Fetched> {
    let (tx, rx) = mpsc::sync_channel::<Batch>(4);
    let (addr, namespace_owned) = (addr.to_string(), namespace.to_string());
    let network = std::thread::Builder::new()
        .name(format!("dtl-replay-{namespace}"))
        .spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let ns = namespace_owned.as_str();
                let mut client = DtlClient::connect_with(addr.as_str(), config).await?;
                client
                    .register(
                        ns,
                        registration.cluster_size,
                        registration.owner_tag,
                        registration.incarnation,
                    )
                    .await?;
                let range = client.sco_range(ns).await?;
                if tx.send(Batch::Range(range)).is_err() {
                    return Ok(());
                }
                if let (Some(oldest), Some(newest)) = (range.oldest, range.newest) {
                    client
                        .for_each_batch(ns, oldest, newest, |sco, entries| {
                            tx.send(Batch::Entries(sco, entries))
                                .map_err(|_| DtlError::Invalid("replay aborted".into()))
                        })
                        .await?;
                }
                Ok(())
            })
        })?;
    let mut fetched = Fetched::default();
    let mut failure = None;
    let mut begin = Some(begin);
    for batch in rx.iter() {
        match batch {
            Batch::Range(range) => {
                fetched.range = range;
                if let Some(begin) = begin.take() {
                    begin(range);
                }
            }
            Batch::Entries(sco, entries) => {
                for entry in entries {
                    if let Err(reason) = apply(sco, entry) {
                        failure = Some(reason);
                        break;
                    }
                    fetched.entries += 1;
                }
            }
        }
        if failure.is_some() {
            break;
        }
    }
    drop(rx);
    let network = network
        .join()
        .unwrap_or_else(|_| Err(DtlError::Invalid("DTL replay thread panicked".into())));
    if let Some(reason) = failure {
        return Err(DtlError::Invalid(format!(
            "replay of {namespace}: {reason}"
        )));
    }
    network?;
    Ok(fetched)
}

/// Unregister `namespace` from the DTL at `addr`, deleting its entries (volume deletion).
pub fn unregister(
    addr: &str,
    namespace: &str,
    owner_tag: u64,
    incarnation: u64,
    config: DtlClientConfig,
) -> Result<()> {
    let (addr, namespace) = (addr.to_string(), namespace.to_string());
    std::thread::Builder::new()
        .name("dtl-unregister".into())
        .spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut client = DtlClient::connect_with(addr.as_str(), config).await?;
                match client.unregister(&namespace, owner_tag, incarnation).await {
                    Err(e) if e.remote_code() == Some(crate::ErrorCode::UnknownNamespace) => Ok(()),
                    other => other,
                }
            })
        })?
        .join()
        .unwrap_or_else(|_| Err(DtlError::Invalid("DTL unregister thread panicked".into())))
}

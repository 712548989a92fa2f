//! The remote half of the edge: serving a volume that another node owns.
//!
//! On a hypervisor host, `vstor edge` runs the ordinary frontends (NBD server, vhost-user-blk
//! backend) on a [`client::RemoteTarget`]: a [`crate::BlockTarget`] whose operations are requests
//! over the edge protocol ([`proto`]) to the node that owns the volume. On that node,
//! [`server`] answers them from the local volume. When the owner dies or the volume moves, the
//! client finds the new owner through a [`Resolver`] (the cluster registry) and resubmits what
//! was in flight where that is safe ([`resubmit`]).

pub mod client;
mod outq;
pub mod proto;
pub mod resubmit;
pub mod server;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use futures::stream::BoxStream;
use tokio::sync::Notify;

use crate::target::BlockTarget;

/// Where a volume is served: the owner's edge-protocol address and the owner tag it holds the
/// volume under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Name of the owning node (for `vstor edge list` and metrics).
    pub node: String,
    /// `host:port` of the owner's edge listener (`vstor serve --edge-listen`). Once connected over
    /// [`Endpoint::unix`] it reads `unix:PATH`, so `vstor edge list` shows the transport.
    pub addr: String,
    pub tag: u64,
    /// The owner's unix socket for the edge protocol, when it runs on this host
    /// (`vstor serve --edge-socket`). Tried first; a socket that cannot be reached (another mount
    /// namespace, a stopped owner) falls back to `addr` in the same attempt.
    pub unix: Option<String>,
}

/// Boxed future returned by [`Resolver::resolve`].
pub type ResolveFuture = Pin<Box<dyn Future<Output = Result<Endpoint, String>> + Send + 'static>>;

/// Boxed future returned by [`Resolver::watch`]: a stream of change notices, or `None` when the
/// resolver cannot watch.
pub type WatchFuture =
    Pin<Box<dyn Future<Output = Option<BoxStream<'static, ()>>> + Send + 'static>>;

/// How a client finds a volume's current owner. In `vstor edge` this reads the cluster registry
/// (volume record → owner node → its `edge_addr`); tests use a fixed table. An `Err` is a
/// human-readable reason (no owner alive, registry unreachable, ...): the client keeps retrying
/// until its reconnect bound.
pub trait Resolver: Send + Sync + 'static {
    fn resolve(&self, volume: &str) -> ResolveFuture;

    /// Notices that where `volume` is served may have changed (its record or owner key was
    /// written or expired), from the moment the future resolves. A reconnecting client retries
    /// at each notice instead of waiting out its backoff, so the guest's pause ends when the
    /// registry names the new owner. Notices may be coalesced or spurious (the client resolves
    /// again either way); a stream that ends, or `None` (the default: no watch), leaves the
    /// client polling with backoff, which it also does to cover a notice missed before the
    /// watch started.
    fn watch(&self, _volume: &str) -> WatchFuture {
        Box::pin(async { None })
    }
}

/// A volume as the edge server sees it: the target to run requests on, and the facts a request
/// is checked against.
#[derive(Clone)]
pub struct ServedVolume {
    pub target: Arc<dyn BlockTarget>,
    pub state: Arc<dyn ServedState>,
}

/// Facts about a served volume that can change while connections are open. Read on every
/// request, so they must be cheap (atomics).
pub trait ServedState: Send + Sync + 'static {
    /// The owner tag this node holds the volume under.
    fn tag(&self) -> u64;
    /// Every acknowledged write not on the backend is on the DTL.
    fn dtl_in_sync(&self) -> bool;
    /// `Some(reason)` when this node fenced the volume: requests get `ErrorCode::Fenced`.
    fn fenced(&self) -> Option<String>;
    /// The volume is still served here (not released, moved, deleted or stopped).
    fn alive(&self) -> bool;
    /// Where handing the volume to another node (`vstor volume move`) stands. While the hand-off
    /// is under way (`Releasing`) a write, flush or trim that finds the volume no longer
    /// [`alive`] waits for the outcome instead of being refused at once: if the hand-off fails
    /// the volume is served here again and the request runs; if it succeeds the request is
    /// refused with `ErrorCode::Released`, which tells the edge that nothing it had acknowledged
    /// can be lost. Reads and block status under the volume's tag still run meanwhile (nothing
    /// can change the volume until the hand-off ends).
    /// The default, for holders that never hand volumes over: [`Handoff::None`].
    ///
    /// [`alive`]: ServedState::alive
    fn handoff(&self) -> Handoff {
        Handoff::None
    }
    /// The volume's NBD allow list, which edges enforce on their own NBD clients. Not read per
    /// request: at the handshake and every [`proto::ACCESS_POLL`] per connection, so it may
    /// take a lock.
    fn access(&self) -> proto::AllowList;
}

/// Where a hand-off of a served volume to another node stands ([`ServedState::handoff`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// No hand-off under way (or one that failed: the volume is served again).
    None,
    /// Under way: new writes are refused while what was acknowledged goes to the backend.
    Releasing,
    /// Done: everything this node acknowledged is on the backend, and it serves the volume no
    /// more.
    Released,
}

/// Boxed future returned by [`RemoteExports::opening`].
pub type OpeningFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The volumes a node serves over the edge protocol.
pub trait RemoteExports: Send + Sync + 'static {
    /// The volume named `volume`, or `None` if this node does not serve it.
    fn lookup(&self, volume: &str) -> Option<ServedVolume>;

    /// When this node is opening `volume` (an adoption or a move under way), a future that
    /// resolves once that ended, served or failed; `None` otherwise (the default). Why: the
    /// registry names the new owner before it has opened the volume (the ownership transaction
    /// comes first), so an edge that follows the registry's notice at once would be refused and
    /// back off; instead its handshake waits here for the volume (bounded by
    /// `server::OPENING_WAIT`).
    fn opening(&self, _volume: &str) -> Option<OpeningFuture> {
        None
    }
}

/// Volumes being opened on a node, and a way to wait for one to end: what
/// [`RemoteExports::opening`] answers from.
#[derive(Default)]
pub struct Opening {
    names: Mutex<BTreeSet<String>>,
    ended: Notify,
}

impl Opening {
    fn names(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opening `volume` starts.
    pub fn begin(&self, volume: &str) {
        self.names().insert(volume.to_owned());
    }

    /// Opening `volume` ended (served, or failed); wakes those waiting for it.
    pub fn end(&self, volume: &str) {
        self.names().remove(volume);
        self.ended.notify_waiters();
    }

    pub fn contains(&self, volume: &str) -> bool {
        self.names().contains(volume)
    }

    /// Resolves once `volume` is no longer being opened; `None` if it is not now.
    pub fn until_ended(self: &Arc<Self>, volume: &str) -> Option<OpeningFuture> {
        if !self.contains(volume) {
            return None;
        }
        let this = Arc::clone(self);
        let volume = volume.to_owned();
        Some(Box::pin(async move {
            loop {
                let ended = this.ended.notified();
                tokio::pin!(ended);
                // Registered before the check, so an `end` between the two is not missed.
                ended.as_mut().enable();
                if !this.contains(&volume) {
                    return;
                }
                ended.await;
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_for_an_opening_ends_with_it() {
        let opening = Arc::new(Opening::default());
        assert!(
            opening.until_ended("v").is_none(),
            "nothing is being opened"
        );
        opening.begin("v");
        opening.begin("w");
        let mut wait = opening.until_ended("v").expect("v is being opened");
        assert!(futures::poll!(&mut wait).is_pending());
        // Another volume's end wakes the waiter, which goes on waiting.
        opening.end("w");
        assert!(futures::poll!(&mut wait).is_pending());
        opening.end("v");
        assert!(futures::poll!(&mut wait).is_ready());
        assert!(!opening.contains("v"));
    }
}

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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

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

/// How a client finds a volume's current owner. In `vstor edge` this reads the cluster registry
/// (volume record → owner node → its `edge_addr`); tests use a fixed table. An `Err` is a
/// human-readable reason (no owner alive, registry unreachable, ...): the client keeps retrying
/// until its reconnect bound.
pub trait Resolver: Send + Sync + 'static {
    fn resolve(&self, volume: &str) -> ResolveFuture;
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
    /// The volume's NBD allow list, which edges enforce on their own NBD clients. Not read per
    /// request: at the handshake and every [`proto::ACCESS_POLL`] per connection, so it may
    /// take a lock.
    fn access(&self) -> proto::AllowList;
}

/// The volumes a node serves over the edge protocol.
pub trait RemoteExports: Send + Sync + 'static {
    /// The volume named `volume`, or `None` if this node does not serve it.
    fn lookup(&self, volume: &str) -> Option<ServedVolume>;
}

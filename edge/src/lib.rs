//! vstor frontends. `target` is the contract with the volume engine; `nbd` is the NBD server;
//! `vhost` the vhost-user-blk backend; `remote` the edge protocol that lets them serve a volume
//! another node owns.

pub mod nbd;
pub(crate) mod read_pool;
pub mod remote;
pub mod target;
#[cfg(any(test, feature = "testing"))]
#[allow(clippy::unwrap_used, clippy::expect_used)] // test support for the frontends
pub mod testing;
pub mod vhost;

pub use nbd::{NbdError, NbdServer, NbdServerConfig};
pub use target::{
    BlockTarget, Client, ExportRegistry, Extent, ExtentsFuture, PendingAck, ReadAttempt,
    ReadFuture, TargetError, WriteAck,
};

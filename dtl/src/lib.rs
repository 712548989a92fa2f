//! vstor's Distributed Transaction Log (DTL): the copy of every write that is not yet on the
//! backend, kept on *another* node so that a volume can be restarted elsewhere after its owner
//! node died without losing an acknowledged write (see `DESIGN.md`, "DTL").
//!
//! This crate holds the three pieces that talk about the same bytes and therefore live together:
//!
//! * [`protocol`]: the versioned wire format (one message enum, one codec for both sides);
//! * [`store`]: the server's on-disk storage (per-SCO append-only segment files);
//! * [`server`] / [`client`]: the tokio daemon (`vstor dtl`) and the volume-side client.
//!
//! The DTL knows nothing about the volume engine: it stores opaque `(location, lba, data)`
//! entries keyed by namespace and SCO number. The only engine fact it relies on is the layout of
//! a raw `ClusterLocation` (SCO number in the low 32 bits), used to check that every entry of a
//! batch belongs to the batch's SCO. Modes (sync/async), degraded/catch-up states and replay into
//! a restarted volume are built on top of [`client::DtlClient`]: [`mirror`] is the engine's ordered,
//! bounded link with its state machine, [`replay`] reads a DTL back; *which* entries to replay
//! and when to seal a SCO for catch-up stay the engine's decisions.

pub mod client;
pub mod error;
pub mod mirror;
pub mod protocol;
pub mod replay;
pub mod server;
pub mod store;

pub use client::{DtlClient, DtlClientConfig};
pub use error::DtlError;
pub use mirror::{CatchUpRequest, DtlState, Mirror, MirrorConfig, MirrorStatus, Ticket};
pub use protocol::{DtlCodec, Entry, ErrorCode, Message, ScoRange, PROTOCOL_VERSION};
pub use server::{DtlServer, DtlServerConfig, DEFAULT_FRAME_TIMEOUT};
pub use store::{DtlStore, Registration};

/// Result alias used throughout the crate.
pub type Result<T, E = DtlError> = std::result::Result<T, E>;

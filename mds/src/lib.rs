//! The MDS (metadata server): per-volume tables of the cluster map, persisted so a volume
//! restarts (or fails over) by loading the map and replaying only the TLogs after the table's
//! cork, instead of its whole backend history.
//!
//! * [`table`]: what a table is (map, cork, owner tag, role) and the pure decisions: fencing,
//!   role and cork checks, and the catch-up plan against a backend TLog list;
//! * [`store`]: the tables on disk (redb), crash-safe, one commit per TLog;
//! * [`proto`]: the wire protocol, one codec for client and server;
//! * [`server`] / [`client`]: tokio at the edges, the store on the blocking pool;
//! * [`catchup`]: a slave (or a rebuild) replays backend TLogs after its cork.
//!
//! The MDS never holds a location whose data the backend lacks: the owner sends a TLog's updates
//! only after the TLog is on the backend (uncork), and catch-up reads only backend TLogs.

pub mod catchup;
pub mod client;
pub mod error;
pub mod owner;
pub mod proto;
pub mod server;
pub mod store;
pub mod table;

pub use error::{MdsError, Result};
pub use store::MdsStore;
pub use table::{Cork, Role, TableMeta, Update};

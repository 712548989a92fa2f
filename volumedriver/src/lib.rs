//! The vstor volume engine.
//!
//! A volume keeps its whole LBA → [`ClusterLocation`] map in RAM, appends writes to SCOs in a
//! local write buffer, records every change in TLogs, and uploads sealed SCOs and closed TLogs to
//! an [`ObjectStore`](vstor_backend::ObjectStore) in barrier order. The backend's TLogs are the
//! source of truth: any volume can be rebuilt from them.
//!
//! Layering: [`volume::Volume`] is the state machine. It does file I/O but owns no threads and
//! no timers — waiting, retrying and pacing (throttle delays) are decided by its caller, the
//! [`manager::VolumeManager`] (through the node's [`scheduler`]) and the frontends, which keeps the engine testable step by step.
//! On-disk formats live in [`sco`], [`tlog`] and [`meta`], each documenting its layout and
//! invariants, and each read back by the same code that writes it.

pub mod access;
pub mod config;
pub mod error;
pub mod latency;
pub mod manager;
pub mod map;
pub mod meta;
pub mod read_cache;
pub mod scheduler;
pub mod sco;
pub mod tlog;
pub mod types;
pub mod volume;
pub mod wbfs;

pub use access::VolumeAccess;
pub use config::{DtlMode, VolumeConfig, VolumeOptions};
pub use error::{Result, VolumeError};
pub use manager::{ManagerConfig, MdsHook, MdsHookRef, PendingSeed, Unserved, VolumeManager};
pub use read_cache::{ReadCache, ReadCacheStats};
pub use types::{ClusterLocation, ScoName, ScoNumber, TLogNumber};
pub use volume::{
    MapSeed, ReadAttempt, ReplaySummary, ScrubProgress, ScrubReport, SeedPage, SnapshotInfo,
    SnapshotView, UncorkSink, UploadTask, Volume, VolumeInfo, WriteOutcome,
};
pub use vstor_dtl::{DtlState, Ticket};
pub use wbfs::{PowerCut, SimFs, StdFs, WbFile, WbFs};

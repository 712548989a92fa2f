//! The erasure-coded tier's pure building blocks (issue 12, in progress): the codec, how an
//! object is cut into fragments, the fragment file format, computed placement over the OSD map,
//! and presets. No I/O here; the OSD daemon, its protocol and the `ec` ObjectStore build on these.
//!
//! - [`codec`]: `ErasureCodec` and systematic Reed-Solomon over GF(2^8).
//! - [`compress`]: objects compressed in independent 64 KiB blocks with a block index, so a
//!   ranged read decompresses only the blocks it needs (the store's side: `unpack`).
//! - [`layout`]: chunks and contiguous data pieces, so a small read touches one data fragment.
//! - [`fragment`]: the self-describing fragment file (header, data, per-4 KiB CRC32C table).
//! - [`placement`]: weighted rendezvous hashing per fragment with a per-domain cap.
//! - [`preset`]: ordered `(k, m, c, x)` policies, best first, falling back when OSDs are down.
//! - [`local`]: local parities per domain (LRC-style), so one loss is rebuilt within its domain.
//! - [`plan`]: the pure repair planner (rebuild, move, delete) for one object.
//! - [`store`]: the `ec` ObjectStore (its read path in `read`, its write path in `write`);
//!   [`inspect`] and [`repair`] add inspection, repair, rebalancing and scrub to it.

pub mod codec;
pub mod compress;
pub mod crypt;
pub mod fragment;
pub mod inspect;
pub mod layout;
pub mod local;
pub mod placement;
pub mod plan;
pub mod preset;
mod read;
pub mod repair;
#[cfg(test)]
#[path = "repair_tests.rs"]
mod repair_tests;
pub mod store;
#[cfg(test)]
mod testkit;
mod unpack;
mod write;
#[cfg(test)]
#[path = "write_tests.rs"]
mod write_tests;

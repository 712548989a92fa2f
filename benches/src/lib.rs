//! Benchmarks that put vstor next to its peers on the same machine, in the same run.
//!
//! Numbers from separate runs, days or machines cannot be compared: CPU frequency, page cache
//! state and neighbours on a shared host move them more than most changes we make. Every
//! benchmark here therefore drives vstor and a reference implementation side by side, with the
//! same load generator and the same parameters, and reports the ratio next to the raw figures.
//!
//! - [`nbd`]: vstor's NBD export against `qemu-nbd` serving a raw file, driven by fio's `nbd`
//!   engine (`vstor bench nbd`).
//! - [`vhost`]: vstor's vhost-user-blk export against `qemu-storage-daemon` exporting a raw
//!   file, driven by a load generator built on libblkio (`vstor bench vhost`).

mod common;
pub mod nbd;
pub mod vhost;

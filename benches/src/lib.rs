//! Benchmarks that put vstor next to its peers on the same machine, in the same run.
//!
//! Numbers from separate runs, days or machines cannot be compared: CPU frequency, page cache
//! state and neighbours on a shared host move them more than most changes we make. Every
//! benchmark here therefore drives vstor and a reference implementation side by side, with the
//! same load generator and the same parameters, and reports the ratio next to the raw figures.
//!
//! - [`nbd`]: vstor's NBD export against `qemu-nbd` serving a raw file, driven by fio's `nbd`
//!   engine (`vstor-bench nbd`).
//! - [`vhost`]: vstor's vhost-user-blk export against `qemu-storage-daemon` exporting a raw
//!   file, driven by a load generator built on libblkio (`vstor-bench vhost`).
//! - [`dtl`]: the cost of mirroring writes to a DTL: vstor volumes in DTL modes `none`, `async`
//!   and `sync` (with `vstor dtl` as a separate process) against `qemu-nbd`, driven by fio's
//!   `nbd` engine (`vstor-bench dtl`).
//!
//! - [`edge`]: 4 KiB random I/O through `vstor edge` against the owner's own vhost-user-blk
//!   export, with the edge on the owner's host and in a network namespace (`vstor-bench edge`).
//! - [`cluster`]: failover (detection, adoption, the client's I/O pause) and `volume move` on a
//!   3-node cluster with a real etcd, against the peers' documented defaults
//!   (`vstor-bench cluster`).
//!
//! - [`ec`]: the erasure-coded tier: its codec against ISA-L, upload throughput and evicted
//!   random reads of a node on `--backend ec` against one on the local backend, and repair
//!   after an OSD is lost (`vstor-bench ec`).
//!
//! Two benchmarks measure the engine and its store on their own instead, linked in rather than
//! behind a server:
//!
//! - [`backend`]: upload throughput of a store (`put_file` against `put_from`) and 4 KiB random
//!   reads of evicted data at queue depth 1 and 32 (`vstor-bench backend`).
//! - [`snapshots`]: snapshot and clone creation latency under write load, scrub throughput and
//!   its cost to a writer, and a clone's reads of inherited data against its parent's, straight
//!   through `vstor-volumedriver` over a local backend (`vstor-bench snapshots`).
//! - [`mds`]: a volume's restart from a real `vstor mds` against a full backend replay at two
//!   history lengths, the MDS's disk and memory per GiB, and a slave's catch-up rate
//!   (`vstor-bench mds`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

pub mod backend;
pub mod cluster;
mod common;
pub mod dtl;
pub mod ec;
pub mod edge;
pub mod mds;
pub mod nbd;
pub mod snapshots;
pub mod vhost;

use std::path::PathBuf;

/// Settings of one benchmark run, the same for every benchmark here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// The `vstor` binary to benchmark; a release build gives meaningful numbers.
    pub vstor_bin: PathBuf,
    /// Size of the vstor volume and of the peer's raw file, in bytes; a multiple of 1 MiB.
    pub size: u64,
    /// Measured seconds per row and server, after a 1 s warmup.
    pub runtime_secs: u64,
    /// How many times each row runs on each server; figures are medians over the rounds.
    pub rounds: u32,
    /// Print one JSON document instead of a table.
    pub json: bool,
    /// The store `bench backend` measures: a directory path, `file://PATH`, or (once a store for
    /// it exists) `s3://...`; a local store in the work directory when `None`.
    pub backend: Option<String>,
    /// Run only the rows whose name contains this (`bench nbd`, `bench edge` and `bench vhost`; e.g. `seqwrite`); all when
    /// `None`.
    pub rows: Option<String>,
    /// Directory under which a fresh work directory is made (and removed afterwards);
    /// `/var/tmp` when `None`, to stay off a RAM-backed `/tmp`.
    pub work_dir: Option<PathBuf>,
}

impl Default for BenchOptions {
    /// 1 GiB, 10 s per row, one round. `vstor_bin` is the `vstor` next to the running
    /// executable (as `vstor-bench` and `vstor` share `target/<profile>/`), else
    /// `target/release/vstor`.
    fn default() -> Self {
        Self {
            vstor_bin: common::setup::default_vstor_bin(),
            size: common::setup::GIB,
            runtime_secs: 10,
            rounds: 1,
            json: false,
            backend: None,
            rows: None,
            work_dir: None,
        }
    }
}

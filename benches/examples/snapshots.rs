//! The engine benchmark of snapshots, clones and scrub without the `vstor` front end (it links
//! the volume engine, so no `vstor` binary is needed):
//!
//! ```text
//! cargo run --release -p vstor-benches --example snapshots -- --size 256M --runtime 2
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

mod common;

use std::process::ExitCode;

const USAGE: &str = "usage: snapshots [--size SIZE] [--runtime SECS] [--work-dir DIR] [--json]
  SIZE takes a K, M, G or T suffix (powers of 1024); defaults: 1G, 10 s, /var/tmp
  (--vstor-bin and --rounds are accepted and ignored: the engine is linked in, and each figure is one measurement)";

fn main() -> ExitCode {
    common::run_main(USAGE, vstor_benches::snapshots::run)
}

//! The NBD benchmark without the `vstor` front end:
//!
//! ```text
//! cargo build --release
//! cargo run --release -p vstor-benches --example nbd -- --vstor-bin target/release/vstor --size 256M --runtime 2
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

mod common;

use std::process::ExitCode;

const USAGE: &str = "usage: nbd [--vstor-bin PATH] [--size SIZE] [--runtime SECS] [--rounds N] [--work-dir DIR] [--json]
  SIZE takes a K, M, G or T suffix (powers of 1024); defaults: target/release/vstor, 1G, 10 s, 1 round, /var/tmp";

fn main() -> ExitCode {
    common::run_main(USAGE, vstor_benches::nbd::run)
}

//! The vhost-user-blk benchmark without the `vstor` front end:
//!
//! ```text
//! cargo build --release
//! cargo run --release -p vstor-benches --example vhost -- --vstor-bin target/release/vstor --size 256M --runtime 3
//! cargo run --release -p vstor-benches --example vhost -- --calibrate --size 256M --runtime 3
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)] // test/benchmark code: a panic is a failure report

mod common;

use std::process::ExitCode;

use anyhow::Result;
use vstor_benches::vhost::{run, run_calibration};
use vstor_benches::BenchOptions;

const USAGE: &str = "usage: vhost [--vstor-bin PATH] [--size SIZE] [--runtime SECS] [--rounds N] [--work-dir DIR] [--json] [--calibrate]
  SIZE takes a K, M, G or T suffix (powers of 1024); defaults: target/release/vstor, 1G, 10 s, 1 round, /var/tmp
  --calibrate: a second qemu-storage-daemon takes vstor's place, to show the harness's noise";

fn main() -> ExitCode {
    let result = parse_args().and_then(|parsed| match parsed {
        None => Ok(()),
        Some((options, true)) => run_calibration(&options),
        Some((options, false)) => run(&options),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The options and whether to calibrate; `None` when only the usage was asked for.
fn parse_args() -> Result<Option<(BenchOptions, bool)>> {
    Ok(common::parse(USAGE, &["--calibrate"])?.map(|args| {
        let calibrate = args.switches.iter().any(|s| s == "--calibrate");
        (args.options(), calibrate)
    }))
}

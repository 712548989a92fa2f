//! The vhost-user-blk benchmark without the `vstor` front end:
//!
//! ```text
//! cargo build --release
//! cargo run --release -p vstor-benches --example vhost -- --vstor-bin target/release/vstor --size 256M --runtime 3
//! cargo run --release -p vstor-benches --example vhost -- --calibrate --size 256M --runtime 3
//! ```

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
    let Some(args) = common::parse(USAGE, &["--calibrate"])? else {
        return Ok(None);
    };
    let defaults = BenchOptions::default();
    let calibrate = args.switches.iter().any(|s| s == "--calibrate");
    Ok(Some((
        BenchOptions {
            vstor_bin: args.vstor_bin.unwrap_or(defaults.vstor_bin),
            size: args.size.unwrap_or(defaults.size),
            runtime_secs: args.runtime_secs.unwrap_or(defaults.runtime_secs),
            rounds: args.rounds.unwrap_or(defaults.rounds),
            json: args.json,
            work_dir: args.work_dir.or(defaults.work_dir),
        },
        calibrate,
    )))
}

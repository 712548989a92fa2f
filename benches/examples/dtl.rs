//! The DTL benchmark without the `vstor` front end:
//!
//! ```text
//! cargo build --release
//! cargo run --release -p vstor-benches --example dtl -- --vstor-bin target/release/vstor --size 256M --runtime 2
//! ```

mod common;

use std::process::ExitCode;

use anyhow::Result;
use vstor_benches::dtl::run;
use vstor_benches::BenchOptions;

const USAGE: &str = "usage: dtl [--vstor-bin PATH] [--size SIZE] [--runtime SECS] [--rounds N] [--work-dir DIR] [--json]
  SIZE takes a K, M, G or T suffix (powers of 1024); defaults: target/release/vstor, 1G, 10 s, 1 round, /var/tmp";

fn main() -> ExitCode {
    match parse_args().and_then(|options| options.map_or(Ok(()), |options| run(&options))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `None` when only the usage was asked for.
fn parse_args() -> Result<Option<BenchOptions>> {
    Ok(common::parse(USAGE, &[])?.map(|args| args.options()))
}

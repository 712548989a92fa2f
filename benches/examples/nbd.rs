//! The NBD benchmark without the `vstor` front end:
//!
//! ```text
//! cargo build --release
//! cargo run --release -p vstor-benches --example nbd -- --vstor-bin target/release/vstor --size 256M --runtime 2
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use vstor_benches::nbd::{run, NbdBenchOptions};

const USAGE: &str = "usage: nbd [--vstor-bin PATH] [--size SIZE] [--runtime SECS] [--rounds N] [--work-dir DIR] [--json]
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
fn parse_args() -> Result<Option<NbdBenchOptions>> {
    let mut options = NbdBenchOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--vstor-bin" => options.vstor_bin = PathBuf::from(value()?),
            "--size" => options.size = parse_size(&value()?)?,
            "--runtime" => options.runtime_secs = value()?.parse().context("--runtime")?,
            "--rounds" => options.rounds = value()?.parse().context("--rounds")?,
            "--work-dir" => options.work_dir = Some(PathBuf::from(value()?)),
            "--json" => options.json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(Some(options))
}

fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let shift = match suffix
        .trim_end_matches(['i', 'B'])
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => bail!("bad size {text:?}: use a whole number with an optional K, M, G or T suffix"),
    };
    let number: u64 = digits
        .parse()
        .with_context(|| format!("bad size {text:?}"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| anyhow!("size {text:?} is too large"))
}

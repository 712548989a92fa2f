//! Command-line parsing shared by the benchmark examples (`nbd`, `vhost`, `dtl`, `snapshots`):
//! the flags every benchmark takes, plus any boolean flags of its own.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use vstor_benches::BenchOptions;

/// The flags given; `None` where the benchmark's default applies.
#[derive(Debug, Default)]
pub struct Args {
    pub vstor_bin: Option<PathBuf>,
    pub size: Option<u64>,
    pub runtime_secs: Option<u64>,
    pub rounds: Option<u32>,
    pub work_dir: Option<PathBuf>,
    pub json: bool,
    /// Those of the benchmark's own `switches` that were given.
    pub switches: Vec<String>,
}

impl Args {
    /// The options these flags give, with [`BenchOptions::default`] for those not given.
    pub fn options(&self) -> BenchOptions {
        let defaults = BenchOptions::default();
        BenchOptions {
            vstor_bin: self.vstor_bin.clone().unwrap_or(defaults.vstor_bin),
            size: self.size.unwrap_or(defaults.size),
            runtime_secs: self.runtime_secs.unwrap_or(defaults.runtime_secs),
            rounds: self.rounds.unwrap_or(defaults.rounds),
            json: self.json,
            backend: None,
            rows: None,
            work_dir: self.work_dir.clone().or(defaults.work_dir),
        }
    }
}

/// Parses the process arguments: `--vstor-bin PATH --size SIZE --runtime SECS --rounds N
/// --work-dir DIR --json` and `switches`. `None` when only the usage was asked for (and printed).
pub fn parse(usage: &str, switches: &[&str]) -> Result<Option<Args>> {
    let mut parsed = Args::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow!("{flag} needs a value\n{usage}"))
        };
        match flag.as_str() {
            "--vstor-bin" => parsed.vstor_bin = Some(PathBuf::from(value()?)),
            "--size" => parsed.size = Some(parse_size(&value()?)?),
            "--runtime" => parsed.runtime_secs = Some(value()?.parse().context("--runtime")?),
            "--rounds" => parsed.rounds = Some(value()?.parse().context("--rounds")?),
            "--work-dir" => parsed.work_dir = Some(PathBuf::from(value()?)),
            "--json" => parsed.json = true,
            "-h" | "--help" => {
                println!("{usage}");
                return Ok(None);
            }
            other if switches.contains(&other) => parsed.switches.push(other.to_string()),
            other => bail!("unknown argument {other}\n{usage}"),
        }
    }
    Ok(Some(parsed))
}

/// A whole number of bytes with an optional K, M, G or T suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64> {
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

/// The whole `main` of a benchmark example without switches of its own: parse the common flags,
/// run `bench`, report an error on stderr.
#[allow(dead_code)]
pub fn run_main(usage: &str, bench: fn(&BenchOptions) -> Result<()>) -> ExitCode {
    let outcome =
        parse(usage, &[]).and_then(|args| args.map_or(Ok(()), |args| bench(&args.options())));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

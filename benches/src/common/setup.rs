//! Checks and preparations made before any server starts: the binaries, the options, a work
//! directory with enough room.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;

use super::process::find_program;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: u64 = 1 << 30;
const DEFAULT_WORK_ROOT: &str = "/var/tmp";

/// The `vstor` next to the running executable (`target/<profile>/vstor` beside
/// `target/<profile>/vstor-bench` or its examples' directory's parent), else `target/release/vstor`.
pub(crate) fn default_vstor_bin() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    let candidates = dir
        .into_iter()
        .flat_map(|dir| [dir.join("vstor"), dir.join("../vstor")]);
    candidates
        .into_iter()
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("target/release/vstor"))
}

/// `vstor_bin` as a path that exists, or an error that says how to get one.
pub(crate) fn resolve_vstor_bin(vstor_bin: &Path) -> Result<PathBuf> {
    find_program(vstor_bin).ok_or_else(|| {
        anyhow!(
            "vstor binary {} not found; build it with `cargo build --release` or point vstor_bin at it",
            vstor_bin.display()
        )
    })
}

/// The options every benchmark shares: a size in whole MiB, at least one second, one round.
/// The rows of `all` whose name contains `only` (every row when `None`): `--rows TEXT`. An
/// error naming the rows when none matches.
pub(crate) fn select_rows<'a, T>(
    all: &'a [T],
    name: impl Fn(&T) -> &str,
    only: Option<&str>,
) -> Result<Vec<&'a T>> {
    let rows: Vec<&T> = all
        .iter()
        .filter(|row| only.is_none_or(|only| name(row).contains(only)))
        .collect();
    if rows.is_empty() {
        let names: Vec<&str> = all.iter().map(&name).collect();
        bail!(
            "no row's name contains {:?}; rows are: {}",
            only.unwrap_or_default(),
            names.join(", ")
        );
    }
    Ok(rows)
}

pub(crate) fn validate(size: u64, runtime_secs: u64, rounds: u32) -> Result<()> {
    if size == 0 || !size.is_multiple_of(MIB) {
        bail!("size must be a positive multiple of 1 MiB, not {size}");
    }
    if runtime_secs == 0 {
        bail!("runtime_secs must be at least 1");
    }
    if rounds == 0 {
        bail!("rounds must be at least 1");
    }
    Ok(())
}

/// First line of `<program> --version`, or an error naming the Debian package to install.
/// `bench` names the benchmark that needs it (`"nbd"`, `"vhost"`).
pub(crate) fn tool_version(program: &str, package: &str, bench: &str) -> Result<String> {
    if find_program(Path::new(program)).is_none() {
        bail!("`{program}` not found on PATH; `vstor-bench {bench}` needs it (Debian/Ubuntu: apt-get install {package})");
    }
    let output = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{program} --version`"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// A fresh `vstor-bench-*` directory under `root` (`/var/tmp` when `None`, to stay off a
/// RAM-backed `/tmp`), removed when the returned guard is dropped.
pub(crate) fn work_dir(root: Option<&Path>) -> Result<TempDir> {
    let root = root.unwrap_or(Path::new(DEFAULT_WORK_ROOT));
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    tempfile::Builder::new()
        .prefix("vstor-bench-")
        .tempdir_in(root)
        .with_context(|| format!("cannot create a work directory under {}", root.display()))
}

/// Free space for a benchmark that writes `copies` times the volume size: the peer's raw file
/// and, per vstor volume, its write buffer plus the backend copy, so 3 for one volume against one
/// peer. vstor's log grows further with every write row.
pub(crate) fn require_free_space(dir: &Path, size: u64, copies: u64) -> Result<()> {
    let stats = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("cannot stat {}", dir.display()))?;
    let available = stats.blocks_available() as u64 * stats.fragment_size() as u64;
    let needed = size.saturating_mul(copies);
    if available < needed {
        bail!(
            "{} has {} MiB free; a {} MiB benchmark needs at least {} MiB (choose a smaller size or another work_dir)",
            dir.display(),
            available / MIB,
            size / MIB,
            needed / MIB
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        assert!(validate(256 * MIB, 1, 1).is_ok());
        assert_eq!(
            validate(MIB + 1, 1, 1).unwrap_err().to_string(),
            "size must be a positive multiple of 1 MiB, not 1048577"
        );
        assert!(validate(0, 1, 1).is_err());
        assert!(validate(MIB, 0, 1).is_err());
        assert!(validate(MIB, 1, 0).is_err());
    }
}

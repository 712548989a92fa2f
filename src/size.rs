//! Sizes on the command line and in the config: `10G`, `512M`, `4096`, `1.5T`, `10GiB`.
//!
//! Units are binary, as in qemu-img and rbd: `K`, `M`, `G`, `T` and `KiB`, `MiB`, `GiB`, `TiB`
//! are powers of 1024. `KB`, `MB`, `GB`, `TB` are refused rather than guessed: in parse-size's
//! (and the SI's) reading `10GB` is 10^10 bytes, which users rarely mean for a disk and which
//! is not a multiple of the 4 KiB cluster; the error says what to write instead.

use anyhow::{anyhow, bail, Result};

pub fn parse_size(text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let suffix: String = trimmed
        .trim_start_matches(|c: char| c.is_ascii_digit() || c == '.' || c == ' ')
        .to_ascii_uppercase();
    if suffix.len() == 2 && suffix.ends_with('B') && suffix != "IB" {
        let number = &trimmed[..trimmed.len() - 2];
        let letter = &suffix[..1];
        bail!(
            "size {text:?} is ambiguous: vstor sizes are binary; write {number}{letter} or {number}{letter}iB for powers of 1024, or give the size in bytes"
        );
    }
    parse_size::Config::new()
        .with_binary()
        .parse_size(trimmed)
        .map_err(|e| {
            anyhow!(
                "bad size {text:?}: {e} (use a number with an optional K, M, G or T suffix, powers of 1024)"
            )
        })
}

/// `10737418240` → `10 GiB`; exact multiples print without decimals (the engine's
/// `human_size`, so the CLI and the engine's error messages print sizes alike).
pub fn format_size(bytes: u64) -> String {
    vstor_volumedriver::config::human_size(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        let err = parse_size("ten").unwrap_err().to_string();
        assert!(err.starts_with("bad size \"ten\""), "{err}");
        assert!(parse_size("-1G").is_err());
        let err = parse_size("10GB").unwrap_err().to_string();
        assert!(err.contains("write 10G or 10GiB"), "{err}");
        assert!(parse_size("3mb").is_err());
        assert_eq!(parse_size("512B").unwrap(), 512);
    }

    #[test]
    fn sizes_format_readably() {
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(0), "0 B");
    }
}

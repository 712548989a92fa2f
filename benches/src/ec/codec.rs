//! Phase 1 of `vstor-bench ec`: the tier's erasure code on its own, one thread, in process.
//!
//! The figure that matters is GB/s of *data* shards per core (k × shard bytes per call), the unit
//! the ISA-L anchor in `performance-anchors.md` uses, so a row's ratio to the anchor says how
//! much CPU the tier spends where a C library would spend one unit. Encode is
//! [`ErasureCodec::encode`] into preallocated parity; decode is
//! [`ErasureCodec::reconstruct`] with `data_only` after dropping 1..=m data shards, the read
//! path of a degraded object, including the allocation of the rebuilt shards the API does on
//! every call (the tier pays it too). Each row runs for a fixed time after a short warm-up, on
//! pseudo-random data that stays in cache for small shards and does not for 1 MiB × 8.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use vstor_backend::ec::codec::{codec, CodecId, ErasureCodec};

use crate::common::process::check_interrupted;
use crate::common::rng::Rng;

/// ISA-L 2.30 on this machine type, GB/s of data per core, encode ≈ decode
/// (`performance-anchors.md` §5, "Measured here").
pub(crate) fn isal_anchor(k: usize, m: usize) -> Option<f64> {
    match (k, m) {
        (8, 3) => Some(18.0),
        (4, 2) => Some(24.0),
        (10, 4) => Some(13.9),
        _ => None,
    }
}

/// One codec measurement.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CodecRow {
    pub k: usize,
    pub m: usize,
    pub shard_bytes: usize,
    /// `"encode"` or `"decode"`.
    pub op: String,
    /// Data shards lost and rebuilt (decode only; 0 for encode).
    pub lost: usize,
    pub calls: u64,
    /// GB/s (10^9 bytes) of data shards per second on one thread.
    pub gb_per_s: f64,
    /// ISA-L's figure for the same k+m, when the anchors have one.
    pub anchor_gb_per_s: Option<f64>,
}

/// Every (k, m) × shard size, encode and each decode, `per_row` each.
pub(crate) fn measure(
    codes: &[(usize, usize)],
    shard_sizes: &[usize],
    per_row: Duration,
    progress: &dyn Fn(std::fmt::Arguments),
) -> Result<Vec<CodecRow>> {
    let mut rows = Vec::new();
    for &(k, m) in codes {
        let code = codec(CodecId::REED_SOLOMON_GF8, k, m)
            .with_context(|| format!("cannot build a {k}+{m} Reed-Solomon code"))?;
        for &len in shard_sizes {
            check_interrupted()?;
            let data = random_shards(k, len, (k * 131 + len) as u64);
            let row = encode_row(code.as_ref(), &data, per_row)?;
            progress(format_args!(
                "codec {k}+{m} {} KiB encode: {:.2} GB/s",
                len >> 10,
                row.gb_per_s
            ));
            rows.push(row);
            for lost in 1..=m {
                check_interrupted()?;
                let row = decode_row(code.as_ref(), &data, lost, per_row)?;
                progress(format_args!(
                    "codec {k}+{m} {} KiB decode ({lost} lost): {:.2} GB/s",
                    len >> 10,
                    row.gb_per_s
                ));
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

fn random_shards(k: usize, len: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(seed);
    (0..k)
        .map(|_| {
            let mut shard = vec![0u8; len];
            for word in shard.chunks_mut(8) {
                let bytes = rng.next().to_le_bytes();
                word.copy_from_slice(&bytes[..word.len()]);
            }
            shard
        })
        .collect()
}

/// Calls `step` until `per_row` has passed (after a warm-up of a tenth of it); returns calls
/// and seconds.
fn timed(per_row: Duration, mut step: impl FnMut() -> Result<()>) -> Result<(u64, f64)> {
    let warm = Instant::now();
    while warm.elapsed() < per_row / 10 {
        step()?;
    }
    let started = Instant::now();
    let mut calls = 0u64;
    // Bounded by the clock; checked every call (a 1 MiB × 8 call takes ~1 ms).
    while started.elapsed() < per_row {
        step()?;
        calls += 1;
    }
    Ok((calls, started.elapsed().as_secs_f64()))
}

fn encode_row(code: &dyn ErasureCodec, data: &[Vec<u8>], per_row: Duration) -> Result<CodecRow> {
    let (k, m) = (code.k(), code.m());
    let len = data[0].len();
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let mut parity = vec![vec![0u8; len]; m];
    let (calls, seconds) = timed(per_row, || {
        let mut out: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
        code.encode(&refs, &mut out)
            .with_context(|| format!("{k}+{m} encode of {len}-byte shards"))
    })?;
    Ok(row(k, m, len, "encode", 0, calls, seconds))
}

fn decode_row(
    code: &dyn ErasureCodec,
    data: &[Vec<u8>],
    lost: usize,
    per_row: Duration,
) -> Result<CodecRow> {
    let (k, m) = (code.k(), code.m());
    let len = data[0].len();
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let mut parity = vec![vec![0u8; len]; m];
    let mut out: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
    code.encode(&refs, &mut out)
        .with_context(|| format!("{k}+{m} encode of {len}-byte shards"))?;
    let mut shards: Vec<Option<Vec<u8>>> = data.iter().chain(&parity).cloned().map(Some).collect();
    // Spread the losses over the data shards (first, middle, ...), as OSD failures fall.
    let victims: Vec<usize> = (0..lost).map(|i| i * k / lost).collect();
    let (calls, seconds) = timed(per_row, || {
        for &v in &victims {
            shards[v] = None;
        }
        code.reconstruct(&mut shards, true)
            .with_context(|| format!("{k}+{m} decode of {lost} lost {len}-byte shards"))
    })?;
    // The last call's output must be the data that was dropped, or the figure is meaningless.
    for &v in &victims {
        if shards[v].as_deref() != Some(data[v].as_slice()) {
            anyhow::bail!("{k}+{m} decode of {len}-byte shards rebuilt shard {v} wrongly");
        }
    }
    Ok(row(k, m, len, "decode", lost, calls, seconds))
}

fn row(
    k: usize,
    m: usize,
    len: usize,
    op: &str,
    lost: usize,
    calls: u64,
    seconds: f64,
) -> CodecRow {
    CodecRow {
        k,
        m,
        shard_bytes: len,
        op: op.to_string(),
        lost,
        calls,
        gb_per_s: (calls as f64 * (k * len) as f64) / seconds / 1e9,
        anchor_gb_per_s: isal_anchor(k, m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_measure_and_check_the_decode() {
        let rows = measure(&[(4, 2)], &[4096], Duration::from_millis(20), &|_| {}).unwrap();
        assert_eq!(rows.len(), 3, "encode and two decodes");
        assert_eq!(rows[0].op, "encode");
        assert_eq!((rows[1].lost, rows[2].lost), (1, 2));
        for r in &rows {
            assert!(r.calls > 0 && r.gb_per_s > 0.0, "{r:?}");
            assert_eq!(r.anchor_gb_per_s, Some(24.0));
        }
    }
}

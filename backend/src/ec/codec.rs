//! Erasure codes: k data shards in, m parity shards out, and back from any k survivors.
//!
//! The tier talks to a codec through [`ErasureCodec`] so that another code (an LRC with local
//! parities, a faster Reed-Solomon) can be added without touching placement, fragments or the
//! store. Each codec has a stable numeric id ([`CodecId`]) written into every fragment header:
//! a fragment is always decoded by the code that made it, whatever the node's default is now.
//!
//! [`ReedSolomon`] is a systematic Reed-Solomon code over GF(2^8) from `reed-solomon-erasure`
//! (see `Cargo.toml` for why this crate). Its coefficients are fixed by the crate's matrix
//! construction, so the fragments on disk depend on them: the golden-vector test pins them,
//! and another test checks the SIMD encoder against a scalar one built from the same
//! coefficients, byte for byte.

use reed_solomon_erasure::galois_8;

/// Stable id of a code, stored in fragment headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodecId(pub u16);

impl CodecId {
    /// Systematic Reed-Solomon over GF(2^8), `reed-solomon-erasure` 6 matrix.
    pub const REED_SOLOMON_GF8: CodecId = CodecId(1);
}

/// Why encoding or decoding failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("unsupported code parameters k={k} m={m}: {reason}")]
    Parameters { k: usize, m: usize, reason: String },
    #[error("unknown erasure code id {0}")]
    UnknownCodec(u16),
    #[error("shards do not fit the code: {0}")]
    Shape(String),
    #[error("only {present} of the {needed} shards needed to decode are present")]
    TooFewShards { present: usize, needed: usize },
}

/// A k+m erasure code over equal-length shards.
pub trait ErasureCodec: Send + Sync {
    fn id(&self) -> CodecId;
    /// Data shards.
    fn k(&self) -> usize;
    /// Parity shards.
    fn m(&self) -> usize;
    /// Compute the `m` parity shards of `data` (`k` shards, all of one length) into `parity`
    /// (`m` shards of that length).
    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), CodecError>;
    /// Rebuild the missing (`None`) shards among `shards` (`k + m` slots, data first) from the
    /// present ones; at least `k` must be present. With `data_only`, parity shards stay missing.
    fn reconstruct(
        &self,
        shards: &mut [Option<Vec<u8>>],
        data_only: bool,
    ) -> Result<(), CodecError>;
}

/// The code with `id` and parameters `k`, `m`.
pub fn codec(id: CodecId, k: usize, m: usize) -> Result<Box<dyn ErasureCodec>, CodecError> {
    match id {
        CodecId::REED_SOLOMON_GF8 => Ok(Box::new(ReedSolomon::new(k, m)?)),
        CodecId(other) => Err(CodecError::UnknownCodec(other)),
    }
}

/// Systematic Reed-Solomon over GF(2^8): k + m ≤ 256, m ≥ 1.
pub struct ReedSolomon {
    inner: galois_8::ReedSolomon,
    k: usize,
    m: usize,
}

impl ReedSolomon {
    pub fn new(k: usize, m: usize) -> Result<Self, CodecError> {
        let inner = galois_8::ReedSolomon::new(k, m).map_err(|e| CodecError::Parameters {
            k,
            m,
            reason: format!("{e:?}"),
        })?;
        Ok(Self { inner, k, m })
    }
}

impl ErasureCodec for ReedSolomon {
    fn id(&self) -> CodecId {
        CodecId::REED_SOLOMON_GF8
    }

    fn k(&self) -> usize {
        self.k
    }

    fn m(&self) -> usize {
        self.m
    }

    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), CodecError> {
        if data.len() != self.k || parity.len() != self.m {
            return Err(CodecError::Shape(format!(
                "{} data and {} parity shards for a {}+{} code",
                data.len(),
                parity.len(),
                self.k,
                self.m
            )));
        }
        let len = data.first().map_or(0, |d| d.len());
        if data.iter().any(|d| d.len() != len) || parity.iter().any(|p| p.len() != len) {
            return Err(CodecError::Shape("shards of different lengths".into()));
        }
        if len == 0 {
            return Ok(());
        }
        self.inner
            .encode_sep(data, parity)
            .map_err(|e| CodecError::Shape(format!("{e:?}")))
    }

    fn reconstruct(
        &self,
        shards: &mut [Option<Vec<u8>>],
        data_only: bool,
    ) -> Result<(), CodecError> {
        if shards.len() != self.k + self.m {
            return Err(CodecError::Shape(format!(
                "{} shards for a {}+{} code",
                shards.len(),
                self.k,
                self.m
            )));
        }
        let present = shards.iter().filter(|s| s.is_some()).count();
        if present < self.k {
            return Err(CodecError::TooFewShards {
                present,
                needed: self.k,
            });
        }
        let result = if data_only {
            self.inner.reconstruct_data(shards)
        } else {
            self.inner.reconstruct(shards)
        };
        result.map_err(|e| CodecError::Shape(format!("{e:?}")))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shards(k: usize, len: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut x = seed | 1;
        (0..k)
            .map(|_| {
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            })
            .collect()
    }

    fn encode(code: &dyn ErasureCodec, data: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let len = data[0].len();
        let mut parity = vec![vec![0u8; len]; code.m()];
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let mut out: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
        code.encode(&refs, &mut out).unwrap();
        parity
    }

    /// The parity of a fixed input, as CRC32C per parity shard. These bytes are on disk in
    /// every fragment ever written: if this test fails, the code changed and old fragments
    /// would decode to garbage. Never update the constants; add a new `CodecId` instead.
    #[test]
    fn golden_vectors_pin_the_code() {
        let cases: [(usize, usize, usize, &[u32]); 3] = [
            (2, 1, 64, &[0xe7bc_acc4]),
            (4, 2, 4096, &[0x9e05_0577, 0x2948_c2f6]),
            (8, 3, 4099, &[0xa030_4564, 0x2e73_0075, 0x2c04_0c80]),
        ];
        for (k, m, len, expected) in cases {
            let code = ReedSolomon::new(k, m).unwrap();
            let data = shards(k, len, 0x9e37_79b9_7f4a_7c15);
            let parity = encode(&code, &data);
            let crcs: Vec<u32> = parity.iter().map(|p| crc32c::crc32c(p)).collect();
            assert_eq!(crcs, expected, "{k}+{m} over {len}-byte shards");
        }
    }

    /// The SIMD path against a scalar one: the coefficients are read off the code by encoding
    /// unit vectors, then every parity byte is recomputed with the scalar table multiply.
    /// Odd lengths exercise the SIMD loop's tail.
    #[test]
    fn simd_encoder_matches_the_scalar_reference() {
        for (k, m) in [(2, 1), (4, 2), (8, 3), (10, 4)] {
            let code = ReedSolomon::new(k, m).unwrap();
            let coefficients: Vec<Vec<u8>> = (0..k)
                .map(|i| {
                    let unit: Vec<Vec<u8>> = (0..k).map(|j| vec![u8::from(i == j)]).collect();
                    encode(&code, &unit).into_iter().map(|p| p[0]).collect()
                })
                .collect();
            for len in [1usize, 15, 16, 33, 4096, 4097, 70_001] {
                let data = shards(k, len, (k * 1000 + len) as u64);
                let parity = encode(&code, &data);
                for (j, shard) in parity.iter().enumerate() {
                    for (b, byte) in shard.iter().enumerate() {
                        let scalar = (0..k).fold(0u8, |acc, i| {
                            acc ^ galois_8::mul(coefficients[i][j], data[i][b])
                        });
                        assert_eq!(*byte, scalar, "{k}+{m} len {len} parity {j} byte {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn too_few_shards_is_an_error_not_garbage() {
        let code = ReedSolomon::new(4, 2).unwrap();
        let data = shards(4, 100, 5);
        let parity = encode(&code, &data);
        let mut all: Vec<Option<Vec<u8>>> = data.into_iter().chain(parity).map(Some).collect();
        all[0] = None;
        all[1] = None;
        all[5] = None;
        assert_eq!(
            code.reconstruct(&mut all, false),
            Err(CodecError::TooFewShards {
                present: 3,
                needed: 4
            })
        );
        assert!(ReedSolomon::new(0, 2).is_err());
        assert!(matches!(
            codec(CodecId(99), 4, 2),
            Err(CodecError::UnknownCodec(99))
        ));
    }

    proptest! {
        /// Any ≤ m lost shards come back exactly, whatever k, m and length.
        #[test]
        fn any_m_losses_are_recovered(
            k in 1usize..12,
            m in 1usize..5,
            len in 1usize..3000,
            seed in any::<u64>(),
            lose in proptest::collection::vec(any::<prop::sample::Index>(), 0..5),
        ) {
            let code = ReedSolomon::new(k, m).unwrap();
            let data = shards(k, len, seed);
            let parity = encode(&code, &data);
            let original: Vec<Vec<u8>> = data.into_iter().chain(parity).collect();
            let mut damaged: Vec<Option<Vec<u8>>> = original.iter().cloned().map(Some).collect();
            for index in lose.iter().take(m) {
                damaged[index.index(k + m)] = None;
            }
            code.reconstruct(&mut damaged, false).unwrap();
            let rebuilt: Vec<Vec<u8>> = damaged.into_iter().map(Option::unwrap).collect();
            prop_assert_eq!(rebuilt, original);
        }
    }
}

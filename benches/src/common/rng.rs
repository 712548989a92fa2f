//! A seeded pseudo-random generator for load generators: offsets and payloads that differ
//! between rounds but can be replayed from their seed.

/// wyrand: a small, fast generator with good statistical quality, plenty for picking offsets.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let product = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((product >> 64) as u64) ^ (product as u64)
    }

    /// Uniform in `0..bound` (Lemire's multiply-shift; the bias is below 2^-40 for any device
    /// size in 4 KiB blocks).
    pub(crate) fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_uniform_over_the_blocks() {
        let mut rng = Rng::new(42);
        let mut buckets = [0u32; 16];
        for _ in 0..160_000 {
            let block = rng.below(16);
            buckets[block as usize] += 1;
        }
        // Each of 16 blocks expects 10000; 5 % either way is over 15 standard deviations.
        for (block, &count) in buckets.iter().enumerate() {
            assert!((9_500..=10_500).contains(&count), "block {block}: {count}");
        }
        assert_eq!(Rng::new(7).below(1), 0);
    }

    #[test]
    fn the_same_seed_gives_the_same_offsets() {
        let a: Vec<u64> = {
            let mut rng = Rng::new(1234);
            (0..100).map(|_| rng.below(262_144)).collect()
        };
        let mut rng = Rng::new(1234);
        let b: Vec<u64> = (0..100).map(|_| rng.below(262_144)).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&block| block < 262_144));
        let mut other = Rng::new(1235);
        assert_ne!(
            a[0..10],
            (0..10).map(|_| other.below(262_144)).collect::<Vec<_>>()[..]
        );
    }
}

//! A log-linear latency histogram: exact below 128 ns, then 64 equal buckets per power of two,
//! so every recorded value is known to within 1/64 (1.6 %) of itself, in a fixed 30 KiB array.
//!
//! The same layout as HdrHistogram with two significant binary digits short of it: recording
//! is an index computation and an increment, cheap enough to do for every request on the
//! load generator's hot path, and histograms of several threads merge by adding counts.

/// Sub-buckets per power of two, as a power of two: 2^6 = 64.
const SUB_BITS: u32 = 6;
const SUB_BUCKETS: u64 = 1 << SUB_BITS;
/// Values below this are counted exactly, one bucket each.
const EXACT: u64 = 2 * SUB_BUCKETS;
/// Enough buckets for any u64: the largest index is that of `u64::MAX`.
const BUCKETS: usize = index_of(u64::MAX) + 1;

/// Counts of nanosecond values.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    min: u64,
    max: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("min", &self.min)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// The bucket of `value`: the value itself below [`EXACT`]; above, 64 buckets for each power of
/// two, indexed by the exponent and the six bits after the leading one.
const fn index_of(value: u64) -> usize {
    if value < EXACT {
        return value as usize;
    }
    let exponent = (63 - value.leading_zeros()) - SUB_BITS;
    let mantissa = value >> exponent; // SUB_BUCKETS..2 * SUB_BUCKETS
    (exponent as u64 * SUB_BUCKETS + mantissa) as usize
}

/// The smallest and largest value that fall into bucket `index`.
fn bounds_of(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < EXACT {
        return (index, index);
    }
    let exponent = index / SUB_BUCKETS - 1;
    let mantissa = SUB_BUCKETS + index % SUB_BUCKETS;
    let low = mantissa << exponent;
    (low, low + ((1u64 << exponent) - 1))
}

impl Histogram {
    pub(crate) fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    pub(crate) fn record(&mut self, value: u64) {
        self.counts[index_of(value)] += 1;
        self.total += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Adds the counts of `other` to these.
    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (count, more) in self.counts.iter_mut().zip(other.counts.iter()) {
            *count += more;
        }
        self.total += other.total;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// How many values were recorded.
    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// The value below or at which `percent` % of the recorded values lie (the nearest-rank
    /// percentile), as the middle of its bucket and never outside the smallest and largest value
    /// recorded; `None` when nothing was recorded.
    pub(crate) fn percentile(&self, percent: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((percent.clamp(0.0, 100.0) / 100.0) * self.total as f64).ceil() as u64;
        let rank = rank.clamp(1, self.total);
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, high) = bounds_of(index);
                let middle = low + (high - low) / 2;
                return Some(middle.clamp(self.min, self.max));
            }
        }
        unreachable!("the counts add up to the total")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_exact_below_128_and_64_per_power_of_two_above() {
        assert_eq!(index_of(0), 0);
        assert_eq!(index_of(127), 127);
        assert_eq!(index_of(128), 128);
        assert_eq!(index_of(129), 128);
        assert_eq!(index_of(130), 129);
        assert_eq!(index_of(255), 191);
        assert_eq!(index_of(256), 192);
        assert_eq!(bounds_of(127), (127, 127));
        assert_eq!(bounds_of(128), (128, 129));
        assert_eq!(bounds_of(191), (254, 255));
        assert_eq!(bounds_of(192), (256, 259));
        assert_eq!(BUCKETS, 3776);
        assert_eq!(bounds_of(BUCKETS - 1).1, u64::MAX);
        // Every bucket starts right after the previous one ends.
        for index in 1..BUCKETS {
            assert_eq!(bounds_of(index).0, bounds_of(index - 1).1 + 1, "{index}");
            let (low, high) = bounds_of(index);
            assert_eq!(index_of(low), index);
            assert_eq!(index_of(high), index);
        }
    }

    #[test]
    fn percentiles_of_known_values() {
        let mut histogram = Histogram::new();
        for value in 1..=1000 {
            histogram.record(value);
        }
        assert_eq!(histogram.count(), 1000);
        // Rank 500 is 500, in bucket 500..=503 (exponent 2): its middle is 501.
        assert_eq!(histogram.percentile(50.0), Some(501));
        // Rank 990 is 990, in bucket 984..=991 (exponent 3): its middle is 987.
        assert_eq!(histogram.percentile(99.0), Some(987));
        // Exact range.
        assert_eq!(histogram.percentile(10.0), Some(100));
        // The extremes stay within what was recorded.
        assert_eq!(histogram.percentile(0.0), Some(1));
        assert_eq!(histogram.percentile(100.0), Some(1000));
    }

    #[test]
    fn percentiles_are_within_one_sixty_fourth() {
        let mut histogram = Histogram::new();
        // 99 fast requests at 20 µs and one slow one at 3 ms.
        for _ in 0..99 {
            histogram.record(20_000);
        }
        histogram.record(3_000_000);
        let p50 = histogram.percentile(50.0).unwrap();
        assert!(p50.abs_diff(20_000) <= 20_000 / 64, "{p50}");
        let p99 = histogram.percentile(99.0).unwrap();
        assert!(p99.abs_diff(20_000) <= 20_000 / 64, "{p99}");
        // Above rank 99 only the slow one is left: the middle of its bucket 2981888..=3014655.
        assert_eq!(histogram.percentile(99.5), Some(2_998_271));
        assert_eq!(Histogram::new().percentile(50.0), None);
    }

    #[test]
    fn merged_histograms_count_both() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for value in 0..50 {
            a.record(value);
        }
        for value in 50..100 {
            b.record(value);
        }
        a.merge(&b);
        assert_eq!(a.count(), 100);
        assert_eq!(a.percentile(50.0), Some(49));
        assert_eq!(a.percentile(99.0), Some(98));
        assert_eq!(a.percentile(100.0), Some(99));
        let mut whole = Histogram::new();
        for value in 0..100 {
            whole.record(value);
        }
        assert_eq!(a, whole);
    }
}

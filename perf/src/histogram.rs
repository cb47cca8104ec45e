//! Fixed-bucket latency histogram.
//!
//! Log-linear buckets (HdrHistogram's layout, simplified): values below 64 are exact, above
//! that every power of two is split into 32 equal buckets, so any recorded value is known to
//! within 1/32 (~3.1%) of itself. The table is allocated once; recording is an index
//! computation and an increment, cheap enough for the receive path of a load generator, and
//! per-thread histograms merge by adding counts.

/// Linear sub-buckets per power of two, as a bit count: 2^5 = 32 gives ≤ 3.2% error.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Values 0..64 get one bucket each, then 32 buckets for each of the 58 higher powers of two.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// Counts of `u64` values (the generators record nanoseconds).
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    min: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("min", &self.min())
            .field("max", &self.max)
            .finish()
    }
}

fn bucket_of(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let group = (shift + 1) as usize;
    group * SUB as usize + ((v >> shift) - SUB) as usize
}

/// Smallest and largest value that land in bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < 2 * SUB as usize {
        return (i as u64, i as u64);
    }
    let group = (i / SUB as usize) as u32;
    let sub = (i % SUB as usize) as u64;
    let shift = group - 1;
    let low = (SUB + sub) << shift;
    (low, low + ((1u64 << shift) - 1))
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
        }
    }

    pub fn record(&mut self, v: u64) {
        if let Some(c) = self.counts.get_mut(bucket_of(v)) {
            *c += 1;
        }
        self.total += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += u128::from(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// 0 when empty.
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1): the upper edge of the bucket holding the
    /// ceil(q·n)-th smallest value, capped at the true maximum. Reporting the upper edge
    /// errs on the pessimistic side, by at most one bucket width. 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_range(i).1.min(self.max).max(self.min());
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_whole_range() {
        let mut expected_low = 0u64;
        for i in 0..BUCKETS {
            let (low, high) = bucket_range(i);
            assert_eq!(low, expected_low, "bucket {i} starts where {} ended", i - 1);
            assert!(high >= low);
            assert_eq!(bucket_of(low), i);
            assert_eq!(bucket_of(high), i);
            if i + 1 < BUCKETS {
                expected_low = high + 1;
            } else {
                assert_eq!(high, u64::MAX);
            }
        }
    }

    #[test]
    fn relative_error_is_bounded() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = x >> (x % 60);
            let (low, high) = bucket_range(bucket_of(v));
            assert!(low <= v && v <= high);
            assert!(
                (high - low) as f64 <= v as f64 / 32.0 + 1.0,
                "{v} in [{low}, {high}]"
            );
        }
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in [0, 1, 5, 63] {
            h.record(v);
        }
        assert_eq!(h.quantile(0.0), 0);
        assert_eq!(h.quantile(0.5), 1);
        assert_eq!(h.quantile(0.75), 5);
        assert_eq!(h.quantile(1.0), 63);
        assert_eq!(h.count(), 4);
        assert_eq!(h.min(), 0);
        assert_eq!(h.max(), 63);
    }

    #[test]
    fn quantiles_of_a_uniform_spread() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        let near = |got: u64, want: u64| {
            let err = (got as f64 - want as f64).abs() / want as f64;
            assert!(err <= 1.0 / 32.0, "got {got}, want ~{want}");
            assert!(got >= want, "upper edge is reported: {got} < {want}");
        };
        near(h.quantile(0.5), 50_000_000);
        near(h.quantile(0.99), 99_000_000);
        near(h.quantile(0.999), 99_900_000);
        assert_eq!(h.quantile(1.0), 100_000_000);
        assert!((h.mean() - 50_000_500.0).abs() < 1.0);
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        let mut all = Histogram::new();
        for v in 0..5000u64 {
            let v = v * v;
            if v % 3 == 0 {
                a.record(v);
            } else {
                b.record(v);
            }
            all.record(v);
        }
        a.merge(&b);
        assert_eq!(a.count(), all.count());
        for q in [0.1, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(a.quantile(q), all.quantile(q));
        }
        assert_eq!(a.min(), 0);
        assert_eq!(a.max(), 4999 * 4999);
    }

    #[test]
    fn empty_histogram_reports_zeroes() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.99), 0);
        assert_eq!(h.min(), 0);
        assert_eq!(h.max(), 0);
        assert_eq!(h.mean(), 0.0);
    }
}

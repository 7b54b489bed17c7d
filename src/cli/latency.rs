//! A log-linear latency histogram, in the spirit of HdrHistogram.
//!
//! Values (nanoseconds) below 64 get a bucket each; above, every power of
//! two is cut into 32 equal buckets, so a bucket is at most 1/32 (≈3%) of
//! its values wide. 1,920 buckets cover the whole `u64` range; recording is
//! an index computation and an increment. Kept over the `hdrhistogram` crate
//! because it is faster by measurement (`benches/replaced.rs`; DESIGN.md,
//! "Dependencies").

/// Sub-buckets per power of two, as a power of two.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize) * SUB as usize + 2 * SUB as usize;

#[derive(Clone)]
/// Counts of latencies in log-linear buckets, with the exact minimum and
/// maximum. Merging two histograms adds their counts.
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    min: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
            min: u64::MAX,
        }
    }
}

/// The bucket of `v`.
fn index(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    // v >> shift is in [SUB, 2·SUB).
    (shift as usize) * SUB as usize + (v >> shift) as usize
}

/// The largest value of bucket `i` (what a percentile reports: never less
/// than the true value).
fn upper(i: usize) -> u64 {
    let i = i as u64;
    if i < 2 * SUB {
        return i;
    }
    let shift = i / SUB - 1;
    let mantissa = i - shift * SUB;
    let edge = u128::from(mantissa + 1) << shift;
    u64::try_from(edge - 1).unwrap_or(u64::MAX)
}

impl LatencyHistogram {
    /// Records one latency, in nanoseconds.
    pub fn record(&mut self, nanos: u64) {
        self.counts[index(nanos)] += 1;
        self.total += 1;
        self.max = self.max.max(nanos);
        self.min = self.min.min(nanos);
    }

    /// Adds `other`'s recordings to this histogram's.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
        self.min = self.min.min(other.min);
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest latency recorded, in nanoseconds.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value below which `q` (0..=1) of the records fall, rounded up to
    /// its bucket's upper edge (at most 3% high). 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper(i).min(self.max).max(self.min);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut prev = None;
        for v in (0..5000u64).chain([1 << 20, (1 << 20) + 1, u64::MAX / 3, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS, "{v}");
            assert!(upper(i) >= v, "{v}: upper {}", upper(i));
            if let Some((pv, pi)) = prev {
                if v == pv + 1 {
                    assert!(i == pi || i == pi + 1, "{v}");
                }
            }
            if v >= 2 * SUB {
                assert!((upper(i) - v) as f64 <= v as f64 / SUB as f64, "{v}");
            }
            prev = Some((v, i));
        }
    }

    #[test]
    fn quantiles_are_close_to_exact() {
        let mut h = LatencyHistogram::default();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        for (q, exact) in [(0.5, 500_000.0), (0.99, 990_000.0), (0.999, 999_000.0)] {
            let got = h.quantile(q) as f64;
            assert!(got >= exact && got <= exact * 1.04, "{q}: {got}");
        }
        assert_eq!(h.quantile(1.0), 1_000_000);
        let mut other = LatencyHistogram::default();
        other.record(5);
        h.merge(&other);
        assert_eq!(h.count(), 100_001);
        assert_eq!(h.quantile(0.0), 5);
    }
}

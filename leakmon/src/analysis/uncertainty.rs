//! How sure a sampled figure is: a 90% interval for the unfreed bytes a set of sampled
//! blocks stands for.
//!
//! In: each sampled block's weight (the bytes it stands for, `s / p(s)`, see
//! `leakmon_common::sampling`) and the sampling interval. The estimate is the sum of
//! the weights (Horvitz–Thompson), whose variance is estimated by `Σ w (w − s)`
//! (`(1 − p) w²` per block); a block at least as large as the interval is certain and
//! adds nothing. The uncertain part is read as a Poisson count of `n = E² / V`
//! effective samples (for small blocks, each sample stands for about one interval of
//! bytes, and their number is Poisson), whose exact 90% bounds (Garwood's) scale it:
//! skewed and wide for few samples, as they should be, where a normal interval would
//! dip below zero. The bounds are Byar's approximation of the chi-square quantiles:
//! within 1% of them from five samples up; below, its lower bound is lower than the
//! exact one (a wider interval, never a narrower one).
//!
//! Out: [`Spread`], which adds up over blocks, stacks and processes, and its
//! [`Spread::interval`].

/// The z of a two-sided 90% interval.
const Z90: f64 = 1.644_853_626_951_472_2;

/// What the interval of a sum of sampled blocks is made of; sums of it are the spread
/// of the union.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spread {
    /// Blocks sampled for certain (at least the interval's size): their own bytes.
    pub certain: u64,
    /// Bytes estimated from blocks sampled by chance.
    pub uncertain: u64,
    /// Estimated variance of `uncertain`, in bytes².
    pub variance: u128,
    /// Blocks sampled.
    pub samples: u64,
}

impl std::ops::AddAssign for Spread {
    fn add_assign(&mut self, o: Self) {
        self.certain += o.certain;
        self.uncertain += o.uncertain;
        self.variance += o.variance;
        self.samples += o.samples;
    }
}

impl Spread {
    /// One sampled block of `weight` bytes, sampled at one block per `rate` bytes.
    pub fn block(weight: u64, rate: u64) -> Self {
        let size = size_of(weight, rate);
        let variance = u128::from(weight) * u128::from(weight - size);
        if variance == 0 {
            Self { certain: weight, uncertain: 0, variance: 0, samples: 1 }
        } else {
            Self { certain: 0, uncertain: weight, variance, samples: 1 }
        }
    }

    /// `bytes` estimated from `samples` samples of about equal weight (a runtime's
    /// sampling heap profiler: each sample stands for about one interval of bytes).
    pub fn counted(bytes: u64, samples: u64) -> Self {
        if samples == 0 {
            return Self::default();
        }
        let variance = u128::from(bytes) * u128::from(bytes) / u128::from(samples);
        Self { certain: 0, uncertain: bytes, variance, samples }
    }

    /// The estimate: what the blocks stand for.
    pub fn bytes(&self) -> u64 {
        self.certain + self.uncertain
    }

    /// The 90% interval of the bytes the blocks stand for.
    pub fn interval(&self) -> [u64; 2] {
        if self.variance == 0 || self.uncertain == 0 {
            return [self.bytes(); 2];
        }
        let e = self.uncertain as f64;
        let n = e * e / self.variance as f64;
        let scale = |bound: f64| self.certain + (e * bound / n).round() as u64;
        [scale(poisson_lower(n)), scale(poisson_upper(n))]
    }

    /// The interval's larger half-width, as a share of the estimate (0.4 for ±40%).
    pub fn relative_width(&self) -> f64 {
        let [low, high] = self.interval();
        let bytes = self.bytes() as f64;
        if bytes == 0.0 {
            return 0.0;
        }
        ((high as f64 - bytes).max(bytes - low as f64)) / bytes
    }
}

/// The size of a block that, sampled at one per `rate` bytes, stands for `weight`
/// bytes: the inverse of `s / (1 − exp(−s / rate))`, which only grows with `s` (the
/// kernel keeps the weight alone; its fixed-point weights are within 0.1% of this).
pub fn size_of(weight: u64, rate: u64) -> u64 {
    if rate == 0 || weight >= 16 * rate {
        return weight;
    }
    let (w, r) = (weight as f64, rate as f64);
    let stands_for = |s: f64| if s <= 0.0 { r } else { s / (1.0 - (-s / r).exp()) };
    let (mut low, mut high) = (0.0, w);
    for _ in 0..64 {
        let mid = f64::midpoint(low, high);
        if stands_for(mid) <= w {
            low = mid;
        } else {
            high = mid;
        }
    }
    (low.round() as u64).min(weight)
}

/// The 5% lower bound of a Poisson mean after `n` events (Byar).
pub fn poisson_lower(n: f64) -> f64 {
    if n <= 0.0 {
        return 0.0;
    }
    (n * (1.0 - 1.0 / (9.0 * n) - Z90 / (3.0 * n.sqrt())).powi(3)).max(0.0)
}

/// The 95% upper bound of a Poisson mean after `n` events (Byar).
pub fn poisson_upper(n: f64) -> f64 {
    let m = n + 1.0;
    m * (1.0 - 1.0 / (9.0 * m) + Z90 / (3.0 * m.sqrt())).powi(3)
}

/// A figure of `samples` samples worth saying "rough": below this many, the
/// interval is wider than about ±50%.
pub const FEW_SAMPLES: u64 = 10;

#[cfg(test)]
mod tests {
    use leakmon_common::sampling;

    use super::*;

    #[test]
    fn poisson_bounds_match_the_chi_square_ones() {
        // Garwood's exact 90% bounds, from chi-square quantiles.
        for (n, low, high) in
            [(1.0, 0.0513, 4.744), (5.0, 1.970, 10.51), (20.0, 13.25, 29.06), (100.0, 84.14, 117.6)]
        {
            let (l, h) = (poisson_lower(n), poisson_upper(n));
            assert!((h - high).abs() / high < 0.01, "upper({n}) = {h}");
            if n >= 5.0 {
                assert!((l - low).abs() / low < 0.01, "lower({n}) = {l}");
            } else {
                assert!(l <= low && l > 0.0, "lower({n}) = {l}: never narrower than the exact bound");
            }
        }
    }

    #[test]
    fn the_size_behind_a_weight_is_found_again() {
        let rate = 16 << 10;
        for size in [1, 48, 1000, 4096, 16 << 10, 100_000, 300_000, 1 << 20] {
            let back = size_of(sampling::weight(size, rate), rate);
            assert!(back.abs_diff(size) <= size / 100 + 2, "size {size} came back as {back}");
        }
        assert_eq!(size_of(777, 0), 777, "exact mode");
    }

    #[test]
    fn large_blocks_are_certain_and_small_ones_spread() {
        let rate = 16 << 10;
        let big = Spread::block(sampling::weight(1 << 20, rate), rate);
        assert_eq!(big.interval(), [1 << 20, 1 << 20]);
        let mut small = Spread::default();
        for _ in 0..100 {
            small += Spread::block(sampling::weight(48, rate), rate);
        }
        let [low, high] = small.interval();
        let e = small.bytes() as f64;
        // About ±17% for 100 samples.
        assert!((0.80..0.86).contains(&(low as f64 / e)), "{low} of {e}");
        assert!((1.15..1.20).contains(&(high as f64 / e)), "{high} of {e}");
    }

    /// A deterministic generator for the simulations (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
        }
    }

    /// The kernel's sampler (the same countdown and weights), run over a stream of
    /// blocks of which `kept` stay unfreed: the spread of the sampled, kept ones.
    fn sampled(rng: &mut Rng, rate: u64, blocks: &[(u64, bool)]) -> Spread {
        let mut left = sampling::countdown(rng.next(), rate);
        let mut spread = Spread::default();
        for &(size, kept) in blocks {
            if size < left {
                left -= size;
                continue;
            }
            left = sampling::countdown(rng.next(), rate);
            if kept {
                spread += Spread::block(sampling::weight(size, rate), rate);
            }
        }
        spread
    }

    /// Calibration on the sampler itself: a leak of 1000 × 48 bytes among 20,000 freed
    /// blocks of mixed sizes, at 16 KiB (about three samples), 4 KiB and 512 bytes; and
    /// a leak of mixed sizes up to past the interval. Over 2,000 runs each, the exact
    /// figure falls inside the 90% interval 85–95% of the time.
    #[test]
    fn the_interval_holds_the_exact_figure_nine_times_in_ten() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let churn: Vec<(u64, bool)> = (0..20_000).map(|i| (16 + (i * 37) % 2000, false)).collect();
        let small_leak: Vec<(u64, bool)> = (0..1000).map(|_| (48, true)).collect();
        let mixed_leak: Vec<(u64, bool)> = (0..300).map(|i| ((i * 997) % 40_000 + 1, true)).collect();
        for (leak, rate) in
            [(&small_leak, 16 << 10), (&small_leak, 4 << 10), (&small_leak, 512), (&mixed_leak, 16 << 10)]
        {
            let exact: u64 = leak.iter().map(|(s, _)| s).sum();
            let mut stream: Vec<(u64, bool)> = churn.clone();
            // Interleaved: one leaked block every twenty freed ones.
            for (i, b) in leak.iter().enumerate() {
                stream.insert((i * 20).min(stream.len()), *b);
            }
            let runs = 2000;
            let inside = (0..runs)
                .filter(|_| {
                    let [low, high] = sampled(&mut rng, rate, &stream).interval();
                    (low..=high).contains(&exact)
                })
                .count();
            let coverage = inside as f64 / runs as f64;
            eprintln!("rate {rate}: exact {exact} inside the 90% interval in {coverage:.3} of {runs} runs");
            assert!((0.85..=0.95).contains(&coverage), "rate {rate}, exact {exact}: coverage {coverage}");
        }
    }
}

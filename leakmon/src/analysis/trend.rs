//! Trend statistics on one memory series: robust slope, trend test, verdict.
//!
//! In: samples `(seconds, bytes)` over one window. Out: an [`Analysis`] with the
//! Theil–Sen slope, the Mann–Kendall trend statistic and a [`Verdict`]. Pure functions:
//! no clock, no I/O, so they are unit and property tested.
//!
//! Why these: least squares lets one spike or one garbage-collection cycle swing the
//! slope; Theil–Sen (the median of pairwise slopes) ignores up to ~29 % outliers, and
//! Mann–Kendall asks whether later samples are larger than earlier ones more often than
//! chance, without assuming a shape. A leak must pass both, and still be growing in
//! the second half of the window (a warm-up that levels off is not a leak).

use serde::Serialize;

/// One observation: time in seconds (any origin) and a size in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub t: f64,
    pub v: f64,
}

/// What a window of samples looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Too few samples, or too short a span, to say.
    Insufficient,
    /// No significant change.
    Flat,
    /// Significant, sustained growth through the whole window: a leak is suspected.
    SteadyGrowth,
    /// Grew, then stopped growing: a warm-up or a bounded cache.
    LevelingOff,
    /// Repeated growth and sharp drops (a collector, a cache flushed) with no rising floor.
    Sawtooth,
    /// Significant decrease.
    Shrinking,
    /// Some of the series' allocations could not be counted (a kernel table was full):
    /// its figures are lower bounds, and no verdict is given rather than a guess.
    Withheld,
}

impl Verdict {
    pub const fn suspected(self) -> bool {
        matches!(self, Self::SteadyGrowth)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Insufficient => "insufficient",
            Self::Flat => "flat",
            Self::SteadyGrowth => "steady_growth",
            Self::LevelingOff => "leveling_off",
            Self::Sawtooth => "sawtooth",
            Self::Shrinking => "shrinking",
            Self::Withheld => "withheld",
        }
    }
}

/// Thresholds of the verdict.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Fewest samples for any verdict.
    pub min_samples: usize,
    /// The samples must cover at least this share of the window.
    pub min_coverage: f64,
    /// The window length in seconds.
    pub window: f64,
    /// Mann–Kendall z above which a trend counts (2.33: one-sided p < 0.01).
    pub z_critical: f64,
    /// Growth over the window below this many bytes is noise whatever its trend
    /// (RSS moves in pages; allocators keep slack).
    pub min_growth_bytes: f64,
    /// ... or below this share of the series' median level.
    pub min_growth_ratio: f64,
    /// Second-half slope under this share of the first half's: levelling off.
    pub leveling_ratio: f64,
    /// A drop between two samples larger than this share of the window's range is a
    /// "sharp drop" (sawtooth tooth).
    pub drop_ratio: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            min_samples: 10,
            min_coverage: 0.8,
            window: 30.0,
            z_critical: 2.33,
            min_growth_bytes: 32.0 * 1024.0,
            min_growth_ratio: 0.01,
            leveling_ratio: 0.25,
            drop_ratio: 0.3,
        }
    }
}

/// The statistics of one window and the verdict drawn from them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Analysis {
    pub verdict: Verdict,
    /// Theil–Sen slope, bytes per second.
    pub slope: f64,
    /// Mann–Kendall z (positive: increasing).
    pub z: f64,
    /// Samples used.
    pub samples: usize,
}

/// Median of a non-empty slice (sorted in place).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    }
}

/// At most this many samples enter the O(n²) statistics; longer series are thinned
/// evenly, which keeps their shape.
const MAX_POINTS: usize = 400;

fn thin(samples: &[Sample]) -> Vec<Sample> {
    if samples.len() <= MAX_POINTS {
        return samples.to_vec();
    }
    let step = samples.len() as f64 / MAX_POINTS as f64;
    (0..MAX_POINTS).map(|i| samples[(i as f64 * step) as usize]).collect()
}

/// Theil–Sen slope: the median of the slopes between every pair of samples with
/// distinct times. `None` with fewer than two distinct times.
pub fn theil_sen(samples: &[Sample]) -> Option<f64> {
    let samples = thin(samples);
    let mut slopes = Vec::with_capacity(samples.len() * samples.len().saturating_sub(1) / 2);
    for (i, a) in samples.iter().enumerate() {
        for b in &samples[i + 1..] {
            let dt = b.t - a.t;
            if dt != 0.0 {
                slopes.push((b.v - a.v) / dt);
            }
        }
    }
    (!slopes.is_empty()).then(|| median(&mut slopes))
}

/// Mann–Kendall trend test: the z statistic (normal approximation with the tie
/// correction and continuity correction). Positive for an increasing series; 0 for
/// fewer than three samples.
pub fn mann_kendall(samples: &[Sample]) -> f64 {
    let samples = thin(samples);
    let n = samples.len();
    if n < 3 {
        return 0.0;
    }
    let mut s: i64 = 0;
    for (i, a) in samples.iter().enumerate() {
        for b in &samples[i + 1..] {
            s += match b.v.total_cmp(&a.v) {
                std::cmp::Ordering::Greater => 1,
                std::cmp::Ordering::Less => -1,
                std::cmp::Ordering::Equal => 0,
            };
        }
    }
    let mut values: Vec<f64> = samples.iter().map(|x| x.v).collect();
    values.sort_by(f64::total_cmp);
    let mut ties = 0.0;
    let mut run = 1.0;
    for pair in values.windows(2) {
        if pair[0].total_cmp(&pair[1]).is_eq() {
            run += 1.0;
        } else {
            ties += run * (run - 1.0) * (2.0 * run + 5.0);
            run = 1.0;
        }
    }
    ties += run * (run - 1.0) * (2.0 * run + 5.0);
    let nf = n as f64;
    let var = (nf * (nf - 1.0) * (2.0 * nf + 5.0) - ties) / 18.0;
    if var <= 0.0 {
        return 0.0;
    }
    let s = s as f64;
    if s > 0.0 {
        (s - 1.0) / var.sqrt()
    } else if s < 0.0 {
        (s + 1.0) / var.sqrt()
    } else {
        0.0
    }
}

/// Sharp drops: falls between consecutive samples, once the largest is larger than
/// `ratio` of the range and than `min_bytes` (noise on a flat series has a small range,
/// and drops of its size), every fall of at least half the largest. Not `ratio` of the
/// range for each: on a rising floor the range grows with the leak, and teeth whose
/// drop was sampled a little late would fall under it, leaving too few teeth to judge.
fn sharp_drops(samples: &[Sample], ratio: f64, min_bytes: f64) -> Vec<usize> {
    let (lo, hi) =
        samples.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| (lo.min(s.v), hi.max(s.v)));
    let range = hi - lo;
    let largest = samples.windows(2).map(|w| w[0].v - w[1].v).fold(0.0, f64::max);
    if range <= 0.0 || largest <= (ratio * range).max(min_bytes) {
        return Vec::new();
    }
    samples
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[0].v - w[1].v >= (0.5 * largest).max(min_bytes))
        .map(|(i, _)| i + 1)
        .collect()
}

/// A series with sharp drops in it: a leak only when the floor the drops return to
/// rises. Each tooth's floor is its lowest sample, which a sample taken a little after
/// the drop overstates by up to one sampling step of the fill: so floors must rise by
/// more than twice that step (and more than `threshold`), over at least three teeth.
/// One or two drops cannot show a floor's trend: such a window reads as a sawtooth,
/// and a window several periods long is what tells a rising floor.
fn sawtooth_verdict(samples: &[Sample], drops: &[usize], threshold: f64) -> Verdict {
    if drops.len() < 3 {
        return Verdict::Sawtooth;
    }
    let floors: Vec<Sample> = drops
        .iter()
        .enumerate()
        .map(|(k, &start)| {
            let end = drops.get(k + 1).copied().unwrap_or(samples.len());
            samples[start..end]
                .iter()
                .copied()
                .min_by(|a, b| a.v.total_cmp(&b.v))
                .expect("a tooth has a sample")
        })
        .collect();
    let floor_slope = theil_sen(&floors).unwrap_or(0.0);
    let floor_growth = floor_slope * (floors[floors.len() - 1].t - floors[0].t);
    let mut rises: Vec<f64> = samples.windows(2).map(|w| w[1].v - w[0].v).filter(|d| *d > 0.0).collect();
    let step = if rises.is_empty() { 0.0 } else { median(&mut rises) };
    if floor_slope > 0.0 && floor_growth > threshold.max(2.0 * step) {
        Verdict::SteadyGrowth
    } else {
        Verdict::Sawtooth
    }
}

/// Analyses one window of samples, oldest first.
pub fn analyse(samples: &[Sample], p: &Params) -> Analysis {
    let insufficient = |n| Analysis { verdict: Verdict::Insufficient, slope: 0.0, z: 0.0, samples: n };
    let n = samples.len();
    if n < p.min_samples {
        return insufficient(n);
    }
    let span = samples[n - 1].t - samples[0].t;
    if span < p.min_coverage * p.window {
        return insufficient(n);
    }
    let Some(slope) = theil_sen(samples) else { return insufficient(n) };
    let z = mann_kendall(samples);
    let level = median(&mut samples.iter().map(|s| s.v).collect::<Vec<_>>());
    let threshold = p.min_growth_bytes.max(p.min_growth_ratio * level);
    let growth = slope * span;
    let done = |verdict| Analysis { verdict, slope, z, samples: n };

    // A drop counts from a quarter of the growth that would matter: a tooth that small
    // with a period of a quarter window or more cannot show that growth inside the
    // window, and shorter periods leave no trend across their teeth.
    let drops = sharp_drops(samples, p.drop_ratio, threshold / 4.0);
    if !drops.is_empty() {
        return done(sawtooth_verdict(samples, &drops, threshold));
    }
    if z <= -p.z_critical && -growth > threshold {
        return done(Verdict::Shrinking);
    }
    if z < p.z_critical || growth <= threshold {
        return done(Verdict::Flat);
    }
    // Significant growth: still growing in the second half, or levelling off?
    let mid = samples[0].t + span / 2.0;
    let first: Vec<Sample> = samples.iter().copied().filter(|s| s.t <= mid).collect();
    let second: Vec<Sample> = samples.iter().copied().filter(|s| s.t >= mid).collect();
    let s1 = theil_sen(&first).unwrap_or(slope);
    let s2 = theil_sen(&second).unwrap_or(slope);
    let second_growth = s2 * (span / 2.0);
    if s2 < p.leveling_ratio * s1.max(slope) || second_growth <= threshold / 4.0 {
        return done(Verdict::LevelingOff);
    }
    done(Verdict::SteadyGrowth)
}

/// Seconds until `current` bytes reach `limit` at `slope` bytes per second; `None`
/// when not growing or already past the limit.
pub fn time_to_exhaustion(current: f64, limit: f64, slope: f64) -> Option<f64> {
    (slope > 0.0 && limit > current).then(|| (limit - current) / slope)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const KIB: f64 = 1024.0;

    /// A window of 0.5 s samples over 30 s from a shape function.
    fn series(shape: impl Fn(f64) -> f64) -> Vec<Sample> {
        (0..=60).map(|i| f64::from(i) * 0.5).map(|t| Sample { t, v: shape(t) }).collect()
    }

    /// 0.5 s samples over 30 s, each taken up to 0.25 s late (a loaded host).
    fn jittered(seed: u32, shape: impl Fn(f64) -> f64) -> Vec<Sample> {
        (0..=60)
            .map(|i| f64::from(i) * 0.5 + 0.125 * (1.0 + noise(f64::from(i) + f64::from(seed) * 7.3)))
            .map(|t| Sample { t, v: shape(t) })
            .collect()
    }

    /// Deterministic noise in [-1, 1].
    fn noise(t: f64) -> f64 {
        ((t * 12.9898).sin() * 43_758.545).fract()
    }

    fn verdict(samples: &[Sample]) -> Verdict {
        analyse(samples, &Params::default()).verdict
    }

    #[test]
    fn theil_sen_on_a_line_is_its_slope_and_ignores_a_spike() {
        let mut s = series(|t| 1000.0 + 4096.0 * t);
        assert!((theil_sen(&s).expect("slope") - 4096.0).abs() < 1e-9);
        s[30].v += 50.0 * 1024.0 * 1024.0;
        assert!((theil_sen(&s).expect("slope") - 4096.0).abs() < 1e-6, "one spike does not move it");
        assert_eq!(theil_sen(&[Sample { t: 1.0, v: 1.0 }]), None);
        assert_eq!(theil_sen(&[Sample { t: 1.0, v: 1.0 }, Sample { t: 1.0, v: 5.0 }]), None);
    }

    #[test]
    fn mann_kendall_signs_and_ties() {
        assert!(mann_kendall(&series(|t| t)) > 7.0);
        assert!(mann_kendall(&series(|t| -t)) < -7.0);
        assert!(mann_kendall(&series(|_| 5.0)).abs() < f64::EPSILON, "all ties");
        // Known value: n=5 strictly increasing: S=10, var=5*4*15/18=16.67, z=(10-1)/4.08.
        let five: Vec<Sample> = (0..5).map(|i| Sample { t: f64::from(i), v: f64::from(i) }).collect();
        assert!((mann_kendall(&five) - 9.0 / (50.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn a_steady_native_leak_of_4_kib_per_second_is_suspected() {
        let s = series(|t| 2.0 * KIB * KIB + 4.0 * KIB * t + 8.0 * KIB * noise(t));
        let a = analyse(&s, &Params::default());
        assert_eq!(a.verdict, Verdict::SteadyGrowth, "{a:?}");
        assert!((a.slope - 4096.0).abs() < 800.0, "{a:?}");
    }

    #[test]
    fn non_leaking_shapes_are_not_suspected() {
        let mib = KIB * KIB;
        // Flat but high.
        assert_eq!(verdict(&series(|t| 2048.0 * mib + 64.0 * KIB * noise(t))), Verdict::Flat);
        // Warm-up: fast growth that plateaus a third of the way in.
        assert_eq!(verdict(&series(|t| 50.0 * mib + 4.0 * mib * t.min(10.0))), Verdict::LevelingOff);
        // Bounded cache: grows towards a cap exponentially.
        assert_eq!(
            verdict(&series(|t| 10.0 * mib + 40.0 * mib * (1.0 - (-t / 4.0).exp()))),
            Verdict::LevelingOff
        );
        // Sawtooth: fills for 5 s, then is flushed, with no rising floor.
        assert_eq!(verdict(&series(|t| 10.0 * mib + 1.0 * mib * (t % 5.0))), Verdict::Sawtooth);
        // Shrinking.
        assert_eq!(verdict(&series(|t| 100.0 * mib - 1.0 * mib * t)), Verdict::Shrinking);
        // A leak that stopped before this window: flat.
        assert_eq!(verdict(&series(|t| 30.0 * mib + 16.0 * KIB * noise(t))), Verdict::Flat);
    }

    #[test]
    fn a_sawtooth_with_a_rising_floor_is_a_leak() {
        let mib = KIB * KIB;
        let s = series(|t| 10.0 * mib + 200.0 * KIB * t + 1.0 * mib * (t % 5.0));
        assert_eq!(verdict(&s), Verdict::SteadyGrowth);
    }

    #[test]
    fn too_little_data_is_insufficient() {
        let s = series(|t| t * 1e6);
        assert_eq!(verdict(&s[..5]), Verdict::Insufficient);
        assert_eq!(verdict(&s[..30]), Verdict::Insufficient, "covers half the window");
    }

    #[test]
    fn time_to_exhaustion_cases() {
        assert_eq!(time_to_exhaustion(100.0, 1100.0, 10.0), Some(100.0));
        assert_eq!(time_to_exhaustion(100.0, 1100.0, 0.0), None);
        assert_eq!(time_to_exhaustion(2000.0, 1100.0, 10.0), None);
    }

    proptest! {
        #[test]
        fn theil_sen_recovers_any_line(a in -1e9f64..1e9, b in -1e6f64..1e6) {
            let s = series(|t| a + b * t);
            let slope = theil_sen(&s).expect("slope");
            prop_assert!((slope - b).abs() <= 1e-6 * (1.0 + b.abs() + a.abs()));
        }

        #[test]
        fn slope_and_z_are_shift_invariant(shift in -1e9f64..1e9, seed in 0u32..1000) {
            let base = series(|t| 1e6 + 1e3 * noise(t + f64::from(seed)));
            let moved: Vec<Sample> = base.iter().map(|s| Sample { t: s.t + 100.0, v: s.v + shift }).collect();
            prop_assert!((theil_sen(&base).expect("a") - theil_sen(&moved).expect("b")).abs() < 1e-3);
            prop_assert!((mann_kendall(&base) - mann_kendall(&moved)).abs() < 1e-9);
        }

        #[test]
        fn reversing_time_negates_z(seed in 0u32..1000) {
            let s = series(|t| 1e6 + 1e5 * noise(t + f64::from(seed)) + 1e3 * t);
            let reversed: Vec<Sample> = s.iter().rev().enumerate().map(|(i, x)| Sample { t: i as f64, v: x.v }).collect();
            prop_assert!((mann_kendall(&s) + mann_kendall(&reversed)).abs() < 1e-9);
        }

        /// Regression: a process filling 1 MiB/s for 8 s, then freeing it all, was
        /// flagged beside other workloads (sample times stretched, each tooth's floor
        /// sampled at another phase of its fill). Any period from 2 s to the window,
        /// any phase, jittered sample times: never a leak.
        #[test]
        fn a_sawtooth_with_a_flat_floor_is_never_a_leak(
            period in 2.0f64..30.0,
            phase in 0.0f64..1.0,
            rate in (64.0 * KIB)..(4.0 * KIB * KIB),
            base in (KIB * KIB)..(1024.0 * KIB * KIB),
            seed in 0u32..10_000,
        ) {
            let s = jittered(seed, |t| base + rate * ((t + phase * period) % period) + 4.0 * KIB * noise(t));
            let v = verdict(&s);
            prop_assert!(!v.suspected(), "{v:?}");
        }

        /// ... while the same shape on a rising floor is one.
        #[test]
        fn a_sawtooth_on_a_rising_floor_is_a_leak(
            period in 2.0f64..7.0,
            phase in 0.0f64..1.0,
            rate in (256.0 * KIB)..(2.0 * KIB * KIB),
            leak_share in 0.3f64..1.0,
            base in (KIB * KIB)..(16.0 * KIB * KIB),
            seed in 0u32..10_000,
        ) {
            let leak = leak_share * rate;
            let s = jittered(seed, |t| base + leak * t + rate * ((t + phase * period) % period));
            prop_assert_eq!(verdict(&s), Verdict::SteadyGrowth);
        }

        #[test]
        fn noise_without_trend_is_never_a_leak(level in 1e6f64..1e10, amp in 0.0f64..0.005, seed in 0u32..10_000) {
            let s = series(|t| level * (1.0 + amp * noise(t + f64::from(seed))));
            prop_assert!(!verdict(&s).suspected());
        }
    }
}

//! V8's sampling interval when none is given: as the agent's (see
//! [`crate::agent::pace`]), the one at which the process's allocation rate gives
//! about [`TARGET_PER_SECOND`] samples, the number a budget of
//! [`crate::agent::pace::BUDGET`] of one core affords at [`SAMPLE_COST`] each. V8's
//! interval is set when sampling starts, so the rate is measured once, before: every
//! allocation sampled for [`MEASURED`] (the ones collected since too), counted.
//!
//! Bounded below by a sixteenth of the start (a Node.js whose V8 predates counting
//! collected samples counts only the live ones, and would otherwise be sampled far
//! too often) and [`MIN_INTERVAL`].

use std::time::Duration;

/// What a sample costs a Node.js: V8's default of 32 KiB took a fifth of an
/// allocation-bound process's speed (`cargo xtask bench --node-only`), about this much
/// a sample.
pub const SAMPLE_COST: Duration = Duration::from_micros(6);
/// Samples a second the budget affords.
pub const TARGET_PER_SECOND: f64 = crate::agent::pace::BUDGET / (SAMPLE_COST.as_nanos() as f64 * 1e-9);
/// The smallest interval paced.
pub const MIN_INTERVAL: u64 = 16 << 10;
/// The largest.
pub const MAX_INTERVAL: u64 = leakmon_common::sampling::MAX_RATE;
/// How long the allocation rate is measured for.
pub const MEASURED: Duration = Duration::from_secs(1);

/// The interval for a process that allocated `samples` samples at `start` over
/// `elapsed`: a power of two.
pub fn interval(start: u64, samples: u64, elapsed: Duration) -> u64 {
    let per_second = (samples as f64).max(0.5) / elapsed.as_secs_f64().max(1e-3);
    let ideal = start as f64 * per_second / TARGET_PER_SECOND;
    let floor = MIN_INTERVAL.max(start / 16);
    let ideal = (ideal as u64).clamp(floor, MAX_INTERVAL);
    // The power of two at or above: within the budget.
    ideal.next_power_of_two().min(MAX_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_interval_gives_about_the_target() {
        for bytes_per_second in [64u64 << 20, 1 << 30] {
            let start = 512 << 10;
            let chosen = interval(start, bytes_per_second / start, SECOND);
            let per_second = bytes_per_second as f64 / chosen as f64;
            assert!(
                (TARGET_PER_SECOND / 2.0..=TARGET_PER_SECOND).contains(&per_second),
                "{bytes_per_second} B/s: {chosen} B, {per_second:.0} samples/s"
            );
        }
    }

    #[test]
    fn a_quiet_process_gets_the_floor_never_less() {
        assert_eq!(interval(512 << 10, 0, SECOND), 32 << 10, "a sixteenth of the start");
        assert_eq!(interval(64 << 10, 0, SECOND), MIN_INTERVAL);
    }
}

//! Pacing the agent's samples when no interval was given: a slow leak beside a busy
//! allocator needs a small interval to be sampled at all within a window, a process
//! allocating a gigabyte a second a large one to keep its speed. The interval follows
//! the process's measured allocation rate so that samples arrive at the rate a CPU
//! budget of [`BUDGET`] of one core affords at what a sample costs in that process.
//!
//! Measured how: the agent counts its samples (`leakmon_agent_samples`); each sample
//! stands for about one interval of allocated bytes, so samples over a second, times
//! the interval, is the allocation rate. It also counts the time-stamp-counter cycles
//! spent in its markers (`leakmon_agent_sample_cycles`: the traps, in which the kernel
//! walks the stack, of each sample and of its free), which over the counter's rate
//! (read here beside a clock) is what samples cost: a few microseconds with frame
//! pointers, tens where the kernel walks a deep stack through unwind tables. Until a
//! turn has seen enough samples, [`SAMPLE_COST`] stands in. Set how: by writing the agent's interval
//! (`rate`) in the process, which its hooks read at each sample. Each block carries the
//! interval it was sampled at (its weight, and `LiveAlloc::rate`), so figures stay
//! unbiased across changes; only their spread changes.
//!
//! Steps are powers of two, taken when the ideal is at least one away: a steady
//! process keeps one interval. Up at once (cost first), down by at most [`MAX_STEP_DOWN`]
//! a turn (a process idle for a second may be busy the next). Bounded below by
//! [`MIN_RATE`], and by the process's anonymous memory over [`MAX_LIVE_SAMPLES`]: the
//! blocks a process holds, sampled, must fit the kernel's live table beside others'.

use std::{path::Path, time::Duration, time::Instant};

use anyhow::{Context as _, Result};

use super::{inject::mapped_at, inline::AgentSymbols};
use crate::{procfs::ProcRoot, ptrace::remote::Remote};

/// The CPU the samples of one process may take: half a percent of one core.
pub const BUDGET: f64 = 0.005;
/// What one sample is taken to cost until measured: the trap at its marker, which walks
/// the stack, and the trap at its free's (`cargo xtask bench --pairs-only` measures a
/// pair of traps per allocation).
pub const SAMPLE_COST: Duration = Duration::from_nanos(2500);
/// Samples a second the budget affords at [`SAMPLE_COST`].
pub const TARGET_PER_SECOND: f64 = BUDGET / (SAMPLE_COST.as_nanos() as f64 * 1e-9);
/// Fewest samples in a turn whose cost is taken as measured.
const COST_SAMPLES: u64 = 20;
/// The smallest interval: below it, most blocks are sampled and the agent's set fills.
pub const MIN_RATE: u64 = 4 << 10;
/// The largest: the agent's own bound.
pub const MAX_RATE: u64 = leakmon_common::sampling::MAX_RATE;
/// The most blocks a process's live memory should hold sampled.
pub const MAX_LIVE_SAMPLES: u64 = 16 << 10;
/// How far one turn may lower the interval.
pub const MAX_STEP_DOWN: u64 = 8;
/// How often the pace is measured.
pub const TURN: Duration = Duration::from_secs(1);

/// The controller: from the samples of the last turn, the next interval.
#[derive(Clone, Debug)]
pub struct Pace {
    rate: u64,
    /// Seconds a sample costs, as last measured.
    cost: f64,
}

impl Pace {
    pub fn new(rate: u64) -> Self {
        Self { rate: rate.clamp(MIN_RATE, MAX_RATE), cost: SAMPLE_COST.as_secs_f64() }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Samples a second the budget affords at the cost measured.
    pub fn target(&self) -> f64 {
        BUDGET / self.cost
    }

    /// `samples` were taken over `elapsed` at the current interval, costing `spent`
    /// (their traps and their frees'), in a process with `anonymous` bytes resident:
    /// the interval to change to, if it should change.
    pub fn next(&mut self, samples: u64, spent: Duration, elapsed: Duration, anonymous: u64) -> Option<u64> {
        let seconds = elapsed.as_secs_f64();
        if seconds <= 0.0 {
            return None;
        }
        if samples >= COST_SAMPLES {
            // Bounded: a thread descheduled inside a trap must not swing the pace by
            // orders of magnitude.
            self.cost = (spent.as_secs_f64() / samples as f64).clamp(2e-7, 1e-3);
        }
        // Half a sample for none: an idle turn lowers the interval by the most a step
        // may, not to nothing.
        let per_second = (samples as f64).max(0.5) / seconds;
        let ideal = self.rate as f64 * per_second / self.target();
        let floor = MIN_RATE.max(anonymous / MAX_LIVE_SAMPLES).max(self.rate / MAX_STEP_DOWN);
        let ideal = (ideal.max(1.0) as u64).clamp(floor, MAX_RATE);
        // Whole powers of two, and only a step of at least one: no dithering between two.
        let step = (ideal as f64 / self.rate as f64).log2();
        if step.abs() < 1.0 {
            return None;
        }
        let next = if step > 0.0 {
            self.rate << (step.floor() as u32).min(30)
        } else {
            self.rate >> (-step).floor().min(30.0) as u32
        };
        let next = next.clamp(floor.min(MAX_RATE), MAX_RATE);
        (next != self.rate).then(|| {
            self.rate = next;
            next
        })
    }
}

/// The agent in one process, paced from outside: through its memory, never a call.
pub struct Paced {
    proc_root: ProcRoot,
    /// Its memory, opened once (reads and writes only: nothing is called).
    remote: Remote,
    rate_at: u64,
    samples_at: u64,
    cycles_at: u64,
    pace: Pace,
    /// At the last turn: the agent's samples and cycles, this side's time-stamp
    /// counter, and the time.
    last: Turn,
}

#[derive(Clone, Copy)]
struct Turn {
    samples: u64,
    cycles: u64,
    tsc: u64,
    at: Instant,
}

/// The time-stamp counter, the agent's clock for what samples cost (invariant, and
/// the same on every CPU of a machine that has one).
fn tsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl Paced {
    /// The agent `agent` (or its freestanding twin) mapped in `pid` and sampling.
    /// The memory is opened once, and before the mappings are read: the mappings are
    /// then those of the image the descriptor holds (a pid used again after they were
    /// read would otherwise have its memory written at another image's addresses), and
    /// a process that execs or ends leaves the descriptor behind, never written again.
    pub fn open(proc_root: &ProcRoot, pid: u32, agent: &Path) -> Result<Self> {
        let remote = Remote { pid, mem: crate::ptrace::remote::open_mem(proc_root, pid)? };
        let maps = proc_root.maps(pid).with_context(|| format!("read the mappings of pid {pid}"))?;
        let twin = super::freestanding(agent);
        let (file, base) = match mapped_at(&maps, agent, pid) {
            Ok(base) => (agent, base),
            Err(_) => (twin.as_path(), mapped_at(&maps, &twin, pid)?),
        };
        let symbols = AgentSymbols::new(file, base)?;
        let mut paced = Self {
            proc_root: proc_root.clone(),
            remote,
            rate_at: symbols.get("rate")?,
            samples_at: symbols.get("leakmon_agent_samples")?,
            cycles_at: symbols.get("leakmon_agent_sample_cycles")?,
            pace: Pace::new(MIN_RATE),
            last: Turn { samples: 0, cycles: 0, tsc: 0, at: Instant::now() },
        };
        let rate = paced.remote.read_u64(paced.rate_at)?;
        if rate == 0 {
            anyhow::bail!("the agent in pid {pid} is not sampling");
        }
        paced.pace = Pace::new(rate);
        paced.last = paced.now()?;
        Ok(paced)
    }

    fn now(&self) -> Result<Turn> {
        Ok(Turn {
            samples: self.remote.read_u64(self.samples_at)?,
            cycles: self.remote.read_u64(self.cycles_at)?,
            tsc: tsc(),
            at: Instant::now(),
        })
    }

    pub fn rate(&self) -> u64 {
        self.pace.rate()
    }

    /// Measures the last turn and sets the next interval if it changes; the new one.
    /// An error once the agent stopped, or the process is gone or another image.
    pub fn turn(&mut self) -> Result<Option<u64>> {
        let last = self.last;
        if last.at.elapsed() < TURN {
            return Ok(None);
        }
        let now = self.now()?;
        // The agent stopped (by its own leakmon, or another process's now): hands off.
        if self.remote.read_u64(self.rate_at)? != self.pace.rate() {
            anyhow::bail!("the agent in pid {} no longer samples at the paced interval", self.remote.pid);
        }
        self.last = now;
        let elapsed = now.at.duration_since(last.at);
        let tsc_per_second = now.tsc.wrapping_sub(last.tsc) as f64 / elapsed.as_secs_f64().max(1e-3);
        let spent = Duration::from_secs_f64(
            (now.cycles.wrapping_sub(last.cycles) as f64 / tsc_per_second.max(1.0)).min(1e6),
        );
        let samples = now.samples.saturating_sub(last.samples);
        let Some(next) = self.pace.next(samples, spent, elapsed, self.anonymous()) else {
            return Ok(None);
        };
        self.remote.write(self.rate_at, &next.to_le_bytes())?;
        Ok(Some(next))
    }

    /// `RssAnon`: the heap, where sampled blocks live (0 when unknown).
    fn anonymous(&self) -> u64 {
        let status = self.proc_root.status(self.remote.pid).unwrap_or_default();
        crate::procfs::status_kib(&status, "RssAnon:").map_or(0, |kib| kib * 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Drives a pace against a process allocating `bytes_per_second` in small blocks
    /// (each sample stands for one interval): the interval it settles at.
    fn settle(start: u64, bytes_per_second: u64, anonymous: u64) -> u64 {
        let mut pace = Pace::new(start);
        for _ in 0..40 {
            let samples = bytes_per_second / pace.rate();
            pace.next(samples, SAMPLE_COST * samples as u32, SECOND, anonymous);
        }
        pace.rate()
    }

    #[test]
    fn the_interval_follows_the_allocation_rate_to_the_target() {
        for bytes_per_second in [16u64 << 20, 256 << 20, 4 << 30] {
            let rate = settle(512 << 10, bytes_per_second, 0);
            let per_second = bytes_per_second as f64 / rate as f64;
            assert!(
                (TARGET_PER_SECOND / 2.0..=TARGET_PER_SECOND * 2.0).contains(&per_second),
                "{bytes_per_second} B/s settles at {rate} B, {per_second:.0} samples/s"
            );
            assert!(rate.is_power_of_two() || rate == MAX_RATE);
        }
        // Too little allocated to reach the target at any interval: the floor.
        assert_eq!(settle(512 << 10, 1 << 20, 0), MIN_RATE);
    }

    #[test]
    fn an_idle_process_comes_down_by_steps_to_the_floor() {
        let mut pace = Pace::new(512 << 10);
        assert_eq!(pace.next(0, Duration::ZERO, SECOND, 0), Some(64 << 10), "at most an eighth a turn");
        assert_eq!(pace.next(0, Duration::ZERO, SECOND, 0), Some(8 << 10));
        assert_eq!(pace.next(0, Duration::ZERO, SECOND, 0), Some(MIN_RATE));
        assert_eq!(pace.next(0, Duration::ZERO, SECOND, 0), None);
    }

    #[test]
    fn a_burst_raises_the_interval_at_once() {
        let mut pace = Pace::new(MIN_RATE);
        // A gigabyte a second at 4 KiB: 262,144 samples.
        let samples = (1 << 30) / MIN_RATE;
        let next = pace.next(samples, SAMPLE_COST * samples as u32, SECOND, 0).expect("raised");
        assert!(
            (1u64 << 30) as f64 / next as f64 <= TARGET_PER_SECOND * 2.0,
            "one turn reaches the target: {next}"
        );
    }

    #[test]
    fn a_steady_process_keeps_its_interval() {
        let mut pace = Pace::new(64 << 10);
        let at_target = TARGET_PER_SECOND as u64;
        for samples in [at_target, at_target * 3 / 2, at_target * 3 / 4, at_target] {
            assert_eq!(
                pace.next(samples, SAMPLE_COST * samples as u32, SECOND, 0),
                None,
                "{samples} samples"
            );
        }
    }

    /// Samples that cost ten times the default (a deep stack walked through unwind
    /// tables) come a tenth as often: the budget is time, not a count.
    #[test]
    fn a_costlier_sample_is_taken_less_often() {
        let mut pace = Pace::new(64 << 10);
        let bytes_per_second = 256u64 << 20;
        for _ in 0..40 {
            let samples = bytes_per_second / pace.rate();
            pace.next(samples, SAMPLE_COST * 10 * samples as u32, SECOND, 0);
        }
        let per_second = bytes_per_second as f64 / pace.rate() as f64;
        let spent = per_second * SAMPLE_COST.as_secs_f64() * 10.0;
        assert!(
            (BUDGET / 2.0..=BUDGET * 2.0).contains(&spent),
            "{per_second:.0} samples/s spend {spent:.4} of a core"
        );
    }

    #[test]
    fn a_large_heap_keeps_its_samples_within_the_live_table() {
        // A process of 4 GiB allocating slowly: its live blocks, sampled, stay at most
        // MAX_LIVE_SAMPLES.
        let rate = settle(512 << 10, 1 << 20, 4 << 30);
        assert!(rate >= (4u64 << 30) / MAX_LIVE_SAMPLES, "{rate}");
    }
}

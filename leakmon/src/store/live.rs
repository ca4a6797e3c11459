//! What the live blocks add to a report's totals: the spread of sampled figures (see
//! [`crate::analysis::uncertainty`]), and the blocks still in flight.
//!
//! A block younger than [`IN_FLIGHT_MS`] when a running process's window ends is most
//! likely work in progress (a request's buffers, a list being built), whose free has
//! not come yet: it is set apart from its stack's figures and shown on a line of its
//! own, so that churn does not pass for memory held. A process that has exited has no
//! work in progress: what it left is all held.
//!
//! In: the kernel's live blocks, each process's current image, which processes still
//! run, the time and the sampling interval. Pure, so unit tested without BPF.

use std::collections::HashMap;

use leakmon_common::{LiveAlloc, LiveKey};

use super::ProcessTotals;
use crate::analysis::uncertainty::Spread;

/// Blocks younger than this (milliseconds) at the end of a running process's window
/// are in flight.
pub const IN_FLIGHT_MS: u64 = 1000;

/// Blocks set apart as in flight: their bytes (as the figures count them), number and
/// the sum of their allocation times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    pub bytes: u64,
    pub allocations: u64,
    pub ts_ms_sum: u64,
}

/// What the live blocks say, per (process, stack id).
#[derive(Debug, Default)]
pub struct Live {
    /// Sampled figures only: the spread of the blocks kept in the figures.
    pub spreads: HashMap<(u32, u64), Spread>,
    pub in_flight: HashMap<(u32, u64), InFlight>,
}

/// Sorts the live `blocks` of each process's current image (`current_gen`): in flight
/// where the process still `runs` and the block is young at `now_ms`, else, when it was
/// sampled, into the spread of its stack (at the interval it was sampled at: the
/// agent's changes as it paces its samples).
pub fn read(
    blocks: impl IntoIterator<Item = (LiveKey, LiveAlloc)>,
    current_gen: impl Fn(u32) -> Option<u32>,
    runs: impl Fn(u32) -> bool,
    now_ms: u64,
) -> Live {
    let mut live = Live::default();
    for (key, block) in blocks {
        if current_gen(key.tgid) != Some(block.gen) {
            continue;
        }
        let at = (key.tgid, block.stack_id);
        if runs(key.tgid) && now_ms.saturating_sub(block.ts_ms) < IN_FLIGHT_MS {
            let f = live.in_flight.entry(at).or_default();
            f.bytes += block.size;
            f.allocations += 1;
            f.ts_ms_sum += block.ts_ms;
        } else if block.rate > 0 {
            *live.spreads.entry(at).or_default() += Spread::block(block.size, u64::from(block.rate));
        }
    }
    live
}

/// Takes the blocks in flight out of their stacks' and processes' figures (a stack
/// left with nothing goes); returns what was taken, per process.
pub fn set_apart(
    totals: &mut [ProcessTotals],
    in_flight: &HashMap<(u32, u64), InFlight>,
) -> HashMap<u32, InFlight> {
    let mut per_process: HashMap<u32, InFlight> = HashMap::new();
    for p in totals {
        for s in &mut p.stacks {
            let Some(f) = in_flight.get(&(p.pid, s.stack_id)) else { continue };
            // The kernel's totals and its live table change together; a block freed
            // between the two reads is not taken twice.
            let taken = InFlight {
                bytes: f.bytes.min(s.bytes),
                allocations: f.allocations.min(s.allocations),
                ts_ms_sum: f.ts_ms_sum.min(s.ts_ms_sum),
            };
            s.bytes -= taken.bytes;
            s.allocations -= taken.allocations;
            s.ts_ms_sum -= taken.ts_ms_sum;
            p.bytes -= taken.bytes.min(p.bytes);
            p.allocations -= taken.allocations.min(p.allocations);
            let sum = per_process.entry(p.pid).or_default();
            sum.bytes += taken.bytes;
            sum.allocations += taken.allocations;
            sum.ts_ms_sum += taken.ts_ms_sum;
        }
        p.stacks.retain(|s| s.allocations > 0);
    }
    per_process
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StackTotals;

    fn block(tgid: u32, stack_id: u64, size: u64, ts_ms: u64) -> (LiveKey, LiveAlloc) {
        sampled_block(tgid, stack_id, size, ts_ms, 0)
    }

    fn sampled_block(tgid: u32, stack_id: u64, size: u64, ts_ms: u64, rate: u32) -> (LiveKey, LiveAlloc) {
        (
            LiveKey { tgid, addr: ts_ms * 1000 + size, ..LiveKey::default() },
            LiveAlloc { size, ts_ms, stack_id, gen: 0, rate },
        )
    }

    /// A running process's young blocks go apart; an exited one keeps all of its; the
    /// blocks kept make the spread of a sampled figure.
    #[test]
    fn young_blocks_of_running_processes_are_set_apart() {
        let now = 100_000;
        let blocks = [
            block(1, 7, 100, now - 5000),
            block(1, 7, 40, now - 200),
            block(1, 8, 60, now - 10),
            block(2, 7, 30, now - 10),
        ];
        let live = read(blocks, |_| Some(0), |pid| pid == 1, now);
        assert_eq!(live.in_flight[&(1, 7)], InFlight { bytes: 40, allocations: 1, ts_ms_sum: now - 200 });
        assert_eq!(live.in_flight[&(1, 8)].bytes, 60);
        assert!(!live.in_flight.contains_key(&(2, 7)), "an exited process has nothing in flight");
        assert!(live.spreads.is_empty(), "exact figures have no spread");

        let stack =
            |stack_id, bytes, allocations, ts_ms_sum| StackTotals { stack_id, bytes, allocations, ts_ms_sum };
        let mut totals = vec![ProcessTotals {
            pid: 1,
            gen: 0,
            bytes: 200,
            allocations: 3,
            stacks: vec![stack(7, 140, 2, 2 * now - 5200), stack(8, 60, 1, now - 10)],
            named: None,
        }];
        let apart = set_apart(&mut totals, &live.in_flight);
        assert_eq!(apart[&1].bytes, 100);
        assert_eq!((totals[0].bytes, totals[0].allocations), (100, 1));
        assert_eq!(totals[0].stacks, vec![stack(7, 100, 1, now - 5000)], "the stack all in flight is gone");

        let sampled = read([sampled_block(1, 7, 16 << 10, now - 5000, 4096)], |_| Some(0), |_| true, now);
        assert_eq!(sampled.spreads[&(1, 7)].samples, 1);
    }

    /// Each block's spread is taken at the interval it was sampled at: a 48-byte block
    /// sampled at 64 KiB stands for 64 KiB, which read at a later 4 KiB interval would
    /// pass for a block sampled for certain (no spread at all).
    #[test]
    fn blocks_keep_the_interval_they_were_sampled_at() {
        use leakmon_common::sampling::weight;
        let now = 100_000;
        let blocks = [
            sampled_block(1, 7, weight(48, 65536), now - 5000, 65536),
            sampled_block(1, 7, weight(48, 4096), now - 4000, 4096),
        ];
        let spread = read(blocks, |_| Some(0), |_| true, now).spreads[&(1, 7)];
        assert_eq!(spread.samples, 2);
        assert_eq!(spread.certain, 0, "both blocks were sampled by chance");
        assert_eq!(spread.uncertain, weight(48, 65536) + weight(48, 4096));
        assert!(spread.variance > u128::from(weight(48, 65536)).pow(2) * 99 / 100);
    }
}

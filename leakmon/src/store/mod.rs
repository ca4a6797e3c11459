//! The store: per-process, per-stack unfreed totals as read from the kernel tables.
//!
//! In: raw `(TotalsKey, Totals)` entries and each process's current image generation.
//! Out: [`ProcessTotals`], one per process, blocks of replaced images (before an exec)
//! left out, stacks largest first. Pure functions, so they are unit tested without BPF.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use leakmon_common::{Totals, TotalsKey};

pub mod live;

/// Unfreed memory of one call stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackTotals {
    pub stack_id: u64,
    pub bytes: u64,
    pub allocations: u64,
    /// Sum of the blocks' allocation times (ms, monotonic clock): mean age without a
    /// walk over every block.
    pub ts_ms_sum: u64,
}

impl StackTotals {
    /// Mean age of the unfreed blocks in seconds at monotonic time `now_ms`.
    pub fn mean_age_seconds(&self, now_ms: u64) -> f64 {
        if self.allocations == 0 {
            return 0.0;
        }
        let mean_ts = self.ts_ms_sum / self.allocations;
        now_ms.saturating_sub(mean_ts) as f64 / 1000.0
    }
}

/// Unfreed memory of one process image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessTotals {
    pub pid: u32,
    pub gen: u32,
    pub bytes: u64,
    pub allocations: u64,
    /// Largest first; ties by stack id for a stable order.
    pub stacks: Vec<StackTotals>,
    /// Frames of stacks a runtime's own profiler named (Node.js, a JVM), by stack id;
    /// `None` for stacks the kernel took, which are symbolized from their addresses.
    pub named: Option<Arc<NamedStacks>>,
}

/// Stacks named by a runtime's profiler: stack id → (the id reports give it, frames).
pub type NamedStacks = HashMap<u64, (String, Vec<crate::model::FrameReport>)>;

/// Groups raw entries per process, keeping only each process's current generation
/// (`current_gen` returns `None` for a process whose generation is unknown, in which
/// case the highest generation seen is kept).
pub fn group(
    entries: impl IntoIterator<Item = (TotalsKey, Totals)>,
    current_gen: impl Fn(u32) -> Option<u32>,
) -> Vec<ProcessTotals> {
    let mut by_image: BTreeMap<(u32, u32), Vec<StackTotals>> = BTreeMap::new();
    for (key, t) in entries {
        if t.allocs == 0 {
            continue;
        }
        by_image.entry((key.tgid, key.gen)).or_default().push(StackTotals {
            stack_id: key.stack_id,
            bytes: t.bytes,
            allocations: t.allocs,
            ts_ms_sum: t.ts_ms_sum,
        });
    }
    let mut latest: BTreeMap<u32, u32> = BTreeMap::new();
    for &(pid, gen) in by_image.keys() {
        let entry = latest.entry(pid).or_insert(gen);
        *entry = (*entry).max(gen);
    }
    let mut out: Vec<ProcessTotals> = by_image
        .into_iter()
        .filter(|((pid, gen), _)| current_gen(*pid).unwrap_or(latest[pid]) == *gen)
        .map(|((pid, gen), mut stacks)| {
            stacks.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.stack_id.cmp(&b.stack_id)));
            ProcessTotals {
                pid,
                gen,
                bytes: stacks.iter().map(|s| s.bytes).sum(),
                allocations: stacks.iter().map(|s| s.allocations).sum(),
                stacks,
                named: None,
            }
        })
        .collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.pid.cmp(&b.pid)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tgid: u32, gen: u32, stack_id: u64, bytes: u64, allocs: u64) -> (TotalsKey, Totals) {
        (TotalsKey { tgid, gen, stack_id }, Totals { bytes, allocs, ts_ms_sum: allocs * 1000 })
    }

    #[test]
    fn groups_per_process_largest_first() {
        let groups =
            group([entry(10, 0, 1, 100, 2), entry(10, 0, 2, 4800, 100), entry(20, 0, 1, 9000, 1)], |_| {
                Some(0)
            });
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].pid, groups[0].bytes, groups[0].allocations), (20, 9000, 1));
        assert_eq!((groups[1].pid, groups[1].bytes, groups[1].allocations), (10, 4900, 102));
        assert_eq!(groups[1].stacks[0].stack_id, 2);
    }

    #[test]
    fn drops_blocks_of_a_replaced_image_and_freed_stacks() {
        let groups = group([entry(10, 0, 1, 100, 2), entry(10, 1, 1, 50, 1), entry(10, 1, 3, 0, 0)], |pid| {
            (pid == 10).then_some(1)
        });
        assert_eq!(groups.len(), 1);
        assert_eq!((groups[0].gen, groups[0].bytes, groups[0].stacks.len()), (1, 50, 1));
        // Unknown generation: the newest one seen counts.
        let groups = group([entry(10, 0, 1, 100, 2), entry(10, 2, 1, 7, 1)], |_| None);
        assert_eq!((groups[0].gen, groups[0].bytes), (2, 7));
    }

    #[test]
    fn mean_age_from_the_timestamp_sum() {
        let s = StackTotals { stack_id: 1, bytes: 10, allocations: 2, ts_ms_sum: 1000 + 3000 };
        assert!((s.mean_age_seconds(12_000) - 10.0).abs() < 1e-9);
        let empty = StackTotals { stack_id: 1, bytes: 0, allocations: 0, ts_ms_sum: 0 };
        assert!(empty.mean_age_seconds(5).abs() < f64::EPSILON);
    }
}

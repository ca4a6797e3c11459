//! The kernel's tables as leakmon reads them: the process table, the per-stack totals,
//! the live blocks, the stacks, the counters and the lifecycle ring buffer; and their
//! purge once processes are gone.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The failure counters, summed over CPUs; indexed by `leakmon_common::counter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; counter::COUNT as usize]);

impl Counters {
    pub const NAMES: [&'static str; counter::COUNT as usize] = [
        "live_table_full",
        "totals_table_full",
        "stacks_table_full",
        "stack_error",
        "inflight_table_full",
        "process_table_full",
        "events_lost",
        "inflight_stale",
        "live_replaced",
        "read_error",
    ];

    /// Non-zero counters with their names.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Self::NAMES.iter().zip(self.0).filter(|(_, v)| *v != 0).map(|(n, v)| (*n, v))
    }
}

/// What [`Probes::purge`] dropped.
#[derive(Debug, Default)]
pub struct Purged {
    /// Totals and live-block entries.
    pub entries: usize,
    /// The processes taken out of the process table.
    pub forgotten: HashSet<u32>,
}

impl Probes {
    /// Starts tracing `pid` (and, through the fork tracepoint, its future children).
    /// A process already traced keeps its state; one at the pid of an exited process
    /// not yet purged starts a generation of its own.
    pub fn trace(&mut self, pid: u32) -> Result<(), ProbeError> {
        let mut procs = self.procs_mut()?;
        let state = match procs.get(&pid, 0) {
            Ok(old) if old.exited() => old.reborn(),
            Ok(_) => return Ok(()),
            Err(_) => ProcState::default(),
        };
        procs.insert(&pid, &state, 0).map_err(map_err("insert", "PROCS"))
    }

    /// The traced state of one live process, if traced.
    pub fn proc_state(&self, pid: u32) -> Option<ProcState> {
        let procs: HashMap<&MapData, u32, ProcState> = HashMap::try_from(self.ebpf.map("PROCS")?).ok()?;
        procs.get(&pid, 0).ok().filter(|s| !s.exited())
    }

    /// Every traced process, with those that exited and are not purged yet.
    pub fn traced(&self) -> Result<Vec<(u32, ProcState)>, ProbeError> {
        let procs: HashMap<&MapData, u32, ProcState> =
            HashMap::try_from(self.ebpf.map("PROCS").ok_or_else(|| missing_map("PROCS"))?)
                .map_err(map_err("open", "PROCS"))?;
        procs.iter().collect::<Result<_, _>>().map_err(map_err("read", "PROCS"))
    }

    /// Per-stack totals of the processes `keep` selects, with non-zero allocations: the
    /// table read in batches where the kernel can ([`super::batch`]), else entry by entry.
    pub fn totals(&self, keep: impl Fn(&TotalsKey) -> bool) -> Result<Vec<(TotalsKey, Totals)>, ProbeError> {
        if let (false, Some(aya::maps::Map::HashMap(data))) = (self.read_by_entry, self.ebpf.map("TOTALS")) {
            match super::batch::entries::<TotalsKey, Totals>(data) {
                Ok(Some(all)) => {
                    return Ok(all.into_iter().filter(|(k, v)| keep(k) && v.allocs != 0).collect())
                }
                Ok(None) => {}
                Err(e) => tracing::debug!("read TOTALS in batches: {e}; entry by entry"),
            }
        }
        self.totals_by_entry(keep)
    }

    /// [`Self::totals`], each entry read with its own calls (aya's iterator): where the
    /// kernel has no batched lookup, and to compare against.
    pub fn totals_by_entry(
        &self,
        keep: impl Fn(&TotalsKey) -> bool,
    ) -> Result<Vec<(TotalsKey, Totals)>, ProbeError> {
        let totals: HashMap<&MapData, TotalsKey, Totals> =
            HashMap::try_from(self.ebpf.map("TOTALS").ok_or_else(|| missing_map("TOTALS"))?)
                .map_err(map_err("open", "TOTALS"))?;
        let mut out = Vec::new();
        for entry in &totals {
            let (key, value) = entry.map_err(map_err("read", "TOTALS"))?;
            if keep(&key) && value.allocs != 0 {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    /// The blocks of `tgid` in the live table. Walks the whole table: for tests and
    /// diagnostics, not for a tick.
    pub fn live_blocks(&self, tgid: u32) -> Result<usize, ProbeError> {
        let live: HashMap<&MapData, LiveKey, LiveAlloc> =
            HashMap::try_from(self.ebpf.map("LIVE").ok_or_else(|| missing_map("LIVE"))?)
                .map_err(map_err("open", "LIVE"))?;
        Ok(live.keys().filter_map(Result::ok).filter(|k| k.tgid == tgid).count())
    }

    /// The live blocks of the processes `keep` selects. Walks the whole table: once per
    /// report, for the intervals of sampled figures, never per tick.
    pub fn live(&self, keep: impl Fn(u32) -> bool) -> Result<Vec<(LiveKey, LiveAlloc)>, ProbeError> {
        let live: HashMap<&MapData, LiveKey, LiveAlloc> =
            HashMap::try_from(self.ebpf.map("LIVE").ok_or_else(|| missing_map("LIVE"))?)
                .map_err(map_err("open", "LIVE"))?;
        let mut out = Vec::new();
        for entry in &live {
            let (key, block) = entry.map_err(map_err("read", "LIVE"))?;
            if keep(key.tgid) {
                out.push((key, block));
            }
        }
        Ok(out)
    }

    /// The user stack `id`, innermost frame first.
    pub fn stack(&self, id: u64) -> Option<Vec<u64>> {
        let stacks: HashMap<&MapData, u64, Stack> = HashMap::try_from(self.ebpf.map("STACKS")?).ok()?;
        let stack = stacks.get(&id, 0).ok()?;
        Some(stack.frames().to_vec())
    }

    /// The failure counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, ProbeError> {
        let array: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").ok_or_else(|| missing_map("COUNTERS"))?)
                .map_err(map_err("open", "COUNTERS"))?;
        let mut counters = Counters::default();
        for (i, slot) in counters.0.iter_mut().enumerate() {
            let values = array.get(&(i as u32), 0).map_err(map_err("read", "COUNTERS"))?;
            *slot = values.iter().sum();
        }
        Ok(counters)
    }

    /// The lifecycle ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self.ebpf.take_map("EVENTS").ok_or_else(|| missing_map("EVENTS"))?;
        RingBuf::try_from(map).map_err(map_err("open", "EVENTS"))
    }

    /// Drops every entry of the processes (or process images) `stale` selects by pid
    /// and generation: their totals, their live blocks, and, for `forget_process`, the
    /// process itself. One pass over each table, so callers batch exits and execs.
    pub fn purge(
        &mut self,
        stale: impl Fn(u32, u32) -> bool,
        forget_process: impl Fn(u32, ProcState) -> bool,
    ) -> Result<Purged, ProbeError> {
        let mut removed = 0;
        // The kernel makes a block's totals entry before its live entry and counts it
        // there once the live entry exists, so a stale image with no unfreed allocation
        // in its totals has no live block. Most processes that exit freed everything
        // (or never allocated), and the live table can hold millions of other blocks:
        // it is only walked when there is something in it to drop.
        let mut has_live_blocks = false;
        {
            let mut totals: HashMap<&mut MapData, TotalsKey, Totals> =
                HashMap::try_from(self.ebpf.map_mut("TOTALS").ok_or_else(|| missing_map("TOTALS"))?)
                    .map_err(map_err("open", "TOTALS"))?;
            let keys: Vec<TotalsKey> = totals
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| stale(k.tgid, k.gen))
                .map(|(k, v)| {
                    has_live_blocks |= v.allocs != 0;
                    k
                })
                .collect();
            for key in keys {
                removed += usize::from(totals.remove(&key).is_ok());
            }
        }
        if has_live_blocks {
            let mut live: HashMap<&mut MapData, LiveKey, LiveAlloc> =
                HashMap::try_from(self.ebpf.map_mut("LIVE").ok_or_else(|| missing_map("LIVE"))?)
                    .map_err(map_err("open", "LIVE"))?;
            let keys: Vec<LiveKey> = live
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, v)| stale(k.tgid, v.gen))
                .map(|(k, _)| k)
                .collect();
            for key in keys {
                removed += usize::from(live.remove(&key).is_ok());
            }
        }
        let mut procs = self.procs_mut()?;
        let forgotten: HashSet<u32> = procs
            .iter()
            .filter_map(Result::ok)
            .filter(|(p, s)| forget_process(*p, *s))
            .map(|(p, _)| p)
            .collect();
        for pid in &forgotten {
            let _ = procs.remove(pid);
        }
        for pid in &forgotten {
            self.forget_unwind(*pid);
        }
        self.purge_stacks()?;
        Ok(Purged { entries: removed, forgotten })
    }

    /// Drops the stacks that no totals entry has named at this call and the one before
    /// (also part of [`Probes::purge`]). Call it periodically: stacks outlive the
    /// blocks that named them.
    pub fn purge_stacks(&mut self) -> Result<(), ProbeError> {
        let referenced: HashSet<u64> = {
            let totals: HashMap<&MapData, TotalsKey, Totals> =
                HashMap::try_from(self.ebpf.map("TOTALS").ok_or_else(|| missing_map("TOTALS"))?)
                    .map_err(map_err("open", "TOTALS"))?;
            totals.keys().filter_map(Result::ok).map(|k| k.stack_id).collect()
        };
        let mut stacks: HashMap<&mut MapData, u64, Stack> =
            HashMap::try_from(self.ebpf.map_mut("STACKS").ok_or_else(|| missing_map("STACKS"))?)
                .map_err(map_err("open", "STACKS"))?;
        let unreferenced: HashSet<u64> =
            stacks.keys().filter_map(Result::ok).filter(|id| !referenced.contains(id)).collect();
        for id in unreferenced.intersection(&self.unreferenced_stacks) {
            let _ = stacks.remove(id);
        }
        self.unreferenced_stacks = unreferenced;
        Ok(())
    }

    pub(super) fn procs_mut(&mut self) -> Result<HashMap<&mut MapData, u32, ProcState>, ProbeError> {
        HashMap::try_from(self.ebpf.map_mut("PROCS").ok_or_else(|| missing_map("PROCS"))?)
            .map_err(map_err("open", "PROCS"))
    }
}

//! One sampling tick of the daemon: samples in, verdicts and views out.
//!
//! In: the tier-0 samples of every process and, when probes are attached, the
//! per-process heap totals. It groups processes by (service, command), records one
//! sample per group and signal, re-analyses, and builds the [`SeriesView`]s that the
//! exporter and the JSON API show. Symbolized top stacks are cached per process stack.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
};

use rustc_hash::FxHashMap;

use crate::{
    analysis::{
        history::{Change, History, SeriesKey, Signal},
        trend::{time_to_exhaustion, Params},
    },
    model::{FrameReport, Resident, SeriesView, StackTrend, StackView},
    procfs::ProcRoot,
    sources::proc_sampler::{memory_limit, ProcSample},
    store::ProcessTotals,
    symbolize::{stable_id, Symbolizer},
};

/// A tick's processes by group, each process's group, and the probes' totals by group.
struct Grouping<'h> {
    groups: BTreeMap<GroupKey, Group>,
    key_of: FxHashMap<u32, Arc<GroupKey>>,
    heap: HashMap<GroupKey, Vec<&'h ProcessTotals>>,
}

/// Processes of one (service, command) at one tick.
#[derive(Debug, Default)]
struct Group {
    pids: Vec<u32>,
    /// (pid, start time) of each process: tells a restart from a steady set.
    identities: Vec<(u32, u64)>,
    memory: Resident,
    cgroup: crate::sources::proc_sampler::MemCgroup,
    heap: Option<(u64, u64)>,
}

impl Resident {
    fn add(&mut self, p: &ProcSample) {
        self.rss += p.rss_bytes;
        self.anon += p.anon_bytes;
        self.swap += p.swap_bytes;
        self.file += p.file_bytes;
        self.shmem += p.shmem_bytes;
    }

    /// The leak signal's value: anonymous memory, resident or swapped out.
    pub fn unreclaimable(&self) -> u64 {
        self.anon + self.swap
    }
}

/// State kept across ticks.
/// (service, command, pid when series are per process).
type GroupKey = (String, String, Option<u32>);

pub struct Monitor {
    history: History,
    /// One series per process instead of per (service, command).
    by_pid: bool,
    top_stacks: usize,
    proc_root: ProcRoot,
    cgroup_root: PathBuf,
    symbolizer: Symbolizer,
    /// The symbolizer's parsed binaries are dropped after this long unused.
    symbolizer_idle: std::time::Duration,
    /// (pid, stack id) → stable id and symbolized frames; cleared past its bound.
    frames: HashMap<(u32, u64), (String, Vec<FrameReport>)>,
    /// Per (service, command): the processes seen last tick, their resident total, and
    /// the offset that stitches incarnations together.
    incarnations: HashMap<GroupKey, Incarnation>,
    /// pid → (service, command[, pid]) at the last tick: who a process was, even once
    /// gone. A group's key is shared by its processes.
    last_seen: FxHashMap<u32, Arc<GroupKey>>,
    /// Processes whose allocations could not all be counted (a kernel table was full).
    incomplete: std::collections::HashSet<u32>,
}

/// Restarts hide leaks: each new process starts small, so a service that leaks and is
/// restarted (or OOM-killed) over and over looks like a sawtooth with a flat floor.
/// When a group's processes are replaced and its memory drops, the drop is added to an
/// offset that the analysed series carries from then on, so growth across restarts
/// reads as the steady slope it is. Shown values stay the real ones.
#[derive(Debug, Default)]
struct Incarnation {
    identities: Vec<(u32, u64)>,
    last_anon: u64,
    offset: f64,
    restarts: u64,
    seen: f64,
}

const MAX_CACHED_STACKS: usize = 50_000;

/// How long the parsed binaries are kept after the last new stack was named: long
/// enough to name the stacks of a newly attributed process in one go, short enough
/// that the daemon's footprint returns to its steady size within minutes.
const SYMBOLIZER_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

impl Monitor {
    /// Names stacks by their allocation site past these wrappers.
    #[must_use]
    pub fn wrappers(mut self, wrappers: crate::wrappers::Wrappers) -> Self {
        self.symbolizer = Symbolizer::new(wrappers);
        self
    }

    pub fn new(params: Params, max_series: usize, top_stacks: usize, proc_root: ProcRoot) -> Self {
        Self {
            history: History::new(params, max_series),
            by_pid: false,
            top_stacks,
            proc_root,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            symbolizer: Symbolizer::default(),
            symbolizer_idle: SYMBOLIZER_IDLE,
            frames: HashMap::new(),
            incarnations: HashMap::new(),
            last_seen: FxHashMap::default(),
            incomplete: std::collections::HashSet::new(),
        }
    }

    /// The processes whose heap data is incomplete, for the next tick: their groups'
    /// heap series get no verdict.
    pub fn set_incomplete(&mut self, pids: impl IntoIterator<Item = u32>) {
        self.incomplete = pids.into_iter().collect();
    }

    /// One series per process (a `pid` label), instead of per service and command.
    #[must_use]
    pub fn per_process(mut self, on: bool) -> Self {
        self.by_pid = on;
        self
    }

    /// New analysis settings (a configuration reload); the history is kept.
    pub fn reconfigure(&mut self, params: Params, max_series: usize, top_stacks: usize) {
        self.history.reconfigure(params, max_series);
        self.top_stacks = top_stacks;
    }

    /// The (service, command) a pid had at the last tick.
    pub fn identity_of(&self, pid: u32) -> Option<(&str, &str)> {
        self.last_seen.get(&pid).map(|k| (k.0.as_str(), k.1.as_str()))
    }

    /// The processes of `service` at the last tick.
    pub fn pids_of_service(&self, service: &str) -> Vec<u32> {
        let mut pids: Vec<u32> =
            self.last_seen.iter().filter(|(_, k)| k.0 == service).map(|(pid, _)| *pid).collect();
        pids.sort_unstable();
        pids
    }

    /// Restarts seen per (service, command) since leakmon started.
    pub fn restarts(&self) -> impl Iterator<Item = (&GroupKey, u64)> {
        self.incarnations.iter().map(|(k, i)| (k, i.restarts))
    }

    pub fn series_dropped(&self) -> u64 {
        self.history.dropped()
    }

    /// Records one tick at `now` seconds and returns the views and the changes of
    /// suspicion. `heap` holds the probes' totals per process, `stack` resolves a
    /// stack id.
    pub fn tick(
        &mut self,
        now: f64,
        procs: &[ProcSample],
        heap: Option<&[ProcessTotals]>,
        stack: &dyn Fn(u64) -> Option<Vec<u64>>,
    ) -> (Vec<SeriesView>, Vec<Change>) {
        let Grouping { mut groups, key_of, heap } = self.group(procs, heap);
        let mut stacks_by_group: HashMap<GroupKey, Vec<StackView>> = HashMap::new();
        for (gkey, totals) in &heap {
            stacks_by_group.insert(gkey.clone(), self.top_stacks(totals, stack));
        }
        self.record(now, &mut groups, &stacks_by_group);
        let changes = self.history.analyse(now);
        self.last_seen = key_of;
        let views = self.views(now, &groups, stacks_by_group);
        // Stacks of processes gone since: under process churn every new process brings
        // new entries, which would otherwise pile up to the bound over hours.
        self.frames.retain(|(pid, _), _| self.last_seen.contains_key(pid));
        if self.frames.len() > MAX_CACHED_STACKS {
            self.frames.clear();
        }
        if self.symbolizer.release_idle(self.symbolizer_idle) {
            crate::own_memory::give_back();
        }
        (views, changes)
    }

    /// The processes of this tick by (service, command[, pid]), with the probes'
    /// totals of each group's processes.
    fn group<'h>(&self, procs: &[ProcSample], heap: Option<&'h [ProcessTotals]>) -> Grouping<'h> {
        // Keyed by borrowed names first: a host's thousands of processes fall into far
        // fewer groups, and only a group's key is copied.
        let mut index: FxHashMap<(&str, &str, Option<u32>), usize> = FxHashMap::default();
        let mut list: Vec<(Arc<GroupKey>, Group)> = Vec::new();
        let mut key_of: FxHashMap<u32, Arc<GroupKey>> = FxHashMap::default();
        key_of.reserve(procs.len());
        for p in procs {
            let pid = self.by_pid.then_some(p.pid);
            let at = *index.entry((p.service.as_str(), p.comm.as_str(), pid)).or_insert_with(|| {
                list.push((Arc::new((p.service.clone(), p.comm.clone(), pid)), Group::default()));
                list.len() - 1
            });
            let (key, g) = &mut list[at];
            g.pids.push(p.pid);
            g.identities.push((p.pid, p.start));
            g.memory.add(p);
            if g.pids.len() == 1 {
                g.cgroup.clone_from(&p.cgroup);
            }
            key_of.insert(p.pid, Arc::clone(key));
        }
        let mut groups: BTreeMap<GroupKey, Group> =
            list.into_iter().map(|(k, g)| ((*k).clone(), g)).collect();
        let mut heap_by_group: HashMap<GroupKey, Vec<&ProcessTotals>> = HashMap::new();
        for t in heap.unwrap_or_default() {
            if let Some(key) = key_of.get(&t.pid) {
                let g = groups.get_mut(&**key).expect("grouped above");
                let (b, a) = g.heap.get_or_insert((0, 0));
                *b += t.bytes;
                *a += t.allocations;
                heap_by_group.entry((**key).clone()).or_default().push(t);
            }
        }
        Grouping { groups, key_of, heap: heap_by_group }
    }

    /// Records each group's signals at `now`: its unreclaimable memory stitched across
    /// restarts, its shared memory, its heap and its stacks' bytes.
    fn record(
        &mut self,
        now: f64,
        groups: &mut BTreeMap<GroupKey, Group>,
        stacks_by_group: &HashMap<GroupKey, Vec<StackView>>,
    ) {
        let window = self.history.window();
        self.incarnations.retain(|_, i| i.seen >= now - window);
        for (gkey, g) in groups {
            let (service, comm, pid) = gkey;
            let inc = self.incarnations.entry(gkey.clone()).or_default();
            g.identities.sort_unstable();
            let replaced =
                !inc.identities.is_empty() && !g.identities.iter().any(|id| inc.identities.contains(id));
            if replaced {
                inc.restarts += 1;
                let anon = g.memory.unreclaimable();
                if anon < inc.last_anon {
                    inc.offset += (inc.last_anon - anon) as f64;
                }
            }
            inc.identities.clone_from(&g.identities);
            inc.last_anon = g.memory.unreclaimable();
            inc.seen = now;
            let offset = inc.offset;
            let key = |signal, stack: Option<&str>| SeriesKey {
                service: service.clone(),
                comm: comm.clone(),
                pid: *pid,
                signal,
                stack: stack.map(str::to_owned),
            };
            self.history.record(key(Signal::Anon, None), now, g.memory.unreclaimable() as f64 + offset);
            // Shared memory often outlives a restart (a segment, a tmpfs file): not
            // stitched. Recorded once a process has some, so most groups have no series.
            if g.memory.shmem > 0 || self.history.get(&key(Signal::Shmem, None)).is_some() {
                self.history.record(key(Signal::Shmem, None), now, g.memory.shmem as f64);
            }
            let incomplete = g.pids.iter().any(|p| self.incomplete.contains(p));
            if let Some((bytes, _)) = g.heap {
                self.history.record(key(Signal::Heap, None), now, bytes as f64);
                if incomplete {
                    self.history.mark_incomplete(&key(Signal::Heap, None));
                }
            }
            for s in stacks_by_group.get(gkey).into_iter().flatten() {
                self.history.record(key(Signal::Heap, Some(&s.stack)), now, s.bytes as f64);
                if let Some(age) = s.mean_age_seconds {
                    self.history.record_age(&key(Signal::Heap, Some(&s.stack)), now, age);
                }
                if incomplete {
                    self.history.mark_incomplete(&key(Signal::Heap, Some(&s.stack)));
                }
            }
        }
    }

    /// One view per series with a verdict, its stacks with theirs.
    fn views(
        &self,
        now: f64,
        groups: &BTreeMap<GroupKey, Group>,
        mut stacks_by_group: HashMap<GroupKey, Vec<StackView>>,
    ) -> Vec<SeriesView> {
        let meminfo = std::fs::read_to_string(self.proc_root.path().join("meminfo")).unwrap_or_default();
        let mut limits: HashMap<crate::sources::proc_sampler::MemCgroup, Option<u64>> = HashMap::new();
        let mut views = Vec::new();
        for (key, s) in self.history.iter().filter(|(k, _)| k.stack.is_none()) {
            let (Some(analysis), Some(latest)) = (s.analysis(), s.latest()) else { continue };
            let gkey = (key.service.clone(), key.comm.clone(), key.pid);
            let group = groups.get(&gkey);
            let cgroup = group.map(|g| g.cgroup.clone()).unwrap_or_default();
            let limit = *limits
                .entry(cgroup.clone())
                .or_insert_with(|| memory_limit(&self.cgroup_root, &cgroup, &meminfo));
            let memory = group.map(|g| g.memory);
            // Shown values are the real ones, not the stitched series.
            let current = match key.signal {
                Signal::Anon => memory.map_or(0, |m| m.unreclaimable()),
                Signal::Shmem => memory.map_or(0, |m| m.shmem),
                Signal::Heap => latest.v as u64,
            };
            let suspected = analysis.verdict.suspected();
            let mut stacks = if key.signal == Signal::Heap {
                stacks_by_group.remove(&gkey).unwrap_or_default()
            } else {
                Vec::new()
            };
            for s in &mut stacks {
                let stack_key = SeriesKey { stack: Some(s.stack.clone()), ..key.clone() };
                s.trend = self.history.get(&stack_key).and_then(|series| {
                    let a = series.analysis()?;
                    Some(StackTrend {
                        growth_bytes_per_second: a.slope,
                        trend_z: a.z,
                        verdict: a.verdict,
                        suspected: a.verdict.suspected(),
                    })
                });
            }
            views.push(SeriesView {
                service: key.service.clone(),
                comm: key.comm.clone(),
                pid: key.pid,
                signal: key.signal.as_str(),
                pids: group.map(|g| g.pids.clone()).unwrap_or_default(),
                container: crate::sources::container::of_cgroup(&cgroup.path),
                allocator: None,
                incomplete: s.incomplete(),
                current_bytes: current,
                memory: memory.filter(|_| key.signal == Signal::Anon),
                allocations: if key.signal == Signal::Heap {
                    group.and_then(|g| g.heap).map(|h| h.1)
                } else {
                    None
                },
                growth_bytes_per_second: analysis.slope,
                trend_z: analysis.z,
                verdict: analysis.verdict,
                suspected,
                suspected_for_seconds: s.suspected_since().map(|since| now - since),
                limit_bytes: limit,
                time_to_exhaustion_seconds: if suspected {
                    limit.and_then(|l| time_to_exhaustion(current as f64, l as f64, analysis.slope))
                } else {
                    None
                },
                samples: analysis.samples,
                stacks,
            });
        }
        views
    }

    /// The group's largest stacks, merged across its processes by their symbolized
    /// frames (the same site in two workers is one stack).
    fn top_stacks(
        &mut self,
        totals: &[&ProcessTotals],
        stack: &dyn Fn(u64) -> Option<Vec<u64>>,
    ) -> Vec<StackView> {
        let mut candidates: Vec<(&ProcessTotals, &crate::store::StackTotals)> =
            totals.iter().flat_map(|t| t.stacks.iter().map(move |s| (*t, s))).collect();
        candidates.sort_by_key(|c| std::cmp::Reverse(c.1.bytes));
        let mut merged: Vec<StackView> = Vec::new();
        // Per merged stack: the sum of its blocks' allocation times and their count,
        // for their mean age (0: the source keeps no ages).
        let mut stamps: HashMap<String, (u64, u64)> = HashMap::new();
        for (t, s) in candidates.into_iter().take(self.top_stacks * 4) {
            let pid = t.pid;
            let named = t.named.as_ref().and_then(|n| n.get(&s.stack_id));
            let (hash, frames) = if let Some(known) = named {
                known.clone()
            } else if let Some(known) = self.frames.get(&(pid, s.stack_id)) {
                known.clone()
            } else {
                let maps = self.proc_root.maps(pid).unwrap_or_default();
                let root = self.proc_root.in_root(pid, std::path::Path::new("/"));
                let frames = stack(s.stack_id)
                    .map(|ips| self.symbolizer.frames(pid, &maps, Some(&root), &ips))
                    .unwrap_or_default();
                let known =
                    (stable_id(&frames), frames.into_iter().map(FrameReport::from).collect::<Vec<_>>());
                self.frames.insert((pid, s.stack_id), known.clone());
                known
            };
            let stamp = stamps.entry(hash.clone()).or_default();
            stamp.0 += s.ts_ms_sum;
            stamp.1 += s.allocations;
            if let Some(m) = merged.iter_mut().find(|m| m.stack == hash) {
                m.bytes += s.bytes;
                m.allocations += s.allocations;
                continue;
            }
            // The allocation site, what the metrics name a stack by.
            let at = self.symbolizer.site_of(frames.iter().map(FrameReport::site_frame));
            let site = frames.get(at);
            merged.push(StackView {
                stack: hash,
                bytes: s.bytes,
                allocations: s.allocations,
                mean_age_seconds: None,
                function: site.map_or_else(|| "[unknown]".to_owned(), |f| f.function.clone()),
                location: site
                    .and_then(|f| Some(format!("{}:{}", f.file.as_deref()?.rsplit('/').next()?, f.line?)))
                    .unwrap_or_default(),
                frames,
                trend: None,
            });
        }
        let now_ms = crate::monotonic_ms();
        for m in &mut merged {
            if let Some(&(ts_ms_sum, allocations)) =
                stamps.get(&m.stack).filter(|(sum, n)| *sum > 0 && *n > 0)
            {
                let mean = crate::store::StackTotals { stack_id: 0, bytes: 0, allocations, ts_ms_sum };
                m.mean_age_seconds = Some(mean.mean_age_seconds(now_ms));
            }
        }
        merged.sort_by_key(|m| std::cmp::Reverse(m.bytes));
        merged.truncate(self.top_stacks);
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::trend::Verdict;

    fn proc(pid: u32, comm: &str, rss: u64) -> ProcSample {
        ProcSample {
            pid,
            start: 1,
            comm: comm.into(),
            service: format!("{comm}.service"),
            cgroup: crate::sources::proc_sampler::MemCgroup { path: "/".into(), v1: false },
            identity: "/".into(),
            rss_bytes: rss,
            anon_bytes: rss,
            swap_bytes: 0,
            file_bytes: 0,
            shmem_bytes: 0,
        }
    }

    #[test]
    fn a_leak_hidden_by_restarts_is_still_seen() {
        let params = Params { window: 20.0, min_samples: 5, ..Params::default() };
        let mut m = Monitor::new(params, 100, 5, ProcRoot::default());
        let none = |_: u64| None;
        let mut last = Vec::new();
        for i in 0..80u32 {
            // Restarted every 5 s (new pid, new start), growing 1 MB/s from 2 MB each time.
            let incarnation = i / 10;
            let rss = 2_000_000 + u64::from(i % 10) * 500_000;
            let mut p = proc(100 + incarnation, "crashy", rss);
            p.start = u64::from(incarnation) + 1;
            last = m.tick(f64::from(i) * 0.5, &[p], None, &none).0;
        }
        let v = last.iter().find(|v| v.comm == "crashy").expect("crashy");
        assert_eq!(v.verdict, Verdict::SteadyGrowth, "{v:?}");
        assert!(v.current_bytes < 7_000_000, "shown value is the real one: {}", v.current_bytes);
        assert_eq!(m.restarts().find(|(k, _)| k.1 == "crashy").map(|(_, n)| n), Some(7));
    }

    #[test]
    fn leaks_are_judged_on_anonymous_memory_with_swap_never_on_file_cache() {
        let params = Params { window: 20.0, min_samples: 5, ..Params::default() };
        let mut m = Monitor::new(params, 100, 5, ProcRoot::default());
        let none = |_: u64| None;
        let mut last = Vec::new();
        for i in 0..60u64 {
            // Leaking 1 MB/s under memory pressure: the kernel swaps out as much, so its
            // resident size stays flat while its leak grows in swap.
            let mut swapping = proc(1, "swapping", 50_000_000);
            swapping.swap_bytes = i * 500_000;
            // Reading a file through mmap at 8 MB/s: resident, but cache.
            let mut reader = proc(2, "reader", 10_000_000);
            reader.file_bytes = i * 4_000_000;
            reader.rss_bytes += reader.file_bytes;
            // Filling a tmpfs file: its own signal.
            let mut shm = proc(3, "shm", 10_000_000);
            shm.shmem_bytes = 1_000_000 + i * 500_000;
            last = m.tick(i as f64 * 0.5, &[swapping, reader, shm], None, &none).0;
        }
        let verdict = |comm: &str, signal: &str| {
            last.iter()
                .find(|v| v.comm == comm && v.signal == signal)
                .unwrap_or_else(|| panic!("{comm} {signal} in {last:#?}"))
                .verdict
        };
        assert_eq!(verdict("swapping", "anon"), Verdict::SteadyGrowth);
        assert_eq!(verdict("reader", "anon"), Verdict::Flat);
        assert!(!last.iter().any(|v| v.comm == "reader" && v.suspected), "file cache is never a leak");
        assert_eq!(verdict("shm", "shmem"), Verdict::SteadyGrowth);
        assert_eq!(verdict("shm", "anon"), Verdict::Flat);
        let reader = last.iter().find(|v| v.comm == "reader" && v.signal == "anon").expect("reader");
        let memory = reader.memory.expect("the breakdown");
        assert_eq!((memory.file, memory.rss), (59 * 4_000_000, 10_000_000 + 59 * 4_000_000));
    }

    #[test]
    fn groups_by_service_and_command_across_restarts() {
        let params = Params { window: 10.0, min_samples: 5, ..Params::default() };
        let mut m = Monitor::new(params, 100, 5, ProcRoot::default());
        let none = |_: u64| None;
        let mut last = Vec::new();
        for i in 0..40u32 {
            let t = f64::from(i) * 0.5;
            // Two workers, restarted (new pid) half way: one series, summed.
            let base = if i < 20 { 10 } else { 20 };
            let rss = 1_000_000 + u64::from(i) * 50_000;
            let procs =
                [proc(base + 1, "worker", rss), proc(base + 2, "worker", rss), proc(99, "flat", 5_000_000)];
            last = m.tick(t, &procs, None, &none).0;
        }
        assert_eq!(last.len(), 2);
        let worker = last.iter().find(|v| v.comm == "worker").expect("worker");
        assert_eq!(worker.pids, vec![21, 22]);
        assert_eq!(worker.current_bytes, 2 * (1_000_000 + 39 * 50_000));
        assert_eq!(worker.verdict, Verdict::SteadyGrowth);
        assert!(worker.suspected && worker.time_to_exhaustion_seconds.is_some());
        assert!((worker.growth_bytes_per_second - 200_000.0).abs() < 1.0);
        let flat = last.iter().find(|v| v.comm == "flat").expect("flat");
        assert_eq!(flat.verdict, Verdict::Flat);
        assert!(!flat.suspected && flat.time_to_exhaustion_seconds.is_none());
    }

    #[inline(never)]
    fn flat_site() -> u64 {
        std::hint::black_box(1)
    }

    #[inline(never)]
    fn growing_site() -> u64 {
        std::hint::black_box(2)
    }

    #[test]
    fn the_parsed_binaries_are_dropped_once_no_new_stack_needs_them() {
        use crate::store::StackTotals;
        let pid = std::process::id();
        let site = flat_site as *const () as u64 + 1;
        let stack = move |_: u64| Some(vec![site]);
        let heap = |id: u64| {
            [ProcessTotals {
                pid,
                gen: 0,
                bytes: 1000,
                allocations: 1,
                stacks: vec![StackTotals { stack_id: id, bytes: 1000, allocations: 1, ts_ms_sum: 0 }],
                named: None,
            }]
        };
        let procs = [proc(pid, "svc", 20_000_000)];
        let mut m = Monitor::new(Params::default(), 100, 5, ProcRoot::default());
        m.tick(0.0, &procs, Some(&heap(1)), &stack);
        assert_eq!(m.symbolizer.parsed_binaries(), 1, "kept for the next new stacks");
        m.symbolizer_idle = std::time::Duration::from_secs(1);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        m.tick(1.0, &procs, Some(&heap(1)), &stack);
        assert_eq!(m.symbolizer.parsed_binaries(), 0, "dropped after a tick with no new stack");
        m.tick(2.0, &procs, Some(&heap(2)), &stack);
        assert_eq!(m.symbolizer.parsed_binaries(), 1, "a new stack parses its binary again");
        let views = m.tick(3.0, &procs, Some(&heap(2)), &stack).0;
        let heap = views.iter().find(|v| v.signal == "heap").expect("heap series");
        assert!(heap.stacks[0].function.contains("flat_site"), "{heap:#?}");
    }

    #[test]
    fn each_top_stack_has_its_own_verdict() {
        use crate::store::StackTotals;
        // Real code addresses of this test binary, so the stacks symbolize to two sites.
        let pid = std::process::id();
        let sites = [flat_site as *const () as u64 + 1, growing_site as *const () as u64 + 1];
        let stack = move |id: u64| Some(vec![sites[id as usize - 1]]);
        let params = Params { window: 10.0, min_samples: 5, ..Params::default() };
        let mut m = Monitor::new(params, 100, 5, ProcRoot::default());
        let mut last = Vec::new();
        for i in 0..40u32 {
            // The big stack is flat; the small one grows 10 kB per 0.5 s tick.
            let growing = 10_000 * u64::from(i);
            let stacks = vec![
                StackTotals { stack_id: 1, bytes: 10_000_000, allocations: 10, ts_ms_sum: 0 },
                StackTotals { stack_id: 2, bytes: growing, allocations: u64::from(i), ts_ms_sum: 0 },
            ];
            let heap = [ProcessTotals {
                pid,
                gen: 0,
                bytes: 10_000_000 + growing,
                allocations: 10 + u64::from(i),
                stacks,
                named: None,
            }];
            last = m.tick(f64::from(i) * 0.5, &[proc(pid, "svc", 20_000_000)], Some(&heap), &stack).0;
        }
        let heap = last.iter().find(|v| v.signal == "heap").expect("heap series");
        assert_eq!(heap.stacks.len(), 2, "{heap:#?}");
        let flat = &heap.stacks[0];
        assert!(flat.function.contains("flat_site"), "{flat:?}");
        let flat_trend = flat.trend.expect("flat stack analysed");
        assert_eq!((flat_trend.verdict, flat_trend.suspected), (Verdict::Flat, false));
        let growing = &heap.stacks[1];
        assert!(growing.function.contains("growing_site"), "{growing:?}");
        let trend = growing.trend.expect("growing stack analysed");
        assert_eq!((trend.verdict, trend.suspected), (Verdict::SteadyGrowth, true));
        assert!((trend.growth_bytes_per_second - 20_000.0).abs() < 1e-6, "{trend:?}");
        // Stack series are analysed but are not views of their own.
        assert_eq!(last.len(), 2, "rss and heap only");
        assert_eq!(m.frames.len(), 2, "the process's two stacks are cached");
        // The process is gone: its symbolized stacks go with it, not at the bound.
        m.tick(20.0, &[proc(pid + 1, "svc", 20_000_000)], Some(&[]), &stack);
        assert!(m.frames.is_empty(), "{:?}", m.frames.keys());
    }
}

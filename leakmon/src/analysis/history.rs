//! Sample history per series and the verdict of each.
//!
//! A series is one signal (resident memory, or live heap bytes when probes are
//! attached) of one identity: the service and command, never the pid, so a service that
//! is restarted keeps one history and its growth stays visible. Each of a group's top
//! allocation stacks has a heap series of its own, so the stack that grows is told
//! apart from the large one that does not. Each series keeps the
//! samples of one window; the number of series is capped and what the cap turns away
//! is counted.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use super::trend::{analyse, Analysis, Params, Sample, Verdict};

/// What a series measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Memory the kernel cannot drop: anonymous resident plus swapped out (tier 0,
    /// every process). Not `VmRSS`: a process reading a file through mmap grows that
    /// with cache the kernel may reclaim at will, and a leak under memory pressure
    /// moves to swap, where `VmRSS` stops seeing it.
    Anon,
    /// Resident shared memory (tmpfs, shm segments, memfd), judged on its own.
    Shmem,
    /// Bytes allocated and not freed (allocator probes).
    Heap,
}

impl Signal {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Anon => "anon",
            Self::Shmem => "shmem",
            Self::Heap => "heap",
        }
    }
}

/// A series' identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SeriesKey {
    pub service: String,
    pub comm: String,
    /// Only with per-process series (`--metrics.pid-label`).
    pub pid: Option<u32>,
    pub signal: Signal,
    /// One allocation stack's heap series: the stack's stable hash.
    pub stack: Option<String>,
}

/// One series: its window of samples and its latest verdict.
#[derive(Clone, Debug, Default)]
pub struct Series {
    samples: VecDeque<Sample>,
    /// A stack's series: the mean age of its unfreed blocks at each sample, where the
    /// source keeps ages.
    ages: VecDeque<Sample>,
    analysis: Option<Analysis>,
    /// Time the current suspicion started.
    suspected_since: Option<f64>,
    /// Its data is incomplete (sticky): the verdict is withheld.
    incomplete: bool,
}

impl Series {
    pub fn latest(&self) -> Option<Sample> {
        self.samples.back().copied()
    }

    pub fn analysis(&self) -> Option<Analysis> {
        self.analysis
    }

    pub fn incomplete(&self) -> bool {
        self.incomplete
    }

    pub fn suspected_since(&self) -> Option<f64> {
        self.suspected_since
    }

    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }
}

/// Every series, capped.
#[derive(Debug)]
pub struct History {
    params: Params,
    max_series: usize,
    series: BTreeMap<SeriesKey, Series>,
    dropped: u64,
}

/// Seconds a growing stack's mean block age must gain per second of the window: a
/// leak's blocks stay, so their mean age grows with the clock (by half a second a
/// second for a steady leak), while a ring's or a cache's, replaced in turn, never
/// grows older than one turnover however its sampled bytes wander.
pub const MIN_AGE_GROWTH: f64 = 0.1;

/// Whether a stack's blocks age with the clock in the later half of the window; true
/// where the ages are unknown or too few to say (the bytes alone decide then).
///
/// The later half: when attribution began (the agent loaded, a suspect's turn), every
/// stack's estimate ramps up from nothing for one lifetime of its blocks, and its mean
/// age with it, a ring's as a leak's: no figure tells them apart until the ring's
/// first turnover. After it, the ring's ages stop growing and a leak's do not; over
/// the whole window the ramp's rise would still count.
fn ages_grow(ages: &VecDeque<Sample>, params: &Params) -> bool {
    let Some(last) = ages.back() else { return true };
    let later: Vec<Sample> = ages.iter().copied().filter(|s| s.t >= last.t - params.window / 2.0).collect();
    if later.len() < params.min_samples / 2 {
        return true;
    }
    super::trend::theil_sen(&later).is_none_or(|slope| slope >= MIN_AGE_GROWTH)
}

/// A change of verdict worth telling.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Suspected(SeriesKey, Analysis),
    Cleared(SeriesKey, Verdict),
}

impl History {
    pub fn new(params: Params, max_series: usize) -> Self {
        Self { params, max_series, series: BTreeMap::new(), dropped: 0 }
    }

    /// New settings; the samples are kept (a shorter window trims them at the next
    /// sample, a longer one fills up from now on).
    pub fn reconfigure(&mut self, params: Params, max_series: usize) {
        self.params = params;
        self.max_series = max_series;
    }

    /// Adds one sample; a new series beyond the cap is turned away and counted.
    pub fn record(&mut self, key: SeriesKey, t: f64, v: f64) {
        let window = self.params.window;
        let len = self.series.len();
        let series = match self.series.get_mut(&key) {
            Some(s) => s,
            None if len >= self.max_series => {
                self.dropped += 1;
                return;
            }
            None => self.series.entry(key).or_default(),
        };
        series.samples.push_back(Sample { t, v });
        while series.samples.front().is_some_and(|s| s.t < t - window) {
            series.samples.pop_front();
        }
    }

    /// Adds the mean age of a stack series' blocks at `t` (after its [`History::record`]).
    pub fn record_age(&mut self, key: &SeriesKey, t: f64, age: f64) {
        let window = self.params.window;
        if let Some(series) = self.series.get_mut(key) {
            series.ages.push_back(Sample { t, v: age });
            while series.ages.front().is_some_and(|s| s.t < t - window) {
                series.ages.pop_front();
            }
        }
    }

    /// Marks a series' data incomplete: from now on its verdict is withheld.
    pub fn mark_incomplete(&mut self, key: &SeriesKey) {
        if let Some(series) = self.series.get_mut(key) {
            series.incomplete = true;
        }
    }

    /// Re-analyses every series at time `now`; series without a sample for a whole
    /// window (every process of it gone) are dropped. Returns the changes of suspicion.
    pub fn analyse(&mut self, now: f64) -> Vec<Change> {
        let window = self.params.window;
        self.series.retain(|_, s| s.latest().is_some_and(|l| l.t >= now - window));
        let mut changes = Vec::new();
        for (key, series) in &mut self.series {
            let samples: Vec<Sample> = series.samples.iter().copied().collect();
            let mut a = analyse(&samples, &self.params);
            if a.verdict == Verdict::SteadyGrowth && !ages_grow(&series.ages, &self.params) {
                a.verdict = Verdict::Flat;
            }
            if series.incomplete {
                a.verdict = Verdict::Withheld;
            }
            let was = series.suspected_since.is_some();
            if a.verdict.suspected() && !was {
                series.suspected_since = Some(now);
                changes.push(Change::Suspected(key.clone(), a));
            } else if !a.verdict.suspected() && was && a.verdict != Verdict::Insufficient {
                series.suspected_since = None;
                changes.push(Change::Cleared(key.clone(), a.verdict));
            }
            series.analysis = Some(a);
        }
        changes
    }

    /// The window in seconds.
    pub fn window(&self) -> f64 {
        self.params.window
    }

    pub fn get(&self, key: &SeriesKey) -> Option<&Series> {
        self.series.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&SeriesKey, &Series)> {
        self.series.iter()
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// New series turned away by the cap, in all.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(comm: &str) -> SeriesKey {
        SeriesKey { service: "svc".into(), comm: comm.into(), pid: None, signal: Signal::Anon, stack: None }
    }

    fn params() -> Params {
        Params { window: 10.0, min_samples: 5, ..Params::default() }
    }

    #[test]
    fn keeps_one_window_and_caps_series() {
        let mut h = History::new(params(), 2);
        for i in 0..100 {
            h.record(key("a"), f64::from(i), 1.0);
        }
        h.record(key("b"), 99.0, 1.0);
        h.record(key("c"), 99.0, 1.0);
        assert_eq!(h.len(), 2);
        assert_eq!(h.dropped(), 1);
        let a = h.iter().next().expect("a").1;
        assert_eq!(a.samples().count(), 11, "samples within [89, 99]");
    }

    #[test]
    fn suspicion_rises_and_clears_once_growth_stops() {
        let mut h = History::new(params(), 10);
        let mut changes = Vec::new();
        let mut v = 1e6;
        for i in 0..80 {
            let t = f64::from(i) * 0.5;
            if t < 20.0 {
                v += 100_000.0;
            }
            h.record(key("leaky"), t, v);
            changes.extend(h.analyse(t).into_iter().map(|c| (t, c)));
        }
        assert_eq!(changes.len(), 2, "{changes:?}");
        let (t_on, on) = &changes[0];
        assert!(matches!(on, Change::Suspected(k, _) if k.comm == "leaky"));
        assert!(*t_on <= 10.0, "flagged once the window is covered, at {t_on}");
        let (t_off, off) = &changes[1];
        assert!(matches!(off, Change::Cleared(_, v) if *v != Verdict::SteadyGrowth));
        assert!(
            *t_off > 20.0 && *t_off <= 32.0,
            "cleared within a window after the leak stopped, at {t_off}"
        );
    }

    #[test]
    fn incomplete_data_withholds_the_verdict_and_clears_a_suspicion() {
        let mut h = History::new(params(), 10);
        let mut changes = Vec::new();
        for i in 0..80 {
            let t = f64::from(i) * 0.5;
            h.record(key("leaky"), t, 1e6 + 100_000.0 * f64::from(i));
            if t >= 20.0 {
                h.mark_incomplete(&key("leaky"));
            }
            changes.extend(h.analyse(t).into_iter().map(|c| (t, c)));
        }
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(matches!(changes[0].1, Change::Suspected(..)));
        assert!(matches!(changes[1], (20.0, Change::Cleared(_, Verdict::Withheld))), "{changes:?}");
        let series = h.get(&key("leaky")).expect("series");
        assert!(series.incomplete());
        assert_eq!(series.analysis().expect("analysed").verdict, Verdict::Withheld);
    }

    /// The same growing bytes, twice: blocks that age with the clock (a leak) are
    /// flagged; blocks whose mean age stays at a few seconds (a ring replaced in turn,
    /// its sampled estimate wandering up) are not.
    #[test]
    fn a_growing_stack_is_a_leak_only_if_its_blocks_age_with_the_clock() {
        let mut h = History::new(params(), 10);
        let stack = |name: &str| SeriesKey { signal: Signal::Heap, stack: Some(name.into()), ..key("svc") };
        for i in 0..40 {
            let t = f64::from(i) * 0.5;
            for name in ["leak", "ring"] {
                h.record(stack(name), t, 1e6 + 100_000.0 * f64::from(i));
            }
            h.record_age(&stack("leak"), t, t / 2.0);
            h.record_age(&stack("ring"), t, 5.0 + 0.3 * (f64::from(i) * 0.7).sin());
            h.analyse(t);
        }
        let verdict = |name: &str| h.get(&stack(name)).and_then(Series::analysis).expect("analysed").verdict;
        assert_eq!(verdict("leak"), Verdict::SteadyGrowth);
        assert_eq!(verdict("ring"), Verdict::Flat);
    }

    /// Attribution begins: a ring of 4 s lifetimes ramps up for its first turnover,
    /// its mean age with it, exactly as a leak's, then holds, while its sampled bytes
    /// wander up still. From the first verdict on (8 s, the coverage a verdict needs),
    /// the whole window's ages still rise with the ramp; the later half's do not, and
    /// the ring is never flagged, while the leak (ages growing throughout) is.
    #[test]
    fn the_ramp_after_attribution_begins_is_not_growth() {
        let mut h = History::new(params(), 10);
        let stack = |name: &str| SeriesKey { signal: Signal::Heap, stack: Some(name.into()), ..key("svc") };
        let mut flagged = Vec::new();
        for i in 0..40 {
            let t = f64::from(i) * 0.5;
            for name in ["leak", "ring"] {
                h.record(stack(name), t, 1e6 + 100_000.0 * f64::from(i));
            }
            h.record_age(&stack("leak"), t, t / 2.0);
            h.record_age(&stack("ring"), t, t.min(4.0) / 2.0 + 0.05 * (f64::from(i) * 0.7).sin());
            for change in h.analyse(t) {
                if let Change::Suspected(key, _) = change {
                    flagged.push((key.stack.unwrap_or_default(), t));
                }
            }
        }
        assert_eq!(flagged, [("leak".to_owned(), 8.0)]);
    }

    #[test]
    fn series_of_gone_processes_expire_after_a_window() {
        let mut h = History::new(params(), 10);
        h.record(key("gone"), 0.0, 1.0);
        h.analyse(5.0);
        assert_eq!(h.len(), 1);
        h.analyse(10.5);
        assert!(h.is_empty());
    }
}

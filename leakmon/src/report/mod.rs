//! Reports of unfreed memory for people (table) and programs (JSON).
//!
//! In: grouped totals from the store, what is known of each process (name, mappings),
//! a stack lookup and the symbolizer. Out: a [`Report`], rendered by [`table`] or
//! serialized as JSON with the documented shape.

pub mod flamegraph;
pub mod folded;
pub mod pprof;
pub mod runtime;
pub mod table;

use std::{collections::HashMap, path::PathBuf};

use serde::Serialize;

use crate::{
    analysis::uncertainty::{Spread, FEW_SAMPLES},
    model::{FrameReport, Method},
    probes::targets::Allocator,
    procfs::Mapping,
    runtimes,
    store::ProcessTotals,
    symbolize::Symbolizer,
};

/// A byte count as `--sample-bytes` takes it, rounded down to whole KiB past one.
fn flag_bytes(bytes: u64) -> String {
    match bytes {
        0..1024 => bytes.max(1).to_string(),
        _ => format!("{}KiB", bytes / 1024),
    }
}

/// The stacks of a process a note on few samples looks at: those a reader sees first.
const TOP_STACKS: usize = 5;

/// What is known of a process beyond its totals.
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    pub comm: String,
    /// Mappings captured while the process lived (at its exit, or now).
    pub maps: Vec<Mapping>,
    /// `/proc/PID/root` while the process lives.
    pub root: Option<PathBuf>,
    /// Deleted binaries held open (their mappings name `/proc/self/fd/N`).
    pub held: Vec<std::sync::Arc<std::fs::File>>,
    /// A table was full for this process: its figures are lower bounds.
    pub incomplete: bool,
    /// The allocator its `malloc` calls reach.
    pub allocator: Option<Allocator>,
    /// Its runtime whose frames the kernel walked, with what naming them needs read
    /// while it lived (see [`crate::runtimes::held_at_exit`]); looked up through
    /// `root` when absent.
    pub walked: Option<std::sync::Arc<dyn crate::runtimes::WalkedProcess>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// How allocations were seen: `uprobes` (the kernel traps every allocator call)
    /// or `agent` (leakmon's agent in the process samples, the kernel sees samples).
    pub method: Method,
    /// The byte-weighted sampling interval (at the end, where it was paced); 0 for
    /// exact figures.
    pub sample_bytes: u64,
    /// Whether the agent's interval followed the process's allocation rate (no
    /// --sample-bytes given; see [`crate::agent::pace`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub paced: bool,
    pub processes: Vec<ProcessReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    pub comm: String,
    /// glibc, musl, jemalloc, tcmalloc, mimalloc or other; null when unknown.
    pub allocator: Option<Allocator>,
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    /// Sampled figures only: the blocks sampled, and the 90% interval of
    /// `outstanding_bytes` (see [`crate::analysis::uncertainty`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_interval: Option<[u64; 2]>,
    /// Some allocations could not be counted (a table was full).
    pub incomplete: bool,
    pub stacks: Vec<StackReport>,
    /// What the runtime keeps for itself by design (see `suppressions`), set apart:
    /// not in the totals above nor in `stacks`.
    pub runtime_internal: RuntimeInternal,
    /// Blocks still in flight when a running process's window ended (younger than
    /// `store::live::IN_FLIGHT_MS`), set apart: not in the totals above nor in
    /// `stacks`. Absent for a process that exited, and when none was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlight>,
    /// How long a holders scan held the process still, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
    /// What the holders scan covered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holders_scan: Option<crate::holders::names::ScanSummary>,
    /// A runtime's objects of the window still alive at its end, by what holds them
    /// (the variable and the path from it), largest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<crate::runtimes::held_by::Holder>,
    /// `python` for a CPython process; absent for others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<&'static str>,
    /// What the figures leave out, a sentence each (see [`Report::add_notes`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl ProcessReport {
    /// What holds the process's objects, as its runtime's method `found` it: the
    /// holders, the pause (ms, to the microsecond) and how they were found, as a note.
    pub fn set_holders(&mut self, found: crate::runtimes::held_by::Found) {
        self.pause_ms = Some((found.pause.as_secs_f64() * 1e6).round() / 1e3);
        self.holders = found.holders;
        self.notes.push(found.how);
    }

    /// The process's interval: the sum of its stacks' spreads (none for exact figures).
    pub fn settle_interval(&mut self) {
        let mut sum: Option<Spread> = None;
        for spread in self.stacks.iter().filter_map(|s| s.spread) {
            *sum.get_or_insert_with(Spread::default) += spread;
        }
        self.samples = sum.map(|s| s.samples);
        self.bytes_interval = sum.map(|s| s.interval());
    }
}

/// Blocks set apart as in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct InFlight {
    pub bytes: u64,
    pub allocations: u64,
    /// The age under which a block counted as in flight.
    pub younger_than_seconds: f64,
}

/// Bytes set apart as the runtime's own, and the functions that named them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RuntimeInternal {
    pub bytes: u64,
    pub allocations: u64,
    pub functions: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StackReport {
    /// Stable id: the same call path of the same build has it everywhere (see
    /// `symbolize::stable_id`); the `stack` label of the metrics.
    pub id: String,
    pub bytes: u64,
    pub allocations: u64,
    /// Sampled figures only: the blocks sampled, and the 90% interval of `bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_interval: Option<[u64; 2]>,
    /// What the interval is made of, summed into the process's.
    #[serde(skip)]
    pub spread: Option<Spread>,
    pub mean_age_seconds: f64,
    /// The allocation site: the first frame outside the allocation wrappers (the
    /// innermost frame when none is a wrapper); null without a stack.
    pub site: Option<FrameReport>,
    /// Innermost first, wrappers included.
    pub frames: Vec<FrameReport>,
    /// After a holders scan: whether its blocks are lost or held, and by what.
    #[serde(flatten)]
    pub held: crate::holders::names::StackHeld,
    /// The kernel's id of the stack (0 where none): what a scan's findings are keyed by.
    #[serde(skip)]
    pub key: u64,
}

impl Report {
    /// Builds the report. `stack` looks up a stack id's addresses; processes without
    /// info keep their pid with an empty name and unresolved frames. `spreads` holds,
    /// for sampled figures, the spread of each (process, stack id).
    pub fn build(
        totals: Vec<ProcessTotals>,
        info: &HashMap<u32, ProcessInfo>,
        stack: impl Fn(u64) -> Option<Vec<u64>>,
        spreads: &HashMap<(u32, u64), Spread>,
        symbolizer: &Symbolizer,
        now_ms: u64,
    ) -> Self {
        let empty = ProcessInfo::default();
        let processes = totals
            .into_iter()
            .map(|p| {
                let pinfo = info.get(&p.pid).unwrap_or(&empty);
                let stacks = p
                    .stacks
                    .iter()
                    .map(|s| {
                        let frames = stack(s.stack_id)
                            .map(|ips| {
                                symbolizer.frames_with(
                                    p.pid,
                                    &pinfo.maps,
                                    pinfo.root.as_deref(),
                                    pinfo.walked.clone(),
                                    &ips,
                                )
                            })
                            .unwrap_or_default();
                        let site = frames.get(symbolizer.site(&frames)).cloned().map(FrameReport::from);
                        let spread = spreads.get(&(p.pid, s.stack_id)).copied();
                        StackReport {
                            held: Default::default(),
                            key: s.stack_id,
                            id: crate::symbolize::stable_id(&frames),
                            bytes: s.bytes,
                            allocations: s.allocations,
                            samples: spread.map(|s| s.samples),
                            bytes_interval: spread.map(|s| s.interval()),
                            spread,
                            mean_age_seconds: s.mean_age_seconds(now_ms),
                            site,
                            frames: frames.into_iter().map(FrameReport::from).collect(),
                        }
                    })
                    .collect();
                let mut report = ProcessReport {
                    pause_ms: None,
                    holders_scan: None,
                    holders: Vec::new(),
                    pid: p.pid,
                    comm: pinfo.comm.clone(),
                    allocator: pinfo.allocator,
                    outstanding_bytes: p.bytes,
                    outstanding_allocations: p.allocations,
                    samples: None,
                    bytes_interval: None,
                    incomplete: pinfo.incomplete,
                    stacks,
                    runtime_internal: RuntimeInternal::default(),
                    in_flight: None,
                    runtime: runtimes::running(&pinfo.maps),
                    notes: Vec::new(),
                };
                report.settle_interval();
                report
            })
            .collect();
        Self { method: Method::default(), sample_bytes: 0, paced: false, processes }
    }

    /// Puts each process's blocks in flight (taken out of its figures) on their line.
    pub fn set_in_flight(&mut self, in_flight: &HashMap<u32, crate::store::live::InFlight>) {
        for p in &mut self.processes {
            p.in_flight = in_flight.get(&p.pid).filter(|f| f.allocations > 0).map(|f| InFlight {
                bytes: f.bytes,
                allocations: f.allocations,
                younger_than_seconds: crate::store::live::IN_FLIGHT_MS as f64 / 1000.0,
            });
        }
    }

    /// Says, per process, what its figures cannot hold in this report's method, and
    /// when its largest sampled stack rests on too few samples to be read closely.
    pub fn add_notes(&mut self) {
        for p in &mut self.processes {
            if p.stacks.is_empty() && self.method == Method::Runtime {
                p.notes.push(
                    "the runtime's profiler sampled no object still held in this window: what a slow leak keeps takes a longer --duration to reach a sample"
                        .to_owned(),
                );
            } else if p.stacks.is_empty() && self.sample_bytes > 0 {
                p.notes.push(format!(
                    "no block still held was sampled: at one sample per {} allocated, up to about {} left unfreed goes unseen (90%); a longer window, or a smaller --sample-bytes, sees more",
                    table::rounded(self.sample_bytes),
                    table::rounded(self.sample_bytes.saturating_mul(3))
                ));
            }
            if let Some(note) = few_samples_note(self.method, self.sample_bytes, self.paced, p) {
                p.notes.push(note);
            }
            if let Some(note) = p.runtime.and_then(runtimes::by_name).and_then(|r| r.note(self.method)) {
                p.notes.push(note.to_owned());
            }
            if let Some(note) = reused_note(p, self.method) {
                p.notes.push(note);
            }
        }
    }

    /// Adds processes that were watched but left nothing unfreed, so a clean run
    /// says "0 bytes" instead of saying nothing.
    pub fn include_clean(&mut self, watched: &HashMap<u32, ProcessInfo>) {
        for (&pid, info) in watched {
            if !self.processes.iter().any(|p| p.pid == pid) {
                self.processes.push(ProcessReport {
                    pause_ms: None,
                    holders_scan: None,
                    holders: Vec::new(),
                    pid,
                    comm: info.comm.clone(),
                    allocator: info.allocator,
                    outstanding_bytes: 0,
                    outstanding_allocations: 0,
                    samples: None,
                    bytes_interval: None,
                    incomplete: info.incomplete,
                    stacks: Vec::new(),
                    runtime_internal: RuntimeInternal::default(),
                    in_flight: None,
                    runtime: runtimes::running(&info.maps),
                    notes: Vec::new(),
                });
            }
        }
        self.processes.sort_by(|a, b| b.outstanding_bytes.cmp(&a.outstanding_bytes).then(a.pid.cmp(&b.pid)));
    }

    /// Moves the stacks with a suppressed frame out of each process's table and totals
    /// into its `runtime_internal` line.
    pub fn set_apart(&mut self, suppressions: &crate::suppressions::Suppressions) {
        for p in &mut self.processes {
            let mut kept = Vec::with_capacity(p.stacks.len());
            for s in std::mem::take(&mut p.stacks) {
                let Some(function) = suppressions.matching(s.frames.iter().map(|f| f.function.as_str()))
                else {
                    kept.push(s);
                    continue;
                };
                let internal = &mut p.runtime_internal;
                if !internal.functions.iter().any(|f| f == function) {
                    internal.functions.push(function.to_owned());
                }
                internal.bytes += s.bytes;
                internal.allocations += s.allocations;
                p.outstanding_bytes -= s.bytes.min(p.outstanding_bytes);
                p.outstanding_allocations -= s.allocations.min(p.outstanding_allocations);
            }
            p.stacks = kept;
            p.settle_interval();
        }
        self.processes.sort_by(|a, b| b.outstanding_bytes.cmp(&a.outstanding_bytes).then(a.pid.cmp(&b.pid)));
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }
}

/// When `p`'s top stacks are estimated from few samples (a block sampled for
/// certain is exact, however few): how rough, and what gives enough, in a report by
/// `method` at `sample_bytes` (`paced`: the agent's, at the end).
fn few_samples_note(method: Method, sample_bytes: u64, paced: bool, p: &ProcessReport) -> Option<String> {
    let top = p.stacks.iter().take(TOP_STACKS).filter_map(|s| s.spread);
    let rough: Vec<Spread> = top.filter(|s| s.uncertain > 0 && s.samples < FEW_SAMPLES).collect();
    let widest = rough.iter().map(Spread::relative_width).max_by(f64::total_cmp)?;
    // Samples grow with the window and with the inverse of the interval: what
    // brings the fewest up to the bar.
    let fewest = rough.iter().map(|s| s.samples).min().unwrap_or(1).max(1);
    let factor = FEW_SAMPLES.div_ceil(fewest);
    let own_interval = method == Method::Runtime
        && p.runtime.and_then(runtimes::by_name).is_some_and(|r| r.sets_its_own_interval());
    let or_interval = if own_interval {
        String::new()
    } else {
        format!(
            ", or --sample-bytes {} ({} {}),",
            flag_bytes(sample_bytes / factor),
            if paced { "paced to" } else { "now" },
            table::rounded(sample_bytes)
        )
    };
    Some(format!(
        "{} of its top {TOP_STACKS} stacks rest{} on fewer than {FEW_SAMPLES} samples (±{:.0}% at worst): a window {factor}× as long{or_interval} gives each {FEW_SAMPLES} or more",
        rough.len(),
        if rough.len() == 1 { "s" } else { "" },
        100.0 * widest,
    ))
}

/// Where sampled top stacks of `p` make objects its runtime hands out again from a
/// cache of its own (CPython's free lists): what their figures may hold of other code's.
fn reused_note(p: &ProcessReport, method: Method) -> Option<String> {
    let runtime = p.runtime.and_then(runtimes::by_name)?;
    if method == Method::Uprobes {
        return None;
    }
    let mut kinds: Vec<&str> = Vec::new();
    let mut sites: Vec<&str> = Vec::new();
    let mut stacks = 0;
    for s in p.stacks.iter().take(TOP_STACKS) {
        // The native frames under the first of the runtime's own code.
        let functions: Vec<&str> =
            s.frames.iter().take_while(|f| f.runtime.is_none()).map(|f| f.function.as_str()).collect();
        if let Some(kind) = runtime.reused_kind(&functions) {
            stacks += 1;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
            let site = s.site.as_ref().map_or("?", |f| f.function.as_str());
            if !sites.contains(&site) {
                sites.push(site);
            }
        }
    }
    (stacks > 0).then(|| {
        format!(
            "{stacks} of its top {TOP_STACKS} stacks ({}) make {}, which {} hands out again from its free lists without calling its allocator: a block sampled when such a stack made an object may since hold one that other code took from the list, so part of their bytes may be other code's",
            sites.join(", "),
            kinds.join(" and "),
            runtime.title()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StackTotals;

    #[test]
    fn json_has_the_documented_shape() {
        let totals = vec![ProcessTotals {
            pid: 7,
            gen: 0,
            bytes: 48_000,
            allocations: 1000,
            stacks: vec![StackTotals {
                stack_id: 3,
                bytes: 48_000,
                allocations: 1000,
                ts_ms_sum: 1000 * 500,
            }],
            named: None,
        }];
        let info = HashMap::from([(7, ProcessInfo { comm: "fixture".into(), ..ProcessInfo::default() })]);
        let mut report = Report::build(
            totals,
            &info,
            |_| Some(vec![0x1234]),
            &HashMap::new(),
            &Symbolizer::default(),
            2500,
        );
        report.include_clean(&HashMap::from([(
            8,
            ProcessInfo { comm: "child".into(), ..ProcessInfo::default() },
        )]));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("valid JSON");
        let p = &json["processes"][0];
        assert_eq!(p["pid"], 7);
        assert_eq!(p["comm"], "fixture");
        assert_eq!(p["outstanding_bytes"], 48_000);
        assert_eq!(p["outstanding_allocations"], 1000);
        assert_eq!(p["stacks"][0]["bytes"], 48_000);
        assert_eq!(p["stacks"][0]["allocations"], 1000);
        assert_eq!(p["stacks"][0]["mean_age_seconds"], 2.0);
        // No mapping covers 0x1234: the stack ends there, no garbage frame.
        assert_eq!(p["stacks"][0]["frames"].as_array().map(Vec::len), Some(0));
        assert_eq!(json["processes"][1]["pid"], 8);
        assert_eq!(json["processes"][1]["outstanding_bytes"], 0);
    }

    /// Sampled figures say how sure they are: a top stack from three samples gets one
    /// line saying so and what would give more; a window that sampled nothing says
    /// what it could not see, by the allocator and by a runtime's profiler alike.
    #[test]
    fn rough_or_empty_sampled_figures_say_so() {
        let stack = |samples: u64| StackReport {
            held: Default::default(),
            key: 0,
            id: "1".into(),
            bytes: samples * 16384,
            allocations: samples,
            samples: Some(samples),
            bytes_interval: None,
            spread: Some(Spread::counted(samples * 16384, samples)),
            mean_age_seconds: 1.0,
            site: None,
            frames: Vec::new(),
        };
        let process = |stacks: Vec<StackReport>| ProcessReport {
            pause_ms: None,
            holders_scan: None,
            holders: Vec::new(),
            pid: 1,
            comm: "x".into(),
            allocator: None,
            outstanding_bytes: 0,
            outstanding_allocations: 0,
            samples: None,
            bytes_interval: None,
            incomplete: false,
            stacks,
            runtime_internal: RuntimeInternal::default(),
            in_flight: None,
            runtime: None,
            notes: Vec::new(),
        };
        let mut report = Report {
            method: Method::Agent,
            sample_bytes: 16384,
            paced: false,
            processes: vec![process(vec![stack(3), stack(200)]), process(Vec::new())],
        };
        report.add_notes();
        assert_eq!(
            report.processes[0].notes,
            ["1 of its top 5 stacks rests on fewer than 10 samples (±158% at worst): a window 4× as long, or --sample-bytes 4KiB (now 16.0 KiB), gives each 10 or more"]
        );
        assert!(
            report.processes[1].notes[0].starts_with(
                "no block still held was sampled: at one sample per 16.0 KiB allocated, up to about 48.0 KiB"
            ),
            "{:?}",
            report.processes[1].notes
        );
        let mut runtime = Report {
            method: Method::Runtime,
            sample_bytes: 16384,
            paced: false,
            processes: vec![process(Vec::new())],
        };
        runtime.add_notes();
        assert!(
            runtime.processes[0].notes[0].starts_with("the runtime's profiler sampled no object still held"),
            "{:?}",
            runtime.processes[0].notes
        );
        // JFR sets its own interval: only a longer window is offered.
        let mut jvm = Report {
            method: Method::Runtime,
            sample_bytes: 2 << 20,
            paced: false,
            processes: vec![ProcessReport { runtime: Some("jvm"), ..process(vec![stack(3)]) }],
        };
        jvm.add_notes();
        assert_eq!(
            jvm.processes[0].notes,
            ["1 of its top 5 stacks rests on fewer than 10 samples (±158% at worst): a window 4× as long gives each 10 or more"]
        );
    }

    /// A sampled Python stack that makes tuples (CPython's free lists hand them out
    /// again unseen) gets a note naming its site; one that makes strings does not.
    #[test]
    fn python_stacks_of_free_listed_objects_say_so() {
        let frame = |function: &str, runtime: Option<&str>| FrameReport {
            function: function.into(),
            file: None,
            line: None,
            address: String::new(),
            runtime: runtime.map(str::to_owned),
        };
        let stack = |constructor: &str, site: &str| StackReport {
            held: Default::default(),
            key: 0,
            id: site.into(),
            bytes: 1 << 20,
            allocations: 40,
            samples: Some(40),
            bytes_interval: None,
            spread: Some(Spread::counted(1 << 20, 40)),
            mean_age_seconds: 8.0,
            site: Some(frame(site, Some("python"))),
            frames: vec![
                frame("_PyObject_GC_NewVar", None),
                frame(constructor, None),
                frame(site, Some("python")),
            ],
        };
        let process = ProcessReport {
            pause_ms: None,
            holders_scan: None,
            holders: Vec::new(),
            pid: 1,
            comm: "python3".into(),
            allocator: None,
            outstanding_bytes: 2 << 20,
            outstanding_allocations: 80,
            samples: Some(80),
            bytes_interval: None,
            incomplete: false,
            stacks: vec![stack("PyUnicode_New", "make_entry"), stack("PyTuple_New", "handle")],
            runtime_internal: RuntimeInternal::default(),
            in_flight: None,
            runtime: Some("python"),
            notes: Vec::new(),
        };
        let mut report =
            Report { method: Method::Agent, sample_bytes: 16384, paced: true, processes: vec![process] };
        report.add_notes();
        assert_eq!(
            report.processes[0].notes,
            ["1 of its top 5 stacks (handle) make tuples, which CPython hands out again from its free lists without calling its allocator: a block sampled when such a stack made an object may since hold one that other code took from the list, so part of their bytes may be other code's"]
        );
        report.processes[0].stacks.pop();
        report.processes[0].notes.clear();
        report.add_notes();
        assert!(report.processes[0].notes.is_empty(), "{:?}", report.processes[0].notes);
    }

    #[test]
    fn frames_render_hex_addresses_and_unknown_names() {
        use crate::model::Frame;
        let f =
            FrameReport::from(Frame { address: 0x7f00_dead_beef, file_offset: 0xdead, ..Frame::default() });
        assert_eq!(f.address, "0xdead");
        assert_eq!(f.function, "??");
        assert_eq!(f.file, None);
    }
}

//! A report of what a runtime's own sampling heap profiler (V8's, JFR's) says is still
//! held, for `report --runtime`, and its stacks as reports and the daemon's series show
//! them.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{ProcessReport, Report, RuntimeInternal, StackReport};
use crate::{
    analysis::uncertainty::Spread,
    model::{FrameReport, Method},
    runtimes::{detect, runtime_site, with_profiler, Options, Stack},
};

/// Samples `pid`'s runtime heap for `window` and reports what is still held, every
/// `sample_bytes` (0: none given, paced where the runtime's interval can be).
pub fn report(
    pid: u32,
    sample_bytes: u64,
    window: Duration,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<Report> {
    let comm = crate::procfs::ProcRoot::default().comm(pid).unwrap_or_default();
    let Some(runtime) = detect(pid)? else {
        bail!(
            "pid {pid} ({comm}) is neither {}: --runtime asks those runtimes' own profilers; leave it out to watch its allocator",
            crate::runtimes::with_profilers()
        );
    };
    // Past the window, a JVM stops the recording itself.
    let interval = crate::values::Interval::from_option(sample_bytes);
    let options = Options { interval, lifetime: window + Duration::from_secs(120), histograms: true };
    let (stacks, notes, used, in_flight) = with_profiler(pid, runtime, options, |profiler| {
        let deadline = Instant::now() + window;
        while Instant::now() < deadline && !stop() {
            std::thread::sleep(
                Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())),
            );
        }
        let stacks = profiler.snapshot()?;
        let notes = profiler.notes(&stacks);
        Ok((stacks, notes, profiler.interval(), profiler.in_flight()))
    })?;
    let stacks: Vec<StackReport> = stacks.iter().map(|s| stack_report(s, runtime.name())).collect();
    let mut process = ProcessReport {
        pause_ms: None,
        holders_scan: None,
        holders: Vec::new(),
        pid,
        comm,
        allocator: None,
        outstanding_bytes: stacks.iter().map(|s| s.bytes).sum(),
        outstanding_allocations: stacks.iter().map(|s| s.allocations).sum(),
        samples: None,
        bytes_interval: None,
        incomplete: false,
        stacks,
        runtime_internal: RuntimeInternal::default(),
        in_flight: in_flight.map(|(bytes, allocations)| super::InFlight {
            bytes,
            allocations,
            younger_than_seconds: crate::store::live::IN_FLIGHT_MS as f64 / 1000.0,
        }),
        runtime: Some(runtime.name()),
        notes,
    };
    process.settle_interval();
    // Where the runtime set its interval (JFR), or leakmon paced it (V8), the notes
    // speak of that one.
    let sample_bytes = used.unwrap_or(interval.start());
    let paced = interval.paced() && !runtime.support().sets_its_own_interval();
    let mut report = Report { method: Method::Runtime, sample_bytes, paced, processes: vec![process] };
    report.add_notes();
    Ok(report)
}

/// A stack as reports and the daemon's series show it.
pub fn stack_report(stack: &Stack, runtime: &str) -> StackReport {
    let frames: Vec<FrameReport> = stack
        .frames
        .iter()
        .map(|f| FrameReport {
            function: f.function.clone(),
            file: (!f.file.is_empty()).then(|| f.file.clone()),
            line: (f.line > 0).then_some(f.line),
            // No machine address: one that names the place, for profile readers.
            address: format!(
                "0x{}",
                crate::model::stable_hash([
                    f.file.as_bytes(),
                    f.function.as_bytes(),
                    &f.line.to_le_bytes(),
                    &f.column.to_le_bytes()
                ])
            ),
            runtime: Some(runtime.to_owned()),
        })
        .collect();
    let spread = Spread::counted(stack.bytes, stack.samples);
    StackReport {
        held: Default::default(),
        key: 0,
        id: crate::model::stable_hash(frames.iter().map(|f| format!("{}@{}", f.function, f.address))),
        bytes: stack.bytes,
        allocations: stack.samples,
        samples: Some(spread.samples),
        bytes_interval: Some(spread.interval()),
        spread: Some(spread),
        mean_age_seconds: 0.0,
        site: frames.get(runtime_site(frames.iter().map(FrameReport::site_frame)).unwrap_or(0)).cloned(),
        frames,
    }
}

/// A report of what holds the objects a runtime's window left alive (`report --holders`
/// on a Node.js process).
pub fn holders_report(
    pid: u32,
    runtime: &'static str,
    found: crate::runtimes::node::holders::Found,
) -> Report {
    let comm = crate::procfs::ProcRoot::default().comm(pid).unwrap_or_default();
    let mut process = ProcessReport {
        pause_ms: None,
        holders_scan: None,
        holders: Vec::new(),
        pid,
        comm,
        allocator: None,
        outstanding_bytes: found.bytes,
        outstanding_allocations: found.objects,
        samples: None,
        bytes_interval: None,
        incomplete: false,
        stacks: Vec::new(),
        runtime_internal: RuntimeInternal::default(),
        in_flight: None,
        runtime: Some(runtime),
        notes: Vec::new(),
    };
    process.set_holders(found);
    Report { method: Method::Runtime, sample_bytes: 0, paced: false, processes: vec![process] }
}

//! A report of what a runtime's own sampling heap profiler (V8's, JFR's) says is still
//! held, for `report --runtime`, and its stacks as reports and the daemon's series show
//! them.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{ProcessReport, Report, RuntimeInternal, StackReport};
use crate::{
    model::{FrameReport, Method},
    runtimes::{detect, runtime_site, with_profiler, Options, Runtime, Stack},
};

/// Says in a report that the JVM's figures are per class, not per stack.
pub const JVM_CLASS_HISTOGRAM: &str = "JFR is unavailable in this JVM: the figures are the growth of each class between two class histograms (each a full collection), not allocation stacks";

/// Said in every Node.js report: which function a V8 profile names depends on what its
/// optimizing compiler inlined. A small function called from a hot one (a cache's
/// `remember` from a request handler) often gives its bytes to its caller.
pub const V8_INLINING: &str = "V8 names an optimized frame by its outermost function: the bytes of a function its compiler inlined are named by the caller it was inlined into";

/// Share of the bytes at or above which a report says V8 named Node.js's own code.
const INLINED_SHARE: f64 = 0.2;

/// V8's sampling heap profiler names the functions of the frames on the stack, and an
/// optimized frame is one function however much V8 inlined into it. When Node.js's own
/// JavaScript (its timers, its event emitter) has inlined the program's callbacks, the
/// program's allocations are named by Node.js's functions: said in a note, since the
/// table alone would point at Node.js.
fn inlined_into_node(stacks: &[Stack]) -> Option<String> {
    let total: u64 = stacks.iter().map(|s| s.bytes).sum();
    let mut names: Vec<&str> = Vec::new();
    let mut bytes = 0;
    for s in stacks {
        let Some(inner) = s.frames.first() else { continue };
        if inner.file.starts_with("node:") {
            bytes += s.bytes;
            if !names.contains(&inner.function.as_str()) {
                names.push(&inner.function);
            }
        }
    }
    let share = bytes as f64 / total.max(1) as f64;
    (share >= INLINED_SHARE).then(|| {
        format!(
            "{:.0}% of the bytes are named by Node.js's own functions ({}): V8 names an optimized frame by its outermost function, and its compiler inlined the program's code that allocated them into those",
            share * 100.0,
            names.join(", ")
        )
    })
}

/// Samples `pid`'s runtime heap for `window` and reports what is still held.
pub fn report(
    pid: u32,
    sample_bytes: u64,
    window: Duration,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<Report> {
    let comm = crate::procfs::ProcRoot::default().comm(pid).unwrap_or_default();
    let Some(runtime) = detect(pid)? else {
        bail!(
            "pid {pid} ({comm}) is neither Node.js nor a HotSpot JVM: --runtime asks those runtimes' own profilers; leave it out to watch its allocator"
        );
    };
    // Past the window, a JVM stops the recording itself.
    let options = Options { sample_bytes, lifetime: window + Duration::from_secs(120), histograms: true };
    let (stacks, per_class) = with_profiler(pid, runtime, options, |profiler, per_class| {
        let deadline = Instant::now() + window;
        while Instant::now() < deadline && !stop() {
            std::thread::sleep(
                Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())),
            );
        }
        Ok((profiler.snapshot()?, per_class))
    })?;
    let mut notes = if per_class { vec![JVM_CLASS_HISTOGRAM.to_owned()] } else { Vec::new() };
    if runtime == Runtime::Node {
        notes.push(V8_INLINING.to_owned());
    }
    notes.extend(inlined_into_node(&stacks));
    let stacks: Vec<StackReport> = stacks.iter().map(|s| stack_report(s, runtime.name())).collect();
    let process = ProcessReport {
        pid,
        comm,
        allocator: None,
        outstanding_bytes: stacks.iter().map(|s| s.bytes).sum(),
        outstanding_allocations: stacks.iter().map(|s| s.allocations).sum(),
        incomplete: false,
        stacks,
        runtime_internal: RuntimeInternal::default(),
        runtime: Some(runtime.name()),
        notes,
    };
    Ok(Report { method: Method::Runtime, sample_bytes, processes: vec![process] })
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
    StackReport {
        id: crate::model::stable_hash(frames.iter().map(|f| format!("{}@{}", f.function, f.address))),
        bytes: stack.bytes,
        allocations: stack.samples,
        mean_age_seconds: 0.0,
        site: frames.get(runtime_site(frames.iter().map(FrameReport::site_frame)).unwrap_or(0)).cloned(),
        frames,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtimes::Frame;

    fn stack(functions: &[(&str, &str)], bytes: u64) -> Stack {
        let frames = functions
            .iter()
            .map(|(function, file)| Frame {
                function: (*function).to_owned(),
                file: (*file).to_owned(),
                line: 1,
                column: 1,
            })
            .collect();
        Stack { frames, bytes, samples: 1 }
    }

    #[test]
    fn bytes_named_by_node_s_own_functions_get_a_note() {
        let program = stack(&[("grow", "file:///srv/app.js"), ("listOnTimeout", "node:internal/timers")], 40);
        let inlined = stack(
            &[("listOnTimeout", "node:internal/timers"), ("processTimers", "node:internal/timers")],
            60,
        );
        let note = inlined_into_node(&[program.clone(), inlined]).expect("a note");
        assert!(
            note.starts_with("60% of the bytes are named by Node.js's own functions (listOnTimeout)"),
            "{note}"
        );
        assert_eq!(inlined_into_node(&[program]), None);
    }
}

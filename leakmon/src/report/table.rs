//! The human-readable view: a profiler-style top list of unfreed memory per process,
//! one row per stack with the allocation site first and its callers indented below.

use std::fmt::Write as _;

use super::{ProcessReport, Report, StackReport};
use crate::model::FrameReport;

/// Frames shown under each stack; the JSON has them all.
const MAX_FRAMES: usize = 8;

/// Renders `report` as text.
pub fn render(report: &Report) -> String {
    let total_bytes: u64 = report.processes.iter().map(|p| p.outstanding_bytes).sum();
    let total_allocs: u64 = report.processes.iter().map(|p| p.outstanding_allocations).sum();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "leakmon: {} unfreed in {} allocations across {} process{}",
        bytes(total_bytes),
        total_allocs,
        report.processes.len(),
        if report.processes.len() == 1 { "" } else { "es" }
    );
    for p in &report.processes {
        header(&mut out, p);
        if !p.stacks.is_empty() {
            stacks(&mut out, p);
        }
        if !p.holders.is_empty() {
            holders(&mut out, p);
        }
    }
    out
}

/// A runtime's held objects, by the variable that holds them, largest first.
fn holders(out: &mut String, p: &ProcessReport) {
    let _ = writeln!(out, "  {:>12} {:>9} {:>6}  held by / type / path", "bytes", "objects", "%");
    for h in &p.holders {
        let share =
            if p.outstanding_bytes == 0 { 0.0 } else { 100.0 * h.bytes as f64 / p.outstanding_bytes as f64 };
        let mut root = if h.root.name.is_empty() {
            h.root.kind.to_owned()
        } else {
            format!("{} {}", h.root.kind, h.root.name)
        };
        if let Some(scope) = &h.root.scope {
            root.push_str(&format!(" (in {scope})"));
        }
        let _ = writeln!(out, "  {:>12} {:>9} {:>5.1}%  {root}: {}", h.bytes, h.objects, share, h.kind);
        if !h.path.is_empty() {
            let path: Vec<&str> = h.path.iter().map(|s| s.name.as_str()).collect();
            let _ = writeln!(out, "  {:>30}  via {}", "", path.join(" > "));
        }
    }
}

/// A process's line, its notes and what was set apart from its figures.
fn header(out: &mut String, p: &ProcessReport) {
    let interval = match (p.bytes_interval, p.samples) {
        (Some([low, high]), Some(n)) if low != high => {
            format!(
                " (90%: {} to {}, from {n} sample{})",
                rounded(low),
                rounded(high),
                if n == 1 { "" } else { "s" }
            )
        }
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "\npid {} ({}{}): {} unfreed{interval} in {} {}allocations{}",
        p.pid,
        if p.comm.is_empty() { "?" } else { &p.comm },
        p.allocator.map(|a| format!(", {}", a.name())).unwrap_or_default(),
        bytes(p.outstanding_bytes),
        p.outstanding_allocations,
        // Sampled figures count the blocks sampled, not every allocation.
        if p.samples.is_some() { "sampled " } else { "" },
        if p.incomplete { "  [INCOMPLETE: a table was full, figures are lower bounds]" } else { "" }
    );
    for note in &p.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    if let (Some(pause), Some(scan)) = (p.pause_ms, &p.holders_scan) {
        let _ = writeln!(
            out,
            "  holders scan: held still {pause} ms, {} threads, {} blocks, {} read ({} GB/s){}",
            scan.threads,
            scan.blocks,
            bytes(scan.scanned_bytes),
            scan.gb_per_second,
            if scan.complete { "" } else { ", stopped at its budget" }
        );
    }
    let internal = &p.runtime_internal;
    if internal.bytes > 0 {
        let _ = writeln!(
            out,
            "  runtime-internal: {} in {} allocations, kept by the runtime by design, not counted above ({})",
            bytes(internal.bytes),
            internal.allocations,
            internal.functions.join(", ")
        );
    }
    if let Some(f) = p.in_flight {
        let _ = writeln!(
            out,
            "  in flight: {} in {} allocations younger than {} s when the window ended (work in progress, most freed soon), not counted above",
            bytes(f.bytes),
            f.allocations,
            f.younger_than_seconds
        );
    }
}

/// A process's stacks, largest first: the site, then its callers.
fn stacks(out: &mut String, p: &ProcessReport) {
    // Sampled figures get their interval's half-width beside them.
    let sampled = p.stacks.iter().any(|s| s.spread.is_some());
    let spread = |s: &StackReport| match s.spread {
        Some(spread) if spread.uncertain == 0 => format!(" {:>6}", "exact"),
        Some(spread) => format!(" {:>6}", format!("±{:.0}%", 100.0 * spread.relative_width())),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "  {:>12}{} {:>9} {:>6}  allocation site / callers",
        "bytes",
        if sampled { format!(" {:>6}", "90%") } else { String::new() },
        "allocs",
        "%"
    );
    for s in &p.stacks {
        let share =
            if p.outstanding_bytes == 0 { 0.0 } else { 100.0 * s.bytes as f64 / p.outstanding_bytes as f64 };
        // The allocation site first, naming the wrappers it called through; then its
        // callers.
        let at = s.site.as_ref().and_then(|site| s.frames.iter().position(|f| f == site)).unwrap_or(0);
        let mut frames = s.frames.iter().skip(at);
        let mut first = frames.next().map_or_else(|| "[no stack]".to_owned(), frame);
        // A Python site names its line; the interpreter's frames under it say nothing
        // (a runtime whose site has its interpreter under it). Past wrappers, or a
        // runtime's library code (the JDK's, Node.js's), the site says what it called
        // through.
        let interpreter =
            s.frames.get(at).and_then(|f| f.runtime.as_deref()).and_then(crate::runtimes::by_name);
        if at > 0 && !interpreter.is_some_and(|r| r.interpreter_under_site()) {
            let via: Vec<&str> = s.frames[..at].iter().rev().map(|f| f.function.as_str()).collect();
            first = format!("{first}  via {}", via.join(" > "));
        }
        let _ = writeln!(out, "  {:>12}{} {:>9} {:>5.1}%  {first}", s.bytes, spread(s), s.allocations, share);
        let indent = if sampled { 37 } else { 30 };
        for f in frames.by_ref().take(MAX_FRAMES - 1) {
            let _ = writeln!(out, "  {:>indent$}  {}", "", frame(f));
        }
        let rest = s.frames.len().saturating_sub(at + MAX_FRAMES);
        if rest > 0 {
            let _ = writeln!(out, "  {:>indent$}  ... {rest} more", "");
        }
        if let Some(held) = s.held.line() {
            let _ = writeln!(out, "  {:>indent$}  => {held}", "");
        }
    }
}

fn frame(f: &FrameReport) -> String {
    match (&f.file, f.line) {
        (Some(file), Some(line)) => format!("{} ({}:{line})", f.function, short(file)),
        (Some(file), None) => format!("{} ({})", f.function, short(file)),
        // A Java frame: JFR names the method and line, not the source file.
        (None, Some(line)) if f.runtime.is_some() => format!("{} (line {line})", f.function),
        (None, None) if f.runtime.is_some() => f.function.clone(),
        _ => format!("{} [{}]", f.function, f.address),
    }
}

fn short(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

pub use crate::units::{bytes, rounded};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ProcessReport, StackReport};

    #[test]
    fn renders_sites_largest_first_with_callers() {
        let frame = |function: &str, line| FrameReport {
            function: function.into(),
            file: Some("/src/fixture.c".into()),
            line: Some(line),
            address: "0x1".into(),
            runtime: None,
        };
        let report = Report {
            method: crate::report::Method::Uprobes,
            sample_bytes: 0,
            paced: false,
            processes: vec![ProcessReport {
                pause_ms: None,
                holders_scan: None,
                holders: Vec::new(),
                samples: None,
                bytes_interval: None,
                pid: 42,
                comm: "fixture".into(),
                allocator: None,
                outstanding_bytes: 48_000,
                outstanding_allocations: 1000,
                incomplete: false,
                runtime_internal: crate::report::RuntimeInternal::default(),
                in_flight: None,
                runtime: None,
                notes: Vec::new(),
                stacks: vec![StackReport {
                    held: Default::default(),
                    key: 0,
                    samples: None,
                    bytes_interval: None,
                    spread: None,
                    id: String::new(),
                    bytes: 48_000,
                    allocations: 1000,
                    mean_age_seconds: 1.0,
                    site: Some(frame("leak_small", 12)),
                    frames: vec![frame("xmalloc", 3), frame("leak_small", 12), frame("main", 40)],
                }],
            }],
        };
        let text = render(&report);
        assert!(
            text.starts_with("leakmon: 46.9 KiB (48000 B) unfreed in 1000 allocations across 1 process\n"),
            "{text}"
        );
        assert!(
            text.contains("pid 42 (fixture): 46.9 KiB (48000 B) unfreed in 1000 allocations\n"),
            "{text}"
        );
        assert!(
            text.contains("         48000      1000 100.0%  leak_small (fixture.c:12)  via xmalloc\n"),
            "the site past the wrapper: {text}"
        );
        assert!(text.contains("  main (fixture.c:40)\n"), "{text}");
    }

    #[test]
    fn a_python_site_names_its_line_and_the_note_has_a_line_of_its_own() {
        let python = |function: &str, line| FrameReport {
            function: function.into(),
            file: Some("/srv/app.py".into()),
            line: Some(line),
            address: "0x7f0000001000".into(),
            runtime: Some("python".into()),
        };
        let native = |function: &str| FrameReport {
            function: function.into(),
            file: None,
            line: None,
            address: "0x4000".into(),
            runtime: None,
        };
        let mut report = Report {
            method: crate::report::Method::Uprobes,
            sample_bytes: 0,
            paced: false,
            processes: vec![ProcessReport {
                pause_ms: None,
                holders_scan: None,
                holders: Vec::new(),
                samples: None,
                bytes_interval: None,
                pid: 9,
                comm: "python3".into(),
                allocator: None,
                outstanding_bytes: 4129,
                outstanding_allocations: 1,
                incomplete: false,
                runtime_internal: crate::report::RuntimeInternal::default(),
                in_flight: None,
                runtime: Some("python"),
                notes: Vec::new(),
                stacks: vec![StackReport {
                    held: Default::default(),
                    key: 0,
                    samples: None,
                    bytes_interval: None,
                    spread: None,
                    id: String::new(),
                    bytes: 4129,
                    allocations: 1,
                    mean_age_seconds: 1.0,
                    site: Some(python("remember", 10)),
                    frames: vec![native("PyObject_Malloc"), python("remember", 10), python("<module>", 20)],
                }],
            }],
        };
        report.add_notes();
        let text = render(&report);
        assert!(text.contains("         4129         1 100.0%  remember (app.py:10)\n"), "{text}");
        assert!(text.contains("  <module> (app.py:20)\n"), "{text}");
        assert!(
            text.contains(&format!("\n  note: {}\n", crate::runtimes::python::UNSEEN_BY_UPROBES)),
            "{text}"
        );
        report.processes[0].notes.clear();
        report.method = crate::report::Method::Agent;
        report.add_notes();
        assert!(!render(&report).contains("note:"), "the agent sees Python objects");
        // What holds them: the variable, where it is, the type, the path.
        report.processes[0].holders = vec![crate::runtimes::held_by::Holder {
            bytes: 4129,
            objects: 1,
            kind: "bytes".into(),
            root: crate::runtimes::held_by::Root {
                kind: "global",
                name: "cache".into(),
                scope: Some("__main__".into()),
            },
            path: vec![crate::runtimes::held_by::Step { name: "['a']".into() }],
        }];
        let text = render(&report);
        assert!(
            text.contains("         4129         1 100.0%  global cache (in __main__): bytes\n"),
            "{text}"
        );
        assert!(text.contains("  via ['a']\n"), "{text}");
    }
}

//! Folded stacks, one line per stack: `process;outermost;...;innermost bytes`, the
//! input of flame graph tools (inferno, flamegraph.pl, speedscope).

use super::{ProcessReport, Report};

/// Every stack of every process, outermost frame first, rooted at its process.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for process in &report.processes {
        for line in lines(process) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// One process's folded lines; equal stacks are merged.
pub fn lines(process: &ProcessReport) -> Vec<String> {
    let root = clean(&format!(
        "{} (pid {})",
        if process.comm.is_empty() { "?" } else { &process.comm },
        process.pid
    ));
    let mut merged: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for stack in process.stacks.iter().filter(|s| s.bytes > 0) {
        let mut path = root.clone();
        if stack.frames.is_empty() {
            path.push_str(";[unknown]");
        }
        for frame in stack.frames.iter().rev() {
            path.push(';');
            path.push_str(&clean(&frame.function));
        }
        *merged.entry(path).or_default() += stack.bytes;
    }
    merged.into_iter().map(|(path, bytes)| format!("{path} {bytes}")).collect()
}

/// `;` separates frames and the last space starts the count: neither may be in a name.
fn clean(name: &str) -> String {
    name.replace(';', ":").replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{FrameReport, StackReport};

    fn frame(function: &str) -> FrameReport {
        FrameReport {
            function: function.into(),
            file: None,
            line: None,
            address: "0x1".into(),
            runtime: None,
        }
    }

    #[test]
    fn outermost_first_rooted_at_the_process_and_merged() {
        let stack = |bytes, frames: &[&str]| StackReport {
            held: Default::default(),
            key: 0,
            samples: None,
            bytes_interval: None,
            spread: None,
            id: String::new(),
            bytes,
            allocations: 1,
            mean_age_seconds: 0.0,
            site: None,
            frames: frames.iter().map(|f| frame(f)).collect(),
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
                pid: 7,
                comm: "leaks".into(),
                allocator: None,
                outstanding_bytes: 0,
                outstanding_allocations: 0,
                incomplete: false,
                runtime_internal: crate::report::RuntimeInternal::default(),
                in_flight: None,
                runtime: None,
                notes: Vec::new(),
                stacks: vec![
                    stack(48, &["leak_small", "main"]),
                    stack(2, &["leak_small", "main"]),
                    stack(5, &["std::map<int; int>::insert", "main"]),
                    stack(9, &[]),
                    stack(0, &["freed", "main"]),
                ],
            }],
        };
        assert_eq!(
            render(&report),
            "leaks (pid 7);[unknown] 9\nleaks (pid 7);main;leak_small 50\nleaks (pid 7);main;std::map<int: int>::insert 5\n"
        );
    }
}

//! What a Node.js report says about how V8 named its stacks.

use crate::runtimes::Stack;

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
pub fn inlined_into_node(stacks: &[Stack]) -> Option<String> {
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

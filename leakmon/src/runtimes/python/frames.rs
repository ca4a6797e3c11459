//! Python frames in a stack: the words the kernel appended after the native frames
//! (see `leakmon_common::python`) named from the process's code objects, and put in
//! the place of the native evaluation frames that ran them.

use std::path::PathBuf;

use leakmon_common::python;

use crate::model::Frame;

/// The native frame that runs a sequence of Python frames.
const EVAL_FRAME: &str = "_PyEval_EvalFrameDefault";

/// Named Python frames, innermost first, each with whether it is its evaluation call's
/// first; `None` when one word is not a code object of this process.
pub fn named(process: &super::code::Process, words: &[u64]) -> Option<Vec<(Frame, bool)>> {
    words
        .iter()
        .map(|&w| {
            let f = python::decode(w)?;
            let code = process.code(f.code)?;
            let line = code.line(f.lasti);
            let frame = Frame {
                function: Some(code.qualname.clone()),
                file: Some(code.filename.clone()),
                line,
                // The instruction's own address: one pprof location per instruction.
                address: f.code
                    + u64::from(process.interpreter.layout.code_instructions)
                    + 2 * u64::from(f.lasti),
                object: Some(PathBuf::from(&code.filename)),
                build_id: Some(format!("py:{}", code.qualname)),
                file_offset: u64::from(line.unwrap_or(0)),
                runtime: Some(super::NAME),
            };
            Some((frame, f.entry))
        })
        .collect()
}

/// Puts each native evaluation frame's Python frames in its place: from the innermost,
/// each evaluation frame takes the Python frames up to and including the next entry
/// frame. Python frames left over (the native walk stopped early) go outermost.
pub fn merge(native: Vec<Frame>, python: Vec<(Frame, bool)>) -> Vec<Frame> {
    let mut python = python.into_iter().peekable();
    let mut out = Vec::with_capacity(native.len() + python.len());
    for frame in native {
        if frame.function.as_deref() != Some(EVAL_FRAME) || python.peek().is_none() {
            out.push(frame);
            continue;
        }
        for (py, entry) in python.by_ref() {
            out.push(py);
            if entry {
                break;
            }
        }
    }
    out.extend(python.map(|(f, _)| f));
    out
}

//! CPython's frames as the kernel walks them (leakmon-ebpf's python.rs): the layout its
//! walker reads, given per process, and the walked frames named from the process's
//! code objects.

use std::{path::Path, sync::Arc};

use leakmon_common::python;
use tracing::{info, warn};

use super::{code::Process, frames, Interpreter, PythonSupport};
use crate::{
    model::Frame,
    probes::{ProbeError, Probes},
    procfs::Mapping,
    runtimes::{Walked, WalkedProcess},
};

/// The kernel table of the walker's layouts, by pid.
const TABLE: &str = "PY_PROCS";

impl Walked for PythonSupport {
    fn is_frame(&self, word: u64) -> bool {
        python::decode(word).is_some()
    }

    /// Says once per process, in a log line, that a Python leakmon does not walk gets
    /// native frames only; a process is looked at again once the interpreter it was
    /// looked at for is no longer mapped.
    fn attach(
        &self,
        kernel: &mut Probes,
        pid: u32,
        maps: &[Mapping],
        root: &Path,
    ) -> Result<bool, ProbeError> {
        if let Some(walked) = kernel.walks(pid, maps) {
            return Ok(walked);
        }
        match Interpreter::find(maps, root) {
            // Not (yet) a Python process: looked for again at its next refresh.
            None => Ok(false),
            Some(Err(why)) => {
                warn!(pid, "{why}: its stacks keep native frames only");
                kernel.walk_none(pid);
                Ok(false)
            }
            Some(Ok(interpreter)) => {
                let (pidns_dev, pidns_ino) = pid_namespace(pid).unwrap_or_default();
                let layout = python::PyLayout { pidns_dev, pidns_ino, ..interpreter.layout };
                kernel.walk(pid, TABLE, &layout, interpreter.inode)?;
                let (major, minor, micro) = interpreter.version;
                info!(pid, "Python {major}.{minor}.{micro}: stacks name Python functions and lines");
                Ok(true)
            }
        }
    }

    fn open(&self, pid: u32, maps: &[Mapping], root: &Path) -> Option<Arc<dyn WalkedProcess>> {
        let interpreter = Interpreter::find(maps, root)?.ok()?;
        Some(Arc::new(Process::open(pid, interpreter)?))
    }
}

/// `pid`'s pid namespace (device, inode) where it is not leakmon's own: a
/// container's, whose thread ids CPython keeps as that namespace numbers them.
fn pid_namespace(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/pid").ok()?;
    ((theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino())).then(|| (theirs.dev(), theirs.ino()))
}

impl WalkedProcess for Process {
    fn still_in(&self, maps: &[Mapping]) -> bool {
        self.interpreter.still_in(maps)
    }

    fn frames(&self, native: Vec<Frame>, words: &[u64]) -> Vec<Frame> {
        match frames::named(self, words) {
            Some(python) => frames::merge(native, python),
            None => native,
        }
    }

    fn prefetch(&self, stacks: &mut dyn Iterator<Item = &[u64]>) {
        Process::prefetch(self, stacks);
    }
}

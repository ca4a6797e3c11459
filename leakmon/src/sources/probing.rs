//! How a process's allocations reach the kernel's tables: the one choice the daemon's
//! sources and `report` make alike, and the attach each way takes.

use std::path::PathBuf;

use crate::probes::{ProbeError, Probes};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probing {
    /// The agent samples in the process; only the two markers of the agent at this
    /// path are probed, on every process that maps it (those it is loaded into). A
    /// probe scoped to one process would not fire in a child it forks from a thread no
    /// tracer holds, which gets no probes of its own.
    Agent(PathBuf),
    /// Probes of the process's own on its allocator files: the kernel puts
    /// breakpoints in that process only, and the rest of the host pays nothing.
    PerProcess,
    /// Probes on the allocator files, shared by every traced process: for everyone,
    /// or for a process tree that forks and execs many times.
    Shared,
}

impl Probing {
    /// Attaches what `pid` needs, given its allocator `files`; the probes added.
    pub fn attach(&self, kernel: &mut Probes, pid: u32, files: Vec<PathBuf>) -> Result<usize, ProbeError> {
        match self {
            Self::Agent(path) => kernel.attach_agent(None, &crate::agent::files(path)),
            Self::PerProcess => kernel.attach_process(pid, &files),
            Self::Shared => kernel.attach_libraries(files),
        }
    }
}

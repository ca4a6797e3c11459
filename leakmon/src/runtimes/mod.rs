//! Language runtimes, one folder each (`python`, `node`, `jvm`), each answering for
//! itself what the core asks through [`Support`]; [`ALL`] is the one list that wires
//! them in. CPython's frames are walked in the kernel and named here; V8's and
//! HotSpot's objects live in heaps they manage and move, so no native hook sees their
//! code and leakmon asks their own sampling heap profilers, for a running process,
//! without a restart (`report --runtime`, the daemon's `--runtime-profilers`).

pub mod guardian;
pub mod held_by;
pub mod jvm;
pub mod node;
pub mod python;

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::ValueEnum as _;

use crate::{
    model::Method,
    probes::{ProbeError, Probes},
    procfs::Mapping,
};

/// What the core asks of a runtime; each runtime's folder answers for its own.
pub trait Support: Sync {
    /// As frames, processes and series name it.
    fn name(&self) -> &'static str;
    /// As a sentence names it ("Node.js", "a HotSpot JVM").
    fn title(&self) -> &'static str;
    /// Whether a frame of its code (function, file) is the runtime's own library code,
    /// which a site is named past (see [`runtime_site`]).
    fn library_code(&self, _function: &str, _file: Option<&str>) -> bool {
        false
    }
    /// Whether a process with the executable named `exe` and the mappings `maps`
    /// (their text) runs it, for its own heap profiler.
    fn runs(&self, _exe: &str, _maps: &str) -> bool {
        false
    }
    /// Its own sampling heap profiler started in `pid`; `None` for a runtime without one.
    fn profiler(&self, _pid: u32, _options: Options) -> Option<Result<Box<dyn Profiler>>> {
        None
    }
    /// Whether its profiler is reached in the process's network namespace.
    fn in_net_namespace(&self) -> bool {
        false
    }
    /// Whether a process with the mappings `maps` runs it, as reports say.
    fn mapped_in(&self, _maps: &[Mapping]) -> bool {
        false
    }
    /// Whether its own profiler sets the bytes a sample stands for (`--sample-bytes`
    /// does not).
    fn sets_its_own_interval(&self) -> bool {
        false
    }
    /// What a report by `method` must say of a process running it, if anything.
    fn note(&self, _method: Method) -> Option<&'static str> {
        None
    }
    /// Whether the frames under a site of its code are its interpreter's own, which a
    /// report's table leaves unsaid (no "via").
    fn interpreter_under_site(&self) -> bool {
        false
    }
    /// The kind of object a stack makes (its native functions under its first frame of
    /// the runtime's code, innermost first), where the runtime hands such objects out
    /// again from a cache of its own without calling its allocator: a block sampled
    /// there may since hold an object other code took.
    fn reused_kind(&self, _native: &[&str]) -> Option<&'static str> {
        None
    }
    /// Its frames as the kernel walks them, for a runtime whose walker is in the
    /// kernel (its own file in leakmon-ebpf).
    fn walked(&self) -> Option<&dyn Walked> {
        None
    }
}

/// A runtime whose frames the kernel walks and appends, tagged, after a stack's native
/// frames.
pub trait Walked: Sync {
    /// Whether a stack word is one of its frames.
    fn is_frame(&self, word: u64) -> bool;
    /// Gives the kernel's walker what it needs for `pid` if `pid` runs the runtime;
    /// whether its frames are walked.
    fn attach(
        &self,
        kernel: &mut Probes,
        pid: u32,
        maps: &[Mapping],
        root: &Path,
    ) -> Result<bool, ProbeError>;
    /// The running process, opened to name its frames; `None` when it does not run
    /// the runtime, or one whose frames leakmon cannot name.
    fn open(&self, pid: u32, maps: &[Mapping], root: &Path) -> Option<Arc<dyn WalkedProcess>>;
}

/// A process whose walked frames can be named (from its memory, while it lives).
pub trait WalkedProcess: Send + Sync + std::fmt::Debug {
    /// Whether the runtime it was opened for is still mapped as in `maps`.
    fn still_in(&self, maps: &[Mapping]) -> bool;
    /// `native` (a stack's native frames, named) with the walked frames in `words`
    /// named and put in place; `native` alone when a word is not the process's.
    fn frames(&self, native: Vec<crate::model::Frame>, words: &[u64]) -> Vec<crate::model::Frame>;
    /// Reads ahead what naming the walked frames of `stacks` needs: the process is
    /// about to go.
    fn prefetch(&self, stacks: &mut dyn Iterator<Item = &[u64]>);
}

/// The runtime whose walked frame `word` is, if any.
pub fn walker_of(word: u64) -> Option<&'static dyn Walked> {
    ALL.iter().find_map(|s| s.walked().filter(|w| w.is_frame(word)))
}

/// The runtime a process with the mappings `maps` runs, as reports name it.
pub fn running(maps: &[Mapping]) -> Option<&'static str> {
    ALL.iter().find(|s| s.mapped_in(maps)).map(|s| s.name())
}

/// Gives the kernel, for `pid`, what each runtime that walks frames in it needs.
pub fn attach_walkers(kernel: &mut Probes, pid: u32, maps: &[Mapping], root: &Path) {
    for walked in ALL.iter().filter_map(|s| s.walked()) {
        if let Err(e) = walked.attach(kernel, pid, maps, root) {
            tracing::debug!(pid, "runtime frames: {e:#}");
        }
    }
}

/// `pid`, about to exit, opened with what naming the walked frames of its stacks in
/// the kernel's tables needs read ahead; `None` when no runtime walks its frames.
pub fn held_at_exit(
    kernel: &Probes,
    pid: u32,
    maps: &[Mapping],
    root: &Path,
) -> Option<Arc<dyn WalkedProcess>> {
    let process = ALL.iter().filter_map(|s| s.walked()).find_map(|w| w.open(pid, maps, root))?;
    let totals = kernel.totals(|k| k.tgid == pid).ok()?;
    let stacks: Vec<Vec<u64>> = totals.iter().filter_map(|(k, _)| kernel.stack(k.stack_id)).collect();
    process.prefetch(&mut stacks.iter().map(Vec::as_slice));
    Some(process)
}

/// Every runtime leakmon knows: adding one is a folder and a line here.
pub static ALL: [&dyn Support; 3] = [&python::PYTHON, &node::NODE, &jvm::JVM];

/// The runtime named `name` in frames and reports.
pub fn by_name(name: &str) -> Option<&'static dyn Support> {
    ALL.iter().copied().find(|s| s.name() == name)
}

/// The runtimes whose own heap profiler leakmon asks, as a sentence names them:
/// "Node.js nor a HotSpot JVM".
pub fn with_profilers() -> String {
    Runtime::value_variants().iter().map(|r| r.support().title()).collect::<Vec<_>>().join(" nor ")
}

/// A runtime whose own heap profiler can be asked (`--runtime-profilers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    Node,
    Jvm,
}

impl Runtime {
    /// As frames and processes name it in reports.
    pub fn name(self) -> &'static str {
        self.support().name()
    }

    pub fn support(self) -> &'static dyn Support {
        match self {
            Runtime::Node => &node::NODE,
            Runtime::Jvm => &jvm::JVM,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Runtime::value_variants().iter().copied().find(|r| r.name() == name)
    }
}

/// One call stack of the runtime's code still holding sampled bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Stack {
    /// Innermost first.
    pub frames: Vec<Frame>,
    pub bytes: u64,
    pub samples: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub function: String,
    /// A script's URL, or empty where the runtime names none (Java's frames).
    pub file: String,
    /// 1-based; 0 where unknown.
    pub line: u32,
    pub column: u32,
}

/// The runtime with a heap profiler that `pid` runs, as each runtime tells it from
/// the process's executable name and mappings.
pub fn detect(pid: u32) -> Result<Option<Runtime>> {
    let exe =
        std::fs::read_link(format!("/proc/{pid}/exe")).with_context(|| format!("read /proc/{pid}/exe"))?;
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let maps = crate::untrusted::read_text(
        std::path::Path::new(&format!("/proc/{pid}/maps")),
        crate::untrusted::PROC_TEXT_LIMIT,
    )
    .unwrap_or_default();
    Ok(Runtime::value_variants().iter().copied().find(|r| r.support().runs(&name, &maps)))
}

/// A runtime's sampling heap profiler, running in a process.
pub trait Profiler {
    /// What the allocations sampled since the start still hold, per stack.
    fn snapshot(&mut self) -> Result<Vec<Stack>>;
    /// Stops sampling and leaves the process as it was (also done on drop, errors
    /// unreported).
    fn close(self: Box<Self>) -> Result<()>;
    /// What a report of `stacks` must say about how the runtime named them.
    fn notes(&self, _stacks: &[Stack]) -> Vec<String> {
        Vec::new()
    }
    /// The bytes each sample of the last snapshot stood for, where the runtime sets
    /// that itself (JFR: an allocation buffer's worth) rather than `--sample-bytes`.
    fn interval(&self) -> Option<u64> {
        None
    }
    /// What the last snapshot set apart as too young to call held: (bytes, samples).
    fn in_flight(&self) -> Option<(u64, u64)> {
        None
    }
}

/// What to sample with.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// V8's sampling interval (paced: from the allocation rate measured at the start).
    pub interval: crate::values::Interval,
    /// How long a JVM keeps its recording if leakmon never stops it.
    pub lifetime: Duration,
    /// Whether a JVM without JFR may be asked for class histograms (a full
    /// collection each).
    pub histograms: bool,
}

/// Runs `body` with a profiler started in `pid`, then closes it. Node.js's inspector is
/// reached in the process's network namespace, on a thread that joins it.
pub fn with_profiler<T: Send>(
    pid: u32,
    runtime: Runtime,
    options: Options,
    body: impl FnOnce(&mut dyn Profiler) -> Result<T> + Send,
) -> Result<T> {
    let support = runtime.support();
    let run = || -> Result<T> {
        let mut profiler = support
            .profiler(pid, options)
            .ok_or_else(|| anyhow::anyhow!("{} has no heap profiler", support.name()))??;
        let result = body(profiler.as_mut());
        let closed = profiler.close();
        let out = result?;
        closed?;
        Ok(out)
    };
    if support.in_net_namespace() {
        in_net_namespace(pid, run)
    } else {
        run()
    }
}

/// Whether a frame of `runtime`'s code is the runtime's own library code (Node.js's
/// JavaScript, the JDK's classes), which a site is named past (see
/// [`crate::runtimes::runtime_site`]): the program's frame under it is where its code
/// asked for the memory.
pub fn library_code(runtime: &str, function: &str, file: Option<&str>) -> bool {
    by_name(runtime).is_some_and(|s| s.library_code(function, file))
}

/// The site among a stack's frames of a runtime's code: the innermost one outside the
/// runtime's own library code (Node.js's JavaScript, the JDK's classes, which a site is
/// named past as past an allocator's wrappers), else the innermost of them; `None`
/// when no frame is a runtime's.
pub fn runtime_site<'a>(frames: impl Iterator<Item = crate::model::SiteFrame<'a>> + Clone) -> Option<usize> {
    frames
        .clone()
        .position(|f| f.runtime.is_some_and(|r| !library_code(r, f.function.unwrap_or(""), f.file)))
        .or_else(|| frames.into_iter().position(|f| f.runtime.is_some()))
}

/// Runs `f` on a thread of its own in `pid`'s network namespace, where its inspector
/// listens (a container's loopback is its own).
pub(crate) fn in_net_namespace<T: Send>(pid: u32, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_net_namespace(pid)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the inspector's thread panicked"))?
    })
}

/// Moves the calling thread into `pid`'s network namespace, unless it is there.
pub fn enter_net_namespace(pid: u32) -> Result<()> {
    let theirs = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&theirs).with_context(|| format!("open {theirs}"))?;
    let ino = |m: std::fs::Metadata| std::os::unix::fs::MetadataExt::ino(&m);
    if ns.metadata().ok().map(ino) == std::fs::metadata("/proc/thread-self/ns/net").ok().map(ino) {
        return Ok(());
    }
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter pid {pid}'s network namespace"))
}

#[cfg(test)]
mod tests {
    use crate::model::FrameReport;

    #[test]
    fn a_site_is_named_past_the_runtime_s_library_code() {
        let jvm = |function: &str| FrameReport {
            function: function.to_owned(),
            file: None,
            line: Some(1),
            address: String::new(),
            runtime: Some("jvm".to_owned()),
        };
        let frames =
            [jvm("java.util.HashMap.newNode"), jvm("java.util.HashMap.put"), jvm("CacheLeak.remember")];
        let site = |frames: &[FrameReport]| {
            crate::runtimes::runtime_site(frames.iter().map(FrameReport::site_frame))
        };
        assert_eq!(site(&frames), Some(2));
        assert_eq!(site(&frames[..2]), Some(0), "all the JDK's: the innermost");
        let node = |function: &str, file: &str| FrameReport {
            function: function.to_owned(),
            file: Some(file.to_owned()),
            line: Some(1),
            address: String::new(),
            runtime: Some("node".to_owned()),
        };
        assert_eq!(site(&[node("push", "node:internal/util"), node("grow", "file:///srv/app.js")]), Some(1));
    }
}

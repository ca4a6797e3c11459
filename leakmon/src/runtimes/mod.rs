//! Runtimes whose objects live in heaps they manage and move (V8, HotSpot): no native
//! hook sees their code, so leakmon asks their own sampling heap profilers, for a
//! running process, without a restart (`report --runtime`).
//!
//! In: a pid and a window. Out: a [`Report`] of the bytes the window's sampled
//! allocations still hold per call stack of the runtime's code, in the shapes of the
//! native reports (frames carry `"runtime":"node"` or `"runtime":"jvm"`).

pub mod attach;
pub mod guardian;
pub mod inspector;
pub mod jfr;
pub mod jvm;
pub mod node;
pub mod port_guard;

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::report::{FrameReport, Method, ProcessReport, Report, RuntimeInternal, StackReport};

/// The sampling interval: the agent's. (V8's own default, 32 KiB, took a fifth of an
/// allocation-bound Node.js's speed; see `cargo xtask bench --node-only`.)
pub const DEFAULT_SAMPLE_BYTES: u64 = crate::agent::DEFAULT_SAMPLE_BYTES;

/// A runtime leakmon recognizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    Node,
    Jvm,
}

impl Runtime {
    /// As frames and processes name it in reports.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Node => "node",
            Runtime::Jvm => "jvm",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Runtime::Node, Runtime::Jvm].into_iter().find(|r| r.name() == name)
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

/// Says in a report that the JVM's figures are per class, not per stack.
pub const JVM_CLASS_HISTOGRAM: &str = "JFR is unavailable in this JVM: the figures are the growth of each class between two class histograms (each a full collection), not allocation stacks";

/// The runtime `pid` runs: Node.js by its executable's name, a HotSpot JVM by its
/// `libjvm.so`.
pub fn detect(pid: u32) -> Result<Option<Runtime>> {
    let exe =
        std::fs::read_link(format!("/proc/{pid}/exe")).with_context(|| format!("read /proc/{pid}/exe"))?;
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name == "node" || name == "nodejs" {
        return Ok(Some(Runtime::Node));
    }
    let maps = crate::untrusted::read_text(
        std::path::Path::new(&format!("/proc/{pid}/maps")),
        crate::untrusted::PROC_TEXT_LIMIT,
    )
    .unwrap_or_default();
    if maps.lines().any(|l| l.ends_with("/libjvm.so")) {
        return Ok(Some(Runtime::Jvm));
    }
    Ok(None)
}

/// A runtime's sampling heap profiler, running in a process.
pub trait Profiler {
    /// What the allocations sampled since the start still hold, per stack.
    fn snapshot(&mut self) -> Result<Vec<Stack>>;
    /// Stops sampling and leaves the process as it was (also done on drop, errors
    /// unreported).
    fn close(self: Box<Self>) -> Result<()>;
}

/// What to sample with.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// V8's sampling interval.
    pub sample_bytes: u64,
    /// How long a JVM keeps its recording if leakmon never stops it.
    pub lifetime: Duration,
    /// Whether a JVM without JFR may be asked for class histograms (a full
    /// collection each).
    pub histograms: bool,
}

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

/// Runs `body` with a profiler started in `pid`, then closes it. Node.js's inspector is
/// reached in the process's network namespace, on a thread that joins it.
pub fn with_profiler<T: Send>(
    pid: u32,
    runtime: Runtime,
    options: Options,
    body: impl FnOnce(&mut dyn Profiler, bool) -> Result<T> + Send,
) -> Result<T> {
    let run = || -> Result<T> {
        let (mut profiler, per_class): (Box<dyn Profiler>, bool) = match runtime {
            Runtime::Node => (Box::new(node::Node::open(pid, options.sample_bytes)?), false),
            Runtime::Jvm => {
                let jvm = jvm::Jvm::open(pid, options.lifetime, options.histograms)?;
                let per_class = jvm.per_class();
                (Box::new(jvm), per_class)
            }
        };
        let result = body(profiler.as_mut(), per_class);
        let closed = profiler.close();
        let out = result?;
        closed?;
        Ok(out)
    };
    match runtime {
        Runtime::Node => in_net_namespace(pid, run),
        Runtime::Jvm => run(),
    }
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

/// Whether a frame of `runtime`'s code is the runtime's own library code (Node.js's
/// JavaScript, the JDK's classes), which a site is named past (see
/// [`crate::symbolize::runtime_site`]): the program's frame under it is where its code
/// asked for the memory.
pub fn library_code(runtime: &str, function: &str, file: Option<&str>) -> bool {
    match runtime {
        "node" => file.is_some_and(|f| f.starts_with("node:")),
        "jvm" => ["java.", "javax.", "jdk.", "sun.", "com.sun."].iter().any(|p| function.starts_with(p)),
        _ => false,
    }
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
                crate::export::stable_hash([
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
        id: crate::export::stable_hash(frames.iter().map(|f| format!("{}@{}", f.function, f.address))),
        bytes: stack.bytes,
        allocations: stack.samples,
        mean_age_seconds: 0.0,
        site: frames
            .get(crate::symbolize::runtime_site(frames.iter().map(FrameReport::site_frame)).unwrap_or(0))
            .cloned(),
        frames,
    }
}

/// Runs `f` on a thread of its own in `pid`'s network namespace, where its inspector
/// listens (a container's loopback is its own).
fn in_net_namespace<T: Send>(pid: u32, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
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
    use super::*;

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
            crate::symbolize::runtime_site(frames.iter().map(FrameReport::site_frame))
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

//! `--runtime-profilers node,jvm`: a suspect running Node.js or a HotSpot JVM is
//! profiled, for `--suspect-duration`, by the runtime's own sampling heap profiler
//! (see [`crate::runtimes`]): no allocator hook sees its code.
//!
//! Each session runs on a thread of its own and takes a snapshot every sampling turn,
//! at most one per [`MIN_SNAPSHOT_EVERY`]: what the allocations sampled since it started still hold,
//! per stack of the runtime's code. Successive snapshots make the process's heap series
//! and its stacks' series, as the kernel's totals do for native suspects, so the
//! metrics and `/api/v1/leaks` show them alike.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    selection::{Suspects, Turn},
    Source,
};
use crate::{
    model::{Method, SeriesView},
    probes::Probes,
    procfs::ProcRoot,
    runtimes::{self, Options, Runtime, Stack},
    store::{NamedStacks, ProcessTotals, StackTotals},
};

/// Shortest time between two snapshots: each is a protocol round trip over the whole
/// sampled heap (V8), or a dump (JFR). The default sampling turn (10 s) takes fewer.
pub const MIN_SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Stack ids of runtime stacks carry this bit: never a kernel stack id's.
const RUNTIME_STACK: u64 = 1 << 63;

pub struct RuntimeProfiles {
    enabled: Vec<Runtime>,
    suspects: Suspects,
    proc_root: ProcRoot,
    sessions: HashMap<u32, Session>,
    /// Sessions told to stop, joined once done.
    ending: Vec<JoinHandle<()>>,
    options: Options,
    every: Duration,
}

struct Session {
    stop: Arc<AtomicBool>,
    /// The latest snapshot, as the monitor takes it: converted once, on the session's
    /// thread, and read every sampling turn.
    latest: Arc<Mutex<Option<ProcessTotals>>>,
    thread: JoinHandle<()>,
}

impl RuntimeProfiles {
    pub fn new(
        enabled: Vec<Runtime>,
        duration: Duration,
        max: usize,
        sample_bytes: u64,
        every: Duration,
        proc_root: ProcRoot,
    ) -> Self {
        Self {
            enabled,
            suspects: Suspects::new(duration, max),
            proc_root,
            sessions: HashMap::new(),
            ending: Vec::new(),
            // Past the suspect duration, a JVM ends its recording itself.
            options: Options {
                interval: crate::values::Interval::from_option(sample_bytes),
                lifetime: duration + Duration::from_secs(120),
                histograms: false,
            },
            every: every.max(MIN_SNAPSHOT_EVERY),
        }
    }
}

impl Session {
    fn start(pid: u32, runtime: Runtime, options: Options, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, latest) = (stop.clone(), latest.clone());
            std::thread::Builder::new()
                .name(format!("profile-{pid}"))
                .spawn(move || session(pid, runtime, options, every, &stop, &latest))
                .expect("spawn a thread")
        };
        Self { stop, latest, thread }
    }
}

impl Source for RuntimeProfiles {
    fn method(&self) -> Method {
        Method::Runtime
    }

    fn through_kernel(&self) -> bool {
        false
    }

    /// Sessions whose time is up end, suspects of the runtimes enabled start.
    fn analysed(&mut self, _kernel: Option<&mut Probes>, views: &[SeriesView]) {
        let (done, running): (Vec<_>, Vec<_>) = self.ending.drain(..).partition(JoinHandle::is_finished);
        self.ending = running;
        for thread in done {
            let _ = thread.join();
        }
        let (sessions, ending) = (&mut self.sessions, &mut self.ending);
        let (enabled, options, every) = (&self.enabled, self.options, self.every);
        self.suspects.turn(&self.proc_root, views, |turn| match turn {
            Turn::End(pid) => {
                if let Some(s) = sessions.remove(&pid) {
                    s.stop.store(true, Ordering::Relaxed);
                    ending.push(s.thread);
                }
                true
            }
            Turn::Begin(pid, view) => match runtimes::detect(pid) {
                Ok(Some(runtime)) if enabled.contains(&runtime) => {
                    info!(pid, comm = %view.comm, runtime = runtime.name(), "profiling a suspect with its runtime's heap profiler");
                    sessions.insert(pid, Session::start(pid, runtime, options, every));
                    true
                }
                _ => false,
            },
        });
    }

    /// The latest snapshot of every session, as the monitor takes the kernel's totals;
    /// the frames of their stacks travel with them.
    fn totals(&self) -> Vec<ProcessTotals> {
        self.sessions
            .values()
            .filter_map(|s| s.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
            .collect()
    }

    /// A process being profiled: its runtime's figures replace the allocator's.
    fn speaks_for(&self, pid: u32) -> bool {
        self.sessions.contains_key(&pid)
    }

    /// The daemon stops: every session closes its profiler (the inspector closed, the
    /// recording stopped) before this returns.
    fn shutdown(&mut self, _kernel: Option<&mut Probes>) {
        for s in self.sessions.values() {
            s.stop.store(true, Ordering::Relaxed);
        }
        for thread in self.sessions.drain().map(|(_, s)| s.thread).chain(self.ending.drain(..)) {
            let _ = thread.join();
        }
    }
}

/// One session: the profiler opened, a snapshot every `every` until told to stop, the
/// profiler closed.
fn session(
    pid: u32,
    runtime: Runtime,
    options: Options,
    every: Duration,
    stop: &AtomicBool,
    latest: &Mutex<Option<ProcessTotals>>,
) {
    let result = runtimes::with_profiler(pid, runtime, options, |profiler| loop {
        let next = Instant::now() + every;
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let totals = process_totals(pid, runtime, profiler.snapshot()?);
        *latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(totals);
    });
    match result {
        Ok(()) => {
            info!(pid, runtime = runtime.name(), "runtime heap profiling ended; the process is as it was")
        }
        Err(e) => warn!(pid, runtime = runtime.name(), "runtime heap profiling stopped: {e:#}"),
    }
}

/// A snapshot as the monitor takes a process's totals from the kernel, with the frames
/// its profiler gave each stack.
fn process_totals(pid: u32, runtime: Runtime, stacks: Vec<Stack>) -> ProcessTotals {
    let mut totals = ProcessTotals { pid, gen: 0, bytes: 0, allocations: 0, stacks: Vec::new(), named: None };
    let mut named = NamedStacks::new();
    for stack in stacks {
        let report = crate::report::runtime::stack_report(&stack, runtime.name());
        let id = u64::from_str_radix(&report.id, 16).unwrap_or(0) | RUNTIME_STACK;
        totals.bytes += report.bytes;
        totals.allocations += report.allocations;
        totals.stacks.push(StackTotals {
            stack_id: id,
            bytes: report.bytes,
            allocations: report.allocations,
            ts_ms_sum: 0,
        });
        named.insert(id, (report.id, report.frames));
    }
    totals.stacks.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.stack_id.cmp(&b.stack_id)));
    totals.named = Some(Arc::new(named));
    totals
}

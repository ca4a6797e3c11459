//! `leakmon report`: what one command, or one running process over a window, left
//! unfreed, grouped by call stack.

use std::{
    collections::HashMap,
    io::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use tracing::{debug, info, warn};

use super::{capture, count_signals, load_probes, refresh_unwind, report_of, signals_received};
use crate::{
    agent::{pace::Paced, session::Session},
    cli::{Format, ReportArgs},
    discovery::Discovery,
    holders::{
        names::Scanned,
        scan::{Hold, Known, Plan},
    },
    probes::Probes,
    procfs::ProcRoot,
    ptrace::tracer::{RootExit, Stop, Tracer},
    report::{flamegraph, folded, pprof, table, ProcessInfo, Report},
    sources::probing::Probing,
    symbolize::Symbolizer,
    values::Interval,
    wrappers::Wrappers,
};

const POLL: Duration = Duration::from_millis(10);
/// How often the traced processes' mappings are read again for new allocator files.
const RESCAN: Duration = Duration::from_millis(500);

pub fn report(args: &ReportArgs) -> Result<()> {
    let proc_root = ProcRoot::default();
    check(args, &proc_root)?;
    if args.runtime {
        return runtime_report(args);
    }
    if let (true, Some(pid)) = (args.holders, args.pid) {
        // A process leakmon may not look into says so on the path every report takes.
        if let Some(runtime) = crate::runtimes::detect(pid).ok().flatten() {
            return runtime_holders(args, pid, runtime);
        }
    }
    // CPython's small objects come from its own arenas: only the agent samples them.
    let python_holders = args.holders && args.pid.is_some_and(|pid| python_runs(&proc_root, pid));
    if python_holders && !args.agent {
        info!("CPython: the agent samples its objects for the window; then what holds them is walked");
    }
    let mut watch = Watch::new(args, proc_root, args.agent || python_holders)?;
    let (mut tracer, session) = watch.start()?;
    let root = args.pid.or(tracer.as_ref().map(Tracer::root)).expect("a pid or a command");
    info!(pid = root, "watching");
    watch.until_done(&mut tracer, root)?;
    let report = watch.finish(tracer, session)?;
    write(&report, args.format)
}

/// One `report` on a command or a running process: its probes, what is known of the
/// processes that exited, and how allocations are seen.
struct Watch<'a> {
    args: &'a ReportArgs,
    proc_root: ProcRoot,
    probes: Probes,
    discovery: Discovery,
    /// As the daemon's sources choose: a running process (and the children it forks
    /// while watched) gets probes of its own; a command's process tree, which may fork
    /// and exec many times, shares probes on its allocator files; with the agent, its
    /// two markers are the only probes.
    probing: Probing,
    agent: Option<PathBuf>,
    /// The sampling interval: the kernel's (0: exact), or the agent's.
    sample_bytes: u64,
    interval: Interval,
    /// With a command and the agent paced: each process's agent, paced from here (a
    /// running --pid's is paced by its guardian).
    paced: HashMap<u32, Paced>,
    /// Processes that exited, captured at their exit.
    infos: HashMap<u32, ProcessInfo>,
    /// With --holders: each process's scan.
    scans: HashMap<u32, Scanned>,
    /// With --holders: what holds each CPython process's objects.
    python: HashMap<u32, Result<crate::runtimes::held_by::Found, String>>,
    /// When the window ended (the monotonic clock, ms).
    now_ms: u64,
}

impl<'a> Watch<'a> {
    /// Watches as `args` say, with the agent where `agent`.
    fn new(args: &'a ReportArgs, proc_root: ProcRoot, agent: bool) -> Result<Self> {
        let probes = load_probes(&args.tables, false)?;
        let agent = agent.then(crate::agent::install).transpose()?;
        let interval = Interval::from_option(args.tables.sample_bytes);
        let sample_bytes = match &agent {
            Some(_) => interval.start(),
            None => args.tables.sample_bytes,
        };
        Ok(Self {
            args,
            discovery: Discovery::new(proc_root.clone()),
            proc_root,
            probes,
            probing: match (&agent, args.pid) {
                (Some(path), _) => Probing::Agent(path.clone()),
                (None, Some(_)) => Probing::PerProcess,
                (None, None) => Probing::Shared,
            },
            agent,
            sample_bytes,
            interval,
            paced: HashMap::new(),
            infos: HashMap::new(),
            scans: HashMap::new(),
            python: HashMap::new(),
            now_ms: 0,
        })
    }

    /// Probes `pid`'s allocator `files`, or the agent's markers.
    fn attach(&mut self, pid: u32, files: Vec<PathBuf>) -> Result<()> {
        self.probing.attach(&mut self.probes, pid, files)?;
        Ok(())
    }

    /// Probes the running process, or starts the command, and holds it; the agent's
    /// session when one was loaded.
    fn start(&mut self) -> Result<(Option<Tracer>, Option<Session>)> {
        let proc_root = self.proc_root.clone();
        if let Some(pid) = self.args.pid {
            // A process that ends meanwhile makes the kernel refuse its links: say so.
            let files = self.discovery.process(pid).files;
            if let Err(e) = self.attach(pid, files) {
                return Err(if proc_root.running(pid) { e } else { exited(pid) });
            }
        }
        count_signals();
        let (tracer, session) = match self.args.pid {
            Some(pid) => self.hold_running(pid)?,
            None => (Some(self.spawn()?), None),
        };
        if self.probes.attached_files() == 0 {
            if let Some(pid) = self.args.pid.filter(|pid| !proc_root.running(*pid)) {
                return Err(exited(pid));
            }
            bail!("found no allocator (libc or another malloc) to probe");
        }
        Ok((tracer, session))
    }

    /// Traces the running `pid`, loads the agent into it if asked, and holds it for
    /// its exit where it can.
    fn hold_running(&mut self, pid: u32) -> Result<(Option<Tracer>, Option<Session>)> {
        self.probes.trace(pid)?;
        let mut session = None;
        if let Some(agent) = self.agent.as_deref() {
            // Markers first, then the agent: no sample fires unprobed.
            let (loaded, slots) = Session::start(pid, agent, self.interval)
                .with_context(|| format!("load the agent into pid {pid}"))?;
            info!(pid, slots, interval = ?self.interval, "agent loaded");
            // A copy in a memory file (a container's) is another file: its markers
            // are probed once it exists.
            let copies = crate::agent::copies_in(&self.proc_root, pid, agent);
            if !copies.is_empty() {
                self.probes.attach_agent(None, &copies).context("probe the markers of the agent's copy")?;
            }
            session = Some(loaded);
        }
        refresh_unwind(&mut self.probes, &self.proc_root, pid);
        let tracer = match Tracer::seize(pid) {
            Ok(tracer) => Some(tracer),
            Err(_) if !self.proc_root.running(pid) => return Err(exited(pid)),
            Err(e) => {
                warn!("cannot hold pid {pid} at exit ({e}); its stacks resolve only while it runs");
                None
            }
        };
        Ok((tracer, session))
    }

    /// Starts the command, stopped at its exec before its first instruction: probes its
    /// executable (a static allocator), the libraries it will load and what LD_PRELOAD
    /// names, then lets it run.
    fn spawn(&mut self) -> Result<Tracer> {
        let env = match self.agent.as_deref() {
            Some(agent) => vec![
                ("LD_PRELOAD".into(), crate::agent::preload(agent, std::env::var_os("LD_PRELOAD"))),
                (crate::agent::SAMPLE_BYTES_ENV.into(), self.sample_bytes.to_string().into()),
            ],
            None => Vec::new(),
        };
        let mut tracer = Tracer::spawn(&self.args.command, &env)?;
        let image = self.discovery.image(tracer.root());
        self.attach(tracer.root(), image)?;
        self.probes.trace(tracer.root())?;
        tracer.resume()?;
        Ok(tracer)
    }

    /// Follows the processes until the command exits, the process is gone, the window
    /// ends or enough Ctrl-C came.
    fn until_done(&mut self, tracer: &mut Option<Tracer>, root: u32) -> Result<()> {
        let mut last_scan = Instant::now();
        let mut last_pace = Instant::now();
        let deadline = self.args.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
        // With a command, the first Ctrl-C reaches it too (same terminal): wait for it
        // to exit. A second one reports at once.
        let signals_to_stop = if self.args.pid.is_some() { 1 } else { 2 };
        loop {
            if let Some(t) = tracer.as_mut() {
                if self.handle_stops(t)? {
                    break;
                }
            } else if !self.proc_root.exists(root) {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) || signals_received() >= signals_to_stop {
                break;
            }
            for pid in self.probes.unwind_stale() {
                refresh_unwind(&mut self.probes, &self.proc_root, pid);
            }
            if last_scan.elapsed() >= RESCAN {
                last_scan = Instant::now();
                self.rescan(root)?;
            }
            if tracer.is_some() && last_pace.elapsed() >= crate::agent::pace::TURN {
                last_pace = Instant::now();
                self.pace();
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Handles the traced processes' stops; whether the command has exited.
    fn handle_stops(&mut self, tracer: &mut Tracer) -> Result<bool> {
        let root_pid = tracer.root();
        let mut entry_error = None;
        tracer.poll(|pid, stop| {
            if let Err(e) = self.on_stop(pid, stop) {
                if pid == root_pid {
                    entry_error = Some(e);
                } else {
                    unless_gone(&self.proc_root, pid, "load the agent", &e);
                }
            }
        })?;
        if let Some(e) = entry_error {
            return Err(e.context(format!("load the agent into pid {root_pid}")));
        }
        let Some(exit) = tracer.root_exit() else { return Ok(false) };
        match exit {
            RootExit::Code(code) => info!(code, "command exited"),
            RootExit::Signal(signal) => info!(%signal, "command killed by signal"),
        }
        Ok(true)
    }

    /// One stop of a traced process, handled while it is held; an error only from
    /// loading the agent at its entry.
    fn on_stop(&mut self, pid: u32, stop: Stop) -> Result<()> {
        let proc_root = self.proc_root.clone();
        match stop {
            Stop::Exit => {
                let mut info = capture(&mut self.discovery, pid, false);
                let root = proc_root.in_root(pid, std::path::Path::new("/"));
                info.walked = crate::runtimes::held_at_exit(&self.probes, pid, &info.maps, &root);
                if self.args.holders {
                    self.scan(pid, Hold::AtExit(pid), &info);
                }
                self.infos.insert(pid, info);
            }
            // A new image may bring its own allocator or preload one (`env
            // LD_PRELOAD=... cmd`): probe it while it is held, before its first
            // instruction.
            Stop::Exec => {
                let image = self.discovery.image(pid);
                if let Err(e) = self.attach(pid, image) {
                    unless_gone(&proc_root, pid, "attach to the allocator of a new image", &e);
                }
            }
            // Its libraries are mapped, wherever the dynamic linker found them
            // (LD_LIBRARY_PATH, rpath): probe the allocators among them and give the
            // kernel their unwind tables before its main runs.
            Stop::Entry => {
                let files = self.discovery.process(pid).files;
                if let Err(e) = self.attach(pid, files) {
                    unless_gone(&proc_root, pid, "attach to the allocator of a new image", &e);
                }
                // A program LD_PRELOAD cannot reach (statically linked), or one with its
                // own allocator built in, gets the agent's inline hooks here.
                let loaded = self.agent.as_deref().map(|agent| {
                    crate::agent::inject::load_at_entry(
                        &proc_root,
                        pid,
                        agent,
                        self.sample_bytes,
                        crate::ptrace::tracer::OPTIONS,
                    )
                });
                refresh_unwind(&mut self.probes, &proc_root, pid);
                match loaded {
                    None | Some(Ok(0)) => {}
                    Some(Ok(functions)) => info!(pid, functions, "agent's inline hooks on"),
                    Some(Err(e)) => return Err(e),
                }
            }
            // A child of a process with probes of its own needs its own before it runs
            // (the parent's do not fire in it).
            Stop::Fork if self.probing == Probing::PerProcess => {
                let files = self.discovery.process(pid).files;
                if let Err(e) = self.attach(pid, files) {
                    unless_gone(&proc_root, pid, "attach to a new child", &e);
                }
            }
            Stop::Fork => {}
        }
        Ok(())
    }

    /// Probes allocator libraries loaded with dlopen, and the images of children's
    /// execs.
    fn rescan(&mut self, root: u32) -> Result<()> {
        for (pid, state) in self.probes.traced().unwrap_or_default() {
            // A process gone (a zombie its parent has yet to reap) loads nothing more.
            if state.exited() || !self.proc_root.running(pid) {
                continue;
            }
            let files = self.discovery.process(pid).files;
            // A child may exit between the scan and the attach.
            if let Err(e) = self.attach(pid, files) {
                if pid == root {
                    return Err(e);
                }
                unless_gone(&self.proc_root, pid, "attach to the allocator of a new image", &e);
            }
            refresh_unwind(&mut self.probes, &self.proc_root, pid);
        }
        Ok(())
    }

    /// Paces the agent of each process of the command that runs one (see
    /// [`crate::agent::pace`]), once a turn.
    fn pace(&mut self) {
        // A running --pid's agent is paced by its guardian: one writer per process.
        if self.args.pid.is_some() {
            return;
        }
        let (Some(agent), Interval::Paced(_)) = (self.agent.as_deref(), self.interval) else { return };
        for (pid, state) in self.probes.traced().unwrap_or_default() {
            if state.exited() {
                self.paced.remove(&pid);
                continue;
            }
            if !self.paced.contains_key(&pid) {
                // Not yet loaded (or not at all: a child that cleared LD_PRELOAD): again
                // at the next turn.
                match Paced::open(&self.proc_root, pid, agent) {
                    Ok(paced) => self.paced.insert(pid, paced),
                    Err(_) => continue,
                };
            }
            let paced = self.paced.get_mut(&pid).expect("inserted above");
            match paced.turn() {
                Ok(Some(rate)) => debug!(pid, rate, "agent's interval paced"),
                Ok(None) => {}
                // Another image, or gone: opened again at its next turn.
                Err(_) => {
                    self.paced.remove(&pid);
                }
            }
        }
    }

    /// Scans `pid`, held as `hold`, for what holds its unfreed blocks; a failure, or a
    /// combination not supported yet, is said and the report goes on without.
    fn scan(&mut self, pid: u32, hold: Hold, info: &ProcessInfo) {
        if crate::runtimes::python::runs(&info.maps) {
            return self.scan_python(pid, hold, info);
        }
        let budget_ms = self.args.holders_budget.unwrap_or(f64::from(crate::holders::NATIVE_BUDGET_MS));
        let glibc = info.allocator == Some(crate::probes::targets::Allocator::Glibc);
        let sampled = self.agent.is_some();
        if sampled && !glibc {
            let allocator = info.allocator.map_or("an unknown allocator", |a| a.name());
            let why = format!("sampled blocks are sized, and the blocks between them found, from glibc malloc's chunk headers: not supported yet for {allocator} (scan it without --agent)");
            warn!(pid, "holders scan: {why}");
            self.scans.insert(pid, Scanned { outcome: Err(why), budget_ms, info: info.clone() });
            return;
        }
        let plan = Plan {
            hold,
            budget: Duration::from_secs_f64(budget_ms / 1e3),
            // A command's blocks were all seen from its start, unless sampled.
            glibc_chunks: glibc && (sampled || self.args.pid.is_some()),
            window: self.args.pid.is_some(),
        };
        let scanned = self
            .known_blocks(pid, matches!(hold, Hold::Stop))
            .and_then(|blocks| crate::holders::scan::scan(&self.proc_root, pid, plan, blocks));
        let outcome = match scanned {
            Ok(outcome) => {
                let pause_ms = outcome.pause.as_secs_f64() * 1e3;
                info!(pid, pause_ms, complete = outcome.complete, "holders scanned");
                Ok(outcome)
            }
            Err(e) => {
                warn!(pid, "holders scan: {e:#}");
                Err(format!("{e:#}"))
            }
        };
        self.scans.insert(pid, Scanned { outcome, budget_ms, info: info.clone() });
    }

    /// What holds the sampled objects of CPython process `pid`, walked from its
    /// globals and frames (see [`crate::runtimes::python::holders`]).
    fn scan_python(&mut self, pid: u32, hold: Hold, info: &ProcessInfo) {
        let budget_ms = self.args.holders_budget.unwrap_or(f64::from(crate::holders::RUNTIME_BUDGET_MS));
        let budget = Duration::from_secs_f64(budget_ms / 1e3);
        let root =
            info.root.clone().unwrap_or_else(|| self.proc_root.in_root(pid, std::path::Path::new("/")));
        let running = matches!(hold, Hold::Stop);
        let walked = crate::runtimes::python::holders::interpreter(pid, &info.maps, &root).and_then(|py| {
            let known = self.known_blocks(pid, running)?;
            crate::runtimes::python::holders::holders(&self.proc_root, pid, &py, &known, budget, running)
        });
        let outcome = match walked {
            Ok(found) => {
                let pause_ms = found.pause.as_secs_f64() * 1e3;
                info!(pid, pause_ms, "Python's objects walked");
                Ok(found)
            }
            Err(e) => {
                warn!(pid, "what holds Python's objects: {e:#}");
                Err(format!("{e:#}"))
            }
        };
        self.python.insert(pid, outcome);
    }

    /// The unfreed blocks of `pid` in the live table, reckoned at the window's end
    /// where it still `runs`.
    fn known_blocks(&self, pid: u32, runs: bool) -> Result<Vec<Known>> {
        let now = if runs { self.now_ms } else { crate::monotonic_ms() };
        Ok(crate::holders::scan::known_blocks(&self.probes, pid, now, runs)?)
    }

    /// The report of what is still unfreed; the agent stopped first.
    fn finish(mut self, mut tracer: Option<Tracer>, session: Option<Session>) -> Result<Report> {
        // The figures are of the window's end, not of after a scan's pause.
        self.now_ms = crate::monotonic_ms();
        if let (true, Some(pid)) = (self.args.holders, self.args.pid) {
            // The scan holds every thread itself: the hold for the exit goes first.
            if let Some(t) = tracer.take() {
                t.release();
            }
            if self.proc_root.running(pid) {
                let info = capture(&mut self.discovery, pid, true);
                self.scan(pid, Hold::Stop, &info);
            }
        }
        let symbolizer = Symbolizer::new(Wrappers::new(&self.args.tables.wrappers));
        let traced: HashMap<u32, _> = self.probes.traced()?.into_iter().collect();
        let mut report = report_of(
            &self.probes,
            &mut self.discovery,
            &traced,
            self.infos,
            &symbolizer,
            self.sample_bytes,
            self.now_ms,
        )?;
        for (pid, scanned) in &self.scans {
            crate::holders::names::attach(&mut report, *pid, scanned, &symbolizer, &|id| {
                self.probes.stack(id)
            });
        }
        for (pid, found) in std::mem::take(&mut self.python) {
            let Some(process) = report.processes.iter_mut().find(|p| p.pid == pid) else { continue };
            match found {
                Ok(found) => process.set_holders(found),
                Err(why) => {
                    process.notes.push(format!("What holds its Python objects was not walked: {why}"))
                }
            }
        }
        report.set_apart(&crate::suppressions::Suppressions::new(&self.args.tables.suppress));
        report.sample_bytes = self.sample_bytes;
        if self.agent.is_some() {
            report.method = crate::model::Method::Agent;
            // Where the pace moved it, the notes speak of the interval at the end.
            let root = session.as_ref().map(Session::pid).or(tracer.as_ref().map(Tracer::root));
            let paced = session.as_ref().map(Session::rate).or_else(|| Some(self.paced.get(&root?)?.rate()));
            if let Some(rate) = paced.filter(|_| self.interval.paced()) {
                report.sample_bytes = rate;
                report.paced = true;
            }
            if let Some(session) = session {
                // The agent's redirections are undone; its code stays mapped, idle.
                if let Some(t) = tracer {
                    t.release();
                }
                let pid = session.pid();
                match session.stop() {
                    Ok(slots) => info!(pid, slots, "agent stopped"),
                    Err(e) => warn!(pid, "stop the agent: {e:#}"),
                }
            }
        }
        report.add_notes();
        let counters = self.probes.counters()?;
        for (name, value) in counters.nonzero() {
            warn!(counter = name, value, "allocations not fully accounted");
        }
        Ok(report)
    }
}

fn exited(pid: u32) -> anyhow::Error {
    anyhow::anyhow!("pid {pid} exited while leakmon was attaching")
}

/// Prints `report` in `format` on stdout.
fn write(report: &Report, format: Format) -> Result<()> {
    let out: Vec<u8> = match format {
        Format::Table => table::render(report).into_bytes(),
        Format::Json => (report.to_json() + "\n").into_bytes(),
        Format::Folded => folded::render(report).into_bytes(),
        Format::Svg => flamegraph::render(report, "Unfreed memory").context("draw the flame graph")?,
        Format::Pprof => pprof::encode(&pprof::profile(report, crate::unix_nanos())),
    };
    std::io::stdout().write_all(&out).context("write report")?;
    Ok(())
}

/// `report --runtime`: the runtime's own heap profiler, for the window.
fn runtime_report(args: &ReportArgs) -> Result<()> {
    let (Some(pid), Some(duration)) = (args.pid, args.duration) else {
        bail!("--runtime goes with --pid and --duration: it samples a running process for a window");
    };
    if args.agent {
        bail!("--runtime and --agent are two ways of sampling: choose one");
    }
    count_signals();
    let sample_bytes = args.tables.sample_bytes;
    let report =
        crate::report::runtime::report(pid, sample_bytes, Duration::from_secs_f64(duration), &|| {
            signals_received() > 0
        })?;
    write(&report, args.format)
}

/// `report --holders --pid` on a Node.js process or a JVM: its window's surviving
/// objects by what holds them, from the runtime's own means (heap snapshots at the
/// window's start and end; JFR's paths from GC roots at its end).
fn runtime_holders(args: &ReportArgs, pid: u32, runtime: crate::runtimes::Runtime) -> Result<()> {
    let title = runtime.support().title();
    let Some(duration) = args.duration else {
        bail!("--holders on {title} takes --duration: the window whose surviving objects it names");
    };
    if args.agent {
        bail!("--holders on {title} asks the runtime what holds its objects; --agent samples the native heap: choose one");
    }
    count_signals();
    let budget = Duration::from_secs_f64(
        args.holders_budget.unwrap_or(f64::from(crate::holders::RUNTIME_BUDGET_MS)) / 1e3,
    );
    let window = Duration::from_secs_f64(duration);
    let stop = || signals_received() > 0;
    let found = match runtime {
        crate::runtimes::Runtime::Node => {
            crate::runtimes::node::holders::holders(pid, window, budget, &stop)?
        }
        crate::runtimes::Runtime::Jvm => crate::runtimes::jvm::holders(pid, window, budget, &stop)?,
    };
    let report = crate::report::runtime::holders_report(pid, runtime.name(), found);
    write(&report, args.format)
}

/// Whether `pid` runs CPython (mapped: its executable or libpython).
fn python_runs(proc_root: &ProcRoot, pid: u32) -> bool {
    proc_root.maps(pid).is_ok_and(|maps| crate::runtimes::python::runs(&maps))
}

/// Says why attaching to `pid` failed, unless the process is gone: a child that exits
/// right after its fork or exec (a shell's `exit 3`) takes its links' target with it,
/// which is no news.
fn unless_gone(proc_root: &ProcRoot, pid: u32, what: &str, e: &anyhow::Error) {
    if proc_root.running(pid) {
        warn!(pid, "{what}: {e:#}");
    } else {
        tracing::debug!(pid, "{what}: {e:#} (the process is gone)");
    }
}

/// Refuses arguments that cannot work, before anything is loaded.
fn check(args: &ReportArgs, proc_root: &ProcRoot) -> Result<()> {
    // Options that cannot go together are said before any process is looked at.
    if args.holders && args.runtime {
        bail!("--holders scans the native heap; --runtime asks the runtime's profiler: choose one");
    }
    if let Some(pid) = args.pid {
        proc_root.check_process(pid).map_err(|e| anyhow::anyhow!(e))?;
        if pid == std::process::id() {
            bail!("leakmon does not trace itself");
        }
        if args.holders {
            crate::holders::stop::refuse_traced(proc_root, pid)?;
            // Whoever may read its memory may ptrace it: known now, before anything
            // is loaded, not at the window's end.
            crate::ptrace::remote::open_mem_for(proc_root, pid, false)?;
        }
    }
    if args.duration.is_some() && args.pid.is_none() {
        bail!("--duration goes with --pid; a command is watched until it exits");
    }
    if let Some(d) = args.duration {
        if !(d.is_finite() && d > 0.0) {
            bail!("--duration must be a positive number of seconds, not {d}");
        }
        if d > crate::values::MAX_DURATION.as_secs_f64() {
            bail!("--duration {d} is longer than a year");
        }
    }
    if args.format == Format::Pprof && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        bail!("--format pprof writes a binary profile: redirect it to a file (> heap.pb.gz)");
    }
    Ok(())
}

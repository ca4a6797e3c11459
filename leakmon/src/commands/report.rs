//! `leakmon report`: what one command, or one running process over a window, left
//! unfreed, grouped by call stack.

use std::{
    collections::HashMap,
    io::Write as _,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use tracing::{info, warn};

use super::{
    capture, count_signals, load_probes, python_at_exit, refresh_unwind, report_of, signals_received,
};
use crate::{
    agent::session::Session,
    cli::{Format, ReportArgs},
    discovery::Discovery,
    probes::Probes,
    procfs::ProcRoot,
    report::{flamegraph, folded, pprof, table, ProcessInfo, Report},
    symbolize::Symbolizer,
    tracer::{RootExit, Stop, Tracer},
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
    let mut probes = load_probes(&args.tables, false)?;
    let mut discovery = Discovery::new(proc_root.clone());
    // A running process (and the children it forks while watched) gets probes of its
    // own: the kernel puts breakpoints in those processes only, and the rest of the
    // host pays nothing. A command's process tree, which may fork and exec many
    // times, shares system-wide probes on its allocator files.
    let per_process = args.pid.is_some();
    // With the agent, its two markers are the only probes: the process samples itself.
    let agent = args.agent.then(crate::agent::install).transpose()?;
    let sample_bytes = match (&agent, args.tables.sample_bytes) {
        (Some(_), 0) => crate::agent::DEFAULT_SAMPLE_BYTES,
        (_, bytes) => bytes,
    };
    let attach = |probes: &mut Probes, pid: u32, files: Vec<std::path::PathBuf>| -> Result<()> {
        if let Some(agent) = agent.as_deref() {
            // On every process mapping the agent's file: none but those it is loaded
            // into, here or by another leakmon (whose samples the kernel side skips).
            // A probe scoped to the process would not fire in a child forked from a
            // thread no tracer holds, which gets no probes of its own.
            probes.attach_agent(None, &crate::agent::files(agent))?;
        } else if per_process {
            probes.attach_process(pid, &files)?;
        } else {
            probes.attach_libraries(files)?;
        }
        Ok(())
    };
    let exited = |pid: u32| anyhow::anyhow!("pid {pid} exited while leakmon was attaching");
    if let Some(pid) = args.pid {
        // A process that ends meanwhile makes the kernel refuse its links: say so.
        if let Err(e) = attach(&mut probes, pid, discovery.process(pid).files) {
            return Err(if proc_root.running(pid) { e } else { exited(pid) });
        }
    }
    count_signals();

    let mut session = None;
    let mut tracer = if let Some(pid) = args.pid {
        probes.trace(pid)?;
        if let Some(agent) = agent.as_deref() {
            // Markers first, then the agent: no sample fires unprobed.
            let (loaded, slots) = Session::start(pid, agent, sample_bytes)
                .with_context(|| format!("load the agent into pid {pid}"))?;
            info!(pid, slots, sample_bytes, "agent loaded");
            session = Some(loaded);
        }
        refresh_unwind(&mut probes, &proc_root, pid);
        match Tracer::seize(pid) {
            Ok(tracer) => Some(tracer),
            Err(_) if !proc_root.running(pid) => return Err(exited(pid)),
            Err(e) => {
                warn!("cannot hold pid {pid} at exit ({e}); its stacks resolve only while it runs");
                None
            }
        }
    } else {
        let env = match agent.as_deref() {
            Some(agent) => vec![
                ("LD_PRELOAD".into(), crate::agent::preload(agent, std::env::var_os("LD_PRELOAD"))),
                (crate::agent::SAMPLE_BYTES_ENV.into(), sample_bytes.to_string().into()),
            ],
            None => Vec::new(),
        };
        let mut tracer = Tracer::spawn(&args.command, &env)?;
        // Stopped at its exec, before its first instruction: probe its executable (a
        // static allocator), the libraries it will load and what LD_PRELOAD names.
        attach(&mut probes, tracer.root(), discovery.image(tracer.root()))?;
        probes.trace(tracer.root())?;
        tracer.resume()?;
        Some(tracer)
    };
    if probes.attached_files() == 0 {
        if let Some(pid) = args.pid.filter(|pid| !proc_root.running(*pid)) {
            return Err(exited(pid));
        }
        bail!("found no allocator (libc or another malloc) to probe");
    }
    let root = args.pid.or(tracer.as_ref().map(Tracer::root)).expect("a pid or a command");
    info!(pid = root, "watching");

    let mut infos: HashMap<u32, ProcessInfo> = HashMap::new();
    let mut last_scan = Instant::now();
    let deadline = args.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    // With a command, the first Ctrl-C reaches it too (same terminal): wait for it to
    // exit. A second one reports at once.
    let signals_to_stop = if args.pid.is_some() { 1 } else { 2 };
    loop {
        if let Some(t) = tracer.as_mut() {
            let root_pid = t.root();
            let mut entry_error = None;
            t.poll(|pid, stop| match stop {
                Stop::Exit => {
                    let mut info = capture(&mut discovery, pid, false);
                    info.python = python_at_exit(&probes, &proc_root, pid, &info.maps);
                    infos.insert(pid, info);
                }
                // A new image may bring its own allocator or preload one (`env
                // LD_PRELOAD=... cmd`): probe it while it is held, before its first
                // instruction.
                Stop::Exec => {
                    if let Err(e) = attach(&mut probes, pid, discovery.image(pid)) {
                        unless_gone(&proc_root, pid, "attach to the allocator of a new image", &e);
                    }
                }
                // Its libraries are mapped, wherever the dynamic linker found them
                // (LD_LIBRARY_PATH, rpath): probe the allocators among them and give
                // the kernel their unwind tables before its main runs.
                Stop::Entry => {
                    if let Err(e) = attach(&mut probes, pid, discovery.process(pid).files) {
                        unless_gone(&proc_root, pid, "attach to the allocator of a new image", &e);
                    }
                    // A program LD_PRELOAD cannot reach (statically linked), or one with
                    // its own allocator built in, gets the agent's inline hooks here.
                    if let Some(agent) = agent.as_deref() {
                        let loaded = crate::agent::inject::load_at_entry(
                            &proc_root,
                            pid,
                            agent,
                            sample_bytes,
                            crate::tracer::OPTIONS,
                        );
                        match loaded {
                            Ok(0) => {}
                            Ok(functions) => info!(pid, functions, "agent's inline hooks on"),
                            Err(e) if pid == root_pid => entry_error = Some(e),
                            Err(e) => unless_gone(&proc_root, pid, "load the agent", &e),
                        }
                    }
                    refresh_unwind(&mut probes, &proc_root, pid);
                }
                // A child of a process with probes of its own needs its own before it
                // runs (the parent's do not fire in it).
                Stop::Fork if per_process => {
                    if let Err(e) = attach(&mut probes, pid, discovery.process(pid).files) {
                        unless_gone(&proc_root, pid, "attach to a new child", &e);
                    }
                }
                Stop::Fork => {}
            })?;
            if let Some(e) = entry_error {
                return Err(e.context(format!("load the agent into pid {root_pid}")));
            }
            if let Some(exit) = t.root_exit() {
                match exit {
                    RootExit::Code(code) => info!(code, "command exited"),
                    RootExit::Signal(signal) => info!(%signal, "command killed by signal"),
                }
                break;
            }
        } else if !proc_root.exists(root) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) || signals_received() >= signals_to_stop {
            break;
        }
        for pid in probes.unwind_stale() {
            refresh_unwind(&mut probes, &proc_root, pid);
        }
        if last_scan.elapsed() >= RESCAN {
            // Allocator libraries loaded with dlopen, and the images of children's execs.
            last_scan = Instant::now();
            for (pid, state) in probes.traced().unwrap_or_default() {
                // A process gone (a zombie its parent has yet to reap) loads nothing more.
                if state.exited() || !proc_root.running(pid) {
                    continue;
                }
                let files = discovery.process(pid).files;
                // A child may exit between the scan and the attach.
                if let Err(e) = attach(&mut probes, pid, files) {
                    if pid == root {
                        return Err(e);
                    }
                    unless_gone(&proc_root, pid, "attach to the allocator of a new image", &e);
                }
                refresh_unwind(&mut probes, &proc_root, pid);
            }
        }
        std::thread::sleep(POLL);
    }

    let mut report = build_report(&probes, &mut discovery, infos, &args.tables.wrappers)?;
    report.set_apart(&crate::suppressions::Suppressions::new(&args.tables.suppress));
    report.sample_bytes = sample_bytes;
    if agent.is_some() {
        report.method = crate::model::Method::Agent;
        if let Some(session) = session.take() {
            // The agent's redirections are undone; its code stays mapped, idle.
            if let Some(t) = tracer.take() {
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
    let counters = probes.counters()?;
    for (name, value) in counters.nonzero() {
        warn!(counter = name, value, "allocations not fully accounted");
    }
    write(&report, args.format)
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
    let sample_bytes = match args.tables.sample_bytes {
        0 => crate::runtimes::DEFAULT_SAMPLE_BYTES,
        bytes => bytes,
    };
    let report =
        crate::report::runtime::report(pid, sample_bytes, Duration::from_secs_f64(duration), &|| {
            signals_received() > 0
        })?;
    write(&report, args.format)
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
    if let Some(pid) = args.pid {
        proc_root.check_process(pid).map_err(|e| anyhow::anyhow!(e))?;
        if pid == std::process::id() {
            bail!("leakmon does not trace itself");
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

fn build_report(
    probes: &Probes,
    discovery: &mut Discovery,
    infos: HashMap<u32, ProcessInfo>,
    wrappers: &[String],
) -> Result<Report> {
    let traced: HashMap<u32, _> = probes.traced()?.into_iter().collect();
    report_of(probes, discovery, &traced, infos, &Symbolizer::new(Wrappers::new(wrappers)))
}

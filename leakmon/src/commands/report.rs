//! `leakmon report`: what one command, or one running process over a window, left
//! unfreed, grouped by call stack.

use std::{
    collections::HashMap,
    io::Write as _,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use tracing::{info, warn};

use super::{attach_all, capture, count_signals, load_probes, report_of, signals_received};
use crate::{
    cli::{Format, ReportArgs},
    discovery,
    probes::Probes,
    procfs::ProcRoot,
    report::{flamegraph, folded, pprof, table, ProcessInfo, Report},
    symbolize::Symbolizer,
    tracer::{RootExit, Tracer},
};

const POLL: Duration = Duration::from_millis(10);

pub fn report(args: &ReportArgs) -> Result<()> {
    let proc_root = ProcRoot::default();
    if let Some(pid) = args.pid {
        if !proc_root.exists(pid) {
            bail!("no process with pid {pid}");
        }
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
    }
    if args.format == Format::Pprof && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        bail!("--format pprof writes a binary profile: redirect it to a file (> heap.pb.gz)");
    }
    let mut probes = load_probes(&args.tables, false)?;
    let self_pid = std::process::id();
    let watched = args.pid.unwrap_or(self_pid);
    let libs = discovery::libraries_of(&proc_root, watched)
        .into_iter()
        .chain(discovery::libraries_in_linker_cache());
    attach_all(&mut probes, libs)?;
    if probes.attached_files() == 0 {
        bail!("found no allocator library (libc) to probe for pid {watched}");
    }
    count_signals();

    let mut tracer = if let Some(pid) = args.pid {
        probes.trace(pid)?;
        Tracer::seize(pid)
            .map_err(|e| warn!("cannot hold pid {pid} at exit ({e}); its stacks resolve only while it runs"))
            .ok()
    } else {
        let mut tracer = Tracer::spawn(&args.command)?;
        probes.trace(tracer.root())?;
        tracer.resume()?;
        Some(tracer)
    };
    let root = args.pid.or(tracer.as_ref().map(Tracer::root)).expect("a pid or a command");
    info!(pid = root, "watching");

    let mut infos: HashMap<u32, ProcessInfo> = HashMap::new();
    let deadline = args.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    // With a command, the first Ctrl-C reaches it too (same terminal): wait for it to
    // exit. A second one reports at once.
    let signals_to_stop = if args.pid.is_some() { 1 } else { 2 };
    loop {
        if let Some(t) = tracer.as_mut() {
            t.poll(|pid| {
                infos.insert(pid, capture(&proc_root, pid, false));
            })?;
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
        std::thread::sleep(POLL);
    }

    let report = build_report(&probes, &proc_root, infos)?;
    let counters = probes.counters()?;
    for (name, value) in counters.nonzero() {
        warn!(counter = name, value, "allocations not fully accounted");
    }
    let out: Vec<u8> = match args.format {
        Format::Table => table::render(&report).into_bytes(),
        Format::Json => (report.to_json() + "\n").into_bytes(),
        Format::Folded => folded::render(&report).into_bytes(),
        Format::Svg => flamegraph::render(&report, "Unfreed memory").context("draw the flame graph")?,
        Format::Pprof => pprof::encode(&pprof::profile(&report, crate::unix_nanos())),
    };
    std::io::stdout().write_all(&out).context("write report")?;
    Ok(())
}

fn build_report(probes: &Probes, proc_root: &ProcRoot, infos: HashMap<u32, ProcessInfo>) -> Result<Report> {
    let traced: HashMap<u32, _> = probes.traced()?.into_iter().collect();
    report_of(probes, proc_root, &traced, infos, &Symbolizer::default())
}

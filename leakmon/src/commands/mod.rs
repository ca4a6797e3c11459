//! The CLI's commands, wiring the data path together.

pub mod report;
pub mod run;

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{anyhow, Result};
use tracing::debug;

use crate::{
    capabilities,
    cli::TableArgs,
    probes::{Probes, Settings},
    procfs::ProcRoot,
};

/// Gives the kernel unwind tables for `pid`'s executable mappings as they are now, so
/// its stacks are walked through `.eh_frame`; a failure costs only stack depth.
pub(crate) fn refresh_unwind(probes: &mut Probes, proc_root: &ProcRoot, pid: u32) {
    let Ok(maps) = proc_root.maps(pid) else { return };
    let root = proc_root.path().join(pid.to_string()).join("root");
    if let Err(e) = probes.unwind_process(pid, &maps, &root) {
        debug!(pid, "unwind tables: {e:#}");
    }
    crate::runtimes::attach_walkers(probes, pid, &maps, &root);
}

/// Checks privileges and kernel features, then loads the programs.
pub(crate) fn load_probes(tables: &TableArgs, trace_all: bool) -> Result<Probes> {
    capabilities::check()?;
    let settings = Settings {
        trace_all,
        max_live: tables.max_live.get(),
        max_totals: tables.max_totals.get(),
        max_stacks: tables.max_stacks.get(),
        sample_bytes: tables.sample_bytes,
        unwind_rows: tables.unwind_rows,
        read_by_entry: tables.read_tables_by_entry,
    };
    Probes::load(&settings).map_err(|e| {
        if e.is_permission() {
            anyhow!("the kernel refused to load leakmon's eBPF programs (permission denied): run as root, or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN")
        } else {
            anyhow!(e)
        }
    })
}

/// Per-process unfreed totals of the traced processes, each at its current image.
pub(crate) fn unfreed(
    probes: &Probes,
    traced: &std::collections::HashMap<u32, leakmon_common::ProcState>,
) -> Result<Vec<crate::store::ProcessTotals>> {
    let totals = probes.totals(|k| traced.contains_key(&k.tgid))?;
    Ok(crate::store::group(totals, |pid| traced.get(&pid).map(|s| s.gen)))
}

/// What a report of the `traced` processes is made of, read from the kernel tables and
/// /proc: their unfreed totals and stacks, and what is known of each process. `infos`
/// holds what was captured of processes already gone; the others are captured now,
/// alive. Symbolizing it ([`Snapshot::into_report`]) may happen later, on another
/// thread.
pub(crate) struct Snapshot {
    totals: Vec<crate::store::ProcessTotals>,
    infos: std::collections::HashMap<u32, crate::report::ProcessInfo>,
    stacks: std::collections::HashMap<u64, Vec<u64>>,
    /// What the live blocks say: the spread of sampled figures, and what was in
    /// flight (set apart from the totals) per process.
    live: crate::store::live::Live,
    in_flight: std::collections::HashMap<u32, crate::store::live::InFlight>,
    /// The moment the figures are of (the monotonic clock, ms): blocks' ages and what
    /// is in flight are reckoned at it.
    now_ms: u64,
}

impl Snapshot {
    /// `rate` is the sampling interval the figures were taken at (0: exact); `now_ms`
    /// the moment they are of.
    pub(crate) fn take(
        probes: &Probes,
        discovery: &mut crate::discovery::Discovery,
        traced: &std::collections::HashMap<u32, leakmon_common::ProcState>,
        mut infos: std::collections::HashMap<u32, crate::report::ProcessInfo>,
        rate: u64,
        now_ms: u64,
    ) -> Result<Self> {
        // Processes captured at their exit; the others still run.
        let gone: std::collections::HashSet<u32> = infos.keys().copied().collect();
        for (&pid, state) in traced {
            let info = infos.entry(pid).or_insert_with(|| capture(discovery, pid, true));
            info.incomplete = state.flags & leakmon_common::proc_flags::INCOMPLETE != 0;
        }
        // A child gone before its mappings were read (one forked from a thread no tracer
        // holds) had its parent's, while it ran its parent's image.
        for (&pid, state) in traced {
            let parent = infos.get(&state.parent).filter(|_| state.parent != 0 && state.parent != pid);
            if let (Some(parent), true) = (parent, infos.get(&pid).is_some_and(|i| i.maps.is_empty())) {
                let inherited = crate::report::ProcessInfo {
                    root: None,
                    incomplete: infos[&pid].incomplete,
                    ..parent.clone()
                };
                infos.insert(pid, inherited);
            }
        }
        infos.retain(|pid, _| traced.contains_key(pid));
        let mut totals = unfreed(probes, traced)?;
        let runs = |pid: u32| !gone.contains(&pid);
        // The live table is walked only where it says something: sampled figures, or a
        // process still running.
        let live = if rate > 0 || traced.keys().any(|&pid| runs(pid)) {
            let blocks = probes.live(|tgid| traced.contains_key(&tgid))?;
            let gen = |pid: u32| traced.get(&pid).map(|s| s.gen);
            crate::store::live::read(blocks, gen, runs, now_ms)
        } else {
            crate::store::live::Live::default()
        };
        let in_flight = crate::store::live::set_apart(&mut totals, &live.in_flight);
        let stacks = totals
            .iter()
            .flat_map(|p| &p.stacks)
            .filter_map(|s| Some((s.stack_id, probes.stack(s.stack_id)?)))
            .collect();
        Ok(Self { totals, infos, stacks, live, in_flight, now_ms })
    }

    /// The report: stacks symbolized, and the clean processes with zero.
    pub(crate) fn into_report(self, symbolizer: &crate::symbolize::Symbolizer) -> crate::report::Report {
        let Self { totals, infos, stacks, live, in_flight, now_ms } = self;
        let mut report = crate::report::Report::build(
            totals,
            &infos,
            |id| stacks.get(&id).cloned(),
            &live.spreads,
            symbolizer,
            now_ms,
        );
        report.include_clean(&infos);
        report.set_in_flight(&in_flight);
        report
    }
}

/// The report of the `traced` processes, symbolized now (see [`Snapshot`]).
pub(crate) fn report_of(
    probes: &Probes,
    discovery: &mut crate::discovery::Discovery,
    traced: &std::collections::HashMap<u32, leakmon_common::ProcState>,
    infos: std::collections::HashMap<u32, crate::report::ProcessInfo>,
    symbolizer: &crate::symbolize::Symbolizer,
    rate: u64,
    now_ms: u64,
) -> Result<crate::report::Report> {
    Ok(Snapshot::take(probes, discovery, traced, infos, rate, now_ms)?.into_report(symbolizer))
}

/// Name, mappings and allocator of a process; `alive` adds its root for symbolizing
/// through it.
pub(crate) fn capture(
    discovery: &mut crate::discovery::Discovery,
    pid: u32,
    alive: bool,
) -> crate::report::ProcessInfo {
    let proc_root = discovery.proc_root().clone();
    let mut maps = proc_root.maps(pid).unwrap_or_default();
    let allocator = discovery.of_maps(pid, &maps).allocator;
    let root = proc_root.in_root(pid, std::path::Path::new("/"));
    // A file deleted since it was mapped is reachable only through the process, which
    // is about to go: hold it open and name it by our descriptor, for symbols later.
    let mut held = Vec::new();
    if !alive {
        for m in maps.iter_mut().filter(|m| m.deleted && m.executable) {
            if let Ok(file) = std::fs::File::open(m.open_path(&root)) {
                m.path = std::path::PathBuf::from(format!(
                    "/proc/self/fd/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&file)
                ));
                m.deleted = false;
                held.push(std::sync::Arc::new(file));
            }
        }
    }
    crate::report::ProcessInfo {
        comm: proc_root.comm(pid).unwrap_or_default(),
        allocator,
        maps,
        root: alive.then_some(root),
        incomplete: false,
        held,
        walked: None,
    }
}

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Counts SIGINT and SIGTERM instead of dying on them.
pub(crate) fn count_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only touches an atomic.
        unsafe { sigaction(signal, &action) }.expect("install signal handler");
    }
}

/// SIGINT/SIGTERM received so far.
pub(crate) fn signals_received() -> usize {
    SIGNALS.load(Ordering::SeqCst)
}

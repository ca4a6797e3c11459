//! `leakmon run`: the daemon. Traces every process (or the chosen ones), purges the
//! state of processes that exit or exec, and logs the largest unfreed totals.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use leakmon_common::event;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    time::interval,
};
use tracing::{info, warn};

use super::{attach_all, load_probes};
use crate::{cli::RunArgs, discovery, ingest, probes::Probes, procfs::ProcRoot, report::table::bytes, store};

/// How often exited processes' state is dropped: one pass over the tables per tick.
const PURGE_EVERY: Duration = Duration::from_secs(5);
/// How often new library files (new containers, upgrades) are looked for.
const RESCAN_EVERY: Duration = Duration::from_secs(30);

pub fn run(args: &RunArgs) -> Result<()> {
    let proc_root = ProcRoot::default();
    for &pid in &args.pids {
        if !proc_root.exists(pid) {
            bail!("no process with pid {pid}");
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(daemon(args, proc_root))
}

async fn daemon(args: &RunArgs, proc_root: ProcRoot) -> Result<()> {
    let trace_all = args.pids.is_empty();
    let mut probes = load_probes(&args.tables, trace_all)?;
    attach_all(&mut probes, libraries(&proc_root, &args.pids))?;
    for &pid in &args.pids {
        probes.trace(pid)?;
    }
    info!(
        libraries = probes.attached_files(),
        mode = if trace_all { "all processes" } else { "chosen processes" },
        "leakmon running"
    );

    let ring = probes.take_events()?;
    // SAFETY: the ring buffer owns its fd and outlives the registration (both dropped
    // together at the end of this function).
    let mut events = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("watch the event ring buffer: {e}"))?;
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut summary = interval(Duration::from_secs(u64::from(args.interval.get())));
    let mut purge = interval(PURGE_EVERY);
    let mut rescan = interval(RESCAN_EVERY);
    let mut exited: HashSet<u32> = HashSet::new();
    let mut replaced: HashMap<u32, u32> = HashMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();

    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            guard = events.readable_mut() => {
                let mut guard = guard.context("wait for events")?;
                while let Some(record) = guard.get_inner_mut().next() {
                    let Some(ev) = ingest::decode(&record) else {
                        warn!(len = record.len(), "malformed lifecycle record");
                        continue;
                    };
                    match ev.kind {
                        event::EXIT => { exited.insert(ev.tgid); }
                        event::EXEC => {
                            replaced.insert(ev.tgid, ev.gen);
                            names.insert(ev.tgid, ingest::comm(&ev));
                        }
                        event::FORK => { names.insert(ev.child, ingest::comm(&ev)); }
                        _ => {}
                    }
                }
                guard.clear_ready();
            }
            _ = summary.tick() => log_summary(&probes, &proc_root, &mut names, args.top),
            _ = purge.tick() => {
                let traced = probes.traced().unwrap_or_default();
                exited.extend(traced.iter().map(|(pid, _)| *pid).filter(|pid| !proc_root.exists(*pid)));
                if !exited.is_empty() || !replaced.is_empty() {
                    let removed = probes.purge(
                        |tgid, gen| exited.contains(&tgid) || replaced.get(&tgid).is_some_and(|g| gen < *g),
                        |tgid| exited.contains(&tgid),
                    )?;
                    tracing::debug!(processes = exited.len(), images = replaced.len(), removed, "purged");
                    names.retain(|pid, _| !exited.contains(pid));
                    exited.clear();
                    replaced.clear();
                }
            }
            _ = rescan.tick() => {
                if let Err(e) = attach_all(&mut probes, libraries(&proc_root, &args.pids)) {
                    warn!("attach to new libraries: {e:#}");
                }
            }
        }
    }
    info!("stopping: detaching probes");
    drop(events);
    drop(probes);
    Ok(())
}

fn libraries(proc_root: &ProcRoot, pids: &[u32]) -> Vec<std::path::PathBuf> {
    if pids.is_empty() {
        let mut libs = discovery::libraries_of_all(proc_root);
        libs.extend(discovery::libraries_in_linker_cache());
        libs
    } else {
        pids.iter().flat_map(|&pid| discovery::libraries_of(proc_root, pid)).collect()
    }
}

fn log_summary(probes: &Probes, proc_root: &ProcRoot, names: &mut HashMap<u32, String>, top: usize) {
    let traced: HashMap<u32, u32> =
        probes.traced().unwrap_or_default().into_iter().map(|(p, s)| (p, s.gen)).collect();
    let Ok(entries) = probes.totals(|_| true) else { return };
    let groups = store::group(entries, |pid| traced.get(&pid).copied());
    let total: u64 = groups.iter().map(|g| g.bytes).sum();
    info!(processes = groups.len(), unfreed = %bytes(total), "summary");
    for g in groups.iter().take(top) {
        let name = names.entry(g.pid).or_insert_with(|| proc_root.comm(g.pid).unwrap_or_default());
        info!(pid = g.pid, comm = %name, unfreed = %bytes(g.bytes), allocations = g.allocations, stacks = g.stacks.len(), "top process");
    }
    if let Ok(counters) = probes.counters() {
        for (name, value) in counters.nonzero() {
            warn!(counter = name, value, "allocations not fully accounted");
        }
    }
}

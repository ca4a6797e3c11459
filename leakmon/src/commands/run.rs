//! `leakmon run`: the daemon. Samples every process's memory (tier 0), attributes
//! allocations with the probes when asked (tier 1), analyses every series, serves the
//! verdicts, and purges the kernel state of processes that exit or exec.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use leakmon_common::{event, ProcState};
use serde_json::json;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::RwLock,
    time::{interval, MissedTickBehavior},
};
use tracing::{info, warn};

use super::{attach_all, load_probes, refresh_unwind, unfreed};
use crate::{
    analysis::{history::Change, trend::Params},
    cli::{Attach, RunArgs},
    discovery::Discovery,
    export::{
        http::{self, ProfileKind, ProfileRequest, Published, Selector, Shared},
        metrics::Metrics,
        SeriesView,
    },
    ingest,
    monitor::Monitor,
    own_memory,
    probes::{targets::Allocator, Probes},
    procfs::ProcRoot,
    report::{flamegraph, pprof, table::bytes},
    sampler,
    symbolize::Symbolizer,
    wrappers::Wrappers,
};

/// How often exited processes' kernel state is dropped: one pass over the tables.
const PURGE_EVERY: Duration = Duration::from_secs(5);
/// How often new library files (new containers, upgrades) are looked for.
const RESCAN_EVERY: Duration = Duration::from_secs(30);
/// How long after its exec a process's mappings are read for allocator files: by then
/// the dynamic linker has mapped its libraries and preloads.
const AFTER_EXEC: Duration = Duration::from_millis(100);
/// Lifecycle events handled per wake-up of the loop. One per wake-up drained a fork
/// storm's backlog at about one event per sampling tick whenever a tick took longer
/// than the interval (the tick is then always ready, and each wake-up is a coin toss
/// between the ready branches).
const EVENT_BATCH: usize = 4096;

/// Re-reads the options (command line over config file) on SIGHUP.
pub type Reload<'a> = &'a dyn Fn() -> Result<RunArgs, Vec<String>>;

pub fn run(args: &RunArgs, reload: Reload<'_>) -> Result<()> {
    let proc_root = ProcRoot::default();
    let attach = validate(args, &proc_root)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(daemon(args.clone(), attach, proc_root, reload))
}

/// Checks options that clap cannot check alone; returns the attach mode they mean.
fn validate(args: &RunArgs, proc_root: &ProcRoot) -> Result<Attach> {
    for &pid in &args.pids {
        if !proc_root.exists(pid) {
            bail!("no process with pid {pid}");
        }
    }
    let attach = args.attach.unwrap_or(if args.selects() { Attach::Pids } else { Attach::None });
    if attach == Attach::Pids && !args.selects() {
        bail!("--attach pids needs at least one --pid, --comm or --cgroup");
    }
    if args.sample_interval.checked_mul(10).is_none_or(|ten| args.window < ten) {
        bail!(
            "--window must hold at least 10 samples (--sample-interval {:?}, --window {:?})",
            args.sample_interval,
            args.window
        );
    }
    Ok(attach)
}

#[expect(
    clippy::too_many_lines,
    reason = "one select loop over the daemon's event sources reads best in one place"
)]
async fn daemon(mut args: RunArgs, attach: Attach, proc_root: ProcRoot, reload: Reload<'_>) -> Result<()> {
    // From the first request on, /metrics carries leakmon's own families (build info,
    // process_*, its counters at zero) and the JSON endpoints valid empty documents:
    // an empty 200 would read as a healthy target with no series.
    let mut metrics = Metrics::new(args.pid_label);
    let published: Shared = Arc::new(RwLock::new(Published {
        metrics: metrics.render(),
        leaks: json!({ "leaks": [] }).to_string(),
        processes: json!({ "series": [] }).to_string(),
        ready: false,
    }));
    let (profile_tx, mut profile_requests) = tokio::sync::mpsc::channel::<ProfileRequest>(8);
    let web = args.web_config.as_deref().map(crate::export::web_config::WebConfig::load).transpose()?;
    // What the server was started with, to tell a reload that changes it (TLS and users
    // are set when the listener starts).
    let web_in_use = web_config_text(args.web_config.as_deref());
    let server = http::serve(args.listen, published.clone(), profile_tx, web).await?;
    let profiles = spawn_profile_renderer(&args.tables.wrappers, &args.tables.suppress)?;
    let mut discovery = Discovery::new(proc_root.clone());
    // The allocator each process's malloc reaches, as last read from its mappings.
    let mut allocators: HashMap<u32, Allocator> = HashMap::new();

    // The lifecycle tracepoints (exits, execs, OOM kills) cost nothing per allocation,
    // so they are loaded in every mode; the allocator uprobes only when attributing.
    let mut probes = match attach {
        Attach::None => {
            load_probes(&args.tables, false).map_err(|e| warn!("OOM kills will not be counted: {e:#}")).ok()
        }
        Attach::Suspects => Some(load_probes(&args.tables, false)?),
        Attach::All | Attach::Pids => {
            let mut probes = load_probes(&args.tables, attach == Attach::All)?;
            let selected = selected(&args, &proc_root);
            attach_all(&mut probes, libraries(&mut discovery, attach, &selected, &mut allocators))?;
            for &pid in &selected {
                probes.trace(pid)?;
            }
            Some(probes)
        }
    };
    let attributing = attach != Attach::None;
    let system_wide = matches!(attach, Attach::All | Attach::Pids);
    let mut suspects = Suspects::default();
    let queue_dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let malformed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (event_reader, mut events) = match probes.as_mut() {
        Some(p) => {
            let (task, rx) = ingest::spawn_reader(p.take_events()?, queue_dropped.clone(), malformed.clone())
                .map_err(|e| anyhow::anyhow!("watch the event ring buffer: {e}"))?;
            (Some(task), Some(rx))
        }
        None => (None, None),
    };
    // The listener is bound and the programs loaded: keep only what attaching, reading
    // maps and /proc still need.
    if probes.is_some() {
        match crate::capabilities::drop_unneeded() {
            Ok(kept) => tracing::debug!(capabilities = kept, "dropped the capabilities not needed"),
            Err(e) => warn!("could not drop unneeded capabilities: {e}"),
        }
    }
    info!(
        listen = %args.listen,
        attach = ?attach,
        libraries = probes.as_ref().map_or(0, Probes::attached_files),
        sample_interval = ?args.sample_interval,
        window = ?args.window,
        "leakmon running"
    );

    let params = Params { window: args.window.as_secs_f64(), ..Params::default() };
    let mut monitor = Monitor::new(params, args.max_series, args.top_stacks, proc_root.clone())
        .per_process(args.pid_label)
        .wrappers(Wrappers::new(&args.tables.wrappers));
    let started = Instant::now();

    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
    // systemd's watchdog: pinged from this loop, so a loop that hangs gets restarted.
    let mut watchdog_usec = 0;
    let mut watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec)
        .then(|| interval(Duration::from_micros(watchdog_usec) / 2));
    let mut sample = interval(args.sample_interval);
    sample.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut summary = interval(Duration::from_secs(u64::from(args.interval.get())));
    let mut purge = interval(PURGE_EVERY);
    let mut rescan = interval(RESCAN_EVERY);
    // Exited processes by pid, with their generation at exit: a process that got the
    // pid since runs in a later generation and keeps its blocks through the purge.
    let mut exited: HashMap<u32, u32> = HashMap::new();
    let mut replaced: HashMap<u32, u32> = HashMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();
    // Processes that exec'd, to read for allocator files once their libraries are in.
    let mut execed: HashMap<u32, Instant> = HashMap::new();
    let mut batch = Vec::with_capacity(EVENT_BATCH);

    notify(sd_notify::NotifyState::Ready);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                notify(sd_notify::NotifyState::Watchdog);
            }
            Some(request) = profile_requests.recv() => {
                // Only the kernel tables and /proc are read here; symbolizing and
                // rendering, the slow part, run off the loop, which keeps sampling.
                match profile_snapshot(probes.as_ref().filter(|_| attributing), &mut discovery, &monitor, &request) {
                    Ok(snapshot) => {
                        // A renderer gone (it panicked) drops the reply: the client
                        // gets its error from the HTTP side.
                        let _ = profiles.send((snapshot, request.reply));
                    }
                    Err(e) => {
                        let _ = request.reply.send(Err(e));
                    }
                }
            }
            _ = sighup.recv() => {
                notify(sd_notify::NotifyState::Reloading);
                let next = reload().map_err(|problems| problems.join("; ")).and_then(|next| {
                    validate(&next, &proc_root).map(|a| (next, a)).map_err(|e| format!("{e:#}"))
                });
                match next {
                    Ok((next, next_attach)) => {
                        for what in restart_needed(&args, &next, attach, next_attach) {
                            warn!("{what} changes only at restart; keeping the running value");
                        }
                        if (next.web_config.as_deref(), web_config_text(next.web_config.as_deref()))
                            != (args.web_config.as_deref(), web_in_use.clone())
                        {
                            warn!("web.config-file (TLS, users) changes only at restart; keeping the running one");
                        }
                        if next.sample_interval != args.sample_interval {
                            sample = interval(next.sample_interval);
                            sample.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        }
                        if next.interval != args.interval {
                            summary = interval(Duration::from_secs(u64::from(next.interval.get())));
                        }
                        monitor.reconfigure(
                            Params { window: next.window.as_secs_f64(), ..Params::default() },
                            next.max_series,
                            next.top_stacks,
                        );
                        if let Some(p) = probes.as_mut().filter(|_| attach == Attach::Pids) {
                            for pid in next.pids.iter().filter(|pid| !args.pids.contains(pid)) {
                                if let Err(e) = p.trace(*pid) {
                                    warn!(pid, "trace: {e:#}");
                                }
                            }
                            // A pid taken off the list stops being traced, and what was
                            // counted for it goes (its children, traced on their own, stay).
                            for pid in args.pids.iter().filter(|pid| !next.pids.contains(pid)) {
                                match p.detach_process(*pid) {
                                    Ok(()) => info!(pid, "no longer traced"),
                                    Err(e) => warn!(pid, "stop tracing: {e:#}"),
                                }
                            }
                        }
                        let (listen, tables, pid_label) = (args.listen, args.tables.clone(), args.pid_label);
                        let web_config = args.web_config.clone();
                        args = RunArgs { listen, tables, pid_label, web_config, attach: args.attach, ..next };
                        info!(
                            sample_interval = ?args.sample_interval,
                            window = ?args.window,
                            "configuration reloaded"
                        );
                    }
                    Err(e) => warn!("reload failed, keeping the running configuration: {e}"),
                }
                notify(sd_notify::NotifyState::Ready);
            }
            received = async { events.as_mut().expect("guarded").recv_many(&mut batch, EVENT_BATCH).await }, if events.is_some() => {
                // A reader gone (it panicked) closes the queue: stop polling it.
                if received == 0 {
                    events = None;
                }
                for ev in batch.drain(..) {
                    match ev.kind {
                        event::EXIT => {
                            exited.insert(ev.tgid, ev.gen);
                            // The kernel dropped its tables; a process at the same pid gets
                            // its own at the next tick.
                            if let Some(p) = probes.as_mut() {
                                p.forget_unwind(ev.tgid);
                            }
                        }
                        event::EXEC => {
                            replaced.insert(ev.tgid, ev.gen);
                            // The kernel dropped the old image's tables; new ones at the next tick.
                            if let Some(p) = probes.as_mut() {
                                p.forget_unwind(ev.tgid);
                            }
                            if system_wide {
                                execed.insert(ev.tgid, Instant::now());
                            }
                            names.insert(ev.tgid, ingest::comm(&ev));
                        }
                        event::FORK => { names.insert(ev.child, ingest::comm(&ev)); }
                        event::OOM => {
                            // Who it was at the last sample: by now it may be gone.
                            let (service, comm) = monitor
                                .identity_of(ev.tgid)
                                .cloned()
                                .or_else(|| sampler::sample(&proc_root, ev.tgid).map(|v| (v.service, v.comm)))
                                .unwrap_or_else(|| ("unknown".to_owned(), ingest::comm(&ev)));
                            warn!(pid = ev.tgid, service = %service, comm = %comm, "OOM kill");
                            metrics.oom_kill(&service, &comm, ev.tgid);
                        }
                        _ => {}
                    }
                }
            }
            _ = sample.tick() => {
                let now = started.elapsed().as_secs_f64();
                let procs = sampler::sample_all(&proc_root);
                if let Some(p) = probes.as_mut().filter(|_| system_wide) {
                    // New images: a static allocator in the executable, a preloaded one.
                    let due: Vec<u32> = execed.iter().filter(|(_, at)| at.elapsed() >= AFTER_EXEC).map(|(pid, _)| *pid).collect();
                    for pid in due {
                        execed.remove(&pid);
                        let found = discovery.process(pid);
                        match found.allocator {
                            Some(a) => { allocators.insert(pid, a); }
                            None => { allocators.remove(&pid); }
                        }
                        if let Err(e) = attach_all(p, found.files) {
                            warn!(pid, "attach to a new image's allocator: {e:#}");
                        }
                    }
                }
                if attach == Attach::Pids && !(args.comms.is_empty() && args.cgroups.is_empty()) {
                    // Processes matching --comm/--cgroup that started since the last tick.
                    let p = probes.as_mut().expect("loaded with --attach pids");
                    let new: Vec<u32> = selected_in(&args, &procs).into_iter().filter(|pid| p.proc_state(*pid).is_none()).collect();
                    for pid in new {
                        match p.trace(pid) {
                            Ok(()) => info!(pid, "attributing the allocations of a selected process"),
                            Err(e) => warn!(pid, "trace: {e:#}"),
                        }
                    }
                }
                // One read of the process table serves the heap totals and the count.
                let traced: HashMap<u32, ProcState> =
                    probes.as_ref().and_then(|p| p.traced().ok()).unwrap_or_default().into_iter().collect();
                if let Some(p) = probes.as_mut() {
                    // Unwind tables for processes traced since the last tick, and for those
                    // whose stacks reached a library loaded since their tables were made.
                    let mut due: Vec<u32> = traced.keys().copied().filter(|pid| !p.has_unwind(*pid)).collect();
                    due.extend(p.unwind_stale());
                    for pid in due {
                        refresh_unwind(p, &proc_root, pid);
                    }
                }
                let heap = probes.as_ref().filter(|_| attributing).and_then(|p| unfreed(p, &traced).ok());
                monitor.set_incomplete(
                    traced.iter().filter(|(_, s)| s.flags & leakmon_common::proc_flags::INCOMPLETE != 0).map(|(pid, _)| *pid),
                );
                let stack = |id: u64| probes.as_ref().and_then(|p| p.stack(id));
                let (mut views, changes) = monitor.tick(now, &procs, heap.as_deref(), &stack);
                for v in &mut views {
                    v.allocator = v.pids.iter().find_map(|pid| allocators.get(pid)).map(|a| a.name());
                }
                log_changes(&changes);
                if attach == Attach::Suspects {
                    if let Some(p) = probes.as_mut() {
                        suspects.update(p, &mut discovery, &views, args.suspect_duration, args.max_suspects);
                    }
                }
                if let Some(p) = probes.as_ref() {
                    let (used, capacity) = p.unwind_rows();
                    metrics.unwind(used, capacity, p.unwind_processes());
                }
                let counters = probes.as_ref().and_then(|p| p.counters().ok());
                let attached = traced.len();
                metrics.update(&views, counters, attached, monitor.series_dropped());
                metrics.queue_losses(
                    queue_dropped.load(std::sync::atomic::Ordering::Relaxed),
                    malformed.load(std::sync::atomic::Ordering::Relaxed),
                );
                metrics.restarts(monitor.restarts());
                metrics.own_heap(own_memory::heap_in_use());
                if let Some(events) = events.as_ref() {
                    metrics.queued(events.len());
                }
                publish(&published, &metrics, &views).await;
            }
            _ = summary.tick(), if attributing => {
                if let Some(p) = probes.as_ref() {
                    log_summary(p, &proc_root, &mut names, args.top);
                }
            }
            _ = purge.tick(), if probes.is_some() => {
                let p = probes.as_mut().expect("guarded");
                let traced = p.traced().unwrap_or_default();
                // Exits whose event was lost: marked in the kernel, or gone from /proc.
                exited.extend(
                    traced.iter().filter(|(pid, s)| s.exited() || !proc_root.exists(*pid)).map(|(pid, s)| (*pid, s.gen)),
                );
                let mut forgotten = HashSet::new();
                if !exited.is_empty() || !replaced.is_empty() {
                    // A monitoring daemon keeps running: a purge that fails is counted,
                    // said, and tried again at the next turn with the same processes.
                    let purged = match p.purge(
                        |tgid, gen| {
                            exited.get(&tgid).is_some_and(|g| gen <= *g) || replaced.get(&tgid).is_some_and(|g| gen < *g)
                        },
                        // Not a pid taken since by a process traced in a later generation.
                        |tgid, state| exited.get(&tgid).is_some_and(|g| state.exited() || state.gen <= *g),
                    ) {
                        Ok(purged) => purged,
                        Err(e) => {
                            warn!("purge exited processes' kernel state: {e:#}");
                            metrics.error("purge");
                            continue;
                        }
                    };
                    tracing::debug!(processes = exited.len(), images = replaced.len(), removed = purged.entries, "purged");
                    forgotten = purged.forgotten;
                    let gone = |pid: &u32| exited.contains_key(pid) && p.proc_state(*pid).is_none();
                    allocators.retain(|pid, _| !gone(pid));
                    execed.retain(|pid, _| !gone(pid));
                    exited.clear();
                    replaced.clear();
                } else if let Err(e) = p.purge_stacks() {
                    warn!("purge unreferenced stacks: {e:#}");
                    metrics.error("purge");
                }
                // Names come from the events of traced processes alone, and a fork's
                // event may be handled after its child was purged: only what the process
                // table holds after this purge keeps its name.
                let table: HashSet<u32> = traced.iter().map(|(pid, _)| *pid).filter(|pid| !forgotten.contains(pid)).collect();
                names.retain(|pid, _| table.contains(pid));
            }
            _ = rescan.tick(), if system_wide => {
                let p = probes.as_mut().expect("guarded");
                let selected = selected(&args, &proc_root);
                if let Err(e) = attach_all(p, libraries(&mut discovery, attach, &selected, &mut allocators)) {
                    warn!("attach to new libraries: {e:#}");
                }
            }
        }
    }
    notify(sd_notify::NotifyState::Stopping);
    info!("stopping: detaching probes");
    server.abort();
    if let Some(task) = event_reader {
        task.abort();
    }
    drop(events);
    drop(probes);
    Ok(())
}

/// What a profile is made of, read from the kernel tables and /proc in the loop;
/// [`ProfileSnapshot::render`] does the rest elsewhere.
struct ProfileSnapshot {
    snapshot: super::Snapshot,
    kind: ProfileKind,
    title: String,
}

impl ProfileSnapshot {
    fn render(
        self,
        symbolizer: &Symbolizer,
        suppressions: &crate::suppressions::Suppressions,
    ) -> Result<Vec<u8>, http::ProfileError> {
        use axum::http::StatusCode;
        let mut report = self.snapshot.into_report(symbolizer);
        report.set_apart(suppressions);
        match self.kind {
            ProfileKind::Pprof => Ok(pprof::encode(&pprof::profile(&report, crate::unix_nanos()))),
            ProfileKind::FlameGraph => flamegraph::render(&report, &self.title)
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("draw the flame graph: {e}"))),
        }
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<Vec<u8>, http::ProfileError>>;

/// A thread that symbolizes and renders profile snapshots, one after another, with a
/// symbolizer of its own (blazesym's stays on the thread that made it).
fn spawn_profile_renderer(
    wrappers: &[String],
    suppress: &[String],
) -> Result<std::sync::mpsc::Sender<(ProfileSnapshot, Reply)>> {
    let (tx, rx) = std::sync::mpsc::channel::<(ProfileSnapshot, Reply)>();
    let (wrappers, suppress) = (wrappers.to_vec(), suppress.to_vec());
    std::thread::Builder::new()
        .name("profiles".into())
        .spawn(move || {
            let symbolizer = Symbolizer::new(Wrappers::new(&wrappers));
            let suppressions = crate::suppressions::Suppressions::new(&suppress);
            for (snapshot, reply) in rx {
                let _ = reply.send(snapshot.render(&symbolizer, &suppressions));
            }
        })
        .context("start the profile renderer")?;
    Ok(tx)
}

/// The snapshot of a profile of the unfreed memory of the processes `request` selects.
fn profile_snapshot(
    probes: Option<&Probes>,
    discovery: &mut Discovery,
    monitor: &Monitor,
    request: &ProfileRequest,
) -> Result<ProfileSnapshot, http::ProfileError> {
    use axum::http::StatusCode;
    let Some(probes) = probes else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "allocation attribution is off (--attach none): there is no heap to profile".to_owned(),
        ));
    };
    let traced: HashMap<u32, ProcState> = probes
        .traced()
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("read the traced processes: {e}")))?
        .into_iter()
        .collect();
    let (pids, title): (Vec<u32>, String) = match &request.selector {
        Selector::Pid(pid) => (vec![*pid], format!("Unfreed memory of pid {pid}")),
        Selector::Service(service) => {
            (monitor.pids_of_service(service), format!("Unfreed memory of {service}"))
        }
    };
    let pids: Vec<u32> = pids.into_iter().filter(|p| traced.contains_key(p)).collect();
    if pids.is_empty() {
        let what = match &request.selector {
            Selector::Pid(pid) => format!("pid {pid} is not traced"),
            Selector::Service(service) => format!("no traced process of service {service:?}"),
        };
        return Err((StatusCode::NOT_FOUND, what));
    }
    let selected: HashMap<u32, ProcState> = pids.iter().map(|p| (*p, traced[p])).collect();
    let snapshot = super::Snapshot::take(probes, discovery, &selected, HashMap::new())
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    Ok(ProfileSnapshot { snapshot, kind: request.kind, title })
}

/// Tells the service manager (systemd `Type=notify`), if there is one. The message
/// goes through a small queue to a thread of its own: a manager that stops reading
/// its socket must not stall the sampling loop (a full datagram queue blocks the
/// sender), so when the queue is full the message is dropped.
fn notify(state: sd_notify::NotifyState<'static>) {
    static QUEUE: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<sd_notify::NotifyState<'static>>>> =
        std::sync::OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        std::env::var_os("NOTIFY_SOCKET")?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<sd_notify::NotifyState<'static>>(16);
        std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                for state in rx {
                    if let Err(e) = sd_notify::notify(false, &[state]) {
                        warn!("notify the service manager: {e}");
                    }
                }
            })
            .map_err(|e| warn!("start the service manager notifier: {e}"))
            .ok()?;
        Some(tx)
    });
    if let Some(tx) = queue {
        if tx.try_send(state).is_err() {
            tracing::debug!("service manager not reading its socket; notification dropped");
        }
    }
}

/// Options that a reload cannot change while running (they shape the kernel tables,
/// the listening socket or the metric labels).
/// The web configuration file's bytes, to tell whether a reload changed it.
fn web_config_text(path: Option<&std::path::Path>) -> Option<Vec<u8>> {
    std::fs::read(path?).ok()
}

fn restart_needed(now: &RunArgs, next: &RunArgs, attach: Attach, next_attach: Attach) -> Vec<&'static str> {
    let mut out = Vec::new();
    if attach != next_attach {
        out.push("attach");
    }
    if now.listen != next.listen {
        out.push("web.listen-address");
    }
    if now.tables != next.tables {
        out.push("max-live/max-totals/max-stacks");
    }
    if now.pid_label != next.pid_label {
        out.push("metrics.pid-label");
    }
    out
}

/// `--attach suspects`: which processes have probes of their own, since when.
#[derive(Default)]
struct Suspects {
    active: HashMap<u32, Instant>,
    /// Processes whose attribution ran its course: not attached again.
    done: HashSet<u32>,
}

impl Suspects {
    /// Ends expired attributions and starts new ones on processes whose resident
    /// memory is suspected, within the budget.
    fn update(
        &mut self,
        probes: &mut Probes,
        discovery: &mut Discovery,
        views: &[SeriesView],
        duration: Duration,
        max: usize,
    ) {
        let expired: Vec<u32> = self
            .active
            .iter()
            .filter(|(pid, since)| since.elapsed() >= duration || !discovery.proc_root().exists(**pid))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in expired {
            self.active.remove(&pid);
            self.done.insert(pid);
            match probes.detach_process(pid) {
                Ok(()) => info!(pid, "allocation attribution ended"),
                Err(e) => warn!(pid, "detach: {e:#}"),
            }
        }
        for v in views.iter().filter(|v| v.suspected && v.signal == "anon") {
            for &pid in &v.pids {
                if self.active.len() >= max || self.active.contains_key(&pid) || self.done.contains(&pid) {
                    continue;
                }
                let libs = discovery.process(pid).files;
                match probes.attach_process(pid, &libs) {
                    Ok(n) if n > 0 => {
                        info!(pid, service = %v.service, comm = %v.comm, probes = n, "attributing the allocations of a suspect");
                        self.active.insert(pid, Instant::now());
                    }
                    Ok(_) => {
                        self.done.insert(pid);
                    }
                    Err(e) => {
                        warn!(pid, "attach to suspect: {e:#}");
                        self.done.insert(pid);
                    }
                }
            }
        }
    }
}

fn log_changes(changes: &[Change]) {
    for change in changes {
        match change {
            Change::Suspected(k, a) => warn!(
                service = %k.service, comm = %k.comm, signal = k.signal.as_str(), stack = k.stack.as_deref(),
                growth_per_second = %bytes(a.slope.max(0.0) as u64), z = a.z, "leak suspected"
            ),
            Change::Cleared(k, v) => info!(
                service = %k.service, comm = %k.comm, signal = k.signal.as_str(), stack = k.stack.as_deref(), verdict = v.as_str(), "leak suspicion cleared"
            ),
        }
    }
}

async fn publish(published: &Shared, metrics: &Metrics, views: &[SeriesView]) {
    // A leak flagged on resident memory shows the stacks its heap series has, if any.
    let leaks: Vec<SeriesView> = views
        .iter()
        .filter(|v| v.suspected)
        .map(|v| {
            let mut v = v.clone();
            if v.stacks.is_empty() {
                if let Some(heap) =
                    views.iter().find(|h| h.signal == "heap" && h.service == v.service && h.comm == v.comm)
                {
                    v.stacks.clone_from(&heap.stacks);
                }
            }
            v
        })
        .collect();
    let snapshot = Published {
        metrics: metrics.render(),
        leaks: json!({ "leaks": leaks }).to_string(),
        processes: json!({ "series": views }).to_string(),
        ready: true,
    };
    *published.write().await = snapshot;
}

/// The processes the selectors name: --pid as given, --comm and --cgroup resolved
/// against `procs`.
fn selected_in(args: &RunArgs, procs: &[sampler::ProcSample]) -> Vec<u32> {
    let mut pids = args.pids.clone();
    let in_cgroup = |path: &str| {
        args.cgroups.iter().any(|c| {
            let c = c.trim_end_matches('/');
            path == c || path.starts_with(&format!("{c}/"))
        })
    };
    pids.extend(
        procs.iter().filter(|p| args.comms.contains(&p.comm) || in_cgroup(&p.identity)).map(|p| p.pid),
    );
    pids.retain(|&p| p != std::process::id());
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn selected(args: &RunArgs, proc_root: &ProcRoot) -> Vec<u32> {
    if args.comms.is_empty() && args.cgroups.is_empty() {
        return selected_in(args, &[]);
    }
    selected_in(args, &sampler::sample_all(proc_root))
}

/// The allocator files to attach to: every process's (`--attach all`) or the selected
/// ones' (processes started later are read after their exec). Records each scanned
/// process's allocator in `allocators`.
fn libraries(
    discovery: &mut Discovery,
    attach: Attach,
    pids: &[u32],
    allocators: &mut HashMap<u32, Allocator>,
) -> Vec<std::path::PathBuf> {
    let mut libs = Vec::new();
    if attach == Attach::All {
        let (files, found) = discovery.all();
        libs.extend(files);
        *allocators = found;
    } else {
        for &pid in pids {
            let found = discovery.process(pid);
            libs.extend(found.files);
            if let Some(a) = found.allocator {
                allocators.insert(pid, a);
            }
        }
    }
    libs.extend(discovery.host_libraries());
    libs
}

fn log_summary(probes: &Probes, proc_root: &ProcRoot, names: &mut HashMap<u32, String>, top: usize) {
    let traced: HashMap<u32, ProcState> = probes.traced().unwrap_or_default().into_iter().collect();
    let Ok(groups) = unfreed(probes, &traced) else { return };
    let total: u64 = groups.iter().map(|g| g.bytes).sum();
    info!(processes = groups.len(), unfreed = %bytes(total), "summary");
    for g in groups.iter().take(top) {
        // The live name first: a child's exec event may still be queued behind its fork's,
        // which named it after its parent. The remembered one for a process gone since.
        if let Ok(live) = proc_root.comm(g.pid) {
            names.insert(g.pid, live);
        }
        let name = names.get(&g.pid).map_or("", String::as_str);
        info!(pid = g.pid, comm = %name, unfreed = %bytes(g.bytes), allocations = g.allocations, stacks = g.stacks.len(), "top process");
    }
    if let Ok(counters) = probes.counters() {
        for (name, value) in counters.nonzero() {
            warn!(counter = name, value, "allocations not fully accounted");
        }
    }
}

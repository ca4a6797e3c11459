//! `leakmon run`: the daemon. It wires the data path and nothing else:
//! sources (the /proc sampler, an allocation [`Attribution`] when asked, the kernel's
//! lifecycle events) → store (the kernel tables, the [`Monitor`]'s series) → analysis
//! → export (metrics, JSON, profiles). Each branch of its loop is one method below.

mod holders;
mod lifecycle;
mod notify;
mod profiles;

use std::{
    collections::HashMap,
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use leakmon_common::ProcState;
use serde_json::json;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::RwLock,
    time::{interval, Interval, MissedTickBehavior},
};
use tracing::{info, warn};

use super::{load_probes, refresh_unwind, unfreed};
use crate::{
    analysis::{history::Change, trend::Params},
    cli::RunArgs,
    discovery::Discovery,
    export::{
        http::{self, ProfileRequest, Published, Shared},
        metrics::Metrics,
    },
    ingest,
    model::SeriesView,
    monitor::Monitor,
    options::Given,
    own_memory,
    probes::Probes,
    procfs::ProcRoot,
    report::table::bytes,
    sources::{
        agent::{self, Agent},
        process_memory::ProcessMemory,
        runtime_profiles::RuntimeProfiles,
        selection::{Named, Suspects},
        uprobes::{self, Uprobes},
        Source,
    },
    values::Attach,
    wrappers::Wrappers,
};
use lifecycle::Lifecycle;
use notify::notify;

/// How often exited processes' kernel state is dropped: one pass over the tables.
const PURGE_EVERY: Duration = Duration::from_secs(5);
/// How often new library files (new containers, upgrades) are looked for.
const RESCAN_EVERY: Duration = Duration::from_secs(30);
/// Lifecycle events handled per wake-up of the loop. One per wake-up drained a fork
/// storm's backlog at about one event per sampling tick whenever a tick took longer
/// than the interval (the tick is then always ready, and each wake-up is a coin toss
/// between the ready branches).
const EVENT_BATCH: usize = 4096;

/// Re-reads the options (command line over config file) on SIGHUP.
pub type Reload<'a> = &'a dyn Fn() -> Result<(Given, RunArgs), Vec<String>>;

/// The daemon, with the options as `given` and parsed (`args`).
pub fn run(given: Given, args: &RunArgs, reload: Reload<'_>) -> Result<()> {
    let proc_root = ProcRoot::default();
    let attach = validate(args, &proc_root)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(daemon((given, args.clone()), attach, proc_root, reload))
}

/// Checks options that clap cannot check alone; returns the attach mode they mean.
fn validate(args: &RunArgs, proc_root: &ProcRoot) -> Result<Attach> {
    for &pid in &args.pids {
        proc_root.check_process(pid).map_err(|e| anyhow::anyhow!(e))?;
    }
    let attach = args.attach.unwrap_or(if args.selects() { Attach::Pids } else { Attach::None });
    if attach == Attach::Pids && !args.selects() {
        bail!("--attach pids needs at least one --pid, --comm or --cgroup");
    }
    if args.agent {
        match attach {
            Attach::All => bail!(
                "--attach all --agent is refused: it would load code into every process on the host; \
                 name the processes (--pid, --comm, --cgroup) or use --attach suspects"
            ),
            Attach::None => {
                bail!("--agent needs processes to load into: --pid, --comm, --cgroup or --attach suspects")
            }
            Attach::Pids | Attach::Suspects => {}
        }
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

fn named(args: &RunArgs) -> Named {
    Named { pids: args.pids.clone(), comms: args.comms.clone(), cgroups: args.cgroups.clone() }
}

/// The attribution `attach` and `--agent` ask for, started: probes attached, the agent
/// loaded into the processes named.
fn attribution(
    args: &RunArgs,
    attach: Attach,
    probes: &mut Probes,
    proc_root: &ProcRoot,
) -> Result<Option<Box<dyn Source + Send>>> {
    let suspects = || Suspects::new(args.suspect_duration, args.max_suspects);
    if args.agent {
        let coverage = match attach {
            Attach::Pids => agent::Coverage::Named(named(args)),
            Attach::Suspects => agent::Coverage::Suspects(suspects()),
            Attach::All | Attach::None => unreachable!("refused by validate"),
        };
        let interval = crate::values::Interval::from_option(args.tables.sample_bytes);
        return Ok(Some(Box::new(Agent::start(probes, coverage, proc_root, interval)?)));
    }
    let coverage = match attach {
        Attach::None => return Ok(None),
        Attach::All => uprobes::Coverage::All,
        Attach::Pids => uprobes::Coverage::Named(named(args)),
        Attach::Suspects => uprobes::Coverage::Suspects(suspects()),
    };
    Ok(Some(Box::new(Uprobes::start(probes, coverage, proc_root)?)))
}

/// The daemon's state between the branches of its loop.
struct Daemon<'r> {
    /// The options as written (for a reload to tell what it changes), and parsed.
    given: Given,
    args: RunArgs,
    attach: Attach,
    proc_root: ProcRoot,
    reload: Reload<'r>,
    /// The kernel side: programs, tables, lifecycle events. Loaded in every mode (the
    /// lifecycle tracepoints cost nothing per allocation); absent only where the
    /// kernel refused them and nothing is attributed.
    probes: Option<Probes>,
    /// Where unfreed totals come from: the attribution `attach` and `--agent` ask for
    /// (into the kernel's tables), then `--runtime-profilers` (figures of their own).
    sources: Vec<Box<dyn Source + Send>>,
    monitor: Monitor,
    metrics: Metrics,
    published: Shared,
    lifecycle: Lifecycle,
    /// For profiles: process names, mappings and allocators.
    discovery: Discovery,
    /// Tier 0: every process's memory, each tick.
    memory: ProcessMemory,
    profiles: std::sync::mpsc::Sender<(profiles::ProfileSnapshot, profiles::Reply)>,
    /// Each process's last holders scan, for the metrics.
    last_scans: holders::LastScans,
    queue_dropped: Arc<AtomicU64>,
    malformed: Arc<AtomicU64>,
    started: Instant,
    web_in_use: Option<Vec<u8>>,
}

async fn daemon(
    (given, args): (Given, RunArgs),
    attach: Attach,
    proc_root: ProcRoot,
    reload: Reload<'_>,
) -> Result<()> {
    // Before anything is served or loaded: a stop asked for from the first moment on
    // is kept (a background job of a script starts with SIGINT ignored, and a signal
    // that finds it ignored is lost), and taken at the loop's first turn.
    let sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let sighup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
    // From the first request on, /metrics carries leakmon's own families (build info,
    // process_*, its counters at zero) and the JSON endpoints valid empty documents:
    // an empty 200 would read as a healthy target with no series.
    let metrics = Metrics::new(args.pid_label);
    let published = first_documents(&metrics);
    let (profile_tx, mut profile_requests) = tokio::sync::mpsc::channel::<ProfileRequest>(8);
    let web = args.web_config.as_deref().map(crate::export::web_config::WebConfig::load).transpose()?;
    // What the server was started with, to tell a reload that changes it (TLS and users
    // are set when the listener starts).
    let web_in_use = web_config_text(args.web_config.as_deref());
    let server = http::serve(args.listen, published.clone(), profile_tx, web).await?;
    let last_scans = holders::LastScans::default();
    let profiles =
        profiles::spawn_profile_renderer(&args.tables.wrappers, &args.tables.suppress, last_scans.clone())?;

    // Before capabilities are dropped: loading the iterator needs them, reading it not.
    let memory = ProcessMemory::new(args.memory_source, proc_root.clone())?;
    let Kernel { probes, attribution, event_reader, mut events, queue_dropped, malformed } =
        Kernel::load(&args, attach, &proc_root)?;
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
        method = ?attribution.as_ref().map(|a| a.method()),
        libraries = probes.as_ref().map_or(0, Probes::attached_files),
        sample_interval = ?args.sample_interval,
        window = ?args.window,
        memory_source = memory.source(),
        "leakmon running"
    );

    let params = Params { window: args.window.as_secs_f64(), ..Params::default() };
    let monitor = Monitor::new(params, args.max_series, args.top_stacks, proc_root.clone())
        .per_process(args.pid_label)
        .wrappers(Wrappers::new(&args.tables.wrappers));
    let sources = attribution.into_iter().chain(runtime_profiles(&args, &proc_root)).collect();
    let mut d = Daemon {
        given,
        attach,
        reload,
        probes,
        sources,
        monitor,
        metrics,
        published,
        lifecycle: Lifecycle::default(),
        discovery: Discovery::new(proc_root.clone()),
        memory,
        proc_root,
        profiles,
        last_scans,
        queue_dropped,
        malformed,
        started: Instant::now(),
        web_in_use,
        args,
    };

    d.metrics.sampling(d.sample_rate());
    notify(sd_notify::NotifyState::Ready);
    serve(&mut d, Signals { sigterm, sigint, sighup }, &mut profile_requests, &mut events).await;
    notify(sd_notify::NotifyState::Stopping);
    info!("stopping: detaching probes");
    server.abort();
    for s in &mut d.sources {
        s.shutdown(d.probes.as_mut());
    }
    if let Some(task) = event_reader {
        task.abort();
    }
    drop(events);
    drop(d);
    Ok(())
}

/// The stop and reload signals, handled from before anything is served.
struct Signals {
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
    sighup: tokio::signal::unix::Signal,
}

/// The daemon's loop, one branch a line, until SIGINT or SIGTERM.
async fn serve(
    d: &mut Daemon<'_>,
    mut signals: Signals,
    profile_requests: &mut tokio::sync::mpsc::Receiver<ProfileRequest>,
    events: &mut Option<tokio::sync::mpsc::Receiver<leakmon_common::LifecycleEvent>>,
) {
    // systemd's watchdog: pinged from this loop, so a loop that hangs gets restarted.
    let mut watchdog = watchdog();
    let mut sample = sampling(d.args.sample_interval);
    let mut summary = interval(Duration::from_secs(u64::from(d.args.interval.get())));
    let mut purge = interval(PURGE_EVERY);
    let mut rescan = interval(RESCAN_EVERY);
    let mut batch = Vec::with_capacity(EVENT_BATCH);
    let attributing = d.through_kernel();

    loop {
        tokio::select! {
            _ = signals.sigint.recv() => break,
            _ = signals.sigterm.recv() => break,
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                notify(sd_notify::NotifyState::Watchdog);
            }
            Some(request) = profile_requests.recv() => d.profile(request),
            _ = signals.sighup.recv() => {
                let before = d.args.clone();
                d.reconfigure();
                if d.args.sample_interval != before.sample_interval {
                    sample = sampling(d.args.sample_interval);
                }
                if d.args.interval != before.interval {
                    summary = interval(Duration::from_secs(u64::from(d.args.interval.get())));
                }
            }
            received = async { events.as_mut().expect("guarded").recv_many(&mut batch, EVENT_BATCH).await }, if events.is_some() => {
                // A reader gone (it panicked) closes the queue: stop polling it.
                if received == 0 {
                    *events = None;
                }
                for ev in batch.drain(..) {
                    d.lifecycle_event(&ev);
                }
            }
            _ = sample.tick() => {
                d.sample(events.as_ref().map_or(0, tokio::sync::mpsc::Receiver::len)).await;
            }
            _ = summary.tick(), if attributing => {
                if let Some(p) = d.probes.as_ref() {
                    log_summary(p, &d.proc_root, &mut d.lifecycle.names, d.args.top);
                }
            }
            _ = purge.tick(), if d.probes.is_some() => d.purge(),
            _ = rescan.tick(), if attributing => {
                for s in &mut d.sources {
                    s.rescan(d.probes.as_mut());
                }
            }
        }
    }
}

/// What the endpoints serve before the first sample: leakmon's own families (build
/// info, process_*, its counters at zero) and valid empty documents, since an empty
/// 200 would read as a healthy target with no series.
fn first_documents(metrics: &Metrics) -> Shared {
    Arc::new(RwLock::new(Published {
        metrics: metrics.render(),
        leaks: json!({ "leaks": [] }).to_string(),
        processes: json!({ "series": [] }).to_string(),
        ready: false,
    }))
}

/// The kernel side as `run` uses it: the programs (loaded even with `--attach none`, to
/// count OOM kills, where they load), the attribution of allocations, and the reader of
/// the lifecycle ring buffer.
struct Kernel {
    probes: Option<Probes>,
    attribution: Option<Box<dyn Source + Send>>,
    event_reader: Option<tokio::task::JoinHandle<()>>,
    events: Option<tokio::sync::mpsc::Receiver<leakmon_common::LifecycleEvent>>,
    queue_dropped: Arc<AtomicU64>,
    malformed: Arc<AtomicU64>,
}

impl Kernel {
    fn load(args: &RunArgs, attach: Attach, proc_root: &ProcRoot) -> Result<Self> {
        let mut probes = if attach == Attach::None {
            load_probes(&args.tables, false).map_err(|e| warn!("OOM kills will not be counted: {e:#}")).ok()
        } else {
            Some(load_probes(&args.tables, attach == Attach::All)?)
        };
        let attribution = match probes.as_mut() {
            Some(p) => attribution(args, attach, p, proc_root)?,
            None => None,
        };
        let queue_dropped = Arc::new(AtomicU64::new(0));
        let malformed = Arc::new(AtomicU64::new(0));
        let (event_reader, events) = match probes.as_mut() {
            Some(p) => {
                let (task, rx) =
                    ingest::spawn_reader(p.take_events()?, queue_dropped.clone(), malformed.clone())
                        .map_err(|e| anyhow::anyhow!("watch the event ring buffer: {e}"))?;
                (Some(task), Some(rx))
            }
            None => (None, None),
        };
        Ok(Self { probes, attribution, event_reader, events, queue_dropped, malformed })
    }
}

/// The runtime profilers asked for, if any.
fn runtime_profiles(args: &RunArgs, proc_root: &ProcRoot) -> Option<Box<dyn Source + Send>> {
    (!args.runtime_profilers.is_empty()).then(|| -> Box<dyn Source + Send> {
        let sample_bytes = args.tables.sample_bytes;
        Box::new(RuntimeProfiles::new(
            args.runtime_profilers.clone(),
            args.suspect_duration,
            args.max_suspects,
            sample_bytes,
            args.sample_interval,
            proc_root.clone(),
        ))
    })
}

/// systemd's watchdog, pinged at half its interval; `None` without one
/// (`WATCHDOG_USEC=0` means none, and an interval of 0 cannot tick).
fn watchdog() -> Option<Interval> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0)
        .then(|| interval(Duration::from_micros(usec) / 2))
}

fn sampling(every: Duration) -> Interval {
    let mut sample = interval(every);
    sample.set_missed_tick_behavior(MissedTickBehavior::Delay);
    sample
}

impl Daemon<'_> {
    /// One sampling turn: /proc read, attribution told, kernel totals read, every
    /// series analysed, the results published.
    async fn sample(&mut self, queued: usize) {
        let now = self.started.elapsed().as_secs_f64();
        let procs = self.memory.sample_all();
        for s in &mut self.sources {
            s.sampled(self.probes.as_mut(), &procs);
        }
        // One read of the process table serves the heap totals and the count.
        let traced: HashMap<u32, ProcState> =
            self.probes.as_ref().and_then(|p| p.traced().ok()).unwrap_or_default().into_iter().collect();
        if let Some(p) = self.probes.as_mut() {
            // Unwind tables for processes traced since the last turn, and for those
            // whose stacks reached a library loaded since their tables were made.
            let loading = |pid: u32| self.sources.iter().any(|s| s.loading(pid));
            let mut due: Vec<u32> =
                traced.keys().copied().filter(|pid| !p.has_unwind(*pid) && !loading(*pid)).collect();
            due.extend(p.unwind_stale());
            for pid in due {
                refresh_unwind(p, &self.proc_root, pid);
            }
        }
        let heap = self.heap(&traced);
        self.monitor.set_incomplete(
            traced
                .iter()
                .filter(|(_, s)| s.flags & leakmon_common::proc_flags::INCOMPLETE != 0)
                .map(|(pid, _)| *pid),
        );
        let probes = self.probes.as_ref();
        let stack = |id: u64| probes.and_then(|p| p.stack(id));
        let (mut views, changes) = self.monitor.tick(now, &procs, heap.as_deref(), &stack);
        self.memory.recycle(procs);
        for v in &mut views {
            v.allocator = v.pids.iter().find_map(|pid| self.sources.iter().find_map(|s| s.allocator(*pid)));
        }
        log_changes(&changes);
        for s in &mut self.sources {
            s.analysed(self.probes.as_mut(), &views);
        }
        if let Some(p) = self.probes.as_ref() {
            let (used, capacity) = p.unwind_rows();
            self.metrics.unwind(used, capacity, p.unwind_processes());
        }
        let counters = self.probes.as_ref().and_then(|p| p.counters().ok());
        self.metrics.update(&views, counters, traced.len(), self.monitor.series_dropped());
        {
            // A scan of a process that is gone says nothing any more.
            let mut last = self.last_scans.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            last.retain(|pid, _| traced.contains_key(pid));
            self.metrics.holders(&views, &last);
        }
        self.metrics.queue_losses(
            self.queue_dropped.load(std::sync::atomic::Ordering::Relaxed),
            self.malformed.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.metrics.restarts(self.monitor.restarts());
        self.metrics.own_heap(own_memory::heap_in_use());
        if self.probes.is_some() {
            self.metrics.queued(queued);
        }
        publish(&self.published, &self.metrics, &views).await;
    }

    /// The sampling interval of the kernel's figures: the agent's (where it is paced,
    /// the one each process starts at), or the kernel's own (0: exact).
    fn sample_rate(&self) -> u64 {
        if self.sources.iter().any(|s| s.method() == crate::model::Method::Agent) {
            crate::values::Interval::from_option(self.args.tables.sample_bytes).start()
        } else {
            self.args.tables.sample_bytes
        }
    }

    /// Whether a source records into the kernel's tables (else they hold nothing).
    fn through_kernel(&self) -> bool {
        self.sources.iter().any(|s| s.through_kernel())
    }

    /// The unfreed totals of this turn, if any source gives some: the kernel's, and
    /// over them each source's own, for the processes it speaks for.
    fn heap(&self, traced: &HashMap<u32, ProcState>) -> Option<Vec<crate::store::ProcessTotals>> {
        let kernel =
            self.probes.as_ref().filter(|_| self.through_kernel()).and_then(|p| unfreed(p, traced).ok());
        self.sources.iter().filter(|s| !s.through_kernel()).fold(kernel, |heap, s| {
            let mut all = heap.unwrap_or_default();
            all.retain(|t| !s.speaks_for(t.pid));
            all.extend(s.totals());
            Some(all)
        })
    }

    /// Only the kernel tables and /proc are read here; symbolizing and rendering, the
    /// slow part, run off the loop, which keeps sampling.
    fn profile(&mut self, request: ProfileRequest) {
        use crate::export::http::{ProfileKind, Selector};
        if let (Selector::Pid(pid), ProfileKind::Holders { budget_ms, window_s }) =
            (&request.selector, request.kind)
        {
            if let Some(runtime) = crate::runtimes::detect(*pid).ok().flatten() {
                holders::run_runtime(*pid, runtime, budget_ms, window_s, request.reply);
                return;
            }
        }
        let probes = self.probes.as_ref().filter(|_| self.through_kernel());
        let rate = self.sample_rate();
        match profiles::profile_snapshot(probes, &mut self.discovery, &self.monitor, &request, rate) {
            // A renderer gone (it panicked) drops the reply: the client gets its error
            // from the HTTP side.
            Ok(snapshot) => {
                let _ = self.profiles.send((snapshot, request.reply));
            }
            Err(e) => {
                let _ = request.reply.send(Err(e));
            }
        }
    }

    /// SIGHUP: the options read again; what can change while running changes.
    fn reconfigure(&mut self) {
        notify(sd_notify::NotifyState::Reloading);
        let next = (self.reload)().map_err(|problems| problems.join("; ")).and_then(|(given, _)| {
            let (given, changed) = given.keeping_fixed(&self.given);
            let next = given.args()?;
            let next_attach = validate(&next, &self.proc_root).map_err(|e| format!("{e:#}"))?;
            Ok((given, next, changed, next_attach))
        });
        match next {
            Ok((given, next, mut changed, next_attach)) => {
                // Selectors that would change what `attach` means change it only at
                // restart, as `attach` itself.
                if next_attach != self.attach && !changed.iter().any(|c| c == "attach") {
                    changed.push("attach".to_owned());
                }
                for what in changed {
                    warn!("{what} changes only at restart; keeping the running value");
                }
                if web_config_text(next.web_config.as_deref()) != self.web_in_use {
                    warn!("web.config-file (TLS, users) changes only at restart; keeping the running one");
                }
                self.monitor.reconfigure(
                    Params { window: next.window.as_secs_f64(), ..Params::default() },
                    next.max_series,
                    next.top_stacks,
                );
                for s in &mut self.sources {
                    s.reselect(self.probes.as_mut(), named(&next));
                }
                (self.given, self.args) = (given, next);
                info!(sample_interval = ?self.args.sample_interval, window = ?self.args.window, "configuration reloaded");
            }
            Err(e) => warn!("reload failed, keeping the running configuration: {e}"),
        }
        notify(sd_notify::NotifyState::Ready);
    }
}

/// The web configuration file's bytes, to tell whether a reload changed it.
fn web_config_text(path: Option<&std::path::Path>) -> Option<Vec<u8>> {
    std::fs::read(path?).ok()
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

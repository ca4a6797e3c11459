//! The probe layer: the only module that touches `aya::Ebpf`.
//!
//! In: settings (trace everything or chosen processes, table sizes). Out: narrow
//! handles the rest of leakmon uses: attach to a library file, start tracing a process,
//! read per-stack totals, stacks and failure counters, take the lifecycle ring buffer,
//! forget a process. Dropping [`Probes`] detaches every probe.

pub mod placement;
pub mod targets;
pub mod tracefs;
pub mod unwind;

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    num::NonZeroU32,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
        ProgramError, TracePoint, UProbe,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use leakmon_common::{
    counter,
    python::PyLayout,
    unwind::{Mapping as UnwindMapping, ProcUnwind, Row, MAX_MAPPINGS},
    LiveAlloc, LiveKey, ProcState, Stack, Totals, TotalsKey,
};
use tracing::{debug, info, warn};

use self::targets::{agent_points, entry_points, EntryPoint, Handler, TargetError};
use crate::procfs::Mapping;

/// The eBPF object built by build.rs; empty when built without bpf-linker.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leakmon-probes"));

/// Errors of the probe layer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The binary was built without its eBPF object.
    #[error("this leakmon binary was built without its eBPF programs (bpf-linker was missing at build time); build it with `cargo xtask build`")]
    NotBuilt,
    /// The kernel refused to load the programs or create the maps.
    #[error("load the eBPF programs")]
    Load(#[source] Box<EbpfError>),
    /// A program could not be loaded or attached.
    #[error("{action} program {program}")]
    Program {
        action: &'static str,
        program: String,
        #[source]
        source: Box<ProgramError>,
    },
    /// A map operation failed.
    #[error("{action} map {map}")]
    Map {
        action: &'static str,
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    /// A library's entry points could not be found.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// A library file could not be inspected.
    #[error("stat {path}")]
    Stat { path: PathBuf, source: std::io::Error },
}

impl ProbeError {
    /// Whether the kernel said no because of missing privileges.
    pub fn is_permission(&self) -> bool {
        let text = format!("{self:?}");
        // The verifier's rejections come as EACCES too, with its log: not privileges.
        if text.contains("verifier_log") && text.contains("processed") {
            return false;
        }
        text.contains("EPERM") || text.contains("PermissionDenied") || text.contains("os error 1)")
    }
}

fn map_err(action: &'static str, map: &'static str) -> impl FnOnce(MapError) -> ProbeError {
    move |source| ProbeError::Map { action, map, source: Box::new(source) }
}

fn prog_err(action: &'static str, program: &str) -> impl FnOnce(ProgramError) -> ProbeError {
    let program = program.to_owned();
    move |source| ProbeError::Program { action, program, source: Box::new(source) }
}

/// How the probes are set up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Trace every process that maps a probed library, not only those given to
    /// [`Probes::trace`] (and their children).
    pub trace_all: bool,
    /// Live-allocation table entries (all processes together).
    pub max_live: u32,
    /// Per-stack totals entries.
    pub max_totals: u32,
    /// Distinct stacks.
    pub max_stacks: u32,
    /// Byte-weighted sampling interval; 0 tracks every allocation.
    pub sample_bytes: u64,
    /// Unwind-table rows, all files together (12 bytes each, allocated at load).
    pub unwind_rows: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            trace_all: false,
            max_live: 262_144,
            max_totals: 65_536,
            max_stacks: 16_384,
            sample_bytes: 0,
            unwind_rows: DEFAULT_UNWIND_ROWS,
        }
    }
}

/// What became of one file's rows.
enum Stored {
    Rows(unwind::Stored),
    NoTables,
    Full,
}

/// Unwind rows by default: about 30 files the size of libc (12 MiB of kernel memory).
pub const DEFAULT_UNWIND_ROWS: u32 = 1 << 20;

/// A (device, inode) pair: one file however many paths lead to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// The failure counters, summed over CPUs; indexed by `leakmon_common::counter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; counter::COUNT as usize]);

impl Counters {
    pub const NAMES: [&'static str; counter::COUNT as usize] = [
        "live_table_full",
        "totals_table_full",
        "stacks_table_full",
        "stack_error",
        "inflight_table_full",
        "process_table_full",
        "events_lost",
        "inflight_stale",
        "live_replaced",
        "read_error",
    ];

    /// Non-zero counters with their names.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Self::NAMES.iter().zip(self.0).filter(|(_, v)| *v != 0).map(|(n, v)| (*n, v))
    }
}

const ENTRY_PROGRAMS: [Handler; 9] = [
    Handler::Malloc,
    Handler::Calloc,
    Handler::Realloc,
    Handler::ReallocArray,
    Handler::Memalign,
    Handler::PosixMemalign,
    Handler::Strdup,
    Handler::Free,
    Handler::AgentAlloc,
];
const RETURN_PROGRAM: &str = "alloc_return";
const TRACEPOINTS: [(&str, &str, &str); 4] = [
    ("lifecycle_newtask", "task", "task_newtask"),
    ("lifecycle_exec", "sched", "sched_process_exec"),
    ("lifecycle_exit", "sched", "sched_process_exit"),
    ("lifecycle_oom", "oom", "mark_victim"),
];

/// How uprobes are attached. Each allocator program exists in the object twice, as
/// `uprobe.multi` and as a perf-event uprobe (`_perf` suffix); only the kinds in use
/// are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachKind {
    /// One `uprobe_multi` link per file and program (kernel 6.6+): a file's whole
    /// set attaches in a handful of syscalls and detaches with one RCU grace period.
    Multi,
    /// One perf event per entry point; each one closed waits for a grace period.
    PerfEvent,
}

impl AttachKind {
    /// The program's name in the eBPF object for this kind.
    fn program(self, base: &'static str) -> String {
        match self {
            Self::Multi => base.to_owned(),
            Self::PerfEvent => format!("{base}_perf"),
        }
    }
}

/// The attach kinds this kernel allows: system-wide, and for one process (early
/// `uprobe_multi` kernels filtered a pid on one thread, not the whole process).
/// `LEAKMON_PERF_UPROBES=1` takes the fallback on any kernel, for its tests.
fn attach_kinds() -> (AttachKind, AttachKind) {
    use aya::sys::{is_uprobe_multi_supported, UProbeMultiFeature};
    let forced = std::env::var_os("LEAKMON_PERF_UPROBES").is_some_and(|v| v == "1");
    let multi = !forced && is_uprobe_multi_supported(UProbeMultiFeature::LinkCreation).unwrap_or(false);
    let scoped =
        multi && is_uprobe_multi_supported(UProbeMultiFeature::ProcessScopedPidFilter).unwrap_or(false);
    let kind = |ok: bool| if ok { AttachKind::Multi } else { AttachKind::PerfEvent };
    if !multi {
        info!("this kernel has no uprobe_multi links: attaching one perf-event uprobe per entry point");
    } else if !scoped {
        info!("this kernel's uprobe_multi links filter one thread, not a process: per-process probes use perf events");
    }
    (kind(multi), kind(scoped))
}

/// One attached program on one file: a `uprobe_multi` link holding all its entry
/// points, or the perf events standing in for one.
#[derive(Debug)]
struct Link {
    program: String,
    /// Entry points it covers (0 for the shared return probe).
    entry_points: usize,
    id: UProbeLinkId,
}

/// Loaded and (partly) attached probes.
pub struct Probes {
    ebpf: Ebpf,
    attached: HashSet<FileId>,
    /// Probes attached for one process only (suspects), to detach when its time is up.
    per_process: StdHashMap<u32, ProcessLinks>,
    /// System-wide links, kept to close them side by side when the probes go.
    system_links: Vec<Link>,
    /// How system-wide and per-process probes are attached on this kernel.
    system_kind: AttachKind,
    process_kind: AttachKind,
    /// Stacks no totals entry referred to at the last purge. The kernel stores a stack
    /// just before the totals entry that names it, so a stack is dropped only when it
    /// was unreferenced at two purges in a row, never in that window.
    unreferenced_stacks: HashSet<u64>,
    unwind: unwind::Tables,
    /// Processes whose Python was looked for, with the inode of the interpreter found
    /// (0: none that leakmon walks); looked for again when it is no longer mapped.
    python: StdHashMap<u32, u64>,
}

impl Probes {
    /// Loads the programs and attaches the lifecycle tracepoints; no uprobe yet.
    pub fn load(settings: &Settings) -> Result<Self, ProbeError> {
        if OBJECT.is_empty() {
            return Err(ProbeError::NotBuilt);
        }
        raise_memlock_limit();
        if let Err(err) = tracefs::ensure_mounted() {
            warn!("could not mount tracefs at /sys/kernel/tracing: {err}");
        }
        let self_tgid = std::process::id();
        let trace_all = u32::from(settings.trace_all);
        let offsets = tracefs::tracepoint_offsets();
        let mut ebpf = EbpfLoader::new()
            .override_global("SELF_TGID", &self_tgid, true)
            .override_global("TRACE_ALL", &trace_all, true)
            .override_global("TP_OFFSETS", &offsets, true)
            .override_global("SAMPLE_BYTES", &settings.sample_bytes, true)
            .map_max_entries("LIVE", settings.max_live)
            .map_max_entries("TOTALS", settings.max_totals)
            .map_max_entries("STACKS", settings.max_stacks)
            .map_max_entries("UNWIND_ROWS", settings.unwind_rows.max(1))
            .load(OBJECT)
            .map_err(|e| ProbeError::Load(Box::new(e)))?;
        let (system_kind, process_kind) = attach_kinds();
        let mut kinds = vec![system_kind];
        if process_kind != system_kind {
            kinds.push(process_kind);
        }
        for kind in kinds {
            let bases = ENTRY_PROGRAMS.iter().map(|h| h.program()).chain([RETURN_PROGRAM]);
            for name in bases.map(|base| kind.program(base)) {
                uprobe(&mut ebpf, &name)?.load().map_err(prog_err("load", &name))?;
            }
        }
        for (program, category, name) in TRACEPOINTS {
            let tp: &mut TracePoint = ebpf
                .program_mut(program)
                .ok_or_else(|| missing_program(program))?
                .try_into()
                .map_err(prog_err("find", program))?;
            tp.load().map_err(prog_err("load", program))?;
            tp.attach(category, name).map_err(prog_err("attach", program))?;
        }
        Ok(Self {
            ebpf,
            attached: HashSet::new(),
            per_process: StdHashMap::new(),
            system_links: Vec::new(),
            system_kind,
            process_kind,
            unreferenced_stacks: HashSet::new(),
            unwind: unwind::Tables::new(settings.unwind_rows),
            python: StdHashMap::new(),
        })
    }

    /// Attaches the allocator probes to one library file, for every process that maps
    /// it now or later. A file already attached (by any path) is skipped. Returns the
    /// number of entry points probed.
    pub fn attach_library(&mut self, path: &Path) -> Result<usize, ProbeError> {
        let meta =
            std::fs::metadata(path).map_err(|source| ProbeError::Stat { path: path.to_owned(), source })?;
        let id = FileId { dev: meta.dev(), ino: meta.ino() };
        if self.attached.contains(&id) {
            return Ok(0);
        }
        let points = entry_points(path)?;
        let links = self.attach_points(path, &points, UProbeScope::AllProcesses, self.system_kind)?;
        let entry_points = entry_count(&links);
        self.system_links.extend(links);
        self.attached.insert(id);
        info!(library = %path.display(), entry_points, "allocator probes attached");
        Ok(entry_points)
    }

    /// Attaches the allocator probes to `libraries` for `pid` alone (the kernel puts
    /// breakpoints in that process only, so no other process pays for them) and starts
    /// tracing it. Files already attached for `pid` are skipped, so a caller may pass
    /// a process's whole list again as it loads more. Returns the number of entry
    /// points probed by this call.
    pub fn attach_process(&mut self, pid: u32, libraries: &[PathBuf]) -> Result<usize, ProbeError> {
        let Some(nz) = NonZeroU32::new(pid) else { return Ok(0) };
        let mut entry_points = 0;
        let mut added = Vec::new();
        for path in libraries {
            let Ok(meta) = std::fs::metadata(path) else { continue };
            let id = FileId { dev: meta.dev(), ino: meta.ino() };
            if self.per_process.get(&pid).is_some_and(|p| p.files.contains(&id)) {
                continue;
            }
            let points = match self::targets::entry_points(path) {
                Ok(points) => points,
                Err(e) => {
                    let links = added.into_iter().flat_map(|(_, links)| links).collect();
                    let _ = self.detach_links(links);
                    return Err(e.into());
                }
            };
            match self.attach_points(path, &points, UProbeScope::OneProcess(nz), self.process_kind) {
                Ok(links) => {
                    entry_points += entry_count(&links);
                    added.push((id, links));
                }
                Err(e) => {
                    // Not half a set: drop what this call attached too (what earlier
                    // calls attached, and what they counted, stays).
                    let links = added.into_iter().flat_map(|(_, links)| links).collect();
                    let _ = self.detach_links(links);
                    return Err(e);
                }
            }
        }
        let process = self.per_process.entry(pid).or_default();
        for (id, links) in added {
            process.files.insert(id);
            process.links.extend(links);
        }
        self.trace(pid)?;
        Ok(entry_points)
    }

    /// Attaches to each allocator file of `libraries` for every process; a file gone
    /// meanwhile is skipped (worth no stop). Returns the number of files newly attached.
    pub fn attach_libraries(
        &mut self,
        libraries: impl IntoIterator<Item = PathBuf>,
    ) -> Result<usize, ProbeError> {
        let mut attached = 0;
        for lib in libraries {
            match self.attach_library(&lib) {
                Ok(n) => attached += usize::from(n > 0),
                Err(ProbeError::Stat { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(attached)
    }

    /// Attaches to the in-process agent's markers in the agent files at `paths` (the
    /// agent, and its freestanding twin for programs without a dynamic loader, where it
    /// exists): for `pid` alone, or for every process that maps one (a command's tree,
    /// which preloads it). The agent samples in-process, so the kernel side records every
    /// marker hit at the weight the agent passes. Returns the number of markers probed.
    pub fn attach_agent(&mut self, pid: Option<u32>, paths: &[PathBuf]) -> Result<usize, ProbeError> {
        let mut probed = 0;
        // The first is the agent itself, which must be there; a twin may not be.
        for (_, path) in paths.iter().enumerate().filter(|(i, p)| *i == 0 || p.exists()) {
            probed += self.attach_agent_file(pid, path)?;
        }
        Ok(probed)
    }

    fn attach_agent_file(&mut self, pid: Option<u32>, path: &Path) -> Result<usize, ProbeError> {
        let meta =
            std::fs::metadata(path).map_err(|source| ProbeError::Stat { path: path.to_owned(), source })?;
        let id = FileId { dev: meta.dev(), ino: meta.ino() };
        let points = agent_points(path)?;
        match pid.and_then(NonZeroU32::new) {
            Some(nz) => {
                let pid = nz.get();
                if self.per_process.get(&pid).is_some_and(|p| p.files.contains(&id)) {
                    return Ok(0);
                }
                let links =
                    self.attach_points(path, &points, UProbeScope::OneProcess(nz), self.process_kind)?;
                let process = self.per_process.entry(pid).or_default();
                process.files.insert(id);
                process.links.extend(links);
                self.trace(pid)?;
            }
            None => {
                if !self.attached.insert(id) {
                    return Ok(0);
                }
                let links =
                    match self.attach_points(path, &points, UProbeScope::AllProcesses, self.system_kind) {
                        Ok(links) => links,
                        Err(e) => {
                            self.attached.remove(&id);
                            return Err(e);
                        }
                    };
                self.system_links.extend(links);
            }
        }
        Ok(points.len())
    }

    /// Attaches every allocator entry point of `path`: per program, one link holding
    /// all its entry points. The shared return probe goes first and leaves last, so no
    /// entry can be recorded without its return probe in place (an entry without its
    /// return would stay in flight). On a failure, what this call attached is detached.
    fn attach_points(
        &mut self,
        path: &Path,
        points: &[EntryPoint],
        scope: UProbeScope,
        kind: AttachKind,
    ) -> Result<Vec<Link>, ProbeError> {
        for point in points {
            // The bench reads these to put its same-traps floor where leakmon probes.
            debug!(
                library = %path.display(),
                symbol = point.symbol,
                offset = point.file_offset,
                probe_offset = point.probe_offset,
                "entry point"
            );
        }
        // The return probe must be at the first byte, where the return address is on top
        // of the stack; an entry probe may sit a little further (see `placement`).
        let mut groups: Vec<(&'static str, Vec<u64>)> = vec![(
            RETURN_PROGRAM,
            points.iter().filter(|p| p.handler.needs_return()).map(|p| p.file_offset).collect(),
        )];
        for handler in ENTRY_PROGRAMS {
            let offsets: Vec<u64> =
                points.iter().filter(|p| p.handler == handler).map(|p| p.probe_offset).collect();
            groups.push((handler.program(), offsets));
        }
        let mut links = Vec::new();
        for (base, offsets) in groups {
            if offsets.is_empty() {
                continue;
            }
            let program = kind.program(base);
            let locations = offsets.iter().map(|&o| UProbeAttachLocation::AbsoluteOffset(o));
            let attached = uprobe(&mut self.ebpf, &program)
                .and_then(|p| p.attach(locations, path, scope).map_err(prog_err("attach", &program)));
            match attached {
                Ok(id) => {
                    let entry_points = if base == RETURN_PROGRAM { 0 } else { offsets.len() };
                    links.push(Link { program, entry_points, id });
                }
                Err(e) => {
                    let _ = self.detach_links(links);
                    return Err(e);
                }
            }
        }
        debug!(library = %path.display(), entry_points = points.len(), ?kind, "probes attached");
        Ok(links)
    }

    /// Closes `links`: entry probes before the return probe they share. Each close
    /// waits for an RCU grace period, and waits that overlap share one, so the links
    /// of each round are closed side by side (one after another, a redis-server's 27
    /// links took 1.2 s).
    fn detach_links(&mut self, links: Vec<Link>) -> Result<(), ProbeError> {
        let mut first_error = None;
        // The shared return probe is the link that covers no entry point.
        let (returns, entries): (Vec<Link>, Vec<Link>) = links.into_iter().partition(|l| l.entry_points == 0);
        for round in [entries, returns] {
            let mut taken = Vec::with_capacity(round.len());
            for link in round {
                match uprobe(&mut self.ebpf, &link.program)
                    .and_then(|p| p.take_link(link.id).map_err(prog_err("detach", &link.program)))
                {
                    Ok(owned) => taken.push(owned),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            close_side_by_side(taken);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Detaches the probes attached for `pid` alone and drops everything traced for it.
    pub fn detach_process(&mut self, pid: u32) -> Result<(), ProbeError> {
        let links = self.per_process.remove(&pid).unwrap_or_default().links;
        self.detach_links(links)?;
        self.purge(|tgid, _| tgid == pid, |tgid, _| tgid == pid)?;
        Ok(())
    }

    /// Processes with probes of their own.
    pub fn processes_attached(&self) -> impl Iterator<Item = u32> + '_ {
        self.per_process.keys().copied()
    }

    /// Number of library files attached, system-wide or for some process.
    pub fn attached_files(&self) -> usize {
        let per_process = self.per_process.values().flat_map(|p| &p.files);
        self.attached.iter().chain(per_process).collect::<HashSet<_>>().len()
    }

    /// Starts tracing `pid` (and, through the fork tracepoint, its future children).
    /// A process already traced keeps its state; one at the pid of an exited process
    /// not yet purged starts a generation of its own.
    pub fn trace(&mut self, pid: u32) -> Result<(), ProbeError> {
        let mut procs = self.procs_mut()?;
        let state = match procs.get(&pid, 0) {
            Ok(old) if old.exited() => old.reborn(),
            Ok(_) => return Ok(()),
            Err(_) => ProcState::default(),
        };
        procs.insert(&pid, &state, 0).map_err(map_err("insert", "PROCS"))
    }

    /// The traced state of one live process, if traced.
    pub fn proc_state(&self, pid: u32) -> Option<ProcState> {
        let procs: HashMap<&MapData, u32, ProcState> = HashMap::try_from(self.ebpf.map("PROCS")?).ok()?;
        procs.get(&pid, 0).ok().filter(|s| !s.exited())
    }

    /// Every traced process, with those that exited and are not purged yet.
    pub fn traced(&self) -> Result<Vec<(u32, ProcState)>, ProbeError> {
        let procs: HashMap<&MapData, u32, ProcState> =
            HashMap::try_from(self.ebpf.map("PROCS").ok_or_else(|| missing_map("PROCS"))?)
                .map_err(map_err("open", "PROCS"))?;
        procs.iter().collect::<Result<_, _>>().map_err(map_err("read", "PROCS"))
    }

    /// Per-stack totals of the processes `keep` selects, with non-zero allocations.
    pub fn totals(&self, keep: impl Fn(&TotalsKey) -> bool) -> Result<Vec<(TotalsKey, Totals)>, ProbeError> {
        let totals: HashMap<&MapData, TotalsKey, Totals> =
            HashMap::try_from(self.ebpf.map("TOTALS").ok_or_else(|| missing_map("TOTALS"))?)
                .map_err(map_err("open", "TOTALS"))?;
        let mut out = Vec::new();
        for entry in &totals {
            let (key, value) = entry.map_err(map_err("read", "TOTALS"))?;
            if keep(&key) && value.allocs != 0 {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    /// The blocks of `tgid` in the live table. Walks the whole table: for tests and
    /// diagnostics, not for a tick.
    pub fn live_blocks(&self, tgid: u32) -> Result<usize, ProbeError> {
        let live: HashMap<&MapData, LiveKey, LiveAlloc> =
            HashMap::try_from(self.ebpf.map("LIVE").ok_or_else(|| missing_map("LIVE"))?)
                .map_err(map_err("open", "LIVE"))?;
        Ok(live.keys().filter_map(Result::ok).filter(|k| k.tgid == tgid).count())
    }

    /// The user stack `id`, innermost frame first.
    pub fn stack(&self, id: u64) -> Option<Vec<u64>> {
        let stacks: HashMap<&MapData, u64, Stack> = HashMap::try_from(self.ebpf.map("STACKS")?).ok()?;
        let stack = stacks.get(&id, 0).ok()?;
        Some(stack.frames().to_vec())
    }

    /// The failure counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, ProbeError> {
        let array: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").ok_or_else(|| missing_map("COUNTERS"))?)
                .map_err(map_err("open", "COUNTERS"))?;
        let mut counters = Counters::default();
        for (i, slot) in counters.0.iter_mut().enumerate() {
            let values = array.get(&(i as u32), 0).map_err(map_err("read", "COUNTERS"))?;
            *slot = values.iter().sum();
        }
        Ok(counters)
    }

    /// The lifecycle ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self.ebpf.take_map("EVENTS").ok_or_else(|| missing_map("EVENTS"))?;
        RingBuf::try_from(map).map_err(map_err("open", "EVENTS"))
    }

    /// Drops every entry of the processes (or process images) `stale` selects by pid
    /// and generation: their totals, their live blocks, and, for `forget_process`, the
    /// process itself. One pass over each table, so callers batch exits and execs.
    pub fn purge(
        &mut self,
        stale: impl Fn(u32, u32) -> bool,
        forget_process: impl Fn(u32, ProcState) -> bool,
    ) -> Result<Purged, ProbeError> {
        let mut removed = 0;
        // The kernel makes a block's totals entry before its live entry and counts it
        // there once the live entry exists, so a stale image with no unfreed allocation
        // in its totals has no live block. Most processes that exit freed everything
        // (or never allocated), and the live table can hold millions of other blocks:
        // it is only walked when there is something in it to drop.
        let mut has_live_blocks = false;
        {
            let mut totals: HashMap<&mut MapData, TotalsKey, Totals> =
                HashMap::try_from(self.ebpf.map_mut("TOTALS").ok_or_else(|| missing_map("TOTALS"))?)
                    .map_err(map_err("open", "TOTALS"))?;
            let keys: Vec<TotalsKey> = totals
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| stale(k.tgid, k.gen))
                .map(|(k, v)| {
                    has_live_blocks |= v.allocs != 0;
                    k
                })
                .collect();
            for key in keys {
                removed += usize::from(totals.remove(&key).is_ok());
            }
        }
        if has_live_blocks {
            let mut live: HashMap<&mut MapData, LiveKey, LiveAlloc> =
                HashMap::try_from(self.ebpf.map_mut("LIVE").ok_or_else(|| missing_map("LIVE"))?)
                    .map_err(map_err("open", "LIVE"))?;
            let keys: Vec<LiveKey> = live
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, v)| stale(k.tgid, v.gen))
                .map(|(k, _)| k)
                .collect();
            for key in keys {
                removed += usize::from(live.remove(&key).is_ok());
            }
        }
        let mut procs = self.procs_mut()?;
        let forgotten: HashSet<u32> = procs
            .iter()
            .filter_map(Result::ok)
            .filter(|(p, s)| forget_process(*p, *s))
            .map(|(p, _)| p)
            .collect();
        for pid in &forgotten {
            let _ = procs.remove(pid);
        }
        for pid in &forgotten {
            self.forget_unwind(*pid);
        }
        self.purge_stacks()?;
        Ok(Purged { entries: removed, forgotten })
    }

    /// Drops the stacks that no totals entry has named at this call and the one before
    /// (also part of [`Probes::purge`]). Call it periodically: stacks outlive the
    /// blocks that named them.
    pub fn purge_stacks(&mut self) -> Result<(), ProbeError> {
        let referenced: HashSet<u64> = {
            let totals: HashMap<&MapData, TotalsKey, Totals> =
                HashMap::try_from(self.ebpf.map("TOTALS").ok_or_else(|| missing_map("TOTALS"))?)
                    .map_err(map_err("open", "TOTALS"))?;
            totals.keys().filter_map(Result::ok).map(|k| k.stack_id).collect()
        };
        let mut stacks: HashMap<&mut MapData, u64, Stack> =
            HashMap::try_from(self.ebpf.map_mut("STACKS").ok_or_else(|| missing_map("STACKS"))?)
                .map_err(map_err("open", "STACKS"))?;
        let unreferenced: HashSet<u64> =
            stacks.keys().filter_map(Result::ok).filter(|id| !referenced.contains(id)).collect();
        for id in unreferenced.intersection(&self.unreferenced_stacks) {
            let _ = stacks.remove(id);
        }
        self.unreferenced_stacks = unreferenced;
        Ok(())
    }

    /// Gives the kernel unwind tables for the executable mappings of `pid` (`maps`, read
    /// now; paths opened through `root`, its `/proc/PID/root`), so its stacks are walked
    /// through `.eh_frame` instead of frame pointers. Each file's rows are built and
    /// stored once; a process whose mappings did not change since its last refresh
    /// costs nothing. Returns the mappings with tables.
    pub fn unwind_process(&mut self, pid: u32, maps: &[Mapping], root: &Path) -> Result<usize, ProbeError> {
        if self.unwind.capacity == 0 {
            return Ok(0);
        }
        let exec: Vec<&Mapping> = maps.iter().filter(|m| m.executable && m.inode != 0).collect();
        let signature: Vec<_> =
            exec.iter().map(|m| (m.start, m.end, (m.dev_major, m.dev_minor, m.inode))).collect();
        if self.unwind.processes.get(&pid) == Some(&signature) {
            return Ok(0);
        }
        let mut entry = match self.unwind_entry(&exec, root)? {
            Some(entry) => entry,
            // The rows are full. Most of them may belong to files no live process maps
            // any more: start over (every process falls back to frame pointers until
            // its next refresh gives it tables again), at most once per interval.
            None if self.unwind.may_compact() => {
                self.reset_unwind()?;
                self.unwind_entry(&exec, root)?.unwrap_or_else(|| self.partial_entry(&exec))
            }
            None => self.partial_entry(&exec),
        };
        entry.gen = self.unwind.next_gen();
        let with_tables = entry.count as usize;
        let mut procs: HashMap<&mut MapData, u32, ProcUnwind> =
            HashMap::try_from(self.ebpf.map_mut("UNWIND_PROCS").ok_or_else(|| missing_map("UNWIND_PROCS"))?)
                .map_err(map_err("open", "UNWIND_PROCS"))?;
        procs.insert(&pid, &entry, 0).map_err(map_err("insert", "UNWIND_PROCS"))?;
        self.unwind.processes.insert(pid, signature);
        Ok(with_tables)
    }

    /// The kernel entry for these mappings, storing the rows of files not stored yet;
    /// `None` when a file's rows do not fit.
    fn unwind_entry(&mut self, exec: &[&Mapping], root: &Path) -> Result<Option<ProcUnwind>, ProbeError> {
        for m in exec.iter().take(MAX_MAPPINGS) {
            let file = (m.dev_major, m.dev_minor, m.inode);
            if self.unwind.files.contains_key(&file) {
                continue;
            }
            let path = m.open_path(root);
            match self.store_rows(&path)? {
                Stored::Rows(stored) => self.unwind.files.insert(file, Some(stored)),
                Stored::NoTables => self.unwind.files.insert(file, None),
                Stored::Full => return Ok(None),
            };
        }
        Ok(Some(self.partial_entry(exec)))
    }

    /// The kernel entry for the mappings whose files have rows stored.
    fn partial_entry(&self, exec: &[&Mapping]) -> ProcUnwind {
        let mut entry = ProcUnwind::default();
        for m in exec.iter().take(MAX_MAPPINGS) {
            let Some(Some(stored)) = self.unwind.files.get(&(m.dev_major, m.dev_minor, m.inode)) else {
                continue;
            };
            let table = unwind::FileTable { rows: Vec::new(), segments: stored.segments.clone() };
            let Some(bias) = table.bias(m.start, m.offset) else { continue };
            entry.mappings[entry.count as usize] = UnwindMapping {
                start: m.start,
                end: m.end,
                bias,
                first_row: stored.first_row,
                rows: stored.rows,
            };
            entry.count += 1;
        }
        entry
    }

    /// Forgets every file's rows and every process's tables, in the kernel too.
    fn reset_unwind(&mut self) -> Result<(), ProbeError> {
        let mut procs: HashMap<&mut MapData, u32, ProcUnwind> =
            HashMap::try_from(self.ebpf.map_mut("UNWIND_PROCS").ok_or_else(|| missing_map("UNWIND_PROCS"))?)
                .map_err(map_err("open", "UNWIND_PROCS"))?;
        let pids: Vec<u32> = procs.keys().filter_map(Result::ok).collect();
        for pid in pids {
            let _ = procs.remove(&pid);
        }
        info!(
            rows = self.unwind.rows_used(),
            files = self.unwind.files.len(),
            "unwind tables full: starting over with the files live processes map"
        );
        self.unwind.reset();
        Ok(())
    }

    /// Builds and stores one file's rows.
    fn store_rows(&mut self, path: &Path) -> Result<Stored, ProbeError> {
        let table = match unwind::file_table(path) {
            Ok(table) => table,
            Err(e) => {
                debug!("no unwind tables: {e}");
                return Ok(Stored::NoTables);
            }
        };
        let Some(first_row) = self.unwind.reserve(table.rows.len()) else {
            if !std::mem::replace(&mut self.unwind.warned_full, true) {
                warn!(
                    file = %path.display(),
                    rows = table.rows.len(),
                    capacity = self.unwind.capacity,
                    "the unwind-row table is full: stacks stop at files that do not fit (raise unwind-rows)"
                );
            }
            return Ok(Stored::Full);
        };
        let mut rows: Array<&mut MapData, Row> =
            Array::try_from(self.ebpf.map_mut("UNWIND_ROWS").ok_or_else(|| missing_map("UNWIND_ROWS"))?)
                .map_err(map_err("open", "UNWIND_ROWS"))?;
        for (i, row) in table.rows.iter().enumerate() {
            rows.set(first_row + i as u32, row, 0).map_err(map_err("write", "UNWIND_ROWS"))?;
        }
        debug!(file = %path.display(), rows = table.rows.len(), "unwind tables stored");
        Ok(Stored::Rows(unwind::Stored {
            first_row,
            rows: table.rows.len() as u32,
            segments: table.segments,
        }))
    }

    /// Processes whose stacks reached code their tables do not cover, since the last
    /// call; refresh them with [`Probes::unwind_process`].
    pub fn unwind_stale(&mut self) -> Vec<u32> {
        let Some(map) = self.ebpf.map_mut("UNWIND_STALE") else { return Vec::new() };
        let Ok(mut stale) = HashMap::<&mut MapData, u32, u32>::try_from(map) else { return Vec::new() };
        let pids: Vec<u32> = stale.keys().filter_map(Result::ok).collect();
        for pid in &pids {
            let _ = stale.remove(pid);
        }
        pids
    }

    /// Unwind-table rows in use and their capacity.
    pub fn unwind_rows(&self) -> (u32, u32) {
        (self.unwind.rows_used(), self.unwind.capacity)
    }

    /// Processes given unwind tables (and not forgotten since).
    pub fn unwind_processes(&self) -> usize {
        self.unwind.processes.len()
    }

    /// Whether `pid` has unwind tables from an earlier [`Probes::unwind_process`].
    pub fn has_unwind(&self, pid: u32) -> bool {
        self.unwind.processes.contains_key(&pid)
    }

    /// Gives the kernel the layout of `pid`'s CPython, if it runs one whose frames
    /// leakmon walks (see [`crate::python`]); says once per process, in a log line, that
    /// another Python gets native frames only. Returns whether its frames are walked.
    pub fn python_process(&mut self, pid: u32, maps: &[Mapping], root: &Path) -> Result<bool, ProbeError> {
        let mapped = |inode: u64| maps.iter().any(|m| m.executable && m.inode == inode);
        if let Some(&inode) = self.python.get(&pid) {
            if inode == 0 || mapped(inode) {
                return Ok(inode != 0);
            }
        }
        let interpreter = match crate::python::Interpreter::find(maps, root) {
            // Not (yet) a Python process: looked for again at its next refresh.
            None => return Ok(false),
            Some(Err(why)) => {
                warn!(pid, "{why}: its stacks keep native frames only");
                self.python.insert(pid, 0);
                return Ok(false);
            }
            Some(Ok(interpreter)) => interpreter,
        };
        let (major, minor, micro) = interpreter.version;
        let mut layouts: HashMap<&mut MapData, u32, PyLayout> =
            HashMap::try_from(self.ebpf.map_mut("PY_PROCS").ok_or_else(|| missing_map("PY_PROCS"))?)
                .map_err(map_err("open", "PY_PROCS"))?;
        layouts.insert(&pid, &interpreter.layout, 0).map_err(map_err("insert", "PY_PROCS"))?;
        info!(pid, "Python {major}.{minor}.{micro}: stacks name Python functions and lines");
        self.python.insert(pid, interpreter.inode);
        Ok(true)
    }

    /// Drops `pid`'s unwind tables (its image was replaced, or it is gone).
    pub fn forget_unwind(&mut self, pid: u32) {
        if self.python.remove(&pid).is_some() {
            if let Some(map) = self.ebpf.map_mut("PY_PROCS") {
                if let Ok(mut layouts) = HashMap::<&mut MapData, u32, PyLayout>::try_from(map) {
                    let _ = layouts.remove(&pid);
                }
            }
        }
        self.unwind.processes.remove(&pid);
        if let Some(map) = self.ebpf.map_mut("UNWIND_PROCS") {
            if let Ok(mut procs) = HashMap::<&mut MapData, u32, ProcUnwind>::try_from(map) {
                let _ = procs.remove(&pid);
            }
        }
    }

    fn procs_mut(&mut self) -> Result<HashMap<&mut MapData, u32, ProcState>, ProbeError> {
        HashMap::try_from(self.ebpf.map_mut("PROCS").ok_or_else(|| missing_map("PROCS"))?)
            .map_err(map_err("open", "PROCS"))
    }
}

impl Drop for Probes {
    /// Closes every link side by side before the programs go (aya would close them one
    /// after another, a grace period each).
    fn drop(&mut self) {
        let mut links = std::mem::take(&mut self.system_links);
        for (_, process) in std::mem::take(&mut self.per_process) {
            links.extend(process.links);
        }
        if let Err(e) = self.detach_links(links) {
            debug!("detach at exit: {e}");
        }
    }
}

/// The links attached for one process, and the files they cover.
#[derive(Debug, Default)]
struct ProcessLinks {
    files: HashSet<FileId>,
    links: Vec<Link>,
}

/// Drops each link on a thread of its own, so that their grace periods overlap.
fn close_side_by_side(links: Vec<aya::programs::uprobe::UProbeLink>) {
    if links.len() < 2 {
        return drop(links);
    }
    std::thread::scope(|scope| {
        for link in links {
            // A thread that cannot start leaves its link to be closed here.
            let _ = std::thread::Builder::new().spawn_scoped(scope, move || drop(link));
        }
    });
}

/// What [`Probes::purge`] dropped.
#[derive(Debug, Default)]
pub struct Purged {
    /// Totals and live-block entries.
    pub entries: usize,
    /// The processes taken out of the process table.
    pub forgotten: HashSet<u32>,
}

/// Entry points among attached links (the shared return probe is not one).
fn entry_count(links: &[Link]) -> usize {
    links.iter().map(|l| l.entry_points).sum()
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe, ProbeError> {
    ebpf.program_mut(name).ok_or_else(|| missing_program(name))?.try_into().map_err(prog_err("find", name))
}

fn missing_program(name: &str) -> ProbeError {
    ProbeError::Program {
        action: "find",
        program: name.to_owned(),
        source: Box::new(ProgramError::UnexpectedProgramType),
    }
}

fn missing_map(name: &'static str) -> ProbeError {
    ProbeError::Map {
        action: "find",
        map: name,
        source: Box::new(MapError::InvalidName { name: name.to_owned() }),
    }
}

/// Older kernels charge BPF memory to `RLIMIT_MEMLOCK`; newer ones to the cgroup. Raise
/// the limit where allowed and go on where not.
fn raise_memlock_limit() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) } != 0 {
        debug!(
            "could not raise RLIMIT_MEMLOCK ({}); relying on cgroup accounting of BPF memory",
            std::io::Error::last_os_error()
        );
    }
}

//! The probe layer: the only module that touches `aya::Ebpf`.
//!
//! In: settings (trace everything or chosen processes, table sizes). Out: narrow
//! handles the rest of leakmon uses: attach to a library file, start tracing a process,
//! read per-stack totals, stacks and failure counters, take the lifecycle ring buffer,
//! forget a process. Dropping [`Probes`] detaches every probe.
//!
//! Here: loading the programs. `links`: attaching and detaching the allocator probes.
//! `tables`: reading and purging the kernel's tables. `unwind_upkeep`: keeping the
//! unwind tables and CPython layouts in step with the processes' mappings.

mod batch;
pub mod kernel_btf;
mod links;
pub use links::AttachKind;
use links::{attach_kinds, Link, ProcessLinks};
pub mod placement;
mod tables;
pub use tables::{Counters, Purged};
pub mod targets;
pub mod task_iter;
pub mod tracefs;
pub mod unwind;
mod unwind_upkeep;

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
    /// Per-stack totals read entry by entry, not in batches (to compare the two).
    pub read_by_entry: bool,
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
            read_by_entry: false,
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
    /// Processes a runtime's frame walker was decided for (see
    /// [`Probes::walks`]); looked at again when the file is no longer mapped.
    walked: StdHashMap<u32, unwind_upkeep::Walk>,
    read_by_entry: bool,
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
            walked: StdHashMap::new(),
            read_by_entry: settings.read_by_entry,
        })
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

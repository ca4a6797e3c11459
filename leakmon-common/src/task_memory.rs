//! The always-on tier's one pass over the kernel's processes: a program that walks the
//! kernel's list of processes and writes, per process, the memory counters
//! `/proc/PID/status` prints, its start time, its name and its cgroup set into a map the
//! daemon has mapped, so a sample of every process is one read instead of three files a
//! process.
//!
//! The program is a task iterator run over one task (the daemon's own) that walks the
//! whole list itself: the kernel's per-task iteration (a pid lookup, a reference taken
//! and dropped, a program run, for every thread) cost as much as the program's own work.
//!
//! Kernel structures move between versions: the user side finds every offset in the
//! running kernel's BTF and hands them over in [`TaskLayout`].

/// Program, map and global names in the `leakmon-tasks` object.
pub const PROGRAM: &str = "task_memory";
pub const LAYOUT_GLOBAL: &str = "TASK_LAYOUT";
/// The records, an array the daemon maps (`BPF_F_MMAPABLE`): its size is set at load.
pub const RECORDS_MAP: &str = "RECORDS";

/// Processes a walk visits at most: the kernel's largest `pid_max`, and its idle task.
pub const MAX_PROCESSES: u32 = (1 << 22) + 1;

/// CPUs whose per-CPU counter parts are summed; a host with more falls back to /proc.
pub const MAX_CPUS: usize = 512;

/// The memory counters of a process, in the kernel's `MM_*` order as the user side
/// found it (see [`TaskLayout::counter`]).
pub const COUNTERS: usize = 4;

/// Where things are in the running kernel, in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskLayout {
    /// `task_struct.pid`; `tgid` follows it.
    pub task_pid: u32,
    /// `task_struct.tasks`: the list of every process (thread group leaders) runs
    /// through it.
    pub task_tasks: u32,
    pub task_mm: u32,
    pub task_start_boottime: u32,
    pub task_comm: u32,
    pub task_cgroups: u32,
    /// `mm_struct.rss_stat`: an array of `struct percpu_counter`.
    pub mm_rss_stat: u32,
    pub counter_size: u32,
    pub counter_count: u32,
    pub counter_counters: u32,
    /// `bpf_array.pptrs`: where the per-CPU probe map keeps its element's per-CPU
    /// pointer, from which each CPU's offset is found.
    pub array_pptrs: u32,
    /// CPUs to sum over (`nr_cpu_ids`).
    pub cpus: u32,
    /// For each of [`TaskMemory::pages`], the `MM_*` counter it holds.
    pub counter: [u32; COUNTERS],
}

/// One process, as the iterator writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskMemory {
    pub pid: u32,
    /// Set when a per-CPU part could not be read: the sums are not exact.
    pub partial: u32,
    /// `start_boottime`, nanoseconds since boot (`/proc/PID/stat`'s start time is this
    /// in clock ticks).
    pub start_ns: u64,
    /// Pages: file, anonymous, swapped out, shared memory (`RssFile`, `RssAnon`,
    /// `VmSwap`, `RssShmem`), each summed over its per-CPU parts as /proc does.
    pub pages: [u64; COUNTERS],
    /// The task's `css_set`: it changes whenever the process moves between cgroups.
    pub css_set: u64,
    pub comm: [u8; 16],
}

/// What a pass writes to the iterator's file once the walk is over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassSummary {
    /// Records written, from index 0 of [`RECORDS_MAP`].
    pub written: u32,
    /// Processes with memory of their own seen: more than `written` when the map was
    /// too small for them all.
    pub seen: u32,
    /// 1 when the walk came back to where it started: it saw every process.
    pub complete: u32,
    pub _pad: u32,
}

/// Indexes into [`TaskMemory::pages`].
pub mod page {
    pub const FILE: usize = 0;
    pub const ANON: usize = 1;
    pub const SWAP: usize = 2;
    pub const SHMEM: usize = 3;
}

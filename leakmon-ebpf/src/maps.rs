//! The maps, their sizes and why, plus the globals userspace sets at load time.
//!
//! Sizes here are defaults; userspace resizes `LIVE`, `TOTALS`, `PROCS` and `STACKS`
//! from its configuration before loading.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use leakmon_common::{
    counter, InFlight, LiveAlloc, LiveKey, ProcState, Stack, Totals, TotalsKey, TracepointOffsets,
};

/// Entry→return state per thread. LRU so a thread that dies inside malloc cannot pin
/// an entry forever; 16 Ki threads inside an allocator at once is far above real use.
#[map]
pub static INFLIGHT: LruHashMap<u32, InFlight> = LruHashMap::with_max_entries(16384, 0);

/// Traced processes. Presence means traced; in trace-all mode entries are created on
/// a process's first allocation. Hash (not array) because pids are sparse.
#[map]
pub static PROCS: HashMap<u32, ProcState> = HashMap::with_max_entries(32768, 0);

/// Every unfreed block of every traced process. Plain (not LRU) hash: an evicted entry
/// would leave its bytes in `TOTALS` for ever, a phantom leak.
#[map]
pub static LIVE: HashMap<LiveKey, LiveAlloc> = HashMap::with_max_entries(262_144, 0);

/// Unfreed bytes per (process, image generation, stack): what reports and metrics read,
/// small enough to scan often.
#[map]
pub static TOTALS: HashMap<TotalsKey, Totals> = HashMap::with_max_entries(65536, 0);

/// User stacks of allocation sites, keyed by the 64-bit hash of their frames. Not the
/// kernel's stack map: that one keys by a bucket index, so two live stacks in one
/// bucket collide (measured: one run in twenty of a 60-stack program lost a stack in
/// 16 Ki buckets). Not preallocated: an entry is 1 KiB and most hosts use a fraction.
#[map]
pub static STACKS: HashMap<u64, Stack> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// Where a stack is taken before it is hashed: too big for the 512-byte BPF stack.
#[map]
pub static STACK_SCRATCH: PerCpuArray<Stack> = PerCpuArray::with_max_entries(1, 0);

/// One value per CPU written and read back, so the verifier forgets what it knew of it.
#[map]
pub static VALUE_SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `value`, as a number the verifier knows nothing of (a round trip through
/// [`VALUE_SCRATCH`]).
#[inline(always)]
pub fn forget(value: usize) -> usize {
    let Some(slot) = VALUE_SCRATCH.get_ptr_mut(0) else { return 0 };
    // SAFETY: this CPU's slot; programs on one CPU do not preempt each other.
    unsafe {
        core::ptr::write_volatile(slot, value as u64);
        core::ptr::read_volatile(slot) as usize
    }
}

/// `value`, as a number LLVM knows nothing of (a volatile round trip through a local),
/// so that a mask or a comparison after it stays where the verifier sees it: LLVM drops
/// a mask it can prove idle, and turns the sign bit of a difference into a branch.
/// Unlike [`forget`], the verifier still knows the value.
#[inline(always)]
pub fn opaque(value: u64) -> u64 {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&raw const value) }
}

/// Bytes left before the next sampled allocation on this CPU (sampling mode only).
#[map]
pub static SAMPLE_COUNTDOWN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Failure counters (see `leakmon_common::counter`), per CPU so the hot path never
/// contends on one cache line.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Lifecycle events only (fork/exec/exit of traced processes): rare, so 256 KiB holds
/// thousands of them between two drains.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// leakmon's own process: never traced, so its allocations cannot feed back.
#[unsafe(no_mangle)]
static SELF_TGID: u32 = 0;

/// 1: trace every process that maps a probed library; 0: only those in `PROCS`.
#[unsafe(no_mangle)]
static TRACE_ALL: u32 = 0;

/// Mean bytes between sampled allocations; 0: every allocation is tracked exactly.
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 0;

#[unsafe(no_mangle)]
static TP_OFFSETS: TracepointOffsets =
    TracepointOffsets { newtask_pid: 8, newtask_clone_flags: 32, exit_group_dead: 32, oom_victim_pid: 8 };

#[inline(always)]
pub fn self_tgid() -> u32 {
    // SAFETY: a plain read of a global that userspace fills in before load.
    unsafe { core::ptr::read_volatile(&raw const SELF_TGID) }
}

#[inline(always)]
pub fn trace_all() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&raw const TRACE_ALL) != 0 }
}

#[inline(always)]
pub fn sample_bytes() -> u64 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&raw const SAMPLE_BYTES) }
}

#[inline(always)]
pub fn tp_offsets() -> TracepointOffsets {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&raw const TP_OFFSETS) }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and programs on one CPU do not preempt each other.
        unsafe { *slot += 1 };
    }
}

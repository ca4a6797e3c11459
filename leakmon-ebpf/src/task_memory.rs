//! The always-on tier's walk over every process (see `leakmon_common::task_memory`): one
//! record per process, written into a map the daemon has mapped, with the memory
//! counters summed over their per-CPU parts exactly as `/proc/PID/status` sums them.
//!
//! A program of its own, apart from the allocation probes: the always-on tier loads
//! only this. Every kernel field is read with `bpf_probe_read_kernel` at an offset the
//! user side found in the kernel's BTF, so one object serves every kernel version: the
//! walk follows plain addresses, which the verifier lets no plain load use.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{seq_file, BPF_F_MMAPABLE},
    helpers::{
        bpf_loop, bpf_probe_read_kernel,
        generated::{bpf_map_lookup_percpu_elem, bpf_probe_read_kernel as raw_read, bpf_seq_write},
    },
    macros::map,
    maps::{Array, PerCpuArray},
};
use leakmon_common::task_memory::{PassSummary, TaskLayout, TaskMemory, COUNTERS, MAX_CPUS, MAX_PROCESSES};

/// The running kernel's offsets, filled in by the user side before load. A read-only
/// global: the verifier knows each field as a constant, so the sizes and bounds made of
/// them are checked once.
#[unsafe(no_mangle)]
static TASK_LAYOUT: TaskLayout = TaskLayout {
    task_pid: 0,
    task_tasks: 0,
    task_mm: 0,
    task_start_boottime: 0,
    task_comm: 0,
    task_cgroups: 0,
    mm_rss_stat: 0,
    counter_size: 0,
    counter_count: 0,
    counter_counters: 0,
    array_pptrs: 0,
    cpus: 0,
    counter: [0; COUNTERS],
};

/// Where a pass's walk is, in map memory rather than on the stack: to the verifier each
/// visit's values are then unknown, and the callback is checked once, not once a count.
#[repr(C)]
struct Walk {
    /// `tasks` of the process the walk started from, and of the last one visited.
    head: u64,
    at: u64,
    written: u32,
    seen: u32,
    complete: u32,
    /// Set once the process the walk starts from is visited.
    started: u32,
    /// The counters of the process being visited, read at once: too big for the
    /// callback's stack beside the caller's.
    block: [u64; BLOCK_WORDS],
}

#[map]
static WALK: Array<Walk> = Array::with_max_entries(1, 0);

/// The records: as many as the daemon made room for at load.
#[map]
static RECORDS: Array<TaskMemory> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Room for the four `percpu_counter`s of `mm_struct.rss_stat` (40 bytes each today).
const BLOCK_WORDS: usize = 32;
const _: () = assert!((BLOCK_WORDS * 8).is_power_of_two());

/// Each CPU's per-CPU offset (what `per_cpu_ptr` adds), found on the first pass.
#[repr(C)]
struct CpuOffsets {
    found: u64,
    offsets: [u64; MAX_CPUS],
}

#[map]
static CPU_OFFSETS: Array<CpuOffsets> = Array::with_max_entries(1, 0);

/// A per-CPU map of one element: its per-CPU pointer and each CPU's copy of it give the
/// CPUs' offsets.
#[map]
static PROBE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub fn task_memory(ctx: *mut c_void) -> i32 {
    let _ = try_task_memory(ctx);
    0
}

#[inline(always)]
fn layout() -> TaskLayout {
    // SAFETY: a plain read of a global the user side fills in before load.
    unsafe { core::ptr::read_volatile(&raw const TASK_LAYOUT) }
}

/// Reads `size_of::<T>()` bytes at `addr` into `out` (zeros where it cannot) and
/// returns the helper's result, without a branch: the loops over CPUs below stay small
/// enough for the verifier to walk every iteration.
#[inline(always)]
fn read_into<T>(out: &mut T, addr: u64) -> i64 {
    // SAFETY: a checked kernel read into our own stack.
    unsafe { raw_read((out as *mut T).cast(), core::mem::size_of::<T>() as u32, addr as *const c_void) }
}

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: a checked kernel read; a bad address is an error, never a fault.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// A pointer's value as a plain number: the verifier lets no arithmetic be done on a
/// map's or a value's address, but a copy read back through the helper is a number.
#[inline(always)]
fn address(p: *const c_void) -> u64 {
    let slot = [p];
    let mut out = 0u64;
    read_into(&mut out, slot.as_ptr() as u64);
    out
}

/// Fills the CPUs' offsets: a per-CPU element on CPU `c` sits at its per-CPU pointer
/// plus that CPU's offset.
fn find_offsets(layout: &TaskLayout, found: &mut CpuOffsets) -> Option<()> {
    let map = core::ptr::addr_of!(PROBE).cast::<c_void>();
    let pptr: u64 = read(address(map) + u64::from(layout.array_pptrs))?;
    let key = 0u32;
    let mut missing = 0u64;
    let mut cpu = 0usize;
    while cpu < MAX_CPUS {
        if cpu as u32 >= layout.cpus {
            break;
        }
        // SAFETY: a lookup in our own map.
        let here = unsafe {
            bpf_map_lookup_percpu_elem(map.cast_mut(), core::ptr::addr_of!(key).cast(), cpu as u32)
        };
        let at = address(here);
        missing |= u64::from(at == 0);
        found.offsets[cpu] = at.wrapping_sub(pptr);
        cpu += 1;
    }
    if missing != 0 {
        return None;
    }
    found.found = 1;
    Some(())
}

fn try_task_memory(ctx: *mut c_void) -> Option<()> {
    let layout = layout();
    // The context: the iterator's meta (with the output file), then the task, NULL
    // once past the last one. The link visits one task, the daemon's own.
    // SAFETY: the kernel hands a valid context; the loads are checked by the verifier.
    let (seq, task) = unsafe {
        let meta = *(ctx as *const *const *mut seq_file);
        (*meta, *(ctx as *const *const c_void).add(1))
    };
    if task.is_null() {
        return None;
    }
    let offsets = CPU_OFFSETS.get_ptr_mut(0)?;
    // SAFETY: our own map's value, used by this program alone.
    if unsafe { (*offsets).found } == 0 {
        find_offsets(&layout, unsafe { &mut *offsets })?;
    }
    let walk = WALK.get_ptr_mut(0)?;
    // SAFETY: as above (one pass at a time: the daemon reads its passes in turn).
    let walk = unsafe { &mut *walk };
    let head = address(task).wrapping_add(u64::from(layout.task_tasks));
    walk.head = head;
    walk.at = head;
    walk.written = 0;
    walk.seen = 0;
    walk.complete = 0;
    walk.started = 0;
    // The list is walked under the RCU read lock the kernel holds for the program: a
    // process leaving it meanwhile keeps its link to the next, as `for_each_process`
    // relies on.
    // SAFETY: `visit` has the callback's signature and takes no context.
    unsafe { bpf_loop(MAX_PROCESSES, visit as *mut c_void, core::ptr::null_mut(), 0) };
    let summary = PassSummary { written: walk.written, seen: walk.seen, complete: walk.complete, _pad: 0 };
    // SAFETY: the verifier checked `seq` is the iterator's file; the summary is ours.
    unsafe {
        bpf_seq_write(seq, core::ptr::addr_of!(summary).cast(), core::mem::size_of::<PassSummary>() as u32);
    }
    Some(())
}

/// Visits the process after `walk.at`: 0 to go on, 1 once back at the start.
extern "C" fn visit(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(walk) = WALK.get_ptr_mut(0) else { return 1 };
    // SAFETY: our own map's value, set up by the pass that runs this loop.
    let walk = unsafe { &mut *walk };
    // The first visit is the process the walk starts from; each next one follows the
    // link, until it leads back there.
    let next = if walk.started == 0 {
        walk.started = 1;
        walk.head
    } else {
        let Some(next) = read::<u64>(walk.at) else { return 1 };
        if next == walk.head {
            walk.complete = 1;
            return 1;
        }
        next
    };
    walk.at = next;
    let layout = layout();
    let task = next.wrapping_sub(u64::from(layout.task_tasks));
    let Some(ids) = read::<u64>(task + u64::from(layout.task_pid)) else { return 0 };
    let mm = read::<u64>(task + u64::from(layout.task_mm)).unwrap_or(0);
    // Kernel threads and exiting processes have no memory of their own (/proc prints
    // none).
    if mm == 0 {
        return 0;
    }
    walk.seen += 1;
    // Past the map's end the walk still counts, for the daemon to make room.
    let Some(out) = RECORDS.get_ptr_mut(walk.written) else { return 0 };
    walk.written += 1;
    // SAFETY: an element of our own map, written by this pass alone.
    let out = unsafe { &mut *out };
    let failed = counters(&layout, mm, &mut walk.block, &mut out.pages);
    out.pid = (ids >> 32) as u32;
    let mut other = 0;
    other |= read_into(&mut out.start_ns, task + u64::from(layout.task_start_boottime));
    other |= read_into(&mut out.comm, task + u64::from(layout.task_comm));
    other |= read_into(&mut out.css_set, task + u64::from(layout.task_cgroups));
    out.partial = u32::from(failed != 0 || other != 0);
    0
}

/// A process's memory counters as `percpu_counter_sum_positive` adds them up: the
/// shared count plus every CPU's part. Non-zero when something could not be read.
#[inline(always)]
fn counters(
    layout: &TaskLayout,
    mm: u64,
    block: &mut [u64; BLOCK_WORDS],
    pages: &mut [u64; COUNTERS],
) -> i64 {
    // The counters side by side (40 bytes each): one read for all.
    let size = layout.counter_size.wrapping_mul(COUNTERS as u32);
    if size as usize >= core::mem::size_of_val(block) || size == 0 {
        return -1;
    }
    // The bound above, said again for the verifier: through memory, or the compiler
    // drops the mask as redundant and tests a copy the verifier does not connect.
    // SAFETY: a read of a local.
    let size = unsafe { core::ptr::read_volatile(&raw const size) } & (BLOCK_WORDS as u32 * 8 - 1);
    // SAFETY: a checked kernel read into our own stack, at most its size.
    let mut failed = unsafe {
        raw_read(block.as_mut_ptr().cast(), size, (mm + u64::from(layout.mm_rss_stat)) as *const c_void)
    };
    let word = |at: u32| block.get(at as usize / 8).copied().unwrap_or(0);
    let mut sums = [0i64; COUNTERS];
    let mut parts = [0u64; COUNTERS];
    let mut i = 0;
    while i < COUNTERS {
        let counter = layout.counter[i] * layout.counter_size;
        sums[i] = word(counter + layout.counter_count) as i64;
        parts[i] = word(counter + layout.counter_counters);
        i += 1;
    }
    let Some(offsets) = CPU_OFFSETS.get_ptr(0) else { return -1 };
    // SAFETY: our own map's value, filled before the walk.
    let offsets = unsafe { &*offsets };
    // Since 6.7 a process's counters keep their per-CPU parts side by side, in `MM_*`
    // order: one read a CPU gets all of them.
    let first = parts[0].wrapping_sub(u64::from(layout.counter[0]) * 4);
    let mut together = true;
    let mut i = 0;
    while i < COUNTERS {
        together &= parts[i] == first.wrapping_add(u64::from(layout.counter[i]) * 4);
        i += 1;
    }
    let mut cpu = 0usize;
    while cpu < MAX_CPUS {
        if cpu as u32 >= layout.cpus {
            break;
        }
        let offset = offsets.offsets[cpu];
        if together {
            let mut all = [0i32; COUNTERS];
            failed |= read_into(&mut all, first.wrapping_add(offset));
            let mut i = 0;
            while i < COUNTERS {
                sums[i] += i64::from(all[layout.counter[i] as usize % COUNTERS]);
                i += 1;
            }
        } else {
            let mut i = 0;
            while i < COUNTERS {
                let mut part = 0i32;
                failed |= read_into(&mut part, parts[i].wrapping_add(offset));
                sums[i] += i64::from(part);
                i += 1;
            }
        }
        cpu += 1;
    }
    let mut i = 0;
    while i < COUNTERS {
        pages[i] = sums[i].max(0) as u64;
        i += 1;
    }
    failed
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

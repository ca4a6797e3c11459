//! The always-on tier's task iterator (see `leakmon_common::task_memory`): one record
//! per process, written into the reader's buffer, with the memory counters summed over
//! their per-CPU parts exactly as `/proc/PID/status` sums them.
//!
//! A program of its own, apart from the allocation probes: the always-on tier loads
//! only this. Every kernel field is read with `bpf_probe_read_kernel` at an offset the
//! user side found in the kernel's BTF, so one object serves every kernel version.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::seq_file,
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_map_lookup_percpu_elem, bpf_probe_read_kernel as raw_read, bpf_seq_write},
    },
    macros::map,
    maps::{Array, PerCpuArray},
};
use leakmon_common::task_memory::{TaskLayout, TaskMemory, COUNTERS, MAX_CPUS};

#[map]
static TASK_LAYOUT: Array<TaskLayout> = Array::with_max_entries(1, 0);

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
    // The context: the iterator's meta (with the output file), then the task, NULL
    // once past the last one.
    // SAFETY: the kernel hands a valid context; both loads are checked by the verifier.
    let seq = unsafe {
        let meta = *(ctx as *const *const *mut seq_file);
        *meta
    };
    let task: u64 = read(ctx as u64 + 8)?;
    if task == 0 {
        return None;
    }
    let layout = TASK_LAYOUT.get(0)?;
    let ids: [u32; 2] = read(task + u64::from(layout.task_pid))?;
    // Threads share their leader's memory: one record per process.
    if ids[0] != ids[1] {
        return None;
    }
    let mm: u64 = read(task + u64::from(layout.task_mm))?;
    // Kernel threads and zombies have no memory of their own (/proc prints none).
    if mm == 0 {
        return None;
    }
    let offsets = CPU_OFFSETS.get_ptr_mut(0)?;
    // SAFETY: our own map's value, used by this program alone.
    let offsets = unsafe { &mut *offsets };
    if offsets.found == 0 {
        find_offsets(layout, offsets)?;
    }
    // Each counter as `percpu_counter_sum_positive` adds it up: the shared count plus
    // every CPU's part.
    let mut sums = [0i64; COUNTERS];
    let mut parts = [0u64; COUNTERS];
    let mut failed = 0i64;
    let rss_stat = mm + u64::from(layout.mm_rss_stat);
    let mut i = 0;
    while i < COUNTERS {
        let counter = rss_stat + u64::from(layout.counter[i]) * u64::from(layout.counter_size);
        failed |= read_into(&mut sums[i], counter + u64::from(layout.counter_count));
        failed |= read_into(&mut parts[i], counter + u64::from(layout.counter_counters));
        i += 1;
    }
    let mut cpu = 0usize;
    while cpu < MAX_CPUS {
        if cpu as u32 >= layout.cpus {
            break;
        }
        let offset = offsets.offsets[cpu];
        let mut i = 0;
        while i < COUNTERS {
            let mut part = 0i32;
            failed |= read_into(&mut part, parts[i].wrapping_add(offset));
            sums[i] += i64::from(part);
            i += 1;
        }
        cpu += 1;
    }
    let mut out = TaskMemory { pid: ids[1], partial: u32::from(failed != 0), ..TaskMemory::default() };
    let mut i = 0;
    while i < COUNTERS {
        out.pages[i] = sums[i].max(0) as u64;
        i += 1;
    }
    out.start_ns = read(task + u64::from(layout.task_start_boottime))?;
    out.comm = read(task + u64::from(layout.task_comm))?;
    out.css_set = read(task + u64::from(layout.task_cgroups))?;
    // SAFETY: the verifier checked `seq` is the iterator's file; the record is ours.
    unsafe {
        bpf_seq_write(seq, core::ptr::addr_of!(out).cast(), core::mem::size_of::<TaskMemory>() as u32);
    }
    Some(())
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

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

/// The running kernel's offsets, filled in by the user side before load. A read-only
/// global: the verifier knows each field as a constant, so the task's fields are read
/// with plain loads it checks against the kernel's types (no helper call each).
#[unsafe(no_mangle)]
static TASK_LAYOUT: TaskLayout = TaskLayout {
    task_pid: 0,
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
    _pad: 0,
};

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

/// A field of a kernel object the verifier knows the type of, at a constant offset:
/// a plain load, made fault-safe by the kernel.
#[inline(always)]
unsafe fn field<T: Copy>(object: *const u8, offset: u32) -> T {
    // SAFETY: the caller passes a typed kernel pointer; the verifier checks the access.
    unsafe { core::ptr::read(object.add(offset as usize).cast::<T>()) }
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
    // once past the last one.
    // SAFETY: the kernel hands a valid context; the loads are checked by the verifier.
    let (seq, task) = unsafe {
        let meta = *(ctx as *const *const *mut seq_file);
        (*meta, *(ctx as *const *const u8).add(1))
    };
    if task.is_null() {
        return None;
    }
    // SAFETY (each `field`): `task` is the iterator's task; the offsets are its fields'.
    let (pid, tgid): (u32, u32) = unsafe { (field(task, layout.task_pid), field(task, layout.task_pid + 4)) };
    // Threads share their leader's memory: one record per process.
    if pid != tgid {
        return None;
    }
    let mm: *const u8 = unsafe { field(task, layout.task_mm) };
    // Kernel threads and zombies have no memory of their own (/proc prints none).
    if mm.is_null() {
        return None;
    }
    let offsets = CPU_OFFSETS.get_ptr_mut(0)?;
    // SAFETY: our own map's value, used by this program alone.
    let offsets = unsafe { &mut *offsets };
    if offsets.found == 0 {
        find_offsets(&layout, offsets)?;
    }
    // Each counter as `percpu_counter_sum_positive` adds it up: the shared count plus
    // every CPU's part.
    let mut sums = [0i64; COUNTERS];
    let mut parts = [0u64; COUNTERS];
    let mut i = 0;
    while i < COUNTERS {
        let counter = layout.mm_rss_stat + layout.counter[i] * layout.counter_size;
        // SAFETY: `mm` is the task's mm_struct; these are its counters' fields.
        unsafe {
            sums[i] = field(mm, counter + layout.counter_count);
            parts[i] = field(mm, counter + layout.counter_counters);
        }
        i += 1;
    }
    let mut failed = 0i64;
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
    let mut out = TaskMemory { pid: tgid, partial: u32::from(failed != 0), ..TaskMemory::default() };
    let mut i = 0;
    while i < COUNTERS {
        out.pages[i] = sums[i].max(0) as u64;
        i += 1;
    }
    // SAFETY: as above.
    unsafe {
        out.start_ns = field(task, layout.task_start_boottime);
        out.comm = [field::<[u8; 8]>(task, layout.task_comm), field::<[u8; 8]>(task, layout.task_comm + 8)]
            .as_flattened()
            .try_into()
            .unwrap_or_default();
        out.css_set = field::<*const u8>(task, layout.task_cgroups) as u64;
    }
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

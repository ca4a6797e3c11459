//! leakmon's kernel side: exact unfreed-allocation accounting.
//!
//! Hooks: uprobes at the entry of the allocator family (`alloc_*`), one uretprobe
//! shared by all of them (`alloc_return`), a uprobe at `free`, and three tracepoints
//! for process lifecycle (`task:task_newtask`, `sched:sched_process_exec`,
//! `sched:sched_process_exit`).
//!
//! The live table and the per-stack totals are kept here, in the kernel, and change
//! together: a block is counted in `TOTALS` only once its `LIVE` entry exists, and
//! uncounted only when that entry is removed. A full table therefore under-counts (and
//! says so through `COUNTERS` and the process's `INCOMPLETE` flag) but can never invent
//! a leak. Nothing is sent to userspace on the allocation path; the ring buffer carries
//! only the rare lifecycle events, so a busy process cannot crowd another out of it.
//! No aya-log calls: they would cost instructions on every malloc.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod lifecycle;
mod maps;
mod probes;
mod python;
mod unwind;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

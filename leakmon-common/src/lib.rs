//! Types shared by the eBPF programs and the user side.
//!
//! Every type here is `#[repr(C)]` with fixed-width fields and explicit padding so the
//! kernel and user side agree on the layout byte for byte; flags are `u32`, never `bool`.
//! The `user` feature adds `aya::Pod` so the user side can read the maps.
#![no_std]
// Padding fields are public so both sides can build the structs with literals.
#![allow(clippy::pub_underscore_fields)]

/// Stack id stored when no stack could be taken or kept; counted separately. Real ids
/// are hashes of the frames and never take this value.
pub const NO_STACK: u64 = 0;

/// Frames kept per stack: the kernel's default `perf_event_max_stack`.
pub const MAX_STACK_DEPTH: usize = 127;

/// One user call stack, innermost frame first; unused slots are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stack {
    pub ips: [u64; MAX_STACK_DEPTH],
}

impl Default for Stack {
    fn default() -> Self {
        Self { ips: [0; MAX_STACK_DEPTH] }
    }
}

impl Stack {
    /// The frames taken, without the zero fill.
    #[must_use]
    pub fn frames(&self) -> &[u64] {
        let depth = self.ips.iter().position(|&ip| ip == 0).unwrap_or(MAX_STACK_DEPTH);
        &self.ips[..depth]
    }
}

/// The id of a stack: a 64-bit FNV-1a hash of its frames (the same on both sides), so
/// equal stacks share one entry and distinct ones practically never meet (unlike the
/// kernel's stack map, whose bucket index collides once a few hundred stacks exist).
#[inline]
#[must_use]
pub fn stack_hash_step(hash: u64, ip: u64) -> u64 {
    (hash ^ ip).wrapping_mul(0x0000_0100_0000_01b3)
}

/// Seed of [`stack_hash_step`].
pub const STACK_HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// Size recorded at an entry probe whose size is only known once a nested `malloc` runs
/// (`strdup`, `strndup`).
pub const SIZE_FROM_NESTED: u64 = u64::MAX;

pub mod agent;
pub mod port_guard;
pub mod python;
pub mod sampling;
pub mod task_memory;
pub mod unwind;

/// Which allocator entry point a thread is inside; decides how the return probe reads
/// the result.
pub mod kind {
    /// Returns the new block; the size came from the arguments.
    pub const MALLOC: u32 = 1;
    /// `realloc(old, size)`: releases `old` only when it succeeds (or when `size == 0`).
    pub const REALLOC: u32 = 2;
    /// `posix_memalign(memptr, align, size)`: returns 0 and writes the block to `*memptr`.
    pub const POSIX_MEMALIGN: u32 = 3;
}

/// Per-thread state between an allocator's entry and its return. Keyed by thread id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Requested bytes, or [`SIZE_FROM_NESTED`].
    pub size: u64,
    /// `realloc`'s old block.
    pub old_ptr: u64,
    /// `posix_memalign`'s out-pointer.
    pub memptr: u64,
    /// User stack pointer at the outermost entry; a deeper call has a lower one, so an
    /// entry at a higher stack pointer means this state is stale (the return never came).
    pub sp: u64,
    /// One of [`kind`].
    pub kind: u32,
    /// Nested allocator calls under the outermost one (counted once, at the outermost).
    pub depth: u32,
}

/// Key of the live-allocation table: one block of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LiveKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// One unfreed block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveAlloc {
    pub size: u64,
    /// `bpf_ktime_get_ns() / 1_000_000` (the monotonic clock) at allocation.
    pub ts_ms: u64,
    pub stack_id: u64,
    /// Process image generation (bumped on exec) the block belongs to.
    pub gen: u32,
    /// The sampling interval the block was sampled at (its `size` is then the bytes it
    /// stands for); 0 when every block is counted. Per block: the agent's interval may
    /// change while blocks sampled at the old one live on. At most
    /// [`sampling::MAX_RATE`], which fits.
    pub rate: u32,
}

/// Key of the per-stack totals: one call stack of one process image.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TotalsKey {
    pub tgid: u32,
    pub gen: u32,
    pub stack_id: u64,
}

/// Unfreed bytes and blocks of one stack; changed only together with the live table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub bytes: u64,
    pub allocs: u64,
    /// Sum of the live blocks' `ts_ms`: the mean age is `now - ts_ms_sum / allocs`
    /// without walking the live table.
    pub ts_ms_sum: u64,
}

/// A traced process. Present in the map means traced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcState {
    /// Image generation: bumped on exec so blocks of the old image are told apart.
    pub gen: u32,
    /// [`proc_flags`].
    pub flags: u32,
    /// The process it was forked from while it runs its parent's image (the kernel sets
    /// it at the fork and clears it at an exec); 0 otherwise. Its parent's mappings then
    /// name its stacks when it is gone before its own could be read.
    pub parent: u32,
    /// The interval of the agent's latest sample in this process: kept here for the
    /// walk of its stack, whose stack frame has no room left for it (see
    /// `LiveAlloc::rate`).
    pub agent_rate: u32,
}

impl ProcState {
    /// Whether the process behind this entry has exited.
    pub const fn exited(self) -> bool {
        self.flags & proc_flags::EXITED != 0
    }

    /// The state of another process that got an exited process's pid: a generation of
    /// its own, so the dead one's blocks (until they are purged) are never taken for its
    /// own, nor purged with them.
    #[must_use]
    pub const fn reborn(self) -> Self {
        Self { gen: self.gen.wrapping_add(1), flags: 0, parent: 0, agent_rate: 0 }
    }

    /// A process forked from `parent`.
    pub const fn child_of(parent: u32) -> Self {
        Self { gen: 0, flags: 0, parent, agent_rate: 0 }
    }
}

pub mod proc_flags {
    /// A table was full for this process: some of its allocations are not counted.
    pub const INCOMPLETE: u32 = 1;
    /// The process has exited (set by the kernel at its exit). Its entry stays until
    /// userspace purges it; a new process at the same pid starts a new generation.
    pub const EXITED: u32 = 2;
}

/// Index of each failure counter in the per-CPU counter array.
pub mod counter {
    /// The live-allocation table was full; the block is not counted.
    pub const LIVE_FULL: u32 = 0;
    /// The per-stack totals table was full; the block is not counted.
    pub const TOTALS_FULL: u32 = 1;
    /// The stack table was full; the block is counted without a stack.
    pub const STACKS_FULL: u32 = 2;
    /// The kernel could not take a stack for another reason; counted without a stack.
    pub const STACK_ERROR: u32 = 3;
    /// The per-thread entry table was full; that call is not counted.
    pub const INFLIGHT_FULL: u32 = 4;
    /// The process table was full; the process is not traced.
    pub const PROC_FULL: u32 = 5;
    /// The lifecycle ring buffer was full; the event is lost.
    pub const EVENTS_LOST: u32 = 6;
    /// An entry probe found stale state of a call whose return never came.
    pub const INFLIGHT_STALE: u32 = 7;
    /// A new block landed on an address still in the live table (a free was missed).
    pub const LIVE_REPLACED: u32 = 8;
    /// `posix_memalign` succeeded but its out-pointer could not be read.
    pub const READ_ERROR: u32 = 9;
    pub const COUNT: u32 = 10;
}

/// Lifecycle event kinds sent through the ring buffer.
pub mod event {
    /// A traced process forked a traced child.
    pub const FORK: u32 = 1;
    /// A traced process replaced its image; `gen` is the new generation.
    pub const EXEC: u32 = 2;
    /// A traced process exited (its last thread).
    pub const EXIT: u32 = 3;
    /// The OOM killer chose `tgid` (any process, traced or not).
    pub const OOM: u32 = 4;
}

/// A rare event userspace must see (never sent on the allocation path).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LifecycleEvent {
    pub kind: u32,
    pub tgid: u32,
    /// FORK: the child's pid.
    pub child: u32,
    pub gen: u32,
    pub comm: [u8; 16],
}

/// Tracepoint field offsets, read by userspace from tracefs `format` files and passed as
/// globals so the programs do not hard-code one kernel's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointOffsets {
    /// `task:task_newtask` `pid`.
    pub newtask_pid: u32,
    /// `task:task_newtask` `clone_flags`.
    pub newtask_clone_flags: u32,
    /// `sched:sched_process_exit` `group_dead`.
    pub exit_group_dead: u32,
    /// `oom:mark_victim` `pid`.
    pub oom_victim_pid: u32,
}

impl Default for TracepointOffsets {
    fn default() -> Self {
        Self { newtask_pid: 8, newtask_clone_flags: 32, exit_group_dead: 32, oom_victim_pid: 8 }
    }
}

/// `CLONE_THREAD` from the kernel ABI: a new thread, not a new process.
pub const CLONE_THREAD: u64 = 0x0001_0000;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), fixed-width, with explicit padding fields.
    unsafe impl aya::Pod for super::InFlight {}
    unsafe impl aya::Pod for super::LiveKey {}
    unsafe impl aya::Pod for super::LiveAlloc {}
    unsafe impl aya::Pod for super::TotalsKey {}
    unsafe impl aya::Pod for super::Totals {}
    unsafe impl aya::Pod for super::ProcState {}
    unsafe impl aya::Pod for super::LifecycleEvent {}
    unsafe impl aya::Pod for super::TracepointOffsets {}
    unsafe impl aya::Pod for super::Stack {}
    unsafe impl aya::Pod for super::unwind::Row {}
    unsafe impl aya::Pod for super::python::PyLayout {}
    unsafe impl aya::Pod for super::unwind::ProcUnwind {}
    unsafe impl aya::Pod for super::task_memory::TaskLayout {}
    unsafe impl aya::Pod for super::task_memory::TaskMemory {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<InFlight>(), 40);
        assert_eq!(size_of::<LiveKey>(), 16);
        assert_eq!(size_of::<LiveAlloc>(), 32);
        assert_eq!(size_of::<TotalsKey>(), 16);
        assert_eq!(size_of::<Totals>(), 24);
        assert_eq!(size_of::<ProcState>(), 16);
        assert_eq!(size_of::<LifecycleEvent>(), 32);
        assert_eq!(size_of::<TracepointOffsets>(), 16);
        assert_eq!(size_of::<Stack>(), MAX_STACK_DEPTH * 8);
        assert_eq!(size_of::<unwind::Row>(), 12);
        assert_eq!(size_of::<task_memory::TaskLayout>(), 64);
        assert_eq!(size_of::<task_memory::TaskMemory>(), 72);
        assert_eq!(size_of::<unwind::Mapping>(), 32);
        assert_eq!(size_of::<unwind::ProcUnwind>(), 8 + 32 * unwind::MAX_MAPPINGS);
    }

    #[test]
    fn stack_frames_stop_at_the_zero_fill() {
        let mut stack = Stack::default();
        stack.ips[..3].copy_from_slice(&[1, 2, 3]);
        assert_eq!(stack.frames(), &[1, 2, 3]);
        assert_eq!(Stack::default().frames(), &[] as &[u64]);
    }
}

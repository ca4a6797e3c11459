//! Allocator probes: entry uprobes remember the request per thread, the shared return
//! probe records the block, the `free` uprobe releases it.
//!
//! Maps: `INFLIGHT` (per-thread entry state), `PROCS` (is the process traced, its image
//! generation), `LIVE` and `TOTALS` (changed together), `STACKS`, `COUNTERS`.
//! On failure: a full table or a missing stack is counted in `COUNTERS`, a full table
//! also marks the process `INCOMPLETE`; bytes are never counted without a live entry.
//!
//! Nested allocator calls (`realloc(NULL, n)` → `malloc`, `strdup` → `malloc`,
//! `valloc` → `memalign`, the `free` inside a moving `realloc`) are counted once, at the
//! outermost call: its return lands in the caller's code, so the stack taken there
//! starts at the real allocation site.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_USER_STACK, BPF_NOEXIST},
    cty::c_void,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_get_stack, bpf_ktime_get_ns, bpf_loop,
        bpf_probe_read_user,
    },
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use leakmon_common::{
    counter, kind, proc_flags, sampling, stack_hash_step, InFlight, LiveAlloc, LiveKey, ProcState, Stack,
    Totals, TotalsKey, MAX_STACK_DEPTH, NO_STACK, SIZE_FROM_NESTED, STACK_HASH_SEED,
};

use crate::{
    maps::{
        count, forget, sample_bytes, self_tgid, trace_all, INFLIGHT, LIVE, PROCS, SAMPLE_COUNTDOWN, STACKS,
        STACK_SCRATCH, TOTALS,
    },
    python, unwind,
};

const EEXIST: i32 = 17;

/// Declares each allocator program twice: as `uprobe.multi` (one link carries a file's
/// whole set of entry points, kernel 6.6+) and as a plain uprobe attached through perf
/// events, the fallback on older kernels. Userspace loads only the set it attaches.
macro_rules! programs {
    ($($kind:ident $ctx:ident $body:ident => $multi:ident, $perf:ident;)*) => {$(
        #[$kind(multi)]
        pub fn $multi(ctx: $ctx) -> u32 {
            $body(ctx)
        }

        #[$kind]
        pub fn $perf(ctx: $ctx) -> u32 {
            $body(ctx)
        }
    )*};
}

// The names userspace attaches (`leakmon::probes::targets::Handler`): the perf-event
// variant carries a `_perf` suffix.
programs! {
    uprobe ProbeContext on_malloc => alloc_malloc, alloc_malloc_perf;
    uprobe ProbeContext on_calloc => alloc_calloc, alloc_calloc_perf;
    uprobe ProbeContext on_realloc => alloc_realloc, alloc_realloc_perf;
    uprobe ProbeContext on_reallocarray => alloc_reallocarray, alloc_reallocarray_perf;
    uprobe ProbeContext on_memalign => alloc_memalign, alloc_memalign_perf;
    uprobe ProbeContext on_posix_memalign => alloc_posix_memalign, alloc_posix_memalign_perf;
    uprobe ProbeContext on_strdup => alloc_strdup, alloc_strdup_perf;
    uretprobe RetProbeContext on_return => alloc_return, alloc_return_perf;
    uprobe ProbeContext on_free => free_enter, free_enter_perf;
    uprobe ProbeContext on_agent_alloc => agent_alloc, agent_alloc_perf;
}

/// The traced state of `tgid`, creating it in trace-all mode.
#[inline(always)]
fn traced(tgid: u32, create: bool) -> Option<*mut ProcState> {
    if tgid == self_tgid() {
        return None;
    }
    if let Some(state) = PROCS.get_ptr_mut(&tgid) {
        // SAFETY: pointer into the map value.
        if unsafe { (*state).exited() } {
            // The pid came back as another process. It is traced only in trace-all
            // mode (a selected process gets its entry from userspace or its parent),
            // and then in a generation of its own.
            if !create || !trace_all() {
                return None;
            }
            // SAFETY: as above; a new process has one thread until it clones.
            unsafe { *state = (*state).reborn() };
        }
        return Some(state);
    }
    if !create || !trace_all() {
        return None;
    }
    // EEXIST means another thread created it first: fine, look it up again.
    if let Err(err) = PROCS.insert(&tgid, &ProcState::default(), u64::from(BPF_NOEXIST)) {
        if err as i32 != -EEXIST {
            count(counter::PROC_FULL);
            return None;
        }
    }
    PROCS.get_ptr_mut(&tgid)
}

#[inline(always)]
fn user_sp(ctx: &impl aya_ebpf::EbpfContext) -> u64 {
    let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
    // SAFETY: uprobe contexts are the user registers.
    unsafe { (*regs).rsp }
}

/// Remember one allocator call of this thread, or count a nested one.
#[inline(always)]
fn enter(ctx: &ProbeContext, call_kind: u32, size: u64, old_ptr: u64, memptr: u64) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    if traced(tgid, true).is_none() {
        return 0;
    }
    let sp = user_sp(ctx);
    if let Some(outer) = INFLIGHT.get_ptr_mut(&tid) {
        // SAFETY: pointer into this thread's own map value.
        unsafe {
            // A deeper (or tail-called, same-sp) call is nested in the outer one.
            if sp <= (*outer).sp {
                (*outer).depth += 1;
                if (*outer).size == SIZE_FROM_NESTED && call_kind == kind::MALLOC {
                    (*outer).size = size;
                }
                return 0;
            }
        }
        count(counter::INFLIGHT_STALE);
    }
    let state = InFlight { size, old_ptr, memptr, sp, kind: call_kind, depth: 0 };
    if INFLIGHT.insert(&tid, &state, u64::from(BPF_ANY)).is_err() {
        count(counter::INFLIGHT_FULL);
    }
    0
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// `a * b`, or a non-zero size that no allocation can have when it overflows (libc then
/// fails the call, and a failed `realloc` must not look like `realloc(p, 0)`).
#[inline(always)]
fn product(a: u64, b: u64) -> u64 {
    // Not `checked_mul` nor a division test: LLVM turns both into a 128-bit multiply,
    // which the bpf target lacks. Multiply by 32-bit halves instead.
    const OVERFLOW: u64 = u64::MAX - 1;
    let (ah, al, bh, bl) = (a >> 32, a & 0xffff_ffff, b >> 32, b & 0xffff_ffff);
    if ah != 0 && bh != 0 {
        return OVERFLOW;
    }
    let cross = ah * bl + al * bh;
    if cross >> 32 != 0 {
        return OVERFLOW;
    }
    match (cross << 32).overflowing_add(al * bl) {
        (_, true) => OVERFLOW,
        (product, false) => product,
    }
}

/// malloc, valloc, pvalloc, operator new: `(size, ...)`.
#[inline(always)]
fn on_malloc(ctx: ProbeContext) -> u32 {
    enter(&ctx, kind::MALLOC, arg(&ctx, 0), 0, 0)
}

/// calloc: `(nmemb, size)`.
#[inline(always)]
fn on_calloc(ctx: ProbeContext) -> u32 {
    enter(&ctx, kind::MALLOC, product(arg(&ctx, 0), arg(&ctx, 1)), 0, 0)
}

/// realloc: `(ptr, size)`.
#[inline(always)]
fn on_realloc(ctx: ProbeContext) -> u32 {
    enter(&ctx, kind::REALLOC, arg(&ctx, 1), arg(&ctx, 0), 0)
}

/// reallocarray: `(ptr, nmemb, size)`.
#[inline(always)]
fn on_reallocarray(ctx: ProbeContext) -> u32 {
    enter(&ctx, kind::REALLOC, product(arg(&ctx, 1), arg(&ctx, 2)), arg(&ctx, 0), 0)
}

/// aligned_alloc, memalign: `(alignment, size)`.
#[inline(always)]
fn on_memalign(ctx: ProbeContext) -> u32 {
    enter(&ctx, kind::MALLOC, arg(&ctx, 1), 0, 0)
}

/// posix_memalign: `(memptr, alignment, size)`.
#[inline(always)]
fn on_posix_memalign(ctx: ProbeContext) -> u32 {
    enter(&ctx, kind::POSIX_MEMALIGN, arg(&ctx, 2), 0, arg(&ctx, 0))
}

/// strdup, strndup: the size is the nested malloc's.
#[inline(always)]
fn on_strdup(ctx: ProbeContext) -> u32 {
    enter(&ctx, kind::MALLOC, SIZE_FROM_NESTED, 0, 0)
}

/// Shared return probe of every allocation entry point above.
#[inline(always)]
fn on_return(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let Some(outer) = INFLIGHT.get_ptr_mut(&tid) else {
        return 0;
    };
    // SAFETY: pointer into this thread's own map value.
    let call = unsafe {
        if (*outer).depth > 0 {
            (*outer).depth -= 1;
            return 0;
        }
        *outer
    };
    let _ = INFLIGHT.remove(&tid);
    let Some(state) = traced(tgid, false) else {
        return 0;
    };
    let ret: u64 = ctx.ret();
    let size = if call.size == SIZE_FROM_NESTED { 0 } else { call.size };
    match call.kind {
        kind::MALLOC => {
            if ret != 0 {
                record(&ctx, tgid, state, ret, size);
            }
        }
        kind::REALLOC => {
            if ret != 0 {
                if call.old_ptr != 0 {
                    release(tgid, call.old_ptr);
                }
                record(&ctx, tgid, state, ret, size);
            } else if size == 0 && call.old_ptr != 0 {
                // glibc's realloc(p, 0) frees p and returns NULL.
                release(tgid, call.old_ptr);
            }
        }
        kind::POSIX_MEMALIGN => {
            if ret as u32 == 0 {
                // SAFETY: a user pointer; the helper checks it.
                match unsafe { bpf_probe_read_user(call.memptr as *const u64) } {
                    Ok(block) if block != 0 => record(&ctx, tgid, state, block, size),
                    Ok(_) => {}
                    Err(_) => count(counter::READ_ERROR),
                }
            }
        }
        _ => {}
    }
    0
}

/// The in-process agent's marker for a block it sampled: `(block, weight)`, the weight
/// already the bytes the block stands for (the agent took the sampling decision). Its
/// frees come through the `free` program on the agent's other marker.
#[inline(always)]
fn on_agent_alloc(ctx: ProbeContext) -> u32 {
    let block = arg(&ctx, 0);
    if block == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(state) = traced(tgid, true) else {
        return 0;
    };
    // The agent's interval is below 2^32 (see `LiveAlloc::rate`); kept in the process's
    // state across the stack walk, which leaves no stack for it.
    // SAFETY: pointer into the map value.
    unsafe { (*state).agent_rate = arg(&ctx, 2) as u32 };
    // SAFETY: as above.
    store(&ctx, tgid, state, block, arg(&ctx, 1), |_| unsafe { (*state).agent_rate });
    0
}

/// free: `(ptr)`.
#[inline(always)]
fn on_free(ctx: ProbeContext) -> u32 {
    let ptr = arg(&ctx, 0);
    if ptr == 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    if traced(tgid, false).is_none() {
        return 0;
    }
    if let Some(outer) = INFLIGHT.get_ptr(&tid) {
        // SAFETY: pointer into this thread's own map value.
        if user_sp(&ctx) <= unsafe { (*outer).sp } {
            // The free inside a realloc: its return settles the old block.
            return 0;
        }
    }
    release(tgid, ptr);
    0
}

#[inline(always)]
fn mark_incomplete(state: *mut ProcState) {
    // SAFETY: pointer into the map value; a lost race only repeats the same bit.
    unsafe { (*state).flags |= proc_flags::INCOMPLETE };
}

#[inline(always)]
fn totals_of(key: &TotalsKey) -> Option<*mut Totals> {
    if let Some(totals) = TOTALS.get_ptr_mut(key) {
        return Some(totals);
    }
    let _ = TOTALS.insert(key, &Totals::default(), u64::from(BPF_NOEXIST));
    TOTALS.get_ptr_mut(key)
}

/// An atomic add whose result is unused, so it lowers to one BPF atomic instruction.
/// (`AtomicU64::fetch_add` is not available on the bpf target.)
#[inline(always)]
unsafe fn xadd(dst: *mut u64, value: u64) {
    // SAFETY: the caller passes a pointer into a map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, value) };
}

#[inline(always)]
fn add(totals: *mut Totals, bytes: u64, ts_ms: u64) {
    // SAFETY: pointer into a map value; atomics because threads of a process share it.
    unsafe {
        xadd(&raw mut (*totals).bytes, bytes);
        xadd(&raw mut (*totals).allocs, 1);
        xadd(&raw mut (*totals).ts_ms_sum, ts_ms);
    }
}

#[inline(always)]
fn sub(tgid: u32, block: &LiveAlloc) {
    let key = TotalsKey { tgid, gen: block.gen, stack_id: block.stack_id };
    if let Some(totals) = TOTALS.get_ptr_mut(&key) {
        // SAFETY: as in `add`; the wrapping add of a negated value is a subtraction.
        unsafe {
            xadd(&raw mut (*totals).bytes, block.size.wrapping_neg());
            xadd(&raw mut (*totals).allocs, u64::MAX);
            xadd(&raw mut (*totals).ts_ms_sum, block.ts_ms.wrapping_neg());
        }
    }
}

/// The id of the current user stack, stored in `STACKS` on its first use. Walked through
/// the unwind tables where the process has them, else by frame pointers.
#[inline(always)]
fn stack_id<C: EbpfContext>(ctx: &C, tgid: u32) -> u64 {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        count(counter::STACK_ERROR);
        return NO_STACK;
    };
    let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
    let depth = match unwind::walk(tgid, regs, buf) {
        Some(walk) => {
            if walk.stale {
                unwind::mark_stale(tgid);
            }
            walk.depth
        }
        None => {
            // SAFETY: the buffer is this CPU's scratch slot, `size_of::<Stack>()` bytes;
            // the helper zero-fills what the stack does not use.
            let len = unsafe {
                bpf_get_stack(
                    ctx.as_ptr(),
                    buf.cast(),
                    core::mem::size_of::<Stack>() as u32,
                    u64::from(BPF_F_USER_STACK),
                )
            };
            if len > 0 {
                len as usize / 8
            } else {
                0
            }
        }
    };
    if depth == 0 {
        count(counter::STACK_ERROR);
        return NO_STACK;
    }
    // Each depth the native walk can end at is a state of its own for the verifier, and
    // each would be walked through the Python frames and the loop below again, past
    // its instruction limit: forget the value (a round trip through map memory) so
    // they are verified once.
    let depth = python::walk(tgid, buf, forget(depth));
    let depth = forget(depth) as u64;
    // Only the frames are hashed, with the depth: a loop of their own, so the verifier
    // checks one word once whatever the depth (hashing all 127 words branch-free made
    // an exact-mode allocation's return about 5% slower on a deep stack).
    let mut hashing = Hashing { buf, hash: STACK_HASH_SEED ^ depth };
    // SAFETY: `hash_word` has the callback's signature and `hashing` outlives the call.
    unsafe { bpf_loop(depth as u32, hash_word as *mut c_void, (&raw mut hashing).cast(), 0) };
    let mut hash = hashing.hash;
    if hash == NO_STACK {
        hash = 1;
    }
    if STACKS.get_ptr(&hash).is_none() {
        // A new stack: the words past its depth, which earlier walks left in the scratch
        // slot, are zeroed before it is stored (stored stacks end in zeros).
        let mut zeroing = Zeroing { buf, from: depth };
        // SAFETY: as above.
        unsafe {
            bpf_loop(
                (MAX_STACK_DEPTH as u64).saturating_sub(depth) as u32,
                zero_word as *mut c_void,
                (&raw mut zeroing).cast(),
                0,
            )
        };
        // SAFETY: the scratch slot is a valid `Stack`.
        match STACKS.insert(&hash, unsafe { &*buf }, u64::from(BPF_NOEXIST)) {
            Ok(()) => {}
            // Another CPU stored the same stack first.
            Err(err) if err as i32 == -EEXIST => {}
            Err(_) => {
                count(counter::STACKS_FULL);
                return NO_STACK;
            }
        }
    }
    hash
}

/// A stack's frames and their hash so far: `bpf_loop` hands it to [`hash_word`].
#[repr(C)]
struct Hashing {
    buf: *mut Stack,
    hash: u64,
}

/// A stack's words from `from` on, to zero: `bpf_loop` hands it to [`zero_word`].
#[repr(C)]
struct Zeroing {
    buf: *mut Stack,
    from: u64,
}

/// Hashes word `index`: 0 to go on, 1 to stop.
extern "C" fn hash_word(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `stack_id` passes its `Hashing`.
    let h = unsafe { &mut *ctx.cast::<Hashing>() };
    let i = index as usize;
    if i >= MAX_STACK_DEPTH {
        return 1;
    }
    // SAFETY: `i` is below the array length; the buffer is this CPU's scratch slot.
    h.hash = stack_hash_step(h.hash, unsafe { (*h.buf).ips[i] });
    0
}

/// Zeroes word `from + index`: 0 to go on, 1 to stop.
extern "C" fn zero_word(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `stack_id` passes its `Zeroing`.
    let h = unsafe { &mut *ctx.cast::<Zeroing>() };
    let i = h.from.wrapping_add(index) as usize;
    if i >= MAX_STACK_DEPTH {
        return 1;
    }
    // SAFETY: as in `hash_word`.
    unsafe { (*h.buf).ips[i] = 0 };
    0
}

/// In sampling mode, whether a block of `size` bytes is sampled, and the bytes it then
/// stands for; in exact mode, always, at its size. See `leakmon_common::sampling`.
#[inline(always)]
fn charge(size: u64) -> Option<u64> {
    let rate = sample_bytes();
    if rate == 0 {
        return Some(size);
    }
    let left = SAMPLE_COUNTDOWN.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; programs on one CPU do not preempt each other.
    unsafe {
        if *left == 0 {
            *left = sampling::countdown(bpf_get_prandom_u32(), rate);
        }
        if size < *left {
            *left -= size;
            return None;
        }
        *left = sampling::countdown(bpf_get_prandom_u32(), rate);
    }
    Some(sampling::weight(size, rate))
}

/// Count one new block, if sampled (see `charge`).
#[inline(always)]
fn record(ctx: &RetProbeContext, tgid: u32, state: *mut ProcState, addr: u64, size: u64) {
    if let Some(size) = charge(size) {
        // Set by leakmon at load, at most `sampling::MAX_RATE`.
        store(ctx, tgid, state, addr, size, |_| sample_bytes() as u32);
    }
}

/// Count one new block of `size` bytes (sampled at one per `rate`, 0: counted):
/// live entry first, totals only once it exists.
#[inline(always)]
fn store<C: EbpfContext>(
    ctx: &C,
    tgid: u32,
    state: *mut ProcState,
    addr: u64,
    size: u64,
    rate: impl FnOnce(&C) -> u32,
) {
    let stack_id = stack_id(ctx, tgid);
    // SAFETY: pointer into the map value.
    let gen = unsafe { (*state).gen };
    let Some(totals) = totals_of(&TotalsKey { tgid, gen, stack_id }) else {
        count(counter::TOTALS_FULL);
        mark_incomplete(state);
        return;
    };
    let key = LiveKey { tgid, _pad: 0, addr };
    // SAFETY: copied out before the update below can replace it.
    let stale = unsafe { LIVE.get(&key).copied() };
    // SAFETY: a helper with no arguments.
    let ts_ms = unsafe { bpf_ktime_get_ns() } / 1_000_000;
    let block = LiveAlloc { size, ts_ms, stack_id, gen, rate: rate(ctx) };
    if LIVE.insert(&key, &block, u64::from(BPF_ANY)).is_err() {
        count(counter::LIVE_FULL);
        mark_incomplete(state);
        return;
    }
    if let Some(stale) = stale {
        // A free we never saw: that block is gone now, take it out of its totals.
        count(counter::LIVE_REPLACED);
        sub(tgid, &stale);
    }
    add(totals, size, ts_ms);
}

/// Uncount one block, if it is live; only the caller that removes the entry does.
#[inline(always)]
fn release(tgid: u32, addr: u64) {
    let key = LiveKey { tgid, _pad: 0, addr };
    // SAFETY: copied out before removal.
    let Some(block) = (unsafe { LIVE.get(&key).copied() }) else {
        return;
    };
    if LIVE.remove(&key).is_ok() {
        sub(tgid, &block);
    }
}

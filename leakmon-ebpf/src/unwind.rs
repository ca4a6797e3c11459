//! User stacks from DWARF call-frame information, for code without frame pointers.
//!
//! Maps: `UNWIND_ROWS` (every file's rows, filled by userspace), `UNWIND_PROCS` (per
//! process: its executable mappings and their rows), `UNWIND_STALE` (processes whose
//! walk left the mappings with tables), and per CPU `ROW_CACHE` (rows found, by return
//! address) and `FOUND_SCRATCH` (a search's outcome). Called from the return probe,
//! whose registers are the caller's at the instruction after the call, so the walk
//! starts at the allocation site itself. See `leakmon_common::unwind` for the scheme.
//!
//! On failure: a process without tables falls back to the kernel's frame-pointer walk
//! (the caller's job); a frame outside every mapping with tables, or without a rule,
//! ends the stack (the frame itself is kept: the walk up to it was sound), and the
//! former marks the process so userspace refreshes its tables.

use aya_ebpf::{
    bindings::{pt_regs, BPF_F_NO_PREALLOC},
    helpers::bpf_probe_read_user,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use leakmon_common::{
    unwind::{
        cfa, Mapping, ProcUnwind, Row, MAPPING_STEPS, MAX_FRAMES, MAX_MAPPINGS, ROW_CACHE_SLOTS, SEARCH_STEPS,
    },
    Stack,
};

use crate::maps::opaque;

/// Rows of every file with tables, each file's rows contiguous and sorted. An array
/// because lookups by index are inlined by the verifier (a binary search step costs a
/// few instructions); sized by userspace at load (`unwind-rows` in the config).
#[map]
pub static UNWIND_ROWS: Array<Row> = Array::with_max_entries(1, 0);

/// Executable mappings with tables, per traced process. Not preallocated: an entry is
/// 2 KiB and only processes being traced have one.
#[map]
pub static UNWIND_PROCS: HashMap<u32, ProcUnwind> = HashMap::with_max_entries(8192, BPF_F_NO_PREALLOC);

/// Processes whose stack walk reached code outside their mappings with tables (a
/// library loaded since): userspace refreshes their tables and deletes the entry. LRU
/// so a flood of them can never fail the insert.
#[map]
pub static UNWIND_STALE: LruHashMap<u32, u32> = LruHashMap::with_max_entries(1024, 0);

/// A row found for a frame: valid for the same process, return address and entry
/// generation.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CachedRow {
    at: u64,
    tgid: u32,
    gen: u32,
    row: Row,
}

/// Rows found by the searches below, per CPU, direct-mapped by (process, address). Per
/// CPU because programs on one CPU do not preempt each other, so an entry is never
/// read half-written; a slot taken by another frame is a miss, and the searches run.
#[map]
pub static ROW_CACHE: PerCpuArray<CachedRow> = PerCpuArray::with_max_entries(ROW_CACHE_SLOTS, 0);

/// The cache slot of `at` in `tgid`.
#[inline(always)]
fn cache_slot(tgid: u32, at: u64) -> u32 {
    ((at ^ (u64::from(tgid) << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32 & (ROW_CACHE_SLOTS - 1)
}

/// The row covering `at`: cached, else searched for (and cached). `Err(true)` when `at`
/// lies outside every mapping with tables, `Err(false)` when no row covers it.
#[inline(always)]
fn row_at(procs: *const ProcUnwind, tgid: u32, at: u64) -> Result<Row, bool> {
    // SAFETY: a pointer into a map value, kept by the caller.
    let gen = unsafe { (*procs).gen };
    let cached = ROW_CACHE.get_ptr_mut(cache_slot(tgid, at));
    if let Some(c) = cached {
        // SAFETY: this CPU's slot (see ROW_CACHE).
        let c = unsafe { &*c };
        if c.at == at && c.tgid == tgid && c.gen == gen && gen != 0 {
            return Ok(c.row);
        }
    }
    // The search's outcome goes through this CPU's scratch map value: read back, it is a
    // number the verifier knows nothing of, so every exit of the search joins the same
    // state after it (otherwise each exit met every branch after it, past the verifier's
    // limit). Not a `bpf_loop` of its own: on kernels that verify a callback until its
    // states converge, a callback inside the frame walk's callback went past the limit.
    let Some(found) = FOUND_SCRATCH.get_ptr_mut(0) else { return Err(false) };
    // SAFETY: this CPU's slot; programs on one CPU do not preempt each other.
    let found = unsafe { &mut *found };
    // SAFETY: a pointer into a map value, kept by the walk.
    search(unsafe { &*procs }, at, found);
    match found.outcome {
        FOUND => {
            let row = found.row;
            if let Some(c) = cached {
                // SAFETY: as above.
                unsafe { *c = CachedRow { at, tgid, gen, row } };
            }
            Ok(row)
        }
        OUTSIDE => Err(true),
        _ => Err(false),
    }
}

/// What a search found: the row, no mapping with tables, or a mapping without a row.
const FOUND: u32 = 0;
const OUTSIDE: u32 = 1;
const NO_ROW: u32 = 2;

/// A search's outcome, and the row when found.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Found {
    row: Row,
    outcome: u32,
}

/// Where a search leaves its outcome (see `row_at`), per CPU.
#[map]
static FOUND_SCRATCH: PerCpuArray<Found> = PerCpuArray::with_max_entries(1, 0);

/// Searches the row of `at` in `procs`' mappings into `out`.
#[inline(always)]
fn search(procs: &ProcUnwind, at: u64, out: &mut Found) {
    let Some(m) = mapping_of(procs, at) else {
        out.outcome = OUTSIDE;
        return;
    };
    match row_of(m, at.wrapping_sub(m.bias)) {
        Some(row) => {
            out.row = row;
            out.outcome = FOUND;
        }
        None => out.outcome = NO_ROW,
    }
}

/// Marks `tgid` for a refresh of its tables; one lookup once marked.
#[inline(always)]
pub fn mark_stale(tgid: u32) {
    if UNWIND_STALE.get_ptr(&tgid).is_none() {
        let _ = UNWIND_STALE.insert(&tgid, &1, 0);
    }
}

/// The outcome of a walk.
pub struct Walk {
    /// Frames written, innermost first.
    pub depth: usize,
    /// A frame lay outside every mapping with tables.
    pub stale: bool,
}

/// All ones when `a <= b`, else zero, without a branch. Both are below 2^63 (the
/// callers pass 32-bit row addresses and user-space addresses). The sign bit goes
/// through memory because LLVM would otherwise see a comparison and turn the masking
/// into a select, which the bpf target lowers to a branch: each branch in a search
/// doubles the states the verifier walks, past its limit over a whole stack.
#[inline(always)]
fn all_ones_if_le(a: u64, b: u64) -> u64 {
    // The difference goes through memory too: where LLVM knows both operands are below
    // 2^32 (a row's address and a masked one), it sees the sign bit of their difference
    // as a comparison.
    let above = opaque(opaque(b.wrapping_sub(a)) >> 63);
    above.wrapping_sub(1)
}

/// The mapping holding `addr`: a branch-free binary search over the sorted mappings.
#[inline(always)]
fn mapping_of(procs: &ProcUnwind, addr: u64) -> Option<&Mapping> {
    // Indexes are masked, not compared: LLVM folds a comparison into the loop's bounds
    // and the verifier then sees an unbounded index.
    const MASK: usize = MAX_MAPPINGS - 1;
    let count = (procs.count as usize).min(MAX_MAPPINGS);
    if count == 0 {
        return None;
    }
    // The last index whose start is at or below `addr` (0 if none is).
    let (mut base, mut len) = (0usize, count);
    for _ in 0..MAPPING_STEPS {
        let half = len / 2;
        let m = &procs.mappings[(base + half) & MASK];
        base += half & all_ones_if_le(m.start, addr) as usize;
        len -= half;
    }
    let m = &procs.mappings[base & MASK];
    (m.start <= addr && addr < m.end).then_some(m)
}

/// The last row of `m` starting at or before the file address `vaddr`: the same
/// branch-free search over the shared row array.
#[inline(always)]
fn row_of(m: &Mapping, vaddr: u64) -> Option<Row> {
    if m.rows == 0 || vaddr > u64::from(u32::MAX) {
        return None;
    }
    let (mut base, mut len) = (0u32, m.rows);
    for _ in 0..SEARCH_STEPS {
        // As many steps as this file's rows need (a small executable takes 7, libc 15),
        // not all 22. Leaving early keeps the verifier linear: the loop's count and
        // `len` are dead afterwards and `base` only keys a map lookup, so the states
        // after each possible exit are pruned as one.
        if len <= 1 {
            break;
        }
        let half = len / 2;
        let row = UNWIND_ROWS.get(m.first_row.wrapping_add(base + half))?;
        base += half & all_ones_if_le(u64::from(row.pc), vaddr) as u32;
        len -= half;
    }
    let row = *UNWIND_ROWS.get(m.first_row.wrapping_add(base))?;
    (u64::from(row.pc) <= vaddr).then_some(row)
}

/// Walks the user stack of `tgid` from `regs` into `out`; `None` when the process has
/// no tables. Slots past `depth` keep whatever they held. A plain loop the verifier
/// unrolls: as a `bpf_loop` callback (with the stack copied into a per-CPU window, and
/// the searches in a callback of their own) it went past the verifier's million
/// instructions on kernel 6.18.44, which verifies a callback until its states converge
/// and multiplied the nested one; each frame's search joins one state through
/// `FOUND_SCRATCH` instead.
#[inline(always)]
pub fn walk(tgid: u32, regs: *const pt_regs, out: *mut Stack) -> Option<Walk> {
    let procs = UNWIND_PROCS.get_ptr(&tgid)?;
    // SAFETY: uprobe contexts are the user registers; `procs` points into a map value.
    let (procs, mut ip, mut sp, mut bp) = unsafe { (&*procs, (*regs).rip, (*regs).rsp, (*regs).rbp) };
    let mut walk = Walk { depth: 0, stale: false };
    for i in 0..MAX_FRAMES {
        if ip == 0 {
            break;
        }
        // SAFETY: `i` is below `MAX_FRAMES`, which is below the array length.
        unsafe { (*out).ips[i] = ip };
        walk.depth = i + 1;
        // Every frame is a return address: its call instruction is the byte before.
        let at = ip - 1;
        let row = match row_at(procs, tgid, at) {
            Ok(row) => row,
            Err(outside) => {
                walk.stale = outside;
                break;
            }
        };
        let frame = match row.cfa {
            cfa::RSP => sp.wrapping_add(row.cfa_offset as i64 as u64),
            cfa::RBP => bp.wrapping_add(row.cfa_offset as i64 as u64),
            _ => break,
        };
        // SAFETY: user addresses; the helper checks them.
        let Ok(ret) = (unsafe { bpf_probe_read_user((frame - 8) as *const u64) }) else { break };
        if row.rbp_offset != 0 {
            let saved = frame.wrapping_add(row.rbp_offset as i64 as u64);
            // SAFETY: as above.
            let Ok(saved) = (unsafe { bpf_probe_read_user(saved as *const u64) }) else { break };
            bp = saved;
        }
        // A caller's frame is above its callee's: anything else is a bad rule.
        if frame <= sp {
            break;
        }
        sp = frame;
        ip = ret;
    }
    Some(walk)
}

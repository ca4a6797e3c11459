//! User stacks from DWARF call-frame information, for code without frame pointers.
//!
//! Maps: `UNWIND_ROWS` (every file's rows, filled by userspace), `UNWIND_PROCS` (per
//! process: its executable mappings and their rows), `UNWIND_STALE` (processes whose
//! walk left the mappings with tables), and per CPU `ROW_CACHE` (rows found, by return
//! address) and `STACK_WINDOW` (the top of the stack being walked, copied at once). Called from the return probe, whose registers
//! are the caller's at the instruction after the call, so the walk starts at the
//! allocation site itself. See `leakmon_common::unwind` for the scheme.
//!
//! On failure: a process without tables falls back to the kernel's frame-pointer walk
//! (the caller's job); a frame outside every mapping with tables, or without a rule,
//! ends the stack (the frame itself is kept: the walk up to it was sound), and the
//! former marks the process so userspace refreshes its tables.

use aya_ebpf::{
    bindings::{pt_regs, BPF_F_NO_PREALLOC},
    cty::c_void,
    helpers::{bpf_loop, bpf_probe_read_user},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use leakmon_common::{
    unwind::{
        cfa, Mapping, ProcUnwind, Row, MAPPING_STEPS, MAX_FRAMES, MAX_MAPPINGS, ROW_CACHE_SLOTS, SEARCH_STEPS,
    },
    Stack,
};

use crate::maps::{forget, opaque};

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
    // The searches in a loop of their own: the verifier then checks them once, apart from
    // what the walk does with their outcome (together, each exit of a search met every
    // branch after it, past the verifier's limit).
    let mut search = Search {
        procs,
        at,
        row: Row { pc: 0, cfa_offset: 0, rbp_offset: 0, cfa: cfa::END, _pad: 0 },
        outcome: OUTSIDE,
    };
    // SAFETY: `search_row` has the callback's signature and `search` outlives the call.
    unsafe {
        bpf_loop(1, search_row as *mut c_void, (&raw mut search).cast(), 0);
    }
    match search.outcome {
        FOUND => {
            if let Some(c) = cached {
                // SAFETY: as above.
                unsafe { *c = CachedRow { at, tgid, gen, row: search.row } };
            }
            Ok(search.row)
        }
        OUTSIDE => Err(true),
        _ => Err(false),
    }
}

/// What a search found: the row, no mapping with tables, or a mapping without a row.
const FOUND: u32 = 0;
const OUTSIDE: u32 = 1;
const NO_ROW: u32 = 2;

/// A search for the row of `at`: `bpf_loop` hands it to [`search_row`].
#[repr(C)]
struct Search {
    procs: *const ProcUnwind,
    at: u64,
    row: Row,
    outcome: u32,
}

/// The one turn of the search's loop: always 1 (stop).
extern "C" fn search_row(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `row_at` passes its `Search`.
    let s = unsafe { &mut *ctx.cast::<Search>() };
    // SAFETY: a pointer into a map value, kept by the walk.
    let procs = unsafe { &*s.procs };
    let Some(m) = mapping_of(procs, s.at) else {
        s.outcome = OUTSIDE;
        return 1;
    };
    match row_of(m, s.at.wrapping_sub(m.bias)) {
        Some(row) => {
            s.row = row;
            s.outcome = FOUND;
        }
        None => s.outcome = NO_ROW,
    }
    1
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
/// no tables. Slots past `depth` keep whatever they held. Frame by frame through
/// `bpf_loop`, so the verifier checks one frame (its cache lookup and searches) once, not
/// every frame of every path.
#[inline(always)]
pub fn walk(tgid: u32, regs: *const pt_regs, out: *mut Stack) -> Option<Walk> {
    let procs = UNWIND_PROCS.get_ptr(&tgid)?;
    // SAFETY: uprobe contexts are the user registers.
    let (ip, sp, bp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    let (window, window_len) = read_window(sp);
    let mut w = Unwinding { procs, out, window, window_len, ip, sp, bp, base: sp, depth: 0, tgid, stale: 0 };
    // SAFETY: `frame` has the callback's signature and `w` outlives the call.
    unsafe {
        bpf_loop(MAX_FRAMES as u32, frame as *mut c_void, (&raw mut w).cast(), 0);
    }
    Some(Walk { depth: w.depth as usize, stale: w.stale != 0 })
}

/// Words of the stack read at once from the first frame up (8 KiB): the return
/// addresses and saved registers of the frames within are read from this copy, not
/// each with a helper call of its own (those calls were most of a frame's cost once its
/// row is cached).
const WINDOW_WORDS: usize = 1024;
const PAGE: u64 = 4096;

/// This CPU's copy of the top of the stack being walked.
#[map]
static STACK_WINDOW: PerCpuArray<[u64; WINDOW_WORDS]> = PerCpuArray::with_max_entries(1, 0);

/// Copies the stack from `sp` to the end of its page and the page after it (where that
/// is mapped: the end of the stack may be nearer) into [`STACK_WINDOW`]; the copy and
/// the bytes it holds (0: none, every read then goes to the process).
#[inline(always)]
fn read_window(sp: u64) -> (*mut u64, u64) {
    let Some(window) = STACK_WINDOW.get_ptr_mut(0) else { return (core::ptr::null_mut(), 0) };
    let window = window.cast::<u8>();
    // The rest of the first page: 8 to 4096 bytes (sp is 8-aligned in every probe).
    let first = PAGE - (sp & (PAGE - 1));
    // SAFETY: `first` is at most a page, within the window; a user address, the helper
    // checks it.
    if unsafe { bpf_probe_read_user_buf(window, first as u32, sp as *const u8) } != 0 {
        return (window.cast(), 0);
    }
    let offset = opaque(first) & (PAGE - 1 | PAGE);
    if offset > PAGE {
        return (window.cast(), first);
    }
    // SAFETY: `offset` is at most a page, so a page from it stays within the window.
    let second = unsafe {
        bpf_probe_read_user_buf(window.add(offset as usize), PAGE as u32, (sp + offset) as *const u8)
    };
    (window.cast(), if second == 0 { offset + PAGE } else { offset })
}

/// `bpf_probe_read_user` into bytes: 0 on success.
#[inline(always)]
unsafe fn bpf_probe_read_user_buf(dst: *mut u8, len: u32, src: *const u8) -> i64 {
    // SAFETY: the caller's.
    unsafe { aya_ebpf::helpers::generated::bpf_probe_read_user(dst.cast(), len, src.cast()) }
}

/// The word of the process at `addr`: from the window where it holds it.
#[inline(always)]
fn stack_word(w: &Unwinding, addr: u64) -> Option<u64> {
    let offset = addr.wrapping_sub(w.base);
    if offset < w.window_len && offset % 8 == 0 && !w.window.is_null() {
        let index = opaque(offset / 8) & (WINDOW_WORDS as u64 - 1);
        // SAFETY: the index is masked within the window.
        return Some(unsafe { *w.window.add(index as usize) });
    }
    // SAFETY: a user address; the helper checks it.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// What one frame of the walk reads and writes: `bpf_loop` hands it to [`frame`].
#[repr(C)]
struct Unwinding {
    procs: *const ProcUnwind,
    out: *mut Stack,
    /// [`STACK_WINDOW`], holding `window_len` bytes of the stack from `base`.
    window: *mut u64,
    window_len: u64,
    ip: u64,
    sp: u64,
    bp: u64,
    base: u64,
    depth: u64,
    tgid: u32,
    stale: u32,
}

/// One frame: 0 to go on, 1 to stop.
extern "C" fn frame(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `walk` passes its `Unwinding`.
    let w = unsafe { &mut *ctx.cast::<Unwinding>() };
    let procs = w.procs;
    // The depth forgotten: known, each frame's would be a state of its own for the
    // verifier, which then checks the frame once per depth, past its limit.
    let (ip, sp, bp, depth) = (w.ip, w.sp, w.bp, forget(w.depth as usize));
    if ip == 0 || depth >= MAX_FRAMES {
        return 1;
    }
    // SAFETY: `depth` is below `MAX_FRAMES`, which is below the array length.
    unsafe { (*w.out).ips[depth] = ip };
    w.depth = depth as u64 + 1;
    // Every frame is a return address: its call instruction is the byte before.
    let at = ip - 1;
    let row = match row_at(procs, w.tgid, at) {
        Ok(row) => row,
        Err(outside) => {
            w.stale = u32::from(outside);
            return 1;
        }
    };
    let cfa = match row.cfa {
        cfa::RSP => sp.wrapping_add(row.cfa_offset as i64 as u64),
        cfa::RBP => bp.wrapping_add(row.cfa_offset as i64 as u64),
        _ => return 1,
    };
    let Some(ret) = stack_word(w, cfa - 8) else { return 1 };
    if row.rbp_offset != 0 {
        let Some(saved) = stack_word(w, cfa.wrapping_add(row.rbp_offset as i64 as u64)) else { return 1 };
        w.bp = saved;
    }
    // A caller's frame is above its callee's: anything else is a bad rule.
    if cfa <= sp {
        return 1;
    }
    w.sp = cfa;
    w.ip = ret;
    0
}

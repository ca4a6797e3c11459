//! CPython frames, appended to a stack after its native frames (see
//! `leakmon_common::python` for the scheme and the encoding).
//!
//! Maps: `PY_PROCS` (the layout of each traced CPython process, filled by userspace),
//! `PY_THREADS` (the thread state last found for a thread).
//! On failure: an unreadable pointer ends the Python frames where it is; a process
//! without a layout, or a thread without a thread state (one the interpreter does not
//! know), gets native frames only. Userspace checks every code object before it names
//! a frame, so a wrong layout costs frames, never invents them.

use aya_ebpf::{
    bindings::bpf_pidns_info,
    cty::c_void,
    helpers::{bpf_get_current_pid_tgid, bpf_get_ns_current_pid_tgid, bpf_loop, bpf_probe_read_user},
    macros::map,
    maps::{HashMap, LruHashMap},
};
use leakmon_common::{
    python::{encode, PyLayout, ENTRY, MAX_FRAMES, MAX_THREADS, NONE, OWNED_BY_CSTACK},
    Stack, MAX_STACK_DEPTH,
};

use crate::maps::opaque;

/// The layout of each CPython process leakmon traces.
#[map]
pub static PY_PROCS: HashMap<u32, PyLayout> = HashMap::with_max_entries(4096, 0);

/// Thread id → the address of its `PyThreadState`, checked again at each use (its
/// `native_thread_id` must still be the thread's id). LRU: threads come and go.
#[map]
pub static PY_THREADS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn read<T: Copy>(addr: u64) -> Option<T> {
    // SAFETY: a user address; the helper checks it.
    unsafe { bpf_probe_read_user(addr as *const T).ok() }
}

#[inline(always)]
fn field(base: u64, offset: u32) -> u64 {
    base.wrapping_add(u64::from(offset))
}

/// The current thread's `PyThreadState`: the cached one, else found in the main
/// interpreter's list of threads (newest first), through `bpf_loop`.
#[inline(always)]
fn thread_state(layout: &PyLayout, tid: u32, own: u32) -> Option<u64> {
    let native = layout.tstate_native_thread_id;
    // SAFETY: a copy out of this map's value.
    if let Some(&cached) = unsafe { PY_THREADS.get(&tid) } {
        if read::<u64>(field(cached, native)) == Some(u64::from(own)) {
            return Some(cached);
        }
    }
    let interp: u64 = read(layout.interpreters_head)?;
    let first: u64 = read(field(interp, layout.interp_threads_head))?;
    let mut search = Search { layout, tstate: first, tid: u64::from(own), found: 0 };
    // SAFETY: `find_thread` has the callback's signature and `search` outlives the call.
    unsafe {
        bpf_loop(MAX_THREADS as u32, find_thread as *mut c_void, (&raw mut search).cast(), 0);
    }
    if search.found == 0 {
        return None;
    }
    let _ = PY_THREADS.insert(&tid, &search.found, 0);
    Some(search.found)
}

/// The state of the search for a thread: `bpf_loop` hands it to [`find_thread`].
#[repr(C)]
struct Search {
    layout: *const PyLayout,
    tstate: u64,
    tid: u64,
    found: u64,
}

/// One thread of the list: 0 to go on, 1 to stop.
extern "C" fn find_thread(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `thread_state` passes its `Search`.
    let s = unsafe { &mut *ctx.cast::<Search>() };
    // SAFETY: pointer into a map value, kept by `walk`.
    let layout = unsafe { &*s.layout };
    if s.tstate == 0 {
        return 1;
    }
    if read::<u64>(field(s.tstate, layout.tstate_native_thread_id)) == Some(s.tid) {
        s.found = s.tstate;
        return 1;
    }
    match read::<u64>(field(s.tstate, layout.tstate_next)) {
        Some(next) => {
            s.tstate = next;
            0
        }
        None => 1,
    }
}

/// What one step of the walk reads and writes: `bpf_loop` hands it to [`step`].
#[repr(C)]
struct Walk {
    out: *mut Stack,
    layout: *const PyLayout,
    frame: u64,
    depth: u64,
    /// The slot of the last Python frame written (a C-stack frame makes it an entry),
    /// or `MAX_STACK_DEPTH`.
    last: u64,
}

/// Appends the current thread's Python frames to `out` after its first `depth` words,
/// innermost first; returns the new depth. Through `bpf_loop`, so the verifier checks
/// one step, not every frame of every path.
#[inline(always)]
pub fn walk(tgid: u32, out: *mut Stack, depth: usize) -> usize {
    let Some(layout) = PY_PROCS.get_ptr(&tgid) else { return depth };
    // SAFETY: pointer into a map value.
    let l = unsafe { &*layout };
    let tid = bpf_get_current_pid_tgid() as u32;
    // CPython keeps the thread's id as its pid namespace numbers it.
    let own = if l.pidns_ino == 0 {
        tid
    } else {
        let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
        // SAFETY: `ns` is the size given.
        let failed = unsafe {
            bpf_get_ns_current_pid_tgid(
                l.pidns_dev,
                l.pidns_ino,
                &raw mut ns,
                core::mem::size_of::<bpf_pidns_info>() as u32,
            )
        };
        if failed != 0 {
            return depth;
        }
        ns.pid
    };
    let Some(tstate) = thread_state(l, tid, own) else { return depth };
    let Some(mut frame) = read::<u64>(field(tstate, l.tstate_frame)) else { return depth };
    if l.cframe_current_frame != NONE {
        let Some(current) = read::<u64>(field(frame, l.cframe_current_frame)) else { return depth };
        frame = current;
    }
    let mut walk = Walk { out, layout, frame, depth: depth as u64, last: MAX_STACK_DEPTH as u64 };
    // SAFETY: `step` has the callback's signature and `walk` outlives the call.
    unsafe {
        bpf_loop(MAX_FRAMES as u32, step as *mut c_void, (&raw mut walk).cast(), 0);
    }
    walk.depth as usize
}

/// Bytes of a frame read at once: the fields the walk needs lie in the first 72 of
/// 3.11 to 3.13's `_PyInterpreterFrame`. A power of two of words, so a field's word is
/// found by masking.
const HEAD_WORDS: usize = 16;

/// The frame's first [`HEAD_WORDS`] words, read at once (one helper call instead of one
/// per field: the reads were most of the Python walk's cost); `None` when that reaches
/// past what is mapped (a frame at the end of its chunk), and fields are then read one
/// by one.
#[inline(always)]
fn head(frame: u64) -> Option<[u64; HEAD_WORDS]> {
    read::<[u64; HEAD_WORDS]>(frame)
}

/// The index of the head's word holding `offset`, masked where the verifier sees it
/// (LLVM drops a mask it can prove idle, and the verifier then sees an unbounded index).
#[inline(always)]
fn index(offset: u32) -> usize {
    opaque(u64::from(offset / 8)) as usize & (HEAD_WORDS - 1)
}

/// The word at `offset` of the frame, from its head where the head holds it.
#[inline(always)]
fn word(head: &Option<[u64; HEAD_WORDS]>, frame: u64, offset: u32) -> Option<u64> {
    match head {
        Some(words) if offset % 8 == 0 && (offset as usize) < HEAD_WORDS * 8 => Some(words[index(offset)]),
        _ => read::<u64>(field(frame, offset)),
    }
}

/// The byte at `offset` of the frame, as [`word`].
#[inline(always)]
fn byte(head: &Option<[u64; HEAD_WORDS]>, frame: u64, offset: u32) -> Option<u8> {
    match head {
        Some(words) if (offset as usize) < HEAD_WORDS * 8 => {
            Some((words[index(offset)] >> ((offset % 8) * 8)) as u8)
        }
        _ => read::<u8>(field(frame, offset)),
    }
}

/// One frame: 0 to go on, 1 to stop.
extern "C" fn step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `walk` passes its `Walk`.
    let w = unsafe { &mut *ctx.cast::<Walk>() };
    // SAFETY: pointer into a map value, kept by `walk`.
    let layout = unsafe { &*w.layout };
    let (frame, depth) = (w.frame, w.depth as usize);
    if frame == 0 || depth >= MAX_STACK_DEPTH {
        return 1;
    }
    let head = head(frame);
    let Some(previous) = word(&head, frame, layout.frame_previous) else { return 1 };
    let Some(owner) = byte(&head, frame, layout.frame_owner) else { return 1 };
    w.frame = previous;
    if owner == OWNED_BY_CSTACK {
        let last = w.last as usize;
        if last < MAX_STACK_DEPTH {
            // SAFETY: `last` is below the array length.
            unsafe { (*w.out).ips[last] |= ENTRY };
        }
        return 0;
    }
    let Some(code) = word(&head, frame, layout.frame_code) else { return 1 };
    let Some(instr) = word(&head, frame, layout.frame_instr) else { return 1 };
    let start = field(code, layout.code_instructions);
    let lasti = if instr > start { (instr - start) / 2 } else { 0 };
    let entry =
        layout.frame_is_entry != NONE && byte(&head, frame, layout.frame_is_entry).is_some_and(|e| e != 0);
    // SAFETY: `depth` is below the array length (checked above).
    unsafe { (*w.out).ips[depth] = encode(code, lasti, entry) };
    w.last = depth as u64;
    w.depth = depth as u64 + 1;
    0
}

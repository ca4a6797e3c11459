//! CPython frames in user stacks.
//!
//! CPython 3.11 and later run Python-to-Python calls inside one C call of the
//! evaluation loop (`_PyEval_EvalFrameDefault`), so native frames say nothing of the
//! Python code. At each stack it takes of a process with a [`PyLayout`], the kernel
//! follows the current thread's chain of interpreter frames and appends one encoded
//! word per frame ([`encode`]) after the native frames: the code object's address, the
//! instruction offset in it, and whether the frame is the first one its C evaluation
//! call ran (its "entry"). Userspace reads the code objects (name, file, line table)
//! and puts each native evaluation frame's run of Python frames in its place.
//!
//! Userspace fills the layout per process: from `_Py_DebugOffsets` at the start of
//! `_PyRuntime` for 3.13, from tables per version for 3.11 and 3.12.

/// Python frames walked per stack; deeper ones are cut.
pub const MAX_FRAMES: usize = 48;

/// Threads of the main interpreter looked at to find the current one (newest first);
/// once found, a thread's state is cached.
pub const MAX_THREADS: usize = 4096;

/// A stack word that is a Python frame, not a return address (user addresses are below
/// 2^47, so native words never have it).
pub const FRAME_TAG: u64 = 1 << 63;

/// The frame is the first its C evaluation call ran: the native evaluation frame it
/// belongs to holds no older Python frame.
pub const ENTRY: u64 = 1 << 62;

/// Bits of the instruction offset (in 2-byte code units).
pub const LASTI_BITS: u32 = 18;

const LASTI_MASK: u64 = (1 << LASTI_BITS) - 1;
const CODE_MASK: u64 = (1 << 44) - 1;

/// The stack word of one Python frame. Code objects are 8-byte aligned user addresses,
/// so 44 bits hold them; an offset past 2^18 code units is kept at the largest.
#[inline(always)]
#[must_use]
pub fn encode(code: u64, lasti: u64, entry: bool) -> u64 {
    let lasti = if lasti > LASTI_MASK { LASTI_MASK } else { lasti };
    FRAME_TAG | if entry { ENTRY } else { 0 } | ((code >> 3) & CODE_MASK) << LASTI_BITS | lasti
}

/// One decoded Python frame word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub code: u64,
    /// Offset of the current instruction, in code units.
    pub lasti: u32,
    pub entry: bool,
}

/// The frame a stack word holds, if it is a Python one.
#[inline]
#[must_use]
pub fn decode(word: u64) -> Option<Frame> {
    if word & FRAME_TAG == 0 {
        return None;
    }
    Some(Frame {
        code: ((word >> LASTI_BITS) & CODE_MASK) << 3,
        lasti: (word & LASTI_MASK) as u32,
        entry: word & ENTRY != 0,
    })
}

/// How [`PyLayout::frame_owner`] marks a frame that only stands for a C call into
/// the evaluation loop (3.12 and later): the Python frame before it is an entry.
pub const OWNED_BY_CSTACK: u8 = 3;

/// No such field in this version.
pub const NONE: u32 = u32::MAX;

/// Where one interpreter keeps what the walk reads: offsets in bytes, [`NONE`] when
/// the version has no such field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyLayout {
    /// Runtime address of `_PyRuntime.interpreters.head` (a pointer to the main
    /// interpreter's state).
    pub interpreters_head: u64,
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    pub tstate_native_thread_id: u32,
    /// 3.11, 3.12: the thread's `cframe` (whose `current_frame` is read next);
    /// 3.13: its `current_frame`.
    pub tstate_frame: u32,
    /// `_PyCFrame.current_frame`, or [`NONE`] in 3.13.
    pub cframe_current_frame: u32,
    pub frame_previous: u32,
    /// `f_code` (3.11, 3.12) or `f_executable` (3.13).
    pub frame_code: u32,
    /// `prev_instr` (3.11, 3.12) or `instr_ptr` (3.13).
    pub frame_instr: u32,
    pub frame_owner: u32,
    /// `is_entry` (3.11), or [`NONE`].
    pub frame_is_entry: u32,
    /// `co_code_adaptive`: where the instructions start in the code object.
    pub code_instructions: u32,
    pub _pad: u32,
    /// The process's pid namespace (device and inode of its `/proc/PID/ns/pid`) where
    /// it is not leakmon's (a container's), else 0: CPython keeps each thread's id as
    /// its own namespace numbers it, which the kernel side asks for then.
    pub pidns_dev: u64,
    pub pidns_ino: u64,
}

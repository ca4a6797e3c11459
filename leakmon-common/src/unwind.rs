//! Unwind tables the kernel walks to take user stacks of code built without frame
//! pointers (most of a Debian host).
//!
//! Userspace turns each executable file's `.eh_frame` (DWARF call-frame information)
//! into [`Row`]s sorted by address, one per change of the rule, and stores them once
//! per file in a shared array; each traced process gets a [`ProcUnwind`] naming the
//! mappings its code lies in and the slice of rows of each. At an allocation the
//! kernel starts from the registers at the return into the caller and, frame by
//! frame, finds the row covering the address, computes the canonical frame address
//! (CFA), reads the return address at CFA - 8 and, where the row says so, the caller's
//! RBP. x86-64 only: the return address is always at CFA - 8.

/// Executable mappings with tables per process: a Debian process maps a few dozen
/// libraries at most; a process with more keeps tables for the first ones. A power of
/// two: the kernel masks indexes with it.
pub const MAX_MAPPINGS: usize = 64;

/// Steps of the binary search over a process's mappings: enough for [`MAX_MAPPINGS`].
pub const MAPPING_STEPS: usize = 7;

/// Frames walked through the tables; the rest of a deeper stack is cut. Bounded by the
/// verifier: each frame's two binary searches are a few hundred branches for it.
pub const MAX_FRAMES: usize = 32;

/// Steps of the binary search over one file's rows: enough for 2^22 rows.
pub const SEARCH_STEPS: usize = 22;

/// Rows found for (process, return address), cached per CPU: a hot allocation site's
/// stack is walked again and again, and its two binary searches per frame were most of
/// a sample's cost in the kernel (about 2 of 3 µs for a CPython allocation's 20
/// frames). A power of two: the kernel masks slot numbers with it.
pub const ROW_CACHE_SLOTS: u32 = 4096;

/// How a row finds the CFA.
pub mod cfa {
    /// No information here (a gap between functions, or an outermost frame such as
    /// `_start` whose return address is undefined): the stack ends.
    pub const END: u8 = 0;
    /// CFA = RSP + offset.
    pub const RSP: u8 = 1;
    /// CFA = RBP + offset.
    pub const RBP: u8 = 2;
}

/// One rule, valid from `pc` to the next row's `pc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Row {
    /// Start address, as the file's virtual addresses (`.eh_frame` ones).
    pub pc: u32,
    pub cfa_offset: i32,
    /// Where the caller's RBP was saved, relative to the CFA; 0: RBP still holds it.
    pub rbp_offset: i16,
    /// One of [`cfa`].
    pub cfa: u8,
    pub _pad: u8,
}

/// One executable mapping of a process and the rows that cover it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Runtime address minus file virtual address.
    pub bias: u64,
    /// Index of the first row in the shared row array.
    pub first_row: u32,
    pub rows: u32,
}

/// The mappings of one process, sorted by start (the walk binary-searches them); the
/// first `count` are valid.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcUnwind {
    pub count: u32,
    /// Changed by userspace at every write of the entry, never 0: the rows the kernel
    /// cached for the process (see [`ROW_CACHE_SLOTS`]) hold only for the entry they
    /// were found in.
    pub gen: u32,
    pub mappings: [Mapping; MAX_MAPPINGS],
}

impl Default for ProcUnwind {
    fn default() -> Self {
        Self { count: 0, gen: 0, mappings: [Mapping::default(); MAX_MAPPINGS] }
    }
}

//! Unwind tables for the kernel's stack walk: each executable file's `.eh_frame` as
//! sorted rows, and each process's executable mappings pointing at them.
//!
//! In: an ELF file (any executable or library a traced process maps). Out: the
//! [`Row`]s the kernel binary-searches (one per change of the CFA rule or of where RBP
//! is saved, merged where unchanged), plus the file's loadable segments so a mapping's
//! runtime addresses can be turned into the file's own. Pure: [`Probes`] stores them.
//!
//! [`Probes`]: super::Probes

use std::path::Path;

use gimli::{
    CfaRule, CieOrFde, EhFrame, LittleEndian, RegisterRule, UnwindContext, UnwindSection as _, X86_64,
};
use leakmon_common::unwind::{cfa, Row, SEARCH_STEPS};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// Rows one file may have: the kernel's binary search takes [`SEARCH_STEPS`] steps.
pub const MAX_FILE_ROWS: usize = (1 << SEARCH_STEPS) - 1;

/// Why a file has no tables.
#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("read {path}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: not an ELF file")]
    NotElf { path: String },
    #[error("{path}: no .eh_frame section")]
    NoEhFrame { path: String },
    #[error("{path}: malformed .eh_frame: {message}")]
    Malformed { path: String, message: String },
    #[error("{path}: {rows} unwind rows, more than the {max} one file may have")]
    TooManyRows { path: String, rows: usize, max: usize },
}

/// An executable loadable segment: where file offsets land in the file's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub vaddr: u64,
    pub size: u64,
}

/// One file's tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileTable {
    pub rows: Vec<Row>,
    pub segments: Vec<Segment>,
}

impl FileTable {
    /// Runtime address minus file address for a mapping of this file that starts at
    /// `start` with file offset `offset`; `None` when no segment holds that offset.
    pub fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        let seg = self.segments.iter().find(|s| s.offset & !0xfff <= offset && offset < s.offset + s.size)?;
        Some(start.wrapping_sub(offset.wrapping_sub(seg.offset).wrapping_add(seg.vaddr)))
    }
}

/// Reads `path` and builds its tables.
pub fn file_table(path: &Path) -> Result<FileTable, UnwindError> {
    let shown = || path.display().to_string();
    // Read, not mapped: the file is its owner's to truncate (see `read_binary`).
    let data =
        crate::untrusted::read_binary(path).map_err(|source| UnwindError::Read { path: shown(), source })?;
    table_of(&data).map_err(|e| e.with_path(&shown()))
}

/// Builds the tables of an ELF image in memory (errors carry an empty path).
pub fn table_of(data: &[u8]) -> Result<FileTable, UnwindError> {
    let elf = object::File::parse(data).map_err(|_| UnwindError::NotElf { path: String::new() })?;
    // Executable segments only: the page a mapping starts at may also hold the end of
    // the read-only segment before, whose address-to-offset shift can differ.
    let segments = elf
        .segments()
        .filter(|s| matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0))
        .map(|s| {
            let (offset, size) = s.file_range();
            Segment { offset, vaddr: s.address(), size }
        })
        .collect();
    let section = elf.section_by_name(".eh_frame").ok_or(UnwindError::NoEhFrame { path: String::new() })?;
    let bytes = section.data().map_err(|e| malformed(&e))?;
    let mut bases = gimli::BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = elf.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = elf.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    let rows = rows_of(&EhFrame::new(bytes, LittleEndian), &bases)?;
    if rows.len() > MAX_FILE_ROWS {
        return Err(UnwindError::TooManyRows { path: String::new(), rows: rows.len(), max: MAX_FILE_ROWS });
    }
    Ok(FileTable { rows, segments })
}

fn malformed(e: &dyn std::fmt::Display) -> UnwindError {
    UnwindError::Malformed { path: String::new(), message: e.to_string() }
}

impl UnwindError {
    fn with_path(self, path: &str) -> Self {
        let path = path.to_owned();
        match self {
            Self::NotElf { .. } => Self::NotElf { path },
            Self::NoEhFrame { .. } => Self::NoEhFrame { path },
            Self::Malformed { message, .. } => Self::Malformed { path, message },
            Self::TooManyRows { rows, max, .. } => Self::TooManyRows { path, rows, max },
            read @ Self::Read { .. } => read,
        }
    }
}

const END: Row = Row { pc: 0, cfa_offset: 0, rbp_offset: 0, cfa: cfa::END, _pad: 0 };

/// Every FDE's rows, plus an end row where a function ends and no other begins (so an
/// address between functions finds no rule rather than the previous function's).
fn rows_of(
    eh: &EhFrame<gimli::EndianSlice<'_, LittleEndian>>,
    bases: &gimli::BaseAddresses,
) -> Result<Vec<Row>, UnwindError> {
    let mut rows = Vec::new();
    let mut ctx = UnwindContext::new();
    let mut entries = eh.entries(bases);
    while let Some(entry) = entries.next().map_err(|e| malformed(&e))? {
        let CieOrFde::Fde(partial) = entry else { continue };
        // One bad FDE costs its function's frames, not the file's.
        let Ok(fde) = partial.parse(EhFrame::cie_from_offset) else { continue };
        let (Ok(start), Ok(end)) = (u32::try_from(fde.initial_address()), u32::try_from(fde.end_address()))
        else {
            continue;
        };
        if start >= end {
            continue;
        }
        let Ok(mut table) = fde.rows(eh, bases, &mut ctx) else { continue };
        while let Ok(Some(row)) = table.next_row() {
            let Ok(pc) = u32::try_from(row.start_address()) else { break };
            rows.push(Row { pc, ..rule_of(row) });
        }
        rows.push(Row { pc: end, ..END });
    }
    // End rows first at one address, so a function starting where another ends wins.
    rows.sort_by_key(|r| (r.pc, r.cfa != cfa::END));
    let mut merged: Vec<Row> = Vec::with_capacity(rows.len());
    for row in rows {
        match merged.last_mut() {
            Some(last) if last.pc == row.pc => *last = row,
            Some(last) if same_rule(last, &row) => {}
            _ => merged.push(row),
        }
    }
    Ok(merged)
}

fn same_rule(a: &Row, b: &Row) -> bool {
    (a.cfa, a.cfa_offset, a.rbp_offset) == (b.cfa, b.cfa_offset, b.rbp_offset)
}

/// The kernel's form of one DWARF row; anything it cannot follow (an expression, a
/// CFA in another register, an undefined return address) ends the stack there.
fn rule_of(row: &gimli::UnwindTableRow<usize>) -> Row {
    if matches!(row.register(X86_64::RA), Some(RegisterRule::Undefined)) {
        return END;
    }
    let (kind, offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => (cfa::RSP, *offset),
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => (cfa::RBP, *offset),
        _ => return END,
    };
    let Ok(cfa_offset) = i32::try_from(offset) else { return END };
    let rbp_offset = match row.register(X86_64::RBP) {
        Some(RegisterRule::Offset(at)) => match i16::try_from(at) {
            Ok(0) | Err(_) => return END,
            Ok(at) => at,
        },
        None | Some(RegisterRule::SameValue) => 0,
        Some(_) => return END,
    };
    Row { pc: 0, cfa_offset, rbp_offset, cfa: kind, _pad: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    #[no_mangle]
    extern "C" fn leakmon_unwind_probe_target(n: u64) -> u64 {
        std::hint::black_box(n) * 3
    }

    fn own_table() -> FileTable {
        file_table(&std::env::current_exe().expect("exe")).expect("tables of the test binary")
    }

    #[test]
    fn rows_are_sorted_and_a_function_entry_has_cfa_rsp_plus_8() {
        let table = own_table();
        assert!(table.rows.windows(2).all(|w| w[0].pc < w[1].pc), "sorted, one row per address");
        // At a function's first instruction only the return address is on the stack.
        let maps = crate::procfs::ProcRoot::default().maps(std::process::id()).expect("maps");
        let addr = leakmon_unwind_probe_target as *const () as u64;
        let m = crate::procfs::find_mapping(&maps, addr).expect("mapped");
        let vaddr = addr - table.bias(m.start, m.offset).expect("bias");
        let row = table.rows.iter().rev().find(|r| u64::from(r.pc) <= vaddr).expect("a row");
        assert_eq!((row.cfa, row.cfa_offset), (cfa::RSP, 8), "{row:?}");
    }

    #[test]
    fn libc_has_tables_and_start_ends_stacks() {
        // The libc this test runs on, wherever its distribution puts it.
        let maps = crate::procfs::ProcRoot::default().maps(std::process::id()).expect("maps");
        let libc = maps
            .into_iter()
            .find(|m| m.path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libc.so")))
            .expect("this test binary maps libc")
            .path;
        let table = file_table(&libc).expect("libc tables");
        assert!(table.rows.len() > 1000, "{} rows", table.rows.len());
        assert!(table.rows.iter().any(|r| r.cfa == cfa::RBP), "some functions keep frame pointers");
    }

    #[test]
    fn a_file_without_eh_frame_is_said_so() {
        let err = table_of(b"not an elf").expect_err("garbage");
        assert!(matches!(err, UnwindError::NotElf { .. }), "{err}");
    }

    /// The kernel trusts a cached row only for the generation it was found under, and
    /// an empty cache slot has generation 0: every write gets a new one, never 0, also
    /// across a reset of the tables and past 2^32.
    #[test]
    fn every_write_of_a_process_entry_gets_a_new_nonzero_generation() {
        let mut tables = Tables::new(16);
        let first = tables.next_gen();
        let second = tables.next_gen();
        assert!(first != 0 && second != 0 && first != second);
        tables.reset();
        assert_ne!(tables.next_gen(), second, "a reset keeps counting");
        tables.last_gen = u32::MAX;
        assert_eq!(tables.next_gen(), 1, "past 2^32 - 1, never 0");
    }
}

/// The shortest time between two rebuilds of the rows.
pub const COMPACT_EVERY: std::time::Duration = std::time::Duration::from_mins(10);

/// A mapped file: (device major, device minor, inode) as `/proc/PID/maps` gives them.
pub type MappedFile = (u32, u32, u64);

/// Where one file's rows went in the kernel's shared row array.
#[derive(Clone, Debug)]
pub struct Stored {
    pub first_row: u32,
    pub rows: u32,
    pub segments: Vec<Segment>,
}

/// What userspace knows of the kernel's tables: each file's place in the row array
/// (built once per file, whatever the number of processes mapping it), and each
/// process's executable mappings at its last refresh.
#[derive(Debug, Default)]
pub struct Tables {
    /// `None`: the file has no usable tables (said once in the log).
    pub files: std::collections::HashMap<MappedFile, Option<Stored>>,
    pub next_row: u32,
    pub capacity: u32,
    /// The table filled up and the log said so (once per fill).
    pub warned_full: bool,
    /// When the rows were last dropped and rebuilt.
    pub compacted: Option<std::time::Instant>,
    /// Per process, the executable mappings its tables were built from.
    pub processes: std::collections::HashMap<u32, Vec<(u64, u64, MappedFile)>>,
    /// The last generation given a process's entry.
    pub last_gen: u32,
}

impl Tables {
    pub fn new(capacity: u32) -> Self {
        Self { capacity, ..Self::default() }
    }

    /// Whether the rows may be dropped and rebuilt now: at most once per
    /// [`COMPACT_EVERY`], so a host whose live files do not fit does not rebuild at
    /// every refresh.
    pub fn may_compact(&mut self) -> bool {
        let due = self.compacted.is_none_or(|at| at.elapsed() >= COMPACT_EVERY);
        if due {
            self.compacted = Some(std::time::Instant::now());
        }
        due
    }

    /// Forgets every file and process (the kernel side is the caller's job).
    pub fn reset(&mut self) {
        self.files.clear();
        self.processes.clear();
        self.next_row = 0;
        self.warned_full = false;
    }

    /// A generation for a process's entry written now: one no entry written before has
    /// (until 2^32 - 1 writes later), never 0, which no cached row has.
    pub fn next_gen(&mut self) -> u32 {
        self.last_gen = self.last_gen.checked_add(1).unwrap_or(1);
        self.last_gen
    }

    /// Rows in the kernel's array.
    pub fn rows_used(&self) -> u32 {
        self.next_row
    }

    /// Room for `rows` more rows: the first index, advancing past them; `None` when the
    /// array is full (the file then has no tables and its frames end stacks).
    pub fn reserve(&mut self, rows: usize) -> Option<u32> {
        let rows = u32::try_from(rows).ok()?;
        let first = self.next_row;
        let end = first.checked_add(rows)?;
        (end <= self.capacity).then(|| {
            self.next_row = end;
            first
        })
    }
}

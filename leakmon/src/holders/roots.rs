//! Where a stopped process keeps pointers by definition, read from its mappings and
//! its threads' stack pointers: the roots of [`super::reach`].
//!
//! - **Globals**: every writable mapping of a file (an object's data) and the
//!   anonymous writable mapping right after one (its bss, zero-filled past the file).
//! - **Stacks**: each thread's stack from its stack pointer, less the red zone below
//!   it that x86-64 code may use without moving it, to the end of the mapping that
//!   holds it. The main thread's `[stack]` and other threads' anonymous mappings alike.
//!
//! The heap (`[heap]`, the allocator's anonymous mappings) is not a root: blocks live
//! there, and are reached through the flood or not at all. The text of
//! `/proc/PID/maps` is the target's to shape only through its own mappings, and is
//! parsed line by line, a line that does not parse skipped.

/// Below the stack pointer, the bytes a leaf function may use without moving it.
pub const RED_ZONE: u64 = 128;

/// A root, and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedRoot {
    pub start: u64,
    pub end: u64,
    pub kind: RootKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootKind {
    /// The data or bss of the object mapped from this path.
    Global(String),
    /// The stack of the thread at this index of those given.
    Stack(usize),
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    pub start: u64,
    pub end: u64,
    pub writable: bool,
    pub executable: bool,
    /// The file's path, `[stack]`-like pseudo names, or empty (anonymous).
    pub name: String,
}

/// The lines of `maps` (the text of `/proc/PID/maps`) that parse, in order.
pub(crate) fn regions(maps: &str) -> Vec<Region> {
    maps.lines().filter_map(region).collect()
}

fn region(line: &str) -> Option<Region> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    // offset, device, inode
    fields.nth(2)?;
    let name = fields.collect::<Vec<_>>().join(" ");
    Some(Region {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        writable: perms.as_bytes().get(1) == Some(&b'w'),
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        name,
    })
}

/// The roots of a process whose mappings are `maps` (the text of `/proc/PID/maps`) and
/// whose threads' stack pointers are `stack_pointers`.
pub fn roots(maps: &str, stack_pointers: &[u64]) -> Vec<NamedRoot> {
    let regions = regions(maps);
    let mut out = Vec::new();
    let mut last_file: Option<(&str, u64)> = None;
    for r in &regions {
        if r.name.starts_with('/') {
            if r.writable {
                out.push(NamedRoot { start: r.start, end: r.end, kind: RootKind::Global(r.name.clone()) });
            }
            last_file = Some((r.name.as_str(), r.end));
            continue;
        }
        // A bss follows its object's data at once, and is one mapping: what comes
        // after it (an allocator's mapping placed there by chance) is no root.
        let bss_of = last_file.take().filter(|(_, end)| *end == r.start && r.name.is_empty() && r.writable);
        let holds_a_stack = stack_pointers.iter().any(|sp| (r.start..r.end).contains(sp));
        if let (Some((path, _)), false) = (bss_of, holds_a_stack) {
            out.push(NamedRoot { start: r.start, end: r.end, kind: RootKind::Global(path.to_owned()) });
        }
    }
    for (thread, &sp) in stack_pointers.iter().enumerate() {
        if let Some(r) = regions.iter().find(|r| r.writable && (r.start..r.end).contains(&sp)) {
            let start = sp.saturating_sub(RED_ZONE).max(r.start);
            out.push(NamedRoot { start, end: r.end, kind: RootKind::Stack(thread) });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
555555554000-555555555000 r--p 00000000 08:01 1234   /usr/bin/fixture
555555555000-555555556000 r-xp 00001000 08:01 1234   /usr/bin/fixture
555555557000-555555558000 rw-p 00002000 08:01 1234   /usr/bin/fixture
555555558000-555555559000 rw-p 00000000 00:00 0
555555559000-55555557a000 rw-p 00000000 00:00 0      [heap]
7ffff7800000-7ffff8000000 rw-p 00000000 00:00 0
7ffff7dc0000-7ffff7de6000 r--p 00000000 08:01 99     /usr/lib/x86_64-linux-gnu/libc.so.6
7ffff7f9e000-7ffff7fa2000 rw-p 001dd000 08:01 99     /usr/lib/x86_64-linux-gnu/libc.so.6
7ffff7fa2000-7ffff7faf000 rw-p 00000000 00:00 0
7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0      [stack]
not a line
";

    #[test]
    fn data_bss_and_stacks_are_roots_and_the_heap_is_not() {
        let main_sp = 0x7fff_ffff_e000;
        let thread_sp = 0x7fff_f7ff_0000;
        let found = roots(MAPS, &[main_sp, thread_sp]);
        let fixture = RootKind::Global("/usr/bin/fixture".into());
        let libc = RootKind::Global("/usr/lib/x86_64-linux-gnu/libc.so.6".into());
        assert_eq!(
            found,
            [
                NamedRoot { start: 0x5555_5555_7000, end: 0x5555_5555_8000, kind: fixture.clone() },
                NamedRoot { start: 0x5555_5555_8000, end: 0x5555_5555_9000, kind: fixture },
                NamedRoot { start: 0x7fff_f7f9_e000, end: 0x7fff_f7fa_2000, kind: libc.clone() },
                NamedRoot { start: 0x7fff_f7fa_2000, end: 0x7fff_f7fa_f000, kind: libc },
                NamedRoot { start: main_sp - RED_ZONE, end: 0x7fff_ffff_f000, kind: RootKind::Stack(0) },
                NamedRoot { start: thread_sp - RED_ZONE, end: 0x7fff_f800_0000, kind: RootKind::Stack(1) },
            ]
        );
    }

    /// A thread's stack mapped right after an object's data is a stack, not its bss;
    /// a mapping after a bss is no root.
    #[test]
    fn a_stack_after_data_is_a_stack_and_only_one_bss_follows_data() {
        let maps = "\
1000-2000 rw-p 00000000 08:01 5 /lib/x.so
2000-9000 rw-p 00000000 00:00 0
";
        let found = roots(maps, &[0x8000]);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1], NamedRoot { start: 0x8000 - RED_ZONE, end: 0x9000, kind: RootKind::Stack(0) });
        let maps = "\
1000-2000 rw-p 00000000 08:01 5 /lib/x.so
2000-3000 rw-p 00000000 00:00 0
3000-9000 rw-p 00000000 00:00 0
";
        let roots = roots(maps, &[]);
        assert_eq!(
            roots.iter().map(|r| (r.start, r.end)).collect::<Vec<_>>(),
            [(0x1000, 0x2000), (0x2000, 0x3000)]
        );
    }
}

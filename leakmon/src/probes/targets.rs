//! Where to put the allocator probes in one library file.
//!
//! Input: an ELF file (libc, libstdc++). Output: the file offsets of the allocator entry
//! points it defines, each with the program that handles it. Aliases (two names for
//! one address) get one probe only, or both would fire for one call.

use std::{collections::HashSet, fs, path::Path};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

/// The eBPF program that handles one entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Handler {
    Malloc,
    Calloc,
    Realloc,
    ReallocArray,
    Memalign,
    PosixMemalign,
    Strdup,
    Free,
}

impl Handler {
    /// The entry program's name in the eBPF object.
    pub const fn program(self) -> &'static str {
        match self {
            Self::Malloc => "alloc_malloc",
            Self::Calloc => "alloc_calloc",
            Self::Realloc => "alloc_realloc",
            Self::ReallocArray => "alloc_reallocarray",
            Self::Memalign => "alloc_memalign",
            Self::PosixMemalign => "alloc_posix_memalign",
            Self::Strdup => "alloc_strdup",
            Self::Free => "free_enter",
        }
    }

    /// Whether the shared return probe goes on this entry point too.
    pub const fn needs_return(self) -> bool {
        !matches!(self, Self::Free)
    }
}

/// The entry points, in priority order: on an alias the first name wins.
const ENTRY_POINTS: &[(&str, Handler)] = &[
    ("malloc", Handler::Malloc),
    ("calloc", Handler::Calloc),
    ("realloc", Handler::Realloc),
    ("reallocarray", Handler::ReallocArray),
    ("free", Handler::Free),
    ("posix_memalign", Handler::PosixMemalign),
    ("aligned_alloc", Handler::Memalign),
    ("memalign", Handler::Memalign),
    ("valloc", Handler::Malloc),
    ("pvalloc", Handler::Malloc),
    // The string duplicators allocate on their caller's behalf; probing them as the
    // outermost call puts the caller, not libc, on top of the stack.
    ("strdup", Handler::Strdup),
    ("strndup", Handler::Strdup),
    // operator new and new[] (plain, nothrow, aligned): the same, for C++ callers.
    ("_Znwm", Handler::Malloc),
    ("_Znam", Handler::Malloc),
    ("_ZnwmRKSt9nothrow_t", Handler::Malloc),
    ("_ZnamRKSt9nothrow_t", Handler::Malloc),
    ("_ZnwmSt11align_val_t", Handler::Malloc),
    ("_ZnamSt11align_val_t", Handler::Malloc),
    ("_ZnwmSt11align_val_tRKSt9nothrow_t", Handler::Malloc),
    ("_ZnamSt11align_val_tRKSt9nothrow_t", Handler::Malloc),
];

/// Errors finding entry points.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("read {path}")]
    Read { path: String, source: std::io::Error },
    #[error("parse ELF {path}")]
    Parse { path: String, source: object::Error },
}

/// One probe location in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    pub symbol: &'static str,
    pub handler: Handler,
    /// The function's first byte: where a return probe goes, and the alias key.
    pub file_offset: u64,
    /// Where the entry probe goes: the first byte, or a cheaper instruction a little
    /// further that every call that matters reaches (see [`super::placement`]).
    pub probe_offset: u64,
}

/// Whether a mapped file is one whose allocator entry points we probe.
pub fn is_allocator_library(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.starts_with("libc.so") || name.starts_with("libc-2.") || name.starts_with("libstdc++.so")
}

/// The allocator entry points `path` defines.
pub fn entry_points(path: &Path) -> Result<Vec<EntryPoint>, TargetError> {
    let display = path.display().to_string();
    let data = fs::read(path).map_err(|source| TargetError::Read { path: display.clone(), source })?;
    entry_points_in(&data).map_err(|source| TargetError::Parse { path: display, source })
}

/// The allocator entry points defined by the ELF image `data`.
pub fn entry_points_in(data: &[u8]) -> Result<Vec<EntryPoint>, object::Error> {
    let file = object::File::parse(data)?;
    let mut found: Vec<Option<(u64, u64)>> = vec![None; ENTRY_POINTS.len()];
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        if !symbol.is_definition() || symbol.address() == 0 {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        let Some(i) = ENTRY_POINTS.iter().position(|(n, _)| *n == name) else {
            continue;
        };
        if found[i].is_some() {
            continue;
        }
        let Some(section) = symbol.section_index().and_then(|s| file.section_by_index(s).ok()) else {
            continue;
        };
        let Some((section_offset, _)) = section.file_range() else { continue };
        let start = symbol.address() - section.address();
        let skip = match ENTRY_POINTS[i].1 {
            Handler::Free => section
                .data()
                .ok()
                .and_then(|d| d.get(usize::try_from(start).ok()?..))
                .map_or(0, super::placement::pointer_release_offset),
            _ => 0,
        };
        found[i] = Some((start + section_offset, start + section_offset + skip));
    }
    let mut seen = HashSet::new();
    Ok(ENTRY_POINTS
        .iter()
        .zip(found)
        .filter_map(|(&(symbol, handler), offsets)| {
            let (file_offset, probe_offset) = offsets?;
            seen.insert(file_offset).then_some(EntryPoint { symbol, handler, file_offset, probe_offset })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system_libc() -> std::path::PathBuf {
        let maps = crate::procfs::ProcRoot::default().maps(std::process::id()).expect("maps");
        maps.into_iter().find(|m| is_allocator_library(&m.path)).expect("this test binary maps libc").path
    }

    #[test]
    fn recognises_allocator_libraries() {
        assert!(is_allocator_library(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6")));
        assert!(is_allocator_library(Path::new("/lib/libc-2.31.so")));
        assert!(is_allocator_library(Path::new("/usr/lib/libstdc++.so.6.0.30")));
        assert!(!is_allocator_library(Path::new("/usr/lib/libcap.so.2")));
        assert!(!is_allocator_library(Path::new("/usr/lib/libcrypto.so.3")));
    }

    #[test]
    fn finds_the_whole_family_in_libc_at_distinct_offsets() {
        let points = entry_points(&system_libc()).expect("libc parses");
        let names: Vec<_> = points.iter().map(|p| p.symbol).collect();
        for want in [
            "malloc",
            "calloc",
            "realloc",
            "reallocarray",
            "free",
            "posix_memalign",
            "valloc",
            "pvalloc",
            "strdup",
            "strndup",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        // glibc 2.36 makes aligned_alloc an alias of memalign: one probe serves both.
        assert!(names.contains(&"aligned_alloc") || names.contains(&"memalign"), "{names:?}");
        let offsets: HashSet<_> = points.iter().map(|p| p.file_offset).collect();
        assert_eq!(offsets.len(), points.len(), "aliases must be probed once");
        // The offset must point at the function's code: an endbr64 or a push in this glibc.
        let data = fs::read(system_libc()).expect("read libc");
        let malloc = points.iter().find(|p| p.symbol == "malloc").expect("malloc");
        let first = data[usize::try_from(malloc.file_offset).expect("fits")];
        assert!(matches!(first, 0xf3 | 0x41 | 0x53 | 0x55 | 0x48), "unexpected first byte {first:#x}");
    }

    #[test]
    fn free_is_probed_past_its_null_test_on_this_libc() {
        let points = entry_points(&system_libc()).expect("libc parses");
        let free = points.iter().find(|p| p.symbol == "free").expect("free");
        let data = fs::read(system_libc()).expect("read libc");
        let at = |o: u64| data[usize::try_from(o).expect("fits")];
        // This machine's glibc: `test rdi, rdi; je ...; push rbp`.
        assert_eq!(free.probe_offset, free.file_offset + 9, "free probed at its push");
        assert_eq!(at(free.probe_offset), 0x55, "push rbp");
        let malloc = points.iter().find(|p| p.symbol == "malloc").expect("malloc");
        assert_eq!(malloc.probe_offset, malloc.file_offset, "others at their first byte");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(entry_points_in(b"not an elf").is_err());
    }
}

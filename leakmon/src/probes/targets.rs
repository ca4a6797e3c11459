//! Where to put the allocator probes in one library file.
//!
//! Input: an ELF file (libc, libstdc++). Output: the file offsets of the allocator entry
//! points it defines, each with the program that handles it. Aliases (two names for
//! one address) get one probe only, or both would fire for one call.

use std::{collections::HashSet, path::Path};

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
    /// The agent's marker for a block it sampled: `(block, weight)`.
    AgentAlloc,
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
            Self::AgentAlloc => "agent_alloc",
        }
    }

    /// Whether the shared return probe goes on this entry point too.
    pub const fn needs_return(self) -> bool {
        !matches!(self, Self::Free | Self::AgentAlloc)
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
    // C23's sized frees (glibc 2.40+, jemalloc, tcmalloc): `(ptr, size[, alignment])`.
    ("free_sized", Handler::Free),
    ("free_aligned_sized", Handler::Free),
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
    // jemalloc's own API (redis, Rust's jemallocator): `mallocx(size, flags)`,
    // `rallocx(ptr, size, flags)`, `dallocx(ptr, flags)`, `sdallocx(ptr, size, flags)`,
    // unprefixed, with the `je_` prefix of a bundled build, and with tikv-jemallocator's
    // `_rjem_` prefix.
    ("mallocx", Handler::Malloc),
    ("rallocx", Handler::Realloc),
    ("dallocx", Handler::Free),
    ("sdallocx", Handler::Free),
    ("je_malloc", Handler::Malloc),
    ("je_calloc", Handler::Calloc),
    ("je_realloc", Handler::Realloc),
    ("je_free", Handler::Free),
    ("je_posix_memalign", Handler::PosixMemalign),
    ("je_aligned_alloc", Handler::Memalign),
    ("je_memalign", Handler::Memalign),
    ("je_valloc", Handler::Malloc),
    ("je_mallocx", Handler::Malloc),
    ("je_rallocx", Handler::Realloc),
    ("je_dallocx", Handler::Free),
    ("je_sdallocx", Handler::Free),
    ("_rjem_malloc", Handler::Malloc),
    ("_rjem_calloc", Handler::Calloc),
    ("_rjem_realloc", Handler::Realloc),
    ("_rjem_free", Handler::Free),
    ("_rjem_posix_memalign", Handler::PosixMemalign),
    ("_rjem_aligned_alloc", Handler::Memalign),
    ("_rjem_memalign", Handler::Memalign),
    ("_rjem_mallocx", Handler::Malloc),
    ("_rjem_rallocx", Handler::Realloc),
    ("_rjem_dallocx", Handler::Free),
    ("_rjem_sdallocx", Handler::Free),
    // tcmalloc's and mimalloc's names; in their Debian builds aliases of the above.
    ("tc_malloc", Handler::Malloc),
    ("tc_calloc", Handler::Calloc),
    ("tc_realloc", Handler::Realloc),
    ("tc_free", Handler::Free),
    ("tc_memalign", Handler::Memalign),
    ("tc_posix_memalign", Handler::PosixMemalign),
    ("mi_malloc", Handler::Malloc),
    ("mi_zalloc", Handler::Malloc),
    ("mi_calloc", Handler::Calloc),
    ("mi_realloc", Handler::Realloc),
    ("mi_free", Handler::Free),
    ("mi_strdup", Handler::Strdup),
    ("mi_strndup", Handler::Strdup),
];

/// operator delete and delete[] (plain, sized, aligned, nothrow), probed only in a file
/// that implements an allocator: libstdc++'s call `free`, already probed, but
/// jemalloc's, tcmalloc's and mimalloc's release the block themselves.
const DELETE_POINTS: &[&str] = &[
    "_ZdlPv",
    "_ZdaPv",
    "_ZdlPvm",
    "_ZdaPvm",
    "_ZdlPvRKSt9nothrow_t",
    "_ZdaPvRKSt9nothrow_t",
    "_ZdlPvSt11align_val_t",
    "_ZdaPvSt11align_val_t",
    "_ZdlPvmSt11align_val_t",
    "_ZdaPvmSt11align_val_t",
    "_ZdlPvSt11align_val_tRKSt9nothrow_t",
    "_ZdaPvSt11align_val_tRKSt9nothrow_t",
];

/// Which allocator implementation a file carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocator {
    Glibc,
    Musl,
    Jemalloc,
    Tcmalloc,
    Mimalloc,
    /// A `malloc` of a program's or library's own.
    Other,
}

impl Allocator {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Glibc => "glibc",
            Self::Musl => "musl",
            Self::Jemalloc => "jemalloc",
            Self::Tcmalloc => "tcmalloc",
            Self::Mimalloc => "mimalloc",
            Self::Other => "other",
        }
    }

    /// A C library's allocator: the one a process uses when nothing interposes.
    pub const fn is_libc(self) -> bool {
        matches!(self, Self::Glibc | Self::Musl)
    }

    /// Recognises the implementation from the names a file defines; `None` for a file
    /// with no allocator of its own (libstdc++'s operator new calls malloc).
    fn recognise(defined: &HashSet<&str>) -> Option<Self> {
        let any = |names: &[&str]| names.iter().any(|n| defined.contains(n));
        if any(&["mallocx", "je_mallocx", "_rjem_mallocx", "je_malloc", "_rjem_malloc"]) {
            Some(Self::Jemalloc)
        } else if any(&["tc_malloc"]) {
            Some(Self::Tcmalloc)
        } else if any(&["mi_malloc"]) {
            Some(Self::Mimalloc)
        } else if any(&["gnu_get_libc_version", "malloc_trim"]) {
            // malloc_trim lives in glibc's malloc.o, so a static glibc program has it too.
            Some(Self::Glibc)
        } else if any(&["__libc_start_main"]) && any(&["malloc"]) {
            // musl's libc.so and static musl programs: a C library that is not glibc.
            Some(Self::Musl)
        } else if any(&["malloc"]) {
            Some(Self::Other)
        } else {
            None
        }
    }
}

/// What one file offers to probe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileTargets {
    /// The allocator the file implements, if any.
    pub allocator: Option<Allocator>,
    /// Whether it defines plain `malloc`, so that a process loading it before libc (an
    /// executable, `LD_PRELOAD`, a library linked first) allocates through it.
    pub interposes: bool,
    pub entry_points: Vec<EntryPoint>,
    /// The libraries it names as `DT_NEEDED`, in order.
    pub needed: Vec<String>,
}

/// Errors finding entry points.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("read {path}")]
    Read { path: String, source: std::io::Error },
    #[error("parse ELF {path}")]
    Parse { path: String, source: object::Error },
    #[error("{path} is not leakmon's agent: its marker functions are missing")]
    NotAgent { path: String },
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

/// The allocator entry points `path` defines.
pub fn entry_points(path: &Path) -> Result<Vec<EntryPoint>, TargetError> {
    Ok(file_targets(path)?.entry_points)
}

/// What `path` offers to probe.
pub fn file_targets(path: &Path) -> Result<FileTargets, TargetError> {
    let display = path.display().to_string();
    // Read, not mapped: the file is its owner's to truncate, and a mapping would then
    // fault in leakmon (see `read_binary`).
    let data = crate::untrusted::read_binary(path)
        .map_err(|source| TargetError::Read { path: display.clone(), source })?;
    targets_in(&data).map_err(|source| TargetError::Parse { path: display, source })
}

/// The allocator entry points defined by the ELF image `data`.
pub fn entry_points_in(data: &[u8]) -> Result<Vec<EntryPoint>, object::Error> {
    Ok(targets_in(data)?.entry_points)
}

/// What the ELF image `data` offers to probe.
pub fn targets_in(data: &[u8]) -> Result<FileTargets, object::Error> {
    let file = object::File::parse(data)?;
    let mut defined: HashSet<&str> = HashSet::new();
    // name -> (function start, probe offset), file offsets.
    let mut offsets: std::collections::HashMap<&str, (u64, u64)> = std::collections::HashMap::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        if !symbol.is_definition() || symbol.address() == 0 {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        let handler = match ENTRY_POINTS.iter().find(|(n, _)| *n == name) {
            Some(&(_, handler)) => Some(handler),
            None if DELETE_POINTS.contains(&name) => Some(Handler::Free),
            None => None,
        };
        if matches!(name, "gnu_get_libc_version" | "malloc_trim" | "__libc_start_main") {
            defined.insert(name);
        }
        let Some(handler) = handler else { continue };
        if offsets.contains_key(name) {
            continue;
        }
        let Some((file_offset, code)) = code_of(&file, &symbol) else { continue };
        let skip = match handler {
            Handler::Free => super::placement::pointer_release_offset(code),
            _ => 0,
        };
        defined.insert(name);
        offsets.insert(name, (file_offset, file_offset.saturating_add(skip)));
    }
    let allocator = Allocator::recognise(&defined);
    let deletes: Vec<(&'static str, Handler)> = if allocator.is_some_and(|a| !a.is_libc()) {
        DELETE_POINTS.iter().map(|&n| (n, Handler::Free)).collect()
    } else {
        Vec::new()
    };
    let mut seen = HashSet::new();
    let entry_points = ENTRY_POINTS
        .iter()
        .copied()
        .chain(deletes)
        .filter_map(|(symbol, handler)| {
            let &(file_offset, probe_offset) = offsets.get(symbol)?;
            seen.insert(file_offset).then_some(EntryPoint { symbol, handler, file_offset, probe_offset })
        })
        .collect();
    Ok(FileTargets { allocator, interposes: defined.contains("malloc"), entry_points, needed: needed(data) })
}

/// A defined function's file offset and its code, to the end of its section; `None`
/// for a symbol outside its own section (a corrupt or crafted file in some traced
/// process names no code of that file: never a probe offset).
pub(crate) fn code_of<'data>(
    file: &object::File<'data>,
    symbol: &object::Symbol<'data, '_>,
) -> Option<(u64, &'data [u8])> {
    let section = file.section_by_index(symbol.section_index()?).ok()?;
    let (section_offset, section_size) = section.file_range()?;
    let start = symbol.address().checked_sub(section.address()).filter(|s| *s < section_size)?;
    let file_offset = start.checked_add(section_offset)?;
    let code = section.data().ok()?.get(usize::try_from(start).ok()?..).unwrap_or_default();
    Some((file_offset, code))
}

/// The in-process agent's markers, and the programs that go on them: a sampled block,
/// and its free.
const AGENT_POINTS: [(&str, Handler); 2] =
    [("leakmon_agent_sampled_alloc", Handler::AgentAlloc), ("leakmon_agent_sampled_free", Handler::Free)];

/// The agent's marker functions in the agent file at `path`. Each starts with a NOP,
/// the probe site.
pub fn agent_points(path: &Path) -> Result<Vec<EntryPoint>, TargetError> {
    let display = path.display().to_string();
    let data = crate::untrusted::read_binary(path)
        .map_err(|source| TargetError::Read { path: display.clone(), source })?;
    let file =
        object::File::parse(&*data).map_err(|source| TargetError::Parse { path: display.clone(), source })?;
    let mut points = Vec::new();
    for (symbol, handler) in AGENT_POINTS {
        let found = file
            .dynamic_symbols()
            .find(|s| s.is_definition() && s.name() == Ok(symbol))
            .and_then(|s| code_of(&file, &s));
        let Some((file_offset, _)) = found else {
            return Err(TargetError::NotAgent { path: display });
        };
        points.push(EntryPoint { symbol, handler, file_offset, probe_offset: file_offset });
    }
    Ok(points)
}

/// The file offset of the function `symbol` that the file at `path` defines.
pub fn function_offset(path: &Path, symbol: &str) -> Result<Option<u64>, TargetError> {
    let display = path.display().to_string();
    let data = crate::untrusted::read_binary(path)
        .map_err(|source| TargetError::Read { path: display.clone(), source })?;
    let file = object::File::parse(&*data).map_err(|source| TargetError::Parse { path: display, source })?;
    Ok(file
        .dynamic_symbols()
        .chain(file.symbols())
        .filter(|s| s.is_definition() && s.address() != 0 && s.name() == Ok(symbol))
        .find_map(|s| code_of(&file, &s))
        .map(|(offset, _)| offset))
}

/// The `DT_NEEDED` names of a 64-bit ELF image; none for anything else.
fn needed(data: &[u8]) -> Vec<String> {
    use object::read::elf::{ElfFile64, FileHeader as _};
    let Ok(elf) = ElfFile64::<object::Endianness>::parse(data) else { return Vec::new() };
    let endian = elf.endian();
    let Ok(sections) = elf.elf_header().sections(endian, data) else { return Vec::new() };
    let Ok(table) = sections.dynamic_table(endian, data) else { return Vec::new() };
    table
        .iter()
        .filter(|d| d.tag == object::elf::DT_NEEDED)
        .filter_map(|d| table.string(d).ok())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared object defining `malloc`, with `malloc`'s dynamic symbol value replaced
    /// by `value`: a crafted file, as a traced process might map.
    fn crafted(value: u64) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("temp dir");
        let src = dir.path().join("m.c");
        std::fs::write(
            &src,
            "void *malloc(unsigned long n) { (void)n; return 0; }\nvoid free(void *p) { (void)p; }\n",
        )
        .expect("write source");
        let lib = dir.path().join("libm.so");
        let status = std::process::Command::new("gcc")
            .args(["-shared", "-fPIC", "-O1", "-s", "-o"])
            .arg(&lib)
            .arg(&src)
            .status()
            .expect("run gcc");
        assert!(status.success());
        let mut data = std::fs::read(&lib).expect("read");
        let file = object::File::parse(&*data).expect("parse");
        let at = file.dynamic_symbols().find(|s| s.name() == Ok("malloc")).expect("malloc symbol").index().0;
        let (dynsym, _) =
            file.section_by_name(".dynsym").expect(".dynsym").file_range().expect("in the file");
        // Elf64_Sym: name (4), info (1), other (1), shndx (2), value (8), size (8).
        let entry = dynsym as usize + at * 24 + 8;
        data[entry..entry + 8].copy_from_slice(&value.to_le_bytes());
        data
    }

    #[test]
    fn a_symbol_outside_its_section_is_no_probe_and_no_panic() {
        for value in [0x10, u64::MAX - 3, u64::MAX, 1 << 40] {
            let points = entry_points_in(&crafted(value)).expect("still an ELF");
            assert!(
                points.iter().all(|p| p.symbol != "malloc"),
                "a malloc at {value:#x} is outside .text: {points:?}"
            );
            assert!(points.iter().any(|p| p.symbol == "free"), "the genuine free is still found");
        }
    }

    fn system_libc() -> std::path::PathBuf {
        let maps = crate::procfs::ProcRoot::default().maps(std::process::id()).expect("maps");
        maps.into_iter()
            .find(|m| m.path.to_string_lossy().contains("/libc.so"))
            .expect("this test binary maps libc")
            .path
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
        let data = std::fs::read(system_libc()).expect("read libc");
        let malloc = points.iter().find(|p| p.symbol == "malloc").expect("malloc");
        let first = data[usize::try_from(malloc.file_offset).expect("fits")];
        assert!(matches!(first, 0xf3 | 0x41 | 0x53 | 0x55 | 0x48), "unexpected first byte {first:#x}");
    }

    #[test]
    fn free_is_probed_past_its_null_test_on_this_libc() {
        let points = entry_points(&system_libc()).expect("libc parses");
        let free = points.iter().find(|p| p.symbol == "free").expect("free");
        let data = std::fs::read(system_libc()).expect("read libc");
        // What the file says, not what one glibc build compiled: decoding from free's
        // first byte, the probe lands on an instruction boundary after the test of its
        // argument (rdi) and the conditional jump that returns on NULL.
        assert!(free.probe_offset > free.file_offset, "free probed past its first byte");
        let start = usize::try_from(free.file_offset).expect("fits");
        let end = usize::try_from(free.probe_offset).expect("fits");
        let mut decoder = iced_x86::Decoder::with_ip(64, &data[start..], free.file_offset, 0);
        let mut seen = Vec::new();
        while decoder.ip() < free.probe_offset {
            seen.push(decoder.decode());
        }
        assert_eq!(decoder.ip(), free.probe_offset, "an instruction boundary: {seen:?}");
        let tests_rdi = seen.iter().position(|i| {
            matches!(i.mnemonic(), iced_x86::Mnemonic::Test | iced_x86::Mnemonic::Cmp)
                && i.op0_kind() == iced_x86::OpKind::Register
                && i.op0_register() == iced_x86::Register::RDI
        });
        let jumps = seen
            .iter()
            .rposition(|i| matches!(i.mnemonic(), iced_x86::Mnemonic::Je | iced_x86::Mnemonic::Jne));
        assert!(
            tests_rdi.zip(jumps).is_some_and(|(t, j)| t < j),
            "a NULL test and its jump come before the probe ({} bytes in): {seen:?}",
            end - start
        );
        let malloc = points.iter().find(|p| p.symbol == "malloc").expect("malloc");
        assert_eq!(malloc.probe_offset, malloc.file_offset, "others at their first byte");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(entry_points_in(b"not an elf").is_err());
    }
}

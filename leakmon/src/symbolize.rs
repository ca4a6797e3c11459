//! Symbolization: user stack addresses → function, file and line, with blazesym.
//!
//! In: a process's mappings (captured while it was alive) and the addresses of one
//! stack. Out: frames. Lookups go by file and file offset, not through the live
//! process, so stacks of processes that have exited still resolve as long as their
//! binaries exist. Each binary is opened once, as a target's file ([`binaries`]), and
//! blazesym caches what it parsed of it; both start over past [`MAX_BINARIES`]
//! binaries, so a long-running daemon's memory stays bounded. A daemon drops
//! the cache once no new stack has needed it for a while ([`Symbolizer::release_idle`]):
//! stacks are named once each, so after a burst of new stacks it would otherwise keep
//! every binary it parsed mapped, and their parsed debug information on its heap.

mod binaries;
pub mod variables;

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use blazesym::symbolize::{source::Elf, source::Source, Input, Symbolized, Symbolizer as Blaze};

use self::binaries::{Binaries, COPIED_LIMIT};
use crate::{
    model::{Frame, SiteFrame},
    procfs::{find_mapping, Mapping},
    runtimes::{runtime_site, Walked, WalkedProcess},
    wrappers::Wrappers,
};

/// A stack's id that does not depend on where things were loaded: a hash of each
/// frame's binary (its build id, else its path) and file offset. The same call path in
/// the same build gets the same id in every process, after restarts and on every host;
/// the exporter's `stack` label and the report's `id` are this.
pub fn stable_id(frames: &[Frame]) -> String {
    crate::model::stable_hash(frames.iter().map(|f| {
        let object = f.build_id.clone().or_else(|| f.object.as_ref().map(|p| p.display().to_string()));
        format!("{}+{:x}", object.unwrap_or_default(), f.file_offset)
    }))
}

/// Shared symbolizer with its per-binary cache, and the allocation wrappers that decide
/// which frame of a stack is its allocation site.
pub struct Symbolizer {
    blaze: Mutex<Parsed>,
    wrappers: Wrappers,
    /// Processes whose frames a runtime's walker in the kernel appended (CPython's), by
    /// pid (`None`: not one whose frames leakmon can name).
    walked: Mutex<HashMap<u32, Option<Arc<dyn WalkedProcess>>>>,
}

/// blazesym's symbolizer and the binaries it reads, which live and go together.
struct Parsed {
    blaze: Blaze,
    binaries: Binaries,
    /// Each binary's variables' declarations (by its path), read once.
    declared: HashMap<std::path::PathBuf, Arc<HashMap<u64, variables::Declared>>>,
    /// When it last symbolized an address.
    used: Instant,
}

impl Parsed {
    fn new() -> Self {
        Self {
            blaze: Blaze::new(),
            binaries: Binaries::default(),
            declared: HashMap::new(),
            used: Instant::now(),
        }
    }
}

/// Processes of walked frames remembered.
pub const MAX_WALKED_PROCESSES: usize = 4096;

/// Binaries whose parsed symbols blazesym keeps.
pub const MAX_BINARIES: usize = 256;

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new(Wrappers::default())
    }
}

impl Symbolizer {
    pub fn new(wrappers: Wrappers) -> Self {
        Self { blaze: Mutex::new(Parsed::new()), wrappers, walked: Mutex::new(HashMap::new()) }
    }

    /// Drops every parsed binary (their maps and parsed debug information) if none was
    /// used for `idle`; whether it did. The next stack to name parses its binaries again.
    pub fn release_idle(&self, idle: Duration) -> bool {
        let mut blaze = self.blaze.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if blaze.binaries.is_empty() || blaze.used.elapsed() < idle {
            return false;
        }
        *blaze = Parsed::new();
        true
    }

    /// Binaries the symbolizer may hold parsed.
    pub fn parsed_binaries(&self) -> usize {
        self.blaze.lock().unwrap_or_else(std::sync::PoisonError::into_inner).binaries.len()
    }

    pub fn wrappers(&self) -> &Wrappers {
        &self.wrappers
    }

    /// Index of the allocation site in `frames` (see [`Symbolizer::site_of`]).
    pub fn site(&self, frames: &[Frame]) -> usize {
        self.site_of(frames.iter().map(Frame::site_frame))
    }

    /// Index of the allocation site: the innermost frame of the program's own code. In
    /// a runtime's language (Python, JavaScript, Java) that is its innermost frame past
    /// the runtime's own library code ([`runtime_site`]); in native code, the first
    /// frame past the allocator's wrappers.
    pub fn site_of<'a, I>(&self, frames: I) -> usize
    where
        I: Iterator<Item = SiteFrame<'a>> + Clone,
    {
        runtime_site(frames.clone()).unwrap_or_else(|| self.wrappers.site(frames.map(|f| f.function)))
    }

    /// Resolves a stack of return addresses, innermost first. The stack ends at the
    /// first address outside any executable file mapping: past that, frame-pointer
    /// walks through code without frame pointers read garbage. `root` maps the
    /// process's paths into our mount namespace (its `/proc/PID/root`) while it lives.
    ///
    /// Frames a runtime's walker in the kernel appended (CPython's) are named from
    /// `pid`'s memory while it lives, by that runtime (see [`crate::runtimes::Walked`]);
    /// without the process, the native frames stay alone.
    pub fn frames(&self, pid: u32, maps: &[Mapping], root: Option<&Path>, stack: &[u64]) -> Vec<Frame> {
        self.frames_with(pid, maps, root, None, stack)
    }

    /// The variable at `address`, in the data or bss of the object that `maps` maps
    /// from `object`: its symbol (from the symbol table; a stripped binary has none),
    /// and where its DWARF says it is declared.
    pub fn variable(
        &self,
        maps: &[Mapping],
        root: Option<&Path>,
        object: &Path,
        address: u64,
    ) -> Option<(String, Option<variables::Declared>)> {
        let first = maps.iter().filter(|m| m.path == object).min_by_key(|m| m.start)?;
        let mut parsed = self.blaze.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = parsed.binaries.mapped(first, root)?.path.clone();
        // The bss has no file bytes: the address goes by the object's layout, the
        // load bias taken from where its first segment was mapped.
        let bias = first.start.checked_sub(virt_offset(&path, first.offset)?)?;
        let at = address.checked_sub(bias)?;
        let src = Source::Elf(Elf::new(&path));
        let (name, start) = match parsed.blaze.symbolize_single(&src, Input::VirtOffset(at)) {
            Ok(Symbolized::Sym(sym)) => (sym.name.into_owned(), sym.addr),
            _ => return None,
        };
        let declared = match parsed.declared.get(&path) {
            Some(d) => d.clone(),
            None => {
                let d = Arc::new(
                    crate::untrusted::read_binary(&path)
                        .map(|elf| variables::declarations(&elf))
                        .unwrap_or_default(),
                );
                parsed.declared.insert(path.clone(), d.clone());
                d
            }
        };
        parsed.used = Instant::now();
        Some((name, declared.get(&start).cloned()))
    }

    /// [`Symbolizer::frames`], naming walked frames through `walked` (read while the
    /// process lived) when given.
    pub fn frames_with(
        &self,
        pid: u32,
        maps: &[Mapping],
        root: Option<&Path>,
        walked: Option<Arc<dyn WalkedProcess>>,
        stack: &[u64],
    ) -> Vec<Frame> {
        let walker = stack.iter().enumerate().find_map(|(i, &w)| Some((i, crate::runtimes::walker_of(w)?)));
        let Some((split, walker)) = walker else {
            return self.native_frames(maps, root, stack);
        };
        let native = self.native_frames(maps, root, &stack[..split]);
        match walked.or_else(|| root.and_then(|root| self.walked_process(walker, pid, maps, root))) {
            Some(process) => process.frames(native, &stack[split..]),
            None => native,
        }
    }

    /// The process `pid` of `walker`'s runtime, opened once while that runtime stays
    /// mapped; `None` when it is not one leakmon can name frames of.
    fn walked_process(
        &self,
        walker: &dyn Walked,
        pid: u32,
        maps: &[Mapping],
        root: &Path,
    ) -> Option<Arc<dyn WalkedProcess>> {
        let mut known = self.walked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(Some(p)) = known.get(&pid) {
            if p.still_in(maps) {
                return Some(p.clone());
            }
        }
        if known.len() >= MAX_WALKED_PROCESSES {
            known.clear();
        }
        let process = walker.open(pid, maps, root);
        known.insert(pid, process.clone());
        process
    }

    fn native_frames(&self, maps: &[Mapping], root: Option<&Path>, stack: &[u64]) -> Vec<Frame> {
        let mut frames = Vec::with_capacity(stack.len());
        for &address in stack {
            // Every frame is a return address: look up the call instruction before it.
            let Some(mapping) = find_mapping(maps, address.saturating_sub(1)).filter(|m| m.executable) else {
                break;
            };
            // The agent's hook and marker are leakmon's frames, not the program's.
            if frames.is_empty() && crate::agent::is_agent(&mapping.path) {
                continue;
            }
            let offset = mapping.file_offset(address - 1);
            let mut frame = Frame {
                address,
                object: Some(mapping.path.clone()),
                file_offset: offset,
                ..Frame::default()
            };
            let mut parsed = self.blaze.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if parsed.binaries.len() >= MAX_BINARIES || parsed.binaries.copied() > COPIED_LIMIT {
                *parsed = Parsed::new();
            }
            let Some(binary) = parsed.binaries.mapped(mapping, root) else {
                drop(parsed);
                frames.push(frame);
                continue;
            };
            let path = binary.path.clone();
            frame.build_id = binary.build_id.clone();
            let mut lookups = vec![(path.clone(), Input::FileOffset(offset))];
            for attempt in 0..2 {
                if attempt == 1 {
                    // blazesym follows a .gnu_debuglink itself; a stripped file without
                    // one is found by its build id under /usr/lib/debug, as debuggers
                    // do. Its segments hold no bytes, so it is asked by the address in
                    // the file. Looked for only once the binary itself named nothing.
                    let Some(id) = frame.build_id.as_deref() else { break };
                    let Some(debug) = parsed.binaries.debug_file(id, root) else { break };
                    let Some(at) = virt_offset(&path, offset) else { break };
                    lookups.push((debug.path.clone(), Input::VirtOffset(at)));
                }
                let (file, input) = &lookups[attempt];
                let src = Source::Elf(Elf::new(file));
                let Ok(Symbolized::Sym(sym)) = parsed.blaze.symbolize_single(&src, *input) else { continue };
                frame.function = Some(sym.name.into_owned());
                if let Some(info) = sym.code_info {
                    frame.file = Some(info.to_path().display().to_string());
                    frame.line = info.line;
                }
                break;
            }
            // After the lookup, which may have parsed a large binary for a while.
            parsed.used = Instant::now();
            drop(parsed);
            frames.push(frame);
        }
        frames
    }
}

/// The address, as laid out in the ELF file `path` (no load bias), of its byte at
/// `offset`: from its program headers, which lie near the start of the file.
fn virt_offset(path: &Path, offset: u64) -> Option<u64> {
    use object::{elf::FileHeader64, read::elf::FileHeader as _, read::elf::ProgramHeader as _, Endianness};
    use std::io::Read as _;
    let mut head = Vec::with_capacity(64 * 1024);
    std::fs::File::open(path).ok()?.take(64 * 1024).read_to_end(&mut head).ok()?;
    let header = FileHeader64::<Endianness>::parse(head.as_slice()).ok()?;
    let endian = header.endian().ok()?;
    header.program_headers(endian, head.as_slice()).ok()?.iter().find_map(|ph| {
        let (start, size) = (ph.p_offset(endian), ph.p_filesz(endian));
        (ph.p_type(endian) == object::elf::PT_LOAD && (start..start + size).contains(&offset))
            .then(|| offset - start + ph.p_vaddr(endian))
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::procfs::{Mapping, ProcRoot};

    #[inline(never)]
    #[no_mangle]
    extern "C" fn leakmon_symbolize_probe_target() -> u64 {
        std::hint::black_box(7)
    }

    #[test]
    fn resolves_a_function_of_this_binary() {
        let address = leakmon_symbolize_probe_target as *const () as u64 + 1;
        let maps = ProcRoot::default().maps(std::process::id()).expect("maps");
        let frames = Symbolizer::default().frames(std::process::id(), &maps, None, &[address, 0x10, address]);
        assert_eq!(frames.len(), 1, "the stack ends at the unmapped address: {frames:?}");
        assert_eq!(frames[0].function.as_deref(), Some("leakmon_symbolize_probe_target"));
        assert_eq!(frames[0].address, address);
    }

    /// Whether this process maps `path` (blazesym maps each binary it parses).
    fn mapped(path: &Path) -> bool {
        ProcRoot::default().maps(std::process::id()).expect("maps").iter().any(|m| m.path == path)
    }

    #[test]
    fn parsed_binaries_are_dropped_once_idle_and_kept_while_used() {
        // A binary this test process has no other reason to map.
        let file = PathBuf::from("/usr/bin/python3.11");
        let file = std::fs::canonicalize(&file).unwrap_or(file);
        assert!(!mapped(&file), "{} is mapped before any symbolizing", file.display());
        let at = Mapping {
            start: 0x1000_0000,
            end: 0x1100_0000,
            offset: 0,
            executable: true,
            dev_major: 0,
            dev_minor: 0,
            inode: 0,
            path: file.clone(),
            deleted: false,
        };
        let symbolizer = Symbolizer::default();
        let frames = symbolizer.frames(std::process::id(), &[at], None, &[0x1001_0000]);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert!(mapped(&file), "blazesym maps the binary it parsed");
        assert!(!symbolizer.release_idle(Duration::from_secs(3600)), "used a moment ago");
        assert!(mapped(&file), "kept while in use");
        assert!(symbolizer.release_idle(Duration::ZERO));
        assert!(!mapped(&file), "{} still mapped after the release", file.display());
        assert!(!symbolizer.release_idle(Duration::ZERO), "nothing left to release");
    }

    /// A mapping of `file`'s bytes from `offset` to `end` as a process would have it.
    fn mapping_of(file: &Path, offset: u64, end: u64) -> Mapping {
        Mapping {
            start: 0x1000_0000,
            end: 0x1000_0000 + end - offset,
            offset,
            executable: true,
            dev_major: 0,
            dev_minor: 0,
            inode: 0,
            path: file.to_owned(),
            deleted: false,
        }
    }

    /// A library's owner (`nobody`, in a process of its own) truncates and restores it
    /// over and over while leakmon names addresses in it: leakmon must never touch a
    /// page the truncation took away (SIGBUS), and it names the library's functions all
    /// the while.
    #[test]
    fn a_library_its_owner_truncates_while_it_is_named_never_faults_leakmon() {
        use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
        let dir = tempfile::tempdir().expect("dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let (original, file) = (dir.path().join("original.so"), dir.path().join("libvictim.so"));
        std::fs::copy("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", &original).expect("libpython");
        std::fs::copy(&original, &file).expect("copy");
        std::os::unix::fs::chown(&file, Some(65534), Some(65534)).expect("chown to nobody");
        // Its code: the executable segment's bytes from .text's start.
        let at = mapping_of(&file, 0x10_4e10, 0x3d_3000);
        // The attacker: truncated for 0.2 ms, whole again for 2 ms, for 5 s; it says
        // how many rounds it made.
        const ATTACK: &str = "import sys, time
data = open(sys.argv[1], 'rb').read()
f = open(sys.argv[2], 'r+b')
rounds, end = 0, time.monotonic() + 5
while time.monotonic() < end:
    f.truncate(4096); f.flush(); time.sleep(0.0002)
    f.seek(0); f.write(data); f.flush(); time.sleep(0.002)
    rounds += 1
print(rounds)";
        let attacker = std::process::Command::new("/usr/bin/python3")
            .args(["-c", ATTACK])
            .arg(&original)
            .arg(&file)
            .uid(65534)
            .gid(65534)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the attacker as nobody");
        let started = Instant::now();
        let (mut lookups, mut named) = (0u64, 0u64);
        while started.elapsed() < Duration::from_secs(4) {
            let symbolizer = Symbolizer::default();
            for step in 0..64u64 {
                let address = at.start + 1 + (step * 104_729 + lookups * 7919) % (at.end - at.start - 1);
                let frames = symbolizer.frames(1, std::slice::from_ref(&at), None, &[address]);
                named += u64::from(frames.first().is_some_and(|f| f.function.is_some()));
                lookups += 1;
            }
        }
        let out = attacker.wait_with_output().expect("the attacker");
        assert!(out.status.success(), "the attacker failed: {out:?}");
        let rounds: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("rounds");
        assert!(rounds > 100, "the library was truncated only {rounds} times");
        // About a sixth of its code is named by exported symbols when left alone.
        assert!(named > 0, "none of {lookups} lookups named a function");
    }
}

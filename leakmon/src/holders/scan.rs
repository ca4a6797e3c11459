//! One scan of a process: its threads held still ([`super::stop`]), or held by the
//! report's tracer at its exit; its roots taken ([`super::roots`], plus each thread's
//! registers and TLS); the flood run ([`super::reach`]) within a budget; the process
//! let go; and what it found summed per allocation stack, with the raw facts that name
//! each holder (a root's address, a frame's return address), named after the process
//! runs again ([`super::names`]).

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::FileExt as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    reach::{flood, Block, Class, Memory, Reach, Root},
    roots::{roots, NamedRoot, RootKind},
    stop::Stopped,
};
use crate::procfs::ProcRoot;

/// An unfreed block as the kernel's live table knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Known {
    pub start: u64,
    /// Its size; `None` for a sampled block, whose table entry holds the bytes it
    /// stands for: then the allocator's header gives it ([`super::chunks::usable`]).
    pub size: Option<u64>,
    /// The bytes it counts for in its stack's figures.
    pub weight: u64,
    pub stack_id: u64,
    /// Whether its bytes count in its stack's figures (a block in flight does not; it
    /// still holds pointers).
    pub counted: bool,
}

/// The unfreed blocks of `pid`'s current image in the kernel's live table; those in
/// flight at `now_ms` where it still `runs` hold pointers but do not count.
pub fn known_blocks(
    probes: &crate::probes::Probes,
    pid: u32,
    now_ms: u64,
    runs: bool,
) -> Result<Vec<Known>, crate::probes::ProbeError> {
    let traced = probes.traced()?;
    let Some(gen) = traced.iter().find(|(p, _)| *p == pid).map(|(_, s)| s.gen) else { return Ok(Vec::new()) };
    let in_flight = crate::store::live::IN_FLIGHT_MS;
    Ok(probes
        .live(|tgid| tgid == pid)?
        .into_iter()
        .filter(|(_, b)| b.gen == gen)
        .map(|(key, b)| Known {
            start: key.addr,
            // A sampled block's entry holds the bytes it stands for.
            size: (b.rate == 0).then_some(b.size),
            weight: b.size,
            stack_id: b.stack_id,
            counted: !runs || now_ms.saturating_sub(b.ts_ms) >= in_flight,
        })
        .collect())
}

/// How one scan goes.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub hold: Hold,
    /// The longest the process may be held.
    pub budget: Duration,
    /// Whether blocks leakmon did not see allocated are taken from glibc's chunk
    /// headers (a running process watched for a window, or sampled; see
    /// [`super::chunks`]).
    pub glibc_chunks: bool,
    /// Whether the process ran before leakmon watched it (blocks it did not see may
    /// be in the way).
    pub window: bool,
}

/// The stack id a chain's block leakmon did not see allocated goes by.
pub const UNSEEN: u64 = u64::MAX;

/// How the process is held for the scan.
#[derive(Clone, Copy, Debug)]
pub enum Hold {
    /// Running: every thread is stopped for the scan, and let go after it.
    Stop,
    /// Held by leakmon's tracer at its exit stop (this thread): only it is left.
    AtExit(u32),
}

/// Bytes of each of memcheck's classes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Reachability {
    pub definitely_lost: u64,
    pub indirectly_lost: u64,
    pub possibly_lost: u64,
    pub reachable: u64,
}

impl Reachability {
    fn add(&mut self, class: Class, bytes: u64) {
        match class {
            Class::DefinitelyLost => self.definitely_lost += bytes,
            Class::IndirectlyLost => self.indirectly_lost += bytes,
            Class::PossiblyLost => self.possibly_lost += bytes,
            Class::Reachable => self.reachable += bytes,
        }
    }

    pub fn lost(&self) -> u64 {
        self.definitely_lost + self.indirectly_lost
    }
}

/// Where a chain starts, before it is named.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RootAt {
    /// A word at `address` of the data or bss of the object at `object`.
    Global { object: String, address: u64 },
    /// A word of thread `tid`'s stack, in the frame of the function that `pc` is in
    /// (a return address into it, one past its call; for the innermost frame, one past
    /// the thread's instruction pointer).
    Stack { tid: u32, pc: u64 },
    /// A word of thread `tid`'s thread-local storage.
    Tls { tid: u32 },
    /// One of thread `tid`'s registers.
    Register { tid: u32, name: &'static str },
}

/// Reachable bytes of one stack that one root holds through one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawHolder {
    pub bytes: u64,
    pub root: RootAt,
    /// The stack ids of the blocks between the root and the held block, outermost
    /// first, each once.
    pub path: Vec<u64>,
}

/// What a scan found for one allocation stack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackFound {
    pub reachability: Reachability,
    pub holders: Vec<RawHolder>,
}

/// What one scan found.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// How long the process was held.
    pub pause: Duration,
    /// How long the flood took of it: reading the roots and blocks.
    pub flood: Duration,
    pub threads: usize,
    /// Blocks known to leakmon, and blocks taken from the allocator's headers.
    pub blocks: usize,
    pub unseen_blocks: usize,
    /// Blocks not seen allocated could be in the way, and none was bounded (a window
    /// on a process whose allocator's headers are not read).
    pub unbounded: bool,
    /// Scanned at a command's exit, where only the exiting thread is left: other
    /// threads' stacks and registers were no roots.
    pub at_exit: bool,
    /// Sampled blocks whose size the allocator's header did not give: left out.
    pub no_size: usize,
    /// Bytes of roots and blocks read.
    pub scanned_bytes: u64,
    /// Whether the flood ran to its end within the budget; when not, no block is
    /// classified and `stacks` is empty.
    pub complete: bool,
    pub stacks: HashMap<u64, StackFound>,
}

/// Holders kept per stack, the largest.
pub const MAX_HOLDERS: usize = 5;
/// How far below the thread pointer a static TLS block may lie.
const TLS_BELOW: u64 = 1 << 20;
/// Bytes past the thread pointer: glibc's thread control block.
const TLS_ABOVE: u64 = 0x700;
/// Bytes below a stack word searched for the return address that names its frame.
const FRAME_SEARCH: u64 = 1 << 20;
/// Modules' entries read from a thread's dynamic thread vector.
const MAX_MODULES: u64 = 1024;
/// Where the registers are put for the flood: above every user address, so they
/// meet no block; one page per thread.
const REGISTERS: u64 = 0x8000_0000_0000_0000;
/// The fields of `user_regs_struct`, in order.
const REGISTER_NAMES: [&str; 27] = [
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
    "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
];

/// The process's memory through `/proc/PID/mem`, and its threads' registers at
/// [`REGISTERS`].
pub(crate) struct ProcessMemory {
    pid: nix::unistd::Pid,
    mem: File,
    registers: Vec<[u64; 27]>,
}

impl ProcessMemory {
    /// `pid`'s memory, `mem` its `/proc/PID/mem` (read where `process_vm_readv` cannot).
    pub(crate) fn new(pid: u32, mem: File) -> Self {
        Self { pid: nix::unistd::Pid::from_raw(pid as i32), mem, registers: Vec::new() }
    }
}

impl Memory for ProcessMemory {
    fn read_into(&self, start: u64, buf: &mut [u8]) -> Option<usize> {
        if start >= REGISTERS {
            let thread = ((start - REGISTERS) >> 12) as usize;
            let regs: Vec<u8> = self.registers.get(thread)?.iter().flat_map(|r| r.to_le_bytes()).collect();
            let n = buf.len().min(regs.len());
            buf[..n].copy_from_slice(&regs[..n]);
            return Some(n);
        }
        // process_vm_readv copies straight between the two address spaces, faster than
        // /proc/PID/mem's page at a time; a range it cannot read whole (a mapping
        // ends inside it) goes through /proc/PID/mem, which reads up to the end.
        let remote = [nix::sys::uio::RemoteIoVec { base: start as usize, len: buf.len() }];
        match nix::sys::uio::process_vm_readv(self.pid, &mut [std::io::IoSliceMut::new(buf)], &remote) {
            Ok(n) if n > 0 => Some(n),
            _ => self.mem.read_at(buf, start).ok(),
        }
    }
}

fn words_of(regs: &libc::user_regs_struct) -> [u64; 27] {
    let r = regs;
    [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx, r.rsi,
        r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds, r.es, r.fs, r.gs,
    ]
}

/// Scans process `pid` as `plan` says, its unfreed blocks `known`.
pub fn scan(proc_root: &ProcRoot, pid: u32, plan: Plan, mut known: Vec<Known>) -> Result<Outcome> {
    known.sort_by_key(|k| k.start);
    // Two entries for one address cannot both be live; the later ones are dropped.
    known.dedup_by_key(|k| k.start);
    // Read only: a scan writes nothing into the process.
    let mem = crate::ptrace::remote::open_mem_for(proc_root, pid, false)?;
    let stopped = match plan.hold {
        Hold::Stop => Some(Stopped::all(proc_root, pid)?),
        Hold::AtExit(_) => None,
    };
    fail::fail_point!("holders-stopped");
    let started = Instant::now();
    let threads: Vec<(u32, libc::user_regs_struct)> = match (&stopped, plan.hold) {
        (Some(s), _) => s.threads.iter().map(|t| (t.tid, t.regs)).collect(),
        (None, Hold::AtExit(tid)) => {
            let regs = nix::sys::ptrace::getregs(nix::unistd::Pid::from_raw(tid as i32))
                .with_context(|| format!("read the registers of pid {pid} at its exit"))?;
            vec![(tid, regs)]
        }
        (None, Hold::Stop) => unreachable!("stopped above"),
    };
    let maps = proc_root.maps_text(pid).with_context(|| format!("read the mappings of pid {pid}"))?;
    let memory = ProcessMemory {
        pid: nix::unistd::Pid::from_raw(pid as i32),
        mem,
        registers: threads.iter().map(|(_, r)| words_of(r)).collect(),
    };
    // The budget is the whole pause's, from the first thread held.
    let deadline = stopped.as_ref().map_or(started, |s| s.since) + plan.budget;
    let mut go_on = || Instant::now() < deadline;
    let flooding = Instant::now();
    let (blocks, owner, no_size, walked) = blocks_of(&memory, &maps, &known, plan.glibc_chunks, &mut go_on);
    let (named, ranges) = all_roots(&memory, &maps, &threads, &blocks);
    let mut reach = flood(&blocks, &ranges, &memory, &mut go_on);
    reach.complete &= walked;
    let mut outcome = Outcome {
        flood: flooding.elapsed(),
        threads: threads.len(),
        blocks: blocks.iter().filter(|b| b.known).count(),
        unseen_blocks: blocks.iter().filter(|b| !b.known).count(),
        no_size,
        at_exit: matches!(plan.hold, Hold::AtExit(_)),
        unbounded: plan.window && !plan.glibc_chunks,
        scanned_bytes: reach.words * 8,
        complete: reach.complete,
        ..Outcome::default()
    };
    if reach.complete {
        // Frames are found while the stacks are as they were.
        let held = Held { known: &known, owner: &owner, reach: &reach, origins: &named };
        outcome.stacks = held.per_stack(&threads, &memory, &maps);
    }
    outcome.pause = match &stopped {
        Some(s) => s.paused(),
        None => started.elapsed(),
    };
    drop(stopped);
    Ok(outcome)
}

/// The blocks to flood, in address order: the known ones (a sampled block sized by
/// its chunk header), and with `glibc_chunks` the other chunks glibc's headers give.
/// Also which known block each is (`None`: one from the headers), how many sampled
/// blocks had no size to be found (a header is the process's to forge: a size must
/// keep the block inside the mapping it starts in), and whether the headers' walk
/// ended within the budget `go_on` keeps.
fn blocks_of(
    memory: &dyn Memory,
    maps: &str,
    known: &[Known],
    glibc_chunks: bool,
    go_on: &mut dyn FnMut() -> bool,
) -> (Vec<Block>, Vec<Option<usize>>, usize, bool) {
    let mappings = writable(maps);
    let fits = |start: u64, size: u64| {
        let i = mappings.partition_point(|(_, e)| *e <= start);
        mappings.get(i).is_some_and(|(s, e)| *s <= start && size <= e - start)
    };
    let mut no_size = 0;
    let mut all: Vec<(Block, Option<usize>)> = Vec::with_capacity(known.len());
    for (i, k) in known.iter().enumerate() {
        let size = k.size.or_else(|| super::chunks::usable(memory, k.start).filter(|s| fits(k.start, *s)));
        match size {
            Some(size) => all.push((Block { start: k.start, size, known: true }, Some(i))),
            None => no_size += 1,
        }
    }
    let mut walked = true;
    if glibc_chunks {
        let seen: std::collections::HashSet<u64> = known.iter().map(|k| k.start).collect();
        match super::chunks::glibc_blocks(memory, maps, go_on) {
            Some(found) => {
                all.extend(found.into_iter().filter(|b| !seen.contains(&b.start)).map(|b| (b, None)))
            }
            None => walked = false,
        }
    }
    // Known blocks first where two start together; then none may overlap the one
    // before it (a header misread is what gives way).
    all.sort_by_key(|(b, owner)| (b.start, owner.is_none()));
    let mut kept: Vec<(Block, Option<usize>)> = Vec::with_capacity(all.len());
    for (b, owner) in all {
        match kept.last() {
            Some((last, _)) if last.start.saturating_add(last.size) > b.start => {
                if owner.is_some() && kept.last().is_some_and(|(_, o)| o.is_none()) {
                    kept.pop();
                    kept.push((b, owner));
                } else if owner.is_some() {
                    no_size += 1;
                }
            }
            _ => kept.push((b, owner)),
        }
    }
    let (blocks, owner) = kept.into_iter().unzip();
    (blocks, owner, no_size, walked)
}

/// The writable mappings of `maps`, in address order.
pub(crate) fn writable(maps: &str) -> Vec<(u64, u64)> {
    super::roots::regions(maps).into_iter().filter(|r| r.writable).map(|r| (r.start, r.end)).collect()
}

/// Where each root range comes from.
#[derive(Clone, Debug)]
enum Origin {
    Named(NamedRoot),
    Tls(usize),
    Registers(usize),
}

/// The roots, in the order their words are taken (a block reached by several is held
/// by the first): the objects' data, each thread's TLS, stacks, then registers.
fn all_roots(
    memory: &dyn Memory,
    maps: &str,
    threads: &[(u32, libc::user_regs_struct)],
    blocks: &[Block],
) -> (Vec<Origin>, Vec<Root>) {
    let sps: Vec<u64> = threads.iter().map(|(_, r)| r.rsp).collect();
    let found = roots(maps, &sps);
    let (globals, stacks): (Vec<_>, Vec<_>) =
        found.into_iter().partition(|r| matches!(r.kind, RootKind::Global(_)));
    let mut origins = Vec::new();
    let mut ranges = Vec::new();
    for g in globals {
        ranges.push(Root { start: g.start, end: g.end });
        origins.push(Origin::Named(g));
    }
    for (i, (_, regs)) in threads.iter().enumerate() {
        let low = static_tls_start(memory, regs.fs_base);
        if let Some(tls) = tls_range(maps, regs.fs_base, low, blocks) {
            ranges.push(tls);
            origins.push(Origin::Tls(i));
        }
    }
    for s in stacks {
        ranges.push(Root { start: s.start, end: s.end });
        origins.push(Origin::Named(s));
    }
    for i in 0..threads.len() {
        let start = REGISTERS + ((i as u64) << 12);
        ranges.push(Root { start, end: start + 27 * 8 });
        origins.push(Origin::Registers(i));
    }
    (origins, ranges)
}

/// A thread's static TLS and control block, around its thread pointer, within the
/// mapping that holds it, short of the blocks: a static program keeps its main
/// thread's at the start of its heap, before malloc's first chunk. `low` is where its
/// static TLS begins ([`static_tls_start`]); none where a block covers the thread
/// pointer (the TLS of a thread whose control block is itself a heap block is reached
/// through it).
fn tls_range(maps: &str, fs_base: u64, low: u64, blocks: &[Block]) -> Option<Root> {
    if fs_base == 0 {
        return None;
    }
    let (s, e) = super::roots::regions(maps)
        .into_iter()
        .find(|r| (r.start..r.end).contains(&fs_base))
        .map(|r| (r.start, r.end))?;
    let mut root = Root { start: low.max(s), end: fs_base.saturating_add(TLS_ABOVE).min(e) };
    // The blocks that end after the root starts, from the first.
    let from = blocks.partition_point(|b| b.start.saturating_add(b.size) <= root.start);
    for b in &blocks[from..] {
        if b.start >= root.end {
            break;
        }
        if b.start <= fs_base {
            if b.start.saturating_add(b.size) > fs_base {
                return None;
            }
            root.start = root.start.max(b.start.saturating_add(b.size));
        } else {
            root.end = b.start;
        }
    }
    Some(root)
}

/// Where a thread's static TLS begins, below its thread pointer `fs_base` (x86-64 lays
/// the modules' blocks out below it): the lowest module block its dynamic thread
/// vector names, as glibc keeps it (the control block's second word points one entry
/// into the vector, whose entry before holds its length; 16 bytes an entry). Without
/// one, the control block alone: a thread's stack lies right below its TLS, and a
/// guess too low would take stack words for TLS.
fn static_tls_start(memory: &dyn Memory, fs_base: u64) -> u64 {
    let word = |at: u64| {
        let b = memory.read(at, 8)?;
        Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
    };
    let lowest = || -> Option<u64> {
        // The thread pointer and what it points at are the process's to set.
        let dtv = word(fs_base.checked_add(8)?)?;
        let len = word(dtv.checked_sub(16)?)?.min(MAX_MODULES);
        let entries = memory.read(dtv.checked_add(16)?, (len * 16) as usize)?;
        entries
            .as_chunks::<16>()
            .0
            .iter()
            .map(|e| u64::from_le_bytes(e[..8].try_into().expect("8 bytes")))
            .filter(|&v| v < fs_base && v >= fs_base.saturating_sub(TLS_BELOW))
            .min()
    };
    lowest().unwrap_or(fs_base)
}

/// A complete flood, read per known block.
struct Held<'a> {
    known: &'a [Known],
    /// Per block flooded: which known block it is.
    owner: &'a [Option<usize>],
    reach: &'a Reach,
    origins: &'a [Origin],
}

impl Held<'_> {
    /// Sums the flood per stack id and gathers the holders of the reachable bytes.
    fn per_stack(
        &self,
        threads: &[(u32, libc::user_regs_struct)],
        memory: &ProcessMemory,
        maps: &str,
    ) -> HashMap<u64, StackFound> {
        let mut out: HashMap<u64, StackFound> = HashMap::new();
        let mut holders: HashMap<(u64, RootAt, Vec<u64>), u64> = HashMap::new();
        let mut frames = Frames { memory, code: executable(maps), threads, found: HashMap::new() };
        for (b, owner) in self.owner.iter().enumerate() {
            let Some(k) = owner.map(|i| &self.known[i]).filter(|k| k.counted) else { continue };
            let class = self.reach.class[b];
            out.entry(k.stack_id).or_default().reachability.add(class, k.weight);
            if class != Class::Reachable {
                continue;
            }
            let Some((root, at, chain)) = self.reach.chain(b) else { continue };
            let root = match &self.origins[root] {
                Origin::Named(NamedRoot { kind: RootKind::Global(object), .. }) => {
                    RootAt::Global { object: object.clone(), address: at }
                }
                Origin::Named(NamedRoot { kind: RootKind::Stack(t), .. }) => {
                    let (tid, _) = threads[*t];
                    RootAt::Stack { tid, pc: frames.pc(*t, at) }
                }
                Origin::Tls(t) => RootAt::Tls { tid: threads[*t].0 },
                Origin::Registers(t) => {
                    let word = ((at - REGISTERS) & 0xfff) / 8;
                    RootAt::Register { tid: threads[*t].0, name: REGISTER_NAMES[word as usize] }
                }
            };
            // Each site once, in the order the chain first meets it: a list's thousand
            // nodes are one site.
            let mut path: Vec<u64> = Vec::new();
            for &c in &chain[..chain.len() - 1] {
                let site = self.owner[c].map_or(UNSEEN, |i| self.known[i].stack_id);
                if !path.contains(&site) {
                    path.push(site);
                }
            }
            *holders.entry((k.stack_id, root, path)).or_default() += k.weight;
        }
        for ((stack, root, path), bytes) in holders {
            out.entry(stack).or_default().holders.push(RawHolder { bytes, root, path });
        }
        for found in out.values_mut() {
            found.holders.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.root.cmp(&b.root)));
        }
        out
    }
}

/// Which function's frame a word of a thread's stack belongs to, found from the
/// stack itself: a frame lies above the return address its function's next call
/// pushed, so the nearest return address below the word (a word pointing just past a
/// call instruction in executable memory) names it; with none, the thread is in that
/// function now. Read while the process is held.
struct Frames<'a> {
    memory: &'a ProcessMemory,
    /// The executable mappings.
    code: Vec<(u64, u64)>,
    threads: &'a [(u32, libc::user_regs_struct)],
    found: HashMap<(usize, u64), u64>,
}

impl Frames<'_> {
    fn pc(&mut self, thread: usize, at: u64) -> u64 {
        if let Some(&pc) = self.found.get(&(thread, at)) {
            return pc;
        }
        let regs = &self.threads[thread].1;
        // The frame is looked for within a bound below the word: a thread's stack is
        // the process's to size.
        let sp = regs.rsp.max(at.saturating_sub(FRAME_SEARCH));
        let mut pc = regs.rip.wrapping_add(1);
        if at > sp {
            let below = self.memory.read(sp, (at - sp) as usize).unwrap_or_default();
            let words: Vec<u64> = below.as_chunks::<8>().0.iter().map(|w| u64::from_le_bytes(*w)).collect();
            if let Some(&ret) = words.iter().rev().find(|&&w| self.returns_to(w)) {
                pc = ret;
            }
        }
        self.found.insert((thread, at), pc);
        pc
    }

    /// Whether `word` points just past a call instruction in executable memory.
    fn returns_to(&self, word: u64) -> bool {
        let at = word.wrapping_sub(1);
        if !self.code.iter().any(|(s, e)| (*s..*e).contains(&at)) {
            return false;
        }
        let Some(before) = self.memory.read(word - 7, 7).filter(|b| b.len() == 7) else { return false };
        let modrm_call = |b: u8| (b >> 3) & 7 == 2;
        // call rel32; call *reg / *(reg); call *disp8(reg); call *disp32(rip or reg).
        before[2] == 0xe8
            || (before[5] == 0xff && modrm_call(before[6]))
            || (before[4] == 0xff && modrm_call(before[5]))
            || (before[1] == 0xff && modrm_call(before[2]))
            || (before[0] == 0xff && modrm_call(before[1]))
    }
}

/// The executable mappings of `maps`.
fn executable(maps: &str) -> Vec<(u64, u64)> {
    super::roots::regions(maps).into_iter().filter(|r| r.executable).map(|r| (r.start, r.end)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::holders::reach::tests::Words;

    #[test]
    fn tls_is_clipped_to_its_mapping_and_short_of_the_blocks() {
        let maps = "\
10000-20000 rw-p 00000000 00:00 0
20000-40000 rw-p 00000000 00:00 0 [heap]
";
        let fs = 0x1_8000;
        let block = |start, size| Block { start, size, known: true };
        assert_eq!(tls_range(maps, fs, 0, &[]), Some(Root { start: 0x1_0000, end: fs + TLS_ABOVE }));
        assert_eq!(tls_range(maps, fs, 0x1_7000, &[]), Some(Root { start: 0x1_7000, end: fs + TLS_ABOVE }));
        assert_eq!(tls_range(maps, fs, 0, &[block(fs - 0x10, 0x20)]), None, "a block covers it");
        assert_eq!(
            tls_range(maps, fs, 0, &[block(0x1_7000, 16), block(fs + 0x100, 16), block(0x3_0000, 16)]),
            Some(Root { start: 0x1_7010, end: fs + 0x100 }),
            "short of the blocks around it"
        );
        // A static program's: at the heap's start.
        assert_eq!(
            tls_range(maps, 0x2_0400, 0x2_0100, &[block(0x2_0800, 64)]),
            Some(Root { start: 0x2_0100, end: 0x2_0800 })
        );
        assert_eq!(tls_range(maps, 0, 0, &[]), None);
    }

    /// glibc's dynamic thread vector names each module's TLS block; the lowest below the
    /// thread pointer starts the static TLS. Entries elsewhere (a dlopened module's
    /// block on the heap) are no bound; without a vector, the control block alone.
    #[test]
    fn static_tls_starts_at_the_lowest_module_block_below_the_thread_pointer() {
        let fs = 0x7000_0000_8000;
        let dtv = 0x5000_0000;
        let mut m = HashMap::from([(fs + 8, dtv), (dtv - 16, 3)]);
        m.insert(dtv + 16, fs - 0x80);
        m.insert(dtv + 32, fs - 0x900);
        m.insert(dtv + 48, 0x5000_1000);
        assert_eq!(static_tls_start(&Words::from(m), fs), fs - 0x900);
        assert_eq!(static_tls_start(&Words::default(), fs), fs);
    }
}

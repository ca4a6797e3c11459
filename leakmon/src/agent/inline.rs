//! Inline hooks: for allocator functions a program calls directly, with no GOT entry
//! between caller and callee (a statically linked program, a jemalloc built into the
//! executable as Redis and Rust programs do). The function's first instructions are
//! replaced by a jump to the agent's hook; a trampoline next to the program runs those
//! instructions, relocated, and jumps to the rest of the function.
//!
//! Only functions of the main executable are hooked this way: calls into a shared
//! library's allocator go through GOTs, which the agent redirects itself.
//!
//! What makes it safe in a running process:
//! - Every thread is stopped while entries are written, and none may be inside the
//!   bytes being replaced (the writer waits until none is).
//! - A function is hooked only if the replaced bytes are whole instructions that
//!   relocate (no branch into them from the rest of the function, none that ends it)
//!   and are byte for byte what its file holds: anything else is left alone.
//! - Taking the hooks off writes those bytes back; trampolines stay mapped, since a
//!   thread may be inside one. Which functions are hooked is read from the process
//!   again, so any leakmon can take off hooks another one put on.

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, FlowControl, Instruction, InstructionBlock,
};
use leakmon_common::agent::{HookKind, INLINE_SLOTS};
use nix::{
    errno::Errno,
    sys::{
        ptrace,
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};
use object::{Object as _, ObjectSymbol as _};

use crate::procfs::{Mapping, ProcRoot};
use crate::ptrace::remote::{open_mem, stack_word_in};

/// The jump written at a hooked entry: `jmp rel32`.
const ENTRY_JUMP: usize = 5;
/// `jmp [rip+0]` then the 8-byte target: reaches anywhere.
const FAR_JUMP: usize = 14;
/// Room per hook in the region next to the program: stub, then trampoline.
const PER_HOOK: u64 = 128;
/// How long the writer waits for every thread to be out of the bytes it replaces.
const QUIET_WAIT: Duration = Duration::from_secs(3);

/// An allocator entry point of the executable that can be hooked inline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub symbol: String,
    pub kind: HookKind,
    /// Its address in the process.
    pub entry: u64,
    /// The first instructions, as the file holds them: these are replaced.
    pub original: Vec<u8>,
    /// Those instructions, decoded at `entry`.
    instructions: Vec<Instruction>,
}

/// The executable's allocator entry points that can be hooked inline, one per address
/// (glibc's `malloc` and `__libc_malloc` are one function), at most [`INLINE_SLOTS`].
/// Entries that cannot be hooked safely are skipped with a debug line.
pub fn targets(proc_root: &ProcRoot, pid: u32, maps: &[Mapping]) -> Result<Vec<Target>> {
    let exe = executable(proc_root, pid)?;
    let root = proc_root.path().join(pid.to_string()).join("root");
    let Some(first) = maps.iter().find(|m| m.path == exe) else { return Ok(Vec::new()) };
    let data = crate::untrusted::read_binary(&first.open_path(&root))
        .with_context(|| format!("read {}", exe.display()))?;
    let file = object::File::parse(&*data).with_context(|| format!("parse {}", exe.display()))?;
    let mut found = BTreeMap::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        if !symbol.is_definition() || symbol.kind() != object::SymbolKind::Text {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        let Some(kind) = HookKind::of_symbol(name) else { continue };
        let Some((offset, code)) = crate::probes::targets::code_of(&file, &symbol) else { continue };
        let Some(mapping) = maps.iter().find(|m| {
            m.path == exe && m.executable && offset >= m.offset && offset < m.offset + (m.end - m.start)
        }) else {
            continue;
        };
        let entry = mapping.start + (offset - mapping.offset);
        if found.contains_key(&entry) {
            continue;
        }
        let size = usize::try_from(symbol.size()).unwrap_or(0).min(code.len());
        match prologue(&code[..size.max(ENTRY_JUMP).min(code.len())], entry) {
            Ok(instructions) => {
                let len: usize = instructions.iter().map(Instruction::len).sum();
                found.insert(
                    entry,
                    Target {
                        symbol: name.to_owned(),
                        kind,
                        entry,
                        original: code[..len].to_vec(),
                        instructions,
                    },
                );
            }
            Err(why) => tracing::debug!(pid, symbol = name, "no inline hook: {why}"),
        }
    }
    let mut targets: Vec<Target> = found.into_values().collect();
    if targets.len() > INLINE_SLOTS {
        tracing::debug!(pid, found = targets.len(), "more allocator entry points than inline slots");
        targets.truncate(INLINE_SLOTS);
    }
    Ok(targets)
}

/// The whole instructions at the start of `code` (a function at `entry`, its whole
/// body when the symbol gives a size) that the entry jump replaces, if they can move.
fn prologue(code: &[u8], entry: u64) -> Result<Vec<Instruction>, String> {
    let mut decoder = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut taken = Vec::new();
    let mut len = 0;
    while len < ENTRY_JUMP {
        if !decoder.can_decode() {
            return Err("the function is shorter than a jump".into());
        }
        let i = decoder.decode();
        if i.is_invalid() {
            return Err(format!("undecodable instruction at +{len}"));
        }
        len += i.len();
        let last = len >= ENTRY_JUMP;
        match i.flow_control() {
            FlowControl::Next | FlowControl::Call | FlowControl::ConditionalBranch => {}
            FlowControl::Return | FlowControl::UnconditionalBranch | FlowControl::IndirectBranch if last => {}
            other => return Err(format!("a {other:?} instruction among the first {ENTRY_JUMP} bytes")),
        }
        taken.push(i);
    }
    let end = entry + len as u64;
    // Nothing in the function may jump into the replaced bytes (past their first).
    let mut rest = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    for i in &mut rest {
        if matches!(
            i.flow_control(),
            FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch | FlowControl::Call
        ) {
            let target = i.near_branch_target();
            if target > entry && target < end {
                return Err(format!("a branch at {:#x} lands inside the first {len} bytes", i.ip()));
            }
        }
    }
    Ok(taken)
}

/// The trampoline for `target` at `at`: its replaced instructions, relocated, then a
/// jump to the rest of the function.
fn trampoline(target: &Target, at: u64) -> Result<Vec<u8>> {
    let block = InstructionBlock::new(&target.instructions, at);
    let encoded = BlockEncoder::encode(64, block, BlockEncoderOptions::NONE)
        .map_err(|e| anyhow!("relocate the start of {}: {e}", target.symbol))?;
    let mut code = encoded.code_buffer;
    code.extend_from_slice(&far_jump(target.entry + target.original.len() as u64));
    Ok(code)
}

fn far_jump(to: u64) -> [u8; FAR_JUMP] {
    let mut j = [0u8; FAR_JUMP];
    j[..6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
    j[6..].copy_from_slice(&to.to_le_bytes());
    j
}

/// `jmp rel32` at `from` to `to`, with int3 over the rest of `len` bytes.
fn entry_jump(from: u64, to: u64, len: usize) -> Result<Vec<u8>> {
    let rel = i64::try_from(to).unwrap_or(i64::MAX) - i64::try_from(from + ENTRY_JUMP as u64).unwrap_or(0);
    let rel = i32::try_from(rel)
        .map_err(|_| anyhow!("the stub at {to:#x} is out of a jump's reach of {from:#x}"))?;
    let mut j = vec![0xe9];
    j.extend_from_slice(&rel.to_le_bytes());
    j.resize(len, 0xcc);
    Ok(j)
}

/// Where the agent's symbols (functions and variables, local ones too) are in the
/// process: its file is read once.
pub struct AgentSymbols {
    path: PathBuf,
    addresses: std::collections::HashMap<String, u64>,
}

impl AgentSymbols {
    /// Reads them from the agent's file, mapped in the process at `base`.
    pub fn new(agent: &Path, base: u64) -> Result<Self> {
        let data = std::fs::read(agent).with_context(|| format!("read {}", agent.display()))?;
        let file = object::File::parse(&*data).with_context(|| format!("parse {}", agent.display()))?;
        let addresses = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter_map(|s| Some((s.name().ok()?.to_owned(), base + s.address())))
            .collect();
        Ok(Self { path: agent.to_owned(), addresses })
    }

    /// The address of `name`.
    pub fn get(&self, name: &str) -> Result<u64> {
        self.addresses
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("the agent at {} has no {name}", self.path.display()))
    }
}

/// Puts inline hooks on `targets` in `pid`: stubs and trampolines go to `region` (a
/// mapping within a jump's reach of every target, [`region_size`] bytes), the agent's
/// slots are filled, then the entries are written with every thread stopped (unless
/// `stopped`: the caller holds the process's only thread). Returns the hooked symbols.
pub fn hook(
    proc_root: &ProcRoot,
    pid: u32,
    targets: &[Target],
    agent: &AgentSymbols,
    region: u64,
    stopped: bool,
) -> Result<Vec<String>> {
    let mem = open_mem(proc_root, pid)?;
    let mut entries = Vec::new();
    for (slot, target) in targets.iter().enumerate().take(INLINE_SLOTS) {
        let stub = region + slot as u64 * PER_HOOK;
        let at = stub + FAR_JUMP as u64 + 2;
        let code = trampoline(target, at)?;
        if FAR_JUMP + 2 + code.len() > PER_HOOK as usize {
            bail!("the trampoline of {} is too long", target.symbol);
        }
        let mut bytes = far_jump(agent.get(&format!("leakmon_agent_inline_{slot}"))?).to_vec();
        bytes.extend_from_slice(&[0xcc, 0xcc]);
        bytes.extend_from_slice(&code);
        write(&mem, pid, stub, &bytes)?;
        write(&mem, pid, agent.get("leakmon_agent_inline_real")? + slot as u64 * 8, &at.to_le_bytes())?;
        write(
            &mem,
            pid,
            agent.get("leakmon_agent_inline_kind")? + slot as u64 * 4,
            &(target.kind as u32).to_le_bytes(),
        )?;
        entries.push((target, entry_jump(target.entry, stub, target.original.len())?));
    }
    let all = if stopped { None } else { Some(StoppedThreads::stop(proc_root, pid)?) };
    if let Some(all) = &all {
        let ranges: Vec<(u64, usize)> = targets.iter().map(|t| (t.entry, t.original.len())).collect();
        all.wait_out_of(&ranges)?;
        all.refuse_returns_into(&mem, &ranges)?;
    }
    let mut hooked = Vec::new();
    for (target, jump) in entries {
        // The process must still hold what the file does: anything else is somebody's.
        if read(&mem, target.entry, target.original.len())? != target.original {
            tracing::debug!(pid, symbol = target.symbol, "entry differs from its file: not hooked");
            continue;
        }
        write(&mem, pid, target.entry, &jump)?;
        hooked.push(target.symbol.clone());
    }
    Ok(hooked)
}

/// Takes off every inline hook in `pid`: each target whose entry holds a jump instead
/// of its file's bytes gets them back. Returns how many were restored.
pub fn unhook(proc_root: &ProcRoot, pid: u32, stopped: bool) -> Result<usize> {
    let maps = proc_root.maps(pid).with_context(|| format!("read the mappings of pid {pid}"))?;
    let targets = targets(proc_root, pid, &maps)?;
    let mem = open_mem(proc_root, pid)?;
    let mut hooked = Vec::new();
    for t in &targets {
        let now = read(&mem, t.entry, t.original.len())?;
        if now != t.original && now.first() == Some(&0xe9) {
            hooked.push(t);
        }
    }
    if hooked.is_empty() {
        return Ok(0);
    }
    // A thread may sit at an entry (about to jump) but never inside the jump's bytes,
    // and one in a trampoline comes back to the function's own code: no wait needed.
    let _all = if stopped { None } else { Some(StoppedThreads::stop(proc_root, pid)?) };
    for t in &hooked {
        write(&mem, pid, t.entry, &t.original)?;
    }
    Ok(hooked.len())
}

/// The bytes the region next to the program needs for `targets`.
pub fn region_size(targets: &[Target]) -> u64 {
    (targets.len() as u64 * PER_HOOK).div_ceil(4096).max(1) * 4096
}

/// The span of the executable's mappings in `pid`: the region must be within a jump's
/// reach (±2 GiB) of all of it.
pub fn executable_span(maps: &[Mapping], exe: &Path) -> Option<(u64, u64)> {
    let mine = maps.iter().filter(|m| m.path == exe);
    let lo = mine.clone().map(|m| m.start).min()?;
    let hi = mine.map(|m| m.end).max()?;
    Some((lo, hi))
}

/// The executable of `pid`, as its mappings name it.
pub fn executable(proc_root: &ProcRoot, pid: u32) -> Result<PathBuf> {
    std::fs::read_link(proc_root.path().join(pid.to_string()).join("exe"))
        .with_context(|| format!("read the executable of pid {pid}"))
}

fn read(mem: &File, addr: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0; len];
    mem.read_exact_at(&mut buf, addr).with_context(|| format!("read {len} bytes at {addr:#x}"))?;
    Ok(buf)
}

fn write(mem: &File, pid: u32, addr: u64, bytes: &[u8]) -> Result<()> {
    mem.write_all_at(bytes, addr).with_context(|| format!("write the memory of pid {pid} at {addr:#x}"))
}

/// Every thread of a process, stopped with ptrace; let go when dropped.
struct StoppedThreads {
    tids: Vec<Pid>,
}

impl StoppedThreads {
    /// Stops every thread, including threads started while stopping the others.
    fn stop(proc_root: &ProcRoot, pid: u32) -> Result<Self> {
        let mut all = Self { tids: Vec::new() };
        let mut held: HashSet<i32> = HashSet::new();
        loop {
            let tasks: Vec<i32> = std::fs::read_dir(proc_root.path().join(pid.to_string()).join("task"))
                .with_context(|| format!("list the threads of pid {pid}"))?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            let new: Vec<i32> = tasks.into_iter().filter(|t| !held.contains(t)).collect();
            if new.is_empty() {
                return Ok(all);
            }
            for tid in new {
                let t = Pid::from_raw(tid);
                match ptrace::seize(t, ptrace::Options::empty()) {
                    Ok(()) => {}
                    // Gone since it was listed.
                    Err(Errno::ESRCH) => {
                        held.insert(tid);
                        continue;
                    }
                    Err(Errno::EPERM) => bail!(
                        "ptrace of pid {pid} was refused (kernel.yama.ptrace_scope, or a missing CAP_SYS_PTRACE)"
                    ),
                    Err(e) => bail!("ptrace seize thread {tid} of pid {pid}: {e}"),
                }
                held.insert(tid);
                all.tids.push(t);
                ptrace::interrupt(t).with_context(|| format!("stop thread {tid}"))?;
                wait_stop(t)?;
            }
        }
    }

    /// Waits until no thread is inside any of `ranges` (start, length) past its first
    /// byte, letting the threads run a little between looks.
    fn wait_out_of(&self, ranges: &[(u64, usize)]) -> Result<()> {
        let deadline = Instant::now() + QUIET_WAIT;
        loop {
            let inside = self.tids.iter().find(|t| {
                ptrace::getregs(**t)
                    .is_ok_and(|r| ranges.iter().any(|(s, l)| r.rip > *s && r.rip < s + *l as u64))
            });
            let Some(&busy) = inside else { return Ok(()) };
            if Instant::now() > deadline {
                bail!("thread {busy} stayed inside an allocator's first instructions: nothing was hooked");
            }
            // A step takes it out of a few bytes of straight-line code.
            ptrace::step(busy, None).with_context(|| format!("step thread {busy}"))?;
            wait_stop(busy)?;
        }
    }
}

impl StoppedThreads {
    /// Refuses when a thread would come back into the bytes being replaced: a signal
    /// handler that interrupted it there returns into them (the signal frame holds
    /// that address), and so would a return address pointing there: each thread's
    /// stack is searched ([`stack_word_in`]) for a word inside any of `ranges` past its
    /// first byte.
    fn refuse_returns_into(&self, mem: &File, ranges: &[(u64, usize)]) -> Result<()> {
        for t in &self.tids {
            let Ok(regs) = ptrace::getregs(*t) else { continue };
            let inside = |w: u64| ranges.iter().any(|(s, l)| w > *s && w < s + *l as u64);
            if let Some(word) = stack_word_in(mem, regs.rsp, inside)
                .with_context(|| format!("thread {t}: nothing was hooked"))?
            {
                bail!(
                    "thread {t} would come back to {word:#x}, inside an allocator's first instructions (a signal handler interrupted it there): nothing was hooked"
                );
            }
        }
        Ok(())
    }
}

fn wait_stop(t: Pid) -> Result<()> {
    let deadline = Instant::now() + QUIET_WAIT;
    loop {
        match waitpid(t, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return Ok(()),
            Ok(WaitStatus::Stopped(_, sig)) if sig != nix::sys::signal::Signal::SIGTRAP => {
                // A signal arrived for it: deliver it and wait for the stop asked for.
                ptrace::cont(t, Some(sig)).with_context(|| format!("resume thread {t}"))?;
            }
            Ok(_) => return Ok(()),
            Err(Errno::ECHILD) => return Ok(()),
            Err(e) => bail!("wait for thread {t}: {e}"),
        }
        if Instant::now() > deadline {
            bail!("thread {t} did not stop within {QUIET_WAIT:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

impl Drop for StoppedThreads {
    fn drop(&mut self) {
        for t in &self.tids {
            let _ = ptrace::detach(*t, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(code: &[u8], entry: u64) -> Target {
        let instructions = prologue(code, entry).expect("hookable");
        let len: usize = instructions.iter().map(Instruction::len).sum();
        Target {
            symbol: "f".into(),
            kind: HookKind::Malloc,
            entry,
            original: code[..len].to_vec(),
            instructions,
        }
    }

    #[test]
    fn whole_instructions_are_taken_up_to_the_jump() {
        // endbr64; push rbp; mov rbp, rsp; ...
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0xc3];
        assert_eq!(decoded(&code, 0x1000).original, &code[..5]);
    }

    #[test]
    fn rip_relative_operands_keep_their_target_when_moved() {
        // mov rax, [rip+0x100]; ret
        let code = [0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0xc3];
        let t = decoded(&code, 0x40_0000);
        let at = 0x40_0000 - 0x10_0000;
        let moved = trampoline(&t, at).expect("relocates");
        let mut d = Decoder::with_ip(64, &moved, at, DecoderOptions::NONE);
        let first = d.decode();
        assert_eq!(first.ip_rel_memory_address(), 0x40_0000 + 7 + 0x100);
        // Then a jump back to the instruction after the moved one.
        assert_eq!(&moved[moved.len() - 8..], &(0x40_0000u64 + 7).to_le_bytes());
    }

    #[test]
    fn short_functions_and_branches_into_the_start_are_refused() {
        // xor eax, eax; ret; (the next function)
        assert!(prologue(&[0x31, 0xc0, 0xc3, 0x90, 0x90, 0x90], 0x1000).is_err());
        // push rbp; mov rbp, rsp; ... jmp back to +1
        let code = [0x55, 0x48, 0x89, 0xe5, 0x90, 0x90, 0xeb, 0xf9];
        assert!(prologue(&code, 0x1000).is_err(), "jmp to 0x1001");
    }

    #[test]
    fn the_entry_jump_reaches_its_stub_and_fills_the_rest() {
        let j = entry_jump(0x1000, 0x2000, 7).expect("in reach");
        assert_eq!(j, [0xe9, 0xfb, 0x0f, 0x00, 0x00, 0xcc, 0xcc]);
        assert!(entry_jump(0x1000, 0x1_0000_1000, 5).is_err());
    }
}

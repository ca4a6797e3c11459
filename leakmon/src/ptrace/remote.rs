//! Calling a function, or running a syscall, inside a running process, with one of its
//! threads borrowed at a safe point; what the agent's loading
//! ([`crate::agent::inject`]) and inline hooks ([`crate::agent::inline`]) are built on.
//!
//! The process must come out exactly as it went in, whatever happens to leakmon:
//! - One thread is borrowed, the main one, and only at a point where it holds no
//!   allocator or loader lock: blocked in (or entering) a syscall that waits, such as
//!   `epoll_wait` or `nanosleep`. A thread stopped inside `malloc` would deadlock on its
//!   own arena lock as soon as `dlopen` allocates. Other threads keep running (stopping
//!   them could leave the lock we need with one of them).
//! - The call runs in a trampoline written into a fresh mapping of the process: it
//!   saves the extended register state, calls the function, stores the result, restores
//!   every register and jumps back to where the thread was, on its own. The caller
//!   detaches before the call runs and only reads the result afterwards, so a caller
//!   killed at any point after that leaves a process that simply goes on. The short
//!   window before (one `mmap` run in the thread) is the only one in which a SIGKILLed
//!   caller leaves the borrowed thread at the wrong place; that caller is the agent's
//!   guardian ([`crate::agent::session`]), which ignores the signals that stop leakmon and
//!   outlives a leakmon that is killed.
//! - A syscall the thread was interrupted in is restarted as the kernel would have.

use std::{
    fs::File,
    os::unix::fs::FileExt as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::{
    errno::Errno,
    sys::{
        ptrace::{self, Options},
        signal::Signal,
        wait::WaitStatus,
    },
    unistd::Pid,
};

use crate::procfs::{Mapping, ProcRoot};

/// How long a thread may take to reach a syscall that waits.
const SAFE_POINT_WAIT: Duration = Duration::from_secs(3);
/// How long the called function may run (`dlopen` of a small library: milliseconds).
const CALL_WAIT: Duration = Duration::from_secs(30);

/// Syscalls in which a thread waits without holding a lock of the C library or the
/// dynamic loader. `futex` is not one: it may be waiting for exactly such a lock.
const WAITING_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_pause,
    libc::SYS_nanosleep,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_wait4,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigsuspend,
    libc::SYS_clock_nanosleep,
    libc::SYS_epoll_wait,
    libc::SYS_waitid,
    libc::SYS_pselect6,
    libc::SYS_ppoll,
    libc::SYS_epoll_pwait,
    libc::SYS_accept4,
    libc::SYS_epoll_pwait2,
];

const ENOSYS: i64 = libc::ENOSYS as i64;
const EINTR: i64 = libc::EINTR as i64;
// The kernel's own restart codes, which a syscall interrupted by a stop leaves in rax;
// never seen by a program, so in no C header.
const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;
const NR_MMAP: u64 = libc::SYS_mmap as u64;
const NR_CLOSE: u64 = libc::SYS_close as u64;
const NR_MUNMAP: u64 = libc::SYS_munmap as u64;
const NR_OPENAT: u64 = libc::SYS_openat as u64;
const AT_FDCWD: i64 = libc::AT_FDCWD as i64;
const NR_RESTART_SYSCALL: u64 = libc::SYS_restart_syscall as u64;

/// The trampoline's mapping: code, then its data, then the extended state area.
const REGION: u64 = 0x4000;
const DATA: u64 = 0x800;
const STRING: u64 = 0xa00;
const SAVED: u64 = 0x900;
const XSAVE: u64 = 0x1000;
const XSAVE_MAX: u32 = (REGION - XSAVE) as u32;
/// Bytes of a thread's stack read, from its stack pointer up, for return addresses and
/// signal frames (see [`stack_word_in`]).
const STACK_SCAN: usize = 256 << 10;

/// The first word of a thread's stack, from `rsp` up ([`STACK_SCAN`] bytes at most, or
/// to the end of its mapping), for which `inside` holds: a return address or a signal
/// frame's saved instruction pointer that would bring the thread back there (a stray
/// word that happens to match is a false alarm, never a miss). An error when the stack
/// cannot be read at all.
pub(crate) fn stack_word_in(mem: &File, rsp: u64, inside: impl Fn(u64) -> bool) -> Result<Option<u64>> {
    let mut stack = vec![0u8; STACK_SCAN];
    // /proc/PID/mem reads up to the end of the mapping and stops there.
    let read = mem.read_at(&mut stack, rsp).unwrap_or(0);
    if read == 0 {
        bail!("the stack at {rsp:#x} could not be read");
    }
    Ok(stack[..read].as_chunks::<8>().0.iter().map(|w| u64::from_le_bytes(*w)).find(|w| inside(*w)))
}

/// Where the allocator functions the agent needs live in a process.
pub struct Remote {
    pub(crate) pid: u32,
    pub(crate) mem: File,
}

impl Remote {
    pub fn new(proc_root: &ProcRoot, pid: u32) -> Result<Self> {
        if let Some(tracer) = proc_root.tracer(pid).map_err(|_| anyhow!("no process with pid {pid}"))? {
            bail!("pid {pid} is already traced by pid {tracer} (a debugger?): the agent cannot be loaded into it");
        }
        Ok(Self { pid, mem: open_mem(proc_root, pid)? })
    }

    /// The address of `symbol`, a function defined by a file the process maps
    /// executable (the first such file, in map order, that defines it).
    pub fn symbol(&self, maps: &[Mapping], root: &Path, symbol: &str, in_file: Option<&Path>) -> Option<u64> {
        let mut seen = std::collections::HashSet::new();
        for m in maps.iter().filter(|m| m.executable && m.path.is_absolute()) {
            if in_file.is_some_and(|f| f != m.path) || !seen.insert(&m.path) {
                continue;
            }
            let Ok(offset) = crate::probes::targets::function_offset(&m.open_path(root), symbol) else {
                continue;
            };
            let Some(offset) = offset else { continue };
            // The executable mapping of that file that holds the offset.
            let hit = maps.iter().find(|x| {
                x.path == m.path
                    && x.executable
                    && offset >= x.offset
                    && offset < x.offset + (x.end - x.start)
            });
            if let Some(x) = hit {
                return Some(x.start + (offset - x.offset));
            }
        }
        None
    }

    /// Runs `function(args...)` on the process's main thread and returns what it
    /// returned. See the module documentation for how the process is kept safe.
    pub fn call(&self, function: u64, args: [u64; 3], string: Option<&[u8]>) -> Result<u64> {
        let tid = Pid::from_raw(self.pid as i32);
        let xsave_size = xsave_size();
        if xsave_size > XSAVE_MAX {
            bail!(
                "this CPU's register state ({xsave_size} bytes) is larger than leakmon's trampoline allows"
            );
        }
        self.call_held(Held::seize(tid)?, function, args, string)
    }

    fn call_held(&self, mut held: Held, function: u64, args: [u64; 3], string: Option<&[u8]>) -> Result<u64> {
        let tid = held.tid;
        let (regs, resume) = held.safe_point()?;
        // Tests hold the thread here while they send it signals.
        fail::fail_point!("agent-thread-held");
        // One syscall run in the thread itself: a mapping for the trampoline.
        let mut sys = regs;
        sys.rip = resume.syscall_at;
        sys.rax = NR_MMAP;
        sys.orig_rax = u64::MAX;
        sys.rdi = 0;
        sys.rsi = REGION;
        sys.rdx = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        sys.r10 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        sys.r8 = u64::MAX;
        sys.r9 = 0;
        let region = match held.syscall(sys) {
            Ok(addr) if (addr as i64) < 0 && (addr as i64) > -4096 => {
                held.restore(&resume.regs)?;
                bail!("mmap in pid {} failed: {}", self.pid, Errno::from_raw(-(addr as i64) as i32));
            }
            Ok(addr) => addr,
            Err(e) => {
                let _ = held.restore(&resume.regs);
                return Err(e);
            }
        };
        let prepared = (|| -> Result<()> {
            let mut args = args;
            if let Some(s) = string {
                if s.len() >= (XSAVE - STRING) as usize {
                    bail!("the path of the agent is longer than {} bytes", XSAVE - STRING - 1);
                }
                let mut bytes = s.to_vec();
                bytes.push(0);
                self.write(region + STRING, &bytes)?;
                args[0] = region + STRING;
            }
            let code = trampoline(region, function, args, &resume.regs);
            fail::fail_point!("agent-call-write", |_| Err(anyhow!(
                "the write into pid {} failed (injected)",
                self.pid
            )));
            self.write(region, &code)?;
            self.write(region + SAVED, &saved_block(&resume.regs))
        })();
        if let Err(e) = prepared {
            // Nothing ran yet: the mapping goes, and the thread gets its own registers
            // back (not the mmap's, which it holds now) before it is let go.
            let mut unmap = regs;
            unmap.rip = resume.syscall_at;
            (unmap.rax, unmap.orig_rax, unmap.rdi, unmap.rsi) = (NR_MUNMAP, u64::MAX, region, REGION);
            let _ = held.syscall(unmap);
            held.restore(&resume.regs)?;
            return Err(e);
        }
        // Off it goes: into the trampoline, which comes back to `resume` by itself.
        let mut call = resume.regs;
        call.rip = region;
        call.orig_rax = u64::MAX;
        call.rsp = (resume.regs.rsp - 128 - 256) & !0xf;
        ptrace::setregs(tid, call).context("set the registers of the call")?;
        held.release()?;
        let deadline = Instant::now() + CALL_WAIT;
        loop {
            let mut done = [0u8; 16];
            self.mem
                .read_exact_at(&mut done, region + DATA)
                .map_err(|_| anyhow!("pid {} exited during the call", self.pid))?;
            if done[8] == 1 {
                self.unmap_region(region);
                return Ok(u64::from_le_bytes(done[..8].try_into().expect("8 bytes")));
            }
            if Instant::now() > deadline {
                bail!("the call in pid {} has not returned after {CALL_WAIT:?}", self.pid);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Unmaps a call's region once its thread has left it for good: held again at a
    /// safe point (so outside the region), with no word of its stack pointing into the
    /// region (a signal handler that interrupted the trampoline's last instructions
    /// returns there). Where either cannot be had, the page stays, mapped and never run
    /// again; a debug line says so.
    fn unmap_region(&self, region: u64) {
        let unmapped = self.with_syscalls(|sys| {
            if stack_word_in(&self.mem, sys.regs.rsp, |w| (region..region + REGION).contains(&w))?.is_some() {
                bail!("a frame of the thread still returns into it");
            }
            sys.run(NR_MUNMAP, [region, REGION, 0, 0, 0, 0]).map(drop)
        });
        if let Err(e) = unmapped {
            tracing::debug!(pid = self.pid, "the call's page at {region:#x} stays mapped: {e:#}");
        }
    }

    /// Borrows the main thread at a safe point to run `f` with syscalls in it, then
    /// puts it back where it was.
    pub(crate) fn with_syscalls<T>(&self, f: impl FnOnce(&mut Syscalls) -> Result<T>) -> Result<T> {
        let mut held = Held::seize(Pid::from_raw(self.pid as i32))?;
        let (regs, resume) = held.safe_point()?;
        let result = f(&mut Syscalls { remote: self, held: &mut held, regs, syscall_at: resume.syscall_at });
        held.restore(&resume.regs)?;
        result
    }

    pub(crate) fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut bytes = [0u8; 8];
        self.mem
            .read_exact_at(&mut bytes, addr)
            .with_context(|| format!("read the memory of pid {}", self.pid))?;
        Ok(u64::from_le_bytes(bytes))
    }

    pub(crate) fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.mem.write_all_at(bytes, addr).with_context(|| format!("write the memory of pid {}", self.pid))
    }
}

/// Syscalls run one at a time in a held thread (at a `syscall` instruction it has).
pub(crate) struct Syscalls<'a> {
    pub(crate) remote: &'a Remote,
    pub(crate) held: &'a mut Held,
    pub(crate) regs: libc::user_regs_struct,
    pub(crate) syscall_at: u64,
}

impl Syscalls<'_> {
    fn run(&mut self, nr: u64, args: [u64; 6]) -> Result<u64> {
        let mut r = self.regs;
        r.rip = self.syscall_at;
        r.rax = nr;
        r.orig_rax = u64::MAX;
        (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9) = (args[0], args[1], args[2], args[3], args[4], args[5]);
        let ret = self.held.syscall(r)?;
        if (ret as i64) < 0 && (ret as i64) > -4096 {
            bail!(
                "syscall {nr} in pid {} failed: {}",
                self.remote.pid,
                Errno::from_raw(-(ret as i64) as i32)
            );
        }
        Ok(ret)
    }

    /// A memory file named `name` (close-on-exec, sealable); its descriptor.
    pub(crate) fn memfd(&mut self, name: &str) -> Result<u64> {
        let scratch = self.map_anonymous(0, 4096, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let mut bytes = name.as_bytes().to_vec();
        bytes.truncate(200);
        bytes.push(0);
        let made = self.remote.write(scratch, &bytes).and_then(|()| {
            self.run(
                libc::SYS_memfd_create as u64,
                [scratch, u64::from(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING), 0, 0, 0, 0],
            )
        });
        let _ = self.run(NR_MUNMAP, [scratch, 4096, 0, 0, 0, 0]);
        made
    }

    pub(crate) fn close(&mut self, fd: u64) -> Result<()> {
        self.run(NR_CLOSE, [fd, 0, 0, 0, 0, 0]).map(drop)
    }

    pub(crate) fn map_anonymous(&mut self, at: u64, bytes: u64, prot: i32, flags: i32) -> Result<u64> {
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags) as u64;
        self.run(NR_MMAP, [at, bytes, prot as u64, flags, u64::MAX, 0])
    }

    /// Maps the shared object at `path` as a dynamic loader would (each loadable
    /// segment from the file, so that uprobes on it fire here too). It may have no
    /// relocations: a self-contained object built with `-Bsymbolic` has none. Returns
    /// its base.
    /// `opened`: the file's descriptor in the process already (a copy in a memory
    /// file), else it is opened there by `path`; only what is opened here is closed.
    pub(crate) fn map_library(&mut self, path: &Path, opened: Option<u64>) -> Result<u64> {
        use object::read::elf::{ElfFile64, FileHeader as _, ProgramHeader as _, SectionHeader as _};
        let data = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let elf = ElfFile64::<object::Endianness>::parse(&*data)
            .with_context(|| format!("parse {}", path.display()))?;
        let endian = elf.endian();
        let header = elf.elf_header();
        let relocated = header.sections(endian, &*data).is_ok_and(|sections| {
            sections.iter().any(|s| s.sh_type(endian) == object::elf::SHT_RELA && s.sh_size(endian) > 0)
        });
        if relocated {
            bail!("{} has relocations: it cannot be mapped without a dynamic loader", path.display());
        }
        let loads: Vec<_> = header
            .program_headers(endian, &*data)
            .context("program headers")?
            .iter()
            .filter(|ph| ph.p_type(endian) == object::elf::PT_LOAD)
            .map(|ph| {
                (
                    ph.p_vaddr(endian),
                    ph.p_offset(endian),
                    ph.p_filesz(endian),
                    ph.p_memsz(endian),
                    ph.p_flags(endian),
                )
            })
            .collect();
        let span = loads
            .iter()
            .map(|(v, _, _, m, _)| page_up(v + m))
            .max()
            .ok_or_else(|| anyhow!("{} has nothing to load", path.display()))?;
        let (fd, scratch) = match opened {
            Some(fd) => (fd, None),
            None => {
                let scratch = self.map_anonymous(0, 4096, libc::PROT_READ | libc::PROT_WRITE, 0)?;
                let mut name = path.as_os_str().as_encoded_bytes().to_vec();
                if name.len() >= 4096 {
                    bail!("the path {} is too long", path.display());
                }
                name.push(0);
                self.remote.write(scratch, &name)?;
                let flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
                (self.run(NR_OPENAT, [AT_FDCWD as u64, scratch, flags, 0, 0, 0])?, Some(scratch))
            }
        };
        let mapped = (|| -> Result<u64> {
            let base = self.map_anonymous(0, span, libc::PROT_NONE, 0)?;
            for &(vaddr, offset, filesz, memsz, flags) in &loads {
                let prot = [
                    (object::elf::PF_R, libc::PROT_READ),
                    (object::elf::PF_W, libc::PROT_WRITE),
                    (object::elf::PF_X, libc::PROT_EXEC),
                ]
                .iter()
                .filter(|(f, _)| flags & f != 0)
                .fold(0, |p, (_, b)| p | b);
                let start = vaddr & !0xfff;
                let file_end = page_up(vaddr + filesz);
                let fixed = (libc::MAP_PRIVATE | libc::MAP_FIXED) as u64;
                self.run(NR_MMAP, [base + start, file_end - start, prot as u64, fixed, fd, offset & !0xfff])?;
                let mem_end = page_up(vaddr + memsz);
                if mem_end > file_end {
                    self.map_anonymous(base + file_end, mem_end - file_end, prot, libc::MAP_FIXED)?;
                }
            }
            Ok(base)
        })();
        if let Some(scratch) = scratch {
            let _ = self.run(NR_CLOSE, [fd, 0, 0, 0, 0, 0]);
            let _ = self.run(NR_MUNMAP, [scratch, 4096, 0, 0, 0, 0]);
        }
        let base = mapped?;
        // The rest of the last file page of a segment whose memory is larger (.bss)
        // must read as zeros.
        for &(vaddr, _, filesz, memsz, _) in &loads {
            if memsz > filesz {
                let from = base + vaddr + filesz;
                let to = (base + page_up(vaddr + filesz)).min(base + vaddr + memsz);
                self.remote.write(from, &vec![0; (to - from) as usize])?;
            }
        }
        Ok(base)
    }

    /// A mapping of `bytes` (read and execute: leakmon writes through /proc/PID/mem)
    /// within a rel32 jump of all of [lo, hi): below it if there is room (above lies
    /// the heap brk grows), else above.
    pub(crate) fn map_near(&mut self, lo: u64, hi: u64, bytes: u64) -> Result<u64> {
        const STEP: u64 = 1 << 20;
        const REACH: u64 = 1 << 30;
        let below = (1..=REACH / STEP)
            .map(|k| lo.checked_sub(k * STEP + bytes))
            .take_while(Option::is_some)
            .flatten();
        let above = (1..=REACH / STEP).map(|k| hi + REACH / 4 + k * STEP);
        for at in below.filter(|a| *a >= 0x10000).chain(above).take(64) {
            match self.map_anonymous(at, bytes, libc::PROT_READ | libc::PROT_EXEC, libc::MAP_FIXED_NOREPLACE)
            {
                Ok(region) if region == at => return Ok(region),
                Ok(_) | Err(_) => {}
            }
        }
        bail!("pid {} has no room within a jump of its executable for inline hooks", self.remote.pid)
    }
}

/// A seized thread; detached when dropped, whatever happened.
pub(crate) struct Held {
    pub(crate) tid: Pid,
    pub(crate) released: bool,
    /// Held by somebody else's ptrace (leakmon's tracer of a command): never detached here.
    pub(crate) borrowed: bool,
    /// Signals that reached the thread while it was held, each once (standard signals
    /// do not queue): all are delivered when it goes, none is dropped for a later one.
    pub(crate) pending: Vec<Signal>,
    /// Held entering a syscall (its address past the `syscall` instruction): the next
    /// syscall run takes that one's place. Skipping it instead (number -1) runs the
    /// process's seccomp filters on -1, and an allowlist refuses it, writing its errno
    /// over the number set up for the next.
    pub(crate) entering: Option<u64>,
}

/// Where the borrowed thread goes back to, and the `syscall` instruction it was at.
struct Resume {
    regs: libc::user_regs_struct,
    syscall_at: u64,
}

impl Held {
    /// A thread that leakmon's [`super::tracer::Tracer`] holds stopped (at its entry
    /// point): used as it is, and never detached here.
    pub(crate) fn borrowed(tid: Pid) -> Self {
        Self { tid, released: false, pending: Vec::new(), borrowed: true, entering: None }
    }

    /// Seizes `tid`, with syscall stops told apart from signals.
    fn seize(tid: Pid) -> Result<Self> {
        match ptrace::seize(tid, Options::PTRACE_O_TRACESYSGOOD) {
            Ok(()) => Ok(Self { tid, released: false, pending: Vec::new(), borrowed: false, entering: None }),
            Err(Errno::EPERM) => Err(ptrace_refused(tid.as_raw() as u32)),
            Err(Errno::ESRCH) => bail!("pid {tid} exited"),
            Err(e) => bail!("ptrace seize pid {tid}: {e}"),
        }
    }

    /// Stops the thread at a syscall that waits; returns its registers there and the
    /// registers to go back to (the syscall re-issued where the kernel would restart
    /// it).
    fn safe_point(&mut self) -> Result<(libc::user_regs_struct, Resume)> {
        let tid = self.tid;
        ptrace::interrupt(tid).context("interrupt")?;
        let deadline = Instant::now() + SAFE_POINT_WAIT;
        loop {
            let Some(status) = self.wait(deadline)? else {
                bail!(
                    "its main thread did not wait in a syscall within {SAFE_POINT_WAIT:?} (busy computing, or inside the allocator): nothing was changed"
                );
            };
            match status {
                WaitStatus::PtraceEvent(_, _, e) if e == libc::PTRACE_EVENT_STOP => {
                    let regs = ptrace::getregs(tid).context("read registers")?;
                    if let Some(resume) = interrupted_in_wait(&regs) {
                        return Ok((regs, resume));
                    }
                }
                WaitStatus::PtraceSyscall(_) => {
                    let regs = ptrace::getregs(tid).context("read registers")?;
                    let entering = regs.rax as i64 == -ENOSYS;
                    if entering && WAITING_SYSCALLS.contains(&(regs.orig_rax as i64)) {
                        // Not run yet: going back means issuing it again.
                        let mut back = regs;
                        back.rip -= 2;
                        back.rax = regs.orig_rax;
                        back.orig_rax = u64::MAX;
                        self.entering = Some(regs.rip);
                        return Ok((regs, Resume { regs: back, syscall_at: regs.rip - 2 }));
                    }
                }
                WaitStatus::Stopped(_, signal) => {
                    // A signal on its way: it is delivered when the thread goes.
                    self.hold(signal);
                }
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    self.released = true;
                    bail!("the process exited");
                }
                _ => {}
            }
            if Instant::now() > deadline {
                bail!(
                    "its main thread did not wait in a syscall within {SAFE_POINT_WAIT:?} (busy computing, or inside the allocator): nothing was changed"
                );
            }
            // Not borrowed yet: what came is delivered at once.
            let deliver = (!self.pending.is_empty()).then(|| self.pending.remove(0));
            ptrace::syscall(tid, deliver).context("resume to the next syscall")?;
        }
    }

    /// Runs one syscall set up in `regs` (at a `syscall` instruction) and returns its
    /// result; the thread stays stopped after it.
    fn syscall(&mut self, regs: libc::user_regs_struct) -> Result<u64> {
        let tid = self.tid;
        let mut regs = regs;
        if let Some(past) = self.entering.take() {
            // In place of the syscall it is entering: its exit stop gives the result.
            (regs.orig_rax, regs.rip) = (regs.rax, past);
        }
        ptrace::setregs(tid, regs).context("set registers")?;
        let deadline = Instant::now() + SAFE_POINT_WAIT;
        let nr = regs.rax;
        loop {
            ptrace::syscall(tid, None).context("run a syscall")?;
            let Some(status) = self.wait(deadline)? else {
                bail!("pid {} did not finish a syscall within {SAFE_POINT_WAIT:?}", self.tid);
            };
            match status {
                // From a syscall-entry stop, the skipped syscall's exit comes first;
                // then this one's entry, then its exit.
                WaitStatus::PtraceSyscall(_) => {
                    let now = ptrace::getregs(tid).context("read registers")?;
                    if now.orig_rax == nr && now.rax as i64 != -ENOSYS {
                        return Ok(now.rax);
                    }
                }
                WaitStatus::Stopped(_, signal) => self.hold(signal),
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    self.released = true;
                    bail!("the process exited");
                }
                _ => {}
            }
        }
    }

    fn restore(&mut self, regs: &libc::user_regs_struct) -> Result<()> {
        ptrace::setregs(self.tid, *regs).context("restore registers")?;
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        self.released = true;
        if self.borrowed {
            return Ok(());
        }
        let detached = ptrace::detach(self.tid, self.pending.first().copied()).context("detach");
        self.deliver_the_rest();
        detached
    }

    fn hold(&mut self, signal: Signal) {
        if !self.pending.contains(&signal) {
            self.pending.push(signal);
        }
    }

    /// After a detach that delivered the first held signal: the others, sent to the
    /// thread again (the kernel delivers them as it would have).
    fn deliver_the_rest(&mut self) {
        for signal in self.pending.drain(..).skip(1) {
            // SAFETY: no pointers; the thread is the main thread of its process.
            unsafe {
                libc::syscall(libc::SYS_tgkill, self.tid.as_raw(), self.tid.as_raw(), signal as i32);
            }
        }
    }

    /// The thread's next stop, or `None` once `deadline` passes.
    fn wait(&mut self, deadline: Instant) -> Result<Option<WaitStatus>> {
        super::wait_until(self.tid, deadline).map_err(|e| anyhow!("wait for pid {}: {e}", self.tid))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.released || self.borrowed {
            return;
        }
        // With its own registers (nothing was set yet, or they were put back): letting
        // it go leaves it as it was. A running tracee (resumed to look for a syscall)
        // must stop before it can be detached.
        let first = self.pending.first().copied();
        let detached = ptrace::detach(self.tid, first);
        if detached.is_ok() {
            self.deliver_the_rest();
        }
        if detached == Err(Errno::ESRCH) {
            super::stop_and_detach(self.tid, |_| false);
        }
    }
}

/// The thread was stopped while blocked in a syscall that waits: the registers to go
/// back to, with the syscall restarted where the kernel restarts it.
fn interrupted_in_wait(regs: &libc::user_regs_struct) -> Option<Resume> {
    let nr = regs.orig_rax as i64;
    if nr < 0 || !WAITING_SYSCALLS.contains(&nr) {
        return None;
    }
    let mut back = *regs;
    match -(regs.rax as i64) {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            back.rip -= 2;
            back.rax = regs.orig_rax;
        }
        ERESTART_RESTARTBLOCK => {
            back.rip -= 2;
            back.rax = NR_RESTART_SYSCALL;
        }
        EINTR => {}
        _ => return None,
    }
    back.orig_rax = u64::MAX;
    Some(Resume { regs: back, syscall_at: regs.rip - 2 })
}

fn page_up(v: u64) -> u64 {
    (v + 0xfff) & !0xfff
}

/// Bytes of the extended register state `xsave` writes here (all enabled features).
fn xsave_size() -> u32 {
    std::arch::x86_64::__cpuid_count(0xd, 0).ebx
}

/// The registers the trampoline pops before it jumps back, in pop order.
fn saved_block(r: &libc::user_regs_struct) -> Vec<u8> {
    [
        r.r15, r.r14, r.r13, r.r12, r.r11, r.r10, r.r9, r.r8, r.rbp, r.rdi, r.rsi, r.rdx, r.rcx, r.rbx,
        r.rax, r.eflags,
    ]
    .iter()
    .flat_map(|v| v.to_le_bytes())
    .collect()
}

/// x86-64 code at `region`: save the extended state, call `function(args)`, store the
/// result and a done flag, restore everything and jump back to `back.rip` with
/// `back.rsp`.
fn trampoline(region: u64, function: u64, args: [u64; 3], back: &libc::user_regs_struct) -> Vec<u8> {
    let mut c: Vec<u8> = Vec::new();
    let mov_imm = |c: &mut Vec<u8>, prefix: &[u8], v: u64| {
        c.extend_from_slice(prefix);
        c.extend_from_slice(&v.to_le_bytes());
    };
    let xsave_area = region + XSAVE;
    // xsave64 [r11] with edx:eax = all features.
    mov_imm(&mut c, &[0x49, 0xbb], xsave_area); // mov r11, imm64
    c.extend_from_slice(&[0xb8, 0xff, 0xff, 0xff, 0xff]); // mov eax, -1
    c.extend_from_slice(&[0xba, 0xff, 0xff, 0xff, 0xff]); // mov edx, -1
    c.extend_from_slice(&[0x49, 0x0f, 0xae, 0x23]); // xsave64 [r11]
    mov_imm(&mut c, &[0x48, 0xbf], args[0]); // mov rdi
    mov_imm(&mut c, &[0x48, 0xbe], args[1]); // mov rsi
    mov_imm(&mut c, &[0x48, 0xba], args[2]); // mov rdx
    mov_imm(&mut c, &[0x48, 0xb8], function); // mov rax
    c.push(0xfc); // cld: the ABI's direction flag at a call
    c.extend_from_slice(&[0xff, 0xd0]); // call rax
    mov_imm(&mut c, &[0x49, 0xbb], region + DATA); // mov r11, result slot
    c.extend_from_slice(&[0x49, 0x89, 0x03]); // mov [r11], rax
    mov_imm(&mut c, &[0x49, 0xbb], xsave_area);
    c.extend_from_slice(&[0xb8, 0xff, 0xff, 0xff, 0xff]);
    c.extend_from_slice(&[0xba, 0xff, 0xff, 0xff, 0xff]);
    c.extend_from_slice(&[0x49, 0x0f, 0xae, 0x2b]); // xrstor64 [r11]
    mov_imm(&mut c, &[0x48, 0xbc], region + SAVED); // mov rsp, saved registers
    for pop in [
        &[0x41, 0x5f][..], // r15
        &[0x41, 0x5e],     // r14
        &[0x41, 0x5d],     // r13
        &[0x41, 0x5c],     // r12
        &[0x41, 0x5b],     // r11
        &[0x41, 0x5a],     // r10
        &[0x41, 0x59],     // r9
        &[0x41, 0x58],     // r8
        &[0x5d],           // rbp
        &[0x5f],           // rdi
        &[0x5e],           // rsi
        &[0x5a],           // rdx
        &[0x59],           // rcx
        &[0x5b],           // rbx
        &[0x58],           // rax
        &[0x9d],           // popfq
    ] {
        c.extend_from_slice(pop);
    }
    // mov rsp, [rip + rsp slot]; mov byte [rip + done], 1; jmp [rip + rip slot]
    let rsp_slot = region + DATA + 16;
    let rip_slot = region + DATA + 24;
    let done = region + DATA + 8;
    let rel = |at_end: u64, target: u64| (target.wrapping_sub(at_end) as i64 as i32).to_le_bytes();
    let here = region + c.len() as u64;
    c.extend_from_slice(&[0x48, 0x8b, 0x25]);
    c.extend_from_slice(&rel(here + 7, rsp_slot));
    let here = region + c.len() as u64;
    c.extend_from_slice(&[0xc6, 0x05]);
    c.extend_from_slice(&rel(here + 7, done));
    c.push(1);
    let here = region + c.len() as u64;
    c.extend_from_slice(&[0xff, 0x25]);
    c.extend_from_slice(&rel(here + 6, rip_slot));
    assert!(c.len() < DATA as usize);
    c.resize(DATA as usize, 0xcc);
    // Data: result, done, rsp, rip.
    c.extend_from_slice(&0u64.to_le_bytes());
    c.extend_from_slice(&0u64.to_le_bytes());
    c.extend_from_slice(&back.rsp.to_le_bytes());
    c.extend_from_slice(&back.rip.to_le_bytes());
    c
}

/// The memory of `pid`, which the kernel opens only to whoever may ptrace it.
pub(crate) fn open_mem(proc_root: &ProcRoot, pid: u32) -> Result<File> {
    open_mem_for(proc_root, pid, true)
}

/// [`open_mem`], for reading only unless `write`.
pub(crate) fn open_mem_for(proc_root: &ProcRoot, pid: u32, write: bool) -> Result<File> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(proc_root.path().join(pid.to_string()).join("mem"))
    {
        Ok(mem) => Ok(mem),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => Err(ptrace_refused(pid)),
        Err(e) => Err(e).with_context(|| format!("open the memory of pid {pid}")),
    }
}

pub(crate) fn ptrace_refused(pid: u32) -> anyhow::Error {
    anyhow!(
        "ptrace of pid {pid} was refused (another tracer, kernel.yama.ptrace_scope, or a missing CAP_SYS_PTRACE): nothing was changed"
    )
}

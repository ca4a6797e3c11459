//! Whether a process's seccomp filters let a load of the agent through. Every
//! container runs under a filter, and the default profiles (podman's, Docker's,
//! containerd's, Kubernetes' `RuntimeDefault`) allow what a load does; a service's own
//! (systemd's `SystemCallFilter=`, a sandbox) may not, and may kill the process for a
//! call it does not expect. So the decision is per filter: the filters of the thread a
//! load runs in are read through ptrace (`PTRACE_SECCOMP_GET_FILTER`, root only) and
//! run here, as the kernel would run them, on each call a load makes ([`CALLS`]: the
//! numbers and arguments measured on a load into a running process). A load goes on
//! only if every one is allowed.
//!
//! The filters are classic BPF; no maintained crate runs them (the seccomp crates
//! compile and install filters), so [`run`] is a small interpreter of the instructions
//! the kernel accepts in a filter.

use anyhow::{anyhow, bail, Context as _, Result};
use nix::{
    sys::{
        ptrace,
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};

use crate::procfs::ProcRoot;

/// One call a load makes in the process, and what it is for.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    pub nr: i64,
    pub args: [u64; 6],
    pub what: &'static str,
}

const AT_FDCWD: u64 = 0xffff_ff9c;
const FD: u64 = 3;
const ADDR: u64 = 0x7f00_0000_0000;
const PAGE: u64 = 4096;
const RWX: u64 = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
const RX: u64 = (libc::PROT_READ | libc::PROT_EXEC) as u64;
const RW: u64 = (libc::PROT_READ | libc::PROT_WRITE) as u64;
const R: u64 = libc::PROT_READ as u64;
const ANON: u64 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
const FILE: u64 = (libc::MAP_PRIVATE | libc::MAP_DENYWRITE) as u64;
const FILE_FIXED: u64 = (libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_DENYWRITE) as u64;

/// The calls a load makes, in order: leakmon's own (its scratch page, the trampolines'
/// region near the executable, a statically linked program's mapping of the
/// freestanding agent) and `dlopen`'s and the agent's start (glibc 2.36, measured with
/// the `raw_syscalls` tracepoint).
pub const CALLS: &[Call] = &[
    call(
        libc::SYS_mmap,
        [0, 4 * PAGE, RWX, ANON, u64::MAX, 0],
        "mapping of leakmon's scratch page (read, write, execute)",
    ),
    call(
        libc::SYS_openat,
        [AT_FDCWD, ADDR, (libc::O_RDONLY | libc::O_CLOEXEC) as u64, 0, 0, 0],
        "opening of the agent's file",
    ),
    call(libc::SYS_read, [FD, ADDR, 832, 0, 0, 0], "read of the agent's ELF header"),
    call(
        libc::SYS_newfstatat,
        [FD, ADDR, ADDR, libc::AT_EMPTY_PATH as u64, 0, 0],
        "stat of the agent's file",
    ),
    call(libc::SYS_mmap, [0, 64 * PAGE, R, FILE, FD, 0], "mapping of the agent's file"),
    call(
        libc::SYS_mmap,
        [ADDR, 16 * PAGE, RX, FILE_FIXED, FD, PAGE],
        "mapping of the agent's code (read, execute)",
    ),
    call(libc::SYS_mmap, [ADDR, 4 * PAGE, R, FILE_FIXED, FD, 16 * PAGE], "mapping of the agent's constants"),
    call(libc::SYS_mmap, [ADDR, 2 * PAGE, RW, FILE_FIXED, FD, 20 * PAGE], "mapping of the agent's data"),
    call(
        libc::SYS_mmap,
        [ADDR, PAGE, RW, ANON | libc::MAP_FIXED as u64, u64::MAX, 0],
        "mapping of the agent's zeroed data",
    ),
    call(libc::SYS_close, [FD, 0, 0, 0, 0, 0], "closing of the agent's file"),
    call(
        libc::SYS_mprotect,
        [ADDR, PAGE, R, 0, 0, 0],
        "protection of the agent's relocated data (read only)",
    ),
    call(
        libc::SYS_mmap,
        [0, 2048 * PAGE, RW, ANON | libc::MAP_NORESERVE as u64, u64::MAX, 0],
        "mapping of the agent's tables",
    ),
    call(libc::SYS_mprotect, [ADDR, PAGE, RW, 0, 0, 0], "opening of a call table for writing"),
    call(
        libc::SYS_mmap,
        [ADDR, 4 * PAGE, RX, ANON | libc::MAP_FIXED_NOREPLACE as u64, u64::MAX, 0],
        "mapping of the hooks' trampolines (read, execute)",
    ),
    call(
        libc::SYS_mmap,
        [0, 32 * PAGE, libc::PROT_NONE as u64, ANON, u64::MAX, 0],
        "reservation for the freestanding agent (a static program)",
    ),
    call(
        libc::SYS_mmap,
        [ADDR, 16 * PAGE, RX, (libc::MAP_PRIVATE | libc::MAP_FIXED) as u64, FD, 0],
        "mapping of the freestanding agent's code (a static program)",
    ),
    call(
        libc::SYS_mmap,
        [ADDR, 4 * PAGE, R, (libc::MAP_PRIVATE | libc::MAP_FIXED) as u64, FD, 16 * PAGE],
        "mapping of the freestanding agent's constants",
    ),
    call(
        libc::SYS_mmap,
        [ADDR, 2 * PAGE, RW, (libc::MAP_PRIVATE | libc::MAP_FIXED) as u64, FD, 20 * PAGE],
        "mapping of the freestanding agent's data",
    ),
    call(libc::SYS_munmap, [ADDR, 4 * PAGE, 0, 0, 0, 0], "unmapping of leakmon's scratch page"),
];

const fn call(nr: i64, args: [u64; 6], what: &'static str) -> Call {
    Call { nr, args, what }
}

/// `AUDIT_ARCH_X86_64`: the architecture the filters are told.
const ARCH: u32 = 0xc000_003e;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// What the kernel makes of a filter's return value (its action bits).
const RET_ACTION_FULL: u32 = 0xffff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

/// The `struct seccomp_data` of `call`.
fn data(call: &Call) -> [u8; 64] {
    let mut d = [0u8; 64];
    d[..4].copy_from_slice(&(call.nr as i32).to_le_bytes());
    d[4..8].copy_from_slice(&ARCH.to_le_bytes());
    for (i, a) in call.args.iter().enumerate() {
        d[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    d
}

/// Runs one filter on `data` as the kernel does; `None` for an instruction the kernel
/// would not have accepted (the filter is then not understood, and the load refused).
pub fn run(filter: &[Insn], data: &[u8; 64]) -> Option<u32> {
    let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0usize;
    // Jumps go forward only, so a filter ends within its length.
    while let Some(&Insn { code, jt, jf, k }) = filter.get(pc) {
        pc += 1;
        let src = if code & 0x08 != 0 { x } else { k };
        match code {
            // BPF_LD | BPF_W | BPF_ABS: a 32-bit word of the data.
            0x20 => {
                let at = k as usize;
                a = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?);
            }
            0x80 => a = 64,
            0x81 => x = 64,
            0x00 => a = k,
            0x01 => x = k,
            0x60 => a = *mem.get(k as usize)?,
            0x61 => x = *mem.get(k as usize)?,
            0x02 => *mem.get_mut(k as usize)? = a,
            0x03 => *mem.get_mut(k as usize)? = x,
            // BPF_ALU, with K or X.
            c if c & 0x07 == 0x04 => {
                a = match c & 0xf0 {
                    0x00 => a.wrapping_add(src),
                    0x10 => a.wrapping_sub(src),
                    0x20 => a.wrapping_mul(src),
                    0x30 => a.checked_div(src)?,
                    0x40 => a | src,
                    0x50 => a & src,
                    0x60 => a.checked_shl(src).unwrap_or(0),
                    0x70 => a.checked_shr(src).unwrap_or(0),
                    0x80 => a.wrapping_neg(),
                    0x90 => a.checked_rem(src)?,
                    0xa0 => a ^ src,
                    _ => return None,
                }
            }
            // BPF_JMP: JA, then JEQ, JGT, JGE, JSET with K or X.
            0x05 => pc = pc.checked_add(k as usize)?,
            c if c & 0x07 == 0x05 => {
                let taken = match c & 0xf0 {
                    0x10 => a == src,
                    0x20 => a > src,
                    0x30 => a >= src,
                    0x40 => a & src != 0,
                    _ => return None,
                };
                pc += usize::from(if taken { jt } else { jf });
            }
            0x06 => return Some(k),
            0x16 => return Some(a),
            0x07 => x = a,
            0x87 => a = x,
            _ => return None,
        }
    }
    None
}

/// What a chain of filters does with `call`: the action of highest precedence among
/// theirs, as the kernel takes it (`None`: a filter not understood).
pub fn action(filters: &[Vec<Insn>], call: &Call) -> Option<u32> {
    let data = data(call);
    let mut worst = RET_ALLOW;
    for f in filters {
        let ret = run(f, &data)?;
        if ((ret & RET_ACTION_FULL) as i32) < ((worst & RET_ACTION_FULL) as i32) {
            worst = ret;
        }
    }
    Some(worst)
}

/// What an action does to a call, in words; `None` where it goes through.
fn refusal(ret: u32) -> Option<String> {
    Some(match ret & RET_ACTION_FULL {
        RET_ALLOW | RET_LOG => return None,
        RET_KILL_PROCESS => "kill the process for".to_owned(),
        RET_KILL_THREAD => "kill the thread for".to_owned(),
        RET_TRAP => "send SIGSYS for".to_owned(),
        RET_ERRNO => {
            let errno = (ret & 0xffff) as i32;
            format!("refuse ({}) ", nix::errno::Errno::from_raw(errno).desc()).trim_end().to_owned()
        }
        RET_USER_NOTIF => "hand to its supervisor".to_owned(),
        RET_TRACE => "hand to a tracer".to_owned(),
        other => format!("answer {other:#x} to"),
    })
}

/// The name of syscall `nr`, for the one line.
fn name(nr: i64) -> &'static str {
    match nr {
        libc::SYS_mmap => "mmap",
        libc::SYS_openat => "openat",
        libc::SYS_read => "read",
        libc::SYS_newfstatat => "newfstatat",
        libc::SYS_close => "close",
        libc::SYS_mprotect => "mprotect",
        libc::SYS_munmap => "munmap",
        libc::SYS_memfd_create => "memfd_create",
        _ => "a syscall",
    }
}

/// The first of [`CALLS`] that `filters` would not let through, in one line.
pub fn first_refused(filters: &[Vec<Insn>]) -> Option<String> {
    CALLS.iter().find_map(|c| match action(filters, c) {
        None => Some(format!("leakmon does not understand its seccomp filter (on the {})", c.what)),
        Some(ret) => {
            refusal(ret).map(|r| format!("its seccomp filter would {r} {} ({})", name(c.nr), c.what))
        }
    })
}

/// Refuses, in one line, a process whose seccomp filters would not let every call of
/// a load through; a process without a filter, or whose filters allow them all, goes.
pub fn check(proc_root: &ProcRoot, pid: u32) -> Result<()> {
    let status = proc_root.status(pid).map_err(|_| anyhow!("no process with pid {pid}"))?;
    match status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map_or("0", str::trim) {
        "0" => Ok(()),
        "1" => bail!(
            "pid {pid} runs in seccomp's strict mode (read, write and exit only): the agent is not loaded"
        ),
        _ => {
            let filters = filters(pid)?;
            match first_refused(&filters) {
                Some(why) => bail!("pid {pid}: {why}: the agent is not loaded, nothing was changed"),
                None => Ok(()),
            }
        }
    }
}

/// `PTRACE_SECCOMP_GET_FILTER`, in no libc binding.
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
/// Filters read at most (the kernel allows a chain of 32 KiB instructions in all).
const MAX_FILTERS: usize = 512;

/// The seccomp filters of `pid`'s main thread, newest first: the thread is held in a
/// ptrace stop for the read and let go.
pub fn filters(pid: u32) -> Result<Vec<Vec<Insn>>> {
    let tid = Pid::from_raw(pid as i32);
    match ptrace::seize(tid, ptrace::Options::empty()) {
        Ok(()) => {}
        Err(nix::errno::Errno::EPERM) => {
            bail!("pid {pid} may not be traced by leakmon (another tracer holds it, or it is not leakmon's to trace): its seccomp filter was not read")
        }
        Err(e) => bail!("ptrace seize pid {pid}: {e}"),
    }
    let read = (|| -> Result<Vec<Vec<Insn>>> {
        ptrace::interrupt(tid).context("interrupt")?;
        loop {
            match waitpid(tid, Some(WaitPidFlag::__WALL)).context("wait for the stop")? {
                WaitStatus::PtraceEvent(..) => break,
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => bail!("pid {pid} exited"),
                // A signal on its way: it gets it once let go.
                WaitStatus::Stopped(_, _) => ptrace::interrupt(tid).context("interrupt")?,
                _ => {}
            }
        }
        let mut all = Vec::new();
        for index in 0..MAX_FILTERS {
            // SAFETY: a null buffer asks for the count only.
            let n = unsafe {
                libc::ptrace(
                    PTRACE_SECCOMP_GET_FILTER,
                    pid as libc::pid_t,
                    index,
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            if n < 0 {
                let e = nix::errno::Errno::last();
                if e == nix::errno::Errno::ENOENT {
                    return Ok(all);
                }
                bail!("read the seccomp filter of pid {pid}: {e}");
            }
            let mut raw = vec![0u64; n as usize];
            // SAFETY: room for the n 8-byte instructions the kernel said it has.
            let got = unsafe {
                libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid as libc::pid_t, index, raw.as_mut_ptr())
            };
            if got != n {
                bail!("read the seccomp filter of pid {pid}: {}", nix::errno::Errno::last());
            }
            all.push(
                raw.into_iter()
                    .map(|w| {
                        let b = w.to_le_bytes();
                        Insn {
                            code: u16::from_le_bytes([b[0], b[1]]),
                            jt: b[2],
                            jf: b[3],
                            k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                        }
                    })
                    .collect(),
            );
        }
        bail!("pid {pid} has more than {MAX_FILTERS} seccomp filters")
    })();
    let _ = ptrace::detach(tid, None);
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(code: u16, k: u32) -> Insn {
        Insn { code, jt: 0, jf: 0, k }
    }

    fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
        Insn { code, jt, jf, k }
    }

    /// The filter of tests/fixtures/seccomp_target.c: an executable mapping refused.
    fn no_exec_mappings() -> Vec<Insn> {
        vec![
            stmt(0x20, 0),
            jump(0x15, libc::SYS_mmap as u32, 0, 3),
            stmt(0x20, 16 + 2 * 8),
            jump(0x45, libc::PROT_EXEC as u32, 0, 1),
            stmt(0x06, RET_ERRNO | libc::EPERM as u32),
            stmt(0x06, RET_ALLOW),
        ]
    }

    /// A container's kind: the architecture checked, a few calls refused.
    fn container_default() -> Vec<Insn> {
        vec![
            stmt(0x20, 4),
            jump(0x15, ARCH, 1, 0),
            stmt(0x06, RET_KILL_PROCESS),
            stmt(0x20, 0),
            jump(0x15, libc::SYS_kexec_load as u32, 2, 0),
            jump(0x15, libc::SYS_mount as u32, 1, 0),
            stmt(0x06, RET_ALLOW),
            stmt(0x06, RET_ERRNO | libc::EPERM as u32),
        ]
    }

    #[test]
    fn a_filter_refusing_executable_mappings_is_named_by_its_call() {
        let why = first_refused(&[no_exec_mappings()]).expect("refused");
        assert_eq!(
            why,
            "its seccomp filter would refuse (Operation not permitted) mmap (mapping of leakmon's scratch page (read, write, execute))"
        );
        let read = CALLS.iter().find(|c| c.nr == libc::SYS_read).expect("a read");
        assert_eq!(action(&[no_exec_mappings()], read), Some(RET_ALLOW));
    }

    /// An allowlist (podman's and Docker's profiles are written so) that lists what
    /// a load calls lets it through, whatever it does with the rest.
    #[test]
    fn an_allowlist_of_the_load_s_calls_lets_it_through() {
        let allowlist = |default: u32| {
            let mut f = vec![stmt(0x20, 0)];
            let listed = [
                libc::SYS_mmap,
                libc::SYS_openat,
                libc::SYS_read,
                libc::SYS_newfstatat,
                libc::SYS_close,
                libc::SYS_mprotect,
                libc::SYS_munmap,
            ];
            for (i, nr) in listed.iter().enumerate() {
                f.push(jump(0x15, *nr as u32, (listed.len() - i) as u8, 0));
            }
            f.push(stmt(0x06, default));
            f.push(stmt(0x06, RET_ALLOW));
            f
        };
        assert_eq!(first_refused(&[allowlist(RET_ERRNO | libc::ENOSYS as u32)]), None);
        assert_eq!(first_refused(&[allowlist(RET_KILL_PROCESS)]), None);
        let mut short = allowlist(RET_KILL_PROCESS);
        short[4].k = libc::SYS_getpid as u32; // newfstatat no longer listed
        assert_eq!(
            first_refused(&[short]).as_deref(),
            Some("its seccomp filter would kill the process for newfstatat (stat of the agent's file)")
        );
    }

    #[test]
    fn a_container_s_default_filter_lets_a_load_through() {
        assert_eq!(first_refused(&[container_default()]), None);
        let mount = call(libc::SYS_mount, [0; 6], "mount");
        assert_eq!(action(&[container_default()], &mount), Some(RET_ERRNO | libc::EPERM as u32));
    }

    /// Of several filters the strictest answer counts: a kill over a refusal over an
    /// allow, whichever filter says it.
    #[test]
    fn the_strictest_of_several_filters_counts() {
        let kill_mmap = vec![
            stmt(0x20, 0),
            jump(0x15, libc::SYS_mmap as u32, 0, 1),
            stmt(0x06, RET_KILL_PROCESS),
            stmt(0x06, RET_ALLOW),
        ];
        let scratch = CALLS.iter().find(|c| c.nr == libc::SYS_mmap).expect("the scratch page");
        assert_eq!(action(&[no_exec_mappings(), kill_mmap.clone()], scratch), Some(RET_KILL_PROCESS));
        assert_eq!(action(&[kill_mmap, no_exec_mappings()], scratch), Some(RET_KILL_PROCESS));
        assert!(first_refused(&[container_default(), no_exec_mappings()]).is_some());
    }

    /// Arithmetic, scratch memory and X: a filter comparing the high word of an
    /// argument through them; and an instruction no filter may hold is not guessed at.
    #[test]
    fn the_interpreter_follows_alu_memory_and_x_and_refuses_what_it_cannot_run() {
        let filter = vec![
            stmt(0x20, 16 + 8 + 4), // A = the high word of args[1]
            stmt(0x02, 3),          // M[3] = A
            stmt(0x01, 0x7f00),     // X = 0x7f00
            stmt(0x00, 0),          // A = 0
            stmt(0x60, 3),          // A = M[3]
            stmt(0x54, 0xff00),     // A &= 0xff00
            jump(0x1d, 0, 0, 1),    // A == X?
            stmt(0x06, RET_ALLOW),
            stmt(0x06, RET_TRAP),
        ];
        let mut call = *CALLS.iter().find(|c| c.nr == libc::SYS_openat).expect("an openat");
        call.args[1] = 0x0000_7f00_0000_0000;
        assert_eq!(run(&filter, &data(&call)), Some(RET_ALLOW));
        call.args[1] = 0x0000_7e00_0000_0000;
        assert_eq!(run(&filter, &data(&call)), Some(RET_TRAP));
        assert_eq!(run(&[stmt(0xff, 0)], &data(&call)), None);
        assert_eq!(run(&[stmt(0x20, 64)], &data(&call)), None);
    }
}

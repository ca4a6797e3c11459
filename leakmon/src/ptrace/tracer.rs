//! Holding traced processes at their exit, so their mappings can still be read.
//!
//! A process's memory map vanishes with it, and with it the means to turn its stack
//! addresses into names. ptrace's exit stop (`PTRACE_O_TRACEEXIT`) holds each process
//! of a `report` session just before its address space is torn down; the caller reads
//! /proc/PID/maps then. Only fork, exec and exit stop the tracee, plus one breakpoint
//! at each new image's entry point (its libraries are mapped by then and its own code
//! has not run: the moment to read its mappings for stack unwinding). No syscall
//! tracing, so the cost is nil between those events.
//!
//! Only each process's first thread is traced: every signal to a traced thread stops it
//! until the caller next polls, and a program whose threads take per-thread timer
//! signals ran at a quarter of its speed with all of them traced. A child forked from
//! another thread is therefore not held; the kernel side still counts it (it follows
//! forks itself) and a report names its stacks by its parent's mappings.
//!
//! All ptrace calls must come from the thread that attached; callers keep the tracer on
//! one thread.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    os::unix::process::CommandExt as _,
    process::Command,
};

use nix::{
    errno::Errno,
    sys::{
        ptrace::{self, Options},
        signal::Signal,
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};

/// Errors of the tracer.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    /// The command could not be started.
    #[error("cannot start command {command}")]
    Spawn { command: String, source: std::io::Error },
    /// A ptrace or wait call failed.
    #[error("{call} pid {pid}")]
    Ptrace { call: &'static str, pid: i32, source: Errno },
}

fn err(call: &'static str, pid: Pid) -> impl FnOnce(Errno) -> TracerError {
    move |source| TracerError::Ptrace { call, pid: pid.as_raw(), source }
}

/// A stop at which the caller may look at a process before it goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Just after an exec: the new executable and the dynamic linker are mapped, no
    /// library yet, no instruction of the program has run.
    Exec,
    /// At the new image's entry point: the dynamic linker has mapped its libraries and
    /// run their constructors; the program's own code has not run.
    Entry,
    /// A new child's first stop, before its first instruction.
    Fork,
    /// Just before exit: the address space is still in place.
    Exit,
}

/// How the root process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootExit {
    Code(i32),
    Signal(Signal),
}

/// The processes of one session.
pub struct Tracer {
    root: Pid,
    /// Processes whose first stop was seen (a new child's first stop is its attach
    /// stop, to be swallowed, not a signal to deliver).
    seen: HashSet<Pid>,
    root_exit: Option<RootExit>,
    /// Entry-point breakpoints in place: the address and the word the int3 replaced.
    breakpoints: HashMap<Pid, (u64, i64)>,
}

/// The options leakmon traces a command with (the agent's loader puts them back after its own).
pub const OPTIONS: Options = Options::PTRACE_O_TRACEFORK
    .union(Options::PTRACE_O_TRACEVFORK)
    .union(Options::PTRACE_O_TRACEEXEC)
    .union(Options::PTRACE_O_TRACEEXIT);

impl Tracer {
    /// Starts `command` stopped just after its exec, before its first instruction.
    /// Call [`Tracer::resume`] once probes are in place.
    pub fn spawn(command: &[OsString], env: &[(OsString, OsString)]) -> Result<Self, TracerError> {
        let (program, args) = command.split_first().expect("clap requires a command");
        let mut cmd = Command::new(program);
        cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
        // SAFETY: traceme is async-signal-safe (a single syscall).
        unsafe {
            cmd.pre_exec(|| ptrace::traceme().map_err(std::io::Error::from));
        }
        let child = cmd.spawn().map_err(|source| TracerError::Spawn {
            command: program.to_string_lossy().into_owned(),
            source,
        })?;
        let root = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
        // The exec stop.
        waitpid(root, Some(WaitPidFlag::__WALL)).map_err(err("waitpid", root))?;
        ptrace::setoptions(root, OPTIONS).map_err(err("setoptions", root))?;
        let mut tracer =
            Self { root, seen: HashSet::from([root]), root_exit: None, breakpoints: HashMap::new() };
        tracer.break_at_entry(root);
        Ok(tracer)
    }

    /// Attaches to a running process without stopping it.
    pub fn seize(pid: u32) -> Result<Self, TracerError> {
        let root = Pid::from_raw(i32::try_from(pid).expect("pid fits"));
        ptrace::seize(root, OPTIONS).map_err(err("seize", root))?;
        Ok(Self { root, seen: HashSet::from([root]), root_exit: None, breakpoints: HashMap::new() })
    }

    pub fn root(&self) -> u32 {
        self.root.as_raw() as u32
    }

    /// Lets the spawned command run.
    pub fn resume(&mut self) -> Result<(), TracerError> {
        ptrace::cont(self.root, None).map_err(err("cont", self.root))
    }

    /// How the root process ended, once it has.
    pub fn root_exit(&self) -> Option<RootExit> {
        self.root_exit
    }

    /// Handles every pending stop without blocking. `at_stop(pid, stop)` runs while
    /// `pid` is held at that stop.
    pub fn poll(&mut self, mut at_stop: impl FnMut(u32, Stop)) -> Result<(), TracerError> {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(()),
                Ok(status) => status,
                Err(e) => return Err(TracerError::Ptrace { call: "waitpid", pid: -1, source: e }),
            };
            match status {
                WaitStatus::PtraceEvent(pid, signal, event) => {
                    let first = self.seen.insert(pid);
                    // A group-stop (SIGSTOP, SIGTSTP, ...: someone stopped the process):
                    // it stays stopped, as it would untraced, until SIGCONT. `cont`
                    // would resume it; PTRACE_LISTEN keeps it stopped and still tells
                    // leakmon what comes next.
                    if event == libc::PTRACE_EVENT_STOP && !first && group_stop(signal) {
                        // SAFETY: PTRACE_LISTEN takes no pointers.
                        let _ = unsafe { libc::ptrace(libc::PTRACE_LISTEN, pid.as_raw(), 0, 0) };
                        continue;
                    }
                    match event {
                        // A seized tracee's new children start with this stop, not SIGSTOP.
                        libc::PTRACE_EVENT_STOP if first => at_stop(pid.as_raw() as u32, Stop::Fork),
                        libc::PTRACE_EVENT_EXIT => {
                            self.breakpoints.remove(&pid);
                            at_stop(pid.as_raw() as u32, Stop::Exit);
                        }
                        libc::PTRACE_EVENT_EXEC => {
                            at_stop(pid.as_raw() as u32, Stop::Exec);
                            self.break_at_entry(pid);
                        }
                        _ => {}
                    }
                    // A process may vanish (SIGKILL) between its stop and this call.
                    let _ = ptrace::cont(pid, None);
                }
                WaitStatus::Stopped(pid, Signal::SIGTRAP) if self.at_breakpoint(pid) => {
                    at_stop(pid.as_raw() as u32, Stop::Entry);
                    let _ = ptrace::cont(pid, None);
                }
                WaitStatus::Stopped(pid, signal) => {
                    let first = self.seen.insert(pid);
                    if first && signal == Signal::SIGSTOP {
                        at_stop(pid.as_raw() as u32, Stop::Fork);
                    }
                    let deliver = (!(first && signal == Signal::SIGSTOP)).then_some(signal);
                    let _ = ptrace::cont(pid, deliver);
                }
                WaitStatus::Exited(pid, code) if pid == self.root => {
                    self.root_exit = Some(RootExit::Code(code));
                }
                WaitStatus::Signaled(pid, signal, _) if pid == self.root => {
                    self.root_exit = Some(RootExit::Signal(signal));
                }
                _ => {}
            }
        }
    }

    /// Lets every process of the session go on untraced. Each is stopped first (a
    /// running tracee cannot be detached) and its entry breakpoint, if any, taken out;
    /// a signal that arrived meanwhile is delivered on the way out.
    pub fn release(mut self) {
        for pid in std::mem::take(&mut self.seen) {
            super::stop_and_detach(pid, |_| {
                let own = self.at_breakpoint(pid);
                if let Some((entry, word)) = self.breakpoints.remove(&pid) {
                    let _ = ptrace::write(pid, entry as ptrace::AddressType, word);
                }
                own
            });
        }
    }

    /// Puts an int3 at the entry point of `pid`'s new image (from its auxiliary
    /// vector). Best effort: without it the caller sees no [`Stop::Entry`].
    fn break_at_entry(&mut self, pid: Pid) {
        let Some(entry) = entry_point(pid) else { return };
        let addr = entry as ptrace::AddressType;
        let Ok(word) = ptrace::read(pid, addr) else { return };
        if ptrace::write(pid, addr, (word & !0xff) | 0xcc).is_ok() {
            self.breakpoints.insert(pid, (entry, word));
        }
    }

    /// Whether `pid` stopped at its entry breakpoint; if so, the original instruction is
    /// back and the program counter on it, ready to go on.
    fn at_breakpoint(&mut self, pid: Pid) -> bool {
        let Some(&(entry, word)) = self.breakpoints.get(&pid) else { return false };
        let Ok(mut regs) = ptrace::getregs(pid) else { return false };
        if regs.rip != entry + 1 {
            return false;
        }
        self.breakpoints.remove(&pid);
        let restored = ptrace::write(pid, entry as ptrace::AddressType, word).is_ok();
        regs.rip = entry;
        restored && ptrace::setregs(pid, regs).is_ok()
    }
}

/// `AT_ENTRY` of a process's auxiliary vector: where its executable starts.
fn entry_point(pid: Pid) -> Option<u64> {
    let pid = u32::try_from(pid.as_raw()).ok()?;
    crate::procfs::ProcRoot::default().auxv(pid, libc::AT_ENTRY).ok().flatten()
}

/// Whether a seized tracee's `PTRACE_EVENT_STOP` with `signal` is a group-stop (the
/// process was stopped by a signal) rather than leakmon's own interrupt or a new
/// child's first stop (both SIGTRAP).
fn group_stop(signal: Signal) -> bool {
    matches!(signal, Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU)
}

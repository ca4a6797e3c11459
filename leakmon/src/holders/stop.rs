//! Every thread of a running process held still for a scan, and let go on every path.
//!
//! Each thread is seized with ptrace and interrupted: a ptrace stop, not SIGSTOP,
//! because the kernel ends a ptrace stop itself when its tracer dies. A leakmon killed
//! mid-scan (SIGKILL included) leaves a process that simply goes on, untraced, with
//! nothing of leakmon's in it: the scan only reads. Dropping [`Stopped`] detaches
//! every thread, delivering the signals that arrived meanwhile; a thread interrupted in
//! a syscall restarts it as after any stop.
//!
//! Threads are listed from `/proc/PID/task` until a listing finds none new: a thread
//! not yet stopped may start another.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::{
    errno::Errno,
    sys::{ptrace, signal::Signal, wait::WaitStatus},
    unistd::Pid,
};

use crate::procfs::ProcRoot;

/// How long a thread may take to stop.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// Listings of a process's threads before giving up on one that keeps starting more.
const MAX_LISTINGS: usize = 64;

/// One held thread: its id and its registers at the stop.
pub struct Thread {
    pub tid: u32,
    pub regs: libc::user_regs_struct,
    /// Signals that reached it during the stop, delivered when it goes.
    pending: Vec<Signal>,
}

/// Every thread of one process, stopped; let go when dropped.
pub struct Stopped {
    pub pid: u32,
    /// The main thread first, when it still runs.
    pub threads: Vec<Thread>,
    /// When the first thread stopped.
    pub since: Instant,
}

impl Stopped {
    /// Stops every thread of `pid`. Refuses a process that another tracer holds (a
    /// debugger), in one line.
    pub fn all(proc_root: &ProcRoot, pid: u32) -> Result<Self> {
        refuse_traced(proc_root, pid)?;
        let mut stopped = Self { pid, threads: Vec::new(), since: Instant::now() };
        let mut tried = std::collections::HashSet::new();
        for _ in 0..MAX_LISTINGS {
            let tids = proc_root.tasks(pid).with_context(|| format!("list the threads of pid {pid}"))?;
            let new: Vec<u32> = tids.into_iter().filter(|t| tried.insert(*t)).collect();
            if new.is_empty() {
                if stopped.threads.is_empty() {
                    bail!("pid {pid} has no thread left to stop (it exited)");
                }
                stopped.threads.sort_by_key(|t| t.tid != pid);
                return Ok(stopped);
            }
            for tid in new {
                if let Some(thread) = stop(tid)? {
                    if stopped.threads.is_empty() {
                        stopped.since = Instant::now();
                    }
                    stopped.threads.push(thread);
                }
            }
        }
        bail!("pid {pid} kept starting threads while they were being stopped; it was let go")
    }

    /// How long the process has been held.
    pub fn paused(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for t in self.threads.drain(..) {
            let tid = Pid::from_raw(t.tid as i32);
            let mut signals = t.pending.into_iter();
            if ptrace::detach(tid, signals.next()).is_ok() {
                // Standard signals do not queue: the others are sent again.
                for signal in signals {
                    // SAFETY: no pointers.
                    unsafe {
                        libc::syscall(
                            libc::SYS_tgkill,
                            t.tid as libc::c_int,
                            t.tid as libc::c_int,
                            signal as i32,
                        );
                    }
                }
            }
        }
    }
}

/// A process held by a tracer (a debugger, strace) is left to it.
pub fn refuse_traced(proc_root: &ProcRoot, pid: u32) -> Result<()> {
    if let Some(tracer) = proc_root.tracer(pid).map_err(|_| anyhow::anyhow!("no process with pid {pid}"))? {
        bail!("pid {pid} is traced by pid {tracer} (a debugger?): it was not stopped for a scan");
    }
    Ok(())
}

/// Seizes and stops thread `tid`; `None` when it is gone (exited meanwhile, or a
/// zombie leader whose process lives on in other threads).
fn stop(tid: u32) -> Result<Option<Thread>> {
    let t = Pid::from_raw(tid as i32);
    match ptrace::seize(t, ptrace::Options::empty()) {
        Ok(()) => {}
        Err(Errno::ESRCH) => return Ok(None),
        Err(Errno::EPERM) => return Err(crate::ptrace::remote::ptrace_refused(tid)),
        Err(e) => bail!("ptrace seize thread {tid}: {e}"),
    }
    // From here on, a failure lets this thread go (the others go with `Stopped`).
    let mut thread = Thread { tid, regs: unsafe { std::mem::zeroed() }, pending: Vec::new() };
    if ptrace::interrupt(t).is_err() {
        let _ = ptrace::detach(t, None);
        return Ok(None);
    }
    let deadline = Instant::now() + STOP_WAIT;
    loop {
        match crate::ptrace::wait_until(t, deadline) {
            Ok(Some(WaitStatus::PtraceEvent(..))) => break,
            // A signal on its way stops it first: held, delivered when it goes; the
            // interrupt's own stop comes next.
            Ok(Some(WaitStatus::Stopped(_, signal))) => {
                if !thread.pending.contains(&signal) {
                    thread.pending.push(signal);
                }
                let _ = ptrace::cont(t, None);
            }
            Ok(Some(WaitStatus::Exited(..) | WaitStatus::Signaled(..))) | Err(Errno::ECHILD) => {
                return Ok(None)
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                crate::ptrace::stop_and_detach(t, |_| false);
                bail!("thread {tid} did not stop within {STOP_WAIT:?}; the process was let go");
            }
            Err(e) => {
                let _ = ptrace::detach(t, None);
                bail!("wait for thread {tid}: {e}");
            }
        }
    }
    match ptrace::getregs(t) {
        Ok(regs) => thread.regs = regs,
        Err(e) => {
            let _ = ptrace::detach(t, thread.pending.first().copied());
            bail!("read the registers of thread {tid}: {e}");
        }
    }
    Ok(Some(thread))
}

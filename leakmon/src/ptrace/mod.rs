//! Everything leakmon does to a process through ptrace, in one place: holding the
//! processes of a `report` at fork, exec, entry and exit ([`tracer`]), and running a
//! syscall or calling a function inside a running process ([`remote`]), which the
//! agent's loader and its inline hooks are built on. The loader also works on a process
//! the tracer holds at its entry ([`remote::Held::borrowed`]).
//!
//! The rules both keep: a tracee is let go only once stopped, with the signal that
//! stopped it delivered on the way out unless the stop was leakmon's own; and every wait
//! is bounded.

pub mod remote;
pub mod tracer;

use std::time::{Duration, Instant};

use nix::{
    sys::{
        ptrace,
        signal::Signal,
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};

/// How long a tracee being let go may take to stop.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// `pid`'s next stop, or `None` once `deadline` passes (polled: a blocking wait could
/// not be bounded).
pub fn wait_until(pid: Pid, deadline: Instant) -> nix::Result<Option<WaitStatus>> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG))? {
            WaitStatus::StillAlive => {}
            status => return Ok(Some(status)),
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Lets a running tracee go: a running tracee cannot be detached, so it is stopped
/// first. A signal that stopped it meanwhile is delivered on the way out, unless `own`
/// says the stop was leakmon's (a breakpoint of its own, which `own` takes out).
pub fn stop_and_detach(pid: Pid, own: impl FnOnce(Signal) -> bool) {
    if ptrace::interrupt(pid).is_err() {
        return;
    }
    let signal = match wait_until(pid, Instant::now() + STOP_WAIT) {
        Ok(Some(WaitStatus::Stopped(_, signal))) => (!own(signal)).then_some(signal),
        _ => None,
    };
    let _ = ptrace::detach(pid, signal);
}

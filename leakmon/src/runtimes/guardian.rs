//! A guardian for what leakmon opens in a runtime: a `leakmon runtime-guard` process of
//! its own that closes it again if the leakmon that opened it is gone without closing
//! it, however it went (SIGKILL included): Node.js's inspector, a JVM's JFR recording
//! (stopped, and its files removed from the JVM's /tmp).
//!
//! Why: an open inspector is code execution as the process's user for every local user
//! who can reach its port, and a recording left running costs the JVM and fills its
//! /tmp. The guardian ignores the signals that stop leakmon, and learns that leakmon is
//! gone when its standard input closes, which the kernel does for a leakmon that dies.
//! Protocol on that input: `armed` just before SIGUSR1 is sent (or the recording
//! started), `closed` once leakmon closed it itself; an end of input after `armed` and
//! before `closed` makes the guardian close it.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::node::{
    inspector::{is_inspector, listening, Session},
    CLOSE,
};
use crate::untrusted::Pinned;

/// How long the guardian waits for the inspector to appear (after SIGUSR1) and to close.
const WAIT: Duration = Duration::from_secs(5);

/// leakmon's side: the guardian, started and ready.
pub struct Guard {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

/// What a guardian guards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guarded {
    /// The inspector of a Node.js.
    Inspector,
    /// A JFR recording of that name in a JVM, written to `/tmp/<name>*.jfr` there.
    Recording(String),
}

impl Guard {
    /// Starts the guardian of `pid`'s inspector; returns once it is in place.
    pub fn start(pid: u32) -> Result<Self> {
        Self::of(pid, &Guarded::Inspector)
    }

    /// Starts the guardian of what `guarded` names in `pid`; returns once it is in place.
    pub fn of(pid: u32, guarded: &Guarded) -> Result<Self> {
        let exe = std::env::current_exe().context("find leakmon's own executable")?;
        let mut command = Command::new(exe);
        command.args(["runtime-guard", "--pid", &pid.to_string()]);
        if let Guarded::Recording(name) = guarded {
            command.args(["--recording", name]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start the inspector's guardian")?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .context("read the inspector guardian's answer")?;
        let mut guard = Self { child: Some(child), stdin };
        if line.trim_end() != "ready" {
            guard.say("closed");
            bail!("the inspector's guardian did not start: {}", line.trim_end());
        }
        Ok(guard)
    }

    /// Tells the guardian the inspector is about to open.
    pub fn armed(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("the inspector's guardian is gone")?;
        writeln!(stdin, "armed").and_then(|()| stdin.flush()).context("tell the inspector's guardian")
    }

    fn say(&mut self, word: &str) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "{word}");
        }
    }

    /// The inspector is closed: the guardian ends without doing anything.
    pub fn closed(mut self) {
        self.say("closed");
    }
}

impl Drop for Guard {
    /// Without `closed`, the guardian closes the inspector itself.
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            // Reaped on a thread of its own: its work may take a few seconds.
            let _ = std::thread::Builder::new().name("inspector-guardian".into()).spawn(move || child.wait());
        }
    }
}

/// `leakmon runtime-guard`: the guardian's side.
pub fn guard(pid: u32, guarded: &Guarded) -> ExitCode {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGPIPE, Signal::SIGQUIT] {
        // SAFETY: ignoring a signal installs no handler.
        let _ = unsafe { signal(s, SigHandler::SigIgn) };
    }
    let process = match Pinned::open(pid) {
        Ok(p) => p,
        Err(e) => {
            println!("error pid {pid}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("ready");
    let _ = std::io::stdout().flush();
    let (mut armed, mut closed) = (false, false);
    for line in std::io::stdin().lines() {
        match line.as_deref().map(str::trim) {
            Ok("armed") => armed = true,
            Ok("closed") => closed = true,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    if !armed || closed || process.alive().is_err() {
        return ExitCode::SUCCESS;
    }
    let closed = match guarded {
        Guarded::Inspector => close_inspector(pid, &process),
        Guarded::Recording(name) => stop_recording(pid, name),
    };
    match closed {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leakmon runtime-guard: pid {pid}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Closes the inspector `pid` opened after SIGUSR1 (leakmon refuses a process whose
/// inspector was open before, so any is leakmon's).
fn close_inspector(pid: u32, process: &Pinned) -> Result<()> {
    super::enter_net_namespace(pid)?;
    let deadline = Instant::now() + WAIT;
    // SIGUSR1 may have been sent just before leakmon went: the inspector opens later.
    let addr = loop {
        if let Some(addr) = listening(pid).ok().and_then(|l| l.into_iter().find(|a| is_inspector(*a))) {
            break addr;
        }
        if Instant::now() > deadline || process.alive().is_err() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // leakmon's own session may still be ending on Node.js's side: try a few times.
    let mut last = None;
    for _ in 0..10 {
        match Session::open(addr) {
            Ok(mut session) => {
                let _ = session.call("HeapProfiler.stopSampling", &json!({}));
                let _ = session
                    .call("Runtime.evaluate", &json!({ "expression": CLOSE, "includeCommandLineAPI": true }));
                session.close();
                break;
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if !listening(pid).unwrap_or_default().contains(&addr) || process.alive().is_err() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match last {
        Some(e) => Err(e.context(format!("the inspector at {addr} stayed open"))),
        None => bail!("the inspector at {addr} stayed open"),
    }
}

/// Stops the recording `name` in the JVM `pid` and removes its files from the JVM's
/// /tmp (those its user wrote, never through a link).
fn stop_recording(pid: u32, name: &str) -> Result<()> {
    // A recording name leakmon made: `leakmon-<its pid>-<the JVM's pid>`.
    if !name.starts_with("leakmon-") || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        bail!("{name:?} is not a recording leakmon names");
    }
    let stopped =
        super::jvm::attach::Jvm::attach(pid).and_then(|jvm| jvm.jcmd(&format!("JFR.stop name={name}")));
    super::jvm::remove_recordings(pid, name);
    stopped.map(drop)
}

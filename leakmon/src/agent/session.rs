//! An agent loaded into a running process, held by a guardian: a `leakmon
//! agent-session` process of its own that loads the agent, and unloads it when told
//! to, or when the leakmon that started it is gone, however it went.
//!
//! Why a second process: a leakmon that is SIGKILLed runs no cleanup, and the process
//! it loaded into would keep its redirected slots, or, killed in the middle of a
//! ptrace call, a thread at the wrong place. The guardian ignores the signals a
//! terminal or a service manager sends to stop leakmon and finishes what it started:
//! the load, then the unload as soon as its standard input closes, which the kernel
//! does for a leakmon that dies.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::fd::AsFd as _,
    path::Path,
    process::{Child, ChildStdin, Command, ExitCode, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{inject, pace};
use crate::{procfs::ProcRoot, values::Interval};

/// How long the guardian waits for another tracer (leakmon's hold on the process at
/// exit) to let go before it unloads.
const TRACER_WAIT: Duration = Duration::from_secs(10);

/// The agent, loaded into one running process and sampling there.
pub struct Session {
    pid: u32,
    /// Waited for on stop, or by a thread of its own when dropped (no zombie).
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// The guardian's lines, read by a thread of its own so that nobody waits on them
    /// who need not (the daemon's loop polls them).
    answers: std::sync::mpsc::Receiver<String>,
    /// The agent's interval now: the one given, or the last the pace set.
    rate: Arc<AtomicU64>,
}

/// A load under way in its guardian: [`Starting::poll`] says when it is done.
pub struct Starting(Option<Session>);

impl Session {
    /// Loads `agent` into `pid`, sampling at `interval`, through a guardian.
    /// Returns the session and the number of call slots the agent redirected.
    pub fn start(pid: u32, agent: &Path, interval: Interval) -> Result<(Self, u64)> {
        let mut session = Self::spawn(pid, agent, interval)?;
        let slots = session.answer("loaded")?;
        Ok((session, slots))
    }

    /// Starts the guardian that loads `agent` into `pid`, without waiting for it.
    pub fn begin(pid: u32, agent: &Path, interval: Interval) -> Result<Starting> {
        Ok(Starting(Some(Self::spawn(pid, agent, interval)?)))
    }

    fn spawn(pid: u32, agent: &Path, interval: Interval) -> Result<Self> {
        let exe = std::env::current_exe().context("find leakmon's own executable")?;
        let mut command = Command::new(exe);
        command
            .args([
                "agent-session",
                "--pid",
                &pid.to_string(),
                "--sample-bytes",
                &interval.start().to_string(),
            ])
            .arg("--agent")
            .arg(agent);
        if interval.paced() {
            command.arg("--paced");
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start the agent's guardian")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let (tx, answers) = std::sync::mpsc::channel();
        let rate = Arc::new(AtomicU64::new(interval.start()));
        let paced = rate.clone();
        std::thread::Builder::new()
            .name("agent-answers".into())
            .spawn(move || {
                for line in stdout.lines().map_while(Result::ok) {
                    // The pace's changes are news, not answers.
                    if let Some(bytes) = line.strip_prefix("rate ").and_then(|n| n.trim().parse().ok()) {
                        paced.store(bytes, Ordering::Relaxed);
                    } else if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .context("start the reader of the agent guardian's answers")?;
        Ok(Self { pid, child: Some(child), stdin, answers, rate })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The agent's sampling interval now.
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Undoes the agent's redirections (its code stays mapped: a thread may be inside
    /// it) and ends the guardian. Returns the number of slots restored.
    pub fn stop(mut self) -> Result<u64> {
        self.tell_stop();
        let restored = self.answer("stopped");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        restored
    }

    /// [`Session::stop`] without waiting: the guardian unloads on its own, and a thread
    /// of its own logs the outcome (the daemon's loop must not wait for an unload, which
    /// may take seconds).
    pub fn stop_in_background(mut self) {
        self.tell_stop();
        let pid = self.pid;
        let _ = std::thread::Builder::new().name("agent-stop".into()).spawn(move || match self.stop() {
            Ok(slots) => tracing::info!(pid, slots, "agent stopped"),
            Err(e) => tracing::warn!(pid, "stop the agent: {e:#}"),
        });
    }

    fn tell_stop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            // A guardian that is gone cannot be told; its answer says what happened.
            let _ = stdin.write_all(b"stop\n");
        }
    }

    /// The guardian's next line: `<word> N`, or `error <why>`.
    fn answer(&mut self, word: &str) -> Result<u64> {
        let line = self.answers.recv().ok();
        self.parse(word, line.as_deref())
    }

    fn parse(&self, word: &str, line: Option<&str>) -> Result<u64> {
        let line = line.map(str::trim_end).unwrap_or_default();
        if let Some(why) = line.strip_prefix("error ") {
            bail!("{why}");
        }
        line.strip_prefix(word)
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| anyhow!("the agent's guardian for pid {} ended without answering", self.pid))
    }
}

impl Starting {
    /// `None` while the guardian still loads; then the session and the slots the
    /// agent redirected, or why it could not be loaded (the guardian has undone it).
    pub fn poll(&mut self) -> Option<Result<(Session, u64)>> {
        let session = self.0.as_mut()?;
        let line = match session.answers.try_recv() {
            Ok(line) => Some(line),
            Err(std::sync::mpsc::TryRecvError::Empty) => return None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
        };
        let session = self.0.take().expect("checked above");
        Some(session.parse("loaded", line.as_deref()).map(|slots| (session, slots)))
    }
}

impl Drop for Session {
    /// A session dropped without [`Session::stop`] (an error path): closing the
    /// guardian's input makes it unload on its own.
    fn drop(&mut self) {
        self.stdin.take();
        if let Some(mut child) = self.child.take() {
            let _ = std::thread::Builder::new().name("agent-guardian".into()).spawn(move || child.wait());
        }
    }
}

/// `leakmon agent-session`: the guardian's side. Loads, answers, waits for `stop` or
/// the end of its input (pacing the agent meanwhile if `paced`, each new interval a
/// `rate N` line), unloads, answers, ends.
pub fn guard(pid: u32, agent: &Path, sample_bytes: u64, paced: bool) -> ExitCode {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGPIPE, Signal::SIGQUIT] {
        // SAFETY: ignoring a signal installs no handler.
        let _ = unsafe { signal(s, SigHandler::SigIgn) };
    }
    let proc_root = ProcRoot::default();
    // Every answer may meet a leakmon gone already: the work goes on regardless.
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    };
    match inject::load(&proc_root, pid, agent, sample_bytes) {
        Ok(slots) => say(format!("loaded {slots}")),
        Err(e) => {
            say(format!("error {e:#}"));
            return ExitCode::FAILURE;
        }
    }
    let mut pace = paced
        .then(|| pace::Paced::open(&proc_root, pid, agent))
        .and_then(|p| p.inspect_err(|e| tracing::warn!(pid, "pace the agent: {e:#}")).ok());
    let mut line = String::new();
    loop {
        if let Some(paced) = pace.as_mut() {
            if !stdin_ready(pace::TURN) {
                match paced.turn() {
                    Ok(Some(rate)) => say(format!("rate {rate}")),
                    Ok(None) => {}
                    // Gone, another image, or stopped: nothing of this agent to pace.
                    Err(_) => pace = None,
                }
                continue;
            }
        }
        line.clear();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.trim() == "stop" => break,
            Ok(_) => {}
        }
    }
    let deadline = Instant::now() + TRACER_WAIT;
    while traced_by_another(&proc_root, pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !proc_root.running(pid) {
        say("stopped 0".to_owned());
        return ExitCode::SUCCESS;
    }
    match inject::unload(&proc_root, pid, agent) {
        Ok(slots) => {
            say(format!("stopped {slots}"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(format!("error {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Whether standard input has a line (or its end) within `wait`.
fn stdin_ready(wait: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let stdin = std::io::stdin();
    let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(wait.as_millis() as i32).unwrap_or(PollTimeout::NONE);
    // An interrupted or failed poll reads at once: the stop is never missed.
    !matches!(poll(&mut fds, timeout), Ok(0))
}

fn traced_by_another(proc_root: &ProcRoot, pid: u32) -> bool {
    proc_root.tracer(pid).is_ok_and(|t| t.is_some())
}

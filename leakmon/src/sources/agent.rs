//! Attribution by the in-process agent: loaded into each attributed process (through
//! a guardian, see [`crate::agent::session`]), it samples there, and only sampled
//! blocks and their frees reach the kernel, through probes on its two markers. Those
//! probes are shared: only processes that map the agent ever hit them.
//!
//! Never for every process (`--attach all` is refused with the agent): it loads code
//! into the processes named, or into suspects for a while each.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tracing::{info, warn};

use super::{
    probing::Probing,
    proc_sampler::ProcSample,
    selection::{Named, Suspects, Turn},
    Source,
};
use crate::{
    agent::session::{Session, Starting},
    model::Method,
    model::SeriesView,
    probes::Probes,
    procfs::ProcRoot,
    values::Interval,
};

/// How long after its exec a named process gets the agent again: its libraries are
/// mapped and its allocator's slots bound by then.
const AFTER_EXEC: Duration = Duration::from_millis(500);

pub enum Coverage {
    Named(Named),
    Suspects(Suspects),
}

pub struct Agent {
    coverage: Coverage,
    loads: Loads,
}

/// The agent's loads and sessions, process by process.
struct Loads {
    proc_root: ProcRoot,
    path: PathBuf,
    interval: Interval,
    sessions: HashMap<u32, Session>,
    /// Loads under way in their guardians, polled each turn: a load takes up to tens
    /// of seconds (a thread held at a bad place is waited for), which the daemon's loop
    /// (and systemd's watchdog on it) must not wait out.
    starting: HashMap<u32, Starting>,
    /// Processes the agent could not be loaded into: said once, not tried again.
    refused: HashSet<u32>,
    /// Named processes that exec'd (the agent went with the old image).
    execed: HashMap<u32, Instant>,
}

impl Agent {
    /// Writes the agent out, probes its markers, and loads it into the processes named.
    pub fn start(
        kernel: &mut Probes,
        coverage: Coverage,
        proc_root: &ProcRoot,
        interval: Interval,
    ) -> Result<Self> {
        let path = crate::agent::install()?;
        Probing::Agent(path.clone()).attach(kernel, 0, Vec::new()).context("probe the agent's markers")?;
        let mut loads = Loads {
            proc_root: proc_root.clone(),
            path,
            interval,
            sessions: HashMap::new(),
            starting: HashMap::new(),
            refused: HashSet::new(),
            execed: HashMap::new(),
        };
        if let Coverage::Named(named) = &coverage {
            for pid in named.now(proc_root) {
                loads.load(kernel, pid);
            }
        }
        Ok(Self { coverage, loads })
    }

    /// The loads that ended since the last turn; a suspect whose load failed has had
    /// its turn.
    fn poll(&mut self, kernel: &mut Probes) {
        let refused = self.loads.poll(kernel);
        if let Coverage::Suspects(suspects) = &mut self.coverage {
            refused.into_iter().for_each(|pid| suspects.refused(pid));
        }
    }
}

impl Loads {
    /// Traces `pid` and starts loading the agent into it; a process that cannot take
    /// it gets one line (see [`Agent::poll`]), is untraced and is not tried again.
    /// Whether a load is under way or done.
    fn load(&mut self, kernel: &mut Probes, pid: u32) -> bool {
        if self.sessions.contains_key(&pid) || self.starting.contains_key(&pid) {
            return true;
        }
        if self.refused.contains(&pid) {
            return false;
        }
        // Traced first: no sample may fire unrecorded.
        let started = kernel
            .trace(pid)
            .map_err(anyhow::Error::from)
            .and_then(|()| Session::begin(pid, &self.path, self.interval));
        match started {
            Ok(starting) => {
                self.starting.insert(pid, starting);
                true
            }
            Err(e) => {
                self.refuse(kernel, pid, &e);
                false
            }
        }
    }

    fn refuse(&mut self, kernel: &mut Probes, pid: u32, why: &anyhow::Error) {
        warn!(pid, "load the agent: {why:#}");
        self.refused.insert(pid);
        let _ = kernel.detach_process(pid);
    }

    /// The loads that ended since the last turn: sessions, or refusals (returned).
    fn poll(&mut self, kernel: &mut Probes) -> Vec<u32> {
        let mut refused = Vec::new();
        let ended: Vec<(u32, Result<(Session, u64)>)> =
            self.starting.iter_mut().filter_map(|(pid, starting)| Some((*pid, starting.poll()?))).collect();
        for (pid, outcome) in ended {
            self.starting.remove(&pid);
            match outcome {
                Ok((session, slots)) => {
                    info!(pid, slots, interval = ?self.interval, "agent loaded");
                    // A copy in a memory file (a container's): its markers probed now.
                    let copies =
                        crate::agent::copies_in(&crate::procfs::ProcRoot::default(), pid, &self.path);
                    if let Err(e) = kernel.attach_agent(None, &copies) {
                        warn!(pid, "probe the markers of the agent's copy: {e}");
                    }
                    self.sessions.insert(pid, session);
                }
                Err(e) => {
                    self.refuse(kernel, pid, &e);
                    refused.push(pid);
                }
            }
        }
        refused
    }

    /// Undoes the agent's redirections in `pid` (its guardian does, in the background)
    /// and drops what was counted for it.
    fn unload(&mut self, kernel: &mut Probes, pid: u32) {
        if let Some(session) = self.sessions.remove(&pid) {
            session.stop_in_background();
        }
        // A load under way: its guardian undoes it once its input closes.
        self.starting.remove(&pid);
        if let Err(e) = kernel.detach_process(pid) {
            warn!(pid, "stop tracing: {e:#}");
        }
    }
}

impl Source for Agent {
    fn method(&self) -> Method {
        Method::Agent
    }

    fn sampled(&mut self, kernel: Option<&mut Probes>, procs: &[ProcSample]) {
        let Some(kernel) = kernel else { return };
        self.poll(kernel);
        let Coverage::Named(named) = &self.coverage else { return };
        let loads = &mut self.loads;
        let mut due: Vec<u32> =
            loads.execed.iter().filter(|(_, at)| at.elapsed() >= AFTER_EXEC).map(|(pid, _)| *pid).collect();
        loads.execed.retain(|pid, _| !due.contains(pid));
        if named.open_ended() {
            due.extend(named.among(procs).into_iter().filter(|pid| !loads.sessions.contains_key(pid)));
        }
        for pid in due {
            if loads.proc_root.running(pid) {
                loads.load(kernel, pid);
            }
        }
    }

    fn analysed(&mut self, kernel: Option<&mut Probes>, views: &[SeriesView]) {
        let Some(kernel) = kernel else { return };
        self.poll(kernel);
        let Coverage::Suspects(suspects) = &mut self.coverage else { return };
        let loads = &mut self.loads;
        suspects.turn(&loads.proc_root.clone(), views, |turn| match turn {
            Turn::End(pid) => {
                loads.unload(kernel, pid);
                info!(pid, "allocation attribution ended");
                true
            }
            // A load that fails later ends the turn then (`poll`).
            Turn::Begin(pid, v) => {
                let loading = loads.load(kernel, pid);
                if loading {
                    info!(pid, service = %v.service, comm = %v.comm, "attributing the allocations of a suspect, in-process");
                }
                loading
            }
        });
    }

    fn exec(&mut self, pid: u32) {
        // The agent went with the old image; the guardian finds nothing to undo.
        if self.loads.sessions.remove(&pid).is_some() && matches!(self.coverage, Coverage::Named(_)) {
            self.loads.execed.insert(pid, Instant::now());
        }
    }

    fn reselect(&mut self, kernel: Option<&mut Probes>, next: Named) {
        let (Some(kernel), Coverage::Named(named)) = (kernel, &self.coverage) else { return };
        let added: Vec<u32> = next.pids.iter().filter(|pid| !named.pids.contains(pid)).copied().collect();
        let removed: Vec<u32> = named.pids.iter().filter(|pid| !next.pids.contains(pid)).copied().collect();
        self.coverage = Coverage::Named(next);
        for pid in removed {
            self.loads.unload(kernel, pid);
            info!(pid, "no longer traced");
        }
        for pid in added {
            self.loads.refused.remove(&pid);
            self.loads.load(kernel, pid);
        }
    }

    fn loading(&self, pid: u32) -> bool {
        self.loads.starting.contains_key(&pid)
    }

    fn forget(&mut self, gone: &dyn Fn(u32) -> bool) {
        // A guardian whose process is gone has nothing to undo and ends.
        let loads = &mut self.loads;
        loads.sessions.retain(|pid, _| !gone(*pid));
        loads.starting.retain(|pid, _| !gone(*pid));
        loads.refused.retain(|pid| !gone(*pid));
        loads.execed.retain(|pid, _| !gone(*pid));
    }

    fn shutdown(&mut self, kernel: Option<&mut Probes>) {
        let Some(kernel) = kernel else { return };
        // Every guardian told at once, then each waited for: they unload in parallel.
        let sessions: Vec<(u32, Session)> = self.loads.sessions.drain().collect();
        let stops: Vec<_> = sessions
            .into_iter()
            .map(|(pid, session)| (pid, std::thread::spawn(move || session.stop())))
            .collect();
        self.loads.starting.clear();
        for (pid, stop) in stops {
            match stop.join() {
                Ok(Ok(slots)) => info!(pid, slots, "agent stopped"),
                Ok(Err(e)) => warn!(pid, "stop the agent: {e:#}"),
                Err(_) => warn!(pid, "stop the agent: the stopping thread panicked"),
            }
            let _ = kernel.detach_process(pid);
        }
    }
}

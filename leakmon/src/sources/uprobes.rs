//! Attribution by uprobes on the allocator functions: every call of an attributed
//! process traps into the kernel, which records it exactly (or samples it with
//! `--sample-bytes`, trap still taken).
//!
//! Everyone (`--attach all`) and named processes (`--attach pids`) share probes on the
//! allocator files, which the kernel fires for traced processes only; a suspect gets
//! probes of its own, in its process alone, so nobody else pays.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Result;
use tracing::{info, warn};

use super::{
    probing::Probing,
    proc_sampler::ProcSample,
    selection::{Named, Suspects, Turn},
    Source,
};
use crate::{
    discovery::Discovery,
    model::Method,
    model::SeriesView,
    probes::{targets::Allocator, Probes},
    procfs::ProcRoot,
};

/// How long after its exec a process's mappings are read for allocator files: by then
/// the dynamic linker has mapped its libraries and preloads.
const AFTER_EXEC: Duration = Duration::from_millis(100);

pub enum Coverage {
    All,
    Named(Named),
    Suspects(Suspects),
}

pub struct Uprobes {
    coverage: Coverage,
    discovery: Discovery,
    /// The allocator each process's malloc reaches, as last read from its mappings.
    allocators: HashMap<u32, Allocator>,
    /// Processes that exec'd, to read for allocator files once their libraries are in.
    execed: HashMap<u32, Instant>,
}

impl Uprobes {
    /// Attaches to the allocator files of the processes covered now, and traces the
    /// named ones.
    pub fn start(kernel: &mut Probes, coverage: Coverage, proc_root: &ProcRoot) -> Result<Self> {
        let mut source = Self {
            coverage,
            discovery: Discovery::new(proc_root.clone()),
            allocators: HashMap::new(),
            execed: HashMap::new(),
        };
        if source.shares_probes() {
            let named = source.named_now();
            Probing::Shared.attach(kernel, 0, source.files(&named))?;
            for pid in named {
                kernel.trace(pid)?;
            }
        }
        Ok(source)
    }

    /// Whether processes share probes on allocator files (everyone, named ones).
    fn shares_probes(&self) -> bool {
        !matches!(self.coverage, Coverage::Suspects(_))
    }

    /// The processes named, as /proc shows them now (none unless named).
    fn named_now(&self) -> Vec<u32> {
        match &self.coverage {
            Coverage::Named(named) => named.now(self.discovery.proc_root()),
            Coverage::All | Coverage::Suspects(_) => Vec::new(),
        }
    }

    /// The allocator files to attach to: every process's, or the `named` ones' (those
    /// started later are read after their exec), and the host's. Records each scanned
    /// process's allocator.
    fn files(&mut self, named: &[u32]) -> Vec<PathBuf> {
        let mut libs = Vec::new();
        if matches!(self.coverage, Coverage::All) {
            let (files, found) = self.discovery.all();
            libs.extend(files);
            self.allocators = found;
        }
        for &pid in named {
            let found = self.discovery.process(pid);
            libs.extend(found.files);
            if let Some(a) = found.allocator {
                self.allocators.insert(pid, a);
            }
        }
        libs.extend(self.discovery.host_libraries());
        libs
    }
}

impl Source for Uprobes {
    fn method(&self) -> Method {
        Method::Uprobes
    }

    fn sampled(&mut self, kernel: Option<&mut Probes>, procs: &[ProcSample]) {
        let Some(kernel) = kernel else { return };
        if self.shares_probes() {
            // New images: a static allocator in the executable, a preloaded one.
            let due: Vec<u32> = self
                .execed
                .iter()
                .filter(|(_, at)| at.elapsed() >= AFTER_EXEC)
                .map(|(pid, _)| *pid)
                .collect();
            for pid in due {
                self.execed.remove(&pid);
                let found = self.discovery.process(pid);
                match found.allocator {
                    Some(a) => self.allocators.insert(pid, a),
                    None => self.allocators.remove(&pid),
                };
                if let Err(e) = Probing::Shared.attach(kernel, pid, found.files) {
                    warn!(pid, "attach to a new image's allocator: {e:#}");
                }
            }
        }
        if let Coverage::Named(named) = &self.coverage {
            if named.open_ended() {
                // Processes matching --comm/--cgroup that started since the last turn.
                let new: Vec<u32> =
                    named.among(procs).into_iter().filter(|pid| kernel.proc_state(*pid).is_none()).collect();
                for pid in new {
                    match kernel.trace(pid) {
                        Ok(()) => info!(pid, "attributing the allocations of a selected process"),
                        Err(e) => warn!(pid, "trace: {e:#}"),
                    }
                }
            }
        }
    }

    fn analysed(&mut self, kernel: Option<&mut Probes>, views: &[SeriesView]) {
        let (Some(kernel), Coverage::Suspects(suspects)) = (kernel, &mut self.coverage) else { return };
        let discovery = &mut self.discovery;
        suspects.turn(&discovery.proc_root().clone(), views, |turn| match turn {
            Turn::End(pid) => {
                match kernel.detach_process(pid) {
                    Ok(()) => info!(pid, "allocation attribution ended"),
                    Err(e) => warn!(pid, "detach: {e:#}"),
                }
                true
            }
            Turn::Begin(pid, v) => match Probing::PerProcess.attach(kernel, pid, discovery.process(pid).files) {
                Ok(n) if n > 0 => {
                    info!(pid, service = %v.service, comm = %v.comm, probes = n, "attributing the allocations of a suspect");
                    true
                }
                Ok(_) => false,
                Err(e) => {
                    warn!(pid, "attach to suspect: {e:#}");
                    false
                }
            },
        });
    }

    fn exec(&mut self, pid: u32) {
        if self.shares_probes() {
            self.execed.insert(pid, Instant::now());
        }
    }

    fn rescan(&mut self, kernel: Option<&mut Probes>) {
        let Some(kernel) = kernel else { return };
        if self.shares_probes() {
            let named = self.named_now();
            let files = self.files(&named);
            if let Err(e) = Probing::Shared.attach(kernel, 0, files) {
                warn!("attach to new libraries: {e:#}");
            }
        }
    }

    fn reselect(&mut self, kernel: Option<&mut Probes>, next: Named) {
        let (Some(kernel), Coverage::Named(named)) = (kernel, &mut self.coverage) else { return };
        for pid in next.pids.iter().filter(|pid| !named.pids.contains(pid)) {
            if let Err(e) = kernel.trace(*pid) {
                warn!(pid, "trace: {e:#}");
            }
        }
        // A pid taken off the list stops being traced, and what was counted for it
        // goes (its children, traced on their own, stay).
        for pid in named.pids.iter().filter(|pid| !next.pids.contains(pid)) {
            match kernel.detach_process(*pid) {
                Ok(()) => info!(pid, "no longer traced"),
                Err(e) => warn!(pid, "stop tracing: {e:#}"),
            }
        }
        *named = next;
    }

    fn allocator(&self, pid: u32) -> Option<&'static str> {
        self.allocators.get(&pid).map(|a| a.name())
    }

    fn forget(&mut self, gone: &dyn Fn(u32) -> bool) {
        self.allocators.retain(|pid, _| !gone(*pid));
        self.execed.retain(|pid, _| !gone(*pid));
    }

    fn shutdown(&mut self, _kernel: Option<&mut Probes>) {}
}

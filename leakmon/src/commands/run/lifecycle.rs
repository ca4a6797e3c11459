//! Processes' lives, as the kernel's lifecycle events tell them: exits and execs make
//! their kernel state go (at the next purge), forks name children, OOM kills are
//! counted.

use std::collections::{HashMap, HashSet};

use leakmon_common::{event, LifecycleEvent};
use tracing::warn;

use super::Daemon;
use crate::{ingest, sources::proc_sampler};

#[derive(Default)]
pub(super) struct Lifecycle {
    /// Exited processes by pid, with their generation at exit: a process that got the
    /// pid since runs in a later generation and keeps its blocks through the purge.
    exited: HashMap<u32, u32>,
    /// Processes that exec'd, with their generation at the exec.
    replaced: HashMap<u32, u32>,
    /// Names from the events of traced processes, for the summaries.
    pub(super) names: HashMap<u32, String>,
}

impl Daemon<'_> {
    pub(super) fn lifecycle_event(&mut self, ev: &LifecycleEvent) {
        match ev.kind {
            event::EXIT => {
                self.lifecycle.exited.insert(ev.tgid, ev.gen);
                // The kernel dropped its tables; a process at the same pid gets its
                // own at the next turn.
                if let Some(p) = self.probes.as_mut() {
                    p.forget_unwind(ev.tgid);
                }
            }
            event::EXEC => {
                self.lifecycle.replaced.insert(ev.tgid, ev.gen);
                // The kernel dropped the old image's tables; new ones at the next turn.
                if let Some(p) = self.probes.as_mut() {
                    p.forget_unwind(ev.tgid);
                }
                for s in &mut self.sources {
                    s.exec(ev.tgid);
                }
                self.lifecycle.names.insert(ev.tgid, ingest::comm(ev));
            }
            event::FORK => {
                self.lifecycle.names.insert(ev.child, ingest::comm(ev));
            }
            event::OOM => {
                // Who it was at the last sample: by now it may be gone.
                let (service, comm) = self
                    .monitor
                    .identity_of(ev.tgid)
                    .map(|(service, comm)| (service.to_owned(), comm.to_owned()))
                    .or_else(|| proc_sampler::sample(&self.proc_root, ev.tgid).map(|v| (v.service, v.comm)))
                    .unwrap_or_else(|| ("unknown".to_owned(), ingest::comm(ev)));
                warn!(pid = ev.tgid, service = %service, comm = %comm, "OOM kill");
                self.metrics.oom_kill(&service, &comm, ev.tgid);
            }
            _ => {}
        }
    }

    /// Drops the kernel state of processes that exited or exec'd since the last purge.
    pub(super) fn purge(&mut self) {
        let Some(p) = self.probes.as_mut() else { return };
        let life = &mut self.lifecycle;
        let traced = p.traced().unwrap_or_default();
        // Exits whose event was lost: marked in the kernel, or gone from /proc.
        life.exited.extend(
            traced
                .iter()
                .filter(|(pid, s)| s.exited() || !self.proc_root.exists(*pid))
                .map(|(pid, s)| (*pid, s.gen)),
        );
        let mut forgotten = HashSet::new();
        if !life.exited.is_empty() || !life.replaced.is_empty() {
            // A monitoring daemon keeps running: a purge that fails is counted, said,
            // and tried again at the next turn with the same processes.
            let (exited, replaced) = (&life.exited, &life.replaced);
            let purged = match p.purge(
                |tgid, gen| {
                    exited.get(&tgid).is_some_and(|g| gen <= *g)
                        || replaced.get(&tgid).is_some_and(|g| gen < *g)
                },
                // Not a pid taken since by a process traced in a later generation.
                |tgid, state| exited.get(&tgid).is_some_and(|g| state.exited() || state.gen <= *g),
            ) {
                Ok(purged) => purged,
                Err(e) => {
                    warn!("purge exited processes' kernel state: {e:#}");
                    self.metrics.error("purge");
                    return;
                }
            };
            tracing::debug!(
                processes = exited.len(),
                images = replaced.len(),
                removed = purged.entries,
                "purged"
            );
            forgotten = purged.forgotten;
            let gone = |pid: u32| exited.contains_key(&pid) && p.proc_state(pid).is_none();
            for s in &mut self.sources {
                s.forget(&gone);
            }
            life.exited.clear();
            life.replaced.clear();
        } else if let Err(e) = p.purge_stacks() {
            warn!("purge unreferenced stacks: {e:#}");
            self.metrics.error("purge");
        }
        // Names come from the events of traced processes alone, and a fork's event may
        // be handled after its child was purged: only what the process table holds
        // after this purge keeps its name.
        let table: HashSet<u32> =
            traced.iter().map(|(pid, _)| *pid).filter(|pid| !forgotten.contains(pid)).collect();
        life.names.retain(|pid, _| table.contains(pid));
    }
}

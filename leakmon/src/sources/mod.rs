//! Where the daemon's data comes from.
//!
//! - [`proc_sampler`]: every process's memory from /proc, always (tier 0).
//! - An [`Attribution`]: how the allocations of the processes chosen for it reach the
//!   kernel's tables of unfreed blocks and stack totals (tier 1). [`uprobes`] traps
//!   every allocator call of those processes; [`agent`] loads the in-process sampler
//!   into them, so only sampled blocks cost a trap.
//!
//! - [`runtime_profiles`]: for suspects running Node.js or a JVM, the runtime's own
//!   sampling heap profiler (`--runtime-profilers`), whose snapshots stand in for the
//!   kernel's totals of those processes.
//!
//! Which processes are chosen is [`selection`]'s job: the ones named (`--pid`,
//! `--comm`, `--cgroup`), or the suspects the analysis flags, for a while each.

pub mod agent;
pub mod proc_sampler;
pub mod runtime_profiles;
pub mod selection;
pub mod uprobes;

use crate::{
    model::{Method, SeriesView},
    probes::Probes,
};
use proc_sampler::ProcSample;

/// One way of attributing allocations, as the daemon drives it: at its turns, it
/// starts and ends the attribution of processes. What it records goes to the kernel
/// tables (`kernel`), which the daemon reads for every attributed process alike.
pub trait Attribution {
    fn method(&self) -> Method;
    /// At each sampling turn, with the processes just read from /proc: take in newly
    /// selected processes and new images.
    fn sampled(&mut self, kernel: &mut Probes, procs: &[ProcSample]);
    /// After the analysis of that turn: start and end the attribution of suspects.
    fn analysed(&mut self, kernel: &mut Probes, views: &[SeriesView]);
    /// `pid` replaced its image (exec).
    fn exec(&mut self, pid: u32);
    /// Now and then: allocator files that appeared since (containers, upgrades).
    fn rescan(&mut self, kernel: &mut Probes);
    /// A reload changed the processes named.
    fn reselect(&mut self, kernel: &mut Probes, named: selection::Named);
    /// The allocator `pid`'s `malloc` reaches, where known.
    fn allocator(&self, pid: u32) -> Option<&'static str>;
    /// Whether `pid` is still being made ready (the agent loading into it): its unwind
    /// tables wait until it is, so that they cover what the load maps.
    fn loading(&self, _pid: u32) -> bool {
        false
    }
    /// Processes that are gone (and purged): forget them.
    fn forget(&mut self, gone: &dyn Fn(u32) -> bool);
    /// The daemon stops: undo in each process what was done to it.
    fn shutdown(&mut self, kernel: &mut Probes);
}

//! Where the daemon's data comes from.
//!
//! - [`process_memory`]: every process's memory, always (tier 0): from the kernel's
//!   task iterator in one pass, or from /proc ([`proc_sampler`]).
//! - [`Source`]s of unfreed totals per stack (tier 1), of the processes chosen for
//!   them. [`uprobes`] traps every allocator call of those processes; [`agent`] loads
//!   the in-process sampler into them, so only sampled blocks cost a trap; both record
//!   into the kernel's tables. [`runtime_profiles`], for suspects running Node.js or a JVM, asks the runtime's
//!   own sampling heap profiler (`--runtime-profilers`), whose snapshots stand in for
//!   the kernel's totals of those processes.
//!
//! How a chosen process's allocations reach the kernel is [`probing`]'s choice, the
//! same for `report`. Which processes are chosen is [`selection`]'s job: the ones named (`--pid`,
//! `--comm`, `--cgroup`), or the suspects the analysis flags, for a while each.

pub mod agent;
pub mod container;
pub mod probing;
pub mod proc_sampler;
pub mod process_memory;
pub mod runtime_profiles;
pub mod selection;
pub mod uprobes;

use crate::{
    model::{Method, SeriesView},
    probes::Probes,
    store::ProcessTotals,
};
use proc_sampler::ProcSample;

/// A source of unfreed totals, as the daemon drives it: at its turns, it starts and
/// ends the attribution of processes. Uprobes and the agent record into the kernel's
/// tables (`kernel`, absent only where the kernel refused the programs and no such
/// source runs), which the daemon reads once for them all; a runtime's profiler gives
/// figures of its own ([`Source::totals`]), which stand in for the kernel's for the
/// processes it speaks for.
pub trait Source {
    fn method(&self) -> Method;
    /// Whether its figures reach the kernel's tables.
    fn through_kernel(&self) -> bool {
        true
    }
    /// At each sampling turn, with the processes just read from /proc: take in newly
    /// selected processes and new images.
    fn sampled(&mut self, _kernel: Option<&mut Probes>, _procs: &[ProcSample]) {}
    /// After the analysis of that turn: start and end the attribution of suspects.
    fn analysed(&mut self, kernel: Option<&mut Probes>, views: &[SeriesView]);
    /// `pid` replaced its image (exec).
    fn exec(&mut self, _pid: u32) {}
    /// Now and then: allocator files that appeared since (containers, upgrades).
    fn rescan(&mut self, _kernel: Option<&mut Probes>) {}
    /// A reload changed the processes named.
    fn reselect(&mut self, _kernel: Option<&mut Probes>, _named: selection::Named) {}
    /// The allocator `pid`'s `malloc` reaches, where known.
    fn allocator(&self, _pid: u32) -> Option<&'static str> {
        None
    }
    /// Whether `pid` is still being made ready (the agent loading into it): its unwind
    /// tables wait until it is, so that they cover what the load maps.
    fn loading(&self, _pid: u32) -> bool {
        false
    }
    /// Figures of its own, of the processes it speaks for (see [`Source::speaks_for`]).
    fn totals(&self) -> Vec<ProcessTotals> {
        Vec::new()
    }
    /// Whether `pid` is seen through this source alone (its kernel totals, if any, set
    /// aside), from the start of its turn, before its first figures.
    fn speaks_for(&self, _pid: u32) -> bool {
        false
    }
    /// Processes that are gone (and purged): forget them.
    fn forget(&mut self, _gone: &dyn Fn(u32) -> bool) {}
    /// The daemon stops: undo in each process what was done to it.
    fn shutdown(&mut self, kernel: Option<&mut Probes>);
}

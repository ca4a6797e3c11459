//! Tier 0's reader: every process's memory each tick, from the kernel's task iterator
//! where it loads (one pass, see [`crate::probes::task_iter`]), else from /proc.
//!
//! The iterator gives the counters, the start time and the name; the cgroup a process
//! runs in (its service) is text only /proc has. That text is read once per process
//! and again when the process moves (its `css_set` changes), when it execs under a new
//! name, and at least every [`CGROUP_REFRESH`] ticks: an unchanged process costs no
//! file at all.

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use leakmon_common::task_memory::{page, TaskMemory};
use tracing::warn;

use super::proc_sampler::{self, identity_path, parse_cgroup, service_of, ProcSample};
use crate::{probes::task_iter::TaskIter, procfs::ProcRoot, values::MemorySource};

/// Ticks after which a process's cgroup is read again even if nothing says it moved
/// (a `css_set` freed and another made at the same address in between).
pub const CGROUP_REFRESH: u64 = 60;

/// What the last /proc read said of a process.
struct Known {
    start: u64,
    css_set: u64,
    comm: [u8; 16],
    read_at: u64,
    sample: ProcSample,
}

pub struct ProcessMemory {
    root: ProcRoot,
    iter: Option<TaskIter>,
    known: HashMap<u32, Known>,
    tick: u64,
    /// Nanoseconds per clock tick: /proc's start times are in ticks.
    ns_per_tick: u64,
    page_size: u64,
}

impl ProcessMemory {
    /// The reader `source` asks for; `auto` falls back to /proc with a warning saying
    /// why, `iterator` fails instead.
    pub fn new(source: MemorySource, root: ProcRoot) -> Result<Self> {
        let iter = match source {
            MemorySource::Proc => None,
            // A proc root of a test's own is read as such.
            _ if root.path() != std::path::Path::new("/proc") => None,
            MemorySource::Iterator => Some(TaskIter::load()?),
            MemorySource::Auto => match TaskIter::load() {
                Ok(iter) => Some(iter),
                Err(e) => {
                    warn!("reading process memory from /proc: the task iterator did not load: {e:#}");
                    None
                }
            },
        };
        // SAFETY: sysconf has no preconditions.
        let (ticks, page_size) =
            unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        let ns_per_tick = 1_000_000_000 / u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100);
        Ok(Self {
            root,
            iter,
            known: HashMap::new(),
            tick: 0,
            ns_per_tick,
            page_size: u64::try_from(page_size).ok().filter(|p| *p > 0).unwrap_or(4096),
        })
    }

    /// `iterator` or `proc`: what this tick's samples come from.
    pub fn source(&self) -> &'static str {
        if self.iter.is_some() {
            "iterator"
        } else {
            "proc"
        }
    }

    /// Every user-space process now.
    pub fn sample_all(&mut self) -> Vec<ProcSample> {
        self.tick += 1;
        let Some(iter) = self.iter.as_mut() else { return proc_sampler::sample_all(&self.root) };
        let records = match iter.pass() {
            Ok(records) => records,
            Err(e) => {
                warn!("reading process memory from /proc from now on: {e:#}");
                self.iter = None;
                self.known.clear();
                return proc_sampler::sample_all(&self.root);
            }
        };
        let mut out = Vec::with_capacity(records.len());
        let mut seen = HashSet::with_capacity(records.len());
        for r in &records {
            if let Some(sample) = self.sample_of(r) {
                seen.insert(r.pid);
                out.push(sample);
            }
        }
        self.known.retain(|pid, _| seen.contains(pid));
        out
    }

    fn sample_of(&mut self, r: &TaskMemory) -> Option<ProcSample> {
        if r.partial != 0 {
            // A part could not be read: this one from /proc, exact as ever.
            return proc_sampler::sample(&self.root, r.pid);
        }
        let start = r.start_ns / self.ns_per_tick;
        let bytes = |i: usize| r.pages[i] * self.page_size;
        let fresh = self.known.get(&r.pid).is_some_and(|k| {
            k.start == start
                && k.css_set == r.css_set
                && k.comm == r.comm
                && self.tick.saturating_sub(k.read_at) < CGROUP_REFRESH
        });
        if !fresh {
            let sample = self.read_names(r.pid, start, &r.comm)?;
            self.known
                .insert(r.pid, Known { start, css_set: r.css_set, comm: r.comm, read_at: self.tick, sample });
        }
        let known = self.known.get(&r.pid)?;
        let (anon, file, shmem) = (bytes(page::ANON), bytes(page::FILE), bytes(page::SHMEM));
        Some(ProcSample {
            rss_bytes: anon + file + shmem,
            anon_bytes: anon,
            swap_bytes: bytes(page::SWAP),
            file_bytes: file,
            shmem_bytes: shmem,
            ..known.sample.clone()
        })
    }

    /// The names of a process: its command from the record, its cgroups from /proc.
    fn read_names(&self, pid: u32, start: u64, comm: &[u8; 16]) -> Option<ProcSample> {
        let path = self.root.path().join(pid.to_string()).join("cgroup");
        let cgroups = crate::untrusted::read_text(&path, crate::untrusted::PROC_TEXT_LIMIT).ok()?;
        let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
        let comm = String::from_utf8_lossy(&comm[..end]).into_owned();
        let identity = identity_path(&cgroups);
        Some(ProcSample {
            pid,
            start,
            service: service_of(&identity, &comm),
            comm,
            cgroup: parse_cgroup(&cgroups),
            identity,
            rss_bytes: 0,
            anon_bytes: 0,
            swap_bytes: 0,
            file_bytes: 0,
            shmem_bytes: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both readers, side by side, on this host's processes: every process whose
    /// counters did not move between two passes of the iterator is the same in /proc,
    /// names and all.
    #[test]
    fn the_iterator_and_proc_agree_on_every_still_process() {
        let mut iter = ProcessMemory::new(MemorySource::Iterator, ProcRoot::default()).expect("iterator");
        assert_eq!(iter.source(), "iterator");
        let before = iter.sample_all();
        let proc = proc_sampler::sample_all(&ProcRoot::default());
        let after = iter.sample_all();
        let still: Vec<&ProcSample> = before.iter().filter(|b| after.contains(b)).collect();
        assert!(still.len() > 10, "{} still processes of {}", still.len(), before.len());
        let mut compared = 0;
        for s in still {
            // Gone in between, or moved: nothing to compare.
            let Some(p) = proc.iter().find(|p| p.pid == s.pid && p.start == s.start) else { continue };
            assert_eq!(p, s);
            compared += 1;
        }
        assert!(compared > 10, "{compared} compared");
        let proc_pids: std::collections::BTreeSet<u32> = proc.iter().map(|p| p.pid).collect();
        let iter_pids: std::collections::BTreeSet<u32> = before.iter().map(|p| p.pid).collect();
        // Processes that came or went between the reads aside, both see the same ones.
        let differ = proc_pids.symmetric_difference(&iter_pids).count();
        assert!(differ <= 5, "{differ} processes seen by one reader only");
    }

    #[test]
    fn a_proc_root_of_a_tests_own_is_read_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reader = ProcessMemory::new(MemorySource::Auto, ProcRoot::new(dir.path())).expect("reader");
        assert_eq!(reader.source(), "proc");
    }
}

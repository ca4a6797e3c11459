//! Tier 0's reader: every process's memory each tick, from the kernel's task iterator
//! where it loads (one pass, see [`crate::probes::task_iter`]), else from /proc.
//!
//! The iterator gives the counters, the start time and the name; the cgroup a process
//! runs in (its service) is text only /proc has. That text is read once per process
//! and again when the process moves (its `css_set` changes), when it execs under a new
//! name, and at least every [`CGROUP_REFRESH`] ticks: an unchanged process costs no
//! file at all.

use anyhow::Result;
use leakmon_common::task_memory::{page, TaskMemory};
use tracing::warn;

use super::proc_sampler::{self, identity_path, parse_cgroup, service_of, ProcSample};
use crate::{probes::task_iter::TaskIter, procfs::ProcRoot, values::MemorySource};

/// Ticks after which a process's cgroup is read again even if nothing says it moved
/// (a `css_set` freed and another made at the same address in between).
pub const CGROUP_REFRESH: u64 = 60;

/// What a process's names were read under: when any of it changes, they are read again.
#[derive(Clone, Copy)]
struct Read {
    pid: u32,
    start: u64,
    css_set: u64,
    comm: [u8; 16],
    at_tick: u64,
}

pub struct ProcessMemory {
    root: ProcRoot,
    iter: Option<TaskIter>,
    /// Last tick's samples, handed back ([`ProcessMemory::recycle`]), and what each one's
    /// names were read under; both in pid order, as the iterator writes them.
    parked: Vec<ProcSample>,
    parked_reads: Vec<Read>,
    /// This tick's, in the order of the samples returned.
    reads: Vec<Read>,
    /// An empty vector with room for a tick's samples, for the next tick's.
    spare: Vec<ProcSample>,
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
        // The kernel's BTF, parsed to load the iterator, is freed by now: give its pages
        // back rather than keep them for a daemon that will not need them again.
        if iter.is_some() {
            crate::own_memory::give_back();
        }
        // SAFETY: sysconf has no preconditions.
        let (ticks, page_size) =
            unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        let ns_per_tick = 1_000_000_000 / u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100);
        Ok(Self {
            root,
            iter,
            parked: Vec::new(),
            parked_reads: Vec::new(),
            reads: Vec::new(),
            spare: Vec::new(),
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

    /// Every user-space process now, in pid order.
    pub fn sample_all(&mut self) -> Vec<ProcSample> {
        self.tick += 1;
        let Some(iter) = self.iter.as_mut() else { return proc_sampler::sample_all(&self.root) };
        let records = match iter.pass() {
            Ok(records) => records,
            Err(e) => {
                warn!("reading process memory from /proc from now on: {e:#}");
                self.iter = None;
                return proc_sampler::sample_all(&self.root);
            }
        };
        // `TaskIter::pass` sorts them: the merge walk below relies on it.
        debug_assert!(records.is_sorted_by_key(|r| r.pid));
        // Walked beside last tick's samples, both in pid order: a process still there
        // with nothing changed keeps its names, moved rather than copied.
        let mut parked = std::mem::take(&mut self.parked);
        let mut parked_reads = std::mem::take(&mut self.parked_reads);
        let mut last = parked.drain(..).zip(parked_reads.drain(..)).peekable();
        let mut out = std::mem::take(&mut self.spare);
        out.clear();
        out.reserve(records.len());
        self.reads.clear();
        let ctx = Context {
            root: &self.root,
            tick: self.tick,
            ns_per_tick: self.ns_per_tick,
            page_size: self.page_size,
        };
        for r in records.iter() {
            while last.next_if(|(_, read)| read.pid < r.pid).is_some() {}
            let before = last.next_if(|(_, read)| read.pid == r.pid);
            if let Some((sample, read)) = ctx.sample_of(r, before) {
                out.push(sample);
                self.reads.push(read);
            }
        }
        drop(last);
        self.spare = parked;
        self.parked_reads = parked_reads;
        out
    }

    /// Gives back a tick's samples once used, for the next tick to keep their names.
    /// Without it every process's cgroup is read again next tick: slower, not wrong.
    pub fn recycle(&mut self, samples: Vec<ProcSample>) {
        let same =
            samples.len() == self.reads.len() && samples.iter().zip(&self.reads).all(|(s, r)| s.pid == r.pid);
        if same {
            self.parked = samples;
            std::mem::swap(&mut self.parked_reads, &mut self.reads);
        }
    }
}

/// What a tick's samples are made with.
struct Context<'a> {
    root: &'a ProcRoot,
    tick: u64,
    ns_per_tick: u64,
    page_size: u64,
}

impl Context<'_> {
    fn sample_of(&self, r: &TaskMemory, last: Option<(ProcSample, Read)>) -> Option<(ProcSample, Read)> {
        let start = r.start_ns / self.ns_per_tick;
        if r.partial != 0 {
            // A part could not be read: this one from /proc, exact as ever.
            let sample = proc_sampler::sample(self.root, r.pid)?;
            let read = Read { pid: r.pid, start: sample.start, css_set: 0, comm: [0; 16], at_tick: 0 };
            return Some((sample, read));
        }
        let unchanged = |read: &Read| {
            read.start == start
                && read.css_set == r.css_set
                && read.comm == r.comm
                && self.tick.saturating_sub(read.at_tick) < CGROUP_REFRESH
        };
        let (mut sample, read) = match last {
            Some((sample, read)) if unchanged(&read) => (sample, read),
            _ => (
                self.read_names(r.pid, start, &r.comm)?,
                Read { pid: r.pid, start, css_set: r.css_set, comm: r.comm, at_tick: self.tick },
            ),
        };
        let bytes = |i: usize| r.pages[i] * self.page_size;
        let (anon, file, shmem) = (bytes(page::ANON), bytes(page::FILE), bytes(page::SHMEM));
        sample.rss_bytes = anon + file + shmem;
        sample.anon_bytes = anon;
        sample.swap_bytes = bytes(page::SWAP);
        sample.file_bytes = file;
        sample.shmem_bytes = shmem;
        Some((sample, read))
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
        // Still processes of our own, whatever else the host runs.
        let mut sleepers: Vec<std::process::Child> = (0..20)
            .map(|_| std::process::Command::new("sleep").arg("60").spawn().expect("start sleep"))
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut iter = ProcessMemory::new(MemorySource::Iterator, ProcRoot::default()).expect("iterator");
        assert_eq!(iter.source(), "iterator");
        let before = iter.sample_all();
        iter.recycle(before.clone());
        let proc = proc_sampler::sample_all(&ProcRoot::default());
        let after = iter.sample_all();
        let still: Vec<&ProcSample> = before.iter().filter(|b| after.contains(b)).collect();
        assert!(still.len() >= 20, "{} still processes of {}", still.len(), before.len());
        let mut compared = 0;
        for s in still {
            // Gone in between, or moved: nothing to compare.
            let Some(p) = proc.iter().find(|p| p.pid == s.pid && p.start == s.start) else { continue };
            assert_eq!(p, s);
            compared += 1;
        }
        assert!(compared >= 20, "{compared} compared");
        for s in &mut sleepers {
            let _ = s.kill();
            let _ = s.wait();
        }
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

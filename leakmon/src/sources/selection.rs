//! Which processes get their allocations attributed: those named on the command line
//! or in the config, or the suspects the analysis flags, each for a bounded time.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::proc_sampler::{self, ProcSample};
use crate::{model::SeriesView, procfs::ProcRoot};

/// Processes named by pid, by name (`comm`) or by cgroup (that one or below it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Named {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub cgroups: Vec<String>,
}

impl Named {
    /// Whether names or cgroups select processes that may start later.
    pub fn open_ended(&self) -> bool {
        !(self.comms.is_empty() && self.cgroups.is_empty())
    }

    /// The processes named, among `procs` for names and cgroups; never leakmon itself.
    pub fn among(&self, procs: &[ProcSample]) -> Vec<u32> {
        let mut pids = self.pids.clone();
        let in_cgroup = |path: &str| {
            self.cgroups.iter().any(|c| {
                let c = c.trim_end_matches('/');
                path == c || path.starts_with(&format!("{c}/"))
            })
        };
        pids.extend(
            procs.iter().filter(|p| self.comms.contains(&p.comm) || in_cgroup(&p.identity)).map(|p| p.pid),
        );
        pids.retain(|&p| p != std::process::id());
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The processes named, as /proc shows them now.
    pub fn now(&self, proc_root: &ProcRoot) -> Vec<u32> {
        if self.open_ended() {
            self.among(&proc_sampler::sample_all(proc_root))
        } else {
            self.among(&[])
        }
    }
}

/// A step of a suspect's turn, for its source to take.
pub enum Turn<'v> {
    /// Start attributing `pid`, suspected in this series.
    Begin(u32, &'v SeriesView),
    /// Stop attributing `pid`: its time is up, or it is gone.
    End(u32),
}

/// `--attach suspects`: which processes are attributed, since when, and which had
/// their turn. A process is attributed once, for `duration`, and at most `max` at once.
pub struct Suspects {
    active: HashMap<u32, Instant>,
    /// Processes that had their turn, by pid and start time (read at the next
    /// [`Suspects::expired`]): forgotten once the process is gone, so the set is bounded
    /// by the living and a pid taken by a new process gives that one its turn.
    done: HashMap<u32, Option<u64>>,
    duration: Duration,
    max: usize,
}

impl Suspects {
    pub fn new(duration: Duration, max: usize) -> Self {
        Self { active: HashMap::new(), done: HashMap::new(), duration, max }
    }

    /// The attributions that end now: their time is up or the process is gone.
    pub fn expired(&mut self, proc_root: &ProcRoot) -> Vec<u32> {
        let expired: Vec<u32> = self
            .active
            .iter()
            .filter(|(pid, since)| since.elapsed() >= self.duration || !proc_root.exists(**pid))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in &expired {
            self.active.remove(pid);
            self.done.insert(*pid, None);
        }
        let start_of = |pid: u32| {
            let stat =
                crate::untrusted::read_text(&proc_root.path().join(pid.to_string()).join("stat"), 1 << 16)
                    .ok()?;
            proc_sampler::parse_stat(&stat).map(|(_, start)| start)
        };
        self.done.retain(|pid, start| match (start_of(*pid), *start) {
            (None, _) => false,
            (Some(now), None) => {
                *start = Some(now);
                true
            }
            (Some(now), Some(then)) => now == then,
        });
        expired
    }

    /// Processes of series suspected on resident memory that may start now, with
    /// their series, within the budget; each must then be [`Suspects::started`] or
    /// [`Suspects::refused`]. Never leakmon itself: probes in it would trap on its
    /// own allocations, and the kernel side ignores them anyway.
    pub fn candidates<'v>(&self, views: &'v [SeriesView]) -> Vec<(u32, &'v SeriesView)> {
        let mut out = Vec::new();
        for v in views.iter().filter(|v| v.suspected && v.signal == "anon") {
            for &pid in &v.pids {
                if pid == std::process::id()
                    || self.active.len() + out.len() >= self.max
                    || self.active.contains_key(&pid)
                    || self.done.contains_key(&pid)
                    || out.iter().any(|(p, _)| *p == pid)
                {
                    continue;
                }
                out.push((pid, v));
            }
        }
        out
    }

    /// One turn of the suspects, the same for every source that takes them: turns
    /// whose time is up (or whose process is gone) end, then new suspects begin, within
    /// the budget. `act` does each in its source, and says whether a `Begin` took; one
    /// that did not is not tried again. A source that learns later that a turn failed
    /// says [`Suspects::refused`].
    pub fn turn(
        &mut self,
        proc_root: &ProcRoot,
        views: &[SeriesView],
        mut act: impl FnMut(Turn<'_>) -> bool,
    ) {
        for pid in self.expired(proc_root) {
            act(Turn::End(pid));
        }
        for (pid, view) in self.candidates(views) {
            self.started(pid);
            if !act(Turn::Begin(pid, view)) {
                self.refused(pid);
            }
        }
    }

    pub fn started(&mut self, pid: u32) {
        self.active.insert(pid, Instant::now());
    }

    /// Nothing to attribute in `pid`, or it cannot be (its turn, if started, ends):
    /// not tried again.
    pub fn refused(&mut self, pid: u32) {
        self.active.remove(&pid);
        self.done.insert(pid, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leakmon_itself_is_never_a_suspect_to_attribute() {
        let mut ours = SeriesView::example("anon");
        ours.pids = vec![std::process::id(), 1];
        let suspects = Suspects::new(Duration::from_secs(60), 4);
        let picked: Vec<u32> = suspects.candidates(&[ours]).into_iter().map(|(pid, _)| pid).collect();
        assert_eq!(picked, [1]);
    }

    #[test]
    fn a_turn_is_remembered_while_its_process_lives_and_not_past_a_pid_reuse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stat = |start: u64| format!("42 (leaky) S 1 42 42 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0");
        std::fs::create_dir_all(dir.path().join("42")).expect("mkdir");
        std::fs::write(dir.path().join("42/stat"), stat(1000)).expect("stat");
        let root = ProcRoot::new(dir.path());
        let mut view = SeriesView::example("anon");
        view.suspected = true;
        view.pids = vec![42];
        let picked = |s: &Suspects| s.candidates(std::slice::from_ref(&view)).len();
        let mut suspects = Suspects::new(Duration::from_secs(60), 4);
        assert_eq!(picked(&suspects), 1);
        suspects.refused(42);
        suspects.expired(&root);
        assert_eq!(picked(&suspects), 0, "had its turn");
        suspects.expired(&root);
        assert_eq!(picked(&suspects), 0, "still the same process");
        // The pid now names another process: its turn.
        std::fs::write(dir.path().join("42/stat"), stat(2000)).expect("stat");
        suspects.expired(&root);
        assert_eq!(picked(&suspects), 1);
        // Gone: forgotten, so the set never grows past the living.
        suspects.refused(42);
        std::fs::remove_dir_all(dir.path().join("42")).expect("rm");
        suspects.expired(&root);
        assert!(suspects.done.is_empty());
    }

    #[test]
    fn names_and_cgroups_select_among_the_sampled() {
        let named = Named {
            pids: vec![7],
            comms: vec!["redis".into()],
            cgroups: vec!["/system.slice/a.service/".into()],
        };
        let proc = |pid, comm: &str, identity: &str| ProcSample {
            pid,
            start: 0,
            comm: comm.into(),
            service: String::new(),
            cgroup: proc_sampler::MemCgroup::default(),
            identity: identity.into(),
            rss_bytes: 0,
            anon_bytes: 0,
            swap_bytes: 0,
            file_bytes: 0,
            shmem_bytes: 0,
        };
        let procs = [
            proc(1, "redis", "/"),
            proc(2, "nginx", "/system.slice/a.service"),
            proc(3, "nginx", "/system.slice/a.service/x"),
            proc(4, "nginx", "/system.slice/ab.service"),
        ];
        assert_eq!(named.among(&procs), [1, 2, 3, 7]);
        assert!(named.open_ended());
    }
}

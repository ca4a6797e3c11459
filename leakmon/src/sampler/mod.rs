//! Tier 0, always on: resident and anonymous memory of every process from /proc, with
//! the identity that survives restarts (the service, from the cgroup) and the memory
//! limit that applies (the cgroup's `memory.max`, else the host's memory).
//!
//! No probe, no per-allocation cost: it sees every language and every allocator,
//! including a garbage-collected heap whose objects never pass through malloc.

use std::{fs, path::PathBuf};

use crate::procfs::ProcRoot;

/// One process at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcSample {
    pub pid: u32,
    /// Start time in clock ticks since boot: (pid, start) identifies a process.
    pub start: u64,
    pub comm: String,
    /// The systemd unit, container scope or cgroup leaf the process runs in.
    pub service: String,
    /// The cgroup path (v2), for its memory limit.
    pub cgroup: String,
    pub rss_bytes: u64,
    pub anon_bytes: u64,
}

/// Reads every user-space process (kernel threads have no resident memory line).
pub fn sample_all(root: &ProcRoot) -> Vec<ProcSample> {
    root.pids().unwrap_or_default().into_iter().filter_map(|pid| sample(root, pid)).collect()
}

/// Reads one process; `None` if it is gone or a kernel thread.
pub fn sample(root: &ProcRoot, pid: u32) -> Option<ProcSample> {
    let dir = root.path().join(pid.to_string());
    let status = fs::read_to_string(dir.join("status")).ok()?;
    let rss_bytes = status_kib(&status, "VmRSS:")? * 1024;
    let anon_bytes = status_kib(&status, "RssAnon:").unwrap_or(0) * 1024;
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    let (comm, start) = parse_stat(&stat)?;
    let cgroup = fs::read_to_string(dir.join("cgroup")).ok().map(|c| parse_cgroup(&c)).unwrap_or_default();
    let service = service_of(&cgroup, &comm);
    Some(ProcSample { pid, start, comm, service, cgroup, rss_bytes, anon_bytes })
}

/// A `Key:   123 kB` line of /proc/PID/status, in KiB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().next()?.parse().ok()
}

/// `comm` and start time (field 22) of /proc/PID/stat; the name may hold spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let start = stat.get(close + 2..)?.split_whitespace().nth(19)?.parse().ok()?;
    Some((comm, start))
}

/// The unified (v2) cgroup path of a /proc/PID/cgroup file.
pub fn parse_cgroup(text: &str) -> String {
    text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").trim().to_owned()
}

/// The service a process belongs to: the innermost systemd unit (`.service`, `.scope`)
/// or container on its cgroup path; its name where there is none.
pub fn service_of(cgroup: &str, comm: &str) -> String {
    cgroup
        .rsplit('/')
        .find(|part| part.ends_with(".service") || part.ends_with(".scope"))
        .or_else(|| cgroup.rsplit('/').find(|p| !p.is_empty()))
        .map_or_else(|| comm.to_owned(), str::to_owned)
}

/// The memory limit for a cgroup: its (or an ancestor's) `memory.max`, else the
/// host's total memory.
pub fn memory_limit(cgroup_root: &std::path::Path, cgroup: &str, meminfo: &str) -> Option<u64> {
    let mut path = PathBuf::from(cgroup_root);
    let mut limit: Option<u64> = None;
    for part in cgroup.split('/').filter(|p| !p.is_empty()) {
        path.push(part);
        if let Ok(text) = fs::read_to_string(path.join("memory.max")) {
            if let Ok(v) = text.trim().parse::<u64>() {
                limit = Some(limit.map_or(v, |l| l.min(v)));
            }
        }
    }
    limit.or_else(|| status_kib(meminfo, "MemTotal:").map(|k| k * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 12345678 300";
        assert_eq!(parse_stat(stat), Some(("my (odd) name".to_owned(), 987_654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn service_identity_from_the_cgroup() {
        assert_eq!(parse_cgroup("0::/system.slice/nginx.service\n"), "/system.slice/nginx.service");
        assert_eq!(parse_cgroup("12:memory:/x\n"), "/");
        assert_eq!(service_of("/system.slice/nginx.service", "nginx"), "nginx.service");
        assert_eq!(service_of("/system.slice/docker-abc.scope/app", "app"), "docker-abc.scope");
        assert_eq!(service_of("/kubepods/pod1/ctr", "app"), "ctr");
        assert_eq!(service_of("/", "bash"), "bash");
    }

    #[test]
    fn limit_from_cgroup_or_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        fs::write(dir.path().join("a/memory.max"), "1048576\n").expect("write");
        fs::write(dir.path().join("a/b/memory.max"), "max\n").expect("write");
        let meminfo = "MemTotal:       24576000 kB\nMemFree: 1 kB\n";
        assert_eq!(memory_limit(dir.path(), "/a/b", meminfo), Some(1_048_576));
        assert_eq!(memory_limit(dir.path(), "/other", meminfo), Some(24_576_000 * 1024));
    }

    #[test]
    fn samples_this_process() {
        let me = sample(&ProcRoot::default(), std::process::id()).expect("self");
        assert!(me.rss_bytes > 1024 * 1024, "{me:?}");
        assert!(me.anon_bytes > 0 && me.anon_bytes <= me.rss_bytes);
        assert!(me.start > 0);
        assert!(!me.service.is_empty());
    }
}

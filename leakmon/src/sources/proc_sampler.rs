//! Tier 0, always on: resident and anonymous memory of every process from /proc, with
//! the identity that survives restarts (the service, from the cgroup) and the memory
//! limit that applies (the cgroup's `memory.max`, else the host's memory).
//!
//! No probe, no per-allocation cost: it sees every language and every allocator,
//! including a garbage-collected heap whose objects never pass through malloc.

use std::{fs, path::PathBuf};

use crate::procfs::{status_kib, ProcRoot};

/// One process at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcSample {
    pub pid: u32,
    /// Start time in clock ticks since boot: (pid, start) identifies a process.
    pub start: u64,
    pub comm: String,
    /// The systemd unit, container scope or cgroup leaf the process runs in.
    pub service: String,
    /// The memory cgroup: its path and whether it is on a v1 hierarchy.
    pub cgroup: MemCgroup,
    /// The cgroup path that names the service (see [`identity_path`]).
    pub identity: String,
    /// Resident memory, file-backed pages included (`VmRSS`).
    pub rss_bytes: u64,
    /// Anonymous resident memory (`RssAnon`).
    pub anon_bytes: u64,
    /// Swapped-out anonymous memory (`VmSwap`): where a leak goes under pressure.
    pub swap_bytes: u64,
    /// File-backed resident pages (`RssFile`): cache the kernel can drop.
    pub file_bytes: u64,
    /// Resident shared memory (`RssShmem`: tmpfs, shm segments, memfd).
    pub shmem_bytes: u64,
}

impl ProcSample {
    /// The leak signal: memory the kernel cannot drop, resident or swapped out.
    pub fn unreclaimable_bytes(&self) -> u64 {
        self.anon_bytes + self.swap_bytes
    }
}

/// Reads every user-space process (kernel threads have no resident memory line).
pub fn sample_all(root: &ProcRoot) -> Vec<ProcSample> {
    root.pids().unwrap_or_default().into_iter().filter_map(|pid| sample(root, pid)).collect()
}

/// Reads one process; `None` if it is gone or a kernel thread.
pub fn sample(root: &ProcRoot, pid: u32) -> Option<ProcSample> {
    let dir = root.path().join(pid.to_string());
    // As bytes: a process's name is any bytes it likes, and one that is not UTF-8
    // must not vanish from the samples.
    let text = |name: &str| crate::untrusted::read_text(&dir.join(name), crate::untrusted::PROC_TEXT_LIMIT);
    let status = text("status").ok()?;
    let rss_bytes = status_kib(&status, "VmRSS:")? * 1024;
    let kib = |key| status_kib(&status, key).unwrap_or(0) * 1024;
    let (anon_bytes, swap_bytes, file_bytes, shmem_bytes) =
        (kib("RssAnon:"), kib("VmSwap:"), kib("RssFile:"), kib("RssShmem:"));
    let stat_text = text("stat").ok()?;
    let (comm, start) = parse_stat(&stat_text)?;
    let cgroups = text("cgroup").unwrap_or_default();
    let cgroup = parse_cgroup(&cgroups);
    let identity = identity_path(&cgroups);
    let service = service_of(&identity, &comm);
    Some(ProcSample {
        pid,
        start,
        comm,
        service,
        cgroup,
        identity,
        rss_bytes,
        anon_bytes,
        swap_bytes,
        file_bytes,
        shmem_bytes,
    })
}

/// `comm` and start time (field 22) of /proc/PID/stat; the name may hold spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn parse_stat(line: &str) -> Option<(String, u64)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_owned();
    let started = line.get(close + 2..)?.split_whitespace().nth(19)?.parse().ok()?;
    Some((comm, started))
}

/// A memory cgroup: where its limit lives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemCgroup {
    pub path: String,
    /// On a v1 `memory` hierarchy (hybrid hosts) rather than the unified one.
    pub v1: bool,
}

/// The memory cgroup of a /proc/PID/cgroup file: the v1 `memory` controller's where
/// one is mounted (hybrid hosts), else the unified (v2) path.
pub fn parse_cgroup(text: &str) -> MemCgroup {
    let v1 = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers.split(',').any(|c| c == "memory").then(|| path.trim().to_owned())
    });
    match v1 {
        Some(path) => MemCgroup { path, v1: true },
        None => MemCgroup { path: unified(text), v1: false },
    }
}

fn unified(text: &str) -> String {
    text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").trim().to_owned()
}

/// The path that names a process's service: the unified one, or on hybrid hosts where
/// that is the root, systemd's named v1 hierarchy, then the memory controller's.
pub fn identity_path(text: &str) -> String {
    let v2 = unified(text);
    if v2 != "/" {
        return v2;
    }
    let named = |name: &str| {
        text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            (controllers.split(',').any(|c| c == name) && path.trim() != "/").then(|| path.trim().to_owned())
        })
    };
    named("name=systemd").or_else(|| named("memory")).unwrap_or(v2)
}

/// The service a process belongs to: the innermost systemd unit (`.service`, `.scope`)
/// or container on its cgroup path; its name where there is none.
pub fn service_of(cgroup: &str, comm: &str) -> String {
    cgroup
        .rsplit('/')
        // systemd unit names are case-sensitive: `.Service` is not a unit.
        .find(|part| {
            #[expect(
                clippy::case_sensitive_file_extension_comparisons,
                reason = "unit suffixes are case-sensitive"
            )]
            let unit = part.ends_with(".service") || part.ends_with(".scope");
            unit
        })
        .or_else(|| cgroup.rsplit('/').find(|p| !p.is_empty()))
        .map_or_else(|| comm.to_owned(), str::to_owned)
}

/// v1 reports "no limit" as a huge number near `i64::MAX`.
const V1_UNLIMITED: u64 = 1 << 60;

/// The memory limit for a cgroup: the smallest of its and its ancestors' limits
/// (`memory.max`, or v1's `memory.limit_in_bytes`), else the host's total memory.
pub fn memory_limit(cgroup_root: &std::path::Path, cgroup: &MemCgroup, meminfo: &str) -> Option<u64> {
    let (mut path, file) = if cgroup.v1 {
        (cgroup_root.join("memory"), "memory.limit_in_bytes")
    } else if cgroup_root.join("cgroup.controllers").exists() || !cgroup_root.join("unified").is_dir() {
        (PathBuf::from(cgroup_root), "memory.max")
    } else {
        (cgroup_root.join("unified"), "memory.max")
    };
    let mut limit: Option<u64> = None;
    for part in cgroup.path.split('/').filter(|p| !p.is_empty()) {
        path.push(part);
        if let Ok(text) = fs::read_to_string(path.join(file)) {
            if let Ok(v) = text.trim().parse::<u64>() {
                if v < V1_UNLIMITED {
                    limit = Some(limit.map_or(v, |l| l.min(v)));
                }
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
        let stat =
            "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 12345678 300";
        assert_eq!(parse_stat(stat), Some(("my (odd) name".to_owned(), 987_654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn service_identity_from_the_cgroup() {
        assert_eq!(
            parse_cgroup("0::/system.slice/nginx.service\n"),
            MemCgroup { path: "/system.slice/nginx.service".into(), v1: false }
        );
        let hybrid = "9:name=systemd:/system.slice/x.service\n4:memory:/mem/x\n0::/\n";
        assert_eq!(parse_cgroup(hybrid), MemCgroup { path: "/mem/x".into(), v1: true });
        assert_eq!(identity_path(hybrid), "/system.slice/x.service");
        assert_eq!(identity_path("9:name=systemd:/\n4:memory:/api/abc\n0::/\n"), "/api/abc");
        assert_eq!(identity_path("0::/a.scope\n"), "/a.scope");
        assert_eq!(service_of("/system.slice/nginx.service", "nginx"), "nginx.service");
        assert_eq!(service_of("/system.slice/docker-abc.scope/app", "app"), "docker-abc.scope");
        assert_eq!(service_of("/kubepods/pod1/ctr", "app"), "ctr");
        assert_eq!(service_of("/", "bash"), "bash");
    }

    #[test]
    fn limit_from_cgroup_or_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("cgroup.controllers"), "memory\n").expect("write");
        fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        fs::write(dir.path().join("a/memory.max"), "1048576\n").expect("write");
        fs::write(dir.path().join("a/b/memory.max"), "max\n").expect("write");
        fs::create_dir_all(dir.path().join("memory/m")).expect("mkdir");
        fs::write(dir.path().join("memory/m/memory.limit_in_bytes"), "67108864\n").expect("write");
        fs::create_dir_all(dir.path().join("memory/u")).expect("mkdir");
        fs::write(dir.path().join("memory/u/memory.limit_in_bytes"), "9223372036854771712\n").expect("write");
        let meminfo = "MemTotal:       24576000 kB\nMemFree: 1 kB\n";
        let v2 = |p: &str| MemCgroup { path: p.into(), v1: false };
        let v1 = |p: &str| MemCgroup { path: p.into(), v1: true };
        assert_eq!(memory_limit(dir.path(), &v2("/a/b"), meminfo), Some(1_048_576));
        assert_eq!(memory_limit(dir.path(), &v2("/other"), meminfo), Some(24_576_000 * 1024));
        assert_eq!(memory_limit(dir.path(), &v1("/m"), meminfo), Some(67_108_864));
        assert_eq!(memory_limit(dir.path(), &v1("/u"), meminfo), Some(24_576_000 * 1024), "v1 unlimited");
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

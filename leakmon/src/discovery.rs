//! Which library files to probe: the allocator libraries that processes map.
//!
//! Sources: a process's /proc/PID/maps (opened through /proc/PID/root, so containers
//! resolve to their own files) and the dynamic linker's cache (`ldconfig -p`) for
//! libraries a command about to start will load. Never a bare library name.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use crate::{probes::targets::is_allocator_library, procfs::ProcRoot};

/// Allocator libraries mapped by `pid`, as paths openable from here.
pub fn libraries_of(proc_root: &ProcRoot, pid: u32) -> Vec<PathBuf> {
    let Ok(maps) = proc_root.maps(pid) else { return Vec::new() };
    let paths: BTreeSet<PathBuf> = maps
        .into_iter()
        .filter(|m| m.executable && is_allocator_library(&m.path))
        .map(|m| proc_root.in_root(pid, &m.path))
        .collect();
    paths.into_iter().collect()
}

/// Allocator libraries mapped by any process on the host.
pub fn libraries_of_all(proc_root: &ProcRoot) -> Vec<PathBuf> {
    proc_root.pids().unwrap_or_default().into_iter().flat_map(|pid| libraries_of(proc_root, pid)).collect()
}

/// Allocator libraries the dynamic linker would load for a new process.
pub fn libraries_in_linker_cache() -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldconfig").arg("-p").output() else { return Vec::new() };
    parse_ldconfig(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `ldconfig -p` output: entries of this build's architecture only (ldconfig
/// tags them `(libc6,x86-64)`, `(libc6,AArch64)`; 32-bit ones carry no such tag).
pub fn parse_ldconfig(text: &str) -> Vec<PathBuf> {
    let native = match std::env::consts::ARCH {
        "x86_64" => "x86-64",
        "aarch64" => "AArch64",
        other => other,
    };
    text.lines()
        .filter_map(|line| {
            let (left, path) = line.split_once(" => ")?;
            left.contains(native).then(|| PathBuf::from(path.trim()))
        })
        .filter(|p| is_allocator_library(p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linker_cache_entries() {
        let text = "1234 libs found in cache `/etc/ld.so.cache'
\tlibstdc++.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libstdc++.so.6
\tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6
\tlibc.so.6 (libc6) => /lib/i386-linux-gnu/libc.so.6
\tlibcap.so.2 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcap.so.2
";
        assert_eq!(
            parse_ldconfig(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libstdc++.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")
            ]
        );
    }

    #[test]
    fn this_process_maps_libc() {
        let libs = libraries_of(&ProcRoot::default(), std::process::id());
        assert!(libs.iter().any(|p| p.to_string_lossy().contains("libc.so")), "{libs:?}");
        assert!(libs.iter().all(|p| p.starts_with(format!("/proc/{}/root", std::process::id()))));
    }
}

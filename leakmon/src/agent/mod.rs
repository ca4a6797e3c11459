//! The in-process sampling agent: a small shared library (`agent/agent.c`, built by
//! build.rs and embedded here) that takes the sampling decision inside the process,
//! so that only sampled allocations and their frees reach a uprobe (see the C file for
//! what it does in the process, and the rules it keeps there).
//!
//! This module writes the library where processes can map it, and loads it: into a
//! command at its start (`LD_PRELOAD`), or into a running process ([`inject`]).

pub mod inject;
pub mod inline;
pub mod pace;
pub mod seccomp;
pub mod session;

use std::{
    ffi::OsString,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// The agent library, as built for this binary.
pub const LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libleakmon_agent.so"));

/// The same agent without the C library, for programs without a dynamic loader
/// (statically linked): leakmon maps it itself and it has inline hooks only.
pub const FREESTANDING: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libleakmon_agent_freestanding.so"));

/// The environment variable the preloaded agent reads its interval from.
pub const SAMPLE_BYTES_ENV: &str = "LEAKMON_AGENT_SAMPLE_BYTES";

const FILE_PREFIX: &str = "leakmon-agent-";

/// Whether `path` names a copy of the agent (its frames are leakmon's own, never
/// shown): its file, or its copy in a memory file (`/memfd:NAME`).
pub fn is_agent(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_prefix(MEMFD_PREFIX).unwrap_or(n))
        .is_some_and(|n| n.starts_with(FILE_PREFIX) && n.ends_with(".so"))
}

/// How a memory file's mapping is named in /proc/PID/maps (`/memfd:NAME (deleted)`).
const MEMFD_PREFIX: &str = "memfd:";

/// Whether mapping `m` is of the agent file `agent`: the file itself, or its copy in a
/// memory file, where the process's mount namespace (a container's) does not reach the
/// file (see [`inject`]).
pub fn maps_agent(m: &crate::procfs::Mapping, agent: &Path) -> bool {
    m.path == agent
        || (m.deleted
            && agent.file_name().is_some_and(|name| {
                m.path.as_os_str().as_encoded_bytes().strip_prefix(b"/memfd:")
                    == Some(name.as_encoded_bytes())
            }))
}

/// The name of the memory file a copy of `agent` is put in.
pub fn memfd_name(agent: &Path) -> String {
    agent.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Where leakmon reaches each copy of the agent (or its twin) that `pid` maps from a
/// memory file: `/proc/PID/map_files/RANGE`, for the markers' probes.
pub fn copies_in(proc_root: &crate::procfs::ProcRoot, pid: u32, agent: &Path) -> Vec<PathBuf> {
    let Ok(maps) = proc_root.maps(pid) else { return Vec::new() };
    let root = proc_root.in_root(pid, Path::new("/"));
    let files = files(agent);
    let mut seen = std::collections::HashSet::new();
    maps.iter()
        .filter(|m| m.deleted && m.offset == 0 && files.iter().any(|f| maps_agent(m, f)))
        .filter(|m| seen.insert(m.inode))
        .map(|m| m.open_path(&root))
        .collect()
}

/// Writes the agent (and its freestanding twin, beside it: see [`freestanding`]) to
/// `/run/leakmon` (or the temporary directory where that is not writable) under a name
/// made from its content, readable by every user (a process of any user maps it),
/// unless that file is already there. Returns the agent's path.
pub fn install() -> Result<PathBuf> {
    let run = Path::new("/run/leakmon");
    let dir = if std::fs::create_dir_all(run).is_ok() && writable(run) {
        run.to_owned()
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(name(LIBRARY));
    write_once(&path, LIBRARY)?;
    write_once(&freestanding(&path), FREESTANDING)?;
    Ok(path)
}

/// The files whose markers the kernel side probes: the agent at `agent`, and its
/// freestanding twin beside it where one was installed.
pub fn files(agent: &Path) -> Vec<PathBuf> {
    let twin = freestanding(agent);
    let twin = twin.exists().then_some(twin);
    std::iter::once(agent.to_owned()).chain(twin).collect()
}

/// The freestanding agent installed beside the agent at `agent`.
pub fn freestanding(agent: &Path) -> PathBuf {
    agent.with_file_name(name(FREESTANDING))
}

fn name(bytes: &[u8]) -> String {
    format!("{FILE_PREFIX}{:016x}.so", fnv1a(bytes))
}

fn write_once(path: &Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|b| b == bytes) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // Written aside and renamed: a process never maps half a library.
    let partial = dir.join(format!(".{name}.{}", std::process::id()));
    let mut file = std::fs::File::create(&partial)
        .with_context(|| format!("write the agent to {}", partial.display()))?;
    file.write_all(bytes).with_context(|| format!("write the agent to {}", partial.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o644)).context("make the agent readable")?;
    drop(file);
    std::fs::rename(&partial, path).with_context(|| format!("put the agent at {}", path.display()))?;
    Ok(())
}

fn writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// `LD_PRELOAD` for a command: the agent first, then what the command had.
pub fn preload(agent: &Path, existing: Option<OsString>) -> OsString {
    let mut value = agent.as_os_str().to_owned();
    if let Some(existing) = existing.filter(|e| !e.is_empty()) {
        value.push(":");
        value.push(existing);
    }
    value
}

/// FNV-1a: a stable name for the library's content.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_files_are_told_by_name() {
        assert!(is_agent(Path::new("/run/leakmon/leakmon-agent-0123456789abcdef.so")));
        assert!(!is_agent(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6")));
        assert!(!is_agent(Path::new("/tmp/leakmon-agent-notes.txt")));
    }

    #[test]
    fn preload_puts_the_agent_first() {
        let agent = Path::new("/run/leakmon/leakmon-agent-1.so");
        assert_eq!(preload(agent, None), "/run/leakmon/leakmon-agent-1.so");
        assert_eq!(preload(agent, Some("".into())), "/run/leakmon/leakmon-agent-1.so");
        assert_eq!(
            preload(agent, Some("/usr/lib/libjemalloc.so.2".into())),
            "/run/leakmon/leakmon-agent-1.so:/usr/lib/libjemalloc.so.2"
        );
    }

    /// The agent decides with the same numbers as the kernel side: its countdown and
    /// weight functions, called in the library itself, agree with leakmon-common's.
    #[test]
    fn the_agent_samples_with_leakmon_commons_tables() {
        use leakmon_common::sampling::{countdown, weight};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("leakmon-agent-test.so");
        std::fs::write(&path, LIBRARY).expect("write the agent");
        // SAFETY: loading the agent only runs its constructor, which does nothing
        // without its environment variable; the two functions are pure.
        unsafe {
            let path_c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
            let agent = libc::dlopen(path_c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            assert!(!agent.is_null(), "dlopen the agent");
            let c = libc::dlsym(agent, c"leakmon_agent_countdown".as_ptr());
            let w = libc::dlsym(agent, c"leakmon_agent_weight".as_ptr());
            assert!(!c.is_null() && !w.is_null());
            let c: extern "C" fn(u32, u64) -> u64 = std::mem::transmute(c);
            let w: extern "C" fn(u64, u64) -> u64 = std::mem::transmute(w);
            for rate in [1u64, 4096, 512 * 1024, 1 << 30] {
                for random in (0..1024u32).chain([u32::MAX, 0x8000_0000]) {
                    assert_eq!(c(random, rate), countdown(random, rate), "countdown({random}, {rate})");
                }
                for size in
                    (0..40u64).chain((1..200).map(|i| i * rate / 8 + 3)).chain([16 * rate, u32::MAX as u64])
                {
                    assert_eq!(w(size, rate), weight(size, rate), "weight({size}, {rate})");
                }
            }
        }
    }
}

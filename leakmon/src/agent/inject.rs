//! Loading the agent into a running process, or into a command held at its entry, and
//! unloading it: the policy (which agent, which hooks, all or nothing), on the ptrace
//! engine of [`super::remote`].

use std::{os::unix::fs::FileExt as _, path::Path};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::{
    sys::ptrace::{self, Options},
    unistd::Pid,
};

use super::inline;
use crate::{
    procfs::{Mapping, ProcRoot},
    ptrace::remote::{open_mem, Held, Remote, Syscalls},
};

/// Loads the agent at `agent` into `pid` (unless it is there already) and starts it
/// sampling every `sample_bytes`; returns the number of call slots and functions it
/// redirected. A statically linked program gets the freestanding agent, mapped by
/// leakmon, and inline hooks only.
pub fn load(proc_root: &ProcRoot, pid: u32, agent: &Path, sample_bytes: u64) -> Result<u64> {
    super::seccomp::check(proc_root, pid)?;
    let remote = Remote::new(proc_root, pid)?;
    let root = proc_root.path().join(pid.to_string()).join("root");
    let maps = proc_root.maps(pid).with_context(|| format!("read the mappings of pid {pid}"))?;
    if !glibc_loader(proc_root, pid, &maps)? {
        let targets = inline::targets(proc_root, pid, &maps)?;
        return load_freestanding(proc_root, &remote, pid, agent, sample_bytes, &targets, None);
    }
    if !maps.iter().any(|m| super::maps_agent(m, agent)) {
        let dlopen = remote
            .symbol(&maps, &root, "dlopen", None)
            .ok_or_else(|| anyhow!("pid {pid} has no dlopen to load the agent with"))?;
        // Its own mount namespace (a container's) may not reach the agent's file: a
        // copy in a memory file of its own, opened through its /proc/self/fd.
        let copy = if reaches(&root, agent) { None } else { Some(memfd_copy(&remote, pid, agent)?) };
        let path = match copy {
            Some(fd) => format!("/proc/self/fd/{fd}").into_bytes(),
            None => agent.as_os_str().as_encoded_bytes().to_vec(),
        };
        let handle = remote.call(dlopen, [0, libc::RTLD_NOW as u64, 0], Some(&path));
        if let Some(fd) = copy {
            // The mapping keeps the copy; the descriptor goes.
            remote
                .with_syscalls(|sys| sys.close(fd))
                .with_context(|| format!("close the agent's memory file in pid {pid}"))?;
        }
        if handle? == 0 {
            bail!("dlopen of the agent failed in pid {pid}");
        }
    }
    let maps = proc_root.maps(pid).with_context(|| format!("read the mappings of pid {pid}"))?;
    let in_file = maps.iter().find(|m| super::maps_agent(m, agent)).map(|m| m.path.clone());
    let start = remote
        .symbol(&maps, &root, "leakmon_agent_start", in_file.as_deref())
        .ok_or_else(|| anyhow!("the agent is not mapped in pid {pid} after dlopen"))?;
    let slots = remote.call(start, [sample_bytes, 0, 0], None)? as i64;
    match slots {
        -3 => bail!(
            "pid {pid} already has the agent sampling for another leakmon: it is left to that one (nothing was changed)"
        ),
        ..0 => bail!("the agent in pid {pid} refused to start ({slots})"),
        _ => {}
    }
    // All or nothing: a failure past the start takes the redirections back out.
    let hooked = (|| -> Result<u64> {
        fail::fail_point!("agent-after-start", |_| Err(anyhow!("pid {pid}: hooking failed (injected)")));
        let targets = inline::targets(proc_root, pid, &maps)?;
        if targets.is_empty() {
            return Ok(0);
        }
        let (lo, hi) = executable_span(proc_root, pid, &maps)?;
        let region = remote.with_syscalls(|sys| sys.map_near(lo, hi, inline::region_size(&targets)))?;
        let symbols = inline::AgentSymbols::new(agent, mapped_at(&maps, agent, pid)?)?;
        hook_inline(proc_root, pid, &symbols, &targets, region, false)
    })();
    match hooked {
        Ok(hooked) => Ok(slots as u64 + hooked),
        Err(e) => {
            let stop = remote.symbol(&maps, &root, "leakmon_agent_stop", in_file.as_deref());
            let undone = stop.map(|stop| remote.call(stop, [0, 0, 0], None));
            match undone {
                Some(Ok(_)) => Err(e.context(format!("pid {pid}: the agent's redirections were taken back"))),
                Some(Err(u)) => Err(
                    e.context(format!("pid {pid}: and taking the agent's redirections back failed: {u:#}"))
                ),
                None => Err(e),
            }
        }
    }
}

/// Loads the agent into `pid`, a command leakmon started and holds with ptrace at its
/// entry point, before its first instruction (so with one thread): a statically
/// linked one gets the freestanding agent; one that preloaded the agent gets inline
/// hooks on its executable's own allocator functions. `options` are the tracer's
/// ptrace options, put back afterwards. Returns how many functions were hooked.
pub fn load_at_entry(
    proc_root: &ProcRoot,
    pid: u32,
    agent: &Path,
    sample_bytes: u64,
    options: Options,
) -> Result<u64> {
    let maps = proc_root.maps(pid).with_context(|| format!("read the mappings of pid {pid}"))?;
    let statically_linked = !glibc_loader(proc_root, pid, &maps)?;
    let targets = inline::targets(proc_root, pid, &maps)?;
    if !statically_linked && (targets.is_empty() || !maps.iter().any(|m| super::maps_agent(m, agent))) {
        return Ok(0);
    }
    let tid = Pid::from_raw(pid as i32);
    let remote = Remote { pid, mem: open_mem(proc_root, pid)? };
    let regs = ptrace::getregs(tid).context("read registers")?;
    let syscall_at = syscall_instruction(&remote, proc_root, pid, &maps)?;
    ptrace::setoptions(tid, options | Options::PTRACE_O_TRACESYSGOOD).context("set ptrace options")?;
    let mut held = Held::borrowed(tid);
    let at_entry = Syscalls { remote: &remote, held: &mut held, regs, syscall_at };
    let result = if statically_linked {
        load_freestanding(proc_root, &remote, pid, agent, sample_bytes, &targets, Some(at_entry))
    } else {
        (|| {
            let (lo, hi) = executable_span(proc_root, pid, &maps)?;
            let mut sys = at_entry;
            let region = sys.map_near(lo, hi, inline::region_size(&targets))?;
            let symbols = inline::AgentSymbols::new(agent, mapped_at(&maps, agent, pid)?)?;
            hook_inline(proc_root, pid, &symbols, &targets, region, true)
        })()
    };
    let put_back = ptrace::setregs(tid, regs).context("restore registers");
    let _ = ptrace::setoptions(tid, options);
    let hooked = result?;
    put_back?;
    Ok(hooked)
}

/// The freestanding agent into a statically linked `pid`: mapped, with its tables and
/// a region for trampolines, by syscalls run in the process (in `at_entry`, or in its
/// main thread borrowed at a safe point); then its tables and interval are written
/// into it, and the inline hooks put on. Nothing is called in the process.
fn load_freestanding(
    proc_root: &ProcRoot,
    remote: &Remote,
    pid: u32,
    agent: &Path,
    sample_bytes: u64,
    targets: &[inline::Target],
    at_entry: Option<Syscalls>,
) -> Result<u64> {
    let library = super::freestanding(agent);
    if targets.is_empty() {
        bail!(
            "pid {pid} is statically linked and its executable names no allocator function leakmon can hook (stripped?): nothing was changed"
        );
    }
    let maps = proc_root.maps(pid).with_context(|| format!("read the mappings of pid {pid}"))?;
    let (lo, hi) = executable_span(proc_root, pid, &maps)?;
    let mapped = maps.iter().find(|m| super::maps_agent(m, &library) && m.offset == 0).map(|m| m.start);
    let root = proc_root.path().join(pid.to_string()).join("root");
    let copy = !reaches(&root, &library);
    if let Some(base) = mapped {
        let symbols = inline::AgentSymbols::new(&library, base)?;
        if remote.read_u64(symbols.get("rate")?)? != 0 {
            bail!(
                "pid {pid} already has the agent sampling for another leakmon: it is left to that one (nothing was changed)"
            );
        }
    }
    let tables = leakmon_common::agent::table_bytes();
    let setup = |sys: &mut Syscalls| -> Result<(inline::AgentSymbols, Option<u64>, u64)> {
        let base = match mapped {
            Some(base) => base,
            None if copy => {
                // Not reached from its mount namespace (a container's): a copy in a
                // memory file of its own, mapped from there.
                let fd = sys.memfd(&super::memfd_name(&library))?;
                let base = fill_memfd(pid, fd, &library).and_then(|()| sys.map_library(&library, Some(fd)));
                sys.close(fd)?;
                base?
            }
            None => sys.map_library(&library, None)?,
        };
        let symbols = inline::AgentSymbols::new(&library, base)?;
        let table = if remote.read_u64(symbols.get("set")?)? == 0 {
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            Some(sys.map_anonymous(0, tables.iter().sum(), rw, libc::MAP_NORESERVE)?)
        } else {
            None
        };
        Ok((symbols, table, sys.map_near(lo, hi, inline::region_size(targets))?))
    };
    let stopped = at_entry.is_some();
    let (symbols, table, region) = match at_entry {
        Some(mut sys) => setup(&mut sys)?,
        None => remote.with_syscalls(setup)?,
    };
    if let Some(table) = table {
        // The tables before the interval: a hook reads the interval first.
        remote.write(symbols.get("set")?, &table.to_le_bytes())?;
        remote.write(symbols.get("filter")?, &(table + tables[0]).to_le_bytes())?;
        remote.write(symbols.get("threads")?, &(table + tables[0] + tables[1]).to_le_bytes())?;
    }
    remote.write(symbols.get("rate")?, &sample_bytes.to_le_bytes())?;
    hook_inline(proc_root, pid, &symbols, targets, region, stopped).inspect_err(|_| {
        // No hook went on: sampling stops again, so a later load finds it free.
        let _ = symbols.get("rate").and_then(|rate| remote.write(rate, &0u64.to_le_bytes()));
    })
}

/// Puts inline hooks on `targets`, leading to the agent at `symbols`; how many.
fn hook_inline(
    proc_root: &ProcRoot,
    pid: u32,
    symbols: &inline::AgentSymbols,
    targets: &[inline::Target],
    region: u64,
    stopped: bool,
) -> Result<u64> {
    let hooked = inline::hook(proc_root, pid, targets, symbols, region, stopped)?;
    tracing::info!(pid, functions = ?hooked, "inline hooks on");
    Ok(hooked.len() as u64)
}

/// Where the agent file `library` (or its copy in a memory file) is mapped in `pid`
/// (its first mapping).
pub(crate) fn mapped_at(maps: &[Mapping], library: &Path, pid: u32) -> Result<u64> {
    maps.iter()
        .find(|m| super::maps_agent(m, library) && m.offset == 0)
        .map(|m| m.start)
        .ok_or_else(|| anyhow!("the agent is not mapped in pid {pid}"))
}

fn executable_span(proc_root: &ProcRoot, pid: u32, maps: &[Mapping]) -> Result<(u64, u64)> {
    let exe = inline::executable(proc_root, pid)?;
    inline::executable_span(maps, &exe)
        .ok_or_else(|| anyhow!("pid {pid} does not map its executable {}", exe.display()))
}

/// The address of a `syscall` instruction in the executable's code, for a thread
/// held where there is none.
fn syscall_instruction(remote: &Remote, proc_root: &ProcRoot, pid: u32, maps: &[Mapping]) -> Result<u64> {
    let exe = inline::executable(proc_root, pid)?;
    for m in maps.iter().filter(|m| m.executable && (m.path == exe || m.path.as_os_str() == "[vdso]")) {
        let mut code = vec![0u8; (m.end - m.start).min(64 << 20) as usize];
        if remote.mem.read_exact_at(&mut code, m.start).is_err() {
            continue;
        }
        if let Some(i) = code.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(m.start + i as u64);
        }
    }
    bail!("pid {pid} has no syscall instruction to borrow")
}

/// Stops the agent in `pid`: every inline hook is taken off and every redirected slot
/// written back; the library stays mapped (a thread may be inside it). Returns the
/// number of slots and functions restored.
pub fn unload(proc_root: &ProcRoot, pid: u32, agent: &Path) -> Result<u64> {
    let remote = Remote::new(proc_root, pid)?;
    let root = proc_root.path().join(pid.to_string()).join("root");
    let maps = proc_root.maps(pid).with_context(|| format!("read the mappings of pid {pid}"))?;
    let unhooked = inline::unhook(proc_root, pid, false)? as u64;
    let twin = super::freestanding(agent);
    if let Ok(base) = mapped_at(&maps, &twin, pid) {
        // The freestanding agent has no slots of its own: sampling simply stops.
        remote.write(inline::AgentSymbols::new(&twin, base)?.get("rate")?, &0u64.to_le_bytes())?;
        return Ok(unhooked);
    }
    let in_file = maps.iter().find(|m| super::maps_agent(m, agent)).map(|m| m.path.clone());
    let stop = remote
        .symbol(&maps, &root, "leakmon_agent_stop", in_file.as_deref())
        .filter(|_| in_file.is_some())
        .ok_or_else(|| anyhow!("the agent is not loaded in pid {pid}"))?;
    Ok(remote.call(stop, [0, 0, 0], None)? + unhooked)
}

/// Whether the process whose root is `root` reaches the agent's file at its path: the
/// same file (device and inode) there as here. Only looked at, never opened: the
/// process's root is its own.
fn reaches(root: &Path, agent: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let inside = root.join(agent.strip_prefix("/").unwrap_or(agent));
    match (std::fs::metadata(&inside), std::fs::metadata(agent)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// A memory file in `pid` holding a copy of the agent: made there (`memfd_create`),
/// filled from here through a duplicate of its descriptor, sealed. Returns the
/// descriptor's number in `pid`.
fn memfd_copy(remote: &Remote, pid: u32, agent: &Path) -> Result<u64> {
    let fd = remote.with_syscalls(|sys| sys.memfd(&super::memfd_name(agent)))?;
    let filled = fill_memfd(pid, fd, agent);
    if let Err(e) = filled {
        let _ = remote.with_syscalls(|sys| sys.close(fd));
        return Err(e.context(format!("copy the agent into a memory file of pid {pid}")));
    }
    Ok(fd)
}

/// Writes the agent into descriptor `fd` of `pid`, which must be a memory file: the
/// descriptor table is the process's to change meanwhile, so the duplicate taken here
/// (`pidfd_getfd`: the same open file, with the rights the process has on it) is
/// checked to be one before a byte is written.
fn fill_memfd(pid: u32, fd: u64, agent: &Path) -> Result<()> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let bytes = std::fs::read(agent).with_context(|| format!("read {}", agent.display()))?;
    // SAFETY: plain syscalls; each descriptor returned is owned once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        bail!("pidfd_open: {}", std::io::Error::last_os_error());
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let ours = unsafe {
        libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd as i32, 0)
    };
    if ours < 0 {
        bail!("pidfd_getfd: {}", std::io::Error::last_os_error());
    }
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(ours as i32) });
    let raw = std::os::fd::AsRawFd::as_raw_fd(&file);
    // Only a memory file answers F_GET_SEALS.
    if unsafe { libc::fcntl(raw, libc::F_GET_SEALS) } < 0 {
        bail!("descriptor {fd} of pid {pid} is no longer the memory file leakmon made");
    }
    file.write_all_at(&bytes, 0).context("write the agent")?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    if unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, seals) } < 0 {
        bail!("seal the agent's memory file: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `pid` runs with glibc's dynamic loader (`false`: statically linked, no
/// loader at all); refuses one of another C library.
fn glibc_loader(proc_root: &ProcRoot, pid: u32, maps: &[Mapping]) -> Result<bool> {
    let base = proc_root
        .auxv(pid, libc::AT_BASE)
        .with_context(|| format!("read the auxiliary vector of pid {pid}"))?;
    let Some(base) = base.filter(|b| *b != 0) else {
        return Ok(false);
    };
    let loader = maps.iter().find(|m| m.start == base).map(|m| m.path.clone()).unwrap_or_default();
    let name = loader.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !name.starts_with("ld-linux") {
        bail!(
            "pid {pid} runs with the dynamic loader {}, not glibc's: the agent is built for glibc",
            loader.display()
        );
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process of `nobody` running `argv`, once its descriptor 3 is a file whose
    /// name starts with `named`.
    fn nobody_with_fd3(argv: &[&str], named: &str) -> std::process::Child {
        let child = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(argv)
            .spawn()
            .expect("run setpriv");
        let fd3 = format!("/proc/{}/fd/3", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !std::fs::read_link(&fd3).is_ok_and(|t| t.to_string_lossy().starts_with(named)) {
            assert!(std::time::Instant::now() < deadline, "no {named} at descriptor 3");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child
    }

    /// The process owns its descriptor table: one that put a file of its own (writable
    /// by it) at the number leakmon made its memory file gets nothing written there, in
    /// one line; a memory file there is filled.
    #[test]
    fn only_a_memory_file_at_the_descriptor_is_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let agent = dir.path().join("agent.so");
        std::fs::write(&agent, b"the agent's bytes").expect("write");
        let own = dir.path().join("own");
        std::fs::write(&own, b"its own bytes").expect("write");
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).expect("chown");
        std::os::unix::fs::chown(&own, Some(65534), Some(65534)).expect("chown");
        let script = format!("exec 3<>{}; exec sleep 30", own.display());
        let mut swapped = nobody_with_fd3(&["sh", "-c", &script], &own.display().to_string());
        let e = fill_memfd(swapped.id(), 3, &agent).expect_err("not a memory file");
        assert!(e.to_string().contains("is no longer the memory file leakmon made"), "{e}");
        assert_eq!(std::fs::read(&own).expect("read"), b"its own bytes");
        let _ = swapped.kill();
        let _ = swapped.wait();
        // A memory file of its own at 3 (through /proc/self/fd of a memfd): filled.
        let python =
            "import os, time; os.dup2(os.memfd_create('x', os.MFD_ALLOW_SEALING), 3); time.sleep(30)";
        let mut memfd = nobody_with_fd3(&["/usr/bin/python3", "-c", python], "/memfd:");
        let fd3 = format!("/proc/{}/fd/3", memfd.id());
        fill_memfd(memfd.id(), 3, &agent).expect("a memory file is filled");
        assert_eq!(std::fs::read(&fd3).expect("read it back"), b"the agent's bytes");
        let _ = memfd.kill();
        let _ = memfd.wait();
    }
}

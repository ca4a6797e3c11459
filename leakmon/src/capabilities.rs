//! Start-up checks: privileges and kernel features, each missing one said in one line.
//!
//! Features are probed (files the kernel exposes), not inferred from version numbers.
//! `LEAKMON_SYSFS` points the checks at another sysfs tree, for tests.

use std::{fs, path::PathBuf};

/// A missing privilege or kernel feature.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error("needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN) to load eBPF programs and attach uprobes; run it with sudo")]
    NotPrivileged,
    #[error("this kernel has no BTF (/sys/kernel/btf/vmlinux is missing); leakmon needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    #[error(
        "this kernel has no uprobes (no uprobe event source in sysfs); leakmon needs CONFIG_UPROBE_EVENTS=y"
    )]
    NoUprobes,
}

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_KILL: u32 = 5;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What leakmon still needs once it runs: attach and detach probes and read their maps
/// (`CAP_SYS_ADMIN`, `CAP_BPF`, `CAP_PERFMON`), read other users' /proc entries and
/// binaries (`CAP_SYS_PTRACE`, `CAP_DAC_READ_SEARCH`), hold processes under ptrace; ask
/// another user's runtime to open its profiler (`CAP_KILL`: SIGUSR1 to Node.js, SIGQUIT
/// to a JVM, each only to a process that catches it) and leave the JVM's attach file
/// as that user (`CAP_SETUID`, `CAP_SETGID`: the file-system identity of one thread).
pub const KEPT: u64 = (1 << CAP_DAC_READ_SEARCH)
    | (1 << CAP_KILL)
    | (1 << CAP_SETGID)
    | (1 << CAP_SETUID)
    | (1 << CAP_SYS_PTRACE)
    | (1 << CAP_SYS_ADMIN)
    | (1 << CAP_PERFMON)
    | (1 << CAP_BPF);

/// Drops every capability outside [`KEPT`] from the effective, permitted, inheritable
/// and bounding sets, once the listener is bound and the programs loaded, so a bug in
/// leakmon cannot use the rest (binding low ports, changing owners, killing
/// processes, loading modules). Best effort: where the kernel refuses, it says why and
/// leakmon goes on.
pub fn drop_unneeded() -> Result<u64, std::io::Error> {
    let last = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    for cap in (0..=last).filter(|c| KEPT & (1 << c) == 0) {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let kept = effective_caps() & KEPT;
    // _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
    let mut header = CapHeader { version: 0x2008_0522, pid: 0 };
    let low = (kept & 0xffff_ffff) as u32;
    let high = (kept >> 32) as u32;
    let data = [
        CapData { effective: low, permitted: low, inheritable: 0 },
        CapData { effective: high, permitted: high, inheritable: 0 },
    ];
    // SAFETY: capset with a valid version-3 header and two data words.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(kept)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn sysfs() -> PathBuf {
    std::env::var_os("LEAKMON_SYSFS").map_or_else(|| PathBuf::from("/sys"), PathBuf::from)
}

/// The effective capability set of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Whether the capability set `caps` can load programs and attach uprobes.
pub fn sufficient(caps: u64) -> bool {
    // CAP_SYS_ADMIN implies what CAP_BPF and CAP_PERFMON grant, and perf_event_open
    // uprobes (how the probes are attached) need it again on kernels fixed for
    // CVE-2025-38466, so BPF+PERFMON alone is not enough.
    caps & (1 << CAP_SYS_ADMIN) != 0
}

/// Checks privileges, BTF and uprobes, in that order.
pub fn check() -> Result<(), PreflightError> {
    if !sufficient(effective_caps()) {
        return Err(PreflightError::NotPrivileged);
    }
    let sys = sysfs();
    if !sys.join("kernel/btf/vmlinux").exists() {
        return Err(PreflightError::NoBtf);
    }
    if !sys.join("bus/event_source/devices/uprobe").exists() {
        return Err(PreflightError::NoUprobes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_sets() {
        assert!(sufficient(u64::MAX));
        assert!(sufficient(1 << CAP_SYS_ADMIN));
        assert!(!sufficient((1 << 39) | (1 << 38)), "CAP_BPF + CAP_PERFMON");
        assert!(!sufficient(0));
    }
}

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

const CAP_SYS_ADMIN: u32 = 21;

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

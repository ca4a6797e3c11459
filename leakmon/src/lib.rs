//! leakmon: exact unfreed-allocation accounting with eBPF.
//!
//! The data path, top to bottom: `probes` (the eBPF programs and the only holder of
//! `aya::Ebpf`) → `store` (per-process, per-stack totals) → `symbolize` → `report`.
//! `sources` are where the daemon's data comes from: the /proc sampler (every
//! process's memory), the two ways of attributing allocations (uprobes, the in-process
//! agent) and the runtimes' own profilers. `discovery` and `procfs` feed the probes
//! with libraries and processes; `ptrace` holds a report's processes and loads the
//! agent into running ones; `runtimes` holds each language runtime's own code;
//! `options` and `config` read what to do; `commands` wire it together for the CLI.

pub mod agent;
pub mod analysis;
pub mod capabilities;
pub mod cli;
pub mod commands;
pub mod config;
pub mod discovery;
pub mod export;
pub mod holders;
pub mod ingest;
pub mod model;
pub mod monitor;
pub mod options;
pub mod own_memory;
pub mod probes;
pub mod procfs;
pub mod ptrace;
pub mod report;
pub mod runtimes;
pub mod sources;
pub mod store;
pub mod suppressions;
pub mod symbolize;
pub mod units;
pub mod untrusted;
pub mod values;
pub mod wrappers;

/// Milliseconds on the monotonic clock, the clock of the kernel's allocation stamps.
pub fn monotonic_ms() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("monotonic clock");
    ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000
}

/// Wall-clock time in nanoseconds since the Unix epoch (profile timestamps).
pub fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

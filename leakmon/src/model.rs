//! The types every stage shares: a frame as reports and the API show it, a series and
//! its stacks as the daemon exports them, how bytes were attributed, and the hash that
//! stable ids are made of. Built by the stages that know them (symbolize, monitor,
//! sources), read by the ones after (store, report, export); this module imports none
//! of them.

use std::path::PathBuf;

use serde::Serialize;

use crate::analysis::trend::Verdict;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Uprobes,
    Agent,
    /// The runtime's own sampling heap profiler (`report --runtime`).
    Runtime,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrameReport {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Where the frame's call lies in its file (the offset of the call instruction in
    /// the binary; a Python frame's line), never where the process has it mapped: a
    /// runtime address would tell whoever reads a report or a profile where address
    /// randomization put the process's code.
    pub address: String,
    /// `python` for a frame of Python code; absent for native code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

impl FrameReport {
    pub fn site_frame(&self) -> SiteFrame<'_> {
        SiteFrame {
            function: Some(&self.function),
            file: self.file.as_deref(),
            runtime: self.runtime.as_deref(),
        }
    }
}

/// One resolved stack frame.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Frame {
    /// Demangled function name; `None` when no symbol covers the address.
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The address as the process saw it: for lookups only, never shown (see
    /// [`FrameReport::address`]).
    #[serde(skip)]
    pub address: u64,
    /// The binary the address lies in.
    #[serde(skip)]
    pub object: Option<PathBuf>,
    /// Its GNU build id (hex), when it has one.
    #[serde(skip)]
    pub build_id: Option<String>,
    /// The file offset of the call instruction (the return address's byte before); a
    /// Python frame's line.
    #[serde(skip)]
    pub file_offset: u64,
    /// `python` for a frame of Python code; `None` for native code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<&'static str>,
}

impl Frame {
    pub fn site_frame(&self) -> SiteFrame<'_> {
        SiteFrame { function: self.function.as_deref(), file: self.file.as_deref(), runtime: self.runtime }
    }
}

impl From<Frame> for FrameReport {
    fn from(f: Frame) -> Self {
        Self {
            function: f.function.unwrap_or_else(|| "??".to_owned()),
            file: f.file,
            line: f.line,
            address: format!("{:#x}", f.file_offset),
            runtime: f.runtime.map(str::to_owned),
        }
    }
}

/// A frame as the site rule reads it.
#[derive(Clone, Copy, Debug)]
pub struct SiteFrame<'a> {
    pub function: Option<&'a str>,
    pub file: Option<&'a str>,
    /// The runtime whose code it is (`python`, `node`, `jvm`); `None` for native code.
    pub runtime: Option<&'a str>,
}

/// A group's memory as /proc tells it, summed over its processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Resident {
    /// `VmRSS`: everything resident, file-backed pages included.
    pub rss: u64,
    /// `RssAnon`.
    pub anon: u64,
    /// `VmSwap`.
    pub swap: u64,
    /// `RssFile`: file cache the kernel can drop; shown, never judged.
    pub file: u64,
    /// `RssShmem`.
    pub shmem: u64,
}

/// One series as the API and the metrics show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeriesView {
    pub service: String,
    pub comm: String,
    /// Set only with per-process series (`--metrics.pid-label`).
    pub pid: Option<u32>,
    pub signal: &'static str,
    pub pids: Vec<u32>,
    /// The container the processes run in, from their memory cgroup's path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<crate::sources::container::Container>,
    /// The allocator the processes' malloc calls reach (glibc, jemalloc, ...), when
    /// their mappings were read (allocation attribution on).
    pub allocator: Option<&'static str>,
    /// Some allocations could not be counted (heap signal): the figures are lower
    /// bounds and the verdict is withheld.
    pub incomplete: bool,
    pub current_bytes: u64,
    /// The breakdown of resident memory (the `anon` signal only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Resident>,
    /// Live allocations (heap signal only).
    pub allocations: Option<u64>,
    /// Theil–Sen slope over the window.
    pub growth_bytes_per_second: f64,
    /// Mann–Kendall z over the window.
    pub trend_z: f64,
    pub verdict: Verdict,
    pub suspected: bool,
    /// Seconds since the suspicion was raised.
    pub suspected_for_seconds: Option<f64>,
    pub limit_bytes: Option<u64>,
    pub time_to_exhaustion_seconds: Option<f64>,
    pub samples: usize,
    /// Largest unfreed stacks (heap signal only), largest first.
    pub stacks: Vec<StackView>,
}

#[cfg(test)]
impl SeriesView {
    /// A suspected series of pid 1 with every field set, for tests.
    pub fn example(signal: &'static str) -> Self {
        Self {
            service: "leaky.service".into(),
            comm: "leaky".into(),
            pid: Some(42),
            signal,
            pids: vec![1],
            container: Some(crate::sources::container::Container {
                runtime: "podman",
                id: "bbdf01ed86b1fc90cebe7dccf8c111ed095e2077c6096045a230d800942aeb13".into(),
                pod_uid: None,
            }),
            allocator: Some("jemalloc"),
            incomplete: signal == "heap",
            current_bytes: 4096,
            memory: (signal == "anon").then_some(Resident {
                rss: 4096,
                anon: 3072,
                swap: 1024,
                file: 512,
                shmem: 256,
            }),
            allocations: (signal == "heap").then_some(7),
            growth_bytes_per_second: 4096.5,
            trend_z: 5.0,
            verdict: Verdict::SteadyGrowth,
            suspected: true,
            suspected_for_seconds: Some(1.0),
            limit_bytes: Some(1 << 30),
            time_to_exhaustion_seconds: Some(3600.0),
            samples: 60,
            stacks: vec![StackView {
                stack: "0123456789ab".into(),
                bytes: 4000,
                allocations: 7,
                mean_age_seconds: Some(2.0),
                function: "leak_small".into(),
                location: "leaks.c:20".into(),
                frames: Vec::new(),
                trend: Some(StackTrend {
                    growth_bytes_per_second: 512.0,
                    trend_z: 4.0,
                    verdict: Verdict::SteadyGrowth,
                    suspected: true,
                }),
            }],
        }
    }
}

/// One allocation stack of a series.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StackView {
    /// Short stable hash of the symbolized frames: the `stack` label.
    pub stack: String,
    pub bytes: u64,
    pub allocations: u64,
    /// Mean age of its unfreed blocks; `None` where the source keeps no ages (a
    /// runtime's profiler).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_age_seconds: Option<f64>,
    /// The allocation site (innermost frame).
    pub function: String,
    pub location: String,
    pub frames: Vec<FrameReport>,
    /// The stack's own trend, once its series has a verdict.
    pub trend: Option<StackTrend>,
}

/// Slope and verdict of one stack's unfreed bytes over the window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StackTrend {
    pub growth_bytes_per_second: f64,
    pub trend_z: f64,
    pub verdict: Verdict,
    pub suspected: bool,
}

/// FNV-1a, 64 bits: a hash that is the same in every build and on every host, unlike
/// std's `DefaultHasher`.
pub fn stable_hash(parts: impl IntoIterator<Item = impl AsRef<[u8]>>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.as_ref() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_stable_and_separates_parts() {
        assert_eq!(stable_hash(["leak_small", "main"]), stable_hash(["leak_small", "main"]));
        assert_ne!(stable_hash(["ab", "c"]), stable_hash(["a", "bc"]));
        assert_eq!(stable_hash(["x"]).len(), 12);
        assert_eq!(
            stable_hash(["leak_small", "main"]),
            stable_hash(vec!["leak_small".to_owned(), "main".to_owned()])
        );
        // Pinned to a literal (FNV-1a 64 with a 0xff separator, top 48 bits, computed
        // apart from this code): a change of hash would break every dashboard's stack
        // label.
        assert_eq!(stable_hash(["leak_small", "main"]), "6e8ef6bee267");
    }
}

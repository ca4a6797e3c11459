//! Export: what the daemon knows, for Prometheus (`/metrics`) and people (JSON API).
//!
//! In: [`SeriesView`]s built each sampling tick and the probes' counters. Out: the
//! exposition text and the JSON documents, rendered once per tick so a scrape only
//! copies a string.

pub mod http;
pub mod metrics;
pub mod web_config;

use serde::Serialize;

use crate::{analysis::trend::Verdict, report::FrameReport};

/// One series as the API and the metrics show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeriesView {
    pub service: String,
    pub comm: String,
    /// Set only with per-process series (`--metrics.pid-label`).
    pub pid: Option<u32>,
    pub signal: &'static str,
    pub pids: Vec<u32>,
    /// The allocator the processes' malloc calls reach (glibc, jemalloc, ...), when
    /// their mappings were read (allocation attribution on).
    pub allocator: Option<&'static str>,
    /// Some allocations could not be counted (heap signal): the figures are lower
    /// bounds and the verdict is withheld.
    pub incomplete: bool,
    pub current_bytes: u64,
    /// The breakdown of resident memory (the `anon` signal only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::monitor::Resident>,
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

/// One allocation stack of a series.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StackView {
    /// Short stable hash of the symbolized frames: the `stack` label.
    pub stack: String,
    pub bytes: u64,
    pub allocations: u64,
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

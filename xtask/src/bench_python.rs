//! CPython under the agent: the cost of sampling Python object allocations.
//!
//! The workload is `cache_leak.py bench`, which makes and drops small objects (tuples,
//! strings, ints: pymalloc's business) and prints the nanoseconds per object. Each
//! interpreter runs it alone, under `leakmon report --agent` (512 KiB, the agent
//! preloaded, CPython's allocator domains wrapped once it is initialized), and under
//! tracemalloc, the peer a Python developer reaches for (`-X tracemalloc=1`). Rounds
//! alternate the order. A speed is the median over rounds of the ratio to the run alone
//! of the same round (paired, so that the machine's slower and faster spells, which
//! last longer than a round, cancel), with the lowest and highest ratio beside it.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::bench::{median, write_json, Setup};

/// Objects made per run: 100 per iteration (about a second).
const ITERATIONS: &str = "200000";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Condition {
    Alone,
    Agent,
    Tracemalloc,
}

impl Condition {
    const ALL: [Self; 3] = [Self::Alone, Self::Agent, Self::Tracemalloc];

    const fn label(self) -> &'static str {
        match self {
            Self::Alone => "no profiler",
            Self::Agent => "leakmon report --agent (512KiB)",
            Self::Tracemalloc => "python -X tracemalloc=1",
        }
    }
}

/// Debian's python3 and pyenv's newest 3.12 and 3.13; a missing one fails the bench.
fn interpreters() -> Result<Vec<(String, String)>> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let mut found = vec![("3.11 (Debian)".to_owned(), "/usr/bin/python3".to_owned())];
    for minor in ["3.12", "3.13"] {
        let mut versions: Vec<String> = std::fs::read_dir(format!("{home}/.pyenv/versions"))
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        versions.retain(|v| v.starts_with(&format!("{minor}.")));
        versions.sort();
        let v = versions
            .pop()
            .with_context(|| format!("pyenv has no CPython {minor} under {home}/.pyenv/versions"))?;
        found.push((v.clone(), format!("{home}/.pyenv/versions/{v}/bin/python{minor}")));
    }
    Ok(found)
}

pub fn python(root: &Path, setup: &Setup, rounds: usize) -> Result<()> {
    let script = root.join("leakmon/tests/fixtures/python/cache_leak.py");
    let mut samples: BTreeMap<(usize, Condition), Vec<f64>> = BTreeMap::new();
    let pythons = interpreters()?;
    for round in 0..rounds {
        let mut order = Condition::ALL.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for (i, (_, python)) in pythons.iter().enumerate() {
            for &condition in &order {
                let ns = run(setup, python, &script, condition)
                    .with_context(|| format!("{python} under {}", condition.label()))?;
                samples.entry((i, condition)).or_default().push(ns);
            }
        }
        eprintln!("xtask: python round {}/{rounds} done", round + 1);
    }
    let mut text =
        String::from("\nCPython, ns per small object made and dropped (medians), speed paired by round\n");
    let _ = writeln!(
        text,
        "{:<16} {:>8} {:>8} {:>12} {:>22} {:>22}",
        "interpreter", "alone", "agent", "tracemalloc", "agent speed (range)", "tracemalloc speed"
    );
    let mut json = String::from("{\n");
    for (i, (name, _)) in pythons.iter().enumerate() {
        let m = |c| median(&samples[&(i, c)]);
        let (alone, agent, trace) = (m(Condition::Alone), m(Condition::Agent), m(Condition::Tracemalloc));
        let speed = |c| Speed::paired(&samples[&(i, Condition::Alone)], &samples[&(i, c)]);
        let (agent_speed, trace_speed) = (speed(Condition::Agent), speed(Condition::Tracemalloc));
        let _ = writeln!(
            text,
            "{name:<16} {alone:>8.1} {agent:>8.1} {trace:>12.1} {:>22} {:>22}",
            agent_speed.to_string(),
            trace_speed.to_string()
        );
        let _ = writeln!(
            json,
            "  \"{name}\": {{\"alone_ns\": {alone:.2}, \"agent_ns\": {agent:.2}, \"tracemalloc_ns\": {trace:.2}, \"agent_speed\": {:.3}, \"agent_speed_min\": {:.3}, \"agent_speed_max\": {:.3}, \"tracemalloc_speed\": {:.3}}},",
            agent_speed.median, agent_speed.min, agent_speed.max, trace_speed.median
        );
    }
    let _ = writeln!(text, "(target: agent speed >= 0.9x)");
    print!("{text}");
    let json = json.trim_end_matches(",\n").to_owned() + "\n}\n";
    write_json(&setup.out, "python", &json)
}

/// Per-round ratios of the time alone to the time under a condition.
struct Speed {
    median: f64,
    min: f64,
    max: f64,
}

impl Speed {
    fn paired(alone: &[f64], under: &[f64]) -> Self {
        let ratios: Vec<f64> = alone.iter().zip(under).map(|(a, u)| a / u).collect();
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(0.0, f64::max);
        Self { median: median(&ratios), min, max }
    }
}

impl std::fmt::Display for Speed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3}x ({:.3}-{:.3})", self.median, self.min, self.max)
    }
}

fn run(setup: &Setup, python: &str, script: &Path, condition: Condition) -> Result<f64> {
    let mut cmd = match condition {
        Condition::Alone => Command::new(python),
        Condition::Tracemalloc => {
            let mut c = Command::new(python);
            c.args(["-X", "tracemalloc=1"]);
            c
        }
        Condition::Agent => {
            let mut c = Command::new(&setup.leakmon);
            c.args(["report", "--agent", "--format", "json", "--", python]);
            c
        }
    };
    cmd.arg(script).args(["bench", ITERATIONS]);
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    let text = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "{cmd:?} failed: {text}");
    text.lines()
        .find_map(|l| l.strip_prefix("ns-per-object "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no ns-per-object from {cmd:?}: {text}"))
}

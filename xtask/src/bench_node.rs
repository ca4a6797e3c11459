//! Node.js while leakmon samples it with V8's own heap profiler (`report --runtime`).
//!
//! The workload is `cache_leak.js bench`, which builds and drops small objects as fast
//! as it can and prints how many each second. Alone, the seconds 4 to 9 are kept; with
//! leakmon, `report --runtime` starts after the second one and samples (512 KiB, its default) for 8
//! s, so the same seconds fall in its window. Rounds alternate the order; the ratio of
//! the medians is the speed kept while sampling.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::bench::{median, write_json, Setup};

pub fn node(root: &Path, setup: &Setup, rounds: usize) -> Result<()> {
    // Installed by the bench's set-up (nodejs): missing, the bench fails.
    Command::new("node").arg("--version").output().context("run node (Debian's nodejs)")?;
    let script = root.join("leakmon/tests/fixtures/node/cache_leak.js");
    let (mut alone, mut sampled) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for sampling in if round % 2 == 0 { [false, true] } else { [true, false] } {
            let ops = run(setup, &script, sampling).with_context(|| format!("node, sampling: {sampling}"))?;
            if sampling {
                sampled.push(ops)
            } else {
                alone.push(ops)
            }
        }
        eprintln!("xtask: node round {}/{rounds} done", round + 1);
    }
    let (a, s) = (median(&alone), median(&sampled));
    println!("\nNode.js, objects built and dropped per second (medians)");
    println!("{:<34} {:>14}", "alone", format!("{a:.0}"));
    println!("{:<34} {:>14}", "while report --runtime samples", format!("{s:.0}"));
    println!("{:<34} {:>13.3}x   (target >= 0.9x)", "speed kept", s / a);
    write_json(
        &setup.out,
        "node",
        &format!(
            "{{\n  \"alone_ops\": {a:.0},\n  \"sampling_ops\": {s:.0},\n  \"speed_kept\": {:.3}\n}}\n",
            s / a
        ),
    )
}

/// The median of the seconds 4 to 9 of one run.
fn run(setup: &Setup, script: &Path, sampling: bool) -> Result<f64> {
    let mut node = Command::new("node")
        .arg(script)
        .arg("bench")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start node")?;
    let pid = node.id();
    let mut lines = BufReader::new(node.stdout.take().context("stdout")?).lines();
    let mut next = || -> Result<String> { lines.next().context("node ended")?.context("read node") };
    anyhow::ensure!(next()? == "ready", "node did not start");
    let mut leakmon = None;
    let mut seconds = Vec::new();
    for second in 1..=9 {
        let line = next()?;
        let ops: f64 = line.strip_prefix("ops ").and_then(|v| v.parse().ok()).context("an ops line")?;
        if second == 2 && sampling {
            leakmon = Some(
                Command::new(&setup.leakmon)
                    .args([
                        "report",
                        "--runtime",
                        "--format",
                        "json",
                        "--duration",
                        "8",
                        "--pid",
                        &pid.to_string(),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("start leakmon")?,
            );
        }
        if second >= 4 {
            seconds.push(ops);
        }
    }
    // leakmon ends its window (and closes the inspector) before node goes.
    let result = match leakmon {
        Some(l) => {
            let out = l.wait_with_output().context("wait leakmon")?;
            if out.status.success() {
                Ok(median(&seconds))
            } else {
                Err(anyhow::anyhow!(
                    "leakmon report --runtime failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        }
        None => Ok(median(&seconds)),
    };
    let _ = node.kill();
    let _ = node.wait();
    result
}

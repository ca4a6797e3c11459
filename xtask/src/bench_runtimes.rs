//! Node.js and a JVM while leakmon samples them with their own heap profilers (`report
//! --runtime`: V8's sampling heap profiler, JFR's live-object samples).
//!
//! The workloads are `cache_leak.js bench` and `CacheLeak bench`, which build and drop
//! small objects as fast as they can and print how many each second. Alone, the
//! seconds 4 to 9 are kept; with leakmon, `report --runtime` starts after the second
//! one and samples (512 KiB, its default) for 8 s, so the same seconds fall in its
//! window. Rounds alternate the order; the ratio of the medians is the speed kept
//! while sampling.

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
    let command = || {
        let mut c = Command::new("node");
        c.arg(&script).arg("bench");
        c
    };
    compare("Node.js", "node", setup, rounds, &command)
}

/// OpenJDK 17 (installed by the bench's set-up, openjdk-17-jdk-headless).
pub fn jvm(root: &Path, setup: &Setup, rounds: usize) -> Result<()> {
    const JDK: &str = "/usr/lib/jvm/java-17-openjdk-amd64/bin";
    let classes = setup.out.join("jvm-classes");
    std::fs::create_dir_all(&classes)?;
    let status = Command::new(format!("{JDK}/javac"))
        .arg("-d")
        .arg(&classes)
        .arg(root.join("leakmon/tests/fixtures/jvm/CacheLeak.java"))
        .status()
        .context("run javac (openjdk-17-jdk-headless)")?;
    anyhow::ensure!(status.success(), "javac CacheLeak.java failed");
    let command = || {
        let mut c = Command::new(format!("{JDK}/java"));
        c.arg("-cp").arg(&classes).args(["CacheLeak", "bench"]);
        c
    };
    compare("OpenJDK 17", "jvm", setup, rounds, &command)
}

fn compare(name: &str, key: &str, setup: &Setup, rounds: usize, command: &dyn Fn() -> Command) -> Result<()> {
    let (mut alone, mut sampled) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for sampling in if round % 2 == 0 { [false, true] } else { [true, false] } {
            let ops =
                run(setup, command(), sampling).with_context(|| format!("{name}, sampling: {sampling}"))?;
            if sampling {
                sampled.push(ops)
            } else {
                alone.push(ops)
            }
        }
        eprintln!("xtask: {key} round {}/{rounds} done", round + 1);
    }
    let (a, s) = (median(&alone), median(&sampled));
    println!("\n{name}, objects built and dropped per second (medians)");
    println!("{:<34} {:>14}", "alone", format!("{a:.0}"));
    println!("{:<34} {:>14}", "while report --runtime samples", format!("{s:.0}"));
    println!("{:<34} {:>13.3}x   (target >= 0.9x)", "speed kept", s / a);
    write_json(
        &setup.out,
        key,
        &format!(
            "{{\n  \"alone_ops\": {a:.0},\n  \"sampling_ops\": {s:.0},\n  \"speed_kept\": {:.3}\n}}\n",
            s / a
        ),
    )
}

/// The median of the seconds 4 to 9 of one run.
fn run(setup: &Setup, mut command: Command, sampling: bool) -> Result<f64> {
    let mut node =
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().context("start the workload")?;
    let pid = node.id();
    let mut lines = BufReader::new(node.stdout.take().context("stdout")?).lines();
    let mut next =
        || -> Result<String> { lines.next().context("the workload ended")?.context("read the workload") };
    anyhow::ensure!(next()? == "ready", "the workload did not start");
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
    // leakmon ends its window (closes the inspector, stops the recording) before the
    // workload goes.
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

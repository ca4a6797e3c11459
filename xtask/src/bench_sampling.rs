//! The accuracy of byte-weighted sampling against exact tracking, on the leak fixture:
//! per leaking function and in total, over repeated runs at two sampling intervals.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::bench::{write_json, Setup};

const RUNS: usize = 10;
const RATES: [(u64, &str); 2] = [(4096, "4KiB"), (65536, "64KiB")];

/// Unfreed bytes per function of leaks.c, from one `leakmon report` run.
fn per_function(setup: &Setup, fixture: &Path, rate: u64) -> Result<BTreeMap<String, f64>> {
    let out = Command::new(&setup.leakmon)
        .args(["report", "--format", "json", "--sample-bytes", &rate.to_string(), "--"])
        .arg(fixture)
        .output()
        .context("run leakmon report")?;
    if !out.status.success() {
        bail!("leakmon report failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("parse the report")?;
    let mut bytes = BTreeMap::new();
    for process in report["processes"].as_array().into_iter().flatten() {
        for stack in process["stacks"].as_array().into_iter().flatten() {
            let frames = stack["frames"].as_array().cloned().unwrap_or_default();
            let Some(site) =
                frames.iter().find(|f| f["file"].as_str().is_some_and(|p| p.ends_with("leaks.c")))
            else {
                continue;
            };
            let name = site["function"].as_str().unwrap_or("??").to_owned();
            *bytes.entry(name).or_insert(0.0) += stack["bytes"].as_f64().unwrap_or(0.0);
        }
    }
    Ok(bytes)
}

pub fn accuracy(root: &Path, setup: &Setup) -> Result<()> {
    let fixture = setup.out.join("leaks");
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-g",
            "-fno-builtin",
            "-fno-omit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-pthread",
        ])
        .arg("-o")
        .arg(&fixture)
        .arg(root.join("leakmon/tests/fixtures/leaks.c"))
        .status()
        .context("run gcc")?;
    if !status.success() {
        bail!("gcc failed on leaks.c");
    }
    let exact = per_function(setup, &fixture, 0)?;
    let exact_total: f64 = exact.values().sum();
    let mut text = format!(
        "\nsampling accuracy on leaks.c ({RUNS} runs per interval; exact total {exact_total:.0} B)\n{:<24} {:>12}",
        "function", "exact B"
    );
    for (_, name) in RATES {
        let _ = write!(text, " {:>16} {:>10}", format!("mean est. {name}"), "mean |err|");
    }
    text.push('\n');
    let mut json = String::from("{\n");
    let mut columns = Vec::new();
    for (rate, name) in RATES {
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            runs.push(per_function(setup, &fixture, rate)?);
        }
        let _ = writeln!(
            json,
            "  \"{name}\": [{}],",
            runs.iter().map(|r| format!("{:.0}", r.values().sum::<f64>())).collect::<Vec<_>>().join(", ")
        );
        columns.push(runs);
    }
    let mut rows: Vec<(&String, &f64)> = exact.iter().collect();
    rows.sort_by(|a, b| b.1.total_cmp(a.1));
    let summary = |runs: &[BTreeMap<String, f64>], f: Option<&str>, truth: f64| {
        let values: Vec<f64> = runs
            .iter()
            .map(|r| f.map_or_else(|| r.values().sum(), |f| r.get(f).copied().unwrap_or(0.0)))
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let err = values.iter().map(|v| (v - truth).abs() / truth).sum::<f64>() / values.len() as f64;
        (mean, err)
    };
    for (function, &truth) in rows.iter().copied().chain([(&"TOTAL".to_owned(), &exact_total)]) {
        let f = (function != "TOTAL").then_some(function.as_str());
        let _ = write!(text, "{function:<24} {truth:>12.0}");
        for runs in &columns {
            let (mean, err) = summary(runs, f, truth);
            let _ = write!(text, " {mean:>16.0} {:>9.1}%", err * 100.0);
        }
        text.push('\n');
    }
    let _ = write!(json, "  \"exact_total\": {exact_total:.0}\n}}\n");
    print!("{text}");
    write_json(&setup.out, "sampling", &json)?;
    Ok(())
}

//! The agent's interval, when none is given, follows the process's allocation rate
//! (`leakmon::agent::pace`): a slow leak beside a ring replaced at 400 KiB/s allocates
//! too little for the 512 KiB start to sample it in a short window; paced, the interval
//! comes down to its floor (4 KiB) within seconds and the leak is sampled dozens of
//! times. Both ways the agent reaches a process: its guardian paces a running --pid,
//! `report` itself paces a command's processes.

mod common;

use std::process::{Command, Stdio};

use common::{build_fixture, finish_report, leakmon, parse_report, processes, watch_pid_with, Reap};
use serde_json::Value;

/// The leak's stack (frame `leak_entry`): (estimate, samples).
fn leak(process: &Value) -> (u64, u64) {
    let stacks = process["stacks"].as_array().expect("stacks");
    stacks
        .iter()
        .filter(|s| s["site"]["function"] == "leak_entry")
        .map(|s| (s["bytes"].as_u64().expect("bytes"), s["samples"].as_u64().expect("samples")))
        .fold((0, 0), |(b, n), (sb, sn)| (b + sb, n + sn))
}

#[test]
fn a_running_process_is_paced_by_its_guardian_and_its_slow_leak_sampled() {
    let fixture = build_fixture("ring_leak.c", &[]);
    let paced = Reap(Command::new(&fixture).stdout(Stdio::null()).spawn().expect("start the service"));
    let fixed = Reap(Command::new(&fixture).stdout(Stdio::null()).spawn().expect("start the service"));
    let (paced_watch, paced_log) = watch_pid_with(paced.id(), "12", &["--agent"]);
    let (fixed_watch, fixed_log) = watch_pid_with(fixed.id(), "12", &["--agent", "--sample-bytes", "512KiB"]);
    let paced_report = finish_report(paced_watch, paced_log);
    let fixed_report = finish_report(fixed_watch, fixed_log);

    assert_eq!(paced_report["paced"], true);
    // 440 KiB/s allocated gives 110 samples a second at 4 KiB, below the target: the
    // floor.
    assert_eq!(paced_report["sample_bytes"], 4096, "{paced_report}");
    assert_eq!(fixed_report["paced"], Value::Null, "a given interval is kept");
    assert_eq!(fixed_report["sample_bytes"], 512 * 1024);

    let (bytes, samples) = leak(&processes(&paced_report)[0]);
    let (_, fixed_samples) = leak(&processes(&fixed_report)[0]);
    eprintln!("leak: paced {samples} samples ({bytes} B), fixed at 512 KiB {fixed_samples}");
    assert!(samples >= 30, "the paced agent sampled the leak {samples} times: {paced_report}");
    assert!(fixed_samples <= 5, "at 512 KiB the leak is barely sampled ({fixed_samples})");
    // 40 KiB/s over the window less the second in flight and the load: about 400 KiB;
    // wide bounds, for a sample taken at 512 KiB before the pace came down.
    assert!((100_000..=1_100_000).contains(&bytes), "leak estimate {bytes}");
}

#[test]
fn a_commands_processes_are_paced_by_report() {
    let fixture = build_fixture("ring_leak.c", &[]);
    let out = leakmon()
        .args(["report", "--agent", "--format", "json", "--", "timeout", "-s", "INT", "10"])
        .arg(&fixture)
        .output()
        .expect("run leakmon");
    let report = parse_report(&out);
    assert_eq!(report["paced"], true);
    let service =
        processes(&report).iter().find(|p| p["comm"] == "ring_leak").expect("the service's process");
    let (bytes, samples) = leak(service);
    eprintln!("leak: {samples} samples ({bytes} B), interval at the end {}", report["sample_bytes"]);
    assert!(samples >= 30, "the leak was sampled {samples} times: {report}");
}

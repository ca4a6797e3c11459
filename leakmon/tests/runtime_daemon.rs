//! `leakmon run --runtime-profilers`: a Node.js or JVM suspect is profiled by its
//! runtime's own heap profiler, and shows in /api/v1/leaks and the metrics with the
//! runtime's functions, like a native suspect; when the daemon stops, the profiler is
//! closed and the process keeps running.
//!
//! Apart from the `report --runtime` tests: a daemon profiles every suspect of the
//! runtime on the host, which would take the inspector those tests open.

mod common;

use std::{
    os::unix::process::CommandExt as _,
    time::{Duration, Instant},
};

use common::{
    runtimes::{answers, left_in_tmp, listening, recordings, start_java, start_node},
    start_daemon,
};
use serde_json::Value;

/// Waits for a /api/v1/leaks entry of `pid`'s command whose stacks have a frame of
/// `runtime` named by `named`; returns the entry.
fn leak_entry(listen: &str, comm: &str, runtime: &str, named: impl Fn(&str) -> bool) -> Value {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(120) {
        if let Some(body) = common::http_get(listen, "/api/v1/leaks") {
            let json: Value = serde_json::from_str(&body).expect("JSON");
            let found =
                json["leaks"].as_array().into_iter().flatten().find(|l| {
                    l["comm"] == comm
                        && l["stacks"].as_array().into_iter().flatten().any(|s| {
                            s["frames"].as_array().into_iter().flatten().any(|f| {
                                f["runtime"] == runtime && f["function"].as_str().is_some_and(&named)
                            })
                        })
                });
            if let Some(entry) = found {
                return entry.clone();
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("no leak of {comm} with {runtime} frames in 120 s; last: {last}");
}

/// Every stack of the entry is named in `leakmon_stack_info`.
fn stacks_in_metrics(listen: &str, entry: &Value) {
    let metrics = common::http_get(listen, "/metrics").expect("metrics");
    for s in entry["stacks"].as_array().unwrap() {
        let line = format!("leakmon_stack_info{{function={},", s["function"]);
        let stack = format!("stack={}", s["stack"]);
        assert!(
            metrics.lines().any(|l| l.starts_with(&line) && l.contains(&stack)),
            "{line} {stack} in\n{metrics}"
        );
    }
}

fn stop(daemon: &mut common::Reap) {
    common::signal(daemon.0.id(), nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while daemon.0.try_wait().expect("wait").is_none() {
        assert!(start.elapsed() < Duration::from_secs(30), "the daemon stopped within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const DAEMON: &[&str] = &["--sample-interval", "0.5s", "--window", "10s", "--suspect-duration", "5m"];

#[test]
fn a_node_suspect_is_profiled_by_v8_and_its_inspector_closed_at_stop() {
    const LISTEN: &str = "127.0.0.1:19641";
    let (mut process, mut lines) = start_node(&[], "grow");
    let pid = process.0.id();
    let mut daemon = start_daemon(&[DAEMON, &["--runtime-profilers", "node"]].concat(), LISTEN);
    let entry = leak_entry(LISTEN, "node", "node", |f| ["grow", "remember", "makeEntry"].contains(&f));
    assert_eq!(listening(pid), 1, "the inspector is open while profiling");
    // Open for the whole suspect window, and to nobody but root and Node.js's own user
    // (root here): the user `daemon` gets nothing.
    let other = std::process::Command::new("curl")
        .args(["-s", "-m", "2", "http://127.0.0.1:9229/json/list"])
        .uid(1)
        .gid(1)
        .output()
        .expect("curl");
    assert!(
        !other.status.success() || other.stdout.is_empty(),
        "another user reached the debugger: {}",
        String::from_utf8_lossy(&other.stdout)
    );
    let site = entry["stacks"][0]["location"].as_str().unwrap_or_default().to_owned();
    assert!(site.starts_with("cache_leak.js:"), "{entry}");
    stacks_in_metrics(LISTEN, &entry);
    stop(&mut daemon);
    assert_eq!(listening(pid), 0, "the inspector is closed again");
    answers(&mut process, &mut lines);
}

#[test]
fn a_jvm_suspect_is_profiled_by_jfr_and_its_recording_stopped_at_stop() {
    const LISTEN: &str = "127.0.0.1:19642";
    let (mut process, mut lines) = start_java(&[]);
    let pid = process.0.id();
    let mut daemon = start_daemon(&[DAEMON, &["--runtime-profilers", "jvm"]].concat(), LISTEN);
    let entry = leak_entry(LISTEN, "java", "jvm", |f| {
        ["CacheLeak.grow", "CacheLeak.remember", "CacheLeak.makeEntry"].contains(&f)
    });
    assert!(!recordings(pid).contains("No available recordings"), "recording while profiling");
    let site = entry["stacks"][0]["function"].as_str().unwrap_or_default();
    assert!(site.starts_with("CacheLeak."), "named past the JDK's classes: {entry}");
    stacks_in_metrics(LISTEN, &entry);
    stop(&mut daemon);
    assert!(recordings(pid).contains("No available recordings"), "{}", recordings(pid));
    assert_eq!(left_in_tmp(pid), Vec::<String>::new());
    answers(&mut process, &mut lines);
}

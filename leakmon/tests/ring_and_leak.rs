//! A steady ring seen through samples is not a leak: a service replacing the 4,096
//! entries of a ring in place (400 KiB/s, flat after its first turnover) beside a real
//! 40 KiB/s leak, under the agent at 16 KiB. The sampled estimate of the ring is an
//! autocorrelated series that a trend test alone reads as growth now and then; its
//! blocks never grow older than one turnover, while the leak's oldest ones age with
//! the clock.

mod common;

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{build_fixture, Reap};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:19491";

#[test]
fn a_sampled_ring_beside_a_leak_is_never_flagged_and_the_leak_is() {
    let fixture = build_fixture("ring_leak.c", &[]);
    let _service = Reap(Command::new(&fixture).stdout(Stdio::null()).spawn().expect("start the service"));
    let _daemon = common::start_daemon(
        &[
            "--agent",
            "--comm",
            "ring_leak",
            "--sample-bytes",
            "16KiB",
            "--sample-interval",
            "0.5s",
            "--window",
            "30s",
        ],
        LISTEN,
    );
    // Three windows: the ring's first turnover, then two of steady state.
    let start = Instant::now();
    // Per site: the first second it was flagged at, and the turns it was.
    let mut flagged: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    while start.elapsed() < Duration::from_secs(95) {
        std::thread::sleep(Duration::from_millis(500));
        let Some(body) = common::http_get(LISTEN, "/api/v1/processes") else { continue };
        let doc: Value = serde_json::from_str(&body).expect("JSON");
        let heap = doc["series"]
            .as_array()
            .expect("series")
            .iter()
            .find(|s| s["comm"] == "ring_leak" && s["signal"] == "heap");
        for stack in heap.and_then(|h| h["stacks"].as_array()).into_iter().flatten() {
            let function = stack["function"].as_str().unwrap_or("?").to_owned();
            *seen.entry(function.clone()).or_default() += 1;
            if stack["trend"]["suspected"] == true {
                flagged.entry(function).or_insert((start.elapsed().as_secs(), 0)).1 += 1;
            }
        }
    }
    eprintln!("stacks seen (turns): {seen:?}; flagged (first second, turns): {flagged:?}");
    assert!(seen.get("ring_entry").is_some_and(|&n| n > 100), "the ring's stack was watched: {seen:?}");
    assert!(flagged.contains_key("leak_entry"), "the leak was flagged: {flagged:?}");
    assert!(!flagged.contains_key("ring_entry"), "the ring was flagged: {flagged:?}");
}

/// A window that ends while the process runs sets apart what is still in flight: the
/// blocks younger than a second, on a line of their own, out of the figures. Here the
/// ring's and the leak's last second (about 400 and 40 blocks of 1 KiB); every block
/// left in the stacks is older than that. A command that exits has nothing in flight
/// (the fixture tests' exact figures).
#[test]
fn a_window_over_a_running_process_sets_its_blocks_in_flight_apart() {
    let mut service =
        Reap(Command::new(build_fixture("ring_leak.c", &[])).stdout(Stdio::null()).spawn().expect("start"));
    std::thread::sleep(Duration::from_millis(300));
    let (leakmon, stderr) = common::watch_pid(service.0.id(), "3");
    let report = common::finish_report(leakmon, stderr);
    let _ = service.0.kill();
    let p = &report["processes"][0];
    let in_flight = &p["in_flight"];
    let (bytes, blocks) =
        (in_flight["bytes"].as_u64().expect("bytes"), in_flight["allocations"].as_u64().expect("blocks"));
    eprintln!(
        "in flight: {bytes} B in {blocks} blocks; kept: {} B in {}",
        p["outstanding_bytes"], p["outstanding_allocations"]
    );
    assert!((300..=600).contains(&blocks), "about 440 blocks of the last second: {in_flight}");
    assert_eq!(bytes, blocks * 1024, "1 KiB each: {in_flight}");
    assert_eq!(in_flight["younger_than_seconds"], 1.0);
    for stack in p["stacks"].as_array().expect("stacks") {
        let age = stack["mean_age_seconds"].as_f64().expect("age");
        assert!(age >= 1.0, "a stack keeps only blocks older than a second: {stack}");
    }
    let kept = |function: &str| {
        p["stacks"]
            .as_array()
            .expect("stacks")
            .iter()
            .filter(|s| s["site"]["function"] == function)
            .map(|s| s["allocations"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    // Two of the window's three seconds: about 800 ring blocks and 80 leaked ones.
    assert!((600..=1000).contains(&kept("ring_entry")), "ring kept {}", kept("ring_entry"));
    assert!((50..=110).contains(&kept("leak_entry")), "leak kept {}", kept("leak_entry"));
}

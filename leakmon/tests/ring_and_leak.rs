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

//! `--attach suspects`: probes go on a process only once its resident memory grows
//! steadily, show where it allocates, and come off when the budget is spent.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{build_fixture, Reap};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:19477";

fn attached() -> Option<u64> {
    common::http_get(LISTEN, "/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix("leakmon_attached_processes ")?.trim().parse().ok())
}

#[test]
fn a_growing_process_gets_probes_for_a_while_and_a_flat_one_never() {
    let grow = build_fixture("grow.c", &[]);
    let leaky = common::named(&grow, "grow_suspect");
    let calm = common::named(&grow, "grow_calm");

    let _daemon = Reap(
        common::leakmon()
            .args([
                "run",
                "--attach",
                "suspects",
                "--sample-interval",
                "0.5s",
                "--window",
                "10s",
                "--suspect-duration",
                "12s",
                "--web.listen-address",
                LISTEN,
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("start leakmon"),
    );
    let up = Instant::now();
    while common::http_get(LISTEN, "/healthz").is_none() {
        assert!(up.elapsed() < Duration::from_secs(30), "daemon did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(attached(), Some(0), "nothing attributed before anything grows");
    let _leaky = Reap(Command::new(&leaky).arg("leak").spawn().expect("start leaky"));
    let _calm = Reap(Command::new(&calm).arg("flat").spawn().expect("start calm"));

    // The leak is flagged from its resident memory, then attributed: a heap series with
    // the allocating function on top.
    let start = Instant::now();
    let mut heap: Option<Value> = None;
    let mut attached_at = None;
    while start.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_millis(500));
        if attached_at.is_none() && attached() == Some(1) {
            attached_at = Some(Instant::now());
        }
        let Some(body) = common::http_get(LISTEN, "/api/v1/processes") else { continue };
        let doc: Value = serde_json::from_str(&body).expect("JSON");
        let series = doc["series"].as_array().expect("series");
        assert!(
            !series.iter().any(|s| s["comm"] == "grow_calm" && s["signal"] == "heap"),
            "the flat process was never probed"
        );
        if let Some(s) = series.iter().find(|s| {
            s["comm"] == "grow_suspect"
                && s["signal"] == "heap"
                && s["stacks"].as_array().is_some_and(|a| !a.is_empty())
        }) {
            heap = Some(s.clone());
            // Probes went on between the last look at the gauge and this series (one
            // sample interval can do both): they went on no later than now.
            if attached_at.is_none() && attached() == Some(1) {
                attached_at = Some(Instant::now());
            }
            break;
        }
    }
    let heap = heap.expect("the suspect got a heap series with stacks");
    assert_eq!(heap["stacks"][0]["function"], "touch", "{heap:#}");
    assert!(heap["allocations"].as_u64().expect("allocations") > 0);
    let attached_at = attached_at.expect("one process attributed");
    // /api/v1/leaks shows the suspicion with the stacks found by attribution.
    let listed: Value =
        serde_json::from_str(&common::http_get(LISTEN, "/api/v1/leaks").expect("leaks")).expect("JSON");
    let leak = listed["leaks"]
        .as_array()
        .expect("leaks")
        .iter()
        .find(|l| l["comm"] == "grow_suspect" && l["signal"] == "anon")
        .unwrap_or_else(|| panic!("the leak is listed: {listed:#}"));
    assert_eq!(leak["verdict"], "steady_growth");
    assert!(leak["growth_bytes_per_second"].as_f64().expect("slope") > 1000.0, "{leak:#}");
    assert!(leak["time_to_exhaustion_seconds"].as_f64().is_some(), "{leak:#}");
    assert_eq!(leak["stacks"][0]["function"], "touch", "{leak:#}");

    // The budget ends: probes off, nothing attributed.
    while attached() != Some(0) {
        assert!(
            attached_at.elapsed() < Duration::from_secs(25),
            "probes still on after the suspect duration"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(attached_at.elapsed() >= Duration::from_secs(11), "not before the suspect duration");
}

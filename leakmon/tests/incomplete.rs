//! A process whose allocations no longer all fit the kernel's tables is marked
//! incomplete, in the JSON and in a metric, and its heap verdict is withheld rather
//! than guessed from lower bounds.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{build_fixture, http_get, Reap};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:19488";

#[test]
fn a_full_live_table_withholds_the_heap_verdict() {
    let grow = common::named(&build_fixture("grow.c", &[]), "grow_overflow");
    let leaky = Reap(Command::new(&grow).arg("leak").spawn().expect("start the fixture"));
    let pid = leaky.0.id().to_string();
    // 64 live blocks fit; the leak's 4 KiB a second in small blocks overflows them in
    // seconds, and every block past them is uncounted.
    let _daemon = common::start_daemon(
        &[
            "--attach",
            "pids",
            "--pid",
            &pid,
            "--max-live",
            "64",
            "--sample-interval",
            "0.5s",
            "--window",
            "6s",
        ],
        LISTEN,
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    let heap = loop {
        assert!(Instant::now() < deadline, "no incomplete heap series for the fixture");
        std::thread::sleep(Duration::from_millis(500));
        let Some(body) = http_get(LISTEN, "/api/v1/processes") else { continue };
        let doc: Value = serde_json::from_str(&body).expect("JSON");
        let found = doc["series"].as_array().expect("series").iter().find(|s| {
            s["comm"] == "grow_overflow"
                && s["signal"] == "heap"
                && s["incomplete"] == true
                && s["samples"].as_u64() > Some(12)
        });
        if let Some(series) = found {
            break series.clone();
        }
    };
    assert_eq!(heap["verdict"], "withheld", "{heap:#}");
    assert_eq!(heap["suspected"], false, "{heap:#}");
    let metrics = http_get(LISTEN, "/metrics").expect("metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("leakmon_heap_incomplete{")
            && l.contains("grow_overflow")
            && l.ends_with(" 1")),
        "{metrics}"
    );
    let lost: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("leakmon_bpf_map_errors_total{map=\"live\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(lost > 0, "the losses are counted: {metrics}");
}

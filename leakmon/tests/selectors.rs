//! `--comm`: attribution for the processes with a name, including ones started later.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{build_fixture, Reap};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:19478";

#[test]
fn a_process_named_on_the_command_line_is_attributed_even_when_it_starts_later() {
    let grow = build_fixture("grow.c", &[]);
    let chosen = common::named(&grow, "grow_chosen");
    let other = common::named(&grow, "grow_other");
    let _daemon = common::start_daemon(
        &["--comm", "grow_chosen", "--sample-interval", "0.5s", "--window", "10s"],
        LISTEN,
    );
    let _chosen = Reap(Command::new(&chosen).arg("leak").spawn().expect("start"));
    let _other = Reap(Command::new(&other).arg("leak").spawn().expect("start"));
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(20), "the chosen process never got a heap series");
        std::thread::sleep(Duration::from_millis(500));
        let Some(body) = common::http_get(LISTEN, "/api/v1/processes") else { continue };
        let doc: Value = serde_json::from_str(&body).expect("JSON");
        let series = doc["series"].as_array().expect("series");
        assert!(
            !series.iter().any(|s| s["comm"] == "grow_other" && s["signal"] == "heap"),
            "only the chosen name"
        );
        let heap = series.iter().find(|s| s["comm"] == "grow_chosen" && s["signal"] == "heap");
        if let Some(h) = heap.filter(|h| h["allocations"].as_u64().unwrap_or(0) >= 20) {
            assert_eq!(h["stacks"][0]["function"], "touch", "{h:#}");
            break;
        }
    }
}

//! Each top allocation stack has a trend of its own: in a process with a large flat
//! allocation site and a small growing one, the growing one is flagged, in the JSON
//! API and in `leakmon_stack_leak_suspected`.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{build_fixture, Reap};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:19479";

#[test]
fn the_growing_stack_is_flagged_and_the_large_flat_one_is_not() {
    let grow = build_fixture("grow.c", &[]);
    let sites = common::named(&grow, "grow_sites");
    let _daemon = common::start_daemon(
        &["--comm", "grow_sites", "--sample-interval", "0.5s", "--window", "10s"],
        LISTEN,
    );
    let _sites = Reap(Command::new(&sites).arg("two_sites").stdout(Stdio::null()).spawn().expect("start"));
    let start = Instant::now();
    let stacks = loop {
        assert!(start.elapsed() < Duration::from_secs(45), "no stack verdicts in 45 s");
        std::thread::sleep(Duration::from_millis(500));
        let Some(body) = common::http_get(LISTEN, "/api/v1/processes") else { continue };
        let doc: Value = serde_json::from_str(&body).expect("JSON");
        let Some(heap) = doc["series"]
            .as_array()
            .expect("series")
            .iter()
            .find(|s| s["comm"] == "grow_sites" && s["signal"] == "heap")
            .cloned()
        else {
            continue;
        };
        let stacks = heap["stacks"].as_array().cloned().unwrap_or_default();
        let by = |f: &str| stacks.iter().find(|s| s["function"] == f).cloned();
        if let (Some(touch), Some(hold)) = (by("touch"), by("hold")) {
            if touch["trend"]["suspected"] == true && hold["trend"]["verdict"].is_string() {
                break (touch, hold);
            }
        }
    };
    let (touch, hold) = stacks;
    let detected = start.elapsed();
    assert_eq!(hold["bytes"], 8 << 20, "{hold:#}");
    assert_eq!(hold["trend"]["suspected"], false, "{hold:#}");
    assert_eq!(hold["trend"]["verdict"], "flat", "{hold:#}");
    let growth = touch["trend"]["growth_bytes_per_second"].as_f64().expect("growth");
    // 4096 B every 100 ms plus the loop's own time: a little under 40960 B/s.
    assert!((30_000.0..=41_000.0).contains(&growth), "touch grows {growth} B/s");

    let metrics = common::http_get(LISTEN, "/metrics").expect("scrape");
    let value = |stack: &Value| {
        let label = format!("stack=\"{}\"", stack["stack"].as_str().expect("stack hash"));
        metrics
            .lines()
            .find(|l| l.starts_with("leakmon_stack_leak_suspected{") && l.contains(&label))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(value(&touch).as_deref(), Some("1"), "{metrics}");
    assert_eq!(value(&hold).as_deref(), Some("0"), "{metrics}");
    eprintln!("growing stack flagged {:.1} s after start", detected.as_secs_f64());
}

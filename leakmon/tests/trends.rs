//! Leak-trend verdicts on real workloads with known shapes, under the real daemon, with
//! a real Prometheus scraping it.
//!
//! `--sample-interval 0.5s --window 30s`. A steady native leak of 4 KiB/s must be
//! flagged within 60 s; a Python dict cache (64 KB/s) and a Node.js object cache
//! (640 KB/s) within 75 s; a warm-up, a bounded cache, two sawtooths (one whose 8 s
//! period was flagged before the floor was judged per tooth) and flat high memory
//! never; a leak that stops must clear within a window after it stops.

mod common;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{build_fixture, Reap};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:19474";
const PROMETHEUS: &str = "127.0.0.1:19090";

fn spawn(cmd: &mut Command) -> Reap {
    Reap(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start workload"))
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, start to end, reads best in one place")]
fn verdicts_and_detection_times_on_real_workloads() {
    let grow = build_fixture("grow.c", &[]);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");

    let _daemon = common::start_daemon(&["--sample-interval", "0.5s", "--window", "30s"], LISTEN);

    // A real Prometheus scraping the daemon every second.
    let _prometheus = common::start_prometheus(PROMETHEUS, LISTEN, None);

    let start = Instant::now();
    let mut workloads = vec![
        spawn(Command::new(common::named(&grow, "grow_leak")).arg("leak")),
        spawn(Command::new(common::named(&grow, "grow_stop")).args(["stop", "35"])),
        spawn(Command::new(common::named(&grow, "grow_plateau")).arg("plateau")),
        spawn(Command::new(common::named(&grow, "grow_cache")).arg("cache")),
        spawn(Command::new(common::named(&grow, "grow_sawtooth")).arg("sawtooth")),
        spawn(Command::new(common::named(&grow, "grow_saw8")).arg("sawtooth8")),
        spawn(Command::new(common::named(&grow, "grow_flat")).arg("flat")),
        spawn(Command::new("/usr/bin/python3").arg(fixtures.join("py_cache.py"))),
    ];
    // `cargo xtask setup --tests` installs Node.js: missing, it is a failure.
    let node = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(node, "node is not installed: run `cargo xtask setup --tests`");
    workloads.push(spawn(Command::new("node").arg(fixtures.join("node_cache.js"))));

    // comm → (first flagged at, last verdict, flagged now)
    let mut first_flag: BTreeMap<String, f64> = BTreeMap::new();
    let mut cleared_at: BTreeMap<String, f64> = BTreeMap::new();
    let mut verdicts: BTreeMap<String, String> = BTreeMap::new();
    let watched = [
        "grow_leak",
        "grow_stop",
        "grow_plateau",
        "grow_cache",
        "grow_sawtooth",
        "grow_saw8",
        "grow_flat",
        "python3",
        "node",
    ];
    while start.elapsed() < Duration::from_secs(95) {
        std::thread::sleep(Duration::from_millis(500));
        let Some(body) = common::http_get(LISTEN, "/api/v1/processes") else { continue };
        let doc: Value = serde_json::from_str(&body).expect("processes JSON");
        let t = start.elapsed().as_secs_f64();
        for s in doc["series"].as_array().expect("series") {
            let comm = s["comm"].as_str().expect("comm");
            if !watched.contains(&comm) || s["signal"] != "anon" {
                continue;
            }
            let suspected = s["suspected"].as_bool().expect("suspected");
            if suspected {
                first_flag.entry(comm.to_owned()).or_insert(t);
                cleared_at.remove(comm);
            } else if first_flag.contains_key(comm) {
                cleared_at.entry(comm.to_owned()).or_insert(t);
            }
            verdicts.insert(comm.to_owned(), s["verdict"].as_str().expect("verdict").to_owned());
        }
    }

    let mut table = String::from("shape            verdict         flagged at   cleared at\n");
    for comm in watched {
        let _ = writeln!(
            table,
            "{comm:<16} {:<15} {:>10} {:>12}",
            verdicts.get(comm).map_or("-", String::as_str),
            first_flag.get(comm).map_or("-".to_owned(), |t| format!("{t:.1}s")),
            cleared_at.get(comm).map_or("-".to_owned(), |t| format!("{t:.1}s")),
        );
    }
    eprintln!("{table}");

    let flagged_within = |comm: &str, limit: f64| {
        let t = first_flag.get(comm).unwrap_or_else(|| panic!("{comm} never flagged\n{table}"));
        assert!(*t <= limit, "{comm} flagged at {t:.1}s, later than {limit}s\n{table}");
    };
    flagged_within("grow_leak", 60.0);
    flagged_within("python3", 75.0);
    flagged_within("node", 75.0);
    for comm in ["grow_plateau", "grow_cache", "grow_sawtooth", "grow_saw8", "grow_flat"] {
        assert!(!first_flag.contains_key(comm), "{comm} was flagged\n{table}");
    }
    // The stopping leak: flagged while it leaked, cleared within a window (+ one
    // analysis step) of stopping at 35 s.
    flagged_within("grow_stop", 35.0);
    let cleared = cleared_at.get("grow_stop").unwrap_or_else(|| panic!("grow_stop never cleared\n{table}"));
    assert!(*cleared <= 35.0 + 30.0 + 5.0, "grow_stop cleared at {cleared:.1}s\n{table}");
    assert_eq!(verdicts["grow_leak"], "steady_growth");

    // Prometheus has the suspicion, by PromQL.
    let query =
        "/api/v1/query?query=leakmon_leak_suspected%7Bcomm%3D%22grow_leak%22%2Csignal%3D%22anon%22%7D%3D%3D1";
    let answer = common::http_get(PROMETHEUS, query).expect("query Prometheus");
    let answer: Value = serde_json::from_str(&answer).expect("Prometheus JSON");
    assert_eq!(answer["status"], "success", "{answer}");
    let result = answer["data"]["result"].as_array().expect("result");
    assert_eq!(result.len(), 1, "the leak is in Prometheus: {answer}");
    assert_eq!(result[0]["metric"]["comm"], "grow_leak");

    // A real scrape passes promtool's lint.
    let scrape = common::http_get(LISTEN, "/metrics").expect("scrape");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    std::io::Write::write_all(&mut promtool.stdin.take().expect("stdin"), scrape.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(workloads);
}

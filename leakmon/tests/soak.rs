//! leakmon's own memory stays bounded: a few minutes of thousands of short-lived traced
//! processes a minute beside one million live blocks, with the daemon's resident
//! memory sampled throughout and judged by leakmon's own trend code.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::Reap;
use leakmon::analysis::trend::{analyse, theil_sen, Params, Sample, Verdict};

const LISTEN: &str = "127.0.0.1:19489";
/// Long enough for several purge, rescan and summary cycles.
const SOAK: Duration = Duration::from_secs(150);
/// The first samples cover start-up (tables, caches filling), not the steady state.
const WARM_UP: Duration = Duration::from_secs(30);

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn the_daemons_memory_levels_off_under_process_churn_and_a_million_blocks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let hold = dir.path().join("hold");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/hold.c");
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-fno-builtin", "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls", "-o"])
        .arg(&hold)
        .arg(&source)
        .status()
        .expect("run gcc");
    assert!(status.success());
    let daemon = common::start_daemon(
        &[
            "--attach",
            "all",
            "--sample-interval",
            "1s",
            "--window",
            "30s",
            "--interval",
            "5",
            "--max-live",
            "1500000",
            "--max-totals",
            "400000",
        ],
        LISTEN,
    );
    let pid = daemon.0.id();
    let mut million = Reap(Command::new(&hold).arg("million").stdout(Stdio::piped()).spawn().expect("start"));
    let mut ready = String::new();
    BufReader::new(million.0.stdout.as_mut().expect("stdout")).read_line(&mut ready).expect("read");
    assert_eq!(ready.trim(), "ready");

    let start = Instant::now();
    let mut samples = Vec::new();
    let mut processes = 0;
    while start.elapsed() < SOAK {
        // 300 traced processes that allocate and exit, about every 2 s: some 9,000 a
        // minute, each a fork and an exit event and a purge.
        let out = Command::new(&hold).args(["storm", "300"]).output().expect("storm");
        assert!(out.status.success());
        processes += 300;
        std::thread::sleep(Duration::from_millis(1500));
        samples.push(Sample { t: start.elapsed().as_secs_f64(), v: rss_kib(pid) * 1024.0 });
        assert!(common::http_get(LISTEN, "/healthz").is_some(), "the daemon still serves");
    }
    let steady: Vec<Sample> = samples.iter().copied().filter(|s| s.t >= WARM_UP.as_secs_f64()).collect();
    let span = steady.last().expect("samples").t - steady[0].t;
    let params = Params { window: span, ..Params::default() };
    let analysis = analyse(&steady, &params);
    let slope = theil_sen(&steady).expect("a slope");
    let mib = |v: f64| v / 1_048_576.0;
    eprintln!(
        "soak: {processes} processes in {:.0?}; RSS {:.1} MiB at start, {:.1} MiB after warm-up, {:.1} MiB at the end; slope {:.0} B/s, verdict {}",
        start.elapsed(),
        mib(samples[0].v),
        mib(steady[0].v),
        mib(steady.last().expect("samples").v),
        slope,
        analysis.verdict.as_str()
    );
    assert_ne!(analysis.verdict, Verdict::SteadyGrowth, "leakmon's own memory grows: {steady:?}");
    // Less than 1 MiB over an hour, should it go on.
    assert!(slope < 300.0, "slope {slope} B/s: {steady:?}");
}

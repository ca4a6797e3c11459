//! Lifecycle events (fork, exec, exit) are not lost when they come fast while the
//! daemon is busy: 20,000 short-lived traced processes (a fork and an exit event each)
//! next to a process with 2^17 live stacks, whose totals take the sampling loop a
//! while to read each tick.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{http_get, Reap};

const LISTEN: &str = "127.0.0.1:19484";

#[test]
fn a_fork_storm_beside_a_busy_sampling_loop_loses_no_event() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/hold.c");
    let dir = tempfile::tempdir().expect("tempdir");
    let hold = dir.path().join("hold");
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-fno-builtin", "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls", "-o"])
        .arg(&hold)
        .arg(&source)
        .status()
        .expect("run gcc");
    assert!(status.success());
    let _daemon = common::start_daemon(
        &[
            "--attach",
            "all",
            "--sample-interval",
            "0.2s",
            "--window",
            "10s",
            "--max-stacks",
            "200000",
            "--max-totals",
            "400000",
        ],
        LISTEN,
    );
    let mut stacks = Reap(Command::new(&hold).arg("stacks").stdout(Stdio::piped()).spawn().expect("start"));
    let mut ready = String::new();
    BufReader::new(stacks.0.stdout.as_mut().expect("stdout")).read_line(&mut ready).expect("read");
    assert_eq!(ready.trim(), "ready");
    std::thread::sleep(Duration::from_secs(2));

    let storm = Command::new(&hold).args(["storm", "20000"]).output().expect("run the storm");
    let rate = String::from_utf8_lossy(&storm.stdout).trim().to_owned();
    // Lost events show at once. The backlog of 60,000 fork, exec and exit events is
    // handled in batches between sampling ticks, each tick reading 2^17 totals: about
    // a second in a debug build. Handled one event per wake-up it took 85 s here.
    let storm_ended = Instant::now();
    let deadline = storm_ended + Duration::from_secs(30);
    let (lost, queued) = loop {
        // A daemon that died, or a renamed metric, must not read as "nothing lost".
        let metrics = http_get(LISTEN, "/metrics").expect("the daemon answers a scrape after the storm");
        let values = |family: &str| -> Vec<u64> {
            metrics
                .lines()
                .filter(|l| l.starts_with(family))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .collect()
        };
        let lost = values("leakmon_events_lost_total{");
        let queued = values("leakmon_lifecycle_events_queued ");
        assert!(!lost.is_empty() && queued.len() == 1, "the event metrics are in the scrape:\n{metrics}");
        let (lost, queued) = (lost.iter().sum::<u64>(), queued[0]);
        // Done once every event of the storm was handled (none waits in the queue).
        if Instant::now() > deadline || lost > 0 || queued == 0 {
            break (lost, queued);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("storm: {rate}, events lost: {lost}, still queued: {queued} after {:?}", storm_ended.elapsed());
    assert_eq!(lost, 0, "events lost during the storm ({rate})");
    assert_eq!(queued, 0, "every event of the storm was handled within 30 s ({rate})");
}

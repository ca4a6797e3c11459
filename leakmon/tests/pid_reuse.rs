//! A pid taken by a new process before the daemon purged the exited one: the new
//! process starts with none of the dead one's blocks, and the dead one's purge takes
//! none of the new one's.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{build_fixture, http_get, Reap};

const LISTEN: &str = "127.0.0.1:19492";

fn heap_of(metrics: &str, comm: &str) -> Option<u64> {
    let label = format!("comm=\"{comm}\"");
    metrics
        .lines()
        .find(|l| l.starts_with("leakmon_heap_live_bytes{") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a_reused_pid_starts_clean_and_keeps_its_blocks_through_the_old_ones_purge() {
    let fixture = build_fixture("pid_reuse.c", &[]);
    let _daemon = common::start_daemon(&["--attach", "all", "--sample-interval", "0.5s"], LISTEN);
    // reuse_a leaks 1000 x 48 B and lingers 1.5 s; reuse_b gets its pid and leaks
    // 500 x 32 B from leak_b.
    let mut run =
        Reap(Command::new(&fixture).arg("1500").stdout(Stdio::piped()).spawn().expect("start fixture"));
    let mut line = String::new();
    BufReader::new(run.stdout.take().expect("piped")).read_line(&mut line).expect("read pids");
    let pids: Vec<&str> = line.split_whitespace().collect();
    assert!(
        pids.len() == 4 && pids[1] == pids[3],
        "the second child did not get the first one's pid: {line:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    // Over three of the daemon's 5 s purges, reuse_b holds exactly its own bytes:
    // never the dead process's on top, never less once the dead one is purged.
    let until = Instant::now() + Duration::from_secs(16);
    let mut seen = Vec::new();
    while Instant::now() < until {
        if let Some(bytes) = http_get(LISTEN, "/metrics").as_deref().and_then(|m| heap_of(m, "reuse_b")) {
            seen.push(bytes);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(seen.len() >= 20, "reuse_b's heap was exported: {seen:?}");
    assert!(seen.iter().all(|&b| b == 16_000), "reuse_b's heap: {seen:?}");
}

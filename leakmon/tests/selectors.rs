//! `--comm`: attribution for the processes with a name, including ones started later.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{build_fixture, Reap};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:19478";

fn get(path: &str) -> Option<String> {
    let mut s = TcpStream::connect(LISTEN).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_owned())
}

#[test]
fn a_process_named_on_the_command_line_is_attributed_even_when_it_starts_later() {
    let grow = build_fixture("grow.c", &[]);
    let chosen = grow.with_file_name("grow_chosen");
    let other = grow.with_file_name("grow_other");
    std::fs::copy(&grow, &chosen).expect("copy");
    std::fs::copy(&grow, &other).expect("copy");
    let _daemon = Reap(
        common::leakmon()
            .args(["run", "--comm", "grow_chosen", "--sample-interval", "0.5s", "--window", "10s"])
            .args(["--web.listen-address", LISTEN])
            .stderr(Stdio::null())
            .spawn()
            .expect("start leakmon"),
    );
    let up = Instant::now();
    while get("/healthz").is_none() {
        assert!(up.elapsed() < Duration::from_secs(30), "daemon did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _chosen = Reap(Command::new(&chosen).arg("leak").spawn().expect("start"));
    let _other = Reap(Command::new(&other).arg("leak").spawn().expect("start"));
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(20), "the chosen process never got a heap series");
        std::thread::sleep(Duration::from_millis(500));
        let Some(body) = get("/api/v1/processes") else { continue };
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

//! Profiles people look at: `report --format pprof|folded|svg`, and the daemon's
//! `/debug/pprof/heap` and `/debug/flamegraph.svg`. The pprof output is read back by
//! an independent reader, `go tool pprof`, and must give the exact fixture figures.

mod common;

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{build_fixture, http_get, http_get_raw, leakmon, Reap, LEAKS};
use serde_json::Value;

/// `go tool pprof -top` of one sample type: flat value per function, and the total.
fn go_pprof_top(source: &str, sample_index: &str) -> (BTreeMap<String, u64>, u64) {
    let out = Command::new("go")
        .args(["tool", "pprof", "-top", "-nodefraction=0", "-nodecount=100000", "-unit=B"])
        .arg(format!("-sample_index={sample_index}"))
        .arg(source)
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("run go tool pprof (golang-go, installed by `cargo xtask test`)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "go tool pprof failed: {}{text}", String::from_utf8_lossy(&out.stderr));
    let number = |s: &str| s.trim_end_matches('B').parse::<u64>().ok();
    let total = text
        .lines()
        .find_map(|l| l.split(" of ").nth(1)?.strip_suffix(" total").and_then(number))
        .unwrap_or_else(|| panic!("no total in\n{text}"));
    let mut flat = BTreeMap::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 6 {
            if let Some(v) = number(cols[0]) {
                *flat.entry(cols[5..].join(" ")).or_insert(0) += v;
            }
        }
    }
    (flat, total)
}

#[test]
fn report_pprof_read_by_go_tool_pprof_gives_the_exact_figures() {
    let fixture = build_fixture("leaks.c", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("heap.pb.gz");
    let out = leakmon()
        .args(["report", "--format", "pprof", "--"])
        .arg(&fixture)
        .stdout(std::fs::File::create(&file).expect("create"))
        .output()
        .expect("run leakmon");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let raw = std::fs::read(&file).expect("read");
    assert_eq!(&raw[..2], &[0x1f, 0x8b], "gzipped");

    let source = file.display().to_string();
    let (bytes, total_bytes) = go_pprof_top(&source, "inuse_space");
    let (objects, _) = go_pprof_top(&source, "inuse_objects");
    for &(function, want_bytes, want_allocs) in LEAKS {
        assert_eq!(bytes.get(function), Some(&want_bytes), "{function} bytes: {bytes:?}");
        assert_eq!(objects.get(function), Some(&want_allocs), "{function} allocations: {objects:?}");
    }
    let fixture_bytes: u64 = LEAKS.iter().map(|l| l.1).sum();
    // Beside the fixture's leaks only libc's thread bookkeeping is unfreed.
    assert!((fixture_bytes..fixture_bytes + 4096).contains(&total_bytes), "total {total_bytes}");
}

#[test]
fn folded_and_svg_reports() {
    let fixture = build_fixture("leaks.c", &[]);
    let out = leakmon().args(["report", "--format", "folded", "--"]).arg(&fixture).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains(";leak_small ")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.starts_with("leaks (pid "), "rooted at the process: {line}");
    assert!(line.ends_with(";main;leak_small 48000"), "outermost first: {line}");

    let out = leakmon().args(["report", "--format", "svg", "--"]).arg(&fixture).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svg = String::from_utf8_lossy(&out.stdout);
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"), "an SVG");
    assert!(svg.contains("leak_realloc_chain") && svg.contains("Unfreed memory"), "{svg}");
}

#[test]
fn pprof_refuses_to_write_to_a_terminal_only() {
    // Not a terminal here (a pipe): allowed. The refusal is for interactive use.
    let out = leakmon().args(["report", "--format", "pprof", "--", "true"]).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(&out.stdout[..2], &[0x1f, 0x8b]);
    // A terminal (a pty, through script(1)): refused in one line, nothing written.
    let command = format!("{} report --format pprof -- true", env!("CARGO_BIN_EXE_leakmon"));
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "refused: {text}");
    assert_eq!(
        text.trim_end(),
        "leakmon: --format pprof writes a binary profile: redirect it to a file (> heap.pb.gz)",
        "one line on the terminal, no binary"
    );
}

const LISTEN: &str = "127.0.0.1:19483";

#[test]
fn the_daemon_serves_heap_profiles_and_flame_graphs() {
    let grow = build_fixture("grow.c", &[]);
    let sites = common::named(&grow, "grow_prof");
    let _daemon = common::start_daemon(
        &["--comm", "grow_prof", "--sample-interval", "0.5s", "--window", "10s"],
        LISTEN,
    );
    let child = Reap(Command::new(&sites).arg("two_sites").stdout(Stdio::null()).spawn().expect("start"));
    let pid = child.0.id();

    // Until the 8 MiB block of hold() is in the heap series, with its service.
    let start = Instant::now();
    let service = loop {
        assert!(start.elapsed() < Duration::from_secs(30), "grow_prof never showed its heap");
        std::thread::sleep(Duration::from_millis(500));
        let Some(body) = http_get(LISTEN, "/api/v1/processes") else { continue };
        let doc: Value = serde_json::from_str(&body).expect("JSON");
        let heap = doc["series"]
            .as_array()
            .expect("series")
            .iter()
            .find(|s| s["comm"] == "grow_prof" && s["signal"] == "heap")
            .cloned();
        if let Some(h) = heap.filter(|h| h["current_bytes"].as_u64().unwrap_or(0) >= 8 << 20) {
            break h["service"].as_str().expect("service").to_owned();
        }
    };

    let by_pid = format!("http://{LISTEN}/debug/pprof/heap?pid={pid}");
    let (bytes, _) = go_pprof_top(&by_pid, "inuse_space");
    assert_eq!(bytes.get("hold"), Some(&(8 << 20)), "{bytes:?}");
    assert!(bytes.get("touch").is_some_and(|&b| b > 0 && b % 4096 == 0), "{bytes:?}");
    let by_service = format!("http://{LISTEN}/debug/pprof/heap?service={service}");
    let (bytes, _) = go_pprof_top(&by_service, "inuse_space");
    assert_eq!(bytes.get("hold"), Some(&(8 << 20)), "{bytes:?}");

    let (head, svg) = http_get_raw(LISTEN, &format!("/debug/flamegraph.svg?pid={pid}")).expect("flame graph");
    assert!(head.contains(" 200 ") && head.contains("image/svg+xml"), "{head}");
    assert!(svg.contains("<svg") && svg.contains("hold"), "{svg}");
    assert!(svg.contains(&format!("Unfreed memory of pid {pid}")));

    // Bad requests say what is wrong.
    let (head, body) = http_get_raw(LISTEN, "/debug/pprof/heap?pid=1").expect("answer");
    assert!(head.contains(" 404 ") && body.contains("pid 1 is not traced"), "{head}\n{body}");
    let (head, body) = http_get_raw(LISTEN, "/debug/pprof/heap").expect("answer");
    assert!(head.contains(" 400 ") && body.contains("?pid=N or ?service=NAME"), "{head}\n{body}");
}

//! The configuration file: checked with line numbers, and honoured by `run`.

mod common;

use std::{
    io::Read as _,
    io::Write as _,
    net::TcpStream,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use common::{leakmon, Reap};

#[test]
fn the_shipped_example_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/leakmon.toml");
    let out = leakmon().args(["config", "check"]).arg(&example).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("leakmon.toml: ok\n"));
}

#[test]
fn every_problem_is_reported_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "window = \"1s\"\nmax-live = -5\nfrobnicate = true\n").expect("write");
    let out = leakmon().args(["config", "check"]).arg(&file).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].ends_with("bad.toml:2: max-live must be between 1 and 4294967295, not -5"), "{err}");
    assert!(lines[1].contains("bad.toml:3: unknown key frobnicate"), "{err}");
    // `run` refuses it the same way, before doing anything.
    let out = leakmon().args(["run", "--config"]).arg(&file).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 2);
}

#[test]
fn run_takes_its_options_from_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("leakmon.toml");
    std::fs::write(
        &file,
        "sample-interval = \"200ms\"\nwindow = \"5s\"\n[web]\nlisten-address = \"127.0.0.1:19476\"\n",
    )
    .expect("write");
    let _daemon =
        Reap(leakmon().args(["run", "--config"]).arg(&file).stderr(Stdio::null()).spawn().expect("start"));
    let started = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect("127.0.0.1:19476") {
            write!(s, "GET /healthz HTTP/1.0\r\n\r\n").expect("write");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.contains(" 200 ") {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no daemon on the configured address");
        std::thread::sleep(Duration::from_millis(100));
    }
}

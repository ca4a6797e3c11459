//! The systemd unit and the daemon's side of it: the unit passes `systemd-analyze
//! verify` and rates 4.0 or better in `systemd-analyze security`; the daemon speaks
//! the notify protocol (READY, WATCHDOG, RELOADING, STOPPING) on a real socket, and
//! SIGHUP reloads the configuration without losing history.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    os::unix::net::UnixDatagram,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{http_get, Reap};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde_json::Value;

/// The shipped unit with `ExecStart` pointing at the binary under test.
fn unit_under_test(dir: &Path) -> std::path::PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/leakmon.service");
    let text = std::fs::read_to_string(shipped).expect("read unit");
    assert!(text.contains("ExecStart=/usr/bin/leakmon run --config /etc/leakmon/leakmon.toml"));
    let text =
        text.replace("ExecStart=/usr/bin/leakmon", &format!("ExecStart={}", env!("CARGO_BIN_EXE_leakmon")));
    let path = dir.join("leakmon.service");
    std::fs::write(&path, text).expect("write unit");
    path
}

#[test]
fn the_unit_verifies_and_is_hardened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_under_test(dir.path());
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "verify: {stderr}");

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for leakmon.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    eprintln!("systemd-analyze security: {score}");
    assert!(score <= 4.0, "exposure {score} > 4.0:\n{text}");
}

const LISTEN: &str = "127.0.0.1:19480";

#[test]
#[expect(clippy::too_many_lines, reason = "one daemon's life, start to stop")]
fn notify_watchdog_and_reload_without_losing_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let config = dir.path().join("leakmon.toml");
    // A web configuration next to it (nothing in it but a comment, so plain HTTP).
    let web = dir.path().join("web.yml");
    std::fs::write(&web, "# no TLS, no users\n").expect("write web config");
    let write_config = |window: &str, max_stacks: u32| {
        std::fs::write(
            &config,
            format!(
                "sample-interval = \"0.5s\"\nwindow = \"{window}\"\nmax-stacks = {max_stacks}\n[web]\nconfig-file = \"web.yml\"\n"
            ),
        )
        .expect("write");
    };
    write_config("5s", 16384);

    // As systemd does: WATCHDOG_PID names the daemon itself (the shell's pid, kept
    // across its exec).
    let mut daemon = Reap(
        Command::new("sh")
            .arg("-c")
            .arg("WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\" --web.listen-address \"$2\"")
            .arg(env!("CARGO_BIN_EXE_leakmon"))
            .arg(&config)
            .arg(LISTEN)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "1000000")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start leakmon run"),
    );
    let daemon_pid = daemon.0.id();
    let pid = Pid::from_raw(daemon_pid as i32);
    let (tx, logs) = mpsc::channel::<String>();
    let stderr = daemon.0.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_log = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match logs.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!("no log line with {needle:?} in {seen:#?}");
    };
    // Read the socket all the time, as systemd does.
    let (note_tx, notes) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok(n) = socket.recv(&mut buf) {
            if note_tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    let wait_message = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match notes.recv_timeout(left) {
                Ok(m) if m.lines().any(|l| l == want) => return,
                Ok(m) => seen.push(m),
                Err(_) => break,
            }
        }
        panic!("no {want} (got {seen:?})");
    };

    wait_message("READY=1");
    assert!(http_get(LISTEN, "/healthz").is_some() || wait_until_serving(), "serving once ready");
    // WATCHDOG_USEC=1 s: pinged every half second.
    let start = Instant::now();
    for _ in 0..4 {
        wait_message("WATCHDOG=1");
    }
    assert!(start.elapsed() < Duration::from_secs(4), "4 pings took {:?}", start.elapsed());

    // A 5 s window at 0.5 s holds at most 11 samples.
    let samples = || -> u64 {
        let body = http_get(LISTEN, "/api/v1/processes").expect("processes");
        let doc: Value = serde_json::from_str(&body).expect("JSON");
        doc["series"]
            .as_array()
            .expect("series")
            .iter()
            .find(|s| {
                s["pids"].as_array().is_some_and(|p| p.contains(&Value::from(daemon_pid)))
                    && s["signal"] == "anon"
            })
            .map_or(0, |s| s["samples"].as_u64().expect("samples"))
    };
    std::thread::sleep(Duration::from_secs(7));
    let before = samples();
    assert!((10..=11).contains(&before), "samples in a 5 s window: {before}");

    write_config("20s", 1000);
    // The web configuration is set when the listener starts, the tables' sizes when the
    // programs load: a change is said to need a restart, never silently ignored.
    std::fs::write(&web, "# still no TLS, but changed\n").expect("change web config");
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    wait_message("RELOADING=1");
    wait_message("READY=1");
    let line = wait_log("max-stacks");
    assert!(line.contains("changes only at restart"), "{line}");
    let line = wait_log("web.config-file");
    assert!(line.contains("changes only at restart"), "{line}");
    let line = wait_log("configuration reloaded");
    assert!(line.contains("window=20s"), "{line}");
    let after = samples();
    // A tick between the first count and the reload may still trim one sample to the
    // old 5 s window; a lost history would start again from one.
    assert!(
        after + 1 >= before,
        "history kept across the reload: {before} then {after}: {}",
        http_get(LISTEN, "/api/v1/processes").unwrap_or_default()
    );
    std::thread::sleep(Duration::from_secs(5));
    let longer = samples();
    assert!(longer >= 18, "the 20 s window took effect: {longer} samples");

    // A broken file is refused and the running configuration stays.
    std::fs::write(&config, "window = \"forever\"\n").expect("write");
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    let line = wait_log("reload failed");
    assert!(line.contains("leakmon.toml:1"), "{line}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(samples() >= longer, "still running with its history");

    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    wait_message("STOPPING=1");
    assert!(daemon.0.wait().expect("wait").success());
}

fn wait_until_serving() -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if http_get(LISTEN, "/healthz").is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Regression: a full notify socket (a manager that does not read it) blocked the
/// sampling loop, and a stalled loop loses samples.
#[test]
fn a_manager_that_does_not_read_never_stalls_sampling() {
    const LISTEN_UNREAD: &str = "127.0.0.1:19481";
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let _socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let daemon = Reap(
        Command::new("sh")
            .arg("-c")
            .arg("WATCHDOG_PID=$$ exec \"$0\" run --sample-interval 0.2s --window 2s --web.listen-address \"$1\"")
            .arg(env!("CARGO_BIN_EXE_leakmon"))
            .arg(LISTEN_UNREAD)
            .env("NOTIFY_SOCKET", &socket_path)
            // 10 ms: 200 pings a second fill the socket's queue at once.
            .env("WATCHDOG_USEC", "10000")
            .stderr(Stdio::null())
            .spawn()
            .expect("start leakmon run"),
    );
    let daemon_pid = daemon.0.id();
    let samples = || -> Option<u64> {
        let doc: Value = serde_json::from_str(&http_get(LISTEN_UNREAD, "/api/v1/processes")?).ok()?;
        doc["series"]
            .as_array()?
            .iter()
            .find(|s| s["pids"].as_array().is_some_and(|p| p.contains(&Value::from(daemon_pid))))?["samples"]
            .as_u64()
    };
    let start = Instant::now();
    while samples().is_none_or(|n| n < 10) {
        assert!(start.elapsed() < Duration::from_secs(15), "sampling stalled at {:?} samples", samples());
        std::thread::sleep(Duration::from_millis(200));
    }
    kill(Pid::from_raw(daemon_pid as i32), Signal::SIGTERM).expect("SIGTERM");
    let mut daemon = daemon;
    assert!(daemon.0.wait().expect("wait").success(), "stops on SIGTERM");
}

//! `leakmon run`: the daemon traces processes started after it, drops their state when
//! they exit, and leaves no probe behind when stopped.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{build_fixture, Reap};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

#[test]
fn traces_new_processes_purges_exits_and_detaches_on_sigterm() {
    let before = common::bpf_programs_named(&["alloc_malloc", "free_enter"]);
    let fixture = build_fixture("wait_then_leak.c", &[]);
    let mut daemon = Reap(
        common::leakmon()
            .env("RUST_LOG", "info")
            .args([
                "run",
                "--attach",
                "all",
                "--interval",
                "1",
                "--top",
                "1000",
                "--web.listen-address",
                "127.0.0.1:19473",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start leakmon run"),
    );
    let (tx, lines) = mpsc::channel::<(Instant, String)>();
    let stderr = daemon.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    let wait_for = |pred: &dyn Fn(&str) -> bool, within: Duration| -> Option<(Instant, String)> {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match lines.recv_timeout(left) {
                Ok((at, line)) if pred(&line) => return Some((at, line)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    };
    wait_for(&|l| l.contains("leakmon running"), Duration::from_mins(1)).expect("daemon starts");
    assert!(
        common::bpf_programs_named(&["alloc_malloc", "free_enter"]) > before,
        "programs loaded while running"
    );

    let mut child = Reap(Command::new(&fixture).stdout(Stdio::piped()).spawn().expect("start fixture"));
    let mut ready = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut ready).expect("read");
    let pid = child.id();
    let tag = format!("pid={pid} ");
    let seen = wait_for(&|l| l.contains("top process") && l.contains(&tag), Duration::from_secs(30));
    let (_, line) = seen.expect("the fixture, started after the daemon, shows in a summary");
    assert!(line.contains("comm=wait_then_leak"), "{line}");

    kill(Pid::from_raw(pid as i32), Signal::SIGUSR1).expect("signal fixture");
    assert!(child.wait().expect("wait").success());
    let exited = Instant::now();
    // After the purge interval (5 s) no summary may list the exited process: every
    // line of the next 11 s is read (not only the first that matches, which is always
    // one from before the exit), and summaries must have gone on meanwhile.
    let until = exited + Duration::from_secs(11);
    let mut later_summaries = 0;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        let Ok((at, line)) = lines.recv_timeout(left) else { break };
        if at < exited + Duration::from_secs(6) || !line.contains("top process") {
            continue;
        }
        later_summaries += 1;
        assert!(!line.contains(&tag), "exited process still listed: {line}");
    }
    assert!(later_summaries > 0, "the daemon went on summarizing after the purge");

    // leakmon never traces itself.
    let own = format!("pid={} ", daemon.id());
    assert!(wait_for(&|l| l.contains("top process") && l.contains(&own), Duration::from_secs(3)).is_none());

    let stop = Instant::now();
    kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = daemon.wait().expect("wait daemon");
    assert!(status.success(), "clean exit: {status}");
    // Closing each uprobe waits for an RCU grace period (about 0.1 s, one at a time),
    // and `--attach all` probes every allocator mapped on the host: seconds, not more.
    assert!(stop.elapsed() < Duration::from_secs(10), "stops within seconds: {:?}", stop.elapsed());
    reader.join().expect("reader");
    assert_eq!(
        common::bpf_programs_named(&["alloc_malloc", "free_enter"]),
        before,
        "no program left loaded after SIGTERM"
    );
}

/// Every answer `/metrics` gives from the moment the port opens carries leakmon's own
/// families: an empty 200 reads to Prometheus as a healthy target with no series.
#[test]
fn metrics_are_never_an_empty_answer_even_before_the_first_sample() {
    const LISTEN: &str = "127.0.0.1:19496";
    let _daemon = Reap(
        common::leakmon()
            .args(["run", "--sample-interval", "2s", "--window", "60s", "--web.listen-address", LISTEN])
            .stderr(Stdio::null())
            .spawn()
            .expect("start leakmon run"),
    );
    let start = Instant::now();
    let mut answers = 0;
    while start.elapsed() < Duration::from_secs(20) {
        let Some((head, body)) = common::http_get_raw(LISTEN, "/metrics") else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        answers += 1;
        assert!(head.contains(" 200 "), "answer {answers}: {head}");
        assert!(
            body.contains("leakmon_build_info{"),
            "answer {answers} lacks leakmon's own families:\n{body}"
        );
        let processes = common::http_get(LISTEN, "/api/v1/processes").expect("processes answer");
        serde_json::from_str::<serde_json::Value>(&processes).expect("processes is JSON from the start");
        if common::http_get(LISTEN, "/healthz").is_some() {
            break;
        }
    }
    assert!(answers > 0, "the daemon never answered");
    assert!(common::http_get(LISTEN, "/healthz").is_some(), "the first sample came within 20 s");
}

//! Loads into a running process that fail, or pause, where nothing outside the process
//! can make them: forced through fail points (`FAILPOINTS`, built in only with the
//! `failpoints` feature, which the tests are run with). Each must leave the process as
//! it was: its redirections taken back, its registers its own, every signal it was sent
//! delivered.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    agent_state::{agent_mapped, tracer_of, AgentTarget},
    build_fixture, leakmon, signal,
};
use nix::sys::signal::Signal;

/// `report --agent --pid` on `pid` for `duration` seconds with `failpoints` set. A
/// leakmon built without its fail points would ignore them and these tests would
/// prove nothing: that build fails here, it is never skipped.
fn report_with(pid: u32, duration: &str, failpoints: &str) -> Command {
    if !cfg!(feature = "failpoints") {
        panic!(
            "leakmon was built without the failpoints feature these tests force failures through: run them with `cargo xtask test` (it builds with `--features leakmon/failpoints`)"
        );
    }
    let mut command = leakmon();
    command
        .args(["report", "--agent", "--format", "json", "--duration", duration, "--pid", &pid.to_string()])
        .env("FAILPOINTS", failpoints);
    command
}

/// The process's writable and executable mappings (a call's page is one).
fn executable_writable(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("maps")
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("rwxp"))
        .map(str::to_owned)
        .collect()
}

/// A load whose inline hooking fails after `leakmon_agent_start` redirected malloc's
/// slot: the redirections are taken back, and a later load is not refused as if
/// another leakmon were sampling.
#[test]
fn a_load_that_fails_after_the_agent_started_takes_its_redirections_back() {
    let mut target = AgentTarget::start();
    let out = report_with(target.pid, "1", "agent-after-start=return").output().expect("leakmon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the load did not fail: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("the agent's redirections were taken back"), "{stderr}");
    // malloc's slot holds what it held, nobody traces the process, no guardian is left.
    target.wait_restored();
    target.leak();
    let again = report_with(target.pid, "1", "").output().expect("leakmon");
    assert!(again.status.success(), "a later load: {}", String::from_utf8_lossy(&again.stderr));
    target.wait_restored();
    target.leak();
}

/// A write into the process fails after its thread was borrowed and ran an mmap: the
/// page goes again and the thread gets its own registers back (not the mmap's), so
/// the process goes on as if nothing happened.
#[test]
fn a_failed_write_into_a_borrowed_thread_leaves_it_as_it_was() {
    let mut target = AgentTarget::start();
    let before = executable_writable(target.pid);
    let out = report_with(target.pid, "1", "agent-call-write=return").output().expect("leakmon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the load did not fail: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("failed (injected)"), "{stderr}");
    target.wait_restored();
    assert!(!agent_mapped(target.pid), "the agent was loaded");
    assert_eq!(executable_writable(target.pid), before, "the call's page was left behind");
    // With registers of the mmap it would have crashed or lost its place.
    for _ in 0..3 {
        target.leak();
    }
}

/// Signals sent to a process while leakmon holds its thread (three kinds, each once)
/// are every one delivered when the thread goes, none dropped for a later one.
#[test]
fn signals_that_reach_a_borrowed_thread_are_all_delivered() {
    let fixture = build_fixture("held_signals.c", &[]);
    let (process, mut lines) = common::start_ready(Command::new(&fixture), "held_signals");
    let pid = process.0.id();
    let load = report_with(pid, "1", "agent-thread-held=1*sleep(3000)")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("leakmon");
    // Held: the thread sits in a tracing stop while the fail point sleeps.
    let deadline = Instant::now() + Duration::from_secs(20);
    while state(pid) != "t" {
        assert!(Instant::now() < deadline, "the thread was never held");
        std::thread::sleep(Duration::from_millis(1));
    }
    for s in [Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGWINCH] {
        signal(pid, s);
    }
    let out = load.wait_with_output().expect("reap leakmon");
    assert!(out.status.success(), "the load failed: {}", String::from_utf8_lossy(&out.stderr));
    // Read on a thread of its own: a signal lost leaves the fixture silent.
    let (sender, counts) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.by_ref().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while last != "usr1=1 usr2=1 winch=1" {
        let left = deadline.saturating_duration_since(Instant::now());
        last = counts.recv_timeout(left).unwrap_or_else(|_| panic!("the signals delivered came to {last:?}"));
        let counts = last.split(' ').filter_map(|c| c.split_once('=')?.1.parse::<u32>().ok());
        assert!(counts.clone().count() == 3 && counts.max() <= Some(1), "a signal delivered twice? {last}");
    }
    assert_eq!(tracer_of(pid), "0");
    drop(process);
}

/// The state letter of `pid` (`t`: stopped by its tracer).
fn state(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat.rsplit(") ").next().and_then(|s| s.split(' ').next()).unwrap_or("?").to_owned()
}

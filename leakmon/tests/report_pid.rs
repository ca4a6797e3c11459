//! `leakmon report --pid`: a window on a running process.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{build_fixture, by_function, expected, processes, Reap};

/// The tests here run one at a time: one of them counts the kernel's programs before
/// and after, which another test's leakmon would change in between.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn counts_only_the_window_and_reports_when_the_process_exits() {
    let _alone = alone();
    let mut fixture = common::start_wait_then_leak(&[]);
    let started = Instant::now();
    let (leakmon, stderr) = common::watch_pid(fixture.id(), "60");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fixture.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("signal fixture");
    assert!(fixture.wait().expect("wait fixture").success());
    let report = common::finish_report(leakmon, stderr);
    assert!(started.elapsed() < Duration::from_secs(30), "reported at exit, not at the end of the window");
    let procs = processes(&report);
    assert_eq!(procs.len(), 1, "{report:#}");
    assert_eq!(procs[0]["pid"], fixture.id());
    // leak_before_watch happened before the window: not counted.
    assert_eq!(by_function(&procs[0], "wait_then_leak.c"), expected(&[("leak_in_window", 16_000, 500)]));
}

#[test]
fn reports_when_the_window_ends() {
    let _alone = alone();
    let fixture = common::start_wait_then_leak(&[]);
    let started = Instant::now();
    let (leakmon, stderr) = common::watch_pid(fixture.id(), "1");
    let report = common::finish_report(leakmon, stderr);
    assert!(started.elapsed() < Duration::from_secs(20));
    let procs = processes(&report);
    assert_eq!(procs.len(), 1, "{report:#}");
    assert_eq!(procs[0]["outstanding_bytes"], 0, "nothing allocated inside the window");
    assert_eq!(procs[0]["comm"], "wait_then_leak");
}

#[test]
fn a_process_whose_binary_was_deleted_is_still_named_and_walked() {
    let _alone = alone();
    // A private copy, deleted once running (as an upgrade replaces a binary).
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = dir.path().join("wait_then_leak");
    std::fs::copy(build_fixture("wait_then_leak.c", &["-fomit-frame-pointer"]), &binary).expect("copy");
    let mut child = Command::new(&binary).stdout(Stdio::piped()).spawn().expect("start fixture");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("read");
    let mut fixture = Reap(child);
    std::fs::remove_file(&binary).expect("delete the binary");
    let (leakmon, stderr) = common::watch_pid(fixture.id(), "60");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fixture.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("signal fixture");
    assert!(fixture.wait().expect("wait fixture").success());
    let report = common::finish_report(leakmon, stderr);
    let process = &processes(&report)[0];
    assert_eq!(
        by_function(process, "wait_then_leak.c"),
        expected(&[("leak_in_window", 16_000, 500)]),
        "{report:#}"
    );
    // Its unwind tables came through /proc/PID/map_files too: the stack reaches _start.
    let stack = &process["stacks"].as_array().expect("stacks")[0];
    let last = stack["frames"].as_array().expect("frames").last().expect("a frame")["function"].clone();
    assert_eq!(last, "_start", "{stack:#}");
}

/// A process that exits at any moment of leakmon's start (before its check, while the
/// programs load, while its libraries are attached, after): one answer each time, a
/// report or a one-line error, promptly, and nothing left attached.
#[test]
fn a_process_that_exits_while_leakmon_attaches_gets_an_answer() {
    let _alone = alone();
    let before = common::bpf_programs_named(&["alloc_return"]);
    for lifetime in ["0", "0.05", "0.2", "0.5", "1"] {
        let target = Reap(Command::new("sleep").arg(lifetime).spawn().expect("start sleep"));
        let pid = target.id().to_string();
        let started = Instant::now();
        let out = common::leakmon()
            .args(["report", "--format", "json", "--duration", "20", "--pid", &pid])
            .output()
            .expect("run leakmon");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{lifetime}: the process's exit ends the window"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
            assert!(processes(&report).len() <= 1, "{lifetime}: {report:#}");
        } else {
            let lines: Vec<&str> = stderr.lines().collect();
            assert_eq!(lines.len(), 1, "{lifetime}: one line: {stderr}");
            // Gone before the check, or while leakmon was attaching: said as such.
            let said = lines[0].contains("no process with pid") || lines[0].contains("exited");
            assert!(lines[0].contains(&pid) && said, "{lifetime}: {stderr}");
        }
        drop(target);
        // Nothing left attached: leakmon's programs are gone with it.
        let gone = Instant::now();
        while common::bpf_programs_named(&["alloc_return"]) != before {
            assert!(gone.elapsed() < Duration::from_secs(10), "{lifetime}: programs left in the kernel");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The tracer holds the process's first thread only (for its forks, execs and exit):
/// every signal to a traced thread stops it until leakmon next looks, so a program
/// whose threads take per-thread CPU-timer signals (profilers, runtimes) ran at a
/// quarter of its speed while every thread was traced. The others go untraced.
#[test]
fn only_the_first_thread_of_a_running_process_is_traced() {
    let _alone = alone();
    let fixture = build_fixture("agent_lifecycle.c", &[]);
    let mut target = common::agent_state::Lifecycle::start(&fixture);
    let pid = target.pid;
    assert_eq!(target.ask("churn"), "churning");
    let (leakmon, stderr) = common::watch_pid(pid, "3");
    let tracer_of = |tid: u32| -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).expect("status");
        status.lines().find_map(|l| l.strip_prefix("TracerPid:")).expect("TracerPid").trim().to_owned()
    };
    let tasks: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    assert!(tasks.len() > 1, "the fixture's threads: {tasks:?}");
    for tid in tasks {
        let tracer = tracer_of(tid);
        if tid == pid {
            assert_eq!(tracer, leakmon.id().to_string(), "the first thread is traced");
        } else {
            assert_eq!(tracer, "0", "thread {tid} is not traced");
        }
    }
    common::finish_report(leakmon, stderr);
    assert!(target.ask("join").starts_with("joined bad=0 "));
}

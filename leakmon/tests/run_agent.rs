//! `leakmon run --agent`: the daemon loads the in-process sampler into the processes it
//! attributes (named ones, or suspects for a while), serves what the agent samples like
//! any other attribution, and undoes every redirection when it stops. Loading into every
//! process is refused in one line.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    agent_state::{agent_mapped, read_u64, tracer_of, AgentTarget},
    build_fixture, http_get, leakmon, signal, Reap,
};
use nix::sys::signal::Signal;
use serde_json::Value;

fn wait_up(listen: &str) {
    let up = Instant::now();
    while http_get(listen, "/healthz").is_none() {
        assert!(up.elapsed() < Duration::from_secs(30), "daemon did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn attached(listen: &str) -> Option<u64> {
    http_get(listen, "/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix("leakmon_attached_processes ")?.trim().parse().ok())
}

/// The heap series of `comm`, once one of its stacks satisfies `found`.
fn heap_stack(listen: &str, comm: &str, found: impl Fn(&Value) -> bool, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        if let Some(body) = http_get(listen, "/api/v1/processes") {
            let doc: Value = serde_json::from_str(&body).expect("JSON");
            let heap = doc["series"]
                .as_array()
                .expect("series")
                .iter()
                .find(|s| s["comm"] == comm && s["signal"] == "heap")
                .cloned();
            if let Some(stack) =
                heap.as_ref().and_then(|h| h["stacks"].as_array()?.iter().find(|s| found(s)).cloned())
            {
                return stack;
            }
            assert!(start.elapsed() < within, "no such stack of {comm} in time: {heap:#?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A process named with --pid gets the agent; its leak is served with the exact size
/// of a block far above the interval; on SIGTERM the daemon undoes the redirections.
#[test]
fn a_named_process_is_attributed_in_process_and_restored_when_the_daemon_stops() {
    const LISTEN: &str = "127.0.0.1:19496";
    let mut target = AgentTarget::start();
    let (pid, slot, original) = (target.pid, target.slot, target.original);

    let mut daemon = Reap(
        leakmon()
            .args(["run", "--agent", "--pid", &pid.to_string(), "--sample-bytes", "4KiB"])
            .args(["--sample-interval", "0.5s", "--window", "5s", "--web.listen-address", LISTEN])
            .stderr(Stdio::null())
            .spawn()
            .expect("start leakmon"),
    );
    wait_up(LISTEN);
    let start = Instant::now();
    while !(agent_mapped(pid) && read_u64(pid, slot) != original) {
        assert!(start.elapsed() < Duration::from_secs(30), "the agent was not loaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tracer_of(pid), "0", "loaded, and nobody holds the process");
    target.leak();
    let big =
        heap_stack(LISTEN, "agent_target", |s| s["function"] == "leak_big_block", Duration::from_secs(20));
    assert_eq!((big["bytes"].as_u64(), big["allocations"].as_u64()), (Some(1_048_576), Some(1)), "{big:#}");
    assert_eq!(attached(LISTEN), Some(1));

    signal(daemon.0.id(), Signal::SIGTERM);
    assert!(daemon.0.wait().expect("wait leakmon").success(), "the daemon stops cleanly");
    target.wait_restored();
    target.leak();
}

/// A process whose resident memory grows steadily gets the agent for the suspect
/// duration: its growing stack is found in-process, then the agent's redirections are
/// undone and the process runs on, untraced.
#[test]
fn a_suspect_gets_the_agent_for_a_while() {
    const LISTEN: &str = "127.0.0.1:19497";
    let grow = build_fixture("grow.c", &[]);
    let leaky = common::named(&grow, "grow_agent");
    let _daemon = Reap(
        leakmon()
            .args(["run", "--agent", "--attach", "suspects", "--sample-bytes", "1KiB"])
            .args(["--sample-interval", "0.5s", "--window", "10s", "--suspect-duration", "12s"])
            .args(["--web.listen-address", LISTEN])
            .stderr(Stdio::null())
            .spawn()
            .expect("start leakmon"),
    );
    wait_up(LISTEN);
    let target = Reap(Command::new(&leaky).arg("leak").spawn().expect("start the leaking process"));
    let pid = target.0.id();
    let stack = heap_stack(LISTEN, "grow_agent", |s| s["function"] == "touch", Duration::from_secs(60));
    assert!(stack["bytes"].as_u64().expect("bytes") > 0, "{stack:#}");
    assert!(agent_mapped(pid));
    let attached_at = Instant::now();
    while attached(LISTEN) != Some(0) {
        assert!(
            attached_at.elapsed() < Duration::from_secs(25),
            "still attributed after the suspect duration"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(tracer_of(pid), "0");
    assert!(target.0.id() == pid && std::fs::metadata(format!("/proc/{pid}")).is_ok(), "the process runs on");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    assert!(maps.contains("leakmon-agent-"), "the agent's code stays mapped (a thread may be inside it)");
}

/// Loading code into every process on a host is never an accident: `--attach all
/// --agent` is refused in one line, from the command line or the config; so is an
/// agent with nothing to load into, and a config value that is not a boolean.
#[test]
fn loading_the_agent_everywhere_is_refused_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let all = dir.path().join("all.toml");
    std::fs::write(&all, "attach = \"all\"\nagent = true\n").expect("write config");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "agent = \"yes\"\n").expect("write config");
    let cases: [(Vec<&std::ffi::OsStr>, &str); 4] = [
        (
            vec!["run".as_ref(), "--attach".as_ref(), "all".as_ref(), "--agent".as_ref()],
            "--attach all --agent is refused",
        ),
        (vec!["run".as_ref(), "--agent".as_ref()], "--agent needs processes to load into"),
        (vec!["run".as_ref(), "--config".as_ref(), all.as_os_str()], "--attach all --agent is refused"),
        (vec!["run".as_ref(), "--config".as_ref(), bad.as_os_str()], "agent must be true or false"),
    ];
    for (args, expected) in cases {
        let out =
            leakmon().args(&args).args(["--web.listen-address", "127.0.0.1:19498"]).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

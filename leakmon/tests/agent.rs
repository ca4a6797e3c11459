//! The in-process sampling agent (`report --agent`): loaded into a command at its
//! start and into a running process through ptrace, it reports leaks within the
//! sampling spread, blocks far above the interval exactly, and leaves a running
//! process as it found it; a process it cannot be loaded into gets one line and is
//! left alone.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    agent_state::{
        agent_mapped, agent_rate, entry_address, got_slot, kill_agent_report_at, read_u64, tracer_of,
        wait_restored, AgentTarget, Lifecycle, KILL_MOMENTS,
    },
    build_fixture, build_fixture_with, by_function, finish_report, leakmon, leaks_sigma, parse_report,
    processes, sampling_variance, signal, watch_pid_with, Reap, LEAKS,
};
use nix::sys::signal::Signal;

#[test]
fn a_running_process_is_sampled_in_process_and_left_as_it_was() {
    got_hooked_process_is_sampled_and_restored(AgentTarget::start());
}

/// Regression: in a non-PIE program that takes malloc's address, the global lookup of
/// `malloc` is the program's PLT stub, which leads back into the hook; the agent took
/// it for the real malloc and every call then looped for ever.
#[test]
fn a_program_whose_plt_stub_is_mallocs_address_is_sampled() {
    let fixture = build_fixture("agent_target.c", &["-no-pie", "-fno-pic", "-DTAKE_MALLOC_ADDRESS"]);
    got_hooked_process_is_sampled_and_restored(AgentTarget::with(&fixture));
}

fn got_hooked_process_is_sampled_and_restored(mut target: AgentTarget) {
    let (pid, slot, original) = (target.pid, target.slot, target.original);

    let (report, stderr) = watch_pid_with(pid, "8", &["--agent", "--sample-bytes", "4KiB"]);
    // Loaded: malloc's slot now leads into the agent.
    assert!(agent_mapped(pid), "the agent is mapped");
    assert_ne!(read_u64(pid, slot), original, "malloc's GOT slot is redirected");
    assert_eq!(tracer_of(pid), report.id().to_string(), "only report's own tracer holds it while watching");
    target.leak();
    let summary = assert_one_leak_sampled(&finish_report(report, stderr), pid);

    // Gone: the slot holds what it held, nobody traces the process, and it works.
    assert_eq!(read_u64(pid, slot), original, "malloc's GOT slot is restored");
    assert_eq!(tracer_of(pid), "0");
    target.leak();
    eprintln!("{summary}");
}

/// Asserts what a 4 KiB agent report of `agent_target.c` (`pid`), leaking once, says:
/// the 1 MiB block (256 times the interval: always sampled, at its own size) exact,
/// the small blocks within 5 standard deviations, churn under 1%, and no frame of the
/// agent's own anywhere. Returns the figures, for the log.
fn assert_one_leak_sampled(json: &serde_json::Value, pid: u32) -> String {
    assert_eq!(json["method"], "agent");
    assert_eq!(json["sample_bytes"], 4096);
    let process = processes(json).iter().find(|p| p["pid"] == pid).expect("the fixture's process");
    let got = by_function(process, "agent_target.c");
    assert_eq!(got.get("leak_big_block"), Some(&(1_048_576, 1)), "{got:?}");
    let small = got.get("leak_small_blocks").map_or(0, |(b, _)| *b) as f64;
    let sigma = sampling_variance(2000.0, 512.0, 4096.0).sqrt();
    assert!(
        (small - 1_024_000.0).abs() < 5.0 * sigma,
        "leak_small_blocks {small} vs 1024000 (sigma {sigma:.0})"
    );
    let total: u64 = got.values().map(|(b, _)| b).sum();
    let churn = got.get("churn").map_or(0, |(b, _)| *b);
    assert!(churn * 100 < total, "balanced churn kept {churn} of {total} B");
    // Its hook and marker are leakmon's, not the program's.
    for stack in process["stacks"].as_array().expect("stacks") {
        for frame in stack["frames"].as_array().expect("frames") {
            assert!(!frame["function"].as_str().unwrap_or("").starts_with("leakmon_agent"), "{frame}");
        }
    }
    format!("leak_small_blocks {small} (sigma {sigma:.0}), churn {churn}, {got:?}")
}

/// A command started with the agent: the known-leaks fixture, dynamically linked (the
/// agent preloaded) and statically linked (the freestanding agent and inline hooks put
/// in at its entry point), eight times each. Each total lies within 5% of valgrind's
/// figure for the program (and within 5 of its predicted standard deviations of the
/// exact one); the 256 KiB blocks, 64 times the interval, are exact; no byte is
/// charged to functions that leak nothing; and the mean of each function of 100 KB or
/// more lies within 20% of its exact figure (one report of `leak_in_thread`'s 128 KB
/// is about 31 samples, ±18%: the mean of eight is ±6%).
#[test]
fn the_known_leaks_dynamic_and_static_agree_with_valgrind_within_the_sampling_spread() {
    let dynamic = build_fixture("leaks.c", &[]);
    let valgrind = valgrind_in_use_at_exit(&dynamic);
    let exact_total: u64 = LEAKS.iter().map(|(_, bytes, _)| bytes).sum();
    assert!(valgrind.abs_diff(exact_total) * 100 < exact_total, "valgrind {valgrind} vs exact {exact_total}");
    for fixture in [dynamic, build_fixture("leaks.c", &["-static"])] {
        let totals = known_leaks_runs(&fixture, valgrind);
        eprintln!("{}: valgrind {valgrind}, exact {exact_total}, totals {totals:?}", fixture.display());
    }
}

/// What valgrind says `program` leaves allocated at its exit.
fn valgrind_in_use_at_exit(program: &std::path::Path) -> u64 {
    let out =
        Command::new("valgrind").arg("--leak-check=summary").arg(program).output().expect("run valgrind");
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().find(|l| l.contains("in use at exit:")).unwrap_or_else(|| panic!("{text}"));
    let bytes =
        line.split("in use at exit:").nth(1).and_then(|r| r.split_whitespace().next()).expect("a figure");
    bytes.replace(',', "").parse().expect("bytes")
}

fn known_leaks_runs(fixture: &std::path::Path, valgrind: u64) -> Vec<u64> {
    const RUNS: usize = 8;
    let rate = 4096.0;
    let exact_total: u64 = LEAKS.iter().map(|(_, bytes, _)| bytes).sum();
    let sigma = leaks_sigma(rate);
    let mut sums: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    let mut totals = Vec::new();
    for _ in 0..RUNS {
        let out = leakmon()
            .args(["report", "--agent", "--sample-bytes", "4KiB", "--format", "json", "--"])
            .arg(fixture)
            .output()
            .expect("run leakmon");
        let report = parse_report(&out);
        assert_eq!(report["method"], "agent");
        let procs = processes(&report);
        assert_eq!(procs.len(), 1);
        let got = by_function(&procs[0], "leaks.c");
        assert_eq!(got.get("leak_realloc_chain"), Some(&(2_621_440, 10)), "{got:?}");
        assert!(got.keys().all(|f| LEAKS.iter().any(|(name, _, _)| name == f)), "{got:?}");
        let total: u64 = got.values().map(|(b, _)| b).sum();
        assert!(
            (total as f64 - valgrind as f64).abs() < 0.05 * valgrind as f64,
            "{}: {total} vs valgrind's {valgrind}",
            fixture.display()
        );
        assert!((total as f64 - exact_total as f64).abs() < 5.0 * sigma, "{total} vs {exact_total}");
        for (function, (bytes, _)) in got {
            *sums.entry(function).or_default() += bytes as f64;
        }
        totals.push(total);
    }
    for &(function, bytes, _) in LEAKS.iter().filter(|(_, bytes, _)| *bytes >= 100_000) {
        let mean = sums.get(function).copied().unwrap_or(0.0) / RUNS as f64;
        assert!(
            (mean - bytes as f64).abs() < 0.2 * bytes as f64,
            "{}: {function}: mean {mean:.0} vs {bytes}",
            fixture.display()
        );
    }
    totals
}

/// Asserts that `report --agent --pid` on `pid` fails with one line containing `why`
/// and maps nothing into it; returns how long it took.
fn assert_refused(pid: u32, why: &str) -> Duration {
    let (ok, stderr, took) = load_into(pid);
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(why), "{stderr}");
    assert!(!agent_mapped(pid));
    took
}

/// Runs `report --agent --pid` on `pid` and returns its exit status and stderr.
fn load_into(pid: u32) -> (bool, String, Duration) {
    let started = Instant::now();
    let out = leakmon()
        .args(["report", "--agent", "--format", "json", "--duration", "1", "--pid", &pid.to_string()])
        .output()
        .expect("run leakmon");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned(), started.elapsed())
}

/// A statically linked program has no dynamic loader and no GOT: leakmon maps the
/// freestanding agent itself and puts inline hooks on the program's own allocator.
/// Leaks come out as from a dynamic one, and afterwards every hooked entry holds its
/// own bytes again and the program works.
#[test]
fn a_static_program_is_sampled_through_inline_hooks_and_left_as_it_was() {
    inline_hooked_process_is_sampled_and_restored(&build_fixture("agent_target.c", &["-static"]));
}

/// A dynamically linked program with jemalloc built into its executable (as Redis
/// built from source, or a Rust program with a jemalloc global allocator): its own
/// calls reach the allocator with no GOT in between, so they get inline hooks.
#[test]
fn a_program_with_its_allocator_built_in_is_sampled_through_inline_hooks() {
    let jemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc_pic.a";
    inline_hooked_process_is_sampled_and_restored(&build_fixture(
        "agent_target.c",
        &[jemalloc, "-lm", "-ldl"],
    ));
}

/// musl's static programs too: the freestanding agent needs nothing of a C library.
#[test]
fn a_static_musl_program_is_sampled_through_inline_hooks() {
    inline_hooked_process_is_sampled_and_restored(&build_fixture_with(
        "musl-gcc",
        "agent_target.c",
        &["-static"],
    ));
}

/// A process of another C library's dynamic loader (musl's): the agent is built for
/// glibc's, so one line, and the process goes on untouched.
#[test]
fn a_program_of_another_dynamic_loader_is_refused_in_one_line() {
    let mut target = AgentTarget::with(&build_fixture_with("musl-gcc", "agent_target.c", &[]));
    assert_refused(target.pid, "not glibc's");
    assert_eq!(tracer_of(target.pid), "0");
    target.leak();
}

fn inline_hooked_process_is_sampled_and_restored(fixture: &std::path::Path) {
    let mut target = AgentTarget::with(fixture);
    let pid = target.pid;
    let free = entry_address(pid, fixture, "free");
    let entries = [(target.slot, target.original), (free, read_u64(pid, free))];

    let (report, stderr) = watch_pid_with(pid, "8", &["--agent", "--sample-bytes", "4KiB"]);
    assert!(agent_mapped(pid), "the agent is mapped");
    for (entry, original) in &entries {
        let now = read_u64(pid, *entry);
        assert_ne!(now, *original, "the entry at {entry:#x} is hooked");
        assert_eq!(now & 0xff, 0xe9, "a jump at {entry:#x}");
    }
    target.leak();
    let summary = assert_one_leak_sampled(&finish_report(report, stderr), pid);

    for (entry, original) in &entries {
        assert_eq!(read_u64(pid, *entry), *original, "the entry at {entry:#x} holds its own bytes again");
    }
    assert_eq!(tracer_of(pid), "0");
    target.leak();
    eprintln!("{}: {summary}", fixture.display());
}

/// A stripped static program names no allocator function to hook: one line, and the
/// program goes on untouched.
#[test]
fn a_stripped_static_program_is_refused_in_one_line_and_left_alone() {
    let fixture = build_fixture("wait_then_leak.c", &["-static", "-s"]);
    let mut target = Reap(Command::new(&fixture).stdout(Stdio::piped()).spawn().expect("start"));
    let pid = target.0.id();
    let mut ready = String::new();
    BufReader::new(target.0.stdout.as_mut().expect("stdout")).read_line(&mut ready).expect("read");
    assert_refused(pid, "statically linked");
    assert_eq!(tracer_of(pid), "0");
    signal(pid, Signal::SIGUSR1);
    assert!(target.0.wait().expect("wait").success(), "the program ends normally");
}

/// A process that never waits in a syscall (a busy loop) offers no safe point: after a
/// bounded wait, one line, and the process runs on, untraced and unchanged.
#[test]
fn a_busy_process_gets_one_line_never_a_hang() {
    let target = Reap(Command::new("bash").args(["-c", "while :; do :; done"]).spawn().expect("start"));
    let pid = target.0.id();
    std::thread::sleep(Duration::from_millis(200));
    let took = assert_refused(pid, "did not wait in a syscall");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_eq!(tracer_of(pid), "0");
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    assert!(state.split(' ').nth(2).is_some_and(|s| s == "R" || s == "S"), "{state}");
}

/// A process leakmon may not ptrace (another user's, with CAP_SYS_PTRACE dropped, as
/// a hardened unit or a Yama policy would have it) is refused in one line that says
/// so, and left alone.
#[test]
fn a_process_leakmon_may_not_ptrace_is_refused_in_one_line() {
    let target = Reap(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "30"])
            .spawn()
            .expect("start a process of another user"),
    );
    let pid = target.0.id();
    std::thread::sleep(Duration::from_millis(200));
    let out = Command::new("setpriv")
        .args(["--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace"])
        .arg(env!("CARGO_BIN_EXE_leakmon"))
        .env_remove("RUST_LOG")
        .args(["report", "--agent", "--format", "json", "--duration", "1", "--pid", &pid.to_string()])
        .output()
        .expect("run leakmon without CAP_SYS_PTRACE");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("ptrace of pid") && stderr.contains("refused"), "{stderr}");
    assert!(!agent_mapped(pid));
    assert_eq!(tracer_of(pid), "0");
}

/// A process another tracer holds (a debugger) is refused in one line.
#[test]
fn a_process_under_a_debugger_is_refused_in_one_line() {
    let target = common::under_a_debugger();
    assert_refused(target.0.id(), "already traced");
}

/// leakmon SIGKILLed while the agent is being loaded (its guardian holds the process
/// through ptrace), and again while it watches with the agent loaded: each time the
/// process comes back as it was (every slot restored, untraced, running) and works.
#[test]
fn leakmon_killed_mid_load_or_while_loaded_leaves_the_process_as_it_was() {
    killed_at_every_moment(AgentTarget::start());
}

/// The same for a statically linked program: the freestanding agent mapped and the
/// inline hooks on, then every entry back.
#[test]
fn leakmon_killed_mid_load_or_while_loaded_leaves_a_static_program_as_it_was() {
    killed_at_every_moment(AgentTarget::with(&build_fixture("agent_target.c", &["-static"])));
}

fn killed_at_every_moment(mut target: AgentTarget) {
    let (pid, slot, original) = (target.pid, target.slot, target.original);
    for moment in KILL_MOMENTS {
        kill_agent_report_at(pid, moment, || {
            assert!(agent_mapped(pid));
            assert_ne!(read_u64(pid, slot), original, "loaded: the slot is redirected");
        });
        target.wait_restored();
        // Sampling stopped with the redirections (however the pace had left it).
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent_rate(pid).is_some_and(|rate| rate != 0) {
            assert!(Instant::now() < deadline, "after {moment}, the agent in pid {pid} still samples");
            std::thread::sleep(Duration::from_millis(20));
        }
        target.leak();
    }
}

/// Loaded while four threads allocate and free without pause and a fifth forks and
/// execs without pause; then, with the agent in place, a new thread, a fork from the
/// main thread and one from another thread (whose child once crashed at its first
/// sample, see agent.c's markers), an exec and a dlopen'd library. Every child of the
/// busy fork/exec loop exits as it should. The threads' blocks stay intact, the
/// children and the exec'd program run normally, and the 1 MiB leaks of the new
/// thread, the children and the library (far above the interval) are reported exactly.
#[test]
fn threads_in_malloc_and_fork_exec_during_load_and_threads_dlopen_after_it() {
    let fixture = build_fixture("agent_lifecycle.c", &[]);
    let plugin = build_fixture("agent_plugin.c", &["-shared", "-fPIC"]);
    let mut target = Lifecycle::start(&fixture);
    let pid = target.pid;
    let mut ask = |command: &str| target.ask(command);
    assert_eq!(ask("churn"), "churning");
    assert_eq!(ask("spawn"), "spawning");
    let slot = got_slot(pid, &fixture, "malloc");
    let original = read_u64(pid, slot);
    std::thread::sleep(Duration::from_millis(200));

    let (report, stderr) = watch_pid_with(pid, "6", &["--agent", "--sample-bytes", "4KiB"]);
    assert_eq!(ask("thread"), "thread leaked");
    assert_eq!(ask(&format!("dlopen {}", plugin.display())), "plugin leaked");
    assert_eq!(ask("fork"), "forked 0");
    assert_eq!(ask("threadfork"), "thread forked 0");
    assert_eq!(ask("exec"), "exec 7");
    let json = finish_report(report, stderr);
    let spawned = ask("unspawn");
    assert!(spawned.ends_with(" bad=0") && !spawned.starts_with("spawned 0 "), "{spawned}");
    let answer = ask("join");
    let bad = answer.split(['=', ' ']).nth(2).expect("bad=");
    assert_eq!(bad, "0", "{answer}");
    assert!(!answer.ends_with("pairs=0"), "{answer}");

    let parent = processes(&json).iter().find(|p| p["pid"] == pid).expect("the fixture's process");
    let got = by_function(parent, "agent_lifecycle.c");
    assert_eq!(got.get("leak_in_new_thread"), Some(&(1_048_576, 1)), "{got:?}");
    let got = by_function(parent, "agent_plugin.c");
    assert_eq!(got.get("plugin_leak"), Some(&(1_048_576, 1)), "{got:?}");
    assert_children_leaked(&json, pid);
    wait_restored(pid, slot, original);
    assert_eq!(ask("churn"), "churning");
    assert!(ask("join").starts_with("joined bad=0 "));
}

/// The children forked from the main thread and from a thread of its own: each in the
/// report with the 1 MiB it leaked.
fn assert_children_leaked(json: &serde_json::Value, parent: u32) {
    let children: Vec<_> = processes(json)
        .iter()
        .filter(|p| p["pid"] != parent && !by_function(p, "agent_lifecycle.c").is_empty())
        .collect();
    assert_eq!(children.len(), 2, "the two forked children in the report: {children:#?}");
    for child in children {
        assert_eq!(by_function(child, "agent_lifecycle.c").get("leak_in_child"), Some(&(1_048_576, 1)));
    }
}

/// The same for inline hooks, in a statically linked program: threads hammer the
/// allocator and the process forks and execs while the hooks go on (the entries are
/// written with every thread stopped and none inside them); a new thread and children
/// forked from the main thread and from another leak after it; nobody gets a corrupt
/// block, and the entries come back.
#[test]
fn threads_in_malloc_and_fork_exec_during_inline_hooking_of_a_static_program() {
    let fixture = build_fixture("agent_lifecycle.c", &["-static"]);
    let mut target = Lifecycle::start(&fixture);
    let pid = target.pid;
    let mut ask = |command: &str| target.ask(command);
    let entries: Vec<(u64, u64)> = ["malloc", "free"]
        .iter()
        .map(|f| entry_address(pid, &fixture, f))
        .map(|a| (a, read_u64(pid, a)))
        .collect();
    assert_eq!(ask("churn"), "churning");
    assert_eq!(ask("spawn"), "spawning");
    std::thread::sleep(Duration::from_millis(200));

    let (report, stderr) = watch_pid_with(pid, "6", &["--agent", "--sample-bytes", "4KiB"]);
    assert_eq!(ask("thread"), "thread leaked");
    assert_eq!(ask("fork"), "forked 0");
    assert_eq!(ask("threadfork"), "thread forked 0");
    let json = finish_report(report, stderr);
    let spawned = ask("unspawn");
    assert!(spawned.ends_with(" bad=0") && !spawned.starts_with("spawned 0 "), "{spawned}");
    let answer = ask("join");
    assert_eq!(answer.split(['=', ' ']).nth(2), Some("0"), "{answer}");
    assert!(!answer.ends_with("pairs=0"), "{answer}");

    let parent = processes(&json).iter().find(|p| p["pid"] == pid).expect("the fixture's process");
    let got = by_function(parent, "agent_lifecycle.c");
    assert_eq!(got.get("leak_in_new_thread"), Some(&(1_048_576, 1)), "{got:?}");
    assert_children_leaked(&json, pid);
    for (entry, original) in &entries {
        assert_eq!(read_u64(pid, *entry), *original, "the entry at {entry:#x} holds its own bytes again");
    }
    assert_eq!(tracer_of(pid), "0");
    assert_eq!(ask("churn"), "churning");
    assert!(ask("join").starts_with("joined bad=0 "));
}

/// A process whose seccomp filter refuses what a load does (an executable mapping, as
/// a service's own SystemCallFilter= may) is refused in one line naming the call,
/// before any is made, and runs on untouched.
#[test]
fn a_process_whose_seccomp_filter_refuses_a_load_is_refused_naming_the_call() {
    let fixture = build_fixture("seccomp_target.c", &[]);
    let mut target = Reap(Command::new(&fixture).stdout(Stdio::piped()).spawn().expect("start"));
    let pid = target.0.id();
    let mut lines = BufReader::new(target.0.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "ready");
    assert_refused(
        pid,
        "its seccomp filter would refuse (Operation not permitted) mmap (mapping of leakmon's scratch page",
    );
    assert_eq!(tracer_of(pid), "0");
    signal(pid, Signal::SIGUSR1);
    assert_eq!(lines.next().expect("a line").expect("read"), "alive");
}

/// A process under a container's kind of filter, either way they are written (the
/// architecture checked and a few calls refused; or only the calls listed allowed, as
/// podman's and Docker's profiles are): its filter is read and run on each call of a
/// load, all are let through, and the agent names its leaking function; afterwards
/// nobody traces it and it works.
#[test]
fn a_process_under_a_container_s_seccomp_filter_gets_the_agent() {
    for mode in ["default", "allowlist"] {
        under_a_container_s_filter(mode);
    }
}

fn under_a_container_s_filter(mode: &str) {
    let fixture = build_fixture("seccomp_target.c", &[]);
    let mut target = Reap(Command::new(&fixture).arg(mode).stdout(Stdio::piped()).spawn().expect("start"));
    let pid = target.0.id();
    let mut lines = BufReader::new(target.0.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "ready");
    let mut watch = leakmon()
        .env("RUST_LOG", "info")
        .args([
            "report",
            "--agent",
            "--sample-bytes",
            "16KiB",
            "--format",
            "json",
            "--duration",
            "3",
            "--pid",
            &pid.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run leakmon");
    // Loaded and started (its log says "watching": mapped is not yet sampling), then
    // the leaks: 40 rounds of 100 pages. The rest of its log is read on.
    let (seen, rest) = common::logged_until(&mut watch, "watching");
    for _ in 0..40 {
        signal(pid, Signal::SIGUSR1);
        assert_eq!(lines.next().expect("a line").expect("read"), "alive");
    }
    let stdout = watch.stdout.take().expect("stdout");
    let out = std::io::read_to_string(stdout).expect("read the report");
    let status = watch.wait().expect("wait for leakmon");
    assert!(status.success(), "{seen}{}", rest.join().unwrap_or_default());
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let p = &processes(&report)[0];
    let leaked: u64 = p["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["site"]["function"] == "leak_page")
        .map(|s| s["bytes"].as_u64().unwrap_or(0))
        .sum();
    // 16 MB kept, sampled every 16 KiB: within a fifth.
    let kept = 40 * 100 * 4096;
    assert!(
        (leaked as f64 - kept as f64).abs() < 0.2 * kept as f64,
        "{leaked} B of {kept} in leak_page: {p:#}"
    );
    assert_eq!(tracer_of(pid), "0");
    signal(pid, Signal::SIGUSR1);
    assert_eq!(lines.next().expect("a line").expect("read"), "alive");
}

/// The calls a load makes, traced in the kernel (the `raw_syscalls` tracepoint,
/// through bpftrace) while the agent is loaded into a process under a container's kind
/// of filter and stopped again: each is one the seccomp check runs the filters on (the
/// same call; a mapping or protection with the same protection and flags), so what
/// the check allows is what a load does.
#[test]
fn the_seccomp_check_runs_the_filters_on_the_calls_a_load_makes() {
    use leakmon::agent::seccomp::CALLS;
    let fixture = build_fixture("seccomp_target.c", &[]);
    let mut target =
        Reap(Command::new(&fixture).arg("default").stdout(Stdio::piped()).spawn().expect("start"));
    let pid = target.0.id();
    let mut lines = BufReader::new(target.0.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "ready");
    let script = format!(
        "tracepoint:raw_syscalls:sys_enter /pid == {pid}/ {{ printf(\"call %d %x %x\\n\", args->id, args->args[2], args->args[3]); }}"
    );
    let mut tracer = Command::new("setsid")
        .args(["bpftrace", "-e", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start bpftrace");
    let mut traced = BufReader::new(tracer.stdout.take().expect("stdout")).lines();
    let attached = traced.next().expect("a line").expect("read");
    assert!(attached.starts_with("Attaching"), "{attached}");
    let (ok, stderr, _) = load_into(pid);
    assert!(ok, "{stderr}");
    std::thread::sleep(Duration::from_millis(500));
    signal(tracer.id(), Signal::SIGINT);
    let calls: Vec<(i64, u64, u64)> = traced
        .map_while(Result::ok)
        .filter_map(|l| {
            let mut f = l.strip_prefix("call ")?.split(' ');
            let nr = f.next()?.parse().ok()?;
            Some((nr, u64::from_str_radix(f.next()?, 16).ok()?, u64::from_str_radix(f.next()?, 16).ok()?))
        })
        .collect();
    let _ = tracer.wait();
    // The fixture's own: its sleep, restarted after each stop; and the kernel's
    // `uretprobe` (335), which its return probes' trampoline calls and seccomp lets
    // through unfiltered.
    let own = [libc::SYS_clock_nanosleep, libc::SYS_nanosleep, libc::SYS_restart_syscall, 335];
    let of_the_load: Vec<_> = calls.iter().filter(|(nr, ..)| !own.contains(nr)).collect();
    assert!(of_the_load.iter().any(|(nr, ..)| *nr == libc::SYS_openat), "the load was traced: {calls:?}");
    for &&(nr, prot, flags) in &of_the_load {
        let known = CALLS.iter().any(|c| {
            c.nr == nr
                && match nr {
                    libc::SYS_mmap => c.args[2] == prot && c.args[3] == flags,
                    libc::SYS_mprotect => c.args[2] == prot,
                    _ => true,
                }
        });
        assert!(
            known,
            "a call the check does not run the filters on: {nr} {prot:#x} {flags:#x} (all: {of_the_load:?})"
        );
    }
    signal(pid, Signal::SIGUSR1);
    assert_eq!(lines.next().expect("a line").expect("read"), "alive");
}

//! leakmon runs as root beside other users: nothing a target's user controls may turn
//! it into a weapon, and a process it touches is never harmed. Each test here plays the
//! attacker (the user `nobody`, or a program that is not what leakmon thinks it is) on
//! real processes.

mod common;

use std::{
    ffi::OsStr,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _, fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    agent_state::{kill_agent_report_at, AgentTarget},
    build_fixture, leakmon,
    runtimes::{answers, listening, start_java, start_node, JDK},
    Reap,
};

const NOBODY: u32 = 65534;

/// A directory under the test's temporary directory that `nobody` owns (mode 0755).
fn nobodys_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).expect("chown");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Its parents must be passable for nobody.
    let mut parent = dir.parent();
    while let Some(p) = parent {
        let mode = std::fs::metadata(p).expect("stat").mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode | 0o011)).expect("chmod parent");
        }
        parent = p.parent();
    }
    dir
}

/// Runs `command` as `nobody`.
fn as_nobody(command: &mut Command) -> &mut Command {
    command.uid(NOBODY).gid(NOBODY)
}

/// A root-owned file, mode 0644: what an attacker would like to own or empty.
fn victim(name: &str) -> (PathBuf, Vec<u8>) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("root-only");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join(name);
    let content = b"root's own, not nobody's\n".to_vec();
    // Made anew: a run that got it (of a leakmon without the fix) leaves it changed.
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, &content).expect("write the victim");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    (path, content)
}

fn assert_untouched(path: &Path, content: &[u8]) {
    let meta = std::fs::metadata(path).expect("the victim is still there");
    assert_eq!(std::fs::read(path).expect("read the victim"), content, "its content");
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (0, 0, 0o644), "its owner and mode");
}

/// A JVM's user plants `.attach_pid<pid>` as a link to a root-owned file in the
/// JVM's working directory (and then in /tmp too). leakmon never follows it: the file
/// keeps its content, owner and mode; with /tmp free the trigger is made there, as the
/// JVM's user, and the report works; with both planted leakmon refuses in one line.
#[test]
fn a_planted_attach_trigger_link_is_never_followed() {
    let classes = nobodys_dir("nobody-classes");
    let status = Command::new(format!("{JDK}/javac"))
        .arg("-d")
        .arg(&classes)
        .arg(common::fixtures_dir().join("jvm/CacheLeak.java"))
        .status()
        .expect("run javac");
    assert!(status.success());
    for e in std::fs::read_dir(&classes).expect("classes").flatten() {
        std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o644)).expect("chmod class");
    }
    let cwd = nobodys_dir("nobody-jvm-cwd");
    let mut java = Command::new(format!("{JDK}/java"));
    as_nobody(&mut java)
        .current_dir(&cwd)
        .arg("-cp")
        .arg(&classes)
        .arg("CacheLeak")
        .arg("grow")
        .env("HOME", &cwd);
    let (mut jvm, mut lines) = common::start_ready(java, "java as nobody");
    let pid = jvm.0.id();
    let (target, content) = victim("attach-victim");
    let plant = |link: &Path| {
        let status = as_nobody(Command::new("ln").arg("-s").arg(&target).arg(link)).status().expect("ln");
        assert!(status.success(), "nobody plants {}", link.display());
    };
    let in_cwd = cwd.join(format!(".attach_pid{pid}"));
    let in_tmp = PathBuf::from(format!("/tmp/.attach_pid{pid}"));
    plant(&in_cwd);
    plant(&in_tmp);
    let out = common::runtimes::runtime_report(pid, "2", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "both places planted: refused");
    assert!(stderr.contains(&format!("could not create .attach_pid{pid} as its user")), "{stderr}");
    assert_eq!(stderr.trim().lines().filter(|l| l.starts_with("leakmon:")).count(), 1, "one line: {stderr}");
    assert_untouched(&target, &content);

    std::fs::remove_file(&in_tmp).expect("unplant /tmp");
    let out = common::runtimes::runtime_report(pid, "2", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "/tmp free: the trigger is made there: {stderr}");
    assert_untouched(&target, &content);
    assert!(
        std::fs::symlink_metadata(&in_cwd).expect("the link").file_type().is_symlink(),
        "theirs, left alone"
    );
    assert!(!in_tmp.exists(), "leakmon's own trigger is gone");
    assert!(common::runtimes::left_in_tmp(pid).is_empty(), "{:?}", common::runtimes::left_in_tmp(pid));
    answers(&mut jvm, &mut lines);
}

/// `leakmon report --runtime` on `pid` for 60 s, its output dropped (a test kills it).
fn runtime_report_for_a_minute(pid: u32) -> Reap {
    Reap(
        leakmon()
            .args(["report", "--runtime", "--format", "json", "--duration", "60", "--pid", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start leakmon"),
    )
}

/// leakmon SIGKILLed while Node.js's inspector is open for `report --runtime`
/// on a Node.js run by `nobody`: its guardian closes the inspector, so no local user can
/// reach the debugger afterwards; the process goes on.
#[test]
fn an_inspector_left_by_a_killed_leakmon_is_closed_by_its_guardian() {
    let dir = nobodys_dir("nobody-node");
    let script = dir.join("cache_leak.js");
    std::fs::copy(common::runtimes::node_fixture(), &script).expect("copy the fixture");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut node = Command::new("node");
    as_nobody(&mut node).current_dir(&dir).arg(&script).arg("grow").stderr(Stdio::null());
    let (mut process, mut lines) = common::start_ready(node, "node as nobody");
    let pid = process.0.id();
    assert_eq!(listening(pid), 0, "no port open before");
    let mut report = runtime_report_for_a_minute(pid);
    let deadline = Instant::now() + Duration::from_secs(20);
    while listening(pid) == 0 {
        assert!(Instant::now() < deadline, "the inspector never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Sampling under way.
    std::thread::sleep(Duration::from_millis(500));
    common::signal(report.0.id(), nix::sys::signal::Signal::SIGKILL);
    report.0.wait().expect("reap leakmon");
    let deadline = Instant::now() + Duration::from_secs(15);
    while listening(pid) != 0 {
        assert!(Instant::now() < deadline, "the inspector stayed open after leakmon was killed");
        std::thread::sleep(Duration::from_millis(50));
    }
    // What any local user would try.
    let probe = as_nobody(Command::new("curl").args(["-s", "-m", "2", "http://127.0.0.1:9229/json/list"]))
        .output()
        .expect("curl");
    assert!(
        !probe.status.success(),
        "the debugger answers nobody: {}",
        String::from_utf8_lossy(&probe.stdout)
    );
    answers(&mut process, &mut lines);
    // And leakmon can come back later: nothing was left half open.
    let out = common::runtimes::runtime_report(pid, "2", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(listening(pid), 0);
}

/// While leakmon holds a Node.js's inspector open (a report's window, a daemon's
/// suspect window), another local user cannot connect to it: only root and the
/// process's own user can. Once closed, the port is everyone's again.
#[test]
fn an_inspector_held_open_by_leakmon_takes_no_other_user() {
    const PORT: u16 = 9247;
    let dir = nobodys_dir("nobody-node-guarded");
    let script = dir.join("cache_leak.js");
    std::fs::copy(common::runtimes::node_fixture(), &script).expect("copy the fixture");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut node = Command::new("node");
    as_nobody(&mut node)
        .current_dir(&dir)
        .arg(format!("--inspect-port={PORT}"))
        .arg(&script)
        .arg("grow")
        .stderr(Stdio::null());
    let (mut process, mut lines) = common::start_ready(node, "node as nobody");
    let pid = process.0.id();
    let mut report = runtime_report_for_a_minute(pid);
    let deadline = Instant::now() + Duration::from_secs(20);
    while listening(pid) == 0 {
        assert!(Instant::now() < deadline, "the inspector never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let list = |uid: u32| {
        Command::new("curl")
            .args(["-s", "-m", "2", &format!("http://127.0.0.1:{PORT}/json/list")])
            .uid(uid)
            .gid(uid)
            .output()
            .expect("curl")
    };
    // The user `daemon` (uid 1): anyone on the host but the process's owner.
    let other = list(1);
    assert!(
        !other.status.success() || other.stdout.is_empty(),
        "another user reached the debugger: {}",
        String::from_utf8_lossy(&other.stdout)
    );
    let owner = list(NOBODY);
    assert!(
        String::from_utf8_lossy(&owner.stdout).contains("webSocketDebuggerUrl"),
        "the process's own user was refused: {:?}",
        owner
    );
    common::signal(report.0.id(), nix::sys::signal::Signal::SIGINT);
    report.0.wait().expect("reap leakmon");
    assert_eq!(listening(pid), 0, "the inspector stayed open");
    answers(&mut process, &mut lines);
}

/// A Node.js whose options would open its inspector beyond
/// loopback is refused before anything is sent.
#[test]
fn an_inspector_that_would_listen_beyond_loopback_is_never_opened() {
    let (mut process, mut lines) = start_node(&["--inspect-port=0.0.0.0:9231"], "grow");
    let pid = process.0.id();
    let out = common::runtimes::runtime_report(pid, "2", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("would listen on 0.0.0.0, beyond this machine's loopback"), "{stderr}");
    assert_eq!(listening(pid), 0, "nothing was opened");
    answers(&mut process, &mut lines);
}

/// A program named `node` that does not catch SIGUSR1 (a copy of `sleep`) is
/// never sent it: leakmon refuses in one line and the process lives on.
#[test]
fn a_process_named_node_that_does_not_catch_sigusr1_is_never_signalled() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-node");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let fake = dir.join("node");
    std::fs::copy("/usr/bin/sleep", &fake).expect("copy sleep");
    let mut sleeper = Reap(Command::new(&fake).arg("60").spawn().expect("start the fake node"));
    std::thread::sleep(Duration::from_millis(200));
    let out = common::runtimes::runtime_report(sleeper.0.id(), "2", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("does not catch SIGUSR1"), "{stderr}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(sleeper.0.try_wait().expect("poll").is_none(), "the fake node died");
}

/// `leakmon run` as a background job of a script (SIGINT ignored from its
/// start) stops on a SIGINT sent right after its first answer.
#[test]
fn a_sigint_right_after_the_first_answer_stops_the_daemon() {
    const LISTEN: &str = "127.0.0.1:19531";
    let mut daemon = leakmon();
    daemon.args(["run", "--web.listen-address", LISTEN]).stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        daemon.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut daemon = Reap(daemon.spawn().expect("start leakmon run"));
    let up = Instant::now();
    // Its first answer, whatever it says (503 while it starts).
    while common::http_get_raw(LISTEN, "/healthz").is_none() {
        assert!(up.elapsed() < Duration::from_secs(30), "never answered");
        assert!(daemon.0.try_wait().expect("poll").is_none(), "ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    common::signal(daemon.0.id(), nix::sys::signal::Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = daemon.0.try_wait().expect("poll") {
            assert!(status.success(), "stopped cleanly: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "the SIGINT was ignored");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `WATCHDOG_USEC=0` (for this process) means no watchdog; it panicked the daemon.
#[test]
fn a_watchdog_of_zero_is_no_watchdog() {
    const LISTEN: &str = "127.0.0.1:19532";
    let exe = env!("CARGO_BIN_EXE_leakmon");
    let script = format!("WATCHDOG_PID=$$ WATCHDOG_USEC=0 exec {exe} run --web.listen-address {LISTEN}");
    let mut daemon =
        Reap(Command::new("sh").args(["-c", &script]).stderr(Stdio::null()).spawn().expect("sh"));
    let up = Instant::now();
    while common::http_get(LISTEN, "/healthz").is_none() {
        assert!(daemon.0.try_wait().expect("poll").is_none(), "the daemon ended (panicked?)");
        assert!(up.elapsed() < Duration::from_secs(30), "never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(daemon.0.try_wait().expect("poll").is_none(), "the daemon ended (panicked?)");
}

/// A copy of `binary` whose file name (so its `comm`) is `name`, any bytes.
fn named_bytes(binary: &Path, name: &[u8]) -> PathBuf {
    let path = binary.with_file_name(OsStr::from_bytes(name));
    std::fs::copy(binary, &path).expect("copy fixture");
    path
}

/// A process whose name is not UTF-8 is sampled like any other (it vanished from the
/// samples, its series never made).
#[test]
fn a_process_named_with_invalid_utf8_is_sampled() {
    const LISTEN: &str = "127.0.0.1:19533";
    let grow = named_bytes(&build_fixture("grow.c", &[]), b"grow\xff\xfe");
    let _grower = Reap(Command::new(&grow).arg("leak1m").stdout(Stdio::null()).spawn().expect("start"));
    let _daemon = common::start_daemon(&["--sample-interval", "0.5s", "--window", "30s"], LISTEN);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = common::http_get(LISTEN, "/api/v1/processes").unwrap_or_default();
        if body.contains("grow\u{fffd}\u{fffd}") {
            break;
        }
        assert!(Instant::now() < deadline, "no series of the process: {body}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A process whose name is not UTF-8 gets its agent unloaded when leakmon dies (its
/// guardian read it as gone and left the redirections in place).
#[test]
fn the_agent_leaves_a_process_named_with_invalid_utf8() {
    let fixture = named_bytes(&build_fixture("agent_target.c", &[]), b"agent\xff");
    let target = AgentTarget::with(&fixture);
    kill_agent_report_at(target.pid, "while watching", || {});
    target.wait_restored();
}

/// `--pid` names a process: a thread's id is refused, saying whose thread it is.
#[test]
fn a_thread_id_is_refused_as_a_pid() {
    let (mut process, _lines) = start_java(&[]);
    let pid = process.0.id();
    let tid: u32 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|t| *t != pid)
        .expect("a second thread");
    for args in [vec!["report", "--duration", "1", "--pid"], vec!["run", "--pid"]] {
        let out = leakmon().args(&args).arg(tid.to_string()).output().expect("run leakmon");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(
            stderr.trim(),
            format!(
                "leakmon: {tid} is a thread of process {pid}, not a process: name the process (--pid {pid})"
            )
        );
    }
    let _ = process.0.kill();
}

/// `--comm` longer than the kernel keeps would match nothing, ever: refused.
#[test]
fn a_comm_longer_than_15_bytes_is_refused() {
    let out = leakmon().args(["run", "--comm", "a-very-long-service-name"]).output().expect("run leakmon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("the kernel keeps only a process name's first 15"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// A client that opens connections and never finishes its headers (slowloris) holds
/// each for at most the header timeout, and the daemon goes on answering others.
#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use std::io::{Read as _, Write as _};
    const LISTEN: &str = "127.0.0.1:19534";
    let _daemon = common::start_daemon(&[], LISTEN);
    let mut slow: Vec<std::net::TcpStream> = (0..32)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(LISTEN).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").expect("half a request");
            s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
            s
        })
        .collect();
    assert!(common::http_get(LISTEN, "/healthz").is_some(), "others are answered meanwhile");
    let start = Instant::now();
    let mut buf = [0u8; 256];
    let n = slow[0].read(&mut buf).unwrap_or(0);
    let waited = start.elapsed();
    assert!(waited < Duration::from_secs(20), "the slow connection was held {waited:?}");
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "closed or timed out: {answer:?}");
    slow.clear();
}

/// This machine's first IPv4 address that is not loopback.
fn non_loopback_ip() -> String {
    let out =
        Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]).output().expect("ip addr");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find_map(|w| {
            w.split_once('/')
                .map(|(ip, _)| ip.to_owned())
                .filter(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
        })
        .expect("a global IPv4 address")
}

/// Listening beyond loopback without users (the DaemonSet as shipped): `/metrics` and
/// `/healthz` for every scraper, stacks, processes and profiles only for loopback.
#[test]
fn stacks_and_profiles_go_beyond_loopback_only_to_users_who_log_in() {
    let _daemon = common::start_daemon(&[], "0.0.0.0:19535");
    let remote = format!("{}:19535", non_loopback_ip());
    for path in ["/metrics", "/healthz"] {
        let (head, _) = common::http_get_raw(&remote, path).expect("an answer");
        assert!(head.contains(" 200 "), "{path}: {head}");
    }
    for path in
        ["/api/v1/processes", "/api/v1/leaks", "/debug/pprof/heap?pid=1", "/debug/flamegraph.svg?pid=1"]
    {
        let (head, body) = common::http_get_raw(&remote, path).expect("an answer");
        assert!(head.contains(" 403 "), "{path}: {head}");
        assert!(body.contains("only to users who log in"), "{body}");
    }
    // Nor does a holders scan, which holds a process still.
    let (head, body) = common::http_post_raw(&remote, "/api/v1/holders?pid=1").expect("an answer");
    assert!(head.contains(" 403 ") && body.contains("only to users who log in"), "{head}\n{body}");
    assert!(common::http_get("127.0.0.1:19535", "/api/v1/processes").is_some(), "loopback gets everything");
}

/// Two leakmons on one process: the daemon samples it with the agent; a `report
/// --agent` on the same process is refused in one line (it would have changed the
/// daemon's interval and, at its end, stopped the daemon's sampling), and the daemon
/// goes on sampling: a leak made afterwards is in its series, exactly.
#[test]
fn a_second_leakmon_never_ends_the_first_ones_sampling() {
    const LISTEN: &str = "127.0.0.1:19536";
    let mut target = AgentTarget::start();
    let (pid, slot, original) = (target.pid, target.slot, target.original);
    let daemon = Reap(
        leakmon()
            .args(["run", "--agent", "--pid", &pid.to_string(), "--sample-bytes", "4KiB"])
            .args(["--sample-interval", "0.5s", "--window", "5s", "--web.listen-address", LISTEN])
            .stderr(Stdio::null())
            .spawn()
            .expect("start leakmon run"),
    );
    let start = Instant::now();
    while !(common::agent_state::agent_mapped(pid) && common::agent_state::read_u64(pid, slot) != original) {
        assert!(start.elapsed() < Duration::from_secs(40), "the daemon did not load the agent");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = leakmon()
        .args(["report", "--agent", "--format", "json", "--duration", "2", "--pid", &pid.to_string()])
        .output()
        .expect("run the second leakmon");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second leakmon was let in: {stderr}");
    assert!(stderr.contains("already has the agent sampling for another leakmon"), "{stderr}");
    assert_ne!(common::agent_state::read_u64(pid, slot), original, "still redirected for the daemon");
    target.leak();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = common::http_get(LISTEN, "/api/v1/processes").unwrap_or_default();
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let big = doc["series"].as_array().into_iter().flatten().find_map(|s| {
            (s["comm"] == "agent_target" && s["signal"] == "heap").then(|| {
                s["stacks"].as_array()?.iter().find(|st| st["function"] == "leak_big_block").cloned()
            })?
        });
        if let Some(big) = big {
            assert_eq!(big["bytes"].as_u64(), Some(1_048_576), "{big:#}");
            break;
        }
        assert!(Instant::now() < deadline, "the daemon no longer samples: {body}");
        std::thread::sleep(Duration::from_millis(250));
    }
    common::signal(daemon.0.id(), nix::sys::signal::Signal::SIGTERM);
    drop(daemon);
    target.wait_restored();
}

/// The state letter of `pid` (`S`, `R`, `T`, `t`, ...).
fn state_of(pid: u32) -> char {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).expect("stat");
    let stat = String::from_utf8_lossy(&stat);
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()).unwrap_or('?')
}

/// A process someone stops (SIGSTOP) while leakmon watches it stays stopped until
/// SIGCONT, as it would unwatched: leakmon's tracer used to resume it at once.
#[test]
fn a_process_stopped_while_watched_stays_stopped() {
    let target = AgentTarget::start();
    let pid = target.pid;
    let (report, stderr) = common::watch_pid(pid, "4");
    common::signal(pid, nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(700));
    let stopped = state_of(pid);
    assert!(matches!(stopped, 'T' | 't'), "stopped by SIGSTOP, it ran on: state {stopped}");
    common::signal(pid, nix::sys::signal::Signal::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(5);
    while matches!(state_of(pid), 'T' | 't') {
        assert!(Instant::now() < deadline, "SIGCONT did not resume it");
        std::thread::sleep(Duration::from_millis(50));
    }
    common::finish_report(report, stderr);
    assert!(matches!(state_of(pid), 'S' | 'R'), "it runs on after leakmon");
}

/// A thread that a signal interrupted inside malloc's first instructions, its handler
/// still running: hooking malloc inline would put a jump over the bytes the handler
/// returns into, and the process would crash when it does. leakmon refuses in one line
/// and the process, released, runs on. (The test puts the thread there itself: it
/// single-steps it to malloc's second instruction and has SIGUSR2 delivered there.)
#[test]
fn no_inline_hook_goes_over_bytes_a_signal_handler_returns_into() {
    use nix::sys::{ptrace, wait::waitpid};
    use std::io::{BufRead as _, Write as _};
    let fixture = build_fixture("sigframe_target.c", &["-static"]);
    let mut child = Reap(
        Command::new(&fixture)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the fixture"),
    );
    let pid = child.0.id();
    let mut lines = std::io::BufReader::new(child.0.stdout.take().expect("stdout")).lines();
    let ready = lines.next().expect("a line").expect("read");
    let tid: i32 = ready.strip_prefix("ready ").and_then(|t| t.parse().ok()).expect("ready TID");
    let entry = common::agent_state::entry_address(pid, &fixture, "malloc");

    // Single-step the worker into malloc, one instruction past its entry.
    let t = nix::unistd::Pid::from_raw(tid);
    ptrace::seize(t, ptrace::Options::empty()).expect("seize the worker");
    ptrace::interrupt(t).expect("interrupt");
    waitpid(t, None).expect("wait");
    let mut steps = 0;
    let at = loop {
        ptrace::step(t, None).expect("step");
        waitpid(t, None).expect("wait");
        let rip = ptrace::getregs(t).expect("regs").rip;
        if rip > entry && rip < entry + 5 {
            break rip;
        }
        steps += 1;
        assert!(steps < 5_000_000, "the worker never reached malloc");
    };
    // SIGUSR2 delivered there: the handler runs, and waits, with its frame returning to `at`.
    ptrace::detach(t, Some(nix::sys::signal::Signal::SIGUSR2)).expect("detach with SIGUSR2");
    std::thread::sleep(Duration::from_millis(300));

    let mut report = Reap(
        leakmon()
            .env("RUST_LOG", "info")
            .args(["report", "--agent", "--format", "json", "--duration", "3", "--pid", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start leakmon"),
    );
    // Let the handler return while leakmon's hooks would be on (or once it has given up).
    let mut stderr = std::io::BufReader::new(report.0.stderr.take().expect("stderr"));
    let mut log = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).expect("read") > 0 {
        log.push_str(&line);
        if line.contains("watching") || line.starts_with("leakmon:") {
            break;
        }
        line.clear();
    }
    writeln!(child.0.stdin.as_mut().expect("stdin"), "release").expect("write");
    assert_eq!(lines.next().expect("a line").expect("read"), "released", "the handler returned");
    std::thread::sleep(Duration::from_millis(300));
    writeln!(child.0.stdin.as_mut().expect("stdin"), "ping").expect("write");
    let pong = lines.next().map(Result::unwrap_or_default);
    assert_eq!(
        pong.as_deref(),
        Some("pong"),
        "the process died after its handler returned to {at:#x}: {log}"
    );
    let status = report.0.wait().expect("wait leakmon");
    assert!(!status.success(), "leakmon hooked malloc over the handler's return address: {log}");
    assert!(
        log.contains("inside an allocator's first instructions (a signal handler interrupted it there)"),
        "{log}"
    );
}

/// leakmon SIGKILLed while a JVM records for `report --runtime`: its guardian stops the
/// recording and removes its files from the JVM's /tmp; the JVM runs on.
#[test]
fn a_recording_left_by_a_killed_leakmon_is_stopped_by_its_guardian() {
    let (mut jvm, mut lines) = start_java(&[]);
    let pid = jvm.0.id();
    let mut report = runtime_report_for_a_minute(pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !common::runtimes::recordings(pid).contains("leakmon-") {
        assert!(Instant::now() < deadline, "no recording started");
        std::thread::sleep(Duration::from_millis(100));
    }
    common::signal(report.0.id(), nix::sys::signal::Signal::SIGKILL);
    report.0.wait().expect("reap leakmon");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running = common::runtimes::recordings(pid);
        let left = common::runtimes::left_in_tmp(pid);
        if !running.contains("leakmon-") && left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left after leakmon was killed: {running} {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    answers(&mut jvm, &mut lines);
}

/// `systemctl stop` sends SIGTERM to leakmon alone and leaves its guardians the time to
/// undo what they did: the unit says `KillMode=mixed` (the default, control-group,
/// signals the guardians too, and kills them mid-unload past the timeout) and a stop
/// timeout longer than an unload's wait for leakmon's hold (10 s) plus the unload.
#[test]
fn the_unit_lets_guardians_finish_on_stop() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/leakmon.service"),
    )
    .expect("read the unit");
    let value = |key: &str| unit.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
    assert_eq!(value("KillMode="), Some("mixed"), "{unit}");
    let timeout: u64 =
        value("TimeoutStopSec=").and_then(|v| v.trim_end_matches('s').parse().ok()).expect("TimeoutStopSec");
    assert!(timeout >= 30, "TimeoutStopSec={timeout}");
    // Signalling other users' runtimes, and the attach file as the JVM's user.
    let caps = value("CapabilityBoundingSet=").expect("CapabilityBoundingSet");
    for cap in ["CAP_KILL", "CAP_SETUID", "CAP_SETGID"] {
        assert!(caps.split_whitespace().any(|c| c == cap), "{cap} in {caps}");
    }
}

/// Bytes of anonymous memory that is writable and executable in `pid` (where
/// leakmon's remote calls run from).
fn call_pages(pid: u32) -> u64 {
    let maps = std::fs::read(format!("/proc/{pid}/maps")).expect("maps");
    String::from_utf8_lossy(&maps)
        .lines()
        .filter(|l| {
            l.split_whitespace().count() == 5
                && l.split_whitespace().nth(1).is_some_and(|p| p.starts_with("rwx"))
        })
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
        })
        .sum()
}

/// Each call leakmon makes in a process (dlopen, start, stop) runs from a page it maps
/// there: once the call is over, the page goes again, so a load and an unload leave no
/// writable, executable memory behind (the agent's own code stays, idle).
#[test]
fn calls_leave_no_executable_page_behind() {
    let mut target = AgentTarget::start();
    let pid = target.pid;
    let before = call_pages(pid);
    for _ in 0..2 {
        let (report, stderr) = common::watch_pid_with(pid, "1", &["--agent", "--sample-bytes", "4KiB"]);
        target.leak();
        common::finish_report(report, stderr);
    }
    assert_eq!(call_pages(pid), before, "pages left by leakmon's calls");
    target.wait_restored();
}

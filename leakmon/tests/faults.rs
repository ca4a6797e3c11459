//! Faults: a daemon killed with SIGKILL leaves nothing attached in the kernel and a
//! restart picks up at once; bad and abusive HTTP requests get the right status and
//! never take the daemon down.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Stdio,
    time::{Duration, Instant},
};

use common::{http_get, http_get_raw, leakmon, Reap};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "{what} not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const LISTEN_KILL: &str = "127.0.0.1:19485";

/// Tests here that load allocator programs run one at a time, so that the count of
/// programs taken before one starts is exact: another test's daemon cannot load or
/// unload its own programs in between.
static PROGRAMS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn sigkill_leaves_nothing_attached_and_a_restart_picks_up() {
    let _alone = PROGRAMS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = common::bpf_programs_named(&["alloc_return"]);
    let start = || {
        Reap(
            leakmon()
                .args(["run", "--attach", "all", "--web.listen-address", LISTEN_KILL])
                .stderr(Stdio::null())
                .spawn()
                .expect("start leakmon run"),
        )
    };
    let mut daemon = start();
    wait_until("the daemon serves", Duration::from_secs(30), || http_get(LISTEN_KILL, "/healthz").is_some());
    assert!(common::bpf_programs_named(&["alloc_return"]) > before, "programs loaded while running");

    kill(Pid::from_raw(daemon.0.id() as i32), Signal::SIGKILL).expect("SIGKILL");
    let _ = daemon.0.wait();
    // The kernel closes a dead process's perf-event uprobes one RCU grace period each
    // (about 0.1 s; every allocator library mapped on the host is probed), so allow
    // for a busy host.
    wait_until("the kernel drops the programs", Duration::from_mins(1), || {
        common::bpf_programs_named(&["alloc_return"]) == before
    });

    // A restart needs nothing from an operator: same address, probes again.
    let mut again = start();
    wait_until("the restarted daemon serves", Duration::from_secs(30), || {
        http_get(LISTEN_KILL, "/healthz").is_some()
    });
    assert!(common::bpf_programs_named(&["alloc_return"]) > before);
    kill(Pid::from_raw(again.0.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let stopped = Instant::now();
    assert!(again.0.wait().expect("wait").success());
    assert!(stopped.elapsed() < Duration::from_secs(10), "SIGTERM took {:?}", stopped.elapsed());
    wait_until("a clean stop detaches", Duration::from_secs(10), || {
        common::bpf_programs_named(&["alloc_return"]) == before
    });
}

const LISTEN_HTTP: &str = "127.0.0.1:19486";

/// Sends raw bytes, returns the status line (empty if the connection just closed).
fn raw_request(bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(LISTEN_HTTP).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_owned()
}

#[test]
fn bad_and_abusive_requests_get_answers_not_crashes() {
    let _daemon = common::start_daemon(&["--attach", "none"], LISTEN_HTTP);
    let status = |path: &str| http_get_raw(LISTEN_HTTP, path).map(|(head, _)| head).unwrap_or_default();

    assert!(status("/no/such/page").contains(" 404 "));
    assert!(raw_request(b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n").contains(" 405 "));
    let garbage = raw_request(b"GARBAGE \x01\x02 NOT-HTTP\r\n\r\n");
    assert!(garbage.is_empty() || garbage.contains(" 400 "), "{garbage}");
    // A 1 MiB query string.
    let huge = format!("/metrics?{}", "a".repeat(1 << 20));
    let answer = raw_request(format!("GET {huge} HTTP/1.0\r\n\r\n").as_bytes());
    assert!(answer.is_empty() || answer.contains(" 4"), "{answer}");
    // Profiles: a pid that is not a number, and no attribution to profile.
    let (head, body) = http_get_raw(LISTEN_HTTP, "/debug/pprof/heap?pid=abc").expect("answer");
    assert!(head.contains(" 400 ") && body.contains("pid must be a number"), "{head} {body}");
    let (head, body) = http_get_raw(LISTEN_HTTP, "/debug/pprof/heap?pid=1").expect("answer");
    assert!(head.contains(" 503 ") && body.contains("--attach none"), "{head} {body}");

    // Many concurrent scrapes: every one answered.
    let threads: Vec<_> = (0..32)
        .map(|_| {
            std::thread::spawn(|| (0..25).filter(|_| http_get(LISTEN_HTTP, "/metrics").is_some()).count())
        })
        .collect();
    let answered: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    assert_eq!(answered, 32 * 25);
    assert!(http_get(LISTEN_HTTP, "/healthz").is_some(), "still serving");
}

const LISTEN_CAPS: &str = "127.0.0.1:19490";

/// The daemon keeps only the capabilities it still needs once running.
#[test]
fn the_running_daemon_holds_only_the_capabilities_it_needs() {
    let _alone = PROGRAMS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let daemon = common::start_daemon(&["--attach", "all"], LISTEN_CAPS);
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.0.id())).expect("status");
    let set = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("{name} in {status}"))
    };
    // CAP_DAC_READ_SEARCH, CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_SYS_PTRACE,
    // CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF.
    let kept = (1 << 2) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 19) | (1 << 21) | (1 << 38) | (1 << 39);
    assert_eq!(leakmon::capabilities::KEPT, kept);
    for name in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(set(name), kept, "{name} {:#x}", set(name));
    }
    assert_eq!(set("CapInh:"), 0);
    // And it still works: the probes serve metrics.
    assert!(http_get(LISTEN_CAPS, "/metrics").is_some_and(|m| m.contains("leakmon_attached_processes")));
}

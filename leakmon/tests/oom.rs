//! OOM kills are counted per service, and a cgroup's memory.max is the limit used for
//! time to exhaustion.

mod common;

use std::time::{Duration, Instant};

use common::build_fixture;

const LISTEN: &str = "127.0.0.1:19475";

#[test]
fn oom_kills_are_counted_per_service() {
    let name = format!("leakmon-oom-test-{}", std::process::id());
    let cgroup = common::Cgroup::with_limit(&name, 64 << 20);
    let grow = build_fixture("grow.c", &[]);
    let victim = common::named(&grow, "grow_oom");

    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("oom-daemon.log");
    let _daemon =
        common::start_daemon_logged(&["--sample-interval", "0.2s", "--window", "10s"], LISTEN, &log);
    std::thread::sleep(Duration::from_secs(1));

    // The limit is exported while a victim lives (each lives about 1.3 s, growing to
    // the 64 MiB limit): watched from the start, not only once the kills are counted,
    // when the dead victims may already be gone from the metrics.
    let want = format!("leakmon_oom_kills_total{{comm=\"grow_oom\",service=\"{name}\"}} 3");
    let limit = format!("leakmon_memory_limit_bytes{{comm=\"grow_oom\",service=\"{name}\"}} 67108864");
    let done = std::sync::atomic::AtomicBool::new(false);
    let (text, saw_limit) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut saw_limit = false;
            let mut text = String::new();
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline {
                text = common::http_get(LISTEN, "/metrics").unwrap_or_default();
                saw_limit |= text.contains(&limit);
                if done.load(std::sync::atomic::Ordering::Relaxed) && text.contains(&want) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (text, saw_limit)
        });
        for _ in 0..3 {
            assert!(!cgroup.run(&victim, "oom").success(), "the victim is killed");
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().expect("the watcher")
    });
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains(&want), "missing {want:?} in\n{text}\nthe daemon's log:\n{logged}");
    assert!(saw_limit, "the cgroup's memory.max was the limit");
}

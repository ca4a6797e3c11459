//! OOM kills are counted per service, and a cgroup's memory.max is the limit used for
//! time to exhaustion.

mod common;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::build_fixture;

const LISTEN: &str = "127.0.0.1:19475";

/// A cgroup of its own, removed at the end.
struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn oom_kills_are_counted_per_service() {
    let name = format!("leakmon-oom-test-{}", std::process::id());
    // The unified hierarchy where the host has one, else v1's memory controller.
    let (dir, limit_file) = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        (PathBuf::from("/sys/fs/cgroup"), "memory.max")
    } else {
        (PathBuf::from("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")
    };
    let cgroup = Cgroup(dir.join(&name));
    std::fs::create_dir(&cgroup.0).unwrap_or_else(|e| panic!("create {}: {e}", cgroup.0.display()));
    std::fs::write(cgroup.0.join(limit_file), "67108864").expect("set the memory limit");
    let _ = std::fs::write(cgroup.0.join("memory.swap.max"), "0");
    let grow = build_fixture("grow.c", &[]);
    let victim = common::named(&grow, "grow_oom");

    let _daemon = common::start_daemon(&["--sample-interval", "0.2s", "--window", "10s"], LISTEN);
    std::thread::sleep(Duration::from_secs(1));

    let procs = cgroup.0.join("cgroup.procs");
    let script = format!("echo $$ > {} && exec {} oom", procs.display(), victim.display());
    for _ in 0..3 {
        let status = Command::new("sh").args(["-c", &script]).status().expect("run victim");
        assert!(!status.success(), "the victim is killed");
    }

    let want = format!("leakmon_oom_kills_total{{comm=\"grow_oom\",service=\"{name}\"}} 3");
    let limit = format!("leakmon_memory_limit_bytes{{comm=\"grow_oom\",service=\"{name}\"}} 67108864");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    let mut saw_limit = false;
    while Instant::now() < deadline {
        text = common::http_get(LISTEN, "/metrics").unwrap_or_default();
        saw_limit |= text.contains(&limit);
        if text.contains(&want) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(text.contains(&want), "missing {want:?} in\n{text}");
    assert!(saw_limit, "the cgroup's memory.max was the limit");
}

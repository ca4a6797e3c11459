//! What the leak verdict is judged on, under the real daemon: memory the kernel cannot
//! drop (anonymous, resident or swapped out), never file cache.
//!
//! `--sample-interval 0.5s --window 30s`, as the trend tests. A process reading a file
//! through mmap at 16 MiB/s (its resident size grows with cache) must never be
//! flagged; a process leaking 1 MiB/s in a cgroup limited to 32 MiB with swap (its
//! resident size stops at the limit, its leak goes on in swap) must be.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{build_fixture, Cgroup, Reap};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:19497";

/// A swap file, on for as long as it lives.
struct Swap(PathBuf);

impl Swap {
    fn on(path: &Path, mib: u64) -> Self {
        // A swap file left on by a killed run can be neither removed nor rewritten.
        let _ = Command::new("swapoff").arg(path).stderr(Stdio::null()).status();
        let _ = std::fs::remove_file(path);
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("run swap set-up");
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(Command::new("fallocate").args(["-l", &format!("{mib}M")]).arg(path));
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        run(Command::new("mkswap").arg(path));
        run(Command::new("swapon").arg(path));
        Self(path.to_owned())
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        // The pages of a process just killed leave swap a moment later: until then
        // swapoff may fail for want of memory to take them back.
        for _ in 0..50 {
            if Command::new("swapoff").arg(&self.0).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = std::fs::remove_file(&self.0);
    }
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn file_cache_is_never_a_leak_and_a_leak_in_swap_is_one() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let _swap = Swap::on(&tmp.join("leakmon-test.swap"), 256);
    let cgroup = Cgroup::with_limit("leakmon-test-swapping", 32 << 20);
    // Unified hierarchy: allow swap (the helper forbids it). v1 limits memory alone
    // unless memsw is set: the excess swaps out.
    if cgroup.0.join("memory.swap.max").exists() {
        std::fs::write(cgroup.0.join("memory.swap.max"), "max").expect("allow swap in the cgroup");
    } else {
        let _ = std::fs::write(cgroup.0.join("memory.swappiness"), "100");
    }

    let _daemon = common::start_daemon(&["--sample-interval", "0.5s", "--window", "30s"], LISTEN);
    let data = tmp.join("leakmon-test-mmap.data");
    let reader = build_fixture("mmap_read.c", &[]);
    let _reader = Reap(
        Command::new(common::named(&reader, "mmap_reader"))
            .arg(&data)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the reader"),
    );
    let grow = common::named(&build_fixture("grow.c", &[]), "swap_leaker");
    let script =
        format!("echo $$ > {} && exec {} leak1m", cgroup.0.join("cgroup.procs").display(), grow.display());
    let leaker = Reap(Command::new("sh").args(["-c", &script]).spawn().expect("start the leaker"));

    let start = Instant::now();
    let mut reader_flagged = None;
    let mut leaker_flagged = None;
    let mut last = Value::Null;
    while start.elapsed() < Duration::from_secs(80) {
        std::thread::sleep(Duration::from_millis(500));
        let Some(body) = common::http_get(LISTEN, "/api/v1/processes") else { continue };
        let doc: Value = serde_json::from_str(&body).expect("processes JSON");
        let t = start.elapsed().as_secs_f64();
        for s in doc["series"].as_array().expect("series") {
            match (s["comm"].as_str(), s["suspected"].as_bool()) {
                (Some("mmap_reader"), Some(true)) => {
                    reader_flagged.get_or_insert((t, s.clone()));
                }
                (Some("swap_leaker"), Some(true)) if s["signal"] == "anon" => {
                    leaker_flagged.get_or_insert(t);
                }
                _ => {}
            }
        }
        last = doc;
    }
    let series = |comm: &str, signal: &str| {
        last["series"]
            .as_array()
            .expect("series")
            .iter()
            .find(|s| s["comm"] == comm && s["signal"] == signal)
            .cloned()
            .unwrap_or_else(|| panic!("no {signal} series of {comm} in {last:#}"))
    };
    let reader = series("mmap_reader", "anon");
    assert!(reader_flagged.is_none(), "the mmap reader was flagged: {reader_flagged:?}");
    let file = reader["memory"]["file"].as_u64().expect("file bytes");
    assert!(file > 512 << 20, "the reader's cache grew past 512 MiB: {reader:#}");
    assert_ne!(reader["verdict"], "steady_growth");

    let swapped = status_kib(leaker.id(), "VmSwap:") << 10;
    let resident = status_kib(leaker.id(), "VmRSS:") << 10;
    assert!(swapped > 16 << 20, "the leak went on in swap: {swapped} B swapped, {resident} B resident");
    assert!(resident <= 33 << 20, "the leaker's resident size stopped at its limit: {resident} B");
    let at = leaker_flagged
        .unwrap_or_else(|| panic!("the leak in swap was never flagged: {:#}", series("swap_leaker", "anon")));
    assert!(at <= 60.0, "flagged at {at:.1}s");
    let leak = series("swap_leaker", "anon");
    assert_eq!(leak["verdict"], "steady_growth", "still flagged while it leaks into swap: {leak:#}");
    assert!(leak["memory"]["swap"].as_u64().expect("swap bytes") > 0, "{leak:#}");
    drop(leaker);
    let _ = std::fs::remove_file(&data);
}

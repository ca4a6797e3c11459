//! Node.js and JVM fixtures: started, asked whether they still answer, and checked for
//! what leakmon may have left in them.

use std::{io::Write as _, path::PathBuf, sync::OnceLock};

use serde_json::Value;

use super::{Lines, Reap};

/// `leakmon report --runtime --format json --pid PID --duration D [options]`.
pub fn runtime_report(pid: u32, duration: &str, options: &[&str]) -> std::process::Output {
    super::leakmon()
        .env("RUST_LOG", "info")
        .args(["report", "--runtime", "--format", "json", "--pid", &pid.to_string(), "--duration", duration])
        .args(options)
        .output()
        .expect("run leakmon")
}

/// A successful runtime report of `pid`'s `runtime` over its window: its one process,
/// its held bytes (a growing cache's: over 1 MB) and leakmon's log.
pub fn growing_process(pid: u32, runtime: &str, options: &[&str]) -> (Value, u64, String) {
    let out = runtime_report(pid, "20", options);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["method"], "runtime");
    let p = json["processes"][0].clone();
    assert_eq!(p["pid"], pid);
    assert_eq!(p["runtime"], runtime);
    let total = p["outstanding_bytes"].as_u64().expect("bytes");
    assert!(total > 1_000_000, "20 s of growth: {total} B");
    (p, total, stderr)
}

pub fn node_fixture() -> String {
    super::fixtures_dir().join("node/cache_leak.js").display().to_string()
}

/// `node [node_args] cache_leak.js [mode]`, once it says "ready".
pub fn start_node(node_args: &[&str], mode: &str) -> (Reap, Lines) {
    let mut node = std::process::Command::new("node");
    node.args(node_args).arg(node_fixture()).arg(mode).stderr(std::process::Stdio::null());
    super::start_ready(node, "node (Node.js 20)")
}

/// It still answers, and printed nothing else meanwhile (a JVM sent SIGQUIT without
/// an attach listener would have printed a thread dump).
pub fn answers(process: &mut Reap, lines: &mut Lines) {
    writeln!(process.0.stdin.as_mut().expect("stdin"), "ping").expect("write");
    assert_eq!(lines.next().expect("a line").expect("read"), "pong", "the process still answers");
}

/// TCP ports the process listens on (its inspector's would be one).
pub fn listening(pid: u32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|t| Some(t.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned()))
        .collect();
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{t}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 9 && cols[3] == "0A" && inodes.iter().any(|i| i == cols[9])
        })
        .count()
}

pub const JDK: &str = "/usr/lib/jvm/java-17-openjdk-amd64/bin";

/// The fixture's classes, compiled once per test binary.
pub fn classes() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new(format!("{JDK}/javac"))
            .arg("-d")
            .arg(dir.path())
            .arg(super::fixtures_dir().join("jvm/CacheLeak.java"))
            .status()
            .expect("run javac (openjdk-17-jdk-headless, installed by the tests' set-up)");
        assert!(status.success(), "javac CacheLeak.java");
        dir
    })
    .path()
    .to_owned()
}

/// `java [args] CacheLeak`, once it says "ready".
pub fn start_java(args: &[&str]) -> (Reap, Lines) {
    let mut java = std::process::Command::new(format!("{JDK}/java"));
    java.args(args).arg("-cp").arg(classes()).arg("CacheLeak").stderr(std::process::Stdio::null());
    super::start_ready(java, "java (OpenJDK 17)")
}

/// What `jcmd PID JFR.check` says: the recordings left running.
pub fn recordings(pid: u32) -> String {
    let out = std::process::Command::new(format!("{JDK}/jcmd"))
        .args([&pid.to_string(), "JFR.check"])
        .output()
        .expect("run jcmd");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What leakmon leaves in the JVM's /tmp: trigger files and recordings.
pub fn left_in_tmp(pid: u32) -> Vec<String> {
    std::fs::read_dir("/tmp")
        .expect("/tmp")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n == &format!(".attach_pid{pid}")
                || (n.starts_with("leakmon-") && n.ends_with(".jfr") && n.contains(&format!("-{pid}")))
        })
        .collect()
}

/// The share of a holders report's `unit` (`bytes` or `objects`) out of `total` that
/// the holders `held` selects hold.
pub fn held_share(holders: &[Value], unit: &str, total: u64, held: impl Fn(&Value) -> bool) -> f64 {
    holders.iter().filter(|h| held(h)).map(|h| h[unit].as_u64().unwrap_or(0)).sum::<u64>() as f64
        / total as f64
}

/// Whether a holder is anything of the fixtures' churn: its root or a step of its path
/// names `churn` or its `scratch`.
pub fn through_churn(holder: &Value) -> bool {
    let named = |v: &Value| v.as_str().is_some_and(|n| n.contains("scratch") || n.contains("churn"));
    named(&holder["root"]["name"])
        || holder["path"].as_array().into_iter().flatten().any(|s| named(&s["name"]))
}

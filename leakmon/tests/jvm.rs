//! `report --runtime` on real OpenJDK 17 processes: HotSpot's attach protocol, spoken
//! by leakmon itself, and JFR's live-object samples (or class histograms without JFR).

mod common;

use std::io::BufRead as _;

use common::{
    runtimes::{answers, growing_process, left_in_tmp, recordings, runtime_report, start_java as start},
    Reap,
};
use serde_json::Value;

fn share(process: &Value, total: u64, names: &[&str]) -> f64 {
    let bytes = common::bytes_in_stacks(process, |frames| {
        frames.iter().any(|f| {
            f["runtime"] == "jvm"
                && names.iter().any(|n| f["function"].as_str() == Some(&format!("CacheLeak.{n}")))
        })
    });
    bytes as f64 / total as f64
}

/// A HashMap cache beside churn: at least half the reported bytes in stacks naming the
/// functions that grow it, at most a tenth in the churn; the JVM keeps running, with no
/// recording left and nothing left in its /tmp.
#[test]
fn a_growing_java_hashmap_is_named_by_its_functions() {
    let (mut process, mut lines) = start(&[]);
    let pid = process.0.id();
    let (p, total, _) = growing_process(pid, "jvm", &[]);
    let p = &p;
    let histograms = p["notes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|n| n.as_str().is_some_and(|n| n.contains("class histograms")));
    assert!(!histograms, "JFR, not histograms: {p}");
    let (cache, churn) = (share(p, total, &["grow", "remember", "makeEntry"]), share(p, total, &["churn"]));
    eprintln!("jvm: {total} B held, cache functions {:.0}%, churn {:.1}%", cache * 100.0, churn * 100.0);
    assert!(cache >= 0.5, "cache {cache:.2}");
    assert!(churn <= 0.1, "churn {churn:.2}");
    let named = p["stacks"][0]["frames"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["line"].as_u64().is_some_and(|l| l > 0));
    assert!(named, "frames carry lines: {}", p["stacks"][0]);
    // Named past the JDK's own classes (HashMap.newNode), at the program's code.
    let site = &p["stacks"][0]["site"];
    assert!(site["function"].as_str().is_some_and(|f| f.starts_with("CacheLeak.")), "{site}");
    assert!(recordings(pid).contains("No available recordings"), "{}", recordings(pid));
    assert_eq!(left_in_tmp(pid), Vec::<String>::new());
    answers(&mut process, &mut lines);
}

/// `-XX:+DisableAttachMechanism`: one line, and no signal sent (it would have printed
/// a thread dump on the process's stdout).
#[test]
fn a_jvm_with_attach_disabled_is_refused_in_one_line() {
    let (mut process, mut lines) = start(&["-XX:+DisableAttachMechanism"]);
    let out = runtime_report(process.0.id(), "2", &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().filter(|l| l.contains("-XX:+DisableAttachMechanism")).count(), 1, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    answers(&mut process, &mut lines);
}

/// A process that maps a libjvm.so but does not catch SIGQUIT (a JVM still starting):
/// SIGQUIT's default action would end it, so nothing is sent.
#[test]
fn a_jvm_that_does_not_catch_sigquit_is_refused_and_left_alive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = dir.path().join("libjvm.so");
    std::fs::copy(common::system_libc().parent().unwrap().join("libm.so.6"), &lib).expect("copy libm");
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import ctypes, sys; ctypes.CDLL(sys.argv[1]); print('ready', flush=True); sys.stdin.read()",
        ])
        .arg(&lib)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let mut process = Reap(child);
    let out = runtime_report(process.0.id(), "2", &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not catch SIGQUIT"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(process.0.try_wait().unwrap().is_none(), "it still runs");
    assert_eq!(left_in_tmp(process.0.id()), Vec::<String>::new());
}

/// `-Xrs`: the JVM opens its attach socket at start-up instead of on SIGQUIT, so
/// leakmon finds it listening and sends nothing.
#[test]
fn a_jvm_started_with_xrs_is_attached_without_a_signal() {
    let (mut process, mut lines) = start(&["-Xrs"]);
    let out = runtime_report(process.0.id(), "3", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    answers(&mut process, &mut lines);
}

/// Without JFR: the growth per class between two class histograms, and a note saying so.
#[test]
fn a_jvm_without_jfr_reports_growth_per_class() {
    let (mut process, mut lines) = start(&["-XX:-FlightRecorder"]);
    let out = runtime_report(process.0.id(), "5", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let p = &json["processes"][0];
    assert!(p["notes"][0].as_str().is_some_and(|n| n.contains("class histograms")), "{p}");
    // 200 entries every 10 ms: thousands in 5 s, 24 bytes each at least.
    let entry = p["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frames"][0]["function"] == "CacheLeak$Entry")
        .unwrap_or_else(|| panic!("CacheLeak$Entry grew: {p}"));
    assert!(entry["allocations"].as_u64().unwrap() >= 500, "{entry}");
    assert!(entry["bytes"].as_u64().unwrap() >= 500 * 24, "{entry}");
    answers(&mut process, &mut lines);
}

/// `report --holders` on the seed's cache beside churn 50 times its objects, default
/// settings: most held bytes are held through the static field `CacheLeak.CACHE`,
/// next to none through the churn; the pause is said; afterwards the JVM records
/// nothing of leakmon's, keeps nothing of it in its /tmp, and answers.
#[test]
fn the_window_s_objects_are_named_by_the_static_field_that_holds_them() {
    let (mut process, mut lines) = start(&["-Dchurn=20000"]);
    let pid = process.0.id();
    let out = common::leakmon()
        .env("RUST_LOG", "info")
        .args(["report", "--holders", "--format", "json", "--duration", "20", "--pid", &pid.to_string()])
        .output()
        .expect("run leakmon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let p = &report["processes"][0];
    assert_eq!(p["runtime"], "jvm", "{p}");
    let holders = p["holders"].as_array().expect("holders");
    let objects: u64 = holders.iter().map(|h| h["objects"].as_u64().unwrap_or(0)).sum();
    assert!(objects >= 20, "{objects} samples in 20 s: {p}");
    let through =
        |held: &dyn Fn(&Value) -> bool| common::runtimes::held_share(holders, "objects", objects, held);
    let cache = through(&|h| h["root"]["name"] == "CacheLeak.CACHE");
    let churn = through(&common::runtimes::through_churn);
    let pause = p["pause_ms"].as_f64().expect("pause_ms");
    eprintln!(
        "jvm holders: {objects} samples, through CACHE {:.0}%, churn {:.1}%, pause {pause} ms",
        cache * 100.0,
        churn * 100.0
    );
    assert!(cache >= 0.6, "through CACHE {cache:.2}: {p}");
    assert!(churn <= 0.1, "through the churn {churn:.2}");
    assert_eq!(holders[0]["root"]["kind"], "static", "{}", holders[0]);
    assert!(!recordings(pid).contains("leakmon"), "{}", recordings(pid));
    assert!(left_in_tmp(pid).is_empty(), "{:?}", left_in_tmp(pid));
    answers(&mut process, &mut lines);
}

/// leakmon SIGKILLed in the middle of a holders window: its guardian stops the
/// recording and removes its files; the JVM answers.
#[test]
fn leakmon_killed_mid_window_leaves_no_recording() {
    let (mut process, mut lines) = start(&[]);
    let pid = process.0.id();
    let mut watch = common::leakmon()
        .env("RUST_LOG", "info")
        .args(["report", "--holders", "--format", "json", "--duration", "30", "--pid", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start leakmon");
    let mut stderr = std::io::BufReader::new(watch.stderr.take().expect("stderr"));
    let mut log = String::new();
    while !log.contains("JFR recording started") {
        assert!(stderr.read_line(&mut log).expect("read") > 0, "{log}");
    }
    assert!(recordings(pid).contains("leakmon"), "recording mid-window");
    watch.kill().expect("SIGKILL leakmon");
    watch.wait().expect("reap");
    let start = std::time::Instant::now();
    while recordings(pid).contains("leakmon") || !left_in_tmp(pid).is_empty() {
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "left: {}", recordings(pid));
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    answers(&mut process, &mut lines);
}

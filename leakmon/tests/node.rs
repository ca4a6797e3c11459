//! `report --runtime` on real Node.js processes: V8's sampling heap profiler, driven
//! through the inspector that SIGUSR1 opens, and closed again.

mod common;

use serde_json::Value;

use common::{
    runtimes::{answers, growing_process, listening, runtime_report, start_node as start},
    Reap,
};

/// The seed's cache: at least half the reported bytes in stacks naming the functions
/// that grow it, at most a tenth in the churn; afterwards no inspector port is open
/// and the process keeps running.
#[test]
fn a_growing_javascript_cache_is_named_by_its_functions() {
    let (mut process, mut lines) = start(&[], "grow");
    let pid = process.0.id();
    assert_eq!(listening(pid), 0, "no port open before");
    // Default settings: V8's interval paced to the allocation rate measured in a
    // first second (at a fixed 512 KiB a run once put half the bytes outside the
    // cache's functions: one large object sampled elsewhere swung the shares).
    let (p, total, stderr) = growing_process(pid, "node", &[]);
    let p = &p;
    let interval = stderr
        .lines()
        .find(|l| l.contains("V8's sampling heap profiler started"))
        .and_then(|l| l.split("interval=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("the interval in the log: {stderr}"));
    assert!(interval.is_power_of_two() && interval < 512 << 10, "paced interval {interval}");
    let share = |names: &[&str]| -> f64 {
        let bytes = common::bytes_in_stacks(p, |frames| {
            frames.iter().any(|f| f["runtime"] == "node" && names.iter().any(|n| f["function"] == *n))
        });
        bytes as f64 / total as f64
    };
    let (cache, churn) = (share(&["grow", "remember", "makeEntry"]), share(&["churn"]));
    // V8 names an optimized frame by its outermost function: once its compiler has
    // inlined the timer callback and `grow` into Node.js's `listOnTimeout` (5 runs of 23
    // here), the cache's bytes are named by Node.js's function. The report must
    // then say so in a note; those bytes are counted with the cache's only then.
    let inlined = common::bytes_in_stacks(p, |frames| {
        frames.first().is_some_and(|f| f["file"].as_str().is_some_and(|f| f.starts_with("node:")))
    });
    let inlined = inlined as f64 / total as f64;
    let notes: Vec<&str> = p["notes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    assert!(
        notes.iter().any(|n| n.starts_with("V8 names an optimized frame by its outermost function")),
        "{notes:?}"
    );
    let noted = p["notes"].as_array().into_iter().flatten().any(|n| {
        n.as_str().is_some_and(|n| n.contains("named by Node.js's own functions") && n.contains("inlined"))
    });
    eprintln!(
        "node: {total} B held, cache functions {:.0}%, Node.js's functions {:.0}% (noted: {noted}), churn {:.1}%",
        cache * 100.0,
        inlined * 100.0,
        churn * 100.0
    );
    let top: Vec<String> = p["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .take(4)
        .map(|s| {
            let frames: Vec<String> = s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| format!("{}:{}", f["function"].as_str().unwrap_or("?"), f["line"]))
                .collect();
            format!("{} B {}", s["bytes"], frames.join(" < "))
        })
        .collect();
    assert_eq!(noted, inlined >= 0.2, "a note exactly when Node.js's functions name a fifth or more: {p}");
    let named = if noted { cache + inlined } else { cache };
    assert!(named >= 0.5, "cache {cache:.2}, inlined {inlined:.2}; largest stacks:\n{}", top.join("\n"));
    assert!(churn <= 0.1, "churn {churn:.2}");
    let site = &p["stacks"][0]["site"];
    assert!(site["file"].as_str().is_some_and(|f| f.ends_with(".js") || f.starts_with("node:")), "{site}");
    assert!(site["line"].as_u64().is_some(), "{site}");
    assert!(stderr.contains("inspector closed"), "{stderr}");
    assert_eq!(listening(pid), 0, "the inspector is closed again");
    answers(&mut process, &mut lines);
}

/// An inspector already open is someone's debugging session: one line, and leakmon
/// neither takes it over nor closes it.
#[test]
fn a_process_with_its_inspector_open_is_refused_in_one_line() {
    let (mut process, mut lines) = start(&["--inspect=127.0.0.1:0"], "grow");
    let pid = process.0.id();
    let ports = listening(pid);
    assert_eq!(ports, 1, "the inspector listens");
    let out = runtime_report(pid, "2", &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("already has an inspector open")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_eq!(listening(pid), ports, "its inspector is left open");
    answers(&mut process, &mut lines);
}

/// A program that handles SIGUSR1 itself (as `--disable-sigusr1` would) opens no
/// inspector: one line, the process untouched.
#[test]
fn a_process_that_opens_no_inspector_on_sigusr1_is_refused_in_one_line() {
    let (mut process, mut lines) = start(&[], "handles-usr1");
    let pid = process.0.id();
    let out = runtime_report(pid, "2", &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().filter(|l| l.contains("opened no inspector")).count(), 1, "{stderr}");
    assert_eq!(listening(pid), 0);
    answers(&mut process, &mut lines);
}

/// Neither Node.js nor a JVM: one line.
#[test]
fn another_process_is_refused_in_one_line() {
    let process = Reap(std::process::Command::new("sleep").arg("30").spawn().expect("sleep"));
    let out = runtime_report(process.0.id(), "1", &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("neither Node.js nor a HotSpot JVM"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// `report --holders --pid PID --duration 20`: the window's surviving objects by the
/// variable that holds them.
fn holders_report(pid: u32, options: &[&str]) -> (Value, String) {
    let out = common::leakmon()
        .env("RUST_LOG", "info")
        .args(["report", "--holders", "--format", "json", "--duration", "20", "--pid", &pid.to_string()])
        .args(options)
        .output()
        .expect("run leakmon");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (serde_json::from_slice(&out.stdout).expect("JSON"), stderr)
}

/// The seed's cache beside churn 50 times its objects, default settings: most held
/// bytes are held through the variable `cache`, next to none through anything of the
/// churn; the pause is measured; afterwards no inspector is open and it answers.
#[test]
fn the_window_s_objects_are_named_by_the_variable_that_holds_them() {
    let mut node = std::process::Command::new("node");
    // A port of its own: other tests open inspectors on the default one meanwhile.
    node.env("CHURN", "20000")
        .args(["--inspect-port=127.0.0.1:9341", &common::runtimes::node_fixture(), "grow"])
        .stderr(std::process::Stdio::null());
    let (mut process, mut lines) = common::start_ready(node, "node (Node.js 20)");
    let pid = process.0.id();
    let (report, stderr) = holders_report(pid, &[]);
    let p = &report["processes"][0];
    assert_eq!(p["runtime"], "node", "{p}");
    let total = p["outstanding_bytes"].as_u64().expect("bytes");
    assert!(total > 1_000_000, "20 s of growth: {total} B");
    let holders = p["holders"].as_array().expect("holders");
    let through = |held: &dyn Fn(&Value) -> bool| common::runtimes::held_share(holders, "bytes", total, held);
    let cache = through(&|h| h["root"]["name"] == "cache");
    let churn = through(&common::runtimes::through_churn);
    let pause = p["pause_ms"].as_f64().expect("pause_ms");
    eprintln!(
        "node holders: {total} B held, through cache {:.0}%, churn {:.1}%, pause {pause} ms",
        cache * 100.0,
        churn * 100.0
    );
    let top: Vec<String> = holders.iter().take(5).map(|h| h.to_string()).collect();
    assert!(cache >= 0.6, "through cache {cache:.2}:\n{}", top.join("\n"));
    assert!(churn <= 0.1, "through the churn {churn:.2}");
    assert_eq!(holders[0]["root"], serde_json::json!({"kind": "closure", "name": "cache"}), "{}", holders[0]);
    assert!(pause > 0.0);
    assert!(stderr.contains("inspector closed"), "{stderr}");
    assert_eq!(listening(pid), 0, "the inspector is closed again");
    answers(&mut process, &mut lines);
}

/// leakmon SIGKILLed in the middle of the window: its guardian closes the inspector,
/// and the process answers.
#[test]
fn leakmon_killed_mid_window_leaves_no_inspector_open() {
    let mut node = std::process::Command::new("node");
    node.args(["--inspect-port=127.0.0.1:9342", &common::runtimes::node_fixture(), "grow"])
        .stderr(std::process::Stdio::null());
    let (mut process, mut lines) = common::start_ready(node, "node (Node.js 20)");
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
    while !log.contains("first heap snapshot taken") {
        assert!(std::io::BufRead::read_line(&mut stderr, &mut log).expect("read") > 0, "{log}");
    }
    assert_eq!(listening(pid), 1, "the inspector is open mid-window");
    watch.kill().expect("SIGKILL leakmon");
    watch.wait().expect("reap");
    let start = std::time::Instant::now();
    while listening(pid) > 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(15), "the inspector stayed open");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    answers(&mut process, &mut lines);
}

/// The daemon names a Node.js process's holders on demand (a POST, with its window),
/// on a thread of its own, and closes the inspector after.
#[test]
fn the_daemon_names_a_node_process_s_holders_on_demand() {
    const LISTEN: &str = "127.0.0.1:19552";
    let _daemon = common::start_daemon(&["--attach", "none"], LISTEN);
    let mut node = std::process::Command::new("node");
    node.args(["--inspect-port=127.0.0.1:9343", &common::runtimes::node_fixture(), "grow"])
        .stderr(std::process::Stdio::null());
    let (mut process, mut lines) = common::start_ready(node, "node (Node.js 20)");
    let pid = process.0.id();
    let (head, body) =
        common::http_post_raw(LISTEN, &format!("/api/v1/holders?pid={pid}&duration_s=5")).expect("answer");
    assert!(head.contains(" 200 ") && head.contains("application/json"), "{head}\n{body}");
    let report: Value = serde_json::from_str(&body).expect("JSON");
    let p = &report["processes"][0];
    assert_eq!(p["holders"][0]["root"], serde_json::json!({"kind": "closure", "name": "cache"}), "{p}");
    assert!(p["pause_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{p}");
    let (head, body) =
        common::http_post_raw(LISTEN, &format!("/api/v1/holders?pid={pid}&duration_s=0")).expect("answer");
    assert!(head.contains(" 400 ") && body.contains("duration_s must be"), "{head}\n{body}");
    assert_eq!(listening(pid), 0, "the inspector is closed again");
    answers(&mut process, &mut lines);
}

/// A snapshot estimated to hold the process past the budget is not taken: one line,
/// the inspector closed again, the process answering.
#[test]
fn a_snapshot_past_the_budget_is_refused_in_one_line() {
    let mut node = std::process::Command::new("node");
    node.args(["--inspect-port=127.0.0.1:9344", &common::runtimes::node_fixture(), "grow"])
        .stderr(std::process::Stdio::null());
    let (mut process, mut lines) = common::start_ready(node, "node (Node.js 20)");
    let pid = process.0.id();
    let out = common::leakmon()
        .args(["report", "--holders", "--holders-budget", "1", "--duration", "2", "--pid", &pid.to_string()])
        .output()
        .expect("run leakmon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("would hold it still for about") && stderr.contains("none was taken"),
        "{stderr}"
    );
    let start = std::time::Instant::now();
    while listening(pid) > 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "the inspector stayed open");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    answers(&mut process, &mut lines);
}

//! Allocators other than glibc's, found per process from the files it maps: preloaded
//! (jemalloc, tcmalloc, mimalloc), linked (Debian's redis-server with jemalloc) and
//! static (a musl program). Each process's leaks come out exactly, its frees are seen
//! (no phantom leak), and its allocator is named in the report and the metrics.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    build_fixture, build_fixture_with, by_function, expected, http_get, leakmon, parse_report, processes,
    report_json, system_library, Reap, LEAKS,
};

fn the_process(report: &serde_json::Value) -> &serde_json::Value {
    let procs = processes(report);
    assert_eq!(procs.len(), 1, "one process: {report:#}");
    &procs[0]
}

/// The named functions of a stack's frames, innermost first.
fn function_names(stack: &serde_json::Value) -> Vec<&str> {
    stack["frames"].as_array().expect("frames").iter().filter_map(|f| f["function"].as_str()).collect()
}

#[test]
fn preloaded_allocators_are_accounted_exactly() {
    let fixture = build_fixture("leaks.c", &[]);
    for (library, allocator) in [
        ("libjemalloc.so.2", "jemalloc"),
        ("libtcmalloc_minimal.so.4", "tcmalloc"),
        ("libmimalloc.so.2", "mimalloc"),
    ] {
        let preload = system_library(library);
        // The way a service unit or a shell sets it: on the command, through env.
        let mut env = vec![format!("LD_PRELOAD={}", preload.display()).into()];
        env.push(fixture.clone().into_os_string());
        let args: Vec<std::ffi::OsString> =
            [std::ffi::OsString::from("env")].into_iter().chain(env).collect();
        let report = report_json(&args.iter().map(std::ffi::OsString::as_os_str).collect::<Vec<_>>());
        let process = the_process(&report);
        assert_eq!(process["allocator"], allocator, "{library}: {process:#}");
        assert_eq!(by_function(process, "leaks.c"), expected(LEAKS), "{library}: per-function unfreed");
        assert_eq!(process["incomplete"], false);
    }
}

#[test]
fn libraries_loaded_with_dlopen_are_probed_and_walked() {
    let plugin = build_fixture("plugin.c", &["-shared", "-fPIC"]);
    let binary = build_fixture("dlopen_leaks.c", &["-fomit-frame-pointer", "-ldl"]);
    let report = report_json(&[binary.as_os_str(), plugin.as_os_str()]);
    let process = the_process(&report);
    // tcmalloc, dlopened and called through dlsym, is found and probed; the plugin's
    // libc blocks are named in the plugin, walked through its unwind tables to main.
    assert_eq!(by_function(process, "dlopen_leaks.c"), expected(&[("leak_tc", 28_800, 300)]), "{process:#}");
    assert_eq!(by_function(process, "plugin.c"), expected(&[("plugin_leak", 12_800, 200)]), "{process:#}");
    for stack in process["stacks"].as_array().expect("stacks") {
        if stack["site"]["function"] == "plugin_leak" {
            let names = function_names(stack);
            assert!(names.contains(&"main"), "the plugin's stack reaches main: {names:?}");
        }
    }
}

#[test]
fn a_library_without_symbols_is_walked_and_its_unnamed_site_counted() {
    let built = build_fixture("plugin_hidden.c", &["-shared", "-fPIC"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let plugin = dir.path().join("libhidden.so");
    std::fs::copy(&built, &plugin).expect("copy");
    assert!(Command::new("strip").arg("--strip-all").arg(&plugin).status().expect("strip").success());
    let binary = build_fixture("dlopen_leaks.c", &["-fomit-frame-pointer", "-ldl"]);
    let report = report_json(&[binary.as_os_str(), plugin.as_os_str()]);
    let process = the_process(&report);
    let through_plugin: Vec<&serde_json::Value> = process["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["frames"].as_array().expect("frames").iter().any(|f| f["function"] == "plugin_leak"))
        .collect();
    let total = |key: &str| through_plugin.iter().map(|s| s[key].as_u64().expect(key)).sum::<u64>();
    assert_eq!((total("bytes"), total("allocations")), (16_000, 200), "{process:#}");
    for stack in through_plugin {
        // The hidden function has no name: it is the site, by its address, and the walk
        // goes on through its unwind table to the exported caller and main.
        let site = &stack["site"];
        assert!(site["function"] == "??" && site["address"].is_string(), "{stack:#}");
        let names = function_names(stack);
        assert!(names.contains(&"main"), "{names:?}");
    }
}

#[test]
fn a_preload_inherited_by_the_command_is_probed_before_it_runs() {
    let fixture = build_fixture("leaks.c", &[]);
    let out = leakmon()
        .env("LD_PRELOAD", system_library("libtcmalloc_minimal.so.4"))
        .args(["report", "--format", "json", "--"])
        .arg(&fixture)
        .output()
        .expect("run leakmon");
    let report = parse_report(&out);
    let process = the_process(&report);
    assert_eq!(process["allocator"], "tcmalloc");
    assert_eq!(by_function(process, "leaks.c"), expected(LEAKS));
}

#[test]
fn a_static_musl_program_is_accounted_exactly() {
    let fixture = build_fixture_with("musl-gcc", "leaks.c", &["-static"]);
    let report = report_json(&[fixture.as_os_str()]);
    let process = the_process(&report);
    assert_eq!(process["allocator"], "musl", "{process:#}");
    assert_eq!(by_function(process, "leaks.c"), expected(LEAKS), "per-function unfreed");
}

struct Redis {
    _server: Reap,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    pid: u32,
}

impl Redis {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("redis.sock");
        let server = Reap(
            Command::new("redis-server")
                .args([
                    "--port",
                    "0",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--enable-debug-command",
                    "yes",
                    "--dir",
                ])
                .arg(dir.path())
                .arg("--unixsocket")
                .arg(&socket)
                .stdout(Stdio::null())
                .spawn()
                .expect("start redis-server (cargo xtask setup --tests installs it)"),
        );
        let pid = server.0.id();
        let redis = Self { _server: server, socket, _dir: dir, pid };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cli(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    fn cli(&self, args: &[&str]) -> String {
        let out =
            Command::new("redis-cli").arg("-s").arg(&self.socket).args(args).output().expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

#[test]
fn redis_server_with_jemalloc_is_accounted_and_its_frees_seen() {
    let redis = Redis::start();
    let mut report = Reap(
        leakmon()
            .env("RUST_LOG", "info")
            .args(["report", "--format", "json", "--duration", "120", "--pid"])
            .arg(redis.pid.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start leakmon"),
    );
    // The probes are in place once it says it is watching.
    let mut stderr = BufReader::new(report.0.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("watching") {
        line.clear();
        assert!(stderr.read_line(&mut line).expect("read stderr") > 0, "leakmon ended early");
    }
    // 20,000 keys with 100-byte values kept in db 1; 10,000 more made and flushed in
    // db 2, whose frees must all be seen.
    assert_eq!(redis.cli(&["-n", "1", "DEBUG", "POPULATE", "20000", "kept", "100"]), "OK");
    assert_eq!(redis.cli(&["-n", "2", "DEBUG", "POPULATE", "10000", "gone", "100"]), "OK");
    assert_eq!(redis.cli(&["-n", "2", "FLUSHDB", "SYNC"]), "OK");
    // The window ends once the flush is done, however long a loaded host took to get
    // there (a fixed 6 s window once ended before the flush: 30,000 frees unseen).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(report.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("end the window");
    let out = report.0.wait_with_output_keep();
    let report = parse_report(&out);
    let process = the_process(&report);
    assert_eq!(process["allocator"], "jemalloc");
    let bytes = process["outstanding_bytes"].as_u64().expect("bytes");
    let allocations = process["outstanding_allocations"].as_u64().expect("allocations");
    eprintln!("redis: {bytes} bytes in {allocations} allocations unfreed");
    // Each kept key holds at least its 100-byte value, its key and its dict entry; had
    // the flushed keys' frees been missed, 10,000 more of each would remain.
    assert!(bytes >= 20_000 * 100, "{bytes}");
    assert!((80_000..84_000).contains(&allocations), "{allocations} allocations");
    assert!((20_000 * 160..20_000 * 200).contains(&bytes), "{bytes} bytes");

    // Redis (built without frame pointers) allocates through zmalloc: the sites are the
    // Redis functions that made the keys and values, past the wrappers.
    let stacks = process["stacks"].as_array().expect("stacks");
    for s in stacks.iter().take(5) {
        let frames: Vec<&str> = s["frames"]
            .as_array()
            .expect("frames")
            .iter()
            .map(|f| f["function"].as_str().unwrap_or(""))
            .collect();
        eprintln!(
            "{:>9} B {:>6} allocs  site {}  stack {}",
            s["bytes"],
            s["allocations"],
            s["site"]["function"],
            frames.join(" < ")
        );
    }
    let top = &stacks[0];
    let site = top["site"]["function"].as_str().expect("site");
    assert!(
        !site.starts_with('z') && !site.starts_with("sds") && !site.starts_with("_sds") && site != "??",
        "top site {site}: {top:#}"
    );
    let frames = top["frames"].as_array().expect("frames");
    assert!(frames.len() >= 4, "a full stack: {top:#}");
    assert!(
        frames.iter().any(|f| f["function"].as_str().is_some_and(|n| n.contains("Command"))),
        "reaches the command that populated the keys: {top:#}"
    );
}

trait WaitKeep {
    fn wait_with_output_keep(&mut self) -> std::process::Output;
}

impl WaitKeep for std::process::Child {
    fn wait_with_output_keep(&mut self) -> std::process::Output {
        let mut stdout = Vec::new();
        std::io::Read::read_to_end(self.stdout.as_mut().expect("stdout"), &mut stdout).expect("read stdout");
        let status = self.wait().expect("wait");
        std::process::Output { status, stdout, stderr: Vec::new() }
    }
}

#[test]
fn the_daemon_names_each_process_allocator() {
    let redis = Redis::start();
    let listen = "127.0.0.1:19487";
    let _daemon = common::start_daemon(
        &["--attach", "pids", "--pid", &redis.pid.to_string(), "--sample-interval", "0.2s", "--window", "4s"],
        listen,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = http_get(listen, "/metrics").unwrap_or_default();
        if metrics.lines().any(|l| {
            l.starts_with("leakmon_allocator_info{")
                && l.contains("allocator=\"jemalloc\"")
                && l.contains("comm=\"redis-server\"")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "no allocator_info for redis-server:\n{metrics}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let series = http_get(listen, "/api/v1/processes").expect("processes");
    assert!(series.contains("\"allocator\":\"jemalloc\""), "{series}");
}

//! A process in mount and PID namespaces of its own (a container, as far as the kernel
//! is concerned), whose libc is a bind-mounted copy at the path the host's has: leakmon
//! must find that copy through /proc/PID/root and probe it, not the host's file.

mod common;

use common::{build_fixture, by_function, expected, processes, report_json, LEAKS};

#[test]
fn a_namespaced_process_with_a_bind_mounted_libc_is_accounted_exactly() {
    let fixture = build_fixture("leaks.c", &[]);
    // The host's own path for it (discovery names it through /proc/PID/root, which the
    // new namespace's /proc does not have).
    let libc = std::fs::canonicalize(common::system_libc()).expect("resolve libc");
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("libc.so.6");
    std::fs::copy(&libc, &copy).expect("copy libc");
    let script = format!("mount --bind {} {} && exec {}", copy.display(), libc.display(), fixture.display());
    let report = report_json(&[
        "unshare".as_ref(),
        "--mount".as_ref(),
        "--pid".as_ref(),
        "--fork".as_ref(),
        "--mount-proc".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        script.as_ref(),
    ]);
    let leaks = processes(&report)
        .iter()
        .find(|p| p["comm"] == "leaks")
        .unwrap_or_else(|| panic!("the fixture is reported: {report:#}"));
    assert_eq!(by_function(leaks, "leaks.c"), expected(LEAKS), "{leaks:#}");
    assert_eq!(leaks["allocator"], "glibc");
    // Its stacks go through the copy's unwind tables down to _start.
    let small =
        leaks["stacks"].as_array().expect("stacks").iter().find(|s| s["site"]["function"] == "leak_small");
    let frames = small.expect("leak_small")["frames"].as_array().expect("frames");
    assert_eq!(frames.last().expect("frames")["function"], "_start", "{frames:#?}");
}

/// `report --agent --pid` on a C service in a real container (podman, runc, its own
/// mount, pid and network namespaces, podman's default seccomp profile): the filter is
/// read and lets the load through, the agent's file (not in the container's file
/// system) is copied into a memory file of the process and loaded from there, and the
/// leaking function is named with its bytes; afterwards the container's process has
/// no descriptor, tracer or file of leakmon's and works.
#[test]
fn the_agent_names_a_leak_in_a_container_under_its_default_seccomp_profile() {
    use common::podman::{image, Container};
    let fixture = build_fixture("seccomp_target.c", &[]);
    let image = image(std::slice::from_ref(&fixture));
    let inside = fixture.display().to_string();
    let container = Container::run("leakmon-test-agent-c", &image, &[], &[&inside, "default"]);
    container.wait_for("ready", 1);
    agent_names_the_leak(&container);
}

/// A statically linked service in a real container (its image holds the program
/// only): the freestanding agent is copied into a memory file of the process, mapped
/// from there by syscalls leakmon runs in it, and hooks its allocator inline; the
/// leaking function is named with its bytes, and it works afterwards.
#[test]
fn the_freestanding_agent_names_a_leak_in_a_container_of_a_static_program() {
    use common::podman::{image, Container};
    let fixture = build_fixture("seccomp_target.c", &["-static"]);
    let image = image(std::slice::from_ref(&fixture));
    let inside = fixture.display().to_string();
    let container = Container::run("leakmon-test-agent-static", &image, &[], &[&inside, "default"]);
    container.wait_for("ready", 1);
    agent_names_the_leak(&container);
}

/// `report --agent` on the container's process while it leaks 30 rounds of 100 pages:
/// `leak_page` named with its bytes (sampled at 16 KiB: within a fifth), nothing of
/// leakmon's left in its descriptors or its /tmp, no tracer, and it answers.
fn agent_names_the_leak(container: &common::podman::Container) {
    let pid = container.pid;
    let fds_before = fds(pid);
    let tmp_before = tmp_of(pid);
    let mut watch = common::leakmon()
        .env("RUST_LOG", "info")
        .args(["report", "--agent", "--sample-bytes", "16KiB", "--format", "json", "--duration", "3"])
        .args(["--pid", &pid.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run leakmon");
    // Loaded, and its copy's markers probed (just after the load): its log says
    // "watching" then. The rest of the log is read on, so leakmon never blocks on it.
    let (seen, rest) = common::logged_until(&mut watch, "watching");
    let before = container.logs().lines().filter(|l| *l == "alive").count();
    for i in 1..=30 {
        common::signal(pid, nix::sys::signal::Signal::SIGUSR1);
        container.wait_for("alive", before + i);
    }
    let out = std::io::read_to_string(watch.stdout.take().expect("stdout")).expect("read the report");
    let status = watch.wait().expect("wait for leakmon");
    let stderr = rest.join().unwrap_or_default();
    assert!(status.success(), "{seen}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let p = &processes(&report)[0];
    let leaked: u64 = p["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["site"]["function"] == "leak_page")
        .map(|s| s["bytes"].as_u64().unwrap_or(0))
        .sum();
    let kept = 30 * 100 * 4096;
    assert!(
        (leaked as f64 - kept as f64).abs() < 0.2 * kept as f64,
        "{leaked} B of {kept} in leak_page: {p:#}"
    );
    assert_eq!(fds(pid), fds_before);
    assert_eq!(common::agent_state::tracer_of(pid), "0");
    assert_eq!(tmp_of(pid), tmp_before, "files in the container's /tmp");
    common::signal(pid, nix::sys::signal::Signal::SIGUSR1);
    container.wait_for("alive", before + 31);
}

/// A container whose seccomp profile refuses a mapping both writable and executable
/// (a profile of its own) is refused in one line naming the call, before any is
/// made: nothing is mapped into it, nobody traces it, and it works.
#[test]
fn a_container_whose_profile_refuses_a_load_s_mmap_is_refused_naming_it() {
    use common::podman::{image, profile_without_wx_mmap, Container};
    let fixture = build_fixture("seccomp_target.c", &[]);
    let image = image(std::slice::from_ref(&fixture));
    let dir = tempfile::tempdir().expect("temp dir");
    let profile = format!("seccomp={}", profile_without_wx_mmap(dir.path()).display());
    let inside = fixture.display().to_string();
    let container =
        Container::run("leakmon-test-no-wx", &image, &["--security-opt", &profile], &[&inside, "default"]);
    container.wait_for("ready", 1);
    let pid = container.pid;
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let out = common::leakmon()
        .args(["report", "--agent", "--format", "json", "--duration", "1", "--pid", &pid.to_string()])
        .output()
        .expect("run leakmon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("its seccomp filter would refuse (Operation not permitted) mmap (mapping of leakmon's scratch page (read, write, execute))"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps"), maps_before);
    assert_eq!(common::agent_state::tracer_of(pid), "0");
    common::signal(pid, nix::sys::signal::Signal::SIGUSR1);
    container.wait_for("alive", 1);
}

/// What the container of `pid` holds in its /tmp (the image may hold the test's own
/// files there, where the build's directory is).
fn tmp_of(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/tmp"))
        .expect("its /tmp")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The descriptors `pid` has open, by number and target.
fn fds(pid: u32) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), target)
        })
        .collect();
    all.sort();
    all
}

/// A Python service in a real container (Debian's python3.11 in an image of its own,
/// podman's default seccomp profile): the agent is loaded from its memory-file copy,
/// the kernel walks the interpreter's frames read through the container's root, and
/// the growing cache's bytes are named by its Python lines; `report --holders` then
/// names the global `cache` that holds them. Afterwards the container works.
#[test]
fn a_python_service_in_a_container_is_named_by_its_lines_and_its_holder() {
    use common::podman::{image, python_files, Container};
    let fixture = common::fixtures_dir().join("python/cache_leak.py");
    let mut files = python_files();
    files.push(fixture.clone());
    let image = image(&files);
    let script = fixture.display().to_string();
    let container =
        Container::run("leakmon-test-python", &image, &[], &["/usr/bin/python3.11", &script, "grow", "2000"]);
    container.wait_for("ready", 1);
    let pid = container.pid;
    let source = std::fs::read_to_string(&fixture).expect("the fixture");
    let line = |needle: &str| source.lines().position(|l| l.contains(needle)).expect("the line") as u64 + 1;
    let (make, keep) = (line("return (\"session-%d\""), line("cache[key] = value"));
    let out = common::leakmon()
        .args(["report", "--holders", "--format", "json", "--duration", "8", "--pid", &pid.to_string()])
        .output()
        .expect("run leakmon");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let p = &processes(&report)[0];
    assert_eq!(report["method"], "agent", "{p:#}");
    let total = p["outstanding_bytes"].as_u64().expect("bytes");
    let of_lines = common::bytes_in_stacks(p, |frames| {
        frames.iter().any(|f| {
            f["runtime"] == "python"
                && ((f["function"] == "make_entry" && f["line"] == make)
                    || (f["function"] == "remember" && f["line"] == keep))
        })
    });
    let holders = p["holders"].as_array().expect("holders");
    let cache = common::runtimes::held_share(holders, "bytes", total, |h| {
        h["root"] == serde_json::json!({"kind": "global", "name": "cache", "scope": "__main__"})
    });
    eprintln!(
        "python in a container: {total} B, {of_lines} B in the cache's lines, {:.0}% held by cache",
        cache * 100.0
    );
    assert!(of_lines as f64 >= 0.6 * total as f64, "{of_lines} of {total} B in the cache's lines: {p:#}");
    assert!(cache >= 0.6, "held by cache: {cache:.2}");
    assert_eq!(common::agent_state::tracer_of(pid), "0");
    assert!(container.running());
}

/// Two Node.js services in real containers at once, each in its own network namespace
/// with its inspector on the same port (9229): `report --holders` on each, at the same
/// time, reaches each one's own inspector (in its namespace) and names its `cache`;
/// afterwards neither listens on any port.
#[test]
fn two_node_services_in_containers_each_get_their_own_inspector() {
    use common::podman::{image, node_files, Container};
    let fixture = common::fixtures_dir().join("node/cache_leak.js");
    let mut files = node_files();
    files.push(fixture.clone());
    let image = image(&files);
    let script = fixture.display().to_string();
    let containers: Vec<Container> = ["leakmon-test-node-a", "leakmon-test-node-b"]
        .iter()
        .map(|name| Container::run(name, &image, &[], &["/usr/bin/node", &script, "grow"]))
        .collect();
    for c in &containers {
        c.wait_for("ready", 1);
    }
    let reports: Vec<std::process::Child> = containers
        .iter()
        .map(|c| {
            common::leakmon()
                .args([
                    "report",
                    "--holders",
                    "--format",
                    "json",
                    "--duration",
                    "6",
                    "--pid",
                    &c.pid.to_string(),
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run leakmon")
        })
        .collect();
    for (c, report) in containers.iter().zip(reports) {
        let out = report.wait_with_output().expect("wait for leakmon");
        assert!(out.status.success(), "{}: {}", c.name, String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let p = &processes(&report)[0];
        assert_eq!(p["pid"], c.pid);
        let total = p["outstanding_bytes"].as_u64().expect("bytes");
        let holders = p["holders"].as_array().expect("holders");
        let cache = common::runtimes::held_share(holders, "bytes", total, |h| h["root"]["name"] == "cache");
        eprintln!("{}: {total} B, {:.0}% through cache", c.name, cache * 100.0);
        assert!(cache >= 0.6, "{}: {cache:.2} through cache", c.name);
        assert_eq!(common::runtimes::listening(c.pid), 0, "{}: a port left open", c.name);
        assert!(c.running());
    }
}

/// A JVM in a real container (OpenJDK 17 in an image of its own): HotSpot's attach
/// protocol is spoken through the container's root and its pid namespace's number of
/// the process, and `report --holders` names the static field `CacheLeak.CACHE`;
/// afterwards nothing of leakmon's is in the container's /tmp and it runs.
#[test]
fn a_jvm_in_a_container_is_asked_through_its_namespaces() {
    use common::podman::{image, jvm_files, Container};
    // The classes at a path of their own, the same each run (one image).
    let classes = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("container-classes");
    std::fs::create_dir_all(&classes).expect("a directory for the classes");
    for e in std::fs::read_dir(common::runtimes::classes()).expect("the classes").flatten() {
        std::fs::copy(e.path(), classes.join(e.file_name())).expect("copy a class");
    }
    let mut files = jvm_files();
    files.push(classes.clone());
    let image = image(&files);
    let cp = classes.display().to_string();
    let java = "/usr/lib/jvm/java-17-openjdk-amd64/bin/java";
    let container = Container::run("leakmon-test-jvm", &image, &[], &[java, "-cp", &cp, "CacheLeak"]);
    container.wait_for("ready", 1);
    let pid = container.pid;
    let out = common::leakmon()
        .args(["report", "--holders", "--format", "json", "--duration", "8", "--pid", &pid.to_string()])
        .output()
        .expect("run leakmon");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let p = &processes(&report)[0];
    let objects = p["outstanding_allocations"].as_u64().expect("objects");
    let holders = p["holders"].as_array().expect("holders");
    let cache =
        common::runtimes::held_share(holders, "objects", objects, |h| h["root"]["name"] == "CacheLeak.CACHE");
    eprintln!("jvm in a container: {objects} samples, {:.0}% through CacheLeak.CACHE", cache * 100.0);
    assert!(cache >= 0.6, "{cache:.2} through CacheLeak.CACHE: {p:#}");
    let left: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/tmp"))
        .expect("its /tmp")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".attach_pid") || n.ends_with(".jfr"))
        .collect();
    assert!(left.is_empty(), "left in the container's /tmp: {left:?}");
    assert!(container.running());
}

/// The daemon's series for a service in a real container carry its container:
/// `leakmon_container_info` names podman and the container's full id for the service
/// and command, read from the process's cgroup path.
#[test]
fn the_daemon_names_the_container_of_a_containerized_service() {
    use common::podman::{image, Container};
    const LISTEN: &str = "127.0.0.1:19634";
    let fixture = build_fixture("seccomp_target.c", &[]);
    let image = image(std::slice::from_ref(&fixture));
    let inside = fixture.display().to_string();
    let container = Container::run("leakmon-test-daemon-c", &image, &[], &[&inside, "default"]);
    container.wait_for("ready", 1);
    let _daemon = common::start_daemon(&["--comm", "seccomp_target", "--sample-interval", "0.5s"], LISTEN);
    let wanted = format!("container=\"{}\"", container.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut metrics = String::new();
    while std::time::Instant::now() < deadline {
        metrics = common::http_get(LISTEN, "/metrics").unwrap_or_default();
        if let Some(line) =
            metrics.lines().find(|l| l.starts_with("leakmon_container_info{") && l.contains(&wanted))
        {
            assert!(
                line.contains("runtime=\"podman\"") && line.contains("pod_uid=\"\"") && line.ends_with(" 1"),
                "{line}"
            );
            assert!(line.contains("comm=\"seccomp_target\""), "{line}");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let info: Vec<&str> = metrics.lines().filter(|l| l.contains("container_info")).collect();
    panic!("no leakmon_container_info with {wanted}: {info:#?}");
}

/// leakmon itself in a container, run as the shipped DaemonSet runs it: the host's pid
/// namespace, only the capabilities the manifest adds (read from it), a read-only root
/// with the manifest's in-memory volume at /run/leakmon, no seccomp or AppArmor
/// profile, the kernel's file systems mounted in. `report --agent` from there on a
/// process of the host (another mount namespace, seen from the container) copies the
/// agent into it and names its leak.
#[test]
fn leakmon_in_a_container_as_the_daemonset_runs_it_names_a_host_process_s_leak() {
    use common::podman::image;
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/leakmon.yaml"),
    )
    .expect("the manifest");
    for setting in
        ["hostPID: true", "readOnlyRootFilesystem: true", "mountPath: /run/leakmon", "medium: Memory"]
    {
        assert!(manifest.contains(setting), "the manifest no longer says {setting:?}: this test follows it");
    }
    let caps = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: [")?.strip_suffix(']').map(str::to_owned))
        .expect("the capabilities the manifest adds");
    let caps: Vec<String> = caps.split(',').map(|c| c.trim().trim_matches('"').to_owned()).collect();
    let leakmon = std::path::PathBuf::from(env!("CARGO_BIN_EXE_leakmon"));
    let mut files = vec![leakmon.clone()];
    files.extend(
        ["libgcc_s.so.1", "libm.so.6"].map(|l| std::path::Path::new("/lib/x86_64-linux-gnu").join(l)),
    );
    let image = image(&files);
    let fixture = build_fixture("seccomp_target.c", &[]);
    let mut target = common::Reap(
        std::process::Command::new(&fixture)
            .arg("default")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start"),
    );
    let pid = target.0.id();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(target.0.stdout.take().expect("stdout")));
    assert_eq!(lines.next().expect("a line").expect("read"), "ready");
    let mut podman = std::process::Command::new("podman");
    podman
        .args(["run", "--rm", "--runtime", "runc", "--pid=host", "--network", "none", "--read-only"])
        .args(["--tmpfs", "/run/leakmon", "--cap-drop=ALL", &format!("--cap-add={}", caps.join(","))])
        .args(["--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"])
        .args(["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096", "-e", "RUST_LOG=info"])
        .args([
            "-v",
            "/sys/kernel/tracing:/sys/kernel/tracing:ro",
            "-v",
            "/sys/kernel/debug:/sys/kernel/debug:ro",
        ])
        .args(["-v", "/sys/fs/bpf:/sys/fs/bpf", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro"])
        .arg(&image)
        .arg(&leakmon)
        .args(["report", "--agent", "--sample-bytes", "16KiB", "--format", "json", "--duration", "4"])
        .args(["--pid", &pid.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut watch = podman.spawn().expect("run podman");
    let (seen, rest) = common::logged_until(&mut watch, "watching");
    for _ in 0..20 {
        common::signal(pid, nix::sys::signal::Signal::SIGUSR1);
        assert_eq!(lines.next().expect("a line").expect("read"), "alive");
    }
    let out = std::io::read_to_string(watch.stdout.take().expect("stdout")).expect("read the report");
    let status = watch.wait().expect("wait for podman");
    let stderr = rest.join().unwrap_or_default();
    assert!(status.success(), "{seen}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let p = &processes(&report)[0];
    let leaked: u64 = p["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["site"]["function"] == "leak_page")
        .map(|s| s["bytes"].as_u64().unwrap_or(0))
        .sum();
    let kept = 20 * 100 * 4096;
    assert!(
        (leaked as f64 - kept as f64).abs() < 0.2 * kept as f64,
        "{leaked} B of {kept} in leak_page: {p:#}"
    );
    assert_eq!(common::agent_state::tracer_of(pid), "0");
    common::signal(pid, nix::sys::signal::Signal::SIGUSR1);
    assert_eq!(lines.next().expect("a line").expect("read"), "alive");
}

/// leakmon SIGKILLed mid-load, while watching, while pacing and at once, on services
/// in real containers (a C program, dynamic and static, and a Python one): each time
/// its guardian puts the process back (no tracer, no descriptor of leakmon's left: the
/// memory file's is closed on every path), it works, and a later report loads the
/// agent again (nothing was left sampling).
#[test]
fn leakmon_killed_while_loading_into_a_container_leaves_it_as_it_was() {
    use common::podman::{image, python_files, Container};
    for (name, flags) in
        [("leakmon-test-killed-c", &[][..]), ("leakmon-test-killed-static", &["-static"][..])]
    {
        let fixture = build_fixture("seccomp_target.c", flags);
        let image = image(std::slice::from_ref(&fixture));
        let inside = fixture.display().to_string();
        let container = Container::run(name, &image, &[], &[&inside, "default"]);
        container.wait_for("ready", 1);
        killed_at_each_moment(&container, &|round| {
            common::signal(container.pid, nix::sys::signal::Signal::SIGUSR1);
            container.wait_for("alive", round);
        });
    }
    let script = common::fixtures_dir().join("python/cache_leak.py");
    let mut files = python_files();
    files.push(script.clone());
    let image = image(&files);
    let script = script.display().to_string();
    let python = Container::run(
        "leakmon-test-killed-python",
        &image,
        &[],
        &["/usr/bin/python3.11", &script, "grow", "500"],
    );
    python.wait_for("ready", 1);
    killed_at_each_moment(&python, &|_| assert!(python.running(), "the Python service ended"));
}

/// leakmon's `report --agent` on the container's process SIGKILLed at each moment;
/// after each, `works(round)` (1, 2, ...) checks it works.
fn killed_at_each_moment(container: &common::podman::Container, works: &dyn Fn(usize)) {
    use common::agent_state::{guardian_of, kill_agent_report_at, tracer_of, KILL_MOMENTS};
    let pid = container.pid;
    let fds_before = fds(pid);
    for (i, moment) in KILL_MOMENTS.iter().enumerate() {
        kill_agent_report_at(pid, moment, || {});
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while guardian_of(pid).is_some() || tracer_of(pid) != "0" {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: {moment}: the guardian did not finish",
                container.name
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(fds(pid), fds_before, "{}: {moment}", container.name);
        works(i + 1);
    }
    let out = common::leakmon()
        .args(["report", "--agent", "--format", "json", "--duration", "1", "--pid", &pid.to_string()])
        .output()
        .expect("run leakmon");
    assert!(out.status.success(), "{}: {}", container.name, String::from_utf8_lossy(&out.stderr));
    assert_eq!(fds(pid), fds_before, "{}", container.name);
}

/// A Node.js container and a JVM container started for the runtime tests.
fn runtime_containers(node: &str, jvm: &str) -> (common::podman::Container, common::podman::Container) {
    use common::podman::{image, jvm_files, node_files, Container};
    let script = common::fixtures_dir().join("node/cache_leak.js");
    let mut files = node_files();
    files.push(script.clone());
    let node_image = image(&files);
    let script = script.display().to_string();
    let node = Container::run(node, &node_image, &[], &["/usr/bin/node", &script, "grow"]);
    let classes = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("container-classes");
    std::fs::create_dir_all(&classes).expect("a directory for the classes");
    for e in std::fs::read_dir(common::runtimes::classes()).expect("the classes").flatten() {
        std::fs::copy(e.path(), classes.join(e.file_name())).expect("copy a class");
    }
    let mut files = jvm_files();
    files.push(classes.clone());
    let jvm_image = image(&files);
    let cp = classes.display().to_string();
    let java = "/usr/lib/jvm/java-17-openjdk-amd64/bin/java";
    let jvm = Container::run(jvm, &jvm_image, &[], &[java, "-cp", &cp, "CacheLeak"]);
    node.wait_for("ready", 1);
    jvm.wait_for("ready", 1);
    (node, jvm)
}

/// What leakmon may leave in a JVM's container: trigger files and recordings in its
/// /tmp, and recordings `jcmd JFR.check` lists.
fn left_in_jvm(pid: u32) -> Vec<String> {
    let mut left: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/tmp"))
        .expect("its /tmp")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".attach_pid") || n.ends_with(".jfr"))
        .collect();
    if common::runtimes::recordings(pid).contains("leakmon") {
        left.push("a recording".into());
    }
    left
}

/// Whether a frame is one of the fixture's own.
type Ours = dyn Fn(&serde_json::Value) -> bool;

/// The runtimes' own profilers in real containers (`report --runtime`): V8's sampling
/// heap profiler through the Node.js inspector in its network namespace, and JFR
/// through HotSpot's attach protocol; each names the script's or the program's
/// growing cache, and afterwards no port is open and no recording or file is left.
#[test]
fn the_runtime_profilers_work_in_containers() {
    let (node, jvm) = runtime_containers("leakmon-test-runtime-node", "leakmon-test-runtime-jvm");
    // Node.js names a frame's script; JFR a method by its class (`CacheLeak.remember`).
    let in_node = |f: &serde_json::Value| f["file"].as_str().is_some_and(|f| f.ends_with("cache_leak.js"));
    let in_jvm = |f: &serde_json::Value| f["function"].as_str().is_some_and(|f| f.starts_with("CacheLeak."));
    let cases: [(&common::podman::Container, &str, &Ours); 2] =
        [(&node, "node", &in_node), (&jvm, "jvm", &in_jvm)];
    for (c, runtime, ours) in cases {
        let out = common::runtimes::runtime_report(c.pid, "8", &[]);
        assert!(out.status.success(), "{runtime}: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let p = &processes(&report)[0];
        assert_eq!(p["runtime"], runtime, "{p:#}");
        let total = p["outstanding_bytes"].as_u64().expect("bytes");
        let named = common::bytes_in_stacks(p, |frames| frames.iter().any(ours));
        eprintln!("{runtime} in a container: {total} B, {named} B in the fixture's frames");
        assert!(
            total > 0 && named as f64 >= 0.5 * total as f64,
            "{runtime}: {named} of {total} B in the fixture"
        );
    }
    assert_eq!(common::runtimes::listening(node.pid), 0, "the inspector is closed");
    assert_eq!(left_in_jvm(jvm.pid), Vec::<String>::new());
    assert!(node.running() && jvm.running());
}

/// leakmon SIGKILLed in the middle of a runtime's window in a real container: its
/// guardian closes the Node.js inspector (in the container's network namespace) and
/// stops and removes the JVM's recording; both run on.
#[test]
fn leakmon_killed_mid_window_leaves_containerized_runtimes_as_they_were() {
    let (node, jvm) = runtime_containers("leakmon-test-killed-node", "leakmon-test-killed-jvm");
    for (c, mid_window) in [(&node, "first heap snapshot taken"), (&jvm, "JFR recording started")] {
        let mut watch = common::leakmon()
            .env("RUST_LOG", "info")
            .args([
                "report",
                "--holders",
                "--format",
                "json",
                "--duration",
                "60",
                "--pid",
                &c.pid.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start leakmon");
        let mut stderr = std::io::BufReader::new(watch.stderr.take().expect("stderr"));
        let mut log = String::new();
        while !log.contains(mid_window) {
            assert!(std::io::BufRead::read_line(&mut stderr, &mut log).expect("read") > 0, "{log}");
        }
        watch.kill().expect("SIGKILL leakmon");
        watch.wait().expect("reap");
    }
    let start = std::time::Instant::now();
    while common::runtimes::listening(node.pid) > 0 || !left_in_jvm(jvm.pid).is_empty() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "left: {} ports, {:?}",
            common::runtimes::listening(node.pid),
            left_in_jvm(jvm.pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(node.running() && jvm.running());
}

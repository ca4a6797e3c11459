//! Shared helpers of the real-eBPF tests: build C fixtures, run leakmon, read its JSON.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Mutex, OnceLock},
};

use serde_json::Value;

pub mod agent_state;
pub mod podman;
pub mod runtimes;

pub fn leakmon() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leakmon"));
    cmd.env_remove("RUST_LOG");
    cmd
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn build_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
        std::fs::create_dir_all(&dir).expect("create fixture build dir");
        dir
    })
}

/// Compiles `tests/fixtures/<source>` with frame pointers and without the builtins that
/// would let the compiler delete malloc/free pairs. Returns the binary's path. Each
/// fixture is built once per test binary, into a temporary name renamed into place, so
/// a test never executes a file another is still writing.
pub fn build_fixture(source: &str, extra: &[&str]) -> PathBuf {
    let cpp = Path::new(source).extension().is_some_and(|e| e.eq_ignore_ascii_case("cpp"));
    build_fixture_with(if cpp { "g++" } else { "gcc" }, source, extra)
}

/// [`build_fixture`] with another compiler driver (`musl-gcc`).
pub fn build_fixture_with(compiler: &str, source: &str, extra: &[&str]) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let key = format!("{compiler} {source} {}", extra.join(" "));
    let mut built = BUILT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(path) = built.get(&key) {
        return path.clone();
    }
    let src = fixtures_dir().join(source);
    let stem = Path::new(source).file_stem().expect("stem").to_string_lossy().into_owned();
    let mut tag = if extra.is_empty() {
        String::new()
    } else {
        format!("-{}", extra.join("").replace(['-', '=', '/'], ""))
    };
    if !matches!(compiler, "gcc" | "g++") {
        tag = format!("-{compiler}{tag}");
    }
    let out = build_dir().join(format!("{stem}{tag}"));
    let tmp = build_dir().join(format!(".{stem}{tag}.{}", std::process::id()));
    let status = Command::new(compiler)
        .args([
            "-O2",
            "-g",
            "-fno-omit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-fno-builtin",
            "-pthread",
            "-o",
        ])
        .arg(&tmp)
        .arg(&src)
        .args(extra)
        .status()
        .unwrap_or_else(|e| panic!("run {compiler}: {e}"));
    assert!(status.success(), "{compiler} failed on {source}");
    std::fs::rename(&tmp, &out).expect("move fixture into place");
    built.insert(key, out.clone());
    out
}

/// Runs `leakmon report --format json -- <command>` and parses its report.
pub fn report_json(command: &[&std::ffi::OsStr]) -> Value {
    let out =
        leakmon().args(["report", "--format", "json", "--"]).args(command).output().expect("run leakmon");
    parse_report(&out)
}

pub fn parse_report(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "leakmon failed: {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("report is not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
}

/// Per allocation site in the fixture source `file`: (bytes, allocations). Stacks whose
/// site lies elsewhere (libc's own blocks, the dynamic linker's thread storage) are left
/// out.
pub fn by_function(process: &Value, file: &str) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for stack in process["stacks"].as_array().expect("stacks") {
        let frame = &stack["site"];
        if !frame["file"].as_str().is_some_and(|p| p.ends_with(file)) {
            continue;
        }
        let entry = out.entry(frame["function"].as_str().expect("function").to_owned()).or_insert((0, 0));
        entry.0 += stack["bytes"].as_u64().expect("bytes");
        entry.1 += stack["allocations"].as_u64().expect("allocations");
    }
    out
}

/// The bytes of a reported process's stacks whose frames (innermost first) `stack`
/// accepts.
pub fn bytes_in_stacks(process: &Value, stack: impl Fn(&[Value]) -> bool) -> u64 {
    process["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| stack(s["frames"].as_array().expect("frames")))
        .map(|s| s["bytes"].as_u64().expect("bytes"))
        .sum()
}

/// A fixture's stdout, a line at a time.
pub type Lines = std::io::Lines<std::io::BufReader<std::process::ChildStdout>>;

/// Starts a fixture with its stdin and stdout piped, and waits for its "ready".
pub fn start_ready(mut command: std::process::Command, what: &str) -> (Reap, Lines) {
    use std::io::BufRead as _;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "ready", "{what}");
    (Reap(child), lines)
}

pub fn processes(report: &Value) -> &Vec<Value> {
    report["processes"].as_array().expect("processes")
}

pub fn expected(rows: &[(&str, u64, u64)]) -> BTreeMap<String, (u64, u64)> {
    rows.iter().map(|&(f, b, n)| (f.to_owned(), (b, n))).collect()
}

/// Kills and reaps a helper process when the test ends, passed or failed, so a failed
/// test leaves no process behind holding the test's output pipes.
pub struct Reap(pub std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Reap {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reap {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// GET `path` from `addr` over plain HTTP/1.0; the body of a 200 answer.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let (head, body) = http_get_raw(addr, path)?;
    head.contains(" 200 ").then_some(body)
}

/// GET `path` from `addr` over plain HTTP/1.0: the head and the body, whatever the status.
pub fn http_get_raw(addr: &str, path: &str) -> Option<(String, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((head.to_owned(), body.to_owned()))
}

/// POST `path` to `addr` over plain HTTP/1.0 with no body: the head and the body.
pub fn http_post_raw(addr: &str, path: &str) -> Option<(String, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).ok()?;
    write!(s, "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((head.to_owned(), body.to_owned()))
}

/// Starts `leakmon run ARGS --web.listen-address LISTEN` and waits until it serves.
pub fn start_daemon(args: &[&str], listen: &str) -> Reap {
    start_daemon_with(args, listen, std::process::Stdio::null())
}

/// [`start_daemon`], its log (`run` logs at info) in `log`, for a test to show when it
/// fails.
pub fn start_daemon_logged(args: &[&str], listen: &str, log: &Path) -> Reap {
    let file = std::fs::File::create(log).expect("create the daemon's log");
    start_daemon_with(args, listen, file.into())
}

fn start_daemon_with(args: &[&str], listen: &str, stderr: std::process::Stdio) -> Reap {
    let daemon = Reap(
        leakmon()
            .arg("run")
            .args(args)
            .args(["--web.listen-address", listen])
            .stderr(stderr)
            .spawn()
            .expect("start leakmon run"),
    );
    let up = std::time::Instant::now();
    while http_get(listen, "/healthz").is_none() {
        assert!(up.elapsed() < std::time::Duration::from_secs(30), "the daemon did not come up on {listen}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    daemon
}

/// Compiles the Rust fixture `tests/fixtures/<source>` with rustc's release defaults
/// (no frame pointers) and debug info. Returns the binary's path.
pub fn build_rust_fixture(source: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(path) = built.get(source) {
        return path.clone();
    }
    let stem = Path::new(source).file_stem().expect("stem").to_string_lossy().into_owned();
    let out = build_dir().join(&stem);
    let tmp = build_dir().join(format!(".{stem}.{}", std::process::id()));
    let status = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .args(["-O", "-C", "debuginfo=2", "-o"])
        .arg(&tmp)
        .arg(fixtures_dir().join(source))
        .status()
        .expect("run rustc");
    assert!(status.success(), "rustc failed on {source}");
    std::fs::rename(&tmp, &out).expect("move fixture into place");
    built.insert(source.to_owned(), out.clone());
    out
}

/// A copy of a fixture binary under another name, so it runs with that `comm`.
pub fn named(binary: &Path, name: &str) -> PathBuf {
    let path = binary.with_file_name(name);
    std::fs::copy(binary, &path).expect("copy fixture");
    path
}

/// What tests/fixtures/leaks.c leaks, per function: (bytes, allocations).
pub const LEAKS: &[(&str, u64, u64)] = &[
    ("leak_small", 48_000, 1000),
    ("leak_calloc", 32_000, 100),
    ("leak_realloc_chain", 2_621_440, 10),
    ("leak_realloc_null", 1000, 10),
    ("leak_posix_memalign", 12_800, 50),
    ("leak_aligned_alloc", 10_240, 20),
    ("leak_memalign", 5000, 5),
    ("leak_strdup", 2800, 200),
    ("leak_in_thread", 128_000, 2000),
];

/// A memory cgroup of its own with a limit, in the unified hierarchy where the host
/// has one, else in v1's memory controller; removed when dropped.
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    pub fn with_limit(name: &str, bytes: u64) -> Self {
        let (dir, limit_file) = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (PathBuf::from("/sys/fs/cgroup"), "memory.max")
        } else {
            (PathBuf::from("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")
        };
        let cgroup = Self(dir.join(name));
        // One left by a run that was killed would make the create fail.
        cgroup.remove();
        std::fs::create_dir(&cgroup.0).unwrap_or_else(|e| panic!("create {}: {e}", cgroup.0.display()));
        std::fs::write(cgroup.0.join(limit_file), bytes.to_string()).expect("set the memory limit");
        let _ = std::fs::write(cgroup.0.join("memory.swap.max"), "0");
        cgroup
    }

    /// Runs `program arg` inside the cgroup (a shell moves itself in, then execs it).
    pub fn run(&self, program: &Path, arg: &str) -> std::process::ExitStatus {
        let script = format!(
            "echo $$ > {} && exec {} {arg}",
            self.0.join("cgroup.procs").display(),
            program.display()
        );
        Command::new("sh").args(["-c", &script]).status().expect("run in the cgroup")
    }
}

impl Cgroup {
    /// Kills what is still inside and removes the directory: a task that is exiting
    /// keeps it busy for a moment, so removal is tried for a while.
    fn remove(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            match std::fs::remove_dir(&self.0) {
                Err(e)
                    if e.kind() != std::io::ErrorKind::NotFound && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                _ => return,
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A real Prometheus on `listen`, scraping `target` (job `leakmon`) and evaluating
/// `rules` every second. Keep both values: the directory holds its database.
pub fn start_prometheus(listen: &str, target: &str, rules: Option<&Path>) -> (tempfile::TempDir, Reap) {
    let tsdb = tempfile::tempdir().expect("tsdb dir");
    let config = tsdb.path().join("prometheus.yml");
    let rule_files = rules.map(|r| format!("rule_files:\n  - {}\n", r.display())).unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}scrape_configs:\n  - job_name: leakmon\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .expect("write config");
    let prometheus = Reap(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", tsdb.path().join("data").display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    (tsdb, prometheus)
}

/// The C library this test process maps, as leakmon would probe it.
pub fn system_libc() -> PathBuf {
    leakmon::discovery::Discovery::new(leakmon::procfs::ProcRoot::default())
        .process(std::process::id())
        .files
        .into_iter()
        .find(|p| p.to_string_lossy().contains("libc.so"))
        .expect("this process maps libc")
}

/// Starts `wait_then_leak` with `args` and waits until it has made its pre-window leak
/// and is ready to be watched.
pub fn start_wait_then_leak(args: &[&str]) -> Reap {
    use std::io::BufRead as _;
    let fixture = build_fixture("wait_then_leak.c", &[]);
    let mut child =
        Command::new(fixture).args(args).stdout(std::process::Stdio::piped()).spawn().expect("start fixture");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("read");
    assert_eq!(line, "ready\n");
    Reap(child)
}

/// Starts `leakmon report --format json --pid PID --duration DURATION` and waits until
/// its probes are in place; finish it with [`finish_report`].
pub fn watch_pid(pid: u32, duration: &str) -> (std::process::Child, StderrRest) {
    watch_pid_with(pid, duration, &[])
}

/// What a watching leakmon writes to stderr, collected after "watching" by a thread of
/// its own: a leakmon whose stderr pipe fills while the test drives its fixture would
/// block in its next log line, and stop handling the processes it holds.
pub type StderrRest = std::thread::JoinHandle<String>;

/// [`watch_pid`] with more options of `report` (`--agent`, `--sample-bytes`).
pub fn watch_pid_with(pid: u32, duration: &str, options: &[&str]) -> (std::process::Child, StderrRest) {
    use std::io::{BufRead as _, Read as _};
    let mut leakmon = leakmon()
        .env("RUST_LOG", "info")
        .args(["report", "--format", "json", "--duration", duration, "--pid", &pid.to_string()])
        .args(options)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start leakmon");
    let mut stderr = std::io::BufReader::new(leakmon.stderr.take().expect("stderr"));
    let mut log = String::new();
    while !log.contains("watching") {
        assert!(stderr.read_line(&mut log).expect("read stderr") > 0, "leakmon ended before watching: {log}");
    }
    let rest = std::thread::spawn(move || {
        let _ = stderr.read_to_string(&mut log);
        log
    });
    (leakmon, rest)
}

/// Waits for a [`watch_pid`] leakmon to end and parses its report.
pub fn finish_report(leakmon: std::process::Child, stderr: StderrRest) -> Value {
    let out = leakmon.wait_with_output().expect("wait leakmon");
    let rest = stderr.join().expect("the stderr reader");
    assert!(out.status.success(), "leakmon failed: {rest}");
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

/// BPF programs loaded in the kernel whose name is one of `names`, by the kernel's own
/// account (bpftool).
pub fn bpf_programs_named(names: &[&str]) -> usize {
    let out = Command::new("bpftool").args(["prog", "show"]).output().expect("run bpftool");
    assert!(out.status.success(), "bpftool prog show failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| names.iter().any(|n| l.contains(&format!(" name {n} "))))
        .count()
}

/// Variance of a byte-weighted sample's estimate of `n` blocks of `s` bytes at one
/// sample per `rate` bytes: `n * s^2 * (1 - p) / p`, `p` the chance a block is sampled.
pub fn sampling_variance(n: f64, s: f64, rate: f64) -> f64 {
    let p = 1.0 - (-s / rate).exp();
    n * s * s * (1.0 - p) / p
}

/// The standard deviation of a sampled report's total for [`LEAKS`] at one sample per
/// `rate` bytes.
pub fn leaks_sigma(rate: f64) -> f64 {
    LEAKS
        .iter()
        .map(|&(_, bytes, n)| sampling_variance(n as f64, bytes as f64 / n as f64, rate))
        .sum::<f64>()
        .sqrt()
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("send a signal");
}

/// The path of a system library, from the loader's cache (`libjemalloc.so.2`).
pub fn system_library(name: &str) -> PathBuf {
    let out = Command::new("ldconfig").arg("-p").output().expect("run ldconfig");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("x86-64"))
        .find_map(|l| {
            let (left, path) = l.split_once(" => ")?;
            (left.trim_start().starts_with(name)).then(|| PathBuf::from(path.trim()))
        })
        .unwrap_or_else(|| panic!("{name} is not installed (cargo xtask setup --tests installs it)"))
}

/// `sleep 30` under a tracer of its own (this test, as a debugger would be): running,
/// with `TracerPid` set.
pub fn under_a_debugger() -> Reap {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    // SAFETY: traceme is a single syscall, async-signal-safe.
    unsafe {
        cmd.pre_exec(|| nix::sys::ptrace::traceme().map_err(std::io::Error::from));
    }
    let target = Reap(cmd.spawn().expect("start"));
    let pid = nix::unistd::Pid::from_raw(target.0.id() as i32);
    nix::sys::wait::waitpid(pid, None).expect("the exec stop");
    nix::sys::ptrace::cont(pid, None).expect("let it run");
    target
}

/// Reads `child`'s piped stderr until a line holds `needle` (leakmon's log: "watching"
/// once a load is done and probed); returns what it read, and a thread reading the
/// rest, so the child never blocks on a full pipe.
pub fn logged_until(
    child: &mut std::process::Child,
    needle: &str,
) -> (String, std::thread::JoinHandle<String>) {
    use std::io::BufRead as _;
    let mut log = std::io::BufReader::new(child.stderr.take().expect("a piped stderr"));
    let mut seen = String::new();
    while !seen.contains(needle) {
        let mut line = String::new();
        assert!(log.read_line(&mut line).expect("read the log") > 0, "{seen}");
        seen.push_str(&line);
    }
    (seen, std::thread::spawn(move || std::io::read_to_string(log).unwrap_or_default()))
}

//! A real server under load: Debian's redis-server (jemalloc) driven by
//! redis-benchmark over a unix socket, requests per second under each tool. The bpftrace
//! peers probe jemalloc's malloc and free, the allocator redis really calls.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::bench::{cpu_seconds, median, write_json, Helper, Setup};

const REQUESTS: &str = "50000";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Tool {
    None,
    Floor,
    Memleak,
    Heaptrack,
    Leakmon,
    LeakmonSampled,
    LeakmonAgent,
}

impl Tool {
    const ALL: [Self; 7] = [
        Self::None,
        Self::Floor,
        Self::Memleak,
        Self::Heaptrack,
        Self::Leakmon,
        Self::LeakmonSampled,
        Self::LeakmonAgent,
    ];

    const fn label(self) -> &'static str {
        match self {
            Self::None => "no probes",
            Self::Floor => "uprobe floor (bpftrace, count only)",
            Self::Memleak => "memleak-equivalent (bpftrace)",
            Self::Heaptrack => "heaptrack (LD_PRELOAD, restarted)",
            Self::Leakmon => "leakmon report --pid (exact)",
            Self::LeakmonSampled => "leakmon report --pid --sample-bytes 512KiB",
            Self::LeakmonAgent => "leakmon report --pid --agent (paced)",
        }
    }
}

struct Run {
    rps: f64,
    /// The same server again once the tool is gone (the agent's redirections undone).
    rps_after: Option<f64>,
    /// leakmon's own CPU, in cores, while the load ran.
    tool_cpu: Option<f64>,
}

pub fn server(setup: &Setup, rounds: usize) -> Result<()> {
    if Command::new("redis-benchmark").arg("--version").output().is_err() {
        eprintln!(
            "xtask: redis-benchmark not installed (cargo xtask setup --tests); server workload skipped"
        );
        return Ok(());
    }
    let mut results: BTreeMap<Tool, Vec<Run>> = BTreeMap::new();
    for round in 0..rounds {
        let mut order = Tool::ALL.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for tool in order {
            let run = run_once(setup, tool).with_context(|| format!("redis under {}", tool.label()))?;
            results.entry(tool).or_default().push(run);
        }
        eprintln!("xtask: server round {}/{rounds} done", round + 1);
    }
    let rps = |t: Tool| median(&results[&t].iter().map(|r| r.rps).collect::<Vec<_>>());
    let base = rps(Tool::None);
    // Added time per request, in microseconds: what each tool costs the server.
    let added = |t: Tool| 1e6 / rps(t) - 1e6 / base;
    let mut text = format!(
        "\nredis-server (jemalloc) under redis-benchmark -t set,get,lpush,lpop -n {REQUESTS} -c 8, {rounds} rounds\n{:<44} {:>12} {:>12} {:>16}\n",
        "condition", "req/s", "slowdown", "added us/req"
    );
    let mut json = String::from("{\n");
    for tool in Tool::ALL {
        let r = rps(tool);
        let _ = writeln!(
            text,
            "{:<44} {r:>12.0} {:>11.1}% {:>16.2}",
            tool.label(),
            100.0 * (1.0 - r / base),
            added(tool)
        );
        let _ = writeln!(
            json,
            "  \"{tool:?}\": {{\"rps_median\": {r:.0}, \"runs\": {:?}}},",
            results[&tool].iter().map(|r| r.rps.round()).collect::<Vec<_>>()
        );
    }
    let cpu: Vec<f64> = results[&Tool::Leakmon].iter().filter_map(|r| r.tool_cpu).collect();
    let ratios = [
        ("leakmon / memleak-equivalent", added(Tool::Leakmon) / added(Tool::Memleak)),
        ("leakmon / uprobe floor", added(Tool::Leakmon) / added(Tool::Floor)),
        ("leakmon / heaptrack", added(Tool::Leakmon) / added(Tool::Heaptrack)),
    ];
    for (name, r) in ratios {
        let _ = writeln!(text, "{name:<44} {r:>12.2}   (added time per request)");
    }
    let _ = writeln!(text, "leakmon's own CPU while tracing redis: {:.1}% of one core", 100.0 * median(&cpu));
    let after: Vec<f64> = results[&Tool::LeakmonAgent].iter().filter_map(|r| r.rps_after).collect();
    let agent_ratio = rps(Tool::LeakmonAgent) / base;
    let after_ratio = median(&after) / base;
    let _ = writeln!(
        text,
        "{:<44} {agent_ratio:>12.3}   (target >= 0.95; medians of {rounds}, alternated with no probes)",
        "agent / no probes (throughput)"
    );
    let _ = writeln!(
        text,
        "{:<44} {after_ratio:>12.3}   (after the agent is unloaded)",
        "after detach / no probes"
    );
    let (attributed, top) = agent_attribution(setup)?;
    let _ = writeln!(
        text,
        "agent on redis under random-key SETs for 20 s: {:.1} MB attributed (target >= 20); largest stacks: {}",
        attributed as f64 / 1e6,
        top.join(", ")
    );
    let _ = write!(
        json,
        "  \"ratio_memleak\": {:.3},\n  \"ratio_floor\": {:.3},\n  \"ratio_heaptrack\": {:.3},\n  \"agent_throughput_ratio\": {agent_ratio:.3},\n  \"agent_after_detach_ratio\": {after_ratio:.3},\n  \"agent_attributed_bytes_20s\": {attributed}\n}}\n",
        ratios[0].1, ratios[1].1, ratios[2].1
    );
    let walls = report_wall_times(setup, 3)?;
    let _ = writeln!(
        text,
        "leakmon report --pid --duration 3 on the loaded redis, wall time: {:.2} s median of {walls:.2?} (attach and detach included; target <= 5 s)",
        median(&walls)
    );
    let json = json.replace("\n}\n", &format!(",\n  \"report_pid_3s_wall_seconds\": {walls:?}\n}}\n"));
    print!("{text}");
    write_json(&setup.out, "server", &json)?;
    Ok(())
}

/// Wall time of `leakmon report --pid --duration 3` on a redis-server under load, from
/// start to exit: loading, attaching (jemalloc, libc, libstdc++), the 3 s window, the
/// report and detaching.
fn report_wall_times(setup: &Setup, runs: usize) -> Result<Vec<f64>> {
    let (server, pid, socket) = start_redis(setup, "redis-wall", false)?;
    let mut load = Command::new("redis-benchmark");
    load.arg("-s")
        .arg(&socket)
        .args(["-t", "set,get", "-n", "100000000", "-c", "8", "-r", "100000", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut load = load.spawn().context("start redis-benchmark")?;
    std::thread::sleep(Duration::from_secs(1));
    let mut walls = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let out = Command::new(&setup.leakmon)
            .args(["report", "--format", "json", "--duration", "3", "--pid", &pid.to_string()])
            .output()
            .context("run leakmon report --pid")?;
        walls.push(started.elapsed().as_secs_f64());
        if !out.status.success() {
            let _ = load.kill();
            server.kill_group();
            bail!("leakmon report --pid failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let _ = load.kill();
    let _ = load.wait();
    server.kill_group();
    Ok(walls)
}

fn run_once(setup: &Setup, tool: Tool) -> Result<Run> {
    let (server, pid, socket) = start_redis(setup, "redis", tool == Tool::Heaptrack)?;
    let (helper, tracer_pid) = match tool {
        Tool::None | Tool::Heaptrack => (None, None),
        Tool::Floor | Tool::Memleak => {
            let script = setup.scripts.join(if tool == Tool::Floor { "floor.bt" } else { "memleak.bt" });
            let text =
                std::fs::read_to_string(&script).with_context(|| format!("read {}", script.display()))?;
            let jemalloc = mapped_library(pid, "libjemalloc").context("redis maps no jemalloc")?;
            let resolved =
                setup.out.join(format!("redis-{}", script.file_name().expect("name").to_string_lossy()));
            std::fs::write(&resolved, text.replace("LIBC", &jemalloc.display().to_string()))?;
            let mut tracer = Command::new("bpftrace");
            tracer.arg(&resolved);
            let helper = Helper::start(tracer, "Attaching")?;
            std::thread::sleep(Duration::from_secs(1));
            (Some(helper), None)
        }
        Tool::Leakmon | Tool::LeakmonSampled | Tool::LeakmonAgent => {
            let mut c = Command::new(&setup.leakmon);
            c.args(["report", "--format", "json", "--pid", &pid.to_string()]).env("RUST_LOG", "info");
            if tool == Tool::LeakmonSampled {
                c.args(["--sample-bytes", "512KiB"]);
            }
            if tool == Tool::LeakmonAgent {
                c.arg("--agent");
            }
            let helper = Helper::start(c, "watching")?;
            let p = helper.pid();
            (Some(helper), Some(p))
        }
    };
    let cpu_before = tracer_pid.map(cpu_seconds);
    let started = Instant::now();
    let rps = load(&socket);
    let elapsed = started.elapsed().as_secs_f64();
    let tool_cpu = tracer_pid.zip(cpu_before).map(|(p, before)| (cpu_seconds(p) - before) / elapsed);
    if let Some(h) = helper {
        h.stop();
    }
    let rps_after = if tool == Tool::LeakmonAgent { Some(load(&socket)) } else { None };
    server.kill_group();
    Ok(Run { rps: rps?, rps_after: rps_after.transpose()?, tool_cpu })
}

/// One redis-benchmark run on `socket`: the mean of its requests per second.
fn load(socket: &Path) -> Result<f64> {
    let out = Command::new("redis-benchmark")
        .arg("-s")
        .arg(socket)
        .args(["-t", "set,get,lpush,lpop", "-n", REQUESTS, "-c", "8", "-r", "100000", "-q", "--csv"])
        .stderr(Stdio::null())
        .output()
        .context("run redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rates: Vec<f64> =
        text.lines().filter_map(|l| l.split(',').nth(1)?.trim_matches('"').parse().ok()).collect();
    if rates.is_empty() {
        bail!("redis-benchmark printed no rates: {text}");
    }
    Ok(rates.iter().sum::<f64>() / rates.len() as f64)
}

/// The agent loaded into a running redis-server while random-key SETs fill it for
/// 20 s: the bytes attributed, and the allocating functions of the largest stacks
/// (their innermost frame outside the allocator wrappers).
fn agent_attribution(setup: &Setup) -> Result<(u64, Vec<String>)> {
    let (server, pid, socket) = start_redis(setup, "redis-agent", false)?;
    let mut fill = Command::new("redis-benchmark");
    fill.arg("-s")
        .arg(&socket)
        .args(["-t", "set", "-n", "100000000", "-c", "8", "-r", "10000000", "-d", "64", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let report = Command::new(&setup.leakmon)
        .args(["report", "--agent", "--format", "json", "--duration", "20", "--pid", &pid.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start leakmon report --agent")?;
    // The load starts once the agent is in: what is attributed is made while watched.
    std::thread::sleep(Duration::from_secs(1));
    let mut fill = fill.spawn().context("start redis-benchmark")?;
    let out = report.wait_with_output().context("wait for leakmon report")?;
    let _ = fill.kill();
    let _ = fill.wait();
    server.kill_group();
    if !out.status.success() {
        bail!("leakmon report --agent failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("parse the report")?;
    let process = json["processes"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["pid"] == pid))
        .context("redis is not in the report")?;
    let total = process["outstanding_bytes"].as_u64().unwrap_or(0);
    let top = process["stacks"]
        .as_array()
        .into_iter()
        .flatten()
        .take(3)
        .map(|s| s["site"]["function"].as_str().unwrap_or("??").to_owned())
        .collect();
    Ok((total, top))
}

/// A redis-server of its own in `setup.out/NAME`, on a unix socket, under heaptrack if
/// asked: the helper that started it, its pid, and its socket.
fn start_redis(setup: &Setup, name: &str, heaptrack: bool) -> Result<(Helper, u32, PathBuf)> {
    let dir = setup.out.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).context("create the redis directory")?;
    let socket = dir.join("redis.sock");
    let mut cmd = if heaptrack {
        let mut c = Command::new("heaptrack");
        c.arg("-o").arg(setup.out.join("heaptrack-redis")).arg("redis-server");
        c
    } else {
        Command::new("redis-server")
    };
    cmd.args(["--port", "0", "--save", "", "--appendonly", "no", "--dir"])
        .arg(&dir)
        .arg("--unixsocket")
        .arg(&socket);
    // "Ready to accept connections" on TCP, "ready to accept connections at PATH" on a socket.
    let server = Helper::start(cmd, "eady to accept connections")?;
    let pid = redis_pid(server.pid()).context("find redis-server's pid")?;
    Ok((server, pid, socket))
}

/// redis-server's pid: the helper itself, or under heaptrack its descendant.
fn redis_pid(helper: u32) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let found = std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let parent: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            (comm.trim() == "redis-server" && (pid == helper || parent == helper)).then_some(pid)
        });
        if found.is_some() {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn mapped_library(pid: u32, name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| Path::new(p).file_name().is_some_and(|n| n.to_string_lossy().starts_with(name)))
        .map(PathBuf::from)
}

//! `cargo xtask bench`: the cost of one malloc+free pair under each tool, measured in
//! one run with the conditions alternated round by round so machine drift cancels.
//!
//! Conditions: no probes; the naive uprobe floor (bpftrace probes on malloc's entry and
//! return and on free that only count); a memleak-equivalent bpftrace script (bcc's
//! memleak cannot run without kernel headers); heaptrack (`LD_PRELOAD`, no traps); and
//! leakmon: `report` tracing the workload (exact, sampled, and with the in-process
//! agent at 4 KiB and 512 KiB), the daemon with `--attach all`, and the daemon with
//! `--attach none` (the always-on tier). Prints a table with medians, the
//! overhead of each condition over no probes, and leakmon's ratios to the peers, and
//! writes every figure as JSON under target/bench/.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use std::fmt::Write as _;

use anyhow::{bail, Context as _, Result};

/// One workload: `alloc_bench MODE PAIRS THREADS`.
#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    mode: &'static str,
    threads: u32,
}

const WORKLOADS: [Workload; 4] = [
    Workload { name: "pairs, 1 thread", mode: "pairs", threads: 1 },
    Workload { name: "pairs, 2 threads", mode: "pairs", threads: 2 },
    Workload { name: "malloc+realloc+free, 1 thread", mode: "mixed", threads: 1 },
    Workload { name: "pairs, 1 thread, 20 calls deeper", mode: "deep", threads: 1 },
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Condition {
    None,
    Floor,
    SameTraps,
    Memleak,
    Heaptrack,
    LeakmonReport,
    LeakmonFramePointers,
    LeakmonSampled,
    LeakmonAgent4K,
    LeakmonAgent,
    LeakmonAll,
    LeakmonTier0,
}

impl Condition {
    const ALL: [Self; 12] = [
        Self::None,
        Self::Floor,
        Self::SameTraps,
        Self::Memleak,
        Self::Heaptrack,
        Self::LeakmonReport,
        Self::LeakmonFramePointers,
        Self::LeakmonSampled,
        Self::LeakmonAgent4K,
        Self::LeakmonAgent,
        Self::LeakmonAll,
        Self::LeakmonTier0,
    ];

    const fn label(self) -> &'static str {
        match self {
            Self::None => "no probes",
            Self::Floor => "uprobe floor (bpftrace, count only)",
            Self::SameTraps => "same-traps floor (uprobes at leakmon's addresses)",
            Self::Memleak => "memleak-equivalent (bpftrace)",
            Self::Heaptrack => "heaptrack (LD_PRELOAD)",
            Self::LeakmonReport => "leakmon report (traced, exact)",
            Self::LeakmonFramePointers => "leakmon report --unwind-rows 0 (fp)",
            Self::LeakmonSampled => "leakmon report --sample-bytes 512KiB",
            Self::LeakmonAgent4K => "leakmon report --agent --sample-bytes 4KiB",
            Self::LeakmonAgent => "leakmon report --agent (paced)",
            Self::LeakmonAll => "leakmon run --attach all",
            Self::LeakmonTier0 => "leakmon run --attach none",
        }
    }

    const fn key(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Floor => "floor",
            Self::SameTraps => "same_traps",
            Self::Memleak => "memleak",
            Self::Heaptrack => "heaptrack",
            Self::LeakmonReport => "leakmon_report",
            Self::LeakmonFramePointers => "leakmon_frame_pointers",
            Self::LeakmonSampled => "leakmon_sampled",
            Self::LeakmonAgent4K => "leakmon_agent_4k",
            Self::LeakmonAgent => "leakmon_agent_512k",
            Self::LeakmonAll => "leakmon_all",
            Self::LeakmonTier0 => "leakmon_tier0",
        }
    }
}

pub(crate) struct Setup {
    workload_bin: PathBuf,
    pub(crate) leakmon: PathBuf,
    libc: PathBuf,
    pub(crate) scripts: PathBuf,
    pub(crate) out: PathBuf,
    /// Where leakmon probes the workload's libc, as leakmon itself reports it: per
    /// symbol, the function's first byte (return probes) and the entry probe's offset
    /// (`free`'s is an instruction past its NULL test that the kernel emulates).
    probe_points: BTreeMap<String, (u64, u64)>,
}

/// The daemon's own cost while it ran one measurement.
#[derive(Default, Clone, Copy)]
struct DaemonCost {
    cpu_seconds: f64,
    peak_rss_kib: u64,
}

/// One section of the benchmark alone.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Only {
    Pairs,
    Server,
    Python,
    Node,
    Jvm,
    Scale,
}

pub fn bench(root: &Path, rounds: usize, pairs: u64, scale: bool, only: Option<Only>) -> Result<()> {
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).context("create target/bench")?;
    let workload_bin = compile(root, "alloc_bench", &out, &["-pthread"])?;
    let setup = Setup {
        workload_bin,
        leakmon: root.join("target/release/leakmon"),
        libc: own_libc()?,
        scripts: root.join("bench"),
        out,
        probe_points: BTreeMap::new(),
    };
    let setup = Setup { probe_points: probe_points(&setup)?, ..setup };
    match only {
        Some(Only::Server) => return crate::bench_server::server(&setup, rounds),
        Some(Only::Python) => return crate::bench_python::python(root, &setup, rounds),
        Some(Only::Node) => return crate::bench_runtimes::node(root, &setup, rounds),
        Some(Only::Jvm) => return crate::bench_runtimes::jvm(root, &setup, rounds),
        Some(Only::Scale) => return scale_figures(root, &setup),
        Some(Only::Pairs) | None => {}
    }

    let mut samples: BTreeMap<(usize, Condition), Vec<f64>> = BTreeMap::new();
    let mut daemon_costs: Vec<DaemonCost> = Vec::new();
    let started = Instant::now();
    for round in 0..rounds {
        for (w, workload) in WORKLOADS.iter().enumerate() {
            // Alternate the order each round so a slow spell does not hit one condition.
            let mut order = Condition::ALL.to_vec();
            if round % 2 == 1 {
                order.reverse();
            }
            for condition in order {
                let (ns, cost) = measure(&setup, *workload, condition, pairs)
                    .with_context(|| format!("{} under {}", workload.name, condition.label()))?;
                samples.entry((w, condition)).or_default().push(ns);
                if let Some(cost) = cost {
                    daemon_costs.push(cost);
                }
            }
        }
        eprintln!("xtask: bench round {}/{rounds} done after {:.0?}", round + 1, started.elapsed());
    }
    report(&setup, &samples, &daemon_costs, rounds, pairs)?;
    if only == Some(Only::Pairs) {
        return Ok(());
    }
    crate::bench_sampling::accuracy(root, &setup)?;
    crate::bench_server::server(&setup, rounds.min(3))?;
    crate::bench_python::python(root, &setup, rounds.min(3))?;
    crate::bench_runtimes::node(root, &setup, rounds.min(3))?;
    crate::bench_runtimes::jvm(root, &setup, rounds.min(3))?;
    if scale {
        scale_figures(root, &setup)?;
    }
    Ok(())
}

/// The share of one core `pid` uses over `window`.
fn cpu_share(pid: u32, window: Duration) -> f64 {
    let before = cpu_seconds(pid);
    std::thread::sleep(window);
    (cpu_seconds(pid) - before) / window.as_secs_f64()
}

/// `count` scrapes of /metrics at `listen`, 100 ms apart: each one's milliseconds, and
/// the size of the last.
fn scrapes(listen: &str, count: usize) -> Result<(Vec<f64>, usize)> {
    let mut latencies = Vec::new();
    let mut bytes = 0;
    for _ in 0..count {
        let started = Instant::now();
        let body = http_get(listen, "/metrics").context("scrape /metrics")?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        bytes = body.len();
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((latencies, bytes))
}

/// Forks `children` processes that each allocate (so each is traced) and exit at once;
/// the processes a second.
fn fork_storm(hold: &Path, children: u32) -> Result<f64> {
    let storm =
        Command::new(hold).args(["storm", &children.to_string()]).output().context("run the fork storm")?;
    String::from_utf8_lossy(&storm.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("processes_per_second="))
        .and_then(|v| v.trim().parse().ok())
        .context("the fork storm printed no rate")
}

/// The processes on the host now.
fn process_count() -> usize {
    std::fs::read_dir("/proc").map_or(0, |d| {
        d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok()).count()
    })
}

/// What reading /proc costs at all, the floor of a /proc-based tier: one read of every
/// process's `statm` (the smallest file with its resident size), as a share of one core
/// at one pass a second; the median of five passes.
fn proc_floor() -> f64 {
    let mut passes = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut buffer = String::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().filter_map(Result::ok) {
            if entry.file_name().to_string_lossy().parse::<u32>().is_ok() {
                buffer.clear();
                if let Ok(mut f) = std::fs::File::open(entry.path().join("statm")) {
                    let _ = std::io::Read::read_to_string(&mut f, &mut buffer);
                }
            }
        }
        passes.push(started.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(200));
    }
    median(&passes)
}

/// The daemon at host scale: the always-on tier's CPU with 1,000 and 10,000 extra idle
/// processes through each reader, beside the /proc floor; attributing everything, its
/// memory with one million live blocks and 2^17 distinct stacks, and the latency of a
/// /metrics scrape.
fn scale_figures(root: &Path, s: &Setup) -> Result<()> {
    const LISTEN: &str = "127.0.0.1:19598";
    let hold = compile(root, "hold", &s.out, &["-fno-optimize-sibling-calls"])?;
    let start_hold = |args: &[&str]| {
        let mut cmd = Command::new(&hold);
        cmd.args(args);
        Helper::start(cmd, "ready")
    };
    let daemon = |extra: &[&str]| {
        let mut cmd = Command::new(&s.leakmon);
        cmd.args(["run", "--sample-interval", "1s", "--web.listen-address", LISTEN]).args(extra);
        cmd.env("RUST_LOG", "info");
        Helper::start(cmd, "leakmon running")
    };
    // Always-on tier: the memory of every process, sampled each second, through the
    // task iterator and through /proc, beside the floor of reading /proc at all.
    let mut tiers = Vec::new();
    for extra in [1_000, 10_000] {
        let idle = start_hold(&["idle", &extra.to_string()])?;
        let mut processes = 0;
        let mut shares = Vec::new();
        for source in ["iterator", "proc"] {
            let tier0 = daemon(&["--attach", "none", "--memory-source", source])?;
            std::thread::sleep(Duration::from_secs(3));
            // Counted now: the last helpers killed are gone by then.
            processes = process_count();
            let cpu = cpu_share(tier0.pid(), Duration::from_secs(30));
            shares.push((cpu, peak_rss_kib(tier0.pid())));
            tier0.stop();
        }
        let floor = proc_floor();
        idle.kill_group();
        tiers.push((extra, processes, shares, floor));
    }

    // Per-stack totals of 2^17 stacks, read each second in batches and entry by entry.
    let mut table_reads = Vec::new();
    for extra in [&[][..], &["--read-tables-by-entry"][..]] {
        let mut args = vec!["--attach", "all", "--max-totals", "400000", "--max-stacks", "200000"];
        args.extend_from_slice(extra);
        let reader = daemon(&args)?;
        let stacks = start_hold(&["stacks"])?;
        std::thread::sleep(Duration::from_secs(5));
        table_reads.push(cpu_share(reader.pid(), Duration::from_secs(20)));
        reader.stop();
        stacks.kill_group();
    }

    // Attribution of everything, with a million live blocks and 2^17 stacks.
    let full = daemon(&[
        "--attach",
        "all",
        "--max-live",
        "1500000",
        "--max-totals",
        "400000",
        "--max-stacks",
        "200000",
    ])?;
    let million = start_hold(&["million"])?;
    let stacks = start_hold(&["stacks"])?;
    std::thread::sleep(Duration::from_secs(5));
    let (latencies, metrics_bytes) = scrapes(LISTEN, 20)?;
    let full_cpu = cpu_share(full.pid(), Duration::from_secs(10));
    // The unwind tables of every traced process on the host, by then.
    let scrape = http_get(LISTEN, "/metrics").unwrap_or_default();
    let gauge = |prefix: &str| {
        scrape.lines().find_map(|l| l.strip_prefix(prefix)?.trim().parse::<f64>().ok()).unwrap_or(f64::NAN)
    };
    let unwind_rows = gauge("leakmon_unwind_rows{state=\"used\"} ");
    let unwind_processes = gauge("leakmon_unwind_processes ");
    let rss = current_rss_kib(full.pid());
    let peak = peak_rss_kib(full.pid());
    let alloc_events = alloc_event_rate(s)?;
    // A fork storm: every child allocates (so it is traced) and exits at once, a fork
    // and an exit event each.
    let storm_rate = fork_storm(&hold, 20_000)?;
    std::thread::sleep(Duration::from_secs(2));
    let lost = losses(LISTEN);
    full.stop();
    million.kill_group();
    stacks.kill_group();

    for (extra, processes, shares, floor) in &tiers {
        let [(iter_cpu, iter_rss), (proc_cpu, proc_rss)] = shares[..] else { unreachable!("two sources") };
        println!(
            "\nalways-on tier, 1 s samples, {processes} processes ({extra} of them idle helpers):\n\
             task iterator (--memory-source iterator): {:.2}% of one core, peak RSS {:.1} MiB\n\
             /proc (--memory-source proc):             {:.2}% of one core, peak RSS {:.1} MiB\n\
             /proc floor (one read of every statm):    {:.2}% of one core\n\
             iterator / proc {:.3}, iterator / floor {:.3}   (target: iterator <= 1% of a core at 10,000)",
            iter_cpu * 100.0,
            iter_rss as f64 / 1024.0,
            proc_cpu * 100.0,
            proc_rss as f64 / 1024.0,
            floor * 100.0,
            iter_cpu / proc_cpu,
            iter_cpu / floor,
        );
    }
    println!(
        "\nthe daemon attributing all with 131,072 stacks, their totals read each second:\n\
         in batches (BPF_MAP_LOOKUP_BATCH): {:.2}% of one core\n\
         entry by entry (aya's iterator):   {:.2}% of one core\n\
         batches / entry by entry {:.3}; the reads' saving {:.2}% of one core (tests/tables.rs times the reads alone)",
        table_reads[0] * 100.0,
        table_reads[1] * 100.0,
        table_reads[0] / table_reads[1],
        (table_reads[1] - table_reads[0]) * 100.0,
    );
    println!(
        "\nhost scale:\n\
         attributing all, 1M live blocks and 131,072 stacks: RSS {:.1} MiB (peak {:.1} MiB), {:.2}% of one core\n\
         unwind tables for {unwind_processes} traced processes: {unwind_rows} rows, {:.1} MiB of kernel memory\n\
         /metrics scrape: median {:.2} ms, max {:.2} ms ({} bytes)\n\
         allocation events: {:.0}/s (2 threads of malloc+free pairs, each call probed)\n\
         fork storm: 20,000 traced processes at {:.0}/s ({:.0} lifecycle events/s)\n\
         losses: {}",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        full_cpu * 100.0,
        unwind_rows * 12.0 / 1_048_576.0,
        median(&latencies),
        latencies.iter().copied().fold(0.0, f64::max),
        metrics_bytes,
        alloc_events,
        storm_rate,
        storm_rate * 2.0,
        if lost.is_empty() { "none".to_owned() } else { lost.join(", ") }
    );
    Ok(())
}

/// The daemon's non-zero loss counters (full tables, lost lifecycle events).
fn losses(listen: &str) -> Vec<String> {
    http_get(listen, "/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("leakmon_bpf_map_errors_total") || l.starts_with("leakmon_events_lost_total")
        })
        .filter(|l| !l.ends_with(" 0"))
        .map(str::to_owned)
        .collect()
}

/// Allocation events (allocations and frees) per second as fast as this machine's
/// traps let two threads make them: malloc+free pairs, every call probed and accounted.
/// Run beside the daemon's million blocks; any loss shows in its counters.
fn alloc_event_rate(s: &Setup) -> Result<f64> {
    let mut cmd = Command::new(&s.workload_bin);
    cmd.args(["pairs", "2000000", "2"]);
    // Each of the two threads makes a pair (two events) every `ns_per_pair`.
    Ok(2.0 * 2.0 * 1e9 / ns_per_pair(cmd)?)
}

fn current_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// GET over plain HTTP/1.0; the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_owned())
}

/// Builds bench/NAME.c into `out` the way the fixtures are built: every allocator call
/// kept (`-fno-builtin`), frame pointers for stacks.
fn compile(root: &Path, name: &str, out: &Path, extra: &[&str]) -> Result<PathBuf> {
    let binary = out.join(name);
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-fno-builtin", "-fno-omit-frame-pointer"])
        .args(extra)
        .arg("-o")
        .arg(&binary)
        .arg(root.join(format!("bench/{name}.c")))
        .status()
        .context("run gcc")?;
    if !status.success() {
        bail!("gcc failed on bench/{name}.c");
    }
    Ok(binary)
}

/// The libc this machine's programs use (xtask's own, from its mappings).
fn own_libc() -> Result<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").context("read /proc/self/maps")?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| Path::new(p).file_name().is_some_and(|n| n.to_string_lossy().starts_with("libc.so")))
        .map(PathBuf::from)
        .context("no libc in xtask's own mappings")
}

/// Where leakmon probes the bench's libc: read from leakmon's own account of its entry
/// points (`report` on `true`, debug log).
fn probe_points(s: &Setup) -> Result<BTreeMap<String, (u64, u64)>> {
    let out = Command::new(&s.leakmon)
        .env("RUST_LOG", "leakmon::probes=debug")
        .args(["report", "--format", "json", "--", "true"])
        .output()
        .context("run leakmon to read its probe placement")?;
    let log = String::from_utf8_lossy(&out.stderr);
    let libc = s.libc.file_name().expect("file name").to_string_lossy().into_owned();
    let points: BTreeMap<String, (u64, u64)> = log
        .lines()
        .filter(|l| l.contains("entry point") && l.contains(&libc))
        .filter_map(|l| {
            let field = |name: &str| l.split_whitespace().find_map(|w| w.strip_prefix(name));
            let symbol = field("symbol=")?.trim_matches('"').to_owned();
            Some((symbol, (field("offset=")?.parse().ok()?, field("probe_offset=")?.parse().ok()?)))
        })
        .collect();
    for want in ["malloc", "realloc", "free"] {
        if !points.contains_key(want) {
            bail!("leakmon named no {want} probe in {libc}:\n{log}");
        }
    }
    Ok(points)
}

/// The same-traps floor: the kernel's own uprobe events (no BPF program, tracing off,
/// so each hit is the trap and nothing else) at exactly the addresses leakmon probes
/// for the workload's calls: malloc's and realloc's entries and returns, and `free` at
/// leakmon's emulated offset. Removed again when dropped.
struct SameTraps {
    tracefs: PathBuf,
}

impl SameTraps {
    const GROUP: &'static str = "leakmon_floor";

    fn start(s: &Setup) -> Result<Self> {
        let tracefs = PathBuf::from("/sys/kernel/tracing");
        let floor = Self { tracefs };
        let events = floor.tracefs.join("uprobe_events");
        let libc = s.libc.display();
        let mut defs = String::new();
        for symbol in ["malloc", "realloc"] {
            let (start, probe) = s.probe_points[symbol];
            let _ = writeln!(defs, "p:{}/{symbol} {libc}:{probe:#x}", Self::GROUP);
            let _ = writeln!(defs, "r:{}/{symbol}_ret {libc}:{start:#x}", Self::GROUP);
        }
        let (_, free) = s.probe_points["free"];
        let _ = writeln!(defs, "p:{}/free {libc}:{free:#x}", Self::GROUP);
        for line in defs.lines() {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&events)
                .with_context(|| format!("open {}", events.display()))?;
            std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes())
                .with_context(|| format!("define {line}"))?;
        }
        std::fs::write(floor.tracefs.join("tracing_on"), "0").context("turn tracing off")?;
        std::fs::write(floor.tracefs.join("events").join(Self::GROUP).join("enable"), "1")
            .context("enable the floor's uprobe events")?;
        Ok(floor)
    }
}

impl Drop for SameTraps {
    fn drop(&mut self) {
        let _ = std::fs::write(self.tracefs.join("events").join(Self::GROUP).join("enable"), "0");
        let Ok(defined) = std::fs::read_to_string(self.tracefs.join("uprobe_events")) else { return };
        for line in defined.lines().filter(|l| l.contains(Self::GROUP)) {
            let Some(name) =
                line.split_whitespace().next().and_then(|n| n.split_once(':')).map(|(_, n)| n.to_owned())
            else {
                continue;
            };
            if let Ok(mut file) =
                std::fs::OpenOptions::new().append(true).open(self.tracefs.join("uprobe_events"))
            {
                let _ = std::io::Write::write_all(&mut file, format!("-:{name}\n").as_bytes());
            }
        }
        let _ = std::fs::write(self.tracefs.join("tracing_on"), "1");
    }
}

/// Runs the workload once under `condition`: ns per pair, and the daemon's cost.
fn measure(s: &Setup, w: Workload, condition: Condition, pairs: u64) -> Result<(f64, Option<DaemonCost>)> {
    let pairs = if w.mode == "mixed" { pairs / 2 } else { pairs };
    let args = [w.mode.to_owned(), pairs.to_string(), w.threads.to_string()];
    let workload = || {
        let mut cmd = Command::new(&s.workload_bin);
        cmd.args(&args);
        cmd
    };
    match condition {
        Condition::None => Ok((ns_per_pair(workload())?, None)),
        Condition::Heaptrack => {
            let mut cmd = Command::new("heaptrack");
            cmd.arg("-o").arg(s.out.join("heaptrack.out")).arg(&s.workload_bin).args(&args);
            Ok((ns_per_pair(cmd)?, None))
        }
        Condition::SameTraps => {
            let floor = SameTraps::start(s)?;
            let ns = ns_per_pair(workload());
            drop(floor);
            Ok((ns?, None))
        }
        Condition::Floor | Condition::Memleak => {
            let script =
                s.scripts.join(if condition == Condition::Floor { "floor.bt" } else { "memleak.bt" });
            let text =
                std::fs::read_to_string(&script).with_context(|| format!("read {}", script.display()))?;
            let resolved = s.out.join(script.file_name().expect("file name"));
            std::fs::write(&resolved, text.replace("LIBC", &s.libc.display().to_string()))?;
            let mut tracer = Command::new("bpftrace");
            tracer.arg(&resolved);
            let helper = Helper::start(tracer, "Attaching")?;
            // bpftrace says "Attaching" just before it attaches.
            std::thread::sleep(Duration::from_secs(1));
            let ns = ns_per_pair(workload());
            helper.stop();
            Ok((ns?, None))
        }
        Condition::LeakmonReport
        | Condition::LeakmonSampled
        | Condition::LeakmonFramePointers
        | Condition::LeakmonAgent4K
        | Condition::LeakmonAgent => {
            let mut cmd = Command::new(&s.leakmon);
            cmd.args(["report", "--format", "json"]);
            match condition {
                Condition::LeakmonSampled => {
                    cmd.args(["--sample-bytes", "512KiB"]);
                }
                Condition::LeakmonAgent4K => {
                    cmd.args(["--agent", "--sample-bytes", "4KiB"]);
                }
                Condition::LeakmonAgent => {
                    cmd.arg("--agent");
                }
                _ => {}
            }
            if condition == Condition::LeakmonFramePointers {
                cmd.args(["--unwind-rows", "0"]);
            }
            cmd.arg("--").arg(&s.workload_bin).args(&args);
            Ok((ns_per_pair(cmd)?, None))
        }
        Condition::LeakmonAll | Condition::LeakmonTier0 => {
            let attach = if condition == Condition::LeakmonAll { "all" } else { "none" };
            let mut daemon = Command::new(&s.leakmon);
            daemon
                .args(["run", "--attach", attach, "--web.listen-address", "127.0.0.1:19599"])
                .env("RUST_LOG", "info");
            let helper = Helper::start(daemon, "leakmon running")?;
            let before = cpu_seconds(helper.pid());
            let ns = ns_per_pair(workload());
            let cost = DaemonCost {
                cpu_seconds: cpu_seconds(helper.pid()) - before,
                peak_rss_kib: peak_rss_kib(helper.pid()),
            };
            helper.stop();
            Ok((ns?, (condition == Condition::LeakmonAll).then_some(cost)))
        }
    }
}

/// Writes one section's figures to `out/PREFIX-UNIXTIME.json`, so runs can be compared.
pub(crate) fn write_json(out: &Path, prefix: &str, json: &str) -> Result<()> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let path = out.join(format!("{prefix}-{stamp}.json"));
    std::fs::write(&path, json).with_context(|| format!("write {}", path.display()))?;
    println!("written: {}", path.display());
    Ok(())
}

/// Runs `cmd` and reads the `ns_per_pair=F` line it prints.
fn ns_per_pair(mut cmd: Command) -> Result<f64> {
    let out = cmd.stderr(Stdio::null()).output().with_context(|| format!("run {cmd:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("ns_per_pair="))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no ns_per_pair in the output of {cmd:?}: {text}"))
}

/// A tool that runs beside the workload, stopped with SIGINT like a person would.
pub(crate) struct Helper(Child);

impl Helper {
    /// Starts `cmd` in its own process group and waits for `ready` on its output.
    pub(crate) fn start(mut cmd: Command, ready: &str) -> Result<Self> {
        let mut child = cmd
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {cmd:?}"))?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_mins(1);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(ready) => return Ok(Self(child)),
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("{cmd:?} did not say {ready:?}: {}", seen.join(" | "))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Kills the helper's whole process group (it is the group's leader).
    pub(crate) fn kill_group(mut self) {
        // SAFETY: signals a process group we created.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }

    pub(crate) fn stop(mut self) {
        // SAFETY: signals a child we own.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

pub(crate) fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    }
}

fn report(
    s: &Setup,
    samples: &BTreeMap<(usize, Condition), Vec<f64>>,
    daemon_costs: &[DaemonCost],
    rounds: usize,
    pairs: u64,
) -> Result<()> {
    let mut text = String::new();
    let mut json = String::from("{\n  \"workloads\": [\n");
    for (w, workload) in WORKLOADS.iter().enumerate() {
        let med = |c: Condition| samples.get(&(w, c)).map_or(f64::NAN, |v| median(v));
        let base = med(Condition::None);
        let _ = write!(
            text,
            "\n{} ({} rounds, {} pairs per run), ns per pair\n{:<40} {:>10} {:>10} {:>10} {:>12}\n",
            workload.name, rounds, pairs, "condition", "median", "min", "max", "overhead"
        );
        let mut entries = Vec::new();
        for c in Condition::ALL {
            let v = samples.get(&(w, c)).cloned().unwrap_or_default();
            let (min, max) = v.iter().fold((f64::INFINITY, 0.0_f64), |(a, b), &x| (a.min(x), b.max(x)));
            let m = median(&v);
            let _ = writeln!(text, "{:<40} {m:>10.1} {min:>10.1} {max:>10.1} {:>12.1}", c.label(), m - base);
            entries.push(format!(
                "      \"{}\": {{\"median\": {m:.1}, \"min\": {min:.1}, \"max\": {max:.1}, \"overhead\": {:.1}, \"runs\": {:?}}}",
                c.key(),
                m - base,
                v
            ));
        }
        let over = |c: Condition| med(c) - base;
        let lm = over(Condition::LeakmonReport);
        let ratios = [
            ("leakmon / memleak-equivalent", lm / over(Condition::Memleak), "target <= 0.3"),
            ("leakmon / uprobe floor", lm / over(Condition::Floor), "target <= 0.5"),
            ("leakmon / same-traps floor", lm / over(Condition::SameTraps), "target <= 1.3"),
            ("leakmon / heaptrack", lm / over(Condition::Heaptrack), "stretch <= 5"),
        ];
        for (name, r, target) in ratios {
            let _ = writeln!(text, "{name:<40} {r:>10.2}   ({target}; overheads, leakmon report)");
        }
        let agent = over(Condition::LeakmonAgent) / over(Condition::Heaptrack);
        let agent_4k = over(Condition::LeakmonAgent4K) / over(Condition::Heaptrack);
        let _ =
            writeln!(text, "{:<40} {agent:>10.2}   (target <= 1; overheads)", "agent (paced) / heaptrack");
        let _ = writeln!(text, "{:<40} {agent_4k:>10.2}   (overheads)", "agent 4KiB / heaptrack");
        let unwind = lm - over(Condition::LeakmonFramePointers);
        let _ = writeln!(
            text,
            "{:<40} {unwind:>10.1}   (ns per pair: .eh_frame walk minus frame-pointer walk)",
            "unwinding cost"
        );
        let _ = write!(
            json,
            "    {{\n      \"name\": \"{}\",\n{},\n      \"unwind_ns\": {:.1},\n      \"ratio_memleak\": {:.3},\n      \"ratio_floor\": {:.3},\n      \"ratio_same_traps\": {:.3},\n      \"ratio_heaptrack\": {:.3},\n      \"ratio_agent_heaptrack\": {:.3},\n      \"ratio_agent_4k_heaptrack\": {:.3}\n    }}{}\n",
            workload.name,
            entries.join(",\n"),
            lm - over(Condition::LeakmonFramePointers),
            ratios[0].1,
            ratios[1].1,
            ratios[2].1,
            ratios[3].1,
            agent,
            agent_4k,
            if w + 1 < WORKLOADS.len() { "," } else { "" }
        );
    }
    let cpu: f64 = daemon_costs.iter().map(|c| c.cpu_seconds).sum::<f64>() / daemon_costs.len().max(1) as f64;
    let rss = daemon_costs.iter().map(|c| c.peak_rss_kib).max().unwrap_or(0);
    let _ = write!(
        text,
        "\nleakmon run --attach all, per measurement: {cpu:.3} s CPU (mean), peak RSS {:.1} MiB\n",
        rss as f64 / 1024.0
    );
    let _ = write!(
            json,
        "  ],\n  \"leakmon_daemon\": {{\"cpu_seconds_mean\": {cpu:.4}, \"peak_rss_kib\": {rss}}},\n  \"rounds\": {rounds},\n  \"pairs\": {pairs}\n}}\n"
    );
    print!("{text}");
    write_json(&s.out, "bench", &json)?;
    Ok(())
}

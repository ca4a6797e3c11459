//! Command-line interface.

use std::{ffi::OsString, num::NonZeroU32, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::values::{parse_bytes, parse_comm, parse_count, parse_duration, Attach, MemorySource};

/// leakmon: find memory that processes allocate and never free, with eBPF.
///
/// It probes the allocator functions (`malloc`, `calloc`, `realloc`, `free`, `posix_memalign`,
/// `operator new`, ...) of the C library in the kernel and keeps, per process and per call
/// stack, the bytes still unfreed. Needs root (loading eBPF programs and attaching
/// uprobes).
#[derive(Debug, Parser)]
#[command(name = "leakmon", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run as a daemon: sample the memory of every process, flag steady growth, and
    /// serve the verdicts as Prometheus metrics and JSON. Stops cleanly on SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Report what one command (or a running process) left unfreed, by call stack.
    ///
    /// `leakmon report -- COMMAND [ARGS...]` starts COMMAND with the probes in place
    /// before its first instruction, follows its child processes, and reports when it
    /// exits. `leakmon report --pid PID --duration SECONDS` watches a running process
    /// and reports allocations made and not freed within the window; it reports when
    /// the window ends, when the process exits, or on Ctrl-C.
    Report(ReportArgs),
    /// Work with the configuration file.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Internal: holds the agent loaded into one running process for the leakmon that
    /// started it, and unloads it when that leakmon stops or dies.
    #[command(hide = true)]
    AgentSession(AgentSessionArgs),
    /// Internal: closes what a leakmon opened in a runtime (Node.js's inspector, a JFR
    /// recording) if that leakmon ends without closing it.
    #[command(hide = true)]
    RuntimeGuard(RuntimeGuardArgs),
}

#[derive(Debug, clap::Args)]
pub struct RuntimeGuardArgs {
    #[arg(long)]
    pub pid: u32,
    /// A JFR recording's name; without it, Node.js's inspector.
    #[arg(long)]
    pub recording: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct AgentSessionArgs {
    #[arg(long)]
    pub pid: u32,
    #[arg(long)]
    pub agent: std::path::PathBuf,
    #[arg(long)]
    pub sample_bytes: u64,
    /// Pace the interval to the process's allocation rate, from --sample-bytes.
    #[arg(long)]
    pub paced: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Check a configuration file: every problem, each with its line.
    Check {
        /// The file, e.g. /etc/leakmon/leakmon.toml.
        file: std::path::PathBuf,
    },
}

/// The help heading of the options a reload (SIGHUP) applies.
pub const LIVE: &str = "Options a reload (SIGHUP) applies";
/// The help heading of the options read at start only: they shape the kernel tables,
/// the listening socket, the metric labels or what is loaded into processes. A reload
/// that changes one keeps the running value and says so.
pub const FIXED: &str = "Options read at start only (a reload keeps them)";

/// `run`'s options: each declared once, here, with its reload rule as its help heading
/// (see [`crate::options`] for what derives from this).
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct RunArgs {
    /// A TOML file setting any of these options: keys as the long options (a dotted
    /// one's last part under its table: `listen-address` under `[web]`), lists for
    /// repeatable ones. Options given here win over the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Time between two memory samples of every process (`500ms`, `0.5s`, `10s`, `1m`).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    #[arg(help_heading = LIVE)]
    pub sample_interval: Duration,
    /// The analysis window: growth must be steady and significant over this long to be
    /// flagged, and a flag clears within one window after growth stops.
    #[arg(long, default_value = "10m", value_name = "DURATION", value_parser = parse_duration)]
    #[arg(help_heading = LIVE)]
    pub window: Duration,
    /// Where every process's memory counters are read each sample: `auto` (a BPF
    /// iterator program that walks the kernel's list of processes in one run, where the
    /// kernel has what it needs (6.2+: per-CPU RSS counters), else /proc), `iterator`
    /// (refuse to start without it), `proc` (three /proc files a process, each sample:
    /// a fifth of a core at one sample a second with 10,000 processes). Both give the
    /// same figures.
    #[arg(long, value_enum, default_value = "auto", value_name = "SOURCE")]
    #[arg(help_heading = FIXED)]
    pub memory_source: MemorySource,
    /// Allocator attribution: `none` (resident memory of every process only; no
    /// per-allocation cost), `suspects` (probe, for --suspect-duration, the processes
    /// whose resident memory shows steady growth, at most --max-suspects at once; no
    /// other process pays anything), `all` (probe every process's allocations: a trap
    /// per malloc/free), `pids` (only the processes given with --pid, and their
    /// children). Default: `pids` when --pid, --comm or --cgroup is given, else `none`.
    #[arg(long, value_enum, value_name = "MODE")]
    #[arg(help_heading = FIXED)]
    pub attach: Option<Attach>,
    /// Attribute in-process instead of trapping every allocator call: load leakmon's
    /// agent into each attributed process (with --attach pids or suspects; never all),
    /// without a restart. Only sampled blocks and their frees reach the kernel, so a
    /// busy server keeps nearly its full speed. The interval follows each process's
    /// allocation rate (from 512KiB, a second at a time, for about 2,000 samples a
    /// second: half a percent of a core) unless --sample-bytes fixes it. On stop,
    /// every redirection the agent made is undone, even if leakmon is killed.
    #[arg(long)]
    #[arg(help_heading = FIXED)]
    pub agent: bool,
    /// With --attach suspects: how long a suspect's allocations are attributed.
    #[arg(long, default_value = "10m", value_name = "DURATION", value_parser = parse_duration)]
    #[arg(help_heading = LIVE)]
    pub suspect_duration: Duration,
    /// With --attach suspects: most processes attributed at once (and, apart, most
    /// profiled by --runtime-profilers at once).
    #[arg(long, default_value = "4", value_name = "N", value_parser = parse_count::<1, usize>)]
    #[arg(help_heading = LIVE)]
    pub max_suspects: usize,
    /// Suspects running these runtimes (`node`, `jvm`, comma-separated) are profiled
    /// for --suspect-duration by the runtime's own sampling heap profiler, as `report
    /// --runtime` does: V8's through the inspector (opened with SIGUSR1, closed again),
    /// JFR's live-object samples through the JVM's attach socket. Their heap series and
    /// stacks then name JavaScript or Java functions. Off by default: it signals the
    /// process and runs the runtime's profiler in it.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "RUNTIMES")]
    #[arg(help_heading = FIXED)]
    pub runtime_profilers: Vec<crate::runtimes::Runtime>,
    /// A process to attribute allocations for (with --attach pids); repeatable.
    #[arg(long = "pid", value_name = "PID")]
    #[arg(help_heading = LIVE)]
    pub pids: Vec<u32>,
    /// Attribute the allocations of processes with this name (`comm`), now and later
    /// (with --attach pids); repeatable.
    #[arg(long = "comm", value_name = "NAME", value_parser = parse_comm)]
    #[arg(help_heading = LIVE)]
    pub comms: Vec<String>,
    /// Attribute the allocations of processes in this cgroup or below it, e.g.
    /// `/system.slice/nginx.service` (with --attach pids); repeatable.
    #[arg(long = "cgroup", value_name = "PATH")]
    #[arg(help_heading = LIVE)]
    pub cgroups: Vec<String>,
    /// Where to serve /metrics, /api/v1/leaks, /api/v1/processes and /healthz.
    #[arg(long = "web.listen-address", default_value = "127.0.0.1:9473", value_name = "ADDR")]
    #[arg(help_heading = FIXED)]
    pub listen: std::net::SocketAddr,
    /// TLS and basic authentication for the web endpoints, from a Prometheus exporter
    /// web configuration file (`tls_server_config` with `cert_file` and `key_file`;
    /// `basic_auth_users` with bcrypt hashes), as `node_exporter` takes.
    #[arg(long = "web.config.file", alias = "web.config-file", value_name = "FILE")]
    #[arg(help_heading = FIXED)]
    pub web_config: Option<std::path::PathBuf>,
    /// One series per process, with a `pid` label, instead of one per service and
    /// command. Off by default: pids are unbounded over time, and a restart then starts
    /// a new series (restarts no longer stitch).
    #[arg(long = "metrics.pid-label")]
    #[arg(help_heading = FIXED)]
    pub pid_label: bool,
    /// Allocation stacks exported per service and command (heap signal).
    #[arg(long, default_value = "5", value_name = "K", value_parser = parse_count::<0, usize>)]
    #[arg(help_heading = LIVE)]
    pub top_stacks: usize,
    /// Most series kept (service, command and signal); new ones beyond are counted
    /// in `leakmon_series_dropped_total` and not kept.
    #[arg(long, default_value = "10000", value_name = "N", value_parser = parse_count::<1, usize>)]
    #[arg(help_heading = LIVE)]
    pub max_series: usize,
    /// Seconds between two summaries of the largest unfreed totals in the log (with
    /// allocator attribution).
    #[arg(long, default_value = "60", value_name = "SECONDS", value_parser = parse_count::<1, NonZeroU32>)]
    #[arg(help_heading = LIVE)]
    pub interval: NonZeroU32,
    /// Processes listed in each summary.
    #[arg(long, default_value = "5", value_name = "N", value_parser = parse_count::<0, usize>)]
    #[arg(help_heading = LIVE)]
    pub top: usize,
    #[command(flatten, next_help_heading = FIXED)]
    pub tables: TableArgs,
}

#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct TableArgs {
    /// Capacity of the live-allocation table (blocks tracked at once, all processes).
    #[arg(long, default_value = "262144", value_name = "N", value_parser = parse_count::<1, NonZeroU32>)]
    pub max_live: NonZeroU32,
    /// Capacity of the per-stack totals table.
    #[arg(long, default_value = "65536", value_name = "N", value_parser = parse_count::<1, NonZeroU32>)]
    pub max_totals: NonZeroU32,
    /// Capacity of the stack table (distinct call stacks, about 1 KiB each, allocated as
    /// they are first seen).
    #[arg(long, default_value = "16384", value_name = "N", value_parser = parse_count::<1, NonZeroU32>)]
    pub max_stacks: NonZeroU32,
    /// Track a byte-weighted sample of the allocations instead of every one: on average
    /// one sampled block per SIZE bytes allocated (e.g. 512KiB), each standing for the
    /// bytes it represents, so totals are unbiased estimates (as jemalloc's heap
    /// profiler does). Smaller tables and less work per allocation; the trap of each
    /// probe remains. 0: exact (the agent and the runtimes' profilers, which always
    /// sample, then pace their interval to each process's allocation rate).
    #[arg(long, default_value = "0", value_name = "SIZE", value_parser = parse_bytes)]
    pub sample_bytes: u64,
    /// Capacity of the unwind tables that give full stacks for code built without frame
    /// pointers (rows of each mapped file's call-frame information; 12 bytes each,
    /// allocated at start; a libc takes about 28,000). Stacks stop at a file that does
    /// not fit. 0: frame pointers only.
    #[arg(long, default_value = "1048576", value_name = "N", value_parser = parse_count::<0, u32>)]
    pub unwind_rows: u32,
    /// A function that only passes allocations on; stacks are named by their first
    /// frame outside such wrappers. Adds to a built-in list (xmalloc, zmalloc, the glib
    /// and python ones, operator new, jemalloc and tcmalloc entry points). A trailing
    /// star makes a prefix. Repeatable.
    #[arg(long = "wrapper", alias = "wrappers", value_name = "NAME", value_parser = parse_wrapper)]
    pub wrappers: Vec<String>,
    /// A function whose allocations the program keeps by design; stacks through it are
    /// set apart on a "runtime-internal" line of their own, out of the leak table.
    /// Adds to a built-in list (glibc's thread-local storage and dynamic-linker
    /// bookkeeping). A trailing star makes a prefix. Repeatable.
    #[arg(long = "suppress", value_name = "NAME", value_parser = parse_wrapper)]
    pub suppress: Vec<String>,
    /// Read the kernel's per-stack totals entry by entry (two calls each) instead of in
    /// batches: the way before batches, kept for `cargo xtask bench` to compare.
    #[arg(long, hide = true)]
    pub read_tables_by_entry: bool,
}

fn parse_budget(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ms) if ms.is_finite() && ms > 0.0 && ms <= 3_600_000.0 => Ok(ms),
        _ => Err(format!("{text:?} is not a number of milliseconds between 0 and an hour")),
    }
}

fn parse_wrapper(text: &str) -> Result<String, String> {
    crate::wrappers::validate(text).map(|()| text.to_owned())
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Watch this running process instead of starting a command.
    #[arg(long, value_name = "PID", conflicts_with = "command", required_unless_present = "command")]
    pub pid: Option<u32>,
    /// With --pid: how long to watch. Without it, until the process exits or Ctrl-C.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Sample inside the process instead of trapping every allocator call: load
    /// leakmon's agent into it (at the command's start through `LD_PRELOAD`, or into the
    /// running --pid through ptrace, without a restart). Only sampled blocks and their
    /// frees reach the kernel, so the process keeps nearly its full speed. Sampling is
    /// byte-weighted, at an interval that follows the process's allocation rate (from
    /// 512KiB, for about 2,000 samples a second) unless --sample-bytes fixes it. On
    /// exit of the report the agent's redirections are undone in a running process.
    #[arg(long)]
    pub agent: bool,
    /// Ask the runtime's own sampling heap profiler instead of watching the allocator:
    /// for Node.js, V8's (through its inspector, opened with SIGUSR1 and closed again
    /// afterwards), which names the JavaScript functions and lines whose objects the
    /// window's allocations still hold. Needs --pid and --duration; --sample-bytes sets
    /// its interval (without it, the process's allocation rate, measured for a second
    /// first, sets it). A process whose inspector is already open is left
    /// alone. For a HotSpot JVM, JFR's live-object samples with their allocation stacks,
    /// through the attach protocol jcmd speaks (no JDK needed on the host).
    #[arg(long)]
    pub runtime: bool,
    /// Say whether each stack's unfreed bytes are lost or still held, and by what, as
    /// valgrind's memcheck classes them (definitely, indirectly or possibly lost, still
    /// reachable), naming the root that holds the reachable ones (a global, a thread's
    /// stack frame, its TLS or a register) and the allocation sites along the chain.
    /// With --pid the process is stopped at the end of the window while its memory is
    /// read (the pause is measured and printed); a command is scanned at its exit. For
    /// a Node.js process or a HotSpot JVM (--pid and --duration), the objects the window
    /// left alive, grouped by the variable or static field that holds them: from heap
    /// snapshots taken through Node.js's inspector at the window's start and end, or
    /// from JFR's paths from GC roots to its live samples at the window's end. For a
    /// CPython process (3.11 to 3.13), the objects the agent sampled in the window (it is
    /// loaded for it), grouped by the module global, class attribute, closure variable
    /// or frame local that holds them: its objects are walked from outside at the
    /// window's end, the process held still, nothing run or written in it.
    #[arg(long)]
    pub holders: bool,
    /// With --holders: the longest a process may be held still for its scan (default
    /// 2000 for a native scan; 30000 for a Node.js heap snapshot, which holds it up to
    /// about 11 s per 100 MB of heap, for JFR's search for paths, and for a walk of
    /// CPython's objects, about 7 s per GB). A native scan that needs longer stops, lets
    /// the process go and says what it covered, with no verdict; a snapshot estimated to
    /// need longer is not taken; JFR stops searching; a Python walk stops, and what it
    /// did not reach counts as unreached.
    #[arg(long, value_name = "MILLISECONDS", value_parser = parse_budget)]
    pub holders_budget: Option<f64>,
    #[command(flatten)]
    pub tables: TableArgs,
    /// The command to run, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable top list, largest first.
    Table,
    /// `{"processes":[{"pid":..,"comm":..,"outstanding_bytes":..,"stacks":[..]}]}`.
    Json,
    /// Folded stacks (`process;outer;...;inner bytes`), for flame graph tools.
    Folded,
    /// A flame graph of unfreed bytes (SVG).
    Svg,
    /// A gzipped pprof profile (in-use space and objects), for `go tool pprof` and
    /// profile stores.
    Pprof,
}

impl RunArgs {
    /// Whether any process selector (--pid, --comm, --cgroup) is given.
    pub fn selects(&self) -> bool {
        !(self.pids.is_empty() && self.comms.is_empty() && self.cgroups.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn report_needs_a_pid_or_a_command_not_both() {
        assert!(Cli::try_parse_from(["leakmon", "report"]).is_err());
        assert!(Cli::try_parse_from(["leakmon", "report", "--pid", "1", "--", "true"]).is_err());
        let cli =
            Cli::try_parse_from(["leakmon", "report", "--format", "json", "--", "ls", "-l"]).expect("parses");
        let Cmd::Report(args) = cli.command else { panic!("report") };
        assert_eq!(args.command, vec![OsString::from("ls"), OsString::from("-l")]);
        assert_eq!(args.format, Format::Json);
    }
}

//! Command-line interface.

use std::{ffi::OsString, num::NonZeroU32};

use clap::{Parser, Subcommand, ValueEnum};

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
    /// Run as a daemon: trace every process on the host and log the largest unfreed
    /// totals periodically. Stops cleanly on SIGINT/SIGTERM.
    Run(RunArgs),
    /// Report what one command (or a running process) left unfreed, by call stack.
    ///
    /// `leakmon report -- COMMAND [ARGS...]` starts COMMAND with the probes in place
    /// before its first instruction, follows its child processes, and reports when it
    /// exits. `leakmon report --pid PID --duration SECONDS` watches a running process
    /// and reports allocations made and not freed within the window; it reports when
    /// the window ends, when the process exits, or on Ctrl-C.
    Report(ReportArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Seconds between two summaries in the log.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    pub interval: NonZeroU32,
    /// Processes listed in each summary.
    #[arg(long, default_value = "5", value_name = "N")]
    pub top: usize,
    /// Trace only these processes (and their children); repeatable. Default: all.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    #[command(flatten)]
    pub tables: TableArgs,
}

#[derive(Debug, clap::Args)]
pub struct TableArgs {
    /// Capacity of the live-allocation table (blocks tracked at once, all processes).
    #[arg(long, default_value = "262144", value_name = "N")]
    pub max_live: NonZeroU32,
    /// Capacity of the per-stack totals table.
    #[arg(long, default_value = "65536", value_name = "N")]
    pub max_totals: NonZeroU32,
    /// Capacity of the stack table (distinct call stacks).
    #[arg(long, default_value = "16384", value_name = "N")]
    pub max_stacks: NonZeroU32,
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

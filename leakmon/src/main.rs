use std::{io::IsTerminal as _, process::ExitCode};

use clap::{error::ErrorKind, Parser as _};
use leakmon::cli::{Cli, Cmd};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    let default_level = match cli.command {
        Cmd::Run(_) => "info",
        Cmd::Report(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Cmd::Run(args) => leakmon::commands::run::run(&args),
        Cmd::Report(args) => leakmon::commands::report::report(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("leakmon: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version print as usual; a usage mistake is said in one line.
fn usage_error(err: &clap::Error) -> ExitCode {
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        err.exit();
    }
    let text = err.to_string();
    let message: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    let message = message.join(" ");
    eprintln!("leakmon: {} (see `leakmon --help`)", message.strip_prefix("error: ").unwrap_or(&message));
    ExitCode::from(2)
}

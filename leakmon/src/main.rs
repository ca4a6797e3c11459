use std::{io::IsTerminal as _, process::ExitCode};

use clap::{error::ErrorKind, CommandFactory as _, FromArgMatches as _};
use leakmon::cli::{Cli, Cmd};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(err) => return usage_error(&err),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    let default_level = match cli.command {
        Cmd::Run(_) => "info",
        Cmd::Report(_) | Cmd::Config(_) | Cmd::AgentSession(_) | Cmd::RuntimeGuard(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Cmd::Run(_) => {
            let run = matches.subcommand_matches("run").expect("run subcommand");
            let (given, args) = match leakmon::config::resolve(run) {
                Ok(resolved) => resolved,
                Err(problems) => {
                    for p in problems {
                        eprintln!("leakmon: {p}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            leakmon::commands::run::run(given, &args, &|| leakmon::config::resolve(run))
        }
        Cmd::Report(args) => leakmon::commands::report::report(&args),
        Cmd::Config(leakmon::cli::ConfigCmd::Check { file }) => return config_check(&file),
        Cmd::AgentSession(a) => {
            return leakmon::agent::session::guard(a.pid, &a.agent, a.sample_bytes, a.paced)
        }
        Cmd::RuntimeGuard(a) => {
            let guarded = a.recording.map_or(leakmon::runtimes::guardian::Guarded::Inspector, |name| {
                leakmon::runtimes::guardian::Guarded::Recording(name)
            });
            return leakmon::runtimes::guardian::guard(a.pid, &guarded);
        }
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

/// `leakmon config check FILE`: every problem, one line each, `FILE:LINE: message`.
fn config_check(path: &std::path::Path) -> ExitCode {
    match leakmon::config::load(path) {
        Ok((_, problems)) if problems.is_empty() => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Ok((_, problems)) => {
            for p in problems {
                eprintln!("{}:{}: {}", path.display(), p.line, p.message);
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("leakmon: read config {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

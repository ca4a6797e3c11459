use std::process::ExitCode;

use clap::Parser as _;
use leakmon::cli::{Cli, Cmd};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Cmd::Run(_) => "info",
        Cmd::Report(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)))
        .with_writer(std::io::stderr)
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

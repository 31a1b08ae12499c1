//! The `karrots` binary: parse the command line, set up logging, run the subcommand and map
//! its outcome to an exit code. Errors that reach here are printed once, with their causes.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use karrots::cli::{Cli, Command, check, plan, serve, status};

fn main() -> ExitCode {
    // Exit 2 means "changes" for `karrots plan`, so a usage error exits 1, not clap's 2.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KARROTS_LOG")
                // aws-config warns about each credential source it tries; the error Karrots
                // reports when none works already says why.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,aws_config=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let outcome: anyhow::Result<ExitCode> = match &cli.command {
        Command::Check(args) => check::exec(args).map_err(anyhow::Error::from),
        Command::Plan(args) => plan::exec(args),
        Command::Serve(args) => serve::exec(args),
        Command::Status(args) => status::exec(args),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("karrots: {error:#}");
            ExitCode::from(1)
        }
    }
}

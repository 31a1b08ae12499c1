//! The `karrots` binary: parse the command line, set up logging, run the subcommand and map
//! its outcome to an exit code. Errors that reach here are printed once, with their causes.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use karrots::cli::{Cli, Command, LogFormat, check, credential, plan, serve, status};

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
    init_logging(&cli);
    let outcome: anyhow::Result<ExitCode> = match &cli.command {
        Command::Check(args) => check::exec(args).map_err(anyhow::Error::from),
        Command::Plan(args) => plan::exec(args),
        Command::Serve(args) => serve::exec(args),
        Command::Status(args) => status::exec(args),
        Command::GitCredential(args) => credential::exec(args),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("karrots: {error:#}");
            ExitCode::from(1)
        }
    }
}

/// Logs go to stderr (journald takes them from there under systemd). `KARROTS_LOG` filters;
/// by default the daemon says what it does (info) and the one-shot commands only warn.
/// aws-config warns about each credential source it tries; the error Karrots reports when
/// none works already says why.
fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Serve(_) => "warn,karrots=info,aws_config=error",
        _ => "warn,aws_config=error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KARROTS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // One object per line: the event's fields at the top level, the run it belongs to
        // (environment, lane, commit, run id) under "span".
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

//! The subcommands, one module each: arguments plus an `exec` that returns the exit code.

pub mod check;
pub mod credential;
pub mod plan;
pub mod serve;
pub mod status;

use clap::{Parser, Subcommand, ValueEnum};

/// Karrots: no infrastructure change outside a merged commit, and no secrets held.
#[derive(Debug, Parser)]
#[command(name = "karrots", version, about)]
pub struct Cli {
    /// How log lines on stderr look: `human` (default), or `json`, one object per line for
    /// journald and log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a config repository working tree and print each environment's fingerprint.
    Check(check::CheckArgs),
    /// Plan one environment at a revision in an isolated workdir; never applies.
    /// Exit 0: no changes, 2: changes, 1: error.
    Plan(Box<plan::PlanArgs>),
    /// Run the daemon: watch the config repository, plan every commit, apply merged ones.
    Serve(serve::ServeArgs),
    /// Show the environments of a running daemon as a table.
    Status(status::StatusArgs),
    /// The daemon's own git credential helper (hidden): hands git the token of
    /// `git.token_file` for the repository's host.
    #[command(name = "git-credential", hide = true)]
    GitCredential(credential::CredentialArgs),
}

//! `karrots check [--repo DIR]`: validates a config repository working tree.
//!
//! Exit 0 with one `ok` line per environment on stdout; exit 1 with one `path:line: message`
//! per problem on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::repo::check_repository;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The root of the config repository's working tree.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub repo: PathBuf,
}

pub fn exec(args: &CheckArgs) -> std::io::Result<ExitCode> {
    let report = check_repository(&args.repo);
    if !report.problems.is_empty() {
        let mut stderr = std::io::stderr().lock();
        for problem in &report.problems {
            writeln!(stderr, "{problem}")?;
        }
        return Ok(ExitCode::from(1));
    }
    let mut stdout = std::io::stdout().lock();
    for environment in &report.environments {
        let spec = &environment.spec;
        writeln!(
            stdout,
            "ok {} branch={} account={} root={} fingerprint={}",
            spec.name,
            spec.branch,
            spec.aws.account_id,
            spec.terraform.root,
            environment.fingerprint
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

//! `karrots git-credential <action>`: not for people. The daemon names this program as the
//! credential helper of its own `git` processes, so that the token of `git.token_file` goes
//! from its file to git over a pipe — never through a command line or the environment.

use std::io::{Read, Write};
use std::process::ExitCode;

use crate::git::remote::CredentialSource;

#[derive(Debug, clap::Args)]
pub struct CredentialArgs {
    /// `get`, `store` or `erase`, as git calls a credential helper.
    pub action: String,
}

pub fn exec(args: &CredentialArgs) -> anyhow::Result<ExitCode> {
    let mut request = String::new();
    std::io::stdin()
        .take(64 * 1024)
        .read_to_string(&mut request)?;
    if let Some(source) = CredentialSource::from_env() {
        std::io::stdout().write_all(source.answer(&args.action, &request).as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

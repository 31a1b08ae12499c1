//! `karrots git-credential <action>`: not for people. The daemon names this program as the
//! credential helper of its own `git` processes, so that a credential goes to git over a
//! pipe — never through a command line or the environment: the token of `git.token_file`,
//! read from its file, or a GitHub App's installation token, asked of the daemon's
//! credential socket.

use std::io::{Read, Write};
use std::process::ExitCode;

use crate::git::remote::{CredentialSource, HELPER_ERROR, SOCKET_VARIABLE};

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
    let answer = match std::env::var_os(SOCKET_VARIABLE) {
        Some(socket) if args.action == "get" => ask_the_daemon(&socket, &request),
        Some(_) => String::new(),
        None => CredentialSource::from_env()
            .map(|source| source.answer(&args.action, &request))
            .unwrap_or_default(),
    };
    std::io::stdout().write_all(answer.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// The daemon's answer; its `error=` line goes to stderr, where git passes it on.
fn ask_the_daemon(socket: &std::ffi::OsStr, request: &str) -> String {
    let asked = std::os::unix::net::UnixStream::connect(socket).and_then(|mut stream| {
        stream.write_all(request.as_bytes())?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        stream.take(64 * 1024).read_to_string(&mut answer)?;
        Ok(answer)
    });
    match asked {
        Ok(answer) => match answer.strip_prefix("error=") {
            Some(error) => {
                eprintln!("{HELPER_ERROR}{}", error.trim());
                String::new()
            }
            None => answer,
        },
        Err(error) => {
            eprintln!("{HELPER_ERROR}the daemon's credential socket: {error}");
            String::new()
        }
    }
}

//! The daemon's credential socket, for a GitHub App: `karrots git-credential`, run by the
//! daemon's own `git`, asks here for the installation token, which lives only in the
//! daemon's memory. The socket is in `state_dir` (mode 0700): only the daemon's user reaches
//! it, the user that can already read the App's key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::forge::app::AppTokens;
use crate::git::remote::wanted;

/// The socket's name under `state_dir`.
pub(crate) const SOCKET: &str = "git-credential.sock";

/// Answers requests on the socket at `path` until `stop`: the installation token for
/// `host` over https (or plain http to this machine), nothing for any other host, and
/// `error=…` when no token can be had.
pub(super) fn serve(
    path: &Path,
    tokens: Arc<AppTokens>,
    host: String,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let path: PathBuf = path.to_path_buf();
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    Ok(tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => break,
            };
            let Ok((mut stream, _)) = accepted else {
                continue;
            };
            let (tokens, host) = (tokens.clone(), host.clone());
            tokio::spawn(async move {
                let mut request = String::new();
                let mut limited = (&mut stream).take(64 * 1024);
                if limited.read_to_string(&mut request).await.is_err() {
                    return;
                }
                let answer = answer(&tokens, &host, &request).await;
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
        let _ = std::fs::remove_file(&path);
    }))
}

async fn answer(tokens: &AppTokens, host: &str, request: &str) -> String {
    if !wanted(request, host) {
        return String::new();
    }
    match tokens.token().await {
        Ok(token) => format!("username=x-access-token\npassword={token}\n"),
        Err(error) => {
            tracing::warn!(%error, "no installation token for the fetch");
            format!("error={}\n", error.replace('\n', " "))
        }
    }
}

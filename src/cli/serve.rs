//! `karrots serve --config FILE`: the daemon, until SIGTERM or SIGINT; exit 0 after a clean
//! shutdown.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::Args;

use crate::config::load_daemon_config;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The daemon configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Threads for blocking work at once.
const BLOCKING_THREADS: usize = 16;

pub fn exec(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let config = load_daemon_config(&args.config).map_err(|problems| anyhow!("{problems}"))?;
    crate::daemon::limit_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Blocking work is short store calls, git (at most 4 at once), the fetch and the
        // HTTP routes' reads. Tokio's default allows 512 threads: a burst of a thousand
        // environments' store calls grew that many, each with a malloc arena of its own,
        // and the idle daemon kept the memory.
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| {
                format!(
                    "listening on {} (listen: in {}): is another karrots or service on that port?",
                    config.listen,
                    args.config.display()
                )
            })?;
        crate::daemon::run(config, listener, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Completes at the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = interrupt.recv() => tracing::info!("SIGINT"),
    }
}

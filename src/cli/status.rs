//! `karrots status [--server URL]`: the environments of a running daemon, as a table.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The daemon's address (also `--url`).
    #[arg(
        long,
        alias = "url",
        value_name = "URL",
        default_value = "http://127.0.0.1:8088"
    )]
    pub server: String,
    /// A file holding the API token (needed when the daemon listens off loopback).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
}

pub fn exec(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let url = format!("{}/api/v1/environments", args.server.trim_end_matches('/'));
    let token = match &args.token_file {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let environments: Vec<serde_json::Value> = runtime.block_on(async {
        let mut request = reqwest::Client::new().get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("is karrots serve running? {url}"))?
            .error_for_status()
            .with_context(|| url.clone())?;
        let text = response
            .text()
            .await
            .with_context(|| format!("reading {url}"))?;
        serde_json::from_str(&text).with_context(|| format!("reading {url}"))
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<16} {:<12} {:<9} {:<9} {:<9} {:<10} LAST RUN",
        "ENVIRONMENT", "BRANCH", "HEAD", "APPLIED", "STATUS", "DRIFT"
    )?;
    let short = |value: &serde_json::Value| {
        value
            .as_str()
            .map(|s| s[..7.min(s.len())].to_string())
            .unwrap_or_else(|| "-".into())
    };
    for env in &environments {
        let last_run = &env["last_run"];
        let run = if last_run.is_null() {
            "-".to_string()
        } else {
            format!(
                "#{} {} {} {}",
                last_run["id"],
                last_run["kind"].as_str().unwrap_or("?"),
                last_run["result"].as_str().unwrap_or("running"),
                short(&last_run["commit"])
            )
        };
        let drift = match env["drift"]["resources"].as_array().map(Vec::len) {
            Some(drifted) if drifted > 0 => format!("{drifted} drifted"),
            _ => env["drift"]["status"].as_str().unwrap_or("-").to_string(),
        };
        writeln!(
            out,
            "{:<16} {:<12} {:<9} {:<9} {:<9} {drift:<10} {run}",
            env["name"].as_str().unwrap_or("?"),
            env["branch"].as_str().unwrap_or("?"),
            short(&env["head"]),
            short(&env["last_applied"]),
            env["status"].as_str().unwrap_or("?"),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

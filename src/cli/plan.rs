//! `karrots plan --repo DIR --env NAME [--rev REV]`: one plan of one environment at a
//! revision, in an isolated workdir; never applies (SPEC §2).
//!
//! The environment's identity (account, roles, backend, branch) is read from the trust
//! branch; a revision that changes it is refused. A revision on the environment's branch
//! runs with the environment's own credentials (`role_arn`); any other revision is a preview
//! and gets `preview_role_arn` or no credentials at all. Exit 0: no changes; 2: changes;
//! 1: an error or a refusal.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::Args;

use crate::aws::{self, RunKind};
use crate::config::{
    EnvName, TerraformSettings, load_daemon_config, parse_duration, parse_environment,
};
use crate::git;
use crate::repo::check_repository;
use crate::terraform::{PlanRecord, Terraform};

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// A git repository (working clone) holding the config repository.
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// The environment to plan.
    #[arg(long, value_name = "NAME")]
    pub env: String,
    /// The revision to plan: a commit, branch or tag.
    #[arg(long, value_name = "REV", default_value = "HEAD")]
    pub rev: String,
    /// Take terraform and AWS settings (and trust_branch) from a daemon configuration file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["terraform", "plugin_mirror", "timeout"])]
    pub config: Option<PathBuf>,
    /// The terraform (or tofu) binary.
    #[arg(long, value_name = "BIN")]
    pub terraform: Option<PathBuf>,
    /// A provider filesystem mirror; without one, providers come from their registries.
    #[arg(long, value_name = "DIR")]
    pub plugin_mirror: Option<PathBuf>,
    /// An AWS endpoint (an emulator) for both the AWS SDK and terraform.
    #[arg(long, value_name = "URL", env = "AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// Where workdirs, state and plans go; default: a temporary directory removed afterwards.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Timeout of each terraform process, e.g. 30m.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
}

struct Settings {
    terraform: TerraformSettings,
    endpoint_url: Option<String>,
    trust_branch: String,
}

fn settings(args: &PlanArgs) -> anyhow::Result<Settings> {
    if let Some(file) = &args.config {
        let config = load_daemon_config(file).map_err(|problems| anyhow!("{problems}"))?;
        return Ok(Settings {
            terraform: config.terraform,
            endpoint_url: args
                .aws_endpoint_url
                .clone()
                .or(config.aws_endpoint_url.map(|url| url.to_string())),
            trust_branch: config.trust_branch.to_string(),
        });
    }
    let mut terraform = TerraformSettings::default();
    if let Some(binary) = &args.terraform {
        terraform.binary = binary.clone();
    }
    terraform.plugin_mirror = args.plugin_mirror.clone();
    if let Some(text) = &args.timeout {
        terraform.timeout =
            parse_duration(text).map_err(|message| anyhow!("--timeout: {message}"))?;
    }
    Ok(Settings {
        terraform,
        endpoint_url: args.aws_endpoint_url.clone(),
        trust_branch: "main".to_string(),
    })
}

pub fn exec(args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(plan(args))
}

async fn plan(args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let settings = settings(args)?;
    let env = EnvName::parse(&args.env).map_err(|message| anyhow!("--env: {message}"))?;
    let (_temporary, state_dir) = match &args.state_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("karrots-plan-")
                .tempdir()
                .context("creating a temporary state directory")?;
            let path = dir.path().to_path_buf();
            (Some(dir), path)
        }
    };
    let terraform = Terraform::new(&settings.terraform, &state_dir)?;
    let workdir = terraform.workdir(&env);
    let staging = workdir
        .begin_staging()
        .with_context(|| format!("preparing {}", workdir.base().display()))?;

    // git work is blocking; it is short and this command does nothing else meanwhile.
    let repo = git::open(&args.repo)?;
    let commit = git::resolve(&repo, &args.rev)?;
    let trust_tip = git::branch_tip(&repo, &settings.trust_branch).ok_or_else(|| {
        anyhow!(
            "the trust branch {:?} does not exist in {}: environment identities are read from it",
            settings.trust_branch,
            args.repo.display()
        )
    })?;
    let yaml_path = format!("environments/{env}/karrots.yaml");
    let trusted_text = git::read_file(&repo, &trust_tip, &yaml_path)?.ok_or_else(|| {
        anyhow!(
            "environment {env} is not on the trust branch {}: merge its karrots.yaml there first",
            settings.trust_branch
        )
    })?;
    let trusted =
        parse_environment(&trusted_text, yaml_path.as_ref(), env.as_str()).map_err(|problems| {
            anyhow!(
                "{yaml_path} on the trust branch {}:\n{problems}",
                settings.trust_branch
            )
        })?;

    let started = std::time::Instant::now();
    git::export_config_tree(&repo, &commit, &staging)?;
    let report = check_repository(&staging);
    tracing::debug!(elapsed = ?started.elapsed(), "exported and checked the commit");
    if !report.problems.is_empty() {
        let mut stderr = std::io::stderr().lock();
        for problem in &report.problems {
            writeln!(stderr, "{problem}")?;
        }
        bail!(
            "refusing to plan {env} at {}: the commit does not pass karrots check",
            commit.short()
        );
    }
    let checked = report
        .environments
        .into_iter()
        .find(|checked| checked.spec.name == env)
        .ok_or_else(|| anyhow!("environment {env} does not exist at {}", commit.short()))?;
    let changed = trusted.identity_differences(&checked.spec);
    if !changed.is_empty() {
        bail!(
            "refusing to plan {env} at {}: it changes {} of the environment, which only the trust branch {} may change",
            commit.short(),
            changed.join(", "),
            settings.trust_branch
        );
    }

    let merged = match git::branch_tip(&repo, trusted.branch.as_str()) {
        Some(tip) => git::on_first_parent_chain(&repo, &tip, &commit)?,
        None => false,
    };
    let kind = if merged {
        RunKind::Merged
    } else {
        RunKind::Preview
    };
    let started = std::time::Instant::now();
    let identity = aws::establish(
        &env,
        &trusted.aws,
        kind,
        &commit,
        settings.endpoint_url.as_deref(),
    )
    .await?;
    tracing::debug!(elapsed = ?started.elapsed(), caller = ?identity.caller_arn, "established the AWS identity");
    if identity.caller_arn.is_none() {
        eprintln!(
            "karrots: {} is not on {}: planning it as a preview without AWS credentials (set aws.preview_role_arn to give previews a read-only role)",
            commit.short(),
            trusted.branch
        );
    }

    let record = terraform
        .plan(&workdir, &checked, &commit, &identity.run_env)
        .await?;
    print_summary(
        &commit,
        &record,
        &trusted.branch.to_string(),
        kind,
        identity.caller_arn.as_deref(),
        args.state_dir.is_some(),
    )?;
    Ok(if record.summary.has_changes() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_summary(
    commit: &git::CommitId,
    record: &PlanRecord,
    branch: &str,
    kind: RunKind,
    caller: Option<&str>,
    kept: bool,
) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let summary = &record.summary;
    let short = commit.short();
    let who = match (kind, caller) {
        (RunKind::Merged, Some(arn)) => format!("on {branch}, as {arn}"),
        (RunKind::Preview, Some(arn)) => format!("preview (not on {branch}), as {arn}"),
        (_, None) => format!("preview (not on {branch}), without AWS credentials"),
    };
    writeln!(out, "environment {} at {short}: {who}", record.env)?;
    writeln!(
        out,
        "Plan: {} to add, {} to change, {} to destroy ({} replaced).",
        summary.add, summary.change, summary.destroy, summary.replace
    )?;
    for change in &summary.resources {
        writeln!(out, "  {} ({})", change.address, change.actions.join(", "))?;
    }
    if !summary.drift.is_empty() {
        writeln!(
            out,
            "Drift: {} changed outside terraform.",
            summary.drift.len()
        )?;
        for change in &summary.drift {
            writeln!(out, "  {} ({})", change.address, change.actions.join(", "))?;
        }
    }
    if record.init_reused {
        writeln!(
            out,
            "init: reused (module declarations, lock file and backend unchanged)"
        )?;
    } else {
        writeln!(out, "init: ran")?;
    }
    if kept {
        writeln!(out, "plan artifacts: {}", record.plan_dir.display())?;
    } else {
        writeln!(
            out,
            "plan artifacts: removed with the temporary state directory (pass --state-dir to keep them)"
        )?;
    }
    Ok(())
}

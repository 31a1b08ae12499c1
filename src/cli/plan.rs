//! `karrots plan --repo DIR --env NAME [--rev REV]`: one plan of one environment at a
//! revision, in an isolated workdir; never applies.
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
use tokio_util::sync::CancellationToken;

use crate::aws;
use crate::config::{
    EnvName, SandboxMode, TerraformSettings, load_daemon_config, parse_duration, parse_environment,
};
use crate::engine::{Lane, decide_lane};
use crate::git;
use crate::repo::CheckOptions;
use crate::terraform::{PlanRecord, RunId, StageError, Terraform, stage_commit};

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
    /// Take terraform and AWS settings (and trust_branch, sandbox) from a daemon configuration file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["terraform", "plugin_mirror", "timeout", "sandbox"])]
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
    /// The kernel sandbox for terraform: landlock (default) or off.
    #[arg(long, value_name = "MODE")]
    pub sandbox: Option<String>,
    /// Also write plan.json (`terraform show -json`) with the kept plan artifacts.
    #[arg(long, requires = "state_dir")]
    pub json_plan: bool,
}

struct Settings {
    terraform: TerraformSettings,
    endpoint_url: Option<String>,
    trust_branch: String,
    sandbox: SandboxMode,
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
            sandbox: config.sandbox,
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
    let sandbox = match &args.sandbox {
        Some(text) => {
            SandboxMode::parse(text).map_err(|message| anyhow!("--sandbox: {message}"))?
        }
        None => SandboxMode::Landlock,
    };
    Ok(Settings {
        terraform,
        endpoint_url: args.aws_endpoint_url.clone(),
        trust_branch: "main".to_string(),
        sandbox,
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
    if settings.sandbox == SandboxMode::Landlock {
        crate::sandbox::probe()?;
    }
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
    let terraform = Terraform::new(&settings.terraform, &state_dir, settings.sandbox)?;

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
    let trusted = match git::read_file(&repo, &trust_tip, &yaml_path)? {
        Some(text) => Some(
            parse_environment(&text, yaml_path.as_ref(), env.as_str()).map_err(|problems| {
                anyhow!(
                    "{yaml_path} on the trust branch {}:\n{problems}",
                    settings.trust_branch
                )
            })?,
        ),
        None => None,
    };
    let on_branch = match trusted
        .as_ref()
        .and_then(|spec| git::branch_tip(&repo, spec.branch.as_str()))
    {
        Some(tip) => git::on_first_parent_chain(&repo, &tip, &commit)?,
        None => false,
    };
    drop(repo);

    // The lane the commit will run in, unless it is refused below.
    let lane = if on_branch {
        Lane::Merged
    } else {
        Lane::Preview
    };
    let workdir = terraform.workdir(&env, lane);
    let started = std::time::Instant::now();
    let options = CheckOptions {
        providers: settings.terraform.providers.clone(),
        ..CheckOptions::default()
    };
    let staged = {
        let (workdir, repo_dir, commit) = (workdir.clone(), args.repo.clone(), commit.clone());
        tokio::task::spawn_blocking(move || stage_commit(&workdir, &repo_dir, &commit, &options))
            .await
            .context("staging the commit")?
    };
    tracing::debug!(elapsed = ?started.elapsed(), "exported and checked the commit");
    let checked = match staged {
        Ok(checked) => checked,
        Err(StageError::Refused(problems)) => {
            let mut stderr = std::io::stderr().lock();
            for problem in &problems {
                writeln!(stderr, "{problem}")?;
            }
            bail!(
                "refusing to plan {env} at {}: the commit does not pass karrots check",
                commit.short()
            );
        }
        Err(error) => return Err(error.into()),
    };
    let lane = decide_lane(trusted.as_ref(), &checked.spec, on_branch).map_err(|refusal| {
        anyhow!(
            "refusing to plan {env} at {}: {}",
            commit.short(),
            refusal.reason(&settings.trust_branch)
        )
    })?;
    let trusted = trusted.expect("decide_lane refuses an environment not on the trust branch");

    let started = std::time::Instant::now();
    let identity = aws::establish(
        &env,
        &trusted.aws,
        lane,
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

    let run = RunId::parse(&format!("{}-{}", unix_millis(), commit.short()))
        .map_err(|message| anyhow!(message))?;
    let cancel = CancellationToken::new();
    let interrupt = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            interrupt.cancel();
        }
    });
    let record = terraform
        .plan(
            &workdir,
            &checked,
            &commit,
            &run,
            &identity.run_env,
            &cancel,
        )
        .await?;
    if args.json_plan {
        terraform
            .render_json(&workdir, &record, &identity.run_env, &cancel)
            .await?;
    }
    print_summary(
        &commit,
        &record,
        &trusted.branch.to_string(),
        identity.caller_arn.as_deref(),
        args.state_dir.is_some(),
    )?;
    terraform.discard_preview(&record)?;
    Ok(if record.summary.has_changes() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

fn print_summary(
    commit: &git::CommitId,
    record: &PlanRecord,
    branch: &str,
    caller: Option<&str>,
    kept: bool,
) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let summary = &record.summary;
    let short = commit.short();
    let who = match (record.lane, caller) {
        (Lane::Merged, Some(arn)) => format!("on {branch}, as {arn}"),
        (Lane::Preview, Some(arn)) => format!("preview (not on {branch}), as {arn}"),
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
    if record.lane == Lane::Preview {
        writeln!(
            out,
            "plan artifacts: deleted (a preview is never applied; run {})",
            record.run_id
        )?;
    } else if kept {
        writeln!(out, "plan artifacts: {}", record.plan_dir.display())?;
    } else {
        writeln!(
            out,
            "plan artifacts: removed with the temporary state directory (pass --state-dir to keep them)"
        )?;
    }
    Ok(())
}

//! `karrots plan` and the apply of a saved plan, against the real terraform, the AWS provider
//! from the filesystem mirror and a moto_server started per test.

use std::path::Path;

use karrots::terraform::{PlanRecord, TerraformError};

use crate::support::{
    ConfigRepo, Moto, PLUGIN_MIRROR, Run, apply_saved_plan, environment_yaml, karrots_with_env,
    plan_env, plan_record, require_terraform_and_moto, test_credentials,
};

const APP_MODULE: &str = r#"terraform {
  required_providers {
    aws = {
      source = "hashicorp/aws"
    }
  }
}

# Region, endpoint and credentials reach the provider as environment variables.
provider "aws" {}

variable "name" {
  type        = string
  description = "Name tag of the VPC."
}

resource "aws_vpc" "main" {
  cidr_block = "10.0.0.0/16"
  tags = {
    Name = var.name
  }
}

data "aws_caller_identity" "me" {}

output "caller_arn" {
  description = "Who terraform ran as."
  value       = data.aws_caller_identity.me.arn
}

output "vpc_id" {
  description = "ID of the VPC."
  value       = aws_vpc.main.id
}
"#;

/// A git config repository with one environment, prod (branch main), planning one VPC.
fn app_repo(account: &str, aws_extra: &str) -> ConfigRepo {
    let repo = ConfigRepo::empty();
    let yaml = environment_yaml("prod", "main", "modules/app", "")
        .replace("\"123456789012\"", &format!("\"{account}\""))
        .replace(
            "  region: us-east-1\n",
            &format!("  region: us-east-1\n{aws_extra}"),
        )
        .replace("  backend:", "  vars: { name: karrots-test }\n  backend:");
    repo.write("environments/prod/karrots.yaml", &yaml);
    repo.write("modules/app/main.tf", APP_MODULE);
    repo.init_git();
    repo
}

fn plan(repo: &ConfigRepo, moto: &Moto, state_dir: &Path, extra: &[&str]) -> Run {
    plan_env(repo, "prod", moto, state_dir, extra)
}

fn record_of(state_dir: &Path, commit: &str) -> PlanRecord {
    plan_record(state_dir, "prod", commit)
}

async fn apply(state_dir: &Path, record: &PlanRecord, moto: &Moto) -> Result<(), TerraformError> {
    apply_saved_plan(state_dir, record, moto).await
}

#[tokio::test]
async fn plan_apply_replan_then_an_out_of_band_tag_shows_as_drift() {
    require_terraform_and_moto();
    let moto = Moto::start();
    let repo = app_repo("123456789012", "");
    let commit = repo.git(&["rev-parse", "HEAD"]);
    let state = tempfile::tempdir().unwrap();

    let first = plan(&repo, &moto, state.path(), &[]);
    assert_eq!(
        first.code, 2,
        "a fresh environment has changes\n{}{}",
        first.stdout, first.stderr
    );
    assert!(
        first
            .stdout
            .contains("Plan: 1 to add, 0 to change, 0 to destroy"),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains("  aws_vpc.main (create)"),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains(&format!(
            "environment prod at {}: on main, as arn:aws:sts::123456789012:user/moto",
            &commit[..7]
        )),
        "{}",
        first.stdout
    );

    let record = record_of(state.path(), &commit);
    assert_eq!(record.summary.add, 1);
    assert!(!record.init_reused, "the first plan runs init");
    for artifact in ["plan.tfplan", "plan.jsonl", "meta.json"] {
        let mode = std::fs::metadata(record.plan_dir.join(artifact))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{artifact}"
        );
    }
    apply(state.path(), &record, &moto)
        .await
        .expect("apply the saved plan");
    assert!(
        !record.plan_file().exists(),
        "an applied plan file is deleted"
    );
    let applied_again = apply(state.path(), &record, &moto).await.unwrap_err();
    assert!(
        matches!(applied_again, TerraformError::NotReady { .. }),
        "{applied_again}"
    );

    let second = plan(&repo, &moto, state.path(), &[]);
    assert_eq!(
        second.code, 0,
        "after the apply there is nothing to do\n{}{}",
        second.stdout, second.stderr
    );
    assert!(
        second
            .stdout
            .contains("Plan: 0 to add, 0 to change, 0 to destroy")
    );
    assert!(!second.stdout.contains("Drift:"), "{}", second.stdout);
    assert!(
        record_of(state.path(), &commit).init_reused,
        "the same commit reuses its init"
    );

    let vpcs: serde_json::Value = serde_json::from_str(&moto.aws(&[
        "ec2",
        "describe-vpcs",
        "--filters",
        "Name=tag:Name,Values=karrots-test",
    ]))
    .unwrap();
    let vpc_id = vpcs["Vpcs"][0]["VpcId"]
        .as_str()
        .expect("the applied VPC exists in moto")
        .to_string();
    moto.aws(&[
        "ec2",
        "create-tags",
        "--resources",
        &vpc_id,
        "--tags",
        "Key=Name,Value=changed-by-hand",
    ]);

    let third = plan(&repo, &moto, state.path(), &[]);
    assert_eq!(third.code, 2, "{}{}", third.stdout, third.stderr);
    assert!(
        third
            .stdout
            .contains("Drift: 1 changed outside terraform.\n  aws_vpc.main (update)"),
        "{}",
        third.stdout
    );
    assert!(third.stdout.contains("  aws_vpc.main (update)"));
    let drift = &record_of(state.path(), &commit).summary.drift;
    assert_eq!(drift.len(), 1);
    assert_eq!(drift[0].address, "aws_vpc.main");
}

#[tokio::test]
async fn an_apply_refuses_a_workdir_that_changed_since_its_plan() {
    require_terraform_and_moto();
    let moto = Moto::start();
    let repo = app_repo("123456789012", "");
    let commit = repo.git(&["rev-parse", "HEAD"]);
    let state = tempfile::tempdir().unwrap();
    let run = plan(&repo, &moto, state.path(), &[]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let record = record_of(state.path(), &commit);

    let tampered = state
        .path()
        .join("environments/prod/merged/checkout/modules/app/main.tf");
    std::fs::write(&tampered, APP_MODULE.replace("10.0.0.0/16", "10.9.0.0/16")).unwrap();
    let error = apply(state.path(), &record, &moto).await.unwrap_err();
    assert!(
        matches!(error, TerraformError::FingerprintMismatch { .. }),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("its inputs changed since the plan"),
        "{error}"
    );
    let vpcs = moto.aws(&[
        "ec2",
        "describe-vpcs",
        "--filters",
        "Name=tag:Name,Values=karrots-test",
    ]);
    assert!(!vpcs.contains("VpcId"), "nothing was applied: {vpcs}");
    assert!(
        !record.plan_file().exists(),
        "a refused plan is never applied later"
    );
}

#[test]
fn a_wrong_account_is_refused_before_terraform_starts() {
    require_terraform_and_moto();
    let moto = Moto::start();
    let repo = app_repo("111111111111", "");
    let state = tempfile::tempdir().unwrap();
    // A terraform that records being started.
    let marker = state.path().join("terraform-started");
    let fake = state.path().join("fake-terraform");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display()),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let run = plan(
        &repo,
        &moto,
        state.path(),
        &["--terraform", fake.to_str().unwrap()],
    );
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr.contains("refusing to run environment prod: the AWS credentials answer as account 123456789012 (arn:aws:sts::123456789012:user/moto), but aws.account_id is 111111111111"),
        "{}",
        run.stderr
    );
    assert!(
        !marker.exists(),
        "terraform ran although the account was wrong"
    );
}

#[test]
fn providers_come_from_karrots_cli_config_only() {
    require_terraform_and_moto();
    let moto = Moto::start();
    let repo = app_repo("123456789012", "");
    // The operator's own CLI settings point at a mirror that does not exist; Karrots ignores them.
    let operator = tempfile::tempdir().unwrap();
    let bogus = "provider_installation {\n  network_mirror {\n    url = \"https://mirror.invalid/\"\n  }\n}\n";
    std::fs::write(operator.path().join(".terraformrc"), bogus).unwrap();
    std::fs::write(operator.path().join("cli.tfrc"), bogus).unwrap();
    let state = tempfile::tempdir().unwrap();
    let cli_config = operator.path().join("cli.tfrc").display().to_string();
    let home = operator.path().display().to_string();
    let mut env = test_credentials();
    env.push(("HOME", &home));
    env.push(("TF_CLI_CONFIG_FILE", &cli_config));
    let args = [
        "plan",
        "--repo",
        repo.path().to_str().unwrap(),
        "--env",
        "prod",
        "--plugin-mirror",
        PLUGIN_MIRROR,
        "--aws-endpoint-url",
        &moto.url,
        "--state-dir",
        state.path().to_str().unwrap(),
    ];
    let run = karrots_with_env(&args, &env);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let written = std::fs::read_to_string(state.path().join("terraformrc-merged")).unwrap();
    assert!(
        written.contains(&format!(
            "filesystem_mirror {{\n    path = \"{PLUGIN_MIRROR}\""
        )),
        "{written}"
    );

    // A committed .terraformrc is refused before anything runs.
    repo.write(".terraformrc", bogus);
    repo.commit_all("bring our own CLI config");
    let run = karrots_with_env(&args, &env);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr.starts_with(".terraformrc:1: a committed .terraformrc is refused: Karrots writes the terraform CLI configuration itself\n"),
        "{}",
        run.stderr
    );
}

#[test]
fn merged_commits_assume_role_arn_and_previews_get_the_preview_role() {
    require_terraform_and_moto();
    let moto = Moto::start();
    let roles = "  role_arn: arn:aws:iam::123456789012:role/karrots-worker\n  preview_role_arn: arn:aws:iam::123456789012:role/karrots-readonly\n";
    let repo = app_repo("123456789012", roles);
    let merged = repo.git(&["rev-parse", "HEAD"]);
    let state = tempfile::tempdir().unwrap();

    let run = plan(&repo, &moto, state.path(), &["--json-plan"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let session = format!("assumed-role/karrots-worker/karrots-prod-{}", &merged[..7]);
    assert!(
        run.stdout
            .contains(&format!("on main, as arn:aws:sts::123456789012:{session}")),
        "{}",
        run.stdout
    );
    // terraform itself ran in that session.
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(record_of(state.path(), &merged).plan_dir.join("plan.json"))
            .unwrap(),
    )
    .unwrap();
    let caller = json["planned_values"]["outputs"]["caller_arn"]["value"]
        .as_str()
        .unwrap_or_default();
    assert!(caller.ends_with(&session), "terraform ran as {caller:?}");

    // A commit on another branch is a preview: the read-only role, never the apply role.
    repo.git(&["checkout", "-q", "-b", "feature"]);
    repo.replace(
        "modules/app/main.tf",
        "Name = var.name",
        "Name = \"${var.name}-feature\"",
    );
    let feature = repo.commit_all("rename the VPC");
    let run = plan(&repo, &moto, state.path(), &["--rev", "feature"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stdout.contains("init: ran"),
        "a preview inits in its own lane, never reusing the merged lane's\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("preview (not on main), as arn:aws:sts::123456789012:assumed-role/karrots-readonly/karrots-prod-{}", &feature[..7])),
        "{}",
        run.stdout
    );

    repo.replace("modules/app/main.tf", "-feature", "-feature-2");
    let feature_2 = repo.commit_all("rename it again");
    let run = plan(&repo, &moto, state.path(), &["--rev", "feature"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stdout.contains("init: reused"),
        "a new commit changing no declaration init acts on reuses its lane's init\n{}",
        run.stdout
    );
    assert!(run.stdout.contains(&feature_2[..7]), "{}", run.stdout);

    // A branch commit that changes the environment's identity is refused outright.
    repo.replace(
        "environments/prod/karrots.yaml",
        "role/karrots-readonly",
        "role/karrots-worker",
    );
    let sneaky = repo.commit_all("preview with the apply role");
    let run = plan(&repo, &moto, state.path(), &["--rev", &sneaky]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr.contains(&format!("refusing to plan prod at {}: it changes aws.preview_role_arn of the environment, which only the trust branch main may change", &sneaky[..7])),
        "{}",
        run.stderr
    );
}

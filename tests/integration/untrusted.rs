//! Unmerged commits are untrusted code. Each test here is one way a pushed branch could reach
//! what it must not — run a program, read another environment, read the operator's secrets,
//! get apply credentials, have its plan applied — shown closed with the real binary, real git
//! and real terraform (and moto where AWS is involved).

use std::path::Path;

use karrots::engine::Lane;
use karrots::terraform::TerraformError;

use crate::support::{
    ConfigRepo, Moto, PLUGIN_MIRROR, Run, apply_saved_plan, environment_yaml, karrots,
    karrots_with_env, plan_record, require_terraform_and_moto, require_tool, test_credentials,
};

/// A module that needs no provider: terraform plans it without AWS.
const DATA_MODULE: &str = "variable \"path\" {\n  type    = string\n  default = \"\"\n}\n\nresource \"terraform_data\" \"app\" {\n  input = \"app\"\n}\n";

/// prod (branch main) with root modules/app, dev (branch dev) with root modules/dev-app, and
/// an unused module; committed on main, with a `feature` branch checked out for the edits.
fn two_environments() -> ConfigRepo {
    let repo = ConfigRepo::empty();
    repo.write(
        "environments/prod/karrots.yaml",
        &environment_yaml("prod", "main", "modules/app", ""),
    );
    repo.write(
        "environments/dev/karrots.yaml",
        &environment_yaml("dev", "dev", "modules/dev-app", ""),
    );
    repo.write("modules/app/main.tf", DATA_MODULE);
    repo.write("modules/dev-app/main.tf", DATA_MODULE);
    repo.write("modules/unused/main.tf", "# reached by no environment\n");
    repo.write(
        "policies/karrots-worker-ec2.json",
        "{\"Version\": \"2012-10-17\", \"Statement\": [{\"Effect\": \"Allow\", \"Action\": \"ec2:Describe*\", \"Resource\": \"*\"}]}\n",
    );
    repo.init_git();
    repo.git(&["checkout", "-q", "-b", "feature"]);
    repo
}

/// `karrots plan` of prod at the `feature` branch (a preview: no AWS credentials at all).
fn preview(repo: &ConfigRepo, state: &Path, extra: &[&str]) -> Run {
    let repo_path = repo.path().display().to_string();
    let state = state.display().to_string();
    let mut args = vec![
        "plan",
        "--repo",
        &repo_path,
        "--env",
        "prod",
        "--rev",
        "feature",
        "--plugin-mirror",
        PLUGIN_MIRROR,
        "--state-dir",
        &state,
    ];
    args.extend_from_slice(extra);
    karrots(&args)
}

/// Terraform wraps long error lines; compare text with its whitespace folded.
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn require_terraform() {
    require_tool("terraform", "install Terraform 1.11 into /usr/local/bin");
}

#[test]
fn a_branch_cannot_lift_its_own_refusals_through_allow() {
    require_terraform();
    let repo = two_environments();
    let state = tempfile::tempdir().unwrap();
    let marker = state.path().join("external-program-ran");
    repo.append("environments/prod/karrots.yaml", "allow: [external]\n");
    repo.append(
        "modules/app/main.tf",
        &format!(
            "\ndata \"external\" \"host\" {{\n  program = [\"sh\", \"-c\", \"touch {} && echo '{{}}'\"]\n}}\n",
            marker.display()
        ),
    );
    let commit = repo.commit_all("run a program on the Karrots host");
    let run = preview(&repo, state.path(), &["--sandbox", "off"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "refusing to plan prod at {}: it changes allow of the environment, which only the trust branch main may change",
            &commit[..7]
        )),
        "{}",
        run.stderr
    );
    assert!(!marker.exists(), "the external program ran");
}

#[test]
fn terraform_sees_only_the_environment_closure() {
    require_terraform();
    let repo = two_environments();
    let state = tempfile::tempdir().unwrap();
    // Reading its own inputs works (and shows the plan can read files at all).
    repo.append(
        "modules/app/main.tf",
        "output \"policy\" {\n  value = file(\"${path.module}/../../policies/karrots-worker-ec2.json\")\n}\n",
    );
    repo.commit_all("read a policy");
    let run = preview(&repo, state.path(), &["--sandbox", "off"]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);

    // Another environment's folder and an unreached module are not in the checkout at all:
    // without the sandbox, the closure alone keeps them out.
    for (what, path) in [
        ("dev's folder", "../../environments/dev/karrots.yaml"),
        ("an unreached module", "../unused/main.tf"),
    ] {
        repo.write(
            "modules/app/peek.tf",
            &format!("output \"peek\" {{\n  value = file(\"${{path.module}}/{path}\")\n}}\n"),
        );
        repo.commit_all(what);
        let run = preview(&repo, state.path(), &["--sandbox", "off"]);
        assert_eq!(run.code, 1, "{what}: {}{}", run.stdout, run.stderr);
        assert!(
            run.stderr.contains("no file exists at"),
            "{what}: {}",
            run.stderr
        );
    }

    // A symlink to another environment's file is refused before terraform runs.
    repo.write("modules/app/peek.tf", "");
    repo.symlink(
        "modules/app/dev.yaml",
        "../../environments/dev/karrots.yaml",
    );
    repo.commit_all("link to dev");
    let run = preview(&repo, state.path(), &[]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr.starts_with("modules/app/dev.yaml:1: symlink to ../../environments/dev/karrots.yaml resolves to environments/dev/karrots.yaml, which is not a file of environment prod's inputs"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_sandbox_keeps_committed_code_from_the_hosts_secrets() {
    require_terraform();
    let repo = two_environments();
    let state = tempfile::tempdir().unwrap();
    let operator = tempfile::tempdir().unwrap();
    let credentials = operator.path().join(".aws/credentials");
    std::fs::create_dir_all(credentials.parent().unwrap()).unwrap();
    std::fs::write(
        &credentials,
        "[karrots]\naws_access_key_id = AKIACANARY\naws_secret_access_key = canary-secret\n",
    )
    .unwrap();
    // What else lives under state_dir: the daemon's database, another environment's state.
    let database = state.path().join("karrots.db");
    std::fs::write(&database, "runs and alerts").unwrap();
    let dev_state = state
        .path()
        .join("environments/dev/merged/state/terraform.tfstate");
    std::fs::create_dir_all(dev_state.parent().unwrap()).unwrap();
    std::fs::write(&dev_state, "{\"secret\": \"dev's state\"}").unwrap();
    // The files the daemon reaches its git host with (git:).
    let deploy_key = operator.path().join("deploy-key");
    std::fs::write(&deploy_key, "-----BEGIN OPENSSH PRIVATE KEY-----\ncanary\n").unwrap();
    let git_token = operator.path().join("git-token");
    std::fs::write(&git_token, "ghs_canary\n").unwrap();

    for (what, path) in [
        ("the operator's AWS credentials", &credentials),
        ("the git deploy key", &deploy_key),
        ("the git token", &git_token),
        ("the state database", &database),
        ("another environment's state", &dev_state),
    ] {
        repo.write(
            "modules/app/peek.tf",
            &format!(
                "output \"peek\" {{\n  value = file(\"{}\")\n}}\n",
                path.display()
            ),
        );
        repo.commit_all(what);
        let sandboxed = preview(&repo, state.path(), &[]);
        assert_eq!(sandboxed.code, 1, "{what}: {}", sandboxed.stdout);
        assert!(
            words(&sandboxed.stderr).contains("permission denied"),
            "{what}: {}",
            sandboxed.stderr
        );
        // The same commit without the sandbox reads it: the denial above is the sandbox's.
        let unsandboxed = preview(&repo, state.path(), &["--sandbox", "off"]);
        assert_eq!(unsandboxed.code, 2, "{what}: {}", unsandboxed.stderr);
    }

    // A committed symlink to the credentials never reaches terraform.
    repo.write("modules/app/peek.tf", "");
    repo.symlink("modules/app/credentials", &credentials);
    repo.commit_all("link to the credentials");
    let run = preview(&repo, state.path(), &["--sandbox", "off"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr.starts_with(&format!(
            "modules/app/credentials:1: symlink to {} leaves the repository",
            credentials.display()
        )),
        "{}",
        run.stderr
    );
}

#[test]
fn the_aws_provider_cannot_load_the_operators_credentials_file() {
    require_terraform_and_moto();
    let moto = Moto::start();
    let repo = two_environments();
    let state = tempfile::tempdir().unwrap();
    let operator = tempfile::tempdir().unwrap();
    let credentials = operator.path().join("credentials");
    std::fs::write(
        &credentials,
        "[karrots]\naws_access_key_id = AKIACANARY\naws_secret_access_key = canary-secret\n",
    )
    .unwrap();
    repo.write(
        "modules/app/aws.tf",
        &format!(
            "terraform {{\n  required_providers {{\n    aws = {{ source = \"hashicorp/aws\" }}\n  }}\n}}\n\nprovider \"aws\" {{\n  region                   = \"us-east-1\"\n  shared_credentials_files = [\"{}\"]\n  profile                  = \"karrots\"\n}}\n\ndata \"aws_caller_identity\" \"me\" {{}}\n\noutput \"who\" {{\n  value = data.aws_caller_identity.me.arn\n}}\n",
            credentials.display()
        ),
    );
    repo.commit_all("use the operator's profile");
    let endpoint = ["--aws-endpoint-url", moto.url.as_str()];
    let sandboxed = preview(&repo, state.path(), &endpoint);
    assert_eq!(sandboxed.code, 1, "{}", sandboxed.stdout);
    // The provider cannot open the file, so the profile it names does not exist for it.
    assert!(
        sandboxed
            .stderr
            .contains("failed to get shared config profile, karrots"),
        "{}",
        sandboxed.stderr
    );
    assert!(!sandboxed.stderr.contains("canary"), "{}", sandboxed.stderr);
    let unsandboxed = preview(
        &repo,
        state.path(),
        &[&endpoint[..], &["--sandbox", "off"]].concat(),
    );
    assert_eq!(
        unsandboxed.code, 2,
        "without the sandbox the provider reads the file and signs in: {}",
        unsandboxed.stderr
    );
}

#[test]
fn providers_outside_the_daemons_allow_list_are_refused() {
    require_terraform();
    let repo = two_environments();
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("karrots.yaml");
    std::fs::write(
        &config,
        format!(
            "repo: {}\nstate_dir: {}\nterraform:\n  plugin_mirror: {PLUGIN_MIRROR}\n  providers: [hashicorp/aws]\n",
            repo.path().display(),
            state.path().join("state").display()
        ),
    )
    .unwrap();
    repo.append(
        "modules/app/main.tf",
        "resource \"random_id\" \"r\" {\n  byte_length = 4\n}\n",
    );
    repo.commit_all("a provider the operator did not allow");
    let run = karrots(&[
        "plan",
        "--repo",
        repo.path().to_str().unwrap(),
        "--env",
        "prod",
        "--rev",
        "feature",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr.starts_with("modules/app/main.tf:9: provider \"hashicorp/random\" (random) is not in the daemon's terraform.providers (registry.terraform.io/hashicorp/aws) and is refused for environment prod: ask the operator to allow it\n"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_local_branch_ahead_of_its_remote_is_only_a_preview() {
    require_terraform();
    let origin = two_environments();
    origin.git(&["checkout", "-q", "main"]);
    let clone = tempfile::tempdir().unwrap();
    let clone_path = clone.path().join("config");
    let status = std::process::Command::new("git")
        .args(["clone", "-q"])
        .arg(origin.path())
        .arg(&clone_path)
        .status()
        .expect("git clone");
    assert!(status.success());
    let git = |args: &[&str]| {
        let output = std::process::Command::new("git")
            .arg("-C")
            .arg(&clone_path)
            .args(["-c", "user.name=t", "-c", "user.email=t@karrots.invalid"])
            .args(args)
            .output()
            .expect("git");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    std::fs::write(clone_path.join("modules/app/extra.tf"), "# not pushed\n").unwrap();
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "local only"]);
    let state = tempfile::tempdir().unwrap();
    let run = karrots(&[
        "plan",
        "--repo",
        clone_path.to_str().unwrap(),
        "--env",
        "prod",
        "--rev",
        "main",
        "--plugin-mirror",
        PLUGIN_MIRROR,
        "--state-dir",
        state.path().to_str().unwrap(),
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("preview (not on main), without AWS credentials"),
        "a commit the remote's main does not have never gets apply credentials\n{}",
        run.stdout
    );
}

#[test]
fn a_usage_error_exits_1_because_2_means_changes() {
    let run = karrots(&["plan", "--repo", "."]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("--env"), "{}", run.stderr);
    let run = karrots(&["plan", "--help"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[tokio::test]
async fn lanes_share_nothing_and_only_an_unchanged_merged_plan_is_applied() {
    require_terraform_and_moto();
    let moto = Moto::start();
    let repo = two_environments();
    repo.git(&["checkout", "-q", "main"]);
    let merged = repo.git(&["rev-parse", "HEAD"]);
    let state = tempfile::tempdir().unwrap();
    let plan_merged = || {
        let state = state.path().to_str().unwrap().to_string();
        karrots_with_env(
            &[
                "plan",
                "--repo",
                repo.path().to_str().unwrap(),
                "--env",
                "prod",
                "--rev",
                "main",
                "--plugin-mirror",
                PLUGIN_MIRROR,
                "--aws-endpoint-url",
                &moto.url,
                "--state-dir",
                &state,
            ],
            &test_credentials(),
        )
    };
    let run = plan_merged();
    assert_eq!(run.code, 2, "{}", run.stderr);
    let first = plan_record(state.path(), "prod", &merged);
    assert_eq!(first.lane, Lane::Merged);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let run = plan_merged();
    assert_eq!(run.code, 2, "{}", run.stderr);
    let second = plan_record(state.path(), "prod", &merged);
    assert_ne!(first.run_id, second.run_id, "plans are kept per run");
    assert!(first.plan_file().exists() && second.plan_file().exists());

    // A preview of a feature commit runs in its own lane and leaves the merged one alone.
    repo.git(&["checkout", "-q", "feature"]);
    repo.replace(
        "modules/app/main.tf",
        "input = \"app\"",
        "input = \"feature\"",
    );
    repo.commit_all("preview me");
    let run = preview(&repo, state.path(), &["--aws-endpoint-url", &moto.url]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let lanes = state.path().join("environments/prod");
    let preview_plans: Vec<_> = std::fs::read_dir(lanes.join("preview/plans"))
        .unwrap()
        .collect();
    assert!(
        preview_plans.is_empty(),
        "preview artifacts are deleted once recorded"
    );
    let ready = std::fs::read_to_string(lanes.join("merged/checkout/.karrots-ready")).unwrap();
    assert!(
        ready.contains(&merged),
        "the merged checkout is untouched: {ready}"
    );
    assert!(
        std::fs::read_to_string(lanes.join("merged/checkout/modules/app/main.tf"))
            .unwrap()
            .contains("input = \"app\"")
    );

    // A preview plan is never applied, even one that claims to be from the merged lane's dir.
    let mut as_preview = first.clone();
    as_preview.lane = Lane::Preview;
    let error = apply_saved_plan(state.path(), &as_preview, &moto)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("it is a preview plan"),
        "{error}"
    );

    // A plan file changed after the plan is refused, and deleted.
    let mut bytes = std::fs::read(second.plan_file()).unwrap();
    bytes.push(b'\n');
    std::fs::write(second.plan_file(), bytes).unwrap();
    let error = apply_saved_plan(state.path(), &second, &moto)
        .await
        .unwrap_err();
    assert!(
        matches!(error, TerraformError::PlanFileChanged { .. }),
        "{error}"
    );
    assert!(!second.plan_file().exists());

    // The first plan still applies; a third plan made before that apply is then stale.
    let run = plan_merged();
    assert_eq!(run.code, 2, "{}", run.stderr);
    let third = plan_record(state.path(), "prod", &merged);
    apply_saved_plan(state.path(), &first, &moto)
        .await
        .expect("the untouched merged plan applies");
    let error = apply_saved_plan(state.path(), &third, &moto)
        .await
        .unwrap_err();
    assert!(matches!(error, TerraformError::StalePlan { .. }), "{error}");
    assert!(
        !third.plan_file().exists(),
        "a stale plan is never tried again"
    );
}
